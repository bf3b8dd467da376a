//! De-duplication: idempotent consumption.
//!
//! [`Dedup`] computes a key for each delivery and asks a [`DedupStore`]
//! whether that key was already handled. A duplicate is acknowledged without
//! calling the handler. A key is remembered only after the handler succeeded
//! (`Ack` or `Reply`), so a message that failed, was retried or
//! dead-lettered (and is later replayed) is handled again. Deliveries without
//! a key pass through.
//!
//! **The key** is, by default, the queue the delivery came from *and* its
//! `message_id` ([`default_key`]): one layer (one store) may serve several
//! routes, and the copies of one event that a fanout or topic exchange puts
//! in several queues are each handled once per queue — a copy in another
//! queue is not a duplicate. A [key function](DedupLayer::key_fn) replaces
//! it entirely: its key is used as is, shared by every route the layer
//! serves (include the queue in it unless that is what you want).
//!
//! **Copies in flight.** Before handling, the layer reserves the key
//! ([`DedupStore::try_reserve`]); a second copy that arrives while the first
//! is still being handled (concurrency above 1, or several consumers
//! sharing a store) waits [`in_flight_pause`](DedupLayer::in_flight_pause)
//! (100 ms by default) and checks again: acknowledged if the first copy
//! succeeded meanwhile, handled if it failed, otherwise failed as transient
//! (the Worker requeues it). The reservation is released when the handling
//! ends, also when it fails or is aborted.
//!
//! The default store, [`MemoryDedupStore`], keeps the most recent
//! `capacity` keys (least recently seen evicted first), optionally each for
//! at most a time window. It is per process: competing consumers in several
//! processes need a shared store (implement [`DedupStore`] over Redis, a
//! database…). A duplicate RPC request is acknowledged without a reply.
//!
//! ```
//! use std::time::Duration;
//! use switchyard_core::{handler_fn, Envelope};
//! use switchyard_middleware::dedup::{DedupLayer, MemoryDedupStore};
//! use tower::ServiceBuilder;
//!
//! let store = MemoryDedupStore::new(100_000).ttl(Duration::from_secs(3600));
//! let _svc = switchyard_core::handler::boxed(ServiceBuilder::new()
//!     .layer(DedupLayer::new(store))
//!     .service(handler_fn(|_env: Envelope| async {})));
//! ```

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use switchyard_core::{Envelope, Error, HandlerError, Outcome};
use tower::{Layer, Service};

use crate::util::{take_ready, BoxFuture};

/// What [`DedupStore::try_reserve`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reservation {
    /// Neither handled nor in flight: the key is now reserved for the
    /// caller, who handles the delivery, [inserts](DedupStore::insert) the
    /// key if that succeeded, and [releases](DedupStore::release) it.
    Reserved,
    /// Already handled: a duplicate.
    Duplicate,
    /// Another copy is being handled right now.
    InFlight,
}

/// Where handled keys are remembered.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// True if `key` was handled (and is still remembered).
    async fn contains(&self, key: &str) -> Result<bool, Error>;
    /// Remembers that `key` was handled.
    async fn insert(&self, key: &str) -> Result<(), Error>;

    /// Reserves `key` for one copy about to be handled, unless it was
    /// handled or another copy holds it. The default implementation tracks
    /// nothing in flight: [`Reservation::Duplicate`] if
    /// [`contains`](Self::contains), else [`Reservation::Reserved`]. A shared
    /// store should reserve atomically (e.g. Redis `SET key NX PX ttl`) with
    /// an expiry, so that a crashed consumer's reservation does not last.
    async fn try_reserve(&self, key: &str) -> Result<Reservation, Error> {
        Ok(if self.contains(key).await? {
            Reservation::Duplicate
        } else {
            Reservation::Reserved
        })
    }

    /// Ends the reservation of `key` (after [`insert`](Self::insert) when
    /// the handling succeeded). The default does nothing.
    async fn release(&self, key: &str) -> Result<(), Error> {
        let _ = key;
        Ok(())
    }
}

