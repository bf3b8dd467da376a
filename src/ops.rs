//! An operations endpoint next to a running [`Worker`](crate::worker::Worker)
//! (cargo feature `ops`): a small HTTP/1.1 server on tokio alone that
//! answers `GET` on
//!
//! | path | answer |
//! |---|---|
//! | `/metrics` | Prometheus text: the Worker's counters per route, connection state, queue depths; with [`OpsServer::with_prometheus`] (feature `prometheus`) also the `metrics`-facade metrics (`MetricsLayer`'s) |
//! | `/healthz` | 200 while every route's consume loop runs, else 503 naming the routes that do not |
//! | `/readyz` | 200 when the transport is healthy, connected and not blocked, every route consumes, and no route is stale; else 503 with the reasons |
//! | `/status` | JSON: per route its status, counters, last delivery age and queue depth; the connection |
//!
//! Other paths answer 404, other methods 405. Each answer closes its
//! connection (`Connection: close`).
//!
//! **Stale routes.** As the seed's consumer health check does, a route is
//! stale when it has had no delivery for longer than
//! [`stale_after`](OpsServer::stale_after) (5 minutes by default; counted
//! from the Worker's start when no delivery came) — but, unlike the seed,
//! only when its queue has messages waiting, so an idle queue is not
//! unready. Queue depths come through the transport's
//! [`queue_info`](crate::Admin::queue_info): polled every
//! [`queue_depth`](OpsServer::queue_depth) interval when set (and shown in
//! `/metrics` and `/status`), else asked by `/readyz` for an idle route only.
//!
//! **Connection.** [`OpsServer::amqp`] watches a RabbitMQ transport (lapin
//! or amqprs): its connection state, node address and reconnect count go to
//! `/metrics` and `/status`, and `/readyz` fails while the connection is
//! down or blocked by a resource alarm. For any other source, give
//! [`OpsServer::connection`] a closure.
//!
//! **Lifetime.** The server stops when its [`OpsHandle`] is dropped or
//! [`shut down`](OpsHandle::shutdown), and when the Worker has stopped on
//! request (every route [`Stopped`](crate::worker::ConsumerStatus::Stopped)).
//! When a route *failed*, the server keeps answering (`/healthz` and
//! `/readyz` 503 with the error) until the handle goes.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> switchyard::Result<()> {
//! use std::time::Duration;
//! use switchyard::ops::OpsServer;
//! use switchyard::worker::Worker;
//! use switchyard::{handler_fn, Admin, QueueSpec, Settings, TransportKind};
//!
//! let transport = switchyard::connect(&Settings::default().with_transport(TransportKind::Memory)).await?;
//! transport.declare_queue(&QueueSpec::new("jobs")).await?;
//! let worker = Worker::new(transport.clone())
//!     .route("jobs", handler_fn(|| async {}))
//!     .start()
//!     .await?;
//! let ops = OpsServer::new(worker.clone())
//!     .transport(transport)
//!     .stale_after(Duration::from_secs(300))
//!     .queue_depth(Duration::from_secs(10))
//!     .bind("127.0.0.1:0") // e.g. "0.0.0.0:9464" in a container
//!     .await?;
//! println!("ops endpoint on http://{}/metrics", ops.local_addr());
//! // … later:
//! worker.shutdown().await?;
//! ops.shutdown().await;
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::worker::{ConsumerStatus, RouteReport, WorkerHandle};
use crate::{Error, Result, Transport};

/// The metrics-exporter-prometheus crate, for
/// [`OpsServer::prometheus_handle`] (feature `prometheus`).
#[cfg(feature = "prometheus")]
pub use metrics_exporter_prometheus as prometheus;

/// How long a route may go without a delivery while its queue has messages
/// before `/readyz` calls it stale (the seed's 5 minutes).
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(300);

/// How long `/readyz` waits for the transport's health check.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request head read.
const MAX_HEAD: usize = 8 * 1024;

/// The state of a transport's connection, as [`OpsServer::connection`]'s
/// closure reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// A short description of the state (`connected`, `reconnecting (attempt 2)`, …).
    pub state: String,
    /// True when connected (blocked or not).
    pub connected: bool,
    /// True when the broker blocks publishing (a memory or disk alarm).
    pub blocked: bool,
    /// The node (`host:port`) the connection is on, if connected.
    pub address: Option<String>,
    /// Reconnections since the first connection (a RabbitMQ transport's
    /// state-watch generation minus one).
    pub reconnects: u64,
}

