//! Ack coalescing shared by the AMQP transports: one `multiple` ack over the
//! contiguous prefix of settled delivery tags, never past an unfinished one.
//!
//! On the broker path a consumer that awaits one ack per message is limited
//! by those round trips. An [`AckCoalescer`] (one per channel) instead
//! records which delivery tags were delivered and which were settled, and
//! sends a single `basic.ack(tag, multiple = true)` for the highest tag `T`
//! such that every delivery with a tag `≤ T` still tracked has been
//! settled with an ack. So:
//!
//! - a delivery whose handler has not finished is never acknowledged (the
//!   prefix stops right below it); settled deliveries stuck behind it are
//!   acknowledged one by one (`multiple = false`) at the flush, so what is
//!   acked is exactly what was settled, only later;
//! - acks are flushed when [`CoalesceConfig::batch`] settled acks are
//!   pending (the contiguous prefix only), when the prefetch window would
//!   stall (as many deliveries tracked as the window allows), on a short
//!   timer ([`CoalesceConfig::interval`]), and on [`AckCoalescer::flush`];
//! - a nack or reject first flushes the pending acks below it, then is sent
//!   on its own (`multiple = false`), so what is acked never changes;
//! - after a reconnect, [`AckCoalescer::reset`] starts a new epoch: settling
//!   a delivery from the lost channel fails with [`Error::SettleFailed`]
//!   (the broker redelivers it) rather than acking an unrelated delivery
//!   that reuses the tag.
//!
//! The wire operations go through an [`AckSink`], so the same code serves
//! every client library.
//!
//! ```
//! use std::sync::Arc;
//! use switchyard_amqp::coalesce::{AckCoalescer, AckSink, CoalesceConfig};
//! use switchyard_core::Result;
//!
//! struct Print;
//! #[async_trait::async_trait]
//! impl AckSink for Print {
//!     async fn ack(&self, tag: u64, multiple: bool) -> Result<()> {
//!         println!("ack {tag} multiple={multiple}");
//!         Ok(())
//!     }
//!     async fn nack(&self, tag: u64, multiple: bool, requeue: bool) -> Result<()> {
//!         println!("nack {tag} requeue={requeue}");
//!         Ok(())
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<()> {
//! let c = AckCoalescer::new(Arc::new(Print), CoalesceConfig::for_prefetch(10), "orders");
//! for tag in 1..=3 { c.delivered(tag); }
//! let acker = c.acker(); // an Arc<dyn Acker> for the deliveries of this epoch
//! acker.ack(2).await?;   // nothing sent: tag 1 is unfinished
//! acker.ack(1).await?;
//! c.flush().await?;      // sends "ack 2 multiple=true"
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use switchyard_core::transport::{Acker, Settlement};
use switchyard_core::{Error, Result};

/// The wire operations of one channel, implemented by a transport over its
/// client library.
#[async_trait]
pub trait AckSink: Send + Sync + 'static {
    /// `basic.ack(tag, multiple)`.
    async fn ack(&self, tag: u64, multiple: bool) -> Result<()>;
    /// `basic.nack(tag, multiple, requeue)` (the coalescer always sends
    /// `multiple = false`).
    async fn nack(&self, tag: u64, multiple: bool, requeue: bool) -> Result<()>;
    /// `basic.reject(tag, requeue)`; defaults to a single nack.
    async fn reject(&self, tag: u64, requeue: bool) -> Result<()> {
        self.nack(tag, false, requeue).await
    }
}

/// When an [`AckCoalescer`] flushes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoalesceConfig {
    /// Flush as soon as this many settled acks are pending (≥ 1; 1 disables
    /// coalescing).
    pub batch: usize,
    /// The consumer's prefetch window (0 = unbounded): when this many
    /// deliveries are tracked (delivered and not yet acked on the wire) the
    /// broker sends no more, so any settled prefix is flushed at once.
    pub window: usize,
    /// Flush pending acks at least this often.
    pub interval: Duration,
}

