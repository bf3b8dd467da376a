//! # switchyard-lapin
//!
//! The switchyard transport for RabbitMQ on [lapin](https://docs.rs/lapin) 4
//! (tokio runtime).
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
//! ## What it does
//!
//! - **Connection** from [`Settings`] (URL or parts, heartbeat, connection
//!   attempts with retry delay, `amqps` with an optional CA file); the
//!   connection is named in the management UI (client property
//!   `connection_name`, default `switchyard`, see [`LapinConfig`]); the
//!   password never appears in logs or errors (the redacted URL does).
//! - **Publishing** with publisher confirms: every publish resolves when its
//!   confirm arrives, many can be in flight; a pool of confirm channels
//!   ([`LapinConfig::publish_channels`]) keeps concurrent publishers from
//!   serialising; [`publish_batch`](Publisher::publish_batch) pipelines on
//!   one channel. A nack is [`Error::PublishUnconfirmed`], a returned
//!   mandatory message (which lapin reports as an ack *carrying* the
//!   returned message) is [`Error::Unroutable`].
//! - **Consuming** with QoS prefetch, manual or automatic acks, exclusivity
//!   and cancellation. Manual acks go through the core ack coalescer
//!   ([`AckCoalescer`]), which sends one
//!   `multiple` ack per contiguous run of settled deliveries, never past an
//!   unfinished handler. A broker-side cancel (queue deleted) yields
//!   [`Error::ConsumerCancelled`] and ends the stream.
//! - **RPC** through RabbitMQ direct reply-to: [`Transport::open_reply_channel`]
//!   consumes `amq.rabbitmq.reply-to` (no-ack) on a channel of its own and
//!   requests are published on that same channel.
//! - **Automatic recovery** (below).
//!
//! ## Recovery: our own supervisor, not `enable_auto_recover()`
//!
//! lapin 4 can recover connections itself (`ConnectionProperties::enable_auto_recover`),
//! but this transport keeps its own supervisor, built on the client-agnostic
//! parts in [`switchyard_amqp::recovery`], and leaves lapin's recovery off:
//!
//! - lapin's recovery gives up after its backoff's attempt budget (16 by
//!   default) while `rabbitmqctl stop_app` can keep the broker away longer;
//!   ours retries until the transport is closed (or
//!   [`BackoffPolicy::max_attempts`](switchyard_amqp::recovery::BackoffPolicy)).
//! - At-least-once publishing needs every unconfirmed publish republished on
//!   the new connection with the caller still waiting; lapin fails pending
//!   [`PublisherConfirm`](lapin::PublisherConfirm)s, so the republish logic
//!   is ours either way. Here a `publish` simply retries on the next
//!   connection until its confirm arrives or
//!   [`RecoveryConfig::publish_wait_timeout`] passes.
//! - The ack coalescer must learn exactly when a consumer's channel was
//!   replaced (delivery tags restart, old ones are stale); restarting the
//!   consumers ourselves gives that point for free.
//! - lapin's recovery is young (lapin issue #450 and fixes through 4.12.x);
//!   the same supervisor serves the amqprs transport, which has no recovery
//!   at all, so both transports behave alike.
//!
//! For the record, `examples/auto_recover_probe.rs` runs raw lapin 4.12.3 with
//! `enable_auto_recover()` under a broker-side `close_connection` while
//! confirmed publishes are in flight: lapin re-established the connection,
//! the confirm channel and the consumer (all 10,000 ids arrived, no failed
//! ack), but the interrupted batch failed with `invalid channel state:
//! Reconnecting` and had to be republished by the caller after
//! `wait_for_recovery` — exactly the part we must own anyway. It was not
//! tried against `stop_app`/`start_app`; our supervisor passes both fault
//! tests (`tests/faults_lapin.rs`).
//!
//! When the connection drops, the supervisor sets the state to
//! `Reconnecting` ([`LapinTransport::state`]), reconnects with
//! jittered exponential backoff, re-declares the topology this transport
//! declared (server-named queues get new names, mapped transparently),
//! restarts the consumers feeding the same [`Subscription`] streams, and then
//! lets waiting publishers through. Deliveries received before the drop
//! cannot be settled any more (their settlement fails with `settle_failed`)
//! and are redelivered by the broker.
//!
//! `tests/faults_lapin.rs` checks this against RabbitMQ: 20,000 persistent
//! messages published with confirms while a consumer acks them, across three
//! `rabbitmqctl close_all_connections` and across `stop_app`/`start_app`
//! (every id arrives, duplicates are counted), and a consumer killed with
//! unfinished handlers (none of their messages is acked; they come back).
//!
//! ## Ack coalescing and what is acknowledged
//!
//! A manual-ack consumer's settlements go through the core coalescer: acks
//! over a contiguous run of settled deliveries become one `multiple` ack
//! (sent at half the prefetch window, when the window is full, or within
//! [`LapinConfig::ack_flush_interval`]); settled deliveries behind an
//! unfinished one are acked singly at the next flush; nacks and rejects go
//! out at once, after the acks below them. A delivery whose handler has not
//! finished is never acknowledged. `Delivery::ack` returning `Ok` means the
//! ack is recorded and will be sent within the flush interval; if the
//! connection dies first, the broker redelivers the message (at least once).
#![warn(missing_docs)]

mod convert;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeBindOptions, ExchangeDeclareOptions, ExchangeDeleteOptions,
    ExchangeUnbindOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use parking_lot::Mutex;
