//! The commands: their arguments (clap), logging, the config, and which module runs each.
//! `queue`, `subscriptions`, `explain` and `sync-user` run on the store when they can open it
//! and ask the running `serve` through its admin API when it holds the store ([`operate`]).

mod check;
mod operate;
mod queue;
mod reconcile;
mod serve;
mod subscriptions;
mod user;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use rostersync::config::Config;

#[derive(Parser)]
#[command(
    name = "rostersync",
    version,
    about = "Keeps an LMS roster (SCIM 2.0) in step with Entra ID groups"
)]
pub struct Cli {
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
pub enum Cmd {
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
    /// Lists, renews or deletes the Graph subscriptions rostersync owns. While `serve` runs,
    /// asks it through its admin API (server.admin_token).
    Subscriptions {
        #[command(subcommand)]
        action: SubsCmd,
        #[arg(long, global = true)]
        integration: Option<String>,
        /// Print the documents as JSON.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Inspects the notification queue and its dead letters. While `serve` runs, asks it
    /// through its admin API (server.admin_token).
    Queue {
        #[command(subcommand)]
        action: QueueCmd,
        #[arg(long, global = true)]
        integration: Option<String>,
        /// Print the documents as JSON.
        #[arg(long, global = true)]
        json: bool,
    },
    /// Runs the whole flow against in-process simulators; needs no config and no tenant.
    #[cfg(feature = "demo")]
    Demo {
        /// Users in the simulated tenant.
        #[arg(long, default_value_t = 300)]
        users: usize,
    },
}

#[derive(Subcommand)]
pub enum SubsCmd {
    /// Subscriptions in the store and what Graph says about them.
    List,
    /// Renews every subscription now (recreating any that is gone).
    Renew,
    /// Deletes every subscription rostersync owns (serve creates them again at start, or at
    /// its next renewal check when it is running).
    Delete,
}

#[derive(Subcommand)]
pub enum QueueCmd {
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

/// Runs the command; the exit code, or the error `main` prints.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match &cli.cmd {
        #[cfg(feature = "demo")]
        Cmd::Demo { users } => {
            init_logging(&cli, true);
            let mut out = std::io::stdout();
            Ok(rostersync::demo::run(*users, &mut out).await?)
        }
        Cmd::Serve => serve::run(&cli).await,
        Cmd::Check {
            integration,
            json,
            probe,
            probe_delete,
        } => check::run(&cli, integration.as_deref(), *json, *probe, *probe_delete).await,
        Cmd::Reconcile {
            dry_run,
            integration,
            json,
            allow_mass_deactivation,
            deep,
            verify_managers,
        } => {
            let opts = rostersync::sync::reconcile::RunOptions {
                dry_run: *dry_run,
                allow_mass_deactivation: *allow_mass_deactivation,
                deep: *deep,
                verify_managers: *verify_managers,
            };
            reconcile::run(&cli, integration.as_deref(), *json, opts).await
        }
        Cmd::Subscriptions {
            action,
            integration,
            json,
        } => subscriptions::run(&cli, action, integration.as_deref(), *json).await,
        Cmd::Queue {
            action,
            integration,
            json,
        } => queue::run(&cli, action, integration.as_deref(), *json).await,
        Cmd::SyncUser {
            user,
            dry_run,
            integration,
            json,
        } => user::sync_user(&cli, user, *dry_run, integration.as_deref(), *json).await,
        Cmd::Explain {
            user,
            integration,
            json,
        } => user::explain(&cli, user, integration.as_deref(), *json).await,
    }
}

pub fn init_logging(cli: &Cli, quiet_default: bool) {
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
    let installed = if cli.log_json {
        tracing::subscriber::set_global_default(builder.json().finish())
    } else {
        // Escapes every value: text from a request must not start a line of its own.
        tracing::subscriber::set_global_default(
            builder.fmt_fields(rostersync::logging::TextFields).finish(),
        )
    };
    if installed.is_err() {
        return; // a subscriber is already in place (only in tests)
    }
    // Records of crates that log through `log` (hyper, rustls, ...) join the same output, except
    // sled's: sled logs from deferred closures that run while a thread is being torn down, when
    // the formatter's thread-local buffer may already be gone, and that aborts the process at
    // exit (seen with `--log trace`).
    let _ = tracing_log::LogTracer::builder()
        .ignore_crate("sled")
        .with_max_level(tracing_log::AsLog::as_log(
            &tracing::level_filters::LevelFilter::current(),
        ))
        .init();
}

pub fn load_config(cli: &Cli) -> anyhow::Result<Config> {
    let path = cli
        .config
        .as_ref()
        .context("no config file: pass --config FILE (or set ROSTERSYNC_CONFIG); `rostersync demo` needs none")?;
    Ok(Config::load(path)?)
}
