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
//!
//! A reconcile's plain creates go further: their traces differ only in what the index entry
//! already holds (userName, LMS id, mapped values, and the time, up to the LMS's answer time)
//! and in the UPN. Such a trace is not stored at all: the entry carries a small [`TraceRef`]
//! (the key of the trace's shape, and the UPN when it is not the userName) and
//! `<integration>/trace_shapes` keeps the shape once for all the users it stands for (the run,
//! the group, the plan, the outcome). A first reconcile of 100,000 members then writes no trace per user: 20-30 MiB less at its
//! peak (docs/performance.md). A user has one or the other: the trace a reference replaces is
//! removed once the entry is written, and a referred trace is stored whole before its entry is
//! rewritten without a trace of its own or removed, so a later entry's userName or LMS id never
//! shows in an older decision. Should a crash leave both, `trace` reads the later decision.
//! Shapes no entry refers to any more are removed after a reconcile once there are many
//! ([`IntegrationStore::prune_trace_shapes`]).

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};

use chrono::DateTime;
use serde::Deserialize;

use super::{decode, encode, IndexEntry, IntegrationStore, StoreError, TraceRef, Writes};
use crate::model::change::Action;
use crate::model::trace::{Answer, Match, Outcome, Source, Trace};

/// Shapes kept before a reconcile looks for unused ones, and the meta key saying how many
/// were left by the last look (the next comes when their number has doubled).
const SHAPES_BEFORE_PRUNING: usize = 64;
const SHAPES_KEPT: &str = "trace_shapes_kept";

