//! Wiring: one [`Integration`] per configured integration (its Graph client, its target and
//! its slice of the store), and the commands the CLI runs on them.
//!
//! Owns: turning a validated config into live clients, `check`, and running reconciles over
//! several integrations. It knows no wire format.

use std::time::Duration;

use crate::config::IntegrationConfig;
use crate::graph::{GraphClient, GraphSettings};
use crate::lms::dialect::Learned;
use crate::lms::probe::{ProbeReport, ProbeSpec, RowStatus};
use crate::lms::scim::{DialectMemory, ScimTarget};
use crate::lms::Target;
use crate::store::queue::QueueItem;
use crate::store::{IntegrationStore, Store, StoreError};
use crate::sync::reconcile::{self, Context, ProgressFn, RunError, RunOptions, RunReport};
use crate::sync::worker;

/// Meta key of what the LMS's SCIM server taught rostersync (its dialect, learned layer).
pub(crate) const DIALECT_META: &str = "scim_dialect";
/// Meta key of the last `check --probe` report.
pub(crate) const PROBE_META: &str = "scim_probe";

/// Keeps the learned dialect in the integration's `meta` tree.
struct StoreMemory(IntegrationStore);

impl DialectMemory for StoreMemory {
    fn load(&self) -> Option<Learned> {
        match self.0.get_meta(DIALECT_META) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "the stored SCIM dialect cannot be read; learning it again");
                None
            }
        }
    }
    fn save(&self, learned: &Learned) {
        if let Err(e) = self.0.put_meta(DIALECT_META, learned) {
            tracing::warn!(error = %e, "the learned SCIM dialect could not be stored");
        }
    }
}

/// One integration's live parts.
pub struct Integration {
    pub cfg: IntegrationConfig,
    /// The worker's, `sync-user`'s and the subscriptions' Graph client (normal priority).
    pub graph: std::sync::Arc<GraphClient>,
    /// The full reconcile's: the same tenant, token and Graph budget, but low priority and
    /// paced (`graph::pacer`).
    pub background: std::sync::Arc<GraphClient>,
    /// Keeps the worker's and a reconcile's writes of one user apart (`sync::gate`).
    pub gate: std::sync::Arc<crate::sync::gate::UserGate>,
    pub target: ScimTarget,
    pub store: IntegrationStore,
    /// Open while a subscription call of ours may make Graph validate our endpoints
    /// (`serve::subs` holds it open around creates and renewals; the webhook reads it).
    pub handshake: crate::webhook::handshake::HandshakeWindow,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Graph(#[from] crate::graph::GraphError),
    #[error(transparent)]
    Target(#[from] crate::lms::TargetError),
}

impl Integration {
    pub fn build(cfg: &IntegrationConfig, store: &Store) -> Result<Self, BuildError> {
        let graph = std::sync::Arc::new(
            GraphClient::new(
                GraphSettings {
                    tenant_id: cfg.tenant_id.clone(),
                    client_id: cfg.client_id.clone(),
                    credential: cfg.credential.clone(),
                    login_url: cfg.login_url.clone(),
                    graph_url: cfg.graph_url.clone(),
                },
                GraphClient::default_http()?,
            )
            .with_label(cfg.name.as_str()),
        );
        let istore = store.integration(&cfg.name)?;
        let target = ScimTarget::new(
            &cfg.target.url,
            cfg.target.token.clone(),
            &cfg.target.custom_schema,
            cfg.target.concurrency,
            Duration::from_secs(cfg.target.timeout_secs),
        )?
        .with_label(cfg.name.as_str())
        .with_throttle_wait(Duration::from_secs(cfg.target.throttle_wait_secs))
        .with_dialect(cfg.target.dialect.clone())
        .with_bulk(cfg.target.bulk)
        .with_memory(Box::new(StoreMemory(istore.clone())));
        let background = std::sync::Arc::new(graph.background());
        Ok(Self {
            cfg: cfg.clone(),
            graph,
            background,
            gate: Default::default(),
            target,
            store: istore,
            handshake: Default::default(),
        })
    }

    pub fn context(&self) -> Context<'_, ScimTarget> {
        Context {
            cfg: &self.cfg,
            graph: &self.graph,
            target: &self.target,
            store: &self.store,
            gate: &self.gate,
        }
    }

    /// The context of a full reconcile: as [`Integration::context`], with the background
    /// Graph client (low priority, paced).
    pub(crate) fn background_context(&self) -> Context<'_, ScimTarget> {
        Context {
            graph: &self.background,
            ..self.context()
        }
    }

