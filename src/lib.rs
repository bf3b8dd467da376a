#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

use std::sync::Arc;

/// The contract: message model, topology, traits, Worker, RPC client, settings, codecs, errors.
pub use switchyard_core as core;
/// The contract's modules, for the items not re-exported at the top level.
pub use switchyard_core::{codec, envelope, error, handler, message, rpc, settings, topology, transport, worker};
// What applications use, re-exported one by one (transport-implementer
// pieces such as `Acker` stay under `switchyard::transport`).
pub use switchyard_core::{
    handler_fn, headers, Admin, Binding, BrokerReply, Capabilities, CloseScope, Codec, ConsumeOptions, Consumer,
    DeleteIf, Delivery, DeliveryInfo, Destination, Envelope, Error, ExchangeKind, ExchangeSpec, Extensions,
    FailureKind, FromEnvelope, FromHeaderValue, GetOk, Handler, HandlerError, HeaderValue, Headers, IntoOutcome, Json,
    JsonCodec, Message, Outbox, Outcome, Overflow, Properties, PublishOptions, Publisher, PublisherExt, QueueArguments,
    QueueInfo, QueueSpec, QueueType, ReplyChannel, Result, Settings, State, StateLayer, StreamOffset, Subscription,
    Topology, Transport, TransportKind,
};
/// tower layers for handlers and publishers.
pub use switchyard_middleware as middleware;

/// tower, re-exported so that applications compose layers without a tower
/// dependency of their own (`switchyard::ServiceBuilder`, or
/// `switchyard::tower::…` for the rest of tower).
pub use tower;
pub use tower::{Layer, Service, ServiceBuilder, ServiceExt};

// An HTTP endpoint next to a Worker (cargo feature `ops`); documented
// inside, so that its links resolve in the module.
#[cfg(feature = "ops")]
pub mod ops;

// The user guide's samples, as doc tests (docs/guide/).
#[cfg(doctest)]
mod guide;

/// The in-process broker (cargo feature `memory`, on by default).
#[cfg(feature = "memory")]
pub use switchyard_memory as memory;

/// The RabbitMQ transport on lapin (cargo feature `lapin`).
#[cfg(feature = "lapin")]
pub use switchyard_lapin as lapin;

/// The RabbitMQ transport on amqprs (cargo feature `amqprs`).
#[cfg(feature = "amqprs")]
pub use switchyard_amqprs as amqprs;

/// Connects the transport that `settings` select and this build has
/// (cargo features), as one shape: `Arc<dyn Transport>`.
///
/// - `RABBITMQ_TRANSPORT` = `memory` | `lapin` | `amqprs` names it;
/// - else a `RABBITMQ_URL` of the form `memory://` or `memory://name` selects
///   the in-process broker;
/// - else it is a RabbitMQ transport: lapin if the `lapin` feature is on,
///   otherwise amqprs.
///
/// In-process brokers are named by the URL's host part (`memory://` is the
/// unnamed one): every `connect` with the same name in one process opens a
/// new connection to the **same** broker, as connecting twice to RabbitMQ
/// would. Without a `memory://` URL, `RABBITMQ_TRANSPORT=memory` uses the
/// unnamed broker.
///
/// Errors: `invalid_config` naming the variable when the chosen transport's
/// cargo feature is off (or no RabbitMQ transport is compiled in and
/// nothing selects memory), or when the settings are invalid; otherwise the
/// transport's own connection error.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> switchyard::Result<()> {
/// use switchyard::{Settings, TransportKind};
/// // From the environment: `RABBITMQ_TRANSPORT=memory`, or `RABBITMQ_URL=memory://`, …
/// let settings = Settings::default().with_transport(TransportKind::Memory);
/// let transport = switchyard::connect(&settings).await?;
/// assert_eq!(transport.name(), "memory");
/// # Ok(()) }
/// ```
pub async fn connect(settings: &Settings) -> Result<Arc<dyn Transport>> {
    settings.validate()?;
    let (kind, variable) = match (settings.transport, settings.transport_kind()) {
        (Some(k), _) => (k, "RABBITMQ_TRANSPORT"),
        (None, Some(k)) => (k, "RABBITMQ_URL"),
        (None, None) => (default_rabbitmq()?, "RABBITMQ_TRANSPORT"),
    };
    match kind {
        TransportKind::Memory => connect_memory(settings, variable),
        TransportKind::Lapin => connect_lapin(settings, variable).await,
        TransportKind::Amqprs => connect_amqprs(settings, variable).await,
    }
}

