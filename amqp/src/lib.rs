//! # switchyard-amqp
//!
//! The AMQP 0-9-1 engine shared by switchyard's RabbitMQ transports
//! (`switchyard-lapin`, `switchyard-amqprs`). What does not depend on the
//! client library lives here, once:
//!
//! - [`recovery`]: reconnect backoff, the observable connection state, the
//!   registry of declared topology and running consumers, the buffer of
//!   unconfirmed publishes;
//! - [`coalesce`]: ack coalescing (one `multiple` ack over the settled
//!   prefix, never past an unfinished handler);
//! - [`errors`]: broker replies (reply code, text, class/method, scope) to
//!   switchyard's [`Error`](switchyard_core::Error) taxonomy;
//! - [`config`]: the connection and engine configuration from
//!   [`Settings`](switchyard_core::Settings), one set of names for both clients;
//! - [`AmqpTransport`]: the transport itself, generic over the small
//!   [`client`] trait that each adapter implements.
#![warn(missing_docs)]

pub mod client;
pub mod coalesce;
pub mod config;
mod engine;
pub mod errors;
pub mod recovery;

pub use client::{AmqpChannel, AmqpClient, AmqpConnection};
pub use config::AmqpConfig;
pub use engine::AmqpTransport;
pub use recovery::{BackoffPolicy, ConnectionState, RecoveryConfig, StateWatch};

/// The direct reply-to pseudo queue (RabbitMQ).
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";
