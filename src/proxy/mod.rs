//! The integration listener's hyper service: filter → inject → forward → replay-on-401 →
//! record, for one integration.
//!
//! - filter: `CONNECT`, methods outside `allow_methods`, absolute-form requests for a host that
//!   is not the upstream's (tokengate is never an open proxy: a token only goes upstream);
//! - inject: hop-by-hop headers out (RFC 9110 §7.6.1), the client's `Authorization` replaced by
//!   the current token's prebuilt header, `X-Request-Id` added when absent;
//! - forward: one pooled hyper-util client per integration (HTTP/1.1 or HTTP/2 by ALPN),
//!   bodies streamed both ways; a copy of a request body is kept while it streams only when
//!   it fits in `max_replay_body`; a client body that fails midway is the client's 400, an
//!   upstream body that fails midway an upstream error;
//! - replay: a 401 for the token in use asks the refresher for one forced refresh and replays
//!   the request once with the new token when its whole body was kept;
//! - record: metrics and one access log line.
//!
//! [`serve`] accepts the connections and closes one that brings no request within
//! `header_read_timeout`; malformed HTTP is hyper's to refuse (400, 431 or a closed
//! connection) before this service sees it.
//!
//! It never talks to the token endpoint; it reads the [`TokenHandle`] and may ask for a
//! forced refresh.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::error::{ErrorCode, ProxyError};
use crate::telemetry::{IntegrationMetrics, Replay};
use crate::token::{ForceOutcome, Token, TokenHandle};

mod body;
pub mod hygiene;
mod listener;
pub(crate) mod tunnel;
mod upstream;

use body::{tee, ClientBodyFailure, InFlight, InFlightGuard, KeptBody, ReqBody, ResBody};
use hygiene::{request_id, strip_hop_by_hop, X_REQUEST_ID};
pub(crate) use listener::serve;
pub(crate) use upstream::Route;

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

/// One integration's proxy state, shared by all its connections.
pub(crate) struct Gate {
    pub(crate) name: Arc<str>,
    pub(crate) route: ArcSwap<Route>,
    pub(crate) token: Arc<TokenHandle>,
    pub(crate) metrics: Arc<IntegrationMetrics>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Gate({})", self.name)
    }
}

const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");

/// What is kept of a request to replay it after a 401.
struct ReplayCopy {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: KeptBody,
}

struct Outcome {
    response: Response<ResBody>,
    error: Option<ErrorCode>,
}

impl Gate {
    /// Serves one request. Never fails: every error becomes the contract's JSON response.
    pub(crate) async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<ResBody> {
        let started = Instant::now();
        let in_flight = InFlight::new(&self.metrics.in_flight);
        let method = req.method().clone();
        // The access line is the only user of the path; with it filtered out, nothing is copied.
        let access_log = tracing::enabled!(target: "tokengate::access", tracing::Level::INFO);
        let path = access_log.then(|| req.uri().path().to_owned());
        let rid = request_id(req.headers());
        // Made only for a request with a body: most have none.
        let mut client_body_failed: Option<ClientBodyFailure> = None;

        let Outcome {
            mut response,
            error,
        } = match self
            .forward(req, rid.clone(), &mut client_body_failed, started)
            .await
        {
            Ok(res) => Outcome {
                response: res,
                error: None,
            },
            Err(e) => {
                if let Some(kind) = e.upstream_kind {
                    self.metrics.upstream_error(kind);
                }
                match e.code.blame() {
                    // A client's mistake is not an operator's alarm; a missing token was
                    // logged once, with its cause, by the refresher that failed to get one.
                    // The access line carries the error code either way.
                    crate::error::Blame::Client | crate::error::Blame::TokenSupply => {
                        debug!(integration = %self.name, error = e.code.as_str(), message = %e.message, "request refused")
                    }
                    crate::error::Blame::Upstream => {
                        warn!(integration = %self.name, error = e.code.as_str(), message = %e.message, request_id = ?rid, "request failed")
                    }
                }
                Outcome {
                    response: e.to_response(&self.name),
                    error: Some(e.code),
                }
            }
        };
        response.headers_mut().insert(X_REQUEST_ID, rid.clone());
        let status = response.status();
        response.body_mut().guard(|| InFlightGuard {
            _in_flight: in_flight,
            name: self.name.clone(),
            metrics: self.metrics.clone(),
            request_id: rid.clone(),
            client_body_failed,
        });
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
        response
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        rid: HeaderValue,
        client_body_failed: &mut Option<ClientBodyFailure>,
        started: Instant,
    ) -> Result<Response<ResBody>, ProxyError> {
        let route = self.route.load_full();
        let settings = &route.settings;

        if req.method() == Method::CONNECT {
            return Err(ProxyError::new(
                ErrorCode::ConnectNotSupported,
                "tokengate needs plain HTTP from the client so it can add the token: set HTTP_PROXY (not HTTPS_PROXY) to this address, or use http://<this address> as the base URL",
            ));
        }
        if let Some(allowed) = &settings.allow_methods {
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
        // Only HTTP/1.x has absolute-form. Every HTTP/2 request carries :scheme and
        // :authority (RFC 9113 §8.3.1), the counterpart of Host, which names this listener
        // for a client calling it directly; like Host, it does not choose the upstream.
        let uri = route.upstream_uri(req.uri(), req.version() < Version::HTTP_2)?;

        let (parts, body) = req.into_parts();
        let mut headers = parts.headers;
        strip_hop_by_hop(&mut headers);
        // The upstream's authority comes from the URI: hyper-util writes it as Host on
        // HTTP/1.1 and as :authority (with no host header) on HTTP/2.
        headers.remove(header::HOST);
        headers.insert(X_REQUEST_ID, rid);
        // A body of unknown length (chunked from the client): hyper's client sends a GET or
        // HEAD with such a body as bodiless, silently dropping the body. Saying chunked
        // explicitly forwards it as received (RFC 9112 §6.1); the client's own
        // Transfer-Encoding went with the hop-by-hop headers, and hyper removes this one
        // again for an HTTP/2 upstream.
        if !body.is_end_stream() && !headers.contains_key(header::CONTENT_LENGTH) {
            headers.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }

        let token = match self.token.current_at(started) {
            Some(t) => t,
            None => Box::pin(self.token.wait_for_token(settings.connect_timeout))
                .await
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
                })?,
        };