impl Default for CoalesceConfig {
    fn default() -> Self {
        CoalesceConfig::for_prefetch(0)
    }
}

impl CoalesceConfig {
    /// The configuration for a consumer with QoS `prefetch`: batches of half
    /// the window (between 1 and 256; 64 when unbounded), a 10 ms timer.
    pub fn for_prefetch(prefetch: u16) -> Self {
        let window = prefetch as usize;
        let batch = if window == 0 { 64 } else { (window / 2).clamp(1, 256) };
        CoalesceConfig {
            batch,
            window,
            interval: Duration::from_millis(10),
        }
    }
    /// Sets the flush interval.
    pub fn interval(mut self, d: Duration) -> Self {
        self.interval = d;
        self
    }
    /// Sets the batch size (at least 1).
    pub fn batch(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TagState {
    Unsettled,
    Acked,
}

struct State {
    epoch: u64,
    /// Tracked deliveries: delivered and not yet acked/nacked on the wire.
    tags: BTreeMap<u64, TagState>,
    /// Settled acks not yet sent.
    pending_acks: usize,
    sink: Arc<dyn AckSink>,
    acker: Arc<EpochAcker>,
    closed: bool,
}

struct Inner {
    queue: Arc<str>,
    config: CoalesceConfig,
    state: Mutex<State>,
    /// Serialises wire operations so that they reach the broker in the
    /// order they were decided.
    wire: tokio::sync::Mutex<()>,
    /// Wakes the timer task when the first ack becomes pending.
    wake: Arc<tokio::sync::Notify>,
}

/// Coalesces the acks of one channel (see the [module docs](self)).
///
/// Cheap to clone; clones share the state. A timer task runs while any
/// clone (or an acker handed out) lives.
#[derive(Clone)]
pub struct AckCoalescer {
    inner: Arc<Inner>,
}

impl fmt::Debug for AckCoalescer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.inner.state.lock();
        f.debug_struct("AckCoalescer")
            .field("queue", &self.inner.queue)
            .field("epoch", &s.epoch)
            .field("tracked", &s.tags.len())
            .field("pending_acks", &s.pending_acks)
            .finish()
    }
}

/// What a flush decided to send.
struct Plan {
    /// One ack for the contiguous settled prefix, `multiple` when it spans several tags.
    ack_upto: Option<(u64, bool)>,
    /// Settled tags behind an unfinished one, acked singly.
    singles: Vec<u64>,
    sink: Arc<dyn AckSink>,
}

impl AckCoalescer {
    /// A coalescer sending through `sink`, for deliveries from `queue`
    /// (named in errors). Spawns its timer on the current tokio runtime.
    pub fn new(sink: Arc<dyn AckSink>, config: CoalesceConfig, queue: impl Into<Arc<str>>) -> Self {
        let inner = Arc::new_cyclic(|weak: &Weak<Inner>| Inner {
            queue: queue.into(),
            config,
            state: Mutex::new(State {
                epoch: 0,
                tags: BTreeMap::new(),
                pending_acks: 0,
                sink,
                acker: Arc::new(EpochAcker {
                    coalescer: weak.clone(),
                    epoch: 0,
                }),
                closed: false,
            }),
            wire: tokio::sync::Mutex::new(()),
            wake: Arc::new(tokio::sync::Notify::new()),
        });
        let weak = Arc::downgrade(&inner);
        let interval = inner.config.interval;
        tokio::spawn(async move {
            loop {
                {
                    let Some(inner) = weak.upgrade() else { return };
                    let pending = {
                        let s = inner.state.lock();
                        if s.closed {
                            return;
                        }
                        s.pending_acks > 0
                    };
                    if !pending {
                        // Wait for work, re-checking now and then so the task
                        // ends once the coalescer is dropped.
                        let wake = inner.wake.clone();
                        let notified = wake.notified();
                        drop(inner);
                        let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
                        continue;
                    }
                }
                tokio::time::sleep(interval).await;
                let Some(inner) = weak.upgrade() else { return };
                let c = AckCoalescer { inner };
                if let Err(e) = c.flush().await {
                    tracing::debug!(queue = %c.inner.queue, error = %e, "timed ack flush failed");
                }
            }
        });
        AckCoalescer { inner }
    }

