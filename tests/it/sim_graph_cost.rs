//! The Graph simulator's resource-unit model and added latency (`rostersync_sim::graph`,
//! `docs/graph-costs.md`): documented costs on the wire (`x-ms-resource-unit`), the app+tenant
//! token bucket answering 429 with `Retry-After` and the throttle headers, the write quota,
//! `x-ms-throttle-priority: low`, `$batch` requests charged one by one, the counters, and latency
//! that does not serialize requests.

use std::time::{Duration, Instant};

use rostersync_sim::graph::{fixture, CostModel, Fixture, GraphSim, Latency};
use serde_json::{json, Value};

const GRAPH_SCOPE: &str = "https://graph.microsoft.com/.default";

struct Env {
    sim: GraphSim,
    fx: Fixture,
    tok: String,
    http: reqwest::Client,
}

async fn env(n: usize) -> Env {
    let fx = fixture(n, 5);
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
    Env { sim, fx, tok, http }
}

struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("{}/v1.0/{path}", self.sim.graph_url())
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Answer {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            self.url(path)
        };
        let mut req = self
            .http
            .request(method.parse().unwrap(), url)
            .bearer_auth(&self.tok);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            body: resp.json().await.unwrap_or(Value::Null),
        }
    }

    async fn get(&self, path: &str) -> Answer {
        self.send("GET", path, &[], None).await
    }

    fn listing(&self) -> String {
        format!(
            "groups/{}/transitiveMembers/microsoft.graph.user?$select=id,mail,displayName&$top=999",
            self.fx.all_group_id
        )
    }

    fn some_user(&self) -> String {
        self.sim.users()[3].id.clone()
    }
}

fn model(limit: u32) -> CostModel {
    CostModel {
        ru_limit: Some(limit),
        ..Default::default()
    }
}

#[tokio::test]
async fn off_by_default() {
    let e = env(20).await;
    let a = e.get(&e.listing()).await;
    assert_eq!(a.status, 200);
    assert!(a.header("x-ms-resource-unit").is_none());
    assert_eq!(e.sim.cost_stats().ru_total, 0);
}

