//! Building messages from the command line and printing received ones.

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use switchyard::{DeliveryInfo, HeaderValue, Headers, Message};

use crate::args::MessageArgs;
use crate::error::{CliError, CliResult};

/// How `--header` values are written, for error messages.
pub const HEADER_SYNTAX: &str = "write headers as k=v (string), k:int=5, k:bool=true, k:float=1.5 or k:str=v";

/// Parses one `--header`: `k=v` is a string, `k:TYPE=v` a typed value
/// (`str`/`string`, `int`/`i64`, `i32`, `bool`, `float`/`f64`).
pub fn parse_header(raw: &str) -> CliResult<(String, HeaderValue)> {
    let bad = |why: String| CliError::usage(format!("malformed header '{raw}': {why}; {HEADER_SYNTAX}"));
    let (key, value) = raw.split_once('=').ok_or_else(|| bad("no '='".into()))?;
    let (name, kind) = match key.rsplit_once(':') {
        Some((n, k)) => (n, k),
        None => (key, "str"),
    };
    if name.is_empty() {
        return Err(bad("empty name".into()));
    }
    let v = match kind.to_ascii_lowercase().as_str() {
        "str" | "string" => HeaderValue::String(value.to_owned()),
        "int" | "i64" | "long" => HeaderValue::I64(
            value
                .trim()
                .parse()
                .map_err(|_| bad(format!("'{value}' is not an integer")))?,
        ),
        "i32" => HeaderValue::I32(
            value
                .trim()
                .parse()
                .map_err(|_| bad(format!("'{value}' is not a 32-bit integer")))?,
        ),
        "bool" => match value.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => HeaderValue::Bool(true),
            "false" | "no" | "0" => HeaderValue::Bool(false),
            _ => return Err(bad(format!("'{value}' is not true or false"))),
        },
        "float" | "f64" | "double" => {
            let f: f64 = value
                .trim()
                .parse()
                .map_err(|_| bad(format!("'{value}' is not a number")))?;
            HeaderValue::F64(f)
        }
        other => return Err(bad(format!("unknown type '{other}'"))),
    };
    Ok((name.to_owned(), v))
}

/// Applies the properties and headers of `args` to `message`.
pub fn apply(args: &MessageArgs, mut message: Message) -> CliResult<Message> {
    for raw in &args.headers {
        let (k, v) = parse_header(raw)?;
        message.headers.insert(k, v);
    }
    if args.transient {
        message = message.transient();
    }
    if let Some(p) = args.priority {
        message = message.with_priority(p);
    }
    if let Some(v) = &args.correlation_id {
        message = message.with_correlation_id(v.clone());
    }
    if let Some(v) = &args.message_id {
        message = message.with_message_id(v.clone());
    }
    if let Some(v) = &args.expiration {
        message = message.with_expiration(Duration::from_millis(*v));
    }
    if let Some(v) = &args.kind {
        message = message.with_kind(v.clone());
    }
    if let Some(v) = &args.reply_to {
        message = message.with_reply_to(v.clone());
    }
    message.properties.content_type = Some(match &args.content_type {
        Some(c) => c.as_str().into(),
        None if serde_json::from_slice::<Value>(&message.body).is_ok() => "application/json".into(),
        None => "text/plain".into(),
    });
    Ok(message)
}

/// Validates every `--header` of `args` without building a message.
pub fn check_headers(args: &MessageArgs) -> CliResult<()> {
    args.headers.iter().try_for_each(|h| parse_header(h).map(|_| ()))
}

/// A header value as JSON (bytes as base64 text).
pub fn header_json(v: &HeaderValue) -> Value {
    match v {
        HeaderValue::Bool(b) => json!(b),
        HeaderValue::I8(n) => json!(n),
        HeaderValue::U8(n) => json!(n),
        HeaderValue::I16(n) => json!(n),
        HeaderValue::U16(n) => json!(n),
        HeaderValue::I32(n) => json!(n),
        HeaderValue::U32(n) => json!(n),
        HeaderValue::I64(n) => json!(n),
        HeaderValue::F32(n) => json!(n),
        HeaderValue::F64(n) => json!(n),
        HeaderValue::String(s) => json!(s),
        HeaderValue::Bytes(b) => {
            json!(String::from_utf8(b.to_vec()).unwrap_or_else(|_| base64::engine::general_purpose::STANDARD.encode(b)))
        }
        HeaderValue::Timestamp(t) => json!(t),
        HeaderValue::Array(a) => Value::Array(a.iter().map(header_json).collect()),
        HeaderValue::Table(t) => headers_json(t),
        HeaderValue::Void => Value::Null,
        other => json!(format!("{other:?}")),
    }
}

/// A header table as a JSON object.
pub fn headers_json(h: &Headers) -> Value {
    Value::Object(h.iter().map(|(k, v)| (k.clone(), header_json(v))).collect())
}

/// The AMQP type name of a header value, as printed next to it.
pub fn header_type(v: &HeaderValue) -> &'static str {
    match v {
        HeaderValue::Bool(_) => "bool",
        HeaderValue::I8(_) => "i8",
        HeaderValue::U8(_) => "u8",
        HeaderValue::I16(_) => "i16",
        HeaderValue::U16(_) => "u16",
        HeaderValue::I32(_) => "i32",
        HeaderValue::U32(_) => "u32",
        HeaderValue::I64(_) => "int",
        HeaderValue::F32(_) => "f32",
        HeaderValue::F64(_) => "float",
        HeaderValue::String(_) => "str",
        HeaderValue::Bytes(_) => "bytes",
        HeaderValue::Timestamp(_) => "timestamp",
        HeaderValue::Array(_) => "array",
        HeaderValue::Table(_) => "table",
        HeaderValue::Void => "void",
        _ => "other",
    }
}

