//! `serve` end to end: the real server on 127.0.0.1:0, the Graph simulator creating
//! subscriptions against it and posting notifications, the SCIM simulator as the LMS.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{spawn, EnvOptions, TestEnv, ENTERPRISE};
use rostersync::config::Config;
use rostersync::serve::{serve, ServeOptions};
use rostersync::sim::graph::SimUser;
use rostersync::sync::worker::WorkerSettings;
use serde_json::{json, Value};

struct Served {
    env: TestEnv,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn opts() -> ServeOptions {
    ServeOptions {
        worker: WorkerSettings {
            concurrency: 8,
            max_attempts: 3,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(2),
        },
        health_interval: Duration::from_millis(300),
        renew_interval: Duration::from_secs(1),
        poll_interval: Duration::from_millis(200),
    }
}

async fn start(users: usize, extra: &str) -> Served {
    let env = spawn(EnvOptions {
        users,
        integration_extra: extra.to_string(),
        ..Default::default()
    })
    .await;
    let text = env
        .config_toml
        .replacen("[server]\n", "[server]\nlisten = \"127.0.0.1:0\"\n", 1);
    let config = Config::from_toml(&text, Path::new(".")).expect("config");
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut addr_tx = Some(addr_tx);
        serve(
            config,
            opts(),
            move |a| {
                if let Some(t) = addr_tx.take() {
                    let _ = t.send(a);
                }
            },
            async {
                let _ = stop_rx.await;
            },
        )
        .await
        .expect("serve");
    });
    let addr = tokio::time::timeout(Duration::from_secs(10), addr_rx)
        .await
        .expect("listening in time")
        .expect("address");
    let s = Served {
        env,
        addr,
        stop: Some(stop_tx),
        task,
    };
    // Ready: subscriptions made through the handshake, first reconcile applied.
    let members = s.env.member_ids().len();
    wait_for("subscriptions and the first reconcile", 20_000, || {
        s.env.graph.subscriptions().len() >= 2 && s.env.scim.user_count() >= members * 9 / 10
    })
    .await;
    s
}

impl Served {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }
}

