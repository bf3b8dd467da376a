//! Shared helpers of the middleware integration tests (memory transport + Worker).
#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use switchyard_core::worker::{RouteConfig, RouteStats, Worker, WorkerHandle};
use switchyard_core::{
    Binding, ConsumeOptions, Delivery, Destination, ExchangeSpec, Handler, Message, QueueSpec, Transport,
};
use switchyard_memory::MemoryBroker;

/// A broker with: exchange `shop` (topic) -> queue `orders` (binding `order.*`),
/// DLX `app.dlx` (fanout) -> queue `dead`.
pub struct Setup {
    pub broker: MemoryBroker,
    pub transport: Arc<dyn Transport>,
}

pub async fn setup() -> Setup {
    let broker = MemoryBroker::new();
    let transport: Arc<dyn Transport> = broker.connect();
    transport.declare_exchange(&ExchangeSpec::topic("shop")).await.unwrap();
    transport
        .declare_exchange(&ExchangeSpec::fanout("app.dlx"))
        .await
        .unwrap();
    transport.declare_queue(&QueueSpec::new("orders")).await.unwrap();
    transport.declare_queue(&QueueSpec::new("dead")).await.unwrap();
    transport
        .bind(&Binding::queue("orders", "shop", "order.*"))
        .await
        .unwrap();
    transport.bind(&Binding::queue("dead", "app.dlx", "")).await.unwrap();
    Setup { broker, transport }
}

impl Setup {
    /// Publishes `m` to exchange `shop` with `routing_key` (`order.*` reaches `orders`).
    pub async fn publish_to_shop(&self, routing_key: &str, m: Message) {
        self.transport
            .publish(&Destination::new("shop", routing_key), m)
            .await
            .unwrap();
    }
}

pub async fn start<H: Handler>(t: &Arc<dyn Transport>, queue: &str, h: H) -> WorkerHandle {
    start_with(t, queue, h, RouteConfig::default()).await
}

pub async fn start_with<H: Handler>(t: &Arc<dyn Transport>, queue: &str, h: H, cfg: RouteConfig) -> WorkerHandle {
    Worker::new(t.clone())
        .route_with(queue, h, cfg)
        .shutdown_timeout(Duration::from_secs(2))
        .start()
        .await
        .unwrap()
}

/// Polls `cond` every 5 ms for up to 5 s.
pub async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn stats(h: &WorkerHandle, q: &str) -> RouteStats {
    h.stats(q).expect("routed queue")
}

/// Waits until the route of `q` handled `n` deliveries and none is in flight.
pub async fn handled(h: &WorkerHandle, q: &str, n: u64) -> RouteStats {
    eventually(&format!("{n} deliveries handled on {q}"), || async {
        let s = stats(h, q);
        s.handled >= n && s.in_flight == 0 && s.acked + s.requeued + s.rejected >= n
    })
    .await;
    stats(h, q)
}

pub async fn ready_count(t: &Arc<dyn Transport>, q: &str) -> u32 {
    t.queue_info(q).await.unwrap().message_count
}

/// Takes every message now in `q` (acking them).
pub async fn drain(t: &Arc<dyn Transport>, q: &str) -> Vec<Message> {
    let n = ready_count(t, q).await;
    let mut out = Vec::new();
    if n == 0 {
        return out;
    }
    let mut sub = t.consume(q, ConsumeOptions::default().prefetch(0)).await.unwrap();
    for _ in 0..n {
        let d: Delivery = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .expect("a delivery")
            .expect("stream open")
            .unwrap();
        out.push(d.message.clone());
        d.ack().await.unwrap();
    }
    sub.cancel().await.unwrap();
    out
}
