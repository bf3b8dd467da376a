//! Scheduled publishing with a tokio interval: a "tick" every 100 ms for
//! one second, consumed by a Worker.
//!
//! ```text
//! cargo run --example scheduled
//! RABBITMQ_TRANSPORT=lapin cargo run --example scheduled --features lapin   # on RabbitMQ
//! ```
//!
//! No scheduler is needed for fixed periods: a `tokio::time::interval`
//! around a publish is one. `MissedTickBehavior::Delay` keeps the period
//! after a slow publish instead of bursting to catch up, and a
//! `CancellationToken` stops the schedule with the rest of the program.
//! For "run once at 03:00" or cron expressions, compute the next instant and
//! `sleep_until` it in the same loop. Publishing is at least once: give each
//! tick a `message_id` derived from its slot so that a consumer with the
//! de-duplication layer handles a tick once even if it is published twice.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use switchyard::handler::MessageId;
use switchyard::worker::Worker;
use switchyard::{handler_fn, Destination, Json, PublisherExt, QueueSpec, Settings};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Serialize, Deserialize)]
struct Tick {
    n: u64,
}

#[tokio::main]
async fn main() -> switchyard::Result<()> {
    let mut settings = Settings::from_env()?;
    if settings.transport.is_none() && !settings.url_takes_precedence() {
        settings = settings.with_url("memory://"); // the in-process broker unless told otherwise
    }
    let transport = switchyard::connect(&settings).await?;
    transport.declare_queue(&QueueSpec::new("ticks")).await?;
    transport.purge_queue("ticks").await?;

    let worker = Worker::new(transport.clone())
        .route(
            "ticks",
            handler_fn(|Json(tick): Json<Tick>, MessageId(id): MessageId| async move {
                println!("tick {} ({})", tick.n, id.unwrap_or_default());
            }),
        )
        .start()
        .await?;

    // The schedule: every 100 ms until cancelled.
    let stop = CancellationToken::new();
    let schedule = {
        let transport = transport.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let dest = Destination::queue("ticks");
            let mut interval = tokio::time::interval(Duration::from_millis(100));
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let mut n = 0u64;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = interval.tick() => {}
                }
                n += 1;
                let published = transport
                    .publish_json_with(&dest, &Tick { n }, |m| {
                        // Ticks are worthless after a second: transient, with a TTL.
                        m.with_message_id(format!("tick-{n}"))
                            .with_expiration(Duration::from_secs(1))
                            .transient()
                    })
                    .await;
                if let Err(e) = published {
                    eprintln!("tick {n} not published: {e}"); // the next tick tries again
                }
            }
            n
        })
    };

    tokio::time::sleep(Duration::from_millis(1_000)).await;
    stop.cancel();
    let published = schedule.await.expect("the schedule task does not panic");
    worker.wait_handled("ticks", published, Duration::from_secs(5)).await?;
    worker.shutdown().await?;
    println!("{published} ticks published and handled");
    transport.close().await
}
