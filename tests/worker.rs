//! Worker integration tests on the memory transport.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use switchyard::handler::{Body, Text};
use switchyard::memory::MemoryBroker;
use switchyard::worker::{ConsumerStatus, RouteConfig, Worker, WorkerHandle};
use switchyard::{
    handler_fn, ConsumeOptions, DeliveryInfo, Destination, ExchangeSpec, HandlerError, Json, Message, QueueSpec,
    Transport,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn connect(broker: &MemoryBroker) -> Arc<dyn Transport> {
    broker.connect()
}

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until `q` has a consumer.
async fn wait_for_consumer(t: &Arc<dyn Transport>, q: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.queue_info(q).await.unwrap().consumer_count == 0 {
        assert!(Instant::now() < deadline, "timed out waiting for a consumer on {q}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn depth(t: &Arc<dyn Transport>, q: &str) -> u32 {
    t.queue_info(q).await.unwrap().message_count
}

/// Reads everything in `q` with an auto-ack consumer: each message with its
/// `redelivered` flag.
async fn drain_flagged(t: &Arc<dyn Transport>, q: &str) -> Vec<(Message, bool)> {
    let mut sub = t
        .consume(q, ConsumeOptions::default().auto_ack(true).prefetch(0))
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
        out.push((d.message, d.info.redelivered));
    }
    out
}

/// Reads everything in `q` with an auto-ack consumer.
async fn drain(t: &Arc<dyn Transport>, q: &str) -> Vec<Message> {
    drain_flagged(t, q).await.into_iter().map(|(m, _)| m).collect()
}

async fn publish_n(t: &Arc<dyn Transport>, q: &str, n: usize) {
    for i in 0..n {
        t.publish(&Destination::queue(q), Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
}

/// `work` dead-letters into fanout `dlx`, bound to `dead`.
async fn dead_letter_topology(t: &Arc<dyn Transport>, work: &str) -> String {
    let dlx = format!("{work}.dlx");
    let dead = format!("{work}.dead");
    t.declare_exchange(&ExchangeSpec::fanout(dlx.as_str())).await.unwrap();
    t.declare_queue(&QueueSpec::new(dead.as_str())).await.unwrap();
    t.bind(&switchyard::Binding::queue(dead.as_str(), dlx.as_str(), ""))
        .await
        .unwrap();
    t.declare_queue(&QueueSpec::new(work).dead_letter(dlx.as_str(), None))
        .await
        .unwrap();
    dead
}

#[tokio::test]
async fn graceful_shutdown_completes_in_flight_and_requeues_the_rest() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("slow")).await.unwrap();
    publish_n(&t, "slow", 20).await;
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (s2, f2) = (started.clone(), finished.clone());
    let h = Worker::new(t.clone())
        .route_with(
            "slow",
            handler_fn(move || {
                let (started, finished) = (s2.clone(), f2.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            }),
            // The broker pushes up to 10; only 3 run at once, so 7 are
            // received but not started when the shutdown comes.
            RouteConfig::default().prefetch(10).concurrency(3),
        )
        .start()
        .await
        .unwrap();
    wait_for("3 handlers in flight", || h.stats("slow").unwrap().in_flight == 3).await;
    h.shutdown().await.unwrap();
    assert_eq!(
        started.load(Ordering::SeqCst),
        3,
        "nothing new started after the shutdown"
    );
    assert_eq!(finished.load(Ordering::SeqCst), 3, "in-flight handlers completed");
    let s = h.stats("slow").unwrap();
    assert_eq!(s.acked, 3);
    assert_eq!(s.in_flight, 0);
    // Nothing lost, nothing left unacked: 17 ready again (7 requeued by the
    // worker, 10 never delivered), and no consumer left.
    let info = t.queue_info("slow").await.unwrap();
    assert_eq!((info.message_count, info.consumer_count), (17, 0));
    let rest = drain(&t, "slow").await;
    assert_eq!(rest.len(), 17);
    assert_eq!(s.requeued, 7, "prefetched-but-not-started deliveries requeued");
}

#[tokio::test]
async fn shutdown_deadline_aborts_slow_handlers_and_requeues() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("stuck")).await.unwrap();
    publish_n(&t, "stuck", 2).await;
    let h = Worker::new(t.clone())
        .route(
            "stuck",
            handler_fn(|| async { tokio::time::sleep(Duration::from_secs(60)).await }),
        )
        .shutdown_timeout(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    wait_for("2 in flight", || h.stats("stuck").unwrap().in_flight == 2).await;
    let t0 = Instant::now();
    h.shutdown().await.unwrap();
    assert!(t0.elapsed() < Duration::from_secs(3), "took {:?}", t0.elapsed());
    assert_eq!(h.stats("stuck").unwrap().requeued, 2);
    assert_eq!(t.queue_info("stuck").await.unwrap().consumer_count, 0);
    let rest = drain_flagged(&t, "stuck").await;
    assert_eq!(rest.len(), 2);
    assert!(
        rest.iter().all(|(_, redelivered)| *redelivered),
        "aborted deliveries were requeued"
    );
}

#[tokio::test]
async fn run_until_a_token_is_cancelled() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let h2 = handled.clone();
    let token = CancellationToken::new();
    let worker = Worker::new(t.clone()).route(
        "q",
        handler_fn(move || {
            let handled = h2.clone();
            async move {
                handled.fetch_add(1, Ordering::SeqCst);
            }
        }),
    );
    let run = tokio::spawn(worker.run_until(token.clone().cancelled_owned()));
    publish_n(&t, "q", 5).await;
    wait_for("5 handled", || handled.load(Ordering::SeqCst) == 5).await;
    assert!(!run.is_finished(), "run blocks until the token fires");
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(t.queue_info("q").await.unwrap().consumer_count, 0);

    // A consumer that fails (its queue deleted) ends `run_until` with its error.
    t.declare_queue(&QueueSpec::new("r")).await.unwrap();
    let worker = Worker::new(t.clone())
        .route("q", handler_fn(|| async {}))
        .route("r", handler_fn(|| async {}));
    let run = tokio::spawn(worker.run_until(std::future::pending()));
    wait_for_consumer(&t, "r").await;
    t.delete_queue("r").await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), "consumer_cancelled");
}

