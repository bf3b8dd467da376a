//! One supervised connection ("link"): connect with attempts, watch for
//! loss, reconnect with backoff (honouring `max_attempts` on every client),
//! and surface blocked / unblocked in its state.

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use switchyard_core::{Error, Result};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::client::{AmqpChannel, AmqpClient, AmqpConnection, ClientError, ConnSignals, ConnectParams};
use crate::recovery::{ConnectionState, RecoveryConfig, StateWatch};

/// A level-triggered stop signal: once fired, every wait sees it, also the
/// ones that start later (a `Notify` would lose a stop fired while nobody
/// was waiting, e.g. during a connection attempt).
#[derive(Clone)]
pub(crate) struct Stop(Arc<watch::Sender<bool>>);

impl Stop {
    pub fn new() -> Self {
        Stop(Arc::new(watch::channel(false).0))
    }
    /// Fires the signal (for good).
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
    /// True once fired.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }
    /// Waits until fired.
    pub async fn wait(&self) {
        let mut rx = self.0.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// What a link is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Declarations, consumers, RPC replies (and publishing when the
    /// connections are not separate).
    Main,
    /// Publishing only.
    Publish,
}

impl Role {
    fn suffix(self) -> &'static str {
        match self {
            Role::Main => "consume",
            Role::Publish => "publish",
        }
    }
}

type Chan<C> = <<C as AmqpClient>::Connection as AmqpConnection>::Channel;
/// A lazily opened channel slot. Publishes read the open channel under the
/// plain lock (never held across an await, so concurrent publishers never
/// queue behind each other); only (re)opening the channel takes the async
/// one, so that one caller opens it while the others wait.
pub(crate) struct Slot<C: AmqpClient> {
    pub current: parking_lot::Mutex<Option<Arc<Chan<C>>>>,
    pub opening: tokio::sync::Mutex<()>,
    /// Single publishes sent or about to be sent on it, not yet settled.
    pub in_flight: std::sync::atomic::AtomicUsize,
}

impl<C: AmqpClient> Default for Slot<C> {
    fn default() -> Self {
        Slot {
            current: parking_lot::Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            in_flight: Default::default(),
        }
    }
}

impl<C: AmqpClient> Slot<C> {
    /// The slot's channel while it is open.
    pub fn open_channel(&self) -> Option<Arc<Chan<C>>> {
        self.current.lock().as_ref().filter(|c| c.is_open()).cloned()
    }
}

/// One live connection of a link.
pub(crate) struct Live<C: AmqpClient> {
    pub conn: C::Connection,
    /// The node it is connected to (`host:port`).
    pub address: String,
    /// The client reports `connection.blocked` (else a blocked connection
    /// only shows as confirms that do not come).
    pub blocked_notifications: bool,
    /// [`ClientCaps::publish_spill`](crate::client::ClientCaps::publish_spill).
    pub publish_spill: usize,
    pub signals: Arc<ConnSignals>,
    /// Counts the link's connections (1 for the first).
    pub generation: u64,
    /// Lazily opened publishing channels of this connection.
    pub pool: Vec<Slot<C>>,
    /// Idle admin channels of this connection.
    pub admin_idle: parking_lot::Mutex<Vec<Arc<Chan<C>>>>,
}

impl<C: AmqpClient> Live<C> {
    /// True while usable.
    pub fn is_open(&self) -> bool {
        self.conn.is_open() && self.signals.lost_reason().is_none()
    }
}

/// A supervised connection.
pub(crate) struct Link<C: AmqpClient> {
    pub role: Role,
    pub params: ConnectParams,
    pub state: StateWatch,
    pub current: RwLock<Option<Arc<Live<C>>>>,
    /// Wakes the supervisor after someone saw an operation fail as lost.
    pub kick: Notify,
    pool_size: usize,
    generation: parking_lot::Mutex<u64>,
    /// The address tried first by the next connection attempt.
    cursor: std::sync::atomic::AtomicUsize,
}

