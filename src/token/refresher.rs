//! The background task that keeps one integration's token fresh: fetch at start, refresh once
//! `refresh_at` of the lifetime has passed (±5 % jitter), retry failures with exponential
//! backoff and full jitter (1 s doubling to 60 s, or the server's `Retry-After` if longer),
//! keep the current token in use until it expires, and serve forced refreshes after a 401
//! (single-flight, at most one per 5 s).
//!
//! Like linkerd's identity client: the old credential stays until a new one is in hand. The
//! task only decides *when*; [`super::client`] does the exchange and the proxy only reads the
//! [`TokenHandle`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn};

use super::client::{FetchError, Issued, TokenClient};
use super::{ForceOutcome, ForceRequest, Token, TokenHandle};
use crate::config::{SecretSource, TokenSettings};
use crate::shutdown::Shutdown;
use crate::telemetry::{IntegrationMetrics, Trigger};

/// Scheduled refreshes (and retries) are never closer together than this.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Cap of the exponential backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// At most one forced (401-triggered) refresh per this interval; a revoked key would otherwise
/// turn every request into a token request.
pub const FORCE_INTERVAL: Duration = Duration::from_secs(5);
/// Forced refreshes for tokens revoked soon after issue back off up to this.
pub const MAX_FORCE_INTERVAL: Duration = Duration::from_secs(300);
/// The thrash error is logged at most this often.
const THRASH_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Early revocations within one log interval that make it thrash rather than bad luck.
const THRASH_THRESHOLD: u32 = 3;

/// Counts early revocations (401s for tokens younger than half their lifetime) so that a
/// ping-pong between two holders of one app is named once a minute, not once per request.
struct Thrash {
    window_start: Instant,
    count: u32,
    last_log: Option<Instant>,
}

impl Thrash {
    /// Records one early revocation; returns how many there were in the current window when
    /// it is time to log.
    fn note(&mut self, now: Instant) -> Option<u32> {
        if now.duration_since(self.window_start) > THRASH_LOG_INTERVAL {
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        let due = self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= THRASH_LOG_INTERVAL);
        (self.count >= THRASH_THRESHOLD && due).then(|| {
            self.last_log = Some(now);
            self.count
        })
    }
}

/// How often `{ file = ... }` credentials are re-read. Polling the content (not inotify)
/// follows Kubernetes' atomic symlink swap of a mounted Secret without special cases, costs a
/// few microseconds per tick, and keeps a new secret no more than this late.
pub const SECRET_POLL: Duration = Duration::from_secs(2);

/// Re-reads the `{ file = ... }` credentials; returns settings with the new values when one
/// changed. A file that cannot be read right now (mid-swap) keeps the old value.
fn reread_file_secrets(settings: &TokenSettings) -> Option<(TokenSettings, Vec<&'static str>)> {
    let mut new = settings.clone();
    let mut changed = Vec::new();
    for (key, secret) in [
        ("client_id", &mut new.client_id),
        ("client_secret", &mut new.client_secret),
    ] {
        if !matches!(secret.source, SecretSource::File(_)) {
            continue;
        }
        match secret.source.resolve(key) {
            Ok(value) if value != secret.value => {
                secret.value = value;
                changed.push(key);
            }
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "secret file not readable right now; keeping the value held")
            }
        }
    }
    (!changed.is_empty()).then_some((new, changed))
}

/// When to refresh a token of `lifetime`: at `refresh_at` of it, moved by `jitter` ∈ [-1, 1]
/// times 5 % of the lifetime so that many sidecars started together spread out.
pub fn refresh_delay(lifetime: Duration, refresh_at: f64, jitter: f64) -> Duration {
    let fraction = (refresh_at + 0.05 * jitter.clamp(-1.0, 1.0)).clamp(0.01, 0.99);
    lifetime.mul_f64(fraction).max(MIN_INTERVAL)
}

/// Full-jitter exponential backoff after `failures` consecutive failures (≥ 1), given a
/// uniform `sample` ∈ [0, 1).
pub fn backoff(failures: u32, sample: f64) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    let cap = Duration::from_secs(1u64 << exp).min(MAX_BACKOFF);
    cap.mul_f64(sample.clamp(0.0, 1.0)).max(MIN_INTERVAL)
}

