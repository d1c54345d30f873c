//! What a run reports: its outcome, counts, failures and per-group summary.

use super::*;

pub struct Context<'a, T: Target> {
    pub cfg: &'a IntegrationConfig,
    /// Shared so the member reader can run as its own task, on another core.
    pub graph: &'a Arc<GraphClient>,
    pub target: &'a T,
    pub store: &'a IntegrationStore,
    /// Keeps the worker's and a reconcile's writes of one user apart (`sync::gate`).
    pub gate: &'a crate::sync::gate::UserGate,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    pub dry_run: bool,
    pub allow_mass_deactivation: bool,
    /// Also read every LMS user and repair drift made by hand (changed or deleted users).
    pub deep: bool,
    /// Read every member's manager from Graph instead of tracking managers with the users
    /// delta (`sync::managers`); also done every `verify_managers_every`.
    pub verify_managers: bool,
}

/// Progress events for a terminal display.
#[derive(Clone, Debug)]
pub enum Progress {
    PageRead { members: u64 },
    Applied { done: u64 },
}

pub type ProgressFn = Arc<dyn Fn(&Progress) + Send + Sync>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunOutcome {
    /// Everything planned was applied (or, in a dry run, planned).
    Ok,
    /// Some users failed; the rest was applied.
    Partial,
    /// The guard stopped the deactivations.
    GuardTripped,
    /// The run stopped on an error that concerns the whole integration.
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub members: u64,
    pub created: u64,
    pub updated: u64,
    pub deactivated: u64,
    pub reactivated: u64,
    pub unchanged: u64,
    /// Disabled members that are not in the LMS (they are not created).
    #[serde(default)]
    pub skipped: u64,
    pub failed: u64,
    /// Users whose write the LMS kept throttling past `target.throttle_wait_secs`: nothing
    /// was written, the next run tries them again (not failures).
    #[serde(default)]
    pub deferred: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UserFailure {
    pub entra_id: String,
    pub user_name: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupSummary {
    pub id: String,
    pub name: String,
    pub members: u64,
}

/// The result of one run; the part without `changes` is kept in the run history.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub run_id: String,
    pub integration: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub dry_run: bool,
    pub outcome: RunOutcome,
    pub counts: Counts,
    pub groups: Vec<GroupSummary>,
    pub failures: Vec<UserFailure>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guard: Option<GuardTrip>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Planned (dry run) or applied changes; not kept in the run history.
    #[serde(default, skip_deserializing)]
    pub changes: Changes,
    #[serde(default)]
    pub notes: Vec<String>,
    /// The run found groups joining or leaving the tree of nested groups (`serve` makes the
    /// subscriptions follow).
    #[serde(skip)]
    pub tree_changed: bool,
}

/// Errors that stop a whole run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Source(String),
}

impl From<crate::sync::managers::ManagersError> for RunError {
    fn from(e: crate::sync::managers::ManagersError) -> Self {
        match e {
            crate::sync::managers::ManagersError::Graph(g) => RunError::Graph(g),
            crate::sync::managers::ManagersError::Store(s) => RunError::Store(s),
        }
    }
}
