//! [`AmqprsTransport`]: connection, supervisor (recovery), admin, and the
//! switchyard trait implementations.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use amqprs::callbacks::ConnectionCallback;
use amqprs::channel::{
    BasicPublishArguments, Channel, ExchangeBindArguments, ExchangeDeclareArguments, ExchangeDeleteArguments,
    ExchangeUnbindArguments, QueueBindArguments, QueueDeclareArguments, QueueDeleteArguments, QueuePurgeArguments,
    QueueUnbindArguments,
};
use amqprs::connection::{Connection, OpenConnectionArguments};
use amqprs::Close;
use async_trait::async_trait;
use parking_lot::RwLock;
use switchyard_amqp::recovery::{
    ConnectionState, ConsumerRegistry, StateWatch, TopologyDeclarer, TopologyRegistry, UnconfirmedPublish,
};
use switchyard_core::settings::Settings;
use switchyard_core::transport::CancelHandle;
use switchyard_core::{
    Admin, Binding, Capabilities, ConsumeOptions, Consumer, Destination, Error, ExchangeSpec, Message, PublishOptions,
    Publisher, QueueInfo, QueueSpec, ReplyChannel, Result, Subscription, Transport,
};
use tokio::sync::{Mutex as AsyncMutex, Notify, OwnedMutexGuard};
use tokio::time::Instant;

use crate::chan::{self, ChanState, OnClose};
use crate::config::AmqprsConfig;
use crate::consume::{Canceller, ConsumerShared, ConsumerStream, End};
use crate::convert::{check_short, headers_to_table, to_basic_properties};
use crate::errors::{client_error, Subject};
use crate::publish::{PubPool, Resubmit};

/// Runs `f` on its own task, so that dropping the caller's future (a
/// timeout, a `select!`) never cancels an amqprs request mid-flight: amqprs
/// then leaks responders keyed by method type (issue #196) or panics on the
/// internal acknowledgements it `unwrap`s.
pub(crate) async fn detached<T: Send + 'static>(
    f: impl std::future::Future<Output = Result<T>> + Send + 'static,
) -> Result<T> {
    tokio::spawn(f)
        .await
        .map_err(|e| Error::transport(format!("internal task failed: {e}")))?
}

/// The direct reply-to pseudo queue.
const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The switchyard transport for RabbitMQ on amqprs.
///
/// Cheap to clone (all clones share one connection). Construct it with
/// [`connect`](AmqprsTransport::connect) (from [`Settings`]),
/// [`connect_url`](AmqprsTransport::connect_url) or
/// [`connect_with`](AmqprsTransport::connect_with).
#[derive(Clone)]
pub struct AmqprsTransport {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AmqprsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqprsTransport")
            .field("broker", &self.inner.cfg.describe())
            .field("state", &self.inner.state.get())
            .finish()
    }
}

struct AdminChan {
    channel: Channel,
    state: Arc<ChanState>,
}

struct Live {
    conn: Connection,
    pubs: PubPool,
    admin: Arc<AsyncMutex<Option<AdminChan>>>,
}

pub(crate) struct Inner {
    cfg: AmqprsConfig,
    state: StateWatch,
    topology: TopologyRegistry,
    consumers: ConsumerRegistry<Arc<ConsumerShared>>,
    live: RwLock<Option<Arc<Live>>>,
    closed: AtomicBool,
    shutdown: Arc<Notify>,
    me: Weak<Inner>,
}

struct ConnCallback(StateWatch);

#[async_trait]
impl ConnectionCallback for ConnCallback {
    async fn close(&mut self, _c: &Connection, close: Close) -> std::result::Result<(), amqprs::error::Error> {
        self.0.set_last_error(format!(
            "broker closed the connection: {} {}",
            close.reply_code(),
            close.reply_text()
        ));
        Ok(())
    }
    async fn blocked(&mut self, _c: &Connection, reason: String) {
        tracing::warn!(reason = %reason, "connection blocked by the broker (resource alarm)");
    }
    async fn unblocked(&mut self, _c: &Connection) {
        tracing::info!("connection unblocked");
    }
    async fn secret_updated(&mut self, _c: &Connection) {}
}

