//! Resource-unit cost model and added latency for the Graph simulator (off by default).
//!
//! Microsoft Graph's identity and access service (users, groups, directory objects) throttles
//! each app+tenant pair with a token bucket of *resource units* (RU): every request costs a
//! documented base cost, adjusted by its query options, and a request that does not fit in the
//! bucket is answered `429` with `Retry-After`. Writes are also limited by a separate quota.
//! `docs/graph-costs.md` lists every cost below with its source, and marks the costs Microsoft
//! leaves open as this simulator's choices; the same choices are marked `CHOICE` here.
//!
//! * [`request_cost`] prices one request (pure; unit-tested).
//! * [`CostModel`] is the knob set ([`GraphSim::set_cost_model`]); [`GraphSim::cost_stats`]
//!   the counters a benchmark reads (RU charged in total and by request kind, requests by kind,
//!   429s, writes).
//! * [`Latency`] ([`GraphSim::set_latency`]) delays every `/v1.0` answer without holding the
//!   simulator's state lock, so concurrent requests overlap as they would against Graph.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{ApiResponse, GraphSim, State};

/// Knobs of the resource-unit model. [`CostModel::default`] is Microsoft's documented
/// identity-and-access limits for the app+tenant pair, with the bucket size chosen by the
/// simulated tenant's user count.
#[derive(Clone, Debug)]
pub struct CostModel {
    /// RU the bucket holds (and refills per `window`). `None`: by tenant size as documented:
    /// 3,500 under 50 users, 5,000 from 50 to 500 users, 8,000 above 500.
    pub ru_limit: Option<u32>,
    /// Refill window of the RU bucket (10 s).
    pub window: Duration,
    /// Write quota per `write_window` (3,000 per 2 min 30 s).
    pub write_limit: u32,
    pub write_window: Duration,
    /// Share of the RU bucket that requests sent with `x-ms-throttle-priority: low` may not
    /// use, so they are throttled before normal and high ones (CHOICE: 0.2).
    pub low_priority_reserve: f64,
    /// Answer 429 when a request does not fit. `false`: charge and count only (the headers still
    /// say what was charged), for measuring what an unthrottled run would cost.
    pub enforce: bool,
    /// A `$batch` answer carries the sum of its inner requests' RU in its own
    /// `x-ms-resource-unit` (CHOICE: true). `false`: only each inner response says what it
    /// cost, as Microsoft documents the header per request; a client must add them up.
    pub batch_envelope_header: bool,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel {
            ru_limit: None,
            window: Duration::from_secs(10),
            write_limit: 3_000,
            write_window: Duration::from_secs(150),
            low_priority_reserve: 0.2,
            enforce: true,
            batch_envelope_header: true,
        }
    }
}

/// Latency added to every `/v1.0` request (not the token endpoint): `fixed` plus a uniformly
/// drawn `[0, jitter]`, from a seeded generator. A `$batch` is one request (one delay).
#[derive(Clone, Debug, Default)]
pub struct Latency {
    pub fixed: Duration,
    pub jitter: Duration,
    pub seed: u64,
}

/// What the cost model has charged and refused since it was set (cumulative; take two
/// snapshots and [`CostStats::since`] for one phase).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CostStats {
    /// RU charged, in total and by request kind (the kinds of [`GraphSim::request_count`]).
    pub ru_total: u64,
    pub ru_by_kind: BTreeMap<String, u64>,
    /// Requests charged (inner `$batch` requests each under their own kind; the `$batch`
    /// envelope under "batch").
    pub requests_by_kind: BTreeMap<String, u64>,
    /// Requests answered 429 by the model (not the random throttling of `GraphFaults`).
    pub throttled: u64,
    pub throttled_by_kind: BTreeMap<String, u64>,
    /// RU charged to requests sent with `x-ms-throttle-priority: low` / `high`.
    pub ru_low_priority: u64,
    pub ru_high_priority: u64,
    /// Write units charged.
    pub write_units: u64,
}

fn diff_map(now: &BTreeMap<String, u64>, then: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    now.iter()
        .map(|(k, v)| (k.clone(), v - then.get(k).copied().unwrap_or(0).min(*v)))
        .filter(|(_, v)| *v > 0)
        .collect()
}

