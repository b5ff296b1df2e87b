//! The node proxy's Delta ADS client: TLS and a bearer token to the control plane (ambit
//! controlplane or istiod), a wildcard subscription to workloads/services and authorization
//! policies, ACK by nonce, NACK with `error_detail` naming each rejected resource (its previous
//! version stays in force), reconnection with jittered exponential backoff and resubscription
//! with the versions held.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
            DeltaDiscoveryResponse,
        },
    },
    google::{
        protobuf::{value::Kind, Struct, Value},
        rpc::Status as RpcStatus,
    },
};
use prost::Message;
use rand::Rng;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use super::{ADDRESS_TYPE, AUTHORIZATION_TYPE, TYPES};
use crate::{
    pb::istio::{security::Authorization, workload::Address},
    state::StateStore,
};

#[derive(Clone, Debug, Serialize)]
pub struct XdsSettings {
    pub address: String,
    pub server_name: String,
    pub root_cert: std::path::PathBuf,
    pub token_file: std::path::PathBuf,
    /// `ztunnel~<node ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`, as istiod expects.
    pub node_id: String,
    /// Sent as the `clusterid` header, as ztunnel does.
    pub cluster_id: String,
    pub metadata: BTreeMap<String, String>,
}

/// The client's health, for the config dump and readiness.
#[derive(Clone, Debug, Default, Serialize)]
pub struct XdsStatus {
    pub connected: bool,
    /// Every subscribed type has been received at least once (since start).
    pub synced: bool,
    pub connects: u64,
    pub acks: u64,
    pub nacks: u64,
    pub last_nack: Option<String>,
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("connecting: {0}")]
    Connect(String),
    #[error("stream: {}", crate::errors::status(.0))]
    Status(#[from] tonic::Status),
    #[error("the request channel closed")]
    Closed,
}

/// Why one resource of a response is NACKed; the text is the NACK's detail.
#[derive(Debug, thiserror::Error)]
enum Refused {
    #[error("no body")]
    NoBody,
    #[error("cannot be decoded: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error(transparent)]
    Invalid(#[from] crate::errors::Invalid),
    #[error("unexpected type {0}")]
    UnexpectedType(String),
}

pub struct XdsClient {
    settings: XdsSettings,
    state: Arc<StateStore>,
    status: Arc<Mutex<XdsStatus>>,
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}

impl XdsClient {
    pub fn new(settings: XdsSettings, state: Arc<StateStore>) -> XdsClient {
        XdsClient { settings, state, status: Arc::new(Mutex::new(XdsStatus::default())) }
    }

    pub fn status(&self) -> Arc<Mutex<XdsStatus>> {
        self.status.clone()
    }