#[tokio::test]
async fn several_queues_and_stopping_one() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    for q in ["orders", "emails", "audit"] {
        t.declare_queue(&QueueSpec::new(q)).await.unwrap();
    }
    let counter = |c: Arc<AtomicUsize>| {
        handler_fn(move || {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let counts: Vec<Arc<AtomicUsize>> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let h = Worker::new(t.clone())
        .route("orders", counter(counts[0].clone()))
        .route("emails", counter(counts[1].clone()))
        .route("audit", counter(counts[2].clone()))
        .start()
        .await
        .unwrap();
    assert_eq!(h.queues(), vec!["orders", "emails", "audit"]);
    for q in ["orders", "emails", "audit"] {
        publish_n(&t, q, 4).await;
    }
    wait_for("all handled", || counts.iter().all(|c| c.load(Ordering::SeqCst) == 4)).await;
    h.stop("emails").await.unwrap();
    assert_eq!(h.status("emails"), Some(ConsumerStatus::Stopped));
    let report = h.report();
    assert_eq!(report.len(), 3);
    assert_eq!(
        (report[1].0.as_str(), &report[1].1),
        ("emails", &ConsumerStatus::Stopped)
    );
    assert_eq!(report[0].1, ConsumerStatus::Running);
    assert_eq!(h.status("audit"), Some(ConsumerStatus::Running));
    assert_eq!(h.stop("nope").await.unwrap_err().code(), "invalid_config");
    assert_eq!(t.queue_info("emails").await.unwrap().consumer_count, 0);
    for q in ["orders", "emails", "audit"] {
        publish_n(&t, q, 2).await;
    }
    wait_for("orders and audit handled", || {
        counts[0].load(Ordering::SeqCst) == 6 && counts[2].load(Ordering::SeqCst) == 6
    })
    .await;
    assert_eq!(counts[1].load(Ordering::SeqCst), 4);
    assert_eq!(depth(&t, "emails").await, 2, "the stopped queue keeps its messages");
    h.shutdown().await.unwrap();
    for q in ["orders", "audit"] {
        assert_eq!(h.stats(q).unwrap().acked, 6);
    }
    assert_eq!(h.stats("emails").unwrap().handled, 4);
}

#[tokio::test]
async fn concurrency_bound_and_prefetch() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    publish_n(&t, "q", 30).await;
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (n2, m2) = (now.clone(), max.clone());
    let h = Worker::new(t.clone())
        .route_with(
            "q",
            handler_fn(move || {
                let (now, max) = (n2.clone(), m2.clone());
                async move {
                    let c = now.fetch_add(1, Ordering::SeqCst) + 1;
                    max.fetch_max(c, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                }
            }),
            RouteConfig::default().prefetch(8).concurrency(4),
        )
        .start()
        .await
        .unwrap();
    wait_for("30 acks", || h.stats("q").unwrap().acked == 30).await;
    h.shutdown().await.unwrap();
    assert_eq!(max.load(Ordering::SeqCst), 4);
    assert_eq!(h.stats("q").unwrap().max_in_flight, 4);
    assert_eq!(depth(&t, "q").await, 0);
}

#[tokio::test]
async fn default_concurrency_equals_prefetch() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    publish_n(&t, "q", 12).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g2 = gate.clone();
    let h = Worker::new(t.clone())
        .default_prefetch(5)
        .route(
            "q",
            handler_fn(move || {
                let gate = g2.clone();
                async move {
                    gate.acquire().await.unwrap().forget();
                }
            }),
        )
        .start()
        .await
        .unwrap();
    wait_for("5 in flight", || h.stats("q").unwrap().in_flight == 5).await;
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(h.stats("q").unwrap().in_flight, 5, "never more than the prefetch");
    gate.add_permits(12);
    wait_for("12 acks", || h.stats("q").unwrap().acked == 12).await;
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn panics_are_caught_requeued_once_then_dead_lettered() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    let dead = dead_letter_topology(&t, "panicky").await;
    t.publish(&Destination::queue("panicky"), Message::new("kaboom"))
        .await
        .unwrap();
    t.publish(&Destination::queue("panicky"), Message::new("fine"))
        .await
        .unwrap();
    let h = Worker::new(t.clone())
        .route(
            "panicky",
            handler_fn(|Text(t): Text| async move {
                if t == "kaboom" {
                    panic!("handler bug");
                }
            }),
        )
        .start()
        .await
        .unwrap();
    wait_for("dead letter", || h.stats("panicky").unwrap().rejected == 1).await;
    h.shutdown().await.unwrap();
    let s = h.stats("panicky").unwrap();
    assert_eq!((s.panicked, s.requeued, s.rejected, s.acked), (2, 1, 1, 1));
    let dead = drain(&t, &dead).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].body[..], b"kaboom");
    assert_eq!(
        h.status("panicky"),
        Some(ConsumerStatus::Stopped),
        "the consumer survived"
    );
}