async fn open_connection(cfg: &AmqprsConfig, state: &StateWatch) -> Result<Connection> {
    let mut args = OpenConnectionArguments::new(&cfg.host, cfg.port, &cfg.user, cfg.password.expose());
    args.virtual_host(&cfg.vhost)
        .heartbeat(cfg.heartbeat.max(1))
        .connection_name(&cfg.connection_name);
    #[cfg(feature = "tls")]
    if cfg.tls {
        // The lapin transport builds rustls with ring too; make it the
        // process default if nothing else chose one.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let adaptor =
            amqprs::tls::TlsAdaptor::without_client_auth(cfg.ca_file.as_deref(), cfg.host.clone()).map_err(|e| {
                Error::InvalidConfig {
                    variable: "RABBITMQ_CA_FILE".into(),
                    value: cfg
                        .ca_file
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    reason: format!("cannot be loaded as PEM CA certificates: {e}"),
                }
            })?;
        args.tls_adaptor(adaptor).scheme("amqps");
    }
    let conn = match tokio::time::timeout(cfg.connection_timeout, Connection::open(&args)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            return Err(Error::ConnectionFailed {
                message: format!("{}: {e}", cfg.describe()),
            })
        }
        Err(_) => {
            return Err(Error::ConnectionFailed {
                message: format!("{}: no answer within {:?}", cfg.describe(), cfg.connection_timeout),
            })
        }
    };
    conn.register_callback(ConnCallback(state.clone()))
        .await
        .map_err(client_error)?;
    Ok(conn)
}

/// Replays topology on a fresh admin channel.
struct Declarer<'a> {
    channel: &'a Channel,
    state: &'a ChanState,
}

#[async_trait]
impl TopologyDeclarer for Declarer<'_> {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()> {
        declare_exchange_on(self.channel, self.state, spec).await
    }
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<String> {
        Ok(declare_queue_on(self.channel, self.state, spec).await?.name)
    }
    async fn bind(&self, b: &Binding) -> Result<()> {
        bind_on(self.channel, self.state, b).await
    }
}

async fn declare_exchange_on(ch: &Channel, st: &ChanState, spec: &ExchangeSpec) -> Result<()> {
    check_short("exchange name", &spec.name)?;
    let mut args = ExchangeDeclareArguments::new(&spec.name, spec.kind.as_str());
    args.durable(spec.durable)
        .auto_delete(spec.auto_delete)
        .internal(spec.internal)
        .arguments(headers_to_table(&spec.arguments)?);
    ch.exchange_declare(args)
        .await
        .map_err(|e| st.error(e, Subject::Exchange(&spec.name)))
}

async fn declare_queue_on(ch: &Channel, st: &ChanState, spec: &QueueSpec) -> Result<QueueInfo> {
    check_short("queue name", &spec.name)?;
    let mut args = QueueDeclareArguments::new(&spec.name);
    args.durable(spec.durable)
        .exclusive(spec.exclusive)
        .auto_delete(spec.auto_delete)
        .arguments(headers_to_table(&spec.arguments.to_headers())?);
    match ch.queue_declare(args).await {
        Ok(Some((name, message_count, consumer_count))) => Ok(QueueInfo {
            name,
            message_count,
            consumer_count,
        }),
        Ok(None) => Err(Error::transport("queue.declare got no declare-ok")),
        Err(e) => Err(st.error(e, Subject::Queue(&spec.name))),
    }
}

async fn bind_on(ch: &Channel, st: &ChanState, b: &Binding) -> Result<()> {
    check_short("exchange name", &b.source)?;
    check_short("binding destination", &b.destination)?;
    check_short("routing key", &b.routing_key)?;
    let table = headers_to_table(&b.arguments)?;
    if b.destination_is_exchange {
        let mut args = ExchangeBindArguments::new(&b.destination, &b.source, &b.routing_key);
        args.arguments(table);
        ch.exchange_bind(args)
            .await
            .map_err(|e| st.error(e, Subject::Exchange(&b.destination)))
    } else {
        let mut args = QueueBindArguments::new(&b.destination, &b.source, &b.routing_key);
        args.arguments(table);
        ch.queue_bind(args)
            .await
            .map_err(|e| st.error(e, Subject::Queue(&b.destination)))
    }
}

/// The admin channel, held for one operation.
///
/// amqprs keys the responders of synchronous methods by method type, so a
/// request whose future is dropped mid-flight (a caller's timeout) leaves a
/// stale responder that a later request on the same channel would receive
/// (amqprs issue #196, which can panic its dispatcher). A lease whose
/// operation did not finish therefore discards the channel.
struct AdminLease {
    guard: OwnedMutexGuard<Option<AdminChan>>,
    armed: AtomicBool,
}

