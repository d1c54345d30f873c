//! `rostersync demo`: the whole flow against the in-repo simulators, no tenant needed.
//!
//! Starts a simulated Entra tenant and a simulated SCIM LMS on 127.0.0.1, runs a dry run and a
//! reconcile, then starts `serve` (subscriptions through the webhook handshake) and makes live
//! changes in the tenant (hire, promotion, manager change, leaving, disabling, returning),
//! timing each until the LMS shows it.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::app::Integration;
use crate::config::{Config, DEFAULT_CUSTOM_SCHEMA};
use crate::lms::scim::ENTERPRISE_USER;
use crate::output::{exit_code, render_report};
use crate::serve::{serve, ServeOptions};
use crate::store::Store;
use crate::sync::reconcile::{RunOptions, RunReport};
use rostersync_sim::graph::{fixture, GraphSim, SimUser};
use rostersync_sim::scim::{ScimSim, ScimSimConfig};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start a simulator: {0}")]
    Sim(#[from] std::io::Error),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Build(#[from] crate::app::BuildError),
    #[error("demo step failed: {0}")]
    Step(String),
}

/// Config text for an integration against running simulators.
pub fn sim_config_toml(
    name: &str,
    graph: &GraphSim,
    tenant: &rostersync_sim::graph::Tenant,
    group: &str,
    scim: &ScimSim,
    scim_token: &str,
) -> String {
    format!(
        r#"
[[integration]]
name = "{name}"
tenant_id = "{tenant_id}"
client_id = "{client_id}"
client_secret = {{ value = "{secret}" }}
groups = ["{group}"]
login_url = "{login}"
graph_url = "{graph_url}"

[integration.target]
kind = "scim"
url = "{scim_url}"
token = {{ value = "{scim_token}" }}
"#,
        tenant_id = tenant.tenant_id,
        client_id = tenant.client_id,
        secret = tenant.client_secret,
        login = graph.login_url(),
        graph_url = graph.graph_url(),
        scim_url = scim.base_url(),
    )
}

/// The custom extension attributes the demo LMS declares.
pub fn demo_custom_extension() -> (String, Vec<String>) {
    (
        DEFAULT_CUSTOM_SCHEMA.to_string(),
        [
            "officeLocation",
            "city",
            "country",
            "managerEmail",
            "managerDisplayName",
        ]
        .map(String::from)
        .to_vec(),
    )
}

fn step(out: &mut impl Write, title: &str) {
    let _ = writeln!(out, "\n== {title}");
}

/// One live change: what was done in Entra, and how to tell the LMS has it.
struct LiveChange {
    what: String,
    apply: Box<dyn FnOnce(&GraphSim) + Send>,
    arrived: Box<dyn Fn(&ScimSim) -> bool + Send>,
}

/// The simulated tenant and LMS the demo runs against.
struct Sims {
    fx: rostersync_sim::graph::Fixture,
    graph: GraphSim,
    scim: ScimSim,
}

const SCIM_TOKEN: &str = "demo-scim-token";

/// Runs the demo and returns the process exit status.
pub async fn run(users: usize, out: &mut (impl Write + Send)) -> Result<i32, DemoError> {
    let sims = start_sims(users, out).await?;
    let config = Config::from_toml(&config_text(&sims), Path::new("."))?;
    let store = Store::temporary()?;
    let integration = std::sync::Arc::new(Integration::build(&config.integrations[0], &store)?);
    let (dry, first) = reconcile_steps(&integration, &sims, out).await?;
    let server = start_serve(config, store, &sims, out).await?;
    let (latencies, missed) = live_steps(&sims, out).await;
    summary(&first, &latencies, missed.len(), out);
    server.stop().await?;
    let mut code = exit_code(&[dry, first]);
    if !missed.is_empty() {
        code = code.max(1);
    }
    let _ = writeln!(out, "\ndemo finished (exit {code})");
    sims.graph.stop().await;
    sims.scim.stop().await;
    Ok(code)
}

async fn start_sims(users: usize, out: &mut impl Write) -> Result<Sims, DemoError> {
    let fx = fixture(users.max(20), 42);
    let graph = GraphSim::start(fx.tenant.clone()).await?;
    let scim = ScimSim::start(ScimSimConfig {
        token: SCIM_TOKEN.into(),
        custom_extension: Some(demo_custom_extension()),
        ..Default::default()
    })
    .await?;
    let _ = writeln!(
        out,
        "rostersync demo: a simulated Entra tenant ({} users, group \"All Employees\" with a nested group) at {}\nand a simulated SCIM LMS at {}",
        fx.tenant.users.len(),
        graph.graph_url(),
        scim.base_url()
    );
    Ok(Sims { fx, graph, scim })
}

fn config_text(sims: &Sims) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}",
        sim_config_toml(
            "demo",
            &sims.graph,
            &sims.fx.tenant,
            &sims.fx.all_group_id,
            &sims.scim,
            SCIM_TOKEN,
        )
    )
}

