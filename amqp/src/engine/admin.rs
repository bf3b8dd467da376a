//! Declarations and queue operations on the main connection, retried across
//! reconnects (until the publish wait deadline), recorded for replay; and
//! the replay itself.

use std::sync::Arc;

use async_trait::async_trait;
use switchyard_core::{Binding, DeleteIf, Error, ExchangeSpec, QueueInfo, QueueSpec, Result};

use crate::client::{AmqpChannel, AmqpClient, AmqpConnection, BoxFuture, ClientError};
use crate::errors::Subject;
use crate::recovery::TopologyDeclarer;

use super::link::{map, Live};
use super::Inner;

type Chan<C> = <<C as AmqpClient>::Connection as AmqpConnection>::Channel;

/// AMQP (class, method) ids of the operations, for errors.
pub(super) mod op {
    pub const BASIC_GET: (u16, u16) = (60, 70);
    pub const EXCHANGE_DECLARE: (u16, u16) = (40, 10);
    pub const EXCHANGE_DELETE: (u16, u16) = (40, 20);
    pub const EXCHANGE_BIND: (u16, u16) = (40, 30);
    pub const EXCHANGE_UNBIND: (u16, u16) = (40, 40);
    pub const QUEUE_DECLARE: (u16, u16) = (50, 10);
    pub const QUEUE_BIND: (u16, u16) = (50, 20);
    pub const QUEUE_PURGE: (u16, u16) = (50, 30);
    pub const QUEUE_DELETE: (u16, u16) = (50, 40);
    pub const QUEUE_UNBIND: (u16, u16) = (50, 50);
    pub const CHANNEL_OPEN: (u16, u16) = (20, 10);
}

pub(super) async fn admin_channel<C: AmqpClient>(live: &Live<C>) -> std::result::Result<Arc<Chan<C>>, ClientError> {
    loop {
        let idle = live.admin_idle.lock().pop();
        match idle {
            Some(ch) if ch.is_open() => return Ok(ch),
            Some(_) => continue,
            None => return Ok(Arc::new(live.conn.open_channel().await?)),
        }
    }
}

