//! Tracing: a `tracing` span per delivery and W3C trace context across
//! services.
//!
//! Around a handler, [`Trace`] opens a `switchyard.handle` span with the
//! queue, routing key, message id, correlation id, redelivered flag and
//! attempt, and records the outcome (`ack`, `reply`, `retry`,
//! `dead_letter`, or the failure kind) when the call ends. It extracts the
//! W3C `traceparent` / `tracestate` headers of the delivery and makes the
//! handling a child of that trace; the [`TraceContext`] is current
//! ([`current`]) while the handler's future is polled.
//!
//! Around a publisher, [`Trace`] injects `traceparent` (and `tracestate`)
//! into messages that carry none: the current handling's context when the
//! publish happens inside a traced handler, so one trace crosses services,
//! or a new root trace otherwise.
//!
//! The parser and generator are switchyard's own (no dependency). With the
//! cargo feature `opentelemetry`, the `otel` module bridges headers to the
//! OpenTelemetry propagation API.
//!
//! Put the layer outermost, so the span covers the whole stack and records
//! the outcome the Worker will act on.
//!
//! ```
//! use switchyard_core::{handler_fn, Envelope};
//! use switchyard_middleware::trace::TraceLayer;
//! use tower::ServiceBuilder;
//!
//! let _svc = switchyard_core::handler::boxed(ServiceBuilder::new()
//!     .layer(TraceLayer::new())
//!     .service(handler_fn(|_env: Envelope| async {})));
//! ```

use std::cell::RefCell;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use switchyard_core::headers::{TRACEPARENT, TRACESTATE};
use switchyard_core::{Envelope, HandlerError, Headers, Outcome};
use tower::Service;
use tracing::field::{display, Empty};
use tracing::Span;

use crate::publish::PublishRequest;
use crate::util::{edit_publish_requests, enter_ambient, rand_u64, read_ambient, stateless_layer};

/// A W3C trace context: trace id, the id of the span it belongs to, flags
/// and the vendor `tracestate`.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 128-bit trace id (never zero).
    pub trace_id: u128,
    /// 64-bit id of the span this context belongs to (never zero).
    pub span_id: u64,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// The `tracestate` header, passed through unchanged.
    pub state: Option<Arc<str>>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent())
            .field("tracestate", &self.state)
            .finish()
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let v = rand_u64();
        if v != 0 {
            return v;
        }
    }
}

impl TraceContext {
    /// A new root context: random trace and span ids, sampled.
    pub fn new_root() -> Self {
        let trace_id = ((nonzero_u64() as u128) << 64) | rand_u64() as u128;
        TraceContext {
            trace_id,
            span_id: nonzero_u64(),
            flags: 1,
            state: None,
        }
    }

    /// A child context: same trace, flags and state, a new span id.
    pub fn child(&self) -> Self {
        TraceContext {
            trace_id: self.trace_id,
            span_id: nonzero_u64(),
            flags: self.flags,
            state: self.state.clone(),
        }
    }

    /// True if the sampled flag is set.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Parses a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`).
    ///
    /// Returns `None` for anything the W3C spec says to ignore: a wrong
    /// length or separator, non-lowercase-hex digits, version `ff`, an
    /// all-zero trace or parent id, or extra fields on version `00`.
    /// Higher versions are parsed by their first four fields.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let s = traceparent.trim().as_bytes();
        if s.len() < 55 || s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
            return None;
        }
        let version = hex_u8(&s[0..2])?;
        if version == 0xff || (version == 0 && s.len() != 55) || (s.len() > 55 && s[55] != b'-') {
            return None;
        }
        let trace_id = hex_u128(&s[3..35])?;
        let span_id = hex_u128(&s[36..52])? as u64;
        let flags = hex_u8(&s[53..55])?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
            state: None,
        })
    }

    /// Reads `traceparent` and `tracestate` from message headers.
    pub fn extract(headers: &Headers) -> Option<Self> {
        let mut ctx = Self::parse(headers_str(headers, TRACEPARENT)?)?;
        ctx.state = headers_str(headers, TRACESTATE)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Arc::from);
        Some(ctx)
    }

    /// The `traceparent` value for this context.
    pub fn traceparent(&self) -> String {
        format!("00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, self.flags)
    }

    /// The trace id as 32 lowercase hex digits.
    pub fn trace_id_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// Writes `traceparent` (and `tracestate`, if any) into `headers`.
    pub fn inject(&self, headers: &mut Headers) {
        headers.insert(TRACEPARENT, self.traceparent());
        if let Some(s) = &self.state {
            headers.insert(TRACESTATE, &**s);
        }
    }
}

