//! Basic semantics: declare, bind, route, publish, consume, prefetch, settle.

use std::time::Duration;

use switchyard_core::{
    Admin, Binding, ConsumeOptions, Consumer, Destination, Error, ExchangeSpec, Message, Publisher, QueueSpec,
};
use switchyard_memory::{MemoryBroker, MemoryTransport};

mod common;
use common::{body, drain, nothing, recv};

#[tokio::test]
async fn default_exchange_routes_by_queue_name() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q1")).await.unwrap();
    t.publish(&Destination::queue("q1"), Message::new("a")).await.unwrap();
    t.publish(&Destination::queue("q1"), Message::new("b")).await.unwrap();
    assert_eq!(t.queue_info("q1").await.unwrap().message_count, 2);
    let mut sub = t.consume("q1", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(body(&d), "a");
    assert_eq!(&*d.info.exchange, "");
    assert_eq!(&*d.info.routing_key, "q1");
    assert_eq!(&*d.info.queue, "q1");
    assert!(!d.info.redelivered);
    d.ack().await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(body(&d), "b");
    d.ack().await.unwrap();
    let info = t.queue_info("q1").await.unwrap();
    assert_eq!((info.message_count, info.consumer_count), (0, 1));
}

#[tokio::test]
async fn default_exchange_cannot_be_bound_or_deleted_access_refused() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    assert_eq!(
        t.bind(&Binding::queue("q", "", "q")).await.unwrap_err().code(),
        "access_refused"
    );
    assert_eq!(
        t.unbind(&Binding::queue("q", "", "q")).await.unwrap_err().code(),
        "access_refused"
    );
    assert_eq!(t.delete_exchange("").await.unwrap_err().code(), "access_refused");
    assert!(t.exchange_exists("").await.unwrap());
    assert_eq!(
        t.declare_exchange(&ExchangeSpec::direct("")).await.unwrap_err().code(),
        "access_refused"
    );
}

#[tokio::test]
async fn direct_fanout_topic_routing() {
    let t = MemoryTransport::new();
    t.declare_exchange(&ExchangeSpec::direct("d")).await.unwrap();
    t.declare_exchange(&ExchangeSpec::fanout("f")).await.unwrap();
    t.declare_exchange(&ExchangeSpec::topic("t")).await.unwrap();
    for q in ["qa", "qb", "qc"] {
        t.declare_queue(&QueueSpec::new(q)).await.unwrap();
    }
    t.bind(&Binding::queue("qa", "d", "red")).await.unwrap();
    t.bind(&Binding::queue("qb", "d", "blue")).await.unwrap();
    t.bind(&Binding::queue("qa", "f", "ignored")).await.unwrap();
    t.bind(&Binding::queue("qc", "f", "")).await.unwrap();
    t.bind(&Binding::queue("qb", "t", "session.*")).await.unwrap();
    t.bind(&Binding::queue("qc", "t", "#.deleted")).await.unwrap();
    // Binding twice is idempotent: one copy per publish.
    t.bind(&Binding::queue("qc", "t", "#.deleted")).await.unwrap();

    t.publish(&Destination::new("d", "red"), Message::new("d-red"))
        .await
        .unwrap();
    t.publish(&Destination::new("d", "green"), Message::new("d-green"))
        .await
        .unwrap();
    t.publish(&Destination::new("f", "whatever"), Message::new("f"))
        .await
        .unwrap();
    t.publish(&Destination::new("t", "session.created"), Message::new("t1"))
        .await
        .unwrap();
    t.publish(&Destination::new("t", "session.created.v2"), Message::new("t2"))
        .await
        .unwrap();
    t.publish(&Destination::new("t", "memory.x.deleted"), Message::new("t3"))
        .await
        .unwrap();
    t.publish(&Destination::new("t", "deleted"), Message::new("t4"))
        .await
        .unwrap();

    assert_eq!(drain(&t, "qa").await, vec!["d-red", "f"]);
    assert_eq!(drain(&t, "qb").await, vec!["t1"]);
    assert_eq!(drain(&t, "qc").await, vec!["f", "t3", "t4"]);
}

