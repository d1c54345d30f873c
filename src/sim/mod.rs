//! In-process simulators of a Microsoft Graph tenant and a SCIM 2.0 LMS.
//!
//! They follow the documented wire formats (see README), not this crate's client habits, and
//! serve tests, benchmarks and the `demo` command over real HTTP on 127.0.0.1.

pub mod graph;
pub mod keys;
pub mod scim;
