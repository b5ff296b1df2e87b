//! ambit as ztunnel's drop-in under the real istiod and the real Kubernetes API server (both
//! built from their Go modules): every control-plane conversation in these tests is with the
//! real servers — pods enrolled by namespace label, certificates from istiod's CA through its
//! node authorizer, workloads, services and policies over istiod's xDS.

mod common;

use std::time::Duration;

use ambit::identity::{
    caclient::{CaClient, CaSettings},
    Identity,
};
use ambit_testbed::{
    apps::{dns_server_with, http_server},
    istio::{self, workload, Spec},
    istiod::{Istiod, SERVING_NAME},
    pod_command,
    realkube::Kube,
    run_with_timeout, Ambit, Bed,
};
use common::{istio::*, *};

#[test]
fn a_labelled_namespace_is_enrolled_annotated_and_tunnelled_with_istiod_s_identities() {
    let bed = Bed::new("istio-enrol");
    let (n1, n2, cp) = nodes(&bed);
    let kube = Kube::start(&bed, &cp);
    setup(&kube, &n1, &n2);
    let istiod = Istiod::start(&kube, &istio::trusted_account());
    istio::namespace(&kube, "demo", &[]).expect("namespace");
    let (a, b) = (bed.pod(&n1, "a"), bed.pod(&n2, "b"));
    let _wa = workload(&bed, &kube, &n1, &a, &spec("client", &[("app", "client")])).expect("a");
    let _wb = workload(&bed, &kube, &n2, &b, &spec("server", &[("app", "web")])).expect("b");
    let _http = http_server(&bed, &b, "b\n");
    let p1 = istio::start_ambit(&bed, &kube, &istiod, &n1, &[]).expect("ambit on n1");
    let p2 = istio::start_ambit(&bed, &kube, &istiod, &n2, &[]).expect("ambit on n2");
    let url = format!("http://{}:8080/", b.ipv4);

    // Not labelled: nothing enrolled, no annotation, plaintext straight through.
    assert!(enrolled(&p1).is_empty() && enrolled(&p2).is_empty());
    assert_eq!(ok_body(&curl(&a, &url)), "b\n");
    assert_eq!(annotation(&kube, "a"), "");

    kube.kubectl(&["label", "namespace", "demo", "istio.io/dataplane-mode=ambient"]).expect("label");
    assert!(eventually(SLOW, || enrolled(&p1) == ["a"] && enrolled(&p2) == ["b"]), "{}", p1.log());
    // ambit writes the annotation istio-cni writes; istiod then serves the pods with HBONE.
    assert!(eventually(SLOW, || annotation(&kube, "a") == "enabled" && annotation(&kube, "b") == "enabled"));
    assert!(
        eventually(SLOW, || served(&p1, "b").is_some_and(|w| w["tunnel"] == "hbone")),
        "istiod never served b with HBONE: {:?}",
        served(&p1, "b")
    );
    assert_eq!(ok_body(&curl(&a, &url)), "b\n");
    tunnelled_once(&p1, &p2);

    // istiod's node authorizer: n1's token gets a's identity, not b's (b runs on n2). Asked
    // from n1's namespace, as its proxy asks.
    let settings = CaSettings {
        address: istiod.address.clone(),
        server_name: SERVING_NAME.into(),
        root_cert: istiod.root_cert.clone(),
        token_file: bed.dir().join("ambit-n1/istio-token"),
        timeout: Duration::from_secs(10),
        cluster_id: "Kubernetes".into(),
    };
    let (own, other) = in_netns(&n1, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async {
            let ca = CaClient::new(&settings).expect("CA client");
            let id = |sa: &str| Identity::new("cluster.local", "demo", sa);
            let own = ca.sign(&id("client"), Duration::from_secs(3600)).await.map(|_| ());
            let other = ca.sign(&id("server"), Duration::from_secs(3600)).await.map(|_| ());
            (own.map_err(|e| e.to_string()), other.map_err(|e| e.to_string()))
        })
    });
    own.expect("n1 may have a's identity");
    let refused = other.expect_err("istiod signed b's identity for n1");
    assert!(refused.contains("PermissionDenied") || refused.contains("Unauthenticated"), "{refused}");

    // Unlabelled: unenrolled, the annotation removed.
    kube.kubectl(&["label", "namespace", "demo", "istio.io/dataplane-mode-"]).expect("unlabel");
    assert!(eventually(SLOW, || enrolled(&p1).is_empty() && enrolled(&p2).is_empty()));
    assert!(eventually(SLOW, || annotation(&kube, "a").is_empty() && annotation(&kube, "b").is_empty()));
    for p in [&p1, &p2] {
        assert!(
            eventually(T, || kernel_state(p) == (0, 0, 0, 0)),
            "state left behind: {:?}",
            kernel_state(p)
        );
    }
    assert!(eventually(SLOW, || curl(&a, &url).status.success()));
}

