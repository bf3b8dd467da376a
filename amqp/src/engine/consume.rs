//! Consumers: one channel each, QoS always set, ack coalescing, a stream
//! that survives reconnects, cancel (deliveries already received stay
//! settleable) and close (flush the acks, cancel, close the channel).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use parking_lot::Mutex;
use switchyard_core::transport::Cancel;
use switchyard_core::{ConsumeOptions, Delivery, DeliveryInfo, Error, Result};
use tokio::sync::mpsc;

use crate::client::{AmqpChannel, AmqpClient, AmqpConnection, ClientError, ConsumerEvent, ConsumerEvents};
use crate::coalesce::{AckCoalescer, AckSink};
use crate::errors::Subject;

use super::link::map;
use super::Inner;

type Chan<C> = <<C as AmqpClient>::Connection as AmqpConnection>::Channel;

// `End` is sent once per consumer; boxing every delivery would cost an
// allocation per message.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Item {
    Delivery(Result<Delivery>),
    End,
}

/// A consumer as the application sees it: it survives reconnects.
pub(crate) struct ConsumerShared<C: AmqpClient> {
    pub id: Mutex<Option<crate::recovery::ConsumerId>>,
    /// The queue as the application named it.
    pub queue: Arc<str>,
    pub tag: Arc<str>,
    pub options: ConsumeOptions,
    pub tx: mpsc::UnboundedSender<Item>,
    pub coalescer: Mutex<Option<AckCoalescer>>,
    /// The current channel and the generation of the connection it is on.
    pub channel: Mutex<Option<(Arc<Chan<C>>, u64)>>,
    /// Serialises (re)starts, cancel and close.
    pub restart: tokio::sync::Mutex<()>,
    pub cancelled: AtomicBool,
    pub ended: AtomicBool,
    /// A direct reply-to consumer: its channel also publishes the requests
    /// (in confirm mode).
    pub reply: bool,
    /// Takes the deliveries of an auto-ack consumer (RPC replies) on the
    /// pump's task instead of the stream; the end still goes to the stream.
    pub reply_sink: Option<switchyard_core::ReplySink>,
    /// The queue is exclusive, auto-delete or server-named: forget its
    /// declaration once this consumer ends.
    pub temporary: bool,
    /// The consumer's connection apart from the main one (shared or its
    /// own), when the client needs consumers isolated (see
    /// [`ClientCaps::decode_failure_drops_connection`](crate::client::ClientCaps)).
    pub own: Mutex<Option<Arc<super::conns::ConsumerConn<C>>>>,
    /// A shared consumer connection was lost under it while the broker
    /// stayed up: it runs on a connection of its own from then on.
    pub quarantined: AtomicBool,
    /// When its own connection was lost while the broker stayed up.
    pub losses: Mutex<std::collections::VecDeque<tokio::time::Instant>>,
    /// The main link's generation when the own connection was opened: a
    /// reconnect of the main link meanwhile means the broker (not a
    /// message) took the connections down.
    pub own_main_generation: std::sync::atomic::AtomicU64,
    /// A `basic.consume` of it succeeded once. Until then the `consume`
    /// call that registered it is still starting it and reports why it
    /// cannot start; a recovery that fails to start it leaves it to that
    /// call instead of ending it.
    pub started: AtomicBool,
}

impl<C: AmqpClient> ConsumerShared<C> {
    pub fn end(&self, last: Option<Error>) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(e) = last {
            let _ = self.tx.send(Item::Delivery(Err(e)));
        }
        let _ = self.tx.send(Item::End);
    }

    pub fn live_channel(&self) -> Option<Arc<Chan<C>>> {
        let g = self.channel.lock();
        let (ch, _) = g.as_ref()?;
        ch.is_open().then(|| ch.clone())
    }

    pub fn coalescer(&self) -> Option<AckCoalescer> {
        self.coalescer.lock().clone()
    }

    /// Sends the pending coalesced acks and waits until they are written.
    pub async fn flush(&self) {
        if let Some(c) = self.coalescer() {
            let _ = c.flush().await;
        }
    }
}

