//! RPC over a broker: one reply queue per client, a correlation-id map.
//!
//! [`RpcClient::new`] opens **one** reply channel for the client's whole life
//! ([`Transport::open_reply_channel`]: an exclusive, auto-delete,
//! server-named queue, or RabbitMQ direct reply-to where the transport has
//! it). Each [`call`](RpcClient::call) puts that address in `reply_to`, a
//! fresh correlation id on the request, registers a waiter under that id
//! and publishes; each reply is handed to its waiter by the task that
//! receives it (the transport's, where it takes a
//! [`ReplySink`]; else one background task of
//! the client). Concurrent calls share the reply queue — unlike the seed,
//! which declared a queue per call.
//!
//! A call that times out fails with [`Error::RpcTimeout`] (`rpc_timeout`)
//! and removes its waiter; a reply that arrives later, or carries an unknown
//! correlation id, is dropped and counted ([`RpcClient::late_replies`]).
//! If the reply stream ends (connection lost, queue deleted), pending and
//! later calls fail with `connection_closed`.
//!
//! ```no_run
//! # async fn demo(transport: std::sync::Arc<dyn switchyard_core::Transport>) -> switchyard_core::Result<()> {
//! use std::time::Duration;
//! use switchyard_core::{rpc::RpcClient, Destination, Message};
//! let client = RpcClient::new(transport).await?;
//! let reply = client
//!     .call(&Destination::queue("extraction.requests"), Message::new("ping"), Duration::from_secs(5))
//!     .await?;
//! # let _ = reply; Ok(()) }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::codec::JsonCodec;
use crate::error::{Error, Result};
use crate::message::{new_id, Message};
use crate::topology::Destination;
use crate::transport::{CancelHandle, Publisher, ReplySink, Transport};

struct Shared {
    pending: Mutex<HashMap<Arc<str>, oneshot::Sender<Message>>>,
    /// Why the reply stream ended, once it has.
    closed: Mutex<Option<String>>,
    late: AtomicU64,
    received: AtomicU64,
}

impl Shared {
    fn closed_error(&self) -> Option<Error> {
        self.closed.lock().as_ref().map(|why| Error::ConnectionClosed {
            reply: None,
            message: format!("rpc reply channel closed: {why}"),
        })
    }
}

/// Removes a call's waiter when the call ends in any way (reply, timeout,
/// publish error, or the call's future being dropped).
struct WaiterGuard<'a> {
    shared: &'a Shared,
    id: Arc<str>,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.id);
    }
}

/// An RPC client; see the [module docs](self). Share it (`Arc<RpcClient>`)
/// rather than creating one per call.
pub struct RpcClient {
    /// Held so that the connection lives as long as the client (a transport
    /// may close its connection when its last handle is dropped).
    _transport: Arc<dyn Transport>,
    shared: Arc<Shared>,
    publisher: Arc<dyn Publisher>,
    reply_to: Arc<str>,
    cancel: CancelHandle,
    reader: JoinHandle<()>,
}

impl fmt::Debug for RpcClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RpcClient")
            .field("reply_to", &self.reply_to)
            .field("pending", &self.pending_calls())
            .field("late_replies", &self.late_replies())
            .finish()
    }
}

impl RpcClient {
    /// Opens the client's reply channel and starts reading replies.
    pub async fn new(transport: Arc<dyn Transport>) -> Result<Self> {
        let shared = Arc::new(Shared {
            pending: Mutex::new(HashMap::new()),
            closed: Mutex::new(None),
            late: AtomicU64::new(0),
            received: AtomicU64::new(0),
        });
        // Replies go straight to their waiter from the task that receives
        // them where the transport can (no hop through the reader task);
        // the reader gets the rest and the end of the stream.
        let sink_shared = shared.clone();
        let sink: ReplySink = Arc::new(move |m| deliver(&sink_shared, m));
        let channel = transport.open_reply_channel_with(sink).await?;
        let publisher: Arc<dyn Publisher> = match channel.publisher {
            Some(p) => p,
            None => Arc::new(TransportPublisher(transport.clone())),
        };
        let mut replies = channel.replies;
        let cancel = replies.cancel_handle();
        let reader_shared = shared.clone();
        let reply_to: Arc<str> = channel.reply_to.into();
        let queue = reply_to.clone();
        let reader = tokio::spawn(async move {
            let shared = reader_shared;
            let why = loop {
                match replies.next().await {
                    Some(Ok(d)) => {
                        if d.needs_settlement() {
                            // Reply channels are auto-ack; settle anyway if a transport did not.
                            let (m, _, settler) = d.into_parts();
                            let _ = settler.ack().await;
                            deliver(&shared, m);
                        } else {
                            deliver(&shared, d.message);
                        }
                    }
                    Some(Err(e)) => break e.to_string(),
                    None => break "the reply stream ended".to_owned(),
                }
            };
            tracing::warn!(reply_to = %queue, reason = %why, "rpc reply channel closed");
            *shared.closed.lock() = Some(why);
            // Dropping the senders wakes every pending call with an error.
            shared.pending.lock().clear();
        });
        Ok(RpcClient {
            _transport: transport,
            shared,
            publisher,
            reply_to,
            cancel,
            reader,
        })
    }

