//! The errors tokengate answers itself, and the one mapping from an error to a status code,
//! the contract's JSON body and the `x-tokengate-error` header.
//!
//! Like pingora's errors, each one records who is to blame — the client (downstream), the
//! upstream, or tokengate's own token supply — because that decides the status code, the log
//! level and which metric counts it. Messages are written for the integration engineer who
//! reads them in a client log: what happened and what to do. They never carry a secret or a
//! token; the upstream's host and the failure reason are fine.

use std::error::Error as StdError;

use http::{header, HeaderValue, Response, StatusCode};

/// The `error` codes of the contract's table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    TokenUnavailable,
    UpstreamUnreachable,
    UpstreamTimeout,
    HostNotAllowed,
    MethodNotAllowed,
    ConnectNotSupported,
    BadRequest,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::TokenUnavailable => "token_unavailable",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::HostNotAllowed => "host_not_allowed",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::ConnectNotSupported => "connect_not_supported",
            ErrorCode::BadRequest => "bad_request",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::TokenUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ErrorCode::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorCode::HostNotAllowed => StatusCode::FORBIDDEN,
            ErrorCode::MethodNotAllowed | ErrorCode::ConnectNotSupported => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        }
    }

    /// Who caused it: decides the log level (a client's mistake is not an operator's alarm).
    pub fn blame(self) -> Blame {
        match self {
            ErrorCode::TokenUnavailable => Blame::TokenSupply,
            ErrorCode::UpstreamUnreachable | ErrorCode::UpstreamTimeout => Blame::Upstream,
            ErrorCode::HostNotAllowed
            | ErrorCode::MethodNotAllowed
            | ErrorCode::ConnectNotSupported
            | ErrorCode::BadRequest => Blame::Client,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blame {
    Client,
    Upstream,
    TokenSupply,
}

/// The `kind` label of `tokengate_upstream_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    Connect,
    Tls,
    Timeout,
    Reset,
    Proxy,
    Other,
}

impl UpstreamErrorKind {
    pub const ALL: [UpstreamErrorKind; 6] = [
        UpstreamErrorKind::Connect,
        UpstreamErrorKind::Tls,
        UpstreamErrorKind::Timeout,
        UpstreamErrorKind::Reset,
        UpstreamErrorKind::Proxy,
        UpstreamErrorKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Tls => "tls",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Proxy => "proxy",
            UpstreamErrorKind::Other => "other",
        }
    }
}

/// An error tokengate answers itself instead of forwarding.
#[derive(Debug)]
pub struct ProxyError {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds, for 503 `token_unavailable`.
    pub retry_after: Option<u64>,
    /// Set for upstream failures; the metric label.
    pub upstream_kind: Option<UpstreamErrorKind>,
    /// `Allow` header value for 405.
    pub allow: Option<HeaderValue>,
}

impl ProxyError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProxyError {
            code,
            message: message.into(),
            retry_after: None,
            upstream_kind: None,
            allow: None,
        }
    }

    /// The contract's JSON body, `x-tokengate-error`, and `Retry-After`/`Allow` where they apply.
    pub fn to_response<B: From<bytes::Bytes>>(&self, integration: &str) -> Response<B> {
        let body = serde_json::json!({
            "error": self.code.as_str(),
            "message": self.message,
            "integration": integration,
        });
        let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
        bytes.push(b'\n');
        let mut res = Response::new(B::from(bytes::Bytes::from(bytes)));
        *res.status_mut() = self.code.status();
        let headers = res.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(
            "x-tokengate-error",
            HeaderValue::from_static(self.code.as_str()),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        if let Some(allow) = &self.allow {
            headers.insert(header::ALLOW, allow.clone());
        }
        res
    }
}

/// The rustls error somewhere in `err`'s chain. `io::Error::source` skips the error it wraps
/// (it returns that error's own source), so wrapped errors are unwrapped by hand.
pub(crate) fn find_tls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(tls) = find_tls_error(inner) {
                return Some(tls);
            }
        }
        current = e.source();
    }
    None
}

/// The first error of type `E` in `err`'s chain, looking inside `io::Error`s as
/// [`find_tls_error`] does.
pub(crate) fn find_in_chain<'a, E: StdError + 'static>(
    err: &'a (dyn StdError + 'static),
) -> Option<&'a E> {
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<E>() {
            return Some(found);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(found) = find_in_chain::<E>(inner) {
                return Some(found);
            }
        }
        current = e.source();
    }
    None
}

/// `outer: inner: innermost`, skipping repeated texts: the pooled client's own `Display` is
/// only "client error (Connect)", the reason a person can act on is at the bottom.
pub fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = current {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_maps_to_the_contract_status() {
        let table = [
            (ErrorCode::TokenUnavailable, 503),
            (ErrorCode::UpstreamUnreachable, 502),
            (ErrorCode::UpstreamTimeout, 504),
            (ErrorCode::HostNotAllowed, 403),
            (ErrorCode::MethodNotAllowed, 405),
            (ErrorCode::ConnectNotSupported, 405),
            (ErrorCode::BadRequest, 400),
        ];
        for (code, status) in table {
            assert_eq!(code.status().as_u16(), status, "{code:?}");
        }
    }

    #[test]
    fn response_carries_json_header_and_retry_after() {
        let mut err = ProxyError::new(ErrorCode::TokenUnavailable, "no token");
        err.retry_after = Some(0);
        let res: Response<bytes::Bytes> = err.to_response("oms");
        assert_eq!(res.status(), 503);
        assert_eq!(res.headers()["x-tokengate-error"], "token_unavailable");
        assert_eq!(
            res.headers()["retry-after"],
            "1",
            "Retry-After is at least 1"
        );
        let v: serde_json::Value = serde_json::from_slice(res.body()).unwrap();
        assert_eq!(v["error"], "token_unavailable");
        assert_eq!(v["integration"], "oms");
        assert_eq!(v["message"], "no token");
    }
}
