//! Group delta query, `GET /v1.0/groups/delta` (Microsoft's "group: delta" and "Use delta query" pages).
//!
//! * Query: `$select` (group properties and `members`; only with `members` selected are
//!   direct-membership changes tracked and returned as `members@delta`), `$filter=id eq '…'`
//!   (OR-ed, at most 50 ids; without it all groups), `$deltatoken`, `$skiptoken`. `$expand`,
//!   `$top`, `$orderby` and other system options are refused with 400.
//! * Rounds: the initial round lists every matching group with all its direct members; later
//!   rounds (from a deltaLink) list only groups with changes since that link (added members,
//!   removed ones with `"@removed": {"reason": "deleted"}`, changed selected properties, deleted
//!   groups as `{"id", "@removed"}`). Pages hold at most [`GraphSim::set_delta_page_size`] member
//!   entries (default 200), so a large group's object recurs on several pages; pages link with
//!   `@odata.nextLink` (`$skiptoken`), the last one has `@odata.deltaLink` (`$deltatoken`).
//! * `$deltatoken=latest` answers only a deltaLink for "now"; an empty `$deltatoken=` (as in the
//!   410 `Location`) starts a new initial round with the query's other parameters.
//! * Tokens are server-side snapshots of the tracked state: a deltaLink can be replayed (it
//!   returns the changes since it was issued again). [`GraphSim::expire_delta_tokens`] makes
//!   all existing delta and skip tokens answer `410 Gone` with a `Location` holding the original
//!   query with an empty `$deltatoken`; [`GraphSim::forget_delta_tokens`] makes them unknown
//!   instead. An unknown or garbled `$deltatoken` answers 400
//!   `syncStateNotFound` (the code Microsoft's delta-query page names for dead tokens), an unknown `$skiptoken` 400
//!   `Directory_ExpiredPageToken` (as the member listings do).
//! * Soft-deleted users keep their (hidden) memberships, so delta reports no removal for them
//!   (as reported against Graph: a soft-deleted member's removal comes late or never); a hard
//!   delete is reported.

use std::collections::{BTreeMap, HashMap};

use rand::Rng;
use serde_json::{json, Map, Value};

use super::{
    b64_encode, graph_error, group_prop, ApiResponse, Ctx, GraphSim, ObjRef, State, B64_URL,
    GROUP_DEFAULT, GROUP_PROPS,
};

const DEFAULT_DELTA_PAGE: usize = 200;
const MAX_FILTER_IDS: usize = 50;
/// Stored snapshots/rounds beyond this are evicted oldest-first.
pub(super) const MAX_STORED: usize = 10_000;

#[derive(Clone, Debug)]
struct Spec {
    /// Lower-cased group ids of `$filter`; None = all groups.
    ids: Option<Vec<String>>,
    select: Vec<&'static str>,
    members: bool,
    /// `$select`/`$filter` parts as sent (for the 410 Location).
    raw: Vec<String>,
}

#[derive(Clone, Debug, PartialEq)]
struct GroupSnap {
    props: Map<String, Value>,
    members: Vec<ObjRef>,
}

struct Snapshot {
    spec: Spec,
    groups: BTreeMap<String, GroupSnap>,
    expired: bool,
    serial: u64,
}

struct Round {
    pages: Vec<Vec<Value>>,
    delta_token: String,
    spec_raw: Vec<String>,
    expired: bool,
    serial: u64,
}

pub(super) struct DeltaState {
    snapshots: HashMap<String, Snapshot>,
    rounds: HashMap<String, Round>,
    page_size: usize,
    serial: u64,
}

impl Default for DeltaState {
    fn default() -> Self {
        DeltaState {
            snapshots: HashMap::new(),
            rounds: HashMap::new(),
            page_size: DEFAULT_DELTA_PAGE,
            serial: 0,
        }
    }
}

impl PartialEq for ObjRef {
    fn eq(&self, o: &ObjRef) -> bool {
        self.id == o.id && self.group == o.group
    }
}

pub(super) fn random_token() -> String {
    let mut b = [0u8; 24];
    rand::rng().fill(&mut b);
    b64_encode(&b, B64_URL, false)
}

