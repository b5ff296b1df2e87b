//! `cargo xtask demo --istiod`: the demo's story as Istio users live it — the real
//! Kubernetes API server and the real istiod (built from their Go modules by `setup`), ambit
//! installed from its own manifests in place of ztunnel and istio-cni, pods enrolled with
//! `kubectl label`, policies applied with `kubectl apply`.

use std::time::Duration;

use anyhow::{bail, Context};

use ambit_testbed::{
    apps::http_server,
    istio::{self, workload, Spec},
    istiod::Istiod,
    realkube::Kube,
    Bed,
};

use super::{access_log, pod_curl, settle, step_of};

const STEPS: u32 = 7;
const T: Duration = Duration::from_secs(30);

fn step(n: u32, text: &str) {
    step_of(n, STEPS, text);
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    println!("\x1b[1mambit demo with istiod\x1b[0m: Kubernetes' API server and istiod, ambit in place of ztunnel + istio-cni");
    story(keep)?;
    println!("  done: namespaces, cgroups, pins and the cluster's processes removed");
    Ok(())
}

/// Everything the demo creates lives in here and is torn down when it returns.
fn story(keep: bool) -> anyhow::Result<()> {
    let bed = Bed::new("demo-istiod");
    let (n1, n2, cpn) = (bed.node("n1"), bed.node("n2"), bed.node("cp"));
    bed.link(&n1, &n2);
    bed.link(&cpn, &n1);
    bed.link(&cpn, &n2);

    step(1, "kube-apiserver and etcd, ambit's manifests (daemonset/istiod), istiod with ambient on");
    let kube = Kube::start(&bed, &cpn);
    istio::apply_manifests(&kube)?;
    for n in [&n1, &n2] {
        istio::node_object(&kube, n)?;
    }
    let istiod = Istiod::start(&kube, &istio::trusted_account());
    println!(
        "  API server https://{} ; istiod {} ; its root {}",
        kube.address,
        istiod.address,
        istiod.root_cert.display()
    );
    let p1 = istio::start_ambit(&bed, &kube, &istiod, &n1, &[])?;
    let p2 = istio::start_ambit(&bed, &kube, &istiod, &n2, &[])?;
    println!(
        "  ambit on n1 and n2, as the DaemonSet runs it (its service account's tokens, bound to its Pod)"
    );

    step(2, "namespace demo (not labelled yet): client on n1, server on n2, a Service");
    istio::namespace(&kube, "demo", &[])?;
    let (client, server) = (bed.pod(&n1, "client"), bed.pod(&n2, "server"));
    let spec = |sa, labels| Spec { namespace: "demo", service_account: sa, labels, ready: true };
    let _wc = workload(&bed, &kube, &n1, &client, &spec("client", &[]))?;
    let _ws = workload(&bed, &kube, &n2, &server, &spec("server", &[("app", "hello")]))?;
    let _http = http_server(&bed, &server, "hello from the server pod on n2\n");
    kube.apply("apiVersion: v1\nkind: Service\nmetadata:\n  name: hello\n  namespace: demo\nspec:\n  selector:\n    app: hello\n  ports:\n  - port: 80\n    targetPort: 8080\n")?;
    let vip = kube.get("service", "demo", "hello", "{.spec.clusterIP}")?;
    println!("{}", kube.kubectl(&["get", "pods,services", "-n", "demo", "-o", "wide"])?.trim_end());
    pod_curl(&client, &format!("http://{}:8080/", server.ipv4), "client -> server: plaintext, not captured")?;

    step(3, "kubectl label namespace demo istio.io/dataplane-mode=ambient");
    kube.kubectl(&["label", "namespace", "demo", "istio.io/dataplane-mode=ambient"])?;
    let hbone = || {
        p1.config_dump()["mesh"]["workloads"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["name"] == "server" && w["tunnel"] == "hbone"))
    };
    if !ambit_testbed::eventually(T, hbone) {
        bail!("istiod did not serve the server with HBONE");
    }
    let note = kube.get("pod", "demo", "server", "{.metadata.annotations}")?;
    println!("  the server pod, annotated by ambit as istio-cni would: {note}");
    println!("  istiod now serves it with tunnel_protocol HBONE, and signs its certificate for ambit:");
    for c in p2.config_dump()["certificates"].as_array().into_iter().flatten() {
        println!(
            "  n2: {} valid until {}",
            c["identity"].as_str().unwrap_or(""),
            c["certificate"]["not_after"].as_str().unwrap_or("-")
        );
    }

    step(4, "client -> server and client -> the Service: mTLS tunnels with istiod's identities");
    pod_curl(&client, &format!("http://{}:8080/", server.ipv4), "client -> server")?;
    pod_curl(&client, &format!("http://{vip}/"), &format!("client -> hello.demo ({vip})"))?;
    settle();
    access_log("n1", &p1, 0);
    let s2 = access_log("n2", &p2, 0);

    step(5, "kubectl apply an AuthorizationPolicy: DENY the client's service account");
    kube.apply("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  namespace: demo\nspec:\n  selector:\n    matchLabels:\n      app: hello\n  action: DENY\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]\n")?;
    let denied = || {
        let out = ambit_testbed::pod_command(
            &client,
            &["curl", "-sS", "--max-time", "3", &format!("http://{}:8080/", server.ipv4)],
        );
        ambit_testbed::run_with_timeout(out, T).is_ok_and(|o| !o.status.success())
    };
    if !ambit_testbed::eventually(T, denied) {
        bail!("the DENY was not enforced");
    }
    println!("  client -> server: refused");
    settle();
    access_log("n2", &p2, s2);
    kube.kubectl(&["delete", "authorizationpolicy", "deny-client", "-n", "demo"])?;

    step(6, "istiod's view: both proxies connected as ztunnel, every type ACKed (/debug/syncz)");
    let syncz: serde_json::Value = serde_json::from_str(&istiod.debug("/debug/syncz")?).context("syncz")?;
    for p in syncz.as_array().into_iter().flatten() {
        let acked =
            p["resources"].as_object().map_or(0, |r| r.values().filter(|t| t["sent"] == t["acked"]).count());
        println!(
            "  {} type={} types acked={acked}",
            p["proxy"].as_str().unwrap_or(""),
            p["proxy_type"].as_str().unwrap_or("")
        );
    }

    step(STEPS, if keep { "the cluster stays up: explore, then Ctrl-C" } else { "tearing down" });
    if keep {
        println!(
            "  kubectl:  nsenter --net={} {} --kubeconfig {} get pods -A",
            cpn.netns_path().display(),
            ambit_testbed::tools::kubectl().display(),
            kube.admin.display()
        );
        println!("  proxy logs: {} {}", p1.proc.log.display(), p2.proc.log.display());
        println!("  Ctrl-C tears everything down.");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    Ok(())
}
