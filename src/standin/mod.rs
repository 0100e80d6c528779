//! A stand-in for Bringg Delivery Hub: its OAuth token endpoint and its API on one listener.
//!
//! It is a test double. It ships inside the binary only so that `tokengate demo` can run it;
//! nothing on the proxy's request path uses it.
//!
//! It is deliberately independent of the product code: it imports nothing from the rest of
//! this crate (not the token client, the configuration, the TLS setup or the error types),
//! because it is the oracle the proxy is tested against, and an oracle that shared the
//! proxy's code would share its mistakes. Where it meets what the product does from the
//! other side (the form, JSON and multipart encodings of a token request, HTTP Basic) it has
//! its own decoding, and it names the rustls provider itself rather than going through
//! `crate::tls`. Keep it that way.
//!
//! It serves three users: `tokengate demo` (a newcomer's first run, so the defaults accept any
//! client), the integration tests (knobs, scripted replies and recordings), and the benchmark
//! (cheap per-request work, streaming bodies, no artificial rate limiting).
//!
//! What it owns:
//! - the accept loop and connections: HTTP/1.1 and HTTP/2 on the same port
//!   (`hyper_util`'s auto builder; h2 by ALPN with TLS, h2c prior knowledge without);
//! - `POST /oauth/token`: the client-credentials grant as Delivery Hub (Doorkeeper) answers
//!   it, with parameters as form, JSON or multipart, and credentials in the body or as HTTP
//!   Basic (RFC 6749 §2.3.1);
//! - every other path: an API that checks the Bearer token (RFC 6750) and answers from a
//!   few test routes (`/echo-body`, `/bytes/<n>`, `/status/<code>`, `/redirect`,
//!   `/slow/<ms>`, everything else a JSON echo), with Delivery Hub's `RateLimit-*` headers;
//! - recordings of what arrived, and counters a test can await.
//!
//! Layout:
//! - this file: [`Hub`] and [`HubOptions`], the handle API a test drives, the accept loop and
//!   connections, dispatch by path, and the response helpers both endpoints use;
//! - `state`: what the hub keeps between requests: settings, issued tokens, reply queues,
//!   recordings ([`TokenRequest`], [`ApiRequest`]) and the rate-limit window;
//! - `script`: [`TokenReply`] and [`ApiReply`], what a test can script;
//! - `token`: the token endpoint;
//! - `api`: every other path;
//! - `wire`: decoding multipart bodies, media-type parameters, base64 and form values.
//!
//! What it deliberately does not do: enforce the rate limit (it is only reported: the
//! benchmark would trip it; script a 429 with [`Hub::push_api_reply`]), persist anything,
//! or pretend to be secure — tokens come from `fastrand`, not a CSPRNG, and are never
//! forgotten while the hub lives. It is test and demo scaffolding, not a server to expose.

mod api;
mod script;
mod state;
mod token;
mod wire;

pub use script::{ApiReply, TokenReply};
pub use state::{ApiRequest, TokenRequest};

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

use state::{lock, RateWindow, Settings, State, Tokens};

/// The token endpoint's path, as on Delivery Hub's region domains.
pub(crate) const TOKEN_PATH: &str = "/oauth/token";

/// Token endpoint body read limit, and how much of an API request body is kept in
/// [`ApiRequest::body`].
const BODY_LIMIT: usize = 1024 * 1024;
/// A client that connects and never completes its TLS handshake would otherwise hold a task
/// until shutdown.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type ResBody = BoxBody<Bytes, BoxError>;

/// How a [`Hub`] starts. `Default`: tokens live 3600 s, plain HTTP, any non-empty
/// `client_id`/`client_secret` accepted.
#[derive(Clone)]
pub struct HubOptions {
    /// Lifetime of issued tokens, reported in `expires_in` as whole seconds (rounded down)
    /// unless the request has a numeric `ttl`.
    pub token_lifetime: Duration,
    /// Serve HTTPS with this configuration. When its `alpn_protocols` is empty, the hub
    /// offers `h2` and `http/1.1` (on a copy), so HTTP/2 is negotiated as at Delivery Hub.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// When set, only this client id is accepted.
    pub client_id: Option<String>,
    /// When set, only this client secret is accepted.
    pub client_secret: Option<String>,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            token_lifetime: Duration::from_secs(3600),
            tls: None,
            client_id: None,
            client_secret: None,
        }
    }
}

// Hand-written so a secret never reaches a log line, even a test's.
impl fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubOptions")
            .field("token_lifetime", &self.token_lifetime)
            .field("tls", &self.tls.is_some())
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A running stand-in. Clones share it; it stops on [`Hub::shutdown`] or when the last
/// clone is dropped, and then closes every connection, hanging requests included.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

/// Owned by the `Hub` handles only: the accept loop and the connections hold `State`, so
/// this drops with the last handle and its `Drop` stops them.
struct HubInner {
    state: Arc<State>,
    addr: SocketAddr,
    base_url: String,
    shutdown: watch::Sender<bool>,
}

