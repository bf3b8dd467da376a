//! Cheap change notification for the Worker's hot path, and the rule that
//! decides whether a delivery's handling runs inline or on its own task.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// A change counter: [`bump`](Progress::bump) costs an atomic increment,
/// plus a wake-up only while someone waits (a `watch` channel wakes its
/// shards on every send, which the Worker did twice per delivery).
#[derive(Default)]
pub(super) struct Progress {
    seq: AtomicU64,
    waiters: AtomicUsize,
    notify: Notify,
}

/// Decrements the waiter count when a wait ends (also when cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Progress {
    /// Records a change and wakes the waiters, if any.
    pub(super) fn bump(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// The change count, to pass to [`changed_since`](Self::changed_since)
    /// after checking a condition.
    pub(super) fn seen(&self) -> u64 {
        self.seq.load(Ordering::SeqCst)
    }

    /// Waits until a change after `seen` or until `until`; true on a
    /// change. A bump between `seen` and this call is not missed: either
    /// it counted this waiter and woke it, or it came first and the count
    /// read here shows it.
    pub(super) async fn changed_since(&self, seen: u64, until: Instant) -> bool {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let _waiting = Waiting(&self.waiters);
        if self.seq.load(Ordering::SeqCst) != seen {
            return true;
        }
        tokio::time::timeout_at(until, notified).await.is_ok()
    }
}

/// A first poll of a delivery's handling longer than this sends the
/// following deliveries to their own tasks (see [`Inline`]).
const SLOW_FIRST_POLL: Duration = Duration::from_micros(200);
/// Inline handling checks whether to yield to the runtime after this many
/// deliveries in a row.
pub(super) const INLINE_YIELD_EVERY: u32 = 64;
/// ... and yields when it has run this long since it last yielded. On a
/// multi-thread runtime a yield often hands the consume loop to the other
/// worker thread (cold caches, a thread wake-up): yielding every 64 trivial
/// deliveries (~50 µs) cost about 200 ns per message on two threads.
const INLINE_YIELD_AFTER: Duration = Duration::from_micros(250);

/// Whether the consume loop polls a delivery's handling once itself before
/// handing it to a task of its own.
///
/// A handler that finishes at its first poll (most do: in-memory work, a
/// cached lookup) then costs no task spawn, no task wake-up and, on a
/// multi-thread runtime, no cross-thread hand-off. A handler that waits is
/// spawned at its first `Pending`, as before. A handler whose first poll is
/// long (CPU-bound work) would serialise the route on the consume loop and
/// lose the parallelism of concurrent tasks, so after one slow first poll
/// the next deliveries are spawned directly, for a window that doubles
/// while first polls stay slow (64 up to 4,096 deliveries).
#[derive(Debug, Default)]
pub(super) struct Inline {
    spawn_left: u32,
    window: u32,
    /// Inline handlings since the loop last yielded.
    pub(super) run: u32,
    /// When the loop last yielded (or first ran inline).
    last_yield: Option<std::time::Instant>,
}

impl Inline {
    /// True when the next delivery is polled inline first.
    pub(super) fn next_inline(&mut self) -> bool {
        if self.spawn_left > 0 {
            self.spawn_left -= 1;
            return false;
        }
        true
    }

    /// After [`INLINE_YIELD_EVERY`] inline handlings: true when the loop has
    /// run [`INLINE_YIELD_AFTER`] since it last yielded, and should yield now.
    pub(super) fn yield_due(&mut self) -> bool {
        let now = std::time::Instant::now();
        match self.last_yield {
            Some(t) if now.duration_since(t) < INLINE_YIELD_AFTER => false,
            Some(_) => {
                self.last_yield = Some(now);
                true
            }
            None => {
                self.last_yield = Some(now);
                false
            }
        }
    }

    /// Records how long an inline first poll took.
    pub(super) fn record(&mut self, took: Duration) {
        if took >= SLOW_FIRST_POLL {
            self.window = (self.window * 2).clamp(64, 4096);
            self.spawn_left = self.window;
        } else {
            self.window = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_first_polls_spawn_a_growing_window() {
        let mut i = Inline::default();
        assert!(i.next_inline());
        i.record(Duration::from_micros(5));
        assert!(i.next_inline());
        i.record(Duration::from_millis(2));
        let spawned = (0..64).filter(|_| !i.next_inline()).count();
        assert_eq!(spawned, 64);
        assert!(i.next_inline(), "probes again after the window");
        i.record(Duration::from_millis(2));
        assert_eq!((0..200).filter(|_| !i.next_inline()).count(), 128);
        i.record(Duration::from_micros(1));
        assert!(i.next_inline());
    }

    #[test]
    fn inline_runs_yield_once_they_have_run_long_enough() {
        let mut i = Inline::default();
        assert!(!i.yield_due(), "the first check starts the clock");
        assert!(
            !i.yield_due(),
            "not yet: a yield would hand the loop to another thread for nothing"
        );
        std::thread::sleep(INLINE_YIELD_AFTER + Duration::from_micros(50));
        assert!(i.yield_due());
        assert!(!i.yield_due(), "the clock restarts at a yield");
    }

    #[tokio::test]
    async fn a_bump_before_the_wait_is_not_missed() {
        let p = Progress::default();
        let seen = p.seen();
        p.bump();
        assert!(p.changed_since(seen, Instant::now() + Duration::from_secs(10)).await);
        let seen = p.seen();
        assert!(!p.changed_since(seen, Instant::now() + Duration::from_millis(20)).await);
    }

    #[tokio::test]
    async fn a_bump_wakes_a_waiter() {
        let p = std::sync::Arc::new(Progress::default());
        let seen = p.seen();
        let q = p.clone();
        let waiter = tokio::spawn(async move { q.changed_since(seen, Instant::now() + Duration::from_secs(10)).await });
        tokio::task::yield_now().await;
        p.bump();
        assert!(waiter.await.unwrap());
    }
}
