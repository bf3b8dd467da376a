//! `switchyard dlq list|show|replay|purge`: dead letters walked one at a
//! time with `basic.get` and manual acks; whatever is not taken goes back.

use std::sync::Arc;

use serde_json::{json, Value};
use switchyard::middleware::dead_letter::{original_destination, replay};
use switchyard::{Delivery, Message, Publisher, Transport};

use crate::args::{DlqCommand, Global, Select};
use crate::connect;
use crate::error::{exit_code_of, CliError, CliResult, EXIT_OK};
use crate::message;
use crate::table;

/// Why and where from: the facts of one dead letter.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterFacts {
    /// Its message id.
    pub message_id: Option<String>,
    /// Why it was dead-lettered: `x-error-kind: x-error`, or RabbitMQ's
    /// `x-death` reason.
    pub reason: String,
    /// Where it was first published (`exchange/routing-key`), if known.
    pub origin: Option<String>,
    /// The queue it failed on.
    pub queue: Option<String>,
    /// When it failed (seconds since the epoch), if recorded.
    pub failed_at: Option<i64>,
    /// Retries made before giving up (`x-retry-count`), or RabbitMQ's death count.
    pub retries: Option<i64>,
}

/// Reads the dead-letter headers of `m` (switchyard's `x-error*`,
/// `x-original-*`, or RabbitMQ's `x-death`).
pub fn facts(m: &Message) -> DeadLetterFacts {
    let h = &m.headers;
    let death = h
        .get("x-death")
        .and_then(|d| d.as_array())
        .and_then(|a| a.first())
        .and_then(|d| d.as_table());
    let reason = match (h.get_str("x-error-kind"), h.get_str("x-error")) {
        (Some(k), Some(e)) => format!("{k}: {e}"),
        (Some(k), None) => k.to_owned(),
        (None, Some(e)) => e.to_owned(),
        (None, None) => match death {
            Some(d) => format!(
                "{} (by RabbitMQ, from queue {})",
                d.get_str("reason").unwrap_or("unknown"),
                d.get_str("queue").unwrap_or("?")
            ),
            None => "(no reason recorded: not a dead letter?)".into(),
        },
    };
    DeadLetterFacts {
        message_id: m.properties.message_id.as_deref().map(str::to_owned),
        reason,
        origin: original_destination(m).map(|d| d.to_string()),
        queue: h
            .get_str("x-original-queue")
            .or_else(|| death.and_then(|d| d.get_str("queue")))
            .map(str::to_owned),
        failed_at: h.get_i64("x-failed-at").or_else(|| {
            death.and_then(|d| d.get("time")).and_then(|t| match t {
                switchyard::HeaderValue::Timestamp(t) => Some(*t as i64),
                other => other.as_i64(),
            })
        }),
        retries: h
            .get_i64("x-retry-count")
            .or_else(|| death.and_then(|d| d.get_i64("count"))),
    }
}

fn facts_json(index: usize, f: &DeadLetterFacts) -> Value {
    json!({"index": index, "message_id": f.message_id, "reason": f.reason, "origin": f.origin,
           "queue": f.queue, "failed_at": f.failed_at, "retries": f.retries})
}

/// Takes up to `max` messages of `queue` (those ready when the walk began),
/// unsettled, in queue order.
pub async fn walk(transport: &dyn Transport, queue: &str, max: usize) -> CliResult<Vec<Delivery>> {
    let mut taken = Vec::new();
    let mut total = None;
    while taken.len() < max && total.is_none_or(|t| taken.len() < t) {
        match transport.get(queue, false).await {
            Ok(Some(ok)) => {
                total.get_or_insert(ok.message_count as usize + 1);
                taken.push(ok.delivery);
            }
            Ok(None) => break,
            Err(e) => {
                let _ = requeue(taken).await;
                return Err(e.into());
            }
        }
    }
    Ok(taken)
}

/// Puts deliveries back on their queue.
pub async fn requeue(deliveries: Vec<Delivery>) -> CliResult<()> {
    let mut first = None;
    for d in deliveries {
        if let Err(e) = d.nack(true).await {
            first.get_or_insert(e);
        }
    }
    match first {
        None => Ok(()),
        Some(e) => Err(CliError::from(e)
            .context("could not requeue a dead letter (the broker requeues it when the connection closes)")),
    }
}

fn selected(s: &Select, index: usize, m: &Message, f: &DeadLetterFacts) -> bool {
    s.all
        || s.indexes.contains(&index)
        || m.properties
            .message_id
            .as_deref()
            .is_some_and(|id| s.ids.iter().any(|s| s == id))
        || s.reason.as_ref().is_some_and(|r| f.reason.contains(r.as_str()))
}

