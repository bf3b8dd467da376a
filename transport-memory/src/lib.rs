//! # switchyard-memory
//!
//! An in-process broker with RabbitMQ's (3.10) AMQP 0-9-1 semantics, for
//! tests and single-process applications.
//!
//! A [`MemoryBroker`] holds exchanges, queues and bindings;
//! [`MemoryBroker::connect`] opens a connection, a [`MemoryTransport`] that
//! implements switchyard's [`Transport`]. What it does, as RabbitMQ does:
//!
//! - the default exchange and direct, topic (`*` one word, `#` zero or
//!   more; the empty key is zero words), fanout and headers (`x-match`
//!   `all`/`any`/`all-with-x`/`any-with-x`) exchanges, exchange-to-exchange
//!   bindings and `alternate-exchange`;
//! - durable, exclusive (owner connection only) and auto-delete queues,
//!   server-named queues (`amq.gen-…`), idempotent declares and
//!   [`Error::PreconditionFailed`](switchyard_core::Error::PreconditionFailed) on a conflicting redeclare;
//! - prefetch, round-robin competing consumers, exclusive consumers,
//!   auto-ack, cancel, broker-side cancel when a queue is deleted;
//! - ack, nack/reject with requeue (back to the original position, with
//!   `redelivered`), and dead-lettering with `x-death` on rejection, TTL
//!   expiry (per-message TTL only at the head) and max-length overflow
//!   (`drop-head`, `reject-publish`, `reject-publish-dlx`);
//! - priority queues (`x-max-priority`), quorum queues' `x-delivery-limit`,
//!   publisher confirms, mandatory publishes ([`Error::Unroutable`](switchyard_core::Error::Unroutable)) and
//!   direct reply-to (`amq.rabbitmq.reply-to`).
//!
//! Closing or dropping a connection cancels its consumers, requeues their
//! unacked deliveries and deletes its exclusive queues.
//!
//! Refusals carry what RabbitMQ would have said: the error's
//! [`BrokerReply`](switchyard_core::BrokerReply) has RabbitMQ's reply code
//! and text (403 `ACCESS_REFUSED` for `amq.` names, the default exchange and
//! internal exchanges; 404, 405, 406 as RabbitMQ answers them) and the AMQP
//! class and method ids of the refused operation.
//!
//! # Virtual time
//!
//! The broker reads tokio's clock ([`tokio::time::Instant`]) for message
//! TTLs, per-message expiration, `x-expires` leases and its timers, so under
//! a paused clock (`#[tokio::test(start_paused = true)]`, tokio's
//! `test-util` feature) time-dependent behaviour runs instantly and
//! deterministically: a 5-minute TTL dead-letters as soon as the test has
//! nothing else to do, with no real waiting.
//!
//! ```
//! use std::time::Duration;
//! use switchyard_core::{Admin, ConsumeOptions, Consumer, Destination, Message, Publisher, QueueSpec};
//! use switchyard_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> switchyard_core::Result<()> {
//! // In a test: #[tokio::test(start_paused = true)]
//! let conn = MemoryBroker::new().connect();
//! conn.declare_queue(&QueueSpec::new("dead")).await?;
//! let work = QueueSpec::new("work")
//!     .message_ttl(Duration::from_secs(300))
//!     .dead_letter("", Some("dead"));
//! conn.declare_queue(&work).await?;
//! conn.publish(&Destination::queue("work"), Message::new("late")).await?;
//! let mut dead = conn.consume("dead", ConsumeOptions::default()).await?;
//! let letter = dead.next().await.expect("a dead letter")?; // 5 virtual minutes later
//! assert_eq!(&letter.message.body[..], b"late");
//! # Ok(())
//! # }
//! ```
//!
//! Where it knowingly differs from RabbitMQ (for speed, never for safety):
//!
//! - with a prefetch of 16 or more, in-order acks top the consumer's window
//!   up when its buffer of received-but-unread deliveries runs dry rather
//!   than after every ack (below 16, every ack refills at once), so a queue
//!   depth read at that instant may count a few messages RabbitMQ would
//!   already have sent;
//! - publisher flow control: a publish that leaves a queue with consumers
//!   more than 2048 messages deep returns once they have brought it down to
//!   1024 (the message is enqueued first, so nothing waits unconfirmed); it
//!   gives up after 2 ms without deliveries, so a slow or stalled consumer
//!   never holds publishers back, and a queue without consumers never does;
//! - no persistence (durable is recorded, not written), no streams, no
//!   `user_id` check; `x-expires` needs a tokio runtime (without one, TTL
//!   expiry and `x-delayed-message` holds fall due on the next operation).
//!
//! ```
//! use switchyard_core::{Admin, ConsumeOptions, Consumer, Destination, Message, Publisher, QueueSpec};
//! use switchyard_memory::MemoryBroker;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> switchyard_core::Result<()> {
//! let broker = MemoryBroker::new();
//! let conn = broker.connect();
//! conn.declare_queue(&QueueSpec::new("orders")).await?;
//! conn.publish(&Destination::queue("orders"), Message::new("hello")).await?;
//!
//! let mut sub = conn.consume("orders", ConsumeOptions::default().prefetch(10)).await?;
//! let delivery = sub.next().await.expect("a delivery")?;
//! assert_eq!(&delivery.message.body[..], b"hello");
//! delivery.ack().await?;
//! assert_eq!(conn.queue_info("orders").await?.message_count, 0);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod arguments;
mod broker;
mod consumer;
mod reply;
mod routing;

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use switchyard_core::transport::ReplyChannel;
use switchyard_core::{
    Admin, Binding, Capabilities, ConsumeOptions, Consumer, DeleteIf, Destination, ExchangeSpec, GetOk, Message,
    PublishOptions, Publisher, QueueInfo, QueueSpec, Result, Subscription, Transport,
};

