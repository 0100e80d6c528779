//! The shared in-process harness: the stand-in Delivery Hub (token endpoint + API, with knobs
//! and recordings) on `127.0.0.1:0`, tokengate started with its own listeners, an egress
//! CONNECT proxy ([`egress_proxy`]), and small clients (reqwest for ordinary calls, raw TCP for
//! requests no client library would send).
//!
//! Configurations are loaded with an empty proxy environment, so a developer's or CI's
//! `HTTPS_PROXY` never steers a test; `tests/egress_env.rs` is the one test of the real one.
#![allow(dead_code, clippy::unwrap_used)]

pub mod egress_proxy;
pub mod process;
pub mod redis;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokengate::config::{Config, ProxyEnv};
use tokengate::standin::{Hub, HubOptions, TokenReply};
use tokengate::{Listeners, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub async fn hub() -> Hub {
    hub_with(HubOptions::default()).await
}

pub async fn hub_with(opts: HubOptions) -> Hub {
    Hub::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), opts)
        .await
        .unwrap()
}

/// A running tokengate and its addresses.
pub struct Tg {
    pub running: Option<Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl Tg {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    /// Waits until every integration holds a valid token (bounded: a test that never gets
    /// ready fails here with a message instead of hanging).
    pub async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.running().is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tokengate not ready within 10 s: {:?}",
                client().get(self.admin_url("/readyz")).send().await.ok()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(5)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        // Not `reqwest::get`: this crate's reqwest has no default TLS provider and panics.
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// One sample from `/metrics` for integration `oms` plus `labels`; 0 when absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let mut all = vec![("integration", "oms")];
        all.extend_from_slice(labels);
        sample(&self.metrics().await, name, &all).unwrap_or(0.0)
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        client()
            .get(self.admin_url("/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// `GET /readyz`: status code and JSON body.
    pub async fn readyz(&self) -> (u16, serde_json::Value) {
        let res = client()
            .get(self.admin_url("/readyz"))
            .send()
            .await
            .unwrap();
        let code = res.status().as_u16();
        (code, res.json().await.unwrap())
    }
}

/// Polls `check` every 10 ms until it returns `Some`, failing with `what` after `limit`
/// (for states that have no event to await, such as a `/status` field).
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The TOML of one integration `oms` pointed at `hub`; `extra` lines go into its table.
pub fn toml_for(hub: &Hub, extra: &str) -> String {
    toml_with(&hub.token_url(), &hub.base_url(), extra)
}

/// The TOML of one integration `oms` with its own token endpoint and upstream (which may be
/// different servers); `extra` lines go into its table.
pub fn toml_with(token_url: &str, upstream: &str, extra: &str) -> String {
    toml_with_client(
        token_url,
        upstream,
        "test-client",
        r#""test-secret""#,
        extra,
    )
}

/// [`toml_with`] with the client's own `client_id` and `client_secret`, the latter as TOML
/// (a quoted string, or a source such as `{ file = "..." }`).
pub fn toml_with_client(
    token_url: &str,
    upstream: &str,
    client_id: &str,
    client_secret: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[server]
admin_listen = "{{admin}}"
shutdown_grace = "5s"

[[integration]]
name = "oms"
listen = "{{listen0}}"
token_url = "{token_url}"
upstream = "{upstream}"
client_id = "{client_id}"
client_secret = {client_secret}
{extra}
"#
    )
}

/// Starts tokengate with `toml`, in which `{admin}` and `{listenN}` are replaced by addresses
/// bound here on `127.0.0.1:0`.
pub async fn start_toml(toml: &str) -> Tg {
    prepare(toml).await.start().await
}

/// [`start_toml`] with the given proxy environment (`HTTPS_PROXY`, `NO_PROXY`).
pub async fn start_toml_with_env(toml: &str, env: &ProxyEnv) -> Tg {
    prepare_with_env(toml, env).await.start().await
}

/// A configuration with its listeners bound but tokengate not started yet, so a test can
/// connect (the kernel accepts into the backlog) before any of tokengate's tasks runs.
pub struct Prepared {
    pub config: Config,
    pub listeners: Listeners,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

/// Binds `{admin}` and every `{listenN}` of `toml` on `127.0.0.1:0` and loads the result.
pub async fn prepare(toml: &str) -> Prepared {
    prepare_with_env(toml, &ProxyEnv::default()).await
}

/// [`prepare`] with the given proxy environment.
pub async fn prepare_with_env(toml: &str, env: &ProxyEnv) -> Prepared {
    let any = "127.0.0.1:0".parse().unwrap();
    let admin = tokengate::listen(any).unwrap();
    let mut text = toml.replace("{admin}", &admin.local_addr().unwrap().to_string());
    let mut integrations = Vec::new();
    for i in 0.. {
        let key = format!("{{listen{i}}}");
        if !text.contains(&key) {
            break;
        }
        let l = tokengate::listen(any).unwrap();
        text = text.replace(&key, &l.local_addr().unwrap().to_string());
        integrations.push(l);
    }
    let config = Config::from_str_with_env(&text, Path::new("test.toml"), env).unwrap();
    Prepared {
        config,
        proxy: integrations[0].local_addr().unwrap(),
        admin: admin.local_addr().unwrap(),
        listeners: Listeners {
            admin,
            integrations,
        },
    }
}

impl Prepared {
    /// Starts tokengate (without waiting for readiness).
    pub async fn start(self) -> Tg {
        let running = tokengate::start(self.config, self.listeners).await.unwrap();
        Tg {
            running: Some(running),
            proxy: self.proxy,
            admin: self.admin,
        }
    }
}

/// tokengate with one integration on `hub`, ready.
pub async fn start(hub: &Hub, extra: &str) -> Tg {
    let tg = start_toml(&toml_for(hub, extra)).await;
    tg.ready().await;
    tg
}

/// tokengate with one integration fetching tokens from `token_url` and forwarding to
/// `upstream`, ready.
pub async fn start_with(token_url: &str, upstream: &str, extra: &str) -> Tg {
    let tg = start_toml(&toml_with(token_url, upstream, extra)).await;
    tg.ready().await;
    tg
}

/// A plain-HTTP client that neither follows redirects nor uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tokengate::tls::client_config(None).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

/// Sends raw bytes and returns everything the server sends until it closes or goes quiet.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    String::from_utf8_lossy(&raw_bytes(addr, request).await).into_owned()
}

/// [`raw`], parsed: one HTTP/1.1 response (body by `Content-Length`, chunked, or until close).
pub async fn raw_response(addr: SocketAddr, request: &[u8]) -> RawResponse {
    RawResponse::parse(&raw_bytes(addr, request).await)
}

/// Sends raw bytes and returns everything the server sends until it closes, goes quiet, or
/// the first response is complete.
pub async fn raw_bytes(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    read_bytes(raw_send(addr, request).await).await
}

/// Connects and sends raw bytes; read the answer with [`read_bytes`] (a test can send before
/// the server runs, and read after).
pub async fn raw_send(addr: SocketAddr, request: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    s
}

/// Everything the server sends on `s` until it closes, goes quiet, or the first response is
/// complete.
pub async fn read_bytes(mut s: TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
        // One response with `Connection: close` is what these tests send; stop at its end.
        if let Some(head_end) = find(&out, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..head_end]).to_lowercase();
            if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                if out.len() >= head_end + 4 + len {
                    break;
                }
            } else if head.contains("transfer-encoding: chunked") && out.ends_with(b"\r\n0\r\n\r\n")
            {
                break;
            }
        }
    }
    out
}

