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
//!   `RpcClient::call`), p50 and p99.

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

const BODY: usize = 256;
const PERSISTENT_N: usize = 50_000;
const TRANSIENT_N: usize = 100_000;
const CONSUME_N: usize = 100_000;
const RPC_N: usize = 2_000;

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
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let body = vec![b'x'; BODY];
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
    let body = bytes::Bytes::from(vec![b'x'; BODY]);
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

async fn raw_consume(conn: &Connection, q: &str, n: usize) -> Duration {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
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

async fn ours_consume(t: &LapinTransport, q: &str, n: usize) -> Duration {
    let mut sub = t.consume(q, ConsumeOptions::default().prefetch(100)).await.unwrap();
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
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

async fn run() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let settings = Settings::default().with_url(url());
    let config = AmqpConfig::from_settings(&settings)
        .unwrap()
        .connection_name("switchyard bench lapin");
    let ours = LapinTransport::connect_with(config).await.expect("switchyard connect");
    let raw = raw_connection("raw bench lapin").await;
    let admin = raw.create_channel().await.unwrap();
    let responder_conn = Arc::new(raw_connection("raw bench responder").await);
    let rpc_queue = format!("bench.rpc.{}", std::process::id());
    tokio::spawn(responder(responder_conn.clone(), rpc_queue.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rpc_client = RpcClient::new(Arc::new(ours.clone()) as Arc<dyn Transport>)
        .await
        .expect("rpc client");

    let mut persistent = Series::default();
    let mut transient = Series::default();
    let mut consume = Series::default();
    let mut rpc_p50 = Series::default();
    let mut rpc_p99 = Series::default();

    for run in 1..=runs {
        let q = format!("bench.lapin.{}.{run}", std::process::id());
        // Alternate which side goes first so that warm-up and drift
        // favour neither.
        let raw_first = run % 2 == 1;
        for side in if raw_first { [true, false] } else { [false, true] } {
            // Persistent, confirmed, pipelined.
            declare(&admin, &q).await;
            let d = if side {
                raw_publish(&raw, &q, PERSISTENT_N, true).await
            } else {
                ours_publish(&ours, &q, PERSISTENT_N, true).await
            };
            delete(&admin, &q).await;
            let rate = PERSISTENT_N as f64 / d.as_secs_f64();
            if side {
                persistent.raw.push(rate)
            } else {
                persistent.ours.push(rate)
            }
        }
        for side in if raw_first { [true, false] } else { [false, true] } {
            // Transient, confirmed, pipelined.
            declare(&admin, &q).await;
            let d = if side {
                raw_publish(&raw, &q, TRANSIENT_N, false).await
            } else {
                ours_publish(&ours, &q, TRANSIENT_N, false).await
            };
            delete(&admin, &q).await;
            let rate = TRANSIENT_N as f64 / d.as_secs_f64();
            if side {
                transient.raw.push(rate)
            } else {
                transient.ours.push(rate)
            }
        }
        for side in if raw_first { [true, false] } else { [false, true] } {
            // Consume with prefetch 100 and manual acks.
            declare(&admin, &q).await;
            fill(&raw, &q, CONSUME_N).await;
            let d = if side {
                raw_consume(&raw, &q, CONSUME_N).await
            } else {
                ours_consume(&ours, &q, CONSUME_N).await
            };
            delete(&admin, &q).await;
            let rate = CONSUME_N as f64 / d.as_secs_f64();
            if side {
                consume.raw.push(rate)
            } else {
                consume.ours.push(rate)
            }
        }
        for side in if raw_first { [true, false] } else { [false, true] } {
            // Sequential RPC.
            let lat = if side {
                raw_rpc(&raw, &rpc_queue, RPC_N).await
            } else {
                ours_rpc(&rpc_client, &rpc_queue, RPC_N).await
            };
            if side {
                rpc_p50.raw.push(pct(&lat, 0.5));
                rpc_p99.raw.push(pct(&lat, 0.99));
            } else {
                rpc_p50.ours.push(pct(&lat, 0.5));
                rpc_p99.ours.push(pct(&lat, 0.99));
            }
        }

        println!(
            "run {run}: persistent {:.0} vs {:.0} msg/s, transient {:.0} vs {:.0} msg/s, consume {:.0} vs {:.0} msg/s, rpc p50 {:.0} vs {:.0} us, p99 {:.0} vs {:.0} us (raw vs ours)",
            persistent.raw[run - 1],
            persistent.ours[run - 1],
            transient.raw[run - 1],
            transient.ours[run - 1],
            consume.raw[run - 1],
            consume.ours[run - 1],
            rpc_p50.raw[run - 1],
            rpc_p50.ours[run - 1],
            rpc_p99.raw[run - 1],
            rpc_p99.ours[run - 1],
        );
    }

    println!("\nmedians of {runs} runs (raw lapin vs switchyard-lapin):");
    println!("| scenario | raw lapin | switchyard | ratio | target |");
    println!("|---|---|---|---|---|");
    let row = |name: &str, s: &mut Series, unit: &str, target: &str| {
        let r = median(&mut s.raw);
        let o = median(&mut s.ours);
        let ratio = o / r;
        println!("| {name} | {r:.0} {unit} | {o:.0} {unit} | {ratio:.2}x | {target} |");
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
        "rpc p50 (2,000 sequential)",
        &mut rpc_p50,
        "us",
        "<= 1.1x (lower is better)",
    );
    row("rpc p99 (2,000 sequential)", &mut rpc_p99, "us", "-");

    drop(rpc_client);
    delete(&admin, &rpc_queue).await;
    let _ = ours.close().await;
    let _ = raw.close(200, "done".into()).await;
    let _ = responder_conn.close(200, "done".into()).await;
}
