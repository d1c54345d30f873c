//! `{ env = "VAR" }`, `{ file = "path" }` or `{ value = "..." }`: where a secret comes from.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;

use super::{invalid, ConfigError};

/// Where a secret comes from. Exactly one of the keys must be given.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSecret {
    env: Option<String>,
    file: Option<PathBuf>,
    value: Option<String>,
}

impl RawSecret {
    pub(super) fn resolve(&self, key: &str, base: &Path) -> Result<SecretString, ConfigError> {
        let value = match (&self.env, &self.file, &self.value) {
            (Some(var), None, None) => std::env::var(var).map_err(|_| {
                invalid(
                    key,
                    format!("environment variable {var} is not set (or not UTF-8)"),
                )
            })?,
            (None, Some(file), None) => {
                let path = if file.is_absolute() {
                    file.clone()
                } else {
                    base.join(file)
                };
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    invalid(
                        key,
                        format!("cannot read secret file {}: {e}", path.display()),
                    )
                })?;
                text.trim_end_matches(['\r', '\n']).to_string()
            }
            (None, None, Some(v)) => v.clone(),
            _ => return Err(invalid(
                key,
                "give exactly one of { env = \"VAR\" }, { file = \"path\" } or { value = \"...\" }",
            )),
        };
        if value.trim().is_empty() {
            return Err(invalid(key, "the secret is empty"));
        }
        Ok(SecretString::from(value))
    }
}
