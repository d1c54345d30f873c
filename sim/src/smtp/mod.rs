//! In-process SMTP server (RFC 5321) that keeps what it accepts, for the alert tests: a real
//! peer for the mail client (lettre), on 127.0.0.1, with no other program needed.
//!
//! It speaks what a submission server speaks and holds the client to the RFCs' wording, not
//! to one client's habits: the greeting, EHLO/HELO, MAIL/RCPT/DATA with dot-stuffing, RSET,
//! NOOP, VRFY, HELP, QUIT; the extensions SIZE (RFC 1870), 8BITMIME (RFC 6152), PIPELINING
//! (RFC 2920) and ENHANCEDSTATUSCODES (RFC 2034, RFC 3463); AUTH PLAIN (RFC 4616) and LOGIN
//! (RFC 4954), required before MAIL when credentials are configured; STARTTLS (RFC 3207) and
//! implicit TLS (RFC 8314) with a given certificate. Lines end with CRLF only; a bare LF, an
//! over-long line, a command out of sequence or a bad parameter gets the RFC's reply, and each
//! such reply is kept ([`SmtpSim::protocol_errors`]) so a test can assert that the client
//! caused none.
//!
//! Each accepted message is kept as a [`ReceivedMail`]: the envelope, the decoded subject and
//! plain-text body, the raw message and who authenticated. [`SmtpSim::set_mode`] makes it
//! unavailable (421 at the greeting) or refuse messages (451, 554); dropping it stops it, so
//! tests of retries can take it away and bring it back on the same port.
//!
//! Test material only: no queue, no relay, no delivery.

mod mime;
mod session;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Largest message accepted (advertised as `SIZE`), in octets.
const DEFAULT_MAX_MESSAGE: usize = 10 << 20;
/// At most this many commands and protocol errors are kept.
const MAX_KEPT: usize = 10_000;

/// How the server behaves. The default accepts everything well-formed, without AUTH or TLS.
#[derive(Clone)]
pub struct SmtpSimConfig {
    /// The name it greets with.
    pub hostname: String,
    /// `(username, password)`: AUTH PLAIN/LOGIN is offered and required before MAIL.
    pub credentials: Option<(String, String)>,
    /// The certificate: STARTTLS is offered (or, with `implicit_tls`, TLS starts at once).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// With `tls`: TLS from the first octet (SMTPS, RFC 8314) instead of STARTTLS.
    pub implicit_tls: bool,
    /// AUTH before TLS. RFC 4954 §4 lets a server refuse it (538); a loopback test of
    /// `tls = "none"` needs it allowed.
    pub auth_without_tls: bool,
    /// MAIL is refused (530) until STARTTLS (RFC 3207 §4).
    pub require_tls: bool,
    pub max_message_bytes: usize,
}

impl Default for SmtpSimConfig {
    fn default() -> Self {
        SmtpSimConfig {
            hostname: "smtp.sim.localhost".into(),
            credentials: None,
            tls: None,
            implicit_tls: false,
            auth_without_tls: false,
            require_tls: false,
            max_message_bytes: DEFAULT_MAX_MESSAGE,
        }
    }
}

/// A TLS server configuration from a PEM certificate chain (leaf first) and its private key.
pub fn server_tls(chain_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate chain: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key: {e}"))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

/// Service knob, for tests of what a client does when mail cannot be sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SmtpMode {
    #[default]
    Accept,
    /// `421` instead of the greeting, then the connection closes (RFC 5321 §3.1, §4.2.2).
    Unavailable,
    /// The message is refused at the end of DATA with `451` (transient: try again later).
    DeferMessages,
    /// The message is refused at the end of DATA with `554` (permanent).
    RejectMessages,
}

/// One message the server accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedMail {
    /// The reverse-path of MAIL FROM, without angle brackets (empty for `<>`).
    pub mail_from: String,
    /// The forward-paths of the accepted RCPT TO commands, in order.
    pub rcpt_to: Vec<String>,
    /// `Subject`, unfolded, encoded-words decoded.
    pub subject: String,
    pub from: String,
    pub to: String,
    /// The first `text/plain` part, transfer encoding and charset undone.
    pub body: String,
    /// The message as the client sent it, dot-stuffing undone.
    pub raw: String,
    /// The user that authenticated on the session, if any.
    pub auth_user: Option<String>,
    /// Whether the session was encrypted (STARTTLS or implicit TLS).
    pub tls: bool,
}

struct Shared {
    config: SmtpSimConfig,
    mode: Mutex<SmtpMode>,
    mails: Mutex<Vec<ReceivedMail>>,
    /// Woken on each accepted message.
    arrived: Notify,
    /// Command verbs in the order received (never arguments: AUTH carries credentials).
    commands: Mutex<Vec<String>>,
    /// Replies that blame the client: 500–504, 555, and the reasons.
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn mode(&self) -> SmtpMode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push_bounded(v: &Mutex<Vec<String>>, s: String) {
        let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() < MAX_KEPT {
            v.push(s);
        }
    }

    fn command(&self, verb: &str) {
        Self::push_bounded(&self.commands, verb.to_string());
    }

    fn protocol_error(&self, reply: &str) {
        Self::push_bounded(&self.errors, reply.to_string());
    }

    fn accept(&self, mail: ReceivedMail) {
        self.mails
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(mail);
        self.arrived.notify_waiters();
    }
}

/// A running server; dropping it stops it (the listener and every session).
pub struct SmtpSim {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SmtpSim {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SmtpSim {
    /// Listens on 127.0.0.1 on a free port.
    pub async fn start(config: SmtpSimConfig) -> std::io::Result<SmtpSim> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    /// Listens on `addr` (a test that brings a server back on the port it used).
    pub async fn start_on(addr: SocketAddr, config: SmtpSimConfig) -> std::io::Result<SmtpSim> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config,
            mode: Mutex::new(SmtpMode::Accept),
            mails: Mutex::new(Vec::new()),
            arrived: Notify::new(),
            commands: Mutex::new(Vec::new()),
            errors: Mutex::new(Vec::new()),
        });
        let s = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            // Dropped with the accept loop (when the server is): aborts every session.
            let mut sessions = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        match accepted {
                            Ok((tcp, _)) => {
                                sessions.spawn(session::connection(Arc::clone(&s), tcp));
                            }
                            // Out of descriptors, say: no busy loop.
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                    Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
                }
            }
        });
        Ok(SmtpSim { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_mode(&self, mode: SmtpMode) {
        *self.shared.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    /// The messages accepted so far, in order.
    pub fn mails(&self) -> Vec<ReceivedMail> {
        self.shared
            .mails
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until at least `n` messages were accepted or `limit` passed; returns them all.
    pub async fn wait_mails(&self, n: usize, limit: Duration) -> Vec<ReceivedMail> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let arrived = self.shared.arrived.notified();
            let m = self.mails();
            if m.len() >= n {
                return m;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.mails();
            }
        }
    }

    /// The command verbs received (upper case), in order, over every session.
    pub fn commands(&self) -> Vec<String> {
        self.shared
            .commands
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every reply that blamed the client (syntax, sequence, line length, bare LF, unknown
    /// parameter): empty when the client spoke SMTP as the RFCs say.
    pub fn protocol_errors(&self) -> Vec<String> {
        self.shared
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
