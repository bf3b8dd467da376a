//! [`AmqpTransport`]: the switchyard transport over any [`AmqpClient`].
//!
//! Two supervised connections ("links"): the main one carries
//! declarations, consumers and RPC replies; the publish one carries the
//! publishing channels (one link serves both when
//! [`AmqpConfig::separate_connections`] is off). When a link's connection
//! drops, its supervisor reconnects with backoff; the main link then
//! re-declares the recorded topology and restarts every consumer, feeding
//! the same `Subscription`s. Publishes wait (bounded by the publish wait
//! deadline) and are sent again on the new connection until confirmed.

mod admin;
mod conns;
mod consume;
mod get;
mod link;
mod publish;

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use switchyard_core::settings::Settings;
use switchyard_core::transport::CancelHandle;
use switchyard_core::{
    Admin, Binding, Capabilities, ConsumeOptions, Consumer, DeleteIf, Destination, Error, ExchangeSpec, GetOk, Message,
    PublishOptions, Publisher, QueueInfo, QueueSpec, ReplyChannel, ReplySink, Result, Subscription, Transport,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::client::{AmqpChannel, AmqpClient, AmqpConnection};
use crate::coalesce::{AckCoalescer, AckSink, CoalesceConfig};
use crate::config::AmqpConfig;
use crate::errors::Subject;
use crate::recovery::{ConnectionState, ConsumerRegistry, StateWatch, TopologyRegistry};
use crate::DIRECT_REPLY_TO;

use consume::{CancelImpl, ChannelAcks, ConsumerShared, DeliveryStream};
use link::{map, Link, Live, Role, Stop};

/// The switchyard transport for RabbitMQ over the client library `C`.
///
/// Cheap to clone; clones share the connections. Dropping the last clone
/// closes them. `switchyard-lapin` and `switchyard-amqprs` name it
/// `LapinTransport` and `AmqprsTransport`.
pub struct AmqpTransport<C: AmqpClient> {
    inner: Arc<Inner<C>>,
}

impl<C: AmqpClient> Clone for AmqpTransport<C> {
    fn clone(&self) -> Self {
        AmqpTransport {
            inner: self.inner.clone(),
        }
    }
}

impl<C: AmqpClient> fmt::Debug for AmqpTransport<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpTransport")
            .field("client", &self.inner.client.name())
            .field("broker", &self.inner.config.describe())
            .field("state", &self.inner.main.state.get())
            .field("publish_state", &self.inner.publisher.state.get())
            .finish()
    }
}

pub(crate) struct Inner<C: AmqpClient> {
    client: C,
    config: AmqpConfig,
    main: Arc<Link<C>>,
    publisher: Arc<Link<C>>,
    topology: TopologyRegistry,
    consumers: ConsumerRegistry<Arc<ConsumerShared<C>>>,
    /// Connections of consumers kept apart from the main one.
    conns: conns::ConsumerConns<C>,
    closed: AtomicBool,
    stop: Stop,
    me: Weak<Inner<C>>,
}

impl<C: AmqpClient> Drop for Inner<C> {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        self.stop.fire();
        // Best effort: flush what consumers settled and close politely. A
        // Worker closes its subscriptions itself before it returns.
        let consumers: Vec<_> = self.consumers.entries().into_iter().map(|(_, e)| e.sink).collect();
        // One statement per lock: the two links are the same one when the
        // connections are not separate.
        let main = self.main.current.write().take();
        let publisher = if Arc::ptr_eq(&self.main, &self.publisher) {
            None
        } else {
            self.publisher.current.write().take()
        };
        let mut links: Vec<Arc<Live<C>>> = [main, publisher].into_iter().flatten().collect();
        let owned = consumers.iter().filter_map(|c| c.own.lock().take());
        for l in owned.map(|c| c.live.clone()).chain(self.conns.take_all()) {
            if !links.iter().any(|k| Arc::ptr_eq(k, &l)) {
                links.push(l);
            }
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for c in consumers {
                    if let Some(co) = c.coalescer() {
                        let _ = co.close().await;
                    }
                    c.end(None);
                }
                for l in links {
                    l.conn.close().await;
                }
            });
        }
    }
}

impl<C: AmqpClient + Default> AmqpTransport<C> {
    /// Connects as `settings` describe ([`AmqpConfig::from_settings`]).
    pub async fn connect(settings: &Settings) -> Result<Self> {
        Self::connect_with(AmqpConfig::from_settings(settings)?).await
    }

