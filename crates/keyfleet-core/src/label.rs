//! Names that clients choose and operators read: node ids and regions are a small safe
//! alphabet, and any other untrusted string is escaped before it reaches a log or a terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

/// Longest node id or region.
pub const MAX_LABEL_LEN: usize = 128;

/// Whether `label` is a valid node id or region: `[A-Za-z0-9._:-]{1,128}`.
pub fn is_valid_label(label: &str) -> bool {
    (1..=MAX_LABEL_LEN).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

/// `text` with every control character (C0, DEL, C1, and the Unicode line and paragraph
/// separators) written as `\u{..}`, and backslashes doubled, so it cannot forge a log line or
/// drive a terminal. Borrowed when there is nothing to escape.
pub fn escape_untrusted(text: &str) -> Cow<'_, str> {
    let needs = |c: char| c == '\\' || c.is_control() || matches!(c, '\u{2028}' | '\u{2029}');
    if !text.chars().any(needs) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else if needs(c) {
            let _ = write!(out, "\\u{{{:x}}}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        for ok in ["eu-1", "a", "node_7.eu:west", &"x".repeat(128)] {
            assert!(is_valid_label(ok), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "a\nERROR",
            "é",
            "a/b",
            "a\u{1b}[31m",
            &"x".repeat(129),
        ] {
            assert!(!is_valid_label(bad), "{bad:?}");
        }
    }

    #[test]
    fn escapes_control_characters() {
        assert!(matches!(escape_untrusted("plain text"), Cow::Borrowed(_)));
        assert_eq!(
            escape_untrusted("a\nERROR x\r\u{1b}[2J\u{7f}\u{85}\u{2028}\\"),
            "a\\u{a}ERROR x\\u{d}\\u{1b}[2J\\u{7f}\\u{85}\\u{2028}\\\\"
        );
    }
}
