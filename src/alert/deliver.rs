//! Delivery: renders outbox entries and sends them by SMTP (lettre) and to the webhook
//! (reqwest), retrying failures with backoff. The only code that knows lettre.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{DateTime, Duration, NaiveDate, Utc};
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use super::outbox::{self, Channel, Entry};
use crate::config::{AlertSettings, Config, EmailAlerts, IntegrationConfig, SmtpTls};
use crate::redact::Redactor;
use crate::retry::RetryPolicy;
use crate::store::alerts::AlertTrees;
use crate::store::{IntegrationStore, Store, StoreError};

/// Pokes a waiting sender when something was queued.
static WAKE: Notify = Notify::const_new();

pub(super) fn wake() {
    WAKE.notify_one();
}

/// An entry that could not be delivered for this long is dropped (with an error log).
const GIVE_UP_DAYS: u64 = 7;
/// A failed delivery is retried after 15 s, doubling up to 30 min, for [`GIVE_UP_DAYS`].
const ALERT_RETRY: RetryPolicy = RetryPolicy {
    deadline: Some(StdDuration::from_secs(GIVE_UP_DAYS * 24 * 3600)),
    ..RetryPolicy::new(
        u32::MAX,
        StdDuration::from_secs(15),
        StdDuration::from_secs(30 * 60),
    )
};
/// Marks older than this are forgotten (longer than every window).
const MARK_DAYS: i64 = 400;

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot build the webhook client: {0}")]
    Http(String),
}

/// What one delivery pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Entries delivered to every channel.
    pub sent: usize,
    /// Entries with a channel that failed (kept for a retry).
    pub failed: usize,
    /// Entries given up on after [`GIVE_UP_DAYS`].
    pub dropped: usize,
}

struct Known {
    cfg: IntegrationConfig,
    store: IntegrationStore,
}

/// Sends what the outbox holds. One per process: `serve` runs it as a task, the CLI calls
/// [`Alerter::deliver_before_exit`].
pub struct Alerter {
    trees: AlertTrees,
    global: Arc<AlertSettings>,
    integrations: HashMap<String, Known>,
    http: reqwest::Client,
}

impl Alerter {
    pub fn new(config: &Config, store: &Store) -> Result<Alerter, AlertError> {
        let mut integrations = HashMap::new();
        for cfg in &config.integrations {
            integrations.insert(
                cfg.name.to_string(),
                Known {
                    cfg: cfg.clone(),
                    store: store.integration(&cfg.name)?,
                },
            );
        }
        let http = reqwest::Client::builder()
            .timeout(StdDuration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| AlertError::Http(e.without_url().to_string()))?;
        Ok(Alerter {
            trees: store.alerts()?,
            global: Arc::clone(&config.alerts),
            integrations,
            http,
        })
    }

    /// Queues the secret-expiry warnings that are due on `today`, for every integration.
    pub fn check_secret_expiry(&self, today: NaiveDate) {
        for k in self.integrations.values() {
            super::check_secret_expiry(&k.cfg, &k.store, today);
        }
    }

