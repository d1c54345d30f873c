//! `rostersync demo`: the whole flow against the in-repo simulators, no tenant needed.
//!
//! Starts a simulated Entra tenant and a simulated SCIM LMS on 127.0.0.1, then runs a dry run,
//! a reconcile, a no-change reconcile, and a reconcile after a few changes in the tenant.

use std::io::Write;
use std::path::Path;

use crate::app::Integration;
use crate::config::{Config, DEFAULT_CUSTOM_SCHEMA};
use crate::output::{exit_code, render_report};
use crate::sim::graph::{fixture, GraphSim};
use crate::sim::scim::{ScimSim, ScimSimConfig};
use crate::store::Store;
use crate::sync::reconcile::{RunOptions, RunReport};

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
    tenant: &crate::sim::graph::Tenant,
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

/// Runs the demo and returns the process exit status.
pub async fn run(users: usize, out: &mut (impl Write + Send)) -> Result<i32, DemoError> {
    let fx = fixture(users.max(20), 42);
    let graph = GraphSim::start(fx.tenant.clone()).await?;
    let scim_token = "demo-scim-token";
    let scim = ScimSim::start(ScimSimConfig {
        token: scim_token.into(),
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
    let text = sim_config_toml(
        "demo",
        &graph,
        &fx.tenant,
        &fx.all_group_id,
        &scim,
        scim_token,
    );
    let config = Config::from_toml(&text, Path::new("."))?;
    let store = Store::temporary()?;
    let integration = Integration::build(&config.integrations[0], &store)?;

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
    let _ = write!(out, "{}", render_report(&dry, 12));
    check(&dry)?;

    step(out, "2. reconcile: apply it");
    let first = integration.reconcile(RunOptions::default(), None).await;
    let _ = write!(out, "{}", render_report(&first, 0));
    let _ = writeln!(out, "  the LMS now holds {} users", scim.users().len());
    check(&first)?;

    step(
        out,
        "3. reconcile again: nothing changed, so nothing is sent",
    );
    let again = integration.reconcile(RunOptions::default(), None).await;
    let _ = write!(out, "{}", render_report(&again, 0));
    check(&again)?;

    step(
        out,
        "4. changes in Entra: a promotion, a leaver, a disabled account, a hire",
    );
    let members: Vec<_> = fx
        .tenant
        .users
        .iter()
        .filter(|u| u.account_enabled && u.manager_id.is_some())
        .take(3)
        .cloned()
        .collect();
    if members.len() == 3 {
        graph.update_user(&members[0].id, |u| {
            u.job_title = Some("Head of Learning".into())
        });
        graph.remove_member(&fx.all_group_id, &members[1].id);
        graph.update_user(&members[2].id, |u| u.account_enabled = false);
    }
    let mut hire = members.first().cloned().unwrap_or_default();
    hire.id = "00000000-0000-4000-8000-00000000d3e0".into();
    hire.user_principal_name = "new.hire@contoso.example".into();
    hire.mail = Some("new.hire@contoso.example".into());
    hire.display_name = Some("New Hire".into());
    hire.given_name = Some("New".into());
    hire.surname = Some("Hire".into());
    hire.employee_id = Some("E-NEW-1".into());
    hire.account_enabled = true;
    graph.upsert_user(hire.clone());
    graph.add_member(&fx.all_group_id, &hire.id);
    let changed = integration.reconcile(RunOptions::default(), None).await;
    let _ = write!(out, "{}", render_report(&changed, 10));
    check(&changed)?;

    let code = exit_code(&[dry, first, again, changed]);
    let _ = writeln!(out, "\ndemo finished (exit {code})");
    graph.stop().await;
    scim.stop().await;
    Ok(code)
}

fn check(r: &RunReport) -> Result<(), DemoError> {
    match &r.error {
        Some(e) => Err(DemoError::Step(e.clone())),
        None => Ok(()),
    }
}
