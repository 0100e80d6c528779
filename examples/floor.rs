//! The floor under tokengate's per-request cost: the same hyper server and hyper-util pooled
//! client, on the same one-thread runtime, with nothing of tokengate's between them (no
//! filter, no hop-by-hop strip, no token cell, no metrics, no logging). It forwards every
//! request on `--listen` to the plain-HTTP `--upstream` with a fixed `Authorization` header.
//!
//! `bench/NOTES.md` compares tokengate's CPU per request with this one's to tell how much of
//! the gap to nginx is tokengate's own code and how much is the HTTP stack under it:
//!
//! ```text
//! taskset -c 1 target/release/examples/floor --listen 127.0.0.1:18430 --upstream 127.0.0.1:18400
//! ```
//!
//! Not a product: no TLS, no errors beyond a bare 502, no shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::header::AUTHORIZATION;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};

type Body = BoxBody<Bytes, hyper::Error>;

fn arg(name: &str) -> Option<String> {
    let mut args = std::env::args().skip_while(|a| a != name);
    args.next();
    args.next()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let listen: SocketAddr = arg("--listen")
        .unwrap_or_else(|| "127.0.0.1:18430".into())
        .parse()?;
    let upstream = arg("--upstream").unwrap_or_else(|| "127.0.0.1:18400".into());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(listen, upstream))
}

async fn serve(listen: SocketAddr, upstream: String) -> Result<(), Box<dyn std::error::Error>> {
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let bearer = HeaderValue::from_static("Bearer floor-benchmark-token");
    let authority: http::uri::Authority = upstream.parse()?;
    let listener = tokengate::listen(listen)?;
    let server = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let (client, bearer, authority) = (client.clone(), bearer.clone(), authority.clone());
        let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let (client, bearer, authority) = (client.clone(), bearer.clone(), authority.clone());
            async move {
                let mut parts = req.uri().clone().into_parts();
                parts.scheme = Some(http::uri::Scheme::HTTP);
                parts.authority = Some(authority);
                *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
                req.headers_mut().insert(AUTHORIZATION, bearer);
                let res: Response<Body> = match client.request(req).await {
                    Ok(res) => res.map(BodyExt::boxed),
                    Err(_) => {
                        let mut res = Response::new(Empty::new().map_err(|e| match e {}).boxed());
                        *res.status_mut() = StatusCode::BAD_GATEWAY;
                        res
                    }
                };
                Ok::<_, Infallible>(res)
            }
        });
        let conn = server
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(conn);
    }
}
