//! In-process Microsoft Graph tenant simulator.
//!
//! Serves, over real HTTP on `127.0.0.1`, the slice of Microsoft Graph and of the Microsoft
//! identity platform token endpoint that rostersync uses, following the documented wire formats
//! (Microsoft Graph v1.0 API reference, "JSON batching", "Microsoft Graph throttling guidance"
//! and the identity platform's client-credentials flow, on learn.microsoft.com):
//!
//! * `POST /{tenant}/oauth2/v2.0/token` — client credentials with a secret (form body or HTTP
//!   Basic) or a client assertion (a certificate registered with
//!   [`GraphSim::add_app_certificate`], or a federated token matching
//!   [`GraphSim::add_federated_credential`]; checks in `graph/tokens.rs`), AADSTS error bodies.
//! * `GET /v1.0/groups/{id}`, `/groups/{id}/members`, `/groups/{id}/transitiveMembers` (optionally
//!   cast with `/microsoft.graph.user` or `/microsoft.graph.group`), with `$select`, `$top`
//!   (1..=999, default 100) and opaque `$skiptoken` paging through absolute `@odata.nextLink`s.
//! * `GET /v1.0/users/{id | userPrincipalName}` and `/users/{id}/manager`, with `$select`.
//! * `GET /v1.0/groups/delta` and `/users/delta` (delta queries; `graph/delta.rs`,
//!   `graph/user_delta.rs`).
//! * `GET /v1.0/users/{id | userPrincipalName}/memberOf` and `/transitiveMemberOf` (optionally
//!   cast with `/microsoft.graph.group`), with `$select`, `$top` and paging as above.
//! * `GET /v1.0/users/{id | userPrincipalName}/directReports` (optionally cast with
//!   `/microsoft.graph.user`): the live users whose manager is this user, ordered by id, with
//!   `$select`, `$top` and paging as above.
//! * `POST /v1.0/users/{id | userPrincipalName}/checkMemberGroups` (`{"groupIds": [..]}`, at
//!   most 20 ids; transitive), also inside `$batch` with a JSON body and a `Content-Type` header.
//! * `POST /v1.0/$batch` (max 20 requests, responses shuffled, inner requests throttled
//!   individually, `dependsOn` honoured).
//! * Throttling faults: `429` + `Retry-After` from a seeded RNG.
//!
//! Anything else Graph offers but the simulator does not implement is refused with an error
//! (never silently ignored), so a client relying on it fails here rather than in production.
//!
//! All state lives in one [`State`] behind one mutex; mutations go through methods on
//! [`GraphSim`], which also queue change notifications (see [`subscriptions`]).
//!
//! Change notifications, subscriptions, lifecycle events and their `validationTokens` live in
//! `graph/subscriptions.rs` and `graph/tokens.rs`; delta queries in `graph/delta.rs` (groups)
//! and `graph/user_delta.rs` (users)
//! (Microsoft's change-notification and delta-query pages).

mod batch;
mod cost;
mod delta;
mod fixture;
mod login;
mod objects;
mod query;
mod subscriptions;
mod tokens;
mod user_delta;

use login::*;
use objects::*;
use query::*;

pub use fixture::{
    fixture, Fixture, FIXTURE_CLIENT_ID, FIXTURE_CLIENT_SECRET, FIXTURE_DOMAIN, FIXTURE_TENANT_ID,
};

pub use cost::{request_cost, Cost, CostModel, CostStats, Latency, Priority};
pub use subscriptions::{
    DeliveryAttempt, LifecycleEvent, NotifyFaults, NotifyStats, SimSubscription, TokenForgery,
};
pub use tokens::{
    sign_federated_token, FederatedCredential, TEST_KUBE_ISSUER, TOKEN_EXCHANGE_AUDIENCE,
};

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::TcpListener;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

// ---------------------------------------------------------------------------------------------
// Public data model
// ---------------------------------------------------------------------------------------------

/// A user object of the simulated tenant (Graph property names in camelCase).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SimUser {
    pub id: String,
    pub user_principal_name: String,
    pub mail: Option<String>,
    pub given_name: Option<String>,
    pub surname: Option<String>,
    pub display_name: Option<String>,
    pub job_title: Option<String>,
    pub department: Option<String>,
    pub office_location: Option<String>,
    pub employee_id: Option<String>,
    pub employee_type: Option<String>,
    pub company_name: Option<String>,
    pub city: Option<String>,
    pub country: Option<String>,
    pub usage_location: Option<String>,
    pub mobile_phone: Option<String>,
    pub business_phones: Vec<String>,
    pub account_enabled: bool,
    /// Entra object id of this user's manager (the manager need not be in any group).
    pub manager_id: Option<String>,
}

/// A group of the simulated tenant.
#[derive(Clone, Debug, Default)]
pub struct SimGroup {
    pub id: String,
    pub display_name: String,
    /// user or group ids (nested groups)
    pub members: Vec<String>,
}

/// The initial contents and app registration of a simulated tenant.
#[derive(Clone, Debug)]
pub struct Tenant {
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: String,
    pub users: Vec<SimUser>,
    pub groups: Vec<SimGroup>,
}

/// Fault injection for the Graph API (the token endpoint is never throttled).
#[derive(Clone, Debug, Default)]
pub struct GraphFaults {
    /// fraction 0.0..=1.0 of API requests (incl. each inner $batch request, excluding the token
    /// endpoint) answered 429
    pub throttle_rate: f64,
    /// Retry-After seconds sent with those 429s
    pub retry_after_secs: u64,
    pub seed: u64,
}

/// A read of one user the simulator answered (not throttled): `GET /users/{key}`, or
/// `checkMemberGroups`, `memberOf`, `transitiveMemberOf` of that user, alone or inside a
/// `$batch`. Kept by [`GraphSim::record_user_reads`], for tests that must know when a client
/// last asked Graph about someone.
#[derive(Clone, Debug)]
pub struct UserRead {
    /// When the request was handled (under the state lock: the answer is the state then).
    pub at: Instant,
    /// The user's object id, lower-cased (the key as sent, lower-cased, when no live user has
    /// it, e.g. a deleted one).
    pub user: String,
    /// `"user"`, `"checkMemberGroups"` or `"memberOf"` (either listing).
    pub kind: &'static str,
}

// ---------------------------------------------------------------------------------------------
// Wire constants
// ---------------------------------------------------------------------------------------------

/// Content type Graph uses for OData JSON payloads.
const ODATA_JSON: &str =
    "application/json;odata.metadata=minimal;odata.streaming=true;IEEE754Compatible=false;charset=utf-8";
/// Content type of Graph error bodies.
const ERROR_JSON: &str = "application/json";
/// Content type of the token endpoint.
const TOKEN_JSON: &str = "application/json; charset=utf-8";

const DEFAULT_TOKEN_LIFETIME_SECS: u64 = 3599;
const DEFAULT_PAGE_SIZE: usize = 100;
const MAX_PAGE_SIZE: usize = 999;
const MAX_BATCH: usize = 20;

