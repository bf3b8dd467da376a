//! `switchyard consume`, `get` and `rpc`.

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard::rpc::RpcClient;
use switchyard::{ConsumeOptions, Delivery, Destination, Message};

use crate::args::{ConsumeArgs, Global, RpcArgs, Settle};
use crate::connect;
use crate::error::{CliError, CliResult, EXIT_OK};
use crate::message;

fn print(g: &Global, d: &Delivery, n: u64, left: Option<u32>) {
    if g.json {
        let mut v = message::message_json(&d.message, Some(&d.info));
        if let (Some(l), Some(o)) = (left, v.as_object_mut()) {
            o.insert("message_count".into(), json!(l));
        }
        println!("{v}");
    } else {
        let title = match left {
            Some(l) => format!("message {n} ({l} left in the queue)"),
            None => format!("message {n}"),
        };
        print!("{}", message::message_human(&d.message, Some(&d.info), &title));
    }
}

/// Settles `d` as asked; `--requeue` deliveries are kept in `held` and put
/// back at the end (requeued at once, the queue would hand them out again).
async fn settle(s: Settle, d: Delivery, held: &mut Vec<Delivery>) -> CliResult<()> {
    if s.requeue {
        held.push(d);
        Ok(())
    } else if s.reject {
        d.reject(false).await.map_err(CliError::from)
    } else {
        d.ack().await.map_err(CliError::from)
    }
}

async fn requeue(held: Vec<Delivery>) -> CliResult<()> {
    for d in held {
        d.nack(true).await.map_err(CliError::from)?;
    }
    Ok(())
}

/// Runs `consume`.
pub async fn consume(g: &Global, a: &ConsumeArgs) -> CliResult<u8> {
    if a.idle.is_some_and(|i| !crate::error::positive(i)) {
        return Err(CliError::usage(
            "--idle must be a number of seconds between 0.001 and 1e9",
        ));
    }
    let settings = connect::settings(g)?;
    let transport = connect::connect(&settings, "consume", false).await?;
    let prefetch = match a.count {
        Some(c) if c < a.prefetch as u64 => c.max(1) as u16,
        // --requeue holds every message until the end: the window must fit
        // them all, or the broker stops sending and the command waits forever.
        Some(c) if a.settle.requeue => c.min(u16::MAX as u64) as u16,
        None if a.settle.requeue => 0,
        _ => a.prefetch,
    };
    let mut sub = transport
        .consume(&a.queue, ConsumeOptions::default().prefetch(prefetch))
        .await
        .map_err(CliError::from)?;
    let mut held = Vec::new();
    let mut n = 0u64;
    let result: CliResult<()> = async {
        while a.count.is_none_or(|c| n < c) {
            let next = match a.idle {
                Some(secs) => match tokio::time::timeout(Duration::from_secs_f64(secs), sub.next()).await {
                    Ok(x) => x,
                    Err(_) => break,
                },
                None => tokio::select! {
                    x = sub.next() => x,
                    _ = tokio::signal::ctrl_c() => break,
                },
            };
            let d = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(e.into()),
                None => break,
            };
            n += 1;
            print(g, &d, n, None);
            settle(a.settle, d, &mut held).await?;
        }
        Ok(())
    }
    .await;
    let requeued = requeue(held).await;
    let closed = sub.close().await;
    result?;
    requeued?;
    closed.map_err(CliError::from)?;
    if !g.json {
        eprintln!("{n} message(s) from '{}'", a.queue);
    }
    Ok(EXIT_OK)
}

/// Runs `get`.
pub async fn get(g: &Global, a: &ConsumeArgs) -> CliResult<u8> {
    let settings = connect::settings(g)?;
    let transport = connect::connect(&settings, "get", false).await?;
    let count = a.count.unwrap_or(1);
    let mut held = Vec::new();
    let mut n = 0u64;
    let result: CliResult<()> = async {
        while n < count {
            let Some(ok) = transport.get(&a.queue, false).await.map_err(CliError::from)? else {
                break;
            };
            n += 1;
            print(g, &ok.delivery, n, Some(ok.message_count));
            settle(a.settle, ok.delivery, &mut held).await?;
        }
        Ok(())
    }
    .await;
    let requeued = requeue(held).await;
    result?;
    requeued?;
    if !g.json {
        if n == 0 {
            eprintln!("queue '{}' has no ready message", a.queue);
        } else {
            eprintln!("{n} message(s) from '{}'", a.queue);
        }
    }
    Ok(EXIT_OK)
}

/// Runs `rpc`.
pub async fn rpc(g: &Global, a: &RpcArgs) -> CliResult<u8> {
    message::check_headers(&a.message)?;
    if !crate::error::positive(a.timeout) {
        return Err(CliError::usage("--timeout must be a positive number of seconds"));
    }
    let settings = connect::settings(g)?;
    let request = message::apply(&a.message, Message::new(a.body.clone().into_bytes()))?;
    let transport = connect::connect(&settings, "rpc", false).await?;
    let client = RpcClient::new(transport).await.map_err(CliError::from)?;
    let dest = Destination::new(a.exchange.clone(), a.routing_key.clone());
    let started = Instant::now();
    let reply = client.call(&dest, request, Duration::from_secs_f64(a.timeout)).await;
    let latency = started.elapsed();
    let _ = client.close().await;
    let reply = reply.map_err(|e| {
        let hint = if e.code() == "rpc_timeout" {
            " (is a server consuming the request queue and answering to reply_to?)"
        } else {
            ""
        };
        CliError::from(e).context(format!("rpc to {dest}")).context_suffix(hint)
    })?;
    let ms = latency.as_secs_f64() * 1000.0;
    if g.json {
        println!(
            "{}",
            json!({"latency_ms": ms, "reply": message::message_json(&reply, None)})
        );
    } else {
        print!("{}", message::message_human(&reply, None, "reply"));
        println!("latency: {ms:.2} ms");
    }
    Ok(EXIT_OK)
}
