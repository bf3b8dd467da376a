//! Retry: per-failure-kind policies, exponential backoff with jitter and a
//! cap or an explicit list of delays, in-process or broker-delayed.
//!
//! # Modes
//!
//! - **In-process** ([`RetryLayer::in_process`]): the delivery stays
//!   unacknowledged while the layer sleeps and calls the handler again with
//!   [`Envelope::next_attempt`]. Simple and fast for short delays; the held
//!   deliveries count against the consumer's prefetch. The attempt count
//!   lives only in this process: if the delivery is aborted while the layer
//!   waits between attempts (the Worker's shutdown deadline passes, the
//!   process stops, the connection drops), the broker redelivers it and
//!   counting starts again from the first attempt (`x-retry-count` is not
//!   incremented). Keep in-process delays short — well under the Worker's
//!   shutdown timeout — and use the broker-delayed mode for long ones.
//! - **Broker-delayed** ([`RetryLayer::broker_delayed`]): the layer
//!   republishes the message, body untouched and `x-retry-count`
//!   incremented, to a wait queue `<source>.retry.<ms>` that it declares
//!   with `x-message-ttl` = the delay, `x-dead-letter-exchange` = `""` and
//!   `x-dead-letter-routing-key` = the source queue, and answers
//!   [`Outcome::Retried`] so the Worker acknowledges the original. When the
//!   delay expires the broker moves the message back to the source queue.
//!   No handler sleeps; nothing is held. The first republish also records
//!   `x-original-exchange` / `x-original-routing-key` (the broker's
//!   dead-lettering re-routes through the default exchange) so a later
//!   dead letter still names the original destination. Jitter does not
//!   apply in this mode: each distinct delay is one queue. The republish is
//!   mandatory and confirmed: if the wait queue was deleted since the layer
//!   declared it, the layer declares it again and republishes once; if that
//!   fails too, the delivery fails as transient (the Worker requeues it) —
//!   the original is acknowledged only once the retry is in a wait queue.
//!
//! In both modes, permanent and decode failures are never retried. When a
//! kind's attempts are exhausted the layer gives up with a **permanent**
//! failure carrying the last failure's message and, as its source,
//! [`RetriesExhausted`] (see [`exhaustion`]): the Worker rejects it (to the
//! queue's dead-letter exchange, if any) instead of requeueing it forever,
//! and an outer [`DeadLetterLayer`](crate::dead_letter::DeadLetterLayer)
//! dead-letters it with the original kind and the right `x-retry-count` —
//! put retry *inside* dead-letter.
//!
//! Attempts count both ways: `x-retry-count` (broker retries so far) plus
//! the in-process attempt number.
//!
//! ```
//! use std::time::Duration;
//! use switchyard_core::{handler_fn, Envelope, FailureKind, HandlerError};
//! use switchyard_middleware::retry::{Backoff, RetryLayer, RetryPolicy};
//! use tower::ServiceBuilder;
//!
//! // transient failures: 5 attempts, 100ms, 200ms, 400ms… (±20%), at most 10s apart;
//! // timeouts: the seed's explicit schedule; panics: not retried.
//! let policy = RetryPolicy::new(5, Backoff::exponential(Duration::from_millis(100)).max(Duration::from_secs(10)))
//!     .with_kind(FailureKind::Timeout, 6, Backoff::seed())
//!     .without_kind(FailureKind::Panic);
//! let _svc = switchyard_core::handler::boxed(ServiceBuilder::new()
//!     .layer(RetryLayer::in_process(policy))
//!     .service(handler_fn(|_env: Envelope| async { Err::<(), _>(HandlerError::retry("flaky")) })));
//! ```

use std::collections::HashSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use pin_project_lite::pin_project;
use switchyard_core::headers::{ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY, RETRY_COUNT};
use switchyard_core::{
    Admin, Destination, Envelope, Error, FailureKind, HandlerError, HeaderValue, Outcome, PublishOptions, Publisher,
    QueueSpec,
};
use tower::{Layer, Service, ServiceExt};

