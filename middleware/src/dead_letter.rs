//! Dead-lettering with reasons, and replay.
//!
//! When a delivery is finally given up, [`DeadLetter`] publishes it (body and
//! properties untouched, except that a per-message TTL is moved to the
//! `x-original-expiration` header, as RabbitMQ does) to the configured
//! dead-letter exchange with headers that say why, and answers
//! [`Outcome::DeadLettered`] so the Worker acknowledges the original:
//!
//! | header | value |
//! |---|---|
//! | `x-error` | the failure's message (at most 4 KiB) |
//! | `x-error-kind` | `transient`, `permanent`, `decode`, `panic` or `timeout` (for exhausted retries, the kind of the last failure) |
//! | `x-original-exchange` | the exchange it was first published to |
//! | `x-original-routing-key` | the routing key it was first published with |
//! | `x-original-queue` | the queue it failed on |
//! | `x-failed-at` | seconds since the Unix epoch |
//! | `x-retry-count` | retries made before giving up |
//!
//! "Finally given up" means: a permanent or decode failure; a failure the
//! [retry layer](crate::retry) gave up on (so put retry *inside* this
//! layer); a panic on a delivery the broker already redelivered (the
//! Worker's requeue-once rule); or any kind listed with
//! [`DeadLetterLayer::always`]. Other failures pass through unchanged and the
//! Worker settles them (a transient failure is requeued).
//!
//! The dead letter is published **mandatory** and with publisher confirms,
//! so the original is acknowledged only once a queue has taken the dead
//! letter. If it cannot be published:
//!
//! - a transient error (connection lost, publish not confirmed) fails the
//!   delivery as transient: the Worker requeues it, and dead-lettering is
//!   tried again when it comes back;
//! - any other error — above all `unroutable`, when no queue is bound to the
//!   dead-letter exchange for the routing key used, or a missing exchange —
//!   is a configuration error that would repeat: the delivery fails as
//!   permanent (the original failure when it already is one) and the Worker
//!   rejects it, so the queue's own dead-letter exchange takes it if it has
//!   one (give every queue an `x-dead-letter-exchange` as a safety net; a
//!   queue without one drops it, as RabbitMQ does). The error is logged.
//!
//! **Routing key.** Without [`DeadLetterLayer::routing_key`] the dead letter
//! keeps the message's original routing key, which a fanout DLX ignores but
//! a direct or topic DLX must have a binding for. With the usual
//! `dead_letter` queue bound by the key `dead_letter`, set
//! `.routing_key("dead_letter")`.
//!
//! [`replay`] and [`replay_queue`] send dead letters back to their original
//! destination with these headers (and RabbitMQ's `x-death`,
//! `x-first-death-*`) removed. Messages RabbitMQ dead-lettered itself (a
//! queue's `x-dead-letter-exchange`) carry no `x-original-*` headers; they go
//! back to the exchange and routing key of their latest `x-death` entry.
//!
//! ```
//! use std::sync::Arc;
//! use std::time::Duration;
//! use switchyard_core::{handler_fn, Envelope, Publisher};
//! use switchyard_middleware::dead_letter::DeadLetterLayer;
//! use switchyard_middleware::retry::{RetryLayer, RetryPolicy};
//! use tower::ServiceBuilder;
//!
//! fn build(publisher: Arc<dyn Publisher>) {
//!     let _svc = switchyard_core::handler::boxed(ServiceBuilder::new()
//!         .layer(DeadLetterLayer::new(publisher, "contextiq.dlx").routing_key("dead_letter"))
//!         .layer(RetryLayer::in_process(RetryPolicy::exponential(3, Duration::from_millis(100))))
//!         .service(handler_fn(|_env: Envelope| async {})));
//! }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project_lite::pin_project;

use switchyard_core::headers::{
    ERROR, ERROR_KIND, FAILED_AT, ORIGINAL_EXCHANGE, ORIGINAL_QUEUE, ORIGINAL_ROUTING_KEY, RETRY_COUNT, X_DEATH,
};
use switchyard_core::message::unix_now;
use switchyard_core::{
    ConsumeOptions, Consumer, Delivery, Destination, Envelope, Error, FailureKind, HandlerError, HeaderValue, Message,
    Outcome, PublishOptions, Publisher, Result,
};
use tower::{Layer, Service};

use crate::retry::exhaustion;
use crate::util::BoxFuture;