    /// Tries every entry due at `now` once.
    pub async fn deliver_due(&self, now: DateTime<Utc>) -> Delivery {
        let mut d = Delivery::default();
        let due = match outbox::claim_due(&self.trees, now) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the alert outbox");
                return d;
            }
        };
        for (id, entry) in due {
            let span = tracing::info_span!("alert", integration = %entry.integration, alert = entry.kind.as_str());
            self.deliver_one(id, entry, now, &mut d)
                .instrument(span)
                .await;
        }
        if let Err(e) = self.trees.flush() {
            tracing::error!(error = %e, "cannot flush the alert outbox");
        }
        d
    }

    async fn deliver_one(&self, id: u64, mut entry: Entry, now: DateTime<Utc>, d: &mut Delivery) {
        let (settings, secrets) = self.for_integration(&entry.integration);
        let (subject, body) = render(&entry, &secrets);
        let mut errors = Vec::new();
        let mut still = Vec::new();
        for ch in entry.pending.clone() {
            let r = match ch {
                Channel::Email => match &settings.email {
                    Some(e) => send_email(e, &subject, &body).await,
                    None => Err("e-mail is no longer configured".into()),
                },
                Channel::Webhook => match &settings.webhook_url {
                    Some(u) => self.post_webhook(u, &subject, &body).await,
                    None => Err("the webhook is no longer configured".into()),
                },
            };
            if let Err(e) = r {
                errors.push(format!("{ch:?}: {}", secrets.scrub(&e)));
                still.push(ch);
            }
        }
        let result = if still.is_empty() {
            tracing::info!(%subject, "alert sent");
            d.sent += 1;
            self.trees.remove(id)
        } else if let Some(wait) = ALERT_RETRY.after_failures(
            entry.attempts + 1,
            (now - entry.raised_at).to_std().unwrap_or_default(),
        ) {
            entry.attempts += 1;
            entry.not_before =
                now + Duration::from_std(wait).unwrap_or_else(|_| Duration::hours(1));
            entry.pending = still;
            entry.last_error = Some(errors.join("; "));
            tracing::warn!(%subject, errors = %errors.join("; "), attempts = entry.attempts, retry_at = %entry.not_before, "alert not delivered; kept in the outbox for a retry");
            d.failed += 1;
            self.trees.put(id, &entry)
        } else {
            tracing::error!(%subject, errors = %errors.join("; "), "ALERT DROPPED: undeliverable for {GIVE_UP_DAYS} days");
            d.dropped += 1;
            self.trees.remove(id)
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "cannot update the alert outbox");
        }
    }

    /// The CLI's delivery: what is due now, within `limit`. Whatever is left (or fails) stays
    /// in the outbox for the next run or for `serve`.
    pub async fn deliver_before_exit(&self, limit: StdDuration) -> Delivery {
        match tokio::time::timeout(limit, self.deliver_due(Utc::now())).await {
            Ok(d) => {
                if d.failed > 0 {
                    tracing::warn!(
                        failed = d.failed,
                        "some alerts could not be sent; they stay in the outbox and are retried by the next run or by serve"
                    );
                }
                d
            }
            Err(_) => {
                tracing::warn!("alert delivery took too long; the rest stays in the outbox");
                Delivery::default()
            }
        }
    }

    /// `serve`'s sender: checks secret expiry at start and daily, delivers due entries as
    /// they are queued or fall due, until `stop`.
    pub(crate) async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut next_check = Utc::now();
        loop {
            let now = Utc::now();
            if now >= next_check {
                self.check_secret_expiry(now.date_naive());
                if let Err(e) = self.trees.prune_marks(now - Duration::days(MARK_DAYS)) {
                    tracing::warn!(error = %e, "cannot prune alert marks");
                }
                next_check = now + Duration::days(1);
            }
            self.deliver_due(now).await;
            let next = match outbox::next_due(&self.trees) {
                Ok(Some(t)) => t.min(next_check),
                _ => next_check,
            };
            // A backstop, in case a wake-up was taken by another sender in the process.
            let wait = (next - Utc::now())
                .to_std()
                .unwrap_or(StdDuration::ZERO)
                .min(StdDuration::from_secs(60));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = WAKE.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// The settings an entry is sent with, and the redactor that scrubs it.
    fn for_integration(&self, name: &str) -> (Arc<AlertSettings>, Redactor) {
        let (settings, mut secrets) = match self.integrations.get(name) {
            Some(k) => (Arc::clone(&k.cfg.alerts), k.cfg.redactor(Some(&k.store))),
            None => (Arc::clone(&self.global), Redactor::default()),
        };
        for s in [&settings, &self.global] {
            if let Some(u) = &s.webhook_url {
                secrets.add(u);
            }
            // Not the SMTP username: often a plain word or the sender's address.
            if let Some(p) = s.email.as_ref().and_then(|e| e.smtp.password.as_ref()) {
                secrets.add(p);
            }
        }
        (settings, secrets)
    }

    async fn post_webhook(
        &self,
        url: &SecretString,
        subject: &str,
        body: &str,
    ) -> Result<(), String> {
        // `text` is what both Slack incoming webhooks and Teams (Office 365 connector) take.
        let payload = serde_json::json!({ "text": format!("{subject}\n\n{body}") });
        let resp = self
            .http
            .post(url.expose_secret().trim())
            .json(&payload)
            .send()
            .await
            // Never the URL in an error: its path is the webhook's credential.
            .map_err(|e| format!("webhook: {}", e.without_url()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let text = resp.text().await.unwrap_or_default();
        Err(format!(
            "webhook answered {status}: {}",
            text.chars().take(200).collect::<String>()
        ))
    }
}

async fn send_email(e: &EmailAlerts, subject: &str, body: &str) -> Result<(), String> {
    let bad = |what: &str, v: &str| format!("{what} {v:?} is not a mail address");
    let mut msg = Message::builder()
        .from(
            e.from
                .trim()
                .parse()
                .map_err(|_| bad("email_from", &e.from))?,
        )
        .subject(subject)
        .header(ContentType::TEXT_PLAIN);
    for to in &e.to {
        msg = msg.to(to.trim().parse().map_err(|_| bad("email_to", to))?);
    }
    let msg = msg
        .body(body.to_string())
        .map_err(|err| format!("cannot build the message: {err}"))?;
    let s = &e.smtp;
    let builder = match s.tls {
        SmtpTls::StartTls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&s.host),
        SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&s.host),
        SmtpTls::None => Ok(AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(
            &s.host,
        )),
    }
    .map_err(|err| format!("SMTP {}: {err}", s.host))?;
    let mut builder = builder
        .port(s.port)
        .timeout(Some(StdDuration::from_secs(s.timeout_secs)));
    if let (Some(u), Some(p)) = (&s.username, &s.password) {
        builder = builder.credentials(Credentials::new(
            u.expose_secret().to_string(),
            p.expose_secret().to_string(),
        ));
    }
    builder
        .build()
        .send(msg)
        .await
        .map(|_| ())
        .map_err(|err| format!("SMTP {}:{}: {err}", s.host, s.port))
}

