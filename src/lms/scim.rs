//! SCIM 2.0 (RFC 7643/7644) implementation of [`Target`].
//!
//! Owns all SCIM JSON: resource building, PATCH operations, filters, ListResponse paging,
//! discovery and the SCIM error body. Requests are bounded by a semaphore (per target) and
//! retried under the shared [`RetryPolicy`]; a POST is never retried blindly.
//!
//! Real LMS servers are partial, so this client is strict in what it sends and tolerant in
//! what it reads, and it adapts to the server's [`Dialect`]: writes take the forms the server
//! accepts (`write`), a write the server refuses with 501 or a 400 `invalidPath` / `noTarget` /
//! `mutability` teaches a downgrade that is kept (through [`DialectMemory`]) and the change is
//! retried in the downgraded form — once per thing learned, so it never loops — and lookups
//! fall back to list-and-match where the server cannot filter (`listing`).

mod bulk;
mod listing;
pub(crate) mod write;

use std::collections::{BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};
use url::Url;

use super::dialect::{
    learn_patch, learn_put, CaseRule, Dialect, DialectSettings, Downgrade, FilterAttr, Form,
    Learned, Refusal,
};
use super::pace::{Outcome, Pacer};
use super::{Capabilities, Created, Target, TargetError, TargetUser};
use crate::model::record::{AttrChange, AttrValue, Record, ACTIVE, EXTERNAL_ID, USER_NAME};
use crate::redact::Redactor;
use crate::retry::{read_limited, retry_after, RetryPolicy};
use crate::text::clip;
use listing::{Entry, Listing};
pub(crate) use write::PatchPart;

pub(crate) const CORE_USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub(crate) const ENTERPRISE_USER: &str =
    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
pub(crate) const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const MEDIA_TYPE: &str = "application/scim+json";
const MAX_BODY: usize = 16 * 1024 * 1024;
/// After an ambiguous create: three lookups, 150-300 ms apart (filtered lists may lag behind).
const LOOKUPS_AFTER_CREATE: RetryPolicy =
    RetryPolicy::new(3, Duration::from_millis(150), Duration::from_millis(300));
/// Multi-valued attributes whose elements we address by `type`.
const TYPED: &[&str] = &["emails", "phoneNumbers"];
/// Rounds of "refused, learned, retried" one update may take: each round must teach something
/// new, and there are fewer things to learn than this.
const MAX_ROUNDS: usize = 12;
/// Warnings kept for a run's report (all are logged).
const MAX_NOTES: usize = 500;
/// Answers to writes compared with what was written, per run.
const ANSWERS_CHECKED: u64 = 32;

/// Where the learned layer of the dialect is kept between runs (the integration's store).
pub(crate) trait DialectMemory: Send + Sync {
    fn load(&self) -> Option<Learned>;
    fn save(&self, learned: &Learned);
}

/// The dialect's layers and the per-run warnings.
struct DialectState {
    discovered: DialectSettings,
    learned: Learned,
    pinned: DialectSettings,
    effective: Arc<Dialect>,
    /// (userName, key) already warned about in this run.
    warned: HashSet<(String, String)>,
    notes: Vec<String>,
}

impl DialectState {
    fn resolve(&mut self) {
        self.effective = Arc::new(Dialect::resolve(
            &self.discovered,
            &self.learned.settings,
            &self.pinned,
        ));
    }
}

pub struct ScimTarget {
    http: reqwest::Client,
    base: String,
    token: SecretString,
    custom_schema: String,
    /// Paces requests to this LMS: adaptive concurrency up to `target.concurrency`, a rate
    /// once it throttles, one shared pause on `Retry-After` (`lms::pace`).
    pacer: Pacer,
    retry: RetryPolicy,
    /// How long one request may go on waiting out throttling (429, 503 with `Retry-After`)
    /// before it fails as [`TargetError::Throttled`] (its user is deferred, not failed).
    throttle_wait: Duration,
    /// Integration name for metrics.
    label: String,
    state: Mutex<DialectState>,
    memory: Option<Box<dyn DialectMemory>>,
    /// List-and-match for servers that cannot filter (taken lazily, once per run).
    listing: tokio::sync::Mutex<Option<Listing>>,
    /// Creates answered 409 so far (a lookup that misses after one retakes the listing).
    conflicts: AtomicU64,
    /// Answers to writes compared with what was written, in this run.
    checked: AtomicU64,
    /// Writes gathered into `POST /Bulk` requests, when the LMS offers bulk.
    bulk: bulk::Queue,
    /// `target.bulk`: whether bulk may be used when the LMS advertises it.
    bulk_allowed: bool,
}

/// Where a record key lives in a SCIM User.
pub(crate) enum Place<'a> {
    /// Top-level or `name.<sub>` attribute.
    Core(&'a str),
    /// Element of a multi-valued attribute selected by type: (`emails`, `work`).
    Typed(&'a str, &'a str),
    /// Attribute of an extension schema: (URN, attribute).
    Ext(String, &'a str),
}

/// How long one request goes on waiting out throttling by default (10 minutes).
pub(crate) const DEFAULT_THROTTLE_WAIT: Duration = Duration::from_secs(600);

/// An answer of the LMS (see [`ScimTarget::send_answer`]).
pub(crate) struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub body: Vec<u8>,
    /// `Retry-After`, as a wait from now.
    pub retry_after: Option<Duration>,
}

/// The path of a request without its query (a filter names a user).
fn path_only(path_and_query: &str) -> String {
    path_and_query
        .split('?')
        .next()
        .unwrap_or(path_and_query)
        .to_string()
}

/// What a PATCH or PUT attempt came to.
enum Sent {
    /// Applied; the body the server answered with (maybe the resource, maybe nothing).
    Done(Vec<u8>),
    /// Refused in a way that may teach something (400, 405, 501).
    Refused(TargetError),
}