    /// Records that the broker delivered `tag` (call before handing the
    /// delivery to the application).
    pub fn delivered(&self, tag: u64) {
        self.inner.state.lock().tags.insert(tag, TagState::Unsettled);
    }

    /// The [`Acker`] for deliveries of the current epoch. Settling through
    /// an acker of an earlier epoch fails with [`Error::SettleFailed`].
    pub fn acker(&self) -> Arc<dyn Acker> {
        self.inner.state.lock().acker.clone()
    }

    /// The current epoch (0, then +1 per [`reset`](Self::reset)).
    pub fn epoch(&self) -> u64 {
        self.inner.state.lock().epoch
    }

    /// Deliveries tracked (delivered and not yet acked or nacked on the wire).
    pub fn tracked(&self) -> usize {
        self.inner.state.lock().tags.len()
    }

    /// Settled acks not yet sent.
    pub fn pending_acks(&self) -> usize {
        self.inner.state.lock().pending_acks
    }

    /// Starts a new epoch on a new channel (after a reconnect): forgets every
    /// tracked tag (the broker requeued them with the old channel) and sends
    /// through `sink` from now on. Ackers handed out earlier become stale.
    pub fn reset(&self, sink: Arc<dyn AckSink>) {
        let mut s = self.inner.state.lock();
        s.epoch += 1;
        s.tags.clear();
        s.pending_acks = 0;
        s.sink = sink;
        s.acker = Arc::new(EpochAcker {
            coalescer: Arc::downgrade(&self.inner),
            epoch: s.epoch,
        });
    }

    /// Flushes pending acks, then refuses further settlements of this epoch
    /// and stops the timer (the consumer is finished). Unsettled deliveries
    /// stay unacknowledged and are requeued when the channel closes.
    pub async fn close(&self) -> Result<()> {
        let r = self.flush().await;
        let mut s = self.inner.state.lock();
        s.closed = true;
        s.tags.clear();
        s.pending_acks = 0;
        drop(s);
        self.inner.wake.notify_one();
        r
    }

    /// Sends the ack for the contiguous settled prefix, if any.
    pub async fn flush(&self) -> Result<()> {
        self.flush_inner(true).await
    }

    /// Sends the prefix ack and, when `singles`, the single acks of settled
    /// deliveries stuck behind an unfinished one.
    async fn flush_inner(&self, singles: bool) -> Result<()> {
        let _wire = self.inner.wire.lock().await;
        let plan = {
            let mut s = self.inner.state.lock();
            let mut plan = Self::plan_prefix(&mut s, None);
            if singles {
                plan.singles = s
                    .tags
                    .iter()
                    .filter(|(_, st)| **st == TagState::Acked)
                    .map(|(t, _)| *t)
                    .collect();
                for t in &plan.singles {
                    s.tags.remove(t);
                }
                s.pending_acks -= plan.singles.len();
            }
            plan
        };
        Self::send_ack(&plan).await
    }

    /// Takes the contiguous settled prefix (below `below` if given) out of
    /// the state and returns the ack to send for it.
    fn plan_prefix(s: &mut State, below: Option<u64>) -> Plan {
        let mut last = None;
        let mut count = 0usize;
        for (&tag, &st) in s.tags.iter() {
            if st != TagState::Acked || below.is_some_and(|b| tag >= b) {
                break;
            }
            last = Some(tag);
            count += 1;
        }
        if let Some(t) = last {
            let rest = s.tags.split_off(&(t + 1));
            s.tags = rest;
            s.pending_acks -= count;
        }
        Plan {
            ack_upto: last.map(|t| (t, count > 1)),
            singles: Vec::new(),
            sink: s.sink.clone(),
        }
    }

