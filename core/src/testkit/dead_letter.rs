//! Dead-lettering scenarios: on reject, on per-message TTL (only at the
//! head of the queue), on queue TTL, on max-length overflow (drop-head,
//! reject-publish, reject-publish-dlx), with the `x-death` and
//! `x-first-death-*` headers RabbitMQ 3.10 writes.
//!
//! What RabbitMQ writes (observed, see `docs/rabbitmq-semantics.md`):
//! `x-death` is an array holding one table per (queue, reason) with
//! `count` (long → [`HeaderValue::I64`]), `reason` (`rejected`, `expired`,
//! `maxlen`), `queue`, `time` (timestamp → [`HeaderValue::Timestamp`]),
//! `exchange` (where the message was first published, "" for the default
//! exchange), `routing-keys` (array of the original routing keys, not the
//! dead-letter override) and `original-expiration` (only if the message
//! had an expiration, which is removed from its properties); plus
//! `x-first-death-reason`, `x-first-death-queue`, `x-first-death-exchange`.

use std::time::Duration;

use super::support::*;
use super::{case, expect_nothing, Case};
use crate::message::{unix_now, HeaderValue, Headers, Message};
use crate::topology::{Destination, ExchangeKind, Overflow, QueueSpec, QueueType};
use crate::transport::{ConsumeOptions, Delivery};

/// The dead-lettering scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(dead_letter::rejected_message_gets_x_death, DeadLettering),
        case!(dead_letter::original_routing_key_kept_without_override, DeadLettering),
        case!(
            dead_letter::per_message_ttl_applies_only_at_head,
            MessageTtl,
            DeadLettering
        ),
        case!(dead_letter::per_message_ttl_expires_at_head, MessageTtl, DeadLettering),
        case!(dead_letter::queue_ttl_dead_letters_expired, MessageTtl, DeadLettering),
        case!(dead_letter::max_length_drops_head, MaxLength, DeadLettering),
        case!(dead_letter::max_length_counts_ready_only, MaxLength),
        case!(
            dead_letter::reject_publish_nacks,
            MaxLength,
            PublisherConfirms,
            DeadLettering
        ),
        case!(
            dead_letter::reject_publish_dlx_nacks_and_dead_letters,
            MaxLength,
            PublisherConfirms,
            DeadLettering
        ),
        case!(
            dead_letter::x_death_count_increments_per_queue_and_reason,
            DeadLettering
        ),
        case!(dead_letter::x_death_lists_newest_first, DeadLettering),
        case!(dead_letter::missing_dead_letter_exchange_drops, DeadLettering),
        case!(dead_letter::max_length_bytes_drops_head, MaxLength, DeadLettering),
        case!(
            dead_letter::quorum_delivery_limit_dead_letters,
            QuorumQueues,
            DeadLettering
        ),
        case!(
            dead_letter::lower_of_queue_and_message_ttl_applies,
            MessageTtl,
            DeadLettering
        ),
        case!(dead_letter::requeue_does_not_reset_the_ttl, MessageTtl, DeadLettering),
    ]
}

/// A dead-letter exchange (direct) with a queue bound to `keys`.
async fn dlx(ctx: &Ctx<'_>, keys: &[&str]) -> Result<(String, String), String> {
    let ex = ctx.exchange("dlx", ExchangeKind::Direct).await?;
    let q = ctx.queue("dlq").await?;
    for k in keys {
        ctx.bind(&q, &ex, k).await?;
    }
    Ok((ex, q))
}

/// Reads exactly `n` dead letters from `dlq` (auto-ack), failing if more come.
async fn dead_letters(ctx: &Ctx<'_>, dlq: &str, n: usize) -> Result<Vec<Delivery>, String> {
    let mut sub = ctx.consume(dlq, ConsumeOptions::default().auto_ack(true)).await?;
    let got = take(&mut sub, n).await.map_err(|e| format!("dead-letter queue: {e}"))?;
    expect_nothing(&mut sub, QUIET)
        .await
        .map_err(|e| format!("dead-letter queue: {e}"))?;
    cancel(&sub).await.ctx("cancel")?;
    Ok(got)
}

