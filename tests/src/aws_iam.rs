//! IAM as a contract: the worker's policy document from `terraform/`, evaluated for every
//! request the worker sends past the AWS proxy, so that a call the policy does not allow fails
//! in the tests as it would in a real account (moto does not enforce IAM by default).
//!
//! The evaluation follows IAM's rules for what the document uses: an explicit `Deny` wins;
//! otherwise some `Allow` must match the action, the resource and every condition
//! (`StringEquals`, `StringLike`; a condition on a key the request does not have fails).
//! Each request is authorized as AWS authorizes it: `RunInstances` once per resource it
//! touches (image, subnet, security groups, instance, volume, network interface), plus
//! `ec2:CreateTags` for the resources it tags (`ec2:CreateAction` = `RunInstances`) and
//! `iam:PassRole` for the instance profile's role.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// The template terraform reads for the worker's role policy.
pub fn worker_policy_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../terraform/modules/services/worker-policy.json.tftpl")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Effect {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operator {
    StringEquals,
    StringLike,
}

#[derive(Debug, Clone)]
struct Condition {
    operator: Operator,
    key: String,
    values: Vec<String>,
}

#[derive(Debug, Clone)]
struct Statement {
    sid: String,
    effect: Effect,
    actions: Vec<String>,
    resources: Vec<String>,
    conditions: Vec<Condition>,
}

/// A policy document, parsed.
#[derive(Debug, Clone)]
pub struct Policy {
    statements: Vec<Statement>,
}

/// One authorization a request needs: an action on a resource, with the request's context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorization {
    pub action: String,
    pub resource: String,
    /// Condition keys (`aws:RequestTag/hive:node-id`, `ec2:CreateAction`, ...) and values.
    pub context: BTreeMap<String, Vec<String>>,
}

impl Authorization {
    pub fn new(action: impl Into<String>, resource: impl Into<String>) -> Self {
        Self {
            action: action.into(),
            resource: resource.into(),
            context: BTreeMap::new(),
        }
    }

    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.context
            .entry(key.into())
            .or_default()
            .push(value.into());
        self
    }
}

fn strings(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => Vec::new(),
    }
}

impl Policy {
    /// The document at `path` with each `${name}` replaced by its value (the template's
    /// variables, exactly as terraform's `templatefile` fills them).
    pub fn load(path: &Path, vars: &[(&str, String)]) -> anyhow::Result<Policy> {
        let mut text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the policy {}", path.display()))?;
        for (name, value) in vars {
            text = text.replace(&format!("${{{name}}}"), value);
        }
        if let Some(at) = text.find("${") {
            anyhow::bail!(
                "the policy {} has a variable the tests do not fill: {}",
                path.display(),
                &text[at..text.len().min(at + 40)]
            );
        }
        Policy::parse(&text)
    }

    pub fn parse(text: &str) -> anyhow::Result<Policy> {
        let doc: Value = serde_json::from_str(text).context("the policy is not JSON")?;
        let raw = match &doc["Statement"] {
            Value::Array(items) => items.clone(),
            single @ Value::Object(_) => vec![single.clone()],
            _ => anyhow::bail!("the policy has no Statement"),
        };
        let mut statements = Vec::new();
        for s in raw {
            let effect = match s["Effect"].as_str() {
                Some("Allow") => Effect::Allow,
                Some("Deny") => Effect::Deny,
                other => anyhow::bail!("statement effect {other:?}"),
            };
            anyhow::ensure!(
                s.get("NotAction").is_none() && s.get("NotResource").is_none(),
                "NotAction and NotResource are not evaluated here"
            );
            let mut conditions = Vec::new();
            if let Some(Value::Object(ops)) = s.get("Condition") {
                for (op, keys) in ops {
                    let operator = match op.as_str() {
                        "StringEquals" => Operator::StringEquals,
                        "StringLike" => Operator::StringLike,
                        other => anyhow::bail!("condition operator {other} is not evaluated here"),
                    };
                    let Value::Object(keys) = keys else {
                        anyhow::bail!("condition {op} is not an object");
                    };
                    for (key, values) in keys {
                        conditions.push(Condition {
                            operator,
                            key: key.clone(),
                            values: strings(Some(values)),
                        });
                    }
                }
            }
            statements.push(Statement {
                sid: s["Sid"].as_str().unwrap_or_default().to_string(),
                effect,
                actions: strings(s.get("Action")),
                resources: strings(s.get("Resource")),
                conditions,
            });
        }
        Ok(Policy { statements })
    }

