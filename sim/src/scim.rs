//! In-process SCIM 2.0 LMS server simulator (RFC 7643 / RFC 7644).
//!
//! Serves `/Users`, `/Users/.search`, `/ServiceProviderConfig`, `/Schemas`, `/ResourceTypes`
//! under `http://127.0.0.1:PORT/scim/v2` with bearer-token auth. Defaults are RFC-strict;
//! Entra-compatible leniency is opt-in ([`ScimSimConfig::lenient_ops`]), and so are the
//! behaviours of partial LMS servers ([`ScimSimConfig::dialect`], see [`SimDialect`]). Faults
//! (429, 500, create-then-500, 503) are injected from a seeded RNG; off by default, an LMS's
//! limits can be switched on too: added latency, a token-bucket rate limit (429 +
//! `Retry-After`) and a concurrency limit (503 + `Retry-After`), see [`ScimFaults`].
//! `docs/scim.md` describes the wire facts and quirks this follows.
//!
//! Storage: a `HashMap` by id plus case-folded `userName` and exact `externalId` indexes
//! (used for top-level `eq` filters) and a creation-order map for paging, so 100,000 users
//! are fine.

mod bulk;
mod dialect;
mod error;
mod filter;
mod patch;
mod schema;
mod store;

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use actix_web::dev::ServerHandle;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::{Method, StatusCode};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

pub use bulk::SimBulk;
pub use dialect::{SimDialect, SimFilter};
use error::{ScimError, SCIM_CONTENT_TYPE};
use schema::{Registry, LIST_RESPONSE_URN, SEARCH_REQUEST_URN};
use store::{normalize_resource, project, render, Opts, State};

/// Path prefix of every endpoint (a versioned base URL, RFC 7644 §3.13).
const BASE_PATH: &str = "/scim/v2";
/// Request bodies above this size get 413.
const MAX_BODY_BYTES: usize = 1 << 20;
const WORKERS: usize = 2;

/// Server behaviour. Defaults are RFC-strict (docs/scim.md).
#[derive(Clone, Debug)]
pub struct ScimSimConfig {
    /// Required bearer token.
    pub token: String,
    /// Custom extension schema the server declares, e.g.
    /// `("urn:ietf:params:scim:schemas:extension:acme:2.0:User", vec!["officeLocation", …])`.
    /// `None` = only core + enterprise.
    pub custom_extension: Option<(String, Vec<String>)>,
    /// Default true: `/ServiceProviderConfig`, `/Schemas`, `/ResourceTypes`; false → 404.
    pub serve_discovery: bool,
    /// Default false: PATCH `op` must be lowercase `add`/`remove`/`replace` and booleans must
    /// be JSON booleans. True = Entra-compatible profile: `op` and PATCH member names in any
    /// case, `"True"`/`"False"` strings for boolean attributes (POST, PUT, PATCH), `manager`
    /// as a bare id string, and `remove` with a `value` array removing only those values.
    pub lenient_ops: bool,
    /// Default false: PATCH answers 200 + full resource; true → 204 without body.
    pub patch_returns_204: bool,
    /// Default 100: cap on `count` (advertised as `filter.maxResults`).
    pub max_page_size: usize,
    /// Default strict: the partial-server behaviours to reproduce.
    pub dialect: SimDialect,
    /// Default `None`: `/Bulk` answers 501 and `ServiceProviderConfig` says
    /// `bulk.supported: false`. `Some`: bulk is advertised with these limits and served.
    pub bulk: Option<SimBulk>,
}

impl Default for ScimSimConfig {
    fn default() -> Self {
        ScimSimConfig {
            token: "sim-scim-token".to_string(),
            custom_extension: None,
            serve_discovery: true,
            lenient_ops: false,
            patch_returns_204: false,
            max_page_size: 100,
            dialect: SimDialect::default(),
            bulk: None,
        }
    }
}

/// Injected faults, drawn from an RNG seeded with `seed` (reseeded by `set_faults`).
#[derive(Clone, Debug, Default)]
pub struct ScimFaults {
    /// Fraction of requests answered 429 with `Retry-After: retry_after_secs`.
    pub rate_429: f64,
    pub retry_after_secs: u64,
    /// Fraction of requests answered 500 before doing anything.
    pub rate_500: f64,
    /// Fraction of `POST /Users` that create the user and then answer 500 (lost response).
    pub rate_500_after_create: f64,
    pub seed: u64,
    /// Faults of single users (by externalId): every request about that user (`/Users/{id}`,
    /// or a `POST /Users` carrying that externalId) meets them, all others do not.
    pub users: Vec<UserFault>,
    /// Added to every answer (throttled ones included), slept outside every lock.
    pub latency: std::time::Duration,
    /// A token bucket over all authenticated requests: past it, 429 + `Retry-After`.
    pub rate_limit: Option<RateLimit>,
    /// At most this many requests in progress at once (the latency included): past it, 503 +
    /// `Retry-After` (a server or proxy shedding load).
    pub concurrency_limit: Option<ConcurrencyLimit>,
    /// Added to a `POST /Bulk` per operation it carries (on top of `latency`): a bulk request
    /// does the work of its operations.
    pub bulk_op_latency: std::time::Duration,
}