/// The wire acks of one consumer channel.
pub(crate) struct ChannelAcks<C: AmqpClient>(pub Arc<Chan<C>>, pub Arc<str>);

impl<C: AmqpClient> ChannelAcks<C> {
    fn err(&self, tag: u64, e: ClientError) -> Error {
        Error::SettleFailed {
            queue: self.1.to_string(),
            delivery_tag: tag,
            message: format!("{e} (the broker redelivers the message)"),
        }
    }
}

#[async_trait]
impl<C: AmqpClient> AckSink for ChannelAcks<C> {
    async fn ack(&self, tag: u64, multiple: bool) -> Result<()> {
        self.0.ack(tag, multiple).await.map_err(|e| self.err(tag, e))
    }
    async fn nack(&self, tag: u64, multiple: bool, requeue: bool) -> Result<()> {
        self.0.nack(tag, multiple, requeue).await.map_err(|e| self.err(tag, e))
    }
    async fn reject(&self, tag: u64, requeue: bool) -> Result<()> {
        self.0.reject(tag, requeue).await.map_err(|e| self.err(tag, e))
    }
}

/// Settles without coalescing (when coalescing is off).
struct DirectAcker<C: AmqpClient>(ChannelAcks<C>);

#[async_trait]
impl<C: AmqpClient> switchyard_core::Acker for DirectAcker<C> {
    async fn ack(&self, tag: u64) -> Result<()> {
        AckSink::ack(&self.0, tag, false).await
    }
    async fn nack(&self, tag: u64, requeue: bool) -> Result<()> {
        AckSink::nack(&self.0, tag, false, requeue).await
    }
    async fn reject(&self, tag: u64, requeue: bool) -> Result<()> {
        AckSink::reject(&self.0, tag, requeue).await
    }
}

/// The stream behind a `Subscription`.
pub(crate) struct DeliveryStream {
    pub rx: mpsc::UnboundedReceiver<Item>,
    pub done: bool,
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

/// Cancels or closes a consumer.
pub(crate) struct CancelImpl<C: AmqpClient> {
    pub inner: Weak<Inner<C>>,
    pub cs: Arc<ConsumerShared<C>>,
}

impl<C: AmqpClient> CancelImpl<C> {
    fn forget(&self) {
        if let Some(inner) = self.inner.upgrade() {
            inner.forget_consumer(&self.cs);
        }
    }
}

#[async_trait]
impl<C: AmqpClient> Cancel for CancelImpl<C> {
    async fn cancel(&self) -> Result<()> {
        if self.cs.cancelled.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        self.forget();
        let _guard = self.cs.restart.lock().await;
        self.cs.flush().await;
        let result = match self.cs.live_channel() {
            Some(ch) => ch
                .cancel(&self.cs.tag)
                .await
                .map_err(|e| map(e, Subject::Queue(&self.cs.queue), (60, 30))),
            None => Ok(()),
        };
        self.cs.end(None);
        result
    }

