//! The upstream side of a proxied request: the integration's upstream connections (HTTP/1.1
//! or HTTP/2 by ALPN, direct or through the egress proxy's tunnel), rebuilt as one [`Route`]
//! on reload, and what a failed exchange means: its kind (the metric label) and the message
//! the client gets. It never adds a token; the request arrives ready to go.
//!
//! Connections are hyper's connection-level clients, held by **affinity** rather than in a
//! shared pool: each client connection keeps the HTTP/1 upstream connection its last request
//! used ([`Affinity`]) and takes it again for the next one, so the request path does no pool
//! lookup, spawns nothing per request, and never holds more upstream connections than there
//! are client connections (plus a few spares). A client connection that ends leaves its
//! upstream connection on the route's small last-in-first-out stack of spares, for the next
//! client that connects. When the upstream negotiates h2, one connection is shared by all
//! requests instead. A request that a closing connection never wrote (hyper hands it back:
//! `try_send_request`) is sent again on a new connection, as hyper-util's pool did.

use std::error::Error as StdError;
use std::future::{poll_fn, Future as _};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crossbeam_utils::atomic::AtomicCell;
use http::uri::{Authority, Parts, Scheme};
use http::{header, HeaderValue, Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::{Instant, Sleep};
use tower_service::Service as _;
use tracing::debug;

use super::body::ReqBody;
use super::hygiene::upstream_path;
use super::tunnel::{Connector, TunnelError};
use super::MAX_BUF;
use crate::config::ProxySettings;
use crate::error::{
    chain, find_in_chain, find_tls_error, ErrorCode, ProxyError, UpstreamErrorKind,
};
use crate::tls::{self, Peer, TlsError};

type BoxError = Box<dyn StdError + Send + Sync>;
type H1 = http1::SendRequest<ReqBody>;
type H2 = http2::SendRequest<ReqBody>;
/// A client connection's HTTP/1 upstream connection and the route it belongs to, boxed so that
/// taking it for a request and putting it back is one pointer swap ([`Affinity`]).
type Held = Box<(Arc<Route>, H1)>;

/// How long a spare upstream connection is kept for a client that reconnects.
const SPARE_IDLE: Duration = Duration::from_secs(90);

/// Why a route cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Config validation already parsed the upstream URL, so this is a `host:port` that
    /// `url` accepts and `http` does not.
    #[error("the upstream {url} has a host and port that cannot be used as an HTTP authority ({authority:?}): {reason}")]
    Authority {
        url: String,
        authority: String,
        reason: String,
    },
}

/// How many spare upstream connections a route keeps. Spares only serve clients that
/// reconnect (a client connection that stays open keeps its own); a burst of reconnecting
/// clients larger than this opens new connections, which is what the cap is for.
const MAX_SPARES: usize = 32;

/// How often one request is tried on another connection after a connection that was reused
/// closed before writing it. A fresh connection that fails is an error at once.
const MAX_RESENDS: u32 = 2;

/// The live, reloadable part of an integration's proxy: settings and the upstream
/// connections made with them. A reload builds a new route; connections of the old one are
/// not reused for later requests (their client connections let them go at their next
/// request), so a new `ca_file` or `upstream` applies to every connection made after it.
pub(crate) struct Route {
    pub(crate) settings: ProxySettings,
    connector: HttpsConnector<Connector>,
    /// The upstream's own URI (`scheme://authority/`), what the connector connects to.
    target: Uri,
    scheme: Scheme,
    authority: Authority,
    /// `Host` for HTTP/1 requests, built once (`host[:port]`, port only when not the default).
    host: HeaderValue,
    pub(crate) allow: Option<HeaderValue>,
    /// Upstream HTTP/1 connections left by client connections that ended, newest last.
    /// A std mutex: it is taken when a client connection needs a connection it does not
    /// have (its first request, or after its own closed) and when one ends, never for a
    /// request on a connection that keeps its upstream connection.
    spares: Mutex<Vec<(Instant, H1)>>,
    /// The one HTTP/2 connection every request shares once the upstream negotiated h2. Read
    /// by every request (lock-free; empty for an HTTP/1 upstream), replaced when it fails.
    shared_h2: ArcSwapOption<SharedH2>,
    /// Numbers the shared h2 connections.
    h2_generations: AtomicU64,
}