/// Runs `f` on an admin channel of the main connection, retrying across
/// reconnects until the deadline. A channel the broker closed is dropped.
pub(super) async fn run<C, T, F>(inner: &Inner<C>, subject: Subject<'_>, op: (u16, u16), f: F) -> Result<T>
where
    C: AmqpClient,
    T: Send + 'static,
    F: Fn(Arc<Chan<C>>) -> BoxFuture<std::result::Result<T, ClientError>>,
{
    run_keep(inner, subject, op, f, |_| true).await
}

/// [`run`], where `reusable` says whether the channel may serve the next
/// operation after a success (not when the result still needs it, e.g. an
/// unsettled `basic.get`).
pub(super) async fn run_keep<C, T, F, K>(
    inner: &Inner<C>,
    subject: Subject<'_>,
    op: (u16, u16),
    f: F,
    reusable: K,
) -> Result<T>
where
    C: AmqpClient,
    T: Send + 'static,
    F: Fn(Arc<Chan<C>>) -> BoxFuture<std::result::Result<T, ClientError>>,
    K: Fn(&T) -> bool,
{
    if inner.is_closed() {
        return Err(inner.shutdown_error());
    }
    let deadline = inner.deadline();
    loop {
        let live = inner.main.wait(deadline).await?;
        let ch = match admin_channel(&live).await {
            Ok(c) => c,
            Err(e) if e.is_lost() || !live.is_open() => {
                inner.main.suspect().await;
                if tokio::time::Instant::now() >= deadline {
                    return Err(map(e, subject, op::CHANNEL_OPEN));
                }
                continue;
            }
            Err(e) => return Err(map(e, subject, op::CHANNEL_OPEN)),
        };
        // On a task of its own: a caller's timeout never cancels a request
        // mid-flight (some clients mismatch replies afterwards).
        let result = match tokio::spawn(f(ch.clone())).await {
            Ok(r) => r,
            Err(e) => Err(ClientError::Other(format!("internal task failed: {e}"))),
        };
        match result {
            Ok(v) => {
                if ch.is_open() && reusable(&v) {
                    live.admin_idle.lock().push(ch);
                }
                return Ok(v);
            }
            Err(e) if e.is_lost() || !live.is_open() => {
                inner.main.suspect().await;
                if e.refuses(op) || tokio::time::Instant::now() >= deadline {
                    return Err(map(e, subject, op));
                }
            }
            Err(e) => return Err(map(e, subject, op)),
        }
    }
}

pub(crate) async fn declare_exchange<C: AmqpClient>(inner: &Inner<C>, spec: &ExchangeSpec) -> Result<()> {
    let s = spec.clone();
    run(inner, Subject::Exchange(&spec.name), op::EXCHANGE_DECLARE, move |ch| {
        let s = s.clone();
        Box::pin(async move { ch.declare_exchange(&s, false).await })
    })
    .await?;
    inner.topology.record_exchange(spec);
    Ok(())
}

pub(crate) async fn declare_queue<C: AmqpClient>(inner: &Inner<C>, spec: &QueueSpec) -> Result<QueueInfo> {
    let s = spec.clone();
    let info = run(inner, Subject::Queue(&spec.name), op::QUEUE_DECLARE, move |ch| {
        let s = s.clone();
        Box::pin(async move { ch.declare_queue(&s, false).await })
    })
    .await?;
    inner.topology.record_queue(spec, &info.name);
    Ok(info)
}

fn bind_op(b: &Binding, bind: bool) -> (u16, u16) {
    match (b.destination_is_exchange, bind) {
        (true, true) => op::EXCHANGE_BIND,
        (true, false) => op::EXCHANGE_UNBIND,
        (false, true) => op::QUEUE_BIND,
        (false, false) => op::QUEUE_UNBIND,
    }
}

fn bind_subject(b: &Binding) -> Subject<'_> {
    if b.destination_is_exchange {
        Subject::Exchange(&b.destination)
    } else {
        Subject::Queue(&b.destination)
    }
}

pub(crate) async fn bind<C: AmqpClient>(inner: &Inner<C>, binding: &Binding) -> Result<()> {
    let b = resolved(inner, binding);
    run(inner, bind_subject(binding), bind_op(binding, true), move |ch| {
        let b = b.clone();
        Box::pin(async move { ch.bind(&b).await })
    })
    .await?;
    inner.topology.record_binding(binding);
    Ok(())
}

pub(crate) async fn unbind<C: AmqpClient>(inner: &Inner<C>, binding: &Binding) -> Result<()> {
    let b = resolved(inner, binding);
    run(inner, bind_subject(binding), bind_op(binding, false), move |ch| {
        let b = b.clone();
        Box::pin(async move { ch.unbind(&b).await })
    })
    .await?;
    inner.topology.remove_binding(binding);
    Ok(())
}

/// The binding with a server-named queue's current name.
fn resolved<C: AmqpClient>(inner: &Inner<C>, b: &Binding) -> Binding {
    let mut b = b.clone();
    if !b.destination_is_exchange {
        b.destination = inner.topology.resolve_queue(&b.destination);
    }
    b
}

