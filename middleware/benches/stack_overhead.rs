//! Per-message overhead of a full middleware stack over a bare handler.
//!
//! Run: `cargo bench -p switchyard-middleware --bench stack_overhead`
//! (optionally `-- <messages>`; default 200000 direct calls, 50000 through the Worker).
//!
//! 1. Direct: the services are called in a loop with a pre-built Envelope
//!    (`ready().await` then `call(env.clone()).await`), on a current-thread
//!    runtime; median of 7 rounds.
//! 2. Through the Worker on the memory transport: N messages published,
//!    then a Worker drains the queue (prefetch 100, concurrency 32).
//!
//! The "full stack" is the issue's: tracing, metrics, dead-letter, retry
//! (in-process policy), timeout, compression off (the decompression layer on
//! uncompressed bodies). It is measured with the metrics facade's no-op
//! recorder and again with a Prometheus recorder installed; no tracing
//! subscriber is installed (spans disabled).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use switchyard_core::worker::{RouteConfig, Worker};
use switchyard_core::{
    handler_fn, Destination, Envelope, Handler, Message, PublishOptions, Publisher, QueueSpec, Transport,
};
use switchyard_middleware::prelude::*;
use tower::{Layer, ServiceBuilder, ServiceExt};

struct NullPublisher;

#[async_trait]
impl Publisher for NullPublisher {
    async fn publish_with(&self, _: &Destination, _: Message, _: PublishOptions) -> switchyard_core::Result<()> {
        Ok(())
    }
}

fn bare() -> impl Handler {
    handler_fn(|env: Envelope| async move {
        black_box(env.body().len());
    })
}

fn full_stack<H: Handler>(h: H, publisher: Arc<dyn Publisher>) -> impl Handler
where
    H::Future: Send,
{
    ServiceBuilder::new()
        .layer(TraceLayer::new())
        .layer(MetricsLayer::new())
        .layer(DeadLetterLayer::new(publisher, "dlx"))
        .layer(RetryLayer::in_process(RetryPolicy::exponential(
            3,
            Duration::from_millis(10),
        )))
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .layer(DecompressionLayer::new())
        .service(h)
}

fn every_layer<H: Handler>(h: H, publisher: Arc<dyn Publisher>) -> impl Handler
where
    H::Future: Send,
{
    ServiceBuilder::new()
        .layer(TraceLayer::new())
        .layer(MetricsLayer::new())
        .layer(DedupLayer::new(MemoryDedupStore::new(10_000)))
        .layer(DeadLetterLayer::new(publisher, "dlx"))
        .layer(RetryLayer::in_process(RetryPolicy::exponential(
            3,
            Duration::from_millis(10),
        )))
        .layer(CircuitBreakerLayer::new(CircuitBreakerConfig::new(
            100,
            Duration::from_secs(10),
        )))
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .layer(DecompressionLayer::new())
        .layer(CorrelationLayer::new())
        .service(h)
}

async fn direct_ns<H: Handler>(mut svc: H, env: &Envelope, n: u32) -> f64 {
    // warm up
    for _ in 0..n / 10 {
        svc.ready().await.unwrap().call(env.clone()).await.unwrap();
    }
    let mut rounds = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        for _ in 0..n {
            let out = svc.ready().await.unwrap().call(env.clone()).await;
            black_box(out.unwrap());
        }
        rounds.push(t.elapsed().as_nanos() as f64 / n as f64);
    }
    rounds.sort_by(|a, b| a.partial_cmp(b).unwrap());
    rounds[3]
}

