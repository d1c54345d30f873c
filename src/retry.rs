//! The one retry primitive: how a status code bears on a retry ([`transience`]), capped
//! exponential backoff with jitter that honours `Retry-After` ([`RetryPolicy::delay`]), and
//! the bookkeeping of one operation's attempts under an attempt cap and a deadline
//! ([`Backoff`]).
//!
//! Every retry in rostersync goes through it: the Graph client (requests, `$batch` parts,
//! token fetches), the SCIM client, the incremental worker's durable queue, the alert outbox
//! and serve's own loops. Retries that outlive the process (queue items, alerts) count their
//! failures in the store and ask [`RetryPolicy::after_failures`] for the next time.

use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};

/// How an HTTP status bears on repeating the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transience {
    /// 429: the request was not processed; it may be repeated, even a POST.
    Throttled,
    /// 503: the service (or a proxy in front of it) is unavailable; a backend may still have
    /// acted, so only an idempotent request is repeated blindly.
    Unavailable,
    /// 500, 502, 504: may pass; an idempotent request is repeated a bounded number of times.
    ServerError,
    /// Anything else: the answer stands.
    Final,
}

/// The [`Transience`] of an HTTP status.
pub(crate) fn transience(status: u16) -> Transience {
    match status {
        429 => Transience::Throttled,
        503 => Transience::Unavailable,
        500 | 502 | 504 => Transience::ServerError,
        _ => Transience::Final,
    }
}

/// A retry policy: attempt cap, deadline, backoff and how far `Retry-After` is honoured.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in total, the first included.
    pub max_attempts: u32,
    /// Of those, how many may follow a server error ([`Transience::ServerError`]).
    pub server_error_retries: u32,
    /// Delay before the second attempt when the server gives no `Retry-After`.
    pub base: Duration,
    /// Upper bound of a computed backoff delay.
    pub cap: Duration,
    /// Upper bound of a server's `Retry-After`: honoured in full up to this.
    pub retry_after_cap: Duration,
    /// No attempt starts later than this after the first (none: only the attempt cap).
    pub deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    /// The HTTP clients' policy (Graph, SCIM): 8 attempts, 200 ms doubling to 60 s.
    fn default() -> Self {
        Self {
            max_attempts: 8,
            server_error_retries: 7,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(60),
            retry_after_cap: Duration::from_secs(15 * 60),
            deadline: None,
        }
    }
}

impl RetryPolicy {
    /// A policy of `max_attempts` attempts, `base` doubling up to `cap`, no deadline.
    pub const fn new(max_attempts: u32, base: Duration, cap: Duration) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            server_error_retries: max_attempts,
            base,
            cap,
            retry_after_cap: Duration::from_secs(15 * 60),
            deadline: None,
        }
    }

    /// The attempts of one operation starting now.
    pub(crate) fn start(&self) -> Backoff {
        Backoff {
            policy: *self,
            attempts: 1,
            server_errors: 0,
            started: Instant::now(),
        }
    }

    /// For retries kept in the store (queue items, alerts): the wait after the `failures`-th
    /// failure of an operation first tried `age` ago, or `None` when it should be given up.
    pub(crate) fn after_failures(&self, failures: u32, age: Duration) -> Option<Duration> {
        if failures >= self.max_attempts || self.deadline.is_some_and(|d| age >= d) {
            return None;
        }
        Some(self.delay(failures, None))
    }

    /// Delay before attempt `attempt + 1` (attempt counts from 1).
    pub(crate) fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let mut rng = rand::rng();
        if let Some(ra) = retry_after {
            // Honour the server, plus a little jitter so many waiters do not return at once.
            let jitter = Duration::from_millis(rng.random_range(0..=50));
            return ra.min(self.retry_after_cap).saturating_add(jitter);
        }
        let exp = self
            .base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let capped = exp.min(self.cap);
        // "Equal jitter": between half and all of the capped delay.
        let half = capped / 2;
        half + Duration::from_millis(rng.random_range(0..=half.as_millis().max(1) as u64))
    }
}

/// One operation's attempts under a [`RetryPolicy`]: the first attempt is under way when it is
/// made; each failure asks whether and when to try again.
#[derive(Clone, Debug)]
pub(crate) struct Backoff {
    policy: RetryPolicy,
    attempts: u32,
    server_errors: u32,
    started: Instant,
}

impl Backoff {
    /// Attempts made so far, the current one included.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The current attempt failed in a way worth repeating (a transport error, a throttle, or
    /// whatever the caller decides): the wait before the next attempt, which is counted from
    /// here, or `None` when the attempts or the deadline are spent.
    pub(crate) fn retry(&mut self, retry_after: Option<Duration>) -> Option<Duration> {
        if self.attempts >= self.policy.max_attempts {
            return None;
        }
        let delay = self.policy.delay(self.attempts, retry_after);
        if let Some(deadline) = self.policy.deadline {
            if self.started.elapsed() + delay > deadline {
                return None;
            }
        }
        self.attempts += 1;
        Some(delay)
    }

    /// As [`Backoff::retry`] for an HTTP answer: `None` when its status is not worth
    /// repeating (for a non-`idempotent` request, only a 429 is), or when the policy says stop.
    pub(crate) fn retry_status(
        &mut self,
        status: u16,
        idempotent: bool,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        match transience(status) {
            Transience::Throttled => self.retry(retry_after),
            Transience::Unavailable if idempotent => self.retry(retry_after),
            Transience::ServerError
                if idempotent && self.server_errors < self.policy.server_error_retries =>
            {
                let d = self.retry(retry_after);
                if d.is_some() {
                    self.server_errors += 1;
                }
                d
            }
            _ => None,
        }
    }
}

