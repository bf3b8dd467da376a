//! The message model as the wire carries it, exchange kinds beyond the
//! four, and consumer arguments (issue 9): priorities above 9, absent
//! versus empty properties, `cluster_id`, `x-delayed-message`,
//! `x-consistent-hash`, consumer priorities (`x-priority`) and stream
//! offsets (`x-stream-offset`). Each was checked against RabbitMQ 3.10.8.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::support::*;
use super::{case, expect_nothing, recv, Case};
use crate::message::{HeaderValue, Headers, Message, Properties};
use crate::topology::{Destination, ExchangeKind, ExchangeSpec, QueueSpec, QueueType};
use crate::transport::{ConsumeOptions, StreamOffset};

/// The model scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(model::priorities_above_nine_order_and_are_kept, Priorities),
        case!(model::absent_and_empty_properties_stay_apart),
        case!(model::bcc_only_message_keeps_an_empty_table),
        case!(model::delayed_exchange_holds_then_routes, DelayedMessageExchange),
        case!(model::consistent_hash_sends_a_key_to_one_queue, ConsistentHashExchange),
        case!(model::higher_priority_consumers_are_served_first, ConsumerPriorities),
        case!(model::stream_consumers_start_at_their_offset, StreamQueues),
    ]
}

async fn priorities_above_nine_order_and_are_kept(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("prio")).max_priority(200))
        .await?;
    let dest = Destination::queue(q.as_str());
    // 255 is above the queue's maximum: it counts as 200 (FIFO with the
    // 200 published after it) but is delivered as sent.
    for (body, p) in [("p10", 10u8), ("p255", 255), ("p0", 0), ("p200", 200), ("p150", 150)] {
        ctx.publish_message(&dest, Message::new(body).with_priority(p)).await?;
    }
    ctx.wait_depth(&q, 5).await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let got = take(&mut sub, 5).await?;
    let order: Vec<(String, Option<u8>)> = got.iter().map(|d| (body(d), d.message.properties.priority)).collect();
    for d in got {
        d.ack().await.ctx("ack")?;
    }
    cancel(&sub).await.ctx("cancel")?;
    ensure_eq(
        "order on a queue with x-max-priority 200 (body, priority as delivered)",
        order,
        vec![
            ("p255".to_owned(), Some(255)),
            ("p200".to_owned(), Some(200)),
            ("p150".to_owned(), Some(150)),
            ("p10".to_owned(), Some(10)),
            ("p0".to_owned(), Some(0)),
        ],
    )
}

/// Publishes each message to a fresh queue and returns what arrives.
async fn round_trip(ctx: &Ctx<'_>, messages: Vec<Message>) -> Result<Vec<Message>, String> {
    let q = ctx.queue("model").await?;
    let n = messages.len();
    for m in messages {
        ctx.publish_message(&Destination::queue(q.as_str()), m).await?;
    }
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let mut out = Vec::with_capacity(n);
    for d in take(&mut sub, n).await? {
        out.push(d.message.clone());
        d.ack().await.ctx("ack")?;
    }
    cancel(&sub).await.ctx("cancel")?;
    Ok(out)
}

async fn absent_and_empty_properties_stay_apart(ctx: &Ctx<'_>) -> Result<(), String> {
    let mut bare = Message::new("bare");
    bare.properties = Properties {
        delivery_mode: None,
        ..Properties::default()
    };
    let mut empty_table = Message::new("empty-table").transient();
    empty_table.headers = Headers::empty_table();
    let mut cluster = Message::new("cluster").with_header("k", "v");
    cluster.properties.cluster_id = Some("cluster-7".into());
    let got = round_trip(ctx, vec![bare.clone(), empty_table.clone(), cluster.clone()]).await?;
    let seen: Vec<(Option<u8>, bool, usize, Option<&str>)> = got
        .iter()
        .map(|m| {
            (
                m.properties.delivery_mode,
                m.headers.has_table(),
                m.headers.len(),
                m.properties.cluster_id.as_deref(),
            )
        })
        .collect();
    ensure_eq(
        "(delivery mode, headers table present, header count, cluster id) of: no properties; transient with an \
         empty headers table; persistent with one header and a cluster id",
        seen,
        vec![
            (None, false, 0, None),
            (Some(1), true, 0, None),
            (Some(2), true, 1, Some("cluster-7")),
        ],
    )?;
    ensure(!got[0].properties.is_persistent(), || {
        "no delivery mode is not persistent".into()
    })?;
    ensure_eq("whole message without properties", &got[0], &bare)?;
    ensure_eq("whole message with an empty table", &got[1], &empty_table)?;
    ensure_eq("whole message with a cluster id", &got[2], &cluster)
}

