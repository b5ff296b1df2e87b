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
    file.ends_with(heap::SOURCE) || file.contains("/backtrace-") || name.starts_with("__rust_")
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
        let ids = s.frames.iter().enumerate().filter_map(|(i, ip)| b.location(*ip, i == 0)).collect();
        let (n, bytes) = unsample(s.size, rate);
        profile.sample.push(Sample { location_id: ids, value: vec![n, bytes], label: vec![] });
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

#[derive(Default)]
struct Builder {
    strings: Vec<String>,
    string_ids: HashMap<String, i64>,
    locations: Vec<Location>,
    /// `None`: the address has only the sampler's frames.
    location_ids: HashMap<usize, Option<u64>>,
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

    /// The location of return address `ip` (the call is the byte before it, except for
    /// the innermost frame, which is where the unwinder stood); `None` if all its frames
    /// are the sampler's.
    fn location(&mut self, ip: usize, innermost: bool) -> Option<u64> {
        if let Some(id) = self.location_ids.get(&ip) {
            return *id;
        }
        let at = if innermost { ip } else { ip.saturating_sub(1) };
        let mut lines = Vec::new();
        let mut resolved = false;
        // Innermost first: the sampler's frames, if any, come before the caller's.
        backtrace::resolve(at as *mut c_void, |sym| {
            resolved = true;
            let name = sym.name().map_or_else(|| format!("{at:#x}"), |n| format!("{n:#}"));
            let file = sym.filename().map(|f| f.display().to_string()).unwrap_or_default();
            if !(lines.is_empty() && is_sampler_frame(&name, &file)) {
                lines.push((name, file, sym.lineno().unwrap_or(0)));
            }
        });
        if !resolved {
            lines.push((format!("{at:#x}"), String::new(), 0));
        }
        if lines.is_empty() {
            self.location_ids.insert(ip, None);
            return None;
        }
        let line = lines
            .into_iter()
            .map(|(name, file, line)| Line {
                function_id: self.function(&name, &file),
                line: i64::from(line),
            })
            .collect();
        let id = self.locations.len() as u64 + 1;
        self.locations.push(Location { id, address: at as u64, line, ..Location::default() });
        self.location_ids.insert(ip, Some(id));
        Some(id)
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
