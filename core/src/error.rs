//! Errors with stable codes.
//!
//! Every variant has a [`code`](Error::code) that never changes between
//! releases, so alerts and dashboards can match on it, and each carries the
//! queue or exchange it concerns.

use std::fmt;
use std::time::Duration;

use crate::message::Message;

/// What closed when the broker refused an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseScope {
    /// The broker closed the channel (a soft error: 403, 404, 405, 406).
    Channel,
    /// The broker closed the whole connection (a hard error: 320, 5xx).
    Connection,
}

/// What the broker said when it refused an operation: the AMQP reply code
/// and text of its `channel.close` / `connection.close` (or `basic.return`),
/// the class and method of the operation that caused it, and what closed.
///
/// ```
/// use switchyard_core::error::{BrokerReply, CloseScope, Error};
/// let e = Error::access_refused("orders", "ACCESS_REFUSED - no permission")
///     .with_reply(BrokerReply::new(403, "ACCESS_REFUSED - no permission").caused_by(50, 10));
/// assert_eq!(e.code(), "access_refused");
/// assert!(!e.is_transient());
/// let r = e.reply().unwrap();
/// assert_eq!((r.code, r.class_id, r.method_id, r.scope), (403, 50, 10, CloseScope::Channel));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerReply {
    /// The AMQP reply code (e.g. 404 NOT_FOUND, 403 ACCESS_REFUSED).
    pub code: u16,
    /// The broker's reply text.
    pub text: String,
    /// The class id of the method that caused it (0 when unknown).
    pub class_id: u16,
    /// The method id of the method that caused it (0 when unknown).
    pub method_id: u16,
    /// Whether the channel or the whole connection was closed.
    pub scope: CloseScope,
}

impl BrokerReply {
    /// A reply with `code` and `text`; the scope follows from the code
    /// (AMQP's hard errors — 320 and 5xx — close the connection).
    pub fn new(code: u16, text: impl Into<String>) -> Self {
        BrokerReply {
            code,
            text: text.into(),
            class_id: 0,
            method_id: 0,
            scope: if code == 320 || code >= 500 {
                CloseScope::Connection
            } else {
                CloseScope::Channel
            },
        }
    }
    /// Sets the class and method ids of the method that caused it.
    pub fn caused_by(mut self, class_id: u16, method_id: u16) -> Self {
        self.class_id = class_id;
        self.method_id = method_id;
        self
    }
    /// Sets the scope.
    pub fn scope(mut self, scope: CloseScope) -> Self {
        self.scope = scope;
        self
    }
    /// The AMQP name of the reply code (`NOT_FOUND`, `ACCESS_REFUSED`, ...).
    pub fn code_name(&self) -> &'static str {
        match self.code {
            200 => "REPLY_SUCCESS",
            311 => "CONTENT_TOO_LARGE",
            312 => "NO_ROUTE",
            313 => "NO_CONSUMERS",
            320 => "CONNECTION_FORCED",
            402 => "INVALID_PATH",
            403 => "ACCESS_REFUSED",
            404 => "NOT_FOUND",
            405 => "RESOURCE_LOCKED",
            406 => "PRECONDITION_FAILED",
            501 => "FRAME_ERROR",
            502 => "SYNTAX_ERROR",
            503 => "COMMAND_INVALID",
            504 => "CHANNEL_ERROR",
            505 => "UNEXPECTED_FRAME",
            506 => "RESOURCE_ERROR",
            530 => "NOT_ALLOWED",
            540 => "NOT_IMPLEMENTED",
            541 => "INTERNAL_ERROR",
            _ => "UNKNOWN",
        }
    }
    /// True for codes after which the same operation may succeed later
    /// (the connection was forced closed, the broker had an internal or
    /// resource error).
    pub fn is_transient(&self) -> bool {
        matches!(self.code, 200 | 320 | 506 | 541)
    }
}

impl fmt::Display for BrokerReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text)?;
        if self.class_id != 0 {
            write!(f, " (class {}, method {})", self.class_id, self.method_id)?;
        }
        match self.scope {
            CloseScope::Channel => f.write_str("; channel closed"),
            CloseScope::Connection => f.write_str("; connection closed"),
        }
    }
}

