//! `ambit-cni`: the CNI plugin the container runtime runs, chained after the cluster's own
//! plugins (CNI spec 1.0 and 1.1). The same `ambit` binary, run under the name `ambit-cni`.
//!
//! - ADD hands the pod's network namespace, identity and addresses to the local `ambit node`
//!   and waits until capture is attached, so the pod's first packet is captured. If the node
//!   cannot be reached, the pod is looked up in the API (with the kubeconfig in the plugin's
//!   configuration): a pod that should be captured fails its ADD (the kubelet retries; it
//!   never runs uncaptured), any other pod passes. `failOpen: true` lets every pod pass.
//! - DEL tells the node, and always succeeds. CHECK asks the node. STATUS (1.1) is ready
//!   when the node answers. GC (1.1) has nothing to collect: the node owns its state.
//! - Errors are the spec's JSON on stdout with its codes (1: incompatible version, 4: bad
//!   environment, 6: undecodable configuration, 7: invalid configuration, 11: try again
//!   later, 50: not available).

use std::{collections::BTreeMap, io::Read, net::IpAddr, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::{json, Value};

use super::protocol::{self, Command, Outcome, Request};

/// The spec versions this plugin speaks.
pub const SUPPORTED: [&str; 2] = ["1.0.0", "1.1.0"];

/// The plugin's part of the network configuration.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Config {
    cni_version: Option<String>,
    #[serde(default)]
    prev_result: Option<Value>,
    #[serde(default = "default_socket")]
    socket: PathBuf,
    /// For looking the pod up when the node is not reachable.
    #[serde(default)]
    kubeconfig: Option<PathBuf>,
    #[serde(default)]
    fail_open: bool,
    #[serde(default = "default_timeout")]
    timeout_seconds: u64,
    /// The node's enrolment labels, for deciding without it.
    #[serde(default)]
    enrol_label: Option<String>,
    #[serde(default)]
    opt_out_label: Option<String>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(protocol::DEFAULT_SOCKET)
}

fn default_timeout() -> u64 {
    30
}

/// A CNI error: the spec's code, message and details.
#[derive(Debug)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

fn err(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError { code, msg: msg.into(), details: details.into() }
}

/// What the plugin prints on success (nothing for DEL and GC).
pub type Output = Option<Value>;

/// Runs one CNI call: `env` is the process environment (the `CNI_*` variables), `stdin` the
/// network configuration. Returns the output on success, or the error to report.
pub fn handle(env: &BTreeMap<String, String>, stdin: &[u8]) -> Result<Output, (String, CniError)> {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    // VERSION may come with a minimal configuration; answer it before anything else.
    let cfg: Result<Config, _> = serde_json::from_slice(stdin);
    let version = cfg.as_ref().ok().and_then(|c| c.cni_version.clone()).unwrap_or_else(|| "1.1.0".into());
    let fail = |e: CniError| (version.clone(), e);
    if command == "VERSION" {
        return Ok(Some(json!({ "cniVersion": "1.1.0", "supportedVersions": SUPPORTED })));
    }
    let cfg = cfg.map_err(|e| fail(err(6, "failed to decode the network configuration", e.to_string())))?;
    match cfg.cni_version.as_deref() {
        Some(v) if SUPPORTED.contains(&v) => {}
        // A DEL is never refused for its version: failing it would stop the runtime from
        // tearing down the rest of the chain (the primary plugin's addresses would leak),
        // and what ambit-cni needs from it (the socket, the pod's name) reads the same.
        _ if command == "DEL" => {}
        Some(v) => {
            return Err(fail(err(
                1,
                format!("incompatible CNI version {v}"),
                format!("ambit-cni supports {}", SUPPORTED.join(", ")),
            )))
        }
        None => return Err(fail(err(7, "invalid network configuration", "cniVersion is missing"))),
    }
    let need = |k: &str| {
        env.get(k)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or_else(|| fail(err(4, "invalid necessary environment variables", format!("{k} is not set"))))
    };
    let timeout = Duration::from_secs(cfg.timeout_seconds.clamp(1, 600));
    match command {
        "ADD" | "CHECK" => {
            let prev = cfg.prev_result.clone().ok_or_else(|| {
                fail(err(
                    7,
                    "invalid network configuration",
                    "ambit-cni must be chained after the plugin that creates the pod's interface: there is no prevResult",
                ))
            })?;
            let request = Request {
                command: if command == "ADD" { Command::Add } else { Command::Check },
                container_id: need("CNI_CONTAINERID")?,
                netns: PathBuf::from(need("CNI_NETNS")?),
                ifname: need("CNI_IFNAME")?,
                ips: ips_of(&prev),
                ..pod_args(env)
            };
            if request.name.is_empty() {
                // Not a Kubernetes pod: nothing for a mesh to capture.
                return Ok(Some(with_version(prev, &version)));
            }
            add_or_check(&cfg, &request, timeout).map_err(fail)?;
            Ok(if command == "ADD" { Some(with_version(prev, &version)) } else { None })
        }
        "DEL" => {
            let request = Request {
                command: Command::Del,
                netns: env.get("CNI_NETNS").cloned().unwrap_or_default().into(),
                ..pod_args(env)
            };
            // DEL always succeeds: the node removes what the pod leaves behind by itself too.
            if let Err(e) = protocol::call(&cfg.socket, &request, timeout.min(Duration::from_secs(5))) {
                eprintln!("ambit-cni: DEL of {}/{}: {e}", request.namespace, request.name);
            }
            Ok(None)
        }
        "STATUS" => {
            let request = Request { command: Command::Status, ..pod_args(env) };
            protocol::call(&cfg.socket, &request, timeout.min(Duration::from_secs(5)))
                .map(|_| None)
                .map_err(|e| fail(err(50, "the plugin is not available", e.to_string())))
        }
        "GC" => Ok(None),
        "" => Err(fail(err(4, "invalid necessary environment variables", "CNI_COMMAND is not set"))),
        other => Err(fail(err(
            4,
            "invalid necessary environment variables",
            format!("unknown CNI_COMMAND {other}"),
        ))),
    }
}

