//! Codecs turn payloads into message bodies and back.
//!
//! [`Codec`] is object-safe: it encodes any `Serialize` value and decodes into
//! any `Deserialize` type through erased-serde, so a `dyn Codec` can be chosen
//! at run time and stored beside a `dyn Publisher`.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::message::Message;

/// The content type the JSON codec writes.
pub const APPLICATION_JSON: &str = "application/json";

/// An object-safe body codec.
pub trait Codec: Send + Sync {
    /// The MIME type written into `content_type`.
    fn content_type(&self) -> &'static str;

    /// True if a message with this `content_type` can be decoded by this
    /// codec. A missing content type is accepted.
    fn accepts(&self, content_type: Option<&str>) -> bool;

    /// Serializes `value` into a body.
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Bytes>;

    /// Deserializes `body` into `out` (a seed built by [`decode_with`]).
    fn decode_erased(
        &self,
        body: &[u8],
        visit: &mut dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<()>,
    ) -> Result<()>;

    /// Encodes `value` as a message with this codec's content type.
    fn encode_message(&self, value: &dyn erased_serde::Serialize) -> Result<Message> {
        Ok(Message::new(self.encode(value)?).with_content_type(self.content_type()))
    }
}

/// Decodes `message` into `T` with `codec`, checking its content type first.
///
/// A wrong content type, a content encoding still applied (decompress first)
/// or a malformed body is [`Error::DecodeFailed`] with the reason.
///
/// A `content_encoding` for which [`is_identity_encoding`] is true (empty,
/// `identity`, or a charset such as `utf-8`) means "not compressed".
///
/// Error messages never quote the body: a value that does not fit `T` is
/// described by its kind and the expected type (`invalid type: string,
/// expected u64`), never by its text.
pub fn decode_with<T: DeserializeOwned>(codec: &dyn Codec, message: &Message) -> Result<T> {
    check_decodable(codec, message)?;
    let mut out: Option<T> = None;
    codec.decode_erased(&message.body, &mut |de| {
        out = Some(erased_serde::deserialize::<T>(de).map_err(|e| Error::decode(data_error_text(&e.to_string())))?);
        Ok(())
    })?;
    out.ok_or_else(|| Error::decode("codec produced no value"))
}

/// The content type and content encoding checks of [`decode_with`].
fn check_decodable(codec: &dyn Codec, message: &Message) -> Result<()> {
    let ct = message.properties.content_type.as_deref();
    if !codec.accepts(ct) {
        return Err(Error::decode(format!(
            "content type '{}' is not {}",
            ct.unwrap_or_default(),
            codec.content_type()
        )));
    }
    if let Some(enc) = message.properties.content_encoding.as_deref() {
        if !is_identity_encoding(enc) {
            return Err(Error::decode(format!(
                "body has content encoding '{enc}': add the decompression layer before decoding"
            )));
        }
    }
    Ok(())
}

/// True when a `content_encoding` value means the body is **not**
/// compressed: absent-like (empty or blank), `identity`, or a charset or
/// transfer label some publishers put there — `utf-8`, `utf8`, `binary`,
/// `7bit`, `8bit` (kombu/Celery and pika publishers set `utf-8`).
/// Case-insensitive; surrounding whitespace is ignored.
///
/// Decoders and the decompression layer treat such messages as plain bodies
/// instead of failing on an "unknown encoding".
///
/// ```
/// use switchyard_core::codec::is_identity_encoding;
/// assert!(is_identity_encoding("UTF-8"));
/// assert!(is_identity_encoding(""));
/// assert!(!is_identity_encoding("gzip"));
/// ```
pub fn is_identity_encoding(content_encoding: &str) -> bool {
    let e = content_encoding.trim();
    e.is_empty()
        || ["identity", "utf-8", "utf8", "binary", "7bit", "8bit"]
            .iter()
            .any(|i| e.eq_ignore_ascii_case(i))
}

/// Strips serde_json's `" at line L column C"` suffix.
fn strip_position(msg: &str) -> &str {
    match msg.rfind(" at line ") {
        Some(i)
            if msg[i + 9..].split_once(" column ").is_some_and(|(l, c)| {
                !l.is_empty() && !c.is_empty() && l.bytes().chain(c.bytes()).all(|b| b.is_ascii_digit())
            }) =>
        {
            &msg[..i]
        }
        _ => msg,
    }
}

