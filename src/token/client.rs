//! One OAuth 2.0 client-credentials exchange (RFC 6749 §4.4) as Delivery Hub and plain RFC
//! servers expect it: `token_auth` body | basic, `token_encoding` form | json | multipart.
//! No caching, no sleeping, no retrying: the refresher decides when and how often.
//!
//! Every way a token endpoint can answer badly (an `invalid_client` JSON, an HTML error page,
//! an empty 200, a body without `access_token`, an absurd `expires_in`, a body that never
//! ends) becomes a typed [`FetchError`] whose message tells the operator what to check. The
//! response body is read up to 64 KiB; a secret or token is never part of an error.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use serde_json::Value;

use crate::config::{proxy_name, Egress, Secret, TokenAuth, TokenEncoding, TokenSettings};
use crate::tls::{self, TlsError};

/// Token responses are small JSON objects; anything bigger is not one.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// More than a day is treated as a mistake on the server's side and capped (with a warning),
/// so a revoked-but-not-reported token cannot linger for months.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// A `Retry-After` longer than a day is a mistake on the server's side too; the cap also keeps
/// `now + retry_after` from overflowing (`Retry-After: 18446744073709551615` would otherwise
/// panic the refresher and leave the integration without a token until a restart).
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

pub(crate) const USER_AGENT: &str = concat!("tokengate/", env!("CARGO_PKG_VERSION"));

/// A successful exchange.
#[derive(Debug)]
pub struct Issued {
    pub access_token: Secret,
    /// `expires_in` as returned (capped at [`MAX_LIFETIME`]); `None` when absent.
    pub expires_in: Option<Duration>,
    /// `expires_in` was larger than [`MAX_LIFETIME`].
    pub capped: bool,
    /// `created_at` minus our wall clock at receipt, in seconds (Doorkeeper's field).
    pub clock_skew: Option<i64>,
    pub status: StatusCode,
}

/// The `kind` label of `tokengate_token_fetch_errors_total`.
pub const FETCH_ERROR_KINDS: [&str; 8] = [
    "invalid_client",
    "rejected",
    "rate_limited",
    "server_error",
    "timeout",
    "connect",
    "tls",
    "bad_response",
];

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("token endpoint refused the client credentials (HTTP {status}{}); check client_id and client_secret — regenerating the Client Secret Key in Delivery Hub disables the old key", describe(.error, .description))]
    InvalidClient {
        status: u16,
        error: Option<String>,
        description: Option<String>,
    },
    #[error("token endpoint rejected the request (HTTP {status}{}){}", describe(.error, .description), hint(*.status))]
    Rejected {
        status: u16,
        error: Option<String>,
        description: Option<String>,
    },
    #[error("token endpoint is rate limiting (HTTP 429){}", retry_hint(.retry_after))]
    RateLimited { retry_after: Option<Duration> },
    #[error("token endpoint failed (HTTP {status}{}){}", describe(.error, .description), retry_hint(.retry_after))]
    ServerError {
        status: u16,
        error: Option<String>,
        description: Option<String>,
        retry_after: Option<Duration>,
    },
    #[error("token endpoint did not answer within token_timeout ({})", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("cannot connect to the token endpoint: {0}")]
    Connect(String),
    /// The egress proxy refused the tunnel or could not be reached. Counted as `connect` in
    /// `tokengate_token_fetch_errors_total`, whose contract has no `proxy` kind.
    #[error("cannot reach the token endpoint: {0}")]
    Proxy(String),
    /// The cause and the fix, from [`tls::explain`].
    #[error("TLS failure talking to the token endpoint: {0}")]
    Tls(String),
    #[error("token endpoint sent an unusable response (HTTP {status}): {reason}")]
    BadResponse { status: u16, reason: String },
}

fn describe(error: &Option<String>, description: &Option<String>) -> String {
    match (error, description) {
        (Some(e), Some(d)) => format!(" {e}: {d}"),
        (Some(e), None) => format!(" {e}"),
        (None, Some(d)) => format!(": {d}"),
        (None, None) => String::new(),
    }
}

fn hint(status: u16) -> &'static str {
    match status {
        404 => "; the token_url path does not exist there: check region or token_url",
        400 => "; check scope, ttl, extra_params and token_encoding",
        403 => "; the client is not allowed to use the client_credentials grant",
        _ => "",
    }
}

