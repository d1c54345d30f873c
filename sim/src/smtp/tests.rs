//! The SMTP simulator against a raw client (exact replies, errors a client can make) and
//! against lettre (STARTTLS, implicit TLS, encodings).

use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::*;

const USER: &str = "alerts@example.com";
const PASSWORD: &str = "pa55-word";

fn fixture(name: &str) -> Vec<u8> {
    // The fixtures of the service's own TLS tests, one folder up.
    let p = format!(
        "{}/../tests/fixtures/tls/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&p).unwrap_or_else(|e| panic!("{p}: {e}"))
}

fn tls() -> Arc<rustls::ServerConfig> {
    server_tls(&fixture("rsa-fullchain.pem"), &fixture("rsa-key-pkcs8.pem")).unwrap()
}

fn with_auth() -> SmtpSimConfig {
    SmtpSimConfig {
        credentials: Some((USER.into(), PASSWORD.into())),
        auth_without_tls: true,
        ..Default::default()
    }
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

use base64::Engine as _;

struct Raw {
    io: BufReader<TcpStream>,
}

impl Raw {
    async fn connect(sim: &SmtpSim) -> (Raw, String) {
        let tcp = TcpStream::connect(sim.addr()).await.unwrap();
        let mut raw = Raw {
            io: BufReader::new(tcp),
        };
        let greeting = raw.reply().await;
        (raw, greeting)
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.io.get_mut().write_all(bytes).await.unwrap();
    }

    /// One reply, its lines joined with `\n`; empty when the server closed the connection.
    async fn reply(&mut self) -> String {
        let mut out = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.io.read_line(&mut line))
                .await
                .expect("a reply in time")
                .unwrap();
            if n == 0 {
                return out.join("\n");
            }
            assert!(line.ends_with("\r\n"), "replies end with CRLF: {line:?}");
            let line = line.trim_end().to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            out.push(line);
            if last {
                return out.join("\n");
            }
        }
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }
}

fn code(reply: &str) -> &str {
    &reply[..3.min(reply.len())]
}

#[tokio::test]
async fn a_session_with_auth_plain_keeps_the_message_decoded() {
    let sim = SmtpSim::start(with_auth()).await.unwrap();
    let (mut c, greeting) = Raw::connect(&sim).await;
    assert!(greeting.starts_with("220 "), "{greeting}");
    let ehlo = c.cmd("EHLO client.example").await;
    for ext in [
        "PIPELINING",
        "8BITMIME",
        "SIZE 10485760",
        "ENHANCEDSTATUSCODES",
        "AUTH PLAIN LOGIN",
    ] {
        assert!(ehlo.lines().any(|l| &l[4..] == ext), "{ext}: {ehlo}");
    }
    assert!(ehlo.lines().last().unwrap().starts_with("250 "), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "no certificate, no STARTTLS");
    // AUTH is required before MAIL (RFC 4954 §6).
    assert!(c
        .cmd("MAIL FROM:<a@example.com>")
        .await
        .starts_with("530 5.7.0"));
    let wrong = b64(&format!("\0{USER}\0nope"));
    assert!(c
        .cmd(&format!("AUTH PLAIN {wrong}"))
        .await
        .starts_with("535 5.7.8"));
    // Without an initial response: an empty challenge, "334 " (RFC 4954 §4).
    assert_eq!(c.cmd("AUTH PLAIN").await, "334");
    let good = b64(&format!("\0{USER}\0{PASSWORD}"));
    assert!(c.cmd(&good).await.starts_with("235 2.7.0"));
    assert!(
        c.cmd("AUTH PLAIN =").await.starts_with("503"),
        "once a session"
    );
    assert!(c
        .cmd("MAIL FROM:<a@example.com> BODY=8BITMIME SIZE=500")
        .await
        .starts_with("250 2.1.0"));
    assert!(c.cmd("RCPT TO:<ops@example.com>").await.starts_with("250"));
    assert!(c.cmd("RCPT TO:<Postmaster>").await.starts_with("250"));
    assert!(c.cmd("DATA").await.starts_with("354"));
    c.send(
        b"Subject: =?utf-8?q?caf=C3=A9?= and\r\n more\r\nFrom: a@example.com\r\nTo: ops@example.com\r\n\
Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n\
line one=\r\n continued\r\n..a line that starts with a period\r\n=E2=80=A6\r\n.\r\n",
    )
    .await;
    assert!(c.reply().await.starts_with("250 2.0.0"));
    assert!(c.cmd("QUIT").await.starts_with("221"));
    let m = &sim.mails()[0];
    assert_eq!(m.mail_from, "a@example.com");
    assert_eq!(m.rcpt_to, vec!["ops@example.com", "Postmaster"]);
    assert_eq!(m.subject, "café and more");
    assert_eq!(
        m.body,
        "line one continued\r\n.a line that starts with a period\r\n…\r\n"
    );
    assert!(m.raw.contains("\r\n.a line that starts"), "unstuffed");
    assert_eq!(m.auth_user.as_deref(), Some(USER));
    assert!(!m.tls);
    // The second AUTH was the only error of this client.
    assert_eq!(
        sim.protocol_errors(),
        vec!["503 5.5.1 Already authenticated"]
    );
    assert!(!sim.commands().iter().any(|c| c.contains(PASSWORD)));
}

