//! Putting `ambit-cni` on the node, keeping it there, and taking it out.
//!
//! - The plugin binary is this executable, copied (atomically) to the CNI bin dir as
//!   `ambit-cni`.
//! - Its configuration is appended to the node's primary network configuration: the first
//!   `.conf`/`.conflist`/`.json` file of the CNI conf dir by name, which is the one the
//!   container runtime uses. A single-plugin `.conf` becomes a `.conflist` of the same name.
//! - The primary CNI may rewrite its file at any time (Cilium does): the node checks every
//!   second and puts the plugin back.
//! - The file as the primary CNI last wrote it is kept in `.ambit-cni/` of the conf dir;
//!   uninstall puts it back byte for byte (or, if it was changed since, removes only the
//!   plugin's entry).
//! - The plugin's kubeconfig (for deciding without the node, see `plugin`) is written next
//!   to it, readable by root only.

use std::{
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use crate::meshfile::Enrolment;

/// The plugin's `type`, and its binary's name.
pub const PLUGIN_TYPE: &str = "ambit-cni";
/// The plugin's kubeconfig, in the conf dir.
pub const KUBECONFIG_NAME: &str = "ambit-cni.kubeconfig";
/// Where the primary's own files are kept while the plugin is chained into them.
const ORIGINALS: &str = ".ambit-cni";
/// How often the configuration is checked.
const REPAIR_EVERY: Duration = Duration::from_secs(1);

/// Where and how the plugin is installed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CniSettings {
    pub conf_dir: PathBuf,
    pub bin_dir: PathBuf,
    /// The node's socket, which the plugin calls.
    pub socket: PathBuf,
    pub fail_open: bool,
    /// How long an ADD waits for capture.
    pub timeout: Duration,
    /// The credentials the node uses, handed to the plugin (`None`: in-cluster).
    pub kubeconfig: Option<PathBuf>,
    pub rules: Enrolment,
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a CNI network configuration: {detail}")]
    Invalid { path: PathBuf, detail: String },
    #[error("no credentials for the plugin: {0}")]
    Credentials(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io { path: path.to_path_buf(), source }
}

/// What one check of the configuration did.
#[derive(Debug, PartialEq, Eq)]
pub enum Chained {
    /// The plugin was (re)inserted into this file.
    Inserted(PathBuf),
    /// Already there as it should be.
    Unchanged(PathBuf),
    /// No network configuration yet (the primary CNI has not installed itself).
    NoPrimary,
}

/// Writes `bytes` to `path` atomically (a temporary file renamed over it), with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    let tmp = path.with_file_name(format!(
        ".{}.ambit-tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Copies this executable to `<bin_dir>/ambit-cni` unless it is there already.
pub fn install_binary(bin_dir: &Path) -> Result<bool, InstallError> {
    let exe = std::env::current_exe().map_err(io(Path::new("/proc/self/exe")))?;
    let target = bin_dir.join(PLUGIN_TYPE);
    let ours = std::fs::read(&exe).map_err(io(&exe))?;
    if std::fs::read(&target).is_ok_and(|there| there == ours) {
        return Ok(false);
    }
    write_atomic(&target, &ours, 0o755)?;
    Ok(true)
}

/// The network configuration the runtime uses: the first by name.
pub fn primary(conf_dir: &Path) -> Result<Option<PathBuf>, InstallError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(conf_dir)
        .map_err(io(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e, "conf" | "conflist" | "json"))
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// The plugin's entry in a conflist.
pub fn entry(settings: &CniSettings) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "socket": settings.socket,
        "kubeconfig": settings.conf_dir.join(KUBECONFIG_NAME),
        "failOpen": settings.fail_open,
        "timeoutSeconds": settings.timeout.as_secs(),
        "enrolLabel": settings.rules.enrol.to_string(),
        "optOutLabel": settings.rules.opt_out.to_string(),
    })
}

fn is_ours(plugin: &Value) -> bool {
    plugin["type"] == PLUGIN_TYPE
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Value, InstallError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| InstallError::Invalid { path: path.to_path_buf(), detail: e.to_string() })?;
    if !v.is_object() {
        return Err(InstallError::Invalid { path: path.to_path_buf(), detail: "not a JSON object".into() });
    }
    Ok(v)
}

