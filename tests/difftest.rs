//! Model-based differential test (issue 9): random small topologies and
//! random operation sequences, run on the in-memory broker and on RabbitMQ
//! (through the lapin transport), every observation compared.
//!
//! `cargo test --features lapin,memory --test difftest -- --nocapture`
//!
//! * `DIFFTEST_SEED=<n>`: run that seed only (decimal or `0x` hex);
//!   otherwise the fixed CI seed runs, plus `DIFFTEST_RANDOM_SEEDS` (default
//!   3) random seeds, each printed for reproduction.
//! * `DIFFTEST_CASES=<n>`: cases per seed (default 40 for the fixed seed,
//!   a quarter of that for each random seed).
//! * `DIFFTEST_CASE=<n>`: run the single case with that case seed (as a
//!   divergence report prints it), with shrinking.
//! * `DIFFTEST_VERBOSE=1`: print each case seed before running it.
//!
//! A divergence is confirmed by running the case on RabbitMQ again, shrunk
//! to a minimal case (ops, then topology, then message details removed
//! while the two sides still disagree) and printed with both observation
//! lists. The test fails on any confirmed divergence. See
//! `docs/difftest.md` for what is generated and compared.
//!
//! Needs RabbitMQ (`RABBITMQ_URL`, default the local broker): unreachable,
//! it fails when `SWITCHYARD_REQUIRE_RABBITMQ=1`, else prints "skipped".

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use switchyard::lapin::{AmqpConfig, LapinTransport};
use switchyard_core::settings::Settings;
use switchyard_core::{
    Binding, ConsumeOptions, Delivery, Destination, Error, ExchangeKind, ExchangeSpec, HeaderValue, Headers, Message,
    Overflow, PublishOptions, QueueSpec, Subscription, Transport,
};
use switchyard_memory::MemoryBroker;

/// The seed CI always runs.
const FIXED_SEED: u64 = 0x5157_1C4D_D1FF_7E57;
/// Cases of the fixed seed in a default run.
const DEFAULT_CASES: u64 = 40;
/// A short TTL: shorter than [`WAIT_OP`] by a wide margin, longer than the
/// ops between two waits take on RabbitMQ (see [`TIMING_GUARD`]).
const SHORT_TTL: Duration = Duration::from_millis(300);
/// A TTL that never expires during a case.
const LONG_TTL: Duration = Duration::from_secs(60);
/// What the `Wait` op sleeps: every short TTL has run out by then, and so
/// has the short TTL of a queue that a message expiring during the wait is
/// dead-lettered to (two short TTLs in a row; with 500 ms that second
/// expiry could come up to 100 ms after the wait, inside
/// [`TIMING_GUARD`]).
const WAIT_OP: Duration = Duration::from_millis(650);
/// In a case with short TTLs, an operation that RabbitMQ starts later than
/// this after the case began or the last `Wait` ended may see a short TTL
/// run out that the memory broker (on a paused clock, where operations take
/// no time) does not: its observations and all later ones are not compared.
const TIMING_GUARD: Duration = Duration::from_millis(200);
/// How long RabbitMQ gets for a delivery the memory broker made.
const DELIVERY_WAIT: Duration = Duration::from_secs(2);
/// After operations whose effects RabbitMQ applies asynchronously (acks,
/// nacks and the dead-lettering they cause, cancels), the RabbitMQ side
/// pauses this long so that the next operation sees their effect, as it
/// does on the in-process broker.
const ASYNC_SETTLE: Duration = Duration::from_millis(8);

/// How long one side may take to run one case.
const SIDE_LIMIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Random generation
// ---------------------------------------------------------------------------

/// SplitMix64: small, seedable, good enough for test generation.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }
}

/// The seed of case `i` of run seed `seed`.
fn case_seed(seed: u64, i: u64) -> u64 {
    let mut r = Rng(seed ^ i.wrapping_mul(0xA24B_AED4_963E_E407));
    r.next()
}

/// A TTL class: expired immediately unless delivered at once, expired by
/// the next `Wait`, or never during a case.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ttl {
    Zero,
    Short,
    Long,
}

impl Ttl {
    fn duration(self) -> Duration {
        match self {
            Ttl::Zero => Duration::ZERO,
            Ttl::Short => SHORT_TTL,
            Ttl::Long => LONG_TTL,
        }
    }
}

/// An exchange reference: the default exchange, one of the case's, or one
/// that is never declared.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Default,
    Ex(usize),
    Missing,
}

/// A routing or binding key: a literal or a queue's name.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Key {
    Lit(&'static str),
    Queue(usize),
}

/// Literal keys: words, dotted keys and topic patterns.
const KEYS: &[&str] = &["a", "b", "a.b", "a.c", "", "a.*", "#", "*.b", "a.#", "*"];
/// Header names (the `x-` one is ignored by headers bindings).
const HKEYS: &[&str] = &["h1", "h2", "x-h"];

/// A header value class.
#[derive(Debug, Clone, Copy, PartialEq)]
enum HVal {
    S1,
    S2,
    I32One,
    I64One,
    I64Two,
    True,
    Str1,
    F64One,
}

