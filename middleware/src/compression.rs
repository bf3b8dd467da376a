//! Compression: gzip and zstd bodies with `content_encoding`.
//!
//! Around a publisher, [`Compression`] compresses bodies of at least
//! `threshold` bytes with the chosen [`Encoding`] and sets
//! `content_encoding` (`gzip` or `zstd`). Messages that already have a
//! `content_encoding`, smaller bodies, and bodies that would not shrink are
//! sent as they are.
//!
//! Around a handler, it decompresses by the delivery's `content_encoding`
//! (whatever the publishing side chose) before the handler sees the body,
//! and clears `content_encoding`. An unknown encoding, a corrupt body, or a
//! body that would decompress past `max_decompressed_size` (a decompression
//! bomb) fails with [`FailureKind::Decode`](switchyard_core::FailureKind::Decode)
//! and the reason, so it is dead-lettered, never a panic. Put it inside the
//! retry and dead-letter layers and outside anything that reads the body.
//!
//! Bodies of at least [`BLOCKING_THRESHOLD`] bytes are compressed and
//! decompressed on tokio's blocking pool (`spawn_blocking`), so a large body
//! never holds an async worker thread for milliseconds.
//!
//! ```
//! use std::sync::Arc;
//! use switchyard_core::{handler_fn, Envelope, Publisher};
//! use switchyard_middleware::compression::{CompressionLayer, DecompressionLayer};
//! use switchyard_middleware::publish::{PublisherService, ServicePublisher};
//! use tower::ServiceBuilder;
//!
//! fn build(transport: Arc<dyn Publisher>) {
//!     // publish side: zstd above 4 KiB
//!     let _publisher = ServicePublisher::new(
//!         ServiceBuilder::new()
//!             .layer(CompressionLayer::zstd().threshold(4096))
//!             .service(PublisherService::new(transport)),
//!     );
//!     // consume side: gzip or zstd, at most 16 MiB once decompressed
//!     let _handler = switchyard_core::handler::boxed(ServiceBuilder::new()
//!         .layer(DecompressionLayer::new().max_decompressed_size(16 << 20))
//!         .service(handler_fn(|_env: Envelope| async {})));
//! }
//! ```

use std::future::Future;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{Either, Ready};
use pin_project_lite::pin_project;
use switchyard_core::{Envelope, Error, HandlerError, Message, Outcome};
use tower::{Layer, Service};

use crate::publish::PublishRequest;

/// Bodies at least this large (64 KiB) are compressed and decompressed on
/// the blocking pool rather than on the async threads.
pub const BLOCKING_THRESHOLD: usize = 64 * 1024;

/// A boxed future of this module's large-body paths.
type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A body encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// gzip (RFC 1952), through flate2.
    Gzip,
    /// Zstandard, through zstd.
    Zstd,
}

impl Encoding {
    /// The `content_encoding` value (`gzip`, `zstd`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Encoding::Gzip => "gzip",
            Encoding::Zstd => "zstd",
        }
    }

    /// Parses a `content_encoding` value (case-insensitive; `x-gzip` is gzip).
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("gzip") || s.eq_ignore_ascii_case("x-gzip") {
            Some(Encoding::Gzip)
        } else if s.eq_ignore_ascii_case("zstd") {
            Some(Encoding::Zstd)
        } else {
            None
        }
    }

    /// Compresses `body` at `level` (gzip 0–9, default 6; zstd 1–22,
    /// default 3).
    pub fn compress(&self, body: &[u8], level: Option<i32>) -> Result<Bytes, Error> {
        match self {
            Encoding::Gzip => {
                let lvl = level.unwrap_or(6).clamp(0, 9) as u32;
                let mut enc = flate2::write::GzEncoder::new(
                    Vec::with_capacity(body.len() / 2 + 64),
                    flate2::Compression::new(lvl),
                );
                std::io::Write::write_all(&mut enc, body).map_err(|e| Error::encode(format!("gzip: {e}")))?;
                enc.finish()
                    .map(Bytes::from)
                    .map_err(|e| Error::encode(format!("gzip: {e}")))
            }
            Encoding::Zstd => zstd::bulk::compress(body, level.unwrap_or(3))
                .map(Bytes::from)
                .map_err(|e| Error::encode(format!("zstd: {e}"))),
        }
    }

    /// Decompresses `body`, failing if the result would exceed `max` bytes.
    pub fn decompress(&self, body: &[u8], max: usize) -> Result<Bytes, Error> {
        let cap = body.len().saturating_mul(4).min(max).min(1 << 20);
        let mut out = Vec::with_capacity(cap);
        let limit = (max as u64).saturating_add(1);
        let read = match self {
            Encoding::Gzip => flate2::read::MultiGzDecoder::new(body)
                .take(limit)
                .read_to_end(&mut out),
            Encoding::Zstd => match zstd::stream::read::Decoder::new(body) {
                Ok(d) => d.take(limit).read_to_end(&mut out),
                Err(e) => Err(e),
            },
        };
        read.map_err(|e| Error::decode(format!("corrupt {} body: {e}", self.as_str())))?;
        if out.len() > max {
            return Err(Error::decode(format!(
                "{} body decompresses to more than {max} bytes (limit)",
                self.as_str()
            )));
        }
        Ok(Bytes::from(out))
    }
}

