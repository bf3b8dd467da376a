//! Each layer on the memory transport, run by core's Worker: the assertions
//! are on what the broker saw (acked, requeued, rejected, dead-lettered,
//! republished, with which headers).

mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchyard_core::headers::*;
use switchyard_core::worker::RouteConfig;
use switchyard_core::{
    handler_fn, Destination, Envelope, FailureKind, HandlerError, Json, Message, Publisher, PublisherExt, QueueSpec,
};
use switchyard_middleware::circuit_breaker::CircuitState;
use switchyard_middleware::prelude::*;
use switchyard_middleware::trace::TraceContext;
use tower::{Layer, ServiceBuilder};

fn counter() -> (Arc<AtomicU32>, Arc<AtomicU32>) {
    let c = Arc::new(AtomicU32::new(0));
    (c.clone(), c)
}

#[tokio::test]
async fn in_process_retry_acks_after_transient_failures_without_requeueing() {
    let s = setup().await;
    let (calls, c) = counter();
    let h = RetryLayer::in_process(RetryPolicy::exponential(4, Duration::from_millis(5))).layer(handler_fn(
        move |e: Envelope| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                assert_eq!(e.attempt(), n + 1);
                if n < 2 {
                    Err(HandlerError::retry("db busy"))
                } else {
                    Ok(())
                }
            }
        },
    ));
    let w = start(&s.transport, "orders", h).await;
    s.publish_to_shop("order.created", Message::new("o1")).await;
    let st = handled(&w, "orders", 1).await;
    assert_eq!((st.acked, st.requeued, st.rejected), (1, 0, 0));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    w.shutdown().await.unwrap();
    assert_eq!(ready_count(&s.transport, "orders").await, 0);
}

