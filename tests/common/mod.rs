//! What several RabbitMQ test files share.

use std::process::Command;

/// Runs `rabbitmqctl` with `args`, failing the test if it does not succeed.
pub fn rabbitmqctl(args: &[&str]) {
    rabbitmqctl_output(args);
}

/// Runs `rabbitmqctl` with `args` and returns what it printed, failing the
/// test if it does not succeed.
#[allow(dead_code)] // not every test file reads the output
pub fn rabbitmqctl_output(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("run rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Refuses 5,000 passive declarations of a missing queue on `t` — each one a
/// channel the broker closes, more than twice the channel ids of a
/// connection (channel-max 2047) — and checks that every refusal is reported
/// as itself and that declarations, consumers and publishes on the channels
/// opened in between work; then 2,200 consumes of the missing queue, each
/// refused, across the reconnects their refused channels cause. lapin 4.12 used to fail new channels with the
/// error of an earlier channel of the same id once the ids wrapped around;
/// amqprs 2.1 never frees the id of a channel the broker closed and panicked
/// once none was left (see docs/difftest.md, "Spurious 404s").
#[allow(dead_code)] // used by the fault tests of the RabbitMQ transports only
pub async fn refused_channels_leave_later_ones_working(t: &dyn switchyard_core::Transport) {
    use std::time::Duration;
    use switchyard_core::{ConsumeOptions, Destination, ExchangeSpec, Message, QueueSpec};
    let run = &switchyard_core::message::new_id()[..8];
    let missing = format!("sy-fault.missing.{run}");
    for i in 0..5000 {
        let r = t.queue_info(&missing).await;
        match &r {
            Err(e) if e.code() == "queue_not_found" && e.to_string().contains(&missing) => {}
            other => panic!("refusal {i}: expected queue_not_found for '{missing}', got {other:?}"),
        }
        if i % 500 == 499 {
            let q = format!("sy-fault.after-refusals.{run}.{i}");
            let x = format!("{q}.x");
            t.declare_exchange(&ExchangeSpec::direct(x.clone()).durable(false))
                .await
                .unwrap_or_else(|e| panic!("after {i} refusals, declare an exchange: {e}"));
            t.declare_queue(&QueueSpec::new(q.clone()).durable(false))
                .await
                .unwrap_or_else(|e| panic!("after {i} refusals, declare a queue: {e}"));
            let mut sub = t
                .consume(&q, ConsumeOptions::default().auto_ack(true))
                .await
                .unwrap_or_else(|e| panic!("after {i} refusals, consume: {e}"));
            t.publish(&Destination::queue(q.as_str()), Message::new("m"))
                .await
                .unwrap_or_else(|e| panic!("after {i} refusals, publish: {e}"));
            let d = switchyard_core::testkit::recv(&mut sub, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("after {i} refusals, receive: {e}"));
            assert_eq!(&d.message.body[..], b"m");
            sub.cancel_handle().cancel().await.expect("cancel");
            drop(sub);
            t.delete_queue(&q).await.expect("delete the queue");
            t.delete_exchange(&x).await.expect("delete the exchange");
        }
    }
    // Refused consumes: each opens a channel the broker closes, so one of
    // them is the request that finds no id left and has the connection
    // replaced; it too must be refused, not restarted by the recovery and
    // handed out as a subscription that then ends.
    for i in 0..2200 {
        match t.consume(&missing, ConsumeOptions::default()).await {
            Err(e) if e.code() == "queue_not_found" => {}
            Err(e) => panic!("refused consume {i}: expected queue_not_found, got {e}"),
            Ok(_) => panic!("refused consume {i}: consuming the missing queue '{missing}' succeeded"),
        }
    }
}
