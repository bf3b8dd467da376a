//! Topology files: exchanges, queues (with their `x-*` arguments) and
//! bindings in TOML, the shape `topology apply|diff|export` read and write.
//!
//! ```toml
//! [[exchanges]]
//! name = "contextiq.extraction"
//! type = "topic"            # direct | topic | fanout | headers
//! durable = true            # default true; auto_delete, internal default false
//!
//! [[queues]]
//! name = "extraction.requests"
//! durable = true            # default true; exclusive, auto_delete default false
//! arguments = { "x-dead-letter-exchange" = "contextiq.dlx", "x-max-priority" = 10 }
//!
//! [[bindings]]
//! source = "contextiq.extraction"
//! destination = "extraction.requests"
//! destination_type = "queue"   # default queue; or exchange
//! routing_key = "extraction.request"
//! ```

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchyard::{Binding, ExchangeKind, ExchangeSpec, HeaderValue, Headers, Overflow, QueueSpec, QueueType, Topology};

use crate::error::{CliError, CliResult};

fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn queue_kind() -> String {
    "queue".into()
}
fn is_queue(s: &String) -> bool {
    s == "queue"
}

/// Arguments of an exchange, queue or binding, by their RabbitMQ names.
pub type Arguments = BTreeMap<String, Value>;

/// An exchange in a topology file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeDef {
    /// Name.
    pub name: String,
    /// `direct`, `topic`, `fanout` or `headers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Survives a broker restart (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub durable: bool,
    /// Deleted with its last binding.
    #[serde(default, skip_serializing_if = "is_false")]
    pub auto_delete: bool,
    /// Only exchange-to-exchange bindings publish to it.
    #[serde(default, skip_serializing_if = "is_false")]
    pub internal: bool,
    /// Arguments (e.g. `alternate-exchange`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub arguments: Arguments,
}

/// A queue in a topology file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueDef {
    /// Name.
    pub name: String,
    /// Survives a broker restart (default true).
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub durable: bool,
    /// Owned by the declaring connection.
    #[serde(default, skip_serializing_if = "is_false")]
    pub exclusive: bool,
    /// Deleted after its last consumer goes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub auto_delete: bool,
    /// `x-*` arguments, by RabbitMQ's names.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub arguments: Arguments,
}

/// A binding in a topology file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingDef {
    /// The exchange messages come from.
    pub source: String,
    /// The queue (or exchange) they go to.
    pub destination: String,
    /// `queue` (default) or `exchange`.
    #[serde(default = "queue_kind", skip_serializing_if = "is_queue")]
    pub destination_type: String,
    /// Binding key.
    #[serde(default)]
    pub routing_key: String,
    /// Binding arguments (headers exchanges).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub arguments: Arguments,
}

/// A whole topology file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyFile {
    /// Exchanges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exchanges: Vec<ExchangeDef>,
    /// Queues.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queues: Vec<QueueDef>,
    /// Bindings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bindings: Vec<BindingDef>,
}

