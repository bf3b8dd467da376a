//! Feature scenarios: priorities, publisher confirms, mandatory publishes,
//! missing exchanges and queues, and the round trip of every property and
//! header type.
//!
//! Header types: RabbitMQ 3.10 keeps every AMQP field type with its exact
//! width (b/B/s/u/I/i/l/f/d/t/S/x/T/A/F/V ↔ I8/U8/I16/U16/I32/U32/I64/F32/
//! F64/Bool/String/Bytes/Timestamp/Array/Table/Void), also through
//! dead-lettering, so the suite compares headers exactly.

use std::time::Duration;

use bytes::Bytes;

use super::support::*;
use super::{case, Case};
use crate::message::{HeaderValue, Headers, Message, Properties};
use crate::topology::{Destination, ExchangeKind, QueueSpec};
use crate::transport::{ConsumeOptions, PublishOptions};

/// The feature scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(features::priorities_highest_first_fifo_within_equal, Priorities),
        case!(features::queue_without_max_priority_is_fifo),
        case!(features::publish_returns_once_enqueued, PublisherConfirms),
        case!(features::publish_batch_delivers_in_order),
        case!(features::mandatory_unroutable_is_reported, MandatoryReturns),
        case!(features::publish_to_missing_exchange_fails),
        case!(features::consume_missing_queue_fails),
        case!(features::properties_round_trip),
        case!(features::header_types_round_trip),
        case!(features::header_types_survive_dead_lettering, DeadLettering),
        case!(features::empty_and_large_bodies_round_trip),
    ]
}

async fn priorities_highest_first_fifo_within_equal(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("prio")).max_priority(5))
        .await?;
    let dest = Destination::queue(q.as_str());
    for (body, p) in [
        ("p0a", None),
        ("p3a", Some(3)),
        ("p9", Some(9)),
        ("p3b", Some(3)),
        ("p0b", Some(0)),
        ("p5", Some(5)),
    ] {
        let mut m = Message::new(body);
        if let Some(p) = p {
            m = m.with_priority(p);
        }
        ctx.publish_message(&dest, m).await?;
    }
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let got = take(&mut sub, 6).await?;
    let order: Vec<(String, Option<u8>)> = got.iter().map(|d| (body(d), d.message.properties.priority)).collect();
    // Highest first; a priority above x-max-priority counts as the maximum
    // (so 9 and 5 tie, FIFO); no priority counts as 0; the property itself
    // is delivered unchanged.
    ensure_eq(
        "consumed order (body, priority)",
        order,
        vec![
            ("p9".to_string(), Some(9)),
            ("p5".into(), Some(5)),
            ("p3a".into(), Some(3)),
            ("p3b".into(), Some(3)),
            ("p0a".into(), None),
            ("p0b".into(), Some(0)),
        ],
    )?;
    for d in got {
        d.ack().await.ctx("ack")?;
    }
    cancel(&sub).await.ctx("cancel")
}

async fn queue_without_max_priority_is_fifo(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("fifo").await?;
    let dest = Destination::queue(q.as_str());
    ctx.publish_message(&dest, Message::new("low").with_priority(1)).await?;
    ctx.publish_message(&dest, Message::new("high").with_priority(9))
        .await?;
    ensure_eq("order", ctx.drain(&q).await?, vec!["low".to_string(), "high".into()])
}

async fn publish_returns_once_enqueued(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("confirmed").await?;
    let dest = Destination::queue(q.as_str());
    let other = ctx.connect().await;
    for i in 1..=20u32 {
        ctx.publish(&dest, &i.to_string()).await?;
        // A confirmed publish is in the queue, visible from any connection.
        let depth = other.queue_info(&q).await.ctx("queue_info")?.message_count;
        ensure_eq("depth right after a confirmed publish", depth, i)?;
    }
    Ok(())
}

async fn publish_batch_delivers_in_order(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("batch").await?;
    let bodies: Vec<String> = (0..100).map(|i| format!("b{i}")).collect();
    ctx.transport()
        .publish_batch(
            &Destination::queue(q.as_str()),
            bodies.iter().map(|b| Message::new(b.clone())).collect(),
        )
        .await
        .ctx("publish_batch")?;
    ensure_eq("depth after publish_batch", ctx.depth(&q).await?, 100)?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(100)).await?;
    let got = take_bodies(&mut sub, 100).await?;
    ensure_eq("batch order", got, bodies)?;
    cancel(&sub).await.ctx("cancel")
}

