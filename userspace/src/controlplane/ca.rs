//! `istio.v1.auth.IstioCertificateService/CreateCertificate`: who may ask (bearer token →
//! node), for whom (identities of workloads the mesh file puts on that node), and how long.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::authority::{Authority, CsrRefusal};
use crate::{
    identity::Identity,
    meshfile::Mesh,
    pb::istio::v1::auth::{
        istio_certificate_service_server::IstioCertificateService, IstioCertificateRequest,
        IstioCertificateResponse,
    },
};

/// Metadata key ztunnel uses for the identity it asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

pub struct CaService {
    pub authority: Arc<Authority>,
    /// Bearer token → node name.
    pub tokens: Arc<HashMap<String, String>>,
    pub mesh: watch::Receiver<Arc<Mesh>>,
    pub default_validity: Duration,
    pub max_validity: Duration,
}

impl CaService {
    fn caller(&self, req: &Request<IstioCertificateRequest>) -> Result<String, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .ok_or_else(|| Status::unauthenticated("missing bearer token (authorization metadata)"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("authorization metadata is not `Bearer <token>`"))?;
        self.tokens.get(token).cloned().ok_or_else(|| Status::unauthenticated("unknown bearer token"))
    }

    /// Whether `node` hosts a workload with `identity`, per the mesh file.
    fn authorize(&self, node: &str, identity: &Identity) -> Result<(), Status> {
        let mesh = self.mesh.borrow().clone();
        let mut anywhere = false;
        for pod in &mesh.pods {
            if pod.namespace != identity.namespace || pod.service_account != identity.service_account {
                continue;
            }
            anywhere = true;
            if pod.node.as_deref() == Some(node) {
                return Ok(());
            }
        }
        if anywhere {
            Err(Status::permission_denied(format!("node {node} hosts no workload with identity {identity}")))
        } else {
            Err(Status::permission_denied(format!("no workload in the mesh has identity {identity}")))
        }
    }

    fn validity(&self, requested_secs: i64) -> Result<Duration, Status> {
        if requested_secs < 0 {
            return Err(Status::invalid_argument(format!("validity_duration {requested_secs} is negative")));
        }
        if requested_secs == 0 {
            return Ok(self.default_validity.min(self.max_validity));
        }
        let v = Duration::from_secs(requested_secs as u64);
        if v > self.max_validity {
            return Err(Status::invalid_argument(format!(
                "requested validity {requested_secs}s exceeds the maximum {}s",
                self.max_validity.as_secs()
            )));
        }
        Ok(v)
    }
}

fn impersonated(req: &IstioCertificateRequest) -> Option<String> {
    let field = req.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
    match &field.kind {
        Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let result = (|| {
            let node = self.caller(&req)?;
            let body = req.get_ref();
            let (identity, csr) = self.authority.check_csr(&body.csr).map_err(|e| match e {
                CsrRefusal::TrustDomain { .. } => Status::permission_denied(e.to_string()),
                other => Status::invalid_argument(other.to_string()),
            })?;
            if let Some(asked) = impersonated(body) {
                if asked != identity.to_string() {
                    return Err(Status::invalid_argument(format!(
                        "{IMPERSONATED_IDENTITY} {asked} differs from the CSR's identity {identity}"
                    )));
                }
            }
            let validity = self.validity(body.validity_duration)?;
            self.authorize(&node, &identity)?;
            let chain = self
                .authority
                .issue(&identity, &csr, validity)
                .map_err(|e| Status::internal(format!("signing failed: {e}")))?;
            tracing::info!(%node, %identity, validity_s = validity.as_secs(), "certificate issued");
            Ok(IstioCertificateResponse { cert_chain: chain })
        })();
        match result {
            Ok(r) => Ok(Response::new(r)),
            Err(status) => {
                tracing::warn!(code = ?status.code(), reason = status.message(), "certificate request refused");
                Err(status)
            }
        }
    }
}
