//! Per-pod inbound capture: the TC ingress program on the pod's interface, inside its netns.
//!
//! On kernels with tcx (6.6+) the attachment is a bpf link pinned under `tc/<netns cookie>`,
//! adopted by a restarted proxy and atomically updated when the program changed. Older kernels
//! get a `clsact` qdisc and a cls_bpf filter at a fixed priority and handle, which survives the
//! proxy by itself and is replaced in place (also atomically) on restart.

use std::{fs, path::Path};

use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        LinkOrder, SchedClassifier, TcAttachType,
    },
    util::KernelVersion,
};
use serde::Serialize;

use super::{pins::PinDir, CaptureError};
use crate::os::cookie::NetnsCookie;
use crate::os::netns::Netns;

/// cls_bpf priority and handle of the filter on clsact kernels; fixed so that a restarted
/// proxy can address the filter an earlier run left.
const NL_PRIORITY: u16 = 0xa3b1;
const NL_HANDLE: TcHandle = TcHandle::new(0, 0xa3b1);

/// How a pod's inbound capture came to be in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TcState {
    /// A pinned tcx link with this very program: left as it was.
    Adopted,
    /// A pinned tcx link with another program: updated in place.
    Replaced,
    /// Newly attached (tcx).
    Attached,
    /// Attached or replaced as a cls_bpf filter (kernel without tcx).
    Netlink,
}

fn has_tcx() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0))
}

pub fn attach(
    prog: &mut SchedClassifier,
    prog_id: u32,
    pins: &PinDir,
    netns: &Netns,
    interface: &str,
) -> Result<TcState, CaptureError> {
    let pin = pins.tc(netns.cookie());
    let tc_err = |source| CaptureError::Tc {
        interface: interface.to_string(),
        netns: netns.path().to_path_buf(),
        source: Box::new(source),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CaptureError::Io { path, source }
    };
    // Interface names resolve, and tcx/netlink attach, in the calling thread's netns.
    let result = netns
        .run(|| -> Result<TcState, CaptureError> {
            if !has_tcx() {
                return attach_netlink(prog, interface).map_err(tc_err);
            }
            if pin.exists() {
                let pinned = PinnedLink::from_pin(&pin)
                    .map_err(|source| CaptureError::Link { path: pin.clone(), source: Box::new(source) })?;
                let link = FdLink::from(pinned);
                let info = link
                    .info()
                    .map_err(|source| CaptureError::Link { path: pin.clone(), source: Box::new(source) })?;
                if info.program_id() == prog_id {
                    return Ok(TcState::Adopted);
                }
                let link = SchedClassifierLink::try_from(link)
                    .map_err(|source| CaptureError::Link { path: pin.clone(), source: Box::new(source) })?;
                let id = prog.attach_to_link(link).map_err(tc_err)?;
                // The pin still names the (updated) link; our handle can go.
                drop(prog.take_link(id).map_err(tc_err)?);
                return Ok(TcState::Replaced);
            }
            let id = prog
                .attach_with_options(
                    interface,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(LinkOrder::default()),
                )
                .map_err(tc_err)?;
            let link = FdLink::try_from(prog.take_link(id).map_err(tc_err)?)
                .map_err(|source| CaptureError::Link { path: pin.clone(), source: Box::new(source) })?;
            link.pin(&pin)
                .map_err(|source| CaptureError::Pin { path: pin.clone(), source: Box::new(source) })?;
            Ok(TcState::Attached)
        })
        .map_err(io(netns.path()))?;
    result
}

fn attach_netlink(
    prog: &mut SchedClassifier,
    interface: &str,
) -> Result<TcState, aya::programs::ProgramError> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => {}
        // Already there (ours from an earlier run, or the CNI's): fine.
        Err(tc::TcError::IoError(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(tc::TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e.into()),
    }
    // Replace in place if an earlier run left our filter, else create it.
    let existing =
        SchedClassifierLink::attached(interface, TcAttachType::Ingress, NL_PRIORITY, NL_HANDLE, None)?;
    let id = match prog.attach_to_link(existing) {
        Ok(id) => id,
        Err(_) => prog.attach_with_options(
            interface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions {
                priority: NL_PRIORITY,
                handle: NL_HANDLE,
                ..Default::default()
            }),
        )?,
    };
    // aya detaches a link when its handle drops; this filter must outlive the proxy (it is
    // addressed again by priority and handle), so the handle is forgotten. It owns no fd.
    std::mem::forget(prog.take_link(id)?);
    Ok(TcState::Netlink)
}

/// Removes a pod's inbound capture. With tcx, removing the pin drops the last reference to
/// the link, which detaches it (or it is gone already with the pod's interface). On clsact
/// kernels the filter is deleted inside the pod's netns when that still exists.
pub fn detach(
    pins: &PinDir,
    netns_cookie: NetnsCookie,
    netns: Option<&Netns>,
    interface: &str,
) -> Result<(), CaptureError> {
    let pin = pins.tc(netns_cookie);
    if pin.exists() {
        fs::remove_file(&pin).map_err(|source| CaptureError::Io { path: pin.clone(), source })?;
    }
    if has_tcx() {
        return Ok(());
    }
    let Some(netns) = netns else {
        return Ok(());
    };
    let tc_err = |source| CaptureError::Tc {
        interface: interface.to_string(),
        netns: netns.path().to_path_buf(),
        source: Box::new(source),
    };
    netns
        .run(|| -> Result<(), CaptureError> {
            use aya::programs::links::Link;
            match SchedClassifierLink::attached(
                interface,
                TcAttachType::Ingress,
                NL_PRIORITY,
                NL_HANDLE,
                None,
            ) {
                Ok(link) => link.detach().map_err(tc_err),
                // The interface is gone: so is the filter.
                Err(_) => Ok(()),
            }
        })
        .map_err(|source| CaptureError::Io { path: netns.path().to_path_buf(), source })?
}
