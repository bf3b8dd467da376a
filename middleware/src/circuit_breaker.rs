//! Circuit breaker: stop hammering a failing dependency.
//!
//! After `failure_threshold` counted failures within `window` the breaker
//! **opens**: deliveries fail fast with a transient failure (the Worker
//! requeues them) without calling the handler, each after a
//! `fail_fast_pause` (1 s by default, never past the moment the breaker
//! half-opens) so that requeued messages do not spin through the broker.
//! After `open_for` the breaker is **half-open**: up to `half_open_probes`
//! deliveries go through as probes; if they all succeed it **closes**, if one
//! fails with a counted kind it opens again. A probe that fails with a kind
//! that does not count (a permanent or decode failure: the message's fault)
//! proves nothing: it frees its probe slot and the next delivery probes.
//!
//! By default transient, timeout and panic failures count (a sick
//! dependency); permanent and decode failures are about the message, not the
//! dependency, and do not. The state is readable through a
//! [`CircuitBreakerHandle`] for health checks.
//!
//! ```
//! use std::time::Duration;
//! use switchyard_core::{handler_fn, Envelope};
//! use switchyard_middleware::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, CircuitState};
//! use tower::ServiceBuilder;
//!
//! let breaker = CircuitBreakerLayer::new(
//!     CircuitBreakerConfig::new(5, Duration::from_secs(30))
//!         .open_for(Duration::from_secs(10))
//!         .fail_fast_pause(Duration::from_millis(200)),
//! );
//! let health = breaker.handle();
//! let _svc = switchyard_core::handler::boxed(ServiceBuilder::new()
//!     .layer(breaker)
//!     .service(handler_fn(|_env: Envelope| async {})));
//! assert_eq!(health.state(), CircuitState::Closed);
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_core::{Envelope, FailureKind, HandlerError, Outcome};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::util::BoxFuture;

/// The breaker's settings.
#[derive(Clone)]
pub struct CircuitBreakerConfig {
    failure_threshold: u32,
    window: Duration,
    open_for: Duration,
    half_open_probes: u32,
    fail_fast_pause: Duration,
    counts: Arc<dyn Fn(FailureKind) -> bool + Send + Sync>,
}

/// Default of [`CircuitBreakerConfig::fail_fast_pause`].
pub const DEFAULT_FAIL_FAST_PAUSE: Duration = Duration::from_secs(1);

impl fmt::Debug for CircuitBreakerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerConfig")
            .field("failure_threshold", &self.failure_threshold)
            .field("window", &self.window)
            .field("open_for", &self.open_for)
            .field("half_open_probes", &self.half_open_probes)
            .field("fail_fast_pause", &self.fail_fast_pause)
            .finish()
    }
}

impl CircuitBreakerConfig {
    /// Opens after `failure_threshold` counted failures within `window`;
    /// stays open 10 s; one probe; a 1 s fail-fast pause.
    pub fn new(failure_threshold: u32, window: Duration) -> Self {
        CircuitBreakerConfig {
            failure_threshold: failure_threshold.max(1),
            window,
            open_for: Duration::from_secs(10),
            half_open_probes: 1,
            fail_fast_pause: DEFAULT_FAIL_FAST_PAUSE,
            counts: Arc::new(|k: FailureKind| k.is_retryable()),
        }
    }
    /// How long the breaker stays open before probing.
    pub fn open_for(mut self, d: Duration) -> Self {
        self.open_for = d;
        self
    }
    /// How many probe deliveries must succeed to close (at least 1).
    pub fn half_open_probes(mut self, n: u32) -> Self {
        self.half_open_probes = n.max(1);
        self
    }
    /// Waits this long before failing a delivery fast, so that requeued
    /// deliveries do not spin through the broker (default 1 s). The pause
    /// never runs past the moment the breaker half-opens. `Duration::ZERO`
    /// fails at once: the Worker then requeues in a tight loop while the
    /// breaker is open.
    pub fn fail_fast_pause(mut self, d: Duration) -> Self {
        self.fail_fast_pause = d;
        self
    }
    /// Chooses which failure kinds count towards opening.
    pub fn counts(mut self, f: impl Fn(FailureKind) -> bool + Send + Sync + 'static) -> Self {
        self.counts = Arc::new(f);
        self
    }
}

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Deliveries reach the handler.
    Closed,
    /// Deliveries fail fast (requeued) without reaching the handler.
    Open,
    /// A few probe deliveries reach the handler.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

enum State {
    Closed { failures: VecDeque<Instant> },
    Open { until: Instant },
    HalfOpen { in_flight: u32, successes: u32 },
}

struct Shared {
    cfg: CircuitBreakerConfig,
    state: Mutex<State>,
}

enum Admit {
    Call {
        probe: bool,
    },
    /// Fail fast after this pause.
    Reject {
        pause: Duration,
    },
}

