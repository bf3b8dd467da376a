//! The handler runtime: binds handlers to queues and settles deliveries.
//!
//! A [`Worker`] owns one consumer per routed queue. Each consumer
//!
//! 1. waits for a concurrency permit and for the handler's readiness
//!    (`tower::Service::poll_ready`) **before** taking the next delivery, so a
//!    slow or overloaded handler holds messages in the broker, not in memory;
//! 2. splits the delivery into an [`Envelope`] (what the handler sees) and a
//!    [`Settler`] (kept by the Worker), and runs the handler: its first poll
//!    happens on the consumer's loop, and a handler that finishes there with
//!    `Ok` and an ack the transport settles at once costs no task; anything
//!    else goes on on a task of its own (a handler whose first polls are slow
//!    sends the following deliveries straight to tasks, so CPU-bound
//!    handlers run in parallel), and
//! 3. settles from the handler's result:
//!
//! | handler result | what the Worker does |
//! |---|---|
//! | `Ok(Ack)`, `Ok(Retried)`, `Ok(DeadLettered)` | ack |
//! | `Ok(Reply(m))`, request has `reply_to` | publish `m` (through [`Worker::reply_publisher`] if set, else the transport) to the default exchange with routing key `reply_to` and the request's correlation id, then ack; if that publish fails: nack with requeue |
//! | `Ok(Reply(m))`, no `reply_to` | ack (the reply is dropped, logged at debug) |
//! | `Err` of kind `Transient` or `Timeout` | nack with requeue |
//! | `Err` of kind `Permanent` or `Decode` | reject without requeue (dead-letters if the queue has a DLX) |
//! | panic, or `Err` of kind `Panic` | first panic of this message: nack with requeue; second: reject without requeue (counted by the quorum queue's `x-delivery-count` when present, else by the route's memory of panicked messages — not by `redelivered`, which any requeue sets) |
//! | auto-ack route | nothing to settle; failures are logged and counted |
//!
//! The panic rule gives a panicking message exactly one more chance and then
//! dead-letters it, so a poison message cannot spin forever. A transient
//! error without the retry layer requeues at once and *can* spin: put the
//! retry layer (with its delay and limit) in front of handlers that may fail
//! transiently, or use a quorum queue's `delivery_limit` as a backstop.
//!
//! **Graceful shutdown** ([`WorkerHandle::stop`], [`WorkerHandle::shutdown`],
//! or the signal/future given to [`Worker::run`] / [`Worker::run_until`])
//! cancels the subscription (no new deliveries), nacks with requeue the
//! deliveries already received but not started, and lets in-flight handlers
//! finish within the shutdown timeout (30 s by default). Handlers still
//! running at the deadline are dropped and their deliveries nacked with
//! requeue. Nothing is left unsettled.
//!
//! Logs go through `tracing` with the queue, delivery tag, outcome and error
//! kind — never the body.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_core::worker::{RouteConfig, Worker};
//! use switchyard_core::{handler_fn, HandlerError, Json, Transport};
//!
//! #[derive(serde::Deserialize)]
//! struct Job { id: u64 }
//!
//! async fn serve(transport: Arc<dyn Transport>) -> switchyard_core::Result<()> {
//!     let jobs = handler_fn(|Json(job): Json<Job>| async move {
//!         if job.id == 0 {
//!             return Err(HandlerError::reject("job 0 does not exist"));
//!         }
//!         Ok(())
//!     });
//!     Worker::new(transport)
//!         .route_with("jobs", jobs, RouteConfig::default().prefetch(20).concurrency(4))
//!         .shutdown_timeout(Duration::from_secs(10))
//!         .run() // until SIGINT / SIGTERM, then graceful shutdown
//!         .await
//! }
//! ```

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceExt};
use tracing::Instrument;

pub use batch::{
    batch_fn, BatchConfig, BatchFn, BatchHandler, BatchOutcome, BoxBatchHandler, FromBatch, IntoBatchOutcome,
};

use crate::envelope::{headers, Envelope, Extensions};
use crate::error::{Error, Result};
use crate::handler::{boxed, BoxHandler, FailureKind, Handler, HandlerError, Outbox, Outcome};
use crate::settings::{Settings, DEFAULT_PREFETCH};
use crate::topology::Destination;
use crate::transport::{ConsumeOptions, Delivery, DeliveryInfo, Publisher, Settler, Subscription, Transport};
use progress::{Inline, Progress, INLINE_YIELD_EVERY};
use slots::{Slot, Slots};

mod batch;
#[cfg(test)]
pub(crate) mod fake;
mod progress;
mod slots;
#[cfg(test)]
mod tests;

/// The default graceful-shutdown deadline.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// How long, after the handlers are done, a stopping consumer keeps reading
/// its cancelled subscription to requeue deliveries still in flight.
const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// The part of the shutdown timeout kept for the final ack flush.
const CLOSE_GRACE: Duration = Duration::from_millis(200);

/// How long aborted handlers get to nack their deliveries after the deadline.
const ABORT_GRACE: Duration = Duration::from_secs(5);
/// Back-to-back deliveries between two readings of a delivery's arrival time.
const STAMP_EVERY: u32 = 8;

/// How one queue is consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Broker prefetch (most unacknowledged deliveries); 0 = unlimited on
    /// the memory transport, the default prefetch on the RabbitMQ
    /// transports (see [`ConsumeOptions`]).
    /// Default: 10 (the settings' default prefetch count).
    pub prefetch: u16,
    /// Most handlers running at once for this queue. `None`: equal to the
    /// prefetch (10 when the prefetch is unlimited).
    pub concurrency: Option<usize>,
    /// Auto-ack consumer: the broker forgets each message when it sends it;
    /// the Worker settles nothing and a failure loses the message.
    pub auto_ack: bool,
    /// Exclusive consumer.
    pub exclusive: bool,
    /// Consumer tag; generated by the transport when empty.
    pub consumer_tag: String,
    /// Consumer priority (`x-priority`, see [`ConsumeOptions::priority`]).
    pub priority: Option<i32>,
    /// Where the route starts reading a stream queue (`x-stream-offset`).
    pub stream_offset: Option<crate::transport::StreamOffset>,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            prefetch: DEFAULT_PREFETCH,
            concurrency: None,
            auto_ack: false,
            exclusive: false,
            consumer_tag: String::new(),
            priority: None,
            stream_offset: None,
        }
    }
}

impl RouteConfig {
    /// Sets the prefetch.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }
    /// Sets the concurrency bound (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = Some(n.max(1));
        self
    }
    /// Sets auto-ack mode.
    pub fn auto_ack(mut self, yes: bool) -> Self {
        self.auto_ack = yes;
        self
    }
    /// Sets exclusivity.
    pub fn exclusive(mut self, yes: bool) -> Self {
        self.exclusive = yes;
        self
    }
    /// Sets the consumer tag.
    pub fn consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = tag.into();
        self
    }
    /// Sets the consumer priority (`x-priority`).
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = Some(priority);
        self
    }
    /// Sets where the route starts reading a stream queue.
    pub fn stream_offset(mut self, offset: crate::transport::StreamOffset) -> Self {
        self.stream_offset = Some(offset);
        self
    }
    /// The effective concurrency bound.
    pub fn effective_concurrency(&self) -> usize {
        match self.concurrency {
            Some(n) => n.max(1),
            None if self.prefetch == 0 => DEFAULT_PREFETCH as usize,
            None => self.prefetch as usize,
        }
    }
}

