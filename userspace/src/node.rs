//! `ambit node`: wires capture, the pod source, the proxy and the admin endpoints together,
//! and runs until SIGTERM/SIGINT or `/quitquitquit`, then drains.

use std::{sync::Arc, time::Duration};

use rustls_pki_types::pem::PemObject;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::{self, AdminState, Routes},
    capture::Capture,
    cni::{
        install::{Chained, CniSettings},
        server::CniServer,
    },
    config::{self, NodeSettings},
    enroll,
    identity::{caclient::CaClient, IdentityManager},
    inpod::{PodManager, Ports},
    metrics::Metrics,
    probe,
    proxy::{Proxy, ProxyDeps, ProxySettings},
    state::StateStore,
    trace::Tracer,
    xds::{
        client::XdsClient,
        translate::{translate_in, Origin},
    },
};

/// How often enrolment of pods that failed is retried.
const RETRY: Duration = Duration::from_secs(2);

pub async fn run(settings: NodeSettings) -> anyhow::Result<()> {
    // One short line; every setting is in the debug log and in /config_dump.
    let pods = match &settings.pod_source {
        crate::enroll::PodSource::File { mesh_file, .. } => format!("mesh file {}", mesh_file.display()),
        crate::enroll::PodSource::Kubernetes(_) => "Kubernetes API".to_string(),
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        node = %settings.node_name,
        pods = %pods,
        control_plane = %settings.xds.as_ref().map_or("none (workloads from the mesh file)", |x| x.address.as_str()),
        ca = %settings.ca.as_ref().map_or("none (no mTLS)", |c| c.address.as_str()),
        cni = settings.cni.is_some(),
        fail_open = settings.fail_open,
        "starting ambit node"
    );
    tracing::debug!(config = %serde_json::to_string(&settings).unwrap_or_default(), "ambit node settings");
    raise_fd_limit();
    crate::profiling::heap::set_rate(settings.heap_sample_bytes);
    match (&settings.kubelet_cgroup, &settings.kubelet_cgroup_found) {
        (Some(dir), found) => tracing::info!(
            cgroup = %dir.display(),
            ?found,
            "kubelet health probes from this cgroup reach enrolled pods uncaptured; nothing else from the node does"
        ),
        (None, config::kubelet::Found::Disabled) => tracing::info!(
            "--kubelet-cgroup none: kubelet health probes are captured like any client from the node"
        ),
        (None, _) => tracing::warn!(
            "no kubelet found (no process named kubelet under --proc-dir, no system.slice/kubelet.service): \
             its health probes to enrolled pods are captured like any client from the node, and refused under \
             STRICT mTLS; set --kubelet-cgroup"
        ),
    }
    let shutdown = CancellationToken::new();
    // The pod source first: an invalid mesh file (or Kubernetes configuration) stops the
    // start before the kernel is touched.
    let mut source = enroll::Source::start(
        &settings.pod_source,
        &settings.node_name,
        &settings.enrolment,
        shutdown.clone(),
    )
    .await?;
    // The kernel next: refuse, with everything that is missing, before attaching anything.
    let kernel = probe::run(&settings.bpffs, &settings.cgroup);
    if let Some(refusal) = kernel.refusal() {
        anyhow::bail!("{refusal}");
    }
    tracing::info!(
        kernel = %kernel.kernel,
        inbound_attach = if kernel.has_tcx() { "tcx" } else { "clsact" },
        "kernel supports ambit"
    );
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    crate::heap::spawn_trimmer(shutdown.clone());
    let metrics = Arc::new(Metrics::with_component(&settings.metrics_component));
    let admin = Arc::new(AdminState::new(metrics.clone(), shutdown.clone()));
    for (addr, routes) in [
        (settings.admin_addr, Routes::Admin),
        (settings.stats_addr, Routes::Stats),
        (settings.readiness_addr, Routes::Readiness),
    ] {
        let listener =
            admin::bind(addr).await.with_context(|| format!("binding the {routes:?} endpoint on {addr}"))?;
        tokio::spawn(admin::serve(listener, routes, admin.clone(), shutdown.clone()));
    }

    let opened = Capture::open(&settings.capture()).map_err(|e| {
        let hint = if lacks_privilege(&e) {
            " (ambit node needs root, or CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_PTRACE)"
        } else {
            ""
        };
        anyhow::Error::new(e).context(format!("setting up eBPF capture{hint}"))
    })?;
    let crate::capture::Opened { capture, orig, stats, events, config: kernel_config } = opened;
    let adoption = capture.adoption().clone();
    tracing::info!(
        pins = %capture.pin_dir().display(),
        adopted_programs = ?adoption.adopted_programs,
        loaded_programs = ?adoption.loaded_programs,
        adopted_links = ?adoption.adopted_links,
        attached_links = ?adoption.attached_links,
        "eBPF capture ready"
    );
    metrics.register_kernel_stats(Arc::new(stats));

    {
        let config = kernel_config.clone();
        let set = move |level: crate::capture::klog::KernelLogLevel| {
            config.update(|c| c.log_level = level as u8).map(|_| ()).map_err(|e| e.to_string())
        };
        admin.set_kernel_log(Arc::new(set), settings.ebpf_log_level);
        let kernel_config = kernel_config.clone();
        let switch = move |on: bool| {
            use ambit_common::maps::CONFIG_TRACE;
            kernel_config
                .update(|c| c.flags = if on { c.flags | CONFIG_TRACE } else { c.flags & !CONFIG_TRACE })
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        admin.set_kernel_tracing(Arc::new(switch), settings.kernel_tracing);
    }

    let identities = identities(&settings)?;
    let state = Arc::new(StateStore::default());
    let pod_registry = Arc::new(crate::pod::PodRegistry::default());
    let tracer = if settings.kernel_tracing {
        let t = Tracer::new(
            &settings.node_name,
            settings.hbone_port,
            pod_registry.clone(),
            state.clone(),
            &metrics,
        );
        t.spawn_reader(events, shutdown.clone()).context("reading kernel trace events")?;
        admin.set_tracer(t.clone());
        Some(t)
    } else {
        None
    };
    let proxy = Proxy::new(
        ProxySettings {
            mark: settings.proxy_mark,
            delivery_mark: settings.delivery_mark,
            connect_timeout: settings.connect_timeout,
            own_ports: vec![settings.outbound_port, settings.inbound_port, settings.hbone_port],
            hbone_port: settings.hbone_port,
            hbone: settings.hbone.clone(),
            unknown: settings.unknown_destination,
            loopback_is_loop: true,
        },
        ProxyDeps {
            orig: Arc::new(orig),
            sockets: Arc::new(crate::os::socket::InPodSockets),
            metrics: metrics.clone(),
            identities: identities.clone(),
            state: state.clone(),
            pods: pod_registry,
            tracer,
        },
    );
    let mut pods = PodManager::new(
        capture,
        proxy.clone(),
        identities.clone(),
        Ports {
            outbound: settings.outbound_port,
            inbound: settings.inbound_port,
            hbone: settings.hbone_port,
            delivery_mark: settings.original_source.then_some(settings.delivery_mark),
        },
        settings.cluster_id.clone(),
    );

    // Workloads and services: from the control plane over xDS, or from the mesh file.
    let (synced_tx, synced) = tokio::sync::watch::channel(settings.xds.is_none());
    let xds_status = settings.xds.as_ref().map(|x| {
        let client = XdsClient::new(x.clone(), state.clone());
        let status = client.status();
        tokio::spawn(client.run(synced_tx, shutdown.clone()));
        status
    });
    // Pinned state of pods that left while no proxy ran is removed after the first reconcile:
    // that needs the complete pod list.
    if matches!(source, enroll::Source::Kubernetes(_)) {
        admin.set_ready(Some("waiting for the first pod list from the Kubernetes API".into()));
        tracing::info!("waiting for the first pod list from the Kubernetes API");
        tokio::select! {
            () = source.first_sync() => {}
            () = shutdown.cancelled() => return Ok(()),
            _ = sigterm.recv() => { tracing::info!("SIGTERM before the first pod list: exiting"); return Ok(()) }
            _ = sigint.recv() => { tracing::info!("SIGINT before the first pod list: exiting"); return Ok(()) }
        }
    }
    let pod_source_status = source.kube_status();
    let report_enrolled = source.enrolled_reporter();
    let cni = cni_server(&settings, &source)?;
    let report = |pods: &PodManager| {
        if let Some(r) = &report_enrolled {
            let failed = pods
                .failures()
                .iter()
                .map(|(k, f)| (k.clone(), (f.netns.clone(), f.reason.clone())))
                .collect();
            let now = enroll::EnrolledReport { pods: pods.enrolled_netns(), failed };
            r.send_if_modified(|held| {
                let differs = held.as_ref() != Some(&now);
                if differs {
                    *held = Some(now);
                }
                differs
            });
        }
    };
    let meshes = source.meshes();
    metrics.register_health(xds_status.clone(), identities.clone());
    let mesh = meshes.borrow_and_update().clone();
    if settings.xds.is_none() {
        apply_mesh(&state, &mesh, &settings.origin());
    }
    let rules = &settings.enrolment;
    pods.reconcile(&enroll::enrolled_pods(&mesh, &settings.node_name, rules)).await;
    report(&pods);
    let stale = pods.remove_stale().context("removing stale capture state")?;
    tracing::info!(?stale, enrolled = pods.enrolled_count(), "initial pod set reconciled");
    // The plugin's socket from now on: the node captures what it is handed.
    let cni_stop = shutdown.child_token();
    if let Some((server, bound, install)) = cni {
        tokio::spawn(server.serve(bound, cni_stop.clone()));
        tokio::spawn(crate::cni::install::keep_installed(install, cni_stop.clone()));
    }
    {
        let (proxy, identities, state) = (proxy.clone(), identities.clone(), state.clone());
        let xds_status = xds_status.clone();
        let pod_source_status = pod_source_status.clone();
        admin.set_live_dump(Arc::new(move || {
            let xds = xds_status.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone());
            let mesh = state.read().dump();
            // ztunnel's shape at the top (what `istioctl ztunnel-config` reads); ambit's own
            // detail under the other keys.
            let (workloads, services, policies) = mesh.ztunnel();
            serde_json::json!({
                "workloads": workloads,
                "services": services,
                "policies": policies,
                "certificates": identities.dump(),
                "hbone_pools": proxy.hbone_pools(),
                "active_connections": proxy.active_connections(),
                "mesh": mesh,
                "xds": xds,
                "pod_source": pod_source_status.as_ref().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            })
        }));
    }
    let view = View {
        synced: &synced,
        admin: &admin,
        metrics: &metrics,
        settings: &settings,
        adoption: &adoption,
        proxy: &proxy,
        identities: &identities,
    };
    view.publish(&pods);

    // --takeover: the previous proxy drains once this one is ready.
    let mut predecessor = pods.capture().predecessor();
    let mut retry = tokio::time::interval(RETRY);
    // Certificates arrive and rotate on their own: refresh the dump and readiness.
    let mut refresh = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = meshes.changed() => {
                if changed.is_err() {
                    break;
                }
                let mesh = meshes.borrow_and_update().clone();
                if settings.xds.is_none() {
                    apply_mesh(&state, &mesh, &settings.origin());
                }
                pods.reconcile(&enroll::enrolled_pods(&mesh, &settings.node_name, rules)).await;
                report(&pods);
            }
            _ = refresh.tick() => pods.tidy(),
            _ = retry.tick(), if pods.has_failures() => {
                let desired = enroll::enrolled_pods(&meshes.borrow(), &settings.node_name, rules);
                pods.reconcile(&desired).await;
                report(&pods);
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: draining"); break; }
            () = shutdown.cancelled() => break,
        }
        if view.publish(&pods) {
            if let Some(pid) = predecessor.take() {
                let root = pods.capture().pin_dir().to_path_buf();
                tokio::task::spawn_blocking(move || match crate::capture::handover::succeed(&root, pid) {
                    // Held until this process exits, as the lock of a proxy that started alone.
                    Ok(lock) => std::mem::forget(lock),
                    Err(e) => {
                        tracing::error!(predecessor = pid, error = %e, "taking over from the previous proxy")
                    }
                });
            }
        }
    }

    admin.set_ready(Some("draining".into()));
    // New pods' ADDs fail (closed) until the next proxy answers; the plugin stays chained.
    cni_stop.cancel();
    // Listeners close now: new connects of enrolled pods are refused (fail closed) or let
    // through (fail open) by the still-attached programs until the next proxy starts.
    pods.stop_accepting().await;
    let open = proxy.active_connections();
    let left = proxy.drain(settings.drain_timeout).await;
    tracing::info!(
        open_at_start = open,
        left_after_deadline = left,
        "drained; exiting (capture state stays pinned)"
    );
    shutdown.cancel();
    Ok(())
}

