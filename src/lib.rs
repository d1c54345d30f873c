//! rostersync keeps an LMS user roster (SCIM 2.0) in step with Microsoft Entra ID groups.
//!
//! # Layout
//! - [`config`]: typed TOML configuration; secrets resolved from env, file or value.
//! - [`graph`]: Microsoft Graph client (token, retrying HTTP core, members, managers, delta,
//!   subscriptions).
//! - [`lms`]: the [`lms::Target`] trait and its SCIM 2.0 implementation (dialect, probe).
//! - [`store`]: sled-backed state per integration (user index, queue, intents, traces, runs,
//!   subscriptions) and the webhook journal.
//! - [`sync`]: mapping and decisions (pure), planning, the full reconcile and the incremental
//!   worker (effects).
//! - [`webhook`]: the Graph webhook endpoints (handshake, notifications, `validationTokens`).
//! - [`serve`]: the long-running process (subscriptions, worker, scheduler, health).
//! - [`http`]: health, readiness, status and metrics endpoints, and the admin API of the
//!   operator commands.
//! - [`alert`]: alerts by e-mail and webhook, through a durable outbox with deduplication.
//! - [`ops`]: operator commands (queue, subscriptions, one user) as documents, run by the CLI
//!   or, while `serve` holds the store, by `serve` through its admin API.
//! - [`app`]: one [`app::Integration`] per configured integration, wired from the config.
//! - [`retry`], [`redact`], [`text`], [`logging`], [`metrics`], [`output`]: one retry
//!   primitive, one secret scrubber, text helpers, log hygiene, metrics, terminal rendering.
//! - `demo` (cargo feature `demo`, on by default): the no-tenant walkthrough on the in-process
//!   Graph, SCIM and SMTP simulators of the workspace's `rostersync-sim` crate (`sim/`), which
//!   the tests and benches use too.
//!
//! Architecture notes live in `ARCHITECTURE.md`; the Graph and SCIM facts the code relies on
//! in `docs/`.

pub mod alert;
pub mod app;
pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
#[cfg(test)]
mod fuzz;
pub mod graph;
pub mod http;
pub mod lms;
pub mod logging;
pub mod mapping;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod output;
pub mod redact;
pub mod retry;
pub mod serve;
pub mod store;
pub mod sync;
pub mod text;
pub mod webhook;
