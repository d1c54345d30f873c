//! Typed configuration loaded from TOML.
//!
//! Owns: parsing, defaults, validation (every error names the key), and resolving secrets from
//! the environment, a file or an inline value into [`SecretString`]s. It must not perform any
//! network I/O; `check` does that.

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use crate::graph::credential::{
    Certificate, CertificateAlg, CertificateCredential, ClientCredential,
};
use crate::sync::mapping::{Mapping, MappingError, UsernameSource};
use crate::target::dialect::DialectSettings;
use crate::text::{is_guid, is_loopback_host};

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

/// An integration's name: `[a-z0-9-]+`, used in store keys, URLs and logs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntegrationName(String);

impl IntegrationName {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 63 {
            return Err("must be 1 to 63 characters".into());
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!(
                "{s:?} may contain only lowercase letters a-z, digits and '-'"
            ));
        }
        Ok(Self(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IntegrationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a secret comes from. Exactly one of the keys must be given.
#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    env: Option<String>,
    file: Option<PathBuf>,
    value: Option<String>,
}

impl RawSecret {
    fn resolve(&self, key: &str, base: &Path) -> Result<SecretString, ConfigError> {
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

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    integration: Vec<RawIntegration>,
    alerts: Option<RawAlerts>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    public_url: Option<String>,
    max_body_kib: Option<usize>,
    worker_concurrency: Option<usize>,
    max_attempts: Option<u32>,
    /// Full reconciles of different integrations run at once (CLI and serve).
    reconcile_concurrency: Option<usize>,
    /// Bearer token for `/status` (and `/metrics` with `metrics_require_token`).
    admin_token: Option<RawSecret>,
    metrics_require_token: Option<bool>,
    /// Lets `serve` take `admin_token` over plain HTTP on a non-loopback address.
    allow_cleartext_admin: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawIntegration {
    name: String,
    tenant_id: String,
    client_id: String,
    /// Required with `credential = "secret"` (the default) only.
    client_secret: Option<RawSecret>,
    /// "secret" (default), "certificate" or "workload_identity".
    credential: Option<String>,
    certificate: Option<PathBuf>,
    certificate_key: Option<RawSecret>,
    certificate_alg: Option<String>,
    federated_token_file: Option<PathBuf>,
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

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    kind: String,
    url: String,
    token: RawSecret,
    concurrency: Option<usize>,
    throttle_wait_secs: Option<u64>,
    timeout_secs: Option<u64>,
    custom_schema: Option<String>,
    dialect: Option<RawDialect>,
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
        use crate::target::dialect::{CaseRule, Clear, FilterAttr, PatchOp};
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

/// Set by the AKS workload identity webhook to the projected service account token's path.
pub const FEDERATED_TOKEN_FILE_ENV: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// The integration's credential keys: `credential` picks the kind, which needs its own keys and
/// refuses the others' (a stale `client_secret` beside a certificate would mislead readers).
/// `env_token_file` is the value of [`FEDERATED_TOKEN_FILE_ENV`].
fn resolve_credential(
    ri: &RawIntegration,
    k: &dyn Fn(&str) -> String,
    base: &Path,
    env_token_file: Option<std::ffi::OsString>,
) -> Result<ClientCredential, ConfigError> {
    let kind = ri.credential.as_deref().unwrap_or("secret");
    let used: &[&str] = match kind {
        "secret" => &["client_secret"],
        "certificate" => &["certificate", "certificate_key", "certificate_alg"],
        "workload_identity" => &["federated_token_file"],
        other => {
            return Err(invalid(
                k("credential"),
                format!("{other:?} is not supported; use \"secret\", \"certificate\" or \"workload_identity\""),
            ))
        }
    };
    let present = [
        ("client_secret", ri.client_secret.is_some()),
        ("certificate", ri.certificate.is_some()),
        ("certificate_key", ri.certificate_key.is_some()),
        ("certificate_alg", ri.certificate_alg.is_some()),
        ("federated_token_file", ri.federated_token_file.is_some()),
    ];
    if let Some((key, _)) = present
        .iter()
        .find(|(key, set)| *set && !used.contains(key))
    {
        return Err(invalid(
            k(key),
            format!("is not used with credential = {kind:?}; remove it (or change credential)"),
        ));
    }
    let resolve_path = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    match kind {
        "certificate" => {
            let Some(cert_path) = &ri.certificate else {
                return Err(invalid(k("certificate"), "is required with credential = \"certificate\": the path of the certificate's PEM file (the public part uploaded to the app registration)"));
            };
            let Some(raw_key) = &ri.certificate_key else {
                return Err(invalid(k("certificate_key"), "is required with credential = \"certificate\": the certificate's private key in PEM, as { file = \"path\" }, { env = \"VAR\" } or { value = \"...\" }"));
            };
            let alg = match ri.certificate_alg.as_deref() {
                None => CertificateAlg::Ps256,
                Some(a) => CertificateAlg::parse(a).ok_or_else(|| {
                    invalid(
                        k("certificate_alg"),
                        format!("{a:?} is not supported; use \"PS256\" (default) or \"RS256\""),
                    )
                })?,
            };
            let path = resolve_path(cert_path);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    k("certificate"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let cert = Certificate::from_pem(&text)
                .map_err(|e| invalid(k("certificate"), format!("{}: {e}", path.display())))?;
            let key = raw_key.resolve(&k("certificate_key"), base)?;
            let cred = CertificateCredential::new(cert, &key, alg)
                .and_then(|c| c.check_pair().map(|()| c))
                .map_err(|e| invalid(k("certificate_key"), e.to_string()))?;
            Ok(ClientCredential::Certificate(cred))
        }
        "workload_identity" => {
            let token_file = match (&ri.federated_token_file, env_token_file) {
                (Some(p), _) => resolve_path(p),
                (None, Some(env)) if !env.is_empty() => PathBuf::from(env),
                (None, _) => return Err(invalid(
                    k("federated_token_file"),
                    format!("is not set and neither is the environment variable {FEDERATED_TOKEN_FILE_ENV} (the AKS workload identity webhook sets it); give the path of the projected service account token"),
                )),
            };
            Ok(ClientCredential::WorkloadIdentity { token_file })
        }
        _ => match &ri.client_secret {
            Some(raw) => Ok(ClientCredential::Secret(
                raw.resolve(&k("client_secret"), base)?,
            )),
            None => Err(invalid(
                k("client_secret"),
                "is required (or choose credential = \"certificate\" or \"workload_identity\")",
            )),
        },
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

/// The whole, validated configuration.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub integrations: Vec<IntegrationConfig>,
    /// `[alerts]` as written (each integration carries its merged copy).
    pub alerts: std::sync::Arc<AlertSettings>,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    /// Address `serve` listens on.
    pub listen: std::net::SocketAddr,
    /// Base URL Graph posts notifications to (`{public_url}/webhooks/graph/{integration}`).
    /// Required by `serve` (checked there), unused by the other commands.
    pub public_url: Option<Url>,
    /// Largest webhook body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Users synced at once by the incremental worker, per integration.
    pub worker_concurrency: usize,
    /// Attempts before a queued notification moves to the dead-letter tree.
    pub max_attempts: u32,
    /// Full reconciles of different integrations at once (`reconcile` and `serve`).
    pub reconcile_concurrency: usize,
    /// Bearer token `/status` requires (disabled without one), and `/metrics` too when
    /// `metrics_require_token`.
    pub admin_token: Option<SecretString>,
    pub metrics_require_token: bool,
    /// `serve` accepts `admin_token` on a plain-HTTP listener that is not loopback (TLS is
    /// terminated in front of it on a trusted network).
    pub allow_cleartext_admin: bool,
    /// Built-in TLS for `serve` (`tls_cert` and `tls_key`); `None`: plain HTTP behind a proxy.
    pub tls: Option<TlsSettings>,
}

impl ServerConfig {
    /// The base URL Graph posts to: `public_url`, or when `serve` is bound to a loopback
    /// address (tests, local trials) `http://{bound}`, `https://` with built-in TLS.
    pub fn public_url_for(&self, bound: std::net::SocketAddr) -> Option<Url> {
        match &self.public_url {
            Some(u) => Some(u.clone()),
            None if bound.ip().is_loopback() => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                Url::parse(&format!("{scheme}://{bound}")).ok()
            }
            None => None,
        }
    }
}

/// `serve`'s certificate and key, read and checked at load (so a bad file fails every command
/// at once, naming the key, rather than the listener later). The key is never printed.
#[derive(Clone)]
pub struct TlsSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The certificate chain and matching key, ready for the listener.
    pub server_config: std::sync::Arc<rustls::ServerConfig>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// Why a PEM file did not load, without quoting any of its content (it may be a private key).
fn describe_pem_error(e: &rustls::pki_types::pem::Error, expected: &str) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => format!("cannot read it: {io}"),
        Error::NoItemsFound => format!("holds no {expected}"),
        _ => format!("is not a valid PEM file (expected {expected})"),
    }
}

impl TlsSettings {
    /// Reads the PEM certificate chain (leaf first) and private key (PKCS#8, PKCS#1 RSA or
    /// SEC1 EC) and checks that they belong together.
    fn load(cert: PathBuf, key: PathBuf) -> Result<Self, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let at = |p: &Path| format!("{}: ", p.display());
        let chain = CertificateDer::pem_file_iter(&cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                let what = "PEM certificate (-----BEGIN CERTIFICATE-----)";
                invalid("server.tls_cert", at(&cert) + &describe_pem_error(&e, what))
            })?;
        if chain.is_empty() {
            return Err(invalid(
                "server.tls_cert",
                at(&cert) + "holds no PEM certificate (-----BEGIN CERTIFICATE-----)",
            ));
        }
        let private = PrivateKeyDer::from_pem_file(&key).map_err(|e| {
            let what = "PEM private key (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)";
            invalid("server.tls_key", at(&key) + &describe_pem_error(&e, what))
        })?;
        let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("server.tls_cert", e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, private)
            .map_err(|e| {
                invalid(
                    "server.tls_key",
                    format!(
                        "{}cannot be used with the certificate in {}: {e}",
                        at(&key),
                        cert.display()
                    ),
                )
            })?;
        Ok(TlsSettings {
            cert,
            key,
            server_config: std::sync::Arc::new(server_config),
        })
    }
}

/// The longest subscription lifetime Graph grants for users and groups (under 29 days).
pub const MAX_SUBSCRIPTION_MINUTES: u32 = 41_760;

/// `server.reconcile_concurrency` when unset: full reconciles of different integrations at
/// once. Each waits mostly on its own tenant and LMS, so they overlap well; each also holds its
/// run's memory (about 160 MiB at 100,000 members), which bounds it.
pub const DEFAULT_RECONCILE_CONCURRENCY: usize = 16;
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
    pub fn parse(v: &toml::Value) -> Result<Self, String> {
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
    pub fn allowed(&self, active: u64) -> u64 {
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
    /// The parsed schedule (validated at load time).
    pub fn cron(&self) -> Result<croner::Cron, String> {
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

/// Default ceiling of concurrent LMS requests (`target.concurrency`).
pub const DEFAULT_TARGET_CONCURRENCY: usize = 32;

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

    /// Parses TOML text; `base` is the folder relative paths resolve against.
    pub fn from_toml(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: describe_toml_error(text, &e),
        })?;
        let data_dir = raw
            .server
            .data_dir
            .map(|d| if d.is_absolute() { d } else { base.join(d) })
            .unwrap_or_else(|| base.join("data"));
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
            let k = |field: &str| format!("integration[{i}].{field}");
            let name = IntegrationName::parse(&ri.name).map_err(|m| invalid(k("name"), m))?;
            let k = |field: &str| format!("integration[{i}] ({name}).{field}");
            if !names.insert(name.clone()) {
                return Err(invalid(k("name"), "is used by two integrations"));
            }
            if ri.tenant_id.trim().is_empty() {
                return Err(invalid(k("tenant_id"), "is empty; use the Directory (tenant) ID from the app registration's Overview page"));
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
            let credential =
                resolve_credential(&ri, &k, base, std::env::var_os(FEDERATED_TOKEN_FILE_ENV))?;
            let graph_concurrency = ri.graph_concurrency.unwrap_or(4);
            if !(1..=32).contains(&graph_concurrency) {
                return Err(invalid(k("graph_concurrency"), "must be between 1 and 32"));
            }

            let t = ri.target;
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
            // A ceiling: the pacer finds the LMS's own limit below it (`target::pace`).
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
                    format!(
                        "{custom_schema:?} is not a schema URN such as {DEFAULT_CUSTOM_SCHEMA}"
                    ),
                ));
            }
            let dialect = t.dialect.unwrap_or_default().resolve(&k)?;
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
                        format!("{z:?} is not an IANA time zone such as \"Australia/Sydney\" or \"UTC\""),
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
                None => std::sync::Arc::clone(&alerts),
                Some(own) => {
                    std::sync::Arc::new(own.build(&k("alerts"), Some(&global_alerts), base)?)
                }
            };
            integrations.push(IntegrationConfig {
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
                target: TargetConfig {
                    url,
                    token,
                    concurrency,
                    throttle_wait_secs,
                    timeout_secs,
                    custom_schema,
                    dialect,
                },
                mapping,
                schedule,
                timezone,
                subscription_minutes,
                renew_before_minutes,
                client_state,
                client_secret_expires,
                alerts,
            });
        }
        let listen_text = raw.server.listen.as_deref().unwrap_or("0.0.0.0:8080");
        let listen = listen_text.trim().parse().map_err(|_| {
            invalid(
                "server.listen",
                format!("{listen_text:?} is not an address such as \"0.0.0.0:8080\""),
            )
        })?;
        let public_url = match raw.server.public_url.as_deref() {
            None => None,
            Some(u) => Some(parse_http_url("server.public_url", u)?),
        };
        let max_body_kib = raw.server.max_body_kib.unwrap_or(1024);
        if !(4..=64 * 1024).contains(&max_body_kib) {
            return Err(invalid(
                "server.max_body_kib",
                "must be between 4 and 65536",
            ));
        }
        let worker_concurrency = raw.server.worker_concurrency.unwrap_or(8);
        if !(1..=64).contains(&worker_concurrency) {
            return Err(invalid(
                "server.worker_concurrency",
                "must be between 1 and 64",
            ));
        }
        let reconcile_concurrency = raw
            .server
            .reconcile_concurrency
            .unwrap_or(DEFAULT_RECONCILE_CONCURRENCY);
        if !(1..=64).contains(&reconcile_concurrency) {
            return Err(invalid(
                "server.reconcile_concurrency",
                "must be between 1 and 64",
            ));
        }
        let max_attempts = raw.server.max_attempts.unwrap_or(8);
        if !(1..=100).contains(&max_attempts) {
            return Err(invalid("server.max_attempts", "must be between 1 and 100"));
        }
        let admin_token = match &raw.server.admin_token {
            None => None,
            Some(t) => {
                let t = t.resolve("server.admin_token", base)?;
                if secrecy::ExposeSecret::expose_secret(&t).trim().len() < 16 {
                    return Err(invalid(
                        "server.admin_token",
                        "must be at least 16 characters (e.g. `openssl rand -hex 24`)",
                    ));
                }
                Some(t)
            }
        };
        let metrics_require_token = raw.server.metrics_require_token.unwrap_or(false);
        if metrics_require_token && admin_token.is_none() {
            return Err(invalid(
                "server.metrics_require_token",
                "needs server.admin_token",
            ));
        }
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let tls = match (raw.server.tls_cert, raw.server.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsSettings::load(resolve(cert), resolve(key))?),
            (Some(_), None) => {
                return Err(invalid(
                    "server.tls_key",
                    "is missing: server.tls_cert is set, and built-in TLS needs both (the private key's PEM file)",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "server.tls_cert",
                    "is missing: server.tls_key is set, and built-in TLS needs both (the certificate chain's PEM file)",
                ))
            }
        };
        Ok(Config {
            server: ServerConfig {
                data_dir,
                listen,
                public_url,
                max_body_bytes: max_body_kib * 1024,
                worker_concurrency,
                max_attempts,
                reconcile_concurrency,
                admin_token,
                metrics_require_token,
                allow_cleartext_admin: raw.server.allow_cleartext_admin.unwrap_or(false),
                tls,
            },
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

// ---- alerts ----

/// `[alerts]`, and `[integration.alerts]` whose keys override it one by one.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    enabled: Option<bool>,
    email_to: Option<Vec<String>>,
    email_from: Option<String>,
    webhook_url: Option<RawSecret>,
    digest_minutes: Option<u32>,
    repeat_minutes: Option<u32>,
    repeat_hours: Option<u32>,
    smtp: Option<RawSmtp>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    host: String,
    port: Option<u16>,
    tls: Option<String>,
    username: Option<RawSecret>,
    password: Option<RawSecret>,
    timeout_secs: Option<u64>,
}

/// Where alerts go and how often they may repeat, for one integration (or the global
/// `[alerts]`). No channel configured = alerts are off.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    pub email: Option<EmailAlerts>,
    /// Incoming-webhook URL (Slack, Teams): its path is a credential, so it is a secret.
    pub webhook_url: Option<SecretString>,
    /// The failed-user and dead-letter digests go out at most once per this many minutes.
    pub digest_minutes: u32,
    /// A persisting problem (Graph authentication, subscriptions, failed runs) is repeated at
    /// most once per this many minutes.
    pub repeat_minutes: u32,
    /// The same user failing for the same reason, and a guard trip, are repeated at most once
    /// per this many hours.
    pub repeat_hours: u32,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            email: None,
            webhook_url: None,
            digest_minutes: 15,
            repeat_minutes: 60,
            repeat_hours: 24,
        }
    }
}