/// A token bucket of `per_second` tokens a second holding at most `burst`; a request that
/// finds it empty is answered 429 with `Retry-After` (when the next token is due, in whole
/// seconds, at least 1; as an HTTP date with `http_date`).
#[derive(Clone, Copy, Debug)]
pub struct RateLimit {
    pub per_second: f64,
    /// Capacity; the bucket starts full.
    pub burst: f64,
    pub http_date: bool,
}

impl RateLimit {
    /// `per_second` with one second's worth of burst (what the issue measured against).
    pub fn per_second(per_second: f64) -> RateLimit {
        RateLimit {
            per_second,
            burst: per_second.max(1.0),
            http_date: false,
        }
    }
}

/// At most `max` requests in progress; the next is answered 503 with `Retry-After:
/// retry_after_secs`.
#[derive(Clone, Copy, Debug)]
pub struct ConcurrencyLimit {
    pub max: usize,
    pub retry_after_secs: u64,
}

/// A throttling answer the simulator gave (kept by [`ScimSim::throttles`]).
#[derive(Clone, Debug)]
pub struct ScimThrottle {
    pub at: std::time::Instant,
    pub method: String,
    /// 429 or 503.
    pub status: u16,
    /// What `Retry-After` said, in seconds (an HTTP date is converted).
    pub retry_after_secs: u64,
}

/// A fault one user's requests meet.
#[derive(Clone, Debug)]
pub struct UserFault {
    pub external_id: String,
    pub kind: UserFaultKind,
}

#[derive(Clone, Debug)]
pub enum UserFaultKind {
    /// Answer with this status and a SCIM error body, doing nothing.
    Status(u16),
    /// Wait this long before answering (a client timeout meets it first).
    Delay(std::time::Duration),
    /// Answer 200 with a body far beyond any sensible size (8 MiB of JSON).
    Oversized,
    /// The first `times` requests answered 503 with `Retry-After: retry_after_secs`, doing
    /// nothing; later ones are served.
    Unavailable { times: u32, retry_after_secs: u64 },
}

/// One write the simulator committed to its store (kept by [`ScimSim::record_writes`]), so
/// tests can tell exactly when a user was created, changed, deactivated or deleted.
#[derive(Clone, Debug)]
pub struct ScimWrite {
    /// When the write was applied (under the store's write lock).
    pub at: std::time::Instant,
    /// `"POST"`, `"PUT"`, `"PATCH"` or `"DELETE"`.
    pub method: &'static str,
    /// The user's server id.
    pub id: String,
    /// externalId after the write (before it, for a DELETE).
    pub external_id: Option<String>,
    /// userName after the write (before it, for a DELETE).
    pub user_name: Option<String>,
    /// `active` before the write; `None` when the user did not exist or had no `active`.
    pub active_before: Option<bool>,
    /// `active` after the write; `None` after a DELETE or when absent.
    pub active_after: Option<bool>,
    /// Attributes whose value the write changed: top-level names, and `URN:name` inside an
    /// extension (empty for a write that changed nothing).
    pub changed: Vec<String>,
}

/// The attributes that differ between two stored attribute maps (see [`ScimWrite::changed`]).
fn changed_attrs(
    before: Option<&Map<String, Value>>,
    after: Option<&Map<String, Value>>,
) -> Vec<String> {
    let empty = Map::new();
    let (b, a) = (before.unwrap_or(&empty), after.unwrap_or(&empty));
    let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        let (x, y) = (b.get(k), a.get(k));
        if x == y {
            continue;
        }
        match (x, y) {
            (Some(Value::Object(x)), Some(Value::Object(y))) if k.starts_with("urn:") => {
                for sub in changed_attrs(Some(x), Some(y)) {
                    out.push(format!("{k}:{sub}"));
                }
            }
            _ => out.push(k.clone()),
        }
    }
    out
}

struct FaultState {
    faults: ScimFaults,
    rng: StdRng,
    /// Token bucket of `faults.rate_limit`: tokens and when they were last topped up.
    tokens: f64,
    refilled: std::time::Instant,
    /// Requests each `Unavailable` user fault has refused so far (by externalId).
    refused: HashMap<String, u32>,
}

impl FaultState {
    fn roll(&mut self, rate: f64) -> bool {
        rate > 0.0 && self.rng.random::<f64>() < rate
    }

    /// Takes a token of the rate limit; `Err(wait)` when the bucket is empty (`wait`: until
    /// the next token).
    fn take_token(&mut self) -> Result<(), std::time::Duration> {
        let Some(rl) = self.faults.rate_limit else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        let rate = rl.per_second.max(0.001);
        let dt = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + dt * rate).min(rl.burst.max(1.0));
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64(
                (1.0 - self.tokens) / rate,
            ))
        }
    }
}

