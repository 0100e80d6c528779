//! `POST /oauth/token`: the client-credentials grant as Delivery Hub (Doorkeeper) answers
//! it. Reads the parameters (form, JSON or multipart) and HTTP Basic credentials, records the
//! request, then answers a scripted [`TokenReply`] if one is queued, else checks the request
//! in Doorkeeper's order and issues a token or answers an OAuth error (RFC 6749 §5.2).
//! Storing, checking and revoking tokens is `state`'s job; byte-level decoding is `wire`'s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tracing::debug;

use super::state::{lock, token_hint, State};
use super::wire::{decode_base64, form_decode, media_type_param, parse_multipart};
use super::{
    header_str, json_response, raw_response, shutdown_signalled, sleep_or_shutdown, ResBody,
    TokenReply, TokenRequest, BODY_LIMIT,
};

/// Doorkeeper's exact text, so error reporting is tested against what Delivery Hub says.
const INVALID_CLIENT_DESCRIPTION: &str = "Client authentication failed due to unknown client, \
     no client authentication included, or unsupported authentication method.";
const UNSUPPORTED_GRANT_DESCRIPTION: &str =
    "The authorization grant type is not supported by the authorization server.";

/// Why a token request body could not be read.
enum BodyProblem {
    TooLarge,
    Failed,
}

pub(super) async fn token_endpoint(
    state: &Arc<State>,
    request: Request<Incoming>,
) -> Response<ResBody> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