/// Every user property the simulator knows (Graph v1.0 names). `$select` of anything else is a
/// 400, as on Graph.
const USER_PROPS: &[&str] = &[
    "id",
    "userPrincipalName",
    "mail",
    "givenName",
    "surname",
    "displayName",
    "jobTitle",
    "department",
    "officeLocation",
    "employeeId",
    "employeeType",
    "companyName",
    "city",
    "country",
    "usageLocation",
    "mobilePhone",
    "businessPhones",
    "accountEnabled",
    "preferredLanguage",
    "onPremisesExtensionAttributes",
    "userType",
    "createdDateTime",
    "deletedDateTime",
    "state",
    "streetAddress",
    "postalCode",
    "faxNumber",
    "otherMails",
    "proxyAddresses",
    "imAddresses",
    "mailNickname",
    "onPremisesImmutableId",
    "onPremisesSyncEnabled",
    "onPremisesSamAccountName",
    "onPremisesUserPrincipalName",
    "employeeHireDate",
    "ageGroup",
];

/// Graph's default user property set (returned when there is no `$select`).
const USER_DEFAULT: &[&str] = &[
    "businessPhones",
    "displayName",
    "givenName",
    "id",
    "jobTitle",
    "mail",
    "mobilePhone",
    "officeLocation",
    "preferredLanguage",
    "surname",
    "userPrincipalName",
];

const GROUP_PROPS: &[&str] = &[
    "id",
    "displayName",
    "description",
    "mail",
    "mailEnabled",
    "mailNickname",
    "securityEnabled",
    "groupTypes",
    "visibility",
    "classification",
    "createdDateTime",
    "deletedDateTime",
    "onPremisesSyncEnabled",
];

const GROUP_DEFAULT: &[&str] = GROUP_PROPS;

/// OData system query options Graph has but the simulator does not implement: refused, never
/// silently ignored.
const UNIMPLEMENTED_OPTIONS: &[&str] = &[
    "$filter", "$count", "$orderby", "$search", "$expand", "$skip", "$format", "$levels",
];

/// Member types one may cast a member collection to. Only users and groups exist in the
/// simulated tenant; casts to the other directory types yield empty collections.
const EMPTY_CASTS: &[&str] = &[
    "microsoft.graph.device",
    "microsoft.graph.orgContact",
    "microsoft.graph.servicePrincipal",
    "microsoft.graph.application",
];

const CREATED_AT: &str = "2021-03-01T09:00:00Z";

// ---------------------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct ObjRef {
    id: String,
    group: bool,
}

/// Cached member expansion of one group (stable order: direct members in insertion order,
/// then breadth-first through nested groups).
#[derive(Debug, Default)]
struct Expansion {
    direct: Vec<ObjRef>,
    direct_users: Vec<ObjRef>,
    transitive: Vec<ObjRef>,
    transitive_users: Vec<ObjRef>,
}

struct State {
    tenant_id: String,
    client_id: String,
    client_secret: String,
    users: HashMap<String, SimUser>,
    /// lower-cased id and lower-cased UPN → id.
    user_keys: HashMap<String, String>,
    groups: HashMap<String, SimGroup>,
    /// lower-cased id → id.
    group_keys: HashMap<String, String>,
    expansions: HashMap<String, Arc<Expansion>>,
    /// Bumped by every directory mutation.
    version: u64,
    tokens: HashMap<String, Instant>,
    token_lifetime_secs: u64,
    faults: GraphFaults,
    throttle_rng: StdRng,
    /// Requests answered 429 on purpose: (part of the path, how many more times, Retry-After).
    throttle_paths: Vec<(String, u32, u64)>,
    shuffle_rng: StdRng,
    counts: HashMap<String, u64>,
    /// Soft-deleted users (restorable); their ids stay in the groups' member lists but they are
    /// neither listed nor served.
    soft_deleted: HashMap<String, SimUser>,
    notify: subscriptions::NotifyState,
    delta: delta::DeltaState,
    user_delta: user_delta::UserDeltaState,
    /// Resource-unit model and added latency (both off unless set; `graph/cost.rs`).
    cost: Option<cost::CostState>,
    latency: Option<cost::LatencyState>,
    /// Certificates and federated credentials of the app registration.
    app_credentials: tokens::AppCredentials,
    /// Reads of single users, kept only once [`GraphSim::record_user_reads`] turned it on.
    user_reads: Option<Vec<UserRead>>,
}

impl State {
    fn new(t: Tenant) -> State {
        let mut s = State {
            tenant_id: t.tenant_id,
            client_id: t.client_id,
            client_secret: t.client_secret,
            users: HashMap::new(),
            user_keys: HashMap::new(),
            groups: HashMap::new(),
            group_keys: HashMap::new(),
            expansions: HashMap::new(),
            version: 0,
            tokens: HashMap::new(),
            token_lifetime_secs: DEFAULT_TOKEN_LIFETIME_SECS,
            faults: GraphFaults::default(),
            throttle_rng: StdRng::seed_from_u64(0),
            throttle_paths: Vec::new(),
            shuffle_rng: StdRng::seed_from_u64(0x0ba7_c45e_ed00_0001),
            counts: HashMap::new(),
            soft_deleted: HashMap::new(),
            notify: subscriptions::NotifyState::default(),
            delta: delta::DeltaState::default(),
            user_delta: user_delta::UserDeltaState::default(),
            cost: None,
            latency: None,
            app_credentials: tokens::AppCredentials::default(),
            user_reads: None,
        };
        for u in t.users {
            s.upsert_user(u);
        }
        for g in t.groups {
            s.add_group(g);
        }
        s
    }

    /// Records a directory mutation: drops cached expansions.
    fn touch(&mut self) {
        self.expansions.clear();
        self.version += 1;
    }

    fn count(&mut self, kind: &str) {
        *self.counts.entry(kind.to_string()).or_insert(0) += 1;
    }

    /// Appends to the user-read log (when kept) if `segs` names one user or its memberships.
    fn note_user_read(&mut self, segs: &[String]) {
        if self.user_reads.is_none() || segs.len() < 2 || segs[0] != "users" {
            return;
        }
        let kind = match classify(segs) {
            "user" => "user",
            "checkMemberGroups" => "checkMemberGroups",
            "memberOf" => "memberOf",
            _ => return,
        };
        let user = self
            .find_user(&segs[1])
            .map(|u| u.id.to_lowercase())
            .unwrap_or_else(|| segs[1].to_lowercase());
        if let Some(log) = self.user_reads.as_mut() {
            log.push(UserRead {
                at: Instant::now(),
                user,
                kind,
            });
        }
    }

    fn index_user(&mut self, u: &SimUser) {
        self.user_keys.insert(u.id.to_lowercase(), u.id.clone());
        if !u.user_principal_name.is_empty() {
            self.user_keys
                .insert(u.user_principal_name.to_lowercase(), u.id.clone());
        }
    }

    fn unindex_user(&mut self, u: &SimUser) {
        for k in [u.id.to_lowercase(), u.user_principal_name.to_lowercase()] {
            if self.user_keys.get(&k) == Some(&u.id) {
                self.user_keys.remove(&k);
            }
        }
    }

