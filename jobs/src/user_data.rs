//! The node's cloud-init user-data, rendered from `cloud-init/user-data.yaml.tmpl`.

use uuid::Uuid;

const TEMPLATE: &str = include_str!("../../cloud-init/user-data.yaml.tmpl");

/// EC2's limit on user-data.
pub const USER_DATA_LIMIT: usize = 16 * 1024;

/// What the template is filled with. None of it is secret: the token is fetched at boot.
pub struct UserDataParams<'a> {
    pub node_id: Uuid,
    pub region: &'a str,
    pub secret_id: &'a str,
    pub hostname: &'a str,
    pub edge_service_port: u16,
    pub edge_package_url: Option<&'a str>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserDataError {
    #[error("user-data parameter {0} holds characters it may not")]
    UnsafeParameter(&'static str),
    #[error("user-data is {0} bytes, over EC2's 16 KiB")]
    TooLarge(usize),
}

/// A value is put into YAML and shell unquoted: allow only what ids, names and URLs need.
fn safe(name: &'static str, value: &str) -> Result<(), UserDataError> {
    let ok = value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._/:~%+=@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(UserDataError::UnsafeParameter(name))
    }
}

pub fn render(p: &UserDataParams<'_>) -> Result<String, UserDataError> {
    safe("region", p.region)?;
    safe("secret_id", p.secret_id)?;
    safe("hostname", p.hostname)?;
    let package = p.edge_package_url.unwrap_or("");
    safe("edge_package_url", package)?;
    let rendered = TEMPLATE
        .replace("{{node_id}}", &p.node_id.to_string())
        .replace("{{region}}", p.region)
        .replace("{{secret_id}}", p.secret_id)
        .replace("{{hostname}}", p.hostname)
        .replace("{{edge_service_port}}", &p.edge_service_port.to_string())
        .replace("{{edge_package_url}}", package);
    if rendered.len() > USER_DATA_LIMIT {
        return Err(UserDataError::TooLarge(rendered.len()));
    }
    Ok(rendered)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(hostname: &str) -> UserDataParams<'_> {
        UserDataParams {
            node_id: Uuid::nil(),
            region: "eu-west-1",
            secret_id: "hive/nodes/x/tunnel-token",
            hostname,
            edge_service_port: 8080,
            edge_package_url: Some("https://example.com/edge_1.0_arm64.deb"),
        }
    }

    #[test]
    fn renders_every_placeholder_within_the_limit() {
        let out = render(&params("n.nodes.example.com")).unwrap();
        assert!(out.starts_with("#cloud-config\n"));
        assert!(!out.contains("{{"));
        assert!(out.contains("HIVE_SECRET_ID=hive/nodes/x/tunnel-token"));
        assert!(out.len() < USER_DATA_LIMIT);
    }

    #[test]
    fn refuses_values_that_could_inject() {
        assert_eq!(
            render(&params("x\n  - evil")).unwrap_err(),
            UserDataError::UnsafeParameter("hostname")
        );
        assert!(render(&params("a;rm -rf /")).is_err());
    }
}
