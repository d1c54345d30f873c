//! SCIM error bodies (RFC 7644 §3.12; docs/scim.md).

use actix_web::http::{header, StatusCode};
use actix_web::HttpResponse;
use serde_json::json;

/// `Content-Type` of every answer (RFC 7644 §3.1, §8.1).
pub(crate) const SCIM_CONTENT_TYPE: &str = "application/scim+json";
pub(crate) const ERROR_URN: &str = "urn:ietf:params:scim:api:messages:2.0:Error";

/// An error answered as a SCIM `Error` message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ScimError {
    pub status: u16,
    pub scim_type: Option<&'static str>,
    pub detail: String,
}

impl ScimError {
    pub fn new(status: u16, scim_type: Option<&'static str>, detail: impl Into<String>) -> Self {
        ScimError {
            status,
            scim_type,
            detail: detail.into(),
        }
    }
    fn bad(scim_type: &'static str, detail: impl Into<String>) -> Self {
        Self::new(400, Some(scim_type), detail)
    }
    pub fn invalid_value(detail: impl Into<String>) -> Self {
        Self::bad("invalidValue", detail)
    }
    pub fn invalid_syntax(detail: impl Into<String>) -> Self {
        Self::bad("invalidSyntax", detail)
    }
    pub fn invalid_filter(detail: impl Into<String>) -> Self {
        Self::bad("invalidFilter", detail)
    }
    pub fn invalid_path(detail: impl Into<String>) -> Self {
        Self::bad("invalidPath", detail)
    }
    pub fn no_target(detail: impl Into<String>) -> Self {
        Self::bad("noTarget", detail)
    }
    pub fn mutability(detail: impl Into<String>) -> Self {
        Self::bad("mutability", detail)
    }
    /// 409 with `scimType: uniqueness` (RFC 7644 §3.3).
    pub fn uniqueness(detail: impl Into<String>) -> Self {
        Self::new(409, Some("uniqueness"), detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(404, None, detail)
    }

    /// Replaces the `scimType` of a 400 (used where a sub-parser's error must be reported
    /// under the caller's type, e.g. a bad attribute name inside a PATCH `value` object).
    pub fn with_type(mut self, scim_type: &'static str) -> Self {
        if self.status == 400 {
            self.scim_type = Some(scim_type);
        }
        self
    }

    pub fn body(&self) -> serde_json::Value {
        let mut v = json!({
            "schemas": [ERROR_URN],
            // `status` is the HTTP code as a JSON *string* (RFC 7644 §3.12).
            "status": self.status.to_string(),
            "detail": self.detail,
        });
        if let (Some(t), Some(obj)) = (self.scim_type, v.as_object_mut()) {
            obj.insert("scimType".into(), t.into());
        }
        v
    }

    /// As loose servers answer: `status` a number, `{"detail"}` without `schemas`, no
    /// `scimType` on a 409 (on nothing with `bare`), nothing at all in a 404.
    pub fn loose_response(&self, bare: bool) -> HttpResponse {
        let code = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut b = HttpResponse::build(code);
        if self.status == 404 {
            return b.finish();
        }
        let mut v = json!({"status": self.status, "detail": self.detail});
        if let (Some(t), Some(obj), false) = (
            self.scim_type,
            v.as_object_mut(),
            bare || self.status == 409,
        ) {
            obj.insert("scimType".into(), t.into());
        }
        b.insert_header((header::CONTENT_TYPE, "application/json"));
        b.body(v.to_string())
    }

    pub fn response(&self) -> HttpResponse {
        let code = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut b = HttpResponse::build(code);
        b.insert_header((header::CONTENT_TYPE, SCIM_CONTENT_TYPE));
        if self.status == 401 {
            b.insert_header((header::WWW_AUTHENTICATE, "Bearer realm=\"scim\""));
        }
        b.body(self.body().to_string())
    }
}

impl std::fmt::Display for ScimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.scim_type {
            Some(t) => write!(f, "{} {}: {}", self.status, t, self.detail),
            None => write!(f, "{}: {}", self.status, self.detail),
        }
    }
}
