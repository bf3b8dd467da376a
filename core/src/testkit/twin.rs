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
        case!(twin::invalid_queue_arguments_are_refused_on_first_declare),
        case!(twin::queue_equivalence_compares_known_arguments),
        case!(twin::default_exchange_cc_copies_keep_the_published_key),
        case!(twin::requeued_message_past_its_ttl_expires, MessageTtl, DeadLettering),
        case!(
            twin::get_count_excludes_expired_messages_behind_the_taken_one,
            MessageTtl
        ),
        case!(
            twin::get_counts_before_its_dead_letters_come_back,
            MessageTtl,
            DeadLettering,
            MaxLength
        ),
        case!(twin::consumer_gets_the_messages_behind_an_expired_one, MessageTtl),
        case!(twin::exchanges_are_routed_once_with_every_key),
        case!(twin::alternate_exchange_only_when_no_binding_matched),
        case!(twin::priority_queue_expires_only_at_its_head, Priorities, MessageTtl),
        case!(
            twin::dead_letter_follows_the_publish_that_caused_it,
            MessageTtl,
            DeadLettering
        ),
        case!(
            twin::dead_letter_cycles_follow_the_regrouped_x_death,
            MessageTtl,
            DeadLettering
        ),
        case!(twin::blocked_consumer_rejoins_the_round_robin_at_the_back),
        case!(twin::new_consumer_joins_the_round_robin_at_the_back),
        case!(twin::blocked_consumer_rejoins_behind_its_priority, ConsumerPriorities),
        case!(
            twin::message_ahead_by_priority_expires_only_when_dropped_at_the_head,
            Priorities,
            MessageTtl
        ),
        case!(twin::reject_dead_letters_after_the_queue_delivers, DeadLettering),
        case!(
            twin::dead_letter_takes_the_place_of_an_expired_copy,
            MessageTtl,
            DeadLettering
        ),
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

/// Declares `spec` expecting RabbitMQ's 406 with `text` in its reply text
/// (when the transport reports it).
async fn expect_refused(ctx: &Ctx<'_>, what: &str, spec: &QueueSpec, text: &str) -> Result<(), String> {
    let e = expect_reply(
        what,
        ctx.transport().declare_queue(spec).await,
        "precondition_failed",
        406,
        (50, 10),
    )?;
    if let Some(r) = e.reply() {
        ensure(r.text.contains(text), || {
            format!("{what}: the reply text should contain \"{text}\", got \"{}\"", r.text)
        })?;
    }
    Ok(())
}

fn with_extra(spec: QueueSpec, key: &str, value: impl Into<HeaderValue>) -> QueueSpec {
    let mut spec = spec;
    spec.arguments.extra.insert(key, value);
    spec
}

async fn invalid_queue_arguments_are_refused_on_first_declare(ctx: &Ctx<'_>) -> Result<(), String> {
    let fresh = |suffix: &str| QueueSpec::new(ctx.queue_name(suffix));
    let cases: Vec<(&str, QueueSpec, &str)> = vec![
        (
            "x-message-ttl as a string",
            with_extra(fresh("ttl-str"), "x-message-ttl", "1000"),
            "invalid arg 'x-message-ttl'",
        ),
        (
            "x-message-ttl negative",
            with_extra(fresh("ttl-neg"), "x-message-ttl", HeaderValue::I32(-1)),
            "{value_negative,-1}",
        ),
        (
            "x-expires 0",
            with_extra(fresh("exp-0"), "x-expires", HeaderValue::I32(0)),
            "{value_zero,0}",
        ),
        (
            "x-max-length negative",
            with_extra(fresh("len-neg"), "x-max-length", HeaderValue::I64(-1)),
            "invalid arg 'x-max-length'",
        ),
        (
            "x-overflow unknown",
            with_extra(fresh("ovf"), "x-overflow", "bogus"),
            "invalid_overflow",
        ),
        (
            "x-max-priority 256",
            with_extra(fresh("prio"), "x-max-priority", HeaderValue::I32(256)),
            "{max_value_exceeded,256}",
        ),
        (
            "x-dead-letter-routing-key without a dead-letter exchange",
            with_extra(fresh("dlrk"), "x-dead-letter-routing-key", "k"),
            "routing_key_but_no_dlx_defined",
        ),
        (
            "x-single-active-consumer as a string",
            with_extra(fresh("sac"), "x-single-active-consumer", "true"),
            "invalid arg 'x-single-active-consumer'",
        ),
        (
            "x-queue-type unknown",
            with_extra(fresh("type"), "x-queue-type", "bogus"),
            "unsupported queue type 'bogus'",
        ),
        (
            "x-delivery-limit on a classic queue",
            fresh("limit").delivery_limit(3),
            "invalid arg 'x-delivery-limit'",
        ),
    ];
    for (what, spec, text) in &cases {
        expect_refused(ctx, &format!("first declare with {what}"), spec, text).await?;
        expect_code(
            &format!("queue_info after the refused declare with {what}"),
            ctx.transport().queue_info(&spec.name).await,
            "queue_not_found",
        )?;
    }
    // Accepted: x-max-priority 0 (no priorities) and unknown x- arguments.
    let q = ctx.declare_queue(fresh("prio-0").max_priority(0)).await?;
    ctx.publish_message(&Destination::queue(q.as_str()), Message::new("low").with_priority(0))
        .await?;
    ctx.publish_message(&Destination::queue(q.as_str()), Message::new("high").with_priority(9))
        .await?;
    ensure_eq(
        "x-max-priority 0 queue order (FIFO)",
        ctx.drain(&q).await?,
        vec!["low".to_owned(), "high".to_owned()],
    )?;
    ctx.declare_queue(with_extra(fresh("unknown"), "x-unknown", "whatever"))
        .await
        .map(|_| ())
}

