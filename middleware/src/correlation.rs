//! Correlation: message and correlation ids on what is published, and the
//! correlation id of the message being handled carried to what its handler
//! publishes.
//!
//! One [`CorrelationLayer`] wraps both sides:
//!
//! - around a handler, it holds the correlation id of the delivery being
//!   handled (its `correlation_id`, or its `message_id` when it has none) in
//!   a task-local for the duration of the call ([`current`]);
//! - around a publisher ([`PublisherService`](crate::publish::PublisherService)),
//!   it sets a missing `message_id` to a new id and a missing
//!   `correlation_id` to the current one (inside a handler) or else to the
//!   message's own id, so a chain of messages shares one correlation id.
//!
//! The task-local is visible to the handler's own future; work the handler
//! spawns onto other tasks must carry the id itself (read [`current`] and
//! use [`scope`]).
//!
//! ```
//! use std::sync::Arc;
//! use switchyard_core::{handler_fn, Destination, Envelope, Message, Publisher};
//! use switchyard_middleware::correlation::{self, CorrelationLayer};
//! use switchyard_middleware::publish::{PublisherService, ServicePublisher};
//! use tower::ServiceBuilder;
//!
//! fn wire(transport: Arc<dyn Publisher>) {
//!     let publisher: Arc<dyn Publisher> = Arc::new(ServicePublisher::new(
//!         ServiceBuilder::new().layer(CorrelationLayer::new()).service(PublisherService::new(transport)),
//!     ));
//!     let _handler = switchyard_core::handler::boxed(ServiceBuilder::new().layer(CorrelationLayer::new()).service(handler_fn(
//!         move |_env: Envelope| {
//!             let publisher = publisher.clone();
//!             async move {
//!                 let _current = correlation::current(); // Some(id of the handled message)
//!                 // carries the handled message's correlation id
//!                 publisher.publish(&Destination::queue("next"), Message::new("step 2")).await
//!             }
//!         },
//!     )));
//! }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use switchyard_core::message::new_id;
use switchyard_core::{Envelope, HandlerError, Outcome};
use tokio::task::futures::TaskLocalFuture;
use tower::{Layer, Service};

use crate::publish::PublishRequest;

/// What the task-local holds: the handled delivery (its id is read only
/// when something is published), or an id set by [`scope`].
#[derive(Clone, Debug)]
pub enum Current {
    /// The delivery being handled.
    Delivery(Envelope),
    /// An explicit id.
    Id(Option<Arc<str>>),
}

impl Current {
    fn id(&self) -> Option<Arc<str>> {
        match self {
            Current::Delivery(env) => env.correlation_id().or_else(|| env.message_id()).map(Arc::from),
            Current::Id(id) => id.clone(),
        }
    }
}

tokio::task_local! {
    static CURRENT: Current;
}

/// The correlation id of the message being handled by the current task (its
/// `correlation_id`, or its `message_id` when it has none), if a
/// [`Correlation`] service is handling one.
pub fn current() -> Option<Arc<str>> {
    CURRENT.try_with(Current::id).ok().flatten()
}

/// Runs `fut` with `id` as the current correlation id (for work a handler
/// moves to another task).
pub fn scope<F: Future>(id: Option<Arc<str>>, fut: F) -> TaskLocalFuture<Current, F> {
    CURRENT.scope(Current::Id(id), fut)
}

/// Sets ids on published messages and propagates the handled message's
/// correlation id; see the [module docs](self).
#[derive(Debug, Clone, Copy, Default)]
pub struct CorrelationLayer {
    _priv: (),
}

impl CorrelationLayer {
    /// The layer.
    pub fn new() -> Self {
        CorrelationLayer { _priv: () }
    }
}

impl<S> Layer<S> for CorrelationLayer {
    type Service = Correlation<S>;
    fn layer(&self, inner: S) -> Correlation<S> {
        Correlation { inner }
    }
}

/// The service of [`CorrelationLayer`].
#[derive(Debug, Clone)]
pub struct Correlation<S> {
    inner: S,
}

impl<S> Service<Envelope> for Correlation<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = TaskLocalFuture<Current, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        CURRENT.scope(Current::Delivery(env.clone()), self.inner.call(env))
    }
}

impl<S> Service<PublishRequest> for Correlation<S>
where
    S: Service<PublishRequest>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: PublishRequest) -> S::Future {
        let p = &mut req.message.properties;
        if p.message_id.is_none() {
            p.message_id = Some(new_id());
        }
        if p.correlation_id.is_none() {
            p.correlation_id = match current() {
                Some(c) => Some(c.to_string()),
                None => p.message_id.clone(),
            };
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::tests::Recorder;
    use crate::publish::{PublisherService, ServicePublisher};
    use switchyard_core::{handler_fn, Destination, Message, Publisher};
    use tower::{ServiceBuilder, ServiceExt};

    #[tokio::test]
    async fn ids_are_set_when_missing_and_kept_when_present() {
        let rec = Arc::new(Recorder::default());
        let p = ServicePublisher::new(CorrelationLayer::new().layer(PublisherService::new(rec.clone())));
        p.publish(&Destination::queue("q"), Message::new("a")).await.unwrap();
        p.publish(
            &Destination::queue("q"),
            Message::new("b").with_message_id("m-1").with_correlation_id("c-1"),
        )
        .await
        .unwrap();
        let sent = rec.sent.lock();
        let a = &sent[0].1.properties;
        assert_eq!(a.message_id.as_ref().map(String::len), Some(32));
        assert_eq!(
            a.correlation_id, a.message_id,
            "a new chain is correlated by its first message id"
        );
        assert_eq!(sent[1].1.properties.message_id.as_deref(), Some("m-1"));
        assert_eq!(sent[1].1.properties.correlation_id.as_deref(), Some("c-1"));
    }

    #[tokio::test]
    async fn handled_correlation_id_propagates_to_publishes() {
        let rec = Arc::new(Recorder::default());
        let p: Arc<dyn Publisher> = Arc::new(ServicePublisher::new(
            CorrelationLayer::new().layer(PublisherService::new(rec.clone())),
        ));
        let h = ServiceBuilder::new()
            .layer(CorrelationLayer::new())
            .service(handler_fn(move |_e: Envelope| {
                let p = p.clone();
                async move {
                    assert_eq!(current().as_deref(), Some("corr-7"));
                    p.publish(&Destination::queue("next"), Message::new("x")).await
                }
            }));
        let env = Envelope::for_test(Message::new("in").with_correlation_id("corr-7"), "q");
        assert_eq!(h.oneshot(env).await.unwrap(), Outcome::Ack);
        assert_eq!(current(), None, "the id does not leak out of the call");
        let sent = rec.sent.lock();
        assert_eq!(sent[0].1.properties.correlation_id.as_deref(), Some("corr-7"));
        assert!(sent[0].1.properties.message_id.is_some());
    }
}