/// Header holding the per-message TTL (ms) a dead letter had; the dead
/// letter itself is published without one.
pub const ORIGINAL_EXPIRATION: &str = "x-original-expiration";

/// Longest `x-error` value written, in bytes.
pub const MAX_ERROR_LEN: usize = 4096;

struct Config {
    publisher: Arc<dyn Publisher>,
    exchange: Arc<str>,
    routing_key: Option<Arc<str>>,
    always: Vec<FailureKind>,
}

/// Publishes finally failed deliveries to a dead-letter exchange; see the
/// [module docs](self).
#[derive(Clone)]
pub struct DeadLetterLayer {
    config: Arc<Config>,
}

impl fmt::Debug for DeadLetterLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetterLayer")
            .field("exchange", &self.config.exchange)
            .field("routing_key", &self.config.routing_key)
            .finish()
    }
}

impl DeadLetterLayer {
    /// Dead-letters through `publisher` to `exchange`, keeping the original
    /// routing key (the `x-original-routing-key` header when a broker-delayed
    /// retry re-routed the message). A direct or topic `exchange` must have a
    /// binding for that key, or the dead letter is unroutable and the
    /// delivery rejected instead: bind the dead-letter queue with the
    /// original keys, or set [`routing_key`](Self::routing_key).
    pub fn new(publisher: Arc<dyn Publisher>, exchange: impl Into<Arc<str>>) -> Self {
        DeadLetterLayer {
            config: Arc::new(Config {
                publisher,
                exchange: exchange.into(),
                routing_key: None,
                always: Vec::new(),
            }),
        }
    }

    /// The layer the settings describe: dead letters go to
    /// `RABBITMQ_DEAD_LETTER_EXCHANGE` with routing key
    /// [`DEAD_LETTER_ROUTING_KEY`](switchyard_core::settings::DEAD_LETTER_ROUTING_KEY)
    /// (where [`Settings::dead_letter_topology`](switchyard_core::Settings::dead_letter_topology)
    /// binds the dead-letter queue). `None` when `RABBITMQ_ENABLE_DEAD_LETTER`
    /// is false: then failures are rejected and the broker drops them (or
    /// routes them by the queue's own `x-dead-letter-exchange`).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use switchyard_core::{Publisher, Settings};
    /// use switchyard_middleware::dead_letter::DeadLetterLayer;
    /// fn build(publisher: Arc<dyn Publisher>) -> switchyard_core::Result<()> {
    ///     let settings = Settings::from_env()?;
    ///     let dead_letter = DeadLetterLayer::from_settings(publisher, &settings);
    ///     // `Option<Layer>` is a layer too: `ServiceBuilder::new().option_layer(dead_letter)`.
    ///     # let _ = dead_letter;
    ///     Ok(())
    /// }
    /// ```
    pub fn from_settings(publisher: Arc<dyn Publisher>, settings: &switchyard_core::Settings) -> Option<Self> {
        let exchange = settings.dead_letter()?;
        Some(Self::new(publisher, exchange).routing_key(switchyard_core::settings::DEAD_LETTER_ROUTING_KEY))
    }

    fn edit(self, f: impl FnOnce(&mut Config)) -> Self {
        let c = &self.config;
        let mut cfg = Config {
            publisher: c.publisher.clone(),
            exchange: c.exchange.clone(),
            routing_key: c.routing_key.clone(),
            always: c.always.clone(),
        };
        f(&mut cfg);
        DeadLetterLayer { config: Arc::new(cfg) }
    }

    /// Publishes dead letters with this routing key instead of the original one.
    pub fn routing_key(self, rk: impl Into<Arc<str>>) -> Self {
        let rk = rk.into();
        self.edit(|c| c.routing_key = Some(rk))
    }

    /// Also dead-letters failures of `kind` at once, on the first failure
    /// (for example [`FailureKind::Timeout`] when timeouts must never be
    /// requeued).
    pub fn always(self, kind: FailureKind) -> Self {
        self.edit(|c| c.always.push(kind))
    }
}

impl<S> Layer<S> for DeadLetterLayer {
    type Service = DeadLetter<S>;
    fn layer(&self, inner: S) -> DeadLetter<S> {
        DeadLetter {
            inner,
            config: self.config.clone(),
        }
    }
}

