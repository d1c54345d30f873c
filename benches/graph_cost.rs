//! What a reconcile costs in Microsoft Graph resource units (RU) and wall time when Graph answers
//! as slowly as it does and charges as Microsoft documents (`docs/graph-costs.md`), against the
//! floor of merely listing the group's members, measured in the same run.
//!
//! `cargo bench --bench graph_cost [-- --members N] [--latency-ms L] [--jitter-ms J]
//!  [--ru-limit R] [--floor-rounds K]`
//!
//! Defaults: 20,000 members, 100 ms per Graph request (no jitter), the documented RU bucket for
//! the simulated tenant's size (8,000 RU per 10 s above 500 users), 3 floor rounds. The SCIM
//! simulator answers without added latency: this bench is about Graph.
//!
//! * Floor: rostersync's own `GraphClient` lists the group's transitive members page by page
//!   with the reconcile's `$select` (what any full reconcile must read). RU, requests, wall
//!   time (median of the rounds).
//! * First reconcile (every member created in the LMS) and a no-change reconcile right after it,
//!   through the library (`Integration::reconcile_task`, as the CLI runs it): RU, the ratio to the
//!   floor's RU, RU per member, wall time and its ratio to the floor's, Graph requests by kind,
//!   429s, and this process's peak RSS during the run (Linux; it includes both simulators).
//!
//! Each phase starts from a full bucket. The RU counts are deterministic for a given code and
//! fixture; wall times depend on the machine (each Graph request waits the latency, so times are
//! dominated by how many requests run one after another).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rostersync::app::Integration;
use rostersync::config::Config;
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::store::Store;
use rostersync_sim::graph::{fixture, CostModel, CostStats, GraphSim, Latency};
use rostersync_sim::scim::{ScimSim, ScimSimConfig};

use common::{arg, peak_rss_mib, reset_peak_rss, timed_reconcile};

const TOKEN: &str = "bench-token";

/// One measured phase.
struct Phase {
    stats: CostStats,
    wall: Duration,
    rss: Option<f64>,
    note: String,
}

