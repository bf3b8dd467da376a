//! The [`AmqpClient`] implementation over amqprs: connection, channels,
//! the AMQP methods the engine sends, and the callbacks that bring back
//! what the broker says asynchronously.
//!
//! What is amqprs-specific here:
//!
//! - **Callbacks.** amqprs reports a broker's `channel.close`,
//!   `basic.cancel`, publisher confirms and returns through a
//!   [`ChannelCallback`], and `connection.close` / blocked / unblocked
//!   through a [`ConnectionCallback`]. Ours record the close reply (so that
//!   a failed operation reports [`ClientError::Broker`] with the broker's
//!   code, text, class and method), feed the [`ConfirmMap`], flag cancelled
//!   consumers and forward the connection signals ([`ConnSignals`]). The
//!   channel callback lives exactly as long as amqprs' channel dispatcher,
//!   so dropping it is the moment every publish still awaiting its confirm
//!   learns that the channel is gone.
//! - **Confirms.** amqprs has no per-publish confirm future: the channel's
//!   publish sequence number (from 1 after `confirm.select`) is assigned and
//!   registered in the same serialized section (a tokio mutex per channel)
//!   as the `basic.publish`, so numbers follow the wire order.
//! - **Cancel safety.** amqprs keys the responder of a synchronous request
//!   by method type; a request whose future is dropped mid-flight leaves a
//!   stale responder that a later request receives (amqprs issue #196, which
//!   can panic its dispatcher). Every synchronous request (`open_channel`,
//!   `confirm_select`, `qos`, declarations, `consume`, `cancel`, `close`...)
//!   therefore runs on a task of its own: a caller's timeout never cancels
//!   it.
//! - **Short strings.** amqprs panics on a short string over 255 bytes:
//!   names, routing keys, consumer tags and properties are checked first
//!   ([`ClientError::Encode`]).
//! - **Blocked connections.** amqprs 2.1.5 announces fixed client
//!   capabilities without `connection.blocked`, so RabbitMQ never sends
//!   `connection.blocked` to it ([`ClientCaps::blocked_notifications`] is
//!   false); the connection callback forwards it anyway should a later
//!   version announce it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use amqprs::callbacks::{ChannelCallback, ConnectionCallback};
use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicGetArguments, BasicNackArguments,
    BasicPublishArguments, BasicQosArguments, BasicRejectArguments, Channel, ConfirmSelectArguments, ConsumerMessage,
    ExchangeBindArguments, ExchangeDeclareArguments, ExchangeDeleteArguments, ExchangeUnbindArguments,
    QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments, QueuePurgeArguments, QueueUnbindArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::{Ack, BasicProperties, Cancel, Close, CloseChannel, Nack, Return};
use async_trait::async_trait;
use futures_core::Stream;
use parking_lot::Mutex;
use switchyard_amqp::client::{
    AmqpChannel, AmqpClient, AmqpConnection, ClientCaps, ClientError, Confirm, ConfirmMap, ConfirmOutcome, ConnSignals,
    ConnectParams, ConsumerEvent, ConsumerEvents, RawDelivery, RawGet,
};
use switchyard_core::{
    Binding, BrokerReply, CloseScope, Destination, ExchangeSpec, Headers, Message, QueueInfo, QueueSpec,
};
use tokio::sync::{mpsc, oneshot};

use crate::convert::{check_short, headers_to_table, to_basic_properties, to_message};

type Result<T> = std::result::Result<T, ClientError>;

/// How long a polite `channel.close` / `connection.close` may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// The amqprs client: connects with amqprs 2.x.
#[derive(Default, Debug, Clone, Copy)]
pub struct AmqprsClient;

#[async_trait]
impl AmqpClient for AmqprsClient {
    type Connection = AmqprsConnection;

