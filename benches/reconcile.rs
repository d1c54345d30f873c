//! Reconcile benchmark against the in-repo simulators on 127.0.0.1.
//!
//! `cargo bench --bench reconcile [-- --creates N] [--members M]`
//!
//! A. Baseline: the SCIM simulator's own POST rate — N user resources shaped like rostersync's
//!    POSTed by a bare reqwest loop at the same concurrency (8).
//! B. rostersync's first reconcile creating N users (Graph reads, managers, mapping, index
//!    writes included), as a rate and as a ratio of A measured in the same run.
//! C. The `rostersync` binary reconciling an M-member group twice: the first run creates every
//!    user, the second changes nothing. Wall time and the child's peak RSS (VmHWM, polled
//!    every 20 ms). The simulators run in this process, on the same cores.
//! A and B alternate for `--rounds` rounds (default 5) and the median of the per-round ratios
//! is the result: on a shared 2-core machine single runs of either vary by a third.
//! Each A and B round also reports the process's CPU time per user (user + system, from
//! /proc/self/stat on Linux): when both saturate the cores, B/A is about the inverse of their
//! CPU ratio, and CPU per user moves less than wall rates on a noisy machine.
//! `--only b` runs B alone (once, or `--rounds` times; for perf); `--only a2` alternates A and
//! A2 for `--rounds` rounds; `--only c` runs C alone.
//! A2 isolates the SCIM client (ScimTarget::create on prepared records) from the pipeline.

mod common;

use common::arg_or as arg;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt};
use rostersync::app::Integration;
use rostersync::config::Config;
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::store::Store;
use rostersync::sync::reconcile::RunOptions;
use rostersync_sim::graph::{fixture, GraphSim};
use rostersync_sim::scim::{ScimSim, ScimSimConfig};
use serde_json::json;

const TOKEN: &str = "bench-token";

/// CPU seconds this process has used (user + system), where /proc says.
fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3: utime is the
    // 14th field, stime the 15th, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// A rate and the CPU microseconds per user it took (when known).
struct Rate {
    per_sec: f64,
    cpu_us: Option<f64>,
}

fn measure(n: u64, secs: f64, cpu_before: Option<f64>) -> Rate {
    let cpu_us = match (cpu_before, cpu_secs()) {
        (Some(a), Some(b)) if n > 0 => Some((b - a) * 1e6 / n as f64),
        _ => None,
    };
    Rate {
        per_sec: n as f64 / secs,
        cpu_us,
    }
}

fn cpu_text(r: &Rate) -> String {
    r.cpu_us
        .map(|c| format!(" ({c:.0} us CPU/user)"))
        .unwrap_or_default()
}

/// Whether `--only <part>` was given.
fn only(part: &str) -> bool {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2).any(|w| w[0] == "--only" && w[1] == part)
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

async fn baseline_post_rate(n: usize) -> Rate {
    let sim = scim().await;
    let http = reqwest::Client::new();
    let url = format!("{}/Users", sim.base_url());
    let (custom, _) = demo_custom_extension();
    let cpu_before = cpu_secs();
    let started = Instant::now();
    let ok = stream::iter(0..n)
        .map(|i| {
            let body = json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                    "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User", custom.clone()],
                "userName": format!("baseline.user{i}@contoso.example"), "externalId": format!("ext-{i}"),
                "active": true, "displayName": format!("Baseline User {i}"), "title": "Engineer",
                "name": {"givenName": "Baseline", "familyName": format!("User {i}")},
                "emails": [{"value": format!("baseline.user{i}@contoso.example"), "type": "work", "primary": true}],
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"employeeNumber": format!("E{i}"), "department": "R&D"},
                custom.clone(): {"officeLocation": "B1", "city": "Oslo", "country": "NO", "managerEmail": "boss@contoso.example", "managerDisplayName": "Boss"}
            });
            let req = http
                .post(&url)
                .bearer_auth(TOKEN)
                .header("Content-Type", "application/scim+json")
                .body(body.to_string());
            // Like any client, read the answer (the id is in it).
            async move {
                match req.send().await {
                    Ok(r) if r.status().as_u16() == 201 => r.bytes().await.is_ok(),
                    _ => false,
                }
            }
        })
        .buffer_unordered(8)
        .filter(|ok| futures::future::ready(*ok))
        .count()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let rate = measure(n as u64, secs, cpu_before);
    assert_eq!(ok, n, "every baseline POST succeeds");
    sim.stop().await;
    rate
}