fn str_field<'h>(table: &'h Headers, key: &str, what: &str) -> Result<&'h str, String> {
    table
        .get_str(key)
        .ok_or_else(|| format!("{what}: '{key}' should be a string, got {:?}", table.get(key)))
}

/// Reads `expected.len()` dead letters from `dlq`: their bodies are
/// `expected`, in order, and each carries one x-death for `reason` from
/// `src` (published through the default exchange, without an expiration).
async fn first_deaths_in_order(
    ctx: &Ctx<'_>,
    dlq: &str,
    src: &str,
    reason: &str,
    expected: &[&str],
    since: u64,
) -> Result<(), String> {
    let got = dead_letters(ctx, dlq, expected.len()).await?;
    ensure_eq(
        "dead letters in order",
        got.iter().map(body).collect::<Vec<_>>(),
        expected.iter().map(|b| b.to_string()).collect::<Vec<_>>(),
    )?;
    for d in &got {
        check_x_death(d, 1, reason, src, "", &[src], None, since)?;
    }
    Ok(())
}

/// Checks the x-death record and x-first-death-* headers of `d`.
///
/// `count` must be an [`HeaderValue::I64`] (RabbitMQ writes a long) and
/// `time` a [`HeaderValue::Timestamp`] no older than `since`.
#[allow(clippy::too_many_arguments)]
fn check_x_death(
    d: &Delivery,
    count: i64,
    reason: &str,
    queue: &str,
    exchange: &str,
    routing_keys: &[&str],
    original_expiration: Option<&str>,
    since: u64,
) -> Result<(), String> {
    let h = &d.message.headers;
    let deaths = h
        .get("x-death")
        .and_then(HeaderValue::as_array)
        .ok_or_else(|| format!("x-death should be an array, got {:?}", h.get("x-death")))?;
    ensure_eq("number of x-death entries", deaths.len(), 1)?;
    let t = deaths[0]
        .as_table()
        .ok_or_else(|| format!("x-death[0] should be a table, got {:?}", deaths[0]))?;
    ensure_eq("x-death count (a long)", t.get("count"), Some(&HeaderValue::I64(count)))?;
    ensure_eq("x-death reason", str_field(t, "reason", "x-death")?, reason)?;
    ensure_eq("x-death queue", str_field(t, "queue", "x-death")?, queue)?;
    ensure_eq("x-death exchange", str_field(t, "exchange", "x-death")?, exchange)?;
    let want_keys: Vec<HeaderValue> = routing_keys.iter().map(|k| HeaderValue::from(*k)).collect();
    ensure_eq(
        "x-death routing-keys",
        t.get("routing-keys"),
        Some(&HeaderValue::Array(want_keys)),
    )?;
    match t.get("time") {
        Some(HeaderValue::Timestamp(secs)) => ensure(*secs + 5 >= since && *secs <= unix_now() + 5, || {
            format!("x-death time {secs} is not about now ({})", unix_now())
        })?,
        other => return Err(format!("x-death time should be a timestamp, got {other:?}")),
    }
    ensure_eq(
        "x-death original-expiration",
        t.get_str("original-expiration"),
        original_expiration,
    )?;
    ensure_eq("x-first-death-reason", h.get_str("x-first-death-reason"), Some(reason))?;
    ensure_eq("x-first-death-queue", h.get_str("x-first-death-queue"), Some(queue))?;
    ensure_eq(
        "x-first-death-exchange",
        h.get_str("x-first-death-exchange"),
        Some(exchange),
    )
}

