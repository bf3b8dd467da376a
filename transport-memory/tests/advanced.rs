//! Dead-lettering, TTL, max-length, priorities, exclusivity, auto-delete,
//! headers and exchange-to-exchange routing, quorum delivery limit, direct
//! reply-to.

use std::time::Duration;

use switchyard_core::{
    Admin, Binding, ConsumeOptions, Consumer, Destination, Error, ExchangeSpec, HeaderValue, Headers, Message,
    Overflow, Publisher, QueueSpec, QueueType, Transport,
};
use switchyard_memory::{MemoryBroker, MemoryTransport};

mod common;
use common::{body, drain, nothing, recv};

/// A DLX `dlx` (direct) bound to queue `dead` with key `dead`, and a work
/// queue built from `spec` dead-lettering to it.
async fn with_dlx(t: &MemoryTransport, spec: QueueSpec) {
    t.declare_exchange(&ExchangeSpec::direct("dlx")).await.unwrap();
    t.declare_queue(&QueueSpec::new("dead")).await.unwrap();
    t.bind(&Binding::queue("dead", "dlx", "dead")).await.unwrap();
    t.declare_queue(&spec.dead_letter("dlx", Some("dead"))).await.unwrap();
}

fn death(m: &Message) -> &Headers {
    let deaths = m
        .headers
        .get("x-death")
        .and_then(HeaderValue::as_array)
        .expect("x-death array");
    deaths[0].as_table().expect("x-death entry is a table")
}

#[tokio::test]
async fn reject_dead_letters_with_x_death() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("work")).await;
    t.declare_exchange(&ExchangeSpec::topic("events")).await.unwrap();
    t.bind(&Binding::queue("work", "events", "order.*")).await.unwrap();
    let m = Message::new("poison")
        .with_header("tenant", "acme")
        .with_priority(3)
        .with_expiration(Duration::from_secs(60));
    t.publish(&Destination::new("events", "order.created"), m)
        .await
        .unwrap();
    let mut sub = t.consume("work", ConsumeOptions::default()).await.unwrap();
    recv(&mut sub).await.reject(false).await.unwrap();

    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut dead).await;
    assert_eq!(body(&d), "poison");
    assert_eq!(&*d.info.exchange, "dlx");
    assert_eq!(&*d.info.routing_key, "dead");
    assert!(!d.info.redelivered);
    let m = &d.message;
    assert_eq!(m.headers.get_str("tenant"), Some("acme"));
    assert_eq!(m.properties.priority, Some(3), "other properties are kept");
    assert_eq!(m.properties.expiration, None, "expiration is removed");
    let x = death(m);
    assert_eq!(x.get("count"), Some(&HeaderValue::I64(1)));
    assert_eq!(x.get_str("reason"), Some("rejected"));
    assert_eq!(x.get_str("queue"), Some("work"));
    assert_eq!(x.get_str("exchange"), Some("events"));
    assert!(matches!(x.get("time"), Some(HeaderValue::Timestamp(s)) if *s > 1_700_000_000));
    assert_eq!(
        x.get("routing-keys"),
        Some(&HeaderValue::Array(vec![HeaderValue::String("order.created".into())]))
    );
    assert_eq!(x.get_str("original-expiration"), Some("60000"));
    assert_eq!(m.headers.get_str("x-first-death-reason"), Some("rejected"));
    assert_eq!(m.headers.get_str("x-first-death-queue"), Some("work"));
    assert_eq!(m.headers.get_str("x-first-death-exchange"), Some("events"));
    assert!(
        !m.headers.contains_key("x-last-death-reason"),
        "3.10 has no x-last-death-*"
    );
    d.ack().await.unwrap();
}

