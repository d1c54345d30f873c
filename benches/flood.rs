//! A flood of forged webhook posts: what it costs the genuine notifications, the log and the
//! store.
//!
//! `cargo bench --bench flood [-- --rounds R] [--secs S] [--forgers F] [--rate N]`
//!
//! rostersync's real webhook (`webhook::configure`, one `Hook` over an on-disk `Store`, the
//! text log format at INFO into a counting sink) runs on 127.0.0.1:0 with 2 workers, as `serve`
//! runs it. One "Graph" connection posts a genuine change notification every 1/N s (default
//! N = 50) for S s (default 3) and measures each answer's latency:
//!
//! * A. alone (the baseline);
//! * B. while F (default 16) keep-alive connections post forged requests as fast as they are
//!   answered: in turn a 1,000-notification batch with guessed clientStates and log-forging
//!   subscription ids (~190 KB), a malformed body, a hostile handshake, and a post to a name
//!   that does not exist.
//!
//! A and B alternate for R rounds (default 3). Printed: the genuine latency's median and p99 in
//! A and B and their B/A ratios, forged requests per second, log lines and bytes per 1,000
//! forged requests, and the growth of the data directory and of the queue (which must equal the
//! genuine 202s). Nothing asserts timing.

mod common;

use common::arg_or as arg;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpServer};
use chrono::Utc;
use rostersync::config::IntegrationName;
use rostersync::store::state::{SubscriptionRecord, Watch};
use rostersync::store::Store;
use rostersync::webhook::{Hook, WebhookState, WebhookStats};
use secrecy::SecretString;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const NAME: &str = "bench";
const TENANT: &str = "3f1c2a9e-7b44-4d0e-9a51-6c2b8e0f4d11";
const CLIENT_ID: &str = "6e2f0b7c-1d3a-4c5e-8f9a-0b1c2d3e4f50";
const SUBSCRIPTION: &str = "d850b120-19bb-4291-b9c4-845ea04dd38d";
const CLIENT_STATE: &str = "Zq3vJ8kP2mN6tR1xW5yB9cF4hL7dG0sA3eU8iO2pK6jH1nM5bV9cX4zT7rQ0wE2y";

