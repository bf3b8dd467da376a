//! Fault tests of the lapin transport against the local RabbitMQ:
//! `cargo test --features lapin --test faults_lapin -- --nocapture`.
//!
//! - `close_all_connections_three_times_loses_nothing`: 20,000 persistent
//!   messages published with confirms while a consumer acks them; the broker
//!   closes every connection (`rabbitmqctl close_all_connections`) three
//!   times during the run; every message id must arrive at least once.
//! - `broker_app_restart_loses_nothing`: the same across
//!   `rabbitmqctl stop_app` / `start_app`.
//! - `killed_consumer_acks_no_unfinished_message`: a consumer with unfinished
//!   handlers is shut down; exactly the unfinished (and never-delivered)
//!   messages come back.
//! - `refused_channels_leave_later_ones_working`: 5,000 refused operations
//!   (each a channel the broker closes) on one connection; the channels
//!   opened after the ids wrap around still work.
//!
//! The first two disturb every client of the broker: they run one at a
//! time (a static mutex) and restart the broker app if a test fails midway.
//! When the broker is unreachable they fail if `SWITCHYARD_REQUIRE_RABBITMQ=1`,
//! else print "skipped: RabbitMQ unreachable".

mod common;
use common::rabbitmqctl;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::lapin::{AmqpConfig, LapinTransport};
use switchyard_core::settings::Settings;
use switchyard_core::{
    Admin, ConsumeOptions, Consumer, Delivery, Destination, Message, Publisher, QueueSpec, Transport,
};
use tokio::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::const_new(());

const CONNECTION_NAME: &str = "switchyard fault test";

fn settings() -> Settings {
    let url = switchyard_core::testkit::rabbitmq_url();
    Settings::default()
        .with_url(url)
        .with_connection_attempts(1)
        .with_retry_delay(Duration::from_millis(100))
}

async fn connect() -> Option<LapinTransport> {
    let s = settings();
    let mut config = AmqpConfig::from_settings(&s).unwrap().connection_name(CONNECTION_NAME);
    config.recovery.publish_wait_timeout = Duration::from_secs(60);
    match LapinTransport::connect_with(config).await {
        Ok(t) => Some(t),
        Err(e) => switchyard_core::testkit::broker_unreachable(e),
    }
}

/// Starts the broker app again if a test stops midway with it stopped.
struct AppGuard {
    stopped: bool,
}

impl Drop for AppGuard {
    fn drop(&mut self) {
        if self.stopped {
            let _ = Command::new("rabbitmqctl").arg("start_app").status();
        }
    }
}

fn id_of(d: &Delivery) -> usize {
    d.message
        .properties
        .message_id
        .as_deref()
        .and_then(|s| s.parse().ok())
        .expect("numeric message id")
}

/// Consumes until every id in `0..n` was seen; returns (distinct, duplicates).
async fn consume_all(consumer: LapinTransport, queue: String, n: usize, limit: Duration) -> (usize, usize) {
    let mut sub = consumer
        .consume(&queue, ConsumeOptions::default().prefetch(100))
        .await
        .expect("consume");
    let mut seen = HashSet::with_capacity(n);
    let mut duplicates = 0;
    let deadline = tokio::time::Instant::now() + limit;
    while seen.len() < n {
        let next = tokio::time::timeout_at(deadline, sub.next()).await;
        let d = match next {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => panic!("consumer error: {e}"),
            Ok(None) => panic!("subscription ended after {} of {n}", seen.len()),
            Err(_) => break,
        };
        if !seen.insert(id_of(&d)) {
            duplicates += 1;
        }
        // A settlement of a delivery from a lost channel fails: the broker
        // redelivers it, which the duplicate count shows.
        let _ = d.ack().await;
    }
    let cancel = sub.cancel_handle();
    let _ = cancel.cancel().await;
    let _ = consumer.close().await;
    (seen.len(), duplicates)
}