#[tokio::test]
async fn dead_lettered_again_increments_count_and_keeps_first_death() {
    let t = MemoryTransport::new();
    // work -> (reject) dlx -> dead ; dead -> (reject) default exchange -> work
    t.declare_exchange(&ExchangeSpec::direct("dlx")).await.unwrap();
    t.declare_queue(&QueueSpec::new("dead").dead_letter("", Some("work")))
        .await
        .unwrap();
    t.bind(&Binding::queue("dead", "dlx", "dead")).await.unwrap();
    t.declare_queue(&QueueSpec::new("work").dead_letter("dlx", Some("dead")))
        .await
        .unwrap();
    t.publish(&Destination::queue("work"), Message::new("m")).await.unwrap();
    let mut work = t.consume("work", ConsumeOptions::default()).await.unwrap();
    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    recv(&mut work).await.reject(false).await.unwrap();
    recv(&mut dead).await.reject(false).await.unwrap();
    recv(&mut work).await.reject(false).await.unwrap();
    let d = recv(&mut dead).await;
    let deaths = d
        .message
        .headers
        .get("x-death")
        .and_then(HeaderValue::as_array)
        .unwrap();
    assert_eq!(deaths.len(), 2, "one entry per (queue, reason)");
    let first = deaths[0].as_table().unwrap();
    assert_eq!(first.get_str("queue"), Some("work"), "most recent first");
    assert_eq!(first.get("count"), Some(&HeaderValue::I64(2)));
    let second = deaths[1].as_table().unwrap();
    assert_eq!(second.get_str("queue"), Some("dead"));
    assert_eq!(second.get("count"), Some(&HeaderValue::I64(1)));
    assert_eq!(d.message.headers.get_str("x-first-death-queue"), Some("work"));
    assert_eq!(d.message.headers.get_str("x-first-death-exchange"), Some(""));
}

#[tokio::test]
async fn dead_letter_without_routing_key_override_uses_original_key() {
    let t = MemoryTransport::new();
    t.declare_exchange(&ExchangeSpec::topic("dlx")).await.unwrap();
    t.declare_queue(&QueueSpec::new("dead")).await.unwrap();
    t.bind(&Binding::queue("dead", "dlx", "#")).await.unwrap();
    t.declare_queue(&QueueSpec::new("work").dead_letter("dlx", None))
        .await
        .unwrap();
    t.publish(&Destination::queue("work"), Message::new("m")).await.unwrap();
    let mut work = t.consume("work", ConsumeOptions::default()).await.unwrap();
    recv(&mut work).await.nack(false).await.unwrap();
    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut dead).await;
    assert_eq!(&*d.info.routing_key, "work");
}

// Virtual time: the TTLs and sleeps below take no real time.
#[tokio::test(start_paused = true)]
async fn per_message_ttl_expires_only_at_head() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("work")).await;
    let w = Destination::queue("work");
    t.publish(&w, Message::new("long").with_expiration(Duration::from_secs(60)))
        .await
        .unwrap();
    t.publish(&w, Message::new("short").with_expiration(Duration::from_millis(30)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        t.queue_info("work").await.unwrap().message_count,
        2,
        "short is not at the head"
    );
    assert_eq!(t.queue_info("dead").await.unwrap().message_count, 0);
    let mut sub = t.consume("work", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(body(&d), "long");
    nothing(&mut sub, 100).await;
    d.ack().await.unwrap();
    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut dead).await;
    assert_eq!(body(&d), "short");
    let x = death(&d.message);
    assert_eq!(x.get_str("reason"), Some("expired"));
    assert_eq!(x.get_str("original-expiration"), Some("30"));
    assert_eq!(d.message.properties.expiration, None);
}

// Virtual time: the TTLs and sleeps below take no real time.
#[tokio::test(start_paused = true)]
async fn expired_head_is_dead_lettered_eagerly_by_timer() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("work")).await;
    t.publish(
        &Destination::queue("work"),
        Message::new("short").with_expiration(Duration::from_millis(30)),
    )
    .await
    .unwrap();
    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut dead).await;
    assert_eq!(body(&d), "short");
    assert_eq!(t.queue_info("work").await.unwrap().message_count, 0);
}

