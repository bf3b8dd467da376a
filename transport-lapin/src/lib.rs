//! # switchyard-lapin
//!
//! The switchyard transport for RabbitMQ on [lapin](https://docs.rs/lapin) 4
//! (tokio runtime): a thin adapter of lapin to the shared AMQP engine
//! [`switchyard_amqp`], which owns recovery (reconnect, re-declare, restart
//! consumers, resend unconfirmed publishes), confirm waiting, ack
//! coalescing, flow control and error mapping. `switchyard-amqprs` is the
//! same engine over amqprs, with the same modules: `client` (the client
//! trait implemented over the library) and `convert` (messages and headers).
//!
//! ```no_run
//! # async fn demo() -> switchyard_core::Result<()> {
//! use switchyard_core::settings::Settings;
//! use switchyard_core::{Destination, Message, Publisher, Transport};
//! use switchyard_lapin::LapinTransport;
//!
//! let transport = LapinTransport::connect(&Settings::from_env()?).await?;
//! transport.publish(&Destination::queue("orders"), Message::new("hi").persistent(true)).await?;
//! transport.close().await?;
//! # Ok(()) }
//! ```
//!
//! ## Why our own recovery rather than lapin's `enable_auto_recover()`
//!
//! lapin 4 can recover connections itself, but its recovery fails in-flight
//! confirmed publishes with `invalid channel state: Reconnecting` (so the
//! resend logic is ours either way), gives up after its own attempt budget,
//! and is young (lapin issue #450 and fixes through 4.12.x). The engine's
//! supervisor serves both clients alike. `examples/auto_recover_probe.rs`
//! runs raw lapin with `enable_auto_recover()` for the record.
//!
//! ## Header types
//!
//! Every AMQP field-table type round-trips as the type it arrived as
//! (integers keep their width, decimals stay decimals, byte arrays stay byte
//! arrays). A long string that is not valid UTF-8 arrives as
//! [`HeaderValue::Bytes`](switchyard_core::HeaderValue::Bytes) and goes back
//! out as an AMQP byte array (`x`), not a long string (`S`).
#![warn(missing_docs)]

mod client;
mod convert;

pub use client::{LapinChannel, LapinClient, LapinConnection};
/// Re-exported so applications can reach lapin types without a second dependency.
pub use lapin;
pub use switchyard_amqp::{AmqpConfig, BackoffPolicy, ConnectionState, RecoveryConfig, DIRECT_REPLY_TO};

/// The RabbitMQ transport on lapin: the shared engine over [`LapinClient`].
///
/// Construct it with `LapinTransport::connect(&settings)`,
/// `LapinTransport::connect_url(url)` or `LapinTransport::connect_with(config)`.
pub type LapinTransport = switchyard_amqp::AmqpTransport<LapinClient>;
