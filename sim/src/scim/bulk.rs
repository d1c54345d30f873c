//! `POST /Bulk` (RFC 7644 §3.7), when the server is configured to offer it.
//!
//! Each operation runs through the same handlers as a request of its own (`POST /Users`,
//! `PUT|PATCH|DELETE /Users/{id}`), with the same per-user faults, and its outcome is
//! reported in the `BulkResponse` with its status as a string, `location` for a resource it
//! created or changed, and the error body as `response` for a failure. `bulkId:` references in
//! an operation's `data` resolve to the ids created earlier in the same request (counted as
//! `bulk_ref`); one that cannot be resolved fails that operation with 409 `invalidValue`. A
//! server configured with `literal_references` keeps them as they are instead (counted as
//! `bulk_ref_kept`). `failOnErrors` stops the
//! request after that many failed operations. A request over `maxPayloadSize` or with more than
//! `maxOperations` operations is refused whole with 413.

use std::collections::HashMap;

use actix_web::body::MessageBody;
use actix_web::http::header;
use actix_web::HttpResponse;
use serde_json::{json, Value};

use super::error::ScimError;
use super::{
    create_user, external_id_by_id, fault_of, parse_json, patch_user, replace_user, scim_json,
    Inner, UserFaultKind,
};

pub(crate) const BULK_REQUEST_URN: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";
pub(crate) const BULK_RESPONSE_URN: &str = "urn:ietf:params:scim:api:messages:2.0:BulkResponse";

/// What the server advertises in `ServiceProviderConfig.bulk` and enforces.
#[derive(Clone, Copy, Debug)]
pub struct SimBulk {
    pub max_operations: usize,
    pub max_payload_size: usize,
    /// Advertised but not served: `/Bulk` answers 501 (a server whose discovery document
    /// says more than it does).
    pub broken: bool,
    /// Refuses with 413 a request of more operations than this, whatever it advertises.
    pub enforced_max_operations: Option<usize>,
    /// Does not resolve `bulkId:` references: keeps them as the literal strings they are (a
    /// server that implements bulk without §3.7.2).
    pub literal_references: bool,
}

impl Default for SimBulk {
    fn default() -> Self {
        SimBulk {
            max_operations: 1000,
            max_payload_size: 1 << 20,
            broken: false,
            enforced_max_operations: None,
            literal_references: false,
        }
    }
}

/// The number of operations a bulk body carries (0 when it is not one): what the per-operation
/// latency is charged on before the request runs.
pub(crate) fn operation_count(body: &[u8]) -> usize {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("Operations")?.as_array().map(Vec::len))
        .unwrap_or(0)
}

pub(crate) fn bulk(inner: &Inner, body: &[u8]) -> Result<HttpResponse, ScimError> {
    let Some(limits) = inner.cfg.bulk.filter(|b| !b.broken) else {
        return Err(ScimError::new(
            501,
            None,
            "bulk operations are not supported",
        ));
    };
    if body.len() > limits.max_payload_size {
        inner.count("413");
        return Err(ScimError::new(
            413,
            None,
            format!(
                "the request is {} bytes; maxPayloadSize is {}",
                body.len(),
                limits.max_payload_size
            ),
        ));
    }
    let v = parse_json(body)?;
    let is_bulk = v
        .get("schemas")
        .and_then(Value::as_array)
        .is_some_and(|s| s.iter().any(|u| u.as_str() == Some(BULK_REQUEST_URN)));
    if !is_bulk {
        return Err(ScimError::invalid_syntax(format!(
            "schemas must contain {BULK_REQUEST_URN}"
        )));
    }
    let Some(ops) = v.get("Operations").and_then(Value::as_array) else {
        return Err(ScimError::invalid_syntax("Operations must be an array"));
    };
    let max_ops = limits
        .enforced_max_operations
        .unwrap_or(limits.max_operations);
    if ops.len() > max_ops {
        inner.count("413");
        return Err(ScimError::new(
            413,
            None,
            format!(
                "the request has {} operations; maxOperations is {max_ops}",
                ops.len(),
            ),
        ));
    }
    let fail_on_errors = v.get("failOnErrors").and_then(Value::as_u64);
    let mut created: HashMap<String, String> = HashMap::new();
    let mut errors = 0u64;
    let mut out = Vec::with_capacity(ops.len());
    for op in ops {
        if fail_on_errors.is_some_and(|n| n > 0 && errors >= n) {
            break;
        }
        inner.count("bulk_op");
        let method = op
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_ascii_uppercase();
        if method == "PATCH" {
            inner.count("bulk_patch");
        }
        let bulk_id = op.get("bulkId").and_then(Value::as_str).map(str::to_string);
        let (status, location, response, id) =
            match run(inner, &method, op, bulk_id.as_deref(), &created) {
                Ok(r) => r,
                Err(e) => (e.status, None, Some(e.body()), None),
            };
        if status >= 400 {
            errors += 1;
        }
        if let (Some(b), Some(id), "POST") = (&bulk_id, &id, method.as_str()) {
            created.insert(b.clone(), id.clone());
        }
        let mut r = json!({"method": method, "status": status.to_string()});
        if let Some(b) = bulk_id {
            r["bulkId"] = json!(b);
        }
        if let Some(l) = location {
            r["location"] = json!(l);
        }
        if let Some(body) = response.filter(|_| status >= 400) {
            r["response"] = body;
        }
        out.push(r);
    }
    inner.count("bulk");
    Ok(scim_json(
        actix_web::http::StatusCode::OK,
        &json!({"schemas": [BULK_RESPONSE_URN], "Operations": out}),
    ))
}