/// The CNI plugin installed and its socket bound, when `--cni` is on: the server, its bound
/// socket and what keeps the plugin installed. Refused with the reason (a missing CNI
/// directory, an unwritable socket) before any pod is touched.
fn cni_server(
    settings: &NodeSettings,
    source: &enroll::Source,
) -> anyhow::Result<Option<(Arc<CniServer>, crate::cni::server::Bound, CniSettings)>> {
    let (Some(cni), enroll::Source::Kubernetes(k)) = (&settings.cni, source) else { return Ok(None) };
    match crate::cni::install::install(cni).context("installing the ambit-cni plugin (--cni)")? {
        Chained::Inserted(file) | Chained::Unchanged(file) => {
            tracing::info!(file = %file.display(), bin_dir = %cni.bin_dir.display(), "ambit-cni chained into the node's CNI configuration")
        }
        Chained::NoPrimary => tracing::warn!(
            conf_dir = %cni.conf_dir.display(),
            "no CNI network configuration yet: ambit-cni is chained once the primary CNI writes one"
        ),
    }
    let bound = crate::cni::server::bind(&cni.socket).context("the CNI plugin's socket (--cni-socket)")?;
    let server = CniServer {
        client: k.client.clone(),
        node: settings.node_name.clone(),
        rules: settings.enrolment.clone(),
        sandboxes: k.sandboxes.clone(),
        report: k.enrolled.subscribe(),
        // The plugin's own deadline is the same: answer a little before it gives up.
        timeout: cni.timeout.saturating_sub(Duration::from_secs(1)).max(Duration::from_secs(1)),
    };
    Ok(Some((Arc::new(server), bound, cni.clone())))
}

