//! Wire-level tests of the Graph simulator's subscriptions, change/lifecycle notifications,
//! validation tokens and group delta (`rostersync_sim::graph`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use chrono::Utc;
use rostersync_sim::graph::{
    fixture, Fixture, GraphSim, LifecycleEvent, NotifyFaults, SimUser, TokenForgery,
};
use serde_json::{json, Value};

const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";
const CHANGE_TRACKING_APP_ID: &str = "0bf30f3b-4a52-48df-9a82-234910c4a086";
const STATE: &str = "s3cr3t-client-state";

// ---------------------------------------------------------------------------------------------
// Receiver: a webhook endpoint with scripted behaviour
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Act {
    /// Answer with this status (notifications) / echo with this status (validation).
    Status(u16),
    /// Sleep, then answer normally.
    SlowMs(u64),
    /// Validation: echo something else.
    WrongEcho,
}

#[derive(Clone, Debug)]
struct Received {
    path: String,
    raw_query: String,
    /// Decoded validationToken, when this was a validation request.
    validation: Option<String>,
    content_type: String,
    body: Value,
}

#[derive(Default)]
struct RecvState {
    log: Vec<Received>,
    validation_script: HashMap<String, VecDeque<Act>>,
    notify_script: HashMap<String, VecDeque<Act>>,
}

#[derive(Clone)]
struct Receiver {
    base: String,
    state: Arc<Mutex<RecvState>>,
}

async fn receive(
    req: HttpRequest,
    body: web::Bytes,
    st: web::Data<Arc<Mutex<RecvState>>>,
) -> HttpResponse {
    let path = req.path().to_string();
    let raw_query = req.query_string().to_string();
    let validation = url::form_urlencoded::parse(raw_query.as_bytes())
        .find(|(k, _)| k == "validationToken")
        .map(|(_, v)| v.into_owned());
    let content_type = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let act = {
        let mut s = st.lock().unwrap();
        s.log.push(Received {
            path: path.clone(),
            raw_query,
            validation: validation.clone(),
            content_type,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        });
        let script = if validation.is_some() {
            &mut s.validation_script
        } else {
            &mut s.notify_script
        };
        script.get_mut(&path).and_then(VecDeque::pop_front)
    };
    let mut status = if validation.is_some() { 200 } else { 202 };
    let mut echo = validation.clone().unwrap_or_default();
    match act {
        Some(Act::Status(s)) => status = s,
        Some(Act::SlowMs(ms)) => tokio::time::sleep(Duration::from_millis(ms)).await,
        Some(Act::WrongEcho) => echo = format!("{echo}x"),
        None => {}
    }
    let mut b = HttpResponse::build(actix_web::http::StatusCode::from_u16(status).unwrap());
    if validation.is_some() {
        b.insert_header(("Content-Type", "text/plain"));
        b.body(echo)
    } else {
        b.finish()
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(RecvState::default()));
        let data = web::Data::new(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(receive))
        })
        .workers(2)
        .disable_signals()
        .listen(l)
        .unwrap()
        .run();
        tokio::spawn(server);
        Receiver {
            base: format!("http://127.0.0.1:{port}"),
            state,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn script_validation(&self, path: &str, acts: &[Act]) {
        self.state
            .lock()
            .unwrap()
            .validation_script
            .insert(path.to_string(), acts.iter().cloned().collect());
    }

    fn script_notify(&self, path: &str, acts: &[Act]) {
        self.state
            .lock()
            .unwrap()
            .notify_script
            .insert(path.to_string(), acts.iter().cloned().collect());
    }

    fn log(&self) -> Vec<Received> {
        self.state.lock().unwrap().log.clone()
    }

    fn validations(&self, path: &str) -> Vec<Received> {
        self.log()
            .into_iter()
            .filter(|r| r.path == path && r.validation.is_some())
            .collect()
    }

    /// Notification POST bodies received on `path`.
    fn posts(&self, path: &str) -> Vec<Value> {
        self.log()
            .into_iter()
            .filter(|r| r.path == path && r.validation.is_none())
            .map(|r| r.body)
            .collect()
    }

    /// All items of all notification POSTs on `path`.
    fn items(&self, path: &str) -> Vec<Value> {
        self.posts(path)
            .iter()
            .flat_map(|b| b["value"].as_array().cloned().unwrap_or_default())
            .collect()
    }

    fn clear(&self) {
        self.state.lock().unwrap().log.clear();
    }
}

async fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Graph helpers
// ---------------------------------------------------------------------------------------------

struct Env {
    sim: GraphSim,
    fx: Fixture,
    tok: String,
    rx: Receiver,
    http: reqwest::Client,
}

async fn env(n: usize) -> Env {
    let fx = fixture(n, 7);
    let sim = GraphSim::start(fx.tenant.clone()).await.expect("sim");
    let http = reqwest::Client::new();
    let resp = http
        .post(sim.token_url())
        .form(&[
            ("client_id", fx.tenant.client_id.as_str()),
            ("client_secret", fx.tenant.client_secret.as_str()),
            ("scope", GRAPH_SCOPE),
            ("grant_type", "client_credentials"),
        ])
        .send()
        .await
        .unwrap();
    let body: Value = resp.json().await.unwrap();
    let tok = body["access_token"].as_str().unwrap().to_string();
    let rx = Receiver::start().await;
    Env {
        sim,
        fx,
        tok,
        rx,
        http,
    }
}

impl Env {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}/v1.0/{path}", self.sim.graph_url())
        };
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rb = self.http.request(m, url).bearer_auth(&self.tok);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = rb.send().await.unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, v)
    }

    async fn get_full(&self, url: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        let resp = self
            .http
            .get(url)
            .bearer_auth(&self.tok)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let v = resp.json().await.unwrap_or(Value::Null);
        (status, headers, v)
    }

    fn sub_body(&self, resource: &str, change: &str, path: &str, minutes: i64) -> Value {
        json!({
            "changeType": change,
            "notificationUrl": self.rx.url(path),
            "resource": resource,
            "expirationDateTime": (Utc::now() + chrono::Duration::minutes(minutes)).to_rfc3339(),
            "clientState": STATE,
        })
    }

    async fn subscribe(&self, resource: &str, change: &str, path: &str) -> Value {
        let (st, body) = self
            .call(
                "POST",
                "subscriptions",
                Some(self.sub_body(resource, change, path, 120)),
            )
            .await;
        assert_eq!(st, 201, "{body}");
        body
    }
}

fn err_code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

fn err_msg(v: &Value) -> &str {
    v["error"]["message"].as_str().unwrap_or("")
}

