//! The `rostersync` command line. Parses arguments, sets up logging, and hands over to the
//! library; `anyhow` lives only here.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use rostersync::alert::Alerter;
use rostersync::app::{CheckStatus, Integration};
use rostersync::config::Config;
use rostersync::output::{exit_code, render_checks, render_report};
use rostersync::store::Store;
use rostersync::sync::reconcile::{Progress, ProgressFn, RunOptions};
use rostersync::sync::sync_user::{sync_user, SyncUserError};
use rostersync::sync::trace::{explain, render_explanation, Outcome, Trace};

/// mimalloc rather than glibc's malloc: a reconcile allocates and frees many small maps and
/// strings across threads, and `cargo bench --bench reconcile` measured the first reconcile's
/// rate against the LMS's about 15 % higher with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long `reconcile` and `check` try to send alerts before exiting; what is left stays in
/// the outbox for the next run or `serve`.
const ALERT_DELIVERY_LIMIT: std::time::Duration = std::time::Duration::from_secs(45);

#[derive(Parser)]
#[command(
    name = "rostersync",
    version,
    about = "Keeps an LMS roster (SCIM 2.0) in step with Entra ID groups"
)]
struct Cli {
    /// Config file (TOML); see config/example.toml.
    #[arg(short, long, global = true, env = "ROSTERSYNC_CONFIG")]
    config: Option<PathBuf>,
    /// Log filter, e.g. "info" or "rostersync=debug" (RUST_LOG wins when set).
    #[arg(long, global = true)]
    log: Option<String>,
    /// Logs as JSON lines instead of text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validates the config, gets a Graph token, reads each group and probes the LMS.
    Check {
        #[arg(long)]
        integration: Option<String>,
        #[arg(long)]
        json: bool,
        /// Go-live check: WRITES to the LMS. Creates canary users
        /// (rostersync-probe-<random>@invalid.example), tries every operation the mapping and
        /// the lifecycle need, deactivates them, prints what the LMS answered and what
        /// rostersync will do, and stores the learned dialect.
        #[arg(long)]
        probe: bool,
        /// With --probe: delete the canaries at the end (where the LMS supports DELETE)
        /// instead of leaving them deactivated.
        #[arg(long, requires = "probe")]
        probe_delete: bool,
    },
    /// Makes the LMS users equal to the groups' members (a full reconcile).
    Reconcile {
        /// Print the plan; apply nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only this integration.
        #[arg(long)]
        integration: Option<String>,
        /// Print the reports as JSON.
        #[arg(long)]
        json: bool,
        /// Apply deactivations even when there are more than max_deactivations (once).
        #[arg(long)]
        allow_mass_deactivation: bool,
        /// Also read every LMS user and repair changes made by hand in the LMS.
        #[arg(long)]
        deep: bool,
        /// Read every member's manager from Graph (as every `verify_managers_every`) instead of
        /// tracking managers with the users delta.
        #[arg(long)]
        verify_managers: bool,
    },
    /// Syncs one user now and prints why: scope (which group, directly or nested), match,
    /// mapped values, the planned change and the LMS's answer. Exit 0 ok, 2 the user failed,
    /// 1 an error (or a deactivation the guard held).
    SyncUser {
        /// Entra object id or userPrincipalName.
        user: String,
        /// Plan and print; apply and record nothing.
        #[arg(long)]
        dry_run: bool,
        /// Only this integration.
        #[arg(long)]
        integration: Option<String>,
        /// Print the traces as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Explains a user from the store alone (no Graph or LMS call): the last recorded decision
    /// and what was last applied. Exit 1 when nothing is known about the user.
    Explain {
        /// Entra object id, userPrincipalName or LMS userName.
        user: String,
        /// Only this integration.
        #[arg(long)]
        integration: Option<String>,
        /// Print the explanations as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serves Graph webhooks and keeps the LMS in step in near real time (subscriptions,
    /// durable queue, incremental sync, scheduled reconciles). Stops on SIGTERM/SIGINT.
    Serve,
    /// Lists, renews or deletes the Graph subscriptions rostersync owns.
    Subscriptions {
        #[command(subcommand)]
        action: SubsCmd,
        #[arg(long, global = true)]
        integration: Option<String>,
    },
    /// Inspects the notification queue and its dead letters.
    Queue {
        #[command(subcommand)]
        action: QueueCmd,
        #[arg(long, global = true)]
        integration: Option<String>,
    },
    /// Runs the whole flow against in-process simulators; needs no config and no tenant.
    Demo {
        /// Users in the simulated tenant.
        #[arg(long, default_value_t = 300)]
        users: usize,
    },
}

#[derive(Subcommand)]
enum SubsCmd {
    /// Subscriptions in the store and what Graph says about them.
    List,
    /// Renews every subscription now (recreating any that is gone).
    Renew,
    /// Deletes every subscription rostersync owns (serve creates them again at start).
    Delete,
}

#[derive(Subcommand)]
enum QueueCmd {
    /// Queued, waiting-for-retry and dead-letter counts.
    Stats,
    /// Dead letters with their error, attempts and times.
    Dead,
    /// Moves dead letters back to the queue.
    Replay {
        /// One dead letter id (see `queue dead`).
        id: Option<u64>,
        /// All dead letters.
        #[arg(long)]
        all: bool,
        /// Let the replayed items' deactivations pass the mass-deactivation guard (and clear
        /// its trip): for deactivations the guard held that are really intended.
        #[arg(long)]
        allow_mass_deactivation: bool,
    },
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(cli: &Cli, quiet_default: bool) {
    use tracing_subscriber::EnvFilter;
    let default = cli.log.clone().unwrap_or_else(|| {
        if quiet_default {
            "warn".into()
        } else {
            "info".into()
        }
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_json {
        builder.json().init();
    } else {
        // Escapes every value: text from a request must not start a line of its own.
        builder.fmt_fields(rostersync::logging::TextFields).init();
    }
}

fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let path = cli
        .config
        .as_ref()
        .context("no config file: pass --config FILE (or set ROSTERSYNC_CONFIG); `rostersync demo` needs none")?;
    Ok(Config::load(path)?)
}

fn progress_bar() -> (indicatif::ProgressBar, ProgressFn) {
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    let b = bar.clone();
    let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let applied = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let f: ProgressFn = Arc::new(move |p: &Progress| {
        use std::sync::atomic::Ordering::Relaxed;
        match p {
            Progress::PageRead { members } => read.store(*members, Relaxed),
            Progress::Applied { done } => applied.store(*done, Relaxed),
        }
        b.set_message(format!(
            "members read: {}, changes applied: {}",
            read.load(Relaxed),
            applied.load(Relaxed)
        ));
    });
    (bar, f)
}

async fn run(cli: Cli) -> anyhow::Result<i32> {
    match &cli.cmd {
        Cmd::Demo { users } => {
            init_logging(&cli, true);
            let mut out = std::io::stdout();
            Ok(rostersync::demo::run(*users, &mut out).await?)
        }
        Cmd::Serve => {
            init_logging(&cli, false);
            let config = load_config(&cli)?;
            let options = rostersync::serve::ServeOptions {
                worker: rostersync::sync::worker::WorkerSettings::from_config(&config.server),
                ..rostersync::serve::ServeOptions::default()
            };
            rostersync::serve::serve(
                config,
                options,
                |addr| println!("listening on {addr}"),
                shutdown_signal(),
            )
            .await?;
            Ok(0)
        }
        Cmd::Subscriptions {
            action,
            integration,
        } => {
            init_logging(&cli, true);
            let config = load_config(&cli)?;
            let store = Store::open(&config.server.data_dir)?;
            for cfg in config.select(integration.as_deref())? {
                let i = Integration::build(cfg, &store)?;
                match action {
                    SubsCmd::List => {
                        let remote = i.graph.list_subscriptions().await?;
                        for r in i.store.subscriptions()? {
                            let at_graph = remote.iter().find(|s| s.id == r.id);
                            println!(
                                "{}  {}  {}  expires {}  {}",
                                cfg.name,
                                r.id,
                                r.resource,
                                r.expires_at.to_rfc3339(),
                                match at_graph {
                                    Some(_) => "live at Graph".to_string(),
                                    None => "NOT FOUND at Graph".to_string(),
                                }
                            );
                        }
                        for s in remote.iter().filter(|s| {
                            s.notification_url
                                .ends_with(&format!("/webhooks/graph/{}", cfg.name))
                                && i.store.subscription(&s.id).ok().flatten().is_none()
                        }) {
                            println!(
                                "{}  {}  {}  (at Graph, unknown to this store)",
                                cfg.name, s.id, s.resource
                            );
                        }
                    }
                    SubsCmd::Renew => {
                        let public =
                            config.server.public_url.clone().context(
                                "server.public_url is needed to create subscriptions again",
                            )?;
                        let state = rostersync::serve::client_state(&i)?;
                        let mut recs = i.store.subscriptions()?;
                        for r in &mut recs {
                            // Force renewal now.
                            r.expires_at = chrono::Utc::now() + chrono::Duration::seconds(1);
                            i.store.put_subscription(r)?;
                        }
                        rostersync::serve::subs::ensure(&i, &public, &state).await?;
                        for r in i.store.subscriptions()? {
                            println!(
                                "{}  {}  {}  expires {}",
                                cfg.name,
                                r.id,
                                r.resource,
                                r.expires_at.to_rfc3339()
                            );
                        }
                    }
                    SubsCmd::Delete => {
                        for r in i.store.subscriptions()? {
                            let gone = i.graph.delete_subscription(&r.id).await?;
                            i.store.remove_subscription(&r.id)?;
                            println!(
                                "{}  {}  {}  {}",
                                cfg.name,
                                r.id,
                                r.resource,
                                if gone { "deleted" } else { "was already gone" }
                            );
                        }
                    }
                }
            }
            store.flush()?;
            Ok(0)
        }
        Cmd::Queue {
            action,
            integration,
        } => {
            init_logging(&cli, true);
            let config = load_config(&cli)?;
            let store = Store::open(&config.server.data_dir)?;
            for cfg in config.select(integration.as_deref())? {
                let s = store.integration(&cfg.name)?;
                match action {
                    QueueCmd::Stats => {
                        let st = s.queue_stats(chrono::Utc::now())?;
                        println!(
                            "{}  queued {}  waiting retry {}  dead {}  oldest {}",
                            cfg.name,
                            st.queued,
                            st.waiting_retry,
                            st.dead,
                            st.oldest_queued_at
                                .map(|t| t.to_rfc3339())
                                .unwrap_or_else(|| "-".into())
                        );
                    }
                    QueueCmd::Dead => {
                        for (id, it) in s.dead_letters()? {
                            println!(
                                "{}  {id}  {}  attempts {}  received {}  dead {}  error: {}",
                                cfg.name,
                                it.hint.describe(),
                                it.attempts,
                                it.received_at.to_rfc3339(),
                                it.dead_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                                it.last_error.unwrap_or_default()
                            );
                        }
                    }
                    QueueCmd::Replay {
                        id,
                        all,
                        allow_mass_deactivation,
                    } => {
                        if id.is_none() && !all {
                            anyhow::bail!("queue replay: give a dead letter id or --all");
                        }
                        if *allow_mass_deactivation {
                            s.clear_guard_trip()?;
                        }
                        let n =
                            s.replay(if *all { None } else { *id }, *allow_mass_deactivation)?;
                        println!("{}  {n} dead letter(s) queued again", cfg.name);
                    }
                }
            }
            store.flush()?;
            Ok(0)
        }
        Cmd::Check {
            integration,
            json,
            probe,
            probe_delete,
        } => {
            init_logging(&cli, true);
            let config = load_config(&cli)?;
            if !json {
                println!(
                    "OK   config: {} integration(s) valid",
                    config.integrations.len()
                );
            }
            let store = Store::open(&config.server.data_dir)?;
            let alerts = Alerter::new(&config, &store)?;
            alerts.check_secret_expiry(chrono::Utc::now().date_naive());
            let mut lines = Vec::new();
            for cfg in config.select(integration.as_deref())? {
                let i = Integration::build(cfg, &store)?;
                if *probe && !json {
                    println!(
                        "probe {}: writing to the LMS at {} (canary users rostersync-probe-…@invalid.example)",
                        cfg.name, cfg.target.url
                    );
                }
                lines.extend(i.check().await);
                if *probe {
                    lines.push(i.probe(*probe_delete).await);
                }
            }
            alerts.deliver_before_exit(ALERT_DELIVERY_LIMIT).await;
            if *json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                print!("{}", render_checks(&lines));
            }
            Ok(if lines.iter().any(|l| l.status == CheckStatus::Fail) {
                1
            } else {
                0
            })
        }
        Cmd::Reconcile {
            dry_run,
            integration,
            json,
            allow_mass_deactivation,
            deep,
            verify_managers,
        } => {
            let tty = std::io::stderr().is_terminal() && !json;
            init_logging(&cli, tty);
            let config = load_config(&cli)?;
            let store = Store::open(&config.server.data_dir)?;
            let alerts = Alerter::new(&config, &store)?;
            if !*dry_run {
                alerts.check_secret_expiry(chrono::Utc::now().date_naive());
            }
            let opts = RunOptions {
                dry_run: *dry_run,
                allow_mass_deactivation: *allow_mass_deactivation,
                deep: *deep,
                verify_managers: *verify_managers,
            };
            // Integrations side by side (each paced by its own tenant and LMS), at most
            // `server.reconcile_concurrency` at once; reports in configuration order.
            let selected = config.select(integration.as_deref())?;
            let single = selected.len() == 1;
            let mut runs = Vec::with_capacity(selected.len());
            for cfg in selected {
                runs.push(Arc::new(Integration::build(cfg, &store)?));
            }
            let (bar, progress) = if tty && single {
                let (b, f) = progress_bar();
                (Some(b), Some(f))
            } else {
                (None, None)
            };
            let limit = config.server.reconcile_concurrency.max(1);
            let results: Vec<_> = futures::stream::iter(runs.iter().map(|i| {
                let progress = progress.clone();
                async move { i.reconcile_task(opts, progress).await }
            }))
            .buffered(limit)
            .collect()
            .await;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let mut reports = Vec::with_capacity(results.len());
            for r in results {
                let report = r.context("the reconcile task stopped")?;
                if !json {
                    let max = if *dry_run { usize::MAX } else { 50 };
                    print!("{}", render_report(&report, max));
                }
                reports.push(report);
            }
            alerts.deliver_before_exit(ALERT_DELIVERY_LIMIT).await;
            store.flush()?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            }
            Ok(exit_code(&reports))
        }
        Cmd::SyncUser {
            user,
            dry_run,
            integration,
            json,
        } => {
            init_logging(&cli, true);
            let config = load_config(&cli)?;
            let store = Store::open(&config.server.data_dir)?;
            let mut traces = Vec::new();
            let mut missing = Vec::new();
            for cfg in config.select(integration.as_deref())? {
                let i = Integration::build(cfg, &store)?;
                match sync_user(&i.context(), user, *dry_run).await {
                    Ok(t) => {
                        if !json {
                            print!("{}", t.render());
                        }
                        traces.push(t);
                    }
                    Err(e @ SyncUserError::NotFound(_)) => {
                        missing.push(format!("{}: {e}", cfg.name))
                    }
                    Err(e) => {
                        return Err(
                            anyhow::Error::new(e).context(format!("{}: sync-user", cfg.name))
                        )
                    }
                }
            }
            store.flush()?;
            if traces.is_empty() {
                anyhow::bail!("{}", missing.join("\n"));
            }
            for m in &missing {
                eprintln!("note: {m}");
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&traces)?);
            }
            Ok(traces.iter().map(sync_user_exit_code).max().unwrap_or(0))
        }
        Cmd::Explain {
            user,
            integration,
            json,
        } => {
            init_logging(&cli, true);
            let config = load_config(&cli)?;
            let store = Store::open(&config.server.data_dir)?;
            let mut all = Vec::new();
            for cfg in config.select(integration.as_deref())? {
                all.push(explain(&store.integration(&cfg.name)?, user)?);
            }
            let known = all.iter().any(|e| e.known());
            // Several integrations: speak of the ones that know the user.
            if known {
                all.retain(|e| e.known());
            }
            if *json {
                println!("{}", serde_json::to_string_pretty(&all)?);
            } else {
                for e in &all {
                    print!("{}", render_explanation(e));
                }
            }
            Ok(if known { 0 } else { 1 })
        }
    }
}

/// Like `reconcile`: 2 when the user failed, 1 when the guard held its deactivation.
fn sync_user_exit_code(t: &Trace) -> i32 {
    match t.outcome {
        Outcome::Failed => 2,
        Outcome::Held => 1,
        _ => 0,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
