//! Mapping between switchyard's message model and amqprs' wire types:
//! [`Properties`] ⇄ [`BasicProperties`], [`Headers`] ⇄ [`FieldTable`], and
//! a delivered or returned message into a [`Message`].
//!
//! Every AMQP field-table type RabbitMQ uses keeps its exact type and width
//! both ways (`decimal` included, as [`HeaderValue::Decimal`]); a nested
//! empty table stays an empty table. What amqprs cannot carry:
//!
//! - a header *long string* that is not UTF-8: amqprs decodes long strings
//!   as `String` and fails the whole frame, which takes the connection down
//!   (hence [`ClientCaps::decode_failure_drops_connection`](switchyard_amqp::client::ClientCaps));
//!   send such data as [`HeaderValue::Bytes`] (an AMQP byte array);
//! - an empty `headers` property is not sent at all (amqprs has no way to
//!   tell "absent" from "empty" on the way in either): it arrives as empty
//!   [`Headers`].
//!
//! amqprs panics on short strings longer than 255 bytes, so every short
//! string (property values, header keys, names) is checked here first and
//! rejected with [`ClientError::Encode`] naming the field.

use std::sync::Arc;
use std::time::Duration;

use amqprs::{BasicProperties, ByteArray, DecimalValue, FieldArray, FieldTable, FieldValue, LongStr, ShortStr};
use bytes::Bytes;
use switchyard_amqp::client::ClientError;
use switchyard_core::{HeaderValue, Headers, Message, Properties};

type Result<T> = std::result::Result<T, ClientError>;

/// Longest AMQP short string, in bytes.
pub const SHORT_STR_MAX: usize = 255;

/// Checks that `value` fits an AMQP short string; `what` names it in the error.
pub fn check_short(what: &str, value: &str) -> Result<()> {
    if value.len() > SHORT_STR_MAX {
        return Err(ClientError::Encode(format!(
            "{what} is {} bytes long; AMQP allows at most {SHORT_STR_MAX}",
            value.len()
        )));
    }
    Ok(())
}

fn short(what: &str, value: &str) -> Result<ShortStr> {
    check_short(what, value)?;
    ShortStr::try_from(value).map_err(|_| ClientError::Encode(format!("{what} is too long")))
}

fn long(what: &str, value: &str) -> Result<LongStr> {
    LongStr::try_from(value).map_err(|_| ClientError::Encode(format!("header {what} is longer than 4 GiB")))
}

/// Converts switchyard headers into an AMQP field table.
pub fn headers_to_table(headers: &Headers) -> Result<FieldTable> {
    let mut table = FieldTable::new();
    for (k, v) in headers.iter() {
        let key = short("header name", k)?;
        table.insert(key, value_to_field(k, v)?);
    }
    Ok(table)
}

fn value_to_field(key: &str, v: &HeaderValue) -> Result<FieldValue> {
    let too_large = || ClientError::Encode(format!("header {key} is too large"));
    Ok(match v {
        HeaderValue::Bool(b) => FieldValue::t(*b),
        HeaderValue::I8(x) => FieldValue::b(*x),
        HeaderValue::U8(x) => FieldValue::B(*x),
        HeaderValue::I16(x) => FieldValue::s(*x),
        HeaderValue::U16(x) => FieldValue::u(*x),
        HeaderValue::I32(x) => FieldValue::I(*x),
        HeaderValue::U32(x) => FieldValue::i(*x),
        HeaderValue::I64(x) => FieldValue::l(*x),
        HeaderValue::F32(x) => FieldValue::f(*x),
        HeaderValue::F64(x) => FieldValue::d(*x),
        HeaderValue::String(s) => FieldValue::S(long(key, s)?),
        HeaderValue::Bytes(b) => FieldValue::x(ByteArray::try_from(b.to_vec()).map_err(|_| too_large())?),
        HeaderValue::Timestamp(t) => FieldValue::T(*t),
        HeaderValue::Array(items) => {
            let values = items
                .iter()
                .map(|i| value_to_field(key, i))
                .collect::<Result<Vec<_>>>()?;
            FieldValue::A(FieldArray::try_from(values).map_err(|_| too_large())?)
        }
        HeaderValue::Table(t) => FieldValue::F(headers_to_table(t)?),
        HeaderValue::Void => FieldValue::V,
        HeaderValue::Decimal { scale, value } => FieldValue::D(DecimalValue::new(*scale, *value)),
        #[allow(unreachable_patterns)]
        other => {
            return Err(ClientError::Encode(format!(
                "header {key} has a type amqprs cannot send: {other:?}"
            )))
        }
    })
}

/// Converts an AMQP field table into switchyard headers.
pub fn table_to_headers(table: &FieldTable) -> Headers {
    let mut h = Headers::new();
    for (k, v) in table.as_ref() {
        h.insert(k.as_ref().clone(), field_to_value(v));
    }
    h
}

