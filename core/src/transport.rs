//! The transport contract: [`Publisher`], [`Consumer`], [`Admin`] and the
//! [`Transport`] that bundles them, plus [`Delivery`] and its settlement.
//!
//! Every trait here is object-safe: applications hold `Arc<dyn Transport>`
//! (or `Arc<dyn Publisher>`) and pick the concrete transport with a cargo
//! feature.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures_core::Stream;

use crate::codec::{Codec, JsonCodec};
use crate::error::{Error, Result};
use crate::message::{HeaderValue, Headers, Message};
use crate::topology::{Binding, Destination, ExchangeSpec, QueueInfo, QueueSpec, Topology};

/// Per-publish options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Ask the broker to return the message if no queue is bound for it;
    /// the publish then fails with [`Error::Unroutable`].
    pub mandatory: bool,
}

impl PublishOptions {
    /// Options with `mandatory` set.
    pub fn mandatory() -> Self {
        PublishOptions { mandatory: true }
    }
}

/// Publishes messages.
///
/// With publisher confirms enabled (the default of every transport),
/// `publish` returns only once the broker has taken responsibility for the
/// message; a nack is [`Error::PublishUnconfirmed`] and a returned mandatory
/// message is [`Error::Unroutable`]. Publishing to a missing exchange is
/// [`Error::ExchangeNotFound`].
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes `message` to `dest` with `options`.
    async fn publish_with(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<()>;

    /// Publishes `message` to `dest` with default options.
    async fn publish(&self, dest: &Destination, message: Message) -> Result<()> {
        self.publish_with(dest, message, PublishOptions::default()).await
    }

    /// Publishes several messages to `dest`, pipelined where the transport
    /// can, and returns once all are confirmed. On failure it returns the
    /// error of the first message that failed, as is (the error does not
    /// say which message it was); messages before it may have been
    /// delivered, and whether later ones were sent depends on the transport
    /// (this default stops at the first failure).
    async fn publish_batch(&self, dest: &Destination, messages: Vec<Message>) -> Result<()> {
        for m in messages {
            self.publish(dest, m).await?;
        }
        Ok(())
    }

    /// Encodes `payload` with `codec` and publishes it. Works on
    /// `dyn Publisher`: any `Serialize` value goes through erased-serde.
    async fn publish_payload(
        &self,
        dest: &Destination,
        payload: &(dyn erased_serde::Serialize + Sync),
        codec: &dyn Codec,
    ) -> Result<()> {
        let message = codec.encode_message(payload)?;
        self.publish(dest, message).await
    }
}

/// Typed conveniences for any publisher, `dyn Publisher` included.
///
/// ```
/// # async fn demo(transport: std::sync::Arc<dyn switchyard_core::Transport>) -> switchyard_core::Result<()> {
/// use std::time::Duration;
/// use switchyard_core::{Destination, PublishOptions, PublisherExt};
///
/// let dest = Destination::new("contextiq.extraction", "extraction.request");
/// let request = serde_json::json!({ "session_id": "s-1" });
/// // Persistent JSON, default options.
/// transport.publish_json(&dest, &request).await?;
/// // The same, with properties set on the message before it is sent (no copy).
/// transport
///     .publish_json_with(&dest, &request, |m| {
///         m.with_priority(5)
///             .with_correlation_id("c-1")
///             .with_message_id("m-1")
///             .with_header("tenant", "acme")
///             .with_expiration(Duration::from_secs(60))
///             .transient()
///     })
///     .await?;
/// // And with publish options (mandatory: fail as `unroutable` if no queue is bound).
/// transport
///     .publish_json_with_options(&dest, &request, PublishOptions::mandatory(), |m| m.with_priority(9))
///     .await?;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait PublisherExt: Publisher {
    /// Serializes `payload` as JSON (`content_type: application/json`) and
    /// publishes it as a persistent message.
    async fn publish_json<T: serde::Serialize + Sync + ?Sized>(&self, dest: &Destination, payload: &T) -> Result<()> {
        let message = JsonCodec.to_message(payload)?;
        self.publish(dest, message).await
    }

    /// Like [`publish_json`](PublisherExt::publish_json), with `build` setting
    /// properties and headers on the encoded message (priority, correlation
    /// id, message id, persistence, headers, expiration, …) before it is
    /// published. The message is moved through `build`, never copied.
    async fn publish_json_with<T, F>(&self, dest: &Destination, payload: &T, build: F) -> Result<()>
    where
        T: serde::Serialize + Sync + ?Sized,
        F: FnOnce(Message) -> Message + Send,
    {
        let message = build(JsonCodec.to_message(payload)?);
        self.publish(dest, message).await
    }

    /// Like [`publish_json_with`](PublisherExt::publish_json_with), with
    /// publish options (e.g. [`PublishOptions::mandatory`]).
    async fn publish_json_with_options<T, F>(
        &self,
        dest: &Destination,
        payload: &T,
        options: PublishOptions,
        build: F,
    ) -> Result<()>
    where
        T: serde::Serialize + Sync + ?Sized,
        F: FnOnce(Message) -> Message + Send,
    {
        let message = build(JsonCodec.to_message(payload)?);
        self.publish_with(dest, message, options).await
    }
}

