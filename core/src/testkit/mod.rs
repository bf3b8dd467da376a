//! The transport conformance suite (cargo feature `testkit`).
//!
//! One set of behavioural scenarios that every transport must pass. A
//! transport crate's test provides a [`TransportFactory`]; each scenario
//! reports passed, failed, or "skipped: transport lacks X" when it needs a
//! [`Cap`]ability the transport does not declare — never a silent pass.
//!
//! The scenarios encode what RabbitMQ 3.10 actually does (probed with
//! `scripts/probe-rabbitmq-semantics.py`, recorded in
//! `docs/rabbitmq-semantics.md`), so the memory broker and both AMQP
//! transports are held to one answer. The areas are listed
//! [below](#areas).
//!
//! Scenarios use unique names (see [`Ctx::name`]) so that they can run
//! against a shared RabbitMQ in parallel, and delete what they declare.
//!
//! # Running the suite
//!
//! The recommended way is [`conformance_tests!`](crate::conformance_tests):
//! it expands to one `#[tokio::test]` per scenario (`routing::topic_hash_...`,
//! `delivery::prefetch_...`), so `cargo test` lists each scenario, runs them
//! in parallel and a failure names its scenario. The factory function
//! returns `None` when the broker is unreachable and the test should be
//! skipped (it prints why):
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use switchyard_core::Transport;
//! # async fn open_connection() -> Arc<dyn Transport> { unimplemented!() }
//! use switchyard_core::testkit::{factory_fn, TransportFactory};
//!
//! async fn factory() -> Option<impl TransportFactory> {
//!     // Return None (after printing why) when the broker is unreachable.
//!     Some(factory_fn(open_connection))
//! }
//!
//! switchyard_core::conformance_tests!(factory);
//! # fn main() {}
//! ```
//!
//! Scenarios added to [`all_cases`] but not yet listed in the macro (the
//! `runtime` ones, owned by the worker code) run in one extra test,
//! `other_scenarios`, so nothing is left out; the macro also checks that
//! every name it lists still exists.
//!
//! Alternatively one test can run everything with [`run_suite`], which
//! prints one line per scenario:
//!
//! ```no_run
//! # async fn demo(factory: impl switchyard_core::testkit::TransportFactory) {
//! let report = switchyard_core::testkit::run_suite(&factory, None).await;
//! report.assert_ok();
//! # }
//! ```
//!
//! # Areas
//!
//! | module | what it pins |
//! |---|---|
//! | `routing` | default/direct/topic/fanout/headers exchanges, topic corners, headers value classes, e2e bindings, unbind |
//! | `admin` | idempotent/conflicting declarations, exclusive, auto-delete queues and exchanges, x-expires, server-named, counts |
//! | `delivery` | ack, nack/reject and requeue position, prefetch, round-robin, single active consumer, cancel, auto-ack |
//! | `dead_letter` | reject, TTLs (per-message only at the head), max-length(-bytes), reject-publish, quorum delivery limit, `x-death` |
//! | `features` | priorities, confirms, mandatory, missing exchange/queue, properties and header types |
//! | `get` | `basic.get`: empty queue, order and remaining count, ack/nack/reject, auto-ack, dropped or cut-off deliveries, missing/locked queues, auto-delete queues |
//! | `delete` | conditional deletes: queue `if-unused`/`if-empty`, exchange `if-unused`, their 406 answers |
//! | `twin` | reply codes of refusals (403/404/405/406 with class and method), queue argument validation and equivalence, `CC`/`BCC`, max length on requeue, cancel, the consumer served next (round-robin, prefetch, priorities) |
//! | `model` | the message model as the wire carries it (priorities 0–255, absent vs empty properties, `cluster_id`), `x-delayed-message` and `x-consistent-hash` exchanges, consumer priorities, stream offsets |
//! | `runtime` | Worker, RPC, graceful shutdown |
//!
//! # Writing a scenario
//!
//! A scenario is an `async fn name(ctx: &Ctx<'_>) -> Result<(), String>` in
//! its area's module, registered in that module's `cases()` with the
//! crate-private `case!(area::name, Cap...)` macro and listed in
//! [`conformance_tests!`](crate::conformance_tests). It declares through
//! [`Ctx`] (unique names, deleted afterwards), fails with a reason that says
//! what RabbitMQ does ([`ensure`], [`ensure_eq`], [`expect_code`],
//! [`Context::ctx`]), waits with [`WAIT`] for what must happen and
//! [`QUIET`] for what must not, and never relies on a sleep being long
//! enough for something to happen. Futures must be `Send`: cancel a
//! subscription with [`cancel`] rather than awaiting `Subscription::cancel`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::transport::{Capabilities, Delivery, Subscription, Transport};

