//! Alerts end to end: real flows against the simulators raise them, a real SMTP server (the
//! SMTP simulator, `rostersync_sim::smtp`, requiring AUTH) and a small HTTP listener receive
//! them. Every message is checked for the recognisable fake secrets of the configuration, and
//! the SMTP server for any command the mail client got wrong. One more test, ignored unless
//! asked for (`.ci/run` asks), sends through aiosmtpd, an independent SMTP server in Python.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{spawn, EnvOptions, TestEnv, SCIM_TOKEN};
use chrono::Utc;
use rostersync::alert::Alerter;
use rostersync::config::Config;
use rostersync::retry::RetryPolicy;
use rostersync::serve::{serve, ServeOptions};
use rostersync::store::queue::{Hint, QueueItem};
use rostersync::store::Store;
use rostersync::sync::reconcile::RunOutcome;
use rostersync::sync::worker::{self, WorkerSettings};
use rostersync_sim::graph::SimUser;
use rostersync_sim::scim::ScimFaults;
use rostersync_sim::smtp::{ReceivedMail as Mail, SmtpSim, SmtpSimConfig};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SMTP_USER: &str = "smtp-user-FAKE-0a1b2c";
const SMTP_PASSWORD: &str = "smtp-pass-FAKE-9c8d7e";
const WEBHOOK_TOKEN: &str = "WEBHOOK-TOKEN-FAKE-4e5f6a";
const CLIENT_STATE: &str = "CLIENTSTATE-FAKE-7a6b5c4d3e2f1a0b";
const WRONG_SECRET: &str = "WRONG-SECRET-FAKE-1234abcd";

// ---- the SMTP server ----

struct Smtp {
    sim: SmtpSim,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The SMTP simulator requiring AUTH with the test credentials (allowed without TLS: the
/// configuration says `tls = "none"`, which rostersync allows on loopback only); on `port`,
/// or on a free one with 0.
async fn start_smtp(port: u16) -> Smtp {
    let config = SmtpSimConfig {
        credentials: Some((SMTP_USER.into(), SMTP_PASSWORD.into())),
        auth_without_tls: true,
        ..Default::default()
    };
    let sim = SmtpSim::start_on(SocketAddr::from(([127, 0, 0, 1], port)), config)
        .await
        .expect("the SMTP simulator listens");
    let port = sim.port();
    Smtp { sim, port }
}

impl Smtp {
    /// What was accepted; the client must have made no protocol error on the way.
    fn mails(&self) -> Vec<Mail> {
        assert_eq!(
            self.sim.protocol_errors(),
            Vec::<String>::new(),
            "the mail client broke SMTP"
        );
        self.sim.mails()
    }

    async fn wait_mails(&self, n: usize) -> Vec<Mail> {
        self.sim.wait_mails(n, Duration::from_secs(20)).await;
        let m = self.mails();
        assert_eq!(m.len(), n, "mails received: {:#?}", m);
        m
    }
}

// ---- the webhook receiver ----

#[derive(Clone, Default)]
struct Hook {
    addr: Option<SocketAddr>,
    /// (path, JSON body) of every request.
    got: Arc<Mutex<Vec<(String, Value)>>>,
}

/// A minimal HTTP/1.1 listener that records each POST and answers 200.
async fn start_hook() -> Hook {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = Hook {
        addr: Some(listener.local_addr().unwrap()),
        ..Default::default()
    };
    let got = Arc::clone(&hook.got);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let got = Arc::clone(&got);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let (head_end, len) = loop {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..i]).to_lowercase();
                        let len = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        break (i + 4, len);
                    }
                };
                while buf.len() < head_end + len {
                    let n = sock.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let body: Value =
                    serde_json::from_slice(&buf[head_end..head_end + len]).unwrap_or(Value::Null);
                got.lock().unwrap().push((path, body));
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
            });
        }
    });
    hook
}

impl Hook {
    fn bodies(&self) -> Vec<(String, Value)> {
        self.got.lock().unwrap().clone()
    }
}

// ---- configuration and checks ----

/// An `[alerts]` table pointing at the test SMTP server (and the hook, if any), with the SMTP
/// password in a file.
fn alerts_toml(dir: &Path, smtp_port: u16, hook: Option<&Hook>) -> String {
    alerts_toml_tls(dir, smtp_port, hook, "none")
}

