//! Pod sources: where the node proxy learns which pods exist on its node and which of them
//! are enrolled. Today: the local mesh file. (Kubernetes comes next, behind the same shape:
//! a stream of "the pods to enrol now".)

pub mod local;

use crate::meshfile::{Mesh, PodSpec};

/// The pods of `node` that are enrolled in `mesh`.
pub fn enrolled_pods(mesh: &Mesh, node: &str) -> Vec<PodSpec> {
    mesh.pods_on(node).filter(|p| mesh.is_enrolled(p)).cloned().collect()
}