type Fetch = Pin<Box<dyn Future<Output = (Result<Issued, FetchError>, Duration)> + Send>>;

/// What needs changing when new settings arrive.
fn needs_new_token(old: &TokenSettings, new: &TokenSettings) -> bool {
    old.token_url != new.token_url
        || old.client_id.value != new.client_id.value
        || old.client_secret.value != new.client_secret.value
        || old.ttl != new.ttl
        || old.scope != new.scope
        || old.auth != new.auth
        || old.encoding != new.encoding
        || old.extra_params != new.extra_params
        || old.ca_file != new.ca_file
}

pub struct Refresher {
    name: Arc<str>,
    handle: Arc<TokenHandle>,
    settings: watch::Receiver<Arc<TokenSettings>>,
    force_rx: mpsc::Receiver<ForceRequest>,
    metrics: Arc<IntegrationMetrics>,
}

impl Refresher {
    pub(crate) fn new(
        name: Arc<str>,
        handle: Arc<TokenHandle>,
        settings: watch::Receiver<Arc<TokenSettings>>,
        force_rx: mpsc::Receiver<ForceRequest>,
        metrics: Arc<IntegrationMetrics>,
    ) -> Refresher {
        Refresher {
            name,
            handle,
            settings,
            force_rx,
            metrics,
        }
    }

    fn start_fetch(&self, client: &TokenClient, settings: &Arc<TokenSettings>) -> Fetch {
        self.handle.lock_status().fetching = true;
        let client = client.clone();
        let settings = settings.clone();
        Box::pin(async move {
            let started = Instant::now();
            let result = client.fetch(&settings).await;
            (result, started.elapsed())
        })
    }

