//! Graph webhook endpoints: `POST /webhooks/graph/{integration}` (change notifications) and
//! `POST /webhooks/lifecycle/{integration}` (lifecycle events).
//!
//! Owns: the validation handshake ([`handshake`]), parsing with a body limit, clientState
//! (constant time), tenant and subscription checks, `validationTokens` verification, appending
//! accepted notifications to the integration's queue and answering 202 only once they are on
//! disk (group commit). It never calls Graph or the LMS; the worker does that later.
//!
//! The endpoints face the internet, so:
//! - a request for an integration that does not exist is answered exactly as a forged request
//!   for one that does (handshake: 404; notifications: 400/403/202 by the body), so names cannot
//!   be enumerated;
//! - rejections are counted ([`WebhookStats`], `/metrics`) and logged at most once per request
//!   and once per [`rejections::LOG_INTERVAL`] per integration, with counts and one short
//!   escaped excerpt, never the body ([`rejections`]);
//! - memory per request is bounded by the body limit: at most [`MAX_NOTIFICATIONS`]
//!   notifications and [`tokens::MAX_TOKENS`] validation tokens are read, borrowed from the
//!   body; anything beyond is rejected while parsing.
//!
//! `validationTokens` policy (see `docs/security.md`): our subscriptions (users, group
//! members) are basic notifications without resource data, for which Graph documents no
//! validation tokens; clientState (a random 64-character secret), a subscription id we
//! created and the tenant authenticate them. When a batch does carry tokens (lifecycle
//! notifications are observed to), every token must verify or the batch is refused; when they
//! cannot be verified in time (signing keys unreachable), nothing is queued and Graph is told
//! to retry (503).

pub(crate) mod handshake;
pub(crate) mod rejections;
pub mod tokens;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::{ExposeSecret, SecretString};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::store::queue::{Hint, QueueItem};
use crate::store::state::Watch;
use crate::store::IntegrationStore;
use crate::text::is_guid;
use handshake::{HandshakeWindow, TokenCheck};
use rejections::{Reason, RejectionLog, Tally};
use tokens::{Cloud, JwksCache, TokenError, TokenExpectation};

/// Most notifications read from one body (Graph batches far fewer).
pub(crate) const MAX_NOTIFICATIONS: usize = 1000;
/// Time allowed to verify a batch's `validationTokens` (Graph waits 3 s for the answer).
pub(crate) const TOKEN_CHECK_BUDGET: Duration = Duration::from_millis(1500);

/// The tenant GUID notifications and validation tokens must name. Known from the start when
/// `tenant_id` is a GUID; learnt from the tenant's OpenID metadata at start-up when it is a
/// domain name. Clones share it.
#[derive(Clone, Default, Debug)]
pub struct TenantGuid(Arc<RwLock<Option<String>>>);

impl TenantGuid {
    /// From the configured `tenant_id`: known if it is a GUID.
    pub(crate) fn from_config(tenant_id: &str) -> Self {
        let t = TenantGuid::default();
        if is_guid(tenant_id) {
            t.set(tenant_id);
        }
        t
    }

    pub(crate) fn set(&self, guid: &str) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(guid.to_ascii_lowercase());
    }

    pub(crate) fn get(&self) -> Option<String> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One integration as the webhook sees it.
pub struct Hook {
    pub name: String,
    pub client_id: String,
    pub client_state: SecretString,
    pub store: IntegrationStore,
    /// Woken after something was queued.
    pub wake: Arc<Notify>,
    /// The tenant notifications must come from.
    pub tenant: TenantGuid,
    /// Verifies `validationTokens` (keys of this integration's cloud) when present; `None`:
    /// a batch with tokens cannot be verified and is refused with 503.
    pub tokens: Option<JwksCache>,
    /// The cloud whose token issuers are accepted.
    pub cloud: Cloud,
    /// Subscription ids already confirmed by the store.
    pub known: KnownSubscriptions,
    /// When handshakes are answered.
    pub handshake: HandshakeWindow,
    /// This integration's rate-limited rejection log.
    pub rejections: RejectionLog,
}

impl Hook {
    /// A hook with no token verification, an empty cache, a closed handshake window and the
    /// global cloud; the public fields can be changed after.
    pub fn new(
        name: &str,
        tenant_id: &str,
        client_id: &str,
        client_state: SecretString,
        store: IntegrationStore,
        wake: Arc<Notify>,
    ) -> Hook {
        Hook {
            name: name.to_string(),
            client_id: client_id.to_string(),
            client_state,
            store,
            wake,
            tenant: TenantGuid::from_config(tenant_id),
            tokens: None,
            cloud: Cloud::Global,
            known: KnownSubscriptions::default(),
            handshake: HandshakeWindow::default(),
            rejections: RejectionLog::default(),
        }
    }
}