/// A node proxy holds two or three sockets per proxied connection: the soft limit on open
/// files (often 1024) would cap it at a few hundred. Raised to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "open files limit raised"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "reading the open files limit"),
    }
}

/// Whether an error comes down to EPERM/EACCES somewhere in its chain.
fn lacks_privilege(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES)) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Offline mode: the mesh file's workloads and services, through the same translation the
/// control plane serves.
fn apply_mesh(state: &StateStore, mesh: &crate::meshfile::Mesh, origin: &Origin<'_>) {
    for (name, error) in state.replace_all(&translate_in(mesh, origin)) {
        tracing::error!(resource = %name, %error, "mesh file resource refused");
    }
}

/// A mesh CA makes identities (and mTLS) available; without one, none.
fn identities(settings: &NodeSettings) -> anyhow::Result<IdentityManager> {
    let Some(ca) = &settings.ca else {
        tracing::warn!("no mesh CA configured (--ca-address): captured traffic is relayed without mTLS");
        return Ok(IdentityManager::new(None, settings.identity.clone(), Vec::new()));
    };
    let roots =
        std::fs::read(&ca.root_cert).with_context(|| format!("reading {}", ca.root_cert.display()))?;
    let roots: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(&roots)
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not PEM certificates", ca.root_cert.display()))?;
    let client = CaClient::new(ca).context("setting up the CA client")?;
    Ok(IdentityManager::new(Some(Arc::new(client)), settings.identity.clone(), roots))
}