impl<C: AmqpClient> Link<C> {
    pub fn new(role: Role, params: &ConnectParams, pool_size: usize) -> Self {
        let mut params = params.clone();
        params.connection_name = format!("{}/{}", params.connection_name, role.suffix());
        Link {
            role,
            state: StateWatch::new(format!("{} ({})", params.describe(), role.suffix())),
            params,
            current: RwLock::new(None),
            kick: Notify::new(),
            pool_size: pool_size.max(1),
            generation: parking_lot::Mutex::new(0),
            cursor: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Opens one connection, trying every node address in turn from the
    /// current one (each bounded by the connection timeout).
    pub async fn open(&self, client: &C) -> Result<Arc<Live<C>>> {
        use std::sync::atomic::Ordering;
        let n = self.params.addresses.len().max(1);
        let start = self.cursor.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for k in 0..n {
            let idx = (start + k) % n;
            let mut params = self.params.clone();
            if let Some((host, port)) = self.params.addresses.get(idx) {
                params.host = host.clone();
                params.port = *port;
            }
            match self.open_at(client, &params).await {
                Ok(live) => {
                    self.cursor.store(idx, Ordering::Relaxed);
                    return Ok(live);
                }
                Err(e) => {
                    if n > 1 {
                        tracing::info!(link = ?self.role, address = %format!("{}:{}", params.host, params.port),
                            error = %e, "node unreachable; trying the next address");
                    }
                    failures.push(plain(&e));
                }
            }
        }
        Err(Error::ConnectionFailed {
            message: if failures.len() == 1 {
                failures.remove(0)
            } else {
                format!("no node answered: {}", failures.join("; "))
            },
        })
    }

    /// Moves the first address to try to the next node (after a loss).
    pub fn advance(&self) {
        let n = self.params.addresses.len().max(1);
        let _ = self.cursor.fetch_update(
            std::sync::atomic::Ordering::Relaxed,
            std::sync::atomic::Ordering::Relaxed,
            |c| Some((c + 1) % n),
        );
    }

    /// Opens one connection to the address in `params` (bounded by the
    /// connection timeout).
    async fn open_at(&self, client: &C, params: &ConnectParams) -> Result<Arc<Live<C>>> {
        let signals = Arc::new(ConnSignals::default());
        let attempt = client.connect(params, signals.clone());
        let conn = match tokio::time::timeout(params.connection_timeout, attempt).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                return Err(Error::ConnectionFailed {
                    message: format!("{}: {}", params.describe(), redact(&e.to_string(), params)),
                })
            }
            Err(_) => {
                return Err(Error::ConnectionFailed {
                    message: format!(
                        "{}: no answer within {:?}",
                        params.describe(),
                        params.connection_timeout
                    ),
                })
            }
        };
        let generation = {
            let mut g = self.generation.lock();
            *g += 1;
            *g
        };
        Ok(Arc::new(Live {
            conn,
            address: format!("{}:{}", params.host, params.port),
            blocked_notifications: client.caps().blocked_notifications,
            publish_spill: client.caps().publish_spill,
            signals,
            generation,
            pool: (0..self.pool_size).map(|_| Slot::default()).collect(),
            admin_idle: parking_lot::Mutex::new(Vec::new()),
        }))
    }

    /// Makes `live` the link's connection and its state connected (or blocked).
    pub fn install(&self, live: Arc<Live<C>>) {
        let blocked = live.signals.blocked_reason().is_some();
        *self.current.write() = Some(live);
        self.state.set(if blocked {
            ConnectionState::Blocked
        } else {
            ConnectionState::Connected
        });
    }

    /// The live connection when it is open and connected now (what
    /// [`wait`](Self::wait) returns at once).
    pub fn ready(&self) -> Option<Arc<Live<C>>> {
        let l = self.current.read().clone()?;
        (l.is_open() && self.state.get().is_connected()).then_some(l)
    }