    /// The address replies come back to (the `reply_to` of every request).
    pub fn reply_to(&self) -> &str {
        &self.reply_to
    }

    /// Calls waiting for a reply right now.
    pub fn pending_calls(&self) -> usize {
        self.shared.pending.lock().len()
    }

    /// Replies dropped because no call was waiting for their correlation id
    /// (late after a timeout, or unknown).
    pub fn late_replies(&self) -> u64 {
        self.shared.late.load(Ordering::Relaxed)
    }

    /// Replies received in total (matched or not).
    pub fn replies_received(&self) -> u64 {
        self.shared.received.load(Ordering::Relaxed)
    }

    /// Sends `message` to `dest` and waits up to `timeout` (publish
    /// included) for the reply. Sets `reply_to` on the request. The
    /// request's correlation id is kept when it has one (so a caller can
    /// trace the call under its own id) and is a fresh random id otherwise;
    /// the reply carries the same id.
    ///
    /// Errors: [`Error::RpcTimeout`] when no reply came in time (the waiter
    /// is removed; a later reply is counted in
    /// [`late_replies`](RpcClient::late_replies)), the publish error if the
    /// request could not be published, [`Error::ConnectionClosed`] if the
    /// reply channel is gone, and [`Error::InvalidConfig`] (variable
    /// `correlation_id`) when a call of this client with the same
    /// correlation id is still waiting for its reply (its reply could not
    /// be told apart).
    ///
    /// ```no_run
    /// # async fn demo(client: switchyard_core::rpc::RpcClient) -> switchyard_core::Result<()> {
    /// use std::time::Duration;
    /// use switchyard_core::{Destination, Message};
    /// let request = Message::new("ping").with_correlation_id("order-42");
    /// let reply = client.call(&Destination::queue("pings"), request, Duration::from_secs(5)).await?;
    /// assert_eq!(reply.properties.correlation_id.as_deref(), Some("order-42"));
    /// # Ok(()) }
    /// ```
    pub async fn call(&self, dest: &Destination, mut message: Message, timeout: Duration) -> Result<Message> {
        if let Some(e) = self.shared.closed_error() {
            return Err(e);
        }
        let id = match message.properties.correlation_id.take() {
            Some(id) if !id.is_empty() => id,
            _ => new_id().into(),
        };
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = self.shared.pending.lock();
            if pending.contains_key(&id) {
                return Err(Error::InvalidConfig {
                    variable: "correlation_id".into(),
                    value: id.to_string(),
                    reason: "a call of this RPC client with this correlation id is still waiting for its reply; \
                             correlation ids must be unique among calls in flight"
                        .into(),
                });
            }
            pending.insert(id.clone(), tx);
        }
        let _guard = WaiterGuard {
            shared: &self.shared,
            id: id.clone(),
        };
        // The reader may have closed between the check and the insert.
        if let Some(e) = self.shared.closed_error() {
            return Err(e);
        }
        message.properties.reply_to = Some(self.reply_to.clone());
        message.properties.correlation_id = Some(id);
        let closed = || {
            self.shared.closed_error().unwrap_or_else(|| Error::ConnectionClosed {
                reply: None,
                message: "rpc reply channel closed".into(),
            })
        };
        // The reply can come before the request's confirm: whichever is
        // first decides. A reply proves the request arrived; a failed
        // publish (no such exchange, unroutable) fails the call at once.
        let exchange_call = async {
            let publish = self.publisher.publish(dest, message);
            tokio::pin!(publish);
            let mut rx = rx;
            tokio::select! {
                biased;
                sent = &mut publish => {
                    sent?;
                    rx.await.map_err(|_| closed())
                }
                reply = &mut rx => reply.map_err(|_| closed()),
            }
        };
        match tokio::time::timeout(timeout, exchange_call).await {
            Ok(r) => r,
            Err(_) => {
                tracing::debug!(destination = %dest, ?timeout, "rpc call timed out");
                Err(Error::RpcTimeout {
                    destination: dest.to_string(),
                    timeout,
                })
            }
        }
    }

    /// Calls with a JSON request and decodes a JSON reply. A reply that does
    /// not decode is [`Error::DecodeFailed`].
    pub async fn call_json<Req, Resp>(&self, dest: &Destination, request: &Req, timeout: Duration) -> Result<Resp>
    where
        Req: Serialize + ?Sized,
        Resp: DeserializeOwned,
    {
        let message = JsonCodec.to_message(request)?;
        let reply = self.call(dest, message, timeout).await?;
        JsonCodec.from_message(&reply)
    }

    /// Cancels the reply consumer; pending and later calls fail with
    /// `connection_closed`.
    pub async fn close(&self) -> Result<()> {
        self.cancel.cancel().await
    }
}

impl Drop for RpcClient {
    fn drop(&mut self) {
        // Dropping the reader drops the subscription, which ends the consumer.
        self.reader.abort();
    }
}

