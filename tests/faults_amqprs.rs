//! Fault tests of the amqprs transport against the local RabbitMQ:
//! `cargo test --features amqprs --test faults_amqprs -- --nocapture`.
//!
//! They close every broker connection (`rabbitmqctl close_all_connections`)
//! or restart the broker application (`stop_app` / `start_app`), which
//! disturbs every other client of the broker: run them deliberately. They
//! run one at a time (a static mutex) and need `rabbitmqctl` on the PATH.
//! When the broker is unreachable they fail if
//! `SWITCHYARD_REQUIRE_RABBITMQ=1`, else print "skipped: RabbitMQ unreachable".
//!
//! `refused_channels_leave_later_ones_working` disturbs no one: 5,000 refused
//! operations (each a channel the broker closes) on one connection, and the
//! channels opened after that many still work.

#[allow(dead_code)] // its `rabbitmqctl` is not used here (this file has its own)
mod common;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::sync::Mutex as SyncMutex;
use switchyard::amqprs::{AmqpConfig, AmqprsTransport};
use switchyard_amqp::recovery::BackoffPolicy;
use switchyard_core::{Admin, ConsumeOptions, Consumer, Destination, Message, Publisher, QueueSpec, Transport};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

const N: usize = 20_000;

fn url() -> String {
    switchyard_core::testkit::rabbitmq_url()
}

fn config(name: &str) -> AmqpConfig {
    let mut config = AmqpConfig::from_url(&url())
        .expect("RABBITMQ_URL")
        .connection_name(name);
    config.connection_attempts = 1;
    config.retry_delay = Duration::from_millis(100);
    config.recovery = config
        .recovery
        .backoff(BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(1)))
        .publish_wait_timeout(Duration::from_secs(60));
    config
}

async fn connect(name: &str) -> Option<AmqprsTransport> {
    match AmqprsTransport::connect_with(config(name)).await {
        Ok(t) => Some(t),
        Err(e) => switchyard_core::testkit::broker_unreachable(e),
    }
}

fn rabbitmqctl(args: &[&str]) -> bool {
    match Command::new("rabbitmqctl").args(args).output() {
        Ok(o) => {
            if !o.status.success() {
                eprintln!(
                    "rabbitmqctl {args:?} failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
            }
            o.status.success()
        }
        Err(e) => {
            eprintln!("rabbitmqctl {args:?} could not run: {e}");
            false
        }
    }
}

async fn rabbitmqctl_async(args: &'static [&'static str]) -> bool {
    tokio::task::spawn_blocking(move || rabbitmqctl(args))
        .await
        .unwrap_or(false)
}

fn unique(prefix: &str) -> String {
    format!("sy-fault.{prefix}.{}", &switchyard_core::message::new_id()[..8])
}

/// Consumes `queue` with manual acks (coalesced), recording each message id.
fn spawn_counting_consumer(
    t: AmqprsTransport,
    queue: String,
    seen: Arc<SyncMutex<HashMap<usize, u32>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut sub = t
            .consume(&queue, ConsumeOptions::default().prefetch(100))
            .await
            .expect("consume");
        while !stop.load(Ordering::Relaxed) {
            let d = match tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
                Err(_) => continue,
                Ok(None) => break,
                Ok(Some(Err(e))) => panic!("consumer failed: {e}"),
                Ok(Some(Ok(d))) => d,
            };
            let id: usize = d
                .message
                .properties
                .message_id
                .as_deref()
                .and_then(|s| s.parse().ok())
                .expect("message id");
            *seen.lock().unwrap().entry(id).or_insert(0) += 1;
            // A failed ack (channel lost) is fine: the broker redelivers.
            let _ = d.ack().await;
        }
    })
}

