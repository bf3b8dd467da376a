//! Destinations and topology specifications: exchanges, queues, bindings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::message::{HeaderValue, Headers};

/// Where a message is published: an exchange (empty = the default
/// exchange) and a routing key. Cheap to clone.
///
/// ```
/// use switchyard_core::Destination;
/// let d = Destination::new("contextiq.events", "session.created");
/// assert_eq!(d.exchange(), "contextiq.events");
/// let q = Destination::queue("orders"); // default exchange, routed by queue name
/// assert_eq!((q.exchange(), q.routing_key()), ("", "orders"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    exchange: Arc<str>,
    routing_key: Arc<str>,
}

impl Destination {
    /// A destination on `exchange` with `routing_key`.
    pub fn new(exchange: impl Into<Arc<str>>, routing_key: impl Into<Arc<str>>) -> Self {
        Destination {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
        }
    }

    /// The queue `name` through the default exchange.
    pub fn queue(name: impl Into<Arc<str>>) -> Self {
        Destination::new("", name)
    }

    /// The exchange's name (empty for the default exchange).
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key.
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// The exchange name as a shared string.
    pub fn exchange_arc(&self) -> &Arc<str> {
        &self.exchange
    }

    /// The routing key as a shared string.
    pub fn routing_key_arc(&self) -> &Arc<str> {
        &self.routing_key
    }
}

impl fmt::Debug for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Destination({self})")
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ex = if self.exchange.is_empty() {
            "(default)"
        } else {
            &self.exchange
        };
        write!(f, "{ex}/{}", self.routing_key)
    }
}

/// The routing algorithm of an exchange.
///
/// The four AMQP kinds, two common RabbitMQ plugin kinds by name, and any
/// other plugin kind as [`Custom`](ExchangeKind::Custom). The AMQP
/// transports pass every kind through to the broker (which refuses a kind
/// whose plugin is not enabled with `command_invalid`, 503); the memory
/// transport implements the four kinds and `x-delayed-message`, and
/// reports the others as `unsupported`.
///
/// ```
/// use switchyard_core::ExchangeKind;
/// assert_eq!("x-delayed-message".parse::<ExchangeKind>().unwrap(), ExchangeKind::DelayedMessage);
/// assert_eq!("x-random".parse::<ExchangeKind>().unwrap().as_str(), "x-random");
/// assert!("random".parse::<ExchangeKind>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ExchangeKind {
    /// Routes on exact routing-key equality.
    Direct,
    /// Routes on dotted patterns: `*` one word, `#` zero or more words.
    Topic,
    /// Routes to every bound queue.
    Fanout,
    /// Routes on header values (`x-match` = `all` or `any`).
    Headers,
    /// `x-delayed-message` (RabbitMQ plugin `rabbitmq_delayed_message_exchange`):
    /// holds each message for its `x-delay` header (milliseconds, see
    /// [`Message::with_delay`](crate::Message::with_delay)), then routes it
    /// as the exchange's `x-delayed-type` argument says (see
    /// [`ExchangeSpec::delayed`]).
    DelayedMessage,
    /// `x-consistent-hash` (RabbitMQ plugin
    /// `rabbitmq_consistent_hash_exchange`, shipped with RabbitMQ): routes
    /// each routing key to one bound queue, chosen on a hash ring where a
    /// binding's routing key is its weight.
    ConsistentHash,
    /// Any other exchange type a broker plugin provides, by its name (by
    /// convention starting with `x-`).
    Custom(String),
}

impl ExchangeKind {
    /// The AMQP name (`direct`, `topic`, `fanout`, `headers`,
    /// `x-delayed-message`, `x-consistent-hash`, or the custom name).
    pub fn as_str(&self) -> &str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Headers => "headers",
            ExchangeKind::DelayedMessage => "x-delayed-message",
            ExchangeKind::ConsistentHash => "x-consistent-hash",
            ExchangeKind::Custom(name) => name,
        }
    }

    /// True for the four kinds every AMQP 0-9-1 broker has.
    pub fn is_standard(&self) -> bool {
        matches!(
            self,
            ExchangeKind::Direct | ExchangeKind::Topic | ExchangeKind::Fanout | ExchangeKind::Headers
        )
    }
}

