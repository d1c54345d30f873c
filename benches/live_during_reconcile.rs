//! Live updates while a full reconcile runs: change → LMS latency of `serve` with and without
//! an expensive reconcile beside it, against a Graph simulator that charges resource units as
//! Microsoft documents (`docs/graph-costs.md`) and answers slowly, and what the live updates
//! cost the reconcile.
//!
//! `cargo bench --bench live_during_reconcile [-- --members N] [--latency-ms L]
//!  [--changes C] [--gap-ms G] [--ru-limit R]`
//!
//! Defaults: 20,000 members, 100 ms per Graph request, the documented bucket for the tenant's
//! size (8,000 RU per 10 s), at most 200 changes, 250 ms between them. The SCIM simulator adds
//! no latency. Two sessions, each a fresh tenant, LMS and data directory, with the real server
//! (`serve::serve`, production `ServeOptions`) on 127.0.0.1:0:
//!
//! 1. **Reconcile alone**: `serve` starts, runs its first reconcile (every member created, every
//!    manager read: the expensive kind) and nothing else happens. Its wall time (the run
//!    record's start to end) is the baseline.
//! 2. **Live during the reconcile**: the same, and as soon as the first reconcile reads Graph,
//!    job-title changes of members are made one at a time (the simulator posts the
//!    notifications; a change's latency is from just before the mutation to the SCIM
//!    simulator's `meta.lastModified` of the user once it shows the change). Changes that
//!    arrive before the run ends count as "during". Once the run is over and the LMS is quiet,
//!    as many changes again with nothing else running: the baseline of the same run.
//!
//! Printed: p50/p99/max of both latency sets, the reconcile's wall time with live changes as a
//! ratio to the reconcile alone, and the RU and 429s by priority. Nothing asserts timing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rostersync::config::Config;
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::serve::{serve, ServeOptions};
use rostersync::store::Store;
use rostersync::sync::reconcile::RunReport;
use rostersync_sim::graph::{fixture, CostModel, CostStats, GraphSim, Latency};
use rostersync_sim::scim::{ScimSim, ScimSimConfig};
use serde_json::Value;

use common::{arg, pct};

const TOKEN: &str = "bench-token";

fn last_modified(u: &Value) -> Option<DateTime<Utc>> {
    u.pointer("/meta/lastModified")
        .and_then(|v| v.as_str())
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
}

fn line(label: &str, mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    format!(
        "| {label:<34} | {:>5} | {:>8.0} | {:>8.0} | {:>8.0} |",
        v.len(),
        pct(&v, 0.50),
        pct(&v, 0.99),
        v.last().copied().unwrap_or(f64::NAN)
    )
}

struct Knobs {
    members: usize,
    latency: Duration,
    ru_limit: Option<u32>,
}

