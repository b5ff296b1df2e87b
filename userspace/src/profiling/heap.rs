//! Heap profiles: a sampling wrapper around the system allocator.
//!
//! ambit keeps glibc's allocator (`crate::heap` trims it after bursts), which records no
//! profile. [`Sampling`] wraps it the way Go's runtime and jemalloc's `prof` sample: on
//! average one allocation per [`rate`] bytes allocated (exponentially distributed gaps, so
//! every byte has the same chance), it records the allocation's address, size and call
//! stack until the allocation is freed. A snapshot of the live samples, scaled back to
//! estimated totals, is `/debug/pprof/heap`.
//!
//! Costs, when on: every allocation decrements a thread-local counter; every free looks
//! its address up in a 32 KiB table of keys (at most [`PROBES`] words). A stack is captured
//! only for the sampled allocations (a few per MiB allocated). Nothing here allocates: the
//! table is static, and an allocation made while a stack is captured is not sampled.

use std::{
    alloc::{GlobalAlloc, Layout},
    cell::Cell,
    sync::atomic::{AtomicUsize, Ordering},
};

/// This file, as the line tables name it: its frames are left out of the profiles.
pub const SOURCE: &str = file!();

/// Go's and jemalloc's default (`lg_prof_sample:19`).
pub const DEFAULT_RATE: usize = 512 * 1024;
/// Live samples kept at most; at the default rate they stand for about 2 GiB of live heap.
const SLOTS: usize = 4096;
/// Frames kept per stack (the innermost ones).
pub const DEPTH: usize = 48;
/// Slots an address may be from its hash slot.
const PROBES: usize = 8;

/// Key values that are not addresses (allocations are at least 8-aligned, so never 1 or 2).
const EMPTY: usize = 0;
const GONE: usize = 1;
const WRITING: usize = 2;

static RATE: AtomicUsize = AtomicUsize::new(0);
/// Live samples in the table: a free with none skips the lookup.
static LIVE: AtomicUsize = AtomicUsize::new(0);
/// Samples not kept because their slots were taken.
static DROPPED: AtomicUsize = AtomicUsize::new(0);

static KEYS: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(EMPTY) }; SLOTS];
static ENTRIES: [Entry; SLOTS] = [const { Entry::new() }; SLOTS];

/// What is known of one sampled allocation; written only while its key says [`WRITING`].
struct Entry {
    size: AtomicUsize,
    depth: AtomicUsize,
    frames: [AtomicUsize; DEPTH],
}

impl Entry {
    const fn new() -> Entry {
        Entry {
            size: AtomicUsize::new(0),
            depth: AtomicUsize::new(0),
            frames: [const { AtomicUsize::new(0) }; DEPTH],
        }
    }
}

thread_local! {
    /// Bytes this thread still allocates before its next sample; 0 when not yet drawn.
    static UNTIL: Cell<usize> = const { Cell::new(0) };
    /// Set while this thread captures a stack: what the unwinder allocates is not sampled.
    static BUSY: Cell<bool> = const { Cell::new(false) };
    static SEED: Cell<u64> = const { Cell::new(0) };
}

/// The global allocator of the `ambit` binary: `A` with heap sampling.
pub struct Sampling<A>(pub A);

// SAFETY: every method hands the request to the wrapped allocator unchanged and returns its
// answer; sampling only reads the returned address, and never allocates itself.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Sampling<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { self.0.alloc(layout) };
        allocated(p, layout.size());
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        allocated(p, layout.size());
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // Forgotten before it is freed: once freed, another thread may get (and sample) it.
        freed(ptr);
        // SAFETY: as for `alloc`.
        unsafe { self.0.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        freed(ptr);
        // SAFETY: as for `alloc`.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        allocated(p, new_size);
        p
    }
}

/// Samples one allocation in every `bytes` allocated on average; 0 turns sampling off
/// (samples already taken stay until their allocations are freed).
pub fn set_rate(bytes: usize) {
    RATE.store(bytes, Ordering::Relaxed);
}

/// The sampling rate in bytes; 0 when off.
pub fn rate() -> usize {
    RATE.load(Ordering::Relaxed)
}

/// Samples not kept because the table was full around their address.
pub fn dropped() -> usize {
    DROPPED.load(Ordering::Relaxed)
}

