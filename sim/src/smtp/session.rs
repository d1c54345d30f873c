//! One SMTP session (RFC 5321 §4): reads command lines, answers each, takes a message through
//! DATA, and hands the connection back for the TLS handshake after STARTTLS (RFC 3207), after
//! which a new session starts with nothing remembered from the first.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::{mime, ReceivedMail, Shared, SmtpMode};

/// Command line, CRLF included (RFC 5321 §4.5.3.1.4).
const COMMAND_LINE: usize = 512;
/// MAIL may be longer by what its parameters add: SIZE (RFC 1870 §3: 26), AUTH= (RFC 4954
/// §5: 500) and BODY= (RFC 6152: 16).
const MAIL_LINE: usize = COMMAND_LINE + 26 + 500 + 16;
/// AUTH command and responses (RFC 4954 §4).
const AUTH_LINE: usize = 12_288;
/// Text line of a message, CRLF included (RFC 5321 §4.5.3.1.6).
const TEXT_LINE: usize = 1000;
/// Recipients per message a server must take (RFC 5321 §4.5.3.1.8).
const MAX_RECIPIENTS: usize = 100;
/// A server waits at least five minutes for the next command (RFC 5321 §4.5.3.2.7).
const IDLE: Duration = Duration::from_secs(300);
const HANDSHAKE: Duration = Duration::from_secs(30);
const MAX_AUTH_FAILURES: u32 = 3;
const MAX_ERRORS: u32 = 20;

/// A client connection: plain, upgraded after STARTTLS, or TLS from the start.
pub(super) async fn connection(shared: Arc<Shared>, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let tls = shared.config.tls.clone();
    match tls {
        Some(tls) if shared.config.implicit_tls => {
            if let Some(s) = handshake(tls, tcp).await {
                let _ = Session::new(&shared, s, true).run(true).await;
            }
        }
        tls => {
            let upgraded = Session::new(&shared, tcp, false).run(true).await;
            if let (Ok(Some(tcp)), Some(tls)) = (upgraded, tls) {
                if let Some(s) = handshake(tls, tcp).await {
                    let _ = Session::new(&shared, s, true).run(false).await;
                }
            }
        }
    }
}

async fn handshake(
    tls: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    match tokio::time::timeout(HANDSHAKE, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => Some(s),
        _ => None,
    }
}

/// A line as read: without its CRLF.
struct Line {
    bytes: Vec<u8>,
    /// Longer than the limit (the rest up to the line end was read and dropped).
    too_long: bool,
    /// A LF without CR before it (RFC 5321 §2.3.8: not a line end).
    bare_lf: bool,
}

struct Transaction {
    from: String,
    rcpt: Vec<String>,
    eight_bit: bool,
}

struct Session<'a, S> {
    shared: &'a Shared,
    io: BufReader<S>,
    tls: bool,
    /// The EHLO/HELO argument, and whether it was EHLO.
    hello: Option<(String, bool)>,
    auth_user: Option<String>,
    tx: Option<Transaction>,
    auth_failures: u32,
    errors: u32,
}

/// What a command did to the session.
enum Next {
    Continue,
    Close,
    StartTls,
}

impl<'a, S: AsyncRead + AsyncWrite + Unpin> Session<'a, S> {
    fn new(shared: &'a Shared, io: S, tls: bool) -> Self {
        Session {
            shared,
            io: BufReader::new(io),
            tls,
            hello: None,
            auth_user: None,
            tx: None,
            auth_failures: 0,
            errors: 0,
        }
    }

    fn host(&self) -> &str {
        &self.shared.config.hostname
    }

