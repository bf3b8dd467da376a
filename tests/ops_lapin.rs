//! The ops endpoint on RabbitMQ through lapin: `/readyz` is 200 while the
//! Worker consumes and 503 once the transport is closed.
//! `cargo test --features ops,lapin --test ops_lapin` (RabbitMQ at
//! `RABBITMQ_URL`, default `amqp://guest:guest@127.0.0.1:5672/`; skipped
//! when unreachable unless `SWITCHYARD_REQUIRE_RABBITMQ=1`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use switchyard::lapin::{AmqpConfig, LapinTransport};
use switchyard::ops::OpsServer;
use switchyard::worker::Worker;
use switchyard::{handler_fn, Destination, Message, Settings, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.split(' ').nth(1).unwrap().parse().unwrap(), body.to_owned())
}

#[tokio::test]
async fn readyz_is_200_while_consuming_and_503_after_the_transport_is_closed() {
    let settings = Settings::default()
        .with_url(switchyard_core::testkit::rabbitmq_url())
        .with_connection_attempts(1)
        .with_retry_delay(Duration::from_millis(100));
    let config = AmqpConfig::from_settings(&settings)
        .unwrap()
        .connection_name("switchyard ops test");
    let lapin = match LapinTransport::connect_with(config).await {
        Ok(t) => Arc::new(t),
        Err(e) => {
            let _: Option<()> = switchyard_core::testkit::broker_unreachable(e);
            return;
        }
    };
    let t: Arc<dyn Transport> = lapin.clone();
    let queue = format!("switchyard.ops.{}", std::process::id());
    // From the settings (TTL, dead-lettering), made to go away with the test.
    let spec = settings.queue(queue.clone()).durable(false).auto_delete(true);
    t.declare_queue(&spec).await.unwrap();
    let worker = Worker::new(t.clone())
        .with_settings(&settings)
        .route(queue.clone(), handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    let ops = OpsServer::new(worker.clone())
        .amqp(lapin.clone())
        .bind("127.0.0.1:0")
        .await
        .unwrap();
    let addr = ops.local_addr();
    t.publish(&Destination::queue(queue.as_str()), Message::new("hi"))
        .await
        .unwrap();
    worker.wait_handled(&queue, 1, Duration::from_secs(10)).await.unwrap();

    let (code, body) = get(addr, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (_, metrics) = get(addr, "/metrics").await;
    assert!(metrics.contains("switchyard_connection_up 1"), "{metrics}");
    assert!(
        metrics.contains("switchyard_connection_reconnects_total 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("switchyard_worker_acked_total{{queue=\"{queue}\"}} 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_connection_info{state=\"connected\",address=\""),
        "{metrics}"
    );
    assert!(
        !metrics.contains("address=\"\""),
        "the node address is known: {metrics}"
    );

    t.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        let (code, body) = get(addr, "/readyz").await;
        if code == 503 {
            break body;
        }
        assert!(Instant::now() < deadline, "still ready after close: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(body.contains("connection closed"), "{body}");
    assert!(body.contains("transport lapin"), "{body}");
    let (_, metrics) = get(addr, "/metrics").await;
    assert!(metrics.contains("switchyard_connection_up 0"), "{metrics}");
    let _ = worker.shutdown().await;
}
