//! Metrics through the [`metrics`] facade, so any exporter
//! (Prometheus, StatsD, OpenTelemetry…) records them.
//!
//! Around a handler, [`Metrics`] records:
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `switchyard_messages_handled_total` | counter | `queue`, `outcome` |
//! | `switchyard_message_handling_seconds` | histogram | `queue` |
//! | `switchyard_messages_in_flight` | gauge | `queue` |
//!
//! `outcome` is what the Worker will do: `ack`, `reply`, `retry`,
//! `dead_letter`, or the failure kind (`transient` and `timeout` are
//! requeued, `permanent` and `decode` rejected, `panic` requeued once).
//!
//! Around a publisher ([`PublisherService`](crate::publish::PublisherService)):
//!
//! | name | kind | labels |
//! |---|---|---|
//! | `switchyard_messages_published_total` | counter | `exchange` |
//! | `switchyard_publish_confirmed_total` | counter | `exchange` |
//! | `switchyard_publish_failed_total` | counter | `exchange`, `code` |
//!
//! (`code` is the stable [`Error::code`](switchyard_core::Error::code); the
//! default exchange is labelled `(default)`.) Put the layer outside retry
//! and dead-letter so the counters see their outcomes; see
//! `examples/prometheus.rs` for an exporter.
//!
//! ```
//! use switchyard_core::{handler_fn, Envelope};
//! use switchyard_middleware::metrics::MetricsLayer;
//! use tower::ServiceBuilder;
//!
//! let _svc = switchyard_core::handler::boxed(ServiceBuilder::new()
//!     .layer(MetricsLayer::new())
//!     .service(handler_fn(|_env: Envelope| async {})));
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use ::metrics::{Counter, Gauge, Histogram};
use parking_lot::RwLock;
use pin_project_lite::pin_project;
use switchyard_core::{Envelope, Error, HandlerError, Outcome};
use tower::{Layer, Service};

use crate::publish::PublishRequest;

/// Metric names.
pub mod names {
    /// Counter of handled deliveries, by `queue` and `outcome`.
    pub const HANDLED: &str = "switchyard_messages_handled_total";
    /// Histogram of handling time in seconds, by `queue`.
    pub const HANDLING_SECONDS: &str = "switchyard_message_handling_seconds";
    /// Gauge of deliveries being handled, by `queue`.
    pub const IN_FLIGHT: &str = "switchyard_messages_in_flight";
    /// Counter of publishes attempted, by `exchange`.
    pub const PUBLISHED: &str = "switchyard_messages_published_total";
    /// Counter of publishes confirmed, by `exchange`.
    pub const CONFIRMED: &str = "switchyard_publish_confirmed_total";
    /// Counter of publishes failed, by `exchange` and `code`.
    pub const FAILED: &str = "switchyard_publish_failed_total";
}

/// Metric handles registered once per queue (or exchange) and label set,
/// so the hot path does no key building or allocation.
#[derive(Default)]
struct Cache {
    queues: RwLock<HashMap<Arc<str>, Arc<QueueHandles>>>,
    exchanges: RwLock<HashMap<Arc<str>, Arc<ExchangeHandles>>>,
}

const OUTCOMES: [&str; 9] = [
    "ack",
    "reply",
    "retry",
    "dead_letter",
    "transient",
    "permanent",
    "decode",
    "panic",
    "timeout",
];

struct QueueHandles {
    queue: Arc<str>,
    in_flight: Gauge,
    seconds: Histogram,
    outcomes: [OnceLock<Counter>; 9],
}

impl QueueHandles {
    fn outcome(&self, label: &'static str) -> Counter {
        match OUTCOMES.iter().position(|o| *o == label) {
            Some(i) => self.outcomes[i]
                .get_or_init(|| ::metrics::counter!(names::HANDLED, "queue" => self.queue.clone(), "outcome" => label))
                .clone(),
            None => ::metrics::counter!(names::HANDLED, "queue" => self.queue.clone(), "outcome" => label),
        }
    }
}

struct ExchangeHandles {
    exchange: Arc<str>,
    published: Counter,
    confirmed: Counter,
}

fn cached<V>(map: &RwLock<HashMap<Arc<str>, Arc<V>>>, key: &Arc<str>, make: impl FnOnce() -> V) -> Arc<V> {
    if let Some(h) = map.read().get(key) {
        return h.clone();
    }
    map.write()
        .entry(key.clone())
        .or_insert_with(|| Arc::new(make()))
        .clone()
}

