//! A stand-in for Bringg Delivery Hub: its OAuth token endpoint and its API on one listener.
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
//! What it deliberately does not do: enforce the rate limit (it is only reported: the
//! benchmark would trip it; script a 429 with [`Hub::push_api_reply`]), persist anything,
//! or pretend to be secure — tokens come from `fastrand`, not a CSPRNG, and are never
//! forgotten while the hub lives. It is test and demo scaffolding, not a server to expose.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::debug;

/// The token endpoint's path, as on Delivery Hub's region domains.
pub const TOKEN_PATH: &str = "/oauth/token";

/// Token endpoint body read limit, and how much of an API request body is kept in
/// [`ApiRequest::body`].
const BODY_LIMIT: usize = 1024 * 1024;
/// Recordings keep the last this many requests, so a long benchmark run stays bounded.
const RECORD_LIMIT: usize = 1000;
/// Delivery Hub's published per-merchant limit, reported in `RateLimit-Limit`.
const RATE_LIMIT: u32 = 300;
const RATE_WINDOW: Duration = Duration::from_secs(60);
/// `/bytes/<n>` sends slices of this one static buffer: no allocation per chunk.
const CHUNK_LEN: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];
/// A client that connects and never completes its TLS handshake would otherwise hold a task
/// until shutdown.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Doorkeeper's exact text, so error reporting is tested against what Delivery Hub says.
const INVALID_CLIENT_DESCRIPTION: &str = "Client authentication failed due to unknown client, \
     no client authentication included, or unsupported authentication method.";
const UNSUPPORTED_GRANT_DESCRIPTION: &str =
    "The authorization grant type is not supported by the authorization server.";
const REDIRECT_TARGET: &str = "https://elsewhere.example/landing";

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

/// A scripted answer for the next request to [`TOKEN_PATH`]. A scripted reply answers that
/// request whatever it contains (method, parameters, credentials are not checked); the
/// request is still recorded.
///
/// Replies are taken when a request arrives: leading `Delay`s are taken together with the
/// reply that follows them (if one is queued at that moment), so `[Delay, Raw]` always
/// applies to one request, however many arrive concurrently.
#[derive(Clone, Debug)]
pub enum TokenReply {
    /// Issue a real, valid token, but with these JSON values for the fields (None = omit
    /// the field): expires_in as a string, 0, negative, huge; token_type "mac"; and so on.
    /// The token is valid for the normal lifetime (the configured one, or `ttl`), whatever
    /// `expires_in` says.
    Issue {
        expires_in: Option<Value>,
        token_type: Option<Value>,
        created_at: Option<Value>,
    },
    /// Answer exactly this. A status outside 200..=599 becomes 500 (hyper cannot send an
    /// informational status as a final answer).
    Raw {
        status: u16,
        content_type: Option<String>,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// Wait, then handle the request normally (or with the reply queued after this one).
    Delay(Duration),
    /// Accept the request and never answer (until shutdown, which closes the connection).
    Hang,
    /// Handle the request as if nothing were scripted. Lets a test script "this request
    /// normal, the next one an error", or write `[Delay, Normal]` explicitly.
    Normal,
}

impl TokenReply {
    /// A `Raw` reply with a JSON body, e.g. `TokenReply::json(429, json!({"error": "..."}))`.
    pub fn json(status: u16, body: &Value) -> TokenReply {
        TokenReply::Raw {
            status,
            content_type: Some("application/json; charset=utf-8".to_owned()),
            headers: Vec::new(),
            body: Bytes::from(body.to_string()),
        }
    }
}

/// A scripted API answer, used for the next API request whose token passes the check (or
/// for the next API request at all when `skip_auth`). `RateLimit-*` headers are added unless
/// `headers` names them (so a test can script `RateLimit-Remaining: 0` with a 429).
#[derive(Clone, Debug)]
pub struct ApiReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    pub skip_auth: bool,
}

impl ApiReply {
    /// A reply with a JSON body and `Content-Type: application/json`, after the auth check.
    pub fn json(status: u16, body: &Value) -> ApiReply {
        ApiReply {
            status,
            headers: vec![(
                "content-type".to_owned(),
                "application/json; charset=utf-8".to_owned(),
            )],
            body: Bytes::from(body.to_string()),
            skip_auth: false,
        }
    }
}

/// One request to [`TOKEN_PATH`], as received.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    pub path: String,
    /// The query string, if any (parameters there are not read: RFC 6749 §4.4.2 puts them
    /// in the body).
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub content_type: Option<String>,
    /// The body (empty when it exceeded the 1 MiB limit).
    pub body: Bytes,
    /// The parameters from the body; empty when it could not be parsed.
    pub params: BTreeMap<String, String>,
    /// HTTP Basic credentials, base64- and form-decoded (RFC 6749 §2.3.1).
    pub basic: Option<(String, String)>,
    /// "form" | "json" | "multipart" | "none" (no Content-Type and no body) | "other".
    pub encoding: &'static str,
}

