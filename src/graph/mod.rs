//! Microsoft Graph client: app-only token, one retrying HTTP core, paging, and the reads the
//! sync needs (groups, transitive user members, users, managers via `$batch`).
//!
//! Owns every Graph URL and wire detail (docs/graph.md). It must not know SCIM, sled or
//! the mapping; callers pass the `$select` lists.

pub mod credential;
pub(crate) mod delta;
pub(crate) mod models;
pub(crate) mod pacer;
pub(crate) mod subscriptions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Notify;
use url::Url;

use crate::retry::{read_limited, retry_after, transport_message, RetryPolicy};
use crate::text::{is_guid, urlencode};
use credential::{ClientCredential, Proof, JWT_BEARER};
use models::{GraphGroup, GraphUser};
pub(crate) use pacer::{Pacer, Priority};

/// Graph pages of 999 users are ~2 MB; anything far beyond is a broken or hostile peer.
const MAX_PAGE_BYTES: usize = 32 * 1024 * 1024;
const MAX_TOKEN_BYTES: usize = 64 * 1024;
/// Graph's documented maximum number of requests in one `$batch`.
pub(crate) const BATCH_LIMIT: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// The token endpoint refused us; `advice` says what to do.
    #[error("{advice}")]
    Auth { code: Option<u64>, advice: String },
    #[error("Graph {method} {path} answered {status} {code}: {message}{hint}")]
    Api {
        method: &'static str,
        path: String,
        status: u16,
        code: String,
        message: String,
        hint: String,
    },
    #[error("cannot reach {what}: {message}")]
    Transport { what: String, message: String },
    #[error("unexpected answer from {what}: {message}")]
    Decode { what: String, message: String },
    #[error("group {0} does not exist in the tenant (deleted, or a wrong object id in `groups`)")]
    GroupNotFound(String),
    /// The credential could not be used (unreadable token file, signing failure).
    #[error(transparent)]
    Credential(#[from] credential::CredentialError),
}

impl GraphError {
    pub fn status(&self) -> Option<u16> {
        match self {
            GraphError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Graph answered 429 or a 5xx worth asking again (after its `Retry-After`).
    pub(crate) fn is_transient(&self) -> bool {
        self.status()
            .is_some_and(|s| crate::retry::transience(s) != crate::retry::Transience::Final)
    }
}

/// Plain advice for the token endpoint's AADSTS codes. 7000215, 7000222, 700016 and 7000218
/// are in Microsoft's published table; the advice for the others follows Microsoft's error
/// lookup and SDK troubleshooting pages (docs/graph.md, Tokens).
pub(crate) fn aadsts_advice(code: Option<u64>, description: &str) -> String {
    let first_line = description.lines().next().unwrap_or("").trim();
    match code {
        Some(7000215) => "client secret rejected (AADSTS7000215): the value is wrong. Copy the secret's Value (not its Secret ID) from App registrations > Certificates & secrets, or create a new secret".into(),
        Some(7000222) => "client secret expired (AADSTS7000222): create a new secret in App registrations > Certificates & secrets and update client_secret".into(),
        Some(700016) => "application not found in the tenant (AADSTS700016): check client_id and tenant_id, and that an administrator has consented to the app in this tenant".into(),
        Some(90002) => "tenant not found (AADSTS90002): check tenant_id (a GUID or a verified domain such as contoso.onmicrosoft.com) and login_url".into(),
        Some(7000218) => "no client credential was sent (AADSTS7000218): client_secret is empty".into(),
        Some(70011) => "invalid scope (AADSTS70011): check graph_url; the scope is <graph_url>/.default".into(),
        Some(700027) => "client assertion refused (AADSTS700027): its signature or certificate is not registered on the app. Upload `certificate` (the public .pem/.cer, not the key) under App registrations > Certificates & secrets > Certificates, and check that certificate_key is that certificate's private key".into(),
        Some(700024) => "client assertion is not within its valid time range (AADSTS700024): check this machine's clock (NTP); for workload identity, the federated token file holds an expired token (is the kubelet still rotating it?)".into(),
        Some(700021) => "client assertion refused (AADSTS700021): its issuer and subject must be the client_id of the app registration".into(),
        Some(50027) => "client assertion refused (AADSTS50027): it is not a well-formed JWT; for workload identity, check that federated_token_file holds the projected service account token itself".into(),
        Some(70021) | Some(700211) | Some(700212) | Some(700213) => format!(
            "no matching federated identity credential (AADSTS{}): the app's federated credential (App registrations > Certificates & secrets > Federated credentials) must name exactly the token's issuer (the cluster's OIDC issuer URL), subject (system:serviceaccount:<namespace>:<service account>) and audience (api://AzureADTokenExchange). {first_line}",
            code.unwrap_or(70021)
        ),
        Some(c) => format!("token request refused (AADSTS{c}): {first_line}"),
        None => format!("token request refused: {first_line}"),
    }
}

/// Settings of one tenant's Graph connection.
#[derive(Clone, Debug)]
pub struct GraphSettings {
    pub tenant_id: String,
    pub client_id: String,
    pub credential: ClientCredential,
    pub login_url: Url,
    pub graph_url: Url,
}

struct CachedToken {
    token: SecretString,
    /// Fetch a new one from then on (five minutes early).
    refresh_at: Instant,
    /// Usable until then.
    expires_at: Instant,
}

/// The token cache. Its lock is held only to read or update this state, never across a
/// request or a sleep: one caller at a time fetches (`refreshing`), the others use the cached
/// token while it is still valid or wait for that one request's outcome.
#[derive(Default)]
struct TokenState {
    cached: Option<CachedToken>,
    refreshing: bool,
    /// After a failed attempt: no new attempt before this instant; callers without a usable
    /// token meanwhile wait for it (if it is within their budget) or get the error.
    backoff: Option<(Instant, GraphError)>,
    /// Failed attempts in a row (for the backoff).
    failures: Option<crate::retry::Backoff>,
}

/// Longest a caller waits for a token (backoff sleeps included) before it gets the error. A
/// token endpoint that asks for more (a long `Retry-After`) fails every caller at once instead
/// of stalling all Graph calls of the integration.
const TOKEN_WAIT_BUDGET: Duration = Duration::from_secs(30);

/// One failed token request: the error, and whether (and after how long) to try again.
struct TokenFailure {
    error: GraphError,
    /// `Some(retry_after)` for a transient failure (no response, 429, 5xx).
    retry: Option<Option<Duration>>,
}

/// Resets `refreshing` and wakes the waiters when the fetching caller finishes or is
/// cancelled.
struct Refreshing<'a> {
    state: &'a Mutex<TokenState>,
    done: &'a Notify,
}

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .refreshing = false;
        self.done.notify_waiters();
    }
}

impl GraphError {
    /// A copy for callers that share one failed token request.
    fn duplicate(&self) -> GraphError {
        match self {
            GraphError::Auth { code, advice } => GraphError::Auth {
                code: *code,
                advice: advice.clone(),
            },
            GraphError::Transport { what, message } => GraphError::Transport {
                what: what.clone(),
                message: message.clone(),
            },
            GraphError::Decode { what, message } => GraphError::Decode {
                what: what.clone(),
                message: message.clone(),
            },
            other => GraphError::Transport {
                what: "the token endpoint".into(),
                message: other.to_string(),
            },
        }
    }
}