// ---------------------------------------------------------------------------------------------
// Subscriptions and the validation handshake
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn create_runs_handshake_on_both_urls_and_returns_subscription() {
    let e = env(10).await;
    let mut body = e.sub_body("/users", "updated,deleted", "/notify?tenant=a", 120);
    body["lifecycleNotificationUrl"] = json!(e.rx.url("/lifecycle"));
    let (st, sub) = e.call("POST", "subscriptions", Some(body)).await;
    assert_eq!(st, 201, "{sub}");

    let v = e.rx.validations("/notify");
    assert_eq!(v.len(), 1);
    assert_eq!(v[0].content_type, "text/plain; charset=utf-8");
    let token = v[0].validation.clone().unwrap();
    assert!(token.contains(' ') && token.contains('+'), "{token}");
    // The query keeps the notification URL's own parameters and URL-encodes the token.
    assert!(v[0].raw_query.starts_with("tenant=a&validationToken="));
    assert!(!v[0].raw_query.contains(' '));
    assert!(v[0].raw_query.contains("%2B"));
    assert_eq!(e.rx.validations("/lifecycle").len(), 1);

    let id = sub["id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(id).is_ok());
    assert_eq!(sub["resource"], "/users");
    assert_eq!(sub["changeType"], "updated,deleted");
    assert_eq!(sub["applicationId"], e.fx.tenant.client_id);
    assert_eq!(sub["clientState"], STATE);
    assert_eq!(sub["notificationUrl"], e.rx.url("/notify?tenant=a"));
    assert_eq!(sub["lifecycleNotificationUrl"], e.rx.url("/lifecycle"));
    assert_eq!(sub["includeResourceData"], false);
    assert_eq!(sub["latestSupportedTlsVersion"], "v1_2");
    assert_eq!(sub["notificationContentType"], "application/json");
    assert!(sub["creatorId"].is_string());
    let exp = sub["expirationDateTime"].as_str().unwrap();
    assert!(exp.ends_with('Z'), "{exp}");
    let exp = chrono::DateTime::parse_from_rfc3339(exp).unwrap();
    let mins = (exp.with_timezone(&Utc) - Utc::now()).num_minutes();
    assert!((118..=120).contains(&mins), "{mins}");

    let (st, list) = e.call("GET", "subscriptions", None).await;
    assert_eq!(st, 200);
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    assert_eq!(list["value"][0]["id"], id);
    let (st, one) = e.call("GET", &format!("subscriptions/{id}"), None).await;
    assert_eq!(st, 200);
    assert_eq!(one["resource"], "/users");
    let subs = e.sim.subscriptions();
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].id, id);
    assert_eq!(
        subs[0].lifecycle_url.as_deref(),
        Some(e.rx.url("/lifecycle").as_str())
    );
    assert_eq!(subs[0].client_state.as_deref(), Some(STATE));
    assert!(e.sim.request_count("subscriptions") >= 3);
}

#[tokio::test]
async fn handshake_failures_create_nothing() {
    let e = env(5).await;
    e.rx.script_validation("/wrong", &[Act::WrongEcho]);
    let (st, b) = e
        .call(
            "POST",
            "subscriptions",
            Some(e.sub_body("/users", "updated", "/wrong", 120)),
        )
        .await;
    assert_eq!(st, 400);
    assert_eq!(err_code(&b), "InvalidRequest");
    assert_eq!(
        err_msg(&b),
        "Subscription validation request failed. Response must exactly match validationToken query parameter."
    );

    e.rx.script_validation("/err", &[Act::Status(500)]);
    let (st, b) = e
        .call(
            "POST",
            "subscriptions",
            Some(e.sub_body("/users", "updated", "/err", 120)),
        )
        .await;
    assert_eq!(st, 400, "{b}");

    e.sim.set_validation_timeout(Duration::from_millis(300));
    e.rx.script_validation("/slow", &[Act::SlowMs(1000)]);
    let (st, b) = e
        .call(
            "POST",
            "subscriptions",
            Some(e.sub_body("/users", "updated", "/slow", 120)),
        )
        .await;
    assert_eq!(st, 400);
    assert_eq!(err_msg(&b), "Subscription validation request timed out.");

    // A failing lifecycle URL fails the whole creation.
    e.rx.script_validation("/lc-bad", &[Act::WrongEcho]);
    let mut body = e.sub_body("/users", "updated", "/ok", 120);
    body["lifecycleNotificationUrl"] = json!(e.rx.url("/lc-bad"));
    let (st, _) = e.call("POST", "subscriptions", Some(body)).await;
    assert_eq!(st, 400);

    assert!(e.sim.subscriptions().is_empty());
    let (_, list) = e.call("GET", "subscriptions", None).await;
    assert_eq!(list["value"], json!([]));
}