/// Subject and plain-text body of an entry, scrubbed of `secrets`.
pub(super) fn render(e: &Entry, secrets: &Redactor) -> (String, String) {
    let subject = format!("[rostersync] {}: {}", e.integration, e.headline());
    let mut b = String::new();
    b.push_str(&format!("{}\n\n", e.headline()));
    b.push_str(&format!(
        "Integration: {}\nAlert: {}\nRaised: {}\n",
        e.integration,
        e.kind.as_str(),
        e.raised_at.format("%Y-%m-%d %H:%M:%S UTC")
    ));
    for d in &e.details {
        b.push_str(&format!("\n{d}\n"));
    }
    if !e.items.is_empty() {
        b.push('\n');
        for it in &e.items {
            b.push_str(&format!("- {}\n", it.text));
        }
        if e.more > 0 {
            b.push_str(&format!("- … and {} more\n", e.more));
        }
    }
    b.push_str(&format!("\nWhat to do: {}\n", e.advice));
    (secrets.scrub(&subject), secrets.scrub(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::{AlertKind, Item};

    #[test]
    fn rendering_scrubs_secrets_and_counts_digest_items() {
        let e = Entry {
            integration: "contoso".into(),
            kind: AlertKind::FailedUsers,
            key: "failed-users".into(),
            title: String::new(),
            details: vec!["Users that failed in run r1:".into()],
            items: vec![
                Item {
                    key: "a".into(),
                    text: "alice: token hunter2-secret leaked".into(),
                },
                Item {
                    key: "b".into(),
                    text: "bob: no mail".into(),
                },
            ],
            more: 3,
            advice: "fix it".into(),
            raised_at: Utc::now(),
            not_before: Utc::now(),
            claimed: false,
            pending: vec![Channel::Email],
            attempts: 0,
            last_error: None,
        };
        let mut secrets = Redactor::default();
        secrets
            .add(&SecretString::from("hunter2-secret".to_string()))
            .add(&SecretString::from("x".to_string()));
        let (subject, body) = render(&e, &secrets);
        assert_eq!(subject, "[rostersync] contoso: 5 users failed to sync");
        assert!(body.contains("- alice: token [redacted] leaked"), "{body}");
        assert!(body.contains("- bob: no mail") && body.contains("… and 3 more"));
        assert!(!body.contains("hunter2"));
    }
}