pub(super) struct DeltaQuery {
    pub(super) select: Option<String>,
    pub(super) filter: Option<String>,
    pub(super) deltatoken: Option<String>,
    pub(super) skiptoken: Option<String>,
    /// `$select`/`$filter` parts as sent (for the 410 Location).
    pub(super) raw: Vec<String>,
}

pub(super) fn parse_query(raw: &str) -> Result<DeltaQuery, (&'static str, String)> {
    let mut q = DeltaQuery {
        select: None,
        filter: None,
        deltatoken: None,
        skiptoken: None,
        raw: Vec::new(),
    };
    let mut seen: Vec<String> = Vec::new();
    for part in raw.split('&').filter(|p| !p.is_empty()) {
        let Some((k, v)) = url::form_urlencoded::parse(part.as_bytes()).next() else {
            continue;
        };
        let (k, v) = (k.into_owned(), v.into_owned());
        if k.starts_with('$') {
            if seen.contains(&k) {
                return Err((
                    "Request_BadRequest",
                    format!("Query option '{k}' was specified more than once, it must be specified at most once."),
                ));
            }
            seen.push(k.clone());
        }
        match k.as_str() {
            "$select" => {
                q.select = Some(v);
                q.raw.push(part.to_string());
            }
            "$filter" => {
                q.filter = Some(v);
                q.raw.push(part.to_string());
            }
            "$deltatoken" | "$deltaToken" => q.deltatoken = Some(v),
            "$skiptoken" | "$skipToken" => q.skiptoken = Some(v),
            "$expand" | "$top" | "$orderby" => {
                return Err((
                    "Request_UnsupportedQuery",
                    format!("Unsupported query option '{k}' for delta queries: page size and expansion are not supported."),
                ))
            }
            other if other.starts_with('$') => {
                return Err((
                    "Request_UnsupportedQuery",
                    format!("The query option '{other}' is not supported with delta queries."),
                ))
            }
            _ => {}
        }
    }
    Ok(q)
}

/// `id eq 'a' or id eq 'b'` → lower-cased ids.
pub(super) fn parse_filter(f: &str) -> Result<Vec<String>, String> {
    let bad = || {
        format!("Invalid filter clause: '{f}'. Only 'id eq' clauses joined with 'or' are supported for delta queries.")
    };
    let mut ids: Vec<String> = Vec::new();
    let lower = f.to_string();
    let mut rest = lower.trim();
    loop {
        let (clause, tail) = match find_or(rest) {
            Some(i) => (&rest[..i], Some(&rest[i + 4..])),
            None => (rest, None),
        };
        let mut words = clause.trim().splitn(3, char::is_whitespace);
        let (Some(a), Some(op), Some(v)) = (words.next(), words.next(), words.next()) else {
            return Err(bad());
        };
        let v = v.trim();
        if !a.eq_ignore_ascii_case("id") || !op.eq_ignore_ascii_case("eq") {
            return Err(bad());
        }
        let Some(id) = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')) else {
            return Err(bad());
        };
        if id.is_empty() || id.contains('\'') {
            return Err(bad());
        }
        ids.push(id.to_lowercase());
        match tail {
            Some(t) => rest = t.trim(),
            None => break,
        }
    }
    if ids.len() > MAX_FILTER_IDS {
        return Err(format!(
            "Too many object ids in the filter: {} (at most {MAX_FILTER_IDS}).",
            ids.len()
        ));
    }
    Ok(ids)
}

/// Byte index of the first ` or ` (case-insensitive, outside quotes).
fn find_or(s: &str) -> Option<usize> {
    let bytes = s.as_bytes();
    let mut quoted = false;
    for i in 0..bytes.len() {
        if bytes[i] == b'\'' {
            quoted = !quoted;
        }
        if !quoted
            && i + 4 <= bytes.len()
            && bytes[i] == b' '
            && bytes[i + 3] == b' '
            && s.get(i + 1..i + 3)
                .is_some_and(|w| w.eq_ignore_ascii_case("or"))
        {
            return Some(i);
        }
    }
    None
}