/// Counters of one route, as read by [`WorkerHandle::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteStats {
    /// Deliveries whose handler finished (with any result, panics included).
    pub handled: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries nacked with requeue (transient failures, first panics,
    /// failed replies, and deliveries requeued by a shutdown).
    pub requeued: u64,
    /// Deliveries rejected without requeue (dead-lettered when the queue has a DLX).
    pub rejected: u64,
    /// Replies published.
    pub replied: u64,
    /// Messages published from [`Outcome::Publish`] outboxes.
    pub published: u64,
    /// Handler failures (errors and panics), auto-ack routes included.
    pub failed: u64,
    /// Handler panics caught.
    pub panicked: u64,
    /// Settlements (ack/nack/reject) or reply publishes that failed.
    pub settle_failed: u64,
    /// Handlers running now.
    pub in_flight: u64,
    /// The most handlers that ran at once.
    pub max_in_flight: u64,
}

#[derive(Default)]
struct Counters {
    handled: AtomicU64,
    acked: AtomicU64,
    requeued: AtomicU64,
    rejected: AtomicU64,
    replied: AtomicU64,
    published: AtomicU64,
    failed: AtomicU64,
    panicked: AtomicU64,
    settle_failed: AtomicU64,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Counters {
    fn snapshot(&self) -> RouteStats {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RouteStats {
            handled: r(&self.handled),
            acked: r(&self.acked),
            requeued: r(&self.requeued),
            rejected: r(&self.rejected),
            replied: r(&self.replied),
            published: r(&self.published),
            failed: r(&self.failed),
            panicked: r(&self.panicked),
            settle_failed: r(&self.settle_failed),
            in_flight: r(&self.in_flight),
            max_in_flight: r(&self.max_in_flight),
        }
    }
}

/// The state of one consumer, as read by [`WorkerHandle::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumerStatus {
    /// Consuming.
    Running,
    /// Stop requested; finishing in-flight handlers.
    Stopping,
    /// Stopped after a stop or shutdown request.
    Stopped,
    /// Ended by an error (e.g. `consumer_cancelled` when the queue was deleted).
    Failed {
        /// The error's stable code.
        code: &'static str,
        /// The error's message.
        message: String,
    },
}

struct Route {
    queue: String,
    handler: RouteHandler,
    config: RouteConfig,
}

/// What a route runs: one handler call per delivery, or batches.
enum RouteHandler {
    Single(BoxHandler),
    Batch(BoxBatchHandler, BatchConfig),
}

/// A layer applied by [`Worker::layer`] to every single-message route.
type BoxLayerFn = Arc<dyn Fn(BoxHandler) -> BoxHandler + Send + Sync>;

/// Attaches the Worker's state to every envelope (the outermost wrapper).
#[derive(Clone)]
struct AttachState {
    inner: BoxHandler,
    state: Extensions,
}

impl Service<Envelope> for AttachState {
    type Response = Outcome;
    type Error = HandlerError;
    type Future = <BoxHandler as Service<Envelope>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        self.inner.call(env.with_base_extensions(&self.state))
    }
}

/// Binds handlers to queues; see the [module docs](self).
pub struct Worker {
    transport: Arc<dyn Transport>,
    routes: Vec<Route>,
    shutdown_timeout: Duration,
    default_prefetch: u16,
    reply_publisher: Option<Arc<dyn Publisher>>,
    layers: Vec<BoxLayerFn>,
    state: Extensions,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("transport", &self.transport.name())
            .field(
                "queues",
                &self.routes.iter().map(|r| r.queue.as_str()).collect::<Vec<_>>(),
            )
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("custom_reply_publisher", &self.reply_publisher.is_some())
            .finish()
    }
}