async fn rejected_message_gets_x_death(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (dlx, dlq) = dlx(ctx, &["dead"]).await?;
    let src = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("src")).dead_letter(dlx.clone(), Some("dead")))
        .await?;
    let m = Message::new("poison")
        .with_header("tenant", "acme")
        .with_expiration(Duration::from_secs(60))
        .with_priority(3)
        .with_correlation_id("c-1");
    ctx.publish_message(&Destination::queue(src.as_str()), m).await?;
    let mut sub = ctx.consume(&src, ConsumeOptions::default()).await?;
    take(&mut sub, 1).await?.remove(0).reject(false).await.ctx("reject")?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dead letter body", body(&d).as_str(), "poison")?;
    ensure_eq("dead letter exchange", &*d.info.exchange, dlx.as_str())?;
    ensure_eq("dead letter routing key (the override)", &*d.info.routing_key, "dead")?;
    ensure_eq(
        "application header kept",
        d.message.headers.get_str("tenant"),
        Some("acme"),
    )?;
    ensure_eq("priority kept", d.message.properties.priority, Some(3))?;
    ensure_eq(
        "correlation id kept",
        d.message.properties.correlation_id.as_deref(),
        Some("c-1"),
    )?;
    // RabbitMQ removes the expiration (it moves to x-death original-expiration).
    ensure_eq("expiration of the dead letter", d.message.properties.expiration, None)?;
    check_x_death(&d, 1, "rejected", &src, "", &[src.as_str()], Some("60000"), since)?;
    cancel(&sub).await.ctx("cancel")
}

async fn original_routing_key_kept_without_override(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (dlx, dlq) = dlx(ctx, &["orig"]).await?;
    let ex = ctx.exchange("orig-x", ExchangeKind::Direct).await?;
    let src = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("src")).dead_letter(dlx.clone(), None))
        .await?;
    ctx.bind(&src, &ex, "orig").await?;
    ctx.publish(&Destination::new(ex.as_str(), "orig"), "nacked").await?;
    let mut sub = ctx.consume(&src, ConsumeOptions::default()).await?;
    take(&mut sub, 1).await?.remove(0).nack(false).await.ctx("nack")?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dead letter routing key (original)", &*d.info.routing_key, "orig")?;
    check_x_death(&d, 1, "rejected", &src, &ex, &["orig"], None, since)?;
    cancel(&sub).await.ctx("cancel")
}

async fn ttl_source(ctx: &Ctx<'_>, spec: impl FnOnce(QueueSpec) -> QueueSpec) -> Result<(String, String), String> {
    let (dlx, dlq) = dlx(ctx, &["dead"]).await?;
    let src = ctx
        .declare_queue(spec(
            QueueSpec::new(ctx.queue_name("src")).dead_letter(dlx.clone(), Some("dead")),
        ))
        .await?;
    Ok((src, dlq))
}

async fn per_message_ttl_applies_only_at_head(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (src, dlq) = ttl_source(ctx, |s| s).await?;
    let dest = Destination::queue(src.as_str());
    ctx.publish_message(&dest, Message::new("long").with_expiration(Duration::from_secs(60)))
        .await?;
    ctx.publish_message(&dest, Message::new("short").with_expiration(Duration::from_millis(50)))
        .await?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    // "short" has expired but is behind "long": RabbitMQ only expires at the
    // head, so it is still counted and not yet dead-lettered.
    ensure_eq(
        "depth with an expired message behind a live one",
        ctx.depth(&src).await?,
        2,
    )?;
    ensure_eq(
        "dead letters while the expired message is not at the head",
        ctx.depth(&dlq).await?,
        0,
    )?;
    let mut sub = ctx.consume(&src, ConsumeOptions::default()).await?;
    let got = take_bodies(&mut sub, 1).await?;
    ensure_eq("delivered", got, vec!["long".to_string()])?;
    expect_nothing(&mut sub, QUIET)
        .await
        .map_err(|e| format!("the expired message must not be delivered: {e}"))?;
    cancel(&sub).await.ctx("cancel")?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dead letter", body(&d).as_str(), "short")?;
    ensure_eq("expiration of the dead letter", d.message.properties.expiration, None)?;
    check_x_death(&d, 1, "expired", &src, "", &[src.as_str()], Some("50"), since)
}

async fn per_message_ttl_expires_at_head(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (src, dlq) = ttl_source(ctx, |s| s).await?;
    ctx.publish_message(
        &Destination::queue(src.as_str()),
        Message::new("short").with_expiration(Duration::from_millis(50)),
    )
    .await?;
    // At the head it expires without any consumer or read.
    ctx.wait_depth(&src, 0).await?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dead letter", body(&d).as_str(), "short")?;
    check_x_death(&d, 1, "expired", &src, "", &[src.as_str()], Some("50"), since)
}