    /// Connects to `url` (`amqp://user:pass@host:port/vhost`, `amqps://…`)
    /// with default settings otherwise.
    pub async fn connect_url(url: &str) -> Result<Self> {
        Self::connect_with(AmqpConfig::from_url(url)?).await
    }

    /// Connects with an explicit configuration.
    pub async fn connect_with(config: AmqpConfig) -> Result<Self> {
        Self::connect_client(C::default(), config).await
    }
}

impl<C: AmqpClient> AmqpTransport<C> {
    /// Connects through `client` with `config`.
    pub async fn connect_client(client: C, config: AmqpConfig) -> Result<Self> {
        let main = Arc::new(Link::new(Role::Main, &config.connect, config.publish_channels));
        let publisher = if config.separate_connections {
            Arc::new(Link::new(Role::Publish, &config.connect, config.publish_channels))
        } else {
            main.clone()
        };
        let inner = Arc::new_cyclic(|me| Inner {
            client,
            config,
            main,
            publisher,
            topology: TopologyRegistry::new(),
            consumers: ConsumerRegistry::new(),
            conns: Default::default(),
            closed: AtomicBool::new(false),
            stop: Stop::new(),
            me: me.clone(),
        });
        let links = if inner.config.separate_connections {
            vec![inner.main.clone(), inner.publisher.clone()]
        } else {
            vec![inner.main.clone()]
        };
        for link in links {
            let attempts = inner.config.connection_attempts.max(1);
            let mut last = None;
            for attempt in 1..=attempts {
                match link.open(&inner.client).await {
                    Ok(live) => {
                        link.install(live);
                        last = None;
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(broker = %inner.config.describe(), attempt, attempts, error = %e, "connect failed");
                        last = Some(e);
                        if attempt < attempts {
                            tokio::time::sleep(inner.config.retry_delay).await;
                        }
                    }
                }
            }
            if let Some(e) = last {
                inner.closed.store(true, Ordering::Release);
                inner.main.state.set(ConnectionState::Closed);
                inner.publisher.state.set(ConnectionState::Closed);
                return Err(Error::ConnectionFailed {
                    message: format!("after {attempts} attempt(s): {}", link::plain(&e)),
                });
            }
            tokio::spawn(supervise(Arc::downgrade(&inner), link));
        }
        Ok(AmqpTransport { inner })
    }

    /// The state of the main connection (declarations, consumers).
    pub fn state(&self) -> ConnectionState {
        self.inner.main.state.get()
    }

    /// The state watch of the main connection: subscribe to see every
    /// change, read the generation (connects so far) and the last error.
    pub fn state_watch(&self) -> &StateWatch {
        &self.inner.main.state
    }

    /// The state watch of the publishing connection (the main one when the
    /// connections are not separate); [`ConnectionState::Blocked`] during a
    /// resource alarm.
    pub fn publish_state_watch(&self) -> &StateWatch {
        &self.inner.publisher.state
    }

    /// The configuration in use.
    pub fn config(&self) -> &AmqpConfig {
        &self.inner.config
    }

    /// The broker address without the password.
    pub fn url(&self) -> String {
        self.inner.config.describe()
    }

    /// The current broker name of `queue` (differs only for a server-named
    /// queue re-declared after a reconnect).
    pub fn resolve_queue(&self, queue: &str) -> String {
        self.inner.topology.resolve_queue(queue)
    }

    /// What the broker calls itself on the main connection (its
    /// `cluster_name`), when the client reports it.
    pub fn server_name(&self) -> Option<String> {
        self.inner
            .main
            .current
            .read()
            .as_ref()
            .and_then(|l| l.conn.server_name())
    }

    /// The node (`host:port`) the main connection (declarations, consumers)
    /// is on; `None` while disconnected.
    pub fn connected_address(&self) -> Option<String> {
        let live = self.inner.main.current.read().clone();
        live.filter(|l| l.is_open()).map(|l| l.address.clone())
    }

    /// The node (`host:port`) the publishing connection is on.
    pub fn publish_address(&self) -> Option<String> {
        let live = self.inner.publisher.current.read().clone();
        live.filter(|l| l.is_open()).map(|l| l.address.clone())
    }

