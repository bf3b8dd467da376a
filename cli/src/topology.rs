//! `switchyard topology apply|diff|export`.

use serde::Serialize;
use serde_json::{json, Value};

use crate::args::{Global, TopologyCommand};
use crate::connect;
use crate::error::{CliError, CliResult, EXIT_FAILURE, EXIT_OK};
use crate::mgmt::Management;
use crate::topo::{arguments_eq, value_eq, Arguments, BindingDef, ExchangeDef, QueueDef, TopologyFile};
use switchyard::settings::percent_encode;

fn arguments(v: &Value) -> Arguments {
    v.get("arguments")
        .and_then(Value::as_object)
        .map(|o| o.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

fn text(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or_default().to_owned()
}

fn flag(v: &Value, k: &str) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(false)
}

/// Exchanges the broker makes itself (the default exchange, `amq.*`).
pub fn builtin_exchange(name: &str) -> bool {
    name.is_empty() || name.starts_with("amq.")
}

/// Reads the live topology of the vhost through the management API.
/// Built-in exchanges, exclusive and server-named queues, and the default
/// exchange's implicit bindings are left out.
pub async fn live(m: &Management, vhost: &str) -> CliResult<TopologyFile> {
    let vh = percent_encode(vhost);
    let list = |v: Value, what: &str| -> CliResult<Vec<Value>> {
        match v {
            Value::Array(a) => Ok(a),
            _ => Err(CliError::failure(format!(
                "the management API's {what} list is not a JSON array"
            ))),
        }
    };
    let exchanges = list(m.get_json(&format!("/api/exchanges/{vh}")).await?, "exchange")?;
    let queues = list(m.get_json(&format!("/api/queues/{vh}")).await?, "queue")?;
    let bindings = list(m.get_json(&format!("/api/bindings/{vh}")).await?, "binding")?;
    let mut t = TopologyFile::default();
    for e in exchanges {
        let name = text(&e, "name");
        if builtin_exchange(&name) {
            continue;
        }
        t.exchanges.push(ExchangeDef {
            kind: text(&e, "type"),
            durable: flag(&e, "durable"),
            auto_delete: flag(&e, "auto_delete"),
            internal: flag(&e, "internal"),
            arguments: arguments(&e),
            name,
        });
    }
    for q in queues {
        let name = text(&q, "name");
        if flag(&q, "exclusive") || name.starts_with("amq.") {
            continue;
        }
        t.queues.push(QueueDef {
            durable: flag(&q, "durable"),
            exclusive: false,
            auto_delete: flag(&q, "auto_delete"),
            arguments: arguments(&q),
            name,
        });
    }
    let queue_names: Vec<&str> = t.queues.iter().map(|q| q.name.as_str()).collect();
    let mut kept = Vec::new();
    for b in bindings {
        let source = text(&b, "source");
        let destination = text(&b, "destination");
        let destination_type = text(&b, "destination_type");
        if source.is_empty() || (destination_type == "queue" && !queue_names.contains(&destination.as_str())) {
            continue;
        }
        kept.push(BindingDef {
            source,
            destination,
            destination_type,
            routing_key: text(&b, "routing_key"),
            arguments: arguments(&b),
        });
    }
    t.bindings = kept;
    t.exchanges.sort_by(|a, b| a.name.cmp(&b.name));
    t.queues.sort_by(|a, b| a.name.cmp(&b.name));
    t.bindings
        .sort_by(|a, b| (&a.source, &a.destination, &a.routing_key).cmp(&(&b.source, &b.destination, &b.routing_key)));
    Ok(t)
}

/// One difference between a file and the broker.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    /// `missing` (in the file, not on the broker), `extra` (on the broker,
    /// not in the file) or `mismatched` (both, declared differently: a
    /// declare would fail with PRECONDITION_FAILED).
    pub status: &'static str,
    /// `exchange`, `queue` or `binding`.
    pub what: &'static str,
    /// The name (for a binding: `source -> destination [key]`).
    pub name: String,
    /// What differs.
    pub detail: String,
}

fn binding_name(b: &BindingDef) -> String {
    let kind = if b.destination_type == "exchange" {
        " (exchange)"
    } else {
        ""
    };
    format!("{} -> {}{kind} [{}]", b.source, b.destination, b.routing_key)
}

fn same_binding(a: &BindingDef, b: &BindingDef) -> bool {
    a.source == b.source
        && a.destination == b.destination
        && a.destination_type == b.destination_type
        && a.routing_key == b.routing_key
        && arguments_eq(&a.arguments, &b.arguments)
}

fn show(v: Option<&Value>) -> String {
    v.map(Value::to_string).unwrap_or_else(|| "(unset)".into())
}

/// The argument-by-argument differences, `file` against `live`. A queue's
/// absent `x-queue-type` counts as `classic`.
fn argument_differences(file: &Arguments, live: &Arguments, queue: bool) -> Vec<String> {
    let norm = |a: &Arguments| {
        let mut a = a.clone();
        if queue && !a.contains_key("x-queue-type") {
            a.insert("x-queue-type".into(), json!("classic"));
        }
        a
    };
    let (f, l) = (norm(file), norm(live));
    let mut keys: Vec<&String> = f.keys().chain(l.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| match (f.get(*k), l.get(*k)) {
            (Some(a), Some(b)) => !value_eq(a, b),
            _ => true,
        })
        .map(|k| format!("{k}: file {}, broker {}", show(f.get(k)), show(l.get(k))))
        .collect()
}

