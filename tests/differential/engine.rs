//! The differential engine behind `tests/differential.rs` and `benches/soak.rs`: one seed is one
//! small simulated tenant, the real `rostersync serve` binary as a child process, a seeded
//! random sequence of directory changes made in the Graph simulator with notification chaos,
//! Graph 429s, delta-link expiry and SIGKILLs of `serve` (some in its start-up), and then these
//! invariants checked against the simulator's truth (never through rostersync's own mapping
//! code):
//!
//! * **no wrong deactivation**: every write that left a user inactive (the SCIM simulator's
//!   write log, so every write is seen, not samples) is checked against the timeline of
//!   changes this engine made: if the user was an enabled member of the group continuously
//!   for `window` before the write, it is wrong — unless the last read of that user from Graph
//!   before the write (the Graph simulator's read log) answered while they were not an enabled
//!   member, at most `read_slack` before the write (the write then followed Graph's freshest
//!   word, only late);
//! * **convergence without a reconcile**: when the chaos dropped no notification, the LMS equals
//!   the truth within `converge_within` of the later of the last change and the last restart,
//!   and stays so until Graph has nothing left to deliver (a batch Graph gives up on because
//!   `serve` refused it or did not answer is `serve`'s doing, not the chaos');
//! * **reconcile agrees**: `serve` stopped, `rostersync reconcile` on the same data directory
//!   writes nothing to the LMS when nothing was dropped, and leaves the LMS equal to the truth
//!   in every case;
//! * **nothing acknowledged is lost across SIGKILLs**: covered by the convergence invariant of
//!   the seeds that were killed and lost no notification (every change then reached `serve`
//!   in a batch it answered 2xx, before or after a kill, or `serve` refused it);
//! * **one subscription per resource** at the end (a second one is an orphan of a start-up that
//!   was killed).
//!
//! The truth's manager link follows [`ManagerLink`] (`DIFF_MANAGER_LINK`, default `active`:
//! a report links to its manager's LMS user only while the manager is an enabled member).
//!
//! Odd seeds' SCIM simulator offers bulk (`POST /Bulk`, 10 operations a request): rostersync
//! then writes through it, and the same invariants hold.
//!
//! A seed fixes the tenant, the changes, the chaos and where the kills fall; timing is real, so
//! a replay runs the same script but not always the same interleaving.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync_sim::graph::{
    fixture, GraphFaults, GraphSim, NotifyFaults, SimUser, UserRead, FIXTURE_DOMAIN,
};
use rostersync_sim::scim::{ScimSim, ScimSimConfig, ScimWrite, SimBulk};
use tokio::io::AsyncBufReadExt;

use crate::common::{lms_differences, upn, ManagerLink, SCIM_TOKEN};

/// What the invariants allow and where failing seeds' logs go.
#[derive(Clone)]
pub struct Settings {
    /// Manager-link rule of the truth (see [`ManagerLink`]).
    pub link: ManagerLink,
    /// A deactivation of someone who was an enabled member for this long is wrong (100 ms).
    pub window: Duration,
    /// How late a deactivation may follow the Graph read that found the user out (1 s).
    pub read_slack: Duration,
    /// Convergence deadline after the last change or restart (10 s).
    pub converge_within: Duration,
    /// Changes per seed (inclusive range).
    pub steps: (usize, usize),
    /// Failing seeds' `serve` logs are copied here as `seed-N.log`.
    pub keep_logs: PathBuf,
    /// The command that replays one seed.
    pub replay: Arc<dyn Fn(u64) -> String + Send + Sync>,
}

impl Settings {
    /// The defaults, with `DIFF_MANAGER_LINK` (`active`, `member`, `indexed`), `DIFF_WINDOW_MS`,
    /// `DIFF_READ_SLACK_MS`, `DIFF_CONVERGE_MS` and `DIFF_STEPS` (`min-max`) read from the
    /// environment.
    pub fn from_env(replay: Arc<dyn Fn(u64) -> String + Send + Sync>) -> Settings {
        let ms = |k: &str, d: u64| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_millis)
                .unwrap_or(Duration::from_millis(d))
        };
        let link = match std::env::var("DIFF_MANAGER_LINK") {
            Ok(v) => ManagerLink::parse(v.trim()).unwrap_or_else(|| {
                panic!("DIFF_MANAGER_LINK={v:?}: use active, member or indexed")
            }),
            Err(_) => ManagerLink::Active,
        };
        let steps = std::env::var("DIFF_STEPS")
            .ok()
            .and_then(|v| {
                let (a, b) = v.trim().split_once('-')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .unwrap_or((10, 22));
        Settings {
            link,
            window: ms("DIFF_WINDOW_MS", 100),
            read_slack: ms("DIFF_READ_SLACK_MS", 1000),
            converge_within: ms("DIFF_CONVERGE_MS", 10_000),
            steps,
            keep_logs: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("differential"),
            replay,
        }
    }

    /// The environment a replay needs besides the seed (the settings that differ from the
    /// defaults).
    pub fn replay_env(&self) -> String {
        let mut out = String::new();
        for k in [
            "DIFF_MANAGER_LINK",
            "DIFF_WINDOW_MS",
            "DIFF_READ_SLACK_MS",
            "DIFF_CONVERGE_MS",
            "DIFF_STEPS",
        ] {
            if let Ok(v) = std::env::var(k) {
                let _ = write!(out, "{k}={v} ");
            }
        }
        out
    }
}

/// The kinds of violation, in report order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `serve` did not start, did not apply the first reconcile, crashed, or did not stop.
    Process,
    WrongDeactivation,
    Convergence,
    ReconcileWrote,
    ReconcileDiffers,
    /// The `reconcile` command failed.
    ReconcileFailed,
    /// Graph holds more than one subscription for a resource (one that `serve` lost track of).
    Subscriptions,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Process,
        Kind::WrongDeactivation,
        Kind::Convergence,
        Kind::ReconcileWrote,
        Kind::ReconcileDiffers,
        Kind::ReconcileFailed,
        Kind::Subscriptions,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Kind::Process => "serve process",
            Kind::WrongDeactivation => "wrong deactivation",
            Kind::Convergence => "no convergence without reconcile",
            Kind::ReconcileWrote => "reconcile wrote after lossless run",
            Kind::ReconcileDiffers => "LMS differs after reconcile",
            Kind::ReconcileFailed => "reconcile command failed",
            Kind::Subscriptions => "leaked subscription",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Violation {
    pub kind: Kind,
    pub detail: String,
}

/// The chaos a seed drew.
#[derive(Clone, Debug, Default)]
pub struct Chaos {
    pub drop_rate: f64,
    pub duplicate_rate: f64,
    pub reorder: bool,
    pub delay_ms: u64,
    pub throttle_rate: f64,
    /// Step at which every delta link starts answering 410 Gone.
    pub expire_410_at: Option<usize>,
    /// Step at which every delta link becomes unknown (400 syncStateNotFound).
    pub forget_400_at: Option<usize>,
    /// (step, steps until the restart) of each SIGKILL.
    pub kills: Vec<(usize, usize)>,
    /// Kill `serve` again this many ms after the first restart printed that it listens (in
    /// its start-up: subscriptions, first reads), then restart it.
    pub startup_kill_ms: Option<u64>,
    /// Kill the very first `serve` this many ms after it listens (while it creates the
    /// subscriptions), then start it again.
    pub first_start_kill_ms: Option<u64>,
    /// After this step: several direct members removed at once, `serve` killed while it
    /// writes their deactivations, the members added back while it is down, then restarted.
    pub burst_at: Option<usize>,
}

