//! Delivery scenarios: ack, nack/reject with and without requeue (and
//! where a requeued message goes), prefetch, competing consumers, cancel,
//! a queue deleted under its consumer, auto-ack, and unacked deliveries of
//! a closed connection.

use super::support::*;
use super::{case, expect_nothing, Case};
use crate::topology::{Destination, QueueSpec};
use crate::transport::{ConsumeOptions, Subscription};

/// The delivery scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(delivery::ack_removes_the_message),
        case!(delivery::nack_requeue_returns_to_original_position),
        case!(delivery::reject_requeue_redelivers),
        case!(delivery::reject_without_requeue_and_no_dlx_drops),
        case!(delivery::prefetch_bounds_in_flight),
        case!(delivery::prefetch_is_per_consumer),
        case!(delivery::competing_consumers_share_round_robin),
        case!(delivery::cancel_ends_the_stream),
        case!(delivery::unacked_stay_settleable_after_cancel),
        case!(delivery::queue_deleted_under_consumer),
        case!(delivery::auto_ack_consumer),
        case!(delivery::closing_a_connection_requeues_its_unacked),
        case!(delivery::single_active_consumer),
    ]
}

/// Reads `queue` with a fresh consumer: as many deliveries as its depth
/// reports (each within [`WAIT`]), then until it is quiet; returns `(body,
/// redelivered)` in delivery order, each acknowledged.
async fn drain_flags(ctx: &Ctx<'_>, queue: &str) -> Result<Vec<(String, bool)>, String> {
    let ready = ctx.depth(queue).await?;
    let mut sub = ctx.consume(queue, ConsumeOptions::default().prefetch(100)).await?;
    let mut out = Vec::new();
    for d in take(&mut sub, ready as usize).await? {
        out.push((body(&d), d.info.redelivered));
        d.ack().await.ctx("ack")?;
    }
    loop {
        match tokio::time::timeout(QUIET, sub.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(Ok(d))) => {
                out.push((body(&d), d.info.redelivered));
                d.ack().await.ctx("ack")?;
            }
            Ok(Some(Err(e))) => return Err(format!("draining '{queue}': {e}")),
        }
    }
    cancel(&sub).await.ctx("cancel")?;
    Ok(out)
}

async fn ack_removes_the_message(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish(&Destination::queue(q.as_str()), "m").await?;
    let mut sub = ctx
        .consume(&q, ConsumeOptions::default().consumer_tag(ctx.name("tag")))
        .await?;
    ensure_eq(
        "subscription consumer tag",
        sub.consumer_tag(),
        ctx.name("tag").as_str(),
    )?;
    let d = take(&mut sub, 1).await?.remove(0);
    ensure_eq("body", body(&d).as_str(), "m")?;
    ensure_eq("redelivered on first delivery", d.info.redelivered, false)?;
    ensure_eq("delivery exchange", &*d.info.exchange, "")?;
    ensure_eq("delivery routing key", &*d.info.routing_key, q.as_str())?;
    ensure_eq("delivery queue", &*d.info.queue, q.as_str())?;
    ensure_eq("delivery consumer tag", &*d.info.consumer_tag, sub.consumer_tag())?;
    ensure(d.needs_settlement(), || {
        "a manual-ack delivery must need settlement".into()
    })?;
    d.ack().await.ctx("ack")?;
    cancel(&sub).await.ctx("cancel")?;
    ctx.wait_depth(&q, 0).await?;
    ensure_eq("queue after ack", drain_flags(ctx, &q).await?, vec![])
}

