//! A planned change of one LMS user, and why the mass-deactivation guard held a batch of them:
//! what the planner produces, the index and the run records keep, and the reports show.

use serde::{Deserialize, Serialize};

use super::record::{AttrChange, Record};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Update,
    Deactivate,
    Reactivate,
}

impl Action {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Deactivate => "deactivate",
            Action::Reactivate => "reactivate",
        }
    }
}

/// One user's planned change. Reports read back only what is serialized (`sync::changes`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlannedChange {
    pub action: Action,
    pub entra_id: String,
    pub user_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
    /// Field-level diff (for a create: every attribute it will have).
    pub changes: Vec<AttrChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The complete record after the change.
    #[serde(skip)]
    pub record: Record,
    #[serde(skip)]
    pub manager: Option<String>,
    /// Whether the LMS user was adopted rather than created (kept in the index).
    #[serde(skip)]
    pub linked: bool,
}

/// Why the guard stopped deactivations.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct GuardTrip {
    pub would_deactivate: u64,
    pub allowed: u64,
    /// Active users the budget is taken of: active now plus those deactivated in the window.
    pub active_before: u64,
    pub limit: String,
    /// Deactivations already written within the guard window (by any path).
    #[serde(default)]
    pub used: u64,
}

impl std::fmt::Display for GuardTrip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let before = if self.used > 0 {
            format!(
                ", after {} already deactivated within guard_window,",
                self.used
            )
        } else {
            String::new()
        };
        write!(
            f,
            "{} more deactivation(s) of {} active users{before} would exceed max_deactivations = {} ({} allowed); no user was deactivated and deactivations stay held. Check the group and the app's permissions; if this is intended, run `reconcile --allow-mass-deactivation` once (or `queue replay --all --allow-mass-deactivation` for the held notifications), or raise max_deactivations",
            self.would_deactivate, self.active_before, self.limit, self.allowed
        )
    }
}