use tokio::time::Instant;

use crate::broker::{Broker, FLOW_STALL, REPLY_TO};

/// A shared in-memory broker. Cloning is cheap: clones share one broker.
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<Broker>,
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MemoryBroker")
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBroker {
    /// A new, empty broker (with the default and `amq.*` exchanges).
    pub fn new() -> Self {
        MemoryBroker { inner: Broker::new() }
    }

    /// Opens a connection to this broker.
    pub fn connect(&self) -> Arc<MemoryTransport> {
        let conn = self.inner.state.lock().open_conn();
        Arc::new(MemoryTransport {
            broker: self.inner.clone(),
            conn,
        })
    }
}

/// One connection to a [`MemoryBroker`]; implements [`Transport`].
///
/// Dropping it closes the connection (see [`Transport::close`]).
pub struct MemoryTransport {
    broker: Arc<Broker>,
    conn: u64,
}

impl fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("connection", &self.conn)
            .finish()
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        let conn = self.conn;
        self.broker.with(|st, fx| st.close_conn(conn, fx));
    }
}

impl MemoryTransport {
    /// A connection to a fresh broker of its own. Use
    /// [`MemoryBroker::connect`] to open several connections to one broker.
    #[allow(clippy::new_ret_no_self)]
    pub fn new() -> Arc<MemoryTransport> {
        MemoryBroker::new().connect()
    }

    /// The broker this connection belongs to (to open more connections).
    pub fn broker(&self) -> MemoryBroker {
        MemoryBroker {
            inner: self.broker.clone(),
        }
    }

    /// Publishes under the broker lock; returns a queue to wait on when
    /// flow control applies.
    #[inline(always)]
    fn publish_sync(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<Option<Arc<str>>> {
        let conn = self.conn;
        self.broker.with(|st, fx| {
            st.publish(
                conn,
                dest.exchange_arc(),
                dest.routing_key_arc(),
                message,
                options.mandatory,
                fx,
            )
        })
    }
}

#[async_trait]
impl Publisher for MemoryTransport {
    async fn publish_with(&self, dest: &Destination, message: Message, options: PublishOptions) -> Result<()> {
        if let Some(queue) = self.publish_sync(dest, message, options)? {
            // Boxed: keeps the common (non-waiting) publish future small.
            Box::pin(flow_wait(&self.broker, &queue)).await;
        }
        Ok(())
    }

    async fn publish(&self, dest: &Destination, message: Message) -> Result<()> {
        if let Some(queue) = self.publish_sync(dest, message, PublishOptions::default())? {
            // Boxed: keeps the common (non-waiting) publish future small.
            Box::pin(flow_wait(&self.broker, &queue)).await;
        }
        Ok(())
    }

    async fn publish_batch(&self, dest: &Destination, messages: Vec<Message>) -> Result<()> {
        for m in messages {
            if let Some(queue) = self.publish_sync(dest, m, PublishOptions::default())? {
                // Boxed: keeps the common (non-waiting) publish future small.
                Box::pin(flow_wait(&self.broker, &queue)).await;
            }
        }
        Ok(())
    }
}

/// Publisher flow control, like RabbitMQ's credit flow: a publish that left
/// a queue with consumers more than [`FLOW_HIGH`](broker::FLOW_HIGH) messages deep waits until
/// the consumers have brought it down to [`FLOW_LOW`](broker::FLOW_LOW), or until they have
/// taken nothing for [`FLOW_STALL`] (then flow control is off for that queue
/// until they have taken [`FLOW_HIGH`](broker::FLOW_HIGH) more). The message is already enqueued (and
/// thus confirmed); only the return is delayed, so memory stays bounded and
/// a fast producer does not starve its consumers of CPU.
async fn flow_wait(broker: &Arc<Broker>, queue: &str) {
    let mut last = None;
    let mut since = Instant::now();
    loop {
        let notified = broker.drained.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let Some(delivered) = broker.state.lock().flow_status(queue) else {
            return;
        };
        if last != Some(delivered) {
            last = Some(delivered);
            since = Instant::now();
        } else if since.elapsed() >= FLOW_STALL {
            broker.state.lock().flow_stalled(queue);
            return;
        }
        let _ = tokio::time::timeout(FLOW_STALL, notified).await;
    }
}

#[async_trait]
impl Consumer for MemoryTransport {
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        let conn = self.conn;
        let (cid, queue, outbox) = self.broker.with(|st, fx| st.consume(conn, queue, &options, fx))?;
        let tag: Arc<str> = if options.consumer_tag.is_empty() {
            Arc::from(format!("amq.ctag-{}", &switchyard_core::message::new_id()[..22]))
        } else {
            Arc::from(options.consumer_tag.as_str())
        };
        Ok(consumer::subscription(
            self.broker.clone(),
            cid,
            queue,
            tag,
            outbox,
            options.auto_ack,
        ))
    }