/// The shared HTTP/2 connection, with a number that tells it from the next one (senders of
/// one connection are not comparable), so a request that saw it fail forgets that one, not
/// its successor.
struct SharedH2 {
    generation: u64,
    conn: H2,
}

/// What a client connection keeps for its upstream requests between them: the HTTP/1
/// upstream connection (taken by a request, put back when the response head arrived, and left
/// to the route's spares when the client connection ends — the last reference to this value
/// is dropped), and the `request_timeout` timer.
///
/// The timer is one per client connection rather than one per request: a request moves its
/// deadline later, which for a timer still registered is one atomic update (tokio re-files it
/// only when the old deadline comes), where a new timer per request cost a timer-wheel insert
/// and removal under the driver's lock, every request.
///
/// Both are taken and put back with an atomic pointer swap, no lock: an HTTP/1 client has one
/// request at a time, and the concurrent requests of an HTTP/2 client that find the slot empty
/// use a spare (or a new connection) and a timer of their own.
#[derive(Default)]
pub(crate) struct Affinity {
    conn: AtomicCell<Option<Held>>,
    timer: AtomicCell<Option<Pin<Box<Sleep>>>>,
}

// A stated invariant: a pointer-sized cell is one atomic word (otherwise crossbeam would fall
// back to a lock).
const _: () = assert!(
    AtomicCell::<Option<Held>>::is_lock_free()
        && AtomicCell::<Option<Pin<Box<Sleep>>>>::is_lock_free()
);

