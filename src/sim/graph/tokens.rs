//! `validationTokens` (graph.md section 5) and the identity-platform metadata that publishes
//! their signing key: `{login}/common/v2.0/.well-known/openid-configuration` (and the v1
//! `{login}/common/.well-known/openid-configuration`) pointing to
//! `{login}/common/discovery/v2.0/keys` (and v1 `{login}/common/discovery/keys`).

use actix_web::{HttpRequest, HttpResponse};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use super::{GraphSim, Shared, TokenForgery};
use crate::sim::keys;

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