// Virtual time: the TTLs and sleeps below take no real time.
#[tokio::test(start_paused = true)]
async fn queue_ttl_expires_everything_and_lower_ttl_wins() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("work").message_ttl(Duration::from_millis(60))).await;
    let w = Destination::queue("work");
    t.publish(&w, Message::new("a")).await.unwrap();
    t.publish(&w, Message::new("b").with_expiration(Duration::from_secs(60)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(t.queue_info("work").await.unwrap().message_count, 0);
    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    let a = recv(&mut dead).await;
    let b = recv(&mut dead).await;
    assert_eq!((body(&a), body(&b)), ("a".into(), "b".into()));
    assert_eq!(death(&a.message).get_str("reason"), Some("expired"));
    assert_eq!(death(&a.message).get_str("original-expiration"), None);
    assert_eq!(death(&b.message).get_str("original-expiration"), Some("60000"));
}

// Virtual time: the TTLs and sleeps below take no real time.
#[tokio::test(start_paused = true)]
async fn ttl_does_not_apply_to_a_waiting_consumer_nor_unacked() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("work").message_ttl(Duration::from_millis(20))).await;
    let mut sub = t.consume("work", ConsumeOptions::default()).await.unwrap();
    t.publish(&Destination::queue("work"), Message::new("a")).await.unwrap();
    let d = recv(&mut sub).await;
    tokio::time::sleep(Duration::from_millis(60)).await;
    d.ack().await.unwrap();
    assert_eq!(t.queue_info("dead").await.unwrap().message_count, 0);
}

// Virtual time: the TTLs and sleeps below take no real time.
#[tokio::test(start_paused = true)]
async fn expired_dead_letter_cycle_is_dropped() {
    let t = MemoryTransport::new();
    // A queue that dead-letters expired messages back to itself.
    t.declare_queue(
        &QueueSpec::new("loop")
            .message_ttl(Duration::from_millis(20))
            .dead_letter("", Some("loop")),
    )
    .await
    .unwrap();
    t.publish(&Destination::queue("loop"), Message::new("m")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(t.queue_info("loop").await.unwrap().message_count, 0);
}

#[tokio::test]
async fn rejected_dead_letter_back_to_same_queue_is_not_a_cycle() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("loop").dead_letter("", Some("loop")))
        .await
        .unwrap();
    t.publish(&Destination::queue("loop"), Message::new("m")).await.unwrap();
    let mut sub = t.consume("loop", ConsumeOptions::default()).await.unwrap();
    recv(&mut sub).await.reject(false).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(death(&d.message).get_str("reason"), Some("rejected"));
    d.ack().await.unwrap();
}

#[tokio::test]
async fn max_length_drop_head_dead_letters_oldest() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("work").max_length(2, Overflow::DropHead)).await;
    for i in 1..=4 {
        t.publish(&Destination::queue("work"), Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
    assert_eq!(t.queue_info("work").await.unwrap().message_count, 2);
    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    let a = recv(&mut dead).await;
    let b = recv(&mut dead).await;
    assert_eq!((body(&a), body(&b)), ("m1".into(), "m2".into()));
    assert_eq!(death(&a.message).get_str("reason"), Some("maxlen"));
    assert_eq!(drain(&t, "work").await, vec!["m3", "m4"]);
}

#[tokio::test]
async fn max_length_counts_ready_messages_only() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("work").max_length(2, Overflow::DropHead)).await;
    let w = Destination::queue("work");
    t.publish(&w, Message::new("m1")).await.unwrap();
    let mut sub = t.consume("work", ConsumeOptions::default().prefetch(1)).await.unwrap();
    let d = recv(&mut sub).await;
    t.publish(&w, Message::new("m2")).await.unwrap();
    t.publish(&w, Message::new("m3")).await.unwrap();
    assert_eq!(t.queue_info("work").await.unwrap().message_count, 2);
    assert_eq!(t.queue_info("dead").await.unwrap().message_count, 0);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn reject_publish_refuses_without_dead_lettering() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("work").max_length(1, Overflow::RejectPublish)).await;
    let w = Destination::queue("work");
    t.publish(&w, Message::new("m1")).await.unwrap();
    let e = t.publish(&w, Message::new("m2")).await.unwrap_err();
    assert!(
        matches!(&e, Error::PublishUnconfirmed { routing_key, .. } if routing_key == "work"),
        "{e}"
    );
    assert_eq!(t.queue_info("work").await.unwrap().message_count, 1);
    assert_eq!(t.queue_info("dead").await.unwrap().message_count, 0);
}

