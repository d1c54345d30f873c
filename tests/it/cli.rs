//! The `rostersync` binary as a user runs it: config errors, check, reconcile exit codes, and
//! that no secret reaches its output or logs.

use std::path::Path;

use crate::common::{rostersync, spawn, text, EnvOptions, SCIM_TOKEN};
use rostersync_sim::graph::FIXTURE_CLIENT_SECRET;

fn write_config(dir: &Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("rostersync.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[tokio::test]
async fn a_broken_config_names_the_key_and_exits_1() {
    let env = spawn(EnvOptions {
        users: 5,
        ..Default::default()
    })
    .await;
    for (from, to, key) in [
        (
            "\n[integration.target]",
            "username = \"email\"\n\n[integration.target]",
            "(test).username",
        ),
        (
            "kind = \"scim\"",
            "kind = \"scim\"\nconcurrency = 0",
            "(test).target.concurrency",
        ),
        (
            "name = \"test\"",
            "name = \"Test Co\"",
            "integration[0].name",
        ),
        ("[server]", "[server]\nlisten_adress = 1", "listen_adress"),
    ] {
        let cfg = write_config(env.dir.path(), &env.config_toml.replacen(from, to, 1));
        let o = rostersync(&["check"], &cfg).await;
        assert_eq!(o.status.code(), Some(1), "{}", text(&o));
        assert!(text(&o).contains(key), "expected {key:?} in: {}", text(&o));
    }
    let o = rostersync(&["check"], &env.dir.path().join("missing.toml")).await;
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("missing.toml"), "{}", text(&o));
}

#[tokio::test]
async fn check_reports_each_probe_and_turns_aadsts_codes_into_advice() {
    let env = spawn(EnvOptions {
        users: 5,
        ..Default::default()
    })
    .await;
    let cfg = write_config(env.dir.path(), &env.config_toml);
    let o = rostersync(&["check"], &cfg).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("OK   test: Graph token"), "{out}");
    assert!(out.contains("All Employees"), "{out}");
    assert!(out.contains("OK   test: LMS users"), "{out}");

    let bad = env
        .config_toml
        .replace(FIXTURE_CLIENT_SECRET, "wrong-secret-value-123");
    let cfg = write_config(env.dir.path(), &bad);
    let o = rostersync(&["check"], &cfg).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL test: Graph token")
            && out.contains("AADSTS7000215")
            && out.contains("App registrations"),
        "{out}"
    );
    assert!(
        !out.contains("wrong-secret-value-123"),
        "the secret must not be echoed: {out}"
    );
}

#[tokio::test]
async fn reconcile_applies_and_no_secret_reaches_output_or_logs() {
    let env = spawn(EnvOptions {
        users: 40,
        ..Default::default()
    })
    .await;
    let cfg = write_config(env.dir.path(), &env.config_toml);
    let dry = rostersync(&["reconcile", "--dry-run", "--log", "trace"], &cfg).await;
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    assert!(text(&dry).contains("dry run"), "{}", text(&dry));
    assert!(env.scim.users().is_empty(), "dry run applied nothing");

    let o = rostersync(&["reconcile", "--json", "--log", "trace"], &cfg).await;
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let reports: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(reports[0]["outcome"], "ok");
    assert!(reports[0]["counts"]["created"].as_u64().unwrap() > 30);
    assert!(!env.scim.users().is_empty());
    for out in [text(&dry), text(&o)] {
        assert!(!out.contains(FIXTURE_CLIENT_SECRET), "client secret leaked");
        assert!(!out.contains(SCIM_TOKEN), "SCIM token leaked");
    }
    // Logs carry the run id and the integration.
    assert!(
        text(&o).contains("run_id") && text(&o).contains("integration"),
        "{}",
        text(&o)
    );
    // Records of crates logging through `log` are kept, except sled's: those come from deferred
    // closures that may run while a thread is torn down at exit, and formatting them then
    // aborted the process (1 run in 60 under load, exit by signal instead of 0).
    assert!(
        text(&o).contains("hyper"),
        "log records of dependencies are kept"
    );
    assert!(
        !text(&o).contains("sled::"),
        "sled records are not forwarded"
    );
}

