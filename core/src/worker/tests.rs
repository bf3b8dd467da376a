//! Worker unit tests on the in-crate fake broker.
//!
//! Only what the fake can do and a real broker cannot: fault injection (a
//! failing reply publish), services that panic in `call` or are never ready,
//! and pure configuration checks. Settlement, replies, shutdown, concurrency,
//! stop/status and failure of a consumer are tested once on a real transport:
//! the `runtime::` conformance scenarios (core/src/testkit/runtime.rs, run on
//! memory, lapin and amqprs) and tests/worker.rs (memory).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::fake::Fake;
use super::*;
use crate::handler::handler_fn;
use crate::message::Message;
use crate::transport::Publisher;

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

#[tokio::test]
async fn deliveries_waiting_at_start_count_as_the_last_delivery() {
    let fake = Fake::new();
    fake.add_queue("early");
    publish(&fake, "early", 3).await;
    let handle = Worker::new(transport(&fake))
        .route("early", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    handle.wait_handled("early", 3, Duration::from_secs(5)).await.unwrap();
    let r = &handle.routes()[0];
    assert!(
        r.last_delivery_age.is_some_and(|a| a < Duration::from_secs(5)),
        "{:?}",
        r.last_delivery_age
    );
    handle.shutdown().await.unwrap();
}

#[tokio::test]
async fn routes_report_last_delivery_and_idle_time() {
    let fake = Fake::new();
    fake.add_queue("seen");
    fake.add_queue("quiet");
    let handle = Worker::new(transport(&fake))
        .route("seen", handler_fn(|| async {}))
        .route("quiet", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    assert!(handle.is_running());
    let before = handle.routes();
    assert_eq!(before.len(), 2);
    assert!(before.iter().all(|r| r.last_delivery_age.is_none()));
    tokio::time::sleep(Duration::from_millis(60)).await;
    publish(&fake, "seen", 1).await;
    handle.wait_handled("seen", 1, Duration::from_secs(5)).await.unwrap();
    let after = handle.routes();
    let seen = after.iter().find(|r| r.queue == "seen").unwrap();
    let quiet = after.iter().find(|r| r.queue == "quiet").unwrap();
    let age = seen.last_delivery_age.expect("a delivery arrived");
    assert_eq!(seen.idle, age);
    assert_eq!(seen.stats.acked, 1);
    assert_eq!(seen.status, ConsumerStatus::Running);
    // No delivery on "quiet": idle counts from the start, longer than "seen"'s.
    assert!(quiet.last_delivery_age.is_none());
    assert!(quiet.idle >= Duration::from_millis(60), "{:?}", quiet.idle);
    assert!(quiet.idle > seen.idle);
    assert!(handle.uptime() >= quiet.idle);
    handle.stop("quiet").await.unwrap();
    assert!(!handle.is_running());
    handle.shutdown().await.unwrap();
}
