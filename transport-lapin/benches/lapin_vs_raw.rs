//! switchyard-on-lapin against raw lapin doing the same work, interleaved
//! in one run, against the local RabbitMQ:
//!
//! ```text
//! cargo bench -p switchyard-lapin --bench lapin_vs_raw
//! ```
//!
//! `RABBITMQ_URL` picks the broker (default `amqp://guest:guest@127.0.0.1:5672/`),
//! `BENCH_RUNS` the number of runs (default 3). Each scenario runs raw then
//! ours, per run; the medians are printed.
//!
//! - confirmed publishing, pipelined: 50,000 persistent 256-byte messages
//!   (raw: publish all, then await every `PublisherConfirm`; ours: one
//!   `publish_batch`);
//! - the same with 100,000 transient messages;
//! - consuming 100,000 with prefetch 100 and manual acks (raw: one awaited
//!   `ack` per message; ours: `Delivery::ack`, coalesced);
//! - 2,000 sequential RPC round trips through direct reply-to against a raw
//!   responder (raw: publish with confirm + wait for the reply; ours:
//!   `RpcClient::call`), p50 and p99;
//! - `concurrent`: 20,000 persistent 256-byte messages published by 32 and
//!   by 256 tasks, each awaiting its own confirmed publish before the next
//!   (raw: the tasks share one confirm channel, `basic_publish` then the
//!   `PublisherConfirm`; ours: `Publisher::publish` on one transport);
//! - `rpc1000`: 1,000 RPC calls started at once, p50/p99 of the calls and
//!   the wall time (raw: one reply-to consumer routing replies by
//!   correlation id to the waiting tasks, confirms on; ours: one `RpcClient`);
//! - `large`: 100 transient 1 MiB messages published (pipelined, confirmed)
//!   and consumed (prefetch 10, manual ack);
//! - `worker`: 100,000 consumed through a `Worker` route (trivial handler)
//!   with prefetch 100 and with prefetch 1,000, against raw lapin acking
//!   each delivery at the same prefetch; the CPU per message of this process
//!   and of the local broker (`beam.smp`) is printed for both sides.
//!
//! `BENCH_ONLY=publish|consume|rpc|concurrent|rpc1000|large|worker` (comma-separated
//! for several) runs those groups only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use switchyard_core::rpc::RpcClient;
use switchyard_core::settings::Settings;
use switchyard_core::{ConsumeOptions, Consumer, Destination, Message, Publisher, Transport};
use switchyard_lapin::{AmqpConfig, LapinTransport};

#[path = "../../benches/common/broker.rs"]
mod broker;
use broker::{cpu_time, worker_consume, CpuSpan};

const BODY: usize = 256;
const PERSISTENT_N: usize = 50_000;
const TRANSIENT_N: usize = 100_000;
const CONSUME_N: usize = 100_000;
const RPC_N: usize = 2_000;
const CONCURRENT_N: usize = 20_000;
const RPC_CONCURRENT: usize = 1_000;
const LARGE_BODY: usize = 1 << 20;
const LARGE_N: usize = 100;
const LARGE_PREFETCH: u16 = 10;

fn url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into())
}

/// lapin wants the default vhost spelled `%2f`.
fn raw_url() -> String {
    let u = url();
    if u.ends_with(":5672/") || u.ends_with(":5671/") {
        format!("{u}%2f")
    } else {
        u
    }
}

async fn raw_connection(name: &str) -> Connection {
    Connection::connect(
        &raw_url(),
        ConnectionProperties::default().with_connection_name(name.to_owned().into()),
    )
    .await
    .expect("raw lapin connect")
}

async fn declare(ch: &Channel, q: &str) {
    ch.queue_declare(q.into(), QueueDeclareOptions::durable(), FieldTable::default())
        .await
        .expect("declare");
}