impl Worker {
    /// A Worker on `transport` with no routes, prefetch 10 and a 30 s
    /// shutdown timeout.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Worker {
            transport,
            routes: Vec::new(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            default_prefetch: DEFAULT_PREFETCH,
            reply_publisher: None,
            layers: Vec::new(),
            state: Extensions::new(),
        }
    }

    /// Gives `state` to every route's handlers, for the
    /// [`State`](crate::handler::State) extractor (also visible to the
    /// layers, including those of [`layer`](Worker::layer)). Call it once per
    /// state type; state given to one handler
    /// ([`HandlerFn::with_state`](crate::handler::HandlerFn::with_state))
    /// shadows the Worker's of the same type.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use switchyard_core::handler::{handler_fn, State};
    /// use switchyard_core::worker::Worker;
    /// # fn demo(transport: Arc<dyn switchyard_core::Transport>) {
    /// struct App { greeting: String }
    /// let worker = Worker::new(transport)
    ///     .with_state(Arc::new(App { greeting: "hi".into() }))
    ///     .route("greetings", handler_fn(|State(app): State<Arc<App>>| async move {
    ///         println!("{}", app.greeting);
    ///     }));
    /// # let _ = worker; }
    /// ```
    pub fn with_state<T: Send + Sync + 'static>(mut self, state: T) -> Self {
        self.state = self.state.with(state);
        self
    }

    /// Wraps every single-message route's handler — routes added before and
    /// after this call — in `layer` (a tower layer, e.g. a `ServiceBuilder`
    /// stack), outside the route's own layers. Later calls wrap earlier
    /// ones (the last layer added is the outermost), as in axum's
    /// `Router::layer`. Batch routes are not wrapped (their handlers are not
    /// `Service<Envelope>`).
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchyard_core::handler::handler_fn;
    /// use switchyard_core::worker::Worker;
    /// # fn demo(transport: std::sync::Arc<dyn switchyard_core::Transport>, shared: impl tower::Layer<switchyard_core::handler::BoxHandler, Service = switchyard_core::handler::BoxHandler> + Send + Sync + 'static) {
    /// let worker = Worker::new(transport)
    ///     .layer(shared) // e.g. ServiceBuilder::new().layer(retry).layer(dead_letter) from switchyard-middleware
    ///     .route("a", handler_fn(|| async {}))
    ///     .route("b", handler_fn(|| async {}));
    /// # let _ = worker; }
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: tower::Layer<BoxHandler> + Send + Sync + 'static,
        L::Service: Handler,
    {
        self.layers.push(Arc::new(move |h| boxed(layer.layer(h))));
        self
    }

    /// Routes `queue` to a batch handler: deliveries are collected until
    /// `config.size` are there or `config.max_wait` has passed since the
    /// first, then the handler gets them all, and only after it has finished
    /// is each delivery settled, from the [`BatchOutcome`] (per message or
    /// for the whole batch). The route's prefetch is at least the batch
    /// size ([`start`](Worker::start) refuses a smaller one); one batch runs
    /// at a time. See [`batch_fn`].
    pub fn batch_route<B: BatchHandler>(mut self, queue: impl Into<String>, handler: B, config: BatchConfig) -> Self {
        let route_config = RouteConfig {
            prefetch: config.effective_prefetch(),
            concurrency: Some(1),
            auto_ack: false,
            exclusive: config.exclusive,
            consumer_tag: config.consumer_tag.clone(),
            ..RouteConfig::default()
        };
        self.routes.push(Route {
            queue: queue.into(),
            handler: RouteHandler::Batch(BoxBatchHandler::new(handler), config),
            config: route_config,
        });
        self
    }

    /// Takes the default prefetch of later [`route`](Worker::route) calls
    /// from `settings` (`RABBITMQ_DEFAULT_PREFETCH_COUNT`, or unlimited when
    /// `RABBITMQ_ENABLE_CONSUMER_PREFETCH` is false).
    pub fn with_settings(mut self, settings: &Settings) -> Self {
        self.default_prefetch = settings.consumer_prefetch();
        self
    }

    /// Sets the default prefetch of later [`route`](Worker::route) calls.
    pub fn default_prefetch(mut self, n: u16) -> Self {
        self.default_prefetch = n;
        self
    }

    /// Routes `queue` to `handler` with the default prefetch and a
    /// concurrency equal to it.
    pub fn route<H: Handler>(self, queue: impl Into<String>, handler: H) -> Self {
        let config = RouteConfig::default().prefetch(self.default_prefetch);
        self.route_with(queue, handler, config)
    }

    /// Routes `queue` to `handler` with `config`. A queue can be routed
    /// once; [`start`](Worker::start) fails otherwise.
    pub fn route_with<H: Handler>(mut self, queue: impl Into<String>, handler: H, config: RouteConfig) -> Self {
        self.routes.push(Route {
            queue: queue.into(),
            handler: RouteHandler::Single(boxed(handler)),
            config,
        });
        self
    }

    /// Sets how long a graceful shutdown waits for in-flight handlers.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.shutdown_timeout = d;
        self
    }

    /// Publishes handler replies through `publisher` instead of straight
    /// through the transport. Pass a publisher stack built on the same
    /// transport (tracing, correlation, compression, metrics layers) so that
    /// replies get the same treatment as other published messages. Default:
    /// the transport itself.
    ///
    /// Replies go to the default exchange with the request's `reply_to` as
    /// routing key ([`Destination::queue`]) and carry its correlation id.
    /// The messages of [`Outcome::Publish`] outboxes go through it too.
    pub fn reply_publisher(mut self, publisher: Arc<dyn Publisher>) -> Self {
        self.reply_publisher = Some(publisher);
        self
    }

    /// Subscribes every route and starts consuming. Returns once every
    /// consumer is subscribed.
    ///
    /// Fails with `invalid_config` when the Worker has no routes or routes a
    /// queue twice. Every routed queue is checked
    /// ([`queue_info`](crate::transport::Admin::queue_info)) before any is
    /// consumed, so a missing queue fails with `queue_not_found` without
    /// taking a message from the others. Should a subscription still fail
    /// (e.g. the queue was deleted meanwhile), the consumers already
    /// subscribed are cancelled and their buffered deliveries requeued;
    /// deliveries of an auto-ack route cannot be requeued and are logged
    /// as lost.
    pub async fn start(self) -> Result<WorkerHandle> {
        let Worker {
            transport,
            routes,
            shutdown_timeout,
            reply_publisher,
            layers,
            state,
            ..
        } = self;
        if routes.is_empty() {
            return Err(Error::InvalidConfig {
                variable: "route".into(),
                value: String::new(),
                reason: "worker has no routes: add one with Worker::route before starting it".into(),
            });
        }
        // Handlers are not `Sync`: keep them out of every borrow held across
        // an await so that this future (and `run`) stays `Send`.
        let (specs, handlers): (Vec<(String, RouteConfig)>, Vec<RouteHandler>) = routes
            .into_iter()
            .map(|r| {
                let handler = match r.handler {
                    RouteHandler::Single(h) => {
                        let h = layers.iter().fold(h, |h, layer| layer(h));
                        let h = if state.is_empty() {
                            h
                        } else {
                            boxed(AttachState {
                                inner: h,
                                state: state.clone(),
                            })
                        };
                        RouteHandler::Single(h)
                    }
                    batch => batch,
                };
                ((r.queue, r.config), handler)
            })
            .unzip();
        for ((queue, config), handler) in specs.iter().zip(&handlers) {
            if let RouteHandler::Batch(_, batch) = handler {
                batch.check(queue, config.prefetch)?;
            }
        }
        let mut seen = HashSet::new();
        for (queue, _) in &specs {
            if !seen.insert(queue.as_str()) {
                return Err(Error::InvalidConfig {
                    variable: "route".into(),
                    value: queue.clone(),
                    reason: "a queue can be routed once; raise its concurrency instead".into(),
                });
            }
        }
        // Check every queue before consuming any: a later missing queue must
        // not make the earlier consumers take (auto-ack: lose) messages.
        for (queue, _) in &specs {
            match transport.queue_info(queue).await {
                Err(e @ Error::QueueNotFound { .. }) => {
                    tracing::error!(queue = %queue, code = e.code(), error = %e, "worker could not start");
                    return Err(e);
                }
                // Anything else is left to `consume` to report.
                Err(e) => tracing::debug!(queue = %queue, error = %e, "queue check failed; subscribing anyway"),
                Ok(_) => {}
            }
        }
        let mut subs = Vec::with_capacity(specs.len());
        for (queue, config) in &specs {
            let options = ConsumeOptions {
                prefetch: config.prefetch,
                auto_ack: config.auto_ack,
                exclusive: config.exclusive,
                consumer_tag: config.consumer_tag.clone(),
                priority: config.priority,
                stream_offset: config.stream_offset.clone(),
                arguments: Default::default(),
            };
            match transport.consume(queue, options).await {
                Ok(s) => subs.push(s),
                Err(e) => {
                    tracing::error!(queue = %queue, code = e.code(), error = %e, "worker could not subscribe");
                    for (s, (q, _)) in subs.into_iter().zip(&specs) {
                        cancel_and_requeue(q, s, Instant::now() + DRAIN_GRACE).await;
                    }
                    return Err(e);
                }
            }
        }
        let (finished_tx, _) = watch::channel(0u64);
        let finished_tx = Arc::new(finished_tx);
        let progress = Arc::new(Progress::default());
        let worker_state = state;
        let mut consumers = Vec::with_capacity(specs.len());
        for (((queue, config), handler), sub) in specs.into_iter().zip(handlers).zip(subs) {
            let state = Arc::new(ConsumerState {
                queue: queue.clone(),
                stop: CancellationToken::new(),
                done: CancellationToken::new(),
                result: Mutex::new(None),
                counters: Counters::default(),
                completed: AtomicU64::new(0),
                progress: progress.clone(),
                last_delivery: Mutex::new(None),
            });
            let cx = Arc::new(RouteCtx {
                panicked: Default::default(),
                queue,
                transport: transport.clone(),
                reply_publisher: reply_publisher.clone(),
                state: state.clone(),
                concurrency: config.effective_concurrency(),
                shutdown_timeout,
            });
            tracing::info!(queue = %cx.queue, prefetch = config.prefetch, concurrency = cx.concurrency,
                auto_ack = config.auto_ack, "worker consuming");
            let finished = finished_tx.clone();
            let batch_state = worker_state.clone();
            tokio::spawn(async move {
                let run: std::pin::Pin<Box<dyn Future<Output = Result<()>> + Send>> = match handler {
                    RouteHandler::Single(handler) => Box::pin(consume_loop(cx.clone(), sub, handler)),
                    RouteHandler::Batch(handler, config) => {
                        Box::pin(batch::batch_loop(cx.clone(), sub, handler, config, batch_state))
                    }
                };
                let result = match AssertUnwindSafe(run).catch_unwind().await {
                    Ok(r) => r,
                    Err(p) => Err(Error::transport(format!(
                        "worker consumer on queue '{}' panicked: {}",
                        cx.queue,
                        panic_message(&*p)
                    ))),
                };
                match &result {
                    Ok(()) => tracing::info!(queue = %cx.queue, "worker consumer stopped"),
                    Err(e) => tracing::error!(queue = %cx.queue, code = e.code(), error = %e, "worker consumer ended"),
                }
                *cx.state.result.lock() = Some(result);
                cx.state.done.cancel();
                finished.send_modify(|n| *n += 1);
            });
            consumers.push(state);
        }
        Ok(WorkerHandle {
            inner: Arc::new(HandleInner {
                consumers,
                finished_tx,
                progress,
                started: Instant::now(),
            }),
        })
    }

    /// Starts, then blocks until SIGINT or SIGTERM and shuts down gracefully
    /// (like the seed's `run_consumer`). Also returns, after shutting the
    /// others down, when a consumer ends with an error (e.g. its queue was
    /// deleted) — so a supervisor can restart the process — with that error.
    pub async fn run(self) -> Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Like [`run`](Worker::run) but stops when `signal` completes; pass
    /// `token.cancelled_owned()` for a `CancellationToken`.
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> Result<()> {
        let handle = self.start().await?;
        tokio::select! {
            _ = signal => {
                tracing::info!("worker shutdown requested");
                handle.shutdown().await
            }
            r = handle.first_failure() => {
                let _ = handle.shutdown().await;
                r
            }
        }
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await
        }
    };
    #[cfg(unix)]
    {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term => {}
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

struct ConsumerState {
    queue: String,
    stop: CancellationToken,
    done: CancellationToken,
    result: Mutex<Option<Result<()>>>,
    counters: Counters,
    /// Deliveries whose handling ended and whose settlement was attempted.
    completed: AtomicU64,
    /// Bumped (for every consumer of the Worker) when a handler starts or a
    /// delivery's handling ends; [`WorkerHandle::wait_handled`] and
    /// [`WorkerHandle::wait_idle`] wait on it.
    progress: Arc<Progress>,
    /// When the latest delivery arrived (`None`: none yet).
    last_delivery: Mutex<Option<Instant>>,
}

impl ConsumerState {
    /// Records that a delivery arrived now.
    fn delivered(&self) {
        self.delivered_at(Instant::now());
    }
    /// Records that a delivery arrived at `at`.
    fn delivered_at(&self, at: Instant) {
        *self.last_delivery.lock() = Some(at);
    }
    fn bump(&self) {
        self.progress.bump();
    }
    fn completed_one(&self, n: u64) {
        self.completed.fetch_add(n, Ordering::Relaxed);
        self.bump();
    }
}

impl ConsumerState {
    fn result_copy(&self) -> Result<()> {
        match &*self.result.lock() {
            Some(Err(e)) => Err(copy_error(e)),
            _ => Ok(()),
        }
    }
}

struct HandleInner {
    consumers: Vec<Arc<ConsumerState>>,
    finished_tx: Arc<watch::Sender<u64>>,
    progress: Arc<Progress>,
    /// When every consumer had subscribed.
    started: Instant,
}

/// Controls a started [`Worker`]: stop one consumer, stop all, wait, read
/// counters. Cheap to clone. Dropping it does not stop the consumers: call
/// [`shutdown`](WorkerHandle::shutdown).
#[derive(Clone)]
pub struct WorkerHandle {
    inner: Arc<HandleInner>,
}

impl fmt::Debug for WorkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerHandle").field("queues", &self.queues()).finish()
    }
}