    /// Runs until QUIT, a closed connection or STARTTLS (then the connection is returned,
    /// whatever the client sent after the command dropped, RFC 3207 §5 / RFC 2920 §3.1).
    async fn run(mut self, greet: bool) -> std::io::Result<Option<S>> {
        if greet {
            if self.shared.mode() == SmtpMode::Unavailable {
                let text = format!(
                    "421 4.3.2 {} Service not available, closing transmission channel",
                    self.host()
                );
                self.reply(&text).await?;
                return Ok(None);
            }
            let text = format!("220 {} ESMTP rostersync simulator ready", self.host());
            self.reply(&text).await?;
        }
        loop {
            let line = match tokio::time::timeout(IDLE, self.read_line(AUTH_LINE, true)).await {
                Err(_) => {
                    let text = format!(
                        "421 4.4.2 {} Idle timeout, closing transmission channel",
                        self.host()
                    );
                    self.reply(&text).await?;
                    return Ok(None);
                }
                Ok(r) => r?,
            };
            let Some(line) = line else { return Ok(None) };
            match self.command(line).await? {
                Next::Continue => {}
                Next::Close => return Ok(None),
                Next::StartTls => {
                    if !self.io.buffer().is_empty() {
                        self.shared.protocol_error(
                            "data sent after STARTTLS before the TLS handshake (RFC 3207 §5, RFC 2920 §3.1): discarded",
                        );
                    }
                    return Ok(Some(self.io.into_inner()));
                }
            }
            if self.errors >= MAX_ERRORS {
                self.reply("421 4.7.0 Too many errors, closing transmission channel")
                    .await?;
                return Ok(None);
            }
        }
    }

    async fn reply(&mut self, text: &str) -> std::io::Result<()> {
        let w = self.io.get_mut();
        w.write_all(text.as_bytes()).await?;
        w.write_all(b"\r\n").await?;
        w.flush().await
    }

    /// A reply that blames the client's use of the protocol: kept for the test to see.
    async fn refuse(&mut self, text: &str) -> std::io::Result<()> {
        self.errors += 1;
        self.shared.protocol_error(text);
        self.reply(text).await
    }

    /// Reads one line of at most `max` octets, CRLF included. With `lf_ends` a bare LF ends
    /// the line (a command; it is refused), otherwise it is content (message text, flagged).
    /// `None` at the end of the connection.
    async fn read_line(&mut self, max: usize, lf_ends: bool) -> std::io::Result<Option<Line>> {
        let mut line = Line {
            bytes: Vec::new(),
            too_long: false,
            bare_lf: false,
        };
        let mut last: Option<u8> = None;
        let mut len = 0usize;
        loop {
            let buf = self.io.fill_buf().await?;
            if buf.is_empty() {
                return Ok(None);
            }
            let (chunk, done) = match buf.iter().position(|b| *b == b'\n') {
                Some(i) => (&buf[..=i], true),
                None => (buf, false),
            };
            let n = chunk.len();
            len += n;
            if len > max {
                line.too_long = true;
            }
            if !line.too_long {
                line.bytes.extend_from_slice(chunk);
            }
            let before_lf = if n >= 2 { Some(chunk[n - 2]) } else { last };
            last = chunk.last().copied();
            self.io.consume(n);
            if done {
                if before_lf == Some(b'\r') {
                    if !line.too_long {
                        line.bytes.truncate(line.bytes.len() - 2);
                    }
                    return Ok(Some(line));
                }
                line.bare_lf = true;
                if lf_ends {
                    if !line.too_long {
                        line.bytes.pop();
                    }
                    return Ok(Some(line));
                }
            }
        }
    }

