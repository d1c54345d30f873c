//! What a stranger on the internet, a bad peer and a bad day can do to `serve`: hostile
//! webhook posts and handshakes against the real binary (its log and `/readyz` read back),
//! the cleartext-admin refusal, redirects from Graph, the identity platform and the LMS, and a
//! throttling token endpoint.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{spawn, EnvOptions};
use rostersync::graph::credential::ClientCredential;
use rostersync::graph::{GraphClient, GraphSettings};
use rostersync::lms::scim::ScimTarget;
use rostersync::lms::Target;
use secrecy::SecretString;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use url::Url;

// ---- a scriptable HTTP stub on 127.0.0.1 ------------------------------------------------

/// One canned answer.
#[derive(Clone)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
    delay: Duration,
}

impl Answer {
    fn json(status: u16, body: Value) -> Answer {
        Answer {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: body.to_string(),
            delay: Duration::ZERO,
        }
    }

    fn redirect(to: &str) -> Answer {
        Answer {
            status: 307,
            headers: vec![("Location".into(), to.into())],
            body: String::new(),
            delay: Duration::ZERO,
        }
    }
}

type Script = Arc<dyn Fn(usize, &str) -> Answer + Send + Sync>;

/// Answers each request with `script(request number, request line)`; records the requests.
struct Stub {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Stub {
    async fn start(script: impl Fn(usize, &str) -> Answer + Send + Sync + 'static) -> Stub {
        let script: Script = Arc::new(script);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (hits.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut conn, _)) = listener.accept().await else {
                    return;
                };
                let (h, s, script) = (h.clone(), s.clone(), script.clone());
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 8192];
                    let head_end = loop {
                        if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&req[..head_end]).to_string();
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    while req.len() < head_end + len {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = head.lines().next().unwrap_or("").to_string();
                    let n = h.fetch_add(1, Ordering::SeqCst);
                    s.lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&req).to_string());
                    let a = script(n, &line);
                    tokio::time::sleep(a.delay).await;
                    let mut out = format!(
                        "HTTP/1.1 {} Stub\r\nContent-Length: {}\r\nConnection: close\r\n",
                        a.status,
                        a.body.len()
                    );
                    for (k, v) in &a.headers {
                        out.push_str(&format!("{k}: {v}\r\n"));
                    }
                    out.push_str("\r\n");
                    out.push_str(&a.body);
                    let _ = conn.write_all(out.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Stub { addr, hits, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

const TENANT: &str = "7a4f1c2e-0b9d-4e6a-8c3f-2d1e5b6a7c8d";
const CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
const SECRET: &str = "client-secret-that-must-not-travel";

fn graph_client(login: &str, graph: &str) -> GraphClient {
    GraphClient::new(
        GraphSettings {
            tenant_id: TENANT.into(),
            client_id: CLIENT_ID.into(),
            credential: ClientCredential::Secret(SecretString::from(SECRET)),
            login_url: Url::parse(login).unwrap(),
            graph_url: Url::parse(graph).unwrap(),
        },
        GraphClient::default_http().unwrap(),
    )
}

fn token_ok(expires_in: u64) -> Answer {
    Answer::json(
        200,
        json!({"token_type": "Bearer", "expires_in": expires_in, "access_token": "at-1"}),
    )
}

// ---- redirects --------------------------------------------------------------------------

/// A 307/308 from the token endpoint, Graph or the LMS is an error naming its target; the
/// client secret, the bearer token and user data never reach the other host.
#[tokio::test]
async fn redirects_are_errors_that_name_the_target() {
    let elsewhere = Stub::start(|_, _| Answer::json(200, json!({}))).await;
    let to = elsewhere.url("/collect?upn=ada@contoso.example");

    // The token endpoint redirects: the form with the client secret is not re-sent.
    let t = to.clone();
    let login = Stub::start(move |_, _| Answer::redirect(&t)).await;
    let graph = graph_client(&login.url("/"), &login.url("/"));
    let err = graph.token().await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("redirected to http://{}/collect", elsewhere.addr)),
        "{err}"
    );
    assert!(!err.contains("upn="), "the query is not repeated: {err}");
    assert_eq!(login.hits(), 1, "a redirect is not retried");
    assert!(login.seen.lock().unwrap()[0].contains("client_secret="));

    // Graph redirects an API call: the bearer token is not re-sent.
    let t = to.clone();
    let api = Stub::start(move |n, line| {
        if line.contains("/oauth2/v2.0/token") {
            token_ok(3599)
        } else {
            let _ = n;
            Answer::redirect(&t)
        }
    })
    .await;
    let graph = graph_client(&api.url("/"), &api.url("/"));
    let err = graph
        .group("0bc7d487-fd6f-41a0-8362-71ec81074f11")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("redirected to"), "{err}");

    // The LMS redirects: neither the SCIM token nor the filter with the UPN go elsewhere.
    let t = to.clone();
    let lms = Stub::start(move |_, _| Answer::redirect(&t)).await;
    let scim = ScimTarget::new(
        &Url::parse(&lms.url("/scim/v2")).unwrap(),
        SecretString::from("scim-token"),
        "urn:ietf:params:scim:schemas:extension:acme:2.0:User",
        2,
        Duration::from_secs(5),
    )
    .unwrap();
    let err = scim
        .find_by_user_name("ada@contoso.example")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("redirected to"), "{err}");
    assert_eq!(lms.hits(), 1, "a redirect is not retried");

    // The signing-key endpoint redirects.
    let t = to.clone();
    let keys = Stub::start(move |_, _| Answer::redirect(&t)).await;
    let cache = rostersync::webhook::tokens::JwksCache::new(
        GraphClient::default_http().unwrap(),
        Url::parse(&keys.url("/common/discovery/v2.0/keys")).unwrap(),
    );
    let expect = rostersync::webhook::tokens::TokenExpectation {
        client_ids: vec![CLIENT_ID.into()],
        tenant_id: TENANT.into(),
        cloud: rostersync::webhook::tokens::Cloud::Global,
    };
    let token = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.e30.c2ln".to_string();
    let err = cache
        .verify(&[token], &expect)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("redirected to"), "{err}");

    assert_eq!(elsewhere.hits(), 0, "nothing reached the redirect target");
}

