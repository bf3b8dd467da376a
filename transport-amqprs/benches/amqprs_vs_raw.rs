//! switchyard-on-amqprs against raw amqprs doing the same work, against the
//! local RabbitMQ, interleaved, medians of several runs.
//!
//! ```text
//! cargo bench -p switchyard-amqprs --bench amqprs_vs_raw
//! ```
//!
//! `RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/`),
//! `BENCH_RUNS` (default 3). Scenarios:
//! - confirmed pipelined publishing of 50,000 persistent 256-byte messages;
//! - confirmed pipelined publishing of 100,000 transient 256-byte messages;
//! - consuming 100,000 with prefetch 100 and manual ack (raw: one awaited
//!   `basic_ack` per message; switchyard: `Delivery::ack`, coalesced);
//! - 2,000 sequential RPC round trips over direct reply-to (p50/p99), against
//!   the same raw amqprs echo server (raw without confirms, and raw with
//!   confirms as `RpcClient` publishes its requests: the same work);
//! - `concurrent`: 20,000 persistent 256-byte messages published by 32 and
//!   by 256 tasks, each awaiting its own confirm before the next (raw: the
//!   tasks share one confirm channel, a lock around numbering and
//!   `basic_publish`, a map of waiters resolved by the ack callback; ours:
//!   `Publisher::publish` on one transport);
//! - `rpc1000`: 1,000 RPC calls started at once, p50/p99 of the calls and
//!   the wall time (raw: one reply-to consumer routing replies by
//!   correlation id to the waiting tasks, no confirms, as in the sequential
//!   raw RPC; ours: one `RpcClient`, confirms on);
//! - `large`: 100 transient 1 MiB messages published (pipelined, confirmed)
//!   and consumed (prefetch 10, manual ack);
//! - `worker`: 100,000 consumed through a `Worker` route (trivial handler)
//!   with prefetch 100 and with prefetch 1,000, against raw amqprs acking
//!   each delivery at the same prefetch.
//!
//! The consume and concurrent rows print the CPU each side cost this process
//! and the local broker (`beam.smp`) per message; consume has a reference
//! row: raw amqprs acking `multiple` every 50 deliveries by hand, the
//! coalescing switchyard does.
//!
//! `BENCH_ONLY=publish|consume|rpc|concurrent|rpc1000|large|worker` (comma-separated
//! for several) runs those groups only.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amqprs::callbacks::{ChannelCallback, DefaultConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicConsumeArguments, BasicPublishArguments, BasicQosArguments, Channel,
    ConfirmSelectArguments, QueueDeclareArguments, QueueDeleteArguments, QueuePurgeArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, CloseChannel, Nack, Return};
use async_trait::async_trait;
use switchyard_amqprs::{AmqpConfig, AmqprsTransport};
use switchyard_core::rpc::RpcClient;
use switchyard_core::{ConsumeOptions, Consumer, Destination, Message, Publisher, Transport};

#[path = "../../benches/common/broker.rs"]
mod broker;
use broker::{cpu_time, worker_consume, CpuSpan};

const PERSISTENT_N: usize = 50_000;
const TRANSIENT_N: usize = 100_000;
const CONSUME_N: usize = 100_000;
const RPC_N: usize = 2_000;
const BODY: usize = 256;
const CONCURRENT_N: usize = 20_000;
const RPC_CONCURRENT: usize = 1_000;
const LARGE_BODY: usize = 1 << 20;
const LARGE_N: usize = 100;
const LARGE_PREFETCH: u16 = 10;

fn url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into())
}

async fn raw_connection(name: &str) -> Connection {
    let cfg = AmqpConfig::from_url(&url()).expect("url").connect;
    let mut args = OpenConnectionArguments::new(&cfg.host, cfg.port, &cfg.user, cfg.password.expose());
    args.virtual_host(&cfg.vhost).connection_name(name);
    let c = Connection::open(&args).await.expect("raw connection");
    c.register_callback(DefaultConnectionCallback).await.unwrap();
    c
}

/// Counts publisher confirms on a raw channel.
struct Confirms(Arc<AtomicU64>);

