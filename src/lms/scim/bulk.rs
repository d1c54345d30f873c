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

use std::collections::VecDeque;
use std::sync::Mutex;

use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

use super::{get_ci, ScimTarget};
use crate::lms::TargetError;
use crate::model::record::{AttrChange, Record};
use std::sync::atomic::Ordering;

const BULK_REQUEST: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";

/// Bulk requests out at once (each takes one place in the pacer's window).
pub(crate) const IN_FLIGHT: usize = 4;

/// Room kept in `maxPayloadSize` for the request's envelope.
const ENVELOPE: usize = 128;

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
}

#[derive(Default)]
struct State {
    limits: Option<Limits>,
    pending: VecDeque<Pending>,
    sending: usize,
    next_id: u64,
    /// Why bulk was turned off, once (for the notes).
    off_because: Option<String>,
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

    /// Uses bulk with these limits from now on (`None`: not at all).
    pub(crate) fn set_limits(&self, limits: Option<Limits>) {
        let mut st = self.lock();
        st.limits = limits;
        st.off_because = None;
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
            return Some(why);
        }
        None
    }

    /// Takes the next batch when a sending slot is free.
    fn take_batch(&self) -> Option<Vec<Pending>> {
        let mut st = self.lock();
        let limits = st.limits?;
        if st.pending.is_empty() || st.sending >= IN_FLIGHT {
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = ENVELOPE;
        while let Some(p) = st.pending.front() {
            if batch.len() >= limits.max_operations
                || (!batch.is_empty() && bytes + p.size + 1 > limits.max_payload_size)
            {
                break;
            }
            bytes += p.size + 1;
            if let Some(p) = st.pending.pop_front() {
                batch.push(p);
            }
        }
        st.sending += 1;
        Some(batch)
    }
}

/// Gives a sending slot back, also when its sender is dropped mid-request.
struct Slot<'a>(&'a Queue);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.lock().sending -= 1;
        self.0.changed.notify_waiters();
    }
}

impl ScimTarget {
    /// Whether writes go through `/Bulk` now.
    pub(crate) fn bulk_on(&self) -> bool {
        self.bulk.limits().is_some()
    }

    /// Runs one operation (`method` on `path` with `data`) within a bulk request.
    pub(crate) async fn bulk_op(
        &self,
        method: &'static str,
        path: String,
        data: Value,
    ) -> OpOutcome {
        let (tx, mut rx) = oneshot::channel();
        {
            let mut st = self.bulk.lock();
            let Some(limits) = st.limits else {
                return OpOutcome::Off;
            };
            st.next_id += 1;
            let op = json!({
                "method": method,
                "bulkId": format!("rs{}", st.next_id),
                "path": path,
                "data": data,
            });
            let size = serde_json::to_vec(&op)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if size.saturating_add(ENVELOPE) > limits.max_payload_size {
                return OpOutcome::Off;
            }
            st.pending.push_back(Pending { op, size, tx });
        }
        // The writes started together queue up before the first batch is taken.
        tokio::task::yield_now().await;
        loop {
            let changed = self.bulk.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Ok(out) = rx.try_recv() {
                return out;
            }
            if let Some(batch) = self.bulk.take_batch() {
                let _slot = Slot(&self.bulk);
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
                        st.pending.push_front(p);
                    }
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
        for (i, p) in batch.into_iter().enumerate() {
            let bulk_id = p.op.get("bulkId").and_then(Value::as_str);
            let found = answers
                .iter()
                .find(|x| get_ci(x, "bulkId").and_then(Value::as_str) == bulk_id)
                .or_else(|| {
                    // A server that echoes no bulkId: answers in request order.
                    answers.get(i).filter(|x| get_ci(x, "bulkId").is_none())
                });
            let out = match found.and_then(|x| op_answer(x)) {
                Some(ans) => OpOutcome::Answered(ans),
                // Left out (failOnErrors reached, or a partial answer): not carried out.
                None => OpOutcome::NotSent,
            };
            let _ = p.tx.send(out);
        }
    }
}

impl ScimTarget {
    /// A create sent within a bulk request: `Ok(Some(_))` when the bulk answer settled it (the
    /// new id, or `None` for a conflict the caller looks up), `Ok(None)` to send it alone.
    pub(crate) async fn create_in_bulk(
        &self,
        record: &Record,
        body: &Value,
    ) -> Result<Option<Option<String>>, TargetError> {
        if !self.bulk_on() {
            return Ok(None);
        }
        let looked_up = |id: Option<String>| async move {
            match id {
                Some(id) => {
                    self.remember_created(&id, record).await;
                    Some(Some(id))
                }
                None => None,
            }
        };
        match self.bulk_op("POST", "/Users".into(), body.clone()).await {
            OpOutcome::Off | OpOutcome::NotSent => Ok(None),
            OpOutcome::Failed(e) => Err(e),
            // Maybe created: look before posting alone.
            OpOutcome::Unknown => Ok(looked_up(self.find_created(record).await?).await),
            OpOutcome::Answered(a) => match a.status {
                200 | 201 => {
                    let id = a
                        .location
                        .as_deref()
                        .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .or_else(|| {
                            a.response
                                .as_ref()
                                .and_then(|r| get_ci(r, "id")?.as_str().map(str::to_string))
                        });
                    let id = match id {
                        Some(id) => Some(id),
                        None => self.find_created(record).await?,
                    };
                    Ok(Some(looked_up(id).await.flatten()))
                }
                409 => {
                    self.conflicts.fetch_add(1, Ordering::SeqCst);
                    Ok(Some(None))
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
        match self.bulk_op("PATCH", path, data).await {
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