/// A deserialization error's text without any value taken from the body.
///
/// serde's standard messages quote the offending value (`invalid type:
/// string "4111…", expected u64`, ``unknown field `x` ``); only their kind,
/// the unexpected value's category and the expected type are kept. Messages
/// that cannot be recognised (custom ones may embed anything) become a
/// generic text.
fn data_error_text(msg: &str) -> String {
    let msg = strip_position(msg);
    const GENERIC: &str = "the body does not match the expected type";
    // Field names come from the target type, not from the body.
    if msg.starts_with("missing field `") || msg.starts_with("duplicate field `") {
        if msg.matches('`').count() == 2 {
            return msg.to_owned();
        }
        return GENERIC.to_owned();
    }
    let Some(i) = msg.rfind(", expected ") else {
        return GENERIC.to_owned();
    };
    let (head, expected) = (&msg[..i], &msg[i + 2..]);
    for kind in ["invalid type", "invalid value"] {
        if let Some(rest) = head.strip_prefix(kind).and_then(|r| r.strip_prefix(": ")) {
            // The category is the text before any quoted value ("string", "integer").
            let category = rest.split(['"', '`', '\'']).next().unwrap_or("").trim();
            return if category.is_empty() || category.len() > 20 {
                format!("{kind}, {expected}")
            } else {
                format!("{kind}: {category}, {expected}")
            };
        }
    }
    for kind in ["unknown field", "unknown variant", "invalid length"] {
        if head.starts_with(kind) {
            return format!("{kind}, {expected}");
        }
    }
    GENERIC.to_owned()
}

/// A serde_json error's text without any value taken from the body: its
/// category, the cause (syntax errors never quote the input; data errors go
/// through [`data_error_text`]) and the line and column.
fn json_error_text(e: &serde_json::Error) -> String {
    let what = match e.classify() {
        serde_json::error::Category::Syntax => format!("malformed JSON: {}", strip_position(&e.to_string())),
        serde_json::error::Category::Eof => format!("truncated JSON: {}", strip_position(&e.to_string())),
        serde_json::error::Category::Data => data_error_text(&e.to_string()),
        serde_json::error::Category::Io => "the body could not be read".to_owned(),
    };
    if e.line() == 0 {
        what
    } else {
        format!("{what} at line {} column {}", e.line(), e.column())
    }
}

/// JSON via serde_json.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonCodec;

impl JsonCodec {
    /// Serializes `value` into a JSON message.
    pub fn to_message<T: Serialize + ?Sized>(&self, value: &T) -> Result<Message> {
        let body = serde_json::to_vec(value).map_err(|e| Error::encode(e.to_string()))?;
        Ok(Message::new(body).with_content_type(APPLICATION_JSON))
    }

    /// Deserializes a JSON message into `T`.
    ///
    /// Same checks as [`decode_with`]; errors carry the line and column but
    /// never a value from the body.
    pub fn from_message<T: DeserializeOwned>(&self, message: &Message) -> Result<T> {
        check_decodable(self, message)?;
        serde_json::from_slice(&message.body).map_err(|e| Error::decode(json_error_text(&e)))
    }
}

/// True for `application/json`, `text/json` and `application/*+json`
/// (parameters such as `; charset=utf-8` ignored).
pub fn is_json_content_type(ct: &str) -> bool {
    let base = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    base == "application/json" || base == "text/json" || (base.starts_with("application/") && base.ends_with("+json"))
}

