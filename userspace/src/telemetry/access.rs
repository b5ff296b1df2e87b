//! The access log: one line per proxied connection (and per refusal or denial) under the
//! target `access`, with both ends' addresses, workloads, namespaces and identities, bytes
//! each way, duration, error, and what the kernel measured on the connection's network leg.

use std::time::Duration;

use crate::{
    inpod::Direction,
    metrics::TcpLabels,
    proxy::{ConnRecord, Transfer},
};

/// What the kernel measured on the socket that carried the connection over the network
/// (kernel-level tracing): smoothed RTT and retransmitted segments during the connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kernel {
    pub rtt_us: Option<u32>,
    pub retransmits: Option<u64>,
}

fn direction(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "outbound",
        Direction::Inbound | Direction::Hbone => "inbound",
    }
}

/// One finished connection.
pub fn access_log(r: &ConnRecord<'_>, l: &TcpLabels, t: &Transfer, duration: Duration, k: Kernel) {
    // The strings below cost a few thousand instructions per connection: only for a line
    // that is written.
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    let error = t.error.as_ref().map(ToString::to_string);
    let dst = r.dst.map(|a| a.to_string());
    let rtt = k.rtt_us.map_or_else(|| "-".to_string(), |v| v.to_string());
    let retransmits = k.retransmits.map_or_else(|| "-".to_string(), |v| v.to_string());
    tracing::info!(
        target: "access",
        direction = %direction(r.direction),
        namespace = %r.pod.namespace,
        pod = %r.pod.name,
        src = %r.src,
        src_workload = %l.source.workload,
        src_namespace = %l.source.namespace,
        dst = %dst.as_deref().unwrap_or("unknown"),
        dst_workload = %l.destination.workload,
        dst_namespace = %l.destination.namespace,
        src_identity = %r.src_identity.as_deref().unwrap_or("-"),
        dst_identity = %r.dst_identity.as_deref().unwrap_or("-"),
        dst_service = %r.dst_service.as_deref().unwrap_or("-"),
        security = %if r.mtls { "mutual_tls" } else { "none" },
        bytes_sent = t.sent,
        bytes_received = t.received,
        duration_ms = duration.as_millis() as u64,
        rtt_us = %rtt,
        retransmits = %retransmits,
        error = error.as_deref().unwrap_or(""),
        "connection complete"
    );
}

/// One connection the proxy refused or could not complete.
pub fn access_log_refused(r: &ConnRecord<'_>, l: &TcpLabels, reason: &str, detail: &str) {
    let dst = r.dst.map(|a| a.to_string());
    tracing::warn!(
        target: "access",
        direction = %direction(r.direction),
        namespace = %r.pod.namespace,
        pod = %r.pod.name,
        src = %r.src,
        src_workload = %l.source.workload,
        src_namespace = %l.source.namespace,
        dst = %dst.as_deref().unwrap_or("unknown"),
        dst_workload = %l.destination.workload,
        dst_namespace = %l.destination.namespace,
        src_identity = %r.src_identity.as_deref().unwrap_or("-"),
        dst_identity = %r.dst_identity.as_deref().unwrap_or("-"),
        dst_service = %r.dst_service.as_deref().unwrap_or("-"),
        security = %if r.mtls { "mutual_tls" } else { "none" },
        reason = %reason,
        error = detail,
        "connection refused"
    );
}

/// An inbound connection denied by authorization (at connect, or closed while open after a
/// policy change), or one a dry-run policy would deny.
pub fn access_log_denied(r: &ConnRecord<'_>, denial: &crate::authz::Denial, open: bool, dry_run: bool) {
    let dst = r.dst.map(|a| a.to_string());
    let message = match (dry_run, open) {
        (true, _) => "dry run: connection would be denied",
        (false, false) => "connection denied",
        (false, true) => "open connection closed: denied after a policy change",
    };
    tracing::warn!(
        target: "access",
        direction = %direction(r.direction),
        namespace = %r.pod.namespace,
        pod = %r.pod.name,
        src = %r.src,
        dst = %dst.as_deref().unwrap_or("unknown"),
        src_identity = %r.src_identity.as_deref().unwrap_or("-"),
        dst_identity = %r.dst_identity.as_deref().unwrap_or("-"),
        security = %if r.mtls { "mutual_tls" } else { "none" },
        policy = %denial.policy(),
        reason = %denial.reason(),
        "{message}"
    );
}
