//! The tunnel: how the upstream pool reaches a destination — a direct TCP connection, or a
//! CONNECT tunnel (RFC 9110 §9.3.6) through the egress proxy. hyper-rustls wraps this
//! connector, so TLS to the destination runs end to end inside the tunnel and the proxy sees
//! only the destination's host and port, never the token.
//!
//! Which path an endpoint takes is decided at load time ([`crate::config::Egress`]); this
//! module only carries it out. The token client tunnels with reqwest's own CONNECT support;
//! when that fails, [`probe`] repeats the handshake here to learn what the proxy answered,
//! which reqwest does not report beyond "407" or "unsuccessful".
//!
//! The handshake is our own rather than hyper-util's `Tunnel` for the same reason: an
//! operator needs the proxy's status line ("403 Access violation", "502 Bad Gateway"), and
//! `Tunnel` reduces every refusal but 407 to "unsuccessful". It does not speak TLS to the
//! proxy (`https://` proxies are refused by configuration) and does not follow the proxy's
//! authentication challenges beyond Basic credentials sent up front.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;

use crate::config::{proxy_name, Egress, Endpoint};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The proxy's answer to CONNECT is a short head; anything longer is not a proxy.
pub(crate) const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// Why a tunnel could not be set up. `Display` names the proxy, the destination and what the
/// proxy answered, then what to check; it never contains the credentials.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TunnelError {
    #[error("cannot connect to the egress proxy {proxy}: {reason}; check server.egress_proxy (or HTTPS_PROXY) and that the proxy is running and reachable from this host")]
    Unreachable { proxy: String, reason: String },
    #[error("egress proxy {proxy} answered {status}{} to CONNECT {target}{}", reason_text(.reason), refusal_advice(*.status))]
    Refused {
        proxy: String,
        target: String,
        status: u16,
        /// The reason phrase, stripped of control characters and cut short.
        reason: String,
    },
    #[error("egress proxy {proxy} did not set up the tunnel to {target} within connect_timeout ({}); the proxy may be unable to reach it", humantime::format_duration(*.after))]
    Timeout {
        proxy: String,
        target: String,
        after: Duration,
    },
    #[error("egress proxy {proxy} broke the CONNECT exchange for {target}: {reason}")]
    Protocol {
        proxy: String,
        target: String,
        reason: String,
    },
}

fn reason_text(reason: &str) -> String {
    if reason.is_empty() {
        String::new()
    } else {
        format!(" {reason}")
    }
}

fn refusal_advice(status: u16) -> &'static str {
    match status {
        // 407 is the standard answer; some proxies (tinyproxy) answer wrong credentials
        // with 401 and only missing ones with 407.
        401 | 407 => "; the proxy did not accept the credentials (none are sent unless configured): check server.egress_proxy_auth (user:password), or the user:password in HTTPS_PROXY",
        403 => "; the proxy does not allow this destination or port: ask its operators to allow CONNECT to it",
        500..=599 => "; the proxy could not reach the destination: check the host name and the proxy's own network path",
        _ => "",
    }
}

/// The upstream pool's connector: one per [`super::Route`], rebuilt with it on reload.
#[derive(Clone)]
pub(crate) enum Connector {
    Direct(HttpConnector),
    Tunnel(TunnelConnector),
}

impl Connector {
    /// `connect_timeout` bounds a direct connect, and the whole tunnel setup (connect to the
    /// proxy and its answer to CONNECT) for a tunnel.
    pub(crate) fn new(egress: &Egress, connect_timeout: Duration) -> Connector {
        let mut http = HttpConnector::new();
        // The destination's scheme is https: TLS is added by the layer above.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        match egress {
            Egress::Direct { .. } => Connector::Direct(http),
            Egress::Proxy { url, auth, .. } => Connector::Tunnel(TunnelConnector::new(
                http,
                url,
                auth.as_ref().map(|a| a.value.expose()),
                connect_timeout,
            )),
        }
    }
}

// Hand-written: a tunnel connector holds the proxy credentials.
impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::Direct(_) => f.write_str("Connector::Direct"),
            Connector::Tunnel(t) => write!(f, "Connector::Tunnel({})", t.proxy.name),
        }
    }
}

/// An upstream connection as the pool sees it. hyper-util's `Connection` for a plain TCP
/// stream attaches the peer and local addresses (`HttpInfo`) to every response it carries,
/// three allocations per request that nothing in tokengate reads.
pub(crate) struct UpstreamIo(TokioIo<TcpStream>);

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