impl Shared {
    fn admit(&self, now: Instant) -> Admit {
        let mut st = self.state.lock();
        if let State::Open { until } = *st {
            if now < until {
                // wake up no later than the breaker half-opens
                let pause = self.cfg.fail_fast_pause.min(until - now);
                return Admit::Reject { pause };
            }
            tracing::info!("circuit breaker half-open: probing");
            *st = State::HalfOpen {
                in_flight: 0,
                successes: 0,
            };
        }
        match &mut *st {
            State::Closed { .. } => Admit::Call { probe: false },
            State::HalfOpen { in_flight, successes } => {
                if *in_flight + *successes < self.cfg.half_open_probes {
                    *in_flight += 1;
                    Admit::Call { probe: true }
                } else {
                    Admit::Reject {
                        pause: self.cfg.fail_fast_pause,
                    }
                }
            }
            State::Open { .. } => Admit::Reject {
                pause: self.cfg.fail_fast_pause,
            },
        }
    }

    fn open(&self, st: &mut State, now: Instant) {
        tracing::warn!(open_for = ?self.cfg.open_for, "circuit breaker opened");
        *st = State::Open {
            until: now + self.cfg.open_for,
        };
    }

    /// Records a call's result; `failed` is `Some(counts)` for failures,
    /// `None` for successes; `abandoned` for a dropped probe.
    fn record(&self, probe: bool, failed: Option<bool>, now: Instant) {
        let mut st = self.state.lock();
        let counted = failed == Some(true);
        match &mut *st {
            State::Closed { failures } if !probe && counted => {
                while failures
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > self.cfg.window)
                {
                    failures.pop_front();
                }
                failures.push_back(now);
                if failures.len() as u32 >= self.cfg.failure_threshold {
                    self.open(&mut st, now);
                }
            }
            State::HalfOpen { in_flight, successes } if probe => {
                *in_flight = in_flight.saturating_sub(1);
                if counted {
                    self.open(&mut st, now);
                } else if failed.is_some() {
                    // a failure that does not count (the message's fault)
                    // says nothing about the dependency: free the slot only
                } else {
                    *successes += 1;
                    if *successes >= self.cfg.half_open_probes {
                        tracing::info!("circuit breaker closed");
                        *st = State::Closed {
                            failures: VecDeque::new(),
                        };
                    }
                }
            }
            _ => {}
        }
    }

    fn abandon_probe(&self) {
        if let State::HalfOpen { in_flight, .. } = &mut *self.state.lock() {
            *in_flight = in_flight.saturating_sub(1);
        }
    }
}

/// Reads (and resets) a breaker's state, for health checks.
#[derive(Clone)]
pub struct CircuitBreakerHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for CircuitBreakerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("state", &self.state())
            .finish()
    }
}

impl CircuitBreakerHandle {
    /// The current state. An open breaker whose `open_for` has elapsed
    /// reports [`CircuitState::HalfOpen`] (the next delivery probes).
    pub fn state(&self) -> CircuitState {
        match &*self.shared.state.lock() {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { until } if Instant::now() >= *until => CircuitState::HalfOpen,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// True unless the breaker is open.
    pub fn is_healthy(&self) -> bool {
        self.state() != CircuitState::Open
    }

    /// Closes the breaker and forgets past failures.
    pub fn reset(&self) {
        *self.shared.state.lock() = State::Closed {
            failures: VecDeque::new(),
        };
    }
}

/// Opens after repeated failures; see the [module docs](self).
///
/// All services made from one layer (and their clones) share one breaker.
#[derive(Clone)]
pub struct CircuitBreakerLayer {
    shared: Arc<Shared>,
}

impl fmt::Debug for CircuitBreakerLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("config", &self.shared.cfg)
            .finish()
    }
}

impl CircuitBreakerLayer {
    /// A new breaker, closed.
    pub fn new(config: CircuitBreakerConfig) -> Self {
        CircuitBreakerLayer {
            shared: Arc::new(Shared {
                cfg: config,
                state: Mutex::new(State::Closed {
                    failures: VecDeque::new(),
                }),
            }),
        }
    }

