//! Errors with stable codes.
//!
//! Every variant has a [`code`](Error::code) that never changes between
//! releases, so alerts and dashboards can match on it, and each carries the
//! queue or exchange it concerns.

use std::time::Duration;

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
    },
    /// The exchange does not exist (AMQP 404 on an exchange).
    #[error("exchange '{exchange}' not found: declare it first")]
    ExchangeNotFound {
        /// The missing exchange.
        exchange: String,
    },
    /// The queue does not exist (AMQP 404 on a queue).
    #[error("queue '{queue}' not found: declare it first")]
    QueueNotFound {
        /// The missing queue.
        queue: String,
    },
    /// A declaration conflicts with an existing entity (AMQP 406), or an
    /// operation's precondition (if-unused, if-empty) does not hold.
    #[error("precondition failed on '{resource}': {message}")]
    PreconditionFailed {
        /// The queue or exchange concerned.
        resource: String,
        /// The broker's explanation.
        message: String,
    },
    /// An exclusive queue is owned by another connection (AMQP 405), or an
    /// exclusive consumer already holds the queue.
    #[error("resource '{resource}' is locked: {message}")]
    ResourceLocked {
        /// The queue concerned.
        resource: String,
        /// The broker's explanation.
        message: String,
    },
    /// A mandatory publish matched no queue and was returned by the broker.
    #[error("message to exchange '{exchange}' with routing key '{routing_key}' was unroutable (no queue bound)")]
    Unroutable {
        /// The exchange published to (empty for the default exchange).
        exchange: String,
        /// The routing key used.
        routing_key: String,
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
    /// Any other transport-level failure.
    #[error("transport error: {message}")]
    Transport {
        /// What went wrong.
        message: String,
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
            Error::Transport { .. } => "transport_error",
        }
    }

    /// True when retrying the same operation later may succeed (connection
    /// trouble, timeouts), false for errors that will repeat (missing
    /// entities, bad config, undecodable bodies).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::ConnectionFailed { .. }
                | Error::ConnectionClosed { .. }
                | Error::PublishUnconfirmed { .. }
                | Error::Timeout { .. }
                | Error::RpcTimeout { .. }
                | Error::Transport { .. }
        )
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable_and_messages_name_the_resource() {
        let e = Error::QueueNotFound { queue: "orders".into() };
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
}
