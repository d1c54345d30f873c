//! Validation of the `validationTokens` JWTs that Microsoft Graph attaches to change and lifecycle
//! notifications (docs/graph.md, Notifications; docs/security.md).
//!
//! Every token in a notification batch must pass; one failure rejects the batch. A token passes
//! when all of these hold:
//! - it is at most [`MAX_TOKEN_BYTES`] long and the batch has at most [`MAX_TOKENS`] tokens
//!   (checked before anything is parsed or fetched);
//! - its header says `alg: RS256` (no `none`, no HMAC, no other RSA variant) and names a `kid`;
//! - the signature verifies with the RSA key of that `kid` from the Microsoft identity platform
//!   key set (JWKS), which [`JwksCache`] fetches and caches; keys embedded in the token
//!   (`jwk`, `jku`, `x5u`, `x5c`) are ignored;
//! - `exp` and `nbf` are present and hold with [`LEEWAY_SECS`] of clock skew;
//! - `aud` is one of our client ids;
//! - `ver` is `1.0` or `2.0`, and `iss` is an issuer of that version of the configured
//!   [`Cloud`] for our tenant (e.g. `https://sts.windows.net/{tenant}/` and
//!   `https://login.microsoftonline.com/{tenant}/v2.0` in the global cloud);
//! - `tid` is our tenant (GUIDs compared case-insensitively);
//! - the publisher (`appid` for `ver` 1.0, `azp` for 2.0) is Microsoft Graph Change Tracking,
//!   [`GRAPH_CHANGE_TRACKING_APP_ID`].
//!
//! Error messages never contain a token; the most they echo is a (sanitized, truncated) `kid`,
//! `alg` or `ver` value from a token.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use url::Url;

/// Application id of "Microsoft Graph Change Tracking", the publisher of validation tokens.
pub(crate) const GRAPH_CHANGE_TRACKING_APP_ID: &str = "0bf30f3b-4a52-48df-9a82-234910c4a086";
/// Most tokens accepted in one notification batch.
pub(crate) const MAX_TOKENS: usize = 50;
/// Longest token accepted, in bytes.
pub(crate) const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Largest key-set response body accepted, in bytes.
pub(crate) const MAX_JWKS_BYTES: usize = 256 * 1024;
/// How long a fetched key set is trusted before it is fetched again.
pub(crate) const KEYS_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Least time between two key-set fetches (successful or not).
pub(crate) const MIN_REFRESH_INTERVAL: Duration = Duration::from_secs(60);
/// Clock skew allowed on `exp` and `nbf`, in seconds.
pub(crate) const LEEWAY_SECS: u64 = 5 * 60;
/// Time limit for one key-set fetch (connect to end of body).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// What a validation token must say to be ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenExpectation {
    /// Accepted `aud` values: the application (client) ids that own the subscriptions.
    pub client_ids: Vec<String>,
    /// Our Entra ID tenant id (GUID); `tid` and the issuer must name it.
    pub tenant_id: String,
    /// The cloud whose issuers are accepted.
    pub cloud: Cloud,
}

/// The Microsoft cloud an integration signs in to, told by the host of its `login_url`. It
/// pins where validation-token signing keys come from and which issuers are accepted
/// (Microsoft identity platform: national clouds, token issuers by cloud and version).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cloud {
    /// `login.microsoftonline.com`.
    Global,
    /// Azure Government (`login.microsoftonline.us`; GCC High and DoD).
    UsGovernment,
    /// Microsoft Azure operated by 21Vianet (`login.chinacloudapi.cn`).
    China,
    /// Any other host (a simulator, a test server): keys from `{login_url}/common/discovery/
    /// v2.0/keys`, issuers `https://sts.windows.net/{tenant}/` (v1) and
    /// `{login_url}/{tenant}/v2.0` (v2). Not pinned; `serve` says so at start.
    Other(Url),
}

impl Cloud {
    pub(crate) fn from_login_url(login: &Url) -> Cloud {
        match login.host_str().map(|h| h.to_ascii_lowercase()).as_deref() {
            Some("login.microsoftonline.com") | Some("login.windows.net") => Cloud::Global,
            Some("login.microsoftonline.us") => Cloud::UsGovernment,
            Some("login.chinacloudapi.cn") | Some("login.partner.microsoftonline.cn") => {
                Cloud::China
            }
            _ => Cloud::Other(login.clone()),
        }
    }

    /// Whether the key set and issuers are Microsoft's fixed ones for this cloud.
    pub(crate) fn pinned(&self) -> bool {
        !matches!(self, Cloud::Other(_))
    }

    fn login_root(&self) -> String {
        match self {
            Cloud::Global => "https://login.microsoftonline.com".into(),
            Cloud::UsGovernment => "https://login.microsoftonline.us".into(),
            Cloud::China => "https://login.chinacloudapi.cn".into(),
            Cloud::Other(u) => u.as_str().trim_end_matches('/').to_string(),
        }
    }

    /// The key set (JWKS) that signs this cloud's tokens.
    pub(crate) fn keys_url(&self) -> Result<Url, url::ParseError> {
        Url::parse(&format!("{}/common/discovery/v2.0/keys", self.login_root()))
    }

    /// The issuers accepted for a token of version `ver` from `tenant`.
    fn issuers(&self, ver: &str, tenant: &str) -> Vec<String> {
        match (ver, self) {
            ("1.0", Cloud::China) => vec![format!("https://sts.chinacloudapi.cn/{tenant}/")],
            ("1.0", _) => vec![format!("https://sts.windows.net/{tenant}/")],
            (_, Cloud::China) => vec![
                format!("https://login.partner.microsoftonline.cn/{tenant}/v2.0"),
                format!("https://login.chinacloudapi.cn/{tenant}/v2.0"),
            ],
            (_, cloud) => vec![format!("{}/{tenant}/v2.0", cloud.login_root())],
        }
    }
}

/// Why a batch of validation tokens was rejected. Messages never include a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the notification carries no validation tokens")]
    Missing,
    #[error("the notification carries {count} validation tokens (at most {max} are accepted)")]
    TooMany { count: usize, max: usize },
    #[error("validation token #{index} is {len} bytes long (at most {max} are accepted)")]
    TooLarge {
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("malformed validation token: {0}")]
    Malformed(String),
    #[error("validation token uses alg {alg:?}; only RS256 is accepted")]
    UnsupportedAlgorithm { alg: String },
    #[error("validation token is signed with key id {kid:?}, which is not in the Microsoft identity platform key set")]
    UnknownKey { kid: String },
    #[error("validation token signature does not verify")]
    BadSignature,
    #[error("validation token has expired (exp is more than 5 minutes in the past)")]
    Expired,
    #[error("validation token is not valid yet (nbf is more than 5 minutes in the future)")]
    NotYetValid,
    #[error("validation token lacks the `{0}` claim")]
    MissingClaim(String),
    #[error("validation token has ver {ver:?}; only \"1.0\" and \"2.0\" are understood")]
    UnsupportedVersion { ver: String },
    #[error("validation token audience (aud) is not one of our client ids")]
    Audience,
    #[error("validation token issuer (iss) is not the Entra ID issuer of our tenant for its ver")]
    Issuer,
    #[error("validation token tenant (tid) is not our tenant")]
    Tenant,
    #[error("validation token was not published by Microsoft Graph Change Tracking (appid/azp)")]
    Publisher,
    #[error("cannot load the Microsoft identity platform signing keys: {0}")]
    KeyFetch(String),
}