fn retry_hint(retry_after: &Option<Duration>) -> String {
    match retry_after {
        Some(d) => format!("; retrying after {}", humantime::format_duration(*d)),
        None => String::new(),
    }
}

impl FetchError {
    pub fn kind(&self) -> &'static str {
        match self {
            FetchError::InvalidClient { .. } => "invalid_client",
            FetchError::Rejected { .. } => "rejected",
            FetchError::RateLimited { .. } => "rate_limited",
            FetchError::ServerError { .. } => "server_error",
            FetchError::Timeout(_) => "timeout",
            FetchError::Connect(_) | FetchError::Proxy(_) => "connect",
            FetchError::Tls(_) => "tls",
            FetchError::BadResponse { .. } => "bad_response",
        }
    }

    /// A server's own `Retry-After` on 429/503, which the backoff honours.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::RateLimited { retry_after } => *retry_after,
            FetchError::ServerError { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// Why a token client cannot be built; the refresher retries on its backoff.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// reqwest refused the egress proxy URL; config validation accepted it, so this is a URL
    /// that `url` parses and reqwest does not. Named without its credentials.
    #[error("the egress proxy {proxy} cannot be used for the token endpoint: {reason}")]
    Proxy { proxy: String, reason: String },
    #[error("cannot set up the HTTP client for the token endpoint: {0}")]
    Build(String),
}

/// A reqwest client for one integration's token endpoint.
#[derive(Clone, Debug)]
pub struct TokenClient {
    http: reqwest::Client,
}

impl TokenClient {
    pub fn new(settings: &TokenSettings) -> Result<TokenClient, ClientError> {
        let tls = tls::client_config(settings.ca_file.as_deref())?;
        let builder = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .user_agent(USER_AGENT)
            // A token endpoint that redirects is misconfigured; following it could send the
            // client secret to another host.
            .redirect(reqwest::redirect::Policy::none());
        // The route was decided at load time by the same rule as the upstream's, so both
        // clients take the same path; reqwest's own reading of the environment is never used.
        let builder = match &settings.egress {
            Egress::Direct { .. } => builder.no_proxy(),
            Egress::Proxy { url, auth, .. } => {
                // An https token_url through an http proxy: reqwest tunnels with CONNECT and
                // sends the credentials on CONNECT only, TLS running inside the tunnel.
                let mut proxy =
                    reqwest::Proxy::all(url.as_str()).map_err(|e| ClientError::Proxy {
                        proxy: proxy_name(url),
                        reason: crate::error::chain(&e),
                    })?;
                if let Some(auth) = auth {
                    let (user, password) = auth
                        .value
                        .expose()
                        .split_once(':')
                        .unwrap_or((auth.value.expose(), ""));
                    proxy = proxy.basic_auth(user, password);
                }
                builder.proxy(proxy)
            }
        };
        let http = builder
            .build()
            .map_err(|e| ClientError::Build(crate::error::chain(&e)))?;
        Ok(TokenClient { http })
    }