/// A single-plugin configuration as a list of one.
fn as_list(mut conf: Value) -> Value {
    if conf.get("plugins").is_some() {
        return conf;
    }
    let obj = conf.as_object_mut().expect("checked to be an object");
    let version = obj.remove("cniVersion").unwrap_or(Value::from("1.0.0"));
    let name = obj.remove("name").unwrap_or(Value::from("default"));
    json!({ "cniVersion": version, "name": name, "plugins": [conf] })
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("JSON values serialise");
    out.push(b'\n');
    out
}

/// Makes sure the primary configuration chains the plugin as `settings` says.
pub fn ensure_chained(settings: &CniSettings) -> Result<Chained, InstallError> {
    let Some(path) = primary(&settings.conf_dir)? else { return Ok(Chained::NoPrimary) };
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let conf = parse(&path, &bytes)?;
    let want = entry(settings);
    let plugins = conf.get("plugins").and_then(Value::as_array);
    if plugins.is_some_and(|ps| ps.contains(&want)) {
        return Ok(Chained::Unchanged(path));
    }
    let originals = settings.conf_dir.join(ORIGINALS);
    std::fs::create_dir_all(&originals).map_err(io(&originals))?;
    let name = path.file_name().expect("a file").to_owned();
    let mut list = as_list(conf);
    let ps = list["plugins"].as_array_mut().ok_or_else(|| InstallError::Invalid {
        path: path.clone(),
        detail: "plugins is not a list".into(),
    })?;
    let had_ours = ps.iter().any(is_ours);
    if !had_ours {
        // The primary wrote this file itself: it is what uninstall restores.
        write_atomic(&originals.join(&name), &bytes, 0o600)?;
    }
    match ps.iter_mut().find(|p| is_ours(p)) {
        Some(p) => *p = want,
        None => ps.push(want),
    }
    let target = if path.extension().is_some_and(|e| e == "conflist") {
        path.clone()
    } else {
        path.with_extension("conflist")
    };
    write_atomic(&target, &pretty(&list), 0o644)?;
    if target != path {
        // The single-plugin file sorts first: out of the way (kept in the originals).
        std::fs::remove_file(&path).map_err(io(&path))?;
    }
    Ok(Chained::Inserted(target))
}

/// The plugin's kubeconfig: the node's own file's contents, or the in-cluster service
/// account's token and CA.
pub fn plugin_kubeconfig(node_kubeconfig: Option<&Path>) -> Result<Vec<u8>, InstallError> {
    if let Some(p) = node_kubeconfig {
        return std::fs::read(p).map_err(io(p));
    }
    const SA: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
    let (host, port) =
        match (std::env::var("KUBERNETES_SERVICE_HOST"), std::env::var("KUBERNETES_SERVICE_PORT")) {
            (Ok(h), Ok(p)) => (h, p),
            _ => {
                return Err(InstallError::Credentials(
                    "no --kubeconfig and not in a pod (KUBERNETES_SERVICE_HOST unset)".into(),
                ))
            }
        };
    let token_path = Path::new(SA).join("token");
    let token = std::fs::read_to_string(&token_path).map_err(io(&token_path))?;
    let ca_path = Path::new(SA).join("ca.crt");
    let ca = std::fs::read(&ca_path).map_err(io(&ca_path))?;
    use base64::Engine;
    let ca = base64::engine::general_purpose::STANDARD.encode(ca);
    let server = if host.contains(':') {
        format!("https://[{host}]:{port}")
    } else {
        format!("https://{host}:{port}")
    };
    Ok(format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: ambit-cni\n  user:\n    token: {}\ncontexts:\n- name: ambit-cni\n  context:\n    cluster: local\n    user: ambit-cni\ncurrent-context: ambit-cni\n",
        token.trim()
    )
    .into_bytes())
}

/// Writes the plugin's kubeconfig if it differs (a rotated token).
fn ensure_kubeconfig(settings: &CniSettings) -> Result<bool, InstallError> {
    let want = plugin_kubeconfig(settings.kubeconfig.as_deref())?;
    let path = settings.conf_dir.join(KUBECONFIG_NAME);
    if std::fs::read(&path).is_ok_and(|there| there == want) {
        return Ok(false);
    }
    write_atomic(&path, &want, 0o600)?;
    Ok(true)
}

/// Installs the binary and kubeconfig and chains the plugin; errors are the caller's.
pub fn install(settings: &CniSettings) -> Result<Chained, InstallError> {
    for dir in [&settings.conf_dir, &settings.bin_dir] {
        if !dir.is_dir() {
            return Err(InstallError::Io {
                path: dir.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such directory (mount the host's)",
                ),
            });
        }
    }
    install_binary(&settings.bin_dir)?;
    ensure_kubeconfig(settings)?;
    ensure_chained(settings)
}