/// One API request (any path but [`TOKEN_PATH`]), as received.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub version: Version,
    pub method: String,
    /// Path and query as received (origin-form, also for HTTP/2).
    pub uri: String,
    /// `:authority` for HTTP/2, else the `Host` header.
    pub authority: Option<String>,
    pub headers: HeaderMap,
    /// Bytes of body received.
    pub body_len: u64,
    /// The body, kept only when it is at most 1 MiB, else empty.
    pub body: Bytes,
    /// Whether the body ended normally (false: the client reset it, or the response was
    /// abandoned before the body was read to its end).
    pub body_complete: bool,
    /// The bearer token received, if the first `Authorization` header is `Bearer`.
    pub token: Option<String>,
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

/// Shared by the accept loop, every connection and every handle.
struct State {
    settings: Mutex<Settings>,
    tokens: Mutex<Tokens>,
    token_replies: Mutex<VecDeque<TokenReply>>,
    api_replies: Mutex<VecDeque<ApiReply>>,
    token_log: Mutex<VecDeque<TokenRequest>>,
    api_log: Mutex<VecDeque<ApiRequest>>,
    /// Counters as watch channels so `wait_*_requests` await a change instead of polling.
    token_count: watch::Sender<usize>,
    api_count: watch::Sender<usize>,
    rate: Mutex<RateWindow>,
    shutdown: watch::Receiver<bool>,
}

// Std mutexes throughout: every critical section is a few map or deque operations and
// none is held across an `.await`.

struct Settings {
    lifetime: Duration,
    client_id: Option<String>,
    client_secret: Option<String>,
    /// Each new token revokes every earlier one: a server that allows one live token per
    /// app, which two tokengates sharing an app turn into revocation thrash.
    revoke_on_issue: bool,
}

#[derive(Default)]
struct Tokens {
    by_value: HashMap<String, IssuedToken>,
    order: Vec<String>,
    /// Bumped by `revoke_all`; a token is valid only in the generation it was issued in,
    /// which makes revoking O(1).
    generation: u64,
}

struct IssuedToken {
    /// None when the lifetime is too large to represent as an `Instant`: never expires.
    expires_at: Option<Instant>,
    generation: u64,
}

struct RateWindow {
    start: Instant,
    used: u32,
}

/// Locks a mutex, ignoring poisoning: nothing panics while holding one of these locks, and
/// a test that panicked elsewhere should still be able to read the recordings.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    fn record_token_request(&self, request: TokenRequest) {
        push_bounded(&mut lock(&self.token_log), request);
        // After the push, so a waiter woken by the count finds the request recorded.
        self.token_count.send_modify(|count| *count += 1);
    }

    fn record_api_request(&self, request: ApiRequest) {
        push_bounded(&mut lock(&self.api_log), request);
        self.api_count.send_modify(|count| *count += 1);
    }

    fn issue_token(&self, lifetime: Duration) -> String {
        let token = random_token();
        let revoke = lock(&self.settings).revoke_on_issue;
        let mut tokens = lock(&self.tokens);
        if revoke {
            tokens.generation += 1;
        }
        let entry = IssuedToken {
            expires_at: Instant::now().checked_add(lifetime),
            generation: tokens.generation,
        };
        tokens.by_value.insert(token.clone(), entry);
        tokens.order.push(token.clone());
        token
    }

    fn token_is_valid(&self, token: &str) -> bool {
        let tokens = lock(&self.tokens);
        tokens.by_value.get(token).is_some_and(|issued| {
            issued.generation == tokens.generation
                && issued.expires_at.is_none_or(|at| Instant::now() < at)
        })
    }

    /// Takes the scripted reply for a token request that just arrived: leading delays are
    /// summed and taken with the reply after them, so the pair belongs to one request.
    fn next_token_script(&self) -> (Duration, Option<TokenReply>) {
        let mut replies = lock(&self.token_replies);
        let mut delay = Duration::ZERO;
        while let Some(reply) = replies.pop_front() {
            match reply {
                TokenReply::Delay(d) => delay = delay.saturating_add(d),
                other => return (delay, Some(other)),
            }
        }
        (delay, None)
    }

    /// Takes the next scripted API reply if this request may have it: any request when the
    /// reply skips auth, else only one whose token is valid (decided atomically, so two
    /// concurrent requests cannot both see the same reply).
    fn next_api_reply(&self, auth_ok: bool) -> Option<ApiReply> {
        let mut replies = lock(&self.api_replies);
        if replies.front().is_some_and(|r| r.skip_auth || auth_ok) {
            replies.pop_front()
        } else {
            None
        }
    }

    /// Counts this request in the current window: (remaining, seconds until the window
    /// resets).
    fn rate_limit(&self) -> (u32, u64) {
        let now = Instant::now();
        let mut window = lock(&self.rate);
        if now.duration_since(window.start) >= RATE_WINDOW {
            window.start = now;
            window.used = 0;
        }
        window.used = window.used.saturating_add(1);
        let left = RATE_WINDOW.saturating_sub(now.duration_since(window.start));
        // Rounded up: "0 seconds to reset" would read as "already reset".
        let reset = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        (RATE_LIMIT.saturating_sub(window.used), reset.max(1))
    }
}