    /// A handle on this breaker's state.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S> Layer<S> for CircuitBreakerLayer {
    type Service = CircuitBreaker<S>;
    fn layer(&self, inner: S) -> CircuitBreaker<S> {
        CircuitBreaker {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// The service of [`CircuitBreakerLayer`].
#[derive(Clone)]
pub struct CircuitBreaker<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S: fmt::Debug> fmt::Debug for CircuitBreaker<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker").field("inner", &self.inner).finish()
    }
}

impl<S> CircuitBreaker<S> {
    /// A handle on this breaker's state.
    pub fn handle(&self) -> CircuitBreakerHandle {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

struct ProbeGuard {
    shared: Arc<Shared>,
    armed: bool,
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.abandon_probe();
        }
    }
}

impl<S> Service<Envelope> for CircuitBreaker<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = BoxFuture<Result<Outcome, HandlerError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        let shared = self.shared.clone();
        match shared.admit(Instant::now()) {
            Admit::Reject { pause } => Box::pin(async move {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                Err(HandlerError::retry(format!(
                    "circuit breaker open: delivery from '{}' requeued without calling the handler",
                    env.queue()
                )))
            }),
            Admit::Call { probe } => {
                let fut = self.inner.call(env);
                Box::pin(async move {
                    let mut guard = ProbeGuard {
                        shared: shared.clone(),
                        armed: probe,
                    };
                    let out = fut.await;
                    guard.armed = false;
                    let failed = out.as_ref().err().map(|e| (shared.cfg.counts)(e.kind()));
                    shared.record(probe, failed, Instant::now());
                    out
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use switchyard_core::{handler_fn, Message};
    use tower::ServiceExt;

    #[tokio::test(start_paused = true)]
    async fn opens_fails_fast_probes_and_closes() {
        let calls = Arc::new(AtomicU32::new(0));
        let healthy = Arc::new(AtomicBool::new(false));
        let layer = CircuitBreakerLayer::new(
            CircuitBreakerConfig::new(3, Duration::from_secs(10)).open_for(Duration::from_secs(5)),
        );
        let h = layer.handle();
        let (c, ok) = (calls.clone(), healthy.clone());
        let svc = layer.layer(handler_fn(move |e: Envelope| {
            c.fetch_add(1, Ordering::SeqCst);
            let ok = ok.load(Ordering::SeqCst);
            async move {
                if e.body().as_ref() == b"bad" {
                    Err(HandlerError::reject("bad message"))
                } else if ok {
                    Ok(())
                } else {
                    Err(HandlerError::retry("db down"))
                }
            }
        }));
        let env = |b: &'static str| Envelope::for_test(Message::new(b), "q");
        // permanent failures do not count
        for _ in 0..5 {
            svc.clone().oneshot(env("bad")).await.unwrap_err();
        }
        assert_eq!(h.state(), CircuitState::Closed);
        for _ in 0..3 {
            svc.clone().oneshot(env("x")).await.unwrap_err();
        }
        assert_eq!(h.state(), CircuitState::Open);
        assert!(!h.is_healthy());
        let before = calls.load(Ordering::SeqCst);
        let e = svc.clone().oneshot(env("x")).await.unwrap_err();
        assert!(e.kind().is_retryable() && e.message().contains("circuit breaker open"));
        assert_eq!(calls.load(Ordering::SeqCst), before, "handler not called while open");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(h.state(), CircuitState::HalfOpen);
        // failed probe re-opens
        svc.clone().oneshot(env("x")).await.unwrap_err();
        assert_eq!(calls.load(Ordering::SeqCst), before + 1);
        assert_eq!(h.state(), CircuitState::Open);
        tokio::time::advance(Duration::from_secs(6)).await;
        healthy.store(true, Ordering::SeqCst);
        assert_eq!(svc.clone().oneshot(env("x")).await.unwrap(), Outcome::Ack);
        assert_eq!(h.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn fail_fast_pauses_by_default_but_not_past_half_open() {
        let layer = CircuitBreakerLayer::new(
            CircuitBreakerConfig::new(1, Duration::from_secs(10)).open_for(Duration::from_millis(300)),
        );
        let svc = layer.layer(handler_fn(|_e: Envelope| async {
            Err::<(), _>(HandlerError::retry("x"))
        }));
        let env = || Envelope::for_test(Message::new("x"), "q");
        svc.clone().oneshot(env()).await.unwrap_err();
        let t0 = Instant::now();
        svc.clone().oneshot(env()).await.unwrap_err();
        assert_eq!(t0.elapsed(), Duration::from_millis(300), "paused until half-open");
        let long = CircuitBreakerLayer::new(CircuitBreakerConfig::new(1, Duration::from_secs(10)));
        let svc = long.layer(handler_fn(|_e: Envelope| async {
            Err::<(), _>(HandlerError::retry("x"))
        }));
        svc.clone().oneshot(env()).await.unwrap_err();
        let t0 = Instant::now();
        svc.clone().oneshot(env()).await.unwrap_err();
        assert_eq!(t0.elapsed(), DEFAULT_FAIL_FAST_PAUSE);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_open() {
        let layer = CircuitBreakerLayer::new(CircuitBreakerConfig::new(3, Duration::from_secs(1)));
        let h = layer.handle();
        let svc = layer.layer(handler_fn(|_e: Envelope| async {
            Err::<(), _>(HandlerError::retry("x"))
        }));
        for _ in 0..5 {
            svc.clone()
                .oneshot(Envelope::for_test(Message::new("x"), "q"))
                .await
                .unwrap_err();
            tokio::time::advance(Duration::from_millis(600)).await;
        }
        assert_eq!(h.state(), CircuitState::Closed);
    }
}
