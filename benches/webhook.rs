//! Webhook throughput and latency: how close rostersync's durable `POST /webhooks/graph/{name}`
//! comes to a bare handler and to the durability floor of the disk.
//!
//! `cargo bench --bench webhook [-- --rounds R] [--secs S] [--warmup W] [--clients C] [--only abrc]`
//! (`--only c` runs one scenario, e.g. under `perf record -g`; `r` is b2).
//!
//! Four actix-web servers, each on 127.0.0.1:0 with 2 workers (as `serve` runs it), are
//! loaded in turn by the same client: `C` (default 32) keep-alive HTTP/1.1 connections, each
//! sending one request at a time, for `W` s of warm-up (not measured, default 0.5) and then
//! `S` s (default 4). The scenarios take turns for `R` rounds (default 3), so a disk made slow
//! by other processes for a while slows all of them; figures are over all rounds, and each
//! round's req/s is printed too. Every request is a realistic Graph change-notification body (one `updated`
//! notification of a user from the `/users` subscription, as docs/graph.md describes and
//! the Graph simulator shapes it) with a different user id. Latency is from writing the request to
//! reading the whole answer; req/s counts answers in the measured window.
//!
//! * a. a bare handler that reads the body and answers 202;
//! * b. the durability floor: a handler that hands the body to one writer thread, which takes
//!   every waiting body, appends them to a file, calls `fdatasync` once and wakes them all
//!   (group commit); 202 after that;
//! * b2. (for comparison, no goal) the same with `sync_file_range` instead of `fdatasync`, which
//!   is what sled 0.34's `flush()` does on Linux;
//! * c. rostersync's real webhook (`webhook::configure`, one `Hook` over an on-disk `Store` in
//!   a temporary directory whose subscription record makes every notification accepted): parse,
//!   check clientState, tenant and subscription, append to the webhook journal with a
//!   group-commit `fdatasync` (b's durability), insert into the sled queue, metrics, 202.
//!
//! After c, the queue length must equal the number of 202s (one notification per body):
//! nothing acknowledged is lost. The load generator is one tokio thread writing prebuilt
//! request bytes and parsing only the status line and Content-Length, because it shares the
//! machine's cores with the server. Everything prints; nothing asserts timing.

mod common;

use common::arg_or as arg;
use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use actix_web::{web, App, HttpResponse, HttpServer};
use chrono::Utc;
use rostersync::config::IntegrationName;
use rostersync::store::state::{SubscriptionRecord, Watch};
use rostersync::store::{IntegrationStore, Store};
use rostersync::webhook::{Hook, WebhookState, WebhookStats};
use secrecy::SecretString;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};

const INTEGRATION: &str = "bench";
const TENANT: &str = "3f1c2a9e-7b44-4d0e-9a51-6c2b8e0f4d11";
const CLIENT_ID: &str = "6e2f0b7c-1d3a-4c5e-8f9a-0b1c2d3e4f50";
const SUBSCRIPTION: &str = "d850b120-19bb-4291-b9c4-845ea04dd38d";
const CLIENT_STATE: &str = "Zq3vJ8kP2mN6tR1xW5yB9cF4hL7dG0sA3eU8iO2pK6jH1nM5bV9cX4zT7rQ0wE2y";
/// Distinct notification bodies (user ids) the clients cycle through.
const BODIES: usize = 512;
const MAX_BODY: usize = 1024 * 1024;

fn user_id(i: usize) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", 0x5eed_0000 + i, i)
}

/// One change notification exactly as Graph (and the simulator) posts it for `/users`.
fn notification_body(i: usize) -> Vec<u8> {
    let id = user_id(i);
    let expires = (Utc::now() + chrono::Duration::days(2))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, false);
    serde_json::to_vec(&json!({"value": [{
        "changeType": "updated",
        "clientState": CLIENT_STATE,
        "resource": format!("Users/{id}"),
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.User",
            "@odata.id": format!("Users/{id}"),
            "id": id,
            "organizationId": TENANT,
        },
        "subscriptionExpirationDateTime": expires,
        "subscriptionId": SUBSCRIPTION,
        "tenantId": TENANT,
    }]}))
    .expect("json")
}

fn requests(addr: SocketAddr) -> Arc<Vec<Vec<u8>>> {
    Arc::new(
        (0..BODIES)
            .map(|i| {
                let body = notification_body(i);
                let mut r = format!(
                    "POST /webhooks/graph/{INTEGRATION} HTTP/1.1\r\nHost: {addr}\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .into_bytes();
                r.extend_from_slice(&body);
                r
            })
            .collect(),
    )
}

// ---------------------------------------------------------------------------------------------
// Load generator
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ClientResult {
    /// Latencies (µs) of the answers in the measured window.
    latencies: Vec<u32>,
    /// Status counts over the whole run (warm-up included).
    statuses: HashMap<u16, u64>,
    errors: u64,
}

/// Reads one HTTP/1.1 response; returns its status. `buf` keeps nothing between calls since
/// the client never pipelines.
async fn read_response(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<u16> {
    buf.clear();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(std::io::Error::other)?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())
                .flatten()
        })
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < len {
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
    }
    Ok(status)
}