impl<P: Publisher + ?Sized> PublisherExt for P {}

/// Options of a consumer.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumeOptions {
    /// Most unacknowledged deliveries the broker sends this consumer (QoS
    /// prefetch). `0` means unlimited on the memory transport; the RabbitMQ
    /// transports never consume unbounded (the broker would push a whole
    /// queue into the client's memory) and give such a consumer their
    /// default prefetch (`RABBITMQ_DEFAULT_PREFETCH_COUNT`, 10). Auto-ack
    /// consumers are not bounded by a prefetch on any transport.
    pub prefetch: u16,
    /// The broker considers each delivery acknowledged when sent.
    pub auto_ack: bool,
    /// Only this consumer may read the queue.
    pub exclusive: bool,
    /// Consumer tag; generated when empty.
    pub consumer_tag: String,
    /// Consumer priority (`x-priority`): while a consumer of higher priority
    /// can take a delivery (its prefetch is not full), consumers of lower
    /// priority get none; consumers of equal priority share round-robin.
    /// `None` is priority 0.
    pub priority: Option<i32>,
    /// Where a consumer of a stream queue starts reading (`x-stream-offset`).
    pub stream_offset: Option<StreamOffset>,
    /// Further `basic.consume` arguments, passed to the broker as given
    /// (`x-priority` and `x-stream-offset` above take precedence).
    pub arguments: Headers,
}

impl Default for ConsumeOptions {
    fn default() -> Self {
        ConsumeOptions {
            prefetch: 10,
            auto_ack: false,
            exclusive: false,
            consumer_tag: String::new(),
            priority: None,
            stream_offset: None,
            arguments: Headers::new(),
        }
    }
}

/// Where a consumer of a stream queue starts (`x-stream-offset`).
///
/// Stream queues keep their messages after consumption; every consumer
/// reads from an offset of its choosing and must acknowledge manually with
/// a prefetch (RabbitMQ refuses auto-ack consumers on streams).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOffset {
    /// The first message still in the stream (`"first"`).
    First,
    /// The last chunk of the stream (`"last"`).
    Last,
    /// Only messages published after the consumer starts (`"next"`, the
    /// broker's default).
    Next,
    /// The message at this offset (0-based) or the first one after it.
    Offset(u64),
    /// Messages stored at or after this time, in seconds since the epoch
    /// (sent as an AMQP timestamp).
    Timestamp(u64),
    /// Messages of the last interval, e.g. `"1h"`, `"30m"`, `"7D"`
    /// (RabbitMQ's interval syntax: `Y`, `M`, `D`, `h`, `m`, `s`).
    Interval(String),
}

impl StreamOffset {
    /// The `x-stream-offset` argument's value.
    pub fn to_header(&self) -> HeaderValue {
        match self {
            StreamOffset::First => HeaderValue::String("first".into()),
            StreamOffset::Last => HeaderValue::String("last".into()),
            StreamOffset::Next => HeaderValue::String("next".into()),
            StreamOffset::Offset(n) => HeaderValue::I64(i64::try_from(*n).unwrap_or(i64::MAX)),
            StreamOffset::Timestamp(t) => HeaderValue::Timestamp(*t),
            StreamOffset::Interval(s) => HeaderValue::String(s.clone()),
        }
    }
}

impl ConsumeOptions {
    /// Sets the prefetch.
    pub fn prefetch(mut self, n: u16) -> Self {
        self.prefetch = n;
        self
    }
    /// Sets auto-ack.
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
    /// Sets where a stream queue consumer starts (`x-stream-offset`).
    pub fn stream_offset(mut self, offset: StreamOffset) -> Self {
        self.stream_offset = Some(offset);
        self
    }
    /// Adds a `basic.consume` argument.
    pub fn argument(mut self, key: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.arguments.insert(key, value);
        self
    }
    /// The `basic.consume` arguments: [`arguments`](Self::arguments) with
    /// `x-priority` and `x-stream-offset` set from the typed options.
    ///
    /// ```
    /// use switchyard_core::transport::{ConsumeOptions, StreamOffset};
    /// let a = ConsumeOptions::default().priority(5).stream_offset(StreamOffset::First).consume_arguments();
    /// assert_eq!(a.get_i64("x-priority"), Some(5));
    /// assert_eq!(a.get_str("x-stream-offset"), Some("first"));
    /// ```
    pub fn consume_arguments(&self) -> Headers {
        let mut a = self.arguments.clone();
        if let Some(p) = self.priority {
            a.insert("x-priority", HeaderValue::I32(p));
        }
        if let Some(o) = &self.stream_offset {
            a.insert("x-stream-offset", o.to_header());
        }
        a
    }
}

