//! `switchyard bench`: a load generator in the spirit of RabbitMQ PerfTest.
//! Each body starts with its send time (microseconds since the epoch, 8
//! bytes big-endian); consumers measure publish-to-delivery latency.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::json;
use switchyard::{ConsumeOptions, Destination, Message, QueueSpec};

use crate::args::{BenchArgs, Global};
use crate::connect;
use crate::error::{CliError, CliResult, EXIT_FAILURE, EXIT_OK};

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// The value at `p` (0-100) of sorted `v` (nearest rank); 0 when empty.
pub fn percentile(v: &[u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Runs `bench`.
pub async fn run(g: &Global, a: &BenchArgs) -> CliResult<u8> {
    if a.size < 8 {
        return Err(CliError::usage(
            "--size must be at least 8 bytes (the send time travels in the body)",
        ));
    }
    if !crate::error::positive(a.duration) || a.producers == 0 || a.rate.is_some_and(|r| !crate::error::positive(r)) {
        return Err(CliError::usage(
            "--duration and --rate must be positive and --producers at least 1",
        ));
    }
    let mut settings = connect::settings(g)?;
    settings.enable_publisher_confirms = !a.no_confirms;
    let producer_side = connect::connect(&settings, "bench", true).await?;
    let consumer_side = connect::connect(&settings, "bench", true).await?;
    let temporary = a.queue.is_none();
    let queue = a
        .queue
        .clone()
        .unwrap_or_else(|| format!("switchyard-bench-{}-{}", std::process::id(), now_micros()));
    let spec = if temporary {
        QueueSpec::new(queue.clone()).durable(false)
    } else {
        QueueSpec::new(queue.clone())
    };
    producer_side.declare_queue(&spec).await.map_err(CliError::from)?;

    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let producing = Arc::new(AtomicBool::new(true));
    let stop_consumers = Arc::new(AtomicBool::new(false));
    let duration = Duration::from_secs_f64(a.duration);

    let mut consumers = Vec::new();
    for _ in 0..a.consumers {
        let t = consumer_side.clone();
        let (q, received, stop, auto_ack, prefetch) = (
            queue.clone(),
            received.clone(),
            stop_consumers.clone(),
            a.auto_ack,
            a.prefetch,
        );
        consumers.push(tokio::spawn(async move {
            let mut sub = t
                .consume(&q, ConsumeOptions::default().prefetch(prefetch).auto_ack(auto_ack))
                .await?;
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let d = match tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
                    Err(_) => continue,
                    Ok(None) => break,
                    Ok(Some(d)) => d?,
                };
                if let Some(ts) = d.message.body.get(..8) {
                    let ts = u64::from_be_bytes(ts.try_into().unwrap_or([0; 8]));
                    latencies.push(now_micros().saturating_sub(ts));
                }
                received.fetch_add(1, Ordering::Relaxed);
                d.ack().await?;
            }
            let _ = sub.close().await;
            Ok::<_, switchyard::Error>(latencies)
        }));
    }

    let started = Instant::now();
    let mut producers = Vec::new();
    for _ in 0..a.producers {
        let t = producer_side.clone();
        let (dest, sent, rate, window, size, persistent) = (
            Destination::queue(queue.clone()),
            sent.clone(),
            a.rate,
            a.window.max(1),
            a.size,
            a.persistent,
        );
        producers.push(tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut n = 0u64;
            while started.elapsed() < duration {
                if let Some(r) = rate {
                    tokio::time::sleep_until((started + Duration::from_secs_f64(n as f64 / r)).into()).await;
                    if started.elapsed() >= duration {
                        break;
                    }
                }
                while in_flight.len() >= window {
                    if let Some(r) = in_flight.next().await {
                        r?;
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let mut body = vec![0u8; size];
                body[..8].copy_from_slice(&now_micros().to_be_bytes());
                let m = Message::new(body).persistent(persistent);
                let (t, d) = (t.clone(), dest.clone());
                in_flight.push(async move { t.publish(&d, m).await });
                n += 1;
            }
            while let Some(r) = in_flight.next().await {
                r?;
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, switchyard::Error>(())
        }));
    }

    let pb = connect::progress(g, duration.as_millis() as u64, "{spinner} [{bar:30}] {elapsed} {msg}");
    let ticker = {
        let (pb, sent, received, producing) = (pb.clone(), sent.clone(), received.clone(), producing.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let secs = started.elapsed().as_secs_f64().max(0.001);
                let (s, r) = (sent.load(Ordering::Relaxed), received.load(Ordering::Relaxed));
                pb.set_position((secs * 1000.0) as u64);
                pb.set_message(format!(
                    "sent {s} ({:.0}/s), received {r} ({:.0}/s){}",
                    s as f64 / secs,
                    r as f64 / secs,
                    if producing.load(Ordering::Relaxed) {
                        ""
                    } else {
                        ", draining"
                    }
                ));
            }
        })
    };

    let mut error = None;
    for p in producers {
        match p.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error.get_or_insert(CliError::from(e));
            }
            Err(e) => {
                error.get_or_insert(CliError::failure(format!("a producer panicked: {e}")));
            }
        }
    }
    let publish_secs = started.elapsed().as_secs_f64();
    producing.store(false, Ordering::Relaxed);
    // Drain: until everything confirmed has arrived, or 10 s without progress.
    let mut last = (received.load(Ordering::Relaxed), Instant::now());
    while a.consumers > 0 && received.load(Ordering::Relaxed) < sent.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let r = received.load(Ordering::Relaxed);
        if r != last.0 {
            last = (r, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(10) {
            break;
        }
    }
    stop_consumers.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for c in consumers {
        match c.await {
            Ok(Ok(l)) => latencies.extend(l),
            Ok(Err(e)) => {
                error.get_or_insert(CliError::from(e));
            }
            Err(e) => {
                error.get_or_insert(CliError::failure(format!("a consumer panicked: {e}")));
            }
        }
    }
    let total_secs = started.elapsed().as_secs_f64();
    ticker.abort();
    pb.finish_and_clear();
    if temporary {
        let _ = producer_side.delete_queue(&queue).await;
    }
    if let Some(e) = error {
        return Err(e.context("bench"));
    }
    latencies.sort_unstable();
    let (s, r) = (sent.load(Ordering::Relaxed), received.load(Ordering::Relaxed));
    let ms = |us: u64| us as f64 / 1000.0;
    let report = json!({
        "transport": producer_side.name(),
        "producers": a.producers, "consumers": a.consumers, "size": a.size,
        "confirms": !a.no_confirms, "prefetch": a.prefetch, "duration_s": publish_secs,
        "sent": s, "received": r,
        "publish_rate": s as f64 / publish_secs, "consume_rate": r as f64 / total_secs,
        "latency_ms": {
            "p50": ms(percentile(&latencies, 50.0)), "p95": ms(percentile(&latencies, 95.0)),
            "p99": ms(percentile(&latencies, 99.0)), "max": ms(latencies.last().copied().unwrap_or(0)),
        }
    });
    if g.json {
        println!("{report}");
    } else {
        let l = &report["latency_ms"];
        println!(
            "{} transport, {} producer(s), {} consumer(s), {} byte messages, confirms {}",
            report["transport"].as_str().unwrap_or_default(),
            a.producers,
            a.consumers,
            a.size,
            if a.no_confirms { "off" } else { "on" }
        );
        println!(
            "sent {s} in {publish_secs:.2}s ({:.0} msg/s), received {r} ({:.0} msg/s)",
            report["publish_rate"].as_f64().unwrap_or(0.0),
            report["consume_rate"].as_f64().unwrap_or(0.0)
        );
        println!(
            "latency ms: p50 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}",
            l["p50"].as_f64().unwrap_or(0.0),
            l["p95"].as_f64().unwrap_or(0.0),
            l["p99"].as_f64().unwrap_or(0.0),
            l["max"].as_f64().unwrap_or(0.0)
        );
    }
    if a.consumers > 0 && r < s {
        eprintln!(
            "error: {} message(s) confirmed but not received within 10 s of the end",
            s - r
        );
        return Ok(EXIT_FAILURE);
    }
    Ok(EXIT_OK)
}

#[cfg(test)]
mod tests {
    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(super::percentile(&v, 50.0), 50);
        assert_eq!(super::percentile(&v, 99.0), 99);
        assert_eq!(super::percentile(&[], 99.0), 0);
    }
}
