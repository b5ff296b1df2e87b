//! Operating-system primitives, below everything else: network namespaces, socket cookies,
//! rtnetlink, and the factory of the proxy's sockets. Nothing here knows about pods or the mesh.

pub mod cookie;
pub mod netns;
pub mod rtnetlink;
pub mod socket;