use crate::util::{rand_f64, BoxFuture};

/// How long to wait before each retry.
#[derive(Debug, Clone, PartialEq)]
pub enum Backoff {
    /// `initial × factor^n`, capped at `max`, minus up to `jitter` × the
    /// delay at random (`jitter` in `0.0..=1.0`; 0 disables it).
    Exponential {
        /// Delay before the first retry.
        initial: Duration,
        /// Growth factor per retry (≥ 1).
        factor: f64,
        /// Cap on any delay.
        max: Duration,
        /// Fraction of the delay randomly taken off (spreads retries of many
        /// messages failing together).
        jitter: f64,
    },
    /// Explicit delays, one per retry; the last repeats if attempts remain.
    Explicit(Arc<[Duration]>),
}

impl Backoff {
    /// Exponential from `initial`, factor 2, capped at 5 minutes, 20% jitter.
    pub fn exponential(initial: Duration) -> Self {
        Backoff::Exponential {
            initial,
            factor: 2.0,
            max: Duration::from_secs(300),
            jitter: 0.2,
        }
    }

    /// Sets the growth factor (exponential only; values below 1 are taken as 1).
    pub fn factor(mut self, f: f64) -> Self {
        if let Backoff::Exponential { factor, .. } = &mut self {
            *factor = if f.is_finite() { f.max(1.0) } else { 1.0 };
        }
        self
    }

    /// Sets the cap (exponential only).
    pub fn max(mut self, cap: Duration) -> Self {
        if let Backoff::Exponential { max, .. } = &mut self {
            *max = cap;
        }
        self
    }

    /// Sets the jitter fraction (exponential only; clamped to `0.0..=1.0`).
    pub fn jitter(mut self, j: f64) -> Self {
        if let Backoff::Exponential { jitter, .. } = &mut self {
            *jitter = if j.is_finite() { j.clamp(0.0, 1.0) } else { 0.0 };
        }
        self
    }

    /// Explicit delays, one per retry.
    pub fn explicit(delays: impl IntoIterator<Item = Duration>) -> Self {
        Backoff::Explicit(delays.into_iter().collect())
    }

    /// The seed system's schedule: 1s, 5s, 15s, 1m, 5m.
    pub fn seed() -> Self {
        Self::explicit([1, 5, 15, 60, 300].map(Duration::from_secs))
    }

    /// A constant delay.
    pub fn fixed(delay: Duration) -> Self {
        Self::explicit([delay])
    }

    /// The nominal delay before retry number `retry + 1` (no jitter).
    pub fn delay(&self, retry: u32) -> Duration {
        match self {
            Backoff::Exponential {
                initial, factor, max, ..
            } => {
                let secs = initial.as_secs_f64() * factor.powi(retry.min(1024) as i32);
                if !secs.is_finite() || secs >= max.as_secs_f64() {
                    *max
                } else {
                    Duration::from_secs_f64(secs)
                }
            }
            Backoff::Explicit(d) => match d.len() {
                0 => Duration::ZERO,
                n => d[(retry as usize).min(n - 1)],
            },
        }
    }

    /// The delay before retry number `retry + 1`, with jitter applied.
    pub fn jittered_delay(&self, retry: u32) -> Duration {
        let d = self.delay(retry);
        match self {
            Backoff::Exponential { jitter, .. } if *jitter > 0.0 => d.mul_f64(1.0 - jitter * rand_f64()),
            _ => d,
        }
    }

    fn len_hint(&self) -> Option<u32> {
        match self {
            Backoff::Explicit(d) => Some(d.len() as u32),
            Backoff::Exponential { .. } => None,
        }
    }
}

