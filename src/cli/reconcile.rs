//! `reconcile`: the full reconcile of each selected integration, side by side.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context as _;
use rostersync::alert::Alerter;
use rostersync::app::Integration;
use rostersync::output::{exit_code, render_report};
use rostersync::store::Store;
use rostersync::sync::reconcile::{Progress, ProgressFn, RunOptions};

use super::check::ALERT_DELIVERY_LIMIT;
use super::{init_logging, load_config, Cli};

pub async fn run(
    cli: &Cli,
    integration: Option<&str>,
    json: bool,
    opts: RunOptions,
) -> anyhow::Result<i32> {
    let tty = std::io::stderr().is_terminal() && !json;
    init_logging(cli, tty);
    let config = load_config(cli)?;
    let store = Store::open(&config.server.data_dir)?;
    let alerts = Alerter::new(&config, &store)?;
    if !opts.dry_run {
        alerts.check_secret_expiry(chrono::Utc::now().date_naive());
    }
    // Integrations side by side (each paced by its own tenant and LMS), at most
    // `server.reconcile_concurrency` at once; reports in configuration order.
    let selected = config.select(integration)?;
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
    let results = rostersync::app::reconcile_side_by_side(
        &runs,
        opts,
        config.server.reconcile_concurrency,
        progress,
    )
    .await;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let mut reports = Vec::with_capacity(results.len());
    for r in results {
        let report = r.context("the reconcile task stopped")?;
        if !json {
            let max = if opts.dry_run { usize::MAX } else { 50 };
            print!("{}", render_report(&report, max));
        }
        reports.push(report);
    }
    alerts.deliver_before_exit(ALERT_DELIVERY_LIMIT).await;
    store.flush()?;
    if json {
        // Streamed rather than built as one string: a first reconcile reports a change per
        // member.
        use std::io::Write as _;
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        serde_json::to_writer_pretty(&mut out, &reports)?;
        writeln!(out)?;
        out.flush()?;
    }
    Ok(exit_code(&reports))
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