#[tokio::test]
async fn reject_publish_dlx_refuses_and_dead_letters() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("work").max_length(1, Overflow::RejectPublishDlx)).await;
    let w = Destination::queue("work");
    t.publish(&w, Message::new("m1")).await.unwrap();
    assert_eq!(
        t.publish(&w, Message::new("m2")).await.unwrap_err().code(),
        "publish_unconfirmed"
    );
    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut dead).await;
    assert_eq!(body(&d), "m2");
    assert_eq!(death(&d.message).get_str("reason"), Some("maxlen"));
    assert_eq!(drain(&t, "work").await, vec!["m1"]);
}

#[tokio::test]
async fn max_length_bytes_is_honoured() {
    let t = MemoryTransport::new();
    let mut spec = QueueSpec::new("work");
    spec.arguments.max_length_bytes = Some(10);
    t.declare_queue(&spec).await.unwrap();
    let w = Destination::queue("work");
    t.publish(&w, Message::new("123456")).await.unwrap();
    t.publish(&w, Message::new("abcdef")).await.unwrap();
    assert_eq!(drain(&t, "work").await, vec!["abcdef"]);
}

#[tokio::test]
async fn priorities_highest_first_fifo_within_and_clamped_to_max() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("p").max_priority(5)).await.unwrap();
    let d = Destination::queue("p");
    t.publish(&d, Message::new("p0a")).await.unwrap();
    t.publish(&d, Message::new("p3a").with_priority(3)).await.unwrap();
    t.publish(&d, Message::new("p9").with_priority(9)).await.unwrap();
    t.publish(&d, Message::new("p3b").with_priority(3)).await.unwrap();
    t.publish(&d, Message::new("p0b").with_priority(0)).await.unwrap();
    t.publish(&d, Message::new("p5").with_priority(5)).await.unwrap();
    let mut sub = t.consume("p", ConsumeOptions::default().prefetch(1)).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..6 {
        let d = recv(&mut sub).await;
        got.push((body(&d), d.message.properties.priority));
        d.ack().await.unwrap();
    }
    let names: Vec<&str> = got.iter().map(|(b, _)| b.as_str()).collect();
    assert_eq!(names, vec!["p9", "p5", "p3a", "p3b", "p0a", "p0b"]);
    assert_eq!(got[0].1, Some(9), "priority property delivered unchanged");
    assert_eq!(got[4].1, None);
}

#[tokio::test]
async fn without_max_priority_the_queue_is_fifo() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.publish(&Destination::queue("q"), Message::new("a").with_priority(1))
        .await
        .unwrap();
    t.publish(&Destination::queue("q"), Message::new("b").with_priority(9))
        .await
        .unwrap();
    assert_eq!(drain(&t, "q").await, vec!["a", "b"]);
}

#[tokio::test]
async fn exclusive_queue_belongs_to_its_connection() {
    let b = MemoryBroker::new();
    let owner = b.connect();
    let other = b.connect();
    let info = owner.declare_queue(&QueueSpec::temporary()).await.unwrap();
    assert!(info.name.starts_with("amq.gen-"), "{}", info.name);
    let q = info.name.as_str();
    for e in [
        other
            .consume(q, ConsumeOptions::default())
            .await
            .map(|_| ())
            .unwrap_err(),
        other.queue_info(q).await.map(|_| ()).unwrap_err(),
        other.purge_queue(q).await.map(|_| ()).unwrap_err(),
        other.delete_queue(q).await.map(|_| ()).unwrap_err(),
        other
            .declare_queue(&QueueSpec::temporary_named(q))
            .await
            .map(|_| ())
            .unwrap_err(),
    ] {
        assert!(
            matches!(&e, Error::ResourceLocked { resource, .. } if resource == q),
            "{e}"
        );
    }
    // Others may publish to it.
    other.publish(&Destination::queue(q), Message::new("x")).await.unwrap();
    assert_eq!(owner.queue_info(q).await.unwrap().message_count, 1);
    // Redeclaring with another exclusivity is locked too.
    let e = owner
        .declare_queue(&QueueSpec::new(q).durable(false).auto_delete(true))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "resource_locked");
    owner.close().await.unwrap();
    assert_eq!(other.queue_info(q).await.unwrap_err().code(), "queue_not_found");
}