    fn upsert_user(&mut self, u: SimUser) {
        let appears = !self.users.contains_key(&u.id);
        self.before_user_change(&u.id, appears);
        if let Some(old) = self.users.remove(&u.id) {
            self.unindex_user(&old);
        }
        self.soft_deleted.remove(&u.id);
        let id = u.id.clone();
        self.index_user(&u);
        self.users.insert(u.id.clone(), u);
        self.touch();
        self.on_user_change(&id, subscriptions::Change::Updated);
    }

    fn update_user(&mut self, id: &str, f: impl FnOnce(&mut SimUser)) -> bool {
        if !self.users.contains_key(id) {
            return false;
        }
        self.before_user_change(id, false);
        let Some(mut u) = self.users.remove(id) else {
            return false;
        };
        self.unindex_user(&u);
        f(&mut u);
        // Object ids are immutable in Entra.
        u.id = id.to_string();
        self.index_user(&u);
        self.users.insert(u.id.clone(), u);
        self.version += 1;
        self.on_user_change(id, subscriptions::Change::Updated);
        true
    }

    /// Hard delete (also of a soft-deleted user): notifies `deleted` for the user and `updated`
    /// for every group it was a direct member of.
    fn delete_user(&mut self, id: &str) -> bool {
        let live = self.users.contains_key(id);
        if live || self.soft_deleted.contains_key(id) {
            self.before_user_change(id, live);
        }
        if let Some(u) = self.users.remove(id) {
            self.unindex_user(&u);
        } else if self.soft_deleted.remove(id).is_none() {
            return false;
        }
        let mut affected: Vec<String> = Vec::new();
        for g in self.groups.values_mut() {
            let before = g.members.len();
            g.members.retain(|m| m != id);
            if g.members.len() != before {
                affected.push(g.id.clone());
            }
        }
        affected.sort();
        self.touch();
        self.on_user_change(id, subscriptions::Change::Deleted);
        for gid in affected {
            self.on_membership_change(&gid, id, true);
        }
        true
    }

    /// Soft delete: the user disappears from reads and listings but keeps its (hidden)
    /// memberships; notifies `updated` (user subscriptions know only `updated` and `deleted`).
    fn soft_delete_user(&mut self, id: &str) -> bool {
        if !self.users.contains_key(id) {
            return false;
        }
        self.before_user_change(id, true);
        let Some(u) = self.users.remove(id) else {
            return false;
        };
        self.unindex_user(&u);
        self.soft_deleted.insert(u.id.clone(), u);
        self.touch();
        self.on_user_change(id, subscriptions::Change::Updated);
        true
    }

    /// Restores a soft-deleted user with its memberships; notifies `updated`.
    fn restore_user(&mut self, id: &str) -> bool {
        if !self.soft_deleted.contains_key(id) {
            return false;
        }
        self.before_user_change(id, true);
        let Some(u) = self.soft_deleted.remove(id) else {
            return false;
        };
        self.index_user(&u);
        self.users.insert(u.id.clone(), u);
        self.touch();
        self.on_user_change(id, subscriptions::Change::Updated);
        true
    }

    fn add_group(&mut self, g: SimGroup) {
        let id = g.id.clone();
        self.group_keys.insert(g.id.to_lowercase(), g.id.clone());
        self.groups.insert(g.id.clone(), g);
        self.touch();
        self.on_group_change(&id, subscriptions::Change::Updated);
    }

    fn delete_group(&mut self, id: &str) -> bool {
        if self.groups.remove(id).is_none() {
            return false;
        }
        self.group_keys.remove(&id.to_lowercase());
        let mut affected: Vec<String> = Vec::new();
        for g in self.groups.values_mut() {
            let before = g.members.len();
            g.members.retain(|m| m != id);
            if g.members.len() != before {
                affected.push(g.id.clone());
            }
        }
        affected.sort();
        self.touch();
        self.on_group_change(id, subscriptions::Change::Deleted);
        for gid in affected {
            self.on_membership_change(&gid, id, true);
        }
        true
    }

    fn add_member(&mut self, group_id: &str, member_id: &str) {
        let Some(g) = self.groups.get_mut(group_id) else {
            return;
        };
        if !g.members.iter().any(|m| m == member_id) {
            g.members.push(member_id.to_string());
            self.touch();
            self.on_membership_change(group_id, member_id, false);
        }
    }

    fn remove_member(&mut self, group_id: &str, member_id: &str) {
        let Some(g) = self.groups.get_mut(group_id) else {
            return;
        };
        let before = g.members.len();
        g.members.retain(|m| m != member_id);
        if g.members.len() != before {
            self.touch();
            self.on_membership_change(group_id, member_id, true);
        }
    }

    fn find_user(&self, key: &str) -> Option<&SimUser> {
        self.users.get(key).or_else(|| {
            self.user_keys
                .get(&key.to_lowercase())
                .and_then(|id| self.users.get(id))
        })
    }

    /// Ids of the groups `member` belongs to, directly or (`transitive`) at any depth: direct
    /// ones first, each level ordered by displayName.
    fn groups_of(&self, member: &str, transitive: bool) -> Vec<String> {
        let parents = |x: &str| -> Vec<String> {
            let mut v: Vec<&SimGroup> = self
                .groups
                .values()
                .filter(|g| g.members.iter().any(|m| m == x))
                .collect();
            v.sort_by(|a, b| a.display_name.cmp(&b.display_name).then(a.id.cmp(&b.id)));
            v.into_iter().map(|g| g.id.clone()).collect()
        };
        let mut out = parents(member);
        if transitive {
            let mut seen: HashSet<String> = out.iter().cloned().collect();
            let mut queue: VecDeque<String> = out.iter().cloned().collect();
            while let Some(g) = queue.pop_front() {
                for p in parents(&g) {
                    if seen.insert(p.clone()) {
                        out.push(p.clone());
                        queue.push_back(p);
                    }
                }
            }
        }
        out
    }

    fn find_group(&self, key: &str) -> Option<&SimGroup> {
        self.groups.get(key).or_else(|| {
            self.group_keys
                .get(&key.to_lowercase())
                .and_then(|id| self.groups.get(id))
        })
    }

    fn expansion(&mut self, gid: &str) -> Arc<Expansion> {
        if let Some(e) = self.expansions.get(gid) {
            return e.clone();
        }
        let e = Arc::new(self.compute_expansion(gid));
        self.expansions.insert(gid.to_string(), e.clone());
        e
    }