    /// Whether the policy allows `request`; `Err` names the statement that denies it, or says
    /// that none allows it.
    pub fn authorize(&self, request: &Authorization) -> Result<(), String> {
        let matching = |effect: Effect| {
            self.statements.iter().find(|s| {
                s.effect == effect
                    && s.actions.iter().any(|a| {
                        glob(
                            &a.to_ascii_lowercase(),
                            &request.action.to_ascii_lowercase(),
                        )
                    })
                    && s.resources.iter().any(|r| glob(r, &request.resource))
                    && s.conditions.iter().all(|c| holds(c, &request.context))
            })
        };
        if let Some(deny) = matching(Effect::Deny) {
            return Err(format!("explicitly denied by {}", deny.sid));
        }
        match matching(Effect::Allow) {
            Some(_) => Ok(()),
            None => Err("no statement allows it".into()),
        }
    }

    /// The same document without `action` anywhere (a test proves the contract is enforced).
    pub fn without_action(&self, action: &str) -> Policy {
        let mut statements = self.statements.clone();
        for s in &mut statements {
            s.actions.retain(|a| !a.eq_ignore_ascii_case(action));
        }
        statements.retain(|s| !s.actions.is_empty());
        Policy { statements }
    }
}

fn holds(condition: &Condition, context: &BTreeMap<String, Vec<String>>) -> bool {
    // Keys are case-insensitive in IAM.
    let Some(values) = context
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(&condition.key))
        .map(|(_, v)| v)
    else {
        return false;
    };
    values.iter().any(|v| {
        condition
            .values
            .iter()
            .any(|want| match condition.operator {
                Operator::StringEquals => want == v,
                Operator::StringLike => glob(want, v),
            })
    })
}

/// IAM's wildcard match: `*` any run of characters, `?` any one.
pub fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// Where a request comes from and goes: what the authorizations need to name resources.
pub struct Caller<'a> {
    pub region: &'a str,
    pub account: &'a str,
}

/// The tags a resource carries now (looked up in moto when a condition may need them).
pub type Tags = HashMap<String, String>;

/// The authorizations of an EC2 request (form fields), given the tags of the resources it
/// names (`resource_tags`, by id).
pub fn ec2_authorizations(
    caller: &Caller<'_>,
    operation: &str,
    form: &BTreeMap<String, String>,
    resource_tags: &HashMap<String, Tags>,
) -> Vec<Authorization> {
    let action = format!("ec2:{operation}");
    let arn = |kind: &str, id: &str| {
        format!(
            "arn:aws:ec2:{}:{}:{kind}/{id}",
            caller.region, caller.account
        )
    };
    let with_resource_tags = |mut a: Authorization, id: &str| {
        if let Some(tags) = resource_tags.get(id) {
            for (k, v) in tags {
                a = a.with(format!("aws:ResourceTag/{k}"), v.clone());
            }
        }
        a
    };
    let kind_of = |id: &str| match id.split('-').next() {
        Some("i") => "instance",
        Some("vol") => "volume",
        Some("eni") => "network-interface",
        Some("sg") => "security-group",
        Some("subnet") => "subnet",
        _ => "resource",
    };
    if operation.starts_with("Describe") {
        return vec![Authorization::new(action, "*")];
    }
    match operation {
        "RunInstances" => run_instances(caller, form, &arn),
        "CreateTags" => {
            let tags = form_tags(form, "Tag.");
            form.iter()
                .filter(|(k, _)| k.starts_with("ResourceId."))
                .map(|(_, id)| {
                    let mut a = with_resource_tags(
                        Authorization::new(action.clone(), arn(kind_of(id), id)),
                        id,
                    );
                    for (k, v) in &tags {
                        a = a.with(format!("aws:RequestTag/{k}"), v.clone());
                        a = a.with("aws:TagKeys", k.clone());
                    }
                    a
                })
                .collect()
        }
        _ => {
            // Actions on named instances or volumes.
            let ids: Vec<&String> = form
                .iter()
                .filter(|(k, _)| {
                    *k == "InstanceId" || k.starts_with("InstanceId.") || *k == "VolumeId"
                })
                .map(|(_, v)| v)
                .collect();
            if ids.is_empty() {
                return vec![Authorization::new(action, "*")];
            }
            ids.into_iter()
                .map(|id| {
                    with_resource_tags(Authorization::new(action.clone(), arn(kind_of(id), id)), id)
                })
                .collect()
        }
    }
}