async fn client(
    addr: SocketAddr,
    reqs: Arc<Vec<Vec<u8>>>,
    first: usize,
    measure_from: Instant,
    end: Instant,
) -> ClientResult {
    let mut out = ClientResult::default();
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(_) => {
            out.errors += 1;
            return out;
        }
    };
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    let mut i = first;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        let req = &reqs[i % reqs.len()];
        i += 1;
        let r = match s.write_all(req).await {
            Ok(()) => read_response(&mut s, &mut buf).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(status) => {
                *out.statuses.entry(status).or_default() += 1;
                if t0 >= measure_from {
                    out.latencies
                        .push(t0.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
            }
            Err(_) => {
                out.errors += 1;
                break;
            }
        }
    }
    out
}

/// One scenario's measurements, summed over the rounds.
#[derive(Default)]
struct Load {
    /// Latencies (µs) of the answers in the measured windows.
    latencies: Vec<u32>,
    measured: Duration,
    /// Status counts, warm-ups included (what the server acknowledged).
    statuses: HashMap<u16, u64>,
    errors: u64,
    /// req/s of each round.
    rounds: Vec<f64>,
}

impl Load {
    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.measured.as_secs_f64()
    }

    /// Percentile in ms (call after `finish`).
    fn pct(&self, p: f64) -> f64 {
        let v = &self.latencies;
        if v.is_empty() {
            return f64::NAN;
        }
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
        v[i] as f64 / 1000.0
    }

    fn finish(&mut self) {
        self.latencies.sort_unstable();
    }

    fn acks(&self) -> u64 {
        self.statuses.get(&202).copied().unwrap_or(0)
    }
}

/// One round against one server: `warmup` unmeasured, then `secs` measured.
async fn load(into: &mut Load, addr: SocketAddr, cfg: &Settings) {
    let reqs = requests(addr);
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.secs;
    let tasks: Vec<_> = (0..cfg.clients)
        .map(|c| {
            tokio::spawn(client(
                addr,
                Arc::clone(&reqs),
                c * BODIES / cfg.clients,
                measure_from,
                end,
            ))
        })
        .collect();
    let mut answered = 0usize;
    for t in tasks {
        let r = t.await.expect("client task");
        answered += r.latencies.len();
        into.latencies.extend(r.latencies);
        for (k, v) in r.statuses {
            *into.statuses.entry(k).or_default() += v;
        }
        into.errors += r.errors;
    }
    into.measured += cfg.secs;
    into.rounds.push(answered as f64 / cfg.secs.as_secs_f64());
}

// ---------------------------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------------------------

fn start<F, A>(factory: F) -> (actix_web::dev::ServerHandle, SocketAddr)
where
    F: Fn() -> App<A> + Send + Clone + 'static,
    A: actix_web::dev::ServiceFactory<
            actix_web::dev::ServiceRequest,
            Config = (),
            Response = actix_web::dev::ServiceResponse<actix_web::body::BoxBody>,
            Error = actix_web::Error,
            InitError = (),
        > + 'static,
{
    let server = HttpServer::new(factory)
        .workers(2)
        .disable_signals()
        .shutdown_timeout(5)
        .bind("127.0.0.1:0")
        .expect("bind");
    let addr = server.addrs()[0];
    let server = server.run();
    let handle = server.handle();
    tokio::spawn(server);
    (handle, addr)
}

/// How the appender of scenario b makes a batch durable.
#[derive(Clone, Copy)]
enum SyncMode {
    /// `fdatasync`: data and the file size reach the device (survives power loss).
    Fdatasync,
    /// `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` over the bytes just written, what
    /// sled 0.34's `flush()` does on Linux: survives a process crash, not a power loss.
    FileRange,
}

/// The group-commit appender of scenario b.
struct Appender {
    tx: std::sync::Mutex<mpsc::Sender<(web::Bytes, oneshot::Sender<std::io::Result<()>>)>>,
    syncs: Arc<AtomicU64>,
}