#[tokio::test]
async fn malformed_json_lands_in_the_dead_letter_queue() {
    #[derive(serde::Deserialize)]
    struct Req {
        #[allow(dead_code)]
        session_id: String,
    }
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    let dead = dead_letter_topology(&t, "extraction").await;
    let dest = Destination::queue("extraction");
    t.publish(
        &dest,
        Message::new("{\"session_id\": ").with_content_type("application/json"),
    )
    .await
    .unwrap();
    t.publish(&dest, Message::new("<xml/>").with_content_type("application/xml"))
        .await
        .unwrap();
    t.publish(
        &dest,
        Message::new(r#"{"session_id":"s1"}"#).with_content_type("application/json"),
    )
    .await
    .unwrap();
    let h = Worker::new(t.clone())
        .route("extraction", handler_fn(|Json(_r): Json<Req>| async {}))
        .start()
        .await
        .unwrap();
    wait_for("2 rejected, 1 acked", || {
        let s = h.stats("extraction").unwrap();
        s.rejected == 2 && s.acked == 1
    })
    .await;
    h.shutdown().await.unwrap();
    let dead: Vec<String> = drain(&t, &dead)
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(dead, vec!["{\"session_id\": ".to_string(), "<xml/>".to_string()]);
    assert_eq!(depth(&t, "extraction").await, 0);
}

#[tokio::test]
async fn transient_errors_requeue_and_redeliver() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.publish(&Destination::queue("q"), Message::new("x")).await.unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let a2 = attempts.clone();
    let h = Worker::new(t.clone())
        .route(
            "q",
            handler_fn(move |info: DeliveryInfo| {
                let attempts = a2.clone();
                async move {
                    let n = attempts.fetch_add(1, Ordering::SeqCst);
                    assert_eq!(info.redelivered, n > 0);
                    if n < 2 {
                        Err(HandlerError::retry("try again"))
                    } else {
                        Ok(())
                    }
                }
            }),
        )
        .start()
        .await
        .unwrap();
    wait_for("ack", || h.stats("q").unwrap().acked == 1).await;
    h.shutdown().await.unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 3);
    let s = h.stats("q").unwrap();
    assert_eq!((s.requeued, s.failed, s.acked, s.handled), (2, 2, 1, 3));
}