/// The `exchange` label: the name, or `(default)` for the default exchange.
fn label(exchange: &Arc<str>) -> Arc<str> {
    if exchange.is_empty() {
        Arc::from("(default)")
    } else {
        exchange.clone()
    }
}

impl Cache {
    fn queue(&self, queue: &Arc<str>) -> Arc<QueueHandles> {
        cached(&self.queues, queue, || QueueHandles {
            queue: queue.clone(),
            in_flight: ::metrics::gauge!(names::IN_FLIGHT, "queue" => queue.clone()),
            seconds: ::metrics::histogram!(names::HANDLING_SECONDS, "queue" => queue.clone()),
            outcomes: Default::default(),
        })
    }

    fn exchange(&self, exchange: &Arc<str>) -> Arc<ExchangeHandles> {
        cached(&self.exchanges, exchange, || ExchangeHandles {
            exchange: label(exchange),
            published: ::metrics::counter!(names::PUBLISHED, "exchange" => label(exchange)),
            confirmed: ::metrics::counter!(names::CONFIRMED, "exchange" => label(exchange)),
        })
    }
}

/// Records handling and publishing metrics; see the [module docs](self).
///
/// Metric handles are registered with the recorder installed when a queue
/// (or exchange) is first seen and then reused, so install the recorder
/// (exporter) before the first message is handled.
#[derive(Clone, Default)]
pub struct MetricsLayer {
    cache: Arc<Cache>,
}

impl std::fmt::Debug for MetricsLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsLayer")
    }
}

impl MetricsLayer {
    /// The layer.
    pub fn new() -> Self {
        Self::default()
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            cache: self.cache.clone(),
            last: None,
        }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Clone)]
pub struct Metrics<S> {
    inner: S,
    cache: Arc<Cache>,
    /// The handles of the last queue seen (a service usually serves one).
    last: Option<Arc<QueueHandles>>,
}

impl<S: std::fmt::Debug> std::fmt::Debug for Metrics<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("inner", &self.inner).finish()
    }
}

/// The `outcome` label of a handler result.
pub fn outcome_label(result: &Result<Outcome, HandlerError>) -> &'static str {
    match result {
        Ok(o) => o.label(),
        Err(e) => e.kind().as_str(),
    }
}

/// Decrements the in-flight gauge when the handling ends or is dropped.
pub struct InFlightGuard(Option<Arc<QueueHandles>>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.in_flight.decrement(1.0);
        }
    }
}

pin_project! {
    /// The future of [`Metrics`] around a handler.
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        start: Instant,
        guard: InFlightGuard,
    }
}

impl<F> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Outcome, HandlerError>>,
{
    type Output = Result<Outcome, HandlerError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Some(h) = this.guard.0.take() {
            h.seconds.record(this.start.elapsed().as_secs_f64());
            h.outcome(outcome_label(&out)).increment(1);
            h.in_flight.decrement(1.0);
        }
        Poll::Ready(out)
    }
}

impl<S> Service<Envelope> for Metrics<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        let queue = &env.info().queue;
        let h = match &self.last {
            Some(h) if *h.queue == **queue => h.clone(),
            _ => {
                let h = self.cache.queue(queue);
                self.last = Some(h.clone());
                h
            }
        };
        h.in_flight.increment(1.0);
        MetricsFuture {
            start: Instant::now(),
            inner: self.inner.call(env),
            guard: InFlightGuard(Some(h)),
        }
    }
}

pin_project! {
    /// The future of [`Metrics`] around a publisher.
    pub struct PublishMetricsFuture<F> {
        #[pin]
        inner: F,
        handles: Arc<ExchangeHandles>,
    }
}

impl<F, R> Future for PublishMetricsFuture<F>
where
    F: Future<Output = Result<R, Error>>,
{
    type Output = Result<R, Error>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        match &out {
            Ok(_) => this.handles.confirmed.increment(1),
            Err(e) => {
                ::metrics::counter!(names::FAILED, "exchange" => this.handles.exchange.clone(), "code" => e.code())
                    .increment(1)
            }
        }
        Poll::Ready(out)
    }
}