/// A shape's key: FNV-1a (32 bits) of its encoding. Defined here rather than taken from the
/// standard library so that it stays the same across builds; two shapes with one key are told
/// apart by their bytes (the second is then stored as a whole trace).
fn shape_key(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// For a reconcile's plain create applied as `e`: what is left of its trace once what the entry
/// holds (userName, LMS id, mapped values, time) and the UPN are taken out, and the UPN when it
/// is not the userName (the reference carries it). None for any other trace.
fn shape_of(t: &Trace, e: &IndexEntry) -> Option<(Trace, Option<String>)> {
    let is_target = |id: &String| *id == e.target_id;
    let plain = t.source == Source::Reconcile
        && !t.dry_run
        && t.outcome == Outcome::Created
        && t.note.is_none()
        && matches!(&t.answer, Some(Answer::Ok { target_id }) if is_target(target_id))
        && matches!(&t.matched, Match::Created { target_id } if is_target(target_id))
        && mapped_is_index(t)
        && t.user_name.as_deref() == Some(e.user_name.as_str())
        && t.plan
            .as_ref()
            .is_some_and(|p| p.action == Action::Create && p.changes.is_empty() && p.omitted == 0);
    let upn = t.upn.as_ref().filter(|_| plain)?;
    let shape = Trace {
        at: DateTime::UNIX_EPOCH,
        entra_id: String::new(),
        user_name: None,
        upn: None,
        matched: Match::Created {
            target_id: String::new(),
        },
        answer: Some(Answer::Ok {
            target_id: String::new(),
        }),
        mapped: None,
        mapped_omitted: 0,
        mapped_in_index: false,
        ..t.clone()
    };
    Some((shape, (*upn != e.user_name).then(|| upn.clone())))
}

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
    ///
    /// A reconcile's plain creates get a reference to their trace's shape in their entry
    /// instead of a stored trace (module doc).
    pub(crate) fn put_changes(
        &self,
        entries: &mut [(String, IndexEntry)],
        traces: Vec<Trace>,
    ) -> Result<(), StoreError> {
        let (shared, stale) = self.share_traces(entries, &traces)?;
        {
            let creates: HashSet<&str> = traces
                .iter()
                .filter(|t| {
                    mapped_is_index(t)
                        && t.plan.as_ref().is_some_and(|p| p.action == Action::Create)
                })
                .map(|t| t.entra_id.as_str())
                .collect();
            let traced: HashSet<&str> = traces.iter().map(|t| t.entra_id.as_str()).collect();
            self.write_entries(entries, &creates, &traced)?;
        }
        // The traces the references replace go once the entries are written (until then, and
        // after a crash, `trace` reads the later of the two).
        stale.apply(&self.traces)?;
        self.store_traces(traces, &shared)
    }

    /// Puts a reference in the entry of each plain create among `traces` (`shape_of`: the
    /// user's last trace in the batch, and its last entry) and writes the shapes referred to.
    /// Returns whose traces the entries now hold, and the removal of the traces those users had
    /// stored before.
    fn share_traces(
        &self,
        entries: &mut [(String, IndexEntry)],
        traces: &[Trace],
    ) -> Result<(HashSet<String>, Writes), StoreError> {
        let mut shared = HashSet::new();
        let mut stale = Writes::default();
        // Each user's last trace, when it is a reconcile's create.
        let mut last: HashMap<&str, &Trace> = HashMap::new();
        for t in traces {
            last.insert(t.entra_id.as_str(), t);
        }
        last.retain(|_, t| t.source == Source::Reconcile && t.outcome == Outcome::Created);
        if last.is_empty() {
            return Ok((shared, stale));
        }
        // Each key's shape, as stored or about to be.
        let mut known: HashMap<u32, Vec<u8>> = HashMap::new();
        let mut shapes = Writes::default();
        let traces_stored = !self.traces.is_empty();
        // The last entry of a user is the one that stays.
        let mut entered: HashSet<&str> = HashSet::new();
        for (id, e) in entries.iter_mut().rev() {
            let id: &String = id;
            if !entered.insert(id) {
                continue;
            }
            let Some(t) = last.get(id.as_str()) else {
                continue;
            };
            let Some((shape, upn)) = shape_of(t, e) else {
                continue;
            };
            let bytes = encode(&shape)?;
            let key = shape_key(&bytes);
            let stored = match known.entry(key) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => match self.trace_shapes.get(key.to_be_bytes())? {
                    Some(s) => v.insert(s.to_vec()),
                    None => {
                        shapes.insert(key.to_be_bytes(), bytes.clone());
                        v.insert(bytes.clone())
                    }
                },
            };
            if *stored != bytes {
                continue; // another shape has this key: stored whole
            }
            e.trace = Some(TraceRef::new(key, upn));
            if traces_stored && self.traces.contains_key(id.as_bytes())? {
                stale.remove(id.as_bytes());
            }
            shared.insert(id.clone());
        }
        shapes.apply(&self.trace_shapes)?;
        Ok((shared, stale))
    }

    /// Stores each trace as its user's last one (after the index entries it goes with), and the
    /// names it can be found by that the index does not hold.
    pub(crate) fn put_traces(&self, traces: Vec<Trace>) -> Result<(), StoreError> {
        self.store_traces(traces, &HashSet::new())
    }

    /// [`Self::put_traces`]; the traces of `shared` are held by their index entries (only their
    /// names and the skip list are written).
    fn store_traces(&self, traces: Vec<Trace>, shared: &HashSet<String>) -> Result<(), StoreError> {
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
            if shared.contains(&t.entra_id) {
                continue;
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

    /// The last decision recorded for a user (by Entra object id): the stored trace or the one
    /// the index entry refers to, whichever was decided later (the stored one on a tie). Normally
    /// only one of them exists (the store removes a trace its reference replaces, and stores a
    /// referred trace whole before its entry is rewritten or removed); a crash in between can
    /// leave both.
    pub fn trace(&self, entra_id: &str) -> Result<Option<Trace>, StoreError> {
        for key in [entra_id.to_string(), entra_id.to_lowercase()] {
            let entry = self.get_user(&key)?;
            let referred = match &entry {
                Some(e) => self.rebuild(&key, e)?,
                None => None,
            };
            match (self.stored_trace(&key, entry.as_ref())?, referred) {
                (Some(s), Some(r)) => return Ok(Some(if r.at > s.at { r } else { s })),
                (Some(t), None) | (None, Some(t)) => return Ok(Some(t)),
                (None, None) => {}
            }
        }
        Ok(None)
    }

    /// The trace stored for `key`, with its mapped values read from `entry` (the user's index
    /// entry) when they were left out.
    fn stored_trace(
        &self,
        key: &str,
        entry: Option<&IndexEntry>,
    ) -> Result<Option<Trace>, StoreError> {
        let Some(v) = self.traces.get(key.as_bytes())? else {
            return Ok(None);
        };
        let (in_index, json) = match v.split_first() {
            Some((&MAPPED_IN_INDEX, rest)) => (true, rest),
            _ => (false, &v[..]),
        };
        let mut t: Trace = decode(&format!("{}/traces", self.name), key.as_bytes(), json)?;
        if let Some(e) = entry.filter(|_| in_index) {
            t.mapped(&e.record);
        }
        Ok(Some(t))
    }

    /// Before an entry that refers to its trace is rewritten without a trace of its own (a
    /// repair, the worker's entry ahead of its trace) or removed: stores that trace whole, as
    /// the entry being replaced tells it, so that the new entry's userName or LMS id never
    /// shows in an older decision and the decision outlives the entry.
    pub(super) fn keep_referred_trace(
        &self,
        entra_id: &str,
        old: &IndexEntry,
    ) -> Result<(), StoreError> {
        if let Some(t) = self.rebuild(entra_id, old)? {
            // A later decision stored already (a crash left both) stays.
            if self
                .stored_trace(entra_id, Some(old))?
                .is_none_or(|s| s.at < t.at)
            {
                self.traces.insert(entra_id.as_bytes(), encode(&t)?)?;
            }
        }
        Ok(())
    }

    /// The trace `e` refers to, completed from `e`. None when it refers to none, or its shape
    /// is gone (lost to a crash between the shape's write and the entry's).
    fn rebuild(&self, entra_id: &str, e: &IndexEntry) -> Result<Option<Trace>, StoreError> {
        let Some(r) = &e.trace else {
            return Ok(None);
        };
        let key = r.shape().to_be_bytes();
        let Some(v) = self.trace_shapes.get(key)? else {
            return Ok(None);
        };
        let mut t: Trace = decode(&format!("{}/trace_shapes", self.name), &key, &v)?;
        t.at = e.updated_at;
        t.entra_id = entra_id.to_string();
        t.upn = Some(r.upn().unwrap_or(&e.user_name).to_string());
        t.user_name = Some(e.user_name.clone());
        t.matched = Match::Created {
            target_id: e.target_id.clone(),
        };
        t.answer = Some(Answer::Ok {
            target_id: e.target_id.clone(),
        });
        t.mapped(&e.record);
        Ok(Some(t))
    }

    /// Removes the trace shapes no index entry refers to, other than `run`'s, once there are
    /// more than [`SHAPES_BEFORE_PRUNING`] and twice as many as the last pruning left (one
    /// scan of the index, reading only the references). Returns how many were removed. Only
    /// reconciles write references, one at a time per integration, and this is called at the
    /// end of one: no other run's writes can be between the scan and the removal.
    pub(crate) fn prune_trace_shapes(&self, run: &str) -> Result<usize, StoreError> {
        let count = self.trace_shapes.len();
        let kept: usize = self.get_meta(SHAPES_KEPT)?.unwrap_or(0);
        if count <= SHAPES_BEFORE_PRUNING.max(2 * kept) {
            return Ok(0);
        }
        #[derive(Deserialize)]
        struct RefOnly {
            #[serde(default)]
            trace: Option<TraceRef>,
        }
        let mut used = HashSet::new();
        for r in self.users.iter() {
            let (_, v) = r?;
            if let Ok(RefOnly { trace: Some(k) }) = serde_json::from_slice::<RefOnly>(&v) {
                used.insert(k.shape());
            }
        }
        #[derive(Deserialize)]
        struct Origin {
            run: String,
        }
        let mut gone = Writes::default();
        let mut removed = 0;
        for r in self.trace_shapes.iter() {
            let (k, v) = r?;
            let in_use = <[u8; 4]>::try_from(k.as_ref())
                .is_ok_and(|k| used.contains(&u32::from_be_bytes(k)));
            let this_run = serde_json::from_slice::<Origin>(&v).is_ok_and(|o| o.run == run);
            if !in_use && !this_run {
                gone.remove(k);
                removed += 1;
            }
        }
        gone.apply(&self.trace_shapes)?;
        self.put_meta(SHAPES_KEPT, &(count - removed))?;
        Ok(removed)
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

    /// How many users have a trace, stored or referred to by their index entry (tests; scans
    /// the index).
    pub fn trace_count(&self) -> usize {
        #[derive(Deserialize)]
        struct RefOnly {
            #[serde(default)]
            trace: Option<serde::de::IgnoredAny>,
        }
        let referred = self
            .users
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                serde_json::from_slice::<RefOnly>(v).is_ok_and(|r| r.trace.is_some())
                    && !self.traces.contains_key(k).unwrap_or(false)
            })
            .count();
        self.traces.len() + referred
    }

    /// How many traces are stored whole (tests): a first reconcile's creates are not.
    pub fn stored_trace_count(&self) -> usize {
        self.traces.len()
    }
}