    async fn command(&mut self, line: Line) -> std::io::Result<Next> {
        if line.too_long {
            self.refuse("500 5.5.2 Line too long").await?;
            return Ok(Next::Continue);
        }
        if line.bare_lf {
            self.refuse(
                "500 5.5.2 Syntax error: a line ends with CRLF, not a bare LF (RFC 5321 §2.3.8)",
            )
            .await?;
            return Ok(Next::Continue);
        }
        let Ok(text) = String::from_utf8(line.bytes) else {
            self.refuse("500 5.5.2 Syntax error: not ASCII").await?;
            return Ok(Next::Continue);
        };
        let (verb, args) = match text.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), Some(a)),
            None => (text.to_ascii_uppercase(), None),
        };
        let known = verb.len() <= 10 && verb.bytes().all(|b| b.is_ascii_alphabetic());
        self.shared.command(if known { &verb } else { "?" });
        let limit = match verb.as_str() {
            "AUTH" => AUTH_LINE,
            "MAIL" => MAIL_LINE,
            _ => COMMAND_LINE,
        };
        if text.len() + 2 > limit {
            self.refuse("500 5.5.2 Line too long").await?;
            return Ok(Next::Continue);
        }
        match verb.as_str() {
            "EHLO" | "HELO" => self.hello(&verb, args).await?,
            "MAIL" => self.mail(args).await?,
            "RCPT" => self.rcpt(args).await?,
            "DATA" => self.data(args).await?,
            "RSET" => {
                if args.is_some() {
                    self.refuse("501 5.5.4 Syntax: RSET takes no parameters")
                        .await?;
                } else {
                    self.tx = None;
                    self.reply("250 2.0.0 OK").await?;
                }
            }
            "NOOP" => self.reply("250 2.0.0 OK").await?,
            "VRFY" => {
                if args.is_none_or(|a| a.trim().is_empty()) {
                    self.refuse("501 5.5.4 Syntax: VRFY string").await?;
                } else {
                    self.reply("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")
                        .await?;
                }
            }
            "HELP" => {
                self.reply("214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP VRFY HELP QUIT AUTH STARTTLS")
                    .await?
            }
            "QUIT" => {
                if args.is_some() {
                    self.refuse("501 5.5.4 Syntax: QUIT takes no parameters")
                        .await?;
                } else {
                    let text = format!("221 2.0.0 {} Service closing transmission channel", self.host());
                    self.reply(&text).await?;
                    return Ok(Next::Close);
                }
            }
            "STARTTLS" => return self.starttls(args).await,
            "AUTH" => return self.auth(args).await,
            "EXPN" => self.refuse("502 5.5.1 EXPN not implemented").await?,
            _ => self.refuse("500 5.5.1 Command unrecognized").await?,
        }
        Ok(Next::Continue)
    }

    fn starttls_offered(&self) -> bool {
        self.shared.config.tls.is_some() && !self.shared.config.implicit_tls && !self.tls
    }

    fn auth_offered(&self) -> bool {
        self.shared.config.credentials.is_some()
            && (self.tls || self.shared.config.auth_without_tls)
    }

    async fn hello(&mut self, verb: &str, args: Option<&str>) -> std::io::Result<()> {
        let Some(domain) = args.map(str::trim).filter(|d| !d.is_empty()) else {
            return self
                .refuse(&format!(
                    "501 5.5.4 Syntax: {verb} domain or address literal"
                ))
                .await;
        };
        // EHLO and HELO reset the state like RSET (RFC 5321 §4.1.4).
        self.tx = None;
        let domain = domain.to_string();
        let esmtp = verb == "EHLO";
        self.hello = Some((domain.clone(), esmtp));
        if !esmtp {
            let text = format!("250 {} Hello {domain}", self.host());
            return self.reply(&text).await;
        }
        let mut lines = vec![
            format!("{} Hello {domain}", self.host()),
            "PIPELINING".to_string(),
            "8BITMIME".to_string(),
            format!("SIZE {}", self.shared.config.max_message_bytes),
            "ENHANCEDSTATUSCODES".to_string(),
        ];
        if self.starttls_offered() {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        let last = lines.len() - 1;
        let text: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect();
        self.reply(&text.join("\r\n")).await
    }

    async fn mail(&mut self, args: Option<&str>) -> std::io::Result<()> {
        let Some((_, esmtp)) = self.hello else {
            return self.refuse("503 5.5.1 Send EHLO or HELO first").await;
        };
        if self.tx.is_some() {
            return self.refuse("503 5.5.1 Nested MAIL command").await;
        }
        if self.shared.config.require_tls && !self.tls {
            return self
                .reply("530 5.7.0 Must issue a STARTTLS command first")
                .await;
        }
        if self.shared.config.credentials.is_some() && self.auth_user.is_none() {
            return self.reply("530 5.7.0 Authentication required").await;
        }
        let Some(rest) = args.and_then(|a| strip_prefix_ci(a, "FROM:")) else {
            return self.refuse("501 5.5.4 Syntax: MAIL FROM:<address>").await;
        };
        let Some((from, params)) = path(rest, true) else {
            return self.refuse("501 5.1.7 Bad sender address syntax").await;
        };
        let mut eight_bit = false;
        let mut seen = Vec::new();
        for p in params {
            if !esmtp {
                return self
                    .refuse("555 5.5.4 MAIL FROM parameters not recognized or not implemented (no EHLO)")
                    .await;
            }
            let (key, value) = match p.split_once('=') {
                Some((k, v)) => (k.to_ascii_uppercase(), Some(v)),
                None => (p.to_ascii_uppercase(), None),
            };
            if seen.contains(&key) {
                return self.refuse("501 5.5.4 Duplicate MAIL parameter").await;
            }
            seen.push(key.clone());
            match (key.as_str(), value) {
                ("SIZE", Some(v)) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                    if v.parse::<u64>()
                        .map_or(true, |n| n > self.shared.config.max_message_bytes as u64)
                    {
                        return self
                            .reply("552 5.3.4 Message size exceeds fixed maximum message size")
                            .await;
                    }
                }
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("7BIT") => {}
                ("BODY", Some(v)) if v.eq_ignore_ascii_case("8BITMIME") => eight_bit = true,
                ("AUTH", Some(v)) if !v.is_empty() => {}
                _ => {
                    return self
                        .refuse("555 5.5.4 MAIL FROM parameters not recognized or not implemented")
                        .await
                }
            }
        }
        self.tx = Some(Transaction {
            from,
            rcpt: Vec::new(),
            eight_bit,
        });
        self.reply("250 2.1.0 Sender OK").await
    }

    async fn rcpt(&mut self, args: Option<&str>) -> std::io::Result<()> {
        let Some(n) = self.tx.as_ref().map(|t| t.rcpt.len()) else {
            return self.refuse("503 5.5.1 Need MAIL before RCPT").await;
        };
        let Some(rest) = args.and_then(|a| strip_prefix_ci(a, "TO:")) else {
            return self.refuse("501 5.5.4 Syntax: RCPT TO:<address>").await;
        };
        let Some((to, params)) = path(rest, false) else {
            return self.refuse("501 5.1.3 Bad recipient address syntax").await;
        };
        if !params.is_empty() {
            return self
                .refuse("555 5.5.4 RCPT TO parameters not recognized or not implemented")
                .await;
        }
        if n >= MAX_RECIPIENTS {
            return self.reply("452 4.5.3 Too many recipients").await;
        }
        if let Some(t) = self.tx.as_mut() {
            t.rcpt.push(to);
        }
        self.reply("250 2.1.5 Recipient OK").await
    }

    async fn data(&mut self, args: Option<&str>) -> std::io::Result<()> {
        if args.is_some() {
            return self
                .refuse("501 5.5.4 Syntax: DATA takes no parameters")
                .await;
        }
        let Some(tx) = self.tx.take() else {
            return self.refuse("503 5.5.1 Need MAIL command").await;
        };
        if tx.rcpt.is_empty() {
            // RFC 5321 §3.3: no RCPT was accepted.
            self.tx = Some(tx);
            return self.refuse("554 5.5.1 No valid recipients").await;
        }
        self.reply("354 Start mail input; end with <CRLF>.<CRLF>")
            .await?;
        let max = self.shared.config.max_message_bytes;
        let mut raw: Vec<u8> = Vec::new();
        let (mut too_big, mut too_long, mut bare_lf) = (false, false, false);
        loop {
            let line = match tokio::time::timeout(IDLE, self.read_line(TEXT_LINE, false)).await {
                Ok(r) => r?,
                Err(_) => None,
            };
            let Some(line) = line else {
                // The connection ended (or went silent) inside DATA: no message (§4.1.1.4).
                return Ok(());
            };
            too_long |= line.too_long;
            bare_lf |= line.bare_lf;
            if line.bytes == b"." && !line.too_long {
                break;
            }
            // Dot-stuffing (§4.5.2): a leading period was doubled by the client.
            let content = line.bytes.strip_prefix(b".").unwrap_or(&line.bytes);
            if raw.len() + content.len() + 2 > max {
                too_big = true;
            } else if !too_big {
                raw.extend_from_slice(content);
                raw.extend_from_slice(b"\r\n");
            }
        }
        if bare_lf {
            return self
                .refuse("554 5.6.0 Message refused: a bare LF in its text (RFC 5321 §2.3.8)")
                .await;
        }
        if too_long {
            return self
                .refuse("554 5.6.0 Message refused: a line longer than 998 characters (RFC 5321 §4.5.3.1.6)")
                .await;
        }
        if too_big {
            return self
                .reply("552 5.3.4 Message size exceeds fixed maximum message size")
                .await;
        }
        if !tx.eight_bit && !raw.is_ascii() {
            return self
                .refuse("554 5.6.0 Message refused: 8-bit data without BODY=8BITMIME (RFC 6152)")
                .await;
        }
        match self.shared.mode() {
            SmtpMode::DeferMessages => {
                return self
                    .reply("451 4.3.0 Requested action aborted: try again later")
                    .await
            }
            SmtpMode::RejectMessages => {
                return self.reply("554 5.7.1 Message refused").await;
            }
            SmtpMode::Accept | SmtpMode::Unavailable => {}
        }
        let entity = mime::Entity::parse(&raw);
        let field = |n: &str| entity.field(n).map(mime::decode_words).unwrap_or_default();
        let mail = ReceivedMail {
            mail_from: tx.from,
            rcpt_to: tx.rcpt,
            subject: field("Subject"),
            from: field("From"),
            to: field("To"),
            body: entity.text_body().unwrap_or_default(),
            raw: String::from_utf8_lossy(&raw).into_owned(),
            auth_user: self.auth_user.clone(),
            tls: self.tls,
        };
        self.shared.accept(mail);
        self.reply("250 2.0.0 OK: message accepted").await
    }

    async fn starttls(&mut self, args: Option<&str>) -> std::io::Result<Next> {
        if self.tls {
            self.refuse("503 5.5.1 TLS already active").await?;
        } else if !self.starttls_offered() {
            self.refuse("502 5.5.1 STARTTLS not offered").await?;
        } else if args.is_some() {
            // RFC 3207 §4.
            self.refuse("501 5.5.4 Syntax error (no parameters allowed)")
                .await?;
        } else if !self.hello.as_ref().is_some_and(|(_, esmtp)| *esmtp) {
            self.refuse("503 5.5.1 Send EHLO first").await?;
        } else {
            self.reply("220 2.0.0 Ready to start TLS").await?;
            return Ok(Next::StartTls);
        }
        Ok(Next::Continue)
    }

    async fn auth(&mut self, args: Option<&str>) -> std::io::Result<Next> {
        let Some((user, password)) = self.shared.config.credentials.clone() else {
            self.refuse("502 5.5.1 AUTH not offered").await?;
            return Ok(Next::Continue);
        };
        if !self.hello.as_ref().is_some_and(|(_, esmtp)| *esmtp) {
            self.refuse("503 5.5.1 Send EHLO first").await?;
            return Ok(Next::Continue);
        }
        // RFC 4954 §4: once per session, never inside a mail transaction.
        if self.auth_user.is_some() {
            self.refuse("503 5.5.1 Already authenticated").await?;
            return Ok(Next::Continue);
        }
        if self.tx.is_some() {
            self.refuse("503 5.5.1 AUTH not permitted during a mail transaction")
                .await?;
            return Ok(Next::Continue);
        }
        let mut words = args.unwrap_or("").split(' ');
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next();
        if mechanism.is_empty() || words.next().is_some() {
            self.refuse("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
                .await?;
            return Ok(Next::Continue);
        }
        if !self.tls && !self.shared.config.auth_without_tls {
            self.reply("538 5.7.11 Encryption required for requested authentication mechanism")
                .await?;
            return Ok(Next::Continue);
        }
        let given = match mechanism.as_str() {
            "PLAIN" => {
                let Some(response) = self.sasl_response(initial, "").await? else {
                    return Ok(Next::Continue);
                };
                let mut parts = response.split(|b| *b == 0);
                match (parts.next(), parts.next(), parts.next(), parts.next()) {
                    (Some(authz), Some(authc), Some(pass), None) => {
                        // RFC 4616 §2: acting as another identity is not allowed here.
                        let authz_ok = authz.is_empty() || authz == authc;
                        authz_ok.then(|| (authc.to_vec(), pass.to_vec()))
                    }
                    _ => {
                        self.refuse("501 5.5.2 Malformed PLAIN message (RFC 4616 §2)")
                            .await?;
                        return Ok(Next::Continue);
                    }
                }
            }
            "LOGIN" => {
                let Some(u) = self.sasl_response(initial, "Username:").await? else {
                    return Ok(Next::Continue);
                };
                let Some(p) = self.sasl_response(None, "Password:").await? else {
                    return Ok(Next::Continue);
                };
                Some((u, p))
            }
            _ => {
                self.refuse("504 5.5.4 Unrecognized authentication type")
                    .await?;
                return Ok(Next::Continue);
            }
        };
        match given {
            Some((u, p)) if u == user.as_bytes() && p == password.as_bytes() => {
                self.auth_user = Some(user);
                self.reply("235 2.7.0 Authentication successful").await?;
            }
            _ => {
                self.auth_failures += 1;
                self.reply("535 5.7.8 Authentication credentials invalid")
                    .await?;
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    self.reply(
                        "421 4.7.0 Too many failed authentications, closing transmission channel",
                    )
                    .await?;
                    return Ok(Next::Close);
                }
            }
        }
        Ok(Next::Continue)
    }

    /// One SASL response: the initial response (`=` is an empty one, RFC 4954 §4), or the
    /// answer to a `334` challenge. `None` when cancelled (`*`), undecodable (both answered
    /// here) or the connection ended.
    async fn sasl_response(
        &mut self,
        initial: Option<&str>,
        challenge: &str,
    ) -> std::io::Result<Option<Vec<u8>>> {
        let text = match initial {
            Some(i) => i.to_string(),
            None => {
                let c = base64::engine::general_purpose::STANDARD.encode(challenge);
                self.reply(&format!("334 {c}")).await?;
                let Some(line) = self.read_line(AUTH_LINE, true).await? else {
                    return Ok(None);
                };
                if line.too_long || line.bare_lf {
                    self.refuse("500 5.5.2 Line too long or not ended by CRLF")
                        .await?;
                    return Ok(None);
                }
                String::from_utf8_lossy(&line.bytes).into_owned()
            }
        };
        if text == "*" {
            // RFC 4954 §4: the server MUST reject the AUTH command with 501.
            self.reply("501 5.7.0 Authentication cancelled").await?;
            return Ok(None);
        }
        if text == "=" && initial.is_some() {
            return Ok(Some(Vec::new()));
        }
        match base64::engine::general_purpose::STANDARD.decode(text.as_bytes()) {
            Ok(b) => Ok(Some(b)),
            Err(_) => {
                self.refuse("501 5.5.2 Cannot decode response").await?;
                Ok(None)
            }
        }
    }
}

