//! Dialect switches: each reproduces one thing partial SCIM servers in LMSs really do, so the
//! client can be tested against all of them. The default is the RFC-strict server.

use serde_json::{Map, Value};

use super::error::ScimError;

/// Which filters the server evaluates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SimFilter {
    /// Every filter (RFC 7644 §3.4.2.2).
    #[default]
    All,
    /// `externalId` is not filterable: a filter on it answers 200 with `totalResults: 0`;
    /// `userName eq` works (case-insensitively).
    ExternalIdSilent,
    /// No filtering: any `filter` answers 400 `invalidFilter`.
    None,
}

/// Partial-server behaviours. `SimDialect::default()` is the strict server.
#[derive(Clone, Debug, Default)]
pub struct SimDialect {
    /// PATCH ops answered 501 (e.g. `["add", "remove"]`: a replace-only server).
    pub ops_501: Vec<&'static str>,
    /// Every PATCH answers 501 and `/ServiceProviderConfig` says `patch.supported: false`.
    pub no_patch: bool,
    /// PUT answers 501.
    pub no_put: bool,
    /// A value-path filter in a PATCH path (`emails[type eq "work"].value`) answers 400
    /// `invalidPath`.
    pub no_value_paths: bool,
    /// `replace` with `null` answers 400 `invalidValue`.
    pub refuse_null: bool,
    /// `replace` with `""` answers 400 `invalidValue`.
    pub refuse_empty: bool,
    /// `replace` of an attribute that has no value answers 400 `noTarget` (`add` sets it).
    pub replace_needs_target: bool,
    pub filter: SimFilter,
    /// `/ServiceProviderConfig` says `filter.supported: false` (whatever `filter` does).
    pub advertise_no_filter: bool,
    /// userName uniqueness is case-sensitive (`Ada@x` and `ada@x` may both exist) while the
    /// `userName eq` filter is not.
    pub case_sensitive_user_names: bool,
    /// `emails[].type` is dropped when stored: `[{"value", "primary"}]` comes back.
    pub untyped_emails: bool,
    /// `displayName` is computed ("familyName, givenName", else userName); what is written
    /// to it is ignored.
    pub computed_display_name: bool,
    /// PATCH of these attributes answers 400 `mutability` although `/Schemas` declares them
    /// `readWrite` (PUT takes them).
    pub refuse_patch_of: Vec<&'static str>,
    /// Errors as such servers send them: `status` as a number, `{"detail"}` without
    /// `schemas`, a 409 without `scimType`, 404 with an empty body, 401 with an empty
    /// `text/html` body.
    pub loose_errors: bool,
    /// With `loose_errors`: no error carries a `scimType` at all.
    pub bare_errors: bool,
    /// `/Schemas` and `/ResourceTypes` come back without `totalResults`.
    pub discovery_without_total: bool,
}

impl SimDialect {
    /// RFC-strict (the default).
    pub fn strict() -> Self {
        Self::default()
    }

    /// PATCH `replace` only: `add` and `remove` answer 501; `replace` with null clears.
    pub fn replace_only() -> Self {
        SimDialect {
            ops_501: vec!["add", "remove"],
            ..Default::default()
        }
    }

    /// Replace-only, and nothing clears a value: null and "" are refused, PUT answers 501.
    pub fn no_clear() -> Self {
        SimDialect {
            ops_501: vec!["add", "remove"],
            refuse_null: true,
            refuse_empty: true,
            no_put: true,
            no_value_paths: true,
            ..Default::default()
        }
    }

    /// `replace` only changes values that exist: an absent one must be set with `add`.
    pub fn replace_needs_add() -> Self {
        SimDialect {
            replace_needs_target: true,
            ..Default::default()
        }
    }

    /// No PATCH at all: every change is a PUT of the whole resource.
    pub fn put_only() -> Self {
        SimDialect {
            no_patch: true,
            ..Default::default()
        }
    }

    /// No filter support at all (and `/ServiceProviderConfig` says so).
    pub fn no_filter() -> Self {
        SimDialect {
            filter: SimFilter::None,
            advertise_no_filter: true,
            ..Default::default()
        }
    }

    /// The server of a widely used SCIM library with partial PATCH: every quirk at once.
    pub fn partial_library() -> Self {
        SimDialect {
            ops_501: vec!["add", "remove"],
            no_value_paths: true,
            filter: SimFilter::ExternalIdSilent,
            advertise_no_filter: true,
            case_sensitive_user_names: true,
            untyped_emails: true,
            computed_display_name: true,
            refuse_patch_of: vec!["displayName", "externalId"],
            loose_errors: true,
            discovery_without_total: true,
            ..Default::default()
        }
    }

    /// Errors that say nothing but their status and a detail (no `scimType` anywhere):
    /// PATCH `remove` answers 501, `replace` with null a plain 400, value paths a plain 400,
    /// and PATCH of `displayName` and `externalId` a plain 400 (PUT takes them).
    pub fn bare_errors() -> Self {
        SimDialect {
            ops_501: vec!["remove"],
            refuse_null: true,
            no_value_paths: true,
            refuse_patch_of: vec!["displayName", "externalId"],
            loose_errors: true,
            bare_errors: true,
            ..Default::default()
        }
    }