impl Affinity {
    /// The connection's timer set to `deadline`, or a new one when another request of this
    /// connection (an HTTP/2 client's) holds it.
    fn timer(&self, deadline: Instant) -> Pin<Box<Sleep>> {
        match self.timer.take() {
            Some(mut timer) => {
                timer.as_mut().reset(deadline);
                timer
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        }
    }

    /// Keeps `timer` for the next request; one another request put back meanwhile goes.
    fn put_timer(&self, timer: Pin<Box<Sleep>>) {
        drop(self.timer.swap(Some(timer)));
    }

    /// Keeps `held` for this client connection's next request; one another request put back
    /// meanwhile (concurrent requests of an HTTP/2 client) becomes a spare.
    fn put(&self, held: Held) {
        if let Some(other) = self.conn.swap(Some(held)) {
            let (route, conn) = *other;
            route.spare(conn);
        }
    }
}

impl Drop for Affinity {
    fn drop(&mut self) {
        if let Some(held) = self.conn.take() {
            let (route, conn) = *held;
            route.spare(conn);
        }
    }
}

/// A connection a request can be sent on.
enum Conn {
    H1(Held),
    H2(u64, H2),
}

/// Marks a failure to set up a connection (connect, tunnel, TLS, handshake), for
/// [`classify_upstream`].
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct ConnectError(#[source] BoxError);

impl Route {
    pub(crate) fn new(settings: ProxySettings) -> Result<Route, RouteError> {
        let up = &settings.upstream;
        let bad = |reason: String| RouteError::Authority {
            url: up.url.to_string(),
            authority: up.authority.clone(),
            reason,
        };
        let connector = build_connector(&settings)?;
        let scheme = if up.tls { Scheme::HTTPS } else { Scheme::HTTP };
        let authority =
            Authority::try_from(up.authority.as_str()).map_err(|e| bad(e.to_string()))?;
        let target = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| bad(e.to_string()))?;
        let host = HeaderValue::try_from(up.authority.as_str()).map_err(|e| bad(e.to_string()))?;
        let allow = settings.allow_methods.as_ref().and_then(|methods| {
            let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
            HeaderValue::try_from(list.join(", ")).ok()
        });
        Ok(Route {
            settings,
            connector,
            target,
            scheme,
            authority,
            host,
            allow,
            spares: Mutex::default(),
            shared_h2: ArcSwapOption::empty(),
            h2_generations: AtomicU64::new(0),
        })
    }

    /// Sends a request, token and all, on this client connection's upstream connection (or a
    /// spare, the shared h2 one, or a new one); no response head within `request_timeout` of
    /// `now` is an upstream timeout. `multiplexed` is true for a request from an HTTP/2 client,
    /// whose concurrent requests must not queue behind each other on one HTTP/1 connection.
    pub(crate) async fn send(
        self: &Arc<Self>,
        req: Request<ReqBody>,
        affinity: &Affinity,
        multiplexed: bool,
        now: Instant,
    ) -> Result<Response<Incoming>, ProxyError> {
        let timeout = self.settings.request_timeout;
        let mut timer = affinity.timer(now + timeout);
        let mut exchange = pin!(self.exchange(req, affinity, multiplexed));
        // The exchange first, as tokio's `timeout` does: a response that is ready wins.
        let outcome = poll_fn(|cx| match exchange.as_mut().poll(cx) {
            Poll::Ready(done) => Poll::Ready(Ok(done)),
            Poll::Pending => timer.as_mut().poll(cx).map(Err),
        })
        .await;
        affinity.put_timer(timer);
        match outcome {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => {
                let kind = classify_upstream(&*e);
                let up = &self.settings.upstream.url;
                let reason = match (kind, find_tls_error(&*e)) {
                    // The cause and fix of a refused certificate; rustls's words close it.
                    (UpstreamErrorKind::Tls, Some(tls)) => {
                        tls::explain(tls, Peer::Upstream, self.settings.ca_file.as_deref())
                    }
                    (UpstreamErrorKind::Connect, _) => {
                        format!("{}; check upstream, DNS and the network path", chain(&*e))
                    }
                    // The tunnel error already names the proxy, its answer and what to check.
                    _ => chain(&*e),
                };
                let mut err = ProxyError::new(
                    ErrorCode::UpstreamUnreachable,
                    format!(
                        "cannot reach the upstream {up} ({}): {reason}",
                        kind.as_str()
                    ),
                );
                err.upstream_kind = Some(kind);
                Err(err)
            }
            Err(_) => {
                let mut err = ProxyError::new(
                    ErrorCode::UpstreamTimeout,
                    format!(
                        "the upstream {} sent no response headers within request_timeout ({})",
                        self.settings.upstream.url,
                        humantime::format_duration(timeout)
                    ),
                );
                err.upstream_kind = Some(UpstreamErrorKind::Timeout);
                Err(err)
            }
        }
    }

    /// One request: a reused connection when there is one, else a new one; a request that a
    /// reused connection hands back unwritten goes out again on a new connection.
    async fn exchange(
        self: &Arc<Self>,
        mut req: Request<ReqBody>,
        affinity: &Affinity,
        multiplexed: bool,
    ) -> Result<Response<Incoming>, BoxError> {
        let mut resends = 0;
        loop {
            let (conn, reused) = match self.reuse(affinity, multiplexed).await {
                Some(conn) if resends == 0 => (conn, true),
                // Boxed: connecting (TCP, tunnel, TLS, handshake) is a ~6.5 KB future that
                // most requests never run; inline, hyper would move it with every request.
                _ => (Box::pin(self.connect()).await?, false),
            };
            let mut returned = match conn {
                Conn::H1(mut held) => {
                    self.for_h1(&mut req);
                    match held.1.try_send_request(req).await {
                        Ok(res) => {
                            affinity.put(held);
                            return Ok(res);
                        }
                        Err(e) => e,
                    }
                }
                Conn::H2(generation, mut conn) => {
                    self.for_h2(&mut req);
                    match conn.try_send_request(req).await {
                        Ok(res) => return Ok(res),
                        Err(e) => {
                            // A GOAWAY or a dead connection: later requests open a new one;
                            // streams in flight on the old one finish undisturbed. A reset
                            // of this one stream (its body failed, the upstream refused
                            // it) says nothing about the connection, which stays shared.
                            if conn.is_closed() || connection_failed(e.error()) {
                                self.forget_h2(generation);
                            }
                            e
                        }
                    }
                }
            };
            match returned.take_message() {
                Some(back) if reused && resends < MAX_RESENDS => {
                    debug!(error = %returned.into_error(), "the upstream connection closed before the request was written; sending it on a new connection");
                    req = back;
                    resends += 1;
                }
                _ => return Err(returned.into_error().into()),
            }
        }
    }

    /// A connection that is already open: the shared h2 one, this client connection's own,
    /// or the newest spare. `None` when a new one must be opened.
    async fn reuse(self: &Arc<Self>, affinity: &Affinity, multiplexed: bool) -> Option<Conn> {
        if let Some((generation, h2)) = self.h2() {
            return Some(Conn::H2(generation, h2));
        }
        if let Some(mut held) = affinity.conn.take() {
            // A connection of a route replaced by a reload is let go: it closes.
            if Arc::ptr_eq(&held.0, self) && !held.1.is_closed() {
                if multiplexed && !held.1.is_ready() {
                    // Still carrying another stream's response: do not queue behind it.
                    affinity.put(held);
                } else if held.1.ready().await.is_ok() {
                    return Some(Conn::H1(held));
                }
            }
        }
        let now = Instant::now();
        let mut spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((at, conn)) = spares.pop() {
            if now.saturating_duration_since(at) < SPARE_IDLE && conn.is_ready() {
                return Some(Conn::H1(Box::new((self.clone(), conn))));
            }
        }
        None
    }

    /// Keeps an idle connection for a client that connects later: at most [`MAX_SPARES`],
    /// the oldest let go first.
    fn spare(&self, conn: H1) {
        if conn.is_closed() {
            return;
        }
        let mut spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
        if spares.len() >= MAX_SPARES {
            spares.remove(0);
        }
        spares.push((Instant::now(), conn));
    }

    fn h2(&self) -> Option<(u64, H2)> {
        let shared = self.shared_h2.load();
        let shared = shared.as_ref()?;
        if shared.conn.is_closed() {
            self.forget_h2(shared.generation);
            return None;
        }
        Some((shared.generation, shared.conn.clone()))
    }

    /// Forgets the shared h2 connection numbered `generation`, if it is still the shared one.
    fn forget_h2(&self, generation: u64) {
        self.shared_h2.rcu(|shared| match shared {
            Some(s) if s.generation == generation => None,
            _ => shared.clone(),
        });
    }

    /// Opens a connection (direct or tunnelled, TLS when the upstream is https; all bounded
    /// by `connect_timeout`) and starts its task; the only spawn per upstream connection.
    async fn connect(self: &Arc<Self>) -> Result<Conn, BoxError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx))
            .await
            .map_err(ConnectError)?;
        let io = connector
            .call(self.target.clone())
            .await
            .map_err(ConnectError)?;
        if io.connected().is_negotiated_h2() {
            let (conn, task) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| ConnectError(e.into()))?;
            tokio::spawn(async move {
                if let Err(e) = task.await {
                    debug!(error = %e, "upstream h2 connection ended with an error");
                }
            });
            // Two first requests may both have connected; the first to get here is shared,
            // the other carries its own request and closes.
            let generation = self.h2_generations.fetch_add(1, Ordering::Relaxed) + 1;
            let fresh = Some(Arc::new(SharedH2 {
                generation,
                conn: conn.clone(),
            }));
            let mut shared_now = false;
            self.shared_h2.rcu(|shared| match shared {
                Some(s) if !s.conn.is_closed() => {
                    shared_now = false;
                    shared.clone()
                }
                _ => {
                    shared_now = true;
                    fresh.clone()
                }
            });
            if shared_now {
                return Ok(Conn::H2(generation, conn));
            }
            return Ok(Conn::H2(u64::MAX, conn));
        }
        let (conn, task) = http1::Builder::new()
            .max_buf_size(MAX_BUF)
            .handshake(io)
            .await
            .map_err(|e| ConnectError(e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = task.await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(Conn::H1(Box::new((self.clone(), conn))))
    }

    /// HTTP/1: origin-form target and the prebuilt `Host` (RFC 9112 §3.2.1, §7.2). Requests
    /// arrive origin-form; only one handed back by an HTTP/2 connection is absolute.
    fn for_h1(&self, req: &mut Request<ReqBody>) {
        if req.uri().scheme().is_some() {
            let mut parts = Parts::default();
            parts.path_and_query = req.uri().path_and_query().cloned();
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
        req.headers_mut().insert(header::HOST, self.host.clone());
    }

    /// HTTP/2: the upstream's scheme and authority as pseudo-headers, no `Host`
    /// (RFC 9113 §8.3.1), added to the origin-form target the request arrives with.
    fn for_h2(&self, req: &mut Request<ReqBody>) {
        if req.uri().scheme().is_none() {
            let mut parts = Parts::default();
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(self.authority.clone());
            parts.path_and_query = req.uri().path_and_query().cloned();
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(header::HOST);
        }
    }

    /// The origin-form target a request is sent with (see [`upstream_path`]); [`Route::send`]
    /// adds the scheme and authority when the connection is HTTP/2.
    pub(crate) fn upstream_target(&self, target: &Uri) -> Result<Uri, ProxyError> {
        // The host rule was the filter's.
        upstream_path(target, false, &self.settings.upstream).map(Uri::from)
    }
}

/// Whether an HTTP/2 exchange failed with its connection (GOAWAY, I/O, a protocol error on
/// the connection) rather than only its stream (RFC 9113 §5.4).
fn connection_failed(err: &hyper::Error) -> bool {
    match find_in_chain::<h2::Error>(err) {
        Some(h2) => h2.is_go_away() || h2.is_io() || !h2.is_reset(),
        None => !err.is_user(),
    }
}

fn build_connector(settings: &ProxySettings) -> Result<HttpsConnector<Connector>, TlsError> {
    // Direct, or a CONNECT tunnel through the egress proxy; TLS to the upstream runs on top
    // of either, so through a proxy it is end to end inside the tunnel.
    let connector = Connector::new(&settings.egress, settings.connect_timeout);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls::client_config(settings.ca_file.as_deref())?)
        // Plain http is only ever configured for loopback (config validation).
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector))
}