impl Drop for AdminLease {
    fn drop(&mut self) {
        if self.armed.load(Ordering::Relaxed) {
            *self.guard = None;
        }
    }
}

impl AdminLease {
    /// The channel, for one synchronous request; call [`done`](Self::done)
    /// once it has answered.
    fn channel(&self) -> &Channel {
        self.armed.store(true, Ordering::Relaxed);
        &self.guard.as_ref().expect("lease holds a channel").channel
    }
    /// The request finished: the channel may be reused.
    fn done(&self) {
        self.armed.store(false, Ordering::Relaxed);
    }
    fn state(&self) -> &ChanState {
        &self.guard.as_ref().expect("lease holds a channel").state
    }
    /// Maps `e` for `subject`; a closed channel is reopened next time.
    fn error(&mut self, e: amqprs::error::Error, subject: Subject<'_>) -> Error {
        let err = self.state().error(e, subject);
        *self.guard = None;
        err
    }
}

impl Inner {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn shutdown_error(&self) -> Error {
        Error::Shutdown {
            what: format!("amqprs transport '{}'", self.cfg.connection_name),
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.cfg.recovery.publish_wait_timeout
    }

    /// The live connection, waiting (bounded) through an outage.
    async fn live(&self, deadline: Instant) -> Result<Arc<Live>> {
        loop {
            if self.is_closed() {
                return Err(self.shutdown_error());
            }
            if let Some(l) = self.live.read().clone() {
                return Ok(l);
            }
            self.state.wait_connected(deadline).await?;
            if self.live.read().is_none() {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if Instant::now() >= deadline {
                    return Err(Error::ConnectionClosed {
                        reply: None,
                        message: "no live connection".into(),
                    });
                }
            }
        }
    }

    async fn admin(&self) -> Result<AdminLease> {
        let live = self.live(self.deadline()).await?;
        let mut guard = live.admin.clone().lock_owned().await;
        if !guard.as_ref().is_some_and(|a| a.channel.is_open()) {
            let state = Arc::new(ChanState::default());
            let channel = chan::open(&live.conn, state.clone()).await?;
            *guard = Some(AdminChan { channel, state });
        }
        Ok(AdminLease {
            guard,
            armed: AtomicBool::new(false),
        })
    }

    fn resubmitter(&self) -> Resubmit {
        let weak = self.me.clone();
        Arc::new(move |items: Vec<UnconfirmedPublish>| {
            if let Some(inner) = weak.upgrade() {
                tokio::spawn(async move {
                    for p in items {
                        inner.submit(p).await;
                    }
                });
            }
        })
    }