/// Facts about how a message was delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// Channel-scoped delivery tag.
    pub delivery_tag: u64,
    /// True if the message was delivered before and not acknowledged.
    pub redelivered: bool,
    /// The exchange it was published to.
    pub exchange: Arc<str>,
    /// The routing key it was published with.
    pub routing_key: Arc<str>,
    /// The queue it was consumed from.
    pub queue: Arc<str>,
    /// The consumer that received it.
    pub consumer_tag: Arc<str>,
}

/// Settles deliveries of one consumer (or channel).
///
/// Implemented by transports; applications settle through [`Delivery`] or,
/// far more often, let the `Worker` do it.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Acknowledges `tag`.
    async fn ack(&self, tag: u64) -> Result<()>;
    /// Negatively acknowledges `tag`; requeued when `requeue`, else
    /// dead-lettered (or dropped if the queue has no dead-letter exchange).
    async fn nack(&self, tag: u64, requeue: bool) -> Result<()>;
    /// Rejects `tag` (same effect as a single `nack`).
    async fn reject(&self, tag: u64, requeue: bool) -> Result<()> {
        self.nack(tag, requeue).await
    }
    /// Settles `tag` at once when that needs no waiting, and returns the
    /// result; `None` when settling must wait (a frame to send, a flush),
    /// and then the settlement is left undone for the async method.
    ///
    /// [`Delivery`] and [`Settler`] try this first, so a transport that can
    /// settle synchronously (the memory broker always can; a coalescing
    /// acker usually can) settles without allocating a future. The default
    /// returns `None`.
    fn settle_now(&self, tag: u64, how: Settlement) -> Option<Result<()>> {
        let _ = (tag, how);
        None
    }
}

/// How a delivery is settled (see [`Acker::settle_now`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// `basic.ack`.
    Ack,
    /// `basic.nack`, requeued or not.
    Nack {
        /// Back to the queue (else dead-lettered or dropped).
        requeue: bool,
    },
    /// `basic.reject`, requeued or not.
    Reject {
        /// Back to the queue (else dead-lettered or dropped).
        requeue: bool,
    },
}

/// A message received by a consumer, with the means to settle it.
///
/// A delivery from a manual-ack consumer must be settled exactly once with
/// [`ack`](Delivery::ack), [`nack`](Delivery::nack) or
/// [`reject`](Delivery::reject); those consume the delivery, so settling
/// twice does not compile.
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// How it was delivered.
    pub info: DeliveryInfo,
    acker: Option<Arc<dyn Acker>>,
}

impl fmt::Debug for Delivery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Delivery")
            .field("info", &self.info)
            .field("message", &self.message)
            .field("needs_settlement", &self.acker.is_some())
            .finish()
    }
}

impl Delivery {
    /// A delivery from a manual-ack consumer, settled through `acker`.
    pub fn new(message: Message, info: DeliveryInfo, acker: Arc<dyn Acker>) -> Self {
        Delivery {
            message,
            info,
            acker: Some(acker),
        }
    }

    /// A delivery from an auto-ack consumer: nothing to settle.
    pub fn auto_acked(message: Message, info: DeliveryInfo) -> Self {
        Delivery {
            message,
            info,
            acker: None,
        }
    }

    /// True if this delivery must be settled (manual-ack consumer).
    pub fn needs_settlement(&self) -> bool {
        self.acker.is_some()
    }

    /// Acknowledges the delivery (no-op for auto-ack deliveries).
    ///
    /// The message is dropped when this is called: the returned future
    /// holds only what settling needs (as a [`Settler`] does), not the
    /// message, so it stays small whatever the message's size.
    pub fn ack(self) -> impl Future<Output = Result<()>> + Send + 'static {
        self.settler().ack()
    }

    /// Negatively acknowledges the delivery (no-op for auto-ack deliveries).
    /// Like [`ack`](Delivery::ack), the future does not hold the message.
    pub fn nack(self, requeue: bool) -> impl Future<Output = Result<()>> + Send + 'static {
        self.settler().nack(requeue)
    }

    /// Rejects the delivery (no-op for auto-ack deliveries). Like
    /// [`ack`](Delivery::ack), the future does not hold the message.
    pub fn reject(self, requeue: bool) -> impl Future<Output = Result<()>> + Send + 'static {
        self.settler().reject(requeue)
    }

    fn settler(self) -> Settler {
        Settler {
            tag: self.info.delivery_tag,
            acker: self.acker,
        }
    }

    /// Splits the delivery into its message, its facts and a [`Settler`].
    pub fn into_parts(self) -> (Message, DeliveryInfo, Settler) {
        let settler = Settler {
            tag: self.info.delivery_tag,
            acker: self.acker,
        };
        (self.message, self.info, settler)
    }
}

