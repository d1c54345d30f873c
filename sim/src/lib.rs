//! In-process simulators of a Microsoft Graph tenant, a SCIM 2.0 LMS and an SMTP server.
//!
//! They follow the documented wire formats (see README), not this crate's client habits, and
//! serve tests, benchmarks and the `demo` command over real HTTP (and SMTP) on 127.0.0.1.

pub mod graph;
pub mod keys;
pub mod scim;
pub mod smtp;