    async fn close(&self) -> Result<()> {
        // Settled acks first, while the consumer still runs; then cancel so
        // no more arrive; then close the channel, which requeues whatever is
        // still unsettled.
        self.cs.flush().await;
        let r = self.cancel().await;
        let _guard = self.cs.restart.lock().await;
        if let Some(c) = self.cs.coalescer() {
            let _ = c.close().await;
        }
        let ch = self.cs.channel.lock().take();
        if let Some((ch, _)) = ch {
            ch.close().await;
        }
        super::conns::close_own(&self.cs).await;
        r
    }
}

/// Moves one consumer channel's events into the subscription's stream.
pub(crate) async fn pump<C: AmqpClient>(
    inner: Weak<Inner<C>>,
    cs: Arc<ConsumerShared<C>>,
    mut events: ConsumerEvents,
    ch: Arc<Chan<C>>,
    coalescer: Option<AckCoalescer>,
) {
    let acker: Option<Arc<dyn switchyard_core::Acker>> = if cs.options.auto_ack {
        None
    } else {
        Some(match &coalescer {
            Some(c) => c.acker(),
            None => Arc::new(DirectAcker::<C>(ChannelAcks(ch.clone(), cs.queue.clone()))),
        })
    };
    // Deliveries of one consumer mostly share exchange and routing key:
    // reuse the shared strings instead of allocating two per message.
    let mut last_exchange: Arc<str> = Arc::from("");
    let mut last_routing_key: Arc<str> = Arc::from("");
    let mut failure: Option<ClientError> = None;
    let mut broker_cancel = false;
    loop {
        // An event already at hand needs no `select!` (whose `closed()`
        // future registers and unregisters a waiter every time).
        let ready = if cs.tx.is_closed() {
            None
        } else {
            events.next().now_or_never()
        };
        let ev = match ready {
            Some(ev) => ev,
            None => tokio::select! {
                _ = cs.tx.closed() => {
                    // The application dropped the subscription: stop, flush the
                    // settled acks and close the channel (the broker requeues
                    // whatever is unsettled).
                    cs.cancelled.store(true, Ordering::Release);
                    if let Some(i) = inner.upgrade() { i.forget_consumer(&cs); }
                    let _ = ch.cancel(&cs.tag).await;
                    if let Some(c) = &coalescer { let _ = c.close().await; }
                    ch.close().await;
                    return;
                }
                ev = events.next() => ev,
            },
        };
        match ev {
            Some(ConsumerEvent::Delivery(d)) => {
                let tag = d.delivery_tag;
                if *last_exchange != *d.exchange {
                    last_exchange = d.exchange.as_str().into();
                }
                if *last_routing_key != *d.routing_key {
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
                let delivery = match (&acker, &cs.reply_sink) {
                    (Some(a), _) => {
                        if let Some(c) = &coalescer {
                            c.delivered(tag);
                        }
                        Delivery::new(d.message, info, a.clone())
                    }
                    (None, Some(sink)) => {
                        // No hop through the subscription's reader.
                        sink(d.message);
                        continue;
                    }
                    (None, None) => Delivery::auto_acked(d.message, info),
                };
                let _ = cs.tx.send(Item::Delivery(Ok(delivery)));
            }
            Some(ConsumerEvent::Cancelled) => {
                broker_cancel = true;
                break;
            }
            Some(ConsumerEvent::Closed(e)) => {
                failure = Some(e);
                break;
            }
            None => break,
        }
    }
    drop(events);
    if cs.cancelled.load(Ordering::Acquire) {
        // Cancelled by the client: settlements may still come until the
        // subscription is dropped (RabbitMQ keeps them on the channel).
        cs.tx.closed().await;
        if let Some(c) = &coalescer {
            let _ = c.close().await;
        }
        ch.close().await;
        return;
    }
    let Some(i) = inner.upgrade() else {
        cs.end(None);
        return;
    };
    if i.is_closed() {
        cs.end(None);
        return;
    }
    if broker_cancel || failure.is_none() {
        tracing::warn!(queue = %cs.queue, consumer = %cs.tag, "consumer cancelled by the broker");
        i.forget_consumer(&cs);
        cs.end(Some(Error::ConsumerCancelled {
            queue: cs.queue.to_string(),
        }));
        drop(i);
        cs.tx.closed().await;
        ch.close().await;
        return;
    }
    let e = failure.expect("checked");
    if e.is_lost() || !i.main.current.read().as_ref().is_some_and(|l| l.is_open()) {
        // The supervisor restarts every registered consumer on the new connection.
        i.main.kick.notify_one();
        return;
    }
    tracing::warn!(queue = %cs.queue, error = %e, "consumer channel closed; restarting the consumer");
    let inner = inner.clone();
    tokio::spawn(async move {
        let Some(i) = inner.upgrade() else { return };
        let live = i.main.current.read().clone();
        let Some(live) = live.filter(|l| l.is_open()) else {
            i.main.kick.notify_one();
            return;
        };
        if let Err(err) = i.start_consumer(&live, &cs).await {
            if err.is_transient() {
                i.main.kick.notify_one();
            } else {
                i.forget_consumer(&cs);
                cs.end(Some(err));
            }
        }
    });
}
