//! The ops endpoint (`switchyard::ops`) over real HTTP, on the memory transport.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard::memory::MemoryBroker;
use switchyard::ops::{ConnectionInfo, OpsHandle, OpsServer};
use switchyard::worker::{RouteConfig, Worker, WorkerHandle};
use switchyard::{handler_fn, Destination, Message, QueueSpec, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// One HTTP request: status code and body.
async fn request(addr: SocketAddr, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())
        .await?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await?;
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("Content-Length")
        .parse()
        .unwrap();
    assert_eq!(len, body.len(), "Content-Length matches the body");
    Ok((code, body.to_owned()))
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(addr, "GET", path).await.unwrap()
}

async fn eventually(what: &str, addr: SocketAddr, path: &str, cond: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, body) = get(addr, path).await;
        if cond(code, &body) {
            return (code, body);
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {code} {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn setup(queues: &[&str]) -> (Arc<dyn Transport>, MemoryBroker) {
    let broker = MemoryBroker::new();
    let t: Arc<dyn Transport> = broker.connect();
    for q in queues {
        t.declare_queue(&QueueSpec::new(*q)).await.unwrap();
    }
    (t, broker)
}

async fn publish(t: &Arc<dyn Transport>, q: &str, n: usize) {
    for i in 0..n {
        t.publish(&Destination::queue(q), Message::new(format!("m{i}")))
            .await
            .unwrap();
    }
}

async fn serve(server: OpsServer) -> OpsHandle {
    server.bind("127.0.0.1:0").await.unwrap()
}

#[tokio::test]
async fn metrics_health_readiness_and_status_answer_over_http() {
    let (t, _b) = setup(&["orders", "mails"]).await;
    let worker = Worker::new(t.clone())
        .route(
            "orders",
            handler_fn(|m: Message| async move {
                if m.body.as_ref() == b"m2" {
                    Err(switchyard::HandlerError::reject("bad order"))
                } else {
                    Ok(())
                }
            }),
        )
        .route("mails", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    let ops = serve(OpsServer::new(worker.clone()).transport(t.clone())).await;
    let addr = ops.local_addr();
    publish(&t, "orders", 3).await;
    worker.wait_handled("orders", 3, Duration::from_secs(5)).await.unwrap();

    let (code, metrics) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for line in [
        "# TYPE switchyard_worker_handled_total counter",
        "switchyard_worker_handled_total{queue=\"orders\"} 3",
        "switchyard_worker_acked_total{queue=\"orders\"} 2",
        "switchyard_worker_rejected_total{queue=\"orders\"} 1",
        "switchyard_worker_failed_total{queue=\"orders\"} 1",
        "switchyard_worker_requeued_total{queue=\"orders\"} 0",
        "switchyard_worker_in_flight{queue=\"orders\"} 0",
        "switchyard_worker_handled_total{queue=\"mails\"} 0",
        "switchyard_worker_consuming{queue=\"mails\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("switchyard_worker_last_delivery_age_seconds{queue=\"orders\"} "));
    assert!(
        !metrics.contains("switchyard_worker_last_delivery_age_seconds{queue=\"mails\"}"),
        "no delivery on mails yet: no age"
    );
    assert!(
        !metrics.contains("switchyard_connection_up"),
        "no connection closure given"
    );

    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".into()));
    assert_eq!(get(addr, "/readyz").await, (200, "ready\n".into()));

    let (code, status) = get(addr, "/status").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(v["transport"], "memory");
    let orders = &v["routes"][0];
    assert_eq!(orders["queue"], "orders");
    assert_eq!(orders["status"], "running");
    assert_eq!(orders["stats"]["acked"], 2);
    assert_eq!(orders["stats"]["rejected"], 1);
    assert!(orders["last_delivery_age_seconds"].as_f64().unwrap() < 5.0);
    assert_eq!(v["routes"][1]["last_delivery_age_seconds"], serde_json::Value::Null);

    // Query strings are ignored; unknown paths 404; other methods 405.
    assert_eq!(get(addr, "/healthz?verbose=1").await.0, 200);
    let (code, body) = get(addr, "/nope").await;
    assert_eq!(code, 404, "{body}");
    assert_eq!(request(addr, "POST", "/metrics").await.unwrap().0, 405);
    assert_eq!(request(addr, "DELETE", "/readyz").await.unwrap().0, 405);
    // Garbage is a 400, and the server keeps serving.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"hello\r\n\r\n").await.unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert_eq!(get(addr, "/healthz").await.0, 200);

    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_stale_route_a_stopped_route_and_queue_depths() {
    let (t, _b) = setup(&["slow", "fast"]).await;
    // The slow route's handler waits for permits the test hands out.
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let worker = Worker::new(t.clone())
        .route_with(
            "slow",
            handler_fn(move || {
                let g = g.clone();
                async move {
                    g.acquire().await.unwrap().forget();
                }
            }),
            RouteConfig::default().prefetch(1).concurrency(1),
        )
        .route("fast", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    let ops = serve(
        OpsServer::new(worker.clone())
            .transport(t.clone())
            .stale_after(Duration::from_millis(150))
            .queue_depth(Duration::from_millis(20)),
    )
    .await;
    let addr = ops.local_addr();
    // Idle queues are not stale, however long the route waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(get(addr, "/readyz").await.0, 200);

    publish(&t, "slow", 3).await; // one taken by the stuck handler, two wait
    let (_, metrics) = eventually("the depth poll", addr, "/metrics", |_, m| {
        m.contains("switchyard_queue_depth{queue=\"slow\"} 2")
    })
    .await;
    assert!(
        metrics.contains("switchyard_queue_depth{queue=\"fast\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_worker_in_flight{queue=\"slow\"} 1"),
        "{metrics}"
    );
    let (_, body) = eventually("stale", addr, "/readyz", |c, _| c == 503).await;
    assert!(body.contains("route slow: stale: 2 messages waiting"), "{body}");
    assert!(!body.contains("fast"), "{body}");
    let v: serde_json::Value = serde_json::from_str(&get(addr, "/status").await.1).unwrap();
    assert_eq!(v["routes"][0]["stale"], true);
    assert_eq!(v["routes"][0]["queue_depth"], 2);
    assert_eq!(get(addr, "/healthz").await.0, 200, "stale is not dead");

    // Let it through: ready again once the queue is empty.
    gate.add_permits(3);
    worker.wait_handled("slow", 3, Duration::from_secs(5)).await.unwrap();
    eventually("ready again", addr, "/readyz", |c, _| c == 200).await;

    // A stopped route: not healthy, not ready; the server keeps serving the others.
    worker.stop("fast").await.unwrap();
    let (code, body) = get(addr, "/healthz").await;
    assert_eq!(code, 503);
    assert!(body.contains("route fast: stopped"), "{body}");
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("route fast: stopped"), "{body}");
    assert!(get(addr, "/metrics")
        .await
        .1
        .contains("switchyard_worker_consuming{queue=\"fast\"} 0"));
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn connection_state_shows_in_metrics_and_readiness() {
    let (t, _b) = setup(&["q"]).await;
    let worker = Worker::new(t.clone())
        .route("q", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    let info = Arc::new(Mutex::new(ConnectionInfo {
        state: "connected".into(),
        connected: true,
        blocked: false,
        address: Some("rabbit-1:5672".into()),
        reconnects: 2,
    }));
    let i = info.clone();
    let ops = serve(OpsServer::new(worker.clone()).connection(move || i.lock().unwrap().clone())).await;
    let addr = ops.local_addr();
    let (_, m) = get(addr, "/metrics").await;
    for line in [
        "switchyard_connection_up 1",
        "switchyard_connection_blocked 0",
        "switchyard_connection_reconnects_total 2",
        "switchyard_connection_info{state=\"connected\",address=\"rabbit-1:5672\"} 1",
    ] {
        assert!(m.lines().any(|l| l == line), "missing {line:?} in\n{m}");
    }
    assert_eq!(get(addr, "/readyz").await.0, 200);

    info.lock().unwrap().blocked = true;
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("blocked"), "{body}");
    assert!(get(addr, "/metrics")
        .await
        .1
        .contains("switchyard_connection_blocked 1"));

    *info.lock().unwrap() = ConnectionInfo {
        state: "reconnecting (attempt 3)".into(),
        ..ConnectionInfo::default()
    };
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503);
    assert!(body.contains("connection reconnecting (attempt 3)"), "{body}");
    let v: serde_json::Value = serde_json::from_str(&get(addr, "/status").await.1).unwrap();
    assert_eq!(v["connection"]["connected"], false);
    assert_eq!(get(addr, "/healthz").await.0, 200, "the loops still run");
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_closed_transport_fails_readiness_and_the_endpoint_stays_up_to_say_why() {
    let (t, _b) = setup(&["q"]).await;
    let worker = Worker::new(t.clone())
        .route("q", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    let ops = serve(OpsServer::new(worker.clone()).transport(t.clone())).await;
    let addr = ops.local_addr();
    assert_eq!(get(addr, "/readyz").await.0, 200);
    t.close().await.unwrap();
    let (_, body) = eventually("not ready", addr, "/readyz", |c, _| c == 503).await;
    assert!(body.contains("transport memory"), "{body}");
    let (code, body) = eventually("unhealthy", addr, "/healthz", |c, _| c == 503).await;
    assert_eq!(code, 503);
    assert!(body.contains("route q: failed"), "{body}");
    assert!(!ops.is_finished(), "a failed worker keeps its endpoint up");
}

async fn refused(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if TcpStream::connect(addr).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

#[tokio::test]
async fn the_server_stops_with_the_worker_and_with_its_handle() {
    let (t, _b) = setup(&["q"]).await;
    let start = |t: Arc<dyn Transport>| async move {
        Worker::new(t)
            .route("q", handler_fn(|| async {}))
            .start()
            .await
            .unwrap()
    };
    let worker: WorkerHandle = start(t.clone()).await;
    let ops = serve(OpsServer::new(worker.clone())).await;
    let addr = ops.local_addr();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    worker.shutdown().await.unwrap();
    assert!(refused(addr).await, "the server stops with the worker");
    assert!(ops.is_finished());

    let worker = start(t.clone()).await;
    let ops = serve(OpsServer::new(worker.clone())).await;
    let addr = ops.local_addr();
    assert_eq!(get(addr, "/healthz").await.0, 200);
    drop(ops);
    assert!(refused(addr).await, "dropping the handle stops the server");

    let ops = serve(OpsServer::new(worker.clone())).await;
    let addr = ops.local_addr();
    ops.shutdown().await;
    assert!(TcpStream::connect(addr).await.is_err(), "shut down");
    worker.shutdown().await.unwrap();
}

#[tokio::test]
async fn binding_errors_name_the_address() {
    let (t, _b) = setup(&["q"]).await;
    let worker = Worker::new(t)
        .route("q", handler_fn(|| async {}))
        .start()
        .await
        .unwrap();
    let first = serve(OpsServer::new(worker.clone())).await;
    let taken = first.local_addr().to_string();
    let e = OpsServer::new(worker.clone()).bind(&taken).await.unwrap_err();
    assert_eq!(e.code(), "invalid_config");
    assert!(e.to_string().contains(&taken), "{e}");
    let e = OpsServer::new(worker.clone()).bind("not an address").await.unwrap_err();
    assert!(e.to_string().contains("ops address=not an address"), "{e}");
    worker.shutdown().await.unwrap();
}
