//! Running real programs inside pods and nodes.
//!
//! A pod process enters the pod's cgroup (so the proxy's cgroup programs see it) and then
//! only the pod's network namespace, with `nsenter --net`: unlike `ip netns exec` this keeps
//! the host's /sys, so cgroupfs and bpffs stay visible.

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::bed::{Bed, Node, Pod};

/// A command that joins `cgroup`, then enters only the network namespace at `netns`.
pub fn in_cgroup_and_netns(cgroup: &Path, netns: &Path, argv: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(r#"cg=$1; ns=$2; shift 2; echo $$ > "$cg/cgroup.procs" && exec nsenter --net="$ns" -- "$@""#)
        .arg("sh")
        .arg(cgroup)
        .arg(netns)
        .args(argv);
    c
}

/// A command that runs inside `pod`: joins its cgroup, then its netns; with the pod's own
/// resolv.conf when it has one.
pub fn pod_command(pod: &Pod, argv: &[&str]) -> Command {
    in_cgroup_and_netns(&pod.cgroup, &pod.netns_path(), &with_resolv_conf(pod, argv))
}

/// `argv` run in a mount namespace of its own where the pod's resolv.conf is bind-mounted
/// over /etc/resolv.conf (propagation private: the host's mounts are not touched), as a
/// container runtime gives each pod its file. Unchanged when the pod has none.
pub fn with_resolv_conf<'a>(pod: &'a Pod, argv: &[&'a str]) -> Vec<&'a str> {
    let Some(file) = pod.resolv_conf.as_deref().and_then(Path::to_str) else { return argv.to_vec() };
    let mut v = vec![
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#,
        file,
    ];
    v.extend_from_slice(argv);
    v
}

/// A command that runs on `node`: in the node's netns and cgroup (like the node proxy, or a
/// host-network pod).
pub fn node_command(node: &Node, argv: &[&str]) -> Command {
    in_cgroup_and_netns(&node.cgroup, &node.netns_path(), argv)
}

/// A command that runs as the node's kubelet: in the node's netns and the kubelet's cgroup,
/// where its connections to enrolled pods count as health probes.
pub fn kubelet_command(node: &Node, argv: &[&str]) -> Command {
    in_cgroup_and_netns(&node.kubelet_cgroup, &node.netns_path(), argv)
}

/// Runs a command to completion with a deadline; kills it if the deadline passes.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _partial_is_fine = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _partial_is_fine = stderr.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() > deadline {
            let _already_dead_is_fine = child.kill();
            let _ = child.wait()?;
            bail!("{cmd:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// A long-running process of the bed, killed (by pid) when dropped or at teardown. Its
/// output goes to `<run dir>/<name>.log`, which the bed prints when a test fails.
pub struct Proc<'b> {
    bed: &'b Bed,
    child: Option<Child>,
    pub name: String,
    pub log: PathBuf,
}

impl<'b> Proc<'b> {
    pub fn spawn(bed: &'b Bed, name: &str, mut cmd: Command) -> Proc<'b> {
        let log = bed.dir().join(format!("{name}.log"));
        let file = File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let err = file.try_clone().expect("dup log fd");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        bed.track_pid(child.id());
        Proc { bed, child: Some(child), name: name.to_string(), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends a signal and waits up to `timeout` for the exit.
    pub fn signal(&mut self, sig: nix::sys::signal::Signal, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, sig).with_context(|| format!("signalling {}", self.name))?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                self.bed.untrack_pid(self.pid());
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?} after {sig}", self.name);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _already_dead_is_fine = c.kill();
            let _reaped = c.wait();
            self.bed.untrack_pid(c.id());
        }
    }

    /// Waits for a line containing `needle` in the log, up to `timeout`.
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(needle) {
                return Ok(());
            }
            if let Some(s) = self.exited() {
                bail!("{} exited ({s}) before printing {needle:?}:\n{}", self.name, self.output());
            }
            if Instant::now() > deadline {
                bail!("{} did not print {needle:?} within {timeout:?}:\n{}", self.name, self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc<'_> {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Path of a binary built by this workspace (the ambit binary, the bed's helpers): next to
/// the test executable's `deps/` directory, or `AMBIT_BIN_DIR`.
pub fn workspace_bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("AMBIT_BIN_DIR") {
        return Path::new(&dir).join(name);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe has a directory").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(p.exists(), "{} is not built; `cargo xtask test` builds it (or set AMBIT_BIN_DIR)", p.display());
    p
}

/// A long-lived connection from a pod, driven line by line (`netprobe chat` under the hood):
/// each [`Chat::say`] sends a line and waits for the echo.
pub struct Chat<'b> {
    bed: &'b Bed,
    child: Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    pub name: String,
}

impl<'b> Chat<'b> {
    /// Connects from `pod` to `addr` (an echo server) and waits for the connection.
    pub fn open(bed: &'b Bed, pod: &Pod, addr: &str) -> anyhow::Result<Chat<'b>> {
        let bin = workspace_bin("netprobe");
        let name = format!("chat-{}-{addr}", pod.name);
        let mut child = pod_command(pod, &[bin.to_str().expect("utf-8"), "chat", addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        bed.track_pid(child.id());
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let chat = Chat { bed, child, stdin, lines: rx, name };
        match chat.lines.recv_timeout(Duration::from_secs(10)) {
            Ok(l) if l == "connected" => Ok(chat),
            other => bail!("{}: no connection ({other:?})", chat.name),
        }
    }

    /// Sends `line`, returns what came back.
    pub fn say(&mut self, line: &str) -> anyhow::Result<String> {
        use std::io::Write;
        writeln!(self.stdin, "{line}").with_context(|| format!("{}: writing", self.name))?;
        self.stdin.flush()?;
        self.lines
            .recv_timeout(Duration::from_secs(10))
            .with_context(|| format!("{}: no echo for {line:?} (connection broken?)", self.name))
    }
}

impl Drop for Chat<'_> {
    fn drop(&mut self) {
        let _already_dead_is_fine = self.child.kill();
        let _reaped = self.child.wait();
        self.bed.untrack_pid(self.child.id());
    }
}