/// The service of [`DeadLetterLayer`].
#[derive(Clone)]
pub struct DeadLetter<S> {
    inner: S,
    config: Arc<Config>,
}

impl<S: fmt::Debug> fmt::Debug for DeadLetter<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeadLetter")
            .field("inner", &self.inner)
            .field("exchange", &self.config.exchange)
            .finish()
    }
}

fn is_final(cfg: &Config, env: &Envelope, err: &HandlerError) -> bool {
    match err.kind() {
        FailureKind::Permanent | FailureKind::Decode => true,
        k if cfg.always.contains(&k) => true,
        FailureKind::Panic if env.redelivered() => true,
        _ => exhaustion(err).is_some(),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The dead letter for `env` failing with `err`: the message with the
/// reason headers added.
pub fn dead_letter_message(env: &Envelope, err: &HandlerError) -> Message {
    let mut msg = env.message().clone();
    // as RabbitMQ does when dead-lettering: a per-message TTL must not expire
    // the dead letter too; the original is kept in a header
    if let Some(ttl) = msg.properties.expiration.take() {
        msg.headers
            .insert(ORIGINAL_EXPIRATION, HeaderValue::I64(ttl.as_millis() as i64));
    }
    let info = env.info();
    let h = &mut msg.headers;
    h.insert(ERROR, truncate(err.message(), MAX_ERROR_LEN));
    let exhausted = exhaustion(err);
    let kind = exhausted.map_or(err.kind(), |x| x.last.kind());
    h.insert(ERROR_KIND, kind.as_str());
    if !h.contains_key(ORIGINAL_EXCHANGE) {
        h.insert(ORIGINAL_EXCHANGE, &*info.exchange);
    }
    if !h.contains_key(ORIGINAL_ROUTING_KEY) {
        h.insert(ORIGINAL_ROUTING_KEY, &*info.routing_key);
    }
    h.insert(ORIGINAL_QUEUE, &*info.queue);
    h.insert(FAILED_AT, HeaderValue::I64(unix_now() as i64));
    let retries = exhausted.map_or_else(|| env.retry_count(), |x| x.retries);
    h.insert(RETRY_COUNT, HeaderValue::I64(i64::from(retries)));
    msg
}

async fn publish_dead_letter(cfg: Arc<Config>, env: Envelope, err: HandlerError) -> Result<Outcome, HandlerError> {
    let msg = dead_letter_message(&env, &err);
    // the original routing key, also after a broker-delayed retry re-routed the message
    let rk = cfg.routing_key.clone().unwrap_or_else(|| {
        msg.headers
            .get_str(ORIGINAL_ROUTING_KEY)
            .map_or_else(|| env.info().routing_key.clone(), Arc::from)
    });
    let dest = Destination::new(cfg.exchange.clone(), rk);
    // mandatory: a dead letter that no queue takes is an error, never a silent loss
    match cfg
        .publisher
        .publish_with(&dest, msg, PublishOptions::mandatory())
        .await
    {
        Ok(()) => {
            tracing::info!(queue = env.queue(), kind = err.kind().as_str(), error = err.message(), dlx = %dest, "dead-lettered");
            Ok(Outcome::DeadLettered)
        }
        Err(e) if e.is_transient() => {
            tracing::warn!(queue = env.queue(), error = %e, dlx = %dest, "could not publish dead letter; requeueing the delivery");
            Err(HandlerError::retry(format!(
                "could not publish the dead letter to {dest} ({e}) after: {}",
                err.message()
            ))
            .with_source(e))
        }
        Err(e) => {
            tracing::error!(queue = env.queue(), error = %e, dlx = %dest,
                "dead letter not accepted (no queue bound for it?); rejecting the delivery to the queue's own dead-letter exchange, if any");
            Err(rejected(&env, err, &e))
        }
    }
}

/// A failure the Worker rejects without requeue: `err` itself when the
/// Worker already rejects it, else a permanent failure with `err` as source.
fn rejected(env: &Envelope, err: HandlerError, cause: &Error) -> HandlerError {
    match err.kind() {
        FailureKind::Permanent | FailureKind::Decode => err,
        FailureKind::Panic if env.redelivered() => err,
        _ => HandlerError::new(
            FailureKind::Permanent,
            format!("{} (could not be dead-lettered: {cause})", err.message()),
        )
        .with_source(err),
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Handling { #[pin] fut: F, env: Option<Envelope>, cfg: Option<Arc<Config>> },
        Publishing { fut: BoxFuture<Result<Outcome, HandlerError>> },
    }
}

pin_project! {
    /// The future of [`DeadLetter`]: the handler's future, then (only for a
    /// final failure) the publish of the dead letter.
    pub struct DeadLetterFuture<F> {
        #[pin]
        state: State<F>,
    }
}

impl<F> Future for DeadLetterFuture<F>
where
    F: Future<Output = Result<Outcome, HandlerError>>,
{
    type Output = Result<Outcome, HandlerError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let publishing = match self.as_mut().project().state.project() {
                StateProj::Handling { fut, env, cfg } => {
                    let err = match std::task::ready!(fut.poll(cx)) {
                        Ok(out) => return Poll::Ready(Ok(out)),
                        Err(e) => e,
                    };
                    let (Some(env), Some(cfg)) = (env.take(), cfg.take()) else {
                        return Poll::Ready(Err(err));
                    };
                    if !is_final(&cfg, &env, &err) {
                        return Poll::Ready(Err(err));
                    }
                    Box::pin(publish_dead_letter(cfg, env, err))
                }
                StateProj::Publishing { fut } => return fut.as_mut().poll(cx),
            };
            self.as_mut().project().state.set(State::Publishing { fut: publishing });
        }
    }
}

impl<S> Service<Envelope> for DeadLetter<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = DeadLetterFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        let fut = self.inner.call(env.clone());
        DeadLetterFuture {
            state: State::Handling {
                fut,
                env: Some(env),
                cfg: Some(self.config.clone()),
            },
        }
    }
}

