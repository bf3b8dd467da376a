//! Runtime scenarios: Worker settlement (ack, dead-letter on permanent and
//! decode failures, requeue on transient ones), RPC round trip and timeout,
//! graceful shutdown without loss, the concurrency bound.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::support::*;
use super::{case, Case};
use crate::handler::{handler_fn, CorrelationId, HandlerError, Json};
use crate::message::Message;
use crate::rpc::RpcClient;
use crate::topology::{Destination, ExchangeKind, QueueSpec};
use crate::transport::DeliveryInfo;
use crate::worker::{RouteConfig, RouteStats, Worker, WorkerHandle};

/// The runtime scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(runtime::worker_acks_on_success),
        case!(runtime::worker_permanent_error_dead_letters, DeadLettering),
        case!(runtime::worker_transient_error_requeues_and_redelivers),
        case!(runtime::worker_malformed_json_dead_letters, DeadLettering),
        case!(runtime::rpc_round_trip_keeps_correlation_id),
        case!(runtime::rpc_timeout_leaves_no_waiter_and_counts_late_reply),
        case!(runtime::graceful_shutdown_loses_nothing),
        case!(runtime::concurrency_bound_is_honoured),
    ]
}

fn stats(h: &WorkerHandle, q: &str) -> RouteStats {
    h.stats(q).unwrap_or_default()
}

/// Waits until `cond` holds on the route's counters.
async fn wait_stats(
    h: &WorkerHandle,
    q: &str,
    what: &str,
    cond: impl Fn(&RouteStats) -> bool + Send + Sync,
) -> Result<(), String> {
    let ok = eventually(WAIT * 2, || {
        let s = stats(h, q);
        let ok = cond(&s);
        async move { ok }
    })
    .await;
    ensure(ok, || {
        format!("worker on '{q}': {what} not reached; counters {:?}", stats(h, q))
    })
}

/// A work queue dead-lettering into a fanout DLX bound to a dead queue.
async fn with_dead_letter_queue(ctx: &Ctx<'_>) -> Result<(String, String), String> {
    let dlx = ctx.exchange("dlx", ExchangeKind::Fanout).await?;
    let dead = ctx.queue("dead").await?;
    ctx.bind(&dead, &dlx, "").await?;
    let work = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("work")).dead_letter(dlx.as_str(), None))
        .await?;
    Ok((work, dead))
}

async fn worker_acks_on_success(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("work").await?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["a", "b", "c", "d", "e"])
        .await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let h = Worker::new(ctx.transport().clone())
        .route(
            q.as_str(),
            handler_fn(move |crate::handler::Text(t): crate::handler::Text| {
                let seen = s2.clone();
                async move {
                    seen.lock().push(t);
                }
            }),
        )
        .start()
        .await
        .ctx("start worker")?;
    wait_stats(&h, &q, "5 acks", |s| s.acked == 5).await?;
    h.shutdown().await.ctx("shutdown")?;
    let mut got = seen.lock().clone();
    got.sort();
    ensure_eq(
        "handled bodies",
        got,
        vec!["a", "b", "c", "d", "e"].into_iter().map(String::from).collect(),
    )?;
    let s = stats(&h, &q);
    ensure_eq(
        "(requeued, rejected, failed)",
        (s.requeued, s.rejected, s.failed),
        (0, 0, 0),
    )?;
    ctx.wait_depth(&q, 0).await?;
    ensure(ctx.drain(&q).await?.is_empty(), || "acked messages came back".into())
}

async fn worker_permanent_error_dead_letters(ctx: &Ctx<'_>) -> Result<(), String> {
    let (work, dead) = with_dead_letter_queue(ctx).await?;
    ctx.publish(&Destination::queue(work.as_str()), "poison").await?;
    let h = Worker::new(ctx.transport().clone())
        .route(
            work.as_str(),
            handler_fn(|| async { Err::<(), _>(HandlerError::reject("cannot process")) }),
        )
        .start()
        .await
        .ctx("start worker")?;
    wait_stats(&h, &work, "1 rejection", |s| s.rejected == 1).await?;
    h.shutdown().await.ctx("shutdown")?;
    ctx.wait_depth(&dead, 1).await?;
    ensure_eq(
        "dead-lettered bodies",
        ctx.drain(&dead).await?,
        vec!["poison".to_string()],
    )?;
    ctx.wait_depth(&work, 0).await?;
    ensure_eq("acked", stats(&h, &work).acked, 0)
}

