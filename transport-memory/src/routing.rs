//! Routing rules of the exchange types, written to match RabbitMQ 3.10.
//!
//! - Topic: keys and patterns are split on `.`; the empty key is zero words,
//!   `"a."` is the two words `"a"` and `""`; `*` matches exactly one word
//!   (an empty word counts), `#` matches zero or more words.
//! - Headers: `x-match` is `all` (default), `any`, `all-with-x` or
//!   `any-with-x`; with `all`/`any`, binding keys starting with `x-` are
//!   ignored; a binding value of type void matches the mere presence of the
//!   header; otherwise the types must be of the same class (every integer
//!   width is one class, both float widths another) and the values equal.

use switchyard_core::{HeaderValue, Headers};

/// Splits a routing key or binding pattern into words, RabbitMQ's way.
pub(crate) fn split_words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

/// A compiled topic pattern: its words, with runs of `#` collapsed to one.
#[derive(Debug, Clone)]
pub(crate) struct TopicPattern {
    words: Vec<Box<str>>,
}

impl TopicPattern {
    /// Compiles `pattern`.
    pub(crate) fn new(pattern: &str) -> Self {
        let mut words: Vec<Box<str>> = Vec::new();
        for w in split_words(pattern) {
            if w == "#" && words.last().is_some_and(|l| &**l == "#") {
                continue;
            }
            words.push(w.into());
        }
        TopicPattern { words }
    }

    /// True if the key, already split into `words`, matches.
    pub(crate) fn matches(&self, words: &[&str]) -> bool {
        match_words(&self.words, words)
    }
}

fn match_words(pat: &[Box<str>], key: &[&str]) -> bool {
    match pat.split_first() {
        None => key.is_empty(),
        Some((p, rest)) if &**p == "#" => {
            if rest.is_empty() {
                return true;
            }
            (0..=key.len()).any(|i| match_words(rest, &key[i..]))
        }
        Some((p, rest)) => match key.split_first() {
            None => false,
            Some((k, krest)) => (&**p == "*" || &**p == *k) && match_words(rest, krest),
        },
    }
}

/// True if `key` matches topic `pattern` (convenience for tests).
#[cfg(test)]
pub(crate) fn topic_matches(pattern: &str, key: &str) -> bool {
    TopicPattern::new(pattern).matches(&split_words(key))
}

/// The `x-match` mode of a headers binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

/// A compiled headers binding.
#[derive(Debug, Clone)]
pub(crate) struct HeadersPattern {
    mode: XMatch,
    args: Vec<(String, HeaderValue)>,
}

impl HeadersPattern {
    /// Compiles binding arguments; an unknown `x-match` value is an error
    /// message (RabbitMQ refuses the binding with 406).
    pub(crate) fn new(args: &Headers) -> Result<Self, String> {
        let mode = match args.get("x-match") {
            None => XMatch::All,
            Some(HeaderValue::String(s)) => match s.as_str() {
                "all" => XMatch::All,
                "any" => XMatch::Any,
                "all-with-x" => XMatch::AllWithX,
                "any-with-x" => XMatch::AnyWithX,
                other => {
                    return Err(format!(
                        "invalid x-match field value '{other}'; expected all, any, all-with-x, or any-with-x"
                    ))
                }
            },
            Some(other) => return Err(format!("invalid x-match field value {other:?}")),
        };
        let with_x = matches!(mode, XMatch::AllWithX | XMatch::AnyWithX);
        let args = args
            .iter()
            .filter(|(k, _)| k.as_str() != "x-match" && (with_x || !k.starts_with("x-")))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(HeadersPattern { mode, args })
    }

    /// True if a message with `headers` matches.
    pub(crate) fn matches(&self, headers: &Headers) -> bool {
        let one = |(k, pv): &(String, HeaderValue)| match headers.get(k) {
            None => false,
            Some(dv) => value_matches(pv, dv),
        };
        match self.mode {
            XMatch::All | XMatch::AllWithX => self.args.iter().all(one),
            XMatch::Any | XMatch::AnyWithX => self.args.iter().any(one),
        }
    }
}

/// A number of any width as `f64` (exact for every integer up to 2^53;
/// larger ones fall back to an `i64` comparison below).
fn as_number(v: &HeaderValue) -> Option<f64> {
    match *v {
        HeaderValue::F32(f) => Some(f as f64),
        HeaderValue::F64(f) => Some(f),
        HeaderValue::Timestamp(_) => None,
        _ => v.as_i64().map(|i| i as f64),
    }
}

fn as_text(v: &HeaderValue) -> Option<&[u8]> {
    match v {
        HeaderValue::String(s) => Some(s.as_bytes()),
        HeaderValue::Bytes(b) => Some(b),
        _ => None,
    }
}