#[cfg(test)]
mod tests {
    use crate::model::change::{Action, PlannedChange};
    use crate::model::record::{AttrValue, Record};
    use crate::model::trace::{Match, Outcome, Path, Scope, Source, Trace, Via};
    use crate::model::IntegrationName;
    use crate::store::{encode, IndexEntry, StoreError};

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
            trace: None,
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
        // Read back from a reference, its time is the entry's.
        t.at = entry.updated_at;
        let mut other = Trace::new("a", Source::Reconcile, "r1", "u9");
        other.user(Some("nine@x"), None).failed("409", true);
        let mut written = [("u1".to_string(), entry.clone())];
        a.put_changes(&mut written, vec![t.clone(), other.clone()])
            .unwrap();
        t.mapped_in_index = false;
        t.mapped(&record);
        // A plain create: its trace is a reference in its entry (the UPN differs from the
        // userName, so the reference carries it).
        let reference = written[0].1.trace.clone().expect("a reference");
        assert_eq!(reference.upn(), Some("Ada.Upn@x"));
        assert_eq!(a.get_user("u1").unwrap(), Some(written[0].1.clone()));
        assert_eq!(
            a.stored_trace_count(),
            1,
            "only the failure is stored whole"
        );
        assert_eq!(a.trace_count(), 2);
        assert_eq!(a.reports_of("m1").unwrap(), vec!["u1".to_string()]);
        assert_eq!(a.trace("u1").unwrap(), Some(t.clone()));
        assert_eq!(a.trace("u9").unwrap(), Some(other));
        assert!(!a.trace_is_skip("u1").unwrap());
        assert_eq!(a.trace_by_name("ada.upn@X").unwrap(), Some(t.clone()));

