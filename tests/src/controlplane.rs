//! Running `ambit controlplane` (the mesh CA) in its own namespace of the bed, with a bearer
//! token per node.

use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    bed::{Bed, Node},
    exec::{node_command, workspace_bin, Proc},
    netns,
};

pub const CA_PORT: u16 = 15012;

/// A random token (hex), from the kernel's RNG.
fn token() -> String {
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).expect("reading /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub struct ControlPlane<'b> {
    pub proc: Proc<'b>,
    pub node: Node,
    /// The mesh root (created by the CA in its state directory on first start).
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
    pub state_dir: PathBuf,
    pub address: String,
    tokens_dir: PathBuf,
    args: Vec<String>,
    bed: &'b Bed,
    starts: u32,
}

impl<'b> ControlPlane<'b> {
    /// Starts the CA in `node`'s namespace (listening on its bridge address) for the mesh file
    /// `mesh`, with a token for each of `nodes`; waits until it serves.
    pub fn start(
        bed: &'b Bed,
        node: &Node,
        mesh: &Path,
        nodes: &[&Node],
        extra: &[&str],
    ) -> ControlPlane<'b> {
        let tokens_dir = bed.dir().join("tokens");
        std::fs::create_dir_all(&tokens_dir).expect("tokens dir");
        let mut map = String::new();
        for n in nodes {
            let t = token();
            map.push_str(&format!("{}: {t}\n", n.name));
            std::fs::write(tokens_dir.join(&n.name), &t).expect("token file");
        }
        std::fs::write(tokens_dir.join("tokens.yaml"), map).expect("tokens file");
        let state_dir = bed.dir().join("cp-state");
        let listen = SocketAddr::new(node.bridge_ipv4(), CA_PORT);
        let mut args: Vec<String> = [
            "controlplane",
            "--mesh-file",
            &mesh.display().to_string(),
            "--tokens-file",
            &tokens_dir.join("tokens.yaml").display().to_string(),
            "--state-dir",
            &state_dir.display().to_string(),
            "--listen",
            &listen.to_string(),
            "--readiness-addr",
            "127.0.0.1:15021",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut cp = ControlPlane {
            proc: spawn(bed, node, &args, 1),
            node: node.clone(),
            root_cert: state_dir.join("root-cert.pem"),
            root_key: state_dir.join("root-key.pem"),
            state_dir,
            address: format!("https://{listen}"),
            tokens_dir,
            args,
            bed,
            starts: 1,
        };
        cp.wait_ready(Duration::from_secs(30));
        cp
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.proc.exited() {
                panic!("controlplane exited ({status}) before ready:\n{}", self.proc.output());
            }
            if let Ok((200, _)) = netns::http(
                &self.node.netns_path(),
                "GET",
                "127.0.0.1:15021".parse().expect("addr"),
                "/healthz/ready",
            ) {
                return;
            }
            if Instant::now() > deadline {
                panic!("controlplane not ready within {timeout:?}:\n{}", self.proc.output());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `ambit node` on `node` with the mesh file `mesh`, pointed at this control plane,
    /// with `extra` flags; waits until it is ready.
    pub fn start_node(&self, node: &Node, mesh: &Path, extra: &[&str]) -> crate::Ambit<'b> {
        let mut args = self.node_args(node);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        crate::Ambit::start(self.bed, node, mesh, &args)
    }

    /// The `ambit node` flags that point `node` at this control plane (CA and xDS).
    pub fn node_args(&self, node: &Node) -> Vec<String> {
        vec![
            "--ca-address".into(),
            self.address.clone(),
            "--xds-address".into(),
            self.address.clone(),
            "--root-cert".into(),
            self.root_cert.display().to_string(),
            "--token-file".into(),
            self.token_file(&node.name).display().to_string(),
        ]
    }

    /// The control plane's config dump (what it serves, to whom).
    pub fn config_dump(&self) -> serde_json::Value {
        let (status, body) = netns::http(
            &self.node.netns_path(),
            "GET",
            "127.0.0.1:15000".parse().expect("addr"),
            "/config_dump",
        )
        .expect("reading the control plane's config dump");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    }

    pub fn token_file(&self, node: &str) -> PathBuf {
        self.tokens_dir.join(node)
    }

    pub fn stop(&mut self) {
        self.proc.kill();
    }

    /// Starts it again (same state directory: same root) and waits until it serves.
    pub fn restart(&mut self) {
        self.proc.kill();
        self.starts += 1;
        self.proc = spawn(self.bed, &self.node, &self.args, self.starts);
        self.wait_ready(Duration::from_secs(30));
    }

    pub fn log(&self) -> String {
        self.proc.output()
    }
}

fn spawn<'b>(bed: &'b Bed, node: &Node, args: &[String], n: u32) -> Proc<'b> {
    let bin = workspace_bin("ambit");
    let mut argv: Vec<&str> = vec![bin.to_str().expect("utf-8 path")];
    argv.extend(args.iter().map(String::as_str));
    let mut cmd = node_command(node, &argv);
    cmd.env("RUST_BACKTRACE", "0");
    Proc::spawn(bed, &format!("controlplane-{n}"), cmd)
}