async fn nack_requeue_returns_to_original_position(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["1", "2", "3", "4"])
        .await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(3)).await?;
    let mut got = take(&mut sub, 3).await?;
    ensure_eq(
        "first three deliveries",
        got.iter().map(body).collect::<Vec<_>>(),
        vec!["1".to_string(), "2".into(), "3".into()],
    )?;
    // Stop the consumer so that requeued messages stay in the queue, then
    // requeue 1 and 3 (in that order) and ack 2.
    cancel(&sub).await.ctx("cancel")?;
    let d3 = got.pop().expect("three deliveries");
    let d2 = got.pop().expect("three deliveries");
    let d1 = got.pop().expect("three deliveries");
    d1.nack(true).await.ctx("nack 1 with requeue")?;
    d3.nack(true).await.ctx("nack 3 with requeue")?;
    d2.ack().await.ctx("ack 2")?;
    ctx.wait_depth(&q, 3).await?;
    // RabbitMQ puts requeued messages back at their original position.
    ensure_eq(
        "queue order after requeue, (body, redelivered)",
        drain_flags(ctx, &q).await?,
        vec![("1".to_string(), true), ("3".into(), true), ("4".into(), false)],
    )
}

async fn reject_requeue_redelivers(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish(&Destination::queue(q.as_str()), "again").await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(1)).await?;
    let d = take(&mut sub, 1).await?.remove(0);
    ensure_eq("redelivered on first delivery", d.info.redelivered, false)?;
    d.reject(true).await.ctx("reject with requeue")?;
    let d = take(&mut sub, 1).await?.remove(0);
    ensure_eq("body redelivered", body(&d).as_str(), "again")?;
    ensure_eq("redelivered after reject(requeue)", d.info.redelivered, true)?;
    d.ack().await.ctx("ack")?;
    expect_nothing(&mut sub, QUIET).await?;
    cancel(&sub).await.ctx("cancel")
}

async fn reject_without_requeue_and_no_dlx_drops(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["r", "n"]).await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(2)).await?;
    let mut got = take(&mut sub, 2).await?;
    got.remove(0).reject(false).await.ctx("reject without requeue")?;
    got.remove(0).nack(false).await.ctx("nack without requeue")?;
    expect_nothing(&mut sub, QUIET).await?;
    cancel(&sub).await.ctx("cancel")?;
    ensure_eq("depth after reject/nack without requeue", ctx.depth(&q).await?, 0)
}

async fn prefetch_bounds_in_flight(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["1", "2", "3", "4", "5"])
        .await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(2)).await?;
    let mut held = take(&mut sub, 2).await?;
    expect_nothing(&mut sub, QUIET)
        .await
        .map_err(|e| format!("prefetch 2 with 2 unacked: {e}"))?;
    ctx.wait_depth(&q, 3).await?;
    held.remove(0).ack().await.ctx("ack")?;
    let third = take(&mut sub, 1).await?;
    ensure_eq("delivery after one ack", body(&third[0]).as_str(), "3")?;
    expect_nothing(&mut sub, QUIET)
        .await
        .map_err(|e| format!("prefetch 2 with 2 unacked (after one ack): {e}"))?;
    ensure_eq("depth with 3 delivered", ctx.depth(&q).await?, 2)?;
    for d in held.into_iter().chain(third) {
        d.ack().await.ctx("ack")?;
    }
    let rest = take_bodies(&mut sub, 2).await?;
    ensure_eq("last deliveries", rest, vec!["4".to_string(), "5".into()])?;
    cancel(&sub).await.ctx("cancel")
}

async fn competing_consumers_share_round_robin(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let other = ctx.connect().await;
    let mut a = ctx.consume(&q, ConsumeOptions::default().prefetch(20)).await?;
    let mut b = other
        .consume(&q, ConsumeOptions::default().prefetch(20))
        .await
        .ctx("consume from a second connection")?;
    let bodies: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    ctx.publish_all(&Destination::queue(q.as_str()), &refs).await?;
    let got_a = take_bodies(&mut a, 5).await.map_err(|e| format!("consumer A: {e}"))?;
    let got_b = take_bodies(&mut b, 5).await.map_err(|e| format!("consumer B: {e}"))?;
    expect_nothing(&mut a, QUIET).await?;
    expect_nothing(&mut b, QUIET).await?;
    // RabbitMQ alternates strictly between consumers with free prefetch.
    let evens: Vec<String> = (0..10).step_by(2).map(|i: i32| i.to_string()).collect();
    let odds: Vec<String> = (1..10).step_by(2).map(|i: i32| i.to_string()).collect();
    ensure(
        (got_a == evens && got_b == odds) || (got_a == odds && got_b == evens),
        || format!("round robin: consumer A got {got_a:?}, B got {got_b:?}; expected alternation (evens/odds)"),
    )?;
    cancel(&a).await.ctx("cancel A")?;
    cancel(&b).await.ctx("cancel B")
}