fn parse_spec(q: &DeltaQuery) -> Result<Spec, String> {
    let ids = match &q.filter {
        None => None,
        Some(f) => Some(parse_filter(f)?),
    };
    let mut select: Vec<&'static str> = vec!["id"];
    let mut members = false;
    match &q.select {
        None => {
            for p in GROUP_DEFAULT {
                if !select.contains(p) {
                    select.push(p);
                }
            }
        }
        Some(items) => {
            for item in items.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                if item.eq_ignore_ascii_case("members") {
                    members = true;
                    continue;
                }
                match GROUP_PROPS.iter().find(|p| p.eq_ignore_ascii_case(item)) {
                    Some(p) => {
                        if !select.contains(p) {
                            select.push(p);
                        }
                    }
                    None => return Err(format!(
                        "Parsing OData Select and Expand failed: Could not find a property named '{item}' on type 'microsoft.graph.group'."
                    )),
                }
            }
        }
    }
    Ok(Spec {
        ids,
        select,
        members,
        raw: q.raw.clone(),
    })
}

impl State {
    /// The tracked state of the groups matching `spec`, by group id.
    fn delta_view(&self, spec: &Spec) -> BTreeMap<String, GroupSnap> {
        let mut out = BTreeMap::new();
        for g in self.groups.values() {
            if let Some(ids) = &spec.ids {
                if !ids.contains(&g.id.to_lowercase()) {
                    continue;
                }
            }
            let mut props = Map::new();
            for p in &spec.select {
                if *p == "id" {
                    continue;
                }
                if let Some(v) = group_prop(g, p) {
                    props.insert((*p).to_string(), v);
                }
            }
            let mut members: Vec<ObjRef> = Vec::new();
            if spec.members {
                for m in &g.members {
                    if members.iter().any(|r| r.id == *m) {
                        continue;
                    }
                    // Soft-deleted users keep their membership link.
                    if self.groups.contains_key(m) {
                        members.push(ObjRef {
                            id: m.clone(),
                            group: true,
                        });
                    } else if self.users.contains_key(m) || self.soft_deleted.contains_key(m) {
                        members.push(ObjRef {
                            id: m.clone(),
                            group: false,
                        });
                    }
                }
            }
            out.insert(g.id.clone(), GroupSnap { props, members });
        }
        out
    }

    fn store_snapshot(&mut self, spec: Spec, groups: BTreeMap<String, GroupSnap>) -> String {
        let token = random_token();
        self.delta.serial += 1;
        let serial = self.delta.serial;
        self.delta.snapshots.insert(
            token.clone(),
            Snapshot {
                spec,
                groups,
                expired: false,
                serial,
            },
        );
        if self.delta.snapshots.len() > MAX_STORED {
            if let Some(oldest) = self
                .delta
                .snapshots
                .iter()
                .min_by_key(|(_, s)| s.serial)
                .map(|(k, _)| k.clone())
            {
                self.delta.snapshots.remove(&oldest);
            }
        }
        token
    }
}

fn member_entry(r: &ObjRef, removed: bool) -> Value {
    let t = if r.group {
        "#microsoft.graph.group"
    } else {
        "#microsoft.graph.user"
    };
    if removed {
        json!({ "@odata.type": t, "id": r.id, "@removed": { "reason": "deleted" } })
    } else {
        json!({ "@odata.type": t, "id": r.id })
    }
}

/// A group object of a round: id + selected props, and its `members@delta` entries.
struct Item {
    object: Map<String, Value>,
    members: Option<Vec<Value>>,
}

fn group_item(id: &str, snap: &GroupSnap, members: Option<Vec<Value>>) -> Item {
    let mut object = snap.props.clone();
    object.insert("id".into(), json!(id));
    Item { object, members }
}

/// Splits a round into pages of at most `size` member entries (an object without entries counts
/// as one); a group with more entries recurs on several pages.
fn paginate(items: Vec<Item>, size: usize) -> Vec<Vec<Value>> {
    let size = size.max(1);
    let mut pages: Vec<Vec<Value>> = Vec::new();
    let mut cur: Vec<Value> = Vec::new();
    let mut room = size;
    let flush = |cur: &mut Vec<Value>, room: &mut usize, pages: &mut Vec<Vec<Value>>| {
        pages.push(std::mem::take(cur));
        *room = size;
    };
    for item in items {
        match item.members {
            None => {
                cur.push(Value::Object(item.object));
                room -= 1;
                if room == 0 {
                    flush(&mut cur, &mut room, &mut pages);
                }
            }
            Some(entries) if entries.is_empty() => {
                let mut o = item.object;
                o.insert("members@delta".into(), json!([]));
                cur.push(Value::Object(o));
                room -= 1;
                if room == 0 {
                    flush(&mut cur, &mut room, &mut pages);
                }
            }
            Some(entries) => {
                let mut rest: &[Value] = &entries;
                while !rest.is_empty() {
                    let take = room.min(rest.len());
                    let mut o = item.object.clone();
                    o.insert("members@delta".into(), Value::Array(rest[..take].to_vec()));
                    cur.push(Value::Object(o));
                    rest = &rest[take..];
                    room -= take;
                    if room == 0 {
                        flush(&mut cur, &mut room, &mut pages);
                    }
                }
            }
        }
    }
    if !cur.is_empty() || pages.is_empty() {
        pages.push(cur);
    }
    pages
}

