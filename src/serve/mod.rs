//! `serve`: the long-running process. Starts the HTTP server (webhooks, health), then per
//! integration: learns the group tree, ensures subscriptions, drains the queue with the
//! incremental worker, renews subscriptions and runs the scheduled full reconcile. Stops
//! gracefully: no new requests, in-flight requests and the current batch finish, store flushed.

mod ops;
pub mod subs;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpServer};
use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{watch, Mutex, Notify};
use url::Url;

use crate::app::Integration;
use crate::config::Config;
use crate::http::admin::{Admin, AdminIntegration};
use crate::http::{Health, IntegrationHealth};
use crate::retry::RetryPolicy;
use crate::store::queue::{Hint, QueueItem};
use crate::store::{Store, StoreError};
use crate::sync::apply;
use crate::sync::reconcile::{RunOptions, RunOutcome};
use crate::sync::worker::{self, Targeting, WorkerSettings};
use crate::webhook::handshake::STARTUP_WINDOW;
use crate::webhook::tokens::{Cloud, JwksCache};
use crate::webhook::{Hook, TenantGuid, WebhookState, WebhookStats};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Build(#[from] crate::app::BuildError),
    #[error("cannot listen on {addr}: {message}")]
    Bind { addr: SocketAddr, message: String },
    #[error("server.public_url is required by serve when listening on {0} (Graph must reach it over https)")]
    NoPublicUrl(SocketAddr),
    #[error(transparent)]
    Alert(#[from] crate::alert::AlertError),
    #[error("refusing to start: server.admin_token is set and {0} is plain HTTP on an address other hosts can reach, so the token (and /status) would cross the network in clear text. Give serve a certificate (server.tls_cert, server.tls_key), listen on a loopback address behind a TLS-terminating proxy, or, if TLS is terminated in front of serve on a network you trust, set server.allow_cleartext_admin = true")]
    CleartextAdmin(SocketAddr),
}

/// Knobs tests turn; defaults suit production.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub worker: WorkerSettings,
    /// How often Graph and the LMS are probed for `/readyz`.
    pub health_interval: Duration,
    /// How often subscriptions are checked for renewal.
    pub renew_interval: Duration,
    /// Queue poll interval when nothing wakes the worker (backoff retries).
    pub poll_interval: Duration,
    /// An already open store to use instead of opening `data_dir` (embedding, tests that
    /// inspect or break the store while serving).
    pub store: Option<Store>,
    /// How long the stop waits for in-flight batches and reconciles once the HTTP server has
    /// stopped; then they are cut off (their queue items stay queued).
    pub shutdown_grace: Duration,
    /// How long after start-up Graph's validation handshake is answered without a
    /// subscription call of ours in flight.
    pub handshake_startup_window: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            worker: WorkerSettings::default(),
            health_interval: Duration::from_secs(30),
            renew_interval: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            store: None,
            shutdown_grace: Duration::from_secs(30),
            handshake_startup_window: STARTUP_WINDOW,
        }
    }
}

struct Live {
    integ: Integration,
    client_state: String,
    wake: Arc<Notify>,
    /// Held by whatever creates, renews or deletes subscriptions (start-up, renewals, a
    /// changed group tree, lifecycle events, an operator's `subscriptions renew|delete`), so
    /// two never race on the same records. Taken after the gate's exclusive lock, never before it.
    subs_lock: Mutex<()>,
    /// One `queue replay` at a time: two would queue the same dead letters twice.
    replay_lock: Mutex<()>,
    /// Start-up (intents settled, group tree, subscriptions) is done.
    started: std::sync::atomic::AtomicBool,
    /// Every secret of this integration, for errors that leave through the admin API.
    redactor: crate::redact::Redactor,
    /// A full reconcile is due (`reconcile_loop` runs it beside the incremental worker; the
    /// two keep apart through the integration's `sync::gate`).
    due: std::sync::Mutex<Due>,
    reconcile_wake: Notify,
    health: Arc<IntegrationHealth>,
    /// The tenant GUID the webhook checks (resolved at start-up when `tenant_id` is a domain).
    tenant: TenantGuid,
    /// Shared by every integration: at most `server.reconcile_concurrency` full reconciles
    /// at once.
    reconciles: Arc<tokio::sync::Semaphore>,
}

