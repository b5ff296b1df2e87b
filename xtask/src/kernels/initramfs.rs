//! The guest's initramfs: busybox, iproute2's `ip`, ambit and netprobe (with the shared
//! libraries they link, copied from this machine), the kernel's modules, a mesh file and the
//! `/init` script. gzip'd newc cpio, a few MB.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::{symlink, PermissionsExt},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context};

use super::fetch::Kernel;

const INIT: &str = include_str!("guest-init.sh");

/// busybox applets the init script uses.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "insmod", "uname", "echo", "sed", "grep", "sleep", "seq", "kill", "wget",
    "nsenter", "poweroff", "sync", "cat",
];

const MESH: &str = "\
namespaces:
  - name: guest
    labels: {istio.io/dataplane-mode: ambient}
pods:
  - name: a
    namespace: guest
    ips: [10.0.1.2]
    netns: /run/netns/pa
  - name: b
    namespace: guest
    ips: [10.0.2.2]
    netns: /run/netns/pb
";

/// Shared libraries (and the loader) a dynamically linked binary needs, from `ldd`.
fn libraries(bin: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(bin).output().context("running ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
        .map(PathBuf::from)
        .collect())
}

fn copy_into(root: &Path, src: &Path, dst_rel: &str) -> anyhow::Result<()> {
    let dst = root.join(dst_rel.trim_start_matches('/'));
    fs::create_dir_all(dst.parent().expect("has a parent"))?;
    fs::copy(src, &dst).with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    Ok(())
}

/// Builds `<work>/initrd.gz` for `kernel`; `bins` are (path on this machine, name in /bin).
pub fn build(work: &Path, kernel: &Kernel, bins: &[(PathBuf, &str)]) -> anyhow::Result<PathBuf> {
    let root = work.join("root");
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    for d in ["bin", "sbin", "proc", "sys", "dev", "tmp", "run", "modules", "etc"] {
        fs::create_dir_all(root.join(d))?;
    }
    copy_into(&root, Path::new("/bin/busybox"), "/bin/busybox")?;
    for a in APPLETS {
        symlink("busybox", root.join("bin").join(a))?;
    }
    let mut libs = BTreeSet::new();
    let ip = Path::new("/usr/sbin/ip");
    copy_into(&root, ip, "/sbin/ip")?;
    libs.extend(libraries(ip)?);
    for (src, name) in bins {
        // Debug info is most of a debug build's size; the guest does not need it.
        let dst = root.join("bin").join(name);
        let status = Command::new("strip").arg("--strip-debug").arg("-o").arg(&dst).arg(src).status()?;
        if !status.success() {
            bail!("strip {}: {status}", src.display());
        }
        libs.extend(libraries(src)?);
    }
    for lib in libs {
        copy_into(&root, &lib, &lib.display().to_string())?;
    }
    for m in &kernel.modules {
        copy_into(&root, m, &format!("/modules/{}", m.file_name().expect("file").to_string_lossy()))?;
    }
    fs::write(root.join("mesh.yaml"), MESH)?;
    let init = root.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let out = work.join("initrd.gz");
    let script = format!(
        "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
        root.display(),
        out.display()
    );
    let status = Command::new("sh").args(["-c", &script]).status()?;
    if !status.success() {
        bail!("packing the initramfs: {status}");
    }
    fs::remove_dir_all(&root)?;
    Ok(out)
}