/// Publishes N persistent messages with confirms, paced so the run spans
/// several seconds; returns when every publish is confirmed.
async fn produce(t: AmqprsTransport, queue: String, done: Arc<AtomicBool>) {
    let dest = Destination::queue(queue.as_str());
    let mut next = 0usize;
    while next < N {
        let end = (next + 250).min(N);
        let batch: Vec<Message> = (next..end)
            .map(|i| {
                Message::new(format!("payload {i}"))
                    .with_message_id(i.to_string())
                    .persistent(true)
            })
            .collect();
        t.publish_batch(&dest, batch).await.expect("publish batch confirmed");
        next = end;
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    done.store(true, Ordering::SeqCst);
}

async fn wait_all_seen(seen: &SyncMutex<HashMap<usize, u32>>, within: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if seen.lock().unwrap().len() == N {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Announces a broker disruption in the test output.
fn note(line: &str) {
    eprintln!("{line}");
}

async fn run_with_disruption<F, Fut>(label: &str, disrupt: F) -> Option<(usize, u32)>
where
    F: FnOnce(Arc<AtomicBool>) -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let producer = connect("switchyard fault producer").await?;
    let consumer = connect("switchyard fault consumer").await.expect("second connection");
    let queue = unique(label);
    producer
        .declare_queue(&QueueSpec::new(queue.clone()))
        .await
        .expect("declare");

    let seen = Arc::new(SyncMutex::new(HashMap::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let c = spawn_counting_consumer(consumer.clone(), queue.clone(), seen.clone(), stop.clone());
    let p = tokio::spawn(produce(producer.clone(), queue.clone(), done.clone()));
    let disruptions = disrupt(done.clone()).await;
    p.await.expect("producer finished with every publish confirmed");
    let all = wait_all_seen(&seen, Duration::from_secs(60)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = c.await;

    let counts = seen.lock().unwrap().clone();
    let missing: Vec<usize> = (0..N).filter(|i| !counts.contains_key(i)).take(10).collect();
    let duplicates: u32 = counts.values().map(|n| n - 1).sum();
    eprintln!(
        "{label}: {} of {N} ids received, {duplicates} duplicates, {disruptions} disruptions, producer generation {}, consumer generation {}",
        counts.len(),
        producer.state_watch().generation(),
        consumer.state_watch().generation()
    );
    let _ = producer.delete_queue(&queue).await;
    let _ = producer.close().await;
    let _ = consumer.close().await;
    assert!(all, "{label}: messages lost, e.g. ids {missing:?}");
    Some((disruptions, duplicates))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_all_connections_three_times_loses_nothing() {
    let _serial = SERIAL.lock().await;
    note(&format!(
        "AMQPRS FAULT TESTS RUNNING {} (close_all_connections)",
        chrono_like_now()
    ));
    let r = run_with_disruption("close-all", |done| async move {
        let mut n = 0;
        tokio::time::sleep(Duration::from_millis(800)).await;
        while !done.load(Ordering::SeqCst) && n < 5 {
            if rabbitmqctl_async(&["close_all_connections", "switchyard fault test"]).await {
                n += 1;
            }
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        n
    })
    .await;
    note(&format!("AMQPRS FAULT TESTS DONE {}", chrono_like_now()));
    if let Some((disruptions, _)) = r {
        assert!(
            disruptions >= 3,
            "only {disruptions} disruptions happened during the run"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_app_restart_loses_nothing() {
    let _serial = SERIAL.lock().await;
    note(&format!(
        "AMQPRS FAULT TESTS RUNNING {} (stop_app/start_app)",
        chrono_like_now()
    ));
    let r = run_with_disruption("restart", |done| async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut n = 0;
        if !done.load(Ordering::SeqCst) {
            let stopped = rabbitmqctl_async(&["stop_app"]).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
            let started = rabbitmqctl_async(&["start_app"]).await;
            if !started {
                // Never leave the broker down for the tests that follow.
                let _ = rabbitmqctl_async(&["start_app"]).await;
            }
            if stopped && started {
                n += 1;
            }
        }
        n
    })
    .await;
    note(&format!("AMQPRS FAULT TESTS DONE {}", chrono_like_now()));
    if let Some((disruptions, _)) = r {
        assert_eq!(
            disruptions, 1,
            "the broker application was not restarted during the run"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_never_acked_an_unfinished_message() {
    let _serial = SERIAL.lock().await;
    let Some(t) = connect("switchyard fault kill").await else {
        return;
    };
    const M: usize = 400;
    let queue = unique("kill");
    t.declare_queue(&QueueSpec::new(queue.clone())).await.expect("declare");
    let batch: Vec<Message> = (0..M)
        .map(|i| {
            Message::new(format!("m{i}"))
                .with_message_id(i.to_string())
                .persistent(true)
        })
        .collect();
    t.publish_batch(&Destination::queue(queue.as_str()), batch)
        .await
        .expect("publish");

    // The victim: acks most messages, leaves every 7th unfinished (its
    // handler "still running"), and is killed mid-stream.
    let victim = connect("switchyard fault kill victim").await.expect("connect");
    let unfinished = Arc::new(SyncMutex::new(HashSet::new()));
    let acked = Arc::new(AtomicUsize::new(0));
    let (u2, a2, v2, q2) = (unfinished.clone(), acked.clone(), victim.clone(), queue.clone());
    let task = tokio::spawn(async move {
        let mut sub = v2
            .consume(&q2, ConsumeOptions::default().prefetch(50))
            .await
            .expect("consume");
        let mut held = Vec::new();
        while let Some(Ok(d)) = sub.next().await {
            let id: usize = d.message.properties.message_id.as_deref().unwrap().parse().unwrap();
            if id % 7 == 3 {
                u2.lock().unwrap().insert(id);
                held.push(d); // never settled
            } else {
                d.ack().await.expect("ack");
                a2.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let start = Instant::now();
    while acked.load(Ordering::SeqCst) < 40 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Kill: the task dies with its unfinished deliveries, then the connection goes.
    task.abort();
    let _ = task.await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = victim.close().await;
    let unfinished = unfinished.lock().unwrap().clone();
    assert!(!unfinished.is_empty(), "the victim held no unfinished message");

    // Every unfinished message must be back in the queue.
    let mut sub = t
        .consume(&queue, ConsumeOptions::default().prefetch(100).auto_ack(true))
        .await
        .expect("consume");
    let mut back = HashSet::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        back.insert(d.message.properties.message_id.unwrap().parse::<usize>().unwrap());
    }
    let lost: Vec<_> = unfinished.difference(&back).collect();
    eprintln!(
        "kill: {} acked, {} unfinished, {} back in the queue",
        acked.load(Ordering::SeqCst),
        unfinished.len(),
        back.len()
    );
    let _ = t.delete_queue(&queue).await;
    let _ = t.close().await;
    assert!(lost.is_empty(), "unfinished messages were acked: {lost:?}");
    assert!(
        back.len() + acked.load(Ordering::SeqCst) >= M,
        "messages went missing: {} back + {} acked < {M}",
        back.len(),
        acked.load(Ordering::SeqCst)
    );
}

fn chrono_like_now() -> String {
    let out = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]).output();
    out.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// After the broker drops the connection, the transport re-declares what it
/// declared (a server-named exclusive queue gets a new name, its binding
/// follows), the same subscription keeps delivering, and a publish issued
/// during the outage waits and then succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topology_and_consumers_come_back_after_a_reconnect() {
    let _serial = SERIAL.lock().await;
    let Some(t) = connect("switchyard fault topology").await else {
        return;
    };
    note(&format!(
        "AMQPRS FAULT TESTS RUNNING {} (topology after reconnect)",
        chrono_like_now()
    ));
    let ex = unique("topo-ex");
    t.declare_exchange(&switchyard_core::ExchangeSpec::topic(ex.clone()).durable(false))
        .await
        .expect("exchange");
    let q = t.declare_queue(&QueueSpec::temporary()).await.expect("queue").name;
    t.bind(&switchyard_core::Binding::queue(q.clone(), ex.clone(), "k.#"))
        .await
        .expect("bind");
    let mut sub = t
        .consume(&q, ConsumeOptions::default().auto_ack(true))
        .await
        .expect("consume");
    let dest = Destination::new(ex.as_str(), "k.before");
    t.publish(&dest, Message::new("before")).await.expect("publish before");
    let d = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
    assert!(matches!(d, Ok(Some(Ok(_)))), "no delivery before the fault");

    let generation = t.state_watch().generation();
    assert!(rabbitmqctl_async(&["close_all_connections", "switchyard fault test"]).await);
    // rabbitmqctl returns before the broker has closed the connection: wait
    // until the transport has seen the loss, so that "during" is published
    // in the outage (an exclusive queue's messages die with its connection).
    let seen = Instant::now() + Duration::from_secs(15);
    while t.state() == switchyard_amqp::recovery::ConnectionState::Connected
        && t.state_watch().generation() == generation
        && Instant::now() < seen
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Published while the connection is lost: waits, then succeeds.
    let during_dest = Destination::new(ex.as_str(), "k.during");
    let during = t.publish(&during_dest, Message::new("during"));
    tokio::time::timeout(Duration::from_secs(30), during)
        .await
        .expect("publish during the outage finished")
        .expect("publish during the outage confirmed");
    let reconnected = Instant::now() + Duration::from_secs(15);
    while t.state_watch().generation() <= generation && Instant::now() < reconnected {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        t.state_watch().generation() > generation,
        "the transport did not reconnect"
    );
    t.publish(&Destination::new(ex.as_str(), "k.after"), Message::new("after"))
        .await
        .expect("publish after");

    let mut bodies = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(3), sub.next()).await {
        bodies.push(String::from_utf8_lossy(&d.message.body).into_owned());
        if bodies.len() == 2 {
            break;
        }
    }
    note(&format!("AMQPRS FAULT TESTS DONE {}", chrono_like_now()));
    let _ = t.delete_exchange(&ex).await;
    let _ = t.close().await;
    assert_eq!(
        bodies,
        ["during", "after"],
        "the same subscription kept delivering after the reconnect"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_channels_leave_later_ones_working() {
    let Some(t) = connect("switchyard fault test: refused channels").await else {
        return;
    };
    common::refused_channels_leave_later_ones_working(&t).await;
    t.close().await.expect("close");
}
