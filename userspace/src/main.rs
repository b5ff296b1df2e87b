//! The `ambit` command.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use ambit::{config, node, profiling::heap::Sampling, telemetry};

/// glibc's allocator, sampled for `/debug/pprof/heap` (off until `ambit node` sets a rate).
#[global_allocator]
static ALLOCATOR: Sampling<std::alloc::System> = Sampling(std::alloc::System);

#[derive(Parser)]
#[command(name = "ambit", version, about = "Sidecarless, eBPF-accelerated service-mesh node proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node proxy: capture enrolled pods' traffic with eBPF and relay it.
    Node(Box<config::NodeArgs>),
    /// Run the embedded control plane: the mesh CA (Istio's certificate API) for node proxies.
    Controlplane(Box<ambit::controlplane::ControlPlaneArgs>),
    /// Watch the node proxy's kernel-level trace: TCP events of enrolled pods (connect,
    /// established, state changes, RTT, retransmits, close, reset), attributed to workloads
    /// and peers, live. Reads the admin endpoint of `ambit node` on this node.
    Trace(ambit::trace::TraceArgs),
    /// Check whether this kernel can run ambit: every program type, map type, helper and
    /// attach type it needs, probed for real. Exits 1 when something required is missing.
    Probe {
        #[arg(long, env = "AMBIT_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// cgroup v2 directory (default: the cgroup v2 mount).
        #[arg(long, env = "AMBIT_CGROUP")]
        cgroup: Option<PathBuf>,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove everything an instance pinned (programs, links, maps): capture stops for every
    /// pod it had enrolled. Run it when removing ambit from a node, not between restarts.
    /// Also takes the `ambit-cni` plugin out of the node's CNI configuration (restoring the
    /// primary CNI's file) and removes its binary.
    Uninstall {
        #[arg(long, env = "AMBIT_BPFFS", default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        #[arg(long, env = "AMBIT_INSTANCE", default_value = "default")]
        instance: String,
        #[arg(long, env = "AMBIT_CNI_CONF_DIR", default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
        #[arg(long, env = "AMBIT_CNI_BIN_DIR", default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    // Installed as the CNI plugin, the same binary speaks CNI (the runtime runs it so).
    let argv0 = std::env::args_os().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name().is_some_and(|n| n == ambit::cni::BINARY_NAME) {
        return ambit::cni::plugin::main();
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // `{:#}` prints the whole context chain on one line: what failed and why.
            eprintln!("ambit: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        b.worker_threads(n);
    }
    b.enable_all().thread_name("ambit-worker").build().context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    // One TLS provider for every rustls user in the process.
    ambit::crypto::install_default_provider();
    match cli.command {
        Command::Controlplane(args) => {
            telemetry::init(&args.log_level, args.log_format)?;
            runtime(None)?.block_on(ambit::controlplane::run(*args))
        }
        Command::Node(args) => {
            let format = args.log_format;
            let settings = config::NodeSettings::resolve(*args)?;
            telemetry::init(&settings.log_filter(), format)?;
            ambit::proxy::set_access_log_format(settings.access_log_format, settings.hbone_port);
            runtime(Some(settings.worker_threads))?.block_on(node::run(settings))
        }
        Command::Trace(args) => ambit::trace::run(&args),
        Command::Probe { bpffs, cgroup, json } => {
            telemetry::init("warn", telemetry::LogFormat::Text)?;
            let cgroup = match cgroup {
                Some(c) => c,
                None => config::cgroup2_mount()?,
            };
            let report = ambit::probe::run(&bpffs, &cgroup);
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
            match report.refusal() {
                None => Ok(()),
                Some(refusal) => Err(anyhow::anyhow!(refusal)),
            }
        }
        Command::Uninstall { bpffs, instance, cni_conf_dir, cni_bin_dir } => {
            telemetry::init("info", telemetry::LogFormat::Text)?;
            // The plugin first: from now on new pods start as they would without ambit.
            let cni = ambit::cni::install::uninstall(&cni_conf_dir, &cni_bin_dir)
                .context("taking ambit-cni out of the node's CNI configuration")?;
            tracing::info!(restored = ?cni.restored, edited = ?cni.edited, removed = ?cni.removed, "ambit-cni uninstalled");
            let removed = ambit::capture::uninstall(&bpffs, &instance).with_context(|| {
                format!("removing pinned state of instance {instance:?} under {}", bpffs.display())
            })?;
            tracing::info!(removed = removed.len(), "uninstalled");
            Ok(())
        }
    }
}