async fn target_create_rate(n: usize) -> f64 {
    use rostersync::lms::Target;
    use rostersync::sync::mapping::{AttrValue, Record};
    let sim = scim().await;
    let target = rostersync::lms::scim::ScimTarget::new(
        &url::Url::parse(&sim.base_url()).unwrap(),
        secrecy::SecretString::from(TOKEN),
        rostersync::config::DEFAULT_CUSTOM_SCHEMA,
        8,
        Duration::from_secs(30),
    )
    .expect("client");
    target.discover().await.expect("discover");
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let mut r = Record::new();
            for (k, v) in [
                ("userName", format!("t.user{i}@contoso.example")),
                ("externalId", format!("ext-{i}")),
                ("displayName", format!("T User {i}")),
                ("title", "Engineer".into()),
                ("name.givenName", "T".into()),
                ("name.familyName", format!("User {i}")),
                ("emails.work", format!("t.user{i}@contoso.example")),
                ("enterprise.employeeNumber", format!("E{i}")),
                ("enterprise.department", "R&D".into()),
                ("custom.city", "Oslo".into()),
            ] {
                r.insert(k.into(), AttrValue::Str(v));
            }
            r.insert("active".into(), AttrValue::Bool(true));
            r
        })
        .collect();
    let started = Instant::now();
    let ok = stream::iter(records.iter().map(|r| target.create(r)))
        .buffer_unordered(8)
        .filter(|r| futures::future::ready(matches!(r, Ok(Some(_)))))
        .count()
        .await;
    assert_eq!(ok, n);
    n as f64 / started.elapsed().as_secs_f64()
}

/// B: a first reconcile creating `n` users; `dry_run_first` also times a dry run of it.
async fn first_reconcile_rate(n: usize, dry_run_first: bool) -> (Rate, u64, String) {
    let fx = fixture(n, 3);
    let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
    let sim = scim().await;
    let text = sim_config_toml("bench", &graph, &fx.tenant, &fx.all_group_id, &sim, TOKEN);
    let config = Config::from_toml(&text, Path::new(".")).expect("config");
    let store = Store::temporary().expect("store");
    let integration = std::sync::Arc::new(
        Integration::build(&config.integrations[0], &store).expect("integration"),
    );
    let started = Instant::now();
    if dry_run_first {
        let dry = integration
            .reconcile(
                RunOptions {
                    dry_run: true,
                    ..Default::default()
                },
                None,
            )
            .await;
        println!(
            "   (dry run of the same: {:.2} s, {} planned)",
            started.elapsed().as_secs_f64(),
            dry.counts.created
        );
    }
    let cpu_before = cpu_secs();
    let started = Instant::now();
    // As the CLI and `serve` run it: as a task on the runtime's workers.
    let r = integration
        .reconcile_task(RunOptions::default(), None)
        .await
        .expect("reconcile task");
    let secs = started.elapsed().as_secs_f64();
    let rate = measure(r.counts.created, secs, cpu_before);
    assert!(r.error.is_none(), "{:?}", r.error);
    let requests = format!(
        "LMS requests: POST {}, PATCH {}, GET {}; Graph: member pages {}, manager $batch {}",
        sim.request_count("POST"),
        sim.request_count("PATCH"),
        sim.request_count("GET"),
        graph.request_count("transitiveMembers"),
        graph.request_count("batch")
    );
    graph.stop().await;
    sim.stop().await;
    (rate, r.counts.created, requests)
}

/// Runs the binary and returns (wall time, peak RSS in MiB, stdout).
async fn run_binary(config: &Path) -> (Duration, f64, String) {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
        .arg("--config")
        .arg(config)
        .args(["reconcile", "--json"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn rostersync");
    let pid = child.id().expect("pid");
    let mut peak_kib = 0u64;
    let stdout = child.stdout.take().expect("stdout");
    let reader = tokio::spawn(async move {
        use tokio::io::AsyncReadExt;
        let mut s = String::new();
        let mut out = stdout;
        let _ = out.read_to_string(&mut s).await;
        s
    });
    loop {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kib) = status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
            {
                peak_kib = peak_kib.max(kib);
            }
        }
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = reader.await.unwrap_or_default();
    (started.elapsed(), peak_kib as f64 / 1024.0, out)
}

/// MiB in MB (the goals are in MB).
fn mb(mib: f64) -> f64 {
    mib * 1024.0 * 1024.0 / 1e6
}

fn summary(json_out: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json_out).unwrap_or_default();
    let c = &v[0]["counts"];
    format!(
        "outcome {}, members {}, created {}, updated {}, deactivated {}",
        v[0]["outcome"], c["members"], c["created"], c["updated"], c["deactivated"]
    )
}

