//! Handlers: [`Outcome`], [`HandlerError`], the [`Handler`] service alias,
//! and [`handler_fn`] with axum-style extractors.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use switchyard_core::handler::{handler_fn, CorrelationId, Json, HandlerError};
//!
//! #[derive(Deserialize)]
//! struct ExtractionRequest { session_id: String }
//! #[derive(Serialize)]
//! struct ExtractionResult { session_id: String, memories: u32 }
//!
//! let handler = handler_fn(|Json(req): Json<ExtractionRequest>, CorrelationId(cid): CorrelationId| async move {
//!     if req.session_id.is_empty() {
//!         return Err(HandlerError::reject("empty session id"));
//!     }
//!     let _ = cid;
//!     Ok(Json(ExtractionResult { session_id: req.session_id, memories: 3 }))
//! });
//! let _service = switchyard_core::handler::boxed(handler);
//! ```

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tower::Service;

use crate::codec::JsonCodec;
use crate::envelope::Envelope;
use crate::error::Error;
use crate::message::{Headers, Message, Properties};
use crate::topology::Destination;
use crate::transport::{DeliveryInfo, PublishOptions};

/// What a handler did with a message. Every outcome acknowledges the
/// delivery; they differ in what the Worker does first and in what metrics
/// and traces record.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
// A reply is the common RPC case: boxing it would cost an allocation per reply
// to save stack space in a value that lives for one settlement.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// Done: acknowledge.
    Ack,
    /// Done with a reply: if the message has `reply_to`, the Worker
    /// publishes this message there with the request's correlation id, then
    /// acknowledges. Without `reply_to` the reply is dropped (and logged).
    Reply(Message),
    /// The retry layer republished the message for a delayed retry;
    /// acknowledge the original.
    Retried,
    /// The dead-letter layer published the message to the dead-letter
    /// exchange with its reason; acknowledge the original.
    DeadLettered,
    /// Done, with messages to publish: the Worker publishes every message of
    /// the [`Outbox`] (carrying over the handled message's correlation id and
    /// `traceparent`/`tracestate` headers where a message has none), then its
    /// reply if any (as for [`Outcome::Reply`]), and only then acknowledges.
    /// If a publish fails the delivery is nacked with requeue instead:
    /// "consume, produce, ack" as one step (at-least-once: a redelivery may
    /// publish again the messages that did go out).
    Publish(Outbox),
}

impl Outcome {
    /// A short label for metrics and logs (`ack`, `reply`, `retry`, `dead_letter`).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Ack => "ack",
            Outcome::Reply(_) => "reply",
            Outcome::Retried => "retry",
            Outcome::DeadLettered => "dead_letter",
            Outcome::Publish(_) => "publish",
        }
    }
}

/// One message of an [`Outbox`].
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxMessage {
    /// Where it goes.
    pub destination: Destination,
    /// The message.
    pub message: Message,
    /// Publish options (e.g. mandatory).
    pub options: PublishOptions,
}

/// Messages a handler wants published before its delivery is acknowledged
/// (see [`Outcome::Publish`]); return it from a handler (or `Ok(outbox)`).
///
/// ```
/// use switchyard_core::handler::{handler_fn, Json, Outbox};
/// use switchyard_core::{Destination, HandlerError, Message};
///
/// #[derive(serde::Deserialize, serde::Serialize)]
/// struct Order { id: u64 }
///
/// let handler = handler_fn(|Json(order): Json<Order>| async move {
///     Ok::<_, HandlerError>(
///         Outbox::new()
///             .json(&Destination::new("billing", "order.accepted"), &order)?
///             .publish(Destination::queue("audit"), Message::new(format!("order {}", order.id)).transient()),
///     )
/// });
/// # let _ = switchyard_core::handler::boxed(handler);
/// ```
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outbox {
    messages: Vec<OutboxMessage>,
    reply: Option<Message>,
}

impl Outbox {
    /// An empty outbox (returning it just acknowledges).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `message` for `destination`.
    pub fn publish(mut self, destination: Destination, message: Message) -> Self {
        self.push(destination, message);
        self
    }

