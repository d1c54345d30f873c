//! Durable state in one sled database, isolated per integration.
//!
//! Owns: the sled engine and every key layout. Each integration gets its own trees, named
//! `<integration>/users`, `<integration>/runs`, `<integration>/meta`, so one integration can
//! never read or overwrite another's state. Nothing outside this module names a sled type, so
//! the engine can be swapped.

pub(crate) mod alerts;
mod commit;
pub(crate) mod guard;
mod health;
pub(crate) mod intents;
mod journal;
pub mod queue;
pub mod state;
mod thread;
pub(crate) mod traces;
pub(crate) mod writer;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
#[cfg(any(test, feature = "test-hooks"))]
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::model::record::Record;
use crate::model::IntegrationName;
pub(crate) use journal::ReplayReport;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the data directory {0} is in use by another rostersync process (sled allows one process per directory)")]
    Locked(PathBuf),
    #[error("cannot open the data directory {path}: {message}")]
    Open { path: PathBuf, message: String },
    #[error("store I/O failed: {0}")]
    Io(String),
    #[error("corrupt entry in {tree} at key {key:?}: {message}")]
    Corrupt {
        tree: String,
        key: String,
        message: String,
    },
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// How long a lock held by another handle is waited for before the store reports it as
/// [`StoreError::Locked`]: a process that is just exiting (a restart) or a handle dropped a
/// moment ago (sled's own I/O threads let go of the file shortly after the drop) is not an
/// error; a second `serve` on the same directory still is, after this wait.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_db(path: &Path, wait: std::time::Duration) -> Result<sled::Db, StoreError> {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let opened = sled::Config::new()
            .path(path)
            // The index is read sequentially during a reconcile; a small cache keeps RSS flat.
            // 8 MiB rather than 32: a first reconcile of 100,000 members peaked 8-30 MiB lower
            // (benches/reconcile.rs, C1), with no slower no-change run (C2).
            .cache_capacity(8 * 1024 * 1024)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            Err(e) if is_lock_conflict(&e) => {
                if std::time::Instant::now() >= deadline {
                    return Err(StoreError::Locked(path.to_path_buf()));
                }
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            Err(e) => {
                return Err(StoreError::Open {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })
            }
        }
    }
}

/// Whether sled refused to open because another process (or another handle in this one)
/// holds the data directory's lock: sled 0.34 reports a failed `try_lock_exclusive` of its
/// `db` file as an `Io` error of kind `Other` with exactly this message prefix, and nothing
/// else it reports starts so. An unreadable, full or corrupt directory is not a lock.
fn is_lock_conflict(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io)
        if io.kind() == std::io::ErrorKind::Other
            && io.to_string().starts_with("could not acquire lock on "))
}

/// What rostersync last applied to one target user: the link (target id) and the mapped
/// record. Only users in this index are ever modified or deactivated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct IndexEntry {
    pub target_id: String,
    pub user_name: String,
    pub record: Record,
    /// Entra object id of the user's manager when last applied (to find direct reports).
    #[serde(default)]
    pub manager: Option<String>,
    /// True when an existing LMS user was adopted rather than created by rostersync.
    #[serde(default)]
    pub linked: bool,
    pub updated_at: DateTime<Utc>,
    /// The user's last decision when it was a plain create whose trace is shared with the
    /// other users of its run (`store::traces`): stored here instead of a trace of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<TraceRef>,
}

/// Where an index entry's decision trace is (`store::traces`): the key of a trace shape shared
/// by many users (in `<integration>/trace_shapes`), and the UPN when it is not the userName.
/// The trace's time is the entry's `updated_at`. Written as the bare key, or `[key, upn]`: a
/// few bytes on each of a first reconcile's entries, which every later reconcile reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum TraceRef {
    Shape(u32),
    ShapeAndUpn(u32, String),
}

impl TraceRef {
    pub(crate) fn new(shape: u32, upn: Option<String>) -> TraceRef {
        match upn {
            Some(u) => TraceRef::ShapeAndUpn(shape, u),
            None => TraceRef::Shape(shape),
        }
    }

