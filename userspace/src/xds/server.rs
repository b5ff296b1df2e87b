//! The control plane's Delta ADS server.
//!
//! One immutable [`Snapshot`] of every resource (encoded once, shared by `Arc`) is replaced on
//! each mesh change; every connected proxy's stream compares the new snapshot with the
//! versions it last sent that proxy and sends only the difference. A proxy that reconnects
//! with `initial_resource_versions` gets only what changed since.

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use envoy_types::pb::envoy::service::discovery::v3::{
    aggregated_discovery_service_server::AggregatedDiscoveryService, DeltaDiscoveryRequest,
    DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use prost::Message;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::{wrappers::ReceiverStream, Stream};
use tonic::{Request, Response, Status, Streaming};

use super::{encode_address, encode_authorization, version_of, TYPES};
use crate::state::Resources;

/// Every resource served, by type URL and name.
#[derive(Default, Debug)]
pub struct Snapshot {
    pub generation: u64,
    pub types: HashMap<&'static str, BTreeMap<String, Arc<Resource>>>,
}

impl Snapshot {
    pub fn build(generation: u64, r: &Resources) -> Snapshot {
        let mut types: HashMap<&'static str, BTreeMap<String, Arc<Resource>>> = HashMap::new();
        let res = |name: &str, any: super::Any| {
            Arc::new(Resource {
                name: name.to_string(),
                version: version_of(&any.value),
                resource: Some(any),
                ..Default::default()
            })
        };
        let addresses = r.addresses.iter().map(|(n, a)| (n.clone(), res(n, encode_address(a)))).collect();
        let authz =
            r.authorizations.iter().map(|(n, a)| (n.clone(), res(n, encode_authorization(a)))).collect();
        types.insert(super::ADDRESS_TYPE, addresses);
        types.insert(super::AUTHORIZATION_TYPE, authz);
        Snapshot { generation, types }
    }
}

/// A connected proxy, as the config dump shows it.
#[derive(Clone, Debug, Serialize)]
pub struct Peer {
    pub node: String,
    pub node_id: String,
    pub connected_at: String,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
    /// Resources (added, changed or removed) sent on this stream: after a reconnection with
    /// `initial_resource_versions`, only what changed meanwhile.
    pub resources_sent: u64,
}

pub struct AdsServer {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    /// Bearer token → node name.
    tokens: Arc<HashMap<String, String>>,
    peers: Arc<Mutex<BTreeMap<u64, Peer>>>,
}

impl AdsServer {
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, tokens: Arc<HashMap<String, String>>) -> AdsServer {
        AdsServer { snapshots, tokens, peers: Arc::new(Mutex::new(BTreeMap::new())) }
    }

    /// Connected proxies (config dump).
    pub fn peers(&self) -> Arc<Mutex<BTreeMap<u64, Peer>>> {
        self.peers.clone()
    }
}

/// What one stream has told one proxy, per type: name → version.
#[derive(Default)]
struct Sent {
    subscribed: bool,
    versions: HashMap<String, String>,
}

