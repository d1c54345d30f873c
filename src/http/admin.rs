//! Admin endpoints: `GET /metrics` (Prometheus text) and `GET /status` (JSON, or a small
//! server-rendered HTML page for browsers). `/status` needs `server.admin_token` (as a bearer
//! token, or as the password of HTTP Basic so a browser can prompt for it) and is disabled
//! without one; `/metrics` needs it only with `metrics_require_token`. Nothing here shows a
//! secret: the documents are built from run reports, queue items, subscription records and
//! health problems, none of which hold one. The operator commands' API (`/admin/…`) is in
//! `http::ops`, behind the same token.

use std::fmt::Write as _;
use std::sync::Arc;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use subtle::ConstantTimeEq;

use super::IntegrationHealth;
use crate::store::queue::{QueueItem, QueueStats};
use crate::store::{IntegrationStore, Store};
use crate::sync::reconcile::RunReport;

/// One integration as the admin endpoints see it.
pub(crate) struct AdminIntegration {
    pub name: String,
    pub store: IntegrationStore,
    pub health: Arc<IntegrationHealth>,
    pub schedule: String,
    pub timezone: String,
    /// `client_secret_expires` (the end of that day, UTC).
    pub secret_expires: Option<chrono::NaiveDate>,
}

pub(crate) struct Admin {
    pub store: Store,
    pub integrations: Vec<AdminIntegration>,
    pub token: Option<SecretString>,
    pub metrics_require_token: bool,
    /// `serve`'s live side for the operator commands (`/admin/…`, see `http::ops`).
    pub serving: Option<Arc<dyn crate::ops::Serving>>,
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig, admin: web::Data<Admin>) {
    cfg.app_data(admin)
        .route("/metrics", web::get().to(metrics))
        .route("/status", web::get().to(status))
        .route("/status.json", web::get().to(status_json))
        .route(
            "/status/{integration}/users/{user}",
            web::get().to(explain_user),
        );
}

/// `explain` over HTTP: the last decision traced for one user (object id, UPN or userName)
/// and the index entry; JSON, or the same text as the CLI in a page for browsers.
async fn explain_user(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    admin: web::Data<Admin>,
) -> HttpResponse {
    if let Some(r) = gate(&req, &admin, true) {
        return r;
    }
    let (integration, user) = path.into_inner();
    if user.len() > 256 {
        return HttpResponse::BadRequest().body("user key too long");
    }
    let Some(store) = admin
        .integrations
        .iter()
        .find(|i| i.name == integration)
        .map(|i| i.store.clone())
    else {
        return HttpResponse::NotFound().body("unknown integration");
    };
    let html = wants_html(&req);
    let found = web::block(move || crate::sync::trace::explain(&store, &user)).await;
    let e = match found {
        Ok(Ok(e)) => e,
        _ => return HttpResponse::InternalServerError().body("the store could not be read"),
    };
    let status = if e.known() {
        actix_web::http::StatusCode::OK
    } else {
        actix_web::http::StatusCode::NOT_FOUND
    };
    if html {
        HttpResponse::build(status)
            .content_type("text/html; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(format!(
                "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>rostersync: why</title></head><body><p><a href=\"/status\">← status</a></p><pre>{}</pre></body></html>",
                esc(&crate::sync::trace::render_explanation(&e))
            ))
    } else {
        HttpResponse::build(status)
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(e)
    }
}

/// Link to the explanation of one user (path segments percent-encoded, then HTML-escaped).
fn explain_link(integration: &str, user: &str, label: &str) -> String {
    let seg = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    format!(
        "<a href=\"/status/{}/users/{}\">{}</a>",
        esc(&seg(integration)),
        esc(&seg(user)),
        esc(label)
    )
}

/// Whether the request carries the admin token (Bearer, or Basic with it as password).
pub(crate) fn authorized(req: &HttpRequest, token: &SecretString) -> bool {
    let Some(h) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let presented: Option<String> = if let Some(t) = h.strip_prefix("Bearer ") {
        Some(t.trim().to_string())
    } else if let Some(b) = h.strip_prefix("Basic ") {
        base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .ok()
            .and_then(|d| String::from_utf8(d).ok())
            .and_then(|s| s.split_once(':').map(|(_, p)| p.to_string()))
    } else {
        None
    };
    let expected = token.expose_secret().as_bytes();
    match presented {
        Some(p) => p.len() == expected.len() && bool::from(p.as_bytes().ct_eq(expected)),
        None => false,
    }
}

