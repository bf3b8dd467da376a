//! The ContextIQ roles as separate processes on RabbitMQ, operated with the
//! `switchyard` CLI: `cargo test --workspace --all-features --test contextiq_roles`
//! (it runs the `contextiq` example binary and the CLI binary that the
//! workspace build puts next to this test).
//!
//! Starts `events`, `consolidation-worker` and two `extraction-worker`s (each
//! with its ops endpoint) in a vhost of their own, publishes the requests
//! through the CLI, kills one extraction worker with SIGKILL mid-stream, then
//! checks with the CLI that every request produced its result, that nothing
//! is left in any queue but the results, and that `/readyz` reports the
//! surviving workers ready. Every request is counted (lost, duplicated).

mod common;
use common::rabbitmqctl;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const N: usize = 120;

fn bin_dir() -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_owned()
}

struct Vhost(String);

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").args(["delete_vhost", &self.0]).output();
    }
}

struct Role {
    name: String,
    child: Child,
    ops: Option<String>,
    lines: mpsc::Receiver<String>,
}

impl Drop for Role {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_role(url: &str, role: &str, label: &str) -> Role {
    let mut child = Command::new(bin_dir().join("examples").join("contextiq"))
        .args([role, "--transport", "lapin", "--ops", "127.0.0.1:0"])
        .env("RABBITMQ_URL", url)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the contextiq example is built (cargo test --workspace --all-features)");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut ops = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("{label} did not get ready"));
        if let Some(a) = l.strip_prefix("ops listening on http://") {
            ops = Some(a.to_owned());
        }
        if l.starts_with("ready") {
            break;
        }
    }
    Role {
        name: label.to_owned(),
        child,
        ops,
        lines: rx,
    }
}

/// `GET path` on `addr`: (status, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the ops endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Runs the CLI; (exit code, stdout).
fn cli(url: &str, args: &[&str], stdin: Option<&str>) -> (i32, String) {
    let mut c = Command::new(bin_dir().join("switchyard"))
        .arg("--url")
        .arg(url)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the switchyard CLI is built (cargo test --workspace)");
    if let Some(input) = stdin {
        c.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    let out = c.wait_with_output().unwrap();
    if !out.status.success() {
        eprintln!("switchyard {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Takes every message of `queue` with the CLI (`consume --json`, acking):
/// the JSON bodies.
fn drain(url: &str, queue: &str) -> Vec<serde_json::Value> {
    let (code, out) = cli(url, &["--json", "consume", queue, "--idle", "2"], None);
    assert_eq!(code, 0, "consume {queue}");
    out.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["body"].clone())
        .collect()
}

#[test]
fn roles_as_processes_survive_a_killed_worker() {
    if std::net::TcpStream::connect(("127.0.0.1", 5672)).is_err() {
        if switchyard_core::testkit::rabbitmq_required() {
            panic!("RabbitMQ unreachable and SWITCHYARD_REQUIRE_RABBITMQ=1");
        }
        println!("skipped: RabbitMQ unreachable");
        return;
    }
    let vhost = format!("sy-roles-{}", std::process::id());
    rabbitmqctl(&["add_vhost", &vhost]);
    let _vhost = Vhost(vhost.clone());
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let url = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");

    let events = start_role(&url, "events", "events");
    let consolidation = start_role(&url, "consolidation-worker", "consolidation-worker");
    let mut doomed = start_role(&url, "extraction-worker", "extraction-worker A");
    let survivor = start_role(&url, "extraction-worker", "extraction-worker B");

    // The requests, through the CLI: one JSON per line, 100 ms of work each.
    let lines: String = (0..N)
        .map(|i| format!("{{\"session_id\":\"req-{i}\",\"user_id\":\"u\",\"work_ms\":100}}\n"))
        .collect();
    let (code, _) = cli(
        &url,
        &[
            "publish",
            "contextiq.extraction",
            "extraction.request",
            "--lines",
            "--content-type",
            "application/json",
        ],
        Some(&lines),
    );
    assert_eq!(code, 0, "publish through the CLI");

    // Mid-stream: two workers × 4 handlers × 100 ms — SIGKILL one after ~0.5 s.
    std::thread::sleep(Duration::from_millis(500));
    doomed.child.kill().unwrap(); // SIGKILL
    let _ = doomed.child.wait();
    let killed_at = Instant::now();

    // Every request produces its result (a killed worker's unacked requests
    // are redelivered to the survivor; a result it had published before
    // dying may come twice).
    let mut results: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while results.len() < N && Instant::now() < deadline {
        for body in drain(&url, "extraction.results") {
            if let Some(id) = body["session_id"].as_str() {
                *results.entry(id.to_owned()).or_default() += 1;
            }
        }
    }
    let unique = results.len();
    let duplicates: usize = results.values().map(|n| n - 1).sum();
    let lost: Vec<String> = (0..N)
        .map(|i| format!("req-{i}"))
        .filter(|id| !results.contains_key(id))
        .collect();

    // Nothing left but results downstream consumers would read.
    std::thread::sleep(Duration::from_secs(1));
    let mut left = Vec::new();
    for q in [
        "extraction.requests",
        "consolidation.requests",
        "memory.events",
        "session.events",
        "dead_letter",
    ] {
        let (code, out) = cli(&url, &["--json", "get", q, "--requeue"], None);
        assert!(code == 0 || code == 1, "get {q}: exit {code}");
        let n = out.lines().filter(|l| l.trim_start().starts_with('{')).count();
        left.push((q, n));
    }
    let consolidation_results = drain(&url, "consolidation.results").len();

    // The survivors are ready.
    let mut ready = Vec::new();
    for r in [&events, &consolidation, &survivor] {
        let (status, body) = http_get(r.ops.as_deref().expect("ops endpoint"), "/readyz");
        ready.push((r.name.clone(), status, body.trim().to_owned()));
    }
    println!(
        "contextiq roles: {N} requests published through the CLI, worker A SIGKILLed mid-stream; \
         {unique}/{N} results ({duplicates} duplicates, {} lost) within {:?} of the kill; \
         {consolidation_results} consolidation results; left in queues: {left:?}; readyz: {ready:?}",
        lost.len(),
        killed_at.elapsed()
    );

    // Graceful stop of the rest: SIGTERM, exit 0.
    for r in [events, consolidation, survivor] {
        let pid = r.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let mut r = r;
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = r.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "{} did not stop on SIGTERM", r.name);
            std::thread::sleep(Duration::from_millis(20));
        };
        let said: HashSet<String> = r.lines.try_iter().collect();
        assert!(status.success(), "{} exited with {status}", r.name);
        assert!(said.contains("stopped"), "{} did not stop gracefully: {said:?}", r.name);
    }

    assert!(lost.is_empty(), "requests without a result: {lost:?}");
    assert!(
        consolidation_results >= N,
        "consolidation results: {consolidation_results}"
    );
    for (q, n) in &left {
        assert_eq!(*n, 0, "{q} still holds messages");
    }
    for (name, status, body) in &ready {
        assert_eq!(*status, 200, "{name} not ready: {body}");
    }
}
