//! Scenarios that hold the memory broker to RabbitMQ's answers where it
//! used to differ (issue 9, "the memory broker as RabbitMQ's twin"): the
//! reply codes of refusals, queue argument validation and equivalence,
//! sender-selected distribution (`CC`/`BCC`), max length on requeue and
//! cancel. Each was probed on RabbitMQ 3.10.8 with
//! `transport-memory/scripts/probe-twin.py` (see `docs/rabbitmq-semantics.md`).

use super::support::*;
use super::{case, expect_nothing, recv, Case};
use crate::error::Error;
use crate::message::{HeaderValue, Message};
use crate::topology::{Binding, Destination, ExchangeKind, ExchangeSpec, QueueSpec};
use crate::transport::ConsumeOptions;

/// The twin scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(twin::refusals_carry_rabbitmq_reply_codes),
        case!(twin::cc_and_bcc_route_copies),
        case!(twin::cc_and_bcc_keys_route_dead_letters, DeadLettering),
    ]
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
    t.declare_exchange(&internal)
        .await
        .ctx("declare an internal exchange")?;
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
        t.bind(&Binding::queue(q.clone(), ctx.exchange_name("missing"), "k"))
            .await,
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
    ensure_eq(
        "queue behind the internal exchange",
        ctx.drain(&q).await?,
        Vec::<String>::new(),
    )
}

fn keys(list: &[&str]) -> HeaderValue {
    HeaderValue::Array(list.iter().map(|k| HeaderValue::String((*k).to_owned())).collect())
}

/// Receives the one message waiting in `queue` (acked), failing if there is
/// none or more than one.
async fn only_message(ctx: &Ctx<'_>, queue: &str) -> Result<Message, String> {
    let mut sub = ctx.consume(queue, ConsumeOptions::default().prefetch(10)).await?;
    let d = recv(&mut sub, WAIT).await?;
    let message = d.message.clone();
    d.ack().await.ctx("ack")?;
    expect_nothing(&mut sub, QUIET).await?;
    cancel(&sub).await.ctx("cancel")?;
    Ok(message)
}

async fn cc_and_bcc_route_copies(ctx: &Ctx<'_>) -> Result<(), String> {
    let x = ctx.exchange("x", ExchangeKind::Direct).await?;
    let mut qs = Vec::new();
    for k in ["a", "b", "c"] {
        let q = ctx.queue(k).await?;
        ctx.bind(&q, &x, k).await?;
        qs.push(q);
    }
    let m = Message::new("m1")
        .with_header("CC", keys(&["b"]))
        .with_header("BCC", keys(&["c"]));
    ctx.publish_message(&Destination::new(x.as_str(), "a"), m).await?;
    for q in &qs {
        let got = only_message(ctx, q).await?;
        ensure_eq(&format!("body in {q}"), &got.body[..], b"m1")?;
        ensure_eq(
            &format!("CC header in {q} (kept)"),
            got.headers.get("CC"),
            Some(&keys(&["b"])),
        )?;
        ensure_eq(&format!("BCC header in {q} (stripped)"), got.headers.get("BCC"), None)?;
    }
    // Each queue gets one copy, however many of its keys are listed.
    let m = Message::new("m2")
        .with_header("CC", keys(&["a", "b"]))
        .with_header("BCC", keys(&["b", "a"]));
    ctx.publish_message(&Destination::new(x.as_str(), "a"), m).await?;
    ensure_eq("queue a", ctx.drain(&qs[0]).await?, vec!["m2".to_string()])?;
    ensure_eq("queue b", ctx.drain(&qs[1]).await?, vec!["m2".to_string()])?;
    ensure_eq("queue c", ctx.drain(&qs[2]).await?, Vec::<String>::new())?;
    // The default exchange routes CC/BCC keys as queue names too.
    let m = Message::new("m3")
        .with_header("CC", keys(&[qs[1].as_str()]))
        .with_header("BCC", keys(&[qs[2].as_str()]));
    ctx.publish_message(&Destination::queue(qs[0].as_str()), m).await?;
    for q in &qs {
        ensure_eq(
            &format!("default exchange copy in {q}"),
            ctx.drain(q).await?,
            vec!["m3".to_string()],
        )?;
    }
    Ok(())
}

async fn cc_and_bcc_keys_route_dead_letters(ctx: &Ctx<'_>) -> Result<(), String> {
    let x = ctx.exchange("x", ExchangeKind::Direct).await?;
    let dlx = ctx.exchange("dlx", ExchangeKind::Direct).await?;
    let mut dead = Vec::new();
    for k in ["d", "e", "f", "r"] {
        let q = ctx.queue(&format!("dead-{k}")).await?;
        ctx.bind(&q, &dlx, k).await?;
        dead.push(q);
    }
    let plain = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("src")).dead_letter(dlx.as_str(), None))
        .await?;
    let keyed = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("src-rk")).dead_letter(dlx.as_str(), Some("r")))
        .await?;
    ctx.bind(&plain, &x, "d").await?;
    ctx.bind(&keyed, &x, "d").await?;
    let m = Message::new("dead")
        .with_header("CC", keys(&["e"]))
        .with_header("BCC", keys(&["f"]));
    ctx.publish_message(&Destination::new(x.as_str(), "d"), m).await?;
    for q in [&plain, &keyed] {
        let mut sub = ctx.consume(q, ConsumeOptions::default()).await?;
        let d = recv(&mut sub, WAIT).await?;
        ensure_eq(&format!("BCC header in {q}"), d.message.headers.get("BCC"), None)?;
        d.reject(false).await.ctx("reject")?;
        cancel(&sub).await.ctx("cancel")?;
    }
    let death_keys = |m: &Message| -> Option<HeaderValue> {
        match m.headers.get("x-death") {
            Some(HeaderValue::Array(a)) => a.first()?.as_table()?.get("routing-keys").cloned(),
            _ => None,
        }
    };
    // Without x-dead-letter-routing-key: routed by the routing key, CC and
    // BCC keys (one copy per queue); CC kept; x-death lists the routing key
    // and the CC keys only.
    for q in &dead[..3] {
        let got = only_message(ctx, q).await?;
        ensure_eq(
            &format!("x-death routing-keys of the dead letter in {q}"),
            death_keys(&got),
            Some(keys(&["d", "e"])),
        )?;
        ensure_eq(
            &format!("CC of the dead letter in {q}"),
            got.headers.get("CC"),
            Some(&keys(&["e"])),
        )?;
        ensure_eq(&format!("BCC of the dead letter in {q}"), got.headers.get("BCC"), None)?;
    }
    // With it: routed by that key alone, and the CC header is gone.
    let got = only_message(ctx, &dead[3]).await?;
    ensure_eq(
        "x-death routing-keys with x-dead-letter-routing-key",
        death_keys(&got),
        Some(keys(&["d", "e"])),
    )?;
    ensure_eq("CC with x-dead-letter-routing-key", got.headers.get("CC"), None)
}