/// The Microsoft identity platform signing keys (`kid` → RSA public key), fetched on demand and
/// cached.
///
/// - A key set is trusted for [`KEYS_TTL`]; after that the next lookup fetches it again.
/// - A `kid` not in the set triggers a fetch, but fetches (successful or failed) happen at most
///   once per [`MIN_REFRESH_INTERVAL`]; within it an unknown `kid` is simply
///   [`TokenError::UnknownKey`], so a flood of tokens with made-up kids cannot hammer the endpoint.
/// - Concurrent callers that need a fetch wait for one shared fetch.
/// - If the set has expired and cannot be fetched again, lookups fail ([`TokenError::KeyFetch`]):
///   stale keys are not used.
///
/// Cloning is cheap and clones share the cache.
#[derive(Clone)]
pub struct JwksCache {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    url: Url,
    ttl: Duration,
    min_refresh_interval: Duration,
    /// The current key set; read without waiting on a fetch in progress.
    keys: RwLock<Option<KeySet>>,
    /// Held by the one caller that fetches; the others queue on it and then re-check `keys`.
    refresh: tokio::sync::Mutex<RefreshState>,
}

#[derive(Clone)]
struct KeySet {
    keys: Arc<HashMap<String, DecodingKey>>,
    fetched_at: Instant,
}

#[derive(Default)]
struct RefreshState {
    last_attempt: Option<Instant>,
    last_error: Option<String>,
}

impl fmt::Debug for JwksCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.current().map(|set| set.keys.len());
        f.debug_struct("JwksCache")
            .field("url", &self.inner.url.as_str())
            .field("cached_keys", &keys)
            .finish()
    }
}

impl JwksCache {
    /// `jwks_url` is the key-set endpoint of the cloud's login host, e.g.
    /// `https://login.microsoftonline.com/common/discovery/v2.0/keys`. Nothing is fetched until a
    /// token needs a key.
    pub fn new(http: reqwest::Client, jwks_url: Url) -> Self {
        Self::with_timings(http, jwks_url, KEYS_TTL, MIN_REFRESH_INTERVAL)
    }

    fn with_timings(
        http: reqwest::Client,
        url: Url,
        ttl: Duration,
        min_refresh_interval: Duration,
    ) -> Self {
        JwksCache {
            inner: Arc::new(Inner {
                http,
                url,
                ttl,
                min_refresh_interval,
                keys: RwLock::new(None),
                refresh: tokio::sync::Mutex::new(RefreshState::default()),
            }),
        }
    }

    /// A cache that already holds `keys` and will not fetch (for fuzzing: no network).
    #[cfg(test)]
    pub(crate) fn preloaded(keys: HashMap<String, DecodingKey>) -> Self {
        let url = Url::parse("http://127.0.0.1:9/common/discovery/v2.0/keys").expect("url");
        let cache = Self::with_timings(
            reqwest::Client::new(),
            url,
            KEYS_TTL,
            Duration::from_secs(24 * 3600),
        );
        *cache.inner.keys.write().unwrap() = Some(KeySet {
            keys: Arc::new(keys),
            fetched_at: Instant::now(),
        });
        cache.inner.refresh.try_lock().unwrap().last_attempt = Some(Instant::now());
        cache
    }

    /// Checks every token of a notification's `validationTokens` against `expect`; the first
    /// failure is returned. An empty list is [`TokenError::Missing`]: the caller decides whether
    /// tokens were required. Sizes and count are checked before any token is parsed or any key
    /// fetched.
    pub async fn verify(
        &self,
        tokens: &[String],
        expect: &TokenExpectation,
    ) -> Result<(), TokenError> {
        if tokens.is_empty() {
            return Err(TokenError::Missing);
        }
        if tokens.len() > MAX_TOKENS {
            return Err(TokenError::TooMany {
                count: tokens.len(),
                max: MAX_TOKENS,
            });
        }
        if let Some((index, token)) = tokens
            .iter()
            .enumerate()
            .find(|(_, t)| t.len() > MAX_TOKEN_BYTES)
        {
            return Err(TokenError::TooLarge {
                index,
                len: token.len(),
                max: MAX_TOKEN_BYTES,
            });
        }
        for (index, token) in tokens.iter().enumerate() {
            if let Err(e) = self.verify_one(token, expect).await {
                tracing::debug!(index, error = %e, "validation token rejected");
                return Err(e);
            }
        }
        Ok(())
    }

