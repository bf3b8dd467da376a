//! Regression tests for review findings, on the memory transport run by
//! core's Worker: a dead letter or retry that routes nowhere is never acked
//! and lost, replay settles everything it takes, de-duplication is per queue
//! and safe with copies in flight, and an open circuit breaker does not spin.

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::*;
use switchyard_core::headers::*;
use switchyard_core::worker::RouteConfig;
use switchyard_core::{
    handler_fn, Binding, Destination, Envelope, Error, ExchangeSpec, HandlerError, Message, PublishOptions, Publisher,
    QueueSpec,
};
use switchyard_middleware::circuit_breaker::CircuitState;
use switchyard_middleware::dead_letter::{replay_queue, ReplayOptions};
use switchyard_middleware::prelude::*;
use switchyard_middleware::retry::wait_queue_name;
use tower::{Layer, ServiceExt};

fn counter() -> (Arc<AtomicU32>, Arc<AtomicU32>) {
    let c = Arc::new(AtomicU32::new(0));
    (c.clone(), c)
}

/// Queue `tasks`, bound to `shop` with `task.*`, whose own dead-letter
/// exchange is `app.dlx` (fanout -> `dead`).
async fn tasks_queue(s: &Setup) {
    s.transport
        .declare_queue(&QueueSpec::new("tasks").dead_letter("app.dlx", None))
        .await
        .unwrap();
    s.transport
        .bind(&Binding::queue("tasks", "shop", "task.*"))
        .await
        .unwrap();
}

#[tokio::test]
async fn unroutable_dead_letter_is_rejected_to_the_queues_dlx_not_acked() {
    let s = setup().await;
    tasks_queue(&s).await;
    // a direct DLX bound only with "dead_letter", while the layer keeps the original routing key
    s.transport
        .declare_exchange(&ExchangeSpec::direct("app.dlx.direct"))
        .await
        .unwrap();
    s.transport.declare_queue(&QueueSpec::new("dead_letter")).await.unwrap();
    s.transport
        .bind(&Binding::queue("dead_letter", "app.dlx.direct", "dead_letter"))
        .await
        .unwrap();
    let h = DeadLetterLayer::new(s.transport.clone(), "app.dlx.direct").layer(handler_fn(|_e: Envelope| async {
        Err::<(), _>(HandlerError::reject("bad"))
    }));
    let w = start(&s.transport, "tasks", h).await;
    s.publish_to_shop("task.created", Message::new("t1").with_message_id("t-1"))
        .await;
    let st = handled(&w, "tasks", 1).await;
    assert_eq!((st.acked, st.rejected), (0, 1), "rejected, not acked: {st:?}");
    w.shutdown().await.unwrap();
    assert_eq!(ready_count(&s.transport, "dead_letter").await, 0);
    let dead = drain(&s.transport, "dead").await;
    assert_eq!(dead.len(), 1, "the queue's own DLX took it");
    assert_eq!(dead[0].properties.message_id.as_deref(), Some("t-1"));
    assert!(dead[0].headers.contains_key(X_DEATH));
}

#[tokio::test]
async fn dead_letter_routing_key_reaches_a_topic_dlx() {
    let s = setup().await;
    tasks_queue(&s).await;
    s.transport
        .declare_exchange(&ExchangeSpec::topic("app.dlx.topic"))
        .await
        .unwrap();
    s.transport.declare_queue(&QueueSpec::new("dead_letter")).await.unwrap();
    s.transport
        .bind(&Binding::queue("dead_letter", "app.dlx.topic", "dead_letter"))
        .await
        .unwrap();
    let h = DeadLetterLayer::new(s.transport.clone(), "app.dlx.topic")
        .routing_key("dead_letter")
        .layer(handler_fn(|_e: Envelope| async {
            Err::<(), _>(HandlerError::reject("bad"))
        }));
    let w = start(&s.transport, "tasks", h).await;
    s.publish_to_shop("task.created", Message::new("t2")).await;
    let st = handled(&w, "tasks", 1).await;
    assert_eq!((st.acked, st.rejected), (1, 0), "dead-lettered and acked: {st:?}");
    w.shutdown().await.unwrap();
    let dl = drain(&s.transport, "dead_letter").await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0].headers.get_str(ORIGINAL_ROUTING_KEY), Some("task.created"));
    assert_eq!(ready_count(&s.transport, "dead").await, 0);
}

