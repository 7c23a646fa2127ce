//! The regions nodes live in and how the worker launches there, from the file's
//! `[regions.<name>]` tables or the one-region shorthand.

/// Where a region's nodes boot from: an AMI id, or an SSM parameter that names the current
/// one (`/aws/service/debian/release/12/latest/arm64`), which EC2 resolves at launch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Image {
    Ami(String),
    Parameter(String),
}

impl Image {
    /// The `ImageId` of a launch: the AMI, or `resolve:ssm:<parameter>`.
    pub fn launch_image_id(&self) -> String {
        match self {
            Image::Ami(id) => id.clone(),
            Image::Parameter(name) => format!("resolve:ssm:{name}"),
        }
    }
}

/// Everything a worker needs to launch nodes in one region: the `[regions.<name>]` tables of
/// `HIVE_CONFIG_FILE`, else the one-region shorthand (`AWS_REGION`, `HIVE_AMI_ID`,
/// `HIVE_SUBNET_ID`, `HIVE_SECURITY_GROUP_ID`, `HIVE_INSTANCE_PROFILE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionSettings {
    pub name: String,
    pub image: Image,
    /// One per availability zone, tried in order when a zone has no capacity.
    pub subnets: Vec<String>,
    pub security_group: String,
    pub instance_profile: String,
}

/// A `[regions.<name>]` table as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionTable {
    ami: Option<String>,
    ami_parameter: Option<String>,
    subnets: Vec<String>,
    security_group: String,
    instance_profile: String,
}

fn check_region(name: &str, t: RegionTable) -> Result<RegionSettings, String> {
    if !valid_region(name) {
        return Err(format!("regions.{name}: `{name}` is not a region name"));
    }
    let image = match (t.ami, t.ami_parameter) {
        (Some(ami), None) if ami.starts_with("ami-") => Image::Ami(ami),
        (Some(ami), None) => {
            return Err(format!(
                "regions.{name}.ami: `{ami}` does not start with `ami-`"
            ))
        }
        (None, Some(p)) if p.starts_with('/') => Image::Parameter(p),
        (None, Some(p)) => {
            return Err(format!(
                "regions.{name}.ami_parameter: `{p}` is not a parameter path (starting with `/`)"
            ))
        }
        _ => {
            return Err(format!(
                "regions.{name}: set exactly one of ami, ami_parameter"
            ))
        }
    };
    if t.subnets.is_empty() {
        return Err(format!("regions.{name}.subnets: name at least one subnet"));
    }
    if let Some(bad) = t.subnets.iter().find(|s| !s.starts_with("subnet-")) {
        return Err(format!(
            "regions.{name}.subnets: `{bad}` does not start with `subnet-`"
        ));
    }
    if !t.security_group.starts_with("sg-") {
        return Err(format!(
            "regions.{name}.security_group: `{}` does not start with `sg-`",
            t.security_group
        ));
    }
    if t.instance_profile.trim().is_empty() {
        return Err(format!("regions.{name}.instance_profile: empty"));
    }
    Ok(RegionSettings {
        name: name.to_string(),
        image,
        subnets: t.subnets,
        security_group: t.security_group,
        instance_profile: t.instance_profile,
    })
}

/// The `[regions.*]` tables of a configuration file; `None` when it has none.
pub(super) fn regions_from_toml(
    table: &toml::Table,
) -> Result<Option<Vec<RegionSettings>>, String> {
    let Some(regions) = table.get("regions") else {
        return Ok(None);
    };
    let regions = regions
        .as_table()
        .ok_or("regions: must be a table of [regions.<name>] tables")?;
    let mut out = Vec::new();
    for (name, value) in regions {
        let parsed: RegionTable = value
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| format!("regions.{name}: {}", e.message().trim()))?;
        out.push(check_region(name, parsed)?);
    }
    if out.is_empty() {
        return Err("regions: no region defined".into());
    }
    Ok(Some(out))
}

/// An AWS region name as the SDK expects it (`eu-west-1`).
pub fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 32
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}