fn headers_str<'h>(h: &'h Headers, key: &str) -> Option<&'h str> {
    match h.get(key)? {
        switchyard_core::HeaderValue::String(s) => Some(s),
        switchyard_core::HeaderValue::Bytes(b) => std::str::from_utf8(b).ok(),
        _ => None,
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_u128(s: &[u8]) -> Option<u128> {
    s.iter()
        .try_fold(0u128, |acc, &c| Some((acc << 4) | hex_digit(c)? as u128))
}

fn hex_u8(s: &[u8]) -> Option<u8> {
    Some((hex_digit(s[0])? << 4) | hex_digit(s[1])?)
}

thread_local! {
    static CURRENT: RefCell<Option<TraceContext>> = const { RefCell::new(None) };
}

/// The trace context of the delivery the current task is handling, if a
/// [`Trace`] service is handling one (it is current while the handler's
/// future is polled).
pub fn current() -> Option<TraceContext> {
    read_ambient(&CURRENT, |c| Some(c.clone()))
}

pin_project! {
    /// A future polled with a trace context as the current one; see [`scope`].
    pub struct Scoped<F> {
        #[pin]
        inner: F,
        ctx: Option<TraceContext>,
    }
}

impl<F: Future> Future for Scoped<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _restore = enter_ambient(&CURRENT, this.ctx);
        this.inner.poll(cx)
    }
}

/// Runs `fut` with `ctx` as the current trace context (for work a handler
/// moves to another task: `tokio::spawn(trace::scope(trace::current(), work))`).
pub fn scope<F: Future>(ctx: Option<TraceContext>, fut: F) -> Scoped<F> {
    Scoped { inner: fut, ctx }
}

stateless_layer!(
    /// Traces deliveries and propagates W3C trace context; see the
    /// [module docs](self).
    TraceLayer =>
    /// The service of [`TraceLayer`].
    Trace
);

pin_project! {
    /// The future of [`Trace`] around a handler: polls the handler inside
    /// its span, with its trace context current, and records the outcome.
    pub struct TraceFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        ctx: Option<TraceContext>,
    }
}

impl<F> Future for TraceFuture<F>
where
    F: Future<Output = Result<Outcome, HandlerError>>,
{
    type Output = Result<Outcome, HandlerError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _enter = this.span.enter();
        let restore = enter_ambient(&CURRENT, this.ctx);
        let out = this.inner.poll(cx);
        drop(restore);
        let out = std::task::ready!(out);
        if !this.span.is_disabled() {
            match &out {
                Ok(o) => {
                    this.span.record("outcome", o.label());
                }
                Err(e) => {
                    this.span.record("outcome", e.kind().as_str());
                    this.span.record("error", display(e.message()));
                    tracing::debug!(kind = e.kind().as_str(), error = e.message(), "handler failed");
                }
            }
        }
        Poll::Ready(out)
    }
}

impl<S> Service<Envelope> for Trace<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = TraceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        let parent = TraceContext::extract(env.headers());
        let ctx = match &parent {
            Some(p) => p.child(),
            None => TraceContext::new_root(),
        };
        let info = env.info();
        let span = tracing::info_span!(
            "switchyard.handle",
            queue = &*info.queue,
            routing_key = &*info.routing_key,
            message_id = env.message_id(),
            correlation_id = env.correlation_id(),
            redelivered = info.redelivered,
            attempt = env.attempt(),
            trace_id = Empty,
            span_id = Empty,
            parent_span_id = Empty,
            outcome = Empty,
            error = Empty,
        );
        if !span.is_disabled() {
            span.record("trace_id", display(format_args!("{:032x}", ctx.trace_id)));
            span.record("span_id", display(format_args!("{:016x}", ctx.span_id)));
            if let Some(p) = &parent {
                span.record("parent_span_id", display(format_args!("{:016x}", p.span_id)));
            }
        }
        // current during `call` too (a handler_fn closure runs there)
        let mut slot = Some(ctx);
        let fut = {
            let _restore = enter_ambient(&CURRENT, &mut slot);
            let _enter = span.enter();
            self.inner.call(env)
        };
        TraceFuture {
            inner: fut,
            span,
            ctx: slot,
        }
    }
}

/// Gives a published message a `traceparent` (a child of the current trace
/// context, else a new root) unless it has one.
fn inject_current(req: &mut PublishRequest) {
    if !req.message.headers.contains_key(TRACEPARENT) {
        let ctx = current().unwrap_or_else(TraceContext::new_root);
        ctx.inject(&mut req.message.headers);
    }
    tracing::trace!(
        exchange = req.destination.exchange(),
        routing_key = req.destination.routing_key(),
        "publishing"
    );
}

edit_publish_requests!(Trace, inject_current);