/// The body as JSON: the parsed document when it is JSON, else text, else
/// base64; with the encoding used (`json`, `utf8`, `base64`).
pub fn body_json(body: &Bytes) -> (Value, &'static str) {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return (v, "json");
    }
    match std::str::from_utf8(body) {
        Ok(s) => (json!(s), "utf8"),
        Err(_) => (json!(base64::engine::general_purpose::STANDARD.encode(body)), "base64"),
    }
}

/// The properties that are set, as a JSON object.
pub fn properties_json(m: &Message) -> Value {
    let p = &m.properties;
    let mut o = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            o.insert(k.into(), v);
        }
    };
    put("content_type", p.content_type.as_deref().map(|v| json!(v)));
    put("content_encoding", p.content_encoding.as_deref().map(|v| json!(v)));
    put("correlation_id", p.correlation_id.as_deref().map(|v| json!(v)));
    put("reply_to", p.reply_to.as_deref().map(|v| json!(v)));
    put("message_id", p.message_id.as_deref().map(|v| json!(v)));
    put("timestamp", p.timestamp.map(|v| json!(v)));
    put("priority", p.priority.map(|v| json!(v)));
    put("expiration_ms", p.expiration.map(|v| json!(v.as_millis() as u64)));
    put("delivery_mode", p.delivery_mode.map(|v| json!(v)));
    put("persistent", Some(json!(p.is_persistent())));
    put("type", p.kind.as_deref().map(|v| json!(v)));
    put("app_id", p.app_id.as_deref().map(|v| json!(v)));
    put("user_id", p.user_id.as_deref().map(|v| json!(v)));
    put("cluster_id", p.cluster_id.as_deref().map(|v| json!(v)));
    Value::Object(o)
}

/// A received message as one JSON object.
pub fn message_json(m: &Message, info: Option<&DeliveryInfo>) -> Value {
    let (body, encoding) = body_json(&m.body);
    let mut o = Map::new();
    if let Some(i) = info {
        o.insert("queue".into(), json!(&*i.queue));
        o.insert("exchange".into(), json!(&*i.exchange));
        o.insert("routing_key".into(), json!(&*i.routing_key));
        o.insert("redelivered".into(), json!(i.redelivered));
    }
    o.insert("properties".into(), properties_json(m));
    o.insert("headers".into(), headers_json(&m.headers));
    o.insert("body".into(), body);
    o.insert("body_encoding".into(), json!(encoding));
    o.insert("body_size".into(), json!(m.body.len()));
    Value::Object(o)
}

/// A received message for people: delivery facts, properties, typed
/// headers, and the body (pretty-printed when it is JSON).
pub fn message_human(m: &Message, info: Option<&DeliveryInfo>, title: &str) -> String {
    let mut out = format!("--- {title}");
    if let Some(i) = info {
        let ex = if i.exchange.is_empty() {
            "(default)"
        } else {
            &i.exchange
        };
        out.push_str(&format!(
            " (queue {}, exchange {ex}, routing key {}{})",
            i.queue,
            i.routing_key,
            if i.redelivered { ", redelivered" } else { "" }
        ));
    }
    out.push('\n');
    if let Value::Object(p) = properties_json(m) {
        let props: Vec<String> = p
            .iter()
            .map(|(k, v)| match v {
                Value::String(s) => format!("{k}={s}"),
                other => format!("{k}={other}"),
            })
            .collect();
        out.push_str(&format!("properties: {}\n", props.join(" ")));
    }
    if !m.headers.is_empty() {
        out.push_str("headers:\n");
        for (k, v) in m.headers.iter() {
            out.push_str(&format!("  {k} = {} ({})\n", header_json(v), header_type(v)));
        }
    }
    let (body, encoding) = body_json(&m.body);
    out.push_str(&format!("body ({} bytes, {encoding}):\n", m.body.len()));
    match (encoding, &body) {
        ("json", v) => out.push_str(&serde_json::to_string_pretty(v).unwrap_or_default()),
        (_, Value::String(s)) => out.push_str(s),
        (_, v) => out.push_str(&v.to_string()),
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_parse_typed_and_refuse_malformed() {
        assert_eq!(
            parse_header("a=b=c").unwrap(),
            ("a".into(), HeaderValue::String("b=c".into()))
        );
        assert_eq!(parse_header("n:int=5").unwrap(), ("n".into(), HeaderValue::I64(5)));
        assert_eq!(
            parse_header("ok:bool=true").unwrap(),
            ("ok".into(), HeaderValue::Bool(true))
        );
        assert_eq!(
            parse_header("f:float=1.5").unwrap(),
            ("f".into(), HeaderValue::F64(1.5))
        );
        assert_eq!(
            parse_header("s:str=5").unwrap(),
            ("s".into(), HeaderValue::String("5".into()))
        );
        for bad in ["novalue", "n:int=abc", "k:date=1", "=x", "b:bool=maybe"] {
            let e = parse_header(bad).unwrap_err();
            assert_eq!(e.exit, crate::error::EXIT_USAGE);
            assert!(e.message.contains(bad), "{}", e.message);
        }
    }

    #[test]
    fn bodies_print_as_json_text_or_base64() {
        assert_eq!(body_json(&Bytes::from_static(b"{\"a\":1}")).1, "json");
        assert_eq!(body_json(&Bytes::from_static(b"hi there")).1, "utf8");
        assert_eq!(body_json(&Bytes::from_static(&[0xff, 0xfe])).1, "base64");
        let m = Message::new("{\"a\":1}").with_header("n", HeaderValue::I64(5));
        let h = message_human(&m, None, "message 1");
        assert!(h.contains("n = 5 (int)"), "{h}");
        assert!(h.contains("\"a\": 1"), "{h}");
    }
}
