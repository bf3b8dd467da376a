//! `basic.get`: one message without a consumer.
//!
//! A message taken with manual acknowledgement keeps the admin channel it
//! came on until it is settled: its ack, nack or reject goes over that
//! channel (then the channel serves later operations again), and a
//! delivery dropped unsettled closes the channel, which makes the broker
//! requeue it. After a reconnect the channel is gone: settling fails with
//! `settle_failed` (the broker already requeued the message) and can never
//! settle a delivery of another channel, since no other delivery ever
//! shares it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use async_trait::async_trait;
use switchyard_core::{Acker, Delivery, DeliveryInfo, Error, GetOk, Result};

use crate::client::{AmqpChannel, AmqpClient, AmqpConnection, ClientError, RawGet};
use crate::errors::Subject;

use super::admin::{op, run_keep};
use super::link::Live;
use super::Inner;

type Chan<C> = <<C as AmqpClient>::Connection as AmqpConnection>::Channel;

pub(crate) async fn get<C: AmqpClient>(inner: &Inner<C>, queue: &str, auto_ack: bool) -> Result<Option<GetOk>> {
    let name = inner.topology.resolve_queue(queue);
    let got = run_keep(
        inner,
        Subject::Queue(queue),
        op::BASIC_GET,
        move |ch| {
            let n = name.clone();
            Box::pin(async move {
                let r = ch.get(&n, auto_ack).await?;
                Ok(r.map(|r| (r, ch)))
            })
        },
        // The channel stays with an unsettled message.
        |r: &Option<(RawGet, Arc<Chan<C>>)>| auto_ack || r.is_none(),
    )
    .await?;
    let Some((raw, ch)) = got else { return Ok(None) };
    let d = raw.delivery;
    let info = DeliveryInfo {
        delivery_tag: d.delivery_tag,
        redelivered: d.redelivered,
        exchange: d.exchange.into(),
        routing_key: d.routing_key.into(),
        queue: queue.into(),
        consumer_tag: "".into(),
    };
    let delivery = if auto_ack {
        Delivery::auto_acked(d.message, info)
    } else {
        let live = inner
            .main
            .current
            .read()
            .as_ref()
            .map(Arc::downgrade)
            .unwrap_or_default();
        let acker = GetAcker::<C> {
            ch,
            live,
            queue: queue.to_owned(),
            settled: AtomicBool::new(false),
        };
        Delivery::new(d.message, info, Arc::new(acker))
    };
    Ok(Some(GetOk {
        delivery,
        message_count: raw.message_count,
    }))
}

/// Settles one `basic.get` delivery on the channel it came on.
struct GetAcker<C: AmqpClient> {
    ch: Arc<Chan<C>>,
    /// The connection the channel belongs to (to give the channel back).
    live: Weak<Live<C>>,
    queue: String,
    settled: AtomicBool,
}

enum How {
    Ack,
    Nack(bool),
    Reject(bool),
}

impl<C: AmqpClient> GetAcker<C> {
    async fn settle(&self, tag: u64, how: How) -> Result<()> {
        let fail = |message: String| Error::SettleFailed {
            queue: self.queue.clone(),
            delivery_tag: tag,
            message,
        };
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(fail("already settled".into()));
        }
        let live = self.live.upgrade().filter(|l| l.is_open());
        if live.is_none() || !self.ch.is_open() {
            return Err(fail(
                "the channel of this basic.get is gone (connection lost or closed): the broker requeued the message"
                    .into(),
            ));
        }
        let r: std::result::Result<(), ClientError> = match how {
            How::Ack => self.ch.ack(tag, false).await,
            How::Nack(requeue) => self.ch.nack(tag, false, requeue).await,
            How::Reject(requeue) => self.ch.reject(tag, requeue).await,
        };
        match r {
            Ok(()) => {
                // Nothing unsettled on it any more: the channel serves the
                // next operation.
                if let Some(live) = live.filter(|l| l.is_open()) {
                    if self.ch.is_open() {
                        live.admin_idle.lock().push(self.ch.clone());
                    }
                }
                Ok(())
            }
            Err(e) => Err(fail(format!("{e} (the broker requeues the message)"))),
        }
    }
}

impl<C: AmqpClient> Drop for GetAcker<C> {
    fn drop(&mut self) {
        if self.settled.load(Ordering::Acquire) || !self.ch.is_open() {
            return;
        }
        // Unsettled: closing the channel requeues the message.
        let ch = self.ch.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { ch.close().await });
        }
    }
}

#[async_trait]
impl<C: AmqpClient> Acker for GetAcker<C> {
    async fn ack(&self, tag: u64) -> Result<()> {
        self.settle(tag, How::Ack).await
    }
    async fn nack(&self, tag: u64, requeue: bool) -> Result<()> {
        self.settle(tag, How::Nack(requeue)).await
    }
    async fn reject(&self, tag: u64, requeue: bool) -> Result<()> {
        self.settle(tag, How::Reject(requeue)).await
    }
}
