//! `ambit node` settings: command-line flags (each with an environment variable), their
//! defaults, and what is discovered from the machine. Logged in full at start.

pub mod kubelet;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{bail, Context};
use clap::Args;
use serde::Serialize;

use ambit_common::{
    DEFAULT_DELIVERY_MARK, DEFAULT_PROXY_MARK, DNS_PORT, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT,
};

use crate::{
    capture::klog::KernelLogLevel,
    enroll::{kube::KubeSettings, PodSource},
    meshfile::{Enrolment, Label},
    proxy::AccessLogFormat,
    proxy::UnknownDestination,
    telemetry::LogFormat,
    units::{humantime_ms, parse_duration},
};

/// `--pod-source`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodSourceKind {
    File,
    Kubernetes,
}

/// The TTL of the mesh's DNS answers, seconds: ztunnel's. Short, as the mesh's addresses
/// follow the control plane.
const DNS_TTL: u32 = 30;

/// CGROUP2_SUPER_MAGIC from linux/magic.h.
const CGROUP2_MAGIC: i64 = 0x6367_7270;

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Where pods come from: the mesh file (`--mesh-file`), or the Kubernetes API (Namespaces
    /// and this node's Pods, watched; network namespaces found under `--proc-dir`).
    #[arg(long, env = "AMBIT_POD_SOURCE", value_enum, default_value_t = PodSourceKind::File)]
    pub pod_source: PodSourceKind,

    /// Mesh file listing namespaces and pods (see docs/mesh-file.md). Watched: edits take
    /// effect within a second; an invalid edit is refused and the previous version kept.
    /// Required with `--pod-source file`.
    #[arg(long, env = "AMBIT_MESH_FILE")]
    pub mesh_file: Option<PathBuf>,

    /// How often the mesh file is checked for changes (its metadata; read only when it
    /// changed).
    #[arg(long, env = "AMBIT_MESH_FILE_POLL", default_value = "250ms", value_parser = parse_duration)]
    pub mesh_file_poll: Duration,

    /// Kubernetes: a kubeconfig file. Default: `KUBECONFIG`, `~/.kube/config`, then the
    /// in-cluster service account (how the DaemonSet runs).
    #[arg(long, env = "AMBIT_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,

    /// Kubernetes: the host's /proc, where a pod's network namespace is found from a process
    /// whose cgroup carries the pod's UID (mount the host's /proc into the container).
    #[arg(long, env = "AMBIT_PROC_DIR", default_value = "/proc")]
    pub proc_dir: PathBuf,

    /// Kubernetes: install the `ambit-cni` plugin into the node's CNI configuration and
    /// answer it, so that new pods are captured from their first packet (see docs/cni.md).
    /// The DaemonSet turns it on.
    #[arg(long, env = "AMBIT_CNI")]
    pub cni: bool,

    /// The node's CNI network configuration directory (the host's, mounted at the same path:
    /// the plugin's configuration names paths as the host sees them).
    #[arg(long, env = "AMBIT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,

    /// The node's CNI plugin directory, where `ambit-cni` is installed.
    #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,

    /// The unix socket the plugin calls (root only). Its directory also keeps the sandboxes
    /// the plugin announced, across restarts.
    #[arg(long, env = "AMBIT_CNI_SOCKET", default_value = crate::cni::protocol::DEFAULT_SOCKET)]
    pub cni_socket: PathBuf,

    /// Let a pod start uncaptured when it cannot be captured (the node proxy is down or
    /// refuses). Default: its sandbox fails, and the kubelet retries (fail closed).
    #[arg(long, env = "AMBIT_CNI_FAIL_OPEN")]
    pub cni_fail_open: bool,

    /// How long the plugin's ADD waits for the pod's capture.
    #[arg(long, env = "AMBIT_CNI_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub cni_timeout: Duration,

    /// The label (on a namespace, or a pod) that enrols pods.
    #[arg(long, env = "AMBIT_ENROL_LABEL", default_value = "istio.io/dataplane-mode=ambient")]
    pub enrol_label: Label,

    /// The pod label that opts a pod out of enrolment.
    #[arg(long, env = "AMBIT_OPT_OUT_LABEL", default_value = "istio.io/dataplane-mode=none")]
    pub opt_out_label: Label,

    /// This node's name: pods of the mesh file whose `node` names another node are not
    /// captured here. Default: the host name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// cgroup v2 directory whose processes' connects are captured (they and their
    /// descendants). Default: the root of the cgroup v2 mount, so every pod on the node.
    #[arg(long, env = "AMBIT_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// A mounted bpf filesystem; programs, maps and links are pinned under
    /// `<bpffs>/ambit/<instance>/` so capture survives proxy restarts.
    #[arg(long, env = "AMBIT_BPFFS", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// Name of this proxy's pinned state; two proxies on one machine need different names.
    #[arg(long, env = "AMBIT_INSTANCE", default_value = "default")]
    pub instance: String,

    /// When no proxy is running, let enrolled pods' new connections through uncaptured
    /// instead of refusing them (the default refuses: fail closed).
    #[arg(long, env = "AMBIT_FAIL_OPEN")]
    pub fail_open: bool,

    /// Capture enrolled pods' DNS (UDP and TCP port 53) without touching their resolver
    /// configuration, and answer it in the pod: the mesh's service and ServiceEntry names from
    /// the control plane, everything else forwarded to the pod's own resolvers. `false`:
    /// pods' DNS goes where it was sent, uncaptured.
    #[arg(long, env = "AMBIT_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_capture: bool,

    /// Kubernetes' cluster domain: short service names in DNS queries are completed in it.
    #[arg(long, env = "AMBIT_CLUSTER_DOMAIN", default_value = "cluster.local")]
    pub cluster_domain: String,

    /// How long each of a pod's resolvers is given to answer a query the mesh does not know.
    #[arg(long, env = "AMBIT_DNS_UPSTREAM_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub dns_upstream_timeout: Duration,

    /// Upgrade in place: when another `ambit node` runs this instance, start alongside it
    /// (pod listeners are shared with SO_REUSEPORT), and once ready ask it to drain (SIGTERM).
    /// Its established connections finish there; new ones come here. Without this flag a
    /// second proxy on the same instance is refused.
    #[arg(long, env = "AMBIT_TAKEOVER")]
    pub takeover: bool,

    /// SO_MARK of the proxy's own sockets, which capture never touches. Istio's ztunnel uses
    /// the same default.
    #[arg(long, env = "AMBIT_PROXY_MARK", default_value_t = DEFAULT_PROXY_MARK, value_parser = parse_u32)]
    pub proxy_mark: u32,

    /// Deliver inbound connections to the application from the client's own address, as Istio
    /// ambient does (the application logs, allowlists and rate-limits real clients). Inside
    /// each enrolled pod this sets `tcp_fwmark_accept` and `fwmark_reflect` and adds one
    /// policy rule and one route for the delivery mark (no iptables). `false`: the
    /// application sees its own pod's address as every client's.
    #[arg(long, env = "AMBIT_ORIGINAL_SOURCE", default_value_t = true, action = clap::ArgAction::Set)]
    pub original_source: bool,

    /// SO_MARK of the sockets that deliver from the client's address, and the number of the
    /// routing table their replies are looked up in, inside each pod. Never captured.
    #[arg(long, env = "AMBIT_DELIVERY_MARK", default_value_t = DEFAULT_DELIVERY_MARK, value_parser = parse_u32)]
    pub delivery_mark: u32,

    /// The kubelet's cgroup v2 directory (absolute, or relative to the cgroup v2 mount):
    /// connections its processes open to enrolled pods (health probes) reach the application
    /// uncaptured; nothing else from the node does. `none`: no exemption (probes are
    /// captured, and refused under STRICT mTLS). Default: the cgroup of the `kubelet` process
    /// found under --proc-dir, else system.slice/kubelet.service where it exists.
    #[arg(long, env = "AMBIT_KUBELET_CGROUP")]
    pub kubelet_cgroup: Option<String>,

    /// Mesh CA (`https://host:port`, Istio's certificate API: ambit controlplane or istiod).
    /// With it, traffic between enrolled pods travels in mutual-TLS HBONE tunnels with the
    /// workloads' SPIFFE identities; without it, captured traffic is relayed in plaintext.
    #[arg(long, env = "AMBIT_CA_ADDRESS", requires_all = ["root_cert", "token_file"], value_parser = parse_https_address)]
    pub ca_address: Option<String>,

    /// Control plane serving Delta ADS with Istio's workload API (`https://host:port`: ambit
    /// controlplane or istiod). Without it, workloads and services come from --mesh-file.
    #[arg(long, env = "AMBIT_XDS_ADDRESS", requires_all = ["root_cert", "token_file"], value_parser = parse_https_address)]
    pub xds_address: Option<String>,

    /// PEM root(s) the control plane's serving certificates (CA and xDS) chain to: the mesh
    /// root.
    #[arg(long, env = "AMBIT_ROOT_CERT")]
    pub root_cert: Option<PathBuf>,

    /// File with this node's bearer token for the control plane (re-read on every request):
    /// with istiod, the projected service-account token. A directory: the file in it named
    /// after this node (a Secret of per-node tokens, for ambit controlplane).
    #[arg(long, env = "AMBIT_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Name expected in the control plane's serving certificates.
    #[arg(long, env = "AMBIT_CONTROL_PLANE_NAME", default_value = "ambit-controlplane")]
    pub control_plane_name: String,

    /// Connections to addresses the mesh does not know: passed through in plaintext, or refused.
    #[arg(long, env = "AMBIT_UNKNOWN_DESTINATION", value_enum, default_value_t = UnknownDestination::Passthrough)]
    pub unknown_destination: UnknownDestination,

    /// The cluster's name as istiod knows it (its CLUSTER_ID): sent with every xDS and CA
    /// request as ztunnel sends it (the `clusterid` header, `CLUSTER_ID` metadata). istiod's
    /// CA picks the node authorizer of impersonated certificate requests by it.
    #[arg(long, env = "AMBIT_CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,

    /// Trust domain of the workload identities (spiffe://<trust domain>/ns/<ns>/sa/<sa>).
    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// Validity requested for workload certificates; renewed at half-life.
    #[arg(long, env = "AMBIT_CERT_VALIDITY", default_value = "24h", value_parser = parse_duration)]
    pub cert_validity: Duration,

    /// HBONE: tunnels per pooled connection before another is opened (inbound: streams a
    /// peer may have open on one connection). A power of two: HTTP/2 keeps a connection's
    /// streams in a table that doubles as it grows, so 100 would leave 28 of 128 slots
    /// (~330 bytes each) unused on a full connection.
    #[arg(long, env = "AMBIT_HBONE_MAX_STREAMS", default_value_t = 128)]
    pub hbone_max_streams: u32,

    /// HBONE: connections per peer (source and destination identity and address) that
    /// concurrent tunnels are spread over before they share one. Default: the number of CPUs
    /// (one TLS connection is encrypted by one core at a time).
    #[arg(long, env = "AMBIT_HBONE_SPREAD")]
    pub hbone_spread: Option<u32>,

    /// HBONE: pooled connections without tunnels close after this long.
    #[arg(long, env = "AMBIT_HBONE_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub hbone_idle_timeout: Duration,

    /// HBONE: HTTP/2 stream window, in bytes.
    #[arg(long, env = "AMBIT_HBONE_STREAM_WINDOW", default_value_t = 4 << 20)]
    pub hbone_stream_window: u32,

    /// HBONE: HTTP/2 connection window, in bytes.
    #[arg(long, env = "AMBIT_HBONE_CONNECTION_WINDOW", default_value_t = 16 << 20)]
    pub hbone_connection_window: u32,

    /// HBONE: largest HTTP/2 frame, in bytes.
    #[arg(long, env = "AMBIT_HBONE_MAX_FRAME", default_value_t = 1 << 20)]
    pub hbone_max_frame: u32,

    /// HBONE: keepalive PING interval on pooled connections.
    #[arg(long, env = "AMBIT_HBONE_PING_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub hbone_ping_interval: Duration,

    /// HBONE: a connection whose PING is not answered within this is closed.
    #[arg(long, env = "AMBIT_HBONE_PING_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub hbone_ping_timeout: Duration,

    /// HBONE: connect plus TLS handshake limit, both directions; a peer that has not
    /// finished its handshake by then is dropped (slow or idle clients hold nothing).
    #[arg(long, env = "AMBIT_HBONE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub hbone_handshake_timeout: Duration,

    /// HBONE inbound: largest request header block (HPACK-decoded bytes) accepted; larger
    /// CONNECTs are answered 431.
    #[arg(long, env = "AMBIT_HBONE_MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub hbone_max_header_bytes: u32,

    /// HBONE inbound: connections one peer address may hold open to one pod; more are closed
    /// at accept. Well-behaved peers pool: they need a handful.
    #[arg(long, env = "AMBIT_HBONE_MAX_CONNECTIONS_PER_PEER", default_value_t = 128)]
    pub hbone_max_connections_per_peer: u32,

    /// Admin endpoint (/config_dump, /quitquitquit); keep it on loopback.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    /// Prometheus endpoint (/stats/prometheus).
    #[arg(long, env = "AMBIT_STATS_ADDR", default_value = "0.0.0.0:15020")]
    pub stats_addr: SocketAddr,

    /// Readiness endpoint (/healthz/ready).
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Timeout of the proxy's upstream connects.
    #[arg(long, env = "AMBIT_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub connect_timeout: Duration,

    /// On SIGTERM: stop accepting, then wait this long for open connections to finish.
    #[arg(long, env = "AMBIT_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Log filter, RUST_LOG syntax: `info`, `debug`, `info,access=off`, ...
    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    pub log_level: String,

    /// Log level of the eBPF programs themselves (aya-log, target `ebpf`). Off by default:
    /// nothing is formatted in the kernel unless asked for.
    #[arg(long, env = "AMBIT_EBPF_LOG", value_enum, default_value_t = KernelLogLevel::Off)]
    pub ebpf_log_level: KernelLogLevel,

    /// Kernel-level tracing: TCP events of enrolled pods' sockets (connect, established, state,
    /// RTT, retransmits, close) for `ambit trace`, per-workload RTT and retransmit metrics and
    /// the access log's rtt/retransmits. `false` costs nothing in the kernel.
    #[arg(long, env = "AMBIT_KERNEL_TRACING", default_value_t = true, action = clap::ArgAction::Set)]
    pub kernel_tracing: bool,

    /// Threads that run the proxy (tokio workers). Default: 2, as ztunnel: the data path is
    /// rarely CPU-bound on more, and each extra thread costs wake-ups.
    #[arg(long, env = "AMBIT_WORKER_THREADS", default_value_t = 2)]
    pub worker_threads: usize,

    /// Log format; the access log (target `access`) follows it.
    #[arg(long, env = "AMBIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The access log's field names: ambit's, or ztunnel's (`src.addr`, `dst.hbone_addr`,
    /// `bytes_recv`, `duration="12ms"`, ...) for log pipelines written for ztunnel.
    #[arg(long, env = "AMBIT_ACCESS_LOG_FORMAT", value_enum, default_value_t = AccessLogFormat::Ambit)]
    pub access_log_format: AccessLogFormat,

    /// What `istio_build{component}` says: `ztunnel` keeps the version panel of Istio's
    /// ztunnel dashboard working.
    #[arg(long, env = "AMBIT_METRICS_COMPONENT", default_value = "ambit", value_parser = ["ambit", "ztunnel"])]
    pub metrics_component: String,

    /// Heap profiling (`/debug/pprof/heap`): one allocation sampled per this many bytes
    /// allocated, on average (Go's and jemalloc's default); 0 turns it off.
    #[arg(long, env = "AMBIT_HEAP_SAMPLE_BYTES", default_value_t = crate::profiling::heap::DEFAULT_RATE)]
    pub heap_sample_bytes: usize,
}

