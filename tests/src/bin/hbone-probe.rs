//! A small HBONE client of the project's own, to drive the inbound side the way a peer (or an
//! attacker) would:
//!
//! `hbone-probe <ip:15008> <authority> [--cert PEM --key PEM] [--tls12] [--header-bytes N]`
//!
//! Connects, does TLS (ALPN h2, no SNI; the server certificate is not checked: the probe tests
//! the server), HTTP/2, one CONNECT to `authority`, and prints one line:
//! `status <code>` when the server answered, or `refused <stage>: <error>` when the connection
//! failed at `connect`, `tls`, `http2` or `connect-request`. On 200 it also sends `ping\n` and
//! prints `echo <line>` if the far end echoes. `--header-bytes N` adds a header of N bytes;
//! `--forwarded VALUE` a `forwarded` header (a client claiming another address).
//!
//! Hostile modes, for the inbound limits:
//! - `--idle tcp|tls`: connect (and do TLS), then send nothing; prints `closed after <ms> ms`
//!   when the server hangs up, `open` if it has not within 14 s.
//! - `--streams N`: N CONNECTs at once on one connection, held open; prints
//!   `answered <k> of <n>` after 3 s.
//! - `--connections N`: N connections one after another, each holding one CONNECT; prints
//!   `ok <k> refused <m>`.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{ring, verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    DigitallySignedStruct, SignatureScheme,
};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName, UnixTime};

