//! `sync-user` and `explain`: one user, on the store or through the running `serve`.

use rostersync::app::Integration;
use rostersync::ops::{ErrorCode, SyncUserRequest};
use rostersync::sync::sync_user::{sync_user as sync_one, SyncUserError};
use rostersync::sync::trace::{explain as explain_one, render_explanation, Outcome, Trace};

use super::operate::{self, Where};
use super::{init_logging, load_config, Cli};

/// Exit 0 ok, 2 the user failed, 1 an error or a deactivation the guard held.
pub async fn sync_user(
    cli: &Cli,
    user: &str,
    dry_run: bool,
    integration: Option<&str>,
    json: bool,
) -> anyhow::Result<i32> {
    init_logging(cli, true);
    let config = load_config(cli)?;
    let place = operate::open(&config)?;
    let mut traces = Vec::new();
    let mut missing = Vec::new();
    for cfg in config.select(integration)? {
        let found = match &place {
            Where::Store(store) => {
                let i = Integration::build(cfg, store)?;
                match sync_one(&i.context(), user, dry_run).await {
                    Ok(t) => Some(t),
                    Err(e @ SyncUserError::NotFound(_)) => {
                        missing.push(format!("{}: {e}", cfg.name));
                        None
                    }
                    Err(e) => {
                        return Err(
                            anyhow::Error::new(e).context(format!("{}: sync-user", cfg.name))
                        )
                    }
                }
            }
            Where::Serve(r) => {
                let req = SyncUserRequest {
                    user: user.to_string(),
                    dry_run,
                };
                match r.client.sync_user(cfg.name.as_str(), &req).await {
                    Ok(t) => Some(t),
                    Err(e) if e.code() == Some(ErrorCode::UserNotFound) => {
                        missing.push(format!("{}: {e}", cfg.name));
                        None
                    }
                    Err(e) => return Err(r.error(e).context(format!("{}: sync-user", cfg.name))),
                }
            }
        };
        if let Some(t) = found {
            if !json {
                print!("{}", t.render());
            }
            traces.push(t);
        }
    }
    if let Where::Store(s) = &place {
        s.flush()?;
    }
    if traces.is_empty() {
        anyhow::bail!("{}", missing.join("\n"));
    }
    for m in &missing {
        eprintln!("note: {m}");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&traces)?);
    }
    Ok(traces.iter().map(exit_code).max().unwrap_or(0))
}

/// Like `reconcile`: 2 when the user failed, 1 when the guard held its deactivation.
fn exit_code(t: &Trace) -> i32 {
    match t.outcome {
        Outcome::Failed => 2,
        Outcome::Held => 1,
        _ => 0,
    }
}

/// Exit 1 when no selected integration knows the user.
pub async fn explain(
    cli: &Cli,
    user: &str,
    integration: Option<&str>,
    json: bool,
) -> anyhow::Result<i32> {
    init_logging(cli, true);
    let config = load_config(cli)?;
    let place = operate::open(&config)?;
    let mut all = Vec::new();
    for cfg in config.select(integration)? {
        all.push(match &place {
            Where::Store(store) => explain_one(&store.integration(&cfg.name)?, user)?,
            Where::Serve(r) => r
                .client
                .explain(cfg.name.as_str(), user)
                .await
                .map_err(|e| r.error(e))?,
        });
    }
    let known = all.iter().any(|e| e.known());
    // Several integrations: speak of the ones that know the user.
    if known {
        all.retain(|e| e.known());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    } else {
        for e in &all {
            print!("{}", render_explanation(e));
        }
    }
    Ok(if known { 0 } else { 1 })
}