#[async_trait]
impl ChannelCallback for Confirms {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, a: bool) -> Result<bool, amqprs::error::Error> {
        Ok(a)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        // One queue, one channel: RabbitMQ confirms in order.
        self.0.fetch_max(ack.delivery_tag(), Ordering::Release);
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        panic!("raw publish nacked: {}", nack.delivery_tag());
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

async fn raw_publish(conn: &Connection, queue: &str, n: usize, persistent: bool) -> Duration {
    raw_publish_sized(conn, queue, n, persistent, BODY).await
}

async fn raw_publish_sized(conn: &Connection, queue: &str, n: usize, persistent: bool, size: usize) -> Duration {
    let ch = conn.open_channel(None).await.unwrap();
    let confirmed = Arc::new(AtomicU64::new(0));
    ch.register_callback(Confirms(confirmed.clone())).await.unwrap();
    ch.confirm_select(ConfirmSelectArguments::default()).await.unwrap();
    let body = vec![b'x'; size];
    let start = Instant::now();
    for _ in 0..n {
        let mut props = BasicProperties::default();
        props.with_persistence(persistent);
        ch.basic_publish(props, body.clone(), BasicPublishArguments::new("", queue))
            .await
            .unwrap();
    }
    while confirmed.load(Ordering::Acquire) < n as u64 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let d = start.elapsed();
    ch.close().await.unwrap();
    d
}

async fn sy_publish(t: &AmqprsTransport, queue: &str, n: usize, persistent: bool) -> Duration {
    sy_publish_sized(t, queue, n, persistent, BODY).await
}

async fn sy_publish_sized(t: &AmqprsTransport, queue: &str, n: usize, persistent: bool, size: usize) -> Duration {
    let body = bytes::Bytes::from(vec![b'x'; size]);
    let messages: Vec<Message> = (0..n)
        .map(|_| Message::new(body.clone()).persistent(persistent))
        .collect();
    let start = Instant::now();
    t.publish_batch(&Destination::queue(queue), messages).await.unwrap();
    start.elapsed()
}

async fn raw_consume(conn: &Connection, queue: &str, n: usize) -> Duration {
    raw_consume_prefetch(conn, queue, n, 100).await
}

async fn raw_consume_prefetch(conn: &Connection, queue: &str, n: usize, prefetch: u16) -> Duration {
    raw_consume_acking(conn, queue, n, prefetch, 1).await
}

/// Consumes `n` acking `multiple` every `every` deliveries (and the last);
/// `every == 1` acks each delivery on its own.
async fn raw_consume_acking(conn: &Connection, queue: &str, n: usize, prefetch: u16, every: u64) -> Duration {
    let ch = conn.open_channel(None).await.unwrap();
    ch.basic_qos(BasicQosArguments::new(0, prefetch, false)).await.unwrap();
    let start = Instant::now();
    let (tag, mut rx) = ch
        .basic_consume_rx(BasicConsumeArguments::new(queue, "raw-bench"))
        .await
        .unwrap();
    for i in 0..n {
        let m = rx.recv().await.expect("delivery");
        let t = m.deliver.unwrap().delivery_tag();
        if every == 1 {
            ch.basic_ack(BasicAckArguments::new(t, false)).await.unwrap();
        } else if t % every == 0 || i + 1 == n {
            ch.basic_ack(BasicAckArguments::new(t, true)).await.unwrap();
        }
    }
    let d = start.elapsed();
    ch.basic_cancel(amqprs::channel::BasicCancelArguments::new(&tag))
        .await
        .unwrap();
    ch.close().await.unwrap();
    d
}

/// The broker's delivery ceiling for this queue: raw amqprs with no acks at
/// all (auto-ack), the same prefetch-free push the broker can sustain.
async fn raw_consume_no_ack(conn: &Connection, queue: &str, n: usize) -> Duration {
    let ch = conn.open_channel(None).await.unwrap();
    let mut args = BasicConsumeArguments::new(queue, "raw-bench-noack");
    args.auto_ack(true);
    let start = Instant::now();
    let (tag, mut rx) = ch.basic_consume_rx(args).await.unwrap();
    for _ in 0..n {
        rx.recv().await.expect("delivery");
    }
    let d = start.elapsed();
    ch.basic_cancel(amqprs::channel::BasicCancelArguments::new(&tag))
        .await
        .unwrap();
    ch.close().await.unwrap();
    d
}

async fn sy_consume(t: &AmqprsTransport, queue: &str, n: usize) -> Duration {
    sy_consume_prefetch(t, queue, n, 100).await
}

async fn sy_consume_prefetch(t: &AmqprsTransport, queue: &str, n: usize, prefetch: u16) -> Duration {
    let start = Instant::now();
    let mut sub = t
        .consume(queue, ConsumeOptions::default().prefetch(prefetch))
        .await
        .unwrap();
    for _ in 0..n {
        let d = sub.next().await.expect("delivery").unwrap();
        d.ack().await.unwrap();
    }
    let d = start.elapsed();
    sub.cancel().await.unwrap();
    d
}

/// A raw amqprs echo server: replies to `reply_to` with the same body and
/// correlation id.
async fn echo_server(conn: Connection, queue: String) {
    let ch = conn.open_channel(None).await.unwrap();
    let mut args = BasicConsumeArguments::new(&queue, "echo");
    args.auto_ack(true);
    let (_, mut rx) = ch.basic_consume_rx(args).await.unwrap();
    while let Some(m) = rx.recv().await {
        let props = m.basic_properties.unwrap();
        let mut reply = BasicProperties::default();
        if let Some(c) = props.correlation_id() {
            reply.with_correlation_id(c);
        }
        let to = props.reply_to().cloned().unwrap_or_default();
        ch.basic_publish(reply, m.content.unwrap(), BasicPublishArguments::new("", &to))
            .await
            .unwrap();
    }
}

async fn raw_rpc(conn: &Connection, queue: &str, n: usize) -> Vec<Duration> {
    let ch = conn.open_channel(None).await.unwrap();
    let mut args = BasicConsumeArguments::new("amq.rabbitmq.reply-to", "raw-rpc");
    args.auto_ack(true);
    let (_, mut rx) = ch.basic_consume_rx(args).await.unwrap();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let mut props = BasicProperties::default();
        props
            .with_reply_to("amq.rabbitmq.reply-to")
            .with_correlation_id(&i.to_string());
        ch.basic_publish(props, vec![b'x'; 32], BasicPublishArguments::new("", queue))
            .await
            .unwrap();
        let m = rx.recv().await.unwrap();
        assert_eq!(
            m.basic_properties.unwrap().correlation_id().map(String::as_str),
            Some(i.to_string().as_str())
        );
        lat.push(start.elapsed());
    }
    ch.close().await.unwrap();
    lat
}

