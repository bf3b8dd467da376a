//! The shared broker state and every operation on it.
//!
//! One `parking_lot` mutex guards the whole topology and all queues; every
//! operation holds it briefly and never across an `.await`. Deliveries go
//! to each consumer's [`Outbox`], which has its own small lock, so a
//! consumer drains a whole batch without touching the broker lock, and is
//! woken once per batch (when its outbox goes from empty to non-empty).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::Waker;
use std::time::Duration;

use tokio::time::Instant;

use parking_lot::Mutex;
use switchyard_core::message::unix_now;
use switchyard_core::{
    Binding, ConsumeOptions, Error, ExchangeKind, ExchangeSpec, HeaderValue, Headers, Message, Overflow, QueueInfo,
    QueueSpec, QueueType, Result,
};

use crate::arguments::{self, consumer_priority};
use crate::reply::{self, Op};
use crate::routing::{split_words, HeadersPattern, TopicPattern};

/// Prefix of direct reply-to pseudo-queues.
pub(crate) const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Identity hasher for the `u64` ids used as map keys.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// A small, fast hasher for names (the FxHash mix, as in rustc); names are
/// chosen by the application, not by an attacker.
#[derive(Default)]
pub(crate) struct NameHasher(u64);

const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl NameHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
    }
}

impl Hasher for NameHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut buf = [0u8; 8];
            buf[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(buf));
        }
    }
    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }
    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

type NameMap<V> = HashMap<Arc<str>, V, BuildHasherDefault<NameHasher>>;

/// Publisher flow control: a publish that leaves more than this many ready
/// messages in a queue that has consumers waits (see [`FLOW_LOW`]).
pub(crate) const FLOW_HIGH: usize = 2048;
/// A publisher held by flow control resumes once the queue is down to this
/// many ready messages...
pub(crate) const FLOW_LOW: usize = 1024;
/// ...or once its consumers have taken nothing for this long; flow control
/// is then off for that queue until its consumers have taken another
/// [`FLOW_HIGH`] messages, so a slow or stalled consumer never holds
/// publishers back (only a fast one paces them).
pub(crate) const FLOW_STALL: Duration = Duration::from_millis(2);

/// The broker: state behind one lock.
pub(crate) struct Broker {
    pub(crate) state: Mutex<State>,
    /// Signalled when a queue that publishers wait on drains to [`FLOW_LOW`].
    pub(crate) drained: tokio::sync::Notify,
}

/// Side effects to run after the broker lock is released.
#[derive(Default)]
pub(crate) struct Effects {
    wakes: Vec<Waker>,
    /// When TTL timers armed (`State::ttl_timers`) fall due.
    timers: Vec<Instant>,
    leases: Vec<(Arc<str>, u64, Instant)>,
    /// When held delayed messages fall due.
    delays: Vec<Instant>,
    drained: bool,
}

impl Broker {
    pub(crate) fn new() -> Arc<Broker> {
        Arc::new(Broker {
            state: Mutex::new(State::new()),
            drained: tokio::sync::Notify::new(),
        })
    }

    /// Runs `f` under the lock, then wakes consumers and arms TTL timers.
    /// First runs what fell due and no timer task has run yet (TTL timers,
    /// delayed messages): at this very instant the task may not have been
    /// scheduled, and a publish made outside a tokio runtime arms none.
    /// Costs one check while nothing is pending.
    #[inline(always)]
    pub(crate) fn with<R>(self: &Arc<Self>, f: impl FnOnce(&mut State, &mut Effects) -> R) -> R {
        let mut fx = Effects::default();
        let r = {
            let mut st = self.state.lock();
            if st.delayed_due.is_some() || !st.ttl_timers.is_empty() {
                st.run_due(&mut fx);
            }
            f(&mut st, &mut fx)
        };
        self.run_effects(fx);
        r
    }

    fn run_effects(self: &Arc<Self>, fx: Effects) {
        for w in fx.wakes {
            w.wake();
        }
        if fx.drained {
            self.drained.notify_waiters();
        }
        if fx.timers.is_empty() && fx.leases.is_empty() && fx.delays.is_empty() {
            return;
        }
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            // No runtime: message expiry then happens lazily on the next
            // operation (and x-expires not at all).
            return;
        };
        for (queue, uid, at) in fx.leases {
            let weak: Weak<Broker> = Arc::downgrade(self);
            handle.spawn(async move {
                tokio::time::sleep_until(at).await;
                if let Some(b) = weak.upgrade() {
                    b.with(|st, fx| st.lease_expired(&queue, uid, at, fx));
                }
            });
        }
        for at in fx.delays {
            let weak: Weak<Broker> = Arc::downgrade(self);
            handle.spawn(async move {
                tokio::time::sleep_until(at).await;
                if let Some(b) = weak.upgrade() {
                    b.with(|st, fx| st.release_delayed(fx));
                }
            });
        }
        for at in fx.timers {
            let weak: Weak<Broker> = Arc::downgrade(self);
            handle.spawn(async move {
                tokio::time::sleep_until(at).await;
                if let Some(b) = weak.upgrade() {
                    // `with` runs the TTL timers that are due (this one
                    // unless it was replaced by an earlier one).
                    b.with(|_, _| ());
                }
            });
        }
    }
}

/// What a consumer's stream sees.
pub(crate) struct OutItem {
    /// Shared with the unacked copy; cloned into the `Delivery` by the
    /// consumer's own task.
    pub(crate) message: Arc<Message>,
    pub(crate) tag: u64,
    pub(crate) redelivered: bool,
    /// `None`: the default exchange.
    pub(crate) exchange: Option<Arc<str>>,
    /// `None`: the consumer's queue name (default exchange).
    pub(crate) routing_key: Option<Arc<str>>,
}

/// How a consumer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Still running.
    Open,
    /// Cancelled by the client, or its connection closed: the stream ends.
    Cancelled,
    /// Cancelled by the broker (queue deleted): the stream yields
    /// `ConsumerCancelled`, then ends.
    BrokerCancelled,
}

/// A consumer's delivery buffer, and the lock-free state of its in-order
/// acknowledgements.
///
/// Acks of the lowest unsettled tag (the usual case) only advance
/// `acked_upto` with one compare-and-swap; the broker folds them into its
/// bookkeeping (`reconcile`) the next time it looks at the consumer. With a
/// prefetch of [`LAZY_PREFETCH`] or more, such an ack does not even take the
/// broker lock while the application still has deliveries buffered: the
/// window is topped up when the buffer runs dry (`owed`).
pub(crate) struct Outbox {
    pub(crate) inner: Mutex<OutboxInner>,
    /// Every tag up to this one is acknowledged.
    pub(crate) acked_upto: AtomicU64,
    /// The highest tag delivered (0 once the channel is released).
    pub(crate) delivered_upto: AtomicU64,
    /// Some tag above `acked_upto` was settled out of order: use the slow path.
    pub(crate) holes: AtomicBool,
    /// Deliveries in the stream's local buffer, not yet seen by the application.
    pub(crate) local_len: AtomicUsize,
    /// An ack skipped the refill: refill when the buffer runs dry.
    pub(crate) owed: AtomicBool,
    /// The broker found this consumer's window full (under its lock): an
    /// in-order ack must top it up. While it is clear, nothing waits for
    /// this consumer's window (any ready message would have been offered
    /// to it), so a lazy in-order ack need not take the broker lock.
    pub(crate) starved: AtomicBool,
    /// Lazy refill allowed (manual ack, prefetch >= [`LAZY_PREFETCH`]).
    pub(crate) lazy: bool,
}

/// Smallest prefetch for which in-order acks refill the window lazily;
/// below it every ack tops the window up at once, exactly as RabbitMQ does.
pub(crate) const LAZY_PREFETCH: u16 = 16;

pub(crate) struct OutboxInner {
    pub(crate) buf: VecDeque<OutItem>,
    pub(crate) waker: Option<Waker>,
    pub(crate) end: End,
}

impl Outbox {
    fn new(lazy: bool) -> Arc<Outbox> {
        Arc::new(Outbox {
            inner: Mutex::new(OutboxInner {
                buf: VecDeque::new(),
                waker: None,
                end: End::Open,
            }),
            acked_upto: AtomicU64::new(0),
            delivered_upto: AtomicU64::new(0),
            holes: AtomicBool::new(false),
            local_len: AtomicUsize::new(0),
            owed: AtomicBool::new(false),
            starved: AtomicBool::new(false),
            lazy,
        })
    }

    /// The lock-free ack of `tag`: succeeds only if `tag` is the lowest
    /// unsettled delivery and nothing was settled out of order.
    #[inline]
    pub(crate) fn fast_ack(&self, tag: u64) -> bool {
        !self.holes.load(Ordering::Acquire)
            && tag <= self.delivered_upto.load(Ordering::Acquire)
            && self
                .acked_upto
                .compare_exchange(tag.wrapping_sub(1), tag, Ordering::SeqCst, Ordering::Acquire)
                .is_ok()
    }

    fn push(&self, item: OutItem, fx: &mut Effects) {
        let mut o = self.inner.lock();
        o.buf.push_back(item);
        if let Some(w) = o.waker.take() {
            fx.wakes.push(w);
        }
    }

    /// Ends the stream. With `drain`, takes the buffered items (not yet
    /// seen by the application) out and returns their tags so they can be
    /// requeued; without, they still reach the application before the
    /// stream ends, as deliveries sent before a `basic.cancel` do on the
    /// wire.
    fn end(&self, end: End, drain: bool, fx: &mut Effects) -> Vec<u64> {
        let mut o = self.inner.lock();
        if o.end == End::Open || end == End::Cancelled {
            o.end = end;
        }
        let tags = if drain {
            o.buf.drain(..).map(|i| i.tag).collect()
        } else {
            Vec::new()
        };
        if let Some(w) = o.waker.take() {
            fx.wakes.push(w);
        }
        tags
    }
}

/// A message in a queue (ready or unacknowledged).
#[derive(Clone)]
pub(crate) struct QMsg {
    seq: u64,
    /// Immutable once published; shared by fanout copies and deliveries.
    message: Arc<Message>,
    /// `None`: the default exchange (`""`).
    exchange: Option<Arc<str>>,
    /// `None`: the name of the queue the message is in (default exchange),
    /// so that the hot path touches no reference count shared with the
    /// publisher.
    routing_key: Option<Arc<str>>,
    redelivered: bool,
    expires: Option<Instant>,
    returns: u32,
    priority: u8,
    /// The `BCC` keys it was published with (stripped from its headers,
    /// still used to route its dead letters, as RabbitMQ does).
    bcc: Option<Arc<[Arc<str>]>>,
}

impl QMsg {
    fn size(&self) -> u64 {
        self.message.body.len() as u64
    }
}

#[derive(Debug, Clone)]
struct QueueCfg {
    max_length: Option<u64>,
    max_bytes: Option<u64>,
    overflow: Overflow,
    dlx: Option<Arc<str>>,
    dlrk: Option<Arc<str>>,
    ttl: Option<Duration>,
    levels: usize,
    delivery_limit: Option<u32>,
    quorum: bool,
    single_active: bool,
    expires: Option<Duration>,
}

impl QueueCfg {
    fn from_spec(spec: &QueueSpec) -> Self {
        let a = &spec.arguments;
        let quorum = a.queue_type == Some(QueueType::Quorum);
        QueueCfg {
            max_length: a.max_length,
            max_bytes: a.max_length_bytes,
            overflow: a.overflow.unwrap_or_default(),
            dlx: a.dead_letter_exchange.as_deref().map(Arc::from),
            dlrk: a.dead_letter_routing_key.as_deref().map(Arc::from),
            ttl: a.message_ttl,
            levels: if quorum {
                1
            } else {
                a.max_priority.map_or(1, |p| p as usize + 1)
            },
            delivery_limit: if quorum { a.delivery_limit } else { None },
            quorum,
            single_active: a.single_active_consumer,
            expires: a.expires,
        }
    }
}

pub(crate) struct Queue {
    name: Arc<str>,
    uid: u64,
    spec: QueueSpec,
    owner: Option<u64>,
    cfg: QueueCfg,
    levels: Vec<VecDeque<QMsg>>,
    ready: usize,
    ready_bytes: u64,
    expiring: usize,
    /// `(consumer id, priority)`, by decreasing priority, and within a
    /// priority in RabbitMQ's round-robin order: the consumer served next
    /// first. A consumer that is served moves behind the others of its
    /// priority; a blocked one ([`ConsumerEntry::blocked`]) is skipped,
    /// and moves behind the others when its window reopens (as
    /// `rabbit_queue_consumers` takes a blocked consumer out of its
    /// priority queue and puts it back at the tail).
    consumers: Vec<(u64, i64)>,
    /// How many of `consumers` are blocked.
    blocked: usize,
    had_consumer: bool,
    exclusive_consumer: bool,
    /// The TTL timer (RabbitMQ's `ttl_timer_expiry`): when it runs
    /// [`State::expire`]; armed only by `expire` itself, for the head.
    timer: Option<Instant>,
    delivered: u64,
    flow_waiting: bool,
    /// `x-expires`: when the queue is deleted unless used before.
    lease_until: Option<Instant>,
    /// Flow control is off until `delivered` reaches this.
    flow_resume_at: u64,
}