fn json_to_header(v: &Value) -> HeaderValue {
    match v {
        Value::Null => HeaderValue::Void,
        Value::Bool(b) => HeaderValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => HeaderValue::I64(i),
            None => HeaderValue::F64(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => HeaderValue::String(s.clone()),
        Value::Array(a) => HeaderValue::Array(a.iter().map(json_to_header).collect()),
        Value::Object(o) => {
            let mut h = Headers::new();
            for (k, v) in o {
                h.insert(k.clone(), json_to_header(v));
            }
            HeaderValue::Table(h)
        }
    }
}

fn to_headers(args: &Arguments) -> Headers {
    let mut h = Headers::new();
    for (k, v) in args {
        h.insert(k.clone(), json_to_header(v));
    }
    h
}

impl TopologyFile {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> CliResult<Self> {
        let file: TopologyFile = toml::from_str(text).map_err(|e| {
            CliError::usage(format!(
                "{origin} is not a valid topology file: {} (expected TOML with [[exchanges]], [[queues]] and \
                 [[bindings]]; see examples/contextiq.topology.toml)",
                e.message()
            ))
        })?;
        file.to_topology().map_err(|e| e.context(origin))?;
        Ok(file)
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> CliResult<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::usage(format!("cannot read topology file {}: {e}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The file as TOML.
    pub fn to_toml(&self) -> CliResult<String> {
        toml::to_string_pretty(self).map_err(|e| CliError::failure(format!("cannot write the topology as TOML: {e}")))
    }

    /// The topology to declare. Known queue arguments become typed
    /// (`x-max-priority` must be an integer 1-255, …); others pass through.
    pub fn to_topology(&self) -> CliResult<Topology> {
        let mut t = Topology::new();
        for e in &self.exchanges {
            let kind: ExchangeKind = e.kind.parse().map_err(|_| {
                CliError::usage(format!(
                    "exchange '{}': type '{}' is not direct, topic, fanout or headers",
                    e.name, e.kind
                ))
            })?;
            let mut spec = ExchangeSpec::new(e.name.clone(), kind)
                .durable(e.durable)
                .auto_delete(e.auto_delete);
            spec.internal = e.internal;
            spec.arguments = to_headers(&e.arguments);
            t = t.exchange(spec);
        }
        for q in &self.queues {
            t = t.queue(queue_spec(q)?);
        }
        for b in &self.bindings {
            let binding = match b.destination_type.as_str() {
                "queue" => Binding::queue(b.destination.clone(), b.source.clone(), b.routing_key.clone()),
                "exchange" => Binding::exchange(b.destination.clone(), b.source.clone(), b.routing_key.clone()),
                other => {
                    return Err(CliError::usage(format!(
                        "binding {} -> {}: destination_type '{other}' is not queue or exchange",
                        b.source, b.destination
                    )))
                }
            };
            t = t.binding(binding.with_arguments(to_headers(&b.arguments)));
        }
        Ok(t)
    }
}

fn queue_spec(q: &QueueDef) -> CliResult<QueueSpec> {
    let bad = |arg: &str, want: &str| CliError::usage(format!("queue '{}': argument {arg} must be {want}", q.name));
    let mut spec = QueueSpec::new(q.name.clone())
        .durable(q.durable)
        .exclusive(q.exclusive)
        .auto_delete(q.auto_delete);
    let a = &mut spec.arguments;
    for (k, v) in &q.arguments {
        let uint = || v.as_u64().ok_or_else(|| bad(k, "a non-negative integer"));
        let text = || v.as_str().map(str::to_owned).ok_or_else(|| bad(k, "a string"));
        match k.as_str() {
            "x-dead-letter-exchange" => a.dead_letter_exchange = Some(text()?),
            "x-dead-letter-routing-key" => a.dead_letter_routing_key = Some(text()?),
            "x-message-ttl" => a.message_ttl = Some(Duration::from_millis(uint()?)),
            "x-expires" => a.expires = Some(Duration::from_millis(uint()?)),
            "x-max-length" => a.max_length = Some(uint()?),
            "x-max-length-bytes" => a.max_length_bytes = Some(uint()?),
            "x-overflow" => {
                a.overflow = Some(match text()?.as_str() {
                    "drop-head" => Overflow::DropHead,
                    "reject-publish" => Overflow::RejectPublish,
                    "reject-publish-dlx" => Overflow::RejectPublishDlx,
                    _ => return Err(bad(k, "drop-head, reject-publish or reject-publish-dlx")),
                })
            }
            "x-max-priority" => {
                a.max_priority = Some(
                    u8::try_from(uint()?)
                        .ok()
                        .filter(|p| *p >= 1)
                        .ok_or_else(|| bad(k, "an integer from 1 to 255"))?,
                )
            }
            "x-queue-type" => {
                a.queue_type = Some(match text()?.as_str() {
                    "classic" => QueueType::Classic,
                    "quorum" => QueueType::Quorum,
                    "stream" => QueueType::Stream,
                    _ => return Err(bad(k, "classic, quorum or stream")),
                })
            }
            "x-delivery-limit" => {
                a.delivery_limit = Some(u32::try_from(uint()?).map_err(|_| bad(k, "an integer that fits 32 bits"))?)
            }
            "x-single-active-consumer" => {
                a.single_active_consumer = v.as_bool().ok_or_else(|| bad(k, "true or false"))?
            }
            _ => {
                a.extra.insert(k.clone(), json_to_header(v));
            }
        }
    }
    Ok(spec)
}

/// True when two argument values are equal as RabbitMQ compares them
/// (numbers by value, whatever their JSON or TOML type).
pub fn value_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(a, b)| value_eq(a, b)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| value_eq(v, w)))
        }
        _ => a == b,
    }
}

/// True when two argument tables are equal (see [`value_eq`]).
pub fn arguments_eq(a: &Arguments, b: &Arguments) -> bool {
    a.len() == b.len() && a.iter().all(|(k, v)| b.get(k).is_some_and(|w| value_eq(v, w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_round_trips_and_bad_arguments_are_refused() {
        let text = r#"
[[exchanges]]
name = "ex"
type = "topic"

[[queues]]
name = "q"
arguments = { "x-max-priority" = 10, "x-dead-letter-exchange" = "dlx", "x-custom" = "v" }

[[bindings]]
source = "ex"
destination = "q"
routing_key = "a.*"
"#;
        let f = TopologyFile::parse(text, "t.toml").unwrap();
        let t = f.to_topology().unwrap();
        assert_eq!(t.queues[0].arguments.max_priority, Some(10));
        assert_eq!(t.queues[0].arguments.extra.get_str("x-custom"), Some("v"));
        let again = TopologyFile::parse(&f.to_toml().unwrap(), "again").unwrap();
        assert_eq!(again, f);
        for bad in [
            "[[queues]]\nname = \"q\"\narguments = { \"x-max-priority\" = \"ten\" }",
            "[[exchanges]]\nname = \"e\"\ntype = \"fan\"",
            "[[queues]]\nnme = \"q\"",
            "not toml at all [",
        ] {
            let e = TopologyFile::parse(bad, "bad.toml").unwrap_err();
            assert_eq!(e.exit, crate::error::EXIT_USAGE, "{bad}");
            assert!(e.message.contains("bad.toml"), "{}", e.message);
            assert!(!e.message.contains('\n'));
        }
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(value_eq(&serde_json::json!(10), &serde_json::json!(10.0)));
        assert!(!value_eq(&serde_json::json!(10), &serde_json::json!(5)));
    }
}