impl AlertSettings {
    /// Whether any channel is configured.
    pub fn enabled(&self) -> bool {
        self.email.is_some() || self.webhook_url.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct EmailAlerts {
    pub to: Vec<String>,
    pub from: String,
    pub smtp: SmtpSettings,
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<SecretString>,
    pub password: Option<SecretString>,
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required, never skipped); port 587.
    StartTls,
    /// TLS from the first byte (SMTPS); port 465.
    Tls,
    /// No encryption: only for a server on 127.0.0.1/localhost (test servers, a local relay).
    None,
}

impl RawAlerts {
    /// Validates these settings, each key falling back to `parent`'s (the global `[alerts]`).
    /// `prefix` names this table in errors.
    fn build(
        &self,
        prefix: &str,
        parent: Option<&RawAlerts>,
        base: &Path,
    ) -> Result<AlertSettings, ConfigError> {
        // An inherited value's errors name the global key.
        macro_rules! pick {
            ($f:ident) => {
                match (&self.$f, parent.and_then(|p| p.$f.as_ref())) {
                    (Some(v), _) => Some((v, format!("{prefix}.{}", stringify!($f)))),
                    (None, Some(v)) => Some((v, format!("alerts.{}", stringify!($f)))),
                    (None, None) => None,
                }
            };
        }
        let defaults = AlertSettings::default();
        let minutes = |v: Option<(&u32, String)>, default: u32, max: u32| match v {
            None => Ok(default),
            Some((n, _)) if (1..=max).contains(n) => Ok(*n),
            Some((_, key)) => Err(invalid(key, format!("must be between 1 and {max}"))),
        };
        let digest_minutes = minutes(pick!(digest_minutes), defaults.digest_minutes, 24 * 60)?;
        let repeat_minutes = minutes(pick!(repeat_minutes), defaults.repeat_minutes, 7 * 24 * 60)?;
        let repeat_hours = minutes(pick!(repeat_hours), defaults.repeat_hours, 30 * 24)?;
        if pick!(enabled).is_some_and(|(on, _)| !*on) {
            return Ok(AlertSettings {
                digest_minutes,
                repeat_minutes,
                repeat_hours,
                ..defaults
            });
        }
        let webhook_url = match pick!(webhook_url) {
            None => None,
            Some((raw, key)) => {
                let v = raw.resolve(&key, base)?;
                // Never echo the URL: its path is the webhook's credential.
                let url = Url::parse(secrecy::ExposeSecret::expose_secret(&v).trim())
                    .map_err(|e| invalid(&key, format!("is not a URL ({e})")))?;
                let loopback = url.host_str().is_some_and(is_loopback_host);
                if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
                    return Err(invalid(
                        key,
                        "must be an https:// URL (http:// is accepted only for 127.0.0.1 and localhost)",
                    ));
                }
                Some(v)
            }
        };
        let to = pick!(email_to).map(|(v, key)| (v.clone(), key));
        let email = match to {
            None => None,
            Some((to, _)) if to.is_empty() => None,
            Some((to, key)) => {
                for a in &to {
                    crate::alert::check_mailbox(a).map_err(|m| invalid(&key, m))?;
                }
                let (from, from_key) = pick!(email_from).ok_or_else(|| {
                    invalid(
                        format!("{prefix}.email_from"),
                        "is needed when email_to is set, e.g. \"rostersync <rostersync@example.com>\"",
                    )
                })?;
                crate::alert::check_mailbox(from).map_err(|m| invalid(from_key, m))?;
                let (smtp, smtp_key) = pick!(smtp).ok_or_else(|| {
                    invalid(
                        format!("{prefix}.smtp"),
                        "is needed when email_to is set: add an [alerts.smtp] table with at least host",
                    )
                })?;
                Some(EmailAlerts {
                    to,
                    from: from.clone(),
                    smtp: smtp.build(&smtp_key, base)?,
                })
            }
        };
        Ok(AlertSettings {
            email,
            webhook_url,
            digest_minutes,
            repeat_minutes,
            repeat_hours,
        })
    }
}

