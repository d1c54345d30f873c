//! `[alerts]` and `[integration.alerts]`: where alerts go and how often they may repeat.

use std::path::Path;

use secrecy::SecretString;
use serde::Deserialize;
use url::Url;

use super::secret::RawSecret;
use super::{invalid, ConfigError};
use crate::text::is_loopback_host;

// ---- alerts ----

/// `[alerts]`, and `[integration.alerts]` whose keys override it one by one.
#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAlerts {
    enabled: Option<bool>,
    email_to: Option<Vec<String>>,
    email_from: Option<String>,
    webhook_url: Option<RawSecret>,
    digest_minutes: Option<u32>,
    repeat_minutes: Option<u32>,
    repeat_hours: Option<u32>,
    smtp: Option<RawSmtp>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawSmtp {
    host: String,
    port: Option<u16>,
    tls: Option<String>,
    username: Option<RawSecret>,
    password: Option<RawSecret>,
    timeout_secs: Option<u64>,
}

/// Where alerts go and how often they may repeat, for one integration (or the global
/// `[alerts]`). No channel configured = alerts are off.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    pub email: Option<EmailAlerts>,
    /// Incoming-webhook URL (Slack, Teams): its path is a credential, so it is a secret.
    pub webhook_url: Option<SecretString>,
    /// The failed-user and dead-letter digests go out at most once per this many minutes.
    pub digest_minutes: u32,
    /// A persisting problem (Graph authentication, subscriptions, failed runs) is repeated at
    /// most once per this many minutes.
    pub repeat_minutes: u32,
    /// The same user failing for the same reason, and a guard trip, are repeated at most once
    /// per this many hours.
    pub repeat_hours: u32,
}

impl Default for AlertSettings {
    fn default() -> Self {
        AlertSettings {
            email: None,
            webhook_url: None,
            digest_minutes: 15,
            repeat_minutes: 60,
            repeat_hours: 24,
        }
    }
}