/// The raw sequential RPC doing what `RpcClient` does: the request
/// published in confirm mode, the call done when both its confirm and its
/// reply are in.
async fn raw_rpc_confirmed(conn: &Connection, queue: &str, n: usize) -> Vec<Duration> {
    let ch = conn.open_channel(None).await.unwrap();
    let waiters: ConfirmWaiters = Default::default();
    ch.register_callback(Waiting(waiters.clone())).await.unwrap();
    let mut args = BasicConsumeArguments::new("amq.rabbitmq.reply-to", "raw-rpc-confirmed");
    args.auto_ack(true);
    let (_, mut rx) = ch.basic_consume_rx(args).await.unwrap();
    ch.confirm_select(ConfirmSelectArguments::default()).await.unwrap();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let (tx, confirm) = tokio::sync::oneshot::channel();
        waiters.lock().insert(i as u64 + 1, tx);
        let mut props = BasicProperties::default();
        props
            .with_reply_to("amq.rabbitmq.reply-to")
            .with_correlation_id(&i.to_string());
        ch.basic_publish(props, vec![b'x'; 32], BasicPublishArguments::new("", queue))
            .await
            .unwrap();
        let (acked, m) = tokio::join!(confirm, rx.recv());
        assert!(acked.unwrap());
        assert_eq!(
            m.unwrap()
                .basic_properties
                .unwrap()
                .correlation_id()
                .map(String::as_str),
            Some(i.to_string().as_str())
        );
        lat.push(start.elapsed());
    }
    ch.close().await.unwrap();
    lat
}

async fn sy_rpc(client: &RpcClient, queue: &str, n: usize) -> Vec<Duration> {
    let dest = Destination::queue(queue);
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        client
            .call(&dest, Message::new(vec![b'x'; 32]).transient(), Duration::from_secs(5))
            .await
            .unwrap();
        lat.push(start.elapsed());
    }
    lat
}