#[tokio::test]
async fn replies_are_published_with_the_request_correlation_id() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("math")).await.unwrap();
    t.declare_queue(&QueueSpec::new("answers")).await.unwrap();
    let h = Worker::new(t.clone())
        .route("math", handler_fn(|Json(n): Json<i64>| async move { Json(n * n) }))
        .start()
        .await
        .unwrap();
    t.publish(
        &Destination::queue("math"),
        Message::json(&7)
            .unwrap()
            .with_reply_to("answers")
            .with_correlation_id("req-1"),
    )
    .await
    .unwrap();
    // No reply_to: acked, reply dropped.
    t.publish(&Destination::queue("math"), Message::json(&3).unwrap())
        .await
        .unwrap();
    wait_for("2 acks", || h.stats("math").unwrap().acked == 2).await;
    h.shutdown().await.unwrap();
    let answers = drain(&t, "answers").await;
    assert_eq!(answers.len(), 1);
    assert_eq!(&answers[0].body[..], b"49");
    assert_eq!(answers[0].properties.correlation_id.as_deref(), Some("req-1"));
    assert_eq!(answers[0].properties.content_type.as_deref(), Some("application/json"));
    assert_eq!(h.stats("math").unwrap().replied, 1);
}

#[tokio::test]
async fn missing_queue_fails_start_and_deleted_queue_ends_the_consumer() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("present")).await.unwrap();
    let e = Worker::new(t.clone())
        .route("present", handler_fn(|| async {}))
        .route("absent", handler_fn(|| async {}))
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.code(), "queue_not_found");
    assert!(e.to_string().contains("absent"));
    assert_eq!(
        t.queue_info("present").await.unwrap().consumer_count,
        0,
        "the consumer already started was cancelled"
    );
    let e = Worker::new(t.clone())
        .route("present", handler_fn(|| async {}))
        .route("present", handler_fn(|| async {}))
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_config", "one route per queue");

    let h: WorkerHandle = Worker::new(t.clone())
        .route("present", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    t.delete_queue("present").await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), h.join())
        .await
        .expect("the consumer ends instead of hanging")
        .unwrap_err();
    assert_eq!(e.code(), "consumer_cancelled");
    match h.status("present") {
        Some(ConsumerStatus::Failed { code, message }) => {
            assert_eq!(code, "consumer_cancelled");
            assert!(message.contains("present"));
        }
        other => panic!("unexpected status {other:?}"),
    }
}

#[tokio::test]
async fn auto_ack_routes_count_failures_and_settle_nothing() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("events")).await.unwrap();
    publish_n(&t, "events", 6).await;
    let h = Worker::new(t.clone())
        .route_with(
            "events",
            handler_fn(|Body(b): Body| async move {
                if b.ends_with(b"3") {
                    Err(HandlerError::reject("bad event"))
                } else {
                    Ok(())
                }
            }),
            RouteConfig::default().auto_ack(true),
        )
        .start()
        .await
        .unwrap();
    wait_for("6 handled", || h.stats("events").unwrap().handled == 6).await;
    h.shutdown().await.unwrap();
    let s = h.stats("events").unwrap();
    assert_eq!((s.failed, s.acked, s.rejected, s.requeued), (1, 0, 0, 0));
    assert_eq!(depth(&t, "events").await, 0);
}

