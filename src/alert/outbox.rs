//! The outbox: alerts waiting to be delivered, and the marks that deduplicate them.
//!
//! - A plain alert is queued unless its key was queued within its window (mark = queue time).
//! - A digest drops the items listed within their window (a mark per item), merges the rest
//!   into a pending entry of the same key when there is one, and otherwise queues an entry due
//!   at the end of the digest window that started with the previous one (mark = due time), so
//!   at most one digest per window goes out and the first goes out at once.
//! - The sender *claims* due entries under the same lock; nothing is merged into a claimed
//!   entry, so an item is never lost between a merge and a send.

use std::sync::Mutex;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Alert, AlertKind, Item, Repeat};
use crate::config::AlertSettings;
use crate::store::alerts::AlertTrees;
use crate::store::StoreError;

/// Serialises read-modify-write of the outbox within the process (sled allows one process
/// per data directory).
static LOCK: Mutex<()> = Mutex::new(());

/// Items kept per digest; the rest are counted.
const MAX_ITEMS: usize = 200;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Channel {
    Email,
    Webhook,
}

/// An alert in the outbox.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub integration: String,
    pub kind: AlertKind,
    pub key: String,
    pub title: String,
    pub details: Vec<String>,
    pub items: Vec<Item>,
    /// Items beyond [`MAX_ITEMS`], counted only.
    #[serde(default)]
    pub more: u64,
    pub advice: String,
    pub raised_at: DateTime<Utc>,
    /// Not sent before (digest window, retry backoff).
    pub not_before: DateTime<Utc>,
    /// Taken by the sender: nothing more is merged into it.
    #[serde(default)]
    pub claimed: bool,
    /// Channels still to deliver to.
    pub pending: Vec<Channel>,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub last_error: Option<String>,
}

