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

/// "Requeued once" counts panics, not redeliveries: a message requeued for a
/// transient error (so `redelivered`) that then panics is requeued, and only
/// its second panic dead-letters it.
#[tokio::test]
async fn a_redelivered_message_gets_one_requeue_on_its_first_panic() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    let dead = dead_letter_topology(&t, "flaky").await;
    t.publish(&Destination::queue("flaky"), Message::new("x"))
        .await
        .unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c2 = calls.clone();
    let h = Worker::new(t.clone())
        .route(
            "flaky",
            handler_fn(move || {
                let n = c2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                async move {
                    if n == 0 {
                        return Err::<(), _>(switchyard::HandlerError::retry("not yet"));
                    }
                    panic!("handler bug on call {n}");
                }
            }),
        )
        .start()
        .await
        .unwrap();
    wait_for("dead letter", || h.stats("flaky").unwrap().rejected == 1).await;
    h.shutdown().await.unwrap();
    let s = h.stats("flaky").unwrap();
    // transient → requeue; first panic (redelivered) → requeue; second panic → reject.
    assert_eq!((s.panicked, s.requeued, s.rejected), (2, 2, 1));
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(drain(&t, &dead).await.len(), 1);
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

// ---- issue 12: outcomes that publish, state, shared layers, waiting, batches ----

use std::sync::OnceLock;

use switchyard::handler::{Outbox, Redelivered, State};
use switchyard::worker::{batch_fn, BatchConfig};
use switchyard::{headers, Envelope, PublishOptions};

#[tokio::test]
async fn outbox_messages_are_published_before_the_ack_with_correlation_and_trace() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    for q in ["orders", "accepted", "audit"] {
        t.declare_queue(&QueueSpec::new(q)).await.unwrap();
    }
    let h = Worker::new(t.clone())
        .route(
            "orders",
            handler_fn(|Json(n): Json<u32>| async move {
                Ok::<_, HandlerError>(
                    Outbox::new()
                        .json(&Destination::queue("accepted"), &(n * 10))?
                        // A message with its own correlation id keeps it.
                        .publish(
                            Destination::queue("audit"),
                            Message::new("audit").with_correlation_id("own"),
                        ),
                )
            }),
        )
        .start()
        .await
        .unwrap();
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    t.publish(
        &Destination::queue("orders"),
        Message::json(&4)
            .unwrap()
            .with_correlation_id("order-4")
            .with_header(headers::TRACEPARENT, tp)
            .with_header(headers::TRACESTATE, "vendor=1"),
    )
    .await
    .unwrap();
    let stats = h.wait_handled("orders", 1, Duration::from_secs(5)).await.unwrap();
    assert_eq!((stats.acked, stats.published, stats.requeued), (1, 2, 0));
    h.shutdown().await.unwrap();
    let accepted = drain(&t, "accepted").await;
    assert_eq!(accepted.len(), 1);
    assert_eq!(&accepted[0].body[..], b"40");
    assert!(accepted[0].properties.is_persistent());
    assert_eq!(accepted[0].properties.correlation_id.as_deref(), Some("order-4"));
    assert_eq!(accepted[0].headers.get_str(headers::TRACEPARENT), Some(tp));
    assert_eq!(accepted[0].headers.get_str(headers::TRACESTATE), Some("vendor=1"));
    let audit = drain(&t, "audit").await;
    assert_eq!(audit[0].properties.correlation_id.as_deref(), Some("own"));
    assert_eq!(audit[0].headers.get_str(headers::TRACEPARENT), Some(tp));
    assert_eq!(depth(&t, "orders").await, 0);
}