    /// One batch of the incremental worker ([`worker::process`]), and the alerts it calls for
    /// (dead letters, a guard trip).
    pub async fn process_batch(
        &self,
        tg: &worker::Targeting,
        ws: &worker::WorkerSettings,
        items: Vec<(u64, QueueItem)>,
    ) -> (worker::BatchOutcome, Result<(), RunError>) {
        let (out, result) = worker::process(&self.context(), tg, ws, items).await;
        crate::alert::after_batch(
            &self.cfg,
            &self.store,
            &out.dead_letters,
            out.guard.as_ref(),
        );
        (out, result)
    }

    pub async fn reconcile(&self, opts: RunOptions, progress: Option<ProgressFn>) -> RunReport {
        let dry_run = opts.dry_run;
        let (report, error) =
            reconcile::reconcile(&self.background_context(), opts, progress).await;
        // Failed users, a guard trip, a refused token, a failed run (dry runs raise nothing).
        crate::alert::after_run(&self.cfg, &self.store, &report, error.as_ref());
        if !dry_run {
            let seconds = (report.finished_at - report.started_at)
                .to_std()
                .unwrap_or_default()
                .as_secs_f64();
            let (outcome, success) = match report.outcome {
                reconcile::RunOutcome::Ok => ("ok", true),
                reconcile::RunOutcome::Partial => ("partial", true),
                reconcile::RunOutcome::GuardTripped => ("guard_tripped", false),
                reconcile::RunOutcome::Failed => ("failed", false),
            };
            crate::metrics::reconcile_finished(self.cfg.name.as_str(), seconds, outcome, success);
        }
        report
    }

    /// [`Integration::reconcile`] as its own task on the runtime's worker threads. A future
    /// driven by `block_on` (the CLI's `main`) is polled on the main thread, so every LMS answer
    /// has to wake that thread; run as a task, the run and its HTTP connections share the
    /// workers. `cargo bench --bench reconcile` measured the first reconcile about a fifth
    /// faster this way.
    pub async fn reconcile_task(
        self: &std::sync::Arc<Self>,
        opts: RunOptions,
        progress: Option<ProgressFn>,
    ) -> Result<RunReport, tokio::task::JoinError> {
        let this = std::sync::Arc::clone(self);
        tokio::spawn(async move { this.reconcile(opts, progress).await }).await
    }

    /// Really talks to Graph and the target; one line per check.
    pub async fn check(&self) -> Vec<CheckLine> {
        let mut out = Vec::new();
        let mut line = |what: String, status: CheckStatus, detail: String| {
            out.push(CheckLine {
                integration: self.cfg.name.to_string(),
                what,
                status,
                detail,
                probe: None,
            })
        };
        let split = |r: Result<String, String>| match r {
            Ok(d) => (CheckStatus::Ok, d),
            Err(d) => (CheckStatus::Fail, d),
        };
        match self.graph.token().await {
            Ok(_) => {
                line(
                    "Graph token".into(),
                    CheckStatus::Ok,
                    format!(
                        "got an app-only token {}",
                        self.graph.credential().describe()
                    ),
                );
                for g in &self.cfg.groups {
                    let (st, d) = split(self.check_group(g).await);
                    line(format!("group {g}"), st, d);
                }
            }
            Err(e) => line("Graph token".into(), CheckStatus::Fail, e.to_string()),
        }
        match self.target.discover().await {
            Ok(caps) => {
                let notes = if caps.notes.is_empty() {
                    "discovery documents read".to_string()
                } else {
                    caps.notes.join("; ")
                };
                line("LMS discovery".into(), CheckStatus::Ok, notes);
                let d = &caps.dialect;
                let probed = self
                    .store
                    .get_meta::<Learned>(DIALECT_META)
                    .ok()
                    .flatten()
                    .and_then(|l| l.probed_at);
                let status = if !d.patch() && !d.put {
                    CheckStatus::Fail
                } else if probed.is_none() {
                    CheckStatus::Warn
                } else {
                    CheckStatus::Ok
                };
                let how = match probed {
                    Some(t) => format!("probed {}", t.format("%Y-%m-%d %H:%M UTC")),
                    None => "not probed yet: run `check --probe` once before go-live".into(),
                };
                let mut detail = format!("{how}; {}", d.summary().join("; "));
                if !d.patch() && !d.put {
                    detail.push_str("; neither PATCH nor PUT works: users cannot be updated");
                }
                line("LMS dialect".into(), status, detail);
                let rejected: Vec<&str> = self
                    .cfg
                    .mapping
                    .rules
                    .iter()
                    .map(|r| r.key.as_str())
                    .filter(|k| !caps.accepts(k))
                    .collect();
                if !rejected.is_empty() {
                    line(
                        "mapping".into(),
                        CheckStatus::Warn,
                        format!(
                            "the LMS cannot take these mapped attributes, so they are not sent: {} (declare the extension schema in the LMS, or drop the entries with `= false`)",
                            rejected.join(", ")
                        ),
                    );
                }
                let r = self
                    .target
                    .list(1, 1)
                    .await
                    .map(|(_, total)| format!("GET /Users works ({total} users)"))
                    .map_err(|e| e.to_string());
                let (st, d) = split(r);
                line("LMS users".into(), st, d);
            }
            Err(e) => line("LMS discovery".into(), CheckStatus::Fail, e.to_string()),
        }
        out
    }

