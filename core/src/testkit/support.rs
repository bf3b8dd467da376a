//! Scenario context and assertion helpers.

use std::sync::Arc;

use parking_lot::Mutex;

use super::TransportFactory;
use crate::transport::Transport;

/// What a scenario gets: the transport under test, a way to open more
/// connections, unique names, and cleanup of what it declared.
pub struct Ctx<'f> {
    factory: &'f dyn TransportFactory,
    transport: Arc<dyn Transport>,
    prefix: String,
    queues: Mutex<Vec<String>>,
    exchanges: Mutex<Vec<String>>,
}

impl<'f> Ctx<'f> {
    pub(crate) fn new(factory: &'f dyn TransportFactory, transport: Arc<dyn Transport>, case: &str) -> Self {
        let short: String = case
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        Ctx {
            factory,
            transport,
            prefix: format!("sy-conf.{short}.{}", &crate::message::new_id()[..8]),
            queues: Mutex::new(Vec::new()),
            exchanges: Mutex::new(Vec::new()),
        }
    }

    /// The transport under test.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// A second, independent connection to the same broker.
    pub async fn connect(&self) -> Arc<dyn Transport> {
        self.factory.connect().await
    }

    /// A name unique to this run of this scenario, for a queue or exchange.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}.{suffix}", self.prefix)
    }

    /// A unique queue name, deleted after the scenario.
    pub fn queue_name(&self, suffix: &str) -> String {
        let n = self.name(suffix);
        self.queues.lock().push(n.clone());
        n
    }

    /// A unique exchange name, deleted after the scenario.
    pub fn exchange_name(&self, suffix: &str) -> String {
        let n = self.name(suffix);
        self.exchanges.lock().push(n.clone());
        n
    }

    pub(crate) async fn cleanup(&self) {
        let queues = std::mem::take(&mut *self.queues.lock());
        let exchanges = std::mem::take(&mut *self.exchanges.lock());
        for q in queues {
            let _ = self.transport.delete_queue(&q).await;
        }
        for e in exchanges {
            let _ = self.transport.delete_exchange(&e).await;
        }
    }
}

/// Fails with `msg` unless `cond`.
pub fn ensure(cond: bool, msg: impl FnOnce() -> String) -> Result<(), String> {
    if cond {
        Ok(())
    } else {
        Err(msg())
    }
}

/// Fails unless `left == right`, naming `what`.
pub fn ensure_eq<T: PartialEq + std::fmt::Debug>(what: &str, left: T, right: T) -> Result<(), String> {
    if left == right {
        Ok(())
    } else {
        Err(format!("{what}: got {left:?}, expected {right:?}"))
    }
}

/// Turns any displayable error into a scenario failure with context.
pub trait Context<T> {
    /// Adds `what` to the error.
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T, E: std::fmt::Display> Context<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}
