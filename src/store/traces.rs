//! Decision traces: `<integration>/traces` holds each user's last trace (key: Entra object id),
//! `<integration>/trace_names` names it can be found by that the user index cannot answer (key:
//! lower-cased UPN or userName, value: Entra id), so `explain` and `/status` find a user by
//! object id, UPN or userName without a Graph call. One trace per user is kept: the store grows
//! with the roster, not with the number of runs.
//!
//! `<integration>/trace_skips` lists the users whose last trace is a skip (a disabled member
//! never created): a reconcile asks it for each such member to record the skip once, and a
//! tree of bare keys costs far less to read than the traces themselves.
//!
//! An applied change's mapped values are exactly the record it wrote to the user index (the
//! caller writes the index entries first), and a later change of that record always comes with
//! a new trace: such a trace is stored without them (value prefixed `I`) and completed from the
//! index when read (a reconcile hands such a trace over without them in the first place:
//! `Trace::mapped_in_index`). A first reconcile of many users then writes less than half the
//! bytes, and storing reads nothing but the small skip list (and only when it holds any).

use std::collections::HashSet;

use serde::Deserialize;

use super::{decode, encode, IndexEntry, IntegrationStore, StoreError, Writes};
use crate::model::change::Action;
use crate::model::trace::{Answer, Outcome, Trace};

/// Marks a stored trace whose mapped values are the index entry's record.
const MAPPED_IN_INDEX: u8 = b'I';

/// Whether a trace's mapped values are exactly the index entry written with it: an applied
/// change (the LMS said ok) writes, as its record, exactly the mapped values (before clipping,
/// which reading repeats). A departure was not mapped.
fn mapped_is_index(t: &Trace) -> bool {
    matches!(t.answer, Some(Answer::Ok { .. })) && (t.mapped.is_some() || t.mapped_in_index)
}

impl IntegrationStore {
    /// Writes index entries, then the traces of the decisions that produced them (and any
    /// others). The traces tell which entries are creates: those are written without first
    /// reading what they replace (`write_entries`).
    pub(crate) fn put_changes(
        &self,
        entries: &[(String, IndexEntry)],
        traces: Vec<Trace>,
    ) -> Result<(), StoreError> {
        {
            let creates: HashSet<&str> = traces
                .iter()
                .filter(|t| {
                    mapped_is_index(t)
                        && t.plan.as_ref().is_some_and(|p| p.action == Action::Create)
                })
                .map(|t| t.entra_id.as_str())
                .collect();
            self.write_entries(entries, &creates)?;
        }
        self.put_traces(traces)
    }

    /// Stores each trace as its user's last one (after the index entries it goes with), and the
    /// names it can be found by that the index does not hold.
    pub(crate) fn put_traces(&self, traces: Vec<Trace>) -> Result<(), StoreError> {
        if traces.is_empty() {
            return Ok(());
        }
        let mut batch = Writes::default();
        let mut names = Writes::default();
        let mut skips = Writes::default();
        let skipped_before = !self.trace_skips.is_empty();
        for mut t in traces {
            if t.outcome == Outcome::Skipped {
                skips.insert(t.entra_id.as_bytes(), &[][..]);
            } else if skipped_before && self.trace_skips.contains_key(t.entra_id.as_bytes())? {
                skips.remove(t.entra_id.as_bytes());
            }
            // An applied change (the LMS said ok) was just written to the index with its
            // userName and, when mapped, exactly the mapped values as its record: neither
            // needs storing twice.
            let applied = matches!(t.answer, Some(Answer::Ok { .. }));
            let user_name = t.user_name.as_deref().map(str::to_lowercase);
            let upn = t.upn.as_deref().map(str::to_lowercase);
            if let Some(n) = user_name.as_ref().filter(|_| !applied) {
                names.insert(n.as_bytes(), t.entra_id.as_bytes());
            }
            if let Some(n) = upn.as_ref().filter(|u| Some(*u) != user_name.as_ref()) {
                names.insert(n.as_bytes(), t.entra_id.as_bytes());
            }
            let in_index = mapped_is_index(&t);
            let value = if in_index {
                t.mapped = None;
                t.mapped_in_index = false;
                let mut v = vec![MAPPED_IN_INDEX];
                v.extend(encode(&t)?);
                v
            } else {
                encode(&t)?
            };
            batch.insert(t.entra_id.as_bytes(), value);
        }
        names.apply(&self.trace_names)?;
        batch.apply(&self.traces)?;
        skips.apply(&self.trace_skips)?;
        Ok(())
    }