        // An entry rewritten with another manager moves the link; the decision its old entry
        // referred to is stored whole first (nothing newer explains the user).
        let mut moved = entry.clone();
        moved.manager = Some("m2".into());
        a.put_users(&[("u1".into(), moved.clone())]).unwrap();
        assert_eq!(a.get_user("u1").unwrap(), Some(moved));
        assert_eq!(a.stored_trace_count(), 2);
        assert_eq!(a.trace("u1").unwrap(), Some(t));
        let _ = reference;
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
        a.put_changes(&mut [("u1".into(), entry)], vec![t2.clone()])
            .unwrap();
        // Without a UPN it is not a plain create: stored whole, and read before the entry's
        // old reference (which this create's entry no longer has).
        assert!(a.get_user("u1").unwrap().unwrap().trace.is_none());
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
                trace: None,
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

    /// Run `run`'s plain create of user `i` (userName = UPN unless `upn` says otherwise),
    /// listed in group `group`: the entry and the trace a reconcile hands to the store.
    fn create(run: &str, group: &str, i: usize, upn: Option<&str>) -> (String, IndexEntry, Trace) {
        let id = format!("u{i}");
        let name = format!("user{i}@x");
        let mut record = Record::new();
        record.insert("title".into(), AttrValue::Str(format!("Title {i}")));
        let c = PlannedChange {
            action: Action::Create,
            entra_id: id.clone(),
            user_name: name.clone(),
            target_id: None,
            changes: Vec::new(),
            reason: None,
            record: record.clone(),
            manager: None,
            linked: false,
        };
        let entry = IndexEntry {
            target_id: format!("t{i}"),
            user_name: name.clone(),
            record,
            manager: None,
            linked: false,
            updated_at: chrono::Utc::now(),
            trace: None,
        };
        let mut t = Trace::new("a", Source::Reconcile, run, &id);
        t.user(None, Some(upn.unwrap_or(&name)))
            .scope(Scope::of(
                None,
                vec![Via {
                    group_id: group.into(),
                    group_name: Some(format!("Group {group}")),
                    path: Path::Transitive,
                }],
            ))
            .plan(&c)
            .applied(
                &c,
                &Match::Created {
                    target_id: entry.target_id.clone(),
                },
            );
        t.mapped_in_index = true;
        (id, entry, t)
    }

