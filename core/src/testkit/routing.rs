//! Routing scenarios: default, direct, topic (with RabbitMQ's corners),
//! fanout and headers exchanges, exchange-to-exchange bindings, unbind.
//!
//! Every expected routing table below was observed on RabbitMQ 3.10.8
//! (`scripts/probe-rabbitmq-semantics.py`, `docs/rabbitmq-semantics.md`).

use super::support::*;
use super::{case, Case};
use crate::message::{HeaderValue, Headers, Message};
use crate::topology::{Binding, Destination, ExchangeKind};

/// The routing scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(routing::default_exchange_routes_by_queue_name),
        case!(routing::direct_routes_on_exact_key),
        case!(routing::topic_hash_matches_zero_or_more_words),
        case!(routing::topic_star_matches_exactly_one_word),
        case!(routing::fanout_ignores_routing_key),
        case!(routing::queue_bound_twice_gets_one_copy),
        case!(routing::headers_all_and_any, HeadersExchange),
        case!(routing::headers_x_keys_are_ignored, HeadersExchange),
        case!(routing::headers_numbers_compare_by_value, HeadersExchange),
        case!(routing::headers_value_classes, HeadersExchange),
        case!(routing::exchange_to_exchange_binding),
        case!(routing::unbind_stops_routing),
    ]
}

/// The body used for a routing key in the topic tables ("" is not a
/// readable body).
fn label(key: &str) -> &str {
    if key.is_empty() {
        "<empty>"
    } else {
        key
    }
}

/// Binds one queue per pattern in `table` to a fresh exchange of `kind`
/// (with the given binding arguments), publishes `messages` (routing key,
/// headers, body) and checks that each queue received exactly its expected
/// bodies, in publish order.
async fn routing_table(
    ctx: &Ctx<'_>,
    kind: ExchangeKind,
    table: &[(&str, Headers, &[&str])],
    messages: &[(&str, Headers, &str)],
) -> Result<(), String> {
    let ex = ctx.exchange("ex", kind.clone()).await?;
    let mut queues = Vec::new();
    for (i, (pattern, args, _)) in table.iter().enumerate() {
        let q = ctx.queue(&format!("q{i}")).await?;
        let b = Binding::queue(q.clone(), ex.clone(), *pattern).with_arguments(args.clone());
        ctx.transport()
            .bind(&b)
            .await
            .ctx(&format!("bind '{q}' with '{pattern}' {args:?}"))?;
        queues.push(q);
    }
    for (key, headers, body) in messages {
        let m = Message::new(body.to_string()).with_headers(headers.clone());
        ctx.publish_message(&Destination::new(ex.as_str(), *key), m).await?;
    }
    let mut errors = Vec::new();
    for ((pattern, args, expected), q) in table.iter().zip(&queues) {
        let got = ctx.drain(q).await?;
        if got != *expected {
            let what = if kind == ExchangeKind::Headers {
                format!("{args:?}")
            } else {
                format!("'{pattern}'")
            };
            errors.push(format!(
                "binding {what} received {got:?}, RabbitMQ delivers {expected:?}"
            ));
        }
    }
    ensure(errors.is_empty(), || errors.join("; "))
}

/// Topic keys used by both topic scenarios: "" is zero words, "a." is
/// `["a", ""]`, "a..b" has an empty middle word, ".a" an empty first word.
const TOPIC_KEYS: &[&str] = &["", "a", "a.", "a..b", "a.b", ".a", "a.x.b", "a.x.y.b"];

async fn topic_table(ctx: &Ctx<'_>, table: &[(&str, &[&str])]) -> Result<(), String> {
    let table: Vec<(&str, Headers, &[&str])> = table.iter().map(|(p, e)| (*p, Headers::new(), *e)).collect();
    let messages: Vec<(&str, Headers, &str)> = TOPIC_KEYS.iter().map(|k| (*k, Headers::new(), label(k))).collect();
    routing_table(ctx, ExchangeKind::Topic, &table, &messages).await
}