fn push_bounded<T>(log: &mut VecDeque<T>, item: T) {
    if log.len() >= RECORD_LIMIT {
        log.pop_front();
    }
    log.push_back(item);
}

/// 43 characters of the URL-safe base64 alphabet (≈258 bits), the length and shape of
/// Doorkeeper's tokens.
fn random_token() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..43)
        .map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())]))
        .collect()
}

/// The first characters of a token, enough to tell tokens apart in a debug log.
fn token_hint(token: &str) -> String {
    let mut hint: String = token.chars().take(4).collect();
    hint.push('…');
    hint
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
        token_endpoint(&state, request).await
    } else {
        api(&state, request).await
    }
}

// ---------------------------------------------------------------------------------------
// Token endpoint
// ---------------------------------------------------------------------------------------

/// Why a token request body could not be read.
enum BodyProblem {
    TooLarge,
    Failed,
}

async fn token_endpoint(state: &Arc<State>, request: Request<Incoming>) -> Response<ResBody> {
    let (parts, body) = request.into_parts();
    let (body, problem) = match Limited::new(body, BODY_LIMIT).collect().await {
        Ok(collected) => (collected.to_bytes(), None),
        Err(error) if error.is::<LengthLimitError>() => (Bytes::new(), Some(BodyProblem::TooLarge)),
        Err(error) => {
            debug!(%error, "stand-in token request body failed");
            (Bytes::new(), Some(BodyProblem::Failed))
        }
    };
    let content_type = header_str(&parts.headers, &header::CONTENT_TYPE).map(str::to_owned);
    let (encoding, params) = parse_params(content_type.as_deref(), &body);
    let basic = parse_basic(&parts.headers);
    state.record_token_request(TokenRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers.clone(),
        content_type,
        body,
        params: params.clone().unwrap_or_default(),
        basic: basic.clone().ok().flatten(),
        encoding,
    });

    let (delay, scripted) = state.next_token_script();
    if !delay.is_zero() {
        sleep_or_shutdown(state, delay).await;
    }
    let params = params.as_ref();
    let lifetime = || token_lifetime(state, params.ok());
    let response = match scripted {
        Some(TokenReply::Raw {
            status,
            content_type,
            headers,
            body,
        }) => raw_response(status, content_type.as_deref(), &headers, body),
        Some(TokenReply::Hang) => {
            debug!("stand-in token endpoint hangs (scripted)");
            shutdown_signalled(state.shutdown.clone()).await;
            // Reached only at shutdown. The connection task, biased towards shutdown, drops
            // the connection before this answer can be written; returning (rather than
            // pending forever) ends HTTP/2 stream tasks, which hyper spawns separately.
            json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": "shutting_down"}),
            )
        }
        Some(TokenReply::Issue {
            expires_in,
            token_type,
            created_at,
        }) => {
            let token = state.issue_token(lifetime());
            let mut fields = serde_json::Map::new();
            fields.insert("access_token".to_owned(), Value::String(token));
            let optional = [
                ("token_type", token_type),
                ("expires_in", expires_in),
                ("created_at", created_at),
            ];
            for (name, value) in optional {
                if let Some(value) = value {
                    fields.insert(name.to_owned(), value);
                }
            }
            token_success(&Value::Object(fields))
        }
        // `next_token_script` folds every Delay into `delay`; one left here would mean
        // "then handle normally" anyway.
        Some(TokenReply::Normal | TokenReply::Delay(_)) | None => {
            match check_token_request(state, &parts.method, problem, params, basic) {
                Ok(()) => {
                    let lifetime = lifetime();
                    let token = state.issue_token(lifetime);
                    debug!(
                        token = %token_hint(&token),
                        lifetime_secs = lifetime.as_secs(),
                        "stand-in issued a token"
                    );
                    token_success(&json!({
                        "access_token": token,
                        "token_type": "Bearer",
                        "expires_in": lifetime.as_secs(),
                        "created_at": unix_now(),
                    }))
                }
                Err(rejection) => rejection.into_response(),
            }
        }
    };
    debug!(
        method = %parts.method,
        status = response.status().as_u16(),
        "stand-in token request answered"
    );
    response
}

