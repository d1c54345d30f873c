//! Test harness: a simulated tenant and LMS on 127.0.0.1, a fresh store, and helpers that
//! compute what the LMS should hold straight from the tenant (not through our mapping code).
#![allow(dead_code)]

pub mod serve;

use std::collections::HashMap;
use std::path::Path;

use rostersync::app::Integration;
use rostersync::config::{Config, DEFAULT_CUSTOM_SCHEMA};
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::sim::graph::{fixture, Fixture, GraphSim, SimUser};
use rostersync::sim::scim::{ScimSim, ScimSimConfig, SimDialect};
use rostersync::store::Store;
use rostersync::sync::reconcile::{RunOptions, RunReport};
use serde_json::Value;

pub const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
pub const SCIM_TOKEN: &str = "scim-token-for-tests-7c1f";

pub struct TestEnv {
    pub graph: GraphSim,
    pub scim: ScimSim,
    pub fx: Fixture,
    pub store: Store,
    pub integration: Integration,
    /// The config text (secrets inline), for tests that run the binary.
    pub config_toml: String,
    pub dir: tempfile::TempDir,
}

pub struct EnvOptions {
    pub users: usize,
    /// Extra TOML lines appended to the [[integration]] table (before [integration.target]).
    pub integration_extra: String,
    /// Extra TOML appended at the end (e.g. an [integration.mapping] table).
    pub tail: String,
    pub custom_extension: bool,
    /// The SCIM simulator's dialect (strict by default).
    pub dialect: SimDialect,
    /// Extra TOML lines appended to the [integration.target] table.
    pub target_extra: String,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            users: 300,
            integration_extra: String::new(),
            tail: String::new(),
            custom_extension: true,
            dialect: SimDialect::default(),
            target_extra: String::new(),
        }
    }
}

/// Logs of the code under test on stderr when `RUST_LOG` is set (e.g. `RUST_LOG=rostersync=debug
/// cargo test --test serve NAME -- --nocapture`); silent otherwise.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

pub async fn spawn(opts: EnvOptions) -> TestEnv {
    init_logs();
    let fx = fixture(opts.users, 7);
    let graph = GraphSim::start(fx.tenant.clone()).await.expect("graph sim");
    let scim = ScimSim::start(ScimSimConfig {
        token: SCIM_TOKEN.into(),
        custom_extension: opts.custom_extension.then(demo_custom_extension),
        dialect: opts.dialect.clone(),
        ..Default::default()
    })
    .await
    .expect("scim sim");
    let dir = tempfile::tempdir().unwrap();
    let mut text = sim_config_toml(
        "test",
        &graph,
        &fx.tenant,
        &fx.all_group_id,
        &scim,
        SCIM_TOKEN,
    );
    if !opts.integration_extra.is_empty() {
        text = text.replace(
            "\n[integration.target]",
            &format!("{}\n\n[integration.target]", opts.integration_extra),
        );
    }
    if !opts.target_extra.is_empty() {
        text.push_str(&opts.target_extra);
        text.push('\n');
    }
    text.push_str(&opts.tail);
    let text = format!(
        "[server]\ndata_dir = \"{}\"\n{text}",
        dir.path().join("data").display()
    );
    let config = Config::from_toml(&text, Path::new(".")).expect("config");
    let store = Store::temporary().unwrap();
    let integration = Integration::build(&config.integrations[0], &store).unwrap();
    TestEnv {
        graph,
        scim,
        fx,
        store,
        integration,
        config_toml: text,
        dir,
    }
}

impl TestEnv {
    pub async fn reconcile(&self) -> RunReport {
        self.integration
            .reconcile(RunOptions::default(), None)
            .await
    }

    pub async fn run(&self, opts: RunOptions) -> RunReport {
        self.integration.reconcile(opts, None).await
    }

    /// Current transitive members of the configured group, straight from the simulator.
    pub fn member_ids(&self) -> Vec<String> {
        self.graph.transitive_user_ids(&self.fx.all_group_id)
    }

    pub fn lms_by_external_id(&self) -> HashMap<String, Value> {
        self.scim
            .users()
            .into_iter()
            .filter_map(|u| Some((u.get("externalId")?.as_str()?.to_string(), u)))
            .collect()
    }

    pub fn lms_user(&self, entra_id: &str) -> Value {
        self.scim
            .user_by_external_id(entra_id)
            .unwrap_or_else(|| panic!("no LMS user with externalId {entra_id}"))
    }

