//! Probe of lapin's own recovery (`ConnectionProperties::enable_auto_recover`)
//! under the fault test's load, to decide whether switchyard could rely on it:
//!
//! ```text
//! cargo run -p switchyard-lapin --example auto_recover_probe
//! ```
//!
//! Raw lapin with auto-recover on: a consumer acks everything it receives
//! while a producer publishes 5,000 persistent messages with confirms in
//! pipelined batches; the broker closes this probe's connections (only
//! those, by name, through `rabbitmqctl close_connection`) twice. A publish
//! whose confirm fails is retried after `Channel::wait_for_recovery`. The
//! probe prints what happened: publish errors, whether the consumer kept
//! receiving after each recovery, and how many ids arrived.

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use parking_lot::Mutex;

const NAME: &str = "switchyard auto-recover probe";

fn close_probe_connections() -> usize {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut n = 0;
    for line in text.lines().filter(|l| l.contains(NAME)) {
        if let Some(pid) = line.split_whitespace().next() {
            let _ = Command::new("rabbitmqctl")
                .args(["close_connection", pid, "probe"])
                .output();
            n += 1;
        }
    }
    n
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let props = || {
        ConnectionProperties::default()
            .with_connection_name(NAME.into())
            .enable_auto_recover()
    };
    let pconn = Connection::connect(&url, props()).await.expect("connect");
    let cconn = Connection::connect(&url, props()).await.expect("connect");
    let queue = format!("switchyard.probe.{}", std::process::id());
    let pch = pconn.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    pch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    let n = 10_000usize;
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let received = Arc::new(AtomicUsize::new(0));
    let ack_errors = Arc::new(AtomicUsize::new(0));
    let cch = cconn.create_channel().await.unwrap();
    cch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            queue.as_str().into(),
            "probe".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer_errors = Arc::new(Mutex::new(Vec::new()));
    {
        let (seen, received, ack_errors, errors) = (
            seen.clone(),
            received.clone(),
            ack_errors.clone(),
            consumer_errors.clone(),
        );
        tokio::spawn(async move {
            while let Some(item) = consumer.next().await {
                match item {
                    Ok(d) => {
                        let id = String::from_utf8_lossy(&d.data).to_string();
                        seen.lock().insert(id);
                        received.fetch_add(1, Ordering::SeqCst);
                        if !matches!(d.ack(BasicAckOptions::default()).await, Ok(true)) {
                            ack_errors.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(e) => errors.lock().push(e.to_string()),
                }
            }
            errors.lock().push("consumer stream ended".into());
        });
    }

    let mut publish_errors = Vec::new();
    let published = Arc::new(AtomicUsize::new(0));
    // Close this probe's connections twice while publishes are in flight.
    let closer = {
        let (published, received) = (published.clone(), received.clone());
        tokio::spawn(async move {
            let mut closes = Vec::new();
            for at in [2_000, 6_000] {
                while published.load(Ordering::SeqCst) < at {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                let closed = tokio::task::spawn_blocking(close_probe_connections).await.unwrap();
                closes.push((
                    published.load(Ordering::SeqCst),
                    closed,
                    received.load(Ordering::SeqCst),
                ));
            }
            closes
        })
    };
    let mut next = 0usize;
    while next < n {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let end = (next + 250).min(n);
        let mut confirms = Vec::new();
        let mut failed = None;
        for i in next..end {
            match pch
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions::default(),
                    i.to_string().as_bytes(),
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
            {
                Ok(c) => confirms.push(c),
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        for c in confirms {
            if let Err(e) = c.await {
                failed.get_or_insert(e);
            }
        }
        match failed {
            None => {
                next = end;
                published.store(next, Ordering::SeqCst);
            }
            Some(e) => {
                publish_errors.push(format!("batch at {next}: {e}"));
                match tokio::time::timeout(Duration::from_secs(30), pch.wait_for_recovery(e)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        publish_errors.push(format!("wait_for_recovery failed: {e}"));
                        break;
                    }
                    Err(_) => {
                        publish_errors.push("wait_for_recovery timed out after 30s".into());
                        break;
                    }
                }
                if publish_errors.len() > 20 {
                    break;
                }
            }
        }
    }
    let published_through = next;
    let closes = closer.await.unwrap();
    // Give the consumer time to drain.
    for _ in 0..100 {
        if seen.lock().len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let distinct = seen.lock().len();
    println!("lapin enable_auto_recover probe, {n} persistent messages, 2 broker-side closes mid-publish:");
    println!("  closes (confirmed publishes, connections closed, received so far): {closes:?}");
    println!("  published through index {published_through}; publish errors: {publish_errors:?}");
    println!(
        "  consumer: {distinct}/{n} distinct ids, {} deliveries, {} failed acks, errors: {:?}",
        received.load(Ordering::SeqCst),
        ack_errors.load(Ordering::SeqCst),
        consumer_errors.lock()
    );
    println!(
        "  connection status: producer connected={} consumer connected={}",
        pconn.status().connected(),
        cconn.status().connected()
    );
    // Let a recovery still in progress finish before cleaning up.
    for _ in 0..100 {
        if pconn.status().connected() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Ok(ch) = pconn.create_channel().await {
        let _ = ch
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = pconn.close(200, "done".into()).await;
    let _ = cconn.close(200, "done".into()).await;
}
