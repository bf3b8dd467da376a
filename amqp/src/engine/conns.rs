//! Consumer connections for clients that lose a whole connection on a
//! delivery they cannot decode ([`ClientCaps::decode_failure_drops_connection`],
//! amqprs): consumers then run on connections apart from the main one, so
//! that one queue's poison message cannot stall declarations, RPC replies or
//! the publishing side.
//!
//! Consumers share such a connection up to
//! [`AmqpConfig::consumers_per_connection`] (a broker allows a bounded number
//! of sockets: a connection per consumer stops at a few hundred routes). When
//! a shared connection is lost while the broker stays up, nobody can tell
//! which consumer's delivery took it down, so every consumer on it is
//! *quarantined*: restarted on a connection of its own. The poisoned one then
//! keeps losing its own connection and is paused after [`POISON_LOSSES`]
//! losses within [`POISON_WINDOW`]; the others go on, each alone.
//!
//! [`ClientCaps::decode_failure_drops_connection`]: crate::client::ClientCaps
//! [`AmqpConfig::consumers_per_connection`]: crate::config::AmqpConfig

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use switchyard_core::{Error, Result};
use tokio::time::Instant;

use crate::client::{AmqpClient, AmqpConnection};

use super::consume::ConsumerShared;
use super::link::{Link, Live};
use super::Inner;

/// A connection carrying one or more consumers.
pub(crate) struct ConsumerConn<C: AmqpClient> {
    pub live: Arc<Live<C>>,
    /// Consumers on it; 0 once the last has left (it is then closed and never
    /// handed out again).
    users: Mutex<usize>,
    /// Shared with other consumers (from the pool), rather than its own.
    pub pooled: bool,
}

impl<C: AmqpClient> ConsumerConn<C> {
    /// Leaves the connection; the last consumer to leave closes it.
    pub async fn leave(&self) {
        let last = {
            let mut users = self.users.lock();
            *users = users.saturating_sub(1);
            *users == 0
        };
        if last {
            self.live.conn.close().await;
        }
    }
}

/// The shared consumer connections of one transport.
pub(crate) struct ConsumerConns<C: AmqpClient> {
    pool: Mutex<Vec<Arc<ConsumerConn<C>>>>,
}

impl<C: AmqpClient> Default for ConsumerConns<C> {
    fn default() -> Self {
        ConsumerConns {
            pool: Mutex::new(Vec::new()),
        }
    }
}

impl<C: AmqpClient> ConsumerConns<C> {
    /// A connection for one more consumer: a pooled one with room (at most
    /// `per` consumers each), a new pooled one, or, when `alone` (a
    /// quarantined consumer) or `per <= 1`, a connection of its own.
    pub async fn join(&self, link: &Link<C>, client: &C, per: usize, alone: bool) -> Result<Arc<ConsumerConn<C>>> {
        let pooled = per > 1 && !alone;
        if pooled {
            let mut pool = self.pool.lock();
            pool.retain(|c| *c.users.lock() > 0 && c.live.is_open());
            for c in pool.iter() {
                let mut users = c.users.lock();
                if *users > 0 && *users < per {
                    *users += 1;
                    return Ok(c.clone());
                }
            }
        }
        let conn = Arc::new(ConsumerConn {
            live: link.open(client).await?,
            users: Mutex::new(1),
            pooled,
        });
        if pooled {
            self.pool.lock().push(conn.clone());
        }
        Ok(conn)
    }

    /// The pooled connections' links (to close at shutdown).
    pub fn take_all(&self) -> Vec<Arc<Live<C>>> {
        self.pool.lock().drain(..).map(|c| c.live.clone()).collect()
    }
}

/// Losses of a consumer's own connection, within [`POISON_WINDOW`] and
/// while the broker stays up, after which the consumer is paused as stuck
/// on a message its client cannot decode.
pub(crate) const POISON_LOSSES: usize = 3;
/// See [`POISON_LOSSES`].
pub(crate) const POISON_WINDOW: Duration = Duration::from_secs(60);

/// Takes `conn` from `cs` if it is still the consumer's connection.
fn detach<C: AmqpClient>(cs: &ConsumerShared<C>, conn: &Arc<ConsumerConn<C>>) -> bool {
    let mut own = cs.own.lock();
    if own.as_ref().is_some_and(|c| Arc::ptr_eq(c, conn)) {
        *own = None;
        true
    } else {
        false
    }
}