/// Steps 1 and 2: a dry run, then the reconcile that applies it.
async fn reconcile_steps(
    integration: &std::sync::Arc<Integration>,
    sims: &Sims,
    out: &mut impl Write,
) -> Result<(RunReport, RunReport), DemoError> {
    step(out, "1. dry run: what would change (nothing is applied)");
    let dry = integration
        .reconcile(
            RunOptions {
                dry_run: true,
                ..Default::default()
            },
            None,
        )
        .await;
    let _ = write!(out, "{}", render_report(&dry, 8));
    check(&dry)?;

    step(out, "2. reconcile: apply it");
    let first = integration
        .reconcile_task(RunOptions::default(), None)
        .await
        .map_err(|e| DemoError::Step(format!("the reconcile task stopped: {e}")))?;
    let _ = write!(out, "{}", render_report(&first, 0));
    let _ = writeln!(out, "  the LMS now holds {} users", sims.scim.users().len());
    check(&first)?;
    Ok((dry, first))
}

/// `serve` running in a task, and how to stop it.
struct Server {
    task: tokio::task::JoinHandle<Result<(), crate::serve::ServeError>>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl Server {
    async fn stop(self) -> Result<(), DemoError> {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(20), self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(DemoError::Step(format!("serve failed: {e}"))),
            _ => Err(DemoError::Step("serve did not stop in time".into())),
        }
    }
}

