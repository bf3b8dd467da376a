//! Mapping of AMQP reply codes and amqprs errors onto [`switchyard_core::Error`].

use switchyard_amqp::errors::{from_reply, Subject as AmqpSubject};
use switchyard_core::{BrokerReply, Error};

/// The entity an operation concerned, to name it in errors.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Subject<'a> {
    /// An exchange.
    Exchange(&'a str),
    /// A queue.
    Queue(&'a str),
}

impl Subject<'_> {}

/// Maps a channel (or connection) close with `code` / `text`, caused by an
/// operation on `subject`, to an error.
pub(crate) fn close_error(code: u16, text: &str, subject: Subject<'_>) -> Error {
    let subject = match subject {
        Subject::Exchange(n) => AmqpSubject::Exchange(n),
        Subject::Queue(n) => AmqpSubject::Queue(n),
    };
    from_reply(BrokerReply::new(code, text), subject)
}

/// The error a publish gets when its channel closed with `code` / `text`.
pub(crate) fn publish_close_error(code: u16, text: &str, exchange: &str, routing_key: &str) -> Error {
    match code {
        404 => close_error(code, text, Subject::Exchange(exchange)),
        403 => close_error(code, text, Subject::Exchange(exchange)),
        406 => Error::PreconditionFailed {
            reply: None,
            resource: exchange.into(),
            message: text.into(),
        },
        _ => Error::PublishUnconfirmed {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            message: format!("channel closed: {code} {text}"),
        },
    }
}

/// Maps an amqprs error when the channel gave no close reason.
pub(crate) fn client_error(e: amqprs::error::Error) -> Error {
    use amqprs::error::Error as E;
    match e {
        E::NetworkError(m) | E::ConnectionOpenError(m) => Error::ConnectionFailed { message: m },
        E::InternalChannelError(m) | E::ChannelCloseError(m) | E::ConnectionCloseError(m) => Error::ConnectionClosed {
            reply: None,
            message: m,
        },
        other => Error::transport(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_codes_map_to_stable_errors_naming_the_resource() {
        let e = close_error(404, "NOT_FOUND - no queue 'orders' in vhost '/'", Subject::Queue("x"));
        assert!(matches!(&e, Error::QueueNotFound { queue, .. } if queue == "orders"));
        let e = close_error(404, "NOT_FOUND - no exchange 'ev' in vhost '/'", Subject::Queue("q"));
        assert!(matches!(&e, Error::ExchangeNotFound { exchange, .. } if exchange == "ev"));
        let e = close_error(
            406,
            "PRECONDITION_FAILED - inequivalent arg 'durable'",
            Subject::Queue("q"),
        );
        assert_eq!(e.code(), "precondition_failed");
        assert!(e.to_string().contains("'q'"));
        assert_eq!(
            close_error(405, "RESOURCE_LOCKED", Subject::Queue("q")).code(),
            "resource_locked"
        );
        let e = close_error(
            403,
            "ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use",
            Subject::Queue("q"),
        );
        assert_eq!(e.code(), "access_refused");
        assert_eq!(
            close_error(320, "CONNECTION_FORCED", Subject::Queue("q")).code(),
            "connection_closed"
        );
        let e = publish_close_error(406, "PRECONDITION_FAILED - user_id property set to 'x'", "ex", "rk");
        assert_eq!(e.code(), "precondition_failed");
    }
}
