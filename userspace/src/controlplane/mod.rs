//! `ambit controlplane`: the embedded default control plane for machines and clusters without
//! istiod: the mesh CA (Istio's certificate API, bearer-token callers, identities authorized
//! from the mesh file) and Delta ADS with Istio's workload API (the mesh file's workloads,
//! services and policies, changes pushed as deltas), both over TLS on one port.

pub mod authority;
mod ca;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context};
use clap::Args;
use tokio_util::sync::CancellationToken;

pub use authority::{Authority, CsrRefusal, Source};
pub use ca::IMPERSONATED_IDENTITY;

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use tokio::sync::watch;

use crate::{
    admin::{self, AdminState, Phase, Routes},
    enroll,
    metrics::Metrics,
    pb::istio::v1::auth::istio_certificate_service_server::IstioCertificateServiceServer,
    telemetry::LogFormat,
    units::parse_duration,
    xds::{
        self,
        server::{AdsServer, Snapshot},
        translate::{translate_in, Origin},
    },
};

#[derive(Args, Debug, Clone)]
pub struct ControlPlaneArgs {
    /// Mesh file (docs/mesh-file.md): which workloads run on which node, hence which node
    /// may ask for which identity. Watched.
    #[arg(long, env = "AMBIT_MESH_FILE")]
    pub mesh_file: PathBuf,

    /// Bearer tokens of the node proxies: a YAML map `node name: token`, or a directory with
    /// one file per node name holding its token (a mounted Secret).
    #[arg(long, env = "AMBIT_TOKENS_FILE")]
    pub tokens_file: PathBuf,

    /// Where a generated root CA is kept (owner-only). Ignored with --root-cert/--ca-cert.
    #[arg(long, env = "AMBIT_STATE_DIR", default_value = "/var/lib/ambit-controlplane")]
    pub state_dir: PathBuf,

    /// Use this root (with --root-key) instead of generating one.
    #[arg(long, env = "AMBIT_ROOT_CERT", requires = "root_key")]
    pub root_cert: Option<PathBuf>,
    #[arg(long, env = "AMBIT_ROOT_KEY")]
    pub root_key: Option<PathBuf>,

    /// Sign with this intermediate (with --ca-key and --ca-chain, its issuers up to the root).
    #[arg(long, env = "AMBIT_CA_CERT", requires_all = ["ca_key", "ca_chain"], conflicts_with = "root_cert")]
    pub ca_cert: Option<PathBuf>,
    #[arg(long, env = "AMBIT_CA_KEY")]
    pub ca_key: Option<PathBuf>,
    #[arg(long, env = "AMBIT_CA_CHAIN")]
    pub ca_chain: Option<PathBuf>,

    /// Address of the CA (gRPC over TLS); istiod uses 15012.
    #[arg(long, env = "AMBIT_LISTEN", default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// DNS name in the serving certificate; node proxies check it (their --control-plane-name).
    #[arg(long, env = "AMBIT_SERVER_NAME", default_value = "ambit-controlplane")]
    pub server_name: String,

    /// Readiness endpoint (/healthz/ready).
    #[arg(long, env = "AMBIT_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    /// Admin endpoint: `/config_dump` (what is served, to whom); keep it on loopback.
    #[arg(long, env = "AMBIT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,

    #[arg(long, env = "AMBIT_TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,

    /// The cluster's name: the `cluster` of the workloads served (metrics' `*_cluster`
    /// labels, workload uids), as istiod's CLUSTER_ID.
    #[arg(long, env = "AMBIT_CLUSTER_ID", default_value = crate::xds::CLUSTER_ID)]
    pub cluster_id: String,

    /// Validity given when a request asks for none.
    #[arg(long, env = "AMBIT_DEFAULT_CERT_VALIDITY", default_value = "24h", value_parser = parse_duration)]
    pub default_cert_validity: Duration,

    /// Longest validity granted; longer requests are refused.
    #[arg(long, env = "AMBIT_MAX_CERT_VALIDITY", default_value = "48h", value_parser = parse_duration)]
    pub max_cert_validity: Duration,

    #[arg(long, env = "AMBIT_LOG", default_value = "info")]
    pub log_level: String,

