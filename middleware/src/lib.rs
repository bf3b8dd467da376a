//! # switchyard-middleware
//!
//! [tower] layers for switchyard handlers (a `tower::Service<Envelope>`) and
//! publishers (through the [`publish`] bridge). Each layer is a small module
//! in tower's own shape — `XLayer`, `X<S>`, its future and its policy — and
//! composes with [`tower::ServiceBuilder`]:
//!
//! | module | consume side | publish side |
//! |---|---|---|
//! | [`retry`] | in-process or broker-delayed retries per failure kind | — |
//! | [`dead_letter`] | publishes final failures to a DLX with reason headers; [`dead_letter::replay`] | — |
//! | [`metrics`](mod@metrics) | handled counter, handling-time histogram, in-flight gauge | published / confirmed / failed counters |
//! | [`compression`] | decompresses by `content_encoding`, bounded | gzip / zstd above a threshold |
//! | [`trace`] | a span per delivery, W3C `traceparent` extracted | `traceparent` / `tracestate` injected (OpenTelemetry propagators with the `opentelemetry` feature) |
//! | [`timeout`] | a slow handler fails as `timeout` (transient) | — |
//! | [`circuit_breaker`] | fail fast (requeue) while the handler keeps failing | — |
//! | [`dedup`] | idempotent consumption by message id or a key | — |
//! | [`catch_panic`] | a panic becomes a `panic` failure | — |
//! | [`correlation`] | the handled message's correlation id is current while the handler runs | sets `message_id` / `correlation_id` |
//! | [`limit`] | tower's concurrency and rate limits, re-exported | — |
//!
//! Order matters. The recommended stack, outermost first:
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_core::{handler_fn, Destination, Envelope, HandlerError, Publisher};
//! use switchyard_middleware::prelude::*;
//! use tower::ServiceBuilder;
//!
//! fn stack(publisher: Arc<dyn Publisher>) {
//!     let handler = handler_fn(|env: Envelope| async move {
//!         if env.body().is_empty() { Err(HandlerError::reject("empty body")) } else { Ok(()) }
//!     });
//!     let _service = switchyard_core::handler::boxed(ServiceBuilder::new()
//!         .layer(TraceLayer::new())                      // outermost: the span sees the final outcome
//!         .layer(MetricsLayer::new())                    // counts what the Worker will do
//!         .layer(DeadLetterLayer::new(publisher, "app.dlx").routing_key("dead_letter")) // final failures -> DLX, ack
//!         .layer(RetryLayer::in_process(RetryPolicy::exponential(4, Duration::from_millis(50))))
//!         .layer(CatchPanicLayer::new())                 // panics become retryable failures
//!         .layer(TimeoutLayer::new(Duration::from_secs(30)))
//!         .layer(DecompressionLayer::new())              // before the handler decodes the body
//!         .layer(CorrelationLayer::new())
//!         .service(handler));
//! }
//! ```
//!
//! Publishers are not tower services; [`publish::PublisherService`] and
//! [`publish::ServicePublisher`] bridge them so that the same layers wrap
//! both sides.
#![warn(missing_docs)]

pub mod catch_panic;
pub mod circuit_breaker;
pub mod compression;
pub mod correlation;
pub mod dead_letter;
pub mod dedup;
pub mod metrics;
pub mod publish;
pub mod retry;
pub mod timeout;
pub mod trace;
mod util;

/// tower's concurrency and rate limits, re-exported (not rewritten), and
/// [`limit::shared`] to share one limited service among the clones the Worker
/// makes.
///
/// [`ConcurrencyLimitLayer`](limit::ConcurrencyLimitLayer) bounds how many
/// deliveries a handler works on at once (its clones share the semaphore).
/// [`RateLimitLayer`](limit::RateLimitLayer) admits at most `n` calls per
/// period; a `RateLimit` is not `Clone`, so wrap it with [`limit::shared`]
/// (tower's `Buffer`), which gives one rate for all deliveries. Both work
/// through `poll_ready`: the Worker waits for readiness before taking the
/// next delivery, so the limits are real backpressure (messages stay in the
/// broker).
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::{handler_fn, Envelope};
/// use switchyard_middleware::limit::{self, ConcurrencyLimitLayer, RateLimitLayer};
/// use tower::ServiceBuilder;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // at most 100 deliveries per second, at most 8 at once (Buffer needs a tokio runtime)
/// let rate_limited = limit::shared(
///     ServiceBuilder::new()
///         .layer(RateLimitLayer::new(100, Duration::from_secs(1)))
///         .service(handler_fn(|_env: Envelope| async {})),
///     1024,
/// );
/// let _svc = switchyard_core::handler::boxed(
///     ServiceBuilder::new().layer(ConcurrencyLimitLayer::new(8)).service(rate_limited),
/// );
/// # }
/// ```
pub mod limit {
    use switchyard_core::handler::BoxHandler;
    use switchyard_core::{Envelope, HandlerError, Outcome};
    use tower::{BoxError, Service, ServiceExt};

    pub use tower::limit::*;

    /// Shares one service among all clones of a handler: tower's `Buffer`
    /// (queue of `bound` requests) in front of `service`, errors mapped back
    /// to [`HandlerError`] (a closed buffer is a transient failure). Must be
    /// called inside a tokio runtime (the buffer spawns its worker task).
    pub fn shared<S>(service: S, bound: usize) -> BoxHandler
    where
        S: Service<Envelope, Response = Outcome, Error = HandlerError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let buffered = tower::buffer::Buffer::new(service, bound.max(1));
        switchyard_core::handler::boxed(buffered.map_err(|e: BoxError| match e.downcast::<HandlerError>() {
            Ok(h) => *h,
            Err(other) => HandlerError::retry(format!("shared handler unavailable: {other}")),
        }))
    }
}

pub use catch_panic::{CatchPanic, CatchPanicLayer};
pub use circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerHandle, CircuitBreakerLayer, CircuitState,
};
pub use compression::{Compression, CompressionLayer, DecompressionLayer, Encoding};
pub use correlation::{Correlation, CorrelationLayer};
pub use dead_letter::{DeadLetter, DeadLetterLayer};
pub use dedup::{Dedup, DedupLayer, DedupStore, MemoryDedupStore, Reservation};
pub use metrics::{Metrics, MetricsLayer};
pub use publish::{PublishRequest, PublisherService, ServicePublisher};
pub use retry::{Backoff, Retry, RetryLayer, RetryPolicy};
pub use timeout::{Timeout, TimeoutLayer};
pub use trace::{Trace, TraceContext, TraceLayer};

/// Everything needed to build a stack: `use switchyard_middleware::prelude::*;`.
pub mod prelude {
    pub use crate::catch_panic::CatchPanicLayer;
    pub use crate::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
    pub use crate::compression::{CompressionLayer, DecompressionLayer, Encoding};
    pub use crate::correlation::CorrelationLayer;
    pub use crate::dead_letter::DeadLetterLayer;
    pub use crate::dedup::{DedupLayer, MemoryDedupStore};
    pub use crate::metrics::MetricsLayer;
    pub use crate::publish::{PublishRequest, PublisherService, ServicePublisher};
    pub use crate::retry::{Backoff, RetryLayer, RetryPolicy};
    pub use crate::timeout::TimeoutLayer;
    pub use crate::trace::TraceLayer;
}