/// A mark that is neither decimal nor `0x` hexadecimal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{input:?}: {source}")]
struct BadNumber {
    input: String,
    #[source]
    source: std::num::ParseIntError,
}

fn parse_u32(s: &str) -> Result<u32, BadNumber> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|source| BadNumber { input: s.to_string(), source })
}

/// A control plane's address that is not `https://<host>:<port>`; the text says what to write.
#[derive(Debug, thiserror::Error)]
#[error("{0}: expected https://<host>:<port>, e.g. https://istiod.istio-system.svc:15012")]
pub struct BadAddress(AddressProblem);

#[derive(Debug, thiserror::Error)]
pub enum AddressProblem {
    #[error("{0}")]
    NotAUri(#[source] http::uri::InvalidUri),
    #[error("no scheme; write https://{0}")]
    NoScheme(String),
    #[error("no port (istiod serves on 15012)")]
    NoPort,
    #[error("expected only a host and a port, no path")]
    NotJustHostAndPort,
    #[error("scheme {0}: the control plane is reached over TLS (https)")]
    NotHttps(String),
}

/// A control plane's address: `https://<host>:<port>`. ztunnel's chart writes istiod's
/// without a scheme (`istiod.istio-system.svc:15012`); taking that would only fail later, on
/// every retry, so it is refused here, saying what to write instead.
pub fn parse_https_address(s: &str) -> Result<String, BadAddress> {
    let uri: http::Uri = s.parse().map_err(|e| BadAddress(AddressProblem::NotAUri(e)))?;
    let problem = match (uri.scheme_str(), uri.host(), uri.port_u16()) {
        (None, ..) => AddressProblem::NoScheme(s.to_string()),
        (Some("https"), Some(h), Some(_)) if !h.is_empty() && matches!(uri.path(), "" | "/") => {
            return Ok(s.trim_end_matches('/').to_string())
        }
        (Some("https"), _, None) => AddressProblem::NoPort,
        (Some("https"), ..) => AddressProblem::NotJustHostAndPort,
        (Some(other), ..) => AddressProblem::NotHttps(other.to_string()),
    };
    Err(BadAddress(problem))
}

/// Everything `ambit node` runs with, after defaults and discovery.
#[derive(Debug, Clone, Serialize)]
pub struct NodeSettings {
    pub pod_source: PodSource,
    pub enrolment: Enrolment,
    pub node_name: String,
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    pub instance: String,
    pub takeover: bool,
    pub fail_open: bool,
    pub proxy_mark: u32,
    pub original_source: bool,
    pub delivery_mark: u32,
    /// `None`: no kubelet found (or `none`): no probe is exempt from capture.
    pub kubelet_cgroup: Option<PathBuf>,
    pub kubelet_cgroup_found: kubelet::Found,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub hbone_port: u16,
    pub admin_addr: SocketAddr,
    pub stats_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    #[serde(with = "humantime_ms")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_ms")]
    pub drain_timeout: Duration,
    pub log_level: String,
    pub ebpf_log_level: KernelLogLevel,
    pub log_format: LogFormat,
    pub access_log_format: AccessLogFormat,
    pub metrics_component: String,
    pub heap_sample_bytes: usize,
    pub kernel_tracing: bool,
    pub worker_threads: usize,
    /// `None`: no mesh CA, no mTLS.
    pub ca: Option<crate::identity::caclient::CaSettings>,
    /// `None`: workloads and services from the mesh file.
    pub xds: Option<crate::xds::client::XdsSettings>,
    /// `None`: no CNI plugin; pods are found under /proc once they run.
    pub cni: Option<crate::cni::install::CniSettings>,
    pub unknown_destination: UnknownDestination,
    /// Answering pods' DNS (when captured), and resolving endpoints known by name.
    pub dns: crate::dns::DnsSettings,
    /// The cluster's name (`--cluster-id`): sent to istiod, and the cluster of the mesh
    /// file's workloads offline.
    pub cluster_id: String,
    pub identity: crate::identity::IdentitySettings,
    pub hbone: crate::proxy::hbone::HboneSettings,
}

impl NodeSettings {
    /// The trust domain and cluster the mesh file's workloads are given offline.
    pub fn origin(&self) -> crate::xds::translate::Origin<'_> {
        crate::xds::translate::Origin {
            trust_domain: &self.identity.trust_domain,
            cluster_id: &self.cluster_id,
        }
    }