/// Removes the dead-letter headers (`x-error`, `x-error-kind`,
/// `x-original-*`, `x-failed-at`, `x-retry-count`) and RabbitMQ's
/// (`x-death`, `x-first-death-*`, `x-last-death-*`) from `msg`.
/// A replayed message has no per-message TTL.
pub fn strip_dead_letter_headers(msg: &mut Message) {
    for k in [
        ERROR,
        ERROR_KIND,
        ORIGINAL_EXCHANGE,
        ORIGINAL_ROUTING_KEY,
        ORIGINAL_QUEUE,
        ORIGINAL_EXPIRATION,
        FAILED_AT,
        RETRY_COUNT,
        X_DEATH,
    ] {
        msg.headers.remove(k);
    }
    msg.headers
        .retain(|k, _| !k.starts_with("x-first-death-") && !k.starts_with("x-last-death-"));
}

/// Where a dead letter was originally published: its
/// `x-original-exchange` and `x-original-routing-key` headers (written by
/// [`DeadLetter`] and the broker-delayed retry), or else, for a message
/// RabbitMQ dead-lettered itself (a rejected, expired or overflowing
/// message), the exchange and first routing key of its latest death
/// (`x-death[0]`).
pub fn original_destination(msg: &Message) -> Option<Destination> {
    if let Some(rk) = msg.headers.get_str(ORIGINAL_ROUTING_KEY) {
        let ex = msg.headers.get_str(ORIGINAL_EXCHANGE).unwrap_or("");
        return Some(Destination::new(ex, rk));
    }
    let death = msg.headers.get(X_DEATH)?.as_array()?.first()?.as_table()?;
    let rk = death.get("routing-keys")?.as_array()?.first()?.as_str()?;
    Some(Destination::new(death.get_str("exchange").unwrap_or(""), rk))
}

/// Republishes one dead letter to its original destination (see
/// [`original_destination`]) with the dead-letter headers stripped; returns
/// where it went. The publish is mandatory: a destination that routes
/// nowhere is an error, not a silent loss.
///
/// Fails with `decode_failed` if the message names no original destination
/// (it is not a dead letter), and with the publisher's error (`unroutable`
/// among them) if the publish fails.
pub async fn replay(publisher: &dyn Publisher, mut message: Message) -> Result<Destination> {
    let dest = original_destination(&message).ok_or_else(|| {
        Error::decode(format!(
            "message {} has no {ORIGINAL_ROUTING_KEY} or {X_DEATH} header: not a dead letter, cannot replay",
            message
                .properties
                .message_id
                .as_deref()
                .unwrap_or("(without message id)")
        ))
    })?;
    strip_dead_letter_headers(&mut message);
    publisher
        .publish_with(&dest, message, PublishOptions::mandatory())
        .await?;
    Ok(dest)
}