    fn name(&self) -> &'static str {
        "amqprs"
    }

    fn caps(&self) -> ClientCaps {
        ClientCaps {
            blocked_notifications: false,
            decode_failure_drops_connection: true,
            // One channel up to 512 publishes in flight, as lapin: spread
            // over the pool, 32 publishers cost RabbitMQ a quarter more CPU
            // per message (more channel processes, smaller `multiple`
            // acks) than on one channel, which the per-channel numbering
            // lock does not make up for (docs/benchmarks/amqprs.md).
            publish_spill: 512,
        }
    }

    async fn connect(&self, params: &ConnectParams, signals: Arc<ConnSignals>) -> Result<AmqprsConnection> {
        let mut args = OpenConnectionArguments::new(&params.host, params.port, &params.user, params.password.expose());
        // amqprs misbehaves with heartbeat 0: at least one second.
        let heartbeat = params.heartbeat.as_secs().clamp(1, u64::from(u16::MAX)) as u16;
        args.virtual_host(&params.vhost)
            .heartbeat(heartbeat)
            .connection_name(&params.connection_name);
        if let Some(tls) = &params.tls {
            #[cfg(feature = "tls")]
            {
                args.tls_adaptor(tls::adaptor(&params.host, tls)?).scheme("amqps");
            }
            #[cfg(not(feature = "tls"))]
            {
                let _ = tls;
                return Err(ClientError::Other(
                    "amqps needs the `tls` feature of switchyard-amqprs".into(),
                ));
            }
        }
        // Connection::open is not cancel-sensitive (nothing shared yet), but
        // the engine bounds it with a timeout: run it detached all the same
        // so that a late success is closed rather than leaked half-open.
        let conn = match tokio::spawn(async move { Connection::open(&args).await }).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(ClientError::Other(e.to_string())),
            Err(e) => return Err(ClientError::Other(format!("internal task failed: {e}"))),
        };
        let shared = Arc::new(ConnShared {
            closed: Mutex::new(None),
            closing: AtomicBool::new(false),
            signals,
            broker_closed_channels: AtomicUsize::new(0),
        });
        conn.register_callback(ConnCallback(shared.clone()))
            .await
            .map_err(|e| ClientError::Closed(e.to_string()))?;
        let (stop, stopped) = oneshot::channel::<()>();
        {
            let conn = conn.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                tokio::select! {
                    network = conn.listen_network_io_failure() => {
                        let why = shared.close_reason(network);
                        shared.signals.lost(&why);
                    }
                    _ = stopped => {}
                }
            });
        }
        Ok(AmqprsConnection {
            conn,
            shared,
            _stop_watch: stop,
        })
    }
}

/// Ids kept free for the channels a connection has open when the leaked
/// ids of broker-closed channels make it reconnect (see
/// `ConnShared::broker_closed_channels`).
const LEAK_MARGIN: usize = 256;

/// What a connection shares with its callback and its channels.
struct ConnShared {
    /// The broker's `connection.close`.
    closed: Mutex<Option<BrokerReply>>,
    /// We are closing it.
    closing: AtomicBool,
    signals: Arc<ConnSignals>,
    /// Channels the broker closed. amqprs 2.1 frees a channel's id only when
    /// the client closes it, so each of these keeps its id taken for the
    /// connection's life; it panics (in its connection task) once no id is
    /// left. [`AmqprsConnection::open_channel`] replaces the connection first.
    broker_closed_channels: AtomicUsize,
}

impl ConnShared {
    fn reply(&self) -> Option<BrokerReply> {
        self.closed.lock().clone()
    }

    fn close_reason(&self, network: bool) -> String {
        if let Some(r) = self.reply() {
            format!("the broker closed the connection: {r}")
        } else if self.closing.load(Ordering::Acquire) {
            "connection closed by the client".into()
        } else if network {
            "connection lost (network failure or missed heartbeats)".into()
        } else {
            "connection closed".into()
        }
    }
}

struct ConnCallback(Arc<ConnShared>);

#[async_trait]
impl ConnectionCallback for ConnCallback {
    async fn close(&mut self, _c: &Connection, close: Close) -> std::result::Result<(), amqprs::error::Error> {
        let reply = BrokerReply::new(close.reply_code(), close.reply_text().clone())
            .caused_by(close.class_id(), close.method_id())
            .scope(CloseScope::Connection);
        tracing::warn!(code = reply.code, text = %reply.text, "the broker closed the connection");
        *self.0.closed.lock() = Some(reply.clone());
        self.0.signals.closed_by_broker(&reply);
        // Ok: amqprs answers close-ok and shuts the connection down.
        Ok(())
    }