fn alerts_toml_tls(dir: &Path, smtp_port: u16, hook: Option<&Hook>, tls: &str) -> String {
    let pw = dir.join("smtp-password");
    std::fs::write(&pw, format!("{SMTP_PASSWORD}\n")).unwrap();
    let webhook = match hook.and_then(|h| h.addr) {
        Some(a) => format!("webhook_url = {{ value = \"http://{a}/hook/{WEBHOOK_TOKEN}\" }}\n"),
        None => String::new(),
    };
    format!(
        r#"
[alerts]
email_to = ["ops@example.com", "Service Desk <desk@example.com>"]
email_from = "rostersync <rostersync@example.com>"
{webhook}
[alerts.smtp]
host = "127.0.0.1"
port = {smtp_port}
tls = "{tls}"
username = {{ value = "{SMTP_USER}" }}
password = {{ file = "{pw}" }}
timeout_secs = 5
"#,
        pw = pw.display()
    )
}

struct Setup {
    env: TestEnv,
    config: Config,
    alerter: Alerter,
    _secrets: tempfile::TempDir,
}

async fn setup(users: usize, extra: &str, smtp_port: u16, hook: Option<&Hook>) -> Setup {
    let secrets = tempfile::tempdir().unwrap();
    let env = spawn(EnvOptions {
        users,
        integration_extra: format!("client_state = {{ value = \"{CLIENT_STATE}\" }}\n{extra}"),
        tail: alerts_toml(secrets.path(), smtp_port, hook),
        ..Default::default()
    })
    .await;
    let config = Config::from_toml(&env.config_toml, Path::new(".")).expect("config");
    let alerter = Alerter::new(&config, &env.store).unwrap();
    Setup {
        env,
        config,
        alerter,
        _secrets: secrets,
    }
}

/// No configured secret may appear in what was sent.
fn assert_no_secret(env: &TestEnv, text: &str) {
    for s in [
        SMTP_PASSWORD,
        SMTP_USER,
        WEBHOOK_TOKEN,
        CLIENT_STATE,
        WRONG_SECRET,
        SCIM_TOKEN,
        env.fx.tenant.client_secret.as_str(),
    ] {
        assert!(
            !text.contains(s),
            "a secret ({s}) leaked into an alert:\n{text}"
        );
    }
}

fn assert_clean_mail(env: &TestEnv, m: &Mail) {
    assert_no_secret(env, &m.raw);
    assert_no_secret(env, &m.body);
    assert_no_secret(env, &m.subject);
}

fn enabled_members(env: &TestEnv, n: usize) -> Vec<SimUser> {
    env.member_ids()
        .into_iter()
        .filter_map(|id| env.graph.user(&id))
        .filter(|u| u.account_enabled && u.id != env.fx.ceo_id)
        .take(n)
        .collect()
}

/// An LMS user made by hand (another externalId) that holds `user_name`.
fn squat(env: &TestEnv, user_name: &str, n: usize) {
    env.scim
        .insert_user(json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": user_name,
            "externalId": format!("not-from-entra-{n}"),
            "active": true
        }))
        .unwrap();
}

fn new_member(env: &TestEnv, n: u32) -> SimUser {
    let u = SimUser {
        id: format!("bbbbbbbb-0000-4000-8000-{n:012}"),
        user_principal_name: format!("late.joiner{n}@contoso-sim.onmicrosoft.com"),
        mail: Some(format!("late.joiner{n}@contoso.example")),
        given_name: Some("Late".into()),
        surname: Some(format!("Joiner {n}")),
        display_name: Some(format!("Late Joiner {n}")),
        account_enabled: true,
        ..Default::default()
    };
    env.graph.upsert_user(u.clone());
    env.graph.add_member(&env.fx.all_group_id, &u.id);
    u
}

// ---- tests ----