impl std::fmt::Display for ExchangeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ExchangeKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "direct" => Ok(ExchangeKind::Direct),
            "topic" => Ok(ExchangeKind::Topic),
            "fanout" => Ok(ExchangeKind::Fanout),
            "headers" => Ok(ExchangeKind::Headers),
            "x-delayed-message" => Ok(ExchangeKind::DelayedMessage),
            "x-consistent-hash" => Ok(ExchangeKind::ConsistentHash),
            lower if lower.starts_with("x-") && lower.len() > 2 && t.len() <= 255 => {
                Ok(ExchangeKind::Custom(t.to_owned()))
            }
            _ => Err(crate::Error::InvalidConfig {
                variable: "exchange type".into(),
                value: s.into(),
                reason: "must be one of direct, topic, fanout, headers, or a plugin's type starting with x- \
                         (x-delayed-message, x-consistent-hash, ...)"
                    .into(),
            }),
        }
    }
}

/// An exchange to declare.
#[derive(Debug, Clone, PartialEq)]
pub struct ExchangeSpec {
    /// Exchange name.
    pub name: String,
    /// Routing algorithm.
    pub kind: ExchangeKind,
    /// Survives a broker restart.
    pub durable: bool,
    /// Deleted when its last binding is removed.
    pub auto_delete: bool,
    /// Internal exchanges accept no publishes from clients, only from
    /// exchange-to-exchange bindings.
    pub internal: bool,
    /// Extra arguments (e.g. `alternate-exchange`).
    pub arguments: Headers,
}

impl ExchangeSpec {
    /// A durable, non-auto-delete exchange of `kind`.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        ExchangeSpec {
            name: name.into(),
            kind,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Headers::new(),
        }
    }
    /// A durable topic exchange.
    pub fn topic(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Topic)
    }
    /// A durable direct exchange.
    pub fn direct(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Direct)
    }
    /// A durable fanout exchange.
    pub fn fanout(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Fanout)
    }
    /// A durable headers exchange.
    pub fn headers(name: impl Into<String>) -> Self {
        Self::new(name, ExchangeKind::Headers)
    }
    /// A durable `x-delayed-message` exchange that routes, once a message's
    /// delay is over, as an exchange of kind `routes_as` (its
    /// `x-delayed-type` argument). Needs the RabbitMQ plugin
    /// `rabbitmq_delayed_message_exchange`; the memory transport has it
    /// built in.
    ///
    /// ```
    /// use std::time::Duration;
    /// use switchyard_core::{ExchangeKind, ExchangeSpec, Message};
    /// let x = ExchangeSpec::delayed("retries", ExchangeKind::Direct);
    /// assert_eq!(x.kind, ExchangeKind::DelayedMessage);
    /// assert_eq!(x.arguments.get_str("x-delayed-type"), Some("direct"));
    /// let m = Message::new("again").with_delay(Duration::from_secs(300));
    /// assert_eq!(m.headers.get_i64("x-delay"), Some(300_000));
    /// ```
    pub fn delayed(name: impl Into<String>, routes_as: ExchangeKind) -> Self {
        let mut spec = Self::new(name, ExchangeKind::DelayedMessage);
        spec.arguments.insert("x-delayed-type", routes_as.as_str());
        spec
    }
    /// Adds an argument (e.g. `alternate-exchange`, `x-delayed-type`).
    pub fn argument(mut self, key: impl Into<String>, value: impl Into<HeaderValue>) -> Self {
        self.arguments.insert(key, value);
        self
    }
    /// Sets durability.
    pub fn durable(mut self, yes: bool) -> Self {
        self.durable = yes;
        self
    }
    /// Sets auto-delete.
    pub fn auto_delete(mut self, yes: bool) -> Self {
        self.auto_delete = yes;
        self
    }
}

/// What a queue does when it reaches `max_length` / `max_length_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Overflow {
    /// Drop (dead-letter) the oldest message at the head (RabbitMQ's default).
    #[default]
    DropHead,
    /// Refuse the new message (publisher confirm nack).
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