    async fn blocked(&mut self, _c: &Connection, reason: String) {
        tracing::warn!(reason = %reason, "connection blocked by the broker (resource alarm)");
        self.0.signals.blocked(&reason);
    }

    async fn unblocked(&mut self, _c: &Connection) {
        tracing::info!("connection unblocked");
        self.0.signals.unblocked();
    }

    async fn secret_updated(&mut self, _c: &Connection) {}
}

/// One amqprs connection.
pub struct AmqprsConnection {
    conn: Connection,
    shared: Arc<ConnShared>,
    /// Dropping it stops the loss watcher (which holds a connection handle).
    _stop_watch: oneshot::Sender<()>,
}

impl std::fmt::Debug for AmqprsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqprsConnection")
            .field("name", &self.conn.connection_name())
            .field("open", &self.conn.is_open())
            .finish()
    }
}

impl AmqprsConnection {
    fn error(&self, e: amqprs::error::Error) -> ClientError {
        if let Some(r) = self.shared.reply() {
            return ClientError::Broker(r);
        }
        if !self.conn.is_open() {
            self.shared.signals.lost(&self.shared.close_reason(false));
            return ClientError::Closed(format!("the connection is closed ({e})"));
        }
        classify(e)
    }
}

#[async_trait]
impl AmqpConnection for AmqprsConnection {
    type Channel = AmqprsChannel;

    async fn open_channel(&self) -> Result<AmqprsChannel> {
        if !self.conn.is_open() {
            return Err(self.error(amqprs::error::Error::ChannelOpenError("connection closed".into())));
        }
        // Ids of channels the broker closed are never freed by amqprs (see
        // `ConnShared::broker_closed_channels`): well before they fill the
        // id space (channel-max, 2047 on RabbitMQ) the connection is given
        // up, and the engine reconnects with every id free again.
        let leaked = self.shared.broker_closed_channels.load(Ordering::Acquire);
        let channel_max = match self.conn.channel_max() {
            0 => usize::from(u16::MAX),
            m => usize::from(m),
        };
        if leaked + LEAK_MARGIN >= channel_max {
            let why = format!(
                "{leaked} channels closed by the broker keep their ids taken in amqprs (channel-max {channel_max}); reconnecting"
            );
            tracing::warn!("{why}");
            self.shared.signals.lost(&why);
            self.close().await;
            return Err(ClientError::Closed(why));
        }
        let conn = self.conn.clone();
        let state = Arc::new(ChanShared::default());
        let callback = ChanCallback {
            chan: state.clone(),
            conn: self.shared.clone(),
        };
        let opened = tokio::spawn(async move {
            let ch = conn.open_channel(None).await?;
            ch.register_callback(callback).await?;
            Ok::<_, amqprs::error::Error>(ch)
        })
        .await;
        let ch = match opened {
            Ok(Ok(ch)) => ch,
            Ok(Err(e)) => return Err(self.error(e)),
            Err(e) => return Err(ClientError::Other(format!("internal task failed: {e}"))),
        };
        Ok(AmqprsChannel {
            ch,
            conn: self.shared.clone(),
            state,
            publish: tokio::sync::Mutex::new(None),
        })
    }

    fn is_open(&self) -> bool {
        self.conn.is_open()
    }

    fn server_name(&self) -> Option<String> {
        let name = self.conn.server_properties().cluster_name();
        (!name.is_empty()).then(|| name.to_owned())
    }

    async fn close(&self) {
        self.shared.closing.store(true, Ordering::Release);
        if !self.conn.is_open() {
            return;
        }
        let conn = self.conn.clone();
        let closing = tokio::spawn(async move {
            let _ = conn.close().await;
        });
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
    }
}

/// Maps an amqprs error when neither the channel nor the connection was
/// closed by the broker.
fn classify(e: amqprs::error::Error) -> ClientError {
    use amqprs::error::Error as E;
    match e {
        E::NetworkError(_) | E::InternalChannelError(_) | E::ChannelCloseError(_) | E::ConnectionCloseError(_) => {
            ClientError::Closed(e.to_string())
        }
        other => ClientError::Other(other.to_string()),
    }
}

