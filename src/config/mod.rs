//! Typed configuration loaded from TOML.
//!
//! Owns: parsing, defaults, validation (every error names the key), and resolving secrets from
//! the environment, a file or an inline value into [`SecretString`]s. It must not perform any
//! network I/O; `check` does that.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use url::Url;

use crate::text::is_loopback_host;

mod alerts;
mod credentials;
mod integration;
mod lms;
mod secret;
mod server;

pub(crate) use alerts::{AlertSettings, EmailAlerts, SmtpTls};
#[cfg(test)]
use credentials::FEDERATED_TOKEN_FILE_ENV;
pub use integration::{
    DeactivationLimit, IntegrationConfig, IntegrationName, DEFAULT_SCHEDULE,
    MAX_SUBSCRIPTION_MINUTES,
};
#[cfg(test)]
use lms::DEFAULT_TARGET_CONCURRENCY;
pub use server::{ServerConfig, TlsSettings, DEFAULT_RECONCILE_CONCURRENCY};

use alerts::RawAlerts;
use integration::RawIntegration;
use server::RawServer;

/// Default SCIM custom extension URN for attributes that have no standard SCIM home.
pub const DEFAULT_CUSTOM_SCHEMA: &str =
    "urn:ietf:params:scim:schemas:extension:rostersync:2.0:User";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    integration: Vec<RawIntegration>,
    alerts: Option<RawAlerts>,
}

/// The whole, validated configuration.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub integrations: Vec<IntegrationConfig>,
    /// `[alerts]` as written (each integration carries its merged copy).
    pub alerts: std::sync::Arc<AlertSettings>,
}

fn parse_http_url(key: &str, s: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(s.trim_end_matches('/'))
        .map_err(|e| invalid(key, format!("{s:?} is not a URL: {e}")))?;
    let loopback = url.host_str().is_some_and(is_loopback_host);
    if url.host_str().is_none() {
        return Err(invalid(key, format!("{s:?} has no host")));
    }
    // Secrets and tokens travel on these connections: cleartext only on loopback.
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err(invalid(
            key,
            format!("{s:?} must be an https:// URL (http:// is accepted only for 127.0.0.1 and localhost)"),
        ));
    }
    Ok(url)
}

/// A TOML error without the offending source line or any quoted value: the line or value may
/// be a secret (`client_secret = "..."` instead of `{ value = "..." }`).
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let mut msg = String::new();
    let mut quoted = false;
    for c in e.message().chars() {
        if c == '"' {
            if !quoted {
                msg.push_str("\"…");
            }
            quoted = !quoted;
            if !quoted {
                msg.push('"');
            }
            continue;
        }
        if !quoted {
            msg.push(c);
        }
    }
    let msg = msg.trim().to_string();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let line_text = text.lines().nth(line - 1).unwrap_or("");
            let key = line_text
                .split_once('=')
                .map(|(k, _)| k.trim())
                .filter(|k| !k.is_empty() && !k.starts_with('['));
            match key {
                Some(k) => format!("line {line} (key `{k}`): {msg}"),
                None => format!("line {line}: {msg}"),
            }
        }
        None => msg,
    }
}

/// A calendar date: a TOML date (2027-03-31) or a string ("2027-03-31").
fn parse_date(v: &toml::Value) -> Result<chrono::NaiveDate, String> {
    let text = match v {
        toml::Value::String(s) => s.trim().to_string(),
        toml::Value::Datetime(d) if d.time.is_none() && d.offset.is_none() => d.to_string(),
        other => {
            return Err(format!(
                "expected a date such as \"2027-03-31\", got {}",
                other.type_str()
            ))
        }
    };
    chrono::NaiveDate::parse_from_str(&text, "%Y-%m-%d")
        .map_err(|_| format!("{text:?} is not a date such as \"2027-03-31\" (year-month-day)"))
}

impl Config {
    /// Reads and validates a config file; relative paths in it resolve against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::from_toml(&text, &base).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses TOML text; `base` is the folder relative paths resolve against. Each section
    /// validates itself (`server`, `integration`, `lms`, `alerts`, `credentials`); every error
    /// names its key.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: describe_toml_error(text, &e),
        })?;
        if raw.integration.is_empty() {
            return Err(invalid(
                "integration",
                "no [[integration]] is configured; add one (see config/example.toml)",
            ));
        }
        let global_alerts = raw.alerts.unwrap_or_default();
        let alerts = std::sync::Arc::new(global_alerts.build("alerts", None, base)?);
        let mut names = BTreeSet::new();
        let mut integrations = Vec::new();
        for (i, ri) in raw.integration.into_iter().enumerate() {
            let name = IntegrationName::parse(&ri.name)
                .map_err(|m| invalid(format!("integration[{i}].name"), m))?;
            if !names.insert(name.clone()) {
                return Err(invalid(
                    format!("integration[{i}] ({name}).name"),
                    "is used by two integrations",
                ));
            }
            integrations.push(ri.build(i, name, base, &alerts, &global_alerts)?);
        }
        Ok(Config {
            server: raw.server.build(base)?,
            integrations,
            alerts,
        })
    }

    /// The integrations selected by `--integration` (all when `None`).
    pub fn select(&self, name: Option<&str>) -> Result<Vec<&IntegrationConfig>, ConfigError> {
        match name {
            None => Ok(self.integrations.iter().collect()),
            Some(n) => {
                let found: Vec<_> = self
                    .integrations
                    .iter()
                    .filter(|i| i.name.as_str() == n)
                    .collect();
                if found.is_empty() {
                    let known: Vec<_> = self.integrations.iter().map(|i| i.name.as_str()).collect();
                    return Err(invalid(
                        "--integration",
                        format!(
                            "no integration named {n:?} (configured: {})",
                            known.join(", ")
                        ),
                    ));
                }
                Ok(found)
            }
        }
    }
}

#[cfg(test)]
mod tests;