/// The settlement half of a [`Delivery`], kept by the runtime while the
/// handler works on the message.
pub struct Settler {
    tag: u64,
    acker: Option<Arc<dyn Acker>>,
}

impl fmt::Debug for Settler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settler").field("tag", &self.tag).finish()
    }
}

impl Settler {
    /// The delivery tag this settler settles.
    pub fn delivery_tag(&self) -> u64 {
        self.tag
    }
    /// True if there is something to settle.
    pub fn needs_settlement(&self) -> bool {
        self.acker.is_some()
    }
    /// Acknowledges.
    pub async fn ack(self) -> Result<()> {
        self.settle(Settlement::Ack).await
    }
    /// Negatively acknowledges.
    pub async fn nack(self, requeue: bool) -> Result<()> {
        self.settle(Settlement::Nack { requeue }).await
    }
    /// Rejects.
    pub async fn reject(self, requeue: bool) -> Result<()> {
        self.settle(Settlement::Reject { requeue }).await
    }
    /// Settles now if that needs no waiting ([`Acker::settle_now`]);
    /// `None` when it must wait, and then nothing was settled. Nothing to
    /// settle (auto-ack) is `Some(Ok(()))`.
    pub(crate) fn settle_now(&self, how: Settlement) -> Option<Result<()>> {
        match &self.acker {
            Some(a) => a.settle_now(self.tag, how),
            None => Some(Ok(())),
        }
    }

    /// Settles as `how` says: at once when the transport can
    /// ([`Acker::settle_now`]), else through its async method.
    pub async fn settle(self, how: Settlement) -> Result<()> {
        let Some(a) = &self.acker else { return Ok(()) };
        if let Some(done) = a.settle_now(self.tag, how) {
            return done;
        }
        match how {
            Settlement::Ack => a.ack(self.tag).await,
            Settlement::Nack { requeue } => a.nack(self.tag, requeue).await,
            Settlement::Reject { requeue } => a.reject(self.tag, requeue).await,
        }
    }
}

/// Cancels a consumer.
#[async_trait]
pub trait Cancel: Send + Sync {
    /// Cancels the consumer: the broker sends no more deliveries; those
    /// already received stay unsettled until settled (or until the
    /// transport requeues them when the subscription is dropped).
    async fn cancel(&self) -> Result<()>;

    /// Closes the consumer for good: sends the acks already settled and
    /// waits until they are written, cancels the consumer, then releases
    /// (requeues) whatever is still unsettled. The default cancels.
    async fn close(&self) -> Result<()> {
        self.cancel().await
    }
}

/// A handle that cancels a [`Subscription`] from elsewhere.
#[derive(Clone)]
pub struct CancelHandle(Arc<dyn Cancel>);

impl fmt::Debug for CancelHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CancelHandle")
    }
}

impl CancelHandle {
    /// Wraps a transport's canceller.
    pub fn new(c: Arc<dyn Cancel>) -> Self {
        CancelHandle(c)
    }
    /// Cancels the consumer.
    pub async fn cancel(&self) -> Result<()> {
        self.0.cancel().await
    }
    /// Closes the consumer (see [`Subscription::close`]).
    pub async fn close(&self) -> Result<()> {
        self.0.close().await
    }
}

/// The boxed stream type inside a [`Subscription`].
pub type DeliveryStream = Pin<Box<dyn Stream<Item = Result<Delivery>> + Send>>;

/// A running consumer: a stream of deliveries plus its cancel handle.
///
/// The stream ends (`None`) after the consumer is cancelled by the client;
/// a cancellation by the broker (queue deleted) yields
/// `Err(Error::ConsumerCancelled)` and then ends.
pub struct Subscription {
    queue: Arc<str>,
    consumer_tag: Arc<str>,
    stream: DeliveryStream,
    cancel: CancelHandle,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("queue", &self.queue)
            .field("consumer_tag", &self.consumer_tag)
            .finish()
    }
}