/// Counts a request in progress for [`ConcurrencyLimit`] while alive.
struct InProgress<'a>(&'a AtomicUsize);

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct Inner {
    cfg: ScimSimConfig,
    reg: Registry,
    base_url: String,
    state: RwLock<State>,
    faults: Mutex<FaultState>,
    down: AtomicBool,
    counts: Mutex<HashMap<String, u64>>,
    /// `None` unless [`ScimSim::record_writes`] turned the log on.
    writes: Mutex<Option<Vec<ScimWrite>>>,
    /// Requests in progress (for [`ConcurrencyLimit`]).
    in_progress: AtomicUsize,
    /// Every 429 and 503 the rate and concurrency limits and `Unavailable` faults answered.
    throttles: Mutex<Vec<ScimThrottle>>,
}

impl Inner {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
    fn faults(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn count(&self, kind: &str) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *c.entry(kind.to_string()).or_insert(0) += 1;
    }
    fn logging_writes(&self) -> bool {
        self.writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Logs a committed write (when the log is on); call it with the store's write lock held.
    fn log_write(
        &self,
        method: &'static str,
        id: &str,
        before: Option<&Map<String, Value>>,
        after: Option<&Map<String, Value>>,
    ) {
        let mut log = self.writes.lock().unwrap_or_else(|e| e.into_inner());
        let Some(log) = log.as_mut() else {
            return;
        };
        let text = |m: Option<&Map<String, Value>>, k: &str| {
            m.and_then(|m| m.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let active = |m: Option<&Map<String, Value>>| {
            m.and_then(|m| m.get("active")).and_then(Value::as_bool)
        };
        let last = after.or(before);
        log.push(ScimWrite {
            at: std::time::Instant::now(),
            method,
            id: id.to_string(),
            external_id: text(last, "externalId"),
            user_name: text(last, "userName"),
            active_before: active(before),
            active_after: active(after),
            changed: changed_attrs(before, after),
        });
    }

    fn opts(&self) -> Opts {
        Opts {
            lenient: self.cfg.lenient_ops,
        }
    }
    fn render_id(&self, st: &State, id: &str) -> Option<Value> {
        st.users
            .get(id)
            .map(|r| render(&self.reg, r, &self.base_url))
    }
}

/// A running simulator. Stops when dropped (without waiting) or by [`ScimSim::stop`].
pub struct ScimSim {
    inner: Arc<Inner>,
    handle: Option<ServerHandle>,
    join: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    base_url: String,
}

impl std::fmt::Debug for ScimSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScimSim")
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

impl ScimSim {
    /// Binds 127.0.0.1:0, spawns the actix server on the current tokio runtime and returns
    /// once the socket is listening.
    pub async fn start(cfg: ScimSimConfig) -> std::io::Result<ScimSim> {
        let listener = TcpListener::bind(("127.0.0.1", 0))?;
        let addr = listener.local_addr()?;
        let base_url = format!("http://{addr}{BASE_PATH}");
        let case_sensitive = cfg.dialect.case_sensitive_user_names;
        let inner = Arc::new(Inner {
            reg: Registry::new(cfg.custom_extension.as_ref()),
            cfg,
            base_url: base_url.clone(),
            state: RwLock::new(State::new(case_sensitive)),
            faults: Mutex::new(FaultState {
                faults: ScimFaults::default(),
                rng: StdRng::seed_from_u64(0),
                tokens: 0.0,
                refilled: std::time::Instant::now(),
                refused: HashMap::new(),
            }),
            down: AtomicBool::new(false),
            counts: Mutex::new(HashMap::new()),
            writes: Mutex::new(None),
            in_progress: AtomicUsize::new(0),
            throttles: Mutex::new(Vec::new()),
        });
        let data = web::Data::from(inner.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(dispatch))
        })
        .workers(WORKERS)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        let handle = server.handle();
        let join = tokio::spawn(server);
        tracing::debug!(%base_url, "SCIM simulator listening");
        Ok(ScimSim {
            inner,
            handle: Some(handle),
            join: Some(join),
            base_url,
        })
    }

    /// e.g. `http://127.0.0.1:PORT/scim/v2` (all endpoints under it).
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    /// The bearer token the server expects.
    pub fn token(&self) -> String {
        self.inner.cfg.token.clone()
    }

    /// Replaces the faults; the rate limit's bucket starts full.
    pub fn set_faults(&self, f: ScimFaults) {
        let mut fs = self.inner.faults();
        fs.rng = StdRng::seed_from_u64(f.seed);
        fs.tokens = f.rate_limit.map_or(0.0, |r| r.burst.max(1.0));
        fs.refilled = std::time::Instant::now();
        fs.refused.clear();
        fs.faults = f;
    }

    /// The 429s and 503s the limits and `Unavailable` faults answered, in order.
    pub fn throttles(&self) -> Vec<ScimThrottle> {
        self.inner
            .throttles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// All users as full JSON resources (as GET would return them), in creation order.
    pub fn users(&self) -> Vec<Value> {
        let st = self.inner.read();
        st.order
            .values()
            .filter_map(|id| self.inner.render_id(&st, id))
            .collect()
    }

    /// Number of stored users.
    pub fn user_count(&self) -> usize {
        self.inner.read().users.len()
    }

    /// A user by server id.
    pub fn user(&self, id: &str) -> Option<Value> {
        let st = self.inner.read();
        self.inner.render_id(&st, id)
    }

    /// The first-created user with this `externalId` (case-exact).
    pub fn user_by_external_id(&self, external_id: &str) -> Option<Value> {
        let st = self.inner.read();
        let id = st
            .by_external_id
            .get(external_id)
            .and_then(|ids| {
                ids.iter()
                    .filter_map(|i| st.users.get(i))
                    .min_by_key(|r| r.seq)
            })
            .map(|r| r.id.clone())?;
        self.inner.render_id(&st, &id)
    }

    /// Case-insensitive (`userName` is `caseExact: false`).
    pub fn user_by_user_name(&self, user_name: &str) -> Option<Value> {
        let st = self.inner.read();
        let id = st.id_by_user_name(user_name)?.clone();
        self.inner.render_id(&st, &id)
    }

    /// Inserts a user as if made by hand in the LMS (validated like a POST); returns its id.
    pub fn insert_user(&self, resource: Value) -> Result<String, String> {
        let mut attrs = normalize_resource(&self.inner.reg, &resource, self.inner.opts())
            .map_err(|e| e.to_string())?;
        self.inner.cfg.dialect.shape(&mut attrs);
        self.inner.write().insert(attrs).map_err(|e| e.to_string())
    }

    /// Removes a user directly (as if deleted by hand in the LMS). False when absent.
    pub fn delete_user(&self, id: &str) -> bool {
        self.inner.write().delete(id)
    }

    /// Requests received, by `"METHOD"` (`"GET"`, `"POST"`, `"PATCH"`, `"PUT"`,
    /// `"DELETE"`; every request counts, including rejected and faulted ones) and by the
    /// injected outcomes `"429"`, `"500"` (both fault kinds) and `"503"` (server down).
    pub fn request_count(&self, kind: &str) -> u64 {
        let c = self.inner.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.get(kind).copied().unwrap_or(0)
    }

    /// Forgets the request counts and the throttle log.
    pub fn reset_counts(&self) {
        self.inner
            .counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        self.inner
            .throttles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Starts (true: from now on, empty) or stops (false: and forgets) keeping the log of
    /// committed writes ([`ScimWrite`]).
    pub fn record_writes(&self, on: bool) {
        *self.inner.writes.lock().unwrap_or_else(|e| e.into_inner()) = on.then(Vec::new);
    }

    /// The writes kept since [`ScimSim::record_writes`], in the order they were applied.
    pub fn writes(&self) -> Vec<ScimWrite> {
        self.inner
            .writes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }

    /// Make the server answer 503 to everything (target down) or resume.
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::SeqCst);
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.stop(false).await;
        }
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }
}