impl RawSmtp {
    fn build(&self, prefix: &str, base: &Path) -> Result<SmtpSettings, ConfigError> {
        let k = |f: &str| format!("{prefix}.{f}");
        let host = self.host.trim().to_string();
        if host.is_empty() || host.contains(['/', ' ', ':']) && !host.starts_with('[') {
            return Err(invalid(
                k("host"),
                format!("{host:?} is not a host name such as \"smtp.example.com\""),
            ));
        }
        let tls = match self.tls.as_deref().unwrap_or("starttls") {
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Tls,
            "none" if is_loopback_host(&host) => SmtpTls::None,
            "none" => {
                return Err(invalid(
                    k("tls"),
                    "\"none\" (no encryption) is accepted only for a server on 127.0.0.1 or localhost; use \"starttls\" or \"tls\"",
                ))
            }
            other => {
                return Err(invalid(
                    k("tls"),
                    format!("{other:?} is not supported; use \"starttls\" (port 587), \"tls\" (port 465) or \"none\" (localhost only)"),
                ))
            }
        };
        let port = self.port.unwrap_or(match tls {
            SmtpTls::StartTls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        });
        if port == 0 {
            return Err(invalid(k("port"), "must be between 1 and 65535"));
        }
        let username = self
            .username
            .as_ref()
            .map(|u| u.resolve(&k("username"), base))
            .transpose()?;
        let password = self
            .password
            .as_ref()
            .map(|p| p.resolve(&k("password"), base))
            .transpose()?;
        if username.is_some() != password.is_some() {
            return Err(invalid(
                k(if username.is_some() {
                    "password"
                } else {
                    "username"
                }),
                "give both username and password, or neither (no authentication)",
            ));
        }
        let timeout_secs = self.timeout_secs.unwrap_or(30);
        if !(1..=600).contains(&timeout_secs) {
            return Err(invalid(k("timeout_secs"), "must be between 1 and 600"));
        }
        Ok(SmtpSettings {
            host,
            port,
            tls,
            username,
            password,
            timeout_secs,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    const GOOD: &str = r#"
[server]
data_dir = "state"

[[integration]]
name = "contoso"
tenant_id = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = { value = "s3cr3t-value" }
groups = ["0bc7d487-fd6f-41a0-8362-71ec81074f11"]
username = "mail"
max_deactivations = 25

[integration.target]
kind = "scim"
url = "https://lms.example.com/scim/v2/"
token = { value = "scim-token" }
"#;

    #[test]
    fn a_valid_file_loads_with_defaults() {
        let c = Config::from_toml(GOOD, Path::new("/etc/rs")).unwrap();
        assert_eq!(c.server.data_dir, PathBuf::from("/etc/rs/state"));
        let i = &c.integrations[0];
        assert_eq!(i.name.as_str(), "contoso");
        assert_eq!(i.username, UsernameSource::Mail);
        assert_eq!(i.max_deactivations, DeactivationLimit::Count(25));
        assert_eq!(i.guard_window, chrono::Duration::hours(24));
        assert_eq!(i.login_url.as_str(), "https://login.microsoftonline.com/");
        assert_eq!(i.target.url.as_str(), "https://lms.example.com/scim/v2");
        assert_eq!(i.target.concurrency, DEFAULT_TARGET_CONCURRENCY);
        assert_eq!(i.target.throttle_wait_secs, 600);
        assert_eq!(secret_of(i), "s3cr3t-value");
        assert!(i.link_existing);
    }

    #[test]
    fn the_scim_dialect_can_be_pinned_and_every_bad_value_names_its_key() {
        use crate::target::dialect::{CaseRule, Clear, FilterAttr, PatchOp};
        let text = format!(
            "{GOOD}dialect = {{ patch_ops = [\"replace\"], clear = \"null\", put = false, filter = [\"userName\"], user_name_unique = \"case-sensitive\", email_type = false, not_kept = [\"displayName\"], no_patch = [\"externalId\"] }}\n"
        );
        let c = Config::from_toml(&text, Path::new("/etc/rs")).unwrap();
        let d = &c.integrations[0].target.dialect;
        assert_eq!(d.patch_ops, Some([PatchOp::Replace].into()));
        assert_eq!(d.clear, Some(Clear::Null));
        assert_eq!(d.put, Some(false));
        assert_eq!(d.filter, Some([FilterAttr::UserName].into()));
        assert_eq!(d.user_name_unique, Some(CaseRule::CaseSensitive));
        assert_eq!(d.email_type, Some(false));
        assert!(d.not_kept.contains("displayName") && d.no_patch.contains("externalId"));
        let plain = Config::from_toml(GOOD, Path::new("/etc/rs")).unwrap();
        assert_eq!(
            plain.integrations[0].target.dialect,
            DialectSettings::default(),
            "nothing pinned by default"
        );
        for (bad, key) in [
            ("patch_ops = [\"merge\"]", "target.dialect.patch_ops"),
            ("clear = \"blank\"", "target.dialect.clear"),
            ("filter = [\"email\"]", "target.dialect.filter"),
            (
                "user_name_unique = \"yes\"",
                "target.dialect.user_name_unique",
            ),
            ("not_kept = [\"a b\"]", "target.dialect.not_kept"),
            ("typo = true", "typo"),
        ] {
            let text = format!("{GOOD}dialect = {{ {bad} }}\n");
            let e = Config::from_toml(&text, Path::new("/etc/rs"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{bad}: {e}");
        }
    }

    fn secret_of(i: &IntegrationConfig) -> &str {
        match &i.credential {
            ClientCredential::Secret(s) => s.expose_secret(),
            other => panic!("expected a client secret, got {other:?}"),
        }
    }

    fn err_of(text: &str) -> String {
        Config::from_toml(text, Path::new("."))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn serve_settings_are_validated_with_the_key_named() {
        let with = |extra: &str| {
            GOOD.replace(
                "username = \"mail\"",
                &format!("username = \"mail\"\n{extra}"),
            )
        };
        let c = Config::from_toml(
            &with("schedule = \"0 */15 * * * *\"\ntimezone = \"Australia/Sydney\""),
            Path::new("."),
        )
        .unwrap();
        let i = &c.integrations[0];
        assert_eq!(i.timezone, chrono_tz::Australia::Sydney);
        assert_eq!(i.subscription_minutes, MAX_SUBSCRIPTION_MINUTES);
        assert!(i.renew_before_minutes < i.subscription_minutes);
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        let e = err_of(&with("schedule = \"every day\""));
        assert!(e.starts_with("integration[0] (contoso).schedule:"), "{e}");
        let e = err_of(&with("timezone = \"Mars/Olympus\""));
        assert!(e.contains(".timezone:") && e.contains("IANA"), "{e}");
        let e = err_of(&with("subscription_minutes = 50000"));
        assert!(
            e.contains(".subscription_minutes:") && e.contains("41760"),
            "{e}"
        );
        let e = err_of(&with(
            "subscription_minutes = 60\nrenew_before_minutes = 60",
        ));
        assert!(e.contains(".renew_before_minutes:"), "{e}");
        let e = err_of(&with("guard_window = \"a day\""));
        assert!(e.contains(".guard_window:") && e.contains("24h"), "{e}");
        let e = err_of(&with("guard_window = \"31d\""));
        assert!(e.contains(".guard_window:") && e.contains("30 days"), "{e}");
        let c = Config::from_toml(&with("guard_window = \"90m\""), Path::new(".")).unwrap();
        assert_eq!(
            c.integrations[0].guard_window,
            chrono::Duration::minutes(90)
        );
        let e = err_of(&with("client_state = { value = \"short\" }"));
        assert!(
            e.contains(".client_state:") && !e.contains("short\""),
            "{e}"
        );
        let e = err_of(&GOOD.replacen("[server]", "[server]\nlisten = \"everywhere\"", 1));
        assert!(e.starts_with("server.listen:"), "{e}");
        let e = err_of(&GOOD.replacen(
            "[server]",
            "[server]\npublic_url = \"http://example.com\"",
            1,
        ));
        assert!(e.starts_with("server.public_url:"), "{e}");
    }

    #[test]
    fn errors_name_the_key() {
        let e = err_of(&GOOD.replace("username = \"mail\"", "username = \"email\""));
        assert!(e.starts_with("integration[0] (contoso).username:"), "{e}");
        let e = err_of(&GOOD.replace("max_deactivations = 25", "max_deactivations = \"ten\""));
        assert!(e.contains("max_deactivations"), "{e}");
        let e = err_of(&GOOD.replace("name = \"contoso\"", "name = \"Contoso Ltd\""));
        assert!(e.starts_with("integration[0].name:"), "{e}");
        let e = err_of(&GOOD.replace("0bc7d487-fd6f-41a0-8362-71ec81074f11", "All Employees"));
        assert!(e.contains(".groups:") && e.contains("object id"), "{e}");
        let e = err_of(&GOOD.replace(
            "{ value = \"s3cr3t-value\" }",
            "{ env = \"RS_TEST_SURELY_UNSET\" }",
        ));
        assert!(
            e.contains("client_secret") && e.contains("RS_TEST_SURELY_UNSET"),
            "{e}"
        );
        let e = err_of(&GOOD.replace("https://lms.example.com", "http://lms.example.com"));
        assert!(e.contains("target.url") && e.contains("https"), "{e}");
        let e = err_of(&GOOD.replace("kind = \"scim\"", "kind = \"ldap\""));
        assert!(e.contains("target.kind"), "{e}");
        let e = err_of(&GOOD.replace("username = \"mail\"", "usernme = \"mail\""));
        assert!(e.contains("usernme"), "{e}");
    }

    #[test]
    fn parse_errors_do_not_echo_secrets() {
        for bad in [
            GOOD.replace("{ value = \"s3cr3t-value\" }", "\"s3cr3t-value\""),
            GOOD.replace(
                "{ value = \"s3cr3t-value\" }",
                "{ valu = \"s3cr3t-value\" }",
            ),
            GOOD.replace("{ value = \"s3cr3t-value\" }", "{ value = \"s3cr3t-value }"),
        ] {
            let e = err_of(&bad);
            assert!(!e.contains("s3cr3t"), "{e}");
            assert!(e.contains("line 9") || e.contains("line 10"), "{e}");
        }
    }

    #[test]
    fn secret_values_never_appear_in_debug_output() {
        let c = Config::from_toml(GOOD, Path::new(".")).unwrap();
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("s3cr3t-value") && !dbg.contains("scim-token"),
            "{dbg}"
        );
    }

    #[test]
    fn secrets_come_from_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret.txt"), "from-file\n").unwrap();
        let text = GOOD.replace("{ value = \"s3cr3t-value\" }", "{ file = \"secret.txt\" }");
        let c = Config::from_toml(&text, dir.path()).unwrap();
        assert_eq!(secret_of(&c.integrations[0]), "from-file");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        std::env::set_var("CONTOSO_SECRET", "x");
        std::env::set_var("CONTOSO_SCIM_TOKEN", "y");
        let text = include_str!("../config/example.toml");
        // The example's placeholder ids are zero GUIDs, which are well-formed.
        let c = Config::from_toml(text, Path::new("config")).unwrap();
        assert_eq!(c.integrations[0].name.as_str(), "contoso");
        assert!(c.integrations[0]
            .mapping
            .rules
            .iter()
            .any(|r| r.key == "custom.company"));
    }

    /// GOOD with its client_secret line replaced by `credential_lines`.
    fn with_credential(credential_lines: &str) -> String {
        GOOD.replace(
            "client_secret = { value = \"s3cr3t-value\" }",
            credential_lines,
        )
    }

    fn write_cert_files(dir: &Path) {
        use crate::sim::keys;
        std::fs::write(dir.join("app.crt.pem"), keys::APP_CERT_PEM).unwrap();
        std::fs::write(dir.join("app.key.pem"), keys::APP_KEY_PEM).unwrap();
        std::fs::write(dir.join("other.key.pem"), keys::FORGER_KEY_PEM).unwrap();
    }

    #[test]
    fn certificate_credentials_load_from_files_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        write_cert_files(dir.path());
        let text = with_credential(
            "credential = \"certificate\"\ncertificate = \"app.crt.pem\"\ncertificate_key = { file = \"app.key.pem\" }",
        );
        let c = Config::from_toml(&text, dir.path()).unwrap();
        let ClientCredential::Certificate(cert) = &c.integrations[0].credential else {
            panic!("not a certificate credential");
        };
        assert_eq!(cert.alg(), CertificateAlg::Ps256);
        assert_eq!(
            cert.certificate().thumbprints().x5t_s256,
            crate::sim::keys::APP_CERT_X5T_S256
        );
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("PRIVATE KEY") && !dbg.contains("MII"),
            "{dbg}"
        );
        let rs = Config::from_toml(
            &text.replace(
                "credential = \"certificate\"",
                "credential = \"certificate\"\ncertificate_alg = \"RS256\"",
            ),
            dir.path(),
        )
        .unwrap();
        assert!(matches!(&rs.integrations[0].credential,
            ClientCredential::Certificate(c) if c.alg() == CertificateAlg::Rs256));
    }

    #[test]
    fn credential_errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        write_cert_files(dir.path());
        let err_in = |text: &str| Config::from_toml(text, dir.path()).unwrap_err().to_string();
        let p = "integration[0] (contoso).";
        let cert = "credential = \"certificate\"\ncertificate = \"app.crt.pem\"\ncertificate_key = { file = \"app.key.pem\" }";
        let cases: Vec<(String, &str, &str)> = vec![
            (with_credential(""), "client_secret", "required"),
            (
                with_credential("credential = \"password\""),
                "credential",
                "workload_identity",
            ),
            (
                with_credential("credential = \"certificate\"\ncertificate_key = { file = \"app.key.pem\" }"),
                "certificate",
                "required",
            ),
            (
                with_credential("credential = \"certificate\"\ncertificate = \"app.crt.pem\""),
                "certificate_key",
                "required",
            ),
            (
                with_credential(&cert.replace("app.crt.pem", "missing.pem")),
                "certificate",
                "missing.pem",
            ),
            (
                with_credential(&cert.replace("app.crt.pem", "app.key.pem")),
                "certificate",
                "certificate_key",
            ),
            (
                with_credential(&cert.replace("{ file = \"app.key.pem\" }", "{ file = \"app.crt.pem\" }")),
                "certificate_key",
                "only a certificate",
            ),
            (
                with_credential(&cert.replace("app.key.pem", "other.key.pem")),
                "certificate_key",
                "does not belong to the certificate",
            ),
            (
                with_credential(&format!("{cert}\ncertificate_alg = \"ES256\"")),
                "certificate_alg",
                "PS256",
            ),
            (
                GOOD.replace(
                    "client_secret = { value = \"s3cr3t-value\" }",
                    &format!("client_secret = {{ value = \"s3cr3t-value\" }}\n{cert}"),
                ),
                "client_secret",
                "not used with credential = \"certificate\"",
            ),
            (
                with_credential("certificate = \"app.crt.pem\""),
                "certificate",
                "not used with credential = \"secret\"",
            ),
            (
                with_credential("credential = \"workload_identity\"\ncertificate_alg = \"PS256\"\nfederated_token_file = \"t\""),
                "certificate_alg",
                "not used",
            ),
        ];
        for (text, key, words) in cases {
            let e = err_in(&text);
            assert!(e.starts_with(&format!("{p}{key}:")), "{key}: {e}");
            assert!(e.contains(words), "{key}: {e}");
            assert!(!e.contains("MII"), "{e}");
        }
    }

    #[test]
    fn workload_identity_takes_the_file_from_the_key_or_the_environment() {
        let raw = |extra: &str| -> RawConfig {
            toml::from_str(&with_credential(&format!(
                "credential = \"workload_identity\"\n{extra}"
            )))
            .unwrap()
        };
        let k = |f: &str| format!("integration[0] (contoso).{f}");
        let base = Path::new("/etc/rs");
        let env = Some(std::ffi::OsString::from(
            "/var/run/secrets/azure/tokens/azure-identity-token",
        ));
        let path_of = |r: RawConfig, env: Option<std::ffi::OsString>| match resolve_credential(
            &r.integration[0],
            &k,
            base,
            env,
        ) {
            Ok(ClientCredential::WorkloadIdentity { token_file }) => Ok(token_file),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e.to_string()),
        };
        assert_eq!(
            path_of(raw(""), env.clone()).unwrap(),
            PathBuf::from("/var/run/secrets/azure/tokens/azure-identity-token")
        );
        assert_eq!(
            path_of(raw("federated_token_file = \"tokens/t.jwt\""), env).unwrap(),
            PathBuf::from("/etc/rs/tokens/t.jwt")
        );
        let e = path_of(raw(""), None).unwrap_err();
        assert!(
            e.starts_with("integration[0] (contoso).federated_token_file:")
                && e.contains(FEDERATED_TOKEN_FILE_ENV),
            "{e}"
        );
    }