impl ConnectionInfo {
    /// The connection of a RabbitMQ transport (cargo feature `lapin` or
    /// `amqprs`): the consuming connection's state and node, blocked when
    /// either connection is blocked by a resource alarm, and the reconnects
    /// counted by its state watch (generation − 1).
    #[cfg(any(feature = "lapin", feature = "amqprs"))]
    pub fn of_amqp<C: switchyard_amqp::AmqpClient>(t: &switchyard_amqp::AmqpTransport<C>) -> Self {
        use switchyard_amqp::ConnectionState;
        let state = t.state_watch().get();
        ConnectionInfo {
            state: state.to_string(),
            connected: state.is_connected(),
            blocked: state == ConnectionState::Blocked || t.publish_state_watch().get() == ConnectionState::Blocked,
            address: t.connected_address(),
            reconnects: t.state_watch().generation().saturating_sub(1),
        }
    }
}

type ConnectionFn = Arc<dyn Fn() -> ConnectionInfo + Send + Sync>;

/// Builds the ops endpoint of a Worker; see the [module docs](self).
#[derive(Clone)]
pub struct OpsServer {
    worker: WorkerHandle,
    transport: Option<Arc<dyn Transport>>,
    connection: Option<ConnectionFn>,
    stale_after: Duration,
    depth_every: Option<Duration>,
    #[cfg(feature = "prometheus")]
    prometheus: Option<metrics_exporter_prometheus::PrometheusHandle>,
}

impl std::fmt::Debug for OpsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsServer")
            .field("worker", &self.worker)
            .field("transport", &self.transport.as_ref().map(|t| t.name()))
            .field("connection", &self.connection.is_some())
            .field("stale_after", &self.stale_after)
            .field("queue_depth_every", &self.depth_every)
            .finish()
    }
}

impl OpsServer {
    /// The endpoint of the Worker behind `worker`, with no transport, no
    /// connection closure, no queue-depth polling and a stale threshold of
    /// [`DEFAULT_STALE_AFTER`].
    pub fn new(worker: WorkerHandle) -> Self {
        OpsServer {
            worker,
            transport: None,
            connection: None,
            stale_after: DEFAULT_STALE_AFTER,
            depth_every: None,
            #[cfg(feature = "prometheus")]
            prometheus: None,
        }
    }

    /// The Worker's transport: `/readyz` runs its
    /// [`health_check`](Transport::health_check), and queue depths are
    /// read through it.
    pub fn transport(mut self, transport: Arc<dyn Transport>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Reports the connection state through `f`, called on every request
    /// (keep it cheap). For a RabbitMQ transport built directly (not
    /// through `switchyard::connect`, whose `Arc<dyn Transport>` hides it):
    ///
    /// ```no_run
    /// # #[cfg(feature = "lapin")]
    /// # fn demo(t: std::sync::Arc<switchyard::lapin::LapinTransport>, worker: switchyard::worker::WorkerHandle) {
    /// use switchyard::lapin::ConnectionState;
    /// use switchyard::ops::{ConnectionInfo, OpsServer};
    /// let ops = OpsServer::new(worker).transport(t.clone()).connection(move || {
    ///     let state = t.state_watch().get();
    ///     ConnectionInfo {
    ///         state: state.to_string(),
    ///         connected: state.is_connected(),
    ///         blocked: state == ConnectionState::Blocked
    ///             || t.publish_state_watch().get() == ConnectionState::Blocked,
    ///         address: t.connected_address(),
    ///         reconnects: t.state_watch().generation().saturating_sub(1),
    ///     }
    /// });
    /// # let _ = ops; }
    /// ```
    pub fn connection(mut self, f: impl Fn() -> ConnectionInfo + Send + Sync + 'static) -> Self {
        self.connection = Some(Arc::new(f));
        self
    }

    /// Watches a RabbitMQ transport (lapin's or amqprs's, built directly
    /// rather than through `switchyard::connect`): sets it as the
    /// [`transport`](Self::transport) and reports its connection through
    /// [`ConnectionInfo::of_amqp`] (cargo feature `lapin` or `amqprs`).
    ///
    /// ```no_run
    /// # #[cfg(feature = "lapin")]
    /// # async fn demo(worker: switchyard::worker::WorkerHandle) -> switchyard::Result<()> {
    /// use std::sync::Arc;
    /// use switchyard::lapin::LapinTransport;
    /// use switchyard::ops::OpsServer;
    /// let rabbit = Arc::new(LapinTransport::connect(&switchyard::Settings::from_env()?).await?);
    /// let ops = OpsServer::new(worker).amqp(rabbit).bind("0.0.0.0:9464").await?;
    /// # let _ = ops; Ok(()) }
    /// ```
    #[cfg(any(feature = "lapin", feature = "amqprs"))]
    pub fn amqp<C: switchyard_amqp::AmqpClient + 'static>(self, t: Arc<switchyard_amqp::AmqpTransport<C>>) -> Self {
        let watched = t.clone();
        self.transport(t).connection(move || ConnectionInfo::of_amqp(&watched))
    }

