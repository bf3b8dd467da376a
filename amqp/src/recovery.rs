//! Client-agnostic recovery pieces of the engine: the registry of declared
//! topology and consumers, reconnect backoff and the observable connection
//! state.
//!
//! When a connection drops, the engine's supervisor:
//!
//! 1. sets [`ConnectionState::Reconnecting`] on its [`StateWatch`] (callers of
//!    `publish` now wait in [`StateWatch::wait_connected`], bounded by
//!    [`RecoveryConfig::publish_wait_timeout`]),
//! 2. reconnects, sleeping [`BackoffPolicy`] delays between attempts (and
//!    gives up after [`BackoffPolicy::max_attempts`] when set),
//! 3. replays the topology with [`TopologyRegistry::replay`] (server-named
//!    queues get new names; [`TopologyRegistry::resolve_queue`] maps the
//!    name the application knows to the current one),
//! 4. restarts each registered consumer ([`ConsumerRegistry`]), feeding the
//!    same sink (so the application's `Subscription` keeps streaming),
//! 5. sets [`ConnectionState::Connected`]; publishes that lost their
//!    channel are sent again by their callers until confirmed.
//!
//! ```
//! use std::time::Duration;
//! use switchyard_amqp::recovery::{BackoffPolicy, ConnectionState, StateWatch};
//!
//! let policy = BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(5));
//! let delays: Vec<_> = policy.delays().take(4).collect();
//! assert!(delays[3] >= delays[0]);
//! assert!(delays.iter().all(|d| *d <= Duration::from_secs(5)));
//!
//! let state = StateWatch::new("demo");
//! assert_eq!(state.get(), ConnectionState::Connecting);
//! state.set(ConnectionState::Connected);
//! assert!(state.get().is_connected());
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

use switchyard_core::ConsumeOptions;
use switchyard_core::{Binding, ExchangeSpec, QueueSpec};
use switchyard_core::{Error, Result};

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// How a transport recovers from a lost connection.
#[derive(Debug, Clone, PartialEq)]
pub struct RecoveryConfig {
    /// Reconnect automatically when the connection drops (default true).
    pub enabled: bool,
    /// Delays between reconnect attempts.
    pub backoff: BackoffPolicy,
    /// How long a `publish` may wait for the connection to come back and for
    /// its confirm (republishing as needed) before it fails with
    /// [`Error::PublishUnconfirmed`] (default 30 s).
    pub publish_wait_timeout: Duration,
}

impl Default for RecoveryConfig {
    fn default() -> Self {
        RecoveryConfig {
            enabled: true,
            backoff: BackoffPolicy::default(),
            publish_wait_timeout: Duration::from_secs(30),
        }
    }
}

impl RecoveryConfig {
    /// Disables automatic recovery: a lost connection closes the transport.
    pub fn disabled() -> Self {
        RecoveryConfig {
            enabled: false,
            ..Default::default()
        }
    }
    /// Sets the publish wait deadline.
    pub fn publish_wait_timeout(mut self, d: Duration) -> Self {
        self.publish_wait_timeout = d;
        self
    }
    /// Sets the backoff policy.
    pub fn backoff(mut self, b: BackoffPolicy) -> Self {
        self.backoff = b;
        self
    }
}

// ---------------------------------------------------------------------------
// Backoff
// ---------------------------------------------------------------------------

/// Exponential backoff with a cap and random jitter.
///
/// Attempt `n` (0-based) waits `min(cap, initial * factor^n)`, then jitter
/// scales it by a random factor in `[1 - jitter, 1]` so that many clients
/// do not reconnect in lock-step.
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffPolicy {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Growth factor per attempt (≥ 1).
    pub factor: f64,
    /// Fraction of each delay that is randomised away (0 = none, at most 1).
    pub jitter: f64,
    /// Give up after this many attempts (`None`: retry forever, until the
    /// transport is closed).
    pub max_attempts: Option<u32>,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy::new(Duration::from_millis(200), Duration::from_secs(5))
    }
}

