//! The plans: what each gives (nodes, instance type, volume, fallbacks) and the Stripe prices
//! that buy it, from the file's `[plans.<name>]` tables or `HIVE_PLANS`.

use std::collections::BTreeMap;
use std::str::FromStr;

/// What a plan gives: how many nodes, of which instance type and root volume size, and the
/// Stripe prices that buy it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub instance_type: String,
    pub nodes: u32,
    pub volume_gb: i32,
    /// Stripe price ids that buy this plan (besides a price whose `lookup_key` or
    /// `metadata.plan` is the plan's name).
    pub prices: Vec<String>,
    /// Instance types to launch instead when no zone of the region has capacity for
    /// `instance_type`, tried in order.
    pub fallback_types: Vec<String>,
}

/// Plans by name: from the `[plans.*]` tables of `HIVE_CONFIG_FILE`, else the shorthand
/// `HIVE_PLANS` (`name=instance_type:count[:volume_gb],...`), else the built-in defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plans(pub BTreeMap<String, Plan>);

pub const DEFAULT_PLANS: &str = "pro=t4g.small:1:10,team=t4g.medium:5:50";

/// A plan's root volume when the shorthand does not say.
const DEFAULT_VOLUME_GB: i32 = 10;

impl Plans {
    /// The types to launch in place of `instance_type` when no zone has capacity for it: the
    /// `fallback_types` of the plan that launches it.
    pub fn fallbacks_for(&self, instance_type: &str) -> &[String] {
        self.0
            .values()
            .find(|p| p.instance_type == instance_type && !p.fallback_types.is_empty())
            .map(|p| p.fallback_types.as_slice())
            .unwrap_or_default()
    }

    /// The plan a Stripe price buys: the one named by its `lookup_key` or `metadata.plan`, or
    /// whose `prices` hold its id.
    pub fn for_price(
        &self,
        price_id: &str,
        lookup_key: Option<&str>,
        metadata_plan: Option<&str>,
    ) -> Option<(&str, &Plan)> {
        [lookup_key, metadata_plan]
            .into_iter()
            .flatten()
            .find_map(|name| self.0.get_key_value(name))
            .or_else(|| {
                self.0
                    .iter()
                    .find(|(_, plan)| plan.prices.iter().any(|p| p == price_id))
            })
            .map(|(name, plan)| (name.as_str(), plan))
    }
}

/// What is wrong with a plan, as `key: problem`.
fn check_plan(name: &str, plan: &Plan) -> Result<(), String> {
    if !valid_instance_type(&plan.instance_type) {
        return Err(format!(
            "plans.{name}.instance_type: `{}` is not a t4g instance type",
            plan.instance_type
        ));
    }
    if plan.nodes == 0 || plan.nodes > 100 {
        return Err(format!("plans.{name}.nodes: must be 1 to 100"));
    }
    if !(1..=16_384).contains(&plan.volume_gb) {
        return Err(format!("plans.{name}.volume_gb: must be 1 to 16384"));
    }
    if let Some(bad) = plan.fallback_types.iter().find(|t| !valid_instance_type(t)) {
        return Err(format!(
            "plans.{name}.fallback_types: `{bad}` is not a t4g instance type"
        ));
    }
    Ok(())
}

impl FromStr for Plans {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut plans = BTreeMap::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let shape = || format!("`{entry}` is not name=instance_type:count[:volume_gb]");
            let (name, rest) = entry.split_once('=').ok_or_else(shape)?;
            let mut parts = rest.split(':');
            let (Some(instance_type), Some(count)) = (parts.next(), parts.next()) else {
                return Err(shape());
            };
            let nodes: u32 = count
                .parse()
                .map_err(|_| format!("plan {name}: node count `{count}` is not a number"))?;
            let volume_gb = match parts.next() {
                None => DEFAULT_VOLUME_GB,
                Some(v) => v
                    .parse()
                    .map_err(|_| format!("plan {name}: volume `{v}` is not a number of GiB"))?,
            };
            let plan = Plan {
                instance_type: instance_type.to_string(),
                nodes,
                volume_gb,
                prices: Vec::new(),
                fallback_types: Vec::new(),
            };
            check_plan(name, &plan).map_err(|e| format!("plan {e}"))?;
            plans.insert(name.to_string(), plan);
        }
        if plans.is_empty() {
            return Err("no plan defined".into());
        }
        Ok(Plans(plans))
    }
}

/// The `[plans.*]` tables of a configuration file; `None` when it has none.
pub(super) fn plans_from_toml(table: &toml::Table) -> Result<Option<Plans>, String> {
    let Some(plans) = table.get("plans") else {
        return Ok(None);
    };
    let plans = plans
        .as_table()
        .ok_or("plans: must be a table of [plans.<name>] tables")?;
    let mut out = BTreeMap::new();
    for (name, value) in plans {
        let t = value
            .as_table()
            .ok_or_else(|| format!("plans.{name}: must be a table"))?;
        for key in t.keys() {
            if ![
                "instance_type",
                "nodes",
                "volume_gb",
                "prices",
                "fallback_types",
            ]
            .contains(&key.as_str())
            {
                return Err(format!("plans.{name}.{key}: unknown key"));
            }
        }
        let instance_type = t
            .get("instance_type")
            .ok_or_else(|| format!("plans.{name}.instance_type: missing"))?
            .as_str()
            .ok_or_else(|| format!("plans.{name}.instance_type: must be a string"))?;
        let int = |key: &str| -> Result<Option<i64>, String> {
            t.get(key)
                .map(|v| {
                    v.as_integer()
                        .ok_or_else(|| format!("plans.{name}.{key}: must be an integer"))
                })
                .transpose()
        };
        let nodes = int("nodes")?.ok_or_else(|| format!("plans.{name}.nodes: missing"))?;
        let volume_gb = int("volume_gb")?.unwrap_or(DEFAULT_VOLUME_GB as i64);
        let strings = |key: &str, what: &str| -> Result<Vec<String>, String> {
            match t.get(key) {
                None => Ok(Vec::new()),
                Some(v) => v
                    .as_array()
                    .and_then(|a| a.iter().map(|p| p.as_str().map(str::to_string)).collect())
                    .ok_or_else(|| format!("plans.{name}.{key}: must be a list of {what}")),
            }
        };
        let plan = Plan {
            instance_type: instance_type.to_string(),
            nodes: u32::try_from(nodes).unwrap_or(0),
            volume_gb: i32::try_from(volume_gb).unwrap_or(0),
            prices: strings("prices", "price ids")?,
            fallback_types: strings("fallback_types", "instance types")?,
        };
        check_plan(name, &plan)?;
        out.insert(name.clone(), plan);
    }
    if out.is_empty() {
        return Err("plans: no plan defined".into());
    }
    Ok(Some(Plans(out)))
}

pub(super) fn default_plans() -> Plans {
    let mut plans = BTreeMap::new();
    for (name, instance_type, nodes, volume_gb) in
        [("pro", "t4g.small", 1, 10), ("team", "t4g.medium", 5, 50)]
    {
        plans.insert(
            name.to_string(),
            Plan {
                instance_type: instance_type.into(),
                nodes,
                volume_gb,
                prices: Vec::new(),
                fallback_types: Vec::new(),
            },
        );
    }
    Plans(plans)
}

/// An instance type of the t4g family (ARM, burstable), such as `t4g.small`.
pub fn valid_instance_type(instance_type: &str) -> bool {
    instance_type
        .strip_prefix("t4g.")
        .is_some_and(|size| !size.is_empty() && size.chars().all(|c| c.is_ascii_alphanumeric()))
}