impl Subscription {
    /// Assembles a subscription (used by transports).
    pub fn new(queue: Arc<str>, consumer_tag: Arc<str>, stream: DeliveryStream, cancel: CancelHandle) -> Self {
        Subscription {
            queue,
            consumer_tag,
            stream,
            cancel,
        }
    }
    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }
    /// The consumer tag.
    pub fn consumer_tag(&self) -> &str {
        &self.consumer_tag
    }
    /// A handle to cancel this consumer from another task.
    pub fn cancel_handle(&self) -> CancelHandle {
        self.cancel.clone()
    }
    /// Cancels the consumer. The returned future holds only the cancel
    /// handle, so it is `Send` and may be awaited in spawned tasks.
    pub fn cancel(&self) -> impl std::future::Future<Output = Result<()>> + Send + 'static {
        let handle = self.cancel.clone();
        async move { handle.cancel().await }
    }
    /// Closes the subscription: the acks already settled are sent (and
    /// written) first, then the consumer is cancelled, then whatever is
    /// still unsettled goes back to the queue. Call it at shutdown, bounded
    /// by your deadline; dropping a subscription does the same in the
    /// background.
    pub async fn close(self) -> Result<()> {
        let handle = self.cancel.clone();
        let r = handle.close().await;
        drop(self);
        r
    }
    /// The next delivery; `None` once the consumer has ended.
    #[allow(clippy::should_implement_trait)] // async, like `StreamExt::next`
    pub fn next(&mut self) -> impl Future<Output = Option<Result<Delivery>>> + Send + '_ {
        std::future::poll_fn(|cx| self.stream.as_mut().poll_next(cx))
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.stream.as_mut().poll_next(cx)
    }
}

/// One message taken from a queue with [`Consumer::get`] (AMQP `basic.get`).
#[derive(Debug)]
pub struct GetOk {
    /// The message and the means to settle it (nothing to settle when it
    /// was taken with `auto_ack`). Its [`DeliveryInfo::consumer_tag`] is empty.
    pub delivery: Delivery,
    /// How many ready messages the queue still holds, as the broker counted
    /// them when it handed this one over.
    pub message_count: u32,
}

/// Starts consumers and takes single messages.
#[async_trait]
pub trait Consumer: Send + Sync {
    /// Starts consuming `queue`. Fails with [`Error::QueueNotFound`] if the
    /// queue does not exist and [`Error::ResourceLocked`] if an exclusive
    /// consumer holds it.
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription>;

    /// Takes one message from `queue` without a consumer (AMQP `basic.get`):
    /// `Ok(None)` when the queue has no ready message, otherwise the
    /// delivery and the number of ready messages left behind it.
    ///
    /// What it is for: inspecting or replaying a dead-letter queue one
    /// message at a time, "take N then stop" jobs (a consumer would be sent
    /// up to its prefetch at once), and polling a queue now and then. It
    /// registers no consumer, so it never fires an auto-delete queue's
    /// deletion, and it counts as use for `x-expires`. Each call is a
    /// round trip: to move many messages, consume.
    ///
    /// With `auto_ack` the broker forgets the message as it hands it over.
    /// Otherwise settle the delivery exactly once ([`Delivery::ack`],
    /// [`Delivery::nack`], [`Delivery::reject`]); dropping it unsettled, or
    /// losing the connection first, puts the message back in the queue
    /// (redelivered), and settling it after the connection was lost fails
    /// with [`Error::SettleFailed`]. RabbitMQ transports hold one channel
    /// per unsettled message taken this way (a broker allows 2047 channels
    /// per connection by default): settle as you go.
    ///
    /// Fails with [`Error::QueueNotFound`] if the queue does not exist and
    /// [`Error::ResourceLocked`] if it is another connection's exclusive
    /// queue. The default fails with [`Error::Unsupported`].
    async fn get(&self, queue: &str, auto_ack: bool) -> Result<Option<GetOk>> {
        let _ = (queue, auto_ack);
        unsupported("basic.get")
    }
}

/// Conditions of [`Admin::delete_queue_if`]: the queue is deleted only if
/// each condition set holds, else the deletion fails with
/// [`Error::PreconditionFailed`] (RabbitMQ's 406) and the queue stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeleteIf {
    /// Only if the queue has no consumers (`if-unused`).
    pub unused: bool,
    /// Only if the queue has no ready messages (`if-empty`; messages
    /// delivered and not yet acknowledged do not count, as on RabbitMQ).
    pub empty: bool,
}

impl DeleteIf {
    /// Only if the queue has no consumers.
    pub fn unused() -> Self {
        DeleteIf {
            unused: true,
            empty: false,
        }
    }
    /// Only if the queue has no ready messages.
    pub fn empty() -> Self {
        DeleteIf {
            unused: false,
            empty: true,
        }
    }
    /// Only if the queue has neither consumers nor ready messages.
    pub fn unused_and_empty() -> Self {
        DeleteIf {
            unused: true,
            empty: true,
        }
    }
}

