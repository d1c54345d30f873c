//! Alerts: e-mail over SMTP and an outgoing webhook (Slack / Teams `{"text": …}`) for what an
//! operator has to act on: users that failed to sync, guard trips, failed runs, Graph
//! authentication failures, subscriptions that cannot be created or renewed, dead letters and
//! a client secret about to expire.
//!
//! Owns: what each alert says (this file), the outbox with its deduplication and digests
//! ([`outbox`]), and delivery ([`Alerter`], in `deliver`).
//!
//! Must not: block or fail a sync. The event functions below are what the sync, worker and
//! serve code call; they only append to the outbox in sled (no network I/O) and log, never
//! return, their own errors. Delivery happens elsewhere: a background task in `serve`, and a
//! bounded attempt at the end of `reconcile` and `check`. An alert that cannot be sent stays
//! in the outbox and is retried, across restarts.

mod deliver;
pub(crate) mod outbox;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

pub use deliver::{AlertError, Alerter, Delivery};

use crate::config::{AlertSettings, IntegrationConfig};
use crate::graph::GraphError;
use crate::store::queue::QueueItem;
use crate::store::IntegrationStore;
use crate::sync::plan::GuardTrip;
use crate::sync::reconcile::{RunError, RunReport};

/// Days before `client_secret_expires` at which a warning goes out (each once).
pub(crate) const SECRET_EXPIRY_WARNINGS: [i64; 4] = [30, 14, 7, 1];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum AlertKind {
    FailedUsers,
    DeadLetters,
    GuardTripped,
    RunFailed,
    GraphAuth,
    Subscriptions,
    SecretExpiry,
}

impl AlertKind {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            AlertKind::FailedUsers => "failed_users",
            AlertKind::DeadLetters => "dead_letters",
            AlertKind::GuardTripped => "guard_tripped",
            AlertKind::RunFailed => "run_failed",
            AlertKind::GraphAuth => "graph_auth",
            AlertKind::Subscriptions => "subscriptions",
            AlertKind::SecretExpiry => "secret_expiry",
        }
    }
}

/// One line of a digest (a user, a dead letter); `key` keeps it from being repeated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Item {
    pub key: String,
    pub text: String,
}

/// How often an alert may repeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Repeat {
    /// Not again within this window after it was queued.
    Window(Duration),
    /// A digest: at most one per `every`, merging everything raised meanwhile; each item is
    /// not listed again within `item_window`.
    Digest {
        every: Duration,
        item_window: Duration,
    },
}

/// An alert as raised, before deduplication.
#[derive(Clone, Debug)]
pub(crate) struct Alert {
    pub kind: AlertKind,
    /// Deduplication key within the integration, e.g. `graph-auth:7000215`.
    pub key: String,
    pub title: String,
    pub details: Vec<String>,
    pub items: Vec<Item>,
    pub advice: String,
    pub repeat: Repeat,
}

fn minutes(n: u32) -> Duration {
    Duration::minutes(i64::from(n))
}

/// Queues `alert` for the integration, if it has any alert channel. Errors are logged.
fn raise(cfg: &IntegrationConfig, store: &IntegrationStore, alert: Alert) {
    raise_at(&cfg.alerts, cfg.name.as_str(), store, alert, Utc::now());
}

fn raise_at(
    settings: &AlertSettings,
    integration: &str,
    store: &IntegrationStore,
    alert: Alert,
    now: DateTime<Utc>,
) {
    if !settings.enabled() {
        return;
    }
    let (kind, key, title) = (alert.kind, alert.key.clone(), alert.title.clone());
    let result = store
        .alerts()
        .and_then(|trees| outbox::raise(&trees, settings, integration, alert, now));
    match result {
        Ok(outbox::Raised::Queued { due }) => {
            tracing::warn!(integration, alert = kind.as_str(), %key, %title, due = %due, "alert queued");
            deliver::wake();
        }
        Ok(outbox::Raised::Merged) => {
            tracing::info!(integration, alert = kind.as_str(), %key, "added to a pending alert digest")
        }
        Ok(outbox::Raised::Suppressed) => {
            tracing::debug!(integration, alert = kind.as_str(), %key, "alert already sent recently; not repeated")
        }
        Err(e) => {
            tracing::error!(integration, alert = kind.as_str(), %key, %title, error = %e, "ALERT LOST: cannot write it to the outbox")
        }
    }
}

