//! SCIM 2.0 (RFC 7643/7644) implementation of [`Target`].
//!
//! Owns all SCIM JSON: resource building, PATCH operations, filters, ListResponse paging,
//! discovery and the SCIM error body. Requests are bounded by a semaphore (per target) and
//! retried under the shared [`RetryPolicy`]; a POST is never retried blindly.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde_json::{json, Map, Value};
use tokio::sync::Semaphore;
use url::Url;

use super::{Capabilities, Target, TargetError, TargetUser};
use crate::retry::{read_limited, retry_after, RetryPolicy};
use crate::sync::mapping::{AttrChange, AttrValue, Record, ACTIVE, EXTERNAL_ID, USER_NAME};

pub const CORE_USER: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const ENTERPRISE_USER: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
const MEDIA_TYPE: &str = "application/scim+json";
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Multi-valued attributes whose elements we address by `type`.
const TYPED: &[&str] = &["emails", "phoneNumbers"];

pub struct ScimTarget {
    http: reqwest::Client,
    base: String,
    token: SecretString,
    custom_schema: String,
    /// Bounds concurrent requests to this LMS (config `target.concurrency`).
    permits: Semaphore,
    retry: RetryPolicy,
    /// Integration name for metrics.
    label: String,
}

/// Where a record key lives in a SCIM User.
enum Place<'a> {
    /// Top-level or `name.<sub>` attribute.
    Core(&'a str),
    /// Element of a multi-valued attribute selected by type: (`emails`, `work`).
    Typed(&'a str, &'a str),
    /// Attribute of an extension schema: (URN, attribute).
    Ext(String, &'a str),
}

impl ScimTarget {
    pub fn new(
        base: &Url,
        token: SecretString,
        custom_schema: &str,
        concurrency: usize,
        timeout: Duration,
    ) -> Result<Self, TargetError> {
        let http = reqwest::Client::builder()
            // A redirect would re-send the token and user data elsewhere: an error instead.
            .redirect(crate::retry::no_redirects())
            .connect_timeout(Duration::from_secs(10))
            .timeout(timeout)
            .user_agent(concat!("rostersync/", env!("CARGO_PKG_VERSION")))
            .pool_max_idle_per_host(concurrency)
            .build()
            .map_err(|e| TargetError::Transport {
                url: base.to_string(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(Self {
            http,
            base: base.as_str().trim_end_matches('/').to_string(),
            token,
            custom_schema: custom_schema.to_string(),
            permits: Semaphore::new(concurrency.max(1)),
            retry: RetryPolicy::default(),
            label: String::new(),
        })
    }

    /// Names the integration in this target's metrics.
    pub fn with_label(mut self, integration: &str) -> Self {
        self.label = integration.to_string();
        self
    }

    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    fn place<'a>(&self, key: &'a str) -> Place<'a> {
        if let Some(a) = key.strip_prefix("enterprise.") {
            return Place::Ext(ENTERPRISE_USER.to_string(), a);
        }
        if let Some(a) = key.strip_prefix("custom.") {
            return Place::Ext(self.custom_schema.clone(), a);
        }
        if let Some((attr, ty)) = key.split_once('.') {
            if TYPED.contains(&attr) {
                return Place::Typed(attr, ty);
            }
        }
        Place::Core(key)
    }

    /// Sends one request (bounded, retried on 429/5xx unless `idempotent` is false) and
    /// returns status, Location header and body.
    /// One quick request (no retries, 5 s timeout) for health checks: `GET /Users?count=1`.
    pub async fn probe(&self) -> Result<(), String> {
        let url = format!("{}/Users?startIndex=1&count=1", self.base);
        let resp = self
            .http
            .get(&url)
            .bearer_auth(self.token.expose_secret())
            .header("Accept", "application/scim+json")
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| format!("LMS unreachable: {}", e.without_url()))?;
        match resp.status().as_u16() {
            200..=299 => Ok(()),
            401 | 403 => Err("LMS rejects the token (401/403)".into()),
            s => Err(format!("LMS answered {s}")),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path_and_query: &str,
        body: Option<&Value>,
        idempotent: bool,
    ) -> Result<(u16, Option<String>, Vec<u8>), TargetError> {
        let url = format!("{}{}", self.base, path_and_query);
        let mname = method_name(&method);
        let mut attempt = 0;
        let mut server_errors = 0;
        loop {
            attempt += 1;
            let resp = {
                let _permit = self
                    .permits
                    .acquire()
                    .await
                    .map_err(|_| TargetError::Transport {
                        url: self.base.clone(),
                        message: "client is shutting down".into(),
                    })?;
                let mut req = self
                    .http
                    .request(method.clone(), &url)
                    .bearer_auth(self.token.expose_secret())
                    .header("Accept", format!("{MEDIA_TYPE}, application/json"));
                if let Some(b) = body {
                    req = req
                        .header("Content-Type", MEDIA_TYPE)
                        .body(serde_json::to_vec(b).unwrap_or_default());
                }
                req.send().await
            };
            crate::metrics::request(
                crate::metrics::Remote::Target,
                &self.label,
                resp.as_ref().ok().map(|r| r.status().as_u16()),
            );
            let resp = match resp {
                Ok(r) => r,
                Err(e) => {
                    if idempotent && attempt < self.retry.max_attempts && !e.is_redirect() {
                        tracing::warn!(attempt, method = mname, path = path_and_query, error = %e, "LMS request failed; retrying");
                        tokio::time::sleep(self.retry.delay(attempt, None)).await;
                        continue;
                    }
                    return Err(TargetError::Transport {
                        url: self.base.clone(),
                        message: crate::retry::transport_message(&e),
                    });
                }
            };
            let status = resp.status().as_u16();
            // 429 means "not processed": safe to retry even for POST. A 503 may come from a
            // proxy after the backend acted, so a POST leaves it to its caller.
            let throttled = status == 429 || (status == 503 && idempotent);
            let transient = matches!(status, 500 | 502 | 504) && idempotent && server_errors < 2;
            if (throttled || transient) && attempt < self.retry.max_attempts {
                if transient {
                    server_errors += 1;
                }
                let delay = self.retry.delay(attempt, retry_after(resp.headers()));
                tracing::debug!(
                    attempt,
                    status,
                    method = mname,
                    path = path_and_query,
                    ?delay,
                    "LMS throttled or failed; backing off"
                );
                tokio::time::sleep(delay).await;
                continue;
            }
            if status == 401 {
                return Err(TargetError::Unauthorized);
            }
            let location = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = read_limited(resp, MAX_BODY)
                .await
                .map_err(|m| TargetError::Transport {
                    url: self.base.clone(),
                    message: m,
                })?;
            return Ok((status, location, bytes));
        }
    }

    fn error(&self, method: &'static str, path: &str, status: u16, body: &[u8]) -> TargetError {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let detail = v
            .get("detail")
            .and_then(|d| d.as_str())
            .map(str::to_string)
            .unwrap_or_else(|| {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)])
                    .trim()
                    .to_string();
                if text.is_empty() {
                    "no detail given".into()
                } else {
                    text
                }
            });
        TargetError::Http {
            method,
            path: path.to_string(),
            status,
            scim_type: v
                .get("scimType")
                .and_then(|t| t.as_str())
                .map(str::to_string),
            detail,
        }
    }

    fn decode(what: &str, body: &[u8]) -> Result<Value, TargetError> {
        serde_json::from_slice(body).map_err(|e| TargetError::Decode {
            what: what.to_string(),
            message: e.to_string(),
        })
    }

    /// Builds the full User resource for a POST.
    pub fn resource(&self, record: &Record) -> Value {
        let mut root = Map::new();
        let mut schemas = vec![CORE_USER.to_string()];
        for (key, value) in record {
            let v = scalar(value);
            match self.place(key) {
                Place::Core(k) => match k.split_once('.') {
                    Some((parent, sub)) => {
                        let obj = root.entry(parent).or_insert_with(|| json!({}));
                        if let Value::Object(o) = obj {
                            o.insert(sub.to_string(), v);
                        }
                    }
                    None => {
                        root.insert(k.to_string(), v);
                    }
                },
                Place::Typed(attr, ty) => {
                    let arr = root.entry(attr).or_insert_with(|| json!([]));
                    if let Value::Array(a) = arr {
                        a.push(typed_element(ty, v));
                    }
                }
                Place::Ext(urn, a) => {
                    if !schemas.contains(&urn) {
                        schemas.push(urn.clone());
                    }
                    let obj = root.entry(urn).or_insert_with(|| json!({}));
                    if let Value::Object(o) = obj {
                        o.insert(a.to_string(), ext_value(a, v));
                    }
                }
            }
        }
        root.insert("schemas".into(), json!(schemas));
        Value::Object(root)
    }

    /// Translates record changes into RFC 7644 §3.5.2 PATCH operations.
    pub fn patch_ops(&self, changes: &[AttrChange]) -> Vec<Value> {
        let mut ops = Vec::with_capacity(changes.len());
        for c in changes {
            let key = c.key.as_str();
            let (set_path, elem_path, container) = match self.place(key) {
                Place::Core(k) => (k.to_string(), None, None),
                Place::Typed(attr, ty) => (
                    format!("{attr}[type eq \"{ty}\"].value"),
                    Some(format!("{attr}[type eq \"{ty}\"]")),
                    Some((attr, ty)),
                ),
                Place::Ext(urn, a) => (format!("{urn}:{a}"), None, None),
            };
            match (&c.old, &c.new) {
                (_, None) => {
                    ops.push(json!({"op": "remove", "path": elem_path.unwrap_or(set_path)}))
                }
                (old, Some(new)) => {
                    let v = scalar(new);
                    match container {
                        // A typed element that did not exist must be added as a whole: a
                        // replace through a value filter that matches nothing is `noTarget`.
                        Some((attr, ty)) if old.is_none() => ops.push(
                            json!({"op": "add", "path": attr, "value": [typed_element(ty, v)]}),
                        ),
                        _ => {
                            let v = match self.place(key) {
                                Place::Ext(_, a) => ext_value(a, v),
                                _ => v,
                            };
                            let op = if old.is_some() || key == ACTIVE {
                                "replace"
                            } else {
                                "add"
                            };
                            ops.push(json!({"op": op, "path": set_path, "value": v}))
                        }
                    }
                }
            }
        }
        ops
    }

    /// Reads a SCIM User resource back into the record vocabulary (for linking).
    pub fn parse_user(&self, v: &Value) -> Result<TargetUser, TargetError> {
        let bad = |m: &str| TargetError::Decode {
            what: "User resource".into(),
            message: m.to_string(),
        };
        let id = v
            .get("id")
            .and_then(|i| i.as_str())
            .ok_or_else(|| bad("a user has no id"))?;
        let user_name = get_ci(v, USER_NAME)
            .and_then(|u| u.as_str())
            .unwrap_or("")
            .to_string();
        let mut record = Record::new();
        record.insert(USER_NAME.into(), AttrValue::Str(user_name.clone()));
        if let Some(e) = get_ci(v, EXTERNAL_ID).and_then(|e| e.as_str()) {
            record.insert(EXTERNAL_ID.into(), AttrValue::Str(e.to_string()));
        }
        record.insert(
            ACTIVE.into(),
            AttrValue::Bool(lenient_bool(get_ci(v, ACTIVE)).unwrap_or(true)),
        );
        if let Some(o) = v.as_object() {
            for (k, val) in o {
                let lk = k.to_ascii_lowercase();
                if lk == ENTERPRISE_USER.to_ascii_lowercase()
                    || lk == self.custom_schema.to_ascii_lowercase()
                {
                    let prefix = if lk == ENTERPRISE_USER.to_ascii_lowercase() {
                        "enterprise"
                    } else {
                        "custom"
                    };
                    if let Some(ext) = val.as_object() {
                        for (a, av) in ext {
                            let s = if a.eq_ignore_ascii_case("manager") {
                                av.get("value").and_then(|x| x.as_str()).or(av.as_str())
                            } else {
                                av.as_str()
                            };
                            if let Some(s) = s.filter(|s| !s.is_empty()) {
                                record
                                    .insert(format!("{prefix}.{a}"), AttrValue::Str(s.to_string()));
                            }
                        }
                    }
                } else if TYPED.iter().any(|t| t.eq_ignore_ascii_case(k)) {
                    let attr = TYPED
                        .iter()
                        .find(|t| t.eq_ignore_ascii_case(k))
                        .copied()
                        .unwrap_or("emails");
                    for el in val.as_array().into_iter().flatten() {
                        if let (Some(ty), Some(s)) = (
                            el.get("type").and_then(|t| t.as_str()),
                            el.get("value").and_then(|t| t.as_str()),
                        ) {
                            record.insert(
                                format!("{attr}.{}", ty.to_ascii_lowercase()),
                                AttrValue::Str(s.to_string()),
                            );
                        }
                    }
                } else if lk == "name" {
                    for (sub, sv) in val.as_object().into_iter().flatten() {
                        if let Some(s) = sv.as_str().filter(|s| !s.is_empty()) {
                            record.insert(format!("name.{sub}"), AttrValue::Str(s.to_string()));
                        }
                    }
                } else if !matches!(
                    lk.as_str(),
                    "id" | "schemas" | "meta" | "username" | "externalid" | "active"
                ) {
                    if let Some(s) = val.as_str().filter(|s| !s.is_empty()) {
                        record.insert(k.clone(), AttrValue::Str(s.to_string()));
                    }
                }
            }
        }
        Ok(TargetUser {
            id: id.to_string(),
            user_name,
            record,
        })
    }

    /// After an ambiguous create: looks the user up by externalId a few times, since filtered
    /// lists can lag behind a create (scim.md §9.11).
    async fn find_created(&self, external_id: &str) -> Result<Option<String>, TargetError> {
        for attempt in 1..=3u32 {
            if let Some(u) = self.find(EXTERNAL_ID, external_id).await? {
                return Ok(Some(u.id));
            }
            if attempt < 3 {
                tokio::time::sleep(Duration::from_millis(150 * u64::from(attempt))).await;
            }
        }
        Ok(None)
    }

    async fn find(
        &self,
        attr: &'static str,
        value: &str,
    ) -> Result<Option<TargetUser>, TargetError> {
        let path = eq_filter_path(attr, value);
        let (status, _, body) = self.send(reqwest::Method::GET, &path, None, true).await?;
        if status != 200 {
            return Err(self.error("GET", &format!("/Users?filter={attr} eq …"), status, &body));
        }
        let v = Self::decode("filtered ListResponse", &body)?;
        let resources = v
            .get("Resources")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default();
        // Some servers ignore filters (scim.md §9.6): re-check every returned resource.
        let mut matches = Vec::new();
        for r in &resources {
            let candidate = get_ci(r, attr).and_then(|x| x.as_str()).unwrap_or("");
            let same = if attr == USER_NAME {
                candidate.to_lowercase() == value.to_lowercase()
            } else {
                candidate == value
            };
            if same {
                matches.push(self.parse_user(r)?);
            }
        }
        match matches.len() {
            0 => Ok(None),
            1 => Ok(matches.pop()),
            n => Err(TargetError::Ambiguous {
                attr,
                value: value.to_string(),
                count: n,
            }),
        }
    }
}

