//! The `switchyard` binary, run as users run it, against RabbitMQ (and the
//! in-process broker where it applies). Tests that need RabbitMQ skip when
//! it is unreachable, and fail when SWITCHYARD_REQUIRE_RABBITMQ=1.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use switchyard::{
    Binding, ConsumeOptions, Destination, ExchangeSpec, Message, QueueSpec, Settings, Transport, TransportKind,
};
use switchyard_cli::topo::TopologyFile;
use switchyard_core::testkit::broker_unreachable;

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\nstdout: {}\nstderr: {}",
            self.code, self.stdout, self.stderr
        )
    }
}

async fn run_with(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Out {
    use tokio::io::AsyncWriteExt;
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(args)
        .env("RABBITMQ_URL", switchyard_core::testkit::rabbitmq_url())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run the switchyard binary");
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).await.unwrap();
    }
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command finished within 60 s")
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn run(args: &[&str]) -> Out {
    run_with(args, &[], None).await
}

/// A one-line error on stderr with exit code `code`.
fn assert_error(out: &Out, code: i32, needle: &str) {
    assert_eq!(out.code, code, "{out:?}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected: {out:?}");
    assert!(lines[0].starts_with("error: "), "{out:?}");
    assert!(out.stderr.contains(needle), "expected '{needle}': {out:?}");
}

fn name(tag: &str) -> String {
    format!("cli-test-{tag}-{}", std::process::id())
}

/// A lapin connection to the test broker (and a reachable management API),
/// or `None` (skip) when absent; panics when SWITCHYARD_REQUIRE_RABBITMQ=1.
async fn broker() -> Option<Arc<dyn Transport>> {
    let settings = Settings::from_env()
        .unwrap()
        .with_url(switchyard_core::testkit::rabbitmq_url())
        .with_transport(TransportKind::Lapin);
    let t = match switchyard::connect(&settings).await {
        Ok(t) => t,
        Err(e) => return broker_unreachable(e),
    };
    let host = settings.endpoint().unwrap().host;
    if let Err(e) = tokio::net::TcpStream::connect((host.as_str(), 15672)).await {
        return broker_unreachable(format!(
            "management API: {e} (enable it with `rabbitmq-plugins enable rabbitmq_management`)"
        ));
    }
    Some(t)
}

async fn temp_queue(t: &Arc<dyn Transport>, q: &str) {
    t.delete_queue(q).await.unwrap();
    t.declare_queue(&QueueSpec::new(q).durable(false)).await.unwrap();
}