trait TemporaryNamed {
    fn temporary_named(name: &str) -> QueueSpec;
}
impl TemporaryNamed for QueueSpec {
    fn temporary_named(name: &str) -> QueueSpec {
        let mut s = QueueSpec::temporary();
        s.name = name.to_owned();
        s
    }
}

#[tokio::test]
async fn dropping_a_connection_deletes_its_exclusive_queues() {
    let b = MemoryBroker::new();
    let other = b.connect();
    let name = {
        let owner = b.connect();
        owner.declare_queue(&QueueSpec::temporary()).await.unwrap().name
    };
    assert_eq!(other.queue_info(&name).await.unwrap_err().code(), "queue_not_found");
}

#[tokio::test]
async fn exclusive_consumer_locks_the_queue() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    let sub = t.consume("q", ConsumeOptions::default().exclusive(true)).await.unwrap();
    assert_eq!(
        t.consume("q", ConsumeOptions::default()).await.unwrap_err().code(),
        "access_refused"
    );
    sub.cancel().await.unwrap();
    let _plain = t.consume("q", ConsumeOptions::default()).await.unwrap();
    assert_eq!(
        t.consume("q", ConsumeOptions::default().exclusive(true))
            .await
            .unwrap_err()
            .code(),
        "access_refused"
    );
}

#[tokio::test]
async fn auto_delete_queue_goes_with_its_last_consumer() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("ad").auto_delete(true)).await.unwrap();
    let a = t.consume("ad", ConsumeOptions::default()).await.unwrap();
    let b = t.consume("ad", ConsumeOptions::default()).await.unwrap();
    a.cancel().await.unwrap();
    assert_eq!(t.queue_info("ad").await.unwrap().consumer_count, 1);
    drop(b);
    assert_eq!(t.queue_info("ad").await.unwrap_err().code(), "queue_not_found");
    // Never consumed: stays.
    t.declare_queue(&QueueSpec::new("ad2").auto_delete(true)).await.unwrap();
    assert!(t.queue_info("ad2").await.is_ok());
}

#[tokio::test]
async fn redeclare_is_idempotent_and_conflicts_are_precondition_failed() {
    let t = MemoryTransport::new();
    let spec = QueueSpec::new("q").message_ttl(Duration::from_secs(1));
    t.declare_queue(&spec).await.unwrap();
    t.publish(&Destination::queue("q"), Message::new("x")).await.unwrap();
    assert_eq!(t.declare_queue(&spec).await.unwrap().message_count, 1);
    for bad in [
        spec.clone().durable(false),
        spec.clone().auto_delete(true),
        QueueSpec::new("q"),
        spec.clone().max_priority(3),
    ] {
        let e = t.declare_queue(&bad).await.unwrap_err();
        assert!(
            matches!(&e, Error::PreconditionFailed { resource, .. } if resource == "q"),
            "{e}"
        );
    }
    t.declare_exchange(&ExchangeSpec::topic("x")).await.unwrap();
    t.declare_exchange(&ExchangeSpec::topic("x")).await.unwrap();
    for bad in [ExchangeSpec::direct("x"), ExchangeSpec::topic("x").durable(false)] {
        assert_eq!(
            t.declare_exchange(&bad).await.unwrap_err().code(),
            "precondition_failed"
        );
    }
}