#[tokio::test]
async fn broker_delayed_retry_redeclares_a_deleted_wait_queue() {
    let s = setup().await;
    let delay = Duration::from_secs(60);
    let h = RetryLayer::broker_delayed(RetryPolicy::explicit([delay]), s.transport.clone(), s.transport.clone())
        .durable_wait_queues(false)
        .layer(handler_fn(|_e: Envelope| async {
            Err::<(), _>(HandlerError::retry("db down"))
        }));
    let w = start(&s.transport, "orders", h).await;
    let wait = wait_queue_name("orders", delay);
    s.publish_to_shop("order.created", Message::new("1")).await;
    handled(&w, "orders", 1).await;
    assert_eq!(ready_count(&s.transport, &wait).await, 1);
    s.transport.delete_queue(&wait).await.unwrap();
    s.publish_to_shop("order.created", Message::new("2").with_message_id("m-2"))
        .await;
    let st = handled(&w, "orders", 2).await;
    assert_eq!((st.acked, st.requeued), (2, 0), "{st:?}");
    w.shutdown().await.unwrap();
    let waiting = drain(&s.transport, &wait).await;
    assert_eq!(
        waiting.len(),
        1,
        "the wait queue was declared again and holds the retry"
    );
    assert_eq!(waiting[0].properties.message_id.as_deref(), Some("m-2"));
    assert_eq!(waiting[0].headers.get_i64(RETRY_COUNT), Some(1));
}

#[tokio::test]
async fn replay_queue_uses_x_death_for_messages_the_broker_dead_lettered() {
    let s = setup().await;
    tasks_queue(&s).await;
    let (calls, c) = counter();
    let h = handler_fn(move |e: Envelope| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                return Err(HandlerError::reject("not yet"));
            }
            let h = e.headers();
            assert!(!h.contains_key(X_DEATH), "{h:?}");
            assert!(!h.iter().any(|(k, _)| k.starts_with("x-first-death-")), "{h:?}");
            assert_eq!(h.get_str("tenant"), Some("acme"));
            assert_eq!(e.info().exchange.as_ref(), "shop");
            assert_eq!(e.info().routing_key.as_ref(), "task.created");
            Ok(())
        }
    });
    let w = start(&s.transport, "tasks", h).await;
    s.publish_to_shop("task.created", Message::new("t3").with_header("tenant", "acme"))
        .await;
    handled(&w, "tasks", 1).await;
    eventually("broker dead-lettered", || async {
        ready_count(&s.transport, "dead").await == 1
    })
    .await;
    let report = replay_queue(&*s.transport, &*s.transport, "dead", ReplayOptions::default())
        .await
        .unwrap();
    assert_eq!((report.replayed, report.skipped), (1, 0));
    let st = handled(&w, "tasks", 2).await;
    assert_eq!((st.acked, st.rejected), (1, 1), "{st:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    w.shutdown().await.unwrap();
    assert_eq!(ready_count(&s.transport, "dead").await, 0);
}

#[tokio::test]
async fn replay_to_a_destination_that_routes_nowhere_keeps_the_dead_letter() {
    let s = setup().await;
    let dl = Message::new("lost?")
        .with_header(ORIGINAL_EXCHANGE, "shop")
        .with_header(ORIGINAL_ROUTING_KEY, "nobody.listens");
    s.transport.publish(&Destination::queue("dead"), dl).await.unwrap();
    let report = replay_queue(&*s.transport, &*s.transport, "dead", ReplayOptions::default())
        .await
        .unwrap();
    assert_eq!((report.replayed, report.skipped), (0, 1));
    assert_eq!(
        ready_count(&s.transport, "dead").await,
        1,
        "still on the dead-letter queue"
    );
}

/// Fails every publish as the connection dropping would.
struct Disconnected;

#[async_trait]
impl Publisher for Disconnected {
    async fn publish_with(&self, _d: &Destination, _m: Message, _o: PublishOptions) -> switchyard_core::Result<()> {
        Err(Error::ConnectionClosed {
            reply: None,
            message: "test: connection lost".into(),
        })
    }
}

#[tokio::test]
async fn replay_queue_requeues_everything_on_a_transient_publish_error() {
    let s = setup().await;
    for i in 0..3 {
        let dl = Message::new(format!("d{i}"))
            .with_header(ORIGINAL_EXCHANGE, "shop")
            .with_header(ORIGINAL_ROUTING_KEY, "order.created");
        s.transport.publish(&Destination::queue("dead"), dl).await.unwrap();
    }
    let e = replay_queue(&*s.transport, &Disconnected, "dead", ReplayOptions::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), "connection_closed");
    assert_eq!(ready_count(&s.transport, "dead").await, 3, "all requeued, none acked");
    assert_eq!(ready_count(&s.transport, "orders").await, 0);
}