    /// Adds `message` for `destination` with publish `options`.
    pub fn publish_with(mut self, destination: Destination, message: Message, options: PublishOptions) -> Self {
        self.messages.push(OutboxMessage {
            destination,
            message,
            options,
        });
        self
    }

    /// Adds `payload` as a persistent JSON message for `destination`; an
    /// encoding failure is a permanent handler failure.
    pub fn json<T: Serialize + ?Sized>(self, destination: &Destination, payload: &T) -> Result<Self, HandlerError> {
        self.json_with(destination, payload, |m| m)
    }

    /// Like [`json`](Outbox::json), with `build` setting properties and
    /// headers on the message.
    pub fn json_with<T: Serialize + ?Sized>(
        self,
        destination: &Destination,
        payload: &T,
        build: impl FnOnce(Message) -> Message,
    ) -> Result<Self, HandlerError> {
        let message = JsonCodec
            .to_message(payload)
            .map_err(|e| HandlerError::reject(format!("outbox message could not be encoded: {e}")))?;
        Ok(self.publish(destination.clone(), build(message)))
    }

    /// Adds `message` for `destination` (for loops).
    pub fn push(&mut self, destination: Destination, message: Message) {
        self.messages.push(OutboxMessage {
            destination,
            message,
            options: PublishOptions::default(),
        });
    }

    /// Also replies with `message` (published after the others, when the
    /// handled message has `reply_to`; as [`Outcome::Reply`]).
    pub fn reply(mut self, message: Message) -> Self {
        self.reply = Some(message);
        self
    }

    /// Also replies with `payload` as JSON.
    pub fn reply_json<T: Serialize + ?Sized>(self, payload: &T) -> Result<Self, HandlerError> {
        let message = JsonCodec
            .to_message(payload)
            .map_err(|e| HandlerError::reject(format!("reply could not be encoded: {e}")))?;
        Ok(self.reply(message))
    }

    /// The messages to publish, in order.
    pub fn messages(&self) -> &[OutboxMessage] {
        &self.messages
    }

    /// The reply, if any.
    pub fn reply_message(&self) -> Option<&Message> {
        self.reply.as_ref()
    }

    /// Number of messages to publish (the reply not counted).
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True if there is nothing to publish (the reply not counted).
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The messages and the reply.
    pub fn into_parts(self) -> (Vec<OutboxMessage>, Option<Message>) {
        (self.messages, self.reply)
    }
}

impl IntoOutcome for Outbox {
    fn into_outcome(self) -> Result<Outcome, HandlerError> {
        Ok(Outcome::Publish(self))
    }
}

/// Why a handler failed; decides what happens to the delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureKind {
    /// May succeed later: requeued (or retried by the retry layer).
    Transient,
    /// Will never succeed: rejected without requeue, so it dead-letters.
    Permanent,
    /// The body could not be decoded: rejected without requeue.
    Decode,
    /// The handler panicked. Without a retry layer the Worker requeues it
    /// once and rejects it (dead-letters) if it panics again on redelivery.
    Panic,
    /// The handler exceeded its time limit: treated as transient.
    Timeout,
}

impl FailureKind {
    /// The `x-error-kind` value (`transient`, `permanent`, `decode`, `panic`, `timeout`).
    pub fn as_str(&self) -> &'static str {
        match self {
            FailureKind::Transient => "transient",
            FailureKind::Permanent => "permanent",
            FailureKind::Decode => "decode",
            FailureKind::Panic => "panic",
            FailureKind::Timeout => "timeout",
        }
    }

    /// True for failures worth retrying (transient, timeout, panic).
    pub fn is_retryable(&self) -> bool {
        matches!(self, FailureKind::Transient | FailureKind::Timeout | FailureKind::Panic)
    }
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handler failure: its [`FailureKind`] and a message.
#[derive(Clone)]
pub struct HandlerError {
    kind: FailureKind,
    message: Cow<'static, str>,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failure: {}", self.kind, self.message)
    }
}

impl std::error::Error for HandlerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn std::error::Error + 'static))
    }
}

