//! Timeout: a handler that takes longer than its limit fails with
//! [`FailureKind::Timeout`](switchyard_core::FailureKind::Timeout), which
//! the Worker treats as transient (requeue) and the retry layer retries.
//!
//! The handler's future is dropped at the limit, so whatever it was awaiting
//! is cancelled.
//!
//! ```
//! use std::time::Duration;
//! use switchyard_core::{handler_fn, Envelope};
//! use switchyard_middleware::timeout::TimeoutLayer;
//! use tower::ServiceBuilder;
//!
//! let _svc = switchyard_core::handler::boxed(ServiceBuilder::new()
//!     .layer(TimeoutLayer::new(Duration::from_secs(30)))
//!     .service(handler_fn(|_env: Envelope| async {})));
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;
use switchyard_core::{Envelope, HandlerError, Outcome};
use tower::{Layer, Service};

/// Fails handler calls that exceed `limit`; see the [module docs](self).
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    /// A limit of `limit` per call.
    pub fn new(limit: Duration) -> Self {
        TimeoutLayer { limit }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            limit: self.limit,
        }
    }
}

/// The service of [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    limit: Duration,
}

impl<S> Timeout<S> {
    /// The limit.
    pub fn limit(&self) -> Duration {
        self.limit
    }
}

pin_project! {
    /// The future of [`Timeout`].
    ///
    /// The timer is only registered if the handler does not finish on its
    /// first poll, so fast handlers pay one clock read.
    pub struct TimeoutFuture<F> {
        #[pin]
        inner: F,
        deadline: tokio::time::Instant,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        limit: Duration,
    }
}

impl<F> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<Outcome, HandlerError>>,
{
    type Output = Result<Outcome, HandlerError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(out);
        }
        let deadline = *this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(HandlerError::timeout(format!(
                "handler did not finish within {:?}",
                this.limit
            )))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S> Service<Envelope> for Timeout<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        TimeoutFuture {
            deadline: tokio::time::Instant::now() + self.limit,
            inner: self.inner.call(env),
            sleep: None,
            limit: self.limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_core::{handler_fn, FailureKind, Message};
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn slow_handler_times_out_as_transient_and_fast_one_passes() {
        let slow = TimeoutLayer::new(Duration::from_millis(50)).layer(handler_fn(|_e: Envelope| async {
            tokio::time::sleep(Duration::from_secs(5)).await;
        }));
        let e = slow
            .oneshot(Envelope::for_test(Message::new("x"), "q"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), FailureKind::Timeout);
        assert!(e.kind().is_retryable());
        assert!(e.message().contains("50ms"));
        let fast = TimeoutLayer::new(Duration::from_millis(50)).layer(handler_fn(|_e: Envelope| async {}));
        assert_eq!(
            fast.oneshot(Envelope::for_test(Message::new("x"), "q")).await.unwrap(),
            Outcome::Ack
        );
    }
}
