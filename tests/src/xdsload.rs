//! Many simulated node proxies against one control plane: each has its own TLS connection and
//! Delta ADS stream, subscribes as `ambit node` does (wildcard, both types), ACKs every
//! response, and records when it first sees a resource of a given name.
//! They run on one thread inside a namespace of the bed.

use std::{
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient, DeltaDiscoveryRequest,
    },
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const TYPES: [&str; 2] =
    ["type.googleapis.com/istio.workload.Address", "type.googleapis.com/istio.security.Authorization"];

enum Event {
    Synced,
    Seen(Instant),
    Failed(String),
}

/// Where the streams connect and how they authenticate.
pub struct Target<'a> {
    pub netns: &'a Path,
    pub address: &'a str,
    pub server_name: &'a str,
    pub root_cert: &'a Path,
    pub token: &'a str,
}

/// Open streams; dropping this closes them all.
pub struct Streams {
    events: mpsc::Receiver<Event>,
    n: usize,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Streams {
    /// Opens `n` streams and waits (up to `timeout`) until each has its initial sync.
    /// Each later reports the first response that carries a resource named `needle`.
    pub fn open(target: &Target<'_>, n: usize, needle: &str, timeout: Duration) -> anyhow::Result<Streams> {
        let root =
            std::fs::read(target.root_cert).with_context(|| format!("{}", target.root_cert.display()))?;
        let netns =
            std::fs::File::open(target.netns).with_context(|| format!("{}", target.netns.display()))?;
        let (tx, events) = mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (address, server_name, token, wanted) = (
            target.address.to_string(),
            target.server_name.to_string(),
            target.token.to_string(),
            needle.to_string(),
        );
        std::thread::spawn(move || {
            // Sockets are created in the namespace of the thread that creates them.
            if let Err(e) = nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET) {
                let _gone = tx.send(Event::Failed(format!("setns: {e}")));
                return;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async move {
                for i in 0..n {
                    let (tx, root, address, server_name, token, needle) = (
                        tx.clone(),
                        root.clone(),
                        address.clone(),
                        server_name.clone(),
                        token.clone(),
                        wanted.clone(),
                    );
                    tokio::spawn(async move {
                        let r = stream(i, &root, &address, &server_name, &token, &needle, &tx).await;
                        if let Err(e) = r {
                            let _gone = tx.send(Event::Failed(format!("stream {i}: {e:#}")));
                        }
                    });
                }
                let _either = stopped.await;
            });
        });
        let streams = Streams { events, n, _stop: stop };
        let deadline = Instant::now() + timeout;
        let mut synced = 0;
        while synced < n {
            match streams.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Event::Synced) => synced += 1,
                Ok(Event::Seen(_)) => bail!("{needle} seen before it was written"),
                Ok(Event::Failed(e)) => bail!(e),
                Err(_) => bail!("only {synced} of {n} streams synced within {timeout:?}"),
            }
        }
        Ok(streams)
    }

    /// Waits until every stream has seen the resource; returns when each saw it.
    pub fn seen_by_all(&self, timeout: Duration) -> anyhow::Result<Vec<Instant>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::with_capacity(self.n);
        while seen.len() < self.n {
            match self.events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(Event::Seen(at)) => seen.push(at),
                Ok(Event::Synced) => {}
                Ok(Event::Failed(e)) => bail!(e),
                Err(_) => {
                    bail!("only {} of {} streams saw the change within {timeout:?}", seen.len(), self.n)
                }
            }
        }
        Ok(seen)
    }
}

async fn stream(
    i: usize,
    root: &[u8],
    address: &str,
    server_name: &str,
    token: &str,
    needle: &str,
    events: &mpsc::Sender<Event>,
) -> anyhow::Result<()> {
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root)).domain_name(server_name);
    let channel = Endpoint::from_shared(address.to_string())?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(20))
        .connect()
        .await
        .context("connecting")?;
    let (tx, rx) = tokio::sync::mpsc::channel::<DeltaDiscoveryRequest>(8);
    for (k, type_url) in TYPES.iter().enumerate() {
        let node = (k == 0).then(|| Node {
            id: format!("ztunnel~10.0.0.{i}~sim-{i}.ambit~ambit.svc.cluster.local"),
            ..Default::default()
        });
        tx.send(DeltaDiscoveryRequest { node, type_url: type_url.to_string(), ..Default::default() }).await?;
    }
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse()?);
    let mut responses = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .delta_aggregated_resources(request)
        .await?
        .into_inner();
    let mut types_seen = Vec::new();
    let mut needle_seen = false;
    while let Some(resp) = responses.message().await? {
        let at = Instant::now();
        tx.send(DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        })
        .await?;
        if !needle_seen && resp.resources.iter().any(|r| r.name == needle) {
            needle_seen = true;
            events.send(Event::Seen(at))?;
        }
        if !types_seen.contains(&resp.type_url) {
            types_seen.push(resp.type_url.clone());
            if types_seen.len() == TYPES.len() {
                events.send(Event::Synced)?;
            }
        }
    }
    bail!("the control plane closed the stream")
}
