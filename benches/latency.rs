//! Notification-to-LMS latency of `serve`, end to end on 127.0.0.1.
//!
//! `cargo bench --bench latency [-- --changes N] [--users U] [--gap-ms G]`
//!
//! The Graph simulator (a tenant of U users, default 500), the SCIM simulator and the real
//! server (`serve::serve`, production `ServeOptions`, listening on 127.0.0.1:0) run in this
//! process, as in tests/it/serve.rs. The server learns the group tree, creates its subscriptions
//! through the simulator's validation handshake and runs its first reconcile; the bench waits
//! until the LMS has been quiet for a second. Then it makes N changes (default 200) in the
//! simulated tenant one at a time: 8 of 10 are job-title changes of an active member, 1 a hire
//! (new user added to the configured group), 1 a disabled account. The simulator posts the
//! change notifications itself (its delivery loop ticks every 20 ms).
//!
//! For each change:
//! * **POST → LMS**: from the start of the Graph simulator's first delivery POST after the
//!   mutation (`GraphSim::delivery_log`, `DeliveryAttempt::at`) to the SCIM simulator's
//!   `meta.lastModified` of the user once it shows the change (the simulator stamps it when it
//!   stores the PATCH or POST, with millisecond precision, so figures are ±1 ms). This is
//!   rostersync's share: webhook, durable queue, worker, Graph re-read, plan, SCIM write.
//! * **mutation → LMS**: from just before the mutation to the same `lastModified`; it adds the
//!   simulator's delivery tick (0–20 ms; real Graph's own delay is undocumented and usually
//!   seconds).
//!
//! The bench polls the SCIM simulator (in process, every millisecond) to see that the change
//! arrived, waits `G` to `G` + 19 ms (default G = 20; varied so the mutations do not lock onto
//! the simulator's delivery tick) and makes the next change. It prints p50/p99/max of
//! both measures, overall and per kind. Nothing asserts timing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rostersync::config::Config;
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::serve::{serve, ServeOptions};
use rostersync_sim::graph::{fixture, GraphSim, SimUser};
use rostersync_sim::scim::{ScimSim, ScimSimConfig};
use serde_json::Value;

use common::{arg_or as arg, pct};

const TOKEN: &str = "bench-token";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Title,
    Hire,
    Disable,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Title => "title change",
            Kind::Hire => "hire",
            Kind::Disable => "disable",
        }
    }
}

/// Whether the LMS user shows the change.
type Check = Box<dyn Fn(&Value) -> bool>;

struct Sample {
    kind: Kind,
    post_to_lms_ms: Option<f64>,
    mutation_to_lms_ms: f64,
}

fn new_hire(n: usize, manager: Option<String>) -> SimUser {
    SimUser {
        id: format!("bbbbbbbb-0000-4000-8000-{n:012}"),
        user_principal_name: format!("bench.hire{n}@contoso-sim.onmicrosoft.com"),
        mail: Some(format!("bench.hire{n}@contoso.example")),
        given_name: Some("Bench".into()),
        surname: Some(format!("Hire {n}")),
        display_name: Some(format!("Bench Hire {n}")),
        job_title: Some("Analyst".into()),
        department: Some("Finance".into()),
        account_enabled: true,
        manager_id: manager,
        ..Default::default()
    }
}