async fn worker_transient_error_requeues_and_redelivers(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("work").await?;
    ctx.publish(&Destination::queue(q.as_str()), "flaky").await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let h = Worker::new(ctx.transport().clone())
        .route(
            q.as_str(),
            handler_fn(move |info: DeliveryInfo| {
                let seen = s2.clone();
                async move {
                    seen.lock().push(info.redelivered);
                    if info.redelivered {
                        Ok(())
                    } else {
                        Err(HandlerError::retry("dependency down"))
                    }
                }
            }),
        )
        .start()
        .await
        .ctx("start worker")?;
    wait_stats(&h, &q, "1 requeue then 1 ack", |s| s.requeued == 1 && s.acked == 1).await?;
    h.shutdown().await.ctx("shutdown")?;
    ensure_eq("redelivered flags seen", seen.lock().clone(), vec![false, true])?;
    ctx.wait_depth(&q, 0).await
}

async fn worker_malformed_json_dead_letters(ctx: &Ctx<'_>) -> Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Order {
        #[allow(dead_code)]
        id: u64,
    }
    let (work, dead) = with_dead_letter_queue(ctx).await?;
    let dest = Destination::queue(work.as_str());
    ctx.publish_message(
        &dest,
        Message::new("{\"id\": oops").with_content_type("application/json"),
    )
    .await?;
    ctx.publish_message(&dest, Message::new("{\"id\": 7}").with_content_type("application/json"))
        .await?;
    let handled = Arc::new(AtomicUsize::new(0));
    let h2 = handled.clone();
    let h = Worker::new(ctx.transport().clone())
        .route(
            work.as_str(),
            handler_fn(move |Json(_o): Json<Order>| {
                let handled = h2.clone();
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                }
            }),
        )
        .start()
        .await
        .ctx("start worker")?;
    wait_stats(&h, &work, "1 ack and 1 rejection", |s| s.acked == 1 && s.rejected == 1).await?;
    h.shutdown().await.ctx("shutdown")?;
    ensure_eq(
        "handler calls (decode failures never reach it)",
        handled.load(Ordering::SeqCst),
        1,
    )?;
    ctx.wait_depth(&dead, 1).await?;
    ensure_eq(
        "dead-lettered bodies",
        ctx.drain(&dead).await?,
        vec!["{\"id\": oops".to_string()],
    )?;
    ctx.wait_depth(&work, 0).await
}

async fn rpc_round_trip_keeps_correlation_id(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("rpc").await?;
    // The responder echoes the request's correlation id in the body.
    let h = Worker::new(ctx.transport().clone())
        .route(
            q.as_str(),
            handler_fn(|CorrelationId(cid): CorrelationId| async move { Message::new(cid.unwrap_or_default()) }),
        )
        .start()
        .await
        .ctx("start responder")?;
    let client_conn = ctx.connect().await;
    let client = RpcClient::new(client_conn).await.ctx("open rpc client")?;
    let dest = Destination::queue(q.as_str());
    for _ in 0..3 {
        let reply = client.call(&dest, Message::new("ping"), WAIT).await.ctx("rpc call")?;
        let cid = reply
            .properties
            .correlation_id
            .as_deref()
            .unwrap_or_default()
            .to_owned();
        ensure(!cid.is_empty(), || "reply has no correlation id".into())?;
        ensure_eq(
            "reply correlation id = request correlation id",
            cid,
            String::from_utf8_lossy(&reply.body).into_owned(),
        )?;
    }
    ensure_eq("pending calls", client.pending_calls(), 0)?;
    ensure_eq("late replies", client.late_replies(), 0)?;
    // The reply can reach the caller before the responder's publish returns.
    wait_stats(&h, &q, "3 replies published", |s| s.replied == 3).await?;
    h.shutdown().await.ctx("shutdown")
}

