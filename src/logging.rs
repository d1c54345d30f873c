//! Log hygiene: text from outside (a webhook body, a URL path, a remote's error) is escaped
//! before it reaches a log line, so it can neither start a new line nor hide in terminal control
//! sequences, and only a short excerpt of it is ever kept.
//!
//! Two layers:
//! - [`Esc`] and [`excerpt`] for the call sites that log input (the webhook above all);
//! - [`TextFields`], the field formatter of the text log format (`src/main.rs`), escapes every
//!   field value and message of every event and span, whatever the call site did. The JSON
//!   format needs no help: JSON strings escape control characters themselves.

use std::fmt::{self, Write as _};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::Writer;

/// Whether `c` must not appear raw in a text log line: C0 and C1 controls (newline, carriage
/// return, escape, …), DEL, and the Unicode line and paragraph separators and bidirectional
/// overrides that some viewers treat as line breaks or use to reorder text.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// Writes `s` with every character of [`needs_escape`] replaced by `\n`, `\r`, `\t` or
/// `\u{…}`.
fn write_escaped(out: &mut dyn fmt::Write, s: &str) -> fmt::Result {
    let mut rest = s;
    while let Some((i, c)) = rest.char_indices().find(|(_, c)| needs_escape(*c)) {
        out.write_str(&rest[..i])?;
        match c {
            '\n' => out.write_str("\\n")?,
            '\r' => out.write_str("\\r")?,
            '\t' => out.write_str("\\t")?,
            c => write!(out, "\\u{{{:x}}}", c as u32)?,
        }
        rest = &rest[i + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// `s` escaped for a log line (see [`Esc`]).
pub(crate) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let _ = write_escaped(&mut out, s);
    out
}

/// Displays a string with control characters escaped: `tracing::warn!(path = %Esc(p), …)`.
pub(crate) struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0)
    }
}

/// At most `max_chars` characters of `s`, escaped, with `…` when something was cut: what may be
/// quoted of input in a log line or an error message.
pub(crate) fn excerpt(s: &str, max_chars: usize) -> String {
    let mut cut = s.char_indices().nth(max_chars).map(|(i, _)| i);
    if cut == Some(s.len()) {
        cut = None;
    }
    let mut out = escape(&s[..cut.unwrap_or(s.len())]);
    if cut.is_some() {
        out.push('…');
    }
    out
}

/// The text format's field formatter: `name=value` pairs separated by spaces, the message
/// without a name, every value escaped. Used for event and span fields alike.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextFields;

impl<'w> MakeVisitor<Writer<'w>> for TextFields {
    type Visitor = TextVisitor<'w>;

    fn make_visitor(&self, target: Writer<'w>) -> Self::Visitor {
        TextVisitor {
            writer: target,
            first: true,
            result: Ok(()),
        }
    }
}

pub struct TextVisitor<'w> {
    writer: Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl TextVisitor<'_> {
    fn field(&mut self, field: &Field, value: fmt::Arguments<'_>) {
        if self.result.is_err() {
            return;
        }
        // Formatting into a buffer first: the escape must see the whole value.
        let mut text = String::new();
        if text.write_fmt(value).is_err() {
            self.result = Err(fmt::Error);
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let name = field.name();
        let w = &mut self.writer;
        self.result = (|| {
            w.write_str(sep)?;
            if name != "message" {
                // `r#type` and the like are declared with a raw prefix.
                write!(w, "{}=", name.strip_prefix("r#").unwrap_or(name))?;
            }
            write_escaped(w, &text)
        })();
    }
}

impl Visit for TextVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.field(field, format_args!("{value}"));
        } else {
            self.field(field, format_args!("{value:?}"));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, format_args!("{value:?}"));
    }
}

impl VisitOutput<fmt::Result> for TextVisitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for TextVisitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn escape_replaces_every_line_breaking_or_control_character() {
        assert_eq!(escape("plain text"), "plain text");
        assert_eq!(escape("a\nb\rc\td"), "a\\nb\\rc\\td");
        assert_eq!(escape("\u{1b}[31mred"), "\\u{1b}[31mred");
        assert_eq!(
            escape("x\u{2028}y\u{85}z\u{7f}"),
            "x\\u{2028}y\\u{85}z\\u{7f}"
        );
        assert_eq!(escape("ünïcödé ok"), "ünïcödé ok");
        assert_eq!(Esc("a\nb").to_string(), "a\\nb");
    }

    #[test]
    fn excerpt_cuts_on_characters_and_marks_the_cut() {
        assert_eq!(excerpt("abc", 3), "abc");
        assert_eq!(excerpt("abcd", 3), "abc…");
        assert_eq!(excerpt("ééééé", 2), "éé…");
        assert_eq!(excerpt("a\nbcdef", 3), "a\\nb…");
        assert_eq!(excerpt("", 3), "");
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the text format prints for `f`'s events.
    fn text_log(f: impl FnOnce()) -> String {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .fmt_fields(TextFields)
            .with_writer(move || out.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buf.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn text_format_keeps_each_event_on_one_line() {
        let forged = "x\n2030-01-01T00:00:00Z  INFO rostersync: admin logged in\r";
        let log = text_log(|| {
            let span = tracing::info_span!("integration", integration = %forged);
            let _e = span.enter();
            tracing::warn!(display = %forged, debug = ?forged, plain = forged, "msg {forged}");
        });
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(log.ends_with('\n'));
        assert!(!log.contains('\r'));
        assert!(log.contains("display=x\\n2030"), "{log}");
        assert!(log.contains("msg x\\n2030"), "{log}");
        assert!(log.contains("integration{integration=x\\n2030"), "{log}");
    }

    /// Control: the default field formatter lets the same event span two lines, which is what
    /// `TextFields` is for.
    #[test]
    fn default_text_format_would_split_the_line() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(display = %"a\nforged line", "m");
        });
        let log = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(log.lines().count(), 2, "{log}");
    }
}
