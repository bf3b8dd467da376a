//! What the two RabbitMQ benches share (`transport-lapin/benches/lapin_vs_raw.rs`
//! and `transport-amqprs/benches/amqprs_vs_raw.rs` include this file with
//! `#[path]`): CPU time of this process and of the local broker, and the
//! Worker consume row, which is the same code on either transport.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard_core::worker::{RouteConfig, Worker};
use switchyard_core::{handler_fn, HandlerError, Message, Transport};

/// CPU time (user + system) this process has used, from /proc (Linux).
pub fn cpu_time() -> Duration {
    proc_cpu("self")
}

/// CPU time the local RabbitMQ (`beam.smp`) has used; `None` when it does
/// not run on this machine. With it, a row shows what each side costs the
/// broker. Of several `beam.smp` processes (a `rabbitmqctl` also runs one)
/// the one with the most CPU time is the broker.
pub fn broker_cpu() -> Option<Duration> {
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{name}/comm")).ok()?;
            (comm.trim() == "beam.smp").then(|| proc_cpu(&name))
        })
        .max()
}

fn proc_cpu(pid: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    // stat fields 14 and 15 (utime, stime, in 1/100 s) are the 12th and 13th after the ')'.
    let field = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((field(11) + field(12)) * 10)
}

/// Client and broker CPU per message over a span, in µs.
pub struct CpuSpan {
    client: Duration,
    broker: Option<Duration>,
}

impl CpuSpan {
    /// Starts measuring.
    pub fn start() -> Self {
        CpuSpan {
            client: cpu_time(),
            broker: broker_cpu(),
        }
    }

    /// `(client, broker)` CPU per message since `start`, in µs; the
    /// broker's is NaN when it could not be read at both ends.
    pub fn per_message(&self, n: usize) -> (f64, f64) {
        let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        let broker = match (self.broker, broker_cpu()) {
            (Some(a), Some(b)) if b >= a => us(b - a),
            _ => f64::NAN,
        };
        (us(cpu_time().saturating_sub(self.client)), broker)
    }
}

/// Drains `n` messages from `queue` with a Worker route (prefetch
/// `prefetch`, the route's default concurrency, a trivial handler that reads
/// the body) and returns the time from start until the last was acked.
pub async fn worker_consume(t: Arc<dyn Transport>, queue: &str, n: usize, prefetch: u16) -> Duration {
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    let handler = handler_fn(move |m: Message| {
        let s = s.clone();
        async move {
            s.fetch_add(m.body.len() as u64, Ordering::Relaxed);
            Ok::<(), HandlerError>(())
        }
    });
    let start = Instant::now();
    let w = Worker::new(t)
        .route_with(queue, handler, RouteConfig::default().prefetch(prefetch))
        .start()
        .await
        .expect("worker start");
    // Polled: a `wait_handled` waiter would be woken by every delivery.
    let deadline = Instant::now() + Duration::from_secs(300);
    while w.stats(queue).expect("route").acked < n as u64 {
        assert!(Instant::now() < deadline, "not drained in 300 s");
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let elapsed = start.elapsed();
    w.shutdown().await.expect("worker shutdown");
    assert!(seen.load(Ordering::Relaxed) > 0);
    elapsed
}
