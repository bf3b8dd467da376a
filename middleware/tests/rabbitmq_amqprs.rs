//! The broker-visible layers on a real RabbitMQ (through the amqprs
//! transport): broker-delayed retry through TTL wait queues that dead-letter
//! back to the source, dead-lettering with reasons, compression and trace
//! context surviving the wire.
//!
//! Needs RabbitMQ at `SWITCHYARD_RABBITMQ_URL` (default
//! amqp://guest:guest@127.0.0.1:5672/%2f). If it is unreachable the test fails
//! when `SWITCHYARD_REQUIRE_RABBITMQ=1`, else prints
//! "skipped: RabbitMQ unreachable" and returns.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use switchyard_core::headers::*;
use switchyard_core::message::new_id;
use switchyard_core::worker::RouteConfig;
use switchyard_core::{
    handler_fn, Binding, Destination, Envelope, ExchangeSpec, HandlerError, Json, Message, Publisher, QueueSpec,
    Transport,
};
use switchyard_middleware::prelude::*;
use switchyard_middleware::retry::wait_queue_name;
use switchyard_middleware::trace::TraceContext;
use tower::ServiceBuilder;

async fn connect() -> Option<Arc<dyn Transport>> {
    let url =
        std::env::var("SWITCHYARD_RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
    match switchyard_amqprs::AmqprsTransport::connect_url(&url).await {
        Ok(t) => Some(Arc::new(t)),
        Err(e) => {
            if std::env::var("SWITCHYARD_REQUIRE_RABBITMQ").as_deref() == Ok("1") {
                panic!("RabbitMQ required but unreachable: {e}");
            }
            eprintln!("skipped: RabbitMQ unreachable ({e})");
            None
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    note: String,
    pad: String,
}

#[tokio::test]
async fn broker_delayed_retry_and_dead_letter_on_rabbitmq() {
    let Some(t) = connect().await else { return };
    let p = format!("sy-mw.{}", &new_id()[..8]);
    let (shop, dlx, orders, dead) = (
        format!("{p}.shop"),
        format!("{p}.dlx"),
        format!("{p}.orders"),
        format!("{p}.dead"),
    );
    let delay = Duration::from_millis(200);
    t.declare_exchange(&ExchangeSpec::topic(&shop).durable(false).auto_delete(false))
        .await
        .unwrap();
    t.declare_exchange(&ExchangeSpec::fanout(&dlx).durable(false))
        .await
        .unwrap();
    t.declare_queue(&QueueSpec::new(&orders)).await.unwrap();
    t.declare_queue(&QueueSpec::new(&dead)).await.unwrap();
    t.bind(&Binding::queue(&orders, &shop, "order.*")).await.unwrap();
    t.bind(&Binding::queue(&dead, &dlx, "")).await.unwrap();

    let publisher = ServicePublisher::new(
        ServiceBuilder::new()
            .layer(CorrelationLayer::new())
            .layer(TraceLayer::new())
            .layer(CompressionLayer::gzip().threshold(32))
            .service(PublisherService::new(t.clone())),
    );
    let handler = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .layer(DeadLetterLayer::new(t.clone(), dlx.clone()))
        .layer(RetryLayer::broker_delayed(
            RetryPolicy::explicit([delay, delay]),
            t.clone(),
            t.clone(),
        ))
        .layer(DecompressionLayer::new())
        .service(handler_fn(|Json(o): Json<Order>, env: Envelope| async move {
            match o.note.as_str() {
                "flaky" if env.retry_count() == 0 => Err(HandlerError::retry("flaky")),
                "down" => Err(HandlerError::retry("dependency down")),
                _ => Ok(()),
            }
        }));
    let w = start_with(&t, &orders, handler, RouteConfig::default().prefetch(10)).await;
    for note in ["flaky", "down"] {
        let m = Message::json(&Order {
            note: note.into(),
            pad: "x".repeat(100),
        })
        .unwrap()
        .with_message_id(note);
        publisher
            .publish(&Destination::new(shop.as_str(), "order.created"), m)
            .await
            .unwrap();
    }
    // flaky: 2 deliveries; down: 3 deliveries (2 retries, then dead-lettered)
    let st = handled(&w, &orders, 5).await;
    w.shutdown().await.unwrap();
    assert_eq!((st.acked, st.requeued, st.rejected), (5, 0, 0));
    eventually("dead letter", || async { ready_count(&t, &dead).await == 1 }).await;
    let dl = drain(&t, &dead).await.remove(0);
    assert_eq!(dl.properties.message_id.as_deref(), Some("down"));
    assert_eq!(
        dl.properties.content_encoding.as_deref(),
        Some("gzip"),
        "body untouched on the wire"
    );
    let h = &dl.headers;
    assert_eq!(h.get_i64(RETRY_COUNT), Some(2));
    assert_eq!(h.get_str(ERROR_KIND), Some("transient"));
    assert_eq!(h.get_str(ORIGINAL_EXCHANGE), Some(shop.as_str()));
    assert_eq!(h.get_str(ORIGINAL_ROUTING_KEY), Some("order.created"));
    assert_eq!(h.get_str(ORIGINAL_QUEUE), Some(orders.as_str()));
    assert!(
        h.get(X_DEATH).is_some(),
        "RabbitMQ's own x-death stays as the broker wrote it"
    );
    assert!(TraceContext::extract(h).is_some());
    let wait = wait_queue_name(&orders, delay);
    assert_eq!(ready_count(&t, &wait).await, 0);

    for q in [&orders, &dead, &wait] {
        t.delete_queue(q).await.unwrap();
    }
    for e in [&shop, &dlx] {
        t.delete_exchange(e).await.unwrap();
    }
    t.close().await.unwrap();
}