    /// Runs until `shutdown`. Owned and spawned by `run`.
    pub async fn run(mut self, mut shutdown: Shutdown) {
        let name = self.name.clone();
        let mut settings = self.settings.borrow_and_update().clone();
        let mut client = match TokenClient::new(&settings) {
            Ok(c) => Some(c),
            Err(e) => {
                warn!(integration = %name, error = %e, "cannot build the token client");
                {
                    let mut status = self.handle.lock_status();
                    status.fetching = false;
                    status.last_error = Some(format!("cannot build the token client: {e}"));
                }
                // Requests waiting for the first fetch learn at once that there is none.
                self.handle.attempt_finished();
                None
            }
        };
        let mut trigger = Trigger::Startup;
        let mut next_at = Instant::now();
        let mut in_flight: Option<(Fetch, Trigger)> = None;
        // 401s sharing the forced fetch in flight.
        let mut waiters: Vec<ForceRequest> = Vec::new();
        // 401s that arrived during a scheduled fetch: it may have been answered before the
        // revocation that caused them, so they get a forced fetch of their own after it.
        let mut after_scheduled: Vec<ForceRequest> = Vec::new();
        let mut last_forced: Option<Instant> = None;
        // Doubles each time a forced refresh answers an early revocation, so two holders of
        // one app back off instead of revoking each other's tokens as fast as they can.
        let mut force_interval = FORCE_INTERVAL;
        let mut thrash = Thrash {
            window_start: Instant::now(),
            count: 0,
            last_log: None,
        };
        let mut failures: u32 = 0;
        let mut settings_open = true;
        let watches_files = |s: &TokenSettings| {
            matches!(s.client_id.source, SecretSource::File(_))
                || matches!(s.client_secret.source, SecretSource::File(_))
        };
        let mut secret_poll = tokio::time::interval(SECRET_POLL);
        secret_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            let expiry = self
                .handle
                .held()
                .filter(|t| t.is_valid_at(Instant::now()))
                .map(|t| t.expires_at);
            tokio::select! {
                _ = shutdown.wait() => {
                    debug!(integration = %name, "refresher stopping");
                    break;
                }
                (result, took) = poll_fetch(&mut in_flight) => {
                    let done_trigger = in_flight.take().map(|(_, t)| t).unwrap_or(trigger);
                    self.metrics.fetch_duration.observe(took.as_secs_f64());
                    match result {
                        Ok(issued) => {
                            failures = 0;
                            let lifetime = self.accept(issued, done_trigger, &settings);
                            next_at = Instant::now()
                                + refresh_delay(lifetime, settings.refresh_at, fastrand::f64() * 2.0 - 1.0);
                            trigger = Trigger::Scheduled;
                        }
                        Err(e) => {
                            failures += 1;
                            let delay = backoff(failures, fastrand::f64())
                                .max(e.retry_after().unwrap_or_default());
                            next_at = Instant::now() + delay;
                            self.fail(&e, done_trigger, delay, failures);
                            // A retry keeps the trigger of what it retries.
                            trigger = done_trigger;
                        }
                    }
                    {
                        let mut status = self.handle.lock_status();
                        status.fetching = false;
                        status.next_attempt = Some(next_at);
                    }
                    self.handle.attempt_finished();
                    for w in waiters.drain(..) {
                        let _ = w.reply.send(self.outcome(w.generation, "the new token request failed"));
                    }
                    if !after_scheduled.is_empty() {
                        let forced_recently = last_forced.is_some_and(|t| t.elapsed() < force_interval);
                        match &client {
                            Some(c) if !forced_recently => {
                                last_forced = Some(Instant::now());
                                info!(integration = %name, "upstream refused the token (401) during a scheduled refresh; refreshing again");
                                in_flight = Some((self.start_fetch(c, &settings), Trigger::Unauthorized));
                                waiters.append(&mut after_scheduled);
                            }
                            _ => {
                                for w in after_scheduled.drain(..) {
                                    let _ = w.reply.send(self.outcome(w.generation, "the new token request failed"));
                                }
                            }
                        }
                    }
                }
                _ = sleep_until(next_at), if in_flight.is_none() => {
                    match &client {
                        Some(c) => in_flight = Some((self.start_fetch(c, &settings), trigger)),
                        None => {
                            // No client (a bad ca_file); retrying rebuilds it.
                            client = TokenClient::new(&settings).ok();
                            next_at = Instant::now() + MAX_BACKOFF;
                            {
                                let mut status = self.handle.lock_status();
                                status.fetching = false;
                                status.next_attempt = Some(next_at);
                            }
                            self.handle.attempt_finished();
                        }
                    }
                }
                Some(req) = self.force_rx.recv() => {
                    if req.early {
                        if let Some(count) = thrash.note(Instant::now()) {
                            let message = format!(
                                "tokens keep being revoked soon after they are issued ({count} times within a minute): most likely several tokengate replicas or other systems share this Delivery Hub app and the server revokes the previous token on each new issue; give each replica its own app. Forced refreshes back off (now at most one per {})",
                                humantime::format_duration(force_interval)
                            );
                            error!(integration = %name, early_revocations = count, "{message}");
                            self.handle.lock_status().warning = Some(message);
                        }
                    } else if force_interval != FORCE_INTERVAL {
                        // A token that lived half its lifetime: whatever thrashed has stopped.
                        force_interval = FORCE_INTERVAL;
                        self.handle.lock_status().warning = None;
                    }
                    let current = self.handle.current();
                    if current.as_ref().is_some_and(|t| t.generation > req.generation) {
                        let _ = req.reply.send(self.outcome(req.generation, ""));
                    } else if let Some((_, in_flight_trigger)) = &in_flight {
                        if *in_flight_trigger == Trigger::Scheduled {
                            after_scheduled.push(req);
                        } else {
                            waiters.push(req);
                        }
                    } else if last_forced.is_some_and(|t| t.elapsed() < force_interval) {
                        let _ = req.reply.send(ForceOutcome::NotRefreshed(format!(
                            "a token was refreshed because of a 401 less than {} ago and the upstream refuses that one too",
                            humantime::format_duration(force_interval)
                        )));
                    } else if let Some(c) = &client {
                        last_forced = Some(Instant::now());
                        if req.early {
                            force_interval = (force_interval * 2).min(MAX_FORCE_INTERVAL);
                        }
                        info!(integration = %name, "upstream refused the token (401); refreshing now");
                        in_flight = Some((self.start_fetch(c, &settings), Trigger::Unauthorized));
                        waiters.push(req);
                    } else {
                        let _ = req.reply.send(ForceOutcome::NotRefreshed("no token client".into()));
                    }
                }
                changed = self.settings.changed(), if settings_open => {
                    if changed.is_err() {
                        settings_open = false;
                        continue;
                    }
                    let new = self.settings.borrow_and_update().clone();
                    let refetch = needs_new_token(&settings, &new);
                    // The client holds the TLS roots and the egress route (proxy and its
                    // credentials); a new egress_proxy_auth applies to the next tunnel.
                    let egress_changed = new.egress != settings.egress;
                    if new.ca_file != settings.ca_file || egress_changed || client.is_none() {
                        match TokenClient::new(&new) {
                            Ok(c) => client = Some(c),
                            Err(e) => warn!(integration = %name, error = %e, "cannot build the token client; keeping the previous one"),
                        }
                    }
                    settings = new;
                    // A new route needs no new token, but while fetches fail (a proxy that
                    // refused the old credentials) the next attempt should not wait out the
                    // backoff.
                    if egress_changed && !refetch && failures > 0 && in_flight.is_none() {
                        next_at = Instant::now();
                    }
                    if refetch {
                        info!(integration = %name, "token settings changed; fetching a new token");
                        // A fetch under the old settings would produce a token for the old
                        // credentials; start over with the new ones.
                        in_flight = None;
                        if let Some(c) = &client {
                            in_flight = Some((self.start_fetch(c, &settings), Trigger::CredentialsChanged));
                        }
                        failures = 0;
                    }
                }
                _ = secret_poll.tick(), if watches_files(&settings) => {
                    let current = settings.clone();
                    let reread = tokio::task::spawn_blocking(move || reread_file_secrets(&current))
                        .await
                        .ok()
                        .flatten();
                    if let Some((new, keys)) = reread {
                        info!(integration = %name, changed = ?keys, "secret file changed; fetching a new token with it (the current token stays in use until then)");
                        settings = Arc::new(new);
                        in_flight = client
                            .as_ref()
                            .map(|c| (self.start_fetch(c, &settings), Trigger::CredentialsChanged));
                        failures = 0;
                    }
                }
                _ = sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                    self.metrics.valid.set(0);
                    warn!(integration = %name, "token expired and no new one was obtained; requests get 503 token_unavailable until one is");
                }
            }
        }
        self.handle.lock_status().fetching = false;
        self.handle.attempt_finished();
    }

    fn outcome(&self, generation: u64, failed: &str) -> ForceOutcome {
        match self.handle.current() {
            Some(t) if t.generation > generation => ForceOutcome::Replaced(t),
            Some(_) => ForceOutcome::NotRefreshed(
                self.handle
                    .lock_status()
                    .last_error
                    .clone()
                    .unwrap_or_else(|| {
                        "the token endpoint handed back the token the upstream refused".into()
                    }),
            ),
            None => ForceOutcome::NotRefreshed(
                self.handle
                    .lock_status()
                    .last_error
                    .clone()
                    .unwrap_or_else(|| failed.to_string()),
            ),
        }
    }

    /// Installs a new token; returns the lifetime the next refresh is planned from.
    fn accept(&self, issued: Issued, trigger: Trigger, settings: &TokenSettings) -> Duration {
        let name = &self.name;
        // The cap keeps a configured assume_lifetime of centuries from overflowing Instant.
        let lifetime = issued
            .expires_in
            .unwrap_or(settings.assume_lifetime)
            .min(super::client::MAX_LIFETIME);
        if issued.capped {
            warn!(integration = %name, "token endpoint sent an expires_in over 24 h; treating it as 24 h");
        }
        if issued.expires_in.is_none() {
            debug!(integration = %name, assume_lifetime = ?settings.assume_lifetime, "no expires_in in the token response; assuming assume_lifetime");
        }
        if let Some(skew) = issued.clock_skew.filter(|s| s.abs() > 30) {
            warn!(integration = %name, skew_seconds = skew, "token endpoint's created_at differs from this host's clock; expiry is computed from the local clock, but check NTP");
        }
        let held = self.handle.held();
        let token = match held {
            Some(old) if old.carries(issued.access_token.expose()) => {
                debug!(integration = %name, "token endpoint handed back the token already held; using its new lifetime");
                old.renewed(lifetime)
            }
            other => {
                let generation = other.map(|t| t.generation + 1).unwrap_or(1);
                match Token::new(issued.access_token.expose(), generation, lifetime) {
                    Some(t) => t,
                    // client.rs refuses such tokens already; this keeps the invariant local.
                    None => return MIN_INTERVAL,
                }
            }
        };
        let expires_wall = token.expires_at_wall;
        self.handle.store(token);
        {
            let mut status = self.handle.lock_status();
            status.last_refresh = Some(SystemTime::now());
            status.last_error = None;
            status.last_error_at = None;
            status.consecutive_failures = 0;
        }
        self.metrics.refresh(trigger, true);
        self.metrics.valid.set(1);
        self.metrics.expiry.set(
            expires_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        info!(
            integration = %name,
            trigger = trigger.as_str(),
            lifetime_s = lifetime.as_secs(),
            expires_at = %humantime::format_rfc3339_seconds(expires_wall),
            "token obtained"
        );
        lifetime
    }

    fn fail(&self, e: &FetchError, trigger: Trigger, retry_in: Duration, failures: u32) {
        let name = &self.name;
        self.metrics.refresh(trigger, false);
        self.metrics.fetch_error(e.kind());
        let valid_for = self
            .handle
            .current()
            .map(|t| t.expires_at.saturating_duration_since(Instant::now()));
        {
            let mut status = self.handle.lock_status();
            status.last_error = Some(e.to_string());
            status.last_error_at = Some(SystemTime::now());
            status.consecutive_failures = failures;
        }
        match valid_for {
            Some(left) => warn!(
                integration = %name,
                trigger = trigger.as_str(),
                kind = e.kind(),
                error = %e,
                retry_in_ms = retry_in.as_millis() as u64,
                current_token_valid_for_s = left.as_secs(),
                "token refresh failed; the current token stays in use"
            ),
            None => warn!(
                integration = %name,
                trigger = trigger.as_str(),
                kind = e.kind(),
                error = %e,
                retry_in_ms = retry_in.as_millis() as u64,
                "token request failed; requests get 503 token_unavailable until one succeeds"
            ),
        }
    }
}