/// Counts what the log receives.
#[derive(Clone, Default)]
struct LogSink {
    lines: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Write for LogSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.bytes.fetch_add(b.len() as u64, Ordering::Relaxed);
        self.lines.fetch_add(
            b.iter().filter(|c| **c == b'\n').count() as u64,
            Ordering::Relaxed,
        );
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn request(path: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Sends one request on a keep-alive connection and reads the answer; its status.
async fn exchange(conn: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> Option<u16> {
    conn.write_all(req).await.ok()?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let n = conn.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some(status);
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn genuine(i: u64) -> Vec<u8> {
    let user = format!("{:08x}-0000-4000-8000-{:012x}", 0x5eed_0000u64 + i, i);
    let body = serde_json::to_vec(&json!({"value": [{
        "changeType": "updated", "clientState": CLIENT_STATE,
        "resource": format!("Users/{user}"),
        "resourceData": {"@odata.type": "#Microsoft.Graph.User", "@odata.id": format!("Users/{user}"), "id": user},
        "subscriptionExpirationDateTime": (Utc::now() + chrono::Duration::days(2)).to_rfc3339(),
        "subscriptionId": SUBSCRIPTION, "tenantId": TENANT,
    }]}))
    .unwrap();
    request(&format!("/webhooks/graph/{NAME}"), &body)
}

fn forged_requests() -> Vec<Vec<u8>> {
    let forge = "\n2030-01-01T00:00:00Z  INFO rostersync: forged\r";
    let batch: Vec<_> = (0..1000)
        .map(|i| {
            json!({"changeType": "updated", "clientState": format!("guess-{i:08}"),
                "subscriptionId": format!("{SUBSCRIPTION}{forge}"), "resource": "Users/x",
                "tenantId": TENANT})
        })
        .collect();
    let batch = serde_json::to_vec(&json!({ "value": batch })).unwrap();
    let malformed = format!(
        "{{\"value\": \"{}{}\"}}",
        forge.escape_default(),
        "A".repeat(20_000)
    );
    vec![
        request(&format!("/webhooks/graph/{NAME}"), &batch),
        request(&format!("/webhooks/lifecycle/{NAME}"), malformed.as_bytes()),
        request(
            &format!("/webhooks/graph/{NAME}?validationToken=%3Cscript%3E%0D%0Ax"),
            b"",
        ),
        request(
            "/webhooks/graph/nope%0A2030?validationToken=hello",
            br#"{"value":[{"clientState":"x"}]}"#,
        ),
    ]
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i] as f64 / 1000.0
}

struct Phase {
    latencies_us: Vec<u64>,
    accepted: u64,
    forged: u64,
    forged_statuses: HashMap<u16, u64>,
    log_lines: u64,
    log_bytes: u64,
    dir_growth: i64,
}

async fn phase(
    addr: SocketAddr,
    secs: f64,
    rate: f64,
    forgers: usize,
    sink: &LogSink,
    data: &std::path::Path,
    next_user: &mut u64,
) -> Phase {
    let lines0 = sink.lines.load(Ordering::Relaxed);
    let bytes0 = sink.bytes.load(Ordering::Relaxed);
    let dir0 = dir_size(data) as i64;
    let stop = Arc::new(AtomicBool::new(false));
    let forged = Arc::new(AtomicU64::new(0));
    let statuses = Arc::new(std::sync::Mutex::new(HashMap::<u16, u64>::new()));
    let reqs = Arc::new(forged_requests());
    let mut tasks = Vec::new();
    for f in 0..forgers {
        let (stop, forged, statuses, reqs) =
            (stop.clone(), forged.clone(), statuses.clone(), reqs.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut i = f;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut conn) = TcpStream::connect(addr).await else {
                    continue;
                };
                while !stop.load(Ordering::Relaxed) {
                    let Some(s) = exchange(&mut conn, &reqs[i % reqs.len()], &mut buf).await else {
                        break;
                    };
                    i += 1;
                    forged.fetch_add(1, Ordering::Relaxed);
                    *statuses.lock().unwrap().entry(s).or_default() += 1;
                }
            }
        }));
    }
    let mut conn = TcpStream::connect(addr).await.expect("connect");
    let mut buf = Vec::new();
    let mut latencies = Vec::new();
    let mut accepted = 0;
    let every = Duration::from_secs_f64(1.0 / rate);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut next = Instant::now();
    while Instant::now() < end {
        tokio::time::sleep_until(next.into()).await;
        next += every;
        let req = genuine(*next_user);
        *next_user += 1;
        let t = Instant::now();
        match exchange(&mut conn, &req, &mut buf).await {
            Some(202) => {
                accepted += 1;
                latencies.push(t.elapsed().as_micros() as u64);
            }
            Some(s) => panic!("a genuine notification was answered {s}"),
            None => conn = TcpStream::connect(addr).await.expect("reconnect"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let forged_statuses = statuses.lock().unwrap().clone();
    Phase {
        latencies_us: latencies,
        accepted,
        forged: forged.load(Ordering::Relaxed),
        forged_statuses,
        log_lines: sink.lines.load(Ordering::Relaxed) - lines0,
        log_bytes: sink.bytes.load(Ordering::Relaxed) - bytes0,
        dir_growth: dir_size(data) as i64 - dir0,
    }
}

fn main() {
    let rounds = arg("--rounds", 3.0) as usize;
    let secs = arg("--secs", 3.0);
    let forgers = arg("--forgers", 16.0) as usize;
    let rate = arg("--rate", 50.0);
    let sink = LogSink::default();
    let writer = sink.clone();
    tracing_subscriber::fmt()
        .fmt_fields(rostersync::logging::TextFields)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let _ = rostersync::metrics::handle();
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store = Store::open(&data).unwrap();
        let st = store
            .integration(&IntegrationName::parse(NAME).unwrap())
            .unwrap();
        let now = Utc::now();
        st.put_subscription(&SubscriptionRecord {
            id: SUBSCRIPTION.into(),
            watch: Watch::Users,
            resource: "/users".into(),
            change_type: "updated,deleted".into(),
            expires_at: now + chrono::Duration::days(2),
            created_at: now,
            renewed_at: None,
            last_error: None,
            notification_url: String::new(),
            client_state_fp: None,
        })
        .unwrap();
        store.flush().unwrap();
        let mut hooks = HashMap::new();
        hooks.insert(
            NAME.to_string(),
            Hook::new(
                NAME,
                TENANT,
                CLIENT_ID,
                SecretString::from(CLIENT_STATE),
                st.clone(),
                Arc::new(Notify::new()),
            ),
        );
        let state = web::Data::new(WebhookState::new(hooks, Arc::new(WebhookStats::default())));
        let server = HttpServer::new(move || {
            App::new().configure(|c| rostersync::webhook::configure(c, state.clone(), 1 << 20))
        })
        .workers(2)
        .disable_signals()
        .bind("127.0.0.1:0")
        .unwrap();
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);

        println!(
            "flood: {rounds} rounds of A (genuine only) and B (genuine + {forgers} forgers), {secs} s each, genuine at {rate}/s"
        );
        let mut user = 0u64;
        let (mut a_lat, mut b_lat) = (Vec::new(), Vec::new());
        let (mut forged, mut lines, mut bytes, mut growth_b, mut growth_a) = (0u64, 0u64, 0u64, 0i64, 0i64);
        let mut accepted = 0;
        let mut statuses: HashMap<u16, u64> = HashMap::new();
        let flood_secs = secs * rounds as f64;
        for r in 0..rounds {
            let a = phase(addr, secs, rate, 0, &sink, &data, &mut user).await;
            let b = phase(addr, secs, rate, forgers, &sink, &data, &mut user).await;
            println!(
                "round {}: A median {:.2} ms p99 {:.2} ms | B median {:.2} ms p99 {:.2} ms, {} forged ({:.0}/s), {} log lines",
                r + 1,
                pct(&mut a.latencies_us.clone(), 0.5),
                pct(&mut a.latencies_us.clone(), 0.99),
                pct(&mut b.latencies_us.clone(), 0.5),
                pct(&mut b.latencies_us.clone(), 0.99),
                b.forged,
                b.forged as f64 / secs,
                b.log_lines
            );
            accepted += a.accepted + b.accepted;
            a_lat.extend(a.latencies_us);
            b_lat.extend(b.latencies_us);
            forged += b.forged;
            lines += b.log_lines;
            bytes += b.log_bytes;
            growth_a += a.dir_growth;
            growth_b += b.dir_growth;
            for (s, n) in b.forged_statuses {
                *statuses.entry(s).or_default() += n;
            }
        }
        let (a50, a99) = (pct(&mut a_lat, 0.5), pct(&mut a_lat, 0.99));
        let (b50, b99) = (pct(&mut b_lat, 0.5), pct(&mut b_lat, 0.99));
        println!();
        println!("| genuine latency | A (alone) | B (flood) | B/A |");
        println!("| --- | ---: | ---: | ---: |");
        println!("| median (ms) | {a50:.2} | {b50:.2} | {:.2} |", b50 / a50);
        println!("| p99 (ms) | {a99:.2} | {b99:.2} | {:.2} |", b99 / a99);
        println!();
        let mut s: Vec<_> = statuses.into_iter().collect();
        s.sort();
        println!(
            "forged: {forged} requests ({:.0}/s), answers {s:?}; log: {lines} lines, {bytes} bytes ({:.2} lines and {:.0} bytes per 1,000 forged requests)",
            forged as f64 / flood_secs,
            lines as f64 * 1000.0 / forged.max(1) as f64,
            bytes as f64 * 1000.0 / forged.max(1) as f64,
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let queued = st.queue_len() as u64;
        println!(
            "store: data directory grew {growth_a} bytes in A phases and {growth_b} bytes in B phases; queue {queued} = genuine 202s {accepted}: {}",
            if queued == accepted { "ok" } else { "MISMATCH" }
        );
        handle.stop(true).await;
    });
}