#[tokio::test]
async fn auth_login_answers_its_challenges_and_can_be_cancelled() {
    let sim = SmtpSim::start(with_auth()).await.unwrap();
    let (mut c, _) = Raw::connect(&sim).await;
    assert!(c.cmd("AUTH LOGIN").await.starts_with("503"), "EHLO first");
    c.cmd("EHLO client.example").await;
    assert_eq!(
        c.cmd("AUTH LOGIN").await,
        format!("334 {}", b64("Username:"))
    );
    assert!(c.cmd("*").await.starts_with("501"), "cancelled");
    assert_eq!(
        c.cmd(&format!("AUTH LOGIN {}", b64(USER))).await,
        format!("334 {}", b64("Password:"))
    );
    assert!(c.cmd(&b64(PASSWORD)).await.starts_with("235"));
    assert!(c.cmd("AUTH CRAM-MD5").await.starts_with("503"));
    // Protocol errors: the "AUTH before EHLO" and the second AUTH. A cancel is not one.
    assert_eq!(
        sim.protocol_errors().len(),
        2,
        "{:?}",
        sim.protocol_errors()
    );
}

#[tokio::test]
async fn a_client_breaking_the_rfcs_gets_their_replies_and_each_is_recorded() {
    let sim = SmtpSim::start(SmtpSimConfig::default()).await.unwrap();
    let (mut c, _) = Raw::connect(&sim).await;
    let mut expect = Vec::new();
    for (line, want) in [
        ("MAIL FROM:<a@example.com>", "503"), // before EHLO
        ("EHLO", "501"),                      // no domain
        ("EHLO client.example", "250"),
        ("RCPT TO:<b@example.com>", "503"),    // before MAIL
        ("DATA", "503"),                       // before MAIL
        ("MAIL FROM: <a@example.com>", "501"), // space before the path
        ("MAIL FROM:a@example.com", "501"),    // no brackets
        ("MAIL FROM:<a@example.com> X-FOO=1", "555"),
        ("MAIL FROM:<a@example.com> SIZE=99999999999", "552"),
        ("MAIL FROM:<>", "250"),              // the null reverse-path
        ("MAIL FROM:<a@example.com>", "503"), // nested
        ("RCPT TO:<>", "501"),
        ("RCPT TO:<not an address>", "501"),
        ("RCPT TO:<b@example.com> NOTIFY=NEVER", "555"),
        ("DATA", "554"),       // no recipient yet
        ("AUTH PLAIN", "502"), // not offered
        ("STARTTLS", "502"),   // not offered
        ("VRFY", "501"),
        ("VRFY someone", "252"),
        ("NOOP anything", "250"),
        ("RSET now", "501"),
        ("RSET", "250"),
        ("BOGUS", "500"),
    ] {
        let r = c.cmd(line).await;
        assert_eq!(code(&r), want, "{line}: {r}");
        if ["500", "501", "502", "503", "504", "555", "554"].contains(&want) {
            expect.push(r);
        }
    }
    // A bare LF does not end a command line (RFC 5321 §2.3.8); a long line is refused.
    assert_eq!(code(&c.cmd("NOOP\nNOOP").await), "500");
    assert_eq!(
        code(&c.reply().await),
        "250",
        "the rest of the line is one of its own"
    );
    let long = format!("NOOP {}", "x".repeat(600));
    assert_eq!(code(&c.cmd(&long).await), "500");
    assert_eq!(sim.protocol_errors().len(), expect.len() + 2);
    for (got, want) in sim.protocol_errors().iter().zip(&expect) {
        assert_eq!(got, want);
    }
    // HELO sessions have no extensions: parameters are refused.
    c.cmd("HELO client.example").await;
    assert_eq!(
        code(&c.cmd("MAIL FROM:<a@example.com> BODY=8BITMIME").await),
        "555"
    );
}

