//! A tiny in-process broker for the Worker and RpcClient unit tests:
//! default exchange only, manual and auto ack, prefetch, requeue with the
//! redelivered flag, reject into a per-queue dead list, cancel, delete.
//! The real in-process broker is the `switchyard-memory` crate; this fake
//! keeps core's unit tests free of it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;

use crate::error::{Error, Result};
use crate::message::Message;
use crate::topology::{Binding, Destination, ExchangeSpec, QueueInfo, QueueSpec};
use crate::transport::{
    Acker, Admin, Cancel, CancelHandle, Capabilities, ConsumeOptions, Consumer, Delivery, DeliveryInfo, PublishOptions,
    Publisher, Subscription, Transport,
};

#[derive(Default)]
struct Queue {
    ready: VecDeque<(Message, bool)>,
    /// tag -> (message, consumer id)
    unacked: HashMap<u64, (Message, u64)>,
    dead: Vec<Message>,
    consumers: usize,
    deleted: bool,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, Queue>,
    next_tag: u64,
}

#[derive(Default)]
pub(crate) struct Core {
    state: Mutex<State>,
    ids: AtomicU64,
    /// Fail every publish while set.
    pub(crate) fail_publish: AtomicBool,
}

/// The fake broker (a handle; clones share the broker).
#[derive(Clone, Default)]
pub(crate) struct Fake(Arc<Core>);

impl std::ops::Deref for Fake {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.0
    }
}

impl Fake {
    pub(crate) fn new() -> Arc<Fake> {
        Arc::new(Fake::default())
    }
}

impl Core {
    pub(crate) fn add_queue(&self, name: &str) {
        self.state.lock().queues.entry(name.to_owned()).or_default();
    }
    pub(crate) fn ready(&self, q: &str) -> usize {
        self.state.lock().queues.get(q).map_or(0, |q| q.ready.len())
    }
    pub(crate) fn unacked(&self, q: &str) -> usize {
        self.state.lock().queues.get(q).map_or(0, |q| q.unacked.len())
    }
    pub(crate) fn dead(&self, q: &str) -> Vec<Message> {
        self.state.lock().queues.get(q).map_or(Vec::new(), |q| q.dead.clone())
    }
}

struct FakeAcker {
    fake: Fake,
    queue: String,
}

#[async_trait]
impl Acker for FakeAcker {
    async fn ack(&self, tag: u64) -> Result<()> {
        let mut st = self.fake.state.lock();
        let q = st.queues.get_mut(&self.queue).ok_or_else(|| self.err(tag))?;
        q.unacked.remove(&tag).map(|_| ()).ok_or_else(|| self.err(tag))
    }
    async fn nack(&self, tag: u64, requeue: bool) -> Result<()> {
        let mut st = self.fake.state.lock();
        let q = st.queues.get_mut(&self.queue).ok_or_else(|| self.err(tag))?;
        let (m, _) = q.unacked.remove(&tag).ok_or_else(|| self.err(tag))?;
        if requeue {
            q.ready.push_front((m, true));
        } else {
            q.dead.push(m);
        }
        Ok(())
    }
}

impl FakeAcker {
    fn err(&self, tag: u64) -> Error {
        Error::SettleFailed {
            queue: self.queue.clone(),
            delivery_tag: tag,
            message: "unknown delivery tag".into(),
        }
    }
}

struct FakeCancel(Arc<AtomicBool>);