impl AlertSettings {
    /// Whether any channel is configured.
    pub(crate) fn enabled(&self) -> bool {
        self.email.is_some() || self.webhook_url.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct EmailAlerts {
    pub to: Vec<String>,
    pub from: String,
    pub smtp: SmtpSettings,
}

#[derive(Debug, Clone)]
pub struct SmtpSettings {
    pub host: String,
    pub port: u16,
    pub tls: SmtpTls,
    pub username: Option<SecretString>,
    pub password: Option<SecretString>,
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain connection upgraded with STARTTLS (required, never skipped); port 587.
    StartTls,
    /// TLS from the first byte (SMTPS); port 465.
    Tls,
    /// No encryption: only for a server on 127.0.0.1/localhost (test servers, a local relay).
    None,
}

impl RawAlerts {
    /// Validates these settings, each key falling back to `parent`'s (the global `[alerts]`).
    /// `prefix` names this table in errors.
    pub(super) fn build(
        &self,
        prefix: &str,
        parent: Option<&RawAlerts>,
        base: &Path,
    ) -> Result<AlertSettings, ConfigError> {
        // An inherited value's errors name the global key.
        macro_rules! pick {
            ($f:ident) => {
                match (&self.$f, parent.and_then(|p| p.$f.as_ref())) {
                    (Some(v), _) => Some((v, format!("{prefix}.{}", stringify!($f)))),
                    (None, Some(v)) => Some((v, format!("alerts.{}", stringify!($f)))),
                    (None, None) => None,
                }
            };
        }
        let defaults = AlertSettings::default();
        let minutes = |v: Option<(&u32, String)>, default: u32, max: u32| match v {
            None => Ok(default),
            Some((n, _)) if (1..=max).contains(n) => Ok(*n),
            Some((_, key)) => Err(invalid(key, format!("must be between 1 and {max}"))),
        };
        let digest_minutes = minutes(pick!(digest_minutes), defaults.digest_minutes, 24 * 60)?;
        let repeat_minutes = minutes(pick!(repeat_minutes), defaults.repeat_minutes, 7 * 24 * 60)?;
        let repeat_hours = minutes(pick!(repeat_hours), defaults.repeat_hours, 30 * 24)?;
        if pick!(enabled).is_some_and(|(on, _)| !*on) {
            return Ok(AlertSettings {
                digest_minutes,
                repeat_minutes,
                repeat_hours,
                ..defaults
            });
        }
        let webhook_url = match pick!(webhook_url) {
            None => None,
            Some((raw, key)) => {
                let v = raw.resolve(&key, base)?;
                // Never echo the URL: its path is the webhook's credential.
                let url = Url::parse(secrecy::ExposeSecret::expose_secret(&v).trim())
                    .map_err(|e| invalid(&key, format!("is not a URL ({e})")))?;
                let loopback = url.host_str().is_some_and(is_loopback_host);
                if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
                    return Err(invalid(
                        key,
                        "must be an https:// URL (http:// is accepted only for 127.0.0.1 and localhost)",
                    ));
                }
                Some(v)
            }
        };
        let to = pick!(email_to).map(|(v, key)| (v.clone(), key));
        let email = match to {
            None => None,
            Some((to, _)) if to.is_empty() => None,
            Some((to, key)) => {
                for a in &to {
                    check_mailbox(a).map_err(|m| invalid(&key, m))?;
                }
                let (from, from_key) = pick!(email_from).ok_or_else(|| {
                    invalid(
                        format!("{prefix}.email_from"),
                        "is needed when email_to is set, e.g. \"rostersync <rostersync@example.com>\"",
                    )
                })?;
                check_mailbox(from).map_err(|m| invalid(from_key, m))?;
                let (smtp, smtp_key) = pick!(smtp).ok_or_else(|| {
                    invalid(
                        format!("{prefix}.smtp"),
                        "is needed when email_to is set: add an [alerts.smtp] table with at least host",
                    )
                })?;
                Some(EmailAlerts {
                    to,
                    from: from.clone(),
                    smtp: smtp.build(&smtp_key, base)?,
                })
            }
        };
        Ok(AlertSettings {
            email,
            webhook_url,
            digest_minutes,
            repeat_minutes,
            repeat_hours,
        })
    }
}

impl RawSmtp {
    fn build(&self, prefix: &str, base: &Path) -> Result<SmtpSettings, ConfigError> {
        let k = |f: &str| format!("{prefix}.{f}");
        let host = self.host.trim().to_string();
        if host.is_empty() || host.contains(['/', ' ', ':']) && !host.starts_with('[') {
            return Err(invalid(
                k("host"),
                format!("{host:?} is not a host name such as \"smtp.example.com\""),
            ));
        }
        let tls = match self.tls.as_deref().unwrap_or("starttls") {
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Tls,
            "none" if is_loopback_host(&host) => SmtpTls::None,
            "none" => {
                return Err(invalid(
                    k("tls"),
                    "\"none\" (no encryption) is accepted only for a server on 127.0.0.1 or localhost; use \"starttls\" or \"tls\"",
                ))
            }
            other => {
                return Err(invalid(
                    k("tls"),
                    format!("{other:?} is not supported; use \"starttls\" (port 587), \"tls\" (port 465) or \"none\" (localhost only)"),
                ))
            }
        };
        let port = self.port.unwrap_or(match tls {
            SmtpTls::StartTls => 587,
            SmtpTls::Tls => 465,
            SmtpTls::None => 25,
        });
        if port == 0 {
            return Err(invalid(k("port"), "must be between 1 and 65535"));
        }
        let username = self
            .username
            .as_ref()
            .map(|u| u.resolve(&k("username"), base))
            .transpose()?;
        let password = self
            .password
            .as_ref()
            .map(|p| p.resolve(&k("password"), base))
            .transpose()?;
        if username.is_some() != password.is_some() {
            return Err(invalid(
                k(if username.is_some() {
                    "password"
                } else {
                    "username"
                }),
                "give both username and password, or neither (no authentication)",
            ));
        }
        let timeout_secs = self.timeout_secs.unwrap_or(30);
        if !(1..=600).contains(&timeout_secs) {
            return Err(invalid(k("timeout_secs"), "must be between 1 and 600"));
        }
        Ok(SmtpSettings {
            host,
            port,
            tls,
            username,
            password,
            timeout_secs,
        })
    }
}

/// Whether `s` is a mail address the mailer accepts (`a@b.c` or `Name <a@b.c>`): checked
/// when the config loads, so a wrong address is named then rather than at the first alert.
fn check_mailbox(s: &str) -> Result<(), String> {
    use std::str::FromStr;
    lettre::message::Mailbox::from_str(s.trim())
        .map(|_| ())
        .map_err(|_| format!("{s:?} is not a mail address such as \"ops@example.com\" or \"Ops <ops@example.com>\""))
}
