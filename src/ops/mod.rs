//! Operator commands on one integration — its notification queue, its Graph subscriptions, one
//! user — as documents: what the command found or did, serializable both ways and rendered by
//! one function each. The CLI runs a command on the store itself when it can open it, and asks
//! the running `serve` through its admin API (`http::ops`, [`client`]) when `serve` holds it;
//! either way it prints the same document the same way.
//!
//! Owns the documents, their text, the store-level operations, the admin API's paths, request
//! and error bodies, and its client. It knows no HTTP server and nothing of `serve`'s tasks:
//! the operations that need live clients and locks (subscriptions, `sync-user`, a replay's
//! wake-up) are behind [`Serving`], which `serve` implements.

pub mod client;
pub mod queue;
pub mod subscriptions;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::sync::trace::Trace;

/// Longest user key (object id, UPN or userName) an admin request may carry.
pub(crate) const MAX_USER_KEY: usize = 256;
/// Largest admin request body, in bytes.
pub(crate) const MAX_REQUEST_BYTES: usize = 4096;

/// The admin API's error body: what went wrong, and a stable code the client acts on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub error: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No `server.admin_token`: the admin API is off.
    Disabled,
    /// The request did not carry the admin token.
    Unauthorized,
    UnknownIntegration,
    BadRequest,
    /// `sync-user`: neither Entra nor the store knows the user.
    UserNotFound,
    /// The integration's run lock stayed taken (a long full reconcile): try again later.
    Busy,
    /// The integration has not finished starting, or `serve` is stopping.
    Unavailable,
    /// The command failed (Graph, the LMS or the store); `error` says why.
    Failed,
    /// Anything this client does not know (a newer server).
    #[serde(other)]
    Other,
}

/// `POST …/sync-user`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncUserRequest {
    pub user: String,
    #[serde(default)]
    pub dry_run: bool,
}

/// The admin API's paths, relative to serve's base URL; the integration name is a path
/// segment (names are lower-case letters, digits and `-`, so it needs no encoding).
pub(crate) mod paths {
    pub(crate) fn queue(integration: &str) -> String {
        format!("/admin/{integration}/queue")
    }
    pub(crate) fn dead(integration: &str) -> String {
        format!("/admin/{integration}/queue/dead")
    }
    pub(crate) fn replay(integration: &str) -> String {
        format!("/admin/{integration}/queue/replay")
    }
    pub(crate) fn subscriptions(integration: &str) -> String {
        format!("/admin/{integration}/subscriptions")
    }
    pub(crate) fn renew(integration: &str) -> String {
        format!("/admin/{integration}/subscriptions/renew")
    }
    pub(crate) fn delete(integration: &str) -> String {
        format!("/admin/{integration}/subscriptions/delete")
    }
    pub(crate) fn explain(integration: &str) -> String {
        format!("/admin/{integration}/explain")
    }
    pub(crate) fn sync_user(integration: &str) -> String {
        format!("/admin/{integration}/sync-user")
    }
}

/// The operations that need `serve`'s live state: its Graph and LMS clients, its worker's
/// run lock, its subscription lock, the wake-up of its worker. `serve` implements this; the
/// admin API (`http::admin`) calls it after checking the token. Errors are [`ApiError`]s
/// whose text carries no secret.
pub(crate) trait Serving: Send + Sync {
    /// `queue replay`, then wakes the worker.
    fn replay<'a>(
        &'a self,
        integration: &'a str,
        req: queue::ReplayRequest,
    ) -> BoxFuture<'a, Result<queue::ReplayDoc, ApiError>>;
    /// `subscriptions list|renew|delete`, one at a time with serve's own renewals.
    fn subscriptions<'a>(
        &'a self,
        integration: &'a str,
        cmd: subscriptions::SubsCommand,
    ) -> BoxFuture<'a, Result<subscriptions::SubsAnswer, ApiError>>;
    /// `sync-user`, under the integration's run lock (never beside a batch or a reconcile).
    fn sync_user<'a>(
        &'a self,
        integration: &'a str,
        req: SyncUserRequest,
    ) -> BoxFuture<'a, Result<Trace, ApiError>>;
}

impl ApiError {
    pub(crate) fn new(code: ErrorCode, error: impl Into<String>) -> ApiError {
        ApiError {
            code,
            error: error.into(),
        }
    }
}

/// An error with its sources, as one line (`outer: inner: …`, a source its parent already
/// quotes left out).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = c.source();
    }
    s
}
