//! The userspace crate's layers, checked by `cargo xtask lint`: every top-level module of
//! `userspace/src` belongs to one layer, may use modules of its own layer or the layers
//! below, and the modules' import graph has no cycle. A new module must be placed in
//! [`LAYERS`]; a `crate::` path that climbs, or closes a circle, fails the lint with the
//! lines that do it.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context};

/// Bottom first. ARCHITECTURE.md ("Module map") explains each and which room a change goes in.
pub const LAYERS: &[(&str, &[&str])] = &[
    (
        "foundation: OS primitives and process-wide services",
        &["os", "units", "crypto", "errors", "pb", "sparse", "heap", "profiling", "telemetry"],
    ),
    ("pod vocabulary", &["pod"]),
    (
        "subsystems, each with its settings",
        &[
            "capture", "meshfile", "identity", "tls", "authz", "xds", "state", "dns", "metrics", "enroll",
            "cni", "probe",
        ],
    ),
    ("data path and its views", &["inpod", "proxy", "trace", "admin", "controlplane"]),
    ("wiring", &["config", "node"]),
];

/// Where a module uses another: file and line.
type Evidence = BTreeMap<(String, String), (PathBuf, usize)>;

pub fn check(root: &Path) -> anyhow::Result<()> {
    let src = root.join("userspace/src");
    let modules = modules(&src)?;
    let layer_of: BTreeMap<&str, usize> =
        LAYERS.iter().enumerate().flat_map(|(i, (_, ms))| ms.iter().map(move |m| (*m, i))).collect();
    let mut problems = Vec::new();
    for m in modules.keys() {
        if !layer_of.contains_key(m.as_str()) {
            problems.push(format!("module `{m}` has no layer: place it in LAYERS (xtask/src/layers.rs)"));
        }
    }
    let mut evidence = Evidence::new();
    for (m, files) in &modules {
        for f in files {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            for (used, line) in crate_uses(&text) {
                if used != *m && modules.contains_key(&used) {
                    evidence.entry((m.clone(), used)).or_insert((f.clone(), line));
                }
            }
        }
    }
    for ((from, to), (file, line)) in &evidence {
        if let (Some(a), Some(b)) = (layer_of.get(from.as_str()), layer_of.get(to.as_str())) {
            if b > a {
                problems.push(format!(
                    "`{from}` ({}) uses `{to}` ({}), a layer above it: {}:{line}",
                    LAYERS[*a].0,
                    LAYERS[*b].0,
                    rel(root, file)
                ));
            }
        }
    }
    for cycle in cycles(&evidence) {
        let mut msg = format!("import cycle: {}", cycle.join(" → "));
        for pair in cycle.windows(2) {
            if let Some((file, line)) = evidence.get(&(pair[0].clone(), pair[1].clone())) {
                msg.push_str(&format!("\n    {} → {}: {}:{line}", pair[0], pair[1], rel(root, file)));
            }
        }
        problems.push(msg);
    }
    if !problems.is_empty() {
        bail!("the userspace crate's layers are broken:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// Top-level modules of `src` and their files (`lib.rs` and `main.rs` are the crate root).
fn modules(src: &Path) -> anyhow::Result<BTreeMap<String, Vec<PathBuf>>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let path = entry?.path();
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if path.is_dir() {
            out.insert(name, rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main" {
            out.entry(name).or_insert_with(Vec::new).push(path);
        }
    }
    Ok(out)
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(out)
}

/// The top-level modules a source file names through `crate::` paths, with their lines:
/// `crate::a::x`, and each root of a group, `crate::{a::x, b::{y, z}}`. Comments are left out.
pub fn crate_uses(text: &str) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    // Lines joined back without their comments, remembering where each byte came from.
    let mut code = String::new();
    let mut line_of = Vec::new();
    for (n, l) in text.lines().enumerate() {
        let l = l.find("//").map_or(l, |i| &l[..i]);
        code.push_str(l);
        code.push('\n');
        line_of.extend(std::iter::repeat_n(n + 1, l.len() + 1));
    }
    let b = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut at = 0;
    while let Some(i) = code[at..].find("crate::").map(|i| i + at) {
        at = i + "crate::".len();
        if i > 0 && (ident(b[i - 1]) || b[i - 1] == b':') {
            continue;
        }
        let word = |from: usize| {
            let end = code[from..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(code.len(), |e| e + from);
            &code[from..end]
        };
        if b.get(at) == Some(&b'{') {
            // Roots of the group: an identifier right after `{` or `,` at depth 1.
            let mut depth = 0;
            let mut expect_root = false;
            let mut j = at;
            while j < b.len() {
                match b[j] {
                    b'{' => {
                        depth += 1;
                        expect_root = depth == 1;
                    }
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    b',' if depth == 1 => expect_root = true,
                    c if c.is_ascii_whitespace() => {}
                    c if expect_root && ident(c) => {
                        out.push((word(j).to_string(), line_of[j]));
                        expect_root = false;
                    }
                    _ => expect_root = false,
                }
                j += 1;
            }
        } else {
            let w = word(at);
            if !w.is_empty() {
                out.push((w.to_string(), line_of[at]));
            }
        }
    }
    out
}

/// Each strongly connected group of more than one module, as a closed path through it.
fn cycles(edges: &Evidence) -> Vec<Vec<String>> {
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (a, b) in edges.keys() {
        graph.entry(a).or_default().insert(b);
        graph.entry(b).or_default();
    }
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for start in graph.keys() {
        if seen.contains(start) {
            continue;
        }
        // The modules on a path from `start` back to itself, found by search from each
        // successor; reported once per group.
        if let Some(path) = path_back(&graph, start) {
            seen.extend(path.iter().copied());
            let mut cycle: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            cycle.push(start.to_string());
            out.push(cycle);
        }
    }
    out
}

/// A path `start → … → (back to start)`, without the final `start`, if there is one.
fn path_back<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>, start: &'a str) -> Option<Vec<&'a str>> {
    let mut parent: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(n) = queue.pop_front() {
        for &next in &graph[n] {
            if next == start {
                let mut path = vec![n];
                let mut at = n;
                while at != start {
                    at = parent[at];
                    path.push(at);
                }
                path.reverse();
                return Some(path);
            }
            if !parent.contains_key(next) {
                parent.insert(next, n);
                queue.push_back(next);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uses_are_found_in_paths_and_in_groups_at_any_depth() {
        let text = "use crate::{\n    a::x,\n    b::{y, z::{w}},\n    c,\n};\n// crate::commented\nfn f() { crate::d::g(); }\nlet s = ambit_crate::e;\n";
        let got: Vec<(String, usize)> = crate_uses(text);
        let want: Vec<(String, usize)> =
            [("a", 2), ("b", 3), ("c", 4), ("d", 7)].iter().map(|(m, l)| (m.to_string(), *l)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn a_cycle_is_reported_as_a_closed_path() {
        let mut e = Evidence::new();
        for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
            e.insert((a.into(), b.into()), (PathBuf::from("f.rs"), 1));
        }
        assert_eq!(cycles(&e), vec![vec!["a", "b", "c", "a"]]);
        e.remove(&("c".into(), "a".into()));
        assert!(cycles(&e).is_empty());
    }

    #[test]
    fn the_userspace_crate_keeps_its_layers() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
        check(root).expect("layers hold");
    }
}
