//! Declaration scenarios: idempotent and conflicting declarations,
//! exclusive and auto-delete queues, server-named queues, missing
//! entities, and the counts `queue_info`, `purge_queue` and `delete_queue`
//! report.

use std::time::Duration;

use super::support::*;
use super::{case, Case};
use crate::topology::{Binding, Destination, ExchangeKind, ExchangeSpec, QueueSpec};
use crate::transport::ConsumeOptions;

/// The admin scenarios.
pub(crate) fn cases() -> Vec<Case> {
    vec![
        case!(admin::identical_redeclare_is_idempotent),
        case!(admin::conflicting_queue_redeclare_is_precondition_failed),
        case!(admin::conflicting_exchange_redeclare_is_precondition_failed),
        case!(admin::exclusive_queue_is_locked_for_other_connections, Exclusive),
        case!(admin::exclusive_consumer_locks_the_queue, Exclusive),
        case!(admin::exclusive_queue_goes_with_its_connection, Exclusive),
        case!(admin::unused_queue_expires),
        case!(admin::auto_delete_exchange_goes_with_its_last_binding),
        case!(admin::deleting_removes_bindings),
        case!(admin::auto_delete_queue_goes_with_its_last_consumer),
        case!(admin::server_named_queue),
        case!(admin::missing_queue_and_exchange_operations),
        case!(admin::depth_counts_ready_messages_only),
        case!(admin::purge_and_delete_return_ready_counts),
        case!(admin::consumer_count),
        case!(admin::declare_topology),
    ]
}

async fn identical_redeclare_is_idempotent(ctx: &Ctx<'_>) -> Result<(), String> {
    let spec = QueueSpec::new(ctx.queue_name("q")).max_priority(5);
    ctx.declare_queue(spec.clone()).await?;
    ctx.publish(&Destination::queue(spec.name.as_str()), "kept").await?;
    let info = ctx
        .transport()
        .declare_queue(&spec)
        .await
        .ctx("redeclare an identical queue")?;
    ensure_eq("redeclared queue name", info.name.as_str(), spec.name.as_str())?;
    ensure_eq("messages kept across an identical redeclare", info.message_count, 1)?;
    let ex = ExchangeSpec::topic(ctx.exchange_name("x"));
    ctx.transport().declare_exchange(&ex).await.ctx("declare exchange")?;
    ctx.transport()
        .declare_exchange(&ex)
        .await
        .ctx("redeclare an identical exchange")?;
    ensure_eq(
        "exchange_exists after declare",
        ctx.transport().exchange_exists(&ex.name).await.ctx("exchange_exists")?,
        true,
    )
}

async fn conflicting_queue_redeclare_is_precondition_failed(ctx: &Ctx<'_>) -> Result<(), String> {
    let spec = QueueSpec::new(ctx.queue_name("q"));
    ctx.declare_queue(spec.clone()).await?;
    let t = ctx.transport();
    expect_code(
        "redeclare with durable=false",
        t.declare_queue(&spec.clone().durable(false)).await,
        "precondition_failed",
    )?;
    expect_code(
        "redeclare with auto_delete=true",
        t.declare_queue(&spec.clone().auto_delete(true)).await,
        "precondition_failed",
    )?;
    expect_code(
        "redeclare with other arguments (x-max-priority)",
        t.declare_queue(&spec.clone().max_priority(3)).await,
        "precondition_failed",
    )?;
    // The original queue is intact and still usable.
    ctx.publish(&Destination::queue(spec.name.as_str()), "still-there")
        .await?;
    ensure_eq(
        "queue after refused redeclarations",
        ctx.drain(&spec.name).await?,
        vec!["still-there".to_string()],
    )
}