#[tokio::test]
async fn headers_exchange_routes_on_values() {
    let t = MemoryTransport::new();
    t.declare_exchange(&ExchangeSpec::headers("h")).await.unwrap();
    for q in ["all", "any", "void"] {
        t.declare_queue(&QueueSpec::new(q)).await.unwrap();
    }
    let all: Headers = [
        ("x-match", HeaderValue::from("all")),
        ("format", "pdf".into()),
        ("v", HeaderValue::I32(2)),
    ]
    .into_iter()
    .collect();
    let any: Headers = [
        ("x-match", HeaderValue::from("any")),
        ("format", "zip".into()),
        ("v", 7i64.into()),
    ]
    .into_iter()
    .collect();
    let void: Headers = [("flag", HeaderValue::Void)].into_iter().collect();
    t.bind(&Binding::queue("all", "h", "").with_arguments(all))
        .await
        .unwrap();
    t.bind(&Binding::queue("any", "h", "").with_arguments(any))
        .await
        .unwrap();
    t.bind(&Binding::queue("void", "h", "").with_arguments(void))
        .await
        .unwrap();
    let h = Destination::new("h", "ignored");
    t.publish(
        &h,
        Message::new("1")
            .with_header("format", "pdf")
            .with_header("v", HeaderValue::I8(2)),
    )
    .await
    .unwrap();
    t.publish(&h, Message::new("2").with_header("format", "pdf").with_header("v", "2"))
        .await
        .unwrap();
    t.publish(&h, Message::new("3").with_header("v", HeaderValue::U16(7)))
        .await
        .unwrap();
    t.publish(&h, Message::new("4").with_header("flag", false))
        .await
        .unwrap();
    assert_eq!(drain(&t, "all").await, vec!["1"]);
    assert_eq!(drain(&t, "any").await, vec!["3"]);
    assert_eq!(drain(&t, "void").await, vec!["4"]);
    let bad: Headers = [("x-match", "most")].into_iter().collect();
    assert_eq!(
        t.bind(&Binding::queue("all", "h", "").with_arguments(bad))
            .await
            .unwrap_err()
            .code(),
        "precondition_failed"
    );
}

#[tokio::test]
async fn exchange_to_exchange_and_alternate_exchange() {
    let t = MemoryTransport::new();
    t.declare_exchange(&ExchangeSpec::topic("src")).await.unwrap();
    t.declare_exchange(&ExchangeSpec::fanout("fan")).await.unwrap();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.bind(&Binding::exchange("fan", "src", "a.#")).await.unwrap();
    t.bind(&Binding::queue("q", "fan", "")).await.unwrap();
    // Also bound directly: still one copy.
    t.bind(&Binding::queue("q", "src", "#")).await.unwrap();
    t.publish(&Destination::new("src", "a.b"), Message::new("1"))
        .await
        .unwrap();
    assert_eq!(drain(&t, "q").await, vec!["1"]);

    t.declare_exchange(&ExchangeSpec::fanout("ae")).await.unwrap();
    t.declare_queue(&QueueSpec::new("unrouted")).await.unwrap();
    t.bind(&Binding::queue("unrouted", "ae", "")).await.unwrap();
    let mut with_ae = ExchangeSpec::direct("main");
    with_ae.arguments.insert("alternate-exchange", "ae");
    t.declare_exchange(&with_ae).await.unwrap();
    t.publish_with(
        &Destination::new("main", "nowhere"),
        Message::new("2"),
        switchyard_core::PublishOptions::mandatory(),
    )
    .await
    .unwrap();
    assert_eq!(drain(&t, "unrouted").await, vec!["2"]);
}