/// The default de-duplication key: the delivery's queue and `message_id`
/// (`<queue length>:<queue>:<message id>`, so that no two pairs give the
/// same key); `None` without a `message_id`.
pub fn default_key(env: &Envelope) -> Option<String> {
    let id = env.message_id()?;
    let queue = env.queue();
    Some(format!("{}:{queue}:{id}", queue.len()))
}

struct Lru {
    map: HashMap<Arc<str>, (u64, Instant)>,
    order: VecDeque<(Arc<str>, u64)>,
    next: u64,
    /// Keys reserved by a copy being handled.
    in_flight: HashSet<Box<str>>,
}

/// An in-memory store of the most recent `capacity` keys, least recently
/// seen evicted first, each optionally for at most a time window.
pub struct MemoryDedupStore {
    capacity: usize,
    ttl: Option<Duration>,
    lru: Mutex<Lru>,
}

impl fmt::Debug for MemoryDedupStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryDedupStore")
            .field("capacity", &self.capacity)
            .field("ttl", &self.ttl)
            .field("len", &self.len())
            .finish()
    }
}

impl MemoryDedupStore {
    /// Remembers at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        MemoryDedupStore {
            capacity: capacity.max(1),
            ttl: None,
            lru: Mutex::new(Lru {
                map: HashMap::new(),
                order: VecDeque::new(),
                next: 0,
                in_flight: HashSet::new(),
            }),
        }
    }

    /// Forgets keys older than `ttl`.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Number of keys remembered.
    pub fn len(&self) -> usize {
        self.lru.lock().map.len()
    }

    /// True if no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn touch(&self, lru: &mut Lru, key: Arc<str>, at: Instant) {
        lru.next += 1;
        let g = lru.next;
        lru.map.insert(key.clone(), (g, at));
        lru.order.push_back((key, g));
        while lru.map.len() > self.capacity {
            let Some((k, g)) = lru.order.pop_front() else { break };
            if lru.map.get(&k).is_some_and(|(cur, _)| *cur == g) {
                lru.map.remove(&k);
            }
        }
        if lru.order.len() > 2 * self.capacity + 64 {
            let map = &lru.map;
            lru.order.retain(|(k, g)| map.get(k).is_some_and(|(cur, _)| cur == g));
        }
    }

    fn seen(&self, lru: &mut Lru, key: &str) -> bool {
        let Some((k, (_, at))) = lru.map.get_key_value(key).map(|(k, v)| (k.clone(), *v)) else {
            return false;
        };
        if self.ttl.is_some_and(|ttl| at.elapsed() > ttl) {
            lru.map.remove(key);
            return false;
        }
        self.touch(lru, k, at);
        true
    }

    /// Synchronous [`DedupStore::contains`].
    pub fn contains_now(&self, key: &str) -> bool {
        let mut lru = self.lru.lock();
        self.seen(&mut lru, key)
    }

    /// Synchronous [`DedupStore::insert`].
    pub fn insert_now(&self, key: &str) {
        let mut lru = self.lru.lock();
        self.touch(&mut lru, Arc::from(key), Instant::now());
    }

    /// Synchronous [`DedupStore::try_reserve`]: handled keys first, then
    /// keys in flight.
    pub fn try_reserve_now(&self, key: &str) -> Reservation {
        let mut lru = self.lru.lock();
        if self.seen(&mut lru, key) {
            Reservation::Duplicate
        } else if lru.in_flight.insert(Box::from(key)) {
            Reservation::Reserved
        } else {
            Reservation::InFlight
        }
    }

    /// Synchronous [`DedupStore::release`].
    pub fn release_now(&self, key: &str) {
        self.lru.lock().in_flight.remove(key);
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn contains(&self, key: &str) -> Result<bool, Error> {
        Ok(self.contains_now(key))
    }
    async fn insert(&self, key: &str) -> Result<(), Error> {
        self.insert_now(key);
        Ok(())
    }
    async fn try_reserve(&self, key: &str) -> Result<Reservation, Error> {
        Ok(self.try_reserve_now(key))
    }
    async fn release(&self, key: &str) -> Result<(), Error> {
        self.release_now(key);
        Ok(())
    }
}

type KeyFn = Arc<dyn Fn(&Envelope) -> Option<String> + Send + Sync>;

