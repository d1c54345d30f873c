//! The target-neutral user record: what the mapping produces, the index stores and the LMS
//! client translates into its own wire format (SCIM JSON, `lms::scim`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// A mapped attribute value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum AttrValue {
    Bool(bool),
    Str(String),
}

// By hand rather than `#[serde(untagged)]`: the derived version buffers each value and builds
// (and throws away) an error for every string it first tries as a bool, which showed up in
// profiles of a 100k-user reconcile (every index read decodes a whole record).
impl<'de> Deserialize<'de> for AttrValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = AttrValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or a boolean")
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<AttrValue, E> {
                Ok(AttrValue::Bool(v))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<AttrValue, E> {
                Ok(AttrValue::Str(v.to_owned()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<AttrValue, E> {
                Ok(AttrValue::Str(v))
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttrValue::Bool(b) => write!(f, "{b}"),
            AttrValue::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// Target-neutral record: canonical attribute key → value. Absent key = no value.
pub type Record = BTreeMap<String, AttrValue>;

/// Record keys with fixed meaning.
pub const USER_NAME: &str = "userName";
pub const EXTERNAL_ID: &str = "externalId";
pub const ACTIVE: &str = "active";
pub const MANAGER: &str = "enterprise.manager";

/// Whether a record is active: only an explicit `active = false` makes it inactive.
pub fn is_active(record: &Record) -> bool {
    !matches!(record.get(ACTIVE), Some(AttrValue::Bool(false)))
}

/// One attribute's planned change: `old` is what rostersync last applied (or what the target
/// holds, for a linked user), `new` what it should become; `None` is "no value".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttrChange {
    pub key: String,
    pub old: Option<AttrValue>,
    pub new: Option<AttrValue>,
}
