//! SIGTERM to a real worker process, mid-stream, on both clients:
//! `cargo test --features lapin,amqprs --test sigterm`.
//!
//! This test binary has its own `main` (harness = false) and plays both
//! parts: run normally, it is the test; it starts itself again as the worker
//! process (`SWITCHYARD_SIGTERM_CHILD` set), which consumes with
//! `Worker::run()` — stopping on SIGTERM as a deployed service does — and
//! prints the id of every message whose handler finished. The test sends
//! SIGTERM while handlers (~200 ms, concurrency 8) run, then counts: the
//! process must exit within its shutdown timeout, no finished message may be
//! delivered again, none may be lost — with and without `transport.close()`
//! before `main` returns.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use switchyard::worker::{RouteConfig, Worker};
use switchyard::{
    handler_fn, Admin, ConsumeOptions, Consumer, Destination, Envelope, Message, Publisher, QueueSpec, Transport,
};
use switchyard_amqp::{AmqpClient, AmqpConfig, AmqpTransport};

const N: usize = 200;
const SHUTDOWN: Duration = Duration::from_secs(5);

fn config(name: &str) -> AmqpConfig {
    let settings = switchyard::Settings::default()
        .with_url(switchyard_core::testkit::rabbitmq_url())
        .with_connection_attempts(1);
    AmqpConfig::from_settings(&settings).unwrap().connection_name(name)
}

/// The worker process.
async fn child<C: AmqpClient + Default>(queue: &str, close: bool) {
    let t = AmqpTransport::<C>::connect_with(config("switchyard sigterm worker"))
        .await
        .expect("connect");
    let handler = handler_fn(|env: Envelope| async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!("finished {}", String::from_utf8_lossy(env.body()));
        Ok::<_, switchyard::HandlerError>(())
    });
    let worker = Worker::new(Arc::new(t.clone()))
        .route_with(queue, handler, RouteConfig::default().prefetch(8).concurrency(8))
        .shutdown_timeout(SHUTDOWN);
    println!("ready");
    worker.run().await.expect("worker");
    if close {
        t.close().await.expect("close");
    }
    println!("exiting");
}

async fn parent<C: AmqpClient + Default>(close: bool) -> Result<(), String> {
    let t = match AmqpTransport::<C>::connect_with(config("switchyard sigterm test")).await {
        Ok(t) => t,
        Err(e) => {
            // Panics when the broker is required (scripts/test.sh), else skips.
            let _: Option<()> = switchyard_core::testkit::broker_unreachable(e);
            return Ok(());
        }
    };
    let client = t.name();
    let queue = format!("sy-sigterm-{}", &switchyard_core::message::new_id()[..10]);
    t.declare_queue(&QueueSpec::new(queue.as_str()))
        .await
        .map_err(|e| e.to_string())?;
    let batch: Vec<Message> = (0..N).map(|i| Message::new(format!("m{i}"))).collect();
    t.publish_batch(&Destination::queue(queue.as_str()), batch)
        .await
        .map_err(|e| e.to_string())?;

    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("SWITCHYARD_SIGTERM_CHILD", format!("{client}:{queue}:{close}"))
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut lines = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the worker never got ready")?;
        let ready = line == "ready";
        lines.push(line);
        if ready {
            break;
        }
    }
    // Mid-round: handlers are running when the signal arrives.
    std::thread::sleep(Duration::from_millis(1300));
    let signalled = Instant::now();
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .map_err(|e| e.to_string())?;
    if !kill.success() {
        return Err("kill -TERM failed".into());
    }
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if signalled.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            return Err(format!("{client}: the worker did not exit 30 s after SIGTERM"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let exited_in = signalled.elapsed();
    while let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
        lines.push(l);
    }
    let finished: HashSet<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("finished ").map(str::to_owned))
        .collect();

    // What is left in the queue.
    let mut sub = t
        .consume(&queue, ConsumeOptions::default().prefetch(100))
        .await
        .map_err(|e| e.to_string())?;
    let mut rest = HashSet::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(1500), sub.next()).await {
        rest.insert(String::from_utf8_lossy(&d.message.body).into_owned());
        let _ = d.ack().await;
    }
    let _ = sub.close().await;
    let _ = t.delete_queue(&queue).await;
    let _ = t.close().await;
    let redelivered = finished.intersection(&rest).count();
    let lost = (0..N)
        .map(|i| format!("m{i}"))
        .filter(|m| !finished.contains(m) && !rest.contains(m))
        .count();
    println!(
        "{client} SIGTERM ({}): exited {status} in {exited_in:?} (shutdown timeout {SHUTDOWN:?}); {} finished, {} left, \
         {redelivered} finished-but-redelivered, {lost} lost",
        if close { "with close()" } else { "without close()" },
        finished.len(),
        rest.len()
    );
    if !status.success() {
        return Err(format!("{client}: the worker exited with {status}"));
    }
    if exited_in > SHUTDOWN + Duration::from_millis(500) {
        return Err(format!("{client}: the worker took {exited_in:?} to exit"));
    }
    if redelivered != 0 || lost != 0 || finished.is_empty() {
        return Err(format!(
            "{client}: {redelivered} finished messages redelivered, {lost} lost, {} finished",
            finished.len()
        ));
    }
    Ok(())
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(spec) = std::env::var("SWITCHYARD_SIGTERM_CHILD") {
        let mut parts = spec.splitn(3, ':');
        let (client, queue, close) = (
            parts.next().unwrap().to_owned(),
            parts.next().unwrap().to_owned(),
            parts.next() == Some("true"),
        );
        rt.block_on(async move {
            match client.as_str() {
                "lapin" => child::<switchyard::lapin::LapinClient>(&queue, close).await,
                _ => child::<switchyard::amqprs::AmqprsClient>(&queue, close).await,
            }
        });
        return;
    }
    let mut failures = Vec::new();
    for close in [true, false] {
        for r in [
            rt.block_on(parent::<switchyard::lapin::LapinClient>(close)),
            rt.block_on(parent::<switchyard::amqprs::AmqprsClient>(close)),
        ] {
            if let Err(e) = r {
                failures.push(e);
            }
        }
    }
    if !failures.is_empty() {
        eprintln!("sigterm test failed:\n  {}", failures.join("\n  "));
        std::process::exit(1);
    }
    println!("sigterm test: 4 worker processes stopped by SIGTERM, all within their shutdown timeout, nothing lost or redelivered");
}