/// What the admin endpoints show; refreshed after every change.
struct View<'a> {
    synced: &'a tokio::sync::watch::Receiver<bool>,
    admin: &'a AdminState,
    metrics: &'a Metrics,
    settings: &'a NodeSettings,
    adoption: &'a crate::capture::Adoption,
    proxy: &'a Proxy,
    identities: &'a IdentityManager,
}

impl View<'_> {
    /// Publishes the dump and readiness; whether the proxy is ready.
    fn publish(&self, pods: &PodManager) -> bool {
        let (enrolled, failed) = pods.dump();
        self.metrics.enrolled_pods.set(enrolled.len() as i64);
        let maps = pods.capture().maps();
        let listeners = maps.listeners().map(|l| l.len()).unwrap_or(0);
        self.admin.set_dump(serde_json::json!({
            "settings": self.settings,
            "capture": {
                "pin_dir": pods.capture().pin_dir(),
                "adoption": self.adoption,
                "registered_listeners": listeners,
                "kubelet_probes_open": maps.probes_count(),
                "pending_connects": maps.pending_count(),
                "unaccepted_original_destinations": self.proxy.pending_records(),
            },
            "pods": enrolled,
            "failed_pods": failed,
        }));
        // Ready once the programs are attached (we are past that) and every identity on the
        // node has a valid certificate.
        let not_ready = if !*self.synced.borrow() {
            Some("waiting for the first xDS sync".to_string())
        } else if !self.identities.all_ready() {
            Some("waiting for workload certificates".to_string())
        } else {
            None
        };
        let ready = not_ready.is_none();
        self.admin.set_ready(not_ready);
        ready
    }
}