/// A full reconcile asked for and not run yet.
#[derive(Default)]
struct Due {
    /// Why (the latest reason); `None`: nothing is due.
    reason: Option<String>,
    /// Queue items (`Hint::Reconcile`, lifecycle events) that asked for it: they leave the
    /// queue once the run is over, so a crash meanwhile runs it again at the next start.
    items: Vec<u64>,
    /// Items handed to a run not finished yet (the worker skips them in the queue).
    handed: std::collections::BTreeSet<u64>,
}

impl Live {
    /// Asks `reconcile_loop` for a full reconcile (several asks before it starts make one).
    fn reconcile_soon(&self, reason: String, items: Vec<u64>) {
        {
            let mut d = self.due.lock().unwrap_or_else(|e| e.into_inner());
            d.reason = Some(reason);
            d.handed.extend(items.iter().copied());
            d.items.extend(items);
        }
        self.reconcile_wake.notify_one();
    }

    /// Queue items already handed to a reconcile.
    fn handed(&self) -> std::collections::BTreeSet<u64> {
        self.due
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .handed
            .clone()
    }
}

/// Whether `serve` may start with this server config: an admin token must not be asked for
/// over plain HTTP on an address other hosts can reach, unless the operator says TLS is taken
/// care of in front (`allow_cleartext_admin`).
pub(crate) fn check_admin_exposure(server: &crate::config::ServerConfig) -> Result<(), ServeError> {
    let cleartext = server.tls.is_none() && !server.listen.ip().is_loopback();
    if server.admin_token.is_some() && cleartext && !server.allow_cleartext_admin {
        return Err(ServeError::CleartextAdmin(server.listen));
    }
    Ok(())
}

/// The integration's clientState: configured, or generated once and kept in the store.
pub fn client_state(integ: &Integration) -> Result<String, StoreError> {
    match &integ.cfg.client_state {
        Some(s) => Ok(s.expose_secret().to_string()),
        None => integ.store.client_state(),
    }
}