#[tokio::test]
async fn documented_costs_are_charged_and_reported() {
    let e = env(250).await;
    e.sim.set_cost_model(Some(CostModel::default()));
    let uid = e.some_user();
    let cases: Vec<(String, &str)> = vec![
        (e.listing(), "4"),
        (
            format!("groups/{}/transitiveMembers", e.fx.all_group_id),
            "5",
        ),
        (
            format!("groups/{}/members?$select=id", e.fx.all_group_id),
            "2",
        ),
        (format!("groups/{}/members?$top=5", e.fx.all_group_id), "2"),
        (format!("users/{uid}"), "1"),
        (format!("users/{uid}/manager?$select=id,mail"), "1"),
        (format!("users/{uid}/transitiveMemberOf"), "2"),
        (format!("groups/{}", e.fx.all_group_id), "1"),
        ("users/delta?$select=id,manager".to_string(), "1"),
        ("groups/delta?$select=members".to_string(), "1"),
        // Not found still costs.
        (
            "users/00000000-0000-4000-8000-000000000000".to_string(),
            "1",
        ),
    ];
    for (path, want) in &cases {
        let a = e.get(path).await;
        assert!(a.status == 200 || a.status == 404, "{path}: {}", a.body);
        assert_eq!(a.header("x-ms-resource-unit"), Some(*want), "{path}");
        // Far from the limit: no percentage.
        assert!(a.header("x-ms-throttle-limit-percentage").is_none());
    }
    let a = e
        .send(
            "POST",
            &format!("users/{uid}/checkMemberGroups"),
            &[],
            Some(json!({ "groupIds": [e.fx.all_group_id] })),
        )
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.header("x-ms-resource-unit"), Some("4"));

    // A user delta round: the first page priced with its $select, later pages from the link.
    e.sim.set_user_delta_page_size(100);
    let before = e.sim.cost_stats();
    let mut url = e.url("users/delta?$select=id,manager");
    let mut pages = 0;
    loop {
        let a = e.get(&url).await;
        assert_eq!(a.status, 200);
        pages += 1;
        match a.body.get("@odata.nextLink").and_then(Value::as_str) {
            Some(n) => url = n.to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let d = e.sim.cost_stats().since(&before);
    assert_eq!(d.ru_by_kind.get("userDelta"), Some(&(1 + 2 + 2)));

    let s = e.sim.cost_stats();
    assert_eq!(s.ru_by_kind.get("transitiveMembers"), Some(&9));
    assert_eq!(s.ru_by_kind.get("checkMemberGroups"), Some(&4));
    assert_eq!(s.requests_by_kind.get("user"), Some(&2));
    assert_eq!(
        s.ru_total,
        4 + 5 + 2 + 2 + 1 + 1 + 2 + 1 + 1 + 1 + 1 + 4 + 5,
        "{s:?}"
    );
    assert_eq!(s.throttled, 0);
    assert_eq!(s.write_units, 0);
}

#[tokio::test]
async fn an_empty_bucket_answers_429_with_retry_after_and_the_throttle_headers() {
    let e = env(20).await;
    e.sim.set_cost_model(Some(model(20)));
    let mut shares = Vec::new();
    for i in 0..5 {
        let a = e.get(&e.listing()).await;
        assert_eq!(a.status, 200, "request {i}: {}", a.body);
        assert_eq!(a.header("x-ms-resource-unit"), Some("4"));
        shares.push(
            a.header("x-ms-throttle-limit-percentage")
                .map(str::to_string),
        );
    }
    // 4, 8, 12, 16 of 20 RU in use: the header appears above 80 % only.
    assert_eq!(shares[..4], [None, None, None, None]);
    let last: f64 = shares[4].as_deref().expect("above 80 %").parse().unwrap();
    assert!((0.8..=1.0).contains(&last), "{last}");

    let a = e.get(&e.listing()).await;
    assert_eq!(a.status, 429);
    assert_eq!(a.body["error"]["code"], "TooManyRequests");
    let retry: u64 = a.header("retry-after").unwrap().parse().unwrap();
    // 20 RU per 10 s refill 2 RU a second: 4 RU take about 2 s.
    assert!((1..=3).contains(&retry), "{retry}");
    assert_eq!(
        a.header("x-ms-throttle-scope"),
        Some(
            format!(
                "Tenant_Application/ReadWrite/{}/{}",
                e.fx.tenant.client_id, e.fx.tenant.tenant_id
            )
            .as_str()
        )
    );
    assert_eq!(
        a.header("x-ms-throttle-information"),
        Some("ResourceUnitLimitExceeded")
    );
    assert!(a.header("x-ms-resource-unit").is_none(), "nothing charged");
    let s = e.sim.cost_stats();
    assert_eq!(s.throttled, 1);
    assert_eq!(s.throttled_by_kind.get("transitiveMembers"), Some(&1));
    assert_eq!(s.ru_total, 20);
    assert!(e.sim.request_count("throttled") >= 1);
    // A cheaper request may still fit? Only if the bucket refilled: after a refill it does.
    e.sim.refill_cost_buckets();
    assert_eq!(e.get(&e.listing()).await.status, 200);
}

#[tokio::test]
async fn the_bucket_refills_over_its_window() {
    let e = env(20).await;
    e.sim.set_cost_model(Some(CostModel {
        ru_limit: Some(8),
        window: Duration::from_millis(400),
        ..Default::default()
    }));
    assert_eq!(e.get(&e.listing()).await.status, 200);
    assert_eq!(e.get(&e.listing()).await.status, 200);
    assert_eq!(e.get(&e.listing()).await.status, 429);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(e.get(&e.listing()).await.status, 200);
}

#[tokio::test]
async fn the_tenant_size_sets_the_limit() {
    // 20 users + the CEO: a small tenant, 3,500 RU. A window of an hour refills about 1 RU a
    // second, so the count below is exact within a batch.
    let e = env(20).await;
    e.sim.set_cost_model(Some(CostModel {
        window: Duration::from_secs(3600),
        ..Default::default()
    }));
    let uid = e.some_user();
    let batch = json!({ "requests": (0..20).map(|i| json!({
        "id": format!("{i}"), "method": "GET", "url": format!("/users/{uid}")
    })).collect::<Vec<_>>() });
    let mut batches = 0;
    loop {
        let a = e.send("POST", "$batch", &[], Some(batch.clone())).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("x-ms-resource-unit"), Some("20"));
        batches += 1;
        if a.header("x-ms-throttle-limit-percentage").is_some() {
            break;
        }
        assert!(batches < 200);
    }
    // 2,800 RU is 80 % of 3,500: the header first appears on the batch that passes it.
    assert_eq!(batches, 141);
}