#[test]
fn a_service_s_cluster_ip_is_balanced_over_its_ready_endpoints() {
    let bed = Bed::new("istio-service");
    let (n1, n2, cp) = nodes(&bed);
    let kube = Kube::start(&bed, &cp);
    setup(&kube, &n1, &n2);
    let istiod = Istiod::start(&kube, &istio::trusted_account());
    istio::namespace(&kube, "demo", &[("istio.io/dataplane-mode", "ambient")]).expect("namespace");
    let a = bed.pod(&n1, "a");
    let (w1, w2, w3) = (bed.pod(&n1, "web1"), bed.pod(&n2, "web2"), bed.pod(&n2, "web3"));
    let _wa = workload(&bed, &kube, &n1, &a, &spec("client", &[])).expect("a");
    let web = [("app", "web")];
    let _w1 = workload(&bed, &kube, &n1, &w1, &spec("server", &web)).expect("web1");
    let _w2 = workload(&bed, &kube, &n2, &w2, &spec("server", &web)).expect("web2");
    // Not Ready: istiod serves it unhealthy, and it gets no traffic.
    let unready = Spec { ready: false, ..spec("server", &web) };
    let _w3 = workload(&bed, &kube, &n2, &w3, &unready).expect("web3");
    let _h = [
        http_server(&bed, &w1, "web1\n"),
        http_server(&bed, &w2, "web2\n"),
        http_server(&bed, &w3, "web3\n"),
    ];
    kube.apply("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: 8080\n")
        .expect("service");
    let vip = kube.get("service", "demo", "web", "{.spec.clusterIP}").expect("cluster IP");
    let p1 = istio::start_ambit(&bed, &kube, &istiod, &n1, &[]).expect("ambit on n1");
    let _p2 = istio::start_ambit(&bed, &kube, &istiod, &n2, &[]).expect("ambit on n2");
    let served_vip = || {
        p1.config_dump()["mesh"]["services"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|s| s.to_string().contains(&vip))
    };
    assert!(
        eventually(SLOW, served_vip),
        "istiod never served {vip}: {}",
        p1.config_dump()["mesh"]["services"]
    );
    assert!(eventually(SLOW, || served(&p1, "web2").is_some_and(|w| w["tunnel"] == "hbone")));
    let url = format!("http://{vip}:80/");
    let mut answers = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..20 {
        *answers.entry(ok_body(&curl(&a, &url)).trim().to_string()).or_default() += 1;
    }
    assert_eq!(answers.keys().cloned().collect::<Vec<_>>(), ["web1", "web2"], "{answers:?}");
    assert!(answers.values().all(|n| *n >= 5), "not balanced: {answers:?}");
    assert!(
        eventually(T, || access_lines(
            &p1,
            &["direction=outbound", "security=mutual_tls", "dst_service=demo/web.demo.svc.cluster.local"]
        ) >= 20),
        "{}",
        p1.log()
    );
    // web3 turns Ready: it gets its share.
    kube.set_pod_status("demo", "web3", n2.bridge_ipv4(), &[w3.ipv4, w3.ipv6], true).expect("ready");
    assert!(
        eventually(SLOW, || (0..6).any(|_| ok_body(&curl(&a, &url)).trim() == "web3")),
        "web3 never answered"
    );
}

