//! One integration's proxy: the hyper service that carries a request from the client to the
//! upstream, as named phases that read top to bottom in `Gate::handle`:
//!
//! 1. **filter**: `CONNECT`, methods outside `allow_methods`, an absolute-form target for a
//!    host that is not the upstream's (tokengate is never an open proxy: a token only goes
//!    upstream);
//! 2. **prepare**: the upstream URI, hop-by-hop headers out (RFC 9110 §7.6.1), `X-Request-Id`
//!    kept or made, the body teed so a copy is kept while it fits in `max_replay_body`;
//! 3. **inject**: the current token's prebuilt `Authorization` header replaces the client's —
//!    `inject` is the one place a token enters a request;
//! 4. **send**: on the client connection's own upstream connection (`upstream`: connection
//!    affinity, a few spares, one shared connection for an h2 upstream), bodies streamed
//!    both ways;
//! 5. **replay on 401** (a forced refresh, then the kept copy with the new token) **or
//!    respond** (hop-by-hop headers out of the upstream's response);
//! 6. **record**: every metric of the request and its one access line, in one place; only what
//!    happens after the response head (in flight, a body failing midway) rides on the body
//!    (`body`).
//!
//! The rooms beside it: [`hygiene`] (pure header and target rules, fuzzed), `body` (the
//! replay tee and the response body), `listener` (accept loop, first-request deadline),
//! `upstream` (the upstream connections and what their failures mean), `tunnel` (the CONNECT
//! connector to the egress proxy).
//!
//! It never talks to the token endpoint; it reads the [`TokenHandle`] and may ask for a
//! forced refresh.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::{Blame, ErrorCode, ProxyError};
use crate::telemetry::{IntegrationMetrics, Replay};
use crate::token::{ForceOutcome, Token, TokenHandle};

mod body;
pub mod hygiene;
mod listener;
pub(crate) mod tunnel;
mod upstream;

use body::{tee, ClientBodyFailure, InFlight, InFlightGuard, KeptBody, ReqBody, ResBody};
use hygiene::{
    check_absolute_form, request_id, strip_hop_by_hop, strip_hop_by_hop_finding, X_REQUEST_ID,
};
use listener::Active;
pub(crate) use listener::{serve, Connections};
use upstream::Affinity;
pub(crate) use upstream::Route;
pub use upstream::RouteError;

/// How often one request is replayed after 401s: once for the refused token, once more when
/// the replay's own new token was revoked before it arrived. A bound, so an upstream that
/// refuses every token (missing permissions) costs a call at most two forced refreshes.
const MAX_REPLAYS: u32 = 2;

/// The most an HTTP/1 connection buffers in each direction, on both sides of the proxy, and
/// so also the largest request or response head (a larger one is a 431 to the client, a 502
/// from the upstream). hyper's default (~400 KiB) let a 1 MiB response to a client that reads
/// slower than the upstream sends hold ~900 KiB per connection (read buffers plus the queued
/// write): 213–235 MiB at 256 connections in bench/run.sh; 256 KiB halves that at the same
/// CPU per request, while 64 or 128 KiB cost 1.6–2.9× the CPU per 1 MiB response (smaller
/// reads, more wake-ups; bench/NOTES.md).
const MAX_BUF: usize = 256 * 1024;

/// A client that sends CONNECT is warned about at most once per this interval.
const CONNECT_WARN_INTERVAL: Duration = Duration::from_secs(60);

/// One integration's proxy state, shared by all its connections.
pub(crate) struct Gate {
    pub(crate) name: Arc<str>,
    /// The bound listen address, for the base URL the CONNECT warning advises.
    pub(crate) listen: SocketAddr,
    pub(crate) route: ArcSwap<Route>,
    pub(crate) token: Arc<TokenHandle>,
    pub(crate) metrics: Arc<IntegrationMetrics>,
    pub(crate) connect_warned: ConnectWarnings,
}

/// When each client address was last warned about sending CONNECT. A client library that
/// tunnels often hides the 405 (Node's undici shows only "fetch failed"), so the operator
/// learns the cause from tokengate's log, once a minute per client rather than per request.
/// A std mutex is enough: only a CONNECT takes it, never a proxied request, and the map holds
/// only the addresses warned within the last minute.
#[derive(Debug, Default)]
pub(crate) struct ConnectWarnings(Mutex<HashMap<IpAddr, Instant>>);

