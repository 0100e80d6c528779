//! Fleet mode: tokengate processes that hold one Delivery Hub app share one token through a
//! store (Redis), with one fetch per token generation across the fleet.
//!
//! Layout: [`seal`] encrypts entries under a key only holders of the client secret derive;
//! [`protocol`] is the claim / re-read / fetch / publish / adopt protocol over any
//! [`protocol::Backend`]; [`store`] is the Redis backend and its notification listener. The
//! [`Hub`] is the one per process: the backend, who this process is, the generation peers
//! announced per fleet id, and whether the store is reachable. Each integration's refresher
//! drives its [`protocol::Member`]; the request path never sees any of this.

pub mod protocol;
pub mod seal;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Fleet, FleetSettings, TokenSettings};
use crate::shutdown::Shutdown;
use protocol::Member;
use seal::Sealer;
use store::RedisBackend;

/// A claimer's claim outlives its longest token request by this much.
const CLAIM_MARGIN: Duration = Duration::from_secs(5);

/// The process's part in the fleet.
pub struct Hub {
    backend: Arc<RedisBackend>,
    /// `host/pid/random`: who fetched an entry, in `/status` and `check --fetch`.
    holder: Arc<str>,
    announced: Mutex<HashMap<String, watch::Sender<u64>>>,
    up: watch::Sender<bool>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("holder", &self.holder)
            .finish_non_exhaustive()
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

impl Hub {
    /// Builds the client; nothing connects yet, so an unreachable Redis is no start error.
    pub fn new(fleet: &Fleet) -> Result<Arc<Hub>, String> {
        let backend = Arc::new(RedisBackend::new(fleet)?);
        let holder = format!(
            "{}/{}/{:04x}",
            hostname(),
            std::process::id(),
            fastrand::u16(..)
        );
        Ok(Arc::new(Hub {
            backend,
            holder: holder.into(),
            announced: Mutex::new(HashMap::new()),
            up: watch::channel(false).0,
        }))
    }

    /// Whether the notification connection is up (`tokengate_fleet_redis_up`).
    pub fn up(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    fn announced(&self, id: &str) -> watch::Receiver<u64> {
        let mut map = self.announced.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(id.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Listens for peers' publications until `shutdown`.
    pub async fn listen(self: Arc<Self>, shutdown: Shutdown) {
        let hub = self.clone();
        let on_message = move |id: &str, generation: u64| {
            let map = hub.announced.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(tx) = map.get(id) {
                tx.send_if_modified(|g| {
                    let newer = generation > *g;
                    *g = (*g).max(generation);
                    newer
                });
            }
        };
        self.backend
            .clone()
            .listen(self.up.clone(), on_message, shutdown)
            .await;
    }

    /// The member an integration with `settings` is in the fleet.
    pub fn member(&self, settings: &TokenSettings, fleet: &FleetSettings) -> Member {
        Member {
            backend: self.backend.clone(),
            id: fleet.id.clone(),
            holder: self.holder.clone(),
            sealer: Sealer::new(settings.client_secret.value.expose(), &fleet.id),
            wait_for_peer: fleet.wait_for_peer,
            on_unavailable: fleet.on_unavailable,
            claim_ttl: settings.timeout + CLAIM_MARGIN,
            notified: self.announced(&fleet.id),
        }
    }
}