async fn wait_for(what: &str, ms: u64, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(ms) {
        if f() {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out after {ms} ms waiting for {what}");
}

fn lms(env: &TestEnv, id: &str) -> Option<Value> {
    env.scim.user_by_external_id(id)
}

fn active(env: &TestEnv, id: &str) -> Option<bool> {
    lms(env, id).and_then(|u| u.get("active").and_then(|v| v.as_bool()))
}

fn new_user(n: u32, manager: Option<String>) -> SimUser {
    SimUser {
        id: format!("aaaaaaaa-0000-4000-8000-{n:012}"),
        user_principal_name: format!("new.hire{n}@contoso-sim.onmicrosoft.com"),
        mail: Some(format!("new.hire{n}@contoso.example")),
        given_name: Some("New".into()),
        surname: Some(format!("Hire {n}")),
        display_name: Some(format!("New Hire {n}")),
        job_title: Some("Analyst".into()),
        department: Some("Finance".into()),
        account_enabled: true,
        manager_id: manager,
        ..Default::default()
    }
}

/// Every kind of change in Entra reaches the LMS within 2 s of the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_reach_the_lms_within_two_seconds() {
    let s = start(40, "").await;
    let env = &s.env;
    let members = env.member_ids();
    let someone = members[5].clone();

    // Title change.
    env.graph
        .update_user(&someone, |u| u.job_title = Some("Chief Tea Officer".into()));
    wait_for("title change", 2_000, || {
        lms(env, &someone).and_then(|u| u["title"].as_str().map(str::to_string))
            == Some("Chief Tea Officer".into())
    })
    .await;

    // A direct hire, and a hire into the nested group.
    let boss = members[0].clone();
    env.graph.upsert_user(new_user(1, Some(boss.clone())));
    env.graph
        .add_member(&env.fx.all_group_id, &new_user(1, None).id);
    env.graph.upsert_user(new_user(2, None));
    env.graph
        .add_member(&env.fx.nested_group_id, &new_user(2, None).id);
    let (a, b) = (new_user(1, None).id, new_user(2, None).id);
    wait_for("direct hire created", 2_000, || {
        active(env, &a) == Some(true)
    })
    .await;
    wait_for("nested hire created", 2_000, || {
        active(env, &b) == Some(true)
    })
    .await;
    // The direct hire's manager link points at the manager's LMS user.
    let boss_lms = lms(env, &boss).expect("boss in LMS")["id"].clone();
    assert_eq!(
        lms(env, &a).unwrap()[ENTERPRISE]["manager"]["value"],
        boss_lms
    );

    // Disable, then removal, soft delete and restore, hard delete.
    env.graph.update_user(&a, |u| u.account_enabled = false);
    wait_for("disabled user deactivated", 2_000, || {
        active(env, &a) == Some(false)
    })
    .await;
    env.graph.update_user(&a, |u| u.account_enabled = true);
    wait_for("re-enabled user reactivated", 2_000, || {
        active(env, &a) == Some(true)
    })
    .await;

    env.graph.remove_member(&env.fx.nested_group_id, &b);
    wait_for("removed user deactivated", 2_000, || {
        active(env, &b) == Some(false)
    })
    .await;
    env.graph.add_member(&env.fx.nested_group_id, &b);
    wait_for("re-added user reactivated", 2_000, || {
        active(env, &b) == Some(true)
    })
    .await;

    assert!(env.graph.soft_delete_user(&b));
    wait_for("soft-deleted user deactivated", 2_000, || {
        active(env, &b) == Some(false)
    })
    .await;
    assert!(env.graph.restore_user(&b));
    wait_for("restored user reactivated", 2_000, || {
        active(env, &b) == Some(true)
    })
    .await;

    assert!(env.graph.delete_user(&b));
    wait_for("hard-deleted user deactivated", 2_000, || {
        active(env, &b) == Some(false)
    })
    .await;

    // Manager change: the report's manager link follows.
    let other_boss = members[1].clone();
    env.graph
        .update_user(&a, |u| u.manager_id = Some(other_boss.clone()));
    let other_lms = lms(env, &other_boss).expect("in LMS")["id"].clone();
    wait_for("manager change", 2_000, || {
        lms(env, &a).map(|u| u[ENTERPRISE]["manager"]["value"].clone()) == Some(other_lms.clone())
    })
    .await;

    // The manager's own mail changes: Graph says nothing about the reports; they follow.
    let custom = rostersync::config::DEFAULT_CUSTOM_SCHEMA;
    env.graph.update_user(&other_boss, |u| {
        u.mail = Some("renamed.boss@contoso.example".into())
    });
    wait_for("report's manager email follows", 2_000, || {
        lms(env, &a).and_then(|u| u[custom]["managerEmail"].as_str().map(str::to_string))
            == Some("renamed.boss@contoso.example".into())
    })
    .await;
    s.stop().await;
}

/// Forged, malformed and oversized bodies change nothing, and the server keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_requests_are_rejected_and_nothing_is_queued() {
    let s = start(10, "").await;
    let http = reqwest::Client::new();
    let sub = s.env.graph.subscriptions()[0].clone();
    let before = s.env.scim.request_count("PATCH") + s.env.scim.request_count("POST");
    let forged = json!({"value": [{
        "changeType": "updated", "clientState": "not-the-secret",
        "resource": "Users/x", "resourceData": {"id": s.env.member_ids()[0]},
        "subscriptionId": sub.id, "tenantId": s.env.fx.tenant.tenant_id,
    }]});
    let r = http
        .post(s.url("/webhooks/graph/test"))
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Right clientState, unknown subscription id.
    let unknown = json!({"value": [{
        "changeType": "updated", "clientState": sub.client_state.clone().unwrap_or_default(),
        "resource": "Users/x", "subscriptionId": "00000000-0000-0000-0000-000000000000",
    }]});
    let r = http
        .post(s.url("/webhooks/graph/test"))
        .json(&unknown)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = http
        .post(s.url("/webhooks/graph/test"))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = http
        .post(s.url("/webhooks/graph/test"))
        .body(vec![b' '; 2 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    let r = http
        .post(s.url("/webhooks/graph/nope"))
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    // Still serving; the handshake echoes the decoded token as plain text.
    let r = http
        .post(s.url("/webhooks/graph/test?validationToken=a%20b%2Bc%26d"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    assert_eq!(r.text().await.unwrap(), "a b+c&d");
    let r = http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = s.env.scim.request_count("PATCH") + s.env.scim.request_count("POST");
    assert_eq!(before, after, "a rejected notification caused LMS writes");
    s.stop().await;
}

/// `/readyz` is 503 while the LMS is down and 200 again when it is back; its body names the
/// failing check and carries no secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_the_lms() {
    let s = start(10, "").await;
    let http = reqwest::Client::new();
    let ready = || async {
        let r = http.get(s.url("/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let started = Instant::now();
    loop {
        let (st, body) = ready().await;
        if st == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never ready: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.env.scim.set_down(true);
    let started = Instant::now();
    let body = loop {
        let (st, body) = ready().await;
        if st == 503 {
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never unready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(body.contains("\"lms\""), "{body}");
    assert!(!body.contains(common::SCIM_TOKEN) && !body.contains(&s.env.fx.tenant.client_secret));
    s.env.scim.set_down(false);
    let started = Instant::now();
    loop {
        let (st, _) = ready().await;
        if st == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "never ready again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await;
}

/// Duplicated and reordered notifications end in the same state as clean delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicated_and_reordered_notifications_converge() {
    use rostersync::sim::graph::NotifyFaults;
    let s = start(20, "").await;
    let env = &s.env;
    env.graph.set_notify_faults(NotifyFaults {
        duplicate_rate: 1.0,
        reorder: true,
        seed: 3,
        ..Default::default()
    });
    let members = env.member_ids();
    for (i, id) in members.iter().take(6).enumerate() {
        env.graph
            .update_user(id, |u| u.job_title = Some(format!("Title {i}")));
    }
    env.graph.remove_member(&env.fx.all_group_id, &members[7]);
    env.graph.upsert_user(new_user(9, None));
    env.graph
        .add_member(&env.fx.all_group_id, &new_user(9, None).id);
    wait_for("all changes applied", 3_000, || {
        members.iter().take(6).enumerate().all(|(i, id)| {
            lms(env, id).and_then(|u| u["title"].as_str().map(str::to_string))
                == Some(format!("Title {i}"))
        }) && active(env, &members[7]) == Some(false)
            && active(env, &new_user(9, None).id) == Some(true)
    })
    .await;
    assert!(
        env.graph.notify_stats().duplicated > 0,
        "the knob did nothing"
    );
    // Exactly one LMS user per Entra user, whatever was delivered twice.
    let ids: Vec<String> = env
        .scim
        .users()
        .iter()
        .filter_map(|u| u["externalId"].as_str().map(str::to_string))
        .collect();
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(ids.len(), unique.len());
    s.stop().await;
}

/// Notifications Graph never delivered are repaired by the scheduled full reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dropped_notifications_are_repaired_by_the_scheduled_reconcile() {
    use rostersync::sim::graph::NotifyFaults;
    let s = start(20, "schedule = \"*/3 * * * * *\"").await;
    let env = &s.env;
    env.graph.set_notify_faults(NotifyFaults {
        drop_rate: 1.0,
        seed: 5,
        ..Default::default()
    });
    let id = env.member_ids()[3].clone();
    env.graph
        .update_user(&id, |u| u.department = Some("Dropped Dept".into()));
    wait_for("scheduled reconcile repairs the drop", 8_000, || {
        lms(env, &id).and_then(|u| u[ENTERPRISE]["department"].as_str().map(str::to_string))
            == Some("Dropped Dept".into())
    })
    .await;
    assert!(env.graph.notify_stats().dropped > 0, "the knob did nothing");
    s.stop().await;
}
