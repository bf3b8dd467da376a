//! Scenario context and assertion helpers.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::TransportFactory;
use crate::error::Error;
use crate::message::Message;
use crate::topology::{Binding, Destination, ExchangeKind, ExchangeSpec, QueueSpec};
use crate::transport::{ConsumeOptions, Delivery, Subscription, Transport};

/// How long a scenario waits for something that should happen (a delivery,
/// a depth reached). Generous: a shared RabbitMQ on a busy machine is slow.
pub const WAIT: Duration = Duration::from_secs(5);

/// How long a scenario waits to be confident that something does *not*
/// happen (no further delivery).
pub const QUIET: Duration = Duration::from_millis(400);

/// What a scenario gets: the transport under test, a way to open more
/// connections, unique names, and cleanup of what it declared.
pub struct Ctx<'f> {
    factory: &'f dyn TransportFactory,
    transport: Arc<dyn Transport>,
    prefix: String,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
    connections: Mutex<Vec<Arc<dyn Transport>>>,
}

impl<'f> Ctx<'f> {
    pub(crate) fn new(factory: &'f dyn TransportFactory, transport: Arc<dyn Transport>, case: &str) -> Self {
        let short: String = case
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        Ctx {
            factory,
            transport,
            prefix: format!("sy-conf.{short}.{}", &crate::message::new_id()[..8]),
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
            connections: Mutex::new(Vec::new()),
        }
    }

    /// The transport under test.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// A second, independent connection to the same broker (closed after
    /// the scenario).
    pub async fn connect(&self) -> Arc<dyn Transport> {
        let t = self.factory.connect().await;
        self.connections.lock().push(t.clone());
        t
    }

    /// A name unique to this run of this scenario, for a queue or exchange.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    /// A unique queue name, deleted after the scenario.
    pub fn queue_name(&self, suffix: &str) -> String {
        let n = self.name(suffix);
        self.queues.lock().push(n.clone());
        n
    }

    /// A unique exchange name, deleted after the scenario.
    pub fn exchange_name(&self, suffix: &str) -> String {
        let n = self.name(suffix);
        self.exchanges.lock().push(n.clone());
        n
    }

    /// Declares `spec` on the transport under test and registers the
    /// queue (its generated name, for a server-named queue) for deletion.
    /// Returns the queue's name.
    pub async fn declare_queue(&self, spec: QueueSpec) -> Result<String, String> {
        let what = format!("declare queue '{}'", spec.name);
        let info = self.transport.declare_queue(&spec).await.ctx(&what)?;
        let mut queues = self.queues.lock();
        if !queues.contains(&info.name) {
            queues.push(info.name.clone());
        }
        Ok(info.name)
    }

    /// Declares a plain queue named after `suffix` (durable, no arguments).
    pub async fn queue(&self, suffix: &str) -> Result<String, String> {
        self.declare_queue(QueueSpec::new(self.queue_name(suffix))).await
    }

    /// Declares an exchange of `kind` named after `suffix`.
    pub async fn exchange(&self, suffix: &str, kind: ExchangeKind) -> Result<String, String> {
        let name = self.exchange_name(suffix);
        self.transport
            .declare_exchange(&ExchangeSpec::new(name.clone(), kind.clone()))
            .await
            .ctx(&format!("declare {} exchange '{name}'", kind.as_str()))?;
        Ok(name)
    }

    /// Binds `queue` to `exchange` with `key`.
    pub async fn bind(&self, queue: &str, exchange: &str, key: &str) -> Result<(), String> {
        self.transport
            .bind(&Binding::queue(queue, exchange, key))
            .await
            .ctx(&format!("bind '{queue}' to '{exchange}' with '{key}'"))
    }

    /// Publishes a message with `body` to `dest`.
    pub async fn publish(&self, dest: &Destination, body: &str) -> Result<(), String> {
        self.publish_message(dest, Message::new(body.to_owned())).await
    }

    /// Publishes `message` to `dest`.
    pub async fn publish_message(&self, dest: &Destination, message: Message) -> Result<(), String> {
        self.transport
            .publish(dest, message)
            .await
            .ctx(&format!("publish to {dest}"))
    }

    /// Publishes one message per body, in order.
    pub async fn publish_all(&self, dest: &Destination, bodies: &[&str]) -> Result<(), String> {
        for b in bodies {
            self.publish(dest, b).await?;
        }
        Ok(())
    }

    /// Starts a consumer on `queue` through the transport under test.
    pub async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription, String> {
        self.transport
            .consume(queue, options)
            .await
            .ctx(&format!("consume '{queue}'"))
    }

    /// The ready-message count of `queue`.
    pub async fn depth(&self, queue: &str) -> Result<u32, String> {
        Ok(self
            .transport
            .queue_info(queue)
            .await
            .ctx(&format!("queue_info '{queue}'"))?
            .message_count)
    }

    /// Waits (up to [`WAIT`]) until `queue` holds exactly `n` ready messages.
    pub async fn wait_depth(&self, queue: &str, n: u32) -> Result<(), String> {
        let reached = eventually(WAIT, || async { matches!(self.depth(queue).await, Ok(d) if d == n) }).await;
        if reached {
            return Ok(());
        }
        let now = self.depth(queue).await?;
        Err(format!(
            "queue '{queue}' should reach depth {n}, still {now} after {WAIT:?}"
        ))
    }