async fn queue_equivalence_compares_known_arguments(ctx: &Ctx<'_>) -> Result<(), String> {
    let name = ctx.queue_name("eq");
    let base = with_extra(
        with_extra(
            QueueSpec::new(name.clone())
                .message_ttl(std::time::Duration::from_secs(1))
                .max_length(10, crate::topology::Overflow::DropHead),
            "x-foo",
            "a",
        ),
        "x-max-length-bytes",
        HeaderValue::I32(1000),
    );
    ctx.declare_queue(base.clone()).await?;
    let t = ctx.transport();
    // Equivalent: RabbitMQ ignores unknown x- arguments and x-delivery-limit,
    // compares integers by value whatever their widths, and takes an absent
    // x-queue-type as classic.
    let mut no_foo = base.clone();
    no_foo.arguments.extra.remove("x-foo");
    let mut ttl_as_int = base.clone();
    ttl_as_int.arguments.message_ttl = None;
    ttl_as_int
        .arguments
        .extra
        .insert("x-message-ttl", HeaderValue::I32(1000));
    let mut bytes_as_long = base.clone();
    bytes_as_long
        .arguments
        .extra
        .insert("x-max-length-bytes", HeaderValue::I64(1000));
    let equivalent: Vec<(&str, QueueSpec)> = vec![
        ("identical arguments", base.clone()),
        ("x-foo changed", with_extra(base.clone(), "x-foo", "b")),
        ("x-foo left out", no_foo),
        ("x-bar added", with_extra(base.clone(), "x-bar", HeaderValue::I32(1))),
        (
            "x-delivery-limit added",
            with_extra(base.clone(), "x-delivery-limit", HeaderValue::I32(3)),
        ),
        ("x-message-ttl as a signed int", ttl_as_int),
        ("x-max-length-bytes as a long", bytes_as_long),
        (
            "x-queue-type classic added",
            base.clone().queue_type(crate::topology::QueueType::Classic),
        ),
    ];
    for (what, spec) in &equivalent {
        t.declare_queue(spec)
            .await
            .ctx(&format!("redeclare with {what} (RabbitMQ finds it equivalent)"))?;
    }
    let mut ttl_as_string = base.clone();
    ttl_as_string.arguments.message_ttl = None;
    ttl_as_string.arguments.extra.insert("x-message-ttl", "1000");
    let mut no_ttl = base.clone();
    no_ttl.arguments.message_ttl = None;
    let mut no_bytes = base.clone();
    no_bytes.arguments.extra.remove("x-max-length-bytes");
    let inequivalent: Vec<(&str, QueueSpec, &str)> = vec![
        (
            "another x-message-ttl",
            base.clone().message_ttl(std::time::Duration::from_secs(2)),
            "inequivalent arg 'x-message-ttl'",
        ),
        (
            "x-message-ttl as a string of the same digits",
            ttl_as_string,
            "inequivalent arg 'x-message-ttl'",
        ),
        (
            "x-message-ttl left out",
            no_ttl,
            "received none but current is the value '1000'",
        ),
        (
            "x-max-length-bytes left out",
            no_bytes,
            "inequivalent arg 'x-max-length-bytes'",
        ),
        (
            "x-single-active-consumer false added",
            with_extra(base.clone(), "x-single-active-consumer", false),
            "inequivalent arg 'x-single-active-consumer'",
        ),
        (
            "x-max-priority added",
            base.clone().max_priority(5),
            "inequivalent arg 'x-max-priority'",
        ),
        (
            "x-dead-letter-exchange added",
            base.clone().dead_letter(ctx.name("dlx"), None),
            "inequivalent arg 'x-dead-letter-exchange'",
        ),
    ];
    for (what, spec, text) in &inequivalent {
        expect_refused(ctx, &format!("redeclare with {what}"), spec, text).await?;
    }
    // Explicit x-single-active-consumer=false is not the same as absent.
    let sac = ctx
        .declare_queue(with_extra(
            QueueSpec::new(ctx.queue_name("sac")),
            "x-single-active-consumer",
            false,
        ))
        .await?;
    expect_refused(
        ctx,
        "redeclare without the explicit x-single-active-consumer=false",
        &QueueSpec::new(sac.clone()),
        "inequivalent arg 'x-single-active-consumer'",
    )
    .await?;
    // The refusals changed nothing.
    ctx.publish(&Destination::queue(name.as_str()), "kept").await?;
    ensure_eq(
        "the queue after the refused redeclarations",
        ctx.drain(&name).await?,
        vec!["kept".to_owned()],
    )
}

/// Found by the differential test (`tests/difftest.rs`): a copy the default
/// exchange routes by a `CC` or `BCC` key is delivered with the routing key
/// the message was published with, not with the name of the queue it
/// reached.
async fn default_exchange_cc_copies_keep_the_published_key(ctx: &Ctx<'_>) -> Result<(), String> {
    let direct = ctx.queue("direct").await?;
    let cc = ctx.queue("cc").await?;
    let bcc = ctx.queue("bcc").await?;
    let m = Message::new("m1")
        .with_header("CC", keys(&[cc.as_str()]))
        .with_header("BCC", keys(&[bcc.as_str()]));
    ctx.publish_message(&Destination::queue(direct.as_str()), m).await?;
    // A key that names no queue: only the CC/BCC copies are routed.
    let m = Message::new("m2")
        .with_header("CC", keys(&[cc.as_str()]))
        .with_header("BCC", keys(&[bcc.as_str()]));
    ctx.publish_message(&Destination::queue("#"), m).await?;
    let t = ctx.transport();
    for (q, expected) in [
        (&direct, vec![("m1", direct.as_str())]),
        (&cc, vec![("m1", direct.as_str()), ("m2", "#")]),
        (&bcc, vec![("m1", direct.as_str()), ("m2", "#")]),
    ] {
        let mut got = Vec::new();
        while let Some(g) = t.get(q, true).await.ctx(&format!("get from '{q}'"))? {
            let info = &g.delivery.info;
            got.push((
                body(&g.delivery),
                info.exchange.to_string(),
                info.routing_key.to_string(),
            ));
        }
        let expected: Vec<(String, String, String)> = expected
            .into_iter()
            .map(|(b, k)| (b.to_owned(), String::new(), k.to_owned()))
            .collect();
        ensure_eq(
            &format!("(body, exchange, routing key) of the copies in '{q}'"),
            got,
            expected,
        )?;
    }
    Ok(())
}