async fn bcc_only_message_keeps_an_empty_table(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("bcc").await?;
    let other = ctx.queue("bcc-other").await?;
    let m = Message::new("blind").with_header("BCC", HeaderValue::Array(vec![HeaderValue::String(other.clone())]));
    ctx.publish_message(&Destination::queue(q.as_str()), m).await?;
    for name in [&q, &other] {
        let mut sub = ctx.consume(name, ConsumeOptions::default()).await?;
        let d = recv(&mut sub, WAIT).await?;
        let h = d.message.headers.clone();
        d.ack().await.ctx("ack")?;
        cancel(&sub).await.ctx("cancel")?;
        ensure(h.is_empty(), || {
            format!("BCC is removed before delivery to '{name}', got {h:?}")
        })?;
        ensure(h.has_table(), || {
            format!("the headers table stays, empty, on the copy in '{name}' (RabbitMQ removes only the BCC entry)")
        })?;
    }
    Ok(())
}

async fn delayed_exchange_holds_then_routes(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    expect_code(
        "declare an x-delayed-message exchange without x-delayed-type",
        t.declare_exchange(&ExchangeSpec::new(
            ctx.exchange_name("untyped"),
            ExchangeKind::DelayedMessage,
        ))
        .await,
        "precondition_failed",
    )?;
    let x = ctx.exchange_name("delayed");
    t.declare_exchange(&ExchangeSpec::delayed(x.clone(), ExchangeKind::Direct))
        .await
        .ctx("declare an x-delayed-message exchange routing as direct")?;
    let q = ctx.queue("delayed").await?;
    ctx.bind(&q, &x, "k").await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let dest = Destination::new(x.as_str(), "k");
    ctx.publish_message(&dest, Message::new("late").with_delay(Duration::from_millis(1200)))
        .await?;
    ctx.publish_message(&dest, Message::new("soon").with_delay(Duration::from_millis(600)))
        .await?;
    ctx.publish_message(&dest, Message::new("now")).await?;
    let first = recv(&mut sub, WAIT).await?;
    ensure_eq("the undelayed message arrives first", body(&first), "now".to_owned())?;
    first.ack().await.ctx("ack")?;
    expect_nothing(&mut sub, QUIET).await?;
    let mut rest = Vec::new();
    for d in take(&mut sub, 2).await? {
        rest.push((body(&d), d.message.headers.get_i64("x-delay")));
        d.ack().await.ctx("ack")?;
    }
    cancel(&sub).await.ctx("cancel")?;
    ensure_eq(
        "delayed messages in due order, x-delay negated on delivery",
        rest,
        vec![("soon".to_owned(), Some(-600)), ("late".to_owned(), Some(-1200))],
    )
}

async fn consistent_hash_sends_a_key_to_one_queue(ctx: &Ctx<'_>) -> Result<(), String> {
    let x = ctx.exchange("hash", ExchangeKind::ConsistentHash).await?;
    let a = ctx.queue("hash-a").await?;
    let b = ctx.queue("hash-b").await?;
    // A binding's routing key is its weight on the hash ring.
    ctx.bind(&a, &x, "1").await?;
    ctx.bind(&b, &x, "1").await?;
    let mut sent = 0;
    for round in 0..3 {
        for key in 0..40 {
            ctx.publish_message(
                &Destination::new(x.as_str(), format!("key-{key}")),
                Message::new(format!("{round}:{key}")),
            )
            .await?;
            sent += 1;
        }
    }
    let mut where_: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut counts = Vec::new();
    for q in [&a, &b] {
        let mut sub = ctx.consume(q, ConsumeOptions::default().prefetch(200)).await?;
        let mut n = 0;
        while let Ok(d) = recv(&mut sub, QUIET).await {
            let key = body(&d).split_once(':').map(|(_, k)| k.to_owned()).unwrap_or_default();
            where_.entry(key).or_default().insert(q.clone());
            d.ack().await.ctx("ack")?;
            n += 1;
        }
        cancel(&sub).await.ctx("cancel")?;
        counts.push(n);
    }
    ensure_eq("messages received over both queues", counts.iter().sum::<usize>(), sent)?;
    ensure(counts.iter().all(|&n| n > 0), || {
        format!("40 keys on two equal weights reach both queues, got {counts:?}")
    })?;
    let split: Vec<_> = where_.iter().filter(|(_, qs)| qs.len() > 1).collect();
    ensure(split.is_empty(), || {
        format!("every key goes to one queue only; split: {split:?}")
    })
}

