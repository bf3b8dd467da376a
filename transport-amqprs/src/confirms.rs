//! The per-channel publisher-confirm sequence map.
//!
//! amqprs gives no per-publish confirm future: the broker's `basic.ack` /
//! `basic.nack` arrive through `ChannelCallback::publish_ack` / `publish_nack`
//! carrying a delivery tag and a `multiple` flag. Delivery tags count the
//! publishes of a channel from 1 once `confirm.select` is on, so the publisher
//! assigns the next tag in the same serialized section as the `basic.publish`
//! and records who waits for it here; the callbacks resolve the waiters.
//!
//! A `basic.return` (mandatory, unroutable) arrives *before* the ack of the
//! same publish and carries no tag: it marks the oldest pending mandatory
//! publish with the same exchange and routing key as returned, and that
//! publish then resolves as [`Error::Unroutable`] when its ack arrives.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use switchyard_amqp::recovery::{PublishBuffer, UnconfirmedPublish};
use switchyard_core::Error;

#[derive(Debug)]
struct Mandatory {
    exchange: Arc<str>,
    routing_key: Arc<str>,
    returned: bool,
}

/// Unconfirmed publishes of one channel, by delivery tag: the shared
/// [`PublishBuffer`] plus the bookkeeping of mandatory publishes.
#[derive(Debug, Default)]
pub(crate) struct ConfirmTracker {
    buffer: PublishBuffer,
    mandatory: Mutex<BTreeMap<u64, Mandatory>>,
}

impl ConfirmTracker {
    /// Records `p` under delivery tag `tag` (before it is sent).
    pub fn track(&self, tag: u64, p: UnconfirmedPublish) {
        if p.options.mandatory {
            self.mandatory.lock().insert(
                tag,
                Mandatory {
                    exchange: p.destination.exchange_arc().clone(),
                    routing_key: p.destination.routing_key_arc().clone(),
                    returned: false,
                },
            );
        }
        self.buffer.track(tag, p);
    }

    /// Takes back `tag` (its publish could not be sent); `None` if someone
    /// else (a drain) already took it.
    pub fn untrack(&self, tag: u64) -> Option<UnconfirmedPublish> {
        self.mandatory.lock().remove(&tag);
        self.buffer.take(tag)
    }

    /// Number of unconfirmed publishes.
    pub fn len(&self) -> usize {
        self.buffer.len()
    }

    fn take_mandatory(&self, tag: u64, multiple: bool) -> Vec<(u64, Mandatory)> {
        let mut m = self.mandatory.lock();
        if m.is_empty() {
            return Vec::new();
        }
        if multiple {
            let rest = m.split_off(&(tag.saturating_add(1)));
            std::mem::replace(&mut *m, rest).into_iter().collect()
        } else {
            m.remove(&tag).map(|x| (tag, x)).into_iter().collect()
        }
    }

    /// Handles `basic.ack`: confirmed, or unroutable if it was returned.
    pub fn ack(&self, tag: u64, multiple: bool) {
        for (t, m) in self.take_mandatory(tag, multiple) {
            if m.returned {
                self.buffer.fail(
                    t,
                    Error::Unroutable {
                        reply: None,
                        returned: None,
                        exchange: m.exchange.to_string(),
                        routing_key: m.routing_key.to_string(),
                    },
                );
            }
        }
        self.buffer.ack(tag, multiple);
    }

    /// Handles `basic.nack`: the broker refused the publishes.
    pub fn nack(&self, tag: u64, multiple: bool) {
        self.take_mandatory(tag, multiple);
        self.buffer.nack(tag, multiple);
    }

    /// Handles `basic.return` for `exchange` / `routing_key`.
    pub fn returned(&self, exchange: &str, routing_key: &str) {
        if let Some(m) = self
            .mandatory
            .lock()
            .values_mut()
            .find(|m| !m.returned && &*m.exchange == exchange && &*m.routing_key == routing_key)
        {
            m.returned = true;
        }
    }