    pub fn resolve(args: NodeArgs) -> anyhow::Result<NodeSettings> {
        if args.instance.is_empty() || args.instance.contains('/') || args.instance.starts_with('.') {
            bail!("--instance {:?}: must be a plain name (no '/')", args.instance);
        }
        if !args.admin_addr.ip().is_loopback() {
            bail!(
                "--admin-addr {}: must be a loopback address (/quitquitquit and /logging have no authentication)",
                args.admin_addr
            );
        }
        if args.delivery_mark == 0 || args.delivery_mark == args.proxy_mark {
            bail!(
                "--delivery-mark {:#x}: must be non-zero and differ from --proxy-mark {:#x}",
                args.delivery_mark,
                args.proxy_mark
            );
        }
        let node_name = match args.node_name {
            Some(n) if !n.is_empty() => n,
            _ => nix::unistd::gethostname()
                .context("reading the host name for --node-name")?
                .to_string_lossy()
                .into_owned(),
        };
        let cgroup = match args.cgroup {
            Some(c) => c,
            None => cgroup2_mount().context("finding the cgroup v2 mount for --cgroup")?,
        };
        check_cgroup2(&cgroup)?;
        let mount = cgroup2_mount().context("finding the cgroup v2 mount for --kubelet-cgroup")?;
        let (kubelet_cgroup, kubelet_cgroup_found) = match &args.kubelet_cgroup {
            Some(v) => kubelet::from_flag(v, &mount)?,
            None => kubelet::discover(&args.proc_dir, &mount),
        };
        let token_file = match &args.token_file {
            Some(dir) if dir.is_dir() => {
                let f = dir.join(&node_name);
                if !f.is_file() {
                    bail!(
                        "--token-file {}: a directory without a token for this node ({node_name})",
                        dir.display()
                    );
                }
                Some(f)
            }
            other => other.clone(),
        };
        let enrolment = Enrolment { enrol: args.enrol_label, opt_out: args.opt_out_label };
        let cni = match (args.cni, args.pod_source) {
            (false, _) => None,
            (true, PodSourceKind::File) => {
                bail!("--cni needs --pod-source kubernetes: the plugin looks pods up in the API")
            }
            (true, PodSourceKind::Kubernetes) => {
                if args.cni_timeout < Duration::from_secs(1) {
                    bail!("--cni-timeout {:?}: must be at least 1s", args.cni_timeout);
                }
                if !args.cni_socket.is_absolute() {
                    bail!("--cni-socket {}: must be an absolute path", args.cni_socket.display());
                }
                Some(crate::cni::install::CniSettings {
                    conf_dir: args.cni_conf_dir,
                    bin_dir: args.cni_bin_dir,
                    socket: args.cni_socket,
                    fail_open: args.cni_fail_open,
                    timeout: args.cni_timeout,
                    kubeconfig: args.kubeconfig.clone(),
                    rules: enrolment.clone(),
                })
            }
        };
        let dns = crate::dns::DnsSettings {
            capture: args.dns_capture,
            port: DNS_PORT,
            answering: crate::dns::handle::Answering {
                cluster_domain: args.cluster_domain.clone(),
                ttl: DNS_TTL,
            },
            upstream_timeout: args.dns_upstream_timeout,
            proc_dir: args.proc_dir.clone(),
        };
        let pod_source = match (args.pod_source, args.mesh_file) {
            (PodSourceKind::File, Some(mesh_file)) => {
                PodSource::File { mesh_file, poll: args.mesh_file_poll }
            }
            (PodSourceKind::File, None) => {
                bail!("--mesh-file is required with --pod-source file (or use --pod-source kubernetes)")
            }
            (PodSourceKind::Kubernetes, Some(_)) => {
                bail!("--mesh-file and --pod-source kubernetes exclude each other: pods come from the API")
            }
            (PodSourceKind::Kubernetes, None) => PodSource::Kubernetes(KubeSettings {
                kubeconfig: args.kubeconfig,
                proc_dir: args.proc_dir,
                node_name: node_name.clone(),
                sandbox_file: cni.as_ref().map(|c| c.socket.with_file_name("sandboxes.json")),
            }),
        };
        Ok(NodeSettings {
            pod_source,
            enrolment,
            node_name: node_name.clone(),
            cgroup,
            bpffs: args.bpffs,
            instance: args.instance,
            takeover: args.takeover,
            fail_open: args.fail_open,
            proxy_mark: args.proxy_mark,
            original_source: args.original_source,
            delivery_mark: args.delivery_mark,
            kubelet_cgroup,
            kubelet_cgroup_found,
            outbound_port: OUTBOUND_PORT,
            inbound_port: INBOUND_PORT,
            hbone_port: HBONE_PORT,
            admin_addr: args.admin_addr,
            stats_addr: args.stats_addr,
            readiness_addr: args.readiness_addr,
            connect_timeout: args.connect_timeout,
            drain_timeout: args.drain_timeout,
            log_level: args.log_level,
            ebpf_log_level: args.ebpf_log_level,
            log_format: args.log_format,
            access_log_format: args.access_log_format,
            metrics_component: args.metrics_component.clone(),
            heap_sample_bytes: args.heap_sample_bytes,
            kernel_tracing: args.kernel_tracing,
            worker_threads: args.worker_threads.max(1),
            ca: match (&args.ca_address, &args.root_cert, &token_file) {
                (Some(address), Some(root_cert), Some(token_file)) => {
                    Some(crate::identity::caclient::CaSettings {
                        address: address.clone(),
                        server_name: args.control_plane_name.clone(),
                        root_cert: root_cert.clone(),
                        token_file: token_file.clone(),
                        timeout: Duration::from_secs(10),
                        cluster_id: args.cluster_id.clone(),
                    })
                }
                _ => None,
            },
            xds: match (&args.xds_address, &args.root_cert, &token_file) {
                (Some(address), Some(root_cert), Some(token_file)) => Some(crate::xds::client::XdsSettings {
                    address: address.clone(),
                    server_name: args.control_plane_name.clone(),
                    root_cert: root_cert.clone(),
                    token_file: token_file.clone(),
                    node_id: node_id(&node_name),
                    cluster_id: args.cluster_id.clone(),
                    metadata: node_metadata(&node_name, &args.cluster_id),
                }),
                _ => None,
            },
            cni,
            unknown_destination: args.unknown_destination,
            dns,
            cluster_id: args.cluster_id.clone(),
            identity: crate::identity::IdentitySettings {
                trust_domain: args.trust_domain,
                validity: args.cert_validity,
            },
            hbone: crate::proxy::hbone::HboneSettings {
                stream_window: args.hbone_stream_window,
                connection_window: args.hbone_connection_window,
                max_frame_size: args.hbone_max_frame,
                max_streams: args.hbone_max_streams,
                spread: args
                    .hbone_spread
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u32)),
                idle_timeout: args.hbone_idle_timeout,
                ping_interval: args.hbone_ping_interval,
                ping_timeout: args.hbone_ping_timeout,
                handshake_timeout: args.hbone_handshake_timeout,
                max_header_bytes: args.hbone_max_header_bytes,
                max_connections_per_peer: args.hbone_max_connections_per_peer,
            },
        })
    }

    pub fn capture(&self) -> crate::capture::CaptureSettings {
        crate::capture::CaptureSettings {
            bpffs: self.bpffs.clone(),
            instance: self.instance.clone(),
            cgroup: self.cgroup.clone(),
            kubelet_cgroup: self.kubelet_cgroup.clone(),
            proxy_mark: self.proxy_mark,
            delivery_mark: self.delivery_mark,
            fail_open: self.fail_open,
            outbound_port: self.outbound_port,
            inbound_port: self.inbound_port,
            hbone_port: self.hbone_port,
            dns_port: self.dns.capture.then_some(self.dns.port),
            kernel_log_level: self.ebpf_log_level,
            trace: self.kernel_tracing,
            takeover: self.takeover,
        }
    }

    /// The tracing filter: `--log-level` plus what `--ebpf-log-level` needs to be seen.
    pub fn log_filter(&self) -> String {
        match self.ebpf_log_level.directive() {
            Some(d) => format!("{},{d}", self.log_level),
            None => self.log_level.clone(),
        }
    }
}

