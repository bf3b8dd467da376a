//! [`Envelope`]: what a handler sees.

use std::any::{Any, TypeId};
use std::sync::Arc;
use std::time::Duration;

use crate::message::{HeaderValue, Headers, Message, Properties};
use crate::transport::DeliveryInfo;

/// Well-known header names used across switchyard.
pub mod headers {
    /// Number of times the message has been retried by the retry layer.
    pub const RETRY_COUNT: &str = "x-retry-count";
    /// Human-readable reason a message was dead-lettered.
    pub const ERROR: &str = "x-error";
    /// Failure kind of a dead-lettered message (`transient`, `permanent`,
    /// `decode`, `panic`, `timeout`).
    pub const ERROR_KIND: &str = "x-error-kind";
    /// Exchange the message was originally published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
    /// Routing key the message was originally published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    /// Queue the message was consumed from when it failed.
    pub const ORIGINAL_QUEUE: &str = "x-original-queue";
    /// When the message failed (seconds since the epoch).
    pub const FAILED_AT: &str = "x-failed-at";
    /// RabbitMQ's dead-letter history.
    pub const X_DEATH: &str = "x-death";
    /// W3C trace context.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C trace state.
    pub const TRACESTATE: &str = "tracestate";
}

struct Inner {
    message: Message,
    info: DeliveryInfo,
}

/// Typed values attached to an [`Envelope`] by the runtime: the state given
/// to [`Worker::with_state`](crate::worker::Worker::with_state) or
/// [`HandlerFn::with_state`](crate::handler::HandlerFn::with_state), read by
/// the [`State`](crate::handler::State) extractor.
///
/// A shared, persistent list: attaching a value is one allocation and never
/// copies what is already attached; the most recently attached value of a
/// type wins.
#[derive(Clone, Default)]
pub struct Extensions(Option<Arc<Node>>);

struct Node {
    type_id: TypeId,
    value: Arc<dyn Any + Send + Sync>,
    next: Option<Arc<Node>>,
}

impl Extensions {
    /// No values.
    pub fn new() -> Self {
        Self::default()
    }

    /// These extensions plus `value` (shadowing an earlier value of its type).
    pub fn with<T: Send + Sync + 'static>(&self, value: T) -> Self {
        self.with_shared(Arc::new(value))
    }

    /// Like [`with`](Extensions::with), for a value already in an `Arc`.
    pub fn with_shared<T: Send + Sync + 'static>(&self, value: Arc<T>) -> Self {
        Extensions(Some(Arc::new(Node {
            type_id: TypeId::of::<T>(),
            value,
            next: self.0.clone(),
        })))
    }

    /// These values on top of `base` (ours shadow `base`'s of the same type).
    pub fn over(&self, base: &Extensions) -> Extensions {
        fn rebuild(node: Option<&Node>, base: &Extensions) -> Option<Arc<Node>> {
            let n = node?;
            Some(Arc::new(Node {
                type_id: n.type_id,
                value: n.value.clone(),
                next: match n.next.as_deref() {
                    Some(next) => rebuild(Some(next), base),
                    None => base.0.clone(),
                },
            }))
        }
        match &self.0 {
            None => base.clone(),
            Some(n) => Extensions(rebuild(Some(n), base)),
        }
    }

    /// The most recently attached value of type `T`.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<&T> {
        let mut node = self.0.as_deref();
        while let Some(n) = node {
            if n.type_id == TypeId::of::<T>() {
                return n.value.downcast_ref::<T>();
            }
            node = n.next.as_deref();
        }
        None
    }

    /// True if nothing is attached.
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }
}

impl std::fmt::Debug for Extensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut n = 0;
        let mut node = self.0.as_deref();
        while let Some(x) = node {
            n += 1;
            node = x.next.as_deref();
        }
        write!(f, "Extensions({n} values)")
    }
}

/// Reads a typed value out of a [`HeaderValue`]; see [`Envelope::header`]
/// and [`Headers::get_as`].
pub trait FromHeaderValue: Sized {
    /// The value, if it has a compatible type.
    fn from_header_value(v: &HeaderValue) -> Option<Self>;
}

impl FromHeaderValue for String {
    fn from_header_value(v: &HeaderValue) -> Option<Self> {
        match v {
            HeaderValue::String(s) => Some(s.clone()),
            HeaderValue::Bytes(b) => std::str::from_utf8(b).ok().map(str::to_owned),
            _ => None,
        }
    }
}

impl FromHeaderValue for bool {
    fn from_header_value(v: &HeaderValue) -> Option<Self> {
        v.as_bool()
    }
}