fn unauthorized() -> HttpResponse {
    HttpResponse::Unauthorized()
        .insert_header((header::WWW_AUTHENTICATE, "Basic realm=\"rostersync\""))
        .content_type("text/plain; charset=utf-8")
        .body("admin token required (Authorization: Bearer <server.admin_token>)")
}

/// Checks access for `/status` (always) or `/metrics` (when configured so).
fn gate(req: &HttpRequest, admin: &Admin, required: bool) -> Option<HttpResponse> {
    match (&admin.token, required) {
        (_, false) => None,
        (None, true) => Some(
            HttpResponse::NotFound()
                .content_type("text/plain; charset=utf-8")
                .body("the status page is disabled: set server.admin_token to enable it"),
        ),
        (Some(t), true) if authorized(req, t) => None,
        (Some(_), true) => {
            refused_admin_request(req);
            Some(unauthorized())
        }
    }
}

/// Counts an admin request without a valid token; logs at most one line per 10 s with the
/// count since the last one (a stranger guessing tokens must not fill the log).
pub(crate) fn refused_admin_request(req: &HttpRequest) {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    static REFUSED: AtomicU64 = AtomicU64::new(0);
    static LAST_LINE: Mutex<Option<std::time::Instant>> = Mutex::new(None);
    REFUSED.fetch_add(1, Ordering::Relaxed);
    let mut last = LAST_LINE.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_some_and(|t| t.elapsed() < crate::webhook::rejections::LOG_INTERVAL) {
        return;
    }
    *last = Some(std::time::Instant::now());
    drop(last);
    let since = REFUSED.swap(0, Ordering::Relaxed).max(1);
    tracing::warn!(
        path = %crate::logging::excerpt(req.path(), 64),
        peer = ?req.peer_addr(),
        refused = since,
        "admin requests without a valid token (count since the last such line; at most one line per 10 s)"
    );
}

async fn metrics(req: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    if let Some(r) = gate(&req, &admin, admin.metrics_require_token) {
        return r;
    }
    // Off the HTTP workers, which must answer Graph within its 3 s budget (the subscription
    // records are read: a handful per integration; the queue is not, its sizes are counters).
    let refreshed = web::block(move || refresh_gauges(&admin)).await;
    if refreshed.is_err() {
        return HttpResponse::InternalServerError().body("metrics could not be collected");
    }
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(crate::metrics::render())
}

/// Sets the gauges that are read from memory, the subscription records and the config.
fn refresh_gauges(admin: &Admin) {
    let now = Utc::now();
    for i in &admin.integrations {
        let (queued, dead) = i.store.queue_counts();
        crate::metrics::queue(&i.name, queued, dead);
        if let Some(d) = i.secret_expires {
            let end = d.and_hms_opt(23, 59, 59).map(|t| t.and_utc());
            if let Some(end) = end {
                crate::metrics::secret_expiry(&i.name, (end - now).num_seconds() as f64);
            }
        }
        if let Ok(subs) = i.store.subscriptions() {
            for s in subs {
                let secs = (s.expires_at - now).num_milliseconds() as f64 / 1000.0;
                crate::metrics::subscription_expiry(&i.name, &s.resource, secs);
            }
        }
    }
}

#[derive(Serialize)]
pub(crate) struct StatusDoc {
    pub generated_at: DateTime<Utc>,
    pub store_writable: bool,
    /// The store's last write failure and what the start-up replay of the webhook journal
    /// found (corrupt records skipped, items of unconfigured integrations dropped).
    pub store_warnings: Vec<String>,
    pub integrations: Vec<IntegrationStatus>,
}

#[derive(Serialize)]
pub(crate) struct IntegrationStatus {
    pub name: String,
    pub ready: bool,
    pub schedule: String,
    pub timezone: String,
    pub warnings: Vec<String>,
    pub checks: Vec<CheckView>,
    pub runs: Vec<RunReport>,
    pub queue: Option<QueueStats>,
    pub retrying: Vec<ItemView>,
    pub dead_letters: Vec<ItemView>,
    pub subscriptions: Vec<SubscriptionView>,
    /// What the LMS's SCIM server takes: the last `check --probe` and what was learned since.
    pub dialect: DialectView,
}

#[derive(Serialize, Default)]
pub(crate) struct DialectView {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probed_at: Option<DateTime<Utc>>,
    /// What the LMS taught rostersync, oldest first.
    pub lessons: Vec<crate::lms::dialect::Lesson>,
    /// The last `check --probe` table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<crate::lms::probe::ProbeReport>,
}

