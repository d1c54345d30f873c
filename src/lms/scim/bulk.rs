//! SCIM Bulk (RFC 7644 §3.7), used when the LMS advertises it (`ServiceProviderConfig`
//! `bulk.supported`, with `maxOperations` and `maxPayloadSize`) and `target.bulk` is not off.
//!
//! The sync still applies one user at a time (intent, write, index entry); the writes that are
//! in flight together are gathered here into `POST /Bulk` requests: each create or PATCH joins
//! the queue, and whoever finds a free sending slot sends what is queued, within the limits,
//! as one request, and hands every operation's answer back to its caller. At most
//! [`IN_FLIGHT`] bulk requests are out at once, each through the pacer as one request.
//!
//! An operation's answer is read like the answer to its own request. What the bulk request as
//! a whole did not settle is handed back for the caller to send alone: a request refused
//! whole (413 shrinks the batches; 400/404/405/501 turn bulk off for this target, with a
//! note), an operation missing from the answer, or an answer that never came (then a create
//! is looked up before it is sent again).
//!
//! A create may ask to be linked to its manager, whose create is on its way too
//! ([`crate::lms::Target::create_with_manager`]). Its operation is built when its request is
//! made up: with `"manager": {"value": "bulkId:<the manager's bulkId>"}` when the manager's
//! operation is in the same request (RFC 7644 §3.7.2), with the manager's id when its create
//! has answered, without a manager when that create failed or is unknown here; while the
//! manager's operation is queued behind it or its request is out, the operation waits.
//! What is queued is shared among the free sending slots (at least a quarter of
//! `maxOperations` a request), so that requests answer sooner side by side rather than one
//! large one holding up the others. Whether the LMS really
//! resolves a `bulkId` in a manager is checked once (one user read back); an LMS that does not
//! gets no more references. A linked create the LMS refuses is sent again without the link.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

use super::{get_ci, ScimTarget};
use crate::lms::{Created, Target, TargetError};
use crate::model::record::{AttrChange, AttrValue, Record, EXTERNAL_ID, MANAGER};
use std::sync::atomic::Ordering;

const BULK_REQUEST: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";

/// Bulk requests out at once (each takes one place in the pacer's window).
pub(crate) const IN_FLIGHT: usize = 4;

/// Room kept in `maxPayloadSize` for the request's envelope.
const ENVELOPE: usize = 128;

/// Answered creates remembered for the links of creates that come a little later (a report
/// whose operation joins the queue just after its manager's request was answered).
const ANSWERED_KEPT: usize = 4096;

/// What the LMS advertises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_operations: usize,
    pub max_payload_size: usize,
}

impl Limits {
    /// `ServiceProviderConfig.bulk`, when it says bulk is supported with usable limits.
    pub(crate) fn advertised(spc: &Value) -> Option<Limits> {
        let bulk = get_ci(spc, "bulk")?;
        if super::lenient_bool(get_ci(bulk, "supported")) != Some(true) {
            return None;
        }
        let num = |k: &str| {
            let v = get_ci(bulk, k)?;
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
        };
        let max_operations = usize::try_from(num("maxOperations")?).ok()?;
        // A server that names no payload limit gets 1 MiB, the size most advertise.
        let max_payload_size = num("maxPayloadSize")
            .and_then(|n| usize::try_from(n).ok())
            .filter(|n| *n > 0)
            .unwrap_or(1 << 20);
        (max_operations >= 2 && max_payload_size > 4 * ENVELOPE).then_some(Limits {
            max_operations: max_operations.min(10_000),
            max_payload_size,
        })
    }
}

/// One operation's answer in a `BulkResponse`.
#[derive(Clone, Debug)]
pub(crate) struct OpAnswer {
    pub status: u16,
    pub location: Option<String>,
    /// The error body of a failed operation (or the resource, when the server sends it).
    pub response: Option<Value>,
    /// A create that asked for a link was sent with one (a `bulkId` or an id).
    pub linking: bool,
    /// The manager's LMS id, when the create succeeded linked to it.
    pub manager: Option<String>,
}

/// What became of an operation given to the bulk queue.
#[derive(Debug)]
pub(crate) enum OpOutcome {
    /// Bulk is not in use (not advertised, turned off, or the operation alone is too large).
    Off,
    /// The LMS answered this operation.
    Answered(OpAnswer),
    /// Not carried out: send it alone.
    NotSent,
    /// The request may or may not have been carried out (no answer, a server error): look
    /// before sending it alone.
    Unknown,
    /// The LMS refused the request in a way that concerns every operation in it.
    Failed(TargetError),
}

struct Pending {
    op: Value,
    size: usize,
    tx: oneshot::Sender<OpOutcome>,
    /// The externalId a create gives its user (later creates may link to it).
    creates: Option<String>,
    /// The link this create asks for.
    ask: Option<Ask>,
    /// How the operation as built now names that manager.
    via: Via,
}

