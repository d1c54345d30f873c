//! `validationTokens` (Microsoft's "change notifications with resource data" page) and the identity-platform metadata that publishes
//! their signing key: `{login}/common/v2.0/.well-known/openid-configuration` (and the v1
//! `{login}/common/.well-known/openid-configuration`) pointing to
//! `{login}/common/discovery/v2.0/keys` (and v1 `{login}/common/discovery/keys`).
//!
//! Also the token endpoint's checks of client assertions (identity platform: certificate credentials,
//! workload identity federation): certificates
//! registered on the app (`x5t#S256` or `x5t`, PS256 or RS256 signature, `aud` = the token URL,
//! `iss` = `sub` = client id, lifetime, single-use `jti`) and federated identity credentials
//! (issuer's signature, `iss`, `sub`, `aud`, lifetime). AADSTS700027 is from Microsoft's error
//! table; 700024, 700021, 50013, 50027, 70021 and 700211–700213 follow what Entra is widely
//! reported to send (not verified against the table).

use std::collections::HashMap;

use actix_web::{HttpRequest, HttpResponse};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::{json, Value};

use super::{GraphSim, Shared, TokenForgery};
use crate::keys;

/// Microsoft Graph Change Tracking, the publisher of change notifications.
pub(super) const CHANGE_TRACKING_APP_ID: &str = "0bf30f3b-4a52-48df-9a82-234910c4a086";
const OTHER_APP_ID: &str = "7d1e3c55-2f0b-4f6e-9b7a-5a0c1f2e3d4b";
const LIFETIME_SECS: i64 = 24 * 3600;

#[derive(serde::Serialize)]
struct Claims<'a> {
    aud: &'a str,
    iss: String,
    iat: i64,
    nbf: i64,
    exp: i64,
    ver: &'static str,
    appid: &'a str,
    appidacr: &'static str,
    tid: &'a str,
    idp: String,
    oid: &'static str,
    sub: &'static str,
}

/// An RS256 JWT as Graph puts in `validationTokens` (v1.0 token: `appid`, sts.windows.net
/// issuer), built according to `forgery`. Empty if signing fails (fixed keys: it does not).
pub(super) fn validation_token(tenant: &str, client_id: &str, forgery: TokenForgery) -> String {
    let now = chrono::Utc::now().timestamp();
    let (iat, exp) = match forgery {
        TokenForgery::Expired => (now - LIFETIME_SECS - 3600, now - 3600),
        _ => (now, now + LIFETIME_SECS),
    };
    let issuer = format!("https://sts.windows.net/{tenant}/");
    let claims = Claims {
        aud: client_id,
        iss: issuer.clone(),
        iat,
        nbf: iat,
        exp,
        ver: "1.0",
        appid: if forgery == TokenForgery::WrongAppId {
            OTHER_APP_ID
        } else {
            CHANGE_TRACKING_APP_ID
        },
        appidacr: "2",
        tid: tenant,
        idp: issuer,
        oid: "1d2c3b4a-5e6f-4a70-8b9c-0d1e2f3a4b5c",
        sub: "1d2c3b4a-5e6f-4a70-8b9c-0d1e2f3a4b5c",
    };
    let pem = if forgery == TokenForgery::WrongKey {
        keys::FORGER_KEY_PEM
    } else {
        keys::SIGNING_KEY_PEM
    };
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(keys::SIGNING_KID.to_string());
    EncodingKey::from_rsa_pem(pem.as_bytes())
        .and_then(|k| jsonwebtoken::encode(&header, &claims, &k))
        .unwrap_or_default()
}

fn json_response(body: serde_json::Value) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header(("Content-Type", "application/json; charset=utf-8"))
        .body(serde_json::to_vec(&body).unwrap_or_default())
}