    /// Asserts that the LMS holds exactly what the tenant says, attribute by attribute.
    /// `username` picks the SimUser field that becomes userName.
    pub fn assert_lms_matches_tenant(&self, username: fn(&SimUser) -> Option<String>) {
        let members: Vec<String> = self.member_ids();
        let lms = self.lms_by_external_id();
        for id in &members {
            let u = self.graph.user(id).expect("member exists");
            let Some(l) = lms.get(id) else {
                assert!(
                    !u.account_enabled || username(&u).is_none(),
                    "member {} ({}) is missing in the LMS",
                    u.user_principal_name,
                    id
                );
                continue;
            };
            let want_name = username(&u).expect("mapped user has a username");
            assert_eq!(l["userName"], want_name.as_str(), "userName of {id}");
            assert_eq!(
                l["active"], u.account_enabled,
                "active of {}",
                u.user_principal_name
            );
            assert_eq!(
                l.pointer("/name/givenName").and_then(|v| v.as_str()),
                u.given_name.as_deref(),
                "givenName of {id}"
            );
            assert_eq!(
                l.pointer("/name/familyName").and_then(|v| v.as_str()),
                u.surname.as_deref(),
                "familyName of {id}"
            );
            assert_eq!(
                l.get("displayName").and_then(|v| v.as_str()),
                u.display_name.as_deref()
            );
            assert_eq!(
                l.get("title").and_then(|v| v.as_str()),
                u.job_title.as_deref(),
                "title of {id}"
            );
            let work_mail = l.get("emails").and_then(|e| e.as_array()).and_then(|a| {
                a.iter()
                    .find(|e| e["type"] == "work")
                    .and_then(|e| e["value"].as_str())
            });
            assert_eq!(work_mail, u.mail.as_deref(), "work email of {id}");
            let ent = l.get(ENTERPRISE);
            let get_ent = |k: &str| ent.and_then(|e| e.get(k)).and_then(|v| v.as_str());
            assert_eq!(
                get_ent("employeeNumber"),
                u.employee_id.as_deref(),
                "employeeNumber of {id}"
            );
            assert_eq!(
                get_ent("department"),
                u.department.as_deref(),
                "department of {id}"
            );
            let manager = u.manager_id.as_ref().and_then(|m| self.graph.user(m));
            // Linked only to a manager who is active in the LMS: one who left scope is
            // linked by nobody (the name and mail stay).
            let manager_target = manager
                .as_ref()
                .and_then(|m| lms.get(&m.id))
                .filter(|m| m["active"] == true)
                .and_then(|m| m["id"].as_str());
            let got_manager = ent
                .and_then(|e| e.pointer("/manager/value"))
                .and_then(|v| v.as_str());
            assert_eq!(
                got_manager, manager_target,
                "manager link of {}",
                u.user_principal_name
            );
            let custom = l.get(DEFAULT_CUSTOM_SCHEMA);
            let get_c = |k: &str| custom.and_then(|e| e.get(k)).and_then(|v| v.as_str());
            assert_eq!(get_c("officeLocation"), u.office_location.as_deref());
            assert_eq!(get_c("city"), u.city.as_deref());
            assert_eq!(get_c("country"), u.country.as_deref());
            assert_eq!(
                get_c("managerEmail"),
                manager.as_ref().and_then(|m| m.mail.as_deref()),
                "managerEmail of {id}"
            );
            assert_eq!(
                get_c("managerDisplayName"),
                manager.as_ref().and_then(|m| m.display_name.as_deref())
            );
        }
        // Everybody else rostersync ever created must be inactive.
        for (ext, l) in &lms {
            if !members.contains(ext) {
                assert_eq!(l["active"], false, "non-member {ext} is still active");
            }
        }
    }

    pub fn writes(&self) -> u64 {
        ["POST", "PATCH", "PUT", "DELETE"]
            .iter()
            .map(|k| self.scim.request_count(k))
            .sum()
    }
}

pub fn upn(u: &SimUser) -> Option<String> {
    Some(u.user_principal_name.clone())
}

/// Runs the `rostersync` binary with `--config CONFIG ARGS` (RUST_LOG unset).
pub async fn rostersync(args: &[&str], config: &Path) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .await
        .expect("run rostersync")
}

/// A finished command's stdout then stderr.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
