//! Consumers: one channel each, QoS always set, a stream that survives
//! reconnects (the supervisor hands it the receiver of the restarted
//! consumer) and ends with `Err(ConsumerCancelled)` when the broker cancels.

use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Waker};

use amqprs::channel::{
    BasicAckArguments, BasicCancelArguments, BasicConsumeArguments, BasicNackArguments, BasicQosArguments, Channel,
    ConsumerMessage,
};
use amqprs::connection::Connection;
use async_trait::async_trait;
use bytes::Bytes;
use futures_core::Stream;
use parking_lot::Mutex;
use switchyard_amqp::coalesce::{AckCoalescer, AckSink, CoalesceConfig};
use switchyard_core::transport::Cancel;
use switchyard_core::{Acker, ConsumeOptions, Delivery, DeliveryInfo, Error, Message, Result};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::chan::{self, ChanState};
use crate::convert::{check_short, from_basic_properties};
use crate::errors::Subject;

/// Why a consumer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Cancelled by the application.
    Client,
    /// Cancelled by the broker (queue deleted, …).
    Broker,
    /// The transport was closed, or the consumer could not be restarted.
    Shutdown,
}

/// The channel a consumer currently runs on; settles its deliveries.
pub(crate) struct ChanAcker {
    pub channel: Channel,
    pub state: Arc<ChanState>,
    queue: Arc<str>,
}

impl ChanAcker {
    fn settle_error(&self, tag: u64, what: &str) -> Error {
        Error::SettleFailed {
            queue: self.queue.to_string(),
            delivery_tag: tag,
            message: format!("{what}: the channel is closed (the broker redelivers the message)"),
        }
    }
}

#[async_trait]
impl Acker for ChanAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        if !self.channel.is_open() {
            return Err(self.settle_error(tag, "ack"));
        }
        self.channel
            .basic_ack(BasicAckArguments::new(tag, false))
            .await
            .map_err(|_| self.settle_error(tag, "ack"))
    }

    async fn nack(&self, tag: u64, requeue: bool) -> Result<()> {
        if !self.channel.is_open() {
            return Err(self.settle_error(tag, "nack"));
        }
        self.channel
            .basic_nack(BasicNackArguments::new(tag, false, requeue))
            .await
            .map_err(|_| self.settle_error(tag, "nack"))
    }
}

/// The wire side of ack coalescing on one consumer channel.
struct ChanSink(Arc<ChanAcker>);

#[async_trait]
impl AckSink for ChanSink {
    async fn ack(&self, tag: u64, multiple: bool) -> Result<()> {
        let a = &self.0;
        if !a.channel.is_open() {
            return Err(a.settle_error(tag, "ack"));
        }
        a.channel
            .basic_ack(BasicAckArguments::new(tag, multiple))
            .await
            .map_err(|_| a.settle_error(tag, "ack"))
    }

    async fn nack(&self, tag: u64, multiple: bool, requeue: bool) -> Result<()> {
        let a = &self.0;
        if !a.channel.is_open() {
            return Err(a.settle_error(tag, "nack"));
        }
        a.channel
            .basic_nack(BasicNackArguments::new(tag, multiple, requeue))
            .await
            .map_err(|_| a.settle_error(tag, "nack"))
    }
}

/// The coalescer's acker for one epoch, keeping the coalescer (and through
/// its sink the channel) alive while deliveries are unsettled.
struct KeepAcker {
    epoch: Arc<dyn Acker>,
    _coalescer: AckCoalescer,
}

#[async_trait]
impl Acker for KeepAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        self.epoch.ack(tag).await
    }
    async fn nack(&self, tag: u64, requeue: bool) -> Result<()> {
        self.epoch.nack(tag, requeue).await
    }
    async fn reject(&self, tag: u64, requeue: bool) -> Result<()> {
        self.epoch.reject(tag, requeue).await
    }
}

impl Drop for KeepAcker {
    fn drop(&mut self) {
        // The last delivery of this epoch (and the stream) let go: send the
        // acks still pending before the coalescer, its sink and so the
        // channel can go away.
        if self._coalescer.pending_acks() > 0 {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let c = self._coalescer.clone();
                rt.spawn(async move {
                    let _ = c.flush().await;
                });
            }
        }
    }
}

/// What the stream switches to after a (re)start.
pub(crate) struct Generation {
    rx: UnboundedReceiver<ConsumerMessage>,
    acker: Arc<dyn Acker>,
    /// `(coalescer, epoch)` when acks are coalesced.
    coalesce: Option<(AckCoalescer, u64)>,
}