/// A numeric `ttl` overrides the configured lifetime, as at Delivery Hub.
fn token_lifetime(state: &State, params: Option<&BTreeMap<String, String>>) -> Duration {
    params
        .and_then(|params| params.get("ttl"))
        .and_then(|ttl| ttl.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or_else(|| lock(&state.settings).lifetime)
}

/// Why an unscripted token request is refused: an OAuth error response (RFC 6749 §5.2),
/// kept small until it becomes one.
struct Rejection {
    status: StatusCode,
    error: &'static str,
    description: String,
    /// An extra header: `Allow` for 405, `WWW-Authenticate` for a failed Basic login.
    header: Option<(HeaderName, &'static str)>,
}

impl Rejection {
    fn new(status: StatusCode, error: &'static str, description: impl Into<String>) -> Self {
        Rejection {
            status,
            error,
            description: description.into(),
            header: None,
        }
    }

    fn into_response(self) -> Response<ResBody> {
        let mut response = oauth_error(self.status, self.error, &self.description);
        if let Some((name, value)) = self.header {
            response
                .headers_mut()
                .insert(name, HeaderValue::from_static(value));
        }
        response
    }
}

/// The checks of an unscripted token request, in Doorkeeper's order of concern: a request
/// we can read, the grant type, then client authentication.
fn check_token_request(
    state: &State,
    method: &Method,
    problem: Option<BodyProblem>,
    params: Result<&BTreeMap<String, String>, &String>,
    basic: Result<Option<(String, String)>, ()>,
) -> Result<(), Rejection> {
    if method != Method::POST {
        return Err(Rejection {
            header: Some((header::ALLOW, "POST")),
            ..Rejection::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "The token endpoint accepts only POST.",
            )
        });
    }
    match problem {
        Some(BodyProblem::TooLarge) => {
            return Err(Rejection::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                "The request body is larger than 1 MiB.",
            ))
        }
        Some(BodyProblem::Failed) => {
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The request body could not be read.",
            ))
        }
        None => {}
    }
    let params = params
        .map_err(|why| Rejection::new(StatusCode::BAD_REQUEST, "invalid_request", why.as_str()))?;
    if params.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err(Rejection::new(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            UNSUPPORTED_GRANT_DESCRIPTION,
        ));
    }
    let used_basic = matches!(basic, Ok(Some(_)) | Err(()));
    let invalid_client = || Rejection {
        // RFC 6749 §5.2: a failed Basic authentication answers with the scheme it used.
        header: used_basic.then_some((header::WWW_AUTHENTICATE, "Basic realm=\"Doorkeeper\"")),
        ..Rejection::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            INVALID_CLIENT_DESCRIPTION,
        )
    };
    let (client_id, client_secret) = match basic {
        Err(()) => return Err(invalid_client()),
        Ok(Some(_)) if params.contains_key("client_secret") => {
            // RFC 6749 §2.3: a client MUST NOT use more than one authentication method.
            return Err(Rejection::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "The request uses more than one client authentication method (RFC 6749 §2.3).",
            ));
        }
        Ok(Some((id, secret))) => (id, secret),
        Ok(None) => match (params.get("client_id"), params.get("client_secret")) {
            (Some(id), Some(secret)) => (id.clone(), secret.clone()),
            _ => return Err(invalid_client()),
        },
    };
    if client_id.is_empty() || client_secret.is_empty() {
        return Err(invalid_client());
    }
    let settings = lock(&state.settings);
    let id_ok = settings
        .client_id
        .as_ref()
        .is_none_or(|want| *want == client_id);
    let secret_ok = settings
        .client_secret
        .as_ref()
        .is_none_or(|want| *want == client_secret);
    if id_ok && secret_ok {
        Ok(())
    } else {
        Err(invalid_client())
    }
}

/// RFC 6749 §5.1: token responses must not be cached.
fn token_success(body: &Value) -> Response<ResBody> {
    let mut response = json_response(StatusCode::OK, body);
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response<ResBody> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reads the token request parameters from the body according to its Content-Type.
/// Returns the encoding name for [`TokenRequest::encoding`] and the parameters, or why they
/// could not be read. A parameter given twice is an error (RFC 6749 §3.2: "MUST NOT be
/// included more than once").
fn parse_params(
    content_type: Option<&str>,
    body: &[u8],
) -> (&'static str, Result<BTreeMap<String, String>, String>) {
    let Some(content_type) = content_type else {
        let encoding = if body.is_empty() { "none" } else { "other" };
        return (encoding, Ok(BTreeMap::new()));
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/x-www-form-urlencoded" => (
            "form",
            collect_unique(
                url::form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())),
            ),
        ),
        "application/json" => ("json", parse_json_params(body)),
        "multipart/form-data" => {
            let parsed = match media_type_param(content_type, "boundary") {
                Some(boundary) => parse_multipart(body, &boundary).and_then(collect_unique),
                None => Err("multipart/form-data without a boundary parameter".to_owned()),
            };
            ("multipart", parsed)
        }
        _ => ("other", Ok(BTreeMap::new())),
    }
}

fn collect_unique(
    pairs: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, String> {
    let mut params = BTreeMap::new();
    for (name, value) in pairs {
        if params.insert(name.clone(), value).is_some() {
            return Err(format!("The parameter {name} is included more than once."));
        }
    }
    Ok(params)
}

/// Bringg's API reference sends the parameters as a JSON object; numbers (`"ttl": 3600`)
/// and booleans are taken as their text.
fn parse_json_params(body: &[u8]) -> Result<BTreeMap<String, String>, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("The JSON body is not valid: {e}"))?;
    let Value::Object(object) = value else {
        return Err("The JSON body is not an object.".to_owned());
    };
    let mut params = BTreeMap::new();
    for (name, value) in object {
        let text = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(format!(
                    "The JSON parameter {name} is not a string or number."
                ))
            }
        };
        params.insert(name, text);
    }
    Ok(params)
}

