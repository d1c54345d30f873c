//! `queue stats|dead|replay`: the documents, their text, and the operations on the store.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::queue::{QueueItem, QueueStats};
use crate::store::{IntegrationStore, StoreError};

/// Most dead letters in one page of the admin API.
pub const DEAD_PAGE_MAX: usize = 500;

/// `queue stats` of one integration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsDoc {
    pub integration: String,
    pub stats: QueueStats,
}

impl StatsDoc {
    pub fn render(&self) -> String {
        let st = &self.stats;
        format!(
            "{}  queued {}  waiting retry {}  dead {}  oldest {}\n",
            self.integration,
            st.queued,
            st.waiting_retry,
            st.dead,
            st.oldest_queued_at
                .map(|t| t.to_rfc3339())
                .unwrap_or_else(|| "-".into())
        )
    }
}

pub fn stats(store: &IntegrationStore, now: DateTime<Utc>) -> Result<StatsDoc, StoreError> {
    Ok(StatsDoc {
        integration: store.name().to_string(),
        stats: store.queue_stats(now)?,
    })
}

/// A dead letter as an operator sees it (`queue dead`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemView {
    pub id: u64,
    pub what: String,
    pub attempts: u32,
    pub received_at: DateTime<Utc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at: Option<DateTime<Utc>>,
}

impl From<(u64, QueueItem)> for ItemView {
    fn from((id, it): (u64, QueueItem)) -> Self {
        ItemView {
            id,
            what: it.hint.describe(),
            attempts: it.attempts,
            received_at: it.received_at,
            last_error: it.last_error,
            dead_at: it.dead_at,
        }
    }
}

/// Dead letters after an id, oldest first; `next` is where the next page starts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadPage {
    pub integration: String,
    pub items: Vec<ItemView>,
    pub next: Option<u64>,
}

impl DeadPage {
    /// One `queue dead` line per item.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for it in &self.items {
            out.push_str(&format!(
                "{}  {}  {}  attempts {}  received {}  dead {}  error: {}\n",
                self.integration,
                it.id,
                it.what,
                it.attempts,
                it.received_at.to_rfc3339(),
                it.dead_at.map(|t| t.to_rfc3339()).unwrap_or_default(),
                it.last_error.as_deref().unwrap_or_default()
            ));
        }
        out
    }
}

/// At most `limit` dead letters with an id above `after`.
pub fn dead_page(
    store: &IntegrationStore,
    after: Option<u64>,
    limit: usize,
) -> Result<DeadPage, StoreError> {
    let limit = limit.max(1);
    let mut items: Vec<ItemView> = store
        .dead_letters_after(after, limit.saturating_add(1))?
        .into_iter()
        .map(ItemView::from)
        .collect();
    let next = if items.len() > limit {
        items.truncate(limit);
        items.last().map(|i| i.id)
    } else {
        None
    };
    Ok(DeadPage {
        integration: store.name().to_string(),
        items,
        next,
    })
}

/// `queue replay`: one dead letter (`id`) or all of them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub all: bool,
    /// The replayed deactivations pass the mass-deactivation guard, whose trip is cleared.
    #[serde(default)]
    pub allow_mass_deactivation: bool,
}

impl ReplayRequest {
    /// An id or `all` (which wins when both are given).
    pub fn check(&self) -> Result<(), &'static str> {
        if self.id.is_none() && !self.all {
            return Err("queue replay: give a dead letter id or --all");
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayDoc {
    pub integration: String,
    pub replayed: usize,
}

impl ReplayDoc {
    pub fn render(&self) -> String {
        format!(
            "{}  {} dead letter(s) queued again\n",
            self.integration, self.replayed
        )
    }
}

/// Moves the dead letters `req` names back to the queue.
pub fn replay(store: &IntegrationStore, req: &ReplayRequest) -> Result<ReplayDoc, StoreError> {
    if req.allow_mass_deactivation {
        store.clear_guard_trip()?;
    }
    let replayed = store.replay(
        if req.all { None } else { req.id },
        req.allow_mass_deactivation,
    )?;
    Ok(ReplayDoc {
        integration: store.name().to_string(),
        replayed,
    })
}