    const ALERTS: &str = r#"
[alerts]
email_to = ["ops@example.com"]
email_from = "rostersync <rostersync@example.com>"
webhook_url = { value = "https://hooks.example.com/services/T0/B0/tok3n" }
digest_minutes = 30

[alerts.smtp]
host = "smtp.example.com"
username = { value = "mailer" }
password = { value = "smtp-pw" }
"#;

    #[test]
    fn alerts_are_global_and_overridable_per_integration() {
        let c = Config::from_toml(&format!("{GOOD}{ALERTS}"), Path::new(".")).unwrap();
        let a = &c.integrations[0].alerts;
        assert!(a.enabled());
        let e = a.email.as_ref().unwrap();
        assert_eq!(e.to, ["ops@example.com"]);
        assert_eq!((e.smtp.port, e.smtp.tls), (587, SmtpTls::StartTls));
        assert_eq!(e.smtp.password.as_ref().unwrap().expose_secret(), "smtp-pw");
        assert_eq!(
            (a.digest_minutes, a.repeat_minutes, a.repeat_hours),
            (30, 60, 24)
        );
        assert_eq!(c.integrations[0].client_secret_expires, None);
        // Without [alerts], alerts are off.
        let c = Config::from_toml(GOOD, Path::new(".")).unwrap();
        assert!(!c.integrations[0].alerts.enabled() && !c.alerts.enabled());

        // Per integration: its own recipients and windows, the rest inherited.
        let own = format!(
            "{}{ALERTS}",
            GOOD.replace(
                "\n[integration.target]",
                "client_secret_expires = 2027-03-31\n\n[integration.alerts]\nemail_to = [\"contoso-it@example.com\"]\nrepeat_minutes = 120\n\n[integration.target]"
            )
        );
        let c = Config::from_toml(&own, Path::new(".")).unwrap();
        let i = &c.integrations[0];
        let a = &i.alerts;
        assert_eq!(a.email.as_ref().unwrap().to, ["contoso-it@example.com"]);
        assert_eq!(a.email.as_ref().unwrap().smtp.host, "smtp.example.com");
        assert_eq!((a.digest_minutes, a.repeat_minutes), (30, 120));
        assert!(a.webhook_url.is_some());
        assert_eq!(c.alerts.email.as_ref().unwrap().to, ["ops@example.com"]);
        assert_eq!(
            i.client_secret_expires,
            chrono::NaiveDate::from_ymd_opt(2027, 3, 31)
        );
        // Or none at all for this integration.
        let off = GOOD.replace(
            "\n[integration.target]",
            "client_secret_expires = \"2027-03-31\"\n[integration.alerts]\nenabled = false\n\n[integration.target]",
        );
        let c = Config::from_toml(&format!("{off}{ALERTS}"), Path::new(".")).unwrap();
        assert!(!c.integrations[0].alerts.enabled() && c.alerts.enabled());
        assert!(c.integrations[0].client_secret_expires.is_some());
    }

