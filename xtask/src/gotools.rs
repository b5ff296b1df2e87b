//! Builds the real Kubernetes and Istio components the tests run against, from their Go
//! modules at the versions pinned in `ambit_testbed::tools`, with the ordinary `go` client and
//! the Go module proxy; nothing of their source is kept in the repository.
//!
//! - istiod: `go install istio.io/istio/pilot/cmd/pilot-discovery@<version>` (the module has
//!   no `replace` lines); the CRDs come from the same module's download.
//! - kube-apiserver, kubectl, etcd: `k8s.io/kubernetes` replaces its staging modules with
//!   local paths, which do not apply to a module that requires it. A small wrapper module is
//!   generated: it requires `k8s.io/kubernetes` and replaces each staging module (listed from
//!   that release's go.mod) with its published `v0.X.Y`; etcd is the version it selects.
//!
//! - The CNI reference plugins and cnitool: `go install` of each, by package path.
//! - istioctl (same Istio module) and helm: `go install` by package path.
//!
//! Binaries go to `<cache>/<set>-<version>/`, marked complete last; a set already there is
//! not rebuilt. Go's own module and build caches make a rebuild after a version change quick.

use std::{path::Path, process::Command, time::Instant};

use ambit_testbed::tools::{self, CNI, CNI_PLUGINS, HELM, ISTIO, ISTIO_RELEASE, KUBERNETES};
use anyhow::{bail, Context};

fn go() -> Command {
    let mut c = Command::new("go");
    // No toolchain downloads (GOTOOLCHAIN=local), static binaries, modules as the go.mod says.
    c.env("GOTOOLCHAIN", "local").env("CGO_ENABLED", "0").env("GOFLAGS", "-mod=mod");
    c
}

fn run(mut cmd: Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("{what}: running {cmd:?} (is Go installed?)"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(25).collect();
        bail!("{what} failed ({}):\n{}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A field of `go mod download -json` / `go list -m -json` output.
fn json_field(json: &str, field: &str) -> anyhow::Result<String> {
    let v: serde_json::Value = serde_json::from_str(json).context("go's JSON")?;
    v[field].as_str().map(str::to_string).with_context(|| format!("no {field} in {json}"))
}

fn timed(what: &str, estimate: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    eprintln!("xtask setup: building {what} ({estimate} on 2 cores with a cold cache)");
    let start = Instant::now();
    f()?;
    eprintln!("xtask setup: {what} built in {} s", start.elapsed().as_secs());
    Ok(())
}

fn complete(dir: &Path) -> bool {
    dir.join(".complete").exists()
}

/// Builds whichever pinned set is missing; prints what it does from its first second.
pub fn ensure() -> anyhow::Result<()> {
    let dirs = [tools::kubernetes_dir(), tools::istio_dir(), tools::cni_dir(), tools::clients_dir()];
    if dirs.iter().all(|d| complete(d)) {
        return Ok(());
    }
    let version = run(
        {
            let mut c = go();
            c.arg("version");
            c
        },
        "go version",
    )?;
    eprintln!("xtask setup: {} ; tools cache {}", version.trim(), tools::cache().display());
    if !complete(&tools::istio_dir()) {
        istio(&tools::istio_dir())?;
    }
    if !complete(&tools::kubernetes_dir()) {
        kubernetes(&tools::kubernetes_dir())?;
    }
    if !complete(&tools::cni_dir()) {
        cni(&tools::cni_dir())?;
    }
    if !complete(&tools::clients_dir()) {
        clients(&tools::clients_dir())?;
    }
    Ok(())
}

fn clients(dir: &Path) -> anyhow::Result<()> {
    fresh(dir)?;
    timed("istioctl and helm", "about 4 min (istioctl shares istiod's build cache)", || {
        for (package, tags) in [
            (format!("istio.io/istio/istioctl/cmd/istioctl@{ISTIO}"), "-tags=vtprotobuf,disable_pgv"),
            (format!("helm.sh/helm/v4/cmd/helm@{HELM}"), "-tags="),
        ] {
            let mut c = go();
            c.args(["install", "-trimpath", tags, "-ldflags", "-s -w"]).arg(&package).env("GOBIN", dir);
            run(c, &format!("building {package}"))?;
        }
        Ok(())
    })?;
    std::fs::write(dir.join(".complete"), format!("{ISTIO} {HELM}"))?;
    Ok(())
}

fn cni(dir: &Path) -> anyhow::Result<()> {
    fresh(dir)?;
    timed("the CNI reference plugins and cnitool", "under a minute", || {
        for package in [
            format!("github.com/containernetworking/plugins/plugins/main/bridge@{CNI_PLUGINS}"),
            format!("github.com/containernetworking/plugins/plugins/main/loopback@{CNI_PLUGINS}"),
            format!("github.com/containernetworking/plugins/plugins/ipam/host-local@{CNI_PLUGINS}"),
            format!("github.com/containernetworking/cni/cnitool@{CNI}"),
        ] {
            let mut c = go();
            c.args(["install", "-trimpath", "-ldflags", "-s -w"]).arg(&package).env("GOBIN", dir);
            run(c, &format!("building {package}"))?;
        }
        Ok(())
    })?;
    std::fs::write(dir.join(".complete"), format!("{CNI_PLUGINS} {CNI}"))?;
    Ok(())
}

fn fresh(dir: &Path) -> anyhow::Result<()> {
    let _partial_or_absent = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))
}

fn istio(dir: &Path) -> anyhow::Result<()> {
    fresh(dir)?;
    let rev = ISTIO.rsplit('-').next().unwrap_or(ISTIO);
    let ldflags = format!(
        "-s -w -X istio.io/istio/pkg/version.buildVersion={ISTIO_RELEASE}-{rev} \
         -X istio.io/istio/pkg/version.buildGitRevision={rev} -X istio.io/istio/pkg/version.buildStatus=Clean"
    );
    timed("istiod (istio.io/istio pilot-discovery)", "about 7 min", || {
        let mut c = go();
        c.args(["install", "-trimpath", "-tags=vtprotobuf,disable_pgv", "-ldflags", &ldflags])
            .arg(format!("istio.io/istio/pilot/cmd/pilot-discovery@{ISTIO}"))
            .env("GOBIN", dir);
        run(c, "building pilot-discovery").map(|_| ())
    })?;
    let mut c = go();
    c.args(["mod", "download", "-json"]).arg(format!("istio.io/istio@{ISTIO}"));
    let module_dir = json_field(&run(c, "locating istio.io/istio")?, "Dir")?;
    let crds = Path::new(&module_dir).join("manifests/charts/base/files/crd-all.gen.yaml");
    std::fs::copy(&crds, dir.join("crd-all.gen.yaml"))
        .with_context(|| format!("copying {}", crds.display()))?;
    std::fs::write(dir.join(".complete"), ISTIO)?;
    Ok(())
}

/// The wrapper module's go.mod: `k8s.io/kubernetes` required, each staging module replaced by
/// its published version (from that release's own go.mod), its `godebug` settings kept.
fn wrapper_go_mod(kubernetes_go_mod: &str) -> anyhow::Result<String> {
    let staging = format!("v0.{}", KUBERNETES.trim_start_matches("v1."));
    let go_line = kubernetes_go_mod
        .lines()
        .find(|l| l.starts_with("go "))
        .context("k8s.io/kubernetes's go.mod has no go line")?;
    let mut out = format!("module ambit.local/k8s-tools\n\n{go_line}\n\n");
    for l in kubernetes_go_mod.lines().filter(|l| l.starts_with("godebug")) {
        out.push_str(l);
        out.push('\n');
    }
    out.push_str(&format!("\nrequire k8s.io/kubernetes {KUBERNETES}\n\nreplace (\n"));
    let mut n = 0;
    for l in kubernetes_go_mod.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if let [module, "=>", path] = f.as_slice() {
            if path.starts_with("./staging/") {
                out.push_str(&format!("\t{module} => {module} {staging}\n"));
                n += 1;
            }
        }
    }
    out.push_str(")\n");
    if n == 0 {
        bail!(
            "k8s.io/kubernetes {KUBERNETES}'s go.mod replaces no staging module: the wrapper would not build"
        );
    }
    Ok(out)
}