/// A create asking to be linked to a manager created in this run.
struct Ask {
    /// The manager's externalId.
    manager: String,
    /// The user's record without a manager: the operation is built from it again once it is
    /// known how the manager is named.
    record: Record,
}

/// How an operation names the manager its create asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Via {
    /// Not at all.
    Unlinked,
    /// By the `bulkId` of the manager's create, in the same request.
    Ref(String),
    /// By the manager's LMS id (its create answered earlier).
    Id(String),
}

/// Where the create of a user (by externalId) is.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Stage {
    /// Waiting for a request, under this bulkId.
    Queued(String),
    /// In a request that has not answered yet.
    Sent(String),
    /// Answered: the new user's id, `None` when it was not created (or not here).
    Answered(Option<String>),
}

/// Whether the LMS resolves a `bulkId` in a new user's manager.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Refs {
    #[default]
    Unverified,
    Trusted,
    Off,
}

#[derive(Default)]
struct State {
    limits: Option<Limits>,
    pending: VecDeque<Pending>,
    sending: usize,
    next_id: u64,
    /// Why bulk was turned off, once (for the notes).
    off_because: Option<String>,
    /// Creates by externalId, while queued or sent, and the last [`ANSWERED_KEPT`] answered.
    creates: HashMap<String, Stage>,
    answered: VecDeque<String>,
    refs: Refs,
    /// The last look found nothing that could go, and nothing changed since: the many callers
    /// woken together need not all look through the queue again.
    blocked: bool,
    /// Reads back of a referenced user that settled nothing (no answer, not found).
    unsettled_checks: u32,
}

/// Reads back that settle nothing before references are given up (an LMS whose reads lag
/// behind its writes would otherwise cost one read per bulk request).
const MAX_UNSETTLED_CHECKS: u32 = 3;

impl State {
    /// The create of `external_id` under `bulk_id` answered (`id`: the new user), or will not
    /// be answered here. A stage of another operation for the same user (a later create) is
    /// left as it is.
    fn answered(&mut self, external_id: &str, bulk_id: &str, id: Option<String>) {
        self.blocked = false;
        let mine = matches!(
            self.creates.get(external_id),
            Some(Stage::Queued(b) | Stage::Sent(b)) if b == bulk_id
        );
        if mine {
            self.creates
                .insert(external_id.to_string(), Stage::Answered(id));
            self.answered.push_back(external_id.to_string());
        }
        while self.answered.len() > ANSWERED_KEPT {
            if let Some(old) = self.answered.pop_front() {
                if matches!(self.creates.get(&old), Some(Stage::Answered(_))) {
                    self.creates.remove(&old);
                }
            }
        }
    }

    /// How an asking create can name its manager now: `None` while it must wait (the
    /// manager's create is queued behind or out in another request).
    fn via_for(&self, ask: &Ask, in_batch: &HashSet<String>) -> Option<Via> {
        match self.creates.get(&ask.manager) {
            Some(Stage::Sent(b)) if in_batch.contains(b) => {
                (self.refs != Refs::Off).then(|| Via::Ref(b.clone()))
            }
            Some(Stage::Queued(_) | Stage::Sent(_)) => None,
            Some(Stage::Answered(Some(id))) => Some(Via::Id(id.clone())),
            Some(Stage::Answered(None)) | None => Some(Via::Unlinked),
        }
    }
}

/// Builds a create's data from its record and a manager value (`None`: no manager).
type Build<'a> = &'a (dyn Fn(&Record, Option<&str>) -> Value + Sync);

