//! Mapping between switchyard's message model and lapin's, and from lapin
//! errors to [`switchyard_core::Error`].

use std::time::Duration;

use bytes::Bytes;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use switchyard_core::{Error, HeaderValue, Headers, Message, Properties, Result};

/// A short string property, refusing values over 255 bytes (AMQP limit).
fn short(field: &str, v: &str) -> Result<ShortString> {
    ShortString::try_new(v.to_owned()).map_err(|_| {
        Error::encode(format!(
            "property {field} is {} bytes; AMQP allows at most 255",
            v.len()
        ))
    })
}

/// A name (exchange, queue, routing key, consumer tag) as an AMQP short
/// string, refusing names over 255 bytes.
pub(crate) fn short_name(what: &str, v: &str) -> Result<ShortString> {
    ShortString::try_new(v.to_owned())
        .map_err(|_| Error::encode(format!("{what} is {} bytes; AMQP allows at most 255", v.len())))
}

/// Destination, source and routing key of a binding as short strings.
pub(crate) fn binding_names(b: &switchyard_core::Binding) -> Result<(ShortString, ShortString, ShortString)> {
    Ok((
        short_name("binding destination", &b.destination)?,
        short_name("exchange name", &b.source)?,
        short_name("routing key", &b.routing_key)?,
    ))
}

fn short_key(k: &str) -> Result<ShortString> {
    ShortString::try_new(k.to_owned())
        .map_err(|_| Error::encode(format!("header name '{k:.40}...' is longer than 255 bytes")))
}

/// Headers to an AMQP field table, keeping every integer width.
pub(crate) fn headers_to_table(h: &Headers) -> Result<FieldTable> {
    let mut t = FieldTable::default();
    for (k, v) in h.iter() {
        t.insert(short_key(k)?, value_to_amqp(v)?);
    }
    Ok(t)
}

fn value_to_amqp(v: &HeaderValue) -> Result<AMQPValue> {
    Ok(match v {
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::I8(x) => AMQPValue::ShortShortInt(*x),
        HeaderValue::U8(x) => AMQPValue::ShortShortUInt(*x),
        HeaderValue::I16(x) => AMQPValue::ShortInt(*x),
        HeaderValue::U16(x) => AMQPValue::ShortUInt(*x),
        HeaderValue::I32(x) => AMQPValue::LongInt(*x),
        HeaderValue::U32(x) => AMQPValue::LongUInt(*x),
        HeaderValue::I64(x) => AMQPValue::LongLongInt(*x),
        HeaderValue::F32(x) => AMQPValue::Float(*x),
        HeaderValue::F64(x) => AMQPValue::Double(*x),
        HeaderValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.to_vec())),
        HeaderValue::Timestamp(t) => AMQPValue::Timestamp(*t),
        HeaderValue::Array(a) => {
            let mut fa = FieldArray::default();
            for x in a {
                fa.push(value_to_amqp(x)?);
            }
            AMQPValue::FieldArray(fa)
        }
        HeaderValue::Table(t) => AMQPValue::FieldTable(headers_to_table(t)?),
        HeaderValue::Void => AMQPValue::Void,
        // The wire carries the value's 32 bits; lapin types them unsigned.
        HeaderValue::Decimal { scale, value } => AMQPValue::DecimalValue(DecimalValue {
            scale: *scale,
            value: *value as u32,
        }),
        other => return Err(Error::encode(format!("unsupported header value {other:?}"))),
    })
}

/// An AMQP field table to headers.
pub(crate) fn table_to_headers(t: &FieldTable) -> Headers {
    let mut h = Headers::new();
    for (k, v) in t.inner() {
        h.insert(k.as_str(), value_from_amqp(v));
    }
    h
}