#[tokio::test]
async fn one_dedup_layer_on_two_routes_handles_each_fanout_copy() {
    let s = setup().await;
    s.transport
        .declare_exchange(&ExchangeSpec::fanout("events"))
        .await
        .unwrap();
    for q in ["analytics", "audit"] {
        s.transport.declare_queue(&QueueSpec::new(q)).await.unwrap();
        s.transport.bind(&Binding::queue(q, "events", "")).await.unwrap();
    }
    let dedup = DedupLayer::new(MemoryDedupStore::new(1000));
    let (a, a2) = counter();
    let (b, b2) = counter();
    let ha = dedup.layer(handler_fn(move |_e: Envelope| {
        a2.fetch_add(1, Ordering::SeqCst);
        async {}
    }));
    let hb = dedup.layer(handler_fn(move |_e: Envelope| {
        b2.fetch_add(1, Ordering::SeqCst);
        async {}
    }));
    for _ in 0..2 {
        s.transport
            .publish(
                &Destination::new("events", ""),
                Message::new("e").with_message_id("m-1"),
            )
            .await
            .unwrap();
    }
    let w = switchyard_core::worker::Worker::new(s.transport.clone())
        .route("analytics", ha)
        .route("audit", hb)
        .start()
        .await
        .unwrap();
    let (sa, sb) = (handled(&w, "analytics", 2).await, handled(&w, "audit", 2).await);
    assert_eq!((sa.acked, sb.acked), (2, 2));
    w.shutdown().await.unwrap();
    assert_eq!(
        (a.load(Ordering::SeqCst), b.load(Ordering::SeqCst)),
        (1, 1),
        "each queue handles its copy once; the redelivered duplicate is dropped"
    );
}

#[tokio::test]
async fn concurrent_copies_of_one_message_are_handled_once() {
    let s = setup().await;
    let (calls, c) = counter();
    let h = DedupLayer::new(MemoryDedupStore::new(1000)).layer(handler_fn(move |_e: Envelope| {
        let c = c.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.fetch_add(1, Ordering::SeqCst);
        }
    }));
    for _ in 0..3 {
        s.publish_to_shop("order.created", Message::new("e").with_message_id("dup"))
            .await;
    }
    let w = start_with(&s.transport, "orders", h, RouteConfig::default().concurrency(3)).await;
    let st = handled(&w, "orders", 3).await;
    w.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{st:?}");
    assert_eq!(st.acked, 3);
    assert_eq!(ready_count(&s.transport, "orders").await, 0);
}

#[tokio::test]
async fn a_copy_still_in_flight_after_the_pause_is_requeued_then_dropped() {
    let s = setup().await;
    let (calls, c) = counter();
    let h = DedupLayer::new(MemoryDedupStore::new(1000))
        .in_flight_pause(Duration::from_millis(10))
        .layer(handler_fn(move |_e: Envelope| {
            let c = c.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(150)).await;
                c.fetch_add(1, Ordering::SeqCst);
            }
        }));
    for _ in 0..2 {
        s.publish_to_shop("order.created", Message::new("e").with_message_id("dup"))
            .await;
    }
    let w = start_with(&s.transport, "orders", h, RouteConfig::default().concurrency(2)).await;
    eventually("both copies acked", || async { stats(&w, "orders").acked == 2 }).await;
    let st = stats(&w, "orders");
    w.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(
        st.requeued >= 1,
        "the second copy was requeued while the first ran: {st:?}"
    );
    assert_eq!(ready_count(&s.transport, "orders").await, 0);
}

#[tokio::test]
async fn open_breaker_requeues_are_bounded_by_the_default_pause() {
    let s = setup().await;
    let (calls, c) = counter();
    let h = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new(1, Duration::from_secs(30)).open_for(Duration::from_secs(30)),
    )
    .layer(handler_fn(move |_e: Envelope| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(HandlerError::retry("db down")) }
    }));
    let w = start(&s.transport, "orders", h).await;
    s.publish_to_shop("order.created", Message::new("e")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = stats(&w, "orders");
    w.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(st.requeued <= 2, "requeued {} times in 0.5 s while open", st.requeued);
    assert_eq!(ready_count(&s.transport, "orders").await, 1, "nothing lost");
}

#[tokio::test]
async fn a_probe_failing_permanently_does_not_close_the_breaker() {
    let s = setup().await;
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new(1, Duration::from_secs(30)).open_for(Duration::from_millis(100)),
    );
    let health = breaker.handle();
    let (calls, c) = counter();
    let h = breaker.layer(handler_fn(move |e: Envelope| {
        c.fetch_add(1, Ordering::SeqCst);
        async move {
            match e.body().as_ref() {
                b"bad" => Err(HandlerError::reject("malformed order")),
                b"good" => Ok(()),
                _ => Err(HandlerError::retry("db down")),
            }
        }
    }));
    // open it, then let it half-open
    h.clone()
        .oneshot(Envelope::for_test(Message::new("x"), "orders"))
        .await
        .unwrap_err();
    assert_eq!(health.state(), CircuitState::Open);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let w = start(&s.transport, "orders", h).await;
    s.publish_to_shop("order.created", Message::new("bad")).await;
    let st = handled(&w, "orders", 1).await;
    assert_eq!(st.rejected, 1, "the probe's message was rejected: {st:?}");
    assert_eq!(
        health.state(),
        CircuitState::HalfOpen,
        "a permanent failure is not a successful probe"
    );
    s.publish_to_shop("order.created", Message::new("good")).await;
    let st = handled(&w, "orders", 2).await;
    assert_eq!(st.acked, 1);
    assert_eq!(health.state(), CircuitState::Closed);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    w.shutdown().await.unwrap();
}