/// What happened to one seed.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub seed: u64,
    pub users: usize,
    pub mutations: usize,
    pub chaos: Chaos,
    pub kills: usize,
    pub dropped: u64,
    pub duplicated: u64,
    pub abandoned: u64,
    /// Failed delivery attempts by answer (`503`, `connection refused`, ...).
    pub refused: BTreeMap<String, u64>,
    pub throttled: u64,
    /// Full reconciles `serve` ran itself (besides the first), with their reasons.
    pub serve_reconciles: Vec<String>,
    /// When nothing was dropped or abandoned (the convergence invariant applies).
    pub lossless: bool,
    /// Time from the last change (or restart) to the LMS matching the truth.
    pub converged_after: Option<Duration>,
    /// LMS writes of the final `reconcile`.
    pub reconcile_writes: u64,
    /// Deactivations written, and how many of them a Graph read excused (see module doc).
    pub deactivations: usize,
    pub excused: usize,
    pub violations: Vec<Violation>,
    /// Things worth knowing that are not violations (e.g. why Graph gave up on a batch).
    pub notes: Vec<String>,
    pub elapsed: Duration,
    pub log: Option<PathBuf>,
}

impl Outcome {
    /// One line: the seed, what it did, and OK or its violations' kinds.
    pub fn line(&self) -> String {
        let c = &self.chaos;
        let mut chaos = Vec::new();
        if c.drop_rate > 0.0 {
            chaos.push(format!("drop {:.2}", c.drop_rate));
        }
        if c.duplicate_rate > 0.0 {
            chaos.push(format!("dup {:.2}", c.duplicate_rate));
        }
        if c.reorder {
            chaos.push("reorder".into());
        }
        if c.delay_ms > 0 {
            chaos.push(format!("delay {}ms", c.delay_ms));
        }
        if c.throttle_rate > 0.0 {
            chaos.push(format!("429 {:.2}", c.throttle_rate));
        }
        if c.expire_410_at.is_some() {
            chaos.push("410".into());
        }
        if c.forget_400_at.is_some() {
            chaos.push("400".into());
        }
        if let Some(ms) = c.first_start_kill_ms {
            chaos.push(format!("kill in first start +{ms}ms"));
        }
        if let Some(ms) = c.startup_kill_ms {
            chaos.push(format!("kill in start-up +{ms}ms"));
        }
        if c.burst_at.is_some() {
            chaos.push("burst+kill".into());
        }
        let conv = match self.converged_after {
            Some(d) => format!("converged {:.1}s", d.as_secs_f64()),
            None => "not converged".into(),
        };
        let verdict = if self.violations.is_empty() {
            "OK".to_string()
        } else {
            let mut kinds: BTreeMap<Kind, usize> = BTreeMap::new();
            for v in &self.violations {
                *kinds.entry(v.kind).or_default() += 1;
            }
            let parts: Vec<String> = kinds
                .iter()
                .map(|(k, n)| format!("{} x{n}", k.name()))
                .collect();
            format!("FAIL: {}", parts.join(", "))
        };
        let notes: String = self
            .notes
            .iter()
            .map(|n| format!("\n    note: {n}"))
            .collect();
        let refused: Vec<String> = self
            .refused
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        format!(
            "seed {}: {} users, {} changes, {} kills, chaos [{}] (dropped {}, dup {}, abandoned {}, failed deliveries [{}], 429s {}), {} serve reconciles, {}{}, reconcile wrote {}, {:.0}s: {}{}",
            self.seed,
            self.users,
            self.mutations,
            self.kills,
            chaos.join(" "),
            self.dropped,
            self.duplicated,
            self.abandoned,
            refused.join(", "),
            self.throttled,
            self.serve_reconciles.len(),
            conv,
            if self.lossless { "" } else { " (lossy)" },
            self.reconcile_writes,
            self.elapsed.as_secs_f64(),
            verdict,
            notes
        )
    }
}

/// Totals over many seeds.
#[derive(Debug, Default)]
pub struct Totals {
    pub seeds: usize,
    pub mutations: usize,
    pub kills: usize,
    pub lossy_seeds: usize,
    pub dropped: u64,
    pub duplicated: u64,
    pub abandoned: u64,
    pub throttled: u64,
    pub expiries_410: usize,
    pub expiries_400: usize,
    pub reordered_seeds: usize,
    pub delayed_seeds: usize,
    pub serve_reconciles: usize,
    pub deactivations: usize,
    pub excused: usize,
    pub violations: BTreeMap<Kind, usize>,
    pub failing: Vec<u64>,
}

impl Totals {
    pub fn add(&mut self, o: &Outcome) {
        self.seeds += 1;
        self.mutations += o.mutations;
        self.kills += o.kills;
        self.lossy_seeds += usize::from(!o.lossless);
        self.dropped += o.dropped;
        self.duplicated += o.duplicated;
        self.abandoned += o.abandoned;
        self.throttled += o.throttled;
        self.expiries_410 += usize::from(o.chaos.expire_410_at.is_some());
        self.expiries_400 += usize::from(o.chaos.forget_400_at.is_some());
        self.reordered_seeds += usize::from(o.chaos.reorder);
        self.delayed_seeds += usize::from(o.chaos.delay_ms > 0);
        self.serve_reconciles += o.serve_reconciles.len();
        self.deactivations += o.deactivations;
        self.excused += o.excused;
        for v in &o.violations {
            *self.violations.entry(v.kind).or_default() += 1;
        }
        if !o.violations.is_empty() {
            self.failing.push(o.seed);
        }
    }

    pub fn report(&self) -> String {
        let mut s = format!(
            "{} seeds, {} changes, {} SIGKILLs, chaos: {} lossy seeds ({} notifications dropped, {} batches abandoned), {} duplicated, {} seeds reordered, {} delayed, {} Graph 429s, {} delta expiries 410, {} delta expiries 400; {} full reconciles run by serve; {} deactivations written ({} after a Graph read said so, late)\n",
            self.seeds,
            self.mutations,
            self.kills,
            self.lossy_seeds,
            self.dropped,
            self.abandoned,
            self.duplicated,
            self.reordered_seeds,
            self.delayed_seeds,
            self.throttled,
            self.expiries_410,
            self.expiries_400,
            self.serve_reconciles,
            self.deactivations,
            self.excused,
        );
        if self.violations.is_empty() {
            s.push_str("violations: none\n");
        } else {
            s.push_str("violations:");
            for k in Kind::ALL {
                if let Some(n) = self.violations.get(&k) {
                    let _ = write!(s, " {}: {n};", k.name());
                }
            }
            let seeds: Vec<String> = self.failing.iter().map(u64::to_string).collect();
            let _ = writeln!(s, "\nfailing seeds: {}", seeds.join(","));
        }
        s
    }
}

/// Seeds from a list such as `1-20,35,40-42`.
pub fn parse_seeds(text: &str) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let a: u64 = a.trim().parse().map_err(|_| format!("bad seed {a:?}"))?;
                let b: u64 = b.trim().parse().map_err(|_| format!("bad seed {b:?}"))?;
                if b < a {
                    return Err(format!("empty range {part}"));
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| format!("bad seed {part:?}"))?),
        }
    }
    Ok(out)
}

/// Runs `seeds` in order, `jobs` at a time, calling `done` as each finishes; outcomes in seed
/// order.
pub async fn run_seeds(
    seeds: Vec<u64>,
    jobs: usize,
    settings: &Settings,
    done: impl Fn(&Outcome),
) -> Vec<Outcome> {
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::new();
    let mut collect = |r: Result<Outcome, tokio::task::JoinError>| match r {
        Ok(o) => {
            done(&o);
            out.push(o);
        }
        Err(e) => panic!("a seed's task failed: {e}"),
    };
    for seed in seeds {
        while set.len() >= jobs.max(1) {
            if let Some(r) = set.join_next().await {
                collect(r);
            }
        }
        let settings = settings.clone();
        set.spawn(async move {
            use futures::FutureExt;
            let run = std::panic::AssertUnwindSafe(run_seed(seed, &settings)).catch_unwind();
            match run.await {
                Ok(o) => o,
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let mut o = Outcome {
                        seed,
                        ..Default::default()
                    };
                    o.violations.push(Violation {
                        kind: Kind::Process,
                        detail: format!("the harness panicked: {why}"),
                    });
                    finish(&mut o, &settings, None);
                    o
                }
            }
        });
    }
    while let Some(r) = set.join_next().await {
        collect(r);
    }
    out.sort_by_key(|o| o.seed);
    out
}

// ---------------------------------------------------------------------------------------------
// Truth over time
// ---------------------------------------------------------------------------------------------