/// One tenant's Graph client. Cheap to share behind an `Arc`.
pub struct GraphClient {
    http: reqwest::Client,
    settings: GraphSettings,
    /// Root of the API, e.g. `https://graph.microsoft.com/v1.0`; nextLinks must start with it.
    api_root: String,
    /// The cached token (see [`TokenState`]) and the signal that a fetch ended; shared with
    /// the [`GraphClient::background`] client of the same integration.
    token: Arc<Mutex<TokenState>>,
    token_fetched: Arc<Notify>,
    retry: RetryPolicy,
    /// Integration name for metrics.
    label: String,
    /// `x-ms-throttle-priority` of every request this client sends.
    priority: Priority,
    /// The integration's Graph budget, shared with its other client.
    pacer: Arc<Pacer>,
}

#[derive(Deserialize)]
struct TokenOk {
    access_token: String,
    expires_in: Option<Value>,
}

#[derive(Deserialize, Default)]
struct TokenErr {
    error: Option<String>,
    error_description: Option<String>,
    error_codes: Option<Vec<u64>>,
}

#[derive(Deserialize)]
struct GraphErrBody {
    error: GraphErrInner,
}
#[derive(Deserialize)]
struct GraphErrInner {
    code: Option<String>,
    message: Option<String>,
}

fn root(u: &Url) -> String {
    u.as_str().trim_end_matches('/').to_string()
}

/// A page of users and the link to the next one.
pub struct UserPage {
    pub users: Vec<GraphUser>,
    pub next: Option<String>,
    /// Members that were skipped because they could not be parsed (with the reason).
    pub malformed: Vec<String>,
}

impl UserPage {
    /// Users came back without properties (no userPrincipalName, which every user has): the
    /// app lacks User.Read.All, and Graph returns only ids.
    pub(crate) fn lacks_properties(&self) -> bool {
        !self.users.is_empty()
            && self
                .users
                .iter()
                .all(|u| u.string("userPrincipalName").is_none())
    }
}

/// Most group ids one `checkMemberGroups` request takes (Graph's documented limit).
pub(crate) const CHECK_MEMBER_GROUPS_MAX: usize = 20;

/// One request inside a `$batch`.
struct BatchRequest {
    id: String,
    method: &'static str,
    /// Relative to the API root, e.g. `/users/{id}/manager`.
    url: String,
    body: Option<Value>,
}

impl BatchRequest {
    fn get(id: String, url: String) -> BatchRequest {
        BatchRequest {
            id,
            method: "GET",
            url,
            body: None,
        }
    }

    fn to_json(&self) -> Value {
        match &self.body {
            Some(b) => json!({"id": self.id, "method": self.method, "url": self.url,
                "headers": {"Content-Type": "application/json"}, "body": b}),
            None => json!({"id": self.id, "method": self.method, "url": self.url}),
        }
    }
}

fn manager_path(user_id: &str, select: &[String]) -> String {
    format!(
        "/users/{}/manager?$select={}",
        urlencode(user_id),
        select.join(",")
    )
}

/// A user read again to confirm a deactivation (`GraphClient::fresh_reads`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct FreshRead {
    /// `None`: Graph answered 404 (deleted or soft-deleted).
    pub user: Option<GraphUser>,
    pub manager: Option<GraphUser>,
    /// The asked-for groups the user is a transitive member of.
    pub member_of: Vec<String>,
    /// When this user's read was sent (after any pause for throttling): its answers are at
    /// most this old.
    pub asked: std::time::Instant,
}

/// Users read at once by [`GraphClient::fresh_reads`] (one `$batch` each).
const FRESH_READ_CONCURRENCY: usize = 4;

impl GraphClient {
    pub fn new(settings: GraphSettings, http: reqwest::Client) -> Self {
        let api_root = format!("{}/v1.0", root(&settings.graph_url));
        Self {
            http,
            settings,
            api_root,
            token: Arc::new(Mutex::new(TokenState::default())),
            token_fetched: Arc::new(Notify::new()),
            retry: RetryPolicy::default(),
            label: String::new(),
            priority: Priority::Normal,
            pacer: Arc::new(Pacer::default()),
        }
    }

    /// A client for background work (the full reconcile) beside this one: the same tenant,
    /// token cache and Graph budget ([`Pacer`]), but its requests are sent with
    /// `x-ms-throttle-priority: low` and paced so that part of the tenant's bucket stays free
    /// for this client's (normal-priority) requests.
    pub(crate) fn background(&self) -> GraphClient {
        GraphClient {
            http: self.http.clone(),
            settings: self.settings.clone(),
            api_root: self.api_root.clone(),
            token: Arc::clone(&self.token),
            token_fetched: Arc::clone(&self.token_fetched),
            retry: self.retry,
            label: self.label.clone(),
            priority: Priority::Low,
            pacer: Arc::clone(&self.pacer),
        }
    }

    /// Names the integration in this client's metrics.
    pub(crate) fn with_label(mut self, integration: &str) -> Self {
        self.label = integration.to_string();
        self
    }

    /// How this client authenticates (for `check`).
    pub(crate) fn credential(&self) -> &ClientCredential {
        &self.settings.credential
    }

    #[cfg(test)]
    pub(crate) fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// An HTTP client with the timeouts rostersync uses for Graph, the token endpoint and the
    /// signing keys. It follows no redirects ([`crate::retry::no_redirects`]).
    pub fn default_http() -> Result<reqwest::Client, GraphError> {
        reqwest::Client::builder()
            .redirect(crate::retry::no_redirects())
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .user_agent(concat!("rostersync/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| GraphError::Transport {
                what: "the HTTP client".into(),
                message: e.to_string(),
            })
    }

