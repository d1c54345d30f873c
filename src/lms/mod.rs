//! The LMS side: a small [`Target`] trait and its SCIM 2.0 implementation.
//!
//! The trait speaks the neutral record vocabulary of `sync::mapping` (keys such as
//! `emails.work`); only `lms::scim` knows SCIM JSON. Every operation is idempotent: a
//! create that may have happened is looked up before anything is posted again, and
//! deactivation is an update of `active`.
//!
//! What one LMS's SCIM server really takes is its [`dialect::Dialect`]: `lms::scim` adapts
//! its writes and lookups to it, so the sync never needs to know.

pub mod dialect;
pub(crate) mod pace;
pub mod probe;
pub mod scim;

use std::collections::BTreeSet;
use std::future::Future;

use crate::model::record::{AttrChange, Record};

#[derive(Clone, Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{method} {path} answered {status}{}: {detail}", scim_type.as_deref().map(|t| format!(" ({t})")).unwrap_or_default())]
    Http {
        method: &'static str,
        path: String,
        status: u16,
        scim_type: Option<String>,
        detail: String,
    },
    #[error("the target user {0} no longer exists (404)")]
    NotFound(String),
    #[error("{count} LMS users match {attr} = {value:?}; refusing to guess which one is meant")]
    Ambiguous {
        attr: &'static str,
        value: String,
        count: usize,
    },
    #[error("cannot reach the LMS at {url}: {message}")]
    Transport { url: String, message: String },
    #[error("unexpected answer from the LMS ({what}): {message}")]
    Decode { what: String, message: String },
    #[error("the LMS rejected the bearer token (401): check target.token")]
    Unauthorized,
    /// The LMS kept throttling (429, or 503 with `Retry-After`) for longer than one request
    /// may wait: the write was not made and is deferred, not failed.
    #[error("{method} {path}: the LMS kept throttling ({status}) for {waited_secs} s; deferred")]
    Throttled {
        method: &'static str,
        path: String,
        status: u16,
        waited_secs: u64,
    },
}

impl TargetError {
    /// Errors that may concern the whole target rather than one user (the LMS down, the token
    /// refused): whoever meets one probes the target before blaming the user.
    pub(crate) fn is_fatal(&self) -> bool {
        matches!(
            self,
            TargetError::Unauthorized | TargetError::Transport { .. }
        ) || matches!(self, TargetError::Http { status, .. } if *status >= 500)
    }

    /// Whether a write that ended in this error may still have been applied (no answer, a
    /// server error, an unreadable answer): its outcome must be read back from the LMS.
    pub(crate) fn outcome_unknown(&self) -> bool {
        match self {
            TargetError::Transport { .. } | TargetError::Decode { .. } => true,
            TargetError::Http { status, .. } => *status >= 500 || *status == 408,
            // The last answer refused the request (a 503 to a POST was looked up first).
            TargetError::Throttled { .. } => false,
            _ => false,
        }
    }
}

/// A user as the target holds it, translated into the record vocabulary.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetUser {
    pub id: String,
    pub user_name: String,
    pub record: Record,
}

/// The answer to [`Target::create_with_manager`].
#[derive(Clone, Debug, PartialEq)]
pub struct Created {
    /// The new user's target id; `None` for a conflict (the user exists: the caller looks it
    /// up), as [`Target::create`].
    pub id: Option<String>,
    /// The manager's target id, when the new user was created linked to it.
    pub manager: Option<String>,
}

impl Created {
    /// A create (or conflict, `None`) that carries no manager link.
    pub fn unlinked(id: Option<String>) -> Created {
        Created { id, manager: None }
    }
}

/// What the target can take, learnt from its discovery documents and its dialect.
#[derive(Clone, Debug, Default)]
pub struct Capabilities {
    /// Whether the target served its schemas (otherwise core + enterprise are assumed).
    pub discovered: bool,
    pub enterprise: bool,
    /// Attribute names of the custom extension, when the target declares it.
    pub custom_attributes: Option<Vec<String>>,
    /// The custom extension is pinned in config without being declared: every `custom.*`
    /// attribute is sent.
    pub custom_any: bool,
    /// Top-level core User attributes the target declares (lowercase), when it declares any.
    pub core_attributes: Option<BTreeSet<String>>,
    /// Core attributes the target declares `readOnly` (lowercase): never sent.
    pub read_only: BTreeSet<String>,
    pub patch: bool,
    pub filter: bool,
    /// The dialect in force when discovery ran.
    pub dialect: dialect::Dialect,
    /// Human-readable notes from discovery (for `check`).
    pub notes: Vec<String>,
}