    /// One exchange. The whole thing, connect to last byte, is bounded by `settings.timeout`.
    pub async fn fetch(&self, settings: &TokenSettings) -> Result<Issued, FetchError> {
        match tokio::time::timeout(settings.timeout, self.exchange(settings)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout(settings.timeout)),
        }
    }

    async fn exchange(&self, s: &TokenSettings) -> Result<Issued, FetchError> {
        let mut params: Vec<(&str, String)> = vec![("grant_type", "client_credentials".into())];
        if s.auth == TokenAuth::Body {
            params.push(("client_id", s.client_id.value.expose().to_string()));
            params.push(("client_secret", s.client_secret.value.expose().to_string()));
        }
        if let Some(ttl) = s.ttl {
            params.push(("ttl", ttl.as_secs().to_string()));
        }
        if let Some(scope) = &s.scope {
            params.push(("scope", scope.clone()));
        }
        for (k, v) in &s.extra_params {
            params.push((k.as_str(), v.clone()));
        }

        let mut req = self
            .http
            .post(s.token_url.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .timeout(s.timeout);
        if s.auth == TokenAuth::Basic {
            // RFC 6749 §2.3.1: both parts are form-urlencoded before the Basic encoding.
            req = req.basic_auth(
                form_encode(s.client_id.value.expose()),
                Some(form_encode(s.client_secret.value.expose())),
            );
        }
        req = match s.encoding {
            TokenEncoding::Form => req.form(&params),
            TokenEncoding::Json => {
                let mut body = serde_json::Map::new();
                for (k, v) in &params {
                    // Bringg's API reference sends ttl as a number.
                    let value = match (*k, v.parse::<u64>()) {
                        ("ttl", Ok(n)) => Value::from(n),
                        _ => Value::from(v.as_str()),
                    };
                    body.insert((*k).to_string(), value);
                }
                req.json(&body)
            }
            TokenEncoding::Multipart => {
                let mut form = reqwest::multipart::Form::new();
                for (k, v) in params {
                    form = form.text(k.to_string(), v);
                }
                req.multipart(form)
            }
        };

        let mut res = match req.send().await {
            Ok(res) => res,
            Err(e) => return Err(send_error(e, s).await),
        };
        let status = res.status();
        let retry_after = res
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|secs| Duration::from_secs(secs).min(MAX_RETRY_AFTER));
        let content_type = res
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();

        let mut body = Vec::new();
        while let Some(chunk) = res.chunk().await.map_err(|e| body_error(e, status, s))? {
            if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(FetchError::BadResponse {
                    status: status.as_u16(),
                    reason: format!(
                        "response body larger than {} KiB; this is not a token endpoint",
                        MAX_RESPONSE_BYTES / 1024
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }

        parse_response(status, &content_type, &body, retry_after)
    }
}

/// Judges one complete token response (RFC 6749 §5.1, §5.2): a success status must carry a
/// usable Bearer token, any other status becomes the matching [`FetchError`]. No I/O, so the
/// property tests and the fuzz target can drive it directly; [`TokenClient::fetch`] calls it
/// with at most [`MAX_RESPONSE_BYTES`] of body.
pub fn parse_response(
    status: StatusCode,
    content_type: &str,
    body: &[u8],
    retry_after: Option<Duration>,
) -> Result<Issued, FetchError> {
    if status.is_success() {
        parse_success(status, content_type, body)
    } else {
        Err(parse_failure(status, content_type, body, retry_after))
    }
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A request that got no response. Through a proxy, a connect failure is the proxy's (the
/// only TCP connection is to it), and reqwest reports it only as "proxy authorization
/// required" or "unsuccessful" (hyper-util's tunnel keeps no status line and its error type
/// is private). So the CONNECT is repeated once with [`crate::proxy::tunnel::probe`] to learn what
/// the proxy answers: the same message the upstream pool gives for the same failure.
async fn send_error(e: reqwest::Error, s: &TokenSettings) -> FetchError {
    let Egress::Proxy { url, .. } = &s.egress else {
        return transport_error(e, s);
    };
    if e.is_timeout() || !e.is_connect() || crate::error::find_tls_error(&e).is_some() {
        return transport_error(e, s);
    }
    match crate::proxy::tunnel::probe(&s.egress, &s.token_url, s.timeout).await {
        Some(tunnel) => FetchError::Proxy(tunnel.to_string()),
        // The tunnel works now, so the failure was passing: report what reqwest saw.
        None => FetchError::Proxy(format!(
            "through egress proxy {}: {}",
            proxy_name(url),
            crate::error::chain(&e)
        )),
    }
}

fn transport_error(e: reqwest::Error, s: &TokenSettings) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout(s.timeout);
    }
    if let Some(err) = crate::error::find_tls_error(&e) {
        return FetchError::Tls(tls::explain(
            err,
            tls::Peer::TokenEndpoint,
            s.ca_file.as_deref(),
        ));
    }
    // reqwest's Display names the URL (no secrets in it) and its sources carry the reason.
    let reason = crate::error::chain(&e);
    if e.is_body() || e.is_decode() {
        FetchError::BadResponse {
            status: e.status().map(|s| s.as_u16()).unwrap_or(0),
            reason: format!("reading the response failed: {reason}"),
        }
    } else {
        FetchError::Connect(reason)
    }
}

/// The body broke off after the status line arrived: a bad response with that status, not
/// `transport_error`'s "HTTP 0" (reqwest's body errors carry no status).
fn body_error(e: reqwest::Error, status: StatusCode, s: &TokenSettings) -> FetchError {
    if e.is_timeout() {
        return FetchError::Timeout(s.timeout);
    }
    FetchError::BadResponse {
        status: status.as_u16(),
        reason: format!("the response body broke off: {}", crate::error::chain(&e)),
    }
}

/// What a non-JSON body looks like, without quoting it (a body could echo what we sent).
fn shape(content_type: &str, body: &[u8]) -> String {
    if body.iter().all(u8::is_ascii_whitespace) {
        return "an empty body".to_string();
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(2048)]).to_ascii_lowercase();
    if text.trim_start().starts_with('<') {
        let title = text
            .split_once("<title>")
            .and_then(|(_, rest)| rest.split_once("</title>"))
            .map(|(t, _)| printable(t.trim(), 80));
        return match title {
            Some(t) if !t.is_empty() => format!("an HTML page titled \"{t}\""),
            _ => "an HTML page".to_string(),
        };
    }
    let ct = if content_type.is_empty() {
        "no content-type".to_string()
    } else {
        printable(content_type, 80)
    };
    format!("{} bytes of non-JSON ({ct})", body.len())
}