    fn compute_expansion(&self, gid: &str) -> Expansion {
        let mut e = Expansion::default();
        if let Some(g) = self.groups.get(gid) {
            let mut seen: HashSet<&str> = HashSet::new();
            for m in &g.members {
                if !seen.insert(m.as_str()) {
                    continue;
                }
                if self.groups.contains_key(m) {
                    e.direct.push(ObjRef {
                        id: m.clone(),
                        group: true,
                    });
                } else if self.users.contains_key(m) {
                    let r = ObjRef {
                        id: m.clone(),
                        group: false,
                    };
                    e.direct_users.push(r.clone());
                    e.direct.push(r);
                }
            }
        }
        let mut seen: HashSet<&str> = HashSet::new();
        seen.insert(gid);
        let mut queue: VecDeque<&str> = VecDeque::new();
        queue.push_back(gid);
        while let Some(cur) = queue.pop_front() {
            let Some(g) = self.groups.get(cur) else {
                continue;
            };
            for m in &g.members {
                if self.groups.contains_key(m) {
                    if seen.insert(m.as_str()) {
                        e.transitive.push(ObjRef {
                            id: m.clone(),
                            group: true,
                        });
                        queue.push_back(m.as_str());
                    }
                } else if self.users.contains_key(m) && seen.insert(m.as_str()) {
                    let r = ObjRef {
                        id: m.clone(),
                        group: false,
                    };
                    e.transitive_users.push(r.clone());
                    e.transitive.push(r);
                }
            }
        }
        e
    }

    fn should_throttle(&mut self) -> bool {
        let rate = self.faults.throttle_rate;
        if rate.is_nan() || rate <= 0.0 {
            return false;
        }
        if rate >= 1.0 {
            return true;
        }
        self.throttle_rng.random::<f64>() < rate
    }

    fn prune_tokens(&mut self) {
        let cutoff = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now);
        self.tokens.retain(|_, exp| *exp > cutoff);
    }
}

struct Shared {
    base_url: String,
    state: Mutex<State>,
    /// Client for the simulator's own outgoing calls (validation handshakes, deliveries).
    http: reqwest::Client,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// ---------------------------------------------------------------------------------------------
// GraphSim (public handle)
// ---------------------------------------------------------------------------------------------

/// A running Graph tenant simulator.
pub struct GraphSim {
    shared: web::Data<Shared>,
    handle: ServerHandle,
    join: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    /// Change-notification delivery loop.
    notifier: tokio::task::JoinHandle<()>,
}

impl GraphSim {
    /// Binds 127.0.0.1:0, spawns the actix server on the current tokio runtime, returns once it
    /// listens.
    pub async fn start(tenant: Tenant) -> std::io::Result<GraphSim> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(std::io::Error::other)?;
        let shared = web::Data::new(Shared {
            base_url: format!("http://127.0.0.1:{port}"),
            state: Mutex::new(State::new(tenant)),
            http,
        });
        let data = shared.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .app_data(web::PayloadConfig::new(4 * 1024 * 1024))
                .default_service(web::to(dispatch))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(1)
        .listen(listener)?
        .run();
        let handle = server.handle();
        let join = tokio::spawn(server);
        let notifier = subscriptions::spawn_delivery_loop(shared.clone());
        Ok(GraphSim {
            shared,
            handle,
            join: Some(join),
            notifier,
        })
    }

    /// Graph root, e.g. "http://127.0.0.1:PORT" (API under /v1.0).
    pub fn graph_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Login host, same server; token at {login_url}/{tenant}/oauth2/v2.0/token.
    pub fn login_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// Token endpoint URL for the simulated tenant.
    pub fn token_url(&self) -> String {
        let tenant = self.shared.lock().tenant_id.clone();
        format!("{}/{}/oauth2/v2.0/token", self.shared.base_url, tenant)
    }

    /// Replaces the fault configuration and re-seeds the throttling RNG from `f.seed`.
    pub fn set_faults(&self, f: GraphFaults) {
        let mut s = self.shared.lock();
        s.throttle_rng = StdRng::seed_from_u64(f.seed);
        s.faults = f;
    }

    /// Answers the next `times` requests (top level or inside a `$batch`) whose path contains
    /// `path_part` with 429 and `Retry-After: retry_after_secs`, whatever the fault rate.
    pub fn throttle_path(&self, path_part: &str, times: u32, retry_after_secs: u64) {
        self.shared
            .lock()
            .throttle_paths
            .push((path_part.to_string(), times, retry_after_secs));
    }

    /// Inserts or replaces a user (by id).
    pub fn upsert_user(&self, u: SimUser) {
        self.shared.lock().upsert_user(u);
    }

    /// Edits a user in place; returns false when there is no such user. The id cannot change.
    pub fn update_user(&self, id: &str, f: impl FnOnce(&mut SimUser)) -> bool {
        self.shared.lock().update_user(id, f)
    }

    /// Hard delete: removes the user (live or soft-deleted) and all its memberships; notifies
    /// `deleted` on user subscriptions and `updated` on the groups it was a member of; group
    /// delta reports the membership removal.
    pub fn delete_user(&self, id: &str) -> bool {
        self.shared.lock().delete_user(id)
    }

    /// Soft delete: the user answers 404 and leaves member listings, but keeps its memberships
    /// for a restore; notifies `updated` on user subscriptions. Group delta does not report the
    /// removal (Microsoft's docs threads report it late or not at all). False when there is no such live user.
    pub fn soft_delete_user(&self, id: &str) -> bool {
        self.shared.lock().soft_delete_user(id)
    }

    /// Restores a soft-deleted user with its memberships; notifies `updated`.
    pub fn restore_user(&self, id: &str) -> bool {
        self.shared.lock().restore_user(id)
    }

    /// Inserts or replaces a group (by id).
    pub fn add_group(&self, g: SimGroup) {
        self.shared.lock().add_group(g);
    }

    /// Removes the group and its membership in other groups.
    pub fn delete_group(&self, id: &str) -> bool {
        self.shared.lock().delete_group(id)
    }

    /// Adds a user or group id to a group's direct members (no-op if the group is unknown or the
    /// member already present).
    pub fn add_member(&self, group_id: &str, member_id: &str) {
        self.shared.lock().add_member(group_id, member_id);
    }

    pub fn remove_member(&self, group_id: &str, member_id: &str) {
        self.shared.lock().remove_member(group_id, member_id);
    }

    pub fn user(&self, id: &str) -> Option<SimUser> {
        self.shared.lock().users.get(id).cloned()
    }

