//! Graph webhook endpoints: `POST /webhooks/graph/{integration}` (change notifications) and
//! `POST /webhooks/lifecycle/{integration}` (lifecycle events).
//!
//! Owns: the validation handshake, parsing with a body limit, clientState (constant time) and
//! subscription checks, `validationTokens` verification, appending accepted notifications to the
//! integration's queue and answering 202 only once they are on disk (group commit). It never
//! calls Graph or the LMS; the worker does that later.

pub mod tokens;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::store::queue::{Hint, QueueItem};
use crate::store::state::Watch;
use crate::store::IntegrationStore;
use tokens::{JwksCache, TokenExpectation};

/// One integration as the webhook sees it.
pub struct Hook {
    pub name: String,
    pub tenant_id: String,
    pub client_id: String,
    pub client_state: SecretString,
    pub store: IntegrationStore,
    /// Woken after something was queued.
    pub wake: Arc<Notify>,
    /// Verifies `validationTokens` (keys of this integration's cloud) when present.
    pub tokens: Option<JwksCache>,
    /// Subscription ids already confirmed by the store.
    pub known: KnownSubscriptions,
}

/// Counters for `/metrics` and logs.
#[derive(Default, Debug)]
pub struct WebhookStats {
    pub validations: AtomicU64,
    pub accepted: AtomicU64,
    pub rejected_client_state: AtomicU64,
    pub rejected_subscription: AtomicU64,
    pub rejected_token: AtomicU64,
    pub unknown_integration: AtomicU64,
    pub malformed: AtomicU64,
    pub store_failures: AtomicU64,
}

#[derive(Serialize)]
pub struct WebhookStatsView {
    pub validations: u64,
    pub accepted: u64,
    pub rejected_client_state: u64,
    pub rejected_subscription: u64,
    pub rejected_token: u64,
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
            unknown_integration: g(&self.unknown_integration),
            malformed: g(&self.malformed),
            store_failures: g(&self.store_failures),
        }
    }
}