fn dialect_view(store: &IntegrationStore, warnings: &mut Vec<String>) -> DialectView {
    let learned: Option<crate::lms::dialect::Learned> =
        store.get_meta(crate::app::DIALECT_META).unwrap_or(None);
    let probe: Option<crate::lms::probe::ProbeReport> =
        store.get_meta(crate::app::PROBE_META).unwrap_or(None);
    match &probe {
        None => warnings.push(
            "the LMS was never probed: run `rostersync check --probe` (it writes canary users) before go-live".into(),
        ),
        Some(p) if p.failed() => warnings.push(
            "the last `check --probe` found operations this LMS cannot do: see SCIM dialect".into(),
        ),
        Some(_) => {}
    }
    let (probed_at, lessons) = learned
        .map(|l| (l.probed_at, l.lessons))
        .unwrap_or_default();
    DialectView {
        probed_at,
        lessons,
        probe,
    }
}

#[derive(Serialize)]
pub(crate) struct CheckView {
    pub check: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct ItemView {
    pub id: u64,
    pub what: String,
    pub attempts: u32,
    pub received_at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_at: Option<DateTime<Utc>>,
}

#[derive(Serialize)]
pub(crate) struct SubscriptionView {
    pub id: String,
    pub resource: String,
    pub expires_at: DateTime<Utc>,
    pub expires_in_seconds: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

const RUNS_SHOWN: usize = 10;
const ITEMS_SHOWN: usize = 50;

fn item_view((id, it): (u64, QueueItem)) -> ItemView {
    ItemView {
        id,
        what: it.hint.describe(),
        attempts: it.attempts,
        received_at: it.received_at,
        last_error: it.last_error,
        dead_at: it.dead_at,
    }
}

/// Builds the status document from the store and the health checks.
pub(crate) fn status_doc(admin: &Admin) -> StatusDoc {
    let now = Utc::now();
    let mut out = Vec::new();
    for i in &admin.integrations {
        let mut warnings = Vec::new();
        let checks: Vec<CheckView> = i
            .health
            .snapshot()
            .into_iter()
            .map(|(check, problem)| CheckView {
                ok: problem.is_none(),
                check,
                detail: problem,
            })
            .collect();
        for c in checks.iter().filter(|c| !c.ok) {
            warnings.push(format!(
                "{}: {}",
                c.check,
                c.detail.as_deref().unwrap_or("failing")
            ));
        }
        let runs: Vec<RunReport> = i.store.runs(RUNS_SHOWN).unwrap_or_else(|e| {
            warnings.push(format!("run history unreadable: {e}"));
            Vec::new()
        });
        if let Some(last) = runs.first() {
            if let Some(g) = &last.guard {
                warnings.push(format!("last reconcile: guard tripped: {g}"));
            }
            if !last.failures.is_empty() {
                warnings.push(format!(
                    "last reconcile: {} user(s) failed to sync",
                    last.failures.len()
                ));
            }
            if let Some(e) = &last.error {
                warnings.push(format!("last reconcile failed: {e}"));
            }
        }
        let queue = i.store.queue_stats(now).ok();
        let retrying: Vec<ItemView> = i
            .store
            .retrying(ITEMS_SHOWN)
            .unwrap_or_default()
            .into_iter()
            .map(item_view)
            .collect();
        let dead_letters: Vec<ItemView> = i
            .store
            .dead_letters_first(ITEMS_SHOWN)
            .unwrap_or_default()
            .into_iter()
            .map(item_view)
            .collect();
        if let Some(q) = &queue {
            if q.dead > 0 {
                warnings.push(format!(
                    "{} dead letter(s): fix the cause, then `queue replay`",
                    q.dead
                ));
            }
        }
        let subscriptions: Vec<SubscriptionView> = i
            .store
            .subscriptions()
            .unwrap_or_default()
            .into_iter()
            .map(|s| {
                let left = (s.expires_at - now).num_seconds();
                if left < 24 * 3600 {
                    warnings.push(format!(
                        "subscription for {} expires in {} min",
                        s.resource,
                        left / 60
                    ));
                }
                if let Some(e) = &s.last_error {
                    warnings.push(format!("subscription for {}: {e}", s.resource));
                }
                SubscriptionView {
                    id: s.id,
                    resource: s.resource,
                    expires_at: s.expires_at,
                    expires_in_seconds: left,
                    last_error: s.last_error,
                }
            })
            .collect();
        let dialect = dialect_view(&i.store, &mut warnings);
        out.push(IntegrationStatus {
            name: i.name.clone(),
            ready: checks.iter().all(|c| c.ok),
            schedule: i.schedule.clone(),
            timezone: i.timezone.clone(),
            warnings,
            checks,
            runs,
            queue,
            retrying,
            dead_letters,
            subscriptions,
            dialect,
        });
    }
    let mut store_warnings = Vec::new();
    if let Err(e) = admin.store.write_state() {
        store_warnings.push(format!("store writes fail: {e}"));
    }
    if let Some(r) = admin.store.journal_report() {
        store_warnings.extend(r.warnings());
    }
    StatusDoc {
        generated_at: now,
        store_writable: admin.store.writable(),
        store_warnings,
        integrations: out,
    }
}

fn wants_html(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .map(|a| a.contains("text/html"))
        .unwrap_or(false)
}

async fn status(req: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    let as_html = wants_html(&req);
    status_as(req, admin, as_html).await
}

async fn status_json(req: HttpRequest, admin: web::Data<Admin>) -> HttpResponse {
    status_as(req, admin, false).await
}

async fn status_as(req: HttpRequest, admin: web::Data<Admin>, as_html: bool) -> HttpResponse {
    if let Some(r) = gate(&req, &admin, true) {
        return r;
    }
    let Ok(doc) = web::block(move || status_doc(&admin)).await else {
        return HttpResponse::InternalServerError().body("status could not be collected");
    };
    if as_html {
        HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(html(&doc))
    } else {
        HttpResponse::Ok()
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .json(doc)
    }
}

/// HTML-escapes text for element content and attribute values.
pub(crate) fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// The page: one section per integration; everything escaped.
pub(crate) fn html(doc: &StatusDoc) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>rostersync status</title>\
<meta name=\"viewport\" content=\"width=device-width\">\
<style>body{{font:14px system-ui,sans-serif;margin:1.5em;color:#222}}table{{border-collapse:collapse;margin:.5em 0 1.2em}}\
td,th{{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}}th{{background:#f3f3f3}}\
.ok{{color:#176f2c}}.bad{{color:#b00020;font-weight:600}}.warn{{background:#fff4ce;padding:.4em .6em;margin:.2em 0}}\
code{{font-size:12px}}</style></head><body><h1>rostersync</h1><p>Generated {} · store {}</p>",
        time(&doc.generated_at),
        if doc.store_writable {
            "<span class=\"ok\">writable</span>"
        } else {
            "<span class=\"bad\">NOT writable</span>"
        }
    );
    for w in &doc.store_warnings {
        let _ = write!(h, "<div class=\"warn\">⚠ {}</div>", esc(w));
    }
    for i in &doc.integrations {
        let _ = write!(
            h,
            "<h2 id=\"{n}\">{n} <span class=\"{c}\">{r}</span></h2><p>Schedule <code>{s}</code> ({tz}) · why is a user as they are? <code>/status/{n}/users/&lt;object id, UPN or userName&gt;</code></p>",
            n = esc(&i.name),
            c = if i.ready { "ok" } else { "bad" },
            r = if i.ready { "ready" } else { "not ready" },
            s = esc(&i.schedule),
            tz = esc(&i.timezone),
        );
        for w in &i.warnings {
            let _ = write!(h, "<div class=\"warn\">⚠ {}</div>", esc(w));
        }
        h.push_str("<h3>Checks</h3><table><tr><th>check</th><th>state</th></tr>");
        for c in &i.checks {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"{}\">{}</td></tr>",
                esc(&c.check),
                if c.ok { "ok" } else { "bad" },
                esc(c.detail.as_deref().unwrap_or("ok"))
            );
        }
        h.push_str("</table><h3>Last reconciles</h3><table><tr><th>started</th><th>outcome</th><th>members</th><th>created</th><th>updated</th><th>deactivated</th><th>reactivated</th><th>failed</th><th>notes</th></tr>");
        for r in &i.runs {
            let mut notes = String::new();
            if let Some(g) = &r.guard {
                let _ = write!(notes, "guard tripped: {} ", esc(&g.to_string()));
            }
            if let Some(e) = &r.error {
                let _ = write!(notes, "{} ", esc(e));
            }
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"{}\">{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                time(&r.started_at),
                if r.error.is_none() && r.guard.is_none() && r.failures.is_empty() { "ok" } else { "bad" },
                r.outcome,
                r.counts.members,
                r.counts.created,
                r.counts.updated,
                r.counts.deactivated,
                r.counts.reactivated,
                r.counts.failed,
                notes
            );
        }
        h.push_str("</table>");
        if let Some(last) = i.runs.first() {
            if !last.failures.is_empty() {
                h.push_str("<h3>Users that failed in the last reconcile</h3><table><tr><th>user</th><th>userName</th><th>reason</th></tr>");
                for f in &last.failures {
                    let _ = write!(
                        h,
                        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
                        explain_link(&i.name, &f.entra_id, &f.entra_id),
                        esc(f.user_name.as_deref().unwrap_or("")),
                        esc(&f.reason)
                    );
                }
                h.push_str("</table>");
            }
        }
        if let Some(q) = &i.queue {
            let _ = write!(
                h,
                "<h3>Queue</h3><p>queued {} · waiting for retry {} · dead letters {}{}</p>",
                q.queued,
                q.waiting_retry,
                q.dead,
                q.oldest_queued_at
                    .map(|t| format!(" · oldest {}", time(&t)))
                    .unwrap_or_default()
            );
        }
        for (title, items) in [("Retrying", &i.retrying), ("Dead letters", &i.dead_letters)] {
            if items.is_empty() {
                continue;
            }
            let _ = write!(
                h,
                "<h3>{title}</h3><table><tr><th>id</th><th>what</th><th>attempts</th><th>received</th><th>error</th></tr>"
            );
            for it in items {
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    it.id,
                    esc(&it.what),
                    it.attempts,
                    time(&it.received_at),
                    esc(it.last_error.as_deref().unwrap_or(""))
                );
            }
            h.push_str("</table>");
        }
        h.push_str("<h3>Subscriptions</h3><table><tr><th>resource</th><th>id</th><th>expires</th><th>error</th></tr>");
        for s in &i.subscriptions {
            let _ = write!(
                h,
                "<tr><td>{}</td><td><code>{}</code></td><td>{} (in {} h)</td><td>{}</td></tr>",
                esc(&s.resource),
                esc(&s.id),
                time(&s.expires_at),
                s.expires_in_seconds / 3600,
                esc(s.last_error.as_deref().unwrap_or(""))
            );
        }
        h.push_str("</table>");
        html_dialect(&mut h, &i.dialect);
    }
    h.push_str("</body></html>");
    h
}