    async fn send_ack(plan: &Plan) -> Result<()> {
        if let Some((tag, multiple)) = plan.ack_upto {
            plan.sink.ack(tag, multiple).await?;
        }
        for &tag in &plan.singles {
            plan.sink.ack(tag, false).await?;
        }
        Ok(())
    }

    fn stale(&self, tag: u64) -> Error {
        Error::SettleFailed {
            queue: self.inner.queue.to_string(),
            delivery_tag: tag,
            message: "the delivery belongs to a channel that was lost (connection recovered since); \
                      the broker redelivers it"
                .into(),
        }
    }

    fn unknown(&self, tag: u64) -> Error {
        Error::SettleFailed {
            queue: self.inner.queue.to_string(),
            delivery_tag: tag,
            message: "unknown or already settled delivery tag".into(),
        }
    }

    fn check(&self, s: &State, epoch: u64, tag: u64) -> Result<()> {
        if s.closed {
            return Err(Error::SettleFailed {
                queue: self.inner.queue.to_string(),
                delivery_tag: tag,
                message: "the consumer's channel is closed; the broker redelivers the message".into(),
            });
        }
        if s.epoch != epoch {
            return Err(self.stale(tag));
        }
        match s.tags.get(&tag) {
            Some(TagState::Unsettled) => Ok(()),
            _ => Err(self.unknown(tag)),
        }
    }

    /// Records the ack of `tag` of `epoch`. Returns whether a flush is due
    /// now (`Some(singles)`: see [`flush_inner`](Self::flush_inner)). With
    /// `unless_flush`, an ack that would make a flush due is not recorded
    /// (the caller takes the path that can wait for the flush).
    fn record_ack(&self, epoch: u64, tag: u64, unless_flush: bool) -> Result<Option<bool>> {
        let mut s = self.inner.state.lock();
        self.check(&s, epoch, tag)?;
        // `tag` is tracked (unsettled), so recording it keeps the count of
        // tracked tags, and the first tracked tag is settled afterwards if it
        // is `tag` or already was.
        let window_full = self.inner.config.window > 0 && s.tags.len() >= self.inner.config.window;
        let first_is_settled = s
            .tags
            .first_key_value()
            .is_some_and(|(&k, &v)| k == tag || v == TagState::Acked);
        let flush = if window_full {
            // The broker sends nothing more: ack everything settled.
            Some(true)
        } else if first_is_settled && s.pending_acks + 1 >= self.inner.config.batch {
            // A batch is ready: the contiguous prefix goes now, settled
            // deliveries behind an unfinished one wait for the timer.
            Some(false)
        } else {
            None
        };
        if unless_flush && flush.is_some() {
            return Ok(flush);
        }
        s.tags.insert(tag, TagState::Acked);
        s.pending_acks += 1;
        if s.pending_acks == 1 {
            self.inner.wake.notify_one();
        }
        Ok(flush)
    }

    /// Settles `tag` of `epoch` with an ack; flushes if a trigger is reached.
    async fn settle_ack(&self, epoch: u64, tag: u64) -> Result<()> {
        if let Some(singles) = self.record_ack(epoch, tag, false)? {
            self.flush_inner(singles).await?;
        }
        Ok(())
    }

    /// The ack of `tag` of `epoch` when no flush is due (the common case):
    /// recorded at once; `None` (nothing recorded) when one is.
    fn try_ack_now(&self, epoch: u64, tag: u64) -> Option<Result<()>> {
        match self.record_ack(epoch, tag, true) {
            Ok(None) => Some(Ok(())),
            Ok(Some(_)) => None,
            Err(e) => Some(Err(e)),
        }
    }