async fn delete(ch: &Channel, q: &str) {
    ch.queue_delete(q.into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
}

fn props(persistent: bool) -> BasicProperties {
    BasicProperties::default().with_delivery_mode(if persistent { 2 } else { 1 })
}

async fn raw_publish(conn: &Connection, q: &str, n: usize, persistent: bool) -> Duration {
    raw_publish_sized(conn, q, n, persistent, BODY).await
}

async fn raw_publish_sized(conn: &Connection, q: &str, n: usize, persistent: bool, size: usize) -> Duration {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let body = vec![b'x'; size];
    let start = Instant::now();
    let mut confirms = Vec::with_capacity(n);
    for _ in 0..n {
        confirms.push(
            ch.basic_publish(
                "".into(),
                q.into(),
                BasicPublishOptions::default(),
                &body,
                props(persistent),
            )
            .await
            .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    let d = start.elapsed();
    let _ = ch.close(200, "done".into()).await;
    d
}

async fn ours_publish(t: &LapinTransport, q: &str, n: usize, persistent: bool) -> Duration {
    ours_publish_sized(t, q, n, persistent, BODY).await
}

async fn ours_publish_sized(t: &LapinTransport, q: &str, n: usize, persistent: bool, size: usize) -> Duration {
    let body = bytes::Bytes::from(vec![b'x'; size]);
    let msgs: Vec<Message> = (0..n)
        .map(|_| Message::new(body.clone()).persistent(persistent))
        .collect();
    let start = Instant::now();
    t.publish_batch(&Destination::queue(q), msgs).await.unwrap();
    start.elapsed()
}

async fn fill(conn: &Connection, q: &str, n: usize) {
    raw_publish(conn, q, n, false).await;
}

async fn raw_consume(conn: &Connection, q: &str, n: usize, prefetch: u16) -> Duration {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            q.into(),
            "raw-bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let d = consumer.next().await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let elapsed = start.elapsed();
    let _ = ch.close(200, "done".into()).await;
    elapsed
}

async fn ours_consume(t: &LapinTransport, q: &str, n: usize, prefetch: u16) -> Duration {
    let mut sub = t
        .consume(q, ConsumeOptions::default().prefetch(prefetch))
        .await
        .unwrap();
    let start = Instant::now();
    for _ in 0..n {
        let d = sub.next().await.unwrap().unwrap();
        d.ack().await.unwrap();
    }
    let elapsed = start.elapsed();
    sub.cancel().await.unwrap();
    elapsed
}

/// Replies to every request on `q` with its body, on the default exchange.
async fn responder(conn: Arc<Connection>, q: String) {
    let ch = conn.create_channel().await.unwrap();
    declare(&ch, &q).await;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "responder".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    while let Some(Ok(d)) = consumer.next().await {
        let Some(reply_to) = d.properties.reply_to().clone() else {
            continue;
        };
        let mut p = BasicProperties::default();
        if let Some(c) = d.properties.correlation_id().clone() {
            p = p.with_correlation_id(c);
        }
        let _ = ch
            .basic_publish("".into(), reply_to, BasicPublishOptions::default(), &d.data, p)
            .await;
    }
}

async fn raw_rpc(conn: &Connection, q: &str, n: usize) -> Vec<Duration> {
    let ch = conn.create_channel().await.unwrap();
    let mut replies = ch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "raw-rpc".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("raw-{i}");
        let start = Instant::now();
        let confirm = ch
            .basic_publish(
                "".into(),
                q.into(),
                BasicPublishOptions::default(),
                b"ping",
                BasicProperties::default()
                    .with_reply_to("amq.rabbitmq.reply-to".into())
                    .with_correlation_id(id.clone().into()),
            )
            .await
            .unwrap();
        let reply = async {
            loop {
                let d = replies.next().await.unwrap().unwrap();
                if d.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some(id.as_str()) {
                    break;
                }
            }
        };
        let (c, ()) = tokio::join!(confirm, reply);
        assert!(c.unwrap().is_ack());
        lat.push(start.elapsed());
    }
    let _ = ch.close(200, "done".into()).await;
    lat
}

async fn ours_rpc(client: &RpcClient, q: &str, n: usize) -> Vec<Duration> {
    let dest = Destination::queue(q);
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        client
            .call(&dest, Message::new("ping").transient(), Duration::from_secs(5))
            .await
            .unwrap();
        lat.push(start.elapsed());
    }
    lat
}

/// `tasks` tasks share one confirm channel; each publishes its share of `n`
/// one at a time, awaiting each confirm.
async fn raw_concurrent(conn: &Connection, q: &str, n: usize, tasks: usize) -> Duration {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let body: Arc<[u8]> = vec![b'x'; BODY].into();
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let ch = ch.clone();
            let body = body.clone();
            let q = q.to_owned();
            let share = n / tasks + usize::from(i < n % tasks);
            tokio::spawn(async move {
                for _ in 0..share {
                    let c = ch
                        .basic_publish(
                            "".into(),
                            q.as_str().into(),
                            BasicPublishOptions::default(),
                            &body,
                            props(true),
                        )
                        .await
                        .unwrap();
                    assert!(c.await.unwrap().is_ack());
                }
            })
        })
        .collect();
    for h in handles {
        h.await.unwrap();
    }
    let d = start.elapsed();
    let _ = ch.close(200, "done".into()).await;
    d
}

