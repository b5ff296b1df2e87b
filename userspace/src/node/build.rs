//! Building a node: settings checked and logged, the pod source, the kernel, the admin
//! endpoints, capture, identities, tracing, the proxy, xDS, the CNI server and the first
//! reconcile, in that order; each step refuses with its reason before the next touches more.

use std::{sync::Arc, time::Duration};

use rustls_pki_types::pem::PemObject;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

use super::{view, Node};
use crate::{
    admin::{self, AdminState, Phase, Routes},
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

/// The node, ready to run; `None` when asked to stop before the first pod list arrived.
pub(super) async fn build(settings: NodeSettings) -> anyhow::Result<Option<Node>> {
    announce(&settings);
    raise_fd_limit();
    crate::profiling::heap::set_rate(settings.heap_sample_bytes);
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
        Some(t)
    } else {
        None
    };
    let kernel = view::Kernel { config: kernel_config, tracer: tracer.clone() };
    let proxy = proxy(&settings, Arc::new(orig), &metrics, &identities, &state, pod_registry, tracer);
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
    if settings.dns.capture {
        let serving = crate::inpod::dns::DnsServing {
            settings: settings.dns.clone(),
            state: state.clone(),
            sockets: Arc::new(crate::os::socket::InPodSockets),
            mark: settings.proxy_mark,
            metrics: crate::dns::metrics::DnsMetrics::new(),
        };
        for c in serving.metrics.collectors() {
            metrics.register(c);
        }
        pods.serve_dns(serving);
    }

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
        admin.set_phase(Phase::Starting("waiting for the first pod list from the Kubernetes API".into()));
        tracing::info!("waiting for the first pod list from the Kubernetes API");
        tokio::select! {
            () = source.first_sync() => {}
            () = shutdown.cancelled() => return Ok(None),
            _ = sigterm.recv() => { tracing::info!("SIGTERM before the first pod list: exiting"); return Ok(None) }
            _ = sigint.recv() => { tracing::info!("SIGINT before the first pod list: exiting"); return Ok(None) }
        }
    }
    let pod_source_status = source.kube_status();
    let report_enrolled = source.enrolled_reporter();
    let cni = cni_server(&settings, &source)?;
    metrics.register_health(xds_status.clone(), identities.clone());
    let mesh = source.meshes().borrow_and_update().clone();
    if settings.xds.is_none() {
        apply_mesh(&state, &mesh, &settings.origin());
    }
    let rules = &settings.enrolment;
    pods.reconcile(&enroll::enrolled_pods(&mesh, &settings.node_name, rules)).await;
    super::report(report_enrolled.as_deref(), &metrics, &pods);
    let stale = pods.remove_stale().context("removing stale capture state")?;
    tracing::info!(?stale, enrolled = pods.enrolled_count(), "initial pod set reconciled");
    // The plugin's socket from now on: the node captures what it is handed.
    let cni_stop = shutdown.child_token();
    if let Some((server, bound, install)) = cni {
        tokio::spawn(server.serve(bound, cni_stop.clone()));
        tokio::spawn(crate::cni::install::keep_installed(install, cni_stop.clone()));
    }
    let (pods_tx, dump_requests) = tokio::sync::mpsc::channel(8);
    let view = Arc::new(view::NodeView {
        settings,
        adoption,
        proxy,
        identities,
        state: state.clone(),
        synced,
        xds_status,
        pod_source_status,
        pods: pods_tx,
        kernel,
    });
    admin.set_view(view.clone());
    admin.set_phase(Phase::Serving);
    let node = Node {
        view,
        admin,
        metrics,
        shutdown,
        sigterm,
        sigint,
        state,
        pods,
        source,
        report_enrolled,
        cni_stop,
        dump_requests,
    };
    Ok(Some(node))
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
pub(super) fn apply_mesh(state: &StateStore, mesh: &crate::meshfile::Mesh, origin: &Origin<'_>) {
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

/// The start-up summary: one short line (every setting is in the debug log and in
/// /config_dump), and where the kubelet's health probes come from.
fn announce(settings: &NodeSettings) {
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
        dns_capture = settings.dns.capture,
        "starting ambit node"
    );
    tracing::debug!(config = %serde_json::to_string(settings).unwrap_or_default(), "ambit node settings");
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
}

/// The proxy over the kernel's original destinations, making its sockets in the pods.
fn proxy(
    settings: &NodeSettings,
    orig: Arc<dyn crate::capture::OrigDstSource>,
    metrics: &Arc<Metrics>,
    identities: &IdentityManager,
    state: &Arc<StateStore>,
    pods: Arc<crate::pod::PodRegistry>,
    tracer: Option<Tracer>,
) -> Proxy {
    Proxy::new(
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
            orig,
            sockets: Arc::new(crate::os::socket::InPodSockets),
            metrics: metrics.clone(),
            identities: identities.clone(),
            state: state.clone(),
            pods,
            tracer,
            lookup: Arc::new(crate::dns::lookup::HostLookup::new(
                &settings.dns.proc_dir,
                settings.dns.upstream_timeout,
            )),
        },
    )
}
