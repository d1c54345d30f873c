//! `subscriptions list|renew|delete`: the documents and their text. The operations need the
//! Graph client and run where the integration lives (`serve::subs`): in the CLI, or in the
//! `serve` that holds the store, asked through its admin API.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// What Graph says of a subscription the store records, or one Graph holds at our address
/// that the store does not know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AtGraph {
    Live,
    NotFound,
    UnknownToStore,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub id: String,
    pub resource: String,
    /// The recorded expiry (none for one the store does not know).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub at_graph: AtGraph,
}

/// `subscriptions list` of one integration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListDoc {
    pub integration: String,
    pub subscriptions: Vec<Listed>,
}

impl ListDoc {
    pub fn render(&self) -> String {
        let mut out = String::new();
        for s in &self.subscriptions {
            let line = match (s.at_graph, s.expires_at) {
                (AtGraph::UnknownToStore, _) | (_, None) => format!(
                    "{}  {}  {}  (at Graph, unknown to this store)",
                    self.integration, s.id, s.resource
                ),
                (at, Some(exp)) => format!(
                    "{}  {}  {}  expires {}  {}",
                    self.integration,
                    s.id,
                    s.resource,
                    exp.to_rfc3339(),
                    if at == AtGraph::Live {
                        "live at Graph"
                    } else {
                        "NOT FOUND at Graph"
                    }
                ),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewed {
    pub id: String,
    pub resource: String,
    pub expires_at: DateTime<Utc>,
}

/// `subscriptions renew`: the subscriptions after the renewal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewDoc {
    pub integration: String,
    pub subscriptions: Vec<Renewed>,
}

impl RenewDoc {
    pub fn render(&self) -> String {
        self.subscriptions
            .iter()
            .map(|r| {
                format!(
                    "{}  {}  {}  expires {}\n",
                    self.integration,
                    r.id,
                    r.resource,
                    r.expires_at.to_rfc3339()
                )
            })
            .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deleted {
    pub id: String,
    pub resource: String,
    /// False: Graph no longer had it.
    pub deleted: bool,
}

/// `subscriptions delete`: what was deleted, and the error that stopped it, if one did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteDoc {
    pub integration: String,
    pub deleted: Vec<Deleted>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DeleteDoc {
    pub fn render(&self) -> String {
        self.deleted
            .iter()
            .map(|d| {
                format!(
                    "{}  {}  {}  {}\n",
                    self.integration,
                    d.id,
                    d.resource,
                    if d.deleted {
                        "deleted"
                    } else {
                        "was already gone"
                    }
                )
            })
            .collect()
    }
}

/// A subscription command, as `serve` is asked to run it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SubsCommand {
    List,
    Renew,
    Delete,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SubsAnswer {
    List(ListDoc),
    Renew(RenewDoc),
    Delete(DeleteDoc),
}
