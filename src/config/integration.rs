//! `[[integration]]`: one tenant, its groups, its LMS and how users are written there.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use super::alerts::{AlertSettings, RawAlerts};
use super::credentials::{resolve_credential, RawCredential, FEDERATED_TOKEN_FILE_ENV};
use super::lms::{RawTarget, TargetConfig};
use super::secret::RawSecret;
use super::{invalid, parse_date, parse_http_url, ConfigError};
use crate::graph::credential::ClientCredential;
use crate::mapping::{Mapping, MappingError, UsernameSource};
/// Defined with the domain's vocabulary (`model`), where the store reads it too.
pub use crate::model::IntegrationName;
use crate::redact::Redactor;
use crate::text::is_guid;

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIntegration {
    pub(super) name: String,
    tenant_id: String,
    client_id: String,
    /// Required with `credential = "secret"` (the default) only.
    pub(super) client_secret: Option<RawSecret>,
    /// "secret" (default), "certificate" or "workload_identity".
    pub(super) credential: Option<String>,
    pub(super) certificate: Option<PathBuf>,
    pub(super) certificate_key: Option<RawSecret>,
    pub(super) certificate_alg: Option<String>,
    pub(super) federated_token_file: Option<PathBuf>,
    groups: Vec<String>,
    #[serde(default = "default_username")]
    username: String,
    login_url: Option<String>,
    graph_url: Option<String>,
    #[serde(default = "default_max_deactivations")]
    max_deactivations: toml::Value,
    /// The window `max_deactivations` holds over, e.g. "24h".
    guard_window: Option<String>,
    /// How often a reconcile reads every member's manager instead of tracking them, e.g. "7d".
    verify_managers_every: Option<String>,
    #[serde(default = "yes")]
    link_existing: bool,
    #[serde(default)]
    graph_concurrency: Option<usize>,
    target: RawTarget,
    #[serde(default)]
    mapping: Option<toml::Table>,
    schedule: Option<String>,
    timezone: Option<String>,
    subscription_minutes: Option<u32>,
    renew_before_minutes: Option<u32>,
    client_state: Option<RawSecret>,
    client_secret_expires: Option<toml::Value>,
    alerts: Option<RawAlerts>,
}

impl RawIntegration {
    /// The keys `credentials` reads.
    pub(super) fn credential_keys(&self) -> RawCredential<'_> {
        RawCredential {
            credential: self.credential.as_deref(),
            client_secret: self.client_secret.as_ref(),
            certificate: self.certificate.as_deref(),
            certificate_key: self.certificate_key.as_ref(),
            certificate_alg: self.certificate_alg.as_deref(),
            federated_token_file: self.federated_token_file.as_deref(),
        }
    }
}

fn default_username() -> String {
    "userPrincipalName".into()
}
fn default_max_deactivations() -> toml::Value {
    toml::Value::String("10%".into())
}
fn yes() -> bool {
    true
}

/// The longest subscription lifetime Graph grants for users and groups (under 29 days).
pub const MAX_SUBSCRIPTION_MINUTES: u32 = 41_760;

/// Default full-reconcile schedule (seconds minutes hours day-of-month month day-of-week).
pub const DEFAULT_SCHEDULE: &str = "0 0 7,12,17 * * Mon-Fri";

/// How many deactivations one run may apply before the guard stops it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeactivationLimit {
    Count(u64),
    /// Percent of the users currently active in the index (0–100).
    Percent(f64),
}

impl DeactivationLimit {
    pub(crate) fn parse(v: &toml::Value) -> Result<Self, String> {
        match v {
            toml::Value::Integer(n) if *n >= 0 => Ok(Self::Count(*n as u64)),
            toml::Value::String(s) => {
                let s = s.trim();
                if let Some(p) = s.strip_suffix('%') {
                    let p: f64 = p
                        .trim()
                        .parse()
                        .map_err(|_| format!("{s:?} is not a percentage such as \"10%\""))?;
                    if !(0.0..=100.0).contains(&p) {
                        return Err(format!("{s:?} must be between 0% and 100%"));
                    }
                    Ok(Self::Percent(p))
                } else {
                    s.parse::<u64>().map(Self::Count).map_err(|_| {
                        format!(
                            "{s:?} is neither a count (e.g. 25) nor a percentage (e.g. \"10%\")"
                        )
                    })
                }
            }
            other => Err(format!(
                "expected a count (e.g. 25) or a percentage (e.g. \"10%\"), got {other}"
            )),
        }
    }

    /// The largest number of deactivations allowed when `active` users are in the index.
    pub(crate) fn allowed(&self, active: u64) -> u64 {
        match *self {
            Self::Count(n) => n,
            // At least one, so a small tenant's single leaver does not trip the guard.
            Self::Percent(p) if p > 0.0 && active > 0 => {
                (((active as f64) * p / 100.0).floor() as u64).max(1)
            }
            Self::Percent(_) => 0,
        }
    }
}

