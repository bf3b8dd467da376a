//! The transport conformance suite against RabbitMQ through the lapin
//! transport: `cargo test --features lapin --test conformance_lapin`.
//!
//! One `#[tokio::test]` per scenario (`switchyard_core::conformance_tests!`).
//! Connects to `RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/`);
//! when the broker is unreachable every test fails if
//! `SWITCHYARD_REQUIRE_RABBITMQ=1`, else prints "skipped: RabbitMQ unreachable".

use std::sync::Arc;
use std::time::Duration;

use switchyard::lapin::{AmqpConfig, LapinTransport};
use switchyard_core::settings::Settings;
use switchyard_core::testkit::{factory_fn, TransportFactory};
use switchyard_core::Transport;

fn settings() -> Settings {
    let url = switchyard_core::testkit::rabbitmq_url();
    Settings::default()
        .with_url(url)
        .with_connection_attempts(1)
        .with_retry_delay(Duration::from_millis(100))
}

fn config(settings: &Settings) -> AmqpConfig {
    AmqpConfig::from_settings(settings)
        .expect("valid settings")
        .connection_name("switchyard conformance lapin")
}

async fn factory() -> Option<impl TransportFactory> {
    let settings = settings();
    match LapinTransport::connect_with(config(&settings)).await {
        Ok(t) => {
            let _ = t.close().await;
        }
        Err(e) => return switchyard_core::testkit::broker_unreachable(e),
    }
    Some(factory_fn(move || {
        let settings = settings.clone();
        async move {
            let t = LapinTransport::connect_with(config(&settings))
                .await
                .expect("connect to RabbitMQ");
            Arc::new(t) as Arc<dyn Transport>
        }
    }))
}

switchyard_core::conformance_tests!(factory);
