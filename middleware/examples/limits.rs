//! tower's concurrency limit and rate limit around a handler, run by the
//! Worker on the memory transport.
//!
//! Run: `cargo run -p switchyard-middleware --example limits`
//!
//! 30 messages, at most 3 handled at once, at most 10 per second: the run
//! takes about 3 seconds and never has more than 3 handlers in flight. The
//! limits act through `poll_ready`, so waiting messages stay in the broker.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_core::worker::{RouteConfig, Worker};
use switchyard_core::{handler_fn, Destination, Envelope, Message, QueueSpec, Transport};
use switchyard_middleware::limit::{self, ConcurrencyLimitLayer, RateLimitLayer};
use tower::ServiceBuilder;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let transport: Arc<dyn Transport> = switchyard_memory::MemoryTransport::new();
    transport.declare_queue(&QueueSpec::new("jobs")).await?;
    for i in 0..30 {
        transport
            .publish(&Destination::queue("jobs"), Message::new(format!("job {i}")))
            .await?;
    }

    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let handler = handler_fn(move |_env: Envelope| {
        let (r, p) = (r.clone(), p.clone());
        async move {
            let now = r.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(150)).await;
            r.fetch_sub(1, Ordering::SeqCst);
        }
    });

    // RateLimit is not Clone: share one instance among the Worker's clones.
    let rate_limited = limit::shared(
        ServiceBuilder::new()
            .layer(RateLimitLayer::new(10, Duration::from_secs(1)))
            .service(handler),
        64,
    );
    let limited = ServiceBuilder::new()
        .layer(ConcurrencyLimitLayer::new(3))
        .service(rate_limited);

    let start = Instant::now();
    let worker = Worker::new(transport.clone())
        .route_with("jobs", limited, RouteConfig::default().prefetch(50).concurrency(50))
        .start()
        .await?;
    while worker.stats("jobs").map_or(0, |s| s.acked) < 30 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    worker.shutdown().await?;
    println!(
        "handled 30 jobs in {:.2}s (rate limit 10/s), at most {} at once (limit 3)",
        start.elapsed().as_secs_f64(),
        peak.load(Ordering::SeqCst)
    );
    assert!(peak.load(Ordering::SeqCst) <= 3);
    Ok(())
}