    fn set(&self, f: impl FnOnce(&mut XdsStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Runs until `stop`: connect, sync, follow; on failure wait (1 s doubling to 30 s, ±50 %)
    /// and reconnect. `synced` turns true after the first complete sync.
    pub async fn run(self, synced: watch::Sender<bool>, stop: CancellationToken) {
        let mut backoff = Duration::from_secs(1);
        loop {
            let connects = self.status.lock().unwrap_or_else(|p| p.into_inner()).connects;
            let result = tokio::select! {
                () = stop.cancelled() => return,
                r = self.stream(&synced) => r,
            };
            self.set(|s| s.connected = false);
            // A stream that got as far as connecting starts the backoff over.
            if self.status.lock().unwrap_or_else(|p| p.into_inner()).connects > connects {
                backoff = Duration::from_secs(1);
            }
            match result {
                Ok(()) => {
                    tracing::warn!(address = %self.settings.address, "xDS stream closed by the control plane; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(address = %self.settings.address, error = %e, retry_in_ms = backoff.as_millis() as u64,
                        "xDS stream failed; the last state keeps serving");
                    let msg = e.to_string();
                    self.set(|s| s.last_error = Some(msg));
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(jitter(backoff)) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    fn node(&self) -> Node {
        let fields = self
            .settings
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), Value { kind: Some(Kind::StringValue(v.clone())) }))
            .collect();
        Node { id: self.settings.node_id.clone(), metadata: Some(Struct { fields }), ..Default::default() }
    }

    async fn stream(&self, synced: &watch::Sender<bool>) -> Result<(), StreamError> {
        let root = std::fs::read(&self.settings.root_cert).map_err(|e| {
            StreamError::Connect(format!("reading {}: {e}", self.settings.root_cert.display()))
        })?;
        let token = std::fs::read_to_string(&self.settings.token_file).map_err(|e| {
            StreamError::Connect(format!("reading {}: {e}", self.settings.token_file.display()))
        })?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root))
            .domain_name(self.settings.server_name.clone());
        let channel = Endpoint::from_shared(self.settings.address.clone())
            .map_err(|e| StreamError::Connect(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| StreamError::Connect(e.to_string()))?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(20))
            .connect()
            .await
            .map_err(|e| StreamError::Connect(crate::errors::chain(&e)))?;
        let (tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(16);
        // Wildcard subscriptions, with what we hold, so the server sends only what changed.
        for (i, type_url) in TYPES.iter().enumerate() {
            let versions = self.state.read().versions(type_url);
            let req = DeltaDiscoveryRequest {
                node: (i == 0).then(|| self.node()),
                type_url: type_url.to_string(),
                initial_resource_versions: versions.into_iter().collect(),
                ..Default::default()
            };
            tx.send(req).await.map_err(|_| StreamError::Closed)?;
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let bearer = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| StreamError::Connect("the token is not a valid header value".into()))?;
        request.metadata_mut().insert("authorization", bearer);
        if let Ok(cluster) = self.settings.cluster_id.parse() {
            request.metadata_mut().insert("clusterid", cluster);
        }
        let mut responses = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .delta_aggregated_resources(request)
            .await?
            .into_inner();
        self.set(|s| {
            s.connected = true;
            s.connects += 1;
        });
        tracing::info!(address = %self.settings.address, "xDS connected");
        let mut seen: HashSet<String> = HashSet::new();
        while let Some(resp) = responses.message().await? {
            let errors = self.apply(&resp);
            self.state.changed();
            let error_detail = (!errors.is_empty()).then(|| RpcStatus {
                // google.rpc.Code INVALID_ARGUMENT
                code: 3,
                message: errors.join("; "),
                details: Vec::new(),
            });
            match &error_detail {
                None => {
                    tracing::debug!(type_url = %resp.type_url, nonce = %resp.nonce, resources = resp.resources.len(),
                        removed = resp.removed_resources.len(), "xDS update applied (ACK)");
                    self.set(|s| s.acks += 1);
                }
                Some(st) => {
                    tracing::warn!(type_url = %resp.type_url, nonce = %resp.nonce, error = %st.message,
                        "xDS update rejected (NACK); the previous version of each rejected resource stays in force");
                    let m = st.message.clone();
                    self.set(|s| {
                        s.nacks += 1;
                        s.last_nack = Some(m);
                    });
                }
            }
            let ack = DeltaDiscoveryRequest {
                type_url: resp.type_url.clone(),
                response_nonce: resp.nonce.clone(),
                error_detail,
                ..Default::default()
            };
            tx.send(ack).await.map_err(|_| StreamError::Closed)?;
            seen.insert(resp.type_url.clone());
            if TYPES.iter().all(|t| seen.contains(*t)) && !*synced.borrow() {
                self.state.write().mark_synced();
                let (w, s, p) = self.state.read().counts();
                tracing::info!(workloads = w, services = s, policies = p, "xDS synced");
                self.set(|st| st.synced = true);
                synced.send_replace(true);
            }
        }
        Ok(())
    }

    /// Applies a response; returns one message per rejected resource.
    fn apply(&self, resp: &DeltaDiscoveryResponse) -> Vec<String> {
        let mut errors = Vec::new();
        let mut state = self.state.write();
        for name in &resp.removed_resources {
            state.remove(&resp.type_url, name);
        }
        for r in &resp.resources {
            let result = match &r.resource {
                None => Err(Refused::NoBody),
                Some(any) => match resp.type_url.as_str() {
                    ADDRESS_TYPE => Address::decode(any.value.as_slice())
                        .map_err(Refused::from)
                        .and_then(|a| state.apply_address(&r.name, &r.version, &a).map_err(Refused::from)),
                    AUTHORIZATION_TYPE => {
                        Authorization::decode(any.value.as_slice()).map_err(Refused::from).and_then(|a| {
                            state.apply_authorization(&r.name, &r.version, &a).map_err(Refused::from)
                        })
                    }
                    other => Err(Refused::UnexpectedType(other.to_string())),
                },
            };
            if let Err(e) = result {
                errors.push(format!("resource {}: {e}", r.name));
            }
        }
        errors
    }
}
