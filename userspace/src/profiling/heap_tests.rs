//! The heap sampler, tested as the global allocator of the unit tests. Apart from
//! `heap.rs`: frames of that file are the sampler's, and are left out of the stacks.
use super::heap::*;
use pprof::protos::Message as _;

// The unit tests' allocator too, so that the sampler is tested where it runs.
#[global_allocator]
static ALLOCATOR: Sampling<std::alloc::System> = Sampling(std::alloc::System);

/// Serializes the tests that change the global rate.
static RATE_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[inline(never)]
fn marker_big_block() -> Vec<u8> {
    std::hint::black_box(vec![7u8; 16 << 20])
}

/// Grown in place or moved: the allocator's realloc path, and zeroed allocation.
#[inline(never)]
fn marker_grown_blocks() -> (Vec<u8>, Vec<u8>) {
    let mut grown = std::hint::black_box(Vec::<u8>::with_capacity(1 << 20));
    grown.reserve_exact(16 << 20);
    (std::hint::black_box(grown), std::hint::black_box(vec![0u8; 16 << 20]))
}

#[inline(never)]
fn marker_thread_block() -> Vec<u8> {
    std::hint::black_box(vec![9u8; 16 << 20])
}

#[inline(never)]
fn marker_small_blocks(n: usize) -> Vec<Box<[u8; 4096]>> {
    (0..n).map(|_| std::hint::black_box(Box::new([1u8; 4096]))).collect()
}

/// The profile's samples whose stacks pass through `function`: (objects, bytes).
fn totals_through(function: &str) -> (i64, i64) {
    let encoded = super::heap_report::encode(&live(), rate());
    let p = pprof::protos::Profile::decode(encoded.as_slice()).expect("a valid profile");
    let named: std::collections::HashSet<u64> = p
        .location
        .iter()
        .filter(|l| {
            l.line.iter().any(|line| {
                let f = &p.function[line.function_id as usize - 1];
                p.string_table[f.name as usize].contains(function)
            })
        })
        .map(|l| l.id)
        .collect();
    p.sample
        .iter()
        .filter(|s| s.location_id.iter().any(|id| named.contains(id)))
        .fold((0, 0), |(n, b), s| (n + s.value[0], b + s.value[1]))
}

#[test]
fn a_large_live_allocation_is_in_the_profile_with_its_caller_until_freed() {
    let _rate = RATE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    set_rate(DEFAULT_RATE);
    let block = marker_big_block();
    let (objects, bytes) = totals_through("marker_big_block");
    assert_eq!(objects, 1, "one 16 MiB allocation, sampled for certain");
    assert_eq!(bytes, 16 << 20);
    drop(block);
    assert_eq!(totals_through("marker_big_block"), (0, 0), "freed: gone from the profile");
}

#[test]
fn an_allocation_near_a_threads_start_keeps_its_caller() {
    // A shallow stack, as a runtime's worker threads have: the thread's start frames
    // (`__rust_begin_short_backtrace` among them) are in the sample, and are not the sampler's.
    let _rate = RATE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    set_rate(DEFAULT_RATE);
    let (tx, rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let t = std::thread::spawn(move || {
        let block = marker_thread_block();
        tx.send(()).expect("send");
        done_rx.recv().expect("told to finish");
        drop(block);
    });
    rx.recv().expect("allocated");
    assert_eq!(totals_through("marker_thread_block"), (1, 16 << 20));
    done_tx.send(()).expect("send");
    t.join().expect("thread");
}

#[test]
fn many_small_allocations_are_estimated_from_their_samples() {
    let _rate = RATE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    // 40 MiB in 4 KiB blocks at one sample per 64 KiB: ~640 samples, so the estimate
    // is within a few percent (±15% is over 3 standard deviations).
    set_rate(64 << 10);
    let blocks = marker_small_blocks(10_240);
    let (_, bytes) = totals_through("marker_small_blocks");
    let want = 10_240 * 4096;
    assert!((bytes - want).abs() < want * 15 / 100, "estimated {bytes} bytes live, allocated {want}");
    drop(blocks);
    assert_eq!(totals_through("marker_small_blocks"), (0, 0));
    set_rate(DEFAULT_RATE);
}

#[test]
fn the_sampler_frames_are_not_in_the_stacks() {
    let _rate = RATE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    set_rate(DEFAULT_RATE);
    // Through every entry of the allocator (alloc, realloc, alloc_zeroed): whatever the
    // compiler inlined into each, the stack starts at the caller.
    let block = marker_big_block();
    let grown = marker_grown_blocks();
    assert_eq!(totals_through("marker_grown_blocks").0, 2, "both 16 MiB blocks, sampled for certain");
    let encoded = super::heap_report::encode(&live(), rate());
    let p = pprof::protos::Profile::decode(encoded.as_slice()).expect("a valid profile");
    assert!(!p.sample.is_empty());
    for s in &p.sample {
        for id in &s.location_id {
            for line in &p.location[*id as usize - 1].line {
                let f = &p.function[line.function_id as usize - 1];
                let file = &p.string_table[f.filename as usize];
                assert!(!file.ends_with(SOURCE), "a sampler frame in a stack: {file}");
            }
        }
    }
    drop((block, grown));
}

#[test]
fn unsampling_follows_the_chance_of_being_sampled() {
    // Far larger than the rate: sampled for certain, stands for itself.
    assert_eq!(super::heap_report::unsample(64 << 20, 512 << 10), (1, 64 << 20));
    // 1/512 of the rate: about 512 such allocations per sample.
    let (n, b) = super::heap_report::unsample(1024, 512 << 10);
    assert!((511..=513).contains(&n), "{n}");
    assert!((b - (512 << 10)).abs() < 1024, "{b}");
}