impl Overflow {
    /// The RabbitMQ argument value (`drop-head`, `reject-publish`, `reject-publish-dlx`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        }
    }
}

/// The queue implementation RabbitMQ should use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum QueueType {
    /// Classic queue.
    #[default]
    Classic,
    /// Replicated Raft-based queue (durable only; supports `delivery_limit`).
    Quorum,
    /// Append-only log queue.
    Stream,
}

impl QueueType {
    /// The `x-queue-type` value.
    pub fn as_str(&self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }
}

/// The `x-*` arguments of a queue, typed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueArguments {
    /// `x-dead-letter-exchange`: where rejected, expired and overflowing messages go.
    pub dead_letter_exchange: Option<String>,
    /// `x-dead-letter-routing-key`: replaces the routing key when dead-lettering.
    pub dead_letter_routing_key: Option<String>,
    /// `x-message-ttl`: how long a message may stay in the queue.
    pub message_ttl: Option<Duration>,
    /// `x-expires`: delete the queue after it is unused this long.
    pub expires: Option<Duration>,
    /// `x-max-length`: most ready messages the queue keeps.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: most body bytes of ready messages the queue keeps.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`: what to do past the max length.
    pub overflow: Option<Overflow>,
    /// `x-max-priority`: enables priorities 0..=n (1–255; 1–10 recommended).
    pub max_priority: Option<u8>,
    /// `x-queue-type`.
    pub queue_type: Option<QueueType>,
    /// `x-delivery-limit` (quorum queues): dead-letter after this many redeliveries.
    pub delivery_limit: Option<u32>,
    /// `x-single-active-consumer`.
    pub single_active_consumer: bool,
    /// Any other arguments, passed through unchanged.
    pub extra: Headers,
}

impl QueueArguments {
    /// The arguments as an AMQP field table, with RabbitMQ's names and types
    /// (durations in milliseconds as `long`).
    pub fn to_headers(&self) -> Headers {
        use crate::message::HeaderValue as V;
        let mut h = self.extra.clone();
        if let Some(v) = &self.dead_letter_exchange {
            h.insert("x-dead-letter-exchange", v.as_str());
        }
        if let Some(v) = &self.dead_letter_routing_key {
            h.insert("x-dead-letter-routing-key", v.as_str());
        }
        if let Some(v) = self.message_ttl {
            h.insert("x-message-ttl", V::I64(v.as_millis() as i64));
        }
        if let Some(v) = self.expires {
            h.insert("x-expires", V::I64(v.as_millis() as i64));
        }
        if let Some(v) = self.max_length {
            h.insert("x-max-length", V::I64(v as i64));
        }
        if let Some(v) = self.max_length_bytes {
            h.insert("x-max-length-bytes", V::I64(v as i64));
        }
        if let Some(v) = self.overflow {
            h.insert("x-overflow", v.as_str());
        }
        if let Some(v) = self.max_priority {
            h.insert("x-max-priority", V::I64(v as i64));
        }
        if let Some(v) = self.queue_type {
            h.insert("x-queue-type", v.as_str());
        }
        if let Some(v) = self.delivery_limit {
            h.insert("x-delivery-limit", V::I64(v as i64));
        }
        if self.single_active_consumer {
            h.insert("x-single-active-consumer", true);
        }
        h
    }
}

/// A queue to declare.
///
/// ```
/// use std::time::Duration;
/// use switchyard_core::QueueSpec;
/// let q = QueueSpec::new("extraction.requests")
///     .dead_letter("contextiq.dlx", Some("dead_letter"))
///     .max_priority(10)
///     .message_ttl(Duration::from_secs(86_400));
/// assert_eq!(q.arguments.max_priority, Some(10));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    /// Queue name; empty asks the broker to generate one.
    pub name: String,
    /// Survives a broker restart.
    pub durable: bool,
    /// Used by one connection only and deleted when it closes.
    pub exclusive: bool,
    /// Deleted when its last consumer is cancelled (after it had one).
    pub auto_delete: bool,
    /// Queue arguments.
    pub arguments: QueueArguments,
}