#[tokio::test]
async fn a_failing_outbox_publish_withholds_the_ack_and_requeues() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    for q in ["jobs", "done"] {
        t.declare_queue(&QueueSpec::new(q)).await.unwrap();
    }
    let h = Worker::new(t.clone())
        .route(
            "jobs",
            handler_fn(|Redelivered(again): Redelivered, Text(body): Text| async move {
                let outbox = Outbox::new().publish(Destination::queue("done"), Message::new(body.clone()));
                if again {
                    return outbox;
                }
                match body.as_str() {
                    // Unroutable with mandatory: the broker returns it.
                    "unroutable" => outbox.publish_with(
                        Destination::new("amq.direct", "nobody-binds-this"),
                        Message::new("x"),
                        PublishOptions::mandatory(),
                    ),
                    // An exchange that does not exist.
                    _ => outbox.publish(Destination::new("no-such-exchange", "x"), Message::new("x")),
                }
            }),
        )
        .start()
        .await
        .unwrap();
    for body in ["unroutable", "missing-exchange"] {
        t.publish(&Destination::queue("jobs"), Message::new(body))
            .await
            .unwrap();
    }
    // Each is handled twice: the first time its publish fails (requeued, not
    // acked), the redelivery publishes fine and is acked.
    let stats = h.wait_handled("jobs", 4, Duration::from_secs(5)).await.unwrap();
    h.shutdown().await.unwrap();
    assert_eq!(stats.requeued, 2, "{stats:?}");
    assert_eq!(stats.settle_failed, 2, "{stats:?}");
    assert_eq!(stats.acked, 2, "{stats:?}");
    assert_eq!(depth(&t, "jobs").await, 0);
    // At-least-once: what went out before the failing publish went out again.
    let mut done: Vec<String> = drain(&t, "done")
        .await
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    done.sort();
    assert_eq!(
        done,
        ["missing-exchange", "missing-exchange", "unroutable", "unroutable"]
    );
}

#[derive(Debug)]
struct Greeting(&'static str);

#[tokio::test]
async fn state_comes_from_the_worker_or_the_handler_and_layers_wrap_every_route() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    for q in ["a", "b"] {
        t.declare_queue(&QueueSpec::new(q)).await.unwrap();
    }
    let seen = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let record = |queue: &'static str| {
        handler_fn(
            move |State(seen): State<Arc<parking_lot::Mutex<Vec<String>>>>,
                  State(g): State<Arc<Greeting>>,
                  State(layer): State<&'static str>| async move {
                seen.lock().push(format!("{queue}:{}:{layer}", g.0));
            },
        )
    };
    // Two shared layers: the later one is outside the earlier one, so the
    // value the earlier one attaches is the one the handler sees.
    let inner = switchyard::tower::util::MapRequestLayer::new(|e: Envelope| e.with_extension("inner-layer"));
    let outer = switchyard::tower::util::MapRequestLayer::new(|e: Envelope| e.with_extension("outer-layer"));
    let h = Worker::new(t.clone())
        .with_state(seen.clone())
        .with_state(Arc::new(Greeting("worker")))
        .layer(inner)
        .route("a", record("a"))
        // Per-handler state shadows the Worker's.
        .route("b", record("b").with_state(Arc::new(Greeting("handler"))))
        .layer(outer)
        .start()
        .await
        .unwrap();
    for q in ["a", "b"] {
        t.publish(&Destination::queue(q), Message::new("x")).await.unwrap();
    }
    h.wait_handled("a", 1, Duration::from_secs(5)).await.unwrap();
    h.wait_handled("b", 1, Duration::from_secs(5)).await.unwrap();
    h.shutdown().await.unwrap();
    let mut seen = seen.lock().clone();
    seen.sort();
    assert_eq!(seen, ["a:worker:inner-layer", "b:handler:inner-layer"]);
}

#[tokio::test]
async fn missing_state_requeues_instead_of_dead_lettering() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    let dead = dead_letter_topology(&t, "stateless").await;
    let h = Worker::new(t.clone())
        .route("stateless", handler_fn(|State(_n): State<u64>| async {}))
        .start()
        .await
        .unwrap();
    publish_n(&t, "stateless", 1).await;
    let stats = h.wait_handled("stateless", 1, Duration::from_secs(5)).await.unwrap();
    h.shutdown().await.unwrap();
    assert!(stats.requeued >= 1 && stats.rejected == 0, "{stats:?}");
    assert_eq!(depth(&t, "stateless").await, 1);
    assert_eq!(depth(&t, &dead).await, 0);
}

