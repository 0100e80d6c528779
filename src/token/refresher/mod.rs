//! The background task that keeps one integration's token fresh: fetch at start, refresh once
//! `refresh_at` of the lifetime has passed (±5 % jitter), retry failures with exponential
//! backoff and full jitter (1 s doubling to 60 s, or the server's `Retry-After` if longer),
//! keep the current token in use until it expires, and serve forced refreshes after a 401.
//!
//! Forced refreshes are single-flight and at most one per [`FORCE_INTERVAL`]; that floor is
//! fixed. A 401 that arrives while it is in force waits for the next permitted fetch (one
//! fetch for all of them) instead of failing: a revoked token must not cost the legacy system
//! a call, whatever the token's age. Tokens revoked again and again soon after issue
//! (revocation thrash) are named in the log and `/status`, never punished with a longer wait.
//!
//! In fleet mode the same driver runs the fleet protocol ([`super::fleet::protocol`]) instead
//! of fetching directly: each attempt may adopt a peer's token, and peers' announcements and
//! the store coming back are events too.
//!
//! Like linkerd's identity client: the old credential stays until a new one is in hand. The
//! task only decides *when*; [`super::client`] does the exchange and the proxy only reads the
//! [`TokenHandle`]. The task is a [`Driver`] (the state, one handler per event) and a loop
//! that waits for the next [`Event`] and dispatches it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, watch};
use tokio::time::{sleep_until, Instant};
use tracing::{debug, error, info, warn};

use super::client::{FetchError, Issued, TokenClient};
use super::fleet::protocol::{Outcome, Via};
use super::fleet::Hub;
use crate::token::schedule::{
    backoff, forced_fetch_at, refresh_delay, FORCE_INTERVAL, MAX_BACKOFF, MIN_INTERVAL,
};
use crate::token::thrash::{thrash_message, Thrash, ThrashSignal};
use fleet::{changed, Fleet};

mod fleet;
use super::{ForceOutcome, ForceRequest, Token, TokenHandle};
use crate::config::{SecretSource, TokenSettings};
use crate::shutdown::Shutdown;
use crate::telemetry::{IntegrationMetrics, Metrics, Trigger};

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

fn watches_files(s: &TokenSettings) -> bool {
    matches!(s.client_id.source, SecretSource::File(_))
        || matches!(s.client_secret.source, SecretSource::File(_))
}

/// What one attempt ended with: a plain fetch, or a round of the fleet protocol.
enum Attempted {
    Plain(Result<Issued, FetchError>),
    Fleet(Outcome),
}

type Fetch = Pin<Box<dyn Future<Output = Attempted> + Send>>;

/// The lifetime a response gives its token (capped, so `Instant` arithmetic cannot overflow).
fn lifetime_of(issued: &Issued, settings: &TokenSettings) -> Duration {
    issued
        .expires_in
        .unwrap_or(settings.assume_lifetime)
        .min(super::client::MAX_LIFETIME)
}

/// What a refresher needs to be a fleet member: the process's hub and the registry its
/// fleet series live in.
#[derive(Clone)]
pub struct FleetContext {
    pub hub: Arc<Hub>,
    pub metrics: Arc<Metrics>,
}

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

/// The background task of one integration, as `run` spawns it.
pub struct Refresher {
    name: Arc<str>,
    handle: Arc<TokenHandle>,
    settings: watch::Receiver<Arc<TokenSettings>>,
    force_rx: mpsc::Receiver<ForceRequest>,
    metrics: Arc<IntegrationMetrics>,
    fleet: Option<FleetContext>,
}

/// What the refresher reacts to; [`Driver::next_event`] waits for the first of them.
enum Event {
    Shutdown,
    /// The attempt in flight finished.
    Fetched(Attempted),
    /// A fetch is due: the scheduled refresh, a retry, or the forced fetch a refused token
    /// is owed once the floor allows it.
    Due,
    /// The upstream refused a token (401).
    Refused(ForceRequest),
    /// A reload delivered new settings.
    SettingsChanged(Arc<TokenSettings>),
    /// Time to look at the `{ file = ... }` secrets again.
    SecretPoll,
    /// The token held has just expired with no successor.
    Expired,
    /// A peer announced a new generation of this fleet's token.
    FleetAnnounced,
    /// The fleet's store became reachable (`true`) or unreachable.
    FleetUp(bool),
}