fn diff(snapshot: &Snapshot, type_url: &str, sent: &mut Sent, nonce: u64) -> Option<DeltaDiscoveryResponse> {
    let empty = BTreeMap::new();
    let current = snapshot.types.get(type_url).unwrap_or(&empty);
    let resources: Vec<Resource> = current
        .iter()
        .filter(|(name, r)| sent.versions.get(*name) != Some(&r.version))
        .map(|(_, r)| (**r).clone())
        .collect();
    let removed: Vec<String> = sent.versions.keys().filter(|n| !current.contains_key(*n)).cloned().collect();
    if resources.is_empty() && removed.is_empty() {
        return None;
    }
    for r in &resources {
        sent.versions.insert(r.name.clone(), r.version.clone());
    }
    for n in &removed {
        sent.versions.remove(n);
    }
    Some(DeltaDiscoveryResponse {
        type_url: type_url.to_string(),
        resources,
        removed_resources: removed,
        nonce: nonce.to_string(),
        system_version_info: snapshot.generation.to_string(),
        ..Default::default()
    })
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _req: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented("only Delta ADS (DeltaAggregatedResources) is served"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let token = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing bearer token (authorization metadata)"))?;
        let node =
            self.tokens.get(token).cloned().ok_or_else(|| Status::unauthenticated("unknown bearer token"))?;
        let mut requests = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<DeltaDiscoveryResponse, Status>>(16);
        let mut snapshots = self.snapshots.clone();
        let peers = self.peers.clone();
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::spawn(async move {
            let mut sent: HashMap<String, Sent> = HashMap::new();
            let mut nonce: u64 = 0;
            let peer = |f: &mut dyn FnMut(&mut Peer)| {
                if let Some(p) = peers.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&id) {
                    f(p);
                }
            };
            peers.lock().unwrap_or_else(|p| p.into_inner()).insert(
                id,
                Peer {
                    node: node.clone(),
                    node_id: String::new(),
                    connected_at: crate::identity::cert::rfc3339(SystemTime::now()),
                    acks: 0,
                    nacks: 0,
                    last_nack: None,
                    resources_sent: 0,
                },
            );
            tracing::info!(%node, stream = id, "xDS stream opened");
            'stream: loop {
                tokio::select! {
                    msg = requests.message() => {
                        let req = match msg {
                            Ok(Some(r)) => r,
                            Ok(None) => break,
                            Err(e) => { tracing::debug!(%node, error = %e, "xDS stream ended"); break; }
                        };
                        if let Some(n) = &req.node {
                            let id_str = n.id.clone();
                            peer(&mut |p| p.node_id = id_str.clone());
                        }
                        if !TYPES.contains(&req.type_url.as_str()) {
                            tracing::warn!(%node, type_url = %req.type_url, "request for a type this server does not serve");
                            continue;
                        }
                        if !req.response_nonce.is_empty() {
                            match &req.error_detail {
                                Some(status) => {
                                    tracing::warn!(%node, type_url = %req.type_url, nonce = %req.response_nonce,
                                        error = %status.message, "proxy rejected an update (NACK)");
                                    let m = status.message.clone();
                                    peer(&mut |p| { p.nacks += 1; p.last_nack = Some(m.clone()); });
                                }
                                None => peer(&mut |p| p.acks += 1),
                            }
                            continue;
                        }
                        // A subscription (first request of the type, or a re-subscription).
                        let entry = sent.entry(req.type_url.clone()).or_default();
                        if !entry.subscribed {
                            entry.subscribed = true;
                            entry.versions = req.initial_resource_versions.clone();
                            // Not marked seen: a snapshot newer than the one the other type
                            // was answered from must still wake the push branch below.
                            let snapshot = snapshots.borrow().clone();
                            nonce += 1;
                            // Answered even when nothing differs: it completes the initial sync.
                            let resp = diff(&snapshot, &req.type_url, entry, nonce).unwrap_or_else(|| DeltaDiscoveryResponse {
                                type_url: req.type_url.clone(),
                                nonce: nonce.to_string(),
                                system_version_info: snapshot.generation.to_string(),
                                ..Default::default()
                            });
                            let n = (resp.resources.len() + resp.removed_resources.len()) as u64;
                            peer(&mut |p| p.resources_sent += n);
                            if tx.send(Ok(resp)).await.is_err() { break; }
                        }
                    }
                    changed = snapshots.changed() => {
                        if changed.is_err() { break; }
                        let snapshot = snapshots.borrow_and_update().clone();
                        for type_url in TYPES {
                            let Some(entry) = sent.get_mut(type_url).filter(|e| e.subscribed) else { continue };
                            nonce += 1;
                            if let Some(resp) = diff(&snapshot, type_url, entry, nonce) {
                                tracing::debug!(%node, type_url, resources = resp.resources.len(), removed = resp.removed_resources.len(), "pushing changes");
                                let n = (resp.resources.len() + resp.removed_resources.len()) as u64;
                                peer(&mut |p| p.resources_sent += n);
                                if tx.send(Ok(resp)).await.is_err() { break 'stream; }
                            }
                        }
                    }
                }
            }
            peers.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
            tracing::info!(%node, stream = id, "xDS stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Decodes a snapshot's resources for the config dump: type → name → (version, JSON-ish debug).
pub fn dump(snapshot: &Snapshot) -> serde_json::Value {
    let mut out = serde_json::Map::new();
    for (type_url, resources) in &snapshot.types {
        let mut m = serde_json::Map::new();
        for (name, r) in resources {
            let body = r.resource.as_ref().map(|a| a.value.as_slice()).unwrap_or_default();
            let text = if *type_url == super::ADDRESS_TYPE {
                crate::pb::istio::workload::Address::decode(body)
                    .map(|a| format!("{a:?}"))
                    .unwrap_or_default()
            } else {
                crate::pb::istio::security::Authorization::decode(body)
                    .map(|a| format!("{a:?}"))
                    .unwrap_or_default()
            };
            m.insert(name.clone(), serde_json::json!({ "version": r.version, "resource": text }));
        }
        out.insert(type_url.to_string(), serde_json::Value::Object(m));
    }
    serde_json::json!({ "generation": snapshot.generation, "resources": out })
}
