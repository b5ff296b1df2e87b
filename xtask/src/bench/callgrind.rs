//! Running the node proxies under callgrind (`cargo xtask count`): a bed whose `ambit node`
//! runs under `valgrind --tool=callgrind`, with counters zeroed and profiles dumped on
//! demand.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::bail;

use ambit_testbed::Bed;

/// Root, and the tools a callgrind run needs, or an error naming what is missing.
pub(super) fn preflight(what: &str, tools: &[&str]) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} builds network namespaces and loads eBPF programs: run it as root");
    }
    for tool in tools {
        if Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?.stdout.is_empty() {
            bail!("{tool} not found (Debian packages valgrind and binutils)");
        }
    }
    Ok(())
}

/// The release build, and a bed whose node proxies will run under callgrind (profiles in the
/// returned directory) once the topology is built on it.
pub(super) fn callgrind_bed(name: &str) -> anyhow::Result<(Bed, PathBuf)> {
    crate::build(true)?;
    let release = crate::root().join("target/release");
    let bed = Bed::new(name);
    let out = bed.dir().join("callgrind");
    let bin_dir = wrapper_dir(&bed, &release, &out)?;
    std::env::set_var("AMBIT_BIN_DIR", &bin_dir);
    Ok((bed, out))
}

/// `callgrind_control <flag>` for each proxy: `-z` zeroes its counters, `-d` dumps a profile.
pub(super) fn control(pids: &[u32], flag: &str) -> anyhow::Result<()> {
    for pid in pids {
        let out = Command::new("callgrind_control").arg(flag).arg(pid.to_string()).output()?;
        if !out.status.success() {
            bail!("callgrind_control {flag} {pid}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(())
}

/// A directory with the release binaries, where `ambit` runs `ambit node` under callgrind.
fn wrapper_dir(bed: &Bed, release: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let dir = bed.dir().join("bin");
    std::fs::create_dir_all(&dir)?;
    std::fs::create_dir_all(out)?;
    for entry in std::fs::read_dir(release)?.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let executable = path.is_file()
            && std::os::unix::fs::PermissionsExt::mode(&entry.metadata()?.permissions()) & 0o111 != 0;
        if executable && name != "ambit" {
            std::os::unix::fs::symlink(&path, dir.join(&name))?;
        }
    }
    let ambit = release.join("ambit");
    let script = format!(
        "#!/bin/sh\nif [ \"$1\" = node ]; then\n  exec valgrind --tool=callgrind --demangle=no -q \
         --callgrind-out-file={}/cg.%p {} \"$@\"\nfi\nexec {} \"$@\"\n",
        out.display(),
        ambit.display(),
        ambit.display()
    );
    let wrapper = dir.join("ambit");
    std::fs::write(&wrapper, script)?;
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(dir)
}

/// Callgrind writes `cg.<pid>.<n>` on its n-th dump request; waits until each is complete.
pub(super) fn wait_for_profiles(dir: &Path, pids: &[u32], n: u32) -> anyhow::Result<Vec<PathBuf>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let files: Vec<PathBuf> = pids.iter().map(|p| dir.join(format!("cg.{p}.{n}"))).collect();
    loop {
        let complete = files
            .iter()
            .all(|f| std::fs::read_to_string(f).is_ok_and(|t| t.lines().any(|l| l.starts_with("totals:"))));
        if complete {
            return Ok(files);
        }
        if Instant::now() > deadline {
            bail!("callgrind wrote no complete profile in {} within 60 s", dir.display());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
