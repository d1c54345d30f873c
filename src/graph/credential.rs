//! How rostersync proves the app's identity to the token endpoint: a client secret, a
//! certificate (a signed JWT client assertion) or a federated token from a file (workload
//! identity federation); docs/graph.md, Tokens.
//!
//! Owns: certificate thumbprints, building and signing assertions, reading the federated token
//! file. It does no HTTP (`GraphClient::fetch_token` posts what this builds) and never puts key
//! material in errors, logs or `Debug` output.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use secrecy::{ExposeSecret, SecretBox, SecretString};

/// `client_assertion_type` of a JWT client assertion (RFC 7523).
pub(crate) const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Lifetime of a certificate assertion; Microsoft asks for 5–10 minutes at most.
const ASSERTION_LIFETIME_SECS: i64 = 600;
/// A Kubernetes projected token is ~1 KiB; anything near this is not a token.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("not a PEM X.509 certificate (expected a -----BEGIN CERTIFICATE----- block){0}")]
    NotACertificate(String),
    #[error("the certificate's public key is not RSA (only RSA certificates are supported)")]
    NotRsa,
    #[error("{0}")]
    Key(String),
    #[error("the private key does not belong to the certificate (its signature does not verify with the certificate's public key)")]
    KeyMismatch,
    #[error("cannot sign the client assertion: {0}")]
    Sign(String),
    #[error("cannot read the federated token file {path}: {message}")]
    TokenFile { path: PathBuf, message: String },
}

/// Signature algorithm of certificate assertions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertificateAlg {
    /// RSASSA-PSS with SHA-256 and an `x5t#S256` header: what Microsoft documents today.
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 and an `x5t` (SHA-1) header: older tenants and libraries.
    Rs256,
}

impl CertificateAlg {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "PS256" => Some(Self::Ps256),
            "RS256" => Some(Self::Rs256),
            _ => None,
        }
    }
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Ps256 => "PS256",
            Self::Rs256 => "RS256",
        }
    }
    fn jwt(self) -> Algorithm {
        match self {
            Self::Ps256 => Algorithm::PS256,
            Self::Rs256 => Algorithm::RS256,
        }
    }
}

/// The thumbprints of a certificate: how the token endpoint finds which registered certificate
/// signed an assertion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Thumbprints {
    /// base64url SHA-256 of the DER (`x5t#S256`).
    pub x5t_s256: String,
    /// base64url SHA-1 of the DER (`x5t`).
    pub x5t: String,
    /// Uppercase hex SHA-1, as the Entra admin center lists certificates.
    pub sha1_hex: String,
}

impl Thumbprints {
    /// Digests come from aws-lc-rs, the crypto backend jsonwebtoken already uses.
    pub(crate) fn of_der(der: &[u8]) -> Self {
        use aws_lc_rs::digest::{digest, SHA1_FOR_LEGACY_USE_ONLY, SHA256};
        let sha256 = digest(&SHA256, der);
        let sha1 = digest(&SHA1_FOR_LEGACY_USE_ONLY, der);
        Self {
            x5t_s256: URL_SAFE_NO_PAD.encode(sha256.as_ref()),
            x5t: URL_SAFE_NO_PAD.encode(sha1.as_ref()),
            sha1_hex: sha1.as_ref().iter().map(|b| format!("{b:02X}")).collect(),
        }
    }
}

/// The first `-----BEGIN {label}-----` … `-----END {label}-----` block of a PEM text, borders
/// included. Lets one file hold a key and its certificate (as Key Vault exports them).
fn pem_block<'a>(text: &'a str, label: &str) -> Option<&'a str> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = text.find(&begin)?;
    let stop = text[start..].find(&end)? + start + end.len();
    Some(&text[start..stop])
}

/// An X.509 certificate read from PEM: its DER (for thumbprints) and RSA public key.
#[derive(Clone)]
pub struct Certificate {
    thumbprints: Thumbprints,
    public_key: DecodingKey,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("x5t#S256", &self.thumbprints.x5t_s256)
            .finish_non_exhaustive()
    }
}

