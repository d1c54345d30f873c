//! List-and-match: where the LMS cannot filter on an attribute, one paged listing of `/Users`
//! (startIndex/count, RFC 7644 §3.4.2.4) is kept as a compact map of userName and externalId
//! to LMS id — never the resources themselves — and lookups are answered from it.
//!
//! The listing is taken at most once per run (a run starts with `discover`), again when it is
//! older than [`MAX_AGE`], and again when a lookup misses after the LMS answered 409 to a
//! create since the listing was taken (the user exists, so the listing is stale). Users this
//! client creates are added to it as they are created.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A listing older than this is taken again before it is used.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(10 * 60);

/// Guard against servers whose paging never ends: at most this many users are listed.
pub(crate) const MAX_USERS: usize = 5_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub id: String,
    pub user_name: String,
    pub external_id: Option<String>,
}

#[derive(Debug)]
pub(crate) struct Listing {
    pub taken: Instant,
    /// The create conflicts (409) counted when the listing was taken.
    pub conflicts: u64,
    /// Folded (lowercase) userName → entries (more than one on case-sensitive servers).
    by_name: HashMap<String, Vec<Entry>>,
    /// externalId (case-exact) → LMS ids.
    by_external: HashMap<String, Vec<String>>,
    len: usize,
}

impl Listing {
    pub(crate) fn new(conflicts: u64) -> Self {
        Listing {
            taken: Instant::now(),
            conflicts,
            by_name: HashMap::new(),
            by_external: HashMap::new(),
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn insert(&mut self, e: Entry) {
        let bucket = self.by_name.entry(e.user_name.to_lowercase()).or_default();
        if bucket.iter().any(|x| x.id == e.id) {
            return;
        }
        if let Some(x) = &e.external_id {
            self.by_external
                .entry(x.clone())
                .or_default()
                .push(e.id.clone());
        }
        bucket.push(e);
        self.len += 1;
    }

    /// Entries whose userName equals `name` case-insensitively.
    pub(crate) fn by_user_name(&self, name: &str) -> &[Entry] {
        self.by_name
            .get(&name.to_lowercase())
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub(crate) fn by_external_id(&self, external_id: &str) -> &[String] {
        self.by_external
            .get(external_id)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Whether the listing may be used now (`conflicts`: the client's 409 count).
    pub(crate) fn fresh(&self, max_age: Duration) -> bool {
        self.taken.elapsed() < max_age
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_case_insensitively_and_external_ids_exactly() {
        let mut l = Listing::new(0);
        l.insert(Entry {
            id: "1".into(),
            user_name: "Ada@X".into(),
            external_id: Some("e1".into()),
        });
        l.insert(Entry {
            id: "2".into(),
            user_name: "ada@x".into(),
            external_id: None,
        });
        l.insert(Entry {
            id: "2".into(),
            user_name: "ada@x".into(),
            external_id: None,
        });
        assert_eq!(l.len(), 2);
        assert_eq!(l.by_user_name("ADA@x").len(), 2);
        assert_eq!(l.by_external_id("e1"), ["1".to_string()]);
        assert!(l.by_external_id("E1").is_empty());
        assert!(l.fresh(MAX_AGE));
    }
}
