//! Secret rotation and revocation without dropped calls: a `{ file = ... }` secret swapped the
//! way Kubernetes updates a mounted Secret, a new secret the endpoint rejects, revocation
//! thrash between two tokengates sharing one app, and a soak that revokes tokens at every
//! age (random moments, right after scheduled and forced refreshes, in quick pairs, with the
//! secret rotated).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokengate::standin::{Hub, HubOptions};
use tokio::time::Instant;

/// A Secret volume as the kubelet lays it out: `client_secret` → `..data/client_secret`,
/// `..data` → `..<version>`; an update writes a new version directory and swaps `..data`
/// atomically with a rename.
struct K8sSecret {
    dir: PathBuf,
    version: u32,
}

impl K8sSecret {
    fn new(dir: &Path, value: &str) -> K8sSecret {
        let mut s = K8sSecret {
            dir: dir.to_path_buf(),
            version: 0,
        };
        s.update(value);
        std::os::unix::fs::symlink("..data/client_secret", dir.join("client_secret")).unwrap();
        s
    }

    fn update(&mut self, value: &str) {
        self.version += 1;
        let version = format!("..2026_11_30_v{}", self.version);
        std::fs::create_dir(self.dir.join(&version)).unwrap();
        std::fs::write(
            self.dir.join(&version).join("client_secret"),
            format!("{value}\n"),
        )
        .unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn path(&self) -> PathBuf {
        self.dir.join("client_secret")
    }
}

/// One integration `oms` on `hub`, its secret read from `secret`.
fn toml(hub: &Hub, secret: &Path, extra: &str) -> String {
    support::toml_with_client(
        &hub.token_url(),
        &hub.base_url(),
        "rot-client",
        &format!("{{ file = \"{}\" }}", secret.display()),
        extra,
    )
}

async fn status(tg: &support::Tg) -> serde_json::Value {
    support::client()
        .get(tg.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits (bounded) until the integration holds a token of a generation above `after`.
async fn wait_generation_above(tg: &support::Tg, after: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(tg).await;
        let generation = s["integrations"][0]["token"]["generation"]
            .as_u64()
            .unwrap_or(0);
        if generation > after && s["integrations"][0]["token"]["valid"] == true {
            return s;
        }
        assert!(Instant::now() < deadline, "no new token: {s:#}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn secret_swapped_the_kubernetes_way_is_used_without_restart() {
    let hub = support::hub_with(HubOptions {
        client_id: Some("rot-client".into()),
        client_secret: Some("secret-one".into()),
        ..HubOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut secret = K8sSecret::new(dir.path(), "secret-one");
    let tg = support::start_toml(&toml(&hub, &secret.path(), "")).await;
    tg.ready().await;
    let before = status(&tg).await["integrations"][0]["token"]["generation"]
        .as_u64()
        .unwrap();

    // The key is regenerated in Delivery Hub (old token dead at once) and the Secret updated.
    hub.set_credentials(Some("rot-client".into()), Some("secret-two".into()));
    secret.update("secret-two");
    wait_generation_above(&tg, before).await;
    assert!(hub
        .token_requests()
        .iter()
        .any(|r| r.params.get("client_secret").map(String::as_str) == Some("secret-two")));

    // From the new token on, no replayable call fails.
    let client = support::client();
    for i in 0..40 {
        let res = if i % 2 == 0 {
            client.get(tg.url("/v2/orders")).send().await.unwrap()
        } else {
            client
                .post(tg.url("/v2/orders"))
                .body("{\"id\":1}")
                .send()
                .await
                .unwrap()
        };
        assert_eq!(res.status(), 200, "call {i}");
    }
    let metrics = tg.metrics().await;
    assert!(
        support::sample(
            &metrics,
            "tokengate_token_refreshes_total",
            &[("trigger", "credentials_changed"), ("result", "success")]
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn a_new_secret_the_endpoint_rejects_is_reported_and_the_old_token_stays() {
    let hub = support::hub_with(HubOptions {
        client_id: Some("rot-client".into()),
        client_secret: Some("secret-one".into()),
        ..HubOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut secret = K8sSecret::new(dir.path(), "secret-one");
    let tg = support::start_toml(&toml(&hub, &secret.path(), "")).await;
    tg.ready().await;

    // A typo in the new Secret: the endpoint refuses it; the old key still works upstream.
    let before = hub.token_request_count();
    secret.update("secret-typo");
    hub.wait_token_requests(before + 1).await;
    let metrics = support::wait_sample(
        &tg,
        "tokengate_token_fetch_errors_total",
        &[("kind", "invalid_client")],
        1.0,
    )
    .await;
    assert_eq!(
        support::sample(
            &metrics,
            "tokengate_token_refreshes_total",
            &[("trigger", "credentials_changed"), ("result", "failure")]
        ),
        Some(1.0)
    );
    let s = status(&tg).await;
    let last_error = s["integrations"][0]["last_error"].as_str().unwrap();
    assert!(last_error.contains("invalid_client"), "{last_error}");
    assert!(!s.to_string().contains("secret-typo"));
    let res = support::client()
        .get(tg.url("/v2/orders"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the old token stays in use");
    tg.stop().await;
}

/// A server that allows one live token per app, and two tokengates sharing the app: each
/// one's new token kills the other's. The thrash is named (log, /status, metric) and bounded
/// (at most one forced fetch per 5 s per process), never punished with longer waits.
#[tokio::test]
async fn revocation_thrash_between_two_tokengates_is_named_and_bounded() {
    let hub = support::hub().await;
    hub.set_revoke_on_issue(true);
    let a = support::start(&hub, "").await;
    let b = support::start(&hub, "").await;
    let client = support::client();
    let started = Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    let mut i = 0;
    // Until both have named it, or 40 s: three early revocations each take ~10–15 s.
    loop {
        let tg = if i % 2 == 0 { &a } else { &b };
        i += 1;
        let res = client.get(tg.url("/v2/orders")).send().await.unwrap();
        *statuses.entry(res.status().as_u16()).or_insert(0) += 1;
        let warned = |s: serde_json::Value| s["integrations"][0]["warning"].is_string();
        if (warned(a.status().await) && warned(b.status().await))
            || started.elapsed() > Duration::from_secs(40)
        {
            break;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // Startup, then at most one forced fetch per 5 s per process: fetches grow with time,
    // not with the number of calls.
    let bound = 2.0 + 2.0 * (elapsed / 5.0).ceil();
    let fetches = hub.token_request_count() as f64;
    assert!(
        fetches <= bound,
        "{fetches} token fetches in {elapsed:.1}s (bound {bound}) for {i} calls: {statuses:?}"
    );
    let early = support::sample(&a.metrics().await, "tokengate_early_revocations_total", &[])
        .unwrap()
        + support::sample(&b.metrics().await, "tokengate_early_revocations_total", &[]).unwrap();
    assert!(early >= 6.0, "early revocations are counted: {early}");
    // The likely cause and the fix are named (in the log once a minute, and in /status).
    for tg in [&a, &b] {
        let warning = tg.status().await["integrations"][0]["warning"].to_string();
        assert!(warning.contains("share this Delivery Hub app"), "{warning}");
        assert!(warning.contains("fleet mode"), "{warning}");
    }
    // Named, not punished: most calls were replayed and served.
    let ok = statuses.get(&200).copied().unwrap_or(0);
    assert!(ok * 2 > i, "{statuses:?}");
    a.stop().await;
    b.stop().await;
}

/// Traffic for the soak: four clients alternating GET and a 2 KiB POST until `deadline`;
/// returns the calls that succeeded and a description of each that did not.
async fn traffic(url: String, deadline: Instant) -> (u32, Vec<String>) {
    let mut clients = Vec::new();
    for c in 0..4u32 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let client = support::client();
            let (mut ok, mut failed) = (0u32, Vec::new());
            let mut i = 0u32;
            let body = "x".repeat(2048);
            while Instant::now() < deadline {
                i += 1;
                let res = if (i + c) % 2 == 0 {
                    client.get(&url).send().await
                } else {
                    client.post(&url).body(body.clone()).send().await
                };
                match res {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => failed.push(format!(
                        "{} {:?}",
                        r.status(),
                        r.headers().get("x-tokengate-error")
                    )),
                    Err(e) => failed.push(e.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        }));
    }
    let (mut ok, mut failed) = (0, Vec::new());
    for c in clients {
        let (o, f) = c.await.unwrap();
        ok += o;
        failed.extend(f);
    }
    (ok, failed)
}

/// Waits (bounded) until the hub has issued more than `n` tokens.
async fn wait_issued_above(hub: &Hub, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while hub.issued_tokens().len() <= n {
        assert!(Instant::now() < deadline, "no token issued after {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Revocations at every token age, as a server and an operator make them: at a random
/// moment, right after a scheduled refresh, right after a forced one, in pairs 1 s, 3 s and
/// 6 s apart, and with the secret rotated at the same moment, under concurrent GET and POST
/// traffic with 4 s tokens. No replayable call may fail, and token fetches stay within the
/// schedule plus one forced fetch per 5 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_at_any_token_age_lose_no_call() {
    let lifetime = Duration::from_secs(4);
    let hub = support::hub_with(HubOptions {
        client_id: Some("rot-client".into()),
        client_secret: Some("secret-1".into()),
        token_lifetime: lifetime,
        ..HubOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let mut secret = K8sSecret::new(dir.path(), "secret-1");
    let tg = support::start_toml(&toml(&hub, &secret.path(), "")).await;
    tg.ready().await;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(40);
    let load = tokio::spawn(traffic(tg.url("/v2/orders"), deadline));
    let pause = |ms: u64| tokio::time::sleep(Duration::from_millis(ms));
    let mut revocations = 0u32;
    let mut revoke = || {
        hub.revoke_all();
        revocations += 1;
    };

    // A random moment of the first token's life.
    pause(fastrand::u64(200..3000)).await;
    revoke();
    // Right after a scheduled refresh: wait for the forced token, then for the next one,
    // which comes on schedule.
    let issued = hub.issued_tokens().len();
    wait_issued_above(&hub, issued).await;
    let issued = hub.issued_tokens().len();
    wait_issued_above(&hub, issued).await;
    pause(50).await;
    revoke();
    // Right after the forced refresh that revocation causes.
    let issued = hub.issued_tokens().len();
    wait_issued_above(&hub, issued).await;
    revoke();
    // Pairs 1 s, 3 s and 6 s apart.
    for gap in [1000, 3000, 6000] {
        pause(2000).await;
        revoke();
        pause(gap).await;
        revoke();
    }
    // The key regenerated at Delivery Hub (its tokens die at once) and the Secret updated.
    pause(1500).await;
    hub.set_credentials(Some("rot-client".into()), Some("secret-2".into()));
    secret.update("secret-2");
    revocations += 1;

    let (ok, failed) = load.await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert!(ok > 500, "only {ok} calls succeeded");
    assert!(
        failed.is_empty(),
        "{} of {} calls failed after {revocations} revocations: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(10)]
    );
    // Fetches: the first, one per scheduled refresh (≥ 0.75 of the lifetime apart), one
    // forced fetch per 5 s at most, and the one for the rotated secret.
    let scheduled = (elapsed / (lifetime.as_secs_f64() * 0.75)).ceil();
    let forced = (elapsed / 5.0).ceil() + 1.0;
    let bound = 1.0 + scheduled + forced + 1.0;
    let fetches = hub.token_request_count() as f64;
    assert!(
        fetches <= bound,
        "{fetches} token fetches in {elapsed:.1}s (bound {bound})"
    );
    let metrics = tg.metrics().await;
    let replays = |result| {
        support::sample(
            &metrics,
            "tokengate_unauthorized_replays_total",
            &[("result", result)],
        )
        .unwrap()
    };
    assert!(replays("success") >= revocations as f64, "{metrics}");
    assert_eq!(replays("failure"), 0.0);
    assert!(hub
        .token_requests()
        .iter()
        .any(|r| r.params.get("client_secret").map(String::as_str) == Some("secret-2")));
    tg.stop().await;
}
