//! Every layer together, end to end on the memory transport with core's
//! Worker, including the order-sensitive cases: retry inside dead-letter,
//! decompression before decoding, tracing (and metrics) outermost so they
//! see the outcome the Worker acts on.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use parking_lot::Mutex;
use switchyard_core::headers::*;
use switchyard_core::worker::RouteConfig;
use switchyard_core::{handler_fn, Destination, Envelope, HandlerError, Json, Message, Publisher, QueueSpec};
use switchyard_middleware::metrics::names;
use switchyard_middleware::prelude::*;
use switchyard_middleware::trace::TraceContext;
use tower::ServiceBuilder;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

/// Records `message_id` and `outcome` of every `switchyard.handle` span.
#[derive(Clone, Default)]
struct SpanLog {
    fields: Arc<Mutex<HashMap<u64, (String, String)>>>,
}

struct Fields<'a>(&'a mut (String, String));
impl Visit for Fields<'_> {
    fn record_str(&mut self, f: &Field, v: &str) {
        match f.name() {
            "message_id" => self.0 .0 = v.to_owned(),
            "outcome" => self.0 .1 = v.to_owned(),
            _ => {}
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
}

impl<S: tracing::Subscriber> Layer<S> for SpanLog {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, _: Context<'_, S>) {
        if attrs.metadata().name() == "switchyard.handle" {
            let mut e = (String::new(), String::new());
            attrs.record(&mut Fields(&mut e));
            self.fields.lock().insert(id.into_u64(), e);
        }
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _: Context<'_, S>) {
        if let Some(e) = self.fields.lock().get_mut(&id.into_u64()) {
            values.record(&mut Fields(e));
        }
    }
}

