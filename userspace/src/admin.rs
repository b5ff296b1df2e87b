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

use std::{convert::Infallible, net::SocketAddr, sync::Arc, sync::Mutex};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::{
    body::Incoming, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// Which endpoints a listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    Admin,
    Stats,
    Readiness,
}

/// Produces the live part of the config dump: an object merged into the cached one.
pub type LiveDump = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Sets the eBPF programs' log level.
pub type KernelLogSetter =
    Arc<dyn Fn(crate::capture::klog::KernelLogLevel) -> Result<(), String> + Send + Sync>;

type Body = BoxBody<Bytes, Infallible>;

pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// `None` when ready, else why not.
    not_ready: Mutex<Option<String>>,
    /// The latest config dump, refreshed by the node after every change.
    dump: Mutex<serde_json::Value>,
    /// Parts of the dump computed when it is requested (pools, certificates): they change
    /// without any event the node loop sees.
    live: Mutex<Option<LiveDump>>,
    /// Cancelled by `/quitquitquit`.
    pub shutdown: CancellationToken,
    /// Kernel events for `/trace` (none: tracing is off).
    tracer: Mutex<Option<crate::trace::Tracer>>,
    kernel_log: Mutex<Option<(KernelLogSetter, crate::capture::klog::KernelLogLevel)>>,
    kernel_tracing: Mutex<Option<(TracingSetter, bool)>>,
}

/// Turns kernel tracing on or off in the programs.
pub type TracingSetter = Arc<dyn Fn(bool) -> Result<(), String> + Send + Sync>;

impl AdminState {
    pub fn new(metrics: Arc<Metrics>, shutdown: CancellationToken) -> AdminState {
        AdminState {
            metrics,
            not_ready: Mutex::new(Some("starting".into())),
            dump: Mutex::new(serde_json::Value::Null),
            live: Mutex::new(None),
            shutdown,
            tracer: Mutex::new(None),
            kernel_log: Mutex::new(None),
            kernel_tracing: Mutex::new(None),
        }
    }

    /// How `POST /tracing?enabled=` switches kernel tracing, and whether it is on.
    pub fn set_kernel_tracing(&self, setter: TracingSetter, on: bool) {
        *self.kernel_tracing.lock().unwrap_or_else(|p| p.into_inner()) = Some((setter, on));
    }

    pub fn set_tracer(&self, tracer: crate::trace::Tracer) {
        *self.tracer.lock().unwrap_or_else(|p| p.into_inner()) = Some(tracer);
    }

    /// How `/logging?ebpf=` changes the programs' log level, and the level at start.
    pub fn set_kernel_log(&self, setter: KernelLogSetter, level: crate::capture::klog::KernelLogLevel) {
        *self.kernel_log.lock().unwrap_or_else(|p| p.into_inner()) = Some((setter, level));
    }

    pub fn set_ready(&self, not_ready: Option<String>) {
        *self.not_ready.lock().unwrap_or_else(|p| p.into_inner()) = not_ready;
    }

    pub fn set_dump(&self, dump: serde_json::Value) {
        *self.dump.lock().unwrap_or_else(|p| p.into_inner()) = dump;
    }

    pub fn set_live_dump(&self, live: LiveDump) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(live);
    }

    fn current_dump(&self) -> serde_json::Value {
        let mut dump = self.dump.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(live), Some(obj)) = (live, dump.as_object_mut()) {
            if let serde_json::Value::Object(extra) = live() {
                obj.extend(extra);
            }
        }
        dump
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
    use crate::capture::klog::KernelLogLevel;
    let mut kernel = state.kernel_log.lock().unwrap_or_else(|p| p.into_inner());
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
            let changed = match (<KernelLogLevel as clap::ValueEnum>::from_str(v, true), kernel.as_mut()) {
                (Err(_), _) => Err(format!("ebpf={v}: one of off, error, warn, info, debug")),
                (Ok(_), None) => Err("the eBPF programs are not loaded".into()),
                (Ok(level), Some((set, current))) => set(level).map(|()| {
                    *current = level;
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
    let ebpf = kernel.as_ref().map_or("-".to_string(), |(_, l)| format!("{l:?}").to_lowercase());
    text(StatusCode::OK, format!("level: {}\nebpf: {ebpf}\n", crate::telemetry::current_filter()))
}

/// `GET /tracing`: whether kernel tracing is on; `POST /tracing?enabled=true|false` switches
/// it in the programs (no reload): off, they skip it entirely.
fn tracing_switch(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let mut t = state.kernel_tracing.lock().unwrap_or_else(|p| p.into_inner());
    let Some((set, on)) = t.as_mut() else {
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
        if let Err(e) = set(enabled) {
            return text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n"));
        }
        *on = enabled;
        tracing::info!(enabled, "kernel tracing switched");
    }
    text(StatusCode::OK, format!("kernel tracing: {}\n", if *on { "on" } else { "off" }))
}

/// `GET /trace`: kernel events as they come, one JSON object per line, until the client goes.
fn trace(state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    let Some(tracer) = state.tracer.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
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

/// The profiles, served off the request path.
enum Profile {
    Cpu,
    Heap,
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

fn route(routes: Routes, state: &AdminState, req: &Request<Incoming>) -> Response<Body> {
    match (routes, req.method(), req.uri().path()) {
        (Routes::Admin, &Method::GET, "/config_dump") => {
            let body = serde_json::to_vec_pretty(&state.current_dump()).unwrap_or_default();
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
        (Routes::Admin, &Method::GET | &Method::POST, "/tracing") => tracing_switch(state, req),
        (Routes::Stats, &Method::GET, "/stats/prometheus" | "/metrics") => {
            let mut r = text(StatusCode::OK, state.metrics.render());
            r.headers_mut().insert("content-type", "text/plain; version=0.0.4".parse().expect("static"));
            r
        }
        (Routes::Readiness, &Method::GET, "/healthz/ready") => {
            match state.not_ready.lock().unwrap_or_else(|p| p.into_inner()).as_deref() {
                None => text(StatusCode::OK, "ready\n"),
                Some(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
            }
        }
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
                // Profiles take a while: answered when done, off the other routes.
                let profile = match (routes, req.method(), req.uri().path()) {
                    (Routes::Admin, &Method::GET, "/debug/pprof/profile") => Some(Profile::Cpu),
                    (Routes::Admin, &Method::GET, "/debug/pprof/heap") => Some(Profile::Heap),
                    _ => None,
                };
                let resp = profile.is_none().then(|| route(routes, &state, &req));
                async move {
                    Ok::<_, Infallible>(match (resp, profile) {
                        (Some(r), _) => r,
                        (None, Some(Profile::Heap)) => heap_profile().await,
                        (None, _) => cpu_profile(&req).await,
                    })
                }
            });
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "admin connection");
            }
        });
    }
}