async fn mandatory_unroutable_is_reported(ctx: &Ctx<'_>) -> Result<(), String> {
    let ex = ctx.exchange("x", ExchangeKind::Direct).await?;
    let q = ctx.queue("q").await?;
    ctx.bind(&q, &ex, "bound").await?;
    let t = ctx.transport();
    let err = expect_code(
        "mandatory publish with no matching binding",
        t.publish_with(
            &Destination::new(ex.as_str(), "unbound"),
            Message::new("returned"),
            PublishOptions::mandatory(),
        )
        .await,
        "unroutable",
    )?;
    match err {
        crate::Error::Unroutable {
            exchange, routing_key, ..
        } => {
            ensure_eq("unroutable exchange", exchange.as_str(), ex.as_str())?;
            ensure_eq("unroutable routing key", routing_key.as_str(), "unbound")?;
        }
        other => return Err(format!("expected Error::Unroutable, got {other:?}")),
    }
    expect_code(
        "mandatory publish to the default exchange naming no queue",
        t.publish_with(
            &Destination::queue(ctx.name("nobody")),
            Message::new("returned"),
            PublishOptions::mandatory(),
        )
        .await,
        "unroutable",
    )?;
    // Not mandatory: accepted and dropped.
    t.publish(&Destination::new(ex.as_str(), "unbound"), Message::new("dropped"))
        .await
        .ctx("non-mandatory unroutable publish")?;
    // Mandatory and routable: accepted and delivered.
    t.publish_with(
        &Destination::new(ex.as_str(), "bound"),
        Message::new("routed"),
        PublishOptions::mandatory(),
    )
    .await
    .ctx("mandatory routable publish")?;
    ensure_eq("queue content", ctx.drain(&q).await?, vec!["routed".to_string()])
}

async fn publish_to_missing_exchange_fails(ctx: &Ctx<'_>) -> Result<(), String> {
    let missing = ctx.exchange_name("missing");
    let err = expect_code(
        "publish to a missing exchange",
        ctx.transport()
            .publish(&Destination::new(missing.as_str(), "k"), Message::new("lost"))
            .await,
        "exchange_not_found",
    )?;
    ensure(err.to_string().contains(&missing), || {
        format!("the error should name the exchange '{missing}': {err}")
    })?;
    // The transport keeps working (RabbitMQ closed the channel).
    let q = ctx.queue("q").await?;
    ctx.publish(&Destination::queue(q.as_str()), "after").await?;
    ensure_eq("queue content", ctx.drain(&q).await?, vec!["after".to_string()])
}

async fn consume_missing_queue_fails(ctx: &Ctx<'_>) -> Result<(), String> {
    let missing = ctx.queue_name("missing");
    let err = expect_code(
        "consume a missing queue",
        ctx.transport().consume(&missing, ConsumeOptions::default()).await,
        "queue_not_found",
    )?;
    ensure(err.to_string().contains(&missing), || {
        format!("the error should name the queue '{missing}': {err}")
    })?;
    let q = ctx.queue("q").await?;
    ctx.publish(&Destination::queue(q.as_str()), "after").await?;
    ensure_eq("queue content", ctx.drain(&q).await?, vec!["after".to_string()])
}

/// Receives one message published to a fresh queue.
async fn round_trip(ctx: &Ctx<'_>, m: Message) -> Result<Message, String> {
    let q = ctx.queue(&format!("rt-{}", &crate::message::new_id()[..6])).await?;
    ctx.publish_message(&Destination::queue(q.as_str()), m).await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().auto_ack(true)).await?;
    let d = take(&mut sub, 1).await?.remove(0);
    cancel(&sub).await.ctx("cancel")?;
    Ok(d.message)
}

