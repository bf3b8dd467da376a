//! Broker replies to switchyard errors, by reply code — never by matching
//! client-library error texts.
//!
//! A client adapter turns what its library reports into a [`BrokerReply`]
//! (reply code and text of the broker's `channel.close` /
//! `connection.close`, class and method ids, scope) and calls [`from_reply`]
//! with the entity the operation concerned. Every variant keeps the reply
//! ([`Error::reply`]).
//!
//! ```
//! use switchyard_amqp::errors::{from_reply, Subject};
//! use switchyard_core::BrokerReply;
//! let e = from_reply(
//!     BrokerReply::new(404, "NOT_FOUND - no exchange 'ev' in vhost '/'").caused_by(60, 40),
//!     Subject::Publish { exchange: "ev", routing_key: "k" },
//! );
//! assert_eq!(e.code(), "exchange_not_found");
//! assert_eq!(e.reply().unwrap().class_id, 60);
//! ```

use switchyard_core::{BrokerReply, Error};

/// The entity an operation concerned, to name it in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// An exchange (declare, delete, bind destination).
    Exchange(&'a str),
    /// A queue (declare, delete, purge, consume, bind destination).
    Queue(&'a str),
    /// A publish.
    Publish {
        /// The exchange published to.
        exchange: &'a str,
        /// The routing key.
        routing_key: &'a str,
    },
    /// Nothing in particular (opening a channel, QoS).
    Other,
}

impl Subject<'_> {
    /// The name of the entity ("" for [`Subject::Other`]).
    pub fn name(&self) -> &str {
        match self {
            Subject::Exchange(n) | Subject::Queue(n) => n,
            Subject::Publish { exchange, .. } => exchange,
            Subject::Other => "",
        }
    }
}

/// Extracts `name` from `... <marker>name' ...` (RabbitMQ quotes names).
pub fn quoted_after<'t>(text: &'t str, marker: &str) -> Option<&'t str> {
    let start = text.find(marker)? + marker.len();
    let rest = &text[start..];
    let end = rest.find('\'')?;
    Some(&rest[..end])
}

/// The resource RabbitMQ names in `text` (`exchange 'x'`, `queue 'q'`), if any.
fn named_resource(text: &str) -> Option<&str> {
    quoted_after(text, "exchange '").or_else(|| quoted_after(text, "queue '"))
}

/// Maps what the broker said about an operation on `subject` to an error
/// carrying the reply.
pub fn from_reply(reply: BrokerReply, subject: Subject<'_>) -> Error {
    let text = reply.text.clone();
    let resource = named_resource(&text).unwrap_or(subject.name()).to_owned();
    let e = match reply.code {
        404 => {
            if let Some(name) = quoted_after(&text, "no exchange '") {
                Error::exchange_not_found(name)
            } else if let Some(name) = quoted_after(&text, "no queue '") {
                Error::queue_not_found(name)
            } else {
                match subject {
                    Subject::Queue(n) => Error::queue_not_found(n),
                    other => Error::exchange_not_found(other.name()),
                }
            }
        }
        403 => Error::access_refused(resource, text),
        405 => Error::resource_locked(resource, text),
        406 => Error::precondition_failed(resource, text),
        200 | 320 => Error::connection_closed(format!("the broker closed the connection: {text}")),
        _ => Error::transport(format!(
            "{} {text}{}",
            reply.code,
            if subject.name().is_empty() {
                String::new()
            } else {
                format!(" (on '{}')", subject.name())
            }
        )),
    };
    e.with_reply(reply)
}

/// True when a channel closed with `reply` was closed because of a publish
/// to `exchange` by a message with `user_id` set or not: such a publish
/// fails with the broker's error instead of being sent again. Other
/// publishes on that channel are republished on a fresh one.
pub fn publish_caused_close(reply: &BrokerReply, exchange: &str, has_user_id: bool) -> bool {
    match reply.code {
        404 | 403 => named_resource(&reply.text).is_some_and(|n| n == exchange) || (reply.code == 403 && has_user_id),
        406 => has_user_id && reply.text.contains("user_id"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, text: &str) -> BrokerReply {
        BrokerReply::new(code, text)
    }

    #[test]
    fn reply_codes_map_to_stable_errors_naming_the_resource() {
        let e = from_reply(
            r(404, "NOT_FOUND - no queue 'orders' in vhost '/'"),
            Subject::Queue("x"),
        );
        assert!(matches!(&e, Error::QueueNotFound { queue, .. } if queue == "orders"));
        let e = from_reply(r(404, "NOT_FOUND - no exchange 'ev' in vhost '/'"), Subject::Queue("q"));
        assert!(matches!(&e, Error::ExchangeNotFound { exchange, .. } if exchange == "ev"));
        let e = from_reply(
            r(406, "PRECONDITION_FAILED - inequivalent arg 'durable'"),
            Subject::Queue("q"),
        );
        assert_eq!(e.code(), "precondition_failed");
        assert!(e.to_string().contains("'q'"));
        assert_eq!(
            from_reply(r(405, "RESOURCE_LOCKED"), Subject::Queue("q")).code(),
            "resource_locked"
        );
        let e = from_reply(
            r(403, "ACCESS_REFUSED - queue 'q' in vhost '/' in exclusive use"),
            Subject::Queue("q"),
        );
        assert_eq!(e.code(), "access_refused");
        assert!(!e.is_transient());
        let e = from_reply(
            r(
                403,
                "ACCESS_REFUSED - write access to exchange 'locked' in vhost '/' refused for user 'u'",
            ),
            Subject::Publish {
                exchange: "locked",
                routing_key: "k",
            },
        );
        assert!(matches!(&e, Error::AccessRefused { resource, .. } if resource == "locked"));
        let e = from_reply(
            r(320, "CONNECTION_FORCED - broker forced connection closure"),
            Subject::Other,
        );
        assert_eq!(e.code(), "connection_closed");
        assert!(e.is_transient());
        let e = from_reply(r(530, "NOT_ALLOWED - access to vhost 'x' refused"), Subject::Other);
        assert_eq!(e.code(), "transport_error");
        assert!(!e.is_transient(), "a 530 repeats");
        assert_eq!(e.reply().unwrap().code, 530);
    }

    #[test]
    fn publish_blame_follows_the_named_exchange() {
        let missing = r(404, "NOT_FOUND - no exchange 'gone' in vhost '/'");
        assert!(publish_caused_close(&missing, "gone", false));
        assert!(!publish_caused_close(&missing, "here", false));
        let uid = r(
            406,
            "PRECONDITION_FAILED - user_id property set to 'x' but authenticated user was 'guest'",
        );
        assert!(publish_caused_close(&uid, "any", true));
        assert!(!publish_caused_close(&uid, "any", false));
        assert!(!publish_caused_close(&r(320, "CONNECTION_FORCED"), "any", false));
    }
}
