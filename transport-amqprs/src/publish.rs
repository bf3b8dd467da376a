//! Publishing channels: confirm mode, the per-channel delivery-tag sequence,
//! and the pool that spreads concurrent publishers over several channels.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use amqprs::channel::{BasicPublishArguments, Channel};
use amqprs::connection::Connection;
use switchyard_amqp::recovery::UnconfirmedPublish;
use switchyard_core::{Error, Result};

use crate::chan::{self, ChanState};
use crate::confirms::ConfirmTracker;
use crate::convert::{check_short, to_basic_properties};

struct Seq {
    /// The delivery tag the next publish gets (confirm mode numbers from 1).
    next: u64,
    /// Retired: its unconfirmed publishes were handed back; take no more.
    dead: bool,
}

/// One publishing channel.
pub(crate) struct PubChannel {
    channel: Channel,
    tracker: Option<Arc<ConfirmTracker>>,
    seq: tokio::sync::Mutex<Seq>,
}

/// What to do with publishes handed back by a retired channel.
pub(crate) type Resubmit = Arc<dyn Fn(Vec<UnconfirmedPublish>) + Send + Sync>;

impl PubChannel {
    /// Opens a publishing channel (in confirm mode when `confirms`). When the
    /// broker closes it, its unconfirmed publishes go to `resubmit` (minus
    /// those that caused the close, which fail).
    pub async fn open(conn: &Connection, confirms: bool, resubmit: Resubmit) -> Result<Arc<PubChannel>> {
        let tracker = confirms.then(|| Arc::new(ConfirmTracker::default()));
        let state = Arc::new(ChanState {
            confirms: tracker.clone(),
            ..Default::default()
        });
        let channel = chan::open(conn, state.clone()).await?;
        let pc = Arc::new(PubChannel {
            channel,
            tracker,
            seq: tokio::sync::Mutex::new(Seq { next: 1, dead: false }),
        });
        let weak: Weak<PubChannel> = Arc::downgrade(&pc);
        *state.on_close.lock() = Some(Box::new(move |code, text| {
            if let Some(pc) = weak.upgrade() {
                let resubmit = resubmit.clone();
                tokio::spawn(async move {
                    let again = pc.retire(Some(code), &text).await;
                    if !again.is_empty() {
                        resubmit(again);
                    }
                });
            }
        }));
        Ok(pc)
    }

    /// True while the channel can take publishes.
    pub fn is_usable(&self) -> bool {
        self.channel.is_open()
    }

    /// Unconfirmed publishes on this channel.
    pub fn unconfirmed(&self) -> usize {
        self.tracker.as_ref().map_or(0, |t| t.len())
    }

    /// Sends `p`. `Ok` once it is on its way (its waiter is completed by the
    /// confirm, or now without confirms, or with the error if it cannot be
    /// encoded); `Err(p)` when this channel cannot take it.
    pub async fn send(&self, p: UnconfirmedPublish) -> std::result::Result<(), UnconfirmedPublish> {
        let prepared = (|| -> Result<_> {
            check_short("exchange name", p.destination.exchange())?;
            check_short("routing key", p.destination.routing_key())?;
            let props = to_basic_properties(&p.message.properties, &p.message.headers)?;
            Ok(props)
        })();
        let props = match prepared {
            Ok(b) => b,
            Err(e) => {
                p.complete(Err(e));
                return Ok(());
            }
        };
        let args = BasicPublishArguments {
            exchange: p.destination.exchange().to_owned(),
            routing_key: p.destination.routing_key().to_owned(),
            mandatory: p.options.mandatory,
            immediate: false,
        };
        let body = p.message.body.to_vec();

        let mut seq = self.seq.lock().await;
        if seq.dead || !self.channel.is_open() {
            return Err(p);
        }
        match &self.tracker {
            Some(tracker) => {
                // The serialized section: the tag is taken and the publish
                // queued on the connection under the same lock, so tags
                // follow the wire order.
                let tag = seq.next;
                tracker.track(tag, p);
                match self.channel.basic_publish(props, body, args).await {
                    Ok(()) => {
                        seq.next += 1;
                        Ok(())
                    }
                    Err(_) => {
                        seq.dead = true;
                        match tracker.untrack(tag) {
                            Some(p) => Err(p),
                            None => Ok(()),
                        }
                    }
                }
            }
            None => match self.channel.basic_publish(props, body, args).await {
                Ok(()) => {
                    drop(seq);
                    p.complete(Ok(()));
                    Ok(())
                }
                Err(_) => {
                    seq.dead = true;
                    Err(p)
                }
            },
        }
    }

