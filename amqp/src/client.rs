//! The small client trait the engine drives: what an AMQP 0-9-1 client
//! library must offer (connect, channels, the methods the engine sends, the
//! deliveries and confirms it receives). `switchyard-lapin` and
//! `switchyard-amqprs` each implement it as a thin adapter; everything else
//! — recovery, confirm waiting and republishing, ack coalescing, flow
//! control, error mapping — is the engine's, written once.
//!
//! Adapters report failures as [`ClientError`]: what the broker said
//! ([`ClientError::Broker`], with the reply code and text of its
//! `channel.close` / `connection.close`), a channel or connection that is
//! gone ([`ClientError::Closed`]), or anything else. The engine maps them to
//! switchyard errors by reply code ([`crate::errors::from_reply`]).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures_core::Stream;
use parking_lot::Mutex;
use switchyard_core::settings::Secret;
use switchyard_core::{Binding, BrokerReply, Destination, ExchangeSpec, Headers, Message, QueueInfo, QueueSpec};
use tokio::sync::{oneshot, watch};

/// A boxed, sendable future.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A failure reported by a client library.
#[derive(Debug, Clone)]
pub enum ClientError {
    /// The broker refused the operation and closed the channel or the
    /// connection with this reply.
    Broker(BrokerReply),
    /// The channel or the connection is gone (socket closed, heartbeat
    /// missed, channel closed earlier): the operation may succeed on a new one.
    Closed(String),
    /// The operation's arguments cannot be encoded (a name or property over
    /// 255 bytes, an unsupported header value).
    Encode(String),
    /// Anything else the client reports.
    Other(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Broker(r) => write!(f, "{r}"),
            ClientError::Closed(m) => write!(f, "closed: {m}"),
            ClientError::Encode(m) => write!(f, "cannot encode: {m}"),
            ClientError::Other(m) => f.write_str(m),
        }
    }
}

impl ClientError {
    /// True when the channel or connection is gone (or the broker closed the
    /// connection): the engine retries on a fresh one.
    pub fn is_lost(&self) -> bool {
        match self {
            ClientError::Closed(_) => true,
            ClientError::Broker(r) => r.scope == switchyard_core::CloseScope::Connection,
            _ => false,
        }
    }

    /// True when the broker closed the connection because of the request
    /// `(class, method)` itself: a hard error that is not transient (e.g.
    /// 503 COMMAND_INVALID for an unknown exchange type) whose reply names
    /// that method, or none. The connection is gone, but sending the same
    /// request on a fresh one would only close that one too, so the engine
    /// reconnects and reports the error instead of retrying. A request that
    /// merely shared the connection with the one refused is retried.
    pub fn refuses(&self, request: (u16, u16)) -> bool {
        matches!(self, ClientError::Broker(r)
            if r.scope == switchyard_core::CloseScope::Connection
                && !r.is_transient()
                && (r.class_id == 0 || (r.class_id, r.method_id) == request))
    }
}

/// TLS material, read once when the configuration is built (not on every
/// reconnect).
#[derive(Clone, Default)]
pub struct TlsMaterial {
    /// PEM CA certificates to trust (the platform or webpki roots when `None`).
    pub ca_pem: Option<String>,
    /// PEM client certificate chain, for mutual TLS.
    pub client_cert_pem: Option<String>,
    /// PEM private key of the client certificate, for mutual TLS.
    pub client_key_pem: Option<Secret>,
    /// Where the CA file came from (for errors).
    pub ca_file: Option<PathBuf>,
}

impl fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("client_key", &self.client_key_pem.as_ref().map(|_| "***"))
            .finish()
    }
}