async fn queue_ttl_dead_letters_expired(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (src, dlq) = ttl_source(ctx, |s| s.message_ttl(Duration::from_millis(100))).await?;
    ctx.publish_all(&Destination::queue(src.as_str()), &["q1", "q2"])
        .await?;
    ctx.wait_depth(&src, 0).await?;
    // No original-expiration: the messages themselves had none.
    first_deaths_in_order(ctx, &dlq, &src, "expired", &["q1", "q2"], since).await
}

async fn max_length_drops_head(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (src, dlq) = ttl_source(ctx, |s| s.max_length(2, Overflow::DropHead)).await?;
    ctx.publish_all(&Destination::queue(src.as_str()), &["m1", "m2", "m3", "m4"])
        .await?;
    ensure_eq(
        "queue keeps the newest",
        ctx.drain(&src).await?,
        vec!["m3".to_string(), "m4".into()],
    )?;
    // The dropped heads, dead-lettered in order.
    first_deaths_in_order(ctx, &dlq, &src, "maxlen", &["m1", "m2"], since).await
}

async fn max_length_counts_ready_only(ctx: &Ctx<'_>) -> Result<(), String> {
    let src = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("src")).max_length(2, Overflow::DropHead))
        .await?;
    let dest = Destination::queue(src.as_str());
    ctx.publish(&dest, "unacked").await?;
    let mut sub = ctx.consume(&src, ConsumeOptions::default().prefetch(1)).await?;
    let held = take(&mut sub, 1).await?.remove(0);
    cancel(&sub).await.ctx("cancel")?;
    ctx.publish_all(&dest, &["r1", "r2"]).await?;
    // One unacked plus two ready is within a max length of 2: nothing dropped.
    ensure_eq("ready depth", ctx.depth(&src).await?, 2)?;
    held.ack().await.ctx("ack")?;
    ensure_eq(
        "queue content",
        ctx.drain(&src).await?,
        vec!["r1".to_string(), "r2".into()],
    )
}

async fn reject_publish_nacks(ctx: &Ctx<'_>) -> Result<(), String> {
    let (src, dlq) = ttl_source(ctx, |s| s.max_length(1, Overflow::RejectPublish)).await?;
    let dest = Destination::queue(src.as_str());
    ctx.publish(&dest, "a").await?;
    expect_code(
        "publish into a full reject-publish queue",
        ctx.transport().publish(&dest, Message::new("b")).await,
        "publish_unconfirmed",
    )?;
    ensure_eq("queue content", ctx.drain(&src).await?, vec!["a".to_string()])?;
    // reject-publish does not dead-letter.
    ensure_eq("dead letters", ctx.drain(&dlq).await?, Vec::<String>::new())
}

async fn reject_publish_dlx_nacks_and_dead_letters(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (src, dlq) = ttl_source(ctx, |s| s.max_length(1, Overflow::RejectPublishDlx)).await?;
    let dest = Destination::queue(src.as_str());
    ctx.publish(&dest, "a").await?;
    expect_code(
        "publish into a full reject-publish-dlx queue",
        ctx.transport().publish(&dest, Message::new("b")).await,
        "publish_unconfirmed",
    )?;
    ensure_eq("queue content", ctx.drain(&src).await?, vec!["a".to_string()])?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dead letter", body(&d).as_str(), "b")?;
    check_x_death(&d, 1, "maxlen", &src, "", &[src.as_str()], None, since)
}

