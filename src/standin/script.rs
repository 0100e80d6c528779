//! What a test can script: [`TokenReply`] for the token endpoint and [`ApiReply`] for the
//! API, queued on the hub and taken one per request. Only the types and their builders: the
//! queues are in `state`, and `token` and `api` turn a reply into a response.

use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;

/// A scripted answer for the next request to [`TOKEN_PATH`](super::TOKEN_PATH). A scripted
/// reply answers that request whatever it contains (method, parameters, credentials are not
/// checked); the request is still recorded.
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
