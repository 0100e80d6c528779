//! The floor under tokengate's per-request cost: hyper alone, with tokengate's connection
//! strategy and nothing else of tokengate's. The same server (hyper-util's auto builder:
//! HTTP/1.1 and h2 on one port, 256 KiB buffers, half-closed clients answered), the same
//! one-thread runtime on its own thread, `TCP_NODELAY`, and upstream connections held the way
//! tokengate holds them: each client connection keeps its own HTTP/1 upstream connection
//! (hyper's connection-level client) between requests, leaves it on a last-in-first-out
//! stack of ≤ 32 spares when it ends, and an upstream that negotiates h2 gets one shared
//! connection. Every request gets a fixed `Authorization`, the upstream's `Host`, and goes
//! out as it came; the response comes back as it is. No filter, no hop-by-hop strip, no token
//! cell, no request id, no metrics, no logging, no timers, no drain, no `HttpInfo`.
//!
//! `bench/run.sh` measures it as the target `floor` in the same run as tokengate and nginx,
//! so each gap splits into hyper's (floor vs nginx) and tokengate's own (tokengate vs floor):
//!
//! ```text
//! taskset -c 1 target/release/examples/floor --listen 127.0.0.1:18460 \
//!     --upstream https://127.0.0.1:18401 --ca ca.pem --token "$TOKEN"
//! ```
//!
//! `--token` is the access token it sends (`bench/run.sh` passes the one it fetched for nginx
//! from the stand-in). Its length counts: the benchmark's upstream echoes `Authorization`, so a
//! shorter token than tokengate's made both directions' messages shorter for the floor alone
//! (over TLS, ~390 of ~36,000 instructions per small GET, bench/NOTES.md session 8). Without
//! it, a placeholder as long as the stand-in's tokens.
//!
//! Not a product: an upstream failure is a bare 502, and it runs until killed.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use http::header::{AUTHORIZATION, HOST};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

type Error = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, hyper::Error>;
type H1 = http1::SendRequest<Incoming>;
type H2 = http2::SendRequest<Incoming>;

/// tokengate's `MAX_BUF` and `MAX_SPARES`.
const MAX_BUF: usize = 256 * 1024;
const MAX_SPARES: usize = 32;

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args().skip_while(|a| a != name);
    args.next();
    args.next()
}

fn main() -> Result<(), Error> {
    let listen: SocketAddr = arg("--listen")
        .unwrap_or_else(|| "127.0.0.1:18460".into())
        .parse()?;
    let upstream: Uri = arg("--upstream")
        .unwrap_or_else(|| "http://127.0.0.1:18400".into())
        .parse()?;
    let ca = arg("--ca");
    // 43 characters, as the stand-in's tokens (32 random bytes, base64url).
    let token =
        arg("--token").unwrap_or_else(|| "floor-benchmark-token-as-long-as-the-hub-s-".into());
    let bearer = HeaderValue::try_from(format!("Bearer {token}"))?;
    let up = Arc::new(Upstream::new(&upstream, ca.as_deref(), bearer)?);
    // As tokengate on one CPU: a current-thread runtime on a thread of its own.
    std::thread::Builder::new()
        .name("floor-rt".into())
        .spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(serve(listen, up))
        })?
        .join()
        .map_err(|_| "the runtime thread panicked")?
}

struct Upstream {
    addr: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    bearer: HeaderValue,
    spares: Mutex<Vec<H1>>,
    h2: Mutex<Option<H2>>,
}

enum Conn {
    H1(H1),
    H2(H2),
}