/// Runs until `shutdown` resolves. `on_listening` gets the bound address (tests use port 0).
pub async fn serve(
    config: Config,
    opts: ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    check_admin_exposure(&config.server)?;
    if config.server.admin_token.is_some()
        && config.server.tls.is_none()
        && !config.server.listen.ip().is_loopback()
    {
        tracing::warn!(listen = %config.server.listen, "allow_cleartext_admin: the admin token is accepted over plain HTTP; TLS must be terminated in front of serve");
    }
    let store = match &opts.store {
        Some(s) => s.clone(),
        None => {
            let names: Vec<_> = config.integrations.iter().map(|i| i.name.clone()).collect();
            Store::open_configured(&config.server.data_dir, &names)?
        }
    };
    let alerter = crate::alert::Alerter::new(&config, &store)?;
    let reconciles = Arc::new(tokio::sync::Semaphore::new(
        config.server.reconcile_concurrency.max(1),
    ));
    let mut lives: Vec<Arc<Live>> = Vec::new();
    let mut hooks = HashMap::new();
    for cfg in &config.integrations {
        let integ = Integration::build(cfg, &store)?;
        let client_state = client_state(&integ)?;
        let wake = Arc::new(Notify::new());
        // validationTokens: keys and issuers pinned to the cloud of login_url.
        let cloud = Cloud::from_login_url(&cfg.login_url);
        let jwks = cloud.keys_url().ok().and_then(|u| {
            if !cloud.pinned() {
                tracing::warn!(integration = %cfg.name, keys = %u, "login_url is not a Microsoft cloud's login host: validationTokens are checked against this key set, which is not pinned");
            }
            crate::graph::GraphClient::default_http()
                .ok()
                .map(|h| JwksCache::new(h, u))
        });
        let mut hook = Hook::new(
            cfg.name.as_str(),
            &cfg.tenant_id,
            &cfg.client_id,
            SecretString::from(client_state.clone()),
            integ.store.clone(),
            Arc::clone(&wake),
        );
        hook.tokens = jwks;
        hook.cloud = cloud;
        hook.handshake = integ.handshake.clone();
        hook.handshake.open_for(opts.handshake_startup_window);
        let tenant = hook.tenant.clone();
        hooks.insert(cfg.name.to_string(), hook);
        let redactor = cfg.redactor(Some(&integ.store));
        lives.push(Arc::new(Live {
            health: Arc::new(IntegrationHealth::new(cfg.name.as_str())),
            integ,
            client_state,
            wake,
            subs_lock: Mutex::new(()),
            replay_lock: Mutex::new(()),
            started: std::sync::atomic::AtomicBool::new(false),
            redactor,
            due: Default::default(),
            reconcile_wake: Notify::new(),
            tenant,
            reconciles: Arc::clone(&reconciles),
        }));
    }
    let stats = Arc::new(WebhookStats::default());
    let state = web::Data::new(WebhookState::new(hooks, Arc::clone(&stats)));
    // Before anything records a metric.
    let _ = crate::metrics::handle();
    for l in &lives {
        let runs: Vec<crate::sync::reconcile::RunReport> =
            l.integ.store.runs(50).unwrap_or_default();
        if let Some(r) = runs
            .iter()
            .find(|r| matches!(r.outcome, RunOutcome::Ok | RunOutcome::Partial))
        {
            crate::metrics::last_success_at(l.integ.cfg.name.as_str(), r.finished_at.timestamp());
        }
    }
    let serving = Arc::new(ops::ServeOps::new(lives.clone()));
    let admin = web::Data::new(Admin {
        store: store.clone(),
        integrations: lives
            .iter()
            .map(|l| AdminIntegration {
                name: l.integ.cfg.name.to_string(),
                store: l.integ.store.clone(),
                health: Arc::clone(&l.health),
                schedule: l.integ.cfg.schedule.clone(),
                timezone: l.integ.cfg.timezone.to_string(),
                secret_expires: l.integ.cfg.client_secret_expires,
            })
            .collect(),
        token: config.server.admin_token.clone(),
        metrics_require_token: config.server.metrics_require_token,
        serving: Some(serving.clone() as Arc<dyn crate::ops::Serving>),
    });
    let health = web::Data::new(Health {
        store: store.clone(),
        integrations: lives.iter().map(|l| Arc::clone(&l.health)).collect(),
        webhooks: stats,
        admin_token: config.server.admin_token.clone(),
    });
    let (server, bound) = start_http(
        config.server.listen,
        config.server.max_body_bytes,
        config
            .server
            .tls
            .as_ref()
            .map(|t| (*t.server_config).clone()),
        state,
        health,
        admin,
    )?;
    let public = config
        .server
        .public_url_for(bound)
        .ok_or(ServeError::NoPublicUrl(bound))?;
    serving.set_public(public.clone());
    let handle = server.handle();
    let server_task = tokio::spawn(server);
    tracing::info!(%bound, public_url = %public, "listening");
    on_listening(bound);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    // Secret-expiry checks (now and daily) and alert delivery.
    tasks.push(tokio::spawn(alerter.run(stop_rx.clone())));
    for live in &lives {
        let public = public.clone();
        tasks.push(tokio::spawn(integration_main(
            Arc::clone(live),
            public,
            opts.clone(),
            stop_rx.clone(),
        )));
    }
    shutdown.await;
    tracing::info!("shutting down: no new requests; finishing in-flight work");
    handle.stop(true).await;
    let _ = server_task.await;
    let _ = stop_tx.send(true);
    // A batch stuck in Graph or LMS retries must not hold the stop past a service manager's
    // timeout: unfinished items are still in the queue and run after the restart.
    let deadline = tokio::time::Instant::now() + opts.shutdown_grace;
    for mut t in tasks {
        if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
            tracing::warn!(
                grace_secs = opts.shutdown_grace.as_secs_f64(),
                "work still in flight at the end of the shutdown grace period (a slow Graph or LMS); stopping it, its queue items stay queued"
            );
            t.abort();
            let _ = t.await;
        }
    }
    store.flush()?;
    tracing::info!("stopped");
    Ok(())
}