/// Default of [`DedupLayer::in_flight_pause`].
pub const DEFAULT_IN_FLIGHT_PAUSE: Duration = Duration::from_millis(100);

/// Acknowledges duplicates without calling the handler; see the
/// [module docs](self).
#[derive(Clone)]
pub struct DedupLayer {
    store: Arc<dyn DedupStore>,
    key: Option<KeyFn>,
    pause: Duration,
}

impl fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DedupLayer")
    }
}

impl DedupLayer {
    /// De-duplicates by queue and `message_id` ([`default_key`]) in `store`.
    pub fn new(store: impl DedupStore) -> Self {
        Self::with_store(Arc::new(store))
    }

    /// De-duplicates by queue and `message_id` ([`default_key`]) in a shared store.
    pub fn with_store(store: Arc<dyn DedupStore>) -> Self {
        DedupLayer {
            store,
            key: None,
            pause: DEFAULT_IN_FLIGHT_PAUSE,
        }
    }

    /// De-duplicates by the key `f` computes (`None`: never a duplicate),
    /// used as is: the queue is part of it only if `f` puts it there.
    pub fn key_fn(mut self, f: impl Fn(&Envelope) -> Option<String> + Send + Sync + 'static) -> Self {
        self.key = Some(Arc::new(f));
        self
    }

    /// How long a copy that finds another copy in flight waits before
    /// checking again (and, if that copy is still in flight, failing as
    /// transient so that the Worker requeues it). Default 100 ms.
    pub fn in_flight_pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;
    fn layer(&self, inner: S) -> Dedup<S> {
        Dedup {
            inner,
            store: self.store.clone(),
            key: self.key.clone(),
            pause: self.pause,
        }
    }
}

/// The service of [`DedupLayer`].
#[derive(Clone)]
pub struct Dedup<S> {
    inner: S,
    store: Arc<dyn DedupStore>,
    key: Option<KeyFn>,
    pause: Duration,
}

impl<S: fmt::Debug> fmt::Debug for Dedup<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup").field("inner", &self.inner).finish()
    }
}

/// Releases a reservation if the handling is dropped before it ends
/// (aborted at shutdown, or by an outer timeout).
struct ReservationGuard {
    store: Arc<dyn DedupStore>,
    key: Option<String>,
}

impl ReservationGuard {
    async fn release(mut self) {
        if let Some(key) = self.key.take() {
            if let Err(e) = self.store.release(&key).await {
                tracing::warn!(key = %key, error = %e, "could not release a de-duplication reservation");
            }
        }
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let store = self.store.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = store.release(&key).await;
            });
        }
    }
}

fn store_failed(e: Error) -> HandlerError {
    HandlerError::retry(format!("de-duplication store failed: {e}")).with_source(e)
}

