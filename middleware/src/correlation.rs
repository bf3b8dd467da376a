//! Correlation: message and correlation ids on what is published, and the
//! correlation id of the message being handled carried to what its handler
//! publishes.
//!
//! One [`CorrelationLayer`] wraps both sides:
//!
//! - around a handler, it makes the correlation id of the delivery being
//!   handled (its `correlation_id`, or its `message_id` when it has none)
//!   current while the handler runs ([`current`]);
//! - around a publisher ([`PublisherService`](crate::publish::PublisherService)),
//!   it sets a missing `message_id` to a new id and a missing
//!   `correlation_id` to the current one (inside a handler) or else to the
//!   message's own id, so a chain of messages shares one correlation id.
//!
//! The id is visible to the handler's own future (it is set around each
//! poll); work the handler spawns onto other tasks must carry it itself
//! (read [`current`] and use [`scope`]).
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

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use switchyard_core::message::new_id;
use switchyard_core::{Envelope, HandlerError, Outcome};
use tower::Service;

use crate::publish::PublishRequest;
use crate::util::{edit_publish_requests, enter_ambient, read_ambient, stateless_layer};

/// What is current while a handler runs: the handled delivery (its id is
/// read only when something is published), or an id set by [`scope`].
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

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

/// The correlation id of the message being handled (its `correlation_id`,
/// or its `message_id` when it has none), if a [`Correlation`] service is
/// handling one: it is current while the handler's future is polled.
pub fn current() -> Option<Arc<str>> {
    read_ambient(&CURRENT, Current::id)
}

pin_project! {
    /// A future polled with a correlation id (or delivery) as the current
    /// one: the future of [`Correlation`] and of [`scope`].
    pub struct Scoped<F> {
        #[pin]
        inner: F,
        current: Option<Current>,
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _restore = enter_ambient(&CURRENT, this.current);
        this.inner.poll(cx)
    }
}

/// Runs `fut` with `id` as the current correlation id (for work a handler
/// moves to another task: `tokio::spawn(correlation::scope(correlation::current(), work))`).
pub fn scope<F: Future>(id: Option<Arc<str>>, fut: F) -> Scoped<F> {
    Scoped {
        inner: fut,
        current: Some(Current::Id(id)),
    }
}

stateless_layer!(
    /// Sets ids on published messages and propagates the handled message's
    /// correlation id; see the [module docs](self).
    CorrelationLayer =>
    /// The service of [`CorrelationLayer`].
    Correlation
);

impl<S> Service<Envelope> for Correlation<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = Scoped<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        // current during `call` too (a handler_fn closure runs there)
        let mut slot = Some(Current::Delivery(env.clone()));
        let inner = {
            let _restore = enter_ambient(&CURRENT, &mut slot);
            self.inner.call(env)
        };
        Scoped { inner, current: slot }
    }
}

/// Gives a published message a message id and a correlation id (the current
/// one, else its own message id) unless it has them.
fn set_ids(req: &mut PublishRequest) {
    let p = &mut req.message.properties;
    if p.message_id.is_none() {
        p.message_id = Some(new_id().into());
    }
    if p.correlation_id.is_none() {
        p.correlation_id = match current() {
            Some(c) => Some(c),
            None => p.message_id.clone(),
        };
    }
}

edit_publish_requests!(Correlation, set_ids);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::tests::Recorder;
    use crate::publish::{PublisherService, ServicePublisher};
    use switchyard_core::{handler_fn, Destination, Message, Publisher};
    use tower::{Layer, ServiceBuilder, ServiceExt};

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
        assert_eq!(a.message_id.as_deref().map(str::len), Some(32));
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