use switchyard_amqp::coalesce::{AckCoalescer, AckSink, CoalesceConfig};
use switchyard_amqp::recovery::{
    deadline_error, BackoffPolicy, ConnectionState, ConsumerId, ConsumerRegistry, RecoveryConfig, StateWatch,
    TopologyDeclarer, TopologyRegistry,
};
use switchyard_core::settings::{Endpoint, Settings};
use switchyard_core::transport::{Cancel, CancelHandle};
use switchyard_core::{
    Admin, Binding, Capabilities, ConsumeOptions, Consumer, Delivery, DeliveryInfo, Destination, Error, ExchangeKind,
    ExchangeSpec, Message, PublishOptions, Publisher, QueueInfo, QueueSpec, ReplyChannel, Result, Subscription,
    Transport,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use convert::{is_connection_level, map_error, Subject};

/// Re-exported so applications can reach lapin types without a second dependency.
pub use lapin;

/// The direct reply-to pseudo queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// How the lapin transport connects and behaves. Built from [`Settings`] by
/// [`LapinConfig::from_settings`]; adjust fields before
/// [`LapinTransport::connect_with`].
#[derive(Debug, Clone)]
pub struct LapinConfig {
    /// Connection name shown in the RabbitMQ management UI (default `switchyard`).
    pub connection_name: String,
    /// Heartbeat interval negotiated with the broker.
    pub heartbeat: Duration,
    /// Attempts of the first connect.
    pub connection_attempts: u32,
    /// Delay between first-connect attempts.
    pub retry_delay: Duration,
    /// Time limit of one connection attempt.
    pub connection_timeout: Duration,
    /// PEM file of CA certificates for `amqps` (the system roots otherwise).
    pub ca_file: Option<PathBuf>,
    /// Publisher confirms (strongly recommended; default true).
    pub publisher_confirms: bool,
    /// Confirm channels in the publish pool (default 4).
    pub publish_channels: usize,
    /// Automatic recovery and the publish wait deadline.
    pub recovery: RecoveryConfig,
    /// Longest delay before coalesced acks are sent (default 10 ms).
    pub ack_flush_interval: Duration,
}

impl Default for LapinConfig {
    fn default() -> Self {
        LapinConfig::from_settings(&Settings::default())
    }
}

impl LapinConfig {
    /// The configuration `settings` describe: heartbeat, attempts, retry
    /// delay, connection timeout, CA file, confirms; the publish wait
    /// deadline is `RABBITMQ_CONFIRM_TIMEOUT`; reconnect backoff starts at
    /// 100 ms and is capped at the larger of the retry delay and 2 s.
    pub fn from_settings(settings: &Settings) -> Self {
        LapinConfig {
            connection_name: "switchyard".into(),
            heartbeat: settings.heartbeat,
            connection_attempts: settings.connection_attempts.max(1),
            retry_delay: settings.retry_delay,
            connection_timeout: settings.connection_timeout,
            ca_file: settings.ca_file.clone(),
            publisher_confirms: settings.enable_publisher_confirms,
            publish_channels: 4,
            recovery: RecoveryConfig::default()
                .publish_wait_timeout(settings.confirm_timeout)
                .backoff(BackoffPolicy::new(
                    Duration::from_millis(100),
                    settings.retry_delay.max(Duration::from_secs(2)),
                )),
            ack_flush_interval: Duration::from_millis(10),
        }
    }

    /// Sets the connection name shown in the management UI.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = name.into();
        self
    }

    /// Sets the recovery configuration.
    pub fn recovery(mut self, r: RecoveryConfig) -> Self {
        self.recovery = r;
        self
    }
}

// ---------------------------------------------------------------------------
// Connection
// ---------------------------------------------------------------------------

/// One live AMQP connection and its channels.
struct Conn {
    connection: Connection,
    confirms: bool,
    pool: Vec<tokio::sync::Mutex<Option<Channel>>>,
    next: AtomicUsize,
    admin_idle: Mutex<Vec<Channel>>,
}

impl Conn {
    fn connected(&self) -> bool {
        self.connection.status().connected()
    }

    async fn open_channel(&self, confirms: bool) -> std::result::Result<Channel, lapin::Error> {
        let ch = self.connection.create_channel().await?;
        if confirms {
            ch.confirm_select(ConfirmSelectOptions::default()).await?;
        }
        Ok(ch)
    }

    /// A confirm channel from the pool (round robin), re-opened if a channel
    /// error closed it.
    async fn publish_channel(&self) -> std::result::Result<Channel, lapin::Error> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pool.len();
        let mut slot = self.pool[i].lock().await;
        if let Some(ch) = slot.as_ref() {
            if ch.status().connected() {
                return Ok(ch.clone());
            }
        }
        let ch = self.open_channel(self.confirms).await?;
        *slot = Some(ch.clone());
        Ok(ch)
    }

    async fn admin_channel(&self) -> std::result::Result<Channel, lapin::Error> {
        loop {
            let idle = self.admin_idle.lock().pop();
            match idle {
                Some(ch) if ch.status().connected() => return Ok(ch),
                Some(_) => continue,
                None => return self.connection.create_channel().await,
            }
        }
    }

    fn return_admin(&self, ch: Channel) {
        let mut idle = self.admin_idle.lock();
        if idle.len() < 4 && ch.status().connected() {
            idle.push(ch);
        }
    }
}

// ---------------------------------------------------------------------------
// Consumers
// ---------------------------------------------------------------------------

// `End` is sent once per consumer; boxing every delivery would cost an
// allocation per message.
#[allow(clippy::large_enum_variant)]
enum Item {
    Delivery(Result<Delivery>),
    End,
}

/// A consumer as the application sees it: it survives reconnects.
struct ConsumerShared {
    id: Mutex<Option<ConsumerId>>,
    /// The queue as the application named it.
    queue: Arc<str>,
    tag: Arc<str>,
    options: ConsumeOptions,
    tx: mpsc::UnboundedSender<Item>,
    coalescer: Mutex<Option<AckCoalescer>>,
    /// The current channel and the connection it belongs to.
    channel: Mutex<Option<(Channel, Weak<Conn>)>>,
    /// Serialises (re)starts of this consumer.
    restart: tokio::sync::Mutex<()>,
    cancelled: AtomicBool,
    ended: AtomicBool,
    /// A direct reply-to consumer: its channel also publishes requests.
    reply: bool,
}

impl ConsumerShared {
    fn end(&self, last: Option<Error>) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(e) = last {
            let _ = self.tx.send(Item::Delivery(Err(e)));
        }
        let _ = self.tx.send(Item::End);
    }

    fn live_channel(&self) -> Option<Channel> {
        let g = self.channel.lock();
        let (ch, conn) = g.as_ref()?;
        let alive = ch.status().connected() && conn.upgrade().is_some_and(|c| c.connected());
        alive.then(|| ch.clone())
    }

    fn coalescer(&self) -> Option<AckCoalescer> {
        self.coalescer.lock().clone()
    }
}

/// Wire acks of one consumer channel.
struct ChannelAcks(Channel, Arc<str>);

impl ChannelAcks {
    fn err(&self, tag: u64, e: lapin::Error) -> Error {
        Error::SettleFailed {
            queue: self.1.to_string(),
            delivery_tag: tag,
            message: e.to_string(),
        }
    }
}

#[async_trait]
impl AckSink for ChannelAcks {
    async fn ack(&self, tag: u64, multiple: bool) -> Result<()> {
        self.0
            .basic_ack(tag, BasicAckOptions { multiple })
            .await
            .map_err(|e| self.err(tag, e))
    }
    async fn nack(&self, tag: u64, multiple: bool, requeue: bool) -> Result<()> {
        self.0
            .basic_nack(tag, BasicNackOptions { multiple, requeue })
            .await
            .map_err(|e| self.err(tag, e))
    }
    async fn reject(&self, tag: u64, requeue: bool) -> Result<()> {
        self.0
            .basic_reject(tag, BasicRejectOptions { requeue })
            .await
            .map_err(|e| self.err(tag, e))
    }
}

struct DeliveryStream {
    rx: mpsc::UnboundedReceiver<Item>,
    done: bool,
}

impl futures_core::Stream for DeliveryStream {
    type Item = Result<Delivery>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Item::Delivery(d))) => Poll::Ready(Some(d)),
            Poll::Ready(Some(Item::End)) | Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

struct CancelImpl {
    shared: Weak<Shared>,
    cs: Arc<ConsumerShared>,
}