    /// Whether the user's last trace is a skip.
    pub(crate) fn trace_is_skip(&self, entra_id: &str) -> Result<bool, StoreError> {
        Ok(self.trace_skips.contains_key(entra_id.as_bytes())?)
    }

    /// The last decision recorded for a user (by Entra object id).
    pub fn trace(&self, entra_id: &str) -> Result<Option<Trace>, StoreError> {
        let tree = format!("{}/traces", self.name);
        for key in [entra_id.to_string(), entra_id.to_lowercase()] {
            let Some(v) = self.traces.get(key.as_bytes())? else {
                continue;
            };
            let (in_index, json) = match v.split_first() {
                Some((&MAPPED_IN_INDEX, rest)) => (true, rest),
                _ => (false, &v[..]),
            };
            let mut t: Trace = decode(&tree, key.as_bytes(), json)?;
            if in_index {
                if let Some(e) = self.get_user(&t.entra_id)? {
                    t.mapped(&e.record);
                }
            }
            return Ok(Some(t));
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
    /// a trace was recorded under that the index does not hold, or else the userName of an
    /// index entry. The last is a scan of the index reading only userNames (about 0.1 s per
    /// 100,000 users): fine for a CLI question, and it spares a name entry per synced user.
    pub(crate) fn resolve_user(&self, key: &str) -> Result<Option<String>, StoreError> {
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

    /// How many traces are stored (tests).
    pub fn trace_count(&self) -> usize {
        self.traces.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::model::change::{Action, PlannedChange};
    use crate::model::record::{AttrValue, Record};
    use crate::model::trace::{Match, Source, Trace};
    use crate::model::IntegrationName;
    use crate::store::IndexEntry;

    use crate::store::tests::store_a;

    /// User u1 "ada@x" with a title: the record, its index entry (LMS id t1) and its create.
    fn ada(manager: Option<&str>) -> (Record, IndexEntry, PlannedChange) {
        let mut record = Record::new();
        record.insert("title".into(), AttrValue::Str("Engineer".into()));
        let entry = IndexEntry {
            target_id: "t1".into(),
            user_name: "ada@x".into(),
            record: record.clone(),
            manager: manager.map(str::to_string),
            linked: false,
            updated_at: chrono::Utc::now(),
        };
        let c = PlannedChange {
            action: Action::Create,
            entra_id: "u1".into(),
            user_name: "ada@x".into(),
            target_id: None,
            changes: Vec::new(),
            reason: None,
            record: record.clone(),
            manager: manager.map(str::to_string),
            linked: false,
        };
        (record, entry, c)
    }

    #[test]
    fn an_applied_changes_mapped_values_are_read_back_from_the_index() {
        let (_s, a) = store_a();
        let (record, entry, c) = ada(None);
        a.put_user("u1", &entry).unwrap();
        let mut t = Trace::new("a", Source::Reconcile, "r1", "u1");
        t.user(None, Some("ada@x"))
            .mapped(&record)
            .plan(&c)
            .applied(
                &c,
                &Match::Created {
                    target_id: "t1".into(),
                },
            );
        a.put_traces(vec![t.clone()]).unwrap();
        let raw = a.traces.get(b"u1").unwrap().unwrap();
        assert_eq!(raw[0], b'I', "stored without the mapped values");
        assert!(!String::from_utf8_lossy(&raw).contains("Engineer"));
        assert_eq!(a.trace("u1").unwrap(), Some(t.clone()));
        // Its names are the index's: no name entry.
        assert_eq!(a.trace_names.len(), 0);
        assert_eq!(a.trace_by_name("ADA@x").unwrap(), Some(t));

        // An applied departure (not mapped) is stored whole, and its userName is the index's
        // too: no name entry either.
        let d = PlannedChange {
            action: Action::Deactivate,
            ..c.clone()
        };
        let mut gone = Trace::new("a", Source::Reconcile, "r1b", "u1");
        gone.user(Some("ada@x"), None).plan(&d).applied(
            &d,
            &Match::Index {
                target_id: "t1".into(),
            },
        );
        a.put_traces(vec![gone.clone()]).unwrap();
        assert_ne!(a.traces.get(b"u1").unwrap().unwrap()[0], b'I');
        assert_eq!(a.trace_names.len(), 0);
        assert_eq!(a.trace("u1").unwrap(), Some(gone));

        // A failure keeps its own values.
        let mut f = Trace::new("a", Source::Reconcile, "r2", "u1");
        f.mapped(&record).plan(&c).failed("409", true);
        a.put_traces(vec![f.clone()]).unwrap();
        assert_ne!(a.traces.get(b"u1").unwrap().unwrap()[0], b'I');
        assert_eq!(a.trace("u1").unwrap(), Some(f));
    }

    #[test]
    fn changes_write_entries_links_and_traces_and_a_create_replacing_an_entry_drops_its_link() {
        let (_s, a) = store_a();
        let (record, entry, c) = ada(Some("m1"));
        // A skip recorded earlier is cleared by the applied change.
        let mut skip = Trace::new("a", Source::Reconcile, "r0", "u1");
        skip.skipped("disabled");
        a.put_traces(vec![skip]).unwrap();
        assert!(a.trace_is_skip("u1").unwrap());

        // Handed over without a copy of its mapped values (`mapped_in_index`), a create's
        // trace reads back with them.
        let mut t = Trace::new("a", Source::Reconcile, "r1", "u1");
        t.user(None, Some("Ada.Upn@x")).plan(&c).applied(
            &c,
            &Match::Created {
                target_id: "t1".into(),
            },
        );
        t.mapped_in_index = true;
        let mut other = Trace::new("a", Source::Reconcile, "r1", "u9");
        other.user(Some("nine@x"), None).failed("409", true);
        a.put_changes(
            &[("u1".into(), entry.clone())],
            vec![t.clone(), other.clone()],
        )
        .unwrap();
        t.mapped_in_index = false;
        t.mapped(&record);
        assert_eq!(a.get_user("u1").unwrap(), Some(entry.clone()));
        assert_eq!(a.reports_of("m1").unwrap(), vec!["u1".to_string()]);
        assert_eq!(a.trace("u1").unwrap(), Some(t.clone()));
        assert_eq!(a.trace("u9").unwrap(), Some(other));
        assert!(!a.trace_is_skip("u1").unwrap());
        assert_eq!(a.trace_by_name("ada.upn@X").unwrap(), Some(t));

        // An entry rewritten with another manager moves the link.
        let mut moved = entry.clone();
        moved.manager = Some("m2".into());
        a.put_users(&[("u1".into(), moved.clone())]).unwrap();
        assert_eq!(a.get_user("u1").unwrap(), Some(moved));
        assert_eq!(a.reports_of("m2").unwrap(), vec!["u1".to_string()]);
        assert!(a.reports_of("m1").unwrap().is_empty());

        // A create over an entry (a re-create after the LMS user was deleted) is written
        // without reading the entry first: the link it replaced still goes.
        let mut t2 = Trace::new("a", Source::Reconcile, "r2", "u1");
        t2.user(Some("ada@x"), None)
            .mapped(&record)
            .plan(&c)
            .applied(
                &c,
                &Match::Created {
                    target_id: "t1".into(),
                },
            );
        a.put_changes(&[("u1".into(), entry)], vec![t2.clone()])
            .unwrap();
        assert_eq!(a.trace("u1").unwrap(), Some(t2));
        assert_eq!(a.reports_of("m1").unwrap(), vec!["u1".to_string()]);
        assert!(a.reports_of("m2").unwrap().is_empty());
    }

    #[test]
    fn traces_are_found_by_id_upn_and_username_and_stay_per_integration() {
        let (s, a) = store_a();
        let b = s
            .integration(&IntegrationName::parse("b").unwrap())
            .unwrap();
        let mut t = Trace::new("a", Source::Reconcile, "r1", "u1");
        t.user(Some("Ada@X.example"), Some("ada.upn@x.example"));
        a.put_traces(vec![t.clone()]).unwrap();
        assert_eq!(a.trace("u1").unwrap(), Some(t.clone()));
        assert_eq!(a.trace_by_name("ada@x.example").unwrap(), Some(t.clone()));
        assert_eq!(
            a.trace_by_name("ADA.UPN@x.example").unwrap(),
            Some(t.clone())
        );
        assert_eq!(b.trace("u1").unwrap(), None);
        assert_eq!(a.trace_count(), 1);
        assert!(!a.trace_is_skip("u1").unwrap());
        let mut skip = Trace::new("a", Source::Reconcile, "r2", "u1");
        skip.skipped("disabled");
        a.put_traces(vec![skip]).unwrap();
        assert!(a.trace_is_skip("u1").unwrap());
        a.put_traces(vec![t.clone()]).unwrap();
        assert!(!a.trace_is_skip("u1").unwrap());

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