/// The refresher's state and one handler per [`Event`].
struct Driver {
    name: Arc<str>,
    handle: Arc<TokenHandle>,
    metrics: Arc<IntegrationMetrics>,
    settings_rx: watch::Receiver<Arc<TokenSettings>>,
    settings_open: bool,
    force_rx: mpsc::Receiver<ForceRequest>,
    secret_poll: tokio::time::Interval,
    settings: Arc<TokenSettings>,
    /// None while the settings cannot make one (a bad `ca_file`); retried on each attempt.
    client: Option<TokenClient>,
    in_flight: Option<(Fetch, Trigger)>,
    /// When the next scheduled refresh or retry starts, and what it counts as.
    next_at: Instant,
    next_trigger: Trigger,
    failures: u32,
    /// The newest generation the upstream refused while no newer token is held: a forced
    /// fetch is owed. It stays owed when the requests that reported it have given up.
    refused: Option<u64>,
    /// 401s waiting for a token newer than the one they were refused with.
    waiters: Vec<ForceRequest>,
    last_forced: Option<Instant>,
    thrash: Thrash,
    context: Option<FleetContext>,
    fleet: Option<Fleet>,
    /// How the attempt in flight that only looks (no need of a fetch) was prompted.
    syncing: Option<Via>,
}

impl Refresher {
    pub(crate) fn new(
        name: Arc<str>,
        handle: Arc<TokenHandle>,
        settings: watch::Receiver<Arc<TokenSettings>>,
        force_rx: mpsc::Receiver<ForceRequest>,
        metrics: Arc<IntegrationMetrics>,
        fleet: Option<FleetContext>,
    ) -> Refresher {
        Refresher {
            name,
            handle,
            settings,
            force_rx,
            metrics,
            fleet,
        }
    }

    /// Runs until `shutdown`. Owned and spawned by `run`.
    pub async fn run(self, mut shutdown: Shutdown) {
        let mut driver = Driver::new(self);
        loop {
            match driver.next_event(&mut shutdown).await {
                Event::Shutdown => break,
                Event::Fetched(attempted) => driver.on_fetched(attempted),
                Event::Due => driver.on_due(),
                Event::Refused(req) => driver.on_refused(req),
                Event::SettingsChanged(new) => driver.on_settings(new),
                Event::SecretPoll => driver.on_secret_poll().await,
                Event::Expired => driver.on_expired(),
                Event::FleetAnnounced => driver.maybe_sync(),
                Event::FleetUp(up) => driver.on_fleet_up(up),
            }
        }
        debug!(integration = %driver.name, "refresher stopping");
        driver.handle.lock_status().fetching = false;
        driver.handle.attempt_finished();
    }
}

impl Driver {
    fn new(r: Refresher) -> Driver {
        let Refresher {
            name,
            handle,
            mut settings,
            force_rx,
            metrics,
            fleet,
        } = r;
        let current = settings.borrow_and_update().clone();
        let mut secret_poll = tokio::time::interval(SECRET_POLL);
        secret_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let now = Instant::now();
        let mut driver = Driver {
            name,
            handle,
            metrics,
            settings_rx: settings,
            settings_open: true,
            force_rx,
            secret_poll,
            settings: current,
            client: None,
            in_flight: None,
            next_at: now,
            next_trigger: Trigger::Startup,
            failures: 0,
            refused: None,
            waiters: Vec::new(),
            last_forced: None,
            thrash: Thrash::new(now),
            context: fleet,
            fleet: None,
            syncing: None,
        };
        driver.join_fleet();
        match TokenClient::new(&driver.settings) {
            Ok(c) => driver.client = Some(c),
            Err(e) => {
                warn!(integration = %driver.name, error = %e, "cannot build the token client");
                {
                    let mut status = driver.handle.lock_status();
                    status.fetching = false;
                    status.last_error = Some(format!("cannot build the token client: {e}"));
                }
                // Requests waiting for the first fetch learn at once that there is none.
                driver.handle.attempt_finished();
            }
        }
        driver
    }