mod admin;
mod dead_letter;
mod delete;
mod delivery;
mod features;
mod get;
mod model;
mod routing;
mod runtime;
mod support;
mod twin;

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

/// A [`TransportFactory`] made from a closure; see [`factory_fn`].
pub struct FactoryFn<F>(F);

impl<F> fmt::Debug for FactoryFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FactoryFn")
    }
}

/// A [`TransportFactory`] that calls `f` for every connection, so a test
/// file needs no `async_trait` impl of its own:
///
/// ```no_run
/// # use std::sync::Arc;
/// # use switchyard_core::Transport;
/// # async fn open_connection() -> Arc<dyn Transport> { unimplemented!() }
/// use switchyard_core::testkit::{factory_fn, run_suite};
/// # async fn demo() {
/// let factory = factory_fn(|| async { open_connection().await });
/// run_suite(&factory, None).await.assert_ok();
/// # }
/// ```
pub fn factory_fn<F, Fut>(f: F) -> FactoryFn<F>
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Arc<dyn Transport>> + Send,
{
    FactoryFn(f)
}

#[async_trait]
impl<F, Fut> TransportFactory for FactoryFn<F>
where
    F: Fn() -> Fut + Send + Sync,
    Fut: Future<Output = Arc<dyn Transport>> + Send,
{
    async fn connect(&self) -> Arc<dyn Transport> {
        (self.0)().await
    }
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
    /// [`Capabilities::consumer_priorities`].
    ConsumerPriorities,
    /// [`Capabilities::stream_queues`].
    StreamQueues,
    /// [`Capabilities::delayed_message_exchange`].
    DelayedMessageExchange,
    /// [`Capabilities::consistent_hash_exchange`].
    ConsistentHashExchange,
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
            Cap::ConsumerPriorities => "consumer_priorities",
            Cap::StreamQueues => "stream_queues",
            Cap::DelayedMessageExchange => "delayed_message_exchange",
            Cap::ConsistentHashExchange => "consistent_hash_exchange",
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
            Cap::ConsumerPriorities => caps.consumer_priorities,
            Cap::StreamQueues => caps.stream_queues,
            Cap::DelayedMessageExchange => caps.delayed_message_exchange,
            Cap::ConsistentHashExchange => caps.consistent_hash_exchange,
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
    v.extend(routing::cases());
    v.extend(admin::cases());
    v.extend(delivery::cases());
    v.extend(dead_letter::cases());
    v.extend(features::cases());
    v.extend(twin::cases());
    v.extend(get::cases());
    v.extend(delete::cases());
    v.extend(model::cases());
    v.extend(runtime::cases());
    v
}

/// Builds a [`Case`] from `area`, an `async fn name(ctx: &Ctx<'_>) ->
/// Result<(), String>` and the capabilities it needs; the case is named
/// `area::name`.
macro_rules! case {
    ($area:ident :: $f:ident $(, $cap:ident)* $(,)?) => {
        $crate::testkit::Case {
            name: concat!(stringify!($area), "::", stringify!($f)),
            requires: &[$($crate::testkit::Cap::$cap),*],
            run: |ctx| Box::pin($f(ctx)),
        }
    };
}
pub(crate) use case;

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
        print_result(case.name, &result);
        report.results.push((case.name, result));
    }
    report
}

/// Runs the scenario named exactly `name`, printing its line; the report
/// holds a failure if no scenario has that name.
pub async fn run_named(factory: &dyn TransportFactory, name: &str) -> Report {
    let mut report = Report::default();
    match all_cases().into_iter().find(|c| c.name == name) {
        Some(case) => {
            let result = run_case(factory, &case).await;
            print_result(case.name, &result);
            report.results.push((case.name, result));
        }
        None => report.results.push((
            "(unknown scenario)",
            CaseResult::Failed(format!("no conformance scenario is named '{name}'")),
        )),
    }
    report
}

/// Runs every scenario whose name is not in `listed` (used by
/// [`conformance_tests!`](crate::conformance_tests) for scenarios it does
/// not list), and fails for each name in `listed` that no scenario has.
pub async fn run_unlisted(factory: &dyn TransportFactory, listed: &[&str]) -> Report {
    let cases = all_cases();
    let mut report = Report::default();
    for name in listed {
        if !cases.iter().any(|c| c.name == *name) {
            report.results.push((
                "(stale list)",
                CaseResult::Failed(format!(
                    "conformance_tests! lists '{name}' but no scenario has that name"
                )),
            ));
        }
    }
    for case in cases.iter().filter(|c| !listed.contains(&c.name)) {
        let result = run_case(factory, case).await;
        print_result(case.name, &result);
        report.results.push((case.name, result));
    }
    report
}

