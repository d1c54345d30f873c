//! `serve` for tests: the real server on 127.0.0.1:0 (in this process, with a store the test
//! can inspect or break, or as the `rostersync` binary that can be SIGKILLed), the simulators
//! as Graph and the LMS, and helpers that wait for what a user would see.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{spawn, EnvOptions, TestEnv};
use rostersync::config::Config;
use rostersync::retry::RetryPolicy;
use rostersync::serve::{serve, ServeOptions};
use rostersync::store::{IntegrationStore, Store};
use rostersync::sync::worker::WorkerSettings;
use rostersync_sim::graph::{SimSubscription, SimUser};
use serde_json::{json, Value};

pub struct Served {
    pub env: TestEnv,
    /// The store `serve` uses (handed in, so tests can inspect or break it).
    pub store: Store,
    pub addr: SocketAddr,
    pub stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<()>,
}

pub fn opts() -> ServeOptions {
    ServeOptions {
        worker: WorkerSettings {
            concurrency: 8,
            retry: RetryPolicy::new(3, Duration::from_millis(200), Duration::from_secs(2)),
            gone_confirm_after: Duration::from_millis(500),
            user_deadline: Duration::from_secs(6),
        },
        health_interval: Duration::from_millis(300),
        renew_interval: Duration::from_secs(1),
        poll_interval: Duration::from_millis(200),
        store: None,
        shutdown_grace: Duration::from_secs(1),
        // Handshakes are answered only while a subscription call of ours is in flight, so
        // every subscription these tests see was validated through that window.
        handshake_startup_window: Duration::ZERO,
    }
}

pub async fn start(users: usize, extra: &str) -> Served {
    start_with(users, extra, |_| {}).await
}

/// `serve` on an environment made with these options.
pub async fn start_env(o: EnvOptions) -> Served {
    launch(spawn(o).await).await
}

/// `setup` runs after the simulators start and before `serve` does.
pub async fn start_with(users: usize, extra: &str, setup: impl FnOnce(&TestEnv)) -> Served {
    let env = spawn(EnvOptions {
        users,
        integration_extra: extra.to_string(),
        ..Default::default()
    })
    .await;
    setup(&env);
    launch(env).await
}

/// Starts `serve` for an environment (again, after a stop: same data directory).
pub async fn launch(env: TestEnv) -> Served {
    launch_on(env, 0).await
}

/// Starts `serve` and returns once it listens, without waiting for its first reconcile.
pub async fn launch_unready(env: TestEnv) -> Served {
    launch_with(env, 0, false).await
}

/// Starts `serve` again on a known port (the subscriptions Graph holds point at it).
pub async fn relaunch_on(env: TestEnv, port: u16) -> Served {
    launch_on(env, port).await
}

async fn launch_on(env: TestEnv, port: u16) -> Served {
    launch_with(env, port, true).await
}

async fn launch_with(env: TestEnv, port: u16, ready: bool) -> Served {
    let text = env.config_toml.replacen(
        "[server]\n",
        &format!("[server]\nlisten = \"127.0.0.1:{port}\"\n"),
        1,
    );
    let config = Config::from_toml(&text, Path::new(".")).expect("config");
    let name = config.integrations[0].name.to_string();
    // After a stop in this process, the last handles (aborted tasks, actix workers' app data)
    // drop a moment later, and sled's lock goes with them.
    let mut tries = 0;
    let store = loop {
        match Store::open(&config.server.data_dir) {
            Err(rostersync::store::StoreError::Locked(_)) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            r => break r.expect("store"),
        }
    };
    let mut options = opts();
    options.store = Some(store.clone());
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut addr_tx = Some(addr_tx);
        serve(
            config,
            options,
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
        .expect("serve");
    });
    let addr = tokio::time::timeout(Duration::from_secs(10), addr_rx)
        .await
        .expect("listening in time")
        .expect("address");
    let s = Served {
        env,
        store,
        addr,
        stop: Some(stop_tx),
        task,
    };
    if !ready {
        return s;
    }
    // Ready: subscriptions made through the handshake, first reconcile applied and recorded
    // (so a test's own changes never race it).
    let members = s.env.member_ids().len();
    wait_for("subscriptions and the first reconcile", 20_000, || {
        s.env.graph.subscriptions().len() >= 2
            && s.env.scim.user_count() >= members * 9 / 10
            && s.runs_of(&name) >= 1
    })
    .await;
    s
}

