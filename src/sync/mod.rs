//! The sync core: mapping (pure), plan and guard (pure), full reconcile (effects).
//!
//! Architecture invariant: `mapping` and `plan` do no I/O; `reconcile` reaches Graph, the
//! target and the store only through `GraphClient`, the `Target` trait and `IntegrationStore`.

pub(crate) mod apply;
pub(crate) mod changes;
pub(crate) mod decide;
pub(crate) mod gate;
pub(crate) mod managers;
// The mapping is its own module below the config (which compiles it); the sync reads it here too.
pub use crate::mapping;
pub mod plan;
pub mod reconcile;
pub mod sync_user;
pub mod trace;
pub mod worker;

/// How old a confirming Graph read may be when a deactivation that rests on it is decided:
/// three quarters of a second, so that with the guard and the LMS write after it the answer is
/// still under a second old when the LMS sees the write (a loaded machine once took 10 ms past
/// a one-second bound between the two). Older answers (a slow Graph, other users' reads) may
/// no longer be the directory: the worker then waits for a fresh read in a later batch, the
/// reconcile reads again or leaves the user to the worker and the next run.
pub(crate) const FRESH_READ_MAX_AGE: std::time::Duration = std::time::Duration::from_millis(750);

/// How many times a confirming read that came too slowly is repeated at once.
pub(crate) const FRESH_READ_RETRIES: usize = 2;