async fn conflicting_exchange_redeclare_is_precondition_failed(ctx: &Ctx<'_>) -> Result<(), String> {
    let spec = ExchangeSpec::direct(ctx.exchange_name("x"));
    let t = ctx.transport();
    t.declare_exchange(&spec).await.ctx("declare exchange")?;
    expect_code(
        "redeclare as topic",
        t.declare_exchange(&ExchangeSpec::topic(spec.name.clone())).await,
        "precondition_failed",
    )?;
    expect_code(
        "redeclare with durable=false",
        t.declare_exchange(&spec.clone().durable(false)).await,
        "precondition_failed",
    )?;
    expect_code(
        "redeclare with auto_delete=true",
        t.declare_exchange(&spec.clone().auto_delete(true)).await,
        "precondition_failed",
    )?;
    // Still a working direct exchange.
    let q = ctx.queue("q").await?;
    ctx.bind(&q, &spec.name, "k").await?;
    ctx.publish(&Destination::new(spec.name.as_str(), "k"), "routed")
        .await?;
    ensure_eq(
        "queue behind the exchange",
        ctx.drain(&q).await?,
        vec!["routed".to_string()],
    )
}

async fn exclusive_queue_is_locked_for_other_connections(ctx: &Ctx<'_>) -> Result<(), String> {
    let spec = QueueSpec::new(ctx.queue_name("excl")).durable(false).exclusive(true);
    let name = ctx.declare_queue(spec.clone()).await?;
    let other = ctx.connect().await;
    expect_code(
        "consume an exclusive queue from another connection",
        other.consume(&name, ConsumeOptions::default()).await,
        "resource_locked",
    )?;
    expect_code(
        "queue_info of an exclusive queue from another connection",
        other.queue_info(&name).await,
        "resource_locked",
    )?;
    expect_code(
        "redeclare an exclusive queue from another connection",
        other.declare_queue(&spec).await,
        "resource_locked",
    )?;
    expect_code(
        "purge an exclusive queue from another connection",
        other.purge_queue(&name).await,
        "resource_locked",
    )?;
    expect_code(
        "delete an exclusive queue from another connection",
        other.delete_queue(&name).await,
        "resource_locked",
    )?;
    // Publishing to it from another connection is allowed.
    other
        .publish(&Destination::queue(name.as_str()), crate::Message::new("from-other"))
        .await
        .ctx("publish to an exclusive queue from another connection")?;
    // The owner still uses it.
    ensure_eq(
        "owner reads the exclusive queue",
        ctx.drain(&name).await?,
        vec!["from-other".to_string()],
    )
}

async fn exclusive_consumer_locks_the_queue(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let other = ctx.connect().await;
    let holder = other
        .consume(&q, ConsumeOptions::default().exclusive(true))
        .await
        .ctx("exclusive consume")?;
    // RabbitMQ answers 403 ACCESS_REFUSED "in exclusive use" (not 405).
    expect_code(
        "second consume while an exclusive consumer holds the queue",
        ctx.transport().consume(&q, ConsumeOptions::default()).await,
        "access_refused",
    )?;
    cancel(&holder).await.ctx("cancel the exclusive consumer")?;
    let plain = ctx.consume(&q, ConsumeOptions::default()).await?;
    expect_code(
        "exclusive consume while another consumer exists",
        other.consume(&q, ConsumeOptions::default().exclusive(true)).await,
        "access_refused",
    )?;
    cancel(&plain).await.ctx("cancel")
}

async fn auto_delete_queue_goes_with_its_last_consumer(ctx: &Ctx<'_>) -> Result<(), String> {
    let name = ctx
        .declare_queue(QueueSpec::new(ctx.queue_name("ad")).durable(false).auto_delete(true))
        .await?;
    // An auto-delete queue that never had a consumer stays.
    tokio::time::sleep(Duration::from_millis(100)).await;
    ctx.transport()
        .queue_info(&name)
        .await
        .ctx("auto-delete queue before any consumer")?;
    let a = ctx.consume(&name, ConsumeOptions::default()).await?;
    let b = ctx.consume(&name, ConsumeOptions::default()).await?;
    cancel(&a).await.ctx("cancel first consumer")?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let info = ctx
        .transport()
        .queue_info(&name)
        .await
        .ctx("auto-delete queue with one consumer left")?;
    ensure_eq("consumer_count with one consumer left", info.consumer_count, 1)?;
    cancel(&b).await.ctx("cancel last consumer")?;
    let gone = eventually(WAIT, || async {
        matches!(ctx.transport().queue_info(&name).await, Err(e) if e.code() == "queue_not_found")
    })
    .await;
    ensure(gone, || {
        "auto-delete queue should be deleted after its last consumer was cancelled; it still exists".into()
    })
}