        let (body, kept) = tee(body, settings.max_replay_body, client_body_failed);

        let copy = ReplayCopy {
            method: parts.method.clone(),
            uri: uri.clone(),
            headers: headers.clone(),
            body: kept,
        };
        let res = match self
            .send(&route, parts.method, uri, headers, body, &token)
            .await
        {
            Ok(res) => res,
            Err(e) => {
                return Err(match client_body_failed.as_ref().and_then(|f| f.get()) {
                    Some(reason) => ProxyError::new(
                        ErrorCode::BadRequest,
                        format!("the request body ended early or was malformed ({reason}); the upstream got an incomplete request, which was abandoned"),
                    ),
                    None => e,
                })
            }
        };
        if res.status() != StatusCode::UNAUTHORIZED {
            return Ok(self.respond(res));
        }
        // Boxed: the replay's state would otherwise be part of every request's future, which
        // hyper moves into place per request.
        Box::pin(self.unauthorized(&route, res, copy, token)).await
    }

    async fn send(
        &self,
        route: &Route,
        method: Method,
        uri: Uri,
        mut headers: HeaderMap,
        body: ReqBody,
        token: &Token,
    ) -> Result<Response<Incoming>, ProxyError> {
        headers.insert(header::AUTHORIZATION, token.header().clone());
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        route.send(req).await
    }

    fn respond(&self, res: Response<Incoming>) -> Response<ResBody> {
        let (mut parts, body) = res.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        if let Some(remaining) = parts
            .headers
            .get(RATELIMIT_REMAINING)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
        {
            self.metrics.ratelimit_remaining(remaining);
        }
        Response::from_parts(parts, ResBody::upstream(body))
    }

    /// A 401 for `token`: a token newer than the refused one (the current one, or one forced
    /// refresh shared with every concurrent 401, waiting for the 5 s floor if need be) and a
    /// replay with it. A replay refused in turn, because its new token was revoked before it
    /// arrived (revocations in quick succession), is treated the same way once more.
    async fn unauthorized(
        &self,
        route: &Route,
        mut res: Response<Incoming>,
        copy: ReplayCopy,
        mut token: Arc<Token>,
    ) -> Result<Response<ResBody>, ProxyError> {
        let early = |t: &Token| t.obtained_at.elapsed() < t.lifetime / 2;
        let Some(body) = copy.body.take() else {
            if early(&token) {
                self.metrics.early_revocations.inc();
            }
            self.metrics.replay(Replay::NotReplayable);
            info!(integration = %self.name, "upstream answered 401 and the request body was not kept (larger than max_replay_body or not fully sent); passing the 401 on, the next request gets a new token");
            self.token.refused(token.generation, early(&token));
            return Ok(self.respond(res));
        };
        let body = (!body.is_empty()).then_some(body);
        for replay in 1..=MAX_REPLAYS {
            let revoked_early = early(&token);
            if revoked_early {
                self.metrics.early_revocations.inc();
            }
            let deadline = Instant::now() + route.settings.request_timeout;
            let new = match self
                .token
                .force_refresh(token.generation, revoked_early, deadline)
                .await
            {
                ForceOutcome::Replaced(new) => new,
                ForceOutcome::NotRefreshed(reason) => {
                    self.metrics.replay(Replay::Failure);
                    warn!(integration = %self.name, reason = %reason, "upstream answered 401 and no new token could be obtained; passing the 401 on");
                    return Ok(self.respond(res));
                }
            };
            drop(res);
            let replayed = self
                .send(
                    route,
                    copy.method.clone(),
                    copy.uri.clone(),
                    copy.headers.clone(),
                    ReqBody::Full { data: body.clone() },
                    &new,
                )
                .await;
            match replayed {
                Ok(r) if r.status() == StatusCode::UNAUTHORIZED => {
                    if replay == MAX_REPLAYS {
                        self.metrics.replay(Replay::Failure);
                        warn!(integration = %self.name, "upstream refused the new tokens too (401); check the integration's permissions in Delivery Hub");
                        return Ok(self.respond(r));
                    }
                    debug!(integration = %self.name, "the replayed request was refused too (401); its token was revoked in the meantime");
                    res = r;
                    token = new;
                }
                Ok(r) => {
                    self.metrics.replay(Replay::Success);
                    debug!(integration = %self.name, replays = replay, "request replayed with a new token after 401");
                    return Ok(self.respond(r));
                }
                Err(e) => {
                    self.metrics.replay(Replay::Failure);
                    return Err(e);
                }
            }
        }
        // The loop returns on its last round.
        Ok(self.respond(res))
    }
}
