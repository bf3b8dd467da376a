//! The transport conformance suite against the in-memory broker.
//!
//! One `#[tokio::test]` per scenario (see `switchyard_core::conformance_tests!`):
//! `cargo test --test conformance_memory routing::` runs one area;
//! `-- --nocapture` shows the per-scenario lines.

use std::sync::Arc;

use switchyard_core::testkit::{factory_fn, TransportFactory};
use switchyard_core::Transport;
use switchyard_memory::MemoryBroker;

/// One broker per test, shared by the scenario's connections; every
/// `connect` is a new client connection to it.
async fn factory() -> Option<impl TransportFactory> {
    let broker = MemoryBroker::new();
    Some(factory_fn(move || {
        let broker = broker.clone();
        async move { broker.connect() as Arc<dyn Transport> }
    }))
}

switchyard_core::conformance_tests!(factory);
