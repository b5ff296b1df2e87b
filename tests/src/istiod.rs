//! A real istiod (`pilot-discovery discovery`, built from its Go module) in the bed, against
//! the bed's real API server: ambient on, its CA trusting ambit's service account to ask for
//! workload certificates, its xDS and CA on 15012 at the namespace's bridge address, debug
//! endpoints on the namespace's loopback.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{
    exec::{node_command, Proc},
    netns,
    realkube::Kube,
    tools,
};

pub const XDS_PORT: u16 = 15012;
const DEBUG: &str = "127.0.0.1:8080";
/// The name in istiod's serving certificate.
pub const SERVING_NAME: &str = "istiod.istio-system.svc";

pub struct Istiod<'b> {
    pub proc: Proc<'b>,
    /// `https://<address>:15012`.
    pub address: String,
    /// The mesh root istiod's CA created (from its `istio-ca-root-cert` ConfigMap).
    pub root_cert: PathBuf,
    argv: Vec<String>,
    env: Vec<(String, String)>,
    kube: &'b Kube<'b>,
    starts: u32,
}

impl<'b> Istiod<'b> {
    /// Installs Istio's CRDs and the `istio-system` namespace, starts istiod with
    /// `CA_TRUSTED_NODE_ACCOUNTS=<trusted>` (`ns/sa`), and waits until it is ready and has
    /// published its root.
    pub fn start(kube: &'b Kube<'b>, trusted: &str) -> Istiod<'b> {
        Self::try_start(kube, trusted).unwrap_or_else(|e| panic!("starting istiod: {e:#}"))
    }

    fn try_start(kube: &'b Kube<'b>, trusted: &str) -> anyhow::Result<Istiod<'b>> {
        let crds = std::fs::read_to_string(tools::istio_crds())?;
        kube.apply(&crds).context("installing Istio's CRDs")?;
        kube.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: istio-system\n")?;
        let dir = kube.dir.join("istiod");
        std::fs::create_dir_all(&dir)?;
        let ip = kube.node.bridge_ipv4();
        let bin = tools::pilot_discovery();
        let argv: Vec<String> = [
            bin.to_str().context("utf-8")?,
            "discovery",
            &format!("--kubeconfig={}", kube.admin.display()),
            "--clusterID=Kubernetes",
            "--domain=cluster.local",
            &format!("--httpAddr={DEBUG}"),
            "--grpcAddr=127.0.0.1:15010",
            &format!("--secureGRPCAddr={ip}:{XDS_PORT}"),
            "--httpsAddr=127.0.0.1:15017",
            "--monitoringAddr=127.0.0.1:15014",
            "--ctrlz_address=127.0.0.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let env: Vec<(String, String)> = [
            ("POD_NAMESPACE", "istio-system"),
            ("POD_NAME", "istiod-0"),
            ("CLUSTER_ID", "Kubernetes"),
            ("REVISION", "default"),
            ("PILOT_ENABLE_AMBIENT", "true"),
            ("CA_TRUSTED_NODE_ACCOUNTS", trusted),
            ("ENABLE_LEADER_ELECTION", "false"),
            ("INJECT_ENABLED", "false"),
            ("ENABLE_DEBUG_ON_HTTP", "true"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let root_cert = dir.join("root-cert.pem");
        let mut istiod = Istiod {
            proc: spawn(kube, &dir, &argv, &env, 1),
            address: format!("https://{}", SocketAddr::new(ip, XDS_PORT)),
            root_cert,
            argv,
            env,
            kube,
            starts: 1,
        };
        istiod.wait_ready(Duration::from_secs(60))?;
        let root = kube.get("configmap", "istio-system", "istio-ca-root-cert", "{.data.root-cert\\.pem}")?;
        if !root.contains("BEGIN CERTIFICATE") {
            bail!("istiod published no root: {root:?}");
        }
        std::fs::write(&istiod.root_cert, root)?;
        Ok(istiod)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.proc.exited() {
                bail!("istiod exited ({status}):\n{}", self.proc.output());
            }
            if self.debug("/ready").is_ok() {
                // The root ConfigMap follows readiness closely; wait for it as well.
                let root =
                    self.kube.get("configmap", "istio-system", "istio-ca-root-cert", "{.metadata.name}");
                if root.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("istiod not ready within {timeout:?}:\n{}", self.proc.output());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A debug endpoint's body (e.g. `/debug/syncz`); an error unless it answers 200.
    pub fn debug(&self, path: &str) -> anyhow::Result<String> {
        let (status, body) =
            netns::http(&self.kube.node.netns_path(), "GET", DEBUG.parse().expect("addr"), path)?;
        if status != 200 {
            bail!("GET {path}: {status}: {body}");
        }
        Ok(body)
    }

    /// Kills istiod (SIGKILL).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    /// Starts it again (same root: it is kept in its Secret) and waits until ready.
    pub fn restart(&mut self) {
        self.proc.kill();
        self.starts += 1;
        let dir = self.kube.dir.join("istiod");
        self.proc = spawn(self.kube, &dir, &self.argv, &self.env, self.starts);
        self.wait_ready(Duration::from_secs(60)).unwrap_or_else(|e| panic!("restarting istiod: {e:#}"));
    }
}

fn spawn<'b>(
    kube: &'b Kube<'b>,
    dir: &std::path::Path,
    argv: &[String],
    env: &[(String, String)],
    n: u32,
) -> Proc<'b> {
    let args: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut cmd = node_command(&kube.node, &args);
    // From an empty directory: istiod's defaults (./etc/cacerts, mesh config) are relative.
    cmd.current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Proc::spawn(kube.bed(), &format!("istiod-{n}"), cmd)
}
