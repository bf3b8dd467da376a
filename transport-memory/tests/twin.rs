//! The memory broker as RabbitMQ's twin: the `twin::` conformance
//! scenarios (which RabbitMQ passes too), and the details only the memory
//! broker can be asked about (the exact reply texts, class and method ids).

use std::sync::Arc;

use switchyard_core::testkit::{factory_fn, run_suite, TransportFactory};
use switchyard_core::{Admin, Binding, Consumer, Destination, ExchangeSpec, Message, Publisher, QueueSpec, Transport};
use switchyard_memory::MemoryBroker;

fn factory() -> impl TransportFactory {
    let broker = MemoryBroker::new();
    factory_fn(move || {
        let broker = broker.clone();
        async move { broker.connect() as Arc<dyn Transport> }
    })
}

#[tokio::test]
async fn twin_conformance_scenarios_pass_on_memory() {
    let report = run_suite(&factory(), Some("twin::")).await;
    assert!(report.passed() > 0, "no twin scenario ran");
    report.assert_ok();
}

#[tokio::test]
async fn refusals_carry_rabbitmqs_reply_text_and_method() {
    let conn = MemoryBroker::new().connect();
    let cases: Vec<(switchyard_core::Error, u16, &str, (u16, u16))> = vec![
        (
            conn.declare_exchange(&ExchangeSpec::direct("amq.zz"))
                .await
                .unwrap_err(),
            403,
            "ACCESS_REFUSED - exchange name 'amq.zz' contains reserved prefix 'amq.*'",
            (40, 10),
        ),
        (
            conn.declare_queue(&QueueSpec::new("amq.zz")).await.unwrap_err(),
            403,
            "ACCESS_REFUSED - queue name 'amq.zz' contains reserved prefix 'amq.*'",
            (50, 10),
        ),
        (
            conn.delete_exchange("amq.direct").await.unwrap_err(),
            403,
            "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed",
            (40, 20),
        ),
        (
            conn.bind(&Binding::queue("q", "", "k")).await.unwrap_err(),
            403,
            "ACCESS_REFUSED - operation not permitted on the default exchange",
            (50, 20),
        ),
        (
            conn.queue_info("nope").await.unwrap_err(),
            404,
            "NOT_FOUND - no queue 'nope' in vhost '/'",
            (50, 10),
        ),
        (
            conn.bind(&Binding::exchange("a", "nox", "k")).await.unwrap_err(),
            404,
            "NOT_FOUND - no exchange 'nox' in vhost '/'",
            (40, 30),
        ),
    ];
    for (e, code, text, ids) in cases {
        let r = e.reply().unwrap_or_else(|| panic!("{e} carries no broker reply"));
        assert_eq!((r.code, r.text.as_str(), (r.class_id, r.method_id)), (code, text, ids));
    }
    conn.declare_queue(&QueueSpec::new("d")).await.unwrap();
    let e = conn
        .declare_queue(&QueueSpec::new("d").durable(false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "precondition_failed");
    assert_eq!(
        e.reply().map(|r| r.text.as_str()),
        Some("PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'd' in vhost '/': received 'false' but current is 'true'")
    );
    let other = conn.broker().connect();
    conn.declare_queue(&QueueSpec::new("excl").durable(false).exclusive(true))
        .await
        .unwrap();
    let e = other.purge_queue("excl").await.unwrap_err();
    assert_eq!(e.code(), "resource_locked");
    let r = e.reply().expect("a reply");
    assert_eq!((r.code, r.class_id, r.method_id), (405, 50, 30));
}

/// The memory broker runs on tokio's clock: under a paused clock a
/// 5-minute TTL passes as soon as the test has nothing else to do.
#[tokio::test(start_paused = true)]
async fn a_5_minute_message_ttl_dead_letters_in_a_millisecond() {
    use std::time::Duration;
    use switchyard_core::{ConsumeOptions, Consumer, Destination, Message, Publisher};

    let wall = std::time::Instant::now();
    let t = MemoryBroker::new().connect();
    t.declare_queue(&QueueSpec::new("dead")).await.unwrap();
    t.declare_queue(
        &QueueSpec::new("work")
            .message_ttl(Duration::from_secs(300))
            .dead_letter("", Some("dead")),
    )
    .await
    .unwrap();
    let start = tokio::time::Instant::now();
    t.publish(&Destination::queue("work"), Message::new("late"))
        .await
        .unwrap();
    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    let d = dead.next().await.expect("stream open").expect("a dead letter");
    assert_eq!(&d.message.body[..], b"late");
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(300) && waited < Duration::from_secs(301),
        "expired after {waited:?} of virtual time"
    );
    assert!(
        wall.elapsed() < Duration::from_secs(2),
        "took {:?} of real time",
        wall.elapsed()
    );
    d.ack().await.unwrap();
    assert_eq!(t.queue_info("work").await.unwrap().message_count, 0);
}