/// What a consumer's stream, its canceller and the supervisor share.
pub(crate) struct ConsumerShared {
    /// The queue as the application named it.
    pub queue: String,
    queue_arc: Arc<str>,
    /// Options (prefetch already resolved).
    pub options: ConsumeOptions,
    tag: String,
    tag_arc: Arc<str>,
    next: Mutex<Option<Generation>>,
    current: Mutex<Option<Weak<ChanAcker>>>,
    coalescer: Mutex<Option<AckCoalescer>>,
    coalesce: bool,
    end: Mutex<Option<End>>,
    waker: Mutex<Option<Waker>>,
}

impl ConsumerShared {
    /// A consumer of `queue`; `tag` is kept across restarts.
    pub fn new(queue: &str, options: ConsumeOptions, tag: String, coalesce: bool) -> Arc<Self> {
        Arc::new(ConsumerShared {
            coalescer: Mutex::new(None),
            coalesce: coalesce && !options.auto_ack,
            queue: queue.to_owned(),
            queue_arc: queue.into(),
            options,
            tag_arc: tag.as_str().into(),
            tag,
            next: Mutex::new(None),
            current: Mutex::new(None),
            end: Mutex::new(None),
            waker: Mutex::new(None),
        })
    }

    /// The consumer tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    fn wake(&self) {
        if let Some(w) = self.waker.lock().take() {
            w.wake();
        }
    }

    /// Ends the consumer for `why` (the first reason wins).
    pub fn finish(&self, why: End) {
        {
            let mut e = self.end.lock();
            if e.is_none() {
                *e = Some(why);
            }
        }
        self.wake();
    }

    /// Called by the channel callback on `basic.cancel` from the broker.
    pub fn broker_cancelled(&self) {
        tracing::warn!(queue = %self.queue, consumer = %self.tag, "consumer cancelled by the broker");
        self.finish(End::Broker);
    }

    /// True once the consumer has ended.
    pub fn ended(&self) -> bool {
        self.end.lock().is_some()
    }

    /// The channel it runs on now, if it is open.
    pub fn current_channel(&self) -> Option<Arc<ChanAcker>> {
        self.current
            .lock()
            .as_ref()
            .and_then(Weak::upgrade)
            .filter(|a| a.channel.is_open())
    }

    /// Starts (or restarts) the consumer on `conn`, consuming `queue` (the
    /// current name of the application's queue). `on_close` runs when the
    /// broker closes the channel.
    pub async fn start(
        self: &Arc<Self>,
        conn: &Connection,
        queue: &str,
        confirms: bool,
        on_close: Option<chan::OnClose>,
    ) -> Result<()> {
        check_short("queue name", queue)?;
        check_short("consumer tag", &self.tag)?;
        let state = Arc::new(ChanState {
            confirms: confirms.then(Default::default),
            ..Default::default()
        });
        *state.consumer.lock() = Some(Arc::downgrade(self));
        *state.on_close.lock() = on_close;
        let channel = chan::open(conn, state.clone()).await?;
        let subject = Subject::Queue(queue);
        channel
            .basic_qos(BasicQosArguments::new(0, self.options.prefetch, false))
            .await
            .map_err(|e| state.error(e, subject))?;
        let mut args = BasicConsumeArguments::new(queue, &self.tag);
        args.manual_ack(!self.options.auto_ack)
            .exclusive(self.options.exclusive);
        let (_tag, rx) = match channel.basic_consume_rx(args).await {
            Ok(x) => x,
            Err(e) => {
                let err = state.error(e, subject);
                let _ = channel.close().await;
                return Err(err);
            }
        };
        let acker = Arc::new(ChanAcker {
            channel,
            state,
            queue: self.queue_arc.clone(),
        });
        *self.current.lock() = Some(Arc::downgrade(&acker));
        let generation = if self.coalesce {
            let sink: Arc<dyn AckSink> = Arc::new(ChanSink(acker));
            let c = {
                let mut slot = self.coalescer.lock();
                match &*slot {
                    Some(c) => {
                        c.reset(sink);
                        c.clone()
                    }
                    None => {
                        let c = AckCoalescer::new(
                            sink,
                            CoalesceConfig::for_prefetch(self.options.prefetch),
                            self.queue_arc.clone(),
                        );
                        *slot = Some(c.clone());
                        c
                    }
                }
            };
            let epoch = c.epoch();
            Generation {
                rx,
                acker: Arc::new(KeepAcker {
                    epoch: c.acker(),
                    _coalescer: c.clone(),
                }),
                coalesce: Some((c, epoch)),
            }
        } else {
            Generation {
                rx,
                acker,
                coalesce: None,
            }
        };
        *self.next.lock() = Some(generation);
        self.wake();
        Ok(())
    }

    /// Sends the coalesced acks now (before shutdown).
    pub async fn flush_acks(&self) {
        let c = self.coalescer.lock().clone();
        if let Some(c) = c {
            let _ = c.flush().await;
        }
    }
}