async fn default_exchange_routes_by_queue_name(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("target").await?;
    ctx.publish(&Destination::queue(q.as_str()), "hello").await?;
    // A key naming no queue is silently dropped (not mandatory).
    ctx.publish(&Destination::queue(ctx.name("nobody")), "lost").await?;
    ensure_eq("queue content", ctx.drain(&q).await?, vec!["hello".to_string()])
}

async fn direct_routes_on_exact_key(ctx: &Ctx<'_>) -> Result<(), String> {
    let ex = ctx.exchange("direct", ExchangeKind::Direct).await?;
    let q1 = ctx.queue("one").await?;
    let q2 = ctx.queue("two").await?;
    ctx.bind(&q1, &ex, "a").await?;
    ctx.bind(&q2, &ex, "a").await?;
    ctx.bind(&q2, &ex, "b").await?;
    for key in ["a", "b", "a.b", "A", ""] {
        ctx.publish(&Destination::new(ex.as_str(), key), label(key)).await?;
    }
    ensure_eq("queue bound with 'a'", ctx.drain(&q1).await?, vec!["a".to_string()])?;
    ensure_eq(
        "queue bound with 'a' and 'b'",
        ctx.drain(&q2).await?,
        vec!["a".to_string(), "b".to_string()],
    )
}

async fn topic_hash_matches_zero_or_more_words(ctx: &Ctx<'_>) -> Result<(), String> {
    topic_table(
        ctx,
        &[
            // '#' matches every key, the empty key (zero words) included.
            ("#", &["<empty>", "a", "a.", "a..b", "a.b", ".a", "a.x.b", "a.x.y.b"]),
            ("a.#", &["a", "a.", "a..b", "a.b", "a.x.b", "a.x.y.b"]),
            // '#' in the middle matches zero words: "a.#.b" matches "a.b".
            ("a.#.b", &["a..b", "a.b", "a.x.b", "a.x.y.b"]),
            ("#.a", &["a", ".a"]),
            ("*.#", &["a", "a.", "a..b", "a.b", ".a", "a.x.b", "a.x.y.b"]),
        ],
    )
    .await
}

async fn topic_star_matches_exactly_one_word(ctx: &Ctx<'_>) -> Result<(), String> {
    topic_table(
        ctx,
        &[
            // "" is zero words: '*' does not match it.
            ("*", &["a"]),
            // "a." is two words, the second empty: 'a.*' matches it.
            ("a.*", &["a.", "a.b"]),
            ("*.*", &["a.", "a.b", ".a"]),
            // The empty middle word of "a..b" is a word for '*'.
            ("a.*.b", &["a..b", "a.x.b"]),
            ("a", &["a"]),
        ],
    )
    .await
}

async fn fanout_ignores_routing_key(ctx: &Ctx<'_>) -> Result<(), String> {
    let ex = ctx.exchange("fanout", ExchangeKind::Fanout).await?;
    let q1 = ctx.queue("one").await?;
    let q2 = ctx.queue("two").await?;
    ctx.bind(&q1, &ex, "").await?;
    ctx.bind(&q2, &ex, "ignored").await?;
    ctx.publish(&Destination::new(ex.as_str(), "x.y"), "m1").await?;
    ctx.publish(&Destination::new(ex.as_str(), ""), "m2").await?;
    let want = vec!["m1".to_string(), "m2".to_string()];
    ensure_eq("first fanout queue", ctx.drain(&q1).await?, want.clone())?;
    ensure_eq("second fanout queue", ctx.drain(&q2).await?, want)
}

async fn queue_bound_twice_gets_one_copy(ctx: &Ctx<'_>) -> Result<(), String> {
    let ex = ctx.exchange("topic", ExchangeKind::Topic).await?;
    let q = ctx.queue("twice").await?;
    ctx.bind(&q, &ex, "a.*").await?;
    ctx.bind(&q, &ex, "#").await?;
    ctx.publish(&Destination::new(ex.as_str(), "a.b"), "once").await?;
    ensure_eq(
        "queue bound with 'a.*' and '#'",
        ctx.drain(&q).await?,
        vec!["once".to_string()],
    )
}