#[tokio::main]
async fn main() {
    let creates = arg("--creates", 10_000);
    let members = arg("--members", 100_000);
    println!(
        "rostersync reconcile bench ({} cores)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );

    // `--only b`: just B (for profiling).
    if only("b") {
        for _ in 0..arg("--rounds", 1) {
            let (ours, created, requests) = first_reconcile_rate(creates, false).await;
            println!(
                "B: {:.0} users/s{} ({created} created)\n   {requests}",
                ours.per_sec,
                cpu_text(&ours)
            );
        }
        return;
    }
    // `--only c`: just C.
    if only("c") {
        binary_runs(members).await;
        return;
    }
    // `--only a2`: A and A2 alternating, to compare the SCIM client with the bare one.
    if only("a2") {
        for _ in 0..arg("--rounds", 5) {
            let base = baseline_post_rate(creates).await.per_sec;
            let direct = target_create_rate(creates).await;
            println!("A {base:.0} A2 {direct:.0} = {:.2}", direct / base);
        }
        return;
    }
    // A and B alternate, each on fresh simulators, so that both see the same machine; the
    // ratio is taken per round and the median reported.
    let rounds = arg("--rounds", 5).max(1);
    let mut ratios = Vec::new();
    let mut cpu_ratios = Vec::new();
    let (mut a_rates, mut b_rates) = (Vec::new(), Vec::new());
    let mut requests = String::new();
    for round in 1..=rounds {
        let a = baseline_post_rate(creates).await;
        let (b, created, req) = first_reconcile_rate(creates, round == 1).await;
        let (base, ours) = (a.per_sec, b.per_sec);
        println!(
            "   round {round}: A {base:.0} users/s{}, B {ours:.0} users/s{} ({created} created) = {:.2} x A",
            cpu_text(&a),
            cpu_text(&b),
            ours / base
        );
        ratios.push(ours / base);
        if let (Some(ca), Some(cb)) = (a.cpu_us, b.cpu_us) {
            cpu_ratios.push(ca / cb);
        }
        a_rates.push(base);
        b_rates.push(ours);
        requests = req;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!("A. SCIM simulator POST rate, bare client, concurrency 8: median {:.0} users/s ({creates} users, {rounds} rounds)", median(&mut a_rates));
    println!(
        "B. rostersync first reconcile: median {:.0} users/s; median of the per-round ratios B/A = {:.2}\n   {requests}",
        median(&mut b_rates),
        median(&mut ratios)
    );
    if !cpu_ratios.is_empty() {
        println!(
            "   CPU per user, A's over B's: median {:.2} (what B/A would be if both used all cores all the time)",
            median(&mut cpu_ratios)
        );
    }
    let base = baseline_post_rate(creates).await.per_sec;
    let direct = target_create_rate(creates).await;
    println!(
        "A2. ScimTarget::create alone: {direct:.0} users/s = {:.2} x A (measured right after it)",
        direct / base
    );

    binary_runs(members).await;
}

/// C: the binary, a first and a no-change reconcile of a `members`-member group.
async fn binary_runs(members: usize) {
    let fx = fixture(members, 9);
    let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
    let sim = scim().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n{}",
        dir.path().join("data").display(),
        sim_config_toml("bench", &graph, &fx.tenant, &fx.all_group_id, &sim, TOKEN)
    );
    let config = dir.path().join("bench.toml");
    std::fs::write(&config, text).expect("write config");
    let (t1, rss1, out1) = run_binary(&config).await;
    println!(
        "C1. binary, first reconcile of {members} members: {:.1} s, peak RSS {rss1:.0} MiB = {:.0} MB (goal < 200 MB) ({})",
        t1.as_secs_f64(),
        mb(rss1),
        summary(&out1)
    );
    let (pages, batches) = (
        graph.request_count("transitiveMembers"),
        graph.request_count("batch"),
    );
    let (t2, rss2, out2) = run_binary(&config).await;
    println!("C2. binary, no-change reconcile of {members} members: {:.1} s, peak RSS {rss2:.0} MiB = {:.0} MB (goal < 200 MB) ({})", t2.as_secs_f64(), mb(rss2), summary(&out2));
    println!(
        "Graph requests in C2: member pages {}, manager $batch {}; LMS writes in C2: none expected",
        graph.request_count("transitiveMembers") - pages,
        graph.request_count("batch") - batches
    );
}

// The allocator of the `rostersync` binary (src/main.rs), so B measures what ships; A and the
// simulators use it too.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