#[tokio::test]
async fn unbind_and_delete_exchange_stop_routing() {
    let t = MemoryTransport::new();
    t.declare_exchange(&ExchangeSpec::direct("d")).await.unwrap();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.bind(&Binding::queue("q", "d", "k")).await.unwrap();
    t.publish(&Destination::new("d", "k"), Message::new("1")).await.unwrap();
    t.unbind(&Binding::queue("q", "d", "k")).await.unwrap();
    t.publish(&Destination::new("d", "k"), Message::new("2")).await.unwrap();
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 1);
    t.delete_exchange("d").await.unwrap();
    assert!(!t.exchange_exists("d").await.unwrap());
    let e = t
        .publish(&Destination::new("d", "k"), Message::new("3"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::ExchangeNotFound { exchange, .. } if exchange == "d"),
        "{e}"
    );
    // Deleting a missing exchange is not an error.
    t.delete_exchange("d").await.unwrap();
}

#[tokio::test]
async fn missing_entities_give_clear_errors() {
    let t = MemoryTransport::new();
    let e = t.consume("nope", ConsumeOptions::default()).await.unwrap_err();
    assert!(
        matches!(&e, Error::QueueNotFound { queue, .. } if queue == "nope"),
        "{e}"
    );
    let e = t.queue_info("nope").await.unwrap_err();
    assert_eq!(e.code(), "queue_not_found");
    let e = t
        .publish(&Destination::new("nope", "k"), Message::new("x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "exchange_not_found");
    let e = t.bind(&Binding::queue("nope", "amq.direct", "k")).await.unwrap_err();
    assert_eq!(e.code(), "queue_not_found");
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    let e = t.bind(&Binding::queue("q", "nope", "k")).await.unwrap_err();
    assert_eq!(e.code(), "exchange_not_found");
    // Unbinding what does not exist is fine (as on RabbitMQ 3.10).
    t.unbind(&Binding::queue("q", "nope", "k")).await.unwrap();
    t.unbind(&Binding::queue("nope", "amq.direct", "k")).await.unwrap();
    t.unbind(&Binding::queue("q", "amq.direct", "k")).await.unwrap();
    assert_eq!(t.delete_queue("nope").await.unwrap(), 0);
}

#[tokio::test]
async fn mandatory_unroutable_fails_and_plain_unroutable_is_dropped() {
    let t = MemoryTransport::new();
    t.declare_exchange(&ExchangeSpec::direct("d")).await.unwrap();
    t.publish(&Destination::new("d", "k"), Message::new("x")).await.unwrap();
    let e = t
        .publish_with(
            &Destination::new("d", "k"),
            Message::new("x"),
            switchyard_core::PublishOptions::mandatory(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::Unroutable { exchange, routing_key, .. } if exchange == "d" && routing_key == "k"),
        "{e}"
    );
    let e = t
        .publish_with(
            &Destination::queue("missing"),
            Message::new("x"),
            switchyard_core::PublishOptions::mandatory(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "unroutable");
}

#[tokio::test]
async fn prefetch_bounds_unacked_deliveries() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    for i in 0..10 {
        t.publish(&Destination::queue("q"), Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let mut sub = t.consume("q", ConsumeOptions::default().prefetch(3)).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(recv(&mut sub).await);
    }
    nothing(&mut sub, 50).await;
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 7);
    held.remove(0).ack().await.unwrap();
    let d = recv(&mut sub).await;
    assert_eq!(body(&d), "3");
    nothing(&mut sub, 50).await;
    held.push(d);
    for d in held {
        d.ack().await.unwrap();
    }
    for i in 4..10 {
        let d = recv(&mut sub).await;
        assert_eq!(body(&d), i.to_string());
        d.ack().await.unwrap();
    }
}

#[tokio::test]
async fn prefetch_zero_is_unlimited() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    for i in 0..50 {
        t.publish(&Destination::queue("q"), Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let mut sub = t.consume("q", ConsumeOptions::default().prefetch(0)).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..50 {
        held.push(recv(&mut sub).await);
    }
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 0);
}

#[tokio::test]
async fn competing_consumers_share_round_robin() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    let mut a = t.consume("q", ConsumeOptions::default().prefetch(0)).await.unwrap();
    let mut b = t.consume("q", ConsumeOptions::default().prefetch(0)).await.unwrap();
    for i in 0..6 {
        t.publish(&Destination::queue("q"), Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    for _ in 0..3 {
        let d = recv(&mut a).await;
        got_a.push(body(&d));
        d.ack().await.unwrap();
        let d = recv(&mut b).await;
        got_b.push(body(&d));
        d.ack().await.unwrap();
    }
    assert_eq!(got_a, vec!["0", "2", "4"]);
    assert_eq!(got_b, vec!["1", "3", "5"]);
    assert_eq!(t.queue_info("q").await.unwrap().consumer_count, 2);
}

#[tokio::test]
async fn nack_requeue_goes_back_to_original_position_redelivered() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    for i in 0..4 {
        t.publish(&Destination::queue("q"), Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let mut sub = t.consume("q", ConsumeOptions::default().prefetch(2)).await.unwrap();
    let d0 = recv(&mut sub).await;
    let d1 = recv(&mut sub).await;
    // Stop the consumer so requeued messages stay in the queue, then
    // requeue the second first, then the first: both return to their
    // original positions, ahead of 2 and 3, in original order.
    sub.cancel().await.unwrap();
    d1.nack(true).await.unwrap();
    d0.reject(true).await.unwrap();
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 4);
    let mut sub = t.consume("q", ConsumeOptions::default().prefetch(2)).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let d = recv(&mut sub).await;
        seen.push((body(&d), d.info.redelivered));
        d.ack().await.unwrap();
    }
    assert_eq!(
        seen,
        vec![
            ("0".to_string(), true),
            ("1".to_string(), true),
            ("2".to_string(), false),
            ("3".to_string(), false)
        ]
    );
}

#[tokio::test]
async fn reject_without_requeue_and_no_dlx_drops() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.publish(&Destination::queue("q"), Message::new("x")).await.unwrap();
    let mut sub = t.consume("q", ConsumeOptions::default()).await.unwrap();
    recv(&mut sub).await.reject(false).await.unwrap();
    nothing(&mut sub, 50).await;
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 0);
}

