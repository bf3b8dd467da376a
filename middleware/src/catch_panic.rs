//! Panic recovery: a handler that panics fails with
//! [`FailureKind::Panic`](switchyard_core::FailureKind::Panic) instead of
//! taking its task down; the Worker keeps running.
//!
//! Panics are caught both while the handler's future is created (`call`)
//! and while it is polled. Without a retry layer the Worker requeues a
//! panicked delivery once and dead-letters it if it panics again; with
//! [`RetryLayer`](crate::retry::RetryLayer) outside this layer, panics are
//! retried by its policy. Place this layer *inside* retry and dead-letter
//! so they see the failure.
//!
//! ```
//! use switchyard_core::{handler_fn, Envelope};
//! use switchyard_middleware::catch_panic::CatchPanicLayer;
//! use tower::ServiceBuilder;
//!
//! let _svc = switchyard_core::handler::boxed(ServiceBuilder::new()
//!     .layer(CatchPanicLayer::new())
//!     .service(handler_fn(|_env: Envelope| async {})));
//! ```

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::future::CatchUnwind;
use futures_util::FutureExt;
use pin_project_lite::pin_project;
use switchyard_core::{Envelope, HandlerError, Outcome};
use tower::Service;

use crate::util::stateless_layer;

stateless_layer!(
    /// Turns handler panics into `panic` failures; see the [module docs](self).
    CatchPanicLayer =>
    /// The service of [`CatchPanicLayer`].
    CatchPanic
);

/// The panic message of a caught panic payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "handler panicked (non-string payload)".to_owned()
    }
}

fn to_error(payload: Box<dyn Any + Send>) -> HandlerError {
    let msg = panic_message(&*payload);
    tracing::error!(panic = %msg, "handler panicked");
    HandlerError::panic(format!("handler panicked: {msg}"))
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Running { #[pin] inner: CatchUnwind<AssertUnwindSafe<F>> },
        Panicked { error: Option<HandlerError> },
    }
}

pin_project! {
    /// The future of [`CatchPanic`].
    pub struct CatchPanicFuture<F> {
        #[pin]
        state: State<F>,
    }
}

impl<F> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<Outcome, HandlerError>>,
{
    type Output = Result<Outcome, HandlerError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Running { inner } => match std::task::ready!(inner.poll(cx)) {
                Ok(out) => Poll::Ready(out),
                Err(payload) => Poll::Ready(Err(to_error(payload))),
            },
            StateProj::Panicked { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| HandlerError::panic("handler panicked")))),
        }
    }
}

impl<S> Service<Envelope> for CatchPanic<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(env))) {
            Ok(fut) => CatchPanicFuture {
                state: State::Running {
                    inner: AssertUnwindSafe(fut).catch_unwind(),
                },
            },
            Err(payload) => CatchPanicFuture {
                state: State::Panicked {
                    error: Some(to_error(payload)),
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;
    use switchyard_core::{handler_fn, FailureKind, Message};
    use tower::{Layer, ServiceExt};

    #[derive(Clone)]
    struct PanicsInCall;
    impl Service<Envelope> for PanicsInCall {
        type Response = Outcome;
        type Error = HandlerError;
        type Future = std::future::Ready<Result<Outcome, HandlerError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: Envelope) -> Self::Future {
            panic!("boom in call")
        }
    }

    #[tokio::test]
    async fn panics_become_panic_failures() {
        let env = || Envelope::for_test(Message::new("x"), "q");
        let h = CatchPanicLayer::new().layer(handler_fn(|_e: Envelope| async {
            if true {
                panic!("boom {}", 42);
            }
        }));
        let e = h.clone().oneshot(env()).await.unwrap_err();
        assert_eq!(e.kind(), FailureKind::Panic);
        assert!(e.message().contains("boom 42"), "{}", e.message());
        let e = CatchPanicLayer::new()
            .layer(PanicsInCall)
            .oneshot(env())
            .await
            .unwrap_err();
        assert!(e.message().contains("boom in call"));
        let ok = CatchPanicLayer::new().layer(handler_fn(|_e: Envelope| async {}));
        assert_eq!(ok.oneshot(env()).await.unwrap(), Outcome::Ack);
    }
}