async fn server_named_queue(ctx: &Ctx<'_>) -> Result<(), String> {
    let a = ctx.declare_queue(QueueSpec::temporary()).await?;
    let b = ctx.declare_queue(QueueSpec::temporary()).await?;
    ensure(a != b, || format!("two server-named queues got the same name '{a}'"))?;
    // RabbitMQ generates "amq.gen-" followed by a random suffix.
    ensure(a.starts_with("amq.gen-") && a.len() > "amq.gen-".len(), || {
        format!("server-named queue '{a}' should be named amq.gen-<random>, as RabbitMQ names them")
    })?;
    ctx.publish(&Destination::queue(a.as_str()), "to-generated").await?;
    ensure_eq(
        "server-named queue content",
        ctx.drain(&a).await?,
        vec!["to-generated".to_string()],
    )
}

async fn missing_queue_and_exchange_operations(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    let missing_q = ctx.queue_name("missing-q");
    let missing_x = ctx.exchange_name("missing-x");
    expect_code(
        "queue_info of a missing queue",
        t.queue_info(&missing_q).await,
        "queue_not_found",
    )?;
    expect_code(
        "purge of a missing queue",
        t.purge_queue(&missing_q).await,
        "queue_not_found",
    )?;
    ensure_eq(
        "delete of a missing queue returns",
        t.delete_queue(&missing_q).await.ctx("delete of a missing queue")?,
        0,
    )?;
    t.delete_exchange(&missing_x)
        .await
        .ctx("delete of a missing exchange")?;
    ensure_eq(
        "exchange_exists of a missing exchange",
        t.exchange_exists(&missing_x).await.ctx("exchange_exists")?,
        false,
    )?;
    let q = ctx.queue("real").await?;
    expect_code(
        "bind from a missing exchange",
        t.bind(&Binding::queue(q.clone(), missing_x.clone(), "k")).await,
        "exchange_not_found",
    )?;
    let ex = ctx.exchange("real-x", ExchangeKind::Direct).await?;
    expect_code(
        "bind a missing queue",
        t.bind(&Binding::queue(missing_q.clone(), ex.clone(), "k")).await,
        "queue_not_found",
    )?;
    // The transport is still usable after those errors (RabbitMQ closes the
    // channel on each; the transport must recover it).
    ctx.bind(&q, &ex, "k").await?;
    ctx.publish(&Destination::new(ex.as_str(), "k"), "after-errors").await?;
    ensure_eq(
        "queue after the errors",
        ctx.drain(&q).await?,
        vec!["after-errors".to_string()],
    )
}

async fn depth_counts_ready_messages_only(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    ctx.publish_all(&Destination::queue(q.as_str()), &["1", "2", "3", "4", "5"])
        .await?;
    ensure_eq("depth with 5 ready", ctx.depth(&q).await?, 5)?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(2)).await?;
    let held = take(&mut sub, 2).await?;
    ctx.wait_depth(&q, 3).await?;
    let info = ctx.transport().queue_info(&q).await.ctx("queue_info")?;
    ensure_eq("message_count with 2 unacked of 5 (ready only)", info.message_count, 3)?;
    for d in held {
        d.ack().await.ctx("ack")?;
    }
    // The consumer takes the rest; depth goes to 0 while they are unacked.
    let rest = take(&mut sub, 2).await?;
    ctx.wait_depth(&q, 1).await?;
    for d in rest {
        d.ack().await.ctx("ack")?;
    }
    let last = take(&mut sub, 1).await?;
    ctx.wait_depth(&q, 0).await?;
    for d in last {
        d.ack().await.ctx("ack")?;
    }
    cancel(&sub).await.ctx("cancel")
}

