//! Soak: the differential test of `serve` (tests/differential.rs) over many seeds.
//!
//! ```text
//! cargo bench --bench soak -- [--seeds N] [--start S] [--jobs J]
//! ```
//!
//! Runs seeds S..S+N (default 1..=1000), J at a time (default 2), each with its own simulators,
//! data directory and `serve` process, and prints one line per seed as it finishes, then the
//! totals (changes, kills, chaos, violations by kind) and the failing seeds. Every violation,
//! with the seed and the command that replays it, is written to
//! `target/tmp/differential/soak-S-E.txt`. Exits 1 when any invariant was violated.
//! `DIFF_MANAGER_LINK`, `DIFF_WINDOW_MS`, `DIFF_READ_SLACK_MS`, `DIFF_CONVERGE_MS` and
//! `DIFF_STEPS` apply as in the test.

#[path = "../tests/it/common/mod.rs"]
mod common;
#[path = "../tests/differential/engine.rs"]
mod engine;

use std::io::Write;
use std::sync::{Arc, Mutex};

fn main() {
    let mut seeds: u64 = 1000;
    let mut start: u64 = 1;
    let mut jobs: usize = 2;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> u64 {
            args.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| usage(&format!("{name} needs a number")))
        };
        match a.as_str() {
            "--seeds" => seeds = value("--seeds"),
            "--start" => start = value("--start"),
            "--jobs" => jobs = value("--jobs") as usize,
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    if seeds == 0 || jobs == 0 {
        usage("--seeds and --jobs must be at least 1");
    }
    let end = start + seeds - 1;
    let settings = engine::Settings::from_env(Arc::new(|seed| {
        format!("cargo bench --bench soak -- --start {seed} --seeds 1")
    }));
    let report_path = settings.keep_logs.join(format!("soak-{start}-{end}.txt"));
    std::fs::create_dir_all(&settings.keep_logs).expect("create the report directory");
    let report = Arc::new(Mutex::new(
        std::fs::File::create(&report_path).expect("create the report file"),
    ));
    println!(
        "soak: seeds {start}..={end}, {jobs} at a time, manager links: {}",
        settings.link.name()
    );
    let started = std::time::Instant::now();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let done = {
        let report = Arc::clone(&report);
        move |o: &engine::Outcome| {
            // A full disk or a closed pipe must not end the soak (println! would panic).
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", o.line());
            for v in &o.violations {
                let _ = writeln!(out, "    {}", v.detail.lines().next().unwrap_or_default());
            }
            drop(out);
            let mut f = report.lock().unwrap_or_else(|e| e.into_inner());
            for v in &o.violations {
                let _ = writeln!(f, "{}\n", v.detail);
            }
        }
    };
    let outcomes = runtime.block_on(engine::run_seeds(
        (start..=end).collect(),
        jobs,
        &settings,
        done,
    ));
    let mut totals = engine::Totals::default();
    for o in &outcomes {
        totals.add(o);
    }
    let summary = format!(
        "{}in {:.0} s; violations with their replay commands: {}",
        totals.report(),
        started.elapsed().as_secs_f64(),
        report_path.display()
    );
    println!("\n{summary}");
    let _ = writeln!(
        report.lock().unwrap_or_else(|e| e.into_inner()),
        "{summary}"
    );
    if !totals.failing.is_empty() {
        std::process::exit(1);
    }
}

fn usage(problem: &str) -> ! {
    if !problem.is_empty() {
        eprintln!("soak: {problem}");
    }
    eprintln!("usage: cargo bench --bench soak -- [--seeds N] [--start S] [--jobs J]");
    std::process::exit(2);
}