// ---- events: one function per thing that happened ----

/// After a full reconcile (CLI or serve): failed users (digest), guard trip, Graph
/// authentication failure or another whole-run failure. Dry runs raise nothing.
pub(crate) fn after_run(
    cfg: &IntegrationConfig,
    store: &IntegrationStore,
    report: &RunReport,
    error: Option<&RunError>,
) {
    if report.dry_run {
        return;
    }
    let name = cfg.name.as_str();
    match error {
        Some(RunError::Graph(e @ GraphError::Auth { .. })) => graph_token_failed(cfg, store, e),
        Some(e) => raise(
            cfg,
            store,
            Alert {
                kind: AlertKind::RunFailed,
                key: "run-failed".into(),
                title: "a full reconcile failed".into(),
                details: vec![
                    format!("Run {} stopped before it finished: {e}", report.run_id),
                    "Nothing was deactivated by this run; users already created or updated stay so.".into(),
                ],
                items: Vec::new(),
                advice: format!(
                    "Read the reason above (it names the fix), then run `rostersync --config FILE reconcile --integration {name}` or wait for the next scheduled run. `rostersync check --integration {name}` tests Graph and the LMS."
                ),
                repeat: Repeat::Window(minutes(cfg.alerts.repeat_minutes)),
            },
        ),
        None => {}
    }
    if let Some(trip) = &report.guard {
        guard_tripped(cfg, store, trip, false);
    }
    if !report.failures.is_empty() {
        let items = report
            .failures
            .iter()
            .map(|f| Item {
                key: format!("user:{}:{}", f.entra_id, short_hash(&f.reason)),
                text: format!(
                    "{} (Entra id {}): {}",
                    f.user_name.as_deref().unwrap_or("(no userName)"),
                    f.entra_id,
                    f.reason
                ),
            })
            .collect();
        failed_users(
            cfg,
            store,
            format!("Users that failed in run {}:", report.run_id),
            items,
        );
    }
}

fn failed_users(
    cfg: &IntegrationConfig,
    store: &IntegrationStore,
    intro: String,
    items: Vec<Item>,
) {
    let name = cfg.name.as_str();
    raise(
        cfg,
        store,
        Alert {
            kind: AlertKind::FailedUsers,
            key: "failed-users".into(),
            title: String::new(),
            details: vec![intro],
            items,
            advice: format!(
                "The rest of the run was applied; each of these users is tried again on the next run. Fix what the reason names — in Entra (e.g. a missing attribute used as username) or in the LMS (e.g. a userName held by another account) — then run `rostersync --config FILE reconcile --integration {name}`, or wait for the next scheduled run. `reconcile --dry-run` shows the plan."
            ),
            repeat: Repeat::Digest {
                every: minutes(cfg.alerts.digest_minutes),
                item_window: Duration::hours(i64::from(cfg.alerts.repeat_hours)),
            },
        },
    );
}

/// A guard window in words ("24 h", "90 min").
fn humantime_window(d: Duration) -> String {
    let m = d.num_minutes();
    if m % (24 * 60) == 0 {
        format!("{} d", m / (24 * 60))
    } else if m % 60 == 0 {
        format!("{} h", m / 60)
    } else {
        format!("{m} min")
    }
}

