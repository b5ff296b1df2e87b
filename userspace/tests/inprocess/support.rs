//! The in-process bed: a mesh CA, the mesh state, node proxies and pods, all in this process
//! and its network namespace. Pods are loopback addresses (`127.x.y.z`); what a mesh file
//! says is `10.x.y.z` is served as `127.x.y.z`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use ambit::{
    capture::MockOrigDst,
    controlplane::authority::{Authority, Source},
    dns::lookup::HostLookup,
    identity::{
        caclient::CaError, cert, CertSource, Identity, IdentityManager, IdentitySettings, Signing,
        WorkloadCert,
    },
    meshfile::{parse, Checks},
    metrics::Metrics,
    os::{netns::Netns, socket::LocalSockets},
    pb::istio::workload::address,
    pod::{baggage, Direction, PodCtx, PodListener, PodRegistry},
    proxy::{hbone::HboneSettings, Proxy, ProxyDeps, ProxySettings, UnknownDestination},
    state::{Resources, StateStore},
    xds::translate::translate,
};
use socket2::{Domain, Socket, Type};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
};
use tokio_util::sync::CancellationToken;

pub const TRUST_DOMAIN: &str = "cluster.local";
/// Every wait in these tests is bounded by this.
pub const T: Duration = Duration::from_secs(10);

/// A CA in the process: the control plane's own authority, signing the identity manager's
/// CSRs directly (the gRPC hop is what the root suite covers).
pub struct LocalCa {
    authority: Authority,
    dir: std::path::PathBuf,
}

impl LocalCa {
    pub fn new(tag: &str) -> Arc<LocalCa> {
        let dir = std::env::temp_dir().join(format!("ambit-inprocess-{tag}-{}", std::process::id()));
        let authority = Authority::load(&Source::StateDir(dir.join("ca")), TRUST_DOMAIN).expect("a CA");
        Arc::new(LocalCa { authority, dir })
    }

    pub fn root(&self) -> rustls_pki_types::CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(self.authority.root_pem().as_bytes())
            .expect("root pem")
    }
}

impl Drop for LocalCa {
    fn drop(&mut self) {
        let _gone = std::fs::remove_dir_all(&self.dir);
    }
}

impl CertSource for LocalCa {
    fn sign<'a>(&'a self, identity: &'a Identity, validity: Duration) -> Signing<'a> {
        Box::pin(async move {
            let (key, csr) = cert::csr(identity)?;
            let (asked, params) =
                self.authority.check_csr(&csr).map_err(|e| CaError::Settings(format!("CSR refused: {e}")))?;
            let chain = self
                .authority
                .issue(&asked, &params, validity)
                .map_err(|e| CaError::Settings(format!("issuing: {e}")))?;
            Ok(WorkloadCert::from_chain(identity, &key, &chain, &ambit::crypto::provider())?)
        })
    }
}

/// The state a mesh file describes, its `10.x.y.z` addresses served as `127.x.y.z`.
pub fn state(mesh_yaml: &str) -> Arc<StateStore> {
    let mesh = parse(Path::new("mesh.yaml"), mesh_yaml, &Checks { node: None }).expect("a valid mesh file");
    let mut resources = translate(&mesh, TRUST_DOMAIN);
    to_loopback(&mut resources);
    let store = StateStore::default();
    let errors = store.replace_all(&resources);
    assert!(errors.is_empty(), "{errors:?}");
    Arc::new(store)
}

fn to_loopback(r: &mut Resources) {
    let swap = |a: &mut Vec<u8>| {
        if a.len() == 4 && a[0] == 10 {
            a[0] = 127;
        }
    };
    for a in r.addresses.values_mut() {
        match &mut a.r#type {
            Some(address::Type::Workload(w)) => w.addresses.iter_mut().for_each(swap),
            Some(address::Type::Service(s)) => s.addresses.iter_mut().for_each(|n| swap(&mut n.address)),
            None => {}
        }
    }
}

/// `10.x.y.z` of the mesh file as this bed serves it.
pub fn ip(mesh_ip: &str) -> IpAddr {
    let v4: Ipv4Addr = mesh_ip.parse().expect("an IPv4 address");
    let [_, b, c, d] = v4.octets();
    IpAddr::V4(Ipv4Addr::new(127, b, c, d))
}

/// One node proxy with its own identities.
pub struct Node {
    pub proxy: Proxy,
    pub orig: Arc<MockOrigDst>,
    pub identities: IdentityManager,
    pub metrics: Arc<Metrics>,
    pub stop: CancellationToken,
}