/// The node id istiod expects of ztunnel: `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`.
fn node_id(node_name: &str) -> String {
    let ns = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "istio-system".into());
    let pod = std::env::var("POD_NAME").unwrap_or_else(|_| format!("ambit-{node_name}"));
    let ip = std::env::var("POD_IP")
        .ok()
        .or_else(|| {
            discover_node_addresses()
                .ok()
                .and_then(|a| a.into_iter().find(IpAddr::is_ipv4))
                .map(|ip| ip.to_string())
        })
        .unwrap_or_else(|| "0.0.0.0".into());
    format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local")
}

/// The node metadata istiod reads from ztunnel (`NAME`, `NAMESPACE`, `INSTANCE_IPS`,
/// `NODE_NAME`, `CLUSTER_ID`): istiod checks `NAMESPACE` against the token's namespace.
fn node_metadata(node_name: &str, cluster_id: &str) -> std::collections::BTreeMap<String, String> {
    let ns = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "istio-system".into());
    let pod = std::env::var("POD_NAME").unwrap_or_else(|_| format!("ambit-{node_name}"));
    let mut m: std::collections::BTreeMap<String, String> = [
        ("NAME", pod),
        ("NAMESPACE", ns),
        ("NODE_NAME", node_name.to_string()),
        ("CLUSTER_ID", cluster_id.to_string()),
        ("AMBIT_VERSION", env!("CARGO_PKG_VERSION").to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if let Ok(ips) = std::env::var("INSTANCE_IPS").or_else(|_| std::env::var("POD_IP")) {
        m.insert("INSTANCE_IPS".into(), ips);
    }
    m
}

/// The first cgroup v2 mount (`/sys/fs/cgroup` on most Kubernetes nodes, `/sys/fs/cgroup/unified`
/// on hybrid hosts).
pub fn cgroup2_mount() -> anyhow::Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .next()
        .context("no cgroup2 filesystem is mounted (ambit needs cgroup v2)")
}