type ConfirmWaiters = Arc<parking_lot::Mutex<BTreeMap<u64, tokio::sync::oneshot::Sender<bool>>>>;

/// Resolves per-publish waiters from the channel's ack / nack callbacks.
struct Waiting(ConfirmWaiters);

impl Waiting {
    fn settle(&self, tag: u64, multiple: bool, ack: bool) {
        let done: Vec<_> = {
            let mut g = self.0.lock();
            if multiple {
                let rest = g.split_off(&(tag + 1));
                std::mem::replace(&mut *g, rest).into_values().collect()
            } else {
                g.remove(&tag).into_iter().collect()
            }
        };
        for tx in done {
            let _ = tx.send(ack);
        }
    }
}

#[async_trait]
impl ChannelCallback for Waiting {
    async fn close(&mut self, _: &Channel, _: CloseChannel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn cancel(&mut self, _: &Channel, _: Cancel) -> Result<(), amqprs::error::Error> {
        Ok(())
    }
    async fn flow(&mut self, _: &Channel, a: bool) -> Result<bool, amqprs::error::Error> {
        Ok(a)
    }
    async fn publish_ack(&mut self, _: &Channel, ack: Ack) {
        self.settle(ack.delivery_tag(), ack.mutiple(), true);
    }
    async fn publish_nack(&mut self, _: &Channel, nack: Nack) {
        self.settle(nack.delivery_tag(), nack.multiple(), false);
    }
    async fn publish_return(&mut self, _: &Channel, _: Return, _: BasicProperties, _: Vec<u8>) {}
}

/// `tasks` tasks share one raw confirm channel; each publishes its share of
/// `n` one at a time and waits for each confirm.
async fn raw_concurrent(conn: &Connection, queue: &str, n: usize, tasks: usize) -> Duration {
    let ch = conn.open_channel(None).await.unwrap();
    let waiters: ConfirmWaiters = Default::default();
    ch.register_callback(Waiting(waiters.clone())).await.unwrap();
    ch.confirm_select(ConfirmSelectArguments::default()).await.unwrap();
    let seq = Arc::new(tokio::sync::Mutex::new(1u64));
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let (ch, waiters, seq) = (ch.clone(), waiters.clone(), seq.clone());
            let queue = queue.to_owned();
            let share = n / tasks + usize::from(i < n % tasks);
            tokio::spawn(async move {
                for _ in 0..share {
                    let (tx, rx) = tokio::sync::oneshot::channel();
                    {
                        let mut s = seq.lock().await;
                        waiters.lock().insert(*s, tx);
                        let mut props = BasicProperties::default();
                        props.with_persistence(true);
                        ch.basic_publish(props, vec![b'x'; BODY], BasicPublishArguments::new("", &queue))
                            .await
                            .unwrap();
                        *s += 1;
                    }
                    assert!(rx.await.unwrap(), "raw publish nacked");
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let d = start.elapsed();
    ch.close().await.unwrap();
    d
}

/// The same with `Publisher::publish` on one transport.
async fn sy_concurrent(t: &AmqprsTransport, queue: &str, n: usize, tasks: usize) -> Duration {
    let body = bytes::Bytes::from(vec![b'x'; BODY]);
    let dest = Destination::queue(queue);
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let (t, body, dest) = (t.clone(), body.clone(), dest.clone());
            let share = n / tasks + usize::from(i < n % tasks);
            tokio::spawn(async move {
                for _ in 0..share {
                    t.publish(&dest, Message::new(body.clone()).persistent(true))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    start.elapsed()
}

type ReplyWaiters = Arc<parking_lot::Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>>;

/// `n` RPC calls started at once on one raw channel (direct reply-to, one
/// reader task routing replies by correlation id); each call's latency and
/// the wall time.
async fn raw_rpc_concurrent(conn: &Connection, queue: &str, n: usize) -> (Vec<Duration>, Duration) {
    let ch = conn.open_channel(None).await.unwrap();
    let mut args = BasicConsumeArguments::new("amq.rabbitmq.reply-to", "raw-rpc-concurrent");
    args.auto_ack(true);
    let (_, mut rx) = ch.basic_consume_rx(args).await.unwrap();
    let waiters: ReplyWaiters = Default::default();
    let reader_waiters = waiters.clone();
    let reader = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let id = m.basic_properties.and_then(|p| p.correlation_id().cloned());
            if let Some(tx) = id.and_then(|id| reader_waiters.lock().remove(&id)) {
                let _ = tx.send(());
            }
        }
    });
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (ch, waiters) = (ch.clone(), waiters.clone());
            let queue = queue.to_owned();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let id = format!("raw-c-{i}");
                let (tx, rx) = tokio::sync::oneshot::channel();
                waiters.lock().insert(id.clone(), tx);
                let mut props = BasicProperties::default();
                props.with_reply_to("amq.rabbitmq.reply-to").with_correlation_id(&id);
                ch.basic_publish(props, vec![b'x'; 32], BasicPublishArguments::new("", &queue))
                    .await
                    .unwrap();
                rx.await.unwrap();
                t0.elapsed()
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(n);
    for h in handles {
        lat.push(h.await.unwrap());
    }
    let wall = start.elapsed();
    reader.abort();
    ch.close().await.unwrap();
    (lat, wall)
}

/// `n` `RpcClient::call`s started at once.
async fn sy_rpc_concurrent(client: &Arc<RpcClient>, queue: &str, n: usize) -> (Vec<Duration>, Duration) {
    let dest = Destination::queue(queue);
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (client, dest) = (client.clone(), dest.clone());
            tokio::spawn(async move {
                let t0 = Instant::now();
                client
                    .call(&dest, Message::new(vec![b'x'; 32]).transient(), Duration::from_secs(30))
                    .await
                    .unwrap();
                t0.elapsed()
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(n);
    for h in handles {
        lat.push(h.await.unwrap());
    }
    (lat, start.elapsed())
}

fn median(mut v: Vec<f64>) -> f64 {
    // NaN (a CPU reading that failed) sorts last.
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

async fn declare(conn: &Connection, name: &str) {
    let ch = conn.open_channel(None).await.unwrap();
    let mut args = QueueDeclareArguments::new(name);
    args.durable(true);
    ch.queue_declare(args).await.unwrap();
    ch.queue_purge(QueuePurgeArguments::new(name)).await.unwrap();
    ch.close().await.unwrap();
}

async fn purge(conn: &Connection, name: &str) {
    let ch = conn.open_channel(None).await.unwrap();
    ch.queue_purge(QueuePurgeArguments::new(name)).await.unwrap();
    ch.close().await.unwrap();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // BENCH_ONLY=publish|consume|rpc|concurrent|rpc1000|large (comma-separated) runs those groups.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wants = |group: &str| only.is_empty() || only.split(',').any(|g| g.trim() == group);
    let raw = raw_connection("bench raw amqprs").await;
    let mut cfg = AmqpConfig::from_url(&url())
        .unwrap()
        .connection_name("bench switchyard amqprs");
    // BENCH_PUBLISH_CHANNELS sizes the publishing pool (default: the engine's).
    if let Some(n) = std::env::var("BENCH_PUBLISH_CHANNELS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.publish_channels = n;
    }
    let sy = AmqprsTransport::connect_with(cfg).await.unwrap();
    let id = &switchyard_core::message::new_id()[..8];
    let q = format!("sy-bench.{id}.work");
    let rpcq = format!("sy-bench.{id}.rpc");
    declare(&raw, &q).await;
    declare(&raw, &rpcq).await;

    let mut results: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    for (label, n, persistent) in [
        ("publish persistent 50k (msg/s)", PERSISTENT_N, true),
        ("publish transient 100k (msg/s)", TRANSIENT_N, false),
    ] {
        if !wants("publish") {
            continue;
        }
        let (mut r, mut s) = (Vec::new(), Vec::new());
        for run in 0..runs {
            let c0 = cpu_time();
            let d = raw_publish(&raw, &q, n, persistent).await;
            let raw_cpu = (cpu_time() - c0).as_secs_f64() * 1e6 / n as f64;
            r.push(n as f64 / d.as_secs_f64());
            purge(&raw, &q).await;
            let c0 = cpu_time();
            let d = sy_publish(&sy, &q, n, persistent).await;
            let sy_cpu = (cpu_time() - c0).as_secs_f64() * 1e6 / n as f64;
            s.push(n as f64 / d.as_secs_f64());
            purge(&raw, &q).await;
            eprintln!(
                "{label} run {run}: raw {:.0}, switchyard {:.0} (client CPU per message: raw {raw_cpu:.1}us, \
                 switchyard {sy_cpu:.1}us)",
                r[run], s[run]
            );
        }
        results.push((label.into(), r, s));
    }

    if wants("consume") {
        let label = "consume 100k prefetch 100 manual ack (msg/s)";
        let (mut r, mut s, mut by_hand) = (Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            raw_publish(&raw, &q, CONSUME_N, false).await;
            let span = CpuSpan::start();
            let d = raw_consume(&raw, &q, CONSUME_N).await;
            let (raw_cpu, raw_broker) = span.per_message(CONSUME_N);
            r.push(CONSUME_N as f64 / d.as_secs_f64());
            tokio::time::sleep(Duration::from_millis(300)).await;
            purge(&raw, &q).await;
            raw_publish(&raw, &q, CONSUME_N, false).await;
            let span = CpuSpan::start();
            let d = sy_consume(&sy, &q, CONSUME_N).await;
            let (sy_cpu, sy_broker) = span.per_message(CONSUME_N);
            s.push(CONSUME_N as f64 / d.as_secs_f64());
            tokio::time::sleep(Duration::from_millis(300)).await;
            purge(&raw, &q).await;
            raw_publish(&raw, &q, CONSUME_N, false).await;
            let span = CpuSpan::start();
            let d = raw_consume_acking(&raw, &q, CONSUME_N, 100, 50).await;
            let (by_hand_cpu, by_hand_broker) = span.per_message(CONSUME_N);
            by_hand.push(CONSUME_N as f64 / d.as_secs_f64());
            tokio::time::sleep(Duration::from_millis(300)).await;
            purge(&raw, &q).await;
            eprintln!(
                "{label} run {run}: raw {:.0}, switchyard {:.0}, raw acking multiple every 50 {:.0} (CPU per \
                 message, client/broker: raw {raw_cpu:.1}/{raw_broker:.1}us, switchyard \
                 {sy_cpu:.1}/{sy_broker:.1}us, by hand {by_hand_cpu:.1}/{by_hand_broker:.1}us)",
                r[run], s[run], by_hand[run]
            );
        }
        results.push((label.into(), r, s.clone()));
        results.push((
            "consume: raw acking multiple every 50 by hand vs switchyard".into(),
            by_hand,
            s,
        ));
        // How close both come to what the broker can push at all.
        let mut ceiling = Vec::new();
        for _ in 0..runs {
            raw_publish(&raw, &q, CONSUME_N, false).await;
            let d = raw_consume_no_ack(&raw, &q, CONSUME_N).await;
            ceiling.push(CONSUME_N as f64 / d.as_secs_f64());
            tokio::time::sleep(Duration::from_millis(300)).await;
            purge(&raw, &q).await;
        }
        let sy_consume = results[results.len() - 2].2.clone();
        results.push((
            "consume: broker ceiling (raw no-ack) vs switchyard manual ack".into(),
            ceiling,
            sy_consume,
        ));
    }

    if wants("worker") {
        let sy_dyn: Arc<dyn Transport> = Arc::new(sy.clone());
        for prefetch in [100u16, 1000] {
            let label = format!("worker consume 100k prefetch {prefetch} vs raw per-ack (msg/s)");
            let (mut r, mut s) = (Vec::new(), Vec::new());
            for run in 0..runs {
                // Alternate which side goes first.
                let mut cpu = [(0.0, 0.0); 2];
                for side in [run % 2, 1 - run % 2] {
                    raw_publish(&raw, &q, CONSUME_N, false).await;
                    let span = CpuSpan::start();
                    let d = if side == 0 {
                        raw_consume_prefetch(&raw, &q, CONSUME_N, prefetch).await
                    } else {
                        worker_consume(sy_dyn.clone(), &q, CONSUME_N, prefetch).await
                    };
                    cpu[side] = span.per_message(CONSUME_N);
                    let rate = CONSUME_N as f64 / d.as_secs_f64();
                    if side == 0 {
                        r.push(rate)
                    } else {
                        s.push(rate)
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    purge(&raw, &q).await;
                }
                eprintln!(
                    "{label} run {run}: raw {:.0}, Worker {:.0} (CPU per message, client/broker: raw \
                     {:.1}/{:.1}us, Worker {:.1}/{:.1}us)",
                    r[run], s[run], cpu[0].0, cpu[0].1, cpu[1].0, cpu[1].1
                );
            }
            results.push((label, r, s));
        }
    }

    let server = tokio::spawn(echo_server(raw_connection("bench echo server").await, rpcq.clone()));
    let sy_dyn: Arc<dyn Transport> = Arc::new(sy.clone());
    let client = Arc::new(RpcClient::new(sy_dyn).await.unwrap());
    let (mut r50, mut s50, mut r99, mut s99) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut c50, mut c99) = (Vec::new(), Vec::new());
    for run in 0..if wants("rpc") { runs } else { 0 } {
        // Alternate which side goes first.
        let (r, c, s) = if run % 2 == 0 {
            let r = raw_rpc(&raw, &rpcq, RPC_N).await;
            let c = raw_rpc_confirmed(&raw, &rpcq, RPC_N).await;
            (r, c, sy_rpc(&client, &rpcq, RPC_N).await)
        } else {
            let s = sy_rpc(&client, &rpcq, RPC_N).await;
            let c = raw_rpc_confirmed(&raw, &rpcq, RPC_N).await;
            (raw_rpc(&raw, &rpcq, RPC_N).await, c, s)
        };
        r50.push(pct(&r, 0.5).as_secs_f64() * 1e6);
        r99.push(pct(&r, 0.99).as_secs_f64() * 1e6);
        c50.push(pct(&c, 0.5).as_secs_f64() * 1e6);
        c99.push(pct(&c, 0.99).as_secs_f64() * 1e6);
        s50.push(pct(&s, 0.5).as_secs_f64() * 1e6);
        s99.push(pct(&s, 0.99).as_secs_f64() * 1e6);
        eprintln!(
            "rpc run {run}: raw p50 {:.0}us p99 {:.0}us, raw confirmed p50 {:.0}us p99 {:.0}us, switchyard p50 \
             {:.0}us p99 {:.0}us",
            r50[run], r99[run], c50[run], c99[run], s50[run], s99[run]
        );
    }
    if wants("rpc") {
        results.push(("rpc 2000 sequential p50 (us)".into(), r50, s50.clone()));
        results.push(("rpc 2000 sequential p99 (us)".into(), r99, s99.clone()));
        // RpcClient publishes its requests with confirms: the same work.
        results.push(("rpc 2000 seq p50, raw confirmed (us)".into(), c50, s50));
        results.push(("rpc 2000 seq p99, raw confirmed (us)".into(), c99, s99));
    }
    if wants("rpc1000") {
        let (mut r50, mut s50, mut r99, mut s99, mut rw, mut sw) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            // Alternate which side goes first.
            let (r, s) = if run % 2 == 0 {
                let r = raw_rpc_concurrent(&raw, &rpcq, RPC_CONCURRENT).await;
                (r, sy_rpc_concurrent(&client, &rpcq, RPC_CONCURRENT).await)
            } else {
                let s = sy_rpc_concurrent(&client, &rpcq, RPC_CONCURRENT).await;
                (raw_rpc_concurrent(&raw, &rpcq, RPC_CONCURRENT).await, s)
            };
            r50.push(pct(&r.0, 0.5).as_secs_f64() * 1e6);
            r99.push(pct(&r.0, 0.99).as_secs_f64() * 1e6);
            s50.push(pct(&s.0, 0.5).as_secs_f64() * 1e6);
            s99.push(pct(&s.0, 0.99).as_secs_f64() * 1e6);
            rw.push(r.1.as_secs_f64() * 1e3);
            sw.push(s.1.as_secs_f64() * 1e3);
            eprintln!(
                "rpc x1000 run {run}: raw p50 {:.0}us p99 {:.0}us wall {:.1}ms, switchyard p50 {:.0}us p99 {:.0}us \
                 wall {:.1}ms",
                r50[run], r99[run], rw[run], s50[run], s99[run], sw[run]
            );
        }
        results.push(("rpc 1000 concurrent p50 (us)".into(), r50, s50));
        results.push(("rpc 1000 concurrent p99 (us)".into(), r99, s99));
        results.push(("rpc 1000 concurrent wall (ms)".into(), rw, sw));
    }
    server.abort();

    if wants("concurrent") {
        for tasks in [32usize, 256] {
            let (mut r, mut s, mut rc, mut sc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let (mut rb, mut sb) = (Vec::new(), Vec::new());
            for run in 0..runs {
                let raw_first = run % 2 == 0;
                for raw_side in if raw_first { [true, false] } else { [false, true] } {
                    let span = CpuSpan::start();
                    let d = if raw_side {
                        raw_concurrent(&raw, &q, CONCURRENT_N, tasks).await
                    } else {
                        sy_concurrent(&sy, &q, CONCURRENT_N, tasks).await
                    };
                    let (cpu, broker) = span.per_message(CONCURRENT_N);
                    purge(&raw, &q).await;
                    let rate = CONCURRENT_N as f64 / d.as_secs_f64();
                    if raw_side {
                        r.push(rate);
                        rc.push(cpu);
                        rb.push(broker);
                    } else {
                        s.push(rate);
                        sc.push(cpu);
                        sb.push(broker);
                    }
                }
                eprintln!(
                    "concurrent x{tasks} run {run}: raw {:.0}, switchyard {:.0} msg/s (CPU per message, client: raw \
                     {:.1}us, switchyard {:.1}us; broker: raw {:.1}us, switchyard {:.1}us)",
                    r[run], s[run], rc[run], sc[run], rb[run], sb[run]
                );
            }
            results.push((format!("publish 20k persistent from {tasks} tasks (msg/s)"), r, s));
            results.push((format!("  client CPU per message, {tasks} tasks (us)"), rc, sc));
            results.push((format!("  broker CPU per message, {tasks} tasks (us)"), rb, sb));
        }
    }

    if wants("large") {
        let (mut rp, mut sp, mut rc, mut sc) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 0..runs {
            let raw_first = run % 2 == 0;
            for raw_side in if raw_first { [true, false] } else { [false, true] } {
                let d = if raw_side {
                    raw_publish_sized(&raw, &q, LARGE_N, false, LARGE_BODY).await
                } else {
                    sy_publish_sized(&sy, &q, LARGE_N, false, LARGE_BODY).await
                };
                purge(&raw, &q).await;
                if raw_side { &mut rp } else { &mut sp }.push(LARGE_N as f64 / d.as_secs_f64());
            }
            for raw_side in if raw_first { [true, false] } else { [false, true] } {
                raw_publish_sized(&raw, &q, LARGE_N, false, LARGE_BODY).await;
                let d = if raw_side {
                    raw_consume_prefetch(&raw, &q, LARGE_N, LARGE_PREFETCH).await
                } else {
                    sy_consume_prefetch(&sy, &q, LARGE_N, LARGE_PREFETCH).await
                };
                tokio::time::sleep(Duration::from_millis(100)).await;
                purge(&raw, &q).await;
                if raw_side { &mut rc } else { &mut sc }.push(LARGE_N as f64 / d.as_secs_f64());
            }
            eprintln!(
                "large run {run}: publish raw {:.1} switchyard {:.1}, consume raw {:.1} switchyard {:.1} msg/s",
                rp[run], sp[run], rc[run], sc[run]
            );
        }
        results.push(("publish 100 transient 1 MiB (msg/s)".into(), rp, sp));
        results.push(("consume 100 x 1 MiB prefetch 10 (msg/s)".into(), rc, sc));
    }

    println!("\nmedians of {runs} interleaved runs");
    println!(
        "{:<48} {:>12} {:>12} {:>8}",
        "scenario", "raw amqprs", "switchyard", "ratio"
    );
    for (label, r, s) in results {
        let (r, s) = (median(r), median(s));
        let prec = if r < 100.0 { 1 } else { 0 };
        println!("{label:<48} {r:>12.prec$} {s:>12.prec$} {:>8.2}", s / r);
    }

    let _ = client.close().await;
    let ch = raw.open_channel(None).await.unwrap();
    for name in [&q, &rpcq] {
        let _ = ch.queue_delete(QueueDeleteArguments::new(name)).await;
    }
    let _ = sy.close().await;
}