/// Tags in form fields `<prefix>N.Key` / `<prefix>N.Value`.
fn form_tags(form: &BTreeMap<String, String>, prefix: &str) -> Vec<(String, String)> {
    let mut tags = Vec::new();
    for (k, key) in form {
        if let Some(n) = k.strip_prefix(prefix).and_then(|r| r.strip_suffix(".Key")) {
            let value = form
                .get(&format!("{prefix}{n}.Value"))
                .cloned()
                .unwrap_or_default();
            tags.push((key.clone(), value));
        }
    }
    tags
}

fn run_instances(
    caller: &Caller<'_>,
    form: &BTreeMap<String, String>,
    arn: &dyn Fn(&str, &str) -> String,
) -> Vec<Authorization> {
    let action = "ec2:RunInstances";
    let mut out = Vec::new();
    if let Some(image) = form.get("ImageId").filter(|i| i.starts_with("ami-")) {
        out.push(Authorization::new(
            action,
            format!("arn:aws:ec2:{}::image/{image}", caller.region),
        ));
    }
    for (k, v) in form {
        if k == "SubnetId" || k.ends_with(".SubnetId") {
            out.push(Authorization::new(action, arn("subnet", v)));
        }
        if k.starts_with("SecurityGroupId.") || k.contains(".SecurityGroupId.") {
            out.push(Authorization::new(action, arn("security-group", v)));
        }
    }
    // The tags of each tag specification, by the resource type it names.
    let mut tags_by_type: HashMap<String, Vec<(String, String)>> = HashMap::new();
    for (k, resource_type) in form {
        if let Some(n) = k
            .strip_prefix("TagSpecification.")
            .and_then(|r| r.strip_suffix(".ResourceType"))
        {
            tags_by_type
                .entry(resource_type.clone())
                .or_default()
                .extend(form_tags(form, &format!("TagSpecification.{n}.Tag.")));
        }
    }
    for kind in ["instance", "volume", "network-interface"] {
        let mut a = Authorization::new(action, arn(kind, "*"));
        for (k, v) in tags_by_type.get(kind).into_iter().flatten() {
            a = a.with(format!("aws:RequestTag/{k}"), v.clone());
            a = a.with("aws:TagKeys", k.clone());
        }
        out.push(a);
    }
    // Tagging on create is authorized as CreateTags of each tagged resource.
    for (kind, tags) in &tags_by_type {
        let mut a = Authorization::new("ec2:CreateTags", arn(kind, "*"))
            .with("ec2:CreateAction", "RunInstances");
        for (k, v) in tags {
            a = a.with(format!("aws:RequestTag/{k}"), v.clone());
            a = a.with("aws:TagKeys", k.clone());
        }
        out.push(a);
    }
    // The instance profile hands the instance a role: passing it needs iam:PassRole.
    if let Some(profile) = form.get("IamInstanceProfile.Name").cloned().or_else(|| {
        form.get("IamInstanceProfile.Arn")
            .and_then(|a| a.rsplit('/').next().map(str::to_string))
    }) {
        // The tests' profiles hold a role of the same name (aws_fixture).
        out.push(Authorization::new(
            "iam:PassRole",
            format!("arn:aws:iam::{}:role/{profile}", caller.account),
        ));
    }
    out
}