impl Entry {
    /// The subject line's text (digests count their items).
    pub(crate) fn headline(&self) -> String {
        let n = self.items.len() as u64 + self.more;
        let s = if n == 1 { "" } else { "s" };
        match self.kind {
            AlertKind::FailedUsers => format!("{n} user{s} failed to sync"),
            AlertKind::DeadLetters => format!("{n} notification{s} moved to the dead letters"),
            _ => self.title.clone(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Raised {
    Queued { due: DateTime<Utc> },
    Merged,
    Suppressed,
}

fn mark_key(integration: &str, key: &str) -> String {
    format!("{integration}\0{key}")
}

fn channels(settings: &AlertSettings) -> Vec<Channel> {
    let mut c = Vec::new();
    if settings.email.is_some() {
        c.push(Channel::Email);
    }
    if settings.webhook_url.is_some() {
        c.push(Channel::Webhook);
    }
    c
}

fn guard() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Appends `alert` for `integration` unless deduplication says otherwise.
pub(crate) fn raise(
    trees: &AlertTrees,
    settings: &AlertSettings,
    integration: &str,
    mut alert: Alert,
    now: DateTime<Utc>,
) -> Result<Raised, StoreError> {
    let pending = channels(settings);
    if pending.is_empty() {
        return Ok(Raised::Suppressed);
    }
    let _g = guard();
    let key = mark_key(integration, &alert.key);
    let last = trees.mark(&key)?;
    let due = match alert.repeat {
        Repeat::Window(w) => {
            if last.is_some_and(|t| now < t + w) {
                return Ok(Raised::Suppressed);
            }
            now
        }
        Repeat::Digest { every, item_window } => {
            let mut fresh = Vec::with_capacity(alert.items.len());
            for it in alert.items {
                let k = mark_key(integration, &it.key);
                if trees.mark(&k)?.is_some_and(|t| now < t + item_window) {
                    continue;
                }
                trees.set_mark(&k, now)?;
                fresh.push(it);
            }
            if fresh.is_empty() {
                return Ok(Raised::Suppressed);
            }
            alert.items = fresh;
            for (id, mut e) in trees.entries::<Entry>()? {
                if !e.claimed && e.integration == integration && e.key == alert.key {
                    merge(&mut e, alert.details, alert.items);
                    trees.put(id, &e)?;
                    return Ok(Raised::Merged);
                }
            }
            match last {
                Some(t) if now < t + every => t + every,
                _ => now,
            }
        }
    };
    let mut entry = Entry {
        integration: integration.to_string(),
        kind: alert.kind,
        key: alert.key,
        title: alert.title,
        details: Vec::new(),
        items: Vec::new(),
        more: 0,
        advice: alert.advice,
        raised_at: now,
        not_before: due,
        claimed: false,
        pending,
        attempts: 0,
        last_error: None,
    };
    merge(&mut entry, alert.details, alert.items);
    trees.push(&entry)?;
    trees.set_mark(&key, due)?;
    Ok(Raised::Queued { due })
}

fn merge(e: &mut Entry, details: Vec<String>, items: Vec<Item>) {
    for d in details {
        if !e.details.contains(&d) {
            e.details.push(d);
        }
    }
    for it in items {
        if e.items.iter().any(|x| x.key == it.key) {
            continue;
        }
        if e.items.len() < MAX_ITEMS {
            e.items.push(it);
        } else {
            e.more += 1;
        }
    }
}

/// Claims every entry due at `now` (oldest first) for delivery.
pub(crate) fn claim_due(
    trees: &AlertTrees,
    now: DateTime<Utc>,
) -> Result<Vec<(u64, Entry)>, StoreError> {
    let _g = guard();
    let mut out = Vec::new();
    for (id, mut e) in trees.entries::<Entry>()? {
        if e.not_before > now {
            continue;
        }
        if !e.claimed {
            e.claimed = true;
            trees.put(id, &e)?;
        }
        out.push((id, e));
    }
    Ok(out)
}

/// When the next entry falls due, if any.
pub(crate) fn next_due(trees: &AlertTrees) -> Result<Option<DateTime<Utc>>, StoreError> {
    Ok(trees
        .entries::<Entry>()?
        .into_iter()
        .map(|(_, e)| e.not_before)
        .min())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use chrono::Duration;
    use secrecy::SecretString;

    fn settings() -> AlertSettings {
        AlertSettings {
            webhook_url: Some(SecretString::from("http://127.0.0.1:9/hook")),
            ..AlertSettings::default()
        }
    }

    fn plain(key: &str, window: Duration) -> Alert {
        Alert {
            kind: AlertKind::GraphAuth,
            key: key.into(),
            title: "t".into(),
            details: vec!["d".into()],
            items: Vec::new(),
            advice: "a".into(),
            repeat: Repeat::Window(window),
        }
    }

    fn digest(items: &[&str]) -> Alert {
        Alert {
            kind: AlertKind::FailedUsers,
            key: "failed-users".into(),
            title: String::new(),
            details: vec!["intro".into()],
            items: items
                .iter()
                .map(|k| Item {
                    key: k.to_string(),
                    text: format!("user {k}"),
                })
                .collect(),
            advice: "a".into(),
            repeat: Repeat::Digest {
                every: Duration::minutes(15),
                item_window: Duration::hours(24),
            },
        }
    }

    #[test]
    fn a_key_is_not_queued_again_within_its_window_and_integrations_are_apart() {
        let s = Store::temporary().unwrap();
        let t = s.alerts().unwrap();
        let st = settings();
        let t0 = Utc::now();
        let hour = Duration::hours(1);
        assert_eq!(
            raise(&t, &st, "a", plain("auth", hour), t0).unwrap(),
            Raised::Queued { due: t0 }
        );
        let later = t0 + Duration::minutes(59);
        assert_eq!(
            raise(&t, &st, "a", plain("auth", hour), later).unwrap(),
            Raised::Suppressed
        );
        assert!(matches!(
            raise(&t, &st, "b", plain("auth", hour), later).unwrap(),
            Raised::Queued { .. }
        ));
        assert!(matches!(
            raise(
                &t,
                &st,
                "a",
                plain("auth", hour),
                t0 + Duration::minutes(61)
            )
            .unwrap(),
            Raised::Queued { .. }
        ));
        assert_eq!(t.entries::<Entry>().unwrap().len(), 3);
        // Without a channel nothing is kept.
        assert_eq!(
            raise(&t, &AlertSettings::default(), "c", plain("auth", hour), t0).unwrap(),
            Raised::Suppressed
        );
    }

    #[test]
    fn digests_go_out_at_once_then_at_most_once_per_window_and_never_repeat_an_item() {
        let s = Store::temporary().unwrap();
        let t = s.alerts().unwrap();
        let st = settings();
        let t0 = Utc::now();
        assert_eq!(
            raise(&t, &st, "a", digest(&["u1", "u2"]), t0).unwrap(),
            Raised::Queued { due: t0 }
        );
        // Raised again before it was sent: merged, duplicates dropped.
        assert_eq!(
            raise(&t, &st, "a", digest(&["u2", "u3"]), t0).unwrap(),
            Raised::Merged
        );
        let due = claim_due(&t, t0).unwrap();
        assert_eq!(due.len(), 1);
        let keys: Vec<&str> = due[0].1.items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["u1", "u2", "u3"]);
        assert_eq!(due[0].1.headline(), "3 users failed to sync");
        // Claimed: a new raise does not touch it; it waits for the end of the window.
        let t1 = t0 + Duration::minutes(5);
        assert_eq!(
            raise(&t, &st, "a", digest(&["u1", "u4"]), t1).unwrap(),
            Raised::Queued {
                due: t0 + Duration::minutes(15)
            }
        );
        t.remove(due[0].0).unwrap();
        assert!(claim_due(&t, t1).unwrap().is_empty());
        assert_eq!(
            raise(&t, &st, "a", digest(&["u5"]), t1).unwrap(),
            Raised::Merged
        );
        let due = claim_due(&t, t0 + Duration::minutes(15)).unwrap();
        let keys: Vec<&str> = due[0].1.items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["u4", "u5"], "u1 was listed within the last 24 hours");
        t.remove(due[0].0).unwrap();
        // Only already-listed items: nothing at all.
        assert_eq!(
            raise(&t, &st, "a", digest(&["u1", "u5"]), t0 + Duration::hours(2)).unwrap(),
            Raised::Suppressed
        );
        // A day later they may be listed again.
        assert!(matches!(
            raise(&t, &st, "a", digest(&["u1"]), t0 + Duration::hours(25)).unwrap(),
            Raised::Queued { .. }
        ));
        assert_eq!(next_due(&t).unwrap(), Some(t0 + Duration::hours(25)));
    }

    #[test]
    fn a_digest_keeps_a_bounded_number_of_items() {
        let s = Store::temporary().unwrap();
        let t = s.alerts().unwrap();
        let keys: Vec<String> = (0..MAX_ITEMS + 5).map(|i| format!("u{i}")).collect();
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        raise(&t, &settings(), "a", digest(&refs), Utc::now()).unwrap();
        let (_, e) = t.entries::<Entry>().unwrap().remove(0);
        assert_eq!((e.items.len(), e.more), (MAX_ITEMS, 5));
        assert_eq!(
            e.headline(),
            format!("{} users failed to sync", MAX_ITEMS + 5)
        );
    }
}
