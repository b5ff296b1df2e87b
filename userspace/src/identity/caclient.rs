//! Client of Istio's certificate API (`CreateCertificate`), over TLS with a bearer token.
//! Works against `ambit controlplane` and istiod.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use tonic::{
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use super::{cert, Identity, WorkloadCert};
use crate::pb::istio::v1::auth::{
    istio_certificate_service_client::IstioCertificateServiceClient, IstioCertificateRequest,
};

/// Where the CA is and how to talk to it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CaSettings {
    /// `https://host:port`.
    pub address: String,
    /// Name checked in the CA's serving certificate.
    pub server_name: String,
    /// PEM file with the root(s) the CA's serving certificate chains to (the mesh root).
    pub root_cert: PathBuf,
    /// File holding the bearer token.
    pub token_file: PathBuf,
    /// How long each request may take.
    pub timeout: Duration,
    /// Sent as the `clusterid` header: istiod's CA picks the node authorizer of impersonated
    /// requests by it ("no node authorizer for cluster ''" without it).
    pub cluster_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA settings: {0}")]
    Settings(String),
    #[error("CA request failed: {code:?}: {message}")]
    Status { code: tonic::Code, message: String },
    #[error("preparing the request: {0}")]
    Csr(#[from] cert::CertError),
}

impl From<tonic::Status> for CaError {
    fn from(s: tonic::Status) -> Self {
        // The message alone is often "transport error"; the reason is in its sources.
        CaError::Status { code: s.code(), message: crate::errors::with_sources(s.message().to_string(), &s) }
    }
}

#[derive(Clone)]
pub struct CaClient {
    client: IstioCertificateServiceClient<Channel>,
    token_file: PathBuf,
    cluster_id: String,
}

impl CaClient {
    /// Prepares the channel (it connects on first use, and reconnects by itself).
    pub fn new(settings: &CaSettings) -> Result<CaClient, CaError> {
        let root = std::fs::read(&settings.root_cert)
            .map_err(|e| CaError::Settings(format!("reading {}: {e}", settings.root_cert.display())))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root))
            .domain_name(settings.server_name.clone());
        let endpoint = Endpoint::from_shared(settings.address.clone())
            .map_err(|e| CaError::Settings(format!("{}: {e}", settings.address)))?
            .tls_config(tls)
            .map_err(|e| CaError::Settings(format!("TLS: {e}")))?
            .connect_timeout(settings.timeout)
            .timeout(settings.timeout);
        Ok(CaClient {
            client: IstioCertificateServiceClient::new(endpoint.connect_lazy()),
            token_file: settings.token_file.clone(),
            cluster_id: settings.cluster_id.clone(),
        })
    }

    /// Sends a CSR as is; returns the PEM chain. `impersonate` goes in the request metadata.
    pub async fn create_certificate(
        &self,
        csr_pem: String,
        validity: Duration,
        impersonate: Option<&str>,
    ) -> Result<Vec<String>, CaError> {
        // Read per request: projected tokens are rotated on disk.
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| CaError::Settings(format!("reading {}: {e}", self.token_file.display())))?;
        let bearer: MetadataValue<_> = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| CaError::Settings("the token is not a valid header value".into()))?;
        let metadata = impersonate.map(|id| prost_types::Struct {
            fields: BTreeMap::from([(
                super::super::controlplane::IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue(id.to_string())) },
            )]),
        });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: validity.as_secs() as i64,
            metadata,
        });
        req.metadata_mut().insert("authorization", bearer);
        if let Ok(cluster) = self.cluster_id.parse() {
            req.metadata_mut().insert("clusterid", cluster);
        }
        let resp = self.client.clone().create_certificate(req).await?;
        Ok(resp.into_inner().cert_chain)
    }

    /// A fresh key, a CSR for `identity`, the CA's answer: a certificate ready to use.
    pub async fn sign(&self, identity: &Identity, validity: Duration) -> Result<WorkloadCert, CaError> {
        let (key, csr) = cert::csr(identity)?;
        let chain = self.create_certificate(csr, validity, Some(&identity.to_string())).await?;
        let provider = crate::crypto::provider();
        Ok(WorkloadCert::from_chain(identity, &key, &chain, &provider)?)
    }
}