/// The cargo features of this build that provide transports.
fn enabled_transports() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "memory") {
        v.push("memory");
    }
    if cfg!(feature = "lapin") {
        v.push("lapin");
    }
    if cfg!(feature = "amqprs") {
        v.push("amqprs");
    }
    v
}

#[cfg_attr(all(feature = "memory", feature = "lapin", feature = "amqprs"), allow(dead_code))]
fn feature_off(variable: &str, kind: TransportKind) -> Error {
    let enabled = enabled_transports();
    Error::InvalidConfig {
        variable: variable.into(),
        value: kind.to_string(),
        reason: format!(
            "this build of switchyard has no {kind} transport: enable the cargo feature \"{kind}\" of switchyard \
             (enabled: {})",
            if enabled.is_empty() {
                "none".to_owned()
            } else {
                enabled.join(", ")
            }
        ),
    }
}

fn default_rabbitmq() -> Result<TransportKind> {
    if cfg!(feature = "lapin") {
        Ok(TransportKind::Lapin)
    } else if cfg!(feature = "amqprs") {
        Ok(TransportKind::Amqprs)
    } else {
        Err(Error::InvalidConfig {
            variable: "RABBITMQ_TRANSPORT".into(),
            value: String::new(),
            reason: format!(
                "unset, and this build of switchyard has no RabbitMQ transport: enable the cargo feature \"lapin\" \
                 or \"amqprs\" of switchyard, or choose the in-process broker with RABBITMQ_TRANSPORT=memory or \
                 RABBITMQ_URL=memory:// (enabled: {})",
                enabled_transports().join(", ")
            ),
        })
    }
}

#[cfg(feature = "memory")]
fn connect_memory(settings: &Settings, _variable: &str) -> Result<Arc<dyn Transport>> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static BROKERS: OnceLock<Mutex<HashMap<String, memory::MemoryBroker>>> = OnceLock::new();
    let url = settings.url.expose().trim();
    let name = match url.get(..9) {
        Some(scheme) if scheme.eq_ignore_ascii_case("memory://") => url[9..].trim_end_matches('/').to_owned(),
        _ => String::new(),
    };
    let broker = BROKERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name)
        .or_default()
        .clone();
    Ok(broker.connect())
}

#[cfg(not(feature = "memory"))]
fn connect_memory(_settings: &Settings, variable: &str) -> Result<Arc<dyn Transport>> {
    Err(feature_off(variable, TransportKind::Memory))
}

#[cfg(feature = "lapin")]
async fn connect_lapin(settings: &Settings, _variable: &str) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(lapin::LapinTransport::connect(settings).await?))
}

#[cfg(not(feature = "lapin"))]
async fn connect_lapin(_settings: &Settings, variable: &str) -> Result<Arc<dyn Transport>> {
    Err(feature_off(variable, TransportKind::Lapin))
}

#[cfg(feature = "amqprs")]
async fn connect_amqprs(settings: &Settings, _variable: &str) -> Result<Arc<dyn Transport>> {
    Ok(Arc::new(amqprs::AmqprsTransport::connect(settings).await?))
}

#[cfg(not(feature = "amqprs"))]
async fn connect_amqprs(_settings: &Settings, variable: &str) -> Result<Arc<dyn Transport>> {
    Err(feature_off(variable, TransportKind::Amqprs))
}
