//! `switchyard publish`.

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::{Destination, Message, PublishOptions, Transport};

use crate::args::{Global, PublishArgs};
use crate::connect;
use crate::error::{CliError, CliResult, EXIT_OK};
use crate::message;

fn read_input(a: &PublishArgs) -> CliResult<Vec<u8>> {
    let mut buf = Vec::new();
    match &a.file {
        Some(p) if p.as_os_str() != "-" => {
            buf = std::fs::read(p).map_err(|e| CliError::usage(format!("cannot read {}: {e}", p.display())))?
        }
        _ => {
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| CliError::usage(format!("cannot read stdin: {e}")))?;
        }
    }
    Ok(buf)
}

/// The bodies to publish (before `--count`).
fn bodies(a: &PublishArgs) -> CliResult<Vec<Vec<u8>>> {
    if let Some(b) = &a.body {
        if a.lines {
            return Ok(b
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.as_bytes().to_vec())
                .collect());
        }
        return Ok(vec![b.as_bytes().to_vec()]);
    }
    let input = read_input(a)?;
    if a.lines {
        Ok(input
            .split(|b| *b == b'\n')
            .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
            .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
            .map(<[u8]>::to_vec)
            .collect())
    } else {
        Ok(vec![input])
    }
}

/// Publishes `messages` in order: in confirmed batches of `window` (the
/// transport pipelines a batch), or one at a time at most `rate` per second;
/// calls `on_confirm(n)` as they are confirmed. Returns how many were
/// confirmed, or the first error with the count confirmed before it.
pub async fn publish_all(
    transport: Arc<dyn Transport>,
    dest: Destination,
    messages: impl Iterator<Item = Message>,
    options: PublishOptions,
    rate: Option<f64>,
    window: usize,
    mut on_confirm: impl FnMut(u64),
) -> Result<u64, (u64, switchyard::Error)> {
    let mut confirmed = 0u64;
    let start = Instant::now();
    if let Some(r) = rate {
        for (sent, m) in messages.enumerate() {
            tokio::time::sleep_until((start + Duration::from_secs_f64(sent as f64 / r)).into()).await;
            transport
                .publish_with(&dest, m, options)
                .await
                .map_err(|e| (confirmed, e))?;
            confirmed += 1;
            on_confirm(1);
        }
        return Ok(confirmed);
    }
    let mut messages = messages.peekable();
    while messages.peek().is_some() {
        let batch: Vec<Message> = messages.by_ref().take(window.max(1)).collect();
        let n = batch.len() as u64;
        let result = if options.mandatory || n == 1 {
            let mut r = Ok(());
            for m in batch {
                r = transport.publish_with(&dest, m, options).await;
                if r.is_err() {
                    break;
                }
            }
            r
        } else {
            transport.publish_batch(&dest, batch).await
        };
        result.map_err(|e| (confirmed, e))?;
        confirmed += n;
        on_confirm(n);
    }
    Ok(confirmed)
}

/// Runs `publish`.
pub async fn run(g: &Global, a: &PublishArgs) -> CliResult<u8> {
    message::check_headers(&a.message)?;
    if a.rate.is_some_and(|r| !crate::error::positive(r)) {
        return Err(CliError::usage(
            "--rate must be a positive number of messages per second",
        ));
    }
    let settings = connect::settings(g)?;
    if connect::is_memory(&settings) {
        connect::connect(&settings, "publish", false).await?;
    }
    let bodies = bodies(a)?;
    let mut templates = Vec::with_capacity(bodies.len());
    for b in bodies {
        templates.push(message::apply(&a.message, Message::new(b))?);
    }
    let total = templates.len() as u64 * a.count;
    let transport = connect::connect(&settings, "publish", false).await?;
    let dest = Destination::new(a.exchange.clone(), a.routing_key.clone());
    let pb = connect::progress(
        g,
        total,
        "{spinner} publishing [{bar:30}] {pos}/{len} confirmed, {per_sec}, eta {eta}",
    );
    let count = a.count;
    let messages = templates
        .into_iter()
        .flat_map(move |m| std::iter::repeat_n(m, count as usize));
    let options = PublishOptions { mandatory: a.mandatory };
    let started = Instant::now();
    let result = publish_all(
        transport.clone(),
        dest.clone(),
        messages,
        options,
        a.rate,
        a.window,
        |n| pb.inc(n),
    )
    .await;
    pb.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    match result {
        Ok(n) => {
            if g.json {
                println!(
                    "{}",
                    json!({"published": n, "exchange": a.exchange, "routing_key": a.routing_key,
                           "confirmed": true, "seconds": elapsed})
                );
            } else {
                println!("published {n} message(s) to {dest}, all confirmed, in {elapsed:.3}s");
            }
            Ok(EXIT_OK)
        }
        Err((n, e)) => Err(CliError::from(e).context(format!(
            "{n} of {total} message(s) confirmed before the publish to {dest} failed"
        ))),
    }
}