impl ConnectWarnings {
    /// Whether `client` is due a warning at `now`; if so, it is remembered as warned.
    fn due(&self, client: IpAddr, now: Instant) -> bool {
        let mut warned = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        warned.retain(|_, at| now.saturating_duration_since(*at) < CONNECT_WARN_INTERVAL);
        if warned.contains_key(&client) {
            return false;
        }
        warned.insert(client, now);
        true
    }
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gate({})", self.name)
    }
}

const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");

/// What the phases learn on the way that only [`Gate::record`] reports, so the metrics are
/// written in one place.
#[derive(Default)]
struct Notes {
    /// How a 401 from the upstream ended, when one came.
    replay: Option<Replay>,
    /// 401s for a token younger than half its lifetime.
    early_revocations: u64,
    /// Made only for a request with a body: most have none.
    client_body_failed: Option<ClientBodyFailure>,
    /// The upstream's `RateLimit-Remaining`, read as its response's headers were cleaned.
    ratelimit_remaining: Option<i64>,
}

/// What the access line needs from the request as it arrived.
struct Arrival {
    started: Instant,
    client: SocketAddr,
    /// From an HTTP/2 client: its requests may run concurrently.
    multiplexed: bool,
    /// This request on its client connection; the client connection's upstream connection.
    active: Active,
    method: Method,
    /// `None` when the access log is filtered out: then nothing is copied.
    path: Option<String>,
    request_id: HeaderValue,
    in_flight: InFlight,
}

impl Arrival {
    /// Its client connection's hold on an upstream connection, which send uses.
    fn affinity(&self) -> &Affinity {
        &self.active.conn().affinity
    }
}

/// What is kept of a request to replay it after a 401. The headers as a list: a copy for
/// every request, rarely used, so one allocation rather than a whole map's two and its index.
struct ReplayCopy {
    method: Method,
    uri: Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: KeptBody,
}