async fn properties_round_trip(ctx: &Ctx<'_>) -> Result<(), String> {
    // user_id is left out: RabbitMQ refuses any value other than the
    // connection's user name, which the suite does not know.
    let properties = Properties {
        content_type: Some("application/json".into()),
        content_encoding: Some("gzip".into()),
        correlation_id: Some("corr-1".into()),
        reply_to: Some("replies".into()),
        message_id: Some("msg-1".into()),
        timestamp: Some(1_700_000_000),
        priority: Some(4),
        expiration: Some(Duration::from_secs(60)),
        delivery_mode: Some(2),
        kind: Some("order.created".into()),
        app_id: Some("switchyard-conformance".into()),
        user_id: None,
        cluster_id: Some("cluster-a".into()),
    };
    let sent = Message {
        body: Bytes::from_static(b"{\"x\":1}"),
        properties: properties.clone(),
        headers: Headers::new(),
    };
    let got = round_trip(ctx, sent.clone()).await?;
    ensure_eq("properties", &got.properties, &properties)?;
    ensure_eq("body", &got.body, &sent.body)?;
    ensure_eq("headers", &got.headers, &Headers::new())?;
    let plain = round_trip(ctx, Message::new("plain")).await?;
    ensure_eq("default properties", plain.properties, Properties::default())
}

/// One header of every type, with values that need the full width.
fn all_header_types() -> Headers {
    use HeaderValue::*;
    let mut nested = Headers::new();
    nested.insert("n", I64(1));
    nested.insert("s", String("inner".into()));
    [
        ("bool", Bool(true)),
        ("i8", I8(-5)),
        ("u8", U8(200)),
        ("i16", I16(-300)),
        ("u16", U16(60_000)),
        ("i32", I32(-70_000)),
        ("u32", U32(4_000_000_000)),
        ("i64", I64(-(1 << 40))),
        ("f32", F32(1.5)),
        ("f64", F64(2.25)),
        ("string", String("text ü".into())),
        ("bytes", Bytes(bytes::Bytes::from_static(b"\x00\xff"))),
        ("timestamp", Timestamp(1_700_000_000)),
        ("array", Array(vec![I32(1), String("two".into()), Bool(false)])),
        ("table", Table(nested)),
        ("void", Void),
    ]
    .into_iter()
    .collect()
}

async fn header_types_round_trip(ctx: &Ctx<'_>) -> Result<(), String> {
    let headers = all_header_types();
    let got = round_trip(ctx, Message::new("typed").with_headers(headers.clone())).await?;
    let mut errors = Vec::new();
    for (k, v) in headers.iter() {
        if got.headers.get(k) != Some(v) {
            errors.push(format!("{k}: sent {v:?}, received {:?}", got.headers.get(k)));
        }
    }
    if got.headers.len() != headers.len() {
        errors.push(format!(
            "received {} headers, sent {}",
            got.headers.len(),
            headers.len()
        ));
    }
    ensure(errors.is_empty(), || {
        format!("headers changed in transit: {}", errors.join("; "))
    })
}

async fn header_types_survive_dead_lettering(ctx: &Ctx<'_>) -> Result<(), String> {
    let dlx = ctx.exchange("dlx", ExchangeKind::Fanout).await?;
    let dlq = ctx.queue("dlq").await?;
    ctx.bind(&dlq, &dlx, "").await?;
    let src = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("src")).dead_letter(dlx.clone(), None))
        .await?;
    let headers = all_header_types();
    ctx.publish_message(
        &Destination::queue(src.as_str()),
        Message::new("typed").with_headers(headers.clone()),
    )
    .await?;
    let mut sub = ctx.consume(&src, ConsumeOptions::default()).await?;
    take(&mut sub, 1).await?.remove(0).reject(false).await.ctx("reject")?;
    cancel(&sub).await.ctx("cancel")?;
    let mut dsub = ctx.consume(&dlq, ConsumeOptions::default().auto_ack(true)).await?;
    let got = take(&mut dsub, 1).await?.remove(0).message;
    cancel(&dsub).await.ctx("cancel")?;
    let mut errors = Vec::new();
    for (k, v) in headers.iter() {
        if got.headers.get(k) != Some(v) {
            errors.push(format!("{k}: sent {v:?}, dead letter has {:?}", got.headers.get(k)));
        }
    }
    ensure(errors.is_empty(), || {
        format!("headers changed by dead-lettering: {}", errors.join("; "))
    })
}

async fn empty_and_large_bodies_round_trip(ctx: &Ctx<'_>) -> Result<(), String> {
    let empty = round_trip(ctx, Message::new(Bytes::new())).await?;
    ensure_eq("empty body length", empty.body.len(), 0)?;
    let large: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let got = round_trip(ctx, Message::new(large.clone())).await?;
    ensure(got.body[..] == large[..], || {
        format!("1 MiB body changed in transit (received {} bytes)", got.body.len())
    })
}