/// Counters for `/metrics` and `/status`.
#[derive(Default, Debug)]
pub struct WebhookStats {
    pub validations: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected_client_state: AtomicU64,
    pub rejected_subscription: AtomicU64,
    pub rejected_token: AtomicU64,
    pub rejected_handshake: AtomicU64,
    pub unknown_integration: AtomicU64,
    pub malformed: AtomicU64,
    pub store_failures: AtomicU64,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct WebhookStatsView {
    pub validations: u64,
    pub accepted: u64,
    pub rejected_client_state: u64,
    pub rejected_subscription: u64,
    pub rejected_token: u64,
    pub rejected_handshake: u64,
    pub unknown_integration: u64,
    pub malformed: u64,
    pub store_failures: u64,
}

impl WebhookStats {
    pub fn view(&self) -> WebhookStatsView {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        WebhookStatsView {
            validations: g(&self.validations),
            accepted: g(&self.accepted),
            rejected_client_state: g(&self.rejected_client_state),
            rejected_subscription: g(&self.rejected_subscription),
            rejected_token: g(&self.rejected_token),
            rejected_handshake: g(&self.rejected_handshake),
            unknown_integration: g(&self.unknown_integration),
            malformed: g(&self.malformed),
            store_failures: g(&self.store_failures),
        }
    }

    fn count(&self, tally: &Tally) {
        let add = |a: &AtomicU64, r: Reason| {
            let n = tally.get(r);
            if n > 0 {
                a.fetch_add(n, Ordering::Relaxed);
            }
        };
        add(&self.rejected_client_state, Reason::ClientState);
        add(&self.rejected_subscription, Reason::UnknownSubscription);
        add(&self.rejected_subscription, Reason::Tenant);
        add(&self.malformed, Reason::Malformed);
        add(&self.rejected_token, Reason::ValidationToken);
        add(&self.rejected_handshake, Reason::Handshake);
        add(&self.unknown_integration, Reason::UnknownIntegration);
    }
}

pub struct WebhookState {
    pub hooks: HashMap<String, Hook>,
    pub stats: Arc<WebhookStats>,
    /// Rejections for integration names that do not exist, logged together.
    pub unknown: RejectionLog,
}

impl WebhookState {
    pub fn new(hooks: HashMap<String, Hook>, stats: Arc<WebhookStats>) -> Self {
        WebhookState {
            hooks,
            stats,
            unknown: RejectionLog::default(),
        }
    }
}

/// Registers the two endpoints; `max_body` bounds every notification body.
pub fn configure(cfg: &mut web::ServiceConfig, state: web::Data<WebhookState>, max_body: usize) {
    cfg.service(
        web::scope("/webhooks")
            .app_data(state)
            .app_data(web::PayloadConfig::new(max_body))
            // Graph may send lifecycle events to either URL; one handler serves both.
            .route("/graph/{integration}", web::post().to(handle))
            .route("/lifecycle/{integration}", web::post().to(handle)),
    );
}

/// The notification collection, read into borrowed fields: nothing else in the body is kept
/// (unknown properties are skipped, not built into JSON trees), and no more than
/// [`MAX_NOTIFICATIONS`] notifications or [`tokens::MAX_TOKENS`] tokens are read.
#[derive(Deserialize)]
struct Collection<'a> {
    #[serde(borrow, deserialize_with = "bounded_notifications")]
    value: Vec<Notification<'a>>,
    #[serde(
        default,
        rename = "validationTokens",
        deserialize_with = "bounded_tokens"
    )]
    validation_tokens: Option<Vec<Cow<'a, str>>>,
}

const TOO_MANY: &str = "too many notifications in one body";
const TOO_MANY_TOKENS: &str = "too many validation tokens in one body";

/// A sequence read element by element that fails once it holds more than `max`.
struct Bounded<T> {
    max: usize,
    what: &'static str,
    _t: std::marker::PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "an array of at most {} elements", self.max)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::new();
        while let Some(el) = seq.next_element()? {
            if out.len() == self.max {
                return Err(de::Error::custom(self.what));
            }
            out.push(el);
        }
        Ok(out)
    }
}

fn bounded_notifications<'de: 'a, 'a, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<Notification<'a>>, D::Error> {
    d.deserialize_seq(Bounded {
        max: MAX_NOTIFICATIONS,
        what: TOO_MANY,
        _t: std::marker::PhantomData,
    })
}