impl Node {
    pub fn new(
        ca: &Arc<LocalCa>,
        state: &Arc<StateStore>,
        unknown: UnknownDestination,
        validity: Duration,
    ) -> Node {
        let identities = IdentityManager::new(
            Some(ca.clone()),
            IdentitySettings { trust_domain: TRUST_DOMAIN.into(), validity },
            vec![ca.root()],
        );
        let orig = Arc::new(MockOrigDst::default());
        let metrics = Arc::new(Metrics::new());
        let proxy = Proxy::new(
            ProxySettings {
                mark: 0,
                delivery_mark: 0,
                connect_timeout: Duration::from_secs(2),
                own_ports: vec![15001, 15006, 15008],
                hbone_port: 15008,
                hbone: HboneSettings::default(),
                unknown,
                loopback_is_loop: false,
            },
            ProxyDeps {
                orig: orig.clone(),
                sockets: Arc::new(LocalSockets),
                metrics: metrics.clone(),
                identities: identities.clone(),
                state: state.clone(),
                pods: Arc::new(PodRegistry::default()),
                tracer: None,
                lookup: Arc::new(HostLookup::new(std::path::Path::new("/proc"), Duration::from_secs(2))),
            },
        );
        Node { proxy, orig, identities, metrics, stop: CancellationToken::new() }
    }

    /// Enrols a pod of the mesh file (namespace, name, service account, its `10.x` address):
    /// its certificate is asked for, and its outbound and HBONE listeners served.
    pub async fn pod(&self, namespace: &str, name: &str, sa: &str, mesh_ip: &str) -> Pod {
        let identity = Identity::new(TRUST_DOMAIN, namespace, sa);
        self.identities.acquire(&identity);
        let ip = ip(mesh_ip);
        let ctx = Arc::new(PodCtx {
            namespace: namespace.into(),
            name: name.into(),
            service_account: sa.into(),
            identity_uri: Some(identity.to_string().into()),
            identity: Some(identity.clone()),
            app: name.into(),
            baggage: baggage::baggage(&baggage::SourceBaggage {
                cluster: "Kubernetes",
                namespace,
                pod: name,
                service: name,
                version: "",
            }),
            ips: vec![ip],
            netns: Arc::new(Netns::host().expect("this process's netns")),
            deliver_from_client: false,
            deliveries: Default::default(),
        });
        let outbound = listen(SocketAddr::new(ip, 0));
        let outbound_addr = outbound.local_addr().expect("bound").as_socket().expect("inet");
        let hbone = listen(SocketAddr::new(ip, 15008));
        for (direction, addr, socket) in [
            (Direction::Outbound, outbound_addr, outbound),
            (Direction::Hbone, SocketAddr::new(ip, 15008), hbone),
        ] {
            self.proxy
                .serve(ctx.clone(), PodListener { direction, addr, socket }, self.stop.clone())
                .expect("serving");
        }
        let cert = self.identities.wait(&identity, T).await;
        assert!(cert.is_some(), "no certificate for {identity} within {T:?}");
        Pod { ctx, outbound: outbound_addr, identity }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub struct Pod {
    pub ctx: Arc<PodCtx>,
    pub outbound: SocketAddr,
    pub identity: Identity,
}

impl Pod {
    /// A connection from this pod's application to `dst`, captured as the connect hook would
    /// capture it: the original destination recorded, then a connect to the outbound listener.
    pub async fn connect(&self, node: &Node, dst: SocketAddr) -> TcpStream {
        self.try_connect(node, dst).await.expect("connects")
    }

    /// As [`Pod::connect`]; over loopback a refusal's reset may already fail the connect.
    pub async fn try_connect(&self, node: &Node, dst: SocketAddr) -> std::io::Result<TcpStream> {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(self.ctx.ips[0], 0)).expect("bind the pod's address");
        let me = sock.local_addr().expect("bound");
        node.orig.record(self.ctx.netns.cookie(), me, self.outbound, dst);
        tokio::time::timeout(T, sock.connect(self.outbound)).await.expect("in time")
    }
}

fn listen(addr: SocketAddr) -> Socket {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None).expect("socket");
    s.set_reuse_address(true).expect("reuseaddr");
    s.bind(&addr.into()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s.listen(128).expect("listen");
    s
}

/// An application: echoes every connection at `addr`, prefixed with `tag`.
pub async fn echo(addr: SocketAddr, tag: &'static str) -> SocketAddr {
    let l = TcpListener::bind(addr).await.unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let at = l.local_addr().expect("bound");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                let _greeted = s.write_all(tag.as_bytes()).await;
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    at
}

/// Sends `msg` and reads until `want` bytes came back (or the peer closed, or `T` passed).
pub async fn exchange(s: &mut TcpStream, msg: &[u8], want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    let run = async {
        s.write_all(msg).await?;
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < want {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    // A reset ends the exchange as a close does: what came back is what counts.
    let _ended = tokio::time::timeout(T, run).await;
    got
}

/// The line of a rendered metric family whose labels include all of `labels`, and its value.
pub fn metric(rendered: &str, name: &str, labels: &[&str]) -> Option<f64> {
    rendered
        .lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}