/// Found by the differential test: a message handed straight to a consumer
/// still has its queue TTL running from when it was enqueued, so when it is
/// requeued after that time it expires (dead-lettered as `expired`) instead
/// of going back to the queue.
async fn requeued_message_past_its_ttl_expires(ctx: &Ctx<'_>) -> Result<(), String> {
    let dlx = ctx.exchange("dlx", ExchangeKind::Fanout).await?;
    let dead = ctx.queue("dead").await?;
    ctx.bind(&dead, &dlx, "").await?;
    let q = ctx
        .declare_queue(
            QueueSpec::new(ctx.queue_name("src"))
                .message_ttl(std::time::Duration::ZERO)
                .dead_letter(dlx.as_str(), None),
        )
        .await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(1)).await?;
    ctx.publish(&Destination::queue(q.as_str()), "m1").await?;
    // With a TTL of 0 the message is only delivered because a consumer
    // could take it at once.
    let d = recv(&mut sub, WAIT).await?;
    ensure_eq("delivered body", body(&d), "m1".to_string())?;
    cancel(&sub).await.ctx("cancel")?;
    d.nack(true).await.ctx("nack with requeue")?;
    let t = ctx.transport();
    let deadline = tokio::time::Instant::now() + WAIT;
    let g = loop {
        if let Some(g) = t.get(&dead, true).await.ctx("get from the dead-letter queue")? {
            break g;
        }
        ensure(tokio::time::Instant::now() < deadline, || {
            "the requeued message, past its TTL of 0, should be dead-lettered".to_string()
        })?;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    ensure_eq("dead letter body", body(&g.delivery), "m1".to_string())?;
    let reason = g
        .delivery
        .message
        .headers
        .get_str("x-first-death-reason")
        .map(str::to_owned);
    ensure_eq("x-first-death-reason", reason, Some("expired".to_string()))?;
    ensure_eq("depth of the source queue", ctx.depth(&q).await?, 0)
}

/// Found by the differential test: `basic.get` drops the expired messages
/// that the taken one uncovers at the head before it counts what is left
/// (RabbitMQ's `fetch` then `drop_expired_msgs`), so a message with
/// `expiration: 0` right behind the taken one is not counted (one further
/// back is, until it reaches the head).
async fn get_count_excludes_expired_messages_behind_the_taken_one(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let dest = Destination::queue(q.as_str());
    ctx.publish(&dest, "m1").await?;
    ctx.publish_message(&dest, Message::new("m2").with_expiration(std::time::Duration::ZERO))
        .await?;
    ctx.publish(&dest, "m3").await?;
    ctx.publish_message(&dest, Message::new("m4").with_expiration(std::time::Duration::ZERO))
        .await?;
    let t = ctx.transport();
    let mut got = Vec::new();
    while let Some(g) = t.get(&q, true).await.ctx("get")? {
        got.push((body(&g.delivery), g.message_count));
    }
    ensure_eq(
        "(body, message_count) of each get",
        got,
        vec![("m1".to_string(), 2), ("m3".to_string(), 0)],
    )
}

/// Found by the differential test (`DIFFTEST_CASE=2372097352038385005`):
/// `basic.get` counts the queue when it replies, before the dead letters
/// its fetch caused are routed, even when one of them comes straight back.
/// Here the taken message uncovers an expired one, whose dead letter
/// overflows a second queue, whose dead letter (by its routing key) returns
/// to the first: the get reports 0 left, and the returned message is got
/// next.
async fn get_counts_before_its_dead_letters_come_back(ctx: &Ctx<'_>) -> Result<(), String> {
    let first = ctx.queue_name("first");
    let full = ctx
        .declare_queue(
            QueueSpec::new(ctx.queue_name("full"))
                .max_length(1, crate::topology::Overflow::DropHead)
                .dead_letter("", None),
        )
        .await?;
    let first = ctx
        .declare_queue(QueueSpec::new(first).dead_letter("", Some(full.as_str())))
        .await?;
    let x = ctx.exchange("x", ExchangeKind::Fanout).await?;
    ctx.bind(&full, &x, "").await?;
    let to_first = Destination::queue(first.as_str());
    ctx.publish(&to_first, "m1").await?;
    ctx.publish_message(&to_first, Message::new("m2").with_expiration(std::time::Duration::ZERO))
        .await?;
    // Into `full` by the fanout exchange, with `first` as its routing key:
    // pushed out by m2's dead letter, it is dead-lettered to `first`.
    ctx.publish(&Destination::new(x.as_str(), first.as_str()), "m3").await?;
    let t = ctx.transport();
    let g = t.get(&first, true).await.ctx("first get")?.ok_or("first: empty")?;
    ensure_eq(
        "(body, message_count) of the first get",
        (body(&g.delivery), g.message_count),
        ("m1".to_string(), 0),
    )?;
    let back = get_n(ctx, &first, 1).await?;
    ensure_eq(
        "the message back in the first queue, with its death",
        (String::from_utf8_lossy(&back[0].body).into_owned(), deaths(&back[0])),
        ("m3".to_string(), vec![(full.to_string(), "maxlen".to_string(), 1)]),
    )?;
    let rest = get_all(ctx, &full).await?;
    ensure_eq(
        "what the full queue holds",
        rest.iter()
            .map(|m| (String::from_utf8_lossy(&m.body).into_owned(), deaths(m)))
            .collect::<Vec<_>>(),
        vec![("m2".to_string(), vec![(first.to_string(), "expired".to_string(), 1)])],
    )
}

