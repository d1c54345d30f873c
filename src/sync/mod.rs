//! The sync core: mapping (pure), plan and guard (pure), full reconcile (effects).
//!
//! Architecture invariant: `mapping` and `plan` do no I/O; `reconcile` reaches Graph, the
//! target and the store only through `GraphClient`, the `Target` trait and `IntegrationStore`.

pub mod apply;
pub mod changes;
pub mod decide;
pub mod gate;
pub mod managers;
pub mod mapping;
pub mod plan;
pub mod reconcile;
pub mod sync_user;
pub mod trace;
pub mod worker;

/// The longest a confirming Graph read may take for a deactivation to rest on it. Answers that
/// took longer (inner 429s retried after their `Retry-After`, a slow Graph) may be older than
/// the directory by the time they would be written: the worker then waits for a fresh read in
/// a later batch, the reconcile reads again or leaves the user to the next run.
pub(crate) const FRESH_READ_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// How many times a confirming read that came too slowly is repeated at once.
pub(crate) const FRESH_READ_RETRIES: usize = 2;
