//! The refresher's part in fleet mode: joining and leaving the fleet as the settings say, an
//! attempt as a round of the fleet protocol, adopting a peer's token, and following peers'
//! announcements and the store's reachability. The request path never sees any of it.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Attempted, Driver, Fetch};
use crate::telemetry::{FleetMetrics, Trigger};
use crate::token::client::{FetchError, Issued};
use crate::token::fleet::protocol::{self, Held, Member, Need, Via};
use crate::token::{FleetStatus, Token};

/// This integration's part in the fleet, while it is a member.
pub(super) struct Fleet {
    pub(super) member: Arc<Member>,
    pub(super) metrics: Arc<FleetMetrics>,
    pub(super) announced: watch::Receiver<u64>,
    pub(super) up: watch::Receiver<bool>,
    /// The highest announced generation an adoption was attempted for: an announcement whose
    /// entry does not open is not chased again and again.
    synced_to: u64,
    /// Re-read once idle: the store came back while an attempt was in flight.
    resync: bool,
    rejected_logged: Arc<AtomicBool>,
    /// The entry last counted as rejected (generation + 1).
    last_rejected: Arc<AtomicU64>,
}

impl Driver {
    /// Becomes a fleet member, leaves, or renews the member (a new secret seals differently)
    /// as the settings say.
    pub(super) fn join_fleet(&mut self) {
        let (Some(context), Some(settings)) = (&self.context, &self.settings.fleet) else {
            if self.settings.fleet.is_some() {
                warn!(integration = %self.name, "fleet is set for this integration but [fleet] was not configured when tokengate started; joining the fleet needs a restart");
            }
            self.fleet = None;
            self.handle.lock_status().fleet = None;
            return;
        };
        let member = Arc::new(context.hub.member(&self.settings, settings));
        let up = context.hub.up();
        let redis_up = *up.borrow();
        let mut announced = member.notified.clone();
        announced.mark_unchanged();
        let metrics = context.metrics.fleet(&self.name);
        let (synced_to, rejected_logged) = match self.fleet.take() {
            Some(old) if old.member.id == member.id => (old.synced_to, old.rejected_logged),
            _ => (0, Arc::new(AtomicBool::new(false))),
        };
        {
            let mut status = self.handle.lock_status();
            let previous = status.fleet.take().filter(|f| f.id == member.id);
            status.fleet = Some(FleetStatus {
                id: member.id.clone(),
                redis_up,
                ..previous.unwrap_or_default()
            });
        }
        self.fleet = Some(Fleet {
            member,
            metrics,
            announced,
            up,
            synced_to,
            resync: false,
            rejected_logged,
            last_rejected: Arc::new(AtomicU64::new(0)),
        });
    }

    /// Adopts a peer's newer token when one was announced and nothing is in flight.
    pub(super) fn maybe_sync(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let held = self.handle.held().map_or(0, |t| t.generation);
        let Some(fleet) = &mut self.fleet else {
            return;
        };
        let announced = *fleet.announced.borrow_and_update();
        let via = if announced > held && announced > fleet.synced_to {
            fleet.synced_to = announced;
            Via::Notification
        } else if fleet.resync {
            Via::Read
        } else {
            return;
        };
        fleet.resync = false;
        self.syncing = Some(via);
        self.start_fetch(self.next_trigger);
    }

    pub(super) fn on_fleet_up(&mut self, up: bool) {
        let Some(fleet) = &mut self.fleet else {
            return;
        };
        if let Some(status) = self.handle.lock_status().fleet.as_mut() {
            status.redis_up = up;
        }
        if up {
            // Notifications sent while the connection was down are lost: look, and give a
            // store that came back empty the token held.
            fleet.resync = true;
            self.maybe_sync();
        }
    }

    /// The attempt as a round of the fleet protocol.
    pub(super) fn fleet_attempt<F, Fut>(
        &self,
        fleet: &Fleet,
        trigger: Trigger,
        syncing: bool,
        fetch: F,
    ) -> Fetch
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(Issued, Duration), FetchError>> + Send + 'static,
    {
        let now = Instant::now();
        let held = self.handle.held().filter(|t| t.is_valid_at(now));
        let need = match trigger {
            _ if syncing => Need::Sync,
            Trigger::Unauthorized => Need::Refused(
                self.refused
                    .unwrap_or_else(|| held.as_ref().map_or(0, |t| t.generation)),
            ),
            Trigger::Startup if held.is_none() => Need::Startup,
            Trigger::Startup | Trigger::Scheduled => Need::Scheduled,
            Trigger::CredentialsChanged => Need::Credentials,
        };
        let held = held.map(|t| Held {
            generation: t.generation,
            lifetime: t.lifetime,
            remaining: t.expires_at.saturating_duration_since(now),
            token: Arc::from(t.access_token()),
        });
        let member = fleet.member.clone();
        let fleet_metrics = fleet.metrics.clone();
        let rejected_logged = fleet.rejected_logged.clone();
        let last_rejected = fleet.last_rejected.clone();
        let name = self.name.clone();
        let report = move |event: protocol::Event| match event {
            protocol::Event::Claim(result) => fleet_metrics.claim(trigger, result as usize),
            protocol::Event::Rejected(why, generation) => {
                // Generation + 1, so that a junk entry (generation 0) counts too.
                if last_rejected.swap(generation + 1, Ordering::Relaxed) == generation + 1 {
                    return;
                }
                fleet_metrics.rejected(why);
                if !rejected_logged.swap(true, Ordering::Relaxed) {
                    warn!(integration = %name, why, "the fleet entry in Redis does not open (sealed under another client secret, forged, or not written by tokengate); it is ignored and never used (logged once)");
                }
            }
            protocol::Event::BackendDown(_) | protocol::Event::BackendUp => {}
        };
        Box::pin(async move { Attempted::Fleet(member.acquire(need, held, &report, fetch).await) })
    }

    /// Takes a peer's token; `false` when it cannot be a header (never installed).
    pub(super) fn adopt(
        &self,
        token: &str,
        generation: u64,
        lifetime: Duration,
        remaining: Duration,
        by: String,
        via: Via,
    ) -> bool {
        let Some(token) = Token::adopted(token, generation, lifetime, remaining) else {
            warn!(integration = %self.name, "the fleet's token cannot be an HTTP header value; ignoring it");
            return false;
        };
        let expires_wall = token.expires_at_wall;
        if let Some(fleet) = &self.fleet {
            fleet.metrics.adopted(via as usize);
        }
        info!(
            integration = %self.name,
            generation,
            fetched_by = %by,
            via = match via { Via::Notification => "notification", Via::Read => "read" },
            expires_at = %humantime::format_rfc3339_seconds(expires_wall),
            "token adopted from the fleet"
        );
        self.install(token, Some(by));
        true
    }
}

/// Resolves when the watched value changes; never when there is nothing to watch or its
/// sender is gone.
pub(super) async fn changed<T: Clone>(rx: Option<&mut watch::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => match rx.changed().await {
            Ok(()) => Some(rx.borrow_and_update().clone()),
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}
