//! Helpers shared by the memory transport's integration tests.

use std::time::Duration;

use switchyard_core::{ConsumeOptions, Consumer, Delivery, Subscription};
use switchyard_memory::MemoryTransport;

/// The next delivery on `sub`, failing the test if none comes within 2s.
pub async fn recv(sub: &mut Subscription) -> Delivery {
    tokio::time::timeout(Duration::from_secs(2), sub.next())
        .await
        .expect("a delivery within 2s")
        .expect("stream open")
        .expect("no error")
}

/// Fails the test if `sub` yields a delivery within `ms` milliseconds.
pub async fn nothing(sub: &mut Subscription, ms: u64) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(ms), sub.next()).await {
        panic!("unexpected delivery: {d:?}");
    }
}

/// The delivery's body as UTF-8 text.
pub fn body(d: &Delivery) -> String {
    String::from_utf8(d.message.body.to_vec()).unwrap()
}

/// Consumes `queue` with auto-ack until it stays quiet for 30ms; the bodies in order.
pub async fn drain(t: &MemoryTransport, queue: &str) -> Vec<String> {
    let mut sub = t
        .consume(queue, ConsumeOptions::default().auto_ack(true))
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(30), sub.next()).await {
        out.push(body(&d));
    }
    out
}