#[tokio::test]
async fn a_run_with_failed_users_exits_2_and_lists_them() {
    let env = spawn(EnvOptions {
        users: 40,
        integration_extra: "username = \"mail\"".into(),
        ..Default::default()
    })
    .await;
    let cfg = write_config(env.dir.path(), &env.config_toml);
    let o = rostersync(&["reconcile"], &cfg).await;
    let out = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}");
    assert!(
        out.contains("FAILED") && out.contains("has no mail"),
        "{out}"
    );
}

/// `check --probe` is the go-live check: it says it writes, prints the table (operation,
/// the LMS's answer, what rostersync will do), leaves every canary deactivated, stores the
/// dialect (the next `check` says when it was probed), and `--json` carries the table.
#[tokio::test]
async fn check_probe_prints_the_table_stores_the_dialect_and_leaves_no_active_canary() {
    let env = spawn(EnvOptions {
        users: 5,
        dialect: rostersync_sim::scim::SimDialect::partial_library(),
        ..Default::default()
    })
    .await;
    let cfg = write_config(env.dir.path(), &env.config_toml);
    let o = rostersync(&["check"], &cfg).await;
    let out = text(&o);
    assert!(
        out.contains("WARN test: LMS dialect: not probed yet"),
        "{out}"
    );
    let o = rostersync(&["check", "--probe"], &cfg).await;
    let out = text(&o);
    assert!(out.contains("probe test: writing to the LMS"), "{out}");
    assert!(
        out.contains("LMS answered") && out.contains("rostersync will"),
        "{out}"
    );
    assert!(
        out.contains("find by externalId") && out.contains("0 found although the canary has it"),
        "{out}"
    );
    assert!(
        out.contains("clear title") && out.contains("replace null"),
        "{out}"
    );
    // displayName can never be cleared there (computed, refused by PATCH): not a failure.
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(!out.contains(SCIM_TOKEN) && !out.contains(FIXTURE_CLIENT_SECRET));
    let canaries: Vec<_> = env
        .scim
        .users()
        .into_iter()
        .filter(|u| {
            u["userName"]
                .as_str()
                .unwrap()
                .to_lowercase()
                .starts_with("rostersync-probe-")
        })
        .collect();
    assert!(canaries.len() >= 2, "{canaries:?}");
    assert!(
        canaries.iter().all(|u| u["active"] == false),
        "{canaries:?}"
    );
    let o = rostersync(&["check"], &cfg).await;
    let out = text(&o);
    assert!(out.contains("LMS dialect: probed"), "{out}");
    assert!(
        out.contains("userName uniqueness: case-sensitive (learned)"),
        "{out}"
    );

    let o = rostersync(&["check", "--probe", "--probe-delete", "--json"], &cfg).await;
    let lines: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    let probe = lines
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["what"] == "LMS probe")
        .expect("a probe line");
    assert!(
        probe["probe"]["rows"].as_array().unwrap().len() > 20,
        "{probe}"
    );
    assert!(probe["probe"]["dialect"].is_array());
}

/// `rostersync demo` needs no config or tenant: it reconciles the simulated tenant, starts
/// serve, and every live change reaches the LMS; exit 0, no secret printed.
#[tokio::test]
async fn demo_runs_live_changes_end_to_end_and_exits_0() {
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
            .args(["demo", "--users", "200"])
            .env_remove("RUST_LOG")
            .env_remove("ROSTERSYNC_CONFIG")
            .output(),
    )
    .await
    .expect("demo finishes")
    .expect("run demo");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    for change in [
        "hire:",
        "promote:",
        "manager change:",
        "leave:",
        "disable:",
        "rejoins the group",
        "enabled again",
    ] {
        let line = t
            .lines()
            .find(|l| l.contains(change))
            .unwrap_or_else(|| panic!("no line for {change}: {t}"));
        assert!(line.contains("in the LMS after"), "{line}");
    }
    assert!(t.contains("7 live changes reached the LMS"), "{t}");
    assert!(t.contains(", 0 did not"), "{t}");
    assert!(
        t.contains("/users") && t.contains("/members"),
        "subscriptions listed"
    );
    assert!(!t.contains(FIXTURE_CLIENT_SECRET) && !t.contains("demo-scim-token"));
}