// ---------------------------------------------------------------------------
// Channels
// ---------------------------------------------------------------------------

const RUNNING: u8 = 0;
const BROKER_CANCELLED: u8 = 1;
const CLIENT_CANCELLED: u8 = 2;

/// What a channel shares with its callback and its consumer streams.
#[derive(Default)]
struct ChanShared {
    /// The broker's `channel.close`.
    closed: Mutex<Option<BrokerReply>>,
    /// Publishes awaiting their confirm.
    confirms: ConfirmMap,
    /// Consumers on the channel, by tag: running or cancelled by whom.
    consumers: Mutex<HashMap<String, Arc<AtomicU8>>>,
}

/// Why a channel (or its connection) is gone, as the broker said if it did.
fn gone(chan: &ChanShared, conn: &ConnShared) -> ClientError {
    if let Some(r) = chan.closed.lock().clone() {
        return ClientError::Broker(r);
    }
    if let Some(r) = conn.reply() {
        return ClientError::Broker(r);
    }
    ClientError::Closed("the channel closed".into())
}

struct ChanCallback {
    chan: Arc<ChanShared>,
    conn: Arc<ConnShared>,
}

impl Drop for ChanCallback {
    fn drop(&mut self) {
        // amqprs' channel dispatcher owns the callback and drops it when it
        // exits: the channel is gone (closed by either side, or with the
        // connection). Nothing will confirm what is still pending.
        if !self.chan.confirms.is_empty() {
            self.chan.confirms.fail_all(gone(&self.chan, &self.conn));
        }
    }
}

#[async_trait]
impl ChannelCallback for ChanCallback {
    async fn close(
        &mut self,
        _channel: &Channel,
        close: CloseChannel,
    ) -> std::result::Result<(), amqprs::error::Error> {
        let reply = BrokerReply::new(close.reply_code(), close.reply_text().clone())
            .caused_by(close.class_id(), close.method_id())
            .scope(CloseScope::Channel);
        tracing::debug!(code = reply.code, text = %reply.text, "the broker closed a channel");
        self.conn.broker_closed_channels.fetch_add(1, Ordering::AcqRel);
        *self.chan.closed.lock() = Some(reply.clone());
        self.chan.confirms.fail_all(ClientError::Broker(reply));
        // Ok: amqprs then answers close-ok and ends the channel.
        Ok(())
    }

    async fn cancel(&mut self, _channel: &Channel, cancel: Cancel) -> std::result::Result<(), amqprs::error::Error> {
        // Flag it before amqprs drops the consumer's sender (right after
        // this returns): the stream then reports `Cancelled`.
        if let Some(state) = self.chan.consumers.lock().get(cancel.consumer_tag()) {
            let _ = state.compare_exchange(RUNNING, BROKER_CANCELLED, Ordering::AcqRel, Ordering::Acquire);
        }
        Ok(())
    }

    async fn flow(&mut self, _channel: &Channel, active: bool) -> std::result::Result<bool, amqprs::error::Error> {
        Ok(active)
    }

    async fn publish_ack(&mut self, _channel: &Channel, ack: Ack) {
        self.chan.confirms.ack(ack.delivery_tag(), ack.mutiple());
    }

    async fn publish_nack(&mut self, _channel: &Channel, nack: Nack) {
        self.chan.confirms.nack(nack.delivery_tag(), nack.multiple());
    }

    async fn publish_return(&mut self, _channel: &Channel, ret: Return, props: BasicProperties, content: Vec<u8>) {
        let reply = BrokerReply::new(ret.reply_code(), ret.reply_text().clone()).caused_by(60, 40);
        let message = to_message(Some(&props), Some(content));
        self.chan
            .confirms
            .returned(ret.exchange(), ret.routing_key(), reply, Some(message));
    }
}

