//! The admin listener: `/healthz`, `/readyz`, `/metrics`, `/status`, on its own port, apart
//! from the integration ports (which anyone local can use with an integration's rights).
//!
//! Nothing here ever shows a token or a secret: `/status` reports expiry times, counts and the
//! last error text, which the token client builds without secrets.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::debug;

use crate::proxy::Gate;
use crate::shutdown::Shutdown;
use crate::telemetry::Metrics;

/// What the admin endpoints read.
#[derive(Debug)]
pub(crate) struct State {
    pub(crate) gates: Vec<Arc<Gate>>,
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) draining: AtomicBool,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut bytes = serde_json::to_vec_pretty(body).unwrap_or_default();
    bytes.push(b'\n');
    let mut res = Response::new(Full::new(Bytes::from(bytes)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

/// Which integrations lack a valid token, and why; empty when all are ready.
pub(crate) fn not_ready(state: &State) -> Vec<Value> {
    state
        .gates
        .iter()
        .filter(|g| g.token.current().is_none())
        .map(|g| {
            let status = g.token.status();
            let reason = match (status.last_error, g.token.held()) {
                (Some(e), _) => e,
                (None, Some(_)) => "token expired; a refresh is pending".to_string(),
                (None, None) => "first token not obtained yet".to_string(),
            };
            json!({"integration": &*g.name, "reason": reason})
        })
        .collect()
}

fn status(state: &State) -> Value {
    let now = Instant::now();
    let integrations: Vec<Value> = state
        .gates
        .iter()
        .zip(&state.listen)
        .map(|(g, listen)| {
            let s = g.token.status();
            let route = g.route.load();
            let token = g.token.held().map(|t| {
                json!({
                    "valid": t.is_valid_at(now),
                    "expires_at": rfc3339(t.expires_at_wall),
                    "expires_in_s": t.expires_at.saturating_duration_since(now).as_secs(),
                    "lifetime_s": t.lifetime.as_secs(),
                    "age_s": now.saturating_duration_since(t.obtained_at).as_secs(),
                    "generation": t.generation,
                })
            });
            json!({
                "integration": &*g.name,
                "listen": listen.to_string(),
                "upstream": route.settings.upstream.url.as_str(),
                "token": token,
                "last_refresh": s.last_refresh.map(rfc3339),
                "seconds_since_refresh": s.last_refresh.and_then(|t| t.elapsed().ok()).map(|d| d.as_secs()),
                "last_error": s.last_error,
                "last_error_at": s.last_error_at.map(rfc3339),
                "consecutive_failures": s.consecutive_failures,
                "warning": s.warning,
                "fleet": s.fleet.as_ref().map(|f| json!({
                    "id": f.id,
                    "redis_up": f.redis_up,
                    "generation": f.generation,
                    "last_fetch_by": f.last_fetch_by,
                })),
                "fetching": s.fetching,
                "next_attempt_in_s": s.next_attempt.map(|t| t.saturating_duration_since(now).as_secs()),
                "requests_served": g.metrics.served.load(Ordering::Relaxed),
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "draining": state.draining.load(Ordering::Relaxed),
        "integrations": integrations,
    })
}

fn route(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut res = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "method_not_allowed", "message": "the admin endpoints answer GET"}),
        );
        res.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return res;
    }
    match req.uri().path() {
        "/healthz" => json_response(StatusCode::OK, &json!({"status": "ok"})),
        "/readyz" => {
            let draining = state.draining.load(Ordering::Relaxed);
            let missing = not_ready(state);
            if !draining && missing.is_empty() {
                json_response(StatusCode::OK, &json!({"ready": true}))
            } else {
                json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"ready": false, "draining": draining, "not_ready": missing}),
                )
            }
        }
        "/metrics" => {
            let mut res = Response::new(Full::new(Bytes::from(state.metrics.encode())));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            res
        }
        "/status" => json_response(StatusCode::OK, &status(state)),
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "message": "admin endpoints: /healthz /readyz /metrics /status"}),
        ),
    }
}

/// Serves the admin endpoints until `shutdown` (which `run` fires only after draining, so
/// `/readyz` can report the drain).
pub(crate) async fn serve(listener: TcpListener, state: Arc<State>, mut shutdown: Shutdown) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10));
    loop {
        let stream = tokio::select! {
            _ = shutdown.wait() => break,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    debug!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = state.clone();
        let svc = hyper::service::service_fn(move |req| {
            let res = route(&state, &req);
            async move { Ok::<_, Infallible>(res) }
        });
        let conn = builder.serve_connection(TokioIo::new(stream), svc);
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.wait() => {}
            }
        });
    }
}