    async fn get(&self, queue: &str, auto_ack: bool) -> Result<Option<GetOk>> {
        let conn = self.conn;
        let Some((item, left, channel)) = self.broker.with(|st, fx| st.get(conn, queue, auto_ack, fx))? else {
            return Ok(None);
        };
        let delivery = consumer::got(self.broker.clone(), Arc::from(queue), item, channel);
        Ok(Some(GetOk {
            delivery,
            message_count: left,
        }))
    }
}

#[async_trait]
impl Admin for MemoryTransport {
    async fn declare_exchange(&self, spec: &ExchangeSpec) -> Result<()> {
        let conn = self.conn;
        self.broker.with(|st, _| st.declare_exchange(conn, spec))
    }

    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let conn = self.conn;
        self.broker.with(|st, fx| st.declare_queue(conn, spec, fx))
    }

    async fn bind(&self, binding: &Binding) -> Result<()> {
        let conn = self.conn;
        self.broker.with(|st, _| st.bind(conn, binding))
    }

    async fn unbind(&self, binding: &Binding) -> Result<()> {
        let conn = self.conn;
        self.broker.with(|st, _| st.unbind(conn, binding))
    }

    async fn delete_exchange(&self, name: &str) -> Result<()> {
        let conn = self.conn;
        self.broker.with(|st, _| st.delete_exchange(conn, name, false))
    }

    async fn delete_queue(&self, name: &str) -> Result<u32> {
        let conn = self.conn;
        self.broker.with(|st, fx| st.delete_queue(conn, name, false, false, fx))
    }

    async fn delete_queue_if(&self, name: &str, only: DeleteIf) -> Result<u32> {
        let conn = self.conn;
        self.broker
            .with(|st, fx| st.delete_queue(conn, name, only.unused, only.empty, fx))
    }

    async fn delete_exchange_if_unused(&self, name: &str) -> Result<()> {
        let conn = self.conn;
        self.broker.with(|st, _| st.delete_exchange(conn, name, true))
    }

    async fn purge_queue(&self, name: &str) -> Result<u32> {
        let conn = self.conn;
        self.broker.with(|st, fx| st.purge_queue(conn, name, fx))
    }

    async fn queue_info(&self, name: &str) -> Result<QueueInfo> {
        let conn = self.conn;
        self.broker.with(|st, fx| st.queue_info(conn, name, fx))
    }

    async fn exchange_exists(&self, name: &str) -> Result<bool> {
        let conn = self.conn;
        self.broker.with(|st, _| st.exchange_exists(conn, name))
    }
}

/// Publishes through a connection, rewriting `reply_to:
/// amq.rabbitmq.reply-to` to this client's reply address, as RabbitMQ does
/// on the channel that consumes direct replies.
struct ReplyPublisher {
    broker: Arc<Broker>,
    conn: u64,
    address: Arc<str>,
}

#[async_trait]
impl Publisher for ReplyPublisher {
    async fn publish_with(&self, dest: &Destination, mut message: Message, options: PublishOptions) -> Result<()> {
        if message.properties.reply_to.as_deref() == Some(REPLY_TO) {
            message.properties.reply_to = Some(self.address.clone());
        }
        let conn = self.conn;
        self.broker
            .with(|st, fx| {
                st.publish(
                    conn,
                    dest.exchange_arc(),
                    dest.routing_key_arc(),
                    message,
                    options.mandatory,
                    fx,
                )
            })
            .map(|_| ())
    }
}

#[async_trait]
impl Transport for MemoryTransport {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            stream_queues: false,
            consistent_hash_exchange: false,
            ..Capabilities::ALL
        }
    }

    async fn health_check(&self) -> Result<()> {
        self.broker.state.lock().check_conn(self.conn)
    }

    async fn close(&self) -> Result<()> {
        let conn = self.conn;
        self.broker.with(|st, fx| {
            st.check_conn(conn)?;
            st.close_conn(conn, fx);
            Ok(())
        })
    }

    async fn open_reply_channel(&self) -> Result<ReplyChannel> {
        let conn = self.conn;
        let (cid, address, outbox) = self.broker.with(|st, _| st.consume_reply(conn))?;
        let tag: Arc<str> = Arc::from(format!("amq.ctag-{}", &switchyard_core::message::new_id()[..22]));
        let replies = consumer::subscription(self.broker.clone(), cid, address.clone(), tag, outbox, true);
        let publisher = ReplyPublisher {
            broker: self.broker.clone(),
            conn,
            address,
        };
        Ok(ReplyChannel {
            reply_to: REPLY_TO.to_owned(),
            replies,
            publisher: Some(Arc::new(publisher)),
        })
    }
}