#[tokio::test]
async fn low_priority_requests_are_throttled_first() {
    let e = env(20).await;
    e.sim.set_cost_model(Some(CostModel {
        ru_limit: Some(20),
        low_priority_reserve: 0.5,
        ..Default::default()
    }));
    let low = [("x-ms-throttle-priority", "low")];
    let listing = e.listing();
    assert_eq!(e.send("GET", &listing, &low, None).await.status, 200);
    assert_eq!(e.send("GET", &listing, &low, None).await.status, 200);
    // 12 RU left: a low request may not go below the 10 RU reserve; a normal or high one may.
    assert_eq!(e.send("GET", &listing, &low, None).await.status, 429);
    let high = [("x-ms-throttle-priority", "High")];
    assert_eq!(e.send("GET", &listing, &high, None).await.status, 200);
    assert_eq!(e.get(&listing).await.status, 200);
    // The limit is the same for everyone: high takes the last 4 RU, then it is refused too.
    assert_eq!(e.send("GET", &listing, &high, None).await.status, 200);
    assert_eq!(e.send("GET", &listing, &high, None).await.status, 429);
    let s = e.sim.cost_stats();
    assert_eq!(s.ru_low_priority, 8);
    assert_eq!(s.ru_high_priority, 8);
    assert_eq!(s.ru_total, 20);
    assert_eq!(s.throttled, 2);
}

#[tokio::test]
async fn writes_have_their_own_quota() {
    let e = env(20).await;
    e.sim.set_cost_model(Some(CostModel {
        write_limit: 2,
        ..Default::default()
    }));
    let uid = e.some_user();
    // A write the simulator does not implement is still priced (1 RU, 1 write unit).
    for _ in 0..2 {
        let a = e
            .send(
                "PATCH",
                &format!("users/{uid}"),
                &[],
                Some(json!({"jobTitle": "x"})),
            )
            .await;
        assert_ne!(a.status, 429);
        assert_eq!(a.header("x-ms-resource-unit"), Some("1"));
    }
    let a = e
        .send(
            "PATCH",
            &format!("users/{uid}"),
            &[],
            Some(json!({"jobTitle": "x"})),
        )
        .await;
    assert_eq!(a.status, 429);
    assert_eq!(
        a.header("x-ms-throttle-information"),
        Some("WriteLimitExceeded")
    );
    assert!(a
        .header("x-ms-throttle-scope")
        .unwrap()
        .starts_with("Tenant_Application/Write/"));
    // Reads go on.
    assert_eq!(e.get(&format!("users/{uid}")).await.status, 200);
    assert_eq!(e.sim.cost_stats().write_units, 2);
}

/// With `batch_envelope_header` off, a `$batch` answer says nothing of its cost itself: only
/// each inner answer carries its `x-ms-resource-unit`, as Graph documents the header per
/// request (a client must add them up).
#[tokio::test]
async fn a_batch_envelope_can_leave_its_cost_to_the_inner_answers() {
    let e = env(20).await;
    e.sim.set_cost_model(Some(CostModel {
        ru_limit: Some(100),
        batch_envelope_header: false,
        ..Default::default()
    }));
    let users = e.sim.users();
    let requests: Vec<Value> = (0..3)
        .map(|i| {
            json!({
                "id": format!("{i}"), "method": "GET",
                "url": format!("/users/{}/manager?$select=id", users[i + 1].id)
            })
        })
        .collect();
    let a = e
        .send("POST", "$batch", &[], Some(json!({ "requests": requests })))
        .await;
    assert_eq!(a.status, 200);
    assert!(a.header("x-ms-resource-unit").is_none());
    for r in a.body["responses"].as_array().unwrap() {
        assert_eq!(
            r["headers"]["x-ms-resource-unit"].as_str(),
            Some("1"),
            "{r}"
        );
    }
    assert_eq!(e.sim.cost_stats().ru_total, 3);
}