    /// All users, sorted by id.
    pub fn users(&self) -> Vec<SimUser> {
        let s = self.shared.lock();
        let mut v: Vec<SimUser> = s.users.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    pub fn group(&self, id: &str) -> Option<SimGroup> {
        self.shared.lock().groups.get(id).cloned()
    }

    /// Ids of the users that are transitive members of the group, in listing order.
    pub fn transitive_user_ids(&self, group_id: &str) -> Vec<String> {
        let mut s = self.shared.lock();
        if !s.groups.contains_key(group_id) {
            return Vec::new();
        }
        s.expansion(group_id)
            .transitive_users
            .iter()
            .map(|r| r.id.clone())
            .collect()
    }

    /// Requests served since start, by kind: "token", "group", "transitiveMembers", "members",
    /// "user", "manager", "memberOf" (`memberOf` and `transitiveMemberOf`), "directReports",
    /// "checkMemberGroups",
    /// "batch", "subscriptions" (any /v1.0/subscriptions request), "delta" (`/groups/delta`),
    /// "userDelta" (`/users/delta`), "jwks" (signing-key metadata), "other" (any other /v1.0
    /// path) and "throttled" (429s, inner batch requests included). Every received request
    /// counts under its kind, whatever its outcome; each inner batch request counts under its own
    /// kind as well.
    pub fn request_count(&self, kind: &str) -> u64 {
        self.shared.lock().counts.get(kind).copied().unwrap_or(0)
    }

    /// `expires_in` in token responses (default 3599); applies to tokens issued afterwards.
    pub fn set_token_lifetime_secs(&self, secs: u64) {
        self.shared.lock().token_lifetime_secs = secs;
    }

    /// Makes every token issued so far invalid (as if revoked / expired).
    pub fn expire_tokens(&self) {
        let now = Instant::now();
        for exp in self.shared.lock().tokens.values_mut() {
            *exp = now;
        }
    }

    /// Starts (true: from now on, empty) or stops (false: and forgets) keeping the log of
    /// [`UserRead`]s.
    pub fn record_user_reads(&self, on: bool) {
        self.shared.lock().user_reads = on.then(Vec::new);
    }

    /// The user reads kept since [`GraphSim::record_user_reads`], oldest first.
    pub fn user_reads(&self) -> Vec<UserRead> {
        self.shared.lock().user_reads.clone().unwrap_or_default()
    }

    /// Stops the server.
    pub async fn stop(mut self) {
        self.notifier.abort();
        self.handle.stop(false).await;
        if let Some(j) = self.join.take() {
            let _ = j.await;
        }
    }
}

impl Drop for GraphSim {
    fn drop(&mut self) {
        self.notifier.abort();
        if self.join.is_some() {
            // Sends the stop command right away; the completion future is not needed.
            drop(self.handle.stop(false));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP plumbing
// ---------------------------------------------------------------------------------------------

/// A response before it is put on the wire (also the shape of an inner $batch response).
struct ApiResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Body,
}

/// A response body: a JSON value, or JSON written straight from the state (users on member
/// pages and in manager `$batch`es, the requests a reconcile makes by the thousand: building a
/// `Value` for each first cost the simulator about twice the CPU, on the cores it shares with
/// the process under test).
enum Body {
    Value(Value),
    Rendered(Vec<u8>),
}

impl Body {
    fn into_bytes(self) -> Vec<u8> {
        match self {
            Body::Value(v) => serde_json::to_vec(&v).unwrap_or_default(),
            Body::Rendered(b) => b,
        }
    }
}

impl ApiResponse {
    fn json(status: u16, body: Value) -> ApiResponse {
        ApiResponse {
            status,
            headers: vec![("Content-Type".into(), ODATA_JSON.into())],
            body: Body::Value(body),
        }
    }

    /// A 200 with `body` serialized as it is.
    fn rendered<T: serde::Serialize>(body: &T) -> ApiResponse {
        ApiResponse {
            status: 200,
            headers: vec![("Content-Type".into(), ODATA_JSON.into())],
            body: Body::Rendered(serde_json::to_vec(body).unwrap_or_default()),
        }
    }

    fn header(mut self, k: &str, v: impl Into<String>) -> ApiResponse {
        self.headers.push((k.to_string(), v.into()));
        self
    }

    fn into_http(self, ctx: &Ctx) -> HttpResponse {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut b = HttpResponse::build(status);
        for (k, v) in &self.headers {
            b.insert_header((k.as_str(), v.as_str()));
        }
        b.insert_header(("request-id", ctx.request_id.as_str()));
        b.insert_header(("client-request-id", ctx.client_request_id.as_str()));
        b.body(self.body.into_bytes())
    }
}

/// Per-request context.
struct Ctx {
    request_id: String,
    client_request_id: String,
}

impl Ctx {
    fn new(req: Option<&HttpRequest>) -> Ctx {
        let request_id = uuid::Uuid::new_v4().to_string();
        let client_request_id = req
            .and_then(|r| r.headers().get("client-request-id"))
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .unwrap_or_else(|| request_id.clone());
        Ctx {
            request_id,
            client_request_id,
        }
    }
}

fn graph_date() -> String {
    chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S").to_string()
}

/// Graph error body: `{"error":{"code","message","innerError":{"date","request-id","client-request-id"}}}`.
fn graph_error(ctx: &Ctx, status: u16, code: &str, message: &str) -> ApiResponse {
    ApiResponse {
        status,
        headers: vec![("Content-Type".into(), ERROR_JSON.into())],
        body: Body::Value(json!({
            "error": {
                "code": code,
                "message": message,
                "innerError": {
                    "date": graph_date(),
                    "request-id": ctx.request_id,
                    "client-request-id": ctx.client_request_id,
                }
            }
        })),
    }
}

fn bad_request(ctx: &Ctx, message: &str) -> ApiResponse {
    graph_error(ctx, 400, "Request_BadRequest", message)
}

fn not_found(ctx: &Ctx, what: &str) -> ApiResponse {
    graph_error(
        ctx,
        404,
        "Request_ResourceNotFound",
        &format!(
            "Resource '{what}' does not exist or one of its queried reference-property objects are not present."
        ),
    )
}

fn throttled(ctx: &Ctx, s: &State) -> ApiResponse {
    throttled_with(
        ctx,
        s,
        s.faults.retry_after_secs,
        "ReadWrite",
        "ResourceUnitLimitExceeded",
    )
}

/// A 429 from the resource-unit model (`graph/cost.rs`).
fn throttled_by_model(ctx: &Ctx, s: &State, r: &cost::Refusal) -> ApiResponse {
    throttled_with(ctx, s, r.retry_after, r.limit, r.information)
}

fn throttled_with(
    ctx: &Ctx,
    s: &State,
    retry_after: u64,
    limit: &str,
    information: &str,
) -> ApiResponse {
    ApiResponse {
        status: 429,
        headers: vec![("Content-Type".into(), ERROR_JSON.into())],
        body: Body::Value(json!({
            "error": {
                "code": "TooManyRequests",
                "message": "Please retry again later.",
                "innerError": {
                    "code": "429",
                    "status": "429",
                    "message": "Please retry after",
                    "date": graph_date(),
                    "request-id": ctx.request_id,
                    "client-request-id": ctx.client_request_id,
                }
            }
        })),
    }
    .header("Retry-After", retry_after.to_string())
    .header(
        "x-ms-throttle-scope",
        format!("Tenant_Application/{limit}/{}/{}", s.client_id, s.tenant_id),
    )
    .header("x-ms-throttle-information", information)
}

async fn dispatch(req: HttpRequest, body: web::Bytes, sim: web::Data<Shared>) -> HttpResponse {
    let path = req.uri().path().to_string();
    let trimmed = path.trim_start_matches('/');
    let segs: Vec<&str> = trimmed.split('/').collect();
    if segs.len() == 4 && segs[1] == "oauth2" && segs[2] == "v2.0" && segs[3] == "token" {
        return token_endpoint(&sim, &req, segs[0], &body);
    }
    if let Some(resp) = tokens::metadata_endpoint(&sim, &req, &segs) {
        return resp;
    }
    let ctx = Ctx::new(Some(&req));
    if let Some(rest) = trimmed.strip_prefix("v1.0/") {
        // Drawn under the lock, slept without it: other requests go on meanwhile.
        let delay = sim.lock().next_latency();
        if let Some(d) = delay {
            tokio::time::sleep(d).await;
        }
        let rest = rest.trim_end_matches('/');
        if rest == "subscriptions" || rest.starts_with("subscriptions/") {
            return subscriptions::api(&sim, &req, &ctx, rest, &body)
                .await
                .into_http(&ctx);
        }
        let query = req.uri().query().unwrap_or("");
        return api_request(&sim, &req, &ctx, rest, query, &body).into_http(&ctx);
    }
    graph_error(
        &ctx,
        404,
        "NotFound",
        &format!("No service is listening at '{path}'."),
    )
    .into_http(&ctx)
}

// ---------------------------------------------------------------------------------------------
// API requests
// ---------------------------------------------------------------------------------------------

fn check_auth(s: &State, ctx: &Ctx, req: &HttpRequest) -> Result<(), ApiResponse> {
    let unauthorized = |msg: &str| {
        graph_error(ctx, 401, "InvalidAuthenticationToken", msg).header(
            "WWW-Authenticate",
            "Bearer realm=\"\", authorization_uri=\"https://login.microsoftonline.com/common/oauth2/authorize\", client_id=\"00000003-0000-0000-c000-000000000000\"",
        )
    };
    let header = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or("");
    if header.is_empty() {
        return Err(unauthorized("Access token is empty."));
    }
    let token = match header.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => {
            return Err(unauthorized(
                "Access token validation failure. Invalid audience.",
            ))
        }
    };
    if token.is_empty() {
        return Err(unauthorized("Access token is empty."));
    }
    match s.tokens.get(token) {
        None => Err(unauthorized(
            "Access token validation failure. Invalid audience.",
        )),
        Some(exp) if Instant::now() >= *exp => Err(unauthorized(
            "Lifetime validation failed, the token is expired.",
        )),
        Some(_) => Ok(()),
    }
}

fn decode_segments(path: &str) -> Vec<String> {
    path.split('/')
        .map(|seg| {
            percent_encoding::percent_decode_str(seg)
                .decode_utf8_lossy()
                .into_owned()
        })
        .collect()
}

/// `delta` or its fully qualified name (Graph SDKs send the latter).
fn is_delta(seg: &str) -> bool {
    seg == "delta" || seg == "microsoft.graph.delta"
}

fn classify(segs: &[String]) -> &'static str {
    match segs {
        [a, b] if a == "groups" && is_delta(b) => "delta",
        [a, b] if a == "users" && is_delta(b) => "userDelta",
        [a, _] if a == "groups" => "group",
        [a, _, b, ..] if a == "groups" && b == "transitiveMembers" => "transitiveMembers",
        [a, _, b, ..] if a == "groups" && b == "members" => "members",
        [a, _] if a == "users" => "user",
        [a, _, b] if a == "users" && b == "manager" => "manager",
        [a, _, b] if a == "users" && b == "checkMemberGroups" => "checkMemberGroups",
        [a, _, b, ..] if a == "users" && (b == "memberOf" || b == "transitiveMemberOf") => {
            "memberOf"
        }
        [a, _, b, ..] if a == "users" && b == "directReports" => "directReports",
        _ => "other",
    }
}

/// A top-level `/v1.0/...` request.
fn api_request(
    sim: &Shared,
    req: &HttpRequest,
    ctx: &Ctx,
    rest: &str,
    query: &str,
    body: &[u8],
) -> ApiResponse {
    let segs = decode_segments(rest);
    let mut s = sim.lock();
    if segs.len() == 1 && segs[0] == "$batch" {
        s.count("batch");
        if let Err(e) = check_auth(&s, ctx, req) {
            return e;
        }
        if req.method() != actix_web::http::Method::POST {
            return method_not_allowed(ctx);
        }
        let priority = header_value(req, "x-ms-throttle-priority");
        let before = s.ru_charged();
        let resp = batch::batch(&mut s, &sim.base_url, ctx, body, priority.as_deref());
        // The envelope costs nothing itself; its answer carries what its requests cost.
        return match s.admit("batch", cost::Cost { ru: 0, write: 0 }, Priority::Normal) {
            Ok(Some(_)) if s.batch_envelope_header() => {
                let charge = cost::Charge {
                    ru: u32::try_from(s.ru_charged() - before).unwrap_or(u32::MAX),
                    limit_share: s.limit_share().filter(|p| *p > 0.8),
                };
                charge.decorate(resp)
            }
            _ => resp,
        };
    }
    let kind = classify(&segs);
    s.count(kind);
    if let Err(e) = check_auth(&s, ctx, req) {
        return e;
    }
    let content_type = header_value(req, "content-type");
    let prefer = header_value(req, "prefer");
    let priority = header_value(req, "x-ms-throttle-priority");
    serve(
        &mut s,
        &sim.base_url,
        ctx,
        req.method().as_str(),
        rest,
        &segs,
        query,
        Payload {
            body,
            content_type: content_type.as_deref(),
            prefer: prefer.as_deref(),
            priority: Priority::parse(priority.as_deref()),
        },
    )
}

fn header_value(req: &HttpRequest, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The body of a request, its declared content type (`POST` only) and the request headers
/// that change an answer.
#[derive(Clone, Copy)]
struct Payload<'a> {
    body: &'a [u8],
    content_type: Option<&'a str>,
    /// `Prefer` (`return=minimal` on user delta rounds).
    prefer: Option<&'a str>,
    /// `x-ms-throttle-priority` (inner `$batch` requests without one: the batch's).
    priority: Priority,
}

impl Payload<'_> {
    /// `Prefer: return=minimal` (one of possibly several comma-separated preferences).
    fn prefers_minimal(&self) -> bool {
        self.prefer.is_some_and(|p| {
            p.split(',')
                .any(|x| x.trim().eq_ignore_ascii_case("return=minimal"))
        })
    }
}

