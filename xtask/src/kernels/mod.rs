//! `cargo xtask kernels`: boots Debian's kernels under QEMU (TCG: software emulation, never
//! KVM on these machines) with a small initramfs, and runs a capture test in each guest —
//! ambit's probe, `ambit node`, and one real connection between two network namespaces,
//! checked at both ends and in the proxy's counters and access log. Below the floor, the
//! test is that `ambit node` refuses with its message.
//!
//! Kernel packages are downloaded with a private apt configuration and cached (see
//! `fetch::cache_root`); results go to `target/kernels/matrix.md` and `.json`.

mod fetch;
mod initramfs;

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// What a kernel is expected to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Probe passes, the proxy starts, the connection is captured.
    Capture,
    /// `ambit node` refuses to start, naming what is missing.
    Refuse,
}

struct Spec {
    label: &'static str,
    /// apt-cache regex of the package names; the newest match is used.
    pattern: &'static str,
    expect: Expect,
}

const MATRIX: &[Spec] = &[
    Spec {
        label: "5.10 (Debian 11)",
        pattern: r"^linux-image-5\.10\.0-[0-9]+-amd64$",
        expect: Expect::Refuse,
    },
    Spec {
        label: "6.1 (Debian 12)",
        pattern: r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        expect: Expect::Capture,
    },
    Spec {
        label: "6.12 (Debian 12 security)",
        pattern: r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
        expect: Expect::Capture,
    },
];

/// The longest a guest may take (TCG is slow; a run takes well under a minute).
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

struct Outcome {
    label: &'static str,
    package: String,
    release: String,
    expect: Expect,
    passed: bool,
    inbound: String,
    detail: String,
    seconds: f64,
}

fn guest_lines<'a>(console: &'a str, prefix: &str) -> Vec<&'a str> {
    let p = format!("{prefix} ");
    console.lines().filter_map(|l| l.find(&p).map(|i| &l[i + p.len()..])).collect()
}

