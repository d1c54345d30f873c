//! The Microsoft identity platform's token endpoint (client credentials: a secret, a client
//! assertion or a federated token) and its AADSTS errors.

use super::*;

pub(super) fn aad_error(
    req: &HttpRequest,
    status: u16,
    error: &str,
    code: u32,
    description: &str,
) -> HttpResponse {
    let trace_id = uuid::Uuid::new_v4().to_string();
    let correlation_id = req
        .headers()
        .get("client-request-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| uuid::Uuid::parse_str(v).ok())
        .map(|u| u.to_string())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let timestamp = chrono::Utc::now().format("%Y-%m-%d %H:%M:%SZ").to_string();
    let body = json!({
        "error": error,
        "error_description": format!(
            "AADSTS{code}: {description} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"
        ),
        "error_codes": [code],
        "timestamp": timestamp,
        "trace_id": trace_id,
        "correlation_id": correlation_id,
    });
    HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST))
        .insert_header(("Content-Type", TOKEN_JSON))
        .insert_header(("Cache-Control", "no-store, no-cache"))
        .insert_header(("Pragma", "no-cache"))
        .body(serde_json::to_vec(&body).unwrap_or_default())
}

/// `(client_id, client_secret)` from an `Authorization: Basic` header (RFC 6749 2.3.1: both
/// form-urlencoded before base64).
pub(super) fn basic_credentials(req: &HttpRequest) -> Option<(String, String)> {
    let v = req.headers().get("authorization")?.to_str().ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = b64_decode(rest.trim())?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    let dec = |s: &str| -> String {
        url::form_urlencoded::parse(format!("x={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    Some((dec(id), dec(secret)))
}

pub(super) fn token_endpoint(
    sim: &Shared,
    req: &HttpRequest,
    tenant_raw: &str,
    body: &[u8],
) -> HttpResponse {
    let tenant = percent_encoding::percent_decode_str(tenant_raw)
        .decode_utf8_lossy()
        .into_owned();
    let mut s = sim.lock();
    s.count("token");
    if req.method() != actix_web::http::Method::POST {
        return aad_error(
            req,
            400,
            "invalid_request",
            900561,
            &format!(
                "The endpoint only accepts POST requests. Received a {} request.",
                req.method()
            ),
        );
    }
    if !tenant.eq_ignore_ascii_case(&s.tenant_id) {
        return aad_error(
            req,
            400,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud. Check with your subscription administrator, this may happen if there are no active subscriptions for the tenant."
            ),
        );
    }
    let mut form: HashMap<String, String> = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(body) {
        form.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    let missing = |p: &str| {
        aad_error(
            req,
            400,
            "invalid_request",
            900144,
            &format!("The request body must contain the following parameter: '{p}'."),
        )
    };
    let Some(grant_type) = form.get("grant_type") else {
        return missing("grant_type");
    };
    if grant_type != "client_credentials" {
        return aad_error(
            req,
            400,
            "unsupported_grant_type",
            70003,
            &format!("The app requested an unsupported grant type '{grant_type}'."),
        );
    }
    let basic = basic_credentials(req);
    let client_id = match (&basic, form.get("client_id")) {
        (Some((b, _)), Some(f)) if b != f => {
            return aad_error(
                req,
                400,
                "invalid_request",
                900144,
                "The client_id in the Authorization header does not match the client_id in the request body.",
            )
        }
        (Some((b, _)), _) => b.clone(),
        (None, Some(f)) => f.clone(),
        (None, None) => return missing("client_id"),
    };
    if !client_id.eq_ignore_ascii_case(&s.client_id) {
        return aad_error(
            req,
            400,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{client_id}' was not found in the directory '{tenant}'. This can happen if the application has not been installed by the administrator of the tenant or consented to by any user in the tenant. You may have sent your authentication request to the wrong tenant."
            ),
        );
    }
    let secret = basic
        .as_ref()
        .map(|(_, sec)| sec.clone())
        .or_else(|| form.get("client_secret").cloned());
    match (secret, form.get("client_assertion")) {
        (Some(_), Some(_)) => {
            return aad_error(
                req,
                400,
                "invalid_request",
                90014,
                "The request must contain either 'client_secret' or 'client_assertion', not both.",
            );
        }
        (None, Some(assertion)) => {
            match form.get("client_assertion_type").map(String::as_str) {
                None => return missing("client_assertion_type"),
                Some(t) if t != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" => {
                    return aad_error(
                        req,
                        400,
                        "invalid_request",
                        90014,
                        &format!("The 'client_assertion_type' '{t}' is not supported; use 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer'."),
                    );
                }
                Some(_) => {}
            }
            let token_url = format!("{}/{}/oauth2/v2.0/token", sim.base_url, s.tenant_id);
            let client_id = s.client_id.clone();
            if let Err(r) = s.app_credentials.check(assertion, &client_id, &token_url) {
                return aad_error(req, r.status, r.error, r.code, &r.description);
            }
        }
        (None, None) => {
            return aad_error(
                req,
                401,
                "invalid_client",
                7000218,
                "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
            );
        }
        (Some(sec), None) if sec != s.client_secret => {
            return aad_error(
                req,
                401,
                "invalid_client",
                7000215,
                &format!(
                    "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
                    s.client_id
                ),
            );
        }
        (Some(_), None) => {}
    }
    let Some(scope) = form.get("scope") else {
        return missing("scope");
    };
    let scope_ok = !scope.trim().is_empty()
        && !scope.trim().contains(' ')
        && scope.trim().ends_with("/.default")
        && scope.trim().len() > "/.default".len();
    if !scope_ok {
        return aad_error(
            req,
            400,
            "invalid_scope",
            70011,
            &format!(
                "The provided request must include a 'scope' input parameter. The provided value for the input parameter 'scope' is not valid. The scope {scope} is not valid."
            ),
        );
    }
    s.prune_tokens();
    let lifetime = s.token_lifetime_secs;
    let token = new_access_token();
    s.tokens.insert(
        token.clone(),
        Instant::now() + Duration::from_secs(lifetime),
    );
    let body = json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": token,
    });
    HttpResponse::Ok()
        .insert_header(("Content-Type", TOKEN_JSON))
        .insert_header(("Cache-Control", "no-store, no-cache"))
        .insert_header(("Pragma", "no-cache"))
        .body(serde_json::to_vec(&body).unwrap_or_default())
}

/// Random opaque bearer token (three dot-separated base64url parts, like a JWT, but meaningless).
pub(super) fn new_access_token() -> String {
    let mut parts = Vec::new();
    for len in [24usize, 96, 48] {
        let mut bytes = vec![0u8; len];
        rand::rng().fill(bytes.as_mut_slice());
        parts.push(b64_encode(&bytes, B64_URL, false));
    }
    parts.join(".")
}