    /// Moves the message at the head of `queue` to the queue `parking`
    /// (declared durable if missing): it is published there with confirms
    /// before the original is acked, so nothing is lost. The parked copy
    /// carries `x-parked-from`. Returns false when `queue` stayed empty for
    /// a second. The way out for a message one client cannot decode (see
    /// the poison-message notes in the README): run it on a client that can.
    pub async fn park_head(&self, queue: &str, parking: &str) -> Result<bool> {
        if !self.inner.config.publisher_confirms {
            return Err(Error::InvalidConfig {
                variable: "RABBITMQ_ENABLE_PUBLISHER_CONFIRMS".into(),
                value: "false".into(),
                reason: "park_head acks the original only once its copy is confirmed: enable publisher confirms".into(),
            });
        }
        self.declare_queue(&QueueSpec::new(parking)).await?;
        let mut sub = self
            .inner
            .consume(queue, ConsumeOptions::default().prefetch(1), false, None)
            .await?;
        let d = match tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => return Err(e),
            _ => {
                let _ = sub.close().await;
                return Ok(false);
            }
        };
        let mut copy = d.message.clone();
        copy.headers.insert("x-parked-from", queue);
        let mandatory = PublishOptions { mandatory: true };
        if let Err(e) = self.publish_with(&Destination::queue(parking), copy, mandatory).await {
            let _ = d.nack(true).await;
            let _ = sub.close().await;
            return Err(e);
        }
        d.ack().await?;
        sub.close().await?;
        Ok(true)
    }

    /// Declarations recorded for replay after a reconnect.
    pub fn recorded_topology(&self) -> Vec<crate::recovery::TopologyEntry> {
        self.inner.topology.entries()
    }
}

impl<C: AmqpClient> Inner<C> {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn shutdown_error(&self) -> Error {
        Error::Shutdown {
            what: format!("{} transport ({})", self.client.name(), self.config.describe()),
        }
    }

    fn deadline(&self) -> Instant {
        Instant::now() + self.config.recovery.publish_wait_timeout
    }

    /// Forgets a consumer that ended, and the declaration of its queue when
    /// the queue goes with it (exclusive, auto-delete, server-named).
    fn forget_consumer(&self, cs: &ConsumerShared<C>) {
        if let Some(id) = cs.id.lock().take() {
            self.consumers.remove(id);
        }
        if cs.temporary && !self.consumers.entries().iter().any(|(_, e)| e.sink.queue == cs.queue) {
            self.topology.remove_queue(&cs.queue);
        }
    }

    /// (Re)starts `cs` on `live`: a channel of its own, QoS, basic.consume,
    /// a fresh coalescer epoch, and a pump task feeding its stream.
    fn start_consumer<'a>(
        &'a self,
        live: &'a Arc<Live<C>>,
        cs: &'a Arc<ConsumerShared<C>>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<()>> + Send + 'a>> {
        Box::pin(self.start_consumer_now(live, cs))
    }

    /// True when `cs` gets a connection of its own: the client loses the
    /// whole connection on a delivery it cannot decode, so one queue's poison
    /// message must not take the other consumers down with it. Exclusive
    /// queues and direct reply-to belong to the main connection.
    fn isolated(&self, cs: &ConsumerShared<C>) -> bool {
        self.client.caps().decode_failure_drops_connection
            && !cs.reply
            && !self.topology.entries().iter().any(|e| {
                matches!(e, crate::recovery::TopologyEntry::Queue { spec, name } if name == &*cs.queue && spec.exclusive)
            })
    }

    async fn start_consumer_now(&self, main: &Arc<Live<C>>, cs: &Arc<ConsumerShared<C>>) -> Result<()> {
        let _guard = cs.restart.lock().await;
        if cs.cancelled.load(Ordering::Acquire) || cs.ended.load(Ordering::Acquire) {
            return Ok(());
        }
        let live = if self.isolated(cs) {
            let own = cs.own.lock().clone().filter(|c| c.live.is_open());
            match own {
                Some(c) => c.live.clone(),
                None => {
                    let alone = cs.quarantined.load(Ordering::Acquire);
                    let per = self.config.consumers_per_connection;
                    let c = self.conns.join(&self.main, &self.client, per, alone).await?;
                    cs.own_main_generation
                        .store(self.main.state.generation(), Ordering::Release);
                    let previous = cs.own.lock().replace(c.clone());
                    if let Some(p) = previous {
                        p.leave().await;
                    }
                    tokio::spawn(conns::watch_own(self.me.clone(), cs.clone(), c.clone()));
                    c.live.clone()
                }
            }
        } else {
            main.clone()
        };
        if let Some((ch, generation)) = &*cs.channel.lock() {
            if ch.is_open() && *generation == live.generation {
                return Ok(());
            }
        }
        match self.start_on(&live, cs).await {
            // A consumer's own connection that died while starting: its
            // watcher restarts it (and pauses it if that keeps happening).
            Err(e) if e.is_transient() && !live.is_open() && !Arc::ptr_eq(&live, main) => {
                tracing::debug!(queue = %cs.queue, error = %e, "consumer connection lost while starting");
                Ok(())
            }
            other => other,
        }
    }