    /// `check --probe`: proves every operation the mapping and the lifecycle need with canary
    /// users in the LMS (it writes there), learns and stores the LMS's dialect, and returns
    /// the probe's table as one check line (`Fail` when something rostersync needs cannot be
    /// done).
    pub async fn probe(&self, delete: bool) -> CheckLine {
        let mut line = CheckLine {
            integration: self.cfg.name.to_string(),
            what: "LMS probe".into(),
            status: CheckStatus::Fail,
            detail: String::new(),
            probe: None,
        };
        let run = async {
            let caps = self.target.discover().await?;
            let spec = ProbeSpec {
                keys: self
                    .cfg
                    .mapping
                    .rules
                    .iter()
                    .map(|r| r.key.clone())
                    .filter(|k| caps.accepts(k))
                    .collect(),
                manager: self.cfg.mapping.link_manager && caps.enterprise,
                delete,
            };
            self.target.probe_dialect(&spec).await
        };
        match run.await {
            Ok(report) => {
                if let Err(e) = self.store.put_meta(PROBE_META, &report) {
                    tracing::warn!(error = %e, "the probe report could not be stored");
                }
                if let Err(e) = self.store.flush() {
                    tracing::warn!(error = %e, "the probe report could not be flushed");
                }
                let warned = report
                    .rows
                    .iter()
                    .filter(|r| r.status == RowStatus::Warn)
                    .count();
                line.status = if report.failed() {
                    CheckStatus::Fail
                } else if warned > 0 {
                    CheckStatus::Warn
                } else {
                    CheckStatus::Ok
                };
                line.detail = format!(
                    "canary {}: {} operations; {} worked around or not possible, {} blocking; dialect stored",
                    report.canary,
                    report.rows.len(),
                    warned,
                    report
                        .rows
                        .iter()
                        .filter(|r| r.status == RowStatus::Fail)
                        .count()
                );
                line.probe = Some(report);
            }
            Err(e) => line.detail = format!("the probe stopped: {e}"),
        }
        line
    }

    async fn check_group(&self, id: &str) -> Result<String, String> {
        let select = self.cfg.mapping.user_select();
        let group = self.graph.group(id).await.map_err(|e| e.to_string())?;
        let page = self
            .graph
            .user_page(&self.graph.transitive_users_url(id, &select))
            .await
            .map_err(|e| e.to_string())?;
        if page.lacks_properties() {
            return Err(format!(
                "group {:?} is readable but its members come without properties: grant User.Read.All and consent",
                group.display_name
            ));
        }
        let more = if page.next.is_some() { "+" } else { "" };
        Ok(format!(
            "{:?} readable, {}{more} user members",
            group.display_name,
            page.users.len()
        ))
    }
}

/// Full reconciles of several integrations side by side, at most `limit` at once (each is
/// paced by its own tenant's Graph bucket and its own LMS, so they do not slow each other
/// down); the reports come back in the order of `runs`. `progress` goes to every run.
pub async fn reconcile_side_by_side(
    runs: &[std::sync::Arc<Integration>],
    opts: RunOptions,
    limit: usize,
    progress: Option<ProgressFn>,
) -> Vec<Result<RunReport, tokio::task::JoinError>> {
    use futures::StreamExt;
    futures::stream::iter(runs.iter().map(|i| {
        let progress = progress.clone();
        async move { i.reconcile_task(opts, progress).await }
    }))
    .buffered(limit.max(1))
    .collect()
    .await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Ok,
    Warn,
    Fail,
}

/// One line of `check` output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckLine {
    pub integration: String,
    pub what: String,
    pub status: CheckStatus,
    pub detail: String,
    /// `check --probe`: the probe's table, on its own line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probe: Option<ProbeReport>,
}
