//! The proxy's HTTP endpoints:
//! - admin (default 127.0.0.1:15000): `GET /config_dump`, `POST /quitquitquit`,
//!   `GET|POST /logging` (the log filter; `?level=<clauses>[&reset]` in ztunnel's syntax,
//!   `?ebpf=<level>` for the programs' own logs), `GET /trace` (kernel events, one JSON object per line, filtered by
//!   `?namespace=&workload=&peer=&kind=&leg=`; what `ambit trace` reads), `GET|POST /tracing`
//!   (`?enabled=true|false`: kernel tracing on or off without a reload), `GET
//!   /debug/pprof/profile?seconds=N` (a CPU profile, pprof's protobuf), `GET /debug/pprof/heap`
//!   (the sampled live heap, pprof's protobuf);
//! - stats (default 15020): `GET /stats/prometheus` (also `/metrics`);
//! - readiness (default 15021): `GET /healthz/ready`, 200 once the programs are attached and
//!   the first pod set is enrolled, 503 with the reason before; `GET /healthz/live`, 200
//!   while the process serves (the liveness probe).
//!
//! The endpoints serve from the first second of a start; what they show of the process comes
//! from a [`View`], handed over once the process is built, and is computed when asked.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock},
};

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    capture::{klog::KernelLogLevel, CaptureError},
    metrics::Metrics,
};

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    Admin,
    Stats,
    Readiness,
}

/// What the admin endpoints show of a built process (the node, the embedded control plane).
pub trait View: Send + Sync {
    /// The config dump, as of now.
    fn config_dump(&self) -> BoxFuture<'_, serde_json::Value>;
    /// `None` when ready, else why not.
    fn not_ready(&self) -> Option<String>;
    /// The programs' switches, when this process loaded them.
    fn kernel(&self) -> Option<&dyn KernelSwitches> {
        None
    }
}

/// The eBPF programs' runtime switches (`/logging?ebpf=`, `/tracing`) and their events
/// (`/trace`); switched in the programs' config map, without a reload.
pub trait KernelSwitches: Send + Sync {
    fn log_level(&self) -> Result<KernelLogLevel, CaptureError>;
    fn set_log_level(&self, level: KernelLogLevel) -> Result<(), CaptureError>;
    fn tracing(&self) -> Result<bool, CaptureError>;
    fn set_tracing(&self, on: bool) -> Result<(), CaptureError>;
    /// Kernel events, when their reader runs (`--kernel-tracing` at start).
    fn tracer(&self) -> Option<crate::trace::Tracer>;
}

/// Where a process is in its life, as far as readiness goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not built yet: the reason, for `/healthz/ready`.
    Starting(String),
    /// Built: the [`View`] says whether it is ready.
    Serving,
    /// Stopping: never ready again.
    Draining,
}

type Body = BoxBody<Bytes, Infallible>;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    phase: Mutex<Phase>,
    view: OnceLock<Arc<dyn View>>,
    /// Cancelled by `/quitquitquit`.
    pub shutdown: CancellationToken,
}

impl AdminState {
    pub fn new(metrics: Arc<Metrics>, shutdown: CancellationToken) -> AdminState {
        AdminState {
            metrics,
            phase: Mutex::new(Phase::Starting("starting".into())),
            view: OnceLock::new(),
            shutdown,
        }
    }

