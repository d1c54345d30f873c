//! Graph's validation handshake: `POST {notificationUrl}?validationToken=…`, answered with
//! `200 text/plain` and the decoded token.
//!
//! Graph sends it only while it creates, renews or reauthorizes a subscription, and it does so
//! while our own request for that is in flight. So the endpoint answers only then: each
//! integration has a [`HandshakeWindow`], held open by every create/renew of ours that is in
//! flight ([`HandshakeWindow::pending`]) and for a short while after start-up. Outside it a
//! handshake gets the same `404` as a handshake for an integration that does not exist, so
//! the endpoint neither reflects a stranger's text nor tells which integration names exist.
//!
//! Even inside the window a token is echoed only if it is at most [`MAX_TOKEN_CHARS`]
//! printable ASCII characters once decoded. Graph documents the token as opaque and gives no
//! maximum; the ones it sends are about 110 characters (`Validation: Testing client
//! application reachability for subscription Request-Id: <guid>`), so the bound leaves ample
//! room while keeping what the endpoint can be made to say short and inert.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest validation token echoed (decoded characters).
pub(crate) const MAX_TOKEN_CHARS: usize = 1024;
/// How long after `serve` starts handshakes are answered without a create or renewal of ours
/// in flight (a subscription call that was running when the previous process stopped).
pub(crate) const STARTUP_WINDOW: Duration = Duration::from_secs(120);

/// When one integration's endpoints answer handshakes. Clones share the state.
#[derive(Clone, Default, Debug)]
pub struct HandshakeWindow(Arc<WindowState>);

#[derive(Default, Debug)]
struct WindowState {
    /// Subscription creates and renewals of ours in flight.
    pending: AtomicUsize,
    /// Open until then, whatever is pending (start-up).
    until: Mutex<Option<Instant>>,
}

/// Keeps the window open while it lives (a create or renewal in flight).
#[must_use = "the window closes when the guard is dropped"]
pub(crate) struct Pending(HandshakeWindow);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0 .0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

impl HandshakeWindow {
    /// Opens the window until the returned guard is dropped: wrap every call that makes Graph
    /// validate our endpoints (create, renew, reauthorize) in one.
    pub(crate) fn pending(&self) -> Pending {
        self.0.pending.fetch_add(1, Ordering::SeqCst);
        Pending(self.clone())
    }

    /// Opens the window for `d` from now (start-up).
    pub(crate) fn open_for(&self, d: Duration) {
        let until = Instant::now() + d;
        let mut u = self.0.until.lock().unwrap_or_else(|e| e.into_inner());
        *u = Some(u.map_or(until, |t| t.max(until)));
    }

    pub(crate) fn is_open(&self) -> bool {
        if self.0.pending.load(Ordering::SeqCst) > 0 {
            return true;
        }
        let u = self.0.until.lock().unwrap_or_else(|e| e.into_inner());
        u.is_some_and(|t| Instant::now() < t)
    }
}

/// What a request's query says about the handshake.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TokenCheck {
    /// No `validationToken`: a notification.
    Absent,
    /// A token fit to echo.
    Echo(String),
    /// A token we do not echo, and why (for the counters; never shown to the caller).
    Refused(&'static str),
}

/// Reads `validationToken` from a raw query string (`application/x-www-form-urlencoded`, as
/// Graph sends it) and decides whether it may be echoed.
pub(crate) fn validation_token(query: &str) -> TokenCheck {
    // Every decoded character takes at least one and at most three encoded ones (`%XX`); a
    // much longer query cannot hold a token we would echo, and is not decoded at all.
    let mut found = None;
    if query.len() > 8 * MAX_TOKEN_CHARS + 1024 {
        return if query.contains("validationToken=") {
            TokenCheck::Refused("too long")
        } else {
            TokenCheck::Absent
        };
    }
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        if k == "validationToken" {
            if found.is_some() {
                return TokenCheck::Refused("more than one validationToken");
            }
            found = Some(v);
        }
    }
    let Some(token) = found else {
        return TokenCheck::Absent;
    };
    if token.is_empty() {
        return TokenCheck::Refused("empty");
    }
    if token.chars().count() > MAX_TOKEN_CHARS {
        return TokenCheck::Refused("too long");
    }
    if !token.chars().all(|c| c == ' ' || c.is_ascii_graphic()) {
        return TokenCheck::Refused("not printable ASCII");
    }
    TokenCheck::Echo(token.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn graph_tokens_are_echoed_decoded() {
        let graph = "Validation%3a+Testing+client+application+reachability+for+subscription+Request-Id%3a+5c0f3b2e-8f4a-4a43-9b36-1f3a2c1d0e9f";
        assert_eq!(
            validation_token(&format!("validationToken={graph}")),
            TokenCheck::Echo("Validation: Testing client application reachability for subscription Request-Id: 5c0f3b2e-8f4a-4a43-9b36-1f3a2c1d0e9f".into())
        );
        assert_eq!(
            validation_token("tenant=a&validationToken=a%20b%2Bc%26d"),
            TokenCheck::Echo("a b+c&d".into())
        );
        assert_eq!(validation_token(""), TokenCheck::Absent);
        assert_eq!(validation_token("other=1"), TokenCheck::Absent);
    }

    #[test]
    fn hostile_tokens_are_refused() {
        let at_max = "a".repeat(MAX_TOKEN_CHARS);
        assert_eq!(
            validation_token(&format!("validationToken={at_max}")),
            TokenCheck::Echo(at_max.clone())
        );
        for (query, why) in [
            (format!("validationToken={at_max}b"), "too long"),
            (
                format!("validationToken={}", "%41".repeat(MAX_TOKEN_CHARS * 4)),
                "too long",
            ),
            ("validationToken=".into(), "empty"),
            (
                "validationToken=a%0d%0aSet-Cookie:x".into(),
                "not printable ASCII",
            ),
            (
                "validationToken=%3Cscript%3E%00".into(),
                "not printable ASCII",
            ),
            ("validationToken=%C3%A9".into(), "not printable ASCII"),
            ("validationToken=%1b%5b31m".into(), "not printable ASCII"),
            (
                "validationToken=a&validationToken=b".into(),
                "more than one validationToken",
            ),
        ] {
            assert_eq!(
                validation_token(&query),
                TokenCheck::Refused(why),
                "{query}"
            );
        }
    }

    #[test]
    fn window_opens_for_pending_calls_and_after_start_up() {
        let w = HandshakeWindow::default();
        assert!(!w.is_open());
        let g1 = w.pending();
        let g2 = w.clone().pending();
        assert!(w.is_open());
        drop(g1);
        assert!(w.is_open());
        drop(g2);
        assert!(!w.is_open());
        w.open_for(Duration::from_millis(200));
        assert!(w.is_open());
        // A shorter opening does not shorten it.
        w.open_for(Duration::ZERO);
        assert!(w.is_open());
        std::thread::sleep(Duration::from_millis(250));
        assert!(!w.is_open());
    }
}