pub struct WebhookState {
    pub hooks: HashMap<String, Hook>,
    pub stats: Arc<WebhookStats>,
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
/// (unknown properties are skipped, not built into JSON trees).
#[derive(Deserialize)]
struct Collection<'a> {
    #[serde(borrow)]
    value: Vec<Notification<'a>>,
    #[serde(default, rename = "validationTokens")]
    validation_tokens: Option<Vec<String>>,
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

/// Subscription ids the store confirmed, so most notifications skip the store read. Only
/// confirmed ids enter (an unknown id always goes to the store), and it is bounded.
#[derive(Default)]
pub struct KnownSubscriptions(std::sync::RwLock<HashMap<String, Watch>>);

const KNOWN_SUBSCRIPTIONS_MAX: usize = 1024;

impl KnownSubscriptions {
    fn get(&self, store: &IntegrationStore, id: &str) -> Option<Watch> {
        if let Some(w) = self.0.read().unwrap_or_else(|e| e.into_inner()).get(id) {
            return Some(w.clone());
        }
        let record = store.subscription(id).ok().flatten()?;
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        if m.len() >= KNOWN_SUBSCRIPTIONS_MAX {
            m.clear();
        }
        m.insert(id.to_string(), record.watch.clone());
        Some(record.watch)
    }
}

fn validation_token(req: &HttpRequest) -> Option<String> {
    url::form_urlencoded::parse(req.query_string().as_bytes())
        .find(|(k, _)| k == "validationToken")
        .map(|(_, v)| v.into_owned())
}

fn plain(status: actix_web::http::StatusCode, text: &str) -> HttpResponse {
    HttpResponse::build(status)
        .content_type("text/plain; charset=utf-8")
        .body(text.to_string())
}

fn client_state_ok(expected: &SecretString, got: Option<&str>) -> bool {
    let e = expected.expose_secret().as_bytes();
    match got {
        Some(g) => e.len() == g.len() && bool::from(e.ct_eq(g.as_bytes())),
        None => false,
    }
}

fn looks_like_guid(s: &str) -> bool {
    s.len() == 36 && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

/// Why a single notification was not queued.
enum Reject {
    ClientState,
    Subscription,
    Tenant,
    Shape(&'static str),
}

/// Turns one notification into a hint, or says why it is not ours.
fn hint_for(hook: &Hook, n: &Notification<'_>) -> Result<Hint, Reject> {
    if !client_state_ok(&hook.client_state, n.client_state.as_deref()) {
        return Err(Reject::ClientState);
    }
    let tenant = n.tenant_id.as_deref().or(n.organization_id.as_deref());
    if let Some(t) = tenant {
        if looks_like_guid(&hook.tenant_id) && !t.eq_ignore_ascii_case(&hook.tenant_id) {
            return Err(Reject::Tenant);
        }
    }
    let Some(sub_id) = n.subscription_id.as_deref() else {
        return Err(Reject::Shape("no subscriptionId"));
    };
    // Only subscriptions we track: an unknown id is ignored like any forged notification.
    let Some(watch) = hook.known.get(&hook.store, sub_id) else {
        return Err(Reject::Subscription);
    };
    if let Some(event) = n.lifecycle_event.as_deref() {
        return Ok(Hint::Lifecycle {
            event: event.to_string(),
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
                .filter(|id| !id.is_empty() && id.len() <= 64)
                .map(str::to_string);
            match id {
                Some(user_id) => Ok(Hint::User {
                    user_id,
                    follow_up: false,
                }),
                None => Err(Reject::Shape("no user id in resourceData or resource")),
            }
        }
    }
}

async fn handle(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    st: web::Data<WebhookState>,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    let name = path.into_inner();
    let stats = &st.stats;
    let Some(hook) = st.hooks.get(&name) else {
        stats.unknown_integration.fetch_add(1, Ordering::Relaxed);
        crate::metrics::notification_rejected("(unknown)", "unknown_integration");
        tracing::warn!(integration = %name.chars().take(64).collect::<String>(), "notification for an unknown integration; ignored");
        return plain(StatusCode::NOT_FOUND, "unknown integration");
    };
    // The handshake: echo the decoded token as plain text, at once.
    if let Some(token) = validation_token(&req) {
        stats.validations.fetch_add(1, Ordering::Relaxed);
        tracing::info!(integration = %name, path = %req.path(), "answered Graph's validation request");
        return plain(StatusCode::OK, &token);
    }
    let parsed: Collection = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            stats.malformed.fetch_add(1, Ordering::Relaxed);
            crate::metrics::notification_rejected(&hook.name, "malformed");
            tracing::warn!(integration = %name, error = %e, bytes = body.len(), "malformed notification body");
            return plain(
                StatusCode::BAD_REQUEST,
                "body is not a change notification collection",
            );
        }
    };
    if parsed.value.len() > 1000 {
        stats.malformed.fetch_add(1, Ordering::Relaxed);
        crate::metrics::notification_rejected(&hook.name, "malformed");
        return plain(
            StatusCode::BAD_REQUEST,
            "too many notifications in one body",
        );
    }
    let mut hints = Vec::new();
    let mut rejected = 0usize;
    for n in &parsed.value {
        let n: &Notification<'_> = n;
        match hint_for(hook, n) {
            Ok(h) => hints.push(h),
            Err(r) => {
                rejected += 1;
                let (why, reason) = match r {
                    Reject::ClientState => {
                        stats.rejected_client_state.fetch_add(1, Ordering::Relaxed);
                        ("clientState does not match", "client_state")
                    }
                    Reject::Subscription => {
                        stats.rejected_subscription.fetch_add(1, Ordering::Relaxed);
                        ("unknown subscription", "unknown_subscription")
                    }
                    Reject::Tenant => {
                        stats.rejected_subscription.fetch_add(1, Ordering::Relaxed);
                        ("another tenant", "tenant")
                    }
                    Reject::Shape(m) => {
                        stats.malformed.fetch_add(1, Ordering::Relaxed);
                        (m, "malformed")
                    }
                };
                crate::metrics::notification_rejected(&hook.name, reason);
                let sub = n.subscription_id.as_deref().unwrap_or("?");
                tracing::warn!(integration = %name, subscription = %sub.chars().take(64).collect::<String>(), reason = why, "notification rejected; nothing queued");
            }
        }
    }
    if let (Some(tokens), false) = (&parsed.validation_tokens, hints.is_empty()) {
        if let Some(cache) = &hook.tokens {
            let expect = TokenExpectation {
                client_ids: vec![hook.client_id.clone()],
                tenant_id: hook.tenant_id.clone(),
            };
            // Bounded: a slow key endpoint must not hold Graph past its 3 s budget.
            match tokio::time::timeout(Duration::from_millis(1500), cache.verify(tokens, &expect))
                .await
            {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    stats.rejected_token.fetch_add(1, Ordering::Relaxed);
                    crate::metrics::notification_rejected(&hook.name, "validation_token");
                    tracing::warn!(integration = %name, error = %e, "validationTokens failed verification; batch ignored");
                    return plain(StatusCode::FORBIDDEN, "validation tokens rejected");
                }
                Err(_) => {
                    tracing::warn!(integration = %name, "validationTokens could not be verified in time (signing keys unavailable); accepted on clientState");
                }
            }
        }
    }
    if hints.is_empty() {
        return if rejected > 0 {
            plain(StatusCode::FORBIDDEN, "no notification was accepted")
        } else {
            HttpResponse::Accepted().finish()
        };
    }
    let items: Vec<QueueItem> = hints.into_iter().map(QueueItem::new).collect();
    let n = items.len() as u64;
    let stored = hook.store.enqueue_durable(&items).await;
    if let Err(e) = stored {
        stats.store_failures.fetch_add(1, Ordering::Relaxed);
        crate::metrics::notification_rejected(&hook.name, "store_failure");
        tracing::error!(integration = %name, error = %e, "cannot store notifications; answering 503 so Graph retries");
        return plain(StatusCode::SERVICE_UNAVAILABLE, "store unavailable");
    }
    stats.accepted.fetch_add(n, Ordering::Relaxed);
    crate::metrics::notifications_received(&hook.name, n);
    hook.wake.notify_one();
    tracing::debug!(integration = %name, queued = n, rejected, "notifications queued");
    HttpResponse::Accepted().finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_state_must_match_exactly() {
        let s = SecretString::from("abc123");
        assert!(client_state_ok(&s, Some("abc123")));
        assert!(!client_state_ok(&s, Some("abc124")));
        assert!(!client_state_ok(&s, Some("abc12")));
        assert!(!client_state_ok(&s, None));
    }
}
