//! The fleet protocol, once, over any [`Backend`]: how a member that needs a token gets one
//! with at most one fetch per generation across the fleet.
//!
//! Read the entry; adopt it if it is newer than what the need is about. Otherwise (for a 401,
//! after the fleet-wide 5 s floor) claim the right to fetch, re-read, fetch only if the
//! generation did not move, publish with a compare-and-set that releases the claim. A member
//! that loses the claim waits up to `wait_for_peer` for the winner's notification and adopts;
//! if none comes it takes the claim over from the holder it saw (one member wins that), so a
//! claimer that died or stopped costs at most one extra fetch. When the backend is
//! unreachable the member falls back as `on_unavailable` says, only near expiry.
//!
//! Redis is one backend ([`super::redis`]); a Kubernetes Secret claimed by `resourceVersion`
//! could be another. Tests drive this with an in-memory backend, paused time and a thousand
//! members.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::seal::{Sealed, Sealer};
use crate::config::OnUnavailable;
use crate::token::client::{FetchError, Issued};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A backend operation that did not complete: unreachable, timed out, refused (auth, ACL).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

/// The entry of one fleet id as stored: the sealed token and what is authenticated with it.
#[derive(Clone, Debug)]
pub struct Entry {
    pub generation: u64,
    pub lifetime_ms: u64,
    /// The backend's own count-down (Redis TTL): no clock agreement between members.
    pub remaining: Duration,
    pub sealed: Vec<u8>,
    /// Who fetched it (host and process), for `/status`.
    pub by: String,
}

/// Who holds the claim after a claim attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Won,
    HeldBy(String),
}

/// What a fleet store must offer; every operation is atomic on its own.
pub trait Backend: Send + Sync + 'static {
    fn read(&self, id: &str) -> BoxFuture<'_, Result<Option<Entry>, BackendError>>;
    /// Takes the claim if nobody holds it, or if `take_over` names its holder (a claimer seen
    /// stuck); expires after `ttl`.
    fn claim(
        &self,
        id: &str,
        holder: &str,
        ttl: Duration,
        take_over: Option<&str>,
    ) -> BoxFuture<'_, Result<Claim, BackendError>>;
    /// Drops the claim if `holder` still holds it.
    fn release(&self, id: &str, holder: &str) -> BoxFuture<'_, Result<(), BackendError>>;
    /// The fleet-wide forced-fetch floor: `true` (and the floor set for `ttl`) when no member
    /// forced a fetch within it.
    fn floor(&self, id: &str, ttl: Duration) -> BoxFuture<'_, Result<bool, BackendError>>;
    /// Stores `entry` if the stored generation is still `expect` (0: none), releases
    /// `holder`'s claim and notifies the fleet. `Err(current)` when the generation moved.
    fn publish(
        &self,
        id: &str,
        expect: u64,
        entry: Entry,
        holder: &str,
    ) -> BoxFuture<'_, Result<Result<(), u64>, BackendError>>;
}

/// Why a member needs a token (or just looks): the trigger of the attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// No token held yet.
    Startup,
    /// The held token reached its refresh time.
    Scheduled,
    /// The upstream refused the token of this generation.
    Refused(u64),
    /// The credentials changed: only a token sealed under the new secret will do.
    Credentials,
    /// A notification, a reconnect: adopt anything newer, write back what the store lost.
    Sync,
}

/// The token a member holds, as far as the protocol cares.
#[derive(Clone, Debug)]
pub struct Held {
    pub generation: u64,
    pub lifetime: Duration,
    pub remaining: Duration,
    /// The token itself, for writing it back to a store that lost it.
    pub token: Arc<str>,
}

impl Held {
    /// In the last 10 % of its life: where a member with no fleet fetches alone.
    fn nearly_expired(&self) -> bool {
        self.remaining <= self.lifetime / 10
    }
}

/// How an adopted token reached the member.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    Notification,
    Read,
}

