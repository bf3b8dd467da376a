//! `/metrics` with the Prometheus recorder: MetricsLayer's metrics next to
//! the Worker's own (a process of its own: it installs the global recorder).

use std::time::Duration;

use switchyard::memory::MemoryBroker;
use switchyard::middleware::metrics::MetricsLayer;
use switchyard::ops::OpsServer;
use switchyard::worker::Worker;
use switchyard::{handler_fn, Destination, Message, QueueSpec, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn metrics_facade_metrics_are_rendered_next_to_the_workers_counters() {
    let broker = MemoryBroker::new();
    let t: std::sync::Arc<dyn Transport> = broker.connect();
    t.declare_queue(&QueueSpec::new("jobs")).await.unwrap();
    let worker = Worker::new(t.clone())
        .layer(MetricsLayer::new())
        .route("jobs", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    let server = OpsServer::new(worker.clone()).with_prometheus().unwrap();
    // A second recorder cannot be installed: the error says what to do.
    let e = OpsServer::new(worker.clone()).with_prometheus().unwrap_err();
    assert_eq!(e.code(), "invalid_config");
    assert!(e.to_string().contains("prometheus_handle"), "{e}");
    let ops = server.bind("127.0.0.1:0").await.unwrap();
    for i in 0..2 {
        t.publish(&Destination::queue("jobs"), Message::new(format!("{i}")))
            .await
            .unwrap();
    }
    worker.wait_handled("jobs", 2, Duration::from_secs(5)).await.unwrap();

    let mut s = tokio::net::TcpStream::connect(ops.local_addr()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("switchyard_worker_acked_total{queue=\"jobs\"} 2"), "{raw}");
    assert!(
        raw.contains("switchyard_messages_handled_total{queue=\"jobs\",outcome=\"ack\"} 2"),
        "MetricsLayer's counter through the recorder:\n{raw}"
    );
    assert!(raw.contains("switchyard_message_handling_seconds"), "{raw}");
    worker.shutdown().await.unwrap();
}