    #[test]
    fn alert_settings_are_validated_without_echoing_secrets() {
        let with = |from: &str, to: &str| err_of(&format!("{GOOD}{}", ALERTS.replace(from, to)));
        let e = with(
            "host = \"smtp.example.com\"",
            "host = \"smtp.example.com\"\ntls = \"none\"",
        );
        assert!(
            e.starts_with("alerts.smtp.tls:") && e.contains("localhost"),
            "{e}"
        );
        let e = with(
            "https://hooks.example.com/services/T0/B0/tok3n",
            "http://hooks.example.com/services/T0/B0/tok3n",
        );
        assert!(
            e.starts_with("alerts.webhook_url:") && !e.contains("tok3n"),
            "{e}"
        );
        let e = with("email_from = \"rostersync <rostersync@example.com>\"\n", "");
        assert!(e.starts_with("alerts.email_from:"), "{e}");
        let e = with("[\"ops@example.com\"]", "[\"ops at example\"]");
        assert!(e.starts_with("alerts.email_to:"), "{e}");
        let e = with("password = { value = \"smtp-pw\" }\n", "");
        assert!(e.starts_with("alerts.smtp.password:"), "{e}");
        let e = with("digest_minutes = 30", "digest_minutes = 0");
        assert!(e.starts_with("alerts.digest_minutes:"), "{e}");
        let e = with("digest_minutes = 30", "digest_minute = 30");
        assert!(e.contains("digest_minute"), "{e}");
        let e = err_of(&GOOD.replace(
            "\n[integration.target]",
            "client_secret_expires = \"31/03/2027\"\n\n[integration.target]",
        ));
        assert!(
            e.starts_with("integration[0] (contoso).client_secret_expires:"),
            "{e}"
        );
        let e = err_of(&format!(
            "{}{ALERTS}",
            GOOD.replace(
                "\n[integration.target]",
                "[integration.alerts]\nemail_to = [\"x\"]\n\n[integration.target]"
            )
        ));
        assert!(
            e.starts_with("integration[0] (contoso).alerts.email_to:"),
            "{e}"
        );
    }

