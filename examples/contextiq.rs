//! The seed's ContextIQ pipeline, end to end, on one switchyard transport.
//!
//! ```text
//! cargo run --example contextiq                                          # in-process memory broker
//! cargo run --example contextiq --features lapin -- --transport lapin    # RabbitMQ at RABBITMQ_URL, through lapin
//! cargo run --example contextiq --features amqprs -- --transport amqprs  # RabbitMQ at RABBITMQ_URL, through amqprs
//! cargo run --example contextiq --features lapin -- --transport lapin --quorum  # the work queues as quorum queues
//! ```
//!
//! The same pipeline as long-running processes, the way the seed runs its
//! services (several copies of a worker compete for the same queue; each
//! stops gracefully on SIGTERM; with `--features ops` each serves
//! `/metrics`, `/healthz`, `/readyz`, `/status` on `--ops ADDR`):
//!
//! ```text
//! contextiq extraction-worker [--ops 127.0.0.1:9464]    # extraction.requests
//! contextiq consolidation-worker [--ops ..]             # consolidation.requests
//! contextiq events [--ops ..]                           # session.events, memory.events, webhooks, dead_letter
//! contextiq publish N                                   # N extraction requests, then exit
//! ```
//!
//! Roles read their settings from `RABBITMQ_*` (and `.env`); `--transport`
//! works as above; `CONTEXTIQ_WORK_MS` sets the extraction work per request
//! for `publish`. The results (`extraction.results`, `consolidation.results`)
//! are left for downstream consumers: `switchyard get` / `consume` read them.
//!
//! `--quorum` declares the work queues as quorum queues
//! (`QueueSpec::work_queue`: replicated across a cluster, delivery limit,
//! at-least-once dead-lettering) — what a clustered deployment should use
//! instead of the seed's mirrored queues. Quorum queues do not order by
//! priority (RabbitMQ 3.10), so the priority check is skipped then.
//!
//! The transport comes from `switchyard::connect` (`--transport` sets
//! `RABBITMQ_TRANSPORT`); a transport whose cargo feature is off is refused
//! with the feature to enable.
//!
//! Topology (as in the seed): topic exchanges `contextiq.extraction`,
//! `contextiq.consolidation`, `contextiq.events`, the dead-letter exchange
//! `contextiq.dlx`; queues `extraction.requests`, `extraction.results`,
//! `consolidation.requests`, `consolidation.results`, `session.events`,
//! `memory.events`, `dead_letter`.
//!
//! Where the seed goes wrong, this does it right:
//! - `extraction.requests` declares `x-max-priority`, so priorities are honoured
//!   (the seed published priorities to a queue without it);
//! - the webhook service gets its own queue bound to `session.created`: in the
//!   seed, analytics, logging and webhooks competed for one `session.events`
//!   queue, so each event reached only one of them;
//! - failures are retried by the retry layer (no sleeping inside the handler,
//!   no retry count written into the body) and dead-lettered with their reason
//!   in headers;
//! - RPC uses one reply queue per client, not one per call;
//! - a handler's follow-up messages are published by the Worker before it
//!   acknowledges (an outbox outcome), so a crash between the two never loses
//!   them, and they carry the request's correlation id.
//!
//! The program publishes sessions (with priorities), session events, one
//! poisoned message and two RPC calls (one answered, one timing out), runs
//! every worker until the expected work is done, shuts down gracefully and
//! prints a summary. It exits 1 if anything expected did not happen.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use switchyard::handler::{Outbox, Priority, State};
use switchyard::middleware::dead_letter::DeadLetterLayer;
use switchyard::middleware::retry::{RetryLayer, RetryPolicy};
use switchyard::rpc::RpcClient;
use switchyard::worker::{RouteConfig, Worker};
use switchyard::{
    handler_fn, headers, Destination, Envelope, ExchangeSpec, HandlerError, Json, JsonCodec, Message, PublisherExt,
    QueueSpec, ServiceBuilder, Settings, Topology, Transport, TransportKind,
};