#[tokio::test]
async fn failed_users_arrive_as_one_digest_by_mail_and_webhook_without_secrets() {
    let smtp = start_smtp(0).await;
    let hook = start_hook().await;
    let s = setup(60, "", smtp.port, Some(&hook)).await;
    let env = &s.env;
    let victims = enabled_members(env, 3);
    for (n, v) in victims.iter().enumerate() {
        squat(env, &v.user_principal_name, n);
    }
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::Partial, "{:?}", r.error);
    assert_eq!(r.failures.len(), 3, "{:?}", r.failures);

    let d = s.alerter.deliver_due(Utc::now()).await;
    assert_eq!((d.sent, d.failed), (1, 0));
    let mails = smtp.wait_mails(1).await;
    let m = &mails[0];
    assert_eq!(m.subject, "[rostersync] test: 3 users failed to sync");
    assert_eq!(m.rcpt_to, vec!["ops@example.com", "desk@example.com"]);
    assert_eq!(
        m.auth_user.as_deref(),
        Some(SMTP_USER),
        "SMTP AUTH was used"
    );
    for v in &victims {
        let line = m
            .body
            .lines()
            .find(|l| l.contains(&v.id))
            .unwrap_or_else(|| panic!("{} is not listed:\n{}", v.id, m.body));
        assert!(line.contains(&v.user_principal_name), "{line}");
        assert!(line.contains("another identity"), "the reason: {line}");
    }
    assert!(
        m.body.contains(&r.run_id) && m.body.contains("What to do:"),
        "{}",
        m.body
    );
    assert_clean_mail(env, m);

    let got = hook.bodies();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, format!("/hook/{WEBHOOK_TOKEN}"));
    let text = got[0].1["text"].as_str().expect("a {\"text\": …} body");
    assert!(
        text.starts_with("[rostersync] test: 3 users failed to sync"),
        "{text}"
    );
    assert!(victims
        .iter()
        .all(|v| text.contains(&v.user_principal_name)));
    assert_no_secret(env, text);

    // The same users failing for the same reasons are not reported again.
    let r = env.reconcile().await;
    assert_eq!(r.failures.len(), 3);
    let d = s
        .alerter
        .deliver_due(Utc::now() + chrono::Duration::hours(1))
        .await;
    assert_eq!(d.sent, 0);

    // A new failure waits for the digest window (15 minutes by default), then comes alone.
    let late = new_member(env, 1);
    squat(env, &late.user_principal_name, 9);
    let r = env.reconcile().await;
    assert_eq!(r.failures.len(), 4, "{:?}", r.failures);
    assert_eq!(s.alerter.deliver_due(Utc::now()).await.sent, 0);
    let d = s
        .alerter
        .deliver_due(Utc::now() + chrono::Duration::minutes(16))
        .await;
    assert_eq!(d.sent, 1);
    let mails = smtp.wait_mails(2).await;
    assert_eq!(mails[1].subject, "[rostersync] test: 1 user failed to sync");
    assert!(mails[1].body.contains(&late.user_principal_name));
    assert!(!mails[1].body.contains(&victims[0].user_principal_name));
    assert_eq!(hook.bodies().len(), 2);
}

#[tokio::test]
async fn a_guard_trip_alerts_once_with_the_numbers_and_the_way_out() {
    let smtp = start_smtp(0).await;
    let s = setup(100, "max_deactivations = \"10%\"", smtp.port, None).await;
    let env = &s.env;
    assert_eq!(env.reconcile().await.outcome, RunOutcome::Ok);
    for v in enabled_members(env, 30) {
        env.graph.remove_member(&env.fx.all_group_id, &v.id);
        env.graph.remove_member(&env.fx.nested_group_id, &v.id);
    }
    let r = env.reconcile().await;
    assert_eq!(r.outcome, RunOutcome::GuardTripped);
    assert_eq!(s.alerter.deliver_due(Utc::now()).await.sent, 1);
    let mails = smtp.wait_mails(1).await;
    let m = &mails[0];
    assert_eq!(
        m.subject,
        "[rostersync] test: mass-deactivation guard stopped 30 deactivations"
    );
    let active_before = r.guard.as_ref().unwrap().active_before;
    assert!(
        m.body.contains(&format!(
            "Would deactivate 30 of {active_before} active users"
        )),
        "{}",
        m.body
    );
    assert!(m.body.contains("--allow-mass-deactivation"), "{}", m.body);
    assert_clean_mail(env, m);

    // The next run trips again: no second mail within the window (24 hours by default).
    assert_eq!(env.reconcile().await.outcome, RunOutcome::GuardTripped);
    assert_eq!(
        s.alerter
            .deliver_due(Utc::now() + chrono::Duration::hours(1))
            .await
            .sent,
        0
    );
    assert_eq!(smtp.mails().len(), 1);
}