/// RabbitMQ's comparison of a binding value `p` with a message header `d`
/// (observed on 3.10): void matches any value; numbers compare by value
/// whatever their width, integer or float; strings and byte arrays compare
/// by content; anything else must be equal and of the same type.
pub(crate) fn value_matches(p: &HeaderValue, d: &HeaderValue) -> bool {
    if matches!(p, HeaderValue::Void) {
        return true;
    }
    if let (Some(a), Some(b)) = (
        p.as_i64().filter(|_| !matches!(p, HeaderValue::Timestamp(_))),
        d.as_i64(),
    ) {
        if !matches!(d, HeaderValue::Timestamp(_)) {
            return a == b;
        }
    }
    if let (Some(a), Some(b)) = (as_number(p), as_number(d)) {
        return a == b;
    }
    if let (Some(a), Some(b)) = (as_text(p), as_text(d)) {
        return a == b;
    }
    p == d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_corner_cases_match_rabbitmq() {
        // (pattern, key, expected)
        let cases = [
            ("#", "", true),
            ("#", "a", true),
            ("#", "a.b.c", true),
            ("*", "", false),
            ("*", "a", true),
            ("*", "a.b", false),
            ("*", ".", false),
            ("*.*", ".", true),
            ("a.*", "a.", true),
            ("a.*", "a", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("a.#", "ab", false),
            ("#.a", "a", true),
            ("#.a", "b.a", true),
            ("#.a", "b.a.c", false),
            ("a.#.b", "a.b", true),
            ("a.#.b", "a.x.y.b", true),
            ("a.#.b", "a.x.y", false),
            ("", "", true),
            ("", "a", false),
            ("a", "", false),
            ("#.#", "", true),
            ("#.*", "", false),
            ("#.*", "a.b", true),
            ("*.#", "a", true),
            ("a.*.c", "a..c", true),
            ("a.b", "a.b", true),
            ("a.b", "a.b.", false),
            ("session.*", "session.created", true),
            ("session.*", "session.created.v2", false),
        ];
        for (p, k, want) in cases {
            assert_eq!(topic_matches(p, k), want, "pattern {p:?} key {k:?}");
        }
    }

    #[test]
    fn split_words_counts_empty_words() {
        assert_eq!(split_words(""), Vec::<&str>::new());
        assert_eq!(split_words("a."), vec!["a", ""]);
        assert_eq!(split_words("."), vec!["", ""]);
    }

    fn pat(args: &[(&str, HeaderValue)]) -> HeadersPattern {
        let h: Headers = args.iter().cloned().collect();
        HeadersPattern::new(&h).unwrap()
    }

    #[test]
    fn headers_all_any_and_x_keys() {
        let p = pat(&[("x-match", "all".into()), ("a", "1".into()), ("b", "2".into())]);
        let m: Headers = [("a", "1"), ("b", "2"), ("c", "3")].into_iter().collect();
        assert!(p.matches(&m));
        let m2: Headers = [("a", "1")].into_iter().collect();
        assert!(!p.matches(&m2));
        let any = pat(&[("x-match", "any".into()), ("a", "1".into()), ("b", "2".into())]);
        assert!(any.matches(&m2));
        assert!(!any.matches(&Headers::new()));
        // x- keys are ignored by all/any, but count with all-with-x.
        let p = pat(&[("x-match", "all".into()), ("x-tenant", "acme".into())]);
        assert!(p.matches(&Headers::new()));
        let p = pat(&[("x-match", "all-with-x".into()), ("x-tenant", "acme".into())]);
        assert!(!p.matches(&Headers::new()));
        let m: Headers = [("x-tenant", "acme")].into_iter().collect();
        assert!(p.matches(&m));
        let p = pat(&[("x-match", "any-with-x".into()), ("x-tenant", "acme".into())]);
        assert!(p.matches(&m));
        assert!(HeadersPattern::new(&[("x-match", "some")].into_iter().collect()).is_err());
    }

    #[test]
    fn headers_value_types_compare_like_rabbitmq() {
        assert!(value_matches(&HeaderValue::I8(5), &HeaderValue::I64(5)));
        assert!(value_matches(&HeaderValue::U32(5), &HeaderValue::I16(5)));
        assert!(!value_matches(&HeaderValue::I32(5), &HeaderValue::I32(6)));
        assert!(!value_matches(&"5".into(), &HeaderValue::I32(5)));
        assert!(!value_matches(&HeaderValue::I32(5), &"5".into()));
        assert!(value_matches(&HeaderValue::Void, &"anything".into()));
        assert!(value_matches(&HeaderValue::F32(1.5), &HeaderValue::F64(1.5)));
        assert!(value_matches(&HeaderValue::I32(1), &HeaderValue::F64(1.0)));
        assert!(value_matches(&HeaderValue::F64(1.0), &HeaderValue::U8(1)));
        assert!(!value_matches(&HeaderValue::I32(2), &HeaderValue::I64((1 << 32) + 2)));
        assert!(value_matches(
            &"1".into(),
            &HeaderValue::Bytes(bytes::Bytes::from_static(b"1"))
        ));
        assert!(value_matches(
            &HeaderValue::Bytes(bytes::Bytes::from_static(b"1")),
            &"1".into()
        ));
        assert!(value_matches(&HeaderValue::Bool(true), &HeaderValue::Bool(true)));
        assert!(!value_matches(&HeaderValue::Bool(true), &HeaderValue::Bool(false)));
        assert!(!value_matches(&HeaderValue::Bool(true), &HeaderValue::I8(1)));
        assert!(!value_matches(&HeaderValue::Timestamp(5), &HeaderValue::I64(5)));
        // Void binding value: presence only.
        let p = pat(&[("flag", HeaderValue::Void)]);
        let m: Headers = [("flag", 0i32)].into_iter().collect();
        assert!(p.matches(&m));
        assert!(!p.matches(&Headers::new()));
    }
}