/// Default limit on a decompressed body: 64 MiB.
pub const DEFAULT_MAX_DECOMPRESSED: usize = 64 << 20;
/// Default threshold below which bodies are not compressed: 1 KiB.
pub const DEFAULT_THRESHOLD: usize = 1024;

/// Compresses published bodies and decompresses consumed ones; see the
/// [module docs](self).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressionLayer {
    encoding: Option<Encoding>,
    level: Option<i32>,
    threshold: usize,
    max_decompressed: usize,
}

/// The consume-side name of [`CompressionLayer`]: `DecompressionLayer::new()`
/// compresses nothing and decompresses gzip and zstd.
pub type DecompressionLayer = CompressionLayer;

impl Default for CompressionLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CompressionLayer {
    /// Compresses nothing on publish; decompresses on consume.
    pub fn new() -> Self {
        CompressionLayer {
            encoding: None,
            level: None,
            threshold: DEFAULT_THRESHOLD,
            max_decompressed: DEFAULT_MAX_DECOMPRESSED,
        }
    }
    /// Compresses with `encoding` on publish.
    pub fn with_encoding(encoding: Encoding) -> Self {
        CompressionLayer {
            encoding: Some(encoding),
            ..Self::new()
        }
    }
    /// gzip on publish.
    pub fn gzip() -> Self {
        Self::with_encoding(Encoding::Gzip)
    }
    /// zstd on publish.
    pub fn zstd() -> Self {
        Self::with_encoding(Encoding::Zstd)
    }
    /// Bodies shorter than `bytes` are sent uncompressed (default 1 KiB).
    pub fn threshold(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }
    /// Compression level (gzip 0–9, zstd 1–22).
    pub fn level(mut self, level: i32) -> Self {
        self.level = Some(level);
        self
    }
    /// Largest decompressed body accepted (default 64 MiB).
    pub fn max_decompressed_size(mut self, bytes: usize) -> Self {
        self.max_decompressed = bytes;
        self
    }
}

impl<S> Layer<S> for CompressionLayer {
    type Service = Compression<S>;
    fn layer(&self, inner: S) -> Compression<S> {
        Compression { inner, cfg: *self }
    }
}

/// The service of [`CompressionLayer`].
#[derive(Debug, Clone)]
pub struct Compression<S> {
    inner: S,
    cfg: CompressionLayer,
}

/// Decodes a message's body by its `content_encoding`; `Ok(None)` when it
/// has none (or `identity`).
pub fn decode_message(msg: &Message, max: usize) -> Result<Option<Message>, Error> {
    let Some(ce) = msg.properties.content_encoding.as_deref() else {
        return Ok(None);
    };
    if switchyard_core::codec::is_identity_encoding(ce) {
        return Ok(None);
    }
    let enc = Encoding::parse(ce)
        .ok_or_else(|| Error::decode(format!("unknown content encoding '{ce}' (supported: gzip, zstd)")))?;
    let body = enc.decompress(&msg.body, max)?;
    let mut out = msg.clone();
    out.body = body;
    out.properties.content_encoding = None;
    Ok(Some(out))
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Handling { #[pin] fut: F },
        Failed { error: Option<HandlerError> },
    }
}