async fn x_death_count_increments_per_queue_and_reason(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    // Dead-letter back into the same queue through the default exchange.
    let name = ctx.queue_name("loop");
    let src = ctx
        .declare_queue(QueueSpec::new(name.clone()).dead_letter("", Some(name.as_str())))
        .await?;
    ctx.publish(&Destination::queue(src.as_str()), "again").await?;
    let mut sub = ctx.consume(&src, ConsumeOptions::default().prefetch(1)).await?;
    let first = take(&mut sub, 1).await?.remove(0);
    ensure(!first.message.headers.contains_key("x-death"), || {
        "a fresh message has no x-death".into()
    })?;
    first.reject(false).await.ctx("first reject")?;
    let second = take(&mut sub, 1).await?.remove(0);
    check_x_death(&second, 1, "rejected", &src, "", &[src.as_str()], None, since)?;
    second.reject(false).await.ctx("second reject")?;
    let third = take(&mut sub, 1).await?.remove(0);
    // Same queue, same reason: one entry whose count went to 2.
    check_x_death(&third, 2, "rejected", &src, "", &[src.as_str()], None, since)?;
    third.ack().await.ctx("ack")?;
    cancel(&sub).await.ctx("cancel")
}

async fn x_death_lists_newest_first(ctx: &Ctx<'_>) -> Result<(), String> {
    // a dead-letters into b, b into c (through the default exchange).
    let c = ctx.queue("c").await?;
    let b = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("b")).dead_letter("", Some(c.as_str())))
        .await?;
    let a = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("a")).dead_letter("", Some(b.as_str())))
        .await?;
    ctx.publish(&Destination::queue(a.as_str()), "chain").await?;
    for q in [&a, &b] {
        let mut sub = ctx.consume(q, ConsumeOptions::default()).await?;
        take(&mut sub, 1).await?.remove(0).reject(false).await.ctx("reject")?;
        cancel(&sub).await.ctx("cancel")?;
    }
    let d = dead_letters(ctx, &c, 1).await?.remove(0);
    let h = &d.message.headers;
    let deaths = h
        .get("x-death")
        .and_then(HeaderValue::as_array)
        .ok_or_else(|| format!("x-death should be an array, got {:?}", h.get("x-death")))?;
    let queues: Vec<Option<&str>> = deaths
        .iter()
        .map(|e| e.as_table().and_then(|t| t.get_str("queue")))
        .collect();
    ensure_eq(
        "x-death queues (newest first)",
        queues,
        vec![Some(b.as_str()), Some(a.as_str())],
    )?;
    ensure_eq(
        "x-first-death-queue",
        h.get_str("x-first-death-queue"),
        Some(a.as_str()),
    )?;
    ensure_eq(
        "x-first-death-reason",
        h.get_str("x-first-death-reason"),
        Some("rejected"),
    )
}

async fn missing_dead_letter_exchange_drops(ctx: &Ctx<'_>) -> Result<(), String> {
    let missing = ctx.exchange_name("no-such-dlx");
    let src = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("src")).dead_letter(missing, None))
        .await?;
    ctx.publish(&Destination::queue(src.as_str()), "x").await?;
    let mut sub = ctx.consume(&src, ConsumeOptions::default()).await?;
    take(&mut sub, 1)
        .await?
        .remove(0)
        .reject(false)
        .await
        .ctx("reject with a dead-letter exchange that does not exist")?;
    expect_nothing(&mut sub, QUIET).await?;
    cancel(&sub).await.ctx("cancel")?;
    // Dropped: neither requeued nor an error.
    ensure_eq("depth", ctx.depth(&src).await?, 0)
}

async fn lower_of_queue_and_message_ttl_applies(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (dlx, dlq) = dlx(ctx, &["dead"]).await?;
    let long_queue = ctx
        .declare_queue(
            QueueSpec::new(ctx.queue_name("queue-60s"))
                .dead_letter(dlx.clone(), Some("dead"))
                .message_ttl(Duration::from_secs(60)),
        )
        .await?;
    let short_queue = ctx
        .declare_queue(
            QueueSpec::new(ctx.queue_name("queue-100ms"))
                .dead_letter(dlx.clone(), Some("dead"))
                .message_ttl(Duration::from_millis(100)),
        )
        .await?;
    ctx.publish_message(
        &Destination::queue(long_queue.as_str()),
        Message::new("message-50ms").with_expiration(Duration::from_millis(50)),
    )
    .await?;
    ctx.wait_depth(&long_queue, 0).await?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dead letter", body(&d).as_str(), "message-50ms")?;
    check_x_death(
        &d,
        1,
        "expired",
        &long_queue,
        "",
        &[long_queue.as_str()],
        Some("50"),
        since,
    )?;
    ctx.publish_message(
        &Destination::queue(short_queue.as_str()),
        Message::new("message-60s").with_expiration(Duration::from_secs(60)),
    )
    .await?;
    ctx.wait_depth(&short_queue, 0).await?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dead letter", body(&d).as_str(), "message-60s")?;
    check_x_death(
        &d,
        1,
        "expired",
        &short_queue,
        "",
        &[short_queue.as_str()],
        Some("60000"),
        since,
    )
}

