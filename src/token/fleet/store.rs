//! The Redis [`Backend`]: keys under `<prefix>:{<fleet id>}:` (the hash tag keeps one fleet's
//! keys in one slot), a claim and a forced-fetch floor as expiring strings, the publish as one
//! Lua script (compare-and-set on the generation, release of the claim, notification), and the
//! notification listener: one pub/sub connection per process whose state is
//! `tokengate_fleet_redis_up`.
//!
//! Commands go through redis-rs's connection manager (reconnects by itself) with short
//! timeouts: a slow or lost Redis must never hold a refresher for long, since the token held
//! keeps serving meanwhile.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::protocol::{Backend, BackendError, BoxFuture, Claim, Entry};
use crate::config::Fleet;
use crate::shutdown::Shutdown;

/// One command, connect included.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// The listener pings this often: a Redis that stopped answering (not only one that closed
/// the connection) is noticed.
const PING_EVERY: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

const CLAIM: &str = r"
local cur = redis.call('GET', KEYS[1])
if (not cur) or cur == ARGV[1] or (ARGV[3] ~= '' and cur == ARGV[3]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ''
end
return cur
";

const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
";

/// KEYS: entry, claim. ARGV: expect, generation, lifetime ms, ttl ms, sealed, by, holder,
/// channel, fleet id. Returns -1 when stored, else the generation found.
const PUBLISH: &str = r"
local cur = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0') or 0
if cur ~= tonumber(ARGV[1]) then return cur end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'gen', ARGV[2], 'life', ARGV[3], 'sealed', ARGV[5], 'by', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if redis.call('GET', KEYS[2]) == ARGV[7] then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[8], ARGV[9] .. ' ' .. ARGV[2])
return -1
";

/// The Redis a fleet shares.
pub struct RedisBackend {
    client: Client,
    conn: ConnectionManager,
    prefix: String,
    claim: Script,
    release: Script,
    publish: Script,
}

impl std::fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password.
        f.debug_struct("RedisBackend")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// Says what went wrong without the URL (it may hold a password), and what to check.
fn describe(e: &redis::RedisError) -> String {
    let auth = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS") | Some("NOAUTH"));
    let fix = if auth {
        "; Redis refused the credentials: check the user and password in fleet.redis_url"
    } else if e.code() == Some("NOPERM") || format!("{e}").contains("NoPerm") {
        "; the Redis ACL user lacks a permission: allow it the fleet's keys (~<key_prefix>:*), its channel (&<key_prefix>:*) and the commands listed in the README (Fleet mode, Security)"
    } else if e.is_timeout() {
        "; Redis did not answer in time"
    } else if e.is_connection_refusal() {
        "; nothing listens at fleet.redis_url's host and port"
    } else {
        ""
    };
    format!("{e}{fix}")
}

fn err(e: redis::RedisError) -> BackendError {
    BackendError(describe(&e))
}

impl RedisBackend {
    /// Builds the client; connects lazily, so an unreachable Redis at start is no error here.
    pub fn new(fleet: &Fleet) -> Result<RedisBackend, String> {
        let url = fleet.redis_url.value.expose();
        let client = match &fleet.ca_file {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| format!("cannot read fleet.ca_file {}: {e}", path.display()))?;
                Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
            None => Client::open(url),
        }
        .map_err(|e| format!("fleet.redis_url: {}", describe(&e)))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(COMMAND_TIMEOUT))
            .set_response_timeout(Some(COMMAND_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(MAX_BACKOFF);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| format!("fleet.redis_url: {}", describe(&e)))?;
        Ok(RedisBackend {
            client,
            conn,
            prefix: fleet.key_prefix.clone(),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            publish: Script::new(PUBLISH),
        })
    }

    pub fn key(&self, id: &str, what: &str) -> String {
        format!("{}:{{{id}}}:{what}", self.prefix)
    }

    pub fn channel(&self) -> String {
        format!("{}:published", self.prefix)
    }

    /// The claim's holder and remaining time, for `tokengate check --fetch`.
    pub async fn claim_holder(&self, id: &str) -> Result<Option<(String, Duration)>, BackendError> {
        let mut conn = self.conn.clone();
        let key = self.key(id, "claim");
        let (holder, pttl): (Option<String>, i64) = redis::pipe()
            .get(&key)
            .pttl(&key)
            .query_async(&mut conn)
            .await
            .map_err(err)?;
        Ok(holder.map(|h| (h, Duration::from_millis(pttl.max(0) as u64))))
    }

    /// Listens for publications until `shutdown`, reconnecting with backoff; `up` follows the
    /// connection, and each message raises the generation announced for its fleet id.
    pub async fn listen(
        self: Arc<Self>,
        up: watch::Sender<bool>,
        on_message: impl Fn(&str, u64) + Send + Sync,
        mut shutdown: Shutdown,
    ) {
        let channel = self.channel();
        let mut failures = 0u32;
        loop {
            let session = async {
                let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, self.client.get_async_pubsub())
                    .await
                    .map_err(|_| "Redis did not answer in time".to_string())?
                    .map_err(|e| describe(&e))?;
                let (mut sink, mut stream) = pubsub.split();
                tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(&channel))
                    .await
                    .map_err(|_| "Redis did not answer in time".to_string())?
                    .map_err(|e| describe(&e))?;
                failures = 0;
                if !*up.borrow() {
                    info!("fleet: connected to Redis");
                }
                up.send_replace(true);
                let mut ping = tokio::time::interval(PING_EVERY);
                ping.tick().await;
                loop {
                    tokio::select! {
                        msg = stream.next() => {
                            let Some(msg) = msg else {
                                return Err::<(), String>("Redis closed the connection".into());
                            };
                            let payload = msg.get_payload_bytes();
                            let text = std::str::from_utf8(payload).unwrap_or_default();
                            match text.rsplit_once(' ').and_then(|(id, g)| Some((id, g.parse().ok()?))) {
                                Some((id, generation)) => on_message(id, generation),
                                None => debug!("fleet: ignoring a malformed notification"),
                            }
                        }
                        _ = ping.tick() => {
                            // A subscribed connection answers PING with a message, not
                            // +PONG: any answer in time means alive.
                            let pong: Result<Result<redis::Value, _>, _> =
                                tokio::time::timeout(COMMAND_TIMEOUT, sink.ping()).await;
                            match pong {
                                Ok(Ok(_)) => {}
                                Ok(Err(e)) => return Err(describe(&e)),
                                Err(_) => return Err("Redis did not answer a ping in time".into()),
                            }
                        }
                    }
                }
            };
            let result = tokio::select! {
                r = session => r,
                _ = shutdown.wait() => return,
            };
            if let Err(e) = result {
                if *up.borrow() || failures == 0 {
                    warn!(error = %e, "fleet: Redis unreachable; the tokens held keep serving, and tokengate reconnects");
                }
                up.send_replace(false);
                failures += 1;
                let delay =
                    super::super::schedule::backoff(failures, fastrand::f64()).min(MAX_BACKOFF);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.wait() => return,
                }
            }
        }
    }
}