impl CostStats {
    /// What was charged and refused between `earlier` and `self`.
    pub fn since(&self, earlier: &CostStats) -> CostStats {
        CostStats {
            ru_total: self.ru_total.saturating_sub(earlier.ru_total),
            ru_by_kind: diff_map(&self.ru_by_kind, &earlier.ru_by_kind),
            requests_by_kind: diff_map(&self.requests_by_kind, &earlier.requests_by_kind),
            throttled: self.throttled.saturating_sub(earlier.throttled),
            throttled_by_kind: diff_map(&self.throttled_by_kind, &earlier.throttled_by_kind),
            ru_low_priority: self.ru_low_priority.saturating_sub(earlier.ru_low_priority),
            ru_high_priority: self
                .ru_high_priority
                .saturating_sub(earlier.ru_high_priority),
            write_units: self.write_units.saturating_sub(earlier.write_units),
        }
    }

    /// Requests charged, all kinds together.
    pub fn requests(&self) -> u64 {
        self.requests_by_kind.values().sum()
    }
}

/// Price of one request: resource units and write units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    pub ru: u32,
    pub write: u32,
}

/// `x-ms-throttle-priority` of a request (absent or unknown values are normal, as documented).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Low,
    Normal,
    High,
}

impl Priority {
    pub fn parse(v: Option<&str>) -> Priority {
        match v.map(str::trim) {
            Some(p) if p.eq_ignore_ascii_case("low") => Priority::Low,
            Some(p) if p.eq_ignore_ascii_case("high") => Priority::High,
            _ => Priority::Normal,
        }
    }
}

/// The documented base cost of `method` on the path `segs` (after `/v1.0/`, decoded), before
/// query options. Paths starting `me/` cost as `users/{id}/…`, so the `me/` rows of Microsoft's
/// table price `users/{id}/…` here.
fn base_cost(method: &str, segs: &[String]) -> Cost {
    let seg = |i: usize| segs.get(i).map(String::as_str);
    let get = method.eq_ignore_ascii_case("GET");
    let post = method.eq_ignore_ascii_case("POST");
    let read = |ru: u32| Cost { ru, write: 0 };
    let is_delta = |s: Option<&str>| matches!(s, Some("delta" | "microsoft.graph.delta"));
    match (seg(0), segs.len()) {
        // Documented: GET groups/{id}/members 3, groups/{id}/transitiveMembers 5 (casts too).
        (Some("groups"), 3 | 4) if get && seg(2) == Some("members") => read(3),
        (Some("groups"), 3 | 4) if get && seg(2) == Some("transitiveMembers") => read(5),
        // Documented: GET users 2 (the collection; `oauth2PermissionGrants` and
        // `oauth2PermissionGrants/{id}` are separate rows, so `users/{id}` is not this row).
        (Some("users"), 1) if get => read(2),
        // CHOICE: user delta is a read of the users collection: 2, like GET users.
        (Some("users"), 2) if get && is_delta(seg(1)) => read(2),
        // Documented (me/… rows): memberOf 2, transitiveMemberOf 2.
        (Some("users"), 3 | 4)
            if get && matches!(seg(2), Some("memberOf" | "transitiveMemberOf")) =>
        {
            read(2)
        }
        // Documented (me/… rows): checkMemberGroups 4, checkMemberObjects 4,
        // getMemberGroups 2, getMemberObjects 2; write cost 0.
        (Some("users"), 3)
            if post && matches!(seg(2), Some("checkMemberGroups" | "checkMemberObjects")) =>
        {
            read(4)
        }
        (Some("users"), 3)
            if post && matches!(seg(2), Some("getMemberGroups" | "getMemberObjects")) =>
        {
            read(2)
        }
        // Documented: POST directoryObjects/getByIds 3, write cost 0.
        (Some("directoryObjects"), 2) if post && seg(1) == Some("getByIds") => read(3),
        // CHOICE: the `$batch` envelope costs nothing itself; each inner request is priced on
        // its own (Graph throttles inner requests individually).
        (Some("$batch"), 1) => read(0),
        // Documented: any other GET costs 1 (so users/{id}, users/{id}/manager, groups/{id},
        // groups/delta, and CHOICE: /subscriptions reads, which Microsoft prices nowhere).
        _ if get => read(1),
        // Documented: any other POST, PATCH, PUT, DELETE costs 1 RU and 1 write unit (CHOICE:
        // /subscriptions writes too).
        _ => Cost { ru: 1, write: 1 },
    }
}