#[tokio::test]
async fn settling_after_connection_close_fails_and_message_is_requeued() {
    let b = MemoryBroker::new();
    let t = b.connect();
    let other = b.connect();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.publish(&Destination::queue("q"), Message::new("x")).await.unwrap();
    let mut sub = t.consume("q", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut sub).await;
    use switchyard_core::Transport;
    t.close().await.unwrap();
    let e = d.ack().await.unwrap_err();
    assert_eq!(e.code(), "settle_failed");
    assert!(sub.next().await.is_none());
    assert_eq!(other.queue_info("q").await.unwrap().message_count, 1);
    let mut sub = other.consume("q", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut sub).await;
    assert!(d.info.redelivered);
    assert_eq!(
        t.publish(&Destination::queue("q"), Message::new("y"))
            .await
            .unwrap_err()
            .code(),
        "shutdown"
    );
    assert_eq!(t.health_check().await.unwrap_err().code(), "shutdown");
    other.health_check().await.unwrap();
}

#[tokio::test]
async fn auto_ack_needs_no_settlement() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    let mut sub = t.consume("q", ConsumeOptions::default().auto_ack(true)).await.unwrap();
    for i in 0..20 {
        t.publish(&Destination::queue("q"), Message::new(i.to_string()))
            .await
            .unwrap();
    }
    for i in 0..20 {
        let d = recv(&mut sub).await;
        assert!(!d.needs_settlement());
        assert_eq!(body(&d), i.to_string());
    }
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 0);
}

#[tokio::test]
async fn cancel_ends_stream_and_unacked_stay_until_settled() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.publish(&Destination::queue("q"), Message::new("x")).await.unwrap();
    let mut sub = t.consume("q", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut sub).await;
    sub.cancel().await.unwrap();
    assert!(sub.next().await.is_none(), "stream ends after cancel");
    let info = t.queue_info("q").await.unwrap();
    assert_eq!((info.message_count, info.consumer_count), (0, 0));
    d.nack(true).await.unwrap();
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 1);
}

