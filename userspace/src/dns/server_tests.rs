//! A pod's listener on loopback, with the sockets of the test's own namespace: answered from
//! the mesh, forwarded to a scripted upstream (or none), over UDP and TCP.

use std::net::SocketAddr;

use crate::{
    dns::{
        forward::Upstreams,
        wire::{parse_response, tests::query},
    },
    os::socket::LocalSockets,
    pb::istio::workload::{self as pb, address, Address},
};

use super::*;

fn service(hostname: &str, vips: &[[u8; 4]]) -> Address {
    Address {
        r#type: Some(address::Type::Service(pb::Service {
            name: hostname.split('.').next().unwrap_or(hostname).into(),
            namespace: "demo".into(),
            hostname: hostname.into(),
            addresses: vips
                .iter()
                .map(|v| pb::NetworkAddress { network: String::new(), address: v.to_vec(), length: None })
                .collect(),
            ports: vec![pb::Port { service_port: 80, target_port: 8080, app_protocol: 0 }],
            ..Default::default()
        })),
    }
}

/// A scripted upstream on loopback: answers with the query, QR set, or stays silent.
async fn upstream(silent: bool) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = sock.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if !silent {
                buf[2] |= 0x80;
                let _ignored_in_a_fake = sock.send_to(&buf[..n], from).await;
            }
        }
    });
    addr
}

struct Served {
    udp: SocketAddr,
    tcp: SocketAddr,
    _stop: tokio_util::sync::DropGuard,
}

async fn serve(upstream: SocketAddr) -> Served {
    let state = Arc::new(StateStore::default());
    {
        let mut s = state.write();
        s.apply_address(
            "demo/web.demo.svc.cluster.local",
            "1",
            &service("web.demo.svc.cluster.local", &[[10, 96, 0, 10]]),
        )
        .expect("web");
        let many: Vec<[u8; 4]> = (0..100u8).map(|i| [10, 1, 0, i]).collect();
        s.apply_address(
            "demo/many.demo.svc.cluster.local",
            "1",
            &service("many.demo.svc.cluster.local", &many),
        )
        .expect("many");
    }
    let dns = Arc::new(PodDns {
        namespace: "demo".into(),
        canonical: ("client".into(), "latest".into()),
        netns: Arc::new(Netns::host().expect("this process's netns")),
        state,
        answering: Answering { cluster_domain: "cluster.local".into(), ttl: 30 },
        upstreams: Arc::new(Upstreams { servers: vec![upstream], timeout: Duration::from_millis(300) }),
        sockets: Arc::new(LocalSockets),
        mark: 0,
        metrics: DnsMetrics::new(),
    });
    let stop = CancellationToken::new();
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (udp_addr, tcp_addr) = (udp.local_addr().expect("addr"), tcp.local_addr().expect("addr"));
    tokio::spawn(serve_udp(udp, dns.clone(), stop.clone()));
    tokio::spawn(serve_tcp(tcp, dns, stop.clone()));
    Served { udp: udp_addr, tcp: tcp_addr, _stop: stop.drop_guard() }
}

/// Sends one datagram; the answer, if one comes within a second.
async fn ask_udp(server: SocketAddr, message: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    sock.send_to(message, server).await.expect("send");
    let mut buf = vec![0u8; 65535];
    let (n, _) =
        tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await.ok()?.expect("recv");
    buf.truncate(n);
    Some(buf)
}

#[tokio::test]
async fn over_udp_mesh_names_are_answered_others_forwarded_and_junk_dropped() {
    let served = serve(upstream(false).await).await;
    let a = ask_udp(served.udp, &query(1, "web", wire::TYPE_A, None)).await.expect("answered");
    let r = parse_response(&a).expect("well formed");
    assert_eq!((r.id, r.rcode, r.addresses), (1, 0, vec![std::net::IpAddr::from([10, 96, 0, 10])]));

    let q = query(2, "example.org", wire::TYPE_A, None);
    let mut forwarded = q.clone();
    forwarded[2] |= 0x80;
    assert_eq!(ask_udp(served.udp, &q).await, Some(forwarded), "the upstream's answer, unchanged");

    let mut response = query(3, "web", wire::TYPE_A, None);
    response[2] |= 0x80;
    assert_eq!(ask_udp(served.udp, &response).await, None, "a response is never answered");
    // Still serving after it.
    assert!(ask_udp(served.udp, &query(4, "web", wire::TYPE_A, None)).await.is_some());
}

#[tokio::test]
async fn a_silent_upstream_is_servfail() {
    let served = serve(upstream(true).await).await;
    let a = ask_udp(served.udp, &query(5, "example.org", wire::TYPE_A, None)).await.expect("answered");
    assert_eq!(parse_response(&a).expect("well formed").rcode, Rcode::ServFail as u8);
}

#[tokio::test]
async fn over_tcp_a_truncated_udp_answer_comes_whole_and_a_connection_carries_several() {
    let served = serve(upstream(false).await).await;
    let q = query(6, "many", wire::TYPE_A, None);
    let udp = ask_udp(served.udp, &q).await.expect("answered");
    assert!(parse_response(&udp).expect("well formed").truncated);

    let mut stream = TcpStream::connect(served.tcp).await.expect("connect");
    for id in [7u16, 8] {
        let q = query(id, "many", wire::TYPE_A, None);
        stream.write_all(&(q.len() as u16).to_be_bytes()).await.expect("write");
        stream.write_all(&q).await.expect("write");
        let n = stream.read_u16().await.expect("length") as usize;
        let mut a = vec![0u8; n];
        stream.read_exact(&mut a).await.expect("answer");
        let r = parse_response(&a).expect("well formed");
        assert_eq!((r.id, r.truncated, r.addresses.len()), (id, false, 100));
    }
}