/// One amqprs channel.
pub struct AmqprsChannel {
    ch: Channel,
    conn: Arc<ConnShared>,
    state: Arc<ChanShared>,
    /// The next publish sequence number once in confirm mode; the lock is
    /// the serialized section of numbering and sending.
    publish: tokio::sync::Mutex<Option<u64>>,
}

impl std::fmt::Debug for AmqprsChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqprsChannel")
            .field("id", &self.ch.channel_id())
            .field("open", &self.ch.is_open())
            .finish()
    }
}

impl AmqprsChannel {
    /// `Some(why)` when the channel or its connection is gone.
    fn lost(&self) -> Option<ClientError> {
        if let Some(r) = self.state.closed.lock().clone() {
            return Some(ClientError::Broker(r));
        }
        if let Some(r) = self.conn.reply() {
            return Some(ClientError::Broker(r));
        }
        if !self.ch.is_connection_open() {
            self.conn.signals.lost(&self.conn.close_reason(false));
            return Some(ClientError::Closed("the connection is closed".into()));
        }
        if !self.ch.is_open() {
            return Some(ClientError::Closed("the channel is closed".into()));
        }
        None
    }

    fn error(&self, e: amqprs::error::Error) -> ClientError {
        self.lost().unwrap_or_else(|| classify(e))
    }

    /// Runs one synchronous request on a task of its own (amqprs is not
    /// cancel-safe, see the module docs).
    async fn detached<T, F>(&self, request: F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = std::result::Result<T, amqprs::error::Error>> + Send + 'static,
    {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        match tokio::spawn(request).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.error(e)),
            Err(e) => Err(ClientError::Other(format!("internal task failed: {e}"))),
        }
    }
}

#[async_trait]
impl AmqpChannel for AmqprsChannel {
    fn is_open(&self) -> bool {
        self.ch.is_open() && self.ch.is_connection_open() && self.state.closed.lock().is_none()
    }

    async fn confirm_select(&self) -> Result<()> {
        let mut seq = self.publish.lock().await;
        let ch = self.ch.clone();
        self.detached(async move { ch.confirm_select(ConfirmSelectArguments::default()).await })
            .await?;
        if seq.is_none() {
            *seq = Some(1);
        }
        Ok(())
    }

    async fn qos(&self, prefetch: u16) -> Result<()> {
        let ch = self.ch.clone();
        self.detached(async move { ch.basic_qos(BasicQosArguments::new(0, prefetch, false)).await })
            .await
    }

    async fn declare_exchange(&self, spec: &ExchangeSpec, passive: bool) -> Result<()> {
        check_short("exchange name", &spec.name)?;
        let args = ExchangeDeclareArguments::new(&spec.name, spec.kind.as_str())
            .passive(passive)
            .durable(spec.durable)
            .auto_delete(spec.auto_delete)
            .internal(spec.internal)
            .arguments(headers_to_table(&spec.arguments)?)
            .finish();
        let ch = self.ch.clone();
        self.detached(async move { ch.exchange_declare(args).await }).await
    }

    async fn declare_queue(&self, spec: &QueueSpec, passive: bool) -> Result<QueueInfo> {
        check_short("queue name", &spec.name)?;
        let args = QueueDeclareArguments::new(&spec.name)
            .passive(passive)
            .durable(spec.durable)
            .exclusive(spec.exclusive)
            .auto_delete(spec.auto_delete)
            .arguments(headers_to_table(&spec.arguments.to_headers())?)
            .finish();
        let ch = self.ch.clone();
        match self.detached(async move { ch.queue_declare(args).await }).await? {
            Some((name, message_count, consumer_count)) => Ok(QueueInfo {
                name,
                message_count,
                consumer_count,
            }),
            None => Err(ClientError::Other("queue.declare got no declare-ok".into())),
        }
    }

    async fn bind(&self, b: &Binding) -> Result<()> {
        check_binding(b)?;
        let table = headers_to_table(&b.arguments)?;
        let ch = self.ch.clone();
        if b.destination_is_exchange {
            let args = ExchangeBindArguments::new(&b.destination, &b.source, &b.routing_key)
                .arguments(table)
                .finish();
            self.detached(async move { ch.exchange_bind(args).await }).await
        } else {
            let args = QueueBindArguments::new(&b.destination, &b.source, &b.routing_key)
                .arguments(table)
                .finish();
            self.detached(async move { ch.queue_bind(args).await }).await
        }
    }