/// Runs a `dlq` command.
pub async fn run(g: &Global, c: &DlqCommand) -> CliResult<u8> {
    let settings = connect::settings(g)?;
    if let DlqCommand::Replay { select, .. } = c {
        if !select.all && select.ids.is_empty() && select.indexes.is_empty() && select.reason.is_none() {
            return Err(CliError::usage(
                "choose which dead letters to replay: --id MESSAGE_ID, --index N, --reason TEXT or --all",
            ));
        }
    }
    let transport = connect::connect(&settings, "dlq", false).await?;
    match c {
        DlqCommand::List { queue, max } => {
            let taken = walk(&*transport, queue, *max).await?;
            let all: Vec<DeadLetterFacts> = taken.iter().map(|d| facts(&d.message)).collect();
            requeue(taken).await?;
            if g.json {
                let v: Vec<Value> = all.iter().enumerate().map(|(i, f)| facts_json(i, f)).collect();
                println!("{}", Value::Array(v));
            } else {
                let rows: Vec<Vec<String>> = all
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        vec![
                            i.to_string(),
                            f.message_id.clone().unwrap_or_else(|| "-".into()),
                            f.origin.clone().unwrap_or_else(|| "-".into()),
                            f.queue.clone().unwrap_or_else(|| "-".into()),
                            f.retries.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
                            f.reason.clone(),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table::render(&["INDEX", "MESSAGE-ID", "ORIGIN", "QUEUE", "RETRIES", "REASON"], &rows)
                );
                println!("{} dead letter(s) in '{queue}'", all.len());
            }
            Ok(EXIT_OK)
        }
        DlqCommand::Show { queue, id, index, max } => {
            let taken = walk(&*transport, queue, *max).await?;
            let found = taken.iter().enumerate().find(|(i, d)| match (id, index) {
                (Some(id), _) => d.message.properties.message_id.as_deref() == Some(id.as_str()),
                (None, Some(n)) => i == n,
                (None, None) => false,
            });
            let out = found.map(|(i, d)| {
                let f = facts(&d.message);
                if g.json {
                    let mut v = message::message_json(&d.message, Some(&d.info));
                    v["dead_letter"] = facts_json(i, &f);
                    v.to_string() + "\n"
                } else {
                    let mut s = message::message_human(&d.message, Some(&d.info), &format!("dead letter {i}"));
                    s.push_str(&format!(
                        "reason: {}\norigin: {}\n",
                        f.reason,
                        f.origin.as_deref().unwrap_or("unknown")
                    ));
                    s
                }
            });
            let looked = taken.len();
            requeue(taken).await?;
            match out {
                Some(s) => {
                    print!("{s}");
                    Ok(EXIT_OK)
                }
                None => Err(CliError::usage(format!(
                    "no dead letter {} in '{queue}' ({looked} looked at): see `switchyard dlq list {queue}`",
                    match (id, index) {
                        (Some(id), _) => format!("with message id '{id}'"),
                        _ => format!("at index {}", index.unwrap_or(0)),
                    }
                ))),
            }
        }
        DlqCommand::Replay { queue, select, max } => replay_selected(g, &transport, queue, select, *max).await,
        DlqCommand::Purge { queue, yes } => {
            let info = transport.queue_info(queue).await.map_err(CliError::from)?;
            if !yes {
                return Err(CliError::usage(format!(
                    "purging '{queue}' would delete {} dead letter(s) for good: add --yes",
                    info.message_count
                )));
            }
            let n = transport.purge_queue(queue).await.map_err(CliError::from)?;
            if g.json {
                println!("{}", json!({"purged": n, "queue": queue}));
            } else {
                println!("purged {n} dead letter(s) from '{queue}'");
            }
            Ok(EXIT_OK)
        }
    }
}

async fn replay_selected(
    g: &Global,
    transport: &Arc<dyn Transport>,
    queue: &str,
    select: &Select,
    max: usize,
) -> CliResult<u8> {
    let taken = walk(&**transport, queue, max).await?;
    let publisher: &dyn Publisher = &**transport;
    let pb = connect::progress(g, taken.len() as u64, "{spinner} replaying [{bar:30}] {pos}/{len}");
    let mut keep = Vec::new();
    let mut replayed = Vec::new();
    let mut failed: Vec<(usize, Option<String>, switchyard::Error)> = Vec::new();
    for (i, d) in taken.into_iter().enumerate() {
        pb.inc(1);
        let f = facts(&d.message);
        if !selected(select, i, &d.message, &f) {
            keep.push(d);
            continue;
        }
        // Published with confirms (and mandatory); only then is the dead letter acked.
        match replay(publisher, d.message.clone()).await {
            Ok(dest) => match d.ack().await {
                Ok(()) => replayed.push(json!({"index": i, "message_id": f.message_id, "to": dest.to_string()})),
                Err(e) => failed.push((i, f.message_id, e)),
            },
            Err(e) => {
                keep.push(d);
                failed.push((i, f.message_id, e));
            }
        }
    }
    pb.finish_and_clear();
    requeue(keep).await?;
    if g.json {
        let f: Vec<Value> = failed
            .iter()
            .map(|(i, id, e)| json!({"index": i, "message_id": id, "error": e.to_string(), "code": e.code()}))
            .collect();
        println!("{}", json!({"queue": queue, "replayed": replayed, "failed": f}));
    } else {
        for r in &replayed {
            println!(
                "replayed {} -> {}",
                r["message_id"].as_str().unwrap_or("(no message id)"),
                r["to"].as_str().unwrap_or("")
            );
        }
        println!(
            "{} dead letter(s) replayed from '{queue}', {} left there",
            replayed.len(),
            failed.len()
        );
    }
    match failed.into_iter().next() {
        None => Ok(EXIT_OK),
        Some((i, id, e)) => Err(CliError {
            exit: exit_code_of(&e),
            message: CliError::from(e)
                .context(format!(
                    "dead letter {} (index {i}) not replayed and left in '{queue}'",
                    id.as_deref().unwrap_or("without message id")
                ))
                .message,
        }),
    }
}
