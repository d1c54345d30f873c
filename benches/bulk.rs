//! A first sync against an LMS that offers SCIM bulk, with and without it: the same SCIM
//! simulator (100 ms per request by default, bulk advertised with 1,000 operations and 1 MiB a
//! request) and the same tenant, once with bulk used (the default) and once with
//! `target.bulk = false` (one request per user, the baseline), side by side in one run.
//!
//! `cargo bench --bench bulk [-- --users N] [--latency-ms L] [--op-us U] [--rounds R]
//! [--baseline 0]`
//!
//! `--rounds` runs the bulk sync R times (the ratio takes their median); `--baseline 0` leaves
//! the one-request-per-user run out (to compare bulk runs of two builds quickly).
//!
//! `--op-us` adds U microseconds per bulk operation to a bulk request (a server does the work
//! of each operation it carries; default 1,000 µs = 1 ms per operation, so a request of 1,000
//! operations takes 1.1 s). Printed: wall time of each, LMS requests, and the ratio of the
//! baseline's time to bulk's (goal: at least 5 at 10,000 users and 100 ms).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rostersync::app::Integration;
use rostersync::config::Config;
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::store::Store;
use rostersync_sim::graph::{fixture, GraphSim};
use rostersync_sim::scim::{ScimFaults, ScimSim, ScimSimConfig, SimBulk};

use common::{arg, timed_reconcile};

const TOKEN: &str = "bench-token";

struct Measured {
    wall: Duration,
    requests: u64,
    bulks: u64,
    created: u64,
    failed: u64,
    in_lms: usize,
}

async fn run(users: usize, latency: Duration, per_op: Duration, use_bulk: bool) -> Measured {
    let fx = fixture(users, 9);
    let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
    let sim = ScimSim::start(ScimSimConfig {
        token: TOKEN.into(),
        custom_extension: Some(demo_custom_extension()),
        bulk: Some(SimBulk::default()),
        ..Default::default()
    })
    .await
    .expect("scim sim");
    let mut text = sim_config_toml("bench", &graph, &fx.tenant, &fx.all_group_id, &sim, TOKEN);
    if !use_bulk {
        text.push_str("bulk = false\n");
    }
    let config = Config::from_toml(&text, Path::new(".")).expect("config");
    let store = Store::temporary().expect("store");
    let integration =
        Arc::new(Integration::build(&config.integrations[0], &store).expect("integration"));
    sim.set_faults(ScimFaults {
        latency,
        bulk_op_latency: per_op,
        ..Default::default()
    });
    sim.reset_counts();
    let (r, wall) = timed_reconcile(&integration).await;
    let requests = ["GET", "POST", "PATCH", "PUT", "DELETE"]
        .iter()
        .map(|m| sim.request_count(m))
        .sum();
    let m = Measured {
        wall,
        requests,
        bulks: sim.request_count("bulk"),
        created: r.counts.created,
        failed: r.counts.failed,
        in_lms: sim.user_count(),
    };
    graph.stop().await;
    sim.stop().await;
    m
}

#[tokio::main]
async fn main() {
    let users = arg("--users").unwrap_or(10_000) as usize;
    let latency = Duration::from_millis(arg("--latency-ms").unwrap_or(100));
    let per_op = Duration::from_micros(arg("--op-us").unwrap_or(1_000));
    println!(
        "rostersync SCIM bulk bench: first sync of {users} users, {} ms per LMS request, {} µs per bulk operation",
        latency.as_millis(),
        per_op.as_micros()
    );
    println!("| mode | wall | LMS requests | of them bulk | created | failed | LMS holds |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let rounds = arg("--rounds").unwrap_or(1).max(1) as usize;
    let baseline = arg("--baseline").unwrap_or(1) != 0;
    let mut modes = vec![("bulk", true); rounds];
    if baseline {
        modes.push(("one request per user", false));
    }
    let mut walls = Vec::new();
    let mut bulk_walls = Vec::new();
    for (name, use_bulk) in modes {
        let m = run(users, latency, per_op, use_bulk).await;
        println!(
            "| {name} | {:.1} s | {} | {} | {} | {} | {} |",
            m.wall.as_secs_f64(),
            m.requests,
            m.bulks,
            m.created,
            m.failed,
            m.in_lms
        );
        if use_bulk {
            bulk_walls.push(m.wall.as_secs_f64());
        } else {
            walls.push(m.wall.as_secs_f64());
        }
    }
    bulk_walls.sort_by(f64::total_cmp);
    let median = bulk_walls[bulk_walls.len() / 2];
    if let Some(one_by_one) = walls.first() {
        println!(
            "one request per user / bulk (median of {rounds}): {:.2}x",
            one_by_one / median.max(f64::MIN_POSITIVE)
        );
    }
}