/// Options of [`replay_queue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayOptions {
    /// Replay at most this many messages.
    pub max: usize,
    /// Stop when no message arrives for this long.
    pub idle: Duration,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            max: usize::MAX,
            idle: Duration::from_millis(500),
        }
    }
}

/// What [`replay_queue`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayReport {
    /// Messages republished (and acknowledged on the dead-letter queue).
    pub replayed: usize,
    /// Messages left on the queue because they name no original
    /// destination or could not be republished.
    pub skipped: usize,
}

/// Drains the dead-letter queue `queue`: each message is replayed to its
/// original destination (see [`replay`]) and then acknowledged. Messages
/// that cannot be replayed (not a dead letter, unroutable, missing
/// exchange) are requeued on the dead-letter queue at the end.
///
/// A transient error (connection trouble, an unconfirmed publish) ends the
/// run with that error, and so does a failed consume or acknowledgement;
/// before returning, every message taken and not replayed — the current one
/// included — is requeued, so nothing is left unsettled or lost. A message
/// whose acknowledgement failed after its replay may be replayed twice.
pub async fn replay_queue(
    consumer: &dyn Consumer,
    publisher: &dyn Publisher,
    queue: &str,
    options: ReplayOptions,
) -> Result<ReplayReport> {
    let mut sub = consumer.consume(queue, ConsumeOptions::default().prefetch(100)).await?;
    let mut report = ReplayReport::default();
    let mut keep = Vec::new();
    let outcome = loop {
        if report.replayed >= options.max {
            break Ok(());
        }
        let d = match tokio::time::timeout(options.idle, sub.next()).await {
            Ok(Some(Ok(d))) => d,
            Ok(Some(Err(e))) => break Err(e),
            Ok(None) | Err(_) => break Ok(()),
        };
        match replay(publisher, d.message.clone()).await {
            Ok(_) => match d.ack().await {
                Ok(()) => report.replayed += 1,
                Err(e) => break Err(e),
            },
            Err(e) => {
                tracing::warn!(queue, error = %e, "dead letter not replayed");
                report.skipped += 1;
                keep.push(d);
                if e.is_transient() {
                    break Err(e);
                }
            }
        }
    };
    let cancelled = sub.cancel_handle().cancel().await;
    requeue_all(queue, keep).await;
    // deliveries the consumer had buffered but not handed out yet
    let mut buffered = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
        buffered.push(d);
    }
    requeue_all(queue, buffered).await;
    drop(sub);
    outcome?;
    cancelled?;
    Ok(report)
}