fn deliver(shared: &Shared, reply: Message) {
    shared.received.fetch_add(1, Ordering::Relaxed);
    let waiter = reply
        .properties
        .correlation_id
        .as_deref()
        .and_then(|cid| shared.pending.lock().remove(cid));
    match waiter {
        Some(tx) => {
            if tx.send(reply).is_err() {
                // The call ended between our lookup and the send.
                shared.late.fetch_add(1, Ordering::Relaxed);
            }
        }
        None => {
            shared.late.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(correlation_id = ?reply.properties.correlation_id, "rpc reply without a waiting call dropped");
        }
    }
}

/// Publishes through the transport when the reply channel names no publisher.
struct TransportPublisher(Arc<dyn Transport>);

#[async_trait::async_trait]
impl Publisher for TransportPublisher {
    async fn publish_with(
        &self,
        dest: &Destination,
        message: Message,
        options: crate::transport::PublishOptions,
    ) -> Result<()> {
        self.0.publish_with(dest, message, options).await
    }
    async fn publish_batch(&self, dest: &Destination, messages: Vec<Message>) -> Result<()> {
        self.0.publish_batch(dest, messages).await
    }
}

#[cfg(test)]
mod tests {
    //! The fake broker has no direct reply-to, so these tests run the
    //! default [`Transport::open_reply_channel`] (a temporary queue) and what
    //! only it can show: the reply queue deleted under the client, stray
    //! replies. Timeouts, late replies, publish and decode errors are tested
    //! on memory in tests/rpc.rs and in the `runtime::rpc_*` conformance
    //! scenarios.
    use super::*;
    use crate::handler::{handler_fn, Json};
    use crate::transport::{Admin, Publisher};
    use crate::worker::fake::Fake;
    use crate::worker::Worker;

    fn transport(fake: &Arc<Fake>) -> Arc<dyn Transport> {
        fake.clone()
    }

    #[tokio::test]
    async fn round_trip_concurrent_calls_share_one_reply_queue() {
        let fake = Fake::new();
        fake.add_queue("double");
        let h = Worker::new(transport(&fake))
            .route(
                "double",
                handler_fn(|Json(n): Json<u64>| async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    Json(n * 2)
                }),
            )
            .start()
            .await
            .unwrap();
        let client = Arc::new(RpcClient::new(transport(&fake)).await.unwrap());
        assert!(client.reply_to().starts_with("amq.gen-"));
        let dest = Destination::queue("double");
        let calls = (0..20u64).map(|i| {
            let c = client.clone();
            let d = dest.clone();
            tokio::spawn(async move { c.call_json::<_, u64>(&d, &i, Duration::from_secs(5)).await })
        });
        for (i, call) in calls.enumerate() {
            assert_eq!(call.await.unwrap().unwrap(), 2 * i as u64);
        }
        let reply = client
            .call(
                &dest,
                Message::new("21").with_correlation_id("mine"),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_eq!(&reply.body[..], b"42");
        let cid = reply.properties.correlation_id.unwrap();
        assert_eq!(&*cid, "mine", "the client keeps the caller's correlation id");
        assert_eq!(client.pending_calls(), 0);
        assert_eq!(client.late_replies(), 0);
        assert_eq!(client.replies_received(), 21);
        h.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn closed_reply_channel_fails_pending_and_later_calls() {
        let fake = Fake::new();
        fake.add_queue("void"); // nobody answers
        let client = Arc::new(RpcClient::new(transport(&fake)).await.unwrap());
        let c2 = client.clone();
        let pending = tokio::spawn(async move {
            c2.call(&Destination::queue("void"), Message::new("x"), Duration::from_secs(10))
                .await
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(client.pending_calls(), 1);
        fake.delete_queue(client.reply_to()).await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("pending call woken")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.code(), "connection_closed");
        assert!(e.to_string().contains("rpc reply channel closed"), "{e}");
        let e = client
            .call(&Destination::queue("void"), Message::new("x"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(e.code(), "connection_closed");
        assert_eq!(client.pending_calls(), 0);
    }

    #[tokio::test]
    async fn unknown_correlation_ids_are_dropped_and_counted_and_close_ends_calls() {
        let fake = Fake::new();
        let client = RpcClient::new(transport(&fake)).await.unwrap();
        let to_client = Destination::queue(client.reply_to());
        fake.publish(&to_client, Message::new("stray").with_correlation_id("nobody"))
            .await
            .unwrap();
        fake.publish(&to_client, Message::new("no id")).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while client.late_replies() < 2 {
            assert!(tokio::time::Instant::now() < deadline, "stray replies not counted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(client.replies_received(), 2);
        assert_eq!(client.pending_calls(), 0);
        client.close().await.unwrap();
        fake.add_queue("void");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let e = client
                .call(
                    &Destination::queue("void"),
                    Message::new("x"),
                    Duration::from_millis(50),
                )
                .await
                .unwrap_err();
            if e.code() == "connection_closed" {
                break;
            }
            assert_eq!(e.code(), "rpc_timeout");
            assert!(tokio::time::Instant::now() < deadline, "close never took effect");
        }
        assert_eq!(client.pending_calls(), 0);
    }
}