/// As on RabbitMQ, `basic.cancel` stops new deliveries but leaves those
/// already sent unacked: the stream still yields them, they can be settled,
/// and only the end of the channel requeues what is left.
#[tokio::test]
async fn cancel_leaves_sent_deliveries_unacked_and_settleable() {
    use switchyard_core::{ConsumeOptions, Consumer, Destination, Message, Publisher};

    let t = MemoryBroker::new().connect();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    for b in ["a", "b", "c"] {
        t.publish(&Destination::queue("q"), Message::new(b)).await.unwrap();
    }
    let mut sub = t.consume("q", ConsumeOptions::default().prefetch(10)).await.unwrap();
    let a = sub.next().await.unwrap().unwrap();
    sub.cancel_handle().cancel().await.unwrap();
    let info = t.queue_info("q").await.unwrap();
    assert_eq!(
        (info.message_count, info.consumer_count),
        (0, 0),
        "nothing requeued at cancel"
    );
    // Sent before the cancel: still delivered, in order, then the stream ends.
    let b = sub.next().await.unwrap().unwrap();
    let c = sub.next().await.unwrap().unwrap();
    assert_eq!((&b.message.body[..], &c.message.body[..]), (&b"b"[..], &b"c"[..]));
    assert!(sub.next().await.is_none());
    a.ack().await.unwrap();
    b.nack(true).await.unwrap();
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 1);
    drop(sub);
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 1, "c is still held");
    drop(c);
    assert_eq!(
        t.queue_info("q").await.unwrap().message_count,
        2,
        "the channel is gone: c requeued"
    );
}

/// Dropping a cancelled subscription requeues the deliveries the
/// application never read (no one can settle them); those it holds stay
/// unacked until they are settled or dropped.
#[tokio::test]
async fn dropping_a_cancelled_subscription_requeues_what_was_never_read() {
    use switchyard_core::{ConsumeOptions, Consumer, Destination, Message, Publisher};

    let t = MemoryBroker::new().connect();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    for b in ["a", "b", "c"] {
        t.publish(&Destination::queue("q"), Message::new(b)).await.unwrap();
    }
    let mut sub = t.consume("q", ConsumeOptions::default().prefetch(10)).await.unwrap();
    let a = sub.next().await.unwrap().unwrap();
    sub.cancel_handle().cancel().await.unwrap();
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 0);
    drop(sub);
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 2, "b and c requeued");
    a.ack().await.expect("a held delivery stays settleable");
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 2);
}

/// Requeueing into a queue at its max length: drop-head drops from the head
/// (the requeued messages, dead-lettered as `maxlen`); reject-publish lets
/// the queue grow past the limit. Probed on RabbitMQ 3.10.8.
#[tokio::test]
async fn requeue_into_a_full_queue_applies_the_overflow_policy() {
    use switchyard_core::{ConsumeOptions, Consumer, Destination, Message, Overflow, Publisher};

    for (overflow, left, dead) in [
        (Overflow::DropHead, vec!["m3", "m4"], vec!["m1", "m2"]),
        (Overflow::RejectPublish, vec!["m1", "m2", "m3", "m4"], vec![]),
        (Overflow::RejectPublishDlx, vec!["m1", "m2", "m3", "m4"], vec![]),
    ] {
        let t = MemoryBroker::new().connect();
        t.declare_queue(&QueueSpec::new("dead")).await.unwrap();
        t.declare_queue(
            &QueueSpec::new("q")
                .max_length(2, overflow)
                .dead_letter("", Some("dead")),
        )
        .await
        .unwrap();
        let q = Destination::queue("q");
        for b in ["m1", "m2"] {
            t.publish(&q, Message::new(b)).await.unwrap();
        }
        let mut sub = t.consume("q", ConsumeOptions::default().prefetch(2)).await.unwrap();
        let m1 = sub.next().await.unwrap().unwrap();
        let m2 = sub.next().await.unwrap().unwrap();
        for b in ["m3", "m4"] {
            t.publish(&q, Message::new(b)).await.unwrap();
        }
        m1.nack(true).await.unwrap();
        drop(m2);
        drop(sub);
        let mut drain = t.consume("q", ConsumeOptions::default().auto_ack(true)).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..left.len() {
            let d = drain.next().await.unwrap().unwrap();
            got.push(String::from_utf8(d.message.body.to_vec()).unwrap());
        }
        assert_eq!(got, left, "{overflow:?}: queue after requeueing");
        let info = t.queue_info("dead").await.unwrap();
        assert_eq!(info.message_count as usize, dead.len(), "{overflow:?}: dead letters");
        let mut dl = t
            .consume("dead", ConsumeOptions::default().auto_ack(true))
            .await
            .unwrap();
        for want in dead {
            let d = dl.next().await.unwrap().unwrap();
            assert_eq!(&d.message.body[..], want.as_bytes());
            let death = match d.message.headers.get("x-death") {
                Some(switchyard_core::HeaderValue::Array(a)) => a[0].as_table().unwrap().clone(),
                other => panic!("no x-death: {other:?}"),
            };
            assert_eq!(death.get_str("reason"), Some("maxlen"));
        }
    }
}