/// What a connection attempt needs.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// Virtual host.
    pub vhost: String,
    /// User name.
    pub user: String,
    /// Password (never printed).
    pub password: Secret,
    /// `amqps` with this material when set.
    pub tls: Option<TlsMaterial>,
    /// Heartbeat interval (whole seconds; at least 1 s).
    pub heartbeat: Duration,
    /// Limit of one connection attempt.
    pub connection_timeout: Duration,
    /// Connection name shown in the management UI (the role is appended:
    /// `name/publish`, `name/consume`).
    pub connection_name: String,
    /// Every node address (`host`, `port`), in the order they are tried;
    /// `host` / `port` above are the one being connected to.
    pub addresses: Vec<(String, u16)>,
}

impl ConnectParams {
    /// `amqp[s]://user@host:port/vhost`, without the password.
    pub fn describe(&self) -> String {
        format!(
            "{}://{}@{}:{}/{}",
            if self.tls.is_some() { "amqps" } else { "amqp" },
            self.user,
            self.host,
            self.port,
            switchyard_core::settings::percent_encode(&self.vhost)
        )
    }
}

/// Connection-level signals an adapter forwards to the engine.
#[derive(Debug)]
pub struct ConnSignals {
    blocked: watch::Sender<Option<String>>,
    lost: watch::Sender<Option<String>>,
    by_broker: std::sync::atomic::AtomicBool,
}

impl Default for ConnSignals {
    fn default() -> Self {
        ConnSignals {
            blocked: watch::channel(None).0,
            lost: watch::channel(None).0,
            by_broker: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl ConnSignals {
    /// The broker sent `connection.blocked` (a resource alarm).
    pub fn blocked(&self, reason: &str) {
        self.blocked.send_replace(Some(reason.to_owned()));
    }
    /// The broker sent `connection.unblocked`.
    pub fn unblocked(&self) {
        self.blocked.send_replace(None);
    }
    /// The connection is gone, for `why` (the first reason is kept).
    pub fn lost(&self, why: &str) {
        self.lost.send_if_modified(|cur| {
            if cur.is_none() {
                *cur = Some(why.to_owned());
                true
            } else {
                false
            }
        });
    }
    /// The broker closed the connection (`connection.close`, e.g. 320
    /// CONNECTION_FORCED from an operator or a node shutting down) — as
    /// opposed to a connection that broke under the client.
    pub fn closed_by_broker(&self, reply: &BrokerReply) {
        self.by_broker.store(true, std::sync::atomic::Ordering::Release);
        self.lost(&format!("the broker closed the connection: {reply}"));
    }
    /// True when the loss was the broker's `connection.close`.
    pub fn is_closed_by_broker(&self) -> bool {
        self.by_broker.load(std::sync::atomic::Ordering::Acquire)
    }
    /// Why the broker blocks the connection, while it does.
    pub fn blocked_reason(&self) -> Option<String> {
        self.blocked.borrow().clone()
    }
    /// Why the connection was lost, once it was.
    pub fn lost_reason(&self) -> Option<String> {
        self.lost.borrow().clone()
    }
    /// Watches the blocked reason.
    pub fn watch_blocked(&self) -> watch::Receiver<Option<String>> {
        self.blocked.subscribe()
    }
    /// Watches the loss.
    pub fn watch_lost(&self) -> watch::Receiver<Option<String>> {
        self.lost.subscribe()
    }
}

/// What became of one publish in confirm mode.
#[derive(Debug)]
pub enum ConfirmOutcome {
    /// `basic.ack`.
    Ack,
    /// `basic.nack`: the broker could not take it.
    Nack,
    /// `basic.return` (mandatory and unroutable), then its ack.
    Returned {
        /// The return's reply (312 NO_ROUTE).
        reply: BrokerReply,
        /// The returned message, when the client hands it over.
        message: Option<Box<Message>>,
    },
    /// The channel or connection went away (or the broker closed the
    /// channel) before the confirm.
    Lost(ClientError),
    /// The channel is not in confirm mode: sent, nothing to wait for.
    NotRequested,
}

/// The future of one publish's confirm. Not boxed when the client settles
/// it through [`ConfirmMap`] (or there is nothing to wait for): a publish
/// allocates no future for its confirm then.
pub struct Confirm(ConfirmState);

enum ConfirmState {
    Ready(Option<ConfirmOutcome>),
    Pending(oneshot::Receiver<ConfirmOutcome>),
    Boxed(BoxFuture<ConfirmOutcome>),
}

impl Confirm {
    /// A confirm that is already known (e.g. [`ConfirmOutcome::NotRequested`]).
    pub fn ready(outcome: ConfirmOutcome) -> Self {
        Confirm(ConfirmState::Ready(Some(outcome)))
    }

    /// The confirm a client's own future resolves.
    pub fn boxed(f: impl Future<Output = ConfirmOutcome> + Send + 'static) -> Self {
        Confirm(ConfirmState::Boxed(Box::pin(f)))
    }
}

impl fmt::Debug for Confirm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match &self.0 {
            ConfirmState::Ready(_) => "Confirm(ready)",
            ConfirmState::Pending(_) => "Confirm(pending)",
            ConfirmState::Boxed(_) => "Confirm(client future)",
        })
    }
}

