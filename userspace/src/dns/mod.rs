//! DNS for the mesh: the parts that answer a pod's query from the mesh's state (services and
//! ServiceEntry hostnames) — `wire`, the messages; `resolve`, which names are the mesh's;
//! `handle`, one message decided (answered, forwarded or dropped).
//! Not built yet: the capture that steers pods' DNS here, the per-pod listener and the
//! forwarding of other names to the pod's resolver; nothing calls this module so far.

pub mod forward;
pub mod handle;
pub mod resolve;
pub mod server;
pub mod wire;
