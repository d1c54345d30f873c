//! Incremental-sync state: subscriptions (`<integration>/subs`), delta links
//! (`<integration>/delta`), direct group memberships learnt from group delta
//! (`<integration>/members`, key `group \0 member`) and the reverse manager index
//! (`<integration>/reports`, key `manager \0 report`).

use std::collections::{BTreeSet, VecDeque};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{decode, encode, IntegrationStore, StoreError};

/// What a subscription watches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Watch {
    /// Membership of a group (configured or nested).
    Members { group_id: String },
    /// Property changes of all users of the tenant.
    Users,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionRecord {
    pub id: String,
    pub watch: Watch,
    pub resource: String,
    pub change_type: String,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub renewed_at: Option<DateTime<Utc>>,
    /// Last renewal or creation error, cleared on success.
    #[serde(default)]
    pub last_error: Option<String>,
    /// Where Graph posts this subscription's notifications (empty in records from before it
    /// was kept).
    #[serde(default)]
    pub notification_url: String,
    /// A fingerprint of the clientState the subscription was made with (never the value):
    /// when the configured clientState changes, the subscription is made again. Records from
    /// before it was kept have none and are taken to carry the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_state_fp: Option<String>,
}

/// A fingerprint of a clientState: SHA-256 of a fixed label and the value, first 16 bytes as
/// hex. Tells a changed clientState from the one a subscription was made with, without
/// keeping the secret.
pub(crate) fn client_state_fingerprint(client_state: &str) -> String {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(b"rostersync clientState v1\0");
    ctx.update(client_state.as_bytes());
    ctx.finish().as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) use crate::model::MemberKind;

fn pair(a: &str, b: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(a.len() + b.len() + 1);
    k.extend_from_slice(a.as_bytes());
    k.push(0);
    k.extend_from_slice(b.as_bytes());
    k
}

fn prefix(a: &str) -> Vec<u8> {
    let mut k = a.as_bytes().to_vec();
    k.push(0);
    k
}

/// How long a report is remembered for a manager it lost: Microsoft Entra keeps a deleted
/// user restorable for 30 days (docs/graph.md), after which it cannot come back.
pub(crate) const ORPHAN_DAYS: i64 = 30;

/// An orphan's value: the manager's id, then when the report lost it (Unix seconds).
fn orphan_value(manager: &str, at: DateTime<Utc>) -> String {
    format!("{manager}\n{}", at.timestamp())
}