/// The result type of every fallible switchyard operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error from a transport, the runtime, a codec or the settings.
///
/// Match on [`Error::code`] for a stable, string-typed classification.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker could not be reached or the connection attempt failed.
    #[error("connection failed: {message} (check RABBITMQ_URL / host / port and that the broker is running)")]
    ConnectionFailed {
        /// What went wrong (never contains a password).
        message: String,
    },
    /// The connection or channel was closed while an operation was pending.
    #[error("connection closed: {message}")]
    ConnectionClosed {
        /// Why the connection closed, as far as it is known.
        message: String,
        /// What the broker said, when the broker refused the operation.
        reply: Option<Box<BrokerReply>>,
    },
    /// The exchange does not exist (AMQP 404 on an exchange).
    #[error("exchange '{exchange}' not found: declare it first")]
    ExchangeNotFound {
        /// The missing exchange.
        exchange: String,
        /// What the broker said, when the broker refused the operation.
        reply: Option<Box<BrokerReply>>,
    },
    /// The queue does not exist (AMQP 404 on a queue).
    #[error("queue '{queue}' not found: declare it first")]
    QueueNotFound {
        /// The missing queue.
        queue: String,
        /// What the broker said, when the broker refused the operation.
        reply: Option<Box<BrokerReply>>,
    },
    /// A declaration conflicts with an existing entity (AMQP 406), or an
    /// operation's precondition (if-unused, if-empty) does not hold.
    #[error("precondition failed on '{resource}': {message}")]
    PreconditionFailed {
        /// The queue or exchange concerned.
        resource: String,
        /// The broker's explanation.
        message: String,
        /// What the broker said, when the broker refused the operation.
        reply: Option<Box<BrokerReply>>,
    },
    /// An exclusive queue is owned by another connection (AMQP 405
    /// RESOURCE_LOCKED).
    #[error("resource '{resource}' is locked: {message}")]
    ResourceLocked {
        /// The queue concerned.
        resource: String,
        /// The broker's explanation.
        message: String,
        /// What the broker said, when the broker refused the operation.
        reply: Option<Box<BrokerReply>>,
    },
    /// The broker refused access (AMQP 403 ACCESS_REFUSED): missing
    /// permissions, a reserved `amq.` name, an internal exchange, an
    /// exclusive consumer holding the queue. Retrying does not help.
    #[error("access refused on '{resource}': {message}")]
    AccessRefused {
        /// The queue or exchange concerned.
        resource: String,
        /// The broker's explanation.
        message: String,
        /// What the broker said.
        reply: Option<Box<BrokerReply>>,
    },
    /// A mandatory publish matched no queue and was returned by the broker.
    #[error("message to exchange '{exchange}' with routing key '{routing_key}' was unroutable (no queue bound)")]
    Unroutable {
        /// The exchange published to (empty for the default exchange).
        exchange: String,
        /// The routing key used.
        routing_key: String,
        /// The broker's `basic.return` reply (312 NO_ROUTE), when it sent one.
        reply: Option<Box<BrokerReply>>,
        /// The returned message (properties and body), when the transport has it.
        returned: Option<Box<Message>>,
    },
    /// The broker refused (nacked) a publish or its confirm never arrived.
    #[error("publish to exchange '{exchange}' with routing key '{routing_key}' was not confirmed: {message}")]
    PublishUnconfirmed {
        /// The exchange published to.
        exchange: String,
        /// The routing key used.
        routing_key: String,
        /// Why it was not confirmed.
        message: String,
    },
    /// A body could not be decoded (malformed JSON, wrong content type,
    /// unknown or corrupt content encoding).
    #[error("decode failed: {message}")]
    DecodeFailed {
        /// What was wrong with the body.
        message: String,
    },
    /// A payload could not be encoded.
    #[error("encode failed: {message}")]
    EncodeFailed {
        /// What could not be encoded.
        message: String,
    },
    /// An RPC call got no reply within its timeout.
    #[error("rpc call to '{destination}' timed out after {timeout:?}")]
    RpcTimeout {
        /// Where the request was sent (`exchange/routing-key`).
        destination: String,
        /// The timeout that elapsed.
        timeout: Duration,
    },
    /// A configuration value is missing, malformed or out of range.
    #[error("invalid configuration: {variable}={value}: {reason}")]
    InvalidConfig {
        /// The variable or field (e.g. `RABBITMQ_HEARTBEAT`).
        variable: String,
        /// The offending value (passwords are redacted).
        value: String,
        /// What is allowed (e.g. `must be between 10 and 300`).
        reason: String,
    },
    /// The broker cancelled a consumer (for example because its queue was deleted).
    #[error("consumer on queue '{queue}' was cancelled by the broker")]
    ConsumerCancelled {
        /// The queue the consumer was reading.
        queue: String,
    },
    /// A delivery could not be settled (unknown or already settled tag,
    /// channel gone).
    #[error("cannot settle delivery {delivery_tag} from queue '{queue}': {message}")]
    SettleFailed {
        /// The queue the delivery came from.
        queue: String,
        /// The delivery tag.
        delivery_tag: u64,
        /// Why it failed.
        message: String,
    },
    /// The transport does not support what was asked.
    #[error("unsupported by this transport: {feature}")]
    Unsupported {
        /// What is not supported.
        feature: String,
    },
    /// An operation did not finish in time.
    #[error("{operation} timed out after {timeout:?}")]
    Timeout {
        /// The operation.
        operation: String,
        /// The limit that elapsed.
        timeout: Duration,
    },
    /// The transport, worker or client has been shut down.
    #[error("{what} is shut down")]
    Shutdown {
        /// What was shut down.
        what: String,
    },
    /// The broker blocks publishing on the connection (a memory or disk
    /// alarm: `connection.blocked`) and did not unblock it before the
    /// publish's deadline. Consumers keep running; publishing resumes by
    /// itself when the alarm clears.
    #[error("publishing is blocked by the broker ({reason}); not confirmed within {waited:?} — check the broker's memory/disk alarms")]
    Blocked {
        /// The broker's reason (e.g. `low on memory`).
        reason: String,
        /// How long the publish waited.
        waited: Duration,
    },
    /// Any other transport-level failure.
    #[error("transport error: {message}")]
    Transport {
        /// What went wrong.
        message: String,
        /// What the broker said, when the broker refused the operation.
        reply: Option<Box<BrokerReply>>,
    },
}

