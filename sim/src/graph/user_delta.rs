//! User delta query, `GET /v1.0/users/delta` (also as `/users/microsoft.graph.delta`), following
//! Microsoft's "user: delta" and "Get incremental changes for users" pages:
//!
//! * Query: `$select` (user properties and `manager`; only the selected properties are tracked,
//!   `id` always; without `$select` Graph's default user properties), `$filter=id eq '…'` (OR-ed,
//!   at most 50 ids; without it every user of the tenant), `$deltatoken`, `$skiptoken`.
//!   `$expand`, `$top`, `$orderby` and other system options are refused with 400, as for groups.
//! * The initial round lists every matching user: `id`, the selected properties that have a
//!   value (Graph leaves out properties never set), and with `manager` selected
//!   `"manager@delta": [{"@odata.type": "#microsoft.graph.user", "id": "…"}]` for users who have
//!   a manager. Soft-deleted users appear as `{"id", "@removed": {"reason": "changed"}}`
//!   (Graph may report removals in an initial round too).
//! * Later rounds (from a deltaLink) list only users whose tracked state changed since the link
//!   was issued: a changed user carries `id`, every selected property that has a value and any
//!   property changed to null (Graph's default: "the old value is included" for unchanged ones),
//!   or with `Prefer: return=minimal` on the request that starts the round only the changed
//!   properties; `manager@delta` only when the manager changed: the new manager, or the removed
//!   one as `{"@odata.type", "id", "@removed": {"reason": "deleted"}}`. A soft delete is
//!   `{"id", "@removed": {"reason": "changed"}}`, a hard delete `{"reason": "deleted"}`, and a
//!   restored (or new) user is a whole object without annotation.
//! * A user's manager is what `GET /users/{id}/manager` answers: the manager of record while that
//!   user is live, so deleting, soft-deleting or restoring a manager changes the `manager@delta`
//!   of everyone who reports to them.
//! * Pages hold at most [`GraphSim::set_user_delta_page_size`] objects (default 200; Graph
//!   chooses its own page size), linked with `@odata.nextLink` (`$skiptoken`); the last page has
//!   `@odata.deltaLink` (`$deltatoken`). `$deltatoken=latest` answers only a deltaLink for
//!   "now"; an empty `$deltatoken=` (as in the 410 `Location`) starts a new initial round.
//! * Tokens: a deltaLink names a point in the tenant's change log and may be replayed (it answers
//!   the changes since that point again). [`GraphSim::expire_delta_tokens`] expires user tokens as
//!   well as group ones (`410 Gone` + `Location`); a token whose changes have been trimmed from
//!   the log (more than [`MAX_LOG`] logged changes ago) is also gone. An unknown `$deltatoken` is a
//!   400 `syncStateNotFound`, an unknown `$skiptoken` a 400 `Directory_ExpiredPageToken`.
//!
//! Cost: changes are logged only once a user delta token has been issued, and the initial
//! round's pages are rendered as they are fetched (from the ids fixed at the round's start), so a
//! tenant of 100,000 users holds no copy of itself per round.

use std::collections::{HashMap, HashSet, VecDeque};

use serde_json::{json, Map, Value};

use super::delta::{
    decode_skip, encode_skip, gone_at, parse_filter, parse_query, random_token, DeltaQuery,
    MAX_STORED,
};
use super::{graph_error, user_prop, ApiResponse, Ctx, GraphSim, SimUser, State, USER_DEFAULT};

const DEFAULT_USER_DELTA_PAGE: usize = 200;
/// Logged changes kept for deltaLinks; older ones are trimmed (their tokens answer 410).
pub(super) const MAX_LOG: usize = 200_000;

/// The part of a user that user delta tracks, as it was before a logged change.
#[derive(Clone, Debug)]
enum Tracked {
    Absent,
    SoftDeleted,
    Live {
        user: Box<SimUser>,
        /// The manager `GET /manager` answered then.
        manager: Option<String>,
    },
}

struct LogEntry {
    seq: u64,
    id: String,
    before: Tracked,
}

