//! Consumers: the per-consumer channel (settlement and cancel) and the
//! delivery stream.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures_core::Stream;
use switchyard_core::transport::{Cancel, CancelHandle, DeliveryStream};
use switchyard_core::{Acker, Delivery, DeliveryInfo, Error, Message, Result, Settlement, Subscription};

use crate::broker::{Broker, End, OutItem, Outbox, Settle};

/// One consumer's channel: settles its deliveries and cancels it. When the
/// last handle (stream, deliveries, cancel handles) is gone, its unacked
/// deliveries are requeued, as when RabbitMQ closes a channel.
pub(crate) struct Channel {
    broker: Arc<Broker>,
    cid: u64,
    outbox: Arc<Outbox>,
}

impl Drop for Channel {
    fn drop(&mut self) {
        let cid = self.cid;
        self.broker.with(|st, fx| st.release_channel(cid, fx));
    }
}

impl Channel {
    fn settle(&self, tag: u64, how: Settle) -> Result<()> {
        let cid = self.cid;
        self.broker.with(|st, fx| st.settle(cid, tag, how, fx))
    }

    /// Negatively acknowledges `tag` (a reject is the same here).
    fn nack_sync(&self, tag: u64, requeue: bool) -> Result<()> {
        self.settle(tag, if requeue { Settle::Requeue } else { Settle::Discard })
    }

    /// Acknowledges `tag`; in order, without the broker lock (see [`Outbox`]).
    fn ack_sync(&self, tag: u64) -> Result<()> {
        let o = &self.outbox;
        if o.fast_ack(tag) {
            if o.lazy {
                // The broker has not found this consumer's window full:
                // nothing is waiting for it, the next publish or dispatch
                // sees this ack (`reconcile`).
                if !o.starved.load(Ordering::SeqCst) {
                    return Ok(());
                }
                // While the application still has deliveries buffered, the
                // stream tops the window up when they run out. (SeqCst on
                // `owed` and `local_len`, here and in the stream: at least
                // one side sees the other's write, so no refill is lost.)
                o.owed.store(true, Ordering::SeqCst);
                if o.local_len.load(Ordering::SeqCst) > 0 {
                    return Ok(());
                }
            }
            let cid = self.cid;
            self.broker.with(|st, fx| st.refill(cid, fx));
            return Ok(());
        }
        self.settle(tag, Settle::Ack)
    }
}

/// Every settlement is synchronous (under the broker lock at most), so
/// [`Acker::settle_now`] always settles and no future is allocated.
#[async_trait]
impl Acker for Channel {
    async fn ack(&self, tag: u64) -> Result<()> {
        self.ack_sync(tag)
    }
    async fn nack(&self, tag: u64, requeue: bool) -> Result<()> {
        self.nack_sync(tag, requeue)
    }
    fn settle_now(&self, tag: u64, how: Settlement) -> Option<Result<()>> {
        Some(match how {
            Settlement::Ack => self.ack_sync(tag),
            Settlement::Nack { requeue } | Settlement::Reject { requeue } => self.nack_sync(tag, requeue),
        })
    }
}

#[async_trait]
impl Cancel for Channel {
    async fn cancel(&self) -> Result<()> {
        let cid = self.cid;
        self.broker.with(|st, fx| st.cancel(cid, fx));
        Ok(())
    }
}

/// The stream of a subscription: drains the consumer's outbox in batches.
struct DeliveriesStream {
    channel: Arc<Channel>,
    outbox: Arc<Outbox>,
    local: VecDeque<OutItem>,
    queue: Arc<str>,
    consumer_tag: Arc<str>,
    /// `""` (the default exchange), this consumer's own copy.
    empty: Arc<str>,
    auto_ack: bool,
    done: bool,
}