impl Drop for HubInner {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("base_url", &self.inner.base_url)
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Starts serving on `listener` (bind `127.0.0.1:0` in tests) and spawns the accept
    /// loop on the current tokio runtime.
    pub async fn start(listener: TcpListener, opts: HubOptions) -> std::io::Result<Hub> {
        let addr = listener.local_addr()?;
        let base_url = base_url(addr, opts.tls.is_some());
        let tls = opts
            .tls
            .map(|config| TlsAcceptor::from(with_default_alpn(config)));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let state = Arc::new(State {
            settings: Mutex::new(Settings {
                lifetime: opts.token_lifetime,
                client_id: opts.client_id,
                client_secret: opts.client_secret,
                revoke_on_issue: false,
            }),
            tokens: Mutex::new(Tokens::default()),
            token_replies: Mutex::new(VecDeque::new()),
            api_replies: Mutex::new(VecDeque::new()),
            token_log: Mutex::new(VecDeque::new()),
            api_log: Mutex::new(VecDeque::new()),
            token_count: watch::Sender::new(0),
            api_count: watch::Sender::new(0),
            rate: Mutex::new(RateWindow {
                start: Instant::now(),
                used: 0,
            }),
            shutdown: shutdown_rx,
            connections: Default::default(),
        });
        debug!(%base_url, tls = tls.is_some(), "stand-in Delivery Hub listening");
        tokio::spawn(accept_loop(listener, Arc::clone(&state), tls));
        Ok(Hub {
            inner: Arc::new(HubInner {
                state,
                addr,
                base_url,
                shutdown,
            }),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS (test certificates are
    /// made for `localhost`).
    pub fn base_url(&self) -> String {
        self.inner.base_url.clone()
    }

    pub fn token_url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.inner.base_url)
    }

    /// Lifetime of tokens issued from now on; tokens already issued keep theirs.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.inner.state.settings).lifetime = lifetime;
    }

    /// Changes the accepted credentials (`None`: any). Like regenerating the Client Secret
    /// Key at Delivery Hub, this also revokes every token issued before.
    pub fn set_credentials(&self, client_id: Option<String>, client_secret: Option<String>) {
        {
            let mut settings = lock(&self.inner.state.settings);
            settings.client_id = client_id;
            settings.client_secret = client_secret;
        }
        self.revoke_all();
    }

    /// When on, issuing a token revokes every token issued before it.
    pub fn set_revoke_on_issue(&self, on: bool) {
        lock(&self.inner.state.settings).revoke_on_issue = on;
    }

    /// Queues a scripted token reply (FIFO, used before normal issuing).
    pub fn push_token_reply(&self, reply: TokenReply) {
        lock(&self.inner.state.token_replies).push_back(reply);
    }

    /// Requests to [`TOKEN_PATH`] so far, rejected and scripted ones included.
    /// TCP connections accepted so far (token endpoint and API alike).
    pub fn connection_count(&self) -> usize {
        self.inner
            .state
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn token_request_count(&self) -> usize {
        *self.inner.state.token_count.borrow()
    }

    /// The last (up to) 1000 token requests, oldest first.
    pub fn token_requests(&self) -> Vec<TokenRequest> {
        lock(&self.inner.state.token_log).iter().cloned().collect()
    }

    /// Resolves once at least `n` token requests have been recorded.
    pub async fn wait_token_requests(&self, n: usize) {
        let mut count = self.inner.state.token_count.subscribe();
        // The sender lives in `State`, which `self` keeps alive: `wait_for` cannot fail.
        let _ = count.wait_for(|count| *count >= n).await;
    }

    /// Makes every token issued so far invalid: the API answers 401 for them.
    pub fn revoke_all(&self) {
        let mut tokens = lock(&self.inner.state.tokens);
        tokens.generation += 1;
        debug!(
            generation = tokens.generation,
            "stand-in revoked every token issued so far"
        );
    }

    /// Every token issued, oldest first (revoked and expired ones included).
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.inner.state.tokens).order.clone()
    }

    /// Queues a scripted API reply (FIFO, used after the auth check passes, or without it
    /// when `skip_auth`).
    pub fn push_api_reply(&self, reply: ApiReply) {
        lock(&self.inner.state.api_replies).push_back(reply);
    }

    /// API requests recorded so far (all of them, 401s included).
    pub fn api_request_count(&self) -> usize {
        *self.inner.state.api_count.borrow()
    }

    /// The last (up to) 1000 API requests, oldest first.
    pub fn api_requests(&self) -> Vec<ApiRequest> {
        lock(&self.inner.state.api_log).iter().cloned().collect()
    }

    /// Resolves once at least `n` API requests have been recorded. A request is recorded
    /// once its body has been read (for `/echo-body`: once it ended, failed or was
    /// abandoned), before the end of its response is sent.
    pub async fn wait_api_requests(&self, n: usize) {
        let mut count = self.inner.state.api_count.subscribe();
        // As in `wait_token_requests`: the sender outlives `self`.
        let _ = count.wait_for(|count| *count >= n).await;
    }

