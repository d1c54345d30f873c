//! Test harness: a simulated tenant and LMS on 127.0.0.1, a fresh store, and helpers that
//! compute what the LMS should hold straight from the tenant (not through our mapping code).
#![allow(dead_code)]

pub mod serve;

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rostersync::app::Integration;
use rostersync::config::{Config, DEFAULT_CUSTOM_SCHEMA};
use rostersync::demo::{demo_custom_extension, sim_config_toml};
use rostersync::store::Store;
use rostersync::sync::reconcile::{RunOptions, RunReport};
use rostersync_sim::graph::{fixture, Fixture, GraphSim, SimUser};
use rostersync_sim::scim::{ScimSim, ScimSimConfig, SimDialect};
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
    /// SCIM bulk offered by the simulator (off by default).
    pub scim_bulk: Option<rostersync_sim::scim::SimBulk>,
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
            scim_bulk: None,
        }
    }
}

/// Logs of the code under test on stderr when `RUST_LOG` is set (e.g. `RUST_LOG=rostersync=debug
/// cargo test --test it NAME -- --nocapture`); silent otherwise.
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
        bulk: opts.scim_bulk,
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

    /// Asserts that the LMS holds exactly what the tenant says, attribute by attribute
    /// (see [`lms_differences`]; manager links as [`ManagerLink::Active`]).
    /// `username` picks the SimUser field that becomes userName.
    /// How many LMS users have a manager link.
    pub fn linked_managers(&self) -> usize {
        self.scim
            .users()
            .iter()
            .filter(|u| u[ENTERPRISE]["manager"]["value"].is_string())
            .count()
    }

    pub fn assert_lms_matches_tenant(&self, username: fn(&SimUser) -> Option<String>) {
        let diffs = lms_differences(
            &self.graph,
            &self.scim,
            &self.fx.all_group_id,
            username,
            ManagerLink::Active,
        );
        assert!(
            diffs.is_empty(),
            "the LMS differs from the tenant:\n  {}",
            diffs.join("\n  ")
        );
    }

    pub fn writes(&self) -> u64 {
        ["POST", "PATCH", "PUT", "DELETE"]
            .iter()
            .map(|k| self.scim.request_count(k))
            .sum()
    }
}

/// Which LMS id a member's `enterprise…:manager.value` should hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ManagerLink {
    /// The LMS user of the manager (whatever its `active`), when there is one.
    Indexed,
    /// The manager's LMS user only while the manager is an enabled member of the group
    /// (active in the LMS); otherwise no link.
    Active,
    /// The manager's LMS user while the manager is a member of the group, enabled or not.
    Member,
}

impl ManagerLink {
    pub fn parse(s: &str) -> Option<ManagerLink> {
        match s {
            "indexed" => Some(ManagerLink::Indexed),
            "active" => Some(ManagerLink::Active),
            "member" => Some(ManagerLink::Member),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ManagerLink::Indexed => "indexed",
            ManagerLink::Active => "active",
            ManagerLink::Member => "member",
        }
    }
}