/// Reads `Retry-After` as delta-seconds or an HTTP date.
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(v).ok()?;
    let delta = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// The redirect policy of every client that talks to Graph, the identity platform or the LMS:
/// none is followed. A 307/308 would re-send the client-secret form, the bearer token or user
/// data to wherever `Location` points; a redirect instead fails the request with
/// [`RedirectRefused`], which names the target.
pub(crate) fn no_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let to = without_query(attempt.url());
        attempt.error(RedirectRefused(to))
    })
}

/// A redirect that was not followed; names its target (without query or credentials).
#[derive(Debug, thiserror::Error)]
#[error("the server redirected to {0}; rostersync follows no redirects (check the configured URL)")]
pub(crate) struct RedirectRefused(pub String);

/// `scheme://host[:port]/path` of a URL: no user info, query or fragment.
pub(crate) fn without_query(u: &url::Url) -> String {
    let mut u = u.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// A request error as one message: a refused redirect says where it pointed; other errors
/// are reqwest's text.
pub(crate) fn transport_message(e: &reqwest::Error) -> String {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<RedirectRefused>() {
            return r.to_string();
        }
        source = s.source();
    }
    e.to_string()
}

/// Reads a response body, failing once it exceeds `limit` bytes (a hostile or broken peer
/// must not exhaust memory).
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, String> {
    if let Some(len) = resp.content_length() {
        if len as usize > limit {
            return Err(format!(
                "response of {len} bytes exceeds the {limit}-byte limit"
            ));
        }
    }
    let mut buf = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("reading response: {e}"))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(format!("response exceeds the {limit}-byte limit"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            retry_after_cap: Duration::from_secs(3),
            ..RetryPolicy::new(5, Duration::from_millis(100), Duration::from_secs(1))
        };
        let d1 = p.delay(1, None);
        assert!(d1 >= Duration::from_millis(50) && d1 <= Duration::from_millis(100));
        let d4 = p.delay(4, None);
        assert!(d4 >= Duration::from_millis(400) && d4 <= Duration::from_millis(800));
        assert!(p.delay(30, None) <= Duration::from_secs(1));
        let ra = p.delay(1, Some(Duration::from_secs(2)));
        assert!(
            ra >= Duration::from_secs(2),
            "Retry-After is honoured beyond the backoff cap"
        );
        let huge = p.delay(1, Some(Duration::from_secs(u64::MAX)));
        assert!(
            huge <= Duration::from_millis(3050),
            "an absurd Retry-After is clamped, not overflowed"
        );
    }

    #[test]
    fn backoff_stops_at_the_attempt_cap() {
        let p = RetryPolicy::new(3, Duration::from_millis(1), Duration::from_millis(2));
        let mut b = p.start();
        assert_eq!(b.attempts(), 1);
        assert!(b.retry(None).is_some());
        assert!(b.retry(None).is_some());
        assert_eq!(b.attempts(), 3);
        assert_eq!(b.retry(None), None, "three attempts in all");
    }

    #[test]
    fn backoff_stops_before_a_wait_that_passes_the_deadline() {
        let p = RetryPolicy {
            deadline: Some(Duration::from_secs(5)),
            ..RetryPolicy::new(100, Duration::from_millis(10), Duration::from_millis(20))
        };
        let mut b = p.start();
        assert!(b.retry(None).is_some());
        assert!(b.retry(Some(Duration::from_secs(2))).is_some());
        assert_eq!(b.retry(Some(Duration::from_secs(6))), None);
    }

    #[test]
    fn statuses_are_classified_and_posts_only_repeat_throttles() {
        let p = RetryPolicy {
            server_error_retries: 1,
            ..RetryPolicy::new(10, Duration::from_millis(1), Duration::from_millis(1))
        };
        let mut b = p.start();
        assert_eq!(b.retry_status(400, true, None), None);
        assert_eq!(b.retry_status(404, true, None), None);
        assert_eq!(
            b.retry_status(503, false, None),
            None,
            "a POST may have acted"
        );
        assert_eq!(b.retry_status(500, false, None), None);
        assert!(
            b.retry_status(429, false, None).is_some(),
            "429: not processed"
        );
        assert!(b.retry_status(503, true, None).is_some());
        assert!(b.retry_status(502, true, None).is_some());
        assert_eq!(
            b.retry_status(502, true, None),
            None,
            "one server-error retry"
        );
        assert!(
            b.retry_status(429, true, None).is_some(),
            "throttles still repeat"
        );
        let ra = b
            .retry_status(429, true, Some(Duration::from_secs(3)))
            .unwrap();
        assert!(ra >= Duration::from_secs(3), "Retry-After is honoured");
    }

    #[test]
    fn stored_retries_give_up_by_count_or_age() {
        let p = RetryPolicy {
            deadline: Some(Duration::from_secs(60)),
            ..RetryPolicy::new(4, Duration::from_secs(1), Duration::from_secs(8))
        };
        let d = p.after_failures(2, Duration::ZERO).unwrap();
        assert!(
            d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
            "{d:?}"
        );
        assert_eq!(p.after_failures(4, Duration::ZERO), None);
        assert_eq!(p.after_failures(1, Duration::from_secs(61)), None);
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
