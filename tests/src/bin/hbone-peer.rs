//! An HBONE server of the project's own, playing a destination node's 15008 so a test can see
//! what a source proxy puts on the wire and when:
//!
//! `hbone-peer <listen ip:port> --cert PEM --key PEM [--wait-ms N]`
//!
//! Serves TLS 1.3 (ALPN h2, the given certificate, no client certificate asked) and HTTP/2.
//! For each CONNECT it waits up to `--wait-ms` (default 1000) for the stream's first DATA
//! *before* answering, and prints one line: `connect <authority> early <n>: <first line>`,
//! where `n` is how many bytes came with the CONNECT, ahead of the 200. Then it answers 200
//! and serves the stream: a stream that began with `GET ` gets a small HTTP response
//! (`ok`) and ends; any other is echoed until the client ends it. Prints `listening` once
//! it accepts connections; runs until killed.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn tls_config(cert: &str, key: &str) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).expect("cert file").collect::<Result<_, _>>().expect("PEM certs");
    let key = PrivateKeyDer::from_pem_file(key).expect("key file");
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("certificate and key");
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

const HTTP_OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n";

/// One CONNECT: what came ahead of the answer, then the answer and the stream's bytes.
async fn stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    wait: Duration,
) -> Result<(), h2::Error> {
    let authority = req.uri().authority().map_or_else(|| "-".to_string(), |a| a.to_string());
    let mut body = req.into_body();
    let early = match tokio::time::timeout(wait, body.data()).await {
        Ok(Some(data)) => data?,
        // Ended or not there in time: nothing came with the CONNECT.
        Ok(None) | Err(_) => Bytes::new(),
    };
    let first = String::from_utf8_lossy(&early);
    println!("connect {authority} early {}: {}", early.len(), first.lines().next().unwrap_or(""));
    let ok = http::Response::builder().status(200).body(()).expect("a status-only response");
    let mut send = respond.send_response(ok, false)?;
    // Fails only once the stream is gone, which the next read reports.
    let _credit = body.flow_control().release_capacity(early.len());
    if early.starts_with(b"GET ") {
        send.send_data(Bytes::from_static(HTTP_OK), true)?;
        return Ok(());
    }
    if !early.is_empty() {
        send.send_data(early.clone(), false)?;
    }
    let mut first = early.is_empty();
    while let Some(data) = body.data().await {
        let data = data?;
        let _credit = body.flow_control().release_capacity(data.len());
        // A request that came after the answer (the client had not sent it yet when its
        // proxy opened the tunnel) is still answered as one.
        if std::mem::take(&mut first) && data.starts_with(b"GET ") {
            send.send_data(Bytes::from_static(HTTP_OK), true)?;
            return Ok(());
        }
        send.send_data(data, false)?;
    }
    send.send_data(Bytes::new(), true)
}

async fn connection(tcp: tokio::net::TcpStream, tls: tokio_rustls::TlsAcceptor, wait: Duration) {
    let Ok(tls) = tls.accept(tcp).await else { return };
    let Ok(mut conn) = h2::server::handshake(tls).await else { return };
    while let Some(Ok((req, respond))) = conn.accept().await {
        tokio::spawn(async move {
            if let Err(e) = stream(req, respond, wait).await {
                println!("stream error: {e}");
            }
        });
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(listen), Some(cert), Some(key)) =
        (args.get(1).and_then(|a| a.parse::<SocketAddr>().ok()), arg(&args, "--cert"), arg(&args, "--key"))
    else {
        eprintln!("usage: hbone-peer <listen ip:port> --cert PEM --key PEM [--wait-ms N]");
        std::process::exit(64);
    };
    let wait =
        Duration::from_millis(arg(&args, "--wait-ms").map_or(1000, |n| n.parse().expect("--wait-ms N")));
    let acceptor = tokio_rustls::TlsAcceptor::from(tls_config(&cert, &key));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await.expect("bind");
        println!("listening");
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            tokio::spawn(connection(tcp, acceptor.clone(), wait));
        }
    });
}
