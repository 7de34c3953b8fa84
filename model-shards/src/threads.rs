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