impl DeliveriesStream {
    #[inline(always)]
    fn make(&self, item: OutItem) -> Delivery {
        let info = DeliveryInfo {
            delivery_tag: item.tag,
            redelivered: item.redelivered,
            exchange: item.exchange.unwrap_or_else(|| self.empty.clone()),
            routing_key: item.routing_key.unwrap_or_else(|| self.queue.clone()),
            queue: self.queue.clone(),
            consumer_tag: self.consumer_tag.clone(),
        };
        // Unique for auto-ack deliveries (moved out); shared with the
        // broker's unacked copy otherwise (cloned here, off the broker lock).
        let message = Arc::try_unwrap(item.message).unwrap_or_else(|m| Message::clone(&m));
        if self.auto_ack {
            Delivery::auto_acked(message, info)
        } else {
            Delivery::new(message, info, self.channel.clone())
        }
    }
}

impl Stream for DeliveriesStream {
    type Item = Result<Delivery>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(item) = this.local.pop_front() {
            if this.local.is_empty() {
                this.outbox.local_len.store(0, Ordering::SeqCst);
            }
            return Poll::Ready(Some(Ok(this.make(item))));
        }
        if this.done {
            return Poll::Ready(None);
        }
        if this.outbox.owed.load(Ordering::SeqCst) {
            let cid = this.channel.cid;
            this.channel.broker.with(|st, fx| st.refill(cid, fx));
        }
        let mut o = this.outbox.inner.lock();
        if o.buf.is_empty() {
            match o.end {
                End::Open => {
                    if !o.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        o.waker = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
                End::Cancelled => {
                    this.done = true;
                    Poll::Ready(None)
                }
                End::BrokerCancelled => {
                    this.done = true;
                    Poll::Ready(Some(Err(Error::ConsumerCancelled {
                        queue: this.queue.to_string(),
                    })))
                }
            }
        } else {
            std::mem::swap(&mut o.buf, &mut this.local);
            drop(o);
            let item = this.local.pop_front().expect("swapped a non-empty buffer");
            if !this.local.is_empty() {
                this.outbox.local_len.store(this.local.len(), Ordering::SeqCst);
            }
            Poll::Ready(Some(Ok(this.make(item))))
        }
    }
}

impl Drop for DeliveriesStream {
    fn drop(&mut self) {
        // Deliveries buffered here (or still in the outbox) never reached
        // the application and no one can settle them: requeue them, and
        // cancel the consumer.
        let unseen: Vec<u64> = self.local.drain(..).map(|i| i.tag).collect();
        let cid = self.channel.cid;
        if !self.done || !unseen.is_empty() || !self.outbox.inner.lock().buf.is_empty() {
            self.channel.broker.with(|st, fx| st.stream_dropped(cid, &unseen, fx));
        }
    }
}

/// Builds the subscription of consumer `cid`.
pub(crate) fn subscription(
    broker: Arc<Broker>,
    cid: u64,
    queue: Arc<str>,
    consumer_tag: Arc<str>,
    outbox: Arc<Outbox>,
    auto_ack: bool,
) -> Subscription {
    let channel = Arc::new(Channel {
        broker,
        cid,
        outbox: outbox.clone(),
    });
    let stream = DeliveriesStream {
        channel: channel.clone(),
        outbox,
        local: VecDeque::new(),
        queue: queue.clone(),
        consumer_tag: consumer_tag.clone(),
        empty: Arc::from(""),
        auto_ack,
        done: false,
    };
    let stream: DeliveryStream = Box::pin(stream);
    Subscription::new(queue, consumer_tag, stream, CancelHandle::new(channel))
}

/// The delivery of a `basic.get`: settled through a channel of its own
/// (`channel`, the broker's inactive consumer entry and its outbox) unless
/// it was taken with auto-ack.
pub(crate) fn got(
    broker: Arc<Broker>,
    queue: Arc<str>,
    item: OutItem,
    channel: Option<(u64, Arc<Outbox>)>,
) -> Delivery {
    let info = DeliveryInfo {
        delivery_tag: item.tag,
        redelivered: item.redelivered,
        exchange: item.exchange.unwrap_or_else(|| Arc::from("")),
        routing_key: item.routing_key.unwrap_or_else(|| queue.clone()),
        queue,
        consumer_tag: Arc::from(""),
    };
    let message = Arc::try_unwrap(item.message).unwrap_or_else(|m| Message::clone(&m));
    match channel {
        Some((cid, outbox)) => Delivery::new(message, info, Arc::new(Channel { broker, cid, outbox })),
        None => Delivery::auto_acked(message, info),
    }
}