/// One fresh tenant, LMS, data directory and `serve`.
struct Session {
    graph: GraphSim,
    scim: ScimSim,
    store: Store,
    name: rostersync::config::IntegrationName,
    members: Vec<String>,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Session {
    async fn start(k: &Knobs) -> Session {
        let fx = fixture(k.members, 9);
        let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
        graph.set_cost_model(Some(CostModel {
            ru_limit: k.ru_limit,
            ..Default::default()
        }));
        graph.set_latency(Some(Latency {
            fixed: k.latency,
            jitter: Duration::ZERO,
            seed: 16,
        }));
        let scim = ScimSim::start(ScimSimConfig {
            token: TOKEN.into(),
            custom_extension: Some(demo_custom_extension()),
            ..Default::default()
        })
        .await
        .expect("scim sim");
        let dir = tempfile::tempdir().expect("tempdir");
        // No scheduled reconcile: only the first one runs.
        let text = format!(
            "[server]\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:0\"\n{}",
            dir.path().join("data").display(),
            sim_config_toml("bench", &graph, &fx.tenant, &fx.all_group_id, &scim, TOKEN)
        )
        .replace(
            "\n[integration.target]",
            "\nschedule = \"0 0 0 1 1 *\"\n\n[integration.target]",
        );
        let config = Config::from_toml(&text, Path::new(".")).expect("config");
        let name = config.integrations[0].name.clone();
        let store = Store::open(&config.server.data_dir).expect("store");
        let options = ServeOptions {
            store: Some(store.clone()),
            ..ServeOptions::default()
        };
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            serve(config, options, |_| {}, async {
                let _ = stop_rx.await;
            })
            .await
            .expect("serve");
        });
        // Members the LMS gets (a disabled one is never created, so its title never shows).
        let members: Vec<String> = graph
            .transitive_user_ids(&fx.all_group_id)
            .into_iter()
            .filter(|id| graph.user(id).is_some_and(|u| u.account_enabled))
            .collect();
        Session {
            graph,
            scim,
            store,
            name,
            members,
            stop,
            task,
            _dir: dir,
        }
    }

    fn run(&self) -> Option<RunReport> {
        self.store
            .integration(&self.name)
            .ok()?
            .runs::<RunReport>(1)
            .ok()?
            .into_iter()
            .next()
    }

    /// Waits for the first reconcile's record.
    async fn finished(&self) -> RunReport {
        loop {
            if let Some(r) = self.run() {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Until the LMS has had no write for a second.
    async fn quiet(&self) {
        let writes = || self.scim.request_count("POST") + self.scim.request_count("PATCH");
        let mut last = (writes(), Instant::now());
        while last.1.elapsed() < Duration::from_secs(1) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let w = writes();
            if w != last.0 {
                last = (w, Instant::now());
            }
        }
    }

    /// Changes the job title of the `i`-th chosen enabled member; returns the latency in ms once the
    /// LMS shows it (`None`: not within 120 s) and whether the first reconcile was still
    /// running when it arrived.
    async fn change(&self, i: usize, tag: &str) -> (Option<f64>, bool) {
        let id = &self.members[(i * 7919) % self.members.len()];
        let want = format!("{tag} {i}");
        let mutated_at = Utc::now();
        self.graph
            .update_user(id, |u| u.job_title = Some(want.clone()));
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(120) {
            let seen = self
                .scim
                .user_by_external_id(id)
                .filter(|u| u["title"].as_str() == Some(want.as_str()));
            if let Some(at) = seen.as_ref().and_then(last_modified) {
                let during = self.run().is_none();
                let ms = (at - mutated_at).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3;
                return (Some(ms), during);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (None, self.run().is_none())
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
        self.graph.stop().await;
        self.scim.stop().await;
    }
}

fn wall(r: &RunReport) -> f64 {
    (r.finished_at - r.started_at)
        .to_std()
        .unwrap_or_default()
        .as_secs_f64()
}

fn costs(label: &str, s: &CostStats) {
    println!(
        "   {label}: RU {} ({} low priority, {} normal), Graph requests {}, 429s {} ({})",
        s.ru_total,
        s.ru_low_priority,
        s.ru_total - s.ru_low_priority - s.ru_high_priority,
        s.requests(),
        s.throttled,
        s.throttled_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

#[tokio::main]
async fn main() {
    let k = Knobs {
        members: arg("--members").unwrap_or(20_000) as usize,
        latency: Duration::from_millis(arg("--latency-ms").unwrap_or(100)),
        ru_limit: arg("--ru-limit").map(|r| u32::try_from(r).unwrap_or(u32::MAX)),
    };
    let max_changes = arg("--changes").unwrap_or(200) as usize;
    let gap = Duration::from_millis(arg("--gap-ms").unwrap_or(250));
    println!(
        "rostersync live-during-reconcile bench ({} cores): {} members, Graph {} ms per request, RU bucket {}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        k.members,
        k.latency.as_millis(),
        k.ru_limit
            .map(|r| format!("{r} per 10 s"))
            .unwrap_or_else(|| "as documented for the tenant's size".into())
    );

    // 1. The reconcile alone.
    let a = Session::start(&k).await;
    let alone = a.finished().await;
    let alone_costs = a.graph.cost_stats();
    println!(
        "reconcile alone: {:.1} s, {} members, {} created, outcome {:?}",
        wall(&alone),
        alone.counts.members,
        alone.counts.created,
        alone.outcome
    );
    costs("Graph", &alone_costs);
    a.stop().await;

    // 2. Live changes during the same reconcile, then as many without it.
    let b = Session::start(&k).await;
    let started = Instant::now();
    while b.graph.cost_stats().ru_low_priority == 0 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut during = Vec::new();
    let mut after_end = 0usize;
    let mut missed = 0usize;
    let mut i = 0usize;
    while b.run().is_none() && i < max_changes {
        match b.change(i, "During").await {
            (Some(ms), true) => during.push(ms),
            (Some(_), false) => after_end += 1,
            (None, _) => missed += 1,
        }
        i += 1;
        tokio::time::sleep(gap).await;
    }
    let with_live = b.finished().await;
    let during_costs = b.graph.cost_stats();
    b.quiet().await;
    let mut baseline = Vec::new();
    for j in 0..during.len().max(20) {
        match b.change(i + j, "After").await {
            (Some(ms), _) => baseline.push(ms),
            (None, _) => missed += 1,
        }
        tokio::time::sleep(gap).await;
    }
    let pacer_note = format!(
        "reconcile with live changes: {:.1} s = {:.2} x the reconcile alone; outcome {:?}; {} changes arrived during it, {} after it ended, {} not within 120 s",
        wall(&with_live),
        wall(&with_live) / wall(&alone).max(1e-9),
        with_live.outcome,
        during.len(),
        after_end,
        missed
    );
    println!("{pacer_note}");
    costs("Graph until the run ended", &during_costs);
    for n in &with_live.notes {
        if n.contains("incremental worker") {
            println!("   run note: {n}");
        }
    }
    b.stop().await;

    println!();
    println!(
        "| {:<34} | {:>5} | {:>8} | {:>8} | {:>8} |",
        "change -> LMS (ms)", "n", "p50", "p99", "max"
    );
    println!(
        "| {:-<34} | {:->5} | {:->8} | {:->8} | {:->8} |",
        "", "", "", "", ""
    );
    println!("{}", line("during the first reconcile", during.clone()));
    println!("{}", line("no reconcile (same run)", baseline.clone()));
    let (mut d, mut b) = (during, baseline);
    d.sort_by(|x, y| x.total_cmp(y));
    b.sort_by(|x, y| x.total_cmp(y));
    println!(
        "p50 ratio during / without: {:.2}; p99 ratio: {:.2}",
        pct(&d, 0.5) / pct(&b, 0.5),
        pct(&d, 0.99) / pct(&b, 0.99)
    );
}
