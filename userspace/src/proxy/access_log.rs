//! The access log: one line per proxied connection (and per refusal or denial) under the
//! target `access`, with both ends' addresses, workloads, namespaces and identities, bytes
//! each way, duration, error, and what the kernel measured on the connection's network leg.

use std::{
    sync::atomic::{AtomicBool, AtomicU16, Ordering},
    time::Duration,
};

use super::{ConnRecord, Transfer};
use crate::{metrics::TcpLabels, pod::Refusal};

/// The access log's field names: ambit's, or ztunnel's (`src.addr`, `dst.hbone_addr`,
/// `bytes_recv`, `duration="Nms"`, ...), for log pipelines written for ztunnel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Ambit,
    Ztunnel,
}

static ZTUNNEL_FIELDS: AtomicBool = AtomicBool::new(false);
/// The HBONE port, which ztunnel's `dst.addr` names for a tunnelled connection.
static HBONE_PORT: AtomicU16 = AtomicU16::new(15008);

/// Chooses the access log's field names, once at start.
pub fn set_access_log_format(format: AccessLogFormat, hbone_port: u16) {
    ZTUNNEL_FIELDS.store(format == AccessLogFormat::Ztunnel, Ordering::Relaxed);
    HBONE_PORT.store(hbone_port, Ordering::Relaxed);
}

fn ztunnel_fields() -> bool {
    ZTUNNEL_FIELDS.load(Ordering::Relaxed)
}

/// ztunnel's `dst.addr` and `dst.hbone_addr`: for a tunnelled connection, the peer's HBONE
/// address and the tunnel's target; otherwise the destination and nothing.
fn ztunnel_dst(r: &ConnRecord<'_>) -> (Option<std::net::SocketAddr>, Option<std::net::SocketAddr>) {
    match r.dst {
        Some(dst) if r.mtls => {
            (Some(std::net::SocketAddr::new(dst.ip(), HBONE_PORT.load(Ordering::Relaxed))), Some(dst))
        }
        Some(dst) => (Some(dst), None),
        None => (None, None),
    }
}

/// A workload name as ztunnel writes it: left out when unknown.
fn known(v: &str) -> Option<&str> {
    (v != crate::metrics::istio::UNKNOWN && !v.is_empty()).then_some(v)
}

/// One finished connection, with ztunnel's field names and message.
fn ztunnel_complete(r: &ConnRecord<'_>, l: &TcpLabels, t: &Transfer, duration: Duration) {
    let (dst, hbone) = ztunnel_dst(r);
    let service = r.dst_service.as_deref().and_then(|k| k.split_once('/')).map(|(_, h)| h);
    let (src_id, dst_id) =
        if r.mtls { (r.src_identity.as_deref(), r.dst_identity.as_deref()) } else { (None, None) };
    let duration = format!("{}ms", duration.as_millis());
    macro_rules! line {
        ($level:ident, $($error:tt)*) => {
            tracing::$level!(
                target: "access",
                // The message as the first field: tracing's macros cannot tell a dotted
                // first field from their other arguments; the output is the same.
                message = "connection complete",
                src.addr = %r.src,
                src.workload = known(&l.source.workload),
                src.namespace = known(&l.source.namespace),
                src.identity = src_id,
                dst.addr = dst.map(tracing::field::display),
                dst.hbone_addr = hbone.map(tracing::field::display),
                dst.service = service,
                dst.workload = known(&l.destination.workload),
                dst.namespace = known(&l.destination.namespace),
                dst.identity = dst_id,
                direction = r.direction.as_str(),
                bytes_sent = t.sent,
                bytes_recv = t.received,
                duration = duration.as_str(),
                $($error)*
            )
        };
    }
    match &t.error {
        None => line!(info,),
        Some(e) => {
            let error = e.to_string();
            line!(error, error = error.as_str(),)
        }
    }
}

/// A refused or denied connection, as ztunnel logs an early failure.
fn ztunnel_failed(r: &ConnRecord<'_>, error: &str) {
    let (dst, hbone) = ztunnel_dst(r);
    tracing::warn!(
        target: "access",
        message = "connection failed",
        src.addr = %r.src,
        dst.addr = dst.map(tracing::field::display),
        dst.hbone_addr = hbone.map(tracing::field::display),
        direction = r.direction.as_str(),
        error,
    );
}

/// What the kernel measured on the socket that carried the connection over the network
/// (kernel-level tracing): smoothed RTT and retransmitted segments during the connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kernel {
    pub rtt_us: Option<u32>,
    pub retransmits: Option<u64>,
}

/// One finished connection.
pub fn finished(r: &ConnRecord<'_>, l: &TcpLabels, t: &Transfer, duration: Duration, k: Kernel) {
    // The strings below cost a few thousand instructions per connection: only for a line
    // that is written.
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    if ztunnel_fields() {
        return ztunnel_complete(r, l, t, duration);
    }
    let error = t.error.as_ref().map(ToString::to_string);
    let dst = r.dst.map(|a| a.to_string());
    let rtt = k.rtt_us.map_or_else(|| "-".to_string(), |v| v.to_string());
    let retransmits = k.retransmits.map_or_else(|| "-".to_string(), |v| v.to_string());
    tracing::info!(
        target: "access",
        direction = %r.direction.as_str(),
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
pub fn refused(r: &ConnRecord<'_>, l: &TcpLabels, reason: Refusal, detail: &str) {
    if ztunnel_fields() {
        return ztunnel_failed(r, &format!("{reason}: {detail}"));
    }
    let dst = r.dst.map(|a| a.to_string());
    tracing::warn!(
        target: "access",
        direction = %r.direction.as_str(),
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
pub fn denied(r: &ConnRecord<'_>, denial: &crate::authz::Denial, open: bool, dry_run: bool) {
    let dst = r.dst.map(|a| a.to_string());
    let message = match (dry_run, open) {
        (true, _) => "dry run: connection would be denied",
        (false, false) => "connection denied",
        (false, true) => "open connection closed: denied after a policy change",
    };
    if ztunnel_fields() && !dry_run {
        return ztunnel_failed(r, &format!("{message}: {} ({})", denial.reason(), denial.policy()));
    }
    tracing::warn!(
        target: "access",
        direction = %r.direction.as_str(),
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
