//! Operating-system primitives, below everything else: network namespaces, socket cookies
//! and rtnetlink. Nothing here knows about pods or the mesh.

pub mod netns;
pub mod rtnetlink;
