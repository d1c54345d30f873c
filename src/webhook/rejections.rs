//! Rejections are counted, not narrated: a forged or malformed request costs a few counter
//! increments and, at most, one log line, and those lines are rate-limited per integration.
//!
//! Each request's rejections are summed into a [`Tally`]. [`RejectionLog::record`] adds it to
//! what the integration has not logged yet and writes one WARN line with the totals when the
//! last line is at least [`LOG_INTERVAL`] old; otherwise nothing is written and the counts
//! wait for the next line. `/metrics` counts every rejection either way. The only request text
//! a line may carry is one short escaped excerpt (a subscription id or a path segment).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::logging::excerpt;

/// Least time between two rejection lines of one integration.
pub(crate) const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Longest excerpt of request text in a log line (characters, before escaping).
pub(crate) const EXCERPT_CHARS: usize = 40;

/// Why a notification or a request was refused. Each is one label value of
/// `rostersync_notifications_rejected_total{reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    ClientState,
    UnknownSubscription,
    Tenant,
    Malformed,
    ValidationToken,
    Handshake,
    UnknownIntegration,
}

impl Reason {
    pub(crate) const ALL: [Reason; 7] = [
        Reason::ClientState,
        Reason::UnknownSubscription,
        Reason::Tenant,
        Reason::Malformed,
        Reason::ValidationToken,
        Reason::Handshake,
        Reason::UnknownIntegration,
    ];

    /// The metric label (and the log field name).
    pub(crate) fn label(self) -> &'static str {
        match self {
            Reason::ClientState => "client_state",
            Reason::UnknownSubscription => "unknown_subscription",
            Reason::Tenant => "tenant",
            Reason::Malformed => "malformed",
            Reason::ValidationToken => "validation_token",
            Reason::Handshake => "handshake",
            Reason::UnknownIntegration => "unknown_integration",
        }
    }

    fn index(self) -> usize {
        Reason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// Rejections of one request (or of several, in a log's backlog).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    counts: [u64; 7],
    /// Why the body could not be read, as a fixed text (never the parser's message, which
    /// quotes the body).
    pub detail: Option<&'static str>,
    /// A short escaped excerpt of request text that helps an operator (a subscription id).
    pub example: Option<String>,
}

impl Tally {
    pub(crate) fn add(&mut self, r: Reason, n: u64) {
        self.counts[r.index()] += n;
    }

    pub(crate) fn get(&self, r: Reason) -> u64 {
        self.counts[r.index()]
    }

    pub(crate) fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Keeps `text` (escaped, cut to [`EXCERPT_CHARS`]) as the example unless there is one.
    pub(crate) fn example(&mut self, text: &str) {
        if self.example.is_none() {
            self.example = Some(excerpt(text, EXCERPT_CHARS));
        }
    }

    fn absorb(&mut self, other: &Tally) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        if self.detail.is_none() {
            self.detail = other.detail;
        }
        if self.example.is_none() {
            self.example.clone_from(&other.example);
        }
    }

    /// `client_state=3 tenant=1` for the reasons that occurred.
    fn summary(&self) -> String {
        Reason::ALL
            .iter()
            .filter(|r| self.get(**r) > 0)
            .map(|r| format!("{}={}", r.label(), self.get(*r)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// One integration's (or the unknown integrations') rate-limited rejection log.
#[derive(Debug)]
pub struct RejectionLog {
    interval: Duration,
    state: Mutex<Backlog>,
}

#[derive(Debug, Default)]
struct Backlog {
    last_line: Option<Instant>,
    requests: u64,
    tally: Tally,
}

impl Default for RejectionLog {
    fn default() -> Self {
        RejectionLog::new(LOG_INTERVAL)
    }
}

impl RejectionLog {
    pub(crate) fn new(interval: Duration) -> Self {
        RejectionLog {
            interval,
            state: Mutex::new(Backlog::default()),
        }
    }

    /// Adds one request's rejections; writes a line when one is due. `integration` is a
    /// configured name or `(unknown)`. Returns whether a line was written.
    pub(crate) fn record(&self, integration: &str, tally: &Tally) -> bool {
        if tally.total() == 0 {
            return false;
        }
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.requests += 1;
        b.tally.absorb(tally);
        let now = Instant::now();
        if b.last_line
            .is_some_and(|t| now.duration_since(t) < self.interval)
        {
            return false;
        }
        let backlog = std::mem::take(&mut *b);
        b.last_line = Some(now);
        drop(b);
        tracing::warn!(
            integration = %crate::logging::Esc(integration),
            requests = backlog.requests,
            rejected = %backlog.tally.summary(),
            detail = backlog.tally.detail.unwrap_or(""),
            example = %backlog.tally.example.as_deref().unwrap_or(""),
            "webhook requests rejected (nothing queued); totals since the last such line, at most one line per {} s",
            self.interval.as_secs()
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_carries_the_totals() {
        let log = RejectionLog::new(Duration::from_millis(300));
        let mut t = Tally::default();
        t.add(Reason::ClientState, 1000);
        t.example("evil\nsubscription-id-that-is-very-long-indeed-and-goes-on");
        assert!(log.record("acme", &t), "the first rejection is logged");
        for _ in 0..100 {
            assert!(
                !log.record("acme", &t),
                "within the interval nothing is logged"
            );
        }
        std::thread::sleep(Duration::from_millis(350));
        let b = {
            let s = log.state.lock().unwrap();
            (s.requests, s.tally.get(Reason::ClientState))
        };
        assert_eq!(b, (100, 100_000), "the backlog waits for the next line");
        assert!(log.record("acme", &t));
        assert_eq!(log.state.lock().unwrap().requests, 0);
        assert_eq!(
            t.example.as_deref(),
            Some("evil\\nsubscription-id-that-is-very-long-i…")
        );
        assert!(!log.record("acme", &Tally::default()), "nothing to say");
    }
}