impl Future for Confirm {
    type Output = ConfirmOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<ConfirmOutcome> {
        use std::task::Poll;
        match &mut self.0 {
            ConfirmState::Ready(o) => Poll::Ready(o.take().expect("a confirm polled after it completed")),
            ConfirmState::Pending(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| ConfirmOutcome::Lost(ClientError::Closed("the channel went away".into())))
            }),
            ConfirmState::Boxed(f) => f.as_mut().poll(cx),
        }
    }
}

/// A delivery as the client received it.
#[derive(Debug)]
pub struct RawDelivery {
    /// The channel's delivery tag.
    pub delivery_tag: u64,
    /// The broker's redelivered flag.
    pub redelivered: bool,
    /// The exchange it was published to.
    pub exchange: String,
    /// The routing key it was published with.
    pub routing_key: String,
    /// Body, properties, headers.
    pub message: Message,
}

/// What `basic.get` answered when the queue had a message (`basic.get-ok`).
#[derive(Debug)]
pub struct RawGet {
    /// The message (its tag is the channel's delivery tag).
    pub delivery: RawDelivery,
    /// The ready messages left in the queue.
    pub message_count: u32,
}

/// What a consumer's channel reports.
// One event per delivery: boxing the delivery would allocate per message.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum ConsumerEvent {
    /// A delivery.
    Delivery(RawDelivery),
    /// The broker cancelled the consumer (`basic.cancel`: queue deleted,
    /// node down for a quorum queue leader change...).
    Cancelled,
    /// The channel or connection closed under the consumer.
    Closed(ClientError),
}

/// The stream of a consumer's events; it ends after `Cancelled` or `Closed`.
pub type ConsumerEvents = Pin<Box<dyn Stream<Item = ConsumerEvent> + Send>>;

/// What an adapter can and cannot do, so the engine works around it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCaps {
    /// The client advertises `connection.blocked` and reports blocked /
    /// unblocked through [`ConnSignals`].
    pub blocked_notifications: bool,
    /// A delivery the client cannot decode (e.g. a header long string that
    /// is not UTF-8 on amqprs) takes the whole connection down: each
    /// consumer then gets a connection of its own so that one queue's poison
    /// message cannot stall the others.
    pub decode_failure_drops_connection: bool,
    /// Single publishes in flight on one pool channel before the engine
    /// puts the next ones on another (0: always the least loaded channel).
    /// A client whose confirms cost little per channel gains from filling
    /// one channel (the broker's `multiple` acks cover more publishes); one
    /// that serialises publishes on a channel gains from spreading them.
    pub publish_spill: usize,
}

/// An AMQP 0-9-1 client library.
#[async_trait]
pub trait AmqpClient: Send + Sync + 'static {
    /// One connection.
    type Connection: AmqpConnection;
    /// The library's name (`lapin`, `amqprs`), for logs and [`Transport::name`](switchyard_core::Transport::name).
    fn name(&self) -> &'static str;
    /// What the client can do.
    fn caps(&self) -> ClientCaps;
    /// Opens a connection; the adapter reports blocked / unblocked / loss on `signals`.
    async fn connect(&self, params: &ConnectParams, signals: Arc<ConnSignals>)
        -> Result<Self::Connection, ClientError>;
}