impl HVal {
    const ALL: &'static [HVal] = &[
        HVal::S1,
        HVal::S2,
        HVal::I32One,
        HVal::I64One,
        HVal::I64Two,
        HVal::True,
        HVal::Str1,
        HVal::F64One,
    ];
    fn value(self) -> HeaderValue {
        match self {
            HVal::S1 => HeaderValue::from("v1"),
            HVal::S2 => HeaderValue::from("v2"),
            HVal::I32One => HeaderValue::I32(1),
            HVal::I64One => HeaderValue::I64(1),
            HVal::I64Two => HeaderValue::I64(2),
            HVal::True => HeaderValue::Bool(true),
            HVal::Str1 => HeaderValue::from("1"),
            HVal::F64One => HeaderValue::F64(1.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct ExDef {
    kind: ExchangeKind,
    alternate: Option<usize>,
    internal: bool,
    auto_delete: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct QDef {
    ttl: Option<Ttl>,
    dlx: Option<(Target, Option<Key>)>,
    max_length: Option<(u64, Overflow)>,
    max_length_bytes: Option<u64>,
    max_priority: Option<u8>,
    auto_delete: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Dest {
    Queue(usize),
    Exchange(usize),
}

#[derive(Debug, Clone, PartialEq)]
struct BindDef {
    source: usize,
    dest: Dest,
    key: Key,
    /// `x-match` (`true` = `all`) and the match table, for headers bindings.
    headers: Option<(bool, Vec<(&'static str, HVal)>)>,
}

#[derive(Debug, Clone, PartialEq)]
struct MsgDef {
    id: u32,
    headers: Vec<(&'static str, HVal)>,
    cc: Vec<Key>,
    bcc: Vec<Key>,
    priority: Option<u8>,
    expiration: Option<Ttl>,
    /// The AMQP delivery mode sent: none, 1 or 2.
    delivery_mode: Option<u8>,
    /// Without headers: an explicitly empty headers table instead of none.
    empty_table: bool,
    properties: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Settle {
    Ack,
    Nack(bool),
    Reject(bool),
}

#[derive(Debug, Clone, PartialEq)]
enum Op {
    Publish {
        to: Target,
        key: Key,
        msg: MsgDef,
        mandatory: bool,
    },
    Get {
        queue: usize,
        auto_ack: bool,
    },
    Consume {
        queue: usize,
        prefetch: u16,
        auto_ack: bool,
        /// The consumer priority (`x-priority`), if any.
        priority: Option<i32>,
    },
    Recv {
        consumer: usize,
    },
    Settle {
        held: usize,
        how: Settle,
    },
    Cancel {
        consumer: usize,
    },
    Purge {
        queue: usize,
    },
    DeleteQueue {
        queue: usize,
        if_unused: bool,
        if_empty: bool,
    },
    DeclareQueue {
        queue: usize,
    },
    DeleteExchange {
        exchange: usize,
        if_unused: bool,
    },
    DeclareExchange {
        exchange: usize,
    },
    Unbind {
        binding: usize,
    },
    Bind {
        binding: usize,
    },
    Wait,
}

/// One generated case: a topology and the operations run on it.
#[derive(Debug, Clone, PartialEq)]
struct Case {
    seed: u64,
    exchanges: Vec<ExDef>,
    queues: Vec<QDef>,
    bindings: Vec<BindDef>,
    ops: Vec<Op>,
}

fn gen_key(r: &mut Rng, queues: usize) -> Key {
    if queues > 0 && r.chance(30) {
        Key::Queue(r.below(queues))
    } else {
        Key::Lit(r.pick(KEYS))
    }
}

fn gen_headers(r: &mut Rng, max: usize) -> Vec<(&'static str, HVal)> {
    let n = r.below(max + 1);
    let mut v: Vec<(&'static str, HVal)> = Vec::new();
    for _ in 0..n {
        let k = r.pick(HKEYS);
        if !v.iter().any(|(x, _)| *x == k) {
            v.push((k, r.pick(HVal::ALL)));
        }
    }
    v
}

fn gen_ttl(r: &mut Rng) -> Ttl {
    r.pick(&[Ttl::Zero, Ttl::Short, Ttl::Short, Ttl::Long])
}

fn gen_target(r: &mut Rng, exchanges: usize) -> Target {
    match r.below(10) {
        0 => Target::Missing,
        1..=3 => Target::Default,
        _ if exchanges > 0 => Target::Ex(r.below(exchanges)),
        _ => Target::Default,
    }
}

fn gen_case(seed: u64) -> Case {
    let mut r = Rng(seed);
    let n_ex = r.below(4);
    let n_q = 1 + r.below(3);
    let kinds = [
        ExchangeKind::Direct,
        ExchangeKind::Topic,
        ExchangeKind::Fanout,
        ExchangeKind::Headers,
    ];
    let exchanges: Vec<ExDef> = (0..n_ex)
        .map(|_| ExDef {
            kind: kinds[r.below(kinds.len())].clone(),
            alternate: if r.chance(15) { Some(r.below(n_ex)) } else { None },
            internal: r.chance(8),
            auto_delete: r.chance(10),
        })
        .collect();
    let queues: Vec<QDef> = (0..n_q)
        .map(|_| QDef {
            ttl: if r.chance(30) { Some(gen_ttl(&mut r)) } else { None },
            dlx: if r.chance(40) {
                let t = gen_target(&mut r, n_ex);
                let k = if r.chance(60) { Some(gen_key(&mut r, n_q)) } else { None };
                Some((t, k))
            } else {
                None
            },
            max_length: if r.chance(30) {
                let o = r.pick(&[Overflow::DropHead, Overflow::RejectPublish, Overflow::RejectPublishDlx]);
                Some((r.below(4) as u64, o))
            } else {
                None
            },
            max_length_bytes: if r.chance(10) { Some(r.below(8) as u64) } else { None },
            max_priority: if r.chance(20) {
                Some(if r.chance(25) { 200 } else { 1 + r.below(5) as u8 })
            } else {
                None
            },
            auto_delete: r.chance(10),
        })
        .collect();
    let mut bindings = Vec::new();
    if n_ex > 0 {
        for _ in 0..r.below(6) {
            let source = r.below(n_ex);
            let dest = if r.chance(25) {
                Dest::Exchange(r.below(n_ex))
            } else {
                Dest::Queue(r.below(n_q))
            };
            let headers = if exchanges[source].kind == ExchangeKind::Headers {
                let mut h = gen_headers(&mut r, 2);
                if h.is_empty() && r.chance(50) {
                    h.push(("h1", HVal::S1));
                }
                Some((r.chance(50), h))
            } else {
                None
            };
            bindings.push(BindDef {
                source,
                dest,
                key: gen_key(&mut r, n_q),
                headers,
            });
        }
    }
    let n_ops = 4 + r.below(22);
    let mut ops = Vec::with_capacity(n_ops);
    let mut consumers = 0usize;
    // The queue of each consumer not cancelled yet.
    let mut consumed: Vec<Option<usize>> = Vec::new();
    let mut msg_id = 0u32;
    let has_short_ttl = queues.iter().any(|q| q.ttl == Some(Ttl::Short));
    // A quarter of the cases crowd their queues with consumers: more
    // consumes (taken from gets), on queues that have one already.
    let crowd = r.chance(25);
    for _ in 0..n_ops {
        let w = match r.below(100) {
            w @ 35..=44 if crowd => 48 + w % 7,
            w => w,
        };
        let op = match w {
            0..=34 => {
                msg_id += 1;
                let (to, key) = if crowd && r.chance(50) {
                    (Target::Default, Key::Queue(r.below(n_q)))
                } else {
                    (gen_target(&mut r, n_ex), gen_key(&mut r, n_q))
                };
                // A priority, a TTL, both or neither (a message that goes
                // ahead by priority has no TTL timer on RabbitMQ 3.10: it
                // expires only when found at the head).
                let priority = if r.chance(25) {
                    // AMQP's 0-9 mostly; above 9 as RabbitMQ allows.
                    let p = if r.chance(20) { 10 + r.below(246) } else { r.below(10) };
                    Some(p as u8)
                } else {
                    None
                };
                let expiration = if r.chance(25) { Some(gen_ttl(&mut r)) } else { None };
                let msg = MsgDef {
                    id: msg_id,
                    headers: if r.chance(40) {
                        gen_headers(&mut r, 3)
                    } else {
                        Vec::new()
                    },
                    cc: if r.chance(8) {
                        vec![gen_key(&mut r, n_q)]
                    } else {
                        Vec::new()
                    },
                    bcc: if r.chance(5) {
                        vec![gen_key(&mut r, n_q)]
                    } else {
                        Vec::new()
                    },
                    priority,
                    expiration,
                    delivery_mode: [None, Some(1), Some(2), Some(2)][r.below(4)],
                    empty_table: r.chance(20),
                    properties: r.chance(30),
                };
                Op::Publish {
                    to,
                    key,
                    msg,
                    mandatory: r.chance(25),
                }
            }
            35..=47 => Op::Get {
                queue: r.below(n_q),
                auto_ack: r.chance(40),
            },
            // Several consumers on one queue too (a queue that already has
            // one is picked half of the time), some with a consumer priority.
            48..=54 => {
                let busy: Vec<usize> = (0..n_q).filter(|q| consumed.contains(&Some(*q))).collect();
                let queue = if !busy.is_empty() && r.chance(if crowd { 85 } else { 50 }) {
                    r.pick(&busy)
                } else {
                    r.below(n_q)
                };
                consumers += 1;
                consumed.push(Some(queue));
                Op::Consume {
                    queue,
                    prefetch: r.pick(&[0u16, 1, 1, 2, 3]),
                    auto_ack: r.chance(30),
                    priority: if r.chance(20) { Some(r.pick(&[-1, 1, 2])) } else { None },
                }
            }
            55..=66 if consumers > 0 => Op::Recv {
                consumer: r.below(consumers),
            },
            55..=79 => Op::Settle {
                held: r.below(8),
                how: r.pick(&[
                    Settle::Ack,
                    Settle::Ack,
                    Settle::Nack(true),
                    Settle::Nack(false),
                    Settle::Reject(true),
                    Settle::Reject(false),
                ]),
            },
            80..=82 if consumers > 0 => {
                let consumer = r.below(consumers);
                consumed[consumer] = None;
                Op::Cancel { consumer }
            }
            83..=85 => Op::Purge { queue: r.below(n_q) },
            86..=87 => Op::DeleteQueue {
                queue: r.below(n_q),
                if_unused: r.chance(30),
                if_empty: r.chance(30),
            },
            88..=89 => Op::DeclareQueue { queue: r.below(n_q) },
            90 if n_ex > 0 => Op::DeleteExchange {
                exchange: r.below(n_ex),
                if_unused: r.chance(50),
            },
            91 if n_ex > 0 => Op::DeclareExchange {
                exchange: r.below(n_ex),
            },
            92..=93 if !bindings.is_empty() => Op::Unbind {
                binding: r.below(bindings.len()),
            },
            94 if !bindings.is_empty() => Op::Bind {
                binding: r.below(bindings.len()),
            },
            95..=99 if has_short_ttl || r.chance(40) => Op::Wait,
            _ => Op::Get {
                queue: r.below(n_q),
                auto_ack: false,
            },
        };
        ops.push(op);
    }
    Case {
        seed,
        exchanges,
        queues,
        bindings,
        ops,
    }
}

// ---------------------------------------------------------------------------
// Execution
// ---------------------------------------------------------------------------

/// Which side runs, and for RabbitMQ how many deliveries each `Recv` (and
/// the final collection) should wait for: what the memory broker delivered.
enum Side<'a> {
    Memory,
    Rabbit { hints: &'a [(usize, bool)] },
}

/// What one run observed: one normalised line per observation, plus the
/// delivery counts of every `Recv` (the hints for the RabbitMQ run).
#[derive(Debug, Default)]
struct Run {
    lines: Vec<String>,
    hints: Vec<(usize, bool)>,
    /// The first line observed by an operation that started past
    /// [`TIMING_GUARD`] (RabbitMQ side, cases with short TTLs only).
    late_from: Option<usize>,
    /// A message was seen whose dead-lettering chained short TTLs (see
    /// [`Exec::chained_ttl`]).
    chained_ttl: bool,
    /// A message was seen that died twice in one queue (an `x-death` count
    /// of 2 or more, or one queue in two entries): it went round a
    /// dead-letter cycle. Counted, and compared like any other case.
    cycle: bool,
}

struct Names {
    prefix: String,
}

impl Names {
    fn ex(&self, i: usize) -> String {
        format!("{}.x{i}", self.prefix)
    }
    fn q(&self, i: usize) -> String {
        format!("{}.q{i}", self.prefix)
    }
    fn target(&self, t: Target) -> String {
        match t {
            Target::Default => String::new(),
            Target::Ex(i) => self.ex(i),
            Target::Missing => format!("{}.missing", self.prefix),
        }
    }
    fn key(&self, k: Key) -> String {
        match k {
            Key::Lit(s) => s.to_owned(),
            Key::Queue(i) => self.q(i),
        }
    }
    fn exchange_spec(&self, c: &Case, i: usize) -> ExchangeSpec {
        let d = &c.exchanges[i];
        let mut spec = ExchangeSpec::new(self.ex(i), d.kind.clone()).durable(false);
        spec.internal = d.internal;
        spec.auto_delete = d.auto_delete;
        if let Some(a) = d.alternate {
            spec.arguments.insert("alternate-exchange", self.ex(a));
        }
        spec
    }
    fn queue_spec(&self, c: &Case, i: usize) -> QueueSpec {
        let d = &c.queues[i];
        let mut spec = QueueSpec::new(self.q(i)).durable(false).auto_delete(d.auto_delete);
        if let Some(t) = d.ttl {
            spec = spec.message_ttl(t.duration());
        }
        if let Some((t, k)) = d.dlx {
            let key = k.map(|k| self.key(k));
            spec = spec.dead_letter(self.target(t), key.as_deref());
        }
        if let Some((n, o)) = d.max_length {
            spec = spec.max_length(n, o);
        }
        if let Some(n) = d.max_length_bytes {
            spec.arguments.max_length_bytes = Some(n);
        }
        if let Some(p) = d.max_priority {
            spec = spec.max_priority(p);
        }
        spec
    }
    fn binding(&self, b: &BindDef) -> Binding {
        let key = self.key(b.key);
        let mut binding = match b.dest {
            Dest::Queue(q) => Binding::queue(self.q(q), self.ex(b.source), key),
            Dest::Exchange(x) => Binding::exchange(self.ex(x), self.ex(b.source), key),
        };
        if let Some((all, table)) = &b.headers {
            binding.arguments.insert("x-match", if *all { "all" } else { "any" });
            for (k, v) in table {
                binding.arguments.insert(*k, v.value());
            }
        }
        binding
    }
    fn message(&self, m: &MsgDef) -> Message {
        let mut msg = Message::new(format!("m{}", m.id));
        msg.properties.delivery_mode = m.delivery_mode;
        if m.empty_table {
            msg.headers = Headers::empty_table();
        }
        for (k, v) in &m.headers {
            msg = msg.with_header(*k, v.value());
        }
        let keys = |ks: &[Key]| HeaderValue::Array(ks.iter().map(|k| HeaderValue::from(self.key(*k))).collect());
        if !m.cc.is_empty() {
            msg = msg.with_header("CC", keys(&m.cc));
        }
        if !m.bcc.is_empty() {
            msg = msg.with_header("BCC", keys(&m.bcc));
        }
        if let Some(p) = m.priority {
            msg = msg.with_priority(p);
        }
        if let Some(t) = m.expiration {
            msg = msg.with_expiration(t.duration());
        }
        if m.properties {
            msg = msg
                .with_content_type("text/plain")
                .with_correlation_id(format!("c{}", m.id))
                .with_message_id(format!("id{}", m.id))
                .with_kind("t")
                .with_app_id("difftest")
                .with_timestamp(1_700_000_000)
                .with_reply_to(self.q(0));
            msg.properties.cluster_id = Some("difftest".into());
        }
        msg
    }
}

/// An error as compared: its stable code and the broker's reply code.
fn err_line(e: &Error) -> String {
    match e.reply() {
        Some(r) => format!("err {} {}", e.code(), r.code),
        None => format!("err {}", e.code()),
    }
}

fn result_line<T>(r: &Result<T, Error>, ok: impl FnOnce(&T) -> String) -> String {
    match r {
        Ok(v) => ok(v),
        Err(e) => err_line(e),
    }
}

/// A header value with `x-death`'s `time` dropped (the only field that
/// differs between two runs of the same case).
fn norm_value(v: &HeaderValue) -> String {
    match v {
        HeaderValue::Table(t) => norm_headers(t),
        HeaderValue::Array(a) => format!("[{}]", a.iter().map(norm_value).collect::<Vec<_>>().join(", ")),
        other => format!("{other:?}"),
    }
}

fn norm_headers(h: &Headers) -> String {
    let mut s = String::from("{");
    for (k, v) in h.iter() {
        if k == "time" {
            continue;
        }
        let _ = write!(s, "{k}: {}, ", norm_value(v));
    }
    s.push('}');
    s
}

/// A delivery as compared: body, exchange, routing key, redelivered,
/// every property and the headers.
fn delivery_line(d: &Delivery) -> String {
    let m = &d.message;
    let p = &m.properties;
    format!(
        "{} ex={:?} rk={:?} redelivered={} props=[ct={:?} ce={:?} corr={:?} reply={:?} id={:?} ts={:?} prio={:?} exp={:?} mode={:?} type={:?} app={:?} user={:?} cluster={:?}] table={} headers={}",
        String::from_utf8_lossy(&m.body),
        d.info.exchange,
        d.info.routing_key,
        d.info.redelivered,
        p.content_type,
        p.content_encoding,
        p.correlation_id,
        p.reply_to,
        p.message_id,
        p.timestamp,
        p.priority,
        p.expiration,
        p.delivery_mode,
        p.kind,
        p.app_id,
        p.user_id,
        p.cluster_id,
        m.headers.has_table(),
        norm_headers(&m.headers)
    )
}

/// One consumer of a case: its subscription while it runs.
struct Sub {
    sub: Subscription,
    /// The queue (index) it consumes.
    queue: usize,
    auto_ack: bool,
    /// The stream has ended (cancelled by the broker or after a cancel).
    ended: bool,
    /// The client cancelled it.
    cancelled: bool,
}

struct Exec<'a> {
    t: Arc<dyn Transport>,
    names: Names,
    case: &'a Case,
    side: Side<'a>,
    hint_at: usize,
    run: Run,
    subs: Vec<Option<Sub>>,
    held: Vec<Delivery>,
    /// When the case began or the last `Wait` ended.
    since_wait: Instant,
    /// When the current operation started.
    op_started: Instant,
    /// Whether [`TIMING_GUARD`] applies (RabbitMQ side, short TTLs).
    guarded: bool,
}

impl Exec<'_> {
    /// Marks the start of an operation (for [`TIMING_GUARD`]).
    fn start(&mut self) {
        self.op_started = Instant::now();
    }

    fn rabbit(&self) -> bool {
        matches!(self.side, Side::Rabbit { .. })
    }

    async fn pause(&self) {
        if self.rabbit() {
            tokio::time::sleep(ASYNC_SETTLE).await;
        }
    }

    /// Notes whether `d`, seen in queue `queue`, shows that short TTLs
    /// chained: it died `expired` by a timer (in a queue with the short
    /// TTL, or of its own short expiration: not a TTL of 0) at least twice,
    /// or once and now sits in a queue with the short TTL. A timer armed
    /// by an operation runs out within the next `Wait` on both sides (the
    /// [`TIMING_GUARD`]), but one armed when a dead letter of such an
    /// expiry enters a short-TTL queue — during a `Wait` — runs out
    /// 100 ms after that `Wait` on the memory broker's clock, and on
    /// RabbitMQ's at a time that depends on how long the operations in
    /// between took (a message rejected once can go round a cycle of such
    /// queues for ever: see `twin::dead_letter_cycles_follow_the_regrouped_x_death`).
    /// Such cases are run but not compared. Also notes whether `d` went
    /// round a dead-letter cycle ([`Run::cycle`], only counted).
    fn chained_ttl(&mut self, d: &Delivery, queue: usize) {
        let short = |q: usize| self.case.queues.get(q).is_some_and(|q| q.ttl == Some(Ttl::Short));
        let mut timed = i64::from(short(queue));
        if let Some(HeaderValue::Array(deaths)) = d.message.headers.get("x-death") {
            for t in deaths.iter().filter_map(HeaderValue::as_table) {
                if t.get_str("reason") != Some("expired") || t.get_str("original-expiration") == Some("0") {
                    continue;
                }
                let q = (0..self.case.queues.len()).find(|&i| t.get_str("queue") == Some(self.names.q(i).as_str()));
                if q.is_some_and(|q| self.case.queues[q].ttl == Some(Ttl::Zero)) {
                    continue;
                }
                timed += t.get_i64("count").unwrap_or(1);
            }
        }
        self.run.chained_ttl |= timed >= 2;
        if let Some(HeaderValue::Array(deaths)) = d.message.headers.get("x-death") {
            let mut queues = Vec::new();
            for t in deaths.iter().filter_map(HeaderValue::as_table) {
                let q = t.get_str("queue");
                self.run.cycle |= t.get_i64("count").unwrap_or(1) > 1 || queues.contains(&q);
                queues.push(q);
            }
        }
    }

    fn obs(&mut self, line: String) {
        if self.guarded
            && self.run.late_from.is_none()
            && self.op_started.duration_since(self.since_wait) > TIMING_GUARD
        {
            self.run.late_from = Some(self.run.lines.len());
        }
        self.run.lines.push(line.replace(&self.names.prefix, "@"));
    }

    /// Takes what consumer `c` has been sent: on memory, everything already
    /// there; on RabbitMQ, as many deliveries (and the end) as memory saw,
    /// each waited for up to [`DELIVERY_WAIT`], then anything else already
    /// there.
    async fn collect(&mut self, c: usize) -> String {
        let hint = match &self.side {
            Side::Memory => None,
            Side::Rabbit { hints } => {
                let h = hints.get(self.hint_at).copied().unwrap_or((0, false));
                self.hint_at += 1;
                Some(h)
            }
        };
        let Some(Some(s)) = self.subs.get_mut(c) else {
            if hint.is_none() {
                self.run.hints.push((0, false));
            }
            return "no consumer".into();
        };
        let mut got = Vec::new();
        let mut end = None;
        if !s.ended {
            if let Some((n, ended)) = hint {
                let want = n + usize::from(ended);
                for _ in 0..want {
                    match tokio::time::timeout(DELIVERY_WAIT, s.sub.next()).await {
                        Ok(Some(Ok(d))) => got.push(d),
                        Ok(Some(Err(e))) => {
                            end = Some(err_line(&e));
                            break;
                        }
                        Ok(None) => {
                            end = Some("ended".into());
                            break;
                        }
                        Err(_) => break,
                    }
                }
            }
            if end.is_none() {
                for _ in 0..4 {
                    tokio::task::yield_now().await;
                }
                loop {
                    match s.sub.next().now_or_never() {
                        Some(Some(Ok(d))) => got.push(d),
                        Some(Some(Err(e))) => {
                            end = Some(err_line(&e));
                            break;
                        }
                        Some(None) => {
                            end = Some("ended".into());
                            break;
                        }
                        None => break,
                    }
                }
            }
        }
        if end.is_some() {
            s.ended = true;
        }
        if hint.is_none() {
            self.run.hints.push((got.len(), end.is_some()));
        }
        let mut line = format!("{} deliveries", got.len());
        let (queue, auto_ack) = (s.queue, s.auto_ack);
        for d in got {
            self.chained_ttl(&d, queue);
            let _ = write!(line, "; {}", delivery_line(&d));
            if !auto_ack {
                self.held.push(d);
            }
        }
        if let Some(e) = end {
            let _ = write!(line, "; {e}");
        }
        line
    }

    async fn setup(&mut self) {
        let c = self.case;
        for i in 0..c.exchanges.len() {
            let r = self.t.declare_exchange(&self.names.exchange_spec(c, i)).await;
            let line = format!("declare x{i}: {}", result_line(&r, |_| "ok".into()));
            self.obs(line);
        }
        for i in 0..c.queues.len() {
            let r = self.t.declare_queue(&self.names.queue_spec(c, i)).await;
            let line = format!(
                "declare q{i}: {}",
                result_line(&r, |q| format!("ok {} {}", q.message_count, q.consumer_count))
            );
            self.obs(line);
        }
        for (i, b) in c.bindings.iter().enumerate() {
            let r = self.t.bind(&self.names.binding(b)).await;
            let line = format!("bind b{i}: {}", result_line(&r, |_| "ok".into()));
            self.obs(line);
        }
    }

    async fn op(&mut self, i: usize, op: &Op) {
        let c = self.case;
        let line = match op {
            Op::Publish {
                to,
                key,
                msg,
                mandatory,
            } => {
                let dest = Destination::new(self.names.target(*to), self.names.key(*key));
                let options = PublishOptions { mandatory: *mandatory };
                let r = self.t.publish_with(&dest, self.names.message(msg), options).await;
                if c.queues.iter().any(|q| q.dlx.is_some()) {
                    self.pause().await;
                }
                result_line(&r, |_| "ok".into())
            }
            Op::Get { queue, auto_ack } => {
                let r = self.t.get(&self.names.q(*queue), *auto_ack).await;
                match r {
                    Ok(None) => "empty".into(),
                    Ok(Some(g)) => {
                        self.chained_ttl(&g.delivery, *queue);
                        let line = format!("count={} {}", g.message_count, delivery_line(&g.delivery));
                        if g.delivery.needs_settlement() {
                            self.held.push(g.delivery);
                        }
                        line
                    }
                    Err(e) => err_line(&e),
                }
            }
            Op::Consume {
                queue,
                prefetch,
                auto_ack,
                priority,
            } => {
                // A manual-ack consumer asking for 0 gets the default prefetch
                // on the RabbitMQ transports (they never consume unbounded),
                // unlimited on the memory transport (documented on
                // `ConsumeOptions::prefetch`): both sides ask for the default.
                let prefetch = if *prefetch == 0 && !*auto_ack {
                    switchyard_core::settings::DEFAULT_PREFETCH
                } else {
                    *prefetch
                };
                let mut options = ConsumeOptions::default().prefetch(prefetch).auto_ack(*auto_ack);
                if let Some(p) = priority {
                    options = options.priority(*p);
                }
                let r = self.t.consume(&self.names.q(*queue), options).await;
                let line = result_line(&r, |_| "ok".into());
                self.subs.push(r.ok().map(|sub| Sub {
                    sub,
                    queue: *queue,
                    auto_ack: *auto_ack,
                    ended: false,
                    cancelled: false,
                }));
                line
            }
            Op::Recv { consumer } => self.collect(*consumer).await,
            Op::Settle { held, how } => {
                if self.held.is_empty() {
                    "nothing held".into()
                } else {
                    let d = self.held.remove(held % self.held.len());
                    let body = String::from_utf8_lossy(&d.message.body).into_owned();
                    let r = match how {
                        Settle::Ack => d.ack().await,
                        Settle::Nack(requeue) => d.nack(*requeue).await,
                        Settle::Reject(requeue) => d.reject(*requeue).await,
                    };
                    self.pause().await;
                    format!("{how:?} {body}: {}", result_line(&r, |_| "ok".into()))
                }
            }
            Op::Cancel { consumer } => match self.subs.get_mut(*consumer) {
                Some(Some(s)) if !s.cancelled => {
                    // What was sent before the cancel is collected first, as
                    // a `Recv` would.
                    let before = self.collect(*consumer).await;
                    let Some(Some(s)) = self.subs.get_mut(*consumer) else {
                        unreachable!()
                    };
                    s.cancelled = true;
                    let r = s.sub.cancel_handle().cancel().await;
                    self.pause().await;
                    format!("{before}; cancel {}", result_line(&r, |_| "ok".into()))
                }
                _ => "no consumer".into(),
            },
            Op::Purge { queue } => {
                let r = self.t.purge_queue(&self.names.q(*queue)).await;
                result_line(&r, |n| format!("ok {n}"))
            }
            Op::DeleteQueue {
                queue,
                if_unused,
                if_empty,
            } => {
                let only = switchyard_core::DeleteIf {
                    unused: *if_unused,
                    empty: *if_empty,
                };
                let r = self.t.delete_queue_if(&self.names.q(*queue), only).await;
                result_line(&r, |n| format!("ok {n}"))
            }
            Op::DeclareQueue { queue } => {
                let r = self.t.declare_queue(&self.names.queue_spec(c, *queue)).await;
                result_line(&r, |q| format!("ok {} {}", q.message_count, q.consumer_count))
            }
            Op::DeleteExchange { exchange, if_unused } => {
                let name = self.names.ex(*exchange);
                let r = if *if_unused {
                    self.t.delete_exchange_if_unused(&name).await
                } else {
                    self.t.delete_exchange(&name).await
                };
                result_line(&r, |_| "ok".into())
            }
            Op::DeclareExchange { exchange } => {
                let r = self.t.declare_exchange(&self.names.exchange_spec(c, *exchange)).await;
                result_line(&r, |_| "ok".into())
            }
            Op::Unbind { binding } => {
                let r = self.t.unbind(&self.names.binding(&c.bindings[*binding])).await;
                result_line(&r, |_| "ok".into())
            }
            Op::Bind { binding } => {
                let r = self.t.bind(&self.names.binding(&c.bindings[*binding])).await;
                result_line(&r, |_| "ok".into())
            }
            Op::Wait => {
                tokio::time::sleep(WAIT_OP).await;
                self.since_wait = Instant::now();
                self.op_started = self.since_wait;
                "waited".into()
            }
        };
        self.obs(format!("#{i} {op:?} => {line}"));
    }

    /// Collects every consumer, cancels them, requeues what is held, then
    /// records each queue's counts and content (taken with `get`).
    async fn finish(&mut self) {
        for c in 0..self.subs.len() {
            let live = matches!(&self.subs[c], Some(s) if !s.ended && !s.cancelled);
            if live {
                self.start();
                let line = self.collect(c).await;
                self.obs(format!("final c{c}: {line}"));
            }
        }
        if self.rabbit() {
            // Anything RabbitMQ sends beyond what memory did shows here.
            tokio::time::sleep(Duration::from_millis(30)).await;
            for c in 0..self.subs.len() {
                if let Some(s) = &mut self.subs[c] {
                    if !s.ended && !s.cancelled {
                        if let Some(Some(Ok(d))) = s.sub.next().now_or_never() {
                            let queue = s.queue;
                            self.chained_ttl(&d, queue);
                            let line = format!("final c{c}: extra {}", delivery_line(&d));
                            self.obs(line);
                        }
                    }
                }
            }
        }
        for c in 0..self.subs.len() {
            if let Some(s) = &mut self.subs[c] {
                if !s.cancelled {
                    s.cancelled = true;
                    self.op_started = Instant::now();
                    let r = s.sub.cancel_handle().cancel().await;
                    let line = format!("final cancel c{c}: {}", result_line(&r, |_| "ok".into()));
                    self.obs(line);
                }
            }
        }
        self.pause().await;
        let c = self.case;
        let order_matters = c.queues.iter().any(|q| q.ttl.is_some() || q.max_length.is_some())
            || c.ops
                .iter()
                .any(|o| matches!(o, Op::Publish { msg, .. } if msg.expiration.is_some()));
        for d in std::mem::take(&mut self.held) {
            self.start();
            let body = String::from_utf8_lossy(&d.message.body).into_owned();
            let r = d.nack(true).await;
            if order_matters {
                // Requeues through different channels: let RabbitMQ take
                // them in this order (a requeue drops the expired heads, a
                // max length drops heads).
                self.pause().await;
            }
            let line = format!("final requeue {body}: {}", result_line(&r, |_| "ok".into()));
            self.obs(line);
        }
        if self.rabbit() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for q in 0..self.case.queues.len() {
            let name = self.names.q(q);
            self.start();
            let r = self.t.queue_info(&name).await;
            let line = format!(
                "final q{q}: {}",
                result_line(&r, |i| format!(
                    "ready={} consumers={}",
                    i.message_count, i.consumer_count
                ))
            );
            self.obs(line);
            if r.is_err() {
                continue;
            }
            for _ in 0..64 {
                self.start();
                match self.t.get(&name, true).await {
                    Ok(Some(g)) => {
                        self.chained_ttl(&g.delivery, q);
                        let line = format!(
                            "final q{q} get count={} {}",
                            g.message_count,
                            delivery_line(&g.delivery)
                        );
                        self.obs(line);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let line = format!("final q{q} get {}", err_line(&e));
                        self.obs(line);
                        break;
                    }
                }
            }
        }
        self.subs.clear();
    }

    async fn cleanup(&mut self) {
        for q in 0..self.case.queues.len() {
            let _ = self.t.delete_queue(&self.names.q(q)).await;
        }
        for x in 0..self.case.exchanges.len() {
            let _ = self.t.delete_exchange(&self.names.ex(x)).await;
        }
    }
}

/// What a case exercises that used to be left out: several consumers on
/// one queue at the same time, and a message with both a priority and a
/// TTL (counted for the summary).
fn coverage(case: &Case) -> (bool, bool) {
    let mut live: Vec<Option<usize>> = Vec::new();
    let mut crowded = false;
    let mut ahead = false;
    for op in &case.ops {
        match op {
            Op::Consume { queue, .. } => {
                crowded |= live.contains(&Some(*queue));
                live.push(Some(*queue));
            }
            Op::Cancel { consumer } => {
                if let Some(c) = live.get_mut(*consumer) {
                    *c = None;
                }
            }
            Op::Publish { msg, .. } => ahead |= msg.priority.is_some() && msg.expiration.is_some(),
            _ => {}
        }
    }
    (crowded, ahead)
}

/// Runs `case` on `t` with names under `prefix`.
async fn execute(t: Arc<dyn Transport>, prefix: String, case: &Case, side: Side<'_>) -> Run {
    let short_ttl = case.queues.iter().any(|q| q.ttl == Some(Ttl::Short))
        || case
            .ops
            .iter()
            .any(|o| matches!(o, Op::Publish { msg, .. } if msg.expiration == Some(Ttl::Short)));
    let guarded = short_ttl && matches!(side, Side::Rabbit { .. });
    let now = Instant::now();
    let mut e = Exec {
        since_wait: now,
        op_started: now,
        guarded,
        t,
        names: Names { prefix },
        case,
        side,
        hint_at: 0,
        run: Run::default(),
        subs: Vec::new(),
        held: Vec::new(),
    };
    e.setup().await;
    for (i, op) in case.ops.iter().enumerate() {
        e.start();
        e.op(i, op).await;
    }
    e.finish().await;
    e.cleanup().await;
    e.run
}

// ---------------------------------------------------------------------------
// The two sides, comparison and shrinking
// ---------------------------------------------------------------------------

struct Harness {
    settings: Settings,
    rabbit: Arc<dyn Transport>,
    runs: u64,
}

fn settings() -> Settings {
    Settings::default()
        .with_url(switchyard_core::testkit::rabbitmq_url())
        .with_connection_attempts(1)
        .with_retry_delay(Duration::from_millis(100))
}

async fn connect(settings: &Settings) -> Result<Arc<dyn Transport>, Error> {
    let config = AmqpConfig::from_settings(settings)?.connection_name("switchyard difftest");
    Ok(Arc::new(LapinTransport::connect_with(config).await?))
}

/// Runs `case` on a fresh memory broker, on a runtime of its own whose
/// clock is paused: operations take no time and a `Wait` advances the clock
/// at once, so TTLs there are exact.
async fn run_memory(case: Case) -> Run {
    let run = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("memory-side runtime");
        rt.block_on(async {
            let t = MemoryBroker::new().connect() as Arc<dyn Transport>;
            let run = execute(t.clone(), "sy-dt.mem".into(), &case, Side::Memory).await;
            let _ = t.close().await;
            run
        })
    });
    match tokio::time::timeout(SIDE_LIMIT, run).await {
        Ok(run) => run.expect("memory side panicked"),
        Err(_) => Run {
            lines: vec![format!("memory side did not finish within {SIDE_LIMIT:?}")],
            ..Run::default()
        },
    }
}

/// The outcome of one case on both sides.
struct Outcome {
    memory: Run,
    rabbit: Run,
}

impl Outcome {
    /// The index of the first differing observation, if any.
    fn first_difference(&self) -> Option<usize> {
        let (m, r) = (&self.memory.lines, &self.rabbit.lines);
        if m == r {
            return None;
        }
        Some(
            m.iter()
                .zip(r.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(m.len().min(r.len())),
        )
    }

    /// True if the two sides differ before RabbitMQ fell behind the
    /// [`TIMING_GUARD`], in a case without chained short TTLs.
    fn diverges(&self) -> bool {
        if self.chained() {
            return false;
        }
        match (self.first_difference(), self.rabbit.late_from) {
            (None, _) => false,
            (Some(d), Some(late)) => d < late,
            (Some(_), None) => true,
        }
    }

    /// True if they differ only from where RabbitMQ fell behind.
    fn late_only(&self) -> bool {
        self.first_difference().is_some() && !self.chained() && !self.diverges()
    }

    /// True if either side saw a message whose dead-lettering chained
    /// short TTLs ([`Exec::chained_ttl`]).
    fn chained(&self) -> bool {
        self.memory.chained_ttl || self.rabbit.chained_ttl
    }
}

impl Harness {
    async fn run(&mut self, case: &Case) -> Outcome {
        self.runs += 1;
        let memory = run_memory(case.clone()).await;
        if self.rabbit.health_check().await.is_err() {
            self.rabbit = connect(&self.settings).await.expect("reconnect to RabbitMQ");
        }
        let prefix = format!("sy-dt.{}", &switchyard_core::message::new_id()[..10]);
        let rabbit = tokio::time::timeout(
            SIDE_LIMIT,
            execute(self.rabbit.clone(), prefix, case, Side::Rabbit { hints: &memory.hints }),
        )
        .await
        .unwrap_or_else(|_| Run {
            lines: vec![format!("RabbitMQ side did not finish within {SIDE_LIMIT:?}")],
            ..Run::default()
        });
        Outcome { memory, rabbit }
    }

    /// Removes what it can from `case` while it still diverges; returns
    /// the smallest diverging case with the outcome of its diverging run.
    async fn shrink(&mut self, mut case: Case, mut outcome: Outcome) -> (Case, Outcome) {
        let budget = Instant::now() + Duration::from_secs(120);
        let mut progress = true;
        while progress && Instant::now() < budget {
            progress = false;
            for cand in candidates(&case) {
                if Instant::now() >= budget {
                    break;
                }
                let o = self.run(&cand).await;
                if o.diverges() {
                    case = cand;
                    outcome = o;
                    progress = true;
                    break;
                }
            }
        }
        (case, outcome)
    }
}

/// Smaller variants of `case`, biggest cuts first.
fn candidates(case: &Case) -> Vec<Case> {
    let mut out = Vec::new();
    let n = case.ops.len();
    // Chunks of ops, then single ops.
    let mut size = n / 2;
    while size >= 1 {
        let mut start = 0;
        while start < n {
            let mut c = case.clone();
            c.ops.drain(start..(start + size).min(n));
            out.push(c);
            start += size;
        }
        size /= 2;
    }
    for i in 0..case.bindings.len() {
        if case
            .ops
            .iter()
            .any(|o| matches!(o, Op::Unbind { binding } | Op::Bind { binding } if *binding >= i))
        {
            continue;
        }
        let mut c = case.clone();
        c.bindings.remove(i);
        out.push(c);
    }
    // Queue and exchange arguments.
    for i in 0..case.queues.len() {
        let q = &case.queues[i];
        let mut variants = Vec::new();
        if q.ttl.is_some() {
            variants.push(QDef { ttl: None, ..q.clone() });
        }
        if q.dlx.is_some() {
            variants.push(QDef { dlx: None, ..q.clone() });
        }
        if let Some((t, Some(_))) = q.dlx {
            variants.push(QDef {
                dlx: Some((t, None)),
                ..q.clone()
            });
        }
        if q.max_length.is_some() {
            variants.push(QDef {
                max_length: None,
                ..q.clone()
            });
        }
        if q.max_length_bytes.is_some() {
            variants.push(QDef {
                max_length_bytes: None,
                ..q.clone()
            });
        }
        if q.max_priority.is_some() {
            variants.push(QDef {
                max_priority: None,
                ..q.clone()
            });
        }
        if q.auto_delete {
            variants.push(QDef {
                auto_delete: false,
                ..q.clone()
            });
        }
        for v in variants {
            let mut c = case.clone();
            c.queues[i] = v;
            out.push(c);
        }
    }
    for i in 0..case.exchanges.len() {
        let x = &case.exchanges[i];
        if x.alternate.is_some() {
            let mut c = case.clone();
            c.exchanges[i].alternate = None;
            out.push(c);
        }
        if x.internal {
            let mut c = case.clone();
            c.exchanges[i].internal = false;
            out.push(c);
        }
    }
    // Message details.
    for (i, op) in case.ops.iter().enumerate() {
        if let Op::Publish { msg, mandatory, .. } = op {
            let mut simpler = Vec::new();
            let mut m = msg.clone();
            if !m.headers.is_empty() {
                m.headers.clear();
                simpler.push((m.clone(), *mandatory));
                m = msg.clone();
            }
            for field in 0..5 {
                let mut s = msg.clone();
                let changed = match field {
                    0 if !s.cc.is_empty() => {
                        s.cc.clear();
                        true
                    }
                    1 if !s.bcc.is_empty() => {
                        s.bcc.clear();
                        true
                    }
                    2 if s.priority.is_some() => {
                        s.priority = None;
                        true
                    }
                    3 if s.expiration.is_some() => {
                        s.expiration = None;
                        true
                    }
                    4 if s.properties => {
                        s.properties = false;
                        true
                    }
                    _ => false,
                };
                if changed {
                    simpler.push((s, *mandatory));
                }
            }
            if *mandatory {
                simpler.push((m, false));
            }
            for (s, mandatory) in simpler {
                let mut c = case.clone();
                if let Op::Publish {
                    msg, mandatory: mand, ..
                } = &mut c.ops[i]
                {
                    *msg = s;
                    *mand = mandatory;
                }
                out.push(c);
            }
        }
        if let Op::Consume { priority: Some(_), .. } = op {
            let mut c = case.clone();
            if let Op::Consume { priority, .. } = &mut c.ops[i] {
                *priority = None;
            }
            out.push(c);
        }
    }
    out
}

/// Prints both observation lists side by side from the first difference.
fn describe(case: &Case, o: &Outcome) -> String {
    let mut s = format!("case (DIFFTEST_CASE={}):\n{case:#?}\n", case.seed);
    if let Some(late) = o.rabbit.late_from {
        let _ = writeln!(s, "(RabbitMQ fell behind the timing guard from line {late} on)");
    }
    let (m, r) = (&o.memory.lines, &o.rabbit.lines);
    let first = m
        .iter()
        .zip(r.iter())
        .position(|(a, b)| a != b)
        .unwrap_or(m.len().min(r.len()));
    for (i, line) in m.iter().enumerate().take(first) {
        let _ = writeln!(s, "  same   [{i}] {line}");
    }
    for i in first..m.len().max(r.len()) {
        let _ = writeln!(s, "  memory [{i}] {}", m.get(i).map(String::as_str).unwrap_or("(none)"));
        let _ = writeln!(s, "  rabbit [{i}] {}", r.get(i).map(String::as_str).unwrap_or("(none)"));
    }
    s
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    Some(parsed.unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")))
}

fn random_seed() -> u64 {
    let id = switchyard_core::message::new_id();
    u64::from_str_radix(&id[..16], 16).expect("hex id")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_matches_rabbitmq_on_random_cases() {
    let settings = settings();
    let rabbit = match connect(&settings).await {
        Ok(t) => t,
        Err(e) => {
            switchyard_core::testkit::broker_unreachable::<()>(e);
            return;
        }
    };
    let mut h = Harness {
        settings,
        rabbit,
        runs: 0,
    };
    // (seed, cases) of this run; a single case when DIFFTEST_CASE is set.
    let single = env_u64("DIFFTEST_CASE");
    let mut plan: Vec<(u64, u64)> = Vec::new();
    if single.is_none() {
        match env_u64("DIFFTEST_SEED") {
            Some(seed) => plan.push((seed, env_u64("DIFFTEST_CASES").unwrap_or(DEFAULT_CASES))),
            None => {
                let cases = env_u64("DIFFTEST_CASES").unwrap_or(DEFAULT_CASES);
                plan.push((FIXED_SEED, cases));
                for _ in 0..env_u64("DIFFTEST_RANDOM_SEEDS").unwrap_or(3) {
                    plan.push((random_seed(), (cases / 4).max(1)));
                }
            }
        }
    }
    let verbose = std::env::var("DIFFTEST_VERBOSE").as_deref() == Ok("1");
    let started = Instant::now();
    let mut cases_run = 0u64;
    let (mut crowded_cases, mut prio_ttl_cases) = (0u64, 0u64);
    let mut ops_run = 0u64;
    let mut divergences: Vec<String> = Vec::new();
    let mut flaky = 0u64;
    let mut late = 0u64;
    let mut chained = 0u64;
    let mut cycles = 0u64;
    let mut work: Vec<(Option<u64>, u64)> = Vec::new();
    if let Some(cs) = single {
        work.push((None, cs));
    }
    for (seed, n) in &plan {
        eprintln!("difftest: seed {seed} ({n} cases): reproduce with DIFFTEST_SEED={seed} DIFFTEST_CASES={n}");
        for i in 0..*n {
            work.push((Some(*seed), case_seed(*seed, i)));
        }
    }
    for (seed, cs) in work {
        let case = gen_case(cs);
        cases_run += 1;
        ops_run += case.ops.len() as u64;
        let (crowded, ahead) = coverage(&case);
        crowded_cases += u64::from(crowded);
        prio_ttl_cases += u64::from(ahead);
        if cases_run % 250 == 0 {
            eprintln!(
                "difftest: {cases_run} cases so far, {} divergences, {:.0}s",
                divergences.len(),
                started.elapsed().as_secs_f64()
            );
        }
        if verbose {
            eprintln!("difftest: case {cs} ({} ops): {case:?}", case.ops.len());
        }
        let outcome = h.run(&case).await;
        if outcome.late_only() {
            late += 1;
        }
        if outcome.chained() {
            chained += 1;
        } else if outcome.memory.cycle || outcome.rabbit.cycle {
            cycles += 1;
        }
        if !outcome.diverges() {
            continue;
        }
        // Confirm: RabbitMQ must answer the same way again.
        let again = h.run(&case).await;
        if again.rabbit.lines != outcome.rabbit.lines || !again.diverges() {
            flaky += 1;
            eprintln!(
                "difftest: case {cs} (seed {seed:?}) diverged once but not reproducibly (timing); not counted:\n{}",
                describe(&case, &outcome)
            );
            continue;
        }
        eprintln!("difftest: case {cs} (seed {seed:?}) diverges; shrinking ...");
        let (small, o) = h.shrink(case, again).await;
        // How often the minimal case diverges when run again.
        let mut repeats = 0;
        for _ in 0..3 {
            if h.run(&small).await.diverges() {
                repeats += 1;
            }
        }
        let report = format!(
            "{}(the minimal case diverged again in {repeats} of 3 further runs)\n",
            describe(&small, &o)
        );
        if repeats == 0 {
            // A divergence must be reproducible: one that only showed while
            // shrinking (a busy shared broker) is reported, not counted.
            flaky += 1;
            eprintln!(
                "difftest: case {cs} (seed {seed:?}): the minimal case no longer diverges; not counted:\n{report}"
            );
            continue;
        }
        eprintln!("difftest: DIVERGENCE, minimal case:\n{report}");
        divergences.push(report);
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "difftest: coverage: {crowded_cases} cases with several consumers on a queue at once, {prio_ttl_cases} with \
         a message that has both a priority and a TTL"
    );
    eprintln!(
        "difftest: {cases_run} cases ({ops_run} ops, {} runs incl. confirmations and shrinking) in {secs:.1}s ({:.0} ms/case), {} divergences, {flaky} unreproducible, {late} differing only after RabbitMQ fell behind the timing guard, {chained} not compared (chained short TTLs); {cycles} compared cases went round a dead-letter cycle",
        h.runs,
        if cases_run > 0 { secs * 1000.0 / cases_run as f64 } else { 0.0 },
        divergences.len()
    );
    let _ = h.rabbit.close().await;
    assert!(
        divergences.is_empty(),
        "{} divergences between memory and RabbitMQ:\n{}",
        divergences.len(),
        divergences.join("\n")
    );
}