impl Error {
    /// A stable, machine-readable code for this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::ConnectionFailed { .. } => "connection_failed",
            Error::ConnectionClosed { .. } => "connection_closed",
            Error::ExchangeNotFound { .. } => "exchange_not_found",
            Error::QueueNotFound { .. } => "queue_not_found",
            Error::PreconditionFailed { .. } => "precondition_failed",
            Error::ResourceLocked { .. } => "resource_locked",
            Error::AccessRefused { .. } => "access_refused",
            Error::Unroutable { .. } => "unroutable",
            Error::PublishUnconfirmed { .. } => "publish_unconfirmed",
            Error::DecodeFailed { .. } => "decode_failed",
            Error::EncodeFailed { .. } => "encode_failed",
            Error::RpcTimeout { .. } => "rpc_timeout",
            Error::InvalidConfig { .. } => "invalid_config",
            Error::ConsumerCancelled { .. } => "consumer_cancelled",
            Error::SettleFailed { .. } => "settle_failed",
            Error::Unsupported { .. } => "unsupported",
            Error::Timeout { .. } => "timeout",
            Error::Shutdown { .. } => "shutdown",
            Error::Blocked { .. } => "blocked",
            Error::Transport { .. } => "transport_error",
        }
    }

    /// True when retrying the same operation later may succeed (connection
    /// trouble, timeouts), false for errors that will repeat (missing
    /// entities, bad config, undecodable bodies).
    ///
    /// A broker refusal (not found, access refused, precondition failed,
    /// resource locked) is never transient; a closed connection or a
    /// transport error is, unless the broker's reply code says the
    /// operation itself is wrong (e.g. 530 NOT_ALLOWED, 540 NOT_IMPLEMENTED).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::ConnectionFailed { .. }
            | Error::PublishUnconfirmed { .. }
            | Error::Timeout { .. }
            | Error::Blocked { .. }
            | Error::RpcTimeout { .. } => true,
            Error::ConnectionClosed { reply, .. } | Error::Transport { reply, .. } => {
                reply.as_ref().is_none_or(|r| r.is_transient())
            }
            _ => false,
        }
    }

    /// What the broker said, for errors the broker caused.
    pub fn reply(&self) -> Option<&BrokerReply> {
        match self {
            Error::ExchangeNotFound { reply, .. }
            | Error::QueueNotFound { reply, .. }
            | Error::PreconditionFailed { reply, .. }
            | Error::ResourceLocked { reply, .. }
            | Error::AccessRefused { reply, .. }
            | Error::ConnectionClosed { reply, .. }
            | Error::Transport { reply, .. }
            | Error::Unroutable { reply, .. } => reply.as_deref(),
            _ => None,
        }
    }

    /// Attaches what the broker said (ignored by variants that do not carry it).
    pub fn with_reply(mut self, r: BrokerReply) -> Self {
        match &mut self {
            Error::ExchangeNotFound { reply, .. }
            | Error::QueueNotFound { reply, .. }
            | Error::PreconditionFailed { reply, .. }
            | Error::ResourceLocked { reply, .. }
            | Error::AccessRefused { reply, .. }
            | Error::ConnectionClosed { reply, .. }
            | Error::Transport { reply, .. }
            | Error::Unroutable { reply, .. } => *reply = Some(Box::new(r)),
            _ => {}
        }
        self
    }

    /// The returned message of an [`Error::Unroutable`], when the transport has it.
    pub fn returned_message(&self) -> Option<&Message> {
        match self {
            Error::Unroutable { returned, .. } => returned.as_deref(),
            _ => None,
        }
    }

    /// Shorthand for [`Error::ExchangeNotFound`].
    pub fn exchange_not_found(exchange: impl Into<String>) -> Self {
        Error::ExchangeNotFound {
            exchange: exchange.into(),
            reply: None,
        }
    }

    /// Shorthand for [`Error::QueueNotFound`].
    pub fn queue_not_found(queue: impl Into<String>) -> Self {
        Error::QueueNotFound {
            queue: queue.into(),
            reply: None,
        }
    }

    /// Shorthand for [`Error::PreconditionFailed`].
    pub fn precondition_failed(resource: impl Into<String>, message: impl Into<String>) -> Self {
        Error::PreconditionFailed {
            resource: resource.into(),
            message: message.into(),
            reply: None,
        }
    }

    /// Shorthand for [`Error::ResourceLocked`].
    pub fn resource_locked(resource: impl Into<String>, message: impl Into<String>) -> Self {
        Error::ResourceLocked {
            resource: resource.into(),
            message: message.into(),
            reply: None,
        }
    }

    /// Shorthand for [`Error::AccessRefused`].
    pub fn access_refused(resource: impl Into<String>, message: impl Into<String>) -> Self {
        Error::AccessRefused {
            resource: resource.into(),
            message: message.into(),
            reply: None,
        }
    }

    /// Shorthand for [`Error::ConnectionClosed`].
    pub fn connection_closed(message: impl Into<String>) -> Self {
        Error::ConnectionClosed {
            message: message.into(),
            reply: None,
        }
    }

    /// Shorthand for [`Error::Unroutable`] without the returned message.
    pub fn unroutable(exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        Error::Unroutable {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            reply: None,
            returned: None,
        }
    }

    /// Shorthand for [`Error::DecodeFailed`].
    pub fn decode(message: impl Into<String>) -> Self {
        Error::DecodeFailed {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::EncodeFailed`].
    pub fn encode(message: impl Into<String>) -> Self {
        Error::EncodeFailed {
            message: message.into(),
        }
    }

    /// Shorthand for [`Error::Transport`].
    pub fn transport(message: impl Into<String>) -> Self {
        Error::Transport {
            message: message.into(),
            reply: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_messages_name_the_resource() {
        let e = Error::queue_not_found("orders");
        assert_eq!(e.code(), "queue_not_found");
        assert!(e.to_string().contains("orders"));
        let e = Error::RpcTimeout {
            destination: "ex/rk".into(),
            timeout: Duration::from_millis(50),
        };
        assert_eq!(e.code(), "rpc_timeout");
        assert!(e.is_transient());
        assert!(!Error::decode("x").is_transient());
    }

    #[test]
    fn broker_refusals_are_never_transient_and_keep_the_reply() {
        let e = Error::access_refused("ex", "ACCESS_REFUSED - write access to exchange 'ex' refused")
            .with_reply(BrokerReply::new(403, "ACCESS_REFUSED - write access").caused_by(60, 40));
        assert_eq!(e.code(), "access_refused");
        assert!(!e.is_transient());
        assert_eq!(e.reply().unwrap().code_name(), "ACCESS_REFUSED");
        assert_eq!(e.reply().unwrap().scope, CloseScope::Channel);
        assert_eq!(Error::resource_locked("q", "locked").code(), "resource_locked");
        let forced = Error::connection_closed("x").with_reply(BrokerReply::new(320, "CONNECTION_FORCED"));
        assert!(forced.is_transient());
        assert_eq!(forced.reply().unwrap().scope, CloseScope::Connection);
        let not_allowed = Error::transport("x").with_reply(BrokerReply::new(530, "NOT_ALLOWED - vhost"));
        assert!(!not_allowed.is_transient());
        assert!(Error::transport("socket reset").is_transient());
        assert!(BrokerReply::new(404, "NOT_FOUND")
            .to_string()
            .contains("channel closed"));
    }
}