async fn requeue_does_not_reset_the_ttl(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (src, dlq) = ttl_source(ctx, |s| s.message_ttl(Duration::from_millis(200))).await?;
    ctx.publish(&Destination::queue(src.as_str()), "held").await?;
    let mut sub = ctx.consume(&src, ConsumeOptions::default().prefetch(1)).await?;
    let held = take(&mut sub, 1).await?.remove(0);
    cancel(&sub).await.ctx("cancel")?;
    // Held unacked past the queue TTL, then requeued: it has expired and is
    // dead-lettered instead of being delivered again.
    tokio::time::sleep(Duration::from_millis(500)).await;
    held.nack(true).await.ctx("nack with requeue")?;
    ctx.wait_depth(&src, 0).await?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dead letter", body(&d).as_str(), "held")?;
    check_x_death(&d, 1, "expired", &src, "", &[src.as_str()], None, since)
}

async fn max_length_bytes_drops_head(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (src, dlq) = ttl_source(ctx, |mut s| {
        s.arguments.max_length_bytes = Some(10);
        s
    })
    .await?;
    // Three 4-byte bodies exceed 10 bytes: the oldest is dropped.
    ctx.publish_all(&Destination::queue(src.as_str()), &["aaaa", "bbbb", "cccc"])
        .await?;
    ensure_eq(
        "queue keeps the newest",
        ctx.drain(&src).await?,
        vec!["bbbb".to_string(), "cccc".into()],
    )?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dropped head", body(&d).as_str(), "aaaa")?;
    check_x_death(&d, 1, "maxlen", &src, "", &[src.as_str()], None, since)
}

async fn quorum_delivery_limit_dead_letters(ctx: &Ctx<'_>) -> Result<(), String> {
    let since = unix_now();
    let (src, dlq) = ttl_source(ctx, |s| s.queue_type(QueueType::Quorum).delivery_limit(2)).await?;
    ctx.publish(&Destination::queue(src.as_str()), "poison").await?;
    let mut sub = ctx.consume(&src, ConsumeOptions::default().prefetch(1)).await?;
    // A delivery limit of 2 allows the first delivery and two redeliveries;
    // quorum queues number the redeliveries in x-delivery-count (a long),
    // absent on the first delivery to a consumer.
    for n in 0..3i64 {
        let d = take(&mut sub, 1).await?.remove(0);
        ensure_eq("redelivered", d.info.redelivered, n > 0)?;
        let want = if n == 0 { None } else { Some(&HeaderValue::I64(n)) };
        ensure_eq(
            &format!("x-delivery-count of delivery {}", n + 1),
            d.message.headers.get("x-delivery-count"),
            want,
        )?;
        d.nack(true).await.ctx("nack with requeue")?;
    }
    expect_nothing(&mut sub, QUIET)
        .await
        .map_err(|e| format!("past the delivery limit: {e}"))?;
    cancel(&sub).await.ctx("cancel")?;
    let d = dead_letters(ctx, &dlq, 1).await?.remove(0);
    ensure_eq("dead letter", body(&d).as_str(), "poison")?;
    ensure(!d.message.headers.contains_key("x-delivery-count"), || {
        format!(
            "the dead letter should carry no x-delivery-count, got {:?}",
            d.message.headers.get("x-delivery-count")
        )
    })?;
    check_x_death(&d, 1, "delivery_limit", &src, "", &[src.as_str()], None, since)
}