    async fn verify_one(&self, token: &str, expect: &TokenExpectation) -> Result<(), TokenError> {
        let header = parse_header(token)?;
        if header.alg != "RS256" {
            return Err(TokenError::UnsupportedAlgorithm {
                alg: sanitize(&header.alg, 16),
            });
        }
        if header.crit.is_some() {
            return Err(TokenError::Malformed(
                "the header has a `crit` parameter, which is not supported".into(),
            ));
        }
        let kid = match header.kid {
            Some(kid) if !kid.is_empty() => kid,
            _ => return Err(TokenError::Malformed("the header names no `kid`".into())),
        };
        let key = self.key(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = LEEWAY_SECS;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_required_spec_claims(&["exp", "nbf", "aud", "iss"]);
        let client_ids: Vec<&str> = expect
            .client_ids
            .iter()
            .map(|c| c.trim())
            .filter(|c| !c.is_empty())
            .collect();
        // An empty list leaves an empty accepted set, which rejects every audience.
        validation.set_audience(&client_ids);

        // Signature first, then exp/nbf/aud (jsonwebtoken's order); our own checks after that.
        let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
            .map_err(|e| map_jwt_error(e.into_kind()))?
            .claims;
        check_claims(&claims, expect)
    }

    /// The key for `kid`, fetching the key set when it is absent, expired or lacks `kid`
    /// (subject to the refresh interval).
    async fn key(&self, kid: &str) -> Result<DecodingKey, TokenError> {
        if let Some(key) = self.fresh_key(kid) {
            return Ok(key);
        }
        let mut state = self.inner.refresh.lock().await;
        // Whoever held the lock before us may have fetched what we need.
        if let Some(key) = self.fresh_key(kid) {
            return Ok(key);
        }
        let allowed = state
            .last_attempt
            .is_none_or(|t| t.elapsed() >= self.inner.min_refresh_interval);
        if allowed {
            // Recorded before the fetch, so a cancelled fetch still counts against the limit.
            state.last_attempt = Some(Instant::now());
            match self.fetch().await {
                Ok(keys) => {
                    tracing::info!(url = %self.inner.url, keys = keys.len(), "loaded token signing keys");
                    *self.inner.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(KeySet {
                        keys: Arc::new(keys),
                        fetched_at: Instant::now(),
                    });
                    state.last_error = None;
                }
                Err(message) => {
                    tracing::warn!(url = %self.inner.url, error = %message, "cannot load token signing keys");
                    state.last_error = Some(message.clone());
                    return Err(TokenError::KeyFetch(message));
                }
            }
        }
        let last_error = state.last_error.clone();
        drop(state);
        match self.current() {
            Some(set) if set.fetched_at.elapsed() < self.inner.ttl => set
                .keys
                .get(kid)
                .cloned()
                .ok_or_else(|| TokenError::UnknownKey {
                    kid: sanitize(kid, 64),
                }),
            _ => Err(TokenError::KeyFetch(last_error.unwrap_or_else(|| {
                "no current key set, and the last fetch was too recent to try again".into()
            }))),
        }
    }

    fn current(&self) -> Option<KeySet> {
        self.inner
            .keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn fresh_key(&self, kid: &str) -> Option<DecodingKey> {
        let set = self.current()?;
        if set.fetched_at.elapsed() >= self.inner.ttl {
            return None;
        }
        set.keys.get(kid).cloned()
    }

    /// One GET of the key set. Errors are messages for [`TokenError::KeyFetch`].
    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, String> {
        let url = &self.inner.url;
        let mut response = self
            .inner
            .http
            .get(url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(FETCH_TIMEOUT)
            .send()
            .await
            .map_err(|e| format!("cannot reach {url}: {}", error_chain(&e)))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(format!("{url} answered HTTP {status}"));
        }
        let too_large = || format!("the key set from {url} is larger than {MAX_JWKS_BYTES} bytes");
        if response
            .content_length()
            .is_some_and(|len| len > MAX_JWKS_BYTES as u64)
        {
            return Err(too_large());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| format!("reading the key set from {url}: {}", error_chain(&e)))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        let doc: JwksDocument = serde_json::from_slice(&body)
            .map_err(|e| format!("{url} did not answer with a JSON key set: {e}"))?;
        let total = doc.keys.len();
        let keys: HashMap<String, DecodingKey> =
            doc.keys.into_iter().filter_map(usable_rsa_key).collect();
        if keys.is_empty() {
            return Err(format!(
                "the key set from {url} has no usable RSA signing keys ({total} keys listed)"
            ));
        }
        Ok(keys)
    }
}

#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

/// `(kid, key)` for an RSA signing key; `None` (skipped) for anything else.
fn usable_rsa_key(value: serde_json::Value) -> Option<(String, DecodingKey)> {
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if jwk.kty != "RSA"
        || jwk.use_.as_deref().is_some_and(|u| u != "sig")
        || jwk.alg.as_deref().is_some_and(|a| a != "RS256")
    {
        return None;
    }
    let kid = jwk.kid.filter(|k| !k.is_empty())?;
    match DecodingKey::from_rsa_components(jwk.n.as_deref()?, jwk.e.as_deref()?) {
        Ok(key) => Some((kid, key)),
        Err(e) => {
            tracing::warn!(kid = %sanitize(&kid, 64), error = %e, "skipping an unreadable RSA key in the key set");
            None
        }
    }
}

/// The header fields we look at, parsed leniently so that `alg: "none"` or an unknown algorithm
/// is reported as such rather than as a malformed header.
#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

fn parse_header(token: &str) -> Result<RawHeader, TokenError> {
    let malformed = |what: &str| TokenError::Malformed(what.to_string());
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not three dot-separated parts (compact JWS)"));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| malformed("the header is not base64url"))?;
    serde_json::from_slice(&bytes)
        .map_err(|_| malformed("the header is not a JSON object with `alg`"))
}

/// The claims checked here; `exp`, `nbf` and `aud` are checked by jsonwebtoken.
#[derive(Deserialize)]
struct Claims {
    ver: Option<String>,
    iss: Option<String>,
    tid: Option<String>,
    appid: Option<String>,
    azp: Option<String>,
}

fn check_claims(claims: &Claims, expect: &TokenExpectation) -> Result<(), TokenError> {
    let tenant = expect.tenant_id.trim();
    if tenant.is_empty() {
        // A misconfiguration; never let an empty tenant match an empty `tid`.
        return Err(TokenError::Tenant);
    }
    let missing = |claim: &str| TokenError::MissingClaim(claim.to_string());
    let ver = claims.ver.as_deref().ok_or_else(|| missing("ver"))?;
    let (publisher_claim, publisher) = match ver {
        "1.0" => ("appid", claims.appid.as_deref()),
        "2.0" => ("azp", claims.azp.as_deref()),
        other => {
            return Err(TokenError::UnsupportedVersion {
                ver: sanitize(other, 16),
            })
        }
    };
    let iss = claims.iss.as_deref().ok_or_else(|| missing("iss"))?;
    if !expect
        .cloud
        .issuers(ver, tenant)
        .iter()
        .any(|i| iss.eq_ignore_ascii_case(i))
    {
        return Err(TokenError::Issuer);
    }
    let tid = claims.tid.as_deref().ok_or_else(|| missing("tid"))?;
    if !tid.eq_ignore_ascii_case(tenant) {
        return Err(TokenError::Tenant);
    }
    let publisher = publisher.ok_or_else(|| missing(publisher_claim))?;
    if !publisher.eq_ignore_ascii_case(GRAPH_CHANGE_TRACKING_APP_ID) {
        return Err(TokenError::Publisher);
    }
    Ok(())
}

fn map_jwt_error(kind: ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature | ErrorKind::InvalidRsaKey(_) => TokenError::BadSignature,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidAudience => TokenError::Audience,
        ErrorKind::InvalidIssuer => TokenError::Issuer,
        ErrorKind::MissingRequiredClaim(claim) => TokenError::MissingClaim(sanitize(&claim, 16)),
        ErrorKind::InvalidClaimFormat(claim) => TokenError::Malformed(format!(
            "the `{}` claim has the wrong type",
            sanitize(&claim, 16)
        )),
        ErrorKind::InvalidAlgorithm => {
            TokenError::Malformed("the algorithm does not match the key".into())
        }
        // Base64, JSON and UTF-8 errors can quote bits of the token: give a fixed text instead.
        _ => TokenError::Malformed("not a well-formed signed JWT".into()),
    }
}

/// A token-supplied string made safe for messages and logs: printable ASCII only, truncated.
fn sanitize(value: &str, max_chars: usize) -> String {
    let mut out: String = value
        .chars()
        .take(max_chars)
        .map(|c| if c.is_ascii_graphic() { c } else { '?' })
        .collect();
    if value.chars().count() > max_chars {
        out.push('…');
    }
    out
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use rostersync_sim::keys::{
        FORGER_KEY_N, FORGER_KEY_PEM, KEY_E, SIGNING_KEY_N, SIGNING_KEY_PEM, SIGNING_KID,
    };
    use serde_json::{json, Value};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
    const OTHER_CLIENT_ID: &str = "99999999-8888-7777-6666-555555555555";
    const TENANT: &str = "7a4f1c2e-0b9d-4e6a-8c3f-2d1e5b6a7c8d";
    const OTHER_TENANT: &str = "00000000-1111-2222-3333-444444444444";

    // ---- a tiny JWKS server -------------------------------------------------------------

    #[derive(Clone)]
    struct Reply {
        status: u16,
        body: Vec<u8>,
        /// Send no Content-Length (body ends at connection close).
        omit_length: bool,
        delay: Duration,
    }

    impl Reply {
        fn json(doc: &Value) -> Reply {
            Reply {
                status: 200,
                body: serde_json::to_vec(doc).unwrap(),
                omit_length: false,
                delay: Duration::ZERO,
            }
        }
    }

    struct JwksServer {
        url: Url,
        hits: Arc<AtomicUsize>,
        reply: Arc<Mutex<Reply>>,
    }

    impl JwksServer {
        async fn start(reply: Reply) -> JwksServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let hits = Arc::new(AtomicUsize::new(0));
            let reply = Arc::new(Mutex::new(reply));
            let (hits2, reply2) = (hits.clone(), reply.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut conn, _)) = listener.accept().await else {
                        return;
                    };
                    let (hits, reply) = (hits2.clone(), reply2.clone());
                    tokio::spawn(async move {
                        let mut request = Vec::new();
                        let mut buf = [0u8; 4096];
                        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                            match conn.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => request.extend_from_slice(&buf[..n]),
                            }
                        }
                        hits.fetch_add(1, Ordering::SeqCst);
                        let reply = reply.lock().unwrap().clone();
                        tokio::time::sleep(reply.delay).await;
                        let mut head = format!(
                            "HTTP/1.1 {} Test\r\nContent-Type: application/json\r\nConnection: close\r\n",
                            reply.status
                        );
                        if !reply.omit_length {
                            head.push_str(&format!("Content-Length: {}\r\n", reply.body.len()));
                        }
                        head.push_str("\r\n");
                        let _ = conn.write_all(head.as_bytes()).await;
                        let _ = conn.write_all(&reply.body).await;
                        let _ = conn.shutdown().await;
                    });
                }
            });
            JwksServer {
                url: Url::parse(&format!("http://{addr}/common/discovery/v2.0/keys")).unwrap(),
                hits,
                reply,
            }
        }

        fn hits(&self) -> usize {
            self.hits.load(Ordering::SeqCst)
        }

        fn serve(&self, reply: Reply) {
            *self.reply.lock().unwrap() = reply;
        }

        fn cache(&self) -> JwksCache {
            JwksCache::new(http(), self.url.clone())
        }
    }

    fn http() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    fn rsa_jwk(kid: &str, n: &str) -> Value {
        json!({"kty": "RSA", "use": "sig", "kid": kid, "x5t": kid, "n": n, "e": KEY_E})
    }

    fn jwks(keys: &[Value]) -> Value {
        json!({ "keys": keys })
    }

    fn signing_jwks() -> Value {
        jwks(&[rsa_jwk(SIGNING_KID, SIGNING_KEY_N)])
    }

    async fn signing_server() -> JwksServer {
        JwksServer::start(Reply::json(&signing_jwks())).await
    }

    // ---- tokens -------------------------------------------------------------------------

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn expectation() -> TokenExpectation {
        TokenExpectation {
            client_ids: vec![CLIENT_ID.to_string()],
            tenant_id: TENANT.to_string(),
            cloud: Cloud::Global,
        }
    }

    fn claims_v1() -> Value {
        let now = now();
        json!({
            "aud": CLIENT_ID,
            "iss": format!("https://sts.windows.net/{TENANT}/"),
            "iat": now - 60, "nbf": now - 60, "exp": now + 86_400,
            "aio": "E2ZgYDi1", "appid": GRAPH_CHANGE_TRACKING_APP_ID, "appidacr": "2",
            "idp": format!("https://sts.windows.net/{TENANT}/"),
            "oid": "1e7d79fa-7893-4d50-bdde-164260d9c5ba",
            "sub": "1e7d79fa-7893-4d50-bdde-164260d9c5ba",
            "tid": TENANT, "ver": "1.0",
        })
    }

    fn claims_v2() -> Value {
        let now = now();
        json!({
            "aud": CLIENT_ID,
            "iss": format!("https://login.microsoftonline.com/{TENANT}/v2.0"),
            "iat": now - 60, "nbf": now - 60, "exp": now + 86_400,
            "azp": GRAPH_CHANGE_TRACKING_APP_ID, "azpacr": "2",
            "oid": "1e7d79fa-7893-4d50-bdde-164260d9c5ba",
            "sub": "1e7d79fa-7893-4d50-bdde-164260d9c5ba",
            "tid": TENANT, "ver": "2.0",
        })
    }

    fn with(mut claims: Value, changes: Value) -> Value {
        for (k, v) in changes.as_object().unwrap() {
            if v.is_null() {
                claims.as_object_mut().unwrap().remove(k);
            } else {
                claims[k] = v.clone();
            }
        }
        claims
    }

    fn sign_with(alg: Algorithm, kid: &str, pem: &str, claims: &Value) -> String {
        let mut header = Header::new(alg);
        header.typ = Some("JWT".into());
        header.kid = Some(kid.into());
        let key = EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap();
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    fn sign(claims: &Value) -> String {
        sign_with(Algorithm::RS256, SIGNING_KID, SIGNING_KEY_PEM, claims)
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Runs `verify`, expects an error, and checks that its message quotes no part of a token.
    async fn rejected(cache: &JwksCache, tokens: &[String]) -> TokenError {
        let err = cache
            .verify(tokens, &expectation())
            .await
            .expect_err("the tokens should be rejected");
        let message = err.to_string();
        for token in tokens.iter().filter(|t| !t.is_empty()) {
            assert!(
                !message.contains(token.as_str()),
                "message quotes a token: {message}"
            );
            for part in token.split('.').filter(|p| p.len() > 20) {
                assert!(
                    !message.contains(part),
                    "message quotes a token part: {message}"
                );
            }
        }
        err
    }

    // ---- accepted tokens ----------------------------------------------------------------

    #[tokio::test]
    async fn valid_v1_token_passes() {
        let server = signing_server().await;
        let cache = server.cache();
        cache
            .verify(&[sign(&claims_v1())], &expectation())
            .await
            .unwrap();
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn valid_v2_token_passes() {
        let server = signing_server().await;
        let cache = server.cache();
        cache
            .verify(&[sign(&claims_v2())], &expectation())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn tenant_guid_case_is_ignored_and_any_listed_client_id_is_accepted() {
        let server = signing_server().await;
        let cache = server.cache();
        let upper = TENANT.to_uppercase();
        let token = sign(&with(
            claims_v1(),
            json!({"tid": upper, "iss": format!("https://sts.windows.net/{upper}/"), "aud": OTHER_CLIENT_ID}),
        ));
        let expect = TokenExpectation {
            client_ids: vec![CLIENT_ID.into(), OTHER_CLIENT_ID.into()],
            tenant_id: TENANT.into(),
            cloud: Cloud::Global,
        };
        cache.verify(&[token], &expect).await.unwrap();
    }

    #[tokio::test]
    async fn known_kid_is_served_from_the_cache() {
        let server = signing_server().await;
        let cache = server.cache();
        let clone = cache.clone();
        let tokens = vec![sign(&claims_v1()), sign(&claims_v2()), sign(&claims_v1())];
        cache.verify(&tokens, &expectation()).await.unwrap();
        clone.verify(&tokens, &expectation()).await.unwrap();
        assert_eq!(
            server.hits(),
            1,
            "clones share one cache; a known kid needs no fetch"
        );
    }

    #[tokio::test]
    async fn exp_and_nbf_leeway_is_five_minutes() {
        let server = signing_server().await;
        let cache = server.cache();
        let now = now();
        let just_expired = sign(&with(
            claims_v1(),
            json!({"nbf": now - 3600, "exp": now - 240}),
        ));
        let almost_valid = sign(&with(claims_v1(), json!({"nbf": now + 240})));
        cache
            .verify(&[just_expired, almost_valid], &expectation())
            .await
            .unwrap();
    }

    // ---- rejected tokens ----------------------------------------------------------------

    #[tokio::test]
    async fn forged_signature_with_a_known_kid_is_rejected() {
        let server = signing_server().await;
        let cache = server.cache();
        let forged = sign_with(Algorithm::RS256, SIGNING_KID, FORGER_KEY_PEM, &claims_v1());
        assert_eq!(rejected(&cache, &[forged]).await, TokenError::BadSignature);
    }

    #[tokio::test]
    async fn tampered_payload_is_rejected() {
        let server = signing_server().await;
        let cache = server.cache();
        let good = sign(&claims_v1());
        let parts: Vec<&str> = good.split('.').collect();
        let other = with(claims_v1(), json!({"aud": OTHER_CLIENT_ID}));
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(other.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(
            rejected(&cache, &[tampered]).await,
            TokenError::BadSignature
        );
    }

    #[tokio::test]
    async fn expired_token_is_rejected() {
        let server = signing_server().await;
        let cache = server.cache();
        let now = now();
        let token = sign(&with(
            claims_v1(),
            json!({"iat": now - 90_000, "nbf": now - 90_000, "exp": now - 400}),
        ));
        assert_eq!(rejected(&cache, &[token]).await, TokenError::Expired);
    }

    #[tokio::test]
    async fn token_not_valid_yet_is_rejected() {
        let server = signing_server().await;
        let cache = server.cache();
        let token = sign(&with(claims_v1(), json!({"nbf": now() + 600})));
        assert_eq!(rejected(&cache, &[token]).await, TokenError::NotYetValid);
    }

    #[tokio::test]
    async fn wrong_audience_is_rejected() {
        let server = signing_server().await;
        let cache = server.cache();
        let token = sign(&with(claims_v2(), json!({"aud": OTHER_CLIENT_ID})));
        assert_eq!(rejected(&cache, &[token]).await, TokenError::Audience);
        let expect = TokenExpectation {
            client_ids: vec![],
            tenant_id: TENANT.into(),
            cloud: Cloud::Global,
        };
        let err = cache
            .verify(&[sign(&claims_v2())], &expect)
            .await
            .unwrap_err();
        assert_eq!(
            err,
            TokenError::Audience,
            "no client ids accepts no audience"
        );
    }

    #[tokio::test]
    async fn wrong_tenant_in_tid_is_rejected() {
        let server = signing_server().await;
        let cache = server.cache();
        let token = sign(&with(claims_v1(), json!({"tid": OTHER_TENANT})));
        assert_eq!(rejected(&cache, &[token]).await, TokenError::Tenant);
        // An empty configured tenant matches nothing, not even an empty tid and issuer.
        let empty = sign(&with(
            claims_v1(),
            json!({"tid": "", "iss": "https://sts.windows.net//"}),
        ));
        let expect = TokenExpectation {
            client_ids: vec![CLIENT_ID.into()],
            tenant_id: " ".into(),
            cloud: Cloud::Global,
        };
        assert_eq!(
            cache.verify(&[empty], &expect).await,
            Err(TokenError::Tenant)
        );
    }

    #[tokio::test]
    async fn wrong_issuer_is_rejected() {
        let server = signing_server().await;
        let cache = server.cache();
        // Another tenant's issuer.
        let other_tenant = sign(&with(
            claims_v1(),
            json!({"iss": format!("https://sts.windows.net/{OTHER_TENANT}/")}),
        ));
        assert_eq!(rejected(&cache, &[other_tenant]).await, TokenError::Issuer);
        // The v1 issuer form on a v2 token.
        let wrong_form = sign(&with(
            claims_v2(),
            json!({"iss": format!("https://sts.windows.net/{TENANT}/")}),
        ));
        assert_eq!(rejected(&cache, &[wrong_form]).await, TokenError::Issuer);
        // Another authority.
        let elsewhere = sign(&with(
            claims_v2(),
            json!({"iss": format!("https://login.example.com/{TENANT}/v2.0")}),
        ));
        assert_eq!(rejected(&cache, &[elsewhere]).await, TokenError::Issuer);
    }

    /// Each cloud accepts its own issuers and none of another cloud's; the key set is pinned to
    /// the cloud's login host.
    #[tokio::test]
    async fn issuers_and_keys_are_pinned_per_cloud() {
        let server = signing_server().await;
        let cache = server.cache();
        let v1 = |host: &str| {
            sign(&with(
                claims_v1(),
                json!({"iss": format!("https://{host}/{TENANT}/")}),
            ))
        };
        let v2 = |host: &str| {
            sign(&with(
                claims_v2(),
                json!({"iss": format!("https://{host}/{TENANT}/v2.0")}),
            ))
        };
        // One token per issuer: the public and US Government clouds share the v1 issuer, and two
        // tokens minted a second apart differ.
        let sts = v1("sts.windows.net");
        let cases = [
            (
                "https://login.microsoftonline.com",
                Cloud::Global,
                vec![sts.clone(), v2("login.microsoftonline.com")],
            ),
            (
                "https://login.microsoftonline.us/",
                Cloud::UsGovernment,
                vec![sts.clone(), v2("login.microsoftonline.us")],
            ),
            (
                "https://login.chinacloudapi.cn",
                Cloud::China,
                vec![
                    v1("sts.chinacloudapi.cn"),
                    v2("login.partner.microsoftonline.cn"),
                    v2("login.chinacloudapi.cn"),
                ],
            ),
        ];
        let mut all: Vec<String> = cases.iter().flat_map(|c| c.2.clone()).collect();
        all.sort();
        all.dedup();
        for (login, cloud, good) in &cases {
            let login = Url::parse(login).unwrap();
            assert_eq!(&Cloud::from_login_url(&login), cloud);
            assert!(cloud.pinned());
            assert_eq!(
                cloud.keys_url().unwrap().as_str(),
                format!(
                    "{}common/discovery/v2.0/keys",
                    login.as_str().trim_end_matches('/').to_string() + "/"
                )
            );
            let expect = TokenExpectation {
                cloud: cloud.clone(),
                ..expectation()
            };
            for t in &all {
                let ok = cache.verify(std::slice::from_ref(t), &expect).await;
                if good.contains(t) {
                    ok.unwrap();
                } else {
                    assert_eq!(ok, Err(TokenError::Issuer), "{cloud:?}");
                }
            }
        }
        let sim = Url::parse("http://127.0.0.1:9/").unwrap();
        let other = Cloud::from_login_url(&sim);
        assert!(!other.pinned());
        assert_eq!(
            other.keys_url().unwrap().as_str(),
            "http://127.0.0.1:9/common/discovery/v2.0/keys"
        );
        let expect = TokenExpectation {
            cloud: other,
            ..expectation()
        };
        cache
            .verify(&[v1("sts.windows.net")], &expect)
            .await
            .unwrap();
        assert_eq!(
            cache
                .verify(&[v2("login.microsoftonline.com")], &expect)
                .await,
            Err(TokenError::Issuer)
        );
    }

    #[tokio::test]
    async fn wrong_publisher_is_rejected() {
        let server = signing_server().await;
        let cache = server.cache();
        let v1 = sign(&with(claims_v1(), json!({"appid": OTHER_CLIENT_ID})));
        assert_eq!(rejected(&cache, &[v1]).await, TokenError::Publisher);
        // A v2 token is judged by azp, even when appid is right.
        let v2 = sign(&with(
            claims_v2(),
            json!({"azp": OTHER_CLIENT_ID, "appid": GRAPH_CHANGE_TRACKING_APP_ID}),
        ));
        assert_eq!(rejected(&cache, &[v2]).await, TokenError::Publisher);
        // A v1 token without appid.
        let missing = sign(&with(
            claims_v1(),
            json!({"appid": null, "azp": GRAPH_CHANGE_TRACKING_APP_ID}),
        ));
        assert_eq!(
            rejected(&cache, &[missing]).await,
            TokenError::MissingClaim("appid".into())
        );
    }

    #[tokio::test]
    async fn missing_or_unknown_version_and_missing_spec_claims_are_rejected() {
        let server = signing_server().await;
        let cache = server.cache();
        let no_ver = sign(&with(claims_v1(), json!({"ver": null})));
        assert_eq!(
            rejected(&cache, &[no_ver]).await,
            TokenError::MissingClaim("ver".into())
        );
        let v3 = sign(&with(claims_v1(), json!({"ver": "3.0"})));
        assert_eq!(
            rejected(&cache, &[v3]).await,
            TokenError::UnsupportedVersion { ver: "3.0".into() }
        );
        for claim in ["exp", "nbf", "aud", "iss"] {
            let token = sign(&with(claims_v1(), json!({ claim: null })));
            assert_eq!(
                rejected(&cache, &[token]).await,
                TokenError::MissingClaim(claim.into()),
                "{claim}"
            );
        }
        let no_tid = sign(&with(claims_v1(), json!({"tid": null})));
        assert_eq!(
            rejected(&cache, &[no_tid]).await,
            TokenError::MissingClaim("tid".into())
        );
    }

    #[tokio::test]
    async fn hmac_none_and_other_rsa_algorithms_are_rejected_before_any_key_fetch() {
        let server = signing_server().await;
        let cache = server.cache();
        // Key confusion: HS256 with the public modulus as the shared secret.
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(SIGNING_KID.into());
        let hs256 = jsonwebtoken::encode(
            &header,
            &claims_v1(),
            &EncodingKey::from_secret(SIGNING_KEY_N.as_bytes()),
        )
        .unwrap();
        assert_eq!(
            rejected(&cache, &[hs256]).await,
            TokenError::UnsupportedAlgorithm {
                alg: "HS256".into()
            }
        );
        let none = format!(
            "{}.{}.",
            b64(json!({"alg": "none", "typ": "JWT", "kid": SIGNING_KID})
                .to_string()
                .as_bytes()),
            b64(claims_v1().to_string().as_bytes())
        );
        assert_eq!(
            rejected(&cache, &[none]).await,
            TokenError::UnsupportedAlgorithm { alg: "none".into() }
        );
        let rs512 = sign_with(Algorithm::RS512, SIGNING_KID, SIGNING_KEY_PEM, &claims_v1());
        assert_eq!(
            rejected(&cache, &[rs512]).await,
            TokenError::UnsupportedAlgorithm {
                alg: "RS512".into()
            }
        );
        let ps256 = sign_with(Algorithm::PS256, SIGNING_KID, SIGNING_KEY_PEM, &claims_v1());
        assert_eq!(
            rejected(&cache, &[ps256]).await,
            TokenError::UnsupportedAlgorithm {
                alg: "PS256".into()
            }
        );
        assert_eq!(server.hits(), 0);
    }

    #[tokio::test]
    async fn malformed_tokens_are_rejected_without_quoting_them() {
        let server = signing_server().await;
        let cache = server.cache();
        let payload = b64(claims_v1().to_string().as_bytes());
        let header_no_kid = b64(json!({"alg": "RS256", "typ": "JWT"}).to_string().as_bytes());
        let header_crit = b64(json!({"alg": "RS256", "kid": SIGNING_KID, "crit": ["exp"]})
            .to_string()
            .as_bytes());
        let cases = [
            "secret-looking-opaque-string-that-is-not-a-jwt".to_string(),
            String::new(),
            format!("{payload}.{payload}"),
            format!("!!!notbase64!!!.{payload}.c2ln"),
            format!("{payload}.{payload}.c2ln"), // header is JSON but has no alg
            format!("{header_no_kid}.{payload}.c2ln"),
            format!("{header_crit}.{payload}.c2ln"),
            format!("{}.{payload}.c2ln.extra.part", b64(b"{\"alg\":\"RS256\"}")),
        ];
        for case in cases {
            let err = rejected(&cache, std::slice::from_ref(&case)).await;
            assert!(matches!(err, TokenError::Malformed(_)), "{case:?}: {err:?}");
        }
        // Correctly signed, but the payload is not JSON / a claim has the wrong type.
        let header = b64(json!({"alg": "RS256", "typ": "JWT", "kid": SIGNING_KID})
            .to_string()
            .as_bytes());
        let key = EncodingKey::from_rsa_pem(SIGNING_KEY_PEM.as_bytes()).unwrap();
        let signed = |payload: &[u8]| {
            let message = format!("{header}.{}", b64(payload));
            let signature =
                jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::RS256).unwrap();
            format!("{message}.{signature}")
        };
        let not_json = signed(b"not json at all, but correctly signed");
        let exp_string = signed(
            with(claims_v1(), json!({"exp": "tomorrow"}))
                .to_string()
                .as_bytes(),
        );
        let ver_number = signed(
            with(claims_v1(), json!({"ver": 1.0}))
                .to_string()
                .as_bytes(),
        );
        for case in [not_json, ver_number] {
            let err = rejected(&cache, std::slice::from_ref(&case)).await;
            assert!(matches!(err, TokenError::Malformed(_)), "{err:?}");
        }
        // jsonwebtoken treats a non-numeric `exp` as absent.
        assert_eq!(
            rejected(&cache, &[exp_string]).await,
            TokenError::MissingClaim("exp".into())
        );
        // The same payload with a signature made for another payload.
        let parts: Vec<String> = sign(&claims_v1()).split('.').map(str::to_string).collect();
        let swapped = format!("{}.{}.{}", parts[0], b64(b"not json at all"), parts[2]);
        assert_eq!(rejected(&cache, &[swapped]).await, TokenError::BadSignature);
        assert_eq!(server.hits(), 1, "only the signed cases needed a key");
    }

    #[tokio::test]
    async fn one_bad_token_fails_the_batch() {
        let server = signing_server().await;
        let cache = server.cache();
        let now = now();
        let expired = sign(&with(
            claims_v1(),
            json!({"nbf": now - 90_000, "exp": now - 3600}),
        ));
        let tokens = vec![
            sign(&claims_v1()),
            sign(&claims_v2()),
            expired,
            sign(&claims_v1()),
        ];
        assert_eq!(rejected(&cache, &tokens).await, TokenError::Expired);
    }

    #[tokio::test]
    async fn size_and_count_caps_apply_before_any_parsing_or_fetch() {
        let server = signing_server().await;
        let cache = server.cache();
        assert_eq!(rejected(&cache, &[]).await, TokenError::Missing);

        let good = sign(&claims_v1());
        let huge = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            rejected(&cache, &[good.clone(), huge]).await,
            TokenError::TooLarge {
                index: 1,
                len: MAX_TOKEN_BYTES + 1,
                max: MAX_TOKEN_BYTES
            }
        );
        let many = vec![good.clone(); MAX_TOKENS + 1];
        assert_eq!(
            rejected(&cache, &many).await,
            TokenError::TooMany {
                count: MAX_TOKENS + 1,
                max: MAX_TOKENS
            }
        );
        assert_eq!(server.hits(), 0);
        // Exactly at the caps is fine.
        cache
            .verify(&vec![good; MAX_TOKENS], &expectation())
            .await
            .unwrap();
        assert_eq!(server.hits(), 1);
    }

    // ---- key set handling ---------------------------------------------------------------

    #[tokio::test]
    async fn unknown_kid_refreshes_once_then_is_rate_limited() {
        let server = signing_server().await;
        let cache = server.cache();
        let stranger = sign_with(
            Algorithm::RS256,
            "no-such-kid",
            SIGNING_KEY_PEM,
            &claims_v1(),
        );
        assert_eq!(
            rejected(&cache, &[stranger]).await,
            TokenError::UnknownKey {
                kid: "no-such-kid".into()
            }
        );
        assert_eq!(server.hits(), 1);
        // Another unknown kid within the refresh interval: no fetch.
        let another = sign_with(
            Algorithm::RS256,
            "another-kid",
            FORGER_KEY_PEM,
            &claims_v1(),
        );
        assert_eq!(
            rejected(&cache, &[another]).await,
            TokenError::UnknownKey {
                kid: "another-kid".into()
            }
        );
        assert_eq!(server.hits(), 1);
        // The known kid still works from the cache.
        cache
            .verify(&[sign(&claims_v1())], &expectation())
            .await
            .unwrap();
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn unknown_kid_in_the_message_is_sanitized_and_truncated() {
        let server = signing_server().await;
        let cache = server.cache();
        let kid = format!("evil\n{}", "k".repeat(200));
        let token = sign_with(Algorithm::RS256, &kid, SIGNING_KEY_PEM, &claims_v1());
        let TokenError::UnknownKey { kid: shown } = rejected(&cache, &[token]).await else {
            panic!("expected UnknownKey");
        };
        assert!(shown.starts_with("evil?kkk"), "{shown}");
        assert_eq!(
            shown.chars().count(),
            65,
            "64 chars and an ellipsis: {shown}"
        );
    }

    #[tokio::test]
    async fn key_rotation_is_picked_up_by_the_first_token_with_the_new_kid() {
        let server = signing_server().await;
        let interval = Duration::from_millis(1000);
        let cache = JwksCache::with_timings(http(), server.url.clone(), KEYS_TTL, interval);
        cache
            .verify(&[sign(&claims_v1())], &expectation())
            .await
            .unwrap();
        assert_eq!(server.hits(), 1);

        // Microsoft rotates: the new key is published, the old one retired.
        server.serve(Reply::json(&jwks(&[rsa_jwk("rotated-kid", FORGER_KEY_N)])));
        let rotated = sign_with(
            Algorithm::RS256,
            "rotated-kid",
            FORGER_KEY_PEM,
            &claims_v2(),
        );
        // Inside the refresh interval the new kid is not fetched yet...
        assert_eq!(
            rejected(&cache, std::slice::from_ref(&rotated)).await,
            TokenError::UnknownKey {
                kid: "rotated-kid".into()
            }
        );
        assert_eq!(server.hits(), 1);
        // ...after it, the first token with the new kid triggers the fetch and passes.
        tokio::time::sleep(interval + Duration::from_millis(50)).await;
        cache.verify(&[rotated], &expectation()).await.unwrap();
        assert_eq!(server.hits(), 2);
        // The retired key is gone: its tokens now fail (no fetch: inside the interval again).
        assert_eq!(
            rejected(&cache, &[sign(&claims_v1())]).await,
            TokenError::UnknownKey {
                kid: SIGNING_KID.into()
            }
        );
        assert_eq!(server.hits(), 2);
    }

    #[tokio::test]
    async fn key_set_is_fetched_again_after_its_ttl() {
        let server = signing_server().await;
        let ttl = Duration::from_millis(1000);
        let cache = JwksCache::with_timings(http(), server.url.clone(), ttl, Duration::ZERO);
        let token = sign(&claims_v1());
        cache
            .verify(std::slice::from_ref(&token), &expectation())
            .await
            .unwrap();
        cache
            .verify(std::slice::from_ref(&token), &expectation())
            .await
            .unwrap();
        assert_eq!(server.hits(), 1);
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        cache
            .verify(std::slice::from_ref(&token), &expectation())
            .await
            .unwrap();
        assert_eq!(server.hits(), 2);
        // Expired and the endpoint now fails: stale keys are not used.
        tokio::time::sleep(ttl + Duration::from_millis(50)).await;
        server.serve(Reply {
            status: 503,
            ..Reply::json(&json!({}))
        });
        let err = rejected(&cache, &[token]).await;
        assert!(
            matches!(&err, TokenError::KeyFetch(m) if m.contains("503")),
            "{err:?}"
        );
        assert_eq!(server.hits(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_share_one_fetch() {
        let server = signing_server().await;
        server.serve(Reply {
            delay: Duration::from_millis(200),
            ..Reply::json(&signing_jwks())
        });
        let cache = server.cache();
        let token = sign(&claims_v1());
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (cache, token) = (cache.clone(), token.clone());
                tokio::spawn(async move { cache.verify(&[token], &expectation()).await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(server.hits(), 1);

        // A flood of random kids on a cold cache: still one fetch.
        let server = signing_server().await;
        server.serve(Reply {
            delay: Duration::from_millis(200),
            ..Reply::json(&signing_jwks())
        });
        let cache = server.cache();
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let cache = cache.clone();
                let token = sign_with(
                    Algorithm::RS256,
                    &format!("random-{i}"),
                    FORGER_KEY_PEM,
                    &claims_v1(),
                );
                tokio::spawn(async move { cache.verify(&[token], &expectation()).await })
            })
            .collect();
        for (i, task) in tasks.into_iter().enumerate() {
            assert_eq!(
                task.await.unwrap(),
                Err(TokenError::UnknownKey {
                    kid: format!("random-{i}")
                })
            );
        }
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn only_rsa_signing_keys_are_used() {
        let doc = jwks(&[
            json!({"kty": "EC", "use": "sig", "kid": "ec-key", "crv": "P-256",
                   "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
                   "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}),
            json!({"kty": "oct", "kid": "hmac-key", "k": "c2VjcmV0"}),
            json!({"kty": "RSA", "use": "enc", "kid": "enc-key", "n": FORGER_KEY_N, "e": KEY_E}),
            json!({"kty": "RSA", "use": "sig", "alg": "RS512", "kid": "rs512-key", "n": FORGER_KEY_N, "e": KEY_E}),
            json!({"kty": "RSA", "kid": "no-modulus", "e": KEY_E}),
            json!("not even an object"),
            rsa_jwk(SIGNING_KID, SIGNING_KEY_N),
        ]);
        let server = JwksServer::start(Reply::json(&doc)).await;
        let cache = server.cache();
        cache
            .verify(&[sign(&claims_v1())], &expectation())
            .await
            .unwrap();
        for kid in ["ec-key", "hmac-key", "enc-key", "rs512-key", "no-modulus"] {
            let token = sign_with(Algorithm::RS256, kid, FORGER_KEY_PEM, &claims_v1());
            assert_eq!(
                rejected(&cache, &[token]).await,
                TokenError::UnknownKey { kid: kid.into() }
            );
        }
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn key_endpoint_down_is_a_key_fetch_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = Url::parse(&format!("http://{addr}/common/discovery/v2.0/keys")).unwrap();
        let cache = JwksCache::new(http(), url);
        let err = rejected(&cache, &[sign(&claims_v1())]).await;
        assert!(
            matches!(&err, TokenError::KeyFetch(m) if m.contains("cannot reach")),
            "{err:?}"
        );
        // Within the refresh interval the failure is remembered, not retried.
        let again = rejected(&cache, &[sign(&claims_v2())]).await;
        assert_eq!(again, err);
    }

    #[tokio::test]
    async fn bad_key_endpoint_answers_are_key_fetch_errors() {
        let huge = json!({"keys": [rsa_jwk(SIGNING_KID, SIGNING_KEY_N)], "pad": "x".repeat(MAX_JWKS_BYTES)});
        let cases: Vec<(Reply, &str)> = vec![
            (
                Reply {
                    status: 500,
                    ..Reply::json(&signing_jwks())
                },
                "HTTP 500",
            ),
            (
                Reply {
                    status: 404,
                    ..Reply::json(&signing_jwks())
                },
                "HTTP 404",
            ),
            (
                Reply {
                    body: b"<html>maintenance</html>".to_vec(),
                    ..Reply::json(&json!({}))
                },
                "JSON",
            ),
            (Reply::json(&json!({"value": []})), "JSON"),
            (Reply::json(&jwks(&[])), "no usable RSA"),
            (Reply::json(&huge), "larger than"),
            (
                Reply {
                    omit_length: true,
                    ..Reply::json(&huge)
                },
                "larger than",
            ),
        ];
        for (reply, expected) in cases {
            let server = JwksServer::start(reply).await;
            let cache = server.cache();
            let err = rejected(&cache, &[sign(&claims_v1())]).await;
            assert!(
                matches!(&err, TokenError::KeyFetch(m) if m.contains(expected)),
                "expected KeyFetch containing {expected:?}, got {err:?}"
            );
            // Remembered within the refresh interval: no second request.
            assert_eq!(rejected(&cache, &[sign(&claims_v1())]).await, err);
            assert_eq!(server.hits(), 1);
        }
        // Control: the same huge document without padding, streamed without a length, loads.
        let server = JwksServer::start(Reply {
            omit_length: true,
            ..Reply::json(&signing_jwks())
        })
        .await;
        server
            .cache()
            .verify(&[sign(&claims_v1())], &expectation())
            .await
            .unwrap();
    }

    #[test]
    fn cache_is_send_sync_and_clone() {
        fn check<T: Send + Sync + Clone + 'static>() {}
        check::<JwksCache>();
    }

    #[test]
    fn sanitize_keeps_printable_ascii_and_truncates() {
        assert_eq!(sanitize("abc", 8), "abc");
        assert_eq!(sanitize("a\u{1b}[31mb", 8), "a?[31mb");
        assert_eq!(sanitize("abcdef", 3), "abc…");
    }
}