impl QueueSpec {
    /// A durable, non-exclusive, non-auto-delete classic queue.
    pub fn new(name: impl Into<String>) -> Self {
        QueueSpec {
            name: name.into(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: QueueArguments::default(),
        }
    }
    /// A server-named, exclusive, auto-delete, non-durable queue.
    pub fn temporary() -> Self {
        QueueSpec {
            name: String::new(),
            durable: false,
            exclusive: true,
            auto_delete: true,
            arguments: QueueArguments::default(),
        }
    }
    /// Sets durability.
    pub fn durable(mut self, yes: bool) -> Self {
        self.durable = yes;
        self
    }
    /// Sets exclusivity.
    pub fn exclusive(mut self, yes: bool) -> Self {
        self.exclusive = yes;
        self
    }
    /// Sets auto-delete.
    pub fn auto_delete(mut self, yes: bool) -> Self {
        self.auto_delete = yes;
        self
    }
    /// Dead-letters to `exchange`, optionally replacing the routing key.
    pub fn dead_letter(mut self, exchange: impl Into<String>, routing_key: Option<&str>) -> Self {
        self.arguments.dead_letter_exchange = Some(exchange.into());
        self.arguments.dead_letter_routing_key = routing_key.map(str::to_owned);
        self
    }
    /// Sets the queue-wide message TTL.
    pub fn message_ttl(mut self, ttl: Duration) -> Self {
        self.arguments.message_ttl = Some(ttl);
        self
    }
    /// Sets the max length and overflow behaviour.
    pub fn max_length(mut self, n: u64, overflow: Overflow) -> Self {
        self.arguments.max_length = Some(n);
        self.arguments.overflow = Some(overflow);
        self
    }
    /// Enables priorities up to `n`.
    pub fn max_priority(mut self, n: u8) -> Self {
        self.arguments.max_priority = Some(n);
        self
    }
    /// Sets the queue type.
    pub fn queue_type(mut self, t: QueueType) -> Self {
        self.arguments.queue_type = Some(t);
        self
    }
    /// Sets the quorum-queue delivery limit.
    pub fn delivery_limit(mut self, n: u32) -> Self {
        self.arguments.delivery_limit = Some(n);
        self
    }

    /// A durable work queue replicated across a cluster: a **quorum queue**
    /// (RabbitMQ's replacement for mirrored "HA" queues, removed in 4.0) with
    /// a delivery limit of [`WORK_QUEUE_DELIVERY_LIMIT`] (the broker-side
    /// backstop against a message that fails forever) and dead-lettering to
    /// `dead_letter_exchange` with **at-least-once** dead-lettering
    /// (`x-dead-letter-strategy`, RabbitMQ ≥ 3.10, which needs
    /// `x-overflow = reject-publish`: a full queue refuses publishes rather
    /// than dropping from the head). On a broker without at-least-once
    /// dead-lettering, build the spec without the strategy: dead-lettering is
    /// then at-most-once.
    ///
    /// ```
    /// use switchyard_core::{QueueSpec, QueueType};
    /// let q = QueueSpec::work_queue("extraction.requests", "contextiq.dlx");
    /// let h = q.arguments.to_headers();
    /// assert_eq!(h.get_str("x-queue-type"), Some("quorum"));
    /// assert_eq!(h.get_str("x-dead-letter-strategy"), Some("at-least-once"));
    /// assert_eq!(h.get_str("x-overflow"), Some("reject-publish"));
    /// assert!(q.durable);
    /// ```
    pub fn work_queue(name: impl Into<String>, dead_letter_exchange: impl Into<String>) -> Self {
        let mut q = QueueSpec::new(name)
            .durable(true)
            .queue_type(QueueType::Quorum)
            .delivery_limit(WORK_QUEUE_DELIVERY_LIMIT)
            .dead_letter(dead_letter_exchange, None);
        q.arguments.overflow = Some(Overflow::RejectPublish);
        q.arguments.extra.insert("x-dead-letter-strategy", "at-least-once");
        q
    }
}

/// The delivery limit of [`QueueSpec::work_queue`]: a message redelivered
/// this many times is dead-lettered.
pub const WORK_QUEUE_DELIVERY_LIMIT: u32 = 5;

/// A binding of a queue (or exchange) to a source exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    /// The exchange messages come from.
    pub source: String,
    /// The queue (or exchange, when `destination_is_exchange`) they go to.
    pub destination: String,
    /// True for an exchange-to-exchange binding.
    pub destination_is_exchange: bool,
    /// Binding key / pattern.
    pub routing_key: String,
    /// Binding arguments (headers exchanges: the match table and `x-match`).
    pub arguments: Headers,
}