fn method_not_allowed(ctx: &Ctx) -> ApiResponse {
    graph_error(
        ctx,
        405,
        "Request_BadRequest",
        "Specified HTTP method is not allowed for the request target.",
    )
}

/// Serves one authenticated API request (top level or inner $batch): throttling, method check,
/// routing. `raw_path` is the path after `/v1.0/` as sent (used to build nextLinks).
#[allow(clippy::too_many_arguments)]
fn serve(
    s: &mut State,
    base: &str,
    ctx: &Ctx,
    method: &str,
    raw_path: &str,
    segs: &[String],
    query: &str,
    payload: Payload<'_>,
) -> ApiResponse {
    if let Some(t) = s
        .throttle_paths
        .iter_mut()
        .find(|(part, left, _)| *left > 0 && raw_path.contains(part.as_str()))
    {
        t.1 -= 1;
        let retry_after = t.2;
        s.count("throttled");
        return throttled_with(
            ctx,
            s,
            retry_after,
            "ReadWrite",
            "ResourceUnitLimitExceeded",
        );
    }
    if s.should_throttle() {
        s.count("throttled");
        return throttled(ctx, s);
    }
    let price = cost::request_cost(method, segs, query);
    let charge = match s.admit(classify(segs), price, payload.priority) {
        Ok(c) => c,
        Err(refusal) => {
            s.count("throttled");
            return throttled_by_model(ctx, s, &refusal);
        }
    };
    let resp = route(s, base, ctx, method, raw_path, segs, query, payload);
    match charge {
        Some(c) => c.decorate(resp),
        None => resp,
    }
}