/// A parameter of a media type (`boundary` of `multipart/form-data; boundary="x"`),
/// unquoted (RFC 9110 §5.6.6, §5.6.4).
fn media_type_param(content_type: &str, wanted: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case(wanted)
            .then(|| unquote(value.trim()))
    })
}

/// Removes the quotes and backslash escapes of an RFC 9110 §5.6.4 quoted-string; a token
/// is returned unchanged.
fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_owned();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(escaped) = chars.next() {
                out.push(escaped);
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses `multipart/form-data` (RFC 7578 on RFC 2046 §5.1.1) into (name, value) pairs.
///
/// The body is: an optional preamble; `--boundary` delimiters, each preceded by CRLF
/// except at the very start; after a delimiter either `--` (the close delimiter, then an
/// ignored epilogue) or optional transport padding and CRLF, the part's header lines, an
/// empty line and the content up to the next CRLF `--boundary`. Every part needs
/// `Content-Disposition: form-data; name="..."`; `filename` and the part's Content-Type
/// are ignored. Line ends must be CRLF, as the RFCs require: a client that sends bare LF
/// is a bug worth seeing.
fn parse_multipart(body: &[u8], boundary: &str) -> Result<Vec<(String, String)>, String> {
    if boundary.is_empty() || boundary.len() > 70 {
        return Err("The multipart boundary must be 1 to 70 characters (RFC 2046 §5.1.1).".into());
    }
    let delimiter = format!("--{boundary}").into_bytes();
    let crlf_delimiter = [b"\r\n".as_slice(), &delimiter].concat();
    let mut pos = if body.starts_with(&delimiter) {
        delimiter.len()
    } else {
        find(body, &crlf_delimiter).ok_or("The multipart body has no boundary delimiter.")?
            + crlf_delimiter.len()
    };
    let mut fields = Vec::new();
    loop {
        let rest = &body[pos..];
        if rest.starts_with(b"--") {
            return Ok(fields);
        }
        // Transport padding (RFC 2046 §5.1.1: LWSP after the boundary), then CRLF.
        let padding = rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count();
        if !rest[padding..].starts_with(b"\r\n") {
            return Err("A multipart boundary is not followed by CRLF.".into());
        }
        pos += padding + 2;

        let mut name = None;
        loop {
            let line_len = find(&body[pos..], b"\r\n")
                .ok_or("A multipart part's headers do not end with an empty line.")?;
            let line = &body[pos..pos + line_len];
            pos += line_len + 2;
            if line.is_empty() {
                break;
            }
            let line = std::str::from_utf8(line)
                .map_err(|_| "A multipart part header is not UTF-8.".to_owned())?;
            let (header_name, value) = line
                .split_once(':')
                .ok_or("A multipart part header has no colon.")?;
            if header_name
                .trim()
                .eq_ignore_ascii_case("content-disposition")
            {
                name = form_data_name(value);
            }
        }
        let name = name.ok_or(
            "A multipart part has no Content-Disposition: form-data with a name (RFC 7578 §4.2).",
        )?;
        let content_len = find(&body[pos..], &crlf_delimiter)
            .ok_or("The multipart body is not terminated by a close delimiter.")?;
        let value = String::from_utf8(body[pos..pos + content_len].to_vec())
            .map_err(|_| format!("The multipart field {name} is not UTF-8 text."))?;
        fields.push((name, value));
        pos += content_len + crlf_delimiter.len();
    }
}

/// The `name` of `Content-Disposition: form-data; name="..."`, or None if it is not
/// form-data or has no name. Splits on `;` outside quoted strings.
fn form_data_name(value: &str) -> Option<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in value.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                params.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    params.push(current);
    let mut params = params.iter();
    if !params.next()?.trim().eq_ignore_ascii_case("form-data") {
        return None;
    }
    params.find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("name")
            .then(|| unquote(value.trim()))
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// HTTP Basic client credentials (RFC 6749 §2.3.1): `Basic base64(urlencode(id) ":"
/// urlencode(secret))`. `Ok(None)`: no Basic header; `Err`: a Basic header that cannot be
/// decoded, which fails client authentication.
fn parse_basic(headers: &HeaderMap) -> Result<Option<(String, String)>, ()> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let Some((scheme, credentials)) = value.to_str().map_err(|_| ())?.trim().split_once(' ') else {
        return Ok(None);
    };
    // RFC 9110 §11.1: the scheme is case-insensitive.
    if !scheme.eq_ignore_ascii_case("basic") {
        return Ok(None);
    }
    let decoded = decode_base64(credentials.trim()).ok_or(())?;
    let decoded = String::from_utf8(decoded).map_err(|_| ())?;
    let (id, secret) = decoded.split_once(':').ok_or(())?;
    Ok(Some((
        form_decode(id).ok_or(())?,
        form_decode(secret).ok_or(())?,
    )))
}