/// The same with `Publisher::publish` on one transport.
async fn ours_concurrent(t: &LapinTransport, q: &str, n: usize, tasks: usize) -> Duration {
    let body = bytes::Bytes::from(vec![b'x'; BODY]);
    let dest = Destination::queue(q);
    let start = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|i| {
            let t = t.clone();
            let body = body.clone();
            let dest = dest.clone();
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

type Waiters = Arc<parking_lot::Mutex<HashMap<String, tokio::sync::oneshot::Sender<()>>>>;

/// `n` RPC calls started at once on one raw channel (confirms on, direct
/// reply-to, one reader task routing replies by correlation id); each
/// call's latency and the wall time.
async fn raw_rpc_concurrent(conn: &Connection, q: &str, n: usize) -> (Vec<Duration>, Duration) {
    let ch = conn.create_channel().await.unwrap();
    let mut replies = ch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "raw-rpc-concurrent".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let waiters: Waiters = Default::default();
    let reader_waiters = waiters.clone();
    let reader = tokio::spawn(async move {
        while let Some(Ok(d)) = replies.next().await {
            let id = d.properties.correlation_id().as_ref().map(|c| c.to_string());
            if let Some(tx) = id.and_then(|id| reader_waiters.lock().remove(&id)) {
                let _ = tx.send(());
            }
        }
    });
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let ch = ch.clone();
            let q = q.to_owned();
            let waiters = waiters.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                let id = format!("raw-c-{i}");
                let (tx, rx) = tokio::sync::oneshot::channel();
                waiters.lock().insert(id.clone(), tx);
                let confirm = ch
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions::default(),
                        b"ping",
                        BasicProperties::default()
                            .with_reply_to("amq.rabbitmq.reply-to".into())
                            .with_correlation_id(id.into()),
                    )
                    .await
                    .unwrap();
                let (c, r) = tokio::join!(confirm, rx);
                assert!(c.unwrap().is_ack());
                r.unwrap();
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
    let _ = ch.close(200, "done".into()).await;
    (lat, wall)
}

/// `n` `RpcClient::call`s started at once.
async fn ours_rpc_concurrent(client: &Arc<RpcClient>, q: &str, n: usize) -> (Vec<Duration>, Duration) {
    let dest = Destination::queue(q);
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let client = client.clone();
            let dest = dest.clone();
            tokio::spawn(async move {
                let t0 = Instant::now();
                client
                    .call(&dest, Message::new("ping").transient(), Duration::from_secs(30))
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

fn median(v: &mut [f64]) -> f64 {
    // NaN (a CPU reading that failed) sorts last.
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}

#[derive(Default)]
struct Series {
    raw: Vec<f64>,
    ours: Vec<f64>,
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}

/// Runs `f(raw_side)` for both sides in the order of `run` (odd runs raw
/// first, so that warm-up and drift favour neither); `(raw, ours)`.
async fn sides<T, F, Fut>(run: usize, mut f: F) -> (T, T)
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    if run % 2 == 1 {
        let r = f(true).await;
        (r, f(false).await)
    } else {
        let o = f(false).await;
        (f(true).await, o)
    }
}

/// Runs both sides and records the values in `s`.
async fn both<F, Fut>(run: usize, s: &mut Series, f: F)
where
    F: FnMut(bool) -> Fut,
    Fut: std::future::Future<Output = f64>,
{
    let (r, o) = sides(run, f).await;
    s.raw.push(r);
    s.ours.push(o);
}

fn last(s: &Series) -> (f64, f64) {
    (*s.raw.last().unwrap_or(&0.0), *s.ours.last().unwrap_or(&0.0))
}

async fn run() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let wants = |group: &str| only.is_empty() || only.split(',').any(|g| g.trim() == group);
    let settings = Settings::default().with_url(url());
    let mut config = AmqpConfig::from_settings(&settings)
        .unwrap()
        .connection_name("switchyard bench lapin");
    // BENCH_PUBLISH_CHANNELS sizes the publishing pool (default: the engine's).
    if let Some(n) = std::env::var("BENCH_PUBLISH_CHANNELS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.publish_channels = n;
    }
    let ours = LapinTransport::connect_with(config).await.expect("switchyard connect");
    let raw = raw_connection("raw bench lapin").await;
    let admin = raw.create_channel().await.unwrap();
    let responder_conn = Arc::new(raw_connection("raw bench responder").await);
    let rpc_queue = format!("bench.rpc.{}", std::process::id());
    tokio::spawn(responder(responder_conn.clone(), rpc_queue.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rpc_client = Arc::new(
        RpcClient::new(Arc::new(ours.clone()) as Arc<dyn Transport>)
            .await
            .expect("rpc client"),
    );

    let mut persistent = Series::default();
    let mut transient = Series::default();
    let mut consume = Series::default();
    let mut rpc_p50 = Series::default();
    let mut rpc_p99 = Series::default();
    let mut conc32 = Series::default();
    let mut conc256 = Series::default();
    let mut conc32_cpu = Series::default();
    let mut conc256_cpu = Series::default();
    let mut rpcc_p50 = Series::default();
    let mut rpcc_p99 = Series::default();
    let mut rpcc_wall = Series::default();
    let mut large_pub = Series::default();
    let mut large_con = Series::default();
    let mut worker100 = Series::default();
    let mut worker1000 = Series::default();

    for run in 1..=runs {
        let q = format!("bench.lapin.{}.{run}", std::process::id());
        let mut line = format!("run {run} (raw vs ours):");
        if wants("publish") {
            for (n, persistent_mode, series) in [
                (PERSISTENT_N, true, &mut persistent),
                (TRANSIENT_N, false, &mut transient),
            ] {
                both(run, series, |side| {
                    let (raw, ours, admin, q) = (&raw, &ours, &admin, &q);
                    async move {
                        declare(admin, q).await;
                        let d = if side {
                            raw_publish(raw, q, n, persistent_mode).await
                        } else {
                            ours_publish(ours, q, n, persistent_mode).await
                        };
                        delete(admin, q).await;
                        n as f64 / d.as_secs_f64()
                    }
                })
                .await;
            }
            let (p, t) = (last(&persistent), last(&transient));
            line += &format!(
                " persistent {:.0} vs {:.0} msg/s, transient {:.0} vs {:.0} msg/s,",
                p.0, p.1, t.0, t.1
            );
        }
        if wants("consume") {
            both(run, &mut consume, |side| {
                let (raw, ours, admin, q) = (&raw, &ours, &admin, &q);
                async move {
                    declare(admin, q).await;
                    fill(raw, q, CONSUME_N).await;
                    let d = if side {
                        raw_consume(raw, q, CONSUME_N, 100).await
                    } else {
                        ours_consume(ours, q, CONSUME_N, 100).await
                    };
                    delete(admin, q).await;
                    CONSUME_N as f64 / d.as_secs_f64()
                }
            })
            .await;
            let c = last(&consume);
            line += &format!(" consume {:.0} vs {:.0} msg/s,", c.0, c.1);
        }
        if wants("rpc") {
            let (r, o) = sides(run, |side| {
                let (raw, rpc_client, rpc_queue) = (&raw, &rpc_client, &rpc_queue);
                async move {
                    if side {
                        raw_rpc(raw, rpc_queue, RPC_N).await
                    } else {
                        ours_rpc(rpc_client, rpc_queue, RPC_N).await
                    }
                }
            })
            .await;
            rpc_p50.raw.push(pct(&r, 0.5));
            rpc_p50.ours.push(pct(&o, 0.5));
            rpc_p99.raw.push(pct(&r, 0.99));
            rpc_p99.ours.push(pct(&o, 0.99));
            let (a, b) = (last(&rpc_p50), last(&rpc_p99));
            line += &format!(" rpc p50 {:.0} vs {:.0} us, p99 {:.0} vs {:.0} us,", a.0, a.1, b.0, b.1);
        }
        if wants("concurrent") {
            for (tasks, series, cpu) in [
                (32, &mut conc32, &mut conc32_cpu),
                (256, &mut conc256, &mut conc256_cpu),
            ] {
                let ((r, rc), (o, oc)) = sides(run, |side| {
                    let (raw, ours, admin, q) = (&raw, &ours, &admin, &q);
                    async move {
                        declare(admin, q).await;
                        let c0 = cpu_time();
                        let d = if side {
                            raw_concurrent(raw, q, CONCURRENT_N, tasks).await
                        } else {
                            ours_concurrent(ours, q, CONCURRENT_N, tasks).await
                        };
                        let c = (cpu_time() - c0).as_secs_f64() * 1e6 / CONCURRENT_N as f64;
                        delete(admin, q).await;
                        (CONCURRENT_N as f64 / d.as_secs_f64(), c)
                    }
                })
                .await;
                series.raw.push(r);
                series.ours.push(o);
                cpu.raw.push(rc);
                cpu.ours.push(oc);
            }
            let (a, b) = (last(&conc32), last(&conc256));
            let (ac, bc) = (last(&conc32_cpu), last(&conc256_cpu));
            line += &format!(
                " concurrent x32 {:.0} vs {:.0} msg/s ({:.1} vs {:.1} us CPU/msg), x256 {:.0} vs {:.0} msg/s ({:.1} vs \
                 {:.1} us CPU/msg),",
                a.0, a.1, ac.0, ac.1, b.0, b.1, bc.0, bc.1
            );
        }
        if wants("rpc1000") {
            let ((r, rw), (o, ow)) = sides(run, |side| {
                let (raw, rpc_client, rpc_queue) = (&raw, &rpc_client, &rpc_queue);
                async move {
                    if side {
                        raw_rpc_concurrent(raw, rpc_queue, RPC_CONCURRENT).await
                    } else {
                        ours_rpc_concurrent(rpc_client, rpc_queue, RPC_CONCURRENT).await
                    }
                }
            })
            .await;
            rpcc_p50.raw.push(pct(&r, 0.5));
            rpcc_p50.ours.push(pct(&o, 0.5));
            rpcc_p99.raw.push(pct(&r, 0.99));
            rpcc_p99.ours.push(pct(&o, 0.99));
            rpcc_wall.raw.push(rw.as_secs_f64() * 1e3);
            rpcc_wall.ours.push(ow.as_secs_f64() * 1e3);
            let (a, b, c) = (last(&rpcc_p50), last(&rpcc_p99), last(&rpcc_wall));
            line += &format!(
                " rpc x1000 p50 {:.0} vs {:.0} us, p99 {:.0} vs {:.0} us, wall {:.1} vs {:.1} ms,",
                a.0, a.1, b.0, b.1, c.0, c.1
            );
        }
        if wants("large") {
            both(run, &mut large_pub, |side| {
                let (raw, ours, admin, q) = (&raw, &ours, &admin, &q);
                async move {
                    declare(admin, q).await;
                    let d = if side {
                        raw_publish_sized(raw, q, LARGE_N, false, LARGE_BODY).await
                    } else {
                        ours_publish_sized(ours, q, LARGE_N, false, LARGE_BODY).await
                    };
                    delete(admin, q).await;
                    LARGE_N as f64 / d.as_secs_f64()
                }
            })
            .await;
            both(run, &mut large_con, |side| {
                let (raw, ours, admin, q) = (&raw, &ours, &admin, &q);
                async move {
                    declare(admin, q).await;
                    raw_publish_sized(raw, q, LARGE_N, false, LARGE_BODY).await;
                    let d = if side {
                        raw_consume(raw, q, LARGE_N, LARGE_PREFETCH).await
                    } else {
                        ours_consume(ours, q, LARGE_N, LARGE_PREFETCH).await
                    };
                    delete(admin, q).await;
                    LARGE_N as f64 / d.as_secs_f64()
                }
            })
            .await;
            let (a, b) = (last(&large_pub), last(&large_con));
            line += &format!(
                " 1 MiB publish {:.1} vs {:.1} msg/s, consume {:.1} vs {:.1} msg/s",
                a.0, a.1, b.0, b.1
            );
        }
        if wants("worker") {
            let ours_dyn: Arc<dyn Transport> = Arc::new(ours.clone());
            for (prefetch, series) in [(100u16, &mut worker100), (1000, &mut worker1000)] {
                let cpu = std::cell::Cell::new([(0.0, 0.0); 2]);
                both(run, series, |side| {
                    let (raw, ours_dyn, admin, q, cpu) = (&raw, &ours_dyn, &admin, &q, &cpu);
                    async move {
                        declare(admin, q).await;
                        fill(raw, q, CONSUME_N).await;
                        let span = CpuSpan::start();
                        let d = if side {
                            raw_consume(raw, q, CONSUME_N, prefetch).await
                        } else {
                            worker_consume(ours_dyn.clone(), q, CONSUME_N, prefetch).await
                        };
                        let mut c = cpu.get();
                        c[usize::from(!side)] = span.per_message(CONSUME_N);
                        cpu.set(c);
                        delete(admin, q).await;
                        CONSUME_N as f64 / d.as_secs_f64()
                    }
                })
                .await;
                let (w, cpu) = (last(series), cpu.get());
                line += &format!(
                    " Worker prefetch {prefetch} {:.0} vs {:.0} msg/s (CPU/msg client/broker {:.1}/{:.1} vs \
                     {:.1}/{:.1} us),",
                    w.0, w.1, cpu[0].0, cpu[0].1, cpu[1].0, cpu[1].1
                );
            }
        }
        println!("{}", line.trim_end_matches(','));
    }

    println!("\nmedians of {runs} runs (raw lapin vs switchyard-lapin):");
    println!("| scenario | raw lapin | switchyard | ratio | target |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, s: &mut Series, unit: &str, target: &str| {
        if s.raw.is_empty() {
            return;
        }
        let r = median(&mut s.raw);
        let o = median(&mut s.ours);
        let ratio = o / r;
        let prec = if r < 100.0 { 1 } else { 0 };
        println!("| {name} | {r:.prec$} {unit} | {o:.prec$} {unit} | {ratio:.2}x | {target} |");
    };
    row(
        "publish 50k persistent 256 B, confirmed",
        &mut persistent,
        "msg/s",
        ">= 0.95x",
    );
    row(
        "publish 100k transient 256 B, confirmed",
        &mut transient,
        "msg/s",
        ">= 0.95x",
    );
    row("consume 100k, prefetch 100, manual ack", &mut consume, "msg/s", ">= 2x");
    row(
        "consume 100k through a Worker, prefetch 100, vs raw acking each",
        &mut worker100,
        "msg/s",
        ">= 2x",
    );
    row(
        "consume 100k through a Worker, prefetch 1,000, vs raw acking each",
        &mut worker1000,
        "msg/s",
        ">= 2x",
    );
    row(
        "rpc p50 (2,000 sequential)",
        &mut rpc_p50,
        "us",
        "<= 1.1x (lower is better)",
    );
    row(
        "rpc p99 (2,000 sequential)",
        &mut rpc_p99,
        "us",
        "<= 1.2x (lower is better)",
    );
    row(
        "publish 20k persistent 256 B from 32 tasks, each awaiting its confirm",
        &mut conc32,
        "msg/s",
        ">= 0.95x",
    );
    row(
        "publish 20k persistent 256 B from 256 tasks, each awaiting its confirm",
        &mut conc256,
        "msg/s",
        ">= 0.95x",
    );
    row(
        "client CPU per message, 32 tasks",
        &mut conc32_cpu,
        "us",
        "lower is better",
    );
    row(
        "client CPU per message, 256 tasks",
        &mut conc256_cpu,
        "us",
        "lower is better",
    );
    row("rpc p50 (1,000 concurrent)", &mut rpcc_p50, "us", "lower is better");
    row("rpc p99 (1,000 concurrent)", &mut rpcc_p99, "us", "lower is better");
    row(
        "rpc wall time (1,000 concurrent)",
        &mut rpcc_wall,
        "ms",
        "lower is better",
    );
    row("publish 100 transient 1 MiB, confirmed", &mut large_pub, "msg/s", "-");
    row(
        "consume 100 x 1 MiB, prefetch 10, manual ack",
        &mut large_con,
        "msg/s",
        "-",
    );

    drop(rpc_client);
    delete(&admin, &rpc_queue).await;
    let _ = ours.close().await;
    let _ = raw.close(200, "done".into()).await;
    let _ = responder_conn.close(200, "done".into()).await;
}
