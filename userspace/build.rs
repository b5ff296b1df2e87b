//! Builds ambit's eBPF object from source (`ebpf/programs`) and places it in OUT_DIR, where
//! `include_bytes!` embeds it in the binary. No prebuilt object is ever checked in.
//!
//! The programs build with Debian's rustc and its library sources (`-Z build-std=core`,
//! unlocked with RUSTC_BOOTSTRAP) and link with bpf-linker: see ARCHITECTURE.md,
//! "Toolchains". `cargo xtask setup` installs all of it.
//!
//! Without that toolchain the object is an empty placeholder, so that `cargo check` and
//! `cargo clippy` work anywhere; linking ambit then fails on purpose, naming what is missing
//! (a build script cannot tell a check from a build), and ambit refuses an empty object at
//! run time all the same.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

const SETUP_HINT: &str = "run `cargo xtask setup` (as root) to install the eBPF toolchain";

fn main() {
    compile_protos();
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let root = manifest_dir.parent().expect("userspace/ sits in the workspace root");
    let programs = root.join("ebpf/programs");
    let common = root.join("ebpf/common");
    for path in [
        programs.join("src"),
        programs.join("Cargo.toml"),
        programs.join("Cargo.lock"),
        common.join("src"),
        common.join("Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    for var in ["AMBIT_EBPF_RUSTC", "AMBIT_EBPF_CARGO", "AMBIT_EBPF_LINKER_DIR"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("ambit-ebpf.o");
    let rustc = env::var("AMBIT_EBPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let cargo = env::var("AMBIT_EBPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    // What is missing, as (path, what it is).
    let mut missing = Vec::new();
    for (tool, what) in [(&rustc, "Debian's rustc (rustc-web)"), (&cargo, "Debian's cargo (cargo-web)")] {
        if !Path::new(tool).exists() {
            missing.push((PathBuf::from(tool), what.to_string()));
        }
    }
    let library = Path::new("/usr/lib/rustlib/src/rust/library");
    if rustc == "/usr/bin/rustc" && !library.exists() {
        missing.push((library.to_path_buf(), "its library sources (rust-web-src)".into()));
    }

    // bpf-linker lives in cargo's bin directory, which a build script's PATH may lack.
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    let linker_dir =
        env::var_os("AMBIT_EBPF_LINKER_DIR").map(PathBuf::from).unwrap_or_else(|| cargo_home.join("bin"));
    let path = env::join_paths(
        std::iter::once(linker_dir.clone()).chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
    )
    .expect("PATH entries contain no separator");
    let linker_found = env::split_paths(&path).any(|dir| dir.join("bpf-linker").exists());
    if !linker_found {
        missing.push((linker_dir.join("bpf-linker"), "bpf-linker (not in PATH either)".into()));
    }
    if !missing.is_empty() {
        placeholder(&out, &missing);
        return;
    }

    // A target directory of its own, beside the workspace's: sharing it across profiles and
    // `cargo clippy` keeps the (slow) build of `core` to once.
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("ebpf");

    let mut cmd = Command::new(&cargo);
    cmd.current_dir(&programs);
    // The outer cargo passes its own settings to build scripts; none of them apply to this
    // cross build, and some (RUSTFLAGS, the target, the rustc wrapper) would break it.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO") && key != "CARGO_HOME") || key.starts_with("RUST") {
            cmd.env_remove(key.as_ref());
        }
    }
    cmd.env("RUSTC", &rustc)
        .env("RUSTC_BOOTSTRAP", "1")
        .env("PATH", &path)
        .args(["build", "--release", "--locked", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir);
    let status =
        cmd.status().unwrap_or_else(|e| panic!("running {cargo} for the eBPF programs: {e}; {SETUP_HINT}"));
    if !status.success() {
        panic!("building the eBPF programs failed ({status}); see the compiler output above");
    }

    let object = target_dir.join("bpfel-unknown-none/release/ambit");
    std::fs::copy(&object, &out)
        .unwrap_or_else(|e| panic!("copying {} to {}: {e}", object.display(), out.display()));
}

/// Without the eBPF toolchain: an empty object, which ambit refuses to load, and a linker
/// script that stops any link of ambit's own targets with the same message. A check never
/// links, so it goes through; a build that would ship the placeholder does not.
fn placeholder(out: &Path, missing: &[(PathBuf, String)]) {
    let what: Vec<String> =
        missing.iter().map(|(path, what)| format!("{what} at {}", path.display())).collect();
    let message = format!(
        "the eBPF programs were not built: missing {}; {SETUP_HINT}, then build again",
        what.join(", ")
    );
    println!("cargo:warning={message}");
    println!(
        "cargo:warning=checks (cargo check, cargo clippy) go on with an empty eBPF object; \
         linking ambit fails until the toolchain is installed"
    );
    // A path that does not exist counts as changed: this script runs again on every build
    // while the toolchain is missing, and builds the real object once it is there. Watching
    // the tools' own paths would not do: installed files keep their packages' older mtimes.
    println!("cargo:rerun-if-changed={}", out.with_file_name("never-created").display());
    std::fs::write(out, b"").unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
    // Linkers read an input they do not recognise as an object as a linker script that adds
    // to the default one; ASSERT fails the link with its text. The text is one quoted string.
    let script = out.with_file_name("ambit-ebpf-missing.ld");
    let text = format!("ASSERT(0, \"ambit: {}\");\n", message.replace('"', "'"));
    std::fs::write(&script, text).unwrap_or_else(|e| panic!("writing {}: {e}", script.display()));
    println!("cargo:rustc-link-arg={}", script.display());
}

/// The project's own .proto files (the Istio APIs ambit speaks), compiled without a system
/// protoc: protox parses them in Rust, tonic-prost-build generates the code.
fn compile_protos() {
    let protos = ["proto/istio/ca.proto", "proto/istio/workload.proto", "proto/istio/authorization.proto"];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"]).unwrap_or_else(|e| panic!("compiling {protos:?}: {e}"));
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating code for {protos:?}: {e}"));
}