fn initial_items(spec: &Spec, view: &BTreeMap<String, GroupSnap>) -> Vec<Item> {
    view.iter()
        .map(|(id, g)| {
            let members = spec
                .members
                .then(|| g.members.iter().map(|r| member_entry(r, false)).collect());
            group_item(id, g, members)
        })
        .collect()
}

fn diff_items(
    spec: &Spec,
    old: &BTreeMap<String, GroupSnap>,
    new: &BTreeMap<String, GroupSnap>,
) -> Vec<Item> {
    let mut items = Vec::new();
    for (id, g) in new {
        match old.get(id) {
            None => {
                let members = spec
                    .members
                    .then(|| g.members.iter().map(|r| member_entry(r, false)).collect());
                items.push(group_item(id, g, members));
            }
            Some(o) => {
                let mut entries: Vec<Value> = Vec::new();
                for r in &g.members {
                    if !o.members.contains(r) {
                        entries.push(member_entry(r, false));
                    }
                }
                for r in &o.members {
                    if !g.members.contains(r) {
                        entries.push(member_entry(r, true));
                    }
                }
                if entries.is_empty() && o.props == g.props {
                    continue;
                }
                let members = (spec.members && !entries.is_empty()).then_some(entries);
                items.push(group_item(id, g, members));
            }
        }
    }
    for id in old.keys() {
        if !new.contains_key(id) {
            let mut object = Map::new();
            object.insert("id".into(), json!(id));
            object.insert("@removed".into(), json!({ "reason": "deleted" }));
            items.push(Item {
                object,
                members: None,
            });
        }
    }
    items
}

fn delta_base(base: &str) -> String {
    format!("{base}/v1.0/groups/delta")
}

fn gone(ctx: &Ctx, base: &str, raw: &[String]) -> ApiResponse {
    gone_at(ctx, &delta_base(base), raw)
}

/// `410 Gone` for an expired delta or skip token of the delta function at `delta_url`, with a
/// `Location` holding the original query and an empty `$deltatoken` (a new initial round).
pub(super) fn gone_at(ctx: &Ctx, delta_url: &str, raw: &[String]) -> ApiResponse {
    let mut query = raw.join("&");
    if !query.is_empty() {
        query.push('&');
    }
    query.push_str("$deltatoken=");
    graph_error(
        ctx,
        410,
        "syncStateNotFound",
        "The delta token has expired. Start a new full synchronization by following the Location header.",
    )
    .header("Location", format!("{delta_url}?{query}"))
}

fn page_response(base: &str, page: Vec<Value>, link: (&str, String)) -> ApiResponse {
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        json!(format!("{base}/v1.0/$metadata#groups")),
    );
    body.insert(link.0.into(), json!(link.1));
    body.insert("value".into(), Value::Array(page));
    ApiResponse::json(200, Value::Object(body))
}

pub(super) fn encode_skip(round: &str, page: usize) -> String {
    b64_encode(format!("{round}:{page}").as_bytes(), B64_URL, false)
}

pub(super) fn decode_skip(t: &str) -> Option<(String, usize)> {
    let bytes = super::b64_decode(t.trim())?;
    let text = String::from_utf8(bytes).ok()?;
    let (r, p) = text.split_once(':')?;
    Some((r.to_string(), p.parse().ok()?))
}