impl SpanLog {
    fn outcomes(&self, message_id: &str) -> Vec<String> {
        let mut v: Vec<_> = self
            .fields
            .lock()
            .iter()
            .map(|(k, (m, o))| (*k, m.clone(), o.clone()))
            .collect();
        v.sort();
        v.into_iter()
            .filter(|(_, m, _)| m == message_id)
            .map(|(_, _, o)| o)
            .collect()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    id: String,
    note: String,
    pad: String,
}

/// (metric name, labels, counter value)
type CounterRow = (String, Vec<(String, String)>, u64);

fn handled_counter(snapshot: &[CounterRow], outcome: &str) -> u64 {
    snapshot
        .iter()
        .filter(|(n, l, _)| n == names::HANDLED && l.iter().any(|(k, v)| k == "outcome" && v == outcome))
        .map(|(_, _, v)| *v)
        .sum()
}

#[tokio::test]
async fn full_stack_end_to_end() {
    let spans = SpanLog::default();
    let _sub = tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()));
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _rec = metrics::set_default_local_recorder(&recorder);

    let s = setup().await;
    s.transport.declare_queue(&QueueSpec::new("events")).await.unwrap();
    let publisher: Arc<dyn Publisher> = Arc::new(ServicePublisher::new(
        ServiceBuilder::new()
            .layer(CorrelationLayer::new())
            .layer(TraceLayer::new())
            .layer(MetricsLayer::new())
            .layer(CompressionLayer::gzip().threshold(16))
            .service(PublisherService::new(s.transport.clone())),
    ));
    let breaker = CircuitBreakerLayer::new(CircuitBreakerConfig::new(100, Duration::from_secs(60)));
    let health = breaker.handle();
    let events = publisher.clone();
    let handler = handler_fn(move |Json(o): Json<Order>, env: Envelope| {
        let events = events.clone();
        async move {
            match o.note.as_str() {
                "flaky" if env.retry_count() == 0 => Err(HandlerError::retry("flaky dependency")),
                "down" => Err(HandlerError::retry("dependency down")),
                "invalid" => Err(HandlerError::reject("order is invalid")),
                "panic" => panic!("handler bug"),
                "slow" if env.retry_count() == 0 => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    Ok(())
                }
                _ => {
                    let event = Message::json(&serde_json::json!({ "handled": o.id })).unwrap();
                    events
                        .publish(&Destination::queue("events"), event)
                        .await
                        .map_err(HandlerError::from)
                }
            }
        }
    });
    let stack = ServiceBuilder::new()
        .layer(TraceLayer::new())
        .layer(MetricsLayer::new())
        .layer(DedupLayer::new(MemoryDedupStore::new(1000)))
        .layer(DeadLetterLayer::new(s.transport.clone(), "app.dlx"))
        .layer(RetryLayer::broker_delayed(
            RetryPolicy::new(3, Backoff::fixed(Duration::from_millis(20))),
            s.transport.clone(),
            s.transport.clone(),
        ))
        .layer(breaker)
        .layer(CatchPanicLayer::new())
        .layer(TimeoutLayer::new(Duration::from_millis(100)))
        .layer(DecompressionLayer::new())
        .layer(CorrelationLayer::new())
        .service(handler);
    let w = start_with(
        &s.transport,
        "orders",
        stack,
        RouteConfig::default().prefetch(20).concurrency(8),
    )
    .await;

    let dest = Destination::new("shop", "order.created");
    // padded so that every body is above the gzip threshold of the publisher stack
    let order = |id: &str, note: &str| {
        Message::json(&Order {
            id: id.into(),
            note: note.into(),
            pad: "x".repeat(64),
        })
        .unwrap()
        .with_message_id(id)
    };
    let root = TraceContext::new_root();
    let mut ok = order("ok", "fine").with_correlation_id("chain-1");
    root.inject(&mut ok.headers);
    publisher.publish(&dest, ok).await.unwrap();
    for (id, note) in [
        ("flaky", "flaky"),
        ("down", "down"),
        ("invalid", "invalid"),
        ("panic", "panic"),
        ("slow", "slow"),
    ] {
        publisher.publish(&dest, order(id, note)).await.unwrap();
    }
    // undecodable JSON inside valid gzip, and a corrupt gzip body
    let bad = Encoding::Gzip.compress(b"{not json", None).unwrap();
    s.transport
        .publish(
            &dest,
            Message::new(bad)
                .with_content_encoding("gzip")
                .with_content_type("application/json")
                .with_message_id("badjson"),
        )
        .await
        .unwrap();
    s.transport
        .publish(
            &dest,
            Message::new("garbage")
                .with_content_encoding("gzip")
                .with_message_id("corrupt"),
        )
        .await
        .unwrap();

    // 1 ok + 2 flaky + 3 down + 1 invalid + 3 panic + 2 slow + 1 badjson + 1 corrupt
    let st = handled(&w, "orders", 14).await;
    // a duplicate of "ok", after it was handled
    let mut dup = order("ok", "fine");
    root.inject(&mut dup.headers);
    publisher.publish(&dest, dup).await.unwrap();
    let st2 = handled(&w, "orders", 15).await;
    w.shutdown().await.unwrap();
    assert_eq!(st.handled, 14);
    assert_eq!(
        (st2.acked, st2.requeued, st2.rejected),
        (15, 0, 0),
        "every outcome is settled by an ack"
    );

    // dead letters: retry inside dead-letter gives the final kinds and counts
    let dead = drain(&s.transport, "dead").await;
    let by_id: HashMap<_, _> = dead
        .iter()
        .map(|m| (m.properties.message_id.clone().unwrap(), m.headers.clone()))
        .collect();
    assert_eq!(by_id.len(), 5, "{:?}", by_id.keys());
    let kind = |id: &str| by_id[id].get_str(ERROR_KIND).unwrap().to_owned();
    let retries = |id: &str| by_id[id].get_i64(RETRY_COUNT).unwrap();
    assert_eq!((kind("down").as_str(), retries("down")), ("transient", 2));
    assert_eq!((kind("panic").as_str(), retries("panic")), ("panic", 2));
    assert_eq!((kind("invalid").as_str(), retries("invalid")), ("permanent", 0));
    assert_eq!((kind("badjson").as_str(), retries("badjson")), ("decode", 0));
    assert_eq!(kind("corrupt"), "decode");
    assert!(by_id["corrupt"].get_str(ERROR).unwrap().contains("corrupt gzip body"));
    assert!(by_id["panic"].get_str(ERROR).unwrap().contains("handler bug"));
    for h in by_id.values() {
        assert_eq!(h.get_str(ORIGINAL_EXCHANGE), Some("shop"));
        assert_eq!(h.get_str(ORIGINAL_ROUTING_KEY), Some("order.created"));
        assert_eq!(h.get_str(ORIGINAL_QUEUE), Some("orders"));
    }
    let dl_body = &dead
        .iter()
        .find(|m| m.properties.message_id.as_deref() == Some("down"))
        .unwrap();
    assert_eq!(
        dl_body.properties.content_encoding.as_deref(),
        Some("gzip"),
        "dead letters keep the wire body"
    );

    // decompression before decoding, correlation and one trace across the hop
    let events = drain(&s.transport, "events").await;
    assert_eq!(
        events.len(),
        3,
        "ok, flaky (2nd try), slow (2nd try); not the duplicate"
    );
    let ok_event = events
        .iter()
        .find(|m| m.properties.correlation_id.as_deref() == Some("chain-1"))
        .expect("the ok order's correlation id carried to its event");
    assert_eq!(
        TraceContext::extract(&ok_event.headers).unwrap().trace_id,
        root.trace_id
    );
    assert_eq!(&ok_event.body[..], br#"{"handled":"ok"}"#);

    // tracing outermost: spans record the outcome the Worker acted on
    assert_eq!(spans.outcomes("invalid"), ["dead_letter"]);
    assert_eq!(spans.outcomes("flaky"), ["retry", "ack"]);
    assert_eq!(spans.outcomes("down"), ["retry", "retry", "dead_letter"]);
    assert_eq!(spans.outcomes("slow"), ["retry", "ack"]);
    assert_eq!(spans.outcomes("ok"), ["ack", "ack"], "the duplicate is acked");

    // metrics outermost too
    let snap: Vec<CounterRow> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(k, _, _, v)| match v {
            DebugValue::Counter(n) => Some((
                k.key().name().to_owned(),
                k.key()
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect(),
                n,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(handled_counter(&snap, "ack"), 4);
    assert_eq!(handled_counter(&snap, "retry"), 6);
    assert_eq!(handled_counter(&snap, "dead_letter"), 5);
    let published: u64 = snap.iter().filter(|(n, _, _)| n == names::CONFIRMED).map(|x| x.2).sum();
    assert_eq!(
        published,
        6 + 1 + 3,
        "orders, duplicate and events through the publisher stack"
    );
    assert_eq!(health.state(), switchyard_middleware::CircuitState::Closed);
}
