//! The one HTTP retry policy: capped exponential backoff with jitter, honouring `Retry-After`.
//!
//! Both the Graph and the SCIM client use it, so throttling behaves the same on both sides.

use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderMap, RETRY_AFTER};

#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts in total, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt when the server gives no `Retry-After`.
    pub base: Duration,
    /// Upper bound of a computed backoff delay.
    pub cap: Duration,
    /// Upper bound of a server's `Retry-After`: honoured in full up to this.
    pub retry_after_cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 8,
            base: Duration::from_millis(200),
            cap: Duration::from_secs(60),
            retry_after_cap: Duration::from_secs(15 * 60),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1` (attempt counts from 1).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
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

/// Reads `Retry-After` as delta-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
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
pub fn no_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let to = without_query(attempt.url());
        attempt.error(RedirectRefused(to))
    })
}

/// A redirect that was not followed; names its target (without query or credentials).
#[derive(Debug, thiserror::Error)]
#[error("the server redirected to {0}; rostersync follows no redirects (check the configured URL)")]
pub struct RedirectRefused(pub String);

/// `scheme://host[:port]/path` of a URL: no user info, query or fragment.
pub fn without_query(u: &url::Url) -> String {
    let mut u = u.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// A request error as one message: a refused redirect says where it pointed; other errors
/// are reqwest's text.
pub fn transport_message(e: &reqwest::Error) -> String {
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
pub async fn read_limited(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, String> {
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
            max_attempts: 5,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(1),
            retry_after_cap: Duration::from_secs(3),
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
