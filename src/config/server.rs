//! `[server]`: where `serve` listens, its data directory, limits, admin token and TLS.

use std::fmt;
use std::path::{Path, PathBuf};

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use super::secret::RawSecret;
use super::{invalid, parse_http_url, ConfigError};

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
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

/// `server.reconcile_concurrency` when unset: full reconciles of different integrations at
/// once. Each waits mostly on its own tenant and LMS, so they overlap well; each also holds its
/// run's memory (about 160 MiB at 100,000 members), which bounds it.
pub const DEFAULT_RECONCILE_CONCURRENCY: usize = 16;

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

impl RawServer {
    /// Validates `[server]`; relative paths resolve against `base`.
    pub(super) fn build(self, base: &Path) -> Result<ServerConfig, ConfigError> {
        let raw_server = self;
        let data_dir = raw_server
            .data_dir
            .map(|d| if d.is_absolute() { d } else { base.join(d) })
            .unwrap_or_else(|| base.join("data"));
        let listen_text = raw_server.listen.as_deref().unwrap_or("0.0.0.0:8080");
        let listen = listen_text.trim().parse().map_err(|_| {
            invalid(
                "server.listen",
                format!("{listen_text:?} is not an address such as \"0.0.0.0:8080\""),
            )
        })?;
        let public_url = match raw_server.public_url.as_deref() {
            None => None,
            Some(u) => Some(parse_http_url("server.public_url", u)?),
        };
        let max_body_kib = raw_server.max_body_kib.unwrap_or(1024);
        if !(4..=64 * 1024).contains(&max_body_kib) {
            return Err(invalid(
                "server.max_body_kib",
                "must be between 4 and 65536",
            ));
        }
        let worker_concurrency = raw_server.worker_concurrency.unwrap_or(8);
        if !(1..=64).contains(&worker_concurrency) {
            return Err(invalid(
                "server.worker_concurrency",
                "must be between 1 and 64",
            ));
        }
        let reconcile_concurrency = raw_server
            .reconcile_concurrency
            .unwrap_or(DEFAULT_RECONCILE_CONCURRENCY);
        if !(1..=64).contains(&reconcile_concurrency) {
            return Err(invalid(
                "server.reconcile_concurrency",
                "must be between 1 and 64",
            ));
        }
        let max_attempts = raw_server.max_attempts.unwrap_or(8);
        if !(1..=100).contains(&max_attempts) {
            return Err(invalid("server.max_attempts", "must be between 1 and 100"));
        }
        let admin_token = match &raw_server.admin_token {
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
        let metrics_require_token = raw_server.metrics_require_token.unwrap_or(false);
        if metrics_require_token && admin_token.is_none() {
            return Err(invalid(
                "server.metrics_require_token",
                "needs server.admin_token",
            ));
        }
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let tls = match (raw_server.tls_cert, raw_server.tls_key) {
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
        Ok(ServerConfig {
            data_dir,
            listen,
            public_url,
            max_body_bytes: max_body_kib * 1024,
            worker_concurrency,
            max_attempts,
            reconcile_concurrency,
            admin_token,
            metrics_require_token,
            allow_cleartext_admin: raw_server.allow_cleartext_admin.unwrap_or(false),
            tls,
        })
    }
}
