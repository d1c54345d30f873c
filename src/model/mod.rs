//! The domain's vocabulary that the lower layers share: names and kinds that the store, the
//! Graph client and the config all speak of, with no behaviour beyond their own checks. Kept at
//! the bottom of the layers (ARCHITECTURE.md, "Layers") so that neither has to import the
//! other for them.

pub(crate) mod change;
pub(crate) mod record;
pub(crate) mod trace;

use std::fmt;

use serde::{Deserialize, Serialize};

/// An integration's name: `[a-z0-9-]+`, used in store keys, URLs and logs.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntegrationName(String);

impl IntegrationName {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() || s.len() > 63 {
            return Err("must be 1 to 63 characters".into());
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        {
            return Err(format!(
                "{s:?} may contain only lowercase letters a-z, digits and '-'"
            ));
        }
        Ok(Self(s.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for IntegrationName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A direct member of a group as group delta reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum MemberKind {
    User,
    Group,
    Other,
}
