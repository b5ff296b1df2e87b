//! Kernels from Debian's archive: resolved and downloaded with a private apt configuration
//! (nothing is installed, the system's apt state is not touched), then only `vmlinuz` and the
//! few modules the guest needs are extracted. Everything is cached under the kernel cache.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

/// Where downloads and extracted kernels are kept between runs (and between clones).
pub fn cache_root() -> PathBuf {
    std::env::var_os("AMBIT_KERNEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/ambit-kernels".into())
}

/// Modules the guest loads: veth for the pods, clsact and cls_bpf for kernels without tcx.
pub const MODULES: &[&str] = &["veth", "sch_ingress", "cls_bpf"];

const SOURCES: &str = "\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bullseye
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security bullseye-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
";

struct Apt {
    root: PathBuf,
}

impl Apt {
    fn new(cache: &Path) -> anyhow::Result<Apt> {
        let root = cache.join("apt");
        for d in ["sources.list.d", "state/lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(root.join(d))?;
        }
        fs::write(root.join("sources.list.d/ambit-kernels.sources"), SOURCES)?;
        let status = root.join("status");
        if !status.exists() {
            fs::write(&status, "")?;
        }
        Ok(Apt { root })
    }

    fn cmd(&self, tool: &str) -> Command {
        let r = self.root.display();
        let mut c = Command::new(tool);
        for o in [
            "Dir::Etc::SourceList=/dev/null".to_string(),
            format!("Dir::Etc::SourceParts={r}/sources.list.d"),
            format!("Dir::State={r}/state"),
            format!("Dir::State::status={r}/status"),
            format!("Dir::Cache={r}/cache"),
            "Acquire::Languages=none".into(),
            "APT::Sandbox::User=root".into(),
            "Debug::NoLocking=1".into(),
        ] {
            c.arg("-o").arg(o);
        }
        c
    }

    fn run(&self, mut c: Command) -> anyhow::Result<String> {
        let out = c.output().with_context(|| format!("running {c:?}"))?;
        if !out.status.success() {
            bail!("{c:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn update(&self) -> anyhow::Result<()> {
        let mut c = self.cmd("apt-get");
        c.args(["update", "-q"]);
        self.run(c).map(|_| ())
    }

    /// Package names matching `pattern` (an apt-cache regex).
    fn search(&self, pattern: &str) -> anyhow::Result<Vec<String>> {
        let mut c = self.cmd("apt-cache");
        c.args(["search", "--names-only", pattern]);
        Ok(self.run(c)?.lines().filter_map(|l| l.split_whitespace().next()).map(String::from).collect())
    }

    fn download(&self, package: &str, into: &Path) -> anyhow::Result<PathBuf> {
        let mut c = self.cmd("apt-get");
        c.current_dir(into).args(["download", "-q", package]);
        self.run(c)?;
        fs::read_dir(into)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&format!("{package}_")))
            })
            .with_context(|| format!("{package} downloaded but not found in {}", into.display()))
    }
}

/// Numbers in a package name, for picking the newest ABI ("6.1.0-50" > "6.1.0-47").
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse().ok()).collect()
}

/// A kernel ready to boot.
#[derive(Clone, Debug)]
pub struct Kernel {
    pub package: String,
    pub vmlinuz: PathBuf,
    /// Uncompressed `.ko` files, named after the module.
    pub modules: Vec<PathBuf>,
}

/// Returns the newest package matching `pattern`, downloaded and extracted (from the cache
/// when it is there).
pub fn kernel(pattern: &str, cache: &Path) -> anyhow::Result<Kernel> {
    let resolved = cache.join(format!("resolved-{}", sanitize(pattern)));
    let package = match fs::read_to_string(&resolved) {
        Ok(p) if cache.join("kernels").join(p.trim()).join("vmlinuz").exists() => p.trim().to_string(),
        _ => {
            let apt = Apt::new(cache)?;
            apt.update().context("updating the private apt lists (Debian's archive must be reachable)")?;
            let mut names = apt.search(pattern)?;
            names.sort_by_key(|n| version_key(n));
            let newest = names.pop().with_context(|| format!("no package matches {pattern}"))?;
            let dir = cache.join("kernels").join(&newest);
            let debs = cache.join("debs");
            fs::create_dir_all(&debs)?;
            eprintln!("xtask kernels: downloading {newest}");
            let deb = apt.download(&newest, &debs)?;
            extract(&deb, &dir).with_context(|| format!("extracting {}", deb.display()))?;
            // The .deb is 60-100 MB and everything needed is extracted now.
            fs::remove_file(&deb)?;
            fs::write(&resolved, &newest)?;
            newest
        }
    };
    let dir = cache.join("kernels").join(&package);
    let modules = MODULES.iter().map(|m| dir.join(format!("{m}.ko"))).collect();
    Ok(Kernel { package, vmlinuz: dir.join("vmlinuz"), modules })
}

fn sanitize(pattern: &str) -> String {
    pattern.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect()
}

fn extract(deb: &Path, dir: &Path) -> anyhow::Result<()> {
    let tmp = dir.with_extension("partial");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    let mut wildcards = vec!["./boot/vmlinuz-*".to_string()];
    wildcards.extend(MODULES.iter().map(|m| format!("*/{m}.ko*")));
    let script = format!(
        "dpkg-deb --fsys-tarfile '{}' | tar -x -C '{}' --wildcards {}",
        deb.display(),
        tmp.display(),
        wildcards.iter().map(|w| format!("'{w}'")).collect::<Vec<_>>().join(" ")
    );
    let status = Command::new("sh").args(["-c", &script]).status()?;
    if !status.success() {
        bail!("{script}: {status}");
    }
    let boot = fs::read_dir(tmp.join("boot"))?.flatten().next().context("no vmlinuz in the package")?;
    fs::rename(boot.path(), tmp.join("vmlinuz"))?;
    for m in MODULES {
        let found = find(&tmp.join("lib"), &format!("{m}.ko"))?
            .with_context(|| format!("module {m} not in the package"))?;
        let out = tmp.join(format!("{m}.ko"));
        if found.extension().is_some_and(|e| e == "xz") {
            // 6.12 ships xz-compressed modules; busybox's insmod wants plain .ko.
            let data = Command::new("xz").arg("-dc").arg(&found).output()?;
            if !data.status.success() {
                bail!("xz -dc {}: {}", found.display(), String::from_utf8_lossy(&data.stderr));
            }
            fs::write(&out, data.stdout)?;
        } else {
            fs::copy(&found, &out)?;
        }
    }
    fs::remove_dir_all(tmp.join("lib"))?;
    fs::remove_dir_all(tmp.join("boot"))?;
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::rename(&tmp, dir)?;
    Ok(())
}

/// The file under `dir` whose name starts with `prefix` (`veth.ko` matches `veth.ko.xz`).
fn find(dir: &Path, prefix: &str) -> anyhow::Result<Option<PathBuf>> {
    for e in fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(f) = find(&p, prefix)? {
                return Ok(Some(f));
            }
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == prefix || n.starts_with(&format!("{prefix}.")))
        {
            return Ok(Some(p));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_abi_wins() {
        let mut v = ["linux-image-6.1.0-50-amd64", "linux-image-6.1.0-9-amd64", "linux-image-6.1.0-47-amd64"];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(v.last(), Some(&"linux-image-6.1.0-50-amd64"));
        let mut w = ["linux-image-6.12.101+deb12-amd64", "linux-image-6.12.99+deb12-amd64"];
        w.sort_by_key(|n| version_key(n));
        assert_eq!(w.last(), Some(&"linux-image-6.12.101+deb12-amd64"));
    }
}