fn bounded_tokens<'de: 'a, 'a, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Vec<Cow<'a, str>>>, D::Error> {
    Option::<BoundedTokens<'a>>::deserialize(d).map(|o| o.map(|t| t.0))
}

struct BoundedTokens<'a>(Vec<Cow<'a, str>>);

impl<'de: 'a, 'a> Deserialize<'de> for BoundedTokens<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Tok<'a>(#[serde(borrow)] Cow<'a, str>);
        d.deserialize_seq(Bounded::<Tok<'a>> {
            max: tokens::MAX_TOKENS,
            what: TOO_MANY_TOKENS,
            _t: std::marker::PhantomData,
        })
        .map(|v| BoundedTokens(v.into_iter().map(|t| t.0).collect()))
    }
}

#[derive(Deserialize)]
struct Notification<'a> {
    #[serde(default, borrow, rename = "subscriptionId")]
    subscription_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "clientState")]
    client_state: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "tenantId")]
    tenant_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "organizationId")]
    organization_id: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "lifecycleEvent")]
    lifecycle_event: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    resource: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "resourceData")]
    resource_data: Option<ResourceData<'a>>,
}

#[derive(Deserialize)]
struct ResourceData<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
}

/// Subscription ids the store confirmed, so most notifications skip decoding the record. Only
/// confirmed ids enter, a hit is checked against the store's keys (so a subscription removed
/// from the store is dropped from here at its next notification), and it is bounded.
#[derive(Default)]
pub struct KnownSubscriptions(std::sync::RwLock<HashMap<String, Watch>>);

const KNOWN_SUBSCRIPTIONS_MAX: usize = 1024;

impl KnownSubscriptions {
    fn get(&self, store: &IntegrationStore, id: &str) -> Option<Watch> {
        let cached = self
            .0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        if let Some(w) = cached {
            if store.has_subscription(id) {
                return Some(w);
            }
            self.forget(id);
            return None;
        }
        let record = store.subscription(id).ok().flatten()?;
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        if m.len() >= KNOWN_SUBSCRIPTIONS_MAX {
            m.clear();
        }
        m.insert(id.to_string(), record.watch.clone());
        Some(record.watch)
    }

