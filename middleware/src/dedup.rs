//! De-duplication: idempotent consumption.
//!
//! [`Dedup`] computes a key for each delivery (its `message_id` by default,
//! or a key function) and asks a [`DedupStore`] whether that key was already
//! handled. A duplicate is acknowledged without calling the handler. A key
//! is remembered only after the handler succeeded (`Ack` or `Reply`), so a
//! message that failed, was retried or dead-lettered (and is later
//! replayed) is handled again. Deliveries without a key pass through.
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

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use switchyard_core::{Envelope, Error, HandlerError, Outcome};
use tower::{Layer, Service};

use crate::util::{take_ready, BoxFuture};

/// Where handled keys are remembered.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// True if `key` was handled (and is still remembered).
    async fn contains(&self, key: &str) -> Result<bool, Error>;
    /// Remembers that `key` was handled.
    async fn insert(&self, key: &str) -> Result<(), Error>;
}

struct Lru {
    map: HashMap<Arc<str>, (u64, Instant)>,
    order: VecDeque<(Arc<str>, u64)>,
    next: u64,
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

    /// Synchronous [`DedupStore::contains`].
    pub fn contains_now(&self, key: &str) -> bool {
        let mut lru = self.lru.lock();
        let Some((k, (_, at))) = lru.map.get_key_value(key).map(|(k, v)| (k.clone(), *v)) else {
            return false;
        };
        if self.ttl.is_some_and(|ttl| at.elapsed() > ttl) {
            lru.map.remove(key);
            return false;
        }
        self.touch(&mut lru, k, at);
        true
    }

    /// Synchronous [`DedupStore::insert`].
    pub fn insert_now(&self, key: &str) {
        let mut lru = self.lru.lock();
        self.touch(&mut lru, Arc::from(key), Instant::now());
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
}

type KeyFn = Arc<dyn Fn(&Envelope) -> Option<String> + Send + Sync>;

/// Acknowledges duplicates without calling the handler; see the
/// [module docs](self).
#[derive(Clone)]
pub struct DedupLayer {
    store: Arc<dyn DedupStore>,
    key: Option<KeyFn>,
}

impl fmt::Debug for DedupLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DedupLayer")
    }
}

impl DedupLayer {
    /// De-duplicates by `message_id` in `store`.
    pub fn new(store: impl DedupStore) -> Self {
        Self::with_store(Arc::new(store))
    }

    /// De-duplicates by `message_id` in a shared store.
    pub fn with_store(store: Arc<dyn DedupStore>) -> Self {
        DedupLayer { store, key: None }
    }

    /// De-duplicates by the key `f` computes (`None`: never a duplicate).
    pub fn key_fn(mut self, f: impl Fn(&Envelope) -> Option<String> + Send + Sync + 'static) -> Self {
        self.key = Some(Arc::new(f));
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
        }
    }
}

/// The service of [`DedupLayer`].
#[derive(Clone)]
pub struct Dedup<S> {
    inner: S,
    store: Arc<dyn DedupStore>,
    key: Option<KeyFn>,
}

impl<S: fmt::Debug> fmt::Debug for Dedup<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dedup").field("inner", &self.inner).finish()
    }
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
            None => env.message_id().map(str::to_owned),
        };
        let Some(key) = key else {
            return Box::pin(self.inner.call(env));
        };
        let mut inner = take_ready(&mut self.inner);
        let store = self.store.clone();
        Box::pin(async move {
            let seen = store
                .contains(&key)
                .await
                .map_err(|e| HandlerError::retry(format!("de-duplication store failed: {e}")).with_source(e))?;
            if seen {
                tracing::debug!(queue = env.queue(), key = %key, "duplicate acknowledged without handling");
                return Ok(Outcome::Ack);
            }
            let out = inner.call(env).await?;
            if matches!(out, Outcome::Ack | Outcome::Reply(_)) {
                if let Err(e) = store.insert(&key).await {
                    tracing::warn!(key = %key, error = %e, "could not remember a handled message");
                }
            }
            Ok(out)
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