#[tokio::test]
async fn wait_handled_and_wait_idle_replace_polling() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("w")).await.unwrap();
    let h = Worker::new(t.clone())
        .route(
            "w",
            handler_fn(|| async { tokio::time::sleep(Duration::from_millis(5)).await }),
        )
        .start()
        .await
        .unwrap();
    publish_n(&t, "w", 5).await;
    let stats = h.wait_handled("w", 5, Duration::from_secs(5)).await.unwrap();
    assert_eq!(stats.acked, 5);
    h.wait_idle(Duration::from_millis(30), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(h.stats("w").unwrap().in_flight, 0);
    let e = h.wait_handled("w", 6, Duration::from_millis(50)).await.unwrap_err();
    assert_eq!(e.code(), "timeout");
    assert!(
        e.to_string().contains("'w'") && e.to_string().contains("5 so far"),
        "{e}"
    );
    assert_eq!(
        h.wait_handled("nope", 1, Duration::from_millis(10))
            .await
            .unwrap_err()
            .code(),
        "invalid_config"
    );
    // Busy the whole time: wait_idle times out.
    publish_n(&t, "w", 200).await;
    let e = h
        .wait_idle(Duration::from_millis(50), Duration::from_millis(30))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "timeout");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn batch_routes_collect_settle_after_the_handler_and_per_message() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    let dead = dead_letter_topology(&t, "rows").await;
    let handle: Arc<OnceLock<WorkerHandle>> = Arc::new(OnceLock::new());
    let sizes = Arc::new(parking_lot::Mutex::new(Vec::<usize>::new()));
    let acked_during = Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    let failed_once = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (handle, sizes, acked_during, failed_once) =
            (handle.clone(), sizes.clone(), acked_during.clone(), failed_once.clone());
        batch_fn(move |rows: Vec<Json<i64>>| {
            let (handle, sizes, acked_during, failed_once) =
                (handle.clone(), sizes.clone(), acked_during.clone(), failed_once.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let before = handle.get().map(|h| h.stats("rows").unwrap().acked).unwrap_or(0);
                acked_during.lock().push(before);
                sizes.lock().push(rows.len());
                // The first batch fails as a whole (transient): all requeued.
                if failed_once.fetch_add(1, Ordering::SeqCst) == 0 {
                    return vec![Err(HandlerError::retry("db busy")); rows.len()];
                }
                // Per message: negative numbers are rejected.
                rows.iter()
                    .map(|Json(n)| {
                        if *n < 0 {
                            Err(HandlerError::reject("negative"))
                        } else {
                            Ok(())
                        }
                    })
                    .collect()
            }
        })
    };
    let h = Worker::new(t.clone())
        .batch_route("rows", handler, BatchConfig::new(3, Duration::from_millis(100)))
        .start()
        .await
        .unwrap();
    let _ = handle.set(h.clone());
    for body in ["1", "2", "-3", "4", "oops", "6", "7"] {
        t.publish(
            &Destination::queue("rows"),
            Message::new(body).with_content_type("application/json"),
        )
        .await
        .unwrap();
    }
    // 7 messages, the first batch of 3 twice (failed, then redelivered).
    let stats = h.wait_handled("rows", 10, Duration::from_secs(5)).await.unwrap();
    h.wait_idle(Duration::from_millis(150), Duration::from_secs(5))
        .await
        .unwrap();
    h.shutdown().await.unwrap();
    let stats_now = h.stats("rows").unwrap();
    assert!(stats.max_in_flight <= 3, "{stats:?}");
    assert_eq!(stats_now.requeued, 3, "{stats_now:?}");
    // "-3" by the handler, "oops" by its decoding.
    assert_eq!(stats_now.rejected, 2, "{stats_now:?}");
    assert_eq!(stats_now.acked, 5, "{stats_now:?}");
    assert_eq!(depth(&t, "rows").await, 0);
    assert_eq!(depth(&t, &dead).await, 2);
    let sizes = sizes.lock().clone();
    assert!(sizes.iter().all(|&n| (1..=3).contains(&n)), "{sizes:?}");
    // The handler never saw "oops"; 7 messages + 3 redelivered - 1 undecodable.
    assert_eq!(sizes.iter().sum::<usize>(), 9, "{sizes:?}");
    // Nothing of a batch is acked while its handler runs: the acks seen by
    // each call only ever come from earlier batches (the failed first batch: 0).
    let acked_during = acked_during.lock().clone();
    assert_eq!(acked_during[..2], [0, 0], "{acked_during:?}");
}

#[tokio::test]
async fn batch_routes_refuse_a_prefetch_below_the_batch_size() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("small")).await.unwrap();
    let e = Worker::new(t.clone())
        .batch_route(
            "small",
            batch_fn(|_: Vec<Envelope>| async {}),
            BatchConfig::new(50, Duration::from_millis(10)).prefetch(10),
        )
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_config");
    assert!(
        e.to_string().contains("prefetch") && e.to_string().contains("50"),
        "{e}"
    );
    assert_eq!(t.queue_info("small").await.unwrap().consumer_count, 0);
    // The default prefetch is the batch size.
    assert_eq!(BatchConfig::new(50, Duration::from_millis(10)).effective_prefetch(), 50);
}

