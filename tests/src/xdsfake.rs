//! A scripted Delta ADS server, to feed a proxy what a real control plane never would (an
//! invalid resource) and record how the proxy answers (ACK or NACK with its detail).
//! It runs on a thread inside a namespace of the bed, with TLS from the mesh root.

use std::{
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::{AggregatedDiscoveryService, AggregatedDiscoveryServiceServer},
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

/// What the proxy answered.
#[derive(Clone, Debug)]
pub enum Answer {
    Ack { type_url: String, nonce: String },
    Nack { type_url: String, nonce: String, detail: String },
}

/// A response the script sends: type URL, resources (name, bytes), removed names.
#[derive(Clone, Debug)]
pub struct Push {
    pub type_url: String,
    pub resources: Vec<(String, Vec<u8>)>,
    pub removed: Vec<String>,
}

struct Fake {
    initial: Vec<Push>,
    pushes: broadcast::Sender<Push>,
    answers: Arc<Mutex<Vec<Answer>>>,
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

fn response(p: &Push, nonce: u64) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: p.type_url.clone(),
        resources: p
            .resources
            .iter()
            .map(|(name, bytes)| Resource {
                name: name.clone(),
                version: format!("v{nonce}"),
                resource: Some(envoy_types::pb::google::protobuf::Any {
                    type_url: p.type_url.clone(),
                    value: bytes.clone(),
                }),
                ..Default::default()
            })
            .collect(),
        removed_resources: p.removed.clone(),
        nonce: nonce.to_string(),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for Fake {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let mut requests = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let initial = self.initial.clone();
        let mut pushes = self.pushes.subscribe();
        let answers = self.answers.clone();
        tokio::spawn(async move {
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    m = requests.message() => {
                        let Ok(Some(r)) = m else { return };
                        if r.response_nonce.is_empty() {
                            // A subscription: answer with the initial resources of the type.
                            for p in initial.iter().filter(|p| p.type_url == r.type_url) {
                                nonce += 1;
                                if tx.send(Ok(response(p, nonce))).await.is_err() { return; }
                            }
                        } else {
                            let a = match r.error_detail {
                                Some(st) => Answer::Nack { type_url: r.type_url, nonce: r.response_nonce, detail: st.message },
                                None => Answer::Ack { type_url: r.type_url, nonce: r.response_nonce },
                            };
                            answers.lock().unwrap_or_else(|p| p.into_inner()).push(a);
                        }
                    }
                    p = pushes.recv() => {
                        let Ok(p) = p else { return };
                        nonce += 1;
                        if tx.send(Ok(response(&p, nonce))).await.is_err() { return; }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A running fake server.
pub struct FakeXds {
    pushes: broadcast::Sender<Push>,
    pub answers: Arc<Mutex<Vec<Answer>>>,
    pub address: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl FakeXds {
    /// Serves on `listen` inside the network namespace `netns`, with a TLS certificate for
    /// `server_name` signed by the root in `root_cert`/`root_key`; answers subscriptions with
    /// `initial`.
    pub fn start(
        netns: &Path,
        listen: SocketAddr,
        server_name: &str,
        root_cert: &Path,
        root_key: &Path,
        initial: Vec<Push>,
    ) -> FakeXds {
        let (cert, key) = serving_cert(server_name, root_cert, root_key);
        let (pushes, _) = broadcast::channel(16);
        let answers = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake { initial, pushes: pushes.clone(), answers: answers.clone() };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let netns = netns.to_path_buf();
        std::thread::spawn(move || {
            let r = (|| -> Result<(), String> {
                let f = std::fs::File::open(&netns).map_err(|e| e.to_string())?;
                nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
                Ok(())
            })();
            if let Err(e) = r {
                let _gone = ready_tx.send(Err(e));
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::bind(listen).await {
                    Ok(l) => l,
                    Err(e) => {
                        let _gone = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let tls = tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key));
                let server = tonic::transport::Server::builder()
                    .tls_config(tls)
                    .expect("TLS")
                    .add_service(AggregatedDiscoveryServiceServer::new(fake));
                let _gone = ready_tx.send(Ok(()));
                let stop = async {
                    let _either = stop_rx.await;
                };
                if let Err(e) = server
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        stop,
                    )
                    .await
                {
                    eprintln!("fake xDS server: {e}");
                }
            });
        });
        ready_rx.recv_timeout(Duration::from_secs(10)).expect("fake xDS starts").expect("fake xDS listens");
        FakeXds { pushes, answers, address: format!("https://{listen}"), _shutdown: stop_tx }
    }

    pub fn push(&self, p: Push) {
        self.pushes.send(p).expect("a proxy is connected");
    }

    pub fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

fn serving_cert(name: &str, root_cert: &Path, root_key: &Path) -> (String, String) {
    let root_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(root_key).expect("root key")).expect("PEM");
    let issuer =
        rcgen::Issuer::from_ca_cert_pem(&std::fs::read_to_string(root_cert).expect("root"), root_key)
            .expect("PEM");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
    let cert = params.signed_by(&key, &issuer).expect("signed");
    (cert.pem(), key.serialize_pem())
}

/// Encodes a message for a [`Push`].
pub fn bytes(m: &impl Message) -> Vec<u8> {
    m.encode_to_vec()
}