    /// When the next fetch starts if nothing else happens: the schedule (or retry), or
    /// earlier the forced fetch a refused token is owed.
    fn wake_at(&self, now: Instant) -> Instant {
        match self.refused {
            Some(_) => self.next_at.min(self.forced_at(now)),
            None => self.next_at,
        }
    }

    fn forced_at(&self, now: Instant) -> Instant {
        let retry_at = (self.failures > 0).then_some(self.next_at);
        forced_fetch_at(now, self.last_forced, retry_at)
    }

    async fn next_event(&mut self, shutdown: &mut Shutdown) -> Event {
        let now = Instant::now();
        let expiry = self
            .handle
            .held()
            .filter(|t| t.is_valid_at(now))
            .map(|t| t.expires_at);
        let wake_at = self.wake_at(now);
        let idle = self.in_flight.is_none();
        let polls_files = watches_files(&self.settings);
        let (announced, up) = match self.fleet.as_mut() {
            Some(f) => (Some(&mut f.announced), Some(&mut f.up)),
            None => (None, None),
        };
        tokio::select! {
            _ = shutdown.wait() => Event::Shutdown,
            attempted = poll_fetch(&mut self.in_flight) => Event::Fetched(attempted),
            _ = sleep_until(wake_at), if idle => Event::Due,
            Some(req) = self.force_rx.recv() => Event::Refused(req),
            changed = self.settings_rx.changed(), if self.settings_open => match changed {
                Ok(()) => Event::SettingsChanged(self.settings_rx.borrow_and_update().clone()),
                Err(_) => {
                    // The sender went with a shutdown in progress; nothing more will come.
                    self.settings_open = false;
                    Event::SettingsChanged(self.settings.clone())
                }
            },
            _ = self.secret_poll.tick(), if polls_files => Event::SecretPoll,
            _ = sleep_until(expiry.unwrap_or(now)), if expiry.is_some() => Event::Expired,
            Some(_) = changed(announced) => Event::FleetAnnounced,
            Some(up) = changed(up) => Event::FleetUp(up),
        }
    }

    fn start_fetch(&mut self, trigger: Trigger) {
        let Some(client) = self.client.clone() else {
            // No client (a bad ca_file): rebuilding it is the retry.
            self.client = TokenClient::new(&self.settings).ok();
            self.next_at = Instant::now() + MAX_BACKOFF;
            self.next_trigger = trigger;
            self.failed_attempt_finished();
            return;
        };
        let syncing = self.syncing.is_some();
        if trigger == Trigger::Unauthorized && !syncing {
            self.last_forced = Some(Instant::now());
        }
        self.handle.lock_status().fetching = true;
        let settings = self.settings.clone();
        let metrics = self.metrics.clone();
        let fetch = move || async move {
            let started = Instant::now();
            let result = client.fetch(&settings).await;
            metrics
                .fetch_duration
                .observe(started.elapsed().as_secs_f64());
            result.map(|issued| {
                let lifetime = lifetime_of(&issued, &settings);
                (issued, lifetime)
            })
        };
        let attempt: Fetch = match &self.fleet {
            Some(fleet) => self.fleet_attempt(fleet, trigger, syncing, fetch),
            None => {
                Box::pin(async move { Attempted::Plain(fetch().await.map(|(issued, _)| issued)) })
            }
        };
        self.in_flight = Some((attempt, trigger));
    }

    /// Updates the status after an attempt that did not run, and answers the waiters that
    /// cannot be served before their deadline.
    fn failed_attempt_finished(&mut self) {
        {
            let mut status = self.handle.lock_status();
            status.fetching = false;
            status.next_attempt = Some(self.next_at);
        }
        self.handle.attempt_finished();
        self.answer_hopeless_waiters("no token client could be built");
    }