impl Queue {
    fn push_ready(&mut self, m: QMsg) {
        self.ready += 1;
        self.ready_bytes += m.size();
        if m.expires.is_some() {
            self.expiring += 1;
        }
        let level = &mut self.levels[m.priority as usize];
        // Requeued messages go back to their original position (ordered by
        // sequence number); new ones go to the tail.
        match level.back() {
            Some(last) if last.seq > m.seq => {
                let at = level.partition_point(|x| x.seq < m.seq);
                level.insert(at, m);
            }
            _ => level.push_back(m),
        }
    }

    fn head_level(&self) -> Option<usize> {
        (0..self.levels.len()).rev().find(|&i| !self.levels[i].is_empty())
    }

    fn took(&mut self, m: &QMsg) {
        self.ready -= 1;
        self.ready_bytes -= m.size();
        if m.expires.is_some() {
            self.expiring -= 1;
        }
    }

    fn pop_head(&mut self) -> Option<QMsg> {
        let l = self.head_level()?;
        let m = self.levels[l].pop_front()?;
        self.took(&m);
        Some(m)
    }

    fn over_limit(&self, extra_len: u64, extra_bytes: u64) -> bool {
        self.cfg.max_length.is_some_and(|n| self.ready as u64 + extra_len > n)
            || self.cfg.max_bytes.is_some_and(|n| self.ready_bytes + extra_bytes > n)
    }

    /// Renews the `x-expires` lease of an unused queue.
    fn touch(&mut self, fx: &mut Effects) {
        if let Some(expires) = self.cfg.expires {
            if self.consumers.is_empty() {
                // A lease too long for the clock never expires.
                match Instant::now().checked_add(expires) {
                    Some(at) => {
                        self.lease_until = Some(at);
                        fx.leases.push((self.name.clone(), self.uid, at));
                    }
                    None => self.lease_until = None,
                }
            } else {
                self.lease_until = None;
            }
        }
    }

    /// True if publishers to this queue should wait for its consumers.
    fn backlogged(&self) -> bool {
        self.ready > FLOW_HIGH && !self.consumers.is_empty() && self.delivered >= self.flow_resume_at
    }

    fn info(&self) -> QueueInfo {
        QueueInfo {
            name: self.name.to_string(),
            message_count: self.ready as u32,
            consumer_count: self.consumers.len() as u32,
        }
    }
}

struct Bind {
    dest: Arc<str>,
    dest_is_exchange: bool,
    key: String,
    args: Headers,
    topic: Option<TopicPattern>,
    headers: Option<HeadersPattern>,
}

struct Exchange {
    spec: ExchangeSpec,
    /// How it matches bindings (an `x-delayed-message` exchange: as its
    /// `x-delayed-type`).
    routes: RouteAs,
    /// An `x-delayed-message` exchange: holds messages for their `x-delay`.
    delayed: bool,
    alternate: Option<Arc<str>>,
    binds: Vec<Bind>,
}

/// The routing algorithm of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RouteAs {
    Direct,
    Topic,
    Fanout,
    Headers,
}

impl RouteAs {
    /// The algorithm of a standard kind (`None` for plugin kinds).
    fn of(kind: &ExchangeKind) -> Option<RouteAs> {
        Some(match kind {
            ExchangeKind::Direct => RouteAs::Direct,
            ExchangeKind::Topic => RouteAs::Topic,
            ExchangeKind::Fanout => RouteAs::Fanout,
            ExchangeKind::Headers => RouteAs::Headers,
            _ => return None,
        })
    }
}

/// A message an `x-delayed-message` exchange holds until `due`.
struct DelayedMsg {
    due: Instant,
    seq: u64,
    exchange: Arc<str>,
    routing_key: Arc<str>,
    message: Message,
}

pub(crate) struct ConsumerEntry {
    pub(crate) queue: Arc<str>,
    queue_uid: u64,
    pub(crate) conn: u64,
    prefetch: u32,
    auto_ack: bool,
    active: bool,
    /// Found with a full prefetch window when its turn came: skipped until
    /// a settlement reopens the window, then served after the consumers of
    /// its priority that were not blocked (see [`Queue::consumers`]).
    blocked: bool,
    outbox: Arc<Outbox>,
    next_tag: u64,
    /// Unsettled deliveries, tags `front_tag..next_tag` in order (`None`:
    /// settled out of order).
    unacked: VecDeque<Option<QMsg>>,
    front_tag: u64,
    holes: usize,
    live: u32,
}

impl ConsumerEntry {
    #[inline]
    fn has_capacity(&mut self, pool: &mut Vec<Arc<Message>>) -> bool {
        if !self.active {
            return false;
        }
        if self.auto_ack || self.prefetch == 0 {
            return true;
        }
        self.reconcile(pool);
        if self.live < self.prefetch {
            return true;
        }
        // Full: ask the next in-order ack to refill. (SeqCst store, then
        // look at `acked_upto` again; the acker does the reverse, so an ack
        // racing with this check is seen by one side or the other.)
        if self.outbox.starved.load(Ordering::Relaxed) {
            // Already asked (only a refill clears it, under the lock).
            return false;
        }
        self.outbox.starved.store(true, Ordering::SeqCst);
        self.reconcile(pool);
        self.live < self.prefetch
    }

    /// Folds lock-free acks (`acked_upto`) into the unacked list.
    #[inline]
    fn reconcile(&mut self, pool: &mut Vec<Arc<Message>>) {
        // SeqCst: pairs with the acker's SeqCst compare-and-swap then load of
        // `starved` (see `has_capacity` and `State::refill`).
        let upto = self.outbox.acked_upto.load(Ordering::SeqCst);
        if upto >= self.front_tag {
            let n = ((upto - self.front_tag + 1) as usize).min(self.unacked.len());
            for _ in 0..n {
                match self.unacked.pop_front().expect("n <= len") {
                    Some(m) => {
                        self.live -= 1;
                        recycle(pool, m.message);
                    }
                    None => self.holes -= 1,
                }
            }
            self.front_tag += n as u64;
        }
        self.pop_settled_front();
    }

    fn pop_settled_front(&mut self) {
        if self.holes == 0 {
            return;
        }
        let mut popped = false;
        while self.unacked.front().is_some_and(Option::is_none) {
            self.unacked.pop_front();
            self.front_tag += 1;
            self.holes -= 1;
            popped = true;
        }
        if popped {
            // Keep `acked_upto` just below the first unsettled tag so that
            // the next in-order ack takes the fast path again.
            self.outbox.acked_upto.fetch_max(self.front_tag - 1, Ordering::AcqRel);
        }
        if self.holes == 0 {
            self.outbox.holes.store(false, Ordering::Release);
        }
    }

    /// Takes unsettled delivery `tag` out of the list.
    fn take(&mut self, tag: u64, pool: &mut Vec<Arc<Message>>) -> Option<QMsg> {
        self.reconcile(pool);
        if tag < self.front_tag {
            return None;
        }
        let i = (tag - self.front_tag) as usize;
        let m = self.unacked.get_mut(i)?.take()?;
        self.live -= 1;
        self.holes += 1;
        if i == 0 {
            self.pop_settled_front();
        } else {
            self.outbox.holes.store(true, Ordering::Release);
        }
        Some(m)
    }

    fn new(queue: Arc<str>, queue_uid: u64, conn: u64, prefetch: u16, auto_ack: bool, outbox: Arc<Outbox>) -> Self {
        ConsumerEntry {
            queue,
            queue_uid,
            conn,
            prefetch: prefetch as u32,
            auto_ack,
            active: true,
            blocked: false,
            outbox,
            next_tag: 1,
            unacked: VecDeque::new(),
            front_tag: 1,
            holes: 0,
            live: 0,
        }
    }
}

/// Most message allocations kept for reuse: enough for the swing of a
/// flow-controlled queue (a publisher parked at [`FLOW_HIGH`] while its
/// consumers drain the queue, then refilling it), so that a steady flow
/// allocates nothing; at most about 1 MiB kept per broker.
const POOL_MAX: usize = 2 * FLOW_HIGH;

/// The consumers, and a pool of message allocations: a settled message's
/// `Arc` is emptied and reused by the next publish, so that a steady flow
/// allocates nothing per message (and the publisher's and consumer's
/// threads do not hand allocations back and forth).
#[derive(Default)]
pub(crate) struct Consumers {
    map: IdMap<ConsumerEntry>,
    pool: Vec<Arc<Message>>,
}