/// OpenTelemetry propagation of message headers (cargo feature
/// `opentelemetry`).
///
/// Uses the globally installed text-map propagator (for example
/// `TraceContextPropagator` from `opentelemetry_sdk`), so baggage or any
/// other propagation format works too. [`OtelPropagationLayer`](otel::OtelPropagationLayer) does it for
/// a whole stack: around a handler it extracts the delivery's context and
/// makes it the current OpenTelemetry context while the handler runs; around
/// a publisher it injects the current context into messages that carry no
/// `traceparent` yet.
///
/// ```
/// use switchyard_core::{handler_fn, Envelope, Headers};
/// use switchyard_middleware::trace::otel::{self, OtelPropagationLayer};
/// use tower::ServiceBuilder;
///
/// let mut headers = Headers::new();
/// otel::inject(&opentelemetry::Context::current(), &mut headers);
/// let _parent = otel::extract(&headers);
/// let _svc = switchyard_core::handler::boxed(
///     ServiceBuilder::new()
///         .layer(OtelPropagationLayer::new())
///         .service(handler_fn(|_env: Envelope| async {})),
/// );
/// ```
#[cfg(feature = "opentelemetry")]
pub mod otel {
    use std::task::{Context, Poll};

    use opentelemetry::context::{FutureExt, WithContext};
    use opentelemetry::propagation::{Extractor, Injector};
    use switchyard_core::headers::TRACEPARENT;
    use switchyard_core::{Envelope, HandlerError, Headers, Outcome};
    use tower::Service;

    use crate::publish::PublishRequest;
    use crate::util::{edit_publish_requests, stateless_layer};

