//! What the hub keeps between requests: settings, issued tokens, the scripted-reply queues,
//! the recordings ([`TokenRequest`], [`ApiRequest`]), the request counters tests await, and
//! the rate-limit window, with the operations on them that must happen under one lock.
//! No HTTP and no I/O: `token` and `api` read and change it, the `Hub` handles expose it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderMap;
use http::Version;
use tokio::sync::watch;

use super::script::{ApiReply, TokenReply};

/// Recordings keep the last this many requests, so a long benchmark run stays bounded.
const RECORD_LIMIT: usize = 1000;
/// Delivery Hub's published per-merchant limit, reported in `RateLimit-Limit`.
pub(super) const RATE_LIMIT: u32 = 300;
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// One request to [`TOKEN_PATH`](super::TOKEN_PATH), as received.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    pub method: String,
    pub path: String,
    /// The query string, if any (parameters there are not read: RFC 6749 §4.4.2 puts them
    /// in the body).
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub content_type: Option<String>,
    /// The body (empty when it exceeded the 1 MiB limit).
    pub body: Bytes,
    /// The parameters from the body; empty when it could not be parsed.
    pub params: BTreeMap<String, String>,
    /// HTTP Basic credentials, base64- and form-decoded (RFC 6749 §2.3.1).
    pub basic: Option<(String, String)>,
    /// "form" | "json" | "multipart" | "none" (no Content-Type and no body) | "other".
    pub encoding: &'static str,
}

/// One API request (any path but [`TOKEN_PATH`](super::TOKEN_PATH)), as received.
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub version: Version,
    pub method: String,
    /// Path and query as received (origin-form, also for HTTP/2).
    pub uri: String,
    /// `:authority` for HTTP/2, else the `Host` header.
    pub authority: Option<String>,
    pub headers: HeaderMap,
    /// Bytes of body received.
    pub body_len: u64,
    /// The body, kept only when it is at most 1 MiB, else empty.
    pub body: Bytes,
    /// Whether the body ended normally (false: the client reset it, or the response was
    /// abandoned before the body was read to its end).
    pub body_complete: bool,
    /// The bearer token received, if the first `Authorization` header is `Bearer`.
    pub token: Option<String>,
}

/// Shared by the accept loop, every connection and every handle.
pub(super) struct State {
    pub(super) settings: Mutex<Settings>,
    pub(super) tokens: Mutex<Tokens>,
    pub(super) token_replies: Mutex<VecDeque<TokenReply>>,
    pub(super) api_replies: Mutex<VecDeque<ApiReply>>,
    pub(super) token_log: Mutex<VecDeque<TokenRequest>>,
    pub(super) api_log: Mutex<VecDeque<ApiRequest>>,
    /// Counters as watch channels so `wait_*_requests` await a change instead of polling.
    pub(super) token_count: watch::Sender<usize>,
    pub(super) api_count: watch::Sender<usize>,
    pub(super) rate: Mutex<RateWindow>,
    pub(super) shutdown: watch::Receiver<bool>,
    /// TCP connections accepted, for tests of how many connections a client opens.
    pub(super) connections: std::sync::atomic::AtomicUsize,
}

// Std mutexes throughout: every critical section is a few map or deque operations and
// none is held across an `.await`.

pub(super) struct Settings {
    pub(super) lifetime: Duration,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    /// Each new token revokes every earlier one: a server that allows one live token per
    /// app, which two tokengates sharing an app turn into revocation thrash.
    pub(super) revoke_on_issue: bool,
}

#[derive(Default)]
pub(super) struct Tokens {
    by_value: HashMap<String, IssuedToken>,
    pub(super) order: Vec<String>,
    /// Bumped by `revoke_all`; a token is valid only in the generation it was issued in,
    /// which makes revoking O(1).
    pub(super) generation: u64,
}

struct IssuedToken {
    /// None when the lifetime is too large to represent as an `Instant`: never expires.
    expires_at: Option<Instant>,
    generation: u64,
}

pub(super) struct RateWindow {
    pub(super) start: Instant,
    pub(super) used: u32,
}

