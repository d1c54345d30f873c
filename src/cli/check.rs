//! `check`: the config, a Graph token, each group, the LMS; with `--probe`, the go-live check.

use rostersync::alert::Alerter;
use rostersync::app::{CheckStatus, Integration};
use rostersync::output::render_checks;
use rostersync::store::Store;

use super::{init_logging, load_config, Cli};

/// How long `reconcile` and `check` try to send alerts before exiting; what is left stays in
/// the outbox for the next run or `serve`.
pub const ALERT_DELIVERY_LIMIT: std::time::Duration = std::time::Duration::from_secs(45);

pub async fn run(
    cli: &Cli,
    integration: Option<&str>,
    json: bool,
    probe: bool,
    probe_delete: bool,
) -> anyhow::Result<i32> {
    init_logging(cli, true);
    let config = load_config(cli)?;
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
    for cfg in config.select(integration)? {
        let i = Integration::build(cfg, &store)?;
        if probe && !json {
            println!(
                "probe {}: writing to the LMS at {} (canary users rostersync-probe-…@invalid.example)",
                cfg.name, cfg.target.url
            );
        }
        lines.extend(i.check().await);
        if probe {
            lines.push(i.probe(probe_delete).await);
        }
    }
    alerts.deliver_before_exit(ALERT_DELIVERY_LIMIT).await;
    if json {
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