#[tokio::test]
async fn replies_go_through_the_reply_publisher() {
    use switchyard::middleware::{PublishRequest, PublisherService, ServicePublisher};
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("rp.math")).await.unwrap();
    t.declare_queue(&QueueSpec::new("rp.answers")).await.unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    // A publisher stack on the same transport: a layer that counts and tags.
    let replies = ServicePublisher::new(
        tower::ServiceBuilder::new()
            .map_request(move |mut r: PublishRequest| {
                seen2.fetch_add(1, Ordering::SeqCst);
                r.message = r.message.with_header("x-via", "reply-stack");
                r
            })
            .service(PublisherService::new(t.clone())),
    )
    .into_dyn();
    let h = Worker::new(t.clone())
        .reply_publisher(replies)
        .route("rp.math", handler_fn(|Json(n): Json<i64>| async move { Json(n + 1) }))
        .start()
        .await
        .unwrap();
    t.publish(
        &Destination::queue("rp.math"),
        Message::json(&41)
            .unwrap()
            .with_reply_to("rp.answers")
            .with_correlation_id("c-9"),
    )
    .await
    .unwrap();
    wait_for("1 reply", || h.stats("rp.math").unwrap().replied == 1).await;
    h.shutdown().await.unwrap();
    assert_eq!(
        seen.load(Ordering::SeqCst),
        1,
        "the reply went through the reply publisher"
    );
    let answers = drain(&t, "rp.answers").await;
    assert_eq!(answers.len(), 1);
    assert_eq!(&answers[0].body[..], b"42");
    assert_eq!(answers[0].properties.correlation_id.as_deref(), Some("c-9"));
    assert_eq!(answers[0].headers.get_str("x-via"), Some("reply-stack"));
}

#[tokio::test]
async fn a_missing_queue_fails_start_before_an_auto_ack_route_takes_messages() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("aa.events")).await.unwrap();
    publish_n(&t, "aa.events", 5).await;
    let handled = Arc::new(AtomicUsize::new(0));
    let handled2 = handled.clone();
    let e = Worker::new(t.clone())
        .route_with(
            "aa.events",
            handler_fn(move || {
                handled2.fetch_add(1, Ordering::SeqCst);
                async {}
            }),
            RouteConfig::default().auto_ack(true).prefetch(0),
        )
        .route("aa.absent", handler_fn(|| async {}))
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.code(), "queue_not_found");
    assert!(e.to_string().contains("aa.absent"), "{e}");
    let info = t.queue_info("aa.events").await.unwrap();
    assert_eq!(
        (info.message_count, info.consumer_count),
        (5, 0),
        "no message lost, no consumer left"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 0);
    assert_eq!(drain(&t, "aa.events").await.len(), 5);
}

#[tokio::test]
async fn a_worker_without_routes_fails_to_start() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    let e = Worker::new(t.clone()).start().await.unwrap_err();
    assert_eq!(e.code(), "invalid_config");
    assert!(e.to_string().contains("no routes"), "{e}");
    // run_until does not return Ok at once as if it had served and stopped.
    let e = tokio::time::timeout(
        Duration::from_secs(5),
        Worker::new(t).run_until(std::future::pending::<()>()),
    )
    .await
    .expect("fails at once")
    .unwrap_err();
    assert_eq!(e.code(), "invalid_config");
}

#[tokio::test]
async fn charset_content_encodings_are_plain_bodies_through_decompression() {
    use switchyard::middleware::DecompressionLayer;
    use tower::Layer;
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("ce.jobs")).await.unwrap();
    let sum = Arc::new(AtomicUsize::new(0));
    let sum2 = sum.clone();
    let handler = DecompressionLayer::new().layer(handler_fn(move |Json(n): Json<usize>| {
        sum2.fetch_add(n, Ordering::SeqCst);
        async {}
    }));
    let h = Worker::new(t.clone()).route("ce.jobs", handler).start().await.unwrap();
    // kombu/Celery and pika publishers put the charset in content_encoding.
    let encodings = ["utf-8", "UTF-8", "utf8", "binary", "7bit", "8bit", "identity", ""];
    for (i, enc) in encodings.iter().enumerate() {
        let m = Message::json(&(i + 1)).unwrap().with_content_encoding(*enc);
        t.publish(&Destination::queue("ce.jobs"), m).await.unwrap();
    }
    let n = encodings.len() as u64;
    wait_for("all handled", || h.stats("ce.jobs").unwrap().handled == n).await;
    h.shutdown().await.unwrap();
    let s = h.stats("ce.jobs").unwrap();
    assert_eq!((s.acked, s.rejected, s.failed), (n, 0, 0));
    assert_eq!(sum.load(Ordering::SeqCst), (1..=encodings.len()).sum::<usize>());
}
