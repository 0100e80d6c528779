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
pub const FORCE_FLOOR: Duration = super::super::schedule::FORCE_INTERVAL;

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
                    let announced = self.wait_for_peer(seen, self.wait_for_peer).await;
                    // Notifications can be lost: look either way before taking over.
                    let read = self.read().await?;
                    if Self::answers(&read, need, held) {
                        return Ok(Step::Done(Self::adopt(read)));
                    }
                    seen = read.generation();
                    // No news within wait_for_peer: the holder may be stuck.
                    take_over = (!announced).then_some(holder);
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
        let started = tokio::time::Instant::now();
        let (issued, lifetime) = match fetch().await {
            Ok(ok) => ok,
            Err(e) => {
                let _ = self.backend.release(&self.id, &self.holder).await;
                return Outcome::Failed(e);
            }
        };
        // A fetch that took longer than a peer waits was stalled (a stopped process, a
        // starved one): peers took over and the token in hand is likely older than theirs.
        let stalled = started.elapsed() >= self.wait_for_peer;
        let held_generation = held.map_or(0, |h| h.generation);
        let mut expect = expect;
        let mut tries = 0;
        let (generation, local) = loop {
            // Never below what this member held: a store that lost its newest entry must not
            // make a 401 for the held generation look like one for an older token.
            let generation = expect.max(held_generation) + 1;
            let Some(entry) =
                self.entry(issued.access_token.expose(), generation, lifetime, lifetime)
            else {
                break (generation, false);
            };
            tries += 1;
            match self
                .backend
                .publish(&self.id, expect, entry, &self.holder)
                .await
            {
                Ok(Ok(())) => break (generation, false),
                Ok(Err(current)) if !stalled && tries < 3 => {
                    // A peer that took the claim over published while this member fetched;
                    // this token was issued after that peer's fetch began, so on a server that
                    // revokes the previous token it is the live one: publish on top.
                    expect = current;
                }
                Ok(Err(_)) => {
                    // Stalled past the peers' patience: converge on the fleet's token rather
                    // than overwrite it with an older one; if the server revoked it, the next
                    // 401 forces one more fetch.
                    match self.read().await {
                        Ok(read) if Self::answers(&read, need, held) => return Self::adopt(read),
                        _ => break (generation, false),
                    }
                }
                Err(e) => {
                    (self.report)(Event::BackendDown(e.0));
                    break (generation, true);
                }
            }
        };
        Outcome::Fetched {
            issued,
            generation,
            local,
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
#[path = "protocol_tests.rs"]
mod tests;