/// Serves page `i` of a round (storing the round when it has further pages).
fn serve_round(
    s: &mut State,
    base: &str,
    pages: Vec<Vec<Value>>,
    delta_token: String,
    spec_raw: Vec<String>,
) -> ApiResponse {
    let mut pages = pages;
    if pages.len() <= 1 {
        let page = pages.pop().unwrap_or_default();
        return page_response(
            base,
            page,
            (
                "@odata.deltaLink",
                format!("{}?$deltatoken={delta_token}", delta_base(base)),
            ),
        );
    }
    let first = std::mem::take(&mut pages[0]);
    let round_id = random_token();
    s.delta.serial += 1;
    let serial = s.delta.serial;
    s.delta.rounds.insert(
        round_id.clone(),
        Round {
            pages,
            delta_token,
            spec_raw,
            expired: false,
            serial,
        },
    );
    if s.delta.rounds.len() > MAX_STORED {
        if let Some(oldest) = s
            .delta
            .rounds
            .iter()
            .min_by_key(|(_, r)| r.serial)
            .map(|(k, _)| k.clone())
        {
            s.delta.rounds.remove(&oldest);
        }
    }
    page_response(
        base,
        first,
        (
            "@odata.nextLink",
            format!(
                "{}?$skiptoken={}",
                delta_base(base),
                encode_skip(&round_id, 1)
            ),
        ),
    )
}

/// `GET /v1.0/groups/delta` (already authenticated, counted and throttle-checked).
pub(super) fn serve(s: &mut State, base: &str, ctx: &Ctx, query: &str) -> ApiResponse {
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
        let Some(round) = s.delta.rounds.get(&round_id) else {
            return expired_page();
        };
        if round.expired {
            return gone(ctx, base, &round.spec_raw);
        }
        let Some(content) = round.pages.get(page).cloned() else {
            return expired_page();
        };
        let link = if page + 1 < round.pages.len() {
            (
                "@odata.nextLink",
                format!(
                    "{}?$skiptoken={}",
                    delta_base(base),
                    encode_skip(&round_id, page + 1)
                ),
            )
        } else {
            (
                "@odata.deltaLink",
                format!("{}?$deltatoken={}", delta_base(base), round.delta_token),
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
            let Some(snap) = s.delta.snapshots.get(&t) else {
                return graph_error(
                    ctx,
                    400,
                    "syncStateNotFound",
                    "The sync state for the given delta token was not found or the token is invalid. Start a new full synchronization.",
                );
            };
            if snap.expired {
                return gone(ctx, base, &snap.spec.raw);
            }
            let spec = snap.spec.clone();
            let view = s.delta_view(&spec);
            let items = diff_items(&spec, &snap.groups, &view);
            let raw = spec.raw.clone();
            let new_token = s.store_snapshot(spec, view);
            let pages = paginate(items, s.delta.page_size);
            serve_round(s, base, pages, new_token, raw)
        }
        latest => {
            let spec = match parse_spec(&q) {
                Ok(sp) => sp,
                Err(msg) => return graph_error(ctx, 400, "Request_BadRequest", &msg),
            };
            let view = s.delta_view(&spec);
            let raw = spec.raw.clone();
            if latest.is_some() {
                let t = s.store_snapshot(spec, view);
                return serve_round(s, base, vec![Vec::new()], t, raw);
            }
            let items = initial_items(&spec, &view);
            let new_token = s.store_snapshot(spec, view);
            let pages = paginate(items, s.delta.page_size);
            serve_round(s, base, pages, new_token, raw)
        }
    }
}

impl GraphSim {
    /// Maximum member entries per group-delta page (default 200; at least 1).
    pub fn set_delta_page_size(&self, n: usize) {
        self.shared.lock().delta.page_size = n.max(1);
    }

    /// Every delta and skip token issued so far (group and user delta) answers `410 Gone` (with a
    /// `Location` to restart) from now on.
    pub fn expire_delta_tokens(&self) {
        let mut s = self.shared.lock();
        for snap in s.delta.snapshots.values_mut() {
            snap.expired = true;
        }
        for r in s.delta.rounds.values_mut() {
            r.expired = true;
        }
        s.user_delta.expire_all();
    }

    /// Forgets every delta and skip token issued so far: a deltaLink then answers `400
    /// syncStateNotFound` and a nextLink `400 Directory_ExpiredPageToken` (what Graph does with
    /// sync state it no longer has), where [`GraphSim::expire_delta_tokens`] gives `410 Gone`.
    pub fn forget_delta_tokens(&self) {
        let mut s = self.shared.lock();
        s.delta.snapshots.clear();
        s.delta.rounds.clear();
    }
}