#[async_trait]
impl Cancel for CancelImpl {
    async fn cancel(&self) -> Result<()> {
        if self.cs.cancelled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if let Some(shared) = self.shared.upgrade() {
            if let Some(id) = *self.cs.id.lock() {
                shared.consumers.remove(id);
            }
        }
        let _guard = self.cs.restart.lock().await;
        if let Some(c) = self.cs.coalescer() {
            let _ = c.flush().await;
        }
        let result = match self.cs.live_channel() {
            Some(ch) => ch
                .basic_cancel(self.cs.tag.as_ref().into(), BasicCancelOptions::default())
                .await
                .map_err(|e| map_error(&e, Subject::Queue(&self.cs.queue))),
            None => Ok(()),
        };
        self.cs.end(None);
        result
    }
}

// ---------------------------------------------------------------------------
// The transport
// ---------------------------------------------------------------------------

struct Shared {
    endpoint: Endpoint,
    redacted: String,
    config: LapinConfig,
    state: StateWatch,
    current: Mutex<Option<Arc<Conn>>>,
    topology: TopologyRegistry,
    consumers: ConsumerRegistry<Arc<ConsumerShared>>,
    closed: AtomicBool,
    lost: Arc<tokio::sync::Notify>,
    shutdown: watch::Sender<bool>,
    restart_tx: mpsc::UnboundedSender<Arc<ConsumerShared>>,
}

/// The RabbitMQ transport on lapin. Cheap to clone; clones share the
/// connection. Dropping the last clone closes the connection.
#[derive(Clone)]
pub struct LapinTransport {
    shared: Arc<Shared>,
}

impl fmt::Debug for LapinTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LapinTransport")
            .field("url", &self.shared.redacted)
            .field("state", &self.shared.state.get())
            .finish()
    }
}

impl LapinTransport {
    /// Connects as `settings` describe (see [`LapinConfig::from_settings`]).
    pub async fn connect(settings: &Settings) -> Result<Self> {
        settings.validate()?;
        Self::connect_with(settings, LapinConfig::from_settings(settings)).await
    }