fn value_from_amqp(v: &AMQPValue) -> HeaderValue {
    match v {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(x) => HeaderValue::I8(*x),
        AMQPValue::ShortShortUInt(x) => HeaderValue::U8(*x),
        AMQPValue::ShortInt(x) => HeaderValue::I16(*x),
        AMQPValue::ShortUInt(x) => HeaderValue::U16(*x),
        AMQPValue::LongInt(x) => HeaderValue::I32(*x),
        AMQPValue::LongUInt(x) => HeaderValue::U32(*x),
        AMQPValue::LongLongInt(x) => HeaderValue::I64(*x),
        AMQPValue::Float(x) => HeaderValue::F32(*x),
        AMQPValue::Double(x) => HeaderValue::F64(*x),
        AMQPValue::DecimalValue(d) => HeaderValue::Decimal {
            scale: d.scale,
            value: d.value as i32,
        },
        AMQPValue::ShortString(s) => HeaderValue::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => HeaderValue::String(text.to_owned()),
            Err(_) => HeaderValue::Bytes(Bytes::copy_from_slice(s.as_bytes())),
        },
        AMQPValue::FieldArray(a) => HeaderValue::Array(a.as_slice().iter().map(value_from_amqp).collect()),
        AMQPValue::Timestamp(t) => HeaderValue::Timestamp(*t),
        AMQPValue::FieldTable(t) => HeaderValue::Table(table_to_headers(t)),
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(Bytes::copy_from_slice(b.as_slice())),
        AMQPValue::Void => HeaderValue::Void,
    }
}

/// The AMQP basic properties of `m`, each sent only when set (a headers
/// table when [`Headers::has_table`]).
pub(crate) fn to_properties(m: &Message) -> Result<BasicProperties> {
    let p = &m.properties;
    let mut bp = BasicProperties::default();
    if let Some(v) = p.delivery_mode {
        bp = bp.with_delivery_mode(v);
    }
    if let Some(v) = &p.cluster_id {
        bp = bp.with_cluster_id(short("cluster_id", v)?);
    }
    if let Some(v) = &p.content_type {
        bp = bp.with_content_type(short("content_type", v)?);
    }
    if let Some(v) = &p.content_encoding {
        bp = bp.with_content_encoding(short("content_encoding", v)?);
    }
    if let Some(v) = &p.correlation_id {
        bp = bp.with_correlation_id(short("correlation_id", v)?);
    }
    if let Some(v) = &p.reply_to {
        bp = bp.with_reply_to(short("reply_to", v)?);
    }
    if let Some(v) = &p.message_id {
        bp = bp.with_message_id(short("message_id", v)?);
    }
    if let Some(v) = p.timestamp {
        bp = bp.with_timestamp(v);
    }
    if let Some(v) = p.priority {
        bp = bp.with_priority(v);
    }
    if let Some(v) = p.expiration {
        bp = bp.with_expiration(ShortString::from(v.as_millis().to_string()));
    }
    if let Some(v) = &p.kind {
        bp = bp.with_type(short("kind (type)", v)?);
    }
    if let Some(v) = &p.app_id {
        bp = bp.with_app_id(short("app_id", v)?);
    }
    if let Some(v) = &p.user_id {
        bp = bp.with_user_id(short("user_id", v)?);
    }
    if m.headers.has_table() {
        bp = bp.with_headers(headers_to_table(&m.headers)?);
    }
    Ok(bp)
}

/// A message from a received body and its basic properties.
pub(crate) fn from_delivery(body: Vec<u8>, bp: &BasicProperties) -> Message {
    let s = |v: &Option<ShortString>| v.as_ref().map(|x| std::sync::Arc::from(x.as_str()));
    let properties = Properties {
        content_type: s(bp.content_type()),
        content_encoding: s(bp.content_encoding()),
        correlation_id: s(bp.correlation_id()),
        reply_to: s(bp.reply_to()),
        message_id: s(bp.message_id()),
        timestamp: *bp.timestamp(),
        priority: *bp.priority(),
        expiration: bp
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().trim().parse::<u64>().ok())
            .map(Duration::from_millis),
        delivery_mode: *bp.delivery_mode(),
        kind: s(bp.kind()),
        app_id: s(bp.app_id()),
        user_id: s(bp.user_id()),
        cluster_id: s(bp.cluster_id()),
    };
    let headers = bp
        .headers()
        .as_ref()
        .map(|t| {
            let mut h = table_to_headers(t);
            h.set_table(true);
            h
        })
        .unwrap_or_default();
    Message {
        body: Bytes::from(body),
        properties,
        headers,
    }
}