#[tokio::test]
async fn a_rejected_client_secret_alerts_with_the_aadsts_advice_and_not_the_secret() {
    let smtp = start_smtp(0).await;
    let s = setup(20, "", smtp.port, None).await;
    let env = &s.env;
    let good = format!(
        "client_secret = {{ value = \"{}\" }}",
        env.fx.tenant.client_secret
    );
    assert!(env.config_toml.contains(&good));
    let text = env.config_toml.replace(
        &good,
        &format!("client_secret = {{ value = \"{WRONG_SECRET}\" }}"),
    );
    let config = Config::from_toml(&text, Path::new(".")).unwrap();
    let integ = rostersync::app::Integration::build(&config.integrations[0], &env.store).unwrap();
    let alerter = Alerter::new(&config, &env.store).unwrap();

    let r = integ.reconcile(Default::default(), None).await;
    assert_eq!(r.outcome, RunOutcome::Failed);
    assert_eq!(alerter.deliver_due(Utc::now()).await.sent, 1);
    let mails = smtp.wait_mails(1).await;
    let m = &mails[0];
    assert_eq!(
        m.subject,
        "[rostersync] test: Graph authentication fails (AADSTS7000215)"
    );
    assert!(
        m.body.contains("client secret rejected (AADSTS7000215)")
            && m.body.contains("Copy the secret's Value"),
        "{}",
        m.body
    );
    assert!(m.body.contains(&env.fx.tenant.client_id), "{}", m.body);
    assert_clean_mail(env, m);

    // While it persists: once per hour (repeat_minutes = 60), not once per run.
    integ.reconcile(Default::default(), None).await;
    assert_eq!(alerter.deliver_due(Utc::now()).await.sent, 0);
    assert_eq!(smtp.mails().len(), 1);
    // The graph module's token failures from elsewhere (serve's health probe) share the key.
    let e = integ.graph.token().await.unwrap_err();
    rostersync::alert::graph_token_failed(&integ.cfg, &integ.store, &e);
    assert_eq!(alerter.deliver_due(Utc::now()).await.sent, 0);
}