fn op_size(op: &Value) -> usize {
    serde_json::to_vec(op)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// The queue of operations waiting for a bulk request.
#[derive(Default)]
pub(crate) struct Queue {
    state: Mutex<State>,
    changed: Notify,
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Uses bulk with these limits from now on (`None`: not at all, and what is queued is
    /// handed back to be sent alone). Answers remembered from earlier runs are forgotten (a
    /// user may have been deleted and created again in the LMS since).
    pub(crate) fn set_limits(&self, limits: Option<Limits>) {
        if limits.is_none() {
            self.drain();
        }
        let mut st = self.lock();
        st.limits = limits;
        st.off_because = None;
        st.creates.retain(|_, s| !matches!(s, Stage::Answered(_)));
        st.answered.clear();
    }

    /// Hands every queued operation back to its caller, to be sent alone.
    fn drain(&self) {
        let mut st = self.lock();
        let left: Vec<Pending> = st.pending.drain(..).collect();
        for p in &left {
            if let (Some(ext), Some(b)) = (&p.creates, bulk_id_of(p)) {
                st.answered(ext, b, None);
            }
        }
        drop(st);
        for p in left {
            let _ = p.tx.send(OpOutcome::NotSent);
        }
        self.changed.notify_waiters();
    }

    pub(crate) fn limits(&self) -> Option<Limits> {
        self.lock().limits
    }

    /// Turns bulk off for this target (the LMS refused `/Bulk` itself); returns the note to
    /// give, once.
    fn turn_off(&self, why: String) -> Option<String> {
        let mut st = self.lock();
        if st.limits.take().is_some() {
            st.off_because = Some(why.clone());
            drop(st);
            // What is still queued is sent alone by its callers.
            self.drain();
            return Some(why);
        }
        None
    }

    /// Takes the next batch when a sending slot is free: the queued operations in order,
    /// within the limits, each asking create built with how it can name its manager now
    /// (those that must wait for a manager's answer stay queued).
    fn take_batch(&self, build: Build<'_>) -> Option<Vec<Pending>> {
        let mut st = self.lock();
        let limits = st.limits?;
        if st.pending.is_empty() || st.sending >= IN_FLIGHT || st.blocked {
            return None;
        }
        // What is queued is shared out among the free sending slots (at least a quarter of
        // `maxOperations` a request): requests in parallel, each answered sooner (an LMS takes
        // longer over a larger request), rather than one large request while the others wait.
        let free = IN_FLIGHT.saturating_sub(st.sending).max(1);
        let share = st
            .pending
            .len()
            .div_ceil(free)
            .max(limits.max_operations / IN_FLIGHT)
            .clamp(1, limits.max_operations);
        let mut batch = Vec::new();
        let mut bytes = ENVELOPE;
        let mut in_batch: HashSet<String> = HashSet::new();
        let mut rest = VecDeque::with_capacity(st.pending.len());
        let mut full = false;
        for mut p in std::mem::take(&mut st.pending) {
            if full {
                rest.push_back(p);
                continue;
            }
            if let Some(ask) = &p.ask {
                let Some(via) = st.via_for(ask, &in_batch) else {
                    rest.push_back(p);
                    continue;
                };
                if via != p.via {
                    let value = match &via {
                        Via::Unlinked => None,
                        Via::Ref(b) => Some(format!("bulkId:{b}")),
                        Via::Id(id) => Some(id.clone()),
                    };
                    p.op["data"] = build(&ask.record, value.as_deref());
                    p.size = op_size(&p.op);
                    p.via = via;
                }
            }
            if batch.len() >= share
                || (!batch.is_empty() && bytes + p.size + 1 > limits.max_payload_size)
            {
                full = true;
                rest.push_back(p);
                continue;
            }
            bytes += p.size + 1;
            if let Some(ext) = &p.creates {
                if let Some(Stage::Queued(b)) = st.creates.get(ext) {
                    let b = b.clone();
                    in_batch.insert(b.clone());
                    st.creates.insert(ext.clone(), Stage::Sent(b));
                }
            }
            batch.push(p);
        }
        st.pending = rest;
        if batch.is_empty() {
            st.blocked = true;
            return None;
        }
        st.sending += 1;
        Some(batch)
    }
}

/// Gives a sending slot back, also when its sender is dropped mid-request; creates of its
/// request still without an answer then count as not created here (creates linking to them
/// go without the link rather than wait for ever).
struct Slot<'a> {
    queue: &'a Queue,
    /// (externalId, bulkId) of the creates in the request.
    creates: Vec<(String, String)>,
}

impl<'a> Slot<'a> {
    fn new(queue: &'a Queue, batch: &[Pending]) -> Slot<'a> {
        let creates = batch
            .iter()
            .filter_map(|p| Some((p.creates.clone()?, bulk_id_of(p)?.to_string())))
            .collect();
        Slot { queue, creates }
    }
}

/// The bulkId of a queued operation.
fn bulk_id_of(p: &Pending) -> Option<&str> {
    p.op.get("bulkId").and_then(Value::as_str)
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut st = self.queue.lock();
        st.sending -= 1;
        for (ext, b) in &self.creates {
            if matches!(st.creates.get(ext), Some(Stage::Sent(s)) if s == b) {
                st.answered(ext, b, None);
            }
        }
        drop(st);
        self.queue.changed.notify_waiters();
    }
}

impl ScimTarget {
    /// Whether writes go through `/Bulk` now.
    pub(crate) fn bulk_on(&self) -> bool {
        self.bulk.limits().is_some()
    }

    /// Runs one operation (`method` on `path` with `data`) within a bulk request. A create
    /// names the externalId it gives (`creates`), and may ask to be linked to a manager
    /// created in this run (`ask`: the manager's externalId and the record `data` was built
    /// from).
    async fn bulk_op(
        &self,
        method: &'static str,
        path: String,
        data: Value,
        creates: Option<&str>,
        ask: Option<(&str, &Record)>,
    ) -> OpOutcome {
        let (tx, mut rx) = oneshot::channel();
        {
            let mut st = self.bulk.lock();
            if let Some(ext) = creates {
                // An earlier create of this user is stale for links (this one, if queued, is
                // registered below; if sent alone, it is not known here).
                st.creates.remove(ext);
            }
            let Some(limits) = st.limits else {
                return OpOutcome::Off;
            };
            st.next_id += 1;
            let bulk_id = format!("rs{}", st.next_id);
            let op = json!({
                "method": method,
                "bulkId": bulk_id,
                "path": path,
                "data": data,
            });
            let size = op_size(&op);
            // A link adds a manager value: keep room for it.
            let room = if ask.is_some() {
                2 * ENVELOPE
            } else {
                ENVELOPE
            };
            if size.saturating_add(room) > limits.max_payload_size {
                return OpOutcome::Off;
            }
            if let Some(ext) = creates.filter(|e| !e.is_empty()) {
                st.creates.insert(ext.to_string(), Stage::Queued(bulk_id));
            }
            st.blocked = false;
            st.pending.push_back(Pending {
                op,
                size,
                tx,
                creates: creates.map(str::to_string),
                ask: ask.map(|(manager, record)| Ask {
                    manager: manager.to_string(),
                    record: record.clone(),
                }),
                via: Via::Unlinked,
            });
        }
        // The writes started together queue up before the first batch is taken.
        tokio::task::yield_now().await;
        let build = |record: &Record, manager: Option<&str>| match manager {
            Some(m) => {
                let mut r = record.clone();
                r.insert(MANAGER.into(), AttrValue::Str(m.to_string()));
                self.resource(&r)
            }
            None => self.resource(record),
        };
        loop {
            let changed = self.bulk.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Ok(out) = rx.try_recv() {
                return out;
            }
            if let Some(batch) = self.bulk.take_batch(&build) {
                let _slot = Slot::new(&self.bulk, &batch);
                self.send_bulk(batch).await;
                continue;
            }
            tokio::select! {
                out = &mut rx => return out.unwrap_or(OpOutcome::Unknown),
                () = &mut changed => {}
            }
        }
    }

    /// Sends one batch and hands each operation its outcome.
    async fn send_bulk(&self, batch: Vec<Pending>) {
        let n = batch.len();
        let ops: Vec<&Value> = batch.iter().map(|p| &p.op).collect();
        let body = json!({"schemas": [BULK_REQUEST], "Operations": ops});
        let answer = self
            .send_answer(reqwest::Method::POST, "/Bulk", Some(&body), false)
            .await;
        let a = match answer {
            Ok(a) => a,
            Err(e) => {
                let unknown = e.outcome_unknown();
                tracing::debug!(operations = n, error = %e, "bulk request failed");
                for p in batch {
                    let _ = p.tx.send(if unknown {
                        OpOutcome::Unknown
                    } else {
                        OpOutcome::Failed(e.clone())
                    });
                }
                return;
            }
        };
        let refuse_all = |batch: Vec<Pending>, out: fn() -> OpOutcome| {
            for p in batch {
                let _ = p.tx.send(out());
            }
        };
        match a.status {
            200 => {}
            413 => {
                // Smaller requests from now on, these operations first among them; below two
                // operations a request, bulk is given up.
                let bytes: usize = batch.iter().map(|p| p.size + 1).sum();
                let mut st = self.bulk.lock();
                let smaller = match st.limits.as_mut() {
                    Some(l) if n / 2 >= 2 => {
                        l.max_operations = (n / 2).min(l.max_operations);
                        l.max_payload_size = l.max_payload_size.min(bytes / 2 + ENVELOPE);
                        true
                    }
                    _ => false,
                };
                if smaller {
                    for p in batch.into_iter().rev() {
                        if let (Some(ext), Some(b)) = (&p.creates, bulk_id_of(&p)) {
                            if matches!(st.creates.get(ext), Some(Stage::Sent(s)) if s == b) {
                                st.creates.insert(ext.clone(), Stage::Queued(b.to_string()));
                            }
                        }
                        st.pending.push_front(p);
                    }
                    st.blocked = false;
                    drop(st);
                    tracing::info!(
                        operations = n,
                        "the LMS refused a bulk request as too large (413); sending smaller ones"
                    );
                    return;
                }
                drop(st);
                if let Some(note) = self.bulk.turn_off(format!(
                    "the LMS refused a bulk request of {n} operations as too large (413); sending one request per user"
                )) {
                    tracing::warn!("{note}");
                    self.note(note);
                }
                return refuse_all(batch, || OpOutcome::NotSent);
            }
            400 | 404 | 405 | 501 => {
                let e = self.error("POST", "/Bulk", a.status, &a.body);
                if let Some(note) = self.bulk.turn_off(format!(
                    "the LMS advertises SCIM bulk but refused POST /Bulk ({e}); sending one request per user"
                )) {
                    tracing::warn!("{note}");
                    self.note(note);
                }
                return refuse_all(batch, || OpOutcome::NotSent);
            }
            401 => return refuse_all(batch, || OpOutcome::Failed(TargetError::Unauthorized)),
            // No processing before a throttle (429 is retried by `send_answer` itself until
            // `throttle_wait`); a 5xx may come after some operations ran.
            s if s >= 500 => return refuse_all(batch, || OpOutcome::Unknown),
            _ => return refuse_all(batch, || OpOutcome::NotSent),
        }
        let parsed: Option<Value> = serde_json::from_slice(&a.body).ok();
        let answers: Vec<&Value> = parsed
            .as_ref()
            .and_then(|v| get_ci(v, "Operations"))
            .and_then(Value::as_array)
            .map(|a| a.iter().collect())
            .unwrap_or_default();
        if parsed.is_none() || answers.is_empty() {
            // A 200 we cannot read: what ran is unknown.
            return refuse_all(batch, || OpOutcome::Unknown);
        }
        let mut found: Vec<Option<OpAnswer>> = batch
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let bulk_id = bulk_id_of(p);
                answers
                    .iter()
                    .find(|x| get_ci(x, "bulkId").and_then(Value::as_str) == bulk_id)
                    .or_else(|| {
                        // A server that echoes no bulkId: answers in request order.
                        answers.get(i).filter(|x| get_ci(x, "bulkId").is_none())
                    })
                    .and_then(|x| op_answer(x))
            })
            .collect();
        // The creates' new ids, by bulkId, for the links to them.
        let mut made: HashMap<String, String> = HashMap::new();
        {
            let mut st = self.bulk.lock();
            for (p, a) in batch.iter().zip(&found) {
                let (Some(ext), Some(b)) = (&p.creates, bulk_id_of(p)) else {
                    continue;
                };
                let id = a.as_ref().and_then(created_id);
                if let Some(id) = &id {
                    made.insert(b.to_string(), id.clone());
                }
                st.answered(ext, b, id);
            }
        }
        self.bulk.changed.notify_waiters();
        self.settle_links(&batch, &mut found, &made).await;
        for (p, a) in batch.into_iter().zip(found) {
            let out = match a {
                Some(ans) => OpOutcome::Answered(ans),
                // Left out (failOnErrors reached, or a partial answer): not carried out.
                None => OpOutcome::NotSent,
            };
            let _ = p.tx.send(out);
        }
    }

    /// Marks the answers of creates sent with a link: `linking`, and the manager's id when
    /// the user was created linked to it. A `bulkId` reference counts only once the LMS is
    /// known to resolve it in a manager: the first time, one user created with one is read
    /// back; an LMS that kept something else gets no more references (with a note), and the
    /// users of this request are linked afterwards like any other.
    async fn settle_links(
        &self,
        batch: &[Pending],
        found: &mut [Option<OpAnswer>],
        made: &HashMap<String, String>,
    ) {
        let ok = |a: &OpAnswer| (200..300).contains(&a.status);
        let mut referenced: Vec<(usize, String)> = Vec::new();
        for (i, (p, a)) in batch.iter().zip(found.iter_mut()).enumerate() {
            let Some(a) = a else { continue };
            a.linking = p.via != Via::Unlinked;
            match &p.via {
                Via::Id(id) if ok(a) => a.manager = Some(id.clone()),
                Via::Ref(b) if ok(a) => {
                    if let Some(m) = made.get(b) {
                        referenced.push((i, m.clone()));
                    }
                }
                _ => {}
            }
        }
        let Some((first, manager)) = referenced.first().cloned() else {
            return;
        };
        let refs = self.bulk.lock().refs;
        let trusted = match refs {
            Refs::Trusted => true,
            Refs::Off => false,
            Refs::Unverified => {
                let user = found[first].as_ref().and_then(created_id);
                match user {
                    Some(u) => self.verify_reference(&u, &manager).await,
                    None => false,
                }
            }
        };
        if trusted {
            for (i, m) in referenced {
                if let Some(a) = found[i].as_mut() {
                    a.manager = Some(m);
                }
            }
        }
    }

    /// Reads back a user created with a `bulkId` reference to its manager (`manager`: the
    /// manager's new id) and remembers whether the LMS resolved it. An unreadable answer
    /// proves nothing either way: false, and the next request asks again.
    async fn verify_reference(&self, user: &str, manager: &str) -> bool {
        let held = match self.get(user).await {
            Ok(Some(u)) => u.record.get(MANAGER).cloned(),
            Ok(None) | Err(_) => {
                let mut st = self.bulk.lock();
                st.unsettled_checks += 1;
                if st.unsettled_checks >= MAX_UNSETTLED_CHECKS && st.refs == Refs::Unverified {
                    st.refs = Refs::Off;
                    drop(st);
                    self.note(format!(
                        "a user created with a SCIM bulk bulkId reference to its manager could not be read back {MAX_UNSETTLED_CHECKS} times; managers are now linked once their own create has answered"
                    ));
                }
                return false;
            }
        };
        let resolved = held == Some(AttrValue::Str(manager.to_string()));
        let mut st = self.bulk.lock();
        if st.refs != Refs::Unverified {
            return resolved && st.refs == Refs::Trusted;
        }
        st.refs = if resolved { Refs::Trusted } else { Refs::Off };
        drop(st);
        if !resolved {
            let kept = match &held {
                Some(v) => format!("{v:?}"),
                None => "no manager".into(),
            };
            let note = format!(
                "the LMS does not resolve a SCIM bulk bulkId reference in a new user's manager (it kept {kept}); managers are now linked once their own create has answered"
            );
            tracing::warn!("{note}");
            self.note(note);
        }
        resolved
    }
}

