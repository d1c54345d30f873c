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