#[tokio::test]
async fn batch_requests_are_charged_one_by_one() {
    let e = env(20).await;
    e.sim.set_cost_model(Some(model(5)));
    let users = e.sim.users();
    let requests: Vec<Value> = (0..4)
        .map(|i| {
            json!({
                "id": format!("{i}"), "method": "GET",
                "url": format!("/users/{}/manager?$select=id,mail", users[i + 1].id)
            })
        })
        .chain(std::iter::once(json!({
            "id": "4", "method": "GET",
            "url": format!("/groups/{}/members", e.fx.all_group_id)
        })))
        .collect();
    let a = e
        .send("POST", "$batch", &[], Some(json!({ "requests": requests })))
        .await;
    assert_eq!(a.status, 200);
    let responses = a.body["responses"].as_array().unwrap();
    let mut charged = 0;
    for r in responses {
        let unit = r["headers"]["x-ms-resource-unit"].as_str();
        if r["id"] == "4" {
            // 3 RU do not fit in the 1 left.
            assert_eq!(r["status"], 429, "{r}");
            assert!(r["headers"]["Retry-After"].is_string(), "{r}");
            assert!(unit.is_none());
        } else {
            assert!(r["status"] == 200 || r["status"] == 404, "{r}");
            assert_eq!(unit, Some("1"));
            charged += 1;
        }
    }
    assert_eq!(charged, 4);
    // The envelope says what its requests cost, and that the bucket is nearly empty.
    assert_eq!(a.header("x-ms-resource-unit"), Some("4"));
    // 4 of 5 RU in use is 80 %, not above.
    assert!(a.header("x-ms-throttle-limit-percentage").is_none());
    let s = e.sim.cost_stats();
    assert_eq!(s.ru_by_kind.get("manager"), Some(&4));
    assert_eq!(s.requests_by_kind.get("batch"), Some(&1));
    assert_eq!(s.throttled_by_kind.get("members"), Some(&1));
    assert_eq!(s.ru_total, 4);

    // Inner requests inherit the batch's priority unless they carry their own.
    e.sim.set_cost_model(Some(CostModel {
        ru_limit: Some(10),
        low_priority_reserve: 0.5,
        ..Default::default()
    }));
    let reqs = json!({ "requests": [
        { "id": "a", "method": "GET", "url": format!("/users/{}", users[1].id) },
        { "id": "b", "method": "GET", "url": format!("/users/{}", users[2].id),
          "headers": { "x-ms-throttle-priority": "normal" } },
    ]});
    let a = e
        .send(
            "POST",
            "$batch",
            &[("x-ms-throttle-priority", "low")],
            Some(reqs),
        )
        .await;
    assert_eq!(a.status, 200);
    let s = e.sim.cost_stats();
    assert_eq!(s.ru_low_priority, 1);
    assert_eq!(s.ru_total, 2);
}

#[tokio::test]
async fn without_enforcement_everything_is_charged_and_nothing_refused() {
    let e = env(20).await;
    e.sim.set_cost_model(Some(CostModel {
        ru_limit: Some(4),
        enforce: false,
        ..Default::default()
    }));
    let mut last = None;
    for _ in 0..3 {
        let a = e.get(&e.listing()).await;
        assert_eq!(a.status, 200);
        last = a
            .header("x-ms-throttle-limit-percentage")
            .map(str::to_string);
    }
    // Documented range 0.8–1.8: past the limit the header says so, capped.
    assert_eq!(last.as_deref(), Some("1.80"));
    let s = e.sim.cost_stats();
    assert_eq!((s.ru_total, s.throttled), (12, 0));
}

#[tokio::test]
async fn latency_is_added_without_serializing_requests() {
    let e = env(20).await;
    let fixed = Duration::from_millis(300);
    e.sim.set_latency(Some(Latency {
        fixed,
        jitter: Duration::from_millis(50),
        seed: 1,
    }));
    let uid = e.some_user();
    let started = Instant::now();
    let answers = futures::future::join_all((0..10).map(|_| async {
        let t = Instant::now();
        let a = e.get(&format!("users/{uid}")).await;
        (a.status, t.elapsed())
    }))
    .await;
    let total = started.elapsed();
    for (status, took) in &answers {
        assert_eq!(*status, 200);
        assert!(*took >= fixed, "{took:?}");
    }
    // Ten requests one after another would take at least 3 s.
    assert!(total < Duration::from_secs(2), "{total:?}");
    // Off again: answered at once.
    e.sim.set_latency(None);
    let t = Instant::now();
    assert_eq!(e.get(&format!("users/{uid}")).await.status, 200);
    assert!(t.elapsed() < fixed, "{:?}", t.elapsed());
}