impl FromHeaderValue for f64 {
    fn from_header_value(v: &HeaderValue) -> Option<Self> {
        match *v {
            HeaderValue::F64(f) => Some(f),
            HeaderValue::F32(f) => Some(f as f64),
            _ => v.as_i64().map(|i| i as f64),
        }
    }
}

impl FromHeaderValue for bytes::Bytes {
    fn from_header_value(v: &HeaderValue) -> Option<Self> {
        match v {
            HeaderValue::Bytes(b) => Some(b.clone()),
            HeaderValue::String(s) => Some(bytes::Bytes::copy_from_slice(s.as_bytes())),
            _ => None,
        }
    }
}

impl FromHeaderValue for HeaderValue {
    fn from_header_value(v: &HeaderValue) -> Option<Self> {
        Some(v.clone())
    }
}

macro_rules! int_from_header {
    ($($t:ty),*) => {
        $(impl FromHeaderValue for $t {
            /// Any integer header that fits.
            fn from_header_value(v: &HeaderValue) -> Option<Self> {
                v.as_i64().and_then(|i| <$t>::try_from(i).ok())
            }
        })*
    };
}
int_from_header!(i8, u8, i16, u16, i32, u32, i64, u64, usize);

impl Headers {
    /// The value of `key` converted to `T` (`None` if absent or of another
    /// type; integers convert between widths when the value fits).
    ///
    /// ```
    /// use switchyard_core::Headers;
    /// let mut h = Headers::new();
    /// h.insert("x-retry-count", 3i64);
    /// h.insert("tenant", "acme");
    /// assert_eq!(h.get_as::<u32>("x-retry-count"), Some(3));
    /// assert_eq!(h.get_as::<String>("tenant").as_deref(), Some("acme"));
    /// assert_eq!(h.get_as::<bool>("tenant"), None);
    /// ```
    pub fn get_as<T: FromHeaderValue>(&self, key: &str) -> Option<T> {
        self.get(key).and_then(T::from_header_value)
    }
}

/// A received message and the facts of its delivery, without the means to
/// settle it: the `Worker` alone settles, from the handler's outcome.
///
/// Cloning is one reference-count increment, so middleware (retry,
/// de-duplication) can keep copies freely.
///
/// ```
/// use switchyard_core::{Envelope, Message};
/// let env = Envelope::for_test(
///     Message::new("{}").with_content_type("application/json").with_priority(3).with_header("tenant", "acme"),
///     "orders",
/// );
/// assert_eq!(env.priority(), Some(3));
/// assert_eq!(env.content_type(), Some("application/json"));
/// assert!(env.persistent());
/// assert_eq!(env.header::<String>("tenant").as_deref(), Some("acme"));
/// assert_eq!(env.routing_key(), "orders");
/// assert_eq!(env.exchange(), "");
/// assert!(!env.redelivered());
/// ```
#[derive(Clone)]
pub struct Envelope {
    inner: Arc<Inner>,
    attempt: u32,
    extensions: Extensions,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("info", &self.inner.info)
            .field("attempt", &self.attempt)
            .field("message", &self.inner.message)
            .finish()
    }
}

impl Envelope {
    /// Wraps a message and its delivery facts (attempt 1).
    pub fn new(message: Message, info: DeliveryInfo) -> Self {
        Envelope {
            inner: Arc::new(Inner { message, info }),
            attempt: 1,
            extensions: Extensions::default(),
        }
    }

    /// An envelope for tests and local calls: `message` as if delivered from
    /// `queue` through the default exchange.
    pub fn for_test(message: Message, queue: &str) -> Self {
        let q: Arc<str> = Arc::from(queue);
        Envelope::new(
            message,
            DeliveryInfo {
                delivery_tag: 1,
                redelivered: false,
                exchange: Arc::from(""),
                routing_key: q.clone(),
                queue: q,
                consumer_tag: Arc::from("test"),
            },
        )
    }

    /// The message.
    pub fn message(&self) -> &Message {
        &self.inner.message
    }

    /// The body.
    pub fn body(&self) -> &bytes::Bytes {
        &self.inner.message.body
    }

    /// The headers.
    pub fn headers(&self) -> &Headers {
        &self.inner.message.headers
    }

    /// The delivery facts.
    pub fn info(&self) -> &DeliveryInfo {
        &self.inner.info
    }

    /// The queue the message came from.
    pub fn queue(&self) -> &str {
        &self.inner.info.queue
    }