/// Declares, inspects and deletes topology.
#[async_trait]
pub trait Admin: Send + Sync {
    /// Declares an exchange (idempotent when the spec matches; a conflicting
    /// redeclaration is [`Error::PreconditionFailed`]).
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()>;
    /// Declares a queue and returns its facts (its generated name, for a
    /// server-named queue).
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo>;
    /// Creates a binding.
    async fn bind(&self, binding: &Binding) -> Result<()>;
    /// Removes a binding.
    async fn unbind(&self, binding: &Binding) -> Result<()>;
    /// Deletes an exchange (no error if it does not exist).
    async fn delete_exchange(&self, name: &str) -> Result<()>;
    /// Deletes a queue, returning how many messages it held (0 if it did not exist).
    async fn delete_queue(&self, name: &str) -> Result<u32>;
    /// Removes all ready messages from a queue, returning how many.
    async fn purge_queue(&self, name: &str) -> Result<u32>;
    /// Deletes a queue only if the conditions hold (AMQP `queue.delete`
    /// with `if-unused` / `if-empty`), returning how many ready messages it
    /// held; 0 if it did not exist. A queue with consumers (when `unused`
    /// is asked) or with ready messages (when `empty` is asked) is left as
    /// it is and the call fails with [`Error::PreconditionFailed`]. Use it
    /// to retire a queue without losing what is still in it or cutting off
    /// a consumer that is still running.
    ///
    /// The default deletes unconditionally when no condition is set and
    /// fails with [`Error::Unsupported`] otherwise.
    async fn delete_queue_if(&self, name: &str, only: DeleteIf) -> Result<u32> {
        if only == DeleteIf::default() {
            return self.delete_queue(name).await;
        }
        unsupported("conditional queue deletion")
    }
    /// Deletes an exchange only if no binding has it as its source (AMQP
    /// `exchange.delete` with `if-unused`; being the destination of an
    /// exchange-to-exchange binding does not count, as on RabbitMQ), else
    /// fails with [`Error::PreconditionFailed`] and the exchange stays. No
    /// error if it does not exist. The default fails with
    /// [`Error::Unsupported`].
    async fn delete_exchange_if_unused(&self, name: &str) -> Result<()> {
        let _ = name;
        unsupported("conditional exchange deletion")
    }
    /// Facts about an existing queue (passive declare); [`Error::QueueNotFound`] if absent.
    async fn queue_info(&self, name: &str) -> Result<QueueInfo>;
    /// Checks that an exchange exists (passive declare).
    async fn exchange_exists(&self, name: &str) -> Result<bool>;

    /// Declares a whole topology: exchanges, then queues, then bindings.
    async fn declare(&self, topology: &Topology) -> Result<()> {
        for e in &topology.exchanges {
            self.declare_exchange(e).await?;
        }
        for q in &topology.queues {
            self.declare_queue(q).await?;
        }
        for b in &topology.bindings {
            self.bind(b).await?;
        }
        Ok(())
    }
}

/// What a transport supports beyond the common core.
///
/// The conformance suite reads these flags: a test of a capability the
/// transport lacks reports "skipped: transport lacks X".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Priority queues (`x-max-priority`).
    pub priorities: bool,
    /// Per-message and per-queue TTL.
    pub message_ttl: bool,
    /// Dead-letter exchanges.
    pub dead_lettering: bool,
    /// `x-max-length` with overflow policies.
    pub max_length: bool,
    /// RabbitMQ direct reply-to (`amq.rabbitmq.reply-to`).
    pub direct_reply_to: bool,
    /// Publisher confirms.
    pub publisher_confirms: bool,
    /// Headers exchanges.
    pub headers_exchange: bool,
    /// Quorum queues.
    pub quorum_queues: bool,
    /// Exclusive queues and consumers.
    pub exclusive: bool,
    /// Mandatory publishes reported as unroutable.
    pub mandatory_returns: bool,
    /// Consumer priorities (`x-priority`).
    pub consumer_priorities: bool,
    /// Stream queues read with `x-stream-offset` (RabbitMQ 3.9+; not the
    /// memory transport).
    pub stream_queues: bool,
    /// `x-delayed-message` exchanges. The memory transport has them built
    /// in; on RabbitMQ they need the `rabbitmq_delayed_message_exchange`
    /// plugin, which is not part of RabbitMQ, so the AMQP transports report
    /// `false` (they pass the kind through to the broker all the same).
    pub delayed_message_exchange: bool,
    /// `x-consistent-hash` exchanges (the plugin shipped with RabbitMQ,
    /// `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange`; not the
    /// memory transport).
    pub consistent_hash_exchange: bool,
}