/// What one attempt ended with.
#[derive(Debug)]
pub enum Outcome {
    /// A peer's token, no fetch.
    Adopted {
        token: String,
        generation: u64,
        lifetime: Duration,
        remaining: Duration,
        by: String,
    },
    /// Fetched by this member; `generation` is what it holds in the fleet (published, or
    /// one past what it held when the store was unreachable).
    Fetched {
        issued: Issued,
        generation: u64,
        /// Fetched alone because the store was unreachable.
        local: bool,
    },
    /// The fetch failed (the store may have been fine).
    Failed(FetchError),
    /// Nothing to do or nothing possible now; try again after this (a peer's floor, the store
    /// unreachable with `hold` or with a token that still has most of its life).
    Unchanged {
        retry_in: Option<Duration>,
        why: Option<String>,
        /// The 401s waiting cannot be answered with a new token: pass them back.
        give_up: bool,
    },
}

/// One member's fixed part: the store, who it is, its key and timings.
pub struct Member {
    pub backend: Arc<dyn Backend>,
    pub id: String,
    pub holder: Arc<str>,
    pub sealer: Sealer,
    pub wait_for_peer: Duration,
    pub on_unavailable: OnUnavailable,
    /// `token_timeout` plus a margin: a claimer that died is taken over after this.
    pub claim_ttl: Duration,
    /// The highest generation peers announced.
    pub notified: watch::Receiver<u64>,
}

/// Where an attempt reports what it does (metrics and logs, by the caller's trigger).
pub type Report = dyn Fn(Event) + Send + Sync;

/// One attempt of a member: the member and where this attempt reports.
struct Attempt<'a> {
    member: &'a Member,
    report: &'a Report,
}

impl std::ops::Deref for Attempt<'_> {
    type Target = Member;
    fn deref(&self) -> &Member {
        self.member
    }
}