    /// How long a route may go without a delivery while its queue has
    /// messages before `/readyz` fails (default [`DEFAULT_STALE_AFTER`]).
    pub fn stale_after(mut self, d: Duration) -> Self {
        self.stale_after = d;
        self
    }

    /// Polls every routed queue's depth through the transport every
    /// `every` (needs [`transport`](Self::transport)), for `/metrics`
    /// (`switchyard_queue_depth`), `/status` and the stale check.
    pub fn queue_depth(mut self, every: Duration) -> Self {
        self.depth_every = Some(every.max(Duration::from_millis(10)));
        self
    }

    /// Installs a Prometheus recorder as the process's `metrics` recorder
    /// and adds what it records (`MetricsLayer`'s metrics, and any other
    /// `metrics`-facade metric) to `/metrics`. Fails with `invalid_config`
    /// when a recorder is installed already: pass its handle to
    /// [`prometheus_handle`](Self::prometheus_handle) instead.
    #[cfg(feature = "prometheus")]
    pub fn with_prometheus(mut self) -> Result<Self> {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .install_recorder()
            .map_err(|e| Error::InvalidConfig {
                variable: "metrics recorder".into(),
                value: "prometheus".into(),
                reason: format!(
                    "cannot install the Prometheus recorder ({e}); if the process installed one, pass its handle \
                     to OpsServer::prometheus_handle"
                ),
            })?;
        self.prometheus = Some(handle);
        Ok(self)
    }

    /// Adds what an installed Prometheus recorder records to `/metrics`.
    #[cfg(feature = "prometheus")]
    pub fn prometheus_handle(mut self, handle: metrics_exporter_prometheus::PrometheusHandle) -> Self {
        self.prometheus = Some(handle);
        self
    }

    /// Listens on `addr` (`host:port`; port 0 picks a free one) and serves
    /// until the returned handle is dropped or the Worker stops. Fails with
    /// `invalid_config` naming the address when it cannot listen there.
    pub async fn bind(self, addr: &str) -> Result<OpsHandle> {
        let listener = TcpListener::bind(addr).await.map_err(|e| Error::InvalidConfig {
            variable: "ops address".into(),
            value: addr.into(),
            reason: format!("cannot listen there: {e}"),
        })?;
        let local_addr = listener.local_addr().map_err(|e| Error::InvalidConfig {
            variable: "ops address".into(),
            value: addr.into(),
            reason: format!("cannot read the bound address: {e}"),
        })?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let state = Arc::new(Shared {
            config: self,
            depths: Mutex::new(HashMap::new()),
        });
        tracing::info!(address = %local_addr, "ops endpoint listening");
        let task = tokio::spawn(serve(listener, state, stop_rx));
        Ok(OpsHandle {
            local_addr,
            stop: stop_tx,
            task: Some(task),
        })
    }
}

