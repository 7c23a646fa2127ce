//! `HIVE_CONFIG_FILE`: the TOML file every binary reads, its sections checked as one.

use super::plans::{default_plans, plans_from_toml};
use super::regions::regions_from_toml;
use super::{aws_region, prefixed, ConfigError, Env, Image, Plans, RegionSettings};

/// The configuration file named by `HIVE_CONFIG_FILE`, read by every binary.
#[derive(Debug, Clone, Default)]
pub struct ConfigFile {
    pub plans: Option<Plans>,
    pub regions: Option<Vec<RegionSettings>>,
}

impl ConfigFile {
    /// Reads and checks `HIVE_CONFIG_FILE`, if set. A file that cannot be read or is malformed
    /// is one error naming the file, the key and what is wrong.
    pub fn from_env<F: Fn(&str) -> Option<String>>(env: &Env<F>) -> Result<Self, ConfigError> {
        let Some(path) = env.optional("HIVE_CONFIG_FILE") else {
            return Ok(ConfigFile::default());
        };
        let malformed = |reason: String| ConfigError::Malformed {
            name: "HIVE_CONFIG_FILE",
            reason: format!("{path}: {reason}"),
        };
        let text = std::fs::read_to_string(&path).map_err(|e| malformed(e.to_string()))?;
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1))
                .unwrap_or(1);
            let message: Vec<&str> = e.message().lines().map(str::trim).collect();
            malformed(format!("line {line}: {}", message.join("; ")))
        })?;
        Ok(ConfigFile {
            plans: plans_from_toml(&table).map_err(&malformed)?,
            regions: regions_from_toml(&table).map_err(&malformed)?,
        })
    }

    /// The regions nodes may live in, by name: the file's, else the one-region shorthand.
    pub fn region_names<F: Fn(&str) -> Option<String>>(
        &self,
        env: &Env<F>,
    ) -> Result<Vec<String>, ConfigError> {
        match &self.regions {
            Some(regions) => Ok(regions.iter().map(|r| r.name.clone()).collect()),
            None => Ok(vec![aws_region(env)?]),
        }
    }

    /// The regions with their launch settings: the file's, else the one-region shorthand.
    pub fn region_settings<F: Fn(&str) -> Option<String>>(
        &self,
        env: &Env<F>,
    ) -> Result<Vec<RegionSettings>, ConfigError> {
        if let Some(regions) = &self.regions {
            return Ok(regions.clone());
        }
        Ok(vec![RegionSettings {
            name: aws_region(env)?,
            image: Image::Ami(prefixed(env, "HIVE_AMI_ID", "ami-")?),
            subnets: env
                .required("HIVE_SUBNET_ID")?
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .map(|s| {
                    if s.starts_with("subnet-") {
                        Ok(s)
                    } else {
                        Err(ConfigError::Malformed {
                            name: "HIVE_SUBNET_ID",
                            reason: format!("`{s}` does not start with `subnet-`"),
                        })
                    }
                })
                .collect::<Result<Vec<_>, _>>()
                .and_then(|subnets| {
                    if subnets.is_empty() {
                        Err(ConfigError::Missing("HIVE_SUBNET_ID"))
                    } else {
                        Ok(subnets)
                    }
                })?,
            security_group: prefixed(env, "HIVE_SECURITY_GROUP_ID", "sg-")?,
            instance_profile: env.required("HIVE_INSTANCE_PROFILE")?,
        }])
    }

    /// The plans: the file's, else `HIVE_PLANS`, else the defaults.
    pub fn plans<F: Fn(&str) -> Option<String>>(&self, env: &Env<F>) -> Result<Plans, ConfigError> {
        match &self.plans {
            Some(plans) => Ok(plans.clone()),
            None => env.parsed_or("HIVE_PLANS", default_plans()),
        }
    }
}