/// Found by the differential test: a new consumer is sent what is ready,
/// the expired messages it reaches at the head dropped on the way, not only
/// what comes before the first of them.
async fn consumer_gets_the_messages_behind_an_expired_one(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let dest = Destination::queue(q.as_str());
    ctx.publish(&dest, "m1").await?;
    ctx.publish_message(&dest, Message::new("m2").with_expiration(std::time::Duration::ZERO))
        .await?;
    ctx.publish(&dest, "m3").await?;
    for auto_ack in [true, false] {
        let mut sub = ctx
            .consume(&q, ConsumeOptions::default().auto_ack(auto_ack).prefetch(1))
            .await?;
        let mut got = Vec::new();
        for d in take(&mut sub, if auto_ack { 2 } else { 1 }).await? {
            got.push(body(&d));
            if !auto_ack {
                d.ack().await.ctx("ack")?;
            }
        }
        if !auto_ack {
            got.push(body(&recv(&mut sub, WAIT).await?));
        }
        let expected = if auto_ack { vec!["m1", "m3"] } else { vec!["m4", "m6"] };
        ensure_eq(
            &format!("bodies delivered (auto_ack {auto_ack})"),
            got,
            expected.into_iter().map(String::from).collect(),
        )?;
        expect_nothing(&mut sub, QUIET).await?;
        cancel(&sub).await.ctx("cancel")?;
        // The same with a manual-ack consumer of prefetch 1: the ack of the
        // first delivery brings the one behind the expired message.
        ctx.publish(&dest, "m4").await?;
        ctx.publish_message(&dest, Message::new("m5").with_expiration(std::time::Duration::ZERO))
            .await?;
        ctx.publish(&dest, "m6").await?;
    }
    Ok(())
}

/// Found by the differential test: every exchange a message reaches is
/// routed once, with all its keys (routing key and `CC`), however many
/// bindings lead to it: cycles of exchange-to-exchange bindings end at
/// once, and a `CC` key routes at an exchange reached through the routing
/// key.
async fn exchanges_are_routed_once_with_every_key(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    let loop_x = ctx.exchange("loop", ExchangeKind::Fanout).await?;
    let q = ctx.queue("q").await?;
    ctx.bind(&q, &loop_x, "").await?;
    for k in ["a", "b"] {
        t.bind(&Binding::exchange(loop_x.clone(), loop_x.clone(), k))
            .await
            .ctx("bind the fanout exchange to itself")?;
    }
    let other = ctx.exchange("other", ExchangeKind::Fanout).await?;
    for (s, d) in [(&loop_x, &other), (&other, &loop_x)] {
        t.bind(&Binding::exchange(d.clone(), s.clone(), ""))
            .await
            .ctx("bind the two fanout exchanges both ways")?;
    }
    let started = std::time::Instant::now();
    ctx.publish(&Destination::new(loop_x.as_str(), "k"), "m1").await?;
    ensure(started.elapsed() < std::time::Duration::from_secs(1), || {
        format!("publishing through a cycle of exchanges took {:?}", started.elapsed())
    })?;
    ensure_eq("copies through the cycle", ctx.drain(&q).await?, vec!["m1".to_string()])?;
    // x1 is reached through the routing key "a" and routed with the CC
    // key "b" too.
    let x0 = ctx.exchange("x0", ExchangeKind::Direct).await?;
    let x1 = ctx.exchange("x1", ExchangeKind::Direct).await?;
    t.bind(&Binding::exchange(x1.clone(), x0.clone(), "a"))
        .await
        .ctx("bind x1 to x0 with a")?;
    let qb = ctx.queue("qb").await?;
    ctx.bind(&qb, &x1, "b").await?;
    let m = Message::new("m2").with_header("CC", keys(&["b"]));
    ctx.publish_message(&Destination::new(x0.as_str(), "a"), m).await?;
    ensure_eq(
        "queue bound to x1 with the CC key",
        ctx.drain(&qb).await?,
        vec!["m2".to_string()],
    )
}

/// Found by the differential test: an exchange's alternate exchange takes
/// a message only when none of the exchange's bindings matched it; a match
/// that leads nowhere (an exchange binding to an exchange without queues,
/// a queue already reached another way) does not count as unroutable.
async fn alternate_exchange_only_when_no_binding_matched(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    let ae = ctx.exchange("ae", ExchangeKind::Fanout).await?;
    let caught = ctx.queue("caught").await?;
    ctx.bind(&caught, &ae, "").await?;
    let mut main = ExchangeSpec::direct(ctx.exchange_name("main"));
    main.arguments.insert("alternate-exchange", ae.as_str());
    t.declare_exchange(&main)
        .await
        .ctx("declare an exchange with an alternate exchange")?;
    let empty = ctx.exchange("empty", ExchangeKind::Fanout).await?;
    t.bind(&Binding::exchange(empty.clone(), main.name.clone(), "to-empty"))
        .await
        .ctx("bind an exchange without queues")?;
    ctx.publish(&Destination::new(main.name.as_str(), "to-empty"), "m1")
        .await?;
    ctx.publish(&Destination::new(main.name.as_str(), "nothing"), "m2")
        .await?;
    ensure_eq(
        "messages the alternate exchange took",
        ctx.drain(&caught).await?,
        vec!["m2".to_string()],
    )?;
    expect_code(
        "mandatory publish that only reaches an exchange without queues",
        t.publish_with(
            &Destination::new(main.name.as_str(), "to-empty"),
            Message::new("m3"),
            crate::transport::PublishOptions::mandatory(),
        )
        .await,
        "unroutable",
    )?;
    ensure_eq(
        "nothing more in the alternate queue",
        ctx.drain(&caught).await?,
        Vec::<String>::new(),
    )
}