// ---- the token endpoint -----------------------------------------------------------------

/// A token endpoint that answers 429 with `Retry-After: 900` fails the call at once: no caller
/// sleeps a quarter of an hour per attempt (seven attempts used to stall every Graph call of
/// the integration for about 1¾ h).
#[tokio::test]
async fn a_long_retry_after_fails_at_once() {
    let login = Stub::start(|_, _| Answer {
        headers: vec![("Retry-After".into(), "900".into())],
        ..Answer::json(429, json!({"error": "throttled"}))
    })
    .await;
    let graph = Arc::new(graph_client(&login.url("/"), &login.url("/")));
    let started = Instant::now();
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let g = Arc::clone(&graph);
            tokio::spawn(async move { g.token().await.map(|_| ()) })
        })
        .collect();
    for c in calls {
        let r = tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .expect("a caller stalled behind the token refresh")
            .unwrap();
        assert!(r.is_err());
    }
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        login.hits(),
        1,
        "one request; the others waited for its outcome"
    );
    // Within the Retry-After, no new request is made.
    assert!(graph.token().await.is_err());
    assert_eq!(login.hits(), 1);
}

/// While one caller refreshes a token that is due for refresh but still valid, the others
/// keep using it instead of queueing behind a slow token endpoint.
#[tokio::test]
async fn callers_use_the_valid_token_while_it_is_refreshed() {
    let login = Stub::start(|n, _| {
        if n == 0 {
            // Valid 4 s, refreshed after 2 s.
            token_ok(4)
        } else {
            Answer {
                delay: Duration::from_secs(8),
                ..token_ok(3599)
            }
        }
    })
    .await;
    let graph = Arc::new(graph_client(&login.url("/"), &login.url("/")));
    graph.token().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2200)).await;
    // One caller starts the refresh (and waits for it)...
    let refresher = {
        let g = Arc::clone(&graph);
        tokio::spawn(async move { g.token().await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...the others are answered from the cache at once.
    let started = Instant::now();
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(1), graph.token())
            .await
            .expect("stalled behind the refresh")
            .unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(login.hits(), 2);
    refresher.await.unwrap().unwrap();
}

/// A transient failure (503) is retried with backoff within the call.
#[tokio::test]
async fn a_transient_token_failure_is_retried() {
    let login = Stub::start(|n, _| {
        if n < 2 {
            Answer::json(503, json!({}))
        } else {
            token_ok(3599)
        }
    })
    .await;
    let graph = graph_client(&login.url("/"), &login.url("/"));
    graph.token().await.unwrap();
    assert_eq!(login.hits(), 3);
}

/// `tenant_id` as a domain name is resolved to the tenant's GUID from its OpenID metadata.
#[tokio::test]
async fn a_domain_tenant_id_is_resolved_to_its_guid() {
    let meta = Stub::start(|_, line| {
        if line.contains("/contoso.onmicrosoft.com/v2.0/.well-known/openid-configuration") {
            Answer::json(
                200,
                json!({
                    "issuer": format!("https://login.microsoftonline.com/{}/v2.0", TENANT.to_uppercase()),
                    "token_endpoint": format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"),
                }),
            )
        } else {
            Answer::json(400, json!({"error": "invalid_tenant"}))
        }
    })
    .await;
    let mut settings = GraphSettings {
        tenant_id: "contoso.onmicrosoft.com".into(),
        client_id: CLIENT_ID.into(),
        credential: ClientCredential::Secret(SecretString::from(SECRET)),
        login_url: Url::parse(&meta.url("/")).unwrap(),
        graph_url: Url::parse(&meta.url("/")).unwrap(),
    };
    let g = GraphClient::new(settings.clone(), GraphClient::default_http().unwrap());
    assert_eq!(g.tenant_guid().await.unwrap(), TENANT);
    settings.tenant_id = "fabrikam.example".into();
    let g = GraphClient::new(settings, GraphClient::default_http().unwrap());
    assert!(g.tenant_guid().await.is_err());
}

// ---- the real binary ----------------------------------------------------------------------

async fn run_serve(config: &Path, log: &Path) -> tokio::process::Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    tokio::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
        .arg("--config")
        .arg(config)
        .args(["--log", "info", "serve"])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn rostersync serve")
}