impl Served {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
    pub fn integ_store(&self) -> IntegrationStore {
        let name = self.env.integration.cfg.name.clone();
        self.store.integration(&name).expect("integration store")
    }
    pub fn runs_of(&self, name: &str) -> usize {
        let name = rostersync::config::IntegrationName::parse(name).expect("name");
        self.store
            .integration(&name)
            .expect("integration store")
            .runs::<serde_json::Value>(1000)
            .expect("runs")
            .len()
    }
    pub fn runs(&self) -> usize {
        self.integ_store()
            .runs::<serde_json::Value>(1000)
            .expect("runs")
            .len()
    }
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.task).await;
    }

    /// Stops `serve` (gracefully) and hands back the environment to start it again.
    pub async fn stop_keep_env(mut self) -> TestEnv {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
        drop(self.store);
        self.env
    }
}

pub async fn wait_for(what: &str, ms: u64, mut f: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(ms) {
        if f() {
            return started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out after {ms} ms waiting for {what}");
}

pub fn lms(env: &TestEnv, id: &str) -> Option<Value> {
    env.scim.user_by_external_id(id)
}

pub fn active(env: &TestEnv, id: &str) -> Option<bool> {
    lms(env, id).and_then(|u| u.get("active").and_then(|v| v.as_bool()))
}

pub fn new_user(n: u32, manager: Option<String>) -> SimUser {
    SimUser {
        id: format!("aaaaaaaa-0000-4000-8000-{n:012}"),
        user_principal_name: format!("new.hire{n}@contoso-sim.onmicrosoft.com"),
        mail: Some(format!("new.hire{n}@contoso.example")),
        given_name: Some("New".into()),
        surname: Some(format!("Hire {n}")),
        display_name: Some(format!("New Hire {n}")),
        job_title: Some("Analyst".into()),
        department: Some("Finance".into()),
        account_enabled: true,
        manager_id: manager,
        ..Default::default()
    }
}

pub fn users_subscription(env: &TestEnv) -> SimSubscription {
    env.graph
        .subscriptions()
        .into_iter()
        .find(|s| {
            s.resource
                .trim_start_matches('/')
                .eq_ignore_ascii_case("users")
        })
        .expect("a /users subscription")
}

/// A genuine change notification for one user, as Graph would post it.
pub fn user_notification(env: &TestEnv, sub: &SimSubscription, user_id: &str) -> Value {
    json!({"value": [{
        "subscriptionId": sub.id,
        "subscriptionExpirationDateTime": sub.expires_at.to_rfc3339(),
        "clientState": sub.client_state.clone().unwrap_or_default(),
        "changeType": "updated",
        "resource": format!("Users/{user_id}"),
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.User",
            "@odata.id": format!("Users/{user_id}"),
            "id": user_id,
        },
        "tenantId": env.fx.tenant.tenant_id,
    }]})
}

pub fn title(env: &TestEnv, id: &str) -> Option<String> {
    lms(env, id).and_then(|u| u["title"].as_str().map(str::to_string))
}

/// `wait_for`, but a timeout shows the end of the child's log.
pub async fn wait_logged(what: &str, ms: u64, log: &Path, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(ms) {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(40).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    panic!(
        "timed out after {ms} ms waiting for {what}; serve's log ends:\n{}",
        tail.join("\n")
    );
}

/// The `rostersync serve` binary as a child process.
pub struct Child {
    pub proc: tokio::process::Child,
    pub addr: SocketAddr,
}

pub async fn spawn_serve(config: &Path, log: &Path) -> Child {
    use tokio::io::AsyncBufReadExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut proc = tokio::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
        .arg("--config")
        .arg(config)
        .args(["--log", "info", "serve"])
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn rostersync serve");
    let stdout = proc.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.trim().parse::<SocketAddr>().unwrap();
            }
        }
        panic!("serve exited before listening");
    })
    .await
    .expect("serve listening in time");
    Child { proc, addr }
}