/// Builds and starts the HTTP server (kept out of `serve` so its future stays `Send`); with
/// `tls` it speaks only HTTPS (built-in TLS, no proxy needed).
fn start_http(
    listen: SocketAddr,
    max_body: usize,
    tls: Option<rustls::ServerConfig>,
    state: web::Data<WebhookState>,
    health: web::Data<Health>,
    admin: web::Data<Admin>,
) -> Result<(actix_web::dev::Server, SocketAddr), ServeError> {
    let server = HttpServer::new(move || {
        App::new()
            // No answer of ours is meant to be sniffed into HTML or script.
            .wrap(
                actix_web::middleware::DefaultHeaders::new()
                    .add(("X-Content-Type-Options", "nosniff")),
            )
            .configure(|c| crate::webhook::configure(c, state.clone(), max_body))
            .configure(|c| crate::http::configure(c, health.clone()))
            .configure(|c| crate::http::configure_admin(c, admin.clone()))
    })
    .workers(2)
    .shutdown_timeout(20)
    .disable_signals();
    let server = match tls {
        Some(tls) => server.bind_rustls_0_23(listen, tls),
        None => server.bind(listen),
    }
    .map_err(|e| ServeError::Bind {
        addr: listen,
        message: e.to_string(),
    })?;
    let bound = server.addrs().first().copied().unwrap_or(listen);
    Ok((server.run(), bound))
}

async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.changed() => true,
    }
}

/// Everything one integration does while serving.
async fn integration_main(
    live: Arc<Live>,
    public: Url,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
) {
    let name = live.integ.cfg.name.to_string();
    let span = tracing::info_span!("integration", integration = %name);
    let _e = span.clone().entered();
    drop(_e);
    // Dropping the set (also when this task is aborted at shutdown) aborts them all.
    let mut set = tokio::task::JoinSet::new();
    // Probes (and their token alerts) run from the start: a refused secret or an unreachable
    // LMS at start-up is exactly when someone must hear of it.
    set.spawn(health_loop(Arc::clone(&live), opts.clone(), stop.clone()));
    // Start-up: capabilities, group tree, subscriptions. Retried until it works, 1 s
    // doubling to 60 s.
    let retry = RetryPolicy::new(u32::MAX, Duration::from_secs(1), Duration::from_secs(60));
    let mut attempts = retry.start();
    let tg = loop {
        match startup(&live, &public).await {
            Ok(tg) => break tg,
            Err(e) => {
                tracing::error!(integration = %name, error = %e, "start-up failed; retrying");
                // Not for a blip: after a few attempts (about 7 s).
                if attempts.attempts() == 3 {
                    crate::alert::startup_failed(&live.integ.cfg, &live.integ.store, &e);
                }
                live.health.set_problem("startup", Some(e));
                let wait = attempts.retry(None).unwrap_or(retry.cap);
                if sleep_or_stop(wait, &mut stop).await {
                    return;
                }
            }
        }
    };
    live.health.set_problem("startup", None);
    live.started
        .store(true, std::sync::atomic::Ordering::Release);
    // Start-up just got a token, reached the LMS and made the subscriptions.
    live.health.set_problem("graph token", None);
    live.health.set_problem("lms", None);
    subscriptions_checked(&live);
    let tg = Arc::new(tg);
    set.spawn(worker_loop(
        Arc::clone(&live),
        Arc::clone(&tg),
        public.clone(),
        opts.clone(),
        stop.clone(),
    ));
    set.spawn(schedule_loop(Arc::clone(&live), stop.clone()));
    set.spawn(reconcile_loop(
        Arc::clone(&live),
        public.clone(),
        stop.clone(),
    ));
    set.spawn(renew_loop(
        Arc::clone(&live),
        public.clone(),
        opts.clone(),
        stop.clone(),
    ));
    while set.join_next().await.is_some() {}
}