impl Service<Uri> for Connector {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self {
            Connector::Direct(http) => http.poll_ready(cx).map_err(Into::into),
            Connector::Tunnel(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        match self {
            Connector::Direct(http) => {
                let connecting = http.call(dst);
                Box::pin(async move { Ok(UpstreamIo(connecting.await?)) })
            }
            Connector::Tunnel(tunnel) => {
                let tunnel = tunnel.clone();
                Box::pin(async move { Ok(UpstreamIo(tunnel.open(&dst).await?)) })
            }
        }
    }
}

/// Opens CONNECT tunnels through one proxy. Cloned per connection attempt; the proxy's
/// address and credentials are shared.
#[derive(Clone)]
pub(crate) struct TunnelConnector {
    http: HttpConnector,
    proxy: Arc<ProxyPeer>,
    timeout: Duration,
}

struct ProxyPeer {
    /// Where to connect: `http://host:port/`.
    uri: Uri,
    /// `http://host:port`, for messages.
    name: String,
    /// `Basic <base64(user:password)>`; a secret.
    authorization: Option<String>,
}

impl TunnelConnector {
    fn new(
        http: HttpConnector,
        url: &url::Url,
        user_password: Option<&str>,
        timeout: Duration,
    ) -> TunnelConnector {
        let name = proxy_name(url);
        // A proxy URL from the configuration is always a valid URI; if it were not, the
        // connect fails with a message naming the proxy.
        let uri = Uri::try_from(url.as_str()).unwrap_or_default();
        // RFC 7617 §2: Basic credentials are base64(user-id ":" password).
        let authorization = user_password.map(|up| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(up)
            )
        });
        TunnelConnector {
            http,
            proxy: Arc::new(ProxyPeer {
                uri,
                name,
                authorization,
            }),
            timeout,
        }
    }

    /// Connects to the proxy and asks it for a tunnel to `dst`'s host and port; the stream
    /// returned carries bytes to and from the destination.
    pub(crate) async fn open(&self, dst: &Uri) -> Result<TokioIo<TcpStream>, TunnelError> {
        let target = authority_form(dst);
        let proxy = &self.proxy;
        let setup = async {
            let mut http = self.http.clone();
            let io = http
                .call(proxy.uri.clone())
                .await
                .map_err(|e| TunnelError::Unreachable {
                    proxy: proxy.name.clone(),
                    reason: crate::error::chain(&e),
                })?;
            let mut stream = io.into_inner();
            handshake(&mut stream, &target, proxy.authorization.as_deref())
                .await
                .map_err(|failure| failure.into_error(&proxy.name, &target))?;
            Ok(TokioIo::new(stream))
        };
        match tokio::time::timeout(self.timeout, setup).await {
            Ok(result) => result,
            Err(_) => Err(TunnelError::Timeout {
                proxy: proxy.name.clone(),
                target,
                after: self.timeout,
            }),
        }
    }
}

/// Sets up (and drops) one tunnel to `dest` exactly as the upstream pool would. For the
/// token client's error messages: `None` when the route is direct or the tunnel works now.
pub(crate) async fn probe(
    egress: &Egress,
    dest: &Endpoint,
    timeout: Duration,
) -> Option<TunnelError> {
    let Connector::Tunnel(tunnel) = Connector::new(egress, timeout) else {
        return None;
    };
    let dst = Uri::try_from(dest.url.as_str()).ok()?;
    tunnel.open(&dst).await.err()
}

/// `host:port` for the CONNECT request target (RFC 9112 §3.2.3), IPv6 in brackets.
fn authority_form(dst: &Uri) -> String {
    // `Uri::host` keeps an IPv6 literal's brackets, which authority-form needs.
    let host = dst.host().unwrap_or_default();
    let port = dst.port_u16().unwrap_or(match dst.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    format!("{host}:{port}")
}

/// How a handshake went wrong, before the proxy's name is attached.
#[derive(Debug)]
enum Failure {
    Io(std::io::Error),
    Status(u16, String),
    Protocol(String),
}

impl Failure {
    fn into_error(self, proxy: &str, target: &str) -> TunnelError {
        let (proxy, target) = (proxy.to_owned(), target.to_owned());
        match self {
            Failure::Status(status, reason) => TunnelError::Refused {
                proxy,
                target,
                status,
                reason,
            },
            Failure::Io(e) => TunnelError::Protocol {
                proxy,
                target,
                reason: format!("connection failed during CONNECT: {e}"),
            },
            Failure::Protocol(reason) => TunnelError::Protocol {
                proxy,
                target,
                reason,
            },
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure::Io(e)
    }
}

/// Sends `CONNECT target` (with `Proxy-Authorization` only when credentials are configured)
/// and reads the proxy's response head. Any 2xx opens the tunnel (RFC 9110 §9.3.6); such a
/// response has no content, so bytes after its head would be the destination's, which for
/// TLS cannot come before our ClientHello: they are refused rather than lost.
async fn handshake(
    stream: &mut TcpStream,
    target: &str,
    authorization: Option<&str>,
) -> Result<(), Failure> {
    let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(value) = authorization {
        request.push_str("Proxy-Authorization: ");
        request.push_str(value);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;

    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(Failure::Protocol(if head.is_empty() {
                "it closed the connection without answering".to_owned()
            } else {
                "it closed the connection in the middle of its answer".to_owned()
            }));
        }
        head.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&head) {
            Ok(httparse::Status::Complete(len)) => {
                let status = response.code.unwrap_or(0);
                if !(200..300).contains(&status) {
                    return Err(Failure::Status(status, clean(response.reason)));
                }
                if len != head.len() {
                    return Err(Failure::Protocol(format!(
                        "it sent {} bytes after its {status} answer, before the TLS handshake",
                        head.len() - len
                    )));
                }
                return Ok(());
            }
            Ok(httparse::Status::Partial) if head.len() >= MAX_RESPONSE_HEAD => {
                return Err(Failure::Protocol(format!(
                    "its answer's head is longer than {} KiB",
                    MAX_RESPONSE_HEAD / 1024
                )));
            }
            Ok(httparse::Status::Partial) => {}
            Err(e) => {
                return Err(Failure::Protocol(format!(
                    "its answer is not an HTTP response ({e})"
                )))
            }
        }
    }
}