    pub(crate) fn shape(&self) -> u32 {
        match self {
            TraceRef::Shape(k) | TraceRef::ShapeAndUpn(k, _) => *k,
        }
    }

    pub(crate) fn upn(&self) -> Option<&str> {
        match self {
            TraceRef::Shape(_) => None,
            TraceRef::ShapeAndUpn(_, u) => Some(u),
        }
    }
}

impl IndexEntry {
    pub(crate) fn active(&self) -> bool {
        crate::model::record::is_active(&self.record)
    }
}

/// Writes made to fail on purpose (`Store::inject_write_failure`): a flag in tests and with the
/// `test-hooks` feature, nothing at all in any other build.
#[derive(Clone, Default)]
struct WriteFault(#[cfg(any(test, feature = "test-hooks"))] Arc<AtomicBool>);

impl WriteFault {
    #[cfg(any(test, feature = "test-hooks"))]
    fn set(&self, fail: bool) {
        self.0.store(fail, Ordering::Relaxed);
    }

    fn on(&self) -> bool {
        #[cfg(any(test, feature = "test-hooks"))]
        return self.0.load(Ordering::Relaxed);
        #[cfg(not(any(test, feature = "test-hooks")))]
        false
    }
}

/// The whole database. Clone is cheap (sled handles are shared).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    commit: Arc<commit::GroupCommit>,
    /// The webhook journal (on-disk stores only; temporary ones flush sled instead).
    journal: Option<Arc<journal::Journal>>,
    fail_writes: WriteFault,
    /// Queue sizes kept in memory (`/metrics`) and the last write failure (`/readyz`).
    counters: Arc<health::Counters>,
    health: Arc<health::WriteHealth>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens the store; a webhook journal left by a crash is replayed into the queues that
    /// already exist (see [`Store::open_configured`]).
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_replaying(path, journal::Replay::Existing, LOCK_WAIT)
    }

    /// As [`Store::open`], but a lock held by another handle is reported at once: for a
    /// command that then asks the running `serve` instead.
    pub fn open_unless_locked(path: &Path) -> Result<Store, StoreError> {
        Self::open_replaying(path, journal::Replay::Existing, std::time::Duration::ZERO)
    }

    /// Opens the store for these configured integrations: a left-over webhook journal is
    /// replayed into their queues only, never into a new queue for a name no longer configured.
    pub(crate) fn open_configured(
        path: &Path,
        names: &[IntegrationName],
    ) -> Result<Store, StoreError> {
        Self::open_replaying(path, journal::Replay::Configured(names), LOCK_WAIT)
    }

    fn open_replaying(
        path: &Path,
        which: journal::Replay<'_>,
        lock_wait: std::time::Duration,
    ) -> Result<Store, StoreError> {
        std::fs::create_dir_all(path).map_err(|e| StoreError::Open {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let db = open_db(path, lock_wait)?;
        let mut store = Store::wrap(db);
        store.health.watch_dir(path);
        store.journal = Some(journal::Journal::open(
            store.db.clone(),
            path,
            which,
            Arc::clone(&store.counters),
            Arc::clone(&store.health),
        )?);
        Ok(store)
    }

    fn wrap(db: sled::Db) -> Store {
        let health = Arc::new(health::WriteHealth::default());
        Store {
            commit: commit::GroupCommit::start(db.clone(), Arc::clone(&health)),
            journal: None,
            db,
            fail_writes: WriteFault::default(),
            counters: Default::default(),
            health,
        }
    }

    /// Test hook: make queue appends and durability fail, as a full or broken disk would.
    #[cfg(any(test, feature = "test-hooks"))]
    pub fn inject_write_failure(&self, fail: bool) {
        self.fail_writes.set(fail);
    }

    /// Whether the store's writes work, without writing (readiness): see
    /// [`Store::write_state`].
    pub(crate) fn writable(&self) -> bool {
        self.write_state().is_ok()
    }

    /// `Err` with what failed while the store's last journal append, sync or flush failed (a
    /// full or broken disk), or while writes are made to fail (tests).
    pub(crate) fn write_state(&self) -> Result<(), String> {
        if self.fail_writes.on() {
            return Err("writes are failing (injected)".into());
        }
        self.health.state()
    }

    /// What the replay of a left-over webhook journal found at open (`None`: no journal).
    pub(crate) fn journal_report(&self) -> Option<ReplayReport> {
        self.journal.as_ref().map(|j| j.report.clone())
    }

    /// A temporary store for tests and the demo (removed when dropped).
    pub fn temporary() -> Result<Store, StoreError> {
        let db = sled::Config::new().temporary(true).open()?;
        Ok(Store::wrap(db))
    }

    pub fn integration(&self, name: &IntegrationName) -> Result<IntegrationStore, StoreError> {
        let t = |kind: &str| self.db.open_tree(format!("{name}/{kind}"));
        let (queue, dead) = (t("queue")?, t("dead")?);
        Ok(IntegrationStore {
            counts: self.counters.of(name.as_str(), &queue, &dead),
            name: name.to_string(),
            users: t("users")?,
            runs: t("runs")?,
            meta: t("meta")?,
            queue,
            dead,
            subs: t("subs")?,
            delta: t("delta")?,
            members: t("members")?,
            reports: t("reports")?,
            traces: t("traces")?,
            trace_names: t("trace_names")?,
            trace_skips: t("trace_skips")?,
            trace_shapes: t("trace_shapes")?,
            intents: t("intents")?,
            guard: t("guard")?,
            people: t("people")?,
            orphans: t("orphans")?,
            vanished: t("vanished")?,
            doubts: t("manager_doubts")?,
            db: self.db.clone(),
            commit: Arc::clone(&self.commit),
            journal: self.journal.clone(),
            fail_writes: self.fail_writes.clone(),
        })
    }

    /// Blocks until everything written so far is on disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// One integration's trees.
#[derive(Clone)]
pub struct IntegrationStore {
    name: String,
    users: sled::Tree,
    runs: sled::Tree,
    meta: sled::Tree,
    queue: sled::Tree,
    dead: sled::Tree,
    subs: sled::Tree,
    delta: sled::Tree,
    members: sled::Tree,
    reports: sled::Tree,
    /// Each user's last decision trace (`store::traces`).
    traces: sled::Tree,
    /// Lower-cased userName / UPN → Entra id, for traces looked up by name.
    trace_names: sled::Tree,
    /// Entra ids whose last trace is a skip (a small tree, read at every reconcile).
    trace_skips: sled::Tree,
    /// Trace shapes shared by the plain creates of a run (key: 4 bytes, `TraceRef::shape`).
    trace_shapes: sled::Tree,
    /// Intents of LMS writes not yet settled (`store::intents`).
    intents: sled::Tree,
    /// Deactivations written, by time (`store::guard`).
    guard: sled::Tree,
    /// Managers' selected properties as Graph last told them (`sync::managers`).
    people: sled::Tree,
    /// Reports whose manager vanished from Graph (report → that manager): read again when the
    /// manager comes back (`store::state`).
    orphans: sled::Tree,
    /// Users Graph said were gone (404, or soft-deleted in the users delta) → when: should
    /// one come back, its direct reports are read again (`store::state`).
    vanished: sled::Tree,
    /// Users whose manager the next reconcile reads rather than takes from the index (user →
    /// a stamp, so that a doubt raised during a run outlives that run's settling).
    doubts: sled::Tree,
    db: sled::Db,
    commit: Arc<commit::GroupCommit>,
    journal: Option<Arc<journal::Journal>>,
    fail_writes: WriteFault,
    /// This integration's queue sizes (shared by all its handles and the journal writer).
    counts: Arc<health::QueueCounts>,
}

fn decode<T: DeserializeOwned>(tree: &str, key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree: tree.to_string(),
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

/// Writes to one tree, applied as plain inserts and removes in order.
///
/// Not `sled::Batch`: sled 0.34's `apply_batch` writes out (and `sync_file_range`s) its log
/// buffer twice per call, which made the index and trace writes of a first reconcile cost more
/// than the LMS writes themselves. None of the callers needs all-or-nothing: each orders its
/// writes so that a crash part-way leaves an extra candidate, never a missing one, and an
/// index entry that is lost is found again by its userName or externalId at the next run.
#[derive(Default)]
pub(crate) struct Writes(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Writes {
    pub(crate) fn insert(&mut self, key: impl AsRef<[u8]>, value: impl Into<Vec<u8>>) {
        self.0.push((key.as_ref().to_vec(), Some(value.into())));
    }

    pub(crate) fn remove(&mut self, key: impl AsRef<[u8]>) {
        self.0.push((key.as_ref().to_vec(), None));
    }

    pub(crate) fn apply(self, tree: &sled::Tree) -> Result<(), StoreError> {
        self.apply_each(tree, |_| ())
    }

    /// [`Writes::apply`], returning what each write replaced, in order.
    fn apply_returning(self, tree: &sled::Tree) -> Result<Vec<Option<sled::IVec>>, StoreError> {
        let mut old = Vec::with_capacity(self.0.len());
        self.apply_each(tree, |v| old.push(v))?;
        Ok(old)
    }

    /// Applies the writes in order, handing `replaced` what each one replaced.
    fn apply_each(
        self,
        tree: &sled::Tree,
        mut replaced: impl FnMut(Option<sled::IVec>),
    ) -> Result<(), StoreError> {
        for (k, v) in self.0 {
            replaced(match v {
                Some(v) => tree.insert(k, v)?,
                None => tree.remove(k)?,
            });
        }
        Ok(())
    }
}

/// The manager recorded in a `users` value (none when absent or unreadable).
fn manager_of(value: Option<&[u8]>) -> Option<String> {
    links_of(value).manager
}

/// The manager of a `users` value and whether it refers to a trace (none when absent or
/// unreadable; a reference is not decoded, so a damaged one does not hide the manager).
#[derive(Default, Deserialize)]
struct Links {
    #[serde(default)]
    manager: Option<String>,
    #[serde(default)]
    trace: Option<serde::de::IgnoredAny>,
}

fn links_of(value: Option<&[u8]>) -> Links {
    value
        .and_then(|v| serde_json::from_slice::<Links>(v).ok())
        .unwrap_or_default()
}

/// `v` as stored. Sized for an index entry or a trace (about a kilobyte) so that encoding
/// rarely grows the buffer.
fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    let mut buf = Vec::with_capacity(1024);
    serde_json::to_writer(&mut buf, v).map_err(|e| StoreError::Io(format!("encoding: {e}")))?;
    Ok(buf)
}

impl IntegrationStore {
    pub(crate) fn get_user(&self, entra_id: &str) -> Result<Option<IndexEntry>, StoreError> {
        self.get_user_as(entra_id)
    }

    /// The LMS id of a user a manager link may point at: indexed and active in the LMS. A
    /// manager who left scope (deactivated) is linked by nobody.
    pub(crate) fn linkable_target(&self, entra_id: &str) -> Result<Option<String>, StoreError> {
        #[derive(Deserialize, Default)]
        struct ActiveOnly {
            #[serde(default)]
            active: Option<crate::model::record::AttrValue>,
        }
        #[derive(Deserialize)]
        struct Link {
            target_id: String,
            #[serde(default)]
            record: ActiveOnly,
        }
        Ok(self.get_user_as::<Link>(entra_id)?.and_then(|l| {
            let inactive = matches!(
                l.record.active,
                Some(crate::model::record::AttrValue::Bool(false))
            );
            (!inactive).then_some(l.target_id)
        }))
    }

    /// An index entry decoded as `T` (all of it, or the fields `T` names).
    fn get_user_as<T: DeserializeOwned>(&self, entra_id: &str) -> Result<Option<T>, StoreError> {
        match self.users.get(entra_id.as_bytes())? {
            Some(b) => Ok(Some(decode(
                &format!("{}/users", self.name),
                entra_id.as_bytes(),
                &b,
            )?)),
            None => Ok(None),
        }
    }

    #[cfg(test)]
    pub(crate) fn put_user(&self, entra_id: &str, e: &IndexEntry) -> Result<(), StoreError> {
        self.put_users(&[(entra_id.to_string(), e.clone())])
    }

    /// Writes index entries and keeps the reverse manager index (manager → reports) in step.
    /// New links are written before the entries and stale ones removed after, so a crash in
    /// between leaves an extra candidate, never a missing one.
    pub(crate) fn put_users(&self, entries: &[(String, IndexEntry)]) -> Result<(), StoreError> {
        self.write_entries(entries, &HashSet::new(), &HashSet::new())
    }

    /// [`Self::put_users`]. The entries of `creates` are new (but for a re-create after the
    /// LMS user was deleted), so what such an entry replaces, if anything, is taken from the
    /// insert itself instead of a read before it; its manager link is still written first.
    fn write_entries(
        &self,
        entries: &[(String, IndexEntry)],
        creates: &HashSet<&str>,
        traced: &HashSet<&str>,
    ) -> Result<(), StoreError> {
        let mut batch = Writes::default();
        let mut add = Writes::default();
        let mut drop = Writes::default();
        let mut lost: Vec<(String, String)> = Vec::new();
        // (position in `batch`, Entra id, new manager) of the creates.
        let mut created: Vec<(usize, &str, Option<&str>)> = Vec::new();
        for (id, e) in entries {
            if creates.contains(id.as_str()) {
                self.link_report(&mut add, id, None, e.manager.as_deref());
                created.push((batch.0.len(), id, e.manager.as_deref()));
            } else {
                let before = self.users.get(id.as_bytes())?;
                let Links {
                    manager: old,
                    trace,
                } = links_of(before.as_deref());
                // Rewritten without a trace of its own (a repair, the worker's entry ahead of
                // its trace): the decision the old entry refers to is stored whole first.
                if trace.is_some() && !traced.contains(id.as_str()) {
                    let old_entry = before
                        .as_deref()
                        .and_then(|b| serde_json::from_slice(b).ok());
                    if let Some(old_entry) = old_entry {
                        self.keep_referred_trace(id, &old_entry)?;
                    }
                }
                if old != e.manager {
                    self.link_report(&mut add, id, None, e.manager.as_deref());
                    self.link_report(&mut drop, id, old.as_deref(), None);
                    if let (Some(o), None) = (&old, &e.manager) {
                        // The link is gone, and the reverse index with it: should the manager
                        // come back (restored), the report is found through `orphans`.
                        lost.push((id.clone(), o.clone()));
                    }
                }
            }
            batch.insert(id.as_bytes(), encode(e)?);
        }
        self.settle_orphans(entries)?;
        self.mark_lost(&lost)?;
        add.apply(&self.reports)?;
        let replaced = batch.apply_returning(&self.users)?;
        for (i, id, new) in created {
            let old = manager_of(replaced.get(i).and_then(|v| v.as_deref()));
            if old.as_deref() != new {
                self.link_report(&mut drop, id, old.as_deref(), None);
            }
        }
        drop.apply(&self.reports)?;
        Ok(())
    }

    pub(crate) fn remove_user(&self, entra_id: &str) -> Result<(), StoreError> {
        if let Some(e) = self.get_user(entra_id)? {
            // The decision outlives the entry (`explain` still tells it).
            self.keep_referred_trace(entra_id, &e)?;
            if let Some(m) = e.manager.as_deref() {
                let mut drop = Writes::default();
                self.link_report(&mut drop, entra_id, Some(m), None);
                drop.apply(&self.reports)?;
            }
        }
        self.users.remove(entra_id.as_bytes())?;
        self.orphans.remove(entra_id.as_bytes())?;
        self.doubts.remove(entra_id.as_bytes())?;
        Ok(())
    }

    /// Resolves once everything written before the call is on disk (group commit).
    pub(crate) async fn durable(&self) -> Result<(), StoreError> {
        if self.fail_writes() {
            return Err(StoreError::Io("writes are failing (injected)".into()));
        }
        self.commit.durable().await.map_err(StoreError::Io)
    }

    pub(crate) fn fail_writes(&self) -> bool {
        self.fail_writes.on()
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// Every index entry, in key order.
    pub(crate) fn users(
        &self,
    ) -> impl Iterator<Item = Result<(String, IndexEntry), StoreError>> + '_ {
        let tree = format!("{}/users", self.name);
        self.users.iter().map(move |r| {
            let (k, v) = r?;
            let e = decode(&tree, &k, &v)?;
            Ok((String::from_utf8_lossy(&k).into_owned(), e))
        })
    }

    /// The index entries whose Entra id `keep` accepts; only those are decoded (a reconcile
    /// looks for the few users it did not see among many).
    pub(crate) fn users_where<'a>(
        &'a self,
        mut keep: impl FnMut(&str) -> bool + 'a,
    ) -> impl Iterator<Item = Result<(String, IndexEntry), StoreError>> + 'a {
        let tree = format!("{}/users", self.name);
        self.users.iter().filter_map(move |r| {
            let (k, v) = match r {
                Ok(kv) => kv,
                Err(e) => return Some(Err(e.into())),
            };
            let id = String::from_utf8_lossy(&k);
            if !keep(&id) {
                return None;
            }
            let id = id.into_owned();
            Some(decode(&tree, &k, &v).map(|e| (id, e)))
        })
    }

    /// Whether the index holds no user at all (a first reconcile).
    pub(crate) fn has_no_users(&self) -> bool {
        self.users.is_empty()
    }

    /// Index entries that are active in the LMS (the guard's base); unreadable entries count
    /// as inactive.
    pub(crate) fn active_count(&self) -> u64 {
        self.users()
            .filter(|r| r.as_ref().map(|(_, e)| e.active()).unwrap_or(false))
            .count() as u64
    }

    /// Appends a run record; keys sort by start time.
    pub(crate) fn put_run<T: Serialize>(&self, run_id: &str, run: &T) -> Result<(), StoreError> {
        self.runs.insert(run_id.as_bytes(), encode(run)?)?;
        // Keep the last 500 runs.
        while self.runs.len() > 500 {
            if self.runs.pop_min()?.is_none() {
                break;
            }
        }
        Ok(())
    }

    /// The newest `limit` runs, newest first.
    pub fn runs<T: DeserializeOwned>(&self, limit: usize) -> Result<Vec<T>, StoreError> {
        let tree = format!("{}/runs", self.name);
        self.runs
            .iter()
            .rev()
            .take(limit)
            .map(|r| {
                let (k, v) = r?;
                decode(&tree, &k, &v)
            })
            .collect()
    }

    pub(crate) fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.meta.get(key.as_bytes())? {
            Some(b) => Ok(Some(decode(
                &format!("{}/meta", self.name),
                key.as_bytes(),
                &b,
            )?)),
            None => Ok(None),
        }
    }

    /// Blocks until everything written so far (in any tree) is on disk.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.users.flush()?;
        Ok(())
    }

    pub(crate) fn put_meta<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StoreError> {
        self.meta.insert(key.as_bytes(), encode(v)?)?;
        Ok(())
    }

    /// A manager's properties as last read from Graph (the manager `$select`).
    pub(crate) fn person(
        &self,
        entra_id: &str,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>, StoreError> {
        match self.people.get(entra_id.as_bytes())? {
            Some(v) => Ok(Some(decode(
                &format!("{}/people", self.name),
                entra_id.as_bytes(),
                &v,
            )?)),
            None => Ok(None),
        }
    }

    pub(crate) fn put_person(
        &self,
        entra_id: &str,
        props: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), StoreError> {
        self.people.insert(entra_id.as_bytes(), encode(props)?)?;
        Ok(())
    }

    pub(crate) fn remove_person(&self, entra_id: &str) -> Result<(), StoreError> {
        self.people.remove(entra_id.as_bytes())?;
        Ok(())
    }

    pub(crate) fn is_person(&self, entra_id: &str) -> Result<bool, StoreError> {
        Ok(self.people.contains_key(entra_id.as_bytes())?)
    }

    pub(crate) fn remove_meta(&self, key: &str) -> Result<(), StoreError> {
        self.meta.remove(key.as_bytes())?;
        Ok(())
    }
}