impl Appender {
    fn start(path: &std::path::Path, mode: SyncMode) -> Appender {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open append file");
        let (tx, rx) = mpsc::channel::<(web::Bytes, oneshot::Sender<std::io::Result<()>>)>();
        let syncs = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&syncs);
        std::thread::Builder::new()
            .name("append-fdatasync".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                let mut offset = 0i64;
                while let Ok(first) = rx.recv() {
                    let mut waiters = vec![first];
                    while let Ok(w) = rx.try_recv() {
                        waiters.push(w);
                    }
                    buf.clear();
                    for (body, _) in &waiters {
                        buf.extend_from_slice(body);
                        buf.push(b'\n');
                    }
                    let r = file.write_all(&buf).and_then(|_| match mode {
                        SyncMode::Fdatasync => file.sync_data(),
                        SyncMode::FileRange => sync_range(&file, offset, buf.len() as i64),
                    });
                    offset += buf.len() as i64;
                    counter.fetch_add(1, Ordering::Relaxed);
                    for (_, w) in waiters {
                        let _ = w.send(match &r {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                        });
                    }
                }
            })
            .expect("writer thread");
        Appender {
            tx: std::sync::Mutex::new(tx),
            syncs,
        }
    }

    async fn append(&self, body: web::Bytes) -> std::io::Result<()> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .lock()
            .unwrap()
            .send((body, tx))
            .map_err(|_| std::io::Error::other("writer stopped"))?;
        rx.await
            .map_err(|_| std::io::Error::other("writer stopped"))?
    }
}

fn sync_range(file: &std::fs::File, offset: i64, len: i64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; no memory is passed.
    let r = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset,
            len,
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER,
        )
    };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

async fn durable_append(body: web::Bytes, app: web::Data<Appender>) -> HttpResponse {
    match app.append(body).await {
        Ok(()) => HttpResponse::Accepted().finish(),
        Err(_) => HttpResponse::ServiceUnavailable().finish(),
    }
}

fn real_store(dir: &std::path::Path) -> (Store, IntegrationStore) {
    let store = Store::open(&dir.join("data")).expect("store");
    let name = IntegrationName::parse(INTEGRATION).expect("name");
    let st = store.integration(&name).expect("integration store");
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
        notification_url: format!("https://rostersync.example.com/webhooks/graph/{INTEGRATION}"),
        client_state_fp: None,
    })
    .expect("subscription record");
    store.flush().expect("flush");
    (store, st)
}

fn row(name: &str, l: &Load) {
    let rounds: Vec<String> = l.rounds.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "| {name:<48} | {:>9.0} | {:>7.2} | {:>7.2} | {:>7.1} | {} |",
        l.rps(),
        l.pct(0.50),
        l.pct(0.99),
        l.latencies.last().map_or(f64::NAN, |m| *m as f64 / 1000.0),
        rounds.join(" / ")
    );
}

fn statuses(l: &Load) -> String {
    let mut v: Vec<_> = l.statuses.iter().collect();
    v.sort();
    let s: Vec<String> = v.iter().map(|(k, n)| format!("{k}: {n}")).collect();
    format!("{} (connection errors {})", s.join(", "), l.errors)
}

struct Settings {
    clients: usize,
    warmup: Duration,
    secs: Duration,
}

/// A running server under test and what it measured.
struct Scenario {
    key: char,
    name: &'static str,
    addr: SocketAddr,
    handle: actix_web::dev::ServerHandle,
    load: Load,
    /// Syncs of the appender (b, b2).
    syncs: Option<Arc<AtomicU64>>,
    /// The store behind c (kept open to count the queue afterwards).
    real: Option<Real>,
    _dir: Option<tempfile::TempDir>,
}

struct Real {
    store: Store,
    st: IntegrationStore,
    stats: Arc<WebhookStats>,
}

fn bare() -> Scenario {
    let (handle, addr) = start(|| {
        App::new().route(
            "/webhooks/graph/{integration}",
            web::post().to(|_body: web::Bytes| async { HttpResponse::Accepted().finish() }),
        )
    });
    Scenario {
        key: 'a',
        name: "a. bare actix handler, 202",
        addr,
        handle,
        load: Load::default(),
        syncs: None,
        real: None,
        _dir: None,
    }
}

fn floor(mode: SyncMode) -> Scenario {
    let dir = tempfile::tempdir().expect("tempdir");
    let appender = web::Data::new(Appender::start(&dir.path().join("notifications.log"), mode));
    let syncs = Arc::clone(&appender.syncs);
    let (handle, addr) = start(move || {
        App::new()
            .app_data(appender.clone())
            .app_data(web::PayloadConfig::new(MAX_BODY))
            .route(
                "/webhooks/graph/{integration}",
                web::post().to(durable_append),
            )
    });
    let (key, name) = match mode {
        SyncMode::Fdatasync => ('b', "b. append + group-commit fdatasync, 202"),
        SyncMode::FileRange => ('r', "b2. append + group-commit sync_file_range, 202"),
    };
    Scenario {
        key,
        name,
        addr,
        handle,
        load: Load::default(),
        syncs: Some(syncs),
        real: None,
        _dir: Some(dir),
    }
}