    async fn unbind(&self, b: &Binding) -> Result<()> {
        check_binding(b)?;
        let table = headers_to_table(&b.arguments)?;
        let ch = self.ch.clone();
        if b.destination_is_exchange {
            let args = ExchangeUnbindArguments::new(&b.destination, &b.source, &b.routing_key)
                .arguments(table)
                .finish();
            self.detached(async move { ch.exchange_unbind(args).await }).await
        } else {
            let mut args = QueueUnbindArguments::new(&b.destination, &b.source, &b.routing_key);
            args.arguments(table);
            self.detached(async move { ch.queue_unbind(args).await }).await
        }
    }

    async fn delete_exchange(&self, name: &str, if_unused: bool) -> Result<()> {
        check_short("exchange name", name)?;
        let mut args = ExchangeDeleteArguments::new(name);
        args.if_unused = if_unused;
        let ch = self.ch.clone();
        self.detached(async move { ch.exchange_delete(args).await }).await
    }

    async fn delete_queue(&self, name: &str, if_unused: bool, if_empty: bool) -> Result<u32> {
        check_short("queue name", name)?;
        let mut args = QueueDeleteArguments::new(name);
        args.if_unused = if_unused;
        args.if_empty = if_empty;
        let ch = self.ch.clone();
        Ok(self
            .detached(async move { ch.queue_delete(args).await })
            .await?
            .unwrap_or(0))
    }

    async fn purge_queue(&self, name: &str) -> Result<u32> {
        check_short("queue name", name)?;
        let args = QueuePurgeArguments::new(name);
        let ch = self.ch.clone();
        Ok(self
            .detached(async move { ch.queue_purge(args).await })
            .await?
            .unwrap_or(0))
    }

    // Not `async fn`: `#[async_trait]` would box it, and this method of
    // `AmqpChannel` returns its future unboxed.
    #[allow(clippy::manual_async_fn)]
    fn publish(
        &self,
        dest: &Destination,
        message: &Message,
        mandatory: bool,
    ) -> impl std::future::Future<Output = Result<Confirm>> + Send {
        async move {
            check_short("exchange name", dest.exchange())?;
            check_short("routing key", dest.routing_key())?;
            let props = to_basic_properties(&message.properties, &message.headers)?;
            let args = BasicPublishArguments {
                exchange: dest.exchange().to_owned(),
                routing_key: dest.routing_key().to_owned(),
                mandatory,
                immediate: false,
            };
            let body = message.body.to_vec();

            // The serialized section: the sequence number is taken and the
            // publish queued on the connection under the same lock.
            let mut seq = self.publish.lock().await;
            if let Some(e) = self.lost() {
                return Err(e);
            }
            let Some(n) = *seq else {
                return match self.ch.basic_publish(props, body, args).await {
                    Ok(()) => Ok(Confirm::ready(ConfirmOutcome::NotRequested)),
                    Err(e) => Err(self.error(e)),
                };
            };
            let confirm = self.state.confirms.register(n, dest, message, mandatory);
            match self.ch.basic_publish(props, body, args).await {
                Ok(()) => {
                    *seq = Some(n + 1);
                    if !self.ch.is_open() {
                        // Closed meanwhile: the callback may have failed the
                        // pending confirms before this one was registered.
                        self.state.confirms.fail_all(gone(&self.state, &self.conn));
                    }
                    Ok(confirm)
                }
                Err(e) => {
                    self.state.confirms.unregister(n);
                    Err(self.error(e))
                }
            }
        }
    }

