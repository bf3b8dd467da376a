//! The memory broker's exchange kinds beyond the four and its consumer
//! priorities, in detail: what the `model::` conformance scenarios cannot
//! ask of RabbitMQ (virtual time, plugin kinds memory does not have,
//! round-robin within a priority).

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::testkit::{factory_fn, run_suite};
use switchyard_core::{
    Admin, Binding, ConsumeOptions, Consumer, Destination, ExchangeKind, ExchangeSpec, Message, Publisher, QueueSpec,
    Subscription, Transport,
};
use switchyard_memory::MemoryBroker;

#[tokio::test]
async fn model_conformance_scenarios_pass_on_memory() {
    let broker = MemoryBroker::new();
    let factory = factory_fn(move || {
        let broker = broker.clone();
        async move { broker.connect() as Arc<dyn Transport> }
    });
    let report = run_suite(&factory, Some("model::")).await;
    // Streams and consistent hashing are RabbitMQ's alone.
    assert_eq!(report.skipped(), 2, "{:?}", report.results);
    assert_eq!(report.passed(), 5, "{:?}", report.results);
    report.assert_ok();
}

async fn body(sub: &mut Subscription) -> String {
    let d = sub.next().await.expect("stream open").expect("a delivery");
    let b = String::from_utf8_lossy(&d.message.body).into_owned();
    d.ack().await.unwrap();
    b
}

