//! The seed's ContextIQ pipeline, end to end, on one switchyard transport.
//!
//! ```text
//! cargo run --example contextiq                         # in-process memory broker
//! cargo run --example contextiq -- --transport lapin    # RabbitMQ at RABBITMQ_URL, through lapin
//! cargo run --example contextiq -- --transport amqprs   # RabbitMQ at RABBITMQ_URL, through amqprs
//! ```
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
//! - RPC uses one reply queue per client, not one per call.
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
use switchyard::middleware::dead_letter::DeadLetterLayer;
use switchyard::middleware::retry::{RetryLayer, RetryPolicy};
use switchyard::rpc::RpcClient;
use switchyard::worker::{RouteConfig, Worker};
use switchyard::{
    handler_fn, headers, Destination, Envelope, ExchangeSpec, HandlerError, Json, Message, PublisherExt, QueueSpec,
    Settings, Topology, Transport,
};
use tower::ServiceBuilder;

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
fn topology() -> Topology {
    let q = |name: &str| QueueSpec::new(name).dead_letter(DLX, Some(DEAD_LETTER));
    Topology::new()
        .exchange(ExchangeSpec::topic(EXTRACTION))
        .exchange(ExchangeSpec::topic(CONSOLIDATION))
        .exchange(ExchangeSpec::topic(EVENTS))
        .exchange(ExchangeSpec::topic(DLX))
        .bound_queue(
            q(EXTRACTION_REQUESTS).max_priority(10),
            EXTRACTION,
            "extraction.request",
        )
        .bound_queue(q(EXTRACTION_RESULTS), EXTRACTION, "extraction.result")
        .bound_queue(q(CONSOLIDATION_REQUESTS), CONSOLIDATION, "consolidation.request")
        .bound_queue(q(CONSOLIDATION_RESULTS), CONSOLIDATION, "consolidation.result")
        .bound_queue(q(SESSION_EVENTS), EVENTS, "session.*")
        .bound_queue(q(MEMORY_EVENTS), EVENTS, "memory.*")
        .bound_queue(q(WEBHOOKS), EVENTS, "session.created")
        .bound_queue(QueueSpec::new(DEAD_LETTER), DLX, DEAD_LETTER)
}

/// What the workers observed.
#[derive(Default)]
struct Observed {
    counts: Mutex<BTreeMap<&'static str, u64>>,
    extraction_order: Mutex<Vec<(String, u8)>>,
    session_events: Mutex<BTreeMap<String, u64>>,
    webhooks: Mutex<Vec<String>>,
    audit: Mutex<Vec<String>>,
    dead_letters: Mutex<Vec<DeadLetterSummary>>,
    transient_failures: AtomicU64,
}

#[derive(Debug, Clone)]
struct DeadLetterSummary {
    body: String,
    error: String,
    kind: String,
    original_queue: String,
}

impl Observed {
    fn count(&self, queue: &'static str) {
        *self.counts.lock().entry(queue).or_default() += 1;
    }
    fn get(&self, queue: &'static str) -> u64 {
        self.counts.lock().get(queue).copied().unwrap_or(0)
    }
}

async fn connect(kind: &str) -> Result<Arc<dyn Transport>, Box<dyn std::error::Error>> {
    match kind {
        "memory" => Ok(switchyard::memory::MemoryTransport::new()),
        "lapin" | "amqprs" => {
            let settings = Settings::from_env()?;
            println!("connecting to {} through {kind}", settings.effective_url_redacted());
            connect_rabbitmq(kind, &settings).await
        }
        other => Err(format!("unknown transport '{other}': use memory, lapin or amqprs").into()),
    }
}

async fn connect_rabbitmq(kind: &str, settings: &Settings) -> Result<Arc<dyn Transport>, Box<dyn std::error::Error>> {
    match kind {
        "lapin" => Ok(Arc::new(switchyard_lapin::LapinTransport::connect(settings).await?)),
        _ => Ok(Arc::new(switchyard_amqprs::AmqprsTransport::connect(settings).await?)),
    }
}

