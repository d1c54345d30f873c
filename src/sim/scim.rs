//! SCIM LMS simulator (being written).