/// What the protocol reports for metrics and logs while it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Claim(ClaimResult),
    /// An entry that does not open, by why and generation (one entry is read several times
    /// in an attempt: count it once).
    Rejected(&'static str, u64),
    BackendDown(String),
    BackendUp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimResult {
    Won,
    Lost,
    Error,
}

/// The fleet-wide floor between forced fetches (the same 5 s as a lone process's).
pub const FORCE_FLOOR: Duration = super::super::refresher::FORCE_INTERVAL;

/// An entry is stale (not worth adopting) with less than this left.
const STALE: Duration = Duration::from_secs(1);

/// A readable entry: opened, or known only by its generation.
enum Read {
    None,
    Opened {
        token: String,
        generation: u64,
        lifetime: Duration,
        remaining: Duration,
        by: String,
    },
    /// Present but does not open (forged, or sealed under another secret).
    Unusable(u64),
}

impl Read {
    fn generation(&self) -> u64 {
        match self {
            Read::None => 0,
            Read::Opened { generation, .. } | Read::Unusable(generation) => *generation,
        }
    }
}

impl Attempt<'_> {
    async fn read(&self) -> Result<Read, BackendError> {
        let entry = self.backend.read(&self.id).await?;
        (self.report)(Event::BackendUp);
        let Some(e) = entry else {
            return Ok(Read::None);
        };
        let meta = Sealed {
            generation: e.generation,
            lifetime_ms: e.lifetime_ms,
        };
        if e.generation == 0 || e.lifetime_ms == 0 {
            (self.report)(Event::Rejected("malformed", e.generation));
            return Ok(Read::Unusable(e.generation));
        }
        match self.sealer.open(&e.sealed, meta) {
            Some(token) => {
                let lifetime = Duration::from_millis(e.lifetime_ms);
                Ok(Read::Opened {
                    token,
                    generation: e.generation,
                    lifetime,
                    remaining: e.remaining.min(lifetime),
                    by: e.by,
                })
            }
            None => {
                (self.report)(Event::Rejected("unseal_failed", e.generation));
                Ok(Read::Unusable(e.generation))
            }
        }
    }

    /// Whether `read` answers `need` without a fetch.
    fn answers(read: &Read, need: Need, held: Option<&Held>) -> bool {
        let Read::Opened {
            generation,
            remaining,
            ..
        } = read
        else {
            return false;
        };
        if *remaining < STALE {
            return false;
        }
        let held_gen = held.map_or(0, |h| h.generation);
        match need {
            Need::Refused(g) => *generation > g,
            Need::Startup | Need::Sync => *generation > held_gen || held.is_none(),
            Need::Scheduled | Need::Credentials => *generation > held_gen,
        }
    }

    fn adopt(read: Read) -> Outcome {
        match read {
            Read::Opened {
                token,
                generation,
                lifetime,
                remaining,
                by,
            } => Outcome::Adopted {
                token,
                generation,
                lifetime,
                remaining,
                by,
            },
            _ => Outcome::Unchanged {
                retry_in: None,
                why: None,
                give_up: false,
            },
        }
    }

    /// Waits until a peer announces a generation above `above`, or `wait` passes.
    async fn wait_for_peer(&self, above: u64, wait: Duration) -> bool {
        let mut rx = self.notified.clone();
        tokio::time::timeout(wait, rx.wait_for(|g| *g > above))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    async fn run<F, Fut>(&self, need: Need, held: Option<Held>, fetch: F) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Issued, Duration), FetchError>>,
    {
        match self.coordinate(need, held.as_ref()).await {
            Ok(Step::Done(outcome)) => outcome,
            Ok(Step::Fetch { expect }) => {
                self.fetch_and_publish(need, held.as_ref(), expect, fetch)
                    .await
            }
            Err(e) => {
                (self.report)(Event::BackendDown(e.0.clone()));
                self.unavailable(need, held.as_ref(), e, fetch).await
            }
        }
    }

    async fn coordinate(&self, need: Need, held: Option<&Held>) -> Result<Step, BackendError> {
        let read = if need == Need::Sync {
            // Prompted by the listener reconnecting: the command connection reconnects on
            // its first use and may need a moment.
            let mut tries = 0;
            loop {
                match self.read().await {
                    Ok(read) => break read,
                    Err(e) if tries >= 3 => return Err(e),
                    Err(_) => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
            }
        } else {
            self.read().await?
        };
        if Self::answers(&read, need, held) {
            return Ok(Step::Done(Self::adopt(read)));
        }
        if need == Need::Sync {
            return self.write_back(read, held).await;
        }
        if let Need::Refused(_) = need {
            if !self.backend.floor(&self.id, FORCE_FLOOR).await? {
                // A peer forced a fetch within the floor: its token is coming, or the floor
                // ends before another may be forced.
                let seen = read.generation();
                if self.wait_for_peer(seen, self.wait_for_peer).await {
                    let read = self.read().await?;
                    if Self::answers(&read, need, held) {
                        return Ok(Step::Done(Self::adopt(read)));
                    }
                }
                return Ok(Step::Done(Outcome::Unchanged {
                    retry_in: Some(FORCE_FLOOR / 5),
                    why: Some(
                        "another tokengate of this fleet forced a token refresh less than 5s ago"
                            .into(),
                    ),
                    give_up: false,
                }));
            }
        }
        let mut seen = read.generation();
        let mut take_over = None;
        // Claim; if lost, wait for the peer, then take over the claim of the holder seen (it
        // may be stuck) — one member wins that, the rest wait for it in turn. Bounded by the
        // claim's own expiry: by then any claimer is gone or done.
        let until = tokio::time::Instant::now() + self.claim_ttl;
        while tokio::time::Instant::now() < until {
            let claim = self
                .backend
                .claim(&self.id, &self.holder, self.claim_ttl, take_over.as_deref())
                .await;
            let claim = match claim {
                Ok(c) => c,
                Err(e) => {
                    (self.report)(Event::Claim(ClaimResult::Error));
                    return Err(e);
                }
            };
            match claim {
                Claim::Won => {
                    (self.report)(Event::Claim(ClaimResult::Won));
                    // A peer may have published between the read and the claim.
                    let read = self.read().await?;
                    if read.generation() > seen && Self::answers(&read, need, held) {
                        let _ = self.backend.release(&self.id, &self.holder).await;
                        return Ok(Step::Done(Self::adopt(read)));
                    }
                    return Ok(Step::Fetch {
                        expect: read.generation(),
                    });
                }
                Claim::HeldBy(holder) => {
                    (self.report)(Event::Claim(ClaimResult::Lost));
                    if self.wait_for_peer(seen, self.wait_for_peer).await {
                        let read = self.read().await?;
                        if Self::answers(&read, need, held) {
                            return Ok(Step::Done(Self::adopt(read)));
                        }
                        seen = read.generation();
                    } else {
                        // Notifications can be lost: look before taking over.
                        let read = self.read().await?;
                        if Self::answers(&read, need, held) {
                            return Ok(Step::Done(Self::adopt(read)));
                        }
                        seen = read.generation();
                        take_over = Some(holder);
                    }
                }
            }
        }
        Ok(Step::Done(Outcome::Unchanged {
            retry_in: Some(self.wait_for_peer),
            why: Some("another tokengate of this fleet holds the claim to fetch".into()),
            give_up: false,
        }))
    }

    /// After a reconnect or a notification: a store that lost the entry (restarted empty,
    /// failed over) gets the held token back, so the fleet converges without a fetch.
    async fn write_back(&self, read: Read, held: Option<&Held>) -> Result<Step, BackendError> {
        let unchanged = Step::Done(Outcome::Unchanged {
            retry_in: None,
            why: None,
            give_up: false,
        });
        let Some(h) = held.filter(|h| h.remaining >= STALE) else {
            return Ok(unchanged);
        };
        let stored = read.generation();
        if stored >= h.generation {
            return Ok(unchanged);
        }
        if let Some(entry) = self.entry(&h.token, h.generation, h.lifetime, h.remaining) {
            // Lost to a peer's write: theirs is at least as new; the next read adopts it.
            let _ = self
                .backend
                .publish(&self.id, stored, entry, &self.holder)
                .await?;
        }
        Ok(unchanged)
    }

    fn entry(
        &self,
        token: &str,
        generation: u64,
        lifetime: Duration,
        remaining: Duration,
    ) -> Option<Entry> {
        let lifetime_ms = lifetime.as_millis().max(1) as u64;
        let sealed = self.sealer.seal(
            token,
            Sealed {
                generation,
                lifetime_ms,
            },
        )?;
        Some(Entry {
            generation,
            lifetime_ms,
            remaining,
            sealed,
            by: self.holder.to_string(),
        })
    }

    async fn fetch_and_publish<F, Fut>(
        &self,
        need: Need,
        held: Option<&Held>,
        expect: u64,
        fetch: F,
    ) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Issued, Duration), FetchError>>,
    {
        let (issued, lifetime) = match fetch().await {
            Ok(ok) => ok,
            Err(e) => {
                let _ = self.backend.release(&self.id, &self.holder).await;
                return Outcome::Failed(e);
            }
        };
        // Never below what this member held: a store that lost its newest entry must not make
        // a 401 for the held generation look like one for an older token.
        let generation = expect.max(held.map_or(0, |h| h.generation)) + 1;
        let Some(entry) = self.entry(issued.access_token.expose(), generation, lifetime, lifetime)
        else {
            return Outcome::Fetched {
                issued,
                generation,
                local: false,
            };
        };
        match self
            .backend
            .publish(&self.id, expect, entry, &self.holder)
            .await
        {
            Ok(Ok(())) => Outcome::Fetched {
                issued,
                generation,
                local: false,
            },
            Ok(Err(_moved)) => {
                // The fleet moved on while this member fetched (it was stopped past its
                // claim, or took over from one that came back): converge on the fleet's
                // token rather than fight over which is newer; if the server revoked it, the
                // next 401 forces one more fetch.
                match self.read().await {
                    Ok(read) if Self::answers(&read, need, held) => Self::adopt(read),
                    _ => Outcome::Fetched {
                        issued,
                        generation,
                        local: false,
                    },
                }
            }
            Err(e) => {
                (self.report)(Event::BackendDown(e.0));
                Outcome::Fetched {
                    issued,
                    generation,
                    local: true,
                }
            }
        }
    }

    /// The store is unreachable: keep the token held; near expiry (or for a 401) fetch alone
    /// with `fetch_locally`, or hold with `hold`.
    async fn unavailable<F, Fut>(
        &self,
        need: Need,
        held: Option<&Held>,
        e: BackendError,
        fetch: F,
    ) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Issued, Duration), FetchError>>,
    {
        let why = format!("the fleet's Redis is unreachable or refused ({e})");
        if need == Need::Sync {
            // Only a look: the schedule stays as it is, and the next reconnect looks again.
            return Outcome::Unchanged {
                retry_in: None,
                why: None,
                give_up: false,
            };
        }
        let urgent = match need {
            Need::Sync => false,
            Need::Refused(_) | Need::Credentials => true,
            Need::Startup | Need::Scheduled => held.is_none_or(Held::nearly_expired),
        };
        if !urgent || self.on_unavailable == OnUnavailable::Hold {
            // Keep what is held; look again soon, and no later than the last 10 %.
            let retry_in = held
                .map(|h| h.remaining.saturating_sub(h.lifetime / 10))
                .unwrap_or_default()
                .clamp(Duration::from_secs(1), Duration::from_secs(5));
            return Outcome::Unchanged {
                retry_in: Some(retry_in),
                why: Some(why),
                // `hold` answers a 401 with the 401: a local fetch would revoke the fleet's
                // token on servers that allow one per client.
                give_up: matches!(need, Need::Refused(_)),
            };
        }
        match fetch().await {
            Ok((issued, _)) => Outcome::Fetched {
                issued,
                generation: held.map_or(0, |h| h.generation) + 1,
                local: true,
            },
            Err(e) => Outcome::Failed(e),
        }
    }
}