fn orphan_manager(v: &[u8]) -> String {
    let end = v.iter().position(|b| *b == b'\n').unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// Whether an orphan was remembered more than [`ORPHAN_DAYS`] ago. An entry without a time
/// (written before the time was kept) is kept until its manager is settled otherwise.
fn orphan_expired(v: &[u8], now: DateTime<Utc>) -> bool {
    let Some(i) = v.iter().position(|b| *b == b'\n') else {
        return false;
    };
    std::str::from_utf8(&v[i + 1..])
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .is_some_and(|t| now.timestamp() - t > ORPHAN_DAYS * 86_400)
}

fn second(k: &[u8]) -> String {
    let i = k.iter().position(|b| *b == 0).map_or(k.len(), |i| i + 1);
    String::from_utf8_lossy(&k[i..]).into_owned()
}

impl IntegrationStore {
    // ---- subscriptions ----

    pub fn subscriptions(&self) -> Result<Vec<SubscriptionRecord>, StoreError> {
        let tree = format!("{}/subs", self.name);
        self.subs
            .iter()
            .map(|r| {
                let (k, v) = r?;
                decode(&tree, &k, &v)
            })
            .collect()
    }

    pub(crate) fn subscription(&self, id: &str) -> Result<Option<SubscriptionRecord>, StoreError> {
        match self.subs.get(id.as_bytes())? {
            Some(v) => Ok(Some(decode(
                &format!("{}/subs", self.name),
                id.as_bytes(),
                &v,
            )?)),
            None => Ok(None),
        }
    }

    pub fn put_subscription(&self, s: &SubscriptionRecord) -> Result<(), StoreError> {
        self.subs.insert(s.id.as_bytes(), encode(s)?)?;
        Ok(())
    }

    pub(crate) fn remove_subscription(&self, id: &str) -> Result<(), StoreError> {
        self.subs.remove(id.as_bytes())?;
        Ok(())
    }

    // ---- delta links ----

    pub(crate) fn delta_link(&self, group_id: &str) -> Result<Option<String>, StoreError> {
        match self.delta.get(group_id.as_bytes())? {
            Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            None => Ok(None),
        }
    }

    pub(crate) fn put_delta_link(&self, group_id: &str, link: &str) -> Result<(), StoreError> {
        self.delta.insert(group_id.as_bytes(), link.as_bytes())?;
        Ok(())
    }

    pub(crate) fn remove_delta_link(&self, group_id: &str) -> Result<(), StoreError> {
        self.delta.remove(group_id.as_bytes())?;
        Ok(())
    }

    // ---- direct memberships ----

    /// Applies one delta round's membership changes of `group_id`.
    pub(crate) fn apply_members(
        &self,
        group_id: &str,
        added: &[(String, MemberKind)],
        removed: &[String],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for id in removed {
            batch.remove(pair(group_id, id));
        }
        for (id, kind) in added {
            batch.insert(pair(group_id, id), encode(kind)?);
        }
        self.members.apply_batch(batch)?;
        Ok(())
    }

    /// Replaces what is known of `group_id`'s direct members (a fresh listing or delta round).
    pub(crate) fn replace_members(
        &self,
        group_id: &str,
        members: &[(String, MemberKind)],
    ) -> Result<(), StoreError> {
        self.clear_members(group_id)?;
        self.apply_members(group_id, members, &[])
    }

    /// A group left the tree: its members and its delta link are forgotten, so that it is
    /// learnt afresh (and its members looked at) if it comes back.
    pub(crate) fn forget_group(&self, group_id: &str) -> Result<(), StoreError> {
        self.clear_members(group_id)?;
        self.remove_delta_link(group_id)
    }

    /// Forgets everything known about `group_id`'s members (before a fresh initial round).
    pub(crate) fn clear_members(&self, group_id: &str) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for r in self.members.scan_prefix(prefix(group_id)) {
            let (k, _) = r?;
            batch.remove(k);
        }
        self.members.apply_batch(batch)?;
        Ok(())
    }

    pub(crate) fn direct_members(
        &self,
        group_id: &str,
    ) -> Result<Vec<(String, MemberKind)>, StoreError> {
        let tree = format!("{}/members", self.name);
        self.members
            .scan_prefix(prefix(group_id))
            .map(|r| {
                let (k, v) = r?;
                Ok((second(&k), decode(&tree, &k, &v)?))
            })
            .collect()
    }

    pub fn is_direct_member(&self, group_id: &str, member: &str) -> Result<bool, StoreError> {
        Ok(self.members.contains_key(pair(group_id, member))?)
    }

    /// `roots` and every group nested in them (as far as delta has told us), cycles allowed.
    pub(crate) fn group_tree(&self, roots: &[String]) -> Result<BTreeSet<String>, StoreError> {
        let mut seen: BTreeSet<String> = BTreeSet::new();
        let mut todo: VecDeque<String> = roots.iter().cloned().collect();
        while let Some(g) = todo.pop_front() {
            if !seen.insert(g.clone()) {
                continue;
            }
            for (m, kind) in self.direct_members(&g)? {
                if kind == MemberKind::Group && !seen.contains(&m) {
                    todo.push_back(m);
                }
            }
        }
        Ok(seen)
    }

    // ---- reverse manager index ----

    pub(crate) fn link_report(
        &self,
        batch: &mut super::Writes,
        report: &str,
        old: Option<&str>,
        new: Option<&str>,
    ) {
        if old == new {
            return;
        }
        if let Some(o) = old {
            batch.remove(pair(o, report));
        }
        if let Some(n) = new {
            batch.insert(pair(n, report), &[][..]);
        }
    }

    /// Entra ids of the users whose last applied manager is `manager`.
    pub(crate) fn reports_of(&self, manager: &str) -> Result<Vec<String>, StoreError> {
        self.reports
            .scan_prefix(prefix(manager))
            .map(|r| Ok(second(&r?.0)))
            .collect()
    }

    // ---- reports of a vanished manager ----

    /// Remembers that these reports lost `manager` (it vanished from Graph, or their link to
    /// it was cleared): should it come back (restored from the deleted items), Graph gives the
    /// reports their manager again without a change notification for them, and the reverse
    /// index no longer knows them. Remembered for [`ORPHAN_DAYS`].
    pub(crate) fn mark_orphans(&self, manager: &str, reports: &[String]) -> Result<(), StoreError> {
        let lost: Vec<(String, String)> = reports
            .iter()
            .map(|r| (r.clone(), manager.to_string()))
            .collect();
        self.mark_lost(&lost)
    }

    /// [`IntegrationStore::mark_orphans`] for links of several managers: (report, manager)
    /// pairs, in one batch.
    pub(crate) fn mark_lost(&self, lost: &[(String, String)]) -> Result<(), StoreError> {
        if lost.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        let mut batch = sled::Batch::default();
        for (report, manager) in lost {
            batch.insert(report.as_bytes(), orphan_value(manager, now).as_bytes());
        }
        self.orphans.apply_batch(batch)?;
        Ok(())
    }

    /// The reports remembered for a vanished `manager` (a small tree: scanned).
    pub(crate) fn orphans_of(&self, manager: &str) -> Result<Vec<String>, StoreError> {
        Ok(self.orphans()?.remove(manager).unwrap_or_default())
    }

    /// Forgets the reports remembered, and the users known vanished, longer than
    /// [`ORPHAN_DAYS`]: a user deleted that long ago can no longer be restored. Returns how
    /// many entries went.
    pub(crate) fn prune_orphans(&self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        let mut n = 0;
        for tree in [&self.orphans, &self.vanished] {
            let mut batch = sled::Batch::default();
            for r in tree.iter() {
                let (k, v) = r?;
                if orphan_expired(&v, now) {
                    batch.remove(k);
                    n += 1;
                }
            }
            tree.apply_batch(batch)?;
        }
        Ok(n)
    }

    // ---- users Graph said were gone ----

    /// Remembers that Graph said `id` is gone (a 404, a soft delete): should it come back,
    /// Graph gives its reports their manager again, notifying only about `id`.
    pub(crate) fn mark_vanished(&self, id: &str) -> Result<(), StoreError> {
        self.vanished
            .insert(id.as_bytes(), orphan_value("", Utc::now()).as_bytes())?;
        Ok(())
    }

    /// Whether `id` was remembered as gone (and could still be restored).
    pub(crate) fn is_vanished(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .vanished
            .get(id.as_bytes())?
            .is_some_and(|v| !orphan_expired(&v, Utc::now())))
    }

    /// `id` is back (its reports were read again) or deleted for good.
    pub(crate) fn forget_vanished(&self, id: &str) -> Result<(), StoreError> {
        self.vanished.remove(id.as_bytes())?;
        Ok(())
    }

    // ---- managers the next reconcile reads ----

    /// Marks these users' managers as doubtful: the next reconcile reads them from Graph
    /// instead of taking the index's. The incremental worker raises a doubt for every link it
    /// writes: the reconcile's users delta tells only what changed since its own last run, so
    /// a link the worker wrote in between on a passing state (a manager deleted, then
    /// restored) would otherwise be believed.
    pub(crate) fn doubt_managers(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for id in ids {
            batch.insert(id.as_bytes(), &self.db.generate_id()?.to_be_bytes());
        }
        self.doubts.apply_batch(batch)?;
        Ok(())
    }

    /// Every doubt, with its stamp (for [`IntegrationStore::settle_doubts`]).
    pub(crate) fn manager_doubts(&self) -> Result<Vec<(String, sled::IVec)>, StoreError> {
        let mut out = Vec::new();
        for r in self.doubts.iter() {
            let (k, v) = r?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v));
        }
        Ok(out)
    }

    /// Removes these doubts unless raised again since they were read (a new stamp stays).
    pub(crate) fn settle_doubts(&self, doubts: &[(String, sled::IVec)]) -> Result<(), StoreError> {
        for (id, stamp) in doubts {
            // A mismatch (raised again, or gone) is not an error: that doubt is not ours.
            let _ = self
                .doubts
                .compare_and_swap(id.as_bytes(), Some(stamp), None::<&[u8]>)?;
        }
        Ok(())
    }

    /// Forgets the reports remembered for `manager` (deleted for good: it cannot come back).
    pub(crate) fn forget_orphans_of(&self, manager: &str) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for r in self.orphans_of(manager)? {
            batch.remove(r.as_bytes());
        }
        self.orphans.apply_batch(batch)?;
        Ok(())
    }

    /// Every remembered report, by vanished manager (those remembered too long left out).
    pub(crate) fn orphans(
        &self,
    ) -> Result<std::collections::HashMap<String, Vec<String>>, StoreError> {
        let now = Utc::now();
        let mut out: std::collections::HashMap<String, Vec<String>> = Default::default();
        for r in self.orphans.iter() {
            let (k, v) = r?;
            if orphan_expired(&v, now) {
                continue;
            }
            out.entry(orphan_manager(&v))
                .or_default()
                .push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }

    /// A report that has a manager again is no longer an orphan.
    pub(crate) fn settle_orphans(
        &self,
        entries: &[(String, super::IndexEntry)],
    ) -> Result<(), StoreError> {
        if self.orphans.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (id, e) in entries {
            if e.manager.is_some() {
                batch.remove(id.as_bytes());
            }
        }
        self.orphans.apply_batch(batch)?;
        Ok(())
    }

    // ---- clientState ----

    /// The integration's clientState: the one stored, or a new random one (kept from now on).
    pub(crate) fn client_state(&self) -> Result<String, StoreError> {
        if let Some(v) = self.meta.get(b"client_state")? {
            return Ok(String::from_utf8_lossy(&v).into_owned());
        }
        let fresh: String = {
            use rand::distr::{Alphanumeric, SampleString};
            Alphanumeric.sample_string(&mut rand::rng(), 64)
        };
        // Another caller may have won the race: keep whichever was stored first.
        let _ = self.meta.compare_and_swap(
            b"client_state",
            None as Option<&[u8]>,
            Some(fresh.as_bytes()),
        )?;
        match self.meta.get(b"client_state")? {
            Some(v) => Ok(String::from_utf8_lossy(&v).into_owned()),
            None => Err(StoreError::Io("clientState was not stored".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::store_a;

    #[test]
    fn replaced_members_make_the_tree() {
        let (_s, a) = store_a();
        a.apply_members("g1", &[("u1".into(), MemberKind::User)], &[])
            .unwrap();
        a.replace_members(
            "g1",
            &[
                ("u2".into(), MemberKind::User),
                ("g2".into(), MemberKind::Group),
            ],
        )
        .unwrap();
        a.replace_members("g2", &[("u3".into(), MemberKind::User)])
            .unwrap();
        let tree = a.group_tree(&["g1".to_string()]).unwrap();
        assert_eq!(tree.len(), 2, "{tree:?} {:?}", a.direct_members("g1"));
        assert!(!a.is_direct_member("g1", "u1").unwrap());
    }

    /// Reports remembered for a vanished manager stay until they have a manager again (or
    /// leave the index).
    #[test]
    fn orphans_stay_until_they_have_a_manager_again() {
        let (_s, a) = store_a();
        let entry = |manager| crate::store::tests::index_entry("t", manager);
        for r in ["r1", "r2", "r3"] {
            a.put_user(r, &entry(None)).unwrap();
        }
        a.mark_orphans("m", &["r1".into(), "r2".into()]).unwrap();
        a.mark_orphans("n", &["r3".into()]).unwrap();
        let mut of_m = a.orphans_of("m").unwrap();
        of_m.sort();
        assert_eq!(of_m, ["r1", "r2"]);
        assert_eq!(a.orphans().unwrap()["n"], ["r3"]);

        a.put_user("r1", &entry(None)).unwrap();
        a.put_user("r2", &entry(Some("m"))).unwrap();
        assert_eq!(a.orphans_of("m").unwrap(), ["r1"]);
        a.remove_user("r1").unwrap();
        assert!(a.orphans_of("m").unwrap().is_empty());
        assert_eq!(a.orphans_of("n").unwrap(), ["r3"]);
        a.forget_orphans_of("n").unwrap();
        assert!(a.orphans().unwrap().is_empty());
    }

    /// A report whose link is cleared in any write (a round that read the report after its
    /// manager was deleted, before reading the manager) is remembered for that manager; a
    /// change of manager is not a loss.
    #[test]
    fn a_cleared_link_is_remembered_for_the_manager_it_named() {
        let (_s, a) = store_a();
        let entry = |manager| crate::store::tests::index_entry("t", manager);
        a.put_user("r1", &entry(Some("m"))).unwrap();
        a.put_user("r2", &entry(Some("m"))).unwrap();
        a.put_user("r2", &entry(Some("n"))).unwrap();
        assert!(a.orphans().unwrap().is_empty());
        a.put_user("r1", &entry(None)).unwrap();
        assert_eq!(a.orphans_of("m").unwrap(), ["r1"]);
        assert!(a.reports_of("m").unwrap().is_empty());
        a.put_user("r1", &entry(Some("m"))).unwrap();
        assert!(a.orphans().unwrap().is_empty(), "linked again: settled");
    }

    #[test]
    fn orphans_are_forgotten_once_their_manager_cannot_be_restored() {
        let (_s, a) = store_a();
        let now = Utc::now();
        let old = now - chrono::Duration::days(ORPHAN_DAYS + 1);
        let recent = now - chrono::Duration::days(ORPHAN_DAYS - 1);
        a.orphans
            .insert("r1", orphan_value("m", old).as_bytes())
            .unwrap();
        a.orphans
            .insert("r2", orphan_value("m", recent).as_bytes())
            .unwrap();
        // Written before the time was kept: the manager's id alone.
        a.orphans.insert("r3", "m".as_bytes()).unwrap();
        let mut of_m = a.orphans_of("m").unwrap();
        of_m.sort();
        assert_eq!(of_m, ["r2", "r3"], "the expired one is not read");
        assert_eq!(a.prune_orphans(now).unwrap(), 1);
        assert_eq!(a.orphans.len(), 2);
        assert_eq!(a.prune_orphans(now).unwrap(), 0);
    }
}