    /// Every preset, by name (for tests that run against each).
    pub fn all() -> Vec<(&'static str, SimDialect)> {
        vec![
            ("strict", Self::strict()),
            ("replace-only", Self::replace_only()),
            ("replace-needs-add", Self::replace_needs_add()),
            ("no-clear", Self::no_clear()),
            ("put-only", Self::put_only()),
            ("no-filter", Self::no_filter()),
            ("partial-library", Self::partial_library()),
            ("bare-errors", Self::bare_errors()),
        ]
    }

    /// Refuses a PATCH body this server would not take, before it is applied.
    pub(crate) fn check_patch(&self, body: &Value) -> Result<(), ScimError> {
        if self.no_patch {
            return Err(ScimError::new(501, None, "PATCH is not supported"));
        }
        let ops = body
            .as_object()
            .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("Operations")))
            .and_then(|(_, v)| v.as_array())
            .cloned()
            .unwrap_or_default();
        for (i, op) in ops.iter().enumerate() {
            let get = |k: &str| {
                op.as_object()
                    .and_then(|o| o.iter().find(|(n, _)| n.eq_ignore_ascii_case(k)))
                    .map(|(_, v)| v)
            };
            let name = get("op")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_ascii_lowercase();
            if self.ops_501.iter().any(|o| *o == name) {
                return Err(ScimError::new(
                    501,
                    None,
                    format!("Operations[{i}]: PATCH op \"{name}\" is not implemented"),
                ));
            }
            let path = get("path").and_then(Value::as_str).unwrap_or("");
            if self.no_value_paths && path.contains('[') {
                return Err(ScimError::invalid_path(format!(
                    "Operations[{i}]: filtered paths are not supported: {path}"
                )));
            }
            let value = get("value");
            if name == "replace" && !path.is_empty() {
                if self.refuse_null && matches!(value, Some(Value::Null)) {
                    return Err(ScimError::invalid_value(format!(
                        "Operations[{i}]: a value is required for \"{path}\""
                    )));
                }
                if self.refuse_null
                    && value.is_some_and(|v| v.as_array().is_some_and(Vec::is_empty))
                {
                    return Err(ScimError::invalid_value(format!(
                        "Operations[{i}]: a value is required for \"{path}\""
                    )));
                }
                if self.refuse_empty && value.and_then(Value::as_str) == Some("") {
                    return Err(ScimError::invalid_value(format!(
                        "Operations[{i}]: \"{path}\" must not be empty"
                    )));
                }
            }
            let mut names: Vec<String> = Vec::new();
            if path.is_empty() {
                if let Some(Value::Object(m)) = value {
                    names.extend(m.keys().cloned());
                }
            } else {
                names.push(path.to_string());
            }
            for n in names {
                let base = n.split(['[', '.']).next().unwrap_or(&n);
                if let Some(r) = self
                    .refuse_patch_of
                    .iter()
                    .find(|r| r.eq_ignore_ascii_case(base))
                {
                    return Err(ScimError::mutability(format!(
                        "Operations[{i}]: attribute \"{r}\" cannot be modified with PATCH"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Refuses a `replace` of an attribute the user has no value for (with
    /// `replace_needs_target`).
    pub(crate) fn check_targets(
        &self,
        body: &Value,
        attrs: &Map<String, Value>,
    ) -> Result<(), ScimError> {
        if !self.replace_needs_target {
            return Ok(());
        }
        let ops = body
            .get("Operations")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (i, op) in ops.iter().enumerate() {
            let (Some("replace"), Some(path), Some(v)) = (
                op.get("op").and_then(Value::as_str),
                op.get("path").and_then(Value::as_str),
                op.get("value"),
            ) else {
                continue;
            };
            if v.is_null() || path.contains('[') {
                continue;
            }
            let get = |m: &Map<String, Value>, k: &str| {
                m.iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .map(|(_, v)| v.clone())
            };
            let present = match path.rsplit_once(':') {
                Some((urn, attr)) if path.to_ascii_lowercase().starts_with("urn:") => {
                    get(attrs, urn)
                        .and_then(|e| e.as_object().and_then(|o| get(o, attr)))
                        .is_some()
                }
                _ => match path.split_once('.') {
                    Some((a, sub)) => get(attrs, a)
                        .and_then(|e| e.as_object().and_then(|o| get(o, sub)))
                        .is_some(),
                    None => get(attrs, path).is_some(),
                },
            };
            if !present {
                return Err(ScimError::no_target(format!(
                    "Operations[{i}]: \"{path}\" has no value to replace; use add"
                )));
            }
        }
        Ok(())
    }

    /// What the server makes of the attributes it stores.
    pub(crate) fn shape(&self, attrs: &mut Map<String, Value>) {
        if self.untyped_emails {
            if let Some(Value::Array(items)) = attrs.get_mut("emails") {
                for e in items.iter_mut() {
                    if let Some(o) = e.as_object_mut() {
                        o.remove("type");
                    }
                }
            }
        }
        if self.computed_display_name {
            let name = |k: &str| {
                attrs
                    .get("name")
                    .and_then(|n| n.get(k))
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            };
            let computed = match (name("familyName"), name("givenName")) {
                (Some(f), Some(g)) => format!("{f}, {g}"),
                (Some(x), None) | (None, Some(x)) => x,
                (None, None) => attrs
                    .get("userName")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            };
            attrs.insert("displayName".into(), Value::String(computed));
        }
    }

    /// Whether a filter is answered with "nothing found" without being evaluated.
    pub(crate) fn filter_matches_nothing(&self, filter: &str) -> bool {
        self.filter == SimFilter::ExternalIdSilent
            && filter.to_ascii_lowercase().contains("externalid")
    }
}
