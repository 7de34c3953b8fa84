//! Sizing the compute thread pools.
//!
//! candle has two CPU pools, rayon's and the spinning barrier pool that runs quantized matmuls
//! (shoal's kernels included); each reads its size once, from `RAYON_NUM_THREADS` /
//! `CANDLE_NUM_THREADS`, when first used. Sizing both to the same count keeps 2 cores from
//! being oversubscribed.

/// The thread count to use: `requested` when positive, otherwise every available core.
pub fn thread_count(requested: Option<usize>) -> usize {
    requested
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Sizes candle's compute pools to [`thread_count`]`(requested)` and returns that count.
///
/// # Safety
/// Sets process environment variables: call it first thing in `main`, before any other thread
/// exists (and so before any pool has started).
pub unsafe fn configure_threads(requested: Option<usize>) -> usize {
    let n = thread_count(requested);
    // SAFETY: the caller guarantees no other thread runs yet.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    n
}

/// `items.map(f)` with the items spread over candle's barrier pool (the pool the engine's
/// products run on, so the two never compete for the cores), results in the items' order. For
/// the per-session work around a batched forward (sampling, encoding), which would otherwise
/// run on one core while the pool's other threads wait. `f` must not use the barrier pool
/// itself (a nested call from the calling thread would wait for its own lock).
#[allow(
    clippy::expect_used,
    reason = "execute_chunked runs every item or propagates the panic that stopped it"
)]
pub fn parallel_map<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync) -> Vec<R> {
    use std::sync::Mutex;
    if items.len() <= 1 {
        return items.into_iter().map(f).collect();
    }
    let slots: Vec<Mutex<(Option<T>, Option<R>)>> =
        items.into_iter().map(|t| Mutex::new((Some(t), None))).collect();
    candle_core::utils::barrier_pool().execute_chunked(slots.len(), |range| {
        for slot in &slots[range] {
            let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(t) = slot.0.take() {
                slot.1 = Some(f(t));
            }
        }
    });
    slots
        .into_iter()
        .map(|s| {
            let (_, r) = s.into_inner().unwrap_or_else(|e| e.into_inner());
            r.expect("the barrier pool runs every item")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn parallel_map_keeps_the_order_and_runs_every_item() {
        let got = super::parallel_map((0..1000u64).collect(), |x| x * x);
        assert_eq!(got, (0..1000u64).map(|x| x * x).collect::<Vec<_>>());
        assert_eq!(super::parallel_map(vec![7], |x: i32| x + 1), vec![8]);
        assert!(super::parallel_map(Vec::<i32>::new(), |x| x).is_empty());
    }
}