impl WorkerHandle {
    fn consumer(&self, queue: &str) -> Result<&Arc<ConsumerState>> {
        self.inner
            .consumers
            .iter()
            .find(|c| c.queue == queue)
            .ok_or_else(|| Error::InvalidConfig {
                variable: "queue".into(),
                value: queue.into(),
                reason: "this worker has no route for it".into(),
            })
    }

    /// The routed queues.
    pub fn queues(&self) -> Vec<&str> {
        self.inner.consumers.iter().map(|c| c.queue.as_str()).collect()
    }

    /// Stops the consumer of `queue` gracefully and waits until it has
    /// stopped. Returns the error the consumer ended with, if it failed.
    pub async fn stop(&self, queue: &str) -> Result<()> {
        let c = self.consumer(queue)?;
        c.stop.cancel();
        c.done.cancelled().await;
        c.result_copy()
    }

    /// Stops every consumer gracefully and waits. Returns the first error a
    /// consumer ended with, if any failed.
    pub async fn shutdown(&self) -> Result<()> {
        for c in &self.inner.consumers {
            c.stop.cancel();
        }
        self.join().await
    }

    /// Waits until every consumer has ended (without stopping them).
    /// Returns the first error a consumer ended with, if any failed.
    pub async fn join(&self) -> Result<()> {
        for c in &self.inner.consumers {
            c.done.cancelled().await;
        }
        for c in &self.inner.consumers {
            c.result_copy()?;
        }
        Ok(())
    }

    /// Completes when a consumer fails (with its error) or when all have ended.
    async fn first_failure(&self) -> Result<()> {
        let mut rx = self.inner.finished_tx.subscribe();
        loop {
            for c in &self.inner.consumers {
                if c.done.is_cancelled() {
                    c.result_copy()?;
                }
            }
            if self.inner.consumers.iter().all(|c| c.done.is_cancelled()) {
                return Ok(());
            }
            if rx.changed().await.is_err() {
                return Ok(());
            }
        }
    }

    /// The state of the consumer of `queue` (`None` if not routed).
    pub fn status(&self, queue: &str) -> Option<ConsumerStatus> {
        let c = self.consumer(queue).ok()?;
        if !c.done.is_cancelled() {
            return Some(if c.stop.is_cancelled() {
                ConsumerStatus::Stopping
            } else {
                ConsumerStatus::Running
            });
        }
        Some(match &*c.result.lock() {
            Some(Err(e)) => ConsumerStatus::Failed {
                code: e.code(),
                message: e.to_string(),
            },
            _ => ConsumerStatus::Stopped,
        })
    }