impl<S> Service<Envelope> for Dedup<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = BoxFuture<Result<Outcome, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        let key = match &self.key {
            Some(f) => f(&env),
            None => default_key(&env),
        };
        let Some(key) = key else {
            return Box::pin(self.inner.call(env));
        };
        let mut inner = take_ready(&mut self.inner);
        let store = self.store.clone();
        let pause = self.pause;
        Box::pin(async move {
            let mut claim = store.try_reserve(&key).await.map_err(store_failed)?;
            if claim == Reservation::InFlight {
                tokio::time::sleep(pause).await;
                claim = store.try_reserve(&key).await.map_err(store_failed)?;
            }
            match claim {
                Reservation::Reserved => {}
                Reservation::Duplicate => {
                    tracing::debug!(queue = env.queue(), key = %key, "duplicate acknowledged without handling");
                    return Ok(Outcome::Ack);
                }
                Reservation::InFlight => {
                    tracing::debug!(queue = env.queue(), key = %key, "a copy is being handled; requeueing this one");
                    return Err(HandlerError::retry(format!(
                        "another copy of this message (de-duplication key '{key}') is being handled"
                    )));
                }
            }
            let guard = ReservationGuard {
                store: store.clone(),
                key: Some(key.clone()),
            };
            let out = inner.call(env).await;
            if matches!(out, Ok(Outcome::Ack | Outcome::Reply(_) | Outcome::Publish(_))) {
                if let Err(e) = store.insert(&key).await {
                    tracing::warn!(key = %key, error = %e, "could not remember a handled message");
                }
            }
            guard.release().await;
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use switchyard_core::{handler_fn, Message};
    use tower::ServiceExt;

    #[test]
    fn reservations_and_the_default_key() {
        let s = MemoryDedupStore::new(10);
        assert_eq!(s.try_reserve_now("k"), Reservation::Reserved);
        assert_eq!(s.try_reserve_now("k"), Reservation::InFlight);
        s.release_now("k");
        assert_eq!(
            s.try_reserve_now("k"),
            Reservation::Reserved,
            "released after a failure"
        );
        s.insert_now("k");
        s.release_now("k");
        assert_eq!(s.try_reserve_now("k"), Reservation::Duplicate);
        let env = |q: &str| Envelope::for_test(Message::new("x").with_message_id("m-1"), q);
        assert_eq!(default_key(&env("orders")).as_deref(), Some("6:orders:m-1"));
        assert_ne!(default_key(&env("audit")), default_key(&env("orders")));
        assert_eq!(default_key(&Envelope::for_test(Message::new("x"), "q")), None);
    }

    #[test]
    fn lru_evicts_least_recently_seen_and_expires() {
        let s = MemoryDedupStore::new(2);
        s.insert_now("a");
        s.insert_now("b");
        assert!(s.contains_now("a")); // a is now most recent
        s.insert_now("c"); // evicts b
        assert!(s.contains_now("a"));
        assert!(!s.contains_now("b"));
        assert!(s.contains_now("c"));
        assert_eq!(s.len(), 2);
        for i in 0..1000 {
            s.contains_now("a");
            s.insert_now(&i.to_string());
        }
        assert_eq!(s.len(), 2);
        assert!(s.lru.lock().order.len() <= 2 * 2 + 64 + 1);
        let t = MemoryDedupStore::new(10).ttl(Duration::from_millis(1));
        t.insert_now("x");
        std::thread::sleep(Duration::from_millis(5));
        assert!(!t.contains_now("x"));
    }

    #[tokio::test]
    async fn duplicates_are_acked_without_calling_and_failures_are_not_remembered() {
        let calls = Arc::new(AtomicU32::new(0));
        let c = calls.clone();
        let svc = DedupLayer::new(MemoryDedupStore::new(100)).layer(handler_fn(move |e: Envelope| {
            c.fetch_add(1, Ordering::SeqCst);
            async move {
                if e.body().as_ref() == b"fail" {
                    Err(HandlerError::retry("x"))
                } else {
                    Ok(())
                }
            }
        }));
        let env = |id: &str, b: &'static str| Envelope::for_test(Message::new(b).with_message_id(id), "q");
        assert_eq!(svc.clone().oneshot(env("m1", "ok")).await.unwrap(), Outcome::Ack);
        assert_eq!(svc.clone().oneshot(env("m1", "ok")).await.unwrap(), Outcome::Ack);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        svc.clone().oneshot(env("m2", "fail")).await.unwrap_err();
        svc.clone().oneshot(env("m2", "fail")).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), 3, "failed messages are handled again");
        svc.clone()
            .oneshot(Envelope::for_test(Message::new("ok"), "q"))
            .await
            .unwrap();
        svc.clone()
            .oneshot(Envelope::for_test(Message::new("ok"), "q"))
            .await
            .unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 5, "no key, no de-duplication");
        let keyed_calls = Arc::new(AtomicU32::new(0));
        let kc = keyed_calls.clone();
        let keyed = DedupLayer::new(MemoryDedupStore::new(10))
            .key_fn(|e| e.headers().get_str("order").map(str::to_owned))
            .layer(handler_fn(move |_e: Envelope| {
                kc.fetch_add(1, Ordering::SeqCst);
                async {}
            }));
        for id in ["a", "b"] {
            let e = Envelope::for_test(Message::new("x").with_message_id(id).with_header("order", "o-1"), "q");
            assert_eq!(keyed.clone().oneshot(e).await.unwrap(), Outcome::Ack);
        }
        assert_eq!(keyed_calls.load(Ordering::SeqCst), 1, "same key, different message ids");
    }
}