/// One change made to the simulator, with the instants around the call (its effect is certain
/// only after `after`) and the enabled transitive members after it.
struct Change {
    before: Instant,
    after: Instant,
    what: String,
    users: Vec<String>,
    enabled_members: HashSet<String>,
}

/// The changes in order; `initial` holds before the first one.
struct Timeline {
    initial: HashSet<String>,
    changes: Vec<Change>,
}

impl Timeline {
    /// States (0 = initial, k = after change k-1) that may hold at some instant of [a, b].
    /// State k may hold from `changes[k-1].before` until `changes[k].after`.
    fn states_during(&self, a: Instant, b: Instant) -> Vec<usize> {
        let n = self.changes.len();
        (0..=n)
            .filter(|&k| {
                let from_ok = k == 0 || self.changes[k - 1].before <= b;
                let until_ok = k == n || self.changes[k].after >= a;
                from_ok && until_ok
            })
            .collect()
    }

    fn state(&self, k: usize) -> &HashSet<String> {
        if k == 0 {
            &self.initial
        } else {
            &self.changes[k - 1].enabled_members
        }
    }

    /// The user was certainly an enabled member at every instant of [a, b].
    fn member_throughout(&self, user: &str, a: Instant, b: Instant) -> bool {
        self.states_during(a, b)
            .into_iter()
            .all(|k| self.state(k).contains(user))
    }

    /// Since when the user has certainly been an enabled member, looking back from `t`
    /// (`None`: not certainly one at `t`); the change that made them one, if any.
    fn member_since(&self, user: &str, t: Instant) -> Option<(Option<Instant>, Option<usize>)> {
        let states = self.states_during(t, t);
        if !states.iter().all(|&k| self.state(k).contains(user)) {
            return None;
        }
        let mut k = *states.iter().min()?;
        while k > 0 && self.state(k - 1).contains(user) {
            k -= 1;
        }
        if k == 0 {
            Some((None, None))
        } else {
            Some((Some(self.changes[k - 1].after), Some(k - 1)))
        }
    }

    /// The last changes that touched the user, as lines relative to `t0`.
    fn history(&self, user: &str, t0: Instant, last: usize) -> Vec<String> {
        let mut h: Vec<String> = self
            .changes
            .iter()
            .filter(|c| c.users.is_empty() || c.users.iter().any(|u| u == user))
            .map(|c| {
                if c.users.is_empty() {
                    format!("+{:.3}s [{}]", secs(c.after, t0), c.what)
                } else {
                    format!(
                        "+{:.3}s {} (enabled member after: {})",
                        secs(c.after, t0),
                        c.what,
                        c.enabled_members.contains(user)
                    )
                }
            })
            .collect();
        if h.len() > last {
            h.drain(..h.len() - last);
        }
        h
    }
}

fn secs(t: Instant, t0: Instant) -> f64 {
    if t >= t0 {
        t.duration_since(t0).as_secs_f64()
    } else {
        -(t0.duration_since(t).as_secs_f64())
    }
}

// ---------------------------------------------------------------------------------------------
// serve as a child process
// ---------------------------------------------------------------------------------------------

struct Serve {
    child: tokio::process::Child,
    addr: SocketAddr,
    started: Instant,
}

async fn spawn_serve(config: &Path, log: &Path) -> Result<Serve, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("open {}: {e}", log.display()))?;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
        .arg("--config")
        .arg(config)
        .args([
            "--log",
            &std::env::var("DIFF_SERVE_LOG").unwrap_or_else(|_| "info".into()),
            "serve",
        ])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn rostersync serve: {e}"))?;
    let Some(stdout) = child.stdout.take() else {
        return Err("no stdout".into());
    };
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let found = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.trim().parse::<SocketAddr>().ok();
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(addr)) => {
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            Ok(Serve {
                child,
                addr,
                started: Instant::now(),
            })
        }
        Ok(None) => {
            let status = child.wait().await.ok();
            Err(format!("serve exited before listening ({status:?})"))
        }
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            Err("serve did not listen within 60 s".into())
        }
    }
}