#[tokio::test]
async fn dropping_deliveries_and_subscription_requeues_unacked() {
    let t = MemoryTransport::new();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    t.publish(&Destination::queue("q"), Message::new("x")).await.unwrap();
    {
        let mut sub = t.consume("q", ConsumeOptions::default()).await.unwrap();
        let _d = recv(&mut sub).await;
    }
    let mut sub = t.consume("q", ConsumeOptions::default()).await.unwrap();
    let d = recv(&mut sub).await;
    assert!(d.info.redelivered);
    d.ack().await.unwrap();
}

#[tokio::test]
async fn purge_counts_ready_only_and_delete_returns_ready_count() {
    let b = MemoryBroker::new();
    let t = b.connect();
    t.declare_queue(&QueueSpec::new("q")).await.unwrap();
    for i in 0..5 {
        t.publish(&Destination::queue("q"), Message::new(i.to_string()))
            .await
            .unwrap();
    }
    let mut sub = t.consume("q", ConsumeOptions::default().prefetch(2)).await.unwrap();
    let d = recv(&mut sub).await;
    let _d2 = recv(&mut sub).await;
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 3);
    assert_eq!(t.purge_queue("q").await.unwrap(), 3);
    assert_eq!(t.queue_info("q").await.unwrap().message_count, 0);
    d.nack(true).await.unwrap();
    assert_eq!(
        t.delete_queue("q").await.unwrap(),
        0,
        "the requeued message went to the consumer"
    );
    assert!(recv(&mut sub).await.message.body.len() == 1);
    match tokio::time::timeout(Duration::from_secs(1), sub.next()).await.unwrap() {
        Some(Err(Error::ConsumerCancelled { queue })) => assert_eq!(queue, "q"),
        other => panic!("expected ConsumerCancelled, got {other:?}"),
    }
    assert!(sub.next().await.is_none());
}

#[tokio::test]
async fn topic_empty_words_and_empty_key_through_the_broker() {
    let t = MemoryTransport::new();
    t.declare_exchange(&ExchangeSpec::topic("t")).await.unwrap();
    for (q, pattern) in [
        ("hash", "#"),
        ("star", "*"),
        ("a-star", "a.*"),
        ("a-hash", "a.#"),
        ("empty", ""),
    ] {
        t.declare_queue(&QueueSpec::new(q)).await.unwrap();
        t.bind(&Binding::queue(q, "t", pattern)).await.unwrap();
    }
    for key in ["", "a", "a.", "a.b.c", "."] {
        t.publish(&Destination::new("t", key), Message::new(format!("[{key}]")))
            .await
            .unwrap();
    }
    assert_eq!(drain(&t, "hash").await, vec!["[]", "[a]", "[a.]", "[a.b.c]", "[.]"]);
    assert_eq!(drain(&t, "star").await, vec!["[a]"]);
    assert_eq!(drain(&t, "a-star").await, vec!["[a.]"]);
    assert_eq!(drain(&t, "a-hash").await, vec!["[a]", "[a.]", "[a.b.c]"]);
    assert_eq!(drain(&t, "empty").await, vec!["[]"]);
}

/// A TTL or lease too long for the clock is "never" — not a panic inside
/// the broker (RabbitMQ accepts such values).
#[tokio::test]
async fn huge_ttls_and_expiries_never_expire_and_never_panic() {
    let t = MemoryTransport::new();
    let huge = std::time::Duration::from_millis(i64::MAX as u64);
    t.declare_queue(&QueueSpec::new("forever").message_ttl(huge))
        .await
        .unwrap();
    let mut spec = QueueSpec::new("leased");
    spec.arguments.expires = Some(huge);
    t.declare_queue(&spec).await.unwrap();
    for q in ["forever", "leased"] {
        t.publish(&Destination::queue(q), Message::new("x").with_expiration(huge))
            .await
            .unwrap();
        assert_eq!(t.queue_info(q).await.unwrap().message_count, 1, "{q}");
    }
}
