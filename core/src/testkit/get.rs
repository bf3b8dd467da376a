//! `basic.get` scenarios ([`Consumer::get`](crate::transport::Consumer::get)):
//! empty queue, order and remaining count, manual settlement (ack, nack,
//! reject, requeue), auto-ack, an unsettled delivery dropped or cut off by
//! its connection, missing and locked queues, and auto-delete queues.
//! Probed on RabbitMQ 3.10.8 with `transport-memory/scripts/probe-ops.py`
//! (see `docs/rabbitmq-semantics.md`).

use std::time::Duration;

use super::support::*;
use super::twin::expect_reply;
use super::{case, Case};
use crate::topology::{Destination, QueueSpec};
use crate::transport::{GetOk, Transport};

/// The get scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(get::empty_queue_gives_none),
        case!(get::takes_in_order_with_the_remaining_count),
        case!(get::manual_settlement_acks_and_requeues),
        case!(get::dropped_unsettled_get_is_requeued),
        case!(get::settling_after_the_connection_closed_fails),
        case!(get::missing_queue_is_queue_not_found),
        case!(get::exclusive_queue_of_another_connection_is_locked, Exclusive),
        case!(get::does_not_delete_an_auto_delete_queue),
    ]
}

/// Takes one message, failing if the queue is empty or the get fails.
async fn take_one(t: &dyn Transport, queue: &str, auto_ack: bool, what: &str) -> Result<GetOk, String> {
    match t.get(queue, auto_ack).await.ctx(what)? {
        Some(g) => Ok(g),
        None => Err(format!(
            "{what}: the queue '{queue}' should have a message, get answered empty"
        )),
    }
}

fn got(g: &GetOk) -> String {
    String::from_utf8_lossy(&g.delivery.message.body).into_owned()
}

async fn empty_queue_gives_none(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let t = ctx.transport();
    for auto_ack in [false, true] {
        let r = t.get(&q, auto_ack).await.ctx("get on an empty queue")?;
        ensure(r.is_none(), || {
            format!("get (auto_ack {auto_ack}) on an empty queue should answer None (basic.get-empty), got {r:?}")
        })?;
    }
    // The transport still works after the empty answers.
    ctx.publish(&Destination::queue(q.as_str()), "after").await?;
    let g = take_one(&**t, &q, true, "get after get-empty").await?;
    ensure_eq("body", got(&g).as_str(), "after")
}

async fn takes_in_order_with_the_remaining_count(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let t = ctx.transport();
    ctx.publish_all(&Destination::queue(q.as_str()), &["a", "b", "c"])
        .await?;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let g = take_one(&**t, &q, true, "get auto-ack").await?;
        let i = &g.delivery.info;
        ensure(!g.delivery.needs_settlement(), || {
            "a delivery taken with auto_ack needs no settlement".into()
        })?;
        ensure(!i.redelivered, || "a first get is not redelivered".into())?;
        ensure_eq("exchange of a get (default exchange)", &*i.exchange, "")?;
        ensure_eq("routing key of a get", &*i.routing_key, q.as_str())?;
        ensure_eq("queue of a get", &*i.queue, q.as_str())?;
        seen.push((got(&g), g.message_count));
    }
    ensure_eq(
        "bodies and remaining counts of three gets",
        seen,
        vec![("a".to_owned(), 2), ("b".to_owned(), 1), ("c".to_owned(), 0)],
    )?;
    let r = t.get(&q, true).await.ctx("get on the drained queue")?;
    ensure(r.is_none(), || {
        format!("the drained queue should answer None, got {r:?}")
    })?;
    ensure_eq("depth after auto-ack gets", ctx.depth(&q).await?, 0)
}