/// Price of a request as Microsoft documents it for identity and access resources: the base
/// cost of its path, −1 with `$select`, +1 with `$expand`, −1 with `$top` below 20, never below
/// 1 RU (except the `$batch` envelope, 0). `query` is the raw query string as sent: a nextLink or
/// deltaLink that carries its options only inside an opaque token is priced without them
/// (CHOICE).
pub fn request_cost(method: &str, segs: &[String], query: &str) -> Cost {
    let base = base_cost(method, segs);
    if base.ru == 0 {
        return base;
    }
    let mut ru = i64::from(base.ru);
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "$select" if !v.trim().is_empty() => ru -= 1,
            "$expand" if !v.trim().is_empty() => ru += 1,
            "$top" if v.trim().parse::<i64>().is_ok_and(|t| t < 20) => ru -= 1,
            _ => {}
        }
    }
    Cost {
        ru: u32::try_from(ru.max(1)).unwrap_or(1),
        write: base.write,
    }
}

/// RU bucket size by tenant size (documented).
fn limit_for_users(users: usize) -> f64 {
    match users {
        0..50 => 3_500.0,
        50..=500 => 5_000.0,
        _ => 8_000.0,
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn full(capacity: f64) -> Bucket {
        Bucket {
            tokens: capacity,
            last: Instant::now(),
        }
    }

    fn refill(&mut self, capacity: f64, window: Duration) {
        let now = Instant::now();
        let secs = now.duration_since(self.last).as_secs_f64();
        let rate = capacity / window.as_secs_f64().max(0.001);
        self.tokens = (self.tokens + secs * rate).min(capacity);
        self.last = now;
    }

    /// Seconds until `need` tokens are there, at least 1 (whole seconds, as `Retry-After`).
    fn wait_secs(&self, need: f64, capacity: f64, window: Duration) -> u64 {
        let rate = capacity / window.as_secs_f64().max(0.001);
        let deficit = (need - self.tokens).max(0.0);
        ((deficit / rate).ceil() as u64).max(1)
    }
}

pub(super) struct CostState {
    model: CostModel,
    ru: Bucket,
    writes: Bucket,
    stats: CostStats,
}

/// What the model charged one request: becomes its response headers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Charge {
    pub(super) ru: u32,
    /// Share of the RU limit in use after this request, when above 0.8.
    pub(super) limit_share: Option<f64>,
}

impl Charge {
    pub(super) fn decorate(self, resp: ApiResponse) -> ApiResponse {
        let resp = resp.header("x-ms-resource-unit", self.ru.to_string());
        match self.limit_share {
            Some(p) => resp.header("x-ms-throttle-limit-percentage", format!("{p:.2}")),
            None => resp,
        }
    }
}

/// A refusal: what the 429 says.
pub(super) struct Refusal {
    pub(super) retry_after: u64,
    /// `ReadWrite` (the RU bucket) or `Write` (the write quota).
    pub(super) limit: &'static str,
    pub(super) information: &'static str,
}

impl CostState {
    fn capacity(&self, users: usize) -> f64 {
        self.model
            .ru_limit
            .map(f64::from)
            .unwrap_or_else(|| limit_for_users(users))
    }
}

