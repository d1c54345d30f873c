//! `[integration.target]`: the LMS's SCIM endpoint, its token, limits and dialect.

use std::collections::BTreeSet;
use std::path::Path;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use super::secret::RawSecret;
use super::{invalid, parse_http_url, ConfigError, DEFAULT_CUSTOM_SCHEMA};
use crate::lms::dialect::DialectSettings;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    kind: String,
    url: String,
    token: RawSecret,
    concurrency: Option<usize>,
    throttle_wait_secs: Option<u64>,
    timeout_secs: Option<u64>,
    custom_schema: Option<String>,
    dialect: Option<RawDialect>,
    bulk: Option<bool>,
}

/// `[integration.target] dialect = { … }`: pins what the LMS's SCIM server accepts (README,
/// "The LMS's SCIM dialect"). Every key is optional; a pinned key is never changed by what the
/// server answers.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawDialect {
    patch_ops: Option<Vec<String>>,
    put: Option<bool>,
    value_paths: Option<bool>,
    replace_adds: Option<bool>,
    clear: Option<String>,
    filter: Option<Vec<String>>,
    user_name_unique: Option<String>,
    email_type: Option<bool>,
    enterprise: Option<bool>,
    custom: Option<bool>,
    no_patch: Option<Vec<String>>,
    not_writable: Option<Vec<String>>,
    no_clear: Option<Vec<String>>,
    clear_by_put: Option<Vec<String>>,
    not_kept: Option<Vec<String>>,
}

impl RawDialect {
    fn resolve(self, k: &dyn Fn(&str) -> String) -> Result<DialectSettings, ConfigError> {
        use crate::lms::dialect::{CaseRule, Clear, FilterAttr, PatchOp};
        let mut out = DialectSettings {
            put: self.put,
            value_paths: self.value_paths,
            replace_adds: self.replace_adds,
            email_type: self.email_type,
            enterprise: self.enterprise,
            custom: self.custom,
            ..Default::default()
        };
        if let Some(ops) = self.patch_ops {
            let mut set = BTreeSet::new();
            for o in ops {
                set.insert(PatchOp::parse(&o).ok_or_else(|| {
                    invalid(
                        k("target.dialect.patch_ops"),
                        format!("{o:?} is not a PATCH op; use \"add\", \"replace\" and/or \"remove\" ([] = no PATCH: every change is GET + PUT)"),
                    )
                })?);
            }
            out.patch_ops = Some(set);
        }
        if let Some(c) = self.clear {
            out.clear = Some(Clear::parse(&c).ok_or_else(|| {
                invalid(
                    k("target.dialect.clear"),
                    format!(
                        "{c:?} is not supported; use \"remove\", \"null\", \"empty\" or \"none\""
                    ),
                )
            })?);
        }
        if let Some(f) = self.filter {
            let mut set = BTreeSet::new();
            for a in f {
                set.insert(FilterAttr::parse(&a).ok_or_else(|| {
                    invalid(
                        k("target.dialect.filter"),
                        format!("{a:?} is not supported; use \"userName\" and/or \"externalId\" ([] = no filter: list and match)"),
                    )
                })?);
            }
            out.filter = Some(set);
        }
        if let Some(u) = self.user_name_unique {
            out.user_name_unique = Some(CaseRule::parse(&u).ok_or_else(|| {
                invalid(
                    k("target.dialect.user_name_unique"),
                    format!(
                        "{u:?} is not supported; use \"case-insensitive\" or \"case-sensitive\""
                    ),
                )
            })?);
        }
        for (name, list, dest) in [
            ("no_patch", self.no_patch, &mut out.no_patch),
            ("not_writable", self.not_writable, &mut out.not_writable),
            ("no_clear", self.no_clear, &mut out.no_clear),
            ("clear_by_put", self.clear_by_put, &mut out.clear_by_put),
            ("not_kept", self.not_kept, &mut out.not_kept),
        ] {
            for key in list.unwrap_or_default() {
                let ok = !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                if !ok {
                    return Err(invalid(
                        k(&format!("target.dialect.{name}")),
                        format!("{key:?} is not a record key such as \"displayName\", \"emails.work\" or \"enterprise.manager\""),
                    ));
                }
                dest.insert(key);
            }
        }
        Ok(out)
    }
}

/// Default ceiling of concurrent LMS requests (`target.concurrency`).
pub(crate) const DEFAULT_TARGET_CONCURRENCY: usize = 32;

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub url: Url,
    pub token: SecretString,
    /// Ceiling of concurrent LMS requests; below it the pacer adapts to the LMS.
    pub concurrency: usize,
    /// How long one write may go on waiting out the LMS's throttling before its user is
    /// deferred to the next run.
    pub throttle_wait_secs: u64,
    pub timeout_secs: u64,
    pub custom_schema: String,
    /// What the LMS's SCIM server takes, pinned in config (empty = learn it).
    pub dialect: DialectSettings,
    /// Whether writes may go in SCIM bulk requests when the LMS advertises bulk (default
    /// true; false: one request per user always).
    pub bulk: bool,
}

impl RawTarget {
    /// Validates `[integration.target]`; `k` names a key of this integration.
    pub(super) fn build(
        self,
        k: &dyn Fn(&str) -> String,
        base: &Path,
    ) -> Result<TargetConfig, ConfigError> {
        let t = self;
        if t.kind != "scim" {
            return Err(invalid(
                k("target.kind"),
                format!(
                    "{:?} is not supported; the only target kind is \"scim\"",
                    t.kind
                ),
            ));
        }
        let url = parse_http_url(&k("target.url"), &t.url)?;
        let token = t.token.resolve(&k("target.token"), base)?;
        // A ceiling: the pacer finds the LMS's own limit below it (`lms::pace`).
        let concurrency = t.concurrency.unwrap_or(DEFAULT_TARGET_CONCURRENCY);
        if !(1..=256).contains(&concurrency) {
            return Err(invalid(
                k("target.concurrency"),
                "must be between 1 and 256",
            ));
        }
        let throttle_wait_secs = t.throttle_wait_secs.unwrap_or(600);
        if !(1..=86_400).contains(&throttle_wait_secs) {
            return Err(invalid(
                k("target.throttle_wait_secs"),
                "must be between 1 and 86400",
            ));
        }
        let timeout_secs = t.timeout_secs.unwrap_or(30);
        if !(1..=600).contains(&timeout_secs) {
            return Err(invalid(
                k("target.timeout_secs"),
                "must be between 1 and 600",
            ));
        }
        let custom_schema = t
            .custom_schema
            .unwrap_or_else(|| DEFAULT_CUSTOM_SCHEMA.to_string());
        if !custom_schema.starts_with("urn:") || custom_schema.ends_with(':') {
            return Err(invalid(
                k("target.custom_schema"),
                format!("{custom_schema:?} is not a schema URN such as {DEFAULT_CUSTOM_SCHEMA}"),
            ));
        }
        let dialect = t.dialect.unwrap_or_default().resolve(&k)?;
        Ok(TargetConfig {
            url,
            token,
            concurrency,
            throttle_wait_secs,
            timeout_secs,
            custom_schema,
            dialect,
            bulk: t.bulk.unwrap_or(true),
        })
    }
}
