//! Operating while serving: `rostersync serve` (the binary) holds the data directory, and the
//! operator commands `queue`, `subscriptions`, `explain` and `sync-user` reach it through its
//! admin API with the configured token, printing what they print on the store. A wrong or
//! missing token, or no serve where the config says, is a clear error; no secret is printed.

use std::path::Path;
use std::time::Duration;

use crate::common::serve::*;
use crate::common::{rostersync, spawn, text, EnvOptions, SCIM_TOKEN};
use rostersync::store::queue::{Hint, QueueItem};
use rostersync::store::Store;
use rostersync_sim::graph::FIXTURE_CLIENT_SECRET;
use rostersync_sim::scim::{ScimFaults, UserFault, UserFaultKind};
use serde_json::Value;

const ADMIN_TOKEN: &str = "operator-token-3b9e77a1c2";
const WRONG_TOKEN: &str = "not-the-token-f00dfeed42";

/// The config with `[server]` lines added after the header.
fn with_server(config: &str, lines: &str) -> String {
    config.replacen("[server]\n", &format!("[server]\n{lines}\n"), 1)
}

fn write(dir: &Path, file: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(file);
    std::fs::write(&p, text).unwrap();
    p
}

fn no_secret(out: &str) {
    for s in [ADMIN_TOKEN, WRONG_TOKEN, SCIM_TOKEN, FIXTURE_CLIENT_SECRET] {
        assert!(!out.contains(s), "a secret reached the output: {out}");
    }
}