impl Upstream {
    fn new(url: &Uri, ca: Option<&str>, bearer: HeaderValue) -> Result<Upstream, Error> {
        let authority = url.authority().ok_or("--upstream needs host:port")?.clone();
        let tls = if url.scheme() == Some(&Scheme::HTTPS) {
            let mut config = tokengate::tls::client_config(ca.map(std::path::Path::new))?;
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            let name = ServerName::try_from(authority.host().to_owned())?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        let port = authority
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        Ok(Upstream {
            addr: format!("{}:{port}", authority.host()),
            scheme: url.scheme().cloned().unwrap_or(Scheme::HTTP),
            host: HeaderValue::from_str(authority.as_str())?,
            authority,
            tls,
            bearer,
            spares: Mutex::default(),
            h2: Mutex::default(),
        })
    }

    async fn connect(&self) -> Result<Conn, Error> {
        let tcp = TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        let Some((connector, name)) = &self.tls else {
            return self.handshake_h1(TokioIo::new(tcp)).await;
        };
        let tls = connector.connect(name.clone(), tcp).await?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return self.handshake_h1(TokioIo::new(tls)).await;
        }
        let (conn, task) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await?;
        tokio::spawn(task);
        *self.h2.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn.clone());
        Ok(Conn::H2(conn))
    }

    async fn handshake_h1<T>(&self, io: T) -> Result<Conn, Error>
    where
        T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let (conn, task) = http1::Builder::new()
            .max_buf_size(MAX_BUF)
            .handshake(io)
            .await?;
        tokio::spawn(task);
        Ok(Conn::H1(conn))
    }

    fn shared_h2(&self) -> Option<H2> {
        let shared = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
        shared.as_ref().filter(|c| !c.is_closed()).cloned()
    }

    fn spare(&self) -> Option<H1> {
        let mut spares = self.spares.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(conn) = spares.pop() {
            if conn.is_ready() {
                return Some(conn);
            }
        }
        None
    }

    async fn send(
        &self,
        mut req: Request<Incoming>,
        mine: &Affinity,
    ) -> Result<Response<Body>, Error> {
        req.headers_mut().insert(AUTHORIZATION, self.bearer.clone());
        let held = mine.0.lock().unwrap_or_else(PoisonError::into_inner).take();
        let conn = match (self.shared_h2(), held.or_else(|| self.spare())) {
            (Some(h2), _) => Conn::H2(h2),
            (None, Some(h1)) => Conn::H1(h1),
            (None, None) => self.connect().await?,
        };
        let res = match conn {
            Conn::H1(mut conn) => {
                conn.ready().await?;
                req.headers_mut().insert(HOST, self.host.clone());
                let res = conn.send_request(req).await?;
                *mine.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(conn);
                res
            }
            Conn::H2(mut conn) => {
                let mut parts = req.uri().clone().into_parts();
                parts.scheme = Some(self.scheme.clone());
                parts.authority = Some(self.authority.clone());
                *req.uri_mut() = Uri::from_parts(parts)?;
                req.headers_mut().remove(HOST);
                conn.send_request(req).await?
            }
        };
        Ok(res.map(BodyExt::boxed))
    }
}

/// The upstream connection a client connection holds; a spare when the client goes.
struct Affinity(Mutex<Option<H1>>, Arc<Upstream>);

impl Drop for Affinity {
    fn drop(&mut self) {
        if let Some(conn) = self.0.get_mut().ok().and_then(Option::take) {
            let mut spares = self.1.spares.lock().unwrap_or_else(PoisonError::into_inner);
            if spares.len() >= MAX_SPARES {
                spares.remove(0);
            }
            spares.push(conn);
        }
    }
}

async fn serve(listen: SocketAddr, up: Arc<Upstream>) -> Result<(), Error> {
    let listener = tokengate::listen(listen)?;
    let mut server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    server
        .http1()
        .keep_alive(true)
        .half_close(true)
        .max_buf_size(MAX_BUF);
    let server = Arc::new(server);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let mine = Arc::new(Affinity(Mutex::new(None), up.clone()));
        let up = up.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (up, mine) = (up.clone(), mine.clone());
            async move {
                let res = match up.send(req, &mine).await {
                    Ok(res) => res,
                    Err(_) => {
                        let mut res = Response::new(Empty::new().map_err(|e| match e {}).boxed());
                        *res.status_mut() = StatusCode::BAD_GATEWAY;
                        res
                    }
                };
                Ok::<_, Infallible>(res)
            }
        });
        let server = server.clone();
        tokio::spawn(async move {
            let _ = server.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