fn field_to_value(v: &FieldValue) -> HeaderValue {
    match v {
        FieldValue::t(b) => HeaderValue::Bool(*b),
        FieldValue::b(x) => HeaderValue::I8(*x),
        FieldValue::B(x) => HeaderValue::U8(*x),
        FieldValue::s(x) => HeaderValue::I16(*x),
        FieldValue::u(x) => HeaderValue::U16(*x),
        FieldValue::I(x) => HeaderValue::I32(*x),
        FieldValue::i(x) => HeaderValue::U32(*x),
        FieldValue::l(x) => HeaderValue::I64(*x),
        FieldValue::f(x) => HeaderValue::F32(*x),
        FieldValue::d(x) => HeaderValue::F64(*x),
        FieldValue::D(d) => decimal(d),
        FieldValue::S(s) => HeaderValue::String(s.as_ref().clone()),
        FieldValue::A(a) => HeaderValue::Array(Vec::from(a.clone()).iter().map(field_to_value).collect()),
        FieldValue::T(t) => HeaderValue::Timestamp(*t),
        FieldValue::F(t) => HeaderValue::Table(table_to_headers(t)),
        FieldValue::V => HeaderValue::Void,
        FieldValue::x(b) => HeaderValue::Bytes(Bytes::from(Vec::from(b.clone()))),
    }
}

/// amqprs keeps `DecimalValue`'s fields private; its `Display` is
/// `Decimal(scale, value)`, which is exact.
fn decimal(d: &DecimalValue) -> HeaderValue {
    let s = d.to_string();
    let inner = s.trim_start_matches("Decimal(").trim_end_matches(')');
    let mut parts = inner.split(',').map(str::trim);
    let scale = parts.next().and_then(|p| p.parse().ok());
    let value = parts.next().and_then(|p| p.parse().ok());
    match (scale, value) {
        (Some(scale), Some(value)) => HeaderValue::Decimal { scale, value },
        _ => HeaderValue::String(s),
    }
}

/// Converts switchyard properties and headers into amqprs basic properties.
pub fn to_basic_properties(p: &Properties, headers: &Headers) -> Result<BasicProperties> {
    let mut b = BasicProperties::default();
    if let Some(v) = &p.content_type {
        check_short("content_type", v)?;
        b.with_content_type(v);
    }
    if let Some(v) = &p.content_encoding {
        check_short("content_encoding", v)?;
        b.with_content_encoding(v);
    }
    if headers.has_table() {
        b.with_headers(headers_to_table(headers)?);
    }
    if let Some(v) = p.delivery_mode {
        b.with_delivery_mode(v);
    }
    if let Some(v) = &p.cluster_id {
        check_short("cluster_id", v)?;
        b.with_cluster_id(v);
    }
    if let Some(v) = p.priority {
        b.with_priority(v);
    }
    if let Some(v) = &p.correlation_id {
        check_short("correlation_id", v)?;
        b.with_correlation_id(v);
    }
    if let Some(v) = &p.reply_to {
        check_short("reply_to", v)?;
        b.with_reply_to(v);
    }
    if let Some(v) = p.expiration {
        b.with_expiration(&v.as_millis().to_string());
    }
    if let Some(v) = &p.message_id {
        check_short("message_id", v)?;
        b.with_message_id(v);
    }
    if let Some(v) = p.timestamp {
        b.with_timestamp(v);
    }
    if let Some(v) = &p.kind {
        check_short("type", v)?;
        b.with_message_type(v);
    }
    if let Some(v) = &p.user_id {
        check_short("user_id", v)?;
        b.with_user_id(v);
    }
    if let Some(v) = &p.app_id {
        check_short("app_id", v)?;
        b.with_app_id(v);
    }
    Ok(b)
}

/// Converts amqprs basic properties into switchyard properties and headers.
pub fn from_basic_properties(b: &BasicProperties) -> (Properties, Headers) {
    let props = Properties {
        content_type: b.content_type().map(|v| Arc::from(v.as_str())),
        content_encoding: b.content_encoding().map(|v| Arc::from(v.as_str())),
        correlation_id: b.correlation_id().map(|v| Arc::from(v.as_str())),
        reply_to: b.reply_to().map(|v| Arc::from(v.as_str())),
        message_id: b.message_id().map(|v| Arc::from(v.as_str())),
        timestamp: b.timestamp(),
        priority: b.priority(),
        expiration: b
            .expiration()
            .and_then(|e| e.trim().parse::<u64>().ok())
            .map(Duration::from_millis),
        delivery_mode: b.delivery_mode(),
        kind: b.message_type().map(|v| Arc::from(v.as_str())),
        app_id: b.app_id().map(|v| Arc::from(v.as_str())),
        user_id: b.user_id().map(|v| Arc::from(v.as_str())),
        cluster_id: b.cluster_id().map(|v| Arc::from(v.as_str())),
    };
    let headers = b
        .headers()
        .map(|t| {
            let mut h = table_to_headers(t);
            h.set_table(true);
            h
        })
        .unwrap_or_default();
    (props, headers)
}