pin_project! {
    /// The future of [`Compression`] around a handler: the handler's, or
    /// the decode failure (kept small: no inline `Outcome`).
    pub struct DecompressFuture<F> {
        #[pin]
        state: State<F>,
    }
}

impl<F> Future for DecompressFuture<F>
where
    F: Future<Output = Result<Outcome, HandlerError>>,
{
    type Output = Result<Outcome, HandlerError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Handling { fut } => fut.poll(cx),
            StateProj::Failed { error } => Poll::Ready(Err(error
                .take()
                .unwrap_or_else(|| HandlerError::decode("body could not be decoded")))),
        }
    }
}

impl<S> Service<Envelope> for Compression<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Outcome;
    type Error = HandlerError;
    type Future = Either<DecompressFuture<S::Future>, BoxFut<Result<Outcome, HandlerError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, env: Envelope) -> Self::Future {
        let m = env.message();
        if m.properties.content_encoding.is_some() && m.body.len() >= BLOCKING_THRESHOLD {
            // The ready service goes with the future; a clone stays for the next call.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            let (message, max) = (m.clone(), self.cfg.max_decompressed);
            return Either::Right(Box::pin(async move {
                let decoded = tokio::task::spawn_blocking(move || decode_message(&message, max))
                    .await
                    .map_err(|e| HandlerError::decode(format!("decompression task failed: {e}")))?;
                match decoded {
                    Ok(None) => inner.call(env).await,
                    Ok(Some(m)) => inner.call(env.with_message(m)).await,
                    Err(e) => Err(HandlerError::from(e)),
                }
            }));
        }
        Either::Left(self.decode_inline(env))
    }
}

impl<S> Compression<S>
where
    S: Service<Envelope, Response = Outcome, Error = HandlerError>,
{
    fn decode_inline(&mut self, env: Envelope) -> DecompressFuture<S::Future> {
        let state = match decode_message(env.message(), self.cfg.max_decompressed) {
            Ok(None) => State::Handling {
                fut: self.inner.call(env),
            },
            Ok(Some(m)) => State::Handling {
                fut: self.inner.call(env.with_message(m)),
            },
            Err(e) => State::Failed {
                error: Some(HandlerError::from(e)),
            },
        };
        DecompressFuture { state }
    }
}

impl<S> Service<PublishRequest> for Compression<S>
where
    S: Service<PublishRequest, Error = Error> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = Error;
    type Future = Either<Either<Ready<Result<S::Response, Error>>, S::Future>, BoxFut<Result<S::Response, Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: PublishRequest) -> Self::Future {
        if let Some(enc) = self.cfg.encoding {
            let m = &req.message;
            if m.properties.content_encoding.is_none() && m.body.len() >= BLOCKING_THRESHOLD.max(self.cfg.threshold) {
                let clone = self.inner.clone();
                let mut inner = std::mem::replace(&mut self.inner, clone);
                let (body, level) = (m.body.clone(), self.cfg.level);
                return Either::Right(Box::pin(async move {
                    let compressed = tokio::task::spawn_blocking(move || enc.compress(&body, level))
                        .await
                        .map_err(|e| Error::encode(format!("compression task failed: {e}")))??;
                    if compressed.len() < req.message.body.len() {
                        req.message.body = compressed;
                        req.message.properties.content_encoding = Some(enc.as_str().into());
                    }
                    inner.call(req).await
                }));
            }
        }
        Either::Left(self.encode_inline(req))
    }
}

