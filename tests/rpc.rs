//! RpcClient integration tests on the memory transport.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::handler::CorrelationId;
use switchyard::memory::MemoryBroker;
use switchyard::rpc::RpcClient;
use switchyard::worker::{Worker, WorkerHandle};
use switchyard::{handler_fn, Destination, HandlerError, Json, Message, QueueSpec, Transport};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ExtractionRequest {
    session_id: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct ExtractionResult {
    session_id: String,
    memories: u32,
}

async fn responder(t: &Arc<dyn Transport>, queue: &str, delay: Duration) -> WorkerHandle {
    t.declare_queue(&QueueSpec::new(queue)).await.unwrap();
    Worker::new(t.clone())
        .route(
            queue,
            handler_fn(move |Json(req): Json<ExtractionRequest>| async move {
                tokio::time::sleep(delay).await;
                if req.session_id.is_empty() {
                    return Err(HandlerError::reject("empty session"));
                }
                Ok(Json(ExtractionResult {
                    memories: req.session_id.len() as u32,
                    session_id: req.session_id,
                }))
            }),
        )
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn call_json_round_trip_across_connections() {
    let broker = MemoryBroker::new();
    let server: Arc<dyn Transport> = broker.connect();
    let h = responder(&server, "extraction.requests", Duration::ZERO).await;
    let client = RpcClient::new(broker.connect()).await.unwrap();
    let res: ExtractionResult = client
        .call_json(
            &Destination::queue("extraction.requests"),
            &ExtractionRequest {
                session_id: "abc".into(),
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(
        res,
        ExtractionResult {
            session_id: "abc".into(),
            memories: 3
        }
    );
    assert_eq!(client.pending_calls(), 0);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn reply_carries_the_request_correlation_id() {
    let broker = MemoryBroker::new();
    let t: Arc<dyn Transport> = broker.connect();
    t.declare_queue(&QueueSpec::new("echo-cid")).await.unwrap();
    let h = Worker::new(t.clone())
        .route(
            "echo-cid",
            handler_fn(|CorrelationId(c): CorrelationId| async move { Message::new(c.unwrap_or_default()) }),
        )
        .start()
        .await
        .unwrap();
    let client = RpcClient::new(broker.connect()).await.unwrap();
    let reply = client
        .call(
            &Destination::queue("echo-cid"),
            Message::new("?"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let cid = reply.properties.correlation_id.clone().unwrap();
    assert_eq!(cid.len(), 32);
    assert_eq!(
        &reply.body[..],
        cid.as_bytes(),
        "the handler saw the id the reply carries"
    );
    // The client keeps the caller's correlation id (breaking change of issue 12).
    let reply = client
        .call(
            &Destination::queue("echo-cid"),
            Message::new("?").with_correlation_id("mine"),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    let cid = reply.properties.correlation_id.clone().unwrap();
    assert_eq!(&*cid, "mine", "the client keeps the caller's correlation id");
    assert_eq!(&reply.body[..], cid.as_bytes());
    // A reply that does not decode is a decode error for call_json.
    let e = client
        .call_json::<_, u32>(&Destination::queue("echo-cid"), &1u32, Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "decode_failed");
    assert_eq!(client.pending_calls(), 0);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn concurrent_calls_share_one_reply_channel() {
    let broker = MemoryBroker::new();
    let server: Arc<dyn Transport> = broker.connect();
    let h = responder(&server, "work", Duration::from_millis(20)).await;
    let client = Arc::new(RpcClient::new(broker.connect()).await.unwrap());
    let reply_to = client.reply_to().to_owned();
    let mut calls = Vec::new();
    for i in 0..25 {
        let c = client.clone();
        calls.push(tokio::spawn(async move {
            let r: ExtractionResult = c
                .call_json(
                    &Destination::queue("work"),
                    &ExtractionRequest {
                        session_id: "x".repeat(i + 1),
                    },
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            (i, r)
        }));
    }
    for c in calls {
        let (i, r) = c.await.unwrap();
        assert_eq!(r.memories as usize, i + 1, "each caller got its own reply");
    }
    assert_eq!(client.reply_to(), reply_to, "one reply address for every call");
    assert_eq!(client.pending_calls(), 0);
    assert_eq!(client.replies_received(), 25);
    assert_eq!(client.late_replies(), 0);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn timeout_is_rpc_timeout_and_leaves_no_waiter() {
    let broker = MemoryBroker::new();
    let server: Arc<dyn Transport> = broker.connect();
    let h = responder(&server, "slow", Duration::from_millis(300)).await;
    let client = RpcClient::new(broker.connect()).await.unwrap();
    let dest = Destination::queue("slow");
    let started = tokio::time::Instant::now();
    let e = client
        .call_json::<_, ExtractionResult>(
            &dest,
            &ExtractionRequest {
                session_id: "late".into(),
            },
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(250));
    assert_eq!(e.code(), "rpc_timeout");
    assert_eq!(e.to_string(), "rpc call to '(default)/slow' timed out after 50ms");
    assert_eq!(client.pending_calls(), 0, "the waiter was removed");
    // The reply arrives after the timeout: dropped and counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while client.late_replies() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "late reply not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(client.late_replies(), 1);
    // A call dropped before its reply also leaves nothing behind.
    let fut = client.call(&dest, Message::new("dropped"), Duration::from_secs(5));
    assert!(tokio::time::timeout(Duration::from_millis(10), fut).await.is_err());
    assert_eq!(client.pending_calls(), 0, "a dropped call removes its waiter");
    // The client still works afterwards.
    let ok: ExtractionResult = client
        .call_json(
            &dest,
            &ExtractionRequest {
                session_id: "ok".into(),
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(ok.memories, 2);
    h.shutdown().await.unwrap();
}

#[tokio::test]
async fn many_timeouts_do_not_leak_waiters() {
    let broker = MemoryBroker::new();
    let t: Arc<dyn Transport> = broker.connect();
    t.declare_queue(&QueueSpec::new("black-hole")).await.unwrap();
    let client = RpcClient::new(t.clone()).await.unwrap();
    for _ in 0..50 {
        let e = client
            .call(
                &Destination::queue("black-hole"),
                Message::new("x"),
                Duration::from_millis(1),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), "rpc_timeout");
    }
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn errors_publish_and_closed_transport() {
    let broker = MemoryBroker::new();
    let t: Arc<dyn Transport> = broker.connect();
    let client = RpcClient::new(t.clone()).await.unwrap();
    let e = client
        .call(
            &Destination::new("missing.exchange", "k"),
            Message::new("x"),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "exchange_not_found");
    assert_eq!(client.pending_calls(), 0);
    // The responder rejects: the caller times out (no reply), nothing hangs.
    let server: Arc<dyn Transport> = broker.connect();
    let h = responder(&server, "strict", Duration::ZERO).await;
    let e = client
        .call_json::<_, ExtractionResult>(
            &Destination::queue("strict"),
            &ExtractionRequest { session_id: "".into() },
            Duration::from_millis(100),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), "rpc_timeout");
    h.shutdown().await.unwrap();
    // Closing the client's connection ends the reply stream: calls fail clearly.
    t.close().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let e = client
            .call(
                &Destination::queue("strict"),
                Message::new("x"),
                Duration::from_millis(200),
            )
            .await
            .unwrap_err();
        if e.code() == "connection_closed" {
            break;
        }
        // Until the reader notices, the publish itself fails on the closed connection.
        assert_eq!(e.code(), "shutdown", "{e}");
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(client.pending_calls(), 0);
}

#[tokio::test]
async fn call_keeps_the_callers_correlation_id_and_refuses_a_duplicate_in_flight() {
    let broker = MemoryBroker::new();
    let server: Arc<dyn Transport> = broker.connect();
    let h = responder(&server, "cid.requests", Duration::from_millis(200)).await;
    let client = Arc::new(RpcClient::new(broker.connect()).await.unwrap());
    let dest = Destination::queue("cid.requests");
    let request = || Message::json(&ExtractionRequest { session_id: "s".into() }).unwrap();

    // The caller's id is used on the request and comes back on the reply.
    let first = {
        let client = client.clone();
        let dest = dest.clone();
        let m = request().with_correlation_id("order-42");
        tokio::spawn(async move { client.call(&dest, m, Duration::from_secs(5)).await })
    };
    // While it is in flight, the same id is refused at once, clearly.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while client.pending_calls() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "first call never registered");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let dup = client
        .call(&dest, request().with_correlation_id("order-42"), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert_eq!(dup.code(), "invalid_config");
    assert!(dup.to_string().contains("order-42"), "{dup}");
    assert!(dup.to_string().contains("correlation id"), "{dup}");

    let reply = first.await.unwrap().unwrap();
    assert_eq!(reply.properties.correlation_id.as_deref(), Some("order-42"));
    // Once the first call is over, the id can be used again.
    let again = client
        .call(&dest, request().with_correlation_id("order-42"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.properties.correlation_id.as_deref(), Some("order-42"));
    // Without an id the client makes a fresh one per call.
    let a = client.call(&dest, request(), Duration::from_secs(5)).await.unwrap();
    let b = client.call(&dest, request(), Duration::from_secs(5)).await.unwrap();
    let (a, b) = (
        a.properties.correlation_id.unwrap(),
        b.properties.correlation_id.unwrap(),
    );
    assert_ne!(a, b);
    assert_eq!(a.len(), 32);
    h.shutdown().await.unwrap();
}
