//! Kernel-side logs (aya-log) forwarded into the proxy's log under the target `ebpf`.
//!
//! The programs only format and send a record when the level in the pinned config admits it
//! (`--ebpf-log-level`, off by default), so logging costs nothing unless asked for. The ring
//! buffer is pinned with the other maps: re-adopted programs keep logging into the buffer the
//! restarted proxy reads.

use aya::Ebpf;
use clap::ValueEnum;
use serde::Serialize;
use tokio::io::unix::AsyncFd;

/// Kernel log levels, in aya-log's numbering (0 = off).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelLogLevel {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl KernelLogLevel {
    /// The level as the programs' config map holds it.
    pub fn from_raw(raw: u8) -> Option<KernelLogLevel> {
        [Self::Off, Self::Error, Self::Warn, Self::Info, Self::Debug].into_iter().find(|l| *l as u8 == raw)
    }

    /// The tracing filter directive that lets these records through.
    pub fn directive(self) -> Option<&'static str> {
        match self {
            KernelLogLevel::Off => None,
            KernelLogLevel::Error => Some("ebpf=error"),
            KernelLogLevel::Warn => Some("ebpf=warn"),
            KernelLogLevel::Info => Some("ebpf=info"),
            KernelLogLevel::Debug => Some("ebpf=debug"),
        }
    }
}

/// Hands aya-log's records to tracing under the target `ebpf`.
struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, r: &log::Record<'_>) {
        let msg = r.args();
        let program = r.target();
        match r.level() {
            log::Level::Error => tracing::error!(target: "ebpf", program, "{msg}"),
            log::Level::Warn => tracing::warn!(target: "ebpf", program, "{msg}"),
            log::Level::Info => tracing::info!(target: "ebpf", program, "{msg}"),
            log::Level::Debug => tracing::debug!(target: "ebpf", program, "{msg}"),
            log::Level::Trace => tracing::trace!(target: "ebpf", program, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// Starts forwarding. Call from inside the runtime; the task lives as long as the process.
pub fn spawn(ebpf: &mut Ebpf) -> Result<(), aya_log::Error> {
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, Forward)?;
    // SAFETY: the logger owns its ring buffer's fd and always returns that same fd; the
    // AsyncFd owns the logger, so the fd stays open for as long as it is registered.
    let registered = unsafe { AsyncFd::register(logger) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::warn!(error = %e, "kernel log forwarding unavailable");
            return Ok(());
        }
    };
    tokio::spawn(async move {
        loop {
            match fd.readable_mut().await {
                Ok(mut guard) => {
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "kernel log forwarding stopped");
                    return;
                }
            }
        }
    });
    Ok(())
}