// Virtual time: the wait queues' TTLs pass without real waiting.
#[tokio::test(start_paused = true)]
async fn broker_delayed_retry_republishes_to_wait_queues_with_incremented_count() {
    let s = setup().await;
    let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let policy = RetryPolicy::new(
        5,
        Backoff::explicit([Duration::from_millis(30), Duration::from_millis(60)]),
    );
    let h = ServiceBuilder::new()
        .layer(RetryLayer::broker_delayed(
            policy,
            s.transport.clone(),
            s.transport.clone(),
        ))
        .service(handler_fn(move |e: Envelope| {
            seen2
                .lock()
                .push((e.retry_count(), e.body().clone(), e.info().exchange.to_string()));
            async move {
                if e.retry_count() < 2 {
                    Err(HandlerError::retry("not yet"))
                } else {
                    Ok(())
                }
            }
        }));
    let w = start(&s.transport, "orders", h).await;
    s.publish_to_shop("order.created", Message::new("body-1").with_header("tenant", "acme"))
        .await;
    let st = handled(&w, "orders", 3).await;
    assert_eq!(
        (st.acked, st.requeued, st.rejected),
        (3, 0, 0),
        "originals are acked, never requeued"
    );
    let seen = seen.lock().clone();
    assert_eq!(seen.iter().map(|x| x.0).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(seen.iter().all(|x| &x.1[..] == b"body-1"), "body untouched");
    assert_eq!(seen[0].2, "shop");
    // the wait queues exist, with the TTL / dead-letter arguments
    for (ms, n) in [(30, 0), (60, 0)] {
        let info = s.transport.queue_info(&format!("orders.retry.{ms}")).await.unwrap();
        assert_eq!(info.message_count, n);
    }
    let redeclare = QueueSpec::new("orders.retry.30")
        .message_ttl(Duration::from_millis(30))
        .dead_letter("", Some("orders"));
    s.transport
        .declare_queue(&redeclare)
        .await
        .expect("same arguments as the layer declared");
    w.shutdown().await.unwrap();
}

// Virtual time: the wait queues' TTLs pass without real waiting.
#[tokio::test(start_paused = true)]
async fn exhausted_retries_inside_dead_letter_go_to_the_dlx_with_reasons() {
    let s = setup().await;
    // a topic DLX that only takes the original routing key
    s.transport
        .declare_exchange(&switchyard_core::ExchangeSpec::topic("app.dlx.topic"))
        .await
        .unwrap();
    s.transport
        .bind(&switchyard_core::Binding::queue("dead", "app.dlx.topic", "order.paid"))
        .await
        .unwrap();
    let policy = RetryPolicy::explicit([Duration::from_millis(20), Duration::from_millis(20)]);
    let h = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(s.transport.clone(), "app.dlx.topic"))
        .layer(RetryLayer::broker_delayed(
            policy,
            s.transport.clone(),
            s.transport.clone(),
        ))
        .service(handler_fn(|_e: Envelope| async {
            Err::<(), _>(HandlerError::retry("payment gateway down"))
        }));
    let w = start(&s.transport, "orders", h).await;
    s.publish_to_shop("order.paid", Message::new("o2").with_message_id("m-2"))
        .await;
    let st = handled(&w, "orders", 3).await;
    assert_eq!((st.acked, st.requeued, st.rejected), (3, 0, 0));
    eventually("dead letter", || async { ready_count(&s.transport, "dead").await == 1 }).await;
    let dl = drain(&s.transport, "dead").await.remove(0);
    let h = &dl.headers;
    assert_eq!(&dl.body[..], b"o2");
    assert_eq!(dl.properties.message_id.as_deref(), Some("m-2"));
    assert_eq!(h.get_str(ERROR_KIND), Some("transient"));
    assert!(h.get_str(ERROR).unwrap().contains("payment gateway down"));
    assert_eq!(h.get_i64(RETRY_COUNT), Some(2));
    assert_eq!(
        h.get_str(ORIGINAL_EXCHANGE),
        Some("shop"),
        "kept across the wait queue hop"
    );
    assert_eq!(h.get_str(ORIGINAL_ROUTING_KEY), Some("order.paid"));
    assert_eq!(h.get_str(ORIGINAL_QUEUE), Some("orders"));
    assert!(h.get_i64(FAILED_AT).is_some());
    assert_eq!(ready_count(&s.transport, "orders").await, 0);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn exhausted_retries_without_dead_letter_layer_are_rejected_by_the_worker() {
    let s = setup().await;
    s.transport
        .declare_queue(&QueueSpec::new("jobs").dead_letter("app.dlx", None))
        .await
        .unwrap();
    let (calls, c) = counter();
    let h = RetryLayer::in_process(RetryPolicy::exponential(3, Duration::from_millis(1))).layer(handler_fn(
        move |_e: Envelope| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), _>(HandlerError::timeout("slow")) }
        },
    ));
    let w = start(&s.transport, "jobs", h).await;
    s.transport
        .publish(&Destination::queue("jobs"), Message::new("j"))
        .await
        .unwrap();
    let st = handled(&w, "jobs", 1).await;
    assert_eq!(
        (st.acked, st.requeued, st.rejected),
        (0, 0, 1),
        "given up: rejected, not requeued"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    eventually("broker dead-lettered", || async {
        ready_count(&s.transport, "dead").await == 1
    })
    .await;
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn permanent_and_decode_failures_are_dead_lettered_and_acked() {
    let s = setup().await;
    #[derive(serde::Deserialize)]
    struct Order {
        id: u32,
    }
    let (calls, c) = counter();
    let h = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(s.transport.clone(), "app.dlx"))
        .layer(RetryLayer::in_process(RetryPolicy::exponential(
            5,
            Duration::from_millis(1),
        )))
        .service(handler_fn(move |Json(o): Json<Order>| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                if o.id == 0 {
                    Err(HandlerError::reject("order 0 does not exist"))
                } else {
                    Ok(())
                }
            }
        }));
    let w = start(&s.transport, "orders", h).await;
    let dest = Destination::new("shop", "order.created");
    s.transport
        .publish_json(&dest, &serde_json::json!({"id": 0}))
        .await
        .unwrap();
    s.transport
        .publish(&dest, Message::new("{not json").with_content_type("application/json"))
        .await
        .unwrap();
    s.transport
        .publish_json(&dest, &serde_json::json!({"id": 7}))
        .await
        .unwrap();
    let st = handled(&w, "orders", 3).await;
    assert_eq!((st.acked, st.requeued, st.rejected), (3, 0, 0));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "never retried; decode failure never reaches the body"
    );
    let dead = drain(&s.transport, "dead").await;
    let kinds: Vec<_> = dead
        .iter()
        .map(|m| m.headers.get_str(ERROR_KIND).unwrap().to_owned())
        .collect();
    assert_eq!(kinds, ["permanent", "decode"]);
    assert_eq!(dead[0].headers.get_str(ERROR), Some("order 0 does not exist"));
    assert_eq!(dead[1].headers.get_i64(RETRY_COUNT), Some(0));
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn replay_returns_dead_letters_to_their_origin_without_reason_headers() {
    let s = setup().await;
    let (calls, c) = counter();
    let h = DeadLetterLayer::new(s.transport.clone(), "app.dlx").layer(handler_fn(move |e: Envelope| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n > 0 {
                assert!(!e.headers().contains_key(ERROR) && !e.headers().contains_key(ORIGINAL_QUEUE));
                assert_eq!(e.headers().get_str("tenant"), Some("acme"));
                assert_eq!(
                    e.info().exchange.as_ref(),
                    "shop",
                    "replayed through the original exchange"
                );
            }
            if n == 0 {
                Err(HandlerError::reject("bug, fixed in the next release"))
            } else {
                Ok(())
            }
        }
    }));
    let w = start(&s.transport, "orders", h).await;
    s.publish_to_shop("order.created", Message::new("o3").with_header("tenant", "acme"))
        .await;
    handled(&w, "orders", 1).await;
    eventually("dead letter", || async { ready_count(&s.transport, "dead").await == 1 }).await;
    let report =
        switchyard_middleware::dead_letter::replay_queue(&*s.transport, &*s.transport, "dead", Default::default())
            .await
            .unwrap();
    assert_eq!((report.replayed, report.skipped), (1, 0));
    let st = handled(&w, "orders", 2).await;
    assert_eq!(st.acked, 2);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "handled again after the replay");
    assert_eq!(ready_count(&s.transport, "dead").await, 0);
    w.shutdown().await.unwrap();
    // a message that is not a dead letter stays on the queue
    s.transport
        .publish(&Destination::queue("dead"), Message::new("stray"))
        .await
        .unwrap();
    let report =
        switchyard_middleware::dead_letter::replay_queue(&*s.transport, &*s.transport, "dead", Default::default())
            .await
            .unwrap();
    assert_eq!((report.replayed, report.skipped), (0, 1));
    assert_eq!(ready_count(&s.transport, "dead").await, 1);
}