    /// Sends `p` on a live channel, waiting through an outage until its
    /// deadline. Its waiter learns the outcome.
    async fn submit(&self, mut p: UnconfirmedPublish) {
        loop {
            if self.is_closed() {
                let e = self.shutdown_error();
                p.complete(Err(e));
                return;
            }
            if p.is_abandoned() {
                let e = p.deadline_error("no live connection before the deadline");
                p.complete(Err(e));
                return;
            }
            let live = match self.live(p.deadline).await {
                Ok(l) => l,
                Err(e) => {
                    p.complete(Err(e));
                    return;
                }
            };
            match live.pubs.pick().await {
                Ok(ch) => match ch.send(p).await {
                    Ok(()) => return,
                    Err(back) => {
                        p = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                },
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    fn consumer_hook(&self, shared: &Arc<ConsumerShared>) -> OnClose {
        let weak_inner = self.me.clone();
        let weak_shared = Arc::downgrade(shared);
        Box::new(move |code, text| {
            let (Some(inner), Some(shared)) = (weak_inner.upgrade(), weak_shared.upgrade()) else {
                return;
            };
            if code == 320 || shared.ended() {
                return; // connection-level: the supervisor restarts it
            }
            tracing::warn!(queue = %shared.queue, code, text = %text, "consumer channel closed; restarting it");
            tokio::spawn(async move {
                if let Err(e) = inner.start_consumer(&shared).await {
                    tracing::warn!(queue = %shared.queue, error = %e, "consumer could not be restarted");
                    shared.finish(End::Broker);
                }
            });
        })
    }

    async fn start_consumer(&self, shared: &Arc<ConsumerShared>) -> Result<()> {
        let live = self.live(self.deadline()).await?;
        let queue = if shared.queue == DIRECT_REPLY_TO {
            shared.queue.clone()
        } else {
            self.topology.resolve_queue(&shared.queue)
        };
        shared
            .start(&live.conn, &queue, false, Some(self.consumer_hook(shared)))
            .await
    }

    async fn consume_inner(
        &self,
        queue: &str,
        mut options: ConsumeOptions,
    ) -> Result<(Subscription, Arc<ConsumerShared>)> {
        if self.is_closed() {
            return Err(self.shutdown_error());
        }
        check_short("queue name", queue)?;
        if options.prefetch == 0 {
            options.prefetch = self.cfg.default_prefetch;
        }
        if options.consumer_tag.is_empty() {
            options.consumer_tag = format!("sy-amqprs-{}", &switchyard_core::message::new_id()[..16]);
        }
        check_short("consumer tag", &options.consumer_tag)?;
        let tag = options.consumer_tag.clone();
        let shared = ConsumerShared::new(queue, options.clone(), tag.clone(), self.cfg.coalesce_acks);
        self.start_consumer(&shared).await?;
        let id = self.consumers.register(queue, options, shared.clone());
        let weak = self.me.clone();
        let on_drop = Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.consumers.remove(id);
            }
        });
        let weak = self.me.clone();
        let on_cancel = Box::new(move || {
            if let Some(inner) = weak.upgrade() {
                inner.consumers.remove(id);
            }
        });
        let stream = ConsumerStream::new(shared.clone(), on_drop);
        let cancel = Canceller {
            shared: shared.clone(),
            on_cancel,
        };
        let sub = Subscription::new(
            queue.into(),
            tag.into(),
            Box::pin(stream),
            CancelHandle::new(Arc::new(cancel)),
        );
        Ok((sub, shared))
    }

    async fn build_live(&self, conn: Connection) -> Result<Arc<Live>> {
        let pubs = PubPool::open(
            &conn,
            self.cfg.publisher_channels,
            self.cfg.publisher_confirms,
            self.resubmitter(),
        )
        .await?;
        Ok(Arc::new(Live {
            conn,
            pubs,
            admin: Arc::new(AsyncMutex::new(None)),
        }))
    }

    /// After a reconnect: topology, publishing pool, consumers, then the
    /// publishes the old connection left unconfirmed.
    async fn restore(&self, conn: Connection) -> Result<()> {
        {
            let state = Arc::new(ChanState::default());
            let channel = chan::open(&conn, state.clone()).await?;
            let d = Declarer {
                channel: &channel,
                state: &state,
            };
            if let Err(e) = self.topology.replay(&d).await {
                let _ = channel.close().await;
                if !conn.is_open() || matches!(e, Error::ConnectionClosed { .. }) {
                    return Err(e);
                }
                tracing::warn!(error = %e, "topology could not be fully re-declared");
            } else {
                let _ = channel.close().await;
            }
        }
        let live = self.build_live(conn).await?;
        *self.live.write() = Some(live.clone());
        for (id, entry) in self.consumers.entries() {
            let shared = entry.sink;
            if shared.ended() {
                self.consumers.remove(id);
                continue;
            }
            if let Err(e) = self.start_consumer(&shared).await {
                if !live.conn.is_open() {
                    *self.live.write() = None;
                    return Err(e);
                }
                tracing::warn!(queue = %shared.queue, error = %e, "consumer could not be restarted");
                self.consumers.remove(id);
                shared.finish(End::Broker);
            }
        }
        Ok(())
    }
}

/// Watches the connection; on loss, reconnects with backoff and restores.
async fn supervise(weak: Weak<Inner>, mut conn: Connection, shutdown: Arc<Notify>) {
    loop {
        {
            let listen = conn.listen_network_io_failure();
            tokio::pin!(listen);
            let shut = shutdown.notified();
            tokio::pin!(shut);
            loop {
                tokio::select! {
                    _ = &mut listen => break,
                    _ = &mut shut => return,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {
                        if !conn.is_open() { break; }
                        if weak.strong_count() == 0 { let _ = conn.clone().close().await; return; }
                    }
                }
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        if inner.is_closed() {
            return;
        }
        if !inner.cfg.recovery.enabled {
            inner.state.set_last_error("connection lost (recovery disabled)");
            inner.closed.store(true, Ordering::Release);
            inner.state.set(ConnectionState::Closed);
            for (_, e) in inner.consumers.entries() {
                e.sink.finish(End::Shutdown);
            }
            return;
        }
        if !inner.state.last_error().is_some_and(|e| e.starts_with("broker closed")) {
            inner
                .state
                .set_last_error("connection lost (network failure or missed heartbeats)");
        }
        inner.state.set(ConnectionState::Reconnecting { attempt: 1 });
        let old = inner.live.write().take();
        let mut again = Vec::new();
        if let Some(old) = old {
            again = old.pubs.retire_all("connection lost").await;
        }
        tracing::warn!(
            unconfirmed = again.len(),
            "connection lost; unconfirmed publishes will be republished"
        );
        let mut backoff = inner.cfg.recovery.backoff.delays();
        let mut attempt = 1u32;
        drop(inner);
        let new_conn = loop {
            let Some(inner) = weak.upgrade() else { return };
            if inner.is_closed() {
                return;
            }
            inner.state.set(ConnectionState::Reconnecting { attempt });
            match open_connection(&inner.cfg, &inner.state).await {
                Ok(c) => match inner.restore(c.clone()).await {
                    Ok(()) if inner.is_closed() => {
                        // close() ran while we were restoring.
                        let live = inner.live.write().take();
                        if let Some(l) = live {
                            l.pubs.close().await;
                        }
                        let _ = c.close().await;
                        return;
                    }
                    Ok(()) => {
                        inner.state.set(ConnectionState::Connected);
                        for p in std::mem::take(&mut again) {
                            inner.submit(p).await;
                        }
                        break c;
                    }
                    Err(e) => {
                        inner.state.set_last_error(e.to_string());
                        let _ = c.close().await;
                        // Publishes sent on the failed attempt's pool come back too.
                        let failed = inner.live.write().take();
                        if let Some(l) = failed {
                            again.extend(l.pubs.retire_all("reconnect failed").await);
                        }
                    }
                },
                Err(e) => inner.state.set_last_error(e.to_string()),
            }
            let delay = backoff.next().unwrap_or(inner.cfg.recovery.backoff.max);
            drop(inner);
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.notified() => return,
            }
        };
        conn = new_conn;
    }
}

impl AmqprsTransport {
    /// Connects with [`Settings`] (URL or parts, heartbeat, connection
    /// attempts with retry delay, prefetch, confirms).
    pub async fn connect(settings: &Settings) -> Result<Self> {
        Self::connect_with(AmqprsConfig::from_settings(settings)?).await
    }

    /// Connects to an `amqp://` URL with default settings.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect_with(AmqprsConfig::from_url(url)?).await
    }

    /// Connects with an explicit [`AmqprsConfig`].
    pub async fn connect_with(cfg: AmqprsConfig) -> Result<Self> {
        cfg.validate()?;
        detached(Self::connect_now(cfg)).await
    }

    async fn connect_now(cfg: AmqprsConfig) -> Result<Self> {
        let state = StateWatch::new(format!("amqprs:{}", cfg.connection_name));
        let mut last = None;
        let mut conn = None;
        for attempt in 1..=cfg.connection_attempts.max(1) {
            match open_connection(&cfg, &state).await {
                Ok(c) => {
                    conn = Some(c);
                    break;
                }
                Err(e) => {
                    tracing::warn!(attempt, broker = %cfg.describe(), error = %e, "connection attempt failed");
                    last = Some(e);
                    if attempt < cfg.connection_attempts {
                        tokio::time::sleep(cfg.retry_delay).await;
                    }
                }
            }
        }
        let Some(conn) = conn else {
            return Err(last.unwrap_or_else(|| Error::ConnectionFailed {
                message: cfg.describe(),
            }));
        };
        let shutdown = Arc::new(Notify::new());
        let inner = Arc::new_cyclic(|me| Inner {
            cfg,
            state,
            topology: TopologyRegistry::new(),
            consumers: ConsumerRegistry::new(),
            live: RwLock::new(None),
            closed: AtomicBool::new(false),
            shutdown: shutdown.clone(),
            me: me.clone(),
        });
        let live = inner.build_live(conn.clone()).await?;
        *inner.live.write() = Some(live);
        inner.state.set(ConnectionState::Connected);
        tokio::spawn(supervise(Arc::downgrade(&inner), conn, shutdown));
        Ok(AmqprsTransport { inner })
    }

    /// The connection state, observable (`subscribe()` for changes).
    pub fn state(&self) -> &StateWatch {
        &self.inner.state
    }

    /// The configuration in use.
    pub fn config(&self) -> &AmqprsConfig {
        &self.inner.cfg
    }

    /// Publishes not yet confirmed by the broker.
    pub fn unconfirmed(&self) -> usize {
        self.inner.live.read().as_ref().map_or(0, |l| l.pubs.unconfirmed())
    }
}

#[async_trait]
impl Publisher for AmqprsTransport {
    async fn publish_with(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<()> {
        if self.inner.is_closed() {
            return Err(self.inner.shutdown_error());
        }
        let (p, waiter) = UnconfirmedPublish::new(
            dest.clone(),
            message,
            options,
            self.inner.cfg.recovery.publish_wait_timeout,
        );
        self.inner.submit(p).await;
        waiter.wait().await
    }

    async fn publish_batch(&self, dest: &Destination, messages: Vec<Message>) -> Result<()> {
        if self.inner.is_closed() {
            return Err(self.inner.shutdown_error());
        }
        let timeout = self.inner.cfg.recovery.publish_wait_timeout;
        let mut waiters = Vec::with_capacity(messages.len());
        // One channel for the whole batch keeps it in order on the wire.
        let mut channel = None;
        for m in messages {
            let (p, w) = UnconfirmedPublish::new(dest.clone(), m, PublishOptions::default(), timeout);
            waiters.push(w);
            if channel.is_none() {
                let live = self.inner.live.read().clone();
                if let Some(live) = live {
                    channel = live.pubs.pick().await.ok();
                }
            }
            let sent = match &channel {
                Some(ch) => ch.send(p).await,
                None => Err(p),
            };
            if let Err(p) = sent {
                channel = None;
                self.inner.submit(p).await;
            }
        }
        let mut first_err = None;
        for w in waiters {
            if let Err(e) = w.wait().await {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

#[async_trait]
impl Consumer for AmqprsTransport {
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        let (inner, queue) = (self.inner.clone(), queue.to_owned());
        Ok(detached(async move { inner.consume_inner(&queue, options).await })
            .await?
            .0)
    }
}

impl AmqprsTransport {
    async fn declare_exchange_now(&self, spec: &ExchangeSpec) -> Result<()> {
        let mut lease = self.inner.admin().await?;
        let r = declare_exchange_on(lease.channel(), lease.state(), spec).await;
        lease.done();
        match r {
            Ok(()) => {
                self.inner.topology.record_exchange(spec);
                Ok(())
            }
            Err(e) => {
                *lease.guard = None;
                Err(e)
            }
        }
    }

    async fn declare_queue_now(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let mut lease = self.inner.admin().await?;
        let r = declare_queue_on(lease.channel(), lease.state(), spec).await;
        lease.done();
        match r {
            Ok(info) => {
                self.inner.topology.record_queue(spec, &info.name);
                Ok(info)
            }
            Err(e) => {
                *lease.guard = None;
                Err(e)
            }
        }
    }

    async fn bind_now(&self, binding: &Binding) -> Result<()> {
        let mut lease = self.inner.admin().await?;
        let r = bind_on(lease.channel(), lease.state(), binding).await;
        lease.done();
        match r {
            Ok(()) => {
                self.inner.topology.record_binding(binding);
                Ok(())
            }
            Err(e) => {
                *lease.guard = None;
                Err(e)
            }
        }
    }

    async fn unbind_now(&self, b: &Binding) -> Result<()> {
        check_short("exchange name", &b.source)?;
        check_short("binding destination", &b.destination)?;
        check_short("routing key", &b.routing_key)?;
        let table = headers_to_table(&b.arguments)?;
        let mut lease = self.inner.admin().await?;
        let r = if b.destination_is_exchange {
            let mut args = ExchangeUnbindArguments::new(&b.destination, &b.source, &b.routing_key);
            args.arguments(table);
            let r = lease.channel().exchange_unbind(args).await;
            lease.done();
            r.map_err(|e| lease.error(e, Subject::Exchange(&b.destination)))
        } else {
            let mut args = QueueUnbindArguments::new(&b.destination, &b.source, &b.routing_key);
            args.arguments(table);
            let r = lease.channel().queue_unbind(args).await;
            lease.done();
            r.map_err(|e| lease.error(e, Subject::Queue(&b.destination)))
        };
        if r.is_ok() {
            self.inner.topology.remove_binding(b);
        }
        r
    }

    async fn delete_exchange_now(&self, name: &str) -> Result<()> {
        check_short("exchange name", name)?;
        let mut lease = self.inner.admin().await?;
        let r = lease
            .channel()
            .exchange_delete(ExchangeDeleteArguments::new(name))
            .await;
        lease.done();
        self.inner.topology.remove_exchange(name);
        match r.map_err(|e| lease.error(e, Subject::Exchange(name))) {
            Ok(()) | Err(Error::ExchangeNotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn delete_queue_now(&self, name: &str) -> Result<u32> {
        check_short("queue name", name)?;
        let mut lease = self.inner.admin().await?;
        let r = lease.channel().queue_delete(QueueDeleteArguments::new(name)).await;
        lease.done();
        self.inner.topology.remove_queue(name);
        match r.map_err(|e| lease.error(e, Subject::Queue(name))) {
            Ok(n) => Ok(n.unwrap_or(0)),
            Err(Error::QueueNotFound { .. }) => Ok(0),
            Err(e) => Err(e),
        }
    }

    async fn purge_queue_now(&self, name: &str) -> Result<u32> {
        check_short("queue name", name)?;
        let mut lease = self.inner.admin().await?;
        let r = lease.channel().queue_purge(QueuePurgeArguments::new(name)).await;
        lease.done();
        r.map(|n| n.unwrap_or(0))
            .map_err(|e| lease.error(e, Subject::Queue(name)))
    }

    async fn queue_info_now(&self, name: &str) -> Result<QueueInfo> {
        check_short("queue name", name)?;
        let mut lease = self.inner.admin().await?;
        let mut args = QueueDeclareArguments::new(name);
        args.passive(true);
        let r = lease.channel().queue_declare(args).await;
        lease.done();
        match r {
            Ok(Some((name, message_count, consumer_count))) => Ok(QueueInfo {
                name,
                message_count,
                consumer_count,
            }),
            Ok(None) => Err(Error::transport("passive queue.declare got no declare-ok")),
            Err(e) => Err(lease.error(e, Subject::Queue(name))),
        }
    }

    async fn exchange_exists_now(&self, name: &str) -> Result<bool> {
        if name.is_empty() {
            return Ok(true);
        }
        check_short("exchange name", name)?;
        let mut lease = self.inner.admin().await?;
        let mut args = ExchangeDeclareArguments::new(name, "direct");
        args.passive(true);
        let r = lease.channel().exchange_declare(args).await;
        lease.done();
        match r {
            Ok(()) => Ok(true),
            Err(e) => match lease.error(e, Subject::Exchange(name)) {
                Error::ExchangeNotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }
}

#[async_trait]
impl Admin for AmqprsTransport {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()> {
        let (t, a) = (self.clone(), spec.clone());
        detached(async move { t.declare_exchange_now(&a).await }).await
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let (t, a) = (self.clone(), spec.clone());
        detached(async move { t.declare_queue_now(&a).await }).await
    }

    async fn bind(&self, binding: &Binding) -> Result<()> {
        let (t, a) = (self.clone(), binding.clone());
        detached(async move { t.bind_now(&a).await }).await
    }

    async fn unbind(&self, b: &Binding) -> Result<()> {
        let (t, a) = (self.clone(), b.clone());
        detached(async move { t.unbind_now(&a).await }).await
    }

    async fn delete_exchange(&self, name: &str) -> Result<()> {
        let (t, a) = (self.clone(), name.to_owned());
        detached(async move { t.delete_exchange_now(&a).await }).await
    }

    async fn delete_queue(&self, name: &str) -> Result<u32> {
        let (t, a) = (self.clone(), name.to_owned());
        detached(async move { t.delete_queue_now(&a).await }).await
    }

    async fn purge_queue(&self, name: &str) -> Result<u32> {
        let (t, a) = (self.clone(), name.to_owned());
        detached(async move { t.purge_queue_now(&a).await }).await
    }

    async fn queue_info(&self, name: &str) -> Result<QueueInfo> {
        let (t, a) = (self.clone(), name.to_owned());
        detached(async move { t.queue_info_now(&a).await }).await
    }

    async fn exchange_exists(&self, name: &str) -> Result<bool> {
        let (t, a) = (self.clone(), name.to_owned());
        detached(async move { t.exchange_exists_now(&a).await }).await
    }
}

/// Publishes RPC requests on the channel that consumes direct replies.
struct ReplyPublisher {
    shared: Arc<ConsumerShared>,
    inner: Weak<Inner>,
}

#[async_trait]
impl Publisher for ReplyPublisher {
    async fn publish_with(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<()> {
        check_short("exchange name", dest.exchange())?;
        check_short("routing key", dest.routing_key())?;
        let props = to_basic_properties(&message.properties, &message.headers)?;
        let wait = self
            .inner
            .upgrade()
            .map_or(Duration::from_secs(1), |i| i.cfg.recovery.publish_wait_timeout);
        let deadline = Instant::now() + wait;
        let acker = loop {
            if let Some(a) = self.shared.current_channel() {
                break a;
            }
            if self.shared.ended() || self.inner.upgrade().is_none_or(|i| i.is_closed()) || Instant::now() >= deadline {
                return Err(Error::ConnectionClosed {
                    reply: None,
                    message: "the RPC reply channel is closed".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let args = BasicPublishArguments {
            exchange: dest.exchange().to_owned(),
            routing_key: dest.routing_key().to_owned(),
            mandatory: options.mandatory,
            immediate: false,
        };
        acker
            .channel
            .basic_publish(props, message.body.to_vec(), args)
            .await
            .map_err(client_error)
    }
}

#[async_trait]
impl Transport for AmqprsTransport {
    fn name(&self) -> &'static str {
        "amqprs"
    }

    fn capabilities(&self) -> Capabilities {
        let confirms = self.inner.cfg.publisher_confirms;
        Capabilities {
            publisher_confirms: confirms,
            mandatory_returns: confirms,
            ..Capabilities::ALL
        }
    }

    async fn health_check(&self) -> Result<()> {
        if self.inner.is_closed() {
            return Err(self.inner.shutdown_error());
        }
        match self.inner.live.read().as_ref() {
            Some(l) if l.conn.is_open() => Ok(()),
            _ => Err(Error::ConnectionClosed {
                reply: None,
                message: format!(
                    "{} is {}{}",
                    self.inner.cfg.describe(),
                    self.inner.state.get(),
                    self.inner
                        .state
                        .last_error()
                        .map(|e| format!(" (last error: {e})"))
                        .unwrap_or_default()
                ),
            }),
        }
    }

    async fn close(&self) -> Result<()> {
        if self.inner.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.inner.state.set(ConnectionState::Closed);
        self.inner.shutdown.notify_waiters();
        for (_, e) in self.inner.consumers.entries() {
            e.sink.flush_acks().await;
            e.sink.finish(End::Shutdown);
        }
        let live = self.inner.live.write().take();
        if let Some(live) = live {
            let inner = self.inner.clone();
            detached(async move {
                let again = live.pubs.retire_all("transport closed").await;
                for p in again {
                    let e = inner.shutdown_error();
                    p.complete(Err(e));
                }
                live.pubs.close().await;
                let _ = live.conn.clone().close().await;
                Ok(())
            })
            .await?;
        }
        Ok(())
    }

    async fn open_reply_channel(&self) -> Result<ReplyChannel> {
        let opts = ConsumeOptions::default()
            .auto_ack(true)
            .prefetch(self.inner.cfg.default_prefetch);
        let inner = self.inner.clone();
        let (replies, shared) = detached(async move { inner.consume_inner(DIRECT_REPLY_TO, opts).await }).await?;
        Ok(ReplyChannel {
            reply_to: DIRECT_REPLY_TO.into(),
            replies,
            publisher: Some(Arc::new(ReplyPublisher {
                shared,
                inner: self.inner.me.clone(),
            })),
        })
    }
}

#[cfg(all(test, feature = "tls"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn amqps_to_a_plain_port_fails_cleanly() {
        // 127.0.0.1:5672 speaks plain AMQP (or nothing at all): the TLS
        // handshake must fail with connection_failed, not hang or panic.
        let mut cfg = AmqprsConfig::from_url("amqps://guest:guest@127.0.0.1:5672/").unwrap();
        cfg.connection_attempts = 1;
        cfg.connection_timeout = Duration::from_secs(5);
        let e = AmqprsTransport::connect_with(cfg).await.unwrap_err();
        assert_eq!(e.code(), "connection_failed", "{e}");
        assert!(!e.to_string().contains("guest:guest"));
    }
}