/// Nacks (requeues) every delivery, logging (not stopping at) failures.
async fn requeue_all(queue: &str, deliveries: Vec<Delivery>) {
    for d in deliveries {
        let tag = d.info.delivery_tag;
        if let Err(e) = d.nack(true).await {
            tracing::warn!(queue, delivery_tag = tag, error = %e, "could not requeue a dead letter; the broker requeues it when the channel closes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::tests::Recorder;
    use crate::retry::{RetryLayer, RetryPolicy};
    use switchyard_core::handler_fn;
    use tower::{ServiceBuilder, ServiceExt};

    #[tokio::test(start_paused = true)]
    async fn final_failures_are_dead_lettered_with_reasons_others_pass_through() {
        let rec = Arc::new(Recorder::default());
        let layer = DeadLetterLayer::new(rec.clone(), "dlx");
        let svc = ServiceBuilder::new()
            .layer(layer.clone())
            .layer(RetryLayer::in_process(RetryPolicy::exponential(
                3,
                Duration::from_millis(10),
            )))
            .service(handler_fn(|e: Envelope| async move {
                match e.body().as_ref() {
                    b"bad" => Err(HandlerError::reject("no such customer")),
                    b"flaky" => Err(HandlerError::retry("db down")),
                    _ => Ok(()),
                }
            }));
        let env = |b: &'static str| Envelope::for_test(Message::new(b).with_message_id(b), "orders");
        assert_eq!(svc.clone().oneshot(env("bad")).await.unwrap(), Outcome::DeadLettered);
        assert_eq!(svc.clone().oneshot(env("flaky")).await.unwrap(), Outcome::DeadLettered);
        assert_eq!(svc.clone().oneshot(env("ok")).await.unwrap(), Outcome::Ack);
        let sent = rec.sent.lock().clone();
        assert_eq!(sent.len(), 2);
        let (d, m) = &sent[0];
        assert_eq!(d, &Destination::new("dlx", "orders"));
        assert_eq!(m.headers.get_str(ERROR), Some("no such customer"));
        assert_eq!(m.headers.get_str(ERROR_KIND), Some("permanent"));
        assert_eq!(m.headers.get_str(ORIGINAL_QUEUE), Some("orders"));
        assert_eq!(m.headers.get_str(ORIGINAL_EXCHANGE), Some(""));
        assert_eq!(m.headers.get_i64(RETRY_COUNT), Some(0));
        assert!(m.headers.get_i64(FAILED_AT).unwrap() > 1_700_000_000);
        let m = &sent[1].1;
        assert_eq!(m.headers.get_str(ERROR_KIND), Some("transient"));
        assert_eq!(m.headers.get_i64(RETRY_COUNT), Some(2));
        assert!(m.headers.get_str(ERROR).unwrap().contains("db down"));

        // a transient failure without a retry layer is not final: the Worker requeues it
        let bare = layer.layer(handler_fn(|_e: Envelope| async {
            Err::<(), _>(HandlerError::retry("x"))
        }));
        assert_eq!(bare.oneshot(env("t")).await.unwrap_err().kind(), FailureKind::Transient);
        assert_eq!(rec.sent.lock().len(), 2);
    }

    #[tokio::test]
    async fn from_settings_uses_the_dead_letter_exchange_and_key_or_nothing() {
        let rec = Arc::new(Recorder::default());
        let settings = switchyard_core::Settings::default().with_dead_letter(Some("app.dlx"));
        let layer = DeadLetterLayer::from_settings(rec.clone(), &settings).expect("dead-lettering is on");
        let svc = layer.layer(handler_fn(|_e: Envelope| async {
            Err::<(), _>(HandlerError::reject("no"))
        }));
        let out = svc
            .oneshot(Envelope::for_test(Message::new("x"), "orders"))
            .await
            .unwrap();
        assert_eq!(out, Outcome::DeadLettered);
        assert_eq!(
            rec.sent.lock()[0].0,
            Destination::new("app.dlx", switchyard_core::settings::DEAD_LETTER_ROUTING_KEY)
        );
        let off = switchyard_core::Settings::default().with_dead_letter(None);
        assert!(DeadLetterLayer::from_settings(rec, &off).is_none());
    }

    #[tokio::test]
    async fn transient_publish_failure_requeues() {
        let rec = Arc::new(Recorder::default());
        rec.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let svc = DeadLetterLayer::new(rec.clone(), "dlx").layer(handler_fn(|_e: Envelope| async {
            Err::<(), _>(HandlerError::decode("bad json"))
        }));
        let e = svc
            .oneshot(Envelope::for_test(Message::new("x"), "q"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), FailureKind::Transient, "{e}");
        assert!(e.message().contains("bad json"), "{e}");
    }

    #[tokio::test]
    async fn replay_strips_headers_and_restores_destination() {
        let rec = Arc::new(Recorder::default());
        let env = Envelope::for_test(
            Message::new("x")
                .with_header("tenant", "acme")
                .with_expiration(Duration::from_secs(5)),
            "orders",
        );
        let dl = dead_letter_message(&env, &HandlerError::reject("nope"));
        assert_eq!(dl.properties.expiration, None, "a dead letter does not expire");
        assert_eq!(dl.headers.get_i64(ORIGINAL_EXPIRATION), Some(5000));
        let mut with_original = dl.clone();
        with_original.headers.insert(ORIGINAL_EXCHANGE, "shop");
        with_original.headers.insert(ORIGINAL_ROUTING_KEY, "order.created");
        let dest = replay(&*rec, with_original).await.unwrap();
        assert_eq!(dest, Destination::new("shop", "order.created"));
        let m = rec.sent.lock()[0].1.clone();
        assert_eq!(
            m.headers.len(),
            1,
            "only the application header is left: {:?}",
            m.headers
        );
        assert_eq!(m.headers.get_str("tenant"), Some("acme"));
        let e = replay(&*rec, Message::new("plain")).await.unwrap_err();
        assert_eq!(e.code(), "decode_failed");
        assert_eq!(truncate("héllo", 2), "h");
    }
}
