//! Subscriptions, change notifications and lifecycle notifications (Microsoft's
//! "subscription", "change notifications" and "lifecycle notifications" pages).
//!
//! * `POST/GET /v1.0/subscriptions`, `GET/PATCH/DELETE /v1.0/subscriptions/{id}`,
//!   `POST /v1.0/subscriptions/{id}/reauthorize`, with the validation handshake on
//!   create, PATCH and reauthorize, for the notification URL and, separately, the lifecycle URL.
//! * Mutations through [`GraphSim`] queue change notifications for every matching live
//!   subscription; a background loop batches them (up to [`MAX_BATCH_ITEMS`] per POST, grouped by
//!   URL) and delivers them with retries and optional fault injection.
//! * Lifecycle notifications are sent on demand ([`GraphSim::send_lifecycle`]) or automatically
//!   before expiry ([`GraphSim::set_auto_reauthorization`]), in the observed format, with
//!   `validationTokens` (see `tokens.rs`).
//!
//! Expired subscriptions are removed lazily (on every API call and every delivery tick).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest};
use chrono::{DateTime, SecondsFormat, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use super::{check_auth, graph_error, throttled, ApiResponse, Body, Ctx, GraphSim, Shared, State};

/// Max notifications per delivery POST.
pub(super) const MAX_BATCH_ITEMS: usize = 10;
/// Subscriptions per app+tenant for directory resources (change-notification quotas).
const MAX_SUBSCRIPTIONS: usize = 100;
/// Default maximum lifetime of user/group subscriptions: 41,760 minutes (subscription resource).
const DEFAULT_MAX_LIFETIME_MINUTES: f64 = 41_760.0;
/// Minimum lifetime: shorter expirations are raised to now + 45 minutes (subscription resource).
const MIN_LIFETIME_MINUTES: i64 = 45;
const TICK: Duration = Duration::from_millis(20);
const CLIENT_STATE_MAX: usize = 128;

// ---------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------

/// A live subscription as the simulator sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct SimSubscription {
    pub id: String,
    /// As sent by the client.
    pub resource: String,
    /// Comma list as sent by the client (trimmed).
    pub change_type: String,
    pub notification_url: String,
    pub lifecycle_url: Option<String>,
    pub client_state: Option<String>,
    pub expires_at: DateTime<Utc>,
}

/// Fault injection for change-notification delivery (lifecycle notifications are exempt).
#[derive(Clone, Debug, Default)]
pub struct NotifyFaults {
    /// Fraction 0.0..=1.0 of notifications delivered a second time.
    pub duplicate_rate: f64,
    /// Fraction 0.0..=1.0 of notifications never delivered.
    pub drop_rate: f64,
    /// Shuffle the notifications that are ready before batching them.
    pub reorder: bool,
    /// Extra delay before a queued notification becomes deliverable.
    pub delay_ms: u64,
    pub seed: u64,
}

/// Lifecycle events ("lifecycle notifications").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LifecycleEvent {
    ReauthorizationRequired,
    SubscriptionRemoved,
    Missed,
}

impl LifecycleEvent {
    fn wire(self) -> &'static str {
        match self {
            LifecycleEvent::ReauthorizationRequired => "reauthorizationRequired",
            LifecycleEvent::SubscriptionRemoved => "subscriptionRemoved",
            LifecycleEvent::Missed => "missed",
        }
    }
}

/// How the `validationTokens` the simulator issues are (mis)built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TokenForgery {
    /// Genuine: signed with `keys::SIGNING_KEY_PEM`, correct claims.
    #[default]
    None,
    /// Signed with `keys::FORGER_KEY_PEM` under the genuine `kid`.
    WrongKey,
    /// `appid` is not Microsoft Graph Change Tracking's.
    WrongAppId,
    /// `exp` (and `nbf`/`iat`) in the past.
    Expired,
}

/// One delivery attempt (a POST of one batch to a notification or lifecycle URL).
#[derive(Clone, Debug)]
pub struct DeliveryAttempt {
    pub url: String,
    /// HTTP status, or None when the request failed or timed out (see `error`).
    pub status: Option<u16>,
    pub error: Option<String>,
    /// Number of items in the batch's `value`.
    pub notifications: usize,
    /// 1 for the first attempt of a batch.
    pub attempt: u32,
    pub lifecycle: bool,
    /// When the attempt started.
    pub at: DateTime<Utc>,
    /// Subscription ids of the items, in batch order.
    pub subscription_ids: Vec<String>,
}

impl DeliveryAttempt {
    pub fn delivered(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// Counters of the notification pipeline.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NotifyStats {
    /// Change notifications queued (one per matching subscription and change).
    pub queued: u64,
    /// Dropped by [`NotifyFaults::drop_rate`].
    pub dropped: u64,
    /// Extra copies made by [`NotifyFaults::duplicate_rate`].
    pub duplicated: u64,
    /// Batches that got a 2xx in time.
    pub delivered_batches: u64,
    /// Batches discarded after the retry period.
    pub abandoned_batches: u64,
}

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Change {
    Updated,
    Deleted,
}

impl Change {
    fn wire(self) -> &'static str {
        match self {
            Change::Updated => "updated",
            Change::Deleted => "deleted",
        }
    }
}

/// Normalised resource path (ids lower-cased).
#[derive(Clone, Debug, PartialEq, Eq)]
enum ResourceKey {
    AllUsers,
    User(String),
    AllGroups,
    Group(String),
    GroupMembers(String),
}