#[async_trait]
impl Cancel for FakeCancel {
    async fn cancel(&self) -> Result<()> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl Publisher for Fake {
    async fn publish_with(&self, dest: &Destination, message: Message, _o: PublishOptions) -> Result<()> {
        if self.fail_publish.load(Ordering::SeqCst) {
            return Err(Error::transport("publish failure injected"));
        }
        if !dest.exchange().is_empty() {
            return Err(Error::ExchangeNotFound {
                reply: None,
                exchange: dest.exchange().into(),
            });
        }
        if let Some(q) = self.state.lock().queues.get_mut(dest.routing_key()) {
            q.ready.push_back((message, false));
        }
        Ok(())
    }
}

#[async_trait]
impl Consumer for Fake {
    async fn consume(&self, queue: &str, options: ConsumeOptions) -> Result<Subscription> {
        let me = self.clone();
        {
            let mut st = me.state.lock();
            let q = st.queues.get_mut(queue).ok_or_else(|| Error::QueueNotFound {
                reply: None,
                queue: queue.into(),
            })?;
            q.consumers += 1;
        }
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let cancelled = Arc::new(AtomicBool::new(false));
        let queue_name: Arc<str> = Arc::from(queue);
        let tag: Arc<str> = Arc::from(format!("fake-{id}"));
        let acker: Arc<dyn Acker> = Arc::new(FakeAcker {
            fake: me.clone(),
            queue: queue.to_owned(),
        });
        let st = (
            me,
            cancelled.clone(),
            queue_name.clone(),
            tag.clone(),
            acker,
            options,
            false,
        );
        let stream = futures_util::stream::unfold(st, move |st| async move {
            let (fake, cancelled, queue, ctag, acker, options, finished) = st;
            if finished {
                return None;
            }
            loop {
                let item = {
                    let mut s = fake.state.lock();
                    let next_tag = s.next_tag + 1;
                    let q = s.queues.get_mut(&*queue);
                    match q {
                        None => Some(Err(Error::ConsumerCancelled {
                            queue: queue.to_string(),
                        })),
                        Some(q) if q.deleted => Some(Err(Error::ConsumerCancelled {
                            queue: queue.to_string(),
                        })),
                        Some(q) => {
                            if cancelled.load(Ordering::SeqCst) {
                                q.consumers = q.consumers.saturating_sub(1);
                                return None;
                            }
                            let mine = q.unacked.values().filter(|(_, c)| *c == id).count();
                            if options.prefetch != 0 && !options.auto_ack && mine >= options.prefetch as usize {
                                None
                            } else if let Some((m, redelivered)) = q.ready.pop_front() {
                                let info = DeliveryInfo {
                                    delivery_tag: next_tag,
                                    redelivered,
                                    exchange: Arc::from(""),
                                    routing_key: queue.clone(),
                                    queue: queue.clone(),
                                    consumer_tag: ctag.clone(),
                                };
                                let d = if options.auto_ack {
                                    Delivery::auto_acked(m, info)
                                } else {
                                    q.unacked.insert(next_tag, (m.clone(), id));
                                    Delivery::new(m, info, acker.clone())
                                };
                                s.next_tag = next_tag;
                                Some(Ok(d))
                            } else {
                                None
                            }
                        }
                    }
                };
                match item {
                    Some(Ok(d)) => return Some((Ok(d), (fake, cancelled, queue, ctag, acker, options, false))),
                    Some(Err(e)) => return Some((Err(e), (fake, cancelled, queue, ctag, acker, options, true))),
                    None => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            }
        });
        Ok(Subscription::new(
            queue_name,
            tag,
            Box::pin(stream),
            CancelHandle::new(Arc::new(FakeCancel(cancelled))),
        ))
    }
}

#[async_trait]
impl Admin for Fake {
    async fn declare_exchange(&self, _spec: &ExchangeSpec) -> Result<()> {
        Ok(())
    }
    async fn declare_queue(&self, spec: &QueueSpec) -> Result<QueueInfo> {
        let name = if spec.name.is_empty() {
            format!("amq.gen-{}", crate::message::new_id())
        } else {
            spec.name.clone()
        };
        let mut st = self.state.lock();
        let q = st.queues.entry(name.clone()).or_default();
        Ok(QueueInfo {
            name,
            message_count: q.ready.len() as u32,
            consumer_count: q.consumers as u32,
        })
    }
    async fn bind(&self, _b: &Binding) -> Result<()> {
        Ok(())
    }
    async fn unbind(&self, _b: &Binding) -> Result<()> {
        Ok(())
    }
    async fn delete_exchange(&self, _name: &str) -> Result<()> {
        Ok(())
    }
    async fn delete_queue(&self, name: &str) -> Result<u32> {
        let mut st = self.state.lock();
        match st.queues.get_mut(name) {
            Some(q) => {
                q.deleted = true;
                let n = q.ready.len() as u32;
                q.ready.clear();
                Ok(n)
            }
            None => Ok(0),
        }
    }
    async fn purge_queue(&self, name: &str) -> Result<u32> {
        let mut st = self.state.lock();
        Ok(st.queues.get_mut(name).map_or(0, |q| {
            let n = q.ready.len() as u32;
            q.ready.clear();
            n
        }))
    }
    async fn queue_info(&self, name: &str) -> Result<QueueInfo> {
        let st = self.state.lock();
        match st.queues.get(name) {
            Some(q) if !q.deleted => Ok(QueueInfo {
                name: name.into(),
                message_count: q.ready.len() as u32,
                consumer_count: q.consumers as u32,
            }),
            _ => Err(Error::QueueNotFound {
                reply: None,
                queue: name.into(),
            }),
        }
    }
    async fn exchange_exists(&self, name: &str) -> Result<bool> {
        Ok(name.is_empty())
    }
}

#[async_trait]
impl Transport for Fake {
    fn name(&self) -> &'static str {
        "fake"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }
    async fn health_check(&self) -> Result<()> {
        Ok(())
    }
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}
