//! Metrics through the [`metrics`](::metrics) facade, so any exporter
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
//! let _svc = ServiceBuilder::new()
//!     .layer(MetricsLayer::new())
//!     .service(handler_fn(|_env: Envelope| async {}));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

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

/// Records handling and publishing metrics; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsLayer {
    _priv: (),
}

impl MetricsLayer {
    /// The layer.
    pub fn new() -> Self {
        MetricsLayer { _priv: () }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics { inner }
    }
}

/// The service of [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct Metrics<S> {
    inner: S,
}

/// The `outcome` label of a handler result.
pub fn outcome_label(result: &Result<Outcome, HandlerError>) -> &'static str {
    match result {
        Ok(o) => o.label(),
        Err(e) => e.kind().as_str(),
    }
}

struct InFlight {
    queue: Arc<str>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        ::metrics::gauge!(names::IN_FLIGHT, "queue" => self.queue.clone()).decrement(1.0);
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

/// Decrements the in-flight gauge when the handling ends or is dropped.
pub struct InFlightGuard(Option<InFlight>);

impl<F> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Outcome, HandlerError>>,
{
    type Output = Result<Outcome, HandlerError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Some(g) = this.guard.0.take() {
            let elapsed = this.start.elapsed().as_secs_f64();
            ::metrics::histogram!(names::HANDLING_SECONDS, "queue" => g.queue.clone()).record(elapsed);
            ::metrics::counter!(names::HANDLED, "queue" => g.queue.clone(), "outcome" => outcome_label(&out))
                .increment(1);
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
        let queue = env.info().queue.clone();
        ::metrics::gauge!(names::IN_FLIGHT, "queue" => queue.clone()).increment(1.0);
        let guard = InFlightGuard(Some(InFlight { queue }));
        MetricsFuture {
            start: Instant::now(),
            inner: self.inner.call(env),
            guard,
        }
    }
}

pin_project! {
    /// The future of [`Metrics`] around a publisher.
    pub struct PublishMetricsFuture<F> {
        #[pin]
        inner: F,
        exchange: Arc<str>,
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
            Ok(_) => ::metrics::counter!(names::CONFIRMED, "exchange" => this.exchange.clone()).increment(1),
            Err(e) => ::metrics::counter!(names::FAILED, "exchange" => this.exchange.clone(), "code" => e.code())
                .increment(1),
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
        let exchange: Arc<str> = if req.destination.exchange().is_empty() {
            Arc::from("(default)")
        } else {
            req.destination.exchange_arc().clone()
        };
        ::metrics::counter!(names::PUBLISHED, "exchange" => exchange.clone()).increment(1);
        PublishMetricsFuture {
            inner: self.inner.call(req),
            exchange,
        }
    }
}