    /// Writes OpenTelemetry fields into message headers.
    #[derive(Debug)]
    pub struct HeaderInjector<'a>(pub &'a mut Headers);

    impl Injector for HeaderInjector<'_> {
        fn set(&mut self, key: &str, value: String) {
            self.0.insert(key, value);
        }
    }

    /// Reads OpenTelemetry fields from message headers.
    #[derive(Debug)]
    pub struct HeaderExtractor<'a>(pub &'a Headers);

    impl Extractor for HeaderExtractor<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            super::headers_str(self.0, key)
        }
        fn keys(&self) -> Vec<&str> {
            self.0.iter().map(|(k, _)| k.as_str()).collect()
        }
    }

    /// Injects `cx` into `headers` with the global propagator.
    pub fn inject(cx: &opentelemetry::Context, headers: &mut Headers) {
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(cx, &mut HeaderInjector(headers)));
    }

    /// Extracts a parent context from `headers` with the global propagator.
    pub fn extract(headers: &Headers) -> opentelemetry::Context {
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(headers)))
    }

    stateless_layer!(
        /// Propagates OpenTelemetry context through message headers; see the
        /// [module docs](self).
        OtelPropagationLayer =>
        /// The service of [`OtelPropagationLayer`].
        OtelPropagation
    );

    impl<S> Service<Envelope> for OtelPropagation<S>
    where
        S: Service<Envelope, Response = Outcome, Error = HandlerError>,
    {
        type Response = Outcome;
        type Error = HandlerError;
        type Future = WithContext<S::Future>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, env: Envelope) -> Self::Future {
            let otel_cx = extract(env.headers());
            let fut = {
                let _guard = otel_cx.clone().attach();
                self.inner.call(env)
            };
            fut.with_context(otel_cx)
        }
    }

    /// Injects the current OpenTelemetry context into a published message
    /// that has no `traceparent` yet.
    fn inject_current(req: &mut PublishRequest) {
        if !req.message.headers.contains_key(TRACEPARENT) {
            inject(&opentelemetry::Context::current(), &mut req.message.headers);
        }
    }

    edit_publish_requests!(OtelPropagation, inject_current);

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::publish::tests::Recorder;
        use crate::publish::{PublisherService, ServicePublisher};
        use opentelemetry::propagation::text_map_propagator::FieldIter;
        use opentelemetry::propagation::TextMapPropagator;
        use std::sync::Arc;
        use switchyard_core::{handler_fn, Destination, Message, Publisher};
        use tower::{Layer, ServiceExt};

        /// Carries a tenant string in the `x-tenant` header as a context value.
        #[derive(Debug)]
        struct TenantPropagator(Vec<String>);
        #[derive(Debug, Clone, PartialEq)]
        struct Tenant(String);

        impl TextMapPropagator for TenantPropagator {
            fn inject_context(&self, cx: &opentelemetry::Context, injector: &mut dyn Injector) {
                if let Some(t) = cx.get::<Tenant>() {
                    injector.set("x-tenant", t.0.clone());
                }
            }
            fn extract_with_context(&self, cx: &opentelemetry::Context, ex: &dyn Extractor) -> opentelemetry::Context {
                match ex.get("x-tenant") {
                    Some(t) => cx.with_value(Tenant(t.to_owned())),
                    None => cx.clone(),
                }
            }
            fn fields(&self) -> FieldIter<'_> {
                FieldIter::new(&self.0)
            }
        }

        #[tokio::test]
        async fn context_crosses_from_consumed_to_published_messages() {
            opentelemetry::global::set_text_map_propagator(TenantPropagator(vec!["x-tenant".into()]));
            let rec = Arc::new(Recorder::default());
            let p: Arc<dyn Publisher> = Arc::new(ServicePublisher::new(
                OtelPropagationLayer::new().layer(PublisherService::new(rec.clone())),
            ));
            let h = OtelPropagationLayer::new().layer(handler_fn(move |_e: Envelope| {
                let p = p.clone();
                async move {
                    let current = opentelemetry::Context::current();
                    assert_eq!(current.get::<Tenant>(), Some(&Tenant("acme".into())));
                    p.publish(&Destination::queue("next"), Message::new("x")).await
                }
            }));
            let env = Envelope::for_test(Message::new("in").with_header("x-tenant", "acme"), "q");
            assert_eq!(h.oneshot(env).await.unwrap(), Outcome::Ack);
            assert_eq!(rec.sent.lock()[0].1.headers.get_str("x-tenant"), Some("acme"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::tests::Recorder;
    use crate::publish::{PublisherService, ServicePublisher};
    use switchyard_core::{handler_fn, Destination, Message, Publisher};
    use tower::{Layer, ServiceExt};

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_formats_w3c_examples() {
        let c = TraceContext::parse(TP).unwrap();
        assert_eq!(c.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(c.span_id, 0x00f067aa0ba902b7);
        assert!(c.sampled());
        assert_eq!(c.traceparent(), TP);
        let child = c.child();
        assert_eq!(child.trace_id, c.trace_id);
        assert_ne!(child.span_id, c.span_id);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(TraceContext::parse(bad).is_none(), "{bad:?} must be rejected");
        }
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future").is_some());
        let r = TraceContext::new_root();
        assert_eq!(TraceContext::parse(&r.traceparent()), Some(r));
    }

    #[tokio::test]
    async fn consume_extracts_and_publish_injects_the_same_trace() {
        let rec = Arc::new(Recorder::default());
        let p: Arc<dyn Publisher> = Arc::new(ServicePublisher::new(
            TraceLayer::new().layer(PublisherService::new(rec.clone())),
        ));
        let seen = Arc::new(parking_lot::Mutex::new(None));
        let seen2 = seen.clone();
        let h = TraceLayer::new().layer(handler_fn(move |_e: Envelope| {
            let p = p.clone();
            let seen = seen2.clone();
            async move {
                *seen.lock() = current();
                p.publish(&Destination::queue("next"), Message::new("x")).await
            }
        }));
        let env = Envelope::for_test(
            Message::new("in")
                .with_header(TRACEPARENT, TP)
                .with_header(TRACESTATE, "vendor=1"),
            "q",
        );
        h.oneshot(env).await.unwrap();
        let ctx = seen.lock().clone().expect("context set during handling");
        assert_eq!(ctx.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_ne!(ctx.span_id, 0x00f067aa0ba902b7, "handling is a child span");
        let sent = rec.sent.lock();
        let out = TraceContext::extract(&sent[0].1.headers).unwrap();
        assert_eq!(out.trace_id, ctx.trace_id);
        assert_eq!(out.span_id, ctx.span_id, "the publish's parent is the handling span");
        assert_eq!(out.state.as_deref(), Some("vendor=1"));
    }

    #[tokio::test]
    async fn scopes_nest_restore_and_cross_spawn() {
        let a = TraceContext::new_root();
        let b = a.child();
        let (a2, b2) = (a.clone(), b.clone());
        scope(Some(a.clone()), async move {
            assert_eq!(current(), Some(a2.clone()));
            scope(Some(b2.clone()), async { assert_eq!(current(), Some(b2)) }).await;
            assert_eq!(current(), Some(a2.clone()), "restored after the inner scope");
            let moved = tokio::spawn(scope(current(), async { current() })).await.unwrap();
            assert_eq!(moved, Some(a2), "carried to a spawned task explicitly");
            assert_eq!(tokio::spawn(async { current() }).await.unwrap(), None, "not implicitly");
        })
        .await;
        assert_eq!(current(), None);
    }

    #[tokio::test]
    async fn publish_outside_a_handler_starts_a_root_and_keeps_existing_headers() {
        let rec = Arc::new(Recorder::default());
        let p = ServicePublisher::new(TraceLayer::new().layer(PublisherService::new(rec.clone())));
        p.publish(&Destination::queue("q"), Message::new("a")).await.unwrap();
        p.publish(&Destination::queue("q"), Message::new("b").with_header(TRACEPARENT, TP))
            .await
            .unwrap();
        let sent = rec.sent.lock();
        assert!(TraceContext::extract(&sent[0].1.headers).is_some());
        assert_eq!(sent[1].1.headers.get_str(TRACEPARENT), Some(TP));
    }
}