const EXTRACTION: &str = "contextiq.extraction";
const CONSOLIDATION: &str = "contextiq.consolidation";
const EVENTS: &str = "contextiq.events";
const DLX: &str = "contextiq.dlx";

const EXTRACTION_REQUESTS: &str = "extraction.requests";
const EXTRACTION_RESULTS: &str = "extraction.results";
const CONSOLIDATION_REQUESTS: &str = "consolidation.requests";
const CONSOLIDATION_RESULTS: &str = "consolidation.results";
const SESSION_EVENTS: &str = "session.events";
const MEMORY_EVENTS: &str = "memory.events";
const WEBHOOKS: &str = "webhooks.session-created";
const DEAD_LETTER: &str = "dead_letter";

const ALL_QUEUES: [&str; 8] = [
    EXTRACTION_REQUESTS,
    EXTRACTION_RESULTS,
    CONSOLIDATION_REQUESTS,
    CONSOLIDATION_RESULTS,
    SESSION_EVENTS,
    MEMORY_EVENTS,
    WEBHOOKS,
    DEAD_LETTER,
];

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExtractionRequest {
    session_id: String,
    user_id: String,
    /// Simulated work time (used to make one RPC call time out).
    #[serde(default)]
    work_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExtractionResult {
    session_id: String,
    memories_extracted: u32,
    success: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConsolidationRequest {
    scope: String,
    user_id: String,
    similarity_threshold: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConsolidationResult {
    scope: String,
    user_id: String,
    memories_merged: u32,
    success: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Event {
    id: String,
    event: String,
}

/// The seed's topology, done right (see the module docs).
fn topology(quorum: bool) -> Topology {
    let q = |name: &str| {
        let spec = if quorum {
            QueueSpec::work_queue(name, DLX)
        } else {
            QueueSpec::new(name)
        };
        spec.dead_letter(DLX, Some(DEAD_LETTER))
    };
    let extraction_requests = if quorum {
        q(EXTRACTION_REQUESTS)
    } else {
        q(EXTRACTION_REQUESTS).max_priority(10)
    };
    Topology::new()
        .exchange(ExchangeSpec::topic(EXTRACTION))
        .exchange(ExchangeSpec::topic(CONSOLIDATION))
        .exchange(ExchangeSpec::topic(EVENTS))
        .exchange(ExchangeSpec::topic(DLX))
        .bound_queue(extraction_requests, EXTRACTION, "extraction.request")
        .bound_queue(q(EXTRACTION_RESULTS), EXTRACTION, "extraction.result")
        .bound_queue(q(CONSOLIDATION_REQUESTS), CONSOLIDATION, "consolidation.request")
        .bound_queue(q(CONSOLIDATION_RESULTS), CONSOLIDATION, "consolidation.result")
        .bound_queue(q(SESSION_EVENTS), EVENTS, "session.*")
        .bound_queue(q(MEMORY_EVENTS), EVENTS, "memory.*")
        .bound_queue(q(WEBHOOKS), EVENTS, "session.created")
        .bound_queue(QueueSpec::new(DEAD_LETTER), DLX, DEAD_LETTER)
}

/// What the workers observed (the Worker's state, shared by every handler).
#[derive(Default)]
struct Observed {
    extraction_order: Mutex<Vec<(String, u8)>>,
    session_events: Mutex<BTreeMap<String, u64>>,
    webhooks: Mutex<Vec<String>>,
    audit: AtomicU64,
    dead_letters: Mutex<Vec<String>>,
    transient_failures: AtomicU64,
}

type Seen = State<Arc<Observed>>;

/// A long-running role (see the module docs), or the one-shot demo.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Role {
    Demo,
    ExtractionWorker,
    ConsolidationWorker,
    Events,
    Publish(usize),
}

/// The command line.
struct Args {
    role: Role,
    kind: TransportKind,
    quorum: bool,
    ops: String,
}

fn args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1).peekable();
    let role = match args.peek().map(String::as_str) {
        Some("extraction-worker") => Role::ExtractionWorker,
        Some("consolidation-worker") => Role::ConsolidationWorker,
        Some("events") => Role::Events,
        Some("publish") => {
            args.next();
            let n = args
                .peek()
                .and_then(|n| n.parse().ok())
                .ok_or("publish needs a count: publish N")?;
            Role::Publish(n)
        }
        Some(other) if !other.starts_with('-') => return Err(format!("unknown role '{other}'")),
        _ => Role::Demo,
    };
    if role != Role::Demo {
        args.next();
    }
    let mut kind = None;
    let mut quorum = false;
    let mut ops = "127.0.0.1:0".to_owned();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--transport" | "-t" => kind = Some(args.next().ok_or("--transport needs a value")?),
            s if s.starts_with("--transport=") => kind = Some(s["--transport=".len()..].to_owned()),
            "--quorum" => quorum = true,
            "--ops" => ops = args.next().ok_or("--ops needs an address")?,
            "--help" | "-h" => {
                println!(
                    "usage: contextiq [extraction-worker|consolidation-worker|events|publish N] \
                     [--transport memory|lapin|amqprs] [--quorum] [--ops ADDR]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    // The demo runs in memory unless told otherwise; roles follow the settings.
    let kind = match kind {
        Some(k) => k.parse().map_err(|e: switchyard::Error| e.to_string())?,
        None if role == Role::Demo => TransportKind::Memory,
        None => Settings::from_env()
            .map_err(|e| e.to_string())?
            .transport
            .unwrap_or(TransportKind::Lapin),
    };
    Ok(Args {
        role,
        kind,
        quorum,
        ops,
    })
}

/// The retry and dead-letter layers around every route of `worker`.
fn with_shared_layers(worker: Worker, transport: &Arc<dyn Transport>) -> Worker {
    worker.layer(
        ServiceBuilder::new()
            .layer(DeadLetterLayer::new(transport.clone(), DLX).routing_key(DEAD_LETTER))
            .layer(RetryLayer::in_process(RetryPolicy::explicit([
                Duration::from_millis(10),
                Duration::from_millis(50),
                Duration::from_millis(100),
            ]))),
    )
}

/// One role as a long-running process: declare, consume, serve the ops
/// endpoint, stop gracefully on SIGTERM / SIGINT.
async fn run_role(a: &Args) -> Result<bool, Box<dyn std::error::Error>> {
    let settings = Settings::from_env()?.with_transport(a.kind);
    let transport = switchyard::connect(&settings).await?;
    if let Err(e) = transport.declare(&topology(a.quorum)).await {
        eprintln!("error: declaring the ContextIQ topology: {e} (queues declared with other arguments? see --quorum)");
        return Ok(false);
    }
    if let Role::Publish(n) = a.role {
        let work_ms = std::env::var("CONTEXTIQ_WORK_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20);
        let extraction = Destination::new(EXTRACTION, "extraction.request");
        let requests = (0..n).map(|i| {
            JsonCodec.to_message(&ExtractionRequest {
                session_id: format!("req-{i}"),
                user_id: "user_123".into(),
                work_ms,
            })
        });
        let batch = requests.collect::<switchyard::Result<Vec<_>>>()?;
        transport.publish_batch(&extraction, batch).await?;
        println!("published {n} extraction requests");
        transport.close().await?;
        return Ok(true);
    }
    let worker = with_shared_layers(Worker::new(transport.clone()), &transport)
        .with_state(Arc::new(Observed::default()))
        .shutdown_timeout(Duration::from_secs(10));
    let worker = match a.role {
        Role::ExtractionWorker => worker.route_with(
            EXTRACTION_REQUESTS,
            handler_fn(extract),
            RouteConfig::default().prefetch(8).concurrency(4),
        ),
        Role::ConsolidationWorker => worker.route(CONSOLIDATION_REQUESTS, handler_fn(consolidate)),
        _ => worker
            .route_with(
                SESSION_EVENTS,
                handler_fn(analytics),
                RouteConfig::default().prefetch(20),
            )
            .route(MEMORY_EVENTS, handler_fn(audit_log))
            .route(WEBHOOKS, handler_fn(webhook))
            .route(DEAD_LETTER, handler_fn(dead_letters)),
    };
    let handle = worker.start().await?;
    #[cfg(feature = "ops")]
    let _ops = {
        let ops = switchyard::ops::OpsServer::new(handle.clone())
            .transport(transport.clone())
            .bind(a.ops.as_str())
            .await?;
        println!("ops listening on http://{}", ops.local_addr());
        ops
    };
    #[cfg(not(feature = "ops"))]
    println!("(no ops endpoint for {}: build with --features ops)", a.ops);
    println!("ready: {:?} on {}", a.role, a.kind);
    switchyard::worker::shutdown_signal().await;
    println!("stopping");
    let stopped = handle.shutdown().await;
    transport.close().await?;
    stopped?;
    println!("stopped");
    Ok(true)
}

#[tokio::main]
async fn main() {
    let result = match args() {
        Ok(a) if a.role == Role::Demo => run(a.kind, a.quorum).await,
        Ok(a) => run_role(&a).await,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    match result {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}

const SESSIONS: [(&str, u8); 6] = [
    ("session-1", 1),
    ("session-2", 9),
    ("session-3", 5),
    ("session-4", 0),
    ("session-5", 9),
    ("session-6", 3),
];

/// extraction.requests: records the order, then (through the outbox, before
/// the ack) the result, a consolidation request and a memory event; the
/// result is also the RPC reply when the request has `reply_to`.
async fn extract(
    State(seen): Seen,
    Priority(priority): Priority,
    Json(req): Json<ExtractionRequest>,
) -> Result<Outbox, HandlerError> {
    tokio::time::sleep(Duration::from_millis(req.work_ms)).await;
    seen.extraction_order
        .lock()
        .push((req.session_id.clone(), priority.unwrap_or(0)));
    let result = ExtractionResult {
        session_id: req.session_id.clone(),
        memories_extracted: 3,
        success: true,
    };
    let consolidation = ConsolidationRequest {
        scope: "user".into(),
        user_id: req.user_id,
        similarity_threshold: 0.85,
    };
    let event = Event {
        id: format!("memory-of-{}", req.session_id),
        event: "created".into(),
    };
    Outbox::new()
        .json(&Destination::new(EXTRACTION, "extraction.result"), &result)?
        .json(
            &Destination::new(CONSOLIDATION, "consolidation.request"),
            &consolidation,
        )?
        .json_with(&Destination::new(EVENTS, "memory.created"), &event, |m| m.transient())?
        .reply_json(&result)
}

/// consolidation.requests: fails transiently once (the retry layer retries it).
async fn consolidate(State(seen): Seen, Json(req): Json<ConsolidationRequest>) -> Result<Outbox, HandlerError> {
    if seen.transient_failures.fetch_add(1, Ordering::SeqCst) == 0 {
        return Err(HandlerError::retry("vector store busy"));
    }
    let result = ConsolidationResult {
        scope: req.scope,
        user_id: req.user_id,
        memories_merged: 1,
        success: true,
    };
    Outbox::new().json(&Destination::new(CONSOLIDATION, "consolidation.result"), &result)
}

async fn analytics(State(seen): Seen, Json(e): Json<Event>) {
    *seen.session_events.lock().entry(e.event).or_default() += 1;
}

async fn audit_log(State(seen): Seen, Json(_): Json<Event>) {
    seen.audit.fetch_add(1, Ordering::SeqCst);
}

async fn webhook(State(seen): Seen, Json(e): Json<Event>) {
    seen.webhooks.lock().push(e.id);
}

async fn dead_letters(State(seen): Seen, env: Envelope) {
    let text = |k: &str| env.header::<String>(k).unwrap_or_else(|| "-".into());
    seen.dead_letters.lock().push(format!(
        "from {}: {}\n    why: [{}] {}",
        text(headers::ORIGINAL_QUEUE),
        String::from_utf8_lossy(env.body()),
        text(headers::ERROR_KIND),
        text(headers::ERROR)
    ));
}

async fn run(kind: TransportKind, quorum: bool) -> Result<bool, Box<dyn std::error::Error>> {
    let settings = Settings::from_env()?.with_transport(kind);
    if kind != TransportKind::Memory {
        println!("connecting to {} through {kind}", settings.effective_url_redacted());
    }
    let transport = switchyard::connect(&settings).await?;
    match transport.declare(&topology(quorum)).await {
        Ok(()) => {}
        Err(e) if e.code() == "precondition_failed" => {
            // The queues exist with other arguments (classic vs quorum, from
            // an earlier run): their messages are purged below anyway.
            println!("the ContextIQ queues exist with other arguments ({e}); deleting and re-declaring them");
            for q in ALL_QUEUES {
                transport.delete_queue(q).await?;
            }
            transport.declare(&topology(quorum)).await?;
        }
        Err(e) => return Err(e.into()),
    }
    if quorum {
        println!("work queues are quorum queues (delivery limit, at-least-once dead-lettering)");
    }
    for q in ALL_QUEUES {
        transport.purge_queue(q).await?; // durable queues on a real broker may hold an earlier run's messages
    }
    let seen = Arc::new(Observed::default());

    // 1. The sessions API: extraction requests with priorities (published
    //    before any worker runs so the broker orders them), one poisoned
    //    message, session lifecycle events (transient: they are ephemeral).
    let extraction = Destination::new(EXTRACTION, "extraction.request");
    for (session, priority) in SESSIONS {
        let req = ExtractionRequest {
            session_id: session.into(),
            user_id: "user_123".into(),
            work_ms: 0,
        };
        transport
            .publish_json_with(&extraction, &req, |m| m.with_priority(priority))
            .await?;
    }
    let poison = Message::new(r#"{"session_id": "session-7", "user_id": oops}"#)
        .with_content_type("application/json")
        .with_message_id("poison-1");
    transport.publish(&extraction, poison).await?;
    for (session, event) in [
        ("session-1", "created"),
        ("session-2", "created"),
        ("session-1", "updated"),
        ("session-2", "deleted"),
    ] {
        let e = Event {
            id: session.into(),
            event: event.into(),
        };
        let dest = Destination::new(EVENTS, format!("session.{event}"));
        transport.publish_json_with(&dest, &e, |m| m.transient()).await?;
    }

    // 2. The workers: state, and retry inside dead-lettering around every route.
    let worker = with_shared_layers(Worker::new(transport.clone()), &transport)
        .with_state(seen.clone())
        // prefetch 1 and one handler at a time: the broker hands out the highest priority first.
        .route_with(
            EXTRACTION_REQUESTS,
            handler_fn(extract),
            RouteConfig::default().prefetch(1).concurrency(1),
        )
        .route(EXTRACTION_RESULTS, handler_fn(|| async {}))
        .route(CONSOLIDATION_REQUESTS, handler_fn(consolidate))
        .route(CONSOLIDATION_RESULTS, handler_fn(|| async {}))
        .route_with(
            SESSION_EVENTS,
            handler_fn(analytics),
            RouteConfig::default().prefetch(20),
        )
        .route(MEMORY_EVENTS, handler_fn(audit_log))
        .route(WEBHOOKS, handler_fn(webhook))
        .route(DEAD_LETTER, handler_fn(dead_letters))
        .shutdown_timeout(Duration::from_secs(5));
    let handle = worker.start().await?;

    // 3. RPC: one call answered, one that outlives its timeout.
    let rpc = RpcClient::new(transport.clone()).await?;
    let rpc_request = |session: &str, work_ms| ExtractionRequest {
        session_id: session.into(),
        user_id: "user_456".into(),
        work_ms,
    };
    let answered: ExtractionResult = rpc
        .call_json(&extraction, &rpc_request("rpc-session", 0), Duration::from_secs(10))
        .await?;
    let timed_out = rpc
        .call_json::<_, ExtractionResult>(
            &extraction,
            &rpc_request("slow-session", 600),
            Duration::from_millis(200),
        )
        .await;

    // 4. Wait for the pipeline to drain: deliveries handled (and settled) per queue.
    let sessions = SESSIONS.len() as u64 + 2; // + the two RPC requests
    let expected: [(&str, u64); 8] = [
        (EXTRACTION_REQUESTS, sessions + 1), // + the poisoned message, dead-lettered
        (EXTRACTION_RESULTS, sessions),
        (CONSOLIDATION_REQUESTS, sessions),
        (CONSOLIDATION_RESULTS, sessions),
        (SESSION_EVENTS, 4),
        (MEMORY_EVENTS, sessions),
        (WEBHOOKS, 2),
        (DEAD_LETTER, 1),
    ];
    let mut handled = Vec::new();
    for (q, n) in expected {
        let acked = match handle.wait_handled(q, n, Duration::from_secs(30)).await {
            Ok(stats) => stats.acked,
            Err(e) => {
                eprintln!("{e}");
                handle.stats(q).map_or(0, |s| s.acked)
            }
        };
        handled.push(acked);
    }
    // Let the late RPC reply arrive before closing.
    let late_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rpc.late_replies() == 0 && tokio::time::Instant::now() < late_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown().await?;

    // 5. Summary.
    let mut ok = true;
    println!("contextiq pipeline on the {kind} transport");
    println!("  {:<26} {:>8} {:>8} {:>8}", "queue", "acked", "expected", "left");
    for ((q, n), got) in expected.iter().zip(handled) {
        let left = transport.queue_info(q).await?.message_count;
        let good = got == *n && left == 0;
        ok &= good;
        println!(
            "  {q:<26} {got:>8} {n:>8} {left:>8}{}",
            if good { "" } else { "  <-- unexpected" }
        );
    }
    let order = seen.extraction_order.lock().clone();
    let queued: Vec<u8> = order.iter().take(SESSIONS.len()).map(|(_, p)| *p).collect();
    // Quorum queues do not order by priority (RabbitMQ 3.10): checked on classic queues only.
    let priorities_ok = quorum || (queued.len() == SESSIONS.len() && queued.windows(2).all(|w| w[0] >= w[1]));
    ok &= priorities_ok;
    let shown: Vec<String> = order
        .iter()
        .take(SESSIONS.len())
        .map(|(s, p)| format!("{s}(p{p})"))
        .collect();
    let verdict = if quorum {
        "not checked (quorum queues have no priorities)"
    } else if priorities_ok {
        "highest first"
    } else {
        "NOT highest first"
    };
    println!("  priorities: queued sessions handled in order {shown:?} -> {verdict}");
    println!("  session events seen by analytics: {:?}", seen.session_events.lock());
    println!("  webhooks fired (session.created only): {:?}", seen.webhooks.lock());
    println!("  audit log entries: {}", seen.audit.load(Ordering::SeqCst));
    let retried = seen.transient_failures.load(Ordering::SeqCst).min(1);
    println!("  consolidation transient failures retried: {retried}");
    let slow = match &timed_out {
        Ok(_) => "answered (unexpected)".to_owned(),
        Err(e) => format!("{} ({e})", e.code()),
    };
    println!(
        "  rpc: answered for {} ({} memories); slow call -> {slow}; late replies dropped: {}",
        answered.session_id,
        answered.memories_extracted,
        rpc.late_replies()
    );
    ok &= matches!(&timed_out, Err(e) if e.code() == "rpc_timeout");
    let dls = seen.dead_letters.lock().clone();
    ok &= dls.len() == 1 && dls[0].contains("[decode]") && dls[0].starts_with(&format!("from {EXTRACTION_REQUESTS}:"));
    for d in &dls {
        println!("  dead letter {d}");
    }
    rpc.close().await?;
    transport.close().await?;
    println!(
        "{}",
        if ok {
            "result: OK"
        } else {
            "result: UNEXPECTED (see above)"
        }
    );
    Ok(ok)
}