    /// Drops an id (its subscription was removed).
    pub(crate) fn forget(&self, id: &str) {
        self.0.write().unwrap_or_else(|e| e.into_inner()).remove(id);
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A webhook answer: status and a fixed plain-text body (the handshake's is the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    pub status: u16,
    pub body: Cow<'static, str>,
}

impl Reply {
    fn new(status: u16, body: &'static str) -> Reply {
        Reply {
            status,
            body: Cow::Borrowed(body),
        }
    }

    fn not_found() -> Reply {
        Reply::new(404, "not found")
    }
}

fn client_state_ok(expected: &SecretString, got: Option<&str>) -> bool {
    let e = expected.expose_secret().as_bytes();
    match got {
        Some(g) => e.len() == g.len() && bool::from(e.ct_eq(g.as_bytes())),
        None => false,
    }
}

/// The lifecycle events Graph documents; anything else is kept as a short escaped excerpt.
const LIFECYCLE_EVENTS: [&str; 3] = ["reauthorizationRequired", "subscriptionRemoved", "missed"];

/// Why a single notification was not queued.
enum Reject {
    Reason(Reason),
    /// `tenant_id` is a domain whose GUID is not known yet.
    TenantUnresolved,
}

/// A user id as Graph writes object ids (a GUID); anything else is not queued.
fn plausible_object_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Turns one notification into a hint, or says why it is not ours.
fn hint_for(hook: &Hook, n: &Notification<'_>) -> Result<Hint, Reject> {
    if !client_state_ok(&hook.client_state, n.client_state.as_deref()) {
        return Err(Reject::Reason(Reason::ClientState));
    }
    // Change notifications carry tenantId; lifecycle ones were seen with organizationId
    // instead. One of them must be there and be ours.
    let Some(tenant) = n.tenant_id.as_deref().or(n.organization_id.as_deref()) else {
        return Err(Reject::Reason(Reason::Tenant));
    };
    let Some(ours) = hook.tenant.get() else {
        return Err(Reject::TenantUnresolved);
    };
    if !tenant.eq_ignore_ascii_case(&ours) {
        return Err(Reject::Reason(Reason::Tenant));
    }
    let Some(sub_id) = n.subscription_id.as_deref() else {
        return Err(Reject::Reason(Reason::Malformed));
    };
    // Only subscriptions we track: an unknown id is ignored like any forged notification.
    let Some(watch) = hook.known.get(&hook.store, sub_id) else {
        return Err(Reject::Reason(Reason::UnknownSubscription));
    };
    if let Some(event) = n.lifecycle_event.as_deref() {
        let event = match LIFECYCLE_EVENTS.iter().find(|e| **e == event) {
            Some(e) => (*e).to_string(),
            None => crate::logging::excerpt(event, 64),
        };
        return Ok(Hint::Lifecycle {
            event,
            subscription_id: sub_id.to_string(),
        });
    }
    match watch {
        Watch::Members { group_id } => Ok(Hint::Membership { group_id }),
        Watch::Users => {
            let id = n
                .resource_data
                .as_ref()
                .and_then(|d| d.id.as_deref())
                .or_else(|| n.resource.as_deref().and_then(|r| r.rsplit('/').next()))
                .filter(|id| plausible_object_id(id))
                .map(str::to_string);
            match id {
                Some(user_id) => Ok(Hint::User {
                    user_id,
                    follow_up: false,
                }),
                None => Err(Reject::Reason(Reason::Malformed)),
            }
        }
    }
}

/// Why a body could not be read, as a fixed text: serde's messages quote the input.
fn parse_failure(e: &serde_json::Error) -> (&'static str, &'static str) {
    let text = e.to_string();
    if text.starts_with(TOO_MANY) {
        return (TOO_MANY, TOO_MANY);
    }
    if text.starts_with(TOO_MANY_TOKENS) {
        return (TOO_MANY_TOKENS, TOO_MANY_TOKENS);
    }
    let detail = match e.classify() {
        serde_json::error::Category::Syntax => "not JSON",
        serde_json::error::Category::Eof => "JSON cut short",
        serde_json::error::Category::Data => "JSON, but not a notification collection",
        serde_json::error::Category::Io => "unreadable",
    };
    (detail, "body is not a change notification collection")
}

/// Handles one request to `/webhooks/{graph|lifecycle}/{name}` with its raw query string and
/// body; everything but the HTTP framing. Public for the fuzz tests and benchmarks.
pub(crate) async fn process(st: &WebhookState, name: &str, query: &str, body: &[u8]) -> Reply {
    let stats = &st.stats;
    let hook = st.hooks.get(name);
    let label = hook.map_or("(unknown)", |h| h.name.as_str());
    let log = hook.map_or(&st.unknown, |h| &h.rejections);
    let mut tally = Tally::default();
    if hook.is_none() {
        tally.add(Reason::UnknownIntegration, 1);
        tally.example(name);
    }
    let reply = process_inner(st, hook, query, body, &mut tally).await;
    if tally.total() > 0 {
        stats.count(&tally);
        for r in Reason::ALL {
            let n = tally.get(r);
            if n > 0 {
                crate::metrics::notifications_rejected(label, r.label(), n);
            }
        }
        log.record(label, &tally);
    }
    reply
}

async fn process_inner(
    st: &WebhookState,
    hook: Option<&Hook>,
    query: &str,
    body: &[u8],
    tally: &mut Tally,
) -> Reply {
    let stats = &st.stats;
    match handshake::validation_token(query) {
        TokenCheck::Absent => {}
        check => {
            // Same answer for a name that does not exist and for one outside its window.
            let open = hook.is_some_and(|h| h.handshake.is_open());
            return match (open, check) {
                (true, TokenCheck::Echo(token)) => {
                    stats.validations.fetch_add(1, Ordering::Relaxed);
                    // Debug: inside the start-up window anyone knowing the name can ask.
                    if let Some(h) = hook {
                        tracing::debug!(integration = %h.name, "answered Graph's validation request");
                    }
                    Reply {
                        status: 200,
                        body: Cow::Owned(token),
                    }
                }
                (true, TokenCheck::Refused(why)) => {
                    tally.add(Reason::Handshake, 1);
                    tally.detail = Some(why);
                    Reply::new(400, "validation token refused")
                }
                _ => {
                    tally.add(Reason::Handshake, 1);
                    tally.detail = Some("handshake outside a subscription call of ours");
                    Reply::not_found()
                }
            };
        }
    }
    let parsed: Collection = match serde_json::from_slice(body) {
        Ok(c) => c,
        Err(e) => {
            let (detail, answer) = parse_failure(&e);
            tally.add(Reason::Malformed, 1);
            tally.detail = Some(detail);
            return Reply::new(400, answer);
        }
    };
    let Some(hook) = hook else {
        // As a known integration answers a forged batch.
        return if parsed.value.is_empty() {
            Reply::new(202, "")
        } else {
            Reply::new(403, "no notification was accepted")
        };
    };
    let mut hints = Vec::new();
    let mut unresolved = false;
    for n in &parsed.value {
        match hint_for(hook, n) {
            Ok(h) => hints.push(h),
            Err(Reject::Reason(r)) => {
                tally.add(r, 1);
                if let Some(sub) = n.subscription_id.as_deref() {
                    tally.example(sub);
                }
            }
            Err(Reject::TenantUnresolved) => unresolved = true,
        }
    }
    if unresolved {
        // Authentic-looking, but the tenant cannot be checked yet: Graph retries.
        tracing::warn!(integration = %hook.name, "notifications arrived before the tenant id was resolved; answering 503 so Graph retries");
        return Reply::new(503, "not ready; retry later");
    }
    if !hints.is_empty() {
        if let Some(reply) = check_tokens(hook, parsed.validation_tokens.as_deref(), tally).await {
            return reply;
        }
    }
    if hints.is_empty() {
        return if tally.total() > 0 {
            Reply::new(403, "no notification was accepted")
        } else {
            Reply::new(202, "")
        };
    }
    let items: Vec<QueueItem> = hints.into_iter().map(QueueItem::new).collect();
    let n = items.len() as u64;
    if let Err(e) = hook.store.enqueue_durable(&items).await {
        stats.store_failures.fetch_add(1, Ordering::Relaxed);
        crate::metrics::notification_rejected(&hook.name, "store_failure");
        tracing::error!(integration = %hook.name, error = %e, "cannot store notifications; answering 503 so Graph retries");
        return Reply::new(503, "store unavailable");
    }
    stats.accepted.fetch_add(n, Ordering::Relaxed);
    crate::metrics::notifications_received(&hook.name, n);
    hook.wake.notify_one();
    tracing::debug!(integration = %hook.name, queued = n, rejected = tally.total(), "notifications queued");
    Reply::new(202, "")
}

/// Verifies a batch's `validationTokens` when it has any. `Some(reply)`: the batch is not
/// queued.
async fn check_tokens(
    hook: &Hook,
    tokens: Option<&[Cow<'_, str>]>,
    tally: &mut Tally,
) -> Option<Reply> {
    let tokens = tokens.filter(|t| !t.is_empty())?;
    let retry_later = Some(Reply::new(
        503,
        "validation tokens cannot be verified now; retry later",
    ));
    let (Some(cache), Some(tenant)) = (&hook.tokens, hook.tenant.get()) else {
        tracing::warn!(integration = %hook.name, "validationTokens arrived but cannot be checked (no key set); answering 503");
        return retry_later;
    };
    let expect = TokenExpectation {
        client_ids: vec![hook.client_id.clone()],
        tenant_id: tenant,
        cloud: hook.cloud.clone(),
    };
    let owned: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    // Bounded: a slow key endpoint must not hold Graph past its 3 s budget.
    match tokio::time::timeout(TOKEN_CHECK_BUDGET, cache.verify(&owned, &expect)).await {
        Ok(Ok(())) => None,
        Ok(Err(TokenError::KeyFetch(e))) => {
            tracing::warn!(integration = %hook.name, error = %e, "validationTokens cannot be verified (signing keys unavailable); nothing queued, answering 503 so Graph retries");
            retry_later
        }
        Ok(Err(e)) => {
            tally.add(Reason::ValidationToken, 1);
            tally.detail = Some("validationTokens failed verification");
            tracing::debug!(integration = %hook.name, error = %e, "validationTokens rejected");
            Some(Reply::new(403, "validation tokens rejected"))
        }
        Err(_) => {
            tracing::warn!(integration = %hook.name, "validationTokens could not be verified in time; nothing queued, answering 503 so Graph retries");
            retry_later
        }
    }
}

async fn handle(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    st: web::Data<WebhookState>,
) -> HttpResponse {
    let name = path.into_inner();
    let reply = process(&st, &name, req.query_string(), &body).await;
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = HttpResponse::build(status);
    r.insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Cache-Control", "no-store"));
    if reply.body.is_empty() {
        r.finish()
    } else {
        r.content_type("text/plain; charset=utf-8")
            .body(reply.body.into_owned())
    }
}

/// A webhook over a temporary store, for this crate's tests and fuzz targets.
#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::config::IntegrationName;
    use crate::store::state::SubscriptionRecord;
    use crate::store::Store;

    pub(crate) const NAME: &str = "acme";
    pub(crate) const TENANT: &str = "7a4f1c2e-0b9d-4e6a-8c3f-2d1e5b6a7c8d";
    pub(crate) const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
    pub(crate) const CLIENT_STATE: &str = "the-client-state-secret-0123456789";
    pub(crate) const USERS_SUB: &str = "d850b120-19bb-4291-b9c4-845ea04dd38d";
    pub(crate) const GROUP_SUB: &str = "0bc7d487-fd6f-41a0-8362-71ec81074f11";
    pub(crate) const GROUP: &str = "f0a5993b-5c2d-49cc-bb2f-8cb0060fef8e";

    pub(crate) struct Fixture {
        pub state: WebhookState,
        pub store: Store,
        pub integ: IntegrationStore,
    }

    pub(crate) fn record(id: &str, watch: Watch) -> SubscriptionRecord {
        let now = chrono::Utc::now();
        SubscriptionRecord {
            id: id.into(),
            watch,
            resource: "/users".into(),
            change_type: "updated,deleted".into(),
            expires_at: now + chrono::Duration::days(2),
            created_at: now,
            renewed_at: None,
            last_error: None,
            notification_url: String::new(),
            client_state_fp: None,
        }
    }

    pub(crate) fn fixture_with(tenant_id: &str) -> Fixture {
        let store = Store::temporary().unwrap();
        let integ = store
            .integration(&IntegrationName::parse(NAME).unwrap())
            .unwrap();
        integ
            .put_subscription(&record(USERS_SUB, Watch::Users))
            .unwrap();
        integ
            .put_subscription(&record(
                GROUP_SUB,
                Watch::Members {
                    group_id: GROUP.into(),
                },
            ))
            .unwrap();
        let hook = Hook::new(
            NAME,
            tenant_id,
            CLIENT_ID,
            SecretString::from(CLIENT_STATE),
            integ.clone(),
            Arc::new(Notify::new()),
        );
        let mut hooks = HashMap::new();
        hooks.insert(NAME.to_string(), hook);
        Fixture {
            state: WebhookState::new(hooks, Arc::new(WebhookStats::default())),
            store,
            integ,
        }
    }

    pub(crate) fn fixture() -> Fixture {
        fixture_with(TENANT)
    }

    impl Fixture {
        pub(crate) fn hook(&self) -> &Hook {
            &self.state.hooks[NAME]
        }
    }

    /// A change notification of the users subscription for `user`.
    pub(crate) fn user_notification(user: &str) -> serde_json::Value {
        serde_json::json!({
            "changeType": "updated",
            "clientState": CLIENT_STATE,
            "resource": format!("Users/{user}"),
            "resourceData": {"@odata.type": "#Microsoft.Graph.User", "id": user},
            "subscriptionId": USERS_SUB,
            "tenantId": TENANT,
        })
    }

    pub(crate) fn body(notifications: Vec<serde_json::Value>) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({ "value": notifications })).unwrap()
    }