/// A run id that sorts by time: `20261128T070000Z-1a2b3c4d`.
pub(crate) fn new_run_id() -> String {
    let now = Utc::now();
    let rand = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", now.format("%Y%m%dT%H%M%S%.3fZ"), &rand[..8])
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::record::{AttrValue, ACTIVE};

    #[test]
    fn only_sleds_lock_conflict_is_reported_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let first = Store::open(&data).unwrap();
        // flock is per open file: a second handle in this process conflicts as another
        // process would.
        let asked = std::time::Instant::now();
        match Store::open_unless_locked(&data) {
            Err(StoreError::Locked(p)) => assert_eq!(p, data),
            other => panic!("expected Locked, got {:?}", other.map(|_| ())),
        }
        assert!(asked.elapsed() < LOCK_WAIT, "reported without the wait");
        // A handle let go of during the wait (a restart, a test reopening) is waited for.
        let held = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(first);
        });
        let second = Store::open(&data).expect("opened once the first handle is gone");
        held.join().unwrap();
        drop(second);
        // Not a lock: a data directory that is a file, a path with "lock" in its name.
        let file = dir.path().join("lockfile-block");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(Store::open(&file), Err(StoreError::Open { .. })));
        let io = sled::Error::Io(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            "lock WouldBlock Resource temporarily unavailable",
        ));
        assert!(!is_lock_conflict(&io));
        assert!(!is_lock_conflict(&sled::Error::Unsupported("lock".into())));
    }

    /// A temporary store and its integration "a" (keep the store alive with it).
    pub(crate) fn store_a() -> (Store, IntegrationStore) {
        let s = Store::temporary().unwrap();
        let a = s
            .integration(&IntegrationName::parse("a").unwrap())
            .unwrap();
        (s, a)
    }

    /// An index entry for unit tests: LMS id `target`, the given manager, no record.
    pub(crate) fn index_entry(target: &str, manager: Option<&str>) -> IndexEntry {
        IndexEntry {
            target_id: target.into(),
            user_name: format!("{target}@example.com"),
            record: Default::default(),
            manager: manager.map(str::to_string),
            linked: false,
            updated_at: Utc::now(),
            trace: None,
        }
    }

    fn entry(active: bool) -> IndexEntry {
        let mut record = Record::new();
        record.insert(ACTIVE.into(), AttrValue::Bool(active));
        IndexEntry {
            target_id: "t1".into(),
            user_name: "a@x".into(),
            record,
            manager: None,
            linked: false,
            updated_at: Utc::now(),
            trace: None,
        }
    }

    #[test]
    fn integrations_are_isolated() {
        let s = Store::temporary().unwrap();
        let a = s
            .integration(&IntegrationName::parse("a").unwrap())
            .unwrap();
        let b = s
            .integration(&IntegrationName::parse("b").unwrap())
            .unwrap();
        a.put_user("u1", &entry(true)).unwrap();
        assert!(a.get_user("u1").unwrap().is_some());
        assert!(b.get_user("u1").unwrap().is_none());
        assert_eq!(b.users().count(), 0);
    }

    #[test]
    fn runs_come_back_newest_first_and_corruption_is_reported() {
        let s = Store::temporary().unwrap();
        let a = s
            .integration(&IntegrationName::parse("a").unwrap())
            .unwrap();
        a.put_run("2026-01", &1u32).unwrap();
        a.put_run("2026-02", &2u32).unwrap();
        assert_eq!(a.runs::<u32>(10).unwrap(), vec![2, 1]);
        a.users.insert(b"bad", b"{not json".to_vec()).unwrap();
        let err = a.get_user("bad").unwrap_err().to_string();
        assert!(err.contains("a/users") && err.contains("bad"), "{err}");
        assert!(!entry(false).active());
    }

    #[test]
    fn only_active_users_can_be_linked_as_managers() {
        let (_s, a) = store_a();
        a.put_user("m1", &entry(true)).unwrap();
        a.put_user("m2", &entry(false)).unwrap();
        assert_eq!(a.linkable_target("m1").unwrap().as_deref(), Some("t1"));
        assert_eq!(a.linkable_target("m2").unwrap(), None);
        assert_eq!(a.linkable_target("m3").unwrap(), None);
    }

    #[test]
    fn open_creates_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("db");
        let s = Store::open(&p).unwrap();
        s.flush().unwrap();
        assert!(p.exists());
    }
}
