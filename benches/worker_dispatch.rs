//! What the Worker costs over the raw subscription it reads, on the memory
//! transport, with a trivial handler (issue 13).
//!
//! Each run publishes `N` messages (256-byte bodies) to a fresh memory
//! broker (not timed), then drains them either with the raw subscription
//! (`Subscription::next` → `Delivery::ack`, prefetch 100) or with a Worker
//! route (prefetch 100, concurrency 32, a `handler_fn` that reads the body
//! and returns `Ok(())`). Timed: from the start of the drain to the last
//! ack; the process CPU time over the same span. Raw and Worker runs
//! alternate, seven each, on a current-thread runtime and on a 2-thread
//! runtime; medians.
//!
//! Run: `cargo bench --bench worker_dispatch --features memory`
//! (`SWITCHYARD_BENCH_N` sets N, default 200,000). Prints the machine (nproc,
//! date, load average), per flavour: msg/s and CPU ns per message of each
//! side, and the Worker's added CPU per message (median of the per-pair
//! differences).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard::worker::{RouteConfig, Worker};
use switchyard::{handler_fn, ConsumeOptions, Destination, Message, QueueSpec, Transport};
use switchyard_memory::MemoryBroker;

const PREFETCH: u16 = 100;
const CONCURRENCY: usize = 32;
const BODY: usize = 256;
const RUNS: usize = 7;

fn count() -> u64 {
    std::env::var("SWITCHYARD_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000)
}

fn process_cpu_ns() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// A broker with `n` messages waiting in queue `bench`.
async fn filled(n: u64) -> Arc<dyn Transport> {
    let t: Arc<dyn Transport> = MemoryBroker::new().connect();
    t.declare_queue(&QueueSpec::new("bench")).await.expect("declare");
    let body = Bytes::from(vec![b'x'; BODY]);
    let dest = Destination::queue("bench");
    for _ in 0..n {
        t.publish(&dest, Message::new(body.clone())).await.expect("publish");
    }
    t
}

/// (seconds, CPU ns per message) of draining with the raw subscription.
async fn raw(n: u64) -> (f64, f64) {
    let t = filled(n).await;
    let (start, cpu) = (Instant::now(), process_cpu_ns());
    let mut sub = t
        .consume("bench", ConsumeOptions::default().prefetch(PREFETCH))
        .await
        .expect("consume");
    let mut bytes = 0usize;
    for _ in 0..n {
        let d = sub.next().await.expect("open").expect("delivery");
        bytes += d.message.body.len();
        d.ack().await.expect("ack");
    }
    let out = (start.elapsed().as_secs_f64(), (process_cpu_ns() - cpu) / n as f64);
    assert_eq!(bytes, n as usize * BODY);
    sub.close().await.expect("close");
    out
}

/// (seconds, CPU ns per message) of draining with a Worker route.
async fn worker(n: u64) -> (f64, f64) {
    let t = filled(n).await;
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let handler = handler_fn(move |m: Message| {
        let s = s.clone();
        async move {
            s.fetch_add(m.body.len() as u64, Ordering::Relaxed);
            Ok::<(), switchyard::HandlerError>(())
        }
    });
    let (start, cpu) = (Instant::now(), process_cpu_ns());
    let w = Worker::new(t.clone())
        .route_with(
            "bench",
            handler,
            RouteConfig::default().prefetch(PREFETCH).concurrency(CONCURRENCY),
        )
        .start()
        .await
        .expect("start");
    // Polled: a `wait_handled` waiter would be woken by every delivery and
    // measure itself.
    let deadline = Instant::now() + Duration::from_secs(120);
    while w.stats("bench").expect("route").acked < n {
        assert!(Instant::now() < deadline, "not drained in 120 s");
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let out = (start.elapsed().as_secs_f64(), (process_cpu_ns() - cpu) / n as f64);
    assert_eq!(seen.load(Ordering::Relaxed), n * BODY as u64);
    w.shutdown().await.expect("shutdown");
    out
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    v[v.len() / 2]
}

fn main() {
    let n = count();
    println!(
        "worker_dispatch: {n} messages per drain, {RUNS} alternating drains per side; {}",
        common::machine()
    );
    let current = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let two = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // BENCH_FLAVOR=current|two runs one flavour, BENCH_SIDE=worker only the
    // Worker's drains (e.g. under a profiler).
    let only = std::env::var("BENCH_FLAVOR").unwrap_or_default();
    for (flavor, rt) in [("current-thread", &current), ("2 threads", &two)] {
        let is_current = std::ptr::eq(rt, &current);
        if (only == "current" && !is_current) || (only == "two" && is_current) {
            continue;
        }
        rt.block_on(async {
            // Warm-up.
            raw(n / 10).await;
            worker(n / 10).await;
            let (mut rr, mut wr, mut rc, mut wc, mut added) = (vec![], vec![], vec![], vec![], vec![]);
            if std::env::var("BENCH_SIDE").as_deref() == Ok("worker") {
                // Only the Worker side, for a profiler.
                for _ in 0..RUNS {
                    worker(n).await;
                }
                return;
            }
            for _ in 0..RUNS {
                let (rs, rcpu) = raw(n).await;
                let (ws, wcpu) = worker(n).await;
                rr.push(n as f64 / rs);
                wr.push(n as f64 / ws);
                rc.push(rcpu);
                wc.push(wcpu);
                added.push(wcpu - rcpu);
            }
            println!(
                "  {flavor:<15} raw subscription {:>9.0} msg/s {:>6.0} ns CPU/msg | Worker {:>9.0} msg/s {:>6.0} ns \
                 CPU/msg | Worker adds {:>5.0} ns CPU/msg",
                median(rr),
                median(rc),
                median(wr),
                median(wc),
                median(added)
            );
        });
    }
}
