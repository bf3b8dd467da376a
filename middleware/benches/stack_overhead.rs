//! Per-message overhead of a full middleware stack over a bare handler.
//!
//! Run: `cargo bench -p switchyard-middleware --bench stack_overhead`
//! (the figures of a run on the project machine are in the README, "Middleware").
//!
//! 1. Direct: the services are called in a loop with a pre-built Envelope
//!    (`ready().await` then `call(env.clone()).await`), on a current-thread
//!    runtime; 9 rounds alternating bare handler and stack, medians (the
//!    "added" figure is the median of the per-pair differences).
//! 2. Through the Worker on the memory transport: N messages published,
//!    then a Worker drains the queue (prefetch 100, concurrency 32); 7
//!    alternating drains, medians; on a current-thread runtime and on a
//!    2-thread runtime.
//!
//! Times are CPU time by default (the thread's for direct calls, the
//! process's for the Worker runs), so that other programs competing for the
//! machine's cores do not count; `--wall` measures wall-clock time instead.
//!
//! Flags after `--`: a number (calls per round, default 100000; the Worker
//! drains a fifth of it), `--layers` (each layer alone), `--direct-only`
//! (skip the Worker runs), `--wall`.
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

/// CPU time of `clock` (thread or process) in nanoseconds.
fn cpu_ns(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime failed");
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// Which clock a measurement uses.
#[derive(Clone, Copy)]
enum Clock {
    Wall,
    Cpu,
}

struct Timer(Clock, Instant, f64);

impl Timer {
    fn start(c: Clock, cpu: libc::clockid_t) -> Self {
        Timer(c, Instant::now(), cpu_ns(cpu))
    }
    fn ns(&self, cpu: libc::clockid_t) -> f64 {
        match self.0 {
            Clock::Wall => self.1.elapsed().as_nanos() as f64,
            Clock::Cpu => cpu_ns(cpu) - self.2,
        }
    }
}

async fn round<H: Handler>(svc: &mut H, env: &Envelope, n: u32, clock: Clock) -> f64 {
    let t = Timer::start(clock, libc::CLOCK_THREAD_CPUTIME_ID);
    for _ in 0..n {
        let out = svc.ready().await.unwrap().call(env.clone()).await;
        black_box(out.unwrap());
    }
    t.ns(libc::CLOCK_THREAD_CPUTIME_ID) / n as f64
}

async fn fut_size<H: Handler>(mut h: H, env: &Envelope) -> usize {
    let fut = h.ready().await.unwrap().call(env.clone());
    let n = std::mem::size_of_val(&fut);
    fut.await.unwrap();
    n
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Alternates rounds of the bare handler and the stack (so that load
/// changes on the machine hit both alike) and returns the medians of
/// (bare, stack, stack - bare of the same pair).
async fn direct<A: Handler, B: Handler>(
    mut bare: A,
    mut stack: B,
    env: &Envelope,
    n: u32,
    clock: Clock,
) -> (f64, f64, f64) {
    round(&mut bare, env, n / 10, clock).await;
    round(&mut stack, env, n / 10, clock).await;
    let (mut b, mut s, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..9 {
        let x = round(&mut bare, env, n, clock).await;
        let y = round(&mut stack, env, n, clock).await;
        b.push(x);
        s.push(y);
        d.push(y - x);
    }
    (median(b), median(s), median(d))
}

async fn worker_ns<H: Handler>(h: H, n: u32, clock: Clock) -> f64 {
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
    let start = Timer::start(clock, libc::CLOCK_PROCESS_CPUTIME_ID);
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
    let ns = start.ns(libc::CLOCK_PROCESS_CPUTIME_ID) / n as f64;
    w.shutdown().await.unwrap();
    ns
}

fn main() {
    let n: u32 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(100_000);
    let wn = (n / 5).max(1000);
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
    let clock = if std::env::args().any(|a| a == "--wall") {
        Clock::Wall
    } else {
        Clock::Cpu
    };
    println!(
        "stack_overhead: {} time; direct calls: 9 alternating rounds of {n} (bare, stack), medians; \
         Worker: 7 alternating drains of {wn} messages, medians",
        match clock {
            Clock::Wall => "wall-clock",
            Clock::Cpu => "CPU (thread CPU time for direct calls, process CPU time for the Worker)",
        }
    );
    let report = |label: &str, (bare, stack, added): (f64, f64, f64)| {
        println!("  {label:<75} bare {bare:>7.1} ns/msg   stack {stack:>7.1} ns/msg   added {added:>7.1} ns/msg");
    };
    let layers = std::env::args().any(|a| a == "--layers");
    rt.block_on(async {
        println!(
            "  future sizes: bare {} bytes, full stack {} bytes, every layer {} bytes",
            fut_size(bare(), &env).await,
            fut_size(full_stack(bare(), null.clone()), &env).await,
            fut_size(every_layer(bare(), null.clone()), &env).await
        );
    });
    rt.block_on(async {
        report(
            "direct, full stack, no-op metrics recorder",
            direct(bare(), full_stack(bare(), null.clone()), &env, n, clock).await,
        );
        report(
            "direct, every consume layer, no-op metrics recorder",
            direct(bare(), every_layer(bare(), null.clone()), &env, n, clock).await,
        );
        if layers {
            let one = |name: &str, r| report(&format!("direct, {name} alone"), r);
            one(
                "trace",
                direct(bare(), TraceLayer::new().layer(bare()), &env, n, clock).await,
            );
            one(
                "metrics (no-op)",
                direct(bare(), MetricsLayer::new().layer(bare()), &env, n, clock).await,
            );
            let dl = DeadLetterLayer::new(null.clone(), "dlx");
            one("dead-letter", direct(bare(), dl.layer(bare()), &env, n, clock).await);
            let retry = RetryLayer::in_process(RetryPolicy::exponential(3, Duration::from_millis(10)));
            one("retry", direct(bare(), retry.layer(bare()), &env, n, clock).await);
            let timeout = TimeoutLayer::new(Duration::from_secs(30));
            one("timeout", direct(bare(), timeout.layer(bare()), &env, n, clock).await);
            one(
                "decompression (off)",
                direct(bare(), DecompressionLayer::new().layer(bare()), &env, n, clock).await,
            );
            one(
                "catch-panic",
                direct(bare(), CatchPanicLayer::new().layer(bare()), &env, n, clock).await,
            );
            one(
                "correlation",
                direct(bare(), CorrelationLayer::new().layer(bare()), &env, n, clock).await,
            );
            let dedup = DedupLayer::new(MemoryDedupStore::new(10_000)).key_fn(|_| None);
            one(
                "dedup (no key)",
                direct(bare(), dedup.layer(bare()), &env, n, clock).await,
            );
        }
    });
    let direct_only = std::env::args().any(|a| a == "--direct-only");
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let through_worker = |label: &str| {
        if direct_only {
            return;
        }
        for (flavor, rt) in [("current-thread", &rt), ("2 threads", &mt)] {
            rt.block_on(async {
                let (mut b, mut s, mut d) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..7 {
                    let x = worker_ns(bare(), wn, clock).await;
                    let y = worker_ns(full_stack(bare(), null.clone()), wn, clock).await;
                    b.push(x);
                    s.push(y);
                    d.push(y - x);
                }
                report(&format!("{label}, {flavor}"), (median(b), median(s), median(d)));
            });
        }
    };
    through_worker("Worker + memory transport, full stack, no-op recorder");
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .expect("prometheus recorder");
    rt.block_on(async {
        report(
            "direct, full stack, Prometheus recorder",
            direct(bare(), full_stack(bare(), null.clone()), &env, n, clock).await,
        );
    });
    through_worker("Worker + memory transport, full stack, Prometheus recorder");
    let rendered = handle.render();
    assert!(rendered.contains("switchyard_messages_handled_total"));
}
