//! A Worker with its ops endpoint: `/metrics`, `/healthz`, `/readyz`, `/status`.
//!
//! ```text
//! cargo run --example ops --features ops          # in-process broker
//! curl -s localhost:9464/status; curl -si localhost:9464/readyz
//! ```
//!
//! `OPS_ADDR` sets the address (default `127.0.0.1:9464`); the `RABBITMQ_*`
//! variables (or a `.env` file) choose the transport. Stops on Ctrl-C.

use std::time::Duration;

use switchyard::ops::OpsServer;
use switchyard::worker::{shutdown_signal, Worker};
use switchyard::{handler_fn, Destination, Message, Settings, TransportKind};

#[tokio::main]
async fn main() -> switchyard::Result<()> {
    let settings = match Settings::from_env()? {
        s if s.transport_kind().is_none() && std::env::var_os("RABBITMQ_URL").is_none() => {
            s.with_transport(TransportKind::Memory)
        }
        s => s,
    };
    let transport = switchyard::connect(&settings).await?;
    transport.declare_queue(&settings.queue("ops.demo")).await?;
    let worker = Worker::new(transport.clone())
        .with_settings(&settings)
        .route("ops.demo", handler_fn(|| async {}))
        .start()
        .await?;
    let addr = std::env::var("OPS_ADDR").unwrap_or_else(|_| "127.0.0.1:9464".into());
    let ops = OpsServer::new(worker.clone())
        .transport(transport.clone())
        .queue_depth(Duration::from_secs(5))
        .bind(&addr)
        .await?;
    println!("ops endpoint on http://{}/status", ops.local_addr());
    for i in 0..10 {
        transport
            .publish(&Destination::queue("ops.demo"), Message::new(format!("job {i}")))
            .await?;
    }
    shutdown_signal().await;
    worker.shutdown().await?;
    ops.shutdown().await;
    Ok(())
}