#[test]
fn deleting_a_pod_or_opting_it_out_unenrols_it_and_leaves_nothing_behind() {
    let bed = Bed::new("istio-unenrol");
    let (n1, n2, cp) = nodes(&bed);
    let kube = Kube::start(&bed, &cp);
    setup(&kube, &n1, &n2);
    let istiod = Istiod::start(&kube, &istio::trusted_account());
    istio::namespace(&kube, "demo", &[("istio.io/dataplane-mode", "ambient")]).expect("namespace");
    let (a, c) = (bed.pod(&n1, "a"), bed.pod(&n1, "c"));
    let wa = workload(&bed, &kube, &n1, &a, &spec("client", &[])).expect("a");
    let _wc = workload(&bed, &kube, &n1, &c, &spec("client", &[])).expect("c");
    let p1 = istio::start_ambit(&bed, &kube, &istiod, &n1, &[]).expect("ambit on n1");
    assert!(eventually(SLOW, || enrolled(&p1) == ["a", "c"]));
    let empty = kernel_state(&p1);
    assert_eq!((empty.0, empty.2), (2, 2), "two enrolled cookies, two tc links: {empty:?}");

    // The pod-level opt-out label.
    kube.kubectl(&["label", "pod", "c", "-n", "demo", "istio.io/dataplane-mode=none"]).expect("opt out");
    assert!(eventually(SLOW, || enrolled(&p1) == ["a"]));
    assert!(eventually(SLOW, || annotation(&kube, "c").is_empty()), "c keeps its annotation");
    assert!(
        eventually(T, || kernel_state(&p1).0 == 1 && kernel_state(&p1).2 == 1),
        "{:?}",
        kernel_state(&p1)
    );

    // Deleted (its process gone, as the kubelet would stop it).
    drop(wa);
    kube.kubectl(&["delete", "pod", "a", "-n", "demo", "--grace-period=0", "--force"]).expect("delete");
    assert!(eventually(SLOW, || enrolled(&p1).is_empty()));
    assert!(
        eventually(T, || kernel_state(&p1) == (0, 0, 0, 0)),
        "state left behind: {:?}",
        kernel_state(&p1)
    );
}

#[test]
fn istiod_restarting_keeps_connections_up_and_the_proxies_resync() {
    let bed = Bed::new("istio-restart");
    let (n1, n2, cp) = nodes(&bed);
    let kube = Kube::start(&bed, &cp);
    setup(&kube, &n1, &n2);
    let mut istiod = Istiod::start(&kube, &istio::trusted_account());
    istio::namespace(&kube, "demo", &[("istio.io/dataplane-mode", "ambient")]).expect("namespace");
    let (a, b) = (bed.pod(&n1, "a"), bed.pod(&n2, "b"));
    let _wa = workload(&bed, &kube, &n1, &a, &spec("client", &[])).expect("a");
    let _wb = workload(&bed, &kube, &n2, &b, &spec("server", &[])).expect("b");
    let mut echo = netprobe(&bed, &b, "echo", "[::]:7000");
    echo.wait_for_output("listening", T).expect("echo listens");
    let p1 = istio::start_ambit(&bed, &kube, &istiod, &n1, &[]).expect("ambit on n1");
    let _p2 = istio::start_ambit(&bed, &kube, &istiod, &n2, &[]).expect("ambit on n2");
    assert!(eventually(SLOW, || served(&p1, "b").is_some_and(|w| w["tunnel"] == "hbone")));
    let mut chat = ambit_testbed::Chat::open(&bed, &a, &format!("{}:7000", b.ipv4)).expect("chat");
    assert_eq!(chat.say("before").expect("echo"), "before");
    let connects = |p: &Ambit| p.config_dump()["xds"]["connects"].as_u64().unwrap_or(0);
    assert_eq!(connects(&p1), 1);

    istiod.kill();
    assert!(eventually(T, || p1.config_dump()["xds"]["connected"] == false));
    assert_eq!(chat.say("while istiod is down").expect("echo"), "while istiod is down");
    istiod.restart();
    assert!(
        eventually(SLOW, || connects(&p1) == 2 && p1.config_dump()["xds"]["connected"] == true),
        "{}",
        p1.log()
    );
    assert_eq!(chat.say("after").expect("echo"), "after");
    // A pod added after the restart is learnt, and new connections work.
    let d = bed.pod(&n2, "d");
    let _wd = workload(&bed, &kube, &n2, &d, &spec("server", &[])).expect("d");
    assert!(eventually(SLOW, || served(&p1, "d").is_some_and(|w| w["tunnel"] == "hbone")));
    let _hd = http_server(&bed, &d, "d\n");
    assert_eq!(ok_body(&curl(&a, &format!("http://{}:8080/", d.ipv4))), "d\n");
}