impl ScimTarget {
    pub fn new(
        base: &Url,
        token: SecretString,
        custom_schema: &str,
        concurrency: usize,
        timeout: Duration,
    ) -> Result<Self, TargetError> {
        let http = reqwest::Client::builder()
            // A redirect would re-send the token and user data elsewhere: an error instead.
            .redirect(crate::retry::no_redirects())
            .connect_timeout(Duration::from_secs(10))
            .timeout(timeout)
            .user_agent(concat!("rostersync/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(concurrency)
            .build()
            .map_err(|e| TargetError::Transport {
                url: base.to_string(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        let mut state = DialectState {
            discovered: DialectSettings::default(),
            learned: Learned::default(),
            pinned: DialectSettings::default(),
            effective: Arc::new(Dialect::default()),
            warned: HashSet::new(),
            notes: Vec::new(),
        };
        state.resolve();
        Ok(Self {
            http,
            base: base.as_str().trim_end_matches('/').to_string(),
            token,
            custom_schema: custom_schema.to_string(),
            pacer: Pacer::new(concurrency),
            retry: RetryPolicy {
                server_error_retries: 2,
                ..RetryPolicy::default()
            },
            throttle_wait: DEFAULT_THROTTLE_WAIT,
            label: String::new(),
            state: Mutex::new(state),
            memory: None,
            listing: tokio::sync::Mutex::new(None),
            conflicts: AtomicU64::new(0),
            checked: AtomicU64::new(0),
            bulk: bulk::Queue::default(),
            bulk_allowed: true,
        })
    }

    /// Whether writes may go through SCIM bulk when the LMS advertises it (`target.bulk`).
    pub(crate) fn with_bulk(mut self, allowed: bool) -> Self {
        self.bulk_allowed = allowed;
        self
    }

    /// A note for this run's report (`Target::notes`), kept within the bound.
    fn note(&self, text: String) {
        let mut st = self.lock();
        if st.notes.len() < MAX_NOTES {
            st.notes.push(text);
        }
    }

    /// Names the integration in this target's metrics.
    pub(crate) fn with_label(mut self, integration: &str) -> Self {
        self.label = integration.to_string();
        self
    }

    #[cfg(test)]
    pub(crate) fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// How long one request may wait out the LMS's throttling before its user is deferred
    /// (config `target.throttle_wait_secs`).
    pub(crate) fn with_throttle_wait(mut self, wait: Duration) -> Self {
        self.throttle_wait = wait;
        self
    }

    /// The pacer of this LMS's requests (its window, rate and counters).
    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    /// The dialect pinned in config (`[integration.target] dialect = { … }`): never changed
    /// by what the server answers.
    pub(crate) fn with_dialect(self, pins: DialectSettings) -> Self {
        {
            let mut st = self.lock();
            st.pinned = pins;
            st.resolve();
        }
        self
    }

    /// Keeps what is learned about the server in `memory`, starting from what it holds.
    pub(crate) fn with_memory(mut self, memory: Box<dyn DialectMemory>) -> Self {
        if let Some(l) = memory.load() {
            let mut st = self.lock();
            st.learned = l;
            st.resolve();
        }
        self.memory = Some(memory);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DialectState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dialect in force now.
    pub fn dialect(&self) -> Arc<Dialect> {
        Arc::clone(&self.lock().effective)
    }

    /// What the server has taught so far (the stored layer).
    pub fn learned(&self) -> Learned {
        self.lock().learned.clone()
    }

    /// Replaces the learned layer (after `check --probe`) and stores it.
    pub(crate) fn set_learned(&self, learned: Learned) {
        let mut st = self.lock();
        st.learned = learned;
        st.resolve();
        if let Some(m) = &self.memory {
            m.save(&st.learned);
        }
    }

    /// Folds one lesson into the dialect, stores it and notes it; false when it teaches
    /// nothing new or a config pin forbids it.
    fn learn(&self, d: Downgrade, evidence: &str) -> bool {
        let mut st = self.lock();
        if d.pinned_against(&st.pinned) {
            tracing::warn!(lesson = %d, evidence, "the LMS answer contradicts the dialect pinned in config; keeping the pin");
            return false;
        }
        let now = Arc::clone(&st.effective);
        if !d.apply(&mut st.learned.settings, &now) {
            return false;
        }
        tracing::warn!(lesson = %d, evidence, "learned about the LMS's SCIM dialect");
        st.notes
            .push(format!("LMS dialect learned: {d} (after {evidence})"));
        st.learned.record(d, evidence.to_string());
        st.resolve();
        if let Some(m) = &self.memory {
            m.save(&st.learned);
        }
        true
    }

    /// A change this LMS cannot take: one warning per user and field per run.
    fn warn_once(&self, user: &str, key: &str, text: String) {
        let first = self
            .lock()
            .warned
            .insert((user.to_string(), key.to_string()));
        if first {
            tracing::warn!(user_name = user, key, "{text}");
            self.note(format!("{user}: {text}"));
        }
    }

    pub(crate) fn place<'a>(&self, key: &'a str) -> Place<'a> {
        if let Some(a) = key.strip_prefix("enterprise.") {
            return Place::Ext(ENTERPRISE_USER.to_string(), a);
        }
        if let Some(a) = key.strip_prefix("custom.") {
            return Place::Ext(self.custom_schema.clone(), a);
        }
        if let Some((attr, ty)) = key.split_once('.') {
            if TYPED.contains(&attr) {
                return Place::Typed(attr, ty);
            }
        }
        Place::Core(key)
    }

    /// One quick request (no retries, 5 s timeout) for health checks: `GET /Users?count=1`.
    pub(crate) async fn probe(&self) -> Result<(), String> {
        let url = format!("{}/Users?startIndex=1&count=1", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(self.token.expose_secret())
            .header("Accept", "application/scim+json")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("LMS unreachable: {}", e.without_url()))?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err("LMS rejects the token (401/403)".into()),
            s => Err(format!("LMS answered {s}")),
        }
    }

    /// Sends one request (paced, retried on 429/5xx unless `idempotent` is false) and
    /// returns status, Location header and body.
    pub(crate) async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
        idempotent: bool,
    ) -> Result<(u16, Option<String>, Vec<u8>), TargetError> {
        let a = self
            .send_answer(method, path_and_query, body, idempotent)
            .await?;
        Ok((a.status, a.location, a.body))
    }

    /// Sends one request through the pacer and returns the answer, `Retry-After` included.
    ///
    /// Throttling (429, or 503 with `Retry-After`) is waited out for every method: the pacer
    /// pauses all of this LMS's requests for `Retry-After` and the request is sent again,
    /// without counting as an attempt, until [`ScimTarget::with_throttle_wait`] has passed
    /// ([`TargetError::Throttled`]). A 429 is taken as not processed (a rate limiter answers
    /// before the application), so even a POST is repeated; a POST answered 503 is handed back after the pause began, for its caller to
    /// look before posting again. Other failures count as attempts under the retry policy
    /// (idempotent requests only).
    pub(crate) async fn send_answer(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
        idempotent: bool,
    ) -> Result<Answer, TargetError> {
        let url = format!("{}{}", self.base, path_and_query);
        let mname = method_name(&method);
        let mut attempts = self.retry.start();
        let mut throttles = self.throttle_policy().start();
        let payload = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        loop {
            let attempt = attempts.attempts();
            let permit = self.pacer.acquire().await;
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(self.token.expose_secret())
                .header("Accept", format!("{MEDIA_TYPE}, application/json"));
            if let Some(b) = &payload {
                req = req.header("Content-Type", MEDIA_TYPE).body(b.clone());
            }
            let resp = req.send().await;
            crate::metrics::request(
                crate::metrics::Remote::Target,
                &self.label,
                resp.as_ref().ok().map(|r| r.status().as_u16()),
            );
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    permit.done(Outcome::NoAnswer);
                    let delay = (idempotent && !e.is_redirect())
                        .then(|| attempts.retry(None))
                        .flatten();
                    if let Some(delay) = delay {
                        tracing::warn!(attempt, method = mname, path = path_and_query, error = %e, "LMS request failed; retrying");
                        tokio::time::sleep(delay).await;
                        continue;
                    }
                    return Err(TargetError::Transport {
                        url: self.base.clone(),
                        message: crate::retry::transport_message(&e),
                    });
                }
            };
            let status = resp.status().as_u16();
            let ra = retry_after(resp.headers());
            if status == 429 || (status == 503 && ra.is_some()) {
                let shed = status == 503;
                let Some(pause) = throttles.retry(ra) else {
                    permit.done(Outcome::Throttled {
                        pause: ra.unwrap_or_default(),
                        shed,
                    });
                    return Err(TargetError::Throttled {
                        method: mname,
                        path: path_only(path_and_query),
                        status,
                        waited_secs: self.throttle_wait.as_secs(),
                    });
                };
                permit.done(Outcome::Throttled { pause, shed });
                tracing::debug!(
                    status,
                    method = mname,
                    path = path_and_query,
                    ?pause,
                    "LMS throttled; every request pauses"
                );
                if idempotent || status == 429 {
                    // The next `acquire` waits the shared pause out.
                    continue;
                }
            } else if status == 503 {
                permit.done(Outcome::Shed);
            } else if path_and_query == "/Bulk" {
                permit.done(Outcome::AnsweredSized);
            } else {
                permit.done(Outcome::Answered);
            }
            // A 503 may come from a proxy after the backend acted, so a POST leaves it to its
            // caller.
            if status != 429 && !(status == 503 && ra.is_some()) {
                if let Some(delay) = attempts.retry_status(status, idempotent, ra) {
                    tracing::debug!(
                        attempt,
                        status,
                        method = mname,
                        path = path_and_query,
                        ?delay,
                        "LMS failed; backing off"
                    );
                    tokio::time::sleep(delay).await;
                    continue;
                }
            }
            if status == 401 {
                return Err(TargetError::Unauthorized);
            }
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = read_limited(resp, MAX_BODY)
                .await
                .map_err(|m| TargetError::Transport {
                    url: self.base.clone(),
                    message: m,
                })?;
            return Ok(Answer {
                status,
                location,
                body: bytes,
                retry_after: ra,
            });
        }
    }

