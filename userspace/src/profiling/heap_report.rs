//! The heap sampler's live samples as a pprof profile (what `go tool pprof` and ztunnel's
//! `/debug/pprof/heap` give): `inuse_objects` and `inuse_space`, scaled from the samples to
//! estimated totals, with symbolized stacks.

use std::{collections::HashMap, ffi::c_void};

use pprof::protos::{Function, Line, Location, Profile, Sample, ValueType};

use super::heap;

/// Whether a frame is the sampler's or the allocator shim's, left out of the stacks: the
/// caller that allocated is what a reader looks for. By file, not by name: with line tables
/// only, inlined frames carry short names (`alloc`, `record`). They are always the innermost
/// frames, and may be inlined into the caller's.
fn is_sampler_frame(name: &str, file: &str) -> bool {
    // The allocator shims by their own names only: `__rust_begin_short_backtrace` is in
    // every thread's stack, far from the sampler.
    let shim = matches!(
        name.rsplit("::").next(),
        Some("__rust_alloc" | "__rust_alloc_zeroed" | "__rust_realloc" | "__rust_dealloc")
    );
    shim || file.ends_with(heap::SOURCE) || file.contains("/backtrace-")
}

/// The profile for `samples` taken at `rate`, encoded (uncompressed protobuf).
pub fn encode(samples: &[heap::Sample], rate: usize) -> Vec<u8> {
    let mut b = Builder::default();
    // Said in the profile, so that a reader knows when it undercounts.
    let dropped = b.string(&format!("samples not kept (table full): {}", heap::dropped()));
    let objects = b.string("inuse_objects");
    let count = b.string("count");
    let space = b.string("inuse_space");
    let bytes = b.string("bytes");
    let period = b.string("space");
    let mut profile = Profile {
        sample_type: vec![ValueType { ty: objects, unit: count }, ValueType { ty: space, unit: bytes }],
        period_type: Some(ValueType { ty: period, unit: bytes }),
        period: rate as i64,
        default_sample_type: space,
        comment: vec![dropped],
        time_nanos: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64),
        ..Profile::default()
    };
    for s in samples {
        let (n, bytes) = unsample(s.size, rate);
        profile.sample.push(Sample { location_id: b.stack(&s.frames), value: vec![n, bytes], label: vec![] });
    }
    profile.location = b.locations;
    profile.function = b.functions;
    profile.string_table = b.strings;
    use pprof::protos::Message as _;
    profile.encode_to_vec()
}

/// Estimated allocations and bytes that one sample of `size` bytes stands for: the chance
/// that an allocation of `size` is sampled is `1 - e^(-size/rate)` (Go's `scaleHeapSample`).
pub fn unsample(size: usize, rate: usize) -> (i64, i64) {
    if rate == 0 || size == 0 {
        return (1, size as i64);
    }
    let scale = 1.0 / (1.0 - (-(size as f64) / rate as f64).exp());
    (scale.round() as i64, (size as f64 * scale).round() as i64)
}

/// A frame as the symbolizer gives it: function, file, line.
type Frame = (String, String, u32);

#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    locations: Vec<Location>,
    /// Return address and frames left off its front → location.
    location_ids: HashMap<(usize, usize), u64>,
    /// Return address → its frames, innermost first (inlined ones included).
    resolved: HashMap<(usize, bool), Vec<Frame>>,
    functions: Vec<Function>,
    function_ids: HashMap<(i64, i64), u64>,
}

impl Builder {
    fn string(&mut self, s: &str) -> i64 {
        if self.strings.is_empty() {
            // pprof's string table starts with "".
            self.strings.push(String::new());
            self.string_ids.insert(String::new(), 0);
        }
        if let Some(id) = self.string_ids.get(s) {
            return *id;
        }
        let id = self.strings.len() as i64;
        self.strings.push(s.to_owned());
        self.string_ids.insert(s.to_owned(), id);
        id
    }

    /// The frames at return address `ip` (the call is the byte before it, except for the
    /// innermost frame, which is where the unwinder stood), innermost first.
    fn frames(&mut self, ip: usize, innermost: bool) -> Vec<Frame> {
        let at = if innermost { ip } else { ip.saturating_sub(1) };
        self.resolved
            .entry((ip, innermost))
            .or_insert_with(|| {
                let mut frames = Vec::new();
                backtrace::resolve(at as *mut c_void, |sym| {
                    let name = sym.name().map_or_else(|| format!("{at:#x}"), |n| format!("{n:#}"));
                    let file = sym.filename().map(|f| f.display().to_string()).unwrap_or_default();
                    frames.push((name, file, sym.lineno().unwrap_or(0)));
                });
                if frames.is_empty() {
                    frames.push((format!("{at:#x}"), String::new(), 0));
                }
                frames
            })
            .clone()
    }

    /// The locations of a sample's stack (return addresses, innermost first), without the
    /// sampler's frames: everything up to the outermost of them goes, so that what the
    /// compiler inlined into the sampler (atomics, say) goes with it, whatever it inlined.
    fn stack(&mut self, ips: &[usize]) -> Vec<u64> {
        let stack: Vec<Vec<Frame>> = ips.iter().enumerate().map(|(i, ip)| self.frames(*ip, i == 0)).collect();
        let cut = stack
            .iter()
            .enumerate()
            .flat_map(|(i, frames)| frames.iter().enumerate().map(move |(j, f)| (i, j, f)))
            .filter(|(_, _, (name, file, _))| is_sampler_frame(name, file))
            .map(|(i, j, _)| (i, j + 1))
            .next_back();
        let (first, skip) = cut.unwrap_or((0, 0));
        let mut ids = Vec::with_capacity(ips.len());
        for (i, (ip, frames)) in ips.iter().zip(&stack).enumerate().skip(first) {
            let skip = if i == first { skip } else { 0 };
            if skip < frames.len() {
                ids.push(self.location(*ip, i == 0, frames, skip));
            }
        }
        ids
    }

    fn location(&mut self, ip: usize, innermost: bool, frames: &[Frame], skip: usize) -> u64 {
        if let Some(id) = self.location_ids.get(&(ip, skip)) {
            return *id;
        }
        let line = frames[skip..]
            .iter()
            .map(|(name, file, line)| Line { function_id: self.function(name, file), line: i64::from(*line) })
            .collect();
        let id = self.locations.len() as u64 + 1;
        let at = if innermost { ip } else { ip.saturating_sub(1) };
        self.locations.push(Location { id, address: at as u64, line, ..Location::default() });
        self.location_ids.insert((ip, skip), id);
        id
    }

    fn function(&mut self, name: &str, file: &str) -> u64 {
        let (name, file) = (self.string(name), self.string(file));
        if let Some(id) = self.function_ids.get(&(name, file)) {
            return *id;
        }
        let id = self.functions.len() as u64 + 1;
        self.functions.push(Function { id, name, system_name: name, filename: file, start_line: 0 });
        self.function_ids.insert((name, file), id);
        id
    }
}