/// True when `e` means the connection (not only a channel) is unusable.
pub(crate) fn is_connection_level(e: &lapin::Error) -> bool {
    use lapin::ErrorKind as K;
    match e.kind() {
        K::IOError(_) | K::RuntimeShutdownError(_) | K::MissingHeartbeatError | K::InvalidConnectionState(_) => true,
        K::ParsingError(_) | K::SerialisationError(_) => true,
        K::ProtocolError(p) => matches!(p.kind(), lapin::protocol::AMQPErrorKind::Hard(_)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_and_typed_headers_round_trip() {
        let mut nested = Headers::new();
        nested.insert("count", 3i64);
        nested.insert("reason", "rejected");
        let m = Message::new("body")
            .with_content_type("application/json")
            .with_content_encoding("gzip")
            .with_correlation_id("c-1")
            .with_reply_to("amq.rabbitmq.reply-to")
            .with_message_id("m-1")
            .with_priority(7)
            .with_expiration(Duration::from_millis(1500))
            .with_timestamp(1_700_000_000)
            .with_kind("order.created")
            .with_app_id("tests")
            .persistent(true)
            .with_header("b", true)
            .with_header("i8", -3i8)
            .with_header("u8", 200u8)
            .with_header("i16", -300i16)
            .with_header("u16", 60000u16)
            .with_header("i32", -70000i32)
            .with_header("u32", 4_000_000_000u32)
            .with_header("i64", i64::MIN)
            .with_header("f32", 1.5f32)
            .with_header("f64", 2.25f64)
            .with_header("s", "text")
            .with_header("bytes", Bytes::from_static(&[0, 159, 146, 150]))
            .with_header("ts", HeaderValue::Timestamp(42))
            .with_header("arr", vec![HeaderValue::I32(1), HeaderValue::from("x")])
            .with_header("x-death", vec![HeaderValue::Table(nested)])
            .with_header("void", HeaderValue::Void);
        let mut m2 = m.clone();
        m2.properties.user_id = Some("guest".into());
        let bp = to_properties(&m2).unwrap();
        let back = from_delivery(m2.body.to_vec(), &bp);
        assert_eq!(back, m2);
        let transient = from_delivery(vec![], &to_properties(&Message::new("").transient()).unwrap());
        assert_eq!(transient.properties.delivery_mode, Some(1));
    }

    #[test]
    fn absent_properties_and_an_empty_table_are_kept_apart() {
        let mut bare = Message::new("x");
        bare.properties.delivery_mode = None;
        let bp = to_properties(&bare).unwrap();
        assert_eq!(*bp.delivery_mode(), None);
        assert!(bp.headers().is_none());
        assert_eq!(from_delivery(b"x".to_vec(), &bp), bare);
        let mut m = Message::new("x").with_headers(Headers::empty_table());
        m.properties.cluster_id = Some("c1".into());
        m.properties.priority = Some(200);
        let bp = to_properties(&m).unwrap();
        assert_eq!(bp.headers().as_ref().map(|t| t.inner().len()), Some(0));
        let back = from_delivery(b"x".to_vec(), &bp);
        assert!(back.headers.has_table() && back.headers.is_empty());
        assert_eq!(back, m);
    }

    #[test]
    fn overlong_short_strings_are_refused_with_a_clear_error() {
        let e = to_properties(&Message::new("x").with_correlation_id("c".repeat(300))).unwrap_err();
        assert_eq!(e.code(), "encode_failed");
        assert!(e.to_string().contains("correlation_id"));
    }
}