fn guard_tripped(
    cfg: &IntegrationConfig,
    store: &IntegrationStore,
    trip: &GuardTrip,
    incremental: bool,
) {
    let name = cfg.name.as_str();
    let (title, what) = if incremental {
        (
            format!("mass-deactivation guard held {} deactivations", trip.would_deactivate),
            "An incremental batch would have deactivated more users than max_deactivations allows; those deactivations were moved to the dead letters.".to_string(),
        )
    } else {
        (
            format!("mass-deactivation guard stopped {} deactivations", trip.would_deactivate),
            "A full reconcile would have deactivated more users than max_deactivations allows; it applied creates and updates but deactivated nobody.".to_string(),
        )
    };
    let advice = if incremental {
        format!("Check the groups in Entra (an emptied or wrongly scoped group looks like everyone leaving) and the app's permissions. If the departures are real, replay them with `rostersync --config FILE queue replay --all --allow-mass-deactivation --integration {name}`, or run `reconcile --integration {name} --allow-mass-deactivation` once. Until then every further deactivation is held too (for guard_window).")
    } else {
        format!("Check the groups in Entra (an emptied or wrongly scoped group looks like everyone leaving) and the app's permissions. If the departures are real, run `rostersync --config FILE reconcile --integration {name} --allow-mass-deactivation` once, or raise max_deactivations.")
    };
    raise(
        cfg,
        store,
        Alert {
            kind: AlertKind::GuardTripped,
            key: "guard".into(),
            title,
            details: vec![
                what,
                format!(
                    "Would deactivate {} of {} active users, after {} already deactivated within guard_window ({}); max_deactivations = {} allows {}.",
                    trip.would_deactivate,
                    trip.active_before,
                    trip.used,
                    humantime_window(cfg.guard_window),
                    trip.limit,
                    trip.allowed
                ),
            ],
            items: Vec::new(),
            advice,
            repeat: Repeat::Window(Duration::hours(i64::from(cfg.alerts.repeat_hours))),
        },
    );
}

/// After an incremental batch: items moved to the dead letters (digest) and a guard trip.
pub(crate) fn after_batch(
    cfg: &IntegrationConfig,
    store: &IntegrationStore,
    buried: &[(u64, QueueItem)],
    guard: Option<&GuardTrip>,
) {
    if let Some(trip) = guard {
        guard_tripped(cfg, store, trip, true);
    }
    if buried.is_empty() {
        return;
    }
    let name = cfg.name.as_str();
    let items = buried
        .iter()
        .map(|(id, it)| Item {
            key: format!("dead:{id}:{}", it.received_at.timestamp_millis()),
            text: format!(
                "#{id} {} after {} attempts: {}",
                it.hint.describe(),
                it.attempts,
                it.last_error.as_deref().unwrap_or("(no error recorded)")
            ),
        })
        .collect();
    raise(
        cfg,
        store,
        Alert {
            kind: AlertKind::DeadLetters,
            key: "dead-letters".into(),
            title: String::new(),
            details: vec!["The incremental worker gave up on these notifications and moved them to the dead letters:".into()],
            items,
            advice: format!(
                "`rostersync --config FILE queue dead --integration {name}` lists them with their errors. Fix the cause, then `queue replay --all --integration {name}` (or one ID). The next scheduled full reconcile also brings these users in step."
            ),
            repeat: Repeat::Digest {
                every: minutes(cfg.alerts.digest_minutes),
                item_window: Duration::hours(i64::from(cfg.alerts.repeat_hours)),
            },
        },
    );
}

/// Subscriptions that could not be created or renewed (`serve`, `subscriptions renew`).
pub(crate) fn subscriptions_failed(
    cfg: &IntegrationConfig,
    store: &IntegrationStore,
    errors: &[String],
) {
    let name = cfg.name.as_str();
    raise(
        cfg,
        store,
        Alert {
            kind: AlertKind::Subscriptions,
            key: "subscriptions".into(),
            title: "Graph subscriptions cannot be created or renewed".into(),
            details: vec![
                "Without live subscriptions Graph sends no change notifications: changes reach the LMS only with the scheduled full reconcile.".into(),
                "Failures:".into(),
            ],
            items: errors
                .iter()
                .map(|e| Item {
                    key: short_hash(e),
                    text: e.clone(),
                })
                .collect(),
            advice: format!(
                "Check that public_url is reachable from the internet over https (Graph validates it with a handshake), that the app has Group.Read.All / User.Read.All with admin consent, and /readyz. rostersync retries on its own; `rostersync --config FILE subscriptions renew --integration {name}` retries now."
            ),
            repeat: Repeat::Window(minutes(cfg.alerts.repeat_minutes)),
        },
    );
}