fn parse_resource(raw: &str) -> Option<ResourceKey> {
    let r = raw.trim();
    let r = r.strip_prefix('/').unwrap_or(r);
    let r = r.strip_suffix('/').unwrap_or(r);
    let segs: Vec<String> = r.split('/').map(str::to_lowercase).collect();
    let id_ok = |s: &str| !s.is_empty() && !s.contains(['?', '$', ' ']);
    match segs.as_slice() {
        [a] if a == "users" => Some(ResourceKey::AllUsers),
        [a, id] if a == "users" && id_ok(id) => Some(ResourceKey::User(id.clone())),
        [a] if a == "groups" => Some(ResourceKey::AllGroups),
        [a, id] if a == "groups" && id_ok(id) => Some(ResourceKey::Group(id.clone())),
        [a, id, m] if a == "groups" && id_ok(id) && m == "members" => {
            Some(ResourceKey::GroupMembers(id.clone()))
        }
        _ => None,
    }
}

#[derive(Clone, Debug)]
struct Sub {
    id: String,
    resource: String,
    key: ResourceKey,
    change_type: String,
    change_set: Vec<String>,
    notification_url: String,
    lifecycle_url: Option<String>,
    client_state: Option<String>,
    tls: String,
    expires_at: DateTime<Utc>,
    /// An automatic reauthorizationRequired was sent since the last renewal.
    auto_reauth_sent: bool,
}

impl Sub {
    fn public(&self) -> SimSubscription {
        SimSubscription {
            id: self.id.clone(),
            resource: self.resource.clone(),
            change_type: self.change_type.clone(),
            notification_url: self.notification_url.clone(),
            lifecycle_url: self.lifecycle_url.clone(),
            client_state: self.client_state.clone(),
            expires_at: self.expires_at,
        }
    }

    fn wants(&self, c: Change) -> bool {
        self.change_set.iter().any(|t| t == c.wire())
    }
}

/// A queued change notification.
struct Pending {
    url: String,
    sub_id: String,
    item: Value,
    ready_at: Instant,
}

/// A POST to make.
pub(super) struct Batch {
    url: String,
    body: Value,
    count: usize,
    sub_ids: Vec<String>,
    lifecycle: bool,
}

pub(super) struct NotifyState {
    subs: Vec<Sub>,
    pending: Vec<Pending>,
    /// Lifecycle batches waiting for the delivery loop (exempt from faults).
    lifecycle_out: Vec<Batch>,
    faults: NotifyFaults,
    rng: StdRng,
    log: Vec<DeliveryAttempt>,
    stats: NotifyStats,
    max_lifetime: chrono::Duration,
    validation_timeout: Duration,
    first_timeout: Duration,
    retry_timeout: Duration,
    retry_base: Duration,
    give_up_after: Duration,
    paused: bool,
    pub(super) forgery: TokenForgery,
    tokens_on_changes: bool,
    auto_reauth: Option<chrono::Duration>,
    /// Service principal id of the app (`creatorId`).
    creator_id: String,
    sequence: u64,
    /// Refuse a second subscription of the same resource and change type (409), as Graph
    /// documents; off, duplicates are made, as some emulators do.
    duplicates_conflict: bool,
    /// Change-notification batches being delivered (posted or waiting for a retry).
    in_flight: usize,
}

impl Default for NotifyState {
    fn default() -> Self {
        NotifyState {
            subs: Vec::new(),
            pending: Vec::new(),
            lifecycle_out: Vec::new(),
            faults: NotifyFaults::default(),
            rng: StdRng::seed_from_u64(0),
            log: Vec::new(),
            stats: NotifyStats::default(),
            max_lifetime: minutes(DEFAULT_MAX_LIFETIME_MINUTES),
            validation_timeout: Duration::from_secs(10),
            first_timeout: Duration::from_secs(3),
            retry_timeout: Duration::from_secs(10),
            retry_base: Duration::from_millis(200),
            give_up_after: Duration::from_secs(30),
            paused: false,
            forgery: TokenForgery::None,
            tokens_on_changes: false,
            auto_reauth: None,
            creator_id: uuid::Uuid::new_v4().to_string(),
            sequence: 0,
            duplicates_conflict: true,
            in_flight: 0,
        }
    }
}

fn minutes(m: f64) -> chrono::Duration {
    let ms = (m * 60_000.0).clamp(0.0, i64::MAX as f64 / 4.0);
    chrono::Duration::milliseconds(ms as i64)
}

/// `2026-01-28T11:00:00.1234567Z` (Graph's 7 fractional digits).
fn graph_time(t: DateTime<Utc>) -> String {
    format!(
        "{}.{:07}Z",
        t.format("%Y-%m-%dT%H:%M:%S"),
        t.timestamp_subsec_nanos() / 100
    )
}

fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|n| n.and_utc())
}

impl State {
    fn prune_subscriptions(&mut self) {
        let now = Utc::now();
        self.notify.subs.retain(|s| s.expires_at > now);
    }

    /// Queues a change notification for every live subscription matching the user.
    pub(super) fn on_user_change(&mut self, id: &str, change: Change) {
        if self.notify.subs.is_empty() {
            return;
        }
        self.prune_subscriptions();
        let lid = id.to_lowercase();
        let targets: Vec<Sub> = self
            .notify
            .subs
            .iter()
            .filter(|s| s.wants(change))
            .filter(|s| match &s.key {
                ResourceKey::AllUsers => true,
                ResourceKey::User(u) => *u == lid,
                _ => false,
            })
            .cloned()
            .collect();
        for sub in targets {
            let item = self.change_item(&sub, change, "Users", "#Microsoft.Graph.User", id, None);
            self.queue(&sub, item);
        }
    }

    /// Queues `change` for the group itself (created/replaced → updated, deleted → deleted).
    pub(super) fn on_group_change(&mut self, gid: &str, change: Change) {
        self.group_notify(gid, change, None);
    }

