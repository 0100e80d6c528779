//! Tokens and the per-integration [`TokenHandle`]: the lock-free cell every request reads, and
//! the small cold-path state shared between the proxy and the refresher (status, waiting for a
//! fetch, forced refresh requests). No I/O happens here.
//!
//! Layout: [`client`] performs one client-credentials exchange; `refresher` owns the
//! background task that decides when to call it (planning with `schedule`, naming revocation
//! thrash with `thrash`), and in fleet mode drives `fleet`, through which replicas of one app
//! share one token on Redis.

pub mod client;
pub(crate) mod fleet;
pub(crate) mod refresher;
pub(crate) mod schedule;
mod thrash;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// One access token, with its `Authorization` value built once when it arrives so the hot path
/// formats nothing.
pub struct Token {
    header: HeaderValue,
    /// Increases with every *different* token; a 401 names the generation it was sent with.
    pub generation: u64,
    pub obtained_at: Instant,
    pub expires_at: Instant,
    pub lifetime: Duration,
    /// Wall-clock expiry, for metrics and `/status` only (decisions use `expires_at`).
    pub expires_at_wall: SystemTime,
}

impl Token {
    /// Builds the token; `None` when `access_token` cannot be an HTTP header value.
    pub fn new(access_token: &str, generation: u64, lifetime: Duration) -> Option<Token> {
        let mut header = HeaderValue::try_from(format!("Bearer {access_token}")).ok()?;
        // Keeps the value out of HPACK tables and out of hyper's Debug output.
        header.set_sensitive(true);
        let now = Instant::now();
        Some(Token {
            header,
            generation,
            obtained_at: now,
            expires_at: now + lifetime,
            lifetime,
            expires_at_wall: SystemTime::now() + lifetime,
        })
    }

    /// A peer's token, fetched `lifetime - remaining` ago: its age counts from then, so a
    /// 401 for it is judged early or not as for a token fetched here.
    pub fn adopted(
        access_token: &str,
        generation: u64,
        lifetime: Duration,
        remaining: Duration,
    ) -> Option<Token> {
        let mut token = Token::new(access_token, generation, remaining)?;
        let age = lifetime.saturating_sub(remaining);
        token.obtained_at = token
            .obtained_at
            .checked_sub(age)
            .unwrap_or(token.obtained_at);
        token.lifetime = lifetime.max(remaining);
        Some(token)
    }

    /// The token itself, for sealing it into a fleet entry (never for logs).
    pub(crate) fn access_token(&self) -> &str {
        // Invariant: built from "Bearer " + a &str, so the rest is valid UTF-8.
        std::str::from_utf8(self.header.as_bytes().get(7..).unwrap_or_default()).unwrap_or_default()
    }

    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    pub fn is_valid_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }

    /// Whether `access_token` is the token this one carries (a server that reuses unexpired
    /// tokens hands the same one back with a shorter `expires_in`).
    pub fn carries(&self, access_token: &str) -> bool {
        self.header.as_bytes().get(7..) == Some(access_token.as_bytes())
    }

    /// Same token, new lifetime counted from now.
    pub fn renewed(&self, lifetime: Duration) -> Token {
        let now = Instant::now();
        Token {
            header: self.header.clone(),
            generation: self.generation,
            obtained_at: now,
            expires_at: now + lifetime,
            lifetime,
            expires_at_wall: SystemTime::now() + lifetime,
        }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .field("lifetime", &self.lifetime)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// What the refresher reports for `/status`, `/readyz` and the 503 message. Only the cold path
/// touches it, so a std mutex is enough: it is never held across an await.
#[derive(Clone, Debug, Default)]
pub(crate) struct Status {
    pub fetching: bool,
    pub next_attempt: Option<Instant>,
    pub last_refresh: Option<SystemTime>,
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    pub consecutive_failures: u32,
    /// Set while tokens keep being revoked soon after issue (revocation thrash).
    pub warning: Option<String>,
    /// Fleet mode: what `/status` shows of this integration's part in the fleet.
    pub fleet: Option<FleetStatus>,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct FleetStatus {
    pub id: String,
    pub redis_up: bool,
    /// The fleet generation of the token held.
    pub generation: u64,
    /// The process that fetched the token held (`host/pid/random`).
    pub last_fetch_by: Option<String>,
}

/// Why a forced refresh after a 401 did or did not produce a token to replay with.
#[derive(Debug)]
pub(crate) enum ForceOutcome {
    /// A different token than the one that was refused; replay with it.
    Replaced(Arc<Token>),
    /// No new token: the fetch failed, the rate limit on forced refreshes applies, or the
    /// endpoint handed back the refused token.
    NotRefreshed(String),
}

pub(crate) struct ForceRequest {
    pub generation: u64,
    /// The refused token was younger than half its lifetime: the thrash signal.
    pub early: bool,
    /// The requester stops waiting then; a fetch that cannot start before it is no help.
    pub deadline: Instant,
    /// Closed when nobody waits (a request whose body was not kept): the refusal still makes
    /// the refresher fetch a new token for the requests that follow.
    pub reply: oneshot::Sender<ForceOutcome>,
}

/// The shared per-integration token state. The proxy reads [`TokenHandle::current`] on every
/// request (an arc-swap load: no lock); everything else here is for rare events.
pub(crate) struct TokenHandle {
    current: ArcSwapOption<Token>,
    status: Mutex<Status>,
    /// Bumped after every completed fetch attempt, successful or not, so waiters wake.
    attempts: watch::Sender<u64>,
    force: mpsc::Sender<ForceRequest>,
}

impl fmt::Debug for TokenHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenHandle")
            .field("current", &self.current.load())
            .finish_non_exhaustive()
    }
}