/// One connection of a client.
#[async_trait]
pub trait AmqpConnection: Send + Sync + 'static {
    /// One channel.
    type Channel: AmqpChannel;
    /// Opens a channel.
    async fn open_channel(&self) -> Result<Self::Channel, ClientError>;
    /// True while the connection is usable.
    fn is_open(&self) -> bool;
    /// The broker node the connection is on (`cluster_name` / node), when known.
    fn server_name(&self) -> Option<String>;
    /// Closes the connection (best effort; bounded by the adapter).
    async fn close(&self);
}

/// One channel of a connection. Every method is one AMQP method (and its
/// `-ok`): the engine decides what to send and when.
#[async_trait]
pub trait AmqpChannel: Send + Sync + 'static {
    /// True while the channel is usable.
    fn is_open(&self) -> bool;
    /// `confirm.select`.
    async fn confirm_select(&self) -> Result<(), ClientError>;
    /// `basic.qos(prefetch_count)` (per consumer).
    async fn qos(&self, prefetch: u16) -> Result<(), ClientError>;
    /// `exchange.declare` (passive when `passive`).
    async fn declare_exchange(&self, spec: &ExchangeSpec, passive: bool) -> Result<(), ClientError>;
    /// `queue.declare` (passive when `passive`); the name the broker answers
    /// with and the counts.
    async fn declare_queue(&self, spec: &QueueSpec, passive: bool) -> Result<QueueInfo, ClientError>;
    /// `queue.bind` / `exchange.bind`.
    async fn bind(&self, binding: &Binding) -> Result<(), ClientError>;
    /// `queue.unbind` / `exchange.unbind`.
    async fn unbind(&self, binding: &Binding) -> Result<(), ClientError>;
    /// `exchange.delete`, with the `if-unused` flag.
    async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<(), ClientError>;
    /// `queue.delete`, with the `if-unused` and `if-empty` flags; the
    /// number of messages deleted.
    async fn delete_queue(&self, name: &str, if_unused: bool, if_empty: bool) -> Result<u32, ClientError>;
    /// `queue.purge`; the number of messages purged.
    async fn purge_queue(&self, name: &str) -> Result<u32, ClientError>;
    /// `basic.publish`; on a confirm channel, the future of its confirm.
    /// (Not boxed, unlike the other methods: one allocation less on the
    /// path of every publish.)
    fn publish(
        &self,
        dest: &Destination,
        message: &Message,
        mandatory: bool,
    ) -> impl Future<Output = Result<Confirm, ClientError>> + Send;
    /// `basic.consume` with `arguments` (`x-priority`, `x-stream-offset`,
    /// …); the consumer's events.
    async fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        no_ack: bool,
        exclusive: bool,
        arguments: &Headers,
    ) -> Result<ConsumerEvents, ClientError>;
    /// `basic.get` (with `no-ack` when `no_ack`): `None` on
    /// `basic.get-empty`. A message taken without `no_ack` is settled with
    /// [`ack`](Self::ack) / [`nack`](Self::nack) / [`reject`](Self::reject)
    /// on this channel, or requeued by the broker when the channel closes.
    async fn get(&self, queue: &str, no_ack: bool) -> Result<Option<RawGet>, ClientError>;
    /// `basic.cancel`.
    async fn cancel(&self, consumer_tag: &str) -> Result<(), ClientError>;
    /// `basic.ack`.
    async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<(), ClientError>;
    /// `basic.nack`.
    async fn nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<(), ClientError>;
    /// `basic.reject`.
    async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<(), ClientError>;
    /// `channel.close` (best effort).
    async fn close(&self);
}

// ---------------------------------------------------------------------------
// Confirm tracking for callback-style clients
// ---------------------------------------------------------------------------