/// Retry settings for one failure kind.
#[derive(Debug, Clone, PartialEq)]
pub struct KindPolicy {
    /// Total attempts including the first (1 = never retry).
    pub max_attempts: u32,
    /// Delays between attempts.
    pub backoff: Backoff,
}

/// Which failures are retried, how often and how far apart.
///
/// Only retryable kinds (transient, timeout, panic) can have a policy:
/// permanent and decode failures are never retried.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    transient: Option<KindPolicy>,
    timeout: Option<KindPolicy>,
    panic: Option<KindPolicy>,
}

impl RetryPolicy {
    /// `max_attempts` (including the first) with `backoff` for every
    /// retryable kind.
    pub fn new(max_attempts: u32, backoff: Backoff) -> Self {
        let k = Some(KindPolicy {
            max_attempts: max_attempts.max(1),
            backoff,
        });
        RetryPolicy {
            transient: k.clone(),
            timeout: k.clone(),
            panic: k,
        }
    }

    /// `max_attempts` with [`Backoff::exponential`] from `initial`.
    pub fn exponential(max_attempts: u32, initial: Duration) -> Self {
        Self::new(max_attempts, Backoff::exponential(initial))
    }

    /// One retry per explicit delay (attempts = delays + 1).
    pub fn explicit(delays: impl IntoIterator<Item = Duration>) -> Self {
        let b = Backoff::explicit(delays);
        let n = b.len_hint().unwrap_or(0) + 1;
        Self::new(n, b)
    }

    /// The seed system's schedule: retries after 1s, 5s, 15s, 1m and 5m
    /// (6 attempts).
    pub fn seed() -> Self {
        Self::new(6, Backoff::seed())
    }

    /// No retries at all.
    pub fn none() -> Self {
        RetryPolicy {
            transient: None,
            timeout: None,
            panic: None,
        }
    }

    fn slot(&mut self, kind: FailureKind) -> Option<&mut Option<KindPolicy>> {
        match kind {
            FailureKind::Transient => Some(&mut self.transient),
            FailureKind::Timeout => Some(&mut self.timeout),
            FailureKind::Panic => Some(&mut self.panic),
            _ => None,
        }
    }

    /// Sets the policy of one kind. Ignored for permanent and decode
    /// failures, which are never retried.
    pub fn with_kind(mut self, kind: FailureKind, max_attempts: u32, backoff: Backoff) -> Self {
        if let Some(s) = self.slot(kind) {
            *s = Some(KindPolicy {
                max_attempts: max_attempts.max(1),
                backoff,
            });
        }
        self
    }

    /// Stops retrying one kind.
    pub fn without_kind(mut self, kind: FailureKind) -> Self {
        if let Some(s) = self.slot(kind) {
            *s = None;
        }
        self
    }

    /// The policy of `kind`, if it is retried.
    pub fn policy_for(&self, kind: FailureKind) -> Option<&KindPolicy> {
        match kind {
            FailureKind::Transient => self.transient.as_ref(),
            FailureKind::Timeout => self.timeout.as_ref(),
            FailureKind::Panic => self.panic.as_ref(),
            _ => None,
        }
    }

    /// After `attempts_made` attempts failed with `kind`: the nominal delay
    /// before the next one, or `None` to give up.
    pub fn next_delay(&self, kind: FailureKind, attempts_made: u32) -> Option<Duration> {
        let p = self.policy_for(kind)?;
        if attempts_made >= p.max_attempts {
            return None;
        }
        Some(p.backoff.delay(attempts_made.saturating_sub(1)))
    }
}

/// Marks an error whose retries were exhausted: the source of the
/// [`HandlerError`] the retry layer returns when it gives up.
#[derive(Debug, Clone)]
pub struct RetriesExhausted {
    /// Retries made (broker and in-process) before giving up.
    pub retries: u32,
    /// The last failure.
    pub last: HandlerError,
}

impl fmt::Display for RetriesExhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "gave up after {} retries: {}", self.retries, self.last)
    }
}

