//! `queue stats|dead|replay`: on the store, or through the running `serve`.

use rostersync::config::IntegrationConfig;
use rostersync::ops::queue::{self, DeadPage, ReplayRequest, DEAD_PAGE_MAX};

use super::operate::{self, Out, Where};
use super::{init_logging, load_config, Cli, QueueCmd};

pub async fn run(
    cli: &Cli,
    action: &QueueCmd,
    integration: Option<&str>,
    json: bool,
) -> anyhow::Result<i32> {
    init_logging(cli, true);
    let config = load_config(cli)?;
    let replay = match action {
        QueueCmd::Replay {
            id,
            all,
            allow_mass_deactivation,
        } => {
            let r = ReplayRequest {
                id: *id,
                all: *all,
                allow_mass_deactivation: *allow_mass_deactivation,
            };
            if let Err(e) = r.check() {
                anyhow::bail!("{e}");
            }
            Some(r)
        }
        _ => None,
    };
    let place = operate::open(&config)?;
    let mut out = Out::new(json);
    for cfg in config.select(integration)? {
        match (action, &replay) {
            (QueueCmd::Stats, _) => {
                let doc = match &place {
                    Where::Store(s) => {
                        queue::stats(&s.integration(&cfg.name)?, chrono::Utc::now())?
                    }
                    Where::Serve(r) => r
                        .client
                        .queue_stats(cfg.name.as_str())
                        .await
                        .map_err(|e| r.error(e))?,
                };
                out.doc(&doc, &doc.render())?;
            }
            (QueueCmd::Dead, _) => {
                let doc = dead_letters(&place, cfg).await?;
                out.doc(&doc, &doc.render())?;
            }
            (QueueCmd::Replay { .. }, Some(req)) => {
                let doc = match &place {
                    Where::Store(s) => queue::replay(&s.integration(&cfg.name)?, req)?,
                    Where::Serve(r) => r
                        .client
                        .replay(cfg.name.as_str(), req)
                        .await
                        .map_err(|e| r.error(e))?,
                };
                out.doc(&doc, &doc.render())?;
            }
            (QueueCmd::Replay { .. }, None) => {}
        }
    }
    if let Where::Store(s) = &place {
        s.flush()?;
    }
    out.finish()?;
    Ok(0)
}

/// Every dead letter of one integration, read a page at a time.
async fn dead_letters(place: &Where, cfg: &IntegrationConfig) -> anyhow::Result<DeadPage> {
    let mut all = DeadPage {
        integration: cfg.name.to_string(),
        items: Vec::new(),
        next: None,
    };
    let mut after = None;
    loop {
        let page = match place {
            Where::Store(s) => queue::dead_page(&s.integration(&cfg.name)?, after, DEAD_PAGE_MAX)?,
            Where::Serve(r) => r
                .client
                .dead_page(cfg.name.as_str(), after, DEAD_PAGE_MAX)
                .await
                .map_err(|e| r.error(e))?,
        };
        all.items.extend(page.items);
        match page.next {
            // A serve that answered a page not past the last one would loop forever.
            Some(n) if after.is_none_or(|a| n > a) => after = Some(n),
            _ => return Ok(all),
        }
    }
}