async fn manual_settlement_acks_and_requeues(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let t = ctx.transport();
    ctx.publish_all(&Destination::queue(q.as_str()), &["a", "b"]).await?;
    let g = take_one(&**t, &q, false, "get a").await?;
    ensure_eq("first get", (got(&g), g.message_count), ("a".to_owned(), 1))?;
    ensure(g.delivery.needs_settlement(), || {
        "a delivery taken without auto_ack needs settlement".into()
    })?;
    // Unacked: not counted as ready.
    ensure_eq("depth while 'a' is unacked", ctx.depth(&q).await?, 1)?;
    g.delivery.nack(true).await.ctx("nack requeue of a get")?;
    ctx.wait_depth(&q, 2).await?;
    let g = take_one(&**t, &q, false, "get after nack requeue").await?;
    ensure_eq(
        "get after nack requeue (back at the head, redelivered)",
        (got(&g), g.message_count, g.delivery.info.redelivered),
        ("a".to_owned(), 1, true),
    )?;
    g.delivery.reject(true).await.ctx("reject requeue of a get")?;
    ctx.wait_depth(&q, 2).await?;
    let g = take_one(&**t, &q, false, "get after reject requeue").await?;
    ensure_eq(
        "get after reject requeue",
        (got(&g), g.delivery.info.redelivered),
        ("a".to_owned(), true),
    )?;
    g.delivery.ack().await.ctx("ack of a get")?;
    let g = take_one(&**t, &q, false, "get b").await?;
    ensure_eq("get b", (got(&g), g.message_count), ("b".to_owned(), 0))?;
    g.delivery.reject(false).await.ctx("reject without requeue of a get")?;
    // Acked and rejected (no dead-letter exchange): both gone for good.
    tokio::time::sleep(QUIET).await;
    ensure_eq("depth after ack and reject", ctx.depth(&q).await?, 0)?;
    let r = t.get(&q, false).await.ctx("get on the settled queue")?;
    ensure(r.is_none(), || format!("the queue should be empty, got {r:?}"))
}

async fn dropped_unsettled_get_is_requeued(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let t = ctx.transport();
    ctx.publish(&Destination::queue(q.as_str()), "m").await?;
    let g = take_one(&**t, &q, false, "get").await?;
    ensure_eq("depth while unsettled", ctx.depth(&q).await?, 0)?;
    drop(g);
    // Dropping it unsettled gives the message back (its channel closes).
    ctx.wait_depth(&q, 1).await?;
    let g = take_one(&**t, &q, true, "get after the drop").await?;
    ensure_eq(
        "the requeued message",
        (got(&g), g.delivery.info.redelivered),
        ("m".to_owned(), true),
    )
}

async fn settling_after_the_connection_closed_fails(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish(&Destination::queue(q.as_str()), "m").await?;
    let other = ctx.connect().await;
    let g = take_one(&*other, &q, false, "get on a second connection").await?;
    other.close().await.ctx("close the second connection")?;
    // The broker requeued it when the connection went.
    ctx.wait_depth(&q, 1).await?;
    expect_code(
        "ack of a get whose connection is closed",
        g.delivery.ack().await,
        "settle_failed",
    )?;
    // The failed ack settled nothing else.
    tokio::time::sleep(QUIET).await;
    ensure_eq("depth after the failed ack", ctx.depth(&q).await?, 1)?;
    let g = take_one(&**ctx.transport(), &q, true, "get the requeued message").await?;
    ensure_eq("requeued message redelivered", g.delivery.info.redelivered, true)
}

async fn missing_queue_is_queue_not_found(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    let missing = ctx.name("missing");
    for auto_ack in [false, true] {
        expect_reply(
            &format!("get (auto_ack {auto_ack}) on a missing queue"),
            t.get(&missing, auto_ack).await,
            "queue_not_found",
            404,
            (60, 70),
        )?;
    }
    // The transport carries on (the broker closed only that channel).
    let q = ctx.queue("q").await?;
    ctx.publish(&Destination::queue(q.as_str()), "m").await?;
    let g = take_one(&**t, &q, false, "get after the refusal").await?;
    g.delivery.ack().await.ctx("ack after the refusal")?;
    tokio::time::sleep(QUIET).await;
    ensure_eq("depth", ctx.depth(&q).await?, 0)
}

async fn exclusive_queue_of_another_connection_is_locked(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("x")).durable(false).exclusive(true))
        .await?;
    ctx.publish(&Destination::queue(q.as_str()), "m").await?;
    let other = ctx.connect().await;
    expect_reply(
        "get on another connection's exclusive queue",
        other.get(&q, true).await,
        "resource_locked",
        405,
        (60, 70),
    )?;
    let g = take_one(&**ctx.transport(), &q, true, "get by the owner").await?;
    ensure_eq("owner's get", got(&g).as_str(), "m")
}

async fn does_not_delete_an_auto_delete_queue(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("ad")).durable(false).auto_delete(true))
        .await?;
    let t = ctx.transport();
    ctx.publish_all(&Destination::queue(q.as_str()), &["a", "b"]).await?;
    let g = take_one(&**t, &q, false, "get a").await?;
    g.delivery.ack().await.ctx("ack a")?;
    let g = take_one(&**t, &q, true, "get b").await?;
    ensure_eq("get b", got(&g).as_str(), "b")?;
    // A get is not a consumer: nothing fires the auto-delete.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let info = t
        .queue_info(&q)
        .await
        .ctx("an auto-delete queue after gets (RabbitMQ keeps it)")?;
    ensure_eq("consumers of the auto-delete queue", info.consumer_count, 0)
}
