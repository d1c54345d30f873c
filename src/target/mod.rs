//! The LMS side: a small [`Target`] trait and its SCIM 2.0 implementation.
//!
//! The trait speaks the neutral record vocabulary of `sync::mapping` (keys such as
//! `emails.work`); only `target::scim` knows SCIM JSON. Every operation is idempotent: the sync
//! looks up by externalId before it creates, and deactivation is an update of `active`.

pub mod scim;

use std::future::Future;

use crate::sync::mapping::{AttrChange, Record};

#[derive(Debug, thiserror::Error)]
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
}

impl TargetError {
    /// Errors that may concern the whole target rather than one user (the LMS down, the token
    /// refused): whoever meets one probes the target before blaming the user.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            TargetError::Unauthorized | TargetError::Transport { .. }
        ) || matches!(self, TargetError::Http { status, .. } if *status >= 500)
    }

    /// Whether a write that ended in this error may still have been applied (no answer, a
    /// server error, an unreadable answer): its outcome must be read back from the LMS.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            TargetError::Transport { .. } | TargetError::Decode { .. } => true,
            TargetError::Http { status, .. } => *status >= 500 || *status == 408,
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

/// What the target can take, learnt from its discovery documents.
#[derive(Clone, Debug, Default)]
pub struct Capabilities {
    /// Whether the target served its schemas (otherwise core + enterprise are assumed).
    pub discovered: bool,
    pub enterprise: bool,
    /// Attribute names of the custom extension, when the target declares it.
    pub custom_attributes: Option<Vec<String>>,
    pub patch: bool,
    pub filter: bool,
    /// Human-readable notes from discovery (for `check`).
    pub notes: Vec<String>,
}

impl Capabilities {
    /// Whether a record key can be sent to this target.
    pub fn accepts(&self, key: &str) -> bool {
        if key.starts_with("enterprise.") {
            return self.enterprise;
        }
        if let Some(name) = key.strip_prefix("custom.") {
            return self
                .custom_attributes
                .as_ref()
                .is_some_and(|a| a.iter().any(|n| n.eq_ignore_ascii_case(name)));
        }
        true
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
    /// Applies attribute changes to an existing user; never called with no change.
    fn update(
        &self,
        id: &str,
        changes: &[AttrChange],
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
}