async fn rpc_timeout_leaves_no_waiter_and_counts_late_reply(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("rpc").await?;
    let client = RpcClient::new(ctx.transport().clone()).await.ctx("open rpc client")?;
    let dest = Destination::queue(q.as_str());
    let r = client
        .call(&dest, Message::new("anyone?"), Duration::from_millis(300))
        .await;
    let e = expect_code("call without a responder", r, "rpc_timeout")?;
    ensure(e.to_string().contains(&q), || {
        format!("timeout error should name the destination: {e}")
    })?;
    ensure_eq("pending calls after the timeout", client.pending_calls(), 0)?;
    // A responder now answers the old request: its reply is late, dropped and counted.
    let h = Worker::new(ctx.transport().clone())
        .route(q.as_str(), handler_fn(|| async { Message::new("too late") }))
        .start()
        .await
        .ctx("start responder")?;
    let counted = eventually(WAIT, || {
        let n = client.late_replies();
        async move { n == 1 }
    })
    .await;
    h.shutdown().await.ctx("shutdown")?;
    ensure(counted, || {
        format!("late reply not counted (late_replies = {})", client.late_replies())
    })?;
    ensure_eq("pending calls", client.pending_calls(), 0)
}

async fn graceful_shutdown_loses_nothing(ctx: &Ctx<'_>) -> Result<(), String> {
    const N: usize = 20;
    let q = ctx.queue("work").await?;
    let bodies: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    ctx.publish_all(&Destination::queue(q.as_str()), &refs).await?;
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (s2, f2) = (started.clone(), finished.clone());
    let h = Worker::new(ctx.transport().clone())
        .route_with(
            q.as_str(),
            handler_fn(move || {
                let (started, finished) = (s2.clone(), f2.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            }),
            RouteConfig::default().prefetch(10).concurrency(2),
        )
        .shutdown_timeout(Duration::from_secs(10))
        .start()
        .await
        .ctx("start worker")?;
    let busy = eventually(WAIT, || {
        let n = started.load(Ordering::SeqCst);
        async move { n >= 2 }
    })
    .await;
    ensure(busy, || "handlers never started".into())?;
    h.shutdown().await.ctx("shutdown")?;
    let s = stats(&h, &q);
    let (st, fin) = (started.load(Ordering::SeqCst), finished.load(Ordering::SeqCst));
    ensure_eq("in-flight handlers finished (started = finished)", fin, st)?;
    ensure_eq("acked = finished handlers", s.acked as usize, fin)?;
    ensure(fin < N, || {
        format!("shutdown came too late to test anything ({fin} of {N} handled)")
    })?;
    // None lost, none left unacked: everything not acked is ready again.
    ctx.wait_depth(&q, (N - fin) as u32).await?;
    let rest = ctx.drain(&q).await?;
    ensure_eq("messages back in the queue", rest.len(), N - fin)
}

async fn concurrency_bound_is_honoured(ctx: &Ctx<'_>) -> Result<(), String> {
    const N: usize = 12;
    let q = ctx.queue("work").await?;
    let bodies: Vec<String> = (0..N).map(|i| format!("m{i}")).collect();
    let refs: Vec<&str> = bodies.iter().map(String::as_str).collect();
    ctx.publish_all(&Destination::queue(q.as_str()), &refs).await?;
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (n2, m2) = (now.clone(), max.clone());
    let h = Worker::new(ctx.transport().clone())
        .route_with(
            q.as_str(),
            handler_fn(move || {
                let (now, max) = (n2.clone(), m2.clone());
                async move {
                    let c = now.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(c, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                }
            }),
            RouteConfig::default().prefetch(10).concurrency(3),
        )
        .start()
        .await
        .ctx("start worker")?;
    wait_stats(&h, &q, "all acked", |s| s.acked == N as u64).await?;
    h.shutdown().await.ctx("shutdown")?;
    let m = max.load(Ordering::SeqCst);
    ensure(m <= 3, || format!("{m} handlers ran at once with concurrency 3"))?;
    ensure(m >= 2, || {
        format!("handlers never overlapped (max {m}) with concurrency 3")
    })?;
    ensure(stats(&h, &q).max_in_flight <= 3, || {
        "max_in_flight counter above the bound".into()
    })?;
    ctx.wait_depth(&q, 0).await
}
