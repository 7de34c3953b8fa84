//! Admission control: at most `max_running` sessions generate at once (a request with `n`
//! choices holds `n`); up to `max_waiting` requests wait in a first-come, first-served queue
//! (tokio's semaphore is fair); a request that finds the queue full is refused at once with
//! a 429 and `Retry-After`, and one that waits past its first-token deadline gets a 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, TryAcquireError};

use crate::ApiError;

/// The running-session cap and the waiting queue.
#[derive(Debug)]
pub struct Admission {
    running: Arc<Semaphore>,
    max_running: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
}

/// Decrements the waiting count when a queued request leaves the queue (admitted, timed out
/// or dropped because its client went away).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// At most `max_running` sessions at once (at least 1) and `max_waiting` queued requests.
    pub fn new(max_running: usize, max_waiting: usize) -> Self {
        let max_running = max_running.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            running: Arc::new(Semaphore::new(max_running)),
            max_running,
            waiting: AtomicUsize::new(0),
            max_waiting,
        }
    }

    /// Sessions running now.
    pub fn running(&self) -> usize {
        self.max_running.saturating_sub(self.running.available_permits())
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Admits a request of `sessions` sessions (at most `max_running`), waiting at most
    /// `deadline` in the queue. The permit frees the sessions when dropped.
    pub async fn admit(&self, sessions: usize, deadline: Duration) -> Result<OwnedSemaphorePermit, ApiError> {
        let n = u32::try_from(sessions.clamp(1, self.max_running)).unwrap_or(1);
        match self.running.clone().try_acquire_many_owned(n) {
            Ok(permit) => return Ok(permit),
            Err(TryAcquireError::Closed) => {
                return Err(ApiError::unavailable("the server is shutting down", "shutting_down", None));
            }
            Err(TryAcquireError::NoPermits) => {}
        }
        if self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| (w < self.max_waiting).then_some(w + 1))
            .is_err()
        {
            return Err(ApiError::overloaded(
                format!(
                    "the server is at capacity ({} sessions running, {} requests waiting); retry later",
                    self.running(),
                    self.max_waiting
                ),
                1,
            ));
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(deadline, self.running.clone().acquire_many_owned(n)).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) => Err(ApiError::unavailable("the server is shutting down", "shutting_down", None)),
            Err(_) => Err(ApiError::unavailable(
                format!("waited {deadline:.0?} in the queue without a free session; retry later"),
                "queue_timeout",
                Some(1),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_is_bounded_fair_and_times_out() {
        let a = Arc::new(Admission::new(2, 1));
        let p1 = a.admit(1, Duration::from_secs(1)).await.unwrap();
        let p2 = a.admit(1, Duration::from_secs(1)).await.unwrap();
        assert_eq!((a.running(), a.waiting()), (2, 0));
        // The third waits; the fourth finds the queue full: 429 with Retry-After.
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.admit(1, Duration::from_secs(5)).await })
        };
        while a.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let full = a.admit(1, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(full.status.as_u16(), 429);
        assert_eq!(full.retry_after, Some(1));
        drop(p1);
        let p3 = waiter.await.unwrap().unwrap();
        assert_eq!((a.running(), a.waiting()), (2, 0));
        // Waiting past the deadline: 503, and the queue slot is given back.
        let late = a.admit(1, Duration::from_millis(20)).await.unwrap_err();
        assert_eq!((late.status.as_u16(), late.code), (503, Some("queue_timeout")));
        assert_eq!(a.waiting(), 0);
        drop((p2, p3));
        // n sessions take n permits; more than the cap are clamped to it.
        let big = a.admit(5, Duration::from_secs(1)).await.unwrap();
        assert_eq!(a.running(), 2);
        drop(big);
        assert_eq!(a.running(), 0);
    }
}