#[test]
fn ambit_runs_with_exactly_its_manifests_rbac_and_istiod_sees_each_proxy_acked() {
    let bed = Bed::new("istio-rbac");
    let (n1, n2, cp) = nodes(&bed);
    let kube = Kube::start(&bed, &cp);
    setup(&kube, &n1, &n2);
    let istiod = Istiod::start(&kube, &istio::trusted_account());
    istio::namespace(&kube, "demo", &[("istio.io/dataplane-mode", "ambient")]).expect("namespace");
    let a = bed.pod(&n1, "a");
    let _wa = workload(&bed, &kube, &n1, &a, &spec("client", &[])).expect("a");
    let _p1 = istio::start_ambit(&bed, &kube, &istiod, &n1, &[]).expect("ambit on n1");
    let p2 = istio::start_ambit(&bed, &kube, &istiod, &n2, &[]).expect("ambit on n2");
    assert!(eventually(SLOW, || annotation(&kube, "a") == "enabled"));

    // What ambit's own credentials may do, asked of the real API server.
    let config = bed.dir().join("ambit-n1/kubeconfig");
    let as_ambit = |args: &[&str]| kube.kubectl_as(&config, args, None);
    as_ambit(&["get", "pods", "-A"]).expect("ambit may list pods");
    as_ambit(&["get", "namespaces"]).expect("ambit may list namespaces");
    for refused in [
        &["get", "secrets", "-A"][..],
        &["get", "configmaps", "-n", "istio-system"],
        &["label", "pod", "a", "-n", "demo", "x=y"],
        &["delete", "pod", "a", "-n", "demo"],
        &["create", "namespace", "intruder"],
    ] {
        let e = as_ambit(refused).expect_err("outside ambit's RBAC");
        assert!(
            e.to_string().contains("Forbidden") || e.to_string().contains("forbidden"),
            "{refused:?}: {e}"
        );
    }

    // istiod's own view: both proxies connected as ztunnel-type clients, every type ACKed.
    let acked = || -> anyhow::Result<usize> {
        let body = istiod.debug("/debug/syncz")?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let ztunnels: Vec<&serde_json::Value> =
            v.as_array().into_iter().flatten().filter(|p| p["proxy_type"] == "ztunnel").collect();
        Ok(ztunnels
            .iter()
            .filter(|p| {
                let r = &p["resources"];
                [
                    "type.googleapis.com/istio.workload.Address",
                    "type.googleapis.com/istio.security.Authorization",
                ]
                .iter()
                .all(|t| r[t]["sent"].is_string() && r[t]["sent"] == r[t]["acked"])
            })
            .count())
    };
    assert!(eventually(SLOW, || acked().is_ok_and(|n| n == 2)), "{:?}", istiod.debug("/debug/syncz"));
    let ids: String = istiod.debug("/debug/syncz").expect("syncz");
    for node in ["ambit-n1", "ambit-n2"] {
        assert!(ids.contains(node), "{node} not in istiod's view: {ids}");
    }
    drop(p2);
}