/// Classifies a failed upstream exchange for the metric and the message. The interesting
/// error sits several layers deep, so the whole source chain is inspected.
pub(crate) fn classify_upstream(err: &(dyn StdError + 'static)) -> UpstreamErrorKind {
    // First: a proxy that refused or could not be reached also carries an io error.
    if find_in_chain::<TunnelError>(err).is_some() {
        return UpstreamErrorKind::Proxy;
    }
    if find_tls_error(err).is_some() {
        return UpstreamErrorKind::Tls;
    }
    let connect = find_in_chain::<ConnectError>(err).is_some();
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if !connect && matches!(io.kind(), ConnectionReset | BrokenPipe | UnexpectedEof) {
                return UpstreamErrorKind::Reset;
            }
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return UpstreamErrorKind::Reset;
            }
        }
        current = e.source();
    }
    if connect {
        UpstreamErrorKind::Connect
    } else {
        UpstreamErrorKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_reset_is_reset_and_chain_reaches_the_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "peer reset");
        assert_eq!(classify_upstream(&io), UpstreamErrorKind::Reset);
        let tls = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        );
        assert_eq!(classify_upstream(&tls), UpstreamErrorKind::Tls);
        assert!(chain(&tls).contains("UnknownIssuer") || chain(&tls).contains("unknown issuer"));
    }

    #[test]
    fn a_tunnel_error_is_proxy_even_when_wrapped() {
        let tunnel = TunnelError::Unreachable {
            proxy: "http://p:3128".into(),
            reason: "connection refused".into(),
        };
        let boxed: Box<dyn StdError + Send + Sync> = Box::new(tunnel);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, boxed);
        assert_eq!(classify_upstream(&io), UpstreamErrorKind::Proxy);
        assert!(chain(&io).contains("egress proxy http://p:3128"));
    }
}