    /// Runs `f` on a current-thread runtime and returns what it logged (text format, as
    /// `serve` writes it) with its result.
    pub(crate) fn logged<T>(f: impl std::future::Future<Output = T>) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(crate::logging::TextFields)
            .with_writer(move || out.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = {
            let _g = tracing::subscriber::set_default(subscriber);
            rt.block_on(f)
        };
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        (result, text)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use serde_json::json;

    #[test]
    fn client_state_must_match_exactly() {
        let s = SecretString::from("abc123");
        assert!(client_state_ok(&s, Some("abc123")));
        assert!(!client_state_ok(&s, Some("abc124")));
        assert!(!client_state_ok(&s, Some("abc12")));
        assert!(!client_state_ok(&s, None));
    }

    #[test]
    fn a_genuine_notification_is_queued() {
        let f = fixture();
        let user = "4d147cc8-10cb-4158-ac52-90ee8ff9d846";
        let (r, _) = logged(process(
            &f.state,
            NAME,
            "",
            &body(vec![user_notification(user)]),
        ));
        assert_eq!(r.status, 202);
        assert_eq!(f.integ.queue_len(), 1);
        assert_eq!(f.state.stats.view().accepted, 1);
    }

    /// 1,000 forged notifications in one request (about 100 KB in) make one log line of
    /// bounded size, with the count, and nothing else.
    #[test]
    fn a_forged_batch_is_counted_in_one_short_line() {
        let f = fixture();
        let before = f.store.digest();
        let forged: Vec<_> = (0..MAX_NOTIFICATIONS)
            .map(|i| {
                let mut n = user_notification("4d147cc8-10cb-4158-ac52-90ee8ff9d846");
                n["clientState"] = json!(format!("guess-{i}"));
                n["subscriptionId"] = json!(format!("forged\nINFO admin logged in {i}"));
                n
            })
            .collect();
        let (r, log) = logged(process(&f.state, NAME, "", &body(forged)));
        assert_eq!(r.status, 403);
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.len() < 600, "{} bytes: {log}", log.len());
        assert!(log.contains("client_state=1000"), "{log}");
        assert!(
            !log.contains("guess-"),
            "the secret guesses are not logged: {log}"
        );
        assert!(log.contains("forged\\nINFO"), "excerpt escaped: {log}");
        assert_eq!(f.state.stats.view().rejected_client_state, 1000);
        assert_eq!(f.integ.queue_len(), 0);
        // The next forged requests within the interval add to the counters, not to the log.
        let one = body(vec![
            json!({"clientState": "x", "subscriptionId": USERS_SUB}),
        ]);
        for _ in 0..50 {
            let (r, log) = logged(process(&f.state, NAME, "", &one));
            assert_eq!(r.status, 403);
            assert!(log.is_empty(), "{log}");
        }
        assert_eq!(f.state.stats.view().rejected_client_state, 1050);
        assert_eq!(f.store.digest(), before, "no store key changed");
    }