/// At most `max` characters of a server's text, without control characters: it goes into
/// log lines and `/status`, so a hostile endpoint must not be able to forge or bloat them.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// `error`/`error_description` are the server's own words about our request; they are shown
/// to operators, so they are cut short and stripped of control characters.
fn field(obj: &serde_json::Map<String, Value>, name: &str) -> Option<String> {
    let s = obj.get(name)?.as_str()?;
    Some(
        s.chars()
            .filter(|c| !c.is_control())
            .take(200)
            .collect::<String>(),
    )
}

fn parse_failure(
    status: StatusCode,
    content_type: &str,
    body: &[u8],
    retry_after: Option<Duration>,
) -> FetchError {
    let json = serde_json::from_slice::<Value>(body).ok();
    let obj = json.as_ref().and_then(Value::as_object);
    let error = obj.and_then(|o| field(o, "error"));
    let mut description = obj.and_then(|o| field(o, "error_description"));
    if obj.is_none() {
        description = Some(shape(content_type, body));
    }
    let code = status.as_u16();
    if status == StatusCode::UNAUTHORIZED || error.as_deref() == Some("invalid_client") {
        return FetchError::InvalidClient {
            status: code,
            error,
            description,
        };
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        return FetchError::RateLimited { retry_after };
    }
    if status.is_server_error() {
        return FetchError::ServerError {
            status: code,
            error,
            description,
            retry_after,
        };
    }
    FetchError::Rejected {
        status: code,
        error,
        description,
    }
}