/// A reason phrase as it may be shown: no control characters, at most 80 characters.
fn clean(reason: Option<&str>) -> String {
    reason
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(80)
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn authority_form_keeps_ipv6_brackets_and_default_ports() {
        let af = |u: &str| authority_form(&u.parse().unwrap());
        assert_eq!(af("https://api.bringg.com/v2"), "api.bringg.com:443");
        assert_eq!(af("https://api.bringg.com:8443/"), "api.bringg.com:8443");
        assert_eq!(af("https://[fd00::1]:9443/"), "[fd00::1]:9443");
        assert_eq!(af("http://127.0.0.1/"), "127.0.0.1:80");
    }

    #[test]
    fn refusals_keep_the_status_line_and_advise() {
        let e = Failure::Status(407, "Proxy Authentication Required".into())
            .into_error("http://proxy:3128", "api.bringg.com:443");
        let text = e.to_string();
        assert!(
            text.starts_with("egress proxy http://proxy:3128 answered 407 Proxy Authentication Required to CONNECT api.bringg.com:443; "),
            "{text}"
        );
        assert!(text.contains("egress_proxy_auth"), "{text}");
        assert!(matches!(e, TunnelError::Refused { status: 407, .. }));
        let e = Failure::Status(502, String::new()).into_error("http://p:1", "h:443");
        assert!(e
            .to_string()
            .starts_with("egress proxy http://p:1 answered 502 to CONNECT h:443;"));
    }

    #[test]
    fn reason_phrases_are_cleaned() {
        assert_eq!(clean(Some("Access\u{7} violation ")), "Access violation");
        assert_eq!(clean(None), "");
        assert_eq!(clean(Some(&"x".repeat(200))).len(), 80);
    }

    /// A scripted proxy: reads one request head, answers `answer`, returns the head it read.
    async fn scripted(
        answer: &'static [u8],
    ) -> (std::net::SocketAddr, tokio::task::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            s.write_all(answer).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        (addr, task)
    }

    async fn run(answer: &'static [u8], auth: Option<&str>) -> (Result<(), Failure>, String) {
        let (addr, task) = scripted(answer).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let result = handshake(&mut stream, "api.example:443", auth).await;
        (result, task.await.unwrap())
    }

    #[tokio::test]
    async fn handshake_sends_connect_and_credentials_only_when_set() {
        let (result, head) = run(b"HTTP/1.1 200 Connection established\r\n\r\n", None).await;
        assert!(result.is_ok());
        assert_eq!(
            head,
            "CONNECT api.example:443 HTTP/1.1\r\nHost: api.example:443\r\n\r\n"
        );
        let (result, head) = run(
            b"HTTP/1.0 200 OK\r\nProxy-agent: x\r\n\r\n",
            Some("Basic dTpw"),
        )
        .await;
        assert!(result.is_ok());
        assert!(
            head.contains("\r\nProxy-Authorization: Basic dTpw\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn handshake_reports_refusals_and_broken_answers() {
        let (result, _) = run(
            b"HTTP/1.0 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n<html>",
            None,
        )
        .await;
        assert!(
            matches!(result, Err(Failure::Status(407, ref r)) if r == "Proxy Authentication Required")
        );
        let (result, _) = run(b"HTTP/1.1 200 OK\r\n\r\nEARLY", None).await;
        assert!(matches!(result, Err(Failure::Protocol(ref r)) if r.contains("5 bytes after")));
        let (result, _) = run(b"SSH-2.0-OpenSSH\r\n\r\n", None).await;
        assert!(
            matches!(result, Err(Failure::Protocol(ref r)) if r.contains("not an HTTP response"))
        );
        let (result, _) = run(b"HTTP/1.1 200 OK\r\n", None).await;
        assert!(matches!(result, Err(Failure::Protocol(ref r)) if r.contains("middle")));
    }

    #[test]
    fn basic_credentials_are_base64_of_user_colon_password() {
        let http = HttpConnector::new();
        let url = url::Url::parse("http://proxy:3128").unwrap();
        let t = TunnelConnector::new(
            http,
            &url,
            Some("Aladdin:open sesame"),
            Duration::from_secs(1),
        );
        // RFC 7617 §2's example.
        assert_eq!(
            t.proxy.authorization.as_deref(),
            Some("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==")
        );
        assert_eq!(t.proxy.name, "http://proxy:3128");
        assert_eq!(
            format!("{:?}", Connector::Tunnel(t)),
            "Connector::Tunnel(http://proxy:3128)"
        );
    }
}