    /// serde's message for a wrong type quotes the value; none of it reaches the log.
    #[test]
    fn a_malformed_body_is_not_quoted() {
        let f = fixture();
        let marker = format!("ATTACKER{}", "A".repeat(5000));
        for b in [
            json!({"value": marker}).to_string(),
            format!("{{\"value\": [{{\"clientState\": 7}}], \"x\": \"{marker}\""),
            format!("not json {marker}"),
        ] {
            let (r, log) = logged(process(&f.state, NAME, "", b.as_bytes()));
            assert_eq!(r.status, 400);
            assert!(!log.contains("ATTACKER"), "{log}");
            assert!(!r.body.contains("ATTACKER"));
        }
    }

    /// An integration name that does not exist is answered like a forged request to one that
    /// does, and its (escaped) name is logged at most as an excerpt.
    #[test]
    fn unknown_integrations_cannot_be_told_from_known_ones() {
        let f = fixture();
        let forged = body(vec![
            json!({"clientState": "guess", "subscriptionId": USERS_SUB,
            "tenantId": TENANT}),
        ]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("", forged.clone()),
            ("", b"{not json".to_vec()),
            ("", body(vec![])),
            ("validationToken=hello", Vec::new()),
            ("validationToken=%00bad", Vec::new()),
        ];
        for (query, b) in cases {
            let (known, _) = logged(process(&f.state, NAME, query, &b));
            let long = format!("nope\r\n{}", "x".repeat(500));
            let (unknown, log) = logged(process(&f.state, &long, query, &b));
            assert_eq!(known, unknown, "query {query:?}");
            assert!(
                log.lines().count() <= 1 && !log.contains('\r') && log.len() < 600,
                "{log}"
            );
        }
    }