impl std::ops::Deref for Consumers {
    type Target = IdMap<ConsumerEntry>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl std::ops::DerefMut for Consumers {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

/// Keeps `m`'s allocation for reuse if nothing else refers to it.
#[inline]
fn recycle(pool: &mut Vec<Arc<Message>>, mut m: Arc<Message>) {
    if pool.len() < POOL_MAX {
        if let Some(inner) = Arc::get_mut(&mut m) {
            // Release what may be large now; the rest is overwritten on reuse.
            inner.body = bytes::Bytes::new();
            if !inner.headers.is_empty() {
                inner.headers = Headers::new();
            }
            pool.push(m);
        }
    }
}

#[derive(Default)]
struct Conn {
    consumers: Vec<u64>,
}

/// Everything the broker knows.
pub(crate) struct State {
    exchanges: NameMap<Exchange>,
    queues: NameMap<Queue>,
    consumers: Consumers,
    conns: IdMap<Conn>,
    reply_to: HashMap<Arc<str>, u64>,
    next_id: u64,
    next_seq: u64,
    /// Set by `deliver_to_queue` when the queue is backlogged (flow control).
    flow_hint: Option<Arc<str>>,
    /// Messages held by `x-delayed-message` exchanges, in no order.
    delayed: Vec<DelayedMsg>,
    /// The earliest `due` in `delayed` (`None` when it is empty), so that
    /// every operation can release what fell due without a timer.
    delayed_due: Option<Instant>,
    /// The TTL timers armed (`Queue::timer`), earliest first, with the
    /// queue's uid and name; entries of timers since replaced or run stay
    /// until they are due, then are skipped.
    ttl_timers: std::collections::BinaryHeap<std::cmp::Reverse<(Instant, u64, Arc<str>)>>,
    /// How many `x-delayed-message` exchanges exist (publishes skip the
    /// check while there are none).
    delayed_exchanges: usize,
    /// While a message is delivered to the queues it was routed to, the
    /// dead letters that causes (a TTL of 0, an overflow) wait here, to be
    /// routed once every queue has the message: on RabbitMQ a dead letter
    /// is a new publish by the queue, after the original's deliveries.
    deferred_dead: Option<Vec<DeadLetter>>,
}

fn shutdown() -> Error {
    Error::Shutdown {
        what: "memory transport connection".into(),
    }
}

/// The result of routing one publish.
enum Routed {
    Ok,
    Unroutable,
    Refused(&'static str),
}

impl State {
    fn new() -> Self {
        let mut st = State {
            exchanges: NameMap::default(),
            queues: NameMap::default(),
            consumers: Consumers::default(),
            conns: IdMap::default(),
            reply_to: HashMap::new(),
            next_id: 1,
            next_seq: 1,
            flow_hint: None,
            delayed: Vec::new(),
            delayed_due: None,
            ttl_timers: std::collections::BinaryHeap::new(),
            delayed_exchanges: 0,
            deferred_dead: None,
        };
        for (name, kind) in [
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            st.exchanges.insert(
                Arc::from(name),
                Exchange {
                    routes: RouteAs::of(&kind).expect("a standard kind"),
                    delayed: false,
                    spec: ExchangeSpec::new(name, kind),
                    alternate: None,
                    binds: Vec::new(),
                },
            );
        }
        st
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    // ----- connections -------------------------------------------------

    pub(crate) fn open_conn(&mut self) -> u64 {
        let id = self.id();
        self.conns.insert(id, Conn::default());
        id
    }

    pub(crate) fn check_conn(&self, conn: u64) -> Result<()> {
        if self.conns.contains_key(&conn) {
            Ok(())
        } else {
            Err(shutdown())
        }
    }

    /// Closes a connection: cancels its consumers, requeues their unacked
    /// deliveries and deletes its exclusive queues.
    pub(crate) fn close_conn(&mut self, conn: u64, fx: &mut Effects) {
        let Some(c) = self.conns.remove(&conn) else { return };
        for cid in c.consumers {
            self.release_channel(cid, fx);
        }
        let exclusive: Vec<Arc<str>> = self
            .queues
            .values()
            .filter(|q| q.owner == Some(conn))
            .map(|q| q.name.clone())
            .collect();
        for q in exclusive {
            self.remove_queue(&q, fx);
        }
    }

    // ----- exchanges ---------------------------------------------------

    pub(crate) fn declare_exchange(&mut self, conn: u64, spec: &ExchangeSpec) -> Result<()> {
        self.check_conn(conn)?;
        if spec.name.is_empty() {
            return Err(reply::default_exchange(Op::ExchangeDeclare));
        }
        if let Some(e) = self.exchanges.get(spec.name.as_str()) {
            let s = &e.spec;
            let differs = [
                ("type", s.kind.as_str().to_owned(), spec.kind.as_str().to_owned()),
                ("durable", s.durable.to_string(), spec.durable.to_string()),
                ("auto_delete", s.auto_delete.to_string(), spec.auto_delete.to_string()),
                ("internal", s.internal.to_string(), spec.internal.to_string()),
                (
                    "alternate-exchange",
                    format!("{:?}", s.arguments.get("alternate-exchange")),
                    format!("{:?}", spec.arguments.get("alternate-exchange")),
                ),
            ];
            if let Some((what, current, received)) = differs.into_iter().find(|(_, a, b)| a != b) {
                return Err(reply::precondition_failed(
                    Op::ExchangeDeclare,
                    &spec.name,
                    format!(
                        "inequivalent arg '{what}' for exchange '{}' in vhost '/': received '{received}' but current \
                         is '{current}'",
                        spec.name
                    ),
                ));
            }
            return Ok(());
        }
        if spec.name.starts_with("amq.") {
            return Err(reply::access_refused(
                Op::ExchangeDeclare,
                &spec.name,
                format_args!("exchange name '{}' contains reserved prefix 'amq.*'", spec.name),
            ));
        }
        let (routes, delayed) = exchange_kind(spec)?;
        self.delayed_exchanges += usize::from(delayed);
        let alternate = spec.arguments.get_str("alternate-exchange").map(Arc::from);
        self.exchanges.insert(
            Arc::from(spec.name.as_str()),
            Exchange {
                spec: spec.clone(),
                routes,
                delayed,
                alternate,
                binds: Vec::new(),
            },
        );
        Ok(())
    }

    pub(crate) fn exchange_exists(&self, conn: u64, name: &str) -> Result<bool> {
        self.check_conn(conn)?;
        Ok(name.is_empty() || self.exchanges.contains_key(name))
    }

    /// `exchange.delete`; with `if_unused`, refused (406) while a binding
    /// has the exchange as its source, as on RabbitMQ.
    pub(crate) fn delete_exchange(&mut self, conn: u64, name: &str, if_unused: bool) -> Result<()> {
        self.check_conn(conn)?;
        if name.is_empty() {
            return Err(reply::default_exchange(Op::ExchangeDelete));
        }
        if name.starts_with("amq.") {
            return Err(reply::access_refused(
                Op::ExchangeDelete,
                name,
                format_args!("deletion of system exchange '{name}' in vhost '/' not allowed"),
            ));
        }
        if if_unused && self.exchanges.get(name).is_some_and(|e| !e.binds.is_empty()) {
            return Err(reply::precondition_failed(
                Op::ExchangeDelete,
                name,
                format_args!("exchange '{name}' in vhost '/' in use"),
            ));
        }
        self.drop_exchange(name);
        Ok(())
    }

    /// Removes exchange `name`, the bindings to it and the messages it
    /// holds (the delayed-message plugin keeps them with their exchange).
    fn drop_exchange(&mut self, name: &str) {
        if let Some(e) = self.exchanges.remove(name) {
            if e.delayed {
                self.delayed_exchanges -= 1;
                self.delayed.retain(|d| &*d.exchange != name);
                self.delayed_due = self.delayed.iter().map(|d| d.due).min();
            }
            self.remove_bindings_to(name, true);
        }
    }

    /// Removes every binding whose destination is `dest`, then deletes
    /// auto-delete exchanges left without bindings.
    fn remove_bindings_to(&mut self, dest: &str, dest_is_exchange: bool) {
        let mut emptied = Vec::new();
        for (name, e) in self.exchanges.iter_mut() {
            let before = e.binds.len();
            e.binds
                .retain(|b| !(b.dest_is_exchange == dest_is_exchange && &*b.dest == dest));
            if e.binds.is_empty() && before > 0 && e.spec.auto_delete {
                emptied.push(name.clone());
            }
        }
        for name in emptied {
            self.drop_exchange(&name);
        }
    }

    // ----- bindings ----------------------------------------------------

    pub(crate) fn bind(&mut self, conn: u64, b: &Binding) -> Result<()> {
        self.check_conn(conn)?;
        let op = Op::bind(b.destination_is_exchange);
        if b.source.is_empty() || (b.destination_is_exchange && b.destination.is_empty()) {
            return Err(reply::default_exchange(op));
        }
        self.check_bind_ends(conn, b, op)?;
        let src = self.exchanges.get_mut(b.source.as_str()).expect("checked above");
        let exists = src.binds.iter().any(|x| {
            x.dest_is_exchange == b.destination_is_exchange
                && *x.dest == *b.destination
                && x.key == b.routing_key
                && x.args == b.arguments
        });
        if exists {
            return Ok(());
        }
        let topic = (src.routes == RouteAs::Topic).then(|| TopicPattern::new(&b.routing_key));
        let headers = if src.routes == RouteAs::Headers {
            Some(HeadersPattern::new(&b.arguments).map_err(|m| reply::precondition_failed(op, &b.source, m))?)
        } else {
            None
        };
        src.binds.push(Bind {
            dest: Arc::from(b.destination.as_str()),
            dest_is_exchange: b.destination_is_exchange,
            key: b.routing_key.clone(),
            args: b.arguments.clone(),
            topic,
            headers,
        });
        Ok(())
    }

    fn check_bind_ends(&self, conn: u64, b: &Binding, op: Op) -> Result<()> {
        if !self.exchanges.contains_key(b.source.as_str()) {
            return Err(reply::no_exchange(op, &b.source));
        }
        if b.destination_is_exchange {
            if !self.exchanges.contains_key(b.destination.as_str()) {
                return Err(reply::no_exchange(op, &b.destination));
            }
        } else {
            self.queue_for(conn, &b.destination, op)?;
        }
        Ok(())
    }

    pub(crate) fn unbind(&mut self, conn: u64, b: &Binding) -> Result<()> {
        self.check_conn(conn)?;
        if b.source.is_empty() || (b.destination_is_exchange && b.destination.is_empty()) {
            return Err(reply::default_exchange(Op::unbind(b.destination_is_exchange)));
        }
        // RabbitMQ 3.10 answers unbind-ok even when the binding, its queue or
        // its exchange does not exist.
        let Some(src) = self.exchanges.get_mut(b.source.as_str()) else {
            return Ok(());
        };
        let before = src.binds.len();
        src.binds.retain(|x| {
            !(x.dest_is_exchange == b.destination_is_exchange
                && *x.dest == *b.destination
                && x.key == b.routing_key
                && x.args == b.arguments)
        });
        if before > 0 && src.binds.is_empty() && src.spec.auto_delete {
            self.drop_exchange(&b.source);
        }
        Ok(())
    }

    // ----- queues ------------------------------------------------------

    /// The queue `name`, checking exclusivity for `conn`.
    fn queue_for(&self, conn: u64, name: &str, op: Op) -> Result<&Queue> {
        let q = self.queues.get(name).ok_or_else(|| reply::no_queue(op, name))?;
        if q.owner.is_some_and(|o| o != conn) {
            return Err(reply::locked(op, name));
        }
        Ok(q)
    }

    pub(crate) fn declare_queue(&mut self, conn: u64, spec: &QueueSpec, fx: &mut Effects) -> Result<QueueInfo> {
        self.check_conn(conn)?;
        if let Some(q) = self.queues.get(spec.name.as_str()) {
            if q.owner.is_some_and(|o| o != conn) || q.owner.is_some() != spec.exclusive {
                return Err(reply::locked(Op::QueueDeclare, &spec.name));
            }
            let inequivalent = |what: &str, current: String, received: String| {
                reply::precondition_failed(
                    Op::QueueDeclare,
                    &spec.name,
                    format_args!(
                        "inequivalent arg '{what}' for queue '{}' in vhost '/': received '{received}' but current is \
                         '{current}'",
                        spec.name
                    ),
                )
            };
            if q.spec.durable != spec.durable {
                return Err(inequivalent(
                    "durable",
                    q.spec.durable.to_string(),
                    spec.durable.to_string(),
                ));
            }
            if q.spec.auto_delete != spec.auto_delete {
                return Err(inequivalent(
                    "auto_delete",
                    q.spec.auto_delete.to_string(),
                    spec.auto_delete.to_string(),
                ));
            }
            if let Some(e) = arguments::inequivalent(&spec.name, &q.spec.arguments, &spec.arguments) {
                return Err(e);
            }
            let q = self.queues.get_mut(spec.name.as_str()).expect("exists");
            q.touch(fx);
            return Ok(q.info());
        }
        let name: Arc<str> = if spec.name.is_empty() {
            loop {
                let id = switchyard_core::message::new_id();
                let n = format!("amq.gen-{}", &id[..22]);
                if !self.queues.contains_key(n.as_str()) {
                    break Arc::from(n);
                }
            }
        } else if spec.name.starts_with("amq.") {
            return Err(reply::access_refused(
                Op::QueueDeclare,
                &spec.name,
                format_args!("queue name '{}' contains reserved prefix 'amq.*'", spec.name),
            ));
        } else {
            Arc::from(spec.name.as_str())
        };
        let typed = QueueSpec {
            arguments: arguments::validate(&name, &spec.arguments)?,
            ..spec.clone()
        };
        let a = &typed.arguments;
        if a.queue_type == Some(QueueType::Quorum) && (!spec.durable || spec.exclusive || spec.auto_delete) {
            return Err(reply::precondition_failed(
                Op::QueueDeclare,
                &name,
                format_args!(
                    "invalid property 'non-durable, exclusive or auto-delete' for queue '{name}' in vhost '/' of \
                     queue type rabbit_quorum_queue"
                ),
            ));
        }
        if a.queue_type == Some(QueueType::Stream) {
            return Err(Error::Unsupported {
                feature: "stream queues in the memory transport".into(),
            });
        }
        let mut stored = spec.clone();
        stored.name = name.to_string();
        let cfg = QueueCfg::from_spec(&typed);
        let q = Queue {
            name: name.clone(),
            uid: self.next_id + 1,
            owner: spec.exclusive.then_some(conn),
            levels: (0..cfg.levels).map(|_| VecDeque::new()).collect(),
            cfg,
            spec: stored,
            ready: 0,
            ready_bytes: 0,
            expiring: 0,
            consumers: Vec::new(),
            blocked: 0,
            had_consumer: false,
            exclusive_consumer: false,
            timer: None,
            delivered: 0,
            flow_waiting: false,
            lease_until: None,
            flow_resume_at: 0,
        };
        self.next_id += 1;
        let mut q = q;
        q.touch(fx);
        let info = q.info();
        self.queues.insert(name, q);
        Ok(info)
    }

    pub(crate) fn queue_info(&mut self, conn: u64, name: &str, fx: &mut Effects) -> Result<QueueInfo> {
        self.check_conn(conn)?;
        self.queue_for(conn, name, Op::QueueDeclare)?;
        let q = self.queues.get_mut(name).expect("checked");
        q.touch(fx);
        Ok(q.info())
    }

    pub(crate) fn purge_queue(&mut self, conn: u64, name: &str, _fx: &mut Effects) -> Result<u32> {
        self.check_conn(conn)?;
        self.queue_for(conn, name, Op::QueuePurge)?;
        let q = self.queues.get_mut(name).expect("checked");
        let n = q.ready as u32;
        for l in q.levels.iter_mut() {
            l.clear();
        }
        q.ready = 0;
        q.ready_bytes = 0;
        q.expiring = 0;
        Ok(n)
    }

    /// `queue.delete`, with RabbitMQ's `if-unused` (no consumers) and
    /// `if-empty` (no ready messages) conditions.
    pub(crate) fn delete_queue(
        &mut self,
        conn: u64,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        fx: &mut Effects,
    ) -> Result<u32> {
        self.check_conn(conn)?;
        match self.queue_for(conn, name, Op::QueueDelete) {
            Err(Error::QueueNotFound { .. }) => return Ok(0),
            Err(e) => return Err(e),
            Ok(_) => {}
        }
        let q = self.queues.get(name).expect("checked");
        if if_unused && !q.consumers.is_empty() {
            return Err(reply::precondition_failed(
                Op::QueueDelete,
                name,
                format_args!("queue '{name}' in vhost '/' in use"),
            ));
        }
        if if_empty && q.ready > 0 {
            return Err(reply::precondition_failed(
                Op::QueueDelete,
                name,
                format_args!("queue '{name}' in vhost '/' not empty"),
            ));
        }
        Ok(self.remove_queue(name, fx))
    }

    /// `basic.get`: takes the head message of `queue`, with the ready count
    /// left behind it. Without `auto_ack` the message stays unacked on a
    /// channel of its own (an inactive consumer entry of `conn`, tag 1),
    /// returned as its id and outbox: settling it, dropping it or closing
    /// the connection behaves as for a consumer's delivery. Registers no
    /// consumer (auto-delete does not fire) and renews `x-expires`.
    pub(crate) fn get(&mut self, conn: u64, queue: &str, auto_ack: bool, fx: &mut Effects) -> Result<Option<Got>> {
        self.check_conn(conn)?;
        self.queue_for(conn, queue, Op::BasicGet)?;
        let cid = if auto_ack { 0 } else { self.id() };
        let q = self.queues.get_mut(queue).expect("checked");
        q.touch(fx);
        let Some(m) = q.pop_head() else {
            return Ok(None);
        };
        q.delivered += 1;
        if q.flow_waiting && q.ready <= FLOW_LOW {
            q.flow_waiting = false;
            fx.drained = true;
        }
        // As RabbitMQ's fetch: the expired messages the taken one uncovers
        // at the head go first, then what is left is counted — before their
        // dead letters are routed: RabbitMQ's queue counts itself when it
        // replies, and its dead letters are publishes that reach their
        // queues (this one too, by way of another queue's overflow) after.
        let outer = self.hold_dead_letters();
        self.expire(queue, fx);
        let left = self.queues.get(queue).expect("checked").ready as u32;
        if outer {
            self.route_held_dead_letters(fx);
        }
        let q = self.queues.get_mut(queue).expect("checked");
        let quorum_count = (q.cfg.quorum && m.returns > 0).then_some(m.returns);
        let (qname, uid) = (q.name.clone(), q.uid);
        let mut message = m.message.clone();
        if let Some(n) = quorum_count {
            let mut copy = Message::clone(&message);
            copy.headers.insert("x-delivery-count", HeaderValue::I64(n as i64));
            message = Arc::new(copy);
        }
        let item = OutItem {
            message,
            tag: 1,
            redelivered: m.redelivered,
            exchange: m.exchange.clone(),
            routing_key: Some(m.routing_key.clone().unwrap_or_else(|| qname.clone())),
        };
        if auto_ack {
            return Ok(Some((item, left, None)));
        }
        let outbox = Outbox::new(false);
        let mut c = ConsumerEntry::new(qname, uid, conn, 0, false, outbox.clone());
        c.active = false;
        c.next_tag = 2;
        c.live = 1;
        c.unacked.push_back(Some(m));
        outbox.delivered_upto.store(1, Ordering::Release);
        self.consumers.insert(cid, c);
        self.conns.get_mut(&conn).expect("checked").consumers.push(cid);
        Ok(Some((item, left, Some((cid, outbox)))))
    }

    /// Deletes a queue, cancelling its consumers; returns its ready count.
    fn remove_queue(&mut self, name: &str, fx: &mut Effects) -> u32 {
        let Some(q) = self.queues.remove(name) else { return 0 };
        for (cid, _) in &q.consumers {
            if let Some(c) = self.consumers.get_mut(cid) {
                c.active = false;
                c.outbox.end(End::BrokerCancelled, false, fx);
            }
        }
        self.remove_bindings_to(name, false);
        q.ready as u32
    }

    // ----- publishing --------------------------------------------------

    #[inline(always)]
    pub(crate) fn publish(
        &mut self,
        conn: u64,
        exchange: &Arc<str>,
        routing_key: &Arc<str>,
        message: Message,
        mandatory: bool,
        fx: &mut Effects,
    ) -> Result<Option<Arc<str>>> {
        self.check_conn(conn)?;
        self.publish_routed(exchange, routing_key, message, mandatory, fx)
    }

    /// [`publish`](Self::publish) on behalf of a connection, or of an
    /// `x-delayed-message` exchange releasing a message. Inlined: the
    /// message (a few hundred bytes) is moved once, not once per frame.
    #[inline(always)]
    fn publish_routed(
        &mut self,
        exchange: &Arc<str>,
        routing_key: &Arc<str>,
        message: Message,
        mandatory: bool,
        fx: &mut Effects,
    ) -> Result<Option<Arc<str>>> {
        let mut message = message;
        if self.delayed_exchanges > 0
            && !exchange.is_empty()
            && self.exchanges.get(&**exchange).is_some_and(|e| e.delayed)
        {
            self.check_publish_exchange(exchange)?;
            if let Some(delay) = positive_delay(&message.headers) {
                // Held, then routed as the plugin does; like the plugin, no
                // `mandatory` return for a held message.
                let now = Instant::now();
                let due = now
                    .checked_add(delay)
                    .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400));
                let seq = self.next_seq;
                self.next_seq += 1;
                self.delayed.push(DelayedMsg {
                    due,
                    seq,
                    exchange: exchange.clone(),
                    routing_key: routing_key.clone(),
                    message,
                });
                self.delayed_due = Some(self.delayed_due.map_or(due, |d| d.min(due)));
                fx.delays.push(due);
                return Ok(None);
            }
        }
        // Sender-selected distribution: `CC` and `BCC` keys route copies too.
        let extra = if message.headers.is_empty() {
            None
        } else {
            sender_selected(&mut message)?
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let expires = message.properties.expiration;
        let default = exchange.is_empty();
        let message = match self.consumers.pool.pop() {
            Some(mut slot) => {
                *Arc::get_mut(&mut slot).expect("pooled messages are unshared") = message;
                slot
            }
            None => Arc::new(message),
        };
        let m = QMsg {
            seq,
            message,
            exchange: (!default).then(|| exchange.clone()),
            routing_key: (!default).then(|| routing_key.clone()),
            redelivered: false,
            expires: None,
            returns: 0,
            priority: 0,
            bcc: None,
        };
        let mut flow = None;
        self.flow_hint = None;
        if let Some((cc, bcc)) = extra {
            let mut m = m;
            m.bcc = (!bcc.is_empty()).then(|| Arc::from(bcc.as_slice()));
            // Every copy carries the key it was published with, also those
            // the default exchange routes by a CC or BCC key (RabbitMQ 3.10).
            m.routing_key = Some(routing_key.clone());
            if !default {
                self.check_publish_exchange(exchange)?;
            }
            let keys: Vec<&str> = std::iter::once(routing_key)
                .chain(&cc)
                .chain(&bcc)
                .map(|k| &**k)
                .collect();
            let mut targets = Vec::new();
            self.route(exchange, &keys, &m.message.headers, &mut targets);
            let routed = self.deliver_all(&targets, m, expires, 0, fx);
            let flow = self.flow_hint.take();
            return match routed {
                Routed::Ok => Ok(flow),
                Routed::Unroutable if mandatory => Err(reply::no_route(exchange, routing_key)),
                Routed::Unroutable => Ok(None),
                Routed::Refused(why) => Err(Error::PublishUnconfirmed {
                    exchange: exchange.to_string(),
                    routing_key: routing_key.to_string(),
                    message: why.to_owned(),
                }),
            };
        }
        // Fast path: the default exchange routes to the queue named by the key.
        let routed = if default {
            match self.deliver_to_queue(routing_key, m, expires, 0, fx) {
                (Routed::Unroutable, Some(m)) if routing_key.starts_with(REPLY_TO) => {
                    self.deliver_reply(routing_key, m, fx)
                }
                (r, _) => r,
            }
        } else {
            self.check_publish_exchange(exchange)?;
            let mut targets = Vec::new();
            self.route(exchange, &[routing_key], &m.message.headers, &mut targets);
            self.deliver_all(&targets, m, expires, 0, fx)
        };
        if let Some(q) = self.flow_hint.take() {
            flow = Some(q);
        }
        match routed {
            Routed::Ok => Ok(flow),
            Routed::Unroutable if mandatory => Err(reply::no_route(exchange, routing_key)),
            Routed::Unroutable => Ok(None),
            Routed::Refused(why) => Err(Error::PublishUnconfirmed {
                exchange: exchange.to_string(),
                routing_key: routing_key.to_string(),
                message: why.to_owned(),
            }),
        }
    }

    /// Runs the TTL timers and releases the delayed messages that are due,
    /// earliest first, as their timer tasks would have.
    fn run_due(&mut self, fx: &mut Effects) {
        let now = Instant::now();
        loop {
            let ttl = self.ttl_timers.peek().map(|t| t.0 .0).filter(|&at| at <= now);
            let delayed = self.delayed_due.filter(|&d| d <= now);
            match (ttl, delayed) {
                (None, None) => return,
                (Some(t), Some(d)) if d < t => self.release_delayed(fx),
                (None, Some(_)) => self.release_delayed(fx),
                (Some(_), _) => {
                    // Every queue's timer that is due runs before the dead
                    // letters they cause reach any queue: on RabbitMQ each
                    // queue runs its own timer (at a millisecond's
                    // precision), and a dead letter is a publish that
                    // arrives after. (Under a paused clock the timer tasks
                    // wake at each instant, so these are the timers of one
                    // instant.)
                    let outer = self.hold_dead_letters();
                    while let Some(std::cmp::Reverse((at, uid, name))) = self.ttl_timers.peek().cloned() {
                        if at > now {
                            break;
                        }
                        self.ttl_timers.pop();
                        if self.queues.get(&*name).is_some_and(|q| q.uid == uid) {
                            self.catch_up(&name, fx);
                            self.after_change(&name, fx);
                        }
                    }
                    if outer {
                        self.route_held_dead_letters(fx);
                    }
                }
            }
        }
    }

    /// Holds back the dead letters caused from here on (see
    /// `deferred_dead`); true if the caller is the one to route them
    /// ([`route_held_dead_letters`](Self::route_held_dead_letters)), false if
    /// they were held already.
    fn hold_dead_letters(&mut self) -> bool {
        if self.deferred_dead.is_some() {
            return false;
        }
        self.deferred_dead = Some(Vec::new());
        true
    }

    /// Routes the dead letters held since [`hold_dead_letters`](Self::hold_dead_letters).
    fn route_held_dead_letters(&mut self, fx: &mut Effects) {
        for d in self.deferred_dead.take().unwrap_or_default() {
            self.dead_letter(&d.queue, d.dlx, d.dlrk, d.message, d.reason, d.depth, fx);
        }
    }

    /// Routes the held delayed messages that are due, in due order (then
    /// publish order), and arms a timer for the next one.
    pub(crate) fn release_delayed(&mut self, fx: &mut Effects) {
        let now = Instant::now();
        let (mut due, held): (Vec<DelayedMsg>, Vec<DelayedMsg>) = std::mem::take(&mut self.delayed)
            .into_iter()
            .partition(|d| d.due <= now);
        self.delayed = held;
        // Routing below may hold new messages (a release into another
        // delayed exchange): they lower this again.
        self.delayed_due = self.delayed.iter().map(|d| d.due).min();
        due.sort_by_key(|d| (d.due, d.seq));
        for d in due {
            let mut message = d.message;
            // The plugin hands the message on with its delay negated, so
            // that it is not held again when it passes another delayed
            // exchange (e.g. after dead-lettering).
            if let Some(v) = message.headers.get("x-delay").and_then(HeaderValue::as_i64) {
                message.headers.insert("x-delay", HeaderValue::I64(-v));
            }
            // Routing failures (the message became unroutable, a queue
            // refused it) drop it, as the plugin does after its confirm.
            let _ = self.publish_routed(&d.exchange, &d.routing_key, message, false, fx);
        }
        if let Some(next) = self.delayed.iter().map(|d| d.due).min() {
            fx.delays.push(next);
        }
    }

    /// Refuses a publish to a missing or internal exchange.
    fn check_publish_exchange(&self, exchange: &str) -> Result<()> {
        let Some(ex) = self.exchanges.get(exchange) else {
            return Err(reply::no_exchange(Op::BasicPublish, exchange));
        };
        if ex.spec.internal {
            return Err(reply::access_refused(
                Op::BasicPublish,
                exchange,
                format_args!("cannot publish to internal exchange '{exchange}' in vhost '/'"),
            ));
        }
        Ok(())
    }

    fn deliver_all(
        &mut self,
        targets: &[Arc<str>],
        m: QMsg,
        expiration: Option<Duration>,
        depth: u32,
        fx: &mut Effects,
    ) -> Routed {
        if targets.is_empty() {
            return Routed::Unroutable;
        }
        let mut result = Routed::Ok;
        let last = targets.len() - 1;
        let mut m = Some(m);
        let outer = last > 0 && self.deferred_dead.is_none();
        if outer {
            self.deferred_dead = Some(Vec::new());
        }
        for (i, t) in targets.iter().enumerate() {
            let copy = if i == last {
                m.take().expect("one message per target")
            } else {
                m.clone().expect("one message per target")
            };
            if let (Routed::Refused(w), _) = self.deliver_to_queue(t, copy, expiration, depth, fx) {
                result = Routed::Refused(w);
            }
        }
        if outer {
            for d in self.deferred_dead.take().unwrap_or_default() {
                self.dead_letter(&d.queue, d.dlx, d.dlrk, d.message, d.reason, d.depth, fx);
            }
        }
        result
    }

    /// Collects the queues `exchange` routes a message with routing `keys`
    /// (its routing key, then any `CC` and `BCC` keys) and `headers` to, as
    /// RabbitMQ 3.10's `rabbit_exchange:route` does: every exchange reached
    /// is routed once, with all the keys, whatever bindings led to it (so
    /// cycles of exchange-to-exchange bindings end), and an exchange's
    /// alternate exchange is tried only when none of its bindings matched.
    fn route(&self, exchange: &str, keys: &[&str], headers: &Headers, out: &mut Vec<Arc<str>>) {
        if exchange.is_empty() {
            for key in keys {
                if let Some(q) = self.queues.get(*key) {
                    if !out.contains(&q.name) {
                        out.push(q.name.clone());
                    }
                }
            }
            return;
        }
        // Exchanges reached and still to route (no allocation unless an
        // exchange-to-exchange binding or alternate exchange is taken).
        let mut seen: Vec<&str> = Vec::new();
        let mut work: Vec<&str> = Vec::new();
        let mut current = exchange;
        loop {
            if let Some(ex) = self.exchanges.get(current) {
                let words: Vec<Vec<&str>> = if ex.routes == RouteAs::Topic {
                    keys.iter().map(|k| split_words(k)).collect()
                } else {
                    Vec::new()
                };
                let mut matched = false;
                for b in &ex.binds {
                    let hit = match ex.routes {
                        RouteAs::Direct => keys.iter().any(|k| b.key == *k),
                        RouteAs::Fanout => true,
                        RouteAs::Topic => b.topic.as_ref().is_some_and(|t| words.iter().any(|w| t.matches(w))),
                        RouteAs::Headers => b.headers.as_ref().is_some_and(|h| h.matches(headers)),
                    };
                    if !hit {
                        continue;
                    }
                    matched = true;
                    if b.dest_is_exchange {
                        let d: &str = &b.dest;
                        if d != exchange && !seen.contains(&d) && self.exchanges.contains_key(d) {
                            seen.push(d);
                            work.push(d);
                        }
                    } else if self.queues.contains_key(&*b.dest) && !out.contains(&b.dest) {
                        out.push(b.dest.clone());
                    }
                }
                if !matched {
                    if let Some(ae) = &ex.alternate {
                        let d: &str = ae;
                        if d != exchange && !seen.contains(&d) && self.exchanges.contains_key(d) {
                            seen.push(d);
                            work.push(d);
                        }
                    }
                }
            }
            match work.pop() {
                Some(next) => current = next,
                None => return,
            }
        }
    }

    fn deliver_reply(&mut self, key: &Arc<str>, m: QMsg, fx: &mut Effects) -> Routed {
        let Some(&cid) = self.reply_to.get(&**key) else {
            return Routed::Unroutable;
        };
        let Some(c) = self.consumers.get_mut(&cid) else {
            return Routed::Unroutable;
        };
        if !c.active {
            return Routed::Unroutable;
        }
        c.outbox.push(
            OutItem {
                message: m.message,
                tag: 0,
                redelivered: false,
                exchange: m.exchange,
                routing_key: Some(m.routing_key.unwrap_or_else(|| key.clone())),
            },
            fx,
        );
        Routed::Ok
    }

    /// Puts a message into queue `name` (delivering at once to a waiting
    /// consumer when the queue is empty), applying its limits. Gives the
    /// message back if there is no such queue.
    fn deliver_to_queue(
        &mut self,
        name: &str,
        mut m: QMsg,
        expiration: Option<Duration>,
        depth: u32,
        fx: &mut Effects,
    ) -> (Routed, Option<QMsg>) {
        let Some(q) = self.queues.get_mut(name) else {
            return (Routed::Unroutable, Some(m));
        };
        // Overflow policies that refuse the new message.
        if q.cfg.overflow != Overflow::DropHead && q.over_limit(1, m.size()) {
            if q.cfg.overflow == Overflow::RejectPublishDlx {
                let (dlx, dlrk, qn) = (q.cfg.dlx.clone(), q.cfg.dlrk.clone(), q.name.clone());
                self.dead_letter(&qn, dlx, dlrk, m, "maxlen", depth, fx);
            }
            return (Routed::Refused("queue is full (x-overflow reject-publish)"), None);
        }
        m.priority = (m.message.properties.priority.unwrap_or(0) as usize).min(q.levels.len() - 1) as u8;
        let ttl = match (expiration, q.cfg.ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if q.ready == 0 {
            // The TTL runs from now even for a message handed straight to a
            // consumer: requeued later, it expires if its time is up (as on
            // RabbitMQ, where a requeue does not reset the TTL).
            m.expires = ttl.and_then(|t| Instant::now().checked_add(t));
            if let Some(m) = try_direct(q, &mut self.consumers, m, fx) {
                m.expires_after(ttl, q);
            } else {
                return (Routed::Ok, None);
            }
        } else {
            m.expires_after(ttl, q);
            if q.expiring == 0 && q.cfg.max_length.is_none() && q.cfg.max_bytes.is_none() {
                // Fast path: nothing to expire or drop.
                dispatch(q, &mut self.consumers, fx);
                if q.backlogged() {
                    self.flow_hint = Some(q.name.clone());
                }
                return (Routed::Ok, None);
            }
        }
        let mut dropped = false;
        if q.cfg.overflow == Overflow::DropHead && q.over_limit(0, 0) {
            let mut heads = Vec::new();
            while q.over_limit(0, 0) {
                match q.pop_head() {
                    Some(h) => heads.push(h),
                    None => break,
                }
            }
            dropped = !heads.is_empty();
            let (dlx, dlrk, qn) = (q.cfg.dlx.clone(), q.cfg.dlrk.clone(), q.name.clone());
            for h in heads {
                self.dead_letter(&qn, dlx.clone(), dlrk.clone(), h, "maxlen", depth, fx);
            }
        }
        // RabbitMQ 3.10 drops expired heads (and arms the TTL timer) after
        // a publish only when the message is alone in the queue or a head
        // was dropped (not when a head without expiry was dropped and the
        // new message, alone, has none): a message that goes ahead by
        // priority in a queue holding others gets no timer of its own.
        if let Some(q) = self.queues.get(name) {
            if (dropped || q.ready == 1) && !(dropped && q.ready == 1 && ttl.is_none()) {
                self.expire(name, fx);
            }
        }
        self.after_change(name, fx);
        if let Some(q) = self.queues.get(name).filter(|q| q.backlogged()) {
            self.flow_hint = Some(q.name.clone());
        }
        (Routed::Ok, None)
    }

    /// Delivers ready messages to consumers with capacity as RabbitMQ
    /// 3.10's `run_message_queue` does: each delivery takes the head, even
    /// an expired one that no timer has dropped (a message that went ahead
    /// by priority), then drops the expired heads it uncovers.
    fn after_change(&mut self, name: &str, fx: &mut Effects) {
        let Some(q) = self.queues.get_mut(name) else { return };
        if q.expiring == 0 {
            // Fast path: nothing can expire.
            dispatch(q, &mut self.consumers, fx);
            return;
        }
        loop {
            let Some(q) = self.queues.get_mut(name) else { return };
            if q.expiring == 0 {
                dispatch(q, &mut self.consumers, fx);
                return;
            }
            if q.ready == 0 || !deliver_head(q, &mut self.consumers, fx) {
                return;
            }
            self.expire(name, fx);
        }
    }

    /// Runs the queue's TTL timer if it is due: the timer task may not have
    /// run yet at this instant, and without a tokio runtime there is none
    /// (expiry then happens lazily, on the next operation).
    fn catch_up(&mut self, name: &str, fx: &mut Effects) {
        let Some(q) = self.queues.get_mut(name) else { return };
        if q.timer.is_some_and(|t| t <= Instant::now()) {
            q.timer = None;
            self.expire(name, fx);
        }
    }

    /// RabbitMQ 3.10's `drop_expired_msgs`: removes expired messages from
    /// the heads of queue `name`, dead-lettering them, and arms the TTL
    /// timer for the head's expiry (unless one is armed earlier). RabbitMQ
    /// calls it after every fetch (`basic.get` or a delivery), after a
    /// requeue, when its timer fires, and on a publish only when the new
    /// message is alone in the queue or the publish dropped a head
    /// (`x-overflow` `drop-head`); so the memory broker calls it there too,
    /// and at other operations only runs a timer that is due
    /// ([`catch_up`](Self::catch_up)). A message that goes ahead by
    /// priority, in a queue that holds others, therefore has no timer of
    /// its own: it expires when one of those calls finds it at the head
    /// (until then it is counted, and a `basic.get` or a consumer can
    /// still take it).
    fn expire(&mut self, name: &str, fx: &mut Effects) {
        let Some(q) = self.queues.get_mut(name) else { return };
        if q.expiring == 0 {
            return;
        }
        let now = Instant::now();
        let mut dead = Vec::new();
        // Only at the head, in delivery order (highest priority first): an
        // expired message behind one that has not expired stays until it
        // reaches the head, in a priority queue too (RabbitMQ's
        // `rabbit_priority_queue:fetchwhile` stops at the first priority
        // whose head has not expired).
        let mut next = None;
        'levels: for l in (0..q.levels.len()).rev() {
            while let Some(h) = q.levels[l].front() {
                if h.expires.is_some_and(|e| e <= now) {
                    let h = q.levels[l].pop_front().expect("front exists");
                    q.took(&h);
                    dead.push(h);
                } else {
                    next = h.expires;
                    break 'levels;
                }
            }
        }
        if let Some(at) = next {
            if q.timer.is_none_or(|t| at < t) {
                q.timer = Some(at);
                fx.timers.push(at);
                self.ttl_timers.push(std::cmp::Reverse((at, q.uid, q.name.clone())));
            }
        }
        if dead.is_empty() {
            return;
        }
        let (dlx, dlrk, qn) = (q.cfg.dlx.clone(), q.cfg.dlrk.clone(), q.name.clone());
        for h in dead {
            self.dead_letter(&qn, dlx.clone(), dlrk.clone(), h, "expired", 0, fx);
        }
    }

    /// Flow control: `None` if publishers to `queue` may go on, else the
    /// number of deliveries the queue has made so far (to detect a stall).
    pub(crate) fn flow_status(&mut self, queue: &str) -> Option<u64> {
        let q = self.queues.get_mut(queue)?;
        if q.ready <= FLOW_LOW || q.consumers.is_empty() || q.delivered < q.flow_resume_at {
            return None;
        }
        q.flow_waiting = true;
        Some(q.delivered)
    }

    /// Flow control on `queue` found its consumers stalled: off until they
    /// have taken [`FLOW_HIGH`] more messages.
    pub(crate) fn flow_stalled(&mut self, queue: &str) {
        if let Some(q) = self.queues.get_mut(queue) {
            q.flow_resume_at = q.delivered + FLOW_HIGH as u64;
        }
    }

    /// Dead-letters `m` from queue `queue` for `reason`, as RabbitMQ 3.10 does.
    #[allow(clippy::too_many_arguments)]
    fn dead_letter(
        &mut self,
        queue: &Arc<str>,
        dlx: Option<Arc<str>>,
        dlrk: Option<Arc<str>>,
        m: QMsg,
        reason: &'static str,
        depth: u32,
        fx: &mut Effects,
    ) {
        let Some(dlx) = dlx else { return };
        if let Some(deferred) = &mut self.deferred_dead {
            deferred.push(DeadLetter {
                queue: queue.clone(),
                dlx: Some(dlx),
                dlrk,
                message: m,
                reason,
                depth,
            });
            return;
        }
        if depth > 16 || !(dlx.is_empty() || self.exchanges.contains_key(&*dlx)) {
            return;
        }
        let (ex, rk) = (m.exchange.clone(), m.routing_key.clone());
        let mut message = Arc::unwrap_or_clone(m.message);
        let cc = string_keys(message.headers.get("CC"));
        let mut death_keys = vec![rk.as_deref().unwrap_or(queue).to_owned()];
        death_keys.extend(cc.iter().map(|k| k.to_string()));
        record_death(&mut message, queue, ex.as_deref().unwrap_or(""), death_keys, reason);
        // With x-dead-letter-routing-key the dead letter is routed by it
        // alone and loses its CC header; without, by all the keys it was
        // published with (routing key, CC, BCC), keeping CC.
        let (extra, bcc): (Vec<Arc<str>>, _) = if dlrk.is_some() {
            message.headers.remove("CC");
            (Vec::new(), None)
        } else {
            let bcc = m.bcc;
            let mut keys = cc;
            keys.extend(bcc.iter().flat_map(|b| b.iter().cloned()));
            (keys, bcc)
        };
        let key = dlrk.unwrap_or_else(|| rk.unwrap_or_else(|| queue.clone()));
        let mut targets = Vec::new();
        let keys: Vec<&str> = std::iter::once(&*key).chain(extra.iter().map(|k| &**k)).collect();
        self.route(&dlx, &keys, &message.headers, &mut targets);
        if reason != "rejected" {
            if let Some(HeaderValue::Array(deaths)) = message.headers.get("x-death") {
                targets.retain(|t| !is_cycle(t, deaths));
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let dm = QMsg {
            seq,
            message: Arc::new(message),
            exchange: Some(dlx),
            routing_key: Some(key),
            redelivered: false,
            expires: None,
            returns: 0,
            priority: 0,
            bcc,
        };
        let _ = self.deliver_all(&targets, dm, None, depth + 1, fx);
    }

    // ----- consumers ---------------------------------------------------

    /// `basic.consume`: registers a consumer of `queue` with `options`
    /// (prefetch, auto-ack, exclusivity and the consumer priority
    /// `x-priority`; `x-stream-offset` has no meaning here, as memory has no
    /// stream queues).
    pub(crate) fn consume(
        &mut self,
        conn: u64,
        queue: &str,
        options: &ConsumeOptions,
        fx: &mut Effects,
    ) -> Result<(u64, Arc<str>, Arc<Outbox>)> {
        let (prefetch, auto_ack, exclusive) = (options.prefetch, options.auto_ack, options.exclusive);
        self.check_conn(conn)?;
        self.queue_for(conn, queue, Op::BasicConsume)?;
        let priority = consumer_priority(queue, &options.consume_arguments())?;
        let cid = self.id();
        let q = self.queues.get_mut(queue).expect("checked");
        if q.exclusive_consumer || (exclusive && !q.consumers.is_empty()) {
            return Err(reply::access_refused(
                Op::BasicConsume,
                queue,
                format_args!("queue '{queue}' in vhost '/' in exclusive use"),
            ));
        }
        let outbox = Outbox::new(!auto_ack && prefetch >= LAZY_PREFETCH);
        // Consumers are kept by decreasing priority, in arrival order within
        // a priority (RabbitMQ's order, round-robin within a priority).
        let at = q
            .consumers
            .iter()
            .position(|&(_, p)| p < priority)
            .unwrap_or(q.consumers.len());
        q.consumers.insert(at, (cid, priority));
        q.had_consumer = true;
        q.lease_until = None;
        q.exclusive_consumer = exclusive;
        let qname = q.name.clone();
        self.consumers.insert(
            cid,
            ConsumerEntry::new(qname.clone(), q.uid, conn, prefetch, auto_ack, outbox.clone()),
        );
        self.conns.get_mut(&conn).expect("checked").consumers.push(cid);
        self.after_change(&qname, fx);
        Ok((cid, qname, outbox))
    }

    /// Registers a direct reply-to consumer.
    pub(crate) fn consume_reply(&mut self, conn: u64) -> Result<(u64, Arc<str>, Arc<Outbox>)> {
        self.check_conn(conn)?;
        let cid = self.id();
        let id = switchyard_core::message::new_id();
        let name: Arc<str> = Arc::from(format!("{REPLY_TO}.g1h2AA5r{}", &id[..24]));
        let outbox = Outbox::new(false);
        self.consumers
            .insert(cid, ConsumerEntry::new(name.clone(), 0, conn, 0, true, outbox.clone()));
        self.reply_to.insert(name.clone(), cid);
        self.conns.get_mut(&conn).expect("checked").consumers.push(cid);
        Ok((cid, name, outbox))
    }

    /// Cancels a consumer (client side, `basic.cancel`): it gets nothing
    /// more, and what was already sent to it stays unacked, as on RabbitMQ:
    /// the stream still yields the deliveries it has buffered, and they
    /// can be settled until the channel goes (then they are requeued).
    pub(crate) fn cancel(&mut self, cid: u64, fx: &mut Effects) {
        self.stop_consumer(cid, false, &[], fx);
    }

    /// The application dropped the stream of consumer `cid`: cancels it and
    /// requeues what it can no longer see (`unseen`, the stream's local
    /// buffer, and the outbox), since no one can settle those.
    pub(crate) fn stream_dropped(&mut self, cid: u64, unseen: &[u64], fx: &mut Effects) {
        self.stop_consumer(cid, true, unseen, fx);
    }

    fn stop_consumer(&mut self, cid: u64, drop_unseen: bool, unseen: &[u64], fx: &mut Effects) {
        let Some(c) = self.consumers.get_mut(&cid) else { return };
        let mut tags = c.outbox.end(End::Cancelled, drop_unseen, fx);
        tags.extend_from_slice(unseen);
        let was_active = c.active;
        c.active = false;
        let queue = c.queue.clone();
        for t in tags {
            let _ = self.settle(cid, t, Settle::Requeue, fx);
        }
        self.reply_to.remove(&queue);
        if was_active {
            self.detach(cid, &queue, fx);
        }
    }

    /// Removes consumer `cid` from its queue's list, auto-deleting the queue
    /// when it was its last consumer.
    fn detach(&mut self, cid: u64, queue: &str, fx: &mut Effects) {
        let Some(q) = self.queues.get_mut(queue) else { return };
        if let Some(i) = q.consumers.iter().position(|&(c, _)| c == cid) {
            q.consumers.remove(i);
            q.exclusive_consumer = false;
            if let Some(c) = self.consumers.get_mut(&cid).filter(|c| c.blocked) {
                c.blocked = false;
                q.blocked -= 1;
            }
        }
        if q.consumers.is_empty() && q.had_consumer && q.spec.auto_delete {
            let n = q.name.clone();
            self.remove_queue(&n, fx);
        } else if q.consumers.is_empty() {
            q.touch(fx);
        }
    }

    /// An `x-expires` lease ran out: deletes the queue if it is still unused.
    fn lease_expired(&mut self, name: &str, uid: u64, at: Instant, fx: &mut Effects) {
        let Some(q) = self.queues.get(name) else { return };
        if q.uid == uid && q.consumers.is_empty() && q.lease_until == Some(at) {
            self.remove_queue(name, fx);
        }
    }

    /// Drops a consumer's channel: cancels it and requeues its unacked
    /// deliveries.
    pub(crate) fn release_channel(&mut self, cid: u64, fx: &mut Effects) {
        let Some(c) = self.consumers.get(&cid) else { return };
        if c.active {
            self.cancel(cid, fx);
        }
        let Some(mut c) = self.consumers.remove(&cid) else {
            return;
        };
        c.outbox.end(End::Cancelled, true, fx);
        // Later acks through this channel fail (slow path, entry gone).
        c.outbox.delivered_upto.store(0, Ordering::Release);
        c.reconcile(&mut self.consumers.pool);
        let conn = c.conn;
        if let Some(conn) = self.conns.get_mut(&conn) {
            conn.consumers.retain(|&x| x != cid);
        }
        let pending: Vec<QMsg> = c.unacked.drain(..).flatten().collect();
        if !pending.is_empty() {
            let queue = c.queue.clone();
            let outer = self.hold_dead_letters();
            for m in pending {
                self.requeue(&queue, c.queue_uid, m, fx);
            }
            // One requeue of them all, as when RabbitMQ's channel closes.
            if self.queues.get(&*queue).is_some_and(|q| q.uid == c.queue_uid) {
                self.expire(&queue, fx);
            }
            self.after_change(&queue, fx);
            if outer {
                self.route_held_dead_letters(fx);
            }
        }
    }

    /// Settles delivery `tag` of consumer `cid`.
    pub(crate) fn settle(&mut self, cid: u64, tag: u64, how: Settle, fx: &mut Effects) -> Result<()> {
        let Consumers { map, pool } = &mut self.consumers;
        let Some(c) = map.get_mut(&cid) else {
            return Err(Error::SettleFailed {
                queue: String::new(),
                delivery_tag: tag,
                message: "the consumer's connection is closed".into(),
            });
        };
        let Some(m) = c.take(tag, pool) else {
            return Err(Error::SettleFailed {
                queue: c.queue.to_string(),
                delivery_tag: tag,
                message: "unknown delivery tag (never delivered, or already settled)".into(),
            });
        };
        let (queue, uid) = (c.queue.clone(), c.queue_uid);
        // The dead letters this causes (a reject, the heads a requeue drops
        // or uncovers expired) are routed once the queue has delivered what
        // the settlement lets it: on RabbitMQ they are publishes the queue
        // makes, which reach queues (itself included) after that.
        let outer = self.hold_dead_letters();
        match how {
            Settle::Ack => recycle(&mut self.consumers.pool, m.message),
            Settle::Requeue => {
                self.requeue(&queue, uid, m, fx);
                // As RabbitMQ's requeue_and_run: expired heads go first.
                if self.queues.get(&*queue).is_some_and(|q| q.uid == uid) {
                    self.expire(&queue, fx);
                }
            }
            Settle::Discard => {
                if let Some(q) = self.queues.get(&*queue).filter(|q| q.uid == uid) {
                    let (dlx, dlrk) = (q.cfg.dlx.clone(), q.cfg.dlrk.clone());
                    self.dead_letter(&queue, dlx, dlrk, m, "rejected", 0, fx);
                }
            }
        }
        self.unblock(cid);
        self.after_change(&queue, fx);
        if outer {
            self.route_held_dead_letters(fx);
        }
        Ok(())
    }

    /// Tops up consumer `cid`'s window after lock-free acks.
    pub(crate) fn refill(&mut self, cid: u64, fx: &mut Effects) {
        let Consumers { map, pool } = &mut self.consumers;
        let Some(c) = map.get_mut(&cid) else { return };
        c.outbox.owed.store(false, Ordering::Relaxed);
        c.outbox.starved.store(false, Ordering::SeqCst);
        c.reconcile(pool);
        let queue = c.queue.clone();
        self.unblock(cid);
        self.after_change(&queue, fx);
    }

    /// A settlement reopened consumer `cid`'s window: if it was blocked, it
    /// goes behind the other consumers of its priority (RabbitMQ's
    /// `rabbit_queue_consumers:unblock`, at the time of the ack).
    fn unblock(&mut self, cid: u64) {
        let Consumers { map, pool } = &mut self.consumers;
        let Some(c) = map.get_mut(&cid) else { return };
        if !c.blocked || !c.has_capacity(pool) {
            return;
        }
        c.blocked = false;
        let Some(q) = self.queues.get_mut(&*c.queue).filter(|q| q.uid == c.queue_uid) else {
            return;
        };
        q.blocked -= 1;
        if let Some(i) = q.consumers.iter().position(|&(x, _)| x == cid) {
            to_back(q, i);
        }
    }

    /// Puts an unacked message back at its original position, redelivered
    /// (or dead-letters it past a quorum queue's delivery limit).
    fn requeue(&mut self, queue: &Arc<str>, uid: u64, mut m: QMsg, fx: &mut Effects) {
        let Some(q) = self.queues.get_mut(&**queue).filter(|q| q.uid == uid) else {
            return;
        };
        m.redelivered = true;
        if q.cfg.quorum {
            m.returns += 1;
            if q.cfg.delivery_limit.is_some_and(|l| m.returns > l) {
                let (dlx, dlrk) = (q.cfg.dlx.clone(), q.cfg.dlrk.clone());
                self.dead_letter(queue, dlx, dlrk, m, "delivery_limit", 0, fx);
                return;
            }
        }
        q.push_ready(m);
        // As RabbitMQ 3.10 does after a requeue: drop-head applies the max
        // length (the requeued messages are at the head, so they are the
        // ones dropped, dead-lettered as `maxlen`); reject-publish(-dlx) lets
        // the queue exceed it.
        if q.cfg.overflow == Overflow::DropHead && q.over_limit(0, 0) {
            let mut dropped = Vec::new();
            while q.over_limit(0, 0) {
                match q.pop_head() {
                    Some(h) => dropped.push(h),
                    None => break,
                }
            }
            let (dlx, dlrk) = (q.cfg.dlx.clone(), q.cfg.dlrk.clone());
            for h in dropped {
                self.dead_letter(queue, dlx.clone(), dlrk.clone(), h, "maxlen", 0, fx);
            }
        }
    }
}

/// A dead letter waiting for the deliveries of the publish that caused it
/// (see `State::deferred_dead`).
struct DeadLetter {
    queue: Arc<str>,
    dlx: Option<Arc<str>>,
    dlrk: Option<Arc<str>>,
    message: QMsg,
    reason: &'static str,
    depth: u32,
}

/// What `basic.get` took: the delivery, the ready count left behind it,
/// and (manual ack) the id and outbox of the channel that settles it.
pub(crate) type Got = (OutItem, u32, Option<(u64, Arc<Outbox>)>);

/// How to settle a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    Ack,
    Requeue,
    Discard,
}

impl QMsg {
    /// Sets the expiry (from now) and puts the message in the queue.
    fn expires_after(mut self, ttl: Option<Duration>, q: &mut Queue) {
        // A TTL too long for the clock never expires.
        self.expires = ttl.and_then(|t| Instant::now().checked_add(t));
        q.push_ready(self);
    }
}

/// Hands `m` straight to a consumer with capacity; gives it back if none.
fn try_direct(q: &mut Queue, consumers: &mut Consumers, m: QMsg, fx: &mut Effects) -> Option<QMsg> {
    match pick_consumer(q, consumers) {
        Some(cid) => {
            let c = consumers.get_mut(&cid).expect("picked");
            send(q, c, m, fx);
            None
        }
        None => Some(m),
    }
}

/// The consumer the next message goes to, as RabbitMQ 3.10's
/// `rabbit_queue_consumers:deliver` picks it: the first of
/// [`Queue::consumers`] (highest priority, then round-robin order) that is
/// not blocked. One found with a full window on its turn is blocked
/// (skipped until its window reopens); the one chosen moves behind the
/// others of its priority.
#[inline]
fn pick_consumer(q: &mut Queue, consumers: &mut Consumers) -> Option<u64> {
    let Consumers { map: consumers, pool } = consumers;
    let n = q.consumers.len();
    if n == 0 {
        return None;
    }
    if q.cfg.single_active {
        let cid = q.consumers[0].0;
        return consumers
            .get_mut(&cid)
            .is_some_and(|c| c.has_capacity(pool))
            .then_some(cid);
    }
    if n == 1 {
        // The loop below for one consumer, without its second look-up: a
        // blocked consumer whose window reopened is unblocked, one found
        // full is blocked.
        let cid = q.consumers[0].0;
        let c = consumers.get_mut(&cid)?;
        if c.has_capacity(pool) {
            if c.blocked {
                c.blocked = false;
                q.blocked -= 1;
            }
            return Some(cid);
        }
        if c.active && !c.blocked {
            c.blocked = true;
            q.blocked += 1;
        }
        return None;
    }
    if q.blocked > 0 {
        unblock_reopened(q, consumers, pool);
    }
    for i in 0..n {
        let cid = q.consumers[i].0;
        let Some(c) = consumers.get_mut(&cid) else { continue };
        if c.blocked {
            continue;
        }
        if c.has_capacity(pool) {
            to_back(q, i);
            return Some(cid);
        }
        if c.active {
            c.blocked = true;
            q.blocked += 1;
        }
    }
    None
}

/// Unblocks the blocked consumers whose window was reopened by acks the
/// broker has not seen yet (lock-free in-order acks of a consumer with a
/// lazy refill; others are unblocked by [`State::unblock`] when settled),
/// in their order in the list.
#[cold]
fn unblock_reopened(q: &mut Queue, consumers: &mut IdMap<ConsumerEntry>, pool: &mut Vec<Arc<Message>>) {
    let mut i = 0;
    while i < q.consumers.len() && q.blocked > 0 {
        let cid = q.consumers[i].0;
        let reopened = consumers
            .get_mut(&cid)
            .is_some_and(|c| c.blocked && c.has_capacity(pool));
        if !reopened {
            i += 1;
            continue;
        }
        if let Some(c) = consumers.get_mut(&cid) {
            c.blocked = false;
        }
        q.blocked -= 1;
        to_back(q, i);
        if q.consumers[i].0 == cid {
            i += 1;
        }
    }
}

/// Moves `q.consumers[i]` behind the other consumers of its priority.
#[inline]
fn to_back(q: &mut Queue, i: usize) {
    let p = q.consumers[i].1;
    let end = i + q.consumers[i..].iter().take_while(|c| c.1 == p).count();
    if end - i > 1 {
        q.consumers[i..end].rotate_left(1);
    }
}

/// Delivers `m` to consumer `c`.
#[inline]
fn send(q: &Queue, c: &mut ConsumerEntry, m: QMsg, fx: &mut Effects) {
    let tag = c.next_tag;
    c.next_tag += 1;
    let exchange = m.exchange.clone();
    let routing_key = m.routing_key.clone();
    let redelivered = m.redelivered;
    let quorum_count = (q.cfg.quorum && m.returns > 0).then_some(m.returns);
    let message = if c.auto_ack {
        m.message
    } else {
        let shared = m.message.clone();
        c.live += 1;
        c.unacked.push_back(Some(m));
        c.outbox.delivered_upto.store(tag, Ordering::Release);
        shared
    };
    let message = match quorum_count {
        Some(n) => {
            let mut copy = Message::clone(&message);
            copy.headers.insert("x-delivery-count", HeaderValue::I64(n as i64));
            Arc::new(copy)
        }
        None => message,
    };
    let item = OutItem {
        message,
        tag,
        redelivered,
        exchange,
        routing_key,
    };
    c.outbox.push(item, fx);
}

/// Moves ready messages to consumers with capacity (for a queue where no
/// ready message can expire; see [`State::after_change`]).
fn dispatch(q: &mut Queue, consumers: &mut Consumers, fx: &mut Effects) {
    while q.ready > 0 && deliver_head(q, consumers, fx) {}
}

/// Delivers the head message to the consumer [`pick_consumer`] picks;
/// false if none can take it.
#[inline]
fn deliver_head(q: &mut Queue, consumers: &mut Consumers, fx: &mut Effects) -> bool {
    let Some(cid) = pick_consumer(q, consumers) else {
        return false;
    };
    let m = q.pop_head().expect("ready > 0");
    let c = consumers.get_mut(&cid).expect("picked");
    send(q, c, m, fx);
    q.delivered += 1;
    if q.flow_waiting && q.ready <= FLOW_LOW {
        q.flow_waiting = false;
        fx.drained = true;
    }
    true
}

/// Adds RabbitMQ 3.10's dead-letter headers to `message` (its
/// `rabbit_dead_letter:make_msg`, probed with
/// `transport-memory/scripts/probe-twin.py dlx`):
///
/// * without an `x-death` header, the `x-first-death-*` headers are set
///   (replacing any the client put there) and `x-death` is one new entry;
/// * with an `x-death` array, its entries are first regrouped as RabbitMQ
///   does (one per queue and reason, and — as a side effect of how 3.10
///   regroups — **in reverse order** when there are two or more), then the
///   entry for this queue and reason gets its `count` incremented (its
///   `time` and other fields kept) or a new entry is made, and that entry
///   goes first. So dead-lettered through q1, q2, q3, q4 in turn a message
///   carries `[q4, q2, q1, q3]`, not `[q4, q3, q2, q1]`;
/// * an `x-death` that is not an array is replaced by the one new entry.
fn record_death(message: &mut Message, queue: &str, exchange: &str, routing_keys: Vec<String>, reason: &str) {
    let original_expiration = message.properties.expiration.take();
    let h = &mut message.headers;
    let mut deaths = match h.remove("x-death") {
        None => {
            h.insert("x-first-death-reason", reason);
            h.insert("x-first-death-queue", queue);
            h.insert("x-first-death-exchange", exchange);
            Vec::new()
        }
        Some(HeaderValue::Array(a)) => regroup_deaths(a),
        Some(_) => Vec::new(),
    };
    let same = deaths.iter().position(|d| {
        d.as_table()
            .is_some_and(|t| t.get_str("queue") == Some(queue) && t.get_str("reason") == Some(reason))
    });
    let entry = match same {
        Some(i) => {
            let mut d = deaths.remove(i);
            if let HeaderValue::Table(t) = &mut d {
                let n = t.get_i64("count").unwrap_or(0);
                t.insert("count", HeaderValue::I64(n + 1));
            }
            d
        }
        None => {
            let mut t = Headers::new();
            t.insert("count", HeaderValue::I64(1));
            t.insert("reason", reason);
            t.insert("queue", queue);
            t.insert("time", HeaderValue::Timestamp(unix_now()));
            t.insert("exchange", exchange);
            t.insert(
                "routing-keys",
                HeaderValue::Array(routing_keys.into_iter().map(HeaderValue::String).collect()),
            );
            if let Some(e) = original_expiration {
                t.insert("original-expiration", e.as_millis().to_string());
            }
            HeaderValue::Table(t)
        }
    };
    deaths.insert(0, entry);
    h.insert("x-death", HeaderValue::Array(deaths));
}

/// RabbitMQ 3.10's regrouping of an existing `x-death` array before a new
/// death is recorded (`group_by_queue_and_reason`, meant for messages from
/// before per-queue-and-reason counts): of two or more entries, the first
/// for each (queue, reason) is kept, given a `count` of the number of
/// entries for that pair if it has none, and the kept entries come out in
/// **reverse** order. One entry or none is left as it is. (An element that
/// is not a table crashes RabbitMQ's queue process here; it is kept as an
/// entry of its own.)
fn regroup_deaths(deaths: Vec<HeaderValue>) -> Vec<HeaderValue> {
    if deaths.len() < 2 {
        return deaths;
    }
    let key = |d: &HeaderValue| {
        d.as_table()
            .map(|t| (t.get("queue").cloned(), t.get("reason").cloned()))
    };
    let keys: Vec<_> = deaths.iter().map(key).collect();
    let mut out = Vec::with_capacity(deaths.len());
    for (i, mut d) in deaths.into_iter().enumerate() {
        let k = &keys[i];
        if k.is_some() && keys[..i].contains(k) {
            continue;
        }
        if let HeaderValue::Table(t) = &mut d {
            if !t.contains_key("count") {
                let n = keys.iter().filter(|o| *o == k).count();
                t.insert("count", HeaderValue::I64(n as i64));
            }
        }
        out.push(d);
    }
    out.reverse();
    out
}

/// How an exchange of `spec`'s kind routes, and whether it holds messages
/// (`x-delayed-message`); `unsupported` for the plugin kinds the memory
/// broker does not have, 406 for a delayed exchange without a valid
/// `x-delayed-type`, as the plugin answers.
fn exchange_kind(spec: &ExchangeSpec) -> Result<(RouteAs, bool)> {
    if let Some(r) = RouteAs::of(&spec.kind) {
        return Ok((r, false));
    }
    if spec.kind != ExchangeKind::DelayedMessage {
        return Err(Error::Unsupported {
            feature: format!(
                "exchange type '{}' in the memory transport (it implements direct, topic, fanout, headers and \
                 x-delayed-message)",
                spec.kind
            ),
        });
    }
    let routes = spec
        .arguments
        .get_str("x-delayed-type")
        .and_then(|t| t.parse::<ExchangeKind>().ok())
        .and_then(|k| RouteAs::of(&k));
    match routes {
        Some(r) => Ok((r, true)),
        None => Err(reply::precondition_failed(
            Op::ExchangeDeclare,
            &spec.name,
            "Invalid argument, 'x-delayed-type' must be an existing exchange type",
        )),
    }
}

/// The `x-delay` of a message published to an `x-delayed-message`
/// exchange, when it is a positive integer (anything else routes at once).
fn positive_delay(headers: &Headers) -> Option<Duration> {
    match headers.get("x-delay")?.as_i64()? {
        ms if ms > 0 => Some(Duration::from_millis(ms as u64)),
        _ => None,
    }
}

/// The `CC` and `BCC` keys of a message (sender-selected distribution),
/// with `BCC` removed from its headers; `None` when it has neither. As
/// RabbitMQ does, a `CC`/`BCC` header that is not an array refuses the
/// publish (406), and array elements that are not strings are ignored.
#[allow(clippy::type_complexity)]
fn sender_selected(message: &mut Message) -> Result<Option<(Vec<Arc<str>>, Vec<Arc<str>>)>> {
    let h = &mut message.headers;
    if !h.contains_key("CC") && !h.contains_key("BCC") {
        return Ok(None);
    }
    for name in ["CC", "BCC"] {
        if let Some(v) = h.get(name) {
            if !matches!(v, HeaderValue::Array(_)) {
                return Err(reply::precondition_failed(
                    Op::BasicPublish,
                    "",
                    format_args!(
                        "invalid message: {{unacceptable_type_in_header,\"{name}\",{}}}",
                        amqp_type(v)
                    ),
                ));
            }
        }
    }
    let cc = string_keys(h.get("CC"));
    let bcc = string_keys(h.remove("BCC").as_ref());
    // The table was on the wire; removing `BCC` leaves it, maybe empty.
    h.set_table(true);
    Ok(Some((cc, bcc)))
}

/// The string elements of an array header.
fn string_keys(v: Option<&HeaderValue>) -> Vec<Arc<str>> {
    match v {
        Some(HeaderValue::Array(a)) => a
            .iter()
            .filter_map(|x| match x {
                HeaderValue::String(s) => Some(Arc::from(s.as_str())),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// RabbitMQ's name of a field value's AMQP type (as in its error texts).
pub(crate) fn amqp_type(v: &HeaderValue) -> &'static str {
    match v {
        HeaderValue::Bool(_) => "bool",
        HeaderValue::I8(_) => "byte",
        HeaderValue::U8(_) => "unsignedbyte",
        HeaderValue::I16(_) => "short",
        HeaderValue::U16(_) => "unsignedshort",
        HeaderValue::I32(_) => "signedint",
        HeaderValue::U32(_) => "unsignedint",
        HeaderValue::I64(_) => "long",
        HeaderValue::F32(_) => "float",
        HeaderValue::F64(_) => "double",
        HeaderValue::String(_) => "longstr",
        HeaderValue::Bytes(_) => "binary",
        HeaderValue::Timestamp(_) => "timestamp",
        HeaderValue::Array(_) => "array",
        HeaderValue::Table(_) => "table",
        HeaderValue::Void => "void",
        _ => "unknown",
    }
}

/// RabbitMQ 3.10's cycle rule (`rabbit_dead_letter:is_cycle`), applied to
/// every queue a dead letter not caused by a rejection routes to, with the
/// dead letter's updated `x-death` (see [`record_death`] for its order):
/// dead-lettering to `queue` cycles when an entry for `queue` is in the
/// list and neither it nor any entry before it is a `rejected` one (an
/// element that is not a table counts as a rejection: a client put it
/// there). Such a cycle is "fully automatic" and the copy is dropped.
fn is_cycle(queue: &str, deaths: &[HeaderValue]) -> bool {
    let Some(at) = deaths
        .iter()
        .position(|d| d.as_table().is_some_and(|t| t.get_str("queue") == Some(queue)))
    else {
        return false;
    };
    deaths[..=at]
        .iter()
        .all(|d| d.as_table().is_some_and(|t| t.get_str("reason") != Some("rejected")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (Arc<Broker>, u64, u64, Arc<Outbox>) {
        let b = Broker::new();
        let (conn, cid, outbox) = b.with(|st, fx| {
            let conn = st.open_conn();
            st.declare_queue(conn, &QueueSpec::new("q"), fx).unwrap();
            for i in 0..3 {
                st.publish(
                    conn,
                    &Arc::from(""),
                    &Arc::from("q"),
                    Message::new(format!("{i}")),
                    false,
                    fx,
                )
                .unwrap();
            }
            let (cid, _, outbox) = st
                .consume(conn, "q", &ConsumeOptions::default().prefetch(100), fx)
                .unwrap();
            (conn, cid, outbox)
        });
        (b, conn, cid, outbox)
    }

    #[test]
    fn unknown_and_double_settlements_fail() {
        let (b, _conn, cid, outbox) = setup();
        // The lock-free path takes the lowest unsettled tag, once.
        assert!(!outbox.fast_ack(2), "2 is not the lowest unsettled tag");
        assert!(outbox.fast_ack(1));
        assert!(!outbox.fast_ack(1));
        assert!(!outbox.fast_ack(4), "never delivered");
        b.with(|st, fx| {
            assert_eq!(st.settle(cid, 1, Settle::Ack, fx).unwrap_err().code(), "settle_failed");
            assert_eq!(st.settle(cid, 99, Settle::Ack, fx).unwrap_err().code(), "settle_failed");
            assert_eq!(st.settle(cid, 0, Settle::Ack, fx).unwrap_err().code(), "settle_failed");
            st.settle(cid, 3, Settle::Ack, fx).unwrap();
            assert_eq!(
                st.settle(cid, 3, Settle::Requeue, fx).unwrap_err().code(),
                "settle_failed"
            );
        });
        // A hole (3 settled before 2) turns the lock-free path off...
        assert!(!outbox.fast_ack(2));
        b.with(|st, fx| {
            st.settle(cid, 2, Settle::Ack, fx).unwrap();
            let c = &st.consumers[&cid];
            assert_eq!((c.live, c.unacked.len(), c.holes), (0, 0, 0));
        });
        // ...until it is filled.
        assert!(!outbox.holes.load(Ordering::Acquire));
    }

    #[test]
    fn only_a_full_window_asks_acks_to_refill() {
        // prefetch 2, three messages ready: the third waits, the window is full.
        let b = Broker::new();
        let (conn, cid, outbox) = b.with(|st, fx| {
            let conn = st.open_conn();
            st.declare_queue(conn, &QueueSpec::new("q"), fx).unwrap();
            let (cid, _, outbox) = st
                .consume(conn, "q", &ConsumeOptions::default().prefetch(2), fx)
                .unwrap();
            (conn, cid, outbox)
        });
        let publish = |body: &str| {
            b.with(|st, fx| {
                st.publish(
                    conn,
                    &Arc::from(""),
                    &Arc::from("q"),
                    Message::new(body.to_owned()),
                    false,
                    fx,
                )
                .unwrap()
            });
        };
        publish("a");
        publish("b");
        assert!(!outbox.starved.load(Ordering::SeqCst), "window not full yet");
        publish("c");
        assert!(
            outbox.starved.load(Ordering::SeqCst),
            "the third message waits for the window"
        );
        assert_eq!(b.state.lock().queues["q"].ready, 1);
        // An ack then refills (here by hand, as the acker does), which
        // delivers the waiting message and clears the flag until the window
        // is found full again.
        assert!(outbox.fast_ack(1));
        b.with(|st, fx| st.refill(cid, fx));
        assert_eq!(b.state.lock().queues["q"].ready, 0);
        assert_eq!(outbox.delivered_upto.load(Ordering::SeqCst), 3);
        assert!(!outbox.starved.load(Ordering::SeqCst));
    }

    #[test]
    fn released_channel_requeues_and_refuses_later_acks() {
        let (b, _conn, cid, outbox) = setup();
        b.with(|st, fx| st.release_channel(cid, fx));
        assert!(!outbox.fast_ack(1));
        b.with(|st, fx| {
            assert_eq!(st.settle(cid, 1, Settle::Ack, fx).unwrap_err().code(), "settle_failed");
            let q = &st.queues["q"];
            assert_eq!(q.ready, 3);
            assert!(q.levels[0].iter().all(|m| m.redelivered));
        });
    }

    #[test]
    fn message_allocations_are_reused() {
        let (b, conn, cid, outbox) = setup();
        // The application took the deliveries (the stream drops its shares).
        outbox.inner.lock().buf.clear();
        assert!(outbox.fast_ack(1));
        b.with(|st, fx| {
            st.refill(cid, fx);
            assert_eq!(st.consumers.pool.len(), 1);
            let slot = Arc::as_ptr(&st.consumers.pool[0]);
            st.publish(conn, &Arc::from(""), &Arc::from("q"), Message::new("new"), false, fx)
                .unwrap();
            assert!(st.consumers.pool.is_empty());
            let reused = st.consumers[&cid].unacked.back().unwrap().as_ref().unwrap();
            assert_eq!(Arc::as_ptr(&reused.message), slot);
            assert_eq!(&reused.message.body[..], b"new");
        });
    }

    /// `(queue, reason, count)` of each `x-death` entry, in order.
    fn deaths(m: &Message) -> Vec<(String, String, i64)> {
        let Some(HeaderValue::Array(a)) = m.headers.get("x-death") else {
            return Vec::new();
        };
        a.iter()
            .map(|d| {
                let t = d.as_table().unwrap();
                (
                    t.get_str("queue").unwrap().to_owned(),
                    t.get_str("reason").unwrap().to_owned(),
                    t.get_i64("count").unwrap(),
                )
            })
            .collect()
    }

    fn die(m: &mut Message, queue: &str, reason: &str) {
        record_death(m, queue, "", vec![queue.to_owned()], reason);
    }

    fn death(queue: &str, reason: &str, count: i64) -> (String, String, i64) {
        (queue.to_owned(), reason.to_owned(), count)
    }

    #[test]
    fn x_death_is_regrouped_in_reverse_before_each_death() {
        let mut m = Message::new("m");
        for q in ["q1", "q2", "q3", "q4"] {
            die(&mut m, q, "expired");
        }
        let e = |q| death(q, "expired", 1);
        assert_eq!(deaths(&m), vec![e("q4"), e("q2"), e("q1"), e("q3")]);
        assert_eq!(m.headers.get_str("x-first-death-queue"), Some("q1"));
        // An existing entry is counted, keeps its time, and goes first.
        let Some(HeaderValue::Array(mut a)) = m.headers.remove("x-death") else {
            panic!()
        };
        let HeaderValue::Table(q2) = &mut a[1] else { panic!() };
        q2.insert("time", HeaderValue::Timestamp(1));
        m.headers.insert("x-death", HeaderValue::Array(a));
        die(&mut m, "q2", "expired");
        assert_eq!(deaths(&m), vec![death("q2", "expired", 2), e("q3"), e("q1"), e("q4")]);
        let Some(HeaderValue::Array(a)) = m.headers.get("x-death") else {
            panic!()
        };
        assert_eq!(a[0].as_table().unwrap().get("time"), Some(&HeaderValue::Timestamp(1)));
    }

    #[test]
    fn client_death_headers_are_replaced_or_regrouped() {
        // x-first-death-* without x-death: replaced.
        let mut m = Message::new("m").with_header("x-first-death-reason", "mine");
        die(&mut m, "q", "rejected");
        assert_eq!(m.headers.get_str("x-first-death-reason"), Some("rejected"));
        // An x-death that is not an array: replaced by one entry, and no
        // x-first-death-* headers.
        let mut m = Message::new("m").with_header("x-death", "not an array");
        die(&mut m, "q", "rejected");
        assert_eq!(deaths(&m), vec![death("q", "rejected", 1)]);
        assert_eq!(m.headers.get("x-first-death-reason"), None);
        // Entries without a count, twice for one queue and reason: the
        // first kept with the number of entries as its count.
        let entry = |q: &str| {
            let mut t = Headers::new();
            t.insert("queue", q);
            t.insert("reason", "expired");
            HeaderValue::Table(t)
        };
        let mut m =
            Message::new("m").with_header("x-death", HeaderValue::Array(vec![entry("a"), entry("b"), entry("a")]));
        die(&mut m, "c", "maxlen");
        assert_eq!(
            deaths(&m),
            vec![
                death("c", "maxlen", 1),
                death("b", "expired", 1),
                death("a", "expired", 2)
            ]
        );
    }

    #[test]
    fn a_cycle_is_automatic_only_without_a_rejection_up_to_the_queue() {
        let mut m = Message::new("m");
        die(&mut m, "a", "rejected");
        die(&mut m, "b", "expired");
        // [b expired, a rejected]
        let Some(HeaderValue::Array(d)) = m.headers.get("x-death") else {
            panic!()
        };
        assert!(is_cycle("b", d));
        assert!(!is_cycle("a", d));
        assert!(!is_cycle("c", d));
        die(&mut m, "a", "expired");
        // Regrouped [a rejected, b expired], then [a expired, a rejected, b
        // expired]: b is behind the rejection.
        let Some(HeaderValue::Array(d)) = m.headers.get("x-death") else {
            panic!()
        };
        assert!(is_cycle("a", d));
        assert!(!is_cycle("b", d));
        let d = vec![HeaderValue::from("junk"), d[0].clone()];
        assert!(!is_cycle("a", &d));
    }
}