fn h(pairs: &[(&str, HeaderValue)]) -> Headers {
    pairs.iter().map(|(k, v)| (*k, v.clone())).collect()
}

fn s(v: &str) -> HeaderValue {
    HeaderValue::String(v.to_owned())
}

async fn headers_all_and_any(ctx: &Ctx<'_>) -> Result<(), String> {
    use HeaderValue::I32;
    let k1z2 = [("k", I32(1)), ("z", I32(2))];
    let all = h(&[("x-match", s("all")), ("k", I32(1)), ("z", I32(2))]);
    let any = h(&[("x-match", s("any")), ("k", I32(1)), ("z", I32(2))]);
    // Without x-match the mode is "all".
    let default = h(&k1z2);
    // "all" with no keys matches every message; "any" with no keys none.
    let all_empty = h(&[("x-match", s("all"))]);
    let any_empty = h(&[("x-match", s("any"))]);
    let messages = [
        ("", h(&k1z2), "k1z2"),
        ("", h(&[("k", I32(1))]), "k1"),
        ("", h(&[("z", I32(2))]), "z2"),
        ("", h(&[("k", I32(1)), ("z", I32(3))]), "k1z3"),
        ("", h(&[("q", s("v"))]), "other"),
        ("", Headers::new(), "none"),
    ];
    routing_table(
        ctx,
        ExchangeKind::Headers,
        &[
            ("", all, &["k1z2"]),
            ("", any, &["k1z2", "k1", "z2", "k1z3"]),
            ("", default, &["k1z2"]),
            ("", all_empty, &["k1z2", "k1", "z2", "k1z3", "other", "none"]),
            ("", any_empty, &[]),
        ],
        &messages,
    )
    .await
}

async fn headers_x_keys_are_ignored(ctx: &Ctx<'_>) -> Result<(), String> {
    use HeaderValue::I32;
    // Binding keys starting with "x-" take no part in matching.
    let all_x = h(&[("x-match", s("all")), ("x-foo", s("bar"))]);
    let any_x = h(&[("x-match", s("any")), ("x-foo", s("bar")), ("k", I32(1))]);
    let messages = [
        ("", h(&[("x-foo", s("bar"))]), "xfoo"),
        ("", h(&[("k", I32(1))]), "k1"),
        ("", Headers::new(), "none"),
    ];
    routing_table(
        ctx,
        ExchangeKind::Headers,
        &[("", all_x, &["xfoo", "k1", "none"]), ("", any_x, &["k1"])],
        &messages,
    )
    .await
}

async fn headers_numbers_compare_by_value(ctx: &Ctx<'_>) -> Result<(), String> {
    use HeaderValue::*;
    // RabbitMQ compares numbers by value across integer widths and across
    // integer/float; a string, a bool or another number do not match.
    let numeric_ones = [
        ("i8", I8(1)),
        ("u8", U8(1)),
        ("i16", I16(1)),
        ("u16", U16(1)),
        ("i32", I32(1)),
        ("u32", U32(1)),
        ("i64", I64(1)),
        ("f32", F32(1.0)),
        ("f64", F64(1.0)),
    ];
    let others = [
        ("str", s("1")),
        ("bool", Bool(true)),
        ("i32-2", I32(2)),
        ("i64-big", I64((1 << 32) + 1)),
    ];
    let messages: Vec<(&str, Headers, &str)> = numeric_ones
        .iter()
        .chain(others.iter())
        .map(|(label, v)| ("", h(&[("k", v.clone())]), *label))
        .collect();
    let ones: Vec<&str> = numeric_ones.iter().map(|(l, _)| *l).collect();
    routing_table(
        ctx,
        ExchangeKind::Headers,
        &[
            ("", h(&[("x-match", s("all")), ("k", I32(1))]), &ones),
            ("", h(&[("x-match", s("all")), ("k", I8(1))]), &ones),
            ("", h(&[("x-match", s("all")), ("k", F64(1.0))]), &ones),
            ("", h(&[("x-match", s("all")), ("k", I32(2))]), &["i32-2"]),
        ],
        &messages,
    )
    .await
}

