//! # switchyard-amqprs
//!
//! The switchyard [`Transport`](switchyard_core::Transport) for RabbitMQ on
//! [amqprs](https://docs.rs/amqprs) 2.x.
//!
//! ```no_run
//! # async fn demo() -> switchyard_core::Result<()> {
//! use switchyard_core::{settings::Settings, Destination, Message, Publisher, Transport};
//! use switchyard_amqprs::AmqprsTransport;
//!
//! let settings = Settings::from_env()?;
//! let transport = AmqprsTransport::connect(&settings).await?;
//! transport.publish(&Destination::queue("orders"), Message::new("hi").persistent(true)).await?;
//! transport.close().await?;
//! # Ok(()) }
//! ```
//!
//! [`AmqprsTransport`] is the shared AMQP 0-9-1 engine
//! ([`switchyard_amqp::AmqpTransport`]) over [`AmqprsClient`], a thin
//! adapter of amqprs to the engine's client trait
//! ([`switchyard_amqp::client`]). The engine does what does not depend on
//! the client library, once for both RabbitMQ transports: automatic
//! recovery (reconnect with backoff, re-declare the recorded topology,
//! restart consumers feeding the same `Subscription`), pipelined publisher
//! confirms sent again across channel and connection losses until the
//! publish wait deadline, mandatory returns as `Unroutable`, ack coalescing,
//! QoS always set, direct reply-to for RPC, the mapping of broker reply
//! codes to switchyard errors. Configure it with [`AmqpConfig`] (built from
//! [`Settings`](switchyard_core::Settings) or a URL); observe it with
//! [`AmqprsTransport::state`] and [`AmqprsTransport::state_watch`].
//!
//! What the adapter adds for amqprs ([`client`]): confirms tracked from the
//! `publish_ack` / `publish_nack` / `publish_return` callbacks, the broker's
//! close replies recorded from the channel and connection callbacks, every
//! synchronous request run on a task of its own (amqprs is not cancel-safe),
//! short strings checked before amqprs could panic on them, and amqps from
//! PEM material already in memory (mutual TLS included). Message and header
//! conversion is in [`convert`].
//!
//! ## amqprs limits
//!
//! - A header long string that is not UTF-8 cannot be decoded by amqprs: the
//!   delivery takes its connection down (each consumer then reconnects; the
//!   message is redelivered). Send binary header data as a byte array.
//! - amqprs 2.1.5 does not announce the `connection.blocked` capability, so
//!   a resource alarm shows as publishes that wait for their confirm rather
//!   than as a [`ConnectionState::Blocked`](switchyard_amqp::ConnectionState) state.
#![warn(missing_docs)]

pub mod client;
pub mod convert;

pub use client::AmqprsClient;
pub use switchyard_amqp::AmqpConfig;

/// The switchyard transport for RabbitMQ on amqprs: the shared AMQP engine
/// over [`AmqprsClient`]. Construct it with
/// [`connect`](switchyard_amqp::AmqpTransport::connect) (from
/// [`Settings`](switchyard_core::Settings)),
/// [`connect_url`](switchyard_amqp::AmqpTransport::connect_url) or
/// [`connect_with`](switchyard_amqp::AmqpTransport::connect_with) (an
/// [`AmqpConfig`]).
pub type AmqprsTransport = switchyard_amqp::AmqpTransport<AmqprsClient>;