fn strip_prefix_ci<'s>(s: &'s str, prefix: &str) -> Option<&'s str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// `<path> [SP param]*` right after `FROM:` / `TO:` (no space before the path, RFC 5321
/// §4.1.2: `"MAIL FROM:" Reverse-path`). The address without brackets and a source route
/// (`@a,@b:`, to be ignored, §4.1.2), and the parameters. The null path `<>` only where
/// `null_ok` (a reverse-path); `<Postmaster>` is a valid forward-path (§4.5.1).
fn path(s: &str, null_ok: bool) -> Option<(String, Vec<&str>)> {
    let inner = s.strip_prefix('<')?;
    let end = inner.find('>')?;
    let addr = &inner[..end];
    let rest = &inner[end + 1..];
    let params: Vec<&str> = if rest.is_empty() {
        Vec::new()
    } else {
        let rest = rest.strip_prefix(' ')?;
        rest.split(' ').collect()
    };
    if params.iter().any(|p| p.is_empty()) {
        return None;
    }
    let addr = match addr.split_once(':') {
        Some((route, a)) if route.starts_with('@') => a,
        _ => addr,
    };
    if addr.is_empty() {
        return null_ok.then(|| (String::new(), params));
    }
    if !null_ok && addr.eq_ignore_ascii_case("postmaster") {
        return Some((addr.to_string(), params));
    }
    let (local, domain) = addr.rsplit_once('@')?;
    let quoted = local.len() >= 2 && local.starts_with('"') && local.ends_with('"');
    let local_ok = quoted
        || (!local.is_empty()
            && !local.starts_with('.')
            && !local.ends_with('.')
            && !local.contains("..")
            && local
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~.".contains(&b)));
    let domain_ok = (domain.starts_with('[') && domain.ends_with(']'))
        || (!domain.is_empty()
            && domain.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && !l.ends_with('-')
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }));
    (local_ok && domain_ok).then(|| (addr.to_string(), params))
}
