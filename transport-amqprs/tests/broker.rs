//! Broker tests of behaviour specific to the amqprs transport (the shared
//! behaviour is in the conformance suite): `cargo test -p switchyard-amqprs`.
//!
//! Connects to `RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/`);
//! unreachable: fails with `SWITCHYARD_REQUIRE_RABBITMQ=1`, else prints
//! "skipped: RabbitMQ unreachable".

use std::time::Duration;

use switchyard_amqprs::{AmqpConfig, AmqprsTransport};
use switchyard_core::{Admin, Consumer, Destination, Message, Publisher, QueueSpec, QueueType, Transport};

fn url() -> String {
    switchyard_core::testkit::rabbitmq_url()
}

async fn connect(name: &str) -> Option<AmqprsTransport> {
    let mut cfg = AmqpConfig::from_url(&url()).unwrap().connection_name(name);
    cfg.connection_attempts = 1;
    cfg.retry_delay = Duration::from_millis(100);
    match AmqprsTransport::connect_with(cfg).await {
        Ok(t) => Some(t),
        Err(e) => switchyard_core::testkit::broker_unreachable(e),
    }
}

fn unique(s: &str) -> String {
    format!("sy-amqprs-test.{s}.{}", &switchyard_core::message::new_id()[..8])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_dropped_mid_flight_do_not_break_the_channel() {
    let Some(t) = connect("switchyard amqprs test cancel").await else {
        return;
    };
    let q = unique("cancel");
    // Futures dropped at every stage of the request (amqprs issue #196).
    for i in 0..50u64 {
        let spec = QueueSpec::new(q.clone());
        let _ = tokio::time::timeout(Duration::from_micros(i * 20), t.declare_queue(&spec)).await;
    }
    for _ in 0..20 {
        let info = t
            .declare_queue(&QueueSpec::new(q.clone()))
            .await
            .expect("declare after cancellations");
        assert_eq!(info.name, q);
        assert_eq!(t.queue_info(&q).await.expect("queue_info").name, q);
    }
    let dest = Destination::queue(q.as_str());
    for i in 0..50u64 {
        let _ = tokio::time::timeout(Duration::from_micros(i * 20), t.publish(&dest, Message::new("x"))).await;
        let opts = switchyard_core::ConsumeOptions::default();
        let _ = tokio::time::timeout(Duration::from_micros(i * 40), t.consume(&q, opts)).await;
    }
    t.publish(&dest, Message::new("after"))
        .await
        .expect("publish after cancellations");
    let mut sub = t
        .consume(&q, switchyard_core::ConsumeOptions::default())
        .await
        .expect("consume after cancellations");
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
    assert!(matches!(d, Ok(Some(Ok(_)))), "no delivery after cancellations");
    drop(sub);
    t.health_check().await.expect("healthy");
    t.delete_queue(&q).await.unwrap();
    t.close().await.unwrap();
    assert_eq!(t.health_check().await.unwrap_err().code(), "shutdown");
    let e = t
        .publish(&Destination::queue(q.as_str()), Message::new("x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_queue_with_arguments_and_connection_name_in_the_broker() {
    let name = format!("switchyard amqprs test {}", &switchyard_core::message::new_id()[..6]);
    let Some(t) = connect(&name).await else {
        return;
    };
    let q = unique("quorum");
    let spec = QueueSpec::new(q.clone())
        .queue_type(QueueType::Quorum)
        .delivery_limit(3)
        .dead_letter("amq.fanout", None);
    t.declare_queue(&spec).await.expect("quorum queue");
    // Identical redeclare is fine; a classic redeclare conflicts.
    t.declare_queue(&spec).await.expect("identical redeclare");
    let e = t.declare_queue(&QueueSpec::new(q.clone())).await.unwrap_err();
    assert_eq!(e.code(), "precondition_failed", "{e}");
    t.publish(&Destination::queue(q.as_str()), Message::new("x").persistent(true))
        .await
        .unwrap();
    let info = t.queue_info(&q).await.unwrap();
    assert_eq!((info.message_count, info.consumer_count), (1, 0));

    // The connection name is what the management UI shows.
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "client_properties", "--quiet"])
        .output();
    if let Ok(out) = out {
        if out.status.success() {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(&name),
                "connection name '{name}' not listed by the broker"
            );
            assert!(!text.contains("guest:guest"));
        }
    }
    t.delete_queue(&q).await.unwrap();
    t.close().await.unwrap();
}