    /// The channel closed with `code`/`text` (`None`: the connection
    /// dropped). Publishes that caused a channel error are failed with it;
    /// the others are returned, in tag order, to be published again (those
    /// whose caller gave up or whose deadline passed are completed by the
    /// buffer).
    pub fn drain_after_close(&self, code: Option<u16>, text: &str) -> Vec<UnconfirmedPublish> {
        self.mandatory.lock().clear();
        let drained = self.buffer.drain();
        let mut blamed = false;
        let mut rest = Vec::with_capacity(drained.len());
        for p in drained {
            let culprit = match code {
                Some(404) => text.contains(&format!("exchange '{}'", p.destination.exchange())),
                Some(406) | Some(403) => p.message.properties.user_id.is_some(),
                _ => false,
            };
            if culprit {
                blamed = true;
                let e = crate::errors::publish_close_error(
                    code.unwrap_or(0),
                    text,
                    p.destination.exchange(),
                    p.destination.routing_key(),
                );
                p.complete(Err(e));
            } else {
                rest.push(p);
            }
        }
        let channel_error = matches!(code, Some(c) if c != 320 && c != 200);
        if channel_error && !blamed && !rest.is_empty() {
            // A channel error nobody could be blamed for: the oldest
            // unconfirmed publish is the likeliest cause; fail it rather
            // than republish it forever.
            let p = rest.remove(0);
            let e = crate::errors::publish_close_error(
                code.unwrap_or(0),
                text,
                p.destination.exchange(),
                p.destination.routing_key(),
            );
            p.complete(Err(e));
        }
        rest
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use switchyard_amqp::recovery::PublishWaiter;
    use switchyard_core::{Destination, Message, PublishOptions};

    use super::*;

    fn publish(ex: &str, rk: &str, mandatory: bool) -> (UnconfirmedPublish, PublishWaiter) {
        UnconfirmedPublish::new(
            Destination::new(ex, rk),
            Message::new(rk.to_owned()),
            PublishOptions { mandatory },
            Duration::from_secs(5),
        )
    }

    async fn outcome(w: PublishWaiter) -> String {
        match tokio::time::timeout(Duration::from_millis(50), w.wait()).await {
            Ok(Ok(())) => "ok".into(),
            Ok(Err(e)) => e.code().into(),
            Err(_) => "pending".into(),
        }
    }

    fn track_all(t: &ConfirmTracker, specs: &[(&str, &str, bool)]) -> Vec<PublishWaiter> {
        specs
            .iter()
            .enumerate()
            .map(|(i, (ex, rk, m))| {
                let (p, w) = publish(ex, rk, *m);
                t.track(i as u64 + 1, p);
                w
            })
            .collect()
    }

    async fn outcomes(ws: Vec<PublishWaiter>) -> Vec<String> {
        let mut v = Vec::new();
        for w in ws {
            v.push(outcome(w).await);
        }
        v
    }

    #[tokio::test]
    async fn multiple_ack_resolves_every_tag_up_to_and_including_it() {
        let t = ConfirmTracker::default();
        let ws = track_all(&t, &[("ex", "a", false); 5]);
        t.ack(3, true);
        assert_eq!(t.len(), 2);
        t.ack(5, false);
        assert_eq!(t.len(), 1);
        t.nack(4, false);
        assert_eq!(t.len(), 0);
        assert_eq!(outcomes(ws).await, ["ok", "ok", "ok", "publish_unconfirmed", "ok"]);
    }

    #[tokio::test]
    async fn multiple_nack_fails_only_the_covered_prefix() {
        let t = ConfirmTracker::default();
        let ws = track_all(&t, &[("ex", "a", false); 4]);
        t.ack(1, false);
        t.nack(3, true);
        t.ack(3, true); // already resolved: ignored
        assert_eq!(t.len(), 1);
        t.ack(4, true);
        assert_eq!(
            outcomes(ws).await,
            ["ok", "publish_unconfirmed", "publish_unconfirmed", "ok"]
        );
    }

    #[tokio::test]
    async fn a_return_makes_the_matching_oldest_mandatory_publish_unroutable() {
        let t = ConfirmTracker::default();
        let ws = track_all(
            &t,
            &[
                ("ex", "a", true),
                ("ex", "b", true),
                ("ex", "b", true),
                ("ex", "b", false),
            ],
        );
        t.returned("ex", "b");
        t.ack(4, true);
        assert_eq!(outcomes(ws).await, ["ok", "unroutable", "ok", "ok"]);
    }

    #[tokio::test]
    async fn channel_close_blames_the_culprit_and_hands_back_the_rest() {
        let t = ConfirmTracker::default();
        let ws = track_all(
            &t,
            &[("good", "a", false), ("missing", "a", false), ("good", "b", false)],
        );
        let again = t.drain_after_close(Some(404), "NOT_FOUND - no exchange 'missing' in vhost '/'");
        assert_eq!(
            again
                .iter()
                .map(|p| p.destination.routing_key().to_owned())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(t.len(), 0);
        let mut ws = ws.into_iter();
        let (w1, w2, w3) = (ws.next().unwrap(), ws.next().unwrap(), ws.next().unwrap());
        assert_eq!(outcome(w2).await, "exchange_not_found");
        // The others are still waiting: republished on a new channel, they complete there.
        let t2 = ConfirmTracker::default();
        for (i, p) in again.into_iter().enumerate() {
            t2.track(i as u64 + 1, p);
        }
        t2.ack(2, true);
        assert_eq!((outcome(w1).await, outcome(w3).await), ("ok".into(), "ok".into()));

        let ws = track_all(&t, &[("good", "a", false), ("good", "b", false)]);
        let held = t.drain_after_close(None, "connection lost");
        assert_eq!(held.len(), 2);
        // Handed back for republishing: their callers keep waiting.
        assert_eq!(outcomes(ws).await, ["pending", "pending"]);
        drop(held);
    }
}
