//! # switchyard-core
//!
//! The contract every switchyard transport and middleware builds on:
//!
//! - the message model ([`Message`], [`Properties`], [`Headers`]),
//! - destinations and topology ([`Destination`], [`ExchangeSpec`], [`QueueSpec`], [`Binding`], [`Topology`]),
//! - the transport traits ([`Publisher`], [`Consumer`], [`Admin`], [`Transport`]) and [`Delivery`],
//! - handlers ([`Handler`], [`handler_fn`], extractors, [`Outcome`], [`HandlerError`]),
//! - the handler runtime ([`worker::Worker`]) and the RPC client ([`rpc::RpcClient`]),
//! - settings from `RABBITMQ_*` variables ([`settings::Settings`]),
//! - codecs ([`codec::JsonCodec`]) and errors with stable codes ([`Error::code`]),
//! - with the `testkit` feature, the transport conformance suite (module `testkit`).
//!
//! No broker code and no I/O of its own live here.
#![warn(missing_docs)]

pub mod codec;
pub mod envelope;
pub mod error;
pub mod handler;
pub mod message;
pub mod rpc;
pub mod settings;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod topology;
pub mod transport;
pub mod worker;

pub use codec::{Codec, JsonCodec};
pub use envelope::{headers, Envelope, Extensions, FromHeaderValue};
pub use error::{BrokerReply, CloseScope, Error, Result};
pub use handler::{
    handler_fn, FailureKind, FromEnvelope, Handler, HandlerError, IntoOutcome, Json, Outbox, Outcome, State, StateLayer,
};
pub use message::{HeaderValue, Headers, Message, Properties};
pub use settings::{Settings, TransportKind};
pub use topology::{
    Binding, Destination, ExchangeKind, ExchangeSpec, Overflow, QueueArguments, QueueInfo, QueueSpec, QueueType,
    Topology,
};
pub use transport::{
    Acker, Admin, Capabilities, ConsumeOptions, Consumer, DeleteIf, Delivery, DeliveryInfo, GetOk, PublishOptions,
    Publisher, PublisherExt, ReplyChannel, ReplySink, Settlement, StreamOffset, Subscription, Transport,
};
