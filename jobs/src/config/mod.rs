//! All configuration, read from the environment in one place: the file format (`file.rs`, with
//! its `plans.rs` and `regions.rs` sections) apart from each binary's settings (`api.rs`,
//! `worker.rs`), each setting's parse beside its documentation line ([`settings!`]).
//!
//! A missing or malformed setting is a [`ConfigError`] that names the variable, so that a binary
//! can stop at start with one clear line.

mod api;
mod file;
mod plans;
mod regions;
#[cfg(test)]
mod tests;
mod worker;

pub use api::*;
pub use file::*;
pub use plans::*;
pub use regions::*;
pub use worker::*;

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

/// Declares a binary's settings: each field's documentation, then the parse that fills it, in
/// the order they are read (a field may use the fields above it). `let` lines before the
/// fields are read first, for what several fields share.
macro_rules! settings {
    (
        $(#[$meta:meta])*
        pub struct $name:ident from $env:ident {
            $( let $local:ident = $local_parse:expr; )*
            $(
                $(#[$field_meta:meta])*
                pub $field:ident : $ty:ty = $parse:expr
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        pub struct $name {
            $( $(#[$field_meta])* pub $field: $ty, )*
        }

        impl $name {
            pub fn from_env<F: Fn(&str) -> Option<String>>(
                $env: &Env<F>,
            ) -> Result<Self, ConfigError> {
                $( let $local = $local_parse; )*
                $( let $field: $ty = $parse; )*
                Ok(Self { $( $field ),* })
            }
        }
    };
}
use settings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0} is not set")]
    Missing(&'static str),
    #[error("configuration: {name} is malformed: {reason}")]
    Malformed { name: &'static str, reason: String },
}

/// Reads settings through a lookup function, so tests can feed a map instead of the process
/// environment.
pub struct Env<F: Fn(&str) -> Option<String>>(pub F);

pub fn process_env() -> Env<impl Fn(&str) -> Option<String>> {
    Env(|name: &str| std::env::var(name).ok().filter(|v| !v.is_empty()))
}

impl<F: Fn(&str) -> Option<String>> Env<F> {
    pub fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        (self.0)(name).ok_or(ConfigError::Missing(name))
    }

    pub fn optional(&self, name: &'static str) -> Option<String> {
        (self.0)(name)
    }

    pub fn parsed_or<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match (self.0)(name) {
            None => Ok(default),
            Some(raw) => raw
                .trim()
                .parse()
                .map_err(|e: T::Err| ConfigError::Malformed {
                    name,
                    reason: e.to_string(),
                }),
        }
    }

    /// A duration in milliseconds.
    pub fn millis_or(&self, name: &'static str, default_ms: u64) -> Result<Duration, ConfigError> {
        self.parsed_or(name, default_ms).map(Duration::from_millis)
    }

    /// A number that must be at least 1.
    pub fn positive_or<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + From<u8>,
        T::Err: std::fmt::Display,
    {
        let value = self.parsed_or(name, default)?;
        if value < T::from(1) {
            return Err(ConfigError::Malformed {
                name,
                reason: "must be at least 1".into(),
            });
        }
        Ok(value)
    }

    /// A duration in seconds.
    pub fn secs_or(&self, name: &'static str, default_s: u64) -> Result<Duration, ConfigError> {
        self.parsed_or(name, default_s).map(Duration::from_secs)
    }
}

/// How long a teardown step may go on retrying before the operator is shown it as stuck
/// (`HIVE_TEARDOWN_STUCK_SECS`, 900): `hivectl queue`, `hivectl doctor` and the
/// `hive_teardowns_stuck` gauge. A teardown never gives up by itself.
pub fn teardown_stuck_after<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<Duration, ConfigError> {
    env.secs_or("HIVE_TEARDOWN_STUCK_SECS", 900)
}

/// An http(s) base URL setting, ending with `/`.
pub(crate) fn http_base<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    name: &'static str,
    default: &str,
) -> Result<String, ConfigError> {
    let mut base = env.optional(name).unwrap_or_else(|| default.to_string());
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        return Err(ConfigError::Malformed {
            name,
            reason: "not an http(s) URL".into(),
        });
    }
    if !base.ends_with('/') {
        base.push('/');
    }
    Ok(base)
}

/// `HIVE_METRICS_ADDR`: an address to listen on (`127.0.0.1:0` picks a port), if set.
pub(crate) fn metrics_addr_setting<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<Option<SocketAddr>, ConfigError> {
    env.optional("HIVE_METRICS_ADDR")
        .filter(|raw| !raw.trim().is_empty())
        .map(|raw| {
            raw.trim()
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Malformed {
                    name: "HIVE_METRICS_ADDR",
                    reason: e.to_string(),
                })
        })
        .transpose()
}

/// `AWS_REGION`: the one region of the shorthand configuration.
pub(crate) fn aws_region<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<String, ConfigError> {
    let region = env.required("AWS_REGION")?;
    if !valid_region(&region) {
        return Err(ConfigError::Malformed {
            name: "AWS_REGION",
            reason: format!("`{region}` is not a region name"),
        });
    }
    Ok(region)
}

pub(crate) fn domain_setting<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
) -> Result<String, ConfigError> {
    let domain = env
        .required("HIVE_NODE_DOMAIN")?
        .trim_end_matches('.')
        .to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if !domain.contains('.') || !domain.split('.').all(label_ok) {
        return Err(ConfigError::Malformed {
            name: "HIVE_NODE_DOMAIN",
            reason: format!("`{domain}` is not a domain name"),
        });
    }
    Ok(domain)
}

pub(crate) fn prefixed<F: Fn(&str) -> Option<String>>(
    env: &Env<F>,
    name: &'static str,
    prefix: &str,
) -> Result<String, ConfigError> {
    let value = env.required(name)?;
    if !value.starts_with(prefix) {
        return Err(ConfigError::Malformed {
            name,
            reason: format!("does not start with `{prefix}`"),
        });
    }
    Ok(value)
}