    async fn consume(
        &self,
        queue: &str,
        consumer_tag: &str,
        no_ack: bool,
        exclusive: bool,
        arguments: &Headers,
    ) -> Result<ConsumerEvents> {
        check_short("queue name", queue)?;
        check_short("consumer tag", consumer_tag)?;
        let table = headers_to_table(arguments)?;
        let flag = Arc::new(AtomicU8::new(RUNNING));
        self.state
            .consumers
            .lock()
            .insert(consumer_tag.to_owned(), flag.clone());
        let args = BasicConsumeArguments::new(queue, consumer_tag)
            .manual_ack(!no_ack)
            .exclusive(exclusive)
            .arguments(table)
            .finish();
        let ch = self.ch.clone();
        let (_, rx) = match self.detached(async move { ch.basic_consume_rx(args).await }).await {
            Ok(x) => x,
            Err(e) => {
                self.state.consumers.lock().remove(consumer_tag);
                return Err(e);
            }
        };
        Ok(Box::pin(Events {
            rx,
            tag: consumer_tag.to_owned(),
            flag,
            chan: self.state.clone(),
            conn: self.conn.clone(),
            done: false,
        }))
    }

    async fn cancel(&self, consumer_tag: &str) -> Result<()> {
        check_short("consumer tag", consumer_tag)?;
        if let Some(f) = self.state.consumers.lock().get(consumer_tag) {
            let _ = f.compare_exchange(RUNNING, CLIENT_CANCELLED, Ordering::AcqRel, Ordering::Acquire);
        }
        let args = BasicCancelArguments::new(consumer_tag);
        let ch = self.ch.clone();
        self.detached(async move { ch.basic_cancel(args).await })
            .await
            .map(|_| ())
    }

    async fn get(&self, queue: &str, no_ack: bool) -> Result<Option<RawGet>> {
        check_short("queue name", queue)?;
        let mut args = BasicGetArguments::new(queue);
        args.no_ack = no_ack;
        let ch = self.ch.clone();
        let got = self.detached(async move { ch.basic_get(args).await }).await?;
        Ok(got.map(|(get_ok, props, content)| RawGet {
            delivery: RawDelivery {
                delivery_tag: get_ok.delivery_tag(),
                redelivered: get_ok.redelivered(),
                exchange: get_ok.exchange().clone(),
                routing_key: get_ok.routing_key().clone(),
                message: to_message(Some(&props), Some(content)),
            },
            message_count: get_ok.message_count(),
        }))
    }

    // Acks are asynchronous methods (no responder): cancel-safe as they are.
    // A method on a closed channel would be a connection error, so they
    // are not sent once the channel is known to be gone.

    async fn ack(&self, delivery_tag: u64, multiple: bool) -> Result<()> {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        self.ch
            .basic_ack(BasicAckArguments::new(delivery_tag, multiple))
            .await
            .map_err(|e| self.error(e))
    }

    async fn nack(&self, delivery_tag: u64, multiple: bool, requeue: bool) -> Result<()> {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        self.ch
            .basic_nack(BasicNackArguments::new(delivery_tag, multiple, requeue))
            .await
            .map_err(|e| self.error(e))
    }

    async fn reject(&self, delivery_tag: u64, requeue: bool) -> Result<()> {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        self.ch
            .basic_reject(BasicRejectArguments::new(delivery_tag, requeue))
            .await
            .map_err(|e| self.error(e))
    }

    async fn close(&self) {
        if !self.ch.is_open() || !self.ch.is_connection_open() {
            return;
        }
        let ch = self.ch.clone();
        let closing = tokio::spawn(async move {
            let _ = ch.close().await;
        });
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, closing).await;
    }
}

fn check_binding(b: &Binding) -> Result<()> {
    check_short("binding source", &b.source)?;
    check_short("binding destination", &b.destination)?;
    check_short("routing key", &b.routing_key)
}

// ---------------------------------------------------------------------------
// Consumer events
// ---------------------------------------------------------------------------

/// A consumer's deliveries from amqprs' receiver, then how it ended.
struct Events {
    rx: mpsc::UnboundedReceiver<ConsumerMessage>,
    tag: String,
    flag: Arc<AtomicU8>,
    chan: Arc<ChanShared>,
    conn: Arc<ConnShared>,
    done: bool,
}

impl Events {
    fn end(&mut self) -> Option<ConsumerEvent> {
        self.done = true;
        self.chan.consumers.lock().remove(&self.tag);
        match self.flag.load(Ordering::Acquire) {
            BROKER_CANCELLED => Some(ConsumerEvent::Cancelled),
            CLIENT_CANCELLED => None,
            _ => Some(ConsumerEvent::Closed(gone(&self.chan, &self.conn))),
        }
    }
}

