//! A real Kubernetes API server in the bed: etcd and kube-apiserver (built from their Go
//! modules, `tools`) in one of the bed's namespaces, with a CA, an admin client certificate
//! and a service-account signing key of the test's own making, so TokenRequest and
//! TokenReview work. No kubelet and no controller-manager run: pods are API objects whose
//! status the test sets, and whose processes it runs in the bed's pod namespaces.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use crate::{
    bed::{Bed, Node},
    exec::{node_command, run_with_timeout, Proc},
    tools,
};

pub const API_PORT: u16 = 6443;
/// The Service range the API server hands ClusterIPs out of.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// A running API server and its etcd.
pub struct Kube<'b> {
    bed: &'b Bed,
    /// The namespace both run in (a "node" of the bed, linked to the real nodes).
    pub node: Node,
    /// `https://<address>` of the API server.
    pub address: SocketAddr,
    pub dir: PathBuf,
    /// The cluster CA (PEM), which signs the API server's serving certificate.
    pub ca_cert: PathBuf,
    /// A kubeconfig with a `system:masters` client certificate.
    pub admin: PathBuf,
    _etcd: Proc<'b>,
    apiserver: Proc<'b>,
}

/// Writes a self-signed CA; returns its issuer (and the PEM written to `dir/<name>.crt`).
fn ca(dir: &Path, name: &str) -> anyhow::Result<Issuer<'static, KeyPair>> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, format!("ambit test {name}"));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = p.self_signed(&key)?;
    std::fs::write(dir.join(format!("{name}.crt")), cert.pem())?;
    Ok(Issuer::new(p, key))
}

/// A leaf signed by `issuer`, written as `dir/<name>.crt` and `.key`.
fn leaf(
    dir: &Path,
    name: &str,
    issuer: &Issuer<'_, KeyPair>,
    cn: &str,
    org: Option<&str>,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        p.distinguished_name.push(DnType::OrganizationName, o);
    }
    p.subject_alt_names = sans;
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    let cert = p.signed_by(&key, issuer)?;
    let (c, k) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.pem())?;
    std::fs::write(&k, key.serialize_pem())?;
    Ok((c, k))
}