/// Waits for the end of `sub` (`None`), skipping nothing: a delivery or an
/// error before the end fails.
async fn expect_end(sub: &mut Subscription) -> Result<(), String> {
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(None) => Ok(()),
        Ok(Some(Ok(d))) => Err(format!("expected the stream to end, got a delivery {:?}", body(&d))),
        Ok(Some(Err(e))) => Err(format!("expected the stream to end, got error {} ({e})", e.code())),
        Err(_) => Err(format!("the stream did not end within {WAIT:?}")),
    }
}

async fn cancel_ends_the_stream(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default()).await?;
    let handle = sub.cancel_handle();
    handle.cancel().await.ctx("cancel through the handle")?;
    expect_end(&mut sub).await?;
    ctx.publish(&Destination::queue(q.as_str()), "after-cancel").await?;
    ctx.wait_depth(&q, 1).await?;
    ensure_eq(
        "consumer_count after cancel",
        ctx.transport().queue_info(&q).await.ctx("queue_info")?.consumer_count,
        0,
    )?;
    ensure(sub.next().await.is_none(), || {
        "a cancelled subscription yielded again".into()
    })
}

async fn unacked_stay_settleable_after_cancel(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["a", "b"]).await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let mut got = take(&mut sub, 2).await?;
    cancel(&sub).await.ctx("cancel")?;
    ensure_eq("depth after cancel with 2 unacked", ctx.depth(&q).await?, 0)?;
    got.remove(0).ack().await.ctx("ack after cancel")?;
    got.remove(0).nack(true).await.ctx("nack(requeue) after cancel")?;
    ctx.wait_depth(&q, 1).await?;
    ensure_eq(
        "queue after settling",
        drain_flags(ctx, &q).await?,
        vec![("b".to_string(), true)],
    )
}

async fn queue_deleted_under_consumer(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default()).await?;
    let other = ctx.connect().await;
    other
        .delete_queue(&q)
        .await
        .ctx("delete the queue from another connection")?;
    match tokio::time::timeout(WAIT, sub.next()).await {
        Ok(Some(Err(e))) if e.code() == "consumer_cancelled" => {}
        Ok(Some(Err(e))) => return Err(format!("expected consumer_cancelled, got {} ({e})", e.code())),
        Ok(Some(Ok(d))) => return Err(format!("expected consumer_cancelled, got a delivery {:?}", body(&d))),
        Ok(None) => return Err("the stream ended without Err(consumer_cancelled)".into()),
        Err(_) => {
            return Err(format!(
                "no consumer_cancelled within {WAIT:?} after the queue was deleted"
            ))
        }
    }
    expect_end(&mut sub).await
}

async fn auto_ack_consumer(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["1", "2", "3"])
        .await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().auto_ack(true)).await?;
    let got = take(&mut sub, 3).await?;
    ensure(got.iter().all(|d| !d.needs_settlement()), || {
        "auto-ack deliveries must not need settlement".into()
    })?;
    ensure_eq(
        "bodies",
        got.iter().map(body).collect::<Vec<_>>(),
        vec!["1".to_string(), "2".into(), "3".into()],
    )?;
    ctx.wait_depth(&q, 0).await?;
    cancel(&sub).await.ctx("cancel")?;
    drop(got);
    drop(sub);
    // Nothing comes back: they were acknowledged on delivery.
    ensure_eq("queue after auto-ack consumer", drain_flags(ctx, &q).await?, vec![])
}