impl HandlerError {
    /// A failure of `kind`.
    pub fn new(kind: FailureKind, message: impl Into<Cow<'static, str>>) -> Self {
        HandlerError {
            kind,
            message: message.into(),
            source: None,
        }
    }
    /// A transient failure: requeue / retry.
    pub fn retry(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(FailureKind::Transient, message)
    }
    /// A permanent failure: reject without requeue (dead-letter).
    pub fn reject(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(FailureKind::Permanent, message)
    }
    /// A decode failure: reject without requeue (dead-letter).
    pub fn decode(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(FailureKind::Decode, message)
    }
    /// A panic, caught.
    pub fn panic(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(FailureKind::Panic, message)
    }
    /// A timeout.
    pub fn timeout(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(FailureKind::Timeout, message)
    }
    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }
    /// The kind.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }
    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        let kind = match &e {
            Error::DecodeFailed { .. } => FailureKind::Decode,
            Error::Timeout { .. } | Error::RpcTimeout { .. } => FailureKind::Timeout,
            e if e.is_transient() => FailureKind::Transient,
            _ => FailureKind::Permanent,
        };
        HandlerError::new(kind, e.to_string()).with_source(e)
    }
}

/// Converts handler return values into outcomes.
pub trait IntoOutcome {
    /// The outcome, or the failure.
    fn into_outcome(self) -> Result<Outcome, HandlerError>;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Result<Outcome, HandlerError> {
        Ok(Outcome::Ack)
    }
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Result<Outcome, HandlerError> {
        Ok(self)
    }
}

impl IntoOutcome for Message {
    fn into_outcome(self) -> Result<Outcome, HandlerError> {
        Ok(Outcome::Reply(self))
    }
}

impl IntoOutcome for HandlerError {
    fn into_outcome(self) -> Result<Outcome, HandlerError> {
        Err(self)
    }
}

impl<T: Serialize> IntoOutcome for Json<T> {
    fn into_outcome(self) -> Result<Outcome, HandlerError> {
        JsonCodec
            .to_message(&self.0)
            .map(Outcome::Reply)
            .map_err(|e| HandlerError::reject(format!("reply could not be encoded: {e}")))
    }
}

impl<T: IntoOutcome, E: Into<HandlerError>> IntoOutcome for Result<T, E> {
    fn into_outcome(self) -> Result<Outcome, HandlerError> {
        match self {
            Ok(v) => v.into_outcome(),
            Err(e) => Err(e.into()),
        }
    }
}

/// Extracts a handler argument from an [`Envelope`].
pub trait FromEnvelope: Sized {
    /// Extracts the value; an error fails the delivery with that error
    /// (decode failures dead-letter).
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError>;

    /// What the `Option<Self>` extractor yields: `Ok(None)` when the value
    /// is absent. The default treats any failure of
    /// [`from_envelope`](FromEnvelope::from_envelope) as "absent"; an
    /// extractor whose absence can be told apart from a bad value overrides
    /// it so that a bad value still fails (as [`Json`] does: only an empty
    /// body is absent).
    fn from_envelope_optional(env: &Envelope) -> Result<Option<Self>, HandlerError> {
        Ok(Self::from_envelope(env).ok())
    }
}

/// A JSON body (extractor) or a JSON reply (return value).
///
/// As an extractor it checks the content type (absent or JSON) and decodes;
/// a malformed body is a [`FailureKind::Decode`] failure.
///
/// `Option<Json<T>>` is `None` only when the body is absent (empty or only
/// whitespace); a non-empty body that does not decode still fails with
/// [`FailureKind::Decode`] (it is never silently acked as `None`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Json<T>(pub T);

impl<T: DeserializeOwned> FromEnvelope for Json<T> {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        JsonCodec
            .from_message(env.message())
            .map(Json)
            .map_err(HandlerError::from)
    }

    fn from_envelope_optional(env: &Envelope) -> Result<Option<Self>, HandlerError> {
        if env.body().iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        Self::from_envelope(env).map(Some)
    }
}

impl FromEnvelope for Envelope {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(env.clone())
    }
}

impl FromEnvelope for Message {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(env.message().clone())
    }
}

impl FromEnvelope for Headers {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(env.headers().clone())
    }
}

impl FromEnvelope for DeliveryInfo {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(env.info().clone())
    }
}