#[tokio::test(start_paused = true)]
async fn a_5_minute_delayed_retry_arrives_in_a_millisecond() {
    let wall = std::time::Instant::now();
    let t = MemoryBroker::new().connect();
    t.declare_exchange(&ExchangeSpec::delayed("retry", ExchangeKind::Topic))
        .await
        .unwrap();
    t.declare_queue(&QueueSpec::new("jobs")).await.unwrap();
    t.bind(&Binding::queue("jobs", "retry", "jobs.#")).await.unwrap();
    let start = tokio::time::Instant::now();
    t.publish(
        &Destination::new("retry", "jobs.resize"),
        Message::new("again").with_delay(Duration::from_secs(300)),
    )
    .await
    .unwrap();
    t.publish(
        &Destination::new("retry", "jobs.resize"),
        Message::new("sooner").with_delay(Duration::from_secs(60)),
    )
    .await
    .unwrap();
    assert_eq!(t.queue_info("jobs").await.unwrap().message_count, 0, "held, not queued");
    let mut sub = t.consume("jobs", ConsumeOptions::default()).await.unwrap();
    assert_eq!(body(&mut sub).await, "sooner");
    let first = start.elapsed();
    assert_eq!(body(&mut sub).await, "again");
    let second = start.elapsed();
    assert!(
        first >= Duration::from_secs(60) && first < Duration::from_secs(61),
        "{first:?}"
    );
    assert!(
        second >= Duration::from_secs(300) && second < Duration::from_secs(301),
        "{second:?}"
    );
    assert!(
        wall.elapsed() < Duration::from_secs(2),
        "took {:?} of real time",
        wall.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn deleting_a_delayed_exchange_drops_what_it_holds() {
    let t = MemoryBroker::new().connect();
    t.declare_exchange(&ExchangeSpec::delayed("d", ExchangeKind::Fanout))
        .await
        .unwrap();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.bind(&Binding::queue("q", "d", "")).await.unwrap();
    t.publish(
        &Destination::new("d", ""),
        Message::new("held").with_delay(Duration::from_secs(5)),
    )
    .await
    .unwrap();
    t.delete_exchange("d").await.unwrap();
    // Redeclared and rebound, the exchange does not deliver the old message.
    t.declare_exchange(&ExchangeSpec::delayed("d", ExchangeKind::Fanout))
        .await
        .unwrap();
    t.bind(&Binding::queue("q", "d", "")).await.unwrap();
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 0);
}

#[tokio::test]
async fn delayed_type_must_name_a_kind_memory_routes() {
    let t = MemoryBroker::new().connect();
    for (what, spec) in [
        (
            "unknown type",
            ExchangeSpec::new("a", ExchangeKind::DelayedMessage).argument("x-delayed-type", "nope"),
        ),
        (
            "not a string",
            ExchangeSpec::new("b", ExchangeKind::DelayedMessage).argument("x-delayed-type", 1i32),
        ),
        ("missing", ExchangeSpec::new("c", ExchangeKind::DelayedMessage)),
    ] {
        let e = t.declare_exchange(&spec).await.unwrap_err();
        assert_eq!(e.code(), "precondition_failed", "{what}: {e}");
        assert_eq!(e.reply().map(|r| r.code), Some(406), "{what}");
        assert!(e.to_string().contains("x-delayed-type"), "{what}: {e}");
    }
}

#[tokio::test]
async fn plugin_kinds_memory_lacks_are_unsupported_not_accepted() {
    let t = MemoryBroker::new().connect();
    for kind in [ExchangeKind::ConsistentHash, ExchangeKind::Custom("x-random".into())] {
        let e = t
            .declare_exchange(&ExchangeSpec::new("p", kind.clone()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "unsupported", "{kind}: {e}");
        assert!(e.to_string().contains(kind.as_str()), "names the kind: {e}");
        assert!(!t.exchange_exists("p").await.unwrap(), "nothing declared for {kind}");
    }
}

#[tokio::test]
async fn a_zero_or_negative_delay_routes_at_once_and_keeps_the_header() {
    let t = MemoryBroker::new().connect();
    t.declare_exchange(&ExchangeSpec::delayed("d", ExchangeKind::Direct))
        .await
        .unwrap();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.bind(&Binding::queue("q", "d", "k")).await.unwrap();
    for v in [0i64, -40] {
        t.publish(&Destination::new("d", "k"), Message::new("x").with_header("x-delay", v))
            .await
            .unwrap();
    }
    let mut sub = t.consume("q", ConsumeOptions::default()).await.unwrap();
    for v in [0i64, -40] {
        let d = sub.next().await.unwrap().unwrap();
        assert_eq!(d.message.headers.get_i64("x-delay"), Some(v));
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn equal_priorities_share_round_robin_below_a_full_higher_one() {
    let t = MemoryBroker::new().connect();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    let mut a = t.consume("q", ConsumeOptions::default().prefetch(100)).await.unwrap();
    let mut top = t
        .consume("q", ConsumeOptions::default().prefetch(1).priority(5))
        .await
        .unwrap();
    let mut b = t.consume("q", ConsumeOptions::default().prefetch(100)).await.unwrap();
    for i in 0..7 {
        t.publish(&Destination::queue("q"), Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    // The priority-5 consumer takes one (its prefetch), then the two
    // priority-0 consumers alternate.
    let held = top.next().await.unwrap().unwrap();
    assert_eq!(&held.message.body[..], b"m0");
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..3 {
        got_a.push(body(&mut a).await);
        got_b.push(body(&mut b).await);
    }
    assert_eq!(got_a, ["m1", "m3", "m5"]);
    assert_eq!(got_b, ["m2", "m4", "m6"]);
    // Once it has room again, the higher priority is served first.
    held.ack().await.unwrap();
    t.publish(&Destination::queue("q"), Message::new("m7")).await.unwrap();
    assert_eq!(body(&mut top).await, "m7");
    // After the high-priority consumer leaves, the others share again.
    top.cancel().await.unwrap();
    for i in 8..10 {
        t.publish(&Destination::queue("q"), Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    let (x, y) = (body(&mut a).await, body(&mut b).await);
    assert_eq!((x.as_str(), y.as_str()), ("m8", "m9"));
}

/// Runs `f` to completion on this thread, parking it while `f` waits: an
/// executor with no tokio runtime, so the broker arms no timer.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = std::task::Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        if let std::task::Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}

/// Published outside a tokio runtime, a delayed message has no timer to
/// release it: the first broker operation after its delay routes it (as
/// TTL expiry happens lazily without a runtime).
#[test]
fn a_delay_published_outside_a_runtime_is_released_by_a_later_operation() {
    assert!(tokio::runtime::Handle::try_current().is_err(), "no runtime here");
    let t = MemoryBroker::new().connect();
    block_on(t.declare_exchange(&ExchangeSpec::delayed("d", ExchangeKind::Direct))).unwrap();
    block_on(t.declare_queue(&QueueSpec::new("q"))).unwrap();
    block_on(t.bind(&Binding::queue("q", "d", "k"))).unwrap();
    let delay = Duration::from_millis(100);
    let published = std::time::Instant::now();
    block_on(t.publish(&Destination::new("d", "k"), Message::new("later").with_delay(delay))).unwrap();
    let early = block_on(t.get("q", true)).unwrap();
    if published.elapsed() < delay {
        assert!(early.is_none(), "released before its delay");
    }
    // Poll with later operations (the delay runs on the real clock here:
    // there is no runtime whose clock a test could pause).
    let deadline = published + Duration::from_secs(10);
    let got = loop {
        if let Some(g) = block_on(t.get("q", true)).unwrap() {
            break g;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still held 10 s after its 100 ms delay: nothing released it"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(published.elapsed() >= delay, "released after {:?}", published.elapsed());
    assert_eq!(&got.delivery.message.body[..], b"later");
    assert_eq!(got.delivery.message.headers.get_i64("x-delay"), Some(-100));
}