/// Found by the differential test: in a priority queue too, a message whose
/// TTL has run out expires only once it is at the head (the next to be
/// delivered, highest priority first): behind a higher-priority message
/// that does not expire it is still counted, and it goes when that message
/// is taken.
async fn priority_queue_expires_only_at_its_head(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("q")).max_priority(4))
        .await?;
    let dest = Destination::queue(q.as_str());
    ctx.publish_message(
        &dest,
        Message::new("low").with_expiration(std::time::Duration::from_millis(50)),
    )
    .await?;
    ctx.publish_message(&dest, Message::new("high").with_priority(4))
        .await?;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    ensure_eq(
        "depth with the expired message behind the head",
        ctx.depth(&q).await?,
        2,
    )?;
    let t = ctx.transport();
    let g = t
        .get(&q, true)
        .await
        .ctx("get")?
        .ok_or("the queue should not be empty")?;
    ensure_eq(
        "(body, message_count) of the get",
        (body(&g.delivery), g.message_count),
        ("high".to_string(), 0),
    )?;
    ensure(t.get(&q, true).await.ctx("second get")?.is_none(), || {
        "the expired message should be gone once it reached the head".to_string()
    })
}

/// Found by the differential test: a dead letter caused by a publish (here
/// a queue TTL of 0) is published by the queue after the original message
/// reached every queue it was routed to, so a queue that gets both sees
/// the original first (here the dead-letter exchange is the exchange the
/// message was published to).
async fn dead_letter_follows_the_publish_that_caused_it(ctx: &Ctx<'_>) -> Result<(), String> {
    let x = ctx.exchange("x", ExchangeKind::Fanout).await?;
    let expiring = ctx
        .declare_queue(
            QueueSpec::new(ctx.queue_name("expiring"))
                .message_ttl(std::time::Duration::ZERO)
                .dead_letter(x.as_str(), None),
        )
        .await?;
    // Bound first, so that it comes first in routing order.
    ctx.bind(&expiring, &x, "").await?;
    let both = ctx.queue("both").await?;
    ctx.bind(&both, &x, "").await?;
    let mut sub = ctx
        .consume(&both, ConsumeOptions::default().auto_ack(true).prefetch(1))
        .await?;
    ctx.publish(&Destination::new(x.as_str(), "k"), "m1").await?;
    let mut got = Vec::new();
    for d in take(&mut sub, 2).await? {
        got.push((
            body(&d),
            d.message.headers.get_str("x-first-death-reason").map(str::to_owned),
        ));
    }
    ensure_eq(
        "(body, x-first-death-reason) of the deliveries from the queue bound next to the expiring one",
        got,
        vec![
            ("m1".to_string(), None),
            ("m1".to_string(), Some("expired".to_string())),
        ],
    )?;
    // The dead letter routed back to the queue it expired in is dropped
    // (a cycle): nothing more arrives.
    expect_nothing(&mut sub, QUIET).await?;
    cancel(&sub).await.ctx("cancel")?;
    Ok(())
}

/// `x-death` as (queue, reason, count), in the order the header lists them.
fn deaths(m: &Message) -> Vec<(String, String, i64)> {
    let Some(HeaderValue::Array(a)) = m.headers.get("x-death") else {
        return Vec::new();
    };
    a.iter()
        .filter_map(HeaderValue::as_table)
        .map(|t| {
            (
                t.get_str("queue").unwrap_or_default().to_owned(),
                t.get_str("reason").unwrap_or_default().to_owned(),
                t.get_i64("count").unwrap_or(-1),
            )
        })
        .collect()
}