    pub fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = phase;
    }

    /// Hands over what the endpoints show; once (a second view is a wiring mistake, ignored
    /// with a warning).
    pub fn set_view(&self, view: Arc<dyn View>) {
        if self.view.set(view).is_err() {
            tracing::warn!("the admin view was set twice; the first one stays");
        }
    }

    /// `None` when ready, else why not.
    pub fn not_ready(&self) -> Option<String> {
        match &*self.phase.lock().unwrap_or_else(|p| p.into_inner()) {
            Phase::Starting(why) => Some(why.clone()),
            Phase::Draining => Some("draining".into()),
            Phase::Serving => match self.view.get() {
                Some(v) => v.not_ready(),
                None => Some("starting".into()),
            },
        }
    }

    fn kernel(&self) -> Option<&dyn KernelSwitches> {
        self.view.get().and_then(|v| v.kernel())
    }

    async fn config_dump(&self) -> serde_json::Value {
        match self.view.get() {
            Some(v) => v.config_dump().await,
            None => serde_json::json!({ "starting": true }),
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r
}

/// `GET /logging`: the filters in force; `POST /logging?level=..[&reset]&ebpf=..`: changes
/// them (`level` in ztunnel's syntax, see `telemetry::change_filter`).
fn logging(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let kernel = state.kernel();
    if req.method() == Method::POST {
        let params: Vec<(String, String)> =
            form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        // ztunnel's `level` and `reset` (one change, merged into the filter in force), ours
        // `ebpf`; anything else is refused before anything changes.
        if let Some((other, _)) =
            params.iter().find(|(k, _)| !matches!(k.as_str(), "level" | "reset" | "ebpf"))
        {
            return text(
                StatusCode::BAD_REQUEST,
                format!("unknown parameter {other:?} (level, reset, ebpf)\n"),
            );
        }
        let level = params.iter().find(|(k, _)| k == "level").map(|(_, v)| v.as_str());
        let reset = params.iter().any(|(k, _)| k == "reset");
        if level.is_some() || reset {
            if let Err(e) = crate::telemetry::change_filter(level, reset) {
                return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
            }
        }
        for (_, v) in params.iter().filter(|(k, _)| k == "ebpf") {
            let changed = match (<KernelLogLevel as clap::ValueEnum>::from_str(v, true), kernel) {
                (Err(_), _) => Err(format!("ebpf={v}: one of off, error, warn, info, debug")),
                (Ok(_), None) => Err("the eBPF programs are not loaded".into()),
                (Ok(level), Some(k)) => k.set_log_level(level).map_err(|e| e.to_string()).map(|()| {
                    // The records pass the process filter only if it lets them.
                    if let Some(d) = level.directive() {
                        let filter = crate::telemetry::current_filter();
                        if !filter.contains("ebpf=") {
                            let _kept_as_it_was = crate::telemetry::set_filter(&format!("{filter},{d}"));
                        }
                    }
                    tracing::info!(level = ?level, "eBPF log level changed");
                }),
            };
            if let Err(e) = changed {
                return text(StatusCode::BAD_REQUEST, format!("{e}\n"));
            }
        }
    }
    let ebpf = match kernel.map(|k| k.log_level()) {
        None => "-".to_string(),
        Some(Ok(l)) => format!("{l:?}").to_lowercase(),
        Some(Err(e)) => format!("unknown ({e})"),
    };
    text(StatusCode::OK, format!("level: {}\nebpf: {ebpf}\n", crate::telemetry::current_filter()))
}

/// `GET /tracing`: whether kernel tracing is on; `POST /tracing?enabled=true|false` switches
/// it in the programs (no reload): off, they skip it entirely.
fn tracing_switch(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let Some(kernel) = state.kernel() else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "the eBPF programs are not loaded\n");
    };
    if req.method() == Method::POST {
        let want = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .find(|(k, _)| k == "enabled")
            .map(|(_, v)| v.into_owned());
        let enabled = match want.as_deref() {
            Some("true") => true,
            Some("false") => false,
            _ => return text(StatusCode::BAD_REQUEST, "expected ?enabled=true or ?enabled=false\n"),
        };
        if let Err(e) = kernel.set_tracing(enabled) {
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
        }
        tracing::info!(enabled, "kernel tracing switched");
    }
    match kernel.tracing() {
        Ok(on) => text(StatusCode::OK, format!("kernel tracing: {}\n", if on { "on" } else { "off" })),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// `GET /trace`: kernel events as they come, one JSON object per line, until the client goes.
fn trace(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let Some(tracer) = state.kernel().and_then(|k| k.tracer()) else {
        return text(StatusCode::SERVICE_UNAVAILABLE, "kernel tracing is off (--kernel-tracing false)\n");
    };
    let filter = crate::trace::Filter::from_query(req.uri().query().unwrap_or(""));
    let rx = tracer.subscribe();
    let lines = futures::stream::unfold((rx, filter), |(mut rx, filter)| async move {
        loop {
            match rx.recv().await {
                Ok(e) if filter.admits(&e) => {
                    let mut line = serde_json::to_vec(&*e).unwrap_or_default();
                    line.push(b'\n');
                    return Some((
                        Ok::<_, Infallible>(hyper::body::Frame::data(Bytes::from(line))),
                        (rx, filter),
                    ));
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lost = n, "a /trace client fell behind; events skipped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    let mut r = Response::new(BodyExt::boxed(StreamBody::new(lines)));
    r.headers_mut().insert("content-type", "application/x-ndjson".parse().expect("static"));
    r
}

/// `GET /debug/pprof/profile?seconds=N` (default 10, at most 60): a CPU profile in pprof's
/// protobuf format, as ztunnel serves it (`go tool pprof` reads it).
async fn cpu_profile(req: &Request<Incoming>) -> Response<Body> {
    let seconds = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "seconds")
        .map(|(_, v)| v.into_owned());
    let max = crate::profiling::MAX.as_secs();
    let seconds = match seconds.as_deref().map(str::parse::<u64>) {
        None => 10,
        Some(Ok(n)) if (1..=max).contains(&n) => n,
        Some(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("seconds: expected a whole number from 1 to {max}\n"),
            )
        }
    };
    let slot = match crate::profiling::reserve() {
        Ok(s) => s,
        Err(e) => return text(StatusCode::CONFLICT, format!("{e}\n")),
    };
    match crate::profiling::cpu(std::time::Duration::from_secs(seconds), slot).await {
        Ok(profile) => octets(profile),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

/// `GET /debug/pprof/heap`: the live heap as the sampler sees it, pprof's protobuf format
/// (`inuse_objects`, `inuse_space`), as ztunnel serves it.
async fn heap_profile() -> Response<Body> {
    match crate::profiling::heap_profile().await {
        Ok(profile) => octets(profile),
        Err(e @ crate::profiling::ProfileError::HeapOff) => text(StatusCode::CONFLICT, format!("{e}\n")),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    }
}

fn octets(body: Vec<u8>) -> Response<Body> {
    let mut r = text(StatusCode::OK, body);
    r.headers_mut().insert("content-type", "application/octet-stream".parse().expect("static"));
    r
}

async fn route(routes: Routes, state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    match (routes, req.method(), req.uri().path()) {
        (Routes::Admin, &Method::GET, "/config_dump") => {
            let body = serde_json::to_vec_pretty(&state.config_dump().await).unwrap_or_default();
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert("content-type", "application/json".parse().expect("static"));
            r
        }
        (Routes::Admin, &Method::POST, "/quitquitquit") => {
            tracing::info!("shutdown requested through /quitquitquit");
            state.shutdown.cancel();
            text(StatusCode::OK, "OK\n")
        }
        (Routes::Admin, &Method::GET | &Method::POST, "/logging") => logging(state, req),
        (Routes::Admin, &Method::GET, "/trace") => trace(state, req),
        (Routes::Admin, &Method::GET, "/debug/pprof/profile") => cpu_profile(req).await,
        (Routes::Admin, &Method::GET, "/debug/pprof/heap") => heap_profile().await,
        (Routes::Admin, &Method::GET | &Method::POST, "/tracing") => tracing_switch(state, req),
        (Routes::Stats, &Method::GET, "/stats/prometheus" | "/metrics") => {
            let mut r = text(StatusCode::OK, state.metrics.render());
            r.headers_mut().insert("content-type", "text/plain; version=0.0.4".parse().expect("static"));
            r
        }
        (Routes::Readiness, &Method::GET, "/healthz/ready") => match state.not_ready().as_deref() {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        // Liveness: the process serves. Not readiness: a proxy waiting for istiod must not
        // be restarted for it.
        (Routes::Readiness, &Method::GET, "/healthz/live") => text(StatusCode::OK, "live\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Binds `addr` for `routes`; fails (so the caller can report it at start) if it cannot.
/// Binds with SO_REUSEPORT: during an upgrade (`--takeover`) the successor serves these
/// ports alongside the draining proxy (which answers readiness with 503).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    TcpListener::from_std(sock.into())
}

/// Serves until `stop` is cancelled.
pub async fn serve(listener: TcpListener, routes: Routes, state: Arc<AdminState>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(?routes, error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(routes, &state, &req).await) }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "admin connection");
            }
        });
    }
}

#[cfg(test)]
mod tests;
