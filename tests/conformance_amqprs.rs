//! The transport conformance suite against RabbitMQ through the amqprs
//! transport: `cargo test --features amqprs --test conformance_amqprs`.
//!
//! Connects to `RABBITMQ_URL` (default `amqp://guest:guest@127.0.0.1:5672/`);
//! when the broker is unreachable every test fails if
//! `SWITCHYARD_REQUIRE_RABBITMQ=1`, else prints "skipped: RabbitMQ unreachable".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use switchyard::amqprs::{AmqprsConfig, AmqprsTransport};
use switchyard_core::testkit::TransportFactory;
use switchyard_core::Transport;

struct AmqprsFactory {
    config: AmqprsConfig,
}

// The root package has no async-trait dependency: the trait's boxed-future
// form is written out.
impl TransportFactory for AmqprsFactory {
    fn connect<'a, 'f>(&'a self) -> Pin<Box<dyn Future<Output = Arc<dyn Transport>> + Send + 'f>>
    where
        'a: 'f,
        Self: 'f,
    {
        Box::pin(async move {
            let t = AmqprsTransport::connect_with(self.config.clone())
                .await
                .expect("connect to RabbitMQ");
            Arc::new(t) as Arc<dyn Transport>
        })
    }
}

fn url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into())
}

async fn factory() -> Option<AmqprsFactory> {
    let config = AmqprsConfig::from_url(&url())
        .expect("RABBITMQ_URL")
        .connection_name("switchyard conformance amqprs")
        .connection_attempts(1, Duration::from_millis(100));
    match AmqprsTransport::connect_with(config.clone()).await {
        Ok(t) => {
            let _ = t.close().await;
            Some(AmqprsFactory { config })
        }
        Err(e) => {
            if std::env::var("SWITCHYARD_REQUIRE_RABBITMQ").as_deref() == Ok("1") {
                panic!("RabbitMQ unreachable at {}: {e}", switchyard_core::settings::redact_url(&url()));
            }
            eprintln!("skipped: RabbitMQ unreachable");
            None
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let Some(factory) = factory().await else {
        return;
    };
    let filter = std::env::var("SWITCHYARD_CONFORMANCE_FILTER").ok();
    switchyard_core::testkit::run_suite(&factory, filter.as_deref())
        .await
        .assert_ok();
}
