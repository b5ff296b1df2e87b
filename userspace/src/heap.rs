//! Memory freed after a burst goes back to the kernel.
//!
//! glibc's allocator keeps what a process frees for its next allocations: after 10,000
//! tunnelled connections came and went, both node proxies kept the 40 MiB those connections
//! had used as RSS (`cargo xtask bench`, "memory kept after the idle connections closed"),
//! though nothing used it any more — what a platform engineer's dashboard shows as a proxy
//! that never shrinks. Every `TRIM_EVERY`, when the RSS has grown by `TRIM_ABOVE` since the
//! last trim and more than that much of the heap is free, `malloc_trim` hands the free pages
//! back (`madvise`; they stay mapped and fault back in when used again).
//!
//! Trimming holds each arena's lock while it walks the free chunks: 8 ms for 77 MiB free in
//! 600 pieces (the unit test below). So it runs once per burst that grew the RSS, not on
//! every tick: after a trim the RSS is the new baseline, and a load that keeps reusing its
//! memory does not move it.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the heap's free space is looked at.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Free heap below this is kept for the allocations to come.
pub const TRIM_ABOVE: usize = 4 << 20;

/// Bytes free in the allocator's heaps (all arenas); `None` where the allocator cannot say.
pub fn free_bytes() -> Option<usize> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads the allocator's own bookkeeping (under its arena
        // locks) and returns a plain struct; it has no preconditions.
        let info = unsafe { libc::mallinfo2() };
        Some(info.fordblks)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Gives free heap pages back to the kernel; `true` if any went.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim is thread-safe (it takes each arena's lock) and touches only
        // memory the allocator owns and no live allocation uses.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// The process's resident memory, in bytes.
fn rss_bytes() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: usize =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

/// Whether to trim: the RSS grew by `TRIM_ABOVE` since the last trim (`baseline`), and at
/// least that much of the heap is free to give back.
fn should_trim(rss: usize, baseline: usize, free: impl FnOnce() -> Option<usize>) -> bool {
    rss >= baseline.saturating_add(TRIM_ABOVE) && free().is_some_and(|f| f > TRIM_ABOVE)
}

/// Trims the heap after bursts, looking every `TRIM_EVERY`, until `shutdown`.
pub fn spawn_trimmer(shutdown: CancellationToken) {
    let (Some(_), Some(mut baseline)) = (free_bytes(), rss_bytes()) else {
        tracing::debug!("heap trimming: not with this allocator or without /proc");
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let Some(rss) = rss_bytes() else { return };
            if !should_trim(rss, baseline, free_bytes) {
                continue;
            }
            let started = std::time::Instant::now();
            let returned = trim();
            baseline = rss_bytes().unwrap_or(rss);
            tracing::debug!(
                rss_before = rss,
                rss_after = baseline,
                returned,
                took_us = started.elapsed().as_micros() as u64,
                "heap trimmed"
            );
        }
    });
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn rss() -> usize {
        rss_bytes().expect("VmRSS in /proc/self/status")
    }

    #[test]
    fn trims_once_the_rss_grew_and_the_heap_has_room_to_give() {
        let mib = 1 << 20;
        let free = |n: usize| move || Some(n);
        // A burst grew the RSS and ended: trim.
        assert!(should_trim(60 * mib, 12 * mib, free(40 * mib)));
        // Still in the burst: the memory is in use, nothing to give.
        assert!(!should_trim(60 * mib, 12 * mib, free(mib)));
        // Back near the last trim's RSS, however much is free: leave it (no trim per tick).
        assert!(!should_trim(14 * mib, 12 * mib, free(40 * mib)));
        // The allocator cannot say.
        assert!(!should_trim(60 * mib, 12 * mib, || None));
    }

    #[test]
    fn memory_freed_after_a_burst_leaves_the_rss_once_trimmed() {
        // Many small blocks, as connections leave them (below the size glibc maps on its
        // own and unmaps on free), written so their pages are resident. Every other one is
        // kept, so the heap cannot simply shrink from the top.
        let blocks: Vec<Vec<u8>> = (0..40_000).map(|i| vec![i as u8; 2048]).collect();
        let (kept, freed): (Vec<_>, Vec<_>) = blocks.into_iter().enumerate().partition(|(i, _)| i % 64 == 0);
        drop(freed);
        let free = free_bytes().expect("glibc reports its free bytes");
        assert!(free > 40 << 20, "the freed blocks are free heap: {free} bytes");
        let before = rss();
        assert!(trim(), "malloc_trim returned nothing with {free} bytes free");
        let after = rss();
        assert!(
            before.saturating_sub(after) > 30 << 20,
            "RSS {before} -> {after} bytes: the free pages should have gone back"
        );
        assert!(
            kept.iter().all(|(i, b)| b.len() == 2048 && b.iter().all(|x| *x == *i as u8)),
            "kept blocks intact"
        );
    }
}
