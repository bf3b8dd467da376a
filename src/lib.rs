#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

/// The contract: message model, topology, traits, Worker, RPC client, settings, codecs, errors.
pub use switchyard_core as core;
pub use switchyard_core::*;
/// tower layers for handlers and publishers.
pub use switchyard_middleware as middleware;

/// The in-process broker (cargo feature `memory`, on by default).
#[cfg(feature = "memory")]
pub use switchyard_memory as memory;

/// The RabbitMQ transport on lapin (cargo feature `lapin`).
#[cfg(feature = "lapin")]
pub use switchyard_lapin as lapin;

/// The RabbitMQ transport on amqprs (cargo feature `amqprs`).
#[cfg(feature = "amqprs")]
pub use switchyard_amqprs as amqprs;