async fn higher_priority_consumers_are_served_first(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("cprio").await?;
    // The low-priority consumer attaches first: order of arrival does not
    // matter, priority does.
    let mut low = ctx.consume(&q, ConsumeOptions::default().prefetch(10)).await?;
    let mut high = ctx
        .consume(&q, ConsumeOptions::default().prefetch(2).priority(10))
        .await?;
    let dest = Destination::queue(q.as_str());
    ctx.publish_all(&dest, &["m1", "m2", "m3", "m4", "m5"]).await?;
    let high_got = take(&mut high, 2).await?;
    expect_nothing(&mut high, QUIET).await?;
    let low_got = take(&mut low, 3).await?;
    expect_nothing(&mut low, QUIET).await?;
    let bodies = |v: &[crate::transport::Delivery]| v.iter().map(body).collect::<Vec<_>>();
    let seen = (bodies(&high_got), bodies(&low_got));
    for d in high_got.into_iter().chain(low_got) {
        d.ack().await.ctx("ack")?;
    }
    cancel(&high).await.ctx("cancel")?;
    cancel(&low).await.ctx("cancel")?;
    ensure_eq(
        "(x-priority 10 consumer with prefetch 2, priority 0 consumer): the higher one takes what it can hold",
        seen,
        (
            vec!["m1".to_owned(), "m2".to_owned()],
            vec!["m3".to_owned(), "m4".to_owned(), "m5".to_owned()],
        ),
    )?;
    expect_code(
        "x-priority that is not an integer",
        ctx.transport()
            .consume(&q, ConsumeOptions::default().argument("x-priority", "high"))
            .await
            .map(|_| ()),
        "precondition_failed",
    )?;
    Ok(())
}

async fn stream_consumers_start_at_their_offset(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("stream")).queue_type(QueueType::Stream))
        .await?;
    let dest = Destination::queue(q.as_str());
    ctx.publish_all(&dest, &["s0", "s1", "s2", "s3", "s4"]).await?;
    let read = |offset: StreamOffset, n: usize| {
        let q = q.clone();
        async move {
            let mut sub = ctx
                .consume(&q, ConsumeOptions::default().prefetch(50).stream_offset(offset))
                .await?;
            let bodies = take_bodies(&mut sub, n).await?;
            expect_nothing(&mut sub, QUIET).await?;
            cancel(&sub).await.ctx("cancel")?;
            Ok::<_, String>(bodies)
        }
    };
    ensure_eq(
        "from the first offset (messages stay in a stream after being read)",
        read(StreamOffset::First, 5).await?,
        vec!["s0", "s1", "s2", "s3", "s4"]
            .into_iter()
            .map(String::from)
            .collect(),
    )?;
    ensure_eq(
        "from offset 3",
        read(StreamOffset::Offset(3), 2).await?,
        vec!["s3".to_owned(), "s4".to_owned()],
    )?;
    let mut next = ctx
        .consume(
            &q,
            ConsumeOptions::default().prefetch(50).stream_offset(StreamOffset::Next),
        )
        .await?;
    expect_nothing(&mut next, QUIET).await?;
    ctx.publish(&dest, "s5").await?;
    let got = take_bodies(&mut next, 1).await?;
    cancel(&next).await.ctx("cancel")?;
    ensure_eq(
        "from next: only what is published afterwards",
        got,
        vec!["s5".to_owned()],
    )
}