async fn closing_a_connection_requeues_its_unacked(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["1", "2", "3"])
        .await?;
    let other = ctx.connect().await;
    let mut sub = other
        .consume(&q, ConsumeOptions::default().prefetch(2))
        .await
        .ctx("consume from a second connection")?;
    let got = take(&mut sub, 2).await?;
    ctx.wait_depth(&q, 1).await?;
    other.close().await.ctx("close the second connection")?;
    drop(got);
    drop(sub);
    ctx.wait_depth(&q, 3).await?;
    // Back at their original positions, marked redelivered.
    ensure_eq(
        "queue after the consumer's connection closed",
        drain_flags(ctx, &q).await?,
        vec![("1".to_string(), true), ("2".into(), true), ("3".into(), false)],
    )
}

async fn single_active_consumer(ctx: &Ctx<'_>) -> Result<(), String> {
    let mut spec = QueueSpec::new(ctx.queue_name("sac"));
    spec.arguments.single_active_consumer = true;
    let q = ctx.declare_queue(spec).await?;
    let other = ctx.connect().await;
    let mut a = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let mut b = other
        .consume(&q, ConsumeOptions::default().prefetch(10))
        .await
        .ctx("consume from a second connection")?;
    let dest = Destination::queue(q.as_str());
    ctx.publish_all(&dest, &["0", "1", "2", "3"]).await?;
    // Only the first consumer is active.
    let got = take_bodies(&mut a, 4)
        .await
        .map_err(|e| format!("active consumer: {e}"))?;
    ensure_eq(
        "active consumer",
        got,
        vec!["0".to_string(), "1".into(), "2".into(), "3".into()],
    )?;
    expect_nothing(&mut b, QUIET)
        .await
        .map_err(|e| format!("the standby consumer must get nothing: {e}"))?;
    ensure_eq(
        "consumer_count counts the standby consumer",
        ctx.transport().queue_info(&q).await.ctx("queue_info")?.consumer_count,
        2,
    )?;
    // When the active one goes, the standby takes over.
    cancel(&a).await.ctx("cancel the active consumer")?;
    ctx.publish_all(&dest, &["4", "5"]).await?;
    let got = take_bodies(&mut b, 2)
        .await
        .map_err(|e| format!("standby consumer: {e}"))?;
    ensure_eq("consumer that took over", got, vec!["4".to_string(), "5".into()])?;
    cancel(&b).await.ctx("cancel")
}

async fn prefetch_is_per_consumer(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["0", "1", "2", "3"])
        .await?;
    // Two consumers on one transport, prefetch 1 each: one delivery each.
    let mut a = ctx.consume(&q, ConsumeOptions::default().prefetch(1)).await?;
    let mut b = ctx.consume(&q, ConsumeOptions::default().prefetch(1)).await?;
    let da = take(&mut a, 1).await.map_err(|e| format!("consumer A: {e}"))?;
    let db = take(&mut b, 1).await.map_err(|e| format!("consumer B: {e}"))?;
    expect_nothing(&mut a, QUIET)
        .await
        .map_err(|e| format!("consumer A with prefetch 1: {e}"))?;
    expect_nothing(&mut b, QUIET)
        .await
        .map_err(|e| format!("consumer B with prefetch 1: {e}"))?;
    ensure_eq("depth with one unacked per consumer", ctx.depth(&q).await?, 2)?;
    for d in da.into_iter().chain(db) {
        d.ack().await.ctx("ack")?;
    }
    take_bodies(&mut a, 1).await?;
    take_bodies(&mut b, 1).await?;
    cancel(&a).await.ctx("cancel")?;
    cancel(&b).await.ctx("cancel")
}
