//! rostersync keeps an LMS user roster (SCIM 2.0) in step with Microsoft Entra ID groups.
//!
//! # Layout
//! - [`config`]: typed TOML configuration; secrets resolved from env, file or value.
//! - [`graph`]: Microsoft Graph client (token, retrying HTTP core, members, managers).
//! - [`target`]: the [`target::Target`] trait and its SCIM 2.0 implementation.
//! - [`store`]: sled-backed state (user index, run history), keys per integration.
//! - [`sync`]: mapping, plan (pure), guard (pure), full reconcile (effects).
//! - [`alert`]: alerts by e-mail and webhook, through a durable outbox with deduplication.
//! - [`ops`]: operator commands (queue, subscriptions, one user) as documents, run by the CLI
//!   or, while `serve` holds the store, by `serve` through its admin API.
//! - [`sim`]: in-process Graph tenant and SCIM LMS simulators for tests, benches and `demo`.
//!
//! Architecture notes live in `ARCHITECTURE.md`.

pub mod alert;
pub mod app;
pub mod config;
pub mod demo;
#[cfg(test)]
mod fuzz;
pub mod graph;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod output;
pub mod redact;
pub mod retry;
pub mod serve;
pub mod sim;
pub mod store;
pub mod sync;
pub mod target;
pub mod text;
pub mod webhook;