    #[test]
    fn the_example_alert_settings_are_valid_uncommented() {
        std::env::set_var("CONTOSO_SECRET", "x");
        std::env::set_var("CONTOSO_SCIM_TOKEN", "y");
        std::env::set_var("ROSTERSYNC_ALERT_WEBHOOK", "https://hooks.example.com/x");
        std::env::set_var("ROSTERSYNC_SMTP_USER", "mailer");
        std::env::set_var("ROSTERSYNC_SMTP_PASSWORD", "pw");
        let text = include_str!("../config/example.toml");
        // Uncomment the settings of the alert blocks (they run to the next blank line) and
        // client_secret_expires.
        let mut in_block = false;
        let mut lines = Vec::new();
        for l in text.lines() {
            if l == "# [alerts]" || l == "# [integration.alerts]" {
                in_block = true;
            } else if l.is_empty() {
                in_block = false;
            }
            let rest = l.strip_prefix("# ").unwrap_or(l);
            let setting = rest.starts_with('[')
                || rest
                    .split_once(" = ")
                    .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            let wanted = (in_block || rest.starts_with("client_secret_expires")) && setting;
            lines.push(if wanted { rest } else { l });
        }
        let uncommented = lines.join("\n");
        let c = Config::from_toml(&uncommented, Path::new("config")).unwrap();
        let i = &c.integrations[0];
        assert!(i.client_secret_expires.is_some());
        assert!(c.alerts.email.is_some() && c.alerts.webhook_url.is_some());
        assert_eq!(
            i.alerts.email.as_ref().unwrap().to,
            ["contoso-it@example.com"]
        );
        assert_eq!(i.alerts.repeat_minutes, 120);
    }

    #[test]
    fn deactivation_limits_parse() {
        use toml::Value;
        assert_eq!(
            DeactivationLimit::parse(&Value::String("10%".into())),
            Ok(DeactivationLimit::Percent(10.0))
        );
        assert_eq!(
            DeactivationLimit::parse(&Value::Integer(3)),
            Ok(DeactivationLimit::Count(3))
        );
        assert!(DeactivationLimit::parse(&Value::String("150%".into())).is_err());
        assert_eq!(DeactivationLimit::Percent(10.0).allowed(305), 30);
        assert_eq!(DeactivationLimit::Percent(10.0).allowed(5), 1);
        assert_eq!(DeactivationLimit::Percent(0.0).allowed(500), 0);
    }
}
