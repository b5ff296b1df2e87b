//! A small HBONE client of the project's own, to drive the inbound side the way a peer (or an
//! attacker) would:
//!
//! `hbone-probe <ip:15008> <authority> [--cert PEM --key PEM] [--tls12]`
//!
//! Connects, does TLS (ALPN h2, no SNI; the server certificate is not checked: the probe tests
//! the server), HTTP/2, one CONNECT to `authority`, and prints one line:
//! `status <code>` when the server answered, or `refused <stage>: <error>` when the connection
//! failed at `connect`, `tls`, `http2` or `connect-request`. On 200 it also sends `ping\n` and
//! prints `echo <line>` if the far end echoes.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{aws_lc_rs, verify_tls12_signature, verify_tls13_signature, CryptoProvider},
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

async fn probe(args: Vec<String>) -> String {
    let target: SocketAddr = args[1].parse().expect("target ip:port");
    let authority = args[2].clone();
    let provider = Arc::new(aws_lc_rs::default_provider());
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
    let mut config = match (arg(&args, "--cert"), arg(&args, "--key")) {
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
    let tcp = match tokio::net::TcpStream::connect(target).await {
        Ok(t) => t,
        Err(e) => return format!("refused connect: {e}"),
    };
    let tls = match tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::IpAddress(target.ip().into()), tcp)
        .await
    {
        Ok(t) => t,
        Err(e) => return format!("refused tls: {e}"),
    };
    // With TLS 1.3 the server checks the client certificate after the client finished: a
    // refusal shows up on the first use of the connection.
    let (send, conn) = match h2::client::handshake(tls).await {
        Ok(x) => x,
        Err(e) => return format!("refused http2: {e}"),
    };
    tokio::spawn(async move {
        let _ended = conn.await;
    });
    let mut send = match send.ready().await {
        Ok(s) => s,
        Err(e) => return format!("refused http2: {e}"),
    };
    let req =
        http::Request::builder().method(http::Method::CONNECT).uri(authority).body(()).expect("request");
    let (resp, mut stream) = match send.send_request(req, false) {
        Ok(x) => x,
        Err(e) => return format!("refused connect-request: {e}"),
    };
    let resp = match resp.await {
        Ok(r) => r,
        Err(e) => return format!("refused connect-request: {e}"),
    };
    let status = resp.status().as_u16();
    if status != 200 {
        return format!("status {status}");
    }
    let mut body = resp.into_body();
    if stream.send_data(Bytes::from_static(b"ping\n"), false).is_err() {
        return "status 200".into();
    }
    match tokio::time::timeout(Duration::from_secs(5), body.data()).await {
        Ok(Some(Ok(data))) => format!("status 200\necho {}", String::from_utf8_lossy(&data).trim()),
        _ => "status 200".into(),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: hbone-probe <ip:port> <authority> [--cert PEM --key PEM] [--tls12]");
        std::process::exit(64);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let out = rt.block_on(async { tokio::time::timeout(Duration::from_secs(15), probe(args)).await });
    println!("{}", out.unwrap_or_else(|_| "refused timeout".into()));
}