/// RabbitMQ 3.10's TTL timer, in virtual time (as probed on 3.10.8): a
/// message alone in the queue gets the timer and expires on time; one that
/// goes ahead by priority of a message already there gets none, and is
/// dropped only when a fetch, a requeue or a due timer finds it at the head.
#[tokio::test(start_paused = true)]
async fn a_message_ahead_by_priority_waits_for_a_drop_at_the_head() {
    use std::time::Duration;
    let t = MemoryBroker::new().connect();
    t.declare_queue(&QueueSpec::new("p").max_priority(5)).await.unwrap();
    let dest = Destination::queue("p");
    let ttl = Duration::from_millis(100);
    let depth = || async { t.queue_info("p").await.unwrap().message_count };
    t.publish(&dest, Message::new("alone").with_priority(5).with_expiration(ttl))
        .await
        .unwrap();
    t.publish(&dest, Message::new("behind")).await.unwrap();
    tokio::time::sleep(2 * ttl).await;
    assert_eq!(depth().await, 1, "alone in the queue when published: expired on time");
    t.publish(&dest, Message::new("ahead").with_priority(5).with_expiration(ttl))
        .await
        .unwrap();
    tokio::time::sleep(2 * ttl).await;
    assert_eq!(depth().await, 2, "ahead of another message: no timer, still counted");
    // A get still takes it; settled with a requeue, it is dropped at once
    // (a requeue drops the expired heads).
    let g = t.get("p", false).await.unwrap().expect("a message");
    assert_eq!(&g.delivery.message.body[..], b"ahead");
    assert_eq!(g.message_count, 1);
    g.delivery.nack(true).await.unwrap();
    assert_eq!(depth().await, 1, "requeued past its TTL: dropped");
    let g = t.get("p", true).await.unwrap().expect("a message");
    assert_eq!(&g.delivery.message.body[..], b"behind");
}

/// The exact tie behind `twin::dead_letter_takes_the_place_of_an_expired_copy`,
/// which only the memory broker's clock can make exact: one message fanned
/// out to two queues with the same TTL expires in both at the same instant;
/// the queue that is full (max length 1, reject-publish) runs its own timer
/// before the other's dead letter arrives, so it takes that dead letter
/// (what RabbitMQ does when both timers fire in the same millisecond, as they
/// usually do; there it is a race).
#[tokio::test(start_paused = true)]
async fn simultaneous_expiries_run_before_their_dead_letters() {
    use std::time::Duration;
    use switchyard_core::topology::Overflow;
    let t = MemoryBroker::new().connect();
    let ttl = Duration::from_millis(200);
    t.declare_exchange(&ExchangeSpec::fanout("x")).await.unwrap();
    t.declare_queue(
        &QueueSpec::new("dst")
            .message_ttl(ttl)
            .max_length(1, Overflow::RejectPublish),
    )
    .await
    .unwrap();
    t.declare_queue(&QueueSpec::new("src").message_ttl(ttl).dead_letter("", Some("dst")))
        .await
        .unwrap();
    t.bind(&Binding::queue("src", "x", "")).await.unwrap();
    t.bind(&Binding::queue("dst", "x", "")).await.unwrap();
    t.publish(&Destination::new("x", "k"), Message::new("m")).await.unwrap();
    tokio::time::sleep(ttl + Duration::from_millis(1)).await;
    let g = t
        .get("dst", true)
        .await
        .unwrap()
        .expect("the dead letter took the expired copy's place");
    assert_eq!(
        (
            g.delivery.message.body.as_ref(),
            g.delivery.message.headers.get_str("x-first-death-queue")
        ),
        (&b"m"[..], Some("src"))
    );
    assert!(t.get("src", true).await.unwrap().is_none());
}