/// The message of a delivery, a `basic.get` or a `basic.return`.
pub fn to_message(props: Option<&BasicProperties>, body: Option<Vec<u8>>) -> Message {
    let (properties, headers) = props.map(from_basic_properties).unwrap_or_default();
    Message {
        body: Bytes::from(body.unwrap_or_default()),
        properties,
        headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_types() -> Headers {
        let mut nested = Headers::new();
        nested.insert("count", HeaderValue::I64(2));
        nested.insert("reason", "rejected");
        let mut h = Headers::new();
        h.insert("bool", true);
        h.insert("i8", -3i8);
        h.insert("u8", 200u8);
        h.insert("i16", -300i16);
        h.insert("u16", 60_000u16);
        h.insert("i32", -70_000i32);
        h.insert("u32", 4_000_000_000u32);
        h.insert("i64", -5_000_000_000i64);
        h.insert("f32", 1.5f32);
        h.insert("f64", -2.25f64);
        h.insert("string", "héllo");
        h.insert("bytes", Bytes::from_static(&[0, 159, 146, 150]));
        h.insert("ts", HeaderValue::Timestamp(1_700_000_000));
        h.insert(
            "array",
            vec![
                HeaderValue::I32(1),
                HeaderValue::String("two".into()),
                HeaderValue::Void,
            ],
        );
        h.insert("table", nested);
        h.insert("void", HeaderValue::Void);
        h
    }

    #[test]
    fn every_header_type_round_trips_with_its_width() {
        let h = all_types();
        let table = headers_to_table(&h).unwrap();
        assert!(matches!(
            table.get(&"u32".try_into().unwrap()),
            Some(FieldValue::i(4_000_000_000))
        ));
        assert!(matches!(
            table.get(&"i16".try_into().unwrap()),
            Some(FieldValue::s(-300))
        ));
        assert_eq!(table_to_headers(&table), h);
    }

    #[test]
    fn every_property_round_trips() {
        let p = Properties {
            content_type: Some("application/json".into()),
            content_encoding: Some("gzip".into()),
            correlation_id: Some("c-1".into()),
            reply_to: Some("amq.rabbitmq.reply-to".into()),
            message_id: Some("m-1".into()),
            timestamp: Some(1_700_000_000),
            priority: Some(7),
            expiration: Some(Duration::from_millis(1500)),
            delivery_mode: Some(2),
            kind: Some("order.created".into()),
            app_id: Some("billing".into()),
            user_id: Some("guest".into()),
            cluster_id: Some("c1".into()),
        };
        let h = all_types();
        let b = to_basic_properties(&p, &h).unwrap();
        assert_eq!(b.expiration().map(String::as_str), Some("1500"));
        assert_eq!(b.delivery_mode(), Some(2));
        let (p2, h2) = from_basic_properties(&b);
        assert_eq!(p2, p);
        assert_eq!(h2, h);

        let transient = Properties {
            delivery_mode: Some(1),
            ..Properties::default()
        };
        let b = to_basic_properties(&transient, &Headers::new()).unwrap();
        assert_eq!(b.delivery_mode(), Some(1));
        assert!(b.headers().is_none());
        assert_eq!(from_basic_properties(&b), (transient, Headers::new()));
    }

    #[test]
    fn absent_properties_and_an_empty_table_are_kept_apart() {
        let bare = Properties {
            delivery_mode: None,
            ..Properties::default()
        };
        let b = to_basic_properties(&bare, &Headers::new()).unwrap();
        assert_eq!(b.delivery_mode(), None);
        assert!(b.headers().is_none());
        assert_eq!(from_basic_properties(&b), (bare.clone(), Headers::new()));
        let b = to_basic_properties(&bare, &Headers::empty_table()).unwrap();
        assert_eq!(b.headers().map(|t| t.as_ref().len()), Some(0));
        let (_, h) = from_basic_properties(&b);
        assert!(h.has_table() && h.is_empty());
        assert_eq!(h, Headers::empty_table());
    }

    #[test]
    fn over_long_short_strings_are_errors_not_panics() {
        let p = Properties {
            message_id: Some("x".repeat(256).into()),
            ..Default::default()
        };
        let e = to_basic_properties(&p, &Headers::new()).unwrap_err();
        assert!(matches!(&e, ClientError::Encode(m) if m.contains("message_id")), "{e}");
        let mut h = Headers::new();
        h.insert("k".repeat(300), 1i32);
        assert!(matches!(headers_to_table(&h).unwrap_err(), ClientError::Encode(_)));
    }

    #[test]
    fn decimal_keeps_scale_and_value() {
        let mut h = Headers::new();
        h.insert("price", HeaderValue::Decimal { scale: 3, value: -1 });
        let table = headers_to_table(&h).unwrap();
        assert_eq!(table_to_headers(&table), h);
    }

    #[test]
    fn nested_empty_table_stays_a_table() {
        let mut h = Headers::new();
        h.insert("empty", Headers::new());
        assert_eq!(table_to_headers(&headers_to_table(&h).unwrap()), h);
    }
}
