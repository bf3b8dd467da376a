//! Queue arguments as RabbitMQ 3.10 checks them (probed with
//! `scripts/probe-twin.py args`, see `docs/rabbitmq-semantics.md`): the
//! validation of a first declaration and the equivalence of a
//! redeclaration, both on the argument table as it goes on the wire (the
//! typed [`QueueArguments`] fields over [`QueueArguments::extra`]); and the
//! typed arguments the broker then applies, known arguments given only in
//! `extra` included.

use std::time::Duration;

use switchyard_core::{Error, HeaderValue, Headers, Overflow, QueueArguments, QueueType};

use crate::broker::amqp_type;
use crate::reply::{self, Op};

/// The arguments a redeclaration must repeat. `x-delivery-limit` and
/// unknown `x-` arguments are not compared, as on RabbitMQ 3.10.
const COMPARED: &[&str] = &[
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-message-ttl",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
];

/// The value of an integer of any width.
fn int(v: &HeaderValue) -> Option<i128> {
    Some(match v {
        HeaderValue::I8(n) => *n as i128,
        HeaderValue::U8(n) => *n as i128,
        HeaderValue::I16(n) => *n as i128,
        HeaderValue::U16(n) => *n as i128,
        HeaderValue::I32(n) => *n as i128,
        HeaderValue::U32(n) => *n as i128,
        HeaderValue::I64(n) => *n as i128,
        _ => return None,
    })
}

/// RabbitMQ's equality of two argument values: integers by value whatever
/// their widths, everything else by type and value.
fn same(a: &HeaderValue, b: &HeaderValue) -> bool {
    match (int(a), int(b)) {
        (Some(x), Some(y)) => x == y,
        (None, None) => a == b,
        _ => false,
    }
}

