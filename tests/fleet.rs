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

/// One integration on `hub` in a fleet on `url` (Redis, maybe with credentials), holding
/// (`on_unavailable = "hold"`) so that a Redis problem shows in `/readyz`.
fn holding_toml(hub: &tokengate::standin::Hub, url: &str) -> String {
    format!(
        "{}\n[fleet]\nredis_url = \"{url}\"\non_unavailable = \"hold\"\n",
        support::toml_for(hub, "")
    )
}

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

async fn fleet_of(n: usize, toml: &str) -> Vec<Tg> {
    let mut members = Vec::new();
    for _ in 0..n {
        let tg = support::start_toml(toml).await;
        tg.ready().await;
        members.push(tg);
    }
    members
}

async fn stop_all(members: Vec<Tg>) {
    for tg in members {
        tg.stop().await;
    }
}

#[tokio::test]
async fn a_revocation_mid_run_costs_one_fetch_fleet_wide_and_every_member_adopts_it() {
    let redis = Redis::start().await;
    let hub = support::hub().await;
    hub.set_revoke_on_issue(true);
    let members = fleet_of(4, &fleet_toml(&hub, &redis, "")).await;
    assert_eq!(hub.token_request_count(), 1);
    let client = support::client();
    for tg in &members {
        assert_eq!(
            client.get(tg.url("/v2/a")).send().await.unwrap().status(),
            200
        );
    }
    hub.revoke_all();
    // Every member meets the revoked token at once: one forced fetch for all of them.
    let calls = members.iter().map(|tg| client.get(tg.url("/v2/b")).send());
    for res in futures_util::future::join_all(calls).await {
        assert_eq!(
            res.unwrap().status(),
            200,
            "replayed with the fleet's new token"
        );
    }
    assert_eq!(
        hub.token_request_count(),
        2,
        "one fetch for the whole fleet"
    );
    let revoked_at = Instant::now();
    for tg in &members {
        eventually(
            "each member holds generation 2",
            Duration::from_secs(1),
            || async { (generation(tg).await == 2).then_some(()) },
        )
        .await;
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    let adopted: f64 = {
        let mut sum = 0.0;
        for tg in &members {
            sum += tg
                .metric(
                    "tokengate_fleet_adoptions_total",
                    &[("via", "notification")],
                )
                .await
                + tg.metric("tokengate_fleet_adoptions_total", &[("via", "read")])
                    .await;
        }
        sum
    };
    // Three adopted at start and three after the revocation.
    assert_eq!(adopted, 6.0);
    stop_all(members).await;
}

#[tokio::test]
async fn a_claimer_that_died_is_taken_over_by_one_member() {
    let redis = Redis::start().await;
    let hub = support::hub().await;
    // A claim held by a process that died mid-fetch, for a minute.
    redis
        .cmd(&[
            "SET",
            "tokengate:{shared}:claim",
            "ghost/1/dead",
            "PX",
            "60000",
        ])
        .await
        .unwrap();
    let toml = fleet_toml(&hub, &redis, "").replace("[fleet]", "fleet_id = \"shared\"\n[fleet]");
    let members: Vec<Tg> =
        futures_util::future::join_all((0..5).map(|_| support::start_toml(&toml))).await;
    for tg in &members {
        tg.ready().await;
    }
    // After wait_for_peer one member took the claim over and fetched; the others adopted.
    assert_eq!(hub.token_request_count(), 1);
    stop_all(members).await;
}

#[tokio::test]
async fn junk_and_forged_entries_are_rejected_and_never_injected() {
    let redis = Redis::start().await;
    let hub = support::hub().await;
    let toml = fleet_toml(&hub, &redis, "").replace("[fleet]", "fleet_id = \"shared\"\n[fleet]");
    let key = "tokengate:{shared}:entry";
    // Forged: a plausible entry whose seal was not made with the client secret.
    redis
        .cmd(&[
            "HSET",
            key,
            "gen",
            "41",
            "life",
            "60000",
            "sealed",
            "forged-token-in-clear",
            "by",
            "evil",
        ])
        .await
        .unwrap();
    redis.cmd(&["PEXPIRE", key, "60000"]).await.unwrap();
    let tg = support::start_toml(&toml).await;
    tg.ready().await;
    assert_eq!(
        tg.metric(
            "tokengate_fleet_entries_rejected_total",
            &[("why", "unseal_failed")]
        )
        .await,
        1.0
    );
    // It fetched and published on top of the forged generation.
    assert_eq!(hub.token_request_count(), 1);
    assert_eq!(generation(&tg).await, 42);
    let client = support::client();
    assert_eq!(
        client.get(tg.url("/v2/x")).send().await.unwrap().status(),
        200
    );
    let sent = hub.api_requests();
    let auth = sent.last().unwrap().headers["authorization"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(auth, format!("Bearer {}", hub.issued_tokens()[0]));

    // Junk: not even a number.
    redis.cmd(&["DEL", key]).await.unwrap();
    redis
        .cmd(&["HSET", key, "gen", "lots", "sealed", "x"])
        .await
        .unwrap();
    let second = support::start_toml(&toml).await;
    second.ready().await;
    assert_eq!(
        second
            .metric(
                "tokengate_fleet_entries_rejected_total",
                &[("why", "malformed")]
            )
            .await,
        1.0
    );
    assert_eq!(
        client
            .get(second.url("/v2/y"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    tg.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn redis_lost_and_restarted_empty_keeps_serving_and_converges_without_a_fetch() {
    let mut redis = Redis::start().await;
    let hub = support::hub().await;
    let members = fleet_of(2, &fleet_toml(&hub, &redis, "")).await;
    let client = support::client();
    assert_eq!(hub.token_request_count(), 1);
    redis.kill();
    for tg in &members {
        support::wait_sample(tg, "tokengate_fleet_redis_up", &[], 0.0).await;
        assert_eq!(
            client.get(tg.url("/v2/a")).send().await.unwrap().status(),
            200
        );
        assert_eq!(
            tg.readyz().await.0,
            200,
            "Redis never decides readiness while a token is held"
        );
    }
    redis.restart().await;
    for tg in &members {
        support::wait_sample(tg, "tokengate_fleet_redis_up", &[], 1.0).await;
    }
    // The held token is written back (the entry reappears); a new member adopts it, and
    // nobody fetched.
    eventually("the entry written back", Duration::from_secs(5), || async {
        let keys = redis.cmd(&["KEYS", "*:entry"]).await.unwrap_or_default();
        keys.contains("entry").then_some(())
    })
    .await;
    let late = support::start_toml(&fleet_toml(&hub, &redis, "")).await;
    late.ready().await;
    assert_eq!(hub.token_request_count(), 1);
    assert_eq!(generation(&late).await, 1);
    late.stop().await;
    stop_all(members).await;
}

#[tokio::test]
async fn without_redis_at_start_fetch_locally_serves_and_hold_stays_unready_naming_why() {
    let hub = support::hub().await;
    let nowhere = support::closed_port().await;
    let base = format!(
        "{}\n[fleet]\nredis_url = \"redis://{nowhere}\"\n",
        support::toml_for(&hub, "")
    );
    let local = support::start_toml(&base).await;
    local.ready().await;
    assert_eq!(
        local
            .metric("tokengate_fleet_local_fetches_total", &[])
            .await,
        1.0
    );
    assert_eq!(
        support::client()
            .get(local.url("/v2/a"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let held = support::start_toml(&format!("{base}on_unavailable = \"hold\"\n")).await;
    let (code, body) = eventually(
        "hold reports why it has no token",
        Duration::from_secs(10),
        || async {
            let (code, body) = held.readyz().await;
            body.to_string()
                .contains("unreachable")
                .then_some((code, body))
        },
    )
    .await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(hub.token_request_count(), 1, "hold fetched nothing");
    local.stop().await;
    held.stop().await;
}

#[tokio::test]
async fn a_wrong_redis_password_is_named() {
    let redis = Redis::start().await;
    redis
        .cmd(&["CONFIG", "SET", "requirepass", "right"])
        .await
        .unwrap();
    let hub = support::hub().await;
    let url = redis.url().replace("redis://", "redis://:wrong@");
    let toml = holding_toml(&hub, &url);
    let tg = support::start_toml(&toml).await;
    let body = eventually("the readiness reason", Duration::from_secs(10), || async {
        let body = tg.readyz().await.1.to_string();
        body.contains("fleet.redis_url").then_some(body)
    })
    .await;
    assert!(body.contains("credentials"), "{body}");
    assert!(!body.contains("wrong"), "the password stays out: {body}");
    tg.stop().await;
}

/// A tokengate process of the fleet: its proxy and admin ports.
struct Process {
    proc: support::process::Proc,
    proxy: u16,
    admin: u16,
}

async fn spawn_process(
    dir: &std::path::Path,
    n: usize,
    hub: &tokengate::standin::Hub,
    redis: &Redis,
) -> Process {
    use support::process::{free_port, Proc};
    let (proxy, admin) = (free_port(), free_port());
    let path = dir.join(format!("tokengate-{n}.toml"));
    let text = format!(
        "[server]\nadmin_listen = \"127.0.0.1:{admin}\"\nshutdown_grace = \"2s\"\n\n[fleet]\nredis_url = {{ env = \"TG_REDIS\" }}\nwait_for_peer = \"2s\"\n\n[[integration]]\nname = \"oms\"\nlisten = \"127.0.0.1:{proxy}\"\ntoken_url = \"{}\"\nupstream = \"{}\"\nclient_id = \"test-client\"\nclient_secret = {{ env = \"TG_SECRET\" }}\ntoken_timeout = \"3s\"\n",
        hub.token_url(),
        hub.base_url()
    );
    std::fs::write(&path, text).unwrap();
    let mut command = tokio::process::Command::new(support::process::BIN);
    command
        .args(["--config", path.to_str().unwrap()])
        .env("TOKENGATE_LOG", "info")
        .env("TG_REDIS", redis.url())
        .env("TG_SECRET", "test-secret");
    let mut proc = Proc::start(command);
    proc.wait_for("admin endpoints").await;
    let process = Process { proc, proxy, admin };
    eventually("the process is ready", Duration::from_secs(10), || async {
        let res = support::client()
            .get(format!("http://127.0.0.1:{}/readyz", process.admin))
            .send()
            .await
            .ok()?;
        (res.status() == 200).then_some(())
    })
    .await;
    process
}

async fn process_generation(p: &Process) -> u64 {
    let status: serde_json::Value = support::client()
        .get(format!("http://127.0.0.1:{}/status", p.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    status["integrations"][0]["fleet"]["generation"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test]
async fn processes_and_members_share_one_token_through_revocations_restarts_and_a_stopped_member() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;

    let redis = Redis::start().await;
    let hub = support::hub().await;
    hub.set_revoke_on_issue(true);
    hub.set_token_lifetime(Duration::from_secs(6));
    let dir = tempfile::tempdir().unwrap();
    let mut processes = Vec::new();
    for n in 0..3 {
        processes.push(spawn_process(dir.path(), n, &hub, &redis).await);
    }
    let toml = fleet_toml(&hub, &redis, "");
    let mut members = fleet_of(100, &toml).await;
    assert_eq!(
        hub.token_request_count(),
        1,
        "everyone after the first adopted"
    );

    let started = Instant::now();
    let client = support::client();
    let mut urls: Vec<String> = processes
        .iter()
        .map(|p| format!("http://127.0.0.1:{}/v2/orders", p.proxy))
        .collect();
    let (mut calls, mut failed) = (0u32, Vec::new());
    let call_all = |urls: Vec<String>| {
        let client = client.clone();
        async move {
            let mut out = Vec::new();
            for url in urls {
                out.push(match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => None,
                    Ok(r) => Some(format!("{} from {url}", r.status())),
                    Err(e) => Some(format!("{e} from {url}")),
                });
            }
            out
        }
    };
    let member_urls = |members: &[Tg]| {
        members
            .iter()
            .map(|m| m.url("/v2/orders"))
            .collect::<Vec<_>>()
    };
    let mut fetches_before_revocation = 0;
    let mut revoked = false;
    let mut restarted = false;
    let mut stopped = None;
    while started.elapsed() < Duration::from_secs(60) {
        let t = started.elapsed();
        if t > Duration::from_secs(8) && !revoked {
            // A revocation mid-run: one fetch for the whole fleet.
            revoked = true;
            fetches_before_revocation = hub.token_request_count();
            hub.revoke_all();
        }
        if t > Duration::from_secs(14) && !restarted {
            // A rolling restart of members: the new ones adopt.
            restarted = true;
            let before = hub.token_request_count();
            for _ in 0..4 {
                members.remove(0).stop().await;
                let tg = support::start_toml(&toml).await;
                tg.ready().await;
                members.push(tg);
            }
            assert!(
                hub.token_request_count() <= before + 1,
                "a rolling restart fetches nothing (a scheduled refresh may fall into it)"
            );
        }
        if t > Duration::from_secs(18) && stopped.is_none() {
            // A process stops answering (SIGSTOP) for longer than a refresh period.
            let p = &processes[0];
            kill(
                Pid::from_raw(p.proc.child.id().unwrap() as i32),
                Signal::SIGSTOP,
            )
            .unwrap();
            urls.retain(|u| !u.contains(&format!(":{}/", p.proxy)));
            stopped = Some(Instant::now());
        }
        if stopped.is_some_and(|s| s.elapsed() > Duration::from_secs(7)) && urls.len() < 3 {
            let p = &processes[0];
            kill(
                Pid::from_raw(p.proc.child.id().unwrap() as i32),
                Signal::SIGCONT,
            )
            .unwrap();
            urls.insert(0, format!("http://127.0.0.1:{}/v2/orders", p.proxy));
        }
        let mut all = urls.clone();
        all.extend(member_urls(&members));
        for f in call_all(all.clone()).await.into_iter().flatten() {
            failed.push(format!("{f} at {:.1}s", started.elapsed().as_secs_f64()));
        }
        calls += all.len() as u32;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if revoked && fetches_before_revocation > 0 && started.elapsed() < Duration::from_secs(9) {
            assert!(
                hub.token_request_count() <= fetches_before_revocation + 1,
                "one fetch per revocation"
            );
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        failed.is_empty(),
        "{} of {calls} calls failed: {failed:?}",
        failed.len()
    );
    // One fetch per refresh period (≥ 80 % of 6 s) fleet-wide, the first, the revocation,
    // and at most one for the stopped process.
    let fetches = hub.token_request_count() as f64;
    let bound = 1.0 + (elapsed / 4.8).ceil() + 1.0 + 1.0;
    assert!(
        fetches <= bound,
        "{fetches} token fetches in {elapsed:.0}s (bound {bound}) for {calls} calls"
    );
    // Converged: every process and member on one generation.
    eventually(
        "one generation everywhere",
        Duration::from_secs(3),
        || async {
            let mut gens = Vec::new();
            for p in &processes {
                gens.push(process_generation(p).await);
            }
            for m in &members {
                gens.push(generation(m).await);
            }
            gens.iter().all(|g| *g == gens[0] && *g > 1).then_some(())
        },
    )
    .await;
    // No token or secret in Redis, nor in any process's log.
    let stored = redis.everything().await;
    let tokens = hub.issued_tokens();
    for token in &tokens {
        assert!(!stored.contains(token.as_str()));
    }
    for mut p in processes {
        p.proc.signal(Signal::SIGTERM);
        assert_eq!(p.proc.exit_code().await, 0);
        let log = p.proc.seen.join("\n");
        for token in &tokens {
            assert!(!log.contains(token.as_str()), "a token in the log");
        }
        assert!(!log.contains("test-secret"));
        // Connected throughout (the listener's pings every 5 s are answered).
        assert!(!log.contains("Redis unreachable"), "{log}");
        assert!(
            !log.contains(&redis.url()[8..]) || !log.contains("redis://"),
            "no Redis URL in the log"
        );
    }
    stop_all(members).await;
}

/// The README's ACL line, with `password` in place of its placeholder.
fn readme_acl(password: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
            .unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("ACL SETUSER tokengate "))
        .expect("the README shows the ACL user");
    line.replace("LONG-RANDOM-PASSWORD", password)
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[tokio::test]
async fn the_readme_acl_user_is_enough_and_a_user_without_it_is_named() {
    let redis = Redis::start().await;
    let acl = readme_acl("pw-for-fleet");
    let args: Vec<&str> = acl.iter().map(String::as_str).collect();
    let reply = redis.cmd(&args).await.unwrap();
    assert!(reply.starts_with("+OK"), "{reply}");
    let hub = support::hub().await;
    let url = redis
        .url()
        .replace("redis://", "redis://tokengate:pw-for-fleet@");
    let toml = holding_toml(&hub, &url);
    let members = fleet_of(2, &toml).await;
    assert_eq!(
        hub.token_request_count(),
        1,
        "published and adopted with the ACL user"
    );
    hub.revoke_all();
    for tg in &members {
        let res = support::client().get(tg.url("/v2/a")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(hub.token_request_count(), 2);
    stop_all(members).await;

    // A user limited to other keys: the error names the permission.
    redis
        .cmd(&[
            "ACL",
            "SETUSER",
            "other",
            "on",
            ">pw",
            "resetkeys",
            "~other:*",
            "+@all",
        ])
        .await
        .unwrap();
    let url = redis.url().replace("redis://", "redis://other:pw@");
    let toml = holding_toml(&hub, &url);
    let tg = support::start_toml(&toml).await;
    let body = eventually("the readiness reason", Duration::from_secs(10), || async {
        let body = tg.readyz().await.1.to_string();
        body.contains("ACL").then_some(body)
    })
    .await;
    assert!(!body.contains("pw"), "{body}");
    tg.stop().await;
}

#[tokio::test]
async fn rediss_with_a_private_ca_works_and_without_it_is_refused() {
    let ca = support::TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = ca.leaf_pem(&["localhost"]);
    let (cert_path, key_path) = (dir.path().join("redis.pem"), dir.path().join("redis.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    let ca_path = ca.write_pem(dir.path());
    let redis = Redis::start_tls(&cert_path, &key_path).await;
    let hub = support::hub().await;
    let url = format!("rediss://localhost:{}", redis.port);
    let with_ca = format!(
        "{}\n[fleet]\nredis_url = \"{url}\"\nca_file = \"{}\"\non_unavailable = \"hold\"\n",
        support::toml_for(&hub, ""),
        ca_path.display()
    );
    let members = fleet_of(2, &with_ca).await;
    assert_eq!(hub.token_request_count(), 1, "shared over TLS");
    stop_all(members).await;

    let without = format!(
        "{}\n[fleet]\nredis_url = \"{url}\"\non_unavailable = \"hold\"\n",
        support::toml_for(&hub, "")
    );
    let tg = support::start_toml(&without).await;
    let body = eventually("the readiness reason", Duration::from_secs(10), || async {
        let body = tg.readyz().await.1.to_string();
        body.contains("unreachable").then_some(body)
    })
    .await;
    assert!(body.to_lowercase().contains("certificate"), "{body}");
    tg.stop().await;
}

#[tokio::test]
async fn a_rotated_secret_reseals_and_members_on_the_new_secret_share_one_fetch() {
    let redis = Redis::start().await;
    let hub = support::hub().await;
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = (0..2)
        .map(|i| dir.path().join(format!("secret-{i}")))
        .collect();
    let mut members = Vec::new();
    for file in &files {
        std::fs::write(file, "old-secret\n").unwrap();
        let toml = fleet_toml(&hub, &redis, "").replace(
            "client_secret = \"test-secret\"",
            &format!("client_secret = {{ file = \"{}\" }}", file.display()),
        );
        let tg = support::start_toml(&toml).await;
        tg.ready().await;
        members.push(tg);
    }
    assert_eq!(hub.token_request_count(), 1);
    // The key is regenerated at Delivery Hub (the old key and its tokens die), and the new
    // one reaches both replicas' mounted Secrets.
    hub.set_credentials(None, Some("new-secret".into()));
    for file in &files {
        std::fs::write(file, "new-secret\n").unwrap();
    }
    for tg in &members {
        eventually(
            "the replica serves with a token for the new key",
            Duration::from_secs(10),
            || async {
                let res = support::client().get(tg.url("/v2/a")).send().await.ok()?;
                (res.status() == 200).then_some(())
            },
        )
        .await;
    }
    let new_key_fetches = hub
        .token_requests()
        .iter()
        .filter(|r| r.params.get("client_secret").map(String::as_str) == Some("new-secret"))
        .count();
    assert_eq!(
        new_key_fetches, 1,
        "one fetch with the new key for the fleet"
    );
    assert_eq!(generation(&members[0]).await, generation(&members[1]).await);
    stop_all(members).await;
}

#[tokio::test]
async fn check_shows_the_fleet_and_check_fetch_reports_the_entry_never_the_token() {
    let redis = Redis::start().await;
    redis
        .cmd(&["CONFIG", "SET", "requirepass", "hunter2-pw"])
        .await
        .unwrap();
    let hub = support::hub().await;
    let url = redis.url().replace("redis://", "redis://:hunter2-pw@");
    let toml = format!(
        "{}\n[fleet]\nredis_url = \"{url}\"\n",
        support::toml_for(&hub, "fleet_id = \"oms-prod\"")
    );
    let tg = support::start_toml(&toml).await;
    tg.ready().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.toml");
    let file = toml
        .replace("{admin}", "127.0.0.1:0")
        .replace("{listen0}", "127.0.0.1:0");
    std::fs::write(&path, file).unwrap();
    let path = path.to_str().unwrap();

    let (code, out, err) = support::process::output(&["check", "--config", path]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("fleet: Redis at redis://127.0.0.1:{}", redis.port)),
        "{out}"
    );
    assert!(out.contains("oms-prod"), "{out}");

    let (code, out, err) = support::process::output(&["check", "--fetch", "--config", path]).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("oms (fleet oms-prod): generation 1"), "{out}");
    assert!(out.contains("opens with this client_secret"), "{out}");
    assert!(out.contains("no claim"), "{out}");
    let all = format!("{out}{err}");
    assert!(!all.contains("hunter2-pw"), "no Redis password: {all}");
    for token in hub.issued_tokens() {
        assert!(!all.contains(&token), "no token");
    }
    tg.stop().await;
}

#[tokio::test]
async fn a_redis_that_stops_answering_never_stops_the_calls() {
    let redis = Redis::start().await;
    let hub = support::hub().await;
    let members = fleet_of(2, &fleet_toml(&hub, &redis, "")).await;
    let client = support::client();
    // SIGSTOP: connections stay open, nothing answers (a slow or hung Redis).
    redis.pause(true);
    for tg in &members {
        support::wait_sample(tg, "tokengate_fleet_redis_up", &[], 0.0).await;
    }
    for tg in &members {
        assert_eq!(
            client.get(tg.url("/v2/a")).send().await.unwrap().status(),
            200
        );
        assert_eq!(tg.readyz().await.0, 200);
    }
    // A 401 while Redis hangs: a local forced fetch (fetch_locally), the call replayed.
    hub.revoke_all();
    let res = client.get(members[0].url("/v2/b")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    redis.pause(false);
    for tg in &members {
        support::wait_sample(tg, "tokengate_fleet_redis_up", &[], 1.0).await;
    }
    stop_all(members).await;
}

#[tokio::test]
async fn a_claimer_stopped_mid_fetch_past_its_claim_costs_one_extra_fetch_and_the_fleet_converges()
{
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    use tokengate::standin::TokenReply;

    let redis = Redis::start().await;
    let hub = support::hub().await;
    hub.set_revoke_on_issue(true);
    let dir = tempfile::tempdir().unwrap();
    let mut processes = Vec::new();
    for n in 0..3 {
        processes.push(spawn_process(dir.path(), n, &hub, &redis).await);
    }
    assert_eq!(hub.token_request_count(), 1);
    let pid = |p: &Process| p.proc.child.id().unwrap();
    let url = |p: &Process| format!("http://127.0.0.1:{}/v2/orders", p.proxy);

    // The token dies; the next token request is slow (1.5 s), so its claimer can be caught
    // mid-fetch, and stopped there past its claim (token_timeout 3 s + 5 s).
    hub.push_token_reply(TokenReply::Delay(Duration::from_millis(1500)));
    hub.revoke_all();
    let first = tokio::spawn(support::client().get(url(&processes[0])).send());
    let claimer = eventually(
        "a process claims the fetch",
        Duration::from_secs(5),
        || async {
            let reply = redis.cmd(&["KEYS", "*:claim"]).await?;
            let key = reply.lines().find(|l| l.ends_with(":claim"))?.to_owned();
            let holder = redis.cmd(&["GET", &key]).await?;
            processes
                .iter()
                .position(|p| holder.contains(&format!("/{}/", pid(p))))
        },
    )
    .await;
    // Mid-fetch: its token request has reached the endpoint, which holds the answer 1.5 s.
    // The claim is taken before the request is sent, so seeing the claim is not enough (a run
    // that stopped the process in between counted one fetch fewer than this scenario's).
    eventually(
        "the claimer's token request reaches the endpoint",
        Duration::from_secs(5),
        || async { (hub.token_request_count() >= 2).then_some(()) },
    )
    .await;
    let stopped = &processes[claimer];
    kill(
        Pid::from_raw(stopped.proc.child.id().unwrap() as i32),
        Signal::SIGSTOP,
    )
    .unwrap();
    // The others' calls meet the revoked token too: they wait for the floor and the claim,
    // take the claim over from the stopped process, fetch once, and are replayed.
    let others: Vec<_> = processes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != claimer)
        .map(|(_, p)| tokio::spawn(support::client().get(url(p)).send()))
        .collect();
    for call in others {
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
    tokio::time::sleep(Duration::from_secs(9)).await; // past the stopped claimer's claim
    kill(
        Pid::from_raw(stopped.proc.child.id().unwrap() as i32),
        Signal::SIGCONT,
    )
    .unwrap();
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    // The stopped claimer's fetch and the take-over: one extra fetch, no more.
    assert_eq!(
        hub.token_request_count(),
        3,
        "1 at start, the stopped claimer's, the take-over"
    );
    eventually("the fleet converges", Duration::from_secs(5), || async {
        let mut gens = Vec::new();
        for p in &processes {
            gens.push(process_generation(p).await);
        }
        (gens.iter().all(|g| *g == gens[0])).then_some(())
    })
    .await;
    for p in &processes {
        assert_eq!(
            support::client().get(url(p)).send().await.unwrap().status(),
            200
        );
    }
    assert_eq!(
        hub.token_request_count(),
        3,
        "converged without another fetch"
    );
}
