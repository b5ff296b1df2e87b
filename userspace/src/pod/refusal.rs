//! Why a connection was refused, or failed before its bytes flowed: one value per cause, the
//! `reason` of `ambit_proxy_connections_failed_total` and of the access log, and the
//! `response_flags` Istio's metrics give it.

/// Istio's `response_flags` values ambit reports (ztunnel's set).
pub mod flags {
    pub const NONE: &str = "-";
    pub const DENY: &str = "DENY";
    pub const CONNECT: &str = "CONNECT";
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    pub const NO_ROUTE: &str = "NR";
    pub const TLS_FAILURE: &str = "TLS_FAILURE";
    pub const H2_HANDSHAKE_FAILURE: &str = "H2_HANDSHAKE_FAILURE";
    pub const IDENTITY_ERROR: &str = "IDENTITY_ERROR";
}

macro_rules! refusals {
    ($($(#[$doc:meta])* $name:ident = $text:literal,)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Refusal {
            $($(#[$doc])* $name,)*
        }

        impl Refusal {
            /// Every refusal, in declaration order.
            pub const ALL: &[Refusal] = &[$(Refusal::$name,)*];

            /// As metrics and logs say it.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Refusal::$name => $text,)*
                }
            }
        }
    };
}

refusals! {
    // Outbound, before a destination is chosen.
    /// The original destination could not be read from the kernel's map.
    MapError = "map_error",
    /// The kernel recorded no original destination for the connection.
    NoOriginalDestination = "no_original_destination",
    /// The destination is the proxy itself.
    Loop = "loop",
    /// The mesh state has not been received from the control plane yet.
    NotSynced = "not_synced",
    /// The destination is outside the mesh and `--unknown-destination refuse` is set.
    UnknownDestination = "unknown_destination",
    /// The service has no such port.
    NoSuchPort = "no_such_port",
    /// The service has no healthy endpoint.
    NoHealthyEndpoint = "no_healthy_endpoint",
    /// The endpoint is a hostname (a ServiceEntry resolved by DNS) the pod's resolvers did not
    /// resolve.
    UnresolvedEndpoint = "unresolved_endpoint",
    /// Connecting to the destination (or the application, inbound) failed.
    ConnectFailed = "connect_failed",
    // Outbound tunnels (HBONE client).
    /// The source pod has no workload certificate (yet).
    NoCertificate = "no_certificate",
    /// No socket could be made from the source pod's address.
    NoSourceAddress = "no_source_address",
    /// The TCP connection to the peer's 15008 failed.
    HboneConnectFailed = "hbone_connect_failed",
    /// The TLS handshake with the peer failed.
    HboneTlsFailed = "hbone_tls_failed",
    /// The HTTP/2 handshake with the peer failed.
    HboneHttp2Failed = "hbone_http2_failed",
    /// The destination's proxy denied the CONNECT (401/403).
    DeniedByDestination = "denied_by_destination",
    /// The destination's proxy answered the CONNECT with another failure status.
    HboneRefused = "hbone_refused",
    /// The tunnel was not set up in time.
    HboneTimeout = "hbone_timeout",
    /// This proxy's TLS configuration could not be built.
    TlsConfig = "tls_config",
    // Inbound, plaintext and tunnelled.
    /// The accepted socket could not be inspected.
    SocketError = "socket_error",
    /// The destination is not one of this pod's addresses.
    NotThisPod = "not_this_pod",
    /// An authorization policy denies the connection.
    AuthorizationDenied = "authorization_denied",
    /// The peer holds as many HBONE connections as one peer may.
    HbonePeerLimit = "hbone_peer_limit",
    /// The peer's TLS handshake was refused (no or an unverifiable certificate).
    HboneTlsRefused = "hbone_tls_refused",
    /// The peer's TLS handshake did not complete in time.
    HboneTlsTimeout = "hbone_tls_timeout",
    /// The peer's HTTP/2 preface did not arrive in time.
    HboneHttp2Timeout = "hbone_http2_timeout",
    /// The CONNECT asks for an address that is not the pod's the tunnel arrived for.
    WrongDestination = "wrong_destination",
    /// The request is not a CONNECT.
    NotConnect = "not_connect",
    /// The CONNECT's authority is not an `IP:port`.
    BadAuthority = "bad_authority",
}

impl Refusal {
    /// Istio's `response_flags` for it, as ztunnel reports the same failure.
    pub fn response_flags(self) -> &'static str {
        use Refusal::*;
        match self {
            AuthorizationDenied | DeniedByDestination => flags::DENY,
            NoHealthyEndpoint | UnresolvedEndpoint => flags::NO_HEALTHY_UPSTREAM,
            NoSuchPort | UnknownDestination | NotSynced | Loop | NoOriginalDestination => flags::NO_ROUTE,
            // ztunnel's flags for a tunnel that failed before its CONNECT was answered.
            HboneTlsFailed | TlsConfig => flags::TLS_FAILURE,
            HboneHttp2Failed => flags::H2_HANDSHAKE_FAILURE,
            NoCertificate => flags::IDENTITY_ERROR,
            MapError | ConnectFailed | NoSourceAddress | HboneConnectFailed | HboneRefused | HboneTimeout
            | SocketError | NotThisPod | HbonePeerLimit | HboneTlsRefused | HboneTlsTimeout
            | HboneHttp2Timeout | WrongDestination | NotConnect | BadAuthority => flags::CONNECT,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_its_own_name_in_snake_case() {
        let names: std::collections::HashSet<&str> = Refusal::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(names.len(), Refusal::ALL.len(), "two refusals share a name");
        for n in names {
            assert!(n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'), "{n}");
        }
    }
}