    /// The trace as `trace` reads it back when stored whole: with the mapped values.
    fn whole(mut t: Trace, e: &IndexEntry) -> Trace {
        t.mapped_in_index = false;
        t.mapped(&e.record);
        t
    }

    /// The trace as `trace` reads it back from a reference: also with its entry's time.
    fn referred(t: Trace, e: &IndexEntry) -> Trace {
        let mut t = whole(t, e);
        t.at = e.updated_at;
        t
    }

    #[test]
    fn a_runs_plain_creates_share_a_shape_per_group_and_read_back_whole() {
        let (_s, a) = store_a();
        // Before the run: u3 was skipped (disabled), u4's create failed in an earlier run.
        let mut skip = Trace::new("a", Source::Reconcile, "r0", "u3");
        skip.skipped("disabled");
        let mut failed = Trace::new("a", Source::Reconcile, "r0", "u4");
        failed.user(Some("user4@x"), None).failed("500", true);
        a.put_traces(vec![skip, failed]).unwrap();

        let made: Vec<_> = (0..100)
            .map(|i| {
                let upn = (i == 7).then_some("Seven.Upn@x");
                create("r1", if i % 2 == 0 { "g1" } else { "g2" }, i, upn)
            })
            .collect();
        let mut entries: Vec<_> = made
            .iter()
            .map(|(id, e, _)| (id.clone(), e.clone()))
            .collect();
        let traces = made.iter().map(|(_, _, t)| t.clone()).collect();
        a.put_changes(&mut entries, traces).unwrap();

        assert_eq!(a.trace_shapes.len(), 2, "one shape per group listed");
        assert_eq!(a.stored_trace_count(), 0, "no trace stored per user");
        assert_eq!(a.trace_count(), 100);
        assert!(!a.trace_is_skip("u3").unwrap(), "the skip is over");
        for ((id, _, t), (_, e)) in made.iter().zip(&entries) {
            assert_eq!(a.get_user(id).unwrap().as_ref(), Some(e));
            let read = a.trace(id).unwrap().expect("a trace");
            assert_eq!(read, referred(t.clone(), e), "{id}");
        }
        // The reference is a bare number, or [number, UPN].
        let raw = |id: &str| -> serde_json::Value {
            serde_json::from_slice(&a.users.get(id.as_bytes()).unwrap().unwrap()).unwrap()
        };
        assert!(raw("u0")["trace"].is_u64());
        assert_eq!(raw("u7")["trace"][1], "Seven.Upn@x");
        // u4's failure is gone with its create; u7 is found by its UPN.
        assert_eq!(a.trace("u4").unwrap().unwrap().outcome, Outcome::Created);
        assert_eq!(
            a.trace_by_name("seven.upn@X").unwrap().unwrap().entra_id,
            "u7"
        );
        assert_eq!(
            a.trace_by_name("USER8@x").unwrap(),
            Some(referred(made[8].2.clone(), &entries[8].1))
        );

        // A later decision is stored whole and read instead of the reference.
        let mut gone = Trace::new("a", Source::Incremental, "incremental", "u5");
        gone.user(Some("user5@x"), None).failed("503", true);
        a.put_traces(vec![gone.clone()]).unwrap();
        assert_eq!(a.trace("u5").unwrap(), Some(gone));

        // What is not a plain create is stored whole: a dry run, another source, a note.
        let (id, e, mut t) = create("r2", "g1", 200, None);
        t.note = Some("why".into());
        a.put_changes(&mut [(id.clone(), e.clone())], vec![t.clone()])
            .unwrap();
        assert_eq!(a.stored_trace_count(), 2);
        assert_eq!(a.trace(&id).unwrap(), Some(whole(t, &e)));
    }