/// A token request refused by Entra ID (wrong or expired secret, missing consent, …).
/// Other errors (network) raise nothing here.
pub fn graph_token_failed(cfg: &IntegrationConfig, store: &IntegrationStore, e: &GraphError) {
    let (code, advice) = match e {
        GraphError::Auth { code, advice } => (*code, advice.clone()),
        // The certificate key or the federated token file cannot be used: no token either.
        GraphError::Credential(c) => (None, c.to_string()),
        _ => return,
    };
    let code_text = match (code, e) {
        (Some(c), _) => c.to_string(),
        (None, GraphError::Credential(_)) => "credential".to_string(),
        (None, _) => "unknown".to_string(),
    };
    raise(
        cfg,
        store,
        Alert {
            kind: AlertKind::GraphAuth,
            key: format!("graph-auth:{code_text}"),
            title: match code {
                Some(c) => format!("Graph authentication fails (AADSTS{c})"),
                None => "Graph authentication fails".into(),
            },
            details: vec![
                format!(
                    "Entra ID refuses the token request of app {} in tenant {}: nothing syncs until this is fixed.",
                    cfg.client_id, cfg.tenant_id
                ),
                advice,
            ],
            items: Vec::new(),
            advice: format!(
                "Follow the advice above, then check with `rostersync --config FILE check --integration {}`. This alert repeats every {} minutes while the failure lasts.",
                cfg.name, cfg.alerts.repeat_minutes
            ),
            repeat: Repeat::Window(minutes(cfg.alerts.repeat_minutes)),
        },
    );
}

/// `serve` cannot start an integration (LMS unreachable, a group missing, subscriptions
/// refused, ...): nothing is synced for it until it can.
pub(crate) fn startup_failed(cfg: &IntegrationConfig, store: &IntegrationStore, error: &str) {
    raise(
        cfg,
        store,
        Alert {
            kind: AlertKind::RunFailed,
            key: "startup-failed".into(),
            title: "serve cannot start syncing this integration".into(),
            details: vec![
                "serve retries on its own (backing off up to a minute), but until start-up succeeds no notification is applied and no scheduled reconcile runs.".into(),
                format!("Last error: {error}"),
            ],
            items: Vec::new(),
            advice: format!(
                "The error names the cause; `rostersync --config FILE check --integration {}` tests Graph and the LMS (stop serve first: one process per data directory). /readyz shows the failing check.",
                cfg.name
            ),
            repeat: Repeat::Window(minutes(cfg.alerts.repeat_minutes)),
        },
    );
}

/// Warns 30, 14, 7 and 1 days before `client_secret_expires`, and once it has passed; each
/// warning once. Runs at `serve` start and daily, and in `reconcile` and `check`.
pub(crate) fn check_secret_expiry(
    cfg: &IntegrationConfig,
    store: &IntegrationStore,
    today: NaiveDate,
) {
    let Some(expires) = cfg.client_secret_expires else {
        return;
    };
    let left = (expires - today).num_days();
    let (stage, title) = if left < 0 {
        (
            "expired".to_string(),
            format!("the client secret expired on {expires}"),
        )
    } else {
        match SECRET_EXPIRY_WARNINGS.iter().rev().find(|d| left <= **d) {
            Some(d) => (
                format!("{d}d"),
                match left {
                    0 => format!("the client secret expires today ({expires})"),
                    1 => format!("the client secret expires tomorrow ({expires})"),
                    n => format!("the client secret expires in {n} days ({expires})"),
                },
            ),
            None => return,
        }
    };
    raise(
        cfg,
        store,
        Alert {
            kind: AlertKind::SecretExpiry,
            key: format!("secret-expiry:{expires}:{stage}"),
            title,
            details: vec![format!(
                "The client secret of app {} in tenant {} expires on {expires} (client_secret_expires). When it has expired, every token request fails (AADSTS7000222) and nothing syncs.",
                cfg.client_id, cfg.tenant_id
            )],
            items: Vec::new(),
            advice: format!(
                "In the Entra admin center, App registrations > (the app) > Certificates & secrets > New client secret. Put its Value (not the Secret ID) where client_secret points, set client_secret_expires to the new expiry date, restart `serve`, check with `rostersync --config FILE check --integration {}`, then delete the old secret.",
                cfg.name
            ),
            // Each stage once: the key names the stage and the date.
            repeat: Repeat::Window(Duration::days(400)),
        },
    );
}

/// A short stable digest of a text, for keys (FNV-1a; not for security).
fn short_hash(s: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}
