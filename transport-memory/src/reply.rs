//! The broker's refusals, as RabbitMQ 3.10 words them: every error the
//! memory broker raises for a refused operation carries a
//! [`BrokerReply`] with RabbitMQ's reply code and text and the AMQP class
//! and method ids of the operation, as the RabbitMQ transports report them.

use switchyard_core::{BrokerReply, Error};

/// The AMQP method an operation is (class id, method id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    ExchangeDeclare,
    ExchangeDelete,
    ExchangeBind,
    ExchangeUnbind,
    QueueDeclare,
    QueueBind,
    QueuePurge,
    QueueDelete,
    QueueUnbind,
    BasicConsume,
    BasicPublish,
    BasicGet,
}

impl Op {
    /// `(class id, method id)` of the method in AMQP 0-9-1.
    pub(crate) fn ids(self) -> (u16, u16) {
        match self {
            Op::ExchangeDeclare => (40, 10),
            Op::ExchangeDelete => (40, 20),
            Op::ExchangeBind => (40, 30),
            Op::ExchangeUnbind => (40, 40),
            Op::QueueDeclare => (50, 10),
            Op::QueueBind => (50, 20),
            Op::QueuePurge => (50, 30),
            Op::QueueDelete => (50, 40),
            Op::QueueUnbind => (50, 50),
            Op::BasicConsume => (60, 20),
            Op::BasicPublish => (60, 40),
            Op::BasicGet => (60, 70),
        }
    }

    /// `exchange.bind`/`queue.bind` (or the unbinds) for a binding.
    pub(crate) fn bind(destination_is_exchange: bool) -> Op {
        if destination_is_exchange {
            Op::ExchangeBind
        } else {
            Op::QueueBind
        }
    }

    /// `exchange.unbind` or `queue.unbind` for a binding.
    pub(crate) fn unbind(destination_is_exchange: bool) -> Op {
        if destination_is_exchange {
            Op::ExchangeUnbind
        } else {
            Op::QueueUnbind
        }
    }
}

fn reply(op: Op, code: u16, text: String) -> BrokerReply {
    let (class, method) = op.ids();
    BrokerReply::new(code, text).caused_by(class, method)
}

/// 403 ACCESS_REFUSED - `detail`.
pub(crate) fn access_refused(op: Op, resource: &str, detail: impl std::fmt::Display) -> Error {
    let text = format!("ACCESS_REFUSED - {detail}");
    Error::access_refused(resource, text.clone()).with_reply(reply(op, 403, text))
}

/// 403 for the default exchange, in RabbitMQ's words.
pub(crate) fn default_exchange(op: Op) -> Error {
    access_refused(op, "", "operation not permitted on the default exchange")
}

/// 406 PRECONDITION_FAILED - `detail`.
pub(crate) fn precondition_failed(op: Op, resource: &str, detail: impl std::fmt::Display) -> Error {
    let text = format!("PRECONDITION_FAILED - {detail}");
    Error::precondition_failed(resource, text.clone()).with_reply(reply(op, 406, text))
}

/// 405 RESOURCE_LOCKED for an exclusive queue of another connection.
pub(crate) fn locked(op: Op, queue: &str) -> Error {
    let text = format!(
        "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{queue}' in vhost '/'. It could be \
         originally declared on another connection or the exclusive property value does not match that of the \
         original declaration."
    );
    Error::resource_locked(queue, text.clone()).with_reply(reply(op, 405, text))
}

/// 404 NOT_FOUND for a queue.
pub(crate) fn no_queue(op: Op, queue: &str) -> Error {
    Error::queue_not_found(queue).with_reply(reply(op, 404, format!("NOT_FOUND - no queue '{queue}' in vhost '/'")))
}

/// 404 NOT_FOUND for an exchange.
pub(crate) fn no_exchange(op: Op, exchange: &str) -> Error {
    Error::exchange_not_found(exchange).with_reply(reply(
        op,
        404,
        format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'"),
    ))
}

/// 312 NO_ROUTE: a mandatory publish that reached no queue (`basic.return`).
pub(crate) fn no_route(exchange: &str, routing_key: &str) -> Error {
    Error::Unroutable {
        exchange: exchange.to_owned(),
        routing_key: routing_key.to_owned(),
        reply: Some(Box::new(reply(Op::BasicPublish, 312, "NO_ROUTE".to_owned()))),
        returned: None,
    }
}