    /// A valid access token, from the cache or the token endpoint.
    ///
    /// At most one token request is in flight per client, and no lock is held across it or
    /// across a backoff: while one caller fetches, the others use the cached token if it has
    /// not expired yet, or wait for that request. A transient failure (no answer, 429, 5xx) is
    /// retried after the retry policy's backoff (honouring `Retry-After`) as long as the wait
    /// fits in the caller's [`TOKEN_WAIT_BUDGET`]; a longer wait fails the call at once.
    pub async fn token(&self) -> Result<SecretString, GraphError> {
        let deadline = Instant::now() + TOKEN_WAIT_BUDGET;
        enum Next<'a> {
            Fetch,
            Wait(tokio::sync::futures::Notified<'a>),
            Sleep(Instant),
        }
        loop {
            let now = Instant::now();
            let next = {
                let mut st = self.token.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(t) = st.cached.as_ref().filter(|t| now < t.refresh_at) {
                    return Ok(t.token.clone());
                }
                let usable = st
                    .cached
                    .as_ref()
                    .filter(|t| now < t.expires_at)
                    .map(|t| t.token.clone());
                if st.refreshing {
                    if let Some(t) = usable {
                        return Ok(t);
                    }
                    // Registered before the lock is let go: the fetch's end cannot be missed.
                    Next::Wait(self.token_fetched.notified())
                } else if let Some((until, e)) = st.backoff.as_ref().filter(|(u, _)| now < *u) {
                    if let Some(t) = usable {
                        return Ok(t);
                    }
                    if *until > deadline {
                        return Err(e.duplicate());
                    }
                    Next::Sleep(*until)
                } else {
                    st.refreshing = true;
                    Next::Fetch
                }
            };
            match next {
                Next::Wait(n) => {
                    n.await;
                    continue;
                }
                Next::Sleep(until) => {
                    tokio::time::sleep_until(until.into()).await;
                    continue;
                }
                Next::Fetch => {}
            }
            // This caller fetches; the guard hands over even if it is cancelled.
            let guard = Refreshing {
                state: &self.token,
                done: &self.token_fetched,
            };
            let result = self.fetch_token().await;
            let outcome = {
                let mut st = self.token.lock().unwrap_or_else(|e| e.into_inner());
                match result {
                    Ok(fresh) => {
                        let token = fresh.token.clone();
                        st.cached = Some(fresh);
                        st.backoff = None;
                        st.failures = None;
                        Ok(token)
                    }
                    Err(TokenFailure { error, retry }) => {
                        let failures = st.failures.get_or_insert_with(|| self.retry.start());
                        let attempt = failures.attempts();
                        let delay = retry.and_then(|ra| failures.retry(ra));
                        let usable = st
                            .cached
                            .as_ref()
                            .filter(|t| Instant::now() < t.expires_at)
                            .map(|t| t.token.clone());
                        match delay {
                            Some(delay) => {
                                tracing::warn!(attempt, error = %error, ?delay, "token request failed; will retry");
                                st.backoff = Some((Instant::now() + delay, error.duplicate()));
                                match usable {
                                    Some(t) => Ok(t),
                                    // Loop: wait for the backoff if it fits the budget.
                                    None => Err(None),
                                }
                            }
                            None => {
                                st.failures = None;
                                match usable {
                                    Some(t) => Ok(t),
                                    None => Err(Some(error)),
                                }
                            }
                        }
                    }
                }
            };
            drop(guard);
            match outcome {
                Ok(t) => return Ok(t),
                Err(Some(e)) => return Err(e),
                Err(None) => continue,
            }
        }
    }

    async fn invalidate_token(&self) {
        self.token.lock().unwrap_or_else(|e| e.into_inner()).cached = None;
    }

