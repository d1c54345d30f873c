//! Health endpoints for uptime monitors: `GET /healthz` (the process answers) and
//! `GET /readyz` (200 only when the store is writable and every integration has a Graph token,
//! a reachable LMS, live subscriptions and no failed last reconcile). Bodies never carry
//! secrets: problems are error messages, which are built without them.

pub mod admin;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use actix_web::{web, HttpResponse};
use serde::Serialize;

use crate::store::Store;
use crate::webhook::WebhookStats;

/// One integration's known problems, by check name (set by the serve tasks).
pub struct IntegrationHealth {
    pub name: String,
    problems: Mutex<BTreeMap<String, Option<String>>>,
}

impl IntegrationHealth {
    pub fn new(name: &str) -> Self {
        let mut m = BTreeMap::new();
        // Not ready until the first probe says otherwise.
        m.insert("startup".to_string(), Some("starting".to_string()));
        IntegrationHealth {
            name: name.to_string(),
            problems: Mutex::new(m),
        }
    }

    pub fn set_problem(&self, check: &str, problem: Option<String>) {
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

pub struct Health {
    pub store: Store,
    pub integrations: Vec<Arc<IntegrationHealth>>,
    pub webhooks: Arc<WebhookStats>,
}

#[derive(Serialize)]
struct Check {
    check: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    integration: Option<String>,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

pub fn configure(cfg: &mut web::ServiceConfig, health: web::Data<Health>) {
    cfg.app_data(health)
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz));
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(r#"{"status":"alive"}"#)
}

async fn readyz(h: web::Data<Health>) -> HttpResponse {
    let mut checks = vec![Check {
        check: "store writable".into(),
        integration: None,
        ok: h.store.writable(),
        detail: None,
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
    let ready = checks.iter().all(|c| c.ok);
    let body = serde_json::json!({
        "ready": ready,
        "checks": checks,
        "webhooks": h.webhooks.view(),
    });
    if ready {
        HttpResponse::Ok().json(body)
    } else {
        HttpResponse::ServiceUnavailable().json(body)
    }
}