/// Leaves whatever connection `cs` has (closed when it was the last on it).
pub(crate) async fn close_own<C: AmqpClient>(cs: &ConsumerShared<C>) {
    let own = cs.own.lock().take();
    if let Some(c) = own {
        c.leave().await;
    }
}

/// Watches a consumer's own connection: restarts the consumer when it
/// drops, and pauses it when it keeps dropping while the broker stays up
/// (a delivery the client cannot decode is redelivered each time).
pub(crate) async fn watch_own<C: AmqpClient>(
    weak: Weak<Inner<C>>,
    cs: Arc<ConsumerShared<C>>,
    conn: Arc<ConsumerConn<C>>,
) {
    let live = conn.live.clone();
    let stop = match weak.upgrade() {
        Some(i) => i.stop.clone(),
        None => return,
    };
    let mut lost = live.signals.watch_lost();
    let why = loop {
        if cs.cancelled.load(Ordering::Acquire) || cs.ended.load(Ordering::Acquire) {
            // The consumer is over: it leaves its connection.
            if detach(&cs, &conn) {
                conn.leave().await;
            }
            return;
        }
        if let Some(w) = live.signals.lost_reason() {
            break w;
        }
        if !live.conn.is_open() {
            tokio::time::sleep(Duration::from_millis(20)).await;
            break live.signals.lost_reason().unwrap_or_else(|| "connection closed".into());
        }
        tokio::select! {
            _ = stop.wait() => return,
            _ = lost.changed() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    };
    if detach(&cs, &conn) {
        conn.leave().await;
    }
    // The broker's own connection.close (an operator, a node going down) is
    // not a message the client choked on.
    let by_broker = live.signals.is_closed_by_broker();
    let pooled = conn.pooled;
    drop((live, conn));
    if cs.cancelled.load(Ordering::Acquire) || cs.ended.load(Ordering::Acquire) {
        return;
    }
    let Some(inner) = weak.upgrade() else { return };
    if inner.is_closed() {
        return;
    }
    // Wait a moment: when the broker went away, the main link sees it too.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let main_ok = inner.main.current.read().as_ref().is_some_and(|l| l.is_open())
        && inner.main.state.generation() == cs.own_main_generation.load(Ordering::Acquire);
    if main_ok && !by_broker {
        if pooled {
            // Any consumer on the shared connection may have taken it down:
            // each goes on alone, so that the next loss names the queue.
            cs.quarantined.store(true, Ordering::Release);
        }
        let now = Instant::now();
        let n = {
            let mut losses = cs.losses.lock();
            losses.push_back(now);
            while losses.front().is_some_and(|t| now.duration_since(*t) > POISON_WINDOW) {
                losses.pop_front();
            }
            losses.len()
        };
        if n >= POISON_LOSSES {
            let message = format!(
                "queue '{}': the {} client lost this consumer's connection {n} times within {:?} while the broker \
                 stayed up (last: {why}); a message it cannot decode (for example a header long string that is not \
                 UTF-8) is most likely at the head of the queue and redelivered each time. The consumer is paused; \
                 the other consumers go on (each on a connection of its own if they shared this one). Move the \
                 message out of the way: a quorum queue's delivery-limit dead-letters it, or call `park_head` on a \
                 lapin transport (it reads such headers as bytes), then restart the consumer",
                cs.queue,
                inner.client.name(),
                POISON_WINDOW
            );
            tracing::error!(queue = %cs.queue, cause = %why, "consumer paused: {message}");
            inner.forget_consumer(&cs);
            cs.end(Some(Error::decode(message)));
            return;
        }
        tracing::warn!(queue = %cs.queue, losses = n, error = %why, "consumer connection lost; restarting the consumer");
    }
    // Restart on a fresh connection of its own (the main link's supervisor
    // restarts it too when the broker itself went away).
    let mut delay = Duration::from_millis(100);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait() => return,
        }
        if cs.cancelled.load(Ordering::Acquire) || cs.ended.load(Ordering::Acquire) || inner.is_closed() {
            return;
        }
        let main = inner.main.current.read().clone();
        let Some(main) = main.filter(|l| l.is_open()) else {
            // The main supervisor restarts every consumer once it reconnects.
            return;
        };
        match inner.start_consumer(&main, &cs).await {
            Ok(()) => return,
            Err(e) if e.is_transient() => {
                tracing::debug!(queue = %cs.queue, error = %e, "consumer restart failed; retrying");
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => {
                inner.forget_consumer(&cs);
                cs.end(Some(e));
                return;
            }
        }
    }
}