async fn startup(live: &Live, public: &Url) -> Result<Targeting, String> {
    let integ = &live.integ;
    if live.tenant.get().is_none() {
        // tenant_id is a domain name: notifications and validation tokens carry the GUID.
        let guid = integ
            .graph
            .tenant_guid()
            .await
            .map_err(|e| format!("cannot resolve tenant_id to the tenant's id: {e}"))?;
        tracing::info!(tenant = %guid, "tenant_id resolved to the tenant's id");
        live.tenant.set(&guid);
    }
    let ctx = integ.context();
    let tg = worker::targeting(&ctx).await.map_err(|e| e.to_string())?;
    // Writes a crash left unconfirmed are read back before anything trusts the index; the
    // users they touched (and those they manage) are decided again.
    let settled = apply::settle_intents(&ctx, &tg.managed)
        .await
        .map_err(|e| e.to_string())?;
    // Their reports too: a manager whose write was cut short may have left them unlinked.
    let mut again: std::collections::BTreeSet<String> = settled.settled.iter().cloned().collect();
    for m in &settled.settled {
        again.extend(integ.store.reports_of(m).map_err(|e| e.to_string())?);
    }
    if !again.is_empty() {
        let hints: Vec<QueueItem> = again.into_iter().map(QueueItem::follow_up).collect();
        integ.store.enqueue(&hints).map_err(|e| e.to_string())?;
    }
    worker::init_tree(&ctx).await.map_err(|e| e.to_string())?;
    let subs_guard = live.subs_lock.lock().await;
    let gone = subs::reconcile_with_graph(integ, public)
        .await
        .map_err(|e| e.to_string())?;
    let recreated = subs::ensure(integ, public, &live.client_state)
        .await
        .map_err(|e| e.to_string())?;
    drop(subs_guard);
    let ever_reconciled = integ
        .store
        .runs::<crate::sync::reconcile::RunReport>(1)
        .map(|r| !r.is_empty())
        .unwrap_or(false);
    if ever_reconciled && (gone || recreated) {
        integ
            .store
            .enqueue(&[QueueItem::new(Hint::Reconcile {
                reason: "a subscription was made again at start-up".into(),
            })])
            .map_err(|e| e.to_string())?;
        live.wake.notify_one();
    }
    if !ever_reconciled {
        integ
            .store
            .enqueue(&[QueueItem::new(Hint::Reconcile {
                reason: "first start".into(),
            })])
            .map_err(|e| e.to_string())?;
        live.wake.notify_one();
    }
    Ok(tg)
}

async fn full_reconcile(live: &Live, public: &Url, reason: &str) {
    // Other integrations' reconciles run beside this one, up to the shared limit.
    let _permit = live.reconciles.acquire().await;
    tracing::info!(integration = %live.integ.cfg.name, %reason, "full reconcile");
    let report = live.integ.reconcile(RunOptions::default(), None).await;
    live.health.set_problem(
        "last reconcile",
        (report.outcome == RunOutcome::Failed)
            .then(|| report.error.clone().unwrap_or_else(|| "failed".into())),
    );
    if report.tree_changed {
        // Nested groups joined or left: their subscriptions follow.
        if let Err(e) = ensure_subscriptions(live, public).await {
            tracing::error!(error = %e, "subscriptions for a changed group tree failed");
        }
        subscriptions_checked(live);
    }
}

