//! `cargo xtask setup`: installs, idempotently, what a fresh Debian machine lacks to build
//! and test ambit (ARCHITECTURE.md, "Toolchains"). Checks first; installs only what is
//! missing, so every other command can call it cheaply.

use std::process::Command;

use anyhow::{bail, Context};

/// How much to install: what building ambit and running the demo need, or everything the
/// tests, the kernel matrix and the benchmarks use as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Build,
    All,
}

/// Debian packages for building ambit and running the demo, and why each is needed.
pub const BUILD_PACKAGES: &[(&str, &str)] = &[
    ("rustc-web", "Debian's rustc and its library sources build the eBPF programs"),
    ("rust-web-src", "library sources for -Z build-std=core"),
    ("cargo-web", "the cargo that drives the eBPF build"),
    ("llvm-22-dev", "bpf-linker links libLLVM 22 (same LLVM as rustc-web)"),
    ("zlib1g-dev", "bpf-linker's build"),
    ("libzstd-dev", "bpf-linker's build"),
    ("iproute2", "the test bed's namespaces, veths and bridges"),
    ("util-linux", "nsenter and setpriv in the test bed"),
    ("curl", "a real HTTP client in the tests and the demo"),
    ("python3", "a real HTTP server in the tests and the demo"),
];

/// Debian packages only the tests, the kernel matrix and the benchmarks use.
pub const PACKAGES: &[(&str, &str)] = &[
    ("python3-venv", "a private virtual environment for kubernetes-validate"),
    ("python3-scapy", "crafted packets for the mesh-boundary attack tests"),
    ("rust-web-clippy", "clippy for Debian's rustc: `lint` checks the eBPF programs with it"),
    ("iperf3", "bulk transfers"),
    ("iptables", "checking that ambit creates no iptables rules"),
    ("nftables", "checking that ambit creates no nftables rules"),
    ("bpftool", "inspecting pinned programs and links in tests"),
    ("tcpdump", "checking that tunnelled traffic is encrypted on the wire"),
    ("qemu-system-x86", "booting other kernels for the kernel matrix (TCG)"),
    ("busybox-static", "the kernel-matrix guests' userland"),
    ("cpio", "packing the guests' initramfs"),
    ("xz-utils", "unpacking 6.12's compressed modules"),
    ("bind9-dnsutils", "dig, a real DNS client in the DNS tests"),
    ("dnsmasq-base", "a real upstream resolver inside the DNS tests' bed"),
];

/// Only for measuring (`bench --profile`, `count`): installed by those commands
/// when missing, not by the build and the tests.
pub const PROFILING: &[(&str, &str)] = &[
    ("linux-perf", "perf record, stat and trace in `bench --profile`"),
    ("valgrind", "callgrind instruction counts for `count`"),
];

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Drives the fuzz targets (libFuzzer) in `fuzz/`.
const CARGO_FUZZ_VERSION: &str = "0.13.2";
/// Validates the Kubernetes manifests offline (schemas of many Kubernetes versions inside).
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
const LLVM: &str = "/usr/lib/llvm-22";
/// rustc-web older than this cannot build aya-ebpf 0.2.
const MIN_EBPF_RUSTC: (u32, u32) = (1, 96);