struct Pending {
    tx: oneshot::Sender<ConfirmOutcome>,
    /// Exchange, routing key and a fingerprint of the message (body and
    /// message id), for matching a `basic.return`.
    mandatory: Option<(Arc<str>, Arc<str>, u64)>,
    returned: Option<(BrokerReply, Option<Box<Message>>)>,
}

/// Publisher-confirm bookkeeping for clients that report confirms through
/// callbacks (`basic.ack` / `basic.nack` with `multiple`, `basic.return`
/// without a tag) rather than a future per publish.
///
/// The adapter calls [`register`](Self::register) with the channel's next
/// publish sequence number in the same serialized section as its
/// `basic.publish`, and forwards the callbacks. A `basic.return` arrives
/// before the ack of the same publish and names no tag: it marks the oldest
/// pending mandatory publish to the same exchange and routing key.
#[derive(Default)]
pub struct ConfirmMap {
    inner: Mutex<BTreeMap<u64, Pending>>,
}

impl fmt::Debug for ConfirmMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConfirmMap").field("pending", &self.len()).finish()
    }
}

impl ConfirmMap {
    /// Registers publish `seq` of `message` and returns the future of its confirm.
    pub fn register(&self, seq: u64, dest: &Destination, message: &Message, mandatory: bool) -> Confirm {
        let (tx, rx) = oneshot::channel();
        self.inner.lock().insert(
            seq,
            Pending {
                tx,
                mandatory: mandatory.then(|| {
                    (
                        dest.exchange_arc().clone(),
                        dest.routing_key_arc().clone(),
                        fingerprint(message),
                    )
                }),
                returned: None,
            },
        );
        Confirm(ConfirmState::Pending(rx))
    }

    /// Forgets `seq` (its publish could not be sent).
    pub fn unregister(&self, seq: u64) {
        self.inner.lock().remove(&seq);
    }

    fn take(&self, seq: u64, multiple: bool) -> Vec<Pending> {
        let mut g = self.inner.lock();
        if multiple {
            let rest = g.split_off(&(seq.saturating_add(1)));
            std::mem::replace(&mut *g, rest).into_values().collect()
        } else {
            g.remove(&seq).into_iter().collect()
        }
    }

    /// `basic.ack(seq, multiple)`.
    pub fn ack(&self, seq: u64, multiple: bool) {
        for p in self.take(seq, multiple) {
            let outcome = match p.returned {
                Some((reply, message)) => ConfirmOutcome::Returned { reply, message },
                None => ConfirmOutcome::Ack,
            };
            let _ = p.tx.send(outcome);
        }
    }

    /// `basic.nack(seq, multiple)`.
    pub fn nack(&self, seq: u64, multiple: bool) {
        for p in self.take(seq, multiple) {
            let _ = p.tx.send(ConfirmOutcome::Nack);
        }
    }

    /// `basic.return` of a mandatory publish to `exchange` / `routing_key`:
    /// marks the oldest pending mandatory publish with the same exchange,
    /// routing key and message (body and message id) — or, when the client
    /// did not hand the message over, the same exchange and routing key.
    /// Confirms may arrive out of order (an unroutable publish is acked at
    /// once, an earlier routable one only when its queue has it), so the
    /// message matters.
    pub fn returned(&self, exchange: &str, routing_key: &str, reply: BrokerReply, message: Option<Message>) {
        let mut g = self.inner.lock();
        let print = message.as_ref().map(fingerprint);
        let matches = |p: &Pending, exact: bool| {
            p.returned.is_none()
                && p.mandatory
                    .as_ref()
                    .is_some_and(|(e, k, f)| &**e == exchange && &**k == routing_key && (!exact || print == Some(*f)))
        };
        let seq = g
            .iter()
            .find(|(_, p)| matches(p, true))
            .or_else(|| g.iter().find(|(_, p)| matches(p, false)))
            .map(|(s, _)| *s);
        if let Some(p) = seq.and_then(|s| g.get_mut(&s)) {
            p.returned = Some((reply, message.map(Box::new)));
        }
    }