async fn poll_fetch(
    in_flight: &mut Option<(Fetch, Trigger)>,
) -> (Result<Issued, FetchError>, Duration) {
    match in_flight {
        Some((fetch, _)) => fetch.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_happens_at_the_fraction_within_jitter() {
        let hour = Duration::from_secs(3600);
        assert_eq!(refresh_delay(hour, 0.8, 0.0), Duration::from_secs(2880));
        assert_eq!(refresh_delay(hour, 0.8, 1.0), Duration::from_secs(3060));
        assert_eq!(refresh_delay(hour, 0.8, -1.0), Duration::from_secs(2700));
        // Never closer than 1 s, even for absurdly short tokens.
        assert_eq!(
            refresh_delay(Duration::from_millis(500), 0.8, 0.0),
            MIN_INTERVAL
        );
    }

    #[test]
    fn thrash_is_named_after_three_early_revocations_and_then_once_a_minute() {
        let start = Instant::now();
        let mut t = Thrash {
            window_start: start,
            count: 0,
            last_log: None,
        };
        assert_eq!(t.note(start), None);
        assert_eq!(t.note(start + Duration::from_secs(1)), None);
        assert_eq!(t.note(start + Duration::from_secs(2)), Some(3));
        assert_eq!(
            t.note(start + Duration::from_secs(3)),
            None,
            "once a minute"
        );
        assert_eq!(t.note(start + Duration::from_secs(30)), None);
        // A new window: three more within it are named again.
        for s in [63, 64] {
            assert_eq!(t.note(start + Duration::from_secs(s)), None);
        }
        assert_eq!(t.note(start + Duration::from_secs(65)), Some(3));
    }

    #[test]
    fn backoff_doubles_to_a_minute_with_full_jitter() {
        assert_eq!(backoff(1, 0.99), MIN_INTERVAL);
        assert_eq!(backoff(3, 0.5), Duration::from_secs(2));
        assert_eq!(backoff(4, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(7, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(100, 1.0), MAX_BACKOFF);
        assert_eq!(backoff(100, 0.0), MIN_INTERVAL);
    }
}