    /// The tenant's id (GUID): `tenant_id` itself, or, when that is a domain name, the id
    /// named by the tenant's OpenID Connect metadata
    /// (`{login_url}/{domain}/v2.0/.well-known/openid-configuration`: its `issuer` is
    /// `https://login.microsoftonline.com/{tenant id}/v2.0`, and `token_endpoint` holds it too).
    pub async fn tenant_guid(&self) -> Result<String, GraphError> {
        let s = &self.settings;
        if is_guid(&s.tenant_id) {
            return Ok(s.tenant_id.to_ascii_lowercase());
        }
        let url = format!(
            "{}/{}/v2.0/.well-known/openid-configuration",
            root(&s.login_url),
            urlencode(&s.tenant_id)
        );
        let what = || format!("the OpenID metadata of tenant {}", s.tenant_id);
        let resp = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .map_err(|e| GraphError::Transport {
                what: what(),
                message: transport_message(&e),
            })?;
        let status = resp.status();
        let body = read_limited(resp, 256 * 1024)
            .await
            .map_err(|m| GraphError::Transport {
                what: what(),
                message: m,
            })?;
        if !status.is_success() {
            return Err(GraphError::Decode {
                what: what(),
                message: format!("HTTP {status}: is tenant_id a verified domain of the tenant?"),
            });
        }
        #[derive(Deserialize)]
        struct Metadata {
            issuer: Option<String>,
            token_endpoint: Option<String>,
        }
        let m: Metadata = serde_json::from_slice(&body).map_err(|_| GraphError::Decode {
            what: what(),
            message: "not an OpenID Connect metadata document".into(),
        })?;
        [m.issuer, m.token_endpoint]
            .iter()
            .flatten()
            .flat_map(|u| u.split('/'))
            .find(|seg| is_guid(seg))
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| GraphError::Decode {
                what: what(),
                message: "the metadata names no tenant id".into(),
            })
    }

    /// One token request.
    async fn fetch_token(&self) -> Result<CachedToken, TokenFailure> {
        let s = &self.settings;
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            root(&s.login_url),
            urlencode(&s.tenant_id)
        );
        let scope = format!("{}/.default", root(&s.graph_url));
        let what = || format!("the token endpoint {}", root(&s.login_url));
        let fatal = |error: GraphError| TokenFailure { error, retry: None };
        let started = Instant::now();
        // A fresh proof per attempt: an assertion's jti must never be sent twice, and the
        // federated token file may have been rotated since the last try.
        let proof = s
            .credential
            .proof(&url, &s.client_id)
            .await
            .map_err(|e| fatal(e.into()))?;
        let mut form = vec![
            ("client_id", s.client_id.as_str()),
            ("scope", scope.as_str()),
            ("grant_type", "client_credentials"),
        ];
        match &proof {
            Proof::Secret(secret) => form.push(("client_secret", secret.expose_secret())),
            Proof::Assertion(jwt) => {
                form.push(("client_assertion_type", JWT_BEARER));
                form.push(("client_assertion", jwt.expose_secret()));
            }
        }
        let resp = self.http.post(&url).form(&form).send().await;
        // Token endpoint answers count as Graph responses (a 400/401 here is an auth problem).
        crate::metrics::request(
            crate::metrics::Remote::Graph,
            &self.label,
            resp.as_ref().ok().map(|r| r.status().as_u16()),
        );
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let error = GraphError::Transport {
                    what: what(),
                    message: transport_message(&e),
                };
                // A redirect will not go away by itself.
                let retry = (!e.is_redirect()).then_some(None);
                return Err(TokenFailure { error, retry });
            }
        };
        let status = resp.status();
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(TokenFailure {
                error: GraphError::Transport {
                    what: what(),
                    message: format!("HTTP {status}"),
                },
                retry: Some(retry_after(resp.headers())),
            });
        }
        let body = read_limited(resp, MAX_TOKEN_BYTES)
            .await
            .map_err(|m| GraphError::Transport {
                what: what(),
                message: m,
            })
            .map_err(fatal)?;
        if status.is_success() {
            let ok: TokenOk = serde_json::from_slice(&body)
                .map_err(|e| GraphError::Decode {
                    what: what(),
                    message: format!("token response is not the expected JSON: {e}"),
                })
                .map_err(fatal)?;
            let expires_in = match ok.expires_in {
                Some(Value::Number(n)) => n.as_u64().unwrap_or(3599),
                Some(Value::String(s)) => s.parse().unwrap_or(3599),
                _ => 3599,
            };
            // Refresh five minutes early (or halfway, for short-lived tokens).
            let margin = (expires_in / 2).min(300);
            // A hostile or broken endpoint could send anything: keep at most a day.
            let valid = expires_in.min(86_400);
            let at = |secs: u64| {
                started
                    .checked_add(Duration::from_secs(secs))
                    .unwrap_or(started)
            };
            tracing::debug!(
                expires_in,
                credential = s.credential.kind(),
                "got a Graph access token"
            );
            return Ok(CachedToken {
                token: SecretString::from(ok.access_token),
                refresh_at: at(valid.saturating_sub(margin)),
                expires_at: at(valid),
            });
        }
        let err: TokenErr = serde_json::from_slice(&body).unwrap_or_default();
        let code = err
            .error_codes
            .as_ref()
            .and_then(|c| c.first().copied())
            .or_else(|| err.error_description.as_deref().and_then(parse_aadsts));
        let desc = err
            .error_description
            .or(err.error)
            .unwrap_or_else(|| format!("HTTP {status}"));
        let mut advice = aadsts_advice(code, &desc);
        if let (Some(700027), ClientCredential::Certificate(c)) = (code, &s.credential) {
            advice.push_str(&format!(
                " (this certificate's thumbprint: {})",
                c.certificate().thumbprints().sha1_hex
            ));
        }
        tracing::warn!(
            code,
            credential = s.credential.kind(),
            "token request refused"
        );
        Err(fatal(GraphError::Auth { code, advice }))
    }

    /// Sends a request with the bearer token and the retry policy; returns status and body.
    /// `body` is `Some` for POST.
    async fn send(
        &self,
        method: &'static str,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Vec<u8>), GraphError> {
        let (status, _, body) = self.send_raw(method, url, body).await?;
        Ok((status, body))
    }

    /// [`Self::send`] with the response headers.
    async fn send_raw(
        &self,
        method: &'static str,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>), GraphError> {
        let (status, headers, body, _) = self.send_timed(method, url, body).await?;
        Ok((status, headers, body))
    }

    /// [`Self::send_raw`] with the instant the answered request was sent: after any pause the
    /// pacer imposed and after any earlier throttled attempt, so that what Graph said is at
    /// most this old.
    async fn send_timed(
        &self,
        method: &'static str,
        url: &str,
        body: Option<&Value>,
    ) -> Result<(u16, reqwest::header::HeaderMap, Vec<u8>, Instant), GraphError> {
        let path = url.strip_prefix(&self.api_root).unwrap_or(url).to_string();
        // Graph's guidance is to repeat a throttled or unavailable request after Retry-After,
        // writes included: the only write, a subscription, is made safe to repeat by serve,
        // which deletes any subscription at its address it does not hold.
        let idempotent = true;
        let mut attempts = self.retry.start();
        let mut refreshed = false;
        loop {
            let token = self.token().await?;
            // The integration's Graph budget: a pause after a 429, the pace of background
            // reads.
            self.pacer.admit(self.priority).await;
            let sent = Instant::now();
            let mut req = match method {
                "POST" => self.http.post(url),
                "PATCH" => self.http.patch(url),
                "DELETE" => self.http.delete(url),
                _ => self.http.get(url),
            };
            req = req
                .bearer_auth(token.expose_secret())
                .header("x-ms-throttle-priority", self.priority.header());
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = req.send().await;
            crate::metrics::request(
                crate::metrics::Remote::Graph,
                &self.label,
                resp.as_ref().ok().map(|r| r.status().as_u16()),
            );
            let resp = match resp {
                Ok(r) => r,
                Err(e) if !e.is_redirect() => {
                    let attempt = attempts.attempts();
                    match attempts.retry(None) {
                        Some(delay) => {
                            tracing::warn!(attempt, %path, error = %e, "Graph request failed; retrying");
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                        None => {
                            return Err(GraphError::Transport {
                                what: format!("Graph {method} {path}"),
                                message: transport_message(&e),
                            })
                        }
                    }
                }
                Err(e) => {
                    return Err(GraphError::Transport {
                        what: format!("Graph {method} {path}"),
                        message: transport_message(&e),
                    })
                }
            };
            let status = resp.status().as_u16();
            let attempt = attempts.attempts();
            if status == 429 {
                self.pacer
                    .throttled(self.priority, retry_after(resp.headers()));
            } else {
                self.pacer.answered(self.priority, resp.headers(), 1);
            }
            if let Some(delay) =
                attempts.retry_status(status, idempotent, retry_after(resp.headers()))
            {
                tracing::debug!(attempt, status, %path, ?delay, "Graph throttled or unavailable; backing off");
                tokio::time::sleep(delay).await;
                continue;
            }
            if status == 401 && !refreshed {
                refreshed = true;
                self.invalidate_token().await;
                continue;
            }
            let headers = resp.headers().clone();
            let bytes =
                read_limited(resp, MAX_PAGE_BYTES)
                    .await
                    .map_err(|m| GraphError::Transport {
                        what: format!("Graph {method} {path}"),
                        message: m,
                    })?;
            return Ok((status, headers, bytes, sent));
        }
    }

    fn api_error(&self, method: &'static str, url: &str, status: u16, body: &[u8]) -> GraphError {
        let path = url.strip_prefix(&self.api_root).unwrap_or(url).to_string();
        let (code, message) = match serde_json::from_slice::<GraphErrBody>(body) {
            Ok(b) => (
                b.error.code.unwrap_or_default(),
                b.error.message.unwrap_or_default(),
            ),
            Err(_) => (
                String::new(),
                String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            ),
        };
        let hint = match status {
            403 => ". Grant the application permissions User.Read.All, GroupMember.Read.All, Group.Read.All and Directory.Read.All and have an administrator consent".to_string(),
            429 => ". Graph kept throttling after all retries; try again later".to_string(),
            _ => String::new(),
        };
        GraphError::Api {
            method,
            path,
            status,
            code,
            message,
            hint,
        }
    }

    async fn get_json(&self, url: &str) -> Result<Value, GraphError> {
        let (status, body) = self.send("GET", url, None).await?;
        if !(200..300).contains(&status) {
            return Err(self.api_error("GET", url, status, &body));
        }
        serde_json::from_slice(&body).map_err(|e| GraphError::Decode {
            what: format!(
                "Graph GET {}",
                url.strip_prefix(&self.api_root).unwrap_or(url)
            ),
            message: e.to_string(),
        })
    }

    /// Reads a group; a missing group is [`GraphError::GroupNotFound`].
    pub async fn group(&self, id: &str) -> Result<GraphGroup, GraphError> {
        let url = format!(
            "{}/groups/{}?$select=id,displayName",
            self.api_root,
            urlencode(id)
        );
        match self.get_json(&url).await {
            Ok(v) => Ok(GraphGroup {
                id: v
                    .get("id")
                    .and_then(|v| v.as_str())
                    .unwrap_or(id)
                    .to_string(),
                display_name: v
                    .get("displayName")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string(),
            }),
            Err(e) if e.status() == Some(404) => Err(GraphError::GroupNotFound(id.to_string())),
            Err(e) => Err(e),
        }
    }

    /// URL of the first page of a group's transitive user members.
    pub fn transitive_users_url(&self, group_id: &str, select: &[String]) -> String {
        format!(
            "{}/groups/{}/transitiveMembers/microsoft.graph.user?$select={}&$top=999",
            self.api_root,
            urlencode(group_id),
            select.join(",")
        )
    }

    /// Reads one page of users (a list URL or an `@odata.nextLink`).
    pub async fn user_page(&self, url: &str) -> Result<UserPage, GraphError> {
        if !url.starts_with(&self.api_root) {
            return Err(GraphError::Decode {
                what: "Graph paging".into(),
                message: format!(
                    "refusing to follow a nextLink outside {}: {url}",
                    self.api_root
                ),
            });
        }
        let v = self.get_json(url).await?;
        let Value::Object(mut obj) = v else {
            return Err(GraphError::Decode {
                what: "Graph member page".into(),
                message: "the page is not a JSON object".into(),
            });
        };
        let next = match obj.remove("@odata.nextLink") {
            Some(Value::String(s)) => Some(s),
            None | Some(Value::Null) => None,
            Some(_) => {
                return Err(GraphError::Decode {
                    what: "Graph member page".into(),
                    message: "@odata.nextLink is not a string".into(),
                })
            }
        };
        let Some(Value::Array(items)) = obj.remove("value") else {
            return Err(GraphError::Decode {
                what: "Graph member page".into(),
                message: "the page has no `value` array".into(),
            });
        };
        let mut users = Vec::with_capacity(items.len());
        let mut malformed = Vec::new();
        for item in items {
            // The cast should return users only; skip anything else defensively.
            let is_user = item
                .get("@odata.type")
                .and_then(|t| t.as_str())
                .is_none_or(|t| t.eq_ignore_ascii_case("#microsoft.graph.user"));
            if !is_user {
                continue;
            }
            match GraphUser::from_value(item) {
                Ok(u) => users.push(u),
                Err(m) => malformed.push(m),
            }
        }
        Ok(UserPage {
            users,
            next,
            malformed,
        })
    }

    /// Reads one user by object id or UPN; `None` when it does not exist.
    pub(crate) async fn user(
        &self,
        id_or_upn: &str,
        select: &[String],
    ) -> Result<Option<GraphUser>, GraphError> {
        let url = format!(
            "{}/users/{}?$select={}",
            self.api_root,
            urlencode(id_or_upn),
            select.join(",")
        );
        match self.get_json(&url).await {
            Ok(v) => GraphUser::from_value(v)
                .map(Some)
                .map_err(|m| GraphError::Decode {
                    what: "Graph user".into(),
                    message: m,
                }),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sends up to [`BATCH_LIMIT`] requests in `$batch`es and returns each answer by request id
    /// (status and body). Inner 429/5xx answers (and requests the batch left unanswered) are
    /// sent again, alone, under the retry policy (`Retry-After` honoured); any other status is
    /// the caller's to judge.
    async fn batch(
        &self,
        requests: Vec<BatchRequest>,
    ) -> Result<HashMap<String, (u16, Value)>, GraphError> {
        Ok(self.batch_sent(requests, true).await?.0)
    }

    /// [`Self::batch`], with the instant the oldest kept answer was sent. Without
    /// `retry_inner`, inner 429/5xx answers are returned as they are (the pacer still learns
    /// of a 429, so the next request waits for its `Retry-After`): a caller that must know how
    /// fresh its answers are asks again itself rather than wait here.
    async fn batch_sent(
        &self,
        requests: Vec<BatchRequest>,
        retry_inner: bool,
    ) -> Result<(HashMap<String, (u16, Value)>, Instant), GraphError> {
        let mut out = HashMap::with_capacity(requests.len());
        let mut pending = requests;
        let mut oldest: Option<Instant> = None;
        let batch_url = format!("{}/$batch", self.api_root);
        let mut attempts = self.retry.start();
        while !pending.is_empty() {
            let body: Vec<Value> = pending.iter().map(BatchRequest::to_json).collect();
            let (status, headers, resp, sent) = self
                .send_timed("POST", &batch_url, Some(&json!({ "requests": body })))
                .await?;
            oldest.get_or_insert(sent);
            if !(200..300).contains(&status) {
                return Err(self.api_error("POST", &batch_url, status, &resp));
            }
            let decode = |m: String| GraphError::Decode {
                what: "Graph $batch".into(),
                message: m,
            };
            let mut v: Value = serde_json::from_slice(&resp).map_err(|e| decode(e.to_string()))?;
            let responses = v
                .get_mut("responses")
                .and_then(|r| r.as_array_mut())
                .ok_or_else(|| decode("no `responses` array".into()))?;
            let mut retry = Vec::new();
            let mut max_wait: Option<Duration> = None;
            let mut answered: HashMap<String, (u16, Value)> = HashMap::new();
            // What the inner requests cost, for when the envelope's answer does not say but
            // theirs do (Graph documents `x-ms-resource-unit` per request): the sum of their
            // headers, one RU for an answered one without it. A Graph that reports no cost at
            // all keeps the estimate of one RU per HTTP request.
            let (mut inner_ru, mut inner_reported) = (0.0, false);
            for r in responses {
                let id = r
                    .get("id")
                    .and_then(|i| i.as_str())
                    .filter(|i| pending.iter().any(|p| p.id == *i))
                    .ok_or_else(|| decode("a response has an unknown id".into()))?
                    .to_string();
                let st = r.get("status").and_then(|s| s.as_u64()).unwrap_or(0) as u16;
                if st != 429 {
                    let ru = inner_resource_units(r);
                    inner_reported |= ru.is_some();
                    inner_ru += ru.unwrap_or(1.0);
                }
                if crate::retry::transience(st) != crate::retry::Transience::Final {
                    let ra = inner_header(r, "retry-after")
                        .and_then(|v| {
                            v.as_str()
                                .and_then(|s| s.parse::<u64>().ok())
                                .or(v.as_u64())
                        })
                        .map(Duration::from_secs);
                    if st == 429 {
                        self.pacer.throttled(self.priority, ra);
                    }
                    if retry_inner {
                        max_wait = max_wait.max(ra);
                        continue;
                    }
                }
                let body = r.get_mut("body").map(Value::take).unwrap_or(Value::Null);
                answered.insert(id, (st, body));
            }
            if inner_reported && !headers.contains_key("x-ms-resource-unit") {
                // `send_timed` charged the envelope its estimate of one RU already.
                self.pacer
                    .charge(self.priority, (inner_ru - 1.0_f64).max(0.0), None);
            }
            for p in pending {
                match answered.remove(&p.id) {
                    Some(a) => {
                        out.insert(p.id, a);
                    }
                    None => retry.push(p),
                }
            }
            if !retry.is_empty() {
                let attempt = attempts.attempts();
                let Some(delay) = attempts.retry(max_wait) else {
                    return Err(GraphError::Api {
                        method: "POST",
                        path: "/$batch".into(),
                        status: 429,
                        code: "TooManyRequests".into(),
                        message: format!(
                            "{} batched reads still throttled after {attempt} attempts",
                            retry.len()
                        ),
                        hint: String::new(),
                    });
                };
                tracing::debug!(
                    attempt,
                    again = retry.len(),
                    delay = ?delay,
                    "Graph $batch: some answers throttled or unavailable; sending them again"
                );
                tokio::time::sleep(delay).await;
            }
            pending = retry;
        }
        Ok((out, oldest.unwrap_or_else(Instant::now)))
    }

    /// Managers of up to [`BATCH_LIMIT`] users in one `$batch`; users without a manager map to
    /// `None`. Inner 429/5xx answers are retried (only those requests) under the retry policy.
    pub(crate) async fn managers(
        &self,
        user_ids: &[String],
        select: &[String],
    ) -> Result<HashMap<String, Option<GraphUser>>, GraphError> {
        let requests = user_ids
            .iter()
            .enumerate()
            .map(|(i, id)| BatchRequest::get(i.to_string(), manager_path(id, select)))
            .collect();
        let mut answers = self.batch(requests).await?;
        let mut out = HashMap::with_capacity(user_ids.len());
        for (i, uid) in user_ids.iter().enumerate() {
            let (status, body) = answers.remove(&i.to_string()).unwrap_or((0, Value::Null));
            out.insert(uid.clone(), self.manager_answer(uid, status, body)?);
        }
        Ok(out)
    }

    /// One `$batch` answer to a manager read: the manager, `None` for 404 (no manager).
    fn manager_answer(
        &self,
        user_id: &str,
        status: u16,
        body: Value,
    ) -> Result<Option<GraphUser>, GraphError> {
        self.object_answer(&format!("/users/{user_id}/manager"), status, body)
    }

    /// One `$batch` answer to a user read: the user, `None` for 404 (gone).
    fn user_answer(
        &self,
        user_id: &str,
        status: u16,
        body: Value,
    ) -> Result<Option<GraphUser>, GraphError> {
        self.object_answer(&format!("/users/{user_id}"), status, body)
    }

    /// One `$batch` answer to a GET of `path` that reads a user object (404: none).
    fn object_answer(
        &self,
        path: &str,
        status: u16,
        body: Value,
    ) -> Result<Option<GraphUser>, GraphError> {
        match status {
            200 => GraphUser::from_value(body)
                .map(Some)
                .map_err(|m| GraphError::Decode {
                    what: format!("Graph GET {path}"),
                    message: m,
                }),
            404 => Ok(None),
            other => {
                let body = serde_json::to_vec(&body).unwrap_or_default();
                Err(self.api_error("GET", &format!("{}{path}", self.api_root), other, &body))
            }
        }
    }

    /// Reads up to any number of users by id in `$batch`es of [`BATCH_LIMIT`]; a user that is
    /// gone maps to `None`.
    pub(crate) async fn users_by_id(
        &self,
        ids: &[String],
        select: &[String],
    ) -> Result<HashMap<String, Option<GraphUser>>, GraphError> {
        let mut out = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(BATCH_LIMIT) {
            let requests = chunk
                .iter()
                .enumerate()
                .map(|(i, id)| {
                    BatchRequest::get(
                        i.to_string(),
                        format!("/users/{}?$select={}", urlencode(id), select.join(",")),
                    )
                })
                .collect();
            let mut answers = self.batch(requests).await?;
            for (i, uid) in chunk.iter().enumerate() {
                let (status, body) = answers.remove(&i.to_string()).unwrap_or((0, Value::Null));
                let u = self.user_answer(uid, status, body)?;
                out.insert(uid.clone(), u);
            }
        }
        Ok(out)
    }

    /// Which of `groups` a user is a transitive member of (`checkMemberGroups`, in chunks of
    /// [`CHECK_MEMBER_GROUPS_MAX`]); none for a user that is gone.
    pub(crate) async fn member_groups(
        &self,
        user_id: &str,
        groups: &[String],
    ) -> Result<Vec<String>, GraphError> {
        let requests = groups
            .chunks(CHECK_MEMBER_GROUPS_MAX)
            .enumerate()
            .map(|(i, ids)| BatchRequest {
                id: i.to_string(),
                method: "POST",
                url: format!("/users/{}/checkMemberGroups", urlencode(user_id)),
                body: Some(json!({ "groupIds": ids })),
            })
            .collect();
        let mut out = Vec::new();
        for (_, (status, body)) in self.batch(requests).await? {
            match status {
                200 => out.extend(
                    body.get("value")
                        .and_then(|v| v.as_array())
                        .into_iter()
                        .flatten()
                        .filter_map(|x| x.as_str().map(str::to_string)),
                ),
                404 => {}
                other => {
                    let body = serde_json::to_vec(&body).unwrap_or_default();
                    return Err(self.api_error(
                        "POST",
                        &format!("{}/users/{user_id}/checkMemberGroups", self.api_root),
                        other,
                        &body,
                    ));
                }
            }
        }
        Ok(out)
    }

    /// Reads users afresh to confirm a deactivation: each user (`None`: 404, gone), its manager,
    /// and which of `groups` it is a transitive member of (`checkMemberGroups`), in `$batch`es.
    /// A user whose reads failed carries the error; the others are still answered.
    pub(crate) async fn fresh_reads(
        &self,
        user_ids: &[String],
        user_select: &[String],
        manager_select: Option<&[String]>,
        groups: &[String],
    ) -> Result<HashMap<String, Result<FreshRead, GraphError>>, GraphError> {
        use futures::StreamExt;
        let group_chunks: Vec<&[String]> = groups.chunks(CHECK_MEMBER_GROUPS_MAX).collect();
        // One `$batch` per user: each user's answers are as fresh as its own round trip, so a
        // caller can tell a fresh confirmation from an old one user by user
        // (`FreshRead::asked`, taken after any pause for throttling). An inner 429 or 5xx is
        // that user's error (`GraphError::is_transient`), returned at once: waiting out its
        // Retry-After here would age every other user's answers too; the caller asks again.
        let mut sends = Vec::with_capacity(user_ids.len());
        for uid in user_ids {
            let mut requests = Vec::with_capacity(2 + group_chunks.len());
            requests.push(BatchRequest::get(
                "u".to_string(),
                format!(
                    "/users/{}?$select={}",
                    urlencode(uid),
                    user_select.join(",")
                ),
            ));
            if let Some(sel) = manager_select {
                requests.push(BatchRequest::get("m".to_string(), manager_path(uid, sel)));
            }
            for (g, ids) in group_chunks.iter().enumerate() {
                requests.push(BatchRequest {
                    id: format!("g{g}"),
                    method: "POST",
                    url: format!("/users/{}/checkMemberGroups", urlencode(uid)),
                    body: Some(json!({ "groupIds": ids })),
                });
            }
            sends.push(async move { (uid, self.batch_sent(requests, false).await) });
        }
        let mut answered = futures::stream::iter(sends).buffer_unordered(FRESH_READ_CONCURRENCY);
        let mut out = HashMap::with_capacity(user_ids.len());
        while let Some((uid, answers)) = answered.next().await {
            let (mut answers, asked) = answers?;
            let mut take = |k: String| answers.remove(&k).unwrap_or((0, Value::Null));
            let read = (|| {
                let (st, body) = take("u".to_string());
                let user = self.user_answer(uid, st, body)?;
                let manager = match manager_select {
                    Some(_) => {
                        let (st, body) = take("m".to_string());
                        match (&user, st) {
                            (None, _) => None,
                            _ => self.manager_answer(uid, st, body)?,
                        }
                    }
                    None => None,
                };
                let mut member_of = Vec::new();
                for g in 0..group_chunks.len() {
                    let (st, body) = take(format!("g{g}"));
                    match (st, &user) {
                        (200, _) => member_of.extend(
                            body.get("value")
                                .and_then(|v| v.as_array())
                                .map(|a| {
                                    a.iter()
                                        .filter_map(|x| x.as_str().map(str::to_string))
                                        .collect::<Vec<_>>()
                                })
                                .unwrap_or_default(),
                        ),
                        // A user that is gone is in no group.
                        (404, None) => {}
                        (other, _) => {
                            let body = serde_json::to_vec(&body).unwrap_or_default();
                            return Err(self.api_error(
                                "POST",
                                &format!("{}/users/{uid}/checkMemberGroups", self.api_root),
                                other,
                                &body,
                            ));
                        }
                    }
                }
                Ok(FreshRead {
                    user,
                    manager,
                    member_of,
                    asked,
                })
            })();
            out.insert(uid.clone(), read);
        }
        Ok(out)
    }

    /// The manager of one user, `None` when there is none.
    pub(crate) async fn manager(
        &self,
        user_id: &str,
        select: &[String],
    ) -> Result<Option<GraphUser>, GraphError> {
        let mut m = self.managers(&[user_id.to_string()], select).await?;
        Ok(m.remove(user_id).flatten())
    }

    /// The groups a user (object id or UPN) is a member of: directly (`memberOf`) or at any
    /// depth (`transitiveMemberOf`). Directory roles and administrative units are left out;
    /// `display_name` is empty when the app may not read the group's properties.
    pub async fn user_groups(
        &self,
        id_or_upn: &str,
        transitive: bool,
    ) -> Result<Vec<GraphGroup>, GraphError> {
        let relation = if transitive {
            "transitiveMemberOf"
        } else {
            "memberOf"
        };
        let url = format!(
            "{}/users/{}/{relation}?$select=id,displayName",
            self.api_root,
            urlencode(id_or_upn)
        );
        self.group_list(&url).await
    }

    /// Every group nested (at any depth) in a group.
    pub(crate) async fn nested_groups(
        &self,
        group_id: &str,
    ) -> Result<Vec<GraphGroup>, GraphError> {
        let url = format!(
            "{}/groups/{}/transitiveMembers/microsoft.graph.group?$select=id,displayName&$top=999",
            self.api_root,
            urlencode(group_id)
        );
        self.group_list(&url).await
    }

    /// The object ids of a user's direct reports that are users (org contacts left out).
    ///
    /// For a manager that comes back (restored from the deleted items): Graph gives its
    /// reports their manager again but notifies only about the manager, so the worker reads
    /// them again.
    pub async fn direct_reports(&self, user_id: &str) -> Result<Vec<String>, GraphError> {
        let url = format!(
            "{}/users/{}/directReports/microsoft.graph.user?$select=id&$top=999",
            self.api_root,
            urlencode(user_id)
        );
        let items = self
            .object_list(
                &url,
                "Graph direct reports listing",
                "#microsoft.graph.user",
            )
            .await?;
        Ok(items
            .iter()
            .filter_map(|item| item.get("id").and_then(|i| i.as_str()))
            .map(str::to_string)
            .collect())
    }

    /// Reads a listing of directory objects page by page and keeps the groups.
    async fn group_list(&self, first: &str) -> Result<Vec<GraphGroup>, GraphError> {
        let items = self
            .object_list(first, "Graph group listing", "#microsoft.graph.group")
            .await?;
        Ok(items
            .iter()
            .filter_map(|item| {
                let id = item.get("id").and_then(|i| i.as_str())?;
                Some(GraphGroup {
                    id: id.to_string(),
                    display_name: item
                        .get("displayName")
                        .and_then(|n| n.as_str())
                        .unwrap_or("")
                        .to_string(),
                })
            })
            .collect())
    }

    /// Reads a listing of directory objects page by page (`@odata.nextLink`, only under the
    /// API root, never a page linking to itself, at most 10,000 pages) and keeps the items of
    /// type `odata_type` (or of no stated type: a listing cast to that type).
    async fn object_list(
        &self,
        first: &str,
        what: &str,
        odata_type: &str,
    ) -> Result<Vec<Value>, GraphError> {
        let decode = |m: String| GraphError::Decode {
            what: what.into(),
            message: m,
        };
        let mut out = Vec::new();
        let mut next = Some(first.to_string());
        let mut pages = 0u32;
        while let Some(url) = next.take() {
            pages += 1;
            if !url.starts_with(&self.api_root) || pages > 10_000 {
                return Err(decode(format!(
                    "refusing to follow a nextLink outside {} or beyond 10,000 pages: {url}",
                    self.api_root
                )));
            }
            let mut v = self.get_json(&url).await?;
            next = match v.get("@odata.nextLink") {
                Some(Value::String(s)) if *s == url => {
                    return Err(decode("a page links to itself".into()))
                }
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            };
            let Some(Value::Array(items)) = v.get_mut("value").map(Value::take) else {
                return Err(decode("the page has no `value` array".into()));
            };
            out.extend(items.into_iter().filter(|item| {
                item.get("@odata.type")
                    .and_then(|t| t.as_str())
                    .is_none_or(|t| t.eq_ignore_ascii_case(odata_type))
            }));
        }
        Ok(out)
    }
}

/// Header `name` (any case) of one inner `$batch` answer (its `headers` object).
fn inner_header<'a>(answer: &'a Value, name: &str) -> Option<&'a Value> {
    answer
        .get("headers")?
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The `x-ms-resource-unit` of one inner `$batch` answer, if it says.
fn inner_resource_units(answer: &Value) -> Option<f64> {
    let v = inner_header(answer, "x-ms-resource-unit")?;
    let ru = v
        .as_str()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .or(v.as_f64())?;
    (ru.is_finite() && ru >= 0.0).then_some(ru)
}

fn parse_aadsts(desc: &str) -> Option<u64> {
    let rest = desc.split("AADSTS").nth(1)?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A one-request-per-connection HTTP stub: a token for any `oauth2` request, else
    /// `answer(request target)` (a JSON body, or 404 when `None`); records the request lines.
    async fn stub(
        answer: impl Fn(&str, &str) -> Option<Value> + Send + Sync + 'static,
    ) -> (String, Arc<Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (b, log) = (base.clone(), Arc::clone(&seen));
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let (b, log, answer) = (b.clone(), Arc::clone(&log), Arc::clone(&answer));
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    let head_end = loop {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < head_end + len {
                        let n = sock.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                    }
                    let line = head.lines().next().unwrap_or("").to_string();
                    let target = line.split(' ').nth(1).unwrap_or("").to_string();
                    log.lock().unwrap().push(line);
                    let body = if target.contains("/oauth2/") {
                        Some(
                            json!({"token_type": "Bearer", "expires_in": 3599, "access_token": "at"}),
                        )
                    } else {
                        answer(&b, &target)
                    };
                    let (status, body) = match body {
                        Some(v) => ("200 OK", v.to_string()),
                        None => (
                            "404 Not Found",
                            json!({"error": {"code": "Request_ResourceNotFound", "message": "no"}})
                                .to_string(),
                        ),
                    };
                    let resp = format!(
                        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                    let _ = sock.shutdown().await;
                });
            }
        });
        (base, seen)
    }

    fn stub_client(base: &str) -> GraphClient {
        GraphClient::new(
            GraphSettings {
                tenant_id: "t".into(),
                client_id: "c".into(),
                credential: ClientCredential::Secret(SecretString::from("s")),
                login_url: Url::parse(base).unwrap(),
                graph_url: Url::parse(base).unwrap(),
            },
            reqwest::Client::builder().no_proxy().build().unwrap(),
        )
    }

    /// A `$batch` answer whose envelope says nothing of its cost while each inner answer does
    /// (as Graph documents the header, per request) is charged to the pacer as the sum of the
    /// inner costs; with no cost anywhere, as one request (the estimate).
    #[tokio::test]
    async fn a_batch_is_charged_what_its_inner_answers_say_they_cost() {
        for (inner_headers, expected) in [
            (json!({"x-ms-resource-unit": "3"}), 6),
            (json!({"X-MS-Resource-Unit": 2}), 4),
            (json!({}), 1),
        ] {
            let h = inner_headers.clone();
            let (base, _) = stub(move |_, target| {
                target.ends_with("/$batch").then(|| {
                    json!({"responses": [
                        {"id": "0", "status": 200, "headers": h, "body": {"id": "m1"}},
                        {"id": "1", "status": 200, "headers": h, "body": {"id": "m2"}},
                    ]})
                })
            })
            .await;
            let graph = stub_client(&base).background();
            let got = graph
                .managers(&["a".into(), "b".into()], &["id".into()])
                .await
                .unwrap();
            assert_eq!(got.len(), 2);
            let stats = graph.pacer.stats();
            assert_eq!(stats.ru_low, expected, "inner headers {inner_headers}");
        }
    }

    #[test]
    fn inner_resource_units_read_strings_and_numbers_and_refuse_nonsense() {
        let with = |h: Value| json!({"id": "0", "status": 200, "headers": h});
        assert_eq!(
            inner_resource_units(&with(json!({"x-ms-resource-unit": "1"}))),
            Some(1.0)
        );
        assert_eq!(
            inner_resource_units(&with(json!({"x-ms-resource-unit": 5}))),
            Some(5.0)
        );
        assert_eq!(
            inner_resource_units(&with(json!({"x-ms-resource-unit": "-1"}))),
            None
        );
        assert_eq!(
            inner_resource_units(&with(json!({"x-ms-resource-unit": "NaN"}))),
            None
        );
        assert_eq!(inner_resource_units(&with(json!({"other": "1"}))), None);
        assert_eq!(inner_resource_units(&json!({"id": "0"})), None);
    }

    #[tokio::test]
    async fn direct_reports_keeps_users_follows_pages_and_refuses_bad_links() {
        const FIRST: &str = "/directReports/microsoft.graph.user?$select=id&$top=999";
        const SECOND: &str =
            "/directReports/microsoft.graph.user?$select=id&$top=999&$skiptoken=p2";
        let (base, seen) = stub(|base, target| {
            let user = target.strip_prefix("/v1.0/users/")?;
            let (who, rest) = user.split_once('/')?;
            let again = format!("{base}/v1.0/users/{who}{FIRST}");
            let away =
                json!({"@odata.nextLink": "http://elsewhere.invalid/v1.0/users/x", "value": []});
            Some(match (who, rest == &FIRST[1..]) {
                ("m%40x", true) => json!({
                    "@odata.nextLink": format!("{base}/v1.0/users/m%40x{SECOND}"),
                    "value": [
                        {"@odata.type": "#microsoft.graph.user", "id": "a"},
                        {"@odata.type": "#microsoft.graph.orgContact", "id": "contact"},
                        {"id": "b"},
                        {"@odata.type": "#microsoft.graph.user"},
                    ]
                }),
                ("m%40x", false) if rest == &SECOND[1..] => json!({"value": [{"id": "c"}]}),
                ("self", true) => json!({"@odata.nextLink": again, "value": []}),
                ("away", true) => away,
                ("novalue", true) => json!({"items": []}),
                _ => return None,
            })
        })
        .await;
        let g = stub_client(&base);
        assert_eq!(g.direct_reports("m@x").await.unwrap(), ["a", "b", "c"]);
        let lines = seen.lock().unwrap().clone();
        assert_eq!(
            lines
                .iter()
                .filter(|l| !l.contains("oauth2"))
                .cloned()
                .collect::<Vec<_>>(),
            [
                format!("GET /v1.0/users/m%40x{FIRST} HTTP/1.1"),
                format!("GET /v1.0/users/m%40x{SECOND} HTTP/1.1"),
            ]
        );
        for (who, why) in [
            ("self", "links to itself"),
            ("away", "outside"),
            ("novalue", "no `value`"),
        ] {
            match g.direct_reports(who).await {
                Err(GraphError::Decode { what, message }) => {
                    assert_eq!(what, "Graph direct reports listing", "{who}: {message}");
                    assert!(message.contains(why), "{who}: {message}");
                }
                other => panic!("{who}: {other:?}"),
            }
        }
        let err = g.direct_reports("gone").await.unwrap_err();
        assert_eq!(err.status(), Some(404), "{err}");
    }

    #[test]
    fn aadsts_codes_become_advice() {
        assert!(aadsts_advice(Some(7000215), "").contains("Secret ID"));
        assert!(aadsts_advice(Some(7000222), "").contains("expired"));
        assert_eq!(
            parse_aadsts("AADSTS7000215: Invalid client secret provided."),
            Some(7000215)
        );
        assert!(aadsts_advice(Some(1234), "AADSTS1234: odd\ntrace").ends_with("odd"));
        assert!(aadsts_advice(Some(700027), "").contains("Certificates & secrets > Certificates"));
        assert!(aadsts_advice(Some(700024), "").contains("clock"));
        for c in [70021, 700211, 700212, 700213] {
            let a = aadsts_advice(
                Some(c),
                "AADSTS700212: No matching federated identity record",
            );
            assert!(
                a.contains(&format!("AADSTS{c}")) && a.contains("api://AzureADTokenExchange"),
                "{a}"
            );
        }
    }
}
