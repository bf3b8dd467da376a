//! [`Envelope`]: what a handler sees.

use std::sync::Arc;

use crate::message::{Headers, Message};
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

/// A received message and the facts of its delivery, without the means to
/// settle it: the `Worker` alone settles, from the handler's outcome.
///
/// Cloning is one reference-count increment, so middleware (retry,
/// de-duplication) can keep copies freely.
#[derive(Clone)]
pub struct Envelope {
    inner: Arc<Inner>,
    attempt: u32,
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
        }
    }
}