impl BackoffPolicy {
    /// Doubling backoff from `initial` up to `max`, 20% jitter, unlimited attempts.
    pub fn new(initial: Duration, max: Duration) -> Self {
        BackoffPolicy {
            initial,
            max: max.max(initial),
            factor: 2.0,
            jitter: 0.2,
            max_attempts: None,
        }
    }
    /// Sets the attempt limit.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    /// Sets the jitter fraction (clamped to 0..=1).
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = j.clamp(0.0, 1.0);
        self
    }
    /// The delay before retry `attempt` (0-based), jitter applied.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self.initial.as_secs_f64() * self.factor.max(1.0).powi(attempt.min(64) as i32);
        let capped = base.min(self.max.as_secs_f64());
        let j = self.jitter.clamp(0.0, 1.0);
        let scaled = capped * (1.0 - j * random_unit());
        Duration::from_secs_f64(scaled.max(0.0))
    }
    /// The successive delays; ends after `max_attempts` if set.
    pub fn delays(&self) -> Backoff {
        Backoff {
            policy: self.clone(),
            attempt: 0,
        }
    }
}

/// An iterator of backoff delays (see [`BackoffPolicy::delays`]).
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
}

impl Backoff {
    /// Attempts handed out so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }
    /// Starts over from the initial delay (after a successful reconnect).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

impl Iterator for Backoff {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        if let Some(max) = self.policy.max_attempts {
            if self.attempt >= max {
                return None;
            }
        }
        let d = self.policy.delay(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        Some(d)
    }
}

/// A uniformly distributed number in `[0, 1)` from the std hasher's random seed.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

// ---------------------------------------------------------------------------
// Connection state
// ---------------------------------------------------------------------------

/// The state of a transport's connection, for health checks and waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// The first connection is being made.
    Connecting,
    /// Connected; operations proceed.
    Connected,
    /// Connected, but the broker blocks publishing on it (a memory or disk
    /// alarm). Consumers and acks proceed; publishes wait.
    Blocked,
    /// The connection dropped; reconnecting (`attempt` counts from 1).
    Reconnecting {
        /// Reconnect attempts made so far in this outage.
        attempt: u32,
    },
    /// Closed by the application, or recovery gave up: terminal.
    Closed,
}

impl ConnectionState {
    /// True when connected (blocked or not).
    pub fn is_connected(&self) -> bool {
        matches!(self, ConnectionState::Connected | ConnectionState::Blocked)
    }
    /// True when closed (terminal).
    pub fn is_closed(&self) -> bool {
        matches!(self, ConnectionState::Closed)
    }
}

impl fmt::Display for ConnectionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectionState::Connecting => f.write_str("connecting"),
            ConnectionState::Connected => f.write_str("connected"),
            ConnectionState::Blocked => f.write_str("blocked by the broker (resource alarm)"),
            ConnectionState::Reconnecting { attempt } => write!(f, "reconnecting (attempt {attempt})"),
            ConnectionState::Closed => f.write_str("closed"),
        }
    }
}

/// The observable connection state of one transport, with logging of every
/// change and a generation counter that grows on each (re)connect.
///
/// Cheap to clone; clones share the state.
#[derive(Clone)]
pub struct StateWatch {
    inner: Arc<StateInner>,
}

struct StateInner {
    name: String,
    tx: watch::Sender<ConnectionState>,
    generation: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl fmt::Debug for StateWatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateWatch")
            .field("name", &self.inner.name)
            .field("state", &self.get())
            .field("generation", &self.generation())
            .finish()
    }
}

impl StateWatch {
    /// A watch in state [`ConnectionState::Connecting`]; `name` identifies
    /// the transport in logs (use a redacted URL or connection name, never
    /// a password).
    pub fn new(name: impl Into<String>) -> Self {
        let (tx, _) = watch::channel(ConnectionState::Connecting);
        StateWatch {
            inner: Arc::new(StateInner {
                name: name.into(),
                tx,
                generation: AtomicU64::new(0),
                last_error: Mutex::new(None),
            }),
        }
    }

    /// The current state.
    pub fn get(&self) -> ConnectionState {
        *self.inner.tx.borrow()
    }

    /// The number of times the state became [`ConnectionState::Connected`]
    /// (1 after the first connect, 2 after the first recovery, ...).
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Why the connection was last lost, if it was.
    pub fn last_error(&self) -> Option<String> {
        self.inner.last_error.lock().clone()
    }

    /// Records why the connection was lost (shown by health checks).
    pub fn set_last_error(&self, why: impl Into<String>) {
        *self.inner.last_error.lock() = Some(why.into());
    }

