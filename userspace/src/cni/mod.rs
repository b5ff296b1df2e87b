//! `ambit-cni`: pods captured from their first packet, as istio-cni does for ztunnel.
//!
//! The container runtime runs the plugin ([`plugin`], this binary under the name
//! `ambit-cni`) chained after the cluster's own CNI plugins. During the pod sandbox's ADD it
//! hands the sandbox to the local `ambit node` over a unix socket ([`protocol`],
//! [`server`]) and returns once capture is attached; the runtime starts no container of a
//! pod that should be captured and is not. The node installs the plugin and keeps it in the
//! node's CNI configuration ([`install`]).

pub mod install;
pub mod plugin;
pub mod protocol;
pub mod server;

/// The name the plugin binary is installed (and recognised) as.
pub use install::PLUGIN_TYPE as BINARY_NAME;
