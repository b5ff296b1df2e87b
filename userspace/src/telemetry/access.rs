//! Logging: the process log (tracing, text or JSON) and the access log, one line per proxied
//! connection under the separate target `access` (filter it with e.g. `--log-level
//! info,access=off`).

use std::{io::IsTerminal, time::Duration};

use clap::ValueEnum;
use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter};

use crate::{
    inpod::Direction,
    proxy::{ConnRecord, Transfer},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax (`info`,
/// `info,ambit::capture=debug`, ...).
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).map_err(|e| anyhow::anyhow!("invalid --log-level {filter:?}: {e}"))?;
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        // Colours only for a terminal: log files and collectors get plain text.
        LogFormat::Text => registry
            .with(fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr))
            .try_init()?,
        LogFormat::Json => {
            registry.with(fmt::layer().json().flatten_event(true).with_writer(std::io::stderr)).try_init()?
        }
    }
    Ok(())
}

fn direction(d: Direction) -> &'static str {
    match d {
        Direction::Outbound => "outbound",
        Direction::Inbound | Direction::Hbone => "inbound",
    }
}

/// One finished connection.
pub fn access_log(r: &ConnRecord<'_>, t: &Transfer, duration: Duration) {
    let error = t.error.as_ref().map(ToString::to_string);
    let dst = r.dst.map(|a| a.to_string());
    tracing::info!(
        target: "access",
        direction = %direction(r.direction),
        namespace = %r.pod.namespace,
        pod = %r.pod.name,
        src = %r.src,
        dst = %dst.as_deref().unwrap_or("unknown"),
        src_identity = %r.src_identity.as_deref().unwrap_or("-"),
        dst_identity = %r.dst_identity.as_deref().unwrap_or("-"),
        dst_service = %r.dst_service.as_deref().unwrap_or("-"),
        security = %if r.mtls { "mutual_tls" } else { "none" },
        bytes_sent = t.sent,
        bytes_received = t.received,
        duration_ms = duration.as_millis() as u64,
        error = error.as_deref().unwrap_or(""),
        "connection complete"
    );
}

/// One connection the proxy refused or could not complete.
pub fn access_log_refused(r: &ConnRecord<'_>, reason: &str, detail: &str) {
    let dst = r.dst.map(|a| a.to_string());
    tracing::warn!(
        target: "access",
        direction = %direction(r.direction),
        namespace = %r.pod.namespace,
        pod = %r.pod.name,
        src = %r.src,
        dst = %dst.as_deref().unwrap_or("unknown"),
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