#[derive(Clone, Debug)]
struct Spec {
    /// Lower-cased user ids of `$filter`; None = every user.
    ids: Option<HashSet<String>>,
    /// Selected properties other than `id`.
    select: Vec<&'static str>,
    manager: bool,
    /// `$select`/`$filter` parts as sent (for the 410 Location).
    raw: Vec<String>,
}

impl Spec {
    fn matches(&self, id: &str) -> bool {
        self.ids
            .as_ref()
            .is_none_or(|ids| ids.contains(&id.to_lowercase()))
    }
}

struct Cursor {
    spec: Spec,
    /// Changes logged after this sequence number are the next round's.
    seq: u64,
    expired: bool,
    serial: u64,
}

enum Pages {
    /// Initial round: the user ids of each page, rendered when the page is fetched.
    Initial(Vec<Vec<String>>),
    /// A later round, rendered when it started.
    Rendered(Vec<Vec<Value>>),
}

struct Round {
    spec: Spec,
    pages: Pages,
    delta_token: String,
    expired: bool,
    serial: u64,
}

pub(super) struct UserDeltaState {
    /// Set once a user delta token has been issued: only then are changes logged.
    active: bool,
    seq: u64,
    log: VecDeque<LogEntry>,
    /// Cursors below this sequence lost changes to trimming.
    floor: u64,
    cursors: HashMap<String, Cursor>,
    rounds: HashMap<String, Round>,
    page_size: usize,
    serial: u64,
}

impl Default for UserDeltaState {
    fn default() -> Self {
        UserDeltaState {
            active: false,
            seq: 0,
            log: VecDeque::new(),
            floor: 0,
            cursors: HashMap::new(),
            rounds: HashMap::new(),
            page_size: DEFAULT_USER_DELTA_PAGE,
            serial: 0,
        }
    }
}

