//! `cargo xtask <command>`: the developer's entry points.
//!
//! - `setup`: install what a fresh Debian machine lacks (apt packages, bpf-linker);
//! - `build`: build everything (the eBPF object is built from source by userspace/build.rs);
//! - `test`: lints, unit tests and the network-namespace integration tests, a check that no
//!   test left anything behind, then the kernel matrix;
//! - `demo [--keep]`: a local mesh in network namespaces, with traffic and what ambit saw;
//! - `lint`: rustfmt and clippy, warnings as errors;
//! - `kernels`: the kernel matrix under QEMU (part of `test`);
//! - `bench`: ambit against a plain relay behind iptables and no proxy at all, in one run;
//! - `fuzz <target> [--minutes N]`: one coverage-guided fuzz target, longer than the test does.
//!
//! Every command runs `setup` first when something is missing.

mod bench;
mod demo;
mod fuzz;
mod gotools;
mod kernels;
mod layers;
mod setup;

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "ambit developer tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the build and test prerequisites (idempotent; needs root when something is missing).
    Setup,
    /// Build the workspace (ambit with its embedded eBPF object, and the test tools).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Run every test: lints, unit tests, integration tests in network namespaces (root).
    Test {
        /// Only run tests whose name contains this.
        filter: Option<String>,
        /// Skip rustfmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the kernel matrix (QEMU).
        #[arg(long)]
        no_kernels: bool,
        /// Skip the fuzz targets' short runs.
        #[arg(long)]
        no_fuzz: bool,
    },
    /// Bring up a local mesh in network namespaces, show captured traffic, tear down.
    Demo {
        /// Keep the mesh up for exploring until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// With the real Kubernetes API server and istiod (built from their Go modules on
        /// first use) instead of ambit's own control plane.
        #[arg(long)]
        istiod: bool,
    },
    /// rustfmt --check and clippy -D warnings over both workspaces.
    Lint,
    /// Boot Debian's 5.10, 6.1 and 6.12 kernels under QEMU and run a capture test in each.
    Kernels,
    /// Benchmark ambit against a userspace relay behind iptables and direct connections
    /// (release build, network namespaces, results in target/bench/).
    Bench(bench::BenchArgs),
    /// Hold 10,000 idle tunnelled connections for minutes: memory sampled, every connection
    /// checked alive at the end (release build, results in target/soak/).
    Soak(bench::soak::SoakArgs),
    /// Count the instructions ambit spends per request and per new connection (callgrind,
    /// both proxies, cross-node; profiles in target/bench/callgrind/).
    Count,
    /// Run one fuzz target (AddressSanitizer) for longer than the test does, or reproduce a
    /// finding.
    Fuzz(fuzz::FuzzArgs),
}

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask/ is in the workspace").to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut cmd: Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Installs what is missing for the tests, the kernel matrix and the benchmarks.
fn ensure_setup() -> anyhow::Result<()> {
    ensure_setup_for(setup::Scope::All)
}

fn ensure_setup_for(scope: setup::Scope) -> anyhow::Result<()> {
    if !setup::is_complete(scope) {
        setup::setup(scope)?;
    }
    Ok(())
}

