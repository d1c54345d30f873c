//! Small text helpers shared by every layer: clipping for logs and reports, and the shape
//! checks that decide whether a string may be an Entra object id or a local host.

use std::net::IpAddr;

/// `s` cut to at most `max` characters, the last being `…` when cut.
pub(crate) fn clip(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Whether `s` has the 8-4-4-4-12 hex form of a GUID, the form Entra gives object ids,
/// client ids and tenant ids.
pub(crate) fn is_guid(s: &str) -> bool {
    s.len() == 36
        && s.chars().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Whether a URL host names this machine: `localhost`, or a loopback IP address
/// (`127.0.0.0/8`, `::1`, IPv6 written in brackets or not).
pub(crate) fn is_loopback_host(host: &str) -> bool {
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Percent-encodes one path segment or query value (RFC 3986 unreserved characters stay).
pub(crate) fn urlencode(s: &str) -> String {
    const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, SEGMENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_text_and_marks_a_cut() {
        assert_eq!(clip("abc", 3), "abc");
        assert_eq!(clip("abcd", 3), "ab…");
        assert_eq!(clip("ééééé", 4).chars().count(), 4);
        assert_eq!(clip("abc", 0), "…");
    }

    #[test]
    fn guids_are_recognised_by_shape() {
        assert!(is_guid("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert!(is_guid("0F8FAD5B-D9CB-469F-A165-70867728950E"));
        assert!(!is_guid("0f8fad5bd9cb469fa16570867728950e0000"));
        assert!(!is_guid("0f8fad5b-d9cb-469f-a165-70867728950"));
        assert!(!is_guid("0f8fad5b-d9cb-469f-a165-70867728950g"));
        assert!(!is_guid("contoso.onmicrosoft.com"));
        assert!(!is_guid("------------------------------------"));
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "10.0.0.1",
            "example.com",
            "localhost.example.com",
            "[::2]",
            "",
            "0.0.0.0",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
    }
}