/// Keeps the plugin installed until `stop`: every second, the configuration is checked and
/// repaired (the primary CNI rewrote it, the token rotated, the binary was removed).
pub async fn keep_installed(settings: CniSettings, stop: CancellationToken) {
    let mut tick = tokio::time::interval(REPAIR_EVERY);
    let mut last: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let s = settings.clone();
        let r = tokio::task::spawn_blocking(move || {
            if !s.bin_dir.join(PLUGIN_TYPE).exists() {
                install_binary(&s.bin_dir)?;
            }
            ensure_kubeconfig(&s)?;
            ensure_chained(&s)
        })
        .await;
        let now = match r {
            Ok(Ok(Chained::Inserted(path))) => {
                tracing::warn!(file = %path.display(), "the CNI configuration lacked ambit-cni (rewritten by the primary CNI?): chained it again");
                None
            }
            Ok(Ok(Chained::Unchanged(_))) => None,
            Ok(Ok(Chained::NoPrimary)) => Some(format!(
                "no CNI network configuration in {} yet: pods cannot be captured from their first packet until the primary CNI installs one",
                settings.conf_dir.display()
            )),
            Ok(Err(e)) => Some(format!("keeping ambit-cni installed: {e}")),
            Err(e) => Some(format!("keeping ambit-cni installed: {e}")),
        };
        if now != last {
            match &now {
                Some(problem) => tracing::error!("{problem}; checking again every second"),
                None if last.is_some() => tracing::info!("ambit-cni is installed again"),
                None => {}
            }
            last = now;
        }
    }
}

/// What uninstall removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct Uninstalled {
    pub restored: Vec<PathBuf>,
    pub edited: Vec<PathBuf>,
    pub removed: Vec<PathBuf>,
}