    /// Stops accepting and closes every connection (in-flight requests included: this
    /// is how a test makes the hub vanish). Also happens when the last handle drops.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

/// Builds a TLS configuration for the hub with the ring provider and ALPN `h2`,
/// `http/1.1`, for tests and the benchmark.
pub fn tls_server_config(
    cert_chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(cert_chain, key)?;
    config.alpn_protocols = default_alpn();
    Ok(Arc::new(config))
}

fn default_alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec(), b"http/1.1".to_vec()]
}

fn with_default_alpn(config: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    if !config.alpn_protocols.is_empty() {
        return config;
    }
    let mut config = (*config).clone();
    config.alpn_protocols = default_alpn();
    Arc::new(config)
}

fn base_url(addr: SocketAddr, tls: bool) -> String {
    if tls {
        return format!("https://localhost:{}", addr.port());
    }
    // A wildcard bind is reachable on loopback; a URL with 0.0.0.0 is not portable.
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

async fn shutdown_signalled(mut shutdown: watch::Receiver<bool>) {
    // An error means every sender is gone, which is a shutdown too.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Sleeps, or returns early on shutdown (so `Delay` and `/slow` never hold a task past it).
async fn sleep_or_shutdown(state: &State, duration: Duration) {
    tokio::select! {
        () = tokio::time::sleep(duration) => {}
        () = shutdown_signalled(state.shutdown.clone()) => {}
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, tls: Option<TlsAcceptor>) {
    loop {
        let accepted = tokio::select! {
            () = shutdown_signalled(state.shutdown.clone()) => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                state
                    .connections
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::spawn(serve_connection(tcp, peer, Arc::clone(&state), tls.clone()));
            }
            Err(error) => {
                // Out of file descriptors and the like: back off briefly instead of
                // spinning, and keep serving.
                debug!(%error, "stand-in accept failed");
                tokio::select! {
                    () = shutdown_signalled(state.shutdown.clone()) => break,
                    () = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        }
    }
    debug!("stand-in Delivery Hub stopped accepting");
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    state: Arc<State>,
    tls: Option<TlsAcceptor>,
) {
    // Small request/response pairs (the benchmark) must not wait for Nagle.
    if let Err(error) = tcp.set_nodelay(true) {
        debug!(%peer, %error, "stand-in could not set TCP_NODELAY");
    }
    let shutdown = state.shutdown.clone();
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        async move { Ok::<_, Infallible>(handle(state, request).await) }
    });
    // The auto builder reads the first bytes: the HTTP/2 preface selects h2 (after ALPN
    // `h2` with TLS, or prior knowledge in clear text), anything else HTTP/1.1.
    let builder = auto::Builder::new(TokioExecutor::new());
    let served = async {
        match tls {
            None => builder.serve_connection(TokioIo::new(tcp), service).await,
            Some(acceptor) => {
                let stream =
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => stream,
                        Ok(Err(error)) => return Err(BoxError::from(error)),
                        Err(_) => return Err(BoxError::from("TLS handshake timed out")),
                    };
                builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await
            }
        }
    };
    // Biased towards shutdown: a hanging request's handler also wakes on shutdown, and its
    // answer must not be written; the connection is dropped first.
    tokio::select! {
        biased;
        () = shutdown_signalled(shutdown) => {
            debug!(%peer, "stand-in connection closed by shutdown");
        }
        served = served => {
            if let Err(error) = served {
                debug!(%peer, %error, "stand-in connection ended with an error");
            }
        }
    }
}

async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<ResBody> {
    if request.uri().path() == TOKEN_PATH {
        token::token_endpoint(&state, request).await
    } else {
        api::api(&state, request).await
    }
}

// ---------------------------------------------------------------------------------------
// Shared response helpers
// ---------------------------------------------------------------------------------------

fn full(bytes: Bytes) -> ResBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, body: &Value) -> Response<ResBody> {
    let mut response = Response::new(full(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// A scripted response, exactly as given; headers that are not valid HTTP are skipped
/// with a debug log rather than failing the test in an unrelated place.
fn raw_response(
    status: u16,
    content_type: Option<&str>,
    headers: &[(String, String)],
    body: Bytes,
) -> Response<ResBody> {
    let mut response = Response::new(full(body));
    *response.status_mut() = Some(status)
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or_else(|| {
            debug!(
                status,
                "stand-in scripted status out of range; answering 500"
            );
            StatusCode::INTERNAL_SERVER_ERROR
        });
    let content_type = content_type.map(|ct| ("content-type", ct));
    let all = content_type
        .into_iter()
        .chain(headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    for (name, value) in all {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(name), Ok(value)) => {
                response.headers_mut().append(name, value);
            }
            _ => debug!(name, "stand-in skipped an invalid scripted header"),
        }
    }
    response
}

fn header_str<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let addr: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(base_url(addr, false), "http://127.0.0.1:8080");
        assert_eq!(base_url(addr, true), "https://localhost:8080");
        let addr: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(base_url(addr, false), "http://[::1]:9");
    }
}