fn kubernetes(dir: &Path) -> anyhow::Result<()> {
    fresh(dir)?;
    let work = dir.join("wrapper");
    std::fs::create_dir_all(&work)?;
    let mut c = go();
    c.args(["list", "-m", "-json"]).arg(format!("k8s.io/kubernetes@{KUBERNETES}"));
    let go_mod_path = json_field(&run(c, "locating k8s.io/kubernetes")?, "GoMod")?;
    let go_mod = std::fs::read_to_string(&go_mod_path).with_context(|| format!("reading {go_mod_path}"))?;
    std::fs::write(work.join("go.mod"), wrapper_go_mod(&go_mod)?)?;
    // Main packages cannot be imported; a file that is never built still makes `go mod tidy`
    // resolve everything they need.
    std::fs::write(
        work.join("tools.go"),
        "//go:build tools\n\npackage tools\n\nimport (\n\t_ \"go.etcd.io/etcd/server/v3\"\n\t_ \"k8s.io/kubernetes/cmd/kube-apiserver\"\n\t_ \"k8s.io/kubernetes/cmd/kubectl\"\n)\n",
    )?;
    eprintln!("xtask setup: resolving k8s.io/kubernetes {KUBERNETES}'s modules (a minute or two)");
    let mut c = go();
    c.args(["mod", "tidy"]).current_dir(&work);
    run(c, "go mod tidy in the Kubernetes wrapper module")?;
    let minor = KUBERNETES.trim_start_matches("v1.").split('.').next().unwrap_or("0");
    let mut ldflags = String::from("-s -w");
    for kv in [
        format!("gitVersion={KUBERNETES}"),
        "gitMajor=1".into(),
        format!("gitMinor={minor}"),
        "gitTreeState=clean".into(),
    ] {
        ldflags.push_str(&format!(
            " -X k8s.io/client-go/pkg/version.{kv} -X k8s.io/component-base/version.{kv}"
        ));
    }
    for (name, package, estimate) in [
        ("kube-apiserver", "k8s.io/kubernetes/cmd/kube-apiserver", "about 5 min"),
        ("kubectl", "k8s.io/kubernetes/cmd/kubectl", "under a minute after the API server"),
        ("etcd", "go.etcd.io/etcd/server/v3", "seconds after kubectl"),
    ] {
        timed(name, estimate, || {
            let mut c = go();
            c.args(["build", "-trimpath", "-ldflags", &ldflags, "-o"])
                .arg(dir.join(name))
                .arg(package)
                .current_dir(&work);
            run(c, &format!("building {name}")).map(|_| ())
        })?;
    }
    std::fs::write(dir.join(".complete"), KUBERNETES)?;
    Ok(())
}