/// Serves the metadata and JWKS documents; None when the path is not one of them.
pub(super) fn metadata_endpoint(
    sim: &Shared,
    req: &HttpRequest,
    segs: &[&str],
) -> Option<HttpResponse> {
    let base = &sim.base_url;
    let get = req.method() == actix_web::http::Method::GET;
    match segs {
        ["common", "discovery", "v2.0", "keys"] | ["common", "discovery", "keys"] => {
            sim.lock().count("jwks");
            if !get {
                return Some(HttpResponse::MethodNotAllowed().finish());
            }
            Some(json_response(json!({
                "keys": [{
                    "kty": "RSA",
                    "use": "sig",
                    "kid": keys::SIGNING_KID,
                    "n": keys::SIGNING_KEY_N,
                    "e": keys::KEY_E,
                }]
            })))
        }
        ["common", v2 @ .., ".well-known", "openid-configuration"]
            if v2.is_empty() || v2 == ["v2.0"] =>
        {
            sim.lock().count("jwks");
            if !get {
                return Some(HttpResponse::MethodNotAllowed().finish());
            }
            let v2 = !v2.is_empty();
            let (issuer, jwks) = if v2 {
                (
                    "https://login.microsoftonline.com/{tenantid}/v2.0".to_string(),
                    format!("{base}/common/discovery/v2.0/keys"),
                )
            } else {
                (
                    "https://sts.windows.net/{tenantid}/".to_string(),
                    format!("{base}/common/discovery/keys"),
                )
            };
            Some(json_response(json!({
                "issuer": issuer,
                "jwks_uri": jwks,
                "token_endpoint": format!("{base}/common/oauth2/v2.0/token"),
                "authorization_endpoint": format!("{base}/common/oauth2/v2.0/authorize"),
                "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
                "subject_types_supported": ["pairwise"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "tenant_region_scope": null,
            })))
        }
        _ => None,
    }
}

impl GraphSim {
    /// JWKS with the key that signs `validationTokens`
    /// (`{login_url}/common/discovery/v2.0/keys`).
    pub fn jwks_url(&self) -> String {
        format!("{}/common/discovery/v2.0/keys", self.shared.base_url)
    }

    /// OpenID metadata whose `jwks_uri` is [`GraphSim::jwks_url`].
    pub fn openid_configuration_url(&self) -> String {
        format!(
            "{}/common/v2.0/.well-known/openid-configuration",
            self.shared.base_url
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Client assertions: certificates and workload identity federation
// ---------------------------------------------------------------------------------------------

/// The audience a federated identity credential expects by convention (workload identity federation).
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Issuer of the test "Kubernetes" service-account tokens (signed with
/// `keys::KUBE_ISSUER_KEY_PEM`).
pub const TEST_KUBE_ISSUER: &str = "https://oidc.kube.sim.example/6f1c2d3e-issuer/";
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
const ASSERTION_SKEW_SECS: i64 = 300;

/// A federated identity credential on the simulated app registration.
#[derive(Clone, Debug)]
pub struct FederatedCredential {
    pub issuer: String,
    pub subject: String,
    pub audience: String,
    /// The issuer's RSA public key (SPKI or certificate PEM): stands in for the JWKS that Entra
    /// fetches from the issuer's OIDC discovery document.
    pub issuer_key_pem: String,
}

struct RegisteredCertificate {
    x5t_s256: String,
    x5t: String,
    key: DecodingKey,
}

struct TrustedFederation {
    credential: FederatedCredential,
    key: DecodingKey,
}

/// The app registration's certificates and federated credentials, the replay cache of
/// certificate assertions, and the token endpoint's clock offset.
#[derive(Default)]
pub(super) struct AppCredentials {
    certificates: Vec<RegisteredCertificate>,
    federated: Vec<TrustedFederation>,
    /// `jti` of accepted certificate assertions → their `exp`.
    seen_jti: HashMap<String, i64>,
    clock_offset_secs: i64,
    last: Option<Value>,
}

/// Why the token endpoint refuses an assertion, as Entra words it.
pub(super) struct Refusal {
    pub status: u16,
    pub error: &'static str,
    pub code: u32,
    pub description: String,
}

fn refuse(status: u16, error: &'static str, code: u32, description: impl Into<String>) -> Refusal {
    Refusal {
        status,
        error,
        code,
        description: description.into(),
    }
}

fn malformed(why: &str) -> Refusal {
    refuse(
        400,
        "invalid_request",
        50027,
        format!("JWT token is invalid or malformed. {why}"),
    )
}

fn b64url_json(part: &str) -> Option<Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part.trim_end_matches('='))
        .ok()?;
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .filter(Value::is_object)
}

/// Thumbprints computed here, independently of rostersync's client code: base64url SHA-256
/// and SHA-1 of the certificate's DER.
fn thumbprints(cert_pem: &str) -> Option<(String, String)> {
    use aws_lc_rs::digest::{digest, SHA1_FOR_LEGACY_USE_ONLY, SHA256};
    use base64::Engine;
    let start = cert_pem.find("-----BEGIN CERTIFICATE-----")?;
    let body: String = cert_pem[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect::<String>()
        .split_whitespace()
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body)
        .ok()?;
    let enc = |d: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(d);
    Some((
        enc(digest(&SHA256, &der).as_ref()),
        enc(digest(&SHA1_FOR_LEGACY_USE_ONLY, &der).as_ref()),
    ))
}

fn iso(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .map(|d| d.format("%m/%d/%Y %H:%M:%S").to_string())
        .unwrap_or_else(|| t.to_string())
}

/// `aud` as a list (a JWT may carry one string or an array).
fn audiences(claims: &Value) -> Vec<String> {
    match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    }
}

impl AppCredentials {
    fn now(&self) -> i64 {
        chrono::Utc::now().timestamp() + self.clock_offset_secs
    }

    /// `exp` in the future and `nbf`/`iat` not in the future, with a small skew.
    fn check_lifetime(&self, claims: &Value) -> Result<(), Refusal> {
        let now = self.now();
        let Some(exp) = claims.get("exp").and_then(Value::as_i64) else {
            return Err(malformed("The assertion has no numeric 'exp' claim."));
        };
        let nbf = claims.get("nbf").and_then(Value::as_i64);
        let iat = claims.get("iat").and_then(Value::as_i64);
        let early = nbf
            .into_iter()
            .chain(iat)
            .any(|t| t > now + ASSERTION_SKEW_SECS);
        if exp <= now - ASSERTION_SKEW_SECS || early {
            return Err(refuse(
                401,
                "invalid_client",
                700024,
                format!(
                    "Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}.",
                    iso(now),
                    nbf.or(iat).map(iso).unwrap_or_else(|| "-".into()),
                    iso(exp)
                ),
            ));
        }
        Ok(())
    }

    /// Checks a `client_assertion` sent for `client_id` to `token_url`: a certificate assertion
    /// when it was issued by the app itself, else a federated token.
    pub(super) fn check(
        &mut self,
        assertion: &str,
        client_id: &str,
        token_url: &str,
    ) -> Result<(), Refusal> {
        let parts: Vec<&str> = assertion.trim().split('.').collect();
        let [h, c, sig] = parts[..] else {
            return Err(malformed("The assertion does not have three parts."));
        };
        let (Some(header), Some(claims)) = (b64url_json(h), b64url_json(c)) else {
            return Err(malformed(
                "The header or claims are not base64url JSON objects.",
            ));
        };
        let alg = match header.get("alg").and_then(Value::as_str) {
            Some("PS256") => Algorithm::PS256,
            Some("RS256") => Algorithm::RS256,
            other => {
                return Err(malformed(&format!(
                    "'{}' is not a supported signature algorithm.",
                    other.unwrap_or("none")
                )))
            }
        };
        let message = format!("{h}.{c}");
        let verified = |key: &DecodingKey| {
            jsonwebtoken::crypto::verify(sig, message.as_bytes(), key, alg).unwrap_or(false)
        };
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let kind = if iss.eq_ignore_ascii_case(client_id) {
            self.check_certificate(&header, &claims, client_id, token_url, verified)?;
            "certificate"
        } else {
            self.check_federated(&claims, iss, verified)?;
            "federated"
        };
        self.last = Some(json!({ "kind": kind, "header": header, "claims": claims }));
        Ok(())
    }

    fn check_certificate(
        &mut self,
        header: &Value,
        claims: &Value,
        client_id: &str,
        token_url: &str,
        verified: impl Fn(&DecodingKey) -> bool,
    ) -> Result<(), Refusal> {
        let by = |field: &str| header.get(field).and_then(Value::as_str);
        let (thumbprint, cert) = match (by("x5t#S256"), by("x5t")) {
            (Some(t), _) => (t, self.certificates.iter().find(|c| c.x5t_s256 == t)),
            (None, Some(t)) => (t, self.certificates.iter().find(|c| c.x5t == t)),
            (None, None) => {
                return Err(refuse(401, "invalid_client", 700027, "Client assertion failed signature validation. [Reason - The header has neither 'x5t#S256' nor 'x5t'; the certificate cannot be identified.]"))
            }
        };
        let Some(cert) = cert else {
            return Err(refuse(
                401,
                "invalid_client",
                700027,
                format!(
                    "The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}', Please visit the Azure Portal, Graph Explorer or directly use MS Graph to see configured keys for app Id '{client_id}'.]"
                ),
            ));
        };
        if !verified(&cert.key) {
            return Err(refuse(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation.",
            ));
        }
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
        if !sub.eq_ignore_ascii_case(client_id) {
            return Err(refuse(
                401,
                "invalid_client",
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter. Review the documentation at https://docs.microsoft.com/en-us/azure/active-directory/develop/active-directory-certificate-credentials .",
            ));
        }
        let auds = audiences(claims);
        if !auds.iter().any(|a| a.eq_ignore_ascii_case(token_url)) {
            return Err(refuse(
                401,
                "invalid_client",
                50013,
                format!(
                    "Assertion audience claim does not match the required value. The audience in the assertion was '{}' and the expected audience is '{token_url}'.",
                    auds.join(", ")
                ),
            ));
        }
        self.check_lifetime(claims)?;
        let Some(jti) = claims
            .get("jti")
            .and_then(Value::as_str)
            .filter(|j| !j.is_empty())
        else {
            return Err(malformed("The assertion has no 'jti' claim."));
        };
        let now = self.now();
        self.seen_jti
            .retain(|_, exp| *exp > now - ASSERTION_SKEW_SECS);
        if self.seen_jti.contains_key(jti) {
            return Err(refuse(
                401,
                "invalid_client",
                50013,
                format!("Assertion is invalid: the client assertion with jti '{jti}' was already used. Send a new assertion with a new jti for every request."),
            ));
        }
        let exp = claims.get("exp").and_then(Value::as_i64).unwrap_or(now);
        self.seen_jti.insert(jti.to_string(), exp);
        Ok(())
    }

    fn check_federated(
        &self,
        claims: &Value,
        iss: &str,
        verified: impl Fn(&DecodingKey) -> bool,
    ) -> Result<(), Refusal> {
        let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
        let auds = audiences(claims);
        let no_match = |code: u32, what: &str, value: &str| {
            refuse(
                400,
                "invalid_request",
                code,
                format!("No matching federated identity record found for presented assertion{what}{value}. Please check your federated identity credential Subject, Audience and Issuer against the presented assertion. https://docs.microsoft.com/en-us/azure/active-directory/develop/workload-identity-federation"),
            )
        };
        if self.federated.is_empty() {
            return Err(no_match(
                70021,
                "",
                &format!(". Assertion Issuer: '{iss}'. Assertion Subject: '{sub}'"),
            ));
        }
        let same_issuer: Vec<&TrustedFederation> = self
            .federated
            .iter()
            .filter(|f| f.credential.issuer == iss)
            .collect();
        if same_issuer.is_empty() {
            return Err(no_match(700211, " issuer ", &format!("'{iss}'")));
        }
        if !same_issuer.iter().any(|f| verified(&f.key)) {
            return Err(refuse(
                401,
                "invalid_client",
                700027,
                "Client assertion failed signature validation.",
            ));
        }
        self.check_lifetime(claims)?;
        let same_subject: Vec<&&TrustedFederation> = same_issuer
            .iter()
            .filter(|f| f.credential.subject == sub)
            .collect();
        if same_subject.is_empty() {
            return Err(no_match(700213, " subject ", &format!("'{sub}'")));
        }
        if !same_subject
            .iter()
            .any(|f| auds.contains(&f.credential.audience))
        {
            return Err(no_match(
                700212,
                " audience ",
                &format!("'{}'", auds.join(", ")),
            ));
        }
        Ok(())
    }
}

/// Signs `claims` as an RS256 JWT with `key_pem`: a stand-in for a Kubernetes projected service
/// account token (use `keys::KUBE_ISSUER_KEY_PEM` and [`TEST_KUBE_ISSUER`]). Empty when the key
/// is unusable.
pub fn sign_federated_token(key_pem: &str, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("sim-kube-issuer-1".into());
    EncodingKey::from_rsa_pem(key_pem.as_bytes())
        .and_then(|k| jsonwebtoken::encode(&header, claims, &k))
        .unwrap_or_default()
}

impl GraphSim {
    /// Registers a certificate (PEM) on the app, as an upload under Certificates & secrets does.
    /// Client assertions signed by its key are then accepted.
    pub fn add_app_certificate(&self, cert_pem: &str) -> Result<(), String> {
        let (x5t_s256, x5t) =
            thumbprints(cert_pem).ok_or("not a PEM certificate (BEGIN CERTIFICATE)")?;
        let key = DecodingKey::from_rsa_pem(cert_pem.as_bytes())
            .map_err(|e| format!("not an RSA certificate: {e}"))?;
        self.shared
            .lock()
            .app_credentials
            .certificates
            .push(RegisteredCertificate { x5t_s256, x5t, key });
        Ok(())
    }

    /// Adds a federated identity credential to the app (workload identity federation).
    pub fn add_federated_credential(&self, credential: FederatedCredential) -> Result<(), String> {
        let key = DecodingKey::from_rsa_pem(credential.issuer_key_pem.as_bytes())
            .map_err(|e| format!("issuer_key_pem is not an RSA public key: {e}"))?;
        self.shared
            .lock()
            .app_credentials
            .federated
            .push(TrustedFederation { credential, key });
        Ok(())
    }

    /// Moves the token endpoint's clock (for assertion lifetimes only) by `secs`, e.g. 3600 to
    /// act as if this machine's clock were an hour behind.
    pub fn set_token_clock_offset_secs(&self, secs: i64) {
        self.shared.lock().app_credentials.clock_offset_secs = secs;
    }

    /// The last client assertion the token endpoint accepted:
    /// `{"kind": "certificate" | "federated", "header": {...}, "claims": {...}}`.
    pub fn last_client_assertion(&self) -> Option<Value> {
        self.shared.lock().app_credentials.last.clone()
    }
}
