//! Reading an accepted message (RFC 5322 with MIME, RFC 2045–2047) far enough for
//! assertions: unfolded header fields, `Subject` with its encoded-words decoded, and the first
//! `text/plain` part with its transfer encoding (7bit, 8bit, quoted-printable, base64) and
//! charset (UTF-8, US-ASCII, ISO-8859-1) undone. Multipart bodies are searched part by part.
//! Anything it cannot read is kept as it came, never an error: the raw message is stored too.

use base64::Engine as _;

/// How deep nested multiparts are followed.
const MAX_DEPTH: usize = 8;

/// The header fields (names as written, values unfolded) and the body of one entity.
pub(super) struct Entity<'a> {
    pub fields: Vec<(String, String)>,
    pub body: &'a [u8],
}

impl<'a> Entity<'a> {
    /// Splits header from body at the first empty line (CRLF CRLF; a message without body
    /// is all header).
    pub fn parse(raw: &'a [u8]) -> Entity<'a> {
        let (head, body): (&[u8], &[u8]) = if raw.starts_with(b"\r\n") {
            (&[], &raw[2..])
        } else {
            match find(raw, b"\r\n\r\n") {
                Some(i) => (&raw[..i], &raw[i + 4..]),
                None => (raw, &[]),
            }
        };
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in String::from_utf8_lossy(head).split("\r\n") {
            if line.starts_with([' ', '\t']) {
                // Folding (RFC 5322 §2.2.3): the CRLF goes, the whitespace stays.
                if let Some((_, v)) = fields.last_mut() {
                    v.push_str(line);
                }
            } else if let Some((name, value)) = line.split_once(':') {
                fields.push((name.trim().to_string(), value.trim_start().to_string()));
            }
        }
        for (_, v) in &mut fields {
            *v = v.trim_end().to_string();
        }
        Entity { fields, body }
    }

    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `type/subtype` in lower case (RFC 2045 §5.2: `text/plain` when absent) and the
    /// parameters.
    fn content_type(&self) -> (String, Vec<(String, String)>) {
        match self.field("Content-Type") {
            Some(v) => {
                let mut parts = split_params(v);
                let kind = parts.remove(0).0.to_ascii_lowercase();
                (kind, parts)
            }
            None => (
                "text/plain".into(),
                vec![("charset".into(), "us-ascii".into())],
            ),
        }
    }

    /// The first `text/plain` content, decoded; `None` when there is none.
    pub fn text_body(&self) -> Option<String> {
        self.text_body_at(0)
    }

    fn text_body_at(&self, depth: usize) -> Option<String> {
        let (kind, params) = self.content_type();
        let param = |name: &str| {
            params
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        if kind.starts_with("multipart/") {
            if depth >= MAX_DEPTH {
                return None;
            }
            let boundary = param("boundary")?;
            return multipart_parts(self.body, boundary)
                .into_iter()
                .find_map(|p| Entity::parse(p).text_body_at(depth + 1));
        }
        if kind != "text/plain" {
            return None;
        }
        let cte = self
            .field("Content-Transfer-Encoding")
            .unwrap_or("7bit")
            .trim()
            .to_ascii_lowercase();
        let bytes = match cte.as_str() {
            "quoted-printable" => quoted_printable(self.body),
            "base64" => {
                let clean: Vec<u8> = self
                    .body
                    .iter()
                    .copied()
                    .filter(|b| !b.is_ascii_whitespace())
                    .collect();
                base64::engine::general_purpose::STANDARD
                    .decode(clean)
                    .unwrap_or_else(|_| self.body.to_vec())
            }
            _ => self.body.to_vec(),
        };
        Some(charset_decode(
            &bytes,
            param("charset").unwrap_or("us-ascii"),
        ))
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// `value; name=value; name="quoted value"` → the value first (name only), then the
/// parameters.
fn split_params(v: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in v.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ';' if !quoted => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    for (i, p) in parts.iter().enumerate() {
        let p = p.trim();
        if i == 0 {
            out.push((p.to_string(), String::new()));
        } else if let Some((n, v)) = p.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            out.push((n.trim().to_string(), v.replace("\\\"", "\"")));
        }
    }
    out
}

/// The body parts between `--boundary` lines (RFC 2046 §5.1.1), preamble and epilogue left out.
fn multipart_parts<'a>(body: &'a [u8], boundary: &str) -> Vec<&'a [u8]> {
    let delim = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut start: Option<usize> = None;
    let mut pos = 0;
    while pos <= body.len() {
        let end = find(&body[pos..], b"\r\n").map_or(body.len(), |i| pos + i);
        let line = &body[pos..end];
        if line.starts_with(delim.as_bytes()) {
            let rest = &line[delim.len()..];
            let closing = rest.starts_with(b"--");
            if rest.iter().all(|b| *b == b' ' || *b == b'\t') || closing {
                if let Some(s) = start {
                    // The CRLF before the delimiter belongs to it.
                    parts.push(&body[s..pos.saturating_sub(2).max(s)]);
                }
                if closing {
                    return parts;
                }
                start = Some((end + 2).min(body.len()));
            }
        }
        pos = end + 2;
    }
    parts
}

/// RFC 2045 §6.7: `=XX` octets and soft line breaks (`=` at the end of a line).
fn quoted_printable(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let b = body[i];
        if b == b'=' {
            if body[i + 1..].starts_with(b"\r\n") {
                i += 3;
                continue;
            }
            let hex = body.get(i + 1..i + 3).and_then(|h| {
                std::str::from_utf8(h)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            });
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    out
}

fn charset_decode(bytes: &[u8], charset: &str) -> String {
    match charset.trim().to_ascii_lowercase().as_str() {
        "iso-8859-1" | "latin1" | "iso_8859-1" => bytes.iter().map(|b| char::from(*b)).collect(),
        _ => String::from_utf8_lossy(bytes).into_owned(),
    }
}

/// An unstructured field's text with RFC 2047 encoded-words (`=?charset?B|Q?text?=`)
/// decoded; whitespace between two adjacent encoded-words is dropped (§6.2).
pub(super) fn decode_words(v: &str) -> String {
    let mut out = String::new();
    let mut rest = v;
    let mut last_was_word = false;
    while !rest.is_empty() {
        let Some(start) = rest.find("=?") else {
            out.push_str(rest);
            break;
        };
        let (before, from) = rest.split_at(start);
        match encoded_word(from) {
            Some((text, len)) => {
                if !(last_was_word && before.chars().all(char::is_whitespace)) {
                    out.push_str(before);
                }
                out.push_str(&text);
                rest = &from[len..];
                last_was_word = true;
            }
            None => {
                out.push_str(before);
                out.push_str("=?");
                rest = &from[2..];
                last_was_word = false;
            }
        }
    }
    out
}

/// One encoded-word at the start of `s`: its text and its length.
fn encoded_word(s: &str) -> Option<(String, usize)> {
    let inner = s.strip_prefix("=?")?;
    let (charset, inner) = inner.split_once('?')?;
    let (enc, inner) = inner.split_once('?')?;
    let end = inner.find("?=")?;
    let text = &inner[..end];
    if text.contains(char::is_whitespace) || charset.is_empty() {
        return None;
    }
    let len = 2 + charset.len() + 1 + enc.len() + 1 + end + 2;
    // RFC 2231 §5: `charset*language`.
    let charset = charset.split('*').next().unwrap_or(charset);
    let bytes = match enc {
        "B" | "b" => base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?,
        "Q" | "q" => quoted_printable(text.replace('_', " ").as_bytes()),
        _ => return None,
    };
    Some((charset_decode(&bytes, charset), len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_unfolded_and_their_encoded_words_decoded() {
        let raw = b"Subject: =?utf-8?b?w6l0w6k=?=\r\n =?utf-8?q?_=E2=80=A6_done?= now\r\nTo: a@b\r\n\r\nhi\r\n";
        let e = Entity::parse(raw);
        assert_eq!(decode_words(e.field("subject").unwrap()), "été … done now");
        assert_eq!(decode_words("plain =?x?z?y?= text"), "plain =?x?z?y?= text");
        assert_eq!(e.text_body().unwrap(), "hi\r\n");
    }

    #[test]
    fn bodies_lose_their_transfer_encoding() {
        let qp = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\nli=\r\nne =E2=80=A6 and 3=3D3\r\n";
        assert_eq!(
            Entity::parse(qp).text_body().unwrap(),
            "line \u{2026} and 3=3\r\n"
        );
        let b64 = b"Content-Type: text/plain; charset=\"utf-8\"\r\nContent-Transfer-Encoding: base64\r\n\r\nw6l0\r\nw6k=\r\n";
        assert_eq!(Entity::parse(b64).text_body().unwrap(), "été");
        let latin = b"Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n\xe9t\xe9";
        assert_eq!(Entity::parse(latin).text_body().unwrap(), "été");
    }

    #[test]
    fn the_text_part_of_a_multipart_message_is_found() {
        let raw = b"Content-Type: multipart/alternative; boundary=\"b 1\"\r\n\r\npreamble\r\n--b 1\r\nContent-Type: text/html\r\n\r\n<p>x</p>\r\n--b 1\r\nContent-Type: text/plain\r\n\r\nthe text\r\n--b 1--\r\nepilogue\r\n";
        assert_eq!(Entity::parse(raw).text_body().unwrap(), "the text");
        let none = b"Content-Type: image/png\r\n\r\nxx";
        assert!(Entity::parse(none).text_body().is_none());
    }
}