/// Publishes `n` persistent messages in paced, pipelined batches; `progress`
/// counts confirmed ones.
async fn produce(producer: LapinTransport, queue: String, n: usize, progress: Arc<AtomicUsize>, pace: Duration) {
    let dest = Destination::queue(queue);
    let batch = 250;
    for start in (0..n).step_by(batch) {
        let msgs = (start..(start + batch).min(n))
            .map(|i| {
                Message::new(vec![b'x'; 64])
                    .with_message_id(i.to_string())
                    .persistent(true)
            })
            .collect::<Vec<_>>();
        let count = msgs.len();
        producer.publish_batch(&dest, msgs).await.expect("publish batch");
        progress.fetch_add(count, Ordering::SeqCst);
        tokio::time::sleep(pace).await;
    }
    let _ = producer.close().await;
}

async fn wait_for(progress: &AtomicUsize, at_least: usize) {
    while progress.load(Ordering::SeqCst) < at_least {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn close_all_connections_three_times_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(admin) = connect().await else { return };
    let (Some(producer), Some(consumer)) = (connect().await, connect().await) else {
        return;
    };
    let queue = format!("switchyard.fault.close.{}", switchyard_core::message::new_id());
    admin.declare_queue(&QueueSpec::new(&queue)).await.expect("declare");
    let n = 20_000;
    let started = Instant::now();
    let progress = Arc::new(AtomicUsize::new(0));
    let generations = (producer.state_watch().clone(), consumer.state_watch().clone());
    let prod = tokio::spawn(produce(
        producer,
        queue.clone(),
        n,
        progress.clone(),
        Duration::from_millis(60),
    ));
    let cons = tokio::spawn(consume_all(consumer, queue.clone(), n, Duration::from_secs(100)));

    let mut closed_at = Vec::new();
    for fraction in [0.15, 0.40, 0.65] {
        wait_for(&progress, (n as f64 * fraction) as usize).await;
        rabbitmqctl(&["close_all_connections", CONNECTION_NAME]);
        closed_at.push(progress.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    prod.await.expect("producer task");
    let (distinct, duplicates) = cons.await.expect("consumer task");
    println!(
        "close_all_connections x3 at confirmed counts {closed_at:?}: {distinct}/{n} ids received, {duplicates} duplicates, {:.1}s; producer connects {}, consumer connects {}",
        started.elapsed().as_secs_f64(),
        generations.0.generation(),
        generations.1.generation()
    );
    assert!(
        closed_at.iter().all(|&c| c < n),
        "every close happened mid-run: {closed_at:?}"
    );
    assert_eq!(distinct, n, "every message id received at least once");
    assert!(
        generations.0.generation() >= 2 && generations.1.generation() >= 2,
        "both recovered"
    );
    // The admin connection was closed too and recovers for the clean-up.
    admin.delete_queue(&queue).await.expect("delete queue");
    admin.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broker_app_restart_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(admin) = connect().await else { return };
    let (Some(producer), Some(consumer)) = (connect().await, connect().await) else {
        return;
    };
    let queue = format!("switchyard.fault.restart.{}", switchyard_core::message::new_id());
    admin.declare_queue(&QueueSpec::new(&queue)).await.expect("declare");
    let n = 20_000;
    let started = Instant::now();
    let progress = Arc::new(AtomicUsize::new(0));
    let watch = producer.state_watch().clone();
    let prod = tokio::spawn(produce(
        producer,
        queue.clone(),
        n,
        progress.clone(),
        Duration::from_millis(40),
    ));
    let cons = tokio::spawn(consume_all(consumer, queue.clone(), n, Duration::from_secs(100)));

    wait_for(&progress, n / 3).await;
    let stopped_at = progress.load(Ordering::SeqCst);
    let mut guard = AppGuard { stopped: true };
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = watch.get();
    rabbitmqctl(&["start_app"]);
    guard.stopped = false;

    prod.await.expect("producer task");
    let (distinct, duplicates) = cons.await.expect("consumer task");
    println!(
        "stop_app/start_app at confirmed count {stopped_at}: {distinct}/{n} ids received, {duplicates} duplicates, {:.1}s; producer state while stopped: {during}",
        started.elapsed().as_secs_f64()
    );
    assert!(stopped_at < n);
    assert!(!during.is_connected(), "the producer noticed the outage ({during})");
    assert_eq!(distinct, n, "every message id received at least once");
    admin.delete_queue(&queue).await.expect("delete queue");
    admin.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_consumer_acks_no_unfinished_message() {
    let _serial = SERIAL.lock().await;
    let Some(t) = connect().await else { return };
    let queue = format!("switchyard.fault.kill.{}", switchyard_core::message::new_id());
    t.declare_queue(&QueueSpec::new(&queue)).await.expect("declare");
    let n = 60;
    let msgs = (0..n)
        .map(|i| Message::new("m").with_message_id(i.to_string()).persistent(true))
        .collect();
    t.publish_batch(&Destination::queue(queue.as_str()), msgs)
        .await
        .unwrap();

    for kill_by_drop in [false, true] {
        let consumer = connect().await.expect("connect");
        let mut sub = consumer
            .consume(&queue, ConsumeOptions::default().prefetch(20))
            .await
            .unwrap();
        let mut unfinished = Vec::new();
        let mut finished = HashSet::new();
        for k in 0..20 {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("delivery in time")
                .expect("stream open")
                .expect("delivery");
            // Finish a contiguous run, then every other one: acks can be
            // coalesced over 0..=3 but never over an unfinished delivery.
            if k < 4 || k % 2 == 0 {
                finished.insert(id_of(&d));
                d.ack().await.unwrap();
            } else {
                unfinished.push(d);
            }
        }
        // Let the coalescer's timer send what it may, then kill the consumer
        // while the unfinished handlers still hold their deliveries.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let unfinished_ids: HashSet<usize> = unfinished.iter().map(id_of).collect();
        if kill_by_drop {
            drop(sub);
            drop(consumer);
        } else {
            consumer.close().await.unwrap();
            drop(sub);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        // Every unfinished message is back, and no finished one.
        let checker = connect().await.expect("connect");
        let info = checker.queue_info(&queue).await.unwrap();
        let mut sub = checker
            .consume(&queue, ConsumeOptions::default().prefetch(100))
            .await
            .unwrap();
        let mut back = HashSet::new();
        let mut redelivered = HashSet::new();
        let mut held = Vec::new();
        for _ in 0..info.message_count {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.next())
                .await
                .expect("delivery in time")
                .unwrap()
                .unwrap();
            let id = id_of(&d);
            if d.info.redelivered {
                redelivered.insert(id);
            }
            back.insert(id);
            held.push(d);
        }
        println!(
            "kill by {}: {} finished, {} unfinished, {} back in the queue",
            if kill_by_drop { "drop" } else { "close" },
            finished.len(),
            unfinished_ids.len(),
            back.len()
        );
        assert!(
            finished.is_disjoint(&back),
            "a finished message came back: {:?}",
            finished.intersection(&back)
        );
        assert!(unfinished_ids.is_subset(&back), "an unfinished message was acked");
        assert!(
            unfinished_ids.is_subset(&redelivered),
            "unfinished messages come back redelivered"
        );
        // Closing the checker requeues everything it held.
        checker.close().await.unwrap();
        drop((sub, held, unfinished));
        tokio::time::sleep(Duration::from_millis(200)).await;
        // Remove the acked ones from the count for the next round.
        let left = t.queue_info(&queue).await.unwrap().message_count as usize;
        assert_eq!(left, back.len(), "queue holds exactly what came back");
    }
    t.delete_queue(&queue).await.unwrap();
    t.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_channels_leave_later_ones_working() {
    let Some(t) = connect().await else {
        return;
    };
    common::refused_channels_leave_later_ones_working(&t).await;
    t.close().await.expect("close");
}