    /// Queues `updated` for a direct-membership change of the group.
    pub(super) fn on_membership_change(&mut self, gid: &str, member: &str, removed: bool) {
        let hint = if removed {
            json!({ "id": member, "@removed": "deleted" })
        } else {
            json!({ "id": member })
        };
        self.group_notify(gid, Change::Updated, Some(hint));
    }

    fn group_notify(&mut self, gid: &str, change: Change, members_hint: Option<Value>) {
        if self.notify.subs.is_empty() {
            return;
        }
        self.prune_subscriptions();
        let lid = gid.to_lowercase();
        let targets: Vec<Sub> = self
            .notify
            .subs
            .iter()
            .filter(|s| s.wants(change))
            .filter(|s| match &s.key {
                ResourceKey::AllGroups => true,
                ResourceKey::Group(g) | ResourceKey::GroupMembers(g) => *g == lid,
                _ => false,
            })
            .cloned()
            .collect();
        for sub in targets {
            // `members@delta` is reported on `/groups` subscriptions only (as observed on Graph).
            let hint = match sub.key {
                ResourceKey::AllGroups => members_hint.clone(),
                _ => None,
            };
            let item =
                self.change_item(&sub, change, "Groups", "#Microsoft.Graph.Group", gid, hint);
            self.queue(&sub, item);
        }
    }

    fn change_item(
        &mut self,
        sub: &Sub,
        change: Change,
        set: &str,
        odata_type: &str,
        id: &str,
        members_hint: Option<Value>,
    ) -> Value {
        let mut data = Map::new();
        data.insert("@odata.type".into(), json!(odata_type));
        data.insert("@odata.id".into(), json!(format!("{set}/{id}")));
        data.insert("id".into(), json!(id));
        data.insert("organizationId".into(), json!(self.tenant_id));
        if set == "Groups" {
            // Observed on group notifications, undocumented, unordered.
            self.notify.sequence += 1;
            let now = Utc::now();
            data.insert("eventTime".into(), json!(graph_time(now)));
            data.insert(
                "sequenceNumber".into(),
                json!(
                    now.timestamp_micros().saturating_mul(10) + (self.notify.sequence % 10) as i64
                ),
            );
        }
        if let Some(h) = members_hint {
            data.insert("members@delta".into(), json!([h]));
        }
        json!({
            "changeType": change.wire(),
            "clientState": sub.client_state,
            "resource": format!("{set}/{id}"),
            "resourceData": Value::Object(data),
            "subscriptionExpirationDateTime": sub.expires_at.to_rfc3339_opts(SecondsFormat::Millis, false),
            "subscriptionId": sub.id,
            "tenantId": self.tenant_id,
        })
    }

    fn queue(&mut self, sub: &Sub, item: Value) {
        self.notify.stats.queued += 1;
        let ready_at = Instant::now() + Duration::from_millis(self.notify.faults.delay_ms);
        self.notify.pending.push(Pending {
            url: sub.notification_url.clone(),
            sub_id: sub.id.clone(),
            item,
            ready_at,
        });
    }

    fn lifecycle_batch(&mut self, sub: &Sub, event: LifecycleEvent) -> Option<Batch> {
        let url = sub.lifecycle_url.clone()?;
        let item = json!({
            "lifecycleEvent": event.wire(),
            "subscriptionId": sub.id,
            "resource": "",
            "clientState": sub.client_state,
            "sequence": null,
            "resourceData": {
                "@odata.type": "#microsoft.graph.subscription",
                "@odata.id": format!("subscriptions/{}", sub.id),
                "id": sub.id,
            },
            "encryptedContent": null,
            "organizationId": self.tenant_id,
            "subscriptionExpirationDateTime": sub.expires_at.to_rfc3339_opts(SecondsFormat::Micros, false),
        });
        let token = self.validation_token();
        Some(Batch {
            url,
            body: json!({ "value": [item], "validationTokens": [token] }),
            count: 1,
            sub_ids: vec![sub.id.clone()],
            lifecycle: true,
        })
    }

    fn validation_token(&self) -> String {
        super::tokens::validation_token(&self.tenant_id, &self.client_id, self.notify.forgery)
    }

    /// Everything the delivery loop should POST now.
    fn take_batches(&mut self) -> Vec<Batch> {
        self.prune_subscriptions();
        if let Some(lead) = self.notify.auto_reauth {
            let now = Utc::now();
            let due: Vec<usize> = (0..self.notify.subs.len())
                .filter(|&i| {
                    let s = &self.notify.subs[i];
                    !s.auto_reauth_sent && s.expires_at - now <= lead
                })
                .collect();
            for i in due {
                self.notify.subs[i].auto_reauth_sent = true;
                let sub = self.notify.subs[i].clone();
                if let Some(b) = self.lifecycle_batch(&sub, LifecycleEvent::ReauthorizationRequired)
                {
                    self.notify.lifecycle_out.push(b);
                }
            }
        }
        if self.notify.paused {
            return Vec::new();
        }
        let mut out: Vec<Batch> = std::mem::take(&mut self.notify.lifecycle_out);
        if self.notify.pending.is_empty() {
            return out;
        }
        let now = Instant::now();
        let (ready, later): (Vec<Pending>, Vec<Pending>) = std::mem::take(&mut self.notify.pending)
            .into_iter()
            .partition(|p| p.ready_at <= now);
        self.notify.pending = later;
        let live: HashSet<String> = self.notify.subs.iter().map(|s| s.id.clone()).collect();
        let mut items: Vec<Pending> = Vec::with_capacity(ready.len());
        let faults = self.notify.faults.clone();
        for p in ready.into_iter().filter(|p| live.contains(&p.sub_id)) {
            if faults.drop_rate > 0.0 && self.notify.rng.random::<f64>() < faults.drop_rate {
                self.notify.stats.dropped += 1;
                continue;
            }
            if faults.duplicate_rate > 0.0
                && self.notify.rng.random::<f64>() < faults.duplicate_rate
            {
                self.notify.stats.duplicated += 1;
                items.push(Pending {
                    url: p.url.clone(),
                    sub_id: p.sub_id.clone(),
                    item: p.item.clone(),
                    ready_at: p.ready_at,
                });
            }
            items.push(p);
        }
        if faults.reorder {
            items.shuffle(&mut self.notify.rng);
        }
        // Group by URL (first-seen order), then chunk.
        let mut by_url: Vec<(String, Vec<Pending>)> = Vec::new();
        for p in items {
            match by_url.iter_mut().find(|(u, _)| *u == p.url) {
                Some((_, v)) => v.push(p),
                None => by_url.push((p.url.clone(), vec![p])),
            }
        }
        let with_tokens = self.notify.tokens_on_changes;
        for (url, list) in by_url {
            for chunk in list.chunks(MAX_BATCH_ITEMS) {
                let value: Vec<Value> = chunk.iter().map(|p| p.item.clone()).collect();
                let mut body = Map::new();
                body.insert("value".into(), Value::Array(value));
                if with_tokens {
                    body.insert("validationTokens".into(), json!([self.validation_token()]));
                }
                out.push(Batch {
                    url: url.clone(),
                    body: Value::Object(body),
                    count: chunk.len(),
                    sub_ids: chunk.iter().map(|p| p.sub_id.clone()).collect(),
                    lifecycle: false,
                });
            }
        }
        out
    }