#[test]
fn dns_answers_istiod_s_services_and_service_entries_and_their_names_route_through_the_mesh() {
    let bed = Bed::new("istio-dns");
    let (n1, n2, cp) = nodes(&bed);
    let kube = Kube::start(&bed, &cp);
    setup(&kube, &n1, &n2);
    let istiod = Istiod::start(&kube, &istio::trusted_account());
    istio::namespace(&kube, "demo", &[("istio.io/dataplane-mode", "ambient")]).expect("namespace");
    // r: the pods' resolver; ext: a server outside the mesh and the cluster, which a
    // ServiceEntry names. Neither is in the API.
    let (r, ext) = (bed.pod(&n1, "r"), bed.pod(&n2, "ext"));
    let a = bed.pod(&n1, "a").with_resolver(bed.dir(), "demo", r.ipv4);
    let w = bed.pod(&n2, "web");
    let _wa = workload(&bed, &kube, &n1, &a, &spec("client", &[("app", "client")])).expect("a");
    let _ww = workload(&bed, &kube, &n2, &w, &spec("server", &[("app", "web")])).expect("web");
    // ext's name, known to the pods' resolver only.
    let _resolver = dns_server_with(&bed, &r, &[("ext.bed.test", ext.ipv4)]);
    let _h = [http_server(&bed, &w, "web\n"), http_server(&bed, &ext, "ext\n")];
    kube.apply("apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: demo\nspec:\n  selector:\n    app: web\n  ports:\n  - port: 80\n    targetPort: 8080\n")
        .expect("service");
    // No addresses: istiod allocates one (status.addresses), as Istio does by default.
    kube.apply(&format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: api\n  namespace: demo\nspec:\n  hosts:\n  - api.example.test\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  ports:\n  - number: 80\n    name: http\n    protocol: TCP\n    targetPort: 8080\n  endpoints:\n  - address: {}\n",
        ext.ipv4
    ))
    .expect("service entry");
    // Resolved by DNS: its endpoint is a name, which the proxy resolves as the pod would.
    kube.apply("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: db\n  namespace: demo\nspec:\n  hosts:\n  - db.example.test\n  location: MESH_EXTERNAL\n  resolution: DNS\n  ports:\n  - number: 80\n    name: http\n    protocol: TCP\n    targetPort: 8080\n  endpoints:\n  - address: ext.bed.test\n")
        .expect("DNS service entry");
    let vip = kube.get("service", "demo", "web", "{.spec.clusterIP}").expect("cluster IP");
    let p1 = istio::start_ambit(&bed, &kube, &istiod, &n1, &[]).expect("ambit on n1");
    let _p2 = istio::start_ambit(&bed, &kube, &istiod, &n2, &[]).expect("ambit on n2");
    let allocated_to = |se: &str| {
        kube.get("serviceentry", "demo", se, "{.status.addresses[*].value}")
            .unwrap_or_default()
            .split_whitespace()
            .find(|a| a.parse::<std::net::Ipv4Addr>().is_ok())
            .map(String::from)
    };
    assert!(
        eventually(SLOW, || allocated_to("api").is_some() && allocated_to("db").is_some()),
        "istiod allocated no address"
    );
    let (se_vip, db_vip) = (allocated_to("api").expect("allocated"), allocated_to("db").expect("allocated"));
    let known = |needle: &str| p1.config_dump()["mesh"]["services"].to_string().contains(needle);
    assert!(
        eventually(SLOW, || known(&vip) && known(&se_vip) && known(&db_vip)),
        "istiod never served both: {}",
        p1.config_dump()["mesh"]["services"]
    );
    assert!(eventually(SLOW, || served(&p1, "web").is_some_and(|w| w["tunnel"] == "hbone")));

    // glibc in the pod, through its search path and the capture.
    let lookup = |name: &str| {
        let out = run_with_timeout(pod_command(&a, &["getent", "ahostsv4", name]), T).expect("getent");
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
    };
    assert_eq!(lookup("web"), vip, "{}", p1.log());
    assert_eq!(lookup("web.demo.svc.cluster.local"), vip);
    assert_eq!(lookup("api.example.test"), se_vip);
    assert_eq!(lookup("db.example.test"), db_vip);

    // By name through the mesh: the service over HBONE, the ServiceEntry to its endpoint.
    assert_eq!(ok_body(&curl(&a, "http://web/")), "web\n");
    assert_eq!(ok_body(&curl(&a, "http://api.example.test/")), "ext\n");
    // The DNS-resolved one: its endpoint's name resolved with a's resolver, then reached.
    assert_eq!(ok_body(&curl(&a, "http://db.example.test/")), "ext\n", "{}", p1.log());
    let to = |service: &str| access_lines(&p1, &["direction=outbound", &format!("dst_service={service}")]);
    assert!(eventually(T, || to("demo/web.demo.svc.cluster.local") == 1), "{}", p1.log());
    assert!(eventually(T, || to("demo/api.example.test") == 1), "{}", p1.log());
    assert!(eventually(T, || to("demo/db.example.test") == 1), "{}", p1.log());
    assert!(
        labelled(&p1.metrics(), "istio_dns_requests_total", &[("source_canonical_service", "client")]) >= 3,
        "{}",
        p1.metrics()
    );
}