/// A value as RabbitMQ prints it in its refusals.
fn shown(v: &HeaderValue) -> String {
    if let Some(n) = int(v) {
        return n.to_string();
    }
    match v {
        HeaderValue::String(s) => s.clone(),
        HeaderValue::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// The argument `key` of a table, with RabbitMQ's default for the queue type.
fn effective<'a>(table: &'a Headers, key: &str, classic: &'a HeaderValue) -> Option<&'a HeaderValue> {
    match table.get(key) {
        None if key == "x-queue-type" => Some(classic),
        v => v,
    }
}

/// `None` when `received` redeclares `current` equivalently; otherwise
/// RabbitMQ's 406 for the first argument that differs.
pub(crate) fn inequivalent(queue: &str, current: &QueueArguments, received: &QueueArguments) -> Option<Error> {
    let (cur, rec) = (current.to_headers(), received.to_headers());
    let classic = HeaderValue::String("classic".into());
    for key in COMPARED {
        let (c, r) = (effective(&cur, key, &classic), effective(&rec, key, &classic));
        let detail = match (r, c) {
            (None, None) => continue,
            (Some(r), Some(c)) if same(r, c) => continue,
            (Some(r), Some(c)) => format!("received '{}' but current is '{}'", shown(r), shown(c)),
            (None, Some(c)) => format!(
                "received none but current is the value '{}' of type '{}'",
                shown(c),
                amqp_type(c)
            ),
            (Some(r), None) => format!(
                "received the value '{}' of type '{}' but current is none",
                shown(r),
                amqp_type(r)
            ),
        };
        return Some(reply::precondition_failed(
            Op::QueueDeclare,
            queue,
            format_args!("inequivalent arg '{key}' for queue '{queue}' in vhost '/': {detail}"),
        ));
    }
    None
}

/// Checks the arguments of a first declaration as RabbitMQ does (406 for
/// an invalid value) and returns them typed, with the known arguments
/// given only in `extra` applied.
pub(crate) fn validate(queue: &str, args: &QueueArguments) -> Result<QueueArguments, Error> {
    let table = args.to_headers();
    let invalid = |key: &str, why: String| {
        reply::precondition_failed(
            Op::QueueDeclare,
            queue,
            format_args!("invalid arg '{key}' for queue '{queue}' in vhost '/': {why}"),
        )
    };
    let integer = |key: &str, min: i128, max: Option<i128>| -> Result<Option<i128>, Error> {
        let Some(v) = table.get(key) else { return Ok(None) };
        let Some(n) = int(v) else {
            return Err(invalid(key, format!("\"expected integer, got {}\"", amqp_type(v))));
        };
        if n < 0 {
            return Err(invalid(key, format!("{{value_negative,{n}}}")));
        }
        if n < min {
            return Err(invalid(key, format!("{{value_zero,{n}}}")));
        }
        if max.is_some_and(|m| n > m) {
            return Err(invalid(key, format!("{{max_value_exceeded,{n}}}")));
        }
        Ok(Some(n))
    };
    let string = |key: &str| -> Result<Option<String>, Error> {
        match table.get(key) {
            None => Ok(None),
            Some(HeaderValue::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(invalid(key, format!("{{unacceptable_type,{}}}", amqp_type(v)))),
        }
    };
    let ttl = integer("x-message-ttl", 0, None)?;
    let expires = integer("x-expires", 1, None)?;
    let max_length = integer("x-max-length", 0, None)?;
    let max_bytes = integer("x-max-length-bytes", 0, None)?;
    let max_priority = integer("x-max-priority", 0, Some(255))?;
    let overflow = match string("x-overflow")?.as_deref() {
        None => None,
        Some("drop-head") => Some(Overflow::DropHead),
        Some("reject-publish") => Some(Overflow::RejectPublish),
        Some("reject-publish-dlx") => Some(Overflow::RejectPublishDlx),
        Some(_) => return Err(invalid("x-overflow", "invalid_overflow".into())),
    };
    let dlx = match table.get("x-dead-letter-exchange") {
        None => None,
        Some(HeaderValue::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(reply::precondition_failed(
                Op::QueueDeclare,
                queue,
                format_args!(
                    "invalid type '{}' for arg 'x-dead-letter-exchange' in queue '{queue}' in vhost '/'",
                    amqp_type(v)
                ),
            ))
        }
    };
    let dlrk = string("x-dead-letter-routing-key")?;
    if dlrk.is_some() && dlx.is_none() {
        return Err(invalid(
            "x-dead-letter-routing-key",
            "routing_key_but_no_dlx_defined".into(),
        ));
    }
    let queue_type = match table.get("x-queue-type") {
        None => None,
        Some(HeaderValue::String(s)) if s == "classic" => Some(QueueType::Classic),
        Some(HeaderValue::String(s)) if s == "quorum" => Some(QueueType::Quorum),
        Some(HeaderValue::String(s)) if s == "stream" => Some(QueueType::Stream),
        Some(v) => {
            return Err(invalid(
                "x-queue-type",
                format!("\"unsupported queue type '{}'\"", shown(v)),
            ))
        }
    };
    match table.get("x-queue-mode") {
        None => {}
        Some(HeaderValue::String(s)) if s == "default" || s == "lazy" => {}
        Some(v) => {
            return Err(invalid(
                "x-queue-mode",
                format!("\"unsupported queue mode '{}'\"", shown(v)),
            ))
        }
    }
    let single_active = match table.get("x-single-active-consumer") {
        None => false,
        Some(HeaderValue::Bool(b)) => *b,
        Some(v) => {
            return Err(invalid(
                "x-single-active-consumer",
                format!("{{unacceptable_type,{}}}", amqp_type(v)),
            ))
        }
    };
    let quorum = queue_type == Some(QueueType::Quorum);
    let delivery_limit = match table.get("x-delivery-limit") {
        None => None,
        Some(_) if !quorum => {
            return Err(reply::precondition_failed(
                Op::QueueDeclare,
                queue,
                format_args!(
                    "invalid arg 'x-delivery-limit' for queue '{queue}' in vhost '/' of queue type rabbit_classic_queue"
                ),
            ))
        }
        Some(v) => int(v).map(|n| n.clamp(0, u32::MAX as i128) as u32),
    };
    let ms = |n: Option<i128>| n.map(|n| Duration::from_millis(n.min(u64::MAX as i128) as u64));
    let count = |n: Option<i128>| n.map(|n| n.min(u64::MAX as i128) as u64);
    Ok(QueueArguments {
        dead_letter_exchange: dlx,
        dead_letter_routing_key: dlrk,
        message_ttl: ms(ttl),
        expires: ms(expires),
        max_length: count(max_length),
        max_length_bytes: count(max_bytes),
        overflow,
        max_priority: max_priority.map(|n| n as u8),
        queue_type,
        delivery_limit,
        single_active_consumer: single_active,
        extra: args.extra.clone(),
    })
}

/// The consumer priority of `basic.consume` `arguments` (`x-priority`,
/// 0 when absent). As RabbitMQ checks it: any integer type, else 406.
pub(crate) fn consumer_priority(queue: &str, arguments: &Headers) -> Result<i64, Error> {
    match arguments.get("x-priority") {
        None => Ok(0),
        Some(v) => match int(v) {
            Some(n) => Ok(n.clamp(i64::MIN as i128, i64::MAX as i128) as i64),
            None => Err(reply::precondition_failed(
                Op::BasicConsume,
                queue,
                format_args!(
                    "invalid arg 'x-priority' for queue '{queue}' in vhost '/': {{unacceptable_type,{}}}",
                    amqp_type(v)
                ),
            )),
        },
    }
}