async fn listening(child: &mut tokio::process::Child) -> Option<SocketAddr> {
    use tokio::io::AsyncBufReadExt;
    let stdout = child.stdout.take()?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.strip_prefix("listening on ") {
                return a.trim().parse::<SocketAddr>().ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// `serve` refuses an admin token on a plain-HTTP listener other hosts can reach, and says
/// how to fix it; `allow_cleartext_admin = true` lets it start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_admin_token_on_a_public_listener_is_refused() {
    let env = spawn(EnvOptions {
        users: 3,
        ..Default::default()
    })
    .await;
    let config = env.dir.path().join("rostersync.toml");
    let log = env.dir.path().join("serve.log");
    let base = env.config_toml.replacen(
        "[server]\n",
        "[server]\nlisten = \"0.0.0.0:0\"\nadmin_token = { value = \"admin-token-0123456789abcdef\" }\n",
        1,
    );
    std::fs::write(&config, &base).unwrap();
    let out = crate::common::rostersync(&["serve"], &config).await;
    assert!(!out.status.success());
    let text = crate::common::text(&out);
    assert!(
        text.contains("allow_cleartext_admin") && text.contains("tls_cert"),
        "{text}"
    );
    assert!(
        !text.contains("admin-token-0123"),
        "the token is not printed: {text}"
    );

    let allowed = base.replacen(
        "[server]\n",
        "[server]\nallow_cleartext_admin = true\npublic_url = \"http://127.0.0.1:9\"\n",
        1,
    );
    std::fs::write(&config, allowed).unwrap();
    let mut child = run_serve(&config, &log).await;
    assert!(listening(&mut child).await.is_some(), "serve did not start");
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Forged, malformed, oversized and log-forging posts and hostile handshakes against the
/// binary: all refused, nothing reaches the LMS, the log grows by a bounded number of lines,
/// none of them forged or quoting the bodies, and the open `/readyz` tells check names only.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_posts_leave_a_short_honest_log() {
    let env = spawn(EnvOptions {
        users: 10,
        integration_extra: "schedule = \"0 0 0 1 1 *\"".into(),
        ..Default::default()
    })
    .await;
    let config = env.dir.path().join("rostersync.toml");
    let log = env.dir.path().join("serve.log");
    let text = env.config_toml.replacen(
        "[server]\n",
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_token = { value = \"admin-token-0123456789abcdef\" }\n",
        1,
    );
    std::fs::write(&config, text).unwrap();
    let mut child = run_serve(&config, &log).await;
    let addr = listening(&mut child).await.expect("listening");
    let members = env.member_ids().len();
    let started = Instant::now();
    while !(env.graph.subscriptions().len() >= 2 && env.scim.user_count() >= members * 9 / 10) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never ready: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = || env.scim.request_count("POST") + env.scim.request_count("PATCH");
    let writes_before = writes();
    let lines_before = std::fs::read_to_string(&log).unwrap().lines().count();
    let sub = env.graph.subscriptions()[0].clone();
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{addr}{p}");
    let forge = "\n2030-01-01T00:00:00.000000Z  INFO rostersync: FORGED admin login\r";
    let mut statuses = Vec::new();
    for round in 0..40 {
        // 1,000 notifications with guessed clientStates and log-forging ids.
        let value: Vec<Value> = (0..1000)
            .map(|i| {
                json!({"changeType": "updated", "clientState": format!("guess-{round}-{i}"),
                    "subscriptionId": format!("{}{forge}", sub.id), "resource": "Users/x",
                    "tenantId": env.fx.tenant.tenant_id})
            })
            .collect();
        let r = http
            .post(url("/webhooks/graph/test"))
            .json(&json!({ "value": value }))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        // A body serde would quote, a forging path segment, an oversized body.
        let quoted = json!({"value": format!("ATTACKER{forge}{}", "A".repeat(100_000))});
        let r = http
            .post(url("/webhooks/lifecycle/test"))
            .json(&quoted)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        let r = http
            .post(url(
                "/webhooks/graph/no%0Asuch%0D%0A2030-01-01T00:00:00Z%20INFO%20forged",
            ))
            .json(&json!({"value": [{"clientState": "x"}]}))
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        if round % 10 == 0 {
            let r = http
                .post(url("/webhooks/graph/test"))
                .body(vec![b'['; 2 * 1024 * 1024])
                .send()
                .await
                .unwrap();
            statuses.push(r.status().as_u16());
        }
        // Hostile handshakes, on both paths, known and unknown names.
        for q in [
            "validationToken=%3Cscript%3Ealert(document.cookie)%3C%2Fscript%3E%0A",
            "validationToken=a%0D%0ASet-Cookie%3A%20admin%3D1",
            &format!("validationToken={}", "x".repeat(5000)),
        ] {
            for p in [
                "/webhooks/graph/test",
                "/webhooks/lifecycle/test",
                "/webhooks/graph/nope",
            ] {
                let r = http.post(url(&format!("{p}?{q}"))).send().await.unwrap();
                statuses.push(r.status().as_u16());
                assert_eq!(r.headers()["x-content-type-options"], "nosniff");
                let body = r.text().await.unwrap();
                assert!(
                    !body.contains("script") && !body.contains("Cookie"),
                    "{body}"
                );
            }
        }
    }
    assert!(
        statuses.iter().all(|s| [400, 403, 404, 413].contains(s)),
        "{statuses:?}"
    );
    // /readyz, open: check names and ok only.
    let r = http.get(url("/readyz")).send().await.unwrap();
    let ready: Value = r.json().await.unwrap();
    let keys: Vec<&String> = ready.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["checks", "ready"], "{ready}");
    for c in ready["checks"].as_array().unwrap() {
        let mut k: Vec<&String> = c.as_object().unwrap().keys().collect();
        k.sort();
        assert_eq!(k, ["check", "ok"], "{ready}");
    }
    assert!(
        !ready.to_string().contains("test"),
        "no integration name: {ready}"
    );
    // With the admin token: the details.
    let r = http
        .get(url("/readyz"))
        .bearer_auth("admin-token-0123456789abcdef")
        .send()
        .await
        .unwrap();
    let detailed: Value = r.json().await.unwrap();
    assert!(
        detailed.to_string().contains("\"integration\":\"test\""),
        "{detailed}"
    );
    assert!(
        detailed["webhooks"]["rejected_client_state"]
            .as_u64()
            .unwrap()
            >= 40_000
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(writes(), writes_before, "a rejected post changed the LMS");
    let _ = child.start_kill();
    let _ = child.wait().await;
    let text = std::fs::read_to_string(&log).unwrap();
    let added: Vec<&str> = text.lines().skip(lines_before).collect();
    // Over 40,000 rejected notifications in ~400 requests: a handful of lines (one per
    // integration per 10 s, plus the unknown integrations' line).
    assert!(
        added.len() <= 12,
        "{} lines:\n{}",
        added.len(),
        added.join("\n")
    );
    for l in &added {
        assert!(
            l.starts_with("20") && l.as_bytes().get(4) == Some(&b'-'),
            "a line that does not start with a timestamp: {l:?}"
        );
        assert!(
            !l.contains("FORGED admin login") || l.contains("\\n2030"),
            "{l}"
        );
        assert!(!l.contains("ATTACKER") && !l.contains("guess-"), "{l}");
        assert!(l.len() < 1000, "{} bytes: {l}", l.len());
    }
    assert!(
        !text.lines().any(|l| l.starts_with("2030-01-01")),
        "a forged line"
    );
}
