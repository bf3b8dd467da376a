//! # switchyard-amqprs
//!
//! The switchyard [`Transport`](switchyard_core::Transport) for RabbitMQ on
//! [amqprs](https://docs.rs/amqprs) 2.x.
//!
//! amqprs is a thin client: no recovery, no per-publish confirm future, an
//! unbounded consumer receiver. This crate adds what a service needs:
//!
//! - **Publisher confirms, pipelined**: every channel in a small pool runs in
//!   confirm mode; delivery tags are assigned in the same serialized section
//!   as the `basic.publish` and resolved from the `publish_ack` /
//!   `publish_nack` callbacks (with `multiple`), `basic.return` makes a
//!   mandatory publish fail with `Unroutable`. Unconfirmed publishes live in
//!   the shared [`PublishBuffer`](switchyard_amqp::recovery::PublishBuffer).
//! - **Consumers** always set QoS, one channel each; a cancellation by the
//!   broker ends the stream with `Err(ConsumerCancelled)`.
//! - **Automatic recovery** with the client-agnostic parts of
//!   [`switchyard_amqp::recovery`]: reconnect with backoff, re-declare the
//!   recorded topology, restart consumers feeding the same `Subscription`,
//!   republish unconfirmed publishes; callers of `publish` wait (bounded)
//!   during the outage. The state is observable through
//!   [`AmqprsTransport::state`].
//! - **Direct reply-to** for `RpcClient`.
//!
//! ```no_run
//! # async fn demo() -> switchyard_core::Result<()> {
//! use switchyard_core::{settings::Settings, Destination, Message, Publisher};
//! use switchyard_amqprs::AmqprsTransport;
//!
//! let settings = Settings::from_env()?;
//! let transport = AmqprsTransport::connect(&settings).await?;
//! transport.publish(&Destination::queue("orders"), Message::new("hi").persistent(true)).await?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

mod chan;
mod config;
mod confirms;
mod consume;
pub mod convert;
mod errors;
mod publish;
mod transport;

pub use config::AmqprsConfig;
pub use transport::AmqprsTransport;
