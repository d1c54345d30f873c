//! Decision traces: `<integration>/traces` holds each user's last trace (key: Entra object id),
//! `<integration>/trace_names` the names it was recorded under (key: lower-cased userName or UPN,
//! value: Entra id), so `explain` and `/status` find a user by object id, UPN or userName
//! without a Graph call. One trace per user is kept: the store grows with the roster, not with
//! the number of runs.

use serde::Deserialize;

use super::{decode, encode, IntegrationStore, StoreError};
use crate::sync::trace::Trace;

impl IntegrationStore {
    /// Stores each trace as its user's last one, and the names it can be found by.
    pub fn put_traces(&self, traces: &[Trace]) -> Result<(), StoreError> {
        if traces.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let mut names = sled::Batch::default();
        for t in traces {
            batch.insert(t.entra_id.as_bytes(), encode(t)?);
            for n in [&t.user_name, &t.upn].into_iter().flatten() {
                names.insert(n.to_lowercase().as_bytes(), t.entra_id.as_bytes());
            }
        }
        self.trace_names.apply_batch(names)?;
        self.traces.apply_batch(batch)?;
        Ok(())
    }

    /// The last decision recorded for a user (by Entra object id).
    pub fn trace(&self, entra_id: &str) -> Result<Option<Trace>, StoreError> {
        let tree = format!("{}/traces", self.name);
        for key in [entra_id.to_string(), entra_id.to_lowercase()] {
            if let Some(v) = self.traces.get(key.as_bytes())? {
                return Ok(Some(decode(&tree, key.as_bytes(), &v)?));
            }
        }
        Ok(None)
    }

    /// The last decision recorded for a user given by object id, UPN or userName.
    pub fn trace_by_name(&self, key: &str) -> Result<Option<Trace>, StoreError> {
        match self.resolve_user(key)? {
            Some(id) => self.trace(&id),
            None => Ok(None),
        }
    }

    /// The Entra id a key names: an object id with a trace or index entry, a UPN or userName
    /// a trace was recorded under, or else the userName of an index entry. The last is a scan of
    /// the index (reading only userNames), for users synced before traces were kept and
    /// unchanged since: fine for a CLI question, and the trace names answer everyone else.
    pub fn resolve_user(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.trim();
        if key.is_empty() {
            return Ok(None);
        }
        for id in [key.to_string(), key.to_lowercase()] {
            if self.traces.contains_key(id.as_bytes())? || self.users.contains_key(id.as_bytes())? {
                return Ok(Some(id));
            }
        }
        let lower = key.to_lowercase();
        if let Some(v) = self.trace_names.get(lower.as_bytes())? {
            return Ok(Some(String::from_utf8_lossy(&v).into_owned()));
        }
        #[derive(Deserialize)]
        struct NameOnly {
            user_name: String,
        }
        for r in self.users.iter() {
            let (k, v) = r?;
            if let Ok(e) = serde_json::from_slice::<NameOnly>(&v) {
                if e.user_name.to_lowercase() == lower {
                    return Ok(Some(String::from_utf8_lossy(&k).into_owned()));
                }
            }
        }
        Ok(None)
    }

    /// How many traces are stored (tests, `/status`).
    pub fn trace_count(&self) -> usize {
        self.traces.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::config::IntegrationName;
    use crate::store::{IndexEntry, Store};
    use crate::sync::mapping::Record;
    use crate::sync::trace::{Source, Trace};

    #[test]
    fn traces_are_found_by_id_upn_and_username_and_stay_per_integration() {
        let s = Store::temporary().unwrap();
        let a = s
            .integration(&IntegrationName::parse("a").unwrap())
            .unwrap();
        let b = s
            .integration(&IntegrationName::parse("b").unwrap())
            .unwrap();
        let mut t = Trace::new("a", Source::Reconcile, "r1", "u1");
        t.user(Some("Ada@X.example"), Some("ada.upn@x.example"));
        a.put_traces(&[t.clone()]).unwrap();
        assert_eq!(a.trace("u1").unwrap(), Some(t.clone()));
        assert_eq!(a.trace_by_name("ada@x.example").unwrap(), Some(t.clone()));
        assert_eq!(a.trace_by_name("ADA.UPN@x.example").unwrap(), Some(t));
        assert_eq!(b.trace("u1").unwrap(), None);
        assert_eq!(a.trace_count(), 1);

        // An indexed user without a trace is found by its userName (scan).
        a.put_user(
            "u2",
            &IndexEntry {
                target_id: "t2".into(),
                user_name: "grace@x.example".into(),
                record: Record::new(),
                manager: None,
                linked: false,
                updated_at: chrono::Utc::now(),
            },
        )
        .unwrap();
        assert_eq!(
            a.resolve_user("Grace@X.example").unwrap().as_deref(),
            Some("u2")
        );
        assert_eq!(a.resolve_user("u2").unwrap().as_deref(), Some("u2"));
        assert_eq!(a.resolve_user("nobody@x.example").unwrap(), None);
        assert_eq!(a.resolve_user("  ").unwrap(), None);
    }
}