    /// Changes the state, logging the transition. Leaving
    /// [`ConnectionState::Closed`] is refused (it is terminal).
    pub fn set(&self, state: ConnectionState) {
        let mut changed = None;
        self.inner.tx.send_if_modified(|cur| {
            if *cur == state || cur.is_closed() {
                return false;
            }
            changed = Some(*cur);
            *cur = state;
            true
        });
        let Some(old) = changed else { return };
        if state == ConnectionState::Blocked {
            tracing::warn!(transport = %self.inner.name, "the broker blocks publishing (resource alarm)");
        } else if old == ConnectionState::Blocked && state == ConnectionState::Connected {
            tracing::info!(transport = %self.inner.name, "the broker unblocked publishing");
        } else if state.is_connected() {
            let g = self.inner.generation.fetch_add(1, Ordering::AcqRel) + 1;
            if g > 1 {
                tracing::info!(transport = %self.inner.name, generation = g, "connection recovered (was {old})");
            } else {
                tracing::info!(transport = %self.inner.name, "connected");
            }
        } else if let ConnectionState::Reconnecting { attempt } = state {
            let why = self.last_error().unwrap_or_default();
            if attempt <= 1 {
                tracing::warn!(transport = %self.inner.name, error = %why, "connection lost; reconnecting");
            } else {
                tracing::info!(transport = %self.inner.name, attempt, "reconnect attempt");
            }
        } else {
            tracing::info!(transport = %self.inner.name, "connection state: {old} -> {state}");
        }
    }

    /// A receiver that sees every later change.
    pub fn subscribe(&self) -> watch::Receiver<ConnectionState> {
        self.inner.tx.subscribe()
    }

    /// Waits until connected. Fails with [`Error::Shutdown`] once closed and
    /// with [`Error::ConnectionClosed`] if `deadline` passes first.
    pub async fn wait_connected(&self, deadline: Instant) -> Result<()> {
        let mut rx = self.subscribe();
        loop {
            let s = *rx.borrow_and_update();
            match s {
                ConnectionState::Connected | ConnectionState::Blocked => return Ok(()),
                ConnectionState::Closed => {
                    return Err(Error::Shutdown {
                        what: format!("transport {}", self.inner.name),
                    })
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => unreachable!("the sender lives in self"),
                Err(_) => {
                    return Err(Error::ConnectionClosed {
                        reply: None,
                        message: format!(
                            "transport {} still {} at the deadline{}",
                            self.inner.name,
                            self.get(),
                            self.last_error()
                                .map(|e| format!(" (last error: {e})"))
                                .unwrap_or_default()
                        ),
                    })
                }
            }
        }
    }

    /// Waits until the state is [`ConnectionState::Closed`].
    pub async fn wait_closed(&self) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|s| s.is_closed()).await;
    }
}

// ---------------------------------------------------------------------------
// Topology registry
// ---------------------------------------------------------------------------

/// One declaration recorded by a [`TopologyRegistry`].
#[derive(Debug, Clone, PartialEq)]
pub enum TopologyEntry {
    /// An exchange.
    Exchange(ExchangeSpec),
    /// A queue. For a server-named queue `spec.name` is empty and `name` is
    /// the name the broker gave it first (the one the application knows).
    Queue {
        /// The spec as declared.
        spec: QueueSpec,
        /// The name the application knows.
        name: String,
    },
    /// A binding (its destination as the application named it).
    Binding(Binding),
}

/// Declares topology on a fresh connection during recovery. Implemented by
/// transports over their raw client (not over their `Admin`, which would
/// record the declarations again).
#[async_trait]
pub trait TopologyDeclarer: Send + Sync {
    /// Declares an exchange.
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()>;
    /// Declares a queue and returns its name (new for a server-named queue).
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<String>;
    /// Creates a binding (names already resolved).
    async fn bind(&self, binding: &Binding) -> Result<()>;
}

/// The topology a transport declared, in order, replayable after a
/// reconnect.
///
/// Deletes remove entries (deleting a queue also forgets its bindings);
/// re-declaring the same entity replaces its entry in place. Server-named
/// queues keep the name the application first received; after a replay
/// [`resolve_queue`](Self::resolve_queue) maps it to the current one.
#[derive(Debug, Default)]
pub struct TopologyRegistry {
    inner: Mutex<TopologyInner>,
}

#[derive(Debug, Default)]
struct TopologyInner {
    entries: Vec<TopologyEntry>,
    /// Application-known server-generated name -> current broker name.
    renamed: HashMap<String, String>,
}