    #[test]
    fn a_shape_whose_key_is_taken_by_another_is_stored_whole() {
        let (_s, a) = store_a();
        let (id, e, t) = create("r1", "g1", 1, None);
        let mut probe = [(id.clone(), e.clone())];
        a.put_changes(&mut probe, vec![t.clone()]).unwrap();
        let key = probe[0].1.trace.as_ref().unwrap().shape();
        // Another shape under that key (a collision, or a shape from another build).
        a.trace_shapes
            .insert(key.to_be_bytes(), b"{}".to_vec())
            .unwrap();
        let (id2, e2, t2) = create("r1", "g1", 2, None);
        let mut entries = [(id2.clone(), e2.clone())];
        a.put_changes(&mut entries, vec![t2.clone()]).unwrap();
        assert!(entries[0].1.trace.is_none());
        assert_eq!(a.trace(&id2).unwrap(), Some(whole(t2, &e2)));
        // The first user's shape is unreadable now: no trace rather than a wrong one.
        assert!(matches!(a.trace(&id), Err(StoreError::Corrupt { .. })));
    }

    #[test]
    fn shapes_no_entry_refers_to_are_pruned_once_there_are_many() {
        let (_s, a) = store_a();
        // 80 runs, each creating one user; the users of the first 50 are removed later.
        for i in 0..80 {
            let (id, e, t) = create(&format!("r{i}"), "g1", i, None);
            a.put_changes(&mut [(id, e)], vec![t]).unwrap();
        }
        assert_eq!(a.trace_shapes.len(), 80);
        for i in 0..50 {
            a.remove_user(&format!("u{i}")).unwrap();
        }
        // r0's shape is spared as the current run's; 49 others go.
        assert_eq!(a.prune_trace_shapes("r0").unwrap(), 49);
        assert_eq!(a.trace_shapes.len(), 31);
        for i in 50..80 {
            let t = a.trace(&format!("u{i}")).unwrap().expect("kept");
            assert_eq!(t.run, format!("r{i}"));
        }
        // The next look waits until the shapes have doubled (and at least 64).
        for i in 80..110 {
            let (id, e, t) = create(&format!("r{i}"), "g1", i, None);
            a.put_changes(&mut [(id, e)], vec![t]).unwrap();
        }
        a.remove_user("u80").unwrap();
        assert_eq!(a.trace_shapes.len(), 61);
        assert_eq!(a.prune_trace_shapes("r200").unwrap(), 0);
        for i in 110..114 {
            let (id, e, t) = create(&format!("r{i}"), "g1", i, None);
            a.put_changes(&mut [(id, e)], vec![t]).unwrap();
        }
        assert_eq!(a.prune_trace_shapes("r200").unwrap(), 2, "r0 and r80");
    }

    #[test]
    fn a_referred_trace_outlives_a_repair_or_removal_of_its_entry_as_it_was_decided() {
        let (_s, a) = store_a();
        let (id, e, t) = create("r1", "g1", 1, None);
        let (id2, e2, t2) = create("r1", "g1", 2, None);
        let mut entries = [(id.clone(), e.clone()), (id2.clone(), e2.clone())];
        a.put_changes(&mut entries, vec![t.clone(), t2.clone()])
            .unwrap();
        let original = referred(t, &entries[0].1);
        // A crash read-back rewrites the entry with what the LMS holds: another userName and
        // LMS id. The create is still the last decision, with the values it was made with.
        let mut repaired = e.clone();
        repaired.user_name = "renamed@x".into();
        repaired.target_id = "t-other".into();
        a.put_users(&[(id.clone(), repaired.clone())]).unwrap();
        assert_eq!(a.get_user(&id).unwrap(), Some(repaired));
        let read = a.trace(&id).unwrap().unwrap();
        assert_eq!(read.user_name.as_deref(), Some("user1@x"));
        assert_eq!(read, original);
        // A removed entry's decision is still told.
        a.remove_user(&id2).unwrap();
        assert_eq!(a.trace(&id2).unwrap(), Some(referred(t2, &entries[1].1)));
    }