/// Why a request could not get a token.
#[derive(Debug)]
pub(crate) struct Unavailable {
    pub retry_after: Duration,
    pub reason: String,
}

impl TokenHandle {
    pub(crate) fn new() -> (Arc<TokenHandle>, mpsc::Receiver<ForceRequest>) {
        // Forced refreshes are single-flight in the refresher; the queue only has to hold the
        // 401s that arrive while one is decided.
        let (force, force_rx) = mpsc::channel(1024);
        let (attempts, _) = watch::channel(0);
        let handle = TokenHandle {
            current: ArcSwapOption::empty(),
            // The refresher's first fetch starts as soon as its task runs; a request that
            // arrives before that must wait for it, not get a 503.
            status: Mutex::new(Status {
                fetching: true,
                ..Status::default()
            }),
            attempts,
            force,
        };
        (Arc::new(handle), force_rx)
    }

    /// The token to use now, if one is valid.
    pub fn current(&self) -> Option<Arc<Token>> {
        self.current_at(Instant::now())
    }

    /// The token to use at `now`, if one is valid: the hot path, given the clock reading the
    /// proxy already took when the request arrived (one arc-swap load, no lock).
    pub fn current_at(&self, now: Instant) -> Option<Arc<Token>> {
        let token = self.current.load_full()?;
        token.is_valid_at(now).then_some(token)
    }

    /// The token held, valid or not (for status and metrics).
    pub fn held(&self) -> Option<Arc<Token>> {
        self.current.load_full()
    }

    pub(crate) fn store(&self, token: Token) {
        self.current.store(Some(Arc::new(token)));
    }

    pub fn status(&self) -> Status {
        self.lock_status().clone()
    }