impl Drop for ScimSim {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            // The stop command is sent immediately; the returned future only waits for it.
            drop(h.stop(false));
        }
    }
}

fn scim_json(status: StatusCode, body: &Value) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CONTENT_TYPE, SCIM_CONTENT_TYPE))
        .body(body.to_string())
}

fn authorized(req: &HttpRequest, token: &str) -> bool {
    let Some(h) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
    else {
        return false;
    };
    let mut parts = h.trim().splitn(2, ' ');
    let scheme = parts.next().unwrap_or_default();
    let cred = parts.next().unwrap_or_default().trim();
    scheme.eq_ignore_ascii_case("bearer") && !cred.is_empty() && cred == token
}

async fn read_body(req: &HttpRequest, mut payload: web::Payload) -> Result<Vec<u8>, ScimError> {
    let too_large = || {
        ScimError::new(
            413,
            None,
            format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk
            .map_err(|e| ScimError::invalid_syntax(format!("could not read the body: {e}")))?;
        if body.len() + chunk.len() > MAX_BODY_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Every request lands here: down → auth → faults → body → route.
async fn dispatch(
    req: HttpRequest,
    payload: web::Payload,
    inner: web::Data<Inner>,
) -> HttpResponse {
    inner.count(req.method().as_str());
    if inner.down.load(Ordering::SeqCst) {
        inner.count("503");
        return ScimError::new(503, None, "the service is unavailable").response();
    }
    if !authorized(&req, &inner.cfg.token) {
        if inner.cfg.dialect.loose_errors {
            return HttpResponse::Unauthorized()
                .content_type("text/html")
                .finish();
        }
        return ScimError::new(401, None, "missing or invalid bearer token").response();
    }
    let _in_progress = InProgress(&inner.in_progress);
    let running = inner.in_progress.fetch_add(1, Ordering::SeqCst) + 1;
    let (latency, limited) = {
        let mut fs = inner.faults();
        let over = fs
            .faults
            .concurrency_limit
            .filter(|c| running > c.max.max(1))
            .map(|c| (503, c.retry_after_secs, false));
        let limited = match over {
            Some(o) => Some(o),
            None => fs.take_token().err().map(|wait| {
                let http_date = fs.faults.rate_limit.is_some_and(|r| r.http_date);
                (429, wait.as_secs_f64().ceil().max(1.0) as u64, http_date)
            }),
        };
        (fs.faults.latency, limited)
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    if let Some((status, secs, http_date)) = limited {
        return throttled(&inner, &req, status, secs, http_date);
    }
    {
        let mut fs = inner.faults();
        let (r429, secs, r500) = (
            fs.faults.rate_429,
            fs.faults.retry_after_secs,
            fs.faults.rate_500,
        );
        if fs.roll(r429) {
            drop(fs);
            inner.count("429");
            // Not in RFC 7644's table, but real servers send it (docs/scim.md).
            let mut resp = ScimError::new(429, None, "too many requests").response();
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return resp;
        }
        if fs.roll(r500) {
            drop(fs);
            inner.count("500");
            return ScimError::new(500, None, "injected internal error").response();
        }
    }
    let body = match read_body(&req, payload).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let per_op = inner.faults().faults.bulk_op_latency;
    if !per_op.is_zero() && req.method() == Method::POST && req.path().ends_with("/Bulk") {
        let n = bulk::operation_count(&body) as u32;
        tokio::time::sleep(per_op * n).await;
    }
    if let Some(kind) = user_fault(&inner, &req, &body) {
        inner.count("user_fault");
        match kind {
            UserFaultKind::Status(code) => {
                return ScimError::new(code, None, "injected fault of this user").response()
            }
            UserFaultKind::Delay(d) => tokio::time::sleep(d).await,
            UserFaultKind::Oversized => {
                let filler = "x".repeat(8 * 1024 * 1024);
                return scim_json(StatusCode::OK, &serde_json::json!({ "filler": filler }));
            }
            UserFaultKind::Unavailable {
                times,
                retry_after_secs,
            } => {
                let refuse = {
                    let mut fs = inner.faults();
                    let key = external_id_of(&inner, &req, &body).unwrap_or_default();
                    let n = fs.refused.entry(key).or_insert(0);
                    *n += 1;
                    *n <= times
                };
                if refuse {
                    return throttled(&inner, &req, 503, retry_after_secs, false);
                }
            }
        }
    }
    match route(&inner, &req, &body) {
        Ok(r) => r,
        Err(e) if inner.cfg.dialect.loose_errors => e.loose_response(inner.cfg.dialect.bare_errors),
        Err(e) => e.response(),
    }
}

/// A 429 or 503 with `Retry-After` (delta-seconds, or an HTTP date `secs` from now), logged.
fn throttled(
    inner: &Inner,
    req: &HttpRequest,
    status: u16,
    secs: u64,
    http_date: bool,
) -> HttpResponse {
    inner.count(&status.to_string());
    inner
        .throttles
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(ScimThrottle {
            at: std::time::Instant::now(),
            method: req.method().as_str().to_string(),
            status,
            retry_after_secs: secs,
        });
    let detail = if status == 429 {
        "too many requests"
    } else {
        "the service is busy; try again later"
    };
    let mut resp = ScimError::new(status, None, detail).response();
    let value = if http_date {
        // RFC 9110 §10.2.3: an IMF-fixdate, which has whole seconds: one more so that the
        // date is never earlier than the wait.
        let when = chrono::Utc::now() + chrono::Duration::seconds(secs as i64 + 1);
        when.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
    } else {
        secs.to_string()
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// The fault of the user a request is about, if one is configured.
fn user_fault(inner: &Inner, req: &HttpRequest, body: &[u8]) -> Option<UserFaultKind> {
    if inner.faults().faults.users.is_empty() {
        return None;
    }
    fault_of(inner, &external_id_of(inner, req, body)?)
}

/// The fault configured for the user with this externalId, if any.
fn fault_of(inner: &Inner, external_id: &str) -> Option<UserFaultKind> {
    inner
        .faults()
        .faults
        .users
        .iter()
        .find(|f| f.external_id == external_id)
        .map(|f| f.kind.clone())
}

/// The externalId of the user with this id.
fn external_id_by_id(inner: &Inner, id: &str) -> Option<String> {
    let st = inner.read();
    let r = inner.render_id(&st, id)?;
    r.get("externalId")?.as_str().map(str::to_string)
}

/// The externalId of the user a request is about (`/Users/{id}` or a `POST /Users`).
fn external_id_of(inner: &Inner, req: &HttpRequest, body: &[u8]) -> Option<String> {
    let rest = req.path().strip_prefix(BASE_PATH)?;
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let external = match segs.as_slice() {
        ["Users", id] => external_id_by_id(inner, id)?,
        ["Users"] if req.method() == Method::POST => serde_json::from_slice::<Value>(body)
            .ok()?
            .get("externalId")?
            .as_str()?
            .to_string(),
        _ => return None,
    };
    Some(external)
}

fn query_params(req: &HttpRequest) -> Vec<(String, String)> {
    // form_urlencoded decodes `+` as a space as well as `%20` (Entra sends
    // `filter=externalId+eq+%22x%22`, docs/scim.md).
    url::form_urlencoded::parse(req.query_string().as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn method_not_allowed(allow: &str) -> Result<HttpResponse, ScimError> {
    let mut resp = ScimError::new(405, None, format!("method not allowed; use {allow}")).response();
    if let Ok(v) = HeaderValue::from_str(allow) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    Ok(resp)
}

fn parse_json(body: &[u8]) -> Result<Value, ScimError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ScimError::invalid_syntax("a JSON body is required"));
    }
    serde_json::from_slice(body)
        .map_err(|e| ScimError::invalid_syntax(format!("malformed JSON: {e}")))
}

fn route(inner: &Inner, req: &HttpRequest, body: &[u8]) -> Result<HttpResponse, ScimError> {
    let unknown = || ScimError::not_found(format!("no such endpoint: {}", req.path()));
    let Some(rest) = req
        .path()
        .strip_prefix(BASE_PATH)
        .filter(|r| r.is_empty() || r.starts_with('/'))
    else {
        return Err(unknown());
    };
    let segs: Vec<String> = rest
        .split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect();
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let params = query_params(req);
    let m = req.method();
    let base = inner.base_url.as_str();

    let discovery = |doc: Option<Value>| -> Result<HttpResponse, ScimError> {
        if !inner.cfg.serve_discovery {
            return Err(unknown());
        }
        if m != Method::GET {
            return method_not_allowed("GET");
        }
        if param(&params, "filter").is_some() {
            // RFC 7644 §4: filtering discovery resources SHOULD get 403.
            return Err(ScimError::new(
                403,
                None,
                "filtering is not supported on discovery endpoints",
            ));
        }
        match doc {
            Some(d) => Ok(scim_json(StatusCode::OK, &d)),
            None => Err(unknown()),
        }
    };

    match segs.as_slice() {
        ["ServiceProviderConfig"] => {
            let mut spc = schema::service_provider_config(base, inner.cfg.max_page_size.max(1));
            let d = &inner.cfg.dialect;
            spc["patch"]["supported"] = json!(!d.no_patch);
            spc["filter"]["supported"] =
                json!(!d.advertise_no_filter && d.filter != SimFilter::None);
            if let Some(b) = inner.cfg.bulk {
                spc["bulk"] = json!({
                    "supported": true,
                    "maxOperations": b.max_operations,
                    "maxPayloadSize": b.max_payload_size,
                });
            }
            discovery(Some(spc))
        }
        ["Schemas"] => discovery(Some(discovery_list(inner, inner.reg.schema_docs(base)))),
        ["Schemas", urn] => discovery(inner.reg.schema_doc(base, urn)),
        ["ResourceTypes"] => discovery(Some(discovery_list(
            inner,
            vec![inner.reg.user_resource_type(base)],
        ))),
        ["ResourceTypes", "User"] => discovery(Some(inner.reg.user_resource_type(base))),
        ["ResourceTypes", _] => discovery(None),
        ["Bulk"] => match *m {
            Method::POST => bulk::bulk(inner, body),
            _ => method_not_allowed("POST"),
        },
        // RFC 7644 §3.11: a server without /Me answers 501.
        ["Me", ..] => Err(ScimError::new(501, None, "/Me is not supported")),
        ["Users"] => match *m {
            Method::GET => {
                let q = ListQuery::from_params(&params)?;
                Ok(scim_json(StatusCode::OK, &list_users(inner, &q)?))
            }
            Method::POST => create_user(inner, body, &params),
            _ => method_not_allowed("GET, POST"),
        },
        ["Users", ".search"] => match *m {
            Method::POST => {
                let q = ListQuery::from_search(&parse_json(body)?)?;
                Ok(scim_json(StatusCode::OK, &list_users(inner, &q)?))
            }
            _ => method_not_allowed("POST"),
        },
        ["Users", id] => match *m {
            Method::GET => {
                let st = inner.read();
                let r = inner
                    .render_id(&st, id)
                    .ok_or_else(|| ScimError::not_found(format!("User {id} not found")))?;
                Ok(scim_json(
                    StatusCode::OK,
                    &project_params(inner, r, &params),
                ))
            }
            Method::PUT if inner.cfg.dialect.no_put => {
                Err(ScimError::new(501, None, "PUT is not supported"))
            }
            Method::PUT => replace_user(inner, id, body, &params),
            Method::PATCH => patch_user(inner, id, body, &params),
            Method::DELETE => {
                let mut st = inner.write();
                let before = inner
                    .logging_writes()
                    .then(|| st.users.get(*id).map(|r| r.attrs.clone()))
                    .flatten();
                if st.delete(id) {
                    inner.log_write("DELETE", id, before.as_ref(), None);
                    Ok(HttpResponse::NoContent().finish())
                } else {
                    Err(ScimError::not_found(format!("User {id} not found")))
                }
            }
            _ => method_not_allowed("GET, PUT, PATCH, DELETE"),
        },
        _ => Err(unknown()),
    }
}

/// A discovery ListResponse, without `totalResults` for the servers that leave it out.
fn discovery_list(inner: &Inner, items: Vec<Value>) -> Value {
    let mut v = schema::list_all(items);
    if inner.cfg.dialect.discovery_without_total {
        if let Some(o) = v.as_object_mut() {
            o.remove("totalResults");
            o.remove("itemsPerPage");
            o.remove("startIndex");
        }
    }
    v
}

fn project_params(inner: &Inner, resource: Value, params: &[(String, String)]) -> Value {
    let a = param(params, "attributes");
    let x = param(params, "excludedAttributes");
    if a.is_none() && x.is_none() {
        return resource;
    }
    project(&inner.reg, resource, a, x)
}

fn create_user(
    inner: &Inner,
    body: &[u8],
    params: &[(String, String)],
) -> Result<HttpResponse, ScimError> {
    let v = parse_json(body)?;
    let mut attrs = normalize_resource(&inner.reg, &v, inner.opts())?;
    inner.cfg.dialect.shape(&mut attrs);
    let resource = {
        let mut st = inner.write();
        let id = st.insert(attrs)?;
        if inner.logging_writes() {
            let after = st.users.get(&id).map(|r| r.attrs.clone());
            inner.log_write("POST", &id, None, after.as_ref());
        }
        inner
            .render_id(&st, &id)
            .ok_or_else(|| ScimError::new(500, None, "created user vanished"))?
    };
    let lost = {
        let mut fs = inner.faults();
        let rate = fs.faults.rate_500_after_create;
        fs.roll(rate)
    };
    if lost {
        inner.count("500");
        return Err(ScimError::new(500, None, "injected error after create"));
    }
    let location = resource
        .pointer("/meta/location")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    // 201 + Location = meta.location (RFC 7644 §3.3).
    Ok(HttpResponse::Created()
        .insert_header((header::CONTENT_TYPE, SCIM_CONTENT_TYPE))
        .insert_header((header::LOCATION, location))
        .body(project_params(inner, resource, params).to_string()))
}

fn replace_user(
    inner: &Inner,
    id: &str,
    body: &[u8],
    params: &[(String, String)],
) -> Result<HttpResponse, ScimError> {
    let v = parse_json(body)?;
    // Full replace (RFC 7644 §3.5.1): readOnly attributes in the body are ignored.
    let mut attrs = normalize_resource(&inner.reg, &v, inner.opts())?;
    inner.cfg.dialect.shape(&mut attrs);
    let mut st = inner.write();
    let before = inner
        .logging_writes()
        .then(|| st.users.get(id).map(|r| r.attrs.clone()))
        .flatten();
    st.update(id, attrs)?;
    if inner.logging_writes() {
        let after = st.users.get(id).map(|r| r.attrs.clone());
        inner.log_write("PUT", id, before.as_ref(), after.as_ref());
    }
    let r = inner
        .render_id(&st, id)
        .ok_or_else(|| ScimError::not_found(format!("User {id} not found")))?;
    drop(st);
    Ok(scim_json(StatusCode::OK, &project_params(inner, r, params)))
}

fn patch_user(
    inner: &Inner,
    id: &str,
    body: &[u8],
    params: &[(String, String)],
) -> Result<HttpResponse, ScimError> {
    let v = parse_json(body)?;
    inner.cfg.dialect.check_patch(&v)?;
    let mut st = inner.write();
    let Some(rec) = st.users.get(id) else {
        return Err(ScimError::not_found(format!("User {id} not found")));
    };
    inner.cfg.dialect.check_targets(&v, &rec.attrs)?;
    // Atomic (RFC 7644 §3.5.2): work on a copy, commit only if every op succeeded.
    let mut attrs = rec.attrs.clone();
    let before = inner.logging_writes().then(|| rec.attrs.clone());
    patch::apply_patch(&inner.reg, &mut attrs, &v, inner.opts())?;
    inner.cfg.dialect.shape(&mut attrs);
    st.update(id, attrs)?;
    if let Some(before) = before {
        let after = st.users.get(id).map(|r| r.attrs.clone());
        inner.log_write("PATCH", id, Some(&before), after.as_ref());
    }
    let r = inner
        .render_id(&st, id)
        .ok_or_else(|| ScimError::not_found(format!("User {id} not found")))?;
    drop(st);
    // 200 + resource or 204 (RFC 7644 §3.5.2); 200 is mandatory when `attributes` is given.
    if inner.cfg.patch_returns_204 && param(params, "attributes").is_none() {
        return Ok(HttpResponse::NoContent().finish());
    }
    Ok(scim_json(StatusCode::OK, &project_params(inner, r, params)))
}

/// Query parameters of `GET /Users` or the body of `POST /Users/.search`.
struct ListQuery {
    filter: Option<String>,
    start_index: Option<i64>,
    count: Option<i64>,
    attributes: Option<String>,
    excluded: Option<String>,
}

impl ListQuery {
    fn from_params(params: &[(String, String)]) -> Result<ListQuery, ScimError> {
        let int = |name: &str| -> Result<Option<i64>, ScimError> {
            match param(params, name) {
                None => Ok(None),
                Some(s) => s.trim().parse::<i64>().map(Some).map_err(|_| {
                    ScimError::invalid_value(format!("\"{name}\" must be an integer, not \"{s}\""))
                }),
            }
        };
        Ok(ListQuery {
            filter: param(params, "filter").map(str::to_string),
            start_index: int("startIndex")?,
            count: int("count")?,
            attributes: param(params, "attributes").map(str::to_string),
            excluded: param(params, "excludedAttributes").map(str::to_string),
        })
    }

    /// SearchRequest (RFC 7644 §3.4.3).
    fn from_search(body: &Value) -> Result<ListQuery, ScimError> {
        let Value::Object(o) = body else {
            return Err(ScimError::invalid_syntax(
                "the SearchRequest must be a JSON object",
            ));
        };
        let get = |k: &str| {
            o.iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(k))
                .map(|(_, v)| v)
        };
        let has_urn = get("schemas").and_then(Value::as_array).is_some_and(|a| {
            a.iter().any(|s| {
                s.as_str()
                    .is_some_and(|s| s.eq_ignore_ascii_case(SEARCH_REQUEST_URN))
            })
        });
        if !has_urn {
            return Err(ScimError::invalid_syntax(format!(
                "\"schemas\" must contain {SEARCH_REQUEST_URN}"
            )));
        }
        let int = |k: &str| -> Result<Option<i64>, ScimError> {
            match get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_i64()
                    .map(Some)
                    .ok_or_else(|| ScimError::invalid_value(format!("\"{k}\" must be an integer"))),
            }
        };
        let list = |k: &str| -> Result<Option<String>, ScimError> {
            match get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Array(a)) => {
                    let names: Option<Vec<&str>> = a.iter().map(Value::as_str).collect();
                    names.map(|n| Some(n.join(","))).ok_or_else(|| {
                        ScimError::invalid_value(format!("\"{k}\" must hold strings"))
                    })
                }
                Some(_) => Err(ScimError::invalid_value(format!(
                    "\"{k}\" must be an array of strings"
                ))),
            }
        };
        let filter = match get("filter") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(ScimError::invalid_filter("\"filter\" must be a string")),
        };
        Ok(ListQuery {
            filter,
            start_index: int("startIndex")?,
            count: int("count")?,
            attributes: list("attributes")?,
            excluded: list("excludedAttributes")?,
        })
    }
}