impl Certificate {
    /// Reads the first certificate of a PEM text (a chain file starts with the leaf).
    pub fn from_pem(text: &str) -> Result<Self, CredentialError> {
        let block = pem_block(text, "CERTIFICATE").ok_or_else(|| {
            let hint = if text.contains("PRIVATE KEY-----") {
                "; this looks like a private key, which belongs in certificate_key"
            } else {
                ""
            };
            CredentialError::NotACertificate(hint.into())
        })?;
        let body: String = block
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .flat_map(|l| l.chars())
            .filter(|c| !c.is_whitespace())
            .collect();
        let der = STANDARD
            .decode(body)
            .map_err(|_| CredentialError::NotACertificate(": the base64 body is damaged".into()))?;
        // jsonwebtoken finds the SubjectPublicKeyInfo of a CERTIFICATE block itself.
        let public_key =
            DecodingKey::from_rsa_pem(block.as_bytes()).map_err(|_| CredentialError::NotRsa)?;
        Ok(Self {
            thumbprints: Thumbprints::of_der(&der),
            public_key,
        })
    }

    pub(crate) fn thumbprints(&self) -> &Thumbprints {
        &self.thumbprints
    }

    pub(crate) fn public_key(&self) -> &DecodingKey {
        &self.public_key
    }
}

/// A certificate and its private key: signs a fresh assertion for every token request.
#[derive(Clone)]
pub struct CertificateCredential {
    certificate: Certificate,
    /// Parsed once; zeroized on drop and redacted in `Debug`.
    key: Arc<SecretBox<EncodingKey>>,
    alg: CertificateAlg,
}

impl std::fmt::Debug for CertificateCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateCredential")
            .field("certificate", &self.certificate)
            .field("key", &"[redacted]")
            .field("alg", &self.alg)
            .finish()
    }
}

impl CertificateCredential {
    /// Parses the key (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`, unencrypted; the first
    /// such block of the text). Does not check that key and certificate belong together: see
    /// [`Self::check_pair`].
    pub fn new(
        certificate: Certificate,
        key_pem: &SecretString,
        alg: CertificateAlg,
    ) -> Result<Self, CredentialError> {
        let text = key_pem.expose_secret();
        let block = pem_block(text, "PRIVATE KEY")
            .or_else(|| pem_block(text, "RSA PRIVATE KEY"))
            .ok_or_else(|| {
                CredentialError::Key(if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
                    "the private key is encrypted; store it unencrypted in a protected secret (e.g. `openssl pkey -in key.pem -out plain.pem`)".into()
                } else if text.contains("-----BEGIN CERTIFICATE-----") {
                    "no private key found, only a certificate (which belongs in `certificate`)".into()
                } else {
                    "not a PEM private key (expected -----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)".into()
                })
            })?;
        // The library's error never contains key bytes, but only its kind is kept anyway.
        let key = EncodingKey::from_rsa_pem(block.as_bytes()).map_err(|_| {
            CredentialError::Key(
                "the private key is not a usable RSA key (2048 bits or more)".into(),
            )
        })?;
        Ok(Self {
            certificate,
            key: Arc::new(SecretBox::new(Box::new(key))),
            alg,
        })
    }

    /// Signs a probe and verifies it with the certificate's public key.
    pub(crate) fn check_pair(&self) -> Result<(), CredentialError> {
        let probe = b"rostersync key/certificate pair check";
        let alg = self.alg.jwt();
        let sig = jsonwebtoken::crypto::sign(probe, self.key.expose_secret(), alg)
            .map_err(|e| CredentialError::Sign(e.to_string()))?;
        match jsonwebtoken::crypto::verify(&sig, probe, self.certificate.public_key(), alg) {
            Ok(true) => Ok(()),
            _ => Err(CredentialError::KeyMismatch),
        }
    }

    pub(crate) fn certificate(&self) -> &Certificate {
        &self.certificate
    }

    #[cfg(test)]
    pub(crate) fn alg(&self) -> CertificateAlg {
        self.alg
    }

    /// A fresh assertion for `audience` (the token endpoint URL): new `jti`, `nbf`/`iat` now.
    pub(crate) fn assertion(
        &self,
        audience: &str,
        client_id: &str,
        now: i64,
    ) -> Result<SecretString, CredentialError> {
        let mut header = Header::new(self.alg.jwt());
        header.typ = Some("JWT".into());
        let t = self.certificate.thumbprints();
        match self.alg {
            CertificateAlg::Ps256 => header.x5t_s256 = Some(t.x5t_s256.clone()),
            CertificateAlg::Rs256 => header.x5t = Some(t.x5t.clone()),
        }
        let claims = serde_json::json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        jsonwebtoken::encode(&header, &claims, self.key.expose_secret())
            .map(SecretString::from)
            .map_err(|e| CredentialError::Sign(e.to_string()))
    }
}