    #[arg(long, env = "AMBIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// The node proxies' tokens as `token → node name`, refusing short and duplicate tokens.
/// `path` is a YAML map `node name: token`, or a directory with one file per node (named after
/// the node, holding its token): a mounted Kubernetes Secret, which the DaemonSet mounts too.
fn load_tokens(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let by_node: std::collections::BTreeMap<String, String> = if path.is_dir() {
        let mut m = std::collections::BTreeMap::new();
        for e in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            let e = e.with_context(|| format!("reading {}", path.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            // A Secret volume's own bookkeeping (`..data`, timestamped directories).
            if name.starts_with('.') || !e.path().is_file() {
                continue;
            }
            let token = std::fs::read_to_string(e.path())
                .with_context(|| format!("reading {}", e.path().display()))?;
            m.insert(name, token.trim().to_string());
        }
        m
    } else {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_norway::from_str(&text)
            .with_context(|| format!("{}: expected a map of node name to token", path.display()))?
    };
    let mut out = HashMap::new();
    for (node, token) in by_node {
        if token.len() < 16 {
            bail!("{}: the token of node {node} is shorter than 16 characters", path.display());
        }
        if let Some(other) = out.insert(token, node.clone()) {
            bail!("{}: nodes {other} and {node} have the same token", path.display());
        }
    }
    Ok(out)
}

pub async fn run(args: ControlPlaneArgs) -> anyhow::Result<()> {
    if !args.admin_addr.ip().is_loopback() {
        bail!(
            "--admin-addr {}: must be a loopback address (/quitquitquit has no authentication)",
            args.admin_addr
        );
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        mesh_file = %args.mesh_file.display(),
        state_dir = %args.state_dir.display(),
        listen = %args.listen,
        server_name = %args.server_name,
        trust_domain = %args.trust_domain,
        default_cert_validity_s = args.default_cert_validity.as_secs(),
        max_cert_validity_s = args.max_cert_validity.as_secs(),
        "starting ambit controlplane"
    );
    let shutdown = CancellationToken::new();
    let mesh = enroll::local::watch(args.mesh_file.clone(), None, enroll::local::POLL, shutdown.clone())
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("loading the mesh file")?;
    let tokens = Arc::new(load_tokens(&args.tokens_file)?);
    let source = match (&args.root_cert, &args.root_key, &args.ca_cert, &args.ca_key, &args.ca_chain) {
        (Some(cert), Some(key), None, _, _) => Source::Root { cert: cert.clone(), key: key.clone() },
        (_, _, Some(cert), Some(key), Some(chain)) => {
            Source::Intermediate { cert: cert.clone(), key: key.clone(), chain: chain.clone() }
        }
        _ => Source::StateDir(args.state_dir.clone()),
    };
    let authority = Arc::new(Authority::load(&source, &args.trust_domain).context("loading the CA")?);
    let ips: Vec<_> = Some(args.listen.ip()).filter(|ip| !ip.is_unspecified()).into_iter().collect();
    let (chain, key) =
        authority.serving_cert(&args.server_name, &ips).context("issuing the CA's serving certificate")?;

    // What xDS serves: one snapshot of the whole mesh, replaced on every valid change.
    let first = mesh.borrow().clone();
    let (snapshots_tx, snapshots) =
        watch::channel(Arc::new(Snapshot::build(1, &translate_in(&first, &origin(&args)))));
    {
        let (mut mesh, td, cluster) = (mesh.clone(), args.trust_domain.clone(), args.cluster_id.clone());
        tokio::spawn(async move {
            let mut generation = 1;
            while mesh.changed().await.is_ok() {
                generation += 1;
                let origin = Origin { trust_domain: &td, cluster_id: &cluster };
                let snapshot = Snapshot::build(generation, &translate_in(&mesh.borrow_and_update(), &origin));
                let n: usize = snapshot.types.values().map(|t| t.len()).sum();
                tracing::info!(generation, resources = n, "serving a new version of the mesh");
                snapshots_tx.send_replace(Arc::new(snapshot));
            }
        });
    }
    let ads = AdsServer::new(snapshots.clone(), tokens.clone());
    let peers = ads.peers();

    let metrics = Arc::new(Metrics::new());
    let admin = Arc::new(AdminState::new(metrics, shutdown.clone()));
    admin.set_view(Arc::new(ServerView {
        trust_domain: args.trust_domain.clone(),
        snapshots: snapshots.clone(),
        peers,
    }));
    for (addr, routes) in [(args.readiness_addr, Routes::Readiness), (args.admin_addr, Routes::Admin)] {
        let l = admin::bind(addr).await.with_context(|| format!("binding {addr}"))?;
        tokio::spawn(admin::serve(l, routes, admin.clone(), shutdown.clone()));
    }

    let service = ca::CaService {
        authority,
        tokens,
        mesh,
        default_validity: args.default_cert_validity,
        max_validity: args.max_cert_validity,
    };
    let tls =
        tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(chain, key));
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .context("configuring TLS")?
        .add_service(IstioCertificateServiceServer::new(service))
        .add_service(
            AggregatedDiscoveryServiceServer::new(ads)
                .max_encoding_message_size(64 << 20)
                .max_decoding_message_size(64 << 20),
        );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    admin.set_phase(Phase::Serving);
    tracing::info!(listen = %args.listen, "CA and xDS serving");
    let stop = shutdown.clone();
    let signals = async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
        else {
            stop.cancelled().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
            () = stop.cancelled() => {}
        }
        tracing::info!("shutting down");
    };
    server
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(listener), signals)
        .await
        .context("serving")?;
    shutdown.cancel();
    Ok(())
}