/// An optional argument: `None` when the value is absent, as decided by
/// [`FromEnvelope::from_envelope_optional`]. For [`Json`] that means an
/// empty body (a malformed one still fails with [`FailureKind::Decode`]);
/// for the other extractors any extraction failure (e.g. [`Text`] on a body
/// that is not UTF-8) is `None`.
impl<T: FromEnvelope> FromEnvelope for Option<T> {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        T::from_envelope_optional(env)
    }
}

/// The raw body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Body(pub Bytes);

impl FromEnvelope for Body {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(Body(env.body().clone()))
    }
}

/// The body as UTF-8 text; not UTF-8 is a decode failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl FromEnvelope for Text {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        std::str::from_utf8(env.body())
            .map(|s| Text(s.to_owned()))
            .map_err(|e| HandlerError::decode(format!("body is not UTF-8: {e}")))
    }
}

/// The correlation id, if the message has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorrelationId(pub Option<String>);

impl FromEnvelope for CorrelationId {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(CorrelationId(env.correlation_id().map(str::to_owned)))
    }
}

/// The message id, if the message has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageId(pub Option<String>);

impl FromEnvelope for MessageId {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(MessageId(env.message_id().map(str::to_owned)))
    }
}

/// The reply-to address, if the message has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTo(pub Option<String>);

impl FromEnvelope for ReplyTo {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(ReplyTo(env.reply_to().map(str::to_owned)))
    }
}

/// The in-process attempt number (1 on the first call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attempt(pub u32);

impl FromEnvelope for Attempt {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(Attempt(env.attempt()))
    }
}

/// The message's AMQP properties.
impl FromEnvelope for Properties {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        Ok(env.properties().clone())
    }
}

macro_rules! simple_extractor {
    ($(#[$doc:meta] $name:ident($t:ty) = |$e:ident| $get:expr;)*) => {
        $(
            #[$doc]
            #[derive(Debug, Clone, PartialEq, Eq)]
            pub struct $name(pub $t);

            impl FromEnvelope for $name {
                fn from_envelope($e: &Envelope) -> Result<Self, HandlerError> {
                    Ok($name($get))
                }
            }
        )*
    };
}

simple_extractor! {
    /// The priority, if the message has one.
    Priority(Option<u8>) = |e| e.priority();
    /// The content type, if the message has one.
    ContentType(Option<String>) = |e| e.content_type().map(str::to_owned);
    /// The content encoding, if the message has one.
    ContentEncoding(Option<String>) = |e| e.content_encoding().map(str::to_owned);
    /// True if the message was published persistent.
    Persistent(bool) = |e| e.persistent();
    /// The creation timestamp (seconds since the epoch), if set.
    Timestamp(Option<u64>) = |e| e.timestamp();
    /// The per-message TTL, if set.
    Expiration(Option<std::time::Duration>) = |e| e.expiration();
    /// True if the broker delivered the message before.
    Redelivered(bool) = |e| e.redelivered();
    /// The exchange the message was published to (empty: default exchange).
    Exchange(String) = |e| e.exchange().to_owned();
    /// The routing key the message was published with.
    RoutingKey(String) = |e| e.routing_key().to_owned();
    /// The channel-scoped delivery tag.
    DeliveryTag(u64) = |e| e.delivery_tag();
    /// The queue the message was consumed from.
    Queue(String) = |e| e.queue().to_owned();
}

/// State shared with handlers, like axum's `State`: given to the Worker
/// ([`Worker::with_state`](crate::worker::Worker::with_state), every route)
/// or to one handler ([`HandlerFn::with_state`], [`StateLayer`]). `T` is
/// cloned per delivery, so share big or mutable state as `Arc<…>`.
///
/// Extracting a `State<T>` that was never given fails the delivery as a
/// transient error (requeued, not lost) and logs an error naming the type:
/// a wiring mistake must not dead-letter messages.
///
/// ```
/// use std::sync::Arc;
/// use switchyard_core::handler::{handler_fn, Json, State};
///
/// struct Db { url: String }
///
/// let handler = handler_fn(|State(db): State<Arc<Db>>, Json(n): Json<u32>| async move {
///     let _ = (&db.url, n);
/// })
/// .with_state(Arc::new(Db { url: "postgres://".into() }));
/// # let _ = switchyard_core::handler::boxed(handler);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromEnvelope for State<T> {
    fn from_envelope(env: &Envelope) -> Result<Self, HandlerError> {
        match env.extensions().get::<T>() {
            Some(v) => Ok(State(v.clone())),
            None => {
                let ty = std::any::type_name::<T>();
                tracing::error!(
                    state_type = ty,
                    queue = env.queue(),
                    "handler asks for State<{ty}> but none was given (Worker::with_state or handler_fn(..).with_state)"
                );
                Err(HandlerError::retry(format!(
                    "no state of type {ty}: give it with Worker::with_state or handler_fn(..).with_state"
                )))
            }
        }
    }
}