fn real() -> Scenario {
    // As serve does: the Prometheus recorder is installed, so the handler's counters cost
    // what they cost in production.
    let _ = rostersync::metrics::handle();
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, st) = real_store(dir.path());
    let stats = Arc::new(WebhookStats::default());
    let mut hooks = HashMap::new();
    hooks.insert(
        INTEGRATION.to_string(),
        Hook::new(
            INTEGRATION,
            TENANT,
            CLIENT_ID,
            SecretString::from(CLIENT_STATE),
            st.clone(),
            Arc::new(Notify::new()),
        ),
    );
    let state = web::Data::new(WebhookState::new(hooks, Arc::clone(&stats)));
    let (handle, addr) = start(move || {
        App::new().configure(|c| rostersync::webhook::configure(c, state.clone(), MAX_BODY))
    });
    Scenario {
        key: 'c',
        name: "c. rostersync webhook (journal fdatasync, sled queue)",
        addr,
        handle,
        load: Load::default(),
        syncs: None,
        real: Some(Real { store, st, stats }),
        _dir: Some(dir),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cfg = Settings {
        secs: Duration::from_secs_f64(arg("--secs", 4.0)),
        warmup: Duration::from_secs_f64(arg("--warmup", 0.5)),
        clients: arg("--clients", 32.0) as usize,
    };
    let rounds = arg("--rounds", 3.0) as usize;
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "abrc".into());
    println!(
        "rostersync webhook bench ({} cores; {} keep-alive clients; {rounds} rounds of {:.1} s warm-up + {:.1} s measured per scenario, scenarios interleaved)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        cfg.clients,
        cfg.warmup.as_secs_f64(),
        cfg.secs.as_secs_f64()
    );
    let mut scenarios = Vec::new();
    if only.contains('a') {
        scenarios.push(bare());
    }
    if only.contains('b') {
        scenarios.push(floor(SyncMode::Fdatasync));
    }
    if only.contains('r') {
        scenarios.push(floor(SyncMode::FileRange));
    }
    if only.contains('c') {
        scenarios.push(real());
    }
    // Interleaved, so that every scenario sees the same mix of the disk's and the other
    // processes' moods.
    for _ in 0..rounds {
        for s in &mut scenarios {
            load(&mut s.load, s.addr, &cfg).await;
        }
    }
    for s in &mut scenarios {
        s.handle.stop(true).await;
        s.load.finish();
    }

    println!();
    println!(
        "| {:<48} | {:>9} | {:>7} | {:>7} | {:>7} | req/s per round |",
        "scenario", "req/s", "p50 ms", "p99 ms", "max ms"
    );
    println!(
        "| {:-<48} | {:->9} | {:->7} | {:->7} | {:->7} | --------------- |",
        "", "", "", "", ""
    );
    for s in &scenarios {
        row(s.name, &s.load);
    }
    println!();
    for s in &scenarios {
        let mut line = format!("{} answers: {}", s.key, statuses(&s.load));
        if let Some(n) = &s.syncs {
            let n = n.load(Ordering::Relaxed);
            line.push_str(&format!(
                "; {n} syncs, {:.1} requests per sync",
                s.load.acks() as f64 / n.max(1) as f64
            ));
        }
        println!("{line}");
    }
    let get = |k: char| scenarios.iter().find(|s| s.key == k);
    let Some(c) = get('c') else {
        return;
    };
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let cr = c.load.rps();
    println!();
    if let Some(b) = get('b') {
        let br = b.load.rps();
        println!(
            "c/b = {:.2} (goal >= 0.75: {})",
            cr / br,
            verdict(cr >= 0.75 * br)
        );
    }
    if let Some(b2) = get('r') {
        println!(
            "c/b2 = {:.2} (b2 has sled's durability; no goal)",
            cr / b2.load.rps()
        );
    }
    if let Some(a) = get('a') {
        let ar = a.load.rps();
        println!(
            "c/a = {:.2} (goal >= 0.25: {})",
            cr / ar,
            verdict(cr >= 0.25 * ar)
        );
    }
    let p99 = c.load.pct(0.99);
    println!(
        "p99 of c = {p99:.2} ms (goal < 20 ms: {})",
        verdict(p99 < 20.0)
    );
    if let Some(r) = &c.real {
        let queued = r.st.queue_len() as u64;
        r.store.flush().expect("flush");
        let s = r.stats.view();
        let acks = c.load.acks();
        println!(
            "queue length after c: {queued}; 202s of c: {acks}; accepted notifications: {}; rejected: {}; store failures: {} -> {}",
            s.accepted,
            s.rejected_client_state + s.rejected_subscription + s.malformed,
            s.store_failures,
            if queued == acks && s.accepted == acks {
                "nothing acknowledged is lost"
            } else {
                "MISMATCH"
            }
        );
    }
}
