//! The transport conformance suite (cargo feature `testkit`).
//!
//! One set of behavioural scenarios that every transport must pass. A
//! transport crate's test provides a [`TransportFactory`] and runs
//! [`run_suite`]; each scenario reports passed, failed, or "skipped:
//! transport lacks X" when it needs a [`Cap`]ability the transport does not
//! declare — never a silent pass.
//!
//! Scenarios use unique names (see [`Ctx::name`]) so that they can run
//! against a shared RabbitMQ, and delete what they declare.
//!
//! ```no_run
//! # async fn demo(factory: impl switchyard_core::testkit::TransportFactory) {
//! let report = switchyard_core::testkit::run_suite(&factory, None).await;
//! report.assert_ok();
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::transport::{Capabilities, Delivery, Subscription, Transport};

mod runtime;
mod support;

pub use support::*;

/// A boxed future returned by scenarios.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Creates transports connected to the broker under test.
#[async_trait]
pub trait TransportFactory: Send + Sync {
    /// A new, independent connection (a second `connect` is a second client,
    /// used for exclusivity and competing-consumer scenarios).
    async fn connect(&self) -> Arc<dyn Transport>;
}

/// A capability a scenario may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    /// [`Capabilities::priorities`].
    Priorities,
    /// [`Capabilities::message_ttl`].
    MessageTtl,
    /// [`Capabilities::dead_lettering`].
    DeadLettering,
    /// [`Capabilities::max_length`].
    MaxLength,
    /// [`Capabilities::direct_reply_to`].
    DirectReplyTo,
    /// [`Capabilities::publisher_confirms`].
    PublisherConfirms,
    /// [`Capabilities::headers_exchange`].
    HeadersExchange,
    /// [`Capabilities::quorum_queues`].
    QuorumQueues,
    /// [`Capabilities::exclusive`].
    Exclusive,
    /// [`Capabilities::mandatory_returns`].
    MandatoryReturns,
}

impl Cap {
    /// The capability's name as reported in skips.
    pub fn name(&self) -> &'static str {
        match self {
            Cap::Priorities => "priorities",
            Cap::MessageTtl => "message_ttl",
            Cap::DeadLettering => "dead_lettering",
            Cap::MaxLength => "max_length",
            Cap::DirectReplyTo => "direct_reply_to",
            Cap::PublisherConfirms => "publisher_confirms",
            Cap::HeadersExchange => "headers_exchange",
            Cap::QuorumQueues => "quorum_queues",
            Cap::Exclusive => "exclusive",
            Cap::MandatoryReturns => "mandatory_returns",
        }
    }

    /// True if `caps` has this capability.
    pub fn present_in(&self, caps: &Capabilities) -> bool {
        match self {
            Cap::Priorities => caps.priorities,
            Cap::MessageTtl => caps.message_ttl,
            Cap::DeadLettering => caps.dead_lettering,
            Cap::MaxLength => caps.max_length,
            Cap::DirectReplyTo => caps.direct_reply_to,
            Cap::PublisherConfirms => caps.publisher_confirms,
            Cap::HeadersExchange => caps.headers_exchange,
            Cap::QuorumQueues => caps.quorum_queues,
            Cap::Exclusive => caps.exclusive,
            Cap::MandatoryReturns => caps.mandatory_returns,
        }
    }
}

/// One scenario of the suite.
pub struct Case {
    /// Unique name, `area::what` (e.g. `routing::topic_hash_matches_zero_words`).
    pub name: &'static str,
    /// Capabilities it needs.
    pub requires: &'static [Cap],
    /// The scenario: `Ok(())` passes, `Err(reason)` fails.
    pub run: for<'a> fn(&'a Ctx<'a>) -> BoxFuture<'a, Result<(), String>>,
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish()
    }
}

/// Every scenario of the suite, in a stable order.
pub fn all_cases() -> Vec<Case> {
    let mut v = Vec::new();
    v.extend(runtime::cases());
    v
}

/// The result of one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaseResult {
    /// It passed.
    Passed,
    /// It was not run because the transport lacks a capability.
    Skipped(String),
    /// It failed, with the reason.
    Failed(String),
}