impl Target for ScimTarget {
    async fn discover(&self) -> Result<Capabilities, TargetError> {
        let mut caps = Capabilities {
            enterprise: true,
            patch: true,
            filter: true,
            ..Default::default()
        };
        let (status, _, body) = self
            .send(reqwest::Method::GET, "/ServiceProviderConfig", None, true)
            .await?;
        if status >= 500 {
            return Err(self.error("GET", "/ServiceProviderConfig", status, &body));
        }
        if status == 200 {
            let v = Self::decode("/ServiceProviderConfig", &body)?;
            caps.patch = lenient_bool(v.pointer("/patch/supported")).unwrap_or(true);
            caps.filter = lenient_bool(v.pointer("/filter/supported")).unwrap_or(true);
        } else {
            caps.notes.push(format!(
                "/ServiceProviderConfig not served ({status}); assuming PATCH and filters work"
            ));
        }
        let (status, _, body) = self
            .send(reqwest::Method::GET, "/Schemas", None, true)
            .await?;
        if status >= 500 {
            return Err(self.error("GET", "/Schemas", status, &body));
        }
        if status == 200 {
            let v = Self::decode("/Schemas", &body)?;
            let list = match &v {
                Value::Array(a) => a.clone(),
                _ => v
                    .get("Resources")
                    .and_then(|r| r.as_array())
                    .cloned()
                    .unwrap_or_default(),
            };
            caps.discovered = true;
            caps.enterprise = false;
            for s in &list {
                let id = s.get("id").and_then(|i| i.as_str()).unwrap_or("");
                if id.eq_ignore_ascii_case(ENTERPRISE_USER) {
                    caps.enterprise = true;
                } else if id.eq_ignore_ascii_case(&self.custom_schema) {
                    let names = s
                        .get("attributes")
                        .and_then(|a| a.as_array())
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| {
                                    x.get("name").and_then(|n| n.as_str()).map(str::to_string)
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    caps.custom_attributes = Some(names);
                }
            }
            if !caps.enterprise {
                caps.notes.push(format!("the LMS does not declare {ENTERPRISE_USER}; employeeNumber, department and manager are not sent"));
            }
            if caps.custom_attributes.is_none() {
                caps.notes.push(format!(
                    "the LMS does not declare {}; custom.* attributes are not sent",
                    self.custom_schema
                ));
            }
        } else {
            caps.custom_attributes = None;
            caps.notes.push(format!("/Schemas not served ({status}); assuming core User and the enterprise extension only"));
        }
        if !caps.patch {
            caps.notes
                .push("the LMS says PATCH is not supported; rostersync needs PATCH".into());
        }
        Ok(caps)
    }

    async fn find_by_external_id(
        &self,
        external_id: &str,
    ) -> Result<Option<TargetUser>, TargetError> {
        self.find(EXTERNAL_ID, external_id).await
    }

    async fn find_by_user_name(&self, user_name: &str) -> Result<Option<TargetUser>, TargetError> {
        self.find(USER_NAME, user_name).await
    }

    async fn create(&self, record: &Record) -> Result<Option<String>, TargetError> {
        #[derive(serde::Deserialize)]
        struct Created {
            id: Option<String>,
        }
        let body = self.resource(record);
        let external_id = match record.get(EXTERNAL_ID) {
            Some(AttrValue::Str(s)) => s.clone(),
            _ => String::new(),
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self
                .send(reqwest::Method::POST, "/Users", Some(&body), false)
                .await;
            let (status, location, bytes) = match res {
                Ok(r) => r,
                Err(TargetError::Transport { url, message }) => {
                    // The first attempt may have succeeded: look before posting again.
                    if let Some(id) = self.find_created(&external_id).await? {
                        return Ok(Some(id));
                    }
                    if attempt >= 3 {
                        return Err(TargetError::Transport { url, message });
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            match status {
                201 | 200 => {
                    if let Ok(Created { id: Some(id) }) = serde_json::from_slice::<Created>(&bytes)
                    {
                        return Ok(Some(id));
                    }
                    // No usable body: take the id from Location, else look it up.
                    if let Some(id) = location
                        .as_deref()
                        .and_then(|l| l.trim_end_matches('/').rsplit('/').next())
                        .filter(|s| !s.is_empty())
                    {
                        return Ok(Some(id.to_string()));
                    }
                    return self.find_created(&external_id).await;
                }
                409 => return Ok(None),
                500 | 502 | 503 | 504 if attempt < 3 => {
                    // Maybe created, maybe not: re-query before trying again.
                    if let Some(id) = self.find_created(&external_id).await? {
                        return Ok(Some(id));
                    }
                    tokio::time::sleep(self.retry.delay(attempt, None)).await;
                }
                _ => return Err(self.error("POST", "/Users", status, &bytes)),
            }
        }
    }

    async fn update(&self, id: &str, changes: &[AttrChange]) -> Result<(), TargetError> {
        let ops = self.patch_ops(changes);
        if ops.is_empty() {
            return Ok(());
        }
        let body = json!({"schemas": [PATCH_OP], "Operations": ops});
        let path = format!("/Users/{}", crate::graph::urlencode(id));
        let (status, _, bytes) = self
            .send(reqwest::Method::PATCH, &path, Some(&body), true)
            .await?;
        match status {
            200 | 204 => Ok(()),
            404 => Err(TargetError::NotFound(id.to_string())),
            _ => Err(self.error("PATCH", &path, status, &bytes)),
        }
    }

    async fn get(&self, id: &str) -> Result<Option<TargetUser>, TargetError> {
        let path = format!("/Users/{}", crate::graph::urlencode(id));
        let (status, _, body) = self.send(reqwest::Method::GET, &path, None, true).await?;
        match status {
            200 => self.parse_user(&Self::decode("User", &body)?).map(Some),
            404 => Ok(None),
            _ => Err(self.error("GET", &path, status, &body)),
        }
    }

    async fn list(
        &self,
        start: usize,
        count: usize,
    ) -> Result<(Vec<TargetUser>, usize), TargetError> {
        let path = format!("/Users?startIndex={start}&count={count}");
        let (status, _, body) = self.send(reqwest::Method::GET, &path, None, true).await?;
        if status != 200 {
            return Err(self.error("GET", &path, status, &body));
        }
        let v = Self::decode("ListResponse", &body)?;
        let total = v.get("totalResults").and_then(|t| t.as_u64()).unwrap_or(0) as usize;
        let users = v
            .get("Resources")
            .and_then(|r| r.as_array())
            .map(|a| {
                a.iter()
                    .map(|r| self.parse_user(r))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?
            .unwrap_or_default();
        Ok((users, total))
    }
}

fn method_name(m: &reqwest::Method) -> &'static str {
    match *m {
        reqwest::Method::GET => "GET",
        reqwest::Method::POST => "POST",
        reqwest::Method::PATCH => "PATCH",
        reqwest::Method::PUT => "PUT",
        reqwest::Method::DELETE => "DELETE",
        _ => "request",
    }
}

fn scalar(v: &AttrValue) -> Value {
    match v {
        AttrValue::Bool(b) => Value::Bool(*b),
        AttrValue::Str(s) => Value::String(s.clone()),
    }
}

fn typed_element(ty: &str, v: Value) -> Value {
    if ty == "work" {
        json!({"value": v, "type": ty, "primary": true})
    } else {
        json!({"value": v, "type": ty})
    }
}

/// The enterprise manager is a complex attribute whose `value` is the manager's target id.
fn ext_value(attr: &str, v: Value) -> Value {
    if attr == "manager" {
        json!({ "value": v })
    } else {
        v
    }
}

/// Attribute names are case-insensitive (RFC 7643 §2.1).
fn get_ci<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    v.as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// Servers send `true`, `"True"` or `1` (scim.md §9.8).
fn lenient_bool(v: Option<&Value>) -> Option<bool> {
    match v? {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        Value::Number(n) => n.as_u64().map(|n| n != 0),
        _ => None,
    }
}

/// A query value: everything but RFC 3986 unreserved characters is percent-encoded, so a
/// space is `%20`, never `+` (scim.md §3).
/// `/Users?filter=<attr> eq "<value>"`. Values are JSON strings (RFC 7644 §3.4.2.2): the
/// serializer escapes quotes and backslashes; the whole filter is then percent-encoded with
/// %20 for spaces.
pub(crate) fn eq_filter_path(attr: &str, value: &str) -> String {
    let literal = serde_json::to_string(value).unwrap_or_default();
    let filter = format!("{attr} eq {literal}");
    format!("/Users?filter={}", query_encode(&filter))
}

fn query_encode(s: &str) -> String {
    crate::graph::urlencode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> ScimTarget {
        ScimTarget::new(
            &Url::parse("http://lms.test/scim/v2").unwrap(),
            SecretString::from("t"),
            "urn:ietf:params:scim:schemas:extension:acme:2.0:User",
            2,
            Duration::from_secs(5),
        )
        .unwrap()
    }

    fn s(v: &str) -> Option<AttrValue> {
        Some(AttrValue::Str(v.into()))
    }

    #[test]
    fn resource_nests_names_emails_and_extensions() {
        let mut r = Record::new();
        r.insert("userName".into(), AttrValue::Str("a@x".into()));
        r.insert("active".into(), AttrValue::Bool(true));
        r.insert("name.givenName".into(), AttrValue::Str("Ada".into()));
        r.insert("emails.work".into(), AttrValue::Str("a@x".into()));
        r.insert("enterprise.manager".into(), AttrValue::Str("m-1".into()));
        r.insert("custom.city".into(), AttrValue::Str("Oslo".into()));
        let v = target().resource(&r);
        assert_eq!(v["name"]["givenName"], "Ada");
        assert_eq!(v["active"], true);
        assert_eq!(
            v["emails"][0],
            json!({"value":"a@x","type":"work","primary":true})
        );
        assert_eq!(v[ENTERPRISE_USER]["manager"], json!({"value":"m-1"}));
        assert_eq!(
            v["urn:ietf:params:scim:schemas:extension:acme:2.0:User"]["city"],
            "Oslo"
        );
        let schemas = v["schemas"].as_array().unwrap();
        assert_eq!(schemas.len(), 3);
        // Round trip back into the record vocabulary.
        let mut with_id = v.clone();
        with_id["id"] = json!("t-1");
        assert_eq!(target().parse_user(&with_id).unwrap().record, r);
    }

    #[test]
    fn patch_ops_are_rfc_shaped() {
        let ops = target().patch_ops(&[
            AttrChange {
                key: "title".into(),
                old: s("A"),
                new: s("B"),
            },
            AttrChange {
                key: "emails.work".into(),
                old: None,
                new: s("n@x"),
            },
            AttrChange {
                key: "emails.work".into(),
                old: s("o@x"),
                new: s("n@x"),
            },
            AttrChange {
                key: "emails.work".into(),
                old: s("o@x"),
                new: None,
            },
            AttrChange {
                key: "active".into(),
                old: Some(AttrValue::Bool(true)),
                new: Some(AttrValue::Bool(false)),
            },
            AttrChange {
                key: "enterprise.department".into(),
                old: None,
                new: s("R&D"),
            },
            AttrChange {
                key: "enterprise.manager".into(),
                old: s("m1"),
                new: s("m2"),
            },
            AttrChange {
                key: "name.familyName".into(),
                old: s("X"),
                new: None,
            },
        ]);
        assert_eq!(ops[0], json!({"op":"replace","path":"title","value":"B"}));
        assert_eq!(
            ops[1],
            json!({"op":"add","path":"emails","value":[{"value":"n@x","type":"work","primary":true}]})
        );
        assert_eq!(
            ops[2],
            json!({"op":"replace","path":"emails[type eq \"work\"].value","value":"n@x"})
        );
        assert_eq!(
            ops[3],
            json!({"op":"remove","path":"emails[type eq \"work\"]"})
        );
        assert_eq!(
            ops[4],
            json!({"op":"replace","path":"active","value":false})
        );
        assert_eq!(
            ops[5],
            json!({"op":"add","path":format!("{ENTERPRISE_USER}:department"),"value":"R&D"})
        );
        assert_eq!(
            ops[6],
            json!({"op":"replace","path":format!("{ENTERPRISE_USER}:manager"),"value":{"value":"m2"}})
        );
        assert_eq!(ops[7], json!({"op":"remove","path":"name.familyName"}));
    }

    #[test]
    fn filters_are_escaped_and_percent_encoded() {
        let literal = serde_json::to_string("o\"brien\\x y").unwrap();
        let enc = query_encode(&format!("userName eq {literal}"));
        assert_eq!(enc, "userName%20eq%20%22o%5C%22brien%5C%5Cx%20y%22");
        assert_eq!(lenient_bool(Some(&json!("False"))), Some(false));
        assert_eq!(lenient_bool(Some(&json!(1))), Some(true));
    }
}