    /// Connects to `url` (`amqp://user:pass@host:port/vhost`, `amqps://...`)
    /// with default settings otherwise.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect(&Settings::default().with_url(url)).await
    }

    /// Connects to the broker of `settings` with an explicit `config`.
    pub async fn connect_with(settings: &Settings, config: LapinConfig) -> Result<Self> {
        let endpoint = settings.endpoint()?;
        let redacted = settings.effective_url_redacted();
        let (shutdown, _) = watch::channel(false);
        let (restart_tx, restart_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            endpoint,
            state: StateWatch::new(format!("lapin {redacted}")),
            redacted,
            config,
            current: Mutex::new(None),
            topology: TopologyRegistry::new(),
            consumers: ConsumerRegistry::new(),
            closed: AtomicBool::new(false),
            lost: Arc::new(tokio::sync::Notify::new()),
            shutdown,
            restart_tx,
        });
        let attempts = shared.config.connection_attempts.max(1);
        let mut last = None;
        for attempt in 1..=attempts {
            match shared.establish(false).await {
                Ok(conn) => {
                    *shared.current.lock() = Some(conn);
                    shared.state.set(ConnectionState::Connected);
                    last = None;
                    break;
                }
                Err(e) => {
                    tracing::warn!(url = %shared.redacted, attempt, attempts, error = %e, "connect failed");
                    last = Some(e);
                    if attempt < attempts {
                        tokio::time::sleep(shared.config.retry_delay).await;
                    }
                }
            }
        }
        if let Some(e) = last {
            shared.closed.store(true, Ordering::Release);
            shared.state.set(ConnectionState::Closed);
            return Err(Error::ConnectionFailed {
                message: format!("{} after {attempts} attempt(s): {e}", shared.redacted),
            });
        }
        tokio::spawn(supervise(Arc::downgrade(&shared), shared.shutdown.subscribe()));
        tokio::spawn(restarter(Arc::downgrade(&shared), restart_rx));
        Ok(LapinTransport { shared })
    }

    /// The connection state (connected, reconnecting, closed).
    pub fn state(&self) -> ConnectionState {
        self.shared.state.get()
    }

    /// The state watch: subscribe to see every change, or read the
    /// generation (connects so far) and the last connection error.
    pub fn state_watch(&self) -> &StateWatch {
        &self.shared.state
    }

    /// The broker URL with the password redacted.
    pub fn url(&self) -> &str {
        &self.shared.redacted
    }

    /// The current broker name of `queue` (differs only for a server-named
    /// queue that was re-declared after a reconnect).
    pub fn resolve_queue(&self, queue: &str) -> String {
        self.shared.topology.resolve_queue(queue)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

fn boxed<T>(f: impl Future<Output = T> + Send + 'static) -> Pin<Box<dyn Future<Output = T> + Send>> {
    Box::pin(f)
}

impl Shared {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn shutdown_error(&self) -> Error {
        Error::Shutdown {
            what: format!("lapin transport ({})", self.redacted),
        }
    }

    fn uri(&self) -> lapin::uri::AMQPUri {
        use lapin::uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo};
        let e = &self.endpoint;
        AMQPUri {
            scheme: if e.tls { AMQPScheme::AMQPS } else { AMQPScheme::AMQP },
            authority: AMQPAuthority {
                userinfo: AMQPUserInfo {
                    username: e.user.clone(),
                    password: e.password.expose().to_owned(),
                },
                host: e.host.clone(),
                port: e.port,
            },
            vhost: e.vhost.clone(),
            query: AMQPQueryString {
                heartbeat: Some(self.config.heartbeat.as_secs().clamp(0, u16::MAX as u64) as u16),
                connection_timeout: Some(self.config.connection_timeout.as_millis() as u64),
                ..Default::default()
            },
        }
    }

    /// Opens a connection and its publish channels; when `recover`, replays
    /// the topology and restarts the consumers on it.
    async fn establish(self: &Arc<Self>, recover: bool) -> Result<Arc<Conn>> {
        let props = ConnectionProperties::default()
            .with_connection_name(self.config.connection_name.clone().into())
            .with_client_property("product".into(), "switchyard".into());
        let tls = match &self.config.ca_file {
            Some(path) if self.endpoint.tls => {
                let pem = std::fs::read_to_string(path).map_err(|e| Error::InvalidConfig {
                    variable: "RABBITMQ_CA_FILE".into(),
                    value: path.display().to_string(),
                    reason: format!("cannot read the CA file: {e}"),
                })?;
                lapin::tcp::OwnedTLSConfig {
                    identity: None,
                    cert_chain: Some(pem),
                }
            }
            _ => lapin::tcp::OwnedTLSConfig::default(),
        };
        let runtime = lapin::runtime::default_runtime().map_err(|e| Error::transport(e.to_string()))?;
        let connect = Connection::connect_uri_with_config(self.uri(), props, tls, runtime);
        let connection = match tokio::time::timeout(self.config.connection_timeout, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Error::ConnectionFailed {
                    message: format!("{}: {e}", self.redacted),
                })
            }
            Err(_) => {
                return Err(Error::ConnectionFailed {
                    message: format!(
                        "{}: timed out after {:?}",
                        self.redacted, self.config.connection_timeout
                    ),
                })
            }
        };
        let conn = Arc::new(Conn {
            connection,
            confirms: self.config.publisher_confirms,
            pool: (0..self.config.publish_channels.max(1))
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            admin_idle: Mutex::new(Vec::new()),
        });
        let setup = async {
            for slot in &conn.pool {
                *slot.lock().await = Some(
                    conn.open_channel(conn.confirms)
                        .await
                        .map_err(|e| map_error(&e, Subject::Other))?,
                );
            }
            if recover {
                let declarer = Replayer {
                    conn: conn.clone(),
                    channel: tokio::sync::Mutex::new(None),
                };
                self.topology.replay(&declarer).await?;
                for (id, cs) in self.consumers.entries() {
                    match self.start_consumer(&conn, &cs.sink).await {
                        Ok(()) => {}
                        Err(e @ (Error::QueueNotFound { .. } | Error::ResourceLocked { .. })) => {
                            tracing::warn!(queue = %cs.queue, error = %e, "consumer could not be restarted after reconnect");
                            self.consumers.remove(id);
                            cs.sink.end(Some(Error::ConsumerCancelled {
                                queue: cs.queue.clone(),
                            }));
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Ok::<(), Error>(())
        };
        if let Err(e) = setup.await {
            let _ = conn.connection.close(200, "setup failed".into()).await;
            return Err(e);
        }
        Ok(conn)
    }

    /// Waits until connected (bounded by `deadline`) and returns the connection.
    async fn wait_conn(&self, deadline: Instant) -> Result<Arc<Conn>> {
        loop {
            if self.is_closed() {
                return Err(self.shutdown_error());
            }
            if self.state.get().is_connected() {
                if let Some(c) = self.current.lock().clone() {
                    return Ok(c);
                }
            }
            self.state.wait_connected(deadline).await.map_err(|e| match e {
                Error::Shutdown { .. } => self.shutdown_error(),
                other => other,
            })?;
        }
    }

    /// After a connection-level failure: wake the supervisor and pause briefly.
    async fn suspect(&self) {
        self.lost.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Runs an admin operation on a channel of the current connection,
    /// retrying across reconnects until the publish wait deadline.
    async fn admin<T, F>(&self, subject: Subject<'_>, f: F) -> Result<T>
    where
        F: Fn(Channel) -> Pin<Box<dyn Future<Output = std::result::Result<T, lapin::Error>> + Send>>,
    {
        let deadline = Instant::now() + self.config.recovery.publish_wait_timeout;
        loop {
            let conn = self.wait_conn(deadline).await?;
            let ch = match conn.admin_channel().await {
                Ok(c) => c,
                Err(e) if is_connection_level(&e) || !conn.connected() => {
                    self.suspect().await;
                    continue;
                }
                Err(e) => return Err(map_error(&e, subject)),
            };
            match f(ch.clone()).await {
                Ok(v) => {
                    conn.return_admin(ch);
                    return Ok(v);
                }
                Err(e) if is_connection_level(&e) || !conn.connected() => {
                    self.suspect().await;
                }
                Err(e) => return Err(map_error(&e, subject)),
            }
        }
    }

    /// (Re)starts `cs` on `conn`: a channel of its own, QoS, basic.consume,
    /// a fresh coalescer epoch, and a pump task feeding its stream.
    async fn start_consumer(self: &Arc<Self>, conn: &Arc<Conn>, cs: &Arc<ConsumerShared>) -> Result<()> {
        let _guard = cs.restart.lock().await;
        if cs.cancelled.load(Ordering::Acquire) || cs.ended.load(Ordering::Acquire) {
            return Ok(());
        }
        if cs.live_channel().is_some() {
            return Ok(());
        }
        let subject = Subject::Queue(&cs.queue);
        let ch = conn
            .open_channel(cs.reply && conn.confirms)
            .await
            .map_err(|e| map_error(&e, subject))?;
        if !cs.options.auto_ack && cs.options.prefetch > 0 {
            ch.basic_qos(cs.options.prefetch, BasicQosOptions::default())
                .await
                .map_err(|e| map_error(&e, subject))?;
        }
        let queue = if cs.reply {
            DIRECT_REPLY_TO.to_owned()
        } else {
            self.topology.resolve_queue(&cs.queue)
        };
        let consumer = ch
            .basic_consume(
                queue.as_str().into(),
                cs.tag.as_ref().into(),
                BasicConsumeOptions {
                    no_ack: cs.options.auto_ack,
                    exclusive: cs.options.exclusive,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| map_error(&e, subject))?;
        let acker = if cs.options.auto_ack {
            None
        } else {
            let sink: Arc<dyn AckSink> = Arc::new(ChannelAcks(ch.clone(), cs.queue.clone()));
            let mut slot = cs.coalescer.lock();
            let c = match slot.as_ref() {
                Some(c) => {
                    c.reset(sink);
                    c.clone()
                }
                None => {
                    let cfg =
                        CoalesceConfig::for_prefetch(cs.options.prefetch).interval(self.config.ack_flush_interval);
                    let c = AckCoalescer::new(sink, cfg, cs.queue.clone());
                    *slot = Some(c.clone());
                    c
                }
            };
            Some(c)
        };
        *cs.channel.lock() = Some((ch.clone(), Arc::downgrade(conn)));
        tokio::spawn(pump(Arc::downgrade(self), cs.clone(), consumer, ch, acker));
        Ok(())
    }

    async fn consume(self: &Arc<Self>, queue: &str, options: ConsumeOptions, reply: bool) -> Result<Subscription> {
        let deadline = Instant::now() + self.config.recovery.publish_wait_timeout;
        let tag: Arc<str> = if options.consumer_tag.is_empty() {
            format!("switchyard-{}", switchyard_core::message::new_id()).into()
        } else {
            options.consumer_tag.as_str().into()
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let cs = Arc::new(ConsumerShared {
            id: Mutex::new(None),
            queue: queue.into(),
            tag: tag.clone(),
            options: options.clone(),
            tx,
            coalescer: Mutex::new(None),
            channel: Mutex::new(None),
            restart: tokio::sync::Mutex::new(()),
            cancelled: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            reply,
        });
        // Registered first, so that a recovery racing with this start
        // restarts it too (starts are serialised and skip a live channel).
        let id = self.consumers.register(queue, options, cs.clone());
        *cs.id.lock() = Some(id);
        loop {
            let started = match self.wait_conn(deadline).await {
                Ok(conn) => match self.start_consumer(&conn, &cs).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_transient() && !conn.connected() => {
                        self.suspect().await;
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = started {
                self.consumers.remove(id);
                cs.ended.store(true, Ordering::Release);
                return Err(e);
            }
            break;
        }
        let cancel = CancelHandle::new(Arc::new(CancelImpl {
            shared: Arc::downgrade(self),
            cs: cs.clone(),
        }));
        Ok(Subscription::new(
            queue.into(),
            tag,
            Box::pin(DeliveryStream { rx, done: false }),
            cancel,
        ))
    }

    /// Publishes with confirms on a channel from `source`, retrying across
    /// reconnects until the confirm arrives or the deadline passes.
    async fn publish(
        &self,
        source: &ChannelSource,
        dest: &Destination,
        body: &[u8],
        props: BasicProperties,
        options: PublishOptions,
    ) -> Result<()> {
        let deadline = Instant::now() + self.config.recovery.publish_wait_timeout;
        loop {
            let conn = match self.wait_conn(deadline).await {
                Ok(c) => c,
                Err(Error::ConnectionClosed { message, .. }) => return Err(deadline_error(dest, &message)),
                Err(e) => return Err(e),
            };
            let ch = match source.channel(&conn).await {
                Ok(c) => c,
                Err(e) => {
                    if is_connection_level(&e) || !conn.connected() || source.is_reply() {
                        self.suspect().await;
                        if Instant::now() >= deadline {
                            return Err(deadline_error(dest, &format!("no channel: {e}")));
                        }
                        continue;
                    }
                    return Err(map_error(
                        &e,
                        Subject::Publish {
                            exchange: dest.exchange(),
                            routing_key: dest.routing_key(),
                        },
                    ));
                }
            };
            let attempt = async {
                let confirm = ch
                    .basic_publish(
                        dest.exchange().into(),
                        dest.routing_key().into(),
                        BasicPublishOptions {
                            mandatory: options.mandatory,
                            immediate: false,
                        },
                        body,
                        props.clone(),
                    )
                    .await?;
                confirm.await
            };
            match tokio::time::timeout_at(deadline, attempt).await {
                Err(_) => return Err(deadline_error(dest, "the broker sent no confirm")),
                Ok(Ok(c)) => return confirmation(c, dest),
                Ok(Err(e)) => {
                    if self.retryable(&e, &conn, dest) {
                        tracing::debug!(dest = %dest, error = %e, "publish interrupted; retrying");
                        self.suspect().await;
                        continue;
                    }
                    return Err(map_error(
                        &e,
                        Subject::Publish {
                            exchange: dest.exchange(),
                            routing_key: dest.routing_key(),
                        },
                    ));
                }
            }
        }
    }

    /// True if a failed publish should be retried: the connection (or a
    /// channel, closed because of another publisher's error) was lost.
    fn retryable(&self, e: &lapin::Error, conn: &Conn, dest: &Destination) -> bool {
        if is_connection_level(e) || !conn.connected() {
            return true;
        }
        match e.kind() {
            lapin::ErrorKind::InvalidChannelState(..) | lapin::ErrorKind::InvalidChannel(_) => true,
            lapin::ErrorKind::ProtocolError(p) => {
                // Another publish on the shared channel hit a missing
                // exchange and the broker closed the channel: not ours.
                let text = p.get_message().as_str();
                text.contains("no exchange") && !text.contains(&format!("'{}'", dest.exchange()))
            }
            _ => false,
        }
    }
}

fn confirmation(c: Confirmation, dest: &Destination) -> Result<()> {
    match c {
        Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
        Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => Err(Error::Unroutable {
            reply: None,
            returned: None,
            exchange: dest.exchange().to_owned(),
            routing_key: dest.routing_key().to_owned(),
        }),
        Confirmation::Nack(None) => Err(Error::PublishUnconfirmed {
            exchange: dest.exchange().to_owned(),
            routing_key: dest.routing_key().to_owned(),
            message: "the broker nacked the publish".into(),
        }),
    }
}

/// Where a publish gets its channel.
enum ChannelSource {
    Pool,
    Reply(Arc<ConsumerShared>),
}

impl ChannelSource {
    fn is_reply(&self) -> bool {
        matches!(self, ChannelSource::Reply(_))
    }

    async fn channel(&self, conn: &Conn) -> std::result::Result<Channel, lapin::Error> {
        match self {
            ChannelSource::Pool => conn.publish_channel().await,
            ChannelSource::Reply(cs) => match cs.live_channel() {
                Some(c) => Ok(c),
                None => Err(lapin::ErrorKind::InvalidChannelState(
                    lapin::ChannelState::Closed,
                    "direct reply-to channel is being re-opened",
                )
                .into()),
            },
        }
    }
}

/// Re-declares recorded topology on a fresh connection.
struct Replayer {
    conn: Arc<Conn>,
    channel: tokio::sync::Mutex<Option<Channel>>,
}

impl Replayer {
    async fn channel(&self) -> Result<Channel> {
        let mut g = self.channel.lock().await;
        if let Some(c) = g.as_ref().filter(|c| c.status().connected()) {
            return Ok(c.clone());
        }
        let c = self
            .conn
            .connection
            .create_channel()
            .await
            .map_err(|e| map_error(&e, Subject::Other))?;
        *g = Some(c.clone());
        Ok(c)
    }

    /// Connection-level failures abort the replay (the recovery retries);
    /// a refused declaration (someone changed the entity meanwhile) is
    /// logged and skipped so one conflict cannot block recovery forever.
    fn outcome(&self, e: lapin::Error, what: &str) -> Result<()> {
        if is_connection_level(&e) || !self.conn.connected() {
            return Err(map_error(&e, Subject::Other));
        }
        tracing::warn!(entity = %what, error = %e, "re-declaration refused during recovery; skipped");
        Ok(())
    }
}

fn lapin_kind(k: ExchangeKind) -> lapin::ExchangeKind {
    match k {
        ExchangeKind::Direct => lapin::ExchangeKind::Direct,
        ExchangeKind::Topic => lapin::ExchangeKind::Topic,
        ExchangeKind::Fanout => lapin::ExchangeKind::Fanout,
        ExchangeKind::Headers => lapin::ExchangeKind::Headers,
    }
}

async fn declare_exchange_on(ch: &Channel, spec: &ExchangeSpec, args: FieldTable) -> lapin::Result<()> {
    ch.exchange_declare(
        spec.name.as_str().into(),
        lapin_kind(spec.kind),
        ExchangeDeclareOptions {
            passive: false,
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            internal: spec.internal,
            nowait: false,
        },
        args,
    )
    .await
}

fn queue_options(spec: &QueueSpec) -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: false,
        durable: spec.durable,
        exclusive: spec.exclusive,
        auto_delete: spec.auto_delete,
        nowait: false,
    }
}

async fn bind_on(ch: &Channel, b: &Binding, args: FieldTable) -> lapin::Result<()> {
    if b.destination_is_exchange {
        ch.exchange_bind(
            b.destination.as_str().into(),
            b.source.as_str().into(),
            b.routing_key.as_str().into(),
            ExchangeBindOptions::default(),
            args,
        )
        .await
    } else {
        ch.queue_bind(
            b.destination.as_str().into(),
            b.source.as_str().into(),
            b.routing_key.as_str().into(),
            QueueBindOptions::default(),
            args,
        )
        .await
    }
}

#[async_trait]
impl TopologyDeclarer for Replayer {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()> {
        let ch = self.channel().await?;
        let args = convert::headers_to_table(&spec.arguments)?;
        match declare_exchange_on(&ch, spec, args).await {
            Ok(()) => Ok(()),
            Err(e) => self.outcome(e, &format!("exchange {}", spec.name)),
        }
    }
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<String> {
        let ch = self.channel().await?;
        let args = convert::headers_to_table(&spec.arguments.to_headers())?;
        match ch
            .queue_declare(spec.name.as_str().into(), queue_options(spec), args)
            .await
        {
            Ok(q) => Ok(q.name().as_str().to_owned()),
            Err(e) => self
                .outcome(e, &format!("queue {}", spec.name))
                .map(|()| spec.name.clone()),
        }
    }
    async fn bind(&self, b: &Binding) -> Result<()> {
        let ch = self.channel().await?;
        let args = convert::headers_to_table(&b.arguments)?;
        match bind_on(&ch, b, args).await {
            Ok(()) => Ok(()),
            Err(e) => self.outcome(e, &format!("binding {} -> {}", b.source, b.destination)),
        }
    }
}

/// Moves deliveries of one lapin consumer (one channel, one connection)
/// into the subscription's stream.
async fn pump(
    shared: Weak<Shared>,
    cs: Arc<ConsumerShared>,
    mut consumer: lapin::Consumer,
    ch: Channel,
    coalescer: Option<AckCoalescer>,
) {
    let acker = coalescer.as_ref().map(|c| c.acker());
    let mut failure: Option<lapin::Error> = None;
    // Deliveries of one consumer mostly share exchange and routing key:
    // reuse the shared strings instead of allocating two per message.
    let mut last_exchange: Arc<str> = Arc::from("");
    let mut last_routing_key: Arc<str> = Arc::from("");
    loop {
        tokio::select! {
            _ = cs.tx.closed() => {
                // The application dropped the subscription: stop, flush the
                // settled acks and close the channel (the broker requeues
                // whatever is unsettled).
                cs.cancelled.store(true, Ordering::Release);
                if let Some(s) = shared.upgrade() {
                    if let Some(id) = *cs.id.lock() { s.consumers.remove(id); }
                }
                let _ = ch.basic_cancel(cs.tag.as_ref().into(), BasicCancelOptions::default()).await;
                if let Some(c) = &coalescer { let _ = c.close().await; }
                let _ = ch.close(200, "subscription dropped".into()).await;
                return;
            }
            item = consumer.next() => match item {
                Some(Ok(d)) => {
                    let tag = d.delivery_tag;
                    if *last_exchange != *d.exchange.as_str() {
                        last_exchange = d.exchange.as_str().into();
                    }
                    if *last_routing_key != *d.routing_key.as_str() {
                        last_routing_key = d.routing_key.as_str().into();
                    }
                    let info = DeliveryInfo {
                        delivery_tag: tag,
                        redelivered: d.redelivered,
                        exchange: last_exchange.clone(),
                        routing_key: last_routing_key.clone(),
                        queue: cs.queue.clone(),
                        consumer_tag: cs.tag.clone(),
                    };
                    let message = convert::from_delivery(d.data, &d.properties);
                    let delivery = match (&coalescer, &acker) {
                        (Some(c), Some(a)) => {
                            c.delivered(tag);
                            Delivery::new(message, info, a.clone())
                        }
                        _ => Delivery::auto_acked(message, info),
                    };
                    let _ = cs.tx.send(Item::Delivery(Ok(delivery)));
                }
                Some(Err(e)) => failure = Some(e),
                None => break,
            }
        }
    }
    if cs.cancelled.load(Ordering::Acquire) {
        // Cancelled by the client: settlements may still come; close the
        // channel once the subscription is dropped.
        cs.tx.closed().await;
        if let Some(c) = &coalescer {
            let _ = c.close().await;
        }
        let _ = ch.close(200, "consumer cancelled".into()).await;
        return;
    }
    let Some(s) = shared.upgrade() else {
        cs.end(None);
        return;
    };
    if s.is_closed() {
        cs.end(None);
        return;
    }
    match failure {
        None => {
            // basic.cancel from the broker (queue deleted).
            if let Some(id) = *cs.id.lock() {
                s.consumers.remove(id);
            }
            cs.end(Some(Error::ConsumerCancelled {
                queue: cs.queue.to_string(),
            }));
            drop(s);
            cs.tx.closed().await;
            let _ = ch.close(200, "consumer cancelled by broker".into()).await;
        }
        Some(e) => {
            // Give the connection status a moment to reflect a dying connection.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let conn = s.current.lock().clone();
            let conn_ok = conn.as_ref().is_some_and(|c| c.connected()) && !is_connection_level(&e);
            if !conn_ok {
                // The supervisor restarts every registered consumer.
                s.lost.notify_one();
                return;
            }
            tracing::warn!(queue = %cs.queue, error = %e, "consumer channel closed; restarting the consumer");
            let _ = s.restart_tx.send(cs.clone());
        }
    }
}

/// Restarts consumers whose channel closed while the connection stayed up.
async fn restarter(weak: Weak<Shared>, mut rx: mpsc::UnboundedReceiver<Arc<ConsumerShared>>) {
    while let Some(cs) = rx.recv().await {
        let Some(s) = weak.upgrade() else { return };
        let conn = s.current.lock().clone();
        let Some(conn) = conn.filter(|c| c.connected()) else {
            s.lost.notify_one();
            continue;
        };
        if let Err(err) = s.start_consumer(&conn, &cs).await {
            if !err.is_transient() {
                if let Some(id) = *cs.id.lock() {
                    s.consumers.remove(id);
                }
                cs.end(Some(Error::ConsumerCancelled {
                    queue: cs.queue.to_string(),
                }));
            } else {
                s.lost.notify_one();
            }
        }
    }
}

/// Watches the connection and recovers it when it drops.
async fn supervise(weak: Weak<Shared>, mut shutdown: watch::Receiver<bool>) {
    'outer: loop {
        let conn = {
            let Some(s) = weak.upgrade() else { return };
            let c = s.current.lock().clone();
            match c {
                Some(c) => c,
                None => return,
            }
        };
        let mut events = Box::pin(conn.connection.events_listener());
        // Wait for the connection to drop.
        let why = loop {
            let lost = async {
                match weak.upgrade() {
                    Some(s) => {
                        let lost = s.lost.clone();
                        drop(s);
                        lost.notified().await
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = shutdown.changed() => {
                    if r.is_err() || *shutdown.borrow() {
                        let _ = conn.connection.close(200, "transport closed".into()).await;
                        return;
                    }
                }
                ev = events.next() => match ev {
                    Some(lapin::Event::Error(e)) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        if !conn.connected() { break e.to_string(); }
                    }
                    Some(_) => {}
                    None => {
                        if !conn.connected() { break "connection ended".to_owned(); }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                },
                _ = lost => {
                    if !conn.connected() { break "connection lost".to_owned(); }
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if !conn.connected() { break "connection lost".to_owned(); }
                }
            }
        };
        drop(events);
        let Some(s) = weak.upgrade() else { return };
        if s.is_closed() {
            return;
        }
        s.state.set_last_error(why.clone());
        s.state.set(ConnectionState::Reconnecting { attempt: 1 });
        if !s.config.recovery.enabled {
            tracing::error!(url = %s.redacted, error = %why, "connection lost and recovery is disabled");
            s.closed.store(true, Ordering::Release);
            s.state.set(ConnectionState::Closed);
            for (_, c) in s.consumers.entries() {
                c.sink.end(Some(Error::ConnectionClosed {
                    reply: None,
                    message: why.clone(),
                }));
            }
            return;
        }
        let mut backoff = s.config.recovery.backoff.delays();
        drop(s);
        let mut attempt = 1u32;
        loop {
            let Some(s) = weak.upgrade() else { return };
            if s.is_closed() {
                return;
            }
            match s.establish(true).await {
                Ok(new) => {
                    *s.current.lock() = Some(new);
                    s.state.set(ConnectionState::Connected);
                    continue 'outer;
                }
                Err(e) => {
                    tracing::info!(url = %s.redacted, attempt, error = %e, "reconnect attempt failed");
                    s.state.set_last_error(e.to_string());
                    match backoff.next() {
                        Some(d) => {
                            attempt += 1;
                            s.state.set(ConnectionState::Reconnecting { attempt });
                            drop(s);
                            tokio::select! {
                                _ = tokio::time::sleep(d) => {}
                                r = shutdown.changed() => {
                                    if r.is_err() || *shutdown.borrow() { return; }
                                }
                            }
                        }
                        None => {
                            tracing::error!(url = %s.redacted, "giving up reconnecting");
                            s.closed.store(true, Ordering::Release);
                            s.state.set(ConnectionState::Closed);
                            for (_, c) in s.consumers.entries() {
                                c.sink.end(Some(Error::ConnectionClosed {
                                    reply: None,
                                    message: format!("gave up reconnecting: {e}"),
                                }));
                            }
                            return;
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Trait implementations
// ---------------------------------------------------------------------------

#[async_trait]
impl Publisher for LapinTransport {
    async fn publish_with(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<()> {
        let props = convert::to_properties(&message)?;
        self.shared
            .publish(&ChannelSource::Pool, dest, &message.body, props, options)
            .await
    }

    async fn publish_batch(&self, dest: &Destination, messages: Vec<Message>) -> Result<()> {
        let s = &self.shared;
        // Refuse bad input before publishing anything.
        for m in &messages {
            convert::validate(m)?;
        }
        let deadline = Instant::now() + s.config.recovery.publish_wait_timeout;
        let conn = match s.wait_conn(deadline).await {
            Ok(c) => c,
            Err(Error::ConnectionClosed { message, .. }) => return Err(deadline_error(dest, &message)),
            Err(e) => return Err(e),
        };
        // Pipeline everything on one channel, then collect the confirms.
        let mut retry = Vec::new();
        let mut first_error = None;
        match conn.publish_channel().await {
            Ok(ch) => {
                let mut confirms = Vec::with_capacity(messages.len());
                for (i, m) in messages.iter().enumerate() {
                    let p = convert::to_properties(m)?;
                    match ch
                        .basic_publish(
                            dest.exchange().into(),
                            dest.routing_key().into(),
                            BasicPublishOptions::default(),
                            &m.body,
                            p,
                        )
                        .await
                    {
                        Ok(c) => confirms.push((i, c)),
                        Err(_) => {
                            retry.extend(i..messages.len());
                            break;
                        }
                    }
                }
                // One deadline over all the confirms (a timer per confirm
                // would cost more than the confirm itself).
                let collect = async {
                    for (i, c) in confirms {
                        match c.await {
                            Ok(c) => {
                                if let Err(e) = confirmation(c, dest) {
                                    first_error.get_or_insert(e);
                                }
                            }
                            Err(e) if s.retryable(&e, &conn, dest) => retry.push(i),
                            Err(e) => {
                                first_error.get_or_insert(map_error(
                                    &e,
                                    Subject::Publish {
                                        exchange: dest.exchange(),
                                        routing_key: dest.routing_key(),
                                    },
                                ));
                            }
                        }
                    }
                };
                if tokio::time::timeout_at(deadline, collect).await.is_err() {
                    return Err(deadline_error(dest, "the broker sent no confirm"));
                }
            }
            Err(_) => retry.extend(0..messages.len()),
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        // Whatever the connection loss interrupted goes again, one by one,
        // each waiting for recovery within the deadline.
        retry.sort_unstable();
        for i in retry {
            s.publish(
                &ChannelSource::Pool,
                dest,
                &messages[i].body,
                convert::to_properties(&messages[i])?,
                PublishOptions::default(),
            )
            .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for LapinTransport {
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        self.shared.consume(queue, options, false).await
    }
}

#[async_trait]
impl Admin for LapinTransport {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()> {
        let args = convert::headers_to_table(&spec.arguments)?;
        let spec2 = spec.clone();
        self.shared
            .admin(Subject::Exchange(&spec.name), move |ch| {
                let spec = spec2.clone();
                let args = args.clone();
                boxed(async move { declare_exchange_on(&ch, &spec, args).await })
            })
            .await?;
        self.shared.topology.record_exchange(spec);
        Ok(())
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let args = convert::headers_to_table(&spec.arguments.to_headers())?;
        let name = spec.name.clone();
        let opts = queue_options(spec);
        let q = self
            .shared
            .admin(Subject::Queue(&spec.name), move |ch| {
                let name = name.clone();
                let args = args.clone();
                boxed(async move { ch.queue_declare(name.as_str().into(), opts, args).await })
            })
            .await?;
        let info = QueueInfo {
            name: q.name().as_str().to_owned(),
            message_count: q.message_count(),
            consumer_count: q.consumer_count(),
        };
        self.shared.topology.record_queue(spec, &info.name);
        Ok(info)
    }

    async fn bind(&self, binding: &Binding) -> Result<()> {
        let args = convert::headers_to_table(&binding.arguments)?;
        let mut b = binding.clone();
        if !b.destination_is_exchange {
            b.destination = self.shared.topology.resolve_queue(&b.destination);
        }
        let subject = if binding.destination_is_exchange {
            Subject::Exchange(&binding.source)
        } else {
            Subject::Queue(&binding.destination)
        };
        self.shared
            .admin(subject, move |ch| {
                let b = b.clone();
                let args = args.clone();
                boxed(async move { bind_on(&ch, &b, args).await })
            })
            .await?;
        self.shared.topology.record_binding(binding);
        Ok(())
    }

    async fn unbind(&self, binding: &Binding) -> Result<()> {
        let args = convert::headers_to_table(&binding.arguments)?;
        let mut b = binding.clone();
        if !b.destination_is_exchange {
            b.destination = self.shared.topology.resolve_queue(&b.destination);
        }
        self.shared
            .admin(Subject::Queue(&binding.destination), move |ch| {
                let b = b.clone();
                let args = args.clone();
                boxed(async move {
                    if b.destination_is_exchange {
                        ch.exchange_unbind(
                            b.destination.as_str().into(),
                            b.source.as_str().into(),
                            b.routing_key.as_str().into(),
                            ExchangeUnbindOptions::default(),
                            args,
                        )
                        .await
                    } else {
                        ch.queue_unbind(
                            b.destination.as_str().into(),
                            b.source.as_str().into(),
                            b.routing_key.as_str().into(),
                            args,
                        )
                        .await
                    }
                })
            })
            .await?;
        self.shared.topology.remove_binding(binding);
        Ok(())
    }

    async fn delete_exchange(&self, name: &str) -> Result<()> {
        let n = name.to_owned();
        let r = self
            .shared
            .admin(Subject::Exchange(name), move |ch| {
                let n = n.clone();
                boxed(async move {
                    ch.exchange_delete(n.as_str().into(), ExchangeDeleteOptions::default())
                        .await
                })
            })
            .await;
        self.shared.topology.remove_exchange(name);
        match r {
            Ok(()) | Err(Error::ExchangeNotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn delete_queue(&self, name: &str) -> Result<u32> {
        let n = self.shared.topology.resolve_queue(name);
        let r = self
            .shared
            .admin(Subject::Queue(name), move |ch| {
                let n = n.clone();
                boxed(async move { ch.queue_delete(n.as_str().into(), QueueDeleteOptions::default()).await })
            })
            .await;
        self.shared.topology.remove_queue(name);
        match r {
            Ok(n) => Ok(n),
            Err(Error::QueueNotFound { .. }) => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn purge_queue(&self, name: &str) -> Result<u32> {
        let n = self.shared.topology.resolve_queue(name);
        self.shared
            .admin(Subject::Queue(name), move |ch| {
                let n = n.clone();
                boxed(async move { ch.queue_purge(n.as_str().into(), QueuePurgeOptions::default()).await })
            })
            .await
    }

    async fn queue_info(&self, name: &str) -> Result<QueueInfo> {
        let n = self.shared.topology.resolve_queue(name);
        let q = self
            .shared
            .admin(Subject::Queue(name), move |ch| {
                let n = n.clone();
                boxed(async move {
                    ch.queue_declare(
                        n.as_str().into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                })
            })
            .await?;
        Ok(QueueInfo {
            name: q.name().as_str().to_owned(),
            message_count: q.message_count(),
            consumer_count: q.consumer_count(),
        })
    }

    async fn exchange_exists(&self, name: &str) -> Result<bool> {
        if name.is_empty() {
            return Ok(true);
        }
        let n = name.to_owned();
        let r = self
            .shared
            .admin(Subject::Exchange(name), move |ch| {
                let n = n.clone();
                boxed(async move {
                    ch.exchange_declare(
                        n.as_str().into(),
                        lapin::ExchangeKind::Direct,
                        ExchangeDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                })
            })
            .await;
        match r {
            Ok(()) => Ok(true),
            Err(Error::ExchangeNotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Publishes RPC requests on the direct reply-to channel.
struct ReplyPublisher {
    shared: Weak<Shared>,
    cs: Arc<ConsumerShared>,
}

#[async_trait]
impl Publisher for ReplyPublisher {
    async fn publish_with(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<()> {
        let shared = self.shared.upgrade().ok_or_else(|| Error::Shutdown {
            what: "lapin transport".into(),
        })?;
        if self.cs.ended.load(Ordering::Acquire) {
            return Err(Error::ConnectionClosed {
                reply: None,
                message: "the direct reply-to consumer has ended".into(),
            });
        }
        let props = convert::to_properties(&message)?;
        shared
            .publish(
                &ChannelSource::Reply(self.cs.clone()),
                dest,
                &message.body,
                props,
                options,
            )
            .await
    }
}

#[async_trait]
impl Transport for LapinTransport {
    fn name(&self) -> &'static str {
        "lapin"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            publisher_confirms: self.shared.config.publisher_confirms,
            mandatory_returns: self.shared.config.publisher_confirms,
            ..Capabilities::ALL
        }
    }

    async fn health_check(&self) -> Result<()> {
        let s = &self.shared;
        if s.is_closed() {
            return Err(s.shutdown_error());
        }
        let state = s.state.get();
        let conn = s.current.lock().clone();
        match conn {
            Some(c) if state.is_connected() && c.connected() => {}
            _ => {
                return Err(Error::ConnectionClosed {
                    reply: None,
                    message: format!(
                        "{} is {state}{}",
                        s.redacted,
                        s.state
                            .last_error()
                            .map(|e| format!(" (last error: {e})"))
                            .unwrap_or_default()
                    ),
                })
            }
        }
        // One round trip to prove the broker answers.
        match tokio::time::timeout(Duration::from_secs(5), self.exchange_exists("amq.direct")).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(Error::transport("broker answered but amq.direct is missing")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout {
                operation: format!("health check of {}", s.redacted),
                timeout: Duration::from_secs(5),
            }),
        }
    }

    async fn close(&self) -> Result<()> {
        let s = &self.shared;
        if s.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for (id, c) in s.consumers.entries() {
            s.consumers.remove(id);
            c.sink.cancelled.store(true, Ordering::Release);
            if let Some(co) = c.sink.coalescer() {
                let _ = co.close().await;
            }
            c.sink.end(None);
        }
        s.state.set(ConnectionState::Closed);
        let conn = s.current.lock().take();
        let mut result = Ok(());
        if let Some(c) = conn {
            if c.connected() {
                match c.connection.close(200, "closed by application".into()).await {
                    Ok(()) => {}
                    // Already closed (by the broker, or concurrently): nothing left to do.
                    Err(e) if matches!(e.kind(), lapin::ErrorKind::InvalidConnectionState(_)) => {}
                    Err(e) => result = Err(map_error(&e, Subject::Other)),
                }
            }
        }
        let _ = s.shutdown.send(true);
        result
    }

    async fn open_reply_channel(&self) -> Result<ReplyChannel> {
        let replies = self
            .shared
            .consume(
                DIRECT_REPLY_TO,
                ConsumeOptions::default().auto_ack(true).prefetch(0),
                true,
            )
            .await?;
        let cs = {
            let entries = self.shared.consumers.entries();
            entries
                .into_iter()
                .find(|(_, e)| e.sink.tag.as_ref() == replies.consumer_tag())
                .map(|(_, e)| e.sink)
                .ok_or_else(|| Error::transport("direct reply-to consumer vanished"))?
        };
        Ok(ReplyChannel {
            reply_to: DIRECT_REPLY_TO.to_owned(),
            replies,
            publisher: Some(Arc::new(ReplyPublisher {
                shared: Arc::downgrade(&self.shared),
                cs,
            })),
        })
    }
}
