//! `serve` end to end: the real server on 127.0.0.1:0, the Graph simulator creating
//! subscriptions against it and posting notifications, the SCIM simulator as the LMS.

use std::time::{Duration, Instant};

use crate::common::serve::*;
use crate::common::{spawn, EnvOptions, ENTERPRISE};
use rostersync::store::Store;
use rostersync_sim::graph::LifecycleEvent;
use serde_json::{json, Value};

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
    // An integration that does not exist answers as a forged request to one that does (no
    // enumeration of names).
    let r = http
        .post(s.url("/webhooks/graph/nope"))
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    // Still serving. A handshake outside a subscription call of ours is not answered, and
    // the answer is the one an unknown integration gets.
    for name in ["test", "nope"] {
        let r = http
            .post(s.url(&format!(
                "/webhooks/graph/{name}?validationToken=a%20b%2Bc%26d"
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404);
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert_eq!(r.text().await.unwrap(), "not found");
    }
    let r = http.get(s.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = s.env.scim.request_count("PATCH") + s.env.scim.request_count("POST");
    assert_eq!(before, after, "a rejected notification caused LMS writes");
    s.stop().await;
}

/// `/readyz` is about this process taking webhooks: ready as soon as it listens, and still
/// ready while one customer's LMS is down (which its body shows, without a secret), so an
/// orchestrator keeps routing everybody's webhooks to it. The LMS check itself follows the LMS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_is_the_process_and_shows_the_lms() {
    let s = start(10, "").await;
    let http = reqwest::Client::new();
    let ready = || async {
        let r = http.get(s.url("/readyz")).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    let lms_ok = |body: &str| -> Option<bool> {
        let v: Value = serde_json::from_str(body).ok()?;
        v["checks"]
            .as_array()?
            .iter()
            .find(|c| c["check"] == "lms")
            .and_then(|c| c["ok"].as_bool())
    };
    let (st, body) = ready().await;
    assert_eq!(st, 200, "ready once listening: {body}");
    s.env.scim.set_down(true);
    let started = Instant::now();
    let body = loop {
        let (st, body) = ready().await;
        assert_eq!(
            st, 200,
            "an LMS that is down does not make the process unready: {body}"
        );
        if lms_ok(&body) == Some(false) {
            break body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the LMS check never failed: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !body.contains(crate::common::SCIM_TOKEN) && !body.contains(&s.env.fx.tenant.client_secret)
    );
    s.env.scim.set_down(false);
    let started = Instant::now();
    loop {
        let (st, body) = ready().await;
        assert_eq!(st, 200);
        if lms_ok(&body) == Some(true) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the LMS check never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    s.stop().await;
}

/// Duplicated and reordered notifications end in the same state as clean delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicated_and_reordered_notifications_converge() {
    use rostersync_sim::graph::NotifyFaults;
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
    use rostersync_sim::graph::NotifyFaults;
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

/// A store that cannot write answers 503 (Graph retries), queues nothing and says so in
/// `/readyz`; once it can write again the same notification is accepted and applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_failure_answers_503_and_the_retry_is_applied() {
    let s = start(10, "").await;
    let env = &s.env;
    let http = reqwest::Client::new();
    let someone = env.member_ids()[3].clone();
    // Graph's own delivery is held back: the only notification is the one posted here.
    env.graph.pause_delivery(true);
    env.graph
        .update_user(&someone, |u| u.job_title = Some("Storage Survivor".into()));
    let body = user_notification(env, &users_subscription(env), &someone);

    s.store.inject_write_failure(true);
    let r = http
        .post(s.url("/webhooks/graph/test"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(s.integ_store().queue_len(), 0, "a 503 must queue nothing");
    let mut readyz = (0, String::new());
    wait_for("/readyz reports the store", 3_000, || {
        let h = http.get(s.url("/readyz")).send();
        readyz = futures::executor::block_on(async {
            let r = h.await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        });
        readyz.0 == 503 && readyz.1.contains("store")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(title(env, &someone).as_deref(), Some("Storage Survivor"));

    s.store.inject_write_failure(false);
    let r = http
        .post(s.url("/webhooks/graph/test"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    wait_for("the retried notification applied", 2_000, || {
        title(env, &someone).as_deref() == Some("Storage Survivor")
    })
    .await;
    s.stop().await;
}

/// reauthorizationRequired renews (and reconciles, since notifications may have paused);
/// subscriptionRemoved recreates the subscription and reconciles; missed reconciles.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lifecycle_events_are_answered() {
    let s = start(10, "").await;
    let env = &s.env;
    wait_for("first reconcile recorded", 5_000, || s.runs() >= 1).await;
    let runs0 = s.runs();

    // reauthorizationRequired → PATCH with a new expiry, then a reconcile.
    let users = users_subscription(env);
    assert!(env
        .graph
        .send_lifecycle(&users.id, LifecycleEvent::ReauthorizationRequired));
    wait_for("renewed after reauthorizationRequired", 5_000, || {
        env.graph
            .subscriptions()
            .iter()
            .any(|x| x.id == users.id && x.expires_at > users.expires_at)
    })
    .await;
    wait_for("reconcile after reauthorizationRequired", 5_000, || {
        s.runs() > runs0
    })
    .await;
    let runs1 = s.runs();

    // subscriptionRemoved → a new subscription for the same resource, then a reconcile.
    let members = env
        .graph
        .subscriptions()
        .into_iter()
        .find(|x| x.resource.contains(&env.fx.all_group_id))
        .expect("membership subscription");
    assert!(env
        .graph
        .send_lifecycle(&members.id, LifecycleEvent::SubscriptionRemoved));
    wait_for("membership subscription recreated", 5_000, || {
        let subs = env.graph.subscriptions();
        !subs.iter().any(|x| x.id == members.id)
            && subs
                .iter()
                .any(|x| x.resource == members.resource && x.id != members.id)
    })
    .await;
    wait_for("reconcile after subscriptionRemoved", 5_000, || {
        s.runs() > runs1
    })
    .await;
    let recorded: Vec<String> = s
        .integ_store()
        .subscriptions()
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert!(
        !recorded.contains(&members.id),
        "the removed id is forgotten"
    );
    let runs2 = s.runs();

    // missed → a reconcile.
    assert!(env.graph.send_lifecycle(&users.id, LifecycleEvent::Missed));
    wait_for("reconcile after missed", 5_000, || s.runs() > runs2).await;

    // The recreated membership subscription delivers: a hire still arrives.
    env.graph.upsert_user(new_user(7, None));
    env.graph
        .add_member(&env.fx.all_group_id, &new_user(7, None).id);
    let id = new_user(7, None).id;
    wait_for("hire through the recreated subscription", 3_000, || {
        active(env, &id) == Some(true)
    })
    .await;
    s.stop().await;
}

/// With a half-minute maximum lifetime Graph refuses our usual request; rostersync learns the
/// maximum from the 400, asks for it, and renews every subscription before it lapses: the same
/// subscriptions are alive after their first expiry and still deliver. (Graph's real maxima are
/// minutes to days; the mechanism is the same, and half a minute keeps the test short.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn short_subscription_lifetime_is_renewed_before_it_lapses() {
    let s = start_with(10, "", |env| env.graph.set_max_subscription_minutes(0.5)).await;
    let env = &s.env;
    let first = env.graph.subscriptions();
    assert!(first.len() >= 2);
    let now = chrono::Utc::now();
    for x in &first {
        assert!(
            x.expires_at <= now + chrono::Duration::seconds(30),
            "granted lifetime is within Graph's maximum: {}",
            x.expires_at
        );
    }
    let lapse = first.iter().map(|x| x.expires_at).max().unwrap();
    let wait = (lapse - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(3);
    tokio::time::sleep(wait).await;
    let later = env.graph.subscriptions();
    for x in &first {
        let now = later
            .iter()
            .find(|y| y.id == x.id)
            .unwrap_or_else(|| panic!("subscription {} for {} lapsed", x.id, x.resource));
        assert!(now.expires_at > x.expires_at, "{} was renewed", x.resource);
    }
    // Still delivering.
    let someone = env.member_ids()[2].clone();
    env.graph
        .update_user(&someone, |u| u.job_title = Some("Renewed".into()));
    wait_for("change after renewals", 2_000, || {
        title(env, &someone).as_deref() == Some("Renewed")
    })
    .await;
    s.stop().await;
}

/// An item that keeps failing goes to the dead letters with its error and attempts; `queue
/// dead` shows it and `queue replay` (CLI, with serve stopped: one process per store) puts it
/// back, and the next serve applies it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_items_go_to_dead_letters_and_replay_applies_them() {
    let s = start(10, "").await;
    let env = &s.env;
    // An LMS user someone made by hand holds the new hire's userName: creating would take it
    // over, so rostersync refuses, item by item, until it is buried.
    let hire = new_user(9, None);
    env.scim
        .insert_user(json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": hire.user_principal_name,
            "externalId": "made-by-hand",
            "active": true,
        }))
        .expect("insert");
    env.graph.upsert_user(hire.clone());
    env.graph.add_member(&env.fx.all_group_id, &hire.id);
    wait_for("the failing item buried", 8_000, || {
        s.integ_store()
            .dead_letters()
            .map(|d| !d.is_empty())
            .unwrap_or(false)
    })
    .await;
    let dead = s.integ_store().dead_letters().unwrap();
    let (_, item) = dead
        .iter()
        .find(|(_, it)| format!("{:?}", it.hint).contains(&hire.id))
        .expect("the hire's item is the dead letter");
    assert_eq!(item.attempts, 3, "max_attempts");
    assert!(item.last_error.is_some() && item.dead_at.is_some());
    assert!(lms(env, &hire.id).is_none());

    // The conflict is resolved in the LMS; the operator replays with serve stopped.
    let hand = env
        .scim
        .user_by_user_name(&hire.user_principal_name)
        .unwrap();
    assert!(env.scim.delete_user(hand["id"].as_str().unwrap()));
    let config_path = env.dir.path().join("rostersync.toml");
    std::fs::write(&config_path, &env.config_toml).unwrap();
    let Served {
        env,
        store,
        stop,
        task,
        ..
    } = s;
    if let Some(tx) = stop {
        let _ = tx.send(());
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
    drop(store);
    let cli = |args: &[&str]| {
        // serve ran in this process: its last handles (actix workers' app data) may take a
        // moment to drop after it returned, and sled's lock goes with the last one.
        let mut tries = 0;
        let out = loop {
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
                .arg("--config")
                .arg(&config_path)
                .args(args)
                .output()
                .expect("run rostersync");
            tries += 1;
            if tries < 50 && String::from_utf8_lossy(&out.stderr).contains("in use by another") {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            break out;
        };
        (
            out.status.code(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (code, out) = cli(&["queue", "dead"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(&hire.id), "queue dead lists the user: {out}");
    let (code, out) = cli(&["queue", "replay", "--all"]);
    assert_eq!(code, Some(0), "{out}");
    let (_, out) = cli(&["queue", "stats"]);
    assert!(
        !out.contains("queued 0  ") && out.contains("  dead 0  "),
        "{out}"
    );

    // serve again on the same data, on another port (a new public address): the replayed
    // item is applied, and the subscriptions move to the new address.
    let again = launch(env).await;
    let env = &again.env;
    wait_for("replayed item applied", 5_000, || {
        active(env, &hire.id) == Some(true)
    })
    .await;
    let port = again.addr.port().to_string();
    wait_for("subscriptions moved to the new address", 5_000, || {
        let subs = env.graph.subscriptions();
        subs.len() >= 2 && subs.iter().all(|x| x.notification_url.contains(&port))
    })
    .await;
    env.graph
        .update_user(&hire.id, |u| u.job_title = Some("Moved".into()));
    wait_for("a change after the move", 2_000, || {
        title(env, &hire.id).as_deref() == Some("Moved")
    })
    .await;
    wait_for("queue drained", 2_000, || {
        again.integ_store().queue_len() == 0
    })
    .await;
    again.stop().await;
}

/// A notification answered 202 survives SIGKILL right after the answer: the next process
/// applies it. The LMS is down while the first process runs, so only the queue can carry the
/// change across; Graph's own delivery is held back and no reconcile runs at the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notification_acknowledged_before_sigkill_is_applied_after_restart() {
    let env = spawn(EnvOptions {
        users: 10,
        // No scheduled reconcile during the test.
        integration_extra: "schedule = \"0 0 0 1 1 *\"".into(),
        ..Default::default()
    })
    .await;
    let config = env.dir.path().join("rostersync.toml");
    let log = env.dir.path().join("serve.log");
    let write_config = |listen: &str| {
        let text = env.config_toml.replacen(
            "[server]\n",
            &format!("[server]\nlisten = \"{listen}\"\n"),
            1,
        );
        std::fs::write(&config, text).unwrap();
    };
    write_config("127.0.0.1:0");
    let mut first = spawn_serve(&config, &log).await;
    let members = env.member_ids().len();
    wait_logged(
        "subscriptions and the first reconcile",
        20_000,
        &log,
        || env.graph.subscriptions().len() >= 2 && env.scim.user_count() >= members * 9 / 10,
    )
    .await;

    // sled writes its log every 500 ms: after this the first reconcile's dequeue is on disk,
    // so a restart has no reason to reconcile again (which would hide what the queue carries).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let someone = env.member_ids()[4].clone();
    env.graph.pause_delivery(true);
    env.scim.set_down(true);
    env.graph
        .update_user(&someone, |u| u.job_title = Some("Survived SIGKILL".into()));
    let body = user_notification(&env, &users_subscription(&env), &someone);
    let r = reqwest::Client::new()
        .post(format!("http://{}/webhooks/graph/test", first.addr))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    first.proc.start_kill().unwrap(); // SIGKILL
    let status = first.proc.wait().await.unwrap();
    assert!(!status.success(), "killed, not exited: {status:?}");
    env.scim.set_down(false);
    assert_ne!(title(&env, &someone).as_deref(), Some("Survived SIGKILL"));

    // Same port, so the subscriptions Graph holds still point at us.
    write_config(&first.addr.to_string());
    let mut second = spawn_serve(&config, &log).await;
    wait_for(
        "the acknowledged notification applied after restart",
        15_000,
        || title(&env, &someone).as_deref() == Some("Survived SIGKILL"),
    )
    .await;
    second.proc.start_kill().unwrap();
    let _ = second.proc.wait().await;
    // Only the first start's reconcile ever ran: the queue carried the change.
    let store = Store::open(&env.dir.path().join("data")).unwrap();
    let runs = store
        .integration(&env.integration.cfg.name)
        .unwrap()
        .runs::<Value>(100)
        .unwrap();
    assert_eq!(runs.len(), 1, "no reconcile at restart");
}

/// Parses Prometheus text exposition strictly: every sample line must be
/// `name{label="value",...} number`; returns series → value.
fn parse_prometheus(text: &str) -> std::collections::HashMap<String, f64> {
    let mut out = std::collections::HashMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
                && !name.starts_with(|c: char| c.is_ascii_digit()),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            let labels = series[name_end..]
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair
                    .split_once("=\"")
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
                let _ = v;
            }
        }
        out.insert(series.to_string(), value);
    }
    out
}

fn sample(m: &std::collections::HashMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            k.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .sum()
}

/// `/metrics` is Prometheus text and moves when work happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_parse_and_move_with_work() {
    let mut env = spawn(EnvOptions {
        users: 10,
        integration_extra: "client_secret_expires = \"2099-12-31\"".into(),
        ..Default::default()
    })
    .await;
    // A name no other test uses: the recorder is process-wide.
    env.config_toml = env
        .config_toml
        .replace("name = \"test\"", "name = \"metered\"");
    let s = launch(env).await;
    let http = reqwest::Client::new();
    let scrape = || async {
        let r = http.get(s.url("/metrics")).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain"));
        parse_prometheus(&r.text().await.unwrap())
    };
    let i = ("integration", "metered");
    wait_for("first reconcile", 5_000, || s.runs_of("metered") >= 1).await;
    let m = scrape().await;
    assert!(
        sample(
            &m,
            "rostersync_applies_total",
            &[i, ("kind", "create"), ("outcome", "ok")]
        ) >= 8.0
    );
    assert_eq!(
        sample(
            &m,
            "rostersync_reconcile_runs_total",
            &[i, ("outcome", "ok")]
        ),
        1.0
    );
    assert!(
        sample(
            &m,
            "rostersync_reconcile_last_success_timestamp_seconds",
            &[i]
        ) > 1.7e9
    );
    assert!(sample(&m, "rostersync_reconcile_duration_seconds_count", &[i]) >= 1.0);
    assert!(
        sample(
            &m,
            "rostersync_graph_requests_total",
            &[i, ("status", "200")]
        ) >= 1.0
    );
    assert!(
        sample(
            &m,
            "rostersync_target_requests_total",
            &[i, ("status", "201")]
        ) >= 8.0
    );
    let users_sub = sample(
        &m,
        "rostersync_subscription_expiry_seconds",
        &[i, ("resource", "/users")],
    );
    assert!(
        users_sub > 24.0 * 3600.0,
        "subscription expiry: {users_sub}"
    );
    let secret = sample(&m, "rostersync_client_secret_expiry_seconds", &[i]);
    let expected = (chrono::NaiveDate::from_ymd_opt(2099, 12, 31)
        .unwrap()
        .and_hms_opt(23, 59, 59)
        .unwrap()
        .and_utc()
        - chrono::Utc::now())
    .num_seconds() as f64;
    assert!(
        (secret - expected).abs() < 60.0,
        "secret expiry {secret} vs {expected}"
    );
    assert!(m
        .keys()
        .any(|k| k.starts_with("rostersync_queue_depth{") && k.contains("metered")));
    assert!(m
        .keys()
        .any(|k| k.starts_with("rostersync_dead_letters{") && k.contains("metered")));

    // A change in Entra: a notification is received and an update applied.
    let someone = s.env.member_ids()[1].clone();
    s.env
        .graph
        .update_user(&someone, |u| u.job_title = Some("Measured".into()));
    wait_for("the change applied", 2_000, || {
        title(&s.env, &someone).as_deref() == Some("Measured")
    })
    .await;
    // The apply metric is recorded when the LMS has answered, a moment after the LMS shows
    // the change: scrape until it moves (or time out).
    let update = [i, ("kind", "update"), ("outcome", "ok")];
    let before_updates = sample(&m, "rostersync_applies_total", &update);
    let started = Instant::now();
    let m2 = loop {
        let m2 = scrape().await;
        if sample(&m2, "rostersync_applies_total", &update) > before_updates
            || started.elapsed() > Duration::from_secs(3)
        {
            break m2;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        sample(&m2, "rostersync_notifications_received_total", &[i])
            > sample(&m, "rostersync_notifications_received_total", &[i])
    );
    assert!(sample(&m2, "rostersync_applies_total", &update) > before_updates);
    // A forged notification is counted by reason.
    let forged = json!({"value": [{"clientState": "forged", "subscriptionId": "x", "changeType": "updated", "resource": "Users/x"}]});
    let r = http
        .post(s.url("/webhooks/graph/metered"))
        .json(&forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let m3 = scrape().await;
    assert_eq!(
        sample(
            &m3,
            "rostersync_notifications_rejected_total",
            &[i, ("reason", "client_state")]
        ),
        1.0
    );
    s.stop().await;
}

const ADMIN_TOKEN: &str = "status-token-5f0c1d2e3a4b";

/// `/status` needs the admin token (Bearer, or Basic for browsers); its JSON and HTML show
/// a user that failed to sync and a tripped guard, and never a secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn status_requires_the_token_and_shows_failures_and_guard() {
    let mut env = spawn(EnvOptions {
        users: 12,
        integration_extra: "max_deactivations = 1".into(),
        ..Default::default()
    })
    .await;
    env.config_toml = env.config_toml.replacen(
        "[server]\n",
        &format!("[server]\nadmin_token = {{ value = \"{ADMIN_TOKEN}\" }}\nmetrics_require_token = true\n"),
        1,
    );
    // A member whose userName a hand-made LMS user holds: fails in every reconcile.
    let members = env.member_ids();
    let victim = env.graph.user(&members[2]).expect("member");
    env.scim
        .insert_user(json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": victim.user_principal_name,
            "externalId": "made-by-hand",
            "active": true,
        }))
        .unwrap();
    let s = launch(env).await;
    let env = &s.env;
    let http = reqwest::Client::new();

    // Access control.
    let r = http.get(s.url("/status")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    let r = http
        .get(s.url("/status"))
        .bearer_auth("status-token-wrong-guess")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = http.get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401, "metrics_require_token");
    let r = http
        .get(s.url("/metrics"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);

    // Three members leave while Graph's delivery is held; a `missed` lifecycle event then
    // runs a full reconcile, whose guard stops the three deactivations (limit 1).
    wait_for("first reconcile", 5_000, || s.runs() >= 1).await;
    env.graph.pause_delivery(true);
    for m in &members[5..8] {
        env.graph.remove_member(&env.fx.all_group_id, m);
    }
    let sub = users_subscription(env);
    let missed = json!({"value": [{
        "subscriptionId": sub.id, "clientState": sub.client_state.clone().unwrap_or_default(),
        "lifecycleEvent": "missed", "tenantId": env.fx.tenant.tenant_id,
        "subscriptionExpirationDateTime": sub.expires_at.to_rfc3339(),
    }]});
    let r = http
        .post(s.url("/webhooks/lifecycle/test"))
        .json(&missed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    wait_for("the guarded reconcile", 5_000, || s.runs() >= 2).await;

    let r = http
        .get(s.url("/status"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let text = r.text().await.unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    let integ = &doc["integrations"][0];
    assert_eq!(integ["name"], "test");
    let last = &integ["runs"][0];
    assert_eq!(last["outcome"], "guard_tripped", "{last}");
    assert_eq!(last["guard"]["would_deactivate"], 3);
    let failures = last["failures"].as_array().unwrap();
    assert!(
        failures.iter().any(|f| f["entra_id"] == victim.id.as_str()),
        "failed user listed: {failures:?}"
    );
    let warnings = integ["warnings"].to_string();
    assert!(warnings.contains("guard tripped"), "{warnings}");
    assert!(warnings.contains("failed to sync"), "{warnings}");
    assert!(integ["subscriptions"].as_array().unwrap().len() >= 2);

    // The same through HTML, with Basic auth as a browser would send it.
    let r = http
        .get(s.url("/status"))
        .header("accept", "text/html,application/xhtml+xml")
        .basic_auth("admin", Some(ADMIN_TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = r.text().await.unwrap();
    assert!(html.contains("guard tripped"));
    assert!(
        html.contains(&victim.user_principal_name),
        "failed user in HTML"
    );
    assert!(html.contains("Users that failed in the last reconcile"));
    // Each failed user links to why.
    assert!(
        html.contains(&format!(
            "href=\"/status/test/users/{}\"",
            victim.id.replace('-', "%2D")
        )),
        "explain link in HTML"
    );
    let why = |key: String| {
        let http = http.clone();
        let url = s.url(&format!("/status/test/users/{key}"));
        async move {
            let r = http.get(url).bearer_auth(ADMIN_TOKEN).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    let (st, body) = why(victim.user_principal_name.clone()).await;
    assert_eq!(st, 200, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["entra_id"], victim.id.as_str());
    assert_eq!(e["trace"]["outcome"], "failed", "{body}");
    assert_eq!(e["trace"]["plan"]["action"], "create");
    let answer = e["trace"]["answer"]["message"].as_str().unwrap_or_default();
    assert!(
        answer.contains("made-by-hand"),
        "the LMS's answer: {answer}"
    );
    let (st, _) = why("nobody@nowhere.example".into()).await;
    assert_eq!(st, 404);
    let r = http
        .get(s.url(&format!("/status/test/users/{}", victim.id)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);

    // No secret anywhere.
    let (_, why_body) = why(victim.id.clone()).await;
    for body in [&text, &html, &why_body] {
        for secret in [
            ADMIN_TOKEN,
            env.fx.tenant.client_secret.as_str(),
            crate::common::SCIM_TOKEN,
            sub.client_state.as_deref().unwrap_or("-"),
        ] {
            assert!(!body.contains(secret), "a secret leaked into /status");
        }
    }
    s.stop().await;
}

/// SIGTERM while a batch is stuck in LMS retries: serve stops within its grace period instead
/// of waiting minutes, and the unfinished change is applied after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stop_does_not_wait_for_a_stuck_lms_and_loses_nothing() {
    let s = start(10, "").await;
    let someone = s.env.member_ids()[6].clone();
    s.env.scim.set_down(true);
    s.env
        .graph
        .update_user(&someone, |u| u.job_title = Some("Patient".into()));
    // The change is queued and the worker is retrying against the unavailable LMS.
    wait_for("notification queued", 3_000, || {
        s.env.graph.notify_stats().delivered_batches > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let Served {
        env,
        store,
        stop,
        task,
        ..
    } = s;
    let t0 = Instant::now();
    if let Some(tx) = stop {
        let _ = tx.send(());
    }
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("serve stopped within the grace period, not after the LMS retries")
        .expect("serve task");
    assert!(t0.elapsed() < Duration::from_secs(10));
    let queued = store
        .integration(&env.integration.cfg.name)
        .unwrap()
        .queue_len();
    assert!(queued >= 1, "the cut-off item is still queued");
    drop(store);
    env.scim.set_down(false);
    let again = launch(env).await;
    wait_for("the cut-off change applied after restart", 5_000, || {
        title(&again.env, &someone).as_deref() == Some("Patient")
    })
    .await;
    again.stop().await;
}

/// `serve` on every SCIM dialect the simulator reproduces: a title change, a clear, a hire
/// with a manager, a disable and its undoing, and a leaver reach the LMS in whatever form it
/// takes (a clear the LMS cannot take at all stays, with a warning, and fails nobody).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_reach_the_lms_on_every_scim_dialect() {
    for (name, d) in rostersync_sim::scim::SimDialect::all() {
        let env = spawn(EnvOptions {
            users: 16,
            dialect: d.clone(),
            ..Default::default()
        })
        .await;
        let s = launch(env).await;
        let env = &s.env;
        let members: Vec<String> = env
            .member_ids()
            .into_iter()
            .filter(|id| {
                *id != env.fx.ceo_id && env.graph.user(id).is_some_and(|u| u.account_enabled)
            })
            .collect();
        let someone = members[3].clone();
        env.graph
            .update_user(&someone, |u| u.job_title = Some(format!("Dialect {name}")));
        wait_for(&format!("{name}: title change"), 5_000, || {
            title(env, &someone).as_deref() == Some(&format!("Dialect {name}"))
        })
        .await;
        let clearable = !(d.refuse_null && d.refuse_empty && d.no_put);
        env.graph.update_user(&someone, |u| u.job_title = None);
        if clearable {
            // "" is no value (servers that clear with replace "" keep it).
            wait_for(&format!("{name}: title cleared"), 5_000, || {
                title(env, &someone).is_none_or(|t| t.is_empty())
            })
            .await;
        }
        let boss = members[0].clone();
        env.graph.upsert_user(new_user(70, Some(boss.clone())));
        let hire = new_user(70, None).id;
        env.graph.add_member(&env.fx.all_group_id, &hire);
        wait_for(&format!("{name}: hire created"), 5_000, || {
            active(env, &hire) == Some(true)
        })
        .await;
        let boss_lms = lms(env, &boss).expect("boss in the LMS")["id"].clone();
        assert_eq!(
            lms(env, &hire).unwrap()[ENTERPRISE]["manager"]["value"],
            boss_lms,
            "{name}: the hire's manager link"
        );
        env.graph.update_user(&hire, |u| u.account_enabled = false);
        wait_for(&format!("{name}: disabled"), 5_000, || {
            active(env, &hire) == Some(false)
        })
        .await;
        env.graph.update_user(&hire, |u| u.account_enabled = true);
        wait_for(&format!("{name}: re-enabled"), 5_000, || {
            active(env, &hire) == Some(true)
        })
        .await;
        env.graph.remove_member(&env.fx.all_group_id, &hire);
        wait_for(&format!("{name}: left"), 5_000, || {
            active(env, &hire) == Some(false)
        })
        .await;
        let store = s.integ_store();
        assert_eq!(
            store.queue_stats(chrono::Utc::now()).unwrap().dead,
            0,
            "{name}: nothing buried"
        );
        if !clearable {
            assert_eq!(
                title(env, &someone).as_deref(),
                Some(format!("Dialect {name}").as_str()),
                "{name}: the LMS cannot clear it; it stays"
            );
        }
        s.stop().await;
    }
}