/// A tower layer that attaches `state` to every envelope passing through,
/// for the [`State`] extractor of the handlers (and layers) inside it.
#[derive(Clone)]
pub struct StateLayer<T> {
    state: Arc<T>,
}

impl<T> fmt::Debug for StateLayer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StateLayer<{}>", std::any::type_name::<T>())
    }
}

impl<T: Send + Sync + 'static> StateLayer<T> {
    /// A layer attaching `state`.
    pub fn new(state: T) -> Self {
        StateLayer { state: Arc::new(state) }
    }
}

impl<S, T> tower::Layer<S> for StateLayer<T> {
    type Service = WithState<S, T>;
    fn layer(&self, inner: S) -> WithState<S, T> {
        WithState {
            inner,
            state: self.state.clone(),
        }
    }
}

/// A handler with state attached; see [`StateLayer`] and [`HandlerFn::with_state`].
pub struct WithState<S, T> {
    inner: S,
    state: Arc<T>,
}

impl<S: Clone, T> Clone for WithState<S, T> {
    fn clone(&self) -> Self {
        WithState {
            inner: self.inner.clone(),
            state: self.state.clone(),
        }
    }
}

impl<S, T> fmt::Debug for WithState<S, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WithState<{}>", std::any::type_name::<T>())
    }
}

impl<S, T> Service<Envelope> for WithState<S, T>
where
    S: Service<Envelope>,
    T: Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> S::Future {
        self.inner.call(env.with_shared_extension(self.state.clone()))
    }
}

/// The boxed future of a handler.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Outcome, HandlerError>> + Send + 'static>>;

/// A message handler: a cloneable `tower::Service<Envelope>` that answers
/// with an [`Outcome`] or fails with a [`HandlerError`].
///
/// Implemented for every such service; build one with [`handler_fn`] or
/// write the `Service` by hand, and wrap it in tower layers.
pub trait Handler:
    Service<Envelope, Response = Outcome, Error = HandlerError, Future: Send + 'static> + Clone + Send + 'static
{
}

impl<S> Handler for S where
    S: Service<Envelope, Response = Outcome, Error = HandlerError, Future: Send + 'static> + Clone + Send + 'static
{
}

/// A type-erased handler.
pub type BoxHandler = tower::util::BoxCloneService<Envelope, Outcome, HandlerError>;

/// Boxes any handler.
pub fn boxed<H: Handler>(h: H) -> BoxHandler {
    BoxHandler::new(h)
}

/// A handler built from an async function; see [`handler_fn`].
pub struct HandlerFn<F, Args> {
    f: F,
    _args: PhantomData<fn() -> Args>,
}

impl<F: Clone, Args> Clone for HandlerFn<F, Args> {
    fn clone(&self) -> Self {
        HandlerFn {
            f: self.f.clone(),
            _args: PhantomData,
        }
    }
}

impl<F, Args> fmt::Debug for HandlerFn<F, Args> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandlerFn")
    }
}

impl<F, Args> HandlerFn<F, Args> {
    /// Attaches `state` for this handler's [`State`] extractor (it shadows
    /// state of the same type given to the Worker).
    pub fn with_state<T: Send + Sync + 'static>(self, state: T) -> WithState<Self, T> {
        WithState {
            inner: self,
            state: Arc::new(state),
        }
    }
}

