//! Fleet mode against a real `redis-server` and the stand-in Delivery Hub in its revoking
//! mode (each issue revokes the client's previous token, as Doorkeeper's
//! `revoke_previous_client_credentials_token` does): replicas share one token, fetch once per
//! generation, adopt each other's tokens, survive Redis going away, and never put a token in
//! Redis in clear text.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::redis::Redis;
use support::{eventually, Tg};
use tokio::time::Instant;

fn fleet_toml(hub: &tokengate::standin::Hub, redis: &Redis, extra: &str) -> String {
    format!(
        "{}\n[fleet]\nredis_url = \"{}\"\nwait_for_peer = \"2s\"\n{extra}",
        support::toml_for(hub, ""),
        redis.url()
    )
}

async fn generation(tg: &Tg) -> u64 {
    tg.status().await["integrations"][0]["fleet"]["generation"]
        .as_u64()
        .unwrap_or(0)
}

/// GETs to each member in turn until `deadline`; (calls, failures described).
async fn traffic(members: &[&Tg], deadline: Instant) -> (u32, Vec<String>) {
    let client = support::client();
    let (mut calls, mut failed) = (0, Vec::new());
    while Instant::now() < deadline {
        for tg in members {
            calls += 1;
            match client.get(tg.url("/v2/orders")).send().await {
                Ok(r) if r.status() == 200 => {}
                Ok(r) => failed.push(format!("{} at {calls}", r.status())),
                Err(e) => failed.push(format!("{e} at {calls}")),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (calls, failed)
}

#[tokio::test]
async fn replicas_on_a_revoking_server_share_one_token_and_fetch_once_per_period() {
    let redis = Redis::start().await;
    let hub = support::hub().await;
    hub.set_revoke_on_issue(true);
    hub.set_token_lifetime(Duration::from_secs(4));
    let toml = fleet_toml(&hub, &redis, "");
    let a = support::start_toml(&toml).await;
    a.ready().await;
    let b = support::start_toml(&toml).await;
    let c = support::start_toml(&toml).await;
    b.ready().await;
    c.ready().await;
    assert_eq!(hub.token_request_count(), 1, "late members adopt, no fetch");

    let started = Instant::now();
    let (calls, failed) = traffic(&[&a, &b, &c], started + Duration::from_secs(12)).await;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        failed.is_empty(),
        "{} of {calls} failed: {failed:?}",
        failed.len()
    );
    // One fetch per refresh period (80 % of 4 s, plus jitter) fleet-wide, plus the first.
    let fetches = hub.token_request_count() as f64;
    let bound = 1.0 + (elapsed / 3.2).ceil() + 1.0;
    assert!(
        fetches <= bound,
        "{fetches} fetches in {elapsed:.1}s (bound {bound})"
    );
    eventually(
        "one generation across the fleet",
        Duration::from_secs(3),
        || async {
            let g = [
                generation(&a).await,
                generation(&b).await,
                generation(&c).await,
            ];
            (g[0] > 1 && g.iter().all(|x| *x == g[0])).then_some(())
        },
    )
    .await;
    // Redis holds no token in clear text.
    let stored = redis.everything().await;
    for token in hub.issued_tokens() {
        assert!(!stored.contains(&token), "a token in clear text in Redis");
    }
    assert!(!stored.contains("test-secret"));
    for tg in [a, b, c] {
        tg.stop().await;
    }
}