impl std::error::Error for RetriesExhausted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.last)
    }
}

/// If the retry layer gave up on `err`, how many retries it made.
pub fn retries_of(err: &HandlerError) -> Option<u32> {
    exhaustion(err).map(|r| r.retries)
}

/// If the retry layer gave up on `err`: the retries it made and the last
/// failure (whose kind is the real cause).
pub fn exhaustion(err: &HandlerError) -> Option<&RetriesExhausted> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<RetriesExhausted>() {
            return Some(r);
        }
        cur = e.source();
    }
    None
}

/// The error returned when retries are exhausted: permanent (so that the
/// Worker rejects it rather than requeueing it forever), with the message of
/// the last failure and [`RetriesExhausted`] as its source.
fn exhausted(err: HandlerError, retries: u32) -> HandlerError {
    let msg = format!("{} (gave up after {retries} retries)", err.message());
    HandlerError::new(FailureKind::Permanent, msg).with_source(RetriesExhausted { retries, last: err })
}

/// Publishes broker-delayed retries and declares their wait queues.
struct BrokerDelay {
    publisher: Arc<dyn Publisher>,
    admin: Arc<dyn Admin>,
    durable: bool,
    declared: Mutex<HashSet<String>>,
}

impl BrokerDelay {
    /// Declares the wait queue `wait` unless this layer already did.
    async fn declare(&self, wait: &str, source: &str, delay: Duration) -> switchyard_core::Result<()> {
        if self.declared.lock().contains(wait) {
            return Ok(());
        }
        let spec = QueueSpec::new(wait)
            .durable(self.durable)
            .message_ttl(delay)
            .dead_letter("", Some(source));
        self.admin.declare_queue(&spec).await?;
        self.declared.lock().insert(wait.to_owned());
        Ok(())
    }

    /// Publishes the retry to its wait queue, mandatory: if the queue was
    /// deleted since this layer declared it, the publish is returned
    /// (unroutable), so the queue is declared again and the retry published
    /// once more; a second failure is returned.
    async fn republish(&self, env: &Envelope, delay: Duration) -> switchyard_core::Result<()> {
        let source = env.queue();
        let wait = wait_queue_name(source, delay);
        self.declare(&wait, source, delay).await?;
        let mut msg = env.message().clone();
        msg.headers
            .insert(RETRY_COUNT, HeaderValue::I64(i64::from(env.retry_count()) + 1));
        if !msg.headers.contains_key(ORIGINAL_EXCHANGE) {
            msg.headers.insert(ORIGINAL_EXCHANGE, &*env.info().exchange);
            msg.headers.insert(ORIGINAL_ROUTING_KEY, &*env.info().routing_key);
        }
        let dest = Destination::queue(wait.clone());
        let mandatory = PublishOptions::mandatory();
        match self.publisher.publish_with(&dest, msg.clone(), mandatory).await {
            Err(Error::Unroutable { .. }) => {
                tracing::info!(queue = source, wait_queue = %wait, "wait queue gone; declaring it again");
                self.declared.lock().remove(&wait);
                self.declare(&wait, source, delay).await?;
                self.publisher.publish_with(&dest, msg, mandatory).await
            }
            other => other,
        }
    }
}

/// The wait queue of `source` for `delay`: `<source>.retry.<ms>`.
pub fn wait_queue_name(source: &str, delay: Duration) -> String {
    format!("{source}.retry.{}", delay.as_millis())
}

#[derive(Clone)]
enum Mode {
    InProcess,
    Broker(Arc<BrokerDelay>),
}

/// Retries failed deliveries by policy; see the [module docs](self).
#[derive(Clone)]
pub struct RetryLayer {
    policy: Arc<RetryPolicy>,
    mode: Mode,
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.policy)
            .field(
                "mode",
                &match self.mode {
                    Mode::InProcess => "in_process",
                    Mode::Broker(_) => "broker_delayed",
                },
            )
            .finish()
    }
}