/// The authorization of a Secrets Manager request (its JSON body).
pub fn secrets_authorizations(
    caller: &Caller<'_>,
    operation: &str,
    body: &[u8],
) -> Vec<Authorization> {
    let action = format!("secretsmanager:{operation}");
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let named = body["SecretId"]
        .as_str()
        .or_else(|| body["Name"].as_str())
        .map(str::to_string);
    let resource = match named {
        None => "*".to_string(),
        Some(arn) if arn.starts_with("arn:") => arn,
        // A secret's ARN ends in a dash and six random characters.
        Some(name) => format!(
            "arn:aws:secretsmanager:{}:{}:secret:{name}-AbCdEf",
            caller.region, caller.account
        ),
    };
    vec![Authorization::new(action, resource)]
}

/// The authorization of a Route 53 request (its operation and path).
pub fn route53_authorizations(operation: &str, path: &str) -> Vec<Authorization> {
    let action = format!("route53:{operation}");
    let after = |marker: &str| {
        path.split_once(marker)
            .map(|(_, rest)| rest.split('/').next().unwrap_or_default().to_string())
    };
    let resource = if let Some(zone) = after("/hostedzone/") {
        format!("arn:aws:route53:::hostedzone/{zone}")
    } else if let Some(change) = after("/change/") {
        format!("arn:aws:route53:::change/{change}")
    } else {
        "*".to_string()
    };
    vec![Authorization::new(action, resource)]
}