/// Builds ambit and the bed's programs; installs only what building needs (the demo needs
/// no more).
pub fn build(release: bool) -> anyhow::Result<()> {
    ensure_setup_for(setup::Scope::Build)?;
    let mut c = cargo();
    // The fuzz targets are built by `cargo fuzz`, instrumented; a plain build of them is
    // only libFuzzer's C++ compiled for nothing.
    c.args(["build", "--workspace", "--exclude", "ambit-fuzz", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(c)
}

fn lint() -> anyhow::Result<()> {
    ensure_setup()?;
    layers::check(&root())?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt)?;
    let mut fmt_ebpf = cargo();
    fmt_ebpf.current_dir(root().join("ebpf/programs")).args(["fmt", "--", "--check"]);
    run(fmt_ebpf)?;
    let mut clippy = cargo();
    clippy.args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"]);
    run(clippy)?;
    run(clippy_ebpf())
}

/// Clippy over `ebpf/programs`, for the target and with the compiler its object is built
/// with: Debian's clippy (rust-web-clippy) matches Debian's rustc, whose `core` (built from
/// its library sources, as userspace/build.rs does) rustup's clippy could not read. The
/// release profile is the one the object is built in, and the target directory is
/// build.rs's, so `core` is checked once. Not `--all-targets`: a test harness needs `std`,
/// which bpfel-unknown-none does not have.
fn clippy_ebpf() -> Command {
    let rustc = std::env::var("AMBIT_EBPF_RUSTC").unwrap_or_else(|_| "/usr/bin/rustc".into());
    let cargo = std::env::var("AMBIT_EBPF_CARGO").unwrap_or_else(|_| "/usr/bin/cargo".into());
    // Run directly rather than as `cargo clippy`: cargo looks for subcommands in
    // ~/.cargo/bin first, where rustup's cargo-clippy would win.
    let clippy = std::path::Path::new(&cargo).with_file_name("cargo-clippy");
    let target_dir =
        std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    let mut c = Command::new(clippy);
    c.current_dir(root().join("ebpf/programs"));
    // `cargo xtask` runs under cargo, whose settings (RUSTFLAGS, the toolchain rustup picked)
    // do not apply to this cross build.
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO") && key != "CARGO_HOME") || key.starts_with("RUST") {
            c.env_remove(key.as_ref());
        }
    }
    c.env("CARGO", &cargo).env("RUSTC", &rustc).env("RUSTC_BOOTSTRAP", "1");
    c.args(["clippy", "--locked", "--release", "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(target_dir.join("ebpf"))
        .args(["--", "-D", "warnings"]);
    c
}

fn test(filter: Option<String>, no_lint: bool, no_kernels: bool, no_fuzz: bool) -> anyhow::Result<()> {
    ensure_setup()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the integration tests need root (network namespaces, cgroups, eBPF): run `sudo -E cargo xtask test`");
    }
    for what in ambit_testbed::cleanup::sweep_dead_runs() {
        eprintln!("xtask test: removed a leftover of an earlier, killed run: {what}");
    }
    if !no_lint {
        lint()?;
    }
    // The unprivileged tier first: the proxy in-process and the unit tests, in seconds.
    eprintln!("xtask test: the unprivileged tier (unit tests, the proxy in-process)");
    let mut unprivileged = cargo();
    // Built as the whole workspace builds (same features: nothing is compiled twice).
    unprivileged.args(["test", "--workspace", "--lib", "--test", "inprocess", "--no-fail-fast"]);
    if let Some(f) = &filter {
        unprivileged.arg(f);
    }
    run(unprivileged)?;
    build(false)?;
    // The real Kubernetes API server and istiod some tests run against.
    gotools::ensure()?;
    let mut t = cargo();
    t.args(["test", "--workspace", "--no-fail-fast"]);
    if let Some(f) = &filter {
        t.arg(f);
    }
    // Two test threads per binary: the beds are independent, the machine has two cores.
    t.args(["--", "--test-threads=2"]);
    let result = run(t);
    // Every test process has exited now: whatever they left is a leak, whatever the result.
    let leaks = ambit_testbed::cleanup::sweep_dead_runs();
    if !leaks.is_empty() {
        bail!("tests left resources behind (now removed): {leaks:#?}");
    }
    result?;
    if !no_fuzz && filter.is_none() {
        fuzz::test_all()?;
    }
    if !no_kernels && filter.is_none() {
        kernels::run(&root())?;
    }
    eprintln!("xtask test: all tests passed, nothing left behind");
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run_cmd(Cli::parse().cmd) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_cmd(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::Setup => {
            setup::setup(setup::Scope::All)?;
            gotools::ensure()
        }
        Cmd::Build { release } => build(release),
        Cmd::Test { filter, no_lint, no_kernels, no_fuzz } => test(filter, no_lint, no_kernels, no_fuzz),
        Cmd::Demo { keep, istiod } => {
            build(false)?;
            if istiod {
                gotools::ensure()?;
                return demo::istiod::run(keep);
            }
            demo::run(keep)
        }
        Cmd::Lint => lint(),
        Cmd::Kernels => {
            ensure_setup()?;
            build(false)?;
            kernels::run(&root())
        }
        Cmd::Bench(args) => {
            ensure_setup()?;
            if args.profile {
                setup::ensure_packages(setup::PROFILING)?;
            }
            bench::run(args)
        }
        Cmd::Soak(args) => {
            ensure_setup()?;
            bench::soak::run(args)
        }
        Cmd::Count => {
            ensure_setup()?;
            setup::ensure_packages(setup::PROFILING)?;
            bench::count::run()
        }
        Cmd::Fuzz(args) => {
            ensure_setup()?;
            fuzz::run(args)
        }
    }
}