async fn worker_loop(
    live: Arc<Live>,
    tg: Arc<Targeting>,
    public: Url,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
) {
    let store = &live.integ.store;
    // After a batch that could not go on (the store, Graph's token): 0.5 s doubling to 30 s.
    let retry = RetryPolicy::new(
        u32::MAX,
        Duration::from_millis(500),
        Duration::from_secs(30),
    );
    let mut failures = retry.start();
    loop {
        if *stop.borrow() {
            return;
        }
        let mut fatal = false;
        // The earliest backoff of an item still waiting (a departure settling, a retry).
        let mut next_due = None;
        loop {
            let handed = live.handed();
            let items = match store.queue_ready_next(Utc::now(), 500 + handed.len()) {
                Ok((i, next)) => {
                    next_due = next;
                    i
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the queue");
                    fatal = true;
                    break;
                }
            };
            // Items that asked for a reconcile still running stay queued until it ends.
            let items: Vec<_> = items
                .into_iter()
                .filter(|(id, _)| !handed.contains(id))
                .collect();
            if items.is_empty() {
                break;
            }
            // Each batch is exclusive with a reconcile's whole-integration steps (reading
            // back intents, rebuilding the membership mirror), not with the reconcile itself.
            let _batch = live.integ.gate.exclusive().await;
            let (special, normal): (Vec<_>, Vec<_>) = items.into_iter().partition(|(_, it)| {
                matches!(it.hint, Hint::Lifecycle { .. } | Hint::Reconcile { .. })
            });
            let mut reconcile_reason: Option<String> = None;
            let mut asked: Vec<u64> = Vec::new();
            let mut done = Vec::new();
            for (id, it) in special {
                match &it.hint {
                    Hint::Reconcile { reason } => {
                        reconcile_reason = Some(reason.clone());
                        asked.push(id);
                        continue;
                    }
                    Hint::Lifecycle {
                        event,
                        subscription_id,
                    } => {
                        let subs_guard = live.subs_lock.lock().await;
                        let handled = subs::lifecycle(
                            &live.integ,
                            &public,
                            &live.client_state,
                            event,
                            subscription_id,
                        )
                        .await;
                        drop(subs_guard);
                        match handled {
                            Ok(true) => {
                                reconcile_reason = Some(format!("lifecycle event {event}"));
                                asked.push(id);
                                continue;
                            }
                            Ok(false) => {}
                            Err(e) => {
                                tracing::error!(%event, error = %e, "lifecycle event handling failed")
                            }
                        }
                    }
                    _ => {}
                }
                done.push(id);
            }
            if !normal.is_empty() {
                let (out, result) = live.integ.process_batch(&tg, &opts.worker, normal).await;
                match result {
                    Ok(()) => {
                        live.health.set_problem("worker", None);
                        live.health.set_problem(
                            "groups",
                            (!out.stopped.is_empty()).then(|| out.stopped.join("; ")),
                        );
                        if let Some(reason) = out.reconcile {
                            // Queued, so that a stop or crash before the run is over runs it
                            // again at the next start; handed to the reconcile loop from the
                            // queue like any other.
                            if let Err(e) = store.enqueue(&[QueueItem::new(Hint::Reconcile {
                                reason: reason.clone(),
                            })]) {
                                tracing::error!(error = %e, "cannot queue the full reconcile; running it anyway");
                                reconcile_reason = Some(reason);
                            }
                        }
                        if out.tree_changed {
                            if let Err(e) = ensure_subscriptions(&live, &public).await {
                                tracing::error!(error = %e, "subscriptions for a changed group tree failed");
                            }
                            subscriptions_checked(&live);
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "incremental batch stopped; will retry");
                        live.health.set_problem("worker", Some(e.to_string()));
                        fatal = true;
                    }
                }
            }
            if let Err(e) = store.dequeue(&done) {
                tracing::error!(error = %e, "cannot remove handled items");
            }
            drop(_batch);
            if let Some(reason) = reconcile_reason {
                // Runs beside this loop: the next notifications do not wait for it.
                live.reconcile_soon(reason, asked);
            }
            if fatal || *stop.borrow() {
                break;
            }
        }
        if fatal {
            let wait = failures.retry(None).unwrap_or(retry.cap);
            if sleep_or_stop(wait, &mut stop).await {
                return;
            }
            continue;
        }
        failures = retry.start();
        // Back when the first waiting item is due, not a poll later.
        let nap = next_due
            .map(|t| (t - Utc::now()).to_std().unwrap_or(Duration::ZERO))
            .map_or(opts.poll_interval, |d| d.min(opts.poll_interval));
        tokio::select! {
            _ = live.wake.notified() => {}
            _ = tokio::time::sleep(nap) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Runs the full reconciles asked for (by the worker, a lifecycle event, the schedule), one
/// at a time, beside the incremental worker.
async fn reconcile_loop(live: Arc<Live>, public: Url, mut stop: watch::Receiver<bool>) {
    loop {
        let (reason, items) = {
            let mut d = live.due.lock().unwrap_or_else(|e| e.into_inner());
            (d.reason.take(), std::mem::take(&mut d.items))
        };
        if let Some(reason) = reason {
            full_reconcile(&live, &public, &reason).await;
            if let Err(e) = live.integ.store.dequeue(&items) {
                tracing::error!(error = %e, "cannot remove handled items");
            }
            let mut d = live.due.lock().unwrap_or_else(|e| e.into_inner());
            for i in &items {
                d.handed.remove(i);
            }
            continue;
        }
        tokio::select! {
            _ = live.reconcile_wake.notified() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

async fn schedule_loop(live: Arc<Live>, mut stop: watch::Receiver<bool>) {
    let cfg = &live.integ.cfg;
    let Ok(cron) = cfg.cron() else { return };
    loop {
        let now = Utc::now().with_timezone(&cfg.timezone);
        let next = match cron.find_next_occurrence(&now, false) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "schedule has no next run");
                return;
            }
        };
        let wait = (next.with_timezone(&Utc) - Utc::now())
            .to_std()
            .unwrap_or(Duration::from_secs(1));
        tracing::debug!(next = %next, "next scheduled reconcile");
        if sleep_or_stop(wait, &mut stop).await {
            return;
        }
        // Incremental work goes on while it runs.
        live.reconcile_soon("schedule".into(), Vec::new());
    }
}

async fn renew_loop(
    live: Arc<Live>,
    public: Url,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // Often enough that no subscription lapses between two checks.
        let every = opts.renew_interval.min(subs::check_interval(&live.integ));
        if sleep_or_stop(every, &mut stop).await {
            return;
        }
        match ensure_subscriptions(&live, &public).await {
            Ok(recreated) => {
                live.health.set_problem("subscriptions", None);
                subscriptions_checked(&live);
                if recreated {
                    let _ = live.integ.store.enqueue(&[QueueItem::new(Hint::Reconcile {
                        reason: "a subscription was recreated".into(),
                    })]);
                    live.wake.notify_one();
                }
            }
            Err(e) => live
                .health
                .set_problem("subscriptions", Some(e.to_string())),
        }
    }
}

async fn health_loop(live: Arc<Live>, opts: ServeOptions, mut stop: watch::Receiver<bool>) {
    loop {
        let token = live.integ.graph.token().await.err();
        if let Some(e) = &token {
            crate::alert::graph_token_failed(&live.integ.cfg, &live.integ.store, e);
        }
        live.health
            .set_problem("graph token", token.map(|e| e.to_string()));
        let target = live.integ.target.probe().await.err();
        live.health.set_problem("lms", target);
        subscriptions_checked(&live);
        if sleep_or_stop(opts.health_interval, &mut stop).await {
            return;
        }
    }
}

/// `subs::ensure` under the integration's subscription lock.
async fn ensure_subscriptions(live: &Live, public: &Url) -> Result<bool, subs::SubsError> {
    let _guard = live.subs_lock.lock().await;
    subs::ensure(&live.integ, public, &live.client_state).await
}

/// The "subscriptions live" check, from the store now: called whenever subscriptions were made
/// or renewed, so `/status` never lags the table it shows.
fn subscriptions_checked(live: &Live) {
    let subs = match subs::live(&live.integ) {
        Ok(r) => r.err(),
        Err(e) => Some(e.to_string()),
    };
    live.health.set_problem("subscriptions live", subs);
}