/// Takes the plugin out of every configuration in `conf_dir` (restoring the primary's own
/// file where it is unchanged), and removes its binary and kubeconfig. Safe to repeat.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Uninstalled, InstallError> {
    let mut done = Uninstalled::default();
    let originals = conf_dir.join(ORIGINALS);
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(d) => d.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect::<Vec<_>>(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(conf_dir)(e)),
    };
    for path in entries {
        if !path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "conf" | "conflist" | "json"))
        {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        let Ok(mut conf) = parse(&path, &bytes) else { continue };
        let Some(ps) = conf.get_mut("plugins").and_then(Value::as_array_mut) else { continue };
        if !ps.iter().any(is_ours) {
            continue;
        }
        ps.retain(|p| !is_ours(p));
        // The original: this file's, or the single-plugin file it was made from.
        let name = path.file_name().expect("a file").to_string_lossy().into_owned();
        let stem = path.file_stem().expect("a file").to_string_lossy().into_owned();
        let original = ["conflist", "conf", "json"]
            .iter()
            .map(|ext| (originals.join(format!("{stem}.{ext}")), path.with_extension(ext)))
            .find(|(kept, _)| kept.exists());
        let restorable = original.as_ref().and_then(|(kept, to)| {
            let b = std::fs::read(kept).ok()?;
            let v = parse(kept, &b).ok()?;
            (as_list(v) == conf).then(|| (b, to.clone()))
        });
        match restorable {
            Some((b, to)) => {
                write_atomic(&to, &b, 0o644)?;
                if to != path {
                    std::fs::remove_file(&path).map_err(io(&path))?;
                }
                done.restored.push(to);
            }
            None => {
                write_atomic(&path, &pretty(&conf), 0o644)?;
                done.edited.push(path.clone());
            }
        }
        tracing::debug!(file = %name, "ambit-cni taken out");
    }
    for path in [conf_dir.join(KUBECONFIG_NAME), bin_dir.join(PLUGIN_TYPE)] {
        match std::fs::remove_file(&path) {
            Ok(()) => done.removed.push(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    match std::fs::remove_dir_all(&originals) {
        Ok(()) => done.removed.push(originals),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&originals)(e)),
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> CniSettings {
        CniSettings {
            conf_dir: dir.join("net.d"),
            bin_dir: dir.join("bin"),
            socket: "/var/run/ambit/cni.sock".into(),
            fail_open: false,
            timeout: Duration::from_secs(30),
            kubeconfig: Some(dir.join("kubeconfig")),
            rules: Enrolment::default(),
        }
    }

    const PRIMARY: &str = "{\n    \"cniVersion\": \"1.0.0\", \"name\": \"podnet\",\n    \"plugins\": [{\"type\": \"bridge\", \"bridge\": \"br0\"}]\n}\n";

    #[test]
    fn chained_repaired_and_restored_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("ambit-cni-install-{}", std::process::id()));
        let s = settings(&dir);
        for d in [&s.conf_dir, &s.bin_dir] {
            std::fs::create_dir_all(d).expect("dir");
        }
        std::fs::write(dir.join("kubeconfig"), "apiVersion: v1\n").expect("kubeconfig");
        assert_eq!(install(&s).expect("install"), Chained::NoPrimary);
        let file = s.conf_dir.join("10-podnet.conflist");
        std::fs::write(&file, PRIMARY).expect("primary");
        assert_eq!(ensure_chained(&s).expect("chain"), Chained::Inserted(file.clone()));
        let conf: Value = serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
        assert_eq!(conf["plugins"][0]["type"], "bridge");
        assert_eq!(conf["plugins"][1], entry(&s));
        assert_eq!(ensure_chained(&s).expect("again"), Chained::Unchanged(file.clone()));
        // The primary rewrites its file: chained again, and that version is the original.
        let rewritten = PRIMARY.replace("br0", "br1");
        std::fs::write(&file, &rewritten).expect("rewrite");
        assert_eq!(ensure_chained(&s).expect("repair"), Chained::Inserted(file.clone()));
        let done = uninstall(&s.conf_dir, &s.bin_dir).expect("uninstall");
        assert_eq!(done.restored, vec![file.clone()]);
        assert_eq!(std::fs::read_to_string(&file).expect("read"), rewritten);
        assert!(!s.conf_dir.join(ORIGINALS).exists() && !s.conf_dir.join(KUBECONFIG_NAME).exists());
        // Again: nothing to do.
        let again = uninstall(&s.conf_dir, &s.bin_dir).expect("repeat");
        assert!(again.restored.is_empty() && again.edited.is_empty() && again.removed.is_empty());
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list_and_comes_back() {
        let dir = std::env::temp_dir().join(format!("ambit-cni-conf-{}", std::process::id()));
        let s = settings(&dir);
        std::fs::create_dir_all(&s.conf_dir).expect("dir");
        let single = "{\"cniVersion\":\"1.0.0\",\"name\":\"podnet\",\"type\":\"bridge\"}";
        std::fs::write(s.conf_dir.join("10-podnet.conf"), single).expect("conf");
        let list = s.conf_dir.join("10-podnet.conflist");
        assert_eq!(ensure_chained(&s).expect("chain"), Chained::Inserted(list.clone()));
        assert!(!s.conf_dir.join("10-podnet.conf").exists());
        let conf: Value = serde_json::from_slice(&std::fs::read(&list).expect("read")).expect("json");
        assert_eq!(
            (conf["name"].as_str(), conf["plugins"][0]["type"].as_str()),
            (Some("podnet"), Some("bridge"))
        );
        // Unchanged since: the single-plugin file comes back as it was.
        let done = uninstall(&s.conf_dir, &s.bin_dir).expect("uninstall");
        assert_eq!(done.restored, vec![s.conf_dir.join("10-podnet.conf")]);
        assert_eq!(std::fs::read_to_string(s.conf_dir.join("10-podnet.conf")).expect("read"), single);
        assert!(!list.exists());
        // A list someone edited after chaining: the entry is taken out, their edit kept.
        std::fs::write(&list, PRIMARY).expect("primary");
        ensure_chained(&s).expect("chain");
        let mut edited: Value = serde_json::from_slice(&std::fs::read(&list).expect("read")).expect("json");
        edited["name"] = Value::from("renamed");
        std::fs::write(&list, serde_json::to_vec(&edited).expect("json")).expect("edit");
        let done = uninstall(&s.conf_dir, &s.bin_dir).expect("uninstall");
        assert_eq!(done.edited, vec![list.clone()]);
        let left: Value = serde_json::from_slice(&std::fs::read(&list).expect("read")).expect("json");
        assert_eq!(left["name"], "renamed");
        assert_eq!(left["plugins"].as_array().map(Vec::len), Some(1));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