#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn tls_config(args: &[String]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = if args.iter().any(|a| a == "--tls12") {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)));
    let mut config = match (arg(args, "--cert"), arg(args, "--key")) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
                .expect("cert file")
                .collect::<Result<_, _>>()
                .expect("PEM certs");
            let key = PrivateKeyDer::from_pem_file(&key).expect("key file");
            builder.with_client_auth_cert(chain, key).expect("client cert")
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.enable_sni = false;
    Arc::new(config)
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn tls(target: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Result<Tls, String> {
    let tcp = tokio::net::TcpStream::connect(target).await.map_err(|e| format!("refused connect: {e}"))?;
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(ServerName::IpAddress(target.ip().into()), tcp)
        .await
        .map_err(|e| format!("refused tls: {e}"))
}

/// TLS and HTTP/2, ready for requests.
async fn open(target: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Result<SendRequest<Bytes>, String> {
    let tls = tls(target, config).await?;
    // With TLS 1.3 the server checks the client certificate after the client finished: a
    // refusal shows up on the first use of the connection.
    let (send, conn) = h2::client::handshake(tls).await.map_err(|e| format!("refused http2: {e}"))?;
    tokio::spawn(async move {
        let _ended = conn.await;
    });
    send.ready().await.map_err(|e| format!("refused http2: {e}"))
}

/// One CONNECT; its status, or why there is none.
async fn connect(
    send: &mut SendRequest<Bytes>,
    authority: &str,
    pad: usize,
    forwarded: Option<&str>,
) -> Result<(u16, h2::SendStream<Bytes>, h2::RecvStream), String> {
    let mut req = http::Request::builder().method(http::Method::CONNECT).uri(authority);
    if pad > 0 {
        req = req.header("x-pad", "p".repeat(pad));
    }
    if let Some(f) = forwarded {
        req = req.header("forwarded", f);
    }
    let req = req.body(()).expect("request");
    let mut send = send.clone().ready().await.map_err(|e| format!("refused http2: {e}"))?;
    let (resp, stream) =
        send.send_request(req, false).map_err(|e| format!("refused connect-request: {e}"))?;
    let resp = resp.await.map_err(|e| format!("refused connect-request: {e}"))?;
    Ok((resp.status().as_u16(), stream, resp.into_body()))
}

async fn probe(args: Vec<String>) -> String {
    let target: SocketAddr = args[1].parse().expect("target ip:port");
    let authority = args[2].clone();
    let config = tls_config(&args);
    let pad: usize = arg(&args, "--header-bytes").map_or(0, |n| n.parse().expect("--header-bytes N"));
    let mut send = match open(target, &config).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let forwarded = arg(&args, "--forwarded");
    let (status, mut stream, mut body) = match connect(&mut send, &authority, pad, forwarded.as_deref()).await
    {
        Ok(x) => x,
        Err(e) => return e,
    };
    if status != 200 {
        return format!("status {status}");
    }
    if stream.send_data(Bytes::from_static(b"ping\n"), false).is_err() {
        return "status 200".into();
    }
    match tokio::time::timeout(Duration::from_secs(5), body.data()).await {
        Ok(Some(Ok(data))) => format!("status 200\necho {}", String::from_utf8_lossy(&data).trim()),
        _ => "status 200".into(),
    }
}

/// Connects (and does TLS with `tls`), then waits for the server to hang up.
async fn idle(target: SocketAddr, stage: &str, config: &Arc<rustls::ClientConfig>) -> String {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let closed = if stage == "tls" {
        let mut t = match tls(target, config).await {
            Ok(t) => t,
            Err(e) => return e,
        };
        tokio::time::timeout(Duration::from_secs(14), async {
            while t.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await
    } else {
        let mut t = match tokio::net::TcpStream::connect(target).await {
            Ok(t) => t,
            Err(e) => return format!("refused connect: {e}"),
        };
        tokio::time::timeout(Duration::from_secs(14), async {
            while t.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await
    };
    match closed {
        Ok(()) => format!("closed after {} ms", started.elapsed().as_millis()),
        Err(_) => "open".into(),
    }
}

/// `n` CONNECTs at once on one connection, held; how many were answered.
async fn streams(
    target: SocketAddr,
    authority: &str,
    n: usize,
    config: &Arc<rustls::ClientConfig>,
) -> String {
    let send = match open(target, config).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut held = Vec::new();
    for _ in 0..n {
        let (mut send, authority, answered) = (send.clone(), authority.to_string(), answered.clone());
        held.push(tokio::spawn(async move {
            if let Ok((200, stream, body)) = connect(&mut send, &authority, 0, None).await {
                answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Held open until the probe exits.
                std::future::pending::<()>().await;
                drop((stream, body));
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    format!("answered {} of {n}", answered.load(std::sync::atomic::Ordering::SeqCst))
}

/// `n` connections, each holding one CONNECT.
async fn connections(
    target: SocketAddr,
    authority: &str,
    n: usize,
    config: &Arc<rustls::ClientConfig>,
) -> String {
    let (mut ok, mut refused) = (0, 0);
    let mut held = Vec::new();
    for _ in 0..n {
        let r = match open(target, config).await {
            Ok(mut send) => connect(&mut send, authority, 0, None).await.map(|x| (send, x)),
            Err(e) => Err(e),
        };
        match r {
            Ok((send, (200, stream, body))) => {
                ok += 1;
                held.push((send, stream, body));
            }
            _ => refused += 1,
        }
    }
    format!("ok {ok} refused {refused}")
}

async fn run(args: Vec<String>) -> String {
    let target: SocketAddr = args[1].parse().expect("target ip:port");
    let config = tls_config(&args);
    let count =
        |name: &str| arg(&args, name).map(|n| n.parse::<usize>().unwrap_or_else(|_| panic!("{name} N")));
    if let Some(stage) = arg(&args, "--idle") {
        idle(target, &stage, &config).await
    } else if let Some(n) = count("--streams") {
        streams(target, &args[2], n, &config).await
    } else if let Some(n) = count("--connections") {
        connections(target, &args[2], n, &config).await
    } else {
        probe(args).await
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: hbone-probe <ip:port> <authority> [--cert PEM --key PEM] [--tls12] [--header-bytes N] [--forwarded VALUE | --idle tcp|tls | --streams N | --connections N]");
        std::process::exit(64);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let out = rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), run(args)).await });
    println!("{}", out.unwrap_or_else(|_| "refused timeout".into()));
}
