//! Many customers in one process: full reconciles of many integrations, one after another
//! against side by side, each integration with its own tenant (its own Graph resource-unit
//! bucket and 100 ms per Graph request) and its own LMS, measured in the same run.
//!
//! `cargo bench --bench integrations [-- --integrations N] [--members M] [--latency-ms L]`
//!
//! Defaults: 40 integrations of 300 members, 100 ms per Graph request, the SCIM simulators
//! without added latency. Phases, all through `app::reconcile_side_by_side` (what `reconcile`
//! without `--integration` and serve's scheduler run):
//!
//! * first reconciles, all N side by side;
//! * no-change reconciles one at a time (limit 1: the sum, and the slowest single run), then side
//!   by side at most 4, `server.reconcile_concurrency`'s default and N at once: wall time and its
//!   ratio to the slowest single run;
//! * this process's RSS before the integrations are built and after the last phase, per
//!   integration (Linux; the simulators of every integration are included).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rostersync::app::{reconcile_side_by_side, Integration};
use rostersync::config::{Config, DEFAULT_RECONCILE_CONCURRENCY};
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::store::Store;
use rostersync::sync::reconcile::RunOptions;
use rostersync_sim::graph::{fixture, CostModel, GraphSim, Latency};
use rostersync_sim::scim::{ScimSim, ScimSimConfig};

use common::{arg, rss_mib};

const TOKEN: &str = "bench-token";

/// One phase: every integration reconciled, at most `limit` at once. Returns the wall time of
/// the whole phase and of each run.
async fn phase(runs: &[Arc<Integration>], limit: usize) -> (Duration, Vec<Duration>) {
    let started = Instant::now();
    let mut each = Vec::with_capacity(runs.len());
    if limit == 1 {
        // One at a time, each timed alone.
        for r in runs {
            let t = Instant::now();
            let rep =
                reconcile_side_by_side(std::slice::from_ref(r), RunOptions::default(), 1, None)
                    .await
                    .pop()
                    .expect("one report")
                    .expect("reconcile task");
            assert!(rep.error.is_none(), "{:?}", rep.error);
            each.push(t.elapsed());
        }
    } else {
        for rep in reconcile_side_by_side(runs, RunOptions::default(), limit, None).await {
            let rep = rep.expect("reconcile task");
            assert!(rep.error.is_none(), "{:?}", rep.error);
            assert_eq!(rep.counts.failed, 0);
        }
    }
    (started.elapsed(), each)
}

#[tokio::main]
async fn main() {
    let n = arg("--integrations").unwrap_or(40).max(1) as usize;
    let members = arg("--members").unwrap_or(300) as usize;
    let latency_ms = arg("--latency-ms").unwrap_or(100);

    let rss_start = rss_mib();
    let mut sims = Vec::with_capacity(n);
    let mut text = String::new();
    for i in 0..n {
        let fx = fixture(members, 100 + i as u64);
        let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
        graph.set_cost_model(Some(CostModel::default()));
        graph.set_latency(Some(Latency {
            fixed: Duration::from_millis(latency_ms),
            jitter: Duration::ZERO,
            seed: i as u64,
        }));
        let scim = ScimSim::start(ScimSimConfig {
            token: TOKEN.into(),
            custom_extension: Some(demo_custom_extension()),
            ..Default::default()
        })
        .await
        .expect("scim sim");
        text.push_str(&sim_config_toml(
            &format!("customer-{i}"),
            &graph,
            &fx.tenant,
            &fx.all_group_id,
            &scim,
            TOKEN,
        ));
        sims.push((graph, scim));
    }
    let rss_sims = rss_mib();
    let config = Config::from_toml(&text, Path::new(".")).expect("config");
    let store = Store::temporary().expect("store");
    let runs: Vec<Arc<Integration>> = config
        .integrations
        .iter()
        .map(|c| Arc::new(Integration::build(c, &store).expect("integration")))
        .collect();

    println!(
        "rostersync integrations bench: {n} integrations of {members} members, each its own \
         tenant (Graph {latency_ms} ms per request, its own RU bucket) and LMS ({} cores)",
        std::thread::available_parallelism()
            .map(|c| c.get())
            .unwrap_or(1)
    );

    let (first, _) = phase(&runs, n).await;
    println!(
        "first reconciles, {n} side by side: {:.1} s",
        first.as_secs_f64()
    );

    let (seq, each) = phase(&runs, 1).await;
    let slowest = each.iter().max().copied().unwrap_or_default();
    let sum: Duration = each.iter().sum();
    println!(
        "no-change reconciles one at a time: {:.1} s (sum of runs {:.1} s; slowest run {:.2} s, \
         median {:.2} s)",
        seq.as_secs_f64(),
        sum.as_secs_f64(),
        slowest.as_secs_f64(),
        {
            let mut e = each.clone();
            e.sort();
            e[e.len() / 2].as_secs_f64()
        }
    );
    let slow = slowest.as_secs_f64().max(1e-9);
    let mut limits = vec![4, DEFAULT_RECONCILE_CONCURRENCY, n];
    limits.sort();
    limits.dedup();
    for limit in limits {
        let (wall, _) = phase(&runs, limit).await;
        println!(
            "no-change reconciles, at most {limit} at once: {:.1} s = {:.1} x the slowest single \
             run, {:.1} x faster than one at a time",
            wall.as_secs_f64(),
            wall.as_secs_f64() / slow,
            seq.as_secs_f64() / wall.as_secs_f64().max(1e-9)
        );
    }
    if let (Some(a), Some(b), Some(c)) = (rss_start, rss_sims, rss_mib()) {
        println!(
            "RSS: {a:.0} MiB at start, {b:.0} MiB with the simulators, {c:.0} MiB after the \
             runs: {:.2} MiB per integration (growth during the runs, the LMS simulators' users included)",
            (c - b) / n as f64
        );
    }
    for (g, s) in sims {
        g.stop().await;
        s.stop().await;
    }
}

// The allocator of the `rostersync` binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