    /// Waits until the route of `queue` has finished handling (and settled)
    /// at least `n` deliveries since the Worker started, and returns its
    /// counters; for tests and scripts, instead of polling
    /// [`stats`](WorkerHandle::stats). Fails with `timeout` (naming the
    /// queue and the count reached) after `timeout`, and with
    /// `invalid_config` if `queue` is not routed.
    ///
    /// ```
    /// # async fn demo(handle: switchyard_core::worker::WorkerHandle) -> switchyard_core::Result<()> {
    /// use std::time::Duration;
    /// let stats = handle.wait_handled("orders", 3, Duration::from_secs(5)).await?;
    /// assert!(stats.acked >= 3);
    /// handle.wait_idle(Duration::from_millis(50), Duration::from_secs(5)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn wait_handled(&self, queue: &str, n: u64, timeout: Duration) -> Result<RouteStats> {
        let c = self.consumer(queue)?;
        let progress = &self.inner.progress;
        let deadline = Instant::now() + timeout;
        loop {
            let seen = progress.seen();
            if c.completed.load(Ordering::Relaxed) >= n {
                return Ok(c.counters.snapshot());
            }
            if !progress.changed_since(seen, deadline).await {
                let done = c.completed.load(Ordering::Relaxed);
                if done >= n {
                    return Ok(c.counters.snapshot());
                }
                return Err(Error::Timeout {
                    operation: format!("waiting for {n} deliveries handled on queue '{queue}' ({done} so far)"),
                    timeout,
                });
            }
        }
    }

    /// Waits until no handler of this Worker is running and none has
    /// started or finished for `quiet` (the pipeline has drained, as far as
    /// this Worker can tell). Fails with `timeout` after `timeout`.
    pub async fn wait_idle(&self, quiet: Duration, timeout: Duration) -> Result<()> {
        let progress = &self.inner.progress;
        let deadline = Instant::now() + timeout;
        loop {
            let seen = progress.seen();
            let busy = self
                .inner
                .consumers
                .iter()
                .any(|c| c.counters.in_flight.load(Ordering::Relaxed) > 0);
            let quiet_until = Instant::now() + quiet;
            let until = if busy { deadline } else { quiet_until.min(deadline) };
            if progress.changed_since(seen, until).await {
                continue;
            }
            if !busy && Instant::now() >= quiet_until {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    operation: "waiting for the worker to be idle".into(),
                    timeout,
                });
            }
        }
    }

    /// The counters of the route of `queue` (`None` if not routed).
    pub fn stats(&self, queue: &str) -> Option<RouteStats> {
        self.consumer(queue).ok().map(|c| c.counters.snapshot())
    }

    /// Every route's status, counters and delivery times, in routing order.
    ///
    /// ```
    /// # fn demo(handle: switchyard_core::worker::WorkerHandle) {
    /// use std::time::Duration;
    /// for r in handle.routes() {
    ///     let stale = r.idle > Duration::from_secs(300);
    ///     println!("{}: {:?}, {} acked, stale: {stale}", r.queue, r.status, r.stats.acked);
    /// }
    /// # }
    /// ```
    pub fn routes(&self) -> Vec<RouteReport> {
        let now = Instant::now();
        self.inner
            .consumers
            .iter()
            .filter_map(|c| {
                let last = *c.last_delivery.lock();
                let last_delivery_age = last.map(|t| now.saturating_duration_since(t));
                Some(RouteReport {
                    queue: c.queue.clone(),
                    status: self.status(&c.queue)?,
                    stats: c.counters.snapshot(),
                    last_delivery_age,
                    idle: last_delivery_age.unwrap_or_else(|| now.saturating_duration_since(self.inner.started)),
                })
            })
            .collect()
    }

    /// How long ago the Worker started consuming.
    pub fn uptime(&self) -> Duration {
        Instant::now().saturating_duration_since(self.inner.started)
    }

    /// True while every route is consuming ([`ConsumerStatus::Running`]).
    pub fn is_running(&self) -> bool {
        self.inner
            .consumers
            .iter()
            .all(|c| !c.done.is_cancelled() && !c.stop.is_cancelled())
    }

    /// Every route's queue, status and counters, in routing order (for
    /// health checks and metrics).
    pub fn report(&self) -> Vec<(String, ConsumerStatus, RouteStats)> {
        self.inner
            .consumers
            .iter()
            .filter_map(|c| Some((c.queue.clone(), self.status(&c.queue)?, c.counters.snapshot())))
            .collect()
    }
}

/// One route as [`WorkerHandle::routes`] reports it: the facts a health
/// check or an ops endpoint needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteReport {
    /// The routed queue.
    pub queue: String,
    /// Its consumer's state.
    pub status: ConsumerStatus,
    /// Its counters.
    pub stats: RouteStats,
    /// How long ago the latest delivery arrived; `None` when none has.
    pub last_delivery_age: Option<Duration>,
    /// How long the route has gone without a delivery: since the latest
    /// one, or since the Worker started when none has arrived (the seed's
    /// consumer health check counts from start-up the same way).
    pub idle: Duration,
}