    #[test]
    fn the_later_of_a_stored_and_a_referred_trace_is_read() {
        let (_s, a) = store_a();
        let (id, e, t) = create("r2", "g1", 1, None);
        // A crash left a trace stored before the entry's reference, and one after.
        let mut older = Trace::new("a", Source::Reconcile, "r1", &id);
        older.at = t.at - chrono::Duration::seconds(60);
        older.failed("500", true);
        a.traces
            .insert(id.as_bytes(), encode(&older).unwrap())
            .unwrap();
        let mut entries = [(id.clone(), e)];
        a.put_changes(&mut entries, vec![t.clone()]).unwrap();
        a.traces
            .insert(id.as_bytes(), encode(&older).unwrap())
            .unwrap();
        assert_eq!(
            a.trace(&id).unwrap(),
            Some(referred(t.clone(), &entries[0].1))
        );
        let mut newer = older.clone();
        newer.at = t.at + chrono::Duration::seconds(60);
        a.traces
            .insert(id.as_bytes(), encode(&newer).unwrap())
            .unwrap();
        assert_eq!(a.trace(&id).unwrap(), Some(newer));
    }

    #[test]
    fn only_a_reconciles_plain_creates_are_shared() {
        let (_s, a) = store_a();
        let long = format!("{}@x", "l".repeat(300));
        let mut cases = Vec::new();
        let (id, e, mut t) = create("r1", "g1", 1, None);
        t.dry_run = true;
        cases.push((id, e, t));
        let (id, e, mut t) = create("r1", "g1", 2, None);
        t.source = Source::Incremental;
        cases.push((id, e, t));
        // A userName longer than a trace keeps is clipped in the trace: not the entry's.
        let (id, mut e, mut t) = create("r1", "g1", 3, None);
        e.user_name = long.clone();
        t.user(Some(&long), Some(&long));
        cases.push((id, e, t));
        // A trace followed by another of the same user in the batch: the later one counts.
        let (id, e, t) = create("r1", "g1", 4, None);
        let mut after = Trace::new("a", Source::Reconcile, "r1", &id);
        after.failed("later", false);
        cases.push((id, e, t));
        let mut entries: Vec<_> = cases
            .iter()
            .map(|(id, e, _)| (id.clone(), e.clone()))
            .collect();
        let mut traces: Vec<_> = cases.iter().map(|(_, _, t)| t.clone()).collect();
        traces.push(after.clone());
        a.put_changes(&mut entries, traces).unwrap();
        assert!(
            entries.iter().all(|(_, e)| e.trace.is_none()),
            "{entries:?}"
        );
        assert_eq!(a.trace_shapes.len(), 0);
        assert_eq!(a.trace("u4").unwrap(), Some(after));
        for (id, e, t) in &cases[..3] {
            assert_eq!(a.trace(id).unwrap(), Some(whole(t.clone(), e)), "{id}");
        }
    }

    #[test]
    fn a_referred_create_amended_in_its_run_is_stored_whole() {
        let (_s, a) = store_a();
        let (id, e, t) = create("r1", "g1", 1, None);
        let mut entries = [(id.clone(), e.clone())];
        a.put_changes(&mut entries, vec![t]).unwrap();
        // The manager link, set once the manager exists: the run amends its trace.
        let link = PlannedChange {
            action: Action::Update,
            entra_id: id.clone(),
            user_name: e.user_name.clone(),
            target_id: Some(e.target_id.clone()),
            changes: vec![crate::model::record::AttrChange {
                key: "manager".into(),
                old: None,
                new: Some(AttrValue::Str("t9".into())),
            }],
            reason: None,
            record: e.record.clone(),
            manager: Some("u9".into()),
            linked: false,
        };
        let mut amended = a.trace(&id).unwrap().unwrap();
        amended.amend(&link, "manager link set once the manager was in the LMS");
        // Its entry, as the link writes it: the record with the manager.
        let mut linked = e.clone();
        linked.manager = Some("u9".into());
        linked
            .record
            .insert("manager".into(), AttrValue::Str("t9".into()));
        a.put_changes(&mut [(id.clone(), linked.clone())], vec![amended.clone()])
            .unwrap();
        assert_eq!(a.get_user(&id).unwrap(), Some(linked));
        assert_eq!(a.trace(&id).unwrap(), Some(amended));
        assert_eq!(a.stored_trace_count(), 1);
    }
}
