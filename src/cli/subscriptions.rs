//! `subscriptions list|renew|delete`: with this process's own Graph client on the store, or
//! through the running `serve` (which runs them beside its own renewals, one at a time).

use anyhow::Context as _;
use rostersync::app::Integration;
use rostersync::config::{Config, IntegrationConfig};
use rostersync::ops::subscriptions::{DeleteDoc, ListDoc, RenewDoc};
use rostersync::serve::subs;
use rostersync::store::Store;

use super::operate::{self, Out, Remote, Where};
use super::{init_logging, load_config, Cli, SubsCmd};

enum Doc {
    List(ListDoc),
    Renew(RenewDoc),
    Delete(DeleteDoc),
}

pub async fn run(
    cli: &Cli,
    action: &SubsCmd,
    integration: Option<&str>,
    json: bool,
) -> anyhow::Result<i32> {
    init_logging(cli, true);
    let config = load_config(cli)?;
    let place = operate::open(&config)?;
    let mut out = Out::new(json);
    for cfg in config.select(integration)? {
        let doc = match &place {
            Where::Store(store) => direct(&config, cfg, store, action).await?,
            Where::Serve(r) => remote(r, cfg, action).await?,
        };
        match doc {
            Doc::List(d) => out.doc(&d, &d.render())?,
            Doc::Renew(d) => out.doc(&d, &d.render())?,
            Doc::Delete(d) => {
                out.doc(&d, &d.render())?;
                if let Some(e) = d.error {
                    out.finish()?;
                    anyhow::bail!("{e}");
                }
            }
        }
    }
    if let Where::Store(s) = &place {
        s.flush()?;
    }
    out.finish()?;
    Ok(0)
}

async fn direct(
    config: &Config,
    cfg: &IntegrationConfig,
    store: &Store,
    action: &SubsCmd,
) -> anyhow::Result<Doc> {
    let i = Integration::build(cfg, store)?;
    Ok(match action {
        SubsCmd::List => Doc::List(subs::list(&i).await?),
        SubsCmd::Renew => {
            let public = config
                .server
                .public_url
                .clone()
                .context("server.public_url is needed to create subscriptions again")?;
            let state = rostersync::serve::client_state(&i)?;
            Doc::Renew(subs::renew_now(&i, &public, &state).await?.0)
        }
        SubsCmd::Delete => Doc::Delete(subs::delete_all(&i).await),
    })
}

async fn remote(r: &Remote, cfg: &IntegrationConfig, action: &SubsCmd) -> anyhow::Result<Doc> {
    let name = cfg.name.as_str();
    let doc = match action {
        SubsCmd::List => r.client.subscriptions(name).await.map(Doc::List),
        SubsCmd::Renew => r.client.renew(name).await.map(Doc::Renew),
        SubsCmd::Delete => r.client.delete(name).await.map(Doc::Delete),
    };
    doc.map_err(|e| r.error(e))
}