    /// Reads the whole content of `queue` with a fresh auto-ack consumer:
    /// bodies in delivery order. It first takes as many messages as the
    /// queue's depth reports (each within [`WAIT`], so a slow broker does
    /// not truncate the result), then keeps reading until nothing arrives
    /// for [`QUIET`]. The consumer is cancelled afterwards.
    pub async fn drain(&self, queue: &str) -> Result<Vec<String>, String> {
        let ready = self.depth(queue).await?;
        let mut sub = self
            .consume(queue, ConsumeOptions::default().auto_ack(true).prefetch(0))
            .await?;
        let mut out = Vec::new();
        for d in take(&mut sub, ready as usize)
            .await
            .map_err(|e| format!("draining '{queue}' ({ready} ready): {e}"))?
        {
            out.push(body(&d));
        }
        loop {
            match tokio::time::timeout(QUIET, sub.next()).await {
                Err(_) | Ok(None) => break,
                Ok(Some(Ok(d))) => out.push(body(&d)),
                Ok(Some(Err(e))) => return Err(format!("draining '{queue}': {e}")),
            }
        }
        cancel(&sub).await.ctx(&format!("cancel drain consumer on '{queue}'"))?;
        Ok(out)
    }

    pub(crate) async fn cleanup(&self) {
        let queues = std::mem::take(&mut *self.queues.lock());
        let exchanges = std::mem::take(&mut *self.exchanges.lock());
        let connections = std::mem::take(&mut *self.connections.lock());
        for q in queues {
            let _ = self.transport.delete_queue(&q).await;
        }
        for e in exchanges {
            let _ = self.transport.delete_exchange(&e).await;
        }
        for c in connections {
            let _ = c.close().await;
        }
        let _ = self.transport.close().await;
    }
}

/// Cancels `sub` through its [`CancelHandle`](crate::transport::CancelHandle)
/// (usable in `Send` futures, unlike awaiting `Subscription::cancel`, whose
/// future borrows the non-`Sync` subscription).
pub fn cancel(sub: &Subscription) -> impl Future<Output = crate::Result<()>> + Send + 'static {
    let handle = sub.cancel_handle();
    async move { handle.cancel().await }
}

/// The body of a delivery as (lossy) UTF-8.
pub fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.message.body).into_owned()
}

/// Receives exactly `n` deliveries (each within [`WAIT`]) and returns them
/// unsettled.
pub async fn take(sub: &mut Subscription, n: usize) -> Result<Vec<Delivery>, String> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let d = super::recv(sub, WAIT)
            .await
            .map_err(|e| format!("{e} (had {i} of {n} expected deliveries)"))?;
        out.push(d);
    }
    Ok(out)
}

/// Receives `n` deliveries, acknowledges each, and returns their bodies.
pub async fn take_bodies(sub: &mut Subscription, n: usize) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(n);
    for d in take(sub, n).await? {
        out.push(body(&d));
        d.ack().await.ctx("ack")?;
    }
    Ok(out)
}

/// Fails unless `result` is an error with the stable `code`.
pub fn expect_code<T: std::fmt::Debug>(what: &str, result: Result<T, Error>, code: &str) -> Result<Error, String> {
    match result {
        Err(e) if e.code() == code => Ok(e),
        Err(e) => Err(format!("{what}: expected error '{code}', got '{}' ({e})", e.code())),
        Ok(v) => Err(format!("{what}: expected error '{code}', got Ok({v:?})")),
    }
}

/// Polls `check` every 20 ms until it returns true or `within` elapses;
/// returns whether it did.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Fails with `msg` unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// Fails unless `left == right`, naming `what`.
pub fn ensure_eq<T: PartialEq + std::fmt::Debug>(what: &str, left: T, right: T) -> Result<(), String> {
    if left == right {
        Ok(())
    } else {
        Err(format!("{what}: got {left:?}, expected {right:?}"))
    }
}

/// Turns any displayable error into a scenario failure with context.
pub trait Context<T> {
    /// Adds `what` to the error.
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// The RabbitMQ URL broker tests connect to: `RABBITMQ_URL`, or the local
/// default `amqp://guest:guest@127.0.0.1:5672/`.
pub fn rabbitmq_url() -> String {
    std::env::var("RABBITMQ_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/".into())
}

/// True when the run requires a reachable broker (`SWITCHYARD_REQUIRE_RABBITMQ=1`, as `scripts/test.sh` sets).
pub fn rabbitmq_required() -> bool {
    std::env::var("SWITCHYARD_REQUIRE_RABBITMQ").as_deref() == Ok("1")
}

/// What a broker test does when it cannot connect: panics with `error` when
/// the broker is required ([`rabbitmq_required`]), otherwise prints
/// `skipped: RabbitMQ unreachable (error)` and returns `None`.
pub fn broker_unreachable<T>(error: impl std::fmt::Display) -> Option<T> {
    if rabbitmq_required() {
        panic!("RabbitMQ unreachable and SWITCHYARD_REQUIRE_RABBITMQ=1: {error}");
    }
    println!("skipped: RabbitMQ unreachable ({error})");
    None
}
