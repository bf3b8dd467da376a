//! `switchyard queues`: depth, consumers and rates from the management API.

use serde_json::{json, Value};

use crate::args::{Global, QueuesArgs};
use crate::connect;
use crate::error::{CliError, CliResult, EXIT_OK};
use crate::mgmt::Management;
use crate::table;
use switchyard::settings::percent_encode;

fn rate(q: &Value, stat: &str) -> f64 {
    q.pointer(&format!("/message_stats/{stat}_details/rate"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
}

fn count(q: &Value, k: &str) -> u64 {
    q.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// Runs `queues`.
pub async fn run(g: &Global, a: &QueuesArgs) -> CliResult<u8> {
    let settings = connect::settings(g)?;
    let m = Management::from_settings(&settings)?;
    let vhost = settings.endpoint().map_err(CliError::from)?.vhost;
    let list = m.get_json(&format!("/api/queues/{}", percent_encode(&vhost))).await?;
    let list = list.as_array().cloned().unwrap_or_default();
    let rows: Vec<Value> = list
        .iter()
        .filter(|q| {
            let name = q.get("name").and_then(Value::as_str).unwrap_or_default();
            a.filter.as_ref().is_none_or(|f| name.contains(f.as_str()))
        })
        .map(|q| {
            json!({
                "name": q.get("name").and_then(Value::as_str).unwrap_or_default(),
                "type": q.get("type").and_then(Value::as_str).unwrap_or("classic"),
                "ready": count(q, "messages_ready"),
                "unacked": count(q, "messages_unacknowledged"),
                "consumers": count(q, "consumers"),
                "publish_rate": rate(q, "publish"),
                "deliver_rate": rate(q, "deliver_get"),
            })
        })
        .collect();
    if g.json {
        println!("{}", Value::Array(rows));
        return Ok(EXIT_OK);
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r["name"].as_str().unwrap_or_default().to_owned(),
                r["type"].as_str().unwrap_or_default().to_owned(),
                r["ready"].to_string(),
                r["unacked"].to_string(),
                r["consumers"].to_string(),
                format!("{:.1}", r["publish_rate"].as_f64().unwrap_or(0.0)),
                format!("{:.1}", r["deliver_rate"].as_f64().unwrap_or(0.0)),
            ]
        })
        .collect();
    print!(
        "{}",
        table::render(
            &[
                "QUEUE",
                "TYPE",
                "READY",
                "UNACKED",
                "CONSUMERS",
                "PUBLISH/S",
                "DELIVER/S"
            ],
            &cells
        )
    );
    println!(
        "{} queue(s) in vhost '{vhost}' (the management API refreshes its figures every few seconds)",
        cells.len()
    );
    Ok(EXIT_OK)
}
