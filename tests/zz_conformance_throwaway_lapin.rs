//! THROWAWAY (conformance stream, not to be committed): the suite on RabbitMQ via lapin.
use std::sync::Arc;

use switchyard::lapin::LapinTransport;
use switchyard_core::testkit::{factory_fn, TransportFactory};
use switchyard_core::Transport;

async fn factory() -> Option<impl TransportFactory> {
    Some(factory_fn(|| async {
        Arc::new(LapinTransport::connect_url("amqp://guest:guest@127.0.0.1:5672/").await.expect("connect"))
            as Arc<dyn Transport>
    }))
}

switchyard_core::conformance_tests!(factory);