    /// Retires the channel: it takes no more publishes and hands back its
    /// unconfirmed ones (failing those that caused a channel error).
    pub async fn retire(&self, code: Option<u16>, text: &str) -> Vec<UnconfirmedPublish> {
        let mut seq = self.seq.lock().await;
        seq.dead = true;
        match &self.tracker {
            Some(t) => t.drain_after_close(code, text),
            None => Vec::new(),
        }
    }

    /// Closes the channel (used on shutdown).
    pub async fn close(&self) {
        let _ = self.channel.clone().close().await;
    }
}

struct Slot {
    current: parking_lot::Mutex<Arc<PubChannel>>,
    reopen: tokio::sync::Mutex<()>,
}

/// A pool of publishing channels on one connection.
pub(crate) struct PubPool {
    conn: Connection,
    confirms: bool,
    resubmit: Resubmit,
    slots: Vec<Slot>,
    next: AtomicUsize,
}

impl PubPool {
    /// Opens `n` publishing channels on `conn`.
    pub async fn open(conn: &Connection, n: usize, confirms: bool, resubmit: Resubmit) -> Result<PubPool> {
        let mut slots = Vec::with_capacity(n);
        for _ in 0..n.max(1) {
            let pc = PubChannel::open(conn, confirms, resubmit.clone()).await?;
            slots.push(Slot {
                current: parking_lot::Mutex::new(pc),
                reopen: tokio::sync::Mutex::new(()),
            });
        }
        Ok(PubPool {
            conn: conn.clone(),
            confirms,
            resubmit,
            slots,
            next: AtomicUsize::new(0),
        })
    }

    /// A usable channel, round robin; a channel the broker closed is
    /// replaced by a new one.
    pub async fn pick(&self) -> Result<Arc<PubChannel>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let slot = &self.slots[i];
        let pc = slot.current.lock().clone();
        if pc.is_usable() {
            return Ok(pc);
        }
        let _guard = slot.reopen.lock().await;
        let pc = slot.current.lock().clone();
        if pc.is_usable() {
            return Ok(pc);
        }
        if !self.conn.is_open() {
            return Err(Error::ConnectionClosed {
                reply: None,
                message: "the connection is closed".into(),
            });
        }
        let (conn, confirms, resubmit) = (self.conn.clone(), self.confirms, self.resubmit.clone());
        let fresh =
            crate::transport::detached(async move { PubChannel::open(&conn, confirms, resubmit).await }).await?;
        *slot.current.lock() = fresh.clone();
        let again = pc.retire(None, "channel closed").await;
        if !again.is_empty() {
            (self.resubmit)(again);
        }
        Ok(fresh)
    }

    /// Retires every channel and returns their unconfirmed publishes in
    /// order, for republishing on a new connection.
    pub async fn retire_all(&self, why: &str) -> Vec<UnconfirmedPublish> {
        let mut out = Vec::new();
        for s in &self.slots {
            let pc = s.current.lock().clone();
            out.extend(pc.retire(None, why).await);
        }
        out
    }

    /// Unconfirmed publishes over all channels.
    pub fn unconfirmed(&self) -> usize {
        self.slots.iter().map(|s| s.current.lock().unconfirmed()).sum()
    }

    /// Closes every channel.
    pub async fn close(&self) {
        for s in &self.slots {
            let pc = s.current.lock().clone();
            pc.close().await;
        }
    }
}