#[tokio::test]
async fn quorum_delivery_limit_dead_letters() {
    let t = MemoryTransport::new();
    with_dlx(&t, QueueSpec::new("qq").queue_type(QueueType::Quorum).delivery_limit(1)).await;
    t.publish(&Destination::queue("qq"), Message::new("m")).await.unwrap();
    let mut sub = t.consume("qq", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut sub).await;
    assert!(!d.info.redelivered);
    d.nack(true).await.unwrap();
    let d = recv(&mut sub).await;
    assert!(d.info.redelivered);
    assert_eq!(d.message.headers.get_i64("x-delivery-count"), Some(1));
    d.nack(true).await.unwrap();
    nothing(&mut sub, 50).await;
    let mut dead = t.consume("dead", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut dead).await;
    assert_eq!(death(&d.message).get_str("reason"), Some("delivery_limit"));
    // Quorum queues must be durable and not exclusive.
    let e = t
        .declare_queue(&QueueSpec::new("qq2").queue_type(QueueType::Quorum).durable(false))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "precondition_failed");
}

#[tokio::test]
async fn connection_close_requeues_unacked_in_original_order() {
    let b = MemoryBroker::new();
    let c1 = b.connect();
    let c2 = b.connect();
    c1.declare_queue(&QueueSpec::new("q")).await.unwrap();
    for i in 1..=3 {
        c1.publish(&Destination::queue("q"), Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let mut sub = c2.consume("q", ConsumeOptions::default().prefetch(2)).await.unwrap();
    let _d1 = recv(&mut sub).await;
    let _d2 = recv(&mut sub).await;
    assert_eq!(c1.queue_info("q").await.unwrap().message_count, 1);
    drop(c2);
    let mut sub = c1.consume("q", ConsumeOptions::default().prefetch(0)).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = recv(&mut sub).await;
        got.push((body(&d), d.info.redelivered));
    }
    assert_eq!(got, vec![("1".into(), true), ("2".into(), true), ("3".into(), false)]);
}

#[tokio::test]
async fn direct_reply_to_round_trip() {
    let b = MemoryBroker::new();
    let client = b.connect();
    let server = b.connect();
    server.declare_queue(&QueueSpec::new("rpc")).await.unwrap();
    let mut rc = client.open_reply_channel().await.unwrap();
    assert_eq!(rc.reply_to, "amq.rabbitmq.reply-to");
    let publisher = rc.publisher.clone().expect("direct reply-to publishes on its channel");
    publisher
        .publish(
            &Destination::queue("rpc"),
            Message::new("ping")
                .with_reply_to(rc.reply_to.clone())
                .with_correlation_id("c1"),
        )
        .await
        .unwrap();
    let mut requests = server.consume("rpc", ConsumeOptions::default()).await.unwrap();
    let req = recv(&mut requests).await;
    let reply_to = req.message.properties.reply_to.clone().unwrap();
    assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
    server
        .publish(
            &Destination::queue(&*reply_to),
            Message::new("pong").with_correlation_id("c1"),
        )
        .await
        .unwrap();
    req.ack().await.unwrap();
    let reply = recv(&mut rc.replies).await;
    assert_eq!(body(&reply), "pong");
    assert!(!reply.needs_settlement());
    drop(rc);
    let e = server
        .publish_with(
            &Destination::queue(&*reply_to),
            Message::new("late"),
            switchyard_core::PublishOptions::mandatory(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "unroutable");
}

// Virtual time: the TTLs and sleeps below take no real time.
#[tokio::test(start_paused = true)]
async fn unused_queue_expires_and_use_renews_the_lease() {
    let b = MemoryBroker::new();
    let t = b.connect();
    let mut spec = QueueSpec::new("lease");
    spec.arguments.expires = Some(Duration::from_millis(120));
    t.declare_queue(&spec).await.unwrap();
    // Inspecting renews the lease.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        t.queue_info("lease").await.unwrap();
    }
    // A consumer keeps it alive.
    let sub = t.consume("lease", ConsumeOptions::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(t.queue_info("lease").await.is_ok());
    drop(sub);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(t.queue_info("lease").await.unwrap_err().code(), "queue_not_found");
    // Untouched from the start: gone.
    t.declare_queue(&spec).await.unwrap();
    t.publish(&Destination::queue("lease"), Message::new("x"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(t.queue_info("lease").await.unwrap_err().code(), "queue_not_found");
}

#[tokio::test]
async fn publishing_to_a_deep_queue_without_consumers_does_not_wait() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("deep")).await.unwrap();
    let start = std::time::Instant::now();
    for _ in 0..20_000 {
        t.publish(&Destination::queue("deep"), Message::new("x")).await.unwrap();
    }
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(t.queue_info("deep").await.unwrap().message_count, 20_000);
}

#[tokio::test]
async fn a_stalled_consumer_holds_publishers_only_briefly() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("deep")).await.unwrap();
    // Takes 10 and never acks: the queue backs up behind it.
    let mut sub = t.consume("deep", ConsumeOptions::default().prefetch(10)).await.unwrap();
    let start = std::time::Instant::now();
    for _ in 0..10_000 {
        t.publish(&Destination::queue("deep"), Message::new("x")).await.unwrap();
    }
    // Flow control gives up after a couple of milliseconds without
    // deliveries and stays off while the consumer is stalled.
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert_eq!(t.queue_info("deep").await.unwrap().message_count, 9_990);
    let d = recv(&mut sub).await;
    d.ack().await.unwrap();
}