impl Capabilities {
    /// Everything RabbitMQ offers.
    pub const ALL: Capabilities = Capabilities {
        priorities: true,
        message_ttl: true,
        dead_lettering: true,
        max_length: true,
        direct_reply_to: true,
        publisher_confirms: true,
        headers_exchange: true,
        quorum_queues: true,
        exclusive: true,
        mandatory_returns: true,
        consumer_priorities: true,
        stream_queues: true,
        delayed_message_exchange: true,
        consistent_hash_exchange: true,
    };
}

/// Where RPC replies arrive for one [`RpcClient`](crate::rpc::RpcClient).
pub struct ReplyChannel {
    /// The `reply_to` address to put on requests.
    pub reply_to: String,
    /// The auto-ack stream of replies.
    pub replies: Subscription,
    /// The publisher requests must go through when it is not the transport
    /// itself (for direct reply-to it must be the channel that consumes the
    /// replies). `None`: publish through the transport.
    pub publisher: Option<Arc<dyn Publisher>>,
}

impl fmt::Debug for ReplyChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReplyChannel")
            .field("reply_to", &self.reply_to)
            .finish()
    }
}

/// Takes RPC replies where a transport receives them; see
/// [`Transport::open_reply_channel_with`]. It must not block: it is called
/// on the task that reads the reply channel.
pub type ReplySink = Arc<dyn Fn(Message) + Send + Sync>;

/// A complete transport: publisher, consumer and admin in one, as each
/// `switchyard-*` transport crate provides.
#[async_trait]
pub trait Transport: Publisher + Consumer + Admin {
    /// A short name (`memory`, `lapin`, `amqprs`).
    fn name(&self) -> &'static str;

    /// What this transport supports.
    fn capabilities(&self) -> Capabilities;

    /// Checks that the transport can reach its broker.
    async fn health_check(&self) -> Result<()>;

    /// Closes the transport; later operations fail with [`Error::Shutdown`].
    async fn close(&self) -> Result<()>;

    /// Opens the reply channel for an RPC client. The default declares an
    /// exclusive, auto-delete, server-named queue and consumes it with
    /// auto-ack; transports with direct reply-to override this.
    async fn open_reply_channel(&self) -> Result<ReplyChannel> {
        let info = self.declare_queue(&QueueSpec::temporary()).await?;
        let replies = self
            .consume(
                &info.name,
                ConsumeOptions::default().auto_ack(true).exclusive(true).prefetch(0),
            )
            .await?;
        Ok(ReplyChannel {
            reply_to: info.name,
            replies,
            publisher: None,
        })
    }

    /// Opens the reply channel like
    /// [`open_reply_channel`](Transport::open_reply_channel), for a client
    /// that also takes replies through `sink`. A transport may hand each
    /// reply to `sink` on the task that receives it instead of putting it
    /// on the `replies` stream, which saves the RPC client a task hop per
    /// call; whatever it does not hand over (and the end of the stream, with
    /// its error) still comes through `replies`. The default ignores `sink`.
    async fn open_reply_channel_with(&self, sink: ReplySink) -> Result<ReplyChannel> {
        drop(sink);
        self.open_reply_channel().await
    }
}