#[tokio::test]
async fn message_text_is_held_to_crlf_line_ends_length_and_7_bits() {
    let sim = SmtpSim::start(SmtpSimConfig::default()).await.unwrap();
    let (mut c, _) = Raw::connect(&sim).await;
    c.cmd("EHLO client.example").await;
    for (body, want) in [
        (b"Subject: x\r\n\r\nbare\nLF\r\n.\r\n".to_vec(), "554 5.6.0"),
        (
            format!("Subject: x\r\n\r\n{}\r\n.\r\n", "y".repeat(999)).into_bytes(),
            "554 5.6.0",
        ),
        (
            "Subject: x\r\n\r\n\u{e9}\r\n.\r\n".as_bytes().to_vec(),
            "554 5.6.0",
        ),
        (
            format!("Subject: x\r\n\r\n{}\r\n.\r\n", "y".repeat(998)).into_bytes(),
            "250",
        ),
    ] {
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@example.com>").await;
        assert!(c.cmd("DATA").await.starts_with("354"));
        c.send(&body).await;
        let r = c.reply().await;
        assert!(r.starts_with(want), "{r}");
    }
    assert_eq!(sim.mails().len(), 1);
    // A bare LF followed by "." is not the end of the data (no smuggling).
    c.cmd("MAIL FROM:<a@example.com>").await;
    c.cmd("RCPT TO:<b@example.com>").await;
    c.cmd("DATA").await;
    c.send(b"Subject: x\r\n\r\nhi\n.\nMAIL FROM:<evil@example.com>\r\n.\r\n")
        .await;
    assert!(c.reply().await.starts_with("554"));
    assert_eq!(sim.mails().len(), 1);
}

#[tokio::test]
async fn modes_refuse_service_or_messages() {
    let sim = SmtpSim::start(SmtpSimConfig::default()).await.unwrap();
    sim.set_mode(SmtpMode::Unavailable);
    let (mut c, greeting) = Raw::connect(&sim).await;
    assert!(greeting.starts_with("421 4.3.2"), "{greeting}");
    assert_eq!(c.reply().await, "", "closed");
    for (mode, want) in [
        (SmtpMode::DeferMessages, "451"),
        (SmtpMode::RejectMessages, "554"),
    ] {
        sim.set_mode(mode);
        let (mut c, _) = Raw::connect(&sim).await;
        c.cmd("EHLO client.example").await;
        c.cmd("MAIL FROM:<a@example.com>").await;
        c.cmd("RCPT TO:<b@example.com>").await;
        c.cmd("DATA").await;
        c.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").await;
        assert_eq!(code(&c.reply().await), want);
    }
    assert!(sim.mails().is_empty());
    assert!(sim.protocol_errors().is_empty());
}