#[tokio::test]
async fn create_rejects_invalid_requests() {
    let e = env(5).await;
    let post = |b: Value| e.call("POST", "subscriptions", Some(b));

    let (st, b) = post(e.sub_body("/users", "created,updated", "/n", 120)).await;
    assert_eq!(st, 400);
    assert_eq!(err_code(&b), "InvalidRequest");
    assert_eq!(err_msg(&b), "Invalid 'changeType' attribute: 'created'.");
    assert!(b["error"]["innerError"]["request-id"].is_string());

    let (st, _) = post(e.sub_body("/me/messages", "updated", "/n", 120)).await;
    assert_eq!(st, 400);
    let (st, _) = post(e.sub_body("/groups/x/owners/y", "updated", "/n", 120)).await;
    assert_eq!(st, 400);

    let mut b = e.sub_body("/users", "updated", "/n", 120);
    b["notificationUrl"] = json!("http://example.com/notify");
    let (st, _) = post(b).await;
    assert_eq!(st, 400);

    let mut b = e.sub_body("/users", "updated", "/n", 120);
    b["clientState"] = json!("x".repeat(129));
    let (st, _) = post(b).await;
    assert_eq!(st, 400);
    let mut b = e.sub_body("/users", "updated", "/n", 120);
    b["clientState"] = json!("x".repeat(128));
    let (st, _) = post(b).await;
    assert_eq!(st, 201);

    let (st, _) = post(e.sub_body("/groups", "updated", "/n", -5)).await;
    assert_eq!(st, 400);
    let (st, b) = post(e.sub_body("/groups", "updated", "/n", 41_761)).await;
    assert_eq!(st, 400);
    assert_eq!(
        err_msg(&b),
        "Subscription expiration can only be 41760 minutes in the future."
    );
    let mut b = e.sub_body("/groups", "updated", "/n", 120);
    b.as_object_mut().unwrap().remove("expirationDateTime");
    let (st, _) = post(b).await;
    assert_eq!(st, 400);
    let mut b = e.sub_body("/groups", "updated", "/n", 120);
    b["expirationDateTime"] = json!("tomorrow");
    let (st, _) = post(b).await;
    assert_eq!(st, 400);
    let mut b = e.sub_body("/groups", "updated", "/n", 120);
    b["resource"] = json!(42);
    let (st, _) = post(b).await;
    assert_eq!(st, 400);

    let resp = e
        .http
        .post(format!("{}/v1.0/subscriptions", e.sim.graph_url()))
        .bearer_auth(&e.tok)
        .header("Content-Type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let b: Value = resp.json().await.unwrap();
    assert_eq!(err_code(&b), "BadRequest");

    let resp = e
        .http
        .post(format!("{}/v1.0/subscriptions", e.sim.graph_url()))
        .json(&e.sub_body("/users", "updated", "/n", 120))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    // Only the 128-character one was created.
    assert_eq!(e.sim.subscriptions().len(), 1);
}

#[tokio::test]
async fn duplicate_is_409_and_quota_is_100() {
    let e = env(5).await;
    let gid = e.fx.all_group_id.clone();
    let first = e
        .subscribe(&format!("/groups/{gid}/members"), "updated,deleted", "/n")
        .await;
    // Same combination, other spelling of the resource.
    let (st, b) = e
        .call(
            "POST",
            "subscriptions",
            Some(e.sub_body(
                &format!("Groups/{}/Members", gid.to_uppercase()),
                "updated,deleted",
                "/other",
                60,
            )),
        )
        .await;
    assert_eq!(st, 409, "{b}");
    assert_eq!(
        err_msg(&b),
        format!(
            "Subscription Id {} already exists for the requested combination",
            first["id"].as_str().unwrap()
        )
    );
    // Different changeType: allowed.
    e.subscribe(&format!("/groups/{gid}/members"), "updated", "/n")
        .await;
    for i in 0..98 {
        e.subscribe(&format!("/users/u{i}"), "updated", "/n").await;
    }
    assert_eq!(e.sim.subscriptions().len(), 100);
    let (st, b) = e
        .call(
            "POST",
            "subscriptions",
            Some(e.sub_body("/users", "updated", "/n", 60)),
        )
        .await;
    assert_eq!(st, 403, "{b}");
}

#[tokio::test]
async fn expiration_raised_to_45_minutes_and_max_knob() {
    let e = env(5).await;
    let (st, sub) = e
        .call(
            "POST",
            "subscriptions",
            Some(e.sub_body("/users", "updated", "/n", 10)),
        )
        .await;
    assert_eq!(st, 201);
    let exp = chrono::DateTime::parse_from_rfc3339(sub["expirationDateTime"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    let secs = (exp - Utc::now()).num_seconds();
    assert!((44 * 60..=45 * 60).contains(&secs), "{secs}");

    let (st, _) = e
        .call(
            "POST",
            "subscriptions",
            Some(e.sub_body("/groups", "updated", "/n", 41_759)),
        )
        .await;
    assert_eq!(st, 201);

    e.sim.set_max_subscription_minutes(30.0);
    let (st, b) = e
        .call(
            "POST",
            "subscriptions",
            Some(e.sub_body("/users/x", "updated", "/n", 31)),
        )
        .await;
    assert_eq!(st, 400);
    assert_eq!(
        err_msg(&b),
        "Subscription expiration can only be 30 minutes in the future."
    );
    // Below the 45-minute floor the knob disables the raise.
    let (st, sub) = e
        .call(
            "POST",
            "subscriptions",
            Some(e.sub_body("/users/x", "updated", "/n", 10)),
        )
        .await;
    assert_eq!(st, 201);
    let exp = chrono::DateTime::parse_from_rfc3339(sub["expirationDateTime"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    let secs = (exp - Utc::now()).num_seconds();
    assert!((9 * 60..=10 * 60).contains(&secs), "{secs}");
}

#[tokio::test]
async fn renew_revalidates_and_gone_subscriptions_are_404() {
    let e = env(5).await;
    let sub = e.subscribe("/users", "updated", "/n").await;
    let id = sub["id"].as_str().unwrap().to_string();
    assert_eq!(e.rx.validations("/n").len(), 1);

    let new_exp = (Utc::now() + chrono::Duration::minutes(600)).to_rfc3339();
    let (st, b) = e
        .call(
            "PATCH",
            &format!("subscriptions/{id}"),
            Some(json!({ "expirationDateTime": new_exp })),
        )
        .await;
    assert_eq!(st, 200, "{b}");
    assert_eq!(b["id"], id);
    let exp = chrono::DateTime::parse_from_rfc3339(b["expirationDateTime"].as_str().unwrap())
        .unwrap()
        .with_timezone(&Utc);
    assert!((exp - Utc::now()).num_minutes() >= 598);
    assert_eq!(e.rx.validations("/n").len(), 2, "PATCH re-validates");

    // Failing re-validation: 400 and nothing changes.
    e.rx.script_validation("/moved", &[Act::WrongEcho]);
    let (st, _) = e
        .call(
            "PATCH",
            &format!("subscriptions/{id}"),
            Some(json!({ "notificationUrl": e.rx.url("/moved") })),
        )
        .await;
    assert_eq!(st, 400);
    assert_eq!(e.sim.subscriptions()[0].notification_url, e.rx.url("/n"));
    let (st, _) = e
        .call("PATCH", &format!("subscriptions/{id}"), Some(json!({})))
        .await;
    assert_eq!(st, 400);
    let (st, _) = e
        .call(
            "PATCH",
            &format!("subscriptions/{id}"),
            Some(json!({ "lifecycleNotificationUrl": e.rx.url("/lc") })),
        )
        .await;
    assert_eq!(st, 400);
    let (st, _) = e
        .call(
            "PATCH",
            &format!("subscriptions/{id}"),
            Some(json!({ "expirationDateTime": (Utc::now() + chrono::Duration::minutes(50_000)).to_rfc3339() })),
        )
        .await;
    assert_eq!(st, 400);

    let (st, _) = e
        .call("POST", &format!("subscriptions/{id}/reauthorize"), None)
        .await;
    assert_eq!(st, 204);

    let (st, _) = e.call("DELETE", &format!("subscriptions/{id}"), None).await;
    assert_eq!(st, 204);
    let (st, b) = e
        .call(
            "PATCH",
            &format!("subscriptions/{id}"),
            Some(json!({ "expirationDateTime": new_exp })),
        )
        .await;
    assert_eq!(st, 404);
    assert_eq!(err_code(&b), "ResourceNotFound");
    let (st, _) = e.call("GET", &format!("subscriptions/{id}"), None).await;
    assert_eq!(st, 404);
    let (st, _) = e.call("DELETE", &format!("subscriptions/{id}"), None).await;
    assert_eq!(st, 404);
    let (st, _) = e
        .call("POST", &format!("subscriptions/{id}/reauthorize"), None)
        .await;
    assert_eq!(st, 404);
}

#[tokio::test]
async fn expired_subscription_is_gone_and_silent() {
    let e = env(5).await;
    e.sim.set_max_subscription_lifetime(Duration::from_secs(3));
    let body = json!({
        "changeType": "updated",
        "notificationUrl": e.rx.url("/n"),
        "resource": "users",
        "expirationDateTime": (Utc::now() + chrono::Duration::milliseconds(1200)).to_rfc3339(),
        "clientState": STATE,
    });
    let (st, sub) = e.call("POST", "subscriptions", Some(body)).await;
    assert_eq!(st, 201, "{sub}");
    let id = sub["id"].as_str().unwrap().to_string();
    let uid = e.fx.ceo_id.clone();
    assert!(e.sim.update_user(&uid, |u| u.city = Some("Oslo".into())));
    wait_until("first notification", Duration::from_secs(2), || {
        e.rx.items("/n").len() == 1
    })
    .await;
    wait_until("expiry", Duration::from_secs(3), || {
        e.sim.subscriptions().is_empty()
    })
    .await;
    assert!(e.sim.update_user(&uid, |u| u.city = Some("Bergen".into())));
    let (st, _) = e.call("GET", &format!("subscriptions/{id}"), None).await;
    assert_eq!(st, 404);
    let (st, _) = e
        .call(
            "PATCH",
            &format!("subscriptions/{id}"),
            Some(json!({ "expirationDateTime": (Utc::now() + chrono::Duration::seconds(2)).to_rfc3339() })),
        )
        .await;
    assert_eq!(st, 404);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(e.rx.items("/n").len(), 1, "no delivery after expiry");
}

// ---------------------------------------------------------------------------------------------
// Change notifications
// ---------------------------------------------------------------------------------------------

fn assert_user_item(item: &Value, e: &Env, sub_id: &str, uid: &str, change: &str) {
    let tenant = &e.fx.tenant.tenant_id;
    assert_eq!(item["changeType"], change, "{item}");
    assert_eq!(item["clientState"], STATE);
    assert_eq!(item["resource"], format!("Users/{uid}"));
    assert_eq!(item["subscriptionId"], sub_id);
    assert_eq!(item["tenantId"], tenant.as_str());
    assert!(chrono::DateTime::parse_from_rfc3339(
        item["subscriptionExpirationDateTime"].as_str().unwrap()
    )
    .is_ok());
    assert_eq!(
        item["resourceData"],
        json!({
            "@odata.type": "#Microsoft.Graph.User",
            "@odata.id": format!("Users/{uid}"),
            "id": uid,
            "organizationId": tenant,
        })
    );
}

#[tokio::test]
async fn user_update_soft_delete_restore_and_hard_delete_notify() {
    let e = env(10).await;
    let all = e.subscribe("/users", "updated,deleted", "/users").await;
    let all_id = all["id"].as_str().unwrap().to_string();
    let uid = e.fx.tenant.users[3].id.clone();
    let one = e
        .subscribe(&format!("/users/{uid}"), "updated", "/one")
        .await;
    let one_id = one["id"].as_str().unwrap().to_string();
    let other = e.fx.tenant.users[4].id.clone();

    assert!(e
        .sim
        .update_user(&uid, |u| u.job_title = Some("CTO".into())));
    wait_until("update", Duration::from_secs(2), || {
        e.rx.items("/users").len() == 1 && e.rx.items("/one").len() == 1
    })
    .await;
    assert_user_item(&e.rx.items("/users")[0], &e, &all_id, &uid, "updated");
    assert_user_item(&e.rx.items("/one")[0], &e, &one_id, &uid, "updated");
    let log = e.sim.delivery_log();
    assert!(log
        .iter()
        .all(|a| a.delivered() && a.attempt == 1 && !a.lifecycle));

    // Another user: only the /users subscription.
    assert!(e.sim.update_user(&other, |u| u.city = Some("Lyon".into())));
    wait_until("other", Duration::from_secs(2), || {
        e.rx.items("/users").len() == 2
    })
    .await;
    assert_user_item(&e.rx.items("/users")[1], &e, &all_id, &other, "updated");

    // Soft delete: updated, and the user is gone from reads and listings.
    assert!(e.sim.soft_delete_user(&uid));
    wait_until("soft delete", Duration::from_secs(2), || {
        e.rx.items("/users").len() == 3
    })
    .await;
    assert_user_item(&e.rx.items("/users")[2], &e, &all_id, &uid, "updated");
    let (st, _) = e.call("GET", &format!("users/{uid}"), None).await;
    assert_eq!(st, 404);
    assert!(!e.sim.transitive_user_ids(&e.fx.all_group_id).contains(&uid));
    let (_, list) = e
        .call(
            "GET",
            &format!("groups/{}/transitiveMembers?$top=999", e.fx.all_group_id),
            None,
        )
        .await;
    assert!(list["value"]
        .as_array()
        .unwrap()
        .iter()
        .all(|m| m["id"] != uid.as_str()));

    // Restore: updated, memberships back.
    assert!(e.sim.restore_user(&uid));
    assert!(!e.sim.restore_user(&uid));
    wait_until("restore", Duration::from_secs(2), || {
        e.rx.items("/users").len() == 4
    })
    .await;
    assert_user_item(&e.rx.items("/users")[3], &e, &all_id, &uid, "updated");
    assert!(e.sim.transitive_user_ids(&e.fx.all_group_id).contains(&uid));
    let (st, _) = e.call("GET", &format!("users/{uid}"), None).await;
    assert_eq!(st, 200);

    // Hard delete: deleted (the /one subscription only wants updated).
    assert!(e.sim.delete_user(&uid));
    wait_until("hard delete", Duration::from_secs(2), || {
        e.rx.items("/users").len() == 5
    })
    .await;
    assert_user_item(&e.rx.items("/users")[4], &e, &all_id, &uid, "deleted");
    tokio::time::sleep(Duration::from_millis(100)).await;
    // update, soft delete, restore; not the hard delete.
    assert_eq!(e.rx.items("/one").len(), 3);
    assert_eq!(e.sim.notify_stats().queued, 8);
}

#[tokio::test]
async fn membership_change_notifies_group_subscriptions_in_one_batch() {
    let e = env(10).await;
    let gid = e.fx.all_group_id.clone();
    let s_members = e
        .subscribe(&format!("/groups/{gid}/members"), "updated", "/g")
        .await;
    let s_group = e
        .subscribe(&format!("/groups/{gid}"), "updated", "/g")
        .await;
    let s_all = e.subscribe("/groups", "updated,deleted", "/g").await;
    let s_users = e.subscribe("/users", "updated,deleted", "/u").await;
    let newcomer = SimUser {
        id: "aaaaaaaa-0000-4000-8000-000000000001".into(),
        user_principal_name: "new.person@contoso-sim.onmicrosoft.com".into(),
        account_enabled: true,
        ..SimUser::default()
    };
    e.sim.upsert_user(newcomer.clone());
    wait_until("user created", Duration::from_secs(2), || {
        e.rx.items("/u").len() == 1
    })
    .await;
    assert_user_item(
        &e.rx.items("/u")[0],
        &e,
        s_users["id"].as_str().unwrap(),
        &newcomer.id,
        "updated",
    );

    e.sim.add_member(&gid, &newcomer.id);
    wait_until("membership", Duration::from_secs(2), || {
        e.rx.items("/g").len() == 3
    })
    .await;
    let posts = e.rx.posts("/g");
    assert_eq!(posts.len(), 1, "three items batched into one POST");
    let items = e.rx.items("/g");
    let ids: HashSet<&str> = items
        .iter()
        .map(|i| i["subscriptionId"].as_str().unwrap())
        .collect();
    let want: HashSet<&str> = [&s_members, &s_group, &s_all]
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, want);
    for item in &items {
        assert_eq!(item["changeType"], "updated");
        assert_eq!(item["resource"], format!("Groups/{gid}"));
        assert_eq!(item["clientState"], STATE);
        assert_eq!(item["tenantId"], e.fx.tenant.tenant_id.as_str());
        let rd = &item["resourceData"];
        assert_eq!(rd["@odata.type"], "#Microsoft.Graph.Group");
        assert_eq!(rd["@odata.id"], format!("Groups/{gid}"));
        assert_eq!(rd["id"], gid.as_str());
        assert_eq!(rd["organizationId"], e.fx.tenant.tenant_id.as_str());
        if item["subscriptionId"] == s_all["id"] {
            assert_eq!(rd["members@delta"], json!([{ "id": newcomer.id }]));
        } else {
            assert!(rd.get("members@delta").is_none());
        }
    }

    // Removing, and hard-deleting a member, notify too.
    e.sim.remove_member(&gid, &newcomer.id);
    wait_until("removal", Duration::from_secs(2), || {
        e.rx.items("/g").len() == 6
    })
    .await;
    let member = e.sim.group(&gid).unwrap().members[0].clone();
    assert!(e.sim.delete_user(&member));
    wait_until("member deleted", Duration::from_secs(2), || {
        e.rx.items("/g").len() == 9
    })
    .await;
    let last = &e.rx.items("/g")[8];
    assert_eq!(last["resource"], format!("Groups/{gid}"));
    // An unrelated group's change does not reach the per-group subscriptions.
    let nested = e.fx.nested_group_id.clone();
    e.sim.add_member(&nested, &e.fx.ceo_id);
    wait_until("nested", Duration::from_secs(2), || {
        e.rx.items("/g").len() == 10
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let items = e.rx.items("/g");
    assert_eq!(items.len(), 10);
    assert_eq!(items[9]["subscriptionId"], s_all["id"]);
    assert_eq!(items[9]["resource"], format!("Groups/{nested}"));
}

#[tokio::test]
async fn failed_delivery_is_retried_with_backoff() {
    let e = env(5).await;
    e.subscribe("/users", "updated", "/n").await;
    e.rx.script_notify("/n", &[Act::Status(500), Act::Status(503)]);
    let uid = e.fx.ceo_id.clone();
    e.sim.update_user(&uid, |u| u.city = Some("Rome".into()));
    wait_until("third attempt", Duration::from_secs(3), || {
        e.sim.delivery_log().len() == 3
    })
    .await;
    let log = e.sim.delivery_log();
    assert_eq!(log[0].status, Some(500));
    assert_eq!(log[1].status, Some(503));
    assert_eq!(log[2].status, Some(202));
    assert_eq!(
        log.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(log
        .iter()
        .all(|a| a.notifications == 1 && a.url == e.rx.url("/n")));
    // Exponential backoff: 200 ms, then 400 ms.
    let gap1 = (log[1].at - log[0].at).num_milliseconds();
    let gap2 = (log[2].at - log[1].at).num_milliseconds();
    assert!((180..600).contains(&gap1), "{gap1}");
    assert!(gap2 >= 380 && gap2 > gap1, "{gap2}");
    let posts = e.rx.posts("/n");
    assert_eq!(posts.len(), 3);
    assert_eq!(posts[0], posts[2], "same payload on retry");
    assert_eq!(e.sim.notify_stats().delivered_batches, 1);
}

#[tokio::test]
async fn slow_answer_counts_as_failure_and_is_retried() {
    let e = env(5).await;
    e.subscribe("/users", "updated", "/n").await;
    e.rx.script_notify("/n", &[Act::SlowMs(3400)]);
    e.sim
        .update_user(&e.fx.ceo_id, |u| u.city = Some("Rome".into()));
    wait_until("retry", Duration::from_millis(4700), || {
        e.sim.delivery_log().len() == 2
    })
    .await;
    let log = e.sim.delivery_log();
    assert_eq!(log[0].status, None);
    assert!(log[0].error.as_deref().unwrap().contains("timed out"));
    assert_eq!(log[1].status, Some(202));
    assert_eq!(log[1].attempt, 2);
}

#[tokio::test]
async fn give_up_after_retry_period() {
    let e = env(5).await;
    e.sim
        .set_delivery_retry(Duration::from_millis(50), Duration::from_millis(300));
    e.subscribe("/users", "updated", "/n").await;
    e.rx.script_notify("/n", &[Act::Status(500); 20]);
    e.sim
        .update_user(&e.fx.ceo_id, |u| u.city = Some("Rome".into()));
    wait_until("abandon", Duration::from_secs(3), || {
        e.sim.notify_stats().abandoned_batches == 1
    })
    .await;
    let n = e.sim.delivery_log().len();
    // 50, 100 -> next would be 200 after ~150+ ms elapsed (>300 ms total): 3 or 4 attempts.
    assert!((3..=4).contains(&n), "{n}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(e.sim.delivery_log().len(), n);
}

#[tokio::test]
async fn drop_and_duplicate_faults() {
    let e = env(10).await;
    e.subscribe("/users", "updated", "/n").await;
    e.sim.set_notify_faults(NotifyFaults {
        drop_rate: 1.0,
        ..NotifyFaults::default()
    });
    for u in &e.fx.tenant.users[..3] {
        e.sim.update_user(&u.id, |u| u.city = Some("X".into()));
    }
    wait_until("drops", Duration::from_secs(2), || {
        e.sim.notify_stats().dropped == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(e.rx.items("/n").is_empty());
    assert!(e.sim.delivery_log().is_empty());

    e.sim.set_notify_faults(NotifyFaults {
        duplicate_rate: 1.0,
        reorder: true,
        seed: 3,
        ..NotifyFaults::default()
    });
    for u in &e.fx.tenant.users[..3] {
        e.sim.update_user(&u.id, |u| u.city = Some("Y".into()));
    }
    wait_until("duplicates", Duration::from_secs(2), || {
        e.rx.items("/n").len() == 6
    })
    .await;
    let mut per_user: HashMap<String, usize> = HashMap::new();
    for i in e.rx.items("/n") {
        *per_user
            .entry(i["resourceData"]["id"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_user.len(), 3);
    assert!(per_user.values().all(|&c| c == 2));
    assert_eq!(e.sim.notify_stats().duplicated, 3);

    // Delay and pause.
    e.rx.clear();
    e.sim.set_notify_faults(NotifyFaults {
        delay_ms: 400,
        ..NotifyFaults::default()
    });
    let t0 = Instant::now();
    e.sim
        .update_user(&e.fx.ceo_id, |u| u.city = Some("Z".into()));
    wait_until("delayed", Duration::from_secs(2), || {
        e.rx.items("/n").len() == 1
    })
    .await;
    assert!(t0.elapsed() >= Duration::from_millis(400));
    e.sim.set_notify_faults(NotifyFaults::default());
    e.sim.pause_delivery(true);
    e.sim
        .update_user(&e.fx.ceo_id, |u| u.city = Some("W".into()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(e.rx.items("/n").len(), 1);
    e.sim.pause_delivery(false);
    wait_until("resumed", Duration::from_secs(2), || {
        e.rx.items("/n").len() == 2
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Lifecycle notifications and validation tokens
// ---------------------------------------------------------------------------------------------

#[derive(serde::Deserialize, Debug)]
struct TokenClaims {
    aud: String,
    iss: String,
    ver: String,
    appid: String,
    tid: String,
    iat: i64,
    nbf: i64,
    exp: i64,
}

async fn jwks_key(e: &Env) -> jsonwebtoken::DecodingKey {
    let conf: Value = e
        .http
        .get(format!(
            "{}/common/v2.0/.well-known/openid-configuration",
            e.sim.login_url()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(conf["jwks_uri"], e.sim.jwks_url());
    let jwks: Value = e
        .http
        .get(conf["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let k = &jwks["keys"][0];
    assert_eq!(k["kty"], "RSA");
    assert_eq!(k["use"], "sig");
    assert_eq!(k["kid"], rostersync_sim::keys::SIGNING_KID);
    jsonwebtoken::DecodingKey::from_rsa_components(
        k["n"].as_str().unwrap(),
        k["e"].as_str().unwrap(),
    )
    .unwrap()
}

fn verify(
    e: &Env,
    key: &jsonwebtoken::DecodingKey,
    token: &str,
) -> Result<TokenClaims, jsonwebtoken::errors::Error> {
    let header = jsonwebtoken::decode_header(token)?;
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    assert_eq!(
        header.kid.as_deref(),
        Some(rostersync_sim::keys::SIGNING_KID)
    );
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.set_audience(&[e.fx.tenant.client_id.as_str()]);
    v.set_issuer(&[format!(
        "https://sts.windows.net/{}/",
        e.fx.tenant.tenant_id
    )]);
    v.leeway = 0;
    jsonwebtoken::decode::<TokenClaims>(token, key, &v).map(|d| d.claims)
}

#[tokio::test]
async fn lifecycle_notification_shape_and_token_claims() {
    let e = env(5).await;
    let mut body = e.sub_body("/groups", "updated", "/n", 120);
    body["lifecycleNotificationUrl"] = json!(e.rx.url("/lc"));
    let (st, sub) = e.call("POST", "subscriptions", Some(body)).await;
    assert_eq!(st, 201);
    let id = sub["id"].as_str().unwrap().to_string();
    assert!(e
        .sim
        .send_lifecycle(&id, LifecycleEvent::ReauthorizationRequired));
    assert!(!e.sim.send_lifecycle("nope", LifecycleEvent::Missed));
    wait_until("lifecycle", Duration::from_secs(2), || {
        e.rx.posts("/lc").len() == 1
    })
    .await;
    let post = &e.rx.posts("/lc")[0];
    let item = &post["value"][0];
    assert_eq!(item["lifecycleEvent"], "reauthorizationRequired");
    assert_eq!(item["subscriptionId"], id.as_str());
    assert_eq!(item["resource"], "");
    assert_eq!(item["clientState"], STATE);
    assert_eq!(item["organizationId"], e.fx.tenant.tenant_id.as_str());
    assert!(item.get("changeType").is_none());
    assert_eq!(
        item["resourceData"]["@odata.type"],
        "#microsoft.graph.subscription"
    );
    assert_eq!(
        item["resourceData"]["@odata.id"],
        format!("subscriptions/{id}")
    );
    assert!(chrono::DateTime::parse_from_rfc3339(
        item["subscriptionExpirationDateTime"].as_str().unwrap()
    )
    .is_ok());
    let tokens = post["validationTokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 1);

    let key = jwks_key(&e).await;
    let c = verify(&e, &key, tokens[0].as_str().unwrap()).expect("genuine token verifies");
    assert_eq!(c.aud, e.fx.tenant.client_id);
    assert_eq!(
        c.iss,
        format!("https://sts.windows.net/{}/", e.fx.tenant.tenant_id)
    );
    assert_eq!(c.ver, "1.0");
    assert_eq!(c.appid, CHANGE_TRACKING_APP_ID);
    assert_eq!(c.tid, e.fx.tenant.tenant_id);
    assert_eq!(c.exp - c.iat, 24 * 3600);
    assert_eq!(c.nbf, c.iat);
    assert!((c.iat - Utc::now().timestamp()).abs() < 10);
    assert!(e
        .sim
        .delivery_log()
        .iter()
        .any(|a| a.lifecycle && a.delivered()));

    // Other events reach the lifecycle URL too; change notifications carry no tokens by default.
    assert!(e
        .sim
        .send_lifecycle(&id, LifecycleEvent::SubscriptionRemoved));
    assert!(e.sim.send_lifecycle(&id, LifecycleEvent::Missed));
    e.sim.add_member(&e.fx.all_group_id, &e.fx.ceo_id);
    wait_until("more", Duration::from_secs(2), || {
        e.rx.posts("/lc").len() == 3 && e.rx.posts("/n").len() == 1
    })
    .await;
    let events: HashSet<String> =
        e.rx.items("/lc")
            .iter()
            .map(|i| i["lifecycleEvent"].as_str().unwrap().to_string())
            .collect();
    assert!(events.contains("subscriptionRemoved") && events.contains("missed"));
    assert!(e.rx.posts("/n")[0].get("validationTokens").is_none());

    e.sim.set_validation_tokens_on_changes(true);
    e.sim.remove_member(&e.fx.all_group_id, &e.fx.ceo_id);
    wait_until("tokens on changes", Duration::from_secs(2), || {
        e.rx.posts("/n").len() == 2
    })
    .await;
    let t = e.rx.posts("/n")[1]["validationTokens"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(verify(&e, &key, &t).is_ok());
}

#[tokio::test]
async fn forged_tokens_fail_verification() {
    let e = env(5).await;
    let key = jwks_key(&e).await;
    assert!(verify(&e, &key, &e.sim.validation_token()).is_ok());

    e.sim.set_token_forgery(TokenForgery::WrongKey);
    let err = verify(&e, &key, &e.sim.validation_token()).unwrap_err();
    assert_eq!(
        *err.kind(),
        jsonwebtoken::errors::ErrorKind::InvalidSignature
    );

    e.sim.set_token_forgery(TokenForgery::Expired);
    let err = verify(&e, &key, &e.sim.validation_token()).unwrap_err();
    assert_eq!(
        *err.kind(),
        jsonwebtoken::errors::ErrorKind::ExpiredSignature
    );

    e.sim.set_token_forgery(TokenForgery::WrongAppId);
    let c = verify(&e, &key, &e.sim.validation_token()).unwrap();
    assert_ne!(c.appid, CHANGE_TRACKING_APP_ID);

    // Forged tokens also go out on lifecycle notifications.
    e.sim.set_token_forgery(TokenForgery::WrongKey);
    let mut body = e.sub_body("/users", "updated", "/n", 120);
    body["lifecycleNotificationUrl"] = json!(e.rx.url("/lc"));
    let (_, sub) = e.call("POST", "subscriptions", Some(body)).await;
    let id = sub["id"].as_str().unwrap();
    assert!(e
        .sim
        .send_lifecycle(id, LifecycleEvent::ReauthorizationRequired));
    wait_until("lifecycle", Duration::from_secs(2), || {
        e.rx.posts("/lc").len() == 1
    })
    .await;
    let t = e.rx.posts("/lc")[0]["validationTokens"][0]
        .as_str()
        .unwrap()
        .to_string();
    assert!(verify(&e, &key, &t).is_err());
}

#[tokio::test]
async fn auto_reauthorization_before_expiry() {
    let e = env(5).await;
    e.sim
        .set_auto_reauthorization(Some(Duration::from_secs(46 * 60)));
    let mut body = e.sub_body("/users", "updated", "/n", 50);
    body["lifecycleNotificationUrl"] = json!(e.rx.url("/lc"));
    let (st, _) = e.call("POST", "subscriptions", Some(body)).await;
    assert_eq!(st, 201);
    // 50 min > 46 min lead: nothing yet.
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(e.rx.posts("/lc").is_empty());
    e.sim
        .set_auto_reauthorization(Some(Duration::from_secs(51 * 60)));
    wait_until("auto reauth", Duration::from_secs(2), || {
        e.rx.posts("/lc").len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(e.rx.posts("/lc").len(), 1, "sent once per renewal");
    assert_eq!(
        e.rx.items("/lc")[0]["lifecycleEvent"],
        "reauthorizationRequired"
    );
}

// ---------------------------------------------------------------------------------------------
// Group delta
// ---------------------------------------------------------------------------------------------

/// Follows nextLinks; returns (pages, deltaLink).
async fn delta_round(e: &Env, first: &str) -> (Vec<Value>, String) {
    let mut url = first.to_string();
    let mut pages = Vec::new();
    loop {
        let (st, _, body) = e.get_full(&url).await;
        assert_eq!(st, 200, "{body}");
        let next = body.get("@odata.nextLink").and_then(Value::as_str);
        let delta = body.get("@odata.deltaLink").and_then(Value::as_str);
        assert!(
            next.is_some() != delta.is_some(),
            "exactly one link: {body}"
        );
        pages.push(body.clone());
        if let Some(n) = next {
            assert!(n.contains("$skiptoken="));
            url = n.to_string();
        } else {
            let d = delta.unwrap().to_string();
            assert!(d.contains("$deltatoken="));
            return (pages, d);
        }
    }
}

/// members@delta entries of `gid` over all pages: (id, type, removed).
fn entries(pages: &[Value], gid: &str) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for p in pages {
        for g in p["value"].as_array().unwrap() {
            if g["id"] != gid {
                continue;
            }
            for m in g["members@delta"].as_array().into_iter().flatten() {
                out.push((
                    m["id"].as_str().unwrap().to_string(),
                    m["@odata.type"].as_str().unwrap().to_string(),
                    m.get("@removed").is_some(),
                ));
                if let Some(r) = m.get("@removed") {
                    assert_eq!(r, &json!({ "reason": "deleted" }));
                }
            }
        }
    }
    out
}

fn delta_url(e: &Env, gid: &str) -> String {
    format!(
        "{}/v1.0/groups/delta?$filter=id eq '{gid}'&$select=id,displayName,members",
        e.sim.graph_url()
    )
}

#[tokio::test]
async fn delta_initial_round_pages_and_nested_groups() {
    let e = env(45).await;
    e.sim.set_delta_page_size(10);
    let gid = e.fx.all_group_id.clone();
    let (pages, _) = delta_round(&e, &delta_url(&e, &gid)).await;
    let direct = e.sim.group(&gid).unwrap().members;
    assert!(direct.len() > 30, "{}", direct.len());
    assert_eq!(pages.len(), direct.len().div_ceil(10));
    for p in &pages {
        let objs = p["value"].as_array().unwrap();
        assert_eq!(objs.len(), 1, "one object per page here");
        assert_eq!(objs[0]["id"], gid.as_str());
        assert_eq!(objs[0]["displayName"], "All Employees");
        assert!(objs[0]["members@delta"].as_array().unwrap().len() <= 10);
    }
    let got = entries(&pages, &gid);
    assert_eq!(got.len(), direct.len());
    let ids: Vec<&str> = got.iter().map(|(i, _, _)| i.as_str()).collect();
    let want: Vec<&str> = direct.iter().map(String::as_str).collect();
    assert_eq!(
        ids.iter().collect::<HashSet<_>>(),
        want.iter().collect::<HashSet<_>>()
    );
    assert!(got.iter().all(|(_, _, removed)| !removed));
    let nested: Vec<_> = got
        .iter()
        .filter(|(_, t, _)| t == "#microsoft.graph.group")
        .collect();
    assert_eq!(nested.len(), 1);
    assert_eq!(nested[0].0, e.fx.nested_group_id);
    assert!(got
        .iter()
        .filter(|(i, _, _)| *i != e.fx.nested_group_id)
        .all(|(_, t, _)| t == "#microsoft.graph.user"));
    // Delta is not transitive: contractors are not listed for All Employees.
    let contractors = e.sim.group(&e.fx.nested_group_id).unwrap().members;
    assert!(contractors.iter().any(|c| !ids.contains(&c.as_str())));

    // Several ids OR-ed, and no filter at all: both groups.
    let both = format!(
        "{}/v1.0/groups/delta?$filter=id eq '{gid}' or id eq '{}'&$select=id,members",
        e.sim.graph_url(),
        e.fx.nested_group_id
    );
    let (pages, _) = delta_round(&e, &both).await;
    assert!(!entries(&pages, &e.fx.nested_group_id).is_empty());
    assert!(pages[0]["value"][0].get("displayName").is_none());
    let all = format!("{}/v1.0/groups/delta?$select=members", e.sim.graph_url());
    let (pages, _) = delta_round(&e, &all).await;
    assert_eq!(entries(&pages, &gid).len(), direct.len());
    // Without members in $select there is no members@delta.
    let plain = format!(
        "{}/v1.0/groups/delta?$filter=id eq '{gid}'&$select=id,displayName",
        e.sim.graph_url()
    );
    let (pages, _) = delta_round(&e, &plain).await;
    assert_eq!(pages.len(), 1);
    assert!(pages[0]["value"][0].get("members@delta").is_none());
    assert!(e.sim.request_count("delta") >= 8);
}

#[tokio::test]
async fn delta_incremental_rounds() {
    let e = env(20).await;
    let gid = e.fx.all_group_id.clone();
    let (_, link) = delta_round(&e, &delta_url(&e, &gid)).await;

    // Empty round.
    let (pages, link2) = delta_round(&e, &link).await;
    assert_eq!(pages.len(), 1);
    assert_eq!(pages[0]["value"], json!([]));
    assert_ne!(link2, link);

    let members = e.sim.group(&gid).unwrap().members;
    let (a, b, c) = (members[1].clone(), members[2].clone(), members[3].clone());
    e.sim.add_member(&gid, &e.fx.ceo_id);
    e.sim.remove_member(&gid, &a);
    assert!(e.sim.delete_user(&b));
    assert!(e.sim.soft_delete_user(&c));
    let (pages, link3) = delta_round(&e, &link2).await;
    let mut got = entries(&pages, &gid);
    got.sort();
    let mut want = vec![
        (
            e.fx.ceo_id.clone(),
            "#microsoft.graph.user".to_string(),
            false,
        ),
        (a.clone(), "#microsoft.graph.user".to_string(), true),
        (b.clone(), "#microsoft.graph.user".to_string(), true),
    ];
    want.sort();
    assert_eq!(got, want, "soft-deleted {c} is not reported");
    assert_eq!(pages[0]["value"][0]["displayName"], "All Employees");

    // Unrelated changes: the filtered group is omitted.
    e.sim.add_member(&e.fx.nested_group_id, &e.fx.ceo_id);
    let (pages, link4) = delta_round(&e, &link3).await;
    assert_eq!(pages[0]["value"], json!([]));

    // Replaying an older link returns its changes again.
    let (pages, _) = delta_round(&e, &link2).await;
    assert_eq!(entries(&pages, &gid).len(), 3);

    // latest: no data, a link for "now".
    let latest = format!("{}&$deltatoken=latest", delta_url(&e, &gid));
    let (st, _, body) = e.get_full(&latest).await;
    assert_eq!(st, 200);
    assert_eq!(body["value"], json!([]));
    assert!(body.get("@odata.nextLink").is_none());
    let from_now = body["@odata.deltaLink"].as_str().unwrap().to_string();
    e.sim.remove_member(&gid, &e.fx.ceo_id);
    let (pages, _) = delta_round(&e, &from_now).await;
    assert_eq!(
        entries(&pages, &gid),
        vec![(
            e.fx.ceo_id.clone(),
            "#microsoft.graph.user".to_string(),
            true
        )]
    );
    let (pages, _) = delta_round(&e, &link4).await;
    assert_eq!(entries(&pages, &gid).len(), 1);
}

#[tokio::test]
async fn delta_tokens_expire_with_410_and_bad_queries_are_400() {
    let e = env(30).await;
    e.sim.set_delta_page_size(5);
    let gid = e.fx.all_group_id.clone();
    let (st, _, first) = e.get_full(&delta_url(&e, &gid)).await;
    assert_eq!(st, 200);
    let next = first["@odata.nextLink"].as_str().unwrap().to_string();
    let (_, link) = delta_round(&e, &delta_url(&e, &gid)).await;

    e.sim.expire_delta_tokens();
    for url in [&link, &next] {
        let (st, headers, body) = e.get_full(url).await;
        assert_eq!(st, 410, "{body}");
        assert!(body["error"]["code"].is_string());
        let loc = headers["location"].to_str().unwrap().to_string();
        assert!(loc.ends_with("$deltatoken="), "{loc}");
        assert!(
            loc.contains("$filter=") && loc.contains("$select="),
            "{loc}"
        );
        // Following the Location starts a full round again.
        let (pages, _) = delta_round(&e, &loc).await;
        assert_eq!(
            entries(&pages, &gid).len(),
            e.sim.group(&gid).unwrap().members.len()
        );
    }

    let base = format!("{}/v1.0/groups/delta", e.sim.graph_url());
    let (st, _, body) = e.get_full(&format!("{base}?$deltatoken=garbage")).await;
    assert_eq!(st, 400);
    assert_eq!(err_code(&body), "syncStateNotFound");
    let (st, _, _) = e.get_full(&format!("{base}?$skiptoken=garbage")).await;
    assert_eq!(st, 400);
    for bad in [
        "$expand=members",
        "$top=5",
        "$orderby=displayName",
        "$select=id,nope",
        "$filter=displayName eq 'x'",
        "$select=members&$select=id",
    ] {
        let (st, _, body) = e.get_full(&format!("{base}?{bad}")).await;
        assert_eq!(st, 400, "{bad}: {body}");
        assert!(body["error"]["innerError"]["request-id"].is_string());
    }
    let many: Vec<String> = (0..51).map(|i| format!("id eq 'g{i}'")).collect();
    let (st, _, _) = e
        .get_full(&format!(
            "{base}?$filter={}&$select=members",
            many.join(" or ")
        ))
        .await;
    assert_eq!(st, 400);
    let resp = e
        .http
        .get(format!("{base}?$select=members"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn forgotten_delta_tokens_are_400_sync_state_not_found() {
    let e = env(30).await;
    e.sim.set_delta_page_size(5);
    let gid = e.fx.all_group_id.clone();
    let (_, first) = e.call("GET", &delta_url(&e, &gid), None).await;
    let next = first["@odata.nextLink"].as_str().unwrap().to_string();
    let (_, link) = delta_round(&e, &delta_url(&e, &gid)).await;
    e.sim.forget_delta_tokens();
    let (st, _, body) = e.get_full(&link).await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(err_code(&body), "syncStateNotFound");
    let (st, _, body) = e.get_full(&next).await;
    assert_eq!(st, 400, "{body}");
    // A new initial round works, and its link does.
    let (pages, link) = delta_round(&e, &delta_url(&e, &gid)).await;
    assert_eq!(
        entries(&pages, &gid).len(),
        e.sim.group(&gid).unwrap().members.len()
    );
    let (st, _, _) = e.get_full(&link).await;
    assert_eq!(st, 200);
}

/// `notifications_unsettled` counts what is queued (delayed, paused) and what is being
/// delivered or retried; it is 0 once everything was delivered or given up.
#[tokio::test]
async fn unsettled_notifications_are_queued_or_in_flight() {
    let e = env(5).await;
    e.sim
        .set_delivery_retry(Duration::from_millis(50), Duration::from_millis(400));
    e.subscribe("/users", "updated", "/n").await;
    assert_eq!(e.sim.notifications_unsettled(), 0);
    e.sim.pause_delivery(true);
    e.sim
        .update_user(&e.fx.ceo_id, |u| u.city = Some("Lima".into()));
    e.sim
        .update_user(&e.fx.ceo_id, |u| u.city = Some("Quito".into()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(e.sim.notifications_unsettled(), 2);
    e.rx.script_notify("/n", &[Act::Status(500); 20]);
    e.sim.pause_delivery(false);
    wait_until("the batch in retries", Duration::from_secs(2), || {
        !e.sim.delivery_log().is_empty()
    })
    .await;
    assert_eq!(
        e.sim.notifications_unsettled(),
        1,
        "one batch being retried"
    );
    wait_until("given up", Duration::from_secs(3), || {
        e.sim.notify_stats().abandoned_batches == 1
    })
    .await;
    assert_eq!(e.sim.notifications_unsettled(), 0);
    e.rx.script_notify("/n", &[]);
    e.rx.clear();
    e.sim
        .update_user(&e.fx.ceo_id, |u| u.city = Some("Cusco".into()));
    wait_until("delivered", Duration::from_secs(2), || {
        e.rx.items("/n").len() == 1
    })
    .await;
    wait_until("settled", Duration::from_secs(2), || {
        e.sim.notifications_unsettled() == 0
    })
    .await;
}
