//! Fault tests of the shared AMQP engine, run on both clients (lapin and
//! amqprs) against RabbitMQ: `cargo test --features lapin,amqprs --test faults_engine`.
//!
//! - graceful shutdown mid-stream (handlers ~200 ms, concurrency 8) exits
//!   within its shutdown timeout, redelivers no finished message and loses
//!   none — with and without an explicit `close()` of the transport;
//! - with the connection frozen (a TCP proxy that stops forwarding), the
//!   shutdown still ends within its timeout;
//! - during a memory alarm (`rabbitmqctl set_vm_memory_high_watermark`,
//!   always restored) consumers that publish nothing keep consuming while a
//!   publisher on the same transport is blocked; everything resumes after
//!   the alarm, nothing is lost; an alarm longer than the confirm timeout
//!   fails a publish with a clear error rather than hanging.
//!
//! Every message is counted (lost, duplicated, finished-but-redelivered)
//! and the counts are printed.

mod common;
use common::rabbitmqctl;

use std::collections::HashSet;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use switchyard::worker::{RouteConfig, Worker};
use switchyard::{handler_fn, Admin, Consumer, Destination, Envelope, Message, Publisher, QueueSpec, Transport};
use switchyard_amqp::{AmqpClient, AmqpConfig, AmqpTransport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One broker-wide fault at a time (the memory alarm affects every connection).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(url: &str, name: &str) -> AmqpConfig {
    let settings = switchyard::Settings::default()
        .with_url(url)
        .with_connection_attempts(1)
        .with_retry_delay(Duration::from_millis(100));
    AmqpConfig::from_settings(&settings).unwrap().connection_name(name)
}

async fn connect<C: AmqpClient + Default>(url: &str, name: &str) -> Option<AmqpTransport<C>> {
    match AmqpTransport::<C>::connect_with(config(url, name)).await {
        Ok(t) => Some(t),
        Err(e) => switchyard_core::testkit::broker_unreachable(e),
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &switchyard_core::message::new_id()[..12])
}

/// Drains `queue` until it stays empty for `idle`; returns the bodies.
async fn drain(t: &dyn Transport, queue: &str, idle: Duration) -> Vec<String> {
    let mut sub = t
        .consume(queue, switchyard::ConsumeOptions::default().prefetch(100))
        .await
        .unwrap();
    let mut got = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(idle, sub.next()).await {
        got.push(String::from_utf8_lossy(&d.message.body).into_owned());
        d.ack().await.unwrap();
    }
    let _ = sub.close().await;
    got
}

// ---------------------------------------------------------------------------
// A TCP proxy that can freeze (stop forwarding, keep the sockets open)
// ---------------------------------------------------------------------------

struct Proxy {
    port: u16,
    frozen: Arc<AtomicBool>,
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if frozen.load(Ordering::Acquire) {
            // Keep both sockets open and silent: a frozen network path.
            std::future::pending::<()>().await;
        }
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if frozen.load(Ordering::Acquire) {
                    std::future::pending::<()>().await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

async fn proxy(upstream: &str) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = Arc::new(AtomicBool::new(false));
    let (f, up) = (frozen.clone(), upstream.to_owned());
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(&up).await else {
                continue;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pipe(cr, sw, f.clone()));
            tokio::spawn(pipe(sr, cw, f.clone()));
        }
    });
    Proxy { port, frozen }
}

// ---------------------------------------------------------------------------
// Graceful shutdown
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Ending {
    /// `transport.close()` after the worker returned.
    Close,
    /// The transport is dropped without `close()`.
    Drop,
    /// The connection freezes before the stop; the transport is dropped.
    Frozen,
}

