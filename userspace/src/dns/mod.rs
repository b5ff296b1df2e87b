//! DNS for the mesh, the answering side: `wire`, the messages; `resolve`, which names are the
//! mesh's (services and ServiceEntry hostnames); `handle`, one message decided (answered,
//! forwarded or dropped); `forward`, names the mesh does not have sent to the pod's
//! resolvers; `server`, a pod's UDP and TCP listener. Not built yet: the capture that steers
//! pods' DNS to the listener, and starting it with each pod; nothing runs it so far.

pub mod forward;
pub mod handle;
pub mod resolve;
pub mod server;
pub mod wire;