/// A copy of an error for a second reader (errors are not `Clone`): the
/// common consumer-ending errors keep their variant, others become
/// `transport_error` with the original text.
fn copy_error(e: &Error) -> Error {
    match e {
        Error::ConsumerCancelled { queue } => Error::ConsumerCancelled { queue: queue.clone() },
        Error::QueueNotFound { queue, .. } => Error::QueueNotFound {
            reply: None,
            queue: queue.clone(),
        },
        Error::ConnectionClosed { message, .. } => Error::ConnectionClosed {
            reply: None,
            message: message.clone(),
        },
        Error::Shutdown { what } => Error::Shutdown { what: what.clone() },
        other => Error::transport(other.to_string()),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

struct RouteCtx {
    /// Messages that panicked once in this route (see [`PanicMemory`]).
    panicked: parking_lot::Mutex<PanicMemory>,
    queue: String,
    transport: Arc<dyn Transport>,
    /// Publishes replies; `None`: the transport.
    reply_publisher: Option<Arc<dyn Publisher>>,
    state: Arc<ConsumerState>,
    concurrency: usize,
    shutdown_timeout: Duration,
}

impl RouteCtx {
    fn counters(&self) -> &Counters {
        &self.state.counters
    }
}

/// The consume loop of one route, then its graceful stop.
async fn consume_loop(cx: Arc<RouteCtx>, mut sub: Subscription, mut svc: BoxHandler) -> Result<()> {
    let stop = cx.state.stop.clone();
    let slots = Slots::new(cx.concurrency);
    // Shared by every delivery's handling (an `Arc` clone per delivery is
    // one atomic add; a token's own clone takes its tree's lock).
    let abort = Arc::new(CancellationToken::new());
    let mut tasks: JoinSet<()> = JoinSet::new();
    let mut stream_open = true;
    let mut inline = Inline::default();
    // Back-to-back deliveries since the arrival time was last recorded (the
    // first delivery is always recorded, waiting or not).
    let mut unstamped = STAMP_EVERY;

    let ended: Result<()> = loop {
        while let Some(r) = tasks.try_join_next() {
            log_task_join(&cx, r);
        }
        // Each step first tries without waiting: a `select!` with the stop
        // token registers and unregisters a waiter on every call, which the
        // common case (a permit free, the handler ready, a delivery
        // buffered) does not need.
        if stop.is_cancelled() {
            break Ok(());
        }
        let mut waited = false;
        let permit = match slots.try_take() {
            Some(p) => p,
            None => {
                waited = true;
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break Ok(()),
                    p = slots.take() => p,
                }
            }
        };
        let ready = match svc.ready().now_or_never() {
            Some(r) => r.map(|_| ()),
            None => {
                waited = true;
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break Ok(()),
                    r = svc.ready() => r.map(|_| ()),
                }
            }
        };
        if let Err(e) = ready {
            break Err(Error::transport(format!(
                "handler for queue '{}' failed its readiness check: {e}",
                cx.queue
            )));
        }
        let next = match sub.next().now_or_never() {
            Some(d) => d,
            None => {
                waited = true;
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break Ok(()),
                    d = sub.next() => d,
                }
            }
        };
        let delivery = match next {
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                stream_open = false;
                break Err(e);
            }
            None => {
                stream_open = false;
                break Err(Error::ConnectionClosed {
                    reply: None,
                    message: format!("the consumer stream of queue '{}' ended unexpectedly", cx.queue),
                });
            }
        };
        // The arrival time (for `RouteStatus::last_delivery_age`) is read
        // after any wait, and else once in STAMP_EVERY back-to-back
        // deliveries: a clock read and a lock per message cost about a tenth
        // of a trivial handler's dispatch. Between two reads the loop ran at
        // most STAMP_EVERY inline polls (a slow handler is sent to a task),
        // so the recorded time is at most that much early.
        if waited || unstamped >= STAMP_EVERY {
            cx.state.delivered();
            unstamped = 0;
        } else {
            unstamped += 1;
        }
        let mut handling = start(&cx, delivery, permit, &mut svc);
        if !inline.next_inline() {
            tasks.spawn(handling.into_task(&abort, None));
            continue;
        }
        // One inline poll in eight is timed (a clock read costs about as
        // much as the rest of a trivial handler's bookkeeping).
        let started = (inline.run % 8 == 0).then(std::time::Instant::now);
        // The handler's first poll, here: most finish on it, and an ack the
        // transport settles at once finishes the delivery without a task.
        let first = std::future::poll_fn(|ctx| std::task::Poll::Ready(handling.poll_first(ctx))).await;
        match first {
            // Waiting: the task polls it again, on its own.
            None => {
                tasks.spawn(handling.into_task(&abort, None));
            }
            Some(result) => {
                let acked = matches!(result, Ok(Outcome::Ack));
                let done = acked
                    && std::panic::catch_unwind(AssertUnwindSafe(|| handling.finish_acked_now())).unwrap_or_else(
                        |_| {
                            tracing::error!(queue = %cx.queue, "settling a delivery panicked");
                            true
                        },
                    );
                if !done {
                    if let Some(waiting) = poll_once(&cx, handling.into_task(&abort, Some(result))).await {
                        tasks.spawn(waiting);
                    }
                }
            }
        }
        if let Some(started) = started {
            inline.record(started.elapsed());
        }
        inline.run += 1;
        if inline.run >= INLINE_YIELD_EVERY {
            // Deliveries that are always ready must not starve the runtime.
            inline.run = 0;
            if inline.yield_due() {
                tokio::task::yield_now().await;
            }
        }
    };

    // Graceful stop: no new deliveries, requeue what was received but not
    // started, let in-flight handlers finish until the deadline.
    // The final ack flush (`close`) gets the last moments of the timeout.
    let close_by = Instant::now() + cx.shutdown_timeout;
    let deadline = close_by - CLOSE_GRACE.min(cx.shutdown_timeout / 4);
    if stream_open {
        // Bounded: a frozen connection must not hold the shutdown past its deadline.
        match tokio::time::timeout_at(deadline, sub.cancel_handle().cancel()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(queue = %cx.queue, error = %e, "cancelling the subscription failed"),
            Err(_) => {
                tracing::warn!(queue = %cx.queue, "cancelling the subscription did not finish before the shutdown deadline")
            }
        }
    }
    let mut drain_until: Option<Instant> = None;
    loop {
        if tasks.is_empty() {
            if !stream_open {
                break;
            }
            let until = *drain_until.get_or_insert_with(|| (Instant::now() + DRAIN_GRACE).min(deadline));
            if Instant::now() >= until {
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => break,
            _ = tokio::time::sleep_until(drain_until.unwrap_or(deadline)), if drain_until.is_some() => break,
            d = sub.next(), if stream_open => match d {
                Some(Ok(d)) => requeue_unstarted(&cx, d).await,
                Some(Err(e)) => {
                    tracing::debug!(queue = %cx.queue, error = %e, "consumer stream ended while stopping");
                    stream_open = false;
                }
                None => stream_open = false,
            },
            r = tasks.join_next(), if !tasks.is_empty() => {
                if let Some(r) = r {
                    log_task_join(&cx, r);
                }
            }
        }
    }
    if !tasks.is_empty() {
        tracing::warn!(queue = %cx.queue, in_flight = tasks.len(), timeout = ?cx.shutdown_timeout,
            "handlers still running at the shutdown deadline: aborting them and requeueing their deliveries");
        abort.cancel();
        let grace = tokio::time::timeout(ABORT_GRACE, async {
            while let Some(r) = tasks.join_next().await {
                log_task_join(&cx, r);
            }
        });
        if grace.await.is_err() {
            tracing::error!(queue = %cx.queue, left = tasks.len(),
                "aborted handlers could not settle in time; the transport requeues their deliveries on close");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
    }
    // Send the acks of the finished handlers and wait until they are
    // written, then let the transport requeue what is left — inside the
    // shutdown timeout.
    let until = close_by.max(Instant::now() + Duration::from_millis(20));
    match tokio::time::timeout_at(until, sub.close()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(queue = %cx.queue, error = %e, "closing the subscription failed"),
        Err(_) => tracing::warn!(queue = %cx.queue,
            "closing the subscription did not finish before the shutdown deadline; unacked messages are redelivered"),
    }
    ended
}

fn log_task_join(cx: &RouteCtx, r: std::result::Result<(), tokio::task::JoinError>) {
    if let Err(e) = r {
        if e.is_panic() {
            tracing::error!(queue = %cx.queue, "a worker task panicked while settling");
        }
    }
}

/// Requeues a delivery that arrived after the stop request.
async fn requeue_unstarted(cx: &RouteCtx, d: Delivery) {
    if !d.needs_settlement() {
        return;
    }
    let tag = d.info.delivery_tag;
    match d.nack(true).await {
        Ok(()) => {
            inc(&cx.counters().requeued);
            tracing::debug!(queue = %cx.queue, delivery_tag = tag, outcome = "requeued", "delivery not started before shutdown");
        }
        Err(e) => {
            inc(&cx.counters().settle_failed);
            tracing::warn!(queue = %cx.queue, delivery_tag = tag, error = %e, "requeue at shutdown failed");
        }
    }
}

/// Cancels a subscription that will not be used and requeues what it had
/// buffered. Auto-ack deliveries cannot be requeued: they are counted and
/// logged as lost.
async fn cancel_and_requeue(queue: &str, mut sub: Subscription, until: Instant) {
    let _ = sub.cancel_handle().cancel().await;
    let (mut requeued, mut lost) = (0u32, 0u32);
    while let Ok(Some(Ok(d))) = tokio::time::timeout_at(until, sub.next()).await {
        if !d.needs_settlement() {
            lost += 1;
        } else if d.nack(true).await.is_ok() {
            requeued += 1;
        } else {
            tracing::warn!(queue = %queue, "requeueing a buffered delivery failed; the broker requeues it on close");
        }
    }
    if lost > 0 {
        tracing::error!(queue = %queue, lost, requeued,
            "worker start failed: auto-ack deliveries already received were dropped (messages lost)");
    } else if requeued > 0 {
        tracing::info!(queue = %queue, requeued, "worker start failed: buffered deliveries requeued");
    }
}

/// A delivery's handling, settlement and bookkeeping, as one future.
type DeliveryTask = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Polls `task` once on the consume loop; returns it if it is not finished
/// (to be spawned). A panic outside the handler (which the task catches
/// itself) is logged as a spawned task's would be.
async fn poll_once(cx: &RouteCtx, mut task: DeliveryTask) -> Option<DeliveryTask> {
    let polled = std::future::poll_fn(|ctx| {
        std::task::Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| task.as_mut().poll(ctx))))
    })
    .await;
    match polled {
        Ok(std::task::Poll::Pending) => Some(task),
        Ok(std::task::Poll::Ready(())) => None,
        Err(_) => {
            tracing::error!(queue = %cx.queue, "a worker task panicked while settling");
            None
        }
    }
}