fn metric(console: &str, sample: &str) -> u64 {
    guest_lines(console, "AMBIT-METRIC")
        .iter()
        .filter(|l| l.starts_with(sample))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Checks a guest's console against the expectation; `Err` says what was wrong.
fn judge(expect: Expect, console: &str) -> Result<String, String> {
    let guest = guest_lines(console, "AMBIT-GUEST");
    if !guest.contains(&"END") {
        return Err("the guest did not finish (no END marker)".into());
    }
    let has = |l: &str| guest.contains(&l);
    match expect {
        Expect::Refuse => {
            if has("ready") {
                return Err("ambit started on a kernel below the floor".into());
            }
            if has("ambit-exit 0") || !guest.iter().any(|g| g.starts_with("ambit-exit ")) {
                return Err("ambit node did not exit with an error".into());
            }
            if has("probe-exit 0") {
                return Err("ambit probe passed on a kernel below the floor".into());
            }
            let log = guest_lines(console, "AMBIT-LOG").join("\n");
            for needle in
                ["cannot run ambit, which needs Linux 5.14 or newer", "SO_NETNS_COOKIE (Linux 5.14+"]
            {
                if !log.contains(needle) {
                    return Err(format!("the refusal does not say {needle:?}: {log}"));
                }
            }
            Ok("refused: SO_NETNS_COOKIE (Linux 5.14+) missing".into())
        }
        Expect::Capture => {
            if !has("probe-exit 0") {
                let probe = guest_lines(console, "AMBIT-PROBE").join("\n");
                return Err(format!("ambit probe failed:\n{probe}"));
            }
            if !has("ready") {
                let log = guest_lines(console, "AMBIT-LOG").join("\n");
                return Err(format!("ambit node did not get ready:\n{log}"));
            }
            let send = guest_lines(console, "AMBIT-SEND");
            let sent = send.iter().find_map(|l| l.strip_prefix("sent "));
            let received = send.iter().find_map(|l| l.strip_prefix("received "));
            if !has("send-exit 0") || sent.is_none() || sent != received {
                return Err(format!("the connection did not arrive intact: {send:?}"));
            }
            for (sample, what) in [
                (r#"ambit_capture_events_total{event="connect_captured"}"#, "captured connect"),
                (r#"ambit_capture_events_total{event="inbound_assigned"}"#, "assigned inbound SYN"),
            ] {
                if metric(console, sample) != 1 {
                    return Err(format!("expected one {what} in the counters"));
                }
            }
            let access = guest_lines(console, "AMBIT-ACCESS");
            for dir in ["outbound", "inbound"] {
                let seen = access
                    .iter()
                    .any(|l| l.contains(&format!("direction={dir}")) && l.contains("dst=10.0.2.2:9000"));
                if !seen {
                    return Err(format!(
                        "no {dir} access-log line with the original destination: {access:?}"
                    ));
                }
            }
            Ok("captured a->b with its original destination 10.0.2.2:9000, 4 MiB hash-equal".into())
        }
    }
}

fn run_guest(kernel: &fetch::Kernel, initrd: &Path, console_path: &Path) -> anyhow::Result<String> {
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-cpu", "max", "-m", "768", "-smp", "1", "-nodefaults", "-no-reboot"])
        .args(["-display", "none", "-serial"])
        .arg(format!("file:{}", console_path.display()))
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet loglevel=3 rdinit=/init"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let deadline = Instant::now() + GUEST_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err)?;
                }
                bail!("qemu exited with {status}: {err}");
            }
            break;
        }
        if Instant::now() > deadline {
            child.kill()?;
            child.wait()?;
            bail!("the guest did not power off within {GUEST_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(fs::read_to_string(console_path).unwrap_or_default())
}

/// Runs the whole matrix; fails if any kernel did not behave as expected.
pub fn run(root: &Path) -> anyhow::Result<()> {
    let cache = fetch::cache_root();
    fs::create_dir_all(&cache).with_context(|| format!("creating the kernel cache {}", cache.display()))?;
    let out_dir = root.join("target/kernels");
    fs::create_dir_all(&out_dir)?;
    let debug = root.join("target/debug");
    let bins = [(debug.join("ambit"), "ambit"), (debug.join("netprobe"), "netprobe")];
    for (b, _) in &bins {
        if !b.exists() {
            bail!("{} is not built (cargo xtask build)", b.display());
        }
    }
    // Download and pack one after another (network, disk), then boot the guests in parallel:
    // each TCG guest keeps one core busy.
    let mut prepared = Vec::new();
    for spec in MATRIX {
        let kernel =
            fetch::kernel(spec.pattern, &cache).with_context(|| format!("getting kernel {}", spec.label))?;
        let work = out_dir.join(&kernel.package);
        fs::create_dir_all(&work)?;
        let initrd = initramfs::build(&work, &kernel, &bins)
            .with_context(|| format!("initramfs for {}", spec.label))?;
        prepared.push((spec, kernel, work, initrd));
    }
    let outcomes: Vec<Outcome> = std::thread::scope(|s| {
        let handles: Vec<_> = prepared
            .iter()
            .map(|(spec, kernel, work, initrd)| {
                s.spawn(move || {
                    eprintln!("xtask kernels: booting {} ({})", spec.label, kernel.package);
                    let started = Instant::now();
                    let console_path = work.join("console.log");
                    let result = run_guest(kernel, initrd, &console_path);
                    let seconds = started.elapsed().as_secs_f64();
                    let console = result.as_ref().map(String::as_str).unwrap_or("");
                    let verdict = match &result {
                        Ok(c) => judge(spec.expect, c),
                        Err(e) => Err(format!("{e:#}")),
                    };
                    let inbound = guest_lines(console, "AMBIT-DUMP")
                        .first()
                        .map(|l| l.rsplit('"').nth(1).unwrap_or("").to_string())
                        .unwrap_or_else(|| "-".into());
                    let release = guest_lines(console, "AMBIT-GUEST")
                        .iter()
                        .find_map(|l| l.strip_prefix("kernel "))
                        .unwrap_or("?")
                        .to_string();
                    Outcome {
                        label: spec.label,
                        package: kernel.package.clone(),
                        release,
                        expect: spec.expect,
                        passed: verdict.is_ok(),
                        inbound,
                        detail: match verdict {
                            Ok(d) => d,
                            Err(e) => format!("{e} (console: {})", console_path.display()),
                        },
                        seconds,
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("guest thread")).collect()
    });
    let table = report(&outcomes);
    fs::write(out_dir.join("matrix.md"), &table)?;
    print!("{table}");
    let failed: Vec<&str> = outcomes.iter().filter(|o| !o.passed).map(|o| o.label).collect();
    if !failed.is_empty() {
        bail!("kernel matrix failed for {failed:?}");
    }
    Ok(())
}

fn report(outcomes: &[Outcome]) -> String {
    let mut t = String::from(
        "| kernel | package | expected | result | inbound attachment | time (s) | detail |\n|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        let expected = match o.expect {
            Expect::Capture => "capture",
            Expect::Refuse => "refuse",
        };
        let inbound = match o.inbound.as_str() {
            "attached" | "adopted" | "replaced" => "tcx",
            "netlink" => "clsact + cls_bpf",
            other => other,
        };
        writeln!(
            t,
            "| {} ({}) | {} | {expected} | {} | {inbound} | {:.0} | {} |",
            o.label,
            o.release,
            o.package,
            if o.passed { "pass" } else { "FAIL" },
            o.seconds,
            o.detail
        )
        .expect("string");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURED: &str = "\
[    1.0] AMBIT-GUEST kernel 6.1.0-50-amd64
AMBIT-GUEST probe-exit 0
AMBIT-GUEST ready
AMBIT-GUEST send-exit 0
AMBIT-SEND sent 4194304 abc
AMBIT-SEND received 4194304 abc
AMBIT-METRIC ambit_capture_events_total{event=\"connect_captured\"} 1
AMBIT-METRIC ambit_capture_events_total{event=\"inbound_assigned\"} 1
AMBIT-DUMP \"inbound_attachment\": \"netlink\"
AMBIT-ACCESS x access: connection complete direction=outbound src=10.0.1.2:1 dst=10.0.2.2:9000
AMBIT-ACCESS x access: connection complete direction=inbound src=10.0.1.2:1 dst=10.0.2.2:9000
AMBIT-GUEST END
";

    #[test]
    fn a_captured_run_passes_and_each_missing_piece_fails_it() {
        assert!(judge(Expect::Capture, CAPTURED).is_ok());
        for (from, to) in [
            ("AMBIT-GUEST END\n", ""),
            ("received 4194304 abc", "received 4194304 abd"),
            ("\"connect_captured\"} 1", "\"connect_captured\"} 0"),
            ("direction=inbound", "direction=sideways"),
            ("AMBIT-GUEST ready\n", ""),
        ] {
            let broken = CAPTURED.replace(from, to);
            assert_ne!(broken, CAPTURED, "{from}");
            assert!(judge(Expect::Capture, &broken).is_err(), "{from} -> {to} must fail");
        }
        assert!(judge(Expect::Refuse, CAPTURED).is_err(), "capturing where a refusal is expected fails");
    }

    #[test]
    fn a_refusal_must_name_the_floor_and_the_feature() {
        let refused = "\
AMBIT-GUEST probe-exit 1
AMBIT-GUEST ambit-exit 1
AMBIT-LOG ambit: error: this kernel (5.10.0-30-amd64) cannot run ambit, which needs Linux 5.14 or newer with BPF, cgroup v2 and a bpf filesystem; missing: socket option SO_NETNS_COOKIE (Linux 5.14+, for keying): x
AMBIT-GUEST END
";
        assert!(judge(Expect::Refuse, refused).is_ok());
        assert!(judge(Expect::Refuse, &refused.replace("SO_NETNS_COOKIE", "something")).is_err());
        assert!(judge(Expect::Refuse, &refused.replace("ambit-exit 1", "ambit-exit 0")).is_err());
    }
}