/// Builds a handler from an async function whose arguments are extractors
/// ([`FromEnvelope`]) and whose result converts [`IntoOutcome`].
///
/// Up to eight arguments. Return `()` or `Result<(), E>` to acknowledge,
/// `Json<T>` or a [`Message`] to reply, `Err(HandlerError::retry(..))` to
/// requeue, `Err(HandlerError::reject(..))` to dead-letter.
pub fn handler_fn<F, Args>(f: F) -> HandlerFn<F, Args> {
    HandlerFn { f, _args: PhantomData }
}

pin_project_lite::pin_project! {
    /// The future of a [`HandlerFn`]: the function's own future, whose
    /// output becomes an [`Outcome`] (or the extraction error, when an
    /// argument could not be taken from the envelope). Not boxed: a `Worker`
    /// boxes the handler's future once, where it erases the handler's type.
    pub struct HandlerFnFuture<Fut> {
        #[pin]
        state: FnState<Fut>,
    }
}

pin_project_lite::pin_project! {
    #[project = FnStateProj]
    enum FnState<Fut> {
        Failed { error: Option<HandlerError> },
        Running { #[pin] fut: Fut },
    }
}

impl<Fut> HandlerFnFuture<Fut> {
    fn failed(error: HandlerError) -> Self {
        HandlerFnFuture {
            state: FnState::Failed { error: Some(error) },
        }
    }

    fn running(fut: Fut) -> Self {
        HandlerFnFuture {
            state: FnState::Running { fut },
        }
    }
}

impl<Fut> fmt::Debug for HandlerFnFuture<Fut> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandlerFnFuture")
    }
}

impl<Fut, R> Future for HandlerFnFuture<Fut>
where
    Fut: Future<Output = R>,
    R: IntoOutcome,
{
    type Output = Result<Outcome, HandlerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            FnStateProj::Failed { error } => {
                Poll::Ready(Err(error.take().expect("HandlerFnFuture polled after completion")))
            }
            FnStateProj::Running { fut } => fut.poll(cx).map(IntoOutcome::into_outcome),
        }
    }
}

macro_rules! impl_handler_fn {
    ($($a:ident),*) => {
        impl<F, Fut, R, $($a,)*> Service<Envelope> for HandlerFn<F, ($($a,)*)>
        where
            F: Fn($($a),*) -> Fut + Clone + Send + 'static,
            Fut: Future<Output = R> + Send + 'static,
            R: IntoOutcome + 'static,
            $($a: FromEnvelope + Send + 'static,)*
        {
            type Response = Outcome;
            type Error = HandlerError;
            type Future = HandlerFnFuture<Fut>;

            fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
                Poll::Ready(Ok(()))
            }

            #[allow(non_snake_case, unused_variables)]
            fn call(&mut self, env: Envelope) -> HandlerFnFuture<Fut> {
                $(
                    let $a = match $a::from_envelope(&env) {
                        Ok(v) => v,
                        Err(e) => return HandlerFnFuture::failed(e),
                    };
                )*
                HandlerFnFuture::running((self.f)($($a),*))
            }
        }
    };
}