impl Codec for JsonCodec {
    fn content_type(&self) -> &'static str {
        APPLICATION_JSON
    }

    fn accepts(&self, content_type: Option<&str>) -> bool {
        match content_type {
            None => true,
            Some(ct) if ct.trim().is_empty() => true,
            Some(ct) => is_json_content_type(ct),
        }
    }

    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Bytes> {
        let mut buf = Vec::with_capacity(128);
        {
            let mut ser = serde_json::Serializer::new(&mut buf);
            let mut erased = <dyn erased_serde::Serializer>::erase(&mut ser);
            value
                .erased_serialize(&mut erased)
                .map_err(|e| Error::encode(e.to_string()))?;
        }
        Ok(Bytes::from(buf))
    }

    fn decode_erased(
        &self,
        body: &[u8],
        visit: &mut dyn FnMut(&mut dyn erased_serde::Deserializer<'_>) -> Result<()>,
    ) -> Result<()> {
        let mut de = serde_json::Deserializer::from_slice(body);
        {
            let mut erased = <dyn erased_serde::Deserializer>::erase(&mut de);
            if let Err(e) = visit(&mut erased) {
                // Through erasure the error is only text: when the body is
                // not even valid JSON, report serde_json's own syntax error
                // (category, line, column) instead.
                return match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                    Err(syntax) if !syntax.is_data() => Err(Error::decode(json_error_text(&syntax))),
                    _ => Err(e),
                };
            }
        }
        de.end()
            .map_err(|e| Error::decode(format!("trailing data after JSON value: {}", json_error_text(&e))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Req {
        session_id: String,
        n: u32,
    }

    #[test]
    fn json_round_trip_through_dyn_codec() {
        let codec: &dyn Codec = &JsonCodec;
        let m = codec
            .encode_message(&Req {
                session_id: "s".into(),
                n: 3,
            })
            .unwrap();
        assert_eq!(m.properties.content_type.as_deref(), Some("application/json"));
        let back: Req = decode_with(codec, &m).unwrap();
        assert_eq!(back.n, 3);
    }

    #[test]
    fn malformed_wrong_type_and_encoded_bodies_are_decode_errors() {
        let bad = Message::new("{not json").with_content_type("application/json");
        let e = JsonCodec.from_message::<Req>(&bad).unwrap_err();
        assert_eq!(e.code(), "decode_failed");
        let xml = Message::new("<a/>").with_content_type("application/xml");
        let e = JsonCodec.from_message::<Req>(&xml).unwrap_err();
        assert!(e.to_string().contains("application/xml"), "{e}");
        let gz = Message::new("{}").with_content_encoding("gzip");
        assert!(JsonCodec.from_message::<serde_json::Value>(&gz).is_err());
        let trailing = Message::new(r#"{"session_id":"a","n":1} x"#);
        assert!(JsonCodec.from_message::<Req>(&trailing).is_err());
        assert!(is_json_content_type("application/vnd.api+json; charset=utf-8"));
    }

    #[test]
    fn charset_and_identity_content_encodings_are_not_compression() {
        for enc in [
            "utf-8", "UTF-8", "utf8", "binary", "7bit", "8BIT", "identity", "Identity", "", " utf-8 ",
        ] {
            assert!(is_identity_encoding(enc), "{enc}");
            let m = Message::new(r#"{"session_id":"s","n":1}"#)
                .with_content_type("application/json")
                .with_content_encoding(enc);
            let r: Req = JsonCodec.from_message(&m).unwrap_or_else(|e| panic!("{enc}: {e}"));
            assert_eq!(r.n, 1);
            let r: Req = decode_with(&JsonCodec, &m).unwrap_or_else(|e| panic!("{enc}: {e}"));
            assert_eq!(r.n, 1);
        }
        for enc in ["gzip", "zstd", "x-gzip", "deflate", "br", "utf-16"] {
            assert!(!is_identity_encoding(enc), "{enc}");
        }
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Card {
        number: u64,
        kind: Kind,
        pair: (u8, u8),
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    enum Kind {
        Visa,
    }

    #[test]
    fn decode_errors_never_quote_the_body() {
        let secret = "4111111111111111";
        let bodies = [
            (
                format!(r#"{{"number":"{secret}","kind":"Visa","pair":[1,2]}}"#),
                "invalid type: string, expected u64",
            ),
            (
                format!(r#"{{"number":1,"kind":"{secret}","pair":[1,2]}}"#),
                "unknown variant",
            ),
            (
                format!(r#"{{"number":1,"kind":"Visa","pair":[1,2],"{secret}":1}}"#),
                "unknown field",
            ),
            (
                r#"{"number":1,"kind":"Visa","pair":[1]}"#.to_owned(),
                "invalid length, expected a tuple of size 2",
            ),
            (
                format!(r#"{{"number":{secret}.5,"kind":"Visa","pair":[1,2]}}"#),
                "invalid type: floating point",
            ),
            (
                format!(r#"{{"number":1,"kind":"Visa","pair":[1,{secret}]}}"#),
                "invalid value: integer",
            ),
            (r#"{"number":1,"kind":"Visa"}"#.to_owned(), "missing field `pair`"),
            (format!(r#"{{"number":"{secret}"#), "truncated JSON"),
            (format!(r#"{{"number":{secret}x}}"#), "malformed JSON"),
            (
                format!(r#"{{"number":1,"kind":"Visa","pair":[1,2]}} "{secret}""#),
                "trailing",
            ),
        ];
        for (body, want) in &bodies {
            let m = Message::new(body.clone()).with_content_type("application/json");
            let direct = JsonCodec.from_message::<Card>(&m).unwrap_err();
            let erased = decode_with::<Card>(&JsonCodec, &m).unwrap_err();
            for e in [direct, erased] {
                assert_eq!(e.code(), "decode_failed");
                let text = format!("{e} {e:?}");
                assert!(!text.contains(secret), "body value leaked: {text}");
                assert!(!text.contains("4111"), "body value leaked: {text}");
                assert!(text.contains(want), "{body}: {text}");
            }
        }
        // serde_json errors keep their position.
        let m = Message::new(format!(r#"{{"number":"{secret}"}}"#));
        let e = JsonCodec.from_message::<Card>(&m).unwrap_err();
        assert!(e.to_string().contains("at line 1 column"), "{e}");
        // A custom message could embed anything: replaced by a generic text.
        assert_eq!(
            data_error_text(&format!("card {secret} is blocked")),
            "the body does not match the expected type"
        );
    }
}