    /// The handshake is answered only while a subscription call of ours is pending, with
    /// printable tokens of bounded length.
    #[test]
    fn the_handshake_answers_only_inside_the_window() {
        let f = fixture();
        let token = "Validation%3A+Testing+client+application+reachability";
        let q = format!("validationToken={token}");
        let (closed, _) = logged(process(&f.state, NAME, &q, b""));
        assert_eq!(closed, Reply::not_found());
        let pending = f.hook().handshake.pending();
        let (open, log) = logged(process(&f.state, NAME, &q, b""));
        assert_eq!(open.status, 200);
        assert_eq!(
            open.body,
            "Validation: Testing client application reachability"
        );
        assert!(
            log.is_empty(),
            "answered handshakes are logged at debug only: {log}"
        );
        for hostile in [
            format!(
                "validationToken={}",
                "a".repeat(handshake::MAX_TOKEN_CHARS + 1)
            ),
            "validationToken=%3Cscript%3Ealert(1)%3C/script%3E%0A".into(),
            "validationToken=a%0D%0ASet-Cookie%3A+x%3D1".into(),
        ] {
            let (r, _) = logged(process(&f.state, NAME, &hostile, b""));
            assert_eq!(r.status, 400, "{hostile}");
            assert!(!r.body.contains("script") && !r.body.contains("Cookie"));
        }
        drop(pending);
        let (closed, _) = logged(process(&f.state, NAME, &q, b""));
        assert_eq!(closed, Reply::not_found());
        assert_eq!(f.state.stats.view().validations, 1);
    }

