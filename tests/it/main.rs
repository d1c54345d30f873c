//! The integration tests, one binary (one link instead of one per file): each module drives
//! the real service against the in-repo Graph and SCIM simulators as a tenant would.
//! `cargo test --test it <module>::` runs one module; the differential harness
//! (`tests/differential.rs`) is a binary of its own, run alone for its timing bounds.

mod common;

mod alerts;
mod architecture;
mod bulk;
mod cli;
mod credentials;
mod dialects;
mod hardening;
mod incremental;
mod live_during_reconcile;
mod operate;
mod pace;
mod reconcile;
mod serve;
mod sim_graph;
mod sim_graph_cost;
mod sim_graph_delta;
mod sim_graph_notify;
mod sim_scim;
mod tls;
mod trace;