impl_handler_fn!();
impl_handler_fn!(A1);
impl_handler_fn!(A1, A2);
impl_handler_fn!(A1, A2, A3);
impl_handler_fn!(A1, A2, A3, A4);
impl_handler_fn!(A1, A2, A3, A4, A5);
impl_handler_fn!(A1, A2, A3, A4, A5, A6);
impl_handler_fn!(A1, A2, A3, A4, A5, A6, A7);
impl_handler_fn!(A1, A2, A3, A4, A5, A6, A7, A8);

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use tower::ServiceExt;

    #[derive(Deserialize, Serialize, Debug, PartialEq)]
    struct Req {
        id: u32,
    }

    fn env(body: &str, ct: Option<&str>) -> Envelope {
        let mut m = Message::new(body.to_owned()).with_correlation_id("c-1");
        m.properties.content_type = ct.map(Into::into);
        Envelope::for_test(m, "q")
    }

    fn assert_handler<H: Handler>(_: &H) {}

    #[tokio::test]
    async fn extractors_decode_and_reply() {
        let h = handler_fn(
            |Json(r): Json<Req>, CorrelationId(c): CorrelationId, Attempt(a): Attempt| async move {
                assert_eq!(c.as_deref(), Some("c-1"));
                assert_eq!(a, 1);
                Json(Req { id: r.id + 1 })
            },
        );
        assert_handler(&h);
        let out = h.oneshot(env(r#"{"id":1}"#, Some("application/json"))).await.unwrap();
        match out {
            Outcome::Reply(m) => assert_eq!(&m.body[..], br#"{"id":2}"#),
            o => panic!("unexpected {o:?}"),
        }
    }

    #[tokio::test]
    async fn malformed_json_and_wrong_content_type_are_decode_failures() {
        let h = handler_fn(|Json(_r): Json<Req>| async {});
        let e = h.clone().oneshot(env("{oops", None)).await.unwrap_err();
        assert_eq!(e.kind(), FailureKind::Decode);
        let e = h.oneshot(env(r#"{"id":1}"#, Some("text/plain"))).await.unwrap_err();
        assert_eq!(e.kind(), FailureKind::Decode);
        assert!(e.message().contains("text/plain"));
    }

    #[tokio::test]
    async fn optional_json_is_none_only_for_an_absent_body() {
        let h = handler_fn(|body: Option<Json<Req>>| async move {
            match body {
                Some(Json(r)) => Outcome::Reply(Message::new(r.id.to_string())),
                None => Outcome::Ack,
            }
        });
        for absent in ["", "  \n"] {
            assert_eq!(h.clone().oneshot(env(absent, None)).await.unwrap(), Outcome::Ack);
        }
        match h
            .clone()
            .oneshot(env(r#"{"id":7}"#, Some("application/json")))
            .await
            .unwrap()
        {
            Outcome::Reply(m) => assert_eq!(&m.body[..], b"7"),
            o => panic!("unexpected {o:?}"),
        }
        // A malformed, mistyped or wrongly typed body is not "absent".
        for (body, ct) in [
            ("{oops", None),
            (r#"{"id":"x"}"#, None),
            (r#"{"id":1}"#, Some("text/plain")),
        ] {
            let e = h.clone().oneshot(env(body, ct)).await.unwrap_err();
            assert_eq!(e.kind(), FailureKind::Decode, "{body}");
        }
        // Other extractors keep "failure = absent".
        let t = handler_fn(|t: Option<Text>| async move { assert!(t.is_none()) });
        let bad_utf8 = Envelope::for_test(Message::new(vec![0xff, 0xfe]), "q");
        assert_eq!(t.oneshot(bad_utf8).await.unwrap(), Outcome::Ack);
    }

    #[tokio::test]
    async fn results_map_to_outcomes_and_errors() {
        let ok = handler_fn(|| async { Ok::<_, HandlerError>(()) });
        assert_eq!(ok.oneshot(env("", None)).await.unwrap(), Outcome::Ack);
        let bad = handler_fn(|Body(b): Body| async move {
            if b.is_empty() {
                Err(HandlerError::reject("empty"))
            } else {
                Ok(Outcome::Ack)
            }
        });
        let e = bad.oneshot(env("", None)).await.unwrap_err();
        assert_eq!(e.kind(), FailureKind::Permanent);
        let text = handler_fn(
            |Text(t): Text, h: Headers, info: DeliveryInfo, e: Envelope| async move {
                assert_eq!(t, "hi");
                assert!(h.is_empty());
                assert_eq!(&*info.queue, "q");
                assert_eq!(e.queue(), "q");
            },
        );
        assert_eq!(text.oneshot(env("hi", None)).await.unwrap(), Outcome::Ack);
    }

    #[test]
    fn errors_convert_with_kinds() {
        let e: HandlerError = Error::decode("x").into();
        assert_eq!(e.kind(), FailureKind::Decode);
        let e: HandlerError = Error::QueueNotFound {
            reply: None,
            queue: "q".into(),
        }
        .into();
        assert_eq!(e.kind(), FailureKind::Permanent);
        let e: HandlerError = Error::transport("down").into();
        assert_eq!(e.kind(), FailureKind::Transient);
        assert!(FailureKind::Panic.is_retryable());
    }
}