fn parse_u64(v: &Option<Vec<u8>>) -> Option<u64> {
    std::str::from_utf8(v.as_deref()?).ok()?.parse().ok()
}

impl Backend for RedisBackend {
    fn read(&self, id: &str) -> BoxFuture<'_, Result<Option<Entry>, BackendError>> {
        let key = self.key(id, "entry");
        let mut conn = self.conn.clone();
        Box::pin(async move {
            type Fields = (
                Option<Vec<u8>>,
                Option<Vec<u8>>,
                Option<Vec<u8>>,
                Option<Vec<u8>>,
            );
            let ((gen, life, sealed, by), pttl): (Fields, i64) = redis::pipe()
                .atomic()
                .cmd("HMGET")
                .arg(&key)
                .arg(&["gen", "life", "sealed", "by"])
                .pttl(&key)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            if gen.is_none() && sealed.is_none() {
                return Ok(None);
            }
            // Junk is an entry that does not open: generation 0 makes the reader reject it.
            Ok(Some(Entry {
                generation: parse_u64(&gen).unwrap_or(0),
                lifetime_ms: parse_u64(&life).unwrap_or(0),
                // -1: no expiry (not written by tokengate); the lifetime bounds it.
                remaining: match pttl {
                    -1 => Duration::MAX,
                    ms => Duration::from_millis(ms.max(0) as u64),
                },
                sealed: sealed.unwrap_or_default(),
                by: by
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
            }))
        })
    }

    fn claim(
        &self,
        id: &str,
        holder: &str,
        ttl: Duration,
        take_over: Option<&str>,
    ) -> BoxFuture<'_, Result<Claim, BackendError>> {
        let key = self.key(id, "claim");
        let holder = holder.to_owned();
        let take_over = take_over.unwrap_or_default().to_owned();
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let found: String = self
                .claim
                .key(&key)
                .arg(&holder)
                .arg(ttl.as_millis().max(1) as u64)
                .arg(&take_over)
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            Ok(if found.is_empty() {
                Claim::Won
            } else {
                Claim::HeldBy(found)
            })
        })
    }

    fn release(&self, id: &str, holder: &str) -> BoxFuture<'_, Result<(), BackendError>> {
        let key = self.key(id, "claim");
        let holder = holder.to_owned();
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let _: i64 = self
                .release
                .key(&key)
                .arg(&holder)
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            Ok(())
        })
    }

    fn floor(&self, id: &str, ttl: Duration) -> BoxFuture<'_, Result<bool, BackendError>> {
        let key = self.key(id, "forced");
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            Ok(set.is_some())
        })
    }

    fn publish(
        &self,
        id: &str,
        expect: u64,
        entry: Entry,
        holder: &str,
    ) -> BoxFuture<'_, Result<Result<(), u64>, BackendError>> {
        let entry_key = self.key(id, "entry");
        let claim_key = self.key(id, "claim");
        let holder = holder.to_owned();
        let id = id.to_owned();
        let channel = self.channel();
        let mut conn = self.conn.clone();
        Box::pin(async move {
            let found: i64 = self
                .publish
                .key(&entry_key)
                .key(&claim_key)
                .arg(expect)
                .arg(entry.generation)
                .arg(entry.lifetime_ms)
                .arg(entry.remaining.as_millis().clamp(1, u64::MAX as u128) as u64)
                .arg(&entry.sealed)
                .arg(&entry.by)
                .arg(&holder)
                .arg(&channel)
                .arg(&id)
                .invoke_async(&mut conn)
                .await
                .map_err(err)?;
            Ok(if found < 0 { Ok(()) } else { Err(found as u64) })
        })
    }
}
