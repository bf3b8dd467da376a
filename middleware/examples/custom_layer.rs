//! Writing your own layer: `RequireHeaderLayer` rejects (dead-letters)
//! messages that lack a required header, without calling the handler.
//!
//! Run: `cargo run -p switchyard-middleware --example custom_layer`
//!
//! The shape is tower's: a `Layer` that wraps a service, a `Service` whose
//! `poll_ready` delegates to the inner one, and a future (here
//! `futures_util::future::Either`, so no allocation). A layer that needs to
//! await something of its own (a publish, a store) returns a boxed future
//! instead and keeps `Clone + Send + 'static` on the inner service.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{ready, Either, Ready};
use switchyard_core::headers::{ERROR, ERROR_KIND};
use switchyard_core::worker::Worker;
use switchyard_core::{
    handler_fn, Binding, ConsumeOptions, Destination, Envelope, ExchangeSpec, HandlerError, Message, Outcome,
    QueueSpec, Transport,
};
use switchyard_middleware::prelude::*;
use tower::{Layer, Service, ServiceBuilder};

/// Rejects deliveries without the header `name` as permanent failures.
#[derive(Clone, Debug)]
pub struct RequireHeaderLayer {
    name: Arc<str>,
}

impl RequireHeaderLayer {
    /// Requires the header `name`.
    pub fn new(name: &str) -> Self {
        RequireHeaderLayer { name: Arc::from(name) }
    }
}

impl<S> Layer<S> for RequireHeaderLayer {
    type Service = RequireHeader<S>;
    fn layer(&self, inner: S) -> RequireHeader<S> {
        RequireHeader {
            inner,
            name: self.name.clone(),
        }
    }
}

/// The service of [`RequireHeaderLayer`].
#[derive(Clone, Debug)]
pub struct RequireHeader<S> {
    inner: S,
    name: Arc<str>,
}

impl<S> Service<Envelope> for RequireHeader<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = Either<Ready<Result<Outcome, HandlerError>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        if env.headers().contains_key(&self.name) {
            Either::Right(self.inner.call(env))
        } else {
            let err = HandlerError::reject(format!("missing required header '{}'", self.name));
            Either::Left(ready(Err(err)))
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let transport: Arc<dyn Transport> = switchyard_memory::MemoryTransport::new();
    transport.declare_exchange(&ExchangeSpec::fanout("app.dlx")).await?;
    transport.declare_queue(&QueueSpec::new("dead_letter")).await?;
    transport.bind(&Binding::queue("dead_letter", "app.dlx", "")).await?;
    transport.declare_queue(&QueueSpec::new("events")).await?;

    // your layer composes with the built-in ones like any tower layer
    let handler = ServiceBuilder::new()
        .layer(DeadLetterLayer::new(transport.clone(), "app.dlx").routing_key("dead_letter"))
        .layer(RequireHeaderLayer::new("tenant"))
        .service(handler_fn(|env: Envelope| async move {
            println!(
                "handled {:?} for tenant {}",
                String::from_utf8_lossy(env.body()),
                env.headers().get_str("tenant").unwrap_or("?")
            );
        }));
    let worker = Worker::new(transport.clone()).route("events", handler).start().await?;

    let dest = Destination::queue("events");
    transport
        .publish(&dest, Message::new("signup").with_header("tenant", "acme"))
        .await?;
    transport.publish(&dest, Message::new("orphan event")).await?;
    while worker.stats("events").map_or(0, |s| s.acked) < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown().await?;

    let mut dead = transport.consume("dead_letter", ConsumeOptions::default()).await?;
    let d = tokio::time::timeout(Duration::from_secs(1), dead.next())
        .await?
        .ok_or("no dead letter")??;
    println!(
        "dead-lettered {:?}: {} ({})",
        String::from_utf8_lossy(&d.message.body),
        d.message.headers.get_str(ERROR).unwrap_or("?"),
        d.message.headers.get_str(ERROR_KIND).unwrap_or("?")
    );
    d.ack().await?;
    Ok(())
}