    fn on_fetched(&mut self, attempted: Attempted) {
        let trigger = self.in_flight.take().map_or(self.next_trigger, |(_, t)| t);
        let via = self.syncing.take();
        match attempted {
            Attempted::Plain(Ok(issued)) => {
                let lifetime = self.accept(issued, trigger, None);
                self.obtained(lifetime, trigger);
            }
            Attempted::Plain(Err(e)) | Attempted::Fleet(Outcome::Failed(e)) => {
                self.failed(e, trigger)
            }
            Attempted::Fleet(Outcome::Fetched {
                issued,
                generation,
                local,
            }) => {
                if local {
                    if let Some(fleet) = &self.fleet {
                        fleet.metrics.local_fetches.inc();
                    }
                    warn!(integration = %self.name, "fetched a token alone: the fleet's Redis is unreachable (on_unavailable = \"fetch_locally\")");
                }
                let lifetime = self.accept(issued, trigger, Some(generation));
                self.obtained(lifetime, trigger);
            }
            Attempted::Fleet(Outcome::Adopted {
                token,
                generation,
                lifetime,
                remaining,
                by,
            }) => {
                let via = via.unwrap_or(Via::Read);
                if self.adopt(&token, generation, lifetime, remaining, by, via) {
                    self.obtained(lifetime, trigger);
                }
            }
            Attempted::Fleet(Outcome::Unchanged {
                retry_in,
                why,
                give_up,
            }) => self.unchanged(trigger, retry_in, why, give_up),
        }
        {
            let mut status = self.handle.lock_status();
            status.fetching = false;
            status.next_attempt = Some(self.next_at);
        }
        self.handle.attempt_finished();
        self.answer_hopeless_waiters("the new token request failed");
        self.maybe_sync();
    }

    /// A token is held (fetched or adopted): plan the next refresh and answer the 401s.
    fn obtained(&mut self, lifetime: Duration, trigger: Trigger) {
        self.failures = 0;
        let now = Instant::now();
        let obtained_at = self.handle.held().map_or(now, |t| t.obtained_at);
        // In a fleet the jitter only delays, so the member that wakes first fetches and the
        // others find its token; alone it spreads sidecars started together both ways.
        let jitter = match self.fleet {
            Some(_) => fastrand::f64(),
            None => fastrand::f64() * 2.0 - 1.0,
        };
        self.next_at =
            (obtained_at + refresh_delay(lifetime, self.settings.refresh_at, jitter)).max(now);
        self.next_trigger = Trigger::Scheduled;
        if trigger == Trigger::Scheduled && self.thrash.calm(now) {
            // Tokens live to their scheduled refresh again: whatever thrashed stopped.
            self.handle.lock_status().warning = None;
        }
        // Whatever was refused, this token answers it: one handed back unchanged is refused
        // again by the next request, which asks again.
        self.refused = None;
        for w in self.waiters.drain(..) {
            let _ = w.reply.send(outcome(&self.handle, w.generation));
        }
    }

    fn failed(&mut self, e: FetchError, trigger: Trigger) {
        self.failures += 1;
        let delay =
            backoff(self.failures, fastrand::f64()).max(e.retry_after().unwrap_or_default());
        self.next_at = Instant::now() + delay;
        if trigger == Trigger::Unauthorized {
            // Retrying a forced fetch is a forced fetch: the floor holds for it too.
            self.next_at = forced_fetch_at(self.next_at, self.last_forced, None);
        }
        // A retry keeps the trigger of what it retries.
        self.next_trigger = trigger;
        self.fail(&e, trigger, delay);
    }

    /// The fleet neither had nor fetched a token for this attempt (a peer holds the claim or
    /// forced a fetch within the floor, or Redis is unreachable and the token held is kept).
    fn unchanged(
        &mut self,
        trigger: Trigger,
        retry_in: Option<Duration>,
        why: Option<String>,
        give_up: bool,
    ) {
        if let Some(retry_in) = retry_in {
            self.next_at = Instant::now() + retry_in;
            self.next_trigger = trigger;
        }
        let Some(why) = why else {
            return;
        };
        debug!(integration = %self.name, reason = %why, "no new token from the fleet this time");
        if self.handle.current().is_none() {
            let mut status = self.handle.lock_status();
            status.last_error = Some(why.clone());
            status.last_error_at = Some(SystemTime::now());
        }
        if give_up {
            // `hold`: a 401 while Redis is unreachable goes back to the client.
            self.refused = None;
            for w in self.waiters.drain(..) {
                let _ = w.reply.send(ForceOutcome::NotRefreshed(why.clone()));
            }
        }
    }