impl RetryLayer {
    /// Retries in-process: sleeps, then calls the handler again with the
    /// next attempt. The attempt count is lost if the delivery is aborted
    /// while waiting (shutdown, crash): it is redelivered and counted from
    /// the start. For delays that are not short, use
    /// [`broker_delayed`](Self::broker_delayed).
    pub fn in_process(policy: RetryPolicy) -> Self {
        RetryLayer {
            policy: Arc::new(policy),
            mode: Mode::InProcess,
        }
    }

    /// Retries through the broker: republishes to per-delay wait queues
    /// (declared through `admin`, durable) and acknowledges the original.
    /// With a transport `t: Arc<dyn Transport>`, pass `t.clone(), t`.
    pub fn broker_delayed(policy: RetryPolicy, publisher: Arc<dyn Publisher>, admin: Arc<dyn Admin>) -> Self {
        RetryLayer {
            policy: Arc::new(policy),
            mode: Mode::Broker(Arc::new(BrokerDelay {
                publisher,
                admin,
                durable: true,
                declared: Mutex::new(HashSet::new()),
            })),
        }
    }

    /// Declares wait queues durable (default) or not. Only affects the
    /// broker-delayed mode.
    pub fn durable_wait_queues(mut self, durable: bool) -> Self {
        if let Mode::Broker(b) = &self.mode {
            self.mode = Mode::Broker(Arc::new(BrokerDelay {
                publisher: b.publisher.clone(),
                admin: b.admin.clone(),
                durable,
                declared: Mutex::new(HashSet::new()),
            }));
        }
        self
    }

    /// The policy.
    pub fn policy(&self) -> &RetryPolicy {
        &self.policy
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: self.policy.clone(),
            mode: self.mode.clone(),
        }
    }
}

/// The service of [`RetryLayer`].
#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
    mode: Mode,
}

impl<S: fmt::Debug> fmt::Debug for Retry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("policy", &self.policy)
            .finish()
    }
}

/// Decides and carries out what follows a failed attempt: give up, retry
/// in-process (sleep, call again) until an attempt succeeds or the policy
/// gives up, or republish through the broker.
async fn after_failure<S>(
    mut inner: S,
    policy: Arc<RetryPolicy>,
    mode: Mode,
    mut env: Envelope,
    mut err: HandlerError,
) -> Result<Outcome, HandlerError>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    loop {
        let kind = err.kind();
        let made = env.retry_count().saturating_add(env.attempt());
        let Some(kp) = policy.policy_for(kind) else {
            return Err(err);
        };
        if made >= kp.max_attempts {
            tracing::debug!(
                queue = env.queue(),
                kind = kind.as_str(),
                attempts = made,
                "retries exhausted"
            );
            return Err(exhausted(err, made - 1));
        }
        let retry = made - 1;
        match &mode {
            Mode::InProcess => {
                let delay = kp.backoff.jittered_delay(retry);
                tracing::debug!(
                    queue = env.queue(),
                    kind = kind.as_str(),
                    attempt = made,
                    ?delay,
                    "retrying in-process"
                );
                tokio::time::sleep(delay).await;
                env = env.next_attempt();
                match inner.ready().await?.call(env.clone()).await {
                    Ok(out) => return Ok(out),
                    Err(e) => err = e,
                }
            }
            Mode::Broker(b) => {
                let delay = kp.backoff.delay(retry);
                tracing::debug!(
                    queue = env.queue(),
                    kind = kind.as_str(),
                    attempt = made,
                    ?delay,
                    "retrying through the broker"
                );
                return match b.republish(&env, delay).await {
                    Ok(()) => Ok(Outcome::Retried),
                    Err(e) => {
                        tracing::warn!(queue = env.queue(), error = %e, "could not schedule a delayed retry; requeueing");
                        Err(
                            HandlerError::retry(format!("could not schedule a delayed retry ({e}) after: {err}"))
                                .with_source(e),
                        )
                    }
                };
            }
        }
    }
}