/// How the app authenticates to the token endpoint.
#[derive(Clone, Debug)]
pub enum ClientCredential {
    Secret(SecretString),
    Certificate(CertificateCredential),
    /// A federated token (e.g. a Kubernetes projected service-account token) read from this
    /// file at every token request, since the kubelet rotates it.
    WorkloadIdentity {
        token_file: PathBuf,
    },
}

/// What proves the client in one token request.
pub(crate) enum Proof<'a> {
    Secret(&'a SecretString),
    Assertion(SecretString),
}

impl ClientCredential {
    /// Short name for logs: `client secret`, `certificate` or `workload identity`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Secret(_) => "client secret",
            Self::Certificate(_) => "certificate",
            Self::WorkloadIdentity { .. } => "workload identity",
        }
    }

    /// What `check` prints: the kind, and the certificate's thumbprint (as the admin center
    /// lists it) or the token file's path. Never key material.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Secret(_) => "with the client secret".into(),
            Self::Certificate(c) => format!(
                "with certificate {} ({})",
                c.certificate.thumbprints.sha1_hex,
                c.alg.as_str()
            ),
            Self::WorkloadIdentity { token_file } => {
                format!("with workload identity ({})", token_file.display())
            }
        }
    }

    /// The proof for one token request to `token_url`; assertions are never reused.
    pub(crate) async fn proof(
        &self,
        token_url: &str,
        client_id: &str,
    ) -> Result<Proof<'_>, CredentialError> {
        match self {
            Self::Secret(s) => Ok(Proof::Secret(s)),
            Self::Certificate(c) => c
                .assertion(token_url, client_id, chrono::Utc::now().timestamp())
                .map(Proof::Assertion),
            Self::WorkloadIdentity { token_file } => {
                read_token_file(token_file).await.map(Proof::Assertion)
            }
        }
    }
}

