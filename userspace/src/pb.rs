//! Generated protobuf and gRPC code for the Istio APIs ambit speaks (`proto/`).
#![allow(clippy::all, missing_docs, unreachable_pub)]

pub mod istio {
    pub mod workload {
        tonic::include_proto!("istio.workload");
    }
    pub mod security {
        tonic::include_proto!("istio.security");
    }
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}