async fn worker_ns<H: Handler>(h: H, n: u32) -> f64 {
    let broker = switchyard_memory::MemoryBroker::new();
    let t: Arc<dyn Transport> = broker.connect();
    t.declare_queue(&QueueSpec::new("bench")).await.unwrap();
    let dest = Destination::queue("bench");
    for i in 0..n {
        t.publish(
            &dest,
            Message::new(format!("message {i}")).with_message_id(i.to_string()),
        )
        .await
        .unwrap();
    }
    let start = Instant::now();
    let w = Worker::new(t.clone())
        .route_with("bench", h, RouteConfig::default().prefetch(100).concurrency(32))
        .start()
        .await
        .unwrap();
    loop {
        let s = w.stats("bench").unwrap();
        if s.acked >= n as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let ns = start.elapsed().as_nanos() as f64 / n as f64;
    w.shutdown().await.unwrap();
    ns
}

fn main() {
    let n: u32 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(200_000);
    let wn = (n / 4).max(1000);
    let env = Envelope::for_test(
        Message::new(r#"{"session_id":"s-1","text":"hello"}"#)
            .with_message_id("m-1")
            .with_correlation_id("c-1"),
        "bench",
    );
    let null: Arc<dyn Publisher> = Arc::new(NullPublisher);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("stack_overhead: {n} direct calls per round (median of 7), {wn} messages through the Worker");
    let report = |label: &str, bare: f64, stack: f64| {
        println!(
            "  {label:<58} bare {bare:>8.1} ns/msg   stack {stack:>8.1} ns/msg   added {:>8.1} ns/msg",
            stack - bare
        );
    };
    rt.block_on(async {
        let b = direct_ns(bare(), &env, n).await;
        let s = direct_ns(full_stack(bare(), null.clone()), &env, n).await;
        report("direct, full stack, no-op metrics recorder", b, s);
        if std::env::args().any(|a| a == "--layers") {
            let one = |name: &str, ns: f64| report(&format!("direct, {name} alone"), b, ns);
            one("trace", direct_ns(TraceLayer::new().layer(bare()), &env, n).await);
            one(
                "metrics (no-op)",
                direct_ns(MetricsLayer::new().layer(bare()), &env, n).await,
            );
            one(
                "dead-letter",
                direct_ns(DeadLetterLayer::new(null.clone(), "dlx").layer(bare()), &env, n).await,
            );
            let retry = RetryLayer::in_process(RetryPolicy::exponential(3, Duration::from_millis(10)));
            one("retry", direct_ns(retry.layer(bare()), &env, n).await);
            one(
                "timeout",
                direct_ns(TimeoutLayer::new(Duration::from_secs(30)).layer(bare()), &env, n).await,
            );
            one(
                "decompression (off)",
                direct_ns(DecompressionLayer::new().layer(bare()), &env, n).await,
            );
            one(
                "catch-panic",
                direct_ns(CatchPanicLayer::new().layer(bare()), &env, n).await,
            );
            one(
                "correlation",
                direct_ns(CorrelationLayer::new().layer(bare()), &env, n).await,
            );
            let dedup = DedupLayer::new(MemoryDedupStore::new(10_000)).key_fn(|_| None);
            one("dedup (no key)", direct_ns(dedup.layer(bare()), &env, n).await);
        }
        let e = direct_ns(every_layer(bare(), null.clone()), &env, n).await;
        report("direct, every consume layer, no-op metrics recorder", b, e);
    });
    if std::env::args().any(|a| a == "--direct-only") {
        return;
    }
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    mt.block_on(async {
        let b = worker_ns(bare(), wn).await;
        let s = worker_ns(full_stack(bare(), null.clone()), wn).await;
        report("Worker + memory transport, full stack, no-op recorder", b, s);
    });
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("prometheus recorder");
    rt.block_on(async {
        let b = direct_ns(bare(), &env, n).await;
        let s = direct_ns(full_stack(bare(), null.clone()), &env, n).await;
        report("direct, full stack, Prometheus recorder", b, s);
    });
    mt.block_on(async {
        let b = worker_ns(bare(), wn).await;
        let s = worker_ns(full_stack(bare(), null.clone()), wn).await;
        report("Worker + memory transport, full stack, Prometheus recorder", b, s);
    });
    let rendered = handle.render();
    assert!(rendered.contains("switchyard_messages_handled_total"));
}