fn allocated(p: *mut u8, size: usize) {
    let rate = RATE.load(Ordering::Relaxed);
    if rate == 0 || p.is_null() {
        return;
    }
    // `try_with`: during thread teardown the thread-locals may be gone; skip then.
    let due = UNTIL
        .try_with(|until| {
            let left = match until.get() {
                0 => gap(rate),
                n => n,
            };
            if left > size {
                until.set(left - size);
                false
            } else {
                until.set(gap(rate));
                true
            }
        })
        .unwrap_or(false);
    if due && !BUSY.try_with(|b| b.replace(true)).unwrap_or(true) {
        record(p as usize, size);
        let _restored = BUSY.try_with(|b| b.set(false));
    }
}

/// The next gap, exponentially distributed with mean `rate` (Go's `nextSample`).
fn gap(rate: usize) -> usize {
    let x = SEED
        .try_with(|s| {
            let mut x = s.get();
            if x == 0 {
                // Any odd start will do; the thread-local's address differs per thread.
                x = (s as *const Cell<u64> as u64) | 1;
            }
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
        .unwrap_or(0x9e37_79b9_7f4a_7c15);
    // Uniform in (0, 1]: the top 53 bits, never 0.
    let u = ((x >> 11) + 1) as f64 / (1u64 << 53) as f64;
    ((-u.ln()) * rate as f64).max(1.0) as usize
}

fn slot_of(p: usize) -> usize {
    (p >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (usize::BITS - SLOTS.trailing_zeros())
}

fn record(p: usize, size: usize) {
    let mut frames = [0usize; DEPTH];
    let mut depth = 0;
    // SAFETY: `trace_unsynchronized` may not run concurrently with itself on other threads
    // when the platform's unwinder is not thread-safe; on Linux it is libgcc's
    // `_Unwind_Backtrace`, which is. The callback only writes into `frames`.
    unsafe {
        backtrace::trace_unsynchronized(|frame| {
            frames[depth] = frame.ip() as usize;
            depth += 1;
            depth < DEPTH
        });
    }
    let home = slot_of(p);
    for i in 0..PROBES {
        let s = (home + i) % SLOTS;
        let key = KEYS[s].load(Ordering::Relaxed);
        if (key == EMPTY || key == GONE)
            && KEYS[s].compare_exchange(key, WRITING, Ordering::Acquire, Ordering::Relaxed).is_ok()
        {
            let e = &ENTRIES[s];
            e.size.store(size, Ordering::Relaxed);
            e.depth.store(depth, Ordering::Relaxed);
            for (slot, ip) in e.frames.iter().zip(&frames[..depth]) {
                slot.store(*ip, Ordering::Relaxed);
            }
            LIVE.fetch_add(1, Ordering::Relaxed);
            KEYS[s].store(p, Ordering::Release);
            return;
        }
    }
    DROPPED.fetch_add(1, Ordering::Relaxed);
}

fn freed(p: *mut u8) {
    if LIVE.load(Ordering::Relaxed) == 0 || p.is_null() {
        return;
    }
    let p = p as usize;
    let home = slot_of(p);
    for i in 0..PROBES {
        let s = (home + i) % SLOTS;
        match KEYS[s].load(Ordering::Relaxed) {
            EMPTY => return,
            k if k == p => {
                if KEYS[s].compare_exchange(p, GONE, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    LIVE.fetch_sub(1, Ordering::Relaxed);
                }
                return;
            }
            _ => {}
        }
    }
}

/// Runs `f` with this thread's allocations unsampled: the profile's own making (the
/// snapshot, symbolizing) is left out of the profile.
pub fn unsampled<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _restored = BUSY.try_with(|b| b.set(self.0));
        }
    }
    let _restore = Restore(BUSY.try_with(|b| b.replace(true)).unwrap_or(false));
    f()
}

/// One live sampled allocation.
#[derive(Clone, Debug)]
pub struct Sample {
    /// The allocation's size in bytes.
    pub size: usize,
    /// Return addresses, innermost first (the sampler's own frames included).
    pub frames: Vec<usize>,
}

/// The live samples now. Allocates (the caller is not inside the allocator).
pub fn live() -> Vec<Sample> {
    let mut out = Vec::with_capacity(LIVE.load(Ordering::Relaxed));
    for (key, e) in KEYS.iter().zip(&ENTRIES) {
        let k = key.load(Ordering::Acquire);
        if k <= WRITING {
            continue;
        }
        let depth = e.depth.load(Ordering::Relaxed).min(DEPTH);
        let sample = Sample {
            size: e.size.load(Ordering::Relaxed),
            frames: e.frames[..depth].iter().map(|f| f.load(Ordering::Relaxed)).collect(),
        };
        // Freed and reused while read: the entry may mix two samples; leave it out.
        if key.load(Ordering::Acquire) == k {
            out.push(sample);
        }
    }
    out
}
