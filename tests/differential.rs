//! Incremental ≡ reconcile: seeded random directory changes with notification chaos, Graph
//! 429s, delta-link expiry and SIGKILLs of `serve`, checked against the simulators' truth (see
//! `differential/engine.rs` for the invariants and how each is checked).
//!
//! `cargo test --test differential` runs the regression seeds and seeds 1-16, three at a time.
//! `DIFF_SEEDS=1-200` picks other seeds (plus the regression seeds), `DIFF_SEED=N` replays
//! one seed alone, `DIFF_JOBS=N` sets how many run at once. The soak (`cargo bench --bench
//! soak`) runs the same engine over 1,000+ seeds.

#[path = "it/common/mod.rs"]
mod common;
#[path = "differential/engine.rs"]
mod engine;

use std::sync::Arc;

/// Seeds that once failed, always run: what each found (on 6250fc8, before the rewrite of the
/// incremental path; seeds 1-16 found more, see their output).
const REGRESSION_SEEDS: &[u64] = &[
    // Nested group detached, serve killed and restarted meanwhile: start-up deleted the nested
    // group's subscription, Graph's notifications for it got 403, and after re-attaching its
    // members stayed inactive (and a hired manager was never created).
    17,
    // Moved direct -> nested (removed, added 15 ms later): deactivated while already back in;
    // re-attached nested group's members left inactive until a reconcile.
    21,
    // A manager soft- or hard-deleted: reports keep manager.value, managerEmail and
    // managerDisplayName until a reconcile.
    30,
    // Moved nested -> direct, added before removed (never out of the groups): deactivated.
    32,
    // Nested group detached and re-attached without any kill: its members stay inactive.
    46,
    // Moved nested -> direct: deactivated 0.17 s after being added back; once also a new hire
    // deactivated 0.17 s after joining (its own user notification, read against the mirror).
    47,
    // A permanently deleted manager: reports keep the link and the manager's name and mail.
    83,
    // disable -> enable within 20 ms: the deactivation written 1 s after the re-enable (seen
    // once); a manager hired into the group never linked to the reports.
    119,
    // A manager soft-deleted, then restored: the reports lost the link while it was gone and
    // never got it back (Graph notifies only about the manager; seen under load, on 5cb7fde).
    292, // The same with a manager restored after its reports were read (on 5cb7fde).
    496,
    // A reconcile wrote a deactivation 1.03 s after the confirming read (a machine at load 11;
    // on 5cb7fde).
    662,
    // Three departures (one from a nested group detached after a 400 syncStateNotFound and
    // kills) waited 1 s each time their confirming read took over a second (Graph 429s with
    // Retry-After): not converged within 10 s (on 80dd99d).
    1249,
    // Nested group detached while serve was down: the restart deleted the nested group's
    // subscription and the detached members were never deactivated (active non-members until
    // a reconcile); notifications for the deleted subscription answered 403.
    2094,
    // A user enabled while their manager was soft-deleted (3 ms apart) was written with no
    // manager, and the manager was restored: never linked, not even by the reconcile (its
    // users delta showed no change since its last run; on 1f9ba31).
    1337,
    // A disabled member soft-deleted, listed by a reconcile while gone (so dropped from the
    // mirror: listings hide soft-deleted users, group delta does not, and never announces the
    // return), restored and enabled: its notification was ignored as a stranger's (on 78a7e4c).
    1362,
];

/// Seeds run by default besides the regression seeds.
const DEFAULT_SEEDS: &str = "1-16";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incremental_sync_agrees_with_reconcile_under_chaos() {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let seeds: Vec<u64> = match (env("DIFF_SEED"), env("DIFF_SEEDS")) {
        (Some(one), _) => engine::parse_seeds(&one).expect("DIFF_SEED"),
        (None, list) => {
            let mut s = REGRESSION_SEEDS.to_vec();
            s.extend(
                engine::parse_seeds(list.as_deref().unwrap_or(DEFAULT_SEEDS)).expect("DIFF_SEEDS"),
            );
            s.sort();
            s.dedup();
            s
        }
    };
    let jobs = env("DIFF_JOBS")
        .map(|j| j.parse::<usize>().expect("DIFF_JOBS"))
        .unwrap_or(3);
    let settings = engine::Settings::from_env(Arc::new(|seed| {
        format!("DIFF_SEED={seed} cargo test --test differential -- --nocapture")
    }));
    println!(
        "differential: {} seeds, {jobs} at a time, manager links: {}",
        seeds.len(),
        settings.link.name()
    );
    let outcomes = engine::run_seeds(seeds, jobs, &settings, |o| println!("{}", o.line())).await;
    let mut totals = engine::Totals::default();
    for o in &outcomes {
        totals.add(o);
    }
    println!("{}", totals.report());
    let violations: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.violations.iter().map(|v| v.detail.clone()))
        .collect();
    assert!(
        violations.is_empty(),
        "{} invariant violations:\n\n{}\n\n{}",
        violations.len(),
        violations.join("\n\n"),
        totals.report()
    );
}