impl State {
    /// Charges one request to the model (when it is on). `Ok(None)`: no model.
    pub(super) fn admit(
        &mut self,
        kind: &str,
        cost: Cost,
        priority: Priority,
    ) -> Result<Option<Charge>, Refusal> {
        let users = self.users.len();
        let Some(c) = self.cost.as_mut() else {
            return Ok(None);
        };
        let capacity = c.capacity(users);
        let window = c.model.window;
        let write_cap = f64::from(c.model.write_limit);
        let write_window = c.model.write_window;
        c.ru.refill(capacity, window);
        c.writes.refill(write_cap, write_window);
        let reserve = if priority == Priority::Low {
            capacity * c.model.low_priority_reserve.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let ru = f64::from(cost.ru);
        let write = f64::from(cost.write);
        let free = cost.ru == 0 && cost.write == 0;
        if c.model.enforce && !free {
            let refusal = if c.ru.tokens - ru < reserve {
                Some(Refusal {
                    retry_after: c.ru.wait_secs(ru + reserve, capacity, window),
                    limit: "ReadWrite",
                    information: "ResourceUnitLimitExceeded",
                })
            } else if write > 0.0 && c.writes.tokens - write < 0.0 {
                Some(Refusal {
                    retry_after: c.writes.wait_secs(write, write_cap, write_window),
                    limit: "Write",
                    information: "WriteLimitExceeded",
                })
            } else {
                None
            };
            if let Some(r) = refusal {
                c.stats.throttled += 1;
                *c.stats
                    .throttled_by_kind
                    .entry(kind.to_string())
                    .or_insert(0) += 1;
                return Err(r);
            }
        }
        // Without enforcement the bucket may run dry: it then reads as in use past 100 %.
        c.ru.tokens -= ru;
        c.writes.tokens -= write;
        let s = &mut c.stats;
        s.ru_total += u64::from(cost.ru);
        *s.ru_by_kind.entry(kind.to_string()).or_insert(0) += u64::from(cost.ru);
        *s.requests_by_kind.entry(kind.to_string()).or_insert(0) += 1;
        s.write_units += u64::from(cost.write);
        match priority {
            Priority::Low => s.ru_low_priority += u64::from(cost.ru),
            Priority::High => s.ru_high_priority += u64::from(cost.ru),
            Priority::Normal => {}
        }
        let used = (capacity - c.ru.tokens) / capacity;
        Ok(Some(Charge {
            ru: cost.ru,
            limit_share: (used > 0.8).then_some(used.min(1.8)),
        }))
    }

    /// Whether a `$batch` answer carries its inner requests' RU (see
    /// [`CostModel::batch_envelope_header`]).
    pub(super) fn batch_envelope_header(&self) -> bool {
        self.cost
            .as_ref()
            .is_some_and(|c| c.model.batch_envelope_header)
    }

    /// RU charged so far (0 without a model).
    pub(super) fn ru_charged(&self) -> u64 {
        self.cost.as_ref().map_or(0, |c| c.stats.ru_total)
    }

    /// The delay to add to one `/v1.0` request, drawn under the state lock (the caller sleeps
    /// after releasing it).
    pub(super) fn next_latency(&mut self) -> Option<Duration> {
        let l = self.latency.as_mut()?;
        let jitter = if l.config.jitter.is_zero() {
            Duration::ZERO
        } else {
            let nanos = u64::try_from(l.config.jitter.as_nanos()).unwrap_or(u64::MAX);
            Duration::from_nanos(l.rng.random_range(0..=nanos))
        };
        let d = l.config.fixed + jitter;
        (!d.is_zero()).then_some(d)
    }

    /// The share of the RU limit in use now (after refill), when the model is on.
    pub(super) fn limit_share(&mut self) -> Option<f64> {
        let users = self.users.len();
        let c = self.cost.as_mut()?;
        let capacity = c.capacity(users);
        c.ru.refill(capacity, c.model.window);
        Some((capacity - c.ru.tokens) / capacity)
    }
}

pub(super) struct LatencyState {
    config: Latency,
    rng: StdRng,
}

impl GraphSim {
    /// Turns the resource-unit model on (`Some`, with full buckets and zeroed counters) or off
    /// (`None`, the default: no cost headers, no RU throttling).
    pub fn set_cost_model(&self, model: Option<CostModel>) {
        let mut s = self.shared.lock();
        let users = s.users.len();
        s.cost = model.map(|model| {
            let mut c = CostState {
                ru: Bucket::full(0.0),
                writes: Bucket::full(f64::from(model.write_limit)),
                model,
                stats: CostStats::default(),
            };
            c.ru = Bucket::full(c.capacity(users));
            c
        });
    }

    /// Refills both buckets (the counters stay): a benchmark phase starts from a rested tenant.
    pub fn refill_cost_buckets(&self) {
        let mut s = self.shared.lock();
        let users = s.users.len();
        if let Some(c) = s.cost.as_mut() {
            c.ru = Bucket::full(c.capacity(users));
            c.writes = Bucket::full(f64::from(c.model.write_limit));
        }
    }

    /// What the cost model has charged and refused since it was set (zero when it is off).
    pub fn cost_stats(&self) -> CostStats {
        self.shared
            .lock()
            .cost
            .as_ref()
            .map(|c| c.stats.clone())
            .unwrap_or_default()
    }