/// ADD or CHECK through the node; when it cannot be reached, decided from the API.
fn add_or_check(cfg: &Config, request: &Request, timeout: Duration) -> Result<(), CniError> {
    let pod = format!("{}/{}", request.namespace, request.name);
    match protocol::call(&cfg.socket, request, timeout) {
        Ok(r) => match r.outcome {
            Outcome::Enrolled | Outcome::Skipped | Outcome::Ok => Ok(()),
            Outcome::Failed => Err(err(11, format!("ambit node refused to capture pod {pod}"), r.reason)),
        },
        Err(e) if cfg.fail_open => {
            eprintln!("ambit-cni: {e}; failOpen: pod {pod} starts uncaptured");
            Ok(())
        }
        Err(e) => match should_capture(cfg, request) {
            Ok(false) => Ok(()),
            Ok(true) => Err(err(
                11,
                format!("pod {pod} must be captured before it starts, and ambit node cannot capture it now (fail closed; the kubelet retries)"),
                e.to_string(),
            )),
            Err(lookup) => Err(err(
                11,
                format!("cannot tell whether pod {pod} must be captured, and ambit node cannot be asked (fail closed; the kubelet retries)"),
                format!("{e}; {lookup}"),
            )),
        },
    }
}

/// Why the plugin cannot tell by itself whether a pod is to be captured.
#[derive(Debug, thiserror::Error)]
enum CannotTell {
    #[error("no kubeconfig in the plugin's configuration to look the pod up with")]
    NoKubeconfig,
    #[error("{field}: {source}")]
    Label {
        field: &'static str,
        #[source]
        source: crate::meshfile::BadValue,
    },
    #[error("starting the lookup's runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Lookup(#[from] crate::enroll::kube::lookup::LookupError),
    #[error("the API did not answer within 10s")]
    Timeout,
}

/// Whether the pod is one the node would capture, from the API (the node being away).
fn should_capture(cfg: &Config, request: &Request) -> Result<bool, CannotTell> {
    let Some(kubeconfig) = &cfg.kubeconfig else {
        return Err(CannotTell::NoKubeconfig);
    };
    let mut rules = crate::meshfile::Enrolment::default();
    for (given, field, into) in [
        (&cfg.enrol_label, "enrolLabel", &mut rules.enrol),
        (&cfg.opt_out_label, "optOutLabel", &mut rules.opt_out),
    ] {
        if let Some(l) = given {
            *into = l.parse().map_err(|source| CannotTell::Label { field, source })?;
        }
    }
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(CannotTell::Runtime)?;
    let lookup =
        crate::enroll::kube::lookup::should_capture(kubeconfig, &rules, &request.namespace, &request.name);
    // The timer needs the runtime's context, so it is built inside it.
    match rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), lookup).await }) {
        Ok(Ok(decision)) => Ok(decision.is_ok()),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(CannotTell::Timeout),
    }
}