/// Whether a linked create's answer may be a refusal of the link: a 4xx other than a throttle
/// or a 409 that says the user exists (`scimType` `uniqueness`). An unresolvable `bulkId` is
/// refused with 409 `invalidValue`, 400 or 404 by the servers we know.
fn refused_link(a: &OpAnswer) -> bool {
    let scim_type = a
        .response
        .as_ref()
        .and_then(|r| get_ci(r, "scimType"))
        .and_then(Value::as_str);
    (400..500).contains(&a.status)
        && a.status != 429
        && !(a.status == 409 && scim_type.is_some_and(|t| t.eq_ignore_ascii_case("uniqueness")))
}

/// The id of the user an answered create made: from `location`, else from the resource in the
/// answer; `None` for a failed one.
fn created_id(a: &OpAnswer) -> Option<String> {
    if !matches!(a.status, 200 | 201) {
        return None;
    }
    a.location
        .as_deref()
        .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| {
            a.response
                .as_ref()
                .and_then(|r| get_ci(r, "id")?.as_str().map(str::to_string))
        })
}

impl ScimTarget {
    /// A create sent within a bulk request (`manager`: the externalId of a manager created in
    /// this run to link it to, see [`ScimTarget::bulk_op`]): `Ok(Some(_))` when the bulk
    /// answer settled it (the new id, or `None` for a conflict the caller looks up, and the
    /// manager it was linked to), `Ok(None)` to send it again without a link (alone, or in a
    /// later bulk request).
    pub(crate) async fn create_in_bulk(
        &self,
        record: &Record,
        body: &Value,
        manager: Option<&str>,
    ) -> Result<Option<Created>, TargetError> {
        if !self.bulk_on() {
            return Ok(None);
        }
        let looked_up = |id: Option<String>| async move {
            let id = id?;
            self.remember_created(&id, record).await;
            Some(Created::unlinked(Some(id)))
        };
        let external_id = super::string_of(record, EXTERNAL_ID);
        let ask = manager.map(|m| (m, record));
        let out = self
            .bulk_op(
                "POST",
                "/Users".into(),
                body.clone(),
                Some(&external_id),
                ask,
            )
            .await;
        match out {
            OpOutcome::Off | OpOutcome::NotSent => Ok(None),
            OpOutcome::Failed(e) => Err(e),
            // Maybe created: look before posting alone.
            OpOutcome::Unknown => Ok(looked_up(self.find_created(record).await?).await),
            // A linked create refused: sent again without the link (a refusal of its own
            // comes again then, and is read as always). Not a 5xx (maybe created: looked up
            // below), a throttle, or a 409 saying the userName exists.
            OpOutcome::Answered(a) if a.linking && refused_link(&a) => {
                tracing::debug!(
                    status = a.status,
                    "a linked create was refused in bulk; sending it again without the link"
                );
                Ok(None)
            }
            OpOutcome::Answered(a) => match a.status {
                200 | 201 => {
                    let id = match created_id(&a) {
                        Some(id) => Some(id),
                        None => self.find_created(record).await?,
                    };
                    // No id even so: a conflict for the caller to look up.
                    Ok(Some(match looked_up(id).await {
                        Some(c) => Created {
                            manager: a.manager,
                            ..c
                        },
                        None => Created::unlinked(None),
                    }))
                }
                409 => {
                    self.conflicts.fetch_add(1, Ordering::SeqCst);
                    Ok(Some(Created::unlinked(None)))
                }
                429 => Ok(None),
                s if s >= 500 => Ok(looked_up(self.find_created(record).await?).await),
                s => {
                    let bytes = a
                        .response
                        .map(|r| r.to_string().into_bytes())
                        .unwrap_or_default();
                    Err(self.error("POST", "/Users", s, &bytes))
                }
            },
        }
    }