#[tokio::test]
async fn dead_letters_arrive_as_one_digest_listing_each_item() {
    let smtp = start_smtp(0).await;
    let s = setup(40, "", smtp.port, None).await;
    let env = &s.env;
    assert_eq!(env.reconcile().await.outcome, RunOutcome::Ok);
    let ctx = env.integration.context();
    worker::init_tree(&ctx).await.unwrap();
    let tg = worker::targeting(&ctx).await.unwrap();
    let users = enabled_members(env, 2);
    for u in &users {
        env.graph
            .update_user(&u.id, |u| u.job_title = Some("Promoted".into()));
    }
    // The LMS fails every request about these users (not the LMS as a whole: that would be
    // an outage, which counts no attempt): each update fails, and with max_attempts = 1 the
    // items go straight to the dead letters.
    env.scim.set_faults(ScimFaults {
        users: users
            .iter()
            .map(|u| rostersync_sim::scim::UserFault {
                external_id: u.id.clone(),
                kind: rostersync_sim::scim::UserFaultKind::Status(500),
            })
            .collect(),
        ..Default::default()
    });
    let store = &env.integration.store;
    store
        .enqueue(
            &users
                .iter()
                .map(|u| {
                    QueueItem::new(Hint::User {
                        user_id: u.id.clone(),
                        follow_up: true,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .unwrap();
    let items = store.queue_ready(Utc::now(), 100).unwrap();
    let ws = WorkerSettings {
        retry: RetryPolicy {
            max_attempts: 1,
            ..WorkerSettings::default().retry
        },
        ..Default::default()
    };
    let (out, result) = env.integration.process_batch(&tg, &ws, items).await;
    result.unwrap();
    assert_eq!(out.buried, 2, "{:?}", out.failed);

    assert_eq!(s.alerter.deliver_due(Utc::now()).await.sent, 1);
    let mails = smtp.wait_mails(1).await;
    let m = &mails[0];
    assert_eq!(
        m.subject,
        "[rostersync] test: 2 notifications moved to the dead letters"
    );
    for u in &users {
        assert!(
            m.body
                .lines()
                .any(|l| l.contains(&format!("user {}", u.id)) && l.contains("after 1 attempts")),
            "{}",
            m.body
        );
    }
    assert!(
        m.body.contains("queue replay --all --integration test"),
        "{}",
        m.body
    );
    assert_clean_mail(env, m);
}

/// Opens a store directory, waiting for the previous handle's flusher thread to let go.
async fn reopen(path: &Path) -> Store {
    let start = Instant::now();
    loop {
        match Store::open(path) {
            Ok(s) => return s,
            Err(e) if start.elapsed() > Duration::from_secs(10) => panic!("{e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn an_alert_that_cannot_be_sent_is_kept_across_a_restart_and_sent_once_smtp_is_up() {
    let port = free_port(); // nothing listens there yet
    let today = Utc::now().date_naive();
    let expires = today + chrono::Duration::days(10);
    let s = setup(
        10,
        &format!("client_secret_expires = \"{expires}\""),
        port,
        None,
    )
    .await;
    let db = s.env.dir.path().join("alerts-db");
    {
        let store = Store::open(&db).unwrap();
        let alerter = Alerter::new(&s.config, &store).unwrap();
        alerter.check_secret_expiry(today);
        let d = alerter.deliver_due(Utc::now()).await;
        assert_eq!((d.sent, d.failed), (0, 1));
        store.flush().unwrap();
    }
    // A restart: the outbox is read back from disk.
    let store = reopen(&db).await;
    let smtp = start_smtp(port).await;
    let alerter = Alerter::new(&s.config, &store).unwrap();
    let now = Utc::now();
    assert_eq!(
        alerter.deliver_due(now).await.sent,
        0,
        "retried after a backoff, not at once"
    );
    assert_eq!(
        alerter
            .deliver_due(now + chrono::Duration::minutes(1))
            .await
            .sent,
        1
    );
    let mails = smtp.wait_mails(1).await;
    let m = &mails[0];
    assert_eq!(
        m.subject,
        format!("[rostersync] test: the client secret expires in 10 days ({expires})")
    );
    assert!(m.body.contains("Certificates & secrets"), "{}", m.body);
    assert_clean_mail(&s.env, m);

    // Each stage once: the 14-day stage is done, the 7-day one and "expired" come later.
    alerter.check_secret_expiry(today);
    alerter.check_secret_expiry(today + chrono::Duration::days(1));
    assert_eq!(alerter.deliver_due(now).await.sent, 0);
    alerter.check_secret_expiry(today + chrono::Duration::days(3));
    alerter.check_secret_expiry(expires + chrono::Duration::days(1));
    alerter.check_secret_expiry(expires + chrono::Duration::days(2));
    assert_eq!(alerter.deliver_due(Utc::now()).await.sent, 2);
    let mails = smtp.wait_mails(3).await;
    let subjects: Vec<&str> = mails.iter().map(|m| m.subject.as_str()).collect();
    assert!(
        subjects.contains(
            &format!("[rostersync] test: the client secret expires in 7 days ({expires})").as_str()
        ),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(
            &format!("[rostersync] test: the client secret expired on {expires}").as_str()
        ),
        "{subjects:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_sends_expiry_warnings_and_subscription_failures_on_its_own() {
    let smtp = start_smtp(0).await;
    let hook = start_hook().await;
    let expires = Utc::now().date_naive() + chrono::Duration::days(3);
    let s = setup(
        20,
        &format!("client_secret_expires = {expires}"),
        smtp.port,
        Some(&hook),
    )
    .await;
    // Graph's validation handshake cannot reach this public_url: no subscription can be made.
    let text = s.env.config_toml.replacen(
        "[server]\n",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:{}\"\n",
            free_port()
        ),
        1,
    );
    let config = Config::from_toml(&text, Path::new(".")).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(config, ServeOptions::default(), |_| {}, async {
            let _ = stop_rx.await;
        })
        .await
        .expect("serve");
    });
    let mails = smtp.wait_mails(2).await;
    let mut subjects: Vec<&str> = mails.iter().map(|m| m.subject.as_str()).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        vec![
            "[rostersync] test: Graph subscriptions cannot be created or renewed".to_string(),
            format!("[rostersync] test: the client secret expires in 3 days ({expires})"),
        ]
    );
    let subs = mails
        .iter()
        .find(|m| m.subject.contains("subscriptions"))
        .unwrap();
    assert!(subs.body.contains("/users"), "{}", subs.body);
    for m in &mails {
        assert_clean_mail(&s.env, m);
    }
    let start = Instant::now();
    while hook.bodies().len() < 2 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(hook.bodies().len(), 2);
    for (_, b) in hook.bodies() {
        assert_no_secret(&s.env, b["text"].as_str().unwrap());
    }
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("serve stops")
        .unwrap();
}

/// A secret Entra refuses when `serve` starts: start-up cannot finish, yet the token probe
/// alerts at once with the advice, and a start-up alert follows after a few attempts.
#[tokio::test]
async fn serve_alerts_when_it_cannot_start_because_the_secret_is_refused() {
    let smtp = start_smtp(0).await;
    let s = setup(10, "", smtp.port, None).await;
    let good = format!(
        "client_secret = {{ value = \"{}\" }}",
        s.env.fx.tenant.client_secret
    );
    let text = s
        .env
        .config_toml
        .replace(
            &good,
            &format!("client_secret = {{ value = \"{WRONG_SECRET}\" }}"),
        )
        .replacen("[server]\n", "[server]\nlisten = \"127.0.0.1:0\"\n", 1);
    let config = Config::from_toml(&text, Path::new(".")).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(config, ServeOptions::default(), |_| {}, async {
            let _ = stop_rx.await;
        })
        .await
        .expect("serve");
    });
    let mails = smtp.wait_mails(2).await;
    let subjects: Vec<&str> = mails.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects[0],
        "[rostersync] test: Graph authentication fails (AADSTS7000215)"
    );
    assert_eq!(
        subjects[1],
        "[rostersync] test: serve cannot start syncing this integration"
    );
    assert!(mails[1].body.contains("AADSTS7000215"), "{}", mails[1].body);
    for m in &mails {
        assert_clean_mail(&s.env, m);
    }
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("serve stops")
        .unwrap();
}

#[tokio::test]
async fn the_reconcile_command_sends_its_alerts_before_it_exits() {
    let smtp = start_smtp(0).await;
    let expires = Utc::now().date_naive() + chrono::Duration::days(30);
    let s = setup(
        30,
        &format!("client_secret_expires = \"{expires}\""),
        smtp.port,
        None,
    )
    .await;
    let victim = &enabled_members(&s.env, 1)[0];
    squat(&s.env, &victim.user_principal_name, 0);
    let config = s.env.dir.path().join("rostersync.toml");
    std::fs::write(&config, &s.env.config_toml).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
        .arg("--config")
        .arg(&config)
        .arg("reconcile")
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "some users failed");
    // Sent by the command itself, before it exited.
    let mails = smtp.mails();
    let mut subjects: Vec<&str> = mails.iter().map(|m| m.subject.as_str()).collect();
    subjects.sort();
    assert_eq!(
        subjects,
        vec![
            "[rostersync] test: 1 user failed to sync".to_string(),
            format!("[rostersync] test: the client secret expires in 30 days ({expires})"),
        ]
    );
    for m in &mails {
        assert_clean_mail(&s.env, m);
    }
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_secret(&s.env, &printed);
}

#[tokio::test]
async fn starttls_is_required_never_skipped() {
    // The test server offers no STARTTLS: nothing may be sent in the clear.
    let smtp = start_smtp(0).await;
    let dir = tempfile::tempdir().unwrap();
    let env = spawn(EnvOptions {
        users: 5,
        integration_extra: "client_secret_expires = \"2000-01-01\"".into(),
        tail: alerts_toml_tls(dir.path(), smtp.port, None, "starttls"),
        ..Default::default()
    })
    .await;
    let config = Config::from_toml(&env.config_toml, Path::new(".")).unwrap();
    let alerter = Alerter::new(&config, &env.store).unwrap();
    alerter.check_secret_expiry(Utc::now().date_naive());
    let d = alerter.deliver_due(Utc::now()).await;
    assert_eq!((d.sent, d.failed), (0, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(smtp.mails().is_empty());
    // Not even the credentials or the envelope went out in the clear.
    let commands = smtp.sim.commands();
    assert!(commands.contains(&"EHLO".to_string()), "{commands:?}");
    assert!(
        !commands.iter().any(|c| c == "AUTH" || c == "MAIL"),
        "{commands:?}"
    );
}

#[tokio::test]
async fn starttls_to_a_certificate_nobody_trusts_sends_nothing() {
    // STARTTLS is offered, with the test certificate: its CA is no trust anchor of this
    // machine, so the handshake fails and neither credentials nor message go out.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let tls = rostersync_sim::smtp::server_tls(
        &std::fs::read(dir.join("rsa-fullchain.pem")).unwrap(),
        &std::fs::read(dir.join("rsa-key-pkcs8.pem")).unwrap(),
    )
    .unwrap();
    let sim = SmtpSim::start(SmtpSimConfig {
        credentials: Some((SMTP_USER.into(), SMTP_PASSWORD.into())),
        tls: Some(tls),
        require_tls: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let env = spawn(EnvOptions {
        users: 5,
        integration_extra: "client_secret_expires = \"2000-01-01\"".into(),
        tail: alerts_toml_tls(secrets.path(), sim.port(), None, "starttls"),
        ..Default::default()
    })
    .await;
    let config = Config::from_toml(&env.config_toml, Path::new(".")).unwrap();
    let alerter = Alerter::new(&config, &env.store).unwrap();
    alerter.check_secret_expiry(Utc::now().date_naive());
    let d = alerter.deliver_due(Utc::now()).await;
    assert_eq!((d.sent, d.failed), (0, 1));
    assert!(sim.mails().is_empty());
    let commands = sim.commands();
    assert_eq!(commands, vec!["EHLO", "STARTTLS"], "{commands:?}");
}

// ---- interop with an independent SMTP server ----

/// What `tests/smtp_sink.py` writes for each message.
#[derive(Debug, Deserialize)]
struct SinkMail {
    rcpt_tos: Vec<String>,
    subject: String,
    body: String,
    raw: String,
    auth_user: Option<String>,
}

struct PySink {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
}

impl Drop for PySink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl PySink {
    fn start() -> PySink {
        let port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/smtp_sink.py");
        let mut child = Command::new("python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(dir.path())
            .args([SMTP_USER, SMTP_PASSWORD])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "READY",
            "tests/smtp_sink.py did not start; it needs aiosmtpd (python3 -m pip install aiosmtpd)"
        );
        PySink { child, dir, port }
    }

    async fn wait_mails(&self, n: usize) -> Vec<SinkMail> {
        let start = Instant::now();
        loop {
            let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect();
            names.sort();
            if names.len() >= n || start.elapsed() > Duration::from_secs(20) {
                let m: Vec<SinkMail> = names
                    .iter()
                    .map(|p| serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap())
                    .collect();
                assert_eq!(m.len(), n, "mails received: {m:#?}");
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The same digest as the first test, through aiosmtpd (`.ci/run` installs it and runs
/// `cargo test --test it alerts:: -- --ignored`): our client against a server we did not write.
#[tokio::test]
#[ignore = "needs python3 with aiosmtpd; .ci/run runs it"]
async fn aiosmtpd_receives_a_digest_with_auth_and_without_secrets() {
    let sink = PySink::start();
    let s = setup(30, "", sink.port, None).await;
    let env = &s.env;
    let victims = enabled_members(env, 2);
    for (n, v) in victims.iter().enumerate() {
        squat(env, &v.user_principal_name, n);
    }
    assert_eq!(env.reconcile().await.failures.len(), 2);
    let d = s.alerter.deliver_due(Utc::now()).await;
    assert_eq!((d.sent, d.failed), (1, 0));
    let mails = sink.wait_mails(1).await;
    let m = &mails[0];
    assert_eq!(m.subject, "[rostersync] test: 2 users failed to sync");
    assert_eq!(m.rcpt_tos, vec!["ops@example.com", "desk@example.com"]);
    assert_eq!(m.auth_user.as_deref(), Some(SMTP_USER));
    for v in &victims {
        assert!(m.body.contains(&v.user_principal_name), "{}", m.body);
    }
    for text in [&m.raw, &m.body, &m.subject] {
        assert_no_secret(env, text);
    }
}