type OpResult = (u16, Option<String>, Option<Value>, Option<String>);

fn run(
    inner: &Inner,
    method: &str,
    op: &Value,
    bulk_id: Option<&str>,
    created: &HashMap<String, String>,
) -> Result<OpResult, ScimError> {
    let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
    let mut data = op.get("data").cloned().unwrap_or(Value::Null);
    if inner.cfg.bulk.is_some_and(|b| b.literal_references) {
        for _ in 0..references(&data) {
            inner.count("bulk_ref_kept");
        }
    } else {
        let n = resolve(&mut data, created)?;
        for _ in 0..n {
            inner.count("bulk_ref");
        }
    }
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let body = data.to_string();
    let resp = match (method, segs.as_slice()) {
        ("POST", ["Users"]) => {
            if bulk_id.is_none_or(str::is_empty) {
                return Err(ScimError::invalid_syntax("a POST operation needs a bulkId"));
            }
            let external = data.get("externalId").and_then(Value::as_str);
            fault(inner, external)?;
            create_user(inner, body.as_bytes(), &[])?
        }
        (m @ ("PUT" | "PATCH" | "DELETE"), ["Users", id]) => {
            fault(inner, external_id_by_id(inner, id).as_deref())?;
            match m {
                "PUT" => replace_user(inner, id, body.as_bytes(), &[])?,
                "PATCH" => patch_user(inner, id, body.as_bytes(), &[])?,
                _ => {
                    if inner.write().delete(id) {
                        HttpResponse::NoContent().finish()
                    } else {
                        return Err(ScimError::not_found(format!("User {id} not found")));
                    }
                }
            }
        }
        _ => {
            return Err(ScimError::invalid_syntax(format!(
                "unsupported bulk operation {method} {path}"
            )))
        }
    };
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get(header::LOCATION)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let body: Option<Value> = resp
        .into_body()
        .try_into_bytes()
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let id = body
        .as_ref()
        .and_then(|b| b.get("id")?.as_str().map(str::to_string));
    let location = location.or_else(|| {
        body.as_ref()
            .and_then(|b| b.pointer("/meta/location")?.as_str().map(str::to_string))
    });
    Ok((status, location, body, id))
}

/// A configured per-user status fault applies to that user's operation as to its request.
fn fault(inner: &Inner, external_id: Option<&str>) -> Result<(), ScimError> {
    match external_id.and_then(|e| fault_of(inner, e)) {
        Some(UserFaultKind::Status(code)) => {
            inner.count("user_fault");
            Err(ScimError::new(code, None, "injected fault of this user"))
        }
        _ => Ok(()),
    }
}

/// How many strings `bulkId:<id>` `v` holds.
fn references(v: &Value) -> usize {
    match v {
        Value::String(s) => usize::from(s.starts_with("bulkId:")),
        Value::Array(a) => a.iter().map(references).sum(),
        Value::Object(o) => o.values().map(references).sum(),
        _ => 0,
    }
}

/// Replaces every string `bulkId:<id>` in `v` by the id created for it earlier in the request;
/// returns how many it replaced.
fn resolve(v: &mut Value, created: &HashMap<String, String>) -> Result<usize, ScimError> {
    let mut n = 0;
    match v {
        Value::String(s) => {
            if let Some(b) = s.strip_prefix("bulkId:") {
                match created.get(b) {
                    Some(id) => {
                        *s = id.clone();
                        n += 1;
                    }
                    None => {
                        return Err(ScimError::new(
                            409,
                            Some("invalidValue"),
                            format!("bulkId {b} does not refer to a resource created earlier in this request"),
                        ))
                    }
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                n += resolve(x, created)?;
            }
        }
        Value::Object(o) => {
            for (_, x) in o.iter_mut() {
                n += resolve(x, created)?;
            }
        }
        _ => {}
    }
    Ok(n)
}