/// The result of polling a handler's future (or of its panic).
type HandlerResult = std::result::Result<Outcome, HandlerError>;

/// A delivery handed to its handler: the handler's future (or the panic of
/// the call that should have made it), and what settles and counts the
/// delivery once the handler is done.
struct Handling {
    cx: Arc<RouteCtx>,
    call: std::thread::Result<<BoxHandler as Service<Envelope>>::Future>,
    settler: Settler,
    /// The delivery's message and facts, read after the handler ran.
    carried: Carried,
    permit: Slot,
    span: tracing::Span,
}

/// Calls the handler for one delivery.
fn start(cx: &Arc<RouteCtx>, delivery: Delivery, permit: Slot, svc: &mut BoxHandler) -> Handling {
    let (message, info, settler) = delivery.into_parts();
    let env = Envelope::new(message, info);
    let carried = Carried(env.clone());
    // Handler logs carry the queue and delivery tag.
    let span = tracing::debug_span!("handle", queue = %cx.queue, delivery_tag = carried.info().delivery_tag);
    let call = span.in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| svc.call(env))));
    let counters = cx.counters();
    let now = counters.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
    counters.max_in_flight.fetch_max(now, Ordering::Relaxed);
    cx.state.bump();
    Handling {
        cx: cx.clone(),
        call,
        settler,
        carried,
        permit,
        span,
    }
}

impl Handling {
    /// Polls the handler once, here; its result if it finished (a panic is
    /// a failure). Not to be called again once it returned a result.
    fn poll_first(&mut self, ctx: &mut std::task::Context<'_>) -> Option<HandlerResult> {
        let fut = match &mut self.call {
            Ok(fut) => fut,
            Err(p) => return Some(Err(HandlerError::panic(panic_message(&**p)))),
        };
        let polled = self
            .span
            .in_scope(|| std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(ctx))));
        match polled {
            Ok(std::task::Poll::Ready(r)) => Some(r),
            Ok(std::task::Poll::Pending) => None,
            Err(p) => Some(Err(HandlerError::panic(panic_message(&*p)))),
        }
    }

    /// After the handler acked: finishes the handling now if the transport
    /// settles without waiting (the common case: no task, no future), and
    /// then the handling is only to be dropped; false (nothing done) if
    /// settling must wait.
    fn finish_acked_now(&self) -> bool {
        let settled = match self.settler.settle_now(crate::transport::Settlement::Ack) {
            Some(r) => r,
            None => return false,
        };
        let cx = &self.cx;
        inc(&cx.counters().handled);
        if self.settler.needs_settlement() {
            self.span
                .in_scope(|| record_settlement(cx, self.carried.info().delivery_tag, settled, Action::Ack, "handled"));
        }
        cx.counters().in_flight.fetch_sub(1, Ordering::Relaxed);
        cx.state.completed_one(1);
        true
    }

    /// The rest of the handling (await the handler unless `first` is its
    /// result, settle, count) as a task.
    fn into_task(self, abort: &Arc<CancellationToken>, first: Option<HandlerResult>) -> DeliveryTask {
        let Handling {
            cx,
            call,
            settler,
            carried,
            permit,
            span,
        } = self;
        let abort = abort.clone();
        let task = async move {
            let _permit = permit;
            let result = match (first, call) {
                (Some(r), _) => Some(r),
                (None, Err(p)) => Some(Err(HandlerError::panic(panic_message(&*p)))),
                (None, Ok(fut)) => {
                    tokio::select! {
                        biased;
                        r = AssertUnwindSafe(fut).catch_unwind() => Some(match r {
                            Ok(r) => r,
                            Err(p) => Err(HandlerError::panic(panic_message(&*p))),
                        }),
                        _ = abort.cancelled() => None,
                    }
                }
            };
            match result {
                Some(result) => {
                    inc(&cx.counters().handled);
                    match result {
                        // The common case, without the (large) future of the
                        // other outcomes in every delivery's task.
                        Ok(Outcome::Ack) => {
                            if settler.needs_settlement() {
                                settle_action(&cx, carried.info(), settler, Action::Ack, "handled").await;
                            }
                        }
                        other => Box::pin(settle(&cx, settler, other, carried)).await,
                    }
                }
                None => {
                    // Shutdown deadline passed: the handler was dropped unfinished.
                    if settler.needs_settlement() {
                        settle_action(&cx, carried.info(), settler, Action::Requeue, "aborted at shutdown").await;
                    } else {
                        tracing::warn!(queue = %cx.queue, delivery_tag = carried.info().delivery_tag,
                            "auto-ack handler aborted at shutdown; the message is lost");
                    }
                }
            }
            cx.counters().in_flight.fetch_sub(1, Ordering::Relaxed);
            cx.state.completed_one(1);
        };
        // A disabled span (no subscriber wants it) costs an enter and exit on
        // every poll for nothing.
        if span.is_disabled() {
            Box::pin(task)
        } else {
            Box::pin(task.instrument(span))
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Ack,
    Requeue,
    Reject,
}

/// The messages (by key) that panicked in one route, bounded: the oldest
/// are forgotten past [`PanicMemory::CAPACITY`].
#[derive(Default)]
struct PanicMemory {
    keys: std::collections::HashSet<u64>,
    order: std::collections::VecDeque<u64>,
}

impl PanicMemory {
    const CAPACITY: usize = 10_000;

    /// Records `key`; true when it was already there (a second panic).
    fn seen(&mut self, key: u64) -> bool {
        if self.keys.remove(&key) {
            self.order.retain(|k| *k != key);
            return true;
        }
        if self.order.len() >= Self::CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.keys.remove(&old);
            }
        }
        self.keys.insert(key);
        self.order.push_back(key);
        false
    }
}

/// What identifies a message for the panic rule: its message id, else its
/// body. Kept as is (a reference-counted body) and hashed only when a
/// handler panics, so the delivery path pays nothing for it.
#[derive(Debug, Clone, Default)]
struct PanicId {
    message_id: Option<std::sync::Arc<str>>,
    body: bytes::Bytes,
}

impl PanicId {
    fn of(m: &crate::message::Message) -> Self {
        PanicId {
            message_id: m.properties.message_id.clone(),
            body: m.body.clone(),
        }
    }

    fn key(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        match &self.message_id {
            Some(id) => id.hash(&mut h),
            None => self.body.hash(&mut h),
        }
        h.finish()
    }
}

