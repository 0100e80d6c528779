//! The token lifecycle through a running tokengate: scheduled refresh before expiry (not per
//! request), backoff and recovery while the token endpoint fails, the current token kept
//! through an outage until it expires and 503 `token_unavailable` after, requests waiting
//! for the first fetch in flight, the forced refresh and replay after a 401 (single-flight,
//! rate-limited, never for a 403), the 24 h cap on `expires_in`, and a token handed back
//! again by the endpoint.
//!
//! Tokens here live 2–3 s, so these tests take a few seconds each; they wait on the hub's
//! counters and on bounded loops, never on fixed sleeps, and assert no durations.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use tokengate::standin::{ApiReply, Hub, HubOptions, TokenReply};
use tokio::time::{sleep, timeout, Instant};

use support::{eventually, Tg};

/// How long any one wait in these tests may take before the test fails instead of hanging.
const LIMIT: Duration = Duration::from_secs(20);

async fn wait_token_requests(hub: &Hub, n: usize) {
    timeout(LIMIT, hub.wait_token_requests(n))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the hub saw {} token requests, not {n}, within {LIMIT:?}",
                hub.token_request_count()
            )
        });
}

async fn get(client: &reqwest::Client, tg: &Tg) -> reqwest::Response {
    client.get(tg.url("/v2/orders")).send().await.unwrap()
}

/// A token response that issues a real token the hub accepts for its own (long) lifetime,
/// while telling tokengate it expires in `seconds`.
fn issue_for(seconds: u64) -> TokenReply {
    TokenReply::Issue {
        expires_in: Some(json!(seconds)),
        token_type: Some(json!("Bearer")),
        created_at: None,
    }
}

fn server_error() -> TokenReply {
    TokenReply::json(
        500,
        &json!({"error": "server_error", "error_description": "database unavailable"}),
    )
}

fn refreshes(trigger: &'static str, result: &'static str) -> [(&'static str, &'static str); 2] {
    [("trigger", trigger), ("result", result)]
}

