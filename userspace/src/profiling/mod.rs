//! Profiles of the running proxy, in pprof's protobuf format (what `go tool pprof` and
//! ztunnel's `/debug/pprof/*` give).
//!
//! - CPU ([`cpu`]): the process is sampled with SIGPROF at 1000 Hz for the asked number of
//!   seconds, on a thread of its own; one profile at a time.
//! - Heap ([`heap_profile`]): the live allocations the heap sampler ([`heap`]) recorded.

pub mod heap;
mod heap_report;
#[cfg(test)]
mod heap_tests;

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

/// Sampling rate, as ztunnel's.
const HZ: i32 = 1000;
/// The longest profile one request may ask for.
pub const MAX: Duration = Duration::from_secs(60);

static RUNNING: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("a profile is already being taken; try again when it ends")]
    Busy,
    #[error("profiling: {0}")]
    Profiler(#[from] pprof::Error),
    #[error("the profiling thread failed: {0}")]
    Thread(String),
    #[error("heap sampling is off (--heap-sample-bytes 0); no allocation was recorded")]
    HeapOff,
}

/// Held while a profile is taken; lets the next one start when dropped.
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING.store(false, Ordering::Release);
    }
}

/// Reserves the profiler, or says it is busy (checked before answering, so that a second
/// request gets its refusal at once).
pub fn reserve() -> Result<impl Send + 'static, ProfileError> {
    RUNNING
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .map_err(|_| ProfileError::Busy)?;
    Ok(Slot)
}

/// Samples for `duration` and returns the profile, encoded (uncompressed protobuf).
/// `slot` comes from [`reserve`].
pub async fn cpu(duration: Duration, slot: impl Send + 'static) -> Result<Vec<u8>, ProfileError> {
    tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let guard = pprof::ProfilerGuardBuilder::default()
            .frequency(HZ)
            // Unwinding from inside these can deadlock or crash (pprof-rs' advice).
            .blocklist(&["libc", "libgcc", "pthread", "vdso"])
            .build()?;
        std::thread::sleep(duration.min(MAX));
        let profile = guard.report().build()?.pprof()?;
        // Symbolizing parsed the binary's line tables into a cache: let it go, so that a
        // profile does not leave the proxy tens of MiB larger.
        backtrace::clear_symbol_cache();
        use pprof::protos::Message as _;
        Ok(profile.encode_to_vec())
    })
    .await
    .map_err(|e| ProfileError::Thread(e.to_string()))?
}

/// The live heap as the sampler sees it, encoded (uncompressed protobuf). Symbolizing reads
/// the binary's line tables; they are let go afterwards, so that a profile does not leave
/// the proxy tens of MiB larger.
pub async fn heap_profile() -> Result<Vec<u8>, ProfileError> {
    let rate = heap::rate();
    if rate == 0 {
        return Err(ProfileError::HeapOff);
    }
    tokio::task::spawn_blocking(move || {
        heap::unsampled(|| {
            let profile = heap_report::encode(&heap::live(), rate);
            backtrace::clear_symbol_cache();
            profile
        })
    })
    .await
    .map_err(|e| ProfileError::Thread(e.to_string()))
}