fn json_lines(s: &str) -> Vec<Value> {
    s.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn publish_then_get_prints_typed_headers_properties_and_json_body() {
    let Some(t) = broker().await else { return };
    let q = name("publish-get");
    temp_queue(&t, &q).await;
    let out = run(&[
        "publish",
        "",
        &q,
        r#"{"session_id":"s-1","n":2}"#,
        "--header",
        "tenant=acme",
        "--header",
        "n:int=5",
        "--header",
        "ok:bool=true",
        "--header",
        "f:float=1.5",
        "--priority",
        "3",
        "--correlation-id",
        "c-1",
        "--message-id",
        "m-1",
        "--transient",
        "--count",
        "3",
    ])
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("published 3 message(s)"), "{out:?}");
    let out = run(&["get", &q, "--count", "2", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let msgs = json_lines(&out.stdout);
    assert_eq!(msgs.len(), 2, "{out:?}");
    let m = &msgs[0];
    assert_eq!(m["headers"]["tenant"], "acme");
    assert_eq!(m["headers"]["n"], 5);
    assert_eq!(m["headers"]["ok"], true);
    assert_eq!(m["headers"]["f"], 1.5);
    assert_eq!(m["body"]["session_id"], "s-1");
    assert_eq!(m["body_encoding"], "json");
    assert_eq!(m["properties"]["priority"], 3);
    assert_eq!(m["properties"]["correlation_id"], "c-1");
    assert_eq!(m["properties"]["message_id"], "m-1");
    assert_eq!(m["properties"]["persistent"], false);
    assert_eq!(m["properties"]["content_type"], "application/json");
    assert_eq!(m["message_count"], 2);
    // the human form: typed headers, pretty JSON body
    let out = run(&["get", &q]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("n = 5 (int)"), "{out:?}");
    assert!(out.stdout.contains("\"session_id\": \"s-1\""), "{out:?}");
    assert_eq!(t.queue_info(&q).await.unwrap().message_count, 0, "get acks by default");
    let out = run(&["get", &q, "--json"]).await;
    assert_eq!((out.code, out.stdout.trim()), (0, ""), "{out:?}");
    t.delete_queue(&q).await.unwrap();
}

#[tokio::test]
async fn publish_lines_and_files_then_consume_with_requeue_reject_and_ack() {
    let Some(t) = broker().await else { return };
    let q = name("lines");
    temp_queue(&t, &q).await;
    let out = run_with(&["publish", "", &q, "--lines"], &[], Some("one\ntwo\n\nthree\n")).await;
    assert_eq!(out.code, 0, "{out:?}");
    let file = std::env::temp_dir().join(format!("{q}.json"));
    std::fs::write(&file, "[1,2,3]").unwrap();
    let out = run(&["publish", "", &q, "--file", file.to_str().unwrap()]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(t.queue_info(&q).await.unwrap().message_count, 4);
    // --requeue: seen, then put back
    let out = run(&["consume", &q, "--count", "4", "--requeue", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let bodies: Vec<Value> = json_lines(&out.stdout).iter().map(|m| m["body"].clone()).collect();
    assert_eq!(
        bodies,
        vec![
            Value::from("one"),
            "two".into(),
            "three".into(),
            serde_json::json!([1, 2, 3])
        ]
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.queue_info(&q).await.unwrap().message_count, 4, "requeued");
    // --reject drops (no dead-letter exchange here), --ack takes
    let out = run(&["consume", &q, "--count", "1", "--reject"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("one"), "{out:?}");
    let out = run(&["consume", &q, "--count", "3", "--idle", "5"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.queue_info(&q).await.unwrap().message_count, 0);
    std::fs::remove_file(file).ok();
    t.delete_queue(&q).await.unwrap();
}

#[tokio::test]
async fn malformed_headers_and_bad_arguments_are_usage_errors() {
    for h in ["n:int=abc", "novalue", "k:date=1", "b:bool=maybe"] {
        let out = run(&["publish", "x", "y", "body", "--header", h]).await;
        assert_error(&out, 2, h);
        assert!(out.stderr.contains("k:int=5"), "says how: {out:?}");
    }
    let out = run(&["publish", "x", "y", "body", "--transport", "memory"]).await;
    assert_error(&out, 2, "bench");
    let out = run(&["dlq", "replay", "dl"]).await;
    assert_error(&out, 2, "--all");
    let out = run(&["no-such-command"]).await;
    assert_eq!(out.code, 2, "{out:?}");
}

#[tokio::test]
async fn an_unreachable_broker_fails_without_printing_the_password() {
    let out = run_with(
        &["get", "q", "--url", "amqp://someone:sekret-pw@127.0.0.1:1/"],
        &[("RABBITMQ_CONNECTION_ATTEMPTS", "1")],
        None,
    )
    .await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        !out.stderr.contains("sekret-pw") && !out.stdout.contains("sekret-pw"),
        "{out:?}"
    );
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
}

#[tokio::test]
async fn an_unknown_queue_is_a_usage_error() {
    let Some(_t) = broker().await else { return };
    let q = name("missing");
    for args in [
        vec!["get", q.as_str()],
        vec!["consume", q.as_str(), "--count", "1"],
        vec!["dlq", "list", q.as_str()],
    ] {
        let out = run(&args).await;
        assert_error(&out, 2, "not found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_prints_the_reply_and_its_latency_and_times_out_with_exit_1() {
    let Some(t) = broker().await else { return };
    let q = name("rpc");
    temp_queue(&t, &q).await;
    let mut sub = t.consume(&q, ConsumeOptions::default()).await.unwrap();
    let server = t.clone();
    let responder = tokio::spawn(async move {
        while let Some(Ok(d)) = sub.next().await {
            let reply_to = d.message.properties.reply_to.clone().unwrap();
            let mut reply = Message::new(format!("{{\"echo\":{}}}", String::from_utf8_lossy(&d.message.body)))
                .with_content_type("application/json");
            reply.properties.correlation_id = d.message.properties.correlation_id.clone();
            server.publish(&Destination::queue(reply_to), reply).await.unwrap();
            d.ack().await.unwrap();
        }
    });
    let out = run(&["rpc", "", &q, r#"{"x":1}"#, "--timeout", "10", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["reply"]["body"]["echo"]["x"], 1, "{out:?}");
    assert!(v["latency_ms"].as_f64().unwrap() > 0.0);
    let out = run(&["rpc", "", &q, "ping", "--timeout", "10"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("latency: "), "{out:?}");
    responder.abort();
    let silent = name("rpc-silent");
    temp_queue(&t, &silent).await;
    let out = run(&["rpc", "", &silent, "ping", "--timeout", "0.5"]).await;
    assert_error(&out, 1, "timed out");
    t.delete_queue(&q).await.unwrap();
    t.delete_queue(&silent).await.unwrap();
}

/// An exchange `ex` with a queue `work` (dead-lettering by RabbitMQ to
/// `dlx`) and a dead-letter queue `dl` bound to `dlx`.
async fn dlq_setup(t: &Arc<dyn Transport>, tag: &str) -> (String, String, String) {
    let (ex, dlx, work, dl) = (
        name(&format!("{tag}-ex")),
        name(&format!("{tag}-dlx")),
        name(&format!("{tag}-work")),
        name(&format!("{tag}-dl")),
    );
    t.delete_queue(&work).await.unwrap();
    t.delete_queue(&dl).await.unwrap();
    t.declare_exchange(&ExchangeSpec::direct(&ex).durable(false))
        .await
        .unwrap();
    t.declare_exchange(&ExchangeSpec::direct(&dlx).durable(false))
        .await
        .unwrap();
    t.declare_queue(&QueueSpec::new(&work).durable(false).dead_letter(&dlx, Some("dl")))
        .await
        .unwrap();
    t.declare_queue(&QueueSpec::new(&dl).durable(false)).await.unwrap();
    t.bind(&Binding::queue(&work, &ex, "work")).await.unwrap();
    t.bind(&Binding::queue(&dl, &dlx, "dl")).await.unwrap();
    (ex, work, dl)
}

fn switchyard_dead_letter(id: &str, exchange: &str, error: &str) -> Message {
    Message::new(format!("{{\"id\":\"{id}\"}}"))
        .with_message_id(id)
        .with_header("x-error", error)
        .with_header("x-error-kind", "permanent")
        .with_header("x-original-exchange", exchange)
        .with_header("x-original-routing-key", "work")
        .with_header("x-original-queue", "work")
        .with_header("x-retry-count", switchyard::HeaderValue::I64(2))
}

#[tokio::test]
async fn dlq_lists_shows_replays_and_purges_dead_letters() {
    let Some(t) = broker().await else { return };
    let (ex, work, dl) = dlq_setup(&t, "dlq").await;
    let to_dl = Destination::queue(dl.clone());
    t.publish(&to_dl, switchyard_dead_letter("m-1", &ex, "no such customer"))
        .await
        .unwrap();
    t.publish(&to_dl, switchyard_dead_letter("m-2", &ex, "bad amount"))
        .await
        .unwrap();
    // one dead-lettered by RabbitMQ itself: rejected from `work`
    t.publish(
        &Destination::new(ex.clone(), "work"),
        Message::new("rejected").with_message_id("m-3"),
    )
    .await
    .unwrap();
    let out = run(&["get", &work, "--reject"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.queue_info(&dl).await.unwrap().message_count, 3);

    let out = run(&["dlq", "list", &dl, "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let list: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 3, "{out:?}");
    assert_eq!(list[0]["message_id"], "m-1");
    assert_eq!(list[0]["reason"], "permanent: no such customer");
    assert_eq!(list[0]["origin"], format!("{ex}/work"));
    assert_eq!(list[0]["retries"], 2);
    assert!(list[2]["reason"].as_str().unwrap().starts_with("rejected"), "{list:?}");
    assert_eq!(list[2]["origin"], format!("{ex}/work"));
    let out = run(&["dlq", "list", &dl]).await;
    assert!(
        out.stdout.contains("no such customer") && out.stdout.contains("3 dead letter(s)"),
        "{out:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.queue_info(&dl).await.unwrap().message_count, 3, "listing leaves them");

    let out = run(&["dlq", "show", &dl, "--id", "m-2"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("bad amount") && out.stdout.contains("\"id\": \"m-2\""),
        "{out:?}"
    );
    let out = run(&["dlq", "show", &dl, "--id", "nope"]).await;
    assert_error(&out, 2, "dlq list");

    // replay by id, then by RabbitMQ's reason
    let out = run(&["dlq", "replay", &dl, "--id", "m-1"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = run(&["dlq", "replay", &dl, "--reason", "rejected", "--json"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(t.queue_info(&dl).await.unwrap().message_count, 1);
    let out = run(&["get", &work, "--count", "2", "--json"]).await;
    let back = json_lines(&out.stdout);
    assert_eq!(back.len(), 2, "{out:?}");
    assert_eq!(back[0]["properties"]["message_id"], "m-1");
    assert!(
        back[0]["headers"].get("x-error").is_none(),
        "dead-letter headers stripped: {out:?}"
    );
    assert_eq!(back[1]["properties"]["message_id"], "m-3");
    assert!(back[1]["headers"].get("x-death").is_none(), "{out:?}");

    let out = run(&["dlq", "purge", &dl]).await;
    assert_error(&out, 2, "--yes");
    assert_eq!(
        t.queue_info(&dl).await.unwrap().message_count,
        1,
        "nothing purged without --yes"
    );
    let out = run(&["dlq", "purge", &dl, "--yes"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert_eq!(t.queue_info(&dl).await.unwrap().message_count, 0);
    t.delete_queue(&work).await.unwrap();
    t.delete_queue(&dl).await.unwrap();
}

#[tokio::test]
async fn a_failed_replay_leaves_the_dead_letter_where_it_was() {
    let Some(t) = broker().await else { return };
    let (ex, work, dl) = dlq_setup(&t, "replay-fail").await;
    let to_dl = Destination::queue(dl.clone());
    let missing = name("no-such-exchange");
    t.publish(&to_dl, switchyard_dead_letter("lost", &missing, "boom"))
        .await
        .unwrap();
    t.publish(&to_dl, switchyard_dead_letter("fine", &ex, "boom"))
        .await
        .unwrap();
    let out = run(&["dlq", "replay", &dl, "--all"]).await;
    assert_error(&out, 2, "not found");
    assert!(out.stderr.contains("lost") && out.stderr.contains("left in"), "{out:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        t.queue_info(&dl).await.unwrap().message_count,
        1,
        "the failed one stays"
    );
    assert_eq!(
        t.queue_info(&work).await.unwrap().message_count,
        1,
        "the good one went back"
    );
    let out = run(&["dlq", "list", &dl, "--json"]).await;
    let list: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(list[0]["message_id"], "lost", "{out:?}");
    assert_eq!(list[0]["reason"], "permanent: boom");
    t.delete_queue(&work).await.unwrap();
    t.delete_queue(&dl).await.unwrap();
}

fn contextiq_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/contextiq.topology.toml")
}

#[test]
fn the_contextiq_topology_file_matches_the_example() {
    use switchyard::Topology;
    const DLX: &str = "contextiq.dlx";
    let q = |name: &str| QueueSpec::new(name).dead_letter(DLX, Some("dead_letter"));
    let expected = Topology::new()
        .exchange(ExchangeSpec::topic("contextiq.extraction"))
        .exchange(ExchangeSpec::topic("contextiq.consolidation"))
        .exchange(ExchangeSpec::topic("contextiq.events"))
        .exchange(ExchangeSpec::topic(DLX));
    let expected = expected
        .queue(q("extraction.requests").max_priority(10))
        .queue(q("extraction.results"))
        .queue(q("consolidation.requests"))
        .queue(q("consolidation.results"))
        .queue(q("session.events"))
        .queue(q("memory.events"))
        .queue(q("webhooks.session-created"))
        .queue(QueueSpec::new("dead_letter"))
        .binding(Binding::queue(
            "extraction.requests",
            "contextiq.extraction",
            "extraction.request",
        ))
        .binding(Binding::queue(
            "extraction.results",
            "contextiq.extraction",
            "extraction.result",
        ))
        .binding(Binding::queue(
            "consolidation.requests",
            "contextiq.consolidation",
            "consolidation.request",
        ))
        .binding(Binding::queue(
            "consolidation.results",
            "contextiq.consolidation",
            "consolidation.result",
        ))
        .binding(Binding::queue("session.events", "contextiq.events", "session.*"))
        .binding(Binding::queue("memory.events", "contextiq.events", "memory.*"))
        .binding(Binding::queue(
            "webhooks.session-created",
            "contextiq.events",
            "session.created",
        ))
        .binding(Binding::queue("dead_letter", DLX, "dead_letter"));
    let file = TopologyFile::load(&contextiq_file()).unwrap();
    assert_eq!(file.to_topology().unwrap(), expected);
}

#[tokio::test]
async fn unparsable_or_unreadable_topology_files_are_usage_errors() {
    let bad = std::env::temp_dir().join(format!("{}.toml", name("bad-topology")));
    std::fs::write(
        &bad,
        "[[queues]]\nname = \"q\"\narguments = { \"x-max-priority\" = \"high\" }\n",
    )
    .unwrap();
    for sub in ["apply", "diff"] {
        let out = run(&["topology", sub, bad.to_str().unwrap()]).await;
        assert_error(&out, 2, "x-max-priority");
    }
    std::fs::write(&bad, "this is [not toml").unwrap();
    let out = run(&["topology", "apply", bad.to_str().unwrap()]).await;
    assert_error(&out, 2, "not a valid topology file");
    let out = run(&["topology", "apply", "/nonexistent/topology.toml"]).await;
    assert_error(&out, 2, "cannot read topology file");
    std::fs::remove_file(bad).ok();
}

#[tokio::test]
async fn a_missing_management_plugin_is_a_usage_error_that_says_what_to_do() {
    let env = [("RABBITMQ_MANAGEMENT_URL", "http://127.0.0.1:1")];
    for args in [
        vec!["queues"],
        vec!["topology", "export"],
        vec!["topology", "diff", contextiq_file().to_str().unwrap()],
    ] {
        let out = run_with(&args, &env, None).await;
        assert_error(&out, 2, "rabbitmq-plugins enable rabbitmq_management");
    }
}

/// A fresh vhost on the test broker (so that the contextiq names do not
/// meet other tests'), removed on drop.
struct Vhost {
    mgmt: switchyard_cli::mgmt::Management,
    name: String,
    url: String,
}

impl Vhost {
    async fn create(tag: &str) -> Vhost {
        let base = Settings::from_env()
            .unwrap()
            .with_url(switchyard_core::testkit::rabbitmq_url());
        let ep = base.endpoint().unwrap();
        let mgmt = switchyard_cli::mgmt::Management::from_settings(&base).unwrap();
        let name = name(tag);
        let vh = switchyard::settings::percent_encode(&name);
        mgmt.put_json(&format!("/api/vhosts/{vh}"), &serde_json::json!({}))
            .await
            .unwrap();
        mgmt.put_json(
            &format!(
                "/api/permissions/{vh}/{}",
                switchyard::settings::percent_encode(&ep.user)
            ),
            &serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await
        .unwrap();
        let url = format!(
            "amqp://{}:{}@{}:{}/{vh}",
            ep.user,
            ep.password.expose(),
            ep.host,
            ep.port
        );
        Vhost { mgmt, name, url }
    }

    async fn drop_it(self) {
        let _ = self
            .mgmt
            .delete(&format!(
                "/api/vhosts/{}",
                switchyard::settings::percent_encode(&self.name)
            ))
            .await;
    }
}

#[tokio::test]
async fn contextiq_topology_apply_then_diff_shows_nothing_and_export_round_trips() {
    let Some(_t) = broker().await else { return };
    let vhost = Vhost::create("topology").await;
    let env = [("RABBITMQ_URL", vhost.url.as_str())];
    let file = contextiq_file();
    let file = file.to_str().unwrap();
    let out = run_with(&["topology", "diff", file, "--json"], &env, None).await;
    assert_eq!(out.code, 1, "differences before apply: {out:?}");
    let diffs: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(diffs.as_array().unwrap().len(), 4 + 8 + 8, "{out:?}");
    assert!(diffs.as_array().unwrap().iter().all(|d| d["status"] == "missing"));

    let out = run_with(&["topology", "apply", file], &env, None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(
        out.stdout.contains("declared 4 exchange(s), 8 queue(s), 8 binding(s)"),
        "{out:?}"
    );
    let out = run_with(&["topology", "diff", file], &env, None).await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("no differences"), "{out:?}");
    let out = run_with(&["topology", "diff", file, "--all"], &env, None).await;
    assert_eq!(out.code, 0, "nothing else in the vhost: {out:?}");

    // export writes a file that diffs clean and equals the original
    let exported = std::env::temp_dir().join(format!("{}.toml", name("exported")));
    let out = run_with(&["topology", "export", "-o", exported.to_str().unwrap()], &env, None).await;
    assert_eq!(out.code, 0, "{out:?}");
    let out = run_with(&["topology", "diff", exported.to_str().unwrap(), "--all"], &env, None).await;
    assert_eq!(out.code, 0, "{out:?}");
    let mut a = TopologyFile::load(&exported).unwrap().to_topology().unwrap();
    let mut b = TopologyFile::load(&contextiq_file()).unwrap().to_topology().unwrap();
    for t in [&mut a, &mut b] {
        t.exchanges.sort_by(|x, y| x.name.cmp(&y.name));
        t.queues.sort_by(|x, y| x.name.cmp(&y.name));
        t.bindings
            .sort_by(|x, y| (&x.source, &x.destination).cmp(&(&y.source, &y.destination)));
    }
    assert_eq!(a, b);

    // a mismatched argument: diff names it, apply refuses with exit 2
    let text = std::fs::read_to_string(contextiq_file())
        .unwrap()
        .replace("\"x-max-priority\" = 10", "\"x-max-priority\" = 5");
    std::fs::write(&exported, text).unwrap();
    let out = run_with(&["topology", "diff", exported.to_str().unwrap()], &env, None).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains("mismatched") && out.stdout.contains("x-max-priority: file 5, broker 10"),
        "{out:?}"
    );
    assert!(out.stdout.contains("PRECONDITION_FAILED"), "{out:?}");
    let out = run_with(&["topology", "apply", exported.to_str().unwrap()], &env, None).await;
    assert_error(&out, 2, "topology diff");

    // an extra binding on a queue of the file
    let settings = Settings::from_env()
        .unwrap()
        .with_url(vhost.url.clone())
        .with_transport(TransportKind::Lapin);
    let t = switchyard::connect(&settings).await.unwrap();
    t.bind(&Binding::queue("session.events", "contextiq.events", "audit.#"))
        .await
        .unwrap();
    let out = run_with(&["topology", "diff", file], &env, None).await;
    assert_eq!(out.code, 1, "{out:?}");
    assert!(
        out.stdout.contains("extra") && out.stdout.contains("audit.#"),
        "{out:?}"
    );
    std::fs::remove_file(exported).ok();
    drop(t);
    vhost.drop_it().await;
}

#[tokio::test]
async fn queues_shows_depth_and_consumers() {
    let Some(t) = broker().await else { return };
    let q = name("depth");
    temp_queue(&t, &q).await;
    let out = run(&["publish", "", &q, "x", "--count", "3"]).await;
    assert_eq!(out.code, 0, "{out:?}");
    let _sub = t.consume(&q, ConsumeOptions::default().prefetch(1)).await.unwrap();
    let mut last = Out {
        code: -1,
        stdout: String::new(),
        stderr: String::new(),
    };
    for _ in 0..40 {
        last = run(&["queues", &q, "--json"]).await;
        assert_eq!(last.code, 0, "{last:?}");
        let v: Value = serde_json::from_str(last.stdout.trim()).unwrap();
        let row = &v[0];
        if row["ready"] == 2 && row["unacked"] == 1 && row["consumers"] == 1 {
            let human = run(&["queues", &q]).await;
            assert!(human.stdout.contains("READY") && human.stdout.contains(&q), "{human:?}");
            drop(_sub);
            t.delete_queue(&q).await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the management API never showed 2 ready, 1 unacked, 1 consumer: {last:?}");
}

fn check_bench(out: &Out, transport: &str) {
    assert_eq!(out.code, 0, "{out:?}");
    let v: Value = serde_json::from_str(out.stdout.trim()).unwrap();
    assert_eq!(v["transport"], transport);
    let sent = v["sent"].as_u64().unwrap();
    assert!(sent > 0, "{out:?}");
    assert_eq!(v["received"].as_u64().unwrap(), sent, "{out:?}");
    let l = &v["latency_ms"];
    let (p50, p95, p99, max) = (
        l["p50"].as_f64().unwrap(),
        l["p95"].as_f64().unwrap(),
        l["p99"].as_f64().unwrap(),
        l["max"].as_f64().unwrap(),
    );
    assert!(p50 <= p95 && p95 <= p99 && p99 <= max, "{out:?}");
}

#[tokio::test]
async fn bench_on_memory_reports_throughput_and_latency_percentiles() {
    let out = run(&[
        "bench",
        "--transport",
        "memory",
        "--duration",
        "0.5",
        "--size",
        "64",
        "--json",
    ])
    .await;
    check_bench(&out, "memory");
    let out = run(&[
        "bench",
        "--transport",
        "memory",
        "--duration",
        "0.3",
        "--producers",
        "2",
        "--consumers",
        "2",
    ])
    .await;
    assert_eq!(out.code, 0, "{out:?}");
    assert!(out.stdout.contains("latency ms: p50"), "{out:?}");
    let out = run(&["bench", "--transport", "memory", "--size", "4"]).await;
    assert_error(&out, 2, "--size");
}

#[tokio::test]
async fn bench_on_rabbitmq_with_both_clients() {
    let Some(_t) = broker().await else { return };
    for (transport, extra) in [("lapin", "--persistent"), ("amqprs", "--auto-ack")] {
        let out = run(&[
            "bench",
            "--transport",
            transport,
            "--duration",
            "0.5",
            "--producers",
            "2",
            "--consumers",
            "2",
            "--rate",
            "500",
            extra,
            "--json",
        ])
        .await;
        check_bench(&out, transport);
    }
}