impl Member {
    /// Gets a token for `need`. `fetch` runs at most once, and only when no peer's token
    /// answers the need.
    pub async fn acquire<F, Fut>(
        &self,
        need: Need,
        held: Option<Held>,
        report: &Report,
        fetch: F,
    ) -> Outcome
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(Issued, Duration), FetchError>>,
    {
        Attempt {
            member: self,
            report,
        }
        .run(need, held, fetch)
        .await
    }
}

enum Step {
    Done(Outcome),
    Fetch { expect: u64 },
}

#[cfg(test)]
mod tests_support {
    //! A simulated store and members for the protocol's tests (paused time).
    #![allow(clippy::unwrap_used)]
    pub(super) use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::time::Instant;

    use crate::config::Secret;

    #[derive(Default)]
    pub(super) struct State {
        entry: Option<(Entry, Instant)>,
        claim: Option<(String, Instant)>,
        floor: Option<Instant>,
        pub(super) down: bool,
    }

    pub(super) struct Sim {
        pub(super) state: Mutex<State>,
        announce: watch::Sender<u64>,
    }

    impl Sim {
        pub(super) fn new() -> Arc<Sim> {
            Arc::new(Sim {
                state: Mutex::new(State::default()),
                announce: watch::channel(0).0,
            })
        }

        fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, BackendError> {
            let state = self.state.lock().unwrap();
            if state.down {
                return Err(BackendError("Connection refused".into()));
            }
            Ok(state)
        }

        pub(super) fn generation(&self) -> u64 {
            let s = self.state.lock().unwrap();
            s.entry.as_ref().map_or(0, |(e, _)| e.generation)
        }
    }

    impl Backend for Sim {
        fn read(&self, _: &str) -> BoxFuture<'_, Result<Option<Entry>, BackendError>> {
            let r = self.lock().map(|s| {
                let now = Instant::now();
                s.entry
                    .as_ref()
                    .filter(|(_, exp)| *exp > now)
                    .map(|(e, exp)| Entry {
                        remaining: *exp - now,
                        ..e.clone()
                    })
            });
            Box::pin(async move { r })
        }

        fn claim(
            &self,
            _: &str,
            holder: &str,
            ttl: Duration,
            take_over: Option<&str>,
        ) -> BoxFuture<'_, Result<Claim, BackendError>> {
            let r = self.lock().map(|mut s| {
                let now = Instant::now();
                match &s.claim {
                    Some((h, exp))
                        if *exp > now && h != holder && Some(h.as_str()) != take_over =>
                    {
                        Claim::HeldBy(h.clone())
                    }
                    _ => {
                        s.claim = Some((holder.to_owned(), now + ttl));
                        Claim::Won
                    }
                }
            });
            Box::pin(async move { r })
        }

        fn release(&self, _: &str, holder: &str) -> BoxFuture<'_, Result<(), BackendError>> {
            let r = self.lock().map(|mut s| {
                if s.claim.as_ref().is_some_and(|(h, _)| h == holder) {
                    s.claim = None;
                }
            });
            Box::pin(async move { r })
        }

        fn floor(&self, _: &str, ttl: Duration) -> BoxFuture<'_, Result<bool, BackendError>> {
            let r = self.lock().map(|mut s| {
                let now = Instant::now();
                if s.floor.is_some_and(|until| until > now) {
                    return false;
                }
                s.floor = Some(now + ttl);
                true
            });
            Box::pin(async move { r })
        }

        fn publish(
            &self,
            _: &str,
            expect: u64,
            entry: Entry,
            holder: &str,
        ) -> BoxFuture<'_, Result<Result<(), u64>, BackendError>> {
            let r = self.lock().map(|mut s| {
                let now = Instant::now();
                let current = s
                    .entry
                    .as_ref()
                    .filter(|(_, exp)| *exp > now)
                    .map_or(0, |(e, _)| e.generation);
                if current != expect {
                    return Err(current);
                }
                let generation = entry.generation;
                s.entry = Some((entry.clone(), now + entry.remaining));
                if s.claim.as_ref().is_some_and(|(h, _)| h == holder) {
                    s.claim = None;
                }
                self.announce.send_modify(|g| *g = (*g).max(generation));
                Ok(())
            });
            Box::pin(async move { r })
        }
    }

    pub(super) fn member(sim: &Arc<Sim>, n: usize, wait_for_peer: Duration) -> Member {
        Member {
            backend: sim.clone(),
            id: "fleet".into(),
            holder: format!("m{n}").into(),
            sealer: Sealer::new("secret", "fleet"),
            wait_for_peer,
            on_unavailable: OnUnavailable::FetchLocally,
            claim_ttl: Duration::from_secs(15),
            notified: sim.announce.subscribe(),
        }
    }

    pub(super) const LIFETIME: Duration = Duration::from_secs(60);

    /// A token endpoint that takes `delay` and counts its calls.
    pub(super) fn endpoint(
        fetches: &Arc<AtomicUsize>,
        delay: Duration,
    ) -> impl FnOnce() -> BoxFuture<'static, Result<(Issued, Duration), FetchError>> {
        let fetches = fetches.clone();
        move || {
            Box::pin(async move {
                let n = fetches.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(delay).await;
                let issued = Issued {
                    access_token: Secret::new(format!("token-{n}")),
                    expires_in: Some(LIFETIME),
                    capped: false,
                    clock_skew: None,
                    status: http::StatusCode::OK,
                };
                Ok((issued, LIFETIME))
            })
        }
    }

    pub(super) fn generation_of(outcome: &Outcome) -> Option<u64> {
        match outcome {
            Outcome::Adopted { generation, .. } | Outcome::Fetched { generation, .. } => {
                Some(*generation)
            }
            _ => None,
        }
    }

    pub(super) fn held(generation: u64, remaining: Duration) -> Held {
        Held {
            generation,
            lifetime: LIFETIME,
            remaining,
            token: "held".into(),
        }
    }

    /// `n` members that all need `need` at (nearly) once; their outcomes.
    pub(super) async fn all_at_once(
        members: &Arc<Vec<Member>>,
        need: Need,
        held: Option<Held>,
        fetches: &Arc<AtomicUsize>,
        delay: Duration,
        stagger: Duration,
    ) -> Vec<Outcome> {
        let tasks: Vec<_> = (0..members.len())
            .map(|i| {
                let members = members.clone();
                let held = held.clone();
                let fetch = endpoint(fetches, delay);
                tokio::spawn(async move {
                    tokio::time::sleep(stagger * (i % 7) as u32).await;
                    members[i].acquire(need, held, &|_| {}, fetch).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    //! The protocol under a simulated store with paused time: many members at once, fetches
    //! counted, the store's state inspected.
    use super::tests_support::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_thousand_members_fetch_once_per_generation_and_the_floor_is_fleet_wide() {
        let sim = Sim::new();
        let fetches = Arc::new(AtomicUsize::new(0));
        let members: Arc<Vec<Member>> = Arc::new(
            (0..1000)
                .map(|n| member(&sim, n, Duration::from_secs(3)))
                .collect(),
        );
        let ms = Duration::from_millis;
        let out = all_at_once(&members, Need::Startup, None, &fetches, ms(200), ms(1)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(out.iter().all(|o| generation_of(o) == Some(1)));

        // Everyone meets a 401 for generation 1: one forced fetch for the fleet.
        let out = all_at_once(
            &members,
            Need::Refused(1),
            Some(held(1, LIFETIME / 2)),
            &fetches,
            ms(200),
            ms(1),
        )
        .await;
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        assert!(out.iter().all(|o| generation_of(o) == Some(2)));

        // Revoked again at once: within the fleet-wide floor nobody fetches.
        let out = all_at_once(
            &members,
            Need::Refused(2),
            Some(held(2, LIFETIME)),
            &fetches,
            ms(200),
            ms(0),
        )
        .await;
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "the floor holds fleet-wide"
        );
        assert!(out.iter().all(|o| matches!(o, Outcome::Unchanged { .. })));

        // After the floor, one fetch again.
        tokio::time::advance(FORCE_FLOOR).await;
        let out = all_at_once(
            &members,
            Need::Refused(2),
            Some(held(2, LIFETIME)),
            &fetches,
            ms(200),
            ms(1),
        )
        .await;
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        assert!(out.iter().all(|o| generation_of(o) == Some(3)));

        // A 401 for an older generation while a newer one is visible: adopt, no fetch.
        let out = all_at_once(
            &members,
            Need::Refused(1),
            Some(held(1, LIFETIME)),
            &fetches,
            ms(200),
            ms(0),
        )
        .await;
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        assert!(out
            .iter()
            .all(|o| matches!(o, Outcome::Adopted { generation: 3, .. })));
        assert_eq!(sim.generation(), 3);
    }
}

#[cfg(test)]
mod unavailable {
    use super::tests_support::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn with_the_store_down_a_member_fetches_alone_only_in_the_last_10_percent() {
        let sim = Sim::new();
        sim.state.lock().unwrap().down = true;
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut m = member(&sim, 0, Duration::from_secs(3));
        async fn attempt(
            m: &Member,
            fetches: &Arc<AtomicUsize>,
            need: Need,
            held: Option<Held>,
        ) -> Outcome {
            let fetch = endpoint(fetches, Duration::from_millis(10));
            m.acquire(need, held, &|_| {}, fetch).await
        }
        for remaining in [LIFETIME / 2, LIFETIME / 9] {
            let out = attempt(&m, &fetches, Need::Scheduled, Some(held(4, remaining))).await;
            assert!(
                matches!(out, Outcome::Unchanged { give_up: false, .. }),
                "{out:?}"
            );
        }
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            0,
            "most of its life left: keep it"
        );
        let out = attempt(&m, &fetches, Need::Scheduled, Some(held(4, LIFETIME / 11))).await;
        assert!(
            matches!(
                out,
                Outcome::Fetched {
                    local: true,
                    generation: 5,
                    ..
                }
            ),
            "{out:?}"
        );
        let out = attempt(&m, &fetches, Need::Refused(5), Some(held(5, LIFETIME))).await;
        assert!(
            matches!(out, Outcome::Fetched { local: true, .. }),
            "{out:?}"
        );
        assert_eq!(fetches.load(Ordering::SeqCst), 2);

        m.on_unavailable = OnUnavailable::Hold;
        let out = attempt(&m, &fetches, Need::Scheduled, Some(held(6, LIFETIME / 20))).await;
        assert!(
            matches!(out, Outcome::Unchanged { give_up: false, .. }),
            "{out:?}"
        );
        let out = attempt(&m, &fetches, Need::Refused(6), Some(held(6, LIFETIME))).await;
        assert!(
            matches!(out, Outcome::Unchanged { give_up: true, .. }),
            "{out:?}"
        );
        let out = attempt(&m, &fetches, Need::Startup, None).await;
        assert!(matches!(out, Outcome::Unchanged { .. }), "{out:?}");
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "hold never fetches alone"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_lost_the_newest_entry_gets_the_held_token_back() {
        let sim = Sim::new();
        let fetches = Arc::new(AtomicUsize::new(0));
        let m = member(&sim, 0, Duration::from_secs(3));
        // A failover kept generation 1; this member holds generation 3.
        let old = m
            .acquire(
                Need::Startup,
                None,
                &|_| {},
                endpoint(&fetches, Duration::ZERO),
            )
            .await;
        assert!(
            matches!(old, Outcome::Fetched { generation: 1, .. }),
            "{old:?}"
        );
        let out = m
            .acquire(
                Need::Sync,
                Some(held(3, LIFETIME / 2)),
                &|_| {},
                endpoint(&fetches, Duration::ZERO),
            )
            .await;
        assert!(matches!(out, Outcome::Unchanged { .. }), "{out:?}");
        assert_eq!(sim.generation(), 3, "written back over the older entry");
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "no fetch to converge");
    }
}

#[cfg(test)]
mod properties {
    //! Random fleets: sizes, token endpoint latencies, `wait_for_peer`, start spreads.
    use super::tests_support::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

        #[test]
        fn one_fetch_per_generation_unless_the_endpoint_is_slower_than_wait_for_peer(
            n in 1usize..1000,
            delay_ms in 0u64..6000,
            wait_ms in 100u64..4000,
            stagger_ms in 0u64..500,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            rt.block_on(async {
                let sim = Sim::new();
                let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let members: Arc<Vec<Member>> = Arc::new(
                    (0..n).map(|i| member(&sim, i, Duration::from_millis(wait_ms))).collect(),
                );
                let ms = Duration::from_millis;
                let out = all_at_once(&members, Need::Startup, None, &fetches, ms(delay_ms), ms(stagger_ms)).await;
                let fetched = fetches.load(std::sync::atomic::Ordering::SeqCst);
                // A claimer slower than wait_for_peer looks stuck: one member takes over per
                // wait_for_peer it keeps everyone waiting.
                let bound = 1 + (delay_ms / wait_ms) as usize;
                prop_assert!(fetched >= 1 && fetched <= bound, "{fetched} fetches (bound {bound})");
                if delay_ms < wait_ms {
                    prop_assert_eq!(fetched, 1);
                }
                // Everyone converged on a token, and on the store's when nothing raced.
                prop_assert!(out.iter().all(|o| generation_of(o).is_some()));
                if fetched == 1 {
                    prop_assert!(out.iter().all(|o| generation_of(o) == Some(1)));
                }
                Ok(())
            })?;
        }
    }
}