    async fn start_on(&self, live: &Arc<Live<C>>, cs: &Arc<ConsumerShared<C>>) -> Result<()> {
        let subject = Subject::Queue(&cs.queue);
        let ch = Arc::new(live.conn.open_channel().await.map_err(|e| map(e, subject, (20, 10)))?);
        if cs.reply && self.config.publisher_confirms {
            ch.confirm_select().await.map_err(|e| map(e, subject, (85, 10)))?;
        }
        if !cs.options.auto_ack {
            ch.qos(cs.options.prefetch)
                .await
                .map_err(|e| map(e, subject, (60, 10)))?;
        }
        let queue = if cs.reply {
            DIRECT_REPLY_TO.to_owned()
        } else {
            self.topology.resolve_queue(&cs.queue)
        };
        let events = match ch
            .consume(
                &queue,
                &cs.tag,
                cs.options.auto_ack,
                cs.options.exclusive,
                &cs.options.consume_arguments(),
            )
            .await
        {
            Ok(ev) => ev,
            Err(e) => {
                ch.close().await;
                return Err(map(e, Subject::Queue(&queue), (60, 20)));
            }
        };
        let coalescer = if cs.options.auto_ack || !self.config.coalesce_acks {
            None
        } else {
            let sink: Arc<dyn AckSink> = Arc::new(ChannelAcks::<C>(ch.clone(), cs.queue.clone()));
            let mut slot = cs.coalescer.lock();
            Some(match slot.as_ref() {
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
            })
        };
        *cs.channel.lock() = Some((ch.clone(), live.generation));
        cs.started.store(true, Ordering::Release);
        tokio::spawn(consume::pump(self.me.clone(), cs.clone(), events, ch, coalescer));
        Ok(())
    }