/// A free port below the kernel's ephemeral range (32768 and up on Linux), so that no outgoing
/// connection takes it while `serve` is down between a SIGKILL and its restart.
fn free_port() -> Result<u16, String> {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    if NEXT.load(Ordering::Relaxed) == 0 {
        let _ = NEXT.compare_exchange(
            0,
            rand::rng().random_range(20_000..30_000),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    for _ in 0..2000 {
        let mut port = NEXT.fetch_add(1, Ordering::Relaxed);
        if !(20_000..32_000).contains(&port) {
            NEXT.store(20_001, Ordering::Relaxed);
            port = 20_000;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err("no free port in 20000..32000".into())
}

fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// One seed
// ---------------------------------------------------------------------------------------------

const STAFF_TITLES: &[&str] = &[
    "Analyst",
    "Senior Analyst",
    "Team Lead",
    "Consultant",
    "Engineer",
    "Coordinator",
];
const DEPARTMENTS: &[&str] = &[
    "Finance",
    "Sales",
    "Engineering",
    "Legal",
    "Operations",
    "Research",
];

struct Run {
    seed: u64,
    settings: Settings,
    rng: StdRng,
    graph: GraphSim,
    scim: ScimSim,
    all: String,
    nested: String,
    dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
    serve: Option<Serve>,
    port: u16,
    timeline: Timeline,
    t0: Instant,
    /// Users this run soft-deleted and did not restore or delete since.
    soft_deleted: Vec<String>,
    hard_deletes: usize,
    counter: u64,
    violations: Vec<Violation>,
    kills: usize,
    last_listening: Instant,
    reconcile_started: Option<Instant>,
    /// Wall-clock times of kills and restarts (to compare with Graph's delivery log).
    process_log: Vec<String>,
    /// See [`Chaos::startup_kill_ms`]; taken when done.
    startup_kill_ms: Option<u64>,
}

/// Runs one seed; never panics on a product failure (those are violations).
pub async fn run_seed(seed: u64, settings: &Settings) -> Outcome {
    let started = Instant::now();
    let mut out = Outcome {
        seed,
        ..Default::default()
    };
    let mut run = match Run::setup(seed, settings, &mut out).await {
        Ok(r) => r,
        Err(e) => {
            out.violations.push(Violation {
                kind: Kind::Process,
                detail: e,
            });
            out.elapsed = started.elapsed();
            finish(&mut out, settings, None);
            return out;
        }
    };
    run.drive(&mut out).await;
    out.violations.append(&mut run.violations);
    out.elapsed = started.elapsed();
    finish(&mut out, settings, Some(&run.log));
    out
}

/// A failing seed keeps its `serve` log; each violation gets the seed, its kind and the replay
/// command.
fn finish(out: &mut Outcome, settings: &Settings, log: Option<&Path>) {
    if out.violations.is_empty() {
        return;
    }
    let seed = out.seed;
    if let Some(log) = log {
        let _ = std::fs::create_dir_all(&settings.keep_logs);
        let kept = settings.keep_logs.join(format!("seed-{seed}.log"));
        if std::fs::copy(log, &kept).is_ok() {
            out.log = Some(kept);
        }
    }
    let replay = format!("{}{}", settings.replay_env(), (settings.replay)(seed));
    let log = out
        .log
        .as_ref()
        .map(|l| format!("\n    serve log: {}", l.display()))
        .unwrap_or_default();
    for v in &mut out.violations {
        v.detail = format!(
            "seed {seed}: {}: {}\n    replay: {replay}{log}",
            v.kind.name(),
            v.detail
        );
    }
}

impl Run {
    async fn setup(seed: u64, settings: &Settings, out: &mut Outcome) -> Result<Run, String> {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xd1ff_e7e7_5eed_0001);
        let n = rng.random_range(20..=36);
        out.users = n;
        let mut fx = fixture(n, seed);
        // Managers outside the groups (besides the CEO, who manages the VPs): each manages one
        // or two members, so hiring them later must link their reports.
        let member_ids: Vec<String> = fx
            .tenant
            .users
            .iter()
            .filter(|u| u.id != fx.ceo_id)
            .map(|u| u.id.clone())
            .collect();
        for k in 0..3 {
            let id = guid(&mut rng);
            let o = person(
                &id,
                &format!("outside.manager{k}"),
                "Outside",
                &format!("Manager {k}"),
                Some(fx.ceo_id.clone()),
            );
            for _ in 0..rng.random_range(1..=2) {
                let r = member_ids[rng.random_range(0..member_ids.len())].clone();
                if let Some(u) = fx.tenant.users.iter_mut().find(|u| u.id == r) {
                    u.manager_id = Some(id.clone());
                }
            }
            fx.tenant.users.push(o);
        }
        let graph = GraphSim::start(fx.tenant.clone())
            .await
            .map_err(|e| format!("graph simulator: {e}"))?;
        let scim = ScimSim::start(ScimSimConfig {
            token: SCIM_TOKEN.into(),
            custom_extension: Some(demo_custom_extension()),
            // Odd seeds' LMS offers SCIM bulk (small requests, so the worker's batches and the
            // reconciles both fill several).
            bulk: (seed % 2 == 1).then_some(SimBulk {
                max_operations: 10,
                ..SimBulk::default()
            }),
            ..Default::default()
        })
        .await
        .map_err(|e| format!("SCIM simulator: {e}"))?;
        graph.record_user_reads(true);
        scim.record_writes(true);
        // Graph's delivery retries, compressed (real Graph keeps trying for hours).
        graph.set_delivery_retry(Duration::from_millis(100), Duration::from_secs(20));
        let mut dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        // DIFF_KEEP=1 keeps the data directory (store, config) for `explain` after the run.
        if std::env::var_os("DIFF_KEEP").is_some() {
            dir.disable_cleanup(true);
            eprintln!("seed {seed}: data kept in {}", dir.path().display());
        }
        let config = dir.path().join("rostersync.toml");
        let log = dir.path().join("serve.log");
        let mut run = Run {
            seed,
            settings: settings.clone(),
            rng,
            all: fx.all_group_id.clone(),
            nested: fx.nested_group_id.clone(),
            graph,
            scim,
            dir,
            config,
            log,
            serve: None,
            port: 0,
            timeline: Timeline {
                initial: HashSet::new(),
                changes: Vec::new(),
            },
            t0: Instant::now(),
            soft_deleted: Vec::new(),
            hard_deletes: 0,
            counter: 0,
            violations: Vec::new(),
            kills: 0,
            last_listening: Instant::now(),
            reconcile_started: None,
            process_log: Vec::new(),
            startup_kill_ms: None,
        };
        run.timeline.initial = run.enabled_members();
        run.port = free_port()?;
        run.write_config();
        let serve = spawn_serve(&run.config, &run.log)
            .await
            .map_err(|e| format!("{e}; log ends:\n{}", log_tail(&run.log, 30)))?;
        run.last_listening = serve.started;
        run.serve = Some(serve);
        // Sometimes the very first start-up (which creates the subscriptions) is killed too.
        let mut extra = StdRng::seed_from_u64(seed ^ 0x57a7_0b00_7c11_0001);
        if extra.random_bool(0.2) {
            let ms = extra.random_range(0..60);
            out.chaos.first_start_kill_ms = Some(ms);
            run.startup_kill_ms = Some(ms);
            run.kill_in_startup().await;
            if run.serve.is_none() {
                return Err(format!(
                    "serve did not start again after a kill in its first start-up; log ends:\n{}",
                    log_tail(&run.log, 30)
                ));
            }
        }
        // Ready: subscriptions made, the first reconcile applied (generous: not an invariant).
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if run.graph.subscriptions().len() >= 2 && run.differences().is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let d = run.differences();
                return Err(format!(
                    "the first reconcile did not bring the LMS to the truth within 120 s ({} subscriptions; {} differences, e.g. {:?}); log ends:\n{}",
                    run.graph.subscriptions().len(),
                    d.len(),
                    d.iter().take(5).collect::<Vec<_>>(),
                    log_tail(&run.log, 30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // sled writes its log every 500 ms: let the first reconcile's bookkeeping reach the
        // disk, so a SIGKILL tests the incremental path rather than an unfinished first start.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        Ok(run)
    }

    fn write_config(&self) {
        let mut text = sim_config_toml(
            "diff",
            &self.graph,
            &tenant_stub(),
            &self.all,
            &self.scim,
            SCIM_TOKEN,
        );
        // No scheduled reconcile while the seed runs; no guard in the way of legitimate
        // departures (the guard has its own tests).
        text = text.replace(
            "\n[integration.target]",
            "schedule = \"0 0 0 1 1 *\"\nmax_deactivations = 100000\n\n[integration.target]",
        );
        let text = format!(
            "[server]\ndata_dir = \"{}\"\nlisten = \"127.0.0.1:{}\"\n{text}",
            self.dir.path().join("data").display(),
            self.port
        );
        std::fs::write(&self.config, text).expect("write the config");
    }

    fn differences(&self) -> Vec<String> {
        lms_differences(&self.graph, &self.scim, &self.all, upn, self.settings.link)
    }

    fn enabled_members(&self) -> HashSet<String> {
        self.graph
            .transitive_user_ids(&self.all)
            .into_iter()
            .filter(|id| self.graph.user(id).is_some_and(|u| u.account_enabled))
            .map(|id| id.to_lowercase())
            .collect()
    }

    /// Makes one change and records it on the timeline.
    fn change(&mut self, what: String, users: &[&str], f: impl FnOnce(&GraphSim)) {
        let before = Instant::now();
        f(&self.graph);
        let after = Instant::now();
        let enabled_members = self.enabled_members();
        self.timeline.changes.push(Change {
            before,
            after,
            what,
            users: users.iter().map(|u| u.to_lowercase()).collect(),
            enabled_members,
        });
    }

    fn name(&self, id: &str) -> String {
        self.graph
            .user(id)
            .map(|u| u.user_principal_name)
            .unwrap_or_else(|| id.to_string())
    }

    fn direct(&self, gid: &str) -> Vec<String> {
        self.graph
            .group(gid)
            .map(|g| g.members)
            .unwrap_or_default()
            .into_iter()
            .filter(|m| self.graph.user(m).is_some())
            .collect()
    }

    fn attached(&self) -> bool {
        self.graph
            .group(&self.all)
            .is_some_and(|g| g.members.contains(&self.nested))
    }

    /// Live users in neither group.
    fn outsiders(&self) -> Vec<String> {
        let inside: HashSet<String> = self
            .direct(&self.all)
            .into_iter()
            .chain(self.direct(&self.nested))
            .collect();
        self.graph
            .users()
            .into_iter()
            .map(|u| u.id)
            .filter(|id| !inside.contains(id))
            .collect()
    }

    fn members(&self) -> Vec<String> {
        let mut v = self.graph.transitive_user_ids(&self.all);
        v.sort();
        v
    }

    /// Ids of live users who manage at least one live user.
    fn managers(&self) -> HashSet<String> {
        let users = self.graph.users();
        let live: HashSet<&str> = users.iter().map(|u| u.id.as_str()).collect();
        users
            .iter()
            .filter_map(|u| u.manager_id.clone())
            .filter(|m| live.contains(m.as_str()))
            .collect()
    }

    fn pick(&mut self, v: &[String]) -> Option<String> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.rng.random_range(0..v.len())].clone())
        }
    }

    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    /// The script: chaos, then the steps with kills and delta expiries at their places, then
    /// the checks.
    async fn drive(&mut self, out: &mut Outcome) {
        let rng = &mut self.rng;
        let steps = rng.random_range(self.settings.steps.0..=self.settings.steps.1);
        let lossy = rng.random_bool(0.35);
        let mut chaos = Chaos {
            drop_rate: if lossy {
                rng.random_range(0.05..0.25)
            } else {
                0.0
            },
            duplicate_rate: if rng.random_bool(0.5) {
                rng.random_range(0.05..0.3)
            } else {
                0.0
            },
            reorder: rng.random_bool(0.5),
            delay_ms: if rng.random_bool(0.5) {
                rng.random_range(20..400)
            } else {
                0
            },
            throttle_rate: if rng.random_bool(0.5) {
                rng.random_range(0.01..0.05)
            } else {
                0.0
            },
            expire_410_at: rng.random_bool(0.3).then(|| rng.random_range(0..steps)),
            forget_400_at: rng.random_bool(0.3).then(|| rng.random_range(0..steps)),
            kills: Vec::new(),
            startup_kill_ms: None,
            first_start_kill_ms: out.chaos.first_start_kill_ms,
            burst_at: None,
        };
        let kills = match rng.random_range(0..100) {
            0..35 => 0,
            35..75 => 1,
            _ => 2,
        };
        let mut at: Vec<usize> = (0..kills)
            .map(|_| rng.random_range(1..steps.saturating_sub(2).max(2)))
            .collect();
        at.sort();
        at.dedup();
        for k in at {
            let restart_after = rng.random_range(0..=2usize);
            chaos.kills.push((k, restart_after));
        }
        // From an RNG of its own, so that adding this left every seed's script as it was.
        let mut extra = StdRng::seed_from_u64(self.seed ^ 0x57a7_0b00_7c11_0002);
        chaos.startup_kill_ms =
            (!chaos.kills.is_empty() && extra.random_bool(0.3)).then(|| extra.random_range(0..250));
        chaos.burst_at = extra
            .random_bool(0.15)
            .then(|| extra.random_range(0..steps));
        self.startup_kill_ms = chaos.startup_kill_ms;
        out.chaos = chaos.clone();

        self.graph.set_notify_faults(NotifyFaults {
            duplicate_rate: chaos.duplicate_rate,
            drop_rate: chaos.drop_rate,
            reorder: chaos.reorder,
            delay_ms: chaos.delay_ms,
            seed: self.seed,
        });
        self.graph.set_faults(GraphFaults {
            throttle_rate: chaos.throttle_rate,
            retry_after_secs: 1,
            seed: self.seed,
        });

        let mut restart_at: Option<usize> = None;
        for i in 0..steps {
            self.check_alive().await;
            if restart_at == Some(i) {
                restart_at = None;
                self.restart().await;
                self.kill_in_startup().await;
            }
            if let Some(&(_, after)) = chaos.kills.iter().find(|(k, _)| *k == i) {
                if self.serve.is_some() {
                    self.kill().await;
                    if after == 0 {
                        let pause = self.rng.random_range(0..300);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                        self.restart().await;
                        self.kill_in_startup().await;
                    } else {
                        restart_at = Some(i + after);
                    }
                }
            }
            if chaos.expire_410_at == Some(i) {
                self.change("every delta link expires (410)".into(), &[], |g| {
                    g.expire_delta_tokens()
                });
            }
            if chaos.forget_400_at == Some(i) {
                self.change(
                    "every delta link forgotten (400 syncStateNotFound)".into(),
                    &[],
                    |g| g.forget_delta_tokens(),
                );
            }
            let pause = match self.rng.random_range(0..100) {
                0..20 => 0,
                20..85 => self.rng.random_range(10..250),
                _ => self.rng.random_range(400..1500),
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
            self.step().await;
            out.mutations += 1;
            if chaos.burst_at == Some(i) {
                out.mutations += self.burst(&mut extra).await;
            }
        }
        if self.serve.is_none() {
            self.restart().await;
        }
        self.check_alive().await;
        let last_change = self
            .timeline
            .changes
            .last()
            .map(|c| c.after)
            .unwrap_or_else(Instant::now);
        self.converge(last_change, out).await;
        self.stop().await;
        self.check_subscriptions();
        out.kills = self.kills;
        let stats = self.graph.notify_stats();
        out.dropped = stats.dropped;
        out.duplicated = stats.duplicated;
        out.abandoned = stats.abandoned_batches;
        for a in self.graph.delivery_log() {
            if a.delivered() || a.lifecycle {
                continue;
            }
            let why = match (a.status, &a.error) {
                (Some(s), _) => s.to_string(),
                (None, Some(e)) if e.contains("timed out") => "timeout".into(),
                (None, _) => "no answer".into(),
            };
            *out.refused.entry(why.clone()).or_default() += 1;
            if a.attempt >= 6 {
                out.notes.push(format!(
                    "delivery attempt {} of a batch of {} to {} at {}: {why} {}",
                    a.attempt,
                    a.notifications,
                    a.url,
                    a.at.format("%H:%M:%S%.3f"),
                    a.error.as_deref().unwrap_or("")
                ));
            }
        }
        if out.abandoned > 0 {
            out.notes.append(&mut self.process_log);
        }
        out.throttled = self.graph.request_count("throttled");
        out.serve_reconciles = serve_reconciles(&self.log);
        self.reconcile(out).await;
        self.check_deactivations(out);
    }

    /// One random directory change (some are two changes a few milliseconds apart).
    async fn step(&mut self) {
        let members = self.members();
        let direct = self.direct(&self.all);
        let nested = self.direct(&self.nested);
        let outsiders = self.outsiders();
        let managers = self.managers();
        let attached = self.attached();
        let live: Vec<String> = self.graph.users().into_iter().map(|u| u.id).collect();
        let disabled: Vec<String> = self
            .graph
            .users()
            .into_iter()
            .filter(|u| !u.account_enabled)
            .map(|u| u.id)
            .collect();
        let enabled: Vec<String> = members
            .iter()
            .filter(|m| !disabled.contains(*m))
            .cloned()
            .collect();
        let only_direct: Vec<String> = direct
            .iter()
            .filter(|u| !nested.contains(u))
            .cloned()
            .collect();
        let only_nested: Vec<String> = nested
            .iter()
            .filter(|u| !direct.contains(u))
            .cloned()
            .collect();
        let hireable_managers: Vec<String> = outsiders
            .iter()
            .filter(|o| managers.contains(*o))
            .cloned()
            .collect();
        let member_managers: Vec<String> = members
            .iter()
            .filter(|m| managers.contains(*m))
            .cloned()
            .collect();
        // (weight, applicable)
        let table: [(u32, bool); 23] = [
            (10, !live.is_empty()),                                  // 0 title
            (6, !live.is_empty()),                                   // 1 department
            (6, !live.is_empty()),                                   // 2 mail
            (4, !members.is_empty()),                                // 3 UPN
            (3, !live.is_empty()),                                   // 4 displayName
            (5, !outsiders.is_empty()),                              // 5 hire into main
            (3, !outsiders.is_empty()),                              // 6 hire into nested
            (4, true),                                               // 7 hire a new user
            (4, !direct.is_empty()),                                 // 8 remove from main
            (3, !nested.is_empty()),                                 // 9 remove from nested
            (4, !only_direct.is_empty()),                            // 10 direct -> nested
            (3, !only_nested.is_empty()),                            // 11 nested -> direct
            (2, attached),                                           // 12 detach nested group
            (6, !attached),                                          // 13 re-attach nested group
            (4, !members.is_empty()),                                // 14 disable
            (3, !disabled.is_empty()),                               // 15 enable
            (3, !enabled.is_empty()),                                // 16 disable -> enable flip
            (3, self.soft_deleted.len() < 3 && !members.is_empty()), // 17 soft delete
            (4, !self.soft_deleted.is_empty()),                      // 18 restore
            (
                2,
                self.hard_deletes < 3 && (!members.is_empty() || !self.soft_deleted.is_empty()),
            ), // 19 hard delete
            (6, !members.is_empty()),                                // 20 manager change
            (4, !hireable_managers.is_empty()),                      // 21 hire an outside manager
            (3, !member_managers.is_empty()),                        // 22 a manager leaves
        ];
        let total: u32 = table.iter().filter(|(_, ok)| *ok).map(|(w, _)| w).sum();
        let mut roll = self.rng.random_range(0..total);
        let mut op = 0;
        for (i, (w, ok)) in table.iter().enumerate() {
            if !ok {
                continue;
            }
            if roll < *w {
                op = i;
                break;
            }
            roll -= w;
        }
        let all = self.all.clone();
        let nested_id = self.nested.clone();
        // Attribute changes mostly hit members, sometimes anybody (managers outside too).
        let anyone = |run: &mut Run| -> String {
            let pool = if run.rng.random_bool(0.8) && !members.is_empty() {
                &members
            } else {
                &live
            };
            let v = pool.clone();
            run.pick(&v).unwrap_or_default()
        };
        match op {
            0 => {
                let u = anyone(self);
                let k = self.next();
                let title = format!(
                    "{} #{k}",
                    STAFF_TITLES[self.rng.random_range(0..STAFF_TITLES.len())]
                );
                let what = format!("title of {} = {title:?}", self.name(&u));
                self.change(what, &[&u], |g| {
                    g.update_user(&u, |x| x.job_title = Some(title.clone()));
                });
            }
            1 => {
                let u = anyone(self);
                let dept = DEPARTMENTS[self.rng.random_range(0..DEPARTMENTS.len())].to_string();
                let what = format!("department of {} = {dept:?}", self.name(&u));
                self.change(what, &[&u], |g| {
                    g.update_user(&u, |x| x.department = Some(dept.clone()));
                });
            }
            2 => {
                let u = anyone(self);
                let k = self.next();
                let local = self.name(&u);
                let local = local.split(['@', '.']).next().unwrap_or("user").to_string();
                let mail = format!("{local}.m{k}-{}@contoso.example", self.seed);
                let what = format!("mail of {} = {mail}", self.name(&u));
                self.change(what, &[&u], |g| {
                    g.update_user(&u, |x| x.mail = Some(mail.clone()));
                });
            }
            3 => {
                let u = self.pick(&members).unwrap_or_default();
                let k = self.next();
                let old = self.name(&u);
                let local = old.split(['@', '.']).next().unwrap_or("user").to_string();
                let new = format!("{local}.r{k}@{FIXTURE_DOMAIN}");
                let what = format!("UPN of {old} = {new}");
                self.change(what, &[&u], |g| {
                    g.update_user(&u, |x| x.user_principal_name = new.clone());
                });
            }
            4 => {
                let u = anyone(self);
                let k = self.next();
                let what = format!("displayName of {}", self.name(&u));
                self.change(what, &[&u], |g| {
                    g.update_user(&u, |x| {
                        let given = x.given_name.clone().unwrap_or_default();
                        let sur = format!("Renamed{k}");
                        x.display_name = Some(format!("{given} {sur}"));
                        x.surname = Some(sur);
                    });
                });
            }
            5 | 6 => {
                let u = self.pick(&outsiders).unwrap_or_default();
                let (gid, gname) = if op == 5 {
                    (all.clone(), "main")
                } else {
                    (nested_id.clone(), "nested")
                };
                let what = format!("hire {} into the {gname} group", self.name(&u));
                self.change(what, &[&u], |g| g.add_member(&gid, &u));
            }
            7 => {
                let id = guid(&mut self.rng);
                let k = self.next();
                let manager = if self.rng.random_bool(0.5) {
                    self.pick(&members)
                } else {
                    self.pick(&outsiders)
                };
                let user = person(
                    &id,
                    &format!("new.hire{k}-{}", self.seed),
                    "New",
                    &format!("Hire {k}"),
                    manager,
                );
                let into_main = self.rng.random_bool(0.7);
                let what = format!("create {}", user.user_principal_name);
                self.change(what, &[&id], |g| g.upsert_user(user.clone()));
                let pause = self.rng.random_range(0..30);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                let (gid, gname) = if into_main {
                    (all.clone(), "main")
                } else {
                    (nested_id.clone(), "nested")
                };
                let what = format!("hire new {} into the {gname} group", self.name(&id));
                self.change(what, &[&id], |g| g.add_member(&gid, &id));
            }
            8 | 9 => {
                let (pool, gid, gname) = if op == 8 {
                    (&direct, all.clone(), "main")
                } else {
                    (&nested, nested_id.clone(), "nested")
                };
                let pool = pool.clone();
                let u = self.pick(&pool).unwrap_or_default();
                let what = format!("remove {} from the {gname} group", self.name(&u));
                self.change(what, &[&u], |g| g.remove_member(&gid, &u));
            }
            10 | 11 => {
                let (pool, from, to, label) = if op == 10 {
                    (
                        &only_direct,
                        all.clone(),
                        nested_id.clone(),
                        "direct -> nested",
                    )
                } else {
                    (
                        &only_nested,
                        nested_id.clone(),
                        all.clone(),
                        "nested -> direct",
                    )
                };
                let pool = pool.clone();
                let u = self.pick(&pool).unwrap_or_default();
                let add_first = self.rng.random_bool(0.3);
                let gap = self.rng.random_range(5..20);
                let name = self.name(&u);
                if add_first {
                    self.change(format!("move {name} {label}: add"), &[&u], |g| {
                        g.add_member(&to, &u)
                    });
                    tokio::time::sleep(Duration::from_millis(gap)).await;
                    self.change(format!("move {name} {label}: remove"), &[&u], |g| {
                        g.remove_member(&from, &u)
                    });
                } else {
                    self.change(format!("move {name} {label}: remove"), &[&u], |g| {
                        g.remove_member(&from, &u)
                    });
                    tokio::time::sleep(Duration::from_millis(gap)).await;
                    self.change(format!("move {name} {label}: add"), &[&u], |g| {
                        g.add_member(&to, &u)
                    });
                }
            }
            12 => {
                let inside = self.direct(&nested_id);
                let refs: Vec<&str> = inside.iter().map(String::as_str).collect();
                self.change(
                    "detach the nested group from the main group".into(),
                    &refs,
                    |g| g.remove_member(&all, &nested_id),
                );
            }
            13 => {
                let inside = self.direct(&nested_id);
                let refs: Vec<&str> = inside.iter().map(String::as_str).collect();
                self.change(
                    "re-attach the nested group to the main group".into(),
                    &refs,
                    |g| g.add_member(&all, &nested_id),
                );
            }
            14 => {
                let u = self.pick(&members).unwrap_or_default();
                let what = format!("disable {}", self.name(&u));
                self.change(what, &[&u], |g| {
                    g.update_user(&u, |x| x.account_enabled = false);
                });
            }
            15 => {
                let u = self.pick(&disabled).unwrap_or_default();
                let what = format!("enable {}", self.name(&u));
                self.change(what, &[&u], |g| {
                    g.update_user(&u, |x| x.account_enabled = true);
                });
            }
            16 => {
                let u = self.pick(&enabled).unwrap_or_default();
                let name = self.name(&u);
                let gap = self.rng.random_range(10..50);
                self.change(format!("flip: disable {name}"), &[&u], |g| {
                    g.update_user(&u, |x| x.account_enabled = false);
                });
                tokio::time::sleep(Duration::from_millis(gap)).await;
                self.change(format!("flip: enable {name} again"), &[&u], |g| {
                    g.update_user(&u, |x| x.account_enabled = true);
                });
            }
            17 => {
                let u = self.pick(&members).unwrap_or_default();
                let what = format!("soft-delete {}", self.name(&u));
                self.change(what, &[&u], |g| {
                    g.soft_delete_user(&u);
                });
                self.soft_deleted.push(u);
            }
            18 => {
                let i = self.rng.random_range(0..self.soft_deleted.len());
                let u = self.soft_deleted.remove(i);
                self.change(format!("restore {u}"), &[&u], |g| {
                    g.restore_user(&u);
                });
            }
            19 => {
                let u = if !self.soft_deleted.is_empty() && self.rng.random_bool(0.5) {
                    let i = self.rng.random_range(0..self.soft_deleted.len());
                    self.soft_deleted.remove(i)
                } else {
                    let pick = self.pick(&members).unwrap_or_default();
                    self.soft_deleted.retain(|s| *s != pick);
                    pick
                };
                self.hard_deletes += 1;
                let what = format!("permanently delete {}", self.name(&u));
                self.change(what, &[&u], |g| {
                    g.delete_user(&u);
                });
            }
            20 => {
                let u = self.pick(&members).unwrap_or_default();
                let m = match self.rng.random_range(0..100) {
                    0..60 => self.pick(&members),
                    60..85 => self.pick(&outsiders),
                    _ => None,
                }
                .filter(|m| *m != u);
                let what = format!(
                    "manager of {} = {}",
                    self.name(&u),
                    m.as_deref().map(|m| self.name(m)).unwrap_or("none".into())
                );
                self.change(what, &[&u], |g| {
                    g.update_user(&u, |x| x.manager_id = m.clone());
                });
            }
            21 => {
                let u = self.pick(&hireable_managers).unwrap_or_default();
                let gid = if self.rng.random_bool(0.7) {
                    all.clone()
                } else {
                    nested_id.clone()
                };
                let what = format!(
                    "hire outside manager {} into the {} group",
                    self.name(&u),
                    if gid == all { "main" } else { "nested" }
                );
                self.change(what, &[&u], |g| g.add_member(&gid, &u));
            }
            _ => {
                let u = self.pick(&member_managers).unwrap_or_default();
                let name = self.name(&u);
                if self.rng.random_bool(0.3) {
                    self.change(format!("manager {name} leaves: disabled"), &[&u], |g| {
                        g.update_user(&u, |x| x.account_enabled = false);
                    });
                } else {
                    let gid = if direct.contains(&u) {
                        all.clone()
                    } else {
                        nested_id.clone()
                    };
                    self.change(format!("manager {name} leaves the groups"), &[&u], |g| {
                        g.remove_member(&gid, &u);
                        g.remove_member(&all, &u);
                        g.remove_member(&nested_id, &u);
                    });
                }
            }
        }
    }

    /// A `serve` that exited on its own is a violation; it is started again so the seed goes on.
    async fn check_alive(&mut self) {
        let exited = match self.serve.as_mut() {
            Some(s) => s.child.try_wait().ok().flatten(),
            None => None,
        };
        if let Some(status) = exited {
            self.serve = None;
            self.violations.push(Violation {
                kind: Kind::Process,
                detail: format!(
                    "serve exited on its own ({status}) at +{:.1}s; log ends:\n{}",
                    secs(Instant::now(), self.t0),
                    log_tail(&self.log, 20)
                ),
            });
            self.restart().await;
        }
    }

    async fn kill(&mut self) {
        if let Some(mut s) = self.serve.take() {
            let _ = s.child.start_kill();
            let _ = s.child.wait().await;
            self.kills += 1;
            self.process_log.push(format!(
                "SIGKILL at {}",
                chrono::Utc::now().format("%H:%M:%S%.3f")
            ));
            let t = Instant::now();
            self.timeline.changes.push(Change {
                before: t,
                after: t,
                what: "SIGKILL serve".into(),
                users: Vec::new(),
                enabled_members: self.enabled_members(),
            });
        }
    }

    /// Starts `serve` again on the same port (Graph's subscriptions point there).
    async fn restart(&mut self) {
        let mut last = String::new();
        for _ in 0..5 {
            match spawn_serve(&self.config, &self.log).await {
                Ok(s) => {
                    self.process_log.push(format!(
                        "listening again at {}",
                        chrono::Utc::now().format("%H:%M:%S%.3f")
                    ));
                    self.last_listening = s.started;
                    self.serve = Some(s);
                    return;
                }
                Err(e) => {
                    last = e;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        self.violations.push(Violation {
            kind: Kind::Process,
            detail: format!(
                "serve did not start again: {last}; log ends:\n{}",
                log_tail(&self.log, 20)
            ),
        });
    }

    /// 3-6 direct members removed from the main group at once; `serve` killed 0.2-0.7 s later,
    /// while it may be writing their deactivations (and its index after them); the members
    /// added back while it is down; `serve` started again. Returns the changes made.
    async fn burst(&mut self, rng: &mut StdRng) -> usize {
        let direct = self.direct(&self.all);
        let nested = self.direct(&self.nested);
        let mut pool: Vec<String> = direct.into_iter().filter(|u| !nested.contains(u)).collect();
        let k = rng.random_range(3..=6usize).min(pool.len());
        let mut chosen = Vec::new();
        for _ in 0..k {
            chosen.push(pool.swap_remove(rng.random_range(0..pool.len())));
        }
        let all = self.all.clone();
        for u in &chosen {
            let what = format!("burst: remove {} from the main group", self.name(u));
            self.change(what, &[u], |g| g.remove_member(&all, u));
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..700))).await;
        let was_up = self.serve.is_some();
        self.kill().await;
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..300))).await;
        for u in &chosen {
            let what = format!("burst: add {} back to the main group", self.name(u));
            self.change(what, &[u], |g| g.add_member(&all, u));
        }
        if was_up {
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
            self.restart().await;
        }
        2 * chosen.len()
    }

    /// Once per seed (when the chaos says so): SIGKILL during the start-up that just began,
    /// then start again.
    async fn kill_in_startup(&mut self) {
        let Some(ms) = self.startup_kill_ms.take() else {
            return;
        };
        let since = self.last_listening.elapsed();
        if let Some(rest) = Duration::from_millis(ms).checked_sub(since) {
            tokio::time::sleep(rest).await;
        }
        self.kill().await;
        self.restart().await;
    }

    /// SIGTERM and wait (60 s, then SIGKILL and a violation).
    async fn stop(&mut self) {
        let Some(mut s) = self.serve.take() else {
            return;
        };
        if let Some(pid) = s.child.id() {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        match tokio::time::timeout(Duration::from_secs(60), s.child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                let _ = s.child.start_kill();
                let _ = s.child.wait().await;
                self.violations.push(Violation {
                    kind: Kind::Process,
                    detail: "serve did not stop within 60 s of SIGTERM".into(),
                });
            }
        }
    }

    /// Waits for the LMS to equal the truth; a lossless seed that does not get there within
    /// the deadline (or drifts away again before Graph has delivered everything) violates.
    async fn converge(&mut self, last_change: Instant, out: &mut Outcome) {
        let from = last_change.max(self.last_listening);
        let deadline = from + self.settings.converge_within;
        let hard_stop = deadline + Duration::from_secs(90);
        let mut since: Option<Instant> = None;
        let mut converged_at: Option<Instant> = None;
        let mut diffs;
        loop {
            self.check_alive().await;
            let now = Instant::now();
            diffs = self.differences();
            if diffs.is_empty() {
                if since.is_none() {
                    since = Some(now);
                }
                if converged_at.is_none() && now <= deadline {
                    converged_at = Some(now);
                }
            } else {
                since = None;
            }
            let settled = self.graph.notifications_unsettled() == 0;
            let stable = since.is_some_and(|s| now.duration_since(s) >= Duration::from_secs(1));
            if settled && (stable || now > deadline) {
                break;
            }
            if now > hard_stop {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Only the chaos loses notifications; a batch Graph gave up on because `serve` did not
        // take it is `serve`'s doing.
        out.lossless = self.graph.notify_stats().dropped == 0;
        let ok = diffs.is_empty() && converged_at.is_some();
        out.converged_after = if ok {
            converged_at.map(|c| c.duration_since(from))
        } else {
            None
        };
        if out.lossless && !ok {
            let when = match converged_at {
                Some(c) => format!(
                    "it matched {:.1}s after the last change but drifted away again",
                    secs(c, from)
                ),
                None => format!(
                    "still different {:.1}s after the last change/restart",
                    secs(Instant::now(), from)
                ),
            };
            self.violations.push(Violation {
                kind: Kind::Convergence,
                detail: format!(
                    "no notification was dropped, but the LMS does not equal the truth ({when}; {} kills); {} differences:\n      {}",
                    self.kills,
                    diffs.len(),
                    self.explain(&diffs)
                ),
            });
        }
    }

    /// One subscription per resource: a second one is an orphan of a start-up that died (its
    /// notifications are refused, and Graph's quota is spent).
    fn check_subscriptions(&mut self) {
        let subs = self.graph.subscriptions();
        let mut by_resource: BTreeMap<String, usize> = BTreeMap::new();
        for s in &subs {
            *by_resource.entry(s.resource.to_lowercase()).or_default() += 1;
        }
        let extra: Vec<String> = by_resource
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(r, n)| format!("{r} x{n}"))
            .collect();
        if !extra.is_empty() {
            let refused = self
                .graph
                .delivery_log()
                .iter()
                .filter(|a| a.status == Some(403))
                .count();
            self.violations.push(Violation {
                kind: Kind::Subscriptions,
                detail: format!(
                    "Graph holds {} subscriptions, more than one for {} ({} deliveries answered 403); {} kills",
                    subs.len(),
                    extra.join(", "),
                    refused,
                    self.kills
                ),
            });
        }
    }

    /// Differences with the history of the users they name.
    fn explain(&self, diffs: &[String]) -> String {
        let mut lines = Vec::new();
        let ids: HashSet<String> = self
            .graph
            .users()
            .into_iter()
            .map(|u| u.id.to_lowercase())
            .chain(self.timeline.changes.iter().flat_map(|c| c.users.clone()))
            .collect();
        for d in diffs.iter().take(12) {
            lines.push(d.clone());
            let mut named: Vec<(usize, &String)> = ids
                .iter()
                .filter_map(|id| d.find(id.as_str()).map(|at| (at, id)))
                .collect();
            named.sort();
            for (_, id) in named.into_iter().take(2) {
                lines.push(format!("  history of {id}:"));
                for h in self.timeline.history(id, self.t0, 6) {
                    lines.push(format!("    {h}"));
                }
            }
        }
        if diffs.len() > 12 {
            lines.push(format!("... and {} more", diffs.len() - 12));
        }
        lines.join("\n      ")
    }

    /// `rostersync reconcile` with `serve` stopped: no write after a lossless run, the truth after
    /// any run.
    async fn reconcile(&mut self, out: &mut Outcome) {
        // The run's faults stay on (the reconcile must cope with 429s), no more notifications.
        let writes = |s: &ScimSim| -> u64 {
            ["POST", "PATCH", "PUT", "DELETE"]
                .iter()
                .map(|k| s.request_count(k))
                .sum()
        };
        let before = writes(&self.scim);
        let log_from = self.scim.writes().len();
        self.reconcile_started = Some(Instant::now());
        let result = tokio::time::timeout(
            Duration::from_secs(180),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
                .arg("--config")
                .arg(&self.config)
                .arg("reconcile")
                .env_remove("RUST_LOG")
                .kill_on_drop(true)
                .output(),
        )
        .await;
        match result {
            Ok(Ok(o)) if o.status.success() => {}
            Ok(Ok(o)) => {
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                self.violations.push(Violation {
                    kind: Kind::ReconcileFailed,
                    detail: format!("exit {}:\n{}", o.status, tail.join("\n")),
                });
            }
            Ok(Err(e)) => self.violations.push(Violation {
                kind: Kind::ReconcileFailed,
                detail: format!("could not run: {e}"),
            }),
            Err(_) => self.violations.push(Violation {
                kind: Kind::ReconcileFailed,
                detail: "did not finish within 180 s".into(),
            }),
        }
        out.reconcile_writes = writes(&self.scim) - before;
        if out.lossless && out.reconcile_writes > 0 {
            let log = self.scim.writes();
            let lines: Vec<String> = log[log_from.min(log.len())..]
                .iter()
                .take(12)
                .map(describe_write)
                .collect();
            self.violations.push(Violation {
                kind: Kind::ReconcileWrote,
                detail: format!(
                    "after a run that lost no notification ({} kills), reconcile made {} LMS writes:\n      {}",
                    self.kills,
                    out.reconcile_writes,
                    lines.join("\n      ")
                ),
            });
        }
        let diffs = self.differences();
        if !diffs.is_empty() {
            self.violations.push(Violation {
                kind: Kind::ReconcileDiffers,
                detail: format!(
                    "after reconcile, {} differences:\n      {}",
                    diffs.len(),
                    self.explain(&diffs)
                ),
            });
        }
    }

    /// Every write that left an enabled member inactive (see the module doc).
    fn check_deactivations(&mut self, out: &mut Outcome) {
        let reads = self.graph.user_reads();
        let mut by_user: HashMap<&str, Vec<&UserRead>> = HashMap::new();
        for r in &reads {
            by_user.entry(r.user.as_str()).or_default().push(r);
        }
        let writes = self.scim.writes();
        for w in &writes {
            let deactivates = (w.active_before == Some(true) && w.active_after != Some(true))
                || (w.method == "POST" && w.active_after == Some(false));
            if !deactivates {
                continue;
            }
            let Some(user) = w.external_id.as_deref().map(str::to_lowercase) else {
                continue;
            };
            out.deactivations += 1;
            let t = w.at;
            let a = t.checked_sub(self.settings.window).unwrap_or(t);
            if !self.timeline.member_throughout(&user, a, t) {
                continue;
            }
            let last_read = by_user
                .get(user.as_str())
                .and_then(|v| v.iter().rev().find(|r| r.at <= t).copied());
            if let Some(r) = last_read {
                let recent = t.duration_since(r.at) <= self.settings.read_slack;
                let out_then = !self.timeline.member_throughout(&user, r.at, r.at);
                if recent && out_then {
                    out.excused += 1;
                    continue;
                }
            }
            let since = match self.timeline.member_since(&user, t) {
                Some((Some(s), Some(k))) => format!(
                    "an enabled member for {:.3}s, since \"{}\"",
                    t.duration_since(s).as_secs_f64(),
                    self.timeline.changes[k].what
                ),
                _ => "an enabled member since the start".into(),
            };
            let read = match last_read {
                Some(r) => format!(
                    "last Graph read of the user ({}) {:.3}s before the write",
                    r.kind,
                    t.duration_since(r.at).as_secs_f64()
                ),
                None => "no Graph read of the user before it".into(),
            };
            let by = match self.reconcile_started {
                Some(r) if t >= r => "the final reconcile",
                _ => "serve",
            };
            let history = self.timeline.history(&user, self.t0, 6);
            self.violations.push(Violation {
                kind: Kind::WrongDeactivation,
                detail: format!(
                    "{} written inactive by {by} ({} at +{:.3}s, changed {:?}) while {since}; {read}; its last changes:\n      {}",
                    w.user_name.as_deref().unwrap_or(&user),
                    w.method,
                    secs(t, self.t0),
                    w.changed,
                    history.join("\n      ")
                ),
            });
        }
    }
}

fn describe_write(w: &ScimWrite) -> String {
    format!(
        "{} {} ({}): active {:?} -> {:?}, changed {:?}",
        w.method,
        w.user_name.as_deref().unwrap_or("?"),
        w.external_id.as_deref().unwrap_or("?"),
        w.active_before,
        w.active_after,
        w.changed
    )
}

/// The reasons of the full reconciles `serve` logged, except the first start's.
fn serve_reconciles(log: &Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(": full reconcile ") && !l.contains("first start"))
        .map(|l| {
            l.split("reason=")
                .nth(1)
                .unwrap_or("?")
                .trim()
                .trim_matches('"')
                .to_string()
        })
        .collect()
}

fn guid(rng: &mut StdRng) -> String {
    let mut b = [0u8; 16];
    rng.fill(&mut b);
    uuid::Builder::from_random_bytes(b).into_uuid().to_string()
}

fn person(id: &str, local: &str, given: &str, sur: &str, manager: Option<String>) -> SimUser {
    SimUser {
        id: id.to_string(),
        user_principal_name: format!("{local}@{FIXTURE_DOMAIN}"),
        mail: Some(format!("{local}@contoso.example")),
        given_name: Some(given.into()),
        surname: Some(sur.into()),
        display_name: Some(format!("{given} {sur}")),
        job_title: Some("Analyst".into()),
        department: Some("Finance".into()),
        office_location: Some("Oslo - Bjørvika".into()),
        employee_id: Some(format!("X{}", &id[..8])),
        city: Some("Oslo".into()),
        country: Some("Norway".into()),
        account_enabled: true,
        manager_id: manager,
        ..Default::default()
    }
}

/// `sim_config_toml` reads only the app registration from the tenant.
fn tenant_stub() -> rostersync_sim::graph::Tenant {
    rostersync_sim::graph::Tenant {
        tenant_id: rostersync_sim::graph::FIXTURE_TENANT_ID.into(),
        client_id: rostersync_sim::graph::FIXTURE_CLIENT_ID.into(),
        client_secret: rostersync_sim::graph::FIXTURE_CLIENT_SECRET.into(),
        users: Vec::new(),
        groups: Vec::new(),
    }
}
