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
pub fn decode_with<T: DeserializeOwned>(codec: &dyn Codec, message: &Message) -> Result<T> {
    let ct = message.properties.content_type.as_deref();
    if !codec.accepts(ct) {
        return Err(Error::decode(format!(
            "content type '{}' is not {}",
            ct.unwrap_or_default(),
            codec.content_type()
        )));
    }
    if let Some(enc) = message.properties.content_encoding.as_deref() {
        if !enc.is_empty() && !enc.eq_ignore_ascii_case("identity") {
            return Err(Error::decode(format!(
                "body has content encoding '{enc}': add the decompression layer before decoding"
            )));
        }
    }
    let mut out: Option<T> = None;
    codec.decode_erased(&message.body, &mut |de| {
        out = Some(erased_serde::deserialize::<T>(de).map_err(|e| Error::decode(e.to_string()))?);
        Ok(())
    })?;
    out.ok_or_else(|| Error::decode("codec produced no value"))
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
    pub fn from_message<T: DeserializeOwned>(&self, message: &Message) -> Result<T> {
        decode_with(self, message)
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
            visit(&mut erased)?;
        }
        de.end()
            .map_err(|e| Error::decode(format!("trailing data after JSON value: {e}")))
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
}
