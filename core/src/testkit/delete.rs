//! Conditional deletes ([`Admin::delete_queue_if`](crate::transport::Admin::delete_queue_if),
//! [`Admin::delete_exchange_if_unused`](crate::transport::Admin::delete_exchange_if_unused)):
//! RabbitMQ's `if-unused` / `if-empty` and its 406 answers. Probed on
//! RabbitMQ 3.10.8 with `transport-memory/scripts/probe-ops.py` (see
//! `docs/rabbitmq-semantics.md`).

use super::support::*;
use super::twin::expect_reply;
use super::{case, recv, Case};
use crate::topology::{Binding, Destination, ExchangeKind};
use crate::transport::{ConsumeOptions, DeleteIf};

/// The conditional delete scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(delete::queue_if_unused_refuses_while_consumed),
        case!(delete::queue_if_empty_counts_ready_messages_only),
        case!(delete::exchange_if_unused_refuses_while_a_source),
        case!(delete::conditional_deletes_of_missing_entities_succeed),
    ]
}

async fn gone(ctx: &Ctx<'_>, queue: &str) -> Result<(), String> {
    expect_code(
        &format!("queue_info of the deleted queue '{queue}'"),
        ctx.transport().queue_info(queue).await,
        "queue_not_found",
    )
    .map(|_| ())
}

async fn queue_if_unused_refuses_while_consumed(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let t = ctx.transport();
    let mut sub = ctx.consume(&q, ConsumeOptions::default().auto_ack(true)).await?;
    expect_reply(
        "delete_queue_if(unused) with a consumer",
        t.delete_queue_if(&q, DeleteIf::unused()).await,
        "precondition_failed",
        406,
        (50, 40),
    )?;
    // Nothing changed: the queue and its consumer carry on.
    ctx.publish(&Destination::queue(q.as_str()), "still-consumed").await?;
    let d = recv(&mut sub, WAIT).await?;
    ensure_eq("delivery after the refused delete", body(&d).as_str(), "still-consumed")?;
    cancel(&sub).await.ctx("cancel the consumer")?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["a", "b"]).await?;
    ctx.wait_depth(&q, 2).await?;
    let n = t
        .delete_queue_if(&q, DeleteIf::unused())
        .await
        .ctx("delete_queue_if(unused) without consumers")?;
    ensure_eq("ready messages deleted with the unused queue", n, 2)?;
    gone(ctx, &q).await
}

async fn queue_if_empty_counts_ready_messages_only(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let t = ctx.transport();
    ctx.publish(&Destination::queue(q.as_str()), "m").await?;
    expect_reply(
        "delete_queue_if(empty) with a ready message",
        t.delete_queue_if(&q, DeleteIf::empty()).await,
        "precondition_failed",
        406,
        (50, 40),
    )?;
    ensure_eq("depth after the refused delete", ctx.depth(&q).await?, 1)?;
    expect_reply(
        "delete_queue_if(unused and empty) with a ready message",
        t.delete_queue_if(&q, DeleteIf::unused_and_empty()).await,
        "precondition_failed",
        406,
        (50, 40),
    )?;
    // Delivered and unacknowledged: RabbitMQ counts only ready messages.
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(1)).await?;
    let d = recv(&mut sub, WAIT).await?;
    ensure_eq("delivery", body(&d).as_str(), "m")?;
    ctx.wait_depth(&q, 0).await?;
    let n = t
        .delete_queue_if(&q, DeleteIf::empty())
        .await
        .ctx("delete_queue_if(empty) with only an unacked message (RabbitMQ deletes it)")?;
    ensure_eq("ready messages deleted", n, 0)?;
    gone(ctx, &q).await?;
    drop(d);
    Ok(())
}

async fn exchange_if_unused_refuses_while_a_source(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    let x = ctx.exchange("x", ExchangeKind::Direct).await?;
    let y = ctx.exchange("y", ExchangeKind::Direct).await?;
    let q = ctx.queue("q").await?;
    ctx.bind(&q, &x, "k").await?;
    expect_reply(
        "delete_exchange_if_unused with a queue bound",
        t.delete_exchange_if_unused(&x).await,
        "precondition_failed",
        406,
        (40, 20),
    )?;
    ensure(t.exchange_exists(&x).await.ctx("exchange_exists")?, || {
        "the refused exchange should still exist".into()
    })?;
    // Still routing.
    ctx.publish(&Destination::new(x.as_str(), "k"), "routed").await?;
    ctx.wait_depth(&q, 1).await?;
    t.unbind(&Binding::queue(q.as_str(), x.as_str(), "k"))
        .await
        .ctx("unbind the queue")?;
    // y -> x: x is only a destination, y is a source.
    t.bind(&Binding::exchange(x.as_str(), y.as_str(), "k"))
        .await
        .ctx("bind exchange x to exchange y")?;
    expect_reply(
        "delete_exchange_if_unused of the source of an exchange-to-exchange binding",
        t.delete_exchange_if_unused(&y).await,
        "precondition_failed",
        406,
        (40, 20),
    )?;
    t.delete_exchange_if_unused(&x)
        .await
        .ctx("delete_exchange_if_unused of an exchange that is only a destination (RabbitMQ deletes it)")?;
    ensure(!t.exchange_exists(&x).await.ctx("exchange_exists x")?, || {
        "x should be deleted".into()
    })?;
    // Deleting x removed the binding y -> x: y is unused now.
    t.delete_exchange_if_unused(&y)
        .await
        .ctx("delete_exchange_if_unused of an exchange without bindings")?;
    ensure(!t.exchange_exists(&y).await.ctx("exchange_exists y")?, || {
        "y should be deleted".into()
    })
}

async fn conditional_deletes_of_missing_entities_succeed(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    let n = t
        .delete_queue_if(&ctx.name("missing-q"), DeleteIf::unused_and_empty())
        .await
        .ctx("delete_queue_if of a missing queue")?;
    ensure_eq("count of a missing queue", n, 0)?;
    t.delete_exchange_if_unused(&ctx.name("missing-x"))
        .await
        .ctx("delete_exchange_if_unused of a missing exchange")?;
    // The transport carries on.
    let q = ctx.queue("q").await?;
    ensure_eq("depth of a fresh queue", ctx.depth(&q).await?, 0)
}