/// The pod's namespace, name and UID from `CNI_ARGS` (`K8S_POD_NAMESPACE=...;...`).
fn pod_args(env: &BTreeMap<String, String>) -> Request {
    let args: BTreeMap<&str, &str> = env
        .get("CNI_ARGS")
        .map(|a| a.split(';').filter_map(|kv| kv.split_once('=')).collect())
        .unwrap_or_default();
    let get = |k: &str| args.get(k).map(|v| v.to_string()).unwrap_or_default();
    Request {
        command: Command::Status,
        container_id: env.get("CNI_CONTAINERID").cloned().unwrap_or_default(),
        netns: PathBuf::new(),
        ifname: env.get("CNI_IFNAME").cloned().unwrap_or_default(),
        namespace: get("K8S_POD_NAMESPACE"),
        name: get("K8S_POD_NAME"),
        uid: get("K8S_POD_UID"),
        ips: Vec::new(),
    }
}

/// The addresses in a previous result (`ips[].address`, CIDR notation).
fn ips_of(prev: &Value) -> Vec<IpAddr> {
    prev["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .collect()
}

/// The previous result, passed on as this plugin's result in the configuration's version.
fn with_version(mut prev: Value, version: &str) -> Value {
    prev["cniVersion"] = Value::from(version);
    prev
}

/// The plugin's process: reads the environment and stdin, prints the result or the error,
/// exits 0 or 1.
pub fn main() -> std::process::ExitCode {
    let env: BTreeMap<String, String> = std::env::vars().filter(|(k, _)| k.starts_with("CNI_")).collect();
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().take(protocol::MAX_LINE as u64 * 16).read_to_end(&mut stdin) {
        eprintln!("ambit-cni: reading the network configuration: {e}");
    }
    match handle(&env, &stdin) {
        Ok(None) => std::process::ExitCode::SUCCESS,
        Ok(Some(out)) => {
            println!("{out}");
            std::process::ExitCode::SUCCESS
        }
        Err((version, e)) => {
            println!(
                "{}",
                json!({ "cniVersion": version, "code": e.code, "msg": e.msg, "details": e.details })
            );
            eprintln!("ambit-cni: {}: {}", e.msg, e.details);
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(command: &str) -> BTreeMap<String, String> {
        [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/var/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME=a;K8S_POD_UID=u1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    const PREV: &str = r#"{"cniVersion":"1.1.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/x"}],"ips":[{"address":"10.1.1.2/24","interface":0}]}"#;

    fn config(version: &str, socket: &str, fail_open: bool) -> Vec<u8> {
        format!(
            r#"{{"cniVersion":"{version}","name":"net","type":"ambit-cni","socket":"{socket}","failOpen":{fail_open},"timeoutSeconds":1,"prevResult":{PREV}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn version_and_bad_input_get_the_spec_s_answers() {
        let v = handle(&env("VERSION"), b"{}").expect("version").expect("output");
        assert_eq!(v["supportedVersions"], json!(["1.0.0", "1.1.0"]));
        let code = |r: Result<Output, (String, CniError)>| r.expect_err("an error").1.code;
        assert_eq!(code(handle(&env("ADD"), b"{not json")), 6);
        assert_eq!(code(handle(&env("ADD"), &config("0.4.0", "/nonexistent", false))), 1);
        assert_eq!(code(handle(&env("ADD"), br#"{"name":"net","type":"ambit-cni"}"#)), 7);
        let no_prev = br#"{"cniVersion":"1.0.0","name":"net","type":"ambit-cni"}"#;
        assert_eq!(code(handle(&env("ADD"), no_prev)), 7);
        let mut e = env("ADD");
        e.remove("CNI_NETNS");
        assert_eq!(code(handle(&e, &config("1.0.0", "/nonexistent", false))), 4);
        assert_eq!(code(handle(&env("FROB"), &config("1.0.0", "/nonexistent", false))), 4);
        assert_eq!(code(handle(&env("STATUS"), &config("1.1.0", "/nonexistent", false))), 50);
    }

    #[test]
    fn without_a_node_a_pod_fails_closed_unless_fail_open() {
        // No node and no kubeconfig: nobody can tell, so the pod must not start.
        let r = handle(&env("ADD"), &config("1.0.0", "/nonexistent/socket", false));
        let (_, e) = r.expect_err("fail closed");
        assert_eq!(e.code, 11, "{e:?}");
        let out = handle(&env("ADD"), &config("1.0.0", "/nonexistent/socket", true)).expect("fail open");
        let out = out.expect("the previous result");
        assert_eq!(out["ips"][0]["address"], "10.1.1.2/24");
        assert_eq!(out["cniVersion"], "1.0.0");
        // DEL always succeeds, with no output.
        assert!(handle(&env("DEL"), &config("1.0.0", "/nonexistent/socket", false)).expect("del").is_none());
        // A container that is no Kubernetes pod is passed through.
        let mut e = env("ADD");
        e.insert("CNI_ARGS".into(), "IgnoreUnknown=1".into());
        assert!(handle(&e, &config("1.1.0", "/nonexistent/socket", false)).is_ok());
    }
}