fn print_result(name: &str, result: &CaseResult) {
    match result {
        CaseResult::Passed => eprintln!("conformance {name} ... ok"),
        CaseResult::Skipped(why) => eprintln!("conformance {name} ... skipped: {why}"),
        CaseResult::Failed(why) => eprintln!("conformance {name} ... FAILED: {why}"),
    }
}

/// Runs one scenario with a fresh context, a 60-second limit and cleanup.
pub async fn run_case(factory: &dyn TransportFactory, case: &Case) -> CaseResult {
    let transport = factory.connect().await;
    let caps = transport.capabilities();
    if let Some(missing) = case.requires.iter().find(|c| !c.present_in(&caps)) {
        let _ = transport.close().await;
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

/// Expands to one `#[tokio::test]` per conformance scenario, grouped in one
/// module per area (`routing::topic_star_matches_exactly_one_word`, …), plus
/// `other_scenarios`, which runs every scenario of [`all_cases`] the list
/// does not name (the `runtime` ones) and fails if a listed name no longer
/// exists.
///
/// The argument is the path of an `async fn() -> Option<F>` (with `F:`
/// [`TransportFactory`]) visible from the invoking module; it returns
/// `None` after printing why when the broker is unreachable (the test then
/// passes as skipped, which is how tests needing RabbitMQ behave when
/// `SWITCHYARD_REQUIRE_RABBITMQ` is not set). The test crate needs `tokio`
/// with the `macros` and `rt-multi-thread` features.
///
/// ```no_run
/// # use std::sync::Arc;
/// # use switchyard_core::Transport;
/// # async fn open_connection() -> Arc<dyn Transport> { unimplemented!() }
/// use switchyard_core::testkit::{factory_fn, TransportFactory};
///
/// async fn factory() -> Option<impl TransportFactory> {
///     Some(factory_fn(open_connection))
/// }
///
/// switchyard_core::conformance_tests!(factory);
/// # fn main() {}
/// ```
///
/// `conformance_tests!(@names)` evaluates to the listed scenario names
/// (`&[&str]`).
#[macro_export]
macro_rules! conformance_tests {
    (@with $mode:ident [$($arg:tt)*]) => {
        $crate::conformance_tests! { @$mode [$($arg)*]
            routing: [
                default_exchange_routes_by_queue_name,
                direct_routes_on_exact_key,
                topic_hash_matches_zero_or_more_words,
                topic_star_matches_exactly_one_word,
                fanout_ignores_routing_key,
                queue_bound_twice_gets_one_copy,
                headers_all_and_any,
                headers_x_keys_are_ignored,
                headers_numbers_compare_by_value,
                headers_value_classes,
                exchange_to_exchange_binding,
                unbind_stops_routing,
            ],
            admin: [
                identical_redeclare_is_idempotent,
                conflicting_queue_redeclare_is_precondition_failed,
                conflicting_exchange_redeclare_is_precondition_failed,
                exclusive_queue_is_locked_for_other_connections,
                exclusive_consumer_locks_the_queue,
                exclusive_queue_goes_with_its_connection,
                unused_queue_expires,
                auto_delete_exchange_goes_with_its_last_binding,
                deleting_removes_bindings,
                auto_delete_queue_goes_with_its_last_consumer,
                server_named_queue,
                missing_queue_and_exchange_operations,
                depth_counts_ready_messages_only,
                purge_and_delete_return_ready_counts,
                consumer_count,
                declare_topology,
            ],
            delivery: [
                ack_removes_the_message,
                nack_requeue_returns_to_original_position,
                reject_requeue_redelivers,
                reject_without_requeue_and_no_dlx_drops,
                prefetch_bounds_in_flight,
                prefetch_is_per_consumer,
                competing_consumers_share_round_robin,
                cancel_ends_the_stream,
                unacked_stay_settleable_after_cancel,
                queue_deleted_under_consumer,
                auto_ack_consumer,
                closing_a_connection_requeues_its_unacked,
                single_active_consumer,
            ],
            dead_letter: [
                rejected_message_gets_x_death,
                original_routing_key_kept_without_override,
                per_message_ttl_applies_only_at_head,
                per_message_ttl_expires_at_head,
                queue_ttl_dead_letters_expired,
                max_length_drops_head,
                max_length_counts_ready_only,
                reject_publish_nacks,
                reject_publish_dlx_nacks_and_dead_letters,
                x_death_count_increments_per_queue_and_reason,
                x_death_lists_newest_first,
                missing_dead_letter_exchange_drops,
                max_length_bytes_drops_head,
                quorum_delivery_limit_dead_letters,
                lower_of_queue_and_message_ttl_applies,
                requeue_does_not_reset_the_ttl,
            ],
            features: [
                priorities_highest_first_fifo_within_equal,
                queue_without_max_priority_is_fifo,
                publish_returns_once_enqueued,
                publish_batch_delivers_in_order,
                mandatory_unroutable_is_reported,
                publish_to_missing_exchange_fails,
                consume_missing_queue_fails,
                properties_round_trip,
                header_types_round_trip,
                header_types_survive_dead_lettering,
                empty_and_large_bodies_round_trip,
            ],
            twin: [
                refusals_carry_rabbitmq_reply_codes,
                cc_and_bcc_route_copies,
                cc_and_bcc_keys_route_dead_letters,
                invalid_queue_arguments_are_refused_on_first_declare,
                queue_equivalence_compares_known_arguments,
                default_exchange_cc_copies_keep_the_published_key,
                requeued_message_past_its_ttl_expires,
                get_count_excludes_expired_messages_behind_the_taken_one,
                get_counts_before_its_dead_letters_come_back,
                consumer_gets_the_messages_behind_an_expired_one,
                exchanges_are_routed_once_with_every_key,
                alternate_exchange_only_when_no_binding_matched,
                priority_queue_expires_only_at_its_head,
                dead_letter_follows_the_publish_that_caused_it,
                dead_letter_cycles_follow_the_regrouped_x_death,
                blocked_consumer_rejoins_the_round_robin_at_the_back,
                new_consumer_joins_the_round_robin_at_the_back,
                blocked_consumer_rejoins_behind_its_priority,
                message_ahead_by_priority_expires_only_when_dropped_at_the_head,
                reject_dead_letters_after_the_queue_delivers,
                dead_letter_takes_the_place_of_an_expired_copy,
            ],
            get: [
                empty_queue_gives_none,
                takes_in_order_with_the_remaining_count,
                manual_settlement_acks_and_requeues,
                dropped_unsettled_get_is_requeued,
                settling_after_the_connection_closed_fails,
                missing_queue_is_queue_not_found,
                exclusive_queue_of_another_connection_is_locked,
                does_not_delete_an_auto_delete_queue,
            ],
            delete: [
                queue_if_unused_refuses_while_consumed,
                queue_if_empty_counts_ready_messages_only,
                exchange_if_unused_refuses_while_a_source,
                conditional_deletes_of_missing_entities_succeed,
            ],
            model: [
                priorities_above_nine_order_and_are_kept,
                absent_and_empty_properties_stay_apart,
                bcc_only_message_keeps_an_empty_table,
                delayed_exchange_holds_then_routes,
                consistent_hash_sends_a_key_to_one_queue,
                higher_priority_consumers_are_served_first,
                stream_consumers_start_at_their_offset,
            ],
        }
    };
    (@tests [$factory:path] $($area:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        $(
            mod $area {
                #[allow(unused_imports)]
                use super::*;
                $(
                    #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $case() {
                        let Some(factory) = $factory().await else {
                            return;
                        };
                        $crate::testkit::run_named(&factory, concat!(stringify!($area), "::", stringify!($case)))
                            .await
                            .assert_ok();
                    }
                )*
            }
        )*
        #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn other_scenarios() {
            let Some(factory) = $factory().await else {
                return;
            };
            let listed: &[&str] = &[$($(concat!(stringify!($area), "::", stringify!($case))),*),*];
            $crate::testkit::run_unlisted(&factory, listed).await.assert_ok();
        }
    };
    (@names [] $($area:ident: [$($case:ident),* $(,)?]),* $(,)?) => {
        &[$($(concat!(stringify!($area), "::", stringify!($case))),*),*]
    };
    (@names) => {
        $crate::conformance_tests!(@with names [])
    };
    ($factory:path) => {
        $crate::conformance_tests!(@with tests [$factory]);
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_are_unique_and_listed_by_the_macro() {
        let cases = all_cases();
        let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
        names.sort_unstable();
        let before = names.len();
        names.dedup();
        assert_eq!(before, names.len(), "duplicate scenario names");
        let listed: &[&str] = crate::conformance_tests!(@names);
        for c in &cases {
            if !c.name.starts_with("runtime::") {
                assert!(
                    listed.contains(&c.name),
                    "{} is not listed in conformance_tests!",
                    c.name
                );
            }
        }
        for l in listed {
            assert!(names.contains(l), "conformance_tests! lists {l}, which does not exist");
        }
    }
}