    /// Settles `tag` with a nack (or reject): flushes acks below it, then
    /// sends it singly.
    async fn settle_negative(&self, epoch: u64, tag: u64, requeue: bool, reject: bool) -> Result<()> {
        let _wire = self.inner.wire.lock().await;
        let plan = {
            let mut s = self.inner.state.lock();
            self.check(&s, epoch, tag)?;
            let plan = Self::plan_prefix(&mut s, Some(tag));
            s.tags.remove(&tag);
            plan
        };
        Self::send_ack(&plan).await?;
        if reject {
            plan.sink.reject(tag, requeue).await
        } else {
            plan.sink.nack(tag, false, requeue).await
        }
    }
}

/// The [`Acker`] of one epoch of an [`AckCoalescer`].
struct EpochAcker {
    coalescer: Weak<Inner>,
    epoch: u64,
}

impl EpochAcker {
    fn get(&self, tag: u64) -> Result<AckCoalescer> {
        match self.coalescer.upgrade() {
            Some(inner) => Ok(AckCoalescer { inner }),
            None => Err(Error::SettleFailed {
                queue: String::new(),
                delivery_tag: tag,
                message: "the consumer is gone; the broker redelivers the message".into(),
            }),
        }
    }
}

#[async_trait]
impl Acker for EpochAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        self.get(tag)?.settle_ack(self.epoch, tag).await
    }
    async fn nack(&self, tag: u64, requeue: bool) -> Result<()> {
        self.get(tag)?.settle_negative(self.epoch, tag, requeue, false).await
    }
    async fn reject(&self, tag: u64, requeue: bool) -> Result<()> {
        self.get(tag)?.settle_negative(self.epoch, tag, requeue, true).await
    }
    /// An ack that makes no flush due is only recorded: settled at once,
    /// without a future. Nacks and rejects go on the wire, so they wait.
    fn settle_now(&self, tag: u64, how: Settlement) -> Option<Result<()>> {
        if how != Settlement::Ack {
            return None;
        }
        match self.get(tag) {
            Ok(c) => c.try_ack_now(self.epoch, tag),
            Err(e) => Some(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Op {
        Ack(u64, bool),
        Nack(u64, bool),
        Reject(u64, bool),
    }

    #[derive(Default)]
    struct Recorder(Mutex<Vec<Op>>);

    #[async_trait]
    impl AckSink for Recorder {
        async fn ack(&self, tag: u64, multiple: bool) -> Result<()> {
            self.0.lock().push(Op::Ack(tag, multiple));
            Ok(())
        }
        async fn nack(&self, tag: u64, multiple: bool, requeue: bool) -> Result<()> {
            assert!(!multiple, "nacks are sent singly");
            self.0.lock().push(Op::Nack(tag, requeue));
            Ok(())
        }
        async fn reject(&self, tag: u64, requeue: bool) -> Result<()> {
            self.0.lock().push(Op::Reject(tag, requeue));
            Ok(())
        }
    }

    fn setup(config: CoalesceConfig) -> (AckCoalescer, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        (AckCoalescer::new(rec.clone(), config, "q"), rec)
    }

    /// Acks flushed in batches of 3 (no timer), tags 1..=10 delivered.
    fn batch_of_three_with_ten_delivered() -> (AckCoalescer, Arc<Recorder>, Arc<dyn Acker>) {
        let (c, rec) = setup(
            CoalesceConfig::for_prefetch(0)
                .batch(3)
                .interval(Duration::from_secs(3600)),
        );
        for t in 1..=10 {
            c.delivered(t);
        }
        let a = c.acker();
        (c, rec, a)
    }

    fn slow() -> CoalesceConfig {
        CoalesceConfig::for_prefetch(0)
            .batch(1000)
            .interval(Duration::from_secs(3600))
    }

    #[tokio::test]
    async fn never_acks_past_an_unfinished_delivery() {
        let (c, rec) = setup(slow());
        for t in 1..=5 {
            c.delivered(t);
        }
        let a = c.acker();
        a.ack(1).await.unwrap();
        a.ack(2).await.unwrap();
        a.ack(4).await.unwrap();
        a.ack(5).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(
            *rec.0.lock(),
            vec![Op::Ack(2, true), Op::Ack(4, false), Op::Ack(5, false)],
            "a multiple ack below the unfinished 3, single acks above it"
        );
        assert_eq!(c.tracked(), 1);
        c.flush().await.unwrap();
        assert_eq!(rec.0.lock().len(), 3, "nothing more while 3 is unfinished");
        a.ack(3).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(rec.0.lock()[3], Op::Ack(3, false));
        assert_eq!(c.tracked(), 0);
        assert_eq!(c.pending_acks(), 0);
    }

    #[tokio::test]
    async fn batch_threshold_and_full_window_flush_at_once() {
        let (_c, rec, a) = batch_of_three_with_ten_delivered();
        for t in 1..=3 {
            a.ack(t).await.unwrap();
        }
        assert_eq!(*rec.0.lock(), vec![Op::Ack(3, true)]);

        let (c, rec) = setup(CoalesceConfig {
            batch: 100,
            window: 4,
            interval: Duration::from_secs(3600),
        });
        for t in 1..=4 {
            c.delivered(t);
        }
        let a = c.acker();
        a.ack(1).await.unwrap();
        assert_eq!(
            *rec.0.lock(),
            vec![Op::Ack(1, false)],
            "window full: flush the settled prefix"
        );
        c.delivered(5);
        a.ack(3).await.unwrap();
        assert_eq!(
            *rec.0.lock(),
            vec![Op::Ack(1, false), Op::Ack(3, false)],
            "window full: 3 is acked alone, 2 (unfinished) is not"
        );
    }

    #[tokio::test]
    async fn acks_settle_at_once_until_a_flush_is_due() {
        let (c, rec, a) = batch_of_three_with_ten_delivered();
        assert!(matches!(a.settle_now(2, Settlement::Ack), Some(Ok(()))));
        assert!(matches!(a.settle_now(1, Settlement::Ack), Some(Ok(()))));
        assert_eq!(c.pending_acks(), 2);
        assert!(rec.0.lock().is_empty());
        // The third makes a batch due: nothing recorded, left to the async path.
        assert!(a.settle_now(3, Settlement::Ack).is_none());
        assert_eq!(c.pending_acks(), 2);
        a.ack(3).await.unwrap();
        assert_eq!(*rec.0.lock(), vec![Op::Ack(3, true)]);
        // Behind an unfinished tag no batch is due, whatever the count.
        for t in 5..=8 {
            assert!(matches!(a.settle_now(t, Settlement::Ack), Some(Ok(()))), "tag {t}");
        }
        // Nacks go on the wire; a settled tag is an error at once.
        assert!(a.settle_now(4, Settlement::Nack { requeue: true }).is_none());
        assert!(matches!(a.settle_now(3, Settlement::Ack), Some(Err(_))));

        // A full window: the ack is left to the async path, which flushes.
        let (c, rec) = setup(CoalesceConfig {
            batch: 100,
            window: 2,
            interval: Duration::from_secs(3600),
        });
        c.delivered(1);
        c.delivered(2);
        let a = c.acker();
        assert!(a.settle_now(1, Settlement::Ack).is_none());
        a.ack(1).await.unwrap();
        assert_eq!(*rec.0.lock(), vec![Op::Ack(1, false)]);
    }

    #[tokio::test]
    async fn timer_flushes_pending_acks() {
        let (c, rec) = setup(
            CoalesceConfig::for_prefetch(0)
                .batch(100)
                .interval(Duration::from_millis(5)),
        );
        c.delivered(1);
        c.delivered(2);
        c.acker().ack(1).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(*rec.0.lock(), vec![Op::Ack(1, false)]);
    }

    #[tokio::test]
    async fn nack_flushes_acks_below_then_goes_singly() {
        let (c, rec) = setup(slow());
        for t in 1..=6 {
            c.delivered(t);
        }
        let a = c.acker();
        a.ack(1).await.unwrap();
        a.ack(2).await.unwrap();
        a.ack(5).await.unwrap();
        a.nack(3, true).await.unwrap();
        assert_eq!(*rec.0.lock(), vec![Op::Ack(2, true), Op::Nack(3, true)]);
        a.reject(4, false).await.unwrap();
        c.flush().await.unwrap();
        assert_eq!(
            *rec.0.lock(),
            vec![
                Op::Ack(2, true),
                Op::Nack(3, true),
                Op::Reject(4, false),
                Op::Ack(5, false)
            ]
        );
        assert_eq!(c.tracked(), 1);
    }

    #[tokio::test]
    async fn unknown_double_and_stale_settlements_fail() {
        let (c, rec) = setup(slow());
        c.delivered(1);
        c.delivered(2);
        let old = c.acker();
        old.ack(1).await.unwrap();
        assert_eq!(old.ack(1).await.unwrap_err().code(), "settle_failed");
        assert_eq!(old.ack(9).await.unwrap_err().code(), "settle_failed");
        let rec2 = Arc::new(Recorder::default());
        c.reset(rec2.clone());
        assert_eq!(c.epoch(), 1);
        c.delivered(1);
        let e = old.ack(2).await.unwrap_err();
        assert!(e.to_string().contains("lost"), "{e}");
        // A stale ack of tag 1 must not ack the new channel's tag 1.
        assert!(old.ack(1).await.is_err());
        c.flush().await.unwrap();
        assert!(rec.0.lock().is_empty() && rec2.0.lock().is_empty());
        c.acker().ack(1).await.unwrap();
        c.close().await.unwrap();
        assert_eq!(*rec2.0.lock(), vec![Op::Ack(1, false)]);
        assert!(rec.0.lock().is_empty());
        c.delivered(2);
        assert!(c.acker().ack(2).await.is_err(), "closed");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_settlement_acks_exactly_the_settled_set() {
        // A busy timer: exactness under concurrent flushes.
        let ops = concurrent_run(Duration::from_millis(1)).await;
        assert!(ops > 0);
        // Batches only (and the final flush): the acks are coalesced.
        let ops = concurrent_run(Duration::from_secs(3600)).await;
        assert!(ops < 2000 / 4, "acks were coalesced: {ops} wire operations");
    }

    /// Settles 2000 deliveries from concurrent tasks (every 97th nacked),
    /// checks the wire log acks exactly the acked set, returns its length.
    async fn concurrent_run(interval: Duration) -> usize {
        let (c, rec) = setup(CoalesceConfig::for_prefetch(0).batch(25).interval(interval));
        let n = 2000u64;
        for t in 1..=n {
            c.delivered(t);
        }
        let mut tasks = Vec::new();
        for t in 1..=n {
            let a = c.acker();
            tasks.push(tokio::spawn(async move {
                if t % 97 == 0 {
                    a.nack(t, false).await
                } else {
                    a.ack(t).await
                }
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        c.flush().await.unwrap();
        // Replay the wire log against a model of the broker's unacked set.
        let mut unacked: std::collections::BTreeSet<u64> = (1..=n).collect();
        let mut acked = 0;
        for op in rec.0.lock().iter() {
            match *op {
                Op::Ack(t, multiple) => {
                    assert!(unacked.contains(&t), "ack of unknown tag {t}");
                    let covered: Vec<u64> = if multiple {
                        unacked.range(..=t).copied().collect()
                    } else {
                        vec![t]
                    };
                    for x in covered {
                        assert!(x % 97 != 0, "nacked tag {x} covered by an ack");
                        unacked.remove(&x);
                        acked += 1;
                    }
                }
                Op::Nack(t, _) | Op::Reject(t, _) => assert!(unacked.remove(&t), "nack of unknown tag {t}"),
            }
        }
        assert!(unacked.is_empty(), "left unsettled: {unacked:?}");
        assert_eq!(acked, n - n / 97);
        let ops = rec.0.lock().len();
        ops
    }
}