pub(crate) fn check_cgroup2(path: &Path) -> anyhow::Result<()> {
    let st = nix::sys::statfs::statfs(path).with_context(|| format!("--cgroup {}", path.display()))?;
    if st.filesystem_type().0 as i64 != CGROUP2_MAGIC {
        bail!("--cgroup {}: not a cgroup v2 directory", path.display());
    }
    Ok(())
}

/// Non-loopback addresses of the calling process's network namespace.
pub fn discover_node_addresses() -> anyhow::Result<Vec<IpAddr>> {
    let mut out: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .context("listing the node's addresses")?
        .filter_map(|ifa| {
            let a = ifa.address?;
            a.as_sockaddr_in()
                .map(|s| IpAddr::V4(s.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
        })
        .filter(|ip| !ip.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_marks_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5").is_err());
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert!(parse_duration("5d").is_err());
        assert_eq!(parse_u32("0x539"), Ok(0x539));
        assert_eq!(parse_u32("1337"), Ok(1337));
        assert!(parse_u32("0xzz").is_err());
    }

    #[test]
    fn a_control_plane_address_is_https_host_and_port_or_refused_saying_why() {
        let ok = |s| parse_https_address(s).expect(s);
        assert_eq!(ok("https://istiod.istio-system.svc:15012"), "https://istiod.istio-system.svc:15012");
        assert_eq!(ok("https://10.3.0.1:15012/"), "https://10.3.0.1:15012");
        assert_eq!(ok("https://[fd00::1]:15012"), "https://[fd00::1]:15012");
        for (bad, says) in [
            ("istiod.istio-system.svc:15012", "write https://istiod.istio-system.svc:15012"),
            ("http://istiod:15012", "scheme http"),
            ("https://istiod", "no port"),
            ("https://istiod:15012/xds", "no path"),
            ("", "expected https://<host>:<port>"),
            ("https://:15012", "expected https://<host>:<port>"),
        ] {
            let e = parse_https_address(bad).expect_err(bad).to_string();
            assert!(e.contains(says) && e.contains("e.g. https://"), "{bad}: {e}");
        }
    }
}