/// Step 3: `serve` started, its subscriptions made through the webhook handshake.
async fn start_serve(
    config: Config,
    store: Store,
    sims: &Sims,
    out: &mut impl Write,
) -> Result<Server, DemoError> {
    step(
        out,
        "3. serve: subscribe to Graph change notifications and listen for them",
    );
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let opts = ServeOptions {
        store: Some(store),
        ..Default::default()
    };
    let task = tokio::spawn(async move {
        let mut addr_tx = Some(addr_tx);
        serve(
            config,
            opts,
            move |a| {
                if let Some(t) = addr_tx.take() {
                    let _ = t.send(a);
                }
            },
            async {
                let _ = stop_rx.await;
            },
        )
        .await
    });
    let server = Server {
        task,
        stop: stop_tx,
    };
    let addr = tokio::time::timeout(Duration::from_secs(10), addr_rx)
        .await
        .map_err(|_| DemoError::Step("serve did not start listening".into()))?
        .map_err(|_| DemoError::Step("serve stopped before listening".into()))?;
    let started = Instant::now();
    while sims.graph.subscriptions().len() < 3 {
        if started.elapsed() > Duration::from_secs(10) {
            return Err(DemoError::Step("subscriptions were not created".into()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = writeln!(
        out,
        "  listening on http://{addr}; Graph validated the webhook and holds these subscriptions:"
    );
    for sub in sims.graph.subscriptions() {
        let _ = writeln!(
            out,
            "    {:<52} changeType {}  expires {}",
            sub.resource,
            sub.change_type,
            sub.expires_at.format("%Y-%m-%d %H:%M UTC")
        );
    }
    Ok(server)
}

/// Step 4: each live change made in the tenant and timed until the LMS shows it. Returns the
/// latencies (ms) of those that arrived and the changes that did not within 10 s.
async fn live_steps(sims: &Sims, out: &mut impl Write) -> (Vec<f64>, Vec<String>) {
    step(
        out,
        "4. live changes in Entra, each timed until the LMS shows it",
    );
    let mut latencies = Vec::new();
    let mut missed = Vec::new();
    for c in live_changes(&sims.fx, &sims.scim) {
        let t0 = Instant::now();
        (c.apply)(&sims.graph);
        let mut arrived = false;
        while t0.elapsed() < Duration::from_secs(10) {
            if (c.arrived)(&sims.scim) {
                arrived = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let ms = t0.elapsed().as_secs_f64() * 1000.0;
        if arrived {
            let _ = writeln!(out, "  {:<62} in the LMS after {ms:>6.0} ms", c.what);
            latencies.push(ms);
        } else {
            let _ = writeln!(out, "  {:<62} NOT in the LMS after 10 s", c.what);
            missed.push(c.what);
        }
    }
    (latencies, missed)
}

/// Step 5.
fn summary(first: &RunReport, latencies: &[f64], missed: usize, out: &mut impl Write) {
    step(out, "5. summary");
    let mut sorted = latencies.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let max = sorted.last().copied().unwrap_or(0.0);
    let _ = writeln!(
        out,
        "  {} users reconciled; {} live changes reached the LMS (median {median:.0} ms, slowest {max:.0} ms), {missed} did not",
        first.counts.created + first.counts.updated + first.counts.unchanged,
        sorted.len(),
    );
}

fn lms_field(scim: &ScimSim, id: &str, f: impl Fn(&serde_json::Value) -> bool) -> bool {
    scim.user_by_external_id(id).map(|u| f(&u)).unwrap_or(false)
}

/// Hire, promote, manager change, leaving the group, disable, and coming back.
fn live_changes(fx: &rostersync_sim::graph::Fixture, scim: &ScimSim) -> Vec<LiveChange> {
    let people: Vec<SimUser> = fx
        .tenant
        .users
        .iter()
        .filter(|u| u.account_enabled && u.manager_id.is_some())
        .filter(|u| scim.user_by_external_id(&u.id).is_some())
        .take(4)
        .cloned()
        .collect();
    let [a, b, c, d] = match <[SimUser; 4]>::try_from(people) {
        Ok(p) => p,
        Err(_) => return Vec::new(),
    };
    let group = fx.all_group_id.clone();
    let name = |u: &SimUser| {
        u.display_name
            .clone()
            .unwrap_or_else(|| u.user_principal_name.clone())
    };
    let mut hire = a.clone();
    hire.id = "00000000-0000-4000-8000-00000000d3e0".into();
    hire.user_principal_name = "new.hire@contoso.example".into();
    hire.mail = Some("new.hire@contoso.example".into());
    hire.display_name = Some("Nia Newcomer".into());
    hire.given_name = Some("Nia".into());
    hire.surname = Some("Newcomer".into());
    hire.employee_id = Some("E-NEW-1".into());
    hire.job_title = Some("Analyst".into());
    hire.manager_id = Some(b.id.clone());
    let boss_lms = scim
        .user_by_external_id(&d.id)
        .and_then(|u| u["id"].as_str().map(str::to_string))
        .unwrap_or_default();
    let (hid, g1) = (hire.id.clone(), group.clone());
    let (aid, cid, did, bid) = (a.id.clone(), c.id.clone(), d.id.clone(), b.id.clone());
    let (g2, g3) = (group.clone(), group.clone());
    vec![
        LiveChange {
            what: format!("hire: {} joins All Employees", name(&hire)),
            apply: Box::new(move |g| {
                g.upsert_user(hire);
                g.add_member(&g1, &hid);
            }),
            arrived: {
                let id = "00000000-0000-4000-8000-00000000d3e0".to_string();
                Box::new(move |s| lms_field(s, &id, |u| u["active"] == true))
            },
        },
        LiveChange {
            what: format!("promote: {} becomes Head of Learning", name(&a)),
            apply: {
                let id = aid.clone();
                Box::new(move |g| {
                    g.update_user(&id, |u| u.job_title = Some("Head of Learning".into()));
                })
            },
            arrived: {
                let id = aid.clone();
                Box::new(move |s| lms_field(s, &id, |u| u["title"] == "Head of Learning"))
            },
        },
        LiveChange {
            what: format!("manager change: {} now reports to {}", name(&a), name(&d)),
            apply: {
                let (id, m) = (aid.clone(), did.clone());
                Box::new(move |g| {
                    g.update_user(&id, |u| u.manager_id = Some(m));
                })
            },
            arrived: {
                let id = aid.clone();
                Box::new(move |s| {
                    lms_field(s, &id, |u| {
                        u[ENTERPRISE_USER]["manager"]["value"] == boss_lms.as_str()
                    })
                })
            },
        },
        LiveChange {
            what: format!("leave: {} is removed from the group", name(&b)),
            apply: {
                let id = bid.clone();
                Box::new(move |g| g.remove_member(&g2, &id))
            },
            arrived: {
                let id = bid.clone();
                Box::new(move |s| lms_field(s, &id, |u| u["active"] == false))
            },
        },
        LiveChange {
            what: format!("disable: {}'s account is disabled", name(&c)),
            apply: {
                let id = cid.clone();
                Box::new(move |g| {
                    g.update_user(&id, |u| u.account_enabled = false);
                })
            },
            arrived: {
                let id = cid.clone();
                Box::new(move |s| lms_field(s, &id, |u| u["active"] == false))
            },
        },
        LiveChange {
            what: format!("return: {} rejoins the group", name(&b)),
            apply: {
                let id = bid.clone();
                Box::new(move |g| g.add_member(&g3, &id))
            },
            arrived: {
                let id = bid.clone();
                Box::new(move |s| lms_field(s, &id, |u| u["active"] == true))
            },
        },
        LiveChange {
            what: format!("return: {}'s account is enabled again", name(&c)),
            apply: {
                let id = cid.clone();
                Box::new(move |g| {
                    g.update_user(&id, |u| u.account_enabled = true);
                })
            },
            arrived: {
                let id = cid;
                Box::new(move |s| lms_field(s, &id, |u| u["active"] == true))
            },
        },
    ]
}

fn check(r: &RunReport) -> Result<(), DemoError> {
    match &r.error {
        Some(e) => Err(DemoError::Step(e.clone())),
        None => Ok(()),
    }
}