/// The bearer tokens the upstream received, in order.
fn upstream_tokens(hub: &Hub) -> Vec<String> {
    hub.api_requests()
        .into_iter()
        .map(|r| r.token.unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn refreshes_before_expiry_and_not_per_request() {
    let hub = support::hub_with(HubOptions {
        token_lifetime: Duration::from_secs(2),
        ..HubOptions::default()
    })
    .await;
    let tg = support::start(&hub, "").await;
    let client = support::client();

    let mut statuses = Vec::new();
    {
        let traffic = async {
            loop {
                statuses.push(get(&client, &tg).await.status().as_u16());
                sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            () = hub.wait_token_requests(4) => {}
            () = traffic => unreachable!(),
            () = sleep(LIMIT) => panic!("only {} token requests within {LIMIT:?}", hub.token_request_count()),
        }
    }

    // Every request got through with a token the upstream accepted: refreshed before it
    // expired, so never a 401 (which a replay would otherwise hide) and never a 503.
    assert!(statuses.iter().all(|s| *s == 200), "statuses: {statuses:?}");
    // Refreshed on a schedule, not per request: far more requests than token requests.
    assert!(
        statuses.len() >= 10 * 4,
        "{} requests for 4 token requests",
        statuses.len()
    );
    assert_eq!(
        tg.metric(
            "tokengate_unauthorized_replays_total",
            &[("result", "success")]
        )
        .await
            + tg.metric(
                "tokengate_unauthorized_replays_total",
                &[("result", "failure")]
            )
            .await,
        0.0,
        "a token was used after the upstream stopped accepting it"
    );
    assert_eq!(
        tg.metric(
            "tokengate_token_refreshes_total",
            &refreshes("unauthorized", "success")
        )
        .await,
        0.0
    );
    eventually("three scheduled refreshes succeed", LIMIT, || async {
        let n = tg
            .metric(
                "tokengate_token_refreshes_total",
                &refreshes("scheduled", "success"),
            )
            .await;
        (n >= 3.0).then_some(())
    })
    .await;

    // The upstream saw several tokens, each new one replacing the previous for good.
    let issued = hub.issued_tokens();
    let order: Vec<usize> = upstream_tokens(&hub)
        .iter()
        .map(|t| issued.iter().position(|i| i == t).unwrap())
        .collect();
    let distinct: BTreeSet<usize> = order.iter().copied().collect();
    assert!(distinct.len() >= 3, "tokens used: {distinct:?}");
    assert!(
        order.windows(2).all(|w| w[0] <= w[1]),
        "an older token was used again: {order:?}"
    );
}

#[tokio::test]
async fn backs_off_while_the_endpoint_fails_and_recovers() {
    let hub = support::hub().await;
    for _ in 0..3 {
        hub.push_token_reply(server_error());
    }
    let tg = support::start_toml(&support::toml_for(&hub, "")).await;

    // After the second attempt the first failure is recorded, and the third has not come
    // yet (retries are at least 1 s apart): not ready, and the reason says what failed.
    wait_token_requests(&hub, 2).await;
    assert!(!tg.running().is_ready());
    let (code, body) = tg.readyz().await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(body["not_ready"][0]["integration"], "oms");
    let reason = body["not_ready"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("HTTP 500"), "{reason}");

    wait_token_requests(&hub, 4).await;
    tg.ready().await;
    assert_eq!(hub.token_request_count(), 4);

    let metrics = tg.metrics().await;
    let m = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("integration", "oms")];
        all.extend_from_slice(labels);
        support::sample(&metrics, name, &all).unwrap()
    };
    let refreshes_total = "tokengate_token_refreshes_total";
    assert_eq!(m(refreshes_total, &refreshes("startup", "failure")), 3.0);
    assert_eq!(m(refreshes_total, &refreshes("startup", "success")), 1.0);
    assert_eq!(m(refreshes_total, &refreshes("scheduled", "failure")), 0.0);
    assert_eq!(m(refreshes_total, &refreshes("scheduled", "success")), 0.0);
    let errors = "tokengate_token_fetch_errors_total";
    assert_eq!(m(errors, &[("kind", "server_error")]), 3.0);
    assert_eq!(m(errors, &[("kind", "bad_response")]), 0.0);
    assert_eq!(m("tokengate_token_valid", &[]), 1.0);

    let status = tg.status().await;
    let oms = &status["integrations"][0];
    assert_eq!(oms["consecutive_failures"], 0);
    assert_eq!(oms["last_error"], Value::Null);

    let res = get(&support::client(), &tg).await;
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn keeps_the_current_token_through_an_outage_until_it_expires() {
    let hub = support::hub().await;
    // 5 s tokens refreshed at half-life: the first refresh fails ~2.5 s before expiry.
    hub.push_token_reply(issue_for(5));
    let tg = support::start(&hub, "refresh_at = 0.5").await;
    let first = hub.issued_tokens()[0].clone();
    // The endpoint fails from now on.
    for _ in 0..100 {
        hub.push_token_reply(server_error());
    }

    // The refresh failed, and the current token stays in use: still ready, still 200.
    wait_token_requests(&hub, 2).await;
    eventually("the failed refresh is recorded", LIMIT, || async {
        let failed = tg
            .metric(
                "tokengate_token_refreshes_total",
                &refreshes("scheduled", "failure"),
            )
            .await;
        (failed >= 1.0).then_some(())
    })
    .await;
    let client = support::client();
    let res = get(&client, &tg).await;
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    assert_eq!(tg.readyz().await.0, 200);

    // Then requests go on until it expires, and get 503 from then on.
    let deadline = Instant::now() + LIMIT;
    let unavailable = loop {
        assert!(Instant::now() < deadline, "no 503 within {LIMIT:?}");
        let res = get(&client, &tg).await;
        match res.status().as_u16() {
            200 => {}
            503 => break res,
            other => panic!("status {other} during the outage: {:?}", res.text().await),
        }
        sleep(Duration::from_millis(50)).await;
    };
    assert!(
        upstream_tokens(&hub).iter().all(|t| *t == first),
        "a token other than the first was used"
    );
    let held = tg.status().await["integrations"][0]["token"].clone();
    assert_eq!(
        held["valid"], false,
        "503 only once the token expired: {held}"
    );

    assert_eq!(
        unavailable.headers()["x-tokengate-error"],
        "token_unavailable"
    );
    let retry_after: u64 = unavailable.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    let body: Value = unavailable.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(body["integration"], "oms");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("token endpoint") && message.contains("HTTP 500"),
        "{message}"
    );

    let (code, ready) = tg.readyz().await;
    assert_eq!(code, 503);
    assert_eq!(ready["not_ready"][0]["integration"], "oms");
    let reason = ready["not_ready"][0]["reason"].as_str().unwrap();
    assert!(reason.contains("HTTP 500"), "{reason}");
    eventually("tokengate_token_valid drops to 0", LIMIT, || async {
        (tg.metric("tokengate_token_valid", &[]).await == 0.0).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_request_waits_for_the_first_fetch_in_flight() {
    let hub = support::hub().await;
    hub.push_token_reply(TokenReply::Delay(Duration::from_secs(1)));
    let prepared = support::prepare(&support::toml_for(&hub, "")).await;
    // A client already waiting when tokengate starts (its request is in the listener's
    // backlog before any task runs): the first fetch is due at once, so it waits for it.
    let early = support::raw_send(
        prepared.proxy,
        b"GET /v2/orders HTTP/1.1\r\nHost: oms\r\nConnection: close\r\n\r\n",
    )
    .await;
    let tg = prepared.start().await;
    let early = tokio::spawn(support::read_bytes(early));

    // And one certainly while the first token request is in flight (the hub delays it).
    wait_token_requests(&hub, 1).await;
    let during = get(&support::client(), &tg).await;
    let status = during.status();
    assert_eq!(status, 200, "{:?}", during.text().await);
    let early = support::RawResponse::parse(&early.await.unwrap());
    assert_eq!(
        early.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&early.body)
    );

    assert_eq!(hub.token_request_count(), 1);
    let token = &hub.issued_tokens()[0];
    let tokens = upstream_tokens(&hub);
    assert_eq!(tokens.len(), 2);
    assert!(tokens.iter().all(|t| t == token));
}

#[tokio::test]
async fn without_a_token_or_a_fetch_in_flight_the_answer_is_503_with_retry_after() {
    let hub = support::hub().await;
    // The endpoint asks for 30 s: no new attempt comes before then.
    hub.push_token_reply(TokenReply::Raw {
        status: 503,
        content_type: Some("text/html".into()),
        headers: vec![("retry-after".into(), "30".into())],
        body: Bytes::from_static(b"<html><title>Maintenance</title></html>"),
    });
    let tg = support::start_toml(&support::toml_for(&hub, "")).await;
    wait_token_requests(&hub, 1).await;
    eventually("the failed first attempt is recorded", LIMIT, || async {
        let status = tg.status().await;
        let oms = &status["integrations"][0];
        (oms["consecutive_failures"] == 1 && oms["fetching"] == false).then_some(())
    })
    .await;

    let res = get(&support::client(), &tg).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["x-tokengate-error"], "token_unavailable");
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // The seconds until the next attempt, which honours the endpoint's Retry-After.
    assert!((20..=30).contains(&retry_after), "{retry_after}");
    let body: Value = res.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("HTTP 503"), "{message}");
    // The request did not cause a token request of its own.
    assert_eq!(hub.token_request_count(), 1);
    assert_eq!(hub.api_request_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_forces_one_shared_refresh_and_replays() {
    let hub = support::hub().await;
    let tg = support::start(&hub, "").await;
    let client = support::client();
    let old = hub.issued_tokens()[0].clone();

    // A 403 is the upstream's answer about the request, never about the token.
    hub.push_api_reply(ApiReply::json(403, &json!({"error": "forbidden"})));
    let res = get(&client, &tg).await;
    assert_eq!(res.status(), 403);
    assert!(!res.headers().contains_key("x-tokengate-error"));
    assert_eq!(hub.token_request_count(), 1);

    // The key was regenerated: every request in flight gets a 401 for the old token.
    hub.revoke_all();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..10 {
        let client = client.clone();
        let url = tg.url("/v2/orders");
        set.spawn(async move {
            let req = if i % 2 == 0 {
                client.get(url)
            } else {
                client.post(url).body(format!("order-{i}"))
            };
            req.send().await.unwrap().status().as_u16()
        });
    }
    let statuses: Vec<u16> = set.join_all().await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");

    // Single flight: one token request for all of them.
    assert_eq!(hub.token_request_count(), 2);
    let new = hub.issued_tokens()[1].clone();
    let all = hub.api_requests();
    assert_eq!(all[0].token.as_ref(), Some(&old), "the 403");
    let recorded = &all[1..];
    let refused = recorded
        .iter()
        .filter(|r| r.token.as_ref() == Some(&old))
        .count();
    let served: Vec<_> = recorded
        .iter()
        .filter(|r| r.token.as_ref() == Some(&new))
        .collect();
    // Every request after the 403 carried the old or the new token.
    assert_eq!(recorded.len(), refused + served.len());
    assert!(refused >= 1);
    assert_eq!(served.len(), 10);
    // Replayed POSTs carried their bodies.
    let bodies: BTreeSet<String> = served
        .iter()
        .filter(|r| r.method == "POST")
        .map(|r| String::from_utf8(r.body.to_vec()).unwrap())
        .collect();
    let expected: BTreeSet<String> = (1..10).step_by(2).map(|i| format!("order-{i}")).collect();
    assert_eq!(bodies, expected);

    let metrics = tg.metrics().await;
    let m = |name: &str, labels: &[(&str, &str)]| {
        let mut all = vec![("integration", "oms")];
        all.extend_from_slice(labels);
        support::sample(&metrics, name, &all).unwrap()
    };
    let replays = "tokengate_unauthorized_replays_total";
    // Every request the upstream refused (the 403 excluded) was replayed successfully.
    assert_eq!(m(replays, &[("result", "success")]), refused as f64);
    assert_eq!(m(replays, &[("result", "failure")]), 0.0);
    assert_eq!(m(replays, &[("result", "not_replayable")]), 0.0);
    let refreshes_total = "tokengate_token_refreshes_total";
    assert_eq!(
        m(refreshes_total, &refreshes("unauthorized", "success")),
        1.0
    );
    assert_eq!(
        m(refreshes_total, &refreshes("unauthorized", "failure")),
        0.0
    );
    assert_eq!(m("tokengate_early_revocations_total", &[]), refused as f64);
}

/// A chunked body as clients stream it — many tiny chunks and a few large ones — is replayed
/// after a 401 byte for byte.
#[tokio::test]
async fn a_chunked_body_of_tiny_and_large_chunks_is_replayed_byte_for_byte() {
    let hub = support::hub().await;
    let tg = support::start(&hub, "").await;
    let mut body = Vec::new();
    let mut wire = Vec::new();
    for i in 0..300u32 {
        let chunk: Vec<u8> = if i % 100 == 50 {
            (0..20_000u32).map(|j| b'A' + (j % 26) as u8).collect()
        } else {
            format!("{i},").into_bytes()
        };
        wire.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        wire.extend_from_slice(&chunk);
        wire.extend_from_slice(b"\r\n");
        body.extend_from_slice(&chunk);
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let mut request = b"POST /v2/orders HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
        Connection: close\r\n\r\n"
        .to_vec();
    request.extend_from_slice(&wire);

    hub.revoke_all();
    let res = support::raw_response(tg.proxy, &request).await;
    assert_eq!(res.status, 200);
    let all = hub.api_requests();
    assert_eq!(all.len(), 2, "refused, then replayed");
    assert_eq!(all[0].token.as_ref(), Some(&hub.issued_tokens()[0]));
    assert_eq!(all[1].token.as_ref(), Some(&hub.issued_tokens()[1]));
    for seen in &all {
        assert_eq!(seen.body.len(), body.len());
        assert!(seen.body[..] == body[..], "the body arrived changed");
    }
}

#[tokio::test]
async fn a_body_larger_than_max_replay_body_gets_the_401_and_the_next_request_a_new_token() {
    let hub = support::hub().await;
    let tg = support::start(&hub, r#"max_replay_body = "1KiB""#).await;
    let client = support::client();

    hub.revoke_all();
    let res = client
        .post(tg.url("/v2/orders"))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    // The upstream's 401, passed on, not one of tokengate's errors.
    assert!(!res.headers().contains_key("x-tokengate-error"));
    assert_eq!(
        res.headers()["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
    assert_eq!(hub.api_requests()[0].body_len, 4096);

    // It still asked for a new token, for the requests that follow.
    wait_token_requests(&hub, 2).await;
    let res = get(&client, &tg).await;
    assert_eq!(res.status(), 200);
    assert_eq!(hub.token_request_count(), 2);
    let new = &hub.issued_tokens()[1];
    assert_eq!(upstream_tokens(&hub).last(), Some(new));

    assert_eq!(
        tg.metric(
            "tokengate_unauthorized_replays_total",
            &[("result", "not_replayable")]
        )
        .await,
        1.0
    );
    assert_eq!(
        tg.metric(
            "tokengate_token_refreshes_total",
            &refreshes("unauthorized", "success")
        )
        .await,
        1.0
    );
}

fn refused() -> ApiReply {
    ApiReply {
        status: 401,
        headers: vec![(
            "www-authenticate".into(),
            "Bearer error=\"invalid_token\"".into(),
        )],
        body: Bytes::from_static(br#"{"error":"invalid_token"}"#),
        skip_auth: true,
    }
}

/// An upstream that refuses every token (an app without the permission): the call is
/// replayed with a new token, refused again, replayed once more with the next forced token
/// (5 s later: the floor holds), then the 401 goes back. Forced fetches never come faster.
#[tokio::test]
async fn tokens_refused_again_and_again_are_passed_on_after_two_replays_5_s_apart() {
    let hub = support::hub().await;
    let tg = support::start(&hub, "").await;
    let client = support::client();

    for _ in 0..3 {
        hub.push_api_reply(refused());
    }
    let started = Instant::now();
    let res = get(&client, &tg).await;
    assert_eq!(res.status(), 401);
    assert!(!res.headers().contains_key("x-tokengate-error"));
    assert_eq!(hub.token_request_count(), 3);
    // The second forced fetch waited for the floor after the first, which came after the
    // request started: whatever the machine's speed, the call took at least 5 s.
    assert!(
        started.elapsed() >= Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let tokens = upstream_tokens(&hub);
    assert_eq!(tokens, hub.issued_tokens(), "each send used the next token");
    let replays = "tokengate_unauthorized_replays_total";
    assert_eq!(tg.metric(replays, &[("result", "failure")]).await, 1.0);
    assert_eq!(tg.metric(replays, &[("result", "success")]).await, 0.0);
    assert_eq!(
        tg.metric(
            "tokengate_token_refreshes_total",
            &refreshes("unauthorized", "success")
        )
        .await,
        2.0
    );

    // The newest token itself is fine.
    let res = get(&client, &tg).await;
    assert_eq!(res.status(), 200);
    assert_eq!(upstream_tokens(&hub).last(), Some(&hub.issued_tokens()[2]));
}

/// A second revocation one second after the first, inside the 5 s floor: the call it hits
/// waits for the next permitted forced refresh and is replayed, it does not fail.
#[tokio::test]
async fn a_401_inside_the_floor_waits_for_the_next_forced_refresh_and_is_replayed() {
    let hub = support::hub().await;
    let tg = support::start(&hub, "").await;
    let client = support::client();

    hub.revoke_all();
    let first = Instant::now();
    let res = client
        .post(tg.url("/v2/orders"))
        .body("order-1")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(hub.token_request_count(), 2);

    sleep(Duration::from_secs(1)).await;
    hub.revoke_all();
    let res = client
        .post(tg.url("/v2/orders"))
        .body("order-2")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    assert_eq!(
        hub.token_request_count(),
        3,
        "one forced fetch per revocation"
    );
    assert!(first.elapsed() >= Duration::from_secs(5), "the floor held");
    let last = hub.api_requests().pop().unwrap();
    assert_eq!(last.token.as_ref(), Some(&hub.issued_tokens()[2]));
    assert_eq!(&last.body[..], b"order-2", "replayed with its body");
    assert_eq!(
        tg.metric(
            "tokengate_unauthorized_replays_total",
            &[("result", "success")]
        )
        .await,
        2.0
    );
    assert_eq!(
        tg.metric(
            "tokengate_unauthorized_replays_total",
            &[("result", "failure")]
        )
        .await,
        0.0
    );
}

/// A 401 waits for the floor only while it fits in request_timeout: with a 2 s timeout, a
/// revocation 1 s after a forced refresh cannot be served (the next one is 4 s away) and the
/// 401 goes back at once, naming why in the log; the refusal still gets a new token later.
#[tokio::test]
async fn a_401_whose_request_timeout_ends_before_the_floor_gets_the_401() {
    let hub = support::hub().await;
    let tg = support::start(&hub, r#"request_timeout = "2s""#).await;
    let client = support::client();

    hub.revoke_all();
    assert_eq!(get(&client, &tg).await.status(), 200);
    hub.revoke_all();
    let res = get(&client, &tg).await;
    assert_eq!(res.status(), 401);
    assert_eq!(
        tg.metric(
            "tokengate_unauthorized_replays_total",
            &[("result", "failure")]
        )
        .await,
        1.0
    );
    // The refused token is still replaced once the floor ends, for the calls that follow.
    wait_token_requests(&hub, 3).await;
    assert_eq!(get(&client, &tg).await.status(), 200);
}

#[tokio::test]
async fn expires_in_over_24_hours_is_capped() {
    let hub = support::hub().await;
    hub.push_token_reply(issue_for(30 * 24 * 3600));
    let tg = support::start(&hub, "").await;
    let status = tg.status().await;
    let token = &status["integrations"][0]["token"];
    assert_eq!(token["lifetime_s"], 24 * 3600, "{token}");
    let expires_in = token["expires_in_s"].as_u64().unwrap();
    assert!(
        (24 * 3600 - 60..=24 * 3600).contains(&expires_in),
        "{expires_in}"
    );
    let expiry = tg
        .metric("tokengate_token_expiry_timestamp_seconds", &[])
        .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((expiry - now - 86400.0).abs() < 60.0, "{expiry} vs {now}");
}

#[tokio::test]
async fn a_token_handed_back_again_is_kept_with_its_new_lifetime() {
    let hub = support::hub().await;
    hub.push_token_reply(issue_for(2));
    let tg = support::start(&hub, "").await;
    let first = hub.issued_tokens()[0].clone();
    // Like Doorkeeper with reuse_access_token: the same token, a new (short) expires_in.
    hub.push_token_reply(TokenReply::json(
        200,
        &json!({"access_token": first, "token_type": "Bearer", "expires_in": 2}),
    ));

    let client = support::client();
    let generation = || async {
        tg.status().await["integrations"][0]["token"]["generation"]
            .as_u64()
            .unwrap()
    };
    let mut statuses = Vec::new();
    {
        // Requests keep flowing across both refreshes: the handed-back token's new lifetime
        // is honoured (the first one's 2 s would run out before the third token request).
        let traffic = async {
            loop {
                statuses.push(get(&client, &tg).await.status().as_u16());
                sleep(Duration::from_millis(50)).await;
            }
        };
        let refreshes_seen = async {
            wait_token_requests(&hub, 2).await;
            eventually("the handed-back token is accepted", LIMIT, || async {
                let n = tg
                    .metric(
                        "tokengate_token_refreshes_total",
                        &refreshes("scheduled", "success"),
                    )
                    .await;
                (n >= 1.0).then_some(())
            })
            .await;
            // The same token: not a new generation.
            assert_eq!(generation().await, 1);
            wait_token_requests(&hub, 3).await;
        };
        tokio::select! {
            () = refreshes_seen => {}
            () = traffic => unreachable!(),
        }
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses.len() > 10);

    let second = hub.issued_tokens()[1].clone();
    eventually(
        "the third token request brings a new token",
        LIMIT,
        || async { (generation().await == 2).then_some(()) },
    )
    .await;
    let res = get(&client, &tg).await;
    assert_eq!(res.status(), 200);
    let tokens = upstream_tokens(&hub);
    assert_eq!(tokens.last(), Some(&second));
    // Before the third token request only the first token was ever sent.
    let first_uses = tokens.iter().take_while(|t| **t == first).count();
    assert!(tokens[first_uses..].iter().all(|t| *t == second));
    assert!(first_uses >= 10);
}

#[tokio::test]
async fn an_absurd_retry_after_is_capped_and_the_refresher_lives_on() {
    let hub = support::hub().await;
    // A Retry-After that would overflow any clock.
    hub.push_token_reply(TokenReply::Raw {
        status: 429,
        content_type: None,
        headers: vec![("retry-after".into(), u64::MAX.to_string())],
        body: Bytes::new(),
    });
    let mut tg = support::start_toml(&support::toml_for(&hub, "")).await;
    wait_token_requests(&hub, 1).await;
    eventually("the failed first attempt is recorded", LIMIT, || async {
        let status = tg.status().await;
        let oms = &status["integrations"][0];
        (oms["consecutive_failures"] == 1 && oms["fetching"] == false).then_some(())
    })
    .await;
    let next = tg.status().await["integrations"][0]["next_attempt_in_s"]
        .as_u64()
        .unwrap();
    assert!((23 * 3600..=24 * 3600).contains(&next), "{next}");

    let res = get(&support::client(), &tg).await;
    assert_eq!(res.status(), 503);
    let retry_after: u64 = res.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (23 * 3600..=24 * 3600).contains(&retry_after),
        "{retry_after}"
    );
    let message = res.json::<Value>().await.unwrap()["message"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(message.contains("HTTP 429"), "{message}");

    // The refresher still answers: new token settings fetch a token at once.
    let mut config = tg.running().config().clone();
    config.integrations[0].token.scope = Some("orders".into());
    tg.running.as_mut().unwrap().reload(config);
    wait_token_requests(&hub, 2).await;
    tg.ready().await;
    assert_eq!(hub.token_requests()[1].params["scope"], "orders");
}