/// A running ops endpoint; dropping it stops the server.
#[derive(Debug)]
pub struct OpsHandle {
    local_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl OpsHandle {
    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// True once the server has stopped (the Worker stopped, or a shutdown).
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops the server and waits until it no longer listens.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for OpsHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

struct Shared {
    config: OpsServer,
    /// Polled queue depths.
    depths: Mutex<HashMap<String, u32>>,
}

async fn serve(listener: TcpListener, state: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut conns = tokio::task::JoinSet::new();
    if let (Some(every), Some(_)) = (state.config.depth_every, &state.config.transport) {
        let st = state.clone();
        conns.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                poll_depths(&st).await;
            }
        });
    }
    let worker = state.config.worker.clone();
    let worker_ended = async {
        let _ = worker.join().await;
        // Stopped on request: stop too. A failed route keeps the endpoint
        // up so that it can say why.
        let failed = worker
            .routes()
            .iter()
            .any(|r| matches!(r.status, ConsumerStatus::Failed { .. }));
        if failed {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(worker_ended);
    loop {
        tokio::select! {
            // Only `true` is ever sent; a dropped sender also means stop.
            _ = stop.changed() => break,
            _ = &mut worker_ended => {
                tracing::info!("worker stopped: ops endpoint stopping");
                break;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let st = state.clone();
                    conns.spawn(async move {
                        if let Err(e) = handle_conn(stream, &st).await {
                            tracing::debug!(error = %e, "ops request failed");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ops endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
}

async fn poll_depths(state: &Shared) {
    let Some(t) = &state.config.transport else { return };
    for q in state.config.worker.queues() {
        match t.queue_info(q).await {
            Ok(info) => {
                state
                    .depths
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(q.to_owned(), info.message_count);
            }
            Err(e) => {
                state.depths.lock().unwrap_or_else(|e| e.into_inner()).remove(q);
                tracing::debug!(queue = q, error = %e, "ops: queue depth unavailable");
            }
        }
    }
}

impl Shared {
    fn depth(&self, queue: &str) -> Option<u32> {
        self.depths
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(queue)
            .copied()
    }
}

/// An HTTP answer.
struct Response {
    code: u16,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn text(code: u16, body: impl Into<String>) -> Self {
        Response {
            code,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
            allow: false,
        }
    }
}

async fn handle_conn(mut stream: TcpStream, state: &Shared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(Some(end));
            }
            if buf.len() > MAX_HEAD {
                return Ok(None);
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await;
    let response = match head {
        Err(_) | Ok(Ok(None)) => Response::text(400, "bad request\n"),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Some(end))) => {
            let head = String::from_utf8_lossy(&buf[..end]);
            let line = head.lines().next().unwrap_or("");
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(method), Some(target), Some(version)) if version.starts_with("HTTP/1.") => {
                    let path = target.split('?').next().unwrap_or(target);
                    route(state, method, path).await
                }
                _ => Response::text(400, "bad request\n"),
            }
        }
    };
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n",
        response.code,
        reason(response.code),
        response.content_type,
        response.body.len()
    );
    if response.allow {
        out.push_str("Allow: GET\r\n");
    }
    out.push_str("\r\n");
    out.push_str(&response.body);
    // A client that does not read must not hold the task forever.
    let write = async {
        stream.write_all(out.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(HEALTH_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "client did not read the response",
        )),
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    }
}

async fn route(state: &Shared, method: &str, path: &str) -> Response {
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz" | "/status");
    if !known {
        return Response::text(
            404,
            format!("not found: {path} (try /metrics, /healthz, /readyz, /status)\n"),
        );
    }
    if method != "GET" {
        let mut r = Response::text(405, format!("method {method} not allowed: use GET\n"));
        r.allow = true;
        return r;
    }
    match path {
        "/metrics" => Response {
            code: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: metrics(state),
            allow: false,
        },
        "/healthz" => healthz(state),
        "/readyz" => readyz(state).await,
        _ => Response {
            code: 200,
            content_type: "application/json",
            body: status(state),
            allow: false,
        },
    }
}

fn status_name(s: &ConsumerStatus) -> &'static str {
    match s {
        ConsumerStatus::Running => "running",
        ConsumerStatus::Stopping => "stopping",
        ConsumerStatus::Stopped => "stopped",
        ConsumerStatus::Failed { .. } => "failed",
    }
}

fn describe(s: &ConsumerStatus) -> String {
    match s {
        ConsumerStatus::Failed { code, message } => format!("failed ({code}): {message}"),
        other => status_name(other).to_owned(),
    }
}

fn healthz(state: &Shared) -> Response {
    let down: Vec<String> = state
        .config
        .worker
        .routes()
        .into_iter()
        .filter(|r| r.status != ConsumerStatus::Running)
        .map(|r| format!("route {}: {}", r.queue, describe(&r.status)))
        .collect();
    if down.is_empty() {
        Response::text(200, "ok\n")
    } else {
        Response::text(503, format!("unhealthy:\n- {}\n", down.join("\n- ")))
    }
}

async fn readyz(state: &Shared) -> Response {
    let mut reasons = Vec::new();
    let cfg = &state.config;
    if let Some(t) = &cfg.transport {
        match tokio::time::timeout(HEALTH_TIMEOUT, t.health_check()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => reasons.push(format!("transport {}: {} ({})", t.name(), e, e.code())),
            Err(_) => reasons.push(format!(
                "transport {}: health check did not answer within {}s",
                t.name(),
                HEALTH_TIMEOUT.as_secs()
            )),
        }
    }
    if let Some(f) = &cfg.connection {
        let c = f();
        if !c.connected {
            reasons.push(format!("connection {}", c.state));
        } else if c.blocked {
            reasons.push("connection blocked by the broker (resource alarm): publishes wait".into());
        }
    }
    for r in cfg.worker.routes() {
        if r.status != ConsumerStatus::Running {
            reasons.push(format!("route {}: {}", r.queue, describe(&r.status)));
            continue;
        }
        if r.idle <= cfg.stale_after {
            continue;
        }
        let depth = match state.depth(&r.queue) {
            Some(d) => Some(d),
            None => match &cfg.transport {
                Some(t) => tokio::time::timeout(HEALTH_TIMEOUT, t.queue_info(&r.queue))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .map(|i| i.message_count),
                None => None,
            },
        };
        if let Some(d) = depth.filter(|d| *d > 0) {
            reasons.push(format!(
                "route {}: stale: {d} messages waiting and no delivery for {:.0}s (threshold {}s)",
                r.queue,
                r.idle.as_secs_f64(),
                cfg.stale_after.as_secs_f64()
            ));
        }
    }
    if reasons.is_empty() {
        Response::text(200, "ready\n")
    } else {
        Response::text(503, format!("not ready:\n- {}\n", reasons.join("\n- ")))
    }
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, String)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

type Stat = fn(&RouteReport) -> u64;

/// The Worker's counters in `/metrics`: name, help, reader.
const COUNTERS: [(&str, &str, Stat); 9] = [
    (
        "switchyard_worker_handled_total",
        "Deliveries whose handler finished.",
        |r| r.stats.handled,
    ),
    ("switchyard_worker_acked_total", "Deliveries acknowledged.", |r| {
        r.stats.acked
    }),
    (
        "switchyard_worker_requeued_total",
        "Deliveries nacked with requeue.",
        |r| r.stats.requeued,
    ),
    (
        "switchyard_worker_rejected_total",
        "Deliveries rejected without requeue (dead-lettered).",
        |r| r.stats.rejected,
    ),
    (
        "switchyard_worker_failed_total",
        "Handler failures (errors and panics).",
        |r| r.stats.failed,
    ),
    ("switchyard_worker_panicked_total", "Handler panics caught.", |r| {
        r.stats.panicked
    }),
    ("switchyard_worker_replied_total", "RPC replies published.", |r| {
        r.stats.replied
    }),
    (
        "switchyard_worker_published_total",
        "Messages published from outboxes.",
        |r| r.stats.published,
    ),
    (
        "switchyard_worker_settle_failed_total",
        "Settlements or reply publishes that failed.",
        |r| r.stats.settle_failed,
    ),
];

fn metrics(state: &Shared) -> String {
    let cfg = &state.config;
    let routes = cfg.worker.routes();
    let mut out = String::new();
    let per_route = |f: &dyn Fn(&RouteReport) -> Option<String>| -> Vec<(String, String)> {
        routes
            .iter()
            .filter_map(|r| f(r).map(|v| (format!("{{queue=\"{}\"}}", label(&r.queue)), v)))
            .collect()
    };
    for (name, help, read) in COUNTERS {
        family(
            &mut out,
            name,
            "counter",
            help,
            &per_route(&|r| Some(read(r).to_string())),
        );
    }
    family(
        &mut out,
        "switchyard_worker_in_flight",
        "gauge",
        "Handlers running now.",
        &per_route(&|r| Some(r.stats.in_flight.to_string())),
    );
    family(
        &mut out,
        "switchyard_worker_max_in_flight",
        "gauge",
        "The most handlers that ran at once.",
        &per_route(&|r| Some(r.stats.max_in_flight.to_string())),
    );
    family(
        &mut out,
        "switchyard_worker_consuming",
        "gauge",
        "1 while the route consumes, else 0.",
        &per_route(&|r| Some(u8::from(r.status == ConsumerStatus::Running).to_string())),
    );
    family(
        &mut out,
        "switchyard_worker_last_delivery_age_seconds",
        "gauge",
        "Seconds since the route's latest delivery.",
        &per_route(&|r| r.last_delivery_age.map(|a| format!("{:.3}", a.as_secs_f64()))),
    );
    family(
        &mut out,
        "switchyard_worker_idle_seconds",
        "gauge",
        "Seconds without a delivery (since the start when none came).",
        &per_route(&|r| Some(format!("{:.3}", r.idle.as_secs_f64()))),
    );
    family(
        &mut out,
        "switchyard_queue_depth",
        "gauge",
        "Messages ready in the queue (polled).",
        &per_route(&|r| state.depth(&r.queue).map(|d| d.to_string())),
    );
    family(
        &mut out,
        "switchyard_worker_uptime_seconds",
        "gauge",
        "Seconds since the Worker started.",
        &[(String::new(), format!("{:.3}", cfg.worker.uptime().as_secs_f64()))],
    );
    if let Some(f) = &cfg.connection {
        let c = f();
        family(
            &mut out,
            "switchyard_connection_up",
            "gauge",
            "1 while the transport is connected.",
            &[(String::new(), u8::from(c.connected).to_string())],
        );
        family(
            &mut out,
            "switchyard_connection_blocked",
            "gauge",
            "1 while the broker blocks publishing.",
            &[(String::new(), u8::from(c.blocked).to_string())],
        );
        family(
            &mut out,
            "switchyard_connection_reconnects_total",
            "counter",
            "Reconnections since the first connection.",
            &[(String::new(), c.reconnects.to_string())],
        );
        family(
            &mut out,
            "switchyard_connection_info",
            "gauge",
            "The connection's state and node.",
            &[(
                format!(
                    "{{state=\"{}\",address=\"{}\"}}",
                    label(&c.state),
                    label(c.address.as_deref().unwrap_or(""))
                ),
                "1".into(),
            )],
        );
    }
    #[cfg(feature = "prometheus")]
    if let Some(h) = &cfg.prometheus {
        h.run_upkeep();
        out.push_str(&h.render());
    }
    out
}

fn status(state: &Shared) -> String {
    use serde_json::{json, Value};
    let cfg = &state.config;
    let routes: Vec<Value> = cfg
        .worker
        .routes()
        .into_iter()
        .map(|r| {
            let s = &r.stats;
            let error = match &r.status {
                ConsumerStatus::Failed { code, message } => json!({ "code": code, "message": message }),
                _ => Value::Null,
            };
            json!({
                "queue": r.queue,
                "status": status_name(&r.status),
                "error": error,
                "stats": {
                    "handled": s.handled, "acked": s.acked, "requeued": s.requeued, "rejected": s.rejected,
                    "replied": s.replied, "published": s.published, "failed": s.failed, "panicked": s.panicked,
                    "settle_failed": s.settle_failed, "in_flight": s.in_flight, "max_in_flight": s.max_in_flight,
                },
                "last_delivery_age_seconds": r.last_delivery_age.map(|a| a.as_secs_f64()),
                "idle_seconds": r.idle.as_secs_f64(),
                "stale": r.idle > cfg.stale_after && state.depth(&r.queue).is_some_and(|d| d > 0),
                "queue_depth": state.depth(&r.queue),
            })
        })
        .collect();
    let connection = cfg.connection.as_ref().map(|f| {
        let c = f();
        json!({
            "state": c.state, "connected": c.connected, "blocked": c.blocked,
            "address": c.address, "reconnects": c.reconnects,
        })
    });
    let body = json!({
        "uptime_seconds": cfg.worker.uptime().as_secs_f64(),
        "transport": cfg.transport.as_ref().map(|t| t.name()),
        "connection": connection,
        "stale_after_seconds": cfg.stale_after.as_secs_f64(),
        "routes": routes,
    });
    let mut s = body.to_string();
    s.push('\n');
    s
}
