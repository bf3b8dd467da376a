//! Metrics with a Prometheus exporter: handle a few messages on the memory
//! transport and print the Prometheus text exposition.
//!
//! Run: `cargo run -p switchyard-middleware --example prometheus`
//!
//! In a service, serve `handle.render()` on your HTTP `/metrics` route (or
//! enable metrics-exporter-prometheus's `http-listener` feature and call
//! `PrometheusBuilder::new().install()`).

use std::sync::Arc;
use std::time::Duration;

use switchyard_core::worker::Worker;
use switchyard_core::{
    handler_fn, Destination, Envelope, ExchangeSpec, HandlerError, Message, Publisher, QueueSpec, Transport,
};
use switchyard_middleware::prelude::*;
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // 1. install the recorder before the first message is handled
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets(&[0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0])?
        .install_recorder()?;

    let transport: Arc<dyn Transport> = switchyard_memory::MemoryTransport::new();
    transport.declare_exchange(&ExchangeSpec::fanout("app.dlx")).await?;
    transport.declare_queue(&QueueSpec::new("dead_letter")).await?;
    transport
        .bind(&switchyard_core::Binding::queue("dead_letter", "app.dlx", ""))
        .await?;
    transport.declare_queue(&QueueSpec::new("orders")).await?;

    // 2. metrics on the publisher side ...
    let publisher = ServicePublisher::new(
        ServiceBuilder::new()
            .layer(MetricsLayer::new())
            .service(PublisherService::new(transport.clone())),
    );
    // ... and on the consumer side (outside dead-letter, so it sees its outcome)
    let handler = ServiceBuilder::new()
        .layer(MetricsLayer::new())
        .layer(DeadLetterLayer::new(transport.clone(), "app.dlx").routing_key("dead_letter"))
        .service(handler_fn(|env: Envelope| async move {
            tokio::time::sleep(Duration::from_millis(2)).await;
            if env.body().starts_with(b"bad") {
                Err(HandlerError::reject("bad order"))
            } else {
                Ok(())
            }
        }));
    let worker = Worker::new(transport.clone()).route("orders", handler).start().await?;

    for i in 0..20 {
        let body = if i % 5 == 0 {
            format!("bad {i}")
        } else {
            format!("order {i}")
        };
        publisher
            .publish(&Destination::queue("orders"), Message::new(body))
            .await?;
    }
    while worker.stats("orders").map_or(0, |s| s.acked) < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown().await?;

    // 3. what a scrape of /metrics returns
    let text = prometheus.render();
    for line in text
        .lines()
        .filter(|l| l.starts_with("switchyard_") && !l.contains("_bucket"))
    {
        println!("{line}");
    }
    Ok(())
}