/// Routes one admitted request.
#[allow(clippy::too_many_arguments)]
fn route(
    s: &mut State,
    base: &str,
    ctx: &Ctx,
    method: &str,
    raw_path: &str,
    segs: &[String],
    query: &str,
    payload: Payload<'_>,
) -> ApiResponse {
    s.note_user_read(segs);
    if segs.len() == 3 && segs[0] == "users" && segs[2] == "checkMemberGroups" {
        if !method.eq_ignore_ascii_case("POST") {
            return method_not_allowed(ctx);
        }
        return check_member_groups(s, base, ctx, &segs[1], payload);
    }
    if !method.eq_ignore_ascii_case("GET") {
        return method_not_allowed(ctx);
    }
    if segs.len() == 2 && segs[0] == "groups" && is_delta(&segs[1]) {
        return delta::serve(s, base, ctx, query);
    }
    if segs.len() == 2 && segs[0] == "users" && is_delta(&segs[1]) {
        return user_delta::serve(s, base, ctx, query, payload.prefers_minimal());
    }
    let q = match Query::parse(query) {
        Ok(q) => q,
        Err((code, msg)) => return graph_error(ctx, 400, code, &msg),
    };
    let next_base = format!("{base}/v1.0/{raw_path}");
    let seg = |i: usize| segs.get(i).map(String::as_str);
    match (seg(0), segs.len()) {
        (Some("groups"), 2) => get_group(s, base, ctx, &segs[1], &q),
        (Some("groups"), 3 | 4) => {
            let transitive = match seg(2) {
                Some("transitiveMembers") => true,
                Some("members") => false,
                _ => return unknown_segment(ctx, segs, 2),
            };
            let cast = seg(3);
            list_members(s, base, &next_base, ctx, &segs[1], transitive, cast, &q)
        }
        (Some("users"), 2) => get_user(s, base, ctx, &segs[1], &q),
        (Some("users"), 3) if seg(2) == Some("manager") => get_manager(s, base, ctx, &segs[1], &q),
        (Some("users"), 3 | 4) if matches!(seg(2), Some("memberOf" | "transitiveMemberOf")) => {
            let transitive = seg(2) == Some("transitiveMemberOf");
            list_member_of(s, base, &next_base, ctx, &segs[1], transitive, seg(3), &q)
        }
        (Some("users"), 3 | 4) if seg(2) == Some("directReports") => {
            list_direct_reports(s, base, &next_base, ctx, &segs[1], seg(3), &q)
        }
        (Some("users"), 3) => unknown_segment(ctx, segs, 2),
        (Some("groups") | Some("users"), 1) => graph_error(
            ctx,
            501,
            "NotImplemented",
            "Listing this collection is not implemented by the Graph simulator.",
        ),
        (Some(""), _) | (None, _) => unknown_segment(ctx, segs, 0),
        (Some("$batch"), _) => bad_request(ctx, "Nested batch requests are not supported."),
        (Some("groups") | Some("users"), _) => unknown_segment(ctx, segs, 3.min(segs.len() - 1)),
        _ => unknown_segment(ctx, segs, 0),
    }
}

fn unknown_segment(ctx: &Ctx, segs: &[String], i: usize) -> ApiResponse {
    let seg = segs.get(i).map(String::as_str).unwrap_or("");
    graph_error(
        ctx,
        400,
        "BadRequest",
        &format!("Resource not found for the segment '{seg}'."),
    )
}

// ---------------------------------------------------------------------------------------------
// Skip tokens, base64
// ---------------------------------------------------------------------------------------------

fn fnv1a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Opaque page token: offset and a check value bound to the listing, base64url.
fn encode_skiptoken(offset: usize, listing_key: &str) -> String {
    let mut bytes = Vec::with_capacity(14);
    bytes.extend_from_slice(b"RS");
    bytes.extend_from_slice(&(offset as u64).to_le_bytes());
    let mut check_input = listing_key.as_bytes().to_vec();
    check_input.extend_from_slice(&(offset as u64).to_le_bytes());
    bytes.extend_from_slice(&fnv1a(&check_input).to_le_bytes());
    b64_encode(&bytes, B64_URL, false)
}

fn decode_skiptoken(token: &str, listing_key: &str) -> Option<usize> {
    let bytes = b64_decode(token.trim())?;
    if bytes.len() != 14 || &bytes[..2] != b"RS" {
        return None;
    }
    let offset = u64::from_le_bytes(bytes[2..10].try_into().ok()?);
    let check = u32::from_le_bytes(bytes[10..14].try_into().ok()?);
    let mut check_input = listing_key.as_bytes().to_vec();
    check_input.extend_from_slice(&offset.to_le_bytes());
    (fnv1a(&check_input) == check).then_some(usize::try_from(offset).ok()?)
}

