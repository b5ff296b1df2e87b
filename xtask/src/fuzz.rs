//! `cargo xtask fuzz`: the coverage-guided fuzz targets of `fuzz/` (cargo-fuzz, libFuzzer).
//!
//! Targets are built with AddressSanitizer by the project's stable toolchain: it ships the
//! sanitizer runtime, and `RUSTC_BOOTSTRAP=1` lets it take `-Zsanitizer=address` (the same
//! unlock the eBPF build uses). The dev profile keeps debug assertions on.
//!
//! - `cargo xtask test` runs every target for a few seconds on the committed corpus
//!   (`fuzz/corpus/<target>/`) and fails on any finding;
//! - `cargo xtask fuzz <target> [--minutes N]` runs one longer; new inputs go to
//!   `target/fuzz/corpus/<target>/` (copy the useful ones into the committed corpus);
//! - `cargo xtask fuzz <target> --reproduce <file>` runs one input once.
//!
//! Findings are written to `fuzz/artifacts/<target>/` (not committed).

use std::{path::PathBuf, process::Command};

use anyhow::{bail, Context};
use clap::Args;

/// Every target, in the order `cargo xtask test` runs them.
pub const TARGETS: [&str; 7] =
    ["meshfile", "xds_state", "policy", "csr", "hbone_head", "peer_identity", "dns_query"];
/// Seconds each target runs in `cargo xtask test`.
pub const TEST_SECONDS: u32 = 10;
/// A single input taking longer than this is a finding (quadratic parsing, loops).
const TIMEOUT_SECONDS: u32 = 10;

#[derive(Args, Debug, Clone)]
pub struct FuzzArgs {
    /// The target (`meshfile`, `xds_state`, `policy`, `csr`, `hbone_head`, `peer_identity`, `dns_query`).
    target: String,
    /// How long to run.
    #[arg(long, default_value_t = 10)]
    minutes: u32,
    /// Run this one input (a finding) and stop.
    #[arg(long)]
    reproduce: Option<PathBuf>,
}

fn cargo_fuzz() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(crate::root()).env("RUSTC_BOOTSTRAP", "1").args(["fuzz"]);
    c
}

/// Builds every target once (AddressSanitizer, dev profile).
pub fn build() -> anyhow::Result<()> {
    eprintln!("xtask fuzz: building the fuzz targets with AddressSanitizer (the first build takes minutes)");
    let mut c = cargo_fuzz();
    c.args(["build", "--sanitizer", "address", "--dev"]);
    crate::run(c)
}

fn run_target(target: &str, seconds: u32, corpus_out: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(corpus_out).with_context(|| format!("creating {}", corpus_out.display()))?;
    let committed = crate::root().join("fuzz/corpus").join(target);
    let mut c = cargo_fuzz();
    c.args(["run", "--sanitizer", "address", "--dev", target])
        .arg(corpus_out)
        .arg(&committed)
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-timeout={TIMEOUT_SECONDS}"))
        .arg("-rss_limit_mb=4096")
        .arg("-print_final_stats=1")
        .arg("-print_funcs=0");
    let status = c.status().with_context(|| format!("running fuzz target {target}"))?;
    if !status.success() {
        bail!(
            "fuzz target {target} found an input that fails (see its output above; the input is in \
             fuzz/artifacts/{target}/): reproduce with `cargo xtask fuzz {target} --reproduce <file>`"
        );
    }
    Ok(())
}

/// Every target for [`TEST_SECONDS`] on the committed corpus (new inputs go to a scratch
/// directory, so the committed corpus is never changed by a test run).
pub fn test_all() -> anyhow::Result<()> {
    build()?;
    let scratch = crate::root().join("target/fuzz/test-run");
    let _fresh = std::fs::remove_dir_all(&scratch);
    let mut failed = Vec::new();
    for t in TARGETS {
        eprintln!("xtask fuzz: {t} for {TEST_SECONDS} s");
        if let Err(e) = run_target(t, TEST_SECONDS, &scratch.join(t)) {
            eprintln!("xtask fuzz: {e:#}");
            failed.push(t);
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets with findings: {failed:?}");
    }
    Ok(())
}

pub fn run(args: FuzzArgs) -> anyhow::Result<()> {
    if !TARGETS.contains(&args.target.as_str()) {
        bail!("no fuzz target {:?}: the targets are {}", args.target, TARGETS.join(", "));
    }
    build()?;
    if let Some(input) = &args.reproduce {
        let mut c = cargo_fuzz();
        c.args(["run", "--sanitizer", "address", "--dev", &args.target]).arg(input);
        return crate::run(c);
    }
    let out = crate::root().join("target/fuzz/corpus").join(&args.target);
    eprintln!("xtask fuzz: {} for {} min; new inputs in {}", args.target, args.minutes, out.display());
    run_target(&args.target, args.minutes * 60, &out)
}