    /// Adds latency to every `/v1.0` request (`None` or zero: answer at once, the default).
    pub fn set_latency(&self, latency: Option<Latency>) {
        self.shared.lock().latency = latency.map(|config| LatencyState {
            rng: StdRng::seed_from_u64(config.seed),
            config,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(path: &str) -> Vec<String> {
        path.split('/').map(str::to_string).collect()
    }

    fn ru(method: &str, path: &str, query: &str) -> u32 {
        request_cost(method, &segs(path), query).ru
    }

    #[test]
    fn documented_base_costs_and_query_adjustments() {
        // The reconcile's listing page: transitiveMembers 5, $select −1.
        assert_eq!(
            ru(
                "GET",
                "groups/g/transitiveMembers/microsoft.graph.user",
                "$select=id,mail&$top=999"
            ),
            4
        );
        assert_eq!(ru("GET", "groups/g/transitiveMembers", ""), 5);
        assert_eq!(ru("GET", "groups/g/members", ""), 3);
        assert_eq!(ru("GET", "groups/g/members", "$select=id"), 2);
        // $top below 20 −1, $expand +1.
        assert_eq!(ru("GET", "groups/g/members", "$top=10"), 2);
        assert_eq!(ru("GET", "groups/g/members", "$top=20"), 3);
        assert_eq!(ru("GET", "users", "$expand=manager"), 3);
        assert_eq!(
            ru("GET", "users", "$select=id&$expand=manager($select=id)"),
            2
        );
        // Never below 1.
        assert_eq!(ru("GET", "users/u/manager", "$select=id,mail"), 1);
        assert_eq!(ru("GET", "users/u", "$select=id&$top=5"), 1);
        assert_eq!(ru("GET", "users", ""), 2);
        assert_eq!(ru("GET", "users/u", ""), 1);
        assert_eq!(ru("GET", "users/u/transitiveMemberOf", ""), 2);
        assert_eq!(ru("GET", "users/u/memberOf/microsoft.graph.group", ""), 2);
        // Not in Microsoft's table: 1, like any other GET; the client's query costs 1 too.
        assert_eq!(ru("GET", "users/u/directReports", ""), 1);
        assert_eq!(
            ru(
                "GET",
                "users/u/directReports/microsoft.graph.user",
                "$select=id&$top=999"
            ),
            1
        );
        assert_eq!(
            request_cost("POST", &segs("users/u/checkMemberGroups"), ""),
            Cost { ru: 4, write: 0 }
        );
        assert_eq!(
            request_cost("POST", &segs("directoryObjects/getByIds"), ""),
            Cost { ru: 3, write: 0 }
        );
        // Percent-encoded option names are the same options.
        assert_eq!(ru("GET", "groups/g/members", "%24select=id"), 2);
        // Writes: 1 RU and 1 write unit.
        assert_eq!(
            request_cost("PATCH", &segs("users/u"), ""),
            Cost { ru: 1, write: 1 }
        );
        assert_eq!(
            request_cost("POST", &segs("subscriptions"), ""),
            Cost { ru: 1, write: 1 }
        );
    }

    #[test]
    fn choices_for_what_the_docs_leave_open() {
        assert_eq!(
            request_cost("POST", &segs("$batch"), ""),
            Cost { ru: 0, write: 0 }
        );
        assert_eq!(ru("GET", "users/delta", "$select=id,manager"), 1);
        assert_eq!(ru("GET", "users/delta", "$skiptoken=abc"), 2);
        assert_eq!(ru("GET", "users/delta", "$deltatoken=abc"), 2);
        assert_eq!(ru("GET", "groups/delta", "$select=members"), 1);
        assert_eq!(ru("GET", "groups/g", ""), 1);
        assert_eq!(ru("GET", "subscriptions", ""), 1);
    }

    #[test]
    fn tenant_size_sets_the_bucket() {
        assert_eq!(limit_for_users(0), 3_500.0);
        assert_eq!(limit_for_users(49), 3_500.0);
        assert_eq!(limit_for_users(50), 5_000.0);
        assert_eq!(limit_for_users(500), 5_000.0);
        assert_eq!(limit_for_users(501), 8_000.0);
    }

    #[test]
    fn stats_since_subtracts() {
        let a = CostStats {
            ru_total: 5,
            ru_by_kind: [("user".to_string(), 5)].into_iter().collect(),
            ..Default::default()
        };
        let mut b = a.clone();
        b.ru_total = 9;
        b.ru_by_kind.insert("user".into(), 7);
        b.ru_by_kind.insert("manager".into(), 2);
        b.requests_by_kind.insert("manager".into(), 2);
        let d = b.since(&a);
        assert_eq!(d.ru_total, 4);
        assert_eq!(d.ru_by_kind.get("user"), Some(&2));
        assert_eq!(d.ru_by_kind.get("manager"), Some(&2));
        assert_eq!(d.requests(), 2);
    }
}