fn kinds(s: &CostStats) -> String {
    s.requests_by_kind
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn scim() -> ScimSim {
    ScimSim::start(ScimSimConfig {
        token: TOKEN.into(),
        custom_extension: Some(demo_custom_extension()),
        ..Default::default()
    })
    .await
    .expect("scim sim")
}

/// The floor: the group's members listed with the reconcile's `$select`, page by page.
async fn listing(graph: &GraphSim, integration: &Integration, group: &str) -> Phase {
    graph.refill_cost_buckets();
    let select = integration.cfg.mapping.user_select();
    let before = graph.cost_stats();
    let started = Instant::now();
    let mut next = Some(integration.graph.transitive_users_url(group, &select));
    let (mut users, mut pages) = (0usize, 0usize);
    while let Some(url) = next.take() {
        let page = integration
            .graph
            .user_page(&url)
            .await
            .expect("member page");
        users += page.users.len();
        pages += 1;
        next = page.next;
    }
    Phase {
        stats: graph.cost_stats().since(&before),
        wall: started.elapsed(),
        rss: None,
        note: format!("{users} members in {pages} pages"),
    }
}

async fn reconcile(graph: &GraphSim, integration: &Arc<Integration>) -> Phase {
    graph.refill_cost_buckets();
    let rss_reset = reset_peak_rss();
    let before = graph.cost_stats();
    let (r, wall) = timed_reconcile(integration).await;
    let c = &r.counts;
    Phase {
        stats: graph.cost_stats().since(&before),
        wall,
        rss: if rss_reset { peak_rss_mib() } else { None },
        note: format!(
            "outcome {:?}: members {}, created {}, updated {}, unchanged {}, failed {}",
            r.outcome, c.members, c.created, c.updated, c.unchanged, c.failed
        ),
    }
}

fn report(name: &str, p: &Phase, floor: &Phase, members: usize, ru_per_sec: f64) {
    let ru = p.stats.ru_total as f64;
    let floor_ru = floor.stats.ru_total.max(1) as f64;
    let floor_secs = floor.wall.as_secs_f64().max(1e-9);
    println!("{name}: {}", p.note);
    println!(
        "   RU {} = {:.1} x floor, {:.4} RU per member; wall {:.1} s = {:.1} x floor",
        p.stats.ru_total,
        ru / floor_ru,
        ru / members.max(1) as f64,
        p.wall.as_secs_f64(),
        p.wall.as_secs_f64() / floor_secs
    );
    println!(
        "   Graph requests ({}, inner $batch requests each counted, the envelopes as batch): {}; 429s: {}; at least {:.1} s of the app's whole bucket{}",
        p.stats.requests(),
        kinds(&p.stats),
        p.stats.throttled,
        ru / ru_per_sec,
        p.rss
            .map(|m| format!("; peak RSS {m:.0} MiB (this process, simulators included)"))
            .unwrap_or_default()
    );
}

#[tokio::main]
async fn main() {
    let members = arg("--members").unwrap_or(20_000) as usize;
    let latency_ms = arg("--latency-ms").unwrap_or(100);
    let jitter_ms = arg("--jitter-ms").unwrap_or(0);
    let floor_rounds = arg("--floor-rounds").unwrap_or(3).max(1);
    let ru_limit = arg("--ru-limit").map(|r| u32::try_from(r).unwrap_or(u32::MAX));

    let fx = fixture(members, 9);
    let tenant_users = fx.tenant.users.len();
    let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
    let model = CostModel {
        ru_limit,
        ..Default::default()
    };
    let limit = ru_limit.map(f64::from).unwrap_or(match tenant_users {
        0..50 => 3_500.0,
        50..=500 => 5_000.0,
        _ => 8_000.0,
    });
    let ru_per_sec = limit / model.window.as_secs_f64();
    graph.set_cost_model(Some(model.clone()));
    graph.set_latency(Some(Latency {
        fixed: Duration::from_millis(latency_ms),
        jitter: Duration::from_millis(jitter_ms),
        seed: 16,
    }));
    let sim = scim().await;
    let text = sim_config_toml("bench", &graph, &fx.tenant, &fx.all_group_id, &sim, TOKEN);
    let config = Config::from_toml(&text, Path::new(".")).expect("config");
    let store = Store::temporary().expect("store");
    let integration =
        Arc::new(Integration::build(&config.integrations[0], &store).expect("integration"));

    println!(
        "rostersync Graph cost bench: {members} members ({tenant_users} users in the tenant), Graph \
         latency {latency_ms} ms + 0..{jitter_ms} ms, RU bucket {limit:.0} per {} s, SCIM \
         simulator without latency ({} cores)",
        model.window.as_secs(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    let mut floors = Vec::new();
    for _ in 0..floor_rounds {
        floors.push(listing(&graph, &integration, &fx.all_group_id).await);
    }
    floors.sort_by_key(|p| p.wall);
    let floor = floors.swap_remove(floors.len() / 2);
    println!(
        "floor (listing only, GraphClient, the reconcile's $select): {}\n   RU {}, {:.4} RU per member; wall {:.2} s (median of {floor_rounds}); Graph requests: {}; 429s: {}",
        floor.note,
        floor.stats.ru_total,
        floor.stats.ru_total as f64 / members.max(1) as f64,
        floor.wall.as_secs_f64(),
        kinds(&floor.stats),
        floor.stats.throttled
    );

    let first = reconcile(&graph, &integration).await;
    report("first reconcile", &first, &floor, members, ru_per_sec);
    let again = reconcile(&graph, &integration).await;
    report("no-change reconcile", &again, &floor, members, ru_per_sec);

    graph.stop().await;
    sim.stop().await;
}

// The allocator of the `rostersync` binary (src/main.rs).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