/// Standard base64 (RFC 4648 §4); padding optional.
fn decode_base64(input: &str) -> Option<Vec<u8>> {
    let data = input.trim_end_matches('=');
    if input.len() - data.len() > 2 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for byte in data.bytes() {
        let sextet = match byte {
            b'A'..=b'Z' => byte - b'A',
            b'a'..=b'z' => byte - b'a' + 26,
            b'0'..=b'9' => byte - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(sextet);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // One character alone (6 bits) cannot encode a byte.
    (bits < 6).then_some(out)
}

/// `application/x-www-form-urlencoded` decoding of one value: `+` is a space, `%XX` a
/// byte. A `%` not followed by two hex digits is kept as is, as browsers do.
fn form_decode(input: &str) -> Option<String> {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        match byte {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |at: usize| bytes.get(at).and_then(|b| char::from(*b).to_digit(16));
                if let (Some(high), Some(low)) = (hex(i + 1), hex(i + 2)) {
                    out.push(((high << 4) | low) as u8);
                    i += 3;
                    continue;
                }
                out.push(byte);
            }
            _ => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

// ---------------------------------------------------------------------------------------
// API
// ---------------------------------------------------------------------------------------

async fn api(state: &Arc<State>, request: Request<Incoming>) -> Response<ResBody> {
    let (parts, body) = request.into_parts();
    let token = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        // RFC 9110 §11.1: the scheme is case-insensitive.
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim().to_owned());
    // Exactly one Authorization header: a proxy that appends its header instead of
    // replacing the client's gets a 401 here, whichever of the two carries the token.
    let single = parts.headers.get_all(header::AUTHORIZATION).iter().count() == 1;
    let auth_ok = single && token.as_deref().is_some_and(|t| state.token_is_valid(t));
    let authority = parts
        .uri
        .authority()
        .map(ToString::to_string)
        .or_else(|| header_str(&parts.headers, &header::HOST).map(str::to_owned));
    let received = ApiRequest {
        version: parts.version,
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map_or_else(|| parts.uri.path().to_owned(), ToString::to_string),
        authority,
        headers: parts.headers.clone(),
        body_len: 0,
        body: Bytes::new(),
        body_complete: false,
        token,
    };
    debug!(
        method = %parts.method,
        path = parts.uri.path(),
        token = received.token.as_deref().map(token_hint),
        valid = auth_ok,
        "stand-in API request"
    );
    let rate = state.rate_limit();

    let mut response = if let Some(reply) = state.next_api_reply(auth_ok) {
        read_and_record(state, received, body).await;
        scripted_api_response(reply)
    } else if auth_ok {
        route(state, &parts, received, body).await
    } else {
        read_and_record(state, received, body).await;
        let mut response =
            json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid_token"}));
        // RFC 6750 §3.
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
        response
    };
    add_rate_limit_headers(response.headers_mut(), rate);
    response
}

/// Delivery Hub's IETF `RateLimit-*` headers; ones a scripted reply set are kept.
fn add_rate_limit_headers(headers: &mut HeaderMap, (remaining, reset): (u32, u64)) {
    let values = [
        ("ratelimit-limit", u64::from(RATE_LIMIT)),
        ("ratelimit-remaining", u64::from(remaining)),
        ("ratelimit-reset", reset),
    ];
    for (name, value) in values {
        if !headers.contains_key(name) {
            headers.insert(name, HeaderValue::from(value));
        }
    }
}

async fn route(
    state: &Arc<State>,
    parts: &http::request::Parts,
    received: ApiRequest,
    body: Incoming,
) -> Response<ResBody> {
    let path = parts.uri.path();
    if path == "/echo-body" {
        return echo_body(state, parts, received, body);
    }
    let body_len = read_and_record(state, received, body).await;
    if let Some(n) = path.strip_prefix("/bytes/") {
        let Ok(n) = n.parse::<u64>() else {
            return bad_route("/bytes/<n> needs a byte count");
        };
        let mut response = Response::new(
            RepeatBody { remaining: n }
                .map_err(|never| match never {})
                .boxed(),
        );
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return response;
    }
    if let Some(code) = path.strip_prefix("/status/") {
        let Some(status) = code
            .parse::<u16>()
            .ok()
            .filter(|c| (200..=599).contains(c))
            .and_then(|c| StatusCode::from_u16(c).ok())
        else {
            return bad_route("/status/<code> needs a status from 200 to 599");
        };
        // 204 and 304 cannot carry a body (RFC 9110 §15.3.5, §15.4.5).
        if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            let mut response = Response::new(full(Bytes::new()));
            *response.status_mut() = status;
            return response;
        }
        return json_response(status, &json!({"status": status.as_u16()}));
    }
    if path == "/redirect" {
        let mut response = json_response(StatusCode::FOUND, &json!({"redirect": REDIRECT_TARGET}));
        response
            .headers_mut()
            .insert(header::LOCATION, HeaderValue::from_static(REDIRECT_TARGET));
        return response;
    }
    if let Some(ms) = path.strip_prefix("/slow/") {
        let Ok(ms) = ms.parse::<u64>() else {
            return bad_route("/slow/<ms> needs a number of milliseconds");
        };
        sleep_or_shutdown(state, Duration::from_millis(ms)).await;
    }
    echo_json(parts, body_len)
}

fn bad_route(message: &str) -> Response<ResBody> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": "bad_request", "message": message}),
    )
}

