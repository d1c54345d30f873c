//! A first sync against an LMS that allows R requests a second (a token bucket answering 429 +
//! `Retry-After` above it) and answers every request after a fixed latency: how close the run
//! comes to the LMS's own limit, against the floor of `users / R` seconds.
//!
//! `cargo bench --bench lms_pace [-- --users N] [--rate R --latency-ms L]`
//!
//! Without arguments it runs three cases (about two minutes in all): 50 req/s with 100 ms
//! (2,000 users), 20 req/s with 100 ms (800 users) and 50 req/s with 500 ms (1,500 users).
//! `--users N` runs every case with N users (`--users 10000`: the goal, about 19
//! minutes); `--rate` and `--latency-ms` run one case of your own.
//!
//! For each case: a fresh Graph simulator (no added latency or cost: this bench is about the
//! LMS) and a fresh SCIM simulator whose bucket holds one second of tokens and starts full; the
//! first reconcile through the library (`Integration::reconcile_task`, as the CLI runs it) with
//! the default `target.concurrency` ceiling. Printed: wall time and its ratio to the floor
//! (`users / R`, the goal's), and to the floor of the requests the LMS admitted in this run
//! (all but the refused ones, at R a second; lower, since the fixture's disabled members, 3 %,
//! are not created); the share of requests answered 429; failed and deferred users; and LMS
//! requests per user and per created user (all of them: discovery, lookups, creates, manager
//! PATCHes and the refused ones).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rostersync::app::Integration;
use rostersync::config::Config;
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::store::Store;
use rostersync_sim::graph::{fixture, GraphSim};
use rostersync_sim::scim::{RateLimit, ScimFaults, ScimSim, ScimSimConfig};

use common::{arg, timed_reconcile};

const TOKEN: &str = "bench-token";

struct Case {
    rate: f64,
    latency_ms: u64,
    users: usize,
}

struct Measured {
    wall: Duration,
    requests: u64,
    throttled: u64,
    posts: u64,
    patches: u64,
    failed: u64,
    deferred: u64,
    created: u64,
    in_lms: usize,
    window: f64,
    rate: Option<f64>,
    pauses: u64,
    cuts: u64,
}

async fn run(c: &Case) -> Measured {
    let fx = fixture(c.users, 9);
    let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
    let sim = ScimSim::start(ScimSimConfig {
        token: TOKEN.into(),
        custom_extension: Some(demo_custom_extension()),
        ..Default::default()
    })
    .await
    .expect("scim sim");
    let text = sim_config_toml("bench", &graph, &fx.tenant, &fx.all_group_id, &sim, TOKEN);
    let config = Config::from_toml(&text, Path::new(".")).expect("config");
    let store = Store::temporary().expect("store");
    let integration =
        Arc::new(Integration::build(&config.integrations[0], &store).expect("integration"));
    sim.set_faults(ScimFaults {
        latency: Duration::from_millis(c.latency_ms),
        rate_limit: Some(RateLimit::per_second(c.rate)),
        ..Default::default()
    });
    sim.reset_counts();
    let (r, wall) = timed_reconcile(&integration).await;
    let count = |k: &str| sim.request_count(k);
    let requests = ["GET", "POST", "PATCH", "PUT", "DELETE"]
        .iter()
        .map(|m| count(m))
        .sum();
    let pace = integration.target.pacer().stats();
    let m = Measured {
        wall,
        requests,
        throttled: count("429"),
        posts: count("POST"),
        patches: count("PATCH"),
        failed: r.counts.failed,
        deferred: r.counts.deferred,
        created: r.counts.created,
        in_lms: sim.user_count(),
        window: pace.window,
        rate: pace.rate,
        pauses: pace.pauses,
        cuts: pace.cuts,
    };
    graph.stop().await;
    sim.stop().await;
    m
}

#[tokio::main]
async fn main() {
    let users = arg("--users").map(|u| u as usize);
    let cases: Vec<Case> = match (arg("--rate"), arg("--latency-ms")) {
        (Some(rate), latency) => vec![Case {
            rate: rate as f64,
            latency_ms: latency.unwrap_or(100),
            users: users.unwrap_or(2_000),
        }],
        _ => [(50.0, 100, 2_000), (20.0, 100, 800), (50.0, 500, 1_500)]
            .into_iter()
            .map(|(rate, latency_ms, n)| Case {
                rate,
                latency_ms,
                users: users.unwrap_or(n),
            })
            .collect(),
    };
    println!(
        "rostersync LMS pace bench: first syncs against a SCIM simulator with a token bucket \
         (one second of burst, 429 + Retry-After) and fixed latency; default target.concurrency \
         ceiling ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "| LMS | users | floor (users / R) | wall | wall / floor | wall / admitted floor | 429 share | failed | deferred | requests / user | requests / created user | POST, PATCH |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for c in &cases {
        let m = run(c).await;
        let floor = c.users as f64 / c.rate;
        // The requests the LMS admitted (all but the refused ones) at exactly R a second: the
        // floor of this run's own work, below users / R because disabled members are not
        // created.
        let admitted_floor = m.requests.saturating_sub(m.throttled) as f64 / c.rate;
        println!(
            "| {} req/s, {} ms | {} | {:.1} s | {:.1} s | {:.3} | {:.3} | {:.2} % ({} of {}) | {} | {} | {:.4} | {:.4} | {}, {} |",
            c.rate,
            c.latency_ms,
            c.users,
            floor,
            m.wall.as_secs_f64(),
            m.wall.as_secs_f64() / floor,
            m.wall.as_secs_f64() / admitted_floor.max(f64::MIN_POSITIVE),
            100.0 * m.throttled as f64 / m.requests.max(1) as f64,
            m.throttled,
            m.requests,
            m.failed,
            m.deferred,
            m.requests as f64 / c.users.max(1) as f64,
            m.requests as f64 / m.created.max(1) as f64,
            m.posts,
            m.patches,
        );
        println!(
            "    created {}, LMS holds {}; {} shared pauses, {} cuts; pacer at the end: window {:.1}, rate {}",
            m.created,
            m.in_lms,
            m.pauses,
            m.cuts,
            m.window,
            m.rate
                .map(|r| format!("{r:.1} req/s"))
                .unwrap_or_else(|| "not set (never throttled)".into())
        );
    }
}

// The allocator of the `rostersync` binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