/// The region a signed request names in its credential scope
/// (`Credential=AKID/20261207/eu-west-1/ec2/aws4_request`).
pub fn signed_region(authorization: &str) -> Option<&str> {
    let scope = authorization.split("Credential=").nth(1)?;
    scope.split('/').nth(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"{"Version":"2012-10-17","Statement":[
      {"Sid":"Describe","Effect":"Allow","Action":["ec2:Describe*"],"Resource":"*"},
      {"Sid":"Launch","Effect":"Allow","Action":"ec2:RunInstances","Resource":["arn:aws:ec2:*:1:instance/*"],
       "Condition":{"StringLike":{"aws:RequestTag/hive:node-id":"*"}}},
      {"Sid":"Manage","Effect":"Allow","Action":["ec2:StopInstances"],"Resource":"arn:aws:ec2:*:1:instance/*",
       "Condition":{"StringLike":{"aws:ResourceTag/hive:node-id":"*"}}},
      {"Sid":"AtLaunch","Effect":"Allow","Action":"ec2:CreateTags","Resource":"arn:aws:ec2:*:1:*/*",
       "Condition":{"StringEquals":{"ec2:CreateAction":"RunInstances"}}},
      {"Sid":"NoDeletes","Effect":"Deny","Action":"ec2:StopInstances","Resource":"arn:aws:ec2:*:1:instance/i-deny"}
    ]}"#;

    #[test]
    fn actions_resources_and_conditions_are_evaluated_as_iam_does() {
        let p = Policy::parse(DOC).unwrap();
        assert!(p
            .authorize(&Authorization::new("ec2:DescribeVolumes", "*"))
            .is_ok());
        assert!(p
            .authorize(&Authorization::new("ec2:ModifyVolume", "*"))
            .is_err());
        let launch = Authorization::new("ec2:RunInstances", "arn:aws:ec2:eu-west-1:1:instance/*");
        assert!(p.authorize(&launch).is_err(), "no request tag");
        assert!(p
            .authorize(&launch.clone().with("aws:RequestTag/hive:node-id", "n"))
            .is_ok());
        let stop = Authorization::new("ec2:StopInstances", "arn:aws:ec2:eu-west-1:1:instance/i-1");
        assert!(p.authorize(&stop).is_err(), "untagged instance");
        assert!(p
            .authorize(&stop.with("aws:ResourceTag/hive:node-id", "n"))
            .is_ok());
        let denied = Authorization::new(
            "ec2:StopInstances",
            "arn:aws:ec2:eu-west-1:1:instance/i-deny",
        )
        .with("aws:ResourceTag/hive:node-id", "n");
        assert!(p.authorize(&denied).unwrap_err().contains("NoDeletes"));
        let tag = Authorization::new("ec2:CreateTags", "arn:aws:ec2:eu-west-1:1:instance/i-1");
        assert!(p.authorize(&tag).is_err(), "tagging after launch");
        assert!(p
            .authorize(&tag.with("ec2:CreateAction", "RunInstances"))
            .is_ok());
        assert!(p
            .without_action("ec2:Describe*")
            .authorize(&Authorization::new("ec2:DescribeVolumes", "*"))
            .is_err());
    }

    #[test]
    fn globs_match_as_iam_matches() {
        assert!(glob(
            "arn:aws:ec2:*:1:instance/*",
            "arn:aws:ec2:eu-west-1:1:instance/i-1"
        ));
        assert!(!glob(
            "arn:aws:ec2:*:1:instance/*",
            "arn:aws:ec2:eu-west-1:1:volume/v-1"
        ));
        assert!(glob("hive/nodes/*", "hive/nodes/x/tunnel-token"));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "ac"));
        assert_eq!(
            signed_region("AWS4-HMAC-SHA256 Credential=testing/20261207/eu-west-1/ec2/aws4_request, SignedHeaders=host"),
            Some("eu-west-1")
        );
    }

    #[test]
    fn a_launch_needs_every_resource_it_touches() {
        let form: BTreeMap<String, String> = [
            ("Action", "RunInstances"),
            ("ImageId", "ami-1"),
            ("NetworkInterface.1.SubnetId", "subnet-1"),
            ("NetworkInterface.1.SecurityGroupId.1", "sg-1"),
            ("IamInstanceProfile.Name", "hive-node"),
            ("TagSpecification.1.ResourceType", "instance"),
            ("TagSpecification.1.Tag.1.Key", "hive:node-id"),
            ("TagSpecification.1.Tag.1.Value", "n"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let caller = Caller {
            region: "eu-west-1",
            account: "1",
        };
        let auths = ec2_authorizations(&caller, "RunInstances", &form, &HashMap::new());
        let names: Vec<String> = auths
            .iter()
            .map(|a| format!("{} {}", a.action, a.resource))
            .collect();
        for want in [
            "ec2:RunInstances arn:aws:ec2:eu-west-1::image/ami-1",
            "ec2:RunInstances arn:aws:ec2:eu-west-1:1:subnet/subnet-1",
            "ec2:RunInstances arn:aws:ec2:eu-west-1:1:security-group/sg-1",
            "ec2:RunInstances arn:aws:ec2:eu-west-1:1:instance/*",
            "ec2:RunInstances arn:aws:ec2:eu-west-1:1:volume/*",
            "ec2:CreateTags arn:aws:ec2:eu-west-1:1:instance/*",
            "iam:PassRole arn:aws:iam::1:role/hive-node",
        ] {
            assert!(
                names.contains(&want.to_string()),
                "{want} missing from {names:#?}"
            );
        }
        let instance = auths
            .iter()
            .find(|a| a.resource.ends_with("instance/*") && a.action == "ec2:RunInstances")
            .unwrap();
        assert_eq!(
            instance.context.get("aws:RequestTag/hive:node-id"),
            Some(&vec!["n".to_string()])
        );
    }
}