    fn on_due(&mut self) {
        let now = Instant::now();
        let trigger = if self.refused.is_some() && self.forced_at(now) <= now {
            info!(integration = %self.name, "upstream refused the token (401); refreshing now");
            Trigger::Unauthorized
        } else {
            self.next_trigger
        };
        self.start_fetch(trigger);
    }

    fn on_refused(&mut self, req: ForceRequest) {
        let now = Instant::now();
        if req.early {
            if let ThrashSignal::Thrashing { count, log } = self.thrash.note(req.generation, now) {
                let message = thrash_message(count);
                if log {
                    error!(integration = %self.name, early_revocations = count, "{message}");
                }
                self.handle.lock_status().warning = Some(message);
            }
        }
        let current = self.handle.current();
        if current
            .as_ref()
            .is_some_and(|t| t.generation > req.generation)
        {
            // Already replaced: replay with the current token, no fetch.
            let _ = req.reply.send(outcome(&self.handle, req.generation));
            return;
        }
        self.refused = Some(self.refused.unwrap_or(0).max(req.generation));
        self.waiters.push(req);
        if self.in_flight.is_none() {
            if self.forced_at(now) <= now {
                self.on_due();
            } else {
                debug!(integration = %self.name, "upstream refused the token (401) within 5 s of the last forced refresh; the request waits for the next one");
            }
        }
        self.answer_hopeless_waiters("");
    }

    /// Answers the waiters that the next fetch cannot serve in time (it starts after their
    /// deadline), and forgets those that stopped waiting.
    fn answer_hopeless_waiters(&mut self, failed: &str) {
        if self.waiters.is_empty() {
            return;
        }
        let now = Instant::now();
        let starts = match (&self.in_flight, self.refused) {
            (Some(_), _) => now,
            (None, Some(_)) => self.forced_at(now),
            (None, None) => self.next_at,
        };
        let (hopeless, waiting): (Vec<_>, Vec<_>) = self
            .waiters
            .drain(..)
            .filter(|w| !w.reply.is_closed())
            .partition(|w| w.deadline <= starts);
        self.waiters = waiting;
        for w in hopeless {
            let why = match self.handle.lock_status().last_error.clone() {
                Some(e) if !failed.is_empty() => format!("{failed}: {e}"),
                _ => format!(
                    "the next token request is allowed in {} (at most one per {} after a 401), after this request's request_timeout",
                    humantime::format_duration(Duration::from_secs(
                        starts.saturating_duration_since(now).as_secs_f64().ceil() as u64
                    )),
                    humantime::format_duration(FORCE_INTERVAL)
                ),
            };
            let _ = w.reply.send(ForceOutcome::NotRefreshed(why));
        }
    }