/// The SCIM dialect section: the probe's table and what was learned since.
fn html_dialect(h: &mut String, d: &DialectView) {
    h.push_str("<h3>SCIM dialect</h3>");
    match &d.probe {
        None => h.push_str("<p>Never probed: run <code>rostersync check --probe</code>.</p>"),
        Some(p) => {
            let _ = write!(
                h,
                "<p>Probed {} with canary <code>{}</code>.</p><table><tr><th>operation</th><th>LMS answered</th><th>rostersync will</th></tr>",
                time(&p.at),
                esc(&p.canary)
            );
            for r in &p.rows {
                let class = match r.status {
                    crate::lms::probe::RowStatus::Ok => "ok",
                    crate::lms::probe::RowStatus::Warn => "",
                    crate::lms::probe::RowStatus::Fail => "bad",
                };
                let _ = write!(
                    h,
                    "<tr><td>{}</td><td>{}</td><td class=\"{class}\">{}</td></tr>",
                    esc(&r.operation),
                    esc(&r.answer),
                    esc(&r.action)
                );
            }
            h.push_str("</table><p>In force after the probe:</p><ul>");
            for l in &p.dialect {
                let _ = write!(h, "<li>{}</li>", esc(l));
            }
            h.push_str("</ul>");
        }
    }
    if !d.lessons.is_empty() {
        h.push_str(
            "<table><tr><th>learned</th><th>what rostersync does now</th><th>from</th></tr>",
        );
        for l in &d.lessons {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                time(&l.at),
                esc(&l.downgrade.to_string()),
                esc(&l.evidence)
            );
        }
        h.push_str("</table>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dialect_section_shows_the_probe_table_escaped() {
        use crate::lms::probe::{ProbeReport, ProbeRow, RowStatus};
        let mut h = String::new();
        html_dialect(&mut h, &DialectView::default());
        assert!(h.contains("check --probe"), "{h}");
        let view = DialectView {
            probed_at: Some(Utc::now()),
            lessons: Vec::new(),
            probe: Some(ProbeReport {
                at: Utc::now(),
                canary: "rostersync-probe-x@invalid.example".into(),
                rows: vec![ProbeRow {
                    operation: "clear <title>".into(),
                    answer: "501".into(),
                    action: "clear it with PATCH replace null".into(),
                    status: RowStatus::Warn,
                }],
                dialect: vec!["PATCH ops: replace (learned)".into()],
            }),
        };
        let mut h = String::new();
        html_dialect(&mut h, &view);
        assert!(
            h.contains("clear &lt;title&gt;") && h.contains("replace null"),
            "{h}"
        );
        assert!(h.contains("PATCH ops: replace (learned)"));
    }

    #[test]
    fn html_escapes_everything_it_prints() {
        assert_eq!(
            esc("<script>alert('x')</script>&\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }
}