/// The results of a suite run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// `(case name, result)` in run order.
    pub results: Vec<(&'static str, CaseResult)>,
}

impl Report {
    /// Number of passed scenarios.
    pub fn passed(&self) -> usize {
        self.results.iter().filter(|(_, r)| *r == CaseResult::Passed).count()
    }
    /// Number of skipped scenarios.
    pub fn skipped(&self) -> usize {
        self.results
            .iter()
            .filter(|(_, r)| matches!(r, CaseResult::Skipped(_)))
            .count()
    }
    /// The failed scenarios with their reasons.
    pub fn failures(&self) -> Vec<(&'static str, &str)> {
        self.results
            .iter()
            .filter_map(|(n, r)| match r {
                CaseResult::Failed(m) => Some((*n, m.as_str())),
                _ => None,
            })
            .collect()
    }
    /// Panics listing every failure, if any; prints the summary either way.
    pub fn assert_ok(&self) {
        let failures = self.failures();
        eprintln!(
            "conformance: {} passed, {} failed, {} skipped",
            self.passed(),
            failures.len(),
            self.skipped()
        );
        assert!(
            failures.is_empty(),
            "conformance failures:\n{}",
            failures
                .iter()
                .map(|(n, m)| format!("  {n}: {m}"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

/// Runs every scenario (or those whose name contains `filter`) against
/// transports from `factory`, printing one line per scenario.
pub async fn run_suite(factory: &dyn TransportFactory, filter: Option<&str>) -> Report {
    let mut report = Report::default();
    for case in all_cases() {
        if let Some(f) = filter {
            if !case.name.contains(f) {
                continue;
            }
        }
        let result = run_case(factory, &case).await;
        match &result {
            CaseResult::Passed => eprintln!("conformance {} ... ok", case.name),
            CaseResult::Skipped(why) => eprintln!("conformance {} ... skipped: {why}", case.name),
            CaseResult::Failed(why) => eprintln!("conformance {} ... FAILED: {why}", case.name),
        }
        report.results.push((case.name, result));
    }
    report
}

/// Runs one scenario with a fresh context, a 60-second limit and cleanup.
pub async fn run_case(factory: &dyn TransportFactory, case: &Case) -> CaseResult {
    let transport = factory.connect().await;
    let caps = transport.capabilities();
    if let Some(missing) = case.requires.iter().find(|c| !c.present_in(&caps)) {
        return CaseResult::Skipped(format!("transport lacks {}", missing.name()));
    }
    let ctx = Ctx::new(factory, transport, case.name);
    let outcome = tokio::time::timeout(Duration::from_secs(60), (case.run)(&ctx)).await;
    ctx.cleanup().await;
    match outcome {
        Ok(Ok(())) => CaseResult::Passed,
        Ok(Err(why)) => CaseResult::Failed(why),
        Err(_) => CaseResult::Failed("scenario did not finish within 60s".into()),
    }
}

/// Receives the next delivery within `within`, or fails with a reason.
pub async fn recv(sub: &mut Subscription, within: Duration) -> Result<Delivery, String> {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(Some(Ok(d))) => Ok(d),
        Ok(Some(Err(e))) => Err(format!("consumer on '{}' failed: {e}", sub.queue())),
        Ok(None) => Err(format!("consumer on '{}' ended", sub.queue())),
        Err(_) => Err(format!("no delivery from '{}' within {within:?}", sub.queue())),
    }
}

/// Fails if a delivery arrives within `within`.
pub async fn expect_nothing(sub: &mut Subscription, within: Duration) -> Result<(), String> {
    match tokio::time::timeout(within, sub.next()).await {
        Err(_) => Ok(()),
        Ok(None) => Ok(()),
        Ok(Some(Ok(d))) => Err(format!(
            "unexpected delivery from '{}': {:?}",
            sub.queue(),
            String::from_utf8_lossy(&d.message.body)
        )),
        Ok(Some(Err(e))) => Err(format!("consumer on '{}' failed: {e}", sub.queue())),
    }
}