/// A kubeconfig for `server` trusting `ca`, authenticating with `auth` (`client-certificate`
/// and `client-key` lines, or a `token` line).
pub fn kubeconfig(path: &Path, server: &str, ca: &Path, auth: &str) -> anyhow::Result<()> {
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: bed\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n{auth}contexts:\n- name: bed\n  context: {{cluster: bed, user: user}}\ncurrent-context: bed\n",
        ca.display()
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

impl<'b> Kube<'b> {
    /// Starts etcd and kube-apiserver in `node`'s namespace, the API server on its bridge
    /// address; waits until `/readyz` answers.
    pub fn start(bed: &'b Bed, node: &Node) -> Kube<'b> {
        Self::try_start(bed, node).unwrap_or_else(|e| panic!("starting the Kubernetes API server: {e:#}"))
    }

    fn try_start(bed: &'b Bed, node: &Node) -> anyhow::Result<Kube<'b>> {
        let dir = bed.dir().join("kube");
        std::fs::create_dir_all(&dir)?;
        let ip = node.bridge_ipv4();
        let address = SocketAddr::new(ip, API_PORT);
        let cluster_ca = ca(&dir, "ca")?;
        let sans = vec![
            SanType::IpAddress(ip),
            SanType::IpAddress("10.96.0.1".parse().expect("ip")),
            SanType::DnsName("kubernetes".try_into()?),
            SanType::DnsName("kubernetes.default.svc".try_into()?),
            SanType::DnsName("kubernetes.default.svc.cluster.local".try_into()?),
        ];
        let (serving, serving_key) = leaf(
            &dir,
            "apiserver",
            &cluster_ca,
            "kube-apiserver",
            None,
            sans,
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (admin_cert, admin_key) = leaf(
            &dir,
            "admin",
            &cluster_ca,
            "admin",
            Some("system:masters"),
            vec![],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        let sa = KeyPair::generate()?;
        std::fs::write(dir.join("sa.key"), sa.serialize_pem())?;
        std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
        let ca_cert = dir.join("ca.crt");
        let admin = dir.join("admin.kubeconfig");
        kubeconfig(
            &admin,
            &format!("https://{address}"),
            &ca_cert,
            &format!(
                "    client-certificate: {}\n    client-key: {}\n",
                admin_cert.display(),
                admin_key.display()
            ),
        )?;

        let etcd_dir = dir.join("etcd");
        let etcd_bin = tools::etcd();
        let etcd_args = [
            etcd_bin.to_str().context("utf-8")?,
            "--data-dir",
            etcd_dir.to_str().context("utf-8")?,
            "--listen-client-urls",
            "http://127.0.0.1:2379",
            "--advertise-client-urls",
            "http://127.0.0.1:2379",
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "default=http://127.0.0.1:2380",
            "--unsafe-no-fsync",
        ];
        // The API server waits for etcd by itself: readiness below covers both.
        let etcd = Proc::spawn(bed, "etcd", node_command(node, &etcd_args));

        let api = tools::kube_apiserver();
        let s = |p: &Path| p.display().to_string();
        let api_args: Vec<String> = vec![
            s(&api),
            "--etcd-servers=http://127.0.0.1:2379".into(),
            format!("--bind-address={ip}"),
            format!("--advertise-address={ip}"),
            format!("--secure-port={API_PORT}"),
            format!("--cert-dir={}", s(&dir.join("certs"))),
            format!("--tls-cert-file={}", s(&serving)),
            format!("--tls-private-key-file={}", s(&serving_key)),
            format!("--client-ca-file={}", s(&ca_cert)),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-signing-key-file={}", s(&dir.join("sa.key"))),
            format!("--service-account-key-file={}", s(&dir.join("sa.pub"))),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            // No controller-manager creates default service accounts.
            "--disable-admission-plugins=ServiceAccount".into(),
            "--allow-privileged=true".into(),
            "--endpoint-reconciler-type=none".into(),
            "--v=0".into(),
        ];
        let argv: Vec<&str> = api_args.iter().map(String::as_str).collect();
        let apiserver = Proc::spawn(bed, "kube-apiserver", node_command(node, &argv));
        let kube = Kube { bed, node: node.clone(), address, dir, ca_cert, admin, _etcd: etcd, apiserver };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if kube.kubectl(&["get", "--raw=/readyz"]).is_ok_and(|o| o.trim() == "ok") {
                return Ok(kube);
            }
            if Instant::now() > deadline {
                bail!("kube-apiserver not ready within 60 s:\n{}", kube.apiserver.output());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `kubectl` as the cluster admin, in the API server's namespace; its output.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_as(&self.admin, args, None)
    }

    /// `kubectl` with another kubeconfig (another user's rights), `stdin` fed if given.
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<String> {
        let bin = tools::kubectl();
        let config = format!("--kubeconfig={}", kubeconfig.display());
        let mut argv = vec![bin.to_str().context("utf-8")?, config.as_str()];
        argv.extend_from_slice(args);
        let mut cmd = node_command(&self.node, &argv);
        let out = match stdin {
            None => run_with_timeout(cmd, Duration::from_secs(60))?,
            Some(text) => {
                let input = self.dir.join(format!("stdin-{}.yaml", std::process::id()));
                std::fs::write(&input, text)?;
                cmd.stdin(std::fs::File::open(&input)?);
                let out = cmd.output().context("kubectl")?;
                let _gone = std::fs::remove_file(&input);
                out
            }
        };
        if !out.status.success() {
            bail!("kubectl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Server-side apply of `yaml` (one or more objects) as the admin.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        self.kubectl_as(&self.admin, &["apply", "--server-side", "--force-conflicts", "-f", "-"], Some(yaml))
    }

    /// A field of an object, by JSONPath.
    pub fn get(&self, kind: &str, namespace: &str, name: &str, jsonpath: &str) -> anyhow::Result<String> {
        self.kubectl(&["get", kind, "-n", namespace, name, "-o", &format!("jsonpath={jsonpath}")])
    }

    /// A service-account token: for `audience` (the API server's when `None`), bound to a pod
    /// when `pod` is given (its name; the uid is looked up).
    pub fn token(
        &self,
        namespace: &str,
        sa: &str,
        audience: Option<&str>,
        pod: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut args = vec!["create", "token", sa, "-n", namespace, "--duration=2h"];
        let audience_arg;
        if let Some(a) = audience {
            audience_arg = format!("--audience={a}");
            args.push(&audience_arg);
        }
        let (name_arg, uid_arg);
        if let Some(p) = pod {
            let uid = self.get("pod", namespace, p, "{.metadata.uid}")?;
            name_arg = format!("--bound-object-name={p}");
            uid_arg = format!("--bound-object-uid={uid}");
            args.extend_from_slice(&["--bound-object-kind=Pod", &name_arg, &uid_arg]);
        }
        Ok(self.kubectl(&args)?.trim().to_string())
    }

    /// A kubeconfig authenticating with `token`, written to `path`.
    pub fn token_kubeconfig(&self, path: &Path, token: &str) -> anyhow::Result<()> {
        kubeconfig(
            path,
            &format!("https://{}", self.address),
            &self.ca_cert,
            &format!("    token: {token}\n"),
        )
    }

    /// Sets a pod's status as a kubelet would: Running with `ips`, on `host_ip`, Ready or not.
    pub fn set_pod_status(
        &self,
        namespace: &str,
        name: &str,
        host_ip: IpAddr,
        ips: &[IpAddr],
        ready: bool,
    ) -> anyhow::Result<()> {
        let pod_ips: Vec<String> = ips.iter().map(|ip| format!("{{\"ip\":\"{ip}\"}}")).collect();
        let r = if ready { "True" } else { "False" };
        let now = "2026-01-01T00:00:00Z";
        let patch = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"hostIP\":\"{host_ip}\",\"hostIPs\":[{{\"ip\":\"{host_ip}\"}}],\
             \"podIP\":\"{}\",\"podIPs\":[{}],\"startTime\":\"{now}\",\
             \"containerStatuses\":[{{\"name\":\"app\",\"image\":\"app\",\"imageID\":\"\",\"ready\":{ready},\"restartCount\":0,\"started\":true,\"state\":{{\"running\":{{\"startedAt\":\"{now}\"}}}}}}],\
             \"conditions\":[\
             {{\"type\":\"Initialized\",\"status\":\"True\",\"lastTransitionTime\":\"{now}\"}},\
             {{\"type\":\"ContainersReady\",\"status\":\"{r}\",\"lastTransitionTime\":\"{now}\"}},\
             {{\"type\":\"Ready\",\"status\":\"{r}\",\"lastTransitionTime\":\"{now}\"}}]}}}}",
            ips.first().map(ToString::to_string).unwrap_or_default(),
            pod_ips.join(",")
        );
        self.kubectl(&[
            "patch",
            "pod",
            name,
            "-n",
            namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ])
        .map(|_| ())
    }

    /// The API server's log so far.
    pub fn log(&self) -> String {
        self.apiserver.output()
    }

    pub fn bed(&self) -> &'b Bed {
        self.bed
    }
}