    /// An update sent as one PATCH within a bulk request when the dialect takes it as one
    /// (no PUT, nothing it cannot write): true when done. Anything else the bulk answer did not
    /// settle is sent alone, where a refusal teaches the dialect.
    pub(crate) async fn update_in_bulk(
        &self,
        id: &str,
        changes: &[AttrChange],
        record: &Record,
    ) -> Result<bool, TargetError> {
        if !self.bulk_on() || changes.is_empty() {
            return Ok(false);
        }
        let d = self.dialect();
        let plan = super::write::plan(&d, changes, record, &|k| self.place(k));
        if plan.patch.is_empty() || !plan.put.is_empty() || !plan.impossible.is_empty() {
            return Ok(false);
        }
        let ops: Vec<&Value> = plan.patch.iter().map(|p| &p.op).collect();
        let data = json!({"schemas": [super::PATCH_OP], "Operations": ops});
        let path = format!("/Users/{}", crate::text::urlencode(id));
        match self.bulk_op("PATCH", path, data, None, None).await {
            OpOutcome::Answered(a) => match a.status {
                200 | 204 => Ok(true),
                404 => Err(TargetError::NotFound(id.to_string())),
                _ => Ok(false),
            },
            OpOutcome::Failed(e) => Err(e),
            // PATCH is sent again as it is when its fate is unknown, alone as in bulk.
            OpOutcome::Off | OpOutcome::NotSent | OpOutcome::Unknown => Ok(false),
        }
    }
}