#[tokio::test]
async fn compressed_bodies_are_decoded_before_the_handler_and_corrupt_ones_dead_lettered() {
    let s = setup().await;
    #[derive(serde::Deserialize, serde::Serialize, PartialEq, Debug)]
    struct Doc {
        text: String,
    }
    let publisher = ServicePublisher::new(
        ServiceBuilder::new()
            .layer(CompressionLayer::zstd().threshold(64))
            .service(PublisherService::new(s.transport.clone())),
    );
    let got = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let g = got.clone();
    let h = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(s.transport.clone(), "app.dlx"))
        .layer(DecompressionLayer::new())
        .service(handler_fn(move |Json(d): Json<Doc>| {
            g.lock().push(d.text);
            async {}
        }));
    let long = "lorem ipsum ".repeat(100);
    let dest = Destination::new("shop", "order.note");
    publisher
        .publish_json(&dest, &Doc { text: long.clone() })
        .await
        .unwrap();
    s.transport
        .publish(&dest, Message::new("garbage").with_content_encoding("gzip"))
        .await
        .unwrap();
    s.transport
        .publish(&dest, Message::new("x").with_content_encoding("br"))
        .await
        .unwrap();
    let w = start(&s.transport, "orders", h).await;
    let st = handled(&w, "orders", 3).await;
    assert_eq!(st.acked, 3);
    assert_eq!(got.lock().clone(), [long]);
    let dead = drain(&s.transport, "dead").await;
    assert_eq!(dead.len(), 2);
    assert!(dead.iter().all(|m| m.headers.get_str(ERROR_KIND) == Some("decode")));
    assert!(dead[0].headers.get_str(ERROR).unwrap().contains("corrupt gzip body"));
    assert!(dead[1]
        .headers
        .get_str(ERROR)
        .unwrap()
        .contains("unknown content encoding 'br'"));
    assert_eq!(
        dead[0].properties.content_encoding.as_deref(),
        Some("gzip"),
        "dead letter keeps the original"
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn timeout_requeues_a_slow_handler() {
    let s = setup().await;
    let h = TimeoutLayer::new(Duration::from_millis(30)).layer(handler_fn(|e: Envelope| async move {
        if !e.redelivered() {
            tokio::time::sleep(Duration::from_secs(10)).await;
        }
    }));
    let w = start(&s.transport, "orders", h).await;
    s.publish_to_shop("order.x", Message::new("slow")).await;
    let st = handled(&w, "orders", 2).await;
    assert_eq!(
        (st.requeued, st.acked),
        (1, 1),
        "timed out once (requeued), then handled"
    );
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn open_circuit_requeues_without_calling_the_handler() {
    let s = setup().await;
    let (calls, c) = counter();
    let breaker = CircuitBreakerLayer::new(
        CircuitBreakerConfig::new(2, Duration::from_secs(60))
            .open_for(Duration::from_secs(60))
            .fail_fast_pause(Duration::from_millis(20)),
    );
    let health = breaker.handle();
    let h = breaker.layer(handler_fn(move |_e: Envelope| {
        c.fetch_add(1, Ordering::SeqCst);
        async { Err::<(), _>(HandlerError::retry("db down")) }
    }));
    let w = start_with(&s.transport, "orders", h, RouteConfig::default().concurrency(1)).await;
    for i in 0..3 {
        s.publish_to_shop("order.x", Message::new(format!("m{i}"))).await;
    }
    eventually("6 requeues", || async { stats(&w, "orders").requeued >= 6 }).await;
    assert_eq!(stats(&w, "orders").acked, 0);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "only the failures that opened it reached the handler"
    );
    assert_eq!(health.state(), CircuitState::Open);
    w.shutdown().await.unwrap();
    assert_eq!(ready_count(&s.transport, "orders").await, 3, "nothing lost");
}

#[tokio::test]
async fn duplicates_are_acked_without_handling() {
    let s = setup().await;
    let (calls, c) = counter();
    let h = DedupLayer::new(MemoryDedupStore::new(1000)).layer(handler_fn(move |_e: Envelope| {
        c.fetch_add(1, Ordering::SeqCst);
        async {}
    }));
    let w = start(&s.transport, "orders", h).await;
    for id in ["a", "b", "a", "a", "b"] {
        s.publish_to_shop("order.x", Message::new("x").with_message_id(id))
            .await;
    }
    let st = handled(&w, "orders", 5).await;
    assert_eq!(st.acked, 5);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_panic_is_requeued_once_then_dead_lettered_and_the_worker_keeps_running() {
    let s = setup().await;
    let h = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(s.transport.clone(), "app.dlx"))
        .layer(CatchPanicLayer::new())
        .service(handler_fn(|e: Envelope| async move {
            if e.body().as_ref() == b"poison" {
                panic!("cannot handle {:?}", e.body());
            }
        }));
    let w = start(&s.transport, "orders", h).await;
    let dest = Destination::new("shop", "order.x");
    s.transport.publish(&dest, Message::new("poison")).await.unwrap();
    let st = handled(&w, "orders", 2).await;
    assert_eq!(
        (st.requeued, st.acked, st.panicked),
        (1, 1, 1),
        "requeued once, then dead-lettered (acked)"
    );
    s.transport.publish(&dest, Message::new("fine")).await.unwrap();
    let st = handled(&w, "orders", 3).await;
    assert_eq!(st.acked, 2);
    let dead = drain(&s.transport, "dead").await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].headers.get_str(ERROR_KIND), Some("panic"));
    assert!(dead[0].headers.get_str(ERROR).unwrap().contains("cannot handle"));
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn correlation_and_trace_context_cross_from_consumed_to_published_messages() {
    let s = setup().await;
    s.transport.declare_queue(&QueueSpec::new("next")).await.unwrap();
    let publisher: Arc<dyn Publisher> = Arc::new(ServicePublisher::new(
        ServiceBuilder::new()
            .layer(CorrelationLayer::new())
            .layer(TraceLayer::new())
            .service(PublisherService::new(s.transport.clone())),
    ));
    let p = publisher.clone();
    let h = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .layer(CorrelationLayer::new())
        .service(handler_fn(move |_e: Envelope| {
            let p = p.clone();
            async move { p.publish(&Destination::queue("next"), Message::new("step 2")).await }
        }));
    let w = start(&s.transport, "orders", h).await;
    publisher
        .publish(&Destination::new("shop", "order.x"), Message::new("step 1"))
        .await
        .unwrap();
    handled(&w, "orders", 1).await;
    w.shutdown().await.unwrap();
    let first = {
        // the first message was consumed; rebuild what it carried from the second
        drain(&s.transport, "next").await.remove(0)
    };
    let cid = first
        .properties
        .correlation_id
        .clone()
        .expect("correlation id propagated");
    assert!(first.properties.message_id.is_some());
    assert_ne!(
        first.properties.message_id.as_deref(),
        Some(&*cid),
        "a new message, same chain"
    );
    let ctx = TraceContext::extract(&first.headers).expect("traceparent injected");
    assert!(ctx.sampled());
    // publish a second chain and check trace id continuity explicitly
    let root = TraceContext::new_root();
    let mut m = Message::new("step 1").with_correlation_id("chain-9");
    root.inject(&mut m.headers);
    let w = start(&s.transport, "orders", {
        let p = publisher.clone();
        ServiceBuilder::new()
            .layer(TraceLayer::new())
            .layer(CorrelationLayer::new())
            .service(handler_fn(move |_e: Envelope| {
                let p = p.clone();
                async move { p.publish(&Destination::queue("next"), Message::new("step 2")).await }
            }))
    })
    .await;
    s.publish_to_shop("order.x", m).await;
    handled(&w, "orders", 1).await;
    w.shutdown().await.unwrap();
    let out = drain(&s.transport, "next").await.remove(0);
    assert_eq!(out.properties.correlation_id.as_deref(), Some("chain-9"));
    let ctx = TraceContext::extract(&out.headers).unwrap();
    assert_eq!(ctx.trace_id, root.trace_id, "one trace across services");
    assert_ne!(ctx.span_id, root.span_id);
}