impl<S> Compression<S>
where
    S: Service<PublishRequest, Error = Error>,
{
    fn encode_inline(&mut self, mut req: PublishRequest) -> Either<Ready<Result<S::Response, Error>>, S::Future> {
        if let Some(enc) = self.cfg.encoding {
            let m = &mut req.message;
            if m.properties.content_encoding.is_none() && m.body.len() >= self.cfg.threshold {
                match enc.compress(&m.body, self.cfg.level) {
                    Ok(c) if c.len() < m.body.len() => {
                        m.body = c;
                        m.properties.content_encoding = Some(enc.as_str().into());
                    }
                    Ok(_) => {}
                    Err(e) => return Either::Left(futures_util::future::ready(Err(e))),
                }
            }
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::tests::Recorder;
    use crate::publish::{PublisherService, ServicePublisher};
    use std::sync::Arc;
    use switchyard_core::{handler_fn, Destination, FailureKind, Publisher};
    use tower::ServiceExt;

    fn big() -> Bytes {
        Bytes::from("the quick brown fox jumps over the lazy dog. ".repeat(200))
    }

    #[tokio::test]
    async fn what_the_publisher_encodes_the_consumer_decodes() {
        // 9 KiB inline; 90 KiB on the blocking pool (≥ BLOCKING_THRESHOLD).
        let huge = Bytes::from("the quick brown fox jumps over the lazy dog. ".repeat(2000));
        assert!(huge.len() >= BLOCKING_THRESHOLD);
        for body in [big(), huge] {
            for layer in [CompressionLayer::gzip(), CompressionLayer::zstd().level(5)] {
                let rec = Arc::new(Recorder::default());
                let p = ServicePublisher::new(layer.threshold(100).layer(PublisherService::new(rec.clone())));
                p.publish(&Destination::queue("q"), Message::new(body.clone()))
                    .await
                    .unwrap();
                p.publish(&Destination::queue("q"), Message::new("small"))
                    .await
                    .unwrap();
                let sent = rec.sent.lock().clone();
                let m = &sent[0].1;
                assert_eq!(
                    m.properties.content_encoding.as_deref(),
                    Some(layer.encoding.unwrap().as_str())
                );
                assert!(m.body.len() < body.len() / 5);
                assert_eq!(sent[1].1.properties.content_encoding, None);
                assert_eq!(&sent[1].1.body[..], b"small");

                let want = body.clone();
                let h = DecompressionLayer::new().layer(handler_fn(move |e: Envelope| {
                    let want = want.clone();
                    async move {
                        assert_eq!(e.body(), &want);
                        assert_eq!(e.message().properties.content_encoding, None);
                    }
                }));
                assert_eq!(
                    h.oneshot(Envelope::for_test(m.clone(), "q")).await.unwrap(),
                    Outcome::Ack
                );
            }
        }
    }

    #[tokio::test]
    async fn unknown_corrupt_and_bombs_are_decode_failures() {
        let never = || {
            handler_fn(|_e: Envelope| async {
                let called = true;
                assert!(!called, "handler must not be called")
            })
        };
        let env = |body: Bytes, ce: &str| Envelope::for_test(Message::new(body).with_content_encoding(ce), "q");
        let e = DecompressionLayer::new()
            .layer(never())
            .oneshot(env(big(), "br"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), FailureKind::Decode);
        assert!(e.message().contains("unknown content encoding 'br'"), "{}", e.message());
        for ce in ["gzip", "zstd"] {
            let e = DecompressionLayer::new()
                .layer(never())
                .oneshot(env(Bytes::from_static(b"not compressed at all"), ce))
                .await
                .unwrap_err();
            assert_eq!(e.kind(), FailureKind::Decode);
            assert!(e.message().contains(&format!("corrupt {ce} body")), "{}", e.message());
        }
        let bomb = Encoding::Zstd.compress(&vec![0u8; 10 << 20], None).unwrap();
        assert!(bomb.len() < 10_000);
        let e = DecompressionLayer::new()
            .max_decompressed_size(1 << 20)
            .layer(never())
            .oneshot(env(bomb, "zstd"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), FailureKind::Decode);
        assert!(e.message().contains("more than 1048576 bytes"), "{}", e.message());
        let ok = DecompressionLayer::new().layer(handler_fn(|e: Envelope| async move {
            assert_eq!(&e.body()[..], b"plain");
        }));
        assert_eq!(
            ok.oneshot(env(Bytes::from_static(b"plain"), "identity")).await.unwrap(),
            Outcome::Ack
        );
    }
}