    /// The correlation id, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        self.inner.message.properties.correlation_id.as_deref()
    }

    /// The message id, if any.
    pub fn message_id(&self) -> Option<&str> {
        self.inner.message.properties.message_id.as_deref()
    }

    /// The reply-to address, if any.
    pub fn reply_to(&self) -> Option<&str> {
        self.inner.message.properties.reply_to.as_deref()
    }

    /// True if the broker delivered this message before.
    pub fn redelivered(&self) -> bool {
        self.inner.info.redelivered
    }

    /// Which in-process attempt this is (1 for the first call; the retry
    /// layer increments it).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// How many times the message was retried through the broker (the
    /// `x-retry-count` header, 0 when absent).
    pub fn retry_count(&self) -> u32 {
        self.headers()
            .get_i64(headers::RETRY_COUNT)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    }

    /// The same delivery as the next in-process attempt.
    pub fn next_attempt(&self) -> Self {
        Envelope {
            inner: self.inner.clone(),
            attempt: self.attempt.saturating_add(1),
            extensions: self.extensions.clone(),
        }
    }

    /// The same delivery facts with a different message (decompression or
    /// decryption layers use this). Copies the delivery facts once.
    pub fn with_message(&self, message: Message) -> Self {
        Envelope {
            inner: Arc::new(Inner {
                message,
                info: self.inner.info.clone(),
            }),
            attempt: self.attempt,
            extensions: self.extensions.clone(),
        }
    }

    /// The typed values attached by the runtime (state).
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The same envelope with `value` attached (the runtime uses this for
    /// state; layers may use it to hand values to inner layers and handlers).
    pub fn with_extension<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.extensions = self.extensions.with(value);
        self
    }

    /// The same envelope with `base` underneath its own extensions (its own
    /// values shadow `base`'s of the same type). The Worker gives its state
    /// this way.
    pub fn with_base_extensions(mut self, base: &Extensions) -> Self {
        self.extensions = self.extensions.over(base);
        self
    }

    /// The same envelope with an `Arc`-shared value attached.
    pub fn with_shared_extension<T: Send + Sync + 'static>(mut self, value: Arc<T>) -> Self {
        self.extensions = self.extensions.with_shared(value);
        self
    }

    /// The message's AMQP properties.
    pub fn properties(&self) -> &Properties {
        &self.inner.message.properties
    }

    /// The priority, if set.
    pub fn priority(&self) -> Option<u8> {
        self.properties().priority
    }

    /// The content type (e.g. `application/json`), if set.
    pub fn content_type(&self) -> Option<&str> {
        self.properties().content_type.as_deref()
    }

    /// The content encoding (e.g. `gzip`), if set.
    pub fn content_encoding(&self) -> Option<&str> {
        self.properties().content_encoding.as_deref()
    }

    /// True if the message was published persistent (delivery mode 2).
    pub fn persistent(&self) -> bool {
        self.properties().is_persistent()
    }

    /// The creation timestamp (seconds since the Unix epoch), if set.
    pub fn timestamp(&self) -> Option<u64> {
        self.properties().timestamp
    }

    /// The per-message TTL, if set.
    pub fn expiration(&self) -> Option<Duration> {
        self.properties().expiration
    }

    /// The AMQP `type` property, if set.
    pub fn kind(&self) -> Option<&str> {
        self.properties().kind.as_deref()
    }

    /// The application id, if set.
    pub fn app_id(&self) -> Option<&str> {
        self.properties().app_id.as_deref()
    }

    /// The value of header `key`, if present.
    pub fn header_value(&self, key: &str) -> Option<&HeaderValue> {
        self.headers().get(key)
    }

    /// Header `key` converted to `T` (`String`, `bool`, `f64`, `Bytes`, any
    /// integer width it fits in); `None` if absent or of another type.
    pub fn header<T: FromHeaderValue>(&self, key: &str) -> Option<T> {
        self.headers().get_as(key)
    }

    /// Header `key` as a string slice, if it is a string.
    pub fn header_str(&self, key: &str) -> Option<&str> {
        self.headers().get_str(key)
    }

    /// The exchange the message was published to (empty: the default exchange).
    pub fn exchange(&self) -> &str {
        &self.inner.info.exchange
    }

    /// The routing key the message was published with.
    pub fn routing_key(&self) -> &str {
        &self.inner.info.routing_key
    }

    /// The channel-scoped delivery tag.
    pub fn delivery_tag(&self) -> u64 {
        self.inner.info.delivery_tag
    }

    /// The consumer that received the message.
    pub fn consumer_tag(&self) -> &str {
        &self.inner.info.consumer_tag
    }
}