impl Gate {
    /// Serves one request. Never fails: every error becomes the contract's JSON response. The
    /// hyper service's future itself (no wrapper around it), so the future hyper keeps per
    /// connection is no larger than it must be.
    pub(crate) async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        client: SocketAddr,
        active: Active,
    ) -> Result<Response<ResBody>, Infallible> {
        let request_id = request_id(req.headers_mut());
        let arrival = Arrival {
            started: Instant::now(),
            client,
            multiplexed: req.version() >= Version::HTTP_2,
            active,
            in_flight: InFlight::new(&self.metrics),
            method: req.method().clone(),
            path: tracing::enabled!(target: "tokengate::access", tracing::Level::INFO)
                .then(|| req.uri().path().to_owned()),
            request_id,
        };
        let mut notes = Notes::default();
        let result = self.proxy(req, &arrival, &mut notes).await;
        Ok(self.record(result, arrival, notes))
    }

    /// filter → prepare → inject → send → replay on 401 | respond.
    async fn proxy(
        &self,
        req: Request<Incoming>,
        arrival: &Arrival,
        notes: &mut Notes,
    ) -> Result<Response<ResBody>, ProxyError> {
        let route = self.route.load_full();
        filter(&route, &req)?;
        let (mut req, kept) = prepare(
            &route,
            req,
            &arrival.request_id,
            &mut notes.client_body_failed,
        )?;
        let (token, sent_at) = self.token(&route, arrival.started).await?;
        let copy = ReplayCopy {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req
                .headers()
                .iter()
                .map(|(n, v)| (n.clone(), v.clone()))
                .collect(),
            body: kept,
        };
        inject(&mut req, &token);
        let res = match route
            .send(req, arrival.affinity(), arrival.multiplexed, sent_at)
            .await
        {
            Ok(res) => res,
            Err(e) => {
                return Err(match notes.client_body_failed.as_ref().and_then(|f| f.get()) {
                    Some(reason) => ProxyError::new(
                        ErrorCode::BadRequest,
                        format!("the request body ended early or was malformed ({reason}); the upstream got an incomplete request, which was abandoned"),
                    ),
                    None => e,
                })
            }
        };
        if res.status() != StatusCode::UNAUTHORIZED {
            return Ok(respond(res, notes));
        }
        // Boxed: the replay's state would otherwise be part of every request's future, which
        // hyper moves into place per request.
        Box::pin(self.replay(&route, res, copy, token, arrival, notes)).await
    }

    /// The current token, or, when there is none, the first one the refresher gets within
    /// `connect_timeout`; with the time the request leaves for the upstream, the arrival's clock
    /// reading unless it waited for that token (one reading fewer per request).
    async fn token(
        &self,
        route: &Route,
        started: Instant,
    ) -> Result<(Arc<Token>, Instant), ProxyError> {
        if let Some(t) = self.token.current_at(started) {
            return Ok((t, started));
        }
        Box::pin(self.token.wait_for_token(route.settings.connect_timeout))
            .await
            .map(|t| (t, Instant::now()))
            .map_err(|u| {
                let mut e = ProxyError::new(
                    ErrorCode::TokenUnavailable,
                    format!(
                        "no valid token for this integration: {}. For details see GET /status on the admin port and tokengate's log lines \"token request failed\" for this integration",
                        u.reason
                    ),
                );
                e.retry_after = Some(u.retry_after.as_secs_f64().ceil() as u64);
                e
            })
    }

    /// A 401 for `token`: a token newer than the refused one (the current one, or one forced
    /// refresh shared with every concurrent 401, waiting for the 5 s floor if need be) and a
    /// replay with it. A replay refused in turn, because its new token was revoked before it
    /// arrived (revocations in quick succession), is treated the same way once more.
    async fn replay(
        &self,
        route: &Arc<Route>,
        mut res: Response<Incoming>,
        copy: ReplayCopy,
        mut token: Arc<Token>,
        arrival: &Arrival,
        notes: &mut Notes,
    ) -> Result<Response<ResBody>, ProxyError> {
        let early = |t: &Token| t.obtained_at.elapsed() < t.lifetime / 2;
        let ReplayCopy {
            method,
            uri,
            headers,
            body,
        } = copy;
        let Some(body) = body.take() else {
            if early(&token) {
                notes.early_revocations += 1;
            }
            notes.replay = Some(Replay::NotReplayable);
            info!(integration = %self.name, "upstream answered 401 and the request body was not kept (larger than max_replay_body or not fully sent); passing the 401 on, the next request gets a new token");
            self.token.refused(token.generation, early(&token));
            return Ok(respond(res, notes));
        };
        let body = (!body.is_empty()).then_some(body);
        for replay in 1..=MAX_REPLAYS {
            let revoked_early = early(&token);
            if revoked_early {
                notes.early_revocations += 1;
            }
            let deadline = Instant::now() + route.settings.request_timeout;
            let new = match self
                .token
                .force_refresh(token.generation, revoked_early, deadline)
                .await
            {
                ForceOutcome::Replaced(new) => new,
                ForceOutcome::NotRefreshed(reason) => {
                    notes.replay = Some(Replay::Failure);
                    warn!(integration = %self.name, reason = %reason, "upstream answered 401 and no new token could be obtained; passing the 401 on");
                    return Ok(respond(res, notes));
                }
            };
            drop(res);
            let mut req = outgoing(
                &method,
                &uri,
                &headers,
                ReqBody::Full { data: body.clone() },
            );
            inject(&mut req, &new);
            match route
                .send(req, arrival.affinity(), arrival.multiplexed, Instant::now())
                .await
            {
                Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
                    if replay == MAX_REPLAYS {
                        notes.replay = Some(Replay::Failure);
                        warn!(integration = %self.name, "upstream refused the new tokens too (401); check the integration's permissions in Delivery Hub");
                        return Ok(respond(r, notes));
                    }
                    debug!(integration = %self.name, "the replayed request was refused too (401); its token was revoked in the meantime");
                    res = r;
                    token = new;
                }
                Ok(r) => {
                    notes.replay = Some(Replay::Success);
                    debug!(integration = %self.name, replays = replay, "request replayed with a new token after 401");
                    return Ok(respond(r, notes));
                }
                Err(e) => {
                    notes.replay = Some(Replay::Failure);
                    return Err(e);
                }
            }
        }
        // The loop returns on its last round.
        Ok(respond(res, notes))
    }

    /// Record: every metric of the request and its access line. An error becomes the
    /// contract's response here, and is logged at the level its blame calls for.
    fn record(
        &self,
        result: Result<Response<ResBody>, ProxyError>,
        arrival: Arrival,
        notes: Notes,
    ) -> Response<ResBody> {
        let Arrival {
            started,
            client,
            method,
            path,
            request_id: rid,
            in_flight,
            active,
            ..
        } = arrival;
        let (mut response, error) = match result {
            Ok(res) => {
                if let Some(remaining) = notes.ratelimit_remaining {
                    self.metrics.ratelimit_remaining(remaining);
                }
                (res, None)
            }
            Err(e) => {
                if let Some(kind) = e.upstream_kind {
                    self.metrics.upstream_error(kind);
                }
                if e.code == ErrorCode::ConnectNotSupported {
                    self.warn_connect(client.ip());
                }
                match e.code.blame() {
                    // A client's mistake is not an operator's alarm; a missing token was
                    // logged once, with its cause, by the refresher that failed to get one.
                    // The access line carries the error code either way.
                    Blame::Client | Blame::TokenSupply => {
                        debug!(integration = %self.name, error = e.code.as_str(), message = %e.message, "request refused")
                    }
                    Blame::Upstream => {
                        warn!(integration = %self.name, error = e.code.as_str(), message = %e.message, request_id = ?rid, "request failed")
                    }
                }
                (e.to_response(&self.name), Some(e.code))
            }
        };
        if let Some(replay) = notes.replay {
            self.metrics.replay(replay);
        }
        if notes.early_revocations > 0 {
            self.metrics
                .early_revocations
                .inc_by(notes.early_revocations);
        }
        response.headers_mut().insert(X_REQUEST_ID, rid.clone());
        let status = response.status();
        let elapsed = started.elapsed();
        self.metrics.duration.observe(elapsed.as_secs_f64());
        self.metrics.request(&method, status.as_u16());
        if let Some(path) = path {
            info!(
            target: "tokengate::access",
            integration = %self.name,
            method = %method,
            path = %path,
            status = status.as_u16(),
            // Microsecond precision: 1.234, not 1.2345678900000001.
            duration_ms = elapsed.as_micros() as f64 / 1000.0,
            request_id = rid.to_str().unwrap_or("-"),
            error = error.map(ErrorCode::as_str),
            );
        }
        // Last, so the id moves into the guard rather than being copied for it.
        let client_body_failed = notes.client_body_failed;
        response.body_mut().guard(|| InFlightGuard {
            in_flight,
            _active: active,
            request_id: rid,
            client_body_failed,
        });
        response
    }
}