/// One entry of a `BulkResponse`: status (a string per RFC 7644, a number from some servers),
/// location and response.
fn op_answer(x: &Value) -> Option<OpAnswer> {
    let status = get_ci(x, "status")?;
    let status = match status {
        Value::Number(n) => u16::try_from(n.as_u64()?).ok()?,
        Value::String(s) => s.trim().get(..3)?.parse().ok()?,
        // RFC 7644's own examples once nested it: {"status": {"code": "201"}}.
        Value::Object(_) => get_ci(status, "code")
            .and_then(|c| c.as_u64().or_else(|| c.as_str()?.trim().parse().ok()))
            .and_then(|c| u16::try_from(c).ok())?,
        _ => return None,
    };
    Some(OpAnswer {
        status,
        location: get_ci(x, "location")
            .and_then(Value::as_str)
            .map(str::to_string),
        response: get_ci(x, "response").cloned(),
        linking: false,
        manager: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_read_tolerantly_and_only_when_bulk_is_supported() {
        let spc = |b: Value| json!({"bulk": b});
        assert_eq!(
            Limits::advertised(&spc(
                json!({"supported": true, "maxOperations": 1000, "maxPayloadSize": 1048576})
            )),
            Some(Limits {
                max_operations: 1000,
                max_payload_size: 1_048_576
            })
        );
        assert_eq!(
            Limits::advertised(&spc(json!({"Supported": "True", "maxoperations": "50"}))),
            Some(Limits {
                max_operations: 50,
                max_payload_size: 1 << 20
            }),
            "strings, any case, no payload limit"
        );
        assert_eq!(
            Limits::advertised(&spc(json!({"supported": false, "maxOperations": 1000}))),
            None
        );
        assert_eq!(
            Limits::advertised(&spc(json!({"supported": true, "maxOperations": 0}))),
            None
        );
        assert_eq!(Limits::advertised(&spc(json!({"supported": true}))), None);
        assert_eq!(Limits::advertised(&json!({})), None);
    }

    /// A queue with these limits and creates pushed as the bulk client does: (bulkId,
    /// externalId, the externalId of the manager it asks to be linked to).
    fn queue(max_operations: usize, ops: &[(&str, &str, Option<&str>)]) -> Queue {
        let q = Queue::default();
        q.set_limits(Some(Limits {
            max_operations,
            max_payload_size: 1 << 20,
        }));
        for (bulk_id, ext, ask) in ops {
            let (tx, _) = oneshot::channel();
            let mut st = q.lock();
            st.creates
                .insert(ext.to_string(), Stage::Queued(bulk_id.to_string()));
            let op = json!({"method": "POST", "bulkId": bulk_id, "path": "/Users", "data": {"externalId": ext}});
            st.pending.push_back(Pending {
                size: op_size(&op),
                op,
                tx,
                creates: Some(ext.to_string()),
                ask: ask.map(|m| Ask {
                    manager: m.to_string(),
                    record: Record::new(),
                }),
                via: Via::Unlinked,
            });
        }
        q
    }

    fn build(_: &Record, manager: Option<&str>) -> Value {
        json!({ "manager": manager })
    }

    /// (externalId, manager value) of each operation of the next batch.
    fn take(q: &Queue) -> Vec<(String, Value)> {
        q.take_batch(&build)
            .unwrap_or_default()
            .into_iter()
            .map(|p| {
                let ext = p.creates.clone().unwrap_or_default();
                (
                    ext,
                    p.op["data"].get("manager").cloned().unwrap_or(Value::Null),
                )
            })
            .collect()
    }

    #[test]
    fn a_create_references_its_managers_bulk_id_in_the_same_request() {
        let q = queue(
            40,
            &[
                ("rs1", "A", None),
                ("rs2", "B", Some("A")),
                ("rs3", "C", Some("B")),
            ],
        );
        assert_eq!(
            take(&q),
            vec![
                ("A".into(), Value::Null),
                ("B".into(), json!("bulkId:rs1")),
                ("C".into(), json!("bulkId:rs2")),
            ]
        );
    }

    #[test]
    fn what_is_queued_is_shared_among_the_free_sending_slots() {
        let names: Vec<(String, String)> = (0..1600)
            .map(|i| (format!("rs{i}"), format!("u{i}")))
            .collect();
        let ops: Vec<(&str, &str, Option<&str>)> = names
            .iter()
            .map(|(b, e)| (b.as_str(), e.as_str(), None))
            .collect();
        let q = queue(1000, &ops);
        // 1,600 queued, 4 slots free: 400 each, not 1,000 and then 600.
        let sizes: Vec<usize> = (0..4).map(|_| take(&q).len()).collect();
        assert_eq!(sizes, vec![400, 400, 400, 400]);
        // Few queued: at least a quarter of maxOperations a request.
        let q = queue(1000, &ops[..300]);
        assert_eq!(take(&q).len(), 250);
    }

    #[test]
    fn a_create_whose_manager_went_in_another_request_waits_for_its_answer() {
        let q = queue(
            1,
            &[
                ("rs1", "A", None),
                ("rs2", "B", Some("A")),
                ("rs3", "C", Some("B")),
            ],
        );
        assert_eq!(take(&q), vec![("A".into(), Value::Null)]);
        // B waits for A's answer, C for B's create: nothing else can go.
        assert_eq!(take(&q), vec![]);
        q.lock().answered("A", "rs1", Some("id-a".into()));
        assert_eq!(take(&q), vec![("B".into(), json!("id-a"))]);
        // B's create failed: C goes without a link (linked at the end of the run).
        q.lock().answered("B", "rs2", None);
        assert_eq!(take(&q), vec![("C".into(), Value::Null)]);
        assert!(q.lock().pending.is_empty());
    }

    #[test]
    fn a_request_dropped_unanswered_does_not_hold_the_creates_linked_to_it() {
        let q = queue(1, &[("rs1", "A", None), ("rs2", "B", Some("A"))]);
        let batch = q.take_batch(&build).unwrap_or_default();
        let slot = Slot::new(&q, &batch);
        assert_eq!(take(&q), vec![]);
        drop(slot);
        assert_eq!(take(&q), vec![("B".into(), Value::Null)]);
    }

    #[test]
    fn turning_bulk_off_hands_every_queued_operation_back() {
        let q = queue(10, &[("rs1", "A", None)]);
        let (tx, mut rx) = oneshot::channel();
        q.lock().pending.push_back(Pending {
            op: json!({}),
            size: 2,
            tx,
            creates: None,
            ask: None,
            via: Via::Unlinked,
        });
        assert!(q.turn_off("refused".into()).is_some());
        assert!(matches!(rx.try_recv(), Ok(OpOutcome::NotSent)));
        assert!(q.lock().pending.is_empty());
        assert_eq!(q.lock().creates.get("A"), Some(&Stage::Answered(None)));
        assert!(q.turn_off("again".into()).is_none(), "said once");
    }

    #[test]
    fn an_lms_that_does_not_resolve_references_gets_ids_only() {
        let q = queue(40, &[("rs1", "A", None), ("rs2", "B", Some("A"))]);
        q.lock().refs = Refs::Off;
        assert_eq!(take(&q), vec![("A".into(), Value::Null)]);
        q.lock().answered("A", "rs1", Some("id-a".into()));
        assert_eq!(take(&q), vec![("B".into(), json!("id-a"))]);
    }

    #[test]
    fn operation_answers_take_every_status_shape() {
        let s = |v: Value| op_answer(&json!({"status": v})).map(|a| a.status);
        assert_eq!(s(json!("201")), Some(201));
        assert_eq!(s(json!(409)), Some(409));
        assert_eq!(s(json!("200 OK")), Some(200));
        assert_eq!(s(json!({"code": "400"})), Some(400));
        assert_eq!(s(json!(null)), None);
        assert_eq!(s(json!("x")), None);
    }
}