/// The served workloads' trust domain and cluster.
fn origin(args: &ControlPlaneArgs) -> Origin<'_> {
    Origin { trust_domain: &args.trust_domain, cluster_id: &args.cluster_id }
}

/// What the embedded control plane's admin endpoints show: what it serves and to whom.
struct ServerView {
    trust_domain: String,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    peers: Arc<std::sync::Mutex<std::collections::BTreeMap<u64, crate::xds::server::Peer>>>,
}

impl admin::View for ServerView {
    fn config_dump(&self) -> futures::future::BoxFuture<'_, serde_json::Value> {
        let peers: Vec<_> = self.peers.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let dump = serde_json::json!({
            "trust_domain": self.trust_domain,
            "serving": xds::server::dump(&self.snapshots.borrow()),
            "proxies": peers,
        });
        Box::pin(std::future::ready(dump))
    }

    /// Ready once it serves (the phase says so until then).
    fn not_ready(&self) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::load_tokens;

    #[test]
    fn tokens_come_from_a_map_or_a_mounted_secret_directory() {
        let dir = std::env::temp_dir().join(format!("ambit-tokens-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // What a Secret volume looks like: keys are symlinks into a timestamped directory.
        let data = dir.join("..2026_11_23_00_00_00.000");
        std::fs::create_dir_all(&data).expect("dir");
        std::fs::write(data.join("node-a"), "aaaaaaaaaaaaaaaaaaaaaaaa\n").expect("write");
        std::fs::write(data.join("node-b"), "bbbbbbbbbbbbbbbbbbbbbbbb").expect("write");
        std::os::unix::fs::symlink("..2026_11_23_00_00_00.000", dir.join("..data")).expect("symlink");
        for n in ["node-a", "node-b"] {
            std::os::unix::fs::symlink(format!("..data/{n}"), dir.join(n)).expect("symlink");
        }
        let t = load_tokens(&dir).expect("valid");
        assert_eq!(t.len(), 2);
        assert_eq!(t["aaaaaaaaaaaaaaaaaaaaaaaa"], "node-a", "trailing newline trimmed");
        // The same refusals as the map form.
        std::fs::write(data.join("node-b"), "short").expect("write");
        assert!(load_tokens(&dir).unwrap_err().to_string().contains("node-b is shorter than 16"));
        let map = dir.join("..tokens.yaml");
        std::fs::write(&map, "node-a: cccccccccccccccccccc\nnode-b: cccccccccccccccccccc\n").expect("write");
        assert!(load_tokens(&map).unwrap_err().to_string().contains("have the same token"));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
