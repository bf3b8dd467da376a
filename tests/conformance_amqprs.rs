//! The transport conformance suite against RabbitMQ through the amqprs
//! transport, one test per scenario:
//! `cargo test --features amqprs --test conformance_amqprs`.
//!
//! Connects to `RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/`);
//! when the broker is unreachable every test fails if
//! `SWITCHYARD_REQUIRE_RABBITMQ=1`, else prints "skipped: RabbitMQ unreachable".

use std::sync::Arc;
use std::time::Duration;

use switchyard::amqprs::{AmqpConfig, AmqprsTransport};
use switchyard_core::settings::Settings;
use switchyard_core::testkit::{factory_fn, TransportFactory};
use switchyard_core::Transport;

fn config() -> AmqpConfig {
    let url = switchyard_core::testkit::rabbitmq_url();
    let settings = Settings::default()
        .with_url(url)
        .with_connection_attempts(1)
        .with_retry_delay(Duration::from_millis(100));
    AmqpConfig::from_settings(&settings)
        .expect("RABBITMQ_URL")
        .connection_name("switchyard conformance amqprs")
}

async fn factory() -> Option<impl TransportFactory> {
    let config = config();
    match AmqprsTransport::connect_with(config.clone()).await {
        Ok(t) => {
            let _ = t.close().await;
        }
        Err(e) => return switchyard_core::testkit::broker_unreachable(e),
    }
    Some(factory_fn(move || {
        let config = config.clone();
        async move {
            let t = AmqprsTransport::connect_with(config)
                .await
                .expect("connect to RabbitMQ");
            Arc::new(t) as Arc<dyn Transport>
        }
    }))
}

switchyard_core::conformance_tests!(factory);
