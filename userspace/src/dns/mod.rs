//! DNS for enrolled pods: their queries, steered to the node proxy by the programs, are
//! answered from the mesh's state (services and ServiceEntry hostnames) or forwarded to the
//! pod's own resolver. `wire`: the messages.

pub mod wire;