    /// Throttles are waited out without an attempt cap, up to `throttle_wait`.
    fn throttle_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: u32::MAX,
            deadline: Some(self.throttle_wait),
            ..self.retry
        }
    }

    /// A SCIM error answer, read tolerantly: `status` may be a number or absent, `scimType`
    /// absent, the body `{"detail": …}` only, plain text or empty (RFC 7644 §3.12).
    pub(crate) fn error(
        &self,
        method: &'static str,
        path: &str,
        status: u16,
        body: &[u8],
    ) -> TargetError {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let detail = get_ci(&v, "detail")
            .and_then(|d| match d {
                Value::String(s) => Some(s.clone()),
                Value::Null => None,
                other => Some(other.to_string()),
            })
            .map(|d| clip(&d, 500))
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)])
                    .trim()
                    .to_string();
                if text.is_empty() {
                    "no detail given".into()
                } else {
                    text
                }
            });
        // An LMS may echo the request's Authorization header in its error text.
        let mut secrets = Redactor::default();
        secrets.add(&self.token);
        let detail = secrets.scrub(&detail);
        TargetError::Http {
            method,
            path: path.to_string(),
            status,
            scim_type: get_ci(&v, "scimType")
                .and_then(|t| t.as_str())
                .filter(|t| !t.is_empty())
                .map(str::to_string),
            detail,
        }
    }

    pub(crate) fn decode(what: &str, body: &[u8]) -> Result<Value, TargetError> {
        serde_json::from_slice(body).map_err(|e| TargetError::Decode {
            what: what.to_string(),
            message: e.to_string(),
        })
    }

    /// Builds the full User resource for a POST.
    pub(crate) fn resource(&self, record: &Record) -> Value {
        let mut root = Map::new();
        let mut schemas = vec![CORE_USER.to_string()];
        for (key, value) in record {
            let v = scalar(value);
            match self.place(key) {
                Place::Core(k) => match k.split_once('.') {
                    Some((parent, sub)) => {
                        let obj = root.entry(parent).or_insert_with(|| json!({}));
                        if let Value::Object(o) = obj {
                            o.insert(sub.to_string(), v);
                        }
                    }
                    None => {
                        root.insert(k.to_string(), v);
                    }
                },
                Place::Typed(attr, ty) => {
                    let arr = root.entry(attr).or_insert_with(|| json!([]));
                    if let Value::Array(a) = arr {
                        a.push(typed_element(ty, v));
                    }
                }
                Place::Ext(urn, a) => {
                    if !schemas.contains(&urn) {
                        schemas.push(urn.clone());
                    }
                    let obj = root.entry(urn).or_insert_with(|| json!({}));
                    if let Value::Object(o) = obj {
                        o.insert(a.to_string(), ext_value(a, v));
                    }
                }
            }
        }
        root.insert("schemas".into(), json!(schemas));
        Value::Object(root)
    }

    /// The PATCH operations for `changes` under the dialect in force (see `write`); changes
    /// that need a PUT or cannot be made are not among them.
    #[cfg(test)]
    pub(crate) fn patch_ops(&self, changes: &[AttrChange], record: &Record) -> Vec<Value> {
        let d = self.dialect();
        write::plan(&d, changes, record, &|k| self.place(k))
            .patch
            .into_iter()
            .map(|p| p.op)
            .collect()
    }

    /// Reads a SCIM User resource into the record vocabulary, tolerantly: attribute names in
    /// any case, `""` is no value, booleans as `true`/`"True"`/`1`, the manager as an object or
    /// a bare id, and an untyped primary (or sole) e-mail or phone number is the work one.
    pub(crate) fn parse_user(&self, v: &Value) -> Result<TargetUser, TargetError> {
        let bad = |m: &str| TargetError::Decode {
            what: "User resource".into(),
            message: m.to_string(),
        };
        let id = match get_ci(v, "id") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => return Err(bad("a user has no id")),
        };
        let user_name = get_ci(v, USER_NAME)
            .and_then(|u| u.as_str())
            .unwrap_or("")
            .to_string();
        let mut record = Record::new();
        record.insert(USER_NAME.into(), AttrValue::Str(user_name.clone()));
        if let Some(e) = get_ci(v, EXTERNAL_ID)
            .and_then(|e| e.as_str())
            .filter(|e| !e.is_empty())
        {
            record.insert(EXTERNAL_ID.into(), AttrValue::Str(e.to_string()));
        }
        record.insert(
            ACTIVE.into(),
            AttrValue::Bool(lenient_bool(get_ci(v, ACTIVE)).unwrap_or(true)),
        );
        let enterprise = ENTERPRISE_USER.to_ascii_lowercase();
        let custom = self.custom_schema.to_ascii_lowercase();
        for (k, val) in v.as_object().into_iter().flatten() {
            let lk = k.to_ascii_lowercase();
            if lk == enterprise || lk == custom {
                let prefix = if lk == enterprise {
                    "enterprise"
                } else {
                    "custom"
                };
                for (a, av) in val.as_object().into_iter().flatten() {
                    let s = if a.eq_ignore_ascii_case("manager") {
                        get_ci(av, "value").and_then(|x| x.as_str()).or(av.as_str())
                    } else {
                        av.as_str()
                    };
                    if let Some(s) = s.filter(|s| !s.is_empty()) {
                        record.insert(format!("{prefix}.{a}"), AttrValue::Str(s.to_string()));
                    }
                }
            } else if let Some(attr) = TYPED.iter().find(|t| t.eq_ignore_ascii_case(k)) {
                read_typed(attr, val, &mut record);
            } else if lk == "name" {
                for (sub, sv) in val.as_object().into_iter().flatten() {
                    if let Some(s) = sv.as_str().filter(|s| !s.is_empty()) {
                        record.insert(format!("name.{sub}"), AttrValue::Str(s.to_string()));
                    }
                }
            } else if !matches!(
                lk.as_str(),
                "id" | "schemas" | "meta" | "username" | "externalid" | "active"
            ) {
                if let Some(s) = val.as_str().filter(|s| !s.is_empty()) {
                    record.insert(k.clone(), AttrValue::Str(s.to_string()));
                }
            }
        }
        Ok(TargetUser {
            id,
            user_name,
            record,
        })
    }

    /// The answer to a write, parsed, while this run still compares answers with what was
    /// written: the server's habits show in the first few, and parsing every 201 would cost a
    /// first reconcile of many users real CPU.
    fn worth_checking(&self, body: &[u8]) -> Option<Value> {
        if body.is_empty() || self.checked.fetch_add(1, Ordering::Relaxed) >= ANSWERS_CHECKED {
            return None;
        }
        serde_json::from_slice(body).ok()
    }

    /// Compares what the LMS answered after a write with what was written: keys it holds
    /// differently (or, in a whole resource, not at all) are not kept by the LMS.
    fn learn_from_answer(&self, sent: &Record, answer: &Value, whole: bool) {
        let Ok(got) = self.parse_user(answer) else {
            return;
        };
        let keys: Vec<&String> = sent.keys().filter(|k| k.as_str() != USER_NAME).collect();
        let present = keys.iter().filter(|k| got.record.contains_key(**k)).count();
        // A body that lacks most of what was sent is a summary, not the resource.
        let full = whole && !keys.is_empty() && present * 2 >= keys.len();
        for key in keys {
            let held = got.record.get(key);
            let differs = match held {
                Some(_) => !write::same(held, sent.get(key)),
                None => full && !write::same(None, sent.get(key)),
            };
            if differs && !self.dialect().not_kept.contains(key) {
                let shown = held.map(|v| clip(&v.to_string(), 60));
                let evidence = format!(
                    "the LMS answered with {key} = {} for {}",
                    shown.as_deref().unwrap_or("(none)"),
                    clip(
                        &sent.get(key).map(|v| v.to_string()).unwrap_or_default(),
                        60
                    )
                );
                self.learn(Downgrade::NotKept { key: key.clone() }, &evidence);
                if key == EXTERNAL_ID {
                    self.learn(
                        Downgrade::NoFilter {
                            attr: FilterAttr::ExternalId,
                        },
                        "the LMS does not keep externalId",
                    );
                }
            }
        }
        let typed_sent = sent.keys().any(|k| k.starts_with("emails."));
        if typed_sent && self.dialect().email_type {
            let untyped = get_ci(answer, "emails")
                .and_then(|e| e.as_array())
                .is_some_and(|a| !a.is_empty() && a.iter().all(|e| get_ci(e, "type").is_none()));
            if untyped {
                self.learn(
                    Downgrade::EmailTypeDropped,
                    "the LMS answered with emails without their type",
                );
            }
        }
    }

    // ---- lookups ----

    /// After an ambiguous create: looks the user up — by externalId, and by userName with
    /// our externalId (the externalId filter may silently match nothing), or in a fresh
    /// listing where the LMS cannot filter — a few times, since filtered lists can lag behind
    /// a create. Never answers with a user that is not ours.
    async fn find_created(&self, record: &Record) -> Result<Option<String>, TargetError> {
        let external_id = string_of(record, EXTERNAL_ID);
        let user_name = string_of(record, USER_NAME);
        if external_id.is_empty() {
            return Ok(None);
        }
        let mut lookups = LOOKUPS_AFTER_CREATE.start();
        loop {
            let d = self.dialect();
            if d.filters(FilterAttr::ExternalId) {
                if let Some(u) = self.find(FilterAttr::ExternalId, &external_id).await? {
                    return Ok(Some(u.id));
                }
            }
            let d = self.dialect();
            if d.filters(FilterAttr::UserName) {
                if let Some(u) = self.find(FilterAttr::UserName, &user_name).await? {
                    if string_of(&u.record, EXTERNAL_ID) == external_id {
                        return Ok(Some(u.id));
                    }
                }
            } else {
                // No userName filter: a listing taken now sees the user if it exists (and
                // retrying it would only repeat the same listing).
                let l = self.fresh_listing().await?;
                let Some(l) = l.as_ref() else {
                    return Ok(None);
                };
                let by_name = l
                    .by_user_name(&user_name)
                    .iter()
                    .find(|e| e.external_id.as_deref() == Some(external_id.as_str()))
                    .map(|e| e.id.clone());
                return Ok(by_name.or_else(|| l.by_external_id(&external_id).first().cloned()));
            }
            match lookups.retry(None) {
                Some(wait) => tokio::time::sleep(wait).await,
                None => return Ok(None),
            }
        }
    }

    /// One user by userName or externalId: a filter where the LMS takes it, otherwise the
    /// list-and-match listing.
    async fn find(&self, attr: FilterAttr, value: &str) -> Result<Option<TargetUser>, TargetError> {
        if self.dialect().filters(attr) {
            match self.find_filtered(attr, value).await {
                Err(TargetError::Http {
                    status,
                    scim_type,
                    detail,
                    ..
                }) if matches!(status, 400 | 403 | 501)
                    && (status != 400
                        || scim_type
                            .as_deref()
                            .is_none_or(|t| t.eq_ignore_ascii_case("invalidFilter"))) =>
                {
                    let evidence = format!(
                        "GET /Users?filter={} eq … answered {status}: {}",
                        attr.as_str(),
                        clip(&detail, 120)
                    );
                    self.learn(Downgrade::NoFilter { attr }, &evidence);
                }
                r => return r,
            }
        }
        self.find_listed(attr, value).await
    }

    async fn find_filtered(
        &self,
        attr: FilterAttr,
        value: &str,
    ) -> Result<Option<TargetUser>, TargetError> {
        let name = attr.as_str();
        let path = eq_filter_path(name, value);
        let (status, _, body) = self.send(reqwest::Method::GET, &path, None, true).await?;
        if status != 200 {
            return Err(self.error("GET", &format!("/Users?filter={name} eq …"), status, &body));
        }
        let v = Self::decode("filtered ListResponse", &body)?;
        let resources = get_ci(&v, "Resources")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default();
        // Some servers ignore filters (docs/scim.md): re-check every returned resource.
        let mut candidates = Vec::new();
        for r in &resources {
            let Ok(u) = self.parse_user(r) else {
                continue;
            };
            let got = string_of(&u.record, name);
            if got == value
                || (attr == FilterAttr::UserName && got.to_lowercase() == value.to_lowercase())
            {
                candidates.push(u);
            }
        }
        pick(attr, value, candidates)
    }

    /// Looks a user up in the listing of `/Users`, taking it first when needed.
    async fn find_listed(
        &self,
        attr: FilterAttr,
        value: &str,
    ) -> Result<Option<TargetUser>, TargetError> {
        let mut guard = self.listing.lock().await;
        for round in 0..2 {
            let conflicts = self.conflicts.load(Ordering::SeqCst);
            let usable = guard.as_ref().is_some_and(|l| {
                l.fresh(listing::MAX_AGE) && (round == 0 || l.conflicts == conflicts)
            });
            if !usable {
                *guard = Some(self.take_listing(conflicts).await?);
            }
            let Some(l) = guard.as_ref() else { break };
            let ids: Vec<String> = match attr {
                FilterAttr::UserName => {
                    l.by_user_name(value).iter().map(|e| e.id.clone()).collect()
                }
                FilterAttr::ExternalId => l.by_external_id(value).to_vec(),
            };
            if ids.is_empty() {
                // A 409 since the listing was taken: the user exists; look again once.
                if round == 0 && l.conflicts < conflicts && usable {
                    continue;
                }
                return Ok(None);
            }
            let mut found = Vec::new();
            for id in ids {
                if let Some(u) = self.get(&id).await? {
                    found.push(u);
                }
            }
            return pick(attr, value, found);
        }
        Ok(None)
    }

    /// The listing taken now (after an ambiguous create: it must see the latest users).
    async fn fresh_listing(
        &self,
    ) -> Result<tokio::sync::MutexGuard<'_, Option<Listing>>, TargetError> {
        let mut guard = self.listing.lock().await;
        let conflicts = self.conflicts.load(Ordering::SeqCst);
        *guard = Some(self.take_listing(conflicts).await?);
        Ok(guard)
    }

    /// Pages through `/Users` keeping only id, userName and externalId of each user. A page
    /// that brings no user not listed already ends it: a server that ignores `startIndex`
    /// answers the same page for ever.
    pub(crate) async fn take_listing(&self, conflicts: u64) -> Result<Listing, TargetError> {
        const PAGE: usize = 100;
        let mut l = Listing::new(conflicts);
        let mut start = 1;
        let mut seen = 0usize;
        while seen < listing::MAX_USERS {
            let page = self.list_raw(start, PAGE).await?;
            if page.is_empty() {
                break;
            }
            // Advance by what came back, not by totalResults (docs/scim.md).
            start += page.len();
            seen += page.len();
            let before = l.len();
            for r in &page {
                let Some(id) = get_ci(r, "id").and_then(|i| i.as_str()) else {
                    continue;
                };
                l.insert(Entry {
                    id: id.to_string(),
                    user_name: get_ci(r, USER_NAME)
                        .and_then(|u| u.as_str())
                        .unwrap_or("")
                        .to_string(),
                    external_id: get_ci(r, EXTERNAL_ID)
                        .and_then(|x| x.as_str())
                        .filter(|x| !x.is_empty())
                        .map(str::to_string),
                });
            }
            if l.len() == before {
                tracing::warn!(
                    start,
                    "the LMS answered a page of users listed already (it may ignore startIndex); the listing ends here"
                );
                break;
            }
        }
        tracing::info!(
            users = l.len(),
            "listed the LMS's users for lookups (it cannot filter)"
        );
        Ok(l)
    }

    /// On a server whose userNames are unique case-sensitively: whether a user with this
    /// userName in any case exists already (from the listing, taken once per run).
    async fn exists_in_any_case(&self, user_name: &str) -> Result<bool, TargetError> {
        let mut guard = self.listing.lock().await;
        let usable = guard.as_ref().is_some_and(|l| l.fresh(listing::MAX_AGE));
        if !usable {
            let conflicts = self.conflicts.load(Ordering::SeqCst);
            *guard = Some(self.take_listing(conflicts).await?);
        }
        Ok(guard
            .as_ref()
            .is_some_and(|l| !l.by_user_name(user_name).is_empty()))
    }

    async fn remember_created(&self, id: &str, record: &Record) {
        let mut guard = self.listing.lock().await;
        if let Some(l) = guard.as_mut() {
            let ext = string_of(record, EXTERNAL_ID);
            l.insert(Entry {
                id: id.to_string(),
                user_name: string_of(record, USER_NAME),
                external_id: (!ext.is_empty()).then_some(ext),
            });
        }
    }

    async fn list_raw(&self, start: usize, count: usize) -> Result<Vec<Value>, TargetError> {
        let path = format!("/Users?startIndex={start}&count={count}");
        let (status, _, body) = self.send(reqwest::Method::GET, &path, None, true).await?;
        if status != 200 {
            return Err(self.error("GET", &path, status, &body));
        }
        let v = Self::decode("ListResponse", &body)?;
        Ok(get_ci(&v, "Resources")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default())
    }

    // ---- writes ----

    /// One PATCH with `parts`; a 400/405/501 comes back as `Sent::Refused`.
    async fn send_patch(&self, id: &str, parts: &[&PatchPart]) -> Result<Sent, TargetError> {
        let ops: Vec<&Value> = parts.iter().map(|p| &p.op).collect();
        let body = json!({"schemas": [PATCH_OP], "Operations": ops});
        let path = format!("/Users/{}", crate::text::urlencode(id));
        let (status, _, bytes) = self
            .send(reqwest::Method::PATCH, &path, Some(&body), true)
            .await?;
        match status {
            200 | 204 => Ok(Sent::Done(bytes)),
            404 => Err(TargetError::NotFound(id.to_string())),
            400 | 405 | 501 => Ok(Sent::Refused(self.error("PATCH", &path, status, &bytes))),
            _ => Err(self.error("PATCH", &path, status, &bytes)),
        }
    }

    /// GET, change, PUT (RFC 7644 §3.5.1): for what PATCH cannot do.
    async fn put_changes(&self, id: &str, changes: &[AttrChange]) -> Result<Sent, TargetError> {
        let path = format!("/Users/{}", crate::text::urlencode(id));
        let (status, _, body) = self.send(reqwest::Method::GET, &path, None, true).await?;
        match status {
            200 => {}
            404 => return Err(TargetError::NotFound(id.to_string())),
            _ => return Err(self.error("GET", &path, status, &body)),
        }
        let current = Self::decode("User", &body)?;
        let d = self.dialect();
        let next = write::apply_to_resource(&current, changes, &|k| self.place(k), d.email_type);
        let (status, _, bytes) = self
            .send(reqwest::Method::PUT, &path, Some(&next), true)
            .await?;
        match status {
            200 | 204 => Ok(Sent::Done(bytes)),
            404 => Err(TargetError::NotFound(id.to_string())),
            400 | 405 | 501 => Ok(Sent::Refused(self.error("PUT", &path, status, &bytes))),
            _ => Err(self.error("PUT", &path, status, &bytes)),
        }
    }

    /// What a refused PATCH part teaches; true when something new was learned.
    fn learn_from_patch(&self, part: &PatchPart, e: &TargetError) -> bool {
        let TargetError::Http {
            status,
            scim_type,
            detail,
            ..
        } = e
        else {
            return false;
        };
        let r = Refusal {
            status: *status,
            scim_type: scim_type.as_deref(),
        };
        let evidence = format!(
            "PATCH {} {} answered {status}{}: {}",
            part.kind.as_str(),
            part.path,
            scim_type
                .as_deref()
                .map(|t| format!(" {t}"))
                .unwrap_or_default(),
            clip(detail, 120)
        );
        let mut any = false;
        for d in learn_patch(part.kind, &part.form, &part.keys, r) {
            any |= self.learn(d, &evidence);
        }
        any
    }

    fn learn_from_put(&self, changes: &[AttrChange], e: &TargetError) -> bool {
        let TargetError::Http {
            status,
            scim_type,
            detail,
            ..
        } = e
        else {
            return false;
        };
        let r = Refusal {
            status: *status,
            scim_type: scim_type.as_deref(),
        };
        let keys: Vec<String> = changes.iter().map(|c| c.key.clone()).collect();
        let clearing = changes.iter().all(|c| c.new.is_none());
        let evidence = format!(
            "PUT of {} answered {status}{}: {}",
            keys.join(", "),
            scim_type
                .as_deref()
                .map(|t| format!(" {t}"))
                .unwrap_or_default(),
            clip(detail, 120)
        );
        let mut any = false;
        for d in learn_put(&keys, clearing, r) {
            any |= self.learn(d, &evidence);
        }
        any
    }

    /// Sends the PATCH part of a plan. Returns the changes still to make (of operations that
    /// were refused and taught something), or the error when nothing could be learned.
    async fn patch_round(
        &self,
        id: &str,
        parts: &[PatchPart],
        pending: &[AttrChange],
    ) -> Result<Vec<AttrChange>, TargetError> {
        let of = |part: &PatchPart| -> Vec<AttrChange> {
            pending
                .iter()
                .filter(|c| part.keys.contains(&c.key))
                .cloned()
                .collect()
        };
        let all: Vec<&PatchPart> = parts.iter().collect();
        let e = match self.send_patch(id, &all).await? {
            Sent::Done(answer) => {
                if let Some(a) = self.worth_checking(&answer) {
                    let done: Vec<AttrChange> = parts.iter().flat_map(of).collect();
                    self.learn_from_answer(&write::written(&done), &a, false);
                }
                return Ok(Vec::new());
            }
            Sent::Refused(e) => e,
        };
        // The request is atomic: nothing was applied. Blame the one operation the server
        // names, or else try each operation alone.
        let blamed = blame(parts, &e);
        if let Some(i) = blamed {
            if self.learn_from_patch(&parts[i], &e) {
                return Ok(parts.iter().flat_map(of).collect());
            }
            if self
                .try_put_instead(id, &parts[i], &e, &of(&parts[i]))
                .await?
            {
                // That one is written; the others go again in the next round.
                return Ok((0..parts.len())
                    .filter(|j| *j != i)
                    .flat_map(|j| of(&parts[j]))
                    .collect());
            }
        }
        if parts.len() == 1 {
            return match self
                .try_put_instead(id, &parts[0], &e, &of(&parts[0]))
                .await?
            {
                true => Ok(Vec::new()),
                false => Err(e),
            };
        }
        let mut again = Vec::new();
        let mut first: Option<TargetError> = None;
        for part in parts {
            match self.send_patch(id, &[part]).await? {
                Sent::Done(_) => {}
                Sent::Refused(e) => {
                    if self.learn_from_patch(part, &e) {
                        again.extend(of(part));
                    } else if !self.try_put_instead(id, part, &e, &of(part)).await? {
                        first.get_or_insert(e);
                    }
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(again),
        }
    }

    /// A plain 400 to setting a value says too little to learn from: it may be the value. If
    /// a PUT takes the same change, the server refuses PATCH for this attribute (true, and
    /// learned); otherwise the refusal stands (false).
    async fn try_put_instead(
        &self,
        id: &str,
        part: &PatchPart,
        e: &TargetError,
        changes: &[AttrChange],
    ) -> Result<bool, TargetError> {
        let setting = matches!(
            part.form,
            Form::Set | Form::SetAbsent | Form::WholeList | Form::WholeListAbsent
        );
        let plain_400 = matches!(e, TargetError::Http { status: 400, .. });
        if !setting || !plain_400 || !self.dialect().put || changes.is_empty() {
            return Ok(false);
        }
        match self.put_changes(id, changes).await? {
            Sent::Done(_) => {
                let TargetError::Http { detail, .. } = e else {
                    return Ok(true);
                };
                let evidence = format!(
                    "PATCH {} {} answered 400: {}; PUT took it",
                    part.kind.as_str(),
                    part.path,
                    clip(detail, 120)
                );
                for key in &part.keys {
                    self.learn(Downgrade::NoPatchFor { key: key.clone() }, &evidence);
                }
                Ok(true)
            }
            Sent::Refused(_) => Ok(false),
        }
    }

    /// Sends the PUT part of a plan, like [`Self::patch_round`].
    async fn put_round(
        &self,
        id: &str,
        changes: &[AttrChange],
    ) -> Result<Vec<AttrChange>, TargetError> {
        let e = match self.put_changes(id, changes).await? {
            Sent::Done(answer) => {
                if let Some(a) = self.worth_checking(&answer) {
                    self.learn_from_answer(&write::written(changes), &a, false);
                }
                return Ok(Vec::new());
            }
            Sent::Refused(e) => e,
        };
        if self.learn_from_put(changes, &e) {
            return Ok(changes.to_vec());
        }
        if changes.len() == 1 {
            return Err(e);
        }
        let mut again = Vec::new();
        let mut first = None;
        for c in changes {
            let one = std::slice::from_ref(c);
            match self.put_changes(id, one).await? {
                Sent::Done(_) => {}
                Sent::Refused(e) => {
                    if self.learn_from_put(one, &e) {
                        again.push(c.clone());
                    } else {
                        first.get_or_insert(e);
                    }
                }
            }
        }
        match first {
            Some(e) => Err(e),
            None => Ok(again),
        }
    }
}

impl Target for ScimTarget {
    async fn discover(&self) -> Result<Capabilities, TargetError> {
        let mut caps = Capabilities {
            enterprise: true,
            patch: true,
            filter: true,
            ..Default::default()
        };
        let mut found = DialectSettings::default();
        let mut bulk = None;
        let (status, _, body) = self
            .send(reqwest::Method::GET, "/ServiceProviderConfig", None, true)
            .await?;
        if status >= 500 {
            return Err(self.error("GET", "/ServiceProviderConfig", status, &body));
        }
        match (status, serde_json::from_slice::<Value>(&body)) {
            (200, Ok(v)) => {
                if lenient_bool(get_path_ci(&v, &["patch", "supported"])) == Some(false) {
                    found.patch_ops = Some(BTreeSet::new());
                }
                if lenient_bool(get_path_ci(&v, &["filter", "supported"])) == Some(false) {
                    found.filter = Some(BTreeSet::new());
                }
                bulk = bulk::Limits::advertised(&v);
            }
            (200, Err(_)) => caps
                .notes
                .push("/ServiceProviderConfig is not JSON; assuming PATCH and filters work".into()),
            _ => caps.notes.push(format!(
                "/ServiceProviderConfig not served ({status}); assuming PATCH and filters work"
            )),
        }
        let (status, _, body) = self
            .send(reqwest::Method::GET, "/Schemas", None, true)
            .await?;
        if status >= 500 {
            return Err(self.error("GET", "/Schemas", status, &body));
        }
        let schemas = (status == 200)
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten();
        if let Some(v) = schemas {
            caps.discovered = true;
            caps.enterprise = false;
            for s in listed(&v) {
                let id = get_ci(s, "id").and_then(|i| i.as_str()).unwrap_or("");
                let attrs: Vec<&Value> = get_ci(s, "attributes")
                    .and_then(|a| a.as_array())
                    .map(|a| a.iter().collect())
                    .unwrap_or_default();
                let name_of = |x: &Value| {
                    get_ci(x, "name")
                        .and_then(|n| n.as_str())
                        .map(str::to_string)
                };
                if id.eq_ignore_ascii_case(ENTERPRISE_USER) {
                    caps.enterprise = true;
                } else if id.eq_ignore_ascii_case(&self.custom_schema) {
                    caps.custom_attributes =
                        Some(attrs.iter().filter_map(|x| name_of(x)).collect());
                } else if id.eq_ignore_ascii_case(CORE_USER) && !attrs.is_empty() {
                    let mut declared = BTreeSet::new();
                    for a in &attrs {
                        let Some(n) = name_of(a) else { continue };
                        let n = n.to_ascii_lowercase();
                        let ro = get_ci(a, "mutability")
                            .and_then(|m| m.as_str())
                            .is_some_and(|m| m.eq_ignore_ascii_case("readOnly"));
                        if ro && !matches!(n.as_str(), "id" | "meta" | "groups") {
                            caps.read_only.insert(n.clone());
                        }
                        if n == "username" && lenient_bool(get_ci(a, "caseExact")) == Some(true) {
                            found.user_name_unique = Some(CaseRule::CaseSensitive);
                        }
                        declared.insert(n);
                    }
                    caps.core_attributes = Some(declared);
                }
            }
        } else {
            caps.custom_attributes = None;
            caps.notes.push(format!("/Schemas not served ({status}); assuming core User and the enterprise extension only"));
        }
        // /ResourceTypes may declare the extensions /Schemas leaves out.
        let (status, _, body) = self
            .send(reqwest::Method::GET, "/ResourceTypes", None, true)
            .await?;
        if status == 200 {
            if let Ok(v) = serde_json::from_slice::<Value>(&body) {
                for rt in listed(&v) {
                    let is_user = ["id", "name"].iter().any(|k| {
                        get_ci(rt, k)
                            .and_then(|x| x.as_str())
                            .is_some_and(|x| x.eq_ignore_ascii_case("User"))
                    });
                    if !is_user {
                        continue;
                    }
                    for e in get_ci(rt, "schemaExtensions")
                        .and_then(|x| x.as_array())
                        .into_iter()
                        .flatten()
                    {
                        let urn = get_ci(e, "schema").and_then(|x| x.as_str()).unwrap_or("");
                        if urn.eq_ignore_ascii_case(ENTERPRISE_USER) {
                            caps.enterprise = true;
                        }
                    }
                }
            }
        }
        let effective = {
            let mut st = self.lock();
            st.discovered = found;
            // A new run: warnings are given again, once each.
            st.warned.clear();
            st.notes.clear();
            st.resolve();
            Arc::clone(&st.effective)
        };
        // A new run: its lookups see a fresh listing; its first answers are compared again.
        *self.listing.lock().await = None;
        self.checked.store(0, Ordering::Relaxed);
        if let Some(e) = effective.enterprise {
            caps.enterprise = e;
        }
        match effective.custom {
            Some(false) => caps.custom_attributes = None,
            Some(true) if caps.custom_attributes.is_none() => {
                caps.custom_any = true;
                caps.notes.push(format!(
                    "the custom extension {} is pinned in config but not declared in /Schemas: every mapped custom.* attribute is sent",
                    self.custom_schema
                ));
            }
            _ => {}
        }
        if caps.discovered && !caps.enterprise {
            caps.notes.push(format!("the LMS does not declare {ENTERPRISE_USER}; employeeNumber, department and manager are not sent"));
        }
        if caps.discovered && caps.custom_attributes.is_none() && !caps.custom_any {
            caps.notes.push(format!(
                "the LMS does not declare {}; custom.* attributes are not sent",
                self.custom_schema
            ));
        }
        caps.patch = effective.patch();
        caps.filter = !effective.filter.is_empty();
        let notable = effective.notable();
        if !notable.is_empty() {
            caps.notes
                .push(format!("LMS dialect: {}", notable.join("; ")));
        }
        caps.dialect = (*effective).clone();
        match bulk {
            Some(l) if self.bulk_allowed => caps.notes.push(format!(
                "SCIM bulk: writes go in POST /Bulk requests of up to {} operations ({} bytes)",
                l.max_operations, l.max_payload_size
            )),
            Some(_) => caps
                .notes
                .push("the LMS offers SCIM bulk; not used (target.bulk = false)".into()),
            None => {}
        }
        self.bulk.set_limits(bulk.filter(|_| self.bulk_allowed));
        Ok(caps)
    }

    async fn find_by_external_id(
        &self,
        external_id: &str,
    ) -> Result<Option<TargetUser>, TargetError> {
        self.find(FilterAttr::ExternalId, external_id).await
    }

    async fn find_by_user_name(&self, user_name: &str) -> Result<Option<TargetUser>, TargetError> {
        self.find(FilterAttr::UserName, user_name).await
    }

    async fn create(&self, record: &Record) -> Result<Option<String>, TargetError> {
        let user_name = string_of(record, USER_NAME);
        if self.dialect().user_name_unique == CaseRule::CaseSensitive
            && self.exists_in_any_case(&user_name).await?
        {
            // The LMS would take a second user differing only by case: treat it as the 409
            // a case-insensitive server answers, so the caller looks it up and links it.
            tracing::info!(user_name = %user_name, "a user with this userName in another case exists in the LMS; not creating another");
            self.conflicts.fetch_add(1, Ordering::SeqCst);
            return Ok(None);
        }
        let body = self.resource(record);
        if let Some(done) = self.create_in_bulk(record, &body, None).await? {
            return Ok(done.id);
        }
        // A create whose fate is unknown is looked up, then sent again: three times at most.
        // A 503 with `Retry-After` (the LMS shedding load) is looked up and sent again once
        // the shared pause is over, without counting, until `throttle_wait` has passed.
        let mut attempts = RetryPolicy {
            max_attempts: 3,
            ..self.retry
        }
        .start();
        let mut throttles = self.throttle_policy().start();
        loop {
            let res = self
                .send_answer(reqwest::Method::POST, "/Users", Some(&body), false)
                .await;
            let (status, location, bytes, ra) = match res {
                Ok(a) => (a.status, a.location, a.body, a.retry_after),
                Err(TargetError::Transport { url, message }) => {
                    // The first attempt may have succeeded: look before posting again.
                    if let Some(id) = self.find_created(record).await? {
                        return Ok(Some(id));
                    }
                    match attempts.retry(None) {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => return Err(TargetError::Transport { url, message }),
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            match status {
                201 | 200 => {
                    #[derive(serde::Deserialize)]
                    struct Created {
                        id: Option<String>,
                    }
                    let answer = self.worth_checking(&bytes);
                    let id = match &answer {
                        Some(a) => get_ci(a, "id").and_then(|i| i.as_str()).map(str::to_string),
                        None => serde_json::from_slice::<Created>(&bytes)
                            .ok()
                            .and_then(|c| c.id),
                    };
                    let id = id
                        .filter(|s| !s.is_empty())
                        // No usable body: take the id from Location, else look it up.
                        .or_else(|| {
                            location
                                .as_deref()
                                .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
                                .filter(|s| !s.is_empty())
                                .map(str::to_string)
                        });
                    let id = match id {
                        Some(id) => id,
                        None => match self.find_created(record).await? {
                            Some(id) => id,
                            None => return Ok(None),
                        },
                    };
                    if let Some(a) = &answer {
                        self.learn_from_answer(record, a, true);
                    }
                    self.remember_created(&id, record).await;
                    return Ok(Some(id));
                }
                409 => {
                    self.conflicts.fetch_add(1, Ordering::SeqCst);
                    return Ok(None);
                }
                503 if ra.is_some() => {
                    // The pause has begun (`send_answer`): the lookup waits it out.
                    if let Some(id) = self.find_created(record).await? {
                        return Ok(Some(id));
                    }
                    if throttles.retry(ra).is_none() {
                        return Err(TargetError::Throttled {
                            method: "POST",
                            path: "/Users".into(),
                            status,
                            waited_secs: self.throttle_wait.as_secs(),
                        });
                    }
                }
                500 | 502 | 503 | 504 => {
                    // Maybe created, maybe not: re-query before trying again.
                    if let Some(id) = self.find_created(record).await? {
                        return Ok(Some(id));
                    }
                    match attempts.retry(None) {
                        Some(wait) => tokio::time::sleep(wait).await,
                        None => return Err(self.error("POST", "/Users", status, &bytes)),
                    }
                }
                _ => return Err(self.error("POST", "/Users", status, &bytes)),
            }
        }
    }

    async fn update(
        &self,
        id: &str,
        changes: &[AttrChange],
        record: &Record,
    ) -> Result<(), TargetError> {
        let user = string_of(record, USER_NAME);
        if self.update_in_bulk(id, changes, record).await? {
            return Ok(());
        }
        let mut pending: Vec<AttrChange> = changes.to_vec();
        for _ in 0..MAX_ROUNDS {
            if pending.is_empty() {
                return Ok(());
            }
            let d = self.dialect();
            let plan = write::plan(&d, &pending, record, &|k| self.place(k));
            for i in &plan.impossible {
                let what = if i.clearing {
                    "not cleared"
                } else {
                    "not changed"
                };
                self.warn_once(
                    &user,
                    &i.key,
                    format!("{} {what} in the LMS: {}; left as it is", i.key, i.why),
                );
            }
            let mut again = Vec::new();
            if !plan.patch.is_empty() {
                again.extend(self.patch_round(id, &plan.patch, &pending).await?);
            }
            if !plan.put.is_empty() {
                again.extend(self.put_round(id, &plan.put).await?);
            }
            pending = again;
        }
        if pending.is_empty() {
            Ok(())
        } else {
            Err(TargetError::Decode {
                what: "the LMS's answers to PATCH and PUT".into(),
                message: "they kept refusing the change in every form rostersync knows".into(),
            })
        }
    }

    async fn get(&self, id: &str) -> Result<Option<TargetUser>, TargetError> {
        let path = format!("/Users/{}", crate::text::urlencode(id));
        let (status, _, body) = self.send(reqwest::Method::GET, &path, None, true).await?;
        match status {
            200 => self.parse_user(&Self::decode("User", &body)?).map(Some),
            404 => Ok(None),
            _ => Err(self.error("GET", &path, status, &body)),
        }
    }

    async fn list(
        &self,
        start: usize,
        count: usize,
    ) -> Result<(Vec<TargetUser>, usize), TargetError> {
        let path = format!("/Users?startIndex={start}&count={count}");
        let (status, _, body) = self.send(reqwest::Method::GET, &path, None, true).await?;
        if status != 200 {
            return Err(self.error("GET", &path, status, &body));
        }
        let v = Self::decode("ListResponse", &body)?;
        // totalResults is optional in practice (docs/scim.md); paging ends on an empty page.
        let total = get_ci(&v, "totalResults")
            .and_then(|t| t.as_u64().or_else(|| t.as_str()?.parse().ok()))
            .unwrap_or(0) as usize;
        let resources = get_ci(&v, "Resources")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default();
        let mut users = Vec::with_capacity(resources.len());
        for r in &resources {
            match self.parse_user(r) {
                Ok(u) => users.push(u),
                // One unreadable resource does not stop a listing (nor is it ours: ours have ids).
                Err(e) => {
                    tracing::warn!(error = %e, path, "skipping an unreadable user in a listing")
                }
            }
        }
        Ok((users, total))
    }

    async fn create_with_manager(
        &self,
        record: &Record,
        manager: &str,
    ) -> Result<Created, TargetError> {
        if self.links_in_flight() {
            let body = self.resource(record);
            if let Some(done) = self.create_in_bulk(record, &body, Some(manager)).await? {
                return Ok(done);
            }
        }
        Ok(Created::unlinked(self.create(record).await?))
    }

    /// With SCIM bulk, and an LMS whose userNames need no look-up before a create (one that
    /// tells them apart by case is asked first, which would put a report's create ahead of
    /// its manager's in the queue).
    fn links_in_flight(&self) -> bool {
        self.bulk_on() && self.dialect().user_name_unique != CaseRule::CaseSensitive
    }

    fn write_slots(&self) -> Option<usize> {
        self.bulk
            .limits()
            .map(|l| l.max_operations.saturating_mul(bulk::IN_FLIGHT))
    }

    fn throttling(&self) -> bool {
        self.pacer.throttled_within(Duration::from_secs(60))
    }

    fn notes(&self) -> Vec<String> {
        std::mem::take(&mut self.lock().notes)
    }
}

/// The operation a refused request's detail names (by its path, or "Operations[i]"), when it
/// names exactly one.
fn blame(parts: &[PatchPart], e: &TargetError) -> Option<usize> {
    let TargetError::Http { detail, .. } = e else {
        return None;
    };
    let d = detail.to_ascii_lowercase();
    if let Some(i) = (0..parts.len()).find(|i| d.contains(&format!("operations[{i}]"))) {
        return Some(i);
    }
    let named: Vec<usize> = (0..parts.len())
        .filter(|&i| {
            let p = parts[i].path.to_ascii_lowercase();
            let short = p.rsplit(':').next().unwrap_or(&p).to_string();
            d.contains(&p) || (short.len() > 3 && d.contains(&format!("\"{short}\"")))
        })
        .collect();
    (named.len() == 1).then(|| named[0])
}

/// The one user a lookup means: an exact userName beats one differing only in case (a
/// case-sensitive server may hold both); more than one is ambiguous.
fn pick(
    attr: FilterAttr,
    value: &str,
    mut candidates: Vec<TargetUser>,
) -> Result<Option<TargetUser>, TargetError> {
    if candidates.len() > 1 && attr == FilterAttr::UserName {
        let exact: Vec<TargetUser> = candidates
            .iter()
            .filter(|u| u.user_name == value)
            .cloned()
            .collect();
        if exact.len() == 1 {
            candidates = exact;
        }
    }
    match candidates.len() {
        0 => Ok(None),
        1 => Ok(candidates.pop()),
        n => Err(TargetError::Ambiguous {
            attr: attr.as_str(),
            value: value.to_string(),
            count: n,
        }),
    }
}

/// Reads a typed multi-valued attribute; an untyped primary (or sole) element stands for the
/// work one when no element is typed work.
fn read_typed(attr: &str, val: &Value, record: &mut Record) {
    let items: Vec<&Value> = val.as_array().into_iter().flatten().collect();
    let value_of = |e: &Value| {
        get_ci(e, "value")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    for el in &items {
        if let (Some(ty), Some(s)) = (
            get_ci(el, "type")
                .and_then(|t| t.as_str())
                .filter(|t| !t.is_empty()),
            value_of(el),
        ) {
            record
                .entry(format!("{attr}.{}", ty.to_ascii_lowercase()))
                .or_insert(AttrValue::Str(s));
        }
    }
    let work = format!("{attr}.work");
    if record.contains_key(&work) {
        return;
    }
    let untyped: Vec<&&Value> = items
        .iter()
        .filter(|e| {
            get_ci(e, "type")
                .and_then(|t| t.as_str())
                .is_none_or(str::is_empty)
        })
        .collect();
    let chosen = untyped
        .iter()
        .find(|e| lenient_bool(get_ci(e, "primary")) == Some(true))
        .or_else(|| (items.len() == 1).then(|| untyped.first()).flatten());
    if let Some(s) = chosen.and_then(|e| value_of(e)) {
        record.insert(work, AttrValue::Str(s));
    }
}

/// The items of a discovery answer: a ListResponse (with or without `totalResults`), a bare
/// array, or a single resource.
fn listed(v: &Value) -> Vec<&Value> {
    match v {
        Value::Array(a) => a.iter().collect(),
        Value::Object(_) => match get_ci(v, "Resources").and_then(|r| r.as_array()) {
            Some(a) => a.iter().collect(),
            None if get_ci(v, "id").is_some() => vec![v],
            None => Vec::new(),
        },
        _ => Vec::new(),
    }
}

fn string_of(record: &Record, key: &str) -> String {
    match record.get(key) {
        Some(AttrValue::Str(s)) => s.clone(),
        _ => String::new(),
    }
}

fn method_name(m: &reqwest::Method) -> &'static str {
    match *m {
        reqwest::Method::GET => "GET",
        reqwest::Method::POST => "POST",
        reqwest::Method::PATCH => "PATCH",
        reqwest::Method::PUT => "PUT",
        reqwest::Method::DELETE => "DELETE",
        _ => "request",
    }
}

pub(crate) fn scalar(v: &AttrValue) -> Value {
    match v {
        AttrValue::Bool(b) => Value::Bool(*b),
        AttrValue::Str(s) => Value::String(s.clone()),
    }
}

pub(crate) fn typed_element(ty: &str, v: Value) -> Value {
    if ty == "work" {
        json!({"value": v, "type": ty, "primary": true})
    } else {
        json!({"value": v, "type": ty})
    }
}

/// The enterprise manager is a complex attribute whose `value` is the manager's target id.
pub(crate) fn ext_value(attr: &str, v: Value) -> Value {
    if attr == "manager" {
        json!({ "value": v })
    } else {
        v
    }
}

/// Attribute names are case-insensitive (RFC 7643 §2.1).
pub(crate) fn get_ci<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

fn get_path_ci<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |cur, k| get_ci(cur, k))
}

/// Servers send `true`, `"True"` or `1` (docs/scim.md).
pub(crate) fn lenient_bool(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") || s == "1" => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") || s == "0" => Some(false),
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        _ => None,
    }
}