/// The panic rule on batch routes counts panics, not `redelivered`: a batch
/// requeued once for a transient error that then panics is requeued again,
/// and dead-lettered only when it panics a second time.
#[tokio::test]
async fn a_batch_that_panics_after_a_requeue_gets_one_more_chance() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    let dead = dead_letter_topology(&t, "pb").await;
    for body in ["a", "b"] {
        t.publish(&Destination::queue("pb"), Message::new(body)).await.unwrap();
    }
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let handler = batch_fn(move |rows: Vec<Envelope>| {
        let n = c2.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                return vec![Err(HandlerError::retry("busy")); rows.len()];
            }
            panic!("bug in batch call {n}");
        }
    });
    let h = Worker::new(t.clone())
        .batch_route("pb", handler, BatchConfig::new(2, Duration::from_millis(100)))
        .start()
        .await
        .unwrap();
    wait_for("dead letters", || h.stats("pb").unwrap().rejected == 2).await;
    h.shutdown().await.unwrap();
    let s = h.stats("pb").unwrap();
    // transient → 2 requeued; first panic (redelivered) → 2 requeued; second → 2 rejected.
    assert_eq!((s.requeued, s.rejected, s.panicked), (4, 2, 4), "{s:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(depth(&t, &dead).await, 2);
}

/// Handlers that finish at once run inline on the consume loop; a handler
/// that blocks its thread (CPU-bound work) must still run concurrently on a
/// multi-thread runtime, as when every delivery had a task of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_bound_handlers_still_run_in_parallel() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("cpu")).await.unwrap();
    for i in 0..12 {
        t.publish(&Destination::queue("cpu"), Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, m) = (running.clone(), most.clone());
    let handler = handler_fn(move |_: Message| {
        let (r, m) = (r.clone(), m.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            // Blocks the thread, like a CPU-bound handler.
            std::thread::sleep(Duration::from_millis(30));
            r.fetch_sub(1, Ordering::SeqCst);
            Ok::<(), switchyard::HandlerError>(())
        }
    });
    let w = Worker::new(t.clone())
        .route_with("cpu", handler, RouteConfig::default().prefetch(12).concurrency(4))
        .start()
        .await
        .unwrap();
    let stats = w.wait_handled("cpu", 12, Duration::from_secs(30)).await.unwrap();
    w.shutdown().await.unwrap();
    println!(
        "12 blocking handlers, concurrency 4, 2 threads: at most {} at once, {} acked",
        most.load(Ordering::SeqCst),
        stats.acked
    );
    assert_eq!(stats.acked, 12);
    assert!(
        most.load(Ordering::SeqCst) >= 2,
        "blocking handlers ran one at a time: inline handling must hand slow handlers to tasks"
    );
}

/// A 1 MiB body travels from the publisher to the handler without a copy on
/// the memory transport: the handler sees the very allocation published
/// (`Bytes` end to end).
#[tokio::test]
async fn a_large_body_reaches_the_handler_without_a_copy() {
    let broker = MemoryBroker::new();
    let t = connect(&broker);
    t.declare_queue(&QueueSpec::new("big")).await.unwrap();
    let body = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let published = body.as_ptr() as usize;
    t.publish(&Destination::queue("big"), Message::new(body)).await.unwrap();
    let seen = Arc::new(parking_lot::Mutex::new(None));
    let s = seen.clone();
    let handler = handler_fn(move |m: Message| {
        let s = s.clone();
        async move {
            *s.lock() = Some((m.body.as_ptr() as usize, m.body.len()));
            Ok::<(), switchyard::HandlerError>(())
        }
    });
    let w = Worker::new(t.clone()).route("big", handler).start().await.unwrap();
    w.wait_handled("big", 1, Duration::from_secs(10)).await.unwrap();
    w.shutdown().await.unwrap();
    let (at, len) = seen.lock().expect("handled");
    println!("published body at {published:#x}, handler saw {at:#x} ({len} bytes)");
    assert_eq!(len, 1 << 20);
    assert_eq!(
        at, published,
        "the body was copied between the publisher and the handler"
    );
}