struct Pending<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
    mode: Mode,
    env: Envelope,
}

pin_project! {
    #[project = StateProj]
    enum State<S, F> {
        First { #[pin] fut: F, pending: Option<Pending<S>> },
        Again { fut: BoxFuture<Result<Outcome, HandlerError>> },
    }
}

pin_project! {
    /// The future of [`Retry`]: the first attempt inline (no allocation when
    /// it succeeds or its failure is not retried), then a boxed
    /// continuation for retries.
    pub struct RetryFuture<S, F> {
        #[pin]
        state: State<S, F>,
    }
}

impl<S> Future for RetryFuture<S, S::Future>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError> + Send + 'static,
    S::Future: Send + 'static,
{
    type Output = Result<Outcome, HandlerError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let again = match self.as_mut().project().state.project() {
                StateProj::First { fut, pending } => {
                    let err = match std::task::ready!(fut.poll(cx)) {
                        Ok(out) => return Poll::Ready(Ok(out)),
                        Err(e) => e,
                    };
                    let Some(p) = pending.take() else {
                        return Poll::Ready(Err(err));
                    };
                    if p.policy.policy_for(err.kind()).is_none() {
                        return Poll::Ready(Err(err));
                    }
                    Box::pin(after_failure(p.inner, p.policy, p.mode, p.env, err))
                }
                StateProj::Again { fut } => return fut.as_mut().poll(cx),
            };
            self.as_mut().project().state.set(State::Again { fut: again });
        }
    }
}

impl<S> Service<Envelope> for Retry<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = RetryFuture<S, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        let fut = self.inner.call(env.clone());
        let inner = self.inner.clone();
        RetryFuture {
            state: State::First {
                fut,
                pending: Some(Pending {
                    inner,
                    policy: self.policy.clone(),
                    mode: self.mode.clone(),
                    env,
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters_within_bounds() {
        let b = Backoff::exponential(Duration::from_millis(100))
            .max(Duration::from_millis(700))
            .jitter(0.0);
        let d: Vec<_> = (0..5).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(d, [100, 200, 400, 700, 700]);
        let j = Backoff::exponential(Duration::from_millis(1000)).jitter(0.5);
        for _ in 0..200 {
            let v = j.jittered_delay(0);
            assert!(
                v > Duration::from_millis(499) && v <= Duration::from_millis(1000),
                "{v:?}"
            );
        }
        let s = Backoff::seed();
        assert_eq!(s.delay(0), Duration::from_secs(1));
        assert_eq!(s.delay(4), Duration::from_secs(300));
        assert_eq!(s.delay(9), Duration::from_secs(300));
        assert_eq!(
            Backoff::exponential(Duration::from_secs(1)).delay(u32::MAX),
            Duration::from_secs(300)
        );
    }

    #[test]
    fn policy_never_retries_permanent_or_decode_and_counts_attempts() {
        let p = RetryPolicy::explicit([Duration::from_secs(1), Duration::from_secs(5)])
            .with_kind(FailureKind::Permanent, 9, Backoff::seed())
            .without_kind(FailureKind::Panic);
        assert_eq!(p.next_delay(FailureKind::Transient, 1), Some(Duration::from_secs(1)));
        assert_eq!(p.next_delay(FailureKind::Transient, 2), Some(Duration::from_secs(5)));
        assert_eq!(p.next_delay(FailureKind::Transient, 3), None);
        assert_eq!(p.next_delay(FailureKind::Permanent, 1), None);
        assert_eq!(p.next_delay(FailureKind::Decode, 1), None);
        assert_eq!(p.next_delay(FailureKind::Panic, 1), None);
        assert_eq!(
            RetryPolicy::seed()
                .policy_for(FailureKind::Timeout)
                .unwrap()
                .max_attempts,
            6
        );
    }
}