/// Locks a mutex, ignoring poisoning: nothing panics while holding one of these locks, and
/// a test that panicked elsewhere should still be able to read the recordings.
pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl State {
    pub(super) fn record_token_request(&self, request: TokenRequest) {
        push_bounded(&mut lock(&self.token_log), request);
        // After the push, so a waiter woken by the count finds the request recorded.
        self.token_count.send_modify(|count| *count += 1);
    }

    pub(super) fn record_api_request(&self, request: ApiRequest) {
        push_bounded(&mut lock(&self.api_log), request);
        self.api_count.send_modify(|count| *count += 1);
    }

    pub(super) fn issue_token(&self, lifetime: Duration) -> String {
        let token = random_token();
        let revoke = lock(&self.settings).revoke_on_issue;
        let mut tokens = lock(&self.tokens);
        if revoke {
            tokens.generation += 1;
        }
        let entry = IssuedToken {
            expires_at: Instant::now().checked_add(lifetime),
            generation: tokens.generation,
        };
        tokens.by_value.insert(token.clone(), entry);
        tokens.order.push(token.clone());
        token
    }

    pub(super) fn token_is_valid(&self, token: &str) -> bool {
        let tokens = lock(&self.tokens);
        tokens.by_value.get(token).is_some_and(|issued| {
            issued.generation == tokens.generation
                && issued.expires_at.is_none_or(|at| Instant::now() < at)
        })
    }

    /// Takes the scripted reply for a token request that just arrived: leading delays are
    /// summed and taken with the reply after them, so the pair belongs to one request.
    pub(super) fn next_token_script(&self) -> (Duration, Option<TokenReply>) {
        let mut replies = lock(&self.token_replies);
        let mut delay = Duration::ZERO;
        while let Some(reply) = replies.pop_front() {
            match reply {
                TokenReply::Delay(d) => delay = delay.saturating_add(d),
                other => return (delay, Some(other)),
            }
        }
        (delay, None)
    }

    /// Takes the next scripted API reply if this request may have it: any request when the
    /// reply skips auth, else only one whose token is valid (decided atomically, so two
    /// concurrent requests cannot both see the same reply).
    pub(super) fn next_api_reply(&self, auth_ok: bool) -> Option<ApiReply> {
        let mut replies = lock(&self.api_replies);
        if replies.front().is_some_and(|r| r.skip_auth || auth_ok) {
            replies.pop_front()
        } else {
            None
        }
    }

    /// Counts this request in the current window: (remaining, seconds until the window
    /// resets).
    pub(super) fn rate_limit(&self) -> (u32, u64) {
        let now = Instant::now();
        let mut window = lock(&self.rate);
        if now.duration_since(window.start) >= RATE_WINDOW {
            window.start = now;
            window.used = 0;
        }
        window.used = window.used.saturating_add(1);
        let left = RATE_WINDOW.saturating_sub(now.duration_since(window.start));
        // Rounded up: "0 seconds to reset" would read as "already reset".
        let reset = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        (RATE_LIMIT.saturating_sub(window.used), reset.max(1))
    }
}

fn push_bounded<T>(log: &mut VecDeque<T>, item: T) {
    if log.len() >= RECORD_LIMIT {
        log.pop_front();
    }
    log.push_back(item);
}

/// 43 characters of the URL-safe base64 alphabet (≈258 bits), the length and shape of
/// Doorkeeper's tokens.
fn random_token() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    (0..43)
        .map(|_| char::from(ALPHABET[fastrand::usize(..ALPHABET.len())]))
        .collect()
}

/// The first characters of a token, enough to tell tokens apart in a debug log.
pub(super) fn token_hint(token: &str) -> String {
    let mut hint: String = token.chars().take(4).collect();
    hint.push('…');
    hint
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_tokens_have_doorkeepers_shape() {
        let token = random_token();
        assert_eq!(token.len(), 43);
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_ne!(token, random_token());
        assert_eq!(token_hint("abcdefgh"), "abcd…");
    }
}
