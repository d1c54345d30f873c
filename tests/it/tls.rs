//! Built-in TLS (`[server] tls_cert` / `tls_key`): the config checks at load and `serve`
//! answering over HTTPS only. The certificates in tests/fixtures/tls are test-only (see make.sh
//! there): a CA and leaves for localhost and 127.0.0.1.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rostersync::config::Config;
use rostersync::serve::{serve, ServeOptions};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls")
}

/// A config whose Graph and LMS are `peer`: serve keeps retrying its start-up, which is all
/// these tests need (`/healthz` answers regardless).
fn config_text(data_dir: &Path, server_extra: &str, peer: SocketAddr) -> String {
    format!(
        r#"
[server]
data_dir = "{}"
listen = "127.0.0.1:0"
{server_extra}

[[integration]]
name = "contoso"
tenant_id = "contoso.onmicrosoft.com"
client_id = "11111111-2222-3333-4444-555555555555"
client_secret = {{ value = "test-secret" }}
groups = ["0bc7d487-fd6f-41a0-8362-71ec81074f11"]
login_url = "http://{peer}"
graph_url = "http://{peer}"

[integration.target]
kind = "scim"
url = "http://{peer}/scim/v2"
token = {{ value = "test-token" }}
"#,
        data_dir.display(),
    )
}

fn tls_keys(cert: &str, key: &str) -> String {
    format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"")
}

fn load(server_extra: &str) -> Result<Config, String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let peer = "127.0.0.1:9".parse().expect("address");
    Config::from_toml(&config_text(dir.path(), server_extra, peer), &fixtures())
        .map_err(|e| e.to_string())
}

/// Answers every request with 400 at once: start-up fails fast instead of retrying a refused
/// connection (which would hold up the graceful stop), and nothing real is reached.
fn spawn_refusing_peer() -> SocketAddr {
    let server = actix_web::HttpServer::new(|| {
        actix_web::App::new().default_service(actix_web::web::to(|| async {
            actix_web::HttpResponse::BadRequest().finish()
        }))
    })
    .workers(1)
    .disable_signals()
    .bind("127.0.0.1:0")
    .expect("bind the peer");
    let addr = server.addrs()[0];
    tokio::spawn(server.run());
    addr
}

fn ca() -> reqwest::Certificate {
    let pem = std::fs::read(fixtures().join("ca.pem")).expect("ca.pem");
    reqwest::Certificate::from_pem(&pem).expect("CA certificate")
}

#[test]
fn tls_cert_without_tls_key_is_rejected_naming_the_key() {
    let e = load("tls_cert = \"rsa-fullchain.pem\"").unwrap_err();
    assert!(e.starts_with("server.tls_key:"), "{e}");
    let e = load("tls_key = \"rsa-key-pkcs8.pem\"").unwrap_err();
    assert!(e.starts_with("server.tls_cert:"), "{e}");
}

#[test]
fn pkcs8_rsa_and_ec_keys_load_and_relative_paths_follow_the_config_file() {
    for (cert, key) in [
        ("rsa-fullchain.pem", "rsa-key-pkcs8.pem"),
        ("rsa-fullchain.pem", "rsa-key-pkcs1.pem"),
        ("ec-fullchain.pem", "ec-key-sec1.pem"),
    ] {
        let c = load(&tls_keys(cert, key)).unwrap_or_else(|e| panic!("{key}: {e}"));
        let tls = c.server.tls.as_ref().expect("tls settings");
        assert_eq!(tls.key, fixtures().join(key));
        // The key's path may be printed, never its content.
        let dbg = format!("{c:?}");
        assert!(dbg.contains(key) && !dbg.contains("PRIVATE"), "{dbg}");
    }
}

#[test]
fn bad_tls_files_are_rejected_naming_the_key_without_echoing_them() {
    let e = load(&tls_keys("rsa-fullchain.pem", "ec-key-sec1.pem")).unwrap_err();
    assert!(e.starts_with("server.tls_key:"), "{e}");
    // A certificate given as the key: no key in it, and nothing of the file is quoted.
    let e = load(&tls_keys("rsa-fullchain.pem", "rsa-fullchain.pem")).unwrap_err();
    assert!(
        e.starts_with("server.tls_key:") && e.contains("no PEM private key"),
        "{e}"
    );
    assert!(!e.contains("MII"), "{e}");
    let e = load(&tls_keys("rsa-key-pkcs8.pem", "rsa-key-pkcs8.pem")).unwrap_err();
    assert!(e.starts_with("server.tls_cert:"), "{e}");
    assert!(!e.contains("MII"), "{e}");
    let e = load(&tls_keys("missing.pem", "rsa-key-pkcs8.pem")).unwrap_err();
    assert!(
        e.starts_with("server.tls_cert:") && e.contains("missing.pem"),
        "{e}"
    );
}