impl UserDeltaState {
    pub(super) fn expire_all(&mut self) {
        for c in self.cursors.values_mut() {
            c.expired = true;
        }
        for r in self.rounds.values_mut() {
            r.expired = true;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Change log (called by the State mutators before they change a user)
// ---------------------------------------------------------------------------------------------

impl State {
    /// The manager `GET /users/{id}/manager` answers for `u`.
    fn effective_manager(&self, u: &SimUser) -> Option<String> {
        u.manager_id
            .as_ref()
            .filter(|m| self.users.contains_key(m.as_str()))
            .cloned()
    }

    fn tracked(&self, id: &str) -> Tracked {
        if let Some(u) = self.users.get(id) {
            Tracked::Live {
                user: Box::new(u.clone()),
                manager: self.effective_manager(u),
            }
        } else if self.soft_deleted.contains_key(id) {
            Tracked::SoftDeleted
        } else {
            Tracked::Absent
        }
    }

    fn push_user_log(&mut self, id: &str) {
        let before = self.tracked(id);
        let d = &mut self.user_delta;
        d.seq += 1;
        d.log.push_back(LogEntry {
            seq: d.seq,
            id: id.to_string(),
            before,
        });
        while d.log.len() > MAX_LOG {
            if let Some(e) = d.log.pop_front() {
                d.floor = e.seq;
            }
        }
    }

    /// Records the tracked state of user `id` before a change. `liveness`: the user is about to
    /// appear, disappear, be soft-deleted or restored, which changes the manager of everyone
    /// who reports to them as well.
    pub(super) fn before_user_change(&mut self, id: &str, liveness: bool) {
        if !self.user_delta.active {
            return;
        }
        self.push_user_log(id);
        if liveness {
            let reports: Vec<String> = self
                .users
                .values()
                .filter(|u| u.manager_id.as_deref() == Some(id) && u.id != id)
                .map(|u| u.id.clone())
                .collect();
            for r in reports {
                self.push_user_log(&r);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// What a round can say about one user.
enum View {
    Absent,
    SoftDeleted,
    Live {
        /// Selected properties (nulls included).
        props: Map<String, Value>,
        manager: Option<String>,
    },
}

fn live_view(spec: &Spec, u: &SimUser, manager: Option<String>) -> View {
    let mut props = Map::new();
    for p in &spec.select {
        if let Some(v) = user_prop(u, p) {
            props.insert((*p).to_string(), Value::from(v));
        }
    }
    View::Live {
        props,
        manager: if spec.manager { manager } else { None },
    }
}

fn tracked_view(spec: &Spec, t: &Tracked) -> View {
    match t {
        Tracked::Absent => View::Absent,
        Tracked::SoftDeleted => View::SoftDeleted,
        Tracked::Live { user, manager } => live_view(spec, user, manager.clone()),
    }
}

fn current_view(s: &State, spec: &Spec, id: &str) -> View {
    if let Some(u) = s.users.get(id) {
        live_view(spec, u, s.effective_manager(u))
    } else if s.soft_deleted.contains_key(id) {
        View::SoftDeleted
    } else {
        View::Absent
    }
}

fn manager_entry(id: &str, removed: bool) -> Value {
    if removed {
        json!({ "@odata.type": "#microsoft.graph.user", "id": id, "@removed": { "reason": "deleted" } })
    } else {
        json!({ "@odata.type": "#microsoft.graph.user", "id": id })
    }
}

fn removed(id: &str, reason: &str) -> Value {
    json!({ "id": id, "@removed": { "reason": reason } })
}

/// A whole object (initial round, new or restored user): properties that have a value.
fn whole(id: &str, view: &View) -> Option<Value> {
    match view {
        View::Absent => None,
        View::SoftDeleted => Some(removed(id, "changed")),
        View::Live { props, manager } => {
            let mut o = Map::new();
            for (k, v) in props {
                if !v.is_null() {
                    o.insert(k.clone(), v.clone());
                }
            }
            o.insert("id".into(), json!(id));
            if let Some(m) = manager {
                o.insert("manager@delta".into(), json!([manager_entry(m, false)]));
            }
            Some(Value::Object(o))
        }
    }
}

/// What a later round says about a user whose state went from `old` to `new`; None when nothing
/// tracked changed.
fn change(id: &str, old: &View, new: &View, minimal: bool) -> Option<Value> {
    match (old, new) {
        (
            View::Live {
                props: op,
                manager: om,
            },
            View::Live {
                props: np,
                manager: nm,
            },
        ) => {
            let changed: Vec<&String> = np.keys().filter(|k| op.get(*k) != np.get(*k)).collect();
            if changed.is_empty() && om == nm {
                return None;
            }
            let mut o = Map::new();
            for (k, v) in np {
                let include = if minimal {
                    changed.contains(&k)
                } else {
                    !v.is_null() || changed.contains(&k)
                };
                if include {
                    o.insert(k.clone(), v.clone());
                }
            }
            o.insert("id".into(), json!(id));
            if om != nm {
                let entry = match (nm, om) {
                    (Some(m), _) => manager_entry(m, false),
                    (None, Some(old)) => manager_entry(old, true),
                    (None, None) => unreachable!("managers differ"),
                };
                o.insert("manager@delta".into(), json!([entry]));
            }
            Some(Value::Object(o))
        }
        (_, View::Live { .. }) => whole(id, new),
        (View::SoftDeleted, View::SoftDeleted) | (View::Absent, View::Absent) => None,
        (_, View::SoftDeleted) => Some(removed(id, "changed")),
        (_, View::Absent) => Some(removed(id, "deleted")),
    }
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

fn delta_url(base: &str) -> String {
    format!("{base}/v1.0/users/delta")
}

fn parse_spec(q: &DeltaQuery) -> Result<Spec, String> {
    let ids = match &q.filter {
        None => None,
        Some(f) => Some(parse_filter(f)?.into_iter().collect()),
    };
    let mut select: Vec<&'static str> = Vec::new();
    let mut manager = false;
    match &q.select {
        None => select.extend(USER_DEFAULT.iter().filter(|p| **p != "id")),
        Some(items) => {
            for item in items.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if item.eq_ignore_ascii_case("manager") {
                    manager = true;
                    continue;
                }
                match super::USER_PROPS.iter().find(|p| p.eq_ignore_ascii_case(item)) {
                    Some(&"id") => {}
                    Some(p) => {
                        if !select.contains(p) {
                            select.push(p);
                        }
                    }
                    None => return Err(format!(
                        "Parsing OData Select and Expand failed: Could not find a property named '{item}' on type 'microsoft.graph.user'."
                    )),
                }
            }
        }
    }
    Ok(Spec {
        ids,
        select,
        manager,
        raw: q.raw.clone(),
    })
}

fn page_response(base: &str, page: Vec<Value>, link: (&str, String)) -> ApiResponse {
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        json!(format!("{base}/v1.0/$metadata#users")),
    );
    body.insert(link.0.into(), json!(link.1));
    body.insert("value".into(), Value::Array(page));
    ApiResponse::json(200, Value::Object(body))
}

fn render_initial_page(s: &State, spec: &Spec, ids: &[String]) -> Vec<Value> {
    ids.iter()
        .filter_map(|id| match current_view(s, spec, id) {
            // Hard-deleted since the round started.
            View::Absent => Some(removed(id, "deleted")),
            v => whole(id, &v),
        })
        .collect()
}

impl State {
    fn store_cursor(&mut self, spec: Spec) -> String {
        let d = &mut self.user_delta;
        d.active = true;
        d.serial += 1;
        let token = random_token();
        d.cursors.insert(
            token.clone(),
            Cursor {
                spec,
                seq: d.seq,
                expired: false,
                serial: d.serial,
            },
        );
        if d.cursors.len() > MAX_STORED {
            if let Some(oldest) = d
                .cursors
                .iter()
                .min_by_key(|(_, c)| c.serial)
                .map(|(k, _)| k.clone())
            {
                d.cursors.remove(&oldest);
            }
        }
        token
    }

    /// Serves the first page of a round, storing the round when it has more.
    fn start_round(&mut self, base: &str, spec: Spec, pages: Pages, token: String) -> ApiResponse {
        let count = match &pages {
            Pages::Initial(p) => p.len(),
            Pages::Rendered(p) => p.len(),
        };
        let first = match &pages {
            Pages::Initial(p) => p
                .first()
                .map(|ids| render_initial_page(self, &spec, ids))
                .unwrap_or_default(),
            Pages::Rendered(p) => p.first().cloned().unwrap_or_default(),
        };
        if count <= 1 {
            return page_response(
                base,
                first,
                (
                    "@odata.deltaLink",
                    format!("{}?$deltatoken={token}", delta_url(base)),
                ),
            );
        }
        let d = &mut self.user_delta;
        d.serial += 1;
        let round_id = random_token();
        d.rounds.insert(
            round_id.clone(),
            Round {
                spec,
                pages,
                delta_token: token,
                expired: false,
                serial: d.serial,
            },
        );
        if d.rounds.len() > MAX_STORED {
            if let Some(oldest) = d
                .rounds
                .iter()
                .min_by_key(|(_, r)| r.serial)
                .map(|(k, _)| k.clone())
            {
                d.rounds.remove(&oldest);
            }
        }
        page_response(
            base,
            first,
            (
                "@odata.nextLink",
                format!(
                    "{}?$skiptoken={}",
                    delta_url(base),
                    encode_skip(&round_id, 1)
                ),
            ),
        )
    }
}

fn chunk<T: Clone>(items: Vec<T>, size: usize) -> Vec<Vec<T>> {
    if items.is_empty() {
        return vec![Vec::new()];
    }
    items.chunks(size.max(1)).map(<[T]>::to_vec).collect()
}

/// `GET /v1.0/users/delta` (already authenticated, counted and throttle-checked). `minimal`:
/// the request carried `Prefer: return=minimal`.
pub(super) fn serve(
    s: &mut State,
    base: &str,
    ctx: &Ctx,
    query: &str,
    minimal: bool,
) -> ApiResponse {
    let q = match parse_query(query) {
        Ok(q) => q,
        Err((code, msg)) => return graph_error(ctx, 400, code, &msg),
    };
    let tokens_with_params = |what: &str| {
        graph_error(
            ctx,
            400,
            "Request_BadRequest",
            &format!("Query options cannot be combined with '{what}': the token encodes them; use the link as returned."),
        )
    };
    let url = delta_url(base);
    if let Some(skip) = &q.skiptoken {
        if q.select.is_some() || q.filter.is_some() || q.deltatoken.is_some() {
            return tokens_with_params("$skiptoken");
        }
        let expired_page = || {
            graph_error(
                ctx,
                400,
                "Directory_ExpiredPageToken",
                "The specified page token value has expired and can no longer be included in your request.",
            )
        };
        let Some((round_id, page)) = decode_skip(skip) else {
            return expired_page();
        };
        let Some(round) = s.user_delta.rounds.get(&round_id) else {
            return expired_page();
        };
        if round.expired {
            return gone_at(ctx, &url, &round.spec.raw);
        }
        let content = match &round.pages {
            Pages::Initial(p) => p
                .get(page)
                .map(|ids| render_initial_page(s, &round.spec, ids)),
            Pages::Rendered(p) => p.get(page).cloned(),
        };
        let Some(content) = content else {
            return expired_page();
        };
        let count = match &round.pages {
            Pages::Initial(p) => p.len(),
            Pages::Rendered(p) => p.len(),
        };
        let link = if page + 1 < count {
            (
                "@odata.nextLink",
                format!("{url}?$skiptoken={}", encode_skip(&round_id, page + 1)),
            )
        } else {
            (
                "@odata.deltaLink",
                format!("{url}?$deltatoken={}", round.delta_token),
            )
        };
        return page_response(base, content, link);
    }
    let token = q.deltatoken.clone().filter(|t| !t.trim().is_empty());
    match token {
        Some(t) if !t.eq_ignore_ascii_case("latest") => {
            if q.select.is_some() || q.filter.is_some() {
                return tokens_with_params("$deltatoken");
            }
            let Some(cursor) = s.user_delta.cursors.get(&t) else {
                return graph_error(
                    ctx,
                    400,
                    "syncStateNotFound",
                    "The sync state for the given delta token was not found or the token is invalid. Start a new full synchronization.",
                );
            };
            if cursor.expired || cursor.seq < s.user_delta.floor {
                return gone_at(ctx, &url, &cursor.spec.raw);
            }
            let spec = cursor.spec.clone();
            let since = cursor.seq;
            let d = &s.user_delta;
            let start = d.log.partition_point(|e| e.seq <= since);
            let mut seen: HashSet<&str> = HashSet::new();
            let mut items: Vec<Value> = Vec::new();
            for e in d.log.range(start..) {
                if !seen.insert(e.id.as_str()) || !spec.matches(&e.id) {
                    continue;
                }
                let old = tracked_view(&spec, &e.before);
                let new = current_view(s, &spec, &e.id);
                if let Some(v) = change(&e.id, &old, &new, minimal) {
                    items.push(v);
                }
            }
            let pages = Pages::Rendered(chunk(items, s.user_delta.page_size));
            let new_token = s.store_cursor(spec.clone());
            s.start_round(base, spec, pages, new_token)
        }
        latest => {
            let spec = match parse_spec(&q) {
                Ok(sp) => sp,
                Err(msg) => return graph_error(ctx, 400, "Request_BadRequest", &msg),
            };
            let new_token = s.store_cursor(spec.clone());
            if latest.is_some() {
                return s.start_round(base, spec, Pages::Rendered(Vec::new()), new_token);
            }
            let mut ids: Vec<String> = s
                .users
                .keys()
                .chain(s.soft_deleted.keys())
                .filter(|id| spec.matches(id))
                .cloned()
                .collect();
            ids.sort();
            ids.dedup();
            let pages = Pages::Initial(chunk(ids, s.user_delta.page_size));
            s.start_round(base, spec, pages, new_token)
        }
    }
}

impl GraphSim {
    /// Most user objects per `/users/delta` page (default 200; at least 1). Graph chooses its
    /// page size itself; clients must follow `@odata.nextLink` whatever it is.
    pub fn set_user_delta_page_size(&self, n: usize) {
        self.shared.lock().user_delta.page_size = n.max(1);
    }
}