fn missing_packages(packages: &[(&'static str, &str)]) -> anyhow::Result<Vec<&'static str>> {
    let names: Vec<&str> = packages.iter().map(|(p, _)| *p).collect();
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${db:Status-Abbrev}\n"])
        .args(&names)
        .output()
        .context("running dpkg-query (ambit's setup supports Debian-based systems)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(names.into_iter().filter(|p| !text.lines().any(|l| l.starts_with(&format!("{p} ii")))).collect())
}

fn cargo_bin() -> std::path::PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| "/root/.cargo".into());
    home.join("bin")
}

fn bpf_linker_ok() -> bool {
    Command::new(cargo_bin().join("bpf-linker"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
}

fn cargo_fuzz_ok() -> bool {
    Command::new(cargo_bin().join("cargo-fuzz"))
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(CARGO_FUZZ_VERSION))
}

fn ebpf_rustc_version() -> Option<(u32, u32)> {
    let out = Command::new("/usr/bin/rustc").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v = text.split_whitespace().nth(1)?;
    let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("+ {cmd:?}");
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Python tools the tests use, in a virtual environment of their own under `target/`.
pub fn tools_venv() -> std::path::PathBuf {
    crate::root().join("target/tools/venv")
}

/// promtool, taken out of Debian's `prometheus` package (installing the package would also
/// start a Prometheus server as a system service).
pub fn promtool() -> std::path::PathBuf {
    crate::root().join("target/tools/bin/promtool")
}

/// The Prometheus server from the same package: the tests run it in the bed, scraping the
/// proxies, to run the queries of Kiali and Istio's dashboards.
pub fn prometheus() -> std::path::PathBuf {
    crate::root().join("target/tools/bin/prometheus")
}

fn promtool_ok() -> bool {
    [promtool(), prometheus()]
        .iter()
        .all(|bin| Command::new(bin).arg("--version").output().is_ok_and(|o| o.status.success()))
}

fn install_promtool() -> anyhow::Result<()> {
    let work = crate::root().join("target/tools/deb");
    let _fresh_start = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).context("creating target/tools/deb")?;
    run(Command::new("apt-get").args(["download", "-q", "prometheus"]).current_dir(&work))?;
    let deb = std::fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(work.join("root")))?;
    for (name, bin) in [("promtool", promtool()), ("prometheus", prometheus())] {
        std::fs::create_dir_all(bin.parent().expect("a parent"))?;
        std::fs::copy(work.join("root/usr/bin").join(name), &bin)
            .with_context(|| format!("copying {name}"))?;
    }
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

fn kubernetes_validate_ok() -> bool {
    Command::new(tools_venv().join("bin/kubernetes-validate"))
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether everything `scope` needs is in place (no output, no changes).
pub fn is_complete(scope: Scope) -> bool {
    let build = missing_packages(BUILD_PACKAGES).is_ok_and(|m| m.is_empty()) && bpf_linker_ok();
    build
        && (scope == Scope::Build
            || (missing_packages(PACKAGES).is_ok_and(|m| m.is_empty())
                && cargo_fuzz_ok()
                && kubernetes_validate_ok()
                && promtool_ok()))
}

/// Installs those of `packages` that are missing (as root); nothing when all are there.
pub fn ensure_packages(packages: &[(&'static str, &str)]) -> anyhow::Result<()> {
    let missing = missing_packages(packages)?;
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!("missing Debian packages {missing:?}: run this as root to have them installed");
    }
    eprintln!("xtask setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn setup(scope: Scope) -> anyhow::Result<()> {
    ensure_packages(BUILD_PACKAGES)?;
    if scope == Scope::All {
        ensure_packages(PACKAGES)?;
    }
    match ebpf_rustc_version() {
        Some(v) if v >= MIN_EBPF_RUSTC => {}
        other => bail!(
            "/usr/bin/rustc is {other:?}; the eBPF build needs rustc-web >= {}.{} \
             (Debian 12: enable the bookworm-security suite and run `cargo xtask setup` again)",
            MIN_EBPF_RUSTC.0,
            MIN_EBPF_RUSTC.1
        ),
    }
    if !bpf_linker_ok() {
        eprintln!("xtask setup: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
        let path = format!("{LLVM}/bin:{}", std::env::var("PATH").unwrap_or_default());
        run(Command::new("cargo")
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", path)
            .env("LLVM_PREFIX", LLVM))?;
    }
    if scope == Scope::Build {
        return Ok(());
    }
    if !cargo_fuzz_ok() {
        eprintln!("xtask setup: installing cargo-fuzz {CARGO_FUZZ_VERSION} (about a minute)");
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    if !promtool_ok() {
        eprintln!("xtask setup: extracting promtool and prometheus from Debian's prometheus package");
        install_promtool()?;
    }
    if !kubernetes_validate_ok() {
        let venv = tools_venv();
        eprintln!("xtask setup: installing {KUBERNETES_VALIDATE} into {}", venv.display());
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
        run(Command::new(venv.join("bin/pip")).args([
            "install",
            "-q",
            "--disable-pip-version-check",
            KUBERNETES_VALIDATE,
        ]))?;
    }
    Ok(())
}