#[test]
fn loopback_public_url_defaults_to_https_with_built_in_tls() {
    let bound: SocketAddr = "127.0.0.1:8443".parse().expect("address");
    let c = load(&tls_keys("ec-fullchain.pem", "ec-key-sec1.pem")).expect("config");
    assert_eq!(
        c.server.public_url_for(bound).map(String::from).as_deref(),
        Some("https://127.0.0.1:8443/")
    );
    let c = load("").expect("config");
    assert_eq!(
        c.server.public_url_for(bound).map(String::from).as_deref(),
        Some("http://127.0.0.1:8443/")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_answers_over_https_only() {
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let text = config_text(
        dir.path(),
        &tls_keys("rsa-fullchain.pem", "rsa-key-pkcs8.pem"),
        spawn_refusing_peer(),
    );
    let config = Config::from_toml(&text, &fixtures()).expect("config");
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(
            config,
            ServeOptions::default(),
            move |a| {
                let _ = addr_tx.send(a);
            },
            async {
                let _ = stop_rx.await;
            },
        )
        .await
    });
    let addr = tokio::time::timeout(Duration::from_secs(10), addr_rx)
        .await
        .expect("listening in time")
        .expect("address");
    eprintln!("listening {:?}", t0.elapsed());
    let trusting = reqwest::Client::builder()
        .tls_certs_only([ca()])
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    for host in ["127.0.0.1", "localhost"] {
        let url = format!("https://{host}:{}/healthz", addr.port());
        let resp = trusting.get(&url).send().await.expect("https /healthz");
        assert_eq!(resp.status(), 200, "{url}");
        assert!(resp.text().await.expect("body").contains("alive"));
    }

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let r = plain.get(format!("http://{addr}/healthz")).send().await;
    eprintln!("{:?} {r:?}", std::time::Instant::now());
    assert!(r.is_err(), "plain http answered: {r:?}");
    // A client that does not trust the test CA refuses the certificate.
    let r = plain
        .get(format!("https://localhost:{}/healthz", addr.port()))
        .send()
        .await;
    eprintln!("{:?} {r:?}", std::time::Instant::now());
    assert!(r.is_err(), "untrusted certificate accepted: {r:?}");

    drop(trusting);
    drop(plain);
    eprintln!("{:?} stop", std::time::Instant::now());
    let _ = stop_tx.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stopped in time")
        .expect("serve task");
    eprintln!("stopped {:?}", t0.elapsed());
    stopped.expect("serve ended cleanly");
}

/// With built-in TLS, an operator command reaches the `serve` that holds the store over HTTPS
/// (the configured chain trusted, the certificate checked for 127.0.0.1), with the admin token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_reach_serve_over_built_in_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = "admin_token = { value = \"tls-admin-token-0d9c8b7a\" }";
    let keys = tls_keys(
        &fixtures().join("rsa-fullchain.pem").display().to_string(),
        &fixtures().join("rsa-key-pkcs8.pem").display().to_string(),
    );
    let peer = spawn_refusing_peer();
    let text = config_text(dir.path(), &format!("{keys}\n{token}"), peer);
    let config = Config::from_toml(&text, &fixtures()).expect("config");
    let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve(
            config,
            ServeOptions::default(),
            move |a| {
                let _ = addr_tx.send(a);
            },
            async {
                let _ = stop_rx.await;
            },
        )
        .await
    });
    let addr = tokio::time::timeout(Duration::from_secs(10), addr_rx)
        .await
        .expect("listening in time")
        .expect("address");
    // The operator's config names the port serve listens on.
    let cli_config = dir.path().join("rostersync.toml");
    std::fs::write(
        &cli_config,
        text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{addr}\"")),
    )
    .expect("write config");
    let run = |args: &'static [&'static str]| {
        let cli_config = cli_config.clone();
        async move {
            tokio::process::Command::new(env!("CARGO_BIN_EXE_rostersync"))
                .arg("--config")
                .arg(&cli_config)
                .args(args)
                .env_remove("RUST_LOG")
                .output()
                .await
                .expect("run rostersync")
        }
    };
    let o = run(&["queue", "stats"]).await;
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "contoso  queued 0  waiting retry 0  dead 0  oldest -\n",
        "{out}"
    );
    // Start-up cannot finish (Graph refuses everything): sync-user is refused, not run.
    let o = run(&["sync-user", "someone@contoso.onmicrosoft.com"]).await;
    let out = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("has not finished starting"), "{out}");
    assert!(!out.contains("tls-admin-token-0d9c8b7a"), "{out}");

    let _ = stop_tx.send(());
    let stopped = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stopped in time")
        .expect("serve task");
    stopped.expect("serve ended cleanly");
}