/// Takes what `queue` holds (`basic.get`, acked), waiting up to [`WAIT`]
/// until there are `n` messages.
async fn get_n(ctx: &Ctx<'_>, queue: &str, n: usize) -> Result<Vec<Message>, String> {
    let t = ctx.transport();
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut got = Vec::new();
    while got.len() < n {
        match t.get(queue, true).await.ctx("get")? {
            Some(g) => got.push(g.delivery.message.clone()),
            None => {
                ensure(tokio::time::Instant::now() < deadline, || {
                    format!("{queue}: {} of {n} messages after {WAIT:?}", got.len())
                })?;
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
    Ok(got)
}

/// Takes what `queue` holds now (`basic.get`, acked).
async fn get_all(ctx: &Ctx<'_>, queue: &str) -> Result<Vec<Message>, String> {
    let mut got = Vec::new();
    while let Some(g) = ctx.transport().get(queue, true).await.ctx("get")? {
        got.push(g.delivery.message.clone());
    }
    Ok(got)
}

/// Found by the differential test (a known divergence until probed with
/// `transport-memory/scripts/probe-twin.py dlx`): before RabbitMQ 3.10
/// records a death it regroups the `x-death` array it has, which reverses
/// it when it has two entries or more; the entry for the queue and reason
/// (incremented, or new) then goes first. Its cycle rule (a dead letter
/// not caused by a rejection is dropped for a queue whose first entry in
/// that list has no `rejected` entry before it or in it) reads that order,
/// so a message rejected once can go round a cycle of TTL queues for ever,
/// while one never rejected is dropped.
async fn dead_letter_cycles_follow_the_regrouped_x_death(ctx: &Ctx<'_>) -> Result<(), String> {
    let ttl0 = |name: String, to: &str| {
        QueueSpec::new(name)
            .message_ttl(std::time::Duration::ZERO)
            .dead_letter("", Some(to))
    };
    // A chain q1 -> q2 -> q3 -> q4 -> end through TTLs of 0.
    let end = ctx.queue("end").await?;
    let mut chain = Vec::new();
    let mut to = end.clone();
    for i in (1..=4).rev() {
        to = ctx.declare_queue(ttl0(ctx.queue_name(&format!("q{i}")), &to)).await?;
        chain.insert(0, to.clone());
    }
    ctx.publish(&Destination::queue(chain[0].as_str()), "chain").await?;
    let m = get_n(ctx, &end, 1).await?.remove(0);
    let expired = |q: &str, n: i64| (q.to_owned(), "expired".to_owned(), n);
    ensure_eq(
        "x-death after dying in q1, q2, q3, q4 in turn",
        deaths(&m),
        vec![
            expired(&chain[3], 1),
            expired(&chain[1], 1),
            expired(&chain[0], 1),
            expired(&chain[2], 1),
        ],
    )?;
    ensure_eq(
        "x-first-death-queue",
        m.headers.get_str("x-first-death-queue"),
        Some(chain[0].as_str()),
    )?;
    // A (TTL 300 ms) and B (TTL 0) dead-letter into a fanout exchange
    // bound to both.
    let x = ctx.exchange("x", ExchangeKind::Fanout).await?;
    let a = ctx
        .declare_queue(
            QueueSpec::new(ctx.queue_name("a"))
                .message_ttl(std::time::Duration::from_millis(300))
                .dead_letter(x.as_str(), None),
        )
        .await?;
    let b = ctx
        .declare_queue(
            QueueSpec::new(ctx.queue_name("b"))
                .message_ttl(std::time::Duration::ZERO)
                .dead_letter(x.as_str(), None),
        )
        .await?;
    ctx.bind(&a, &x, "").await?;
    ctx.bind(&b, &x, "").await?;
    ctx.publish(&Destination::new(x.as_str(), "k"), "m").await?;
    // A gets the message, then its dead letter from B (B's own copy of it
    // is a cycle: dropped).
    let got = get_n(ctx, &a, 1).await?;
    ensure_eq("x-death of the message in A", deaths(&got[0]), vec![])?;
    let t = ctx.transport();
    let deadline = tokio::time::Instant::now() + WAIT;
    let held = loop {
        if let Some(g) = t.get(&a, false).await.ctx("get the dead letter from A")? {
            break g;
        }
        ensure(tokio::time::Instant::now() < deadline, || {
            "B's dead letter should reach A".to_string()
        })?;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    ensure_eq(
        "x-death of B's dead letter in A",
        deaths(&held.delivery.message),
        vec![expired(&b, 1)],
    )?;
    // Rejected from A it reaches A ([A rejected, B]) and B, which
    // dead-letters it to A again ([B x2, A rejected]; B's copy is
    // dropped). 300 ms later the first copy expires from A and is dropped
    // (a cycle through A, and through B); the second expires to B
    // (regrouped: [A expired, A rejected, B x2]: the rejection is before
    // B's entry, no cycle) and from B back to A ([B x3, A rejected, A
    // expired]: the rejection is before A's entry). And so on every 300
    // ms: after k rounds A holds that one message with [B x(k+2), A
    // rejected, A expired xk]. 450 ms after the reject k is 1 (a broker
    // running late may show k = 0; the message may be between A and B
    // for an instant, hence the retries).
    held.delivery.reject(false).await.ctx("reject")?;
    tokio::time::sleep(std::time::Duration::from_millis(450)).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let m = loop {
        if let Some(g) = t.get(&a, true).await.ctx("get from A")? {
            break g.delivery.message.clone();
        }
        ensure(tokio::time::Instant::now() < deadline, || {
            "A should hold the message rejected once, going round A and B".to_string()
        })?;
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    let got = deaths(&m);
    let k = got.first().map_or(0, |d| d.2 - 2);
    let mut want = vec![expired(&b, k + 2), (a.clone(), "rejected".to_owned(), 1)];
    if k > 0 {
        want.push(expired(&a, k));
    }
    ensure_eq("x-death of the message going round A and B", got, want)?;
    ensure(k <= 1, || format!("{k} rounds in 450 ms (one every 300 ms)"))?;
    ensure_eq("what else A holds", get_all(ctx, &a).await?.len(), 0)?;
    ensure_eq("depth of B", ctx.depth(&b).await?, 0)
}

/// Publishes `bodies` to `q`, then takes from each consumer the number of
/// deliveries given with it (each within [`WAIT`]) and whatever else
/// arrives within [`QUIET`]; returns what each got (bodies), to compare
/// with the expected shares, every delivery still unsettled in `held`.
async fn share(
    ctx: &Ctx<'_>,
    q: &str,
    bodies: &[&str],
    subs: &mut [(&str, &mut crate::transport::Subscription, usize)],
    held: &mut Vec<crate::transport::Delivery>,
) -> Result<Vec<(String, Vec<String>)>, String> {
    ctx.publish_all(&Destination::queue(q), bodies).await?;
    let mut out: Vec<(String, Vec<String>)> = subs.iter().map(|(n, _, _)| (n.to_string(), Vec::new())).collect();
    for (i, (name, sub, n)) in subs.iter_mut().enumerate() {
        for k in 0..*n + 1 {
            let within = if k < *n { WAIT } else { QUIET };
            match tokio::time::timeout(within, sub.next()).await {
                Ok(Some(Ok(d))) => {
                    out[i].1.push(body(&d));
                    held.push(d);
                }
                Ok(Some(Err(e))) => return Err(format!("consumer {name}: {e}")),
                Ok(None) => return Err(format!("consumer {name} ended")),
                Err(_) => break,
            }
        }
    }
    Ok(out)
}

/// The expected shares of [`share`], for comparison.
fn shares(v: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    v.iter()
        .map(|(n, b)| (n.to_string(), b.iter().map(|s| s.to_string()).collect()))
        .collect()
}

/// Probed on RabbitMQ 3.10.8 when the differential test began to generate
/// several consumers on one queue: a consumer whose turn comes while its prefetch window is full
/// is taken out of the round-robin (RabbitMQ's `rabbit_queue_consumers`
/// blocks it), and when an ack reopens its window it rejoins at the back,
/// behind the consumers that kept their turn. The memory broker kept its
/// place, so it was served first again right after its ack. (What happens
/// after the ack does not depend on when RabbitMQ processes it: the next
/// two messages go to C and B either way.)
async fn blocked_consumer_rejoins_the_round_robin_at_the_back(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let mut a = ctx.consume(&q, ConsumeOptions::default().prefetch(1)).await?;
    let mut b = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let mut c = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let mut held = Vec::new();
    // m1 A, m2 B, m3 C; A's turn with its window full: blocked, m4 to B.
    let first = share(
        ctx,
        &q,
        &["m1", "m2", "m3", "m4"],
        &mut [("A", &mut a, 1), ("B", &mut b, 2), ("C", &mut c, 1)],
        &mut held,
    )
    .await?;
    ensure_eq(
        "A (prefetch 1), B and C (prefetch 10) attached in that order, 4 messages",
        first,
        shares(&[("A", &["m1"]), ("B", &["m2", "m4"]), ("C", &["m3"])]),
    )?;
    // A's ack reopens its window: it goes behind C and B.
    held.remove(0).ack().await.ctx("ack A's m1")?;
    let second = share(
        ctx,
        &q,
        &["m5", "m6"],
        &mut [("A", &mut a, 0), ("B", &mut b, 1), ("C", &mut c, 1)],
        &mut held,
    )
    .await?;
    ensure_eq(
        "after A's ack, the next two messages (A rejoined behind C and B)",
        second,
        shares(&[("A", &[]), ("B", &["m6"]), ("C", &["m5"])]),
    )?;
    let done = ack_all_and_cancel(held, &[&a, &b, &c]);
    done.await
}

/// Probed on RabbitMQ 3.10.8 when the differential test began to generate
/// several consumers on one queue: a new consumer joins the round-robin at the back, behind the
/// consumers in the order they are served next (the memory broker put it
/// at the end of its list of consumers, which is not the back once the
/// round-robin has moved on).
async fn new_consumer_joins_the_round_robin_at_the_back(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let opts = || ConsumeOptions::default().prefetch(10);
    let mut a = ctx.consume(&q, opts()).await?;
    let mut b = ctx.consume(&q, opts()).await?;
    let mut held = Vec::new();
    let first = share(ctx, &q, &["m1"], &mut [("A", &mut a, 1), ("B", &mut b, 0)], &mut held).await?;
    ensure_eq(
        "A and B attached in that order, one message",
        first,
        shares(&[("A", &["m1"]), ("B", &[])]),
    )?;
    // The round-robin order is now B, A; C joins behind A.
    let mut c = ctx.consume(&q, opts()).await?;
    let second = share(
        ctx,
        &q,
        &["m2", "m3", "m4", "m5"],
        &mut [("A", &mut a, 1), ("B", &mut b, 2), ("C", &mut c, 1)],
        &mut held,
    )
    .await?;
    ensure_eq(
        "after C attached, four messages (order B, A, C)",
        second,
        shares(&[("A", &["m3"]), ("B", &["m2", "m5"]), ("C", &["m4"])]),
    )?;
    let done = ack_all_and_cancel(held, &[&a, &b, &c]);
    done.await
}

/// Probed on RabbitMQ 3.10.8 when the differential test began to generate
/// several consumers on one queue: among consumers of the same priority too, one blocked by its
/// prefetch window rejoins behind the others of its priority when an ack
/// reopens it; consumers of a lower priority get nothing while one of a
/// higher priority can take the message.
async fn blocked_consumer_rejoins_behind_its_priority(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let mut a = ctx
        .consume(&q, ConsumeOptions::default().prefetch(1).priority(1))
        .await?;
    let mut b = ctx
        .consume(&q, ConsumeOptions::default().prefetch(10).priority(1))
        .await?;
    let mut c = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let mut held = Vec::new();
    let first = share(
        ctx,
        &q,
        &["m1", "m2", "m3", "m4"],
        &mut [("A", &mut a, 1), ("B", &mut b, 3), ("C", &mut c, 0)],
        &mut held,
    )
    .await?;
    ensure_eq(
        "A (x-priority 1, prefetch 1), B (x-priority 1), C (priority 0), 4 messages",
        first,
        shares(&[("A", &["m1"]), ("B", &["m2", "m3", "m4"]), ("C", &[])]),
    )?;
    held.remove(0).ack().await.ctx("ack A's m1")?;
    let second = share(
        ctx,
        &q,
        &["m5"],
        &mut [("A", &mut a, 0), ("B", &mut b, 1), ("C", &mut c, 0)],
        &mut held,
    )
    .await?;
    ensure_eq(
        "after A's ack, the next message (A rejoined behind B)",
        second,
        shares(&[("A", &[]), ("B", &["m5"]), ("C", &[])]),
    )?;
    let done = ack_all_and_cancel(held, &[&a, &b, &c]);
    done.await
}

/// Probed on RabbitMQ 3.10.8 when the differential test began to generate
/// messages with both a priority and a TTL: RabbitMQ drops expired heads
/// (and arms its TTL timer for the head) after a fetch, a requeue, its
/// timer, and a publish only when the new message is alone in the queue.
/// A message that goes ahead by priority in a queue that holds others has
/// no timer: past its TTL it is still counted, and a `basic.get` (or a
/// consumer) still takes it; the memory broker used to drop it on time.
async fn message_ahead_by_priority_expires_only_when_dropped_at_the_head(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    let ttl = std::time::Duration::from_millis(50);
    let mut queues = Vec::new();
    for name in ["get", "consume"] {
        let q = ctx
            .declare_queue(QueueSpec::new(ctx.queue_name(name)).max_priority(5))
            .await?;
        let dest = Destination::queue(q.as_str());
        ctx.publish_message(&dest, Message::new("behind")).await?;
        ctx.publish_message(&dest, Message::new("ahead").with_priority(5).with_expiration(ttl))
            .await?;
        queues.push(q);
    }
    // Past the TTL of "ahead" (a sleep long enough for nothing to happen).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let (get_q, consume_q) = (&queues[0], &queues[1]);
    ensure_eq("depth past the TTL of the message ahead", ctx.depth(get_q).await?, 2)?;
    let mut got = Vec::new();
    while let Some(g) = t.get(get_q, true).await.ctx("get")? {
        got.push((body(&g.delivery), g.message_count));
    }
    ensure_eq(
        "(body, message_count) of each get: the expired message ahead is still taken",
        got,
        vec![("ahead".to_string(), 1), ("behind".to_string(), 0)],
    )?;
    let mut sub = ctx.consume(consume_q, ConsumeOptions::default().auto_ack(true)).await?;
    let bodies = take_bodies(&mut sub, 2).await?;
    expect_nothing(&mut sub, QUIET).await?;
    cancel(&sub).await.ctx("cancel")?;
    ensure_eq(
        "deliveries to a consumer attached past the TTL of the message ahead",
        bodies,
        vec!["ahead".to_string(), "behind".to_string()],
    )
}

/// Found by the differential test: a message rejected without requeue is
/// dead-lettered after its queue has delivered what the reject lets it
/// (the consumer's window reopens): on RabbitMQ the dead letter is a
/// publish the queue makes, which reaches queues, itself included, after
/// that. Here the dead letter comes back to the same queue, whose max
/// length (drop-head) would have dropped the message the consumer gets
/// next if the dead letter had arrived first.
async fn reject_dead_letters_after_the_queue_delivers(ctx: &Ctx<'_>) -> Result<(), String> {
    let name = ctx.queue_name("q");
    let q = ctx
        .declare_queue(
            QueueSpec::new(name.clone())
                .dead_letter("", Some(name.as_str()))
                .max_length(2, crate::topology::Overflow::DropHead),
        )
        .await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(1)).await?;
    let dest = Destination::queue(q.as_str());
    ctx.publish(&dest, "m1").await?;
    let m1 = take(&mut sub, 1).await?.remove(0);
    ctx.publish_all(&dest, &["m2", "m3"]).await?;
    ctx.wait_depth(&q, 2).await?;
    m1.reject(false).await.ctx("reject m1 without requeue")?;
    // Held unacked (the window stays full) until the queue has been read.
    let next = take(&mut sub, 1).await?.remove(0);
    cancel(&sub).await.ctx("cancel")?;
    ensure_eq(
        "the delivery the reject's reopened window gets (before m1's dead letter arrives)",
        body(&next).as_str(),
        "m2",
    )?;
    ctx.wait_depth(&q, 2).await?;
    let mut left = Vec::new();
    while let Some(g) = ctx.transport().get(&q, true).await.ctx("get")? {
        left.push((
            body(&g.delivery),
            g.delivery
                .message
                .headers
                .get_str("x-first-death-reason")
                .map(str::to_owned),
        ));
    }
    next.ack().await.ctx("ack m2")?;
    ensure_eq(
        "(body, x-first-death-reason) left in the queue",
        left,
        vec![
            ("m3".to_string(), None),
            ("m1".to_string(), Some("rejected".to_string())),
        ],
    )
}

/// Found by the differential test: the same message, fanned out to two
/// queues, expires in both; the dead letter of one goes to the other, which
/// is full (max length 1, reject-publish) until its own copy expires: once
/// that copy has expired, the queue takes the dead letter. Here the full
/// queue's TTL is 50 ms shorter: with equal TTLs RabbitMQ's two timers race
/// (they usually fire in the same millisecond, and then the full queue's
/// runs first, but about one run in six under load the dead letter arrives
/// first and is refused), so the exact tie is pinned on the memory broker
/// alone (`transport-memory/tests/twin.rs`,
/// `simultaneous_expiries_run_before_their_dead_letters`).
async fn dead_letter_takes_the_place_of_an_expired_copy(ctx: &Ctx<'_>) -> Result<(), String> {
    let ttl = std::time::Duration::from_millis(200);
    let x = ctx.exchange("x", ExchangeKind::Fanout).await?;
    let dst = ctx
        .declare_queue(
            QueueSpec::new(ctx.queue_name("dst"))
                .message_ttl(ttl)
                .max_length(1, crate::topology::Overflow::RejectPublish),
        )
        .await?;
    let src = ctx
        .declare_queue(
            QueueSpec::new(ctx.queue_name("src"))
                .message_ttl(ttl + std::time::Duration::from_millis(50))
                .dead_letter("", Some(dst.as_str())),
        )
        .await?;
    ctx.bind(&src, &x, "").await?;
    ctx.bind(&dst, &x, "").await?;
    ctx.publish(&Destination::new(x.as_str(), "k"), "m").await?;
    ensure(
        eventually(WAIT, || async { ctx.depth(&src).await == Ok(0) }).await,
        || "the message did not expire in the source queue".to_string(),
    )?;
    // The dead letter arrives just after.
    let deadline = tokio::time::Instant::now() + WAIT;
    let g = loop {
        if let Some(g) = ctx.transport().get(&dst, true).await.ctx("get")? {
            break g;
        }
        ensure(tokio::time::Instant::now() < deadline, || {
            "the full queue's copy expired and the dead letter of the other copy should have taken its place"
                .to_string()
        })?;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    ensure_eq(
        "(body, x-first-death-queue) in the queue that was full",
        (
            body(&g.delivery),
            g.delivery
                .message
                .headers
                .get_str("x-first-death-queue")
                .map(str::to_owned),
        ),
        ("m".to_string(), Some(src.clone())),
    )
}

/// Acks what a consumer-order scenario still holds, then cancels its
/// consumers.
fn ack_all_and_cancel(
    held: Vec<crate::Delivery>,
    subs: &[&crate::Subscription],
) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
    let cancels: Vec<_> = subs.iter().map(|s| cancel(s)).collect();
    async move {
        for d in held {
            d.ack().await.ctx("ack")?;
        }
        for (i, c) in cancels.into_iter().enumerate() {
            c.await.ctx(&format!("cancel consumer {i}"))?;
        }
        Ok(())
    }
}
