//! What `ambit-cni` (the plugin the container runtime runs) and `ambit node` say to each other
//! over the node's unix socket: one JSON request line, one JSON response line.

use std::{
    io::{BufRead, BufReader, Write},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// The node's socket by default.
pub const DEFAULT_SOCKET: &str = "/var/run/ambit/cni.sock";
/// The largest request or response line accepted.
pub const MAX_LINE: usize = 64 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    /// Capture the pod before it starts: answered once capture is attached.
    Add,
    /// The pod's sandbox is going away.
    Del,
    /// Is the pod captured as it should be?
    Check,
    /// Is the node ready to capture pods?
    Status,
}

/// A pod as the runtime describes it in a CNI call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    #[serde(default)]
    pub container_id: String,
    /// The pod's network namespace, as a path the node can open.
    #[serde(default)]
    pub netns: PathBuf,
    #[serde(default)]
    pub ifname: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it.
    #[serde(default)]
    pub uid: String,
    /// The addresses the plugins before this one gave the pod.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

/// What the node did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Captured: its traffic goes through the proxy from the first packet.
    Enrolled,
    /// Not to be captured (the reason says why): the pod starts uncaptured, as it should.
    Skipped,
    /// Done (DEL, STATUS, a CHECK that holds).
    Ok,
    /// Refused: the pod must not start (the reason says why).
    Failed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub outcome: Outcome,
    #[serde(default)]
    pub reason: String,
}

impl Response {
    pub fn new(outcome: Outcome, reason: impl Into<String>) -> Response {
        Response { outcome, reason: reason.into() }
    }
}

/// Why a call to the node did not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("ambit node is not reachable at {socket}: {source}")]
    Unreachable { socket: PathBuf, source: std::io::Error },
    #[error("ambit node at {socket} did not answer within {timeout:?}: {source}")]
    NoAnswer { socket: PathBuf, timeout: Duration, source: std::io::Error },
    #[error("ambit node at {socket} answered something that is not a response: {detail}")]
    Garbled { socket: PathBuf, detail: String },
}

/// Sends one request to the node and waits (at most `timeout`) for its answer.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Response, CallError> {
    let unreachable = |source| CallError::Unreachable { socket: socket.to_path_buf(), source };
    let no_answer = |source| CallError::NoAnswer { socket: socket.to_path_buf(), timeout, source };
    let mut stream = UnixStream::connect(socket).map_err(unreachable)?;
    stream.set_write_timeout(Some(timeout)).map_err(unreachable)?;
    stream.set_read_timeout(Some(timeout)).map_err(unreachable)?;
    let mut line = serde_json::to_vec(request).expect("a request serialises");
    line.push(b'\n');
    stream.write_all(&line).map_err(no_answer)?;
    let mut answer = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_LINE as u64)).read_line(&mut answer).map_err(no_answer)?;
    serde_json::from_str(&answer)
        .map_err(|e| CallError::Garbled { socket: socket.to_path_buf(), detail: format!("{e}: {answer:?}") })
}