fn parse_success(
    status: StatusCode,
    content_type: &str,
    body: &[u8],
) -> Result<Issued, FetchError> {
    let bad = |reason: String| FetchError::BadResponse {
        status: status.as_u16(),
        reason,
    };
    let json: Value = serde_json::from_slice(body).map_err(|_| {
        bad(format!(
            "expected a JSON object, got {}",
            shape(content_type, body)
        ))
    })?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad("expected a JSON object".to_string()))?;

    let access_token = match obj.get("access_token") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(bad("access_token is empty".into())),
        Some(_) => return Err(bad("access_token is not a string".into())),
        None => {
            let hint = if obj.contains_key("error") {
                format!(
                    " (it says error: {})",
                    field(obj, "error").unwrap_or_default()
                )
            } else {
                String::new()
            };
            return Err(bad(format!("no access_token in the response{hint}")));
        }
    };
    if access_token.bytes().any(|b| !(0x21..=0x7e).contains(&b)) {
        return Err(bad(
            "access_token holds characters that cannot go into an HTTP header".into(),
        ));
    }

    match obj.get("token_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => {}
        Some(Value::String(t)) => {
            let t: String = t.chars().filter(|c| !c.is_control()).take(40).collect();
            return Err(bad(format!(
                "token_type is \"{t}\"; tokengate can only send Bearer tokens"
            )));
        }
        Some(_) => return Err(bad("token_type is not a string".into())),
    }

    let seconds = match obj.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(n.as_f64().unwrap_or(f64::NAN)),
        Some(Value::String(s)) => Some(s.trim().parse::<f64>().map_err(|_| {
            bad(format!(
                "expires_in \"{}\" is not a number",
                printable(s, 20)
            ))
        })?),
        Some(_) => return Err(bad("expires_in is not a number".into())),
    };
    let (expires_in, capped) = match seconds {
        None => (None, false),
        Some(s) if !s.is_finite() || s <= 0.0 => {
            return Err(bad(format!(
                "expires_in is {s}; a token must live for some time"
            )))
        }
        Some(s) if s > MAX_LIFETIME.as_secs_f64() => (Some(MAX_LIFETIME), true),
        Some(s) => (Some(Duration::from_secs_f64(s)), false),
    };

    let clock_skew = obj
        .get("created_at")
        .and_then(Value::as_i64)
        .map(|created| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            created - now
        });

    Ok(Issued {
        access_token: Secret::new(access_token),
        expires_in,
        capped,
        clock_skew,
        status,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str) -> Result<Issued, FetchError> {
        parse_success(StatusCode::OK, "application/json", body.as_bytes())
    }

    #[test]
    fn doorkeeper_shape_parses() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let issued = ok(&format!(
            r#"{{"access_token":"abc","token_type":"Bearer","expires_in":3600,"created_at":{now}}}"#
        ))
        .unwrap();
        assert_eq!(issued.access_token.expose(), "abc");
        assert_eq!(issued.expires_in, Some(Duration::from_secs(3600)));
        assert!(issued.clock_skew.unwrap().abs() <= 2);
    }

    #[test]
    fn rfc_shapes_parse() {
        let issued =
            ok(r#"{"access_token":"abc","token_type":"bearer","expires_in":"120"}"#).unwrap();
        assert_eq!(issued.expires_in, Some(Duration::from_secs(120)));
        let issued = ok(r#"{"access_token":"abc"}"#).unwrap();
        assert_eq!(issued.expires_in, None);
        let issued = ok(r#"{"access_token":"abc","expires_in":999999999}"#).unwrap();
        assert_eq!(issued.expires_in, Some(MAX_LIFETIME));
        assert!(issued.capped);
    }

    #[test]
    fn malformed_success_responses_are_bad_response() {
        for body in [
            "",
            "<html><title>Gateway</title></html>",
            "[]",
            r#"{"token_type":"Bearer"}"#,
            r#"{"access_token":""}"#,
            r#"{"access_token":5}"#,
            r#"{"access_token":"a","expires_in":0}"#,
            r#"{"access_token":"a","expires_in":-5}"#,
            r#"{"access_token":"a","expires_in":"soon"}"#,
            r#"{"access_token":"a","expires_in":true}"#,
            r#"{"access_token":"a","token_type":"mac"}"#,
            r#"{"access_token":"a b"}"#,
        ] {
            let err = ok(body).unwrap_err();
            assert_eq!(err.kind(), "bad_response", "{body}: {err}");
        }
    }

    #[test]
    fn bad_response_never_quotes_the_body() {
        let err = ok(r#"{"access_token":"canary-secret","token_type":"mac"}"#).unwrap_err();
        assert!(!err.to_string().contains("canary"));
        let err = parse_success(StatusCode::OK, "text/plain", b"canary-secret").unwrap_err();
        assert!(!err.to_string().contains("canary"), "{err}");
    }

    #[test]
    fn failures_are_typed() {
        let err = parse_failure(
            StatusCode::UNAUTHORIZED,
            "application/json",
            br#"{"error":"invalid_client","error_description":"Client authentication failed"}"#,
            None,
        );
        assert_eq!(err.kind(), "invalid_client");
        assert!(err.to_string().contains("Client authentication failed"));
        let err = parse_failure(
            StatusCode::NOT_FOUND,
            "text/html",
            b"<html>nope</html>",
            None,
        );
        assert_eq!(err.kind(), "rejected");
        assert!(err.to_string().contains("region"), "{err}");
        let err = parse_failure(
            StatusCode::TOO_MANY_REQUESTS,
            "",
            b"",
            Some(Duration::from_secs(7)),
        );
        assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));
        let err = parse_failure(StatusCode::BAD_GATEWAY, "text/html", b"<html/>", None);
        assert_eq!(err.kind(), "server_error");
    }
}