/// Everything in which the LMS differs from what the tenant says, attribute by attribute,
/// computed from the simulators' state alone (never through rostersync's mapping): every
/// transitive user member of `group` is in the LMS (unless disabled and never created, or
/// unmappable), once, `active` as its account, with the default mapping's attributes, its
/// manager's name and mail, and the manager link as `link` says; every other LMS user that
/// carries an externalId is inactive. Empty when they agree.
pub fn lms_differences(
    graph: &GraphSim,
    scim: &ScimSim,
    group: &str,
    username: fn(&SimUser) -> Option<String>,
    link: ManagerLink,
) -> Vec<String> {
    let mut out = Vec::new();
    let members: HashSet<String> = graph.transitive_user_ids(group).into_iter().collect();
    let mut lms: HashMap<String, Value> = HashMap::new();
    for u in scim.users() {
        let Some(ext) = u
            .get("externalId")
            .and_then(|v| v.as_str())
            .map(str::to_string)
        else {
            continue;
        };
        if lms.contains_key(&ext) {
            out.push(format!("{ext}: more than one LMS user has this externalId"));
            continue;
        }
        lms.insert(ext, u);
    }
    let mut ids: Vec<&String> = members.iter().collect();
    ids.sort();
    for id in ids {
        let Some(u) = graph.user(id) else { continue };
        let who = format!("{} ({id})", u.user_principal_name);
        let Some(l) = lms.get(id) else {
            if u.account_enabled && username(&u).is_some() {
                out.push(format!("{who}: member missing in the LMS"));
            }
            continue;
        };
        let active = l.get("active").and_then(|v| v.as_bool());
        if active != Some(u.account_enabled) {
            out.push(format!(
                "{who}: active is {active:?}, want {}",
                u.account_enabled
            ));
        }
        fn check(
            out: &mut Vec<String>,
            who: &str,
            what: &str,
            got: Option<&str>,
            want: Option<&str>,
        ) {
            if got != want {
                out.push(format!("{who}: {what} is {got:?}, want {want:?}"));
            }
        }
        let want_name = username(&u);
        check(
            &mut out,
            &who,
            "userName",
            l["userName"].as_str(),
            want_name.as_deref(),
        );
        check(
            &mut out,
            &who,
            "givenName",
            l.pointer("/name/givenName").and_then(|v| v.as_str()),
            u.given_name.as_deref(),
        );
        check(
            &mut out,
            &who,
            "familyName",
            l.pointer("/name/familyName").and_then(|v| v.as_str()),
            u.surname.as_deref(),
        );
        check(
            &mut out,
            &who,
            "displayName",
            l.get("displayName").and_then(|v| v.as_str()),
            u.display_name.as_deref(),
        );
        check(
            &mut out,
            &who,
            "title",
            l.get("title").and_then(|v| v.as_str()),
            u.job_title.as_deref(),
        );
        let work_mail = l.get("emails").and_then(|e| e.as_array()).and_then(|a| {
            a.iter()
                .find(|e| e["type"] == "work")
                .and_then(|e| e["value"].as_str())
        });
        check(&mut out, &who, "work email", work_mail, u.mail.as_deref());
        let ent = l.get(ENTERPRISE);
        let get_ent = |k: &str| ent.and_then(|e| e.get(k)).and_then(|v| v.as_str());
        check(
            &mut out,
            &who,
            "employeeNumber",
            get_ent("employeeNumber"),
            u.employee_id.as_deref(),
        );
        check(
            &mut out,
            &who,
            "department",
            get_ent("department"),
            u.department.as_deref(),
        );
        let manager = u.manager_id.as_ref().and_then(|m| graph.user(m));
        let manager_lms = manager
            .as_ref()
            .and_then(|m| lms.get(&m.id))
            .and_then(|m| m["id"].as_str());
        let want_link = manager.as_ref().and_then(|m| match link {
            ManagerLink::Indexed => manager_lms,
            ManagerLink::Active => (members.contains(&m.id) && m.account_enabled)
                .then_some(manager_lms)
                .flatten(),
            ManagerLink::Member => members.contains(&m.id).then_some(manager_lms).flatten(),
        });
        let got_link = ent
            .and_then(|e| e.pointer("/manager/value"))
            .and_then(|v| v.as_str());
        if got_link != want_link {
            let about = match &manager {
                Some(m) => format!(
                    "manager {} ({}): member {}, enabled {}, in the LMS {}",
                    m.user_principal_name,
                    m.id,
                    members.contains(&m.id),
                    m.account_enabled,
                    manager_lms.is_some()
                ),
                None => match &u.manager_id {
                    Some(m) => format!("manager {m} is not a live user"),
                    None => "no manager in Graph".into(),
                },
            };
            out.push(format!(
                "{who}: manager link is {got_link:?}, want {want_link:?} ({about})"
            ));
        }
        let custom = l.get(DEFAULT_CUSTOM_SCHEMA);
        let get_c = |k: &str| custom.and_then(|e| e.get(k)).and_then(|v| v.as_str());
        check(
            &mut out,
            &who,
            "officeLocation",
            get_c("officeLocation"),
            u.office_location.as_deref(),
        );
        check(&mut out, &who, "city", get_c("city"), u.city.as_deref());
        check(
            &mut out,
            &who,
            "country",
            get_c("country"),
            u.country.as_deref(),
        );
        let of_manager = |attr: &str| match &u.manager_id {
            Some(m) => format!("{attr} (manager {m})"),
            None => attr.to_string(),
        };
        check(
            &mut out,
            &who,
            &of_manager("managerEmail"),
            get_c("managerEmail"),
            manager.as_ref().and_then(|m| m.mail.as_deref()),
        );
        check(
            &mut out,
            &who,
            &of_manager("managerDisplayName"),
            get_c("managerDisplayName"),
            manager.as_ref().and_then(|m| m.display_name.as_deref()),
        );
    }
    // Everybody else rostersync ever created must be inactive.
    let mut others: Vec<(&String, &Value)> = lms
        .iter()
        .filter(|(ext, _)| !members.contains(*ext))
        .collect();
    others.sort_by_key(|(ext, _)| *ext);
    for (ext, l) in others {
        if l["active"] != false {
            out.push(format!(
                "{} ({ext}): not a member but active is {}",
                l["userName"].as_str().unwrap_or("?"),
                l["active"]
            ));
        }
    }
    out
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
