//! The endpoints over real HTTP on loopback, with a scripted [`View`] and kernel switches.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

#[derive(Default)]
struct FakeKernel {
    level: AtomicU8,
    tracing: AtomicBool,
}

impl KernelSwitches for FakeKernel {
    fn log_level(&self) -> Result<KernelLogLevel, CaptureError> {
        Ok(KernelLogLevel::from_raw(self.level.load(Ordering::SeqCst)).expect("a level"))
    }
    fn set_log_level(&self, level: KernelLogLevel) -> Result<(), CaptureError> {
        self.level.store(level as u8, Ordering::SeqCst);
        Ok(())
    }
    fn tracing(&self) -> Result<bool, CaptureError> {
        Ok(self.tracing.load(Ordering::SeqCst))
    }
    fn set_tracing(&self, on: bool) -> Result<(), CaptureError> {
        self.tracing.store(on, Ordering::SeqCst);
        Ok(())
    }
    fn tracer(&self) -> Option<crate::trace::Tracer> {
        None
    }
}

#[derive(Default)]
struct FakeView {
    not_ready: Mutex<Option<String>>,
    kernel: Option<FakeKernel>,
}

impl View for FakeView {
    fn config_dump(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async { serde_json::json!({ "workloads": [], "asked": true }) })
    }
    fn not_ready(&self) -> Option<String> {
        self.not_ready.lock().expect("lock").clone()
    }
    fn kernel(&self) -> Option<&dyn KernelSwitches> {
        self.kernel.as_ref().map(|k| k as &dyn KernelSwitches)
    }
}

/// The endpoints of `routes` for `state`, on an ephemeral loopback port.
async fn serving(routes: Routes, state: Arc<AdminState>) -> SocketAddr {
    let listener = bind("127.0.0.1:0".parse().expect("addr")).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(serve(listener, routes, state.clone(), state.shutdown.clone()));
    addr
}

/// Status code and body of one request.
async fn call(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req =
        format!("{method} {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .expect("answered in time")
        .expect("read");
    let status = out.split(' ').nth(1).and_then(|c| c.parse().ok()).expect("a status line");
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn state() -> Arc<AdminState> {
    Arc::new(AdminState::new(Arc::new(Metrics::new()), CancellationToken::new()))
}

#[tokio::test]
async fn readiness_follows_the_phase_then_the_view() {
    let state = state();
    let addr = serving(Routes::Readiness, state.clone()).await;
    assert_eq!(call(addr, "GET", "/healthz/ready").await, (503, "not ready: starting\n".into()));
    assert_eq!(call(addr, "GET", "/healthz/live").await.0, 200, "live while not ready");

    state.set_phase(Phase::Starting("waiting for the first pod list".into()));
    assert_eq!(call(addr, "GET", "/healthz/ready").await.1, "not ready: waiting for the first pod list\n");

    // Serving without a view yet is still starting.
    state.set_phase(Phase::Serving);
    assert_eq!(call(addr, "GET", "/healthz/ready").await.0, 503);

    let view = Arc::new(FakeView::default());
    *view.not_ready.lock().expect("lock") = Some("waiting for workload certificates".into());
    state.set_view(view.clone());
    assert_eq!(call(addr, "GET", "/healthz/ready").await.1, "not ready: waiting for workload certificates\n");
    // Asked each time: no refresh is needed for a change to show.
    *view.not_ready.lock().expect("lock") = None;
    assert_eq!(call(addr, "GET", "/healthz/ready").await, (200, "ready\n".into()));

    state.set_phase(Phase::Draining);
    assert_eq!(call(addr, "GET", "/healthz/ready").await, (503, "not ready: draining\n".into()));
}

#[tokio::test]
async fn the_dump_is_the_views_and_routes_stay_on_their_listener() {
    let state = state();
    let admin = serving(Routes::Admin, state.clone()).await;
    let stats = serving(Routes::Stats, state.clone()).await;
    let (status, body) = call(admin, "GET", "/config_dump").await;
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).expect("json")["starting"], true);

    state.set_view(Arc::new(FakeView::default()));
    let (_, body) = call(admin, "GET", "/config_dump").await;
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).expect("json")["asked"], true);

    assert_eq!(call(stats, "GET", "/config_dump").await.0, 404, "the dump is not on the stats port");
    assert_eq!(call(admin, "GET", "/stats/prometheus").await.0, 404);
    assert_eq!(call(stats, "GET", "/metrics").await.0, 200);
    assert_eq!(call(admin, "GET", "/nothing").await.0, 404);

    assert!(!state.shutdown.is_cancelled());
    assert_eq!(call(admin, "POST", "/quitquitquit").await.0, 200);
    assert!(state.shutdown.is_cancelled());
}

#[tokio::test]
async fn kernel_switches_change_the_programs_config_or_say_why_not() {
    let state = state();
    let addr = serving(Routes::Admin, state.clone()).await;
    // No programs (the control plane, or a node not built yet).
    assert_eq!(call(addr, "GET", "/tracing").await.0, 503);
    assert_eq!(
        call(addr, "POST", "/logging?ebpf=debug").await,
        (400, "the eBPF programs are not loaded\n".into())
    );
    assert!(call(addr, "GET", "/logging").await.1.contains("ebpf: -\n"));
    assert_eq!(call(addr, "GET", "/trace").await.0, 503);

    let view = Arc::new(FakeView { kernel: Some(FakeKernel::default()), ..FakeView::default() });
    state.set_view(view.clone());
    let kernel = view.kernel.as_ref().expect("kernel");

    assert_eq!(call(addr, "POST", "/tracing?enabled=true").await, (200, "kernel tracing: on\n".into()));
    assert!(kernel.tracing.load(Ordering::SeqCst));
    assert_eq!(call(addr, "POST", "/tracing?enabled=maybe").await.0, 400);
    assert!(kernel.tracing.load(Ordering::SeqCst), "a bad request changes nothing");
    assert_eq!(call(addr, "POST", "/tracing?enabled=false").await.1, "kernel tracing: off\n");

    assert_eq!(call(addr, "POST", "/logging?ebpf=warn").await.0, 200);
    assert_eq!(kernel.level.load(Ordering::SeqCst), KernelLogLevel::Warn as u8);
    assert!(call(addr, "GET", "/logging").await.1.contains("ebpf: warn\n"));
    let (status, body) = call(addr, "POST", "/logging?ebpf=loud").await;
    assert_eq!((status, body.as_str()), (400, "ebpf=loud: one of off, error, warn, info, debug\n"));
    assert_eq!(call(addr, "POST", "/logging?colour=red").await.0, 400, "unknown parameters are refused");
    assert_eq!(kernel.level.load(Ordering::SeqCst), KernelLogLevel::Warn as u8, "unchanged by refusals");
}