/// One HTTP/1.1 response as bytes on the wire, for tests that must see exactly which
/// headers were sent.
#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    /// In the order received, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Decoded from chunked transfer coding when it was used.
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn parse(bytes: &[u8]) -> RawResponse {
        let head_end = find(bytes, b"\r\n\r\n").unwrap_or_else(|| {
            panic!(
                "no complete response head in {:?}",
                String::from_utf8_lossy(bytes)
            )
        });
        let head = String::from_utf8_lossy(&bytes[..head_end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let rest = &bytes[head_end + 4..];
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
        let body = if chunked {
            decode_chunked(rest)
        } else {
            rest.to_vec()
        };
        RawResponse {
            status,
            headers,
            body,
        }
    }

    /// The first value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn decode_chunked(mut rest: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(rest, b"\r\n") else {
            panic!("truncated chunked body");
        };
        let size_text = String::from_utf8_lossy(&rest[..line_end]);
        let size_text = size_text.split(';').next().unwrap().trim();
        let size = usize::from_str_radix(size_text, 16).unwrap();
        rest = &rest[line_end + 2..];
        if size == 0 {
            return body;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// A loopback address nothing listens on (bound, then closed), for "connection refused".
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Waits (bounded) until the metric sample equals `want`; returns the last metrics text.
pub async fn wait_sample(tg: &Tg, name: &str, labels: &[(&str, &str)], want: f64) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = tg.metrics().await;
        if sample(&text, name, labels) == Some(want) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}{labels:?} is {:?}, not {want}, after 10 s",
            sample(&text, name, labels)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A test certificate authority (rcgen) that signs server certificates for the stand-in.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        TestCa::named("tokengate test CA")
    }

    /// A CA whose subject's common name is `name`. Two CAs of the same name look alike to a
    /// verifier until it checks the signature.
    pub fn named(name: &str) -> TestCa {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    /// The CA certificate as PEM, for `ca_file`.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA certificate to `dir/ca.pem` and returns the path.
    pub fn write_pem(&self, dir: &Path) -> std::path::PathBuf {
        let path = dir.join("ca.pem");
        std::fs::write(&path, self.pem()).unwrap();
        path
    }

    /// A leaf for `names` signed by this CA: (certificate PEM, private key PEM).
    pub fn leaf_pem(&self, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let leaf = rcgen::CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &self.issuer)
            .unwrap();
        (leaf.pem(), key.serialize_pem())
    }

    /// A server configuration (ALPN h2, http/1.1) with a leaf for `names`, signed by this CA.
    pub fn server_config(&self, names: &[&str]) -> std::sync::Arc<rustls::ServerConfig> {
        self.server_config_with(names, |_| {})
    }

    /// [`TestCa::server_config`] with the leaf's parameters changed by `edit` first (its
    /// validity period, its extended key usages), for certificates a client must refuse.
    pub fn server_config_with(
        &self,
        names: &[&str],
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> std::sync::Arc<rustls::ServerConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = rcgen::CertificateParams::new(names).unwrap();
        edit(&mut params);
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        tokengate::standin::tls_server_config(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap()
    }
}

