//! The publisher bridge: publishers as tower services, so that the same
//! layers wrap both sides.
//!
//! [`Publisher`] is an object-safe async trait, not a tower `Service`.
//! [`PublisherService`] turns an `Arc<dyn Publisher>` into a
//! `Service<PublishRequest>`; layers wrap it; [`ServicePublisher`] turns the
//! wrapped service back into a [`Publisher`] that application code (and the
//! Worker, for replies) uses as usual.
//!
//! ```
//! use std::sync::Arc;
//! use switchyard_core::{Destination, Message, Publisher};
//! use switchyard_middleware::prelude::*;
//! use tower::ServiceBuilder;
//!
//! async fn demo(transport: Arc<dyn Publisher>) -> switchyard_core::Result<()> {
//!     let publisher = ServicePublisher::new(
//!         ServiceBuilder::new()
//!             .layer(CorrelationLayer::new())
//!             .layer(TraceLayer::new())
//!             .layer(MetricsLayer::new())
//!             .layer(CompressionLayer::gzip().threshold(1024))
//!             .service(PublisherService::new(transport)),
//!     );
//!     publisher.publish(&Destination::queue("orders"), Message::new("hello")).await
//! }
//! ```

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use switchyard_core::{Destination, Error, Message, PublishOptions, Publisher, Result};
use tower::{Service, ServiceExt};

use crate::util::BoxFuture;

/// One publish: where, what, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct PublishRequest {
    /// Exchange and routing key.
    pub destination: Destination,
    /// The message.
    pub message: Message,
    /// Per-publish options (mandatory).
    pub options: PublishOptions,
}

impl PublishRequest {
    /// A request with default options.
    pub fn new(destination: Destination, message: Message) -> Self {
        PublishRequest {
            destination,
            message,
            options: PublishOptions::default(),
        }
    }
}

/// A [`Publisher`] as a `tower::Service<PublishRequest>`: the innermost
/// service of a publisher stack. Its response is `()` once the publish is
/// confirmed (when confirms are enabled), its error the transport's.
#[derive(Clone)]
pub struct PublisherService {
    inner: Arc<dyn Publisher>,
}

impl fmt::Debug for PublisherService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PublisherService")
    }
}

impl PublisherService {
    /// Wraps a publisher (a transport, or any `Arc<dyn Publisher>`).
    pub fn new(publisher: Arc<dyn Publisher>) -> Self {
        PublisherService { inner: publisher }
    }

    /// The wrapped publisher.
    pub fn publisher(&self) -> &Arc<dyn Publisher> {
        &self.inner
    }
}

impl Service<PublishRequest> for PublisherService {
    type Response = ();
    type Error = Error;
    type Future = BoxFuture<Result<()>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: PublishRequest) -> Self::Future {
        let p = self.inner.clone();
        Box::pin(async move { p.publish_with(&req.destination, req.message, req.options).await })
    }
}

/// Any `Service<PublishRequest, Response = (), Error = Error>` (a layered
/// [`PublisherService`]) as a [`Publisher`].
///
/// Each publish clones the service, waits for readiness and calls it, so a
/// `ServicePublisher` is shared freely (`Arc<dyn Publisher>`).
#[derive(Clone, Debug)]
pub struct ServicePublisher<S> {
    inner: S,
}

impl<S> ServicePublisher<S> {
    /// Wraps a publish service.
    pub fn new(service: S) -> Self {
        ServicePublisher { inner: service }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// This publisher behind an `Arc<dyn Publisher>`.
    pub fn into_dyn(self) -> Arc<dyn Publisher>
    where
        Self: Publisher + 'static,
    {
        Arc::new(self)
    }
}

#[async_trait]
impl<S> Publisher for ServicePublisher<S>
where
    S: Service<PublishRequest, Response = (), Error = Error> + Clone + Send + Sync + 'static,
    S::Future: Send + 'static,
{
    async fn publish_with(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<()> {
        let req = PublishRequest {
            destination: dest.clone(),
            message,
            options,
        };
        self.inner.clone().oneshot(req).await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// A publisher that records what it was given (and can be told to fail).
    #[derive(Default)]
    pub(crate) struct Recorder {
        pub(crate) sent: Mutex<Vec<(Destination, Message)>>,
        pub(crate) fail: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Publisher for Recorder {
        async fn publish_with(&self, dest: &Destination, message: Message, _o: PublishOptions) -> Result<()> {
            if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(Error::transport("recorder told to fail"));
            }
            self.sent.lock().push((dest.clone(), message));
            Ok(())
        }
    }

    #[tokio::test]
    async fn bridge_round_trips_a_publish() {
        let rec = Arc::new(Recorder::default());
        let p = ServicePublisher::new(PublisherService::new(rec.clone())).into_dyn();
        p.publish(&Destination::new("ex", "rk"), Message::new("x"))
            .await
            .unwrap();
        let sent = rec.sent.lock();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].0, Destination::new("ex", "rk"));
        assert_eq!(&sent[0].1.body[..], b"x");
    }
}