    /// A notification without tenantId/organizationId is refused; a domain tenant_id refuses
    /// with 503 (retry) until its GUID is known, then checks it.
    #[test]
    fn the_tenant_is_always_checked() {
        let f = fixture();
        let user = "4d147cc8-10cb-4158-ac52-90ee8ff9d846";
        let mut n = user_notification(user);
        n.as_object_mut().unwrap().remove("tenantId");
        let (r, _) = logged(process(&f.state, NAME, "", &body(vec![n.clone()])));
        assert_eq!(r.status, 403);
        n["organizationId"] = json!(TENANT.to_uppercase());
        let (r, _) = logged(process(&f.state, NAME, "", &body(vec![n])));
        assert_eq!(
            r.status, 202,
            "organizationId (any case) stands in for tenantId"
        );

        let f = fixture_with("contoso.onmicrosoft.com");
        let (r, _) = logged(process(
            &f.state,
            NAME,
            "",
            &body(vec![user_notification(user)]),
        ));
        assert_eq!(r.status, 503);
        assert_eq!(f.integ.queue_len(), 0);
        f.hook().tenant.set("00000000-1111-2222-3333-444444444444");
        let (r, _) = logged(process(
            &f.state,
            NAME,
            "",
            &body(vec![user_notification(user)]),
        ));
        assert_eq!(r.status, 403, "another tenant");
        f.hook().tenant.set(TENANT);
        let (r, _) = logged(process(
            &f.state,
            NAME,
            "",
            &body(vec![user_notification(user)]),
        ));
        assert_eq!(r.status, 202);
    }

    /// A subscription removed from the store stops being accepted at once, although its id
    /// was cached.
    #[test]
    fn a_removed_subscription_leaves_the_cache() {
        let f = fixture();
        let user = "4d147cc8-10cb-4158-ac52-90ee8ff9d846";
        let (r, _) = logged(process(
            &f.state,
            NAME,
            "",
            &body(vec![user_notification(user)]),
        ));
        assert_eq!(r.status, 202);
        assert_eq!(f.hook().known.len(), 1);
        f.integ.remove_subscription(USERS_SUB).unwrap();
        let (r, _) = logged(process(
            &f.state,
            NAME,
            "",
            &body(vec![user_notification(user)]),
        ));
        assert_eq!(r.status, 403);
        assert!(f.hook().known.is_empty());
        assert_eq!(f.integ.queue_len(), 1);
    }

    /// More than MAX_NOTIFICATIONS (or MAX_TOKENS) elements are refused while parsing, before
    /// they are built.
    #[test]
    fn element_counts_are_bounded_while_parsing() {
        let f = fixture();
        let many = format!("{{\"value\":[{}{{}}]}}", "{},".repeat(200_000));
        let (r, log) = logged(process(&f.state, NAME, "", many.as_bytes()));
        assert_eq!(r, Reply::new(400, TOO_MANY));
        assert!(log.contains(TOO_MANY));
        let tokens = format!(
            "{{\"value\":[],\"validationTokens\":[{}\"t\"]}}",
            "\"t\",".repeat(tokens::MAX_TOKENS)
        );
        let (r, _) = logged(process(&f.state, NAME, "", tokens.as_bytes()));
        assert_eq!(r.status, 400);
    }

    /// Validation tokens that cannot be verified (no key set here) leave the batch unqueued
    /// and ask Graph to retry; they are not accepted on clientState alone.
    #[test]
    fn unverifiable_validation_tokens_are_not_accepted() {
        let f = fixture();
        let user = "4d147cc8-10cb-4158-ac52-90ee8ff9d846";
        let b = serde_json::to_vec(&json!({
            "value": [user_notification(user)],
            "validationTokens": ["eyJhbGciOiJSUzI1NiJ9.e30.c2ln"],
        }))
        .unwrap();
        let (r, _) = logged(process(&f.state, NAME, "", &b));
        assert_eq!(r.status, 503);
        assert_eq!(f.integ.queue_len(), 0);
    }

    /// Lifecycle events outside the documented set are kept only as a short escaped excerpt;
    /// user ids that are not object ids are not queued.
    #[test]
    fn hint_text_from_the_body_is_bounded() {
        let f = fixture();
        let mut lc = user_notification("x");
        lc["lifecycleEvent"] = json!(format!("evil\n{}", "e".repeat(500)));
        let mut bad_user = user_notification("x");
        bad_user["resourceData"]["id"] = json!("../../me\n");
        let (r, _) = logged(process(&f.state, NAME, "", &body(vec![lc, bad_user])));
        assert_eq!(r.status, 202);
        let items = f.integ.queue_ready(chrono::Utc::now(), 10).unwrap();
        assert_eq!(items.len(), 1);
        match &items[0].1.hint {
            Hint::Lifecycle { event, .. } => {
                assert!(
                    event.starts_with("evil\\n") && event.chars().count() <= 70,
                    "{event}"
                );
            }
            other => panic!("{other:?}"),
        }
    }
}
