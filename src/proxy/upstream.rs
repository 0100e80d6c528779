//! The upstream side of a proxied request: the integration's pooled client (HTTP/1.1 or
//! HTTP/2 by ALPN, direct or through the egress proxy's tunnel), rebuilt as one [`Route`] on
//! reload, and what a failed exchange means: its kind (the metric label) and the message the
//! client gets. It never adds a token; the request arrives ready to go.

use std::error::Error as StdError;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::ReqBody;
use super::hygiene::upstream_uri;
use super::tunnel::{Connector, TunnelError};
use super::MAX_BUF;
use crate::config::ProxySettings;
use crate::error::{
    chain, find_in_chain, find_tls_error, ErrorCode, ProxyError, UpstreamErrorKind,
};
use crate::tls::{self, Peer, TlsError};

pub(crate) type UpstreamClient = Client<HttpsConnector<Connector>, ReqBody>;

/// How long an idle pooled upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);

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

/// The live, reloadable part of an integration's proxy: settings and the client built for them.
pub(crate) struct Route {
    pub(crate) settings: ProxySettings,
    client: UpstreamClient,
    scheme: Scheme,
    authority: Authority,
    pub(crate) allow: Option<HeaderValue>,
}

impl Route {
    pub(crate) fn new(settings: ProxySettings) -> Result<Route, RouteError> {
        let client = build_client(&settings)?;
        let up = &settings.upstream;
        let scheme = if up.tls { Scheme::HTTPS } else { Scheme::HTTP };
        let authority =
            Authority::try_from(up.authority.as_str()).map_err(|e| RouteError::Authority {
                url: up.url.to_string(),
                authority: up.authority.clone(),
                reason: e.to_string(),
            })?;
        let allow = settings.allow_methods.as_ref().and_then(|methods| {
            let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
            HeaderValue::try_from(list.join(", ")).ok()
        });
        Ok(Route {
            settings,
            client,
            scheme,
            authority,
            allow,
        })
    }

    /// Sends a request, token and all, on the pooled client; no response head within
    /// `request_timeout` is an upstream timeout.
    pub(crate) async fn send(
        &self,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let timeout = self.settings.request_timeout;
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => {
                let kind = classify_upstream(&e);
                let up = &self.settings.upstream.url;
                let reason = match (kind, find_tls_error(&e)) {
                    // The cause and fix of a refused certificate; rustls's words close it.
                    (UpstreamErrorKind::Tls, Some(tls)) => {
                        tls::explain(tls, Peer::Upstream, self.settings.ca_file.as_deref())
                    }
                    (UpstreamErrorKind::Connect, _) => {
                        format!("{}; check upstream, DNS and the network path", chain(&e))
                    }
                    // The tunnel error already names the proxy, its answer and what to check.
                    _ => chain(&e),
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

    /// The upstream URI for a request target; see [`upstream_uri`].
    pub(crate) fn upstream_uri(&self, target: &Uri, check_host: bool) -> Result<Uri, ProxyError> {
        upstream_uri(
            target,
            check_host,
            &self.settings.upstream,
            &self.scheme,
            &self.authority,
        )
    }
}

fn build_client(settings: &ProxySettings) -> Result<UpstreamClient, TlsError> {
    // Direct, or a CONNECT tunnel through the egress proxy; TLS to the upstream runs on top
    // of either, so through a proxy it is end to end inside the tunnel.
    let connector = Connector::new(&settings.egress, settings.connect_timeout);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls::client_config(settings.ca_file.as_deref())?)
        // Plain http is only ever configured for loopback (config validation).
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new())
        .http1_max_buf_size(MAX_BUF)
        .pool_idle_timeout(POOL_IDLE)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(https))
}

/// Classifies a failed upstream exchange for the metric and the message. The pooled client
/// wraps the interesting error several layers deep, so the whole source chain is inspected.
pub(crate) fn classify_upstream(err: &(dyn StdError + 'static)) -> UpstreamErrorKind {
    // First: a proxy that refused or could not be reached also carries an io error.
    if find_in_chain::<TunnelError>(err).is_some() {
        return UpstreamErrorKind::Proxy;
    }
    if find_tls_error(err).is_some() {
        return UpstreamErrorKind::Tls;
    }
    let mut connect = false;
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(client) = e.downcast_ref::<hyper_util::client::legacy::Error>() {
            connect |= client.is_connect();
        }
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