/// `/Users?filter=<attr> eq "<value>"`. Values are JSON strings (RFC 7644 §3.4.2.2): the
/// serializer escapes quotes and backslashes; the whole filter is then percent-encoded with
/// %20 for spaces.
pub(crate) fn eq_filter_path(attr: &str, value: &str) -> String {
    let literal = serde_json::to_string(value).unwrap_or_default();
    let filter = format!("{attr} eq {literal}");
    format!("/Users?filter={}", query_encode(&filter))
}

/// A query value: everything but RFC 3986 unreserved characters is percent-encoded, so a
/// space is `%20`, never `+` (docs/scim.md).
fn query_encode(s: &str) -> String {
    crate::text::urlencode(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lms::dialect::{Clear, PatchOp};

    fn target() -> ScimTarget {
        ScimTarget::new(
            &Url::parse("http://lms.test/scim/v2").unwrap(),
            SecretString::from("t"),
            "urn:ietf:params:scim:schemas:extension:acme:2.0:User",
            2,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    fn s(v: &str) -> Option<AttrValue> {
        Some(AttrValue::Str(v.into()))
    }

    fn change(key: &str, old: Option<AttrValue>, new: Option<AttrValue>) -> AttrChange {
        AttrChange {
            key: key.into(),
            old,
            new,
        }
    }

    fn record_of(changes: &[AttrChange]) -> Record {
        write::written(changes)
    }

    #[test]
    fn resource_nests_names_emails_and_extensions() {
        let mut r = Record::new();
        r.insert("userName".into(), AttrValue::Str("a@x".into()));
        r.insert("active".into(), AttrValue::Bool(true));
        r.insert("name.givenName".into(), AttrValue::Str("Ada".into()));
        r.insert("emails.work".into(), AttrValue::Str("a@x".into()));
        r.insert("enterprise.manager".into(), AttrValue::Str("m-1".into()));
        r.insert("custom.city".into(), AttrValue::Str("Oslo".into()));
        let v = target().resource(&r);
        assert_eq!(v["name"]["givenName"], "Ada");
        assert_eq!(v["active"], true);
        assert_eq!(
            v["emails"][0],
            json!({"value":"a@x","type":"work","primary":true})
        );
        assert_eq!(v[ENTERPRISE_USER]["manager"], json!({"value":"m-1"}));
        assert_eq!(
            v["urn:ietf:params:scim:schemas:extension:acme:2.0:User"]["city"],
            "Oslo"
        );
        let schemas = v["schemas"].as_array().unwrap();
        assert_eq!(schemas.len(), 3);
        // Round trip back into the record vocabulary.
        let mut with_id = v.clone();
        with_id["id"] = json!("t-1");
        assert_eq!(target().parse_user(&with_id).unwrap().record, r);
    }

    #[test]
    fn default_writes_replace_even_empty_values_replace_lists_whole_and_remove_to_clear() {
        let changes = [
            change("title", s("A"), s("B")),
            change("emails.work", None, s("n@x")),
            change("emails.home", s("h@x"), None),
            change(
                "active",
                Some(AttrValue::Bool(true)),
                Some(AttrValue::Bool(false)),
            ),
            change("enterprise.department", None, s("R&D")),
            change("enterprise.manager", s("m1"), s("m2")),
            change("name.familyName", s("X"), None),
            change("enterprise.manager", s("m2"), None),
        ];
        let mut record = record_of(&changes);
        record.insert("emails.other".into(), AttrValue::Str("o@x".into()));
        let ops = target().patch_ops(&changes, &record);
        assert_eq!(ops[0], json!({"op":"replace","path":"title","value":"B"}));
        assert_eq!(
            ops[1],
            json!({"op":"replace","path":"emails","value":[
                {"value":"o@x","type":"other"},
                {"value":"n@x","type":"work","primary":true}]}),
            "the whole list, unchanged elements from the record included"
        );
        assert_eq!(
            ops[2],
            json!({"op":"replace","path":"active","value":false})
        );
        assert_eq!(
            ops[3],
            json!({"op":"replace","path":format!("{ENTERPRISE_USER}:department"),"value":"R&D"}),
            "replace also when the old value was empty (RFC 7644 §3.5.2.3)"
        );
        assert_eq!(
            ops[4],
            json!({"op":"replace","path":format!("{ENTERPRISE_USER}:manager"),"value":{"value":"m2"}})
        );
        assert_eq!(ops[5], json!({"op":"remove","path":"name.familyName"}));
        assert_eq!(
            ops[6],
            json!({"op":"remove","path":format!("{ENTERPRISE_USER}:manager")})
        );
        assert_eq!(ops.len(), 7);
    }

    #[test]
    fn a_replace_only_dialect_clears_with_null_and_a_pinned_one_with_nothing() {
        let t = target().with_dialect(DialectSettings {
            patch_ops: Some([PatchOp::Replace].into()),
            ..Default::default()
        });
        let changes = [
            change("title", s("A"), None),
            change("emails.work", s("a@x"), None),
        ];
        let ops = t.patch_ops(&changes, &Record::new());
        assert_eq!(
            ops,
            vec![
                json!({"op":"replace","path":"title","value":null}),
                json!({"op":"replace","path":"emails","value":[]}),
            ]
        );
        let t = target().with_dialect(DialectSettings {
            patch_ops: Some([PatchOp::Replace].into()),
            clear: Some(Clear::None),
            put: Some(false),
            ..Default::default()
        });
        let d = t.dialect();
        let plan = write::plan(&d, &changes, &Record::new(), &|k| t.place(k));
        assert!(plan.patch.is_empty() && plan.put.is_empty());
        assert_eq!(plan.impossible.len(), 2);
        assert!(plan.impossible.iter().all(|i| i.clearing));
    }

    #[test]
    fn value_paths_are_used_only_when_the_dialect_allows_them() {
        let t = target().with_dialect(DialectSettings {
            value_paths: Some(true),
            ..Default::default()
        });
        let ops = t.patch_ops(&[change("emails.work", s("o@x"), s("n@x"))], &Record::new());
        assert_eq!(
            ops,
            vec![json!({"op":"replace","path":"emails[type eq \"work\"].value","value":"n@x"})]
        );
    }

    #[test]
    fn reading_is_tolerant() {
        let t = target();
        let u = t
            .parse_user(&json!({
                "ID": "7", "USERNAME": "ada@x", "externalId": "", "Active": "False",
                "title": "", "displayName": "Ada",
                "emails": [{"value": "ada@x", "primary": true}, {"value": "h@x", "type": "home"}],
                "name": {"givenName": "", "familyName": "Lovelace"},
                ENTERPRISE_USER: {"manager": "m-9", "department": ""}
            }))
            .unwrap();
        let r = &u.record;
        assert_eq!(u.id, "7");
        assert_eq!(r["active"], AttrValue::Bool(false));
        assert!(!r.contains_key("externalId") && !r.contains_key("title"));
        assert_eq!(r["emails.work"], AttrValue::Str("ada@x".into()));
        assert_eq!(r["emails.home"], AttrValue::Str("h@x".into()));
        assert!(!r.contains_key("name.givenName"));
        assert_eq!(r["enterprise.manager"], AttrValue::Str("m-9".into()));
        assert!(!r.contains_key("enterprise.department"));
        // A sole untyped e-mail is the work one too; an untyped non-primary among others is not.
        let sole = t
            .parse_user(&json!({"id": "1", "userName": "a", "emails": [{"value": "s@x"}]}))
            .unwrap();
        assert_eq!(sole.record["emails.work"], AttrValue::Str("s@x".into()));
        let two = t
            .parse_user(&json!({"id": "1", "userName": "a", "emails": [{"value": "s@x"}, {"value": "t@x"}]}))
            .unwrap();
        assert!(!two.record.contains_key("emails.work"));
    }

    #[test]
    fn an_echoed_token_never_reaches_an_error() {
        let t = ScimTarget::new(
            &Url::parse("http://lms.test/scim/v2").unwrap(),
            SecretString::from("lms-token-0123456789"),
            "urn:ietf:params:scim:schemas:extension:acme:2.0:User",
            2,
            Duration::from_secs(5),
        )
        .unwrap();
        let e = t.error(
            "GET",
            "/Users",
            401,
            br#"{"detail": "bad header: Bearer lms-token-0123456789"}"#,
        );
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("lms-token-0123456789"), "{shown}");
        assert!(shown.contains("Bearer [redacted]"), "{shown}");
        let e = t.error(
            "GET",
            "/Users",
            400,
            b"Authorization: Bearer lms-token-0123456789",
        );
        assert!(!format!("{e}").contains("0123456789"), "{e}");
    }

    #[test]
    fn errors_are_read_tolerantly() {
        let t = target();
        let e = t.error(
            "POST",
            "/Users",
            409,
            br#"{"detail": "exists", "status": 409}"#,
        );
        assert!(
            matches!(&e, TargetError::Http { status: 409, scim_type: None, detail, .. } if detail == "exists"),
            "{e:?}"
        );
        let e = t.error("GET", "/Schemas/x", 404, b"");
        assert!(matches!(&e, TargetError::Http { detail, .. } if detail == "no detail given"));
        let e = t.error(
            "PATCH",
            "/Users/1",
            400,
            br#"{"scimType": "mutability", "detail": "Operations[1]: \"externalId\" is immutable"}"#,
        );
        let parts = write::plan(
            &t.dialect(),
            &[
                change("title", None, s("x")),
                change("externalId", None, s("e")),
            ],
            &Record::new(),
            &|k| t.place(k),
        )
        .patch;
        assert_eq!(blame(&parts, &e), Some(1));
        let e = t.error(
            "PATCH",
            "/Users/1",
            400,
            br#"{"detail": "bad \"externalId\""}"#,
        );
        assert_eq!(blame(&parts, &e), Some(1));
    }

    #[test]
    fn an_exact_user_name_wins_over_a_case_variant() {
        let u = |id: &str, n: &str| TargetUser {
            id: id.into(),
            user_name: n.into(),
            record: Record::new(),
        };
        let got = pick(
            FilterAttr::UserName,
            "Ada@x",
            vec![u("1", "ada@x"), u("2", "Ada@x")],
        )
        .unwrap()
        .unwrap();
        assert_eq!(got.id, "2");
        assert!(pick(
            FilterAttr::UserName,
            "ADA@x",
            vec![u("1", "ada@x"), u("2", "Ada@x")]
        )
        .is_err());
    }

    #[test]
    fn filters_are_escaped_and_percent_encoded() {
        let literal = serde_json::to_string("o\"brien\\x y").unwrap();
        let enc = query_encode(&format!("userName eq {literal}"));
        assert_eq!(enc, "userName%20eq%20%22o%5C%22brien%5C%5Cx%20y%22");
        assert_eq!(lenient_bool(Some(&json!("False"))), Some(false));
        assert_eq!(lenient_bool(Some(&json!(1))), Some(true));
    }
}