/// Fails with [`Error::Unsupported`]; for transports lacking a feature.
pub fn unsupported<T>(feature: &str) -> Result<T> {
    Err(Error::Unsupported {
        feature: feature.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use parking_lot::Mutex;

    /// Fails the publish of the body `fail`; records the others.
    struct FailOn {
        fail: &'static str,
        sent: Mutex<Vec<Bytes>>,
    }

    #[async_trait]
    impl Publisher for FailOn {
        async fn publish_with(&self, dest: &Destination, message: Message, _: PublishOptions) -> Result<()> {
            if message.body == self.fail.as_bytes() {
                return Err(Error::ExchangeNotFound {
                    reply: None,
                    exchange: dest.exchange().to_owned(),
                });
            }
            self.sent.lock().push(message.body);
            Ok(())
        }
    }

    #[tokio::test]
    async fn publish_json_with_sets_properties_and_options() {
        struct Record(Mutex<Vec<(Message, PublishOptions)>>);
        #[async_trait]
        impl Publisher for Record {
            async fn publish_with(&self, _: &Destination, message: Message, options: PublishOptions) -> Result<()> {
                self.0.lock().push((message, options));
                Ok(())
            }
        }
        let p = Record(Mutex::new(Vec::new()));
        let dest = Destination::queue("q");
        p.publish_json(&dest, &1).await.unwrap();
        p.publish_json_with(&dest, &2, |m| {
            m.with_priority(5)
                .with_correlation_id("c")
                .with_message_id("m")
                .with_header("h", 1i32)
                .with_expiration(std::time::Duration::from_secs(2))
                .transient()
        })
        .await
        .unwrap();
        p.publish_json_with_options(&dest, &3, PublishOptions::mandatory(), |m| m)
            .await
            .unwrap();
        let sent = p.0.lock();
        assert!(sent[0].0.properties.is_persistent());
        assert_eq!(sent[0].0.properties.content_type.as_deref(), Some("application/json"));
        let m = &sent[1].0;
        assert_eq!(&m.body[..], b"2");
        assert_eq!(m.properties.priority, Some(5));
        assert_eq!(m.properties.correlation_id.as_deref(), Some("c"));
        assert_eq!(m.properties.message_id.as_deref(), Some("m"));
        assert_eq!(m.headers.get_i64("h"), Some(1));
        assert_eq!(m.properties.expiration, Some(std::time::Duration::from_secs(2)));
        assert!(!m.properties.is_persistent());
        assert!(!sent[1].1.mandatory);
        assert!(sent[2].1.mandatory);
    }

    #[tokio::test]
    async fn default_publish_batch_returns_the_first_error_as_is_and_stops() {
        let p = FailOn {
            fail: "b",
            sent: Mutex::new(Vec::new()),
        };
        let batch = ["a", "b", "c"].map(Message::new).to_vec();
        let e = p.publish_batch(&Destination::new("ex", "rk"), batch).await.unwrap_err();
        // The error is the failing publish's own: same variant, no index added.
        assert!(
            matches!(&e, Error::ExchangeNotFound { exchange, .. } if exchange == "ex"),
            "{e:?}"
        );
        assert_eq!(*p.sent.lock(), vec![Bytes::from("a")]);
    }

    /// Records which path each settlement took.
    #[derive(Default)]
    struct PathAcker {
        now: bool,
        calls: Mutex<Vec<String>>,
    }

    #[async_trait]
    impl Acker for PathAcker {
        async fn ack(&self, tag: u64) -> Result<()> {
            self.calls.lock().push(format!("async ack {tag}"));
            Ok(())
        }
        async fn nack(&self, tag: u64, requeue: bool) -> Result<()> {
            self.calls.lock().push(format!("async nack {tag} {requeue}"));
            Ok(())
        }
        fn settle_now(&self, tag: u64, how: Settlement) -> Option<Result<()>> {
            if !self.now {
                return None;
            }
            self.calls.lock().push(format!("now {how:?} {tag}"));
            Some(Ok(()))
        }
    }

    fn delivery(tag: u64, acker: Arc<PathAcker>) -> Delivery {
        let info = DeliveryInfo {
            delivery_tag: tag,
            redelivered: false,
            exchange: Arc::from(""),
            routing_key: Arc::from("q"),
            queue: Arc::from("q"),
            consumer_tag: Arc::from("c"),
        };
        Delivery::new(Message::new("x"), info, acker)
    }

    #[tokio::test]
    async fn settlements_take_the_synchronous_path_when_the_acker_offers_it() {
        let sync = Arc::new(PathAcker {
            now: true,
            ..Default::default()
        });
        delivery(1, sync.clone()).ack().await.unwrap();
        delivery(2, sync.clone()).nack(true).await.unwrap();
        delivery(3, sync.clone()).reject(false).await.unwrap();
        assert_eq!(
            *sync.calls.lock(),
            [
                "now Ack 1",
                "now Nack { requeue: true } 2",
                "now Reject { requeue: false } 3"
            ]
        );
        let wire = Arc::new(PathAcker::default());
        delivery(1, wire.clone()).ack().await.unwrap();
        delivery(2, wire.clone()).nack(false).await.unwrap();
        // `reject` defaults to `nack`.
        delivery(3, wire.clone()).reject(true).await.unwrap();
        assert_eq!(
            *wire.calls.lock(),
            ["async ack 1", "async nack 2 false", "async nack 3 true"]
        );
    }

    #[test]
    fn settling_futures_do_not_hold_the_message() {
        let acker = Arc::new(PathAcker::default());
        let mut d = delivery(1, acker);
        d.message.body = Bytes::from(vec![0u8; 1 << 20]);
        let body = d.message.body.clone();
        let fut = d.ack();
        // The message was dropped when `ack` was called: only our clone of
        // the body is left, and the future is a few words, not a message.
        assert!(body.is_unique(), "the ack future still holds the body");
        assert!(std::mem::size_of_val(&fut) < std::mem::size_of::<Message>());
    }

    #[test]
    fn a_message_fits_in_a_cache_friendly_size() {
        // Moved several times per publish and per delivery: keep it within
        // four cache lines (it was 320 bytes with `String` properties).
        assert!(
            std::mem::size_of::<Message>() <= 256,
            "{}",
            std::mem::size_of::<Message>()
        );
    }
}