impl Capabilities {
    /// Whether a record key can be sent to this target.
    pub(crate) fn accepts(&self, key: &str) -> bool {
        if key.starts_with("enterprise.") {
            return self.enterprise;
        }
        if let Some(name) = key.strip_prefix("custom.") {
            return self.custom_any
                || self
                    .custom_attributes
                    .as_ref()
                    .is_some_and(|a| a.iter().any(|n| n.eq_ignore_ascii_case(name)));
        }
        let top = key.split('.').next().unwrap_or(key).to_ascii_lowercase();
        if self.read_only.contains(&top) {
            return false;
        }
        match &self.core_attributes {
            // userName, externalId and active are rostersync's own: always sent.
            Some(declared) if !matches!(top.as_str(), "username" | "externalid" | "active") => {
                declared.contains(&top)
            }
            _ => true,
        }
    }

    /// Whether the LMS keeps what is written to `key`; `reconcile --deep` compares only
    /// those (a value the LMS computes itself would otherwise be rewritten at every run).
    pub(crate) fn keeps(&self, key: &str) -> bool {
        !self.dialect.not_kept.contains(key)
    }
}

/// An LMS that rostersync can provision.
pub trait Target: Send + Sync {
    /// Reads the target's discovery documents (and checks the credentials).
    fn discover(&self) -> impl Future<Output = Result<Capabilities, TargetError>> + Send;
    fn find_by_external_id(
        &self,
        external_id: &str,
    ) -> impl Future<Output = Result<Option<TargetUser>, TargetError>> + Send;
    fn find_by_user_name(
        &self,
        user_name: &str,
    ) -> impl Future<Output = Result<Option<TargetUser>, TargetError>> + Send;
    /// Creates a user and returns its target id. A conflict (the user exists) is `Ok(None)`:
    /// the caller looks it up.
    fn create(
        &self,
        record: &Record,
    ) -> impl Future<Output = Result<Option<String>, TargetError>> + Send;
    /// Creates a user whose manager is being created in this run too (`manager`: the
    /// manager's externalId, its Entra id; `record` carries no manager), linking the two in
    /// one request where the target can (SCIM bulk's `bulkId` references, RFC 7644 §3.7.2).
    /// [`Created::manager`] is the manager's target id when the new user was linked to it;
    /// otherwise the caller links it later. By default: a plain [`Target::create`].
    fn create_with_manager(
        &self,
        record: &Record,
        manager: &str,
    ) -> impl Future<Output = Result<Created, TargetError>> + Send {
        let _ = manager;
        async move { Ok(Created::unlinked(self.create(record).await?)) }
    }
    /// Whether [`Target::create_with_manager`] can link a manager whose create is still on
    /// its way: then a reconcile need not wait for the manager's answer before it sends the
    /// create of a report.
    fn links_in_flight(&self) -> bool {
        false
    }
    /// Applies attribute changes to an existing user; never called with no change. `record`
    /// is the user's complete desired record (managed keys): some LMSs take only whole lists
    /// or whole resources. A change the LMS cannot take at all is left out with a warning (see
    /// [`Target::notes`]), not an error.
    fn update(
        &self,
        id: &str,
        changes: &[AttrChange],
        record: &Record,
    ) -> impl Future<Output = Result<(), TargetError>> + Send;
    /// One user by target id; `None` when it does not exist (404).
    fn get(&self, id: &str)
        -> impl Future<Output = Result<Option<TargetUser>, TargetError>> + Send;
    /// One page of all users (`start` is 1-based); an empty page ends the listing.
    fn list(
        &self,
        start: usize,
        count: usize,
    ) -> impl Future<Output = Result<(Vec<TargetUser>, usize), TargetError>> + Send;
    /// Whether the target answers at all (one cheap read): tells an LMS that is down from a
    /// failure of one user.
    fn reachable(&self) -> impl Future<Output = Result<(), TargetError>> + Send {
        async { self.list(1, 1).await.map(|_| ()) }
    }
    /// How many writes may usefully be in flight at once, when the target gathers them
    /// itself (SCIM bulk: its operations per request times the requests in flight); `None`:
    /// the configured concurrency.
    fn write_slots(&self) -> Option<usize> {
        None
    }
    /// Whether the LMS throttled lately (a 429, or a 503 with `Retry-After`, within the last
    /// minute): a write that took too long was then held up by the LMS, not by its user.
    fn throttling(&self) -> bool {
        false
    }
    /// Warnings gathered since the last call (e.g. a field this LMS never lets be cleared, or
    /// something learned about its dialect), at most one per user and field per run.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
}