impl Gate {
    /// Names the likely cause of a CONNECT in the log, at most once a minute per client.
    fn warn_connect(&self, client: IpAddr) {
        if !self.connect_warned.due(client, Instant::now()) {
            return;
        }
        // A client reaches a wildcard listener on loopback too; any other address as bound.
        let ip = if self.listen.ip().is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.listen.ip()
        };
        let base = SocketAddr::new(ip, self.listen.port());
        warn!(
            integration = %self.name,
            client = %client,
            "a client sent CONNECT (answered 405 connect_not_supported): it is configured to use tokengate as an HTTP(S) proxy for https URLs (HTTPS_PROXY), so tokengate cannot add the token; use the base URL http://{base} instead (or HTTP_PROXY with http:// URLs; Node's undici ProxyAgent needs proxyTunnel: false). Logged at most once a minute per client address"
        );
    }
}

/// Filter: what tokengate refuses before anything else is done for a request.
fn filter(route: &Route, req: &Request<Incoming>) -> Result<(), ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::new(
            ErrorCode::ConnectNotSupported,
            "tokengate needs plain HTTP from the client so it can add the token: set HTTP_PROXY (not HTTPS_PROXY) to this address, or use http://<this address> as the base URL",
        ));
    }
    if let Some(allowed) = &route.settings.allow_methods {
        if !allowed.contains(req.method()) {
            let mut e = ProxyError::new(
                ErrorCode::MethodNotAllowed,
                format!(
                    "method {} is not in allow_methods for this integration",
                    req.method()
                ),
            );
            e.allow = route.allow.clone();
            return Err(e);
        }
    }
    // Only HTTP/1.x has absolute-form. Every HTTP/2 request carries :scheme and :authority
    // (RFC 9113 §8.3.1), the counterpart of Host, which names this listener for a client
    // calling it directly; like Host, it does not choose the upstream.
    if req.version() < Version::HTTP_2 {
        check_absolute_form(req.uri(), &route.settings.upstream)?;
    }
    Ok(())
}