async fn headers_value_classes(ctx: &Ctx<'_>) -> Result<(), String> {
    use HeaderValue::*;
    let messages = [
        ("", h(&[("k", s("1"))]), "str"),
        ("", h(&[("k", Bytes(bytes::Bytes::from_static(b"1")))]), "bytes"),
        ("", h(&[("k", I32(1))]), "int"),
        ("", h(&[("k", Bool(true))]), "bool"),
        ("", h(&[("other", s("1"))]), "absent"),
    ];
    routing_table(
        ctx,
        ExchangeKind::Headers,
        &[
            // A string and a byte array with the same content match each other.
            ("", h(&[("x-match", s("all")), ("k", s("1"))]), &["str", "bytes"]),
            (
                "",
                h(&[("x-match", s("all")), ("k", Bytes(bytes::Bytes::from_static(b"1")))]),
                &["str", "bytes"],
            ),
            // A bool matches only a bool.
            ("", h(&[("x-match", s("all")), ("k", Bool(true))]), &["bool"]),
            // A void binding value means "key present, any value".
            (
                "",
                h(&[("x-match", s("all")), ("k", Void)]),
                &["str", "bytes", "int", "bool"],
            ),
        ],
        &messages,
    )
    .await
}

async fn exchange_to_exchange_binding(ctx: &Ctx<'_>) -> Result<(), String> {
    let src = ctx.exchange("src", ExchangeKind::Topic).await?;
    let dst = ctx.exchange("dst", ExchangeKind::Fanout).await?;
    let q = ctx.queue("q").await?;
    ctx.transport()
        .bind(&Binding::exchange(dst.clone(), src.clone(), "a.#"))
        .await
        .ctx("bind exchange to exchange")?;
    ctx.bind(&q, &dst, "").await?;
    ctx.publish(&Destination::new(src.as_str(), "a.b"), "through").await?;
    ctx.publish(&Destination::new(src.as_str(), "b"), "filtered").await?;
    ensure_eq(
        "queue behind the e2e binding",
        ctx.drain(&q).await?,
        vec!["through".to_string()],
    )?;
    ctx.transport()
        .unbind(&Binding::exchange(dst.clone(), src.clone(), "a.#"))
        .await
        .ctx("unbind exchange from exchange")?;
    ctx.publish(&Destination::new(src.as_str(), "a.c"), "after-unbind")
        .await?;
    ensure_eq("queue after the e2e unbind", ctx.drain(&q).await?, Vec::<String>::new())
}

async fn unbind_stops_routing(ctx: &Ctx<'_>) -> Result<(), String> {
    let ex = ctx.exchange("direct", ExchangeKind::Direct).await?;
    let q = ctx.queue("q").await?;
    ctx.bind(&q, &ex, "k").await?;
    ctx.bind(&q, &ex, "j").await?;
    ctx.publish(&Destination::new(ex.as_str(), "k"), "bound").await?;
    ctx.transport()
        .unbind(&Binding::queue(q.clone(), ex.clone(), "k"))
        .await
        .ctx("unbind")?;
    ctx.publish(&Destination::new(ex.as_str(), "k"), "unbound").await?;
    ctx.publish(&Destination::new(ex.as_str(), "j"), "other-binding")
        .await?;
    // Unbinding what is not bound is not an error on RabbitMQ.
    ctx.transport()
        .unbind(&Binding::queue(q.clone(), ex.clone(), "never-bound"))
        .await
        .ctx("unbind of a binding that does not exist")?;
    ensure_eq(
        "queue content",
        ctx.drain(&q).await?,
        vec!["bound".to_string(), "other-binding".to_string()],
    )
}