/// What the Worker keeps of a handled message for what it does after the
/// handler: the panic rule's facts, the reply address, and what replies
/// and outbox messages inherit (correlation id, trace context). It shares
/// the delivered message (an [`Envelope`] clone: two reference counts, no
/// copy) and reads it only when needed.
#[derive(Debug, Clone)]
struct Carried(Envelope);

/// RabbitMQ's `x-delivery-count` of `m` (quorum queues): earlier deliveries.
fn delivery_count(m: &crate::message::Message) -> Option<u64> {
    match m.headers.get("x-delivery-count") {
        Some(crate::message::HeaderValue::I64(n)) => u64::try_from(*n).ok(),
        Some(crate::message::HeaderValue::I32(n)) => u64::try_from(*n).ok(),
        Some(crate::message::HeaderValue::U32(n)) => Some(u64::from(*n)),
        _ => None,
    }
}

impl Carried {
    fn message(&self) -> &crate::message::Message {
        self.0.message()
    }

    fn info(&self) -> &DeliveryInfo {
        self.0.info()
    }

    /// Sets what `m` lacks: the correlation id and the trace context.
    fn stamp(&self, mut m: crate::message::Message) -> crate::message::Message {
        let from = self.message();
        if m.properties.correlation_id.is_none() {
            m.properties.correlation_id = from.properties.correlation_id.clone();
        }
        if let Some(tp) = from.headers.get(headers::TRACEPARENT) {
            if !m.headers.contains_key(headers::TRACEPARENT) {
                m.headers.insert(headers::TRACEPARENT, tp.clone());
                if let Some(ts) = from.headers.get(headers::TRACESTATE) {
                    if !m.headers.contains_key(headers::TRACESTATE) {
                        m.headers.insert(headers::TRACESTATE, ts.clone());
                    }
                }
            }
        }
        m
    }
}

/// Publishes an outbox's messages in order; the first failure stops it.
async fn publish_outbox(
    cx: &RouteCtx,
    tag: u64,
    outbox: Vec<crate::handler::OutboxMessage>,
    carried: &Carried,
) -> bool {
    for item in outbox {
        let message = carried.stamp(item.message);
        let published = match &cx.reply_publisher {
            Some(p) => p.publish_with(&item.destination, message, item.options).await,
            None => {
                cx.transport
                    .publish_with(&item.destination, message, item.options)
                    .await
            }
        };
        match published {
            Ok(()) => inc(&cx.counters().published),
            Err(e) => {
                inc(&cx.counters().settle_failed);
                tracing::warn!(queue = %cx.queue, delivery_tag = tag, destination = %item.destination, code = e.code(),
                    error = %e, "outcome message could not be published; requeueing the handled message");
                return false;
            }
        }
    }
    true
}

/// Settles one delivery from its handler's result (the module's table).
async fn settle(cx: &RouteCtx, settler: Settler, result: std::result::Result<Outcome, HandlerError>, carried: Carried) {
    let info = carried.info();
    let tag = info.delivery_tag;
    let result = match result {
        Ok(Outcome::Publish(outbox)) => {
            let (messages, reply) = Outbox::into_parts(outbox);
            if !publish_outbox(cx, tag, messages, &carried).await {
                if settler.needs_settlement() {
                    settle_action(cx, info, settler, Action::Requeue, "outcome publish failed").await;
                }
                return;
            }
            match reply {
                Some(reply) => Ok(Outcome::Reply(reply)),
                None => Ok(Outcome::Ack),
            }
        }
        other => other,
    };
    let reply_to = carried.message().properties.reply_to.clone();
    let correlation_id = carried.message().properties.correlation_id.clone();
    let action = match result {
        Ok(Outcome::Ack) | Ok(Outcome::Retried) | Ok(Outcome::DeadLettered) | Ok(Outcome::Publish(_)) => Action::Ack,
        Ok(Outcome::Reply(mut reply)) => match reply_to {
            Some(rt) => {
                if let Some(cid) = correlation_id {
                    reply.properties.correlation_id = Some(cid);
                }
                let dest = Destination::queue(&*rt);
                let published = match &cx.reply_publisher {
                    Some(p) => p.publish(&dest, reply).await,
                    None => cx.transport.publish(&dest, reply).await,
                };
                match published {
                    Ok(()) => {
                        inc(&cx.counters().replied);
                        tracing::debug!(queue = %cx.queue, delivery_tag = tag, reply_to = %rt, "reply published");
                        Action::Ack
                    }
                    Err(e) => {
                        inc(&cx.counters().settle_failed);
                        tracing::warn!(queue = %cx.queue, delivery_tag = tag, reply_to = %rt, code = e.code(),
                            error = %e, "reply could not be published; requeueing the request");
                        Action::Requeue
                    }
                }
            }
            None => {
                tracing::debug!(queue = %cx.queue, delivery_tag = tag, "handler replied to a message without reply_to; reply dropped");
                Action::Ack
            }
        },
        Err(e) => {
            inc(&cx.counters().failed);
            let action = match e.kind() {
                FailureKind::Transient | FailureKind::Timeout => Action::Requeue,
                FailureKind::Permanent | FailureKind::Decode => Action::Reject,
                FailureKind::Panic => {
                    inc(&cx.counters().panicked);
                    // Requeued once, dead-lettered when it panics again: the
                    // broker's delivery count where it keeps one (quorum
                    // queues), else this route's memory of panicked messages
                    // — not `redelivered`, which any requeue sets.
                    let again = match delivery_count(carried.message()) {
                        Some(n) => n >= 1,
                        None => cx.panicked.lock().seen(PanicId::of(carried.message()).key()),
                    };
                    if again {
                        Action::Reject
                    } else {
                        Action::Requeue
                    }
                }
            };
            tracing::warn!(queue = %cx.queue, delivery_tag = tag, redelivered = info.redelivered,
                error_kind = e.kind().as_str(), error = %e.message(), action = ?action, "handler failed");
            action
        }
    };
    if !settler.needs_settlement() {
        return;
    }
    settle_action(cx, info, settler, action, "handled").await;
}

async fn settle_action(cx: &RouteCtx, info: &DeliveryInfo, settler: Settler, action: Action, why: &str) {
    let r = match action {
        Action::Ack => settler.ack().await,
        Action::Requeue => settler.nack(true).await,
        Action::Reject => settler.reject(false).await,
    };
    record_settlement(cx, info.delivery_tag, r, action, why);
}

/// Counts and logs how settling delivery `tag` as `action` went.
fn record_settlement(cx: &RouteCtx, tag: u64, r: Result<()>, action: Action, why: &str) {
    let (counter, outcome) = match action {
        Action::Ack => (&cx.counters().acked, "ack"),
        Action::Requeue => (&cx.counters().requeued, "requeue"),
        Action::Reject => (&cx.counters().rejected, "reject"),
    };
    match r {
        Ok(()) => {
            inc(counter);
            tracing::debug!(queue = %cx.queue, delivery_tag = tag, outcome, why, "delivery settled");
        }
        Err(e) => {
            inc(&cx.counters().settle_failed);
            tracing::warn!(queue = %cx.queue, delivery_tag = tag, outcome, code = e.code(), error = %e,
                "settling the delivery failed");
        }
    }
}