#[tokio::test]
async fn starttls_forgets_the_plain_session_and_what_was_pipelined_after_it() {
    let sim = SmtpSim::start(SmtpSimConfig {
        tls: Some(tls()),
        require_tls: true,
        ..with_auth()
    })
    .await
    .unwrap();
    let (mut c, _) = Raw::connect(&sim).await;
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(ehlo.contains("STARTTLS"), "{ehlo}");
    assert!(c
        .cmd("MAIL FROM:<a@example.com>")
        .await
        .starts_with("530 5.7.0 Must issue a STARTTLS"));
    assert_eq!(code(&c.cmd("STARTTLS now").await), "501");
    c.send(b"STARTTLS\r\nNOOP\r\n").await;
    assert!(c.reply().await.starts_with("220 2.0.0"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        sim.protocol_errors()
            .iter()
            .any(|e| e.contains("after STARTTLS")),
        "{:?}",
        sim.protocol_errors()
    );
}

#[tokio::test]
async fn auth_needs_tls_unless_allowed() {
    let sim = SmtpSim::start(SmtpSimConfig {
        tls: Some(tls()),
        auth_without_tls: false,
        ..with_auth()
    })
    .await
    .unwrap();
    let (mut c, _) = Raw::connect(&sim).await;
    let ehlo = c.cmd("EHLO client.example").await;
    assert!(!ehlo.contains("AUTH"), "not offered in clear: {ehlo}");
    let r = c
        .cmd(&format!(
            "AUTH PLAIN {}",
            b64(&format!("\0{USER}\0{PASSWORD}"))
        ))
        .await;
    assert!(r.starts_with("538 5.7.11"), "{r}");
}

fn message(subject: &str, body: &str) -> Message {
    Message::builder()
        .from("rostersync <rostersync@example.com>".parse().unwrap())
        .to("ops@example.com".parse().unwrap())
        .to("Service Desk <desk@example.com>".parse().unwrap())
        .subject(subject)
        .header(ContentType::TEXT_PLAIN)
        .body(body.to_string())
        .unwrap()
}

fn trusted(domain: &str) -> TlsParameters {
    TlsParameters::builder(domain.into())
        .add_root_certificate(Certificate::from_pem(&fixture("ca.pem")).unwrap())
        .build_rustls()
        .unwrap()
}

#[tokio::test]
async fn lettre_sends_over_starttls_with_auth_login_and_non_ascii_text() {
    let sim = SmtpSim::start(SmtpSimConfig {
        tls: Some(tls()),
        require_tls: true,
        ..with_auth()
    })
    .await
    .unwrap();
    let subject = "Zürich: 3 users failed to sync … a subject long enough to be folded over more than one line";
    let body = format!("Grüße\n{}\n.leading period\n", "é".repeat(500));
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(sim.port())
        .tls(Tls::Required(trusted("localhost")))
        .credentials(Credentials::new(USER.into(), PASSWORD.into()))
        .authentication(vec![Mechanism::Login])
        .build();
    mailer.send(message(subject, &body)).await.unwrap();
    let m = &sim.mails()[0];
    assert!(m.tls);
    assert_eq!(m.auth_user.as_deref(), Some(USER));
    assert_eq!(m.subject, subject);
    assert_eq!(m.body.replace("\r\n", "\n"), body);
    assert_eq!(m.rcpt_to, vec!["ops@example.com", "desk@example.com"]);
    assert_eq!(sim.protocol_errors(), Vec::<String>::new());
    let cmds = sim.commands();
    assert_eq!(&cmds[..2], ["EHLO", "STARTTLS"], "{cmds:?}");
}

#[tokio::test]
async fn lettre_sends_over_implicit_tls_and_refuses_an_untrusted_certificate() {
    let sim = SmtpSim::start(SmtpSimConfig {
        tls: Some(tls()),
        implicit_tls: true,
        ..with_auth()
    })
    .await
    .unwrap();
    let mailer = |params: TlsParameters| {
        AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
            .port(sim.port())
            .tls(Tls::Wrapper(params))
            .credentials(Credentials::new(USER.into(), PASSWORD.into()))
            .timeout(Some(Duration::from_secs(5)))
            .build()
    };
    mailer(trusted("localhost"))
        .send(message("hello", "text"))
        .await
        .unwrap();
    assert!(sim.mails()[0].tls);
    // The client's own trust store knows nothing of the test CA.
    let untrusted = TlsParameters::new("localhost".into()).unwrap();
    assert!(mailer(untrusted)
        .send(message("hello", "text"))
        .await
        .is_err());
    assert_eq!(sim.mails().len(), 1);
}

#[tokio::test]
async fn a_stopped_server_is_gone_and_can_come_back_on_its_port() {
    let sim = SmtpSim::start(SmtpSimConfig::default()).await.unwrap();
    let addr = sim.addr();
    drop(sim);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(TcpStream::connect(addr).await.is_err());
    let sim = SmtpSim::start_on(addr, SmtpSimConfig::default())
        .await
        .unwrap();
    let (_, greeting) = Raw::connect(&sim).await;
    assert!(greeting.starts_with("220"));
}