async fn purge_and_delete_return_ready_counts(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let dest = Destination::queue(q.as_str());
    ctx.publish_all(&dest, &["1", "2", "3", "4", "5"]).await?;
    let mut sub = ctx.consume(&q, ConsumeOptions::default().prefetch(1)).await?;
    let held = take(&mut sub, 1).await?;
    ctx.wait_depth(&q, 4).await?;
    let purged = ctx.transport().purge_queue(&q).await.ctx("purge")?;
    ensure_eq("purge count with 4 ready and 1 unacked", purged, 4)?;
    ensure_eq("depth after purge", ctx.depth(&q).await?, 0)?;
    // The unacked message survives the purge: requeued, it is delivered again.
    for d in held {
        d.nack(true).await.ctx("nack with requeue")?;
    }
    let again = take(&mut sub, 1).await?;
    ensure_eq("message redelivered after purge", body(&again[0]), "1".to_string())?;
    ctx.publish_all(&dest, &["6", "7", "8"]).await?;
    ctx.wait_depth(&q, 3).await?;
    let deleted = ctx.transport().delete_queue(&q).await.ctx("delete")?;
    ensure_eq("delete count with 3 ready and 1 unacked", deleted, 3)?;
    expect_code(
        "queue_info after delete",
        ctx.transport().queue_info(&q).await,
        "queue_not_found",
    )?;
    drop(again);
    Ok(())
}

async fn consumer_count(ctx: &Ctx<'_>) -> Result<(), String> {
    let q = ctx.queue("q").await?;
    let qr = q.as_str();
    let count = move |c: &'static str| async move {
        Ok::<u32, String>(ctx.transport().queue_info(qr).await.ctx(c)?.consumer_count)
    };
    ensure_eq("consumer_count with no consumer", count("queue_info").await?, 0)?;
    let a = ctx.consume(&q, ConsumeOptions::default()).await?;
    let other = ctx.connect().await;
    let b = other
        .consume(&q, ConsumeOptions::default())
        .await
        .ctx("consume from a second connection")?;
    ensure_eq("consumer_count with two consumers", count("queue_info").await?, 2)?;
    let declared = ctx
        .transport()
        .declare_queue(&QueueSpec::new(q.clone()))
        .await
        .ctx("redeclare")?;
    ensure_eq("consumer_count reported by declare", declared.consumer_count, 2)?;
    cancel(&a).await.ctx("cancel")?;
    let one = eventually(WAIT, || async { count("queue_info").await == Ok(1) }).await;
    ensure(one, || {
        "consumer_count should be 1 after one of two consumers was cancelled".into()
    })?;
    cancel(&b).await.ctx("cancel")
}

async fn declare_topology(ctx: &Ctx<'_>) -> Result<(), String> {
    let ex = ctx.exchange_name("events");
    let q = ctx.queue_name("sessions");
    let topology = crate::topology::Topology::new()
        .exchange(ExchangeSpec::topic(ex.clone()))
        .bound_queue(QueueSpec::new(q.clone()), &ex, "session.*");
    ctx.transport().declare(&topology).await.ctx("declare topology")?;
    // Declaring it again is a no-op.
    ctx.transport().declare(&topology).await.ctx("redeclare topology")?;
    ctx.publish(&Destination::new(ex.as_str(), "session.created"), "s1")
        .await?;
    ctx.publish(&Destination::new(ex.as_str(), "memory.created"), "m1")
        .await?;
    ensure_eq("bound queue content", ctx.drain(&q).await?, vec!["s1".to_string()])
}

async fn exclusive_queue_goes_with_its_connection(ctx: &Ctx<'_>) -> Result<(), String> {
    let owner = ctx.connect().await;
    let name = ctx.queue_name("excl");
    owner
        .declare_queue(&QueueSpec::new(name.clone()).durable(false).exclusive(true))
        .await
        .ctx("declare an exclusive queue on a second connection")?;
    owner.close().await.ctx("close the owning connection")?;
    let gone = eventually(WAIT, || async {
        matches!(ctx.transport().queue_info(&name).await, Err(e) if e.code() == "queue_not_found")
    })
    .await;
    ensure(gone, || {
        format!("exclusive queue '{name}' should be deleted when its connection closes")
    })
}

