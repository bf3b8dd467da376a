//! Scenarios that hold the memory broker to RabbitMQ's answers where it
//! used to differ (issue 9, "the memory broker as RabbitMQ's twin"): the
//! reply codes of refusals, queue argument validation and equivalence,
//! sender-selected distribution (`CC`/`BCC`), max length on requeue and
//! cancel. Each was probed on RabbitMQ 3.10.8 with
//! `transport-memory/scripts/probe-twin.py` (see `docs/rabbitmq-semantics.md`).

use super::support::*;
use super::{case, Case};
use crate::error::Error;
use crate::message::Message;
use crate::topology::{Binding, Destination, ExchangeKind, ExchangeSpec, QueueSpec};

/// The twin scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![case!(twin::refusals_carry_rabbitmq_reply_codes)]
}

/// Fails unless `result` is an error with `code` and, when the transport
/// reports the broker's reply, with AMQP `reply_code` caused by the method
/// `(class, method)` (when the transport knows the method).
pub(crate) fn expect_reply<T: std::fmt::Debug>(
    what: &str,
    result: Result<T, Error>,
    code: &str,
    reply_code: u16,
    class_method: (u16, u16),
) -> Result<Error, String> {
    let e = expect_code(what, result, code)?;
    if let Some(r) = e.reply() {
        ensure_eq(&format!("{what}: reply code ({r})"), r.code, reply_code)?;
        if r.class_id != 0 {
            ensure_eq(
                &format!("{what}: class and method of the refused operation ({r})"),
                (r.class_id, r.method_id),
                class_method,
            )?;
        }
    }
    Ok(e)
}

async fn refusals_carry_rabbitmq_reply_codes(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    let reserved = format!("amq.{}", ctx.name("reserved"));
    expect_reply(
        "declare an exchange with the reserved prefix amq.",
        t.declare_exchange(&ExchangeSpec::direct(reserved.clone())).await,
        "access_refused",
        403,
        (40, 10),
    )?;
    expect_reply(
        "declare a queue with the reserved prefix amq.",
        t.declare_queue(&QueueSpec::new(reserved.clone())).await,
        "access_refused",
        403,
        (50, 10),
    )?;
    expect_reply(
        "declare the default exchange",
        t.declare_exchange(&ExchangeSpec::direct("")).await,
        "access_refused",
        403,
        (40, 10),
    )?;
    let q = ctx.queue("q").await?;
    let x = ctx.exchange("x", ExchangeKind::Direct).await?;
    expect_reply(
        "bind a queue to the default exchange",
        t.bind(&Binding::queue(q.clone(), "", "k")).await,
        "access_refused",
        403,
        (50, 20),
    )?;
    expect_reply(
        "bind the default exchange to an exchange",
        t.bind(&Binding::exchange("", x.clone(), "k")).await,
        "access_refused",
        403,
        (40, 30),
    )?;
    expect_reply(
        "unbind a queue from the default exchange",
        t.unbind(&Binding::queue(q.clone(), "", "k")).await,
        "access_refused",
        403,
        (50, 50),
    )?;
    expect_reply(
        "delete the system exchange amq.direct",
        t.delete_exchange("amq.direct").await,
        "access_refused",
        403,
        (40, 20),
    )?;
    expect_reply(
        "delete the default exchange",
        t.delete_exchange("").await,
        "access_refused",
        403,
        (40, 20),
    )?;
    let mut internal = ExchangeSpec::direct(ctx.exchange_name("internal"));
    internal.internal = true;
    t.declare_exchange(&internal).await.ctx("declare an internal exchange")?;
    ctx.bind(&q, &internal.name, "k").await?;
    expect_reply(
        "publish to an internal exchange",
        ctx.transport()
            .publish(&Destination::new(internal.name.as_str(), "k"), Message::new("nope"))
            .await,
        "access_refused",
        403,
        (60, 40),
    )?;
    // The other classes keep their codes.
    expect_reply(
        "redeclare a queue with durable=false",
        t.declare_queue(&QueueSpec::new(q.clone()).durable(false)).await,
        "precondition_failed",
        406,
        (50, 10),
    )?;
    expect_reply(
        "redeclare an exchange as topic",
        t.declare_exchange(&ExchangeSpec::topic(x.clone())).await,
        "precondition_failed",
        406,
        (40, 10),
    )?;
    let missing = ctx.queue_name("missing");
    expect_reply(
        "passive declare of a missing queue",
        t.queue_info(&missing).await,
        "queue_not_found",
        404,
        (50, 10),
    )?;
    expect_reply(
        "purge a missing queue",
        t.purge_queue(&missing).await,
        "queue_not_found",
        404,
        (50, 30),
    )?;
    expect_reply(
        "bind to a missing exchange",
        t.bind(&Binding::queue(q.clone(), ctx.exchange_name("missing"), "k")).await,
        "exchange_not_found",
        404,
        (50, 20),
    )?;
    expect_reply(
        "publish to a missing exchange",
        t.publish(
            &Destination::new(ctx.exchange_name("missing").as_str(), "k"),
            Message::new("nope"),
        )
        .await,
        "exchange_not_found",
        404,
        (60, 40),
    )?;
    // Nothing was delivered through the internal exchange.
    ensure_eq("queue behind the internal exchange", ctx.drain(&q).await?, Vec::<String>::new())
}