/// The default route: what arrived, as JSON, so a test sees what the proxy forwarded.
fn echo_json(parts: &http::request::Parts, body_len: u64) -> Response<ResBody> {
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        if name == header::AUTHORIZATION {
            continue;
        }
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_owned(), Value::String(joined));
    }
    let mut response = json_response(
        StatusCode::OK,
        &json!({
            "method": parts.method.as_str(),
            "path": parts.uri.path(),
            "query": parts.uri.query(),
            "version": format!("{:?}", parts.version),
            "headers": headers,
            "body_bytes": body_len,
            "token_ok": true,
        }),
    );
    if let Some(id) = parts.headers.get("x-request-id") {
        response.headers_mut().insert("x-request-id", id.clone());
    }
    response
}

/// `/echo-body`: the request body streams straight into the response body, so an 8 MiB
/// upload is never buffered; the request is recorded when its body ends (see [`EchoBody`]).
fn echo_body(
    state: &Arc<State>,
    parts: &http::request::Parts,
    received: ApiRequest,
    body: Incoming,
) -> Response<ResBody> {
    if body.is_end_stream() {
        // hyper would never poll an empty body and might drop it only after the response
        // is sent: record now, so the recording still precedes the response.
        state.record_api_request(ApiRequest {
            body_complete: true,
            ..received
        });
        return Response::new(full(Bytes::new()));
    }
    let echo = EchoBody {
        inner: body,
        copy: BodyCopy::default(),
        pending: Some((Arc::clone(state), received)),
    };
    let mut response = Response::new(echo.map_err(BoxError::from).boxed());
    for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
        if let Some(value) = parts.headers.get(&name) {
            response.headers_mut().insert(name, value.clone());
        }
    }
    response
}

fn scripted_api_response(reply: ApiReply) -> Response<ResBody> {
    raw_response(reply.status, None, &reply.headers, reply.body)
}

/// Reads a whole request body, then records the request. Returns the bytes read.
async fn read_and_record(state: &State, mut received: ApiRequest, mut body: Incoming) -> u64 {
    let mut copy = BodyCopy::default();
    let mut complete = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    copy.push(data);
                }
            }
            Err(error) => {
                debug!(%error, "stand-in API request body failed");
                complete = false;
                break;
            }
        }
    }
    let len = copy.len;
    received.body_len = len;
    received.body = copy.into_bytes();
    received.body_complete = complete;
    state.record_api_request(received);
    len
}

/// Counts a request body and keeps a copy while it is at most [`BODY_LIMIT`].
#[derive(Default)]
struct BodyCopy {
    len: u64,
    kept: BytesMut,
    overflowed: bool,
}

impl BodyCopy {
    fn push(&mut self, data: &[u8]) {
        self.len += data.len() as u64;
        if self.overflowed {
            return;
        }
        if self.kept.len() + data.len() > BODY_LIMIT {
            self.overflowed = true;
            self.kept = BytesMut::new();
        } else {
            self.kept.extend_from_slice(data);
        }
    }

    fn into_bytes(self) -> Bytes {
        self.kept.freeze()
    }
}

/// The request body of `/echo-body`, passed through frame by frame as the response body.
///
/// The request is recorded exactly once: as soon as the body reports its end (hyper may
/// stop polling once `is_end_stream` is true, so waiting for `None` is not enough), when it
/// fails, or — if neither happened — when hyper drops it (client gone, connection closed).
/// When the body ends normally the recording therefore happens before the response's last
/// frame is written, and a test that read the whole response can `wait_api_requests`
/// without racing.
struct EchoBody {
    inner: Incoming,
    copy: BodyCopy,
    pending: Option<(Arc<State>, ApiRequest)>,
}

impl EchoBody {
    fn finish(&mut self, complete: bool) {
        if let Some((state, mut received)) = self.pending.take() {
            received.body_len = self.copy.len;
            received.body = std::mem::take(&mut self.copy).into_bytes();
            received.body_complete = complete;
            state.record_api_request(received);
        }
    }
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // `Incoming` is Unpin, so no pin projection is needed.
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.copy.push(data);
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Ready(None) => this.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for EchoBody {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.finish(complete);
    }
}

/// `/bytes/<n>`: n bytes of `x`, in 64 KiB slices of one static buffer.
struct RepeatBody {
    remaining: u64,
}