impl Binding {
    /// Binds `queue` to `exchange` with `routing_key`.
    pub fn queue(queue: impl Into<String>, exchange: impl Into<String>, routing_key: impl Into<String>) -> Self {
        Binding {
            source: exchange.into(),
            destination: queue.into(),
            destination_is_exchange: false,
            routing_key: routing_key.into(),
            arguments: Headers::new(),
        }
    }
    /// Binds exchange `destination` to exchange `source`.
    pub fn exchange(destination: impl Into<String>, source: impl Into<String>, routing_key: impl Into<String>) -> Self {
        Binding {
            source: source.into(),
            destination: destination.into(),
            destination_is_exchange: true,
            routing_key: routing_key.into(),
            arguments: Headers::new(),
        }
    }
    /// Sets binding arguments.
    pub fn with_arguments(mut self, args: Headers) -> Self {
        self.arguments = args;
        self
    }
}

/// A whole topology, declared in order (exchanges, queues, bindings) and
/// re-declarable after a reconnect.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Topology {
    /// Exchanges to declare.
    pub exchanges: Vec<ExchangeSpec>,
    /// Queues to declare.
    pub queues: Vec<QueueSpec>,
    /// Bindings to create.
    pub bindings: Vec<Binding>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds an exchange.
    pub fn exchange(mut self, e: ExchangeSpec) -> Self {
        self.exchanges.push(e);
        self
    }
    /// Adds a queue.
    pub fn queue(mut self, q: QueueSpec) -> Self {
        self.queues.push(q);
        self
    }
    /// Adds a binding.
    pub fn binding(mut self, b: Binding) -> Self {
        self.bindings.push(b);
        self
    }
    /// Adds a queue and binds it to `exchange` with `routing_key`.
    pub fn bound_queue(self, q: QueueSpec, exchange: &str, routing_key: &str) -> Self {
        let b = Binding::queue(q.name.clone(), exchange, routing_key);
        self.queue(q).binding(b)
    }

    /// Gives the queues that lack them the settings' defaults, as
    /// [`Settings::queue`](crate::Settings::queue) would: `x-message-ttl`
    /// (`RABBITMQ_DEFAULT_MESSAGE_TTL`) and, when `RABBITMQ_ENABLE_DEAD_LETTER`
    /// is true, `x-dead-letter-exchange` (`RABBITMQ_DEAD_LETTER_EXCHANGE`,
    /// with routing key [`DEAD_LETTER_ROUTING_KEY`](crate::settings::DEAD_LETTER_ROUTING_KEY)).
    /// Left alone: server-named and exclusive queues (replies, temporary
    /// queues), arguments already set, and the dead-letter queues — those
    /// bound to the dead-letter exchange — which get neither (no cycle, no
    /// expiry of dead letters).
    ///
    /// ```
    /// use switchyard_core::{QueueSpec, Settings, Topology};
    /// let s = Settings::default();
    /// let t = Topology::new()
    ///     .bound_queue(QueueSpec::new("dead_letter"), "contextiq.dlx", "dead_letter")
    ///     .queue(QueueSpec::new("extraction.requests"))
    ///     .with_defaults(&s);
    /// assert_eq!(t.queues[0], QueueSpec::new("dead_letter"));
    /// assert_eq!(t.queues[1], s.queue("extraction.requests"));
    /// ```
    pub fn with_defaults(mut self, settings: &crate::Settings) -> Self {
        let dlx = settings.dead_letter();
        let dead_letter_queues: Vec<String> = self
            .bindings
            .iter()
            .filter(|b| !b.destination_is_exchange && Some(b.source.as_str()) == dlx)
            .map(|b| b.destination.clone())
            .collect();
        for q in &mut self.queues {
            if q.name.is_empty() || q.exclusive || dead_letter_queues.contains(&q.name) {
                continue;
            }
            if q.arguments.message_ttl.is_none() {
                q.arguments.message_ttl = settings.message_ttl();
            }
            if let (None, Some(dlx)) = (&q.arguments.dead_letter_exchange, dlx) {
                q.arguments.dead_letter_exchange = Some(dlx.to_owned());
                if q.arguments.dead_letter_routing_key.is_none() {
                    q.arguments.dead_letter_routing_key = Some(crate::settings::DEAD_LETTER_ROUTING_KEY.to_owned());
                }
            }
        }
        self
    }
}

