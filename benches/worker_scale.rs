//! One Worker with many routes (issue 13): start time, memory per route and
//! throughput with 1,000 queues, each with its own route, on one transport.
//!
//! For each transport: declare `ROUTES` queues and publish `PER_QUEUE`
//! messages to each (not timed), start one Worker with a route per queue
//! (timed: start time; resident memory before and after: memory per route,
//! which includes the deliveries prefetched meanwhile), and time from the
//! start until every route has handled them all (throughput). Trivial
//! handler, prefetch 10, concurrency 10 per route.
//!
//! Run: `cargo bench --bench worker_scale --features memory,lapin,amqprs`
//! (`SCALE_TRANSPORTS=memory,lapin,amqprs` picks transports, `SCALE_ROUTES`
//! the route count (1,000), `SCALE_PER_QUEUE` the messages per queue (100);
//! `RABBITMQ_URL` for the broker). Prints the machine (nproc, date, load).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::worker::{RouteConfig, Worker};
use switchyard::{handler_fn, Destination, Message, QueueSpec, Settings, Transport};

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

async fn connect(kind: &str) -> Arc<dyn Transport> {
    let url = match kind {
        "memory" => "memory://scale".to_owned(),
        _ => std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into()),
    };
    let mut settings = Settings::default().with_url(url);
    if kind != "memory" {
        settings = settings.with_transport(kind.parse().expect("transport kind"));
    }
    switchyard::connect(&settings).await.expect("connect")
}

async fn scale(kind: &str, routes: usize, per_queue: usize) {
    let t = connect(kind).await;
    let run = &switchyard_core::message::new_id()[..8];
    let queues: Vec<String> = (0..routes).map(|i| format!("scale.{run}.{i}")).collect();
    for q in &queues {
        t.declare_queue(&QueueSpec::new(q.as_str()).durable(false))
            .await
            .expect("declare");
    }
    let handled = Arc::new(AtomicU64::new(0));
    let mut worker = Worker::new(t.clone());
    for q in &queues {
        let h = handled.clone();
        worker = worker.route_with(
            q.as_str(),
            handler_fn(move |_: Message| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, Ordering::Relaxed);
                    Ok::<(), switchyard::HandlerError>(())
                }
            }),
            RouteConfig::default().prefetch(10).concurrency(10),
        );
    }
    for q in &queues {
        for i in 0..per_queue {
            t.publish(
                &Destination::queue(q.as_str()),
                Message::new(format!("{i}")).transient(),
            )
            .await
            .expect("publish");
        }
    }
    let total = (routes * per_queue) as u64;
    let before = rss();
    let started = Instant::now();
    let w = worker.start().await.expect("start");
    let start_time = started.elapsed();
    let per_route = (rss().saturating_sub(before)) as f64 / routes as f64;
    let deadline = started + Duration::from_secs(600);
    while handled.load(Ordering::Relaxed) < total {
        assert!(Instant::now() < deadline, "not drained in 600 s");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let drained = started.elapsed();
    let acked: u64 = queues.iter().map(|q| w.stats(q).map_or(0, |s| s.acked)).sum();
    let stop = Instant::now();
    w.shutdown().await.expect("shutdown");
    let stop_time = stop.elapsed();
    println!(
        "  {kind:<7} {routes} routes: start {:>7.1} ms, {:>6.1} KiB resident per route, {total} messages \
         handled (acked {acked}) {:>8.0} msg/s from start to drained, shutdown {:>6.1} ms",
        start_time.as_secs_f64() * 1e3,
        per_route / 1024.0,
        total as f64 / drained.as_secs_f64().max(1e-9),
        stop_time.as_secs_f64() * 1e3,
    );
    for q in &queues {
        let _ = t.delete_queue(q).await;
    }
    let _ = t.close().await;
}

fn main() {
    let routes = env_num("SCALE_ROUTES", 1000);
    let per_queue = env_num("SCALE_PER_QUEUE", 100);
    let kinds = std::env::var("SCALE_TRANSPORTS").unwrap_or_else(|_| "memory,lapin,amqprs".into());
    println!(
        "worker_scale: {routes} routes, {per_queue} messages per queue; {}",
        common::machine()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    for kind in kinds.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        rt.block_on(scale(kind, routes, per_queue));
    }
}