fn last_modified(u: &Value) -> Option<DateTime<Utc>> {
    u.pointer("/meta/lastModified")
        .and_then(|v| v.as_str())
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn ms(d: chrono::TimeDelta) -> f64 {
    d.num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

fn writes(scim: &ScimSim) -> u64 {
    scim.request_count("POST") + scim.request_count("PATCH")
}

async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    false
}

fn line(label: &str, mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "| {label:<28} | {:>5} | {:>8.1} | {:>8.1} | {:>8.1} |",
        v.len(),
        pct(&v, 0.50),
        pct(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

#[tokio::main]
async fn main() {
    let changes = arg("--changes", 200);
    let users = arg("--users", 500);
    let gap = Duration::from_millis(arg("--gap-ms", 20) as u64);
    println!(
        "rostersync notification-to-LMS latency bench ({} cores; {users}-user tenant, {changes} changes)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let fx = fixture(users, 11);
    let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
    let scim = ScimSim::start(ScimSimConfig {
        token: TOKEN.into(),
        custom_extension: Some(demo_custom_extension()),
        ..Default::default()
    })
    .await
    .expect("scim sim");
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n{}",
        dir.path().join("data").display(),
        sim_config_toml("bench", &graph, &fx.tenant, &fx.all_group_id, &scim, TOKEN)
    );
    let config = Config::from_toml(&text, Path::new(".")).expect("config");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let server = tokio::spawn(async move {
        serve(config, ServeOptions::default(), |_| {}, async {
            let _ = stop_rx.await;
        })
        .await
        .expect("serve");
    });

    // Ready: subscriptions exist and the first reconcile is done (the LMS is quiet).
    let members = graph.transitive_user_ids(&fx.all_group_id);
    assert!(
        wait_until(Duration::from_secs(60), || graph.subscriptions().len() >= 2
            && scim.user_count() >= members.len() * 9 / 10)
        .await,
        "serve did not subscribe and reconcile in time"
    );
    let mut last = (writes(&scim), Instant::now());
    while last.1.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let w = writes(&scim);
        if w != last.0 {
            last = (w, Instant::now());
        }
    }
    println!(
        "ready after {:.1} s: {} subscriptions, {} LMS users",
        started.elapsed().as_secs_f64(),
        graph.subscriptions().len(),
        scim.user_count()
    );

    // Candidates: members that are active in the LMS.
    let mut active: Vec<String> = members
        .iter()
        .filter(|id| {
            scim.user_by_external_id(id)
                .and_then(|u| u["active"].as_bool())
                .unwrap_or(false)
        })
        .cloned()
        .collect();
    let boss = active.first().cloned();
    // Title changes and disables reach us through the `/users` subscription.
    let users_sub: Vec<String> = graph
        .subscriptions()
        .into_iter()
        .filter(|s| {
            s.resource
                .trim_start_matches('/')
                .eq_ignore_ascii_case("users")
        })
        .map(|s| s.id)
        .collect();

    let mut samples: Vec<Sample> = Vec::with_capacity(changes);
    let mut missed: Vec<String> = Vec::new();
    let mut pick = 0usize;
    for i in 0..changes {
        let kind = match i % 10 {
            3 => Kind::Hire,
            7 => Kind::Disable,
            _ => Kind::Title,
        };
        pick = (pick + 37) % active.len().max(1);
        let log_before = graph.delivery_log().len();
        let mutated_at = Utc::now();
        let (id, check): (String, Check) = match kind {
            Kind::Title => {
                let id = active[pick].clone();
                let title = format!("Bench Title {i}");
                graph.update_user(&id, |u| u.job_title = Some(title.clone()));
                (
                    id,
                    Box::new(move |u: &Value| u["title"].as_str() == Some(title.as_str())),
                )
            }
            Kind::Hire => {
                let u = new_hire(i, boss.clone());
                let id = u.id.clone();
                graph.upsert_user(u);
                graph.add_member(&fx.all_group_id, &id);
                active.push(id.clone());
                (id, Box::new(|u: &Value| u["active"] == true))
            }
            Kind::Disable => {
                // Not the manager of the hires, so their links stay stable.
                let idx = if Some(&active[pick]) == boss.as_ref() {
                    (pick + 1) % active.len()
                } else {
                    pick
                };
                let id = active.remove(idx);
                graph.update_user(&id, |u| u.account_enabled = false);
                (id, Box::new(|u: &Value| u["active"] == false))
            }
        };
        let mut seen: Option<Value> = None;
        let arrived = wait_until(Duration::from_secs(10), || {
            seen = scim.user_by_external_id(&id).filter(|u| check(u));
            seen.is_some()
        })
        .await;
        let Some(lms_at) = seen.as_ref().and_then(last_modified).filter(|_| arrived) else {
            missed.push(format!("{} of {id}", kind.name()));
            continue;
        };
        // The delivery that carried the change has completed (or is about to: the simulator
        // logs an attempt once it has the answer).
        let mut posted_at: Option<DateTime<Utc>> = None;
        wait_until(Duration::from_secs(2), || {
            posted_at = graph
                .delivery_log()
                .iter()
                .skip(log_before)
                .filter(|d| !d.lifecycle && d.at >= mutated_at)
                .filter(|d| {
                    kind == Kind::Hire || d.subscription_ids.iter().any(|s| users_sub.contains(s))
                })
                .map(|d| d.at)
                .min();
            posted_at.is_some()
        })
        .await;
        samples.push(Sample {
            kind,
            post_to_lms_ms: posted_at.map(|p| ms(lms_at - p)),
            mutation_to_lms_ms: ms(lms_at - mutated_at),
        });
        // G to G + 19 ms, so that mutations do not lock onto the simulator's 20 ms tick.
        tokio::time::sleep(gap + Duration::from_millis((i as u64 * 7) % 20)).await;
    }

    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
    let failed = graph
        .delivery_log()
        .iter()
        .filter(|d| !d.lifecycle && !d.delivered())
        .count();
    graph.stop().await;
    scim.stop().await;

    println!();
    println!(
        "| {:<28} | {:>5} | {:>8} | {:>8} | {:>8} |",
        "latency (ms)", "n", "p50", "p99", "max"
    );
    println!(
        "| {:-<28} | {:->5} | {:->8} | {:->8} | {:->8} |",
        "", "", "", "", ""
    );
    let post: Vec<f64> = samples.iter().filter_map(|s| s.post_to_lms_ms).collect();
    let mutation: Vec<f64> = samples.iter().map(|s| s.mutation_to_lms_ms).collect();
    println!("{}", line("POST -> LMS, all", post.clone()));
    for k in [Kind::Title, Kind::Hire, Kind::Disable] {
        let v: Vec<f64> = samples
            .iter()
            .filter(|s| s.kind == k)
            .filter_map(|s| s.post_to_lms_ms)
            .collect();
        println!("{}", line(&format!("POST -> LMS, {}", k.name()), v));
    }
    println!("{}", line("mutation -> LMS, all", mutation.clone()));
    let mut post_sorted = post;
    post_sorted.sort_by(|a, b| a.total_cmp(b));
    let (p50, p99) = (pct(&post_sorted, 0.5), pct(&post_sorted, 0.99));
    println!();
    println!(
        "POST -> LMS p50 {p50:.1} ms (goal < 50 ms: {}), p99 {p99:.1} ms (goal < 250 ms: {})",
        if p50 < 50.0 { "met" } else { "NOT met" },
        if p99 < 250.0 { "met" } else { "NOT met" }
    );
    println!(
        "{} changes measured, {} without a matching delivery, {} not in the LMS within 10 s{}; {failed} failed delivery attempts",
        samples.len(),
        samples.iter().filter(|s| s.post_to_lms_ms.is_none()).count(),
        missed.len(),
        if missed.is_empty() {
            String::new()
        } else {
            format!(" ({})", missed.join(", "))
        }
    );
}