/// Compares `file` with `live`. Extras are the bindings from or to an
/// entity of the file that the file does not list, plus (with `all`) every
/// exchange and queue of the vhost the file does not name.
pub fn diff(file: &TopologyFile, live: &TopologyFile, all: bool) -> Vec<Difference> {
    let mut out = Vec::new();
    let mut d = |status, what, name: String, detail: String| {
        out.push(Difference {
            status,
            what,
            name,
            detail,
        })
    };
    for e in &file.exchanges {
        match live.exchanges.iter().find(|l| l.name == e.name) {
            None => d("missing", "exchange", e.name.clone(), format!("type {}", e.kind)),
            Some(l) => {
                let mut why = Vec::new();
                if !l.kind.eq_ignore_ascii_case(&e.kind) {
                    why.push(format!("type: file {}, broker {}", e.kind, l.kind));
                }
                for (n, a, b) in [
                    ("durable", e.durable, l.durable),
                    ("auto_delete", e.auto_delete, l.auto_delete),
                    ("internal", e.internal, l.internal),
                ] {
                    if a != b {
                        why.push(format!("{n}: file {a}, broker {b}"));
                    }
                }
                why.extend(argument_differences(&e.arguments, &l.arguments, false));
                if !why.is_empty() {
                    d("mismatched", "exchange", e.name.clone(), why.join("; "));
                }
            }
        }
    }
    for q in &file.queues {
        match live.queues.iter().find(|l| l.name == q.name) {
            None => d("missing", "queue", q.name.clone(), String::new()),
            Some(l) => {
                let mut why = Vec::new();
                for (n, a, b) in [
                    ("durable", q.durable, l.durable),
                    ("auto_delete", q.auto_delete, l.auto_delete),
                ] {
                    if a != b {
                        why.push(format!("{n}: file {a}, broker {b}"));
                    }
                }
                why.extend(argument_differences(&q.arguments, &l.arguments, true));
                if !why.is_empty() {
                    d("mismatched", "queue", q.name.clone(), why.join("; "));
                }
            }
        }
    }
    for b in &file.bindings {
        if !live.bindings.iter().any(|l| same_binding(b, l)) {
            d("missing", "binding", binding_name(b), String::new());
        }
    }
    let named = |n: &str| file.exchanges.iter().any(|e| e.name == n) || file.queues.iter().any(|q| q.name == n);
    for l in &live.bindings {
        let related = all || named(&l.source) || named(&l.destination);
        if related && !file.bindings.iter().any(|b| same_binding(b, l)) {
            d("extra", "binding", binding_name(l), String::new());
        }
    }
    if all {
        for l in &live.exchanges {
            if !file.exchanges.iter().any(|e| e.name == l.name) {
                d("extra", "exchange", l.name.clone(), format!("type {}", l.kind));
            }
        }
        for l in &live.queues {
            if !file.queues.iter().any(|q| q.name == l.name) {
                d("extra", "queue", l.name.clone(), String::new());
            }
        }
    }
    out
}

/// Runs a `topology` command.
pub async fn run(g: &Global, c: &TopologyCommand) -> CliResult<u8> {
    match c {
        TopologyCommand::Apply { file } => {
            let f = TopologyFile::load(file)?;
            let topology = f.to_topology()?;
            let settings = connect::settings(g)?;
            let transport = connect::connect(&settings, "topology apply", false).await?;
            transport.declare(&topology).await.map_err(|e| {
                let hint = if e.code() == "precondition_failed" {
                    format!(
                        " — run `switchyard topology diff {}` to see what differs",
                        file.display()
                    )
                } else {
                    String::new()
                };
                CliError::from(e)
                    .context(format!("applying {}", file.display()))
                    .context_suffix(&hint)
            })?;
            let (e, q, b) = (topology.exchanges.len(), topology.queues.len(), topology.bindings.len());
            if g.json {
                println!("{}", json!({"exchanges": e, "queues": q, "bindings": b}));
            } else {
                println!(
                    "declared {e} exchange(s), {q} queue(s), {b} binding(s) from {}",
                    file.display()
                );
            }
            Ok(EXIT_OK)
        }
        TopologyCommand::Diff { file, all } => {
            let f = TopologyFile::load(file)?;
            let settings = connect::settings(g)?;
            let m = Management::from_settings(&settings)?;
            let vhost = settings.endpoint().map_err(CliError::from)?.vhost;
            let live = live(&m, &vhost).await?;
            let diffs = diff(&f, &live, *all);
            if g.json {
                println!("{}", serde_json::to_string(&diffs).unwrap_or_default());
            } else if diffs.is_empty() {
                println!("no differences between {} and vhost '{vhost}'", file.display());
            } else {
                for x in &diffs {
                    let detail = if x.detail.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", x.detail)
                    };
                    let note = if x.status == "mismatched" {
                        " (declaring it would fail with PRECONDITION_FAILED)"
                    } else {
                        ""
                    };
                    println!("{:<10} {:<8} {}{detail}{note}", x.status, x.what, x.name);
                }
            }
            Ok(if diffs.is_empty() { EXIT_OK } else { EXIT_FAILURE })
        }
        TopologyCommand::Export { output } => {
            let settings = connect::settings(g)?;
            let m = Management::from_settings(&settings)?;
            let vhost = settings.endpoint().map_err(CliError::from)?.vhost;
            let live = live(&m, &vhost).await?;
            let text = format!(
                "# switchyard topology exported from vhost '{vhost}'\n\n{}",
                live.to_toml()?
            );
            match output {
                Some(p) => std::fs::write(p, text)
                    .map_err(|e| CliError::failure(format!("cannot write {}: {e}", p.display())))?,
                None => print!("{text}"),
            }
            Ok(EXIT_OK)
        }
    }
}