async fn shutdown_mid_stream<C: AmqpClient + Default>(ending: Ending) {
    let _serial = SERIAL.lock().await;
    let url = switchyard_core::testkit::rabbitmq_url();
    let Some(setup) = connect::<C>(&url, "switchyard fault shutdown setup").await else {
        return;
    };
    let client = setup.name();
    let queue = unique("sy-shutdown");
    setup.declare_queue(&QueueSpec::new(queue.as_str())).await.unwrap();
    const N: usize = 200;
    let batch: Vec<Message> = (0..N).map(|i| Message::new(format!("m{i}")).persistent(true)).collect();
    setup
        .publish_batch(&Destination::queue(queue.as_str()), batch)
        .await
        .unwrap();

    let px = proxy("127.0.0.1:5672").await;
    let worker_url = url.replace("127.0.0.1:5672", &format!("127.0.0.1:{}", px.port));
    let Some(t) = connect::<C>(&worker_url, "switchyard fault shutdown worker").await else {
        return;
    };
    let finished: Arc<Mutex<HashSet<String>>> = Arc::default();
    let f2 = finished.clone();
    let handler = handler_fn(move |env: Envelope| {
        let f = f2.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            f.lock().insert(String::from_utf8_lossy(env.body()).into_owned());
            Ok::<_, switchyard::HandlerError>(())
        }
    });
    let timeout = Duration::from_secs(5);
    let worker = Worker::new(Arc::new(t.clone()))
        .route_with(
            queue.as_str(),
            handler,
            RouteConfig::default().prefetch(8).concurrency(8),
        )
        .shutdown_timeout(timeout);
    let frozen = px.frozen.clone();
    let stop_at = Arc::new(Mutex::new(None::<Instant>));
    let s2 = stop_at.clone();
    let signal = async move {
        tokio::time::sleep(Duration::from_millis(1300)).await;
        if ending == Ending::Frozen {
            frozen.store(true, Ordering::Release);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        *s2.lock() = Some(Instant::now());
    };
    worker.run_until(signal).await.unwrap();
    let stopped_in = stop_at.lock().unwrap().elapsed();
    match ending {
        Ending::Close => {
            let _ = t.close().await;
        }
        Ending::Drop | Ending::Frozen => drop(t),
    }
    // The broker requeues what the closed (or dropped) connections held.
    if ending != Ending::Close {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if ending == Ending::Frozen {
        // Let the broker see the frozen connections die: close them.
        rabbitmqctl(&["close_all_connections", "switchyard fault test: frozen worker"]);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let rest = drain(&setup, &queue, Duration::from_millis(1500)).await;
    let done = finished.lock().clone();
    let rest_set: HashSet<String> = rest.iter().cloned().collect();
    let redelivered_finished = done.intersection(&rest_set).count();
    let lost = (0..N)
        .map(|i| format!("m{i}"))
        .filter(|m| !done.contains(m) && !rest_set.contains(m))
        .count();
    let duplicated = rest.len() - rest_set.len();
    println!(
        "{client} shutdown ({ending:?}): stopped in {stopped_in:?} (timeout {timeout:?}); {} finished, {} drained after, \
         {redelivered_finished} finished-but-redelivered, {lost} lost, {duplicated} duplicated",
        done.len(),
        rest.len()
    );
    let _ = setup.delete_queue(&queue).await;
    let _ = setup.close().await;
    assert!(
        stopped_in < timeout + Duration::from_millis(250),
        "{client}: shutdown took {stopped_in:?}, over its {timeout:?} timeout"
    );
    assert_eq!(lost, 0, "{client}: messages lost");
    if ending != Ending::Frozen {
        assert_eq!(redelivered_finished, 0, "{client}: finished messages were redelivered");
        assert!(!done.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_shutdown_with_close_redelivers_nothing_finished() {
    shutdown_mid_stream::<switchyard::lapin::LapinClient>(Ending::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_shutdown_without_close_redelivers_nothing_finished() {
    shutdown_mid_stream::<switchyard::lapin::LapinClient>(Ending::Drop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_shutdown_with_a_frozen_connection_is_bounded() {
    shutdown_mid_stream::<switchyard::lapin::LapinClient>(Ending::Frozen).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_shutdown_with_close_redelivers_nothing_finished() {
    shutdown_mid_stream::<switchyard::amqprs::AmqprsClient>(Ending::Close).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_shutdown_without_close_redelivers_nothing_finished() {
    shutdown_mid_stream::<switchyard::amqprs::AmqprsClient>(Ending::Drop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_shutdown_with_a_frozen_connection_is_bounded() {
    shutdown_mid_stream::<switchyard::amqprs::AmqprsClient>(Ending::Frozen).await;
}

// ---------------------------------------------------------------------------
// Memory alarm
// ---------------------------------------------------------------------------

/// Restores the memory watermark even when the test fails.
struct Alarm;

impl Alarm {
    fn raise() -> Alarm {
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0000001"]);
        Alarm
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["set_vm_memory_high_watermark", "0.4"])
            .output();
    }
}

async fn memory_alarm<C: AmqpClient + Default>() {
    let _serial = SERIAL.lock().await;
    let url = switchyard_core::testkit::rabbitmq_url();
    let Some(t) = connect::<C>(&url, "switchyard fault alarm").await else {
        return;
    };
    let client = t.name();
    let work = unique("sy-alarm-work");
    let out = unique("sy-alarm-out");
    t.declare_queue(&QueueSpec::new(work.as_str())).await.unwrap();
    t.declare_queue(&QueueSpec::new(out.as_str())).await.unwrap();
    const N: usize = 400;
    let batch: Vec<Message> = (0..N).map(|i| Message::new(format!("w{i}")).persistent(true)).collect();
    t.publish_batch(&Destination::queue(work.as_str()), batch)
        .await
        .unwrap();

    // A background publisher on the same transport.
    let confirmed = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (t, out, confirmed, failed, stop) =
            (t.clone(), out.clone(), confirmed.clone(), failed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0usize;
            while !stop.load(Ordering::Acquire) {
                let m = Message::new(format!("o{i}")).persistent(true);
                match t.publish(&Destination::queue(out.as_str()), m).await {
                    Ok(()) => {
                        confirmed.fetch_add(1, Ordering::AcqRel);
                        i += 1;
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::AcqRel);
                        i += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A worker whose handler publishes nothing.
    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let h2 = handled.clone();
    let handler = handler_fn(move |env: Envelope| {
        let h = h2.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            h.lock().push(String::from_utf8_lossy(env.body()).into_owned());
            Ok::<_, switchyard::HandlerError>(())
        }
    });
    let alarm = Alarm::raise();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = handled.lock().len();
    let confirmed_at_alarm = confirmed.load(Ordering::Acquire);
    let handle = Worker::new(Arc::new(t.clone()))
        .route_with(
            work.as_str(),
            handler,
            RouteConfig::default().prefetch(20).concurrency(8),
        )
        .start()
        .await
        .unwrap();
    // Consumption proceeds during the alarm.
    let deadline = Instant::now() + Duration::from_secs(8);
    while handled.lock().len() < N && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let during = handled.lock().len() - before;
    let publish_state = t.publish_state_watch().get();
    let confirmed_during = confirmed.load(Ordering::Acquire) - confirmed_at_alarm;

    // A publish with a short deadline during the alarm fails clearly.
    let mut short = config(&url, "switchyard fault alarm short");
    short.recovery.publish_wait_timeout = Duration::from_secs(2);
    let t2 = AmqpTransport::<C>::connect_with(short).await.unwrap();
    let started = Instant::now();
    let e = t2
        .publish(&Destination::queue(out.as_str()), Message::new("late"))
        .await
        .expect_err("a publish during the alarm must not be confirmed");
    let waited = started.elapsed();
    drop(alarm);

    // Everything resumes by itself.
    let resume = Instant::now();
    let before_resume = confirmed.load(Ordering::Acquire);
    while confirmed.load(Ordering::Acquire) < before_resume + 10 && resume.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Release);
    publisher.await.unwrap();
    handle.shutdown().await.unwrap();
    let outs = drain(&t, &out, Duration::from_millis(1500)).await;
    let out_set: HashSet<String> = outs.iter().cloned().collect();
    let handled_all = handled.lock().clone();
    let handled_set: HashSet<&String> = handled_all.iter().collect();
    let lost_work = N - handled_set.len();
    let confirmed_total = confirmed.load(Ordering::Acquire);
    println!(
        "{client} memory alarm: {during}/{N} handled during the alarm, publish state {publish_state}, \
         {confirmed_during} publishes confirmed during the alarm, short-deadline publish failed with {} after {waited:?}; \
         after: {confirmed_total} confirmed, {} failed, {} in the out queue (late one included: {}), \
         {lost_work} work lost, {} duplicated",
        e.code(),
        failed.load(Ordering::Acquire),
        out_set.len(),
        out_set.contains("late"),
        handled_all.len() - handled_set.len()
    );
    let _ = t.delete_queue(&work).await;
    let _ = t.delete_queue(&out).await;
    let _ = t.close().await;
    let _ = t2.close().await;
    assert_eq!(during, N, "{client}: consumption stalled during the alarm");
    assert_eq!(lost_work, 0);
    assert!(
        waited < Duration::from_secs(4),
        "{client}: the publish hung for {waited:?} past its deadline"
    );
    if client == "lapin" {
        // lapin advertises connection.blocked: the state and the error say so.
        assert_eq!(e.code(), "blocked", "{client}: {e}");
        assert_eq!(publish_state, switchyard_amqp::ConnectionState::Blocked);
    } else {
        // amqprs 2.1.5 does not advertise it: the broker blocks silently and
        // the publish fails at its deadline.
        assert!(matches!(e.code(), "blocked" | "publish_unconfirmed"), "{client}: {e}");
        assert!(
            e.to_string().contains("alarms"),
            "{client}: the error should point at the alarms: {e}"
        );
    }
    assert!(
        confirmed_total >= before_resume + 10,
        "{client}: publishing did not resume"
    );
    // Every confirmed publish is in the out queue.
    assert!(out_set.len() >= confirmed_total, "{client}: confirmed publishes lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_memory_alarm_blocks_publishing_only() {
    memory_alarm::<switchyard::lapin::LapinClient>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_memory_alarm_blocks_publishing_only() {
    memory_alarm::<switchyard::amqprs::AmqprsClient>().await;
}

// ---------------------------------------------------------------------------
// A message the client cannot decode
// ---------------------------------------------------------------------------

fn publish_poison(url: &str, queue: &str) {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/header_peer.py"))
        .args(["--poison", queue, "--url", url])
        .output()
        .expect("python3 runs scripts/header_peer.py (pip install aiormq)");
    assert!(
        out.status.success(),
        "the peer could not publish: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A message whose header amqprs cannot decode (legal AMQP) sits in one
/// queue while three other queues have ordinary work, their consumers on the
/// same (pooled) consumer connection on amqprs: every other route must
/// handle all of its messages (a redelivery after the shared connection's
/// loss is counted and printed, never a loss), the poisoned route must end
/// with `decode_failed` naming its queue instead of looping forever, and
/// `park_head` on a lapin transport moves the message out of the way without
/// losing it. On lapin the same message is just handled.
async fn poison_message<C: AmqpClient + Default>() {
    let _serial = SERIAL.lock().await;
    let url = switchyard_core::testkit::rabbitmq_url();
    let Some(t) = connect::<C>(&url, "switchyard fault poison").await else {
        return;
    };
    let client = t.name();
    let poisoned = unique("sy-poison");
    let ordinary: Vec<String> = (0..3).map(|i| unique(&format!("sy-ordinary{i}"))).collect();
    t.declare_queue(&QueueSpec::new(poisoned.as_str())).await.unwrap();
    publish_poison(&url, &poisoned);
    const N: usize = 20;
    for (r, q) in ordinary.iter().enumerate() {
        t.declare_queue(&QueueSpec::new(q.as_str())).await.unwrap();
        let batch: Vec<Message> = (0..N).map(|i| Message::new(format!("o{r}-{i}"))).collect();
        t.publish_batch(&Destination::queue(q.as_str()), batch).await.unwrap();
    }

    let handled: Arc<Mutex<Vec<String>>> = Arc::default();
    let h = handled.clone();
    let handler = handler_fn(move |env: Envelope| {
        let h = h.clone();
        async move {
            h.lock().push(String::from_utf8_lossy(env.body()).into_owned());
            Ok::<_, switchyard::HandlerError>(())
        }
    });
    let generation_before = t.state_watch().generation();
    let mut worker = Worker::new(Arc::new(t.clone())).route(poisoned.as_str(), handler.clone());
    for q in &ordinary {
        worker = worker.route(q.as_str(), handler.clone());
    }
    let handle = worker.start().await.unwrap();
    let started = Instant::now();
    let distinct_ordinary = || {
        handled
            .lock()
            .iter()
            .filter(|b| b.starts_with('o'))
            .collect::<HashSet<_>>()
            .len()
    };
    let ordinary_done = loop {
        let n = distinct_ordinary();
        if n == 3 * N || started.elapsed() > Duration::from_secs(20) {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut status = handle.status(&poisoned);
    let waited = Instant::now();
    if client == "amqprs" {
        while !matches!(status, Some(switchyard::worker::ConsumerStatus::Failed { .. }))
            && waited.elapsed() < Duration::from_secs(30)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
            status = handle.status(&poisoned);
        }
    } else {
        while !handled.lock().iter().any(|b| b == "poison") && waited.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let paused_after = started.elapsed();
    let others: Vec<_> = ordinary.iter().map(|q| handle.status(q)).collect();
    let main_reconnects = t.state_watch().generation() - generation_before;
    // The paused route's error is what shutdown reports for amqprs.
    let shutdown = handle.shutdown().await;
    assert_eq!(shutdown.is_err(), client == "amqprs", "{shutdown:?}");
    let ordinary_total = handled.lock().iter().filter(|b| b.starts_with('o')).count();

    // The way out, on a client that reads such headers as bytes.
    let lapin = connect::<switchyard::lapin::LapinClient>(&url, "switchyard fault poison park")
        .await
        .unwrap();
    let parking = format!("{poisoned}.parked");
    let parked = lapin.park_head(&poisoned, &parking).await.unwrap();
    let left = lapin.queue_info(&poisoned).await.unwrap().message_count;
    let in_parking = lapin.queue_info(&parking).await.unwrap().message_count;
    let handled_poison = handled.lock().iter().filter(|b| *b == "poison").count();
    println!(
        "{client} poison: {ordinary_done}/{} ordinary handled ({} redelivered after the shared connection's loss, \
         lost {}), poisoned route {status:?} after {paused_after:?}, {main_reconnects} main-connection reconnects; \
         poison handled {handled_poison}x, parked {parked}, {left} left in the queue, {in_parking} in {parking}, \
         lost {}",
        3 * N,
        ordinary_total - ordinary_done,
        3 * N - ordinary_done,
        1 - handled_poison.min(1) - in_parking.min(1) as usize
    );
    for q in ordinary.iter().chain([&poisoned, &parking]) {
        let _ = lapin.delete_queue(q).await;
    }
    let _ = lapin.close().await;
    let _ = t.close().await;
    assert_eq!(ordinary_done, 3 * N, "{client}: the ordinary queues starved");
    for s in &others {
        assert!(
            !matches!(s, Some(switchyard::worker::ConsumerStatus::Failed { .. })),
            "{client}: an ordinary route was paused: {s:?}"
        );
    }
    if client == "amqprs" {
        match &status {
            Some(switchyard::worker::ConsumerStatus::Failed { code, message }) => {
                assert_eq!(*code, "decode_failed");
                assert!(message.contains(poisoned.as_str()), "{message}");
            }
            other => panic!("{client}: the poisoned route was not paused: {other:?}"),
        }
        assert_eq!(main_reconnects, 0, "the poison message took the main connection down");
        assert!(parked, "park_head found nothing");
        assert_eq!((left, in_parking), (0, 1), "the poison message was not moved");
    } else {
        assert_eq!(handled_poison, 1, "lapin handles the message (header as bytes)");
        assert!(!parked);
    }
}

/// amqprs consumers share consumer connections, `consumers_per_connection`
/// each: ten routes with four per connection open three connections (counted
/// by RabbitMQ), and every route gets all of its messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_consumers_share_pooled_connections() {
    let _serial = SERIAL.lock().await;
    let url = switchyard_core::testkit::rabbitmq_url();
    let name = unique("switchyard pool");
    let cfg = config(&url, &name).consumers_per_connection(4);
    let t = match AmqpTransport::<switchyard::amqprs::AmqprsClient>::connect_with(cfg).await {
        Ok(t) => t,
        Err(e) => {
            switchyard_core::testkit::broker_unreachable::<()>(e);
            return;
        }
    };
    let queues: Vec<String> = (0..10).map(|i| unique(&format!("sy-pool{i}"))).collect();
    const N: usize = 10;
    for q in &queues {
        t.declare_queue(&QueueSpec::new(q.as_str())).await.unwrap();
        let batch: Vec<Message> = (0..N).map(|i| Message::new(format!("{q}-{i}"))).collect();
        t.publish_batch(&Destination::queue(q.as_str()), batch).await.unwrap();
    }
    let connections = || {
        // The connection name is in the client properties.
        common::rabbitmqctl_output(&["list_connections", "--no-table-headers", "-q", "client_properties"])
            .lines()
            .filter(|l| l.contains(name.as_str()))
            .count()
    };
    let before = connections();
    let handled: Arc<Mutex<HashSet<String>>> = Arc::default();
    let h = handled.clone();
    let handler = handler_fn(move |env: Envelope| {
        let h = h.clone();
        async move {
            h.lock().insert(String::from_utf8_lossy(env.body()).into_owned());
            Ok::<_, switchyard::HandlerError>(())
        }
    });
    let mut worker = Worker::new(Arc::new(t.clone()));
    for q in &queues {
        worker = worker.route(q.as_str(), handler.clone());
    }
    let handle = worker.start().await.unwrap();
    let started = Instant::now();
    while handled.lock().len() < queues.len() * N && started.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // RabbitMQ lists a connection once it has been opened; give it a moment.
    let mut consumer_connections = connections() - before;
    for _ in 0..20 {
        if consumer_connections >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        consumer_connections = connections() - before;
    }
    let got = handled.lock().len();
    println!(
        "pooled consumers: {} routes, {consumer_connections} consumer connections (4 per connection), {got}/{} \
         messages handled, lost {}",
        queues.len(),
        queues.len() * N,
        queues.len() * N - got
    );
    handle.shutdown().await.unwrap();
    for q in &queues {
        let _ = t.delete_queue(q).await;
    }
    let _ = t.close().await;
    assert_eq!(got, queues.len() * N);
    assert_eq!(consumer_connections, 3, "10 consumers, 4 per connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_poison_message_is_isolated_paused_and_parked() {
    poison_message::<switchyard::amqprs::AmqprsClient>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_handles_the_message_amqprs_cannot_decode() {
    poison_message::<switchyard::lapin::LapinClient>().await;
}

// ---------------------------------------------------------------------------
// Permission errors are final; temporary queues are forgotten
// ---------------------------------------------------------------------------

/// A user without write or configure permission: publishing and declaring
/// fail at once with `access_refused` (not transient, never retried), with
/// the broker's reply attached and no password in the text.
async fn permission_errors_are_final<C: AmqpClient + Default>() {
    let url = switchyard_core::testkit::rabbitmq_url();
    let Some(admin) = connect::<C>(&url, "switchyard fault permissions admin").await else {
        return;
    };
    let client = admin.name();
    let user = format!("sy-readonly-{}", &switchyard_core::message::new_id()[..8]);
    rabbitmqctl(&["add_user", &user, "r3adonly-pw"]);
    struct DropUser(String);
    impl Drop for DropUser {
        fn drop(&mut self) {
            let _ = Command::new("rabbitmqctl").args(["delete_user", &self.0]).output();
        }
    }
    let _cleanup = DropUser(user.clone());
    rabbitmqctl(&["set_permissions", "-p", "/", &user, "", "", ".*"]);
    let ro_url = url.replace("guest:guest@", &format!("{user}:r3adonly-pw@"));
    let Some(ro) = connect::<C>(&ro_url, "switchyard fault permissions reader").await else {
        return;
    };
    let started = Instant::now();
    let e = ro
        .publish(&Destination::new("amq.direct", "x"), Message::new("nope"))
        .await
        .expect_err("no write permission");
    let publish_took = started.elapsed();
    let d = ro
        .declare_queue(&QueueSpec::new(unique("sy-denied")))
        .await
        .expect_err("no configure permission");
    println!(
        "{client} permissions: publish -> {} in {publish_took:?} ({:?}); declare -> {} ({:?})",
        e.code(),
        e.reply().map(|r| r.to_string()),
        d.code(),
        d.reply().map(|r| r.to_string())
    );
    for err in [&e, &d] {
        assert_eq!(err.code(), "access_refused", "{client}: {err}");
        assert!(!err.is_transient(), "{client}: a permission error must not be retried");
        assert_eq!(err.reply().map(|r| r.code), Some(403));
        assert!(!err.to_string().contains("r3adonly-pw"));
    }
    assert!(
        publish_took < Duration::from_secs(5),
        "{client}: the publish was retried ({publish_took:?})"
    );
    // The transport still works for what the user may do.
    ro.health_check().await.unwrap();
    let _ = ro.close().await;
    let _ = admin.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_permission_errors_are_final() {
    permission_errors_are_final::<switchyard::lapin::LapinClient>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_permission_errors_are_final() {
    permission_errors_are_final::<switchyard::amqprs::AmqprsClient>().await;
}

/// An exchange kind the broker has no plugin for is refused with the
/// broker's own words (503, not transient, so nothing retries it), the
/// refused exchange is not recorded for re-declaration, and the transport
/// carries on (RabbitMQ closes the whole connection for this error).
async fn unknown_exchange_kinds_are_final<C: AmqpClient + Default>() {
    let url = switchyard_core::testkit::rabbitmq_url();
    let Some(t) = connect::<C>(&url, "switchyard fault plugin kind").await else {
        return;
    };
    let x = unique("sy-delayed");
    let started = Instant::now();
    let e = t
        .declare_exchange(&switchyard::ExchangeSpec::delayed(
            x.as_str(),
            switchyard::ExchangeKind::Direct,
        ))
        .await
        .expect_err("the test broker has no delayed-message plugin");
    let took = started.elapsed();
    println!(
        "{}: x-delayed-message without the plugin -> {} ({:?}) in {took:?}",
        t.name(),
        e.code(),
        e.reply().map(|r| r.to_string())
    );
    assert_eq!(e.reply().map(|r| r.code), Some(503), "{e}");
    assert!(
        e.to_string().contains("unknown exchange type 'x-delayed-message'"),
        "{e}"
    );
    assert!(!e.is_transient(), "an unknown exchange type must not be retried");
    assert!(took < Duration::from_secs(5), "it was retried ({took:?})");
    let recorded = t
        .recorded_topology()
        .iter()
        .any(|entry| matches!(entry, switchyard_amqp::recovery::TopologyEntry::Exchange(spec) if spec.name == x));
    assert!(
        !recorded,
        "a refused exchange must not be re-declared on every reconnect"
    );
    let q = unique("sy-after-plugin");
    t.declare_queue(&QueueSpec::new(q.as_str())).await.unwrap();
    t.publish(&Destination::queue(q.as_str()), Message::new("still works"))
        .await
        .unwrap();
    assert_eq!(drain(&t, &q, Duration::from_millis(300)).await, ["still works"]);
    let _ = t.delete_queue(&q).await;
    let _ = t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_unknown_exchange_kinds_are_final() {
    unknown_exchange_kinds_are_final::<switchyard::lapin::LapinClient>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_unknown_exchange_kinds_are_final() {
    unknown_exchange_kinds_are_final::<switchyard::amqprs::AmqprsClient>().await;
}

/// An exclusive or server-named queue is forgotten by the recovery registry
/// once its consumer ends (it would otherwise be re-declared on every
/// reconnect, forever).
async fn temporary_queues_are_forgotten<C: AmqpClient + Default>() {
    let url = switchyard_core::testkit::rabbitmq_url();
    let Some(t) = connect::<C>(&url, "switchyard fault registry").await else {
        return;
    };
    let durable = unique("sy-kept");
    t.declare_queue(&QueueSpec::new(durable.as_str())).await.unwrap();
    let temp = t.declare_queue(&QueueSpec::temporary()).await.unwrap().name;
    let named = |t: &AmqpTransport<C>, q: &str| {
        t.recorded_topology()
            .iter()
            .any(|e| matches!(e, switchyard_amqp::recovery::TopologyEntry::Queue { name, .. } if name == q))
    };
    assert!(named(&t, &temp) && named(&t, &durable));
    let sub = t.consume(&temp, switchyard::ConsumeOptions::default()).await.unwrap();
    sub.close().await.unwrap();
    println!(
        "{}: after its consumer ended the server-named queue is recorded: {}; the durable one: {}",
        t.name(),
        named(&t, &temp),
        named(&t, &durable)
    );
    assert!(!named(&t, &temp), "the temporary queue is still recorded");
    assert!(named(&t, &durable));
    let _ = t.delete_queue(&durable).await;
    let _ = t.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_forgets_temporary_queues() {
    temporary_queues_are_forgotten::<switchyard::lapin::LapinClient>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_forgets_temporary_queues() {
    temporary_queues_are_forgotten::<switchyard::amqprs::AmqprsClient>().await;
}

// ---------------------------------------------------------------------------
// basic.get across a reconnect
// ---------------------------------------------------------------------------

/// Closes, on the broker, the connections whose client-provided name is
/// `name`; returns how many.
fn close_connections_named(name: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "pid", "client_properties"])
        .output()
        .expect("run rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("\"{name}\"");
    let pids: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split('\t').next())
        .collect();
    for pid in &pids {
        rabbitmqctl(&["close_connection", pid, "switchyard fault test"]);
    }
    pids.len()
}

/// A message taken with `get` (manual ack) before the connection is lost:
/// the broker requeues it; settling it afterwards fails with
/// `settle_failed` and settles nothing else — in particular not the
/// delivery a new `get` on the new connection received with the same tag.
async fn get_across_a_reconnect<C: AmqpClient + Default>() {
    let _serial = SERIAL.lock().await;
    let url = switchyard_core::testkit::rabbitmq_url();
    let name = unique("switchyard-get-reconnect");
    let Some(t) = connect::<C>(&url, &name).await else {
        return;
    };
    let queue = unique("switchyard.fault.get");
    t.declare_queue(&QueueSpec::new(&queue)).await.expect("declare");
    let dest = Destination::queue(queue.as_str());
    t.publish(&dest, Message::new("m1")).await.unwrap();
    t.publish(&dest, Message::new("m2")).await.unwrap();
    let stale = t.get(&queue, false).await.unwrap().expect("a message");
    assert_eq!(&stale.delivery.message.body[..], b"m1");
    let generation = t.state_watch().generation();
    assert_eq!(
        close_connections_named(&format!("{name}/consume")),
        1,
        "one main connection"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while t.state_watch().generation() == generation || !t.state().is_connected() {
        assert!(Instant::now() < deadline, "the transport did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The broker requeued m1 with the old connection: the new get takes it,
    // on a new channel whose first tag is the same as the stale one's.
    let fresh = t.get(&queue, false).await.unwrap().expect("a message");
    assert_eq!(&fresh.delivery.message.body[..], b"m1");
    assert!(fresh.delivery.info.redelivered);
    assert_eq!(fresh.message_count, 1);
    assert_eq!(fresh.delivery.info.delivery_tag, stale.delivery.info.delivery_tag);
    let e = stale.delivery.ack().await.unwrap_err();
    assert_eq!(e.code(), "settle_failed", "{e}");
    // The fresh delivery is still unsettled: dropping it requeues it.
    drop(fresh);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let depth = t.queue_info(&queue).await.unwrap().message_count;
        if depth == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fresh delivery was settled by the stale ack (depth {depth})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.delete_queue(&queue).await.unwrap();
    t.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_get_across_a_reconnect_never_settles_another_delivery() {
    get_across_a_reconnect::<switchyard::lapin::LapinClient>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqprs_get_across_a_reconnect_never_settles_another_delivery() {
    get_across_a_reconnect::<switchyard::amqprs::AmqprsClient>().await;
}
