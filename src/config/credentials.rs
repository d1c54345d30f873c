//! The integration's Graph credential: a client secret, a certificate or a workload identity.

use std::path::{Path, PathBuf};

use super::secret::RawSecret;
use super::{invalid, ConfigError};
use crate::graph::credential::{
    Certificate, CertificateAlg, CertificateCredential, ClientCredential,
};

/// Set by the AKS workload identity webhook to the projected service account token's path.
pub(crate) const FEDERATED_TOKEN_FILE_ENV: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// The integration's credential keys: `credential` picks the kind, which needs its own keys and
/// refuses the others' (a stale `client_secret` beside a certificate would mislead readers).
/// `env_token_file` is the value of [`FEDERATED_TOKEN_FILE_ENV`].
/// The credential keys of one `[[integration]]` table, as read.
pub(super) struct RawCredential<'a> {
    pub(super) credential: Option<&'a str>,
    pub(super) client_secret: Option<&'a RawSecret>,
    pub(super) certificate: Option<&'a Path>,
    pub(super) certificate_key: Option<&'a RawSecret>,
    pub(super) certificate_alg: Option<&'a str>,
    pub(super) federated_token_file: Option<&'a Path>,
}

pub(super) fn resolve_credential(
    ri: &RawCredential<'_>,
    k: &dyn Fn(&str) -> String,
    base: &Path,
    env_token_file: Option<std::ffi::OsString>,
) -> Result<ClientCredential, ConfigError> {
    let kind = ri.credential.unwrap_or("secret");
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
            let Some(cert_path) = ri.certificate else {
                return Err(invalid(k("certificate"), "is required with credential = \"certificate\": the path of the certificate's PEM file (the public part uploaded to the app registration)"));
            };
            let Some(raw_key) = ri.certificate_key else {
                return Err(invalid(k("certificate_key"), "is required with credential = \"certificate\": the certificate's private key in PEM, as { file = \"path\" }, { env = \"VAR\" } or { value = \"...\" }"));
            };
            let alg = match ri.certificate_alg {
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
            let token_file = match (ri.federated_token_file, env_token_file) {
                (Some(p), _) => resolve_path(p),
                (None, Some(env)) if !env.is_empty() => PathBuf::from(env),
                (None, _) => return Err(invalid(
                    k("federated_token_file"),
                    format!("is not set and neither is the environment variable {FEDERATED_TOKEN_FILE_ENV} (the AKS workload identity webhook sets it); give the path of the projected service account token"),
                )),
            };
            Ok(ClientCredential::WorkloadIdentity { token_file })
        }
        _ => match ri.client_secret {
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