const B64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const B64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64_encode(data: &[u8], alphabet: &[u8; 64], pad: bool) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..4 {
            if i < chars {
                out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else if pad {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard or URL-safe base64, padded or not.
fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => B64_STD.iter().position(|&a| a == c)? as u32,
        };
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manager `boss` (UPN `boss@x`) with reports `r2`, `r1` and `r3` (listed by id), a
    /// report `x1` of `r1`, and a user without a manager.
    fn reports_tenant() -> Tenant {
        let user = |id: &str, manager: Option<&str>| SimUser {
            id: id.into(),
            user_principal_name: format!("{id}@x"),
            display_name: Some(id.to_uppercase()),
            account_enabled: true,
            manager_id: manager.map(str::to_string),
            ..Default::default()
        };
        Tenant {
            tenant_id: "t-reports".into(),
            client_id: "c-reports".into(),
            client_secret: "s-reports".into(),
            users: vec![
                user("boss", None),
                user("r2", Some("boss")),
                user("r1", Some("BOSS")),
                user("r3", Some("boss")),
                user("x1", Some("r1")),
                user("solo", None),
            ],
            groups: Vec::new(),
        }
    }

    fn http() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().unwrap()
    }

    async fn sim_token(sim: &GraphSim) -> String {
        let body: Value = http()
            .post(format!("{}/t-reports/oauth2/v2.0/token", sim.login_url()))
            .form(&[
                ("client_id", "c-reports"),
                ("client_secret", "s-reports"),
                ("scope", "https://graph.microsoft.com/.default"),
                ("grant_type", "client_credentials"),
            ])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["access_token"].as_str().unwrap().to_string()
    }

    async fn sim_get(url: &str, tok: &str) -> (u16, Value) {
        let resp = http().get(url).bearer_auth(tok).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    fn ids(page: &Value) -> Vec<&str> {
        page["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap())
            .collect()
    }

    #[tokio::test]
    async fn direct_reports_are_the_live_users_managed_by_the_user() {
        let sim = GraphSim::start(reports_tenant()).await.unwrap();
        let tok = sim_token(&sim).await;
        let root = format!("{}/v1.0", sim.graph_url());

        let (status, page) = sim_get(&format!("{root}/users/boss/directReports"), &tok).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(ids(&page), ["r1", "r2", "r3"]);
        assert!(page["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("/v1.0/$metadata#directoryObjects"));
        assert!(page.get("@odata.nextLink").is_none());
        for item in page["value"].as_array().unwrap() {
            assert_eq!(item["@odata.type"], "#microsoft.graph.user", "{item}");
            assert_eq!(
                item["userPrincipalName"],
                format!("{}@x", item["id"].as_str().unwrap())
            );
        }

        // By UPN, cast to users: no `@odata.type`, `$select` honoured.
        let (status, page) = sim_get(
            &format!("{root}/users/BOSS@x/directReports/microsoft.graph.user?$select=id"),
            &tok,
        )
        .await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(ids(&page), ["r1", "r2", "r3"]);
        assert!(page["@odata.context"]
            .as_str()
            .unwrap()
            .ends_with("#users(id)"));
        for item in page["value"].as_array().unwrap() {
            assert_eq!(item.as_object().unwrap().len(), 1, "{item}");
        }

        // Only direct reports; none is an empty collection.
        let (_, page) = sim_get(&format!("{root}/users/r1/directReports"), &tok).await;
        assert_eq!(ids(&page), ["x1"]);
        let (status, page) = sim_get(&format!("{root}/users/solo/directReports"), &tok).await;
        assert_eq!((status, ids(&page).len()), (200, 0));

        // A soft-deleted report is not listed; restored, it is again.
        assert!(sim.soft_delete_user("r2"));
        let (_, page) = sim_get(&format!("{root}/users/boss/directReports"), &tok).await;
        assert_eq!(ids(&page), ["r1", "r3"]);
        assert!(sim.restore_user("r2"));
        let (_, page) = sim_get(&format!("{root}/users/boss/directReports"), &tok).await;
        assert_eq!(ids(&page), ["r1", "r2", "r3"]);
        assert_eq!(sim.request_count("directReports"), 6);
        sim.stop().await;
    }

    #[tokio::test]
    async fn direct_reports_page_with_top_and_skiptoken() {
        let sim = GraphSim::start(reports_tenant()).await.unwrap();
        let tok = sim_token(&sim).await;
        assert!(sim.soft_delete_user("r3"));
        let root = format!("{}/v1.0", sim.graph_url());
        let first =
            format!("{root}/users/boss/directReports/microsoft.graph.user?$select=id&$top=1");
        let (status, page) = sim_get(&first, &tok).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(ids(&page), ["r1"]);
        let next = page["@odata.nextLink"].as_str().unwrap().to_string();
        assert!(
            next.starts_with(&format!(
                "{root}/users/boss/directReports/microsoft.graph.user?"
            )) && next.contains("$top=1")
                && next.contains("$skiptoken="),
            "{next}"
        );
        let (status, page) = sim_get(&next, &tok).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(ids(&page), ["r2"]);
        assert!(page.get("@odata.nextLink").is_none(), "{page}");

        // A token is bound to its listing.
        let token = next.split("$skiptoken=").nth(1).unwrap();
        let (status, body) = sim_get(
            &format!(
                "{root}/users/r1/directReports/microsoft.graph.user?$top=1&$skiptoken={token}"
            ),
            &tok,
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "Directory_ExpiredPageToken");
        sim.stop().await;
    }

    #[tokio::test]
    async fn direct_reports_errors_and_batch() {
        let sim = GraphSim::start(reports_tenant()).await.unwrap();
        let tok = sim_token(&sim).await;
        let root = format!("{}/v1.0", sim.graph_url());

        let (status, body) = sim_get(&format!("{root}/users/nobody/directReports"), &tok).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "Request_ResourceNotFound");
        // A soft-deleted manager is not found either.
        assert!(sim.soft_delete_user("r1"));
        let (status, _) = sim_get(&format!("{root}/users/r1/directReports"), &tok).await;
        assert_eq!(status, 404);
        let (status, body) = sim_get(
            &format!("{root}/users/boss/directReports/microsoft.graph.group"),
            &tok,
        )
        .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "Request_UnsupportedQuery");
        let (status, body) = sim_get(
            &format!("{root}/users/boss/directReports?$select=nope"),
            &tok,
        )
        .await;
        assert_eq!(status, 400, "{body}");
        let (status, _) = sim_get(&format!("{root}/users/boss/directReports?$top=0"), &tok).await;
        assert_eq!(status, 400);

        let resp = http()
            .post(format!("{root}/$batch"))
            .bearer_auth(&tok)
            .json(&json!({"requests": [
                {"id": "1", "method": "GET", "url": "/users/boss/directReports?$select=id"},
                {"id": "2", "method": "GET", "url": "/users/nobody/directReports"},
            ]}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let body: Value = resp.json().await.unwrap();
        let answer = |id: &str| {
            body["responses"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["id"] == id)
                .cloned()
                .unwrap()
        };
        assert_eq!(answer("1")["status"], 200, "{body}");
        assert_eq!(ids(&answer("1")["body"]), ["r2", "r3"]);
        assert_eq!(answer("2")["status"], 404, "{body}");
        sim.stop().await;
    }

    #[test]
    fn users_written_straight_to_json_equal_the_rendered_values() {
        let fx = fixture(60, 7);
        let mut users = fx.tenant.users.clone();
        // Every property set, and none set, besides the fixture's mix.
        let mut full = users[0].clone();
        full.mobile_phone = Some("+47 1".into());
        full.business_phones = vec!["+47 2".into()];
        full.employee_type = Some("Contractor".into());
        users.push(full);
        users.push(SimUser {
            id: "bare".into(),
            user_principal_name: "bare@x".into(),
            ..Default::default()
        });
        let selects: [Option<&[&'static str]>; 3] = [None, Some(USER_PROPS), Some(&["id", "mail"])];
        for u in &users {
            for select in selects {
                for with_type in [false, true] {
                    let mut want = render_user(u, select, with_type);
                    let got = serde_json::to_value(UserJson {
                        u,
                        select,
                        with_type,
                        context: None,
                    })
                    .unwrap();
                    assert_eq!(got, want);
                    want.as_object_mut()
                        .unwrap()
                        .insert("@odata.context".into(), json!("ctx"));
                    let got = serde_json::to_value(UserJson {
                        u,
                        select,
                        with_type,
                        context: Some("ctx"),
                    })
                    .unwrap();
                    assert_eq!(got, want);
                }
            }
        }
    }
}
