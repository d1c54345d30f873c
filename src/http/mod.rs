//! Health endpoints for uptime monitors: `GET /healthz` (the process answers) and
//! `GET /readyz` (200 when this process can take webhooks: it listens, and the store's writes
//! work). One customer's tenant or LMS being down must not make the process unready (an
//! orchestrator would then stop routing every customer's webhooks to it): each integration's
//! checks (Graph token, LMS, live subscriptions, last reconcile) are shown beside, never
//! counted in `ready`, and are on `/status` and in the metrics.
//!
//! Both are open (orchestrators and load balancers call them without credentials), so
//! `/readyz` says only ok / not ok per check name, summed over the integrations, and names no
//! integration: the problems themselves (error texts with LMS URLs, Graph paths) and the
//! per-integration view are shown only to a caller with the admin token, as on `/status`.
//! Neither probe writes anything: the store check reports the outcome of the store's own last
//! writes (see [`Store::write_state`]).

pub(crate) mod admin;
pub(crate) mod ops;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use actix_web::{web, HttpRequest, HttpResponse};
use secrecy::SecretString;
use serde::Serialize;

use crate::store::Store;
use crate::webhook::WebhookStats;

/// One integration's known problems, by check name (set by the serve tasks).
pub(crate) struct IntegrationHealth {
    pub name: String,
    problems: Mutex<BTreeMap<String, Option<String>>>,
}

impl IntegrationHealth {
    pub(crate) fn new(name: &str) -> Self {
        let mut m = BTreeMap::new();
        // Not ready until the first probe says otherwise.
        m.insert("startup".to_string(), Some("starting".to_string()));
        IntegrationHealth {
            name: name.to_string(),
            problems: Mutex::new(m),
        }
    }

    pub(crate) fn set_problem(&self, check: &str, problem: Option<String>) {
        let mut m = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        m.insert(check.to_string(), problem);
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<String, Option<String>> {
        self.problems
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

pub(crate) struct Health {
    pub store: Store,
    pub integrations: Vec<Arc<IntegrationHealth>>,
    pub webhooks: Arc<WebhookStats>,
    /// With it, `/readyz` shows the details.
    pub admin_token: Option<SecretString>,
}

/// The check of the store, by the name `/readyz` shows.
pub(crate) const STORE_CHECK: &str = "store writable";

#[derive(Serialize)]
struct Check {
    check: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    integration: Option<String>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

/// The operator side: `/status`, `/metrics`, `explain` (`admin`) and the `/admin/…` commands
/// (`ops`), which check access through `admin`.
pub(crate) fn configure_admin(cfg: &mut web::ServiceConfig, admin: web::Data<admin::Admin>) {
    admin::configure(cfg, admin);
    ops::configure(cfg);
}

pub(crate) fn configure(cfg: &mut web::ServiceConfig, health: web::Data<Health>) {
    cfg.app_data(health)
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .insert_header(("Cache-Control", "no-store"))
        .body(r#"{"status":"alive"}"#)
}

/// Every check, per integration, with its problem.
fn detailed(h: &Health) -> Vec<Check> {
    let mut checks = vec![Check {
        check: STORE_CHECK.into(),
        integration: None,
        ok: h.store.write_state().is_ok(),
        detail: h.store.write_state().err(),
    }];
    for i in &h.integrations {
        for (check, problem) in i.snapshot() {
            checks.push(Check {
                check,
                integration: Some(i.name.clone()),
                ok: problem.is_none(),
                detail: problem,
            });
        }
    }
    checks
}

async fn readyz(req: HttpRequest, h: web::Data<Health>) -> HttpResponse {
    let checks = detailed(&h);
    // Only the process's own checks count; the integrations' are shown.
    let ready = checks
        .iter()
        .filter(|c| c.integration.is_none())
        .all(|c| c.ok);
    let admin = h
        .admin_token
        .as_ref()
        .is_some_and(|t| admin::authorized(&req, t));
    let body = if admin {
        serde_json::json!({
            "ready": ready,
            "checks": checks,
            "webhooks": h.webhooks.view(),
        })
    } else {
        // Check name → ok, over all integrations; nothing else.
        let mut by_name: BTreeMap<String, bool> = BTreeMap::new();
        for c in &checks {
            *by_name.entry(c.check.clone()).or_insert(true) &= c.ok;
        }
        let checks: Vec<serde_json::Value> = by_name
            .into_iter()
            .map(|(check, ok)| serde_json::json!({"check": check, "ok": ok}))
            .collect();
        serde_json::json!({ "ready": ready, "checks": checks })
    };
    let mut r = if ready {
        HttpResponse::Ok()
    } else {
        HttpResponse::ServiceUnavailable()
    };
    r.insert_header(("Cache-Control", "no-store")).json(body)
}