/// ListResponse (RFC 7644 §3.4.2; paging §3.4.2.4, docs/scim.md): `startIndex` is 1-based
/// (<1 → 1), `count` is capped at `max_page_size` (negative → 0; 0 → no `Resources`),
/// `itemsPerPage` is the number returned on this page.
fn list_users(inner: &Inner, q: &ListQuery) -> Result<Value, ScimError> {
    let d = &inner.cfg.dialect;
    if q.filter.is_some() && d.filter == SimFilter::None {
        return Err(ScimError::invalid_filter("filtering is not supported"));
    }
    if q.filter
        .as_deref()
        .is_some_and(|f| d.filter_matches_nothing(f))
    {
        let mut out = Map::new();
        out.insert("schemas".into(), json!([LIST_RESPONSE_URN]));
        out.insert("totalResults".into(), json!(0));
        out.insert("startIndex".into(), json!(1));
        out.insert("itemsPerPage".into(), json!(0));
        return Ok(Value::Object(out));
    }
    let filter = match q.filter.as_deref() {
        Some(f) if !f.trim().is_empty() => Some(filter::parse_filter(&inner.reg, f)?),
        Some(_) => return Err(ScimError::invalid_filter("empty filter")),
        None => None,
    };
    let cap = inner.cfg.max_page_size.max(1);
    let start = q.start_index.unwrap_or(1).max(1);
    let start_usize = usize::try_from(start).unwrap_or(usize::MAX);
    let count = match q.count {
        None => cap,
        Some(c) => usize::try_from(c.max(0)).unwrap_or(usize::MAX).min(cap),
    };
    let st = inner.read();
    let base = inner.base_url.as_str();
    let (total, page): (usize, Vec<Value>) = match &filter {
        None => (
            st.users.len(),
            st.order
                .values()
                .skip(start_usize - 1)
                .take(count)
                .filter_map(|id| inner.render_id(&st, id))
                .collect(),
        ),
        Some(f) => {
            let ids = st.query(&inner.reg, base, Some(f));
            (
                ids.len(),
                ids.iter()
                    .skip(start_usize - 1)
                    .take(count)
                    .filter_map(|id| inner.render_id(&st, id))
                    .collect(),
            )
        }
    };
    drop(st);
    let page: Vec<Value> = if q.attributes.is_some() || q.excluded.is_some() {
        page.into_iter()
            .map(|r| {
                project(
                    &inner.reg,
                    r,
                    q.attributes.as_deref(),
                    q.excluded.as_deref(),
                )
            })
            .collect()
    } else {
        page
    };
    let mut out = Map::new();
    out.insert("schemas".into(), json!([LIST_RESPONSE_URN]));
    out.insert("totalResults".into(), json!(total));
    out.insert("startIndex".into(), json!(start));
    out.insert("itemsPerPage".into(), json!(page.len()));
    if total > 0 && count > 0 {
        out.insert("Resources".into(), Value::Array(page));
    }
    Ok(Value::Object(out))
}
