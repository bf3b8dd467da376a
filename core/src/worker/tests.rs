//! Worker unit tests on the in-crate fake broker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::fake::Fake;
use super::*;
use crate::handler::{handler_fn, Json};
use crate::message::Message;
use crate::transport::{Admin, Publisher};

async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn publish(fake: &Arc<Fake>, q: &str, n: usize) {
    for i in 0..n {
        fake.publish(&Destination::queue(q), Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
}

fn transport(fake: &Arc<Fake>) -> Arc<dyn Transport> {
    fake.clone()
}

#[tokio::test]
async fn success_acks_and_counts() {
    let fake = Fake::new();
    fake.add_queue("q");
    publish(&fake, "q", 5).await;
    let h = Worker::new(transport(&fake))
        .route("q", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    wait_for("5 acks", || h.stats("q").unwrap().acked == 5).await;
    assert_eq!(fake.ready("q"), 0);
    assert_eq!(fake.unacked("q"), 0);
    h.shutdown().await.unwrap();
    let s = h.stats("q").unwrap();
    assert_eq!((s.handled, s.acked, s.requeued, s.rejected, s.failed), (5, 5, 0, 0, 0));
    assert_eq!(h.status("q"), Some(ConsumerStatus::Stopped));
}

#[tokio::test]
async fn transient_requeues_then_succeeds_on_redelivery() {
    let fake = Fake::new();
    fake.add_queue("q");
    publish(&fake, "q", 1).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let h = Worker::new(transport(&fake))
        .route(
            "q",
            handler_fn(move |info: DeliveryInfo| {
                let seen = s2.clone();
                async move {
                    seen.lock().push(info.redelivered);
                    if info.redelivered {
                        Ok(())
                    } else {
                        Err(HandlerError::retry("db down"))
                    }
                }
            }),
        )
        .start()
        .await
        .unwrap();
    wait_for("ack after retry", || h.stats("q").unwrap().acked == 1).await;
    h.shutdown().await.unwrap();
    assert_eq!(*seen.lock(), vec![false, true]);
    let s = h.stats("q").unwrap();
    assert_eq!((s.requeued, s.acked, s.failed), (1, 1, 1));
}

#[tokio::test]
async fn permanent_and_decode_failures_are_rejected_without_requeue() {
    #[derive(serde::Deserialize)]
    struct Req {
        #[allow(dead_code)]
        id: u32,
    }
    let fake = Fake::new();
    fake.add_queue("perm");
    fake.add_queue("json");
    publish(&fake, "perm", 2).await;
    fake.publish(
        &Destination::queue("json"),
        Message::new("{not json").with_content_type("application/json"),
    )
    .await
    .unwrap();
    fake.publish(&Destination::queue("json"), Message::new(r#"{"id":1}"#))
        .await
        .unwrap();
    let h = Worker::new(transport(&fake))
        .route(
            "perm",
            handler_fn(|| async { Err::<(), _>(HandlerError::reject("bad")) }),
        )
        .route("json", handler_fn(|Json(_r): Json<Req>| async {}))
        .start()
        .await
        .unwrap();
    wait_for("rejections", || {
        h.stats("perm").unwrap().rejected == 2 && h.stats("json").unwrap().handled == 2
    })
    .await;
    h.shutdown().await.unwrap();
    assert_eq!(fake.dead("perm").len(), 2);
    let dead = fake.dead("json");
    assert_eq!(dead.len(), 1);
    assert_eq!(&dead[0].body[..], b"{not json");
    let s = h.stats("json").unwrap();
    assert_eq!((s.acked, s.rejected, s.requeued), (1, 1, 0));
    assert_eq!(fake.ready("perm") + fake.ready("json"), 0);
}

#[tokio::test]
async fn panics_requeue_once_then_dead_letter() {
    let fake = Fake::new();
    fake.add_queue("q");
    publish(&fake, "q", 1).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let h = Worker::new(transport(&fake))
        .route(
            "q",
            handler_fn(move || {
                let calls = c2.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    if calls.load(Ordering::SeqCst) < 100 {
                        panic!("boom");
                    }
                }
            }),
        )
        .start()
        .await
        .unwrap();
    wait_for("dead letter", || fake.dead("q").len() == 1).await;
    h.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one retry, then dead-lettered");
    let s = h.stats("q").unwrap();
    assert_eq!((s.panicked, s.requeued, s.rejected, s.handled), (2, 1, 1, 2));
    // An Err(Panic) returned by a layer follows the same rule.
    assert_eq!(h.status("q"), Some(ConsumerStatus::Stopped));
}

/// A service whose `call` panics synchronously (before returning a future).
#[derive(Clone)]
struct PanicsInCall;

impl Service<Envelope> for PanicsInCall {
    type Response = Outcome;
    type Error = HandlerError;
    type Future = std::future::Ready<std::result::Result<Outcome, HandlerError>>;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::result::Result<(), HandlerError>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Envelope) -> Self::Future {
        panic!("call panicked")
    }
}

#[tokio::test]
async fn panic_in_call_and_err_panic_are_caught() {
    let fake = Fake::new();
    fake.add_queue("sync");
    fake.add_queue("errpanic");
    publish(&fake, "sync", 1).await;
    publish(&fake, "errpanic", 1).await;
    let h = Worker::new(transport(&fake))
        .route("sync", PanicsInCall)
        .route(
            "errpanic",
            handler_fn(|| async { Err::<(), _>(HandlerError::panic("layer caught a panic")) }),
        )
        .start()
        .await
        .unwrap();
    wait_for("both dead-lettered", || {
        fake.dead("sync").len() == 1 && fake.dead("errpanic").len() == 1
    })
    .await;
    h.shutdown().await.unwrap();
    for q in ["sync", "errpanic"] {
        let s = h.stats(q).unwrap();
        assert_eq!((s.panicked, s.requeued, s.rejected), (2, 1, 1), "{q}");
    }
}

#[tokio::test]
async fn replies_go_to_reply_to_with_the_request_correlation_id() {
    let fake = Fake::new();
    fake.add_queue("rpc");
    fake.add_queue("replies");
    fake.publish(
        &Destination::queue("rpc"),
        Message::new("2").with_reply_to("replies").with_correlation_id("cid-7"),
    )
    .await
    .unwrap();
    // Without reply_to: acked, reply dropped.
    fake.publish(&Destination::queue("rpc"), Message::new("3"))
        .await
        .unwrap();
    let h = Worker::new(transport(&fake))
        .route(
            "rpc",
            handler_fn(|crate::handler::Text(t): crate::handler::Text| async move {
                let n: u32 = t.parse().unwrap();
                Message::new((n * 10).to_string())
            }),
        )
        .start()
        .await
        .unwrap();
    wait_for("two acks", || h.stats("rpc").unwrap().acked == 2).await;
    h.shutdown().await.unwrap();
    let replies = fake.ready_messages("replies");
    assert_eq!(replies.len(), 1);
    assert_eq!(&replies[0].0.body[..], b"20");
    assert_eq!(replies[0].0.properties.correlation_id.as_deref(), Some("cid-7"));
    assert_eq!(h.stats("rpc").unwrap().replied, 1);
}

#[tokio::test]
async fn failed_reply_publish_requeues_the_request() {
    let fake = Fake::new();
    fake.add_queue("rpc");
    fake.publish(&Destination::queue("rpc"), Message::new("x").with_reply_to("nowhere"))
        .await
        .unwrap();
    fake.fail_publish.store(true, Ordering::SeqCst);
    let h = Worker::new(transport(&fake))
        .route("rpc", handler_fn(|| async { Message::new("reply") }))
        .start()
        .await
        .unwrap();
    wait_for("requeue", || h.stats("rpc").unwrap().requeued >= 1).await;
    fake.fail_publish.store(false, Ordering::SeqCst);
    wait_for("ack after publish recovers", || h.stats("rpc").unwrap().acked == 1).await;
    h.shutdown().await.unwrap();
    assert!(h.stats("rpc").unwrap().settle_failed >= 1);
}

#[tokio::test]
async fn concurrency_bound_is_honoured() {
    let fake = Fake::new();
    fake.add_queue("q");
    publish(&fake, "q", 20).await;
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (n2, m2) = (now.clone(), max.clone());
    let h = Worker::new(transport(&fake))
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
            RouteConfig::default().prefetch(10).concurrency(3),
        )
        .start()
        .await
        .unwrap();
    wait_for("20 acks", || h.stats("q").unwrap().acked == 20).await;
    h.shutdown().await.unwrap();
    assert_eq!(
        max.load(Ordering::SeqCst),
        3,
        "handlers ran concurrently up to the bound"
    );
    assert_eq!(h.stats("q").unwrap().max_in_flight, 3);
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_and_requeues_the_rest() {
    let fake = Fake::new();
    fake.add_queue("q");
    publish(&fake, "q", 10).await;
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (s2, f2) = (started.clone(), finished.clone());
    let h = Worker::new(transport(&fake))
        .route_with(
            "q",
            handler_fn(move || {
                let (started, finished) = (s2.clone(), f2.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            }),
            RouteConfig::default().prefetch(5).concurrency(2),
        )
        .start()
        .await
        .unwrap();
    wait_for("two in flight", || started.load(Ordering::SeqCst) == 2).await;
    h.shutdown().await.unwrap();
    assert_eq!(finished.load(Ordering::SeqCst), 2, "in-flight handlers completed");
    assert_eq!(started.load(Ordering::SeqCst), 2, "nothing new started after shutdown");
    let s = h.stats("q").unwrap();
    assert_eq!(s.acked, 2);
    assert_eq!(fake.unacked("q"), 0, "nothing left unacked");
    assert_eq!(fake.ready("q"), 8, "the rest is back in the queue");
}

#[tokio::test]
async fn shutdown_deadline_aborts_and_requeues() {
    let fake = Fake::new();
    fake.add_queue("q");
    publish(&fake, "q", 3).await;
    let finished = Arc::new(AtomicUsize::new(0));
    let f2 = finished.clone();
    let h = Worker::new(transport(&fake))
        .route_with(
            "q",
            handler_fn(move || {
                let finished = f2.clone();
                async move {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    finished.fetch_add(1, Ordering::SeqCst);
                }
            }),
            RouteConfig::default().prefetch(3).concurrency(3),
        )
        .shutdown_timeout(Duration::from_millis(100))
        .start()
        .await
        .unwrap();
    wait_for("three in flight", || h.stats("q").unwrap().in_flight == 3).await;
    let t = Instant::now();
    h.shutdown().await.unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "deadline honoured: {:?}",
        t.elapsed()
    );
    assert_eq!(finished.load(Ordering::SeqCst), 0);
    assert_eq!(fake.unacked("q"), 0);
    assert_eq!(fake.ready("q"), 3);
    assert!(fake.ready_messages("q").iter().all(|(_, redelivered)| *redelivered));
    assert_eq!(h.stats("q").unwrap().requeued, 3);
}

#[tokio::test]
async fn stop_one_queue_keeps_the_others() {
    let fake = Fake::new();
    for q in ["a", "b", "c"] {
        fake.add_queue(q);
    }
    let h = Worker::new(transport(&fake))
        .route("a", handler_fn(|| async {}))
        .route("b", handler_fn(|| async {}))
        .route("c", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    assert_eq!(h.queues(), vec!["a", "b", "c"]);
    h.stop("b").await.unwrap();
    assert_eq!(h.status("b"), Some(ConsumerStatus::Stopped));
    let report = h.report();
    assert_eq!(report.len(), 3);
    assert_eq!((report[1].0.as_str(), &report[1].1), ("b", &ConsumerStatus::Stopped));
    assert_eq!(report[0].1, ConsumerStatus::Running);
    assert_eq!(h.status("a"), Some(ConsumerStatus::Running));
    for q in ["a", "b", "c"] {
        publish(&fake, q, 3).await;
    }
    wait_for("a and c handled", || {
        h.stats("a").unwrap().acked == 3 && h.stats("c").unwrap().acked == 3
    })
    .await;
    assert_eq!(fake.ready("b"), 3, "stopped consumer takes nothing");
    assert_eq!(h.stats("b").unwrap().handled, 0);
    assert_eq!(h.stop("nope").await.unwrap_err().code(), "invalid_config");
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn missing_queue_fails_start_and_deleted_queue_fails_the_consumer() {
    let fake = Fake::new();
    fake.add_queue("q");
    let e = Worker::new(transport(&fake))
        .route("q", handler_fn(|| async {}))
        .route("missing", handler_fn(|| async {}))
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.code(), "queue_not_found");
    let e = Worker::new(transport(&fake))
        .route("q", handler_fn(|| async {}))
        .route("q", handler_fn(|| async {}))
        .start()
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_config");

    let h = Worker::new(transport(&fake))
        .route("q", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    fake.delete_queue("q").await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), h.join())
        .await
        .expect("consumer ends, no hang")
        .unwrap_err();
    assert_eq!(e.code(), "consumer_cancelled");
    assert!(matches!(
        h.status("q"),
        Some(ConsumerStatus::Failed {
            code: "consumer_cancelled",
            ..
        })
    ));
}

#[tokio::test]
async fn run_until_returns_when_a_consumer_fails_or_the_signal_fires() {
    let fake = Fake::new();
    fake.add_queue("q");
    fake.add_queue("r");
    let token = CancellationToken::new();
    let w = Worker::new(transport(&fake))
        .route("q", handler_fn(|| async {}))
        .route("r", handler_fn(|| async {}));
    let run = tokio::spawn(w.run_until(token.clone().cancelled_owned()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!run.is_finished());
    token.cancel();
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let w = Worker::new(transport(&fake))
        .route("q", handler_fn(|| async {}))
        .route("r", handler_fn(|| async {}));
    let run = tokio::spawn(w.run_until(std::future::pending()));
    tokio::time::sleep(Duration::from_millis(20)).await;
    fake.delete_queue("r").await.unwrap();
    let e = tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(e.code(), "consumer_cancelled");
}

#[tokio::test]
async fn auto_ack_settles_nothing_and_counts_failures() {
    let fake = Fake::new();
    fake.add_queue("q");
    publish(&fake, "q", 4).await;
    let h = Worker::new(transport(&fake))
        .route_with(
            "q",
            handler_fn(|b: crate::handler::Body| async move {
                if b.0.ends_with(b"1") {
                    Err(HandlerError::reject("no"))
                } else {
                    Ok(())
                }
            }),
            RouteConfig::default().auto_ack(true),
        )
        .start()
        .await
        .unwrap();
    wait_for("4 handled", || h.stats("q").unwrap().handled == 4).await;
    h.shutdown().await.unwrap();
    let s = h.stats("q").unwrap();
    assert_eq!((s.failed, s.acked, s.rejected, s.requeued), (1, 0, 0, 0));
    assert!(fake.dead("q").is_empty());
    assert_eq!(fake.ready("q") + fake.unacked("q"), 0);
}

#[tokio::test]
async fn retried_and_dead_lettered_outcomes_ack_the_original() {
    let fake = Fake::new();
    fake.add_queue("q");
    publish(&fake, "q", 2).await;
    let h = Worker::new(transport(&fake))
        .route(
            "q",
            handler_fn(|b: crate::handler::Body| async move {
                if b.0.ends_with(b"0") {
                    Outcome::Retried
                } else {
                    Outcome::DeadLettered
                }
            }),
        )
        .start()
        .await
        .unwrap();
    wait_for("2 acks", || h.stats("q").unwrap().acked == 2).await;
    h.shutdown().await.unwrap();
    let s = h.stats("q").unwrap();
    assert_eq!((s.requeued, s.rejected, s.failed), (0, 0, 0));
    assert!(fake.dead("q").is_empty());
    assert_eq!(fake.ready("q") + fake.unacked("q"), 0);
}

#[derive(Clone)]
struct NeverReady(Arc<AtomicUsize>);

impl Service<Envelope> for NeverReady {
    type Response = Outcome;
    type Error = HandlerError;
    type Future = std::future::Ready<std::result::Result<Outcome, HandlerError>>;
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<std::result::Result<(), HandlerError>> {
        std::task::Poll::Pending
    }
    fn call(&mut self, _: Envelope) -> Self::Future {
        self.0.fetch_add(1, Ordering::SeqCst);
        std::future::ready(Ok(Outcome::Ack))
    }
}

#[tokio::test]
async fn readiness_is_awaited_before_taking_a_delivery() {
    let fake = Fake::new();
    fake.add_queue("q");
    publish(&fake, "q", 3).await;
    let calls = Arc::new(AtomicUsize::new(0));
    let h = Worker::new(transport(&fake))
        .route("q", NeverReady(calls.clone()))
        .start()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fake.unacked("q"), 0, "no delivery taken while the handler is not ready");
    assert_eq!(fake.ready("q"), 3);
    h.shutdown().await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[test]
fn run_and_start_futures_are_send() {
    fn is_send<T: Send>(_: &T) {}
    let w = Worker::new(Fake::new()).route("q", handler_fn(|| async {}));
    let run = w.run();
    is_send(&run);
    let w = Worker::new(Fake::new()).route("q", handler_fn(|| async {}));
    is_send(&w.start());
}

#[test]
fn route_config_defaults() {
    let c = RouteConfig::default();
    assert_eq!((c.prefetch, c.effective_concurrency()), (10, 10));
    assert_eq!(RouteConfig::default().prefetch(0).effective_concurrency(), 10);
    assert_eq!(RouteConfig::default().prefetch(4).effective_concurrency(), 4);
    assert_eq!(RouteConfig::default().concurrency(0).effective_concurrency(), 1);
    let s = Settings::default().with_prefetch(25);
    let w = Worker::new(Fake::new()).with_settings(&s);
    assert_eq!(w.default_prefetch, 25);
}