/// The stream behind a consumer's `Subscription`.
pub(crate) struct ConsumerStream {
    shared: Arc<ConsumerShared>,
    rx: Option<UnboundedReceiver<ConsumerMessage>>,
    acker: Option<Arc<dyn Acker>>,
    coalesce: Option<(AckCoalescer, u64)>,
    done: bool,
    last_exchange: Arc<str>,
    last_routing_key: Arc<str>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl ConsumerStream {
    /// The stream of `shared`; `on_drop` runs when it is dropped.
    pub fn new(shared: Arc<ConsumerShared>, on_drop: Box<dyn FnOnce() + Send>) -> Self {
        ConsumerStream {
            shared,
            rx: None,
            acker: None,
            coalesce: None,
            done: false,
            last_exchange: "".into(),
            last_routing_key: "".into(),
            on_drop: Some(on_drop),
        }
    }

    fn delivery(&mut self, mut m: ConsumerMessage) -> Option<Delivery> {
        let deliver = m.deliver.take()?;
        if let Some((c, epoch)) = &self.coalesce {
            if c.epoch() != *epoch {
                // From a channel that was replaced: it cannot be settled
                // any more and the broker redelivers it.
                return None;
            }
            c.delivered(deliver.delivery_tag());
        }
        let props = m.basic_properties.take().unwrap_or_default();
        let body = m.content.take().unwrap_or_default();
        let (properties, headers) = from_basic_properties(&props);
        if *self.last_exchange != **deliver.exchange() {
            self.last_exchange = deliver.exchange().as_str().into();
        }
        if *self.last_routing_key != **deliver.routing_key() {
            self.last_routing_key = deliver.routing_key().as_str().into();
        }
        let message = Message {
            body: Bytes::from(body),
            properties,
            headers,
        };
        let info = DeliveryInfo {
            delivery_tag: deliver.delivery_tag(),
            redelivered: deliver.redelivered(),
            exchange: self.last_exchange.clone(),
            routing_key: self.last_routing_key.clone(),
            queue: self.shared.queue_arc.clone(),
            consumer_tag: self.shared.tag_arc.clone(),
        };
        Some(match (&self.acker, self.shared.options.auto_ack) {
            (Some(a), false) => Delivery::new(message, info, a.clone()),
            _ => Delivery::auto_acked(message, info),
        })
    }
}

impl Stream for ConsumerStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(None);
            }
            let next = this.shared.next.lock().take();
            if let Some(g) = next {
                // A restarted consumer: what the old channel still held can
                // no longer be settled and is redelivered anyway.
                this.rx = Some(g.rx);
                this.acker = Some(g.acker);
                this.coalesce = g.coalesce;
            }
            if let Some(rx) = this.rx.as_mut() {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(m)) => match this.delivery(m) {
                        Some(d) => return Poll::Ready(Some(Ok(d))),
                        None => continue,
                    },
                    Poll::Ready(None) => {
                        this.rx = None;
                        this.acker = None;
                        continue;
                    }
                    Poll::Pending => {
                        register(&this.shared, cx);
                        if this.shared.next.lock().is_some() {
                            continue;
                        }
                        return Poll::Pending;
                    }
                }
            }
            // No receiver: ended, or waiting for a restart.
            let end = *this.shared.end.lock();
            match end {
                Some(End::Broker) => {
                    this.done = true;
                    return Poll::Ready(Some(Err(Error::ConsumerCancelled {
                        queue: this.shared.queue.clone(),
                    })));
                }
                Some(_) => {
                    this.done = true;
                    return Poll::Ready(None);
                }
                None => {
                    register(&this.shared, cx);
                    if this.shared.next.lock().is_some() || this.shared.ended() {
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

fn register(shared: &ConsumerShared, cx: &Context<'_>) {
    let mut w = shared.waker.lock();
    match &*w {
        Some(old) if old.will_wake(cx.waker()) => {}
        _ => *w = Some(cx.waker().clone()),
    }
}

impl Drop for ConsumerStream {
    fn drop(&mut self) {
        self.shared.finish(End::Client);
        if let Some(f) = self.on_drop.take() {
            f();
        }
    }
}

/// Cancels a consumer.
pub(crate) struct Canceller {
    pub shared: Arc<ConsumerShared>,
    pub on_cancel: Box<dyn Fn() + Send + Sync>,
}

#[async_trait]
impl Cancel for Canceller {
    async fn cancel(&self) -> Result<()> {
        if self.shared.ended() {
            return Ok(());
        }
        (self.on_cancel)();
        let current = self.shared.current_channel();
        self.shared.finish(End::Client);
        let Some(acker) = current else { return Ok(()) };
        let shared = self.shared.clone();
        crate::transport::detached(async move {
            acker
                .channel
                .basic_cancel(BasicCancelArguments::new(shared.tag()))
                .await
                .map(|_| ())
                .map_err(|e| acker.state.error(e, Subject::Queue(&shared.queue)))
        })
        .await
    }
}