impl Body for RepeatBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = usize::try_from(self.remaining).map_or(CHUNK_LEN, |r| r.min(CHUNK_LEN));
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(
            Bytes::from_static(&CHUNK).slice(..len),
        ))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
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
    fn multipart_with_preamble_padding_and_epilogue() {
        let body = b"preamble\r\n--XyZ  \r\n\
            Content-Disposition: form-data; name=\"grant_type\"\r\n\r\n\
            client_credentials\r\n--XyZ\r\n\
            content-disposition: FORM-DATA; name=\"semi;colon\"; filename=\"a.txt\"\r\n\
            Content-Type: text/plain\r\n\r\n\
            line1\r\nline2\r\n--XyZ--\r\nepilogue";
        let fields = parse_multipart(body, "XyZ").unwrap();
        assert_eq!(
            fields,
            vec![
                ("grant_type".to_owned(), "client_credentials".to_owned()),
                ("semi;colon".to_owned(), "line1\r\nline2".to_owned()),
            ]
        );
    }

    #[test]
    fn multipart_starting_at_the_first_byte_with_empty_value() {
        let body = b"--b\r\nContent-Disposition: form-data; name=scope\r\n\r\n\r\n--b--";
        assert_eq!(
            parse_multipart(body, "b").unwrap(),
            vec![("scope".to_owned(), String::new())]
        );
    }

    #[test]
    fn multipart_errors() {
        let unterminated = b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nvalue";
        assert!(parse_multipart(unterminated, "b").is_err());
        let bare_lf = b"--b\nContent-Disposition: form-data; name=\"a\"\n\nvalue\n--b--";
        assert!(parse_multipart(bare_lf, "b").is_err());
        let no_name = b"--b\r\nContent-Disposition: form-data\r\n\r\nvalue\r\n--b--";
        assert!(parse_multipart(no_name, "b").is_err());
        assert!(parse_multipart(b"no delimiter at all", "b").is_err());
        assert!(parse_multipart(b"--\r\n", "").is_err());
    }

    #[test]
    fn boundary_parameter_is_unquoted() {
        assert_eq!(
            media_type_param("multipart/form-data; BOUNDARY=\"a b\\\"c\"", "boundary").as_deref(),
            Some("a b\"c")
        );
        assert_eq!(
            media_type_param("multipart/form-data;boundary=abc", "boundary").as_deref(),
            Some("abc")
        );
        assert_eq!(media_type_param("multipart/form-data", "boundary"), None);
    }

    #[test]
    fn base64_decoding() {
        assert_eq!(decode_base64("").unwrap(), b"");
        assert_eq!(decode_base64("Zg==").unwrap(), b"f");
        assert_eq!(decode_base64("Zm8=").unwrap(), b"fo");
        assert_eq!(decode_base64("Zm9v").unwrap(), b"foo");
        assert_eq!(decode_base64("Zm9vYg").unwrap(), b"foob");
        assert_eq!(decode_base64("+/+/").unwrap(), [0xfb, 0xff, 0xbf]);
        assert!(decode_base64("Z").is_none());
        assert!(decode_base64("Zm9v!").is_none());
        assert!(decode_base64("Zg===").is_none());
    }

    #[test]
    fn form_decoding() {
        assert_eq!(form_decode("a+b%3Ac%25").as_deref(), Some("a b:c%"));
        assert_eq!(form_decode("100%").as_deref(), Some("100%"));
        assert_eq!(form_decode("%zz").as_deref(), Some("%zz"));
        assert_eq!(form_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(form_decode("%FF"), None);
    }

    #[test]
    fn params_by_content_type() {
        let (encoding, params) = parse_params(
            Some("application/x-www-form-urlencoded; charset=utf-8"),
            b"grant_type=client_credentials&ttl=60",
        );
        assert_eq!(encoding, "form");
        assert_eq!(params.unwrap()["ttl"], "60");
        let (encoding, params) = parse_params(
            Some("Application/JSON"),
            br#"{"ttl": 60, "client_id": "a"}"#,
        );
        assert_eq!(encoding, "json");
        assert_eq!(params.unwrap()["ttl"], "60");
        let (_, params) = parse_params(Some("application/json"), br#"{"a": [1]}"#);
        assert!(params.is_err());
        let (_, params) = parse_params(Some("application/x-www-form-urlencoded"), b"a=1&a=2");
        assert!(params.is_err());
        assert_eq!(parse_params(None, b"").0, "none");
        assert_eq!(parse_params(None, b"x").0, "other");
        assert_eq!(parse_params(Some("text/plain"), b"x").0, "other");
    }

    #[test]
    fn random_tokens_have_doorkeepers_shape() {
        let token = random_token();
        assert_eq!(token.len(), 43);
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(token, random_token());
        assert_eq!(token_hint("abcdefgh"), "abcd…");
    }

    #[test]
    fn base_urls() {
        let addr: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        assert_eq!(base_url(addr, false), "http://127.0.0.1:8080");
        assert_eq!(base_url(addr, true), "https://localhost:8080");
        let addr: SocketAddr = "[::1]:9".parse().unwrap();
        assert_eq!(base_url(addr, false), "http://[::1]:9");
    }
}