/// Prepare: the upstream URI, the headers cleaned, the request id set and the body teed for a
/// replay (the copy it keeps is returned beside the request). Everything but the token. The
/// client's request is changed in place, its parts never copied.
fn prepare(
    route: &Route,
    req: Request<Incoming>,
    rid: &HeaderValue,
    client_body_failed: &mut Option<ClientBodyFailure>,
) -> Result<(Request<ReqBody>, KeptBody), ProxyError> {
    let uri = route.upstream_target(req.uri())?;
    let (mut parts, body) = req.into_parts();
    parts.uri = uri;
    // Always HTTP/1.1 semantics; the upstream connection picks the wire version by ALPN.
    parts.version = Version::HTTP_11;
    parts.extensions.clear();
    let headers = &mut parts.headers;
    // The request id is already the request's own (`handle`), unless `Connection` named it.
    if strip_hop_by_hop(headers) {
        headers.insert(X_REQUEST_ID, rid.clone());
    }
    // The client's Host stays until the upstream connection is known: the route's prebuilt
    // Host replaces it on HTTP/1.1, :authority (with no Host) on HTTP/2 (`upstream`).
    // A body of unknown length (chunked from the client): hyper's client sends a GET or HEAD
    // with such a body as bodiless, silently dropping the body. Saying chunked explicitly
    // forwards it as received (RFC 9112 §6.1); the client's own Transfer-Encoding went with
    // the hop-by-hop headers, and hyper removes this one again for an HTTP/2 upstream.
    if !body.is_end_stream() && !headers.contains_key(header::CONTENT_LENGTH) {
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let (body, kept) = tee(body, route.settings.max_replay_body, client_body_failed);
    Ok((Request::from_parts(parts, body), kept))
}

/// A replay's request, built from the kept copy like [`prepare`] built the first.
fn outgoing(
    method: &Method,
    uri: &Uri,
    kept: &[(HeaderName, HeaderValue)],
    body: ReqBody,
) -> Request<ReqBody> {
    let mut headers = HeaderMap::with_capacity(kept.len());
    for (name, value) in kept {
        headers.append(name.clone(), value.clone());
    }
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri.clone();
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    req
}

/// Inject: the one place a token enters a request. The client's own `Authorization`, if it
/// sent one, is replaced.
fn inject(req: &mut Request<ReqBody>, token: &Token) {
    req.headers_mut()
        .insert(header::AUTHORIZATION, token.header().clone());
}

/// Respond: the upstream's response, its hop-by-hop headers out (`RateLimit-Remaining` noted
/// on the way), its body streaming back.
fn respond(res: Response<Incoming>, notes: &mut Notes) -> Response<ResBody> {
    let (mut parts, body) = res.into_parts();
    notes.ratelimit_remaining = strip_hop_by_hop_finding(&mut parts.headers, &RATELIMIT_REMAINING)
        .and_then(|v| v.to_str().ok()?.trim().parse::<i64>().ok());
    Response::from_parts(parts, ResBody::upstream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_is_warned_about_once_a_minute_per_client() {
        let warned = ConnectWarnings::default();
        let t0 = Instant::now();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        assert!(warned.due(a, t0));
        assert!(!warned.due(a, t0 + Duration::from_secs(1)));
        assert!(warned.due(b, t0 + Duration::from_secs(1)), "another client");
        assert!(!warned.due(a, t0 + Duration::from_secs(59)));
        assert!(
            warned.due(a, t0 + Duration::from_secs(60)),
            "a minute later"
        );
        assert!(!warned.due(b, t0 + Duration::from_secs(60)));
        assert_eq!(warned.0.lock().unwrap().len(), 2);
        assert!(warned.due(b, t0 + Duration::from_secs(200)));
        assert_eq!(
            warned.0.lock().unwrap().len(),
            1,
            "addresses warned more than a minute ago are forgotten"
        );
    }
}
