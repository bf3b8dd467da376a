//! Small shared helpers: boxed futures, a fast PRNG, readiness plumbing,
//! per-thread "current" values scoped to a future's polls.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

thread_local! {
    static RNG: Cell<u64> = Cell::new(seed());
}

fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() | 1
}

/// A random `u64` (xorshift64*, per thread; not cryptographic).
pub(crate) fn rand_u64() -> u64 {
    RNG.with(|c| {
        let mut x = c.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        c.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A random float in `[0, 1)`.
pub(crate) fn rand_f64() -> f64 {
    (rand_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Takes the service that was driven to readiness and leaves a fresh clone
/// in its place (tower's clone-and-swap idiom).
pub(crate) fn take_ready<S: Clone>(slot: &mut S) -> S {
    let clone = slot.clone();
    std::mem::replace(slot, clone)
}

/// A per-thread "current value" (the correlation id, the trace context) that
/// a future makes current only while it is polled.
pub(crate) type Ambient<T> = std::thread::LocalKey<std::cell::RefCell<Option<T>>>;

/// Swaps `slot` with the thread's current value in `key` (in on enter, back on exit).
fn swap_ambient<T>(key: &'static Ambient<T>, slot: &mut Option<T>) {
    // `try_with` fails only while the thread is being torn down
    let _ = key.try_with(|c| {
        if let Ok(mut cur) = c.try_borrow_mut() {
            std::mem::swap(&mut *cur, slot);
        }
    });
}

/// Makes `slot` the current value of `key` until the guard drops (also by
/// unwinding), which puts the previous value back and `slot`'s into `slot`.
pub(crate) fn enter_ambient<'a, T>(key: &'static Ambient<T>, slot: &'a mut Option<T>) -> AmbientGuard<'a, T> {
    swap_ambient(key, slot);
    AmbientGuard { key, slot }
}

/// Restores the previous value of an [`Ambient`] when dropped; see [`enter_ambient`].
pub(crate) struct AmbientGuard<'a, T: 'static> {
    key: &'static Ambient<T>,
    slot: &'a mut Option<T>,
}

impl<T> Drop for AmbientGuard<'_, T> {
    fn drop(&mut self) {
        swap_ambient(self.key, self.slot);
    }
}

/// Reads the current value of `key` (none while the thread is torn down or
/// the value is being swapped).
pub(crate) fn read_ambient<T, R>(key: &'static Ambient<T>, f: impl FnOnce(&T) -> Option<R>) -> Option<R> {
    key.try_with(|c| c.try_borrow().ok().and_then(|c| c.as_ref().and_then(f)))
        .ok()
        .flatten()
}

/// Declares a layer without configuration (`$layer`, made by `new()` or
/// `default()`) whose service `$service` only holds the inner service.
macro_rules! stateless_layer {
    ($(#[$layer_doc:meta])* $layer:ident => $(#[$service_doc:meta])* $service:ident) => {
        $(#[$layer_doc])*
        #[derive(Debug, Clone, Copy, Default)]
        pub struct $layer {
            _priv: (),
        }

        impl $layer {
            /// The layer.
            pub fn new() -> Self {
                $layer { _priv: () }
            }
        }

        impl<S> tower::Layer<S> for $layer {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> $service<S> {
                $service { inner }
            }
        }

        $(#[$service_doc])*
        #[derive(Debug, Clone)]
        pub struct $service<S> {
            inner: S,
        }
    };
}
pub(crate) use stateless_layer;

/// Implements `Service<PublishRequest>` for `$service<S>` (a service with an
/// `inner` field): `$edit`, a `fn(&mut PublishRequest)`, changes each request
/// before the inner publisher gets it.
macro_rules! edit_publish_requests {
    ($service:ident, $edit:expr) => {
        impl<S> tower::Service<$crate::publish::PublishRequest> for $service<S>
        where
            S: tower::Service<$crate::publish::PublishRequest>,
        {
            type Response = S::Response;
            type Error = S::Error;
            type Future = S::Future;

            fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
                self.inner.poll_ready(cx)
            }

            fn call(&mut self, mut req: $crate::publish::PublishRequest) -> S::Future {
                let edit: fn(&mut $crate::publish::PublishRequest) = $edit;
                edit(&mut req);
                self.inner.call(req)
            }
        }
    };
}
pub(crate) use edit_publish_requests;