    pub(crate) fn lock_status(&self) -> MutexGuard<'_, Status> {
        // A poisoned lock only means a panic elsewhere mid-update of plain data; the data is
        // still the best we have.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn attempt_finished(&self) {
        self.attempts.send_modify(|n| *n += 1);
    }

    /// Waits for a valid token when none is held: while a fetch is in flight or one is due
    /// within `wait`, and at most `wait`. Otherwise says when the next attempt is due.
    pub async fn wait_for_token(&self, wait: Duration) -> Result<Arc<Token>, Unavailable> {
        if let Some(token) = self.current() {
            return Ok(token);
        }
        let mut attempts = self.attempts.subscribe();
        let seen = *attempts.borrow_and_update();
        // A fetch in flight, or one due within the wait (the token expired while the process
        // was stopped or starved, and the refresher is about to run): worth waiting for.
        let soon = {
            let status = self.lock_status();
            status.fetching
                || status
                    .next_attempt
                    .is_some_and(|at| at <= Instant::now() + wait)
        };
        if soon {
            let _ = tokio::time::timeout(wait, attempts.wait_for(|n| *n != seen)).await;
            if let Some(token) = self.current() {
                return Ok(token);
            }
        }
        let status = self.lock_status();
        // A fetch may have finished since the first look.
        if let Some(token) = self.current() {
            return Ok(token);
        }
        let retry_after = status
            .next_attempt
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(1));
        let reason = match (&status.last_error, status.fetching) {
            (Some(e), _) => format!("the last token request failed: {e}"),
            (None, true) => "the first token request is still in flight".to_string(),
            (None, false) => "no token has been obtained yet".to_string(),
        };
        Err(Unavailable {
            retry_after,
            reason,
        })
    }

    /// Asks for a token newer than the one of `generation`, which the upstream refused
    /// (401), and waits for it until `deadline`. The refresher fetches one at once, or, within
    /// 5 s of its last forced fetch, when that floor ends, one fetch for every 401 in between;
    /// a token already replaced is answered without a fetch.
    pub async fn force_refresh(
        &self,
        generation: u64,
        early: bool,
        deadline: Instant,
    ) -> ForceOutcome {
        if let Some(token) = self.current() {
            if token.generation > generation {
                return ForceOutcome::Replaced(token);
            }
        }
        let (reply, rx) = oneshot::channel();
        let request = ForceRequest {
            generation,
            early,
            deadline,
            reply,
        };
        if self.force.send(request).await.is_err() {
            return ForceOutcome::NotRefreshed("tokengate is shutting down".into());
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => ForceOutcome::NotRefreshed("tokengate is shutting down".into()),
            Err(_) => ForceOutcome::NotRefreshed(
                "no new token before this request's request_timeout".into(),
            ),
        }
    }

    /// Reports that the upstream refused the token of `generation` without waiting for a
    /// new one (the request cannot be replayed): the requests that follow get a new token.
    pub fn refused(&self, generation: u64, early: bool) {
        let (reply, _) = oneshot::channel();
        // A full queue already holds refusals that will cause the same fetch.
        let _ = self.force.try_send(ForceRequest {
            generation,
            early,
            deadline: Instant::now(),
            reply,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_sensitive_and_debug_hides_the_token() {
        let token = Token::new("canary-token-123", 1, Duration::from_secs(60)).unwrap();
        assert!(token.header().is_sensitive());
        assert_eq!(token.header(), "Bearer canary-token-123");
        assert!(token.carries("canary-token-123"));
        assert!(!token.carries("canary-token-12"));
        let shown = format!("{token:?} {:?}", token.header());
        assert!(!shown.contains("canary"), "{shown}");
    }

    #[test]
    fn a_token_that_cannot_be_a_header_is_refused() {
        assert!(Token::new("bad\r\nInjected: yes", 1, Duration::from_secs(60)).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_a_fetch_due_within_its_wait() {
        let (handle, _rx) = TokenHandle::new();
        handle.store(Token::new("old", 1, Duration::from_secs(2)).unwrap());
        tokio::time::advance(Duration::from_secs(3)).await;
        {
            let mut status = handle.lock_status();
            status.fetching = false;
            status.next_attempt = Some(Instant::now());
        }
        let refresher = handle.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            refresher.store(Token::new("new", 2, Duration::from_secs(60)).unwrap());
            refresher.attempt_finished();
        });
        let token = handle.wait_for_token(Duration::from_secs(5)).await.unwrap();
        assert_eq!(token.generation, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_is_not_current_and_no_fetch_means_no_wait() {
        let (handle, _rx) = TokenHandle::new();
        handle.store(Token::new("t", 1, Duration::from_secs(2)).unwrap());
        assert!(handle.current().is_some());
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(handle.current().is_none());
        {
            let mut status = handle.lock_status();
            status.fetching = false;
            status.next_attempt = Some(Instant::now() + Duration::from_secs(7));
        }
        let err = handle
            .wait_for_token(Duration::from_secs(5))
            .await
            .unwrap_err();
        assert_eq!(err.retry_after, Duration::from_secs(7));
    }
}