    /// The channel closed: every pending publish learns it.
    pub fn fail_all(&self, why: ClientError) {
        let all = std::mem::take(&mut *self.inner.lock());
        for (_, p) in all {
            let _ = p.tx.send(ConfirmOutcome::Lost(why.clone()));
        }
    }

    /// Publishes awaiting their confirm.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// True when nothing awaits a confirm.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A cheap identity of a message for matching returns: body and message id.
fn fingerprint(m: &Message) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.body.hash(&mut h);
    m.properties.message_id.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {

    #[test]
    fn only_the_refused_request_is_not_retried() {
        use switchyard_core::{BrokerReply, CloseScope};
        let closed = |code: u16, class_method: (u16, u16)| {
            ClientError::Broker(
                BrokerReply::new(code, "COMMAND_INVALID - unknown exchange type 'x-nope'")
                    .caused_by(class_method.0, class_method.1)
                    .scope(CloseScope::Connection),
            )
        };
        let declare = (40, 10);
        assert!(closed(503, declare).refuses(declare));
        assert!(closed(503, declare).is_lost());
        assert!(
            !closed(503, declare).refuses((50, 10)),
            "another request on that connection is retried"
        );
        assert!(!closed(320, (0, 0)).refuses(declare), "a forced close is transient");
        assert!(closed(530, (0, 0)).refuses(declare), "a reply naming no method counts");
        let channel = ClientError::Broker(BrokerReply::new(406, "PRECONDITION_FAILED").caused_by(40, 10));
        assert!(!channel.refuses(declare), "a channel error is not a lost connection");
    }
    use super::*;

    async fn outcome(c: Confirm) -> String {
        match tokio::time::timeout(Duration::from_millis(50), c).await {
            Ok(ConfirmOutcome::Ack) => "ack".into(),
            Ok(ConfirmOutcome::Nack) => "nack".into(),
            Ok(ConfirmOutcome::Returned { reply, .. }) => format!("returned {}", reply.code),
            Ok(ConfirmOutcome::Lost(_)) => "lost".into(),
            Ok(ConfirmOutcome::NotRequested) => "none".into(),
            Err(_) => "pending".into(),
        }
    }

    #[tokio::test]
    async fn multiple_acks_nacks_and_returns_resolve_the_right_publishes() {
        let m = ConfirmMap::default();
        let d = Destination::new("ex", "a");
        let b = Destination::new("ex", "b");
        let c1 = m.register(1, &d, &Message::new("1"), false);
        let c2 = m.register(2, &b, &Message::new("x"), true);
        let c3 = m.register(3, &b, &Message::new("y"), true);
        let c4 = m.register(4, &d, &Message::new("4"), false);
        let c5 = m.register(5, &d, &Message::new("5"), false);
        m.returned("ex", "b", BrokerReply::new(312, "NO_ROUTE"), Some(Message::new("x")));
        m.ack(3, true);
        m.nack(4, false);
        assert_eq!(m.len(), 1);
        m.fail_all(ClientError::Closed("gone".into()));
        assert_eq!(
            vec![
                outcome(c1).await,
                outcome(c2).await,
                outcome(c3).await,
                outcome(c4).await,
                outcome(c5).await
            ],
            ["ack", "returned 312", "ack", "nack", "lost"]
        );
    }

    #[tokio::test]
    async fn a_return_marks_the_publish_it_belongs_to_not_the_oldest() {
        // A (routable, acked late) then B (unroutable, returned and acked at once).
        let m = ConfirmMap::default();
        let d = Destination::new("ex", "k");
        let a = m.register(1, &d, &Message::new("a"), true);
        let b = m.register(2, &d, &Message::new("b"), true);
        m.returned("ex", "k", BrokerReply::new(312, "NO_ROUTE"), Some(Message::new("b")));
        m.ack(2, false);
        m.ack(1, false);
        assert_eq!(
            (outcome(a).await, outcome(b).await),
            ("ack".into(), "returned 312".into())
        );
    }
}