/// Facts about a declared queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    /// The queue name (generated by the broker for server-named queues).
    pub name: String,
    /// Messages ready for delivery (not counting unacknowledged ones), as
    /// RabbitMQ's `queue.declare-ok` reports it.
    pub message_count: u32,
    /// Active consumers.
    pub consumer_count: u32,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::HeaderValue;

    #[test]
    fn queue_arguments_use_rabbitmq_names() {
        let q = QueueSpec::new("q")
            .dead_letter("dlx", Some("dead"))
            .message_ttl(Duration::from_secs(2))
            .max_length(10, Overflow::RejectPublish)
            .max_priority(9)
            .queue_type(QueueType::Quorum)
            .delivery_limit(3);
        let h = q.arguments.to_headers();
        assert_eq!(h.get_str("x-dead-letter-exchange"), Some("dlx"));
        assert_eq!(h.get_str("x-dead-letter-routing-key"), Some("dead"));
        assert_eq!(h.get("x-message-ttl"), Some(&HeaderValue::I64(2000)));
        assert_eq!(h.get_str("x-overflow"), Some("reject-publish"));
        assert_eq!(h.get_i64("x-max-priority"), Some(9));
        assert_eq!(h.get_str("x-queue-type"), Some("quorum"));
        assert_eq!(h.get_i64("x-delivery-limit"), Some(3));
    }

    #[test]
    fn exchange_kind_parses_and_rejects_unknown() {
        assert_eq!("Topic".parse::<ExchangeKind>().unwrap(), ExchangeKind::Topic);
        let e = "fan".parse::<ExchangeKind>().unwrap_err();
        assert_eq!(e.code(), "invalid_config");
    }

    #[test]
    fn with_defaults_fills_ttl_and_dead_lettering_where_missing_only() {
        use crate::Settings;
        let s = Settings::default().with_message_ttl(Duration::from_secs(60));
        let t = Topology::new()
            .bound_queue(QueueSpec::new("dead_letter"), "contextiq.dlx", "dead_letter")
            .queue(QueueSpec::new("plain"))
            .queue(QueueSpec::new("short").message_ttl(Duration::from_secs(1)))
            .queue(QueueSpec::work_queue("work", "other.dlx"))
            .queue(QueueSpec::temporary())
            .queue(QueueSpec::new("mine").exclusive(true))
            .with_defaults(&s);
        let q = |name: &str| t.queues.iter().find(|q| q.name == name).unwrap().clone();
        assert_eq!(q("dead_letter"), QueueSpec::new("dead_letter"));
        assert_eq!(q("plain"), s.queue("plain"));
        let short = q("short");
        assert_eq!(short.arguments.message_ttl, Some(Duration::from_secs(1)));
        assert_eq!(short.arguments.dead_letter_exchange.as_deref(), Some("contextiq.dlx"));
        let work = q("work");
        assert_eq!(work.arguments.dead_letter_exchange.as_deref(), Some("other.dlx"));
        assert_eq!(work.arguments.dead_letter_routing_key, None);
        assert_eq!(work.arguments.message_ttl, Some(Duration::from_secs(60)));
        assert_eq!(q(""), QueueSpec::temporary());
        assert_eq!(q("mine"), QueueSpec::new("mine").exclusive(true));

        let off = Settings::default()
            .with_dead_letter(None)
            .with_message_ttl(Duration::ZERO);
        let t = Topology::new().queue(QueueSpec::new("plain")).with_defaults(&off);
        assert_eq!(t.queues[0], QueueSpec::new("plain"));
    }
}