pub(crate) async fn delete_exchange<C: AmqpClient>(inner: &Inner<C>, name: &str, if_unused: bool) -> Result<()> {
    let n = name.to_owned();
    let r = run(inner, Subject::Exchange(name), op::EXCHANGE_DELETE, move |ch| {
        let n = n.clone();
        Box::pin(async move { ch.delete_exchange(&n, if_unused).await })
    })
    .await;
    match r {
        Ok(()) | Err(Error::ExchangeNotFound { .. }) => {
            inner.topology.remove_exchange(name);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

pub(crate) async fn delete_queue<C: AmqpClient>(inner: &Inner<C>, name: &str, only: DeleteIf) -> Result<u32> {
    let n = inner.topology.resolve_queue(name);
    let r = run(inner, Subject::Queue(name), op::QUEUE_DELETE, move |ch| {
        let n = n.clone();
        Box::pin(async move { ch.delete_queue(&n, only.unused, only.empty).await })
    })
    .await;
    match r {
        Ok(n) => {
            inner.topology.remove_queue(name);
            Ok(n)
        }
        Err(Error::QueueNotFound { .. }) => {
            inner.topology.remove_queue(name);
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

pub(crate) async fn purge_queue<C: AmqpClient>(inner: &Inner<C>, name: &str) -> Result<u32> {
    let n = inner.topology.resolve_queue(name);
    run(inner, Subject::Queue(name), op::QUEUE_PURGE, move |ch| {
        let n = n.clone();
        Box::pin(async move { ch.purge_queue(&n).await })
    })
    .await
}

pub(crate) async fn queue_info<C: AmqpClient>(inner: &Inner<C>, name: &str) -> Result<QueueInfo> {
    let spec = QueueSpec::new(inner.topology.resolve_queue(name));
    run(inner, Subject::Queue(name), op::QUEUE_DECLARE, move |ch| {
        let s = spec.clone();
        Box::pin(async move { ch.declare_queue(&s, true).await })
    })
    .await
}

pub(crate) async fn exchange_exists<C: AmqpClient>(inner: &Inner<C>, name: &str) -> Result<bool> {
    if name.is_empty() {
        return Ok(true);
    }
    let spec = ExchangeSpec::direct(name);
    let r = run(inner, Subject::Exchange(name), op::EXCHANGE_DECLARE, move |ch| {
        let s = spec.clone();
        Box::pin(async move { ch.declare_exchange(&s, true).await })
    })
    .await;
    match r {
        Ok(()) => Ok(true),
        Err(Error::ExchangeNotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Re-declares recorded topology on a fresh connection.
pub(crate) struct Replayer<C: AmqpClient> {
    pub live: Arc<Live<C>>,
}

impl<C: AmqpClient> Replayer<C> {
    async fn channel(&self) -> Result<Arc<Chan<C>>> {
        admin_channel(&self.live)
            .await
            .map_err(|e| map(e, Subject::Other, op::CHANNEL_OPEN))
    }

    /// Connection-level failures abort the replay (the recovery retries);
    /// a refused declaration (someone changed the entity meanwhile) is
    /// logged and skipped so that one conflict cannot block recovery forever.
    fn outcome(&self, ch: Arc<Chan<C>>, r: std::result::Result<(), ClientError>, what: &str) -> Result<()> {
        match r {
            Ok(()) => {
                self.live.admin_idle.lock().push(ch);
                Ok(())
            }
            Err(e) if e.is_lost() || !self.live.is_open() => Err(map(e, Subject::Other, (0, 0))),
            Err(e) => {
                tracing::warn!(error = %e, "re-declaring {what} after a reconnect was refused; skipped");
                Ok(())
            }
        }
    }
}

#[async_trait]
impl<C: AmqpClient> TopologyDeclarer for Replayer<C> {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()> {
        let ch = self.channel().await?;
        let r = ch.declare_exchange(spec, false).await;
        self.outcome(ch, r, &format!("exchange '{}'", spec.name))
    }
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<String> {
        let ch = self.channel().await?;
        match ch.declare_queue(spec, false).await {
            Ok(info) => {
                self.live.admin_idle.lock().push(ch);
                Ok(info.name)
            }
            Err(e) => self
                .outcome(ch, Err(e), &format!("queue '{}'", spec.name))
                .map(|()| spec.name.clone()),
        }
    }
    async fn bind(&self, b: &Binding) -> Result<()> {
        let ch = self.channel().await?;
        let r = ch.bind(b).await;
        self.outcome(ch, r, &format!("binding {} -> {}", b.source, b.destination))
    }
}