    /// The live connection, waiting (bounded by `deadline`) through an outage.
    pub async fn wait(&self, deadline: Instant) -> Result<Arc<Live<C>>> {
        loop {
            if let Some(l) = self.ready() {
                return Ok(l);
            }
            if self.state.get().is_closed() {
                return Err(self.state.wait_connected(deadline).await.unwrap_err());
            }
            if self.current.read().as_ref().is_some_and(|l| !l.is_open()) {
                self.kick.notify_one();
            }
            // Wake up at least every 50 ms: the state may lag the socket.
            let step = (Instant::now() + Duration::from_millis(50)).min(deadline);
            match self.state.wait_connected(step).await {
                Ok(()) => {
                    if self.current.read().as_ref().is_some_and(|l| l.is_open()) {
                        continue;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e @ Error::Shutdown { .. }) => return Err(e),
                Err(e) => {
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// After an operation failed with a lost channel/connection: wake the
    /// supervisor and pause briefly before the caller retries.
    pub async fn suspect(&self) {
        self.kick.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Waits until `live` is lost (or `stop` fires); returns why, or `None` on stop.
    pub async fn watch(&self, live: &Live<C>, stop: &Stop) -> Option<String> {
        let mut lost = live.signals.watch_lost();
        let mut blocked = live.signals.watch_blocked();
        loop {
            if stop.is_set() {
                return None;
            }
            if let Some(why) = live.signals.lost_reason() {
                return Some(why);
            }
            if !live.conn.is_open() {
                // Give the adapter a moment to report why.
                tokio::time::sleep(Duration::from_millis(20)).await;
                return Some(live.signals.lost_reason().unwrap_or_else(|| "connection closed".into()));
            }
            tokio::select! {
                _ = stop.wait() => return None,
                _ = lost.changed() => {}
                r = blocked.changed() => {
                    if r.is_ok() {
                        let now_blocked = blocked.borrow_and_update().clone();
                        match now_blocked {
                            Some(reason) => {
                                self.state.set_last_error(format!("blocked by the broker: {reason}"));
                                self.state.set(ConnectionState::Blocked);
                            }
                            None => self.state.set(ConnectionState::Connected),
                        }
                    }
                }
                _ = self.kick.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Reconnects after a loss, sleeping the backoff between attempts.
    /// `Ok(None)` when stopped; `Err` when the attempts ran out.
    pub async fn reconnect<F, Fut>(
        &self,
        client: &C,
        recovery: &RecoveryConfig,
        stop: &Stop,
        mut setup: F,
    ) -> Result<Option<Arc<Live<C>>>>
    where
        F: FnMut(Arc<Live<C>>) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let mut backoff = recovery.backoff.delays();
        let mut attempt = 1u32;
        // Start with the next node: the last one just failed.
        self.advance();
        loop {
            if stop.is_set() {
                return Ok(None);
            }
            self.state.set(ConnectionState::Reconnecting { attempt });
            let outcome: Result<()> = match self.open(client).await {
                Ok(live) if stop.is_set() => {
                    // Closed while connecting: this connection is not wanted.
                    live.conn.close().await;
                    return Ok(None);
                }
                Ok(live) => match setup(live.clone()).await {
                    Ok(()) => return Ok(Some(live)),
                    Err(e) => {
                        live.conn.close().await;
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            if let Err(e) = outcome {
                tracing::info!(link = ?self.role, attempt, error = %e, "reconnect attempt failed");
                self.state.set_last_error(e.to_string());
                match backoff.next() {
                    Some(d) => {
                        attempt += 1;
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = stop.wait() => return Ok(None),
                        }
                    }
                    None => {
                        return Err(Error::connection_closed(format!(
                            "gave up reconnecting to {} after {attempt} attempt(s) (recovery max_attempts): {e}",
                            self.params.describe()
                        )))
                    }
                }
            }
        }
    }
}

/// An error's text without the variant's own prefix and hint, for nesting
/// it in another `connection_failed`.
pub(crate) fn plain(e: &Error) -> String {
    match e {
        Error::ConnectionFailed { message } => message.clone(),
        other => other.to_string(),
    }
}

/// Removes the password from a client's error text, should it echo the URL.
pub(crate) fn redact(text: &str, params: &ConnectParams) -> String {
    let pw = params.password.expose();
    if pw.is_empty() {
        text.to_owned()
    } else {
        text.replace(pw, "***")
    }
}

/// Maps a [`ClientError`] from an operation on `subject` to a switchyard error.
pub(crate) fn map(e: ClientError, subject: crate::errors::Subject<'_>, op: (u16, u16)) -> Error {
    match e {
        ClientError::Broker(mut reply) => {
            if reply.class_id == 0 {
                reply.class_id = op.0;
                reply.method_id = op.1;
            }
            crate::errors::from_reply(reply, subject)
        }
        ClientError::Closed(m) => Error::connection_closed(m),
        ClientError::Encode(m) => Error::encode(m),
        ClientError::Other(m) => Error::transport(m),
    }
}