impl TopologyRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a declared exchange.
    pub fn record_exchange(&self, spec: &ExchangeSpec) {
        let mut g = self.inner.lock();
        if let Some(e) = g
            .entries
            .iter_mut()
            .find(|e| matches!(e, TopologyEntry::Exchange(x) if x.name == spec.name))
        {
            *e = TopologyEntry::Exchange(spec.clone());
        } else {
            g.entries.push(TopologyEntry::Exchange(spec.clone()));
        }
    }

    /// Records a declared queue; `name` is the name the broker returned.
    pub fn record_queue(&self, spec: &QueueSpec, name: &str) {
        let mut g = self.inner.lock();
        let entry = TopologyEntry::Queue {
            spec: spec.clone(),
            name: name.to_owned(),
        };
        if let Some(e) = g
            .entries
            .iter_mut()
            .find(|e| matches!(e, TopologyEntry::Queue { name: n, .. } if n == name))
        {
            *e = entry;
        } else {
            g.entries.push(entry);
        }
    }

    /// Records a binding (duplicates are kept once).
    pub fn record_binding(&self, binding: &Binding) {
        let mut g = self.inner.lock();
        if !g
            .entries
            .iter()
            .any(|e| matches!(e, TopologyEntry::Binding(b) if b == binding))
        {
            g.entries.push(TopologyEntry::Binding(binding.clone()));
        }
    }

    /// Forgets a binding (after an unbind).
    pub fn remove_binding(&self, binding: &Binding) {
        self.inner
            .lock()
            .entries
            .retain(|e| !matches!(e, TopologyEntry::Binding(b) if b == binding));
    }

    /// Forgets an exchange and every binding from or to it.
    pub fn remove_exchange(&self, name: &str) {
        self.inner.lock().entries.retain(|e| match e {
            TopologyEntry::Exchange(x) => x.name != name,
            TopologyEntry::Binding(b) => b.source != name && !(b.destination_is_exchange && b.destination == name),
            _ => true,
        });
    }

    /// Forgets a queue (by the name the application knows, or its current
    /// name) and every binding to it.
    pub fn remove_queue(&self, name: &str) {
        let mut g = self.inner.lock();
        let known = g
            .renamed
            .iter()
            .find(|(_, cur)| cur.as_str() == name)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| name.to_owned());
        g.renamed.remove(&known);
        g.entries.retain(|e| match e {
            TopologyEntry::Queue { name: n, .. } => *n != known,
            TopologyEntry::Binding(b) => b.destination_is_exchange || b.destination != known,
            _ => true,
        });
    }

    /// The current broker name of queue `name` (differs from `name` only for
    /// a server-named queue re-declared by a recovery).
    pub fn resolve_queue(&self, name: &str) -> String {
        self.inner
            .lock()
            .renamed
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_owned())
    }

    /// The recorded declarations, in order.
    pub fn entries(&self) -> Vec<TopologyEntry> {
        self.inner.lock().entries.clone()
    }

    /// Number of recorded declarations.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// True if nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-declares everything through `declarer`, in order: server-named
    /// queues are declared anew and their new names recorded; bindings to
    /// them use the new names. Stops at the first error (the caller retries
    /// the whole recovery).
    pub async fn replay(&self, declarer: &dyn TopologyDeclarer) -> Result<()> {
        let entries = self.entries();
        for e in &entries {
            match e {
                TopologyEntry::Exchange(x) => declarer.declare_exchange(x).await?,
                TopologyEntry::Queue { spec, name } => {
                    let new_name = declarer.declare_queue(spec).await?;
                    if spec.name.is_empty() {
                        let mut g = self.inner.lock();
                        if new_name != *name {
                            tracing::info!(queue = %name, now = %new_name, "server-named queue re-declared");
                            g.renamed.insert(name.clone(), new_name);
                        } else {
                            g.renamed.remove(name);
                        }
                    }
                }
                TopologyEntry::Binding(b) => {
                    let mut b = b.clone();
                    if !b.destination_is_exchange {
                        b.destination = self.resolve_queue(&b.destination);
                    }
                    declarer.bind(&b).await?;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Consumer registry
// ---------------------------------------------------------------------------

/// Identifies a registered consumer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerId(pub u64);

/// A consumer to restart after a reconnect.
#[derive(Debug, Clone)]
pub struct ConsumerEntry<S> {
    /// The queue as the application named it (resolve it through
    /// [`TopologyRegistry::resolve_queue`] before consuming).
    pub queue: String,
    /// The consumer's options (its consumer tag included, so the restarted
    /// consumer keeps it).
    pub options: ConsumeOptions,
    /// Where its deliveries go: the transport's channel or sender feeding
    /// the application's `Subscription`.
    pub sink: S,
}

/// The consumers a transport runs, in registration order, each with the
/// sink its deliveries feed, so a recovery restarts them into the same
/// `Subscription` streams. `S` is the transport's sink type (e.g. an
/// `mpsc::Sender`), cloned out by [`entries`](Self::entries).
#[derive(Debug)]
pub struct ConsumerRegistry<S> {
    inner: Mutex<BTreeMap<ConsumerId, ConsumerEntry<S>>>,
    next: AtomicU64,
}

impl<S> Default for ConsumerRegistry<S> {
    fn default() -> Self {
        ConsumerRegistry {
            inner: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1),
        }
    }
}

impl<S: Clone> ConsumerRegistry<S> {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a consumer; returns its id for [`remove`](Self::remove).
    pub fn register(&self, queue: &str, options: ConsumeOptions, sink: S) -> ConsumerId {
        let id = ConsumerId(self.next.fetch_add(1, Ordering::Relaxed));
        self.inner.lock().insert(
            id,
            ConsumerEntry {
                queue: queue.to_owned(),
                options,
                sink,
            },
        );
        id
    }

    /// Forgets a consumer (cancelled by the client or the broker); returns
    /// its entry if it was registered.
    pub fn remove(&self, id: ConsumerId) -> Option<ConsumerEntry<S>> {
        self.inner.lock().remove(&id)
    }

    /// The entry of `id`.
    pub fn get(&self, id: ConsumerId) -> Option<ConsumerEntry<S>> {
        self.inner.lock().get(&id).cloned()
    }

    /// Replaces the sink of `id` (e.g. a per-connection handle); false if absent.
    pub fn update_sink(&self, id: ConsumerId, sink: S) -> bool {
        match self.inner.lock().get_mut(&id) {
            Some(e) => {
                e.sink = sink;
                true
            }
            None => false,
        }
    }

    /// Every registered consumer, in registration order.
    pub fn entries(&self) -> Vec<(ConsumerId, ConsumerEntry<S>)> {
        self.inner.lock().iter().map(|(k, v)| (*k, v.clone())).collect()
    }

    /// Forgets every consumer on `queue` (after the queue was deleted);
    /// returns their ids.
    pub fn remove_queue(&self, queue: &str) -> Vec<ConsumerId> {
        let mut g = self.inner.lock();
        let ids: Vec<_> = g.iter().filter(|(_, e)| e.queue == queue).map(|(k, _)| *k).collect();
        for id in &ids {
            g.remove(id);
        }
        ids
    }

    /// Number of registered consumers.
    pub fn len(&self) -> usize {
        self.inner.lock().len()
    }

    /// True if none is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_stops() {
        let p = BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(1))
            .jitter(0.0)
            .max_attempts(6);
        let d: Vec<_> = p.delays().collect();
        assert_eq!(d.len(), 6);
        assert_eq!(d[0], Duration::from_millis(100));
        assert_eq!(d[1], Duration::from_millis(200));
        assert_eq!(d[3], Duration::from_millis(800));
        assert_eq!(d[4], Duration::from_secs(1));
        assert_eq!(d[5], Duration::from_secs(1));
        let j = BackoffPolicy::new(Duration::from_millis(100), Duration::from_secs(1)).jitter(0.5);
        for _ in 0..100 {
            let x = j.delay(0);
            assert!(
                x >= Duration::from_millis(50) && x <= Duration::from_millis(100),
                "{x:?}"
            );
        }
    }

    #[tokio::test]
    async fn state_watch_counts_generations_and_waits() {
        let s = StateWatch::new("t");
        assert_eq!(s.generation(), 0);
        s.set(ConnectionState::Connected);
        assert_eq!(s.generation(), 1);
        s.set_last_error("broker closed the connection");
        s.set(ConnectionState::Reconnecting { attempt: 1 });
        let err = s
            .wait_connected(Instant::now() + Duration::from_millis(20))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "connection_closed");
        assert!(err.to_string().contains("broker closed"), "{err}");
        let s2 = s.clone();
        let t = tokio::spawn(async move { s2.wait_connected(Instant::now() + Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        s.set(ConnectionState::Connected);
        t.await.unwrap().unwrap();
        assert_eq!(s.generation(), 2);
        s.set(ConnectionState::Closed);
        s.set(ConnectionState::Connected);
        assert_eq!(s.get(), ConnectionState::Closed, "closed is terminal");
        let err = s
            .wait_connected(Instant::now() + Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "shutdown");
    }

    #[derive(Default)]
    struct FakeDeclarer {
        log: Mutex<Vec<String>>,
        counter: AtomicU64,
    }

    #[async_trait]
    impl TopologyDeclarer for FakeDeclarer {
        async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()> {
            self.log.lock().push(format!("exchange {}", spec.name));
            Ok(())
        }
        async fn declare_queue(&self, spec: &QueueSpec) -> Result<String> {
            let name = if spec.name.is_empty() {
                format!("amq.gen-{}", self.counter.fetch_add(1, Ordering::Relaxed) + 100)
            } else {
                spec.name.clone()
            };
            self.log.lock().push(format!("queue {name}"));
            Ok(name)
        }
        async fn bind(&self, b: &Binding) -> Result<()> {
            self.log
                .lock()
                .push(format!("bind {}->{}:{}", b.source, b.destination, b.routing_key));
            Ok(())
        }
    }

    #[tokio::test]
    async fn topology_replays_in_order_and_renames_server_named_queues() {
        let r = TopologyRegistry::new();
        r.record_exchange(&ExchangeSpec::topic("ex"));
        r.record_queue(&QueueSpec::new("q1"), "q1");
        r.record_queue(&QueueSpec::temporary(), "amq.gen-1");
        r.record_binding(&Binding::queue("q1", "ex", "a.#"));
        r.record_binding(&Binding::queue("amq.gen-1", "ex", "b.*"));
        r.record_binding(&Binding::queue("amq.gen-1", "ex", "b.*"));
        r.record_exchange(&ExchangeSpec::topic("ex")); // re-declare: replaced in place
        r.record_queue(&QueueSpec::new("gone"), "gone");
        r.record_binding(&Binding::queue("gone", "ex", "g"));
        r.remove_queue("gone");
        r.record_binding(&Binding::queue("q1", "ex", "x"));
        r.remove_binding(&Binding::queue("q1", "ex", "x"));
        assert_eq!(r.len(), 5);

        let d = FakeDeclarer::default();
        r.replay(&d).await.unwrap();
        assert_eq!(
            *d.log.lock(),
            vec![
                "exchange ex",
                "queue q1",
                "queue amq.gen-100",
                "bind ex->q1:a.#",
                "bind ex->amq.gen-100:b.*"
            ]
        );
        assert_eq!(r.resolve_queue("amq.gen-1"), "amq.gen-100");
        assert_eq!(r.resolve_queue("q1"), "q1");
        // A second recovery renames again, from the application's name.
        r.replay(&d).await.unwrap();
        assert_eq!(r.resolve_queue("amq.gen-1"), "amq.gen-101");
        // Deleting by the current name forgets the queue and its bindings.
        r.remove_queue("amq.gen-101");
        assert_eq!(r.len(), 3);
        r.remove_exchange("ex");
        assert_eq!(
            r.entries(),
            vec![TopologyEntry::Queue {
                spec: QueueSpec::new("q1"),
                name: "q1".into()
            }]
        );
    }

    #[test]
    fn consumer_registry_keeps_order_and_sinks() {
        let r: ConsumerRegistry<&'static str> = ConsumerRegistry::new();
        let a = r.register("q1", ConsumeOptions::default(), "sink-a");
        let b = r.register("q2", ConsumeOptions::default().prefetch(5), "sink-b");
        let c = r.register("q1", ConsumeOptions::default(), "sink-c");
        let e = r.entries();
        assert_eq!(e.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![a, b, c]);
        assert_eq!(e[1].1.options.prefetch, 5);
        assert!(r.update_sink(b, "sink-b2"));
        assert_eq!(r.get(b).unwrap().sink, "sink-b2");
        assert_eq!(r.remove_queue("q1"), vec![a, c]);
        assert_eq!(r.len(), 1);
        assert!(r.remove(b).is_some());
        assert!(r.is_empty());
    }
}
