//! One redactor for every text that leaves the process with content it did not write itself
//! (an LMS's error message, a Graph error, an SMTP server's reply): traces, alerts, reports.
//! Nothing should ever carry a secret, but a server may echo one back.

//!
//! Which secrets an integration has is the config's to say (`IntegrationConfig::redactor`).

use secrecy::{ExposeSecret, SecretString};

/// What replaces a secret.
pub(crate) const REDACTED: &str = "[redacted]";

/// Values shorter than this are not replaced: they would mangle ordinary text, and config
/// refuses secrets that short where it can.
const MIN_CHARS: usize = 6;

/// The secrets one text may carry, held as secrets until the moment they are compared.
#[derive(Clone, Default)]
pub(crate) struct Redactor {
    secrets: Vec<SecretString>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} secrets)", self.secrets.len())
    }
}

impl Redactor {
    /// Adds one more secret (an alert webhook URL, an SMTP password).
    pub(crate) fn add(&mut self, secret: &SecretString) -> &mut Self {
        let s = secret.expose_secret();
        if s.chars().count() >= MIN_CHARS && !self.secrets.iter().any(|k| k.expose_secret() == s) {
            self.secrets.push(secret.clone());
        }
        self
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// `text` with every secret replaced by [`REDACTED`].
    pub(crate) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_string();
        self.scrub_in_place(&mut out);
        out
    }

    /// Replaces every secret in `text`, leaving it untouched (no allocation) when none occurs.
    pub(crate) fn scrub_in_place(&self, text: &mut String) {
        for s in &self.secrets {
            let s = s.expose_secret();
            if text.contains(s) {
                *text = text.replace(s, REDACTED);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(s: &str) -> SecretString {
        SecretString::from(s.to_string())
    }

    #[test]
    fn every_occurrence_of_every_secret_is_replaced() {
        let mut r = Redactor::default();
        r.add(&secret("token-123456")).add(&secret("client~secret"));
        let out = r.scrub("a token-123456 b client~secret c token-123456");
        assert_eq!(out, "a [redacted] b [redacted] c [redacted]");
    }

    #[test]
    fn short_values_and_duplicates_are_left_out() {
        let mut r = Redactor::default();
        r.add(&secret("abc"))
            .add(&secret("abcdef"))
            .add(&secret("abcdef"));
        assert_eq!(r.secrets.len(), 1);
        assert_eq!(r.scrub("abc abcdef"), "abc [redacted]");
    }

    #[test]
    fn debug_shows_no_secret() {
        let mut r = Redactor::default();
        r.add(&secret("hunter2-hunter2"));
        assert!(!format!("{r:?}").contains("hunter2"));
    }
}