/// Reads the federated token; a missing, empty or oversized file is an error naming the path.
pub(crate) async fn read_token_file(path: &Path) -> Result<SecretString, CredentialError> {
    let err = |message: String| CredentialError::TokenFile {
        path: path.to_path_buf(),
        message,
    };
    let meta = tokio::fs::metadata(path).await.map_err(|e| {
        err(match e.kind() {
            std::io::ErrorKind::NotFound => "the file does not exist; is the service account token projected into the pod (azure.workload.identity/use: \"true\") and federated_token_file / AZURE_FEDERATED_TOKEN_FILE right?".into(),
            _ => e.to_string(),
        })
    })?;
    if meta.len() > MAX_TOKEN_FILE_BYTES {
        return Err(err(format!(
            "the file has {} bytes; a federated token is a JWT of a few KiB",
            meta.len()
        )));
    }
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(SecretString::from(token.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rostersync_sim::keys;

    #[test]
    fn thumbprints_match_openssl() {
        let c = Certificate::from_pem(keys::APP_CERT_PEM).unwrap();
        assert_eq!(c.thumbprints().x5t_s256, keys::APP_CERT_X5T_S256);
        assert_eq!(c.thumbprints().x5t, keys::APP_CERT_X5T);
        assert_eq!(c.thumbprints().sha1_hex, keys::APP_CERT_SHA1_HEX);
        let other = Certificate::from_pem(keys::UNREGISTERED_CERT_PEM).unwrap();
        assert_eq!(
            other.thumbprints().x5t_s256,
            keys::UNREGISTERED_CERT_X5T_S256
        );
    }

    #[test]
    fn a_combined_pem_file_serves_as_certificate_and_key() {
        let combined = SecretString::from(format!("{}\n{}", keys::APP_KEY_PEM, keys::APP_CERT_PEM));
        let cert = Certificate::from_pem(combined.expose_secret()).unwrap();
        let cred = CertificateCredential::new(cert, &combined, CertificateAlg::Ps256).unwrap();
        cred.check_pair().unwrap();
    }

    #[test]
    fn pkcs1_keys_work_and_mismatched_pairs_are_caught() {
        let cert = || Certificate::from_pem(keys::APP_CERT_PEM).unwrap();
        let pkcs1 = SecretString::from(keys::APP_KEY_PKCS1_PEM.to_string());
        for alg in [CertificateAlg::Ps256, CertificateAlg::Rs256] {
            CertificateCredential::new(cert(), &pkcs1, alg)
                .unwrap()
                .check_pair()
                .unwrap();
        }
        let other = SecretString::from(keys::FORGER_KEY_PEM.to_string());
        let c = CertificateCredential::new(cert(), &other, CertificateAlg::Ps256).unwrap();
        assert!(matches!(c.check_pair(), Err(CredentialError::KeyMismatch)));
    }

    #[test]
    fn bad_inputs_say_what_is_wrong_without_echoing_keys() {
        let e = Certificate::from_pem(keys::APP_KEY_PEM)
            .unwrap_err()
            .to_string();
        assert!(e.contains("certificate_key"), "{e}");
        let cert = Certificate::from_pem(keys::APP_CERT_PEM).unwrap();
        let enc = SecretString::from(
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIabc\n-----END ENCRYPTED PRIVATE KEY-----\n"
                .to_string(),
        );
        let e = CertificateCredential::new(cert.clone(), &enc, CertificateAlg::Ps256)
            .unwrap_err()
            .to_string();
        assert!(e.contains("encrypted") && !e.contains("MIIabc"), "{e}");
        let c = CertificateCredential::new(
            cert,
            &SecretString::from(keys::APP_KEY_PEM.to_string()),
            CertificateAlg::Ps256,
        )
        .unwrap();
        let dbg = format!("{c:?}");
        assert!(dbg.contains("[redacted]") && !dbg.contains("MII"), "{dbg}");
    }

    #[test]
    fn assertions_carry_the_documented_header_and_claims() {
        let cert = Certificate::from_pem(keys::APP_CERT_PEM).unwrap();
        let key = SecretString::from(keys::APP_KEY_PEM.to_string());
        let aud = "https://login.microsoftonline.com/contoso/oauth2/v2.0/token";
        let id = "11111111-2222-3333-4444-555555555555";
        for alg in [CertificateAlg::Ps256, CertificateAlg::Rs256] {
            let c = CertificateCredential::new(cert.clone(), &key, alg).unwrap();
            let a = c.assertion(aud, id, 1_800_000_000).unwrap();
            let b = c.assertion(aud, id, 1_800_000_000).unwrap();
            let h = jsonwebtoken::decode_header(a.expose_secret()).unwrap();
            assert_eq!(h.typ.as_deref(), Some("JWT"));
            match alg {
                CertificateAlg::Ps256 => {
                    assert_eq!(h.alg, Algorithm::PS256);
                    assert_eq!(h.x5t_s256.as_deref(), Some(keys::APP_CERT_X5T_S256));
                }
                CertificateAlg::Rs256 => {
                    assert_eq!(h.alg, Algorithm::RS256);
                    assert_eq!(h.x5t.as_deref(), Some(keys::APP_CERT_X5T));
                }
            }
            let mut v = jsonwebtoken::Validation::new(alg.jwt());
            v.set_audience(&[aud]);
            v.validate_exp = false;
            let claims = |t: &SecretString| {
                jsonwebtoken::decode::<serde_json::Value>(t.expose_secret(), cert.public_key(), &v)
                    .unwrap()
                    .claims
            };
            let (ca, cb) = (claims(&a), claims(&b));
            assert_eq!(
                (ca["iss"].as_str(), ca["sub"].as_str()),
                (Some(id), Some(id))
            );
            assert_eq!(
                ca["exp"].as_i64().unwrap() - ca["nbf"].as_i64().unwrap(),
                600
            );
            assert_ne!(ca["jti"], cb["jti"], "every assertion has its own jti");
        }
    }

    #[tokio::test]
    async fn token_files_are_read_and_problems_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("azure-identity-token");
        let e = read_token_file(&path).await.unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("does not exist"),
            "{e}"
        );
        std::fs::write(&path, "\n").unwrap();
        let e = read_token_file(&path).await.unwrap_err().to_string();
        assert!(
            e.contains(&path.display().to_string()) && e.contains("empty"),
            "{e}"
        );
        std::fs::write(&path, "eyJ.a.b\n").unwrap();
        assert_eq!(
            read_token_file(&path).await.unwrap().expose_secret(),
            "eyJ.a.b"
        );
    }
}