impl<S> Service<PublishRequest> for Metrics<S>
where
    S: Service<PublishRequest, Error = Error>,
{
    type Response = S::Response;
    type Error = Error;
    type Future = PublishMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: PublishRequest) -> Self::Future {
        let handles = self.cache.exchange(req.destination.exchange_arc());
        handles.published.increment(1);
        PublishMetricsFuture {
            inner: self.inner.call(req),
            handles,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::tests::Recorder;
    use crate::publish::{PublisherService, ServicePublisher};
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    use switchyard_core::{handler_fn, Destination, Message, Publisher};
    use tower::ServiceExt;

    fn value<'a>(snap: &'a [(String, Vec<String>, DebugValue)], name: &str, label: &str) -> Option<&'a DebugValue> {
        snap.iter()
            .find(|(n, l, _)| n == name && l.iter().any(|x| x == label))
            .map(|(_, _, v)| v)
    }

    #[tokio::test]
    async fn in_flight_counts_the_running_handler() {
        let recorder = DebuggingRecorder::new();
        let inside = recorder.snapshotter();
        let _guard = ::metrics::set_default_local_recorder(&recorder);
        let h = MetricsLayer::new().layer(handler_fn(move |_e: Envelope| {
            let in_flight = inside
                .snapshot()
                .into_vec()
                .into_iter()
                .find_map(|(k, _, _, v)| match v {
                    DebugValue::Gauge(g) if k.key().name() == names::IN_FLIGHT => Some(g.0),
                    _ => None,
                });
            async move { assert_eq!(in_flight, Some(1.0), "in flight while the handler runs") }
        }));
        // (the debugging recorder's snapshot resets the gauge to 0, so the decrement shows as -1)
        h.oneshot(Envelope::for_test(Message::new("x"), "q")).await.unwrap();
        let after = recorder
            .snapshotter()
            .snapshot()
            .into_vec()
            .into_iter()
            .find_map(|(k, _, _, v)| match v {
                DebugValue::Gauge(g) if k.key().name() == names::IN_FLIGHT => Some(g.0),
                _ => None,
            });
        assert_eq!(after, Some(-1.0), "decremented when the handling ended");
    }

    #[tokio::test]
    async fn records_handling_and_publishing() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let _guard = ::metrics::set_default_local_recorder(&recorder);
        let layer = MetricsLayer::new();
        let h = layer.layer(handler_fn(move |e: Envelope| async move {
            if e.body().is_empty() {
                Err(HandlerError::decode("empty"))
            } else {
                Ok(())
            }
        }));
        for body in ["a", "b", ""] {
            let _ = h
                .clone()
                .oneshot(Envelope::for_test(Message::new(body), "orders"))
                .await;
        }
        let rec = Arc::new(Recorder::default());
        let p = ServicePublisher::new(layer.layer(PublisherService::new(rec.clone())));
        p.publish(&Destination::new("shop", "x"), Message::new("m"))
            .await
            .unwrap();
        rec.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        p.publish(&Destination::queue("q"), Message::new("m"))
            .await
            .unwrap_err();

        let snap: Vec<(String, Vec<String>, DebugValue)> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(k, _, _, v)| {
                let labels = k.key().labels().map(|l| format!("{}={}", l.key(), l.value())).collect();
                (k.key().name().to_owned(), labels, v)
            })
            .collect();
        assert_eq!(
            value(&snap, names::HANDLED, "outcome=ack"),
            Some(&DebugValue::Counter(2))
        );
        assert_eq!(
            value(&snap, names::HANDLED, "outcome=decode"),
            Some(&DebugValue::Counter(1))
        );
        assert!(matches!(value(&snap, names::IN_FLIGHT, "queue=orders"), Some(DebugValue::Gauge(g)) if g.0 == 0.0));
        match value(&snap, names::HANDLING_SECONDS, "queue=orders") {
            Some(DebugValue::Histogram(v)) => assert_eq!(v.len(), 3),
            other => panic!("histogram missing: {other:?}"),
        }
        assert_eq!(
            value(&snap, names::PUBLISHED, "exchange=shop"),
            Some(&DebugValue::Counter(1))
        );
        assert_eq!(
            value(&snap, names::CONFIRMED, "exchange=shop"),
            Some(&DebugValue::Counter(1))
        );
        assert_eq!(
            value(&snap, names::PUBLISHED, "exchange=(default)"),
            Some(&DebugValue::Counter(1))
        );
        assert_eq!(
            value(&snap, names::FAILED, "code=transport_error"),
            Some(&DebugValue::Counter(1))
        );
    }
}