    fn find_sub(&mut self, id: &str) -> Option<usize> {
        self.prune_subscriptions();
        self.notify
            .subs
            .iter()
            .position(|s| s.id.eq_ignore_ascii_case(id))
    }
}

// ---------------------------------------------------------------------------------------------
// Delivery
// ---------------------------------------------------------------------------------------------

/// Spawns the loop that turns queued notifications into POSTs.
pub(super) fn spawn_delivery_loop(shared: web::Data<Shared>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(TICK).await;
            let batches = {
                let mut s = shared.lock();
                let batches = s.take_batches();
                s.notify.in_flight += batches.iter().filter(|b| !b.lifecycle).count();
                batches
            };
            for b in batches {
                tokio::spawn(deliver(shared.clone(), b));
            }
        }
    })
}

/// POSTs one batch until a timely 2xx, retrying with exponential backoff until the give-up time.
async fn deliver(shared: web::Data<Shared>, batch: Batch) {
    let (first_timeout, retry_timeout, mut delay, give_up) = {
        let s = shared.lock();
        (
            s.notify.first_timeout,
            s.notify.retry_timeout,
            s.notify.retry_base,
            s.notify.give_up_after,
        )
    };
    let body = serde_json::to_vec(&batch.body).unwrap_or_default();
    let start = Instant::now();
    let mut attempt: u32 = 1;
    loop {
        let timeout = if attempt == 1 {
            first_timeout
        } else {
            retry_timeout
        };
        let at = Utc::now();
        let result = shared
            .http
            .post(&batch.url)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .timeout(timeout)
            .send()
            .await;
        let (status, error) = match result {
            Ok(r) => (Some(r.status().as_u16()), None),
            Err(e) if e.is_timeout() => (None, Some(format!("timed out after {timeout:?}"))),
            Err(e) => (None, Some(e.to_string())),
        };
        let ok = status.is_some_and(|s| (200..300).contains(&s));
        {
            let mut s = shared.lock();
            s.notify.log.push(DeliveryAttempt {
                url: batch.url.clone(),
                status,
                error,
                notifications: batch.count,
                attempt,
                lifecycle: batch.lifecycle,
                at,
                subscription_ids: batch.sub_ids.clone(),
            });
            if ok {
                s.notify.stats.delivered_batches += 1;
            } else if start.elapsed() + delay > give_up {
                s.notify.stats.abandoned_batches += 1;
            }
            if !batch.lifecycle && (ok || start.elapsed() + delay > give_up) {
                s.notify.in_flight = s.notify.in_flight.saturating_sub(1);
            }
        }
        if ok || start.elapsed() + delay > give_up {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = delay.saturating_mul(2);
        attempt += 1;
    }
}

/// The validation handshake ("notification endpoint validation"). Err = the 400 message.
async fn validate_endpoint(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> Result<(), String> {
    let mut nonce = [0u8; 6];
    rand::rng().fill(&mut nonce);
    let token = format!(
        "Validation: Testing client application reachability for subscription Request-Id: {} +{}",
        uuid::Uuid::new_v4(),
        nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let encoded = percent_encoding::utf8_percent_encode(&token, percent_encoding::NON_ALPHANUMERIC)
        .to_string();
    let sep = if url.contains('?') { '&' } else { '?' };
    let target = format!("{url}{sep}validationToken={encoded}");
    let call = async {
        let resp = client
            .post(&target)
            .header("Content-Type", "text/plain; charset=utf-8")
            .send()
            .await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        Ok::<(u16, String), reqwest::Error>((status, text))
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Err("Subscription validation request timed out.".into()),
        Ok(Err(e)) if e.is_timeout() => Err("Subscription validation request timed out.".into()),
        Ok(Err(_)) => Err(
            "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request.".into(),
        ),
        Ok(Ok((200, text))) if text == token => Ok(()),
        Ok(Ok((200, _))) => Err(
            "Subscription validation request failed. Response must exactly match validationToken query parameter.".into(),
        ),
        Ok(Ok(_)) => Err(
            "Subscription validation request failed. Notification endpoint must respond with 200 OK to validation request.".into(),
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP API
// ---------------------------------------------------------------------------------------------

fn invalid(ctx: &Ctx, msg: &str) -> ApiResponse {
    graph_error(ctx, 400, "InvalidRequest", msg)
}

fn sub_not_found(ctx: &Ctx, id: &str) -> ApiResponse {
    graph_error(
        ctx,
        404,
        "ResourceNotFound",
        &format!("The object was not found. Subscription '{id}' does not exist or has expired."),
    )
}

fn render(s: &State, base: &str, sub: &Sub, entity: bool) -> Value {
    let mut m = Map::new();
    if entity {
        m.insert(
            "@odata.context".into(),
            json!(format!("{base}/v1.0/$metadata#subscriptions/$entity")),
        );
    }
    m.insert("id".into(), json!(sub.id));
    m.insert("resource".into(), json!(sub.resource));
    m.insert("applicationId".into(), json!(s.client_id));
    m.insert("changeType".into(), json!(sub.change_type));
    m.insert("clientState".into(), json!(sub.client_state));
    m.insert("notificationUrl".into(), json!(sub.notification_url));
    m.insert("notificationQueryOptions".into(), Value::Null);
    m.insert("lifecycleNotificationUrl".into(), json!(sub.lifecycle_url));
    m.insert(
        "expirationDateTime".into(),
        json!(graph_time(sub.expires_at)),
    );
    m.insert("creatorId".into(), json!(s.notify.creator_id));
    m.insert("includeResourceData".into(), json!(false));
    m.insert("latestSupportedTlsVersion".into(), json!(sub.tls));
    m.insert("encryptionCertificate".into(), Value::Null);
    m.insert("encryptionCertificateId".into(), Value::Null);
    m.insert("notificationUrlAppId".into(), Value::Null);
    m.insert("notificationContentType".into(), json!("application/json"));
    Value::Object(m)
}

/// Entry point for `/v1.0/subscriptions[/...]` (`rest` is the path after `/v1.0/`).
pub(super) async fn api(
    sim: &web::Data<Shared>,
    req: &HttpRequest,
    ctx: &Ctx,
    rest: &str,
    body: &[u8],
) -> ApiResponse {
    let segs = super::decode_segments(rest);
    let method = req.method().as_str().to_ascii_uppercase();
    let charge = {
        let mut s = sim.lock();
        s.count("subscriptions");
        if let Err(e) = check_auth(&s, ctx, req) {
            return e;
        }
        if s.should_throttle() {
            s.count("throttled");
            return throttled(ctx, &s);
        }
        let price = super::cost::request_cost(&method, &segs, req.query_string());
        let priority =
            super::Priority::parse(super::header_value(req, "x-ms-throttle-priority").as_deref());
        match s.admit("subscriptions", price, priority) {
            Ok(c) => c,
            Err(refusal) => {
                s.count("throttled");
                return super::throttled_by_model(ctx, &s, &refusal);
            }
        }
    };
    let resp = route(sim, ctx, &method, &segs, body).await;
    match charge {
        Some(c) => c.decorate(resp),
        None => resp,
    }
}

async fn route(
    sim: &web::Data<Shared>,
    ctx: &Ctx,
    method: &str,
    segs: &[String],
    body: &[u8],
) -> ApiResponse {
    match (method, segs.len()) {
        ("POST", 1) => create(sim, ctx, body).await,
        ("GET", 1) => {
            let mut s = sim.lock();
            s.prune_subscriptions();
            let value: Vec<Value> = s
                .notify
                .subs
                .iter()
                .map(|sub| render(&s, &sim.base_url, sub, false))
                .collect();
            ApiResponse::json(
                200,
                json!({
                    "@odata.context": format!("{}/v1.0/$metadata#subscriptions", sim.base_url),
                    "value": value,
                }),
            )
        }
        ("GET", 2) => {
            let mut s = sim.lock();
            match s.find_sub(&segs[1]) {
                Some(i) => {
                    let sub = s.notify.subs[i].clone();
                    ApiResponse::json(200, render(&s, &sim.base_url, &sub, true))
                }
                None => sub_not_found(ctx, &segs[1]),
            }
        }
        ("PATCH", 2) => update(sim, ctx, &segs[1], body).await,
        ("DELETE", 2) => {
            let mut s = sim.lock();
            match s.find_sub(&segs[1]) {
                Some(i) => {
                    s.notify.subs.remove(i);
                    ApiResponse {
                        status: 204,
                        headers: Vec::new(),
                        body: Body::Value(Value::Null),
                    }
                }
                None => sub_not_found(ctx, &segs[1]),
            }
        }
        ("POST", 3) if segs[2].eq_ignore_ascii_case("reauthorize") => {
            reauthorize(sim, ctx, &segs[1]).await
        }
        (_, 1..=3) if segs.len() < 3 || segs[2].eq_ignore_ascii_case("reauthorize") => {
            super::method_not_allowed(ctx)
        }
        _ => super::unknown_segment(ctx, segs, segs.len() - 1),
    }
}

fn parse_body(ctx: &Ctx, body: &[u8]) -> Result<Map<String, Value>, ApiResponse> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(graph_error(
            ctx,
            400,
            "BadRequest",
            "Empty Payload. JSON content expected.",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(graph_error(
            ctx,
            400,
            "BadRequest",
            "Unable to read JSON request payload. Please ensure Content-Type header is set and payload is of valid JSON format.",
        )),
    }
}

/// `Ok(None)` when absent or null; 400 when not a string.
fn opt_str(ctx: &Ctx, m: &Map<String, Value>, k: &str) -> Result<Option<String>, ApiResponse> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(graph_error(
            ctx,
            400,
            "BadRequest",
            &format!("Invalid value for property '{k}': a string is expected."),
        )),
    }
}

fn check_url(ctx: &Ctx, field: &str, raw: &str) -> Result<String, ApiResponse> {
    let bad = |msg: String| Err(invalid(ctx, &msg));
    let Ok(u) = url::Url::parse(raw.trim()) else {
        return bad(format!(
            "Invalid '{field}' attribute: '{raw}' is not a valid URL."
        ));
    };
    let local = matches!(u.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    match u.scheme() {
        "https" => {}
        "http" if local => {}
        _ => {
            return bad(format!(
                "Invalid '{field}' attribute: '{raw}'. The URL must use the HTTPS scheme."
            ))
        }
    }
    Ok(raw.trim().to_string())
}

/// Validates an expirationDateTime against the lifetime rules; returns the effective value.
fn check_expiration(
    ctx: &Ctx,
    raw: &str,
    max: chrono::Duration,
) -> Result<DateTime<Utc>, ApiResponse> {
    let Some(exp) = parse_time(raw) else {
        return Err(graph_error(
            ctx,
            400,
            "BadRequest",
            &format!(
                "Invalid 'expirationDateTime' attribute: '{raw}' is not a valid DateTimeOffset."
            ),
        ));
    };
    let now = Utc::now();
    if exp <= now {
        return Err(invalid(
            ctx,
            "Subscription expiration date time must be in the future.",
        ));
    }
    if exp > now + max {
        let mins = max.num_milliseconds() as f64 / 60_000.0;
        let mins = if mins.fract() == 0.0 {
            format!("{}", mins as i64)
        } else {
            format!("{mins:.2}")
        };
        return Err(invalid(
            ctx,
            &format!("Subscription expiration can only be {mins} minutes in the future."),
        ));
    }
    let min = chrono::Duration::minutes(MIN_LIFETIME_MINUTES);
    if max >= min && exp < now + min {
        return Ok(now + min);
    }
    Ok(exp)
}

const CREATE_PROPS: &[&str] = &[
    "changeType",
    "notificationUrl",
    "lifecycleNotificationUrl",
    "resource",
    "expirationDateTime",
    "clientState",
    "latestSupportedTlsVersion",
    "includeResourceData",
    "encryptionCertificate",
    "encryptionCertificateId",
    "notificationUrlAppId",
    "notificationQueryOptions",
    "notificationContentType",
    "@odata.type",
];

async fn create(sim: &web::Data<Shared>, ctx: &Ctx, body: &[u8]) -> ApiResponse {
    let m = match parse_body(ctx, body) {
        Ok(m) => m,
        Err(e) => return e,
    };
    if let Some(k) = m.keys().find(|k| !CREATE_PROPS.contains(&k.as_str())) {
        return graph_error(
            ctx,
            400,
            "BadRequest",
            &format!("The property '{k}' does not exist on type 'microsoft.graph.subscription'. Make sure to only use property names that are defined by the type."),
        );
    }
    let get = |k: &str| opt_str(ctx, &m, k);
    let (change_type, notification_url, lifecycle, resource, expiration, client_state, tls) = match (
        get("changeType"),
        get("notificationUrl"),
        get("lifecycleNotificationUrl"),
        get("resource"),
        get("expirationDateTime"),
        get("clientState"),
        get("latestSupportedTlsVersion"),
    ) {
        (Ok(a), Ok(b), Ok(c), Ok(d), Ok(e), Ok(f), Ok(g)) => (a, b, c, d, e, f, g),
        (Err(e), ..)
        | (_, Err(e), ..)
        | (_, _, Err(e), ..)
        | (_, _, _, Err(e), ..)
        | (_, _, _, _, Err(e), ..)
        | (_, _, _, _, _, Err(e), _)
        | (.., Err(e)) => return e,
    };
    let missing = |f: &str| {
        graph_error(
            ctx,
            400,
            "BadRequest",
            &format!("Missing required property '{f}'."),
        )
    };
    let Some(resource) = resource.filter(|r| !r.trim().is_empty()) else {
        return missing("resource");
    };
    let Some(key) = parse_resource(&resource) else {
        return invalid(
            ctx,
            &format!("Resource '{resource}' is not supported. Supported resources: /users, /users/{{id}}, /groups, /groups/{{id}}, /groups/{{id}}/members."),
        );
    };
    let Some(change_type) = change_type.filter(|c| !c.trim().is_empty()) else {
        return missing("changeType");
    };
    let mut change_set: Vec<String> = Vec::new();
    for t in change_type.split(',').map(str::trim) {
        // users and groups support only updated and deleted (subscription resource).
        if t != "updated" && t != "deleted" {
            return invalid(ctx, &format!("Invalid 'changeType' attribute: '{t}'."));
        }
        if !change_set.iter().any(|c| c == t) {
            change_set.push(t.to_string());
        }
    }
    let change_type_norm = change_type
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(",");
    change_set.sort();
    let Some(notification_url) = notification_url else {
        return missing("notificationUrl");
    };
    let notification_url = match check_url(ctx, "notificationUrl", &notification_url) {
        Ok(u) => u,
        Err(e) => return e,
    };
    let lifecycle = match lifecycle {
        None => None,
        Some(l) => match check_url(ctx, "lifecycleNotificationUrl", &l) {
            Ok(u) => Some(u),
            Err(e) => return e,
        },
    };
    let Some(expiration) = expiration else {
        return missing("expirationDateTime");
    };
    if let Some(cs) = &client_state {
        if cs.chars().count() > CLIENT_STATE_MAX {
            return invalid(
                ctx,
                &format!("Invalid 'clientState' attribute: the value exceeds the maximum length of {CLIENT_STATE_MAX} characters."),
            );
        }
    }
    let tls = tls.unwrap_or_else(|| "v1_2".to_string());
    if !["v1_0", "v1_1", "v1_2", "v1_3"].contains(&tls.as_str()) {
        return invalid(
            ctx,
            &format!("Invalid 'latestSupportedTlsVersion' attribute: '{tls}'."),
        );
    }
    match m.get("includeResourceData") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return invalid(
                ctx,
                "Rich notifications (includeResourceData) are not supported for this resource.",
            )
        }
        Some(_) => {
            return graph_error(
                ctx,
                400,
                "BadRequest",
                "Invalid value for property 'includeResourceData': a boolean is expected.",
            )
        }
    }
    let (timeout, max) = {
        let mut s = sim.lock();
        s.prune_subscriptions();
        if let Some(resp) = conflict_or_quota(&s, ctx, &key, &change_set) {
            return resp;
        }
        (s.notify.validation_timeout, s.notify.max_lifetime)
    };
    if let Err(e) = check_expiration(ctx, &expiration, max) {
        return e;
    }
    // Handshakes, without the lock: notification URL, then (separately) the lifecycle URL.
    if let Err(msg) = validate_endpoint(&sim.http, &notification_url, timeout).await {
        return invalid(ctx, &msg);
    }
    if let Some(l) = &lifecycle {
        if let Err(msg) = validate_endpoint(&sim.http, l, timeout).await {
            return invalid(ctx, &msg);
        }
    }
    let mut s = sim.lock();
    s.prune_subscriptions();
    if let Some(resp) = conflict_or_quota(&s, ctx, &key, &change_set) {
        return resp;
    }
    // Lifetime counted from the moment of creation.
    let expires_at = match check_expiration(ctx, &expiration, max) {
        Ok(t) => t,
        Err(e) => return e,
    };
    let sub = Sub {
        id: uuid::Uuid::new_v4().to_string(),
        resource,
        key,
        change_type: change_type_norm,
        change_set,
        notification_url,
        lifecycle_url: lifecycle,
        client_state,
        tls,
        expires_at,
        auto_reauth_sent: false,
    };
    let body = render(&s, &sim.base_url, &sub, true);
    s.notify.subs.push(sub);
    ApiResponse::json(201, body)
}

fn conflict_or_quota(
    s: &State,
    ctx: &Ctx,
    key: &ResourceKey,
    change_set: &[String],
) -> Option<ApiResponse> {
    if let Some(dup) = s
        .notify
        .subs
        .iter()
        .filter(|_| s.notify.duplicates_conflict)
        .find(|x| x.key == *key && x.change_set == change_set)
    {
        return Some(graph_error(
            ctx,
            409,
            "Conflict",
            &format!(
                "Subscription Id {} already exists for the requested combination",
                dup.id
            ),
        ));
    }
    if s.notify.subs.len() >= MAX_SUBSCRIPTIONS {
        return Some(graph_error(
            ctx,
            403,
            "Forbidden",
            &format!("Subscription quota exceeded: the limit of {MAX_SUBSCRIPTIONS} subscriptions per application and tenant for directory resources has been reached."),
        ));
    }
    None
}

async fn update(sim: &web::Data<Shared>, ctx: &Ctx, id: &str, body: &[u8]) -> ApiResponse {
    let m = match parse_body(ctx, body) {
        Ok(m) => m,
        Err(e) => return e,
    };
    if m.contains_key("lifecycleNotificationUrl") {
        return invalid(
            ctx,
            "lifecycleNotificationUrl cannot be added or changed on an existing subscription; delete it and create a new one.",
        );
    }
    if let Some(k) = m
        .keys()
        .find(|k| !["expirationDateTime", "notificationUrl", "@odata.type"].contains(&k.as_str()))
    {
        return invalid(
            ctx,
            &format!("Property '{k}' cannot be updated; only expirationDateTime and notificationUrl can."),
        );
    }
    let (expiration, new_url) = match (
        opt_str(ctx, &m, "expirationDateTime"),
        opt_str(ctx, &m, "notificationUrl"),
    ) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    if expiration.is_none() && new_url.is_none() {
        return invalid(
            ctx,
            "The request must contain 'expirationDateTime' or 'notificationUrl'.",
        );
    }
    let new_url = match new_url {
        None => None,
        Some(u) => match check_url(ctx, "notificationUrl", &u) {
            Ok(u) => Some(u),
            Err(e) => return e,
        },
    };
    let (url, lifecycle, timeout, max) = {
        let mut s = sim.lock();
        let Some(i) = s.find_sub(id) else {
            return sub_not_found(ctx, id);
        };
        let sub = &s.notify.subs[i];
        (
            new_url
                .clone()
                .unwrap_or_else(|| sub.notification_url.clone()),
            sub.lifecycle_url.clone(),
            s.notify.validation_timeout,
            s.notify.max_lifetime,
        )
    };
    if let Some(e) = &expiration {
        if let Err(resp) = check_expiration(ctx, e, max) {
            return resp;
        }
    }
    if let Err(msg) = validate_endpoint(&sim.http, &url, timeout).await {
        return invalid(ctx, &msg);
    }
    if let Some(l) = &lifecycle {
        if let Err(msg) = validate_endpoint(&sim.http, l, timeout).await {
            return invalid(ctx, &msg);
        }
    }
    let mut s = sim.lock();
    let Some(i) = s.find_sub(id) else {
        return sub_not_found(ctx, id);
    };
    if let Some(e) = &expiration {
        match check_expiration(ctx, e, max) {
            Ok(t) => {
                s.notify.subs[i].expires_at = t;
                s.notify.subs[i].auto_reauth_sent = false;
            }
            Err(resp) => return resp,
        }
    }
    if let Some(u) = new_url {
        s.notify.subs[i].notification_url = u;
    }
    let sub = s.notify.subs[i].clone();
    let mut body = render(&s, &sim.base_url, &sub, true);
    if let Value::Object(m) = &mut body {
        m.insert(
            "@odata.context".into(),
            json!(format!(
                "{}/v1.0/$metadata#subscriptions/$entity",
                sim.base_url
            )),
        );
    }
    ApiResponse::json(200, body)
}

async fn reauthorize(sim: &web::Data<Shared>, ctx: &Ctx, id: &str) -> ApiResponse {
    let (url, timeout) = {
        let mut s = sim.lock();
        let Some(i) = s.find_sub(id) else {
            return sub_not_found(ctx, id);
        };
        (
            s.notify.subs[i].notification_url.clone(),
            s.notify.validation_timeout,
        )
    };
    if let Err(msg) = validate_endpoint(&sim.http, &url, timeout).await {
        return invalid(ctx, &msg);
    }
    let mut s = sim.lock();
    if s.find_sub(id).is_none() {
        return sub_not_found(ctx, id);
    }
    ApiResponse {
        status: 204,
        headers: Vec::new(),
        body: Body::Value(Value::Null),
    }
}

// ---------------------------------------------------------------------------------------------
// Public knobs and accessors
// ---------------------------------------------------------------------------------------------

impl GraphSim {
    /// Live (unexpired) subscriptions, in creation order.
    pub fn subscriptions(&self) -> Vec<SimSubscription> {
        let mut s = self.shared.lock();
        s.prune_subscriptions();
        s.notify.subs.iter().map(Sub::public).collect()
    }

    /// Every delivery attempt so far (change and lifecycle notifications), in completion order.
    pub fn delivery_log(&self) -> Vec<DeliveryAttempt> {
        self.shared.lock().notify.log.clone()
    }

    pub fn notify_stats(&self) -> NotifyStats {
        self.shared.lock().notify.stats.clone()
    }

    /// Change notifications not settled yet: queued (delayed or held back by
    /// [`GraphSim::pause_delivery`]) plus batches being posted or waiting for a retry. 0 means
    /// every change so far was delivered, dropped or abandoned.
    pub fn notifications_unsettled(&self) -> usize {
        let s = self.shared.lock();
        s.notify.pending.len() + s.notify.in_flight
    }

    /// Replaces the delivery fault configuration and re-seeds its RNG from `f.seed`.
    pub fn set_notify_faults(&self, f: NotifyFaults) {
        let mut s = self.shared.lock();
        s.notify.rng = StdRng::seed_from_u64(f.seed);
        s.notify.faults = f;
    }

    /// Maximum subscription lifetime in minutes (default 41,760). Below 45 minutes the
    /// "raise to now + 45 min" rule is disabled so tests can use seconds-scale lifetimes.
    pub fn set_max_subscription_minutes(&self, minutes_: f64) {
        self.shared.lock().notify.max_lifetime = minutes(minutes_);
    }

    /// Whether a second subscription of the same resource and change type is refused with 409
    /// (the default, as Graph documents) or made (as an emulator without the check would).
    pub fn set_duplicate_subscriptions_conflict(&self, on: bool) {
        self.shared.lock().notify.duplicates_conflict = on;
    }

    /// Same as [`GraphSim::set_max_subscription_minutes`], as a duration.
    pub fn set_max_subscription_lifetime(&self, d: Duration) {
        self.shared.lock().notify.max_lifetime =
            chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    }

    /// Holds back change and lifecycle deliveries while true (they stay queued).
    pub fn pause_delivery(&self, paused: bool) {
        self.shared.lock().notify.paused = paused;
    }

    /// Retry schedule: first retry after `base`, doubling; a batch is abandoned when the next
    /// retry would start later than `give_up_after` after the first attempt. Defaults 200 ms /
    /// 30 s (real Graph: 4 hours).
    pub fn set_delivery_retry(&self, base: Duration, give_up_after: Duration) {
        let mut s = self.shared.lock();
        s.notify.retry_base = base;
        s.notify.give_up_after = give_up_after;
    }

    /// Timeout of the validation handshake (default 10 s, as on Graph).
    pub fn set_validation_timeout(&self, d: Duration) {
        self.shared.lock().notify.validation_timeout = d;
    }

    /// How `validationTokens` are built from now on.
    pub fn set_token_forgery(&self, f: TokenForgery) {
        self.shared.lock().notify.forgery = f;
    }

    /// Adds a `validationTokens` array to change-notification batches too (default off: only
    /// lifecycle notifications carry them, as observed).
    pub fn set_validation_tokens_on_changes(&self, on: bool) {
        self.shared.lock().notify.tokens_on_changes = on;
    }

    /// Sends `reauthorizationRequired` to the lifecycle URL of every subscription once it is
    /// within `lead` of its expiry (again after each renewal). None (default) disables it.
    pub fn set_auto_reauthorization(&self, lead: Option<Duration>) {
        self.shared.lock().notify.auto_reauth =
            lead.map(|d| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX));
    }

    /// Queues a lifecycle notification for the subscription. False when the subscription does
    /// not exist (or expired) or has no lifecycleNotificationUrl.
    pub fn send_lifecycle(&self, subscription_id: &str, event: LifecycleEvent) -> bool {
        let mut s = self.shared.lock();
        let Some(i) = s.find_sub(subscription_id) else {
            return false;
        };
        let sub = s.notify.subs[i].clone();
        match s.lifecycle_batch(&sub, event) {
            Some(b) => {
                s.notify.lifecycle_out.push(b);
                true
            }
            None => false,
        }
    }

    /// A genuine-or-forged (per [`GraphSim::set_token_forgery`]) validation token, as the
    /// simulator would put in `validationTokens` now.
    pub fn validation_token(&self) -> String {
        self.shared.lock().validation_token()
    }
}
