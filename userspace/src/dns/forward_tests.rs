//! Against scripted upstreams on loopback: they answer, stay silent, or send a stray answer
//! first — faults a real resolver does not produce on demand (the integration tests forward
//! to a real one).

use std::sync::Arc;

use super::*;
use crate::dns::wire::tests::query;

/// A UDP "resolver" on loopback that answers each query with `reply(query)` (None: silence).
async fn udp_upstream(reply: impl Fn(&[u8]) -> Vec<Vec<u8>> + Send + Sync + 'static) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let addr = sock.local_addr().expect("addr");
    let reply = Arc::new(reply);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            for answer in reply(&buf[..n]) {
                let _ignored_in_a_fake = sock.send_to(&answer, from).await;
            }
        }
    });
    addr
}

/// An answer to `q`: the query with QR set.
fn answer_to(q: &[u8]) -> Vec<u8> {
    let mut a = q.to_vec();
    a[2] |= 0x80;
    a
}

fn local(_: SocketAddr) -> io::Result<UdpSocket> {
    let std = std::net::UdpSocket::bind("127.0.0.1:0")?;
    std.set_nonblocking(true)?;
    UdpSocket::from_std(std)
}

fn upstreams(servers: Vec<SocketAddr>) -> Upstreams {
    Upstreams { servers, timeout: Duration::from_millis(300) }
}

#[test]
fn nameservers_are_read_as_glibc_reads_them() {
    let conf = "search demo.svc.cluster.local svc.cluster.local\n# a comment\nnameserver 10.96.0.10\n\
                options ndots:5\nnameserver fe80::1%eth0\nnameserver bogus\nnameserver 1.1.1.1\nnameserver 8.8.8.8\n";
    let got = nameservers(conf);
    let want: Vec<SocketAddr> =
        ["10.96.0.10:53", "[fe80::1]:53", "1.1.1.1:53"].iter().map(|s| s.parse().expect("addr")).collect();
    assert_eq!(got, want);
    assert!(nameservers("").is_empty());
}

#[tokio::test]
async fn the_answer_comes_back_unchanged_and_a_stray_one_is_skipped() {
    let server = udp_upstream(|q| {
        let mut stray = answer_to(q);
        stray[0] ^= 0xFF;
        vec![stray, answer_to(q)]
    })
    .await;
    let q = query(0x1234, "example.org", 1, None);
    let got = upstreams(vec![server]).udp(&q, local).await.expect("answered");
    assert_eq!(got, answer_to(&q));
}

#[tokio::test]
async fn a_silent_server_is_passed_over_and_no_answer_is_an_error() {
    let silent = udp_upstream(|_| vec![]).await;
    let good = udp_upstream(|q| vec![answer_to(q)]).await;
    let q = query(7, "example.org", 1, None);
    let got = upstreams(vec![silent, good]).udp(&q, local).await.expect("the second answers");
    assert_eq!(got, answer_to(&q));
    let e = upstreams(vec![silent]).udp(&q, local).await.expect_err("nobody answers");
    assert!(matches!(e, ForwardError::Timeout { servers: 1, .. }), "{e}");
    assert!(matches!(upstreams(vec![]).udp(&q, local).await, Err(ForwardError::NoServers)));
}

#[tokio::test]
async fn over_tcp_one_framed_message_each_way() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let n = s.read_u16().await.expect("length") as usize;
            let mut q = vec![0u8; n];
            s.read_exact(&mut q).await.expect("query");
            // A large answer, as a truncated UDP one is retried for.
            let mut a = answer_to(&q);
            a.extend(std::iter::repeat_n(0u8, 4000));
            s.write_all(&(a.len() as u16).to_be_bytes()).await.expect("write");
            s.write_all(&a).await.expect("write");
        }
    });
    let q = query(9, "big.example.org", 1, None);
    let got = upstreams(vec![server]).tcp(&q, TcpStream::connect).await.expect("answered");
    assert_eq!(got.len(), q.len() + 4000);
    assert_eq!(&got[..q.len()], &answer_to(&q)[..]);
}