fn transport_arg() -> Result<String, String> {
    let mut args = std::env::args().skip(1);
    let mut kind = "memory".to_owned();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--transport" | "-t" => kind = args.next().ok_or("--transport needs a value")?,
            s if s.starts_with("--transport=") => kind = s["--transport=".len()..].to_owned(),
            "--help" | "-h" => {
                println!("usage: contextiq [--transport memory|lapin|amqprs]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(kind)
}

#[tokio::main]
async fn main() {
    let kind = match transport_arg() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    match run(&kind).await {
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

async fn run(kind: &str) -> Result<bool, Box<dyn std::error::Error>> {
    let transport = connect(kind).await?;
    transport.declare(&topology()).await?;
    for q in ALL_QUEUES {
        transport.purge_queue(q).await?; // durable queues on a real broker may hold an earlier run's messages
    }
    let observed = Arc::new(Observed::default());

    // 1. The sessions API: extraction requests with priorities, published
    //    before any worker runs so the broker orders them; one poisoned
    //    message; session lifecycle events.
    let extraction = Destination::new(EXTRACTION, "extraction.request");
    for (session, priority) in SESSIONS {
        let req = ExtractionRequest {
            session_id: session.into(),
            user_id: "user_123".into(),
            work_ms: 0,
        };
        let msg = Message::json(&req)?
            .with_priority(priority)
            .with_header("x-priority", priority as i32)
            .persistent(true);
        transport.publish(&extraction, msg).await?;
    }
    let poison = Message::new(r#"{"session_id": "session-7", "user_id": oops}"#)
        .with_content_type("application/json")
        .with_message_id("poison-1")
        .persistent(true);
    transport.publish(&extraction, poison).await?;
    for (session, event) in [
        ("session-1", "created"),
        ("session-2", "created"),
        ("session-1", "updated"),
        ("session-2", "deleted"),
    ] {
        let dest = Destination::new(EVENTS, format!("session.{event}"));
        transport
            .publish_json(
                &dest,
                &Event {
                    id: session.into(),
                    event: event.into(),
                },
            )
            .await?;
    }

    // 2. The workers.
    let publisher = transport.clone() as Arc<dyn switchyard::Publisher>;
    let dead_letter = DeadLetterLayer::new(publisher.clone(), DLX).routing_key(DEAD_LETTER);
    let retry = RetryLayer::in_process(RetryPolicy::explicit([
        Duration::from_millis(10),
        Duration::from_millis(50),
        Duration::from_millis(100),
    ]));

    let extraction_worker = {
        let publisher = publisher.clone();
        let observed = observed.clone();
        handler_fn(move |Json(req): Json<ExtractionRequest>, env: Envelope| {
            let publisher = publisher.clone();
            let observed = observed.clone();
            async move {
                if req.work_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(req.work_ms)).await;
                }
                let priority = env.message().properties.priority.unwrap_or(0);
                observed
                    .extraction_order
                    .lock()
                    .push((req.session_id.clone(), priority));
                observed.count(EXTRACTION_REQUESTS);
                let result = ExtractionResult {
                    session_id: req.session_id.clone(),
                    memories_extracted: 3,
                    success: true,
                };
                let correlated = |m: Message| match env.correlation_id() {
                    Some(c) => m.with_correlation_id(c),
                    None => m,
                };
                publisher
                    .publish(
                        &Destination::new(EXTRACTION, "extraction.result"),
                        correlated(Message::json(&result)?.persistent(true)),
                    )
                    .await?;
                let consolidation = ConsolidationRequest {
                    scope: "user".into(),
                    user_id: req.user_id.clone(),
                    similarity_threshold: 0.85,
                };
                publisher
                    .publish(
                        &Destination::new(CONSOLIDATION, "consolidation.request"),
                        correlated(Message::json(&consolidation)?.persistent(true)),
                    )
                    .await?;
                publisher
                    .publish_json(
                        &Destination::new(EVENTS, "memory.created"),
                        &Event {
                            id: format!("memory-of-{}", req.session_id),
                            event: "created".into(),
                        },
                    )
                    .await?;
                // Returned as the RPC reply when the request has reply_to.
                Ok::<_, HandlerError>(Json(result))
            }
        })
    };
    let extraction_service = ServiceBuilder::new()
        .layer(dead_letter.clone())
        .layer(retry.clone())
        .service(extraction_worker);

    let consolidation_worker = {
        let publisher = publisher.clone();
        let observed = observed.clone();
        handler_fn(move |Json(req): Json<ConsolidationRequest>| {
            let publisher = publisher.clone();
            let observed = observed.clone();
            async move {
                // The first consolidation fails transiently once, to show the retry layer at work.
                if observed.transient_failures.fetch_add(1, Ordering::SeqCst) == 0 {
                    return Err(HandlerError::retry("vector store busy"));
                }
                observed.count(CONSOLIDATION_REQUESTS);
                let result = ConsolidationResult {
                    scope: req.scope,
                    user_id: req.user_id,
                    memories_merged: 1,
                    success: true,
                };
                publisher
                    .publish_json(&Destination::new(CONSOLIDATION, "consolidation.result"), &result)
                    .await?;
                Ok::<_, HandlerError>(())
            }
        })
    };
    let consolidation_service = ServiceBuilder::new()
        .layer(dead_letter.clone())
        .layer(retry.clone())
        .service(consolidation_worker);

    let counter = |queue: &'static str| {
        let observed = observed.clone();
        handler_fn(move |_: Envelope| {
            observed.count(queue);
            async {}
        })
    };
    let analytics = {
        let observed = observed.clone();
        handler_fn(move |Json(e): Json<Event>| {
            observed.count(SESSION_EVENTS);
            *observed.session_events.lock().entry(e.event).or_default() += 1;
            async {}
        })
    };
    let audit_log = {
        let observed = observed.clone();
        handler_fn(move |Json(e): Json<Event>| {
            observed.count(MEMORY_EVENTS);
            observed.audit.lock().push(format!("{} {}", e.id, e.event));
            async {}
        })
    };
    let webhook = {
        let observed = observed.clone();
        handler_fn(move |Json(e): Json<Event>| {
            observed.count(WEBHOOKS);
            observed.webhooks.lock().push(e.id);
            async {}
        })
    };
    let dead_letters = {
        let observed = observed.clone();
        handler_fn(move |env: Envelope| {
            observed.count(DEAD_LETTER);
            let h = env.headers();
            let text = |k: &str| h.get_str(k).unwrap_or("-").to_owned();
            observed.dead_letters.lock().push(DeadLetterSummary {
                body: String::from_utf8_lossy(env.body()).into_owned(),
                error: text(headers::ERROR),
                kind: text(headers::ERROR_KIND),
                original_queue: text(headers::ORIGINAL_QUEUE),
            });
            async {}
        })
    };

    let worker = Worker::new(transport.clone())
        // prefetch 1 and one handler at a time: the broker hands out the highest priority first.
        .route_with(
            EXTRACTION_REQUESTS,
            extraction_service,
            RouteConfig::default().prefetch(1).concurrency(1),
        )
        .route(EXTRACTION_RESULTS, counter(EXTRACTION_RESULTS))
        .route(CONSOLIDATION_REQUESTS, consolidation_service)
        .route(CONSOLIDATION_RESULTS, counter(CONSOLIDATION_RESULTS))
        .route_with(SESSION_EVENTS, analytics, RouteConfig::default().prefetch(20))
        .route(MEMORY_EVENTS, audit_log)
        .route(WEBHOOKS, webhook)
        .route(DEAD_LETTER, dead_letters)
        .shutdown_timeout(Duration::from_secs(5));
    let handle = worker.start().await?;

    // 3. RPC: one call answered, one that outlives its timeout.
    let rpc = RpcClient::new(transport.clone()).await?;
    let answered: ExtractionResult = rpc
        .call_json(
            &extraction,
            &ExtractionRequest {
                session_id: "rpc-session".into(),
                user_id: "user_456".into(),
                work_ms: 0,
            },
            Duration::from_secs(10),
        )
        .await?;
    let timed_out = rpc
        .call_json::<_, ExtractionResult>(
            &extraction,
            &ExtractionRequest {
                session_id: "slow-session".into(),
                user_id: "user_456".into(),
                work_ms: 600,
            },
            Duration::from_millis(200),
        )
        .await;

    // 4. Wait for the pipeline to drain.
    let sessions = SESSIONS.len() as u64 + 2; // + the two RPC requests
    let expected: [(&'static str, u64); 8] = [
        (EXTRACTION_REQUESTS, sessions),
        (EXTRACTION_RESULTS, sessions),
        (CONSOLIDATION_REQUESTS, sessions),
        (CONSOLIDATION_RESULTS, sessions),
        (SESSION_EVENTS, 4),
        (MEMORY_EVENTS, sessions),
        (WEBHOOKS, 2),
        (DEAD_LETTER, 1),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while expected.iter().any(|(q, n)| observed.get(q) < *n) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let the late RPC reply arrive before closing.
    let late_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rpc.late_replies() == 0 && tokio::time::Instant::now() < late_deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handle.shutdown().await?;
    let mut depths = Vec::new();
    for q in ALL_QUEUES {
        depths.push((q, transport.queue_info(q).await?.message_count));
    }

    // 5. Summary.
    let mut ok = true;
    println!("contextiq pipeline on the {kind} transport");
    println!("  {:<26} {:>8} {:>8} {:>8}", "queue", "handled", "expected", "left");
    for ((q, n), (_, left)) in expected.iter().zip(&depths) {
        let got = observed.get(q);
        let mark = if got == *n && *left == 0 {
            ""
        } else {
            "  <-- unexpected"
        };
        ok &= got == *n && *left == 0;
        println!("  {q:<26} {got:>8} {n:>8} {left:>8}{mark}");
    }
    let order = observed.extraction_order.lock().clone();
    let queued: Vec<u8> = order.iter().take(SESSIONS.len()).map(|(_, p)| *p).collect();
    let mut sorted = queued.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    let priorities_ok = queued == sorted && queued.len() == SESSIONS.len();
    ok &= priorities_ok;
    println!(
        "  priorities: queued sessions handled in order {:?} -> {}",
        order
            .iter()
            .take(SESSIONS.len())
            .map(|(s, p)| format!("{s}(p{p})"))
            .collect::<Vec<_>>(),
        if priorities_ok {
            "highest first"
        } else {
            "NOT highest first"
        }
    );
    println!(
        "  session events seen by analytics: {:?}",
        observed.session_events.lock()
    );
    println!(
        "  webhooks fired (session.created only): {:?}",
        observed.webhooks.lock()
    );
    println!("  audit log entries: {}", observed.audit.lock().len());
    println!(
        "  consolidation transient failures retried: {}",
        observed.transient_failures.load(Ordering::SeqCst).min(1)
    );
    println!(
        "  rpc: answered for {} ({} memories); slow call -> {}; late replies dropped: {}",
        answered.session_id,
        answered.memories_extracted,
        match &timed_out {
            Ok(_) => "answered (unexpected)".to_owned(),
            Err(e) => format!("{} ({})", e.code(), e),
        },
        rpc.late_replies()
    );
    ok &= matches!(&timed_out, Err(e) if e.code() == "rpc_timeout");
    let dls = observed.dead_letters.lock().clone();
    ok &= dls.len() == 1;
    for d in &dls {
        println!("  dead letter from {}: {}", d.original_queue, d.body);
        println!("    why: [{}] {}", d.kind, d.error);
        ok &= d.kind == "decode" && d.original_queue == EXTRACTION_REQUESTS;
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