    fn on_settings(&mut self, new: Arc<TokenSettings>) {
        if Arc::ptr_eq(&new, &self.settings) {
            return;
        }
        let refetch = needs_new_token(&self.settings, &new);
        // The client holds the TLS roots and the egress route (proxy and its credentials); a
        // new egress_proxy_auth applies to the next tunnel.
        let egress_changed = new.egress != self.settings.egress;
        if new.ca_file != self.settings.ca_file || egress_changed || self.client.is_none() {
            match TokenClient::new(&new) {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    warn!(integration = %self.name, error = %e, "cannot build the token client; keeping the previous one")
                }
            }
        }
        // A new secret seals differently; a new fleet_id or membership is another member.
        let rejoin = new.fleet != self.settings.fleet
            || new.client_secret.value != self.settings.client_secret.value
            || new.timeout != self.settings.timeout;
        self.settings = new;
        if rejoin {
            self.join_fleet();
        }
        // A new route needs no new token, but while fetches fail (a proxy that refused the
        // old credentials) the next attempt should not wait out the backoff.
        if egress_changed && !refetch && self.failures > 0 && self.in_flight.is_none() {
            self.next_at = Instant::now();
        }
        if refetch {
            info!(integration = %self.name, "token settings changed; fetching a new token");
            self.refetch_with_new_credentials();
        }
    }

    /// A fetch under the old settings would produce a token for the old credentials: start
    /// over with the new ones. Waiters stay: the new token answers them.
    fn refetch_with_new_credentials(&mut self) {
        self.in_flight = None;
        self.failures = 0;
        self.start_fetch(Trigger::CredentialsChanged);
    }

    async fn on_secret_poll(&mut self) {
        let current = self.settings.clone();
        let reread = tokio::task::spawn_blocking(move || reread_file_secrets(&current))
            .await
            .ok()
            .flatten();
        if let Some((new, keys)) = reread {
            info!(integration = %self.name, changed = ?keys, "secret file changed; fetching a new token with it (the current token stays in use until then)");
            self.settings = Arc::new(new);
            self.join_fleet();
            self.refetch_with_new_credentials();
        }
    }

    fn on_expired(&mut self) {
        self.metrics.valid.set(0);
        warn!(integration = %self.name, "token expired and no new one was obtained; requests get 503 token_unavailable until one is");
    }

    /// Installs a new token; returns the lifetime the next refresh is planned from.
    /// `generation` is the fleet's for the token (fleet mode); alone it counts up here.
    fn accept(&self, issued: Issued, trigger: Trigger, generation: Option<u64>) -> Duration {
        let name = &self.name;
        let settings = &self.settings;
        let lifetime = lifetime_of(&issued, settings);
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
                let mut renewed = old.renewed(lifetime);
                renewed.generation = generation.unwrap_or(renewed.generation);
                renewed
            }
            other => {
                let generation =
                    generation.unwrap_or_else(|| other.map(|t| t.generation + 1).unwrap_or(1));
                match Token::new(issued.access_token.expose(), generation, lifetime) {
                    Some(t) => t,
                    // client.rs refuses such tokens already; this keeps the invariant local.
                    None => return MIN_INTERVAL,
                }
            }
        };
        let expires_wall = token.expires_at_wall;
        let by = self.fleet.as_ref().map(|f| f.member.holder.to_string());
        self.install(token, by);
        self.metrics.refresh(trigger, true);
        info!(
            integration = %name,
            trigger = trigger.as_str(),
            lifetime_s = lifetime.as_secs(),
            expires_at = %humantime::format_rfc3339_seconds(expires_wall),
            "token obtained"
        );
        lifetime
    }

    /// Makes `token` the one requests use, and says so in `/status` and the metrics.
    fn install(&self, token: Token, fetched_by: Option<String>) {
        let expires_wall = token.expires_at_wall;
        let generation = token.generation;
        self.handle.store(token);
        {
            let mut status = self.handle.lock_status();
            status.last_refresh = Some(SystemTime::now());
            status.last_error = None;
            status.last_error_at = None;
            status.consecutive_failures = 0;
            if let Some(fleet) = status.fleet.as_mut() {
                fleet.generation = generation;
                fleet.last_fetch_by = fetched_by;
            }
        }
        if let Some(fleet) = &self.fleet {
            fleet.metrics.generation.set(generation as i64);
        }
        self.metrics.valid.set(1);
        self.metrics.expiry.set(
            expires_wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
    }

    fn fail(&self, e: &FetchError, trigger: Trigger, retry_in: Duration) {
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
            status.consecutive_failures = self.failures;
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

/// The answer to a 401 for `generation` once a fetch finished (or was not needed).
fn outcome(handle: &TokenHandle, generation: u64) -> ForceOutcome {
    match handle.current() {
        Some(t) if t.generation > generation => ForceOutcome::Replaced(t),
        Some(_) => ForceOutcome::NotRefreshed(
            "the token endpoint handed back the token the upstream refused".into(),
        ),
        None => ForceOutcome::NotRefreshed(
            handle
                .lock_status()
                .last_error
                .clone()
                .unwrap_or_else(|| "no token could be obtained".to_string()),
        ),
    }
}

async fn poll_fetch(in_flight: &mut Option<(Fetch, Trigger)>) -> Attempted {
    match in_flight {
        Some((fetch, _)) => fetch.await,
        None => std::future::pending().await,
    }
}