/// Runs a command, checks that its output holds no secret, returns it.
async fn run(args: &[&str], config: &Path) -> std::process::Output {
    let o = rostersync(args, config).await;
    no_secret(&text(&o));
    o
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_commands_reach_the_running_serve_and_print_what_they_print_on_the_store() {
    let env = spawn(EnvOptions {
        users: 12,
        // No scheduled reconcile during the test.
        integration_extra: "schedule = \"0 0 0 1 1 *\"".into(),
        ..Default::default()
    })
    .await;
    let dir = env.dir.path();
    let members = env.member_ids();
    let (late, synced) = (members[3].clone(), members[5].clone());

    // A dead letter from before this start: a notification the worker gave up on.
    {
        let store = Store::open(&dir.join("data")).unwrap();
        let s = store.integration(&env.integration.cfg.name).unwrap();
        let mut item = QueueItem::new(Hint::User {
            user_id: late.clone(),
            follow_up: false,
        });
        let ids = s.enqueue(std::slice::from_ref(&item)).unwrap();
        item.attempts = 8;
        item.last_error = Some("LMS answered 503 (simulated outage)".into());
        s.bury(ids[0], &item).unwrap();
        store.flush().unwrap();
    }

    let log = dir.join("serve.log");
    let token = format!("admin_token = {{ value = \"{ADMIN_TOKEN}\" }}");
    let served = with_server(
        &env.config_toml,
        &format!("listen = \"127.0.0.1:0\"\n{token}"),
    );
    let config = write(dir, "rostersync.toml", &served);
    let mut child = spawn_serve(&config, &log).await;
    wait_logged(
        "subscriptions and the first reconcile",
        20_000,
        &log,
        || env.graph.subscriptions().len() >= 2 && env.scim.user_count() >= members.len() * 9 / 10,
    )
    .await;
    // The operator's config names where serve listens (serve was started on port 0).
    let listen = format!("listen = \"{}\"", child.addr);
    let config = write(
        dir,
        "rostersync.toml",
        &with_server(&env.config_toml, &format!("{listen}\n{token}")),
    );
    // The store is serve's: this process cannot open it.
    assert!(matches!(
        Store::open(&dir.join("data")),
        Err(rostersync::store::StoreError::Locked(_))
    ));
    // Changes from now on reach rostersync only through the commands below.
    env.graph.pause_delivery(true);
    env.graph
        .update_user(&late, |u| u.job_title = Some("Replayed".into()));
    env.graph
        .update_user(&synced, |u| u.job_title = Some("Synced by hand".into()));

    // queue stats and dead, text and JSON.
    let o = run(&["queue", "stats"], &config).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        stdout(&o).starts_with("test  queued ") && stdout(&o).contains("  dead 1  "),
        "{}",
        text(&o)
    );
    let o = run(&["queue", "stats", "--json"], &config).await;
    let stats: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(stats[0]["integration"], "test");
    assert_eq!(stats[0]["stats"]["dead"], 1);
    let o = run(&["queue", "dead"], &config).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let line = stdout(&o);
    assert!(
        line.contains(&format!("user {late}"))
            && line.contains("attempts 8")
            && line.contains("error: LMS answered 503 (simulated outage)"),
        "{line}"
    );
    let o = run(&["queue", "dead", "--json"], &config).await;
    let dead: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let id = dead[0]["items"][0]["id"].as_u64().expect("dead letter id");
    assert_eq!(dead[0]["items"].as_array().unwrap().len(), 1);

    // replay: serve's worker takes the item and syncs the user.
    let o = run(&["queue", "replay"], &config).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("give a dead letter id or --all"),
        "{}",
        text(&o)
    );
    let o = run(&["queue", "replay", &id.to_string()], &config).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(stdout(&o), "test  1 dead letter(s) queued again\n");
    wait_logged("the replayed notification applied", 15_000, &log, || {
        title(&env, &late).as_deref() == Some("Replayed")
    })
    .await;
    let o = run(&["queue", "stats"], &config).await;
    assert!(stdout(&o).contains("  dead 0  "), "{}", text(&o));

    // subscriptions list and renew.
    let before = env.graph.subscriptions();
    let o = run(&["subscriptions", "list"], &config).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for s in &before {
        assert!(
            stdout(&o).lines().any(
                |l| l.starts_with(&format!("test  {}  ", s.id)) && l.ends_with("live at Graph")
            ),
            "{} missing from:\n{}",
            s.id,
            text(&o)
        );
    }
    assert_eq!(stdout(&o).lines().count(), before.len(), "{}", text(&o));
    let o = run(&["subscriptions", "renew", "--json"], &config).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let renewed: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(
        renewed[0]["subscriptions"].as_array().unwrap().len(),
        before.len()
    );
    for s in &before {
        let now = env
            .graph
            .subscriptions()
            .into_iter()
            .find(|n| n.id == s.id)
            .expect("renewed, not replaced");
        assert!(
            now.expires_at > s.expires_at,
            "{} was not renewed: {} then {}; {}",
            s.id,
            s.expires_at,
            now.expires_at,
            text(&o)
        );
    }

    // sync-user, and a user no one knows.
    let o = run(&["sync-user", &synced], &config).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(stdout(&o).contains(&synced), "{}", text(&o));
    assert_eq!(title(&env, &synced).as_deref(), Some("Synced by hand"));
    let o = run(&["sync-user", &synced, "--dry-run", "--json"], &config).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let traces: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(traces[0]["entra_id"], synced.as_str(), "{traces}");
    let o = run(
        &["sync-user", "nobody@contoso-sim.onmicrosoft.com"],
        &config,
    )
    .await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("test: no user"), "{}", text(&o));

    // sync-user never runs beside a batch of serve's worker: a batch whose LMS write takes 4 s
    // holds the gate's exclusive lock, and the sync-user asked during it writes after it.
    let slow = members[7].clone();
    env.graph
        .update_user(&slow, |u| u.job_title = Some("Slow write".into()));
    env.graph
        .update_user(&synced, |u| u.job_title = Some("After the batch".into()));
    env.scim.set_faults(ScimFaults {
        users: vec![UserFault {
            external_id: slow.clone(),
            kind: UserFaultKind::Delay(Duration::from_secs(4)),
        }],
        ..Default::default()
    });
    env.scim.record_writes(true);
    let hook = reqwest::Client::new()
        .post(format!("http://{}/webhooks/graph/test", child.addr))
        .json(&user_notification(&env, &users_subscription(&env), &slow))
        .send()
        .await
        .unwrap();
    assert_eq!(hook.status().as_u16(), 202);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let o = run(&["sync-user", &synced], &config).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let writes = env.scim.writes();
    let at = |id: &str| {
        writes
            .iter()
            .find(|w| w.external_id.as_deref() == Some(id))
            .unwrap_or_else(|| panic!("no LMS write for {id}: {writes:?}"))
            .at
    };
    assert!(
        at(&synced) > at(&slow),
        "sync-user wrote while the worker's batch was in flight"
    );
    env.scim.set_faults(ScimFaults::default());
    assert_eq!(title(&env, &slow).as_deref(), Some("Slow write"));

    // explain, known and unknown.
    let served_explain = run(&["explain", &synced], &config).await;
    assert_eq!(
        served_explain.status.code(),
        Some(0),
        "{}",
        text(&served_explain)
    );
    assert!(
        stdout(&served_explain).starts_with("test: ") && stdout(&served_explain).contains(&synced),
        "{}",
        text(&served_explain)
    );
    let o = run(&["explain", "nobody"], &config).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("nothing is known about"),
        "{}",
        text(&o)
    );
    let served_list = run(&["subscriptions", "list"], &config).await;
    let served_stats = run(&["queue", "stats", "--json"], &config).await;

    // Refused: a wrong token, no token, no serve where the config says.
    let wrong = write(
        dir,
        "wrong.toml",
        &with_server(
            &env.config_toml,
            &format!("{listen}\nadmin_token = {{ value = \"{WRONG_TOKEN}\" }}"),
        ),
    );
    let o = run(&["queue", "stats"], &wrong).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("refused the admin token") && text(&o).contains(&child.addr.to_string()),
        "{}",
        text(&o)
    );
    let none = write(dir, "none.toml", &with_server(&env.config_toml, &listen));
    let o = run(&["explain", &synced], &none).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("is in use by another rostersync process")
            && text(&o).contains("no server.admin_token"),
        "{}",
        text(&o)
    );
    let elsewhere = write(
        dir,
        "elsewhere.toml",
        &with_server(
            &env.config_toml,
            &format!("listen = \"127.0.0.1:1\"\n{token}"),
        ),
    );
    let o = run(&["sync-user", &synced], &elsewhere).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("no rostersync serve answers at http://127.0.0.1:1/"),
        "{}",
        text(&o)
    );
    // The API itself: JSON errors with a stable code, the token checked before anything else.
    let http = reqwest::Client::new();
    let api = |path: &str| format!("http://{}/admin/{path}", child.addr);
    let r = http.get(api("test/queue")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["code"], "unauthorized");
    let r = http
        .get(api("nope/queue"))
        .bearer_auth(WRONG_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        401,
        "no integration is named to a stranger"
    );
    let r = http
        .get(api("nope/queue"))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "unknown_integration"
    );
    for (body, what) in [
        ("{\"user\": ", "truncated JSON"),
        ("{\"user\": \"x\", \"force\": true}", "an unknown field"),
        (
            &*format!("{{\"user\": \"{}\"}}", "x".repeat(300)),
            "a 300-byte user",
        ),
    ] {
        let r = http
            .post(api("test/sync-user"))
            .bearer_auth(ADMIN_TOKEN)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{what}");
        assert_eq!(
            r.json::<Value>().await.unwrap()["code"],
            "bad_request",
            "{what}"
        );
    }
    let r = http
        .post(api("test/queue/replay"))
        .bearer_auth(ADMIN_TOKEN)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "neither an id nor all");

    let log_text = std::fs::read_to_string(&log).unwrap();
    no_secret(&log_text);

    // Without serve (stopped as a service manager stops it: SIGTERM drains and flushes), the
    // same commands on the store print the same.
    if let Some(pid) = child.proc.id() {
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGTERM);
        }
    }
    let stopped = tokio::time::timeout(Duration::from_secs(60), child.proc.wait()).await;
    assert!(
        stopped.is_ok_and(|s| s.is_ok_and(|s| s.success())),
        "serve stops on SIGTERM"
    );
    let o = run(&["explain", &synced], &config).await;
    assert_eq!(stdout(&o), stdout(&served_explain));
    let o = run(&["subscriptions", "list"], &config).await;
    assert_eq!(stdout(&o), stdout(&served_list));
    let o = run(&["queue", "stats", "--json"], &config).await;
    assert_eq!(stdout(&o), stdout(&served_stats));

    // subscriptions delete (on the store now): each deleted at Graph and forgotten.
    let before = env.graph.subscriptions();
    let o = run(&["subscriptions", "delete"], &config).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    for s in &before {
        assert!(
            stdout(&o).contains(&format!("test  {}  {}  deleted\n", s.id, s.resource)),
            "{}",
            text(&o)
        );
    }
    assert!(env.graph.subscriptions().is_empty());
    let o = run(&["subscriptions", "list", "--json"], &config).await;
    let listed: Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(listed[0]["subscriptions"], serde_json::json!([]));
}
