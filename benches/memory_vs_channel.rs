//! Throughput of the memory transport against a bare `tokio::sync::mpsc`
//! channel carrying the same messages.
//!
//! Memory: 1,000,000 messages with 256-byte bodies through the Transport API
//! (`Publisher::publish` → `Subscription::next` → `Delivery::ack`), one
//! producer task, one consumer task, prefetch 100, manual ack.
//! Channel: the same 1,000,000 `Message`s (same 256-byte `Bytes` body)
//! through a bounded `mpsc` channel of capacity 100, producer and consumer
//! tasks.
//!
//! Run: `cargo bench --bench memory_vs_channel` (set `SWITCHYARD_BENCH_N` for
//! another message count). After a warm-up, five interleaved runs of each;
//! prints the best rate of each side, their ratio, the median process CPU
//! time per message of each (a load-independent check on a shared machine)
//! and the machine (nproc, date, kernel, load average, CPU).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use switchyard_core::{Admin, ConsumeOptions, Consumer, Destination, Message, Publisher, QueueSpec};
use switchyard_memory::{MemoryBroker, MemoryTransport};

const PREFETCH: u16 = 100;
const CAPACITY: usize = 100;
const BODY: usize = 256;
const RUNS: usize = 5;

fn count() -> u64 {
    std::env::var("SWITCHYARD_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

async fn memory(n: u64, body: Bytes) -> Duration {
    let broker = MemoryBroker::new();
    let producer = broker.connect();
    let consumer = broker.connect();
    producer
        .declare_queue(&QueueSpec::new("bench"))
        .await
        .expect("declare bench queue");
    let mut sub = consumer
        .consume("bench", ConsumeOptions::default().prefetch(PREFETCH))
        .await
        .expect("consume bench queue");
    let dest = Destination::queue("bench");
    let start = Instant::now();
    let recv = tokio::spawn(async move {
        let mut got = 0u64;
        let mut bytes = 0usize;
        while got < n {
            let d = sub.next().await.expect("stream open").expect("delivery");
            bytes += d.message.body.len();
            d.ack().await.expect("ack");
            got += 1;
        }
        assert_eq!(bytes, n as usize * BODY);
        got
    });
    let send = tokio::spawn(async move {
        // `Publisher::publish` on the transport itself (as `&dyn Transport` or
        // `&MemoryTransport`); calling it on the `Arc` adds core's forwarding
        // impl for `Arc<P>`, one more boxed future per publish.
        let publisher: &MemoryTransport = &producer;
        for _ in 0..n {
            publisher
                .publish(&dest, Message::new(body.clone()))
                .await
                .expect("publish");
        }
        producer
    });
    let producer = send.await.expect("producer task");
    assert_eq!(recv.await.expect("consumer task"), n);
    let elapsed = start.elapsed();
    let left = producer.queue_info("bench").await.expect("queue info").message_count;
    assert_eq!(left, 0, "every message consumed");
    drop(consumer);
    elapsed
}

async fn channel(n: u64, body: Bytes) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(CAPACITY);
    let start = Instant::now();
    let recv = tokio::spawn(async move {
        let mut got = 0u64;
        let mut bytes = 0usize;
        while let Some(m) = rx.recv().await {
            bytes += m.body.len();
            got += 1;
        }
        assert_eq!(bytes, n as usize * BODY);
        got
    });
    let send = tokio::spawn(async move {
        for _ in 0..n {
            tx.send(Message::new(body.clone())).await.expect("send");
        }
    });
    send.await.expect("producer task");
    assert_eq!(recv.await.expect("consumer task"), n);
    start.elapsed()
}

fn rate(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn sh(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let n = count();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let body = Bytes::from(vec![0x5au8; BODY]);
    let body = Arc::new(body);

    // `SWITCHYARD_BENCH_ONLY=memory` (or `channel`) runs one side three times, for profiling.
    if let Ok(only) = std::env::var("SWITCHYARD_BENCH_ONLY") {
        for _ in 0..3 {
            let d = match only.as_str() {
                "memory" => rt.block_on(memory(n, (*body).clone())),
                _ => rt.block_on(channel(n, (*body).clone())),
            };
            println!(
                "{only}: {n} messages in {:.3} s = {:.0} msg/s",
                d.as_secs_f64(),
                rate(n, d)
            );
        }
        return;
    }
    // Warm-up (allocator, thread pool), then RUNS interleaved runs of each;
    // the machine is shared, so the best run of each side is compared, and
    // the process CPU time per message is shown as a load-independent check.
    rt.block_on(memory(n.min(50_000), (*body).clone()));
    rt.block_on(channel(n.min(50_000), (*body).clone()));
    let mut mem = Vec::new();
    let mut chan = Vec::new();
    for _ in 0..RUNS {
        let cpu = cpu_time();
        let wall = rt.block_on(memory(n, (*body).clone()));
        mem.push((wall, cpu_time().saturating_sub(cpu)));
        let cpu = cpu_time();
        let wall = rt.block_on(channel(n, (*body).clone()));
        chan.push((wall, cpu_time().saturating_sub(cpu)));
    }
    let best = |v: &[(Duration, Duration)]| v.iter().map(|r| r.0).min().expect("runs");
    let cpu_median = |v: &[(Duration, Duration)]| {
        let mut c: Vec<Duration> = v.iter().map(|r| r.1).collect();
        c.sort();
        c[c.len() / 2]
    };
    let runs = |v: &[(Duration, Duration)]| {
        v.iter()
            .map(|r| format!("{:.3}s", r.0.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (m, c) = (best(&mem), best(&chan));
    let (mr, cr) = (rate(n, m), rate(n, c));
    let (mc, cc) = (cpu_median(&mem), cpu_median(&chan));
    let per_msg = |d: Duration| d.as_nanos() as f64 / n as f64;
    println!("memory_vs_channel: {n} messages, {BODY}-byte bodies, 1 producer task, 1 consumer task");
    println!(
        "  memory transport (publish -> next -> ack, prefetch {PREFETCH}, manual ack): {mr:>10.0} msg/s  \
         (best of {RUNS}: {:.3} s; runs {}; CPU {:.0} ns/msg)",
        m.as_secs_f64(),
        runs(&mem),
        per_msg(mc)
    );
    println!(
        "  tokio mpsc bounded({CAPACITY}):                                     {cr:>10.0} msg/s  \
         (best of {RUNS}: {:.3} s; runs {}; CPU {:.0} ns/msg)",
        c.as_secs_f64(),
        runs(&chan),
        per_msg(cc)
    );
    println!("  ratio memory/channel: {:.2} (target >= 0.50)", mr / cr);
    println!(
        "  CPU time per message, channel/memory: {:.2} (median process CPU time, user + system)",
        per_msg(cc) / per_msg(mc)
    );
    println!(
        "  machine: nproc={} tokio worker threads={} date={} kernel={} load average (1 min)={}",
        sh("nproc", &[]),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        sh("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
        sh("uname", &["-sr"]),
        std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next().map(str::to_owned))
            .unwrap_or_else(|| "?".into())
    );
    println!("  cpu: {}", cpu_model());
}

/// User + system CPU time of this process so far (Linux `/proc/self/stat`;
/// zero elsewhere).
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which is in parentheses): utime is the
    // 14th field overall, stime the 15th, in clock ticks (100 per second on Linux).
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return Duration::ZERO;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}