/// A server whose own certificate is a self-signed CA certificate (`CA:TRUE`) for `names`,
/// as `openssl req -x509` makes one: the server configuration and the certificate's PEM (what
/// a user puts in `ca_file`).
pub fn self_signed_ca_server(names: &[&str]) -> (std::sync::Arc<rustls::ServerConfig>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let mut params = rcgen::CertificateParams::new(names).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    let cert = params.self_signed(&key).unwrap();
    let config = tokengate::standin::tls_server_config(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .unwrap();
    (config, cert.pem())
}

/// A stand-in served over TLS with `config`; its base URL is `https://localhost:PORT`.
pub async fn tls_hub_with(config: std::sync::Arc<rustls::ServerConfig>) -> Hub {
    hub_with(HubOptions {
        tls: Some(config),
        ..HubOptions::default()
    })
    .await
}

/// A stand-in served over TLS with a leaf for `names` signed by `ca`; its base URL is
/// `https://localhost:PORT`.
pub async fn tls_hub(ca: &TestCa, names: &[&str]) -> Hub {
    tls_hub_with(ca.server_config(names)).await
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of one sample in Prometheus text output, e.g.
/// `sample(&text, "tokengate_token_valid", &[("integration", "oms")])`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            let (l, v) = r.split_once('}')?;
            (l, v)
        } else {
            ("", rest)
        };
        if !value.starts_with(' ') {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| label_part.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        all.then(|| value.trim().parse().ok()).flatten()
    })
}

/// A scripted token-endpoint reply with this status, content type and body, as is.
pub fn token_raw(
    status: u16,
    content_type: Option<&str>,
    body: impl Into<bytes::Bytes>,
) -> TokenReply {
    TokenReply::Raw {
        status,
        content_type: content_type.map(str::to_owned),
        headers: Vec::new(),
        body: body.into(),
    }
}

/// A token the hub issues, with these `expires_in` and `token_type` fields (absent: `None`).
pub fn token_issue(
    expires_in: Option<serde_json::Value>,
    token_type: Option<serde_json::Value>,
) -> TokenReply {
    TokenReply::Issue {
        expires_in,
        token_type,
        created_at: None,
    }
}