impl fmt::Display for DeactivationLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Count(n) => write!(f, "{n}"),
            Self::Percent(p) => write!(f, "{p}%"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct IntegrationConfig {
    pub name: IntegrationName,
    pub tenant_id: String,
    pub client_id: String,
    /// Client secret, certificate or workload identity (key material resolved and redacted).
    pub credential: ClientCredential,
    pub groups: Vec<String>,
    pub username: UsernameSource,
    pub login_url: Url,
    pub graph_url: Url,
    pub max_deactivations: DeactivationLimit,
    /// The rolling window over which `max_deactivations` holds, shared by every path.
    pub guard_window: chrono::Duration,
    /// How often a reconcile reads every member's manager (`sync::managers`).
    pub verify_managers_every: chrono::Duration,
    pub link_existing: bool,
    /// Concurrent Graph requests (manager batches) during a reconcile.
    pub graph_concurrency: usize,
    pub target: TargetConfig,
    pub mapping: Mapping,
    /// Cron expression of the scheduled full reconcile (as written, validated).
    pub schedule: String,
    pub timezone: chrono_tz::Tz,
    /// Lifetime asked for when creating or renewing a subscription.
    pub subscription_minutes: u32,
    /// How long before expiry a subscription is renewed.
    pub renew_before_minutes: u32,
    /// Configured clientState; when absent a random one is generated once and kept in the store.
    pub client_state: Option<SecretString>,
    /// When the client secret expires (alerts warn ahead of it).
    pub client_secret_expires: Option<chrono::NaiveDate>,
    /// `[alerts]` merged with this integration's `[integration.alerts]`.
    pub alerts: std::sync::Arc<AlertSettings>,
}

impl IntegrationConfig {
    /// A redactor of every secret this integration knows: the SCIM token, the client secret,
    /// the configured clientState, and (when `store` is given) the clientState rostersync
    /// generated and stored.
    pub(crate) fn redactor(&self, store: Option<&crate::store::IntegrationStore>) -> Redactor {
        let mut r = Redactor::default();
        r.add(&self.target.token);
        if let ClientCredential::Secret(s) = &self.credential {
            r.add(s);
        }
        if let Some(s) = &self.client_state {
            r.add(s);
        }
        if let Some(Ok(Some(stored))) = store.map(|s| s.stored_client_state()) {
            r.add(&SecretString::from(stored));
        }
        r
    }

    /// The parsed schedule (validated at load time).
    pub(crate) fn cron(&self) -> Result<croner::Cron, String> {
        parse_schedule(&self.schedule)
    }
}

/// A guard window: a number with a unit, `m` (minutes), `h` (hours) or `d` (days), from one
/// minute to 30 days ("24h", "90m", "7d").
fn parse_window(s: &str) -> Result<chrono::Duration, String> {
    let t = s.trim();
    let bad = || format!("{s:?} is not a window such as \"24h\", \"90m\" or \"7d\"");
    let (num, unit) = t.split_at(t.len().saturating_sub(1));
    let n: i64 = num.trim().parse().map_err(|_| bad())?;
    let d = match unit {
        "m" => chrono::Duration::minutes(n),
        "h" => chrono::Duration::hours(n),
        "d" => chrono::Duration::days(n),
        _ => return Err(bad()),
    };
    if d < chrono::Duration::minutes(1) || d > chrono::Duration::days(30) {
        return Err(format!("{s:?} must be between 1 minute and 30 days"));
    }
    Ok(d)
}

fn parse_schedule(s: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(s)
        .map_err(|e| format!("{s:?} is not a cron expression (e.g. {DEFAULT_SCHEDULE:?}): {e}"))
}

impl RawIntegration {
    /// Validates one `[[integration]]` (the `i`-th, named `name`).
    pub(super) fn build(
        self,
        i: usize,
        name: IntegrationName,
        base: &Path,
        alerts: &std::sync::Arc<AlertSettings>,
        global_alerts: &RawAlerts,
    ) -> Result<IntegrationConfig, ConfigError> {
        let ri = self;
        let k = |field: &str| format!("integration[{i}] ({name}).{field}");
        if ri.tenant_id.trim().is_empty() {
            return Err(invalid(
                k("tenant_id"),
                "is empty; use the Directory (tenant) ID from the app registration's Overview page",
            ));
        }
        if !is_guid(&ri.client_id) {
            return Err(invalid(k("client_id"), format!("{:?} is not a GUID; use the Application (client) ID from the app registration's Overview page", ri.client_id)));
        }
        if ri.groups.is_empty() {
            return Err(invalid(
                k("groups"),
                "lists no group; give at least one group object id",
            ));
        }
        for g in &ri.groups {
            if !is_guid(g) {
                return Err(invalid(k("groups"), format!("{g:?} is not a group object id (a GUID such as 0bc7d487-fd6f-41a0-8362-71ec81074f11); display names are not accepted")));
            }
        }
        let username =
            UsernameSource::parse(&ri.username).map_err(|m| invalid(k("username"), m))?;
        let login_url = parse_http_url(
            &k("login_url"),
            ri.login_url
                .as_deref()
                .unwrap_or("https://login.microsoftonline.com"),
        )?;
        let graph_url = parse_http_url(
            &k("graph_url"),
            ri.graph_url
                .as_deref()
                .unwrap_or("https://graph.microsoft.com"),
        )?;
        let max_deactivations = DeactivationLimit::parse(&ri.max_deactivations)
            .map_err(|m| invalid(k("max_deactivations"), m))?;
        let guard_window = match ri.guard_window.as_deref() {
            None => chrono::Duration::hours(24),
            Some(w) => parse_window(w).map_err(|m| invalid(k("guard_window"), m))?,
        };
        let verify_managers_every = match ri.verify_managers_every.as_deref() {
            None => chrono::Duration::days(7),
            Some(w) => parse_window(w).map_err(|m| invalid(k("verify_managers_every"), m))?,
        };
        let credential = resolve_credential(
            &ri.credential_keys(),
            &k,
            base,
            std::env::var_os(FEDERATED_TOKEN_FILE_ENV),
        )?;
        let graph_concurrency = ri.graph_concurrency.unwrap_or(4);
        if !(1..=32).contains(&graph_concurrency) {
            return Err(invalid(k("graph_concurrency"), "must be between 1 and 32"));
        }

        let target = ri.target.build(&k, base)?;
        let mapping = Mapping::build(username, ri.mapping.as_ref()).map_err(|e| match e {
            MappingError::At { key, message } => invalid(k(&format!("mapping.{key}")), message),
        })?;
        let schedule = ri.schedule.unwrap_or_else(|| DEFAULT_SCHEDULE.to_string());
        parse_schedule(&schedule).map_err(|m| invalid(k("schedule"), m))?;
        let timezone: chrono_tz::Tz = match ri.timezone.as_deref() {
            None => chrono_tz::UTC,
            Some(z) => z.trim().parse().map_err(|_| {
                invalid(
                    k("timezone"),
                    format!(
                        "{z:?} is not an IANA time zone such as \"Australia/Sydney\" or \"UTC\""
                    ),
                )
            })?,
        };
        let subscription_minutes = ri.subscription_minutes.unwrap_or(MAX_SUBSCRIPTION_MINUTES);
        if !(1..=MAX_SUBSCRIPTION_MINUTES).contains(&subscription_minutes) {
            return Err(invalid(
                k("subscription_minutes"),
                format!("must be between 1 and {MAX_SUBSCRIPTION_MINUTES} (Graph's maximum for users and groups)"),
            ));
        }
        let renew_before_minutes = ri
            .renew_before_minutes
            .unwrap_or_else(|| (subscription_minutes / 4).clamp(1, 2 * 24 * 60));
        if renew_before_minutes == 0 || renew_before_minutes >= subscription_minutes {
            return Err(invalid(
                k("renew_before_minutes"),
                format!("must be at least 1 and less than subscription_minutes ({subscription_minutes})"),
            ));
        }
        let client_state = match &ri.client_state {
            None => None,
            Some(raw) => {
                let v = raw.resolve(&k("client_state"), base)?;
                let len = secrecy::ExposeSecret::expose_secret(&v).len();
                if !(16..=128).contains(&len) {
                    return Err(invalid(
                        k("client_state"),
                        "must be 16 to 128 characters (Graph's limit is 128); leave it out to have a random one generated",
                    ));
                }
                Some(v)
            }
        };
        let client_secret_expires = ri
            .client_secret_expires
            .as_ref()
            .map(|v| parse_date(v).map_err(|m| invalid(k("client_secret_expires"), m)))
            .transpose()?;
        let alerts = match &ri.alerts {
            None => std::sync::Arc::clone(alerts),
            Some(own) => std::sync::Arc::new(own.build(&k("alerts"), Some(global_alerts), base)?),
        };
        Ok(IntegrationConfig {
            name,
            tenant_id: ri.tenant_id.trim().to_string(),
            client_id: ri.client_id,
            credential,
            groups: ri.groups,
            username,
            login_url,
            graph_url,
            max_deactivations,
            guard_window,
            verify_managers_every,
            link_existing: ri.link_existing,
            graph_concurrency,
            target,
            mapping,
            schedule,
            timezone,
            subscription_minutes,
            renew_before_minutes,
            client_state,
            client_secret_expires,
            alerts,
        })
    }
}