fn delivery(mut m: ConsumerMessage) -> Option<RawDelivery> {
    let deliver = m.deliver.take()?;
    Some(RawDelivery {
        delivery_tag: deliver.delivery_tag(),
        redelivered: deliver.redelivered(),
        exchange: deliver.exchange().clone(),
        routing_key: deliver.routing_key().clone(),
        message: to_message(m.basic_properties.as_ref(), m.content.take()),
    })
}

impl Stream for Events {
    type Item = ConsumerEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ConsumerEvent>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(m)) => {
                    if let Some(d) = delivery(m) {
                        return Poll::Ready(Some(ConsumerEvent::Delivery(d)));
                    }
                }
                // amqprs drops the sender on basic.cancel (either side),
                // channel close and connection loss.
                Poll::Ready(None) => return Poll::Ready(self.end()),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------

#[cfg(feature = "tls")]
mod tls {
    //! amqps from the PEM material already read: a rustls configuration
    //! (ring provider, as the lapin transport uses) handed to amqprs as a
    //! ready connector, so nothing is written to disk.

    use std::sync::Arc;

    use amqprs::tls::TlsAdaptor;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use switchyard_amqp::client::{ClientError, TlsMaterial};

    fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ClientError::Other(format!("the {what} is not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(ClientError::Other(format!("the {what} holds no PEM certificate")));
        }
        Ok(certs)
    }

    /// The TLS adaptor for `host` with `m`'s CA (or the webpki roots) and
    /// client certificate (mutual TLS) when both certificate and key are set.
    pub(super) fn adaptor(host: &str, m: &TlsMaterial) -> Result<TlsAdaptor, ClientError> {
        let ca_name = m
            .ca_file
            .as_ref()
            .map(|p| format!("CA file {}", p.display()))
            .unwrap_or_else(|| "CA file".into());
        let mut roots = rustls::RootCertStore::empty();
        match &m.ca_pem {
            Some(pem) => {
                for c in certs(pem, &ca_name)? {
                    roots
                        .add(c)
                        .map_err(|e| ClientError::Other(format!("the {ca_name} holds an unusable certificate: {e}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Other(format!("TLS configuration: {e}")))?
            .with_root_certificates(roots);
        let config = match (&m.client_cert_pem, &m.client_key_pem) {
            (Some(cert), Some(key)) => {
                let chain = certs(cert, "client certificate")?;
                // Never echo the key (nor a parser message that might quote it).
                let key = PrivateKeyDer::from_pem_slice(key.expose().as_bytes())
                    .map_err(|_| ClientError::Other("the client key is not a PEM private key".into()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ClientError::Other(format!("the client certificate and key cannot be used: {e}")))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(TlsAdaptor::new(
            tokio_rustls::TlsConnector::from(Arc::new(config)),
            host.to_owned(),
        ))
    }

    #[cfg(test)]
    mod tests {
        use switchyard_core::settings::Secret;

        use super::*;

        fn err(r: Result<TlsAdaptor, ClientError>) -> String {
            match r {
                Ok(_) => panic!("expected an error"),
                Err(e) => e.to_string(),
            }
        }

        #[test]
        fn pem_material_in_memory() {
            // No CA: the webpki roots.
            assert!(adaptor("rabbit.example", &TlsMaterial::default()).is_ok());
            let bad_ca = TlsMaterial {
                ca_pem: Some("not a certificate".into()),
                ca_file: Some("/etc/ca.pem".into()),
                ..Default::default()
            };
            assert!(err(adaptor("h", &bad_ca)).contains("/etc/ca.pem"));
            let bad_client = TlsMaterial {
                client_cert_pem: Some("garbage".into()),
                client_key_pem: Some(Secret::new(
                    "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
                )),
                ..Default::default()
            };
            let e = err(adaptor("h", &bad_client));
            assert!(e.contains("client certificate"), "{e}");
            assert!(!e.contains("c2VjcmV0"), "{e}");
        }
    }
}
