//! The route's concurrency limit: a count of free handler slots that the
//! consume loop takes one of per delivery and each delivery's handling gives
//! back when it ends.
//!
//! A `tokio::sync::Semaphore` does the same, but its release takes the lock
//! of its waiter list on every call; here a release is one atomic add, and
//! the one waiter (the consume loop) is woken only when a slot frees up from
//! none.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Free handler slots of one consume loop.
#[derive(Debug)]
pub(super) struct Slots {
    free: AtomicUsize,
    freed: Notify,
}

/// One taken slot; dropping it gives it back.
#[derive(Debug)]
pub(super) struct Slot(Arc<Slots>);

impl Slots {
    /// `n` free slots.
    pub(super) fn new(n: usize) -> Arc<Slots> {
        Arc::new(Slots {
            free: AtomicUsize::new(n),
            freed: Notify::new(),
        })
    }

    /// A slot if one is free.
    pub(super) fn try_take(self: &Arc<Self>) -> Option<Slot> {
        let mut n = self.free.load(Ordering::Acquire);
        loop {
            if n == 0 {
                return None;
            }
            match self
                .free
                .compare_exchange_weak(n, n - 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => n = now,
            }
        }
    }

    /// A slot, waiting until one is free. Meant for one waiter at a time.
    pub(super) async fn take(self: &Arc<Self>) -> Slot {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            // Registered before looking, so a release in between wakes it.
            freed.as_mut().enable();
            if let Some(slot) = self.try_take() {
                return slot;
            }
            freed.await;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.free.fetch_add(1, Ordering::AcqRel) == 0 {
            self.0.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_waiter_gets_the_slot_given_back() {
        let slots = Slots::new(2);
        let a = slots.try_take().expect("first");
        let b = slots.try_take().expect("second");
        assert!(slots.try_take().is_none(), "only two");
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.take().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "no slot free yet");
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the release")
            .unwrap();
        assert!(slots.try_take().is_none());
        drop((b, c));
        assert_eq!(slots.free.load(Ordering::Acquire), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn never_more_than_n_taken_at_once() {
        let slots = Slots::new(3);
        let busy = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..2_000 {
            let slot = slots.take().await;
            let (busy, most) = (busy.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::task::yield_now().await;
                busy.fetch_sub(1, Ordering::SeqCst);
                drop(slot);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let most = most.load(Ordering::SeqCst);
        assert!((1..=3).contains(&most), "at most 3 in flight, saw {most}");
        assert_eq!(slots.free.load(Ordering::Acquire), 3);
    }
}