#[tokio::test]
async fn kinds_the_worker_requeues_are_left_to_it() {
    // dead-letter does not touch a transient failure that no retry layer gave up on
    let s = setup().await;
    let (calls, c) = counter();
    let h = DeadLetterLayer::new(s.transport.clone(), "app.dlx").layer(handler_fn(move |_e: Envelope| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Err(HandlerError::retry("once"))
            } else {
                Ok(())
            }
        }
    }));
    let w = start(&s.transport, "orders", h).await;
    s.publish_to_shop("order.x", Message::new("t")).await;
    let st = handled(&w, "orders", 2).await;
    assert_eq!((st.requeued, st.acked), (1, 1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(ready_count(&s.transport, "dead").await, 0);
    assert_eq!(FailureKind::Transient.as_str(), "transient");
    w.shutdown().await.unwrap();
}

#[tokio::test]
async fn tower_limits_hold_messages_in_the_broker() {
    use switchyard_middleware::limit::{self, ConcurrencyLimitLayer, RateLimitLayer};
    let s = setup().await;
    let running = Arc::new(AtomicU32::new(0));
    let (peak, pk) = counter();
    let r = running.clone();
    let rate_limited = limit::shared(
        ServiceBuilder::new()
            .layer(RateLimitLayer::new(4, Duration::from_millis(100)))
            .service(handler_fn(move |_e: Envelope| {
                let (r, pk) = (r.clone(), pk.clone());
                async move {
                    let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                    pk.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    r.fetch_sub(1, Ordering::SeqCst);
                }
            })),
        16,
    );
    let h = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(2))
        .service(rate_limited);
    for i in 0..12 {
        s.publish_to_shop("order.x", Message::new(format!("m{i}"))).await;
    }
    let started = std::time::Instant::now();
    let w = start_with(
        &s.transport,
        "orders",
        h,
        RouteConfig::default().prefetch(20).concurrency(20),
    )
    .await;
    let st = handled(&w, "orders", 12).await;
    let elapsed = started.elapsed();
    w.shutdown().await.unwrap();
    assert_eq!(st.acked, 12);
    assert!(
        peak.load(Ordering::SeqCst) <= 2,
        "concurrency limit: peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert!(
        elapsed >= Duration::from_millis(200),
        "3 windows of 4 at 100 ms each: took {elapsed:?}"
    );
}