async fn unused_queue_expires(ctx: &Ctx<'_>) -> Result<(), String> {
    let expiring = |suffix: &str| {
        let mut spec = QueueSpec::new(ctx.queue_name(suffix));
        spec.arguments.expires = Some(Duration::from_millis(300));
        ctx.declare_queue(spec)
    };
    let unused = expiring("unused").await?;
    let used = expiring("used").await?;
    let polled = expiring("polled").await?;
    let sub = ctx.consume(&used, ConsumeOptions::default()).await?;
    let exists = |q: String| async move {
        match ctx.transport().queue_info(&q).await {
            Ok(_) => Ok(true),
            Err(e) if e.code() == "queue_not_found" => Ok(false),
            Err(e) => Err(format!("queue_info '{q}': {e}")),
        }
    };
    // On RabbitMQ a passive declare (queue_info) renews the lease, so
    // "unused" and "used" are not looked at while the time runs.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ensure(exists(polled.clone()).await?, || {
            format!("queue '{polled}' inspected every 100ms must not expire (queue_info renews the lease)")
        })?;
    }
    ensure(!exists(unused.clone()).await?, || {
        format!("queue '{unused}' with x-expires 300ms, unused for 1s, should be deleted")
    })?;
    ensure(exists(used.clone()).await?, || {
        format!("queue '{used}' with a consumer must not expire")
    })?;
    cancel(&sub).await.ctx("cancel")?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ensure(!exists(used.clone()).await?, || {
        format!("queue '{used}' should expire 300ms after its consumer is gone (still there after 1s)")
    })?;
    ensure(!exists(polled.clone()).await?, || {
        format!("queue '{polled}' should expire once no longer inspected (still there after 1s)")
    })
}

async fn auto_delete_exchange_goes_with_its_last_binding(ctx: &Ctx<'_>) -> Result<(), String> {
    let ex = ctx.exchange_name("ad");
    let t = ctx.transport();
    t.declare_exchange(&ExchangeSpec::direct(ex.clone()).auto_delete(true))
        .await
        .ctx("declare an auto-delete exchange")?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Never bound: it stays.
    ensure_eq(
        "auto-delete exchange that was never bound exists",
        t.exchange_exists(&ex).await.ctx("exchange_exists")?,
        true,
    )?;
    let q = ctx.queue("q").await?;
    ctx.bind(&q, &ex, "k").await?;
    ctx.bind(&q, &ex, "j").await?;
    t.unbind(&Binding::queue(q.clone(), ex.clone(), "k"))
        .await
        .ctx("unbind k")?;
    ensure_eq(
        "auto-delete exchange with one binding left exists",
        t.exchange_exists(&ex).await.ctx("exchange_exists")?,
        true,
    )?;
    t.unbind(&Binding::queue(q.clone(), ex.clone(), "j"))
        .await
        .ctx("unbind j")?;
    let gone = eventually(WAIT, || async { matches!(t.exchange_exists(&ex).await, Ok(false)) }).await;
    ensure(gone, || {
        format!("auto-delete exchange '{ex}' should be deleted when its last binding is removed")
    })
}

async fn deleting_removes_bindings(ctx: &Ctx<'_>) -> Result<(), String> {
    let t = ctx.transport();
    let ex = ctx.exchange("x", ExchangeKind::Direct).await?;
    let q = ctx.queue("q").await?;
    let dest = Destination::new(ex.as_str(), "k");
    ctx.bind(&q, &ex, "k").await?;
    // Deleting the exchange removes its bindings: a new exchange of the
    // same name routes nowhere.
    t.delete_exchange(&ex).await.ctx("delete exchange")?;
    t.declare_exchange(&ExchangeSpec::direct(ex.clone()))
        .await
        .ctx("redeclare exchange")?;
    ctx.publish(&dest, "after-exchange-recreated").await?;
    ensure_eq("depth after the exchange was recreated", ctx.depth(&q).await?, 0)?;
    // Deleting the queue removes its bindings too.
    ctx.bind(&q, &ex, "k").await?;
    t.delete_queue(&q).await.ctx("delete queue")?;
    ctx.declare_queue(QueueSpec::new(q.clone())).await?;
    ctx.publish(&dest, "after-queue-recreated").await?;
    ensure_eq("depth after the queue was recreated", ctx.depth(&q).await?, 0)
}
