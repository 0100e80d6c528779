//! Every path but the token endpoint's: the Bearer token check (RFC 6750), the test routes
//! (`/echo-body`, `/bytes/<n>`, `/status/<code>`, `/redirect`, `/slow/<ms>`, everything else a
//! JSON echo), scripted [`ApiReply`]s, Delivery Hub's `RateLimit-*` headers, and recording
//! each request once its body has been read. Which tokens are valid is decided in `state`.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{json, Value};
use tracing::debug;

use super::state::{token_hint, State, RATE_LIMIT};
use super::{
    full, header_str, json_response, raw_response, sleep_or_shutdown, ApiReply, ApiRequest,
    BoxError, ResBody, BODY_LIMIT,
};

/// `/bytes/<n>` sends slices of this one static buffer: no allocation per chunk.
const CHUNK_LEN: usize = 64 * 1024;
static CHUNK: [u8; CHUNK_LEN] = [b'x'; CHUNK_LEN];
const REDIRECT_TARGET: &str = "https://elsewhere.example/landing";

pub(super) async fn api(state: &Arc<State>, request: Request<Incoming>) -> Response<ResBody> {
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