#[tokio::test]
async fn large_prefetch_windows_refill_after_batched_acks() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    for i in 0..100 {
        t.publish(&Destination::queue("q"), Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let mut sub = t.consume("q", ConsumeOptions::default().prefetch(20)).await.unwrap();
    // A batch consumer: take a whole window, then ack it all, then ask for more.
    let mut seen = Vec::new();
    for _ in 0..5 {
        let mut batch = Vec::new();
        for _ in 0..20 {
            batch.push(recv(&mut sub).await);
        }
        nothing(&mut sub, 30).await;
        for d in batch {
            seen.push(body(&d).parse::<u32>().unwrap());
            d.ack().await.unwrap();
        }
    }
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 0);
}

#[tokio::test]
async fn acks_out_of_order_and_mixed_settlements_keep_the_window_exact() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    for i in 0..60 {
        t.publish(&Destination::queue("q"), Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let mut sub = t.consume("q", ConsumeOptions::default().prefetch(16)).await.unwrap();
    let mut window = Vec::new();
    for _ in 0..16 {
        window.push(recv(&mut sub).await);
    }
    nothing(&mut sub, 30).await;
    // Settle from the back: acks, one requeue, one reject.
    let last = window.pop().unwrap();
    last.nack(true).await.unwrap();
    let d = recv(&mut sub).await;
    assert!(d.info.redelivered);
    assert_eq!(body(&d), "15");
    window.push(d);
    window.remove(3).reject(false).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(body(&d), "16");
    window.push(d);
    nothing(&mut sub, 30).await;
    while let Some(d) = window.pop() {
        d.ack().await.unwrap();
    }
    let mut rest = 0;
    while rest < 60 - 17 {
        recv(&mut sub).await.ack().await.unwrap();
        rest += 1;
    }
    nothing(&mut sub, 30).await;
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_from_other_tasks_never_stall_a_large_window() {
    let b = MemoryBroker::new();
    let producer = b.connect();
    let consumer = b.connect();
    producer.declare_queue(&QueueSpec::new("q")).await.unwrap();
    let n = 20_000u32;
    let mut sub = consumer
        .consume("q", ConsumeOptions::default().prefetch(64))
        .await
        .unwrap();
    let publisher = tokio::spawn(async move {
        for i in 0..n {
            producer
                .publish(&Destination::queue("q"), Message::new(i.to_string()))
                .await
                .unwrap();
        }
        producer
    });
    let mut acks = Vec::new();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("no stall")
            .unwrap()
            .unwrap();
        // Settled elsewhere, out of the consumer loop (as a worker does).
        acks.push(tokio::spawn(async move { d.ack().await }));
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
    let producer = publisher.await.unwrap();
    let info = producer.queue_info("q").await.unwrap();
    assert_eq!((info.message_count, info.consumer_count), (0, 1));
}