    async fn consume(
        &self,
        queue: &str,
        mut options: ConsumeOptions,
        reply: bool,
        sink: Option<switchyard_core::ReplySink>,
    ) -> Result<Subscription> {
        if self.is_closed() {
            return Err(self.shutdown_error());
        }
        if options.prefetch == 0 {
            // Defined once for every client: never unbounded.
            options.prefetch = self.config.default_prefetch;
        }
        let tag: Arc<str> = if options.consumer_tag.is_empty() {
            format!("switchyard-{}", switchyard_core::message::new_id()).into()
        } else {
            options.consumer_tag.as_str().into()
        };
        let temporary = !reply
            && self.topology.entries().iter().any(|e| {
                matches!(e, crate::recovery::TopologyEntry::Queue { spec, name }
                    if name == queue && (spec.exclusive || spec.auto_delete || spec.name.is_empty()))
            });
        let (tx, rx) = mpsc::unbounded_channel();
        let cs = Arc::new(ConsumerShared {
            id: parking_lot::Mutex::new(None),
            queue: queue.into(),
            tag: tag.clone(),
            options: options.clone(),
            tx,
            coalescer: parking_lot::Mutex::new(None),
            channel: parking_lot::Mutex::new(None),
            restart: tokio::sync::Mutex::new(()),
            cancelled: AtomicBool::new(false),
            ended: AtomicBool::new(false),
            reply,
            reply_sink: sink,
            temporary,
            own: parking_lot::Mutex::new(None),
            quarantined: AtomicBool::new(false),
            losses: parking_lot::Mutex::new(Default::default()),
            own_main_generation: Default::default(),
            started: AtomicBool::new(false),
        });
        // Registered first, so that a recovery racing with this start
        // restarts it too (starts are serialised and skip a live channel).
        let id = self.consumers.register(queue, options, cs.clone());
        *cs.id.lock() = Some(id);
        let deadline = self.deadline();
        loop {
            let started = match self.main.wait(deadline).await {
                Ok(live) => match self.start_consumer(&live, &cs).await {
                    Ok(()) => Ok(()),
                    Err(e) if e.is_transient() && !live.is_open() => {
                        self.main.suspect().await;
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            if let Err(e) = started {
                // The caller never gets this subscription: nothing restarts it.
                if let Some(id) = cs.id.lock().take() {
                    self.consumers.remove(id);
                }
                cs.ended.store(true, Ordering::Release);
                conns::close_own(&cs).await;
                return Err(e);
            }
            break;
        }
        let cancel = CancelHandle::new(Arc::new(CancelImpl {
            inner: self.me.clone(),
            cs: cs.clone(),
        }));
        Ok(Subscription::new(
            queue.into(),
            tag,
            Box::pin(DeliveryStream { rx, done: false }),
            cancel,
        ))
    }

    /// Re-declares the topology and restarts the consumers on a fresh main connection.
    async fn recover_main(&self, live: Arc<Live<C>>) -> Result<()> {
        let declarer = admin::Replayer { live: live.clone() };
        self.topology.replay(&declarer).await?;
        for (id, entry) in self.consumers.entries() {
            let cs = entry.sink;
            match self.start_consumer(&live, &cs).await {
                Ok(()) => {}
                Err(e) if matches!(e.code(), "access_refused" | "resource_locked") => {
                    // An exclusive consumer (or queue) still held by the old
                    // connection, which the broker has not noticed is gone:
                    // retry until it has (bounded), without holding up the rest.
                    tracing::info!(queue = %cs.queue, error = %e, "exclusive consumer still held by the lost connection; retrying");
                    tokio::spawn(restart_exclusive(self.me.clone(), cs.clone(), e));
                }
                Err(e) if !e.is_transient() && !cs.started.load(Ordering::Acquire) => {
                    // Its `consume` call is still starting it (its first
                    // start met the lost connection): that call starts it
                    // again on this connection and reports this error
                    // itself, as a refused consume.
                    tracing::debug!(queue = %cs.queue, error = %e, "consumer being started could not start after reconnect; left to its consume call");
                }
                Err(e) if !e.is_transient() => {
                    tracing::warn!(queue = %cs.queue, error = %e, "consumer could not be restarted after reconnect");
                    self.consumers.remove(id);
                    cs.id.lock().take();
                    cs.end(Some(Error::ConsumerCancelled {
                        queue: cs.queue.to_string(),
                    }));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn close(&self) -> Result<()> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        for (id, c) in self.consumers.entries() {
            self.consumers.remove(id);
            let cs = c.sink;
            cs.cancelled.store(true, Ordering::Release);
            if let Some(co) = cs.coalescer() {
                let _ = co.close().await;
            }
            cs.end(None);
            conns::close_own(&cs).await;
        }
        self.stop.fire();
        for link in [&self.main, &self.publisher] {
            link.state.set(ConnectionState::Closed);
            let live = link.current.write().take();
            if let Some(l) = live {
                l.conn.close().await;
            }
        }
        Ok(())
    }

    async fn health(&self) -> Result<()> {
        if self.is_closed() {
            return Err(self.shutdown_error());
        }
        for link in [&self.main, &self.publisher] {
            let live = link.current.read().clone();
            let state = link.state.get();
            match live {
                Some(l) if l.is_open() && state.is_connected() => {
                    if let Some(reason) = l.signals.blocked_reason() {
                        return Err(Error::Blocked {
                            reason,
                            waited: Duration::ZERO,
                        });
                    }
                }
                _ => {
                    return Err(Error::connection_closed(format!(
                        "{} ({}) is {state}{}",
                        link.params.connection_name,
                        inner_nodes(&link.params),
                        link.state
                            .last_error()
                            .map(|e| format!(" (last error: {e})"))
                            .unwrap_or_default()
                    )))
                }
            }
        }
        // One round trip to prove the broker answers.
        let probe = admin::exchange_exists(self, "amq.direct");
        match tokio::time::timeout(Duration::from_secs(5), probe).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(Error::transport("the broker answered but amq.direct is missing")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout {
                operation: format!("health check of {}", self.config.describe()),
                timeout: Duration::from_secs(5),
            }),
        }
    }
}

/// Restarts an exclusive consumer that the broker still attributes to a lost
/// connection: once a second, for up to two heartbeat intervals (at least
/// 30 s) — the time the broker takes to notice the old connection is gone —
/// then ends it with the broker's error.
async fn restart_exclusive<C: AmqpClient>(weak: Weak<Inner<C>>, cs: Arc<ConsumerShared<C>>, first: Error) {
    let limit = {
        let Some(i) = weak.upgrade() else { return };
        (i.config.connect.heartbeat * 2).max(Duration::from_secs(30))
    };
    let until = Instant::now() + limit;
    let mut last = first;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(inner) = weak.upgrade() else { return };
        if inner.is_closed() || cs.cancelled.load(Ordering::Acquire) || cs.ended.load(Ordering::Acquire) {
            return;
        }
        let main = inner.main.current.read().clone();
        let Some(main) = main.filter(|l| l.is_open()) else {
            return; // the next recovery restarts it
        };
        match inner.start_consumer(&main, &cs).await {
            Ok(()) => {
                tracing::info!(queue = %cs.queue, "exclusive consumer restarted");
                return;
            }
            Err(e) if matches!(e.code(), "access_refused" | "resource_locked") || e.is_transient() => last = e,
            Err(e) => {
                last = e;
                break;
            }
        }
    }
    if let Some(inner) = weak.upgrade() {
        tracing::warn!(queue = %cs.queue, error = %last, "consumer could not be restarted after reconnect");
        inner.forget_consumer(&cs);
        cs.end(Some(last));
    }
}

fn inner_nodes(p: &crate::client::ConnectParams) -> String {
    p.addresses
        .iter()
        .map(|(h, port)| format!("{h}:{port}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Watches one link and recovers it when it drops.
async fn supervise<C: AmqpClient>(weak: Weak<Inner<C>>, link: Arc<Link<C>>) {
    let stop = match weak.upgrade() {
        Some(i) => i.stop.clone(),
        None => return,
    };
    loop {
        let Some(live) = link.current.read().clone() else {
            return;
        };
        let Some(why) = link.watch(&live, &stop).await else {
            return;
        };
        drop(live);
        let Some(inner) = weak.upgrade() else { return };
        if inner.is_closed() {
            return;
        }
        link.state.set_last_error(why.clone());
        if !inner.config.recovery.enabled {
            tracing::error!(broker = %inner.config.describe(), error = %why, "connection lost and recovery is disabled");
            inner.closed.store(true, Ordering::Release);
            link.state.set(ConnectionState::Closed);
            for (_, c) in inner.consumers.entries() {
                c.sink.end(Some(Error::connection_closed(why.clone())));
            }
            return;
        }
        let role = link.role;
        let inner2 = inner.clone();
        let outcome = link
            .reconnect(&inner.client, &inner.config.recovery, &stop, move |live| {
                let inner = inner2.clone();
                async move {
                    if role == Role::Main {
                        inner.recover_main(live).await
                    } else {
                        Ok(())
                    }
                }
            })
            .await;
        match outcome {
            Ok(Some(live)) if inner.is_closed() => {
                live.conn.close().await;
                return;
            }
            Ok(Some(live)) => link.install(live),
            Ok(None) => return,
            Err(e) => {
                tracing::error!(broker = %inner.config.describe(), error = %e, "giving up reconnecting");
                inner.closed.store(true, Ordering::Release);
                inner.main.state.set(ConnectionState::Closed);
                inner.publisher.state.set(ConnectionState::Closed);
                for (_, c) in inner.consumers.entries() {
                    c.sink.end(Some(e.clone_shallow()));
                }
                inner.stop.fire();
                return;
            }
        }
    }
}

trait CloneShallow {
    fn clone_shallow(&self) -> Error;
}

impl CloneShallow for Error {
    fn clone_shallow(&self) -> Error {
        Error::connection_closed(self.to_string())
    }
}

#[async_trait]
impl<C: AmqpClient> Publisher for AmqpTransport<C> {
    async fn publish_with(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<()> {
        publish::publish(&self.inner, &publish::Via::Pool, dest, &message, options).await
    }

    // Not the default, which would box the future of `publish_with` inside
    // its own: one allocation and one copy of a large future less per
    // publish (docs/benchmarks/amqprs.md).
    async fn publish(&self, dest: &Destination, message: Message) -> Result<()> {
        publish::publish(
            &self.inner,
            &publish::Via::Pool,
            dest,
            &message,
            PublishOptions::default(),
        )
        .await
    }

    async fn publish_batch(&self, dest: &Destination, messages: Vec<Message>) -> Result<()> {
        publish::publish_batch(&self.inner, dest, messages).await
    }
}

#[async_trait]
impl<C: AmqpClient> Consumer for AmqpTransport<C> {
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        self.inner.consume(queue, options, false, None).await
    }
    async fn get(&self, queue: &str, auto_ack: bool) -> Result<Option<GetOk>> {
        get::get(&self.inner, queue, auto_ack).await
    }
}

#[async_trait]
impl<C: AmqpClient> Admin for AmqpTransport<C> {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()> {
        admin::declare_exchange(&self.inner, spec).await
    }
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        admin::declare_queue(&self.inner, spec).await
    }
    async fn bind(&self, binding: &Binding) -> Result<()> {
        admin::bind(&self.inner, binding).await
    }
    async fn unbind(&self, binding: &Binding) -> Result<()> {
        admin::unbind(&self.inner, binding).await
    }
    async fn delete_exchange(&self, name: &str) -> Result<()> {
        admin::delete_exchange(&self.inner, name, false).await
    }
    async fn delete_queue(&self, name: &str) -> Result<u32> {
        admin::delete_queue(&self.inner, name, DeleteIf::default()).await
    }
    async fn delete_queue_if(&self, name: &str, only: DeleteIf) -> Result<u32> {
        admin::delete_queue(&self.inner, name, only).await
    }
    async fn delete_exchange_if_unused(&self, name: &str) -> Result<()> {
        admin::delete_exchange(&self.inner, name, true).await
    }
    async fn purge_queue(&self, name: &str) -> Result<u32> {
        admin::purge_queue(&self.inner, name).await
    }
    async fn queue_info(&self, name: &str) -> Result<QueueInfo> {
        admin::queue_info(&self.inner, name).await
    }
    async fn exchange_exists(&self, name: &str) -> Result<bool> {
        admin::exchange_exists(&self.inner, name).await
    }
}

/// Publishes RPC requests on the direct reply-to channel.
struct ReplyPublisher<C: AmqpClient> {
    inner: Weak<Inner<C>>,
    cs: Arc<ConsumerShared<C>>,
}

#[async_trait]
impl<C: AmqpClient> Publisher for ReplyPublisher<C> {
    async fn publish_with(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<()> {
        let inner = self.inner.upgrade().ok_or_else(|| Error::Shutdown {
            what: "AMQP transport".into(),
        })?;
        if self.cs.ended.load(Ordering::Acquire) {
            return Err(Error::connection_closed("the direct reply-to consumer has ended"));
        }
        publish::publish(&inner, &publish::Via::Reply(self.cs.clone()), dest, &message, options).await
    }
}

#[async_trait]
impl<C: AmqpClient> Transport for AmqpTransport<C> {
    fn name(&self) -> &'static str {
        self.inner.client.name()
    }

    fn capabilities(&self) -> Capabilities {
        let confirms = self.inner.config.publisher_confirms;
        Capabilities {
            publisher_confirms: confirms,
            mandatory_returns: confirms,
            // A third-party broker plugin; the kind is passed through.
            delayed_message_exchange: false,
            ..Capabilities::ALL
        }
    }

    async fn health_check(&self) -> Result<()> {
        self.inner.health().await
    }

    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }

    async fn open_reply_channel(&self) -> Result<ReplyChannel> {
        self.reply_channel(None).await
    }

    async fn open_reply_channel_with(&self, sink: ReplySink) -> Result<ReplyChannel> {
        self.reply_channel(Some(sink)).await
    }
}

impl<C: AmqpClient> AmqpTransport<C> {
    /// The direct reply-to consumer and its publisher; replies go to `sink`
    /// (on the consumer's task) when given.
    async fn reply_channel(&self, sink: Option<ReplySink>) -> Result<ReplyChannel> {
        let replies = self
            .inner
            .consume(DIRECT_REPLY_TO, ConsumeOptions::default().auto_ack(true), true, sink)
            .await?;
        let cs = self
            .inner
            .consumers
            .entries()
            .into_iter()
            .find(|(_, e)| e.sink.tag.as_ref() == replies.consumer_tag())
            .map(|(_, e)| e.sink)
            .ok_or_else(|| Error::transport("the direct reply-to consumer vanished"))?;
        Ok(ReplyChannel {
            reply_to: DIRECT_REPLY_TO.to_owned(),
            replies,
            publisher: Some(Arc::new(ReplyPublisher {
                inner: self.inner.me.clone(),
                cs,
            })),
        })
    }
}
