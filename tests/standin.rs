//! The Delivery Hub stand-in (`tokengate::standin`): token endpoint encodings and checks,
//! API token checks, scripted replies, test routes, HTTP/2 (h2c and TLS with ALPN), and
//! shutdown. Each test binds its own `127.0.0.1:0` hub.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tokengate::standin::{ApiReply, Hub, HubOptions, TokenReply};
use tokio::net::TcpListener;

async fn start(opts: HubOptions) -> Hub {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    Hub::start(listener, opts).await.unwrap()
}

fn client_tls(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    // A preconfigured config is used as is by reqwest: offer h2 ourselves.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// A plain-HTTP client: no proxy from the environment, redirects not followed.
fn client() -> reqwest::Client {
    builder(rustls::RootCertStore::empty()).build().unwrap()
}

fn builder(roots: rustls::RootCertStore) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .use_preconfigured_tls(client_tls(roots))
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
}

async fn form_token(client: &reqwest::Client, hub: &Hub, id: &str, secret: &str) -> String {
    let response = client
        .post(hub.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", id),
            ("client_secret", secret),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn form_token_then_api_call_echoes() {
    let hub = start(HubOptions::default()).await;
    let client = client();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let response = client
        .post(hub.token_url())
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "oms"),
            ("client_secret", "s3cret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let body: Value = response.json().await.unwrap();
    let token = body["access_token"].as_str().unwrap().to_owned();
    assert_eq!(token.len(), 43);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert!(body["created_at"].as_u64().unwrap() >= before);
    assert_eq!(hub.issued_tokens(), vec![token.clone()]);

    let recorded = hub.token_requests();
    assert_eq!(hub.token_request_count(), 1);
    assert_eq!(recorded[0].encoding, "form");
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path, "/oauth/token");
    assert_eq!(recorded[0].params["client_secret"], "s3cret");
    assert_eq!(recorded[0].basic, None);

    let response = client
        .post(format!("{}/v2/orders?page=2", hub.base_url()))
        .bearer_auth(&token)
        .header("x-request-id", "req-1")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "req-1");
    assert_eq!(response.headers()["ratelimit-limit"], "300");
    assert_eq!(response.headers()["ratelimit-remaining"], "299");
    let reset: u64 = response.headers()["ratelimit-reset"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&reset));
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/v2/orders");
    assert_eq!(echo["query"], "page=2");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["body_bytes"], 5);
    assert_eq!(echo["token_ok"], true);
    assert_eq!(echo["headers"]["x-request-id"], "req-1");
    assert!(echo["headers"].get("authorization").is_none());

    hub.wait_api_requests(1).await;
    let api = hub.api_requests();
    assert_eq!(api.len(), 1);
    assert_eq!(api[0].uri, "/v2/orders?page=2");
    assert_eq!(api[0].version, http::Version::HTTP_11);
    assert_eq!(api[0].token.as_deref(), Some(token.as_str()));
    assert_eq!(api[0].body, Bytes::from_static(b"hello"));
    assert_eq!(api[0].body_len, 5);
    assert!(api[0].body_complete);
    assert_eq!(
        api[0].authority.as_deref(),
        Some(hub.addr().to_string().as_str())
    );

    // A second call counts against the same window.
    let response = client
        .get(format!("{}/v2/orders", hub.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["ratelimit-remaining"], "298");
}

#[tokio::test]
async fn json_token_request_with_ttl() {
    let hub = start(HubOptions::default()).await;
    let response = client()
        .post(hub.token_url())
        .json(&json!({
            "grant_type": "client_credentials",
            "client_id": "oms",
            "client_secret": "s3cret",
            "ttl": 120,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["expires_in"], 120);
    let recorded = &hub.token_requests()[0];
    assert_eq!(recorded.encoding, "json");
    assert_eq!(recorded.params["ttl"], "120");
    assert_eq!(recorded.content_type.as_deref(), Some("application/json"));
}

#[tokio::test]
async fn multipart_token_request() {
    let hub = start(HubOptions {
        client_id: Some("oms".into()),
        client_secret: Some("s3cret".into()),
        ..HubOptions::default()
    })
    .await;
    let form = reqwest::multipart::Form::new()
        .text("grant_type", "client_credentials")
        .text("client_id", "oms")
        .text("client_secret", "s3cret")
        .text("ttl", "1800");
    let response = client()
        .post(hub.token_url())
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["expires_in"], 1800);
    let recorded = &hub.token_requests()[0];
    assert_eq!(recorded.encoding, "multipart");
    assert_eq!(recorded.params.len(), 4);
    assert_eq!(recorded.params["client_id"], "oms");
}

#[tokio::test]
async fn basic_credentials_are_url_decoded() {
    let hub = start(HubOptions {
        client_id: Some("my client".into()),
        client_secret: Some("p:ss&w%rd".into()),
        ..HubOptions::default()
    })
    .await;
    // base64("my%20client:p%3Ass%26w%25rd"), as RFC 6749 §2.3.1 prescribes.
    let response = client()
        .post(hub.token_url())
        .header(
            "authorization",
            "Basic bXklMjBjbGllbnQ6cCUzQXNzJTI2dyUyNXJk",
        )
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let recorded = &hub.token_requests()[0];
    assert_eq!(
        recorded.basic,
        Some(("my client".to_owned(), "p:ss&w%rd".to_owned()))
    );

    // reqwest's own Basic (no URL-encoding) works for plain credentials.
    hub.set_credentials(Some("oms".into()), Some("s3cret".into()));
    let response = client()
        .post(hub.token_url())
        .basic_auth("oms", Some("s3cret"))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn token_endpoint_rejections() {
    let hub = start(HubOptions {
        client_id: Some("oms".into()),
        client_secret: Some("s3cret".into()),
        ..HubOptions::default()
    })
    .await;
    let client = client();
    let post = |params: &[(&str, &str)]| client.post(hub.token_url()).form(params).send();

    let wrong_secret = post(&[
        ("grant_type", "client_credentials"),
        ("client_id", "oms"),
        ("client_secret", "nope"),
    ])
    .await
    .unwrap();
    assert_eq!(wrong_secret.status(), 401);
    let body: Value = wrong_secret.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client");
    assert_eq!(
        body["error_description"],
        "Client authentication failed due to unknown client, no client authentication \
         included, or unsupported authentication method."
    );

    let missing = post(&[("grant_type", "client_credentials")]).await.unwrap();
    assert_eq!(missing.status(), 401);

    let wrong_grant = post(&[
        ("grant_type", "password"),
        ("client_id", "oms"),
        ("client_secret", "s3cret"),
    ])
    .await
    .unwrap();
    assert_eq!(wrong_grant.status(), 400);
    let body: Value = wrong_grant.json().await.unwrap();
    assert_eq!(body["error"], "unsupported_grant_type");

    let twice = post(&[
        ("grant_type", "client_credentials"),
        ("grant_type", "client_credentials"),
        ("client_id", "oms"),
        ("client_secret", "s3cret"),
    ])
    .await
    .unwrap();
    assert_eq!(twice.status(), 400);

    // RFC 6749 §2.3: one authentication method per request.
    let both = client
        .post(hub.token_url())
        .basic_auth("oms", Some("s3cret"))
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_secret", "s3cret"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(both.status(), 400);

    let bad_basic = client
        .post(hub.token_url())
        .header("authorization", "Basic !!!")
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad_basic.status(), 401);
    assert!(bad_basic.headers()["www-authenticate"]
        .to_str()
        .unwrap()
        .starts_with("Basic"));

    let get = client.get(hub.token_url()).send().await.unwrap();
    assert_eq!(get.status(), 405);
    assert_eq!(get.headers()["allow"], "POST");

    let broken_json = client
        .post(hub.token_url())
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(broken_json.status(), 400);
    let body: Value = broken_json.json().await.unwrap();
    assert_eq!(body["error"], "invalid_request");

    // Every request is recorded, rejected ones included.
    assert_eq!(hub.token_request_count(), 8);
    assert!(hub.issued_tokens().is_empty());
}

#[tokio::test]
async fn api_rejects_missing_unknown_expired_and_revoked_tokens() {
    let hub = start(HubOptions::default()).await;
    let client = client();
    let api = format!("{}/v2/orders", hub.base_url());
    let assert_401 = |response: reqwest::Response| async move {
        assert_eq!(response.status(), 401);
        assert_eq!(
            response.headers()["www-authenticate"],
            "Bearer error=\"invalid_token\""
        );
        assert!(response.headers().contains_key("ratelimit-remaining"));
        let body: Value = response.json().await.unwrap();
        assert_eq!(body, json!({"error": "invalid_token"}));
    };

    assert_401(client.get(&api).send().await.unwrap()).await;
    assert_401(
        client
            .get(&api)
            .bearer_auth("made-up")
            .send()
            .await
            .unwrap(),
    )
    .await;

    // Expired: the stand-in's clock is real time, so this test waits a little over 1 s.
    hub.set_token_lifetime(Duration::from_secs(1));
    let short = form_token(&client, &hub, "oms", "s").await;
    let ok = client.get(&api).bearer_auth(&short).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_401(client.get(&api).bearer_auth(&short).send().await.unwrap()).await;

    // Revoked.
    hub.set_token_lifetime(Duration::from_secs(3600));
    let token = form_token(&client, &hub, "oms", "s").await;
    let ok = client.get(&api).bearer_auth(&token).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    hub.revoke_all();
    assert_401(client.get(&api).bearer_auth(&token).send().await.unwrap()).await;

    // Regenerating the secret revokes too; tokens issued afterwards work.
    let token = form_token(&client, &hub, "oms", "s").await;
    hub.set_credentials(Some("oms".into()), Some("new".into()));
    assert_401(client.get(&api).bearer_auth(&token).send().await.unwrap()).await;
    let token = form_token(&client, &hub, "oms", "new").await;
    let ok = client.get(&api).bearer_auth(&token).send().await.unwrap();
    assert_eq!(ok.status(), 200);

    // Two Authorization headers (a proxy that appends instead of replacing) fail, even
    // with a valid token.
    let twice = client
        .get(&api)
        .header("authorization", format!("Bearer {token}"))
        .header("authorization", "Basic b21zOnM=")
        .send()
        .await
        .unwrap();
    assert_401(twice).await;

    assert_eq!(hub.issued_tokens().len(), 4);
    assert_eq!(hub.api_request_count(), 9);
    let recorded = hub.api_requests();
    assert_eq!(recorded[0].token, None);
    assert_eq!(recorded[1].token.as_deref(), Some("made-up"));
}

#[tokio::test]
async fn scripted_token_replies_come_back_verbatim() {
    let hub = start(HubOptions::default()).await;
    let client = client();
    let request = || {
        client
            .post(hub.token_url())
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "oms"),
                ("client_secret", "s"),
            ])
            .send()
    };

    hub.push_token_reply(TokenReply::Raw {
        status: 503,
        content_type: Some("text/html".into()),
        headers: vec![("retry-after".into(), "7".into())],
        body: Bytes::from_static(b"<html>maintenance</html>"),
    });
    hub.push_token_reply(TokenReply::Issue {
        expires_in: Some(json!("3600")),
        token_type: Some(json!("mac")),
        created_at: None,
    });
    hub.push_token_reply(TokenReply::Delay(Duration::from_millis(150)));
    hub.push_token_reply(TokenReply::json(429, &json!({"error": "slow_down"})));

    let raw = request().await.unwrap();
    assert_eq!(raw.status(), 503);
    assert_eq!(raw.headers()["content-type"], "text/html");
    assert_eq!(raw.headers()["retry-after"], "7");
    assert_eq!(raw.text().await.unwrap(), "<html>maintenance</html>");

    let odd = request().await.unwrap();
    assert_eq!(odd.status(), 200);
    let body: Value = odd.json().await.unwrap();
    assert_eq!(body["expires_in"], "3600");
    assert_eq!(body["token_type"], "mac");
    assert!(body.get("created_at").is_none());
    // The oddly shaped token is a real one.
    let token = body["access_token"].as_str().unwrap();
    let api = client
        .get(format!("{}/v2/orders", hub.base_url()))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(api.status(), 200);

    let started = Instant::now();
    let delayed = request().await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(delayed.status(), 429);
    assert_eq!(delayed.text().await.unwrap(), r#"{"error":"slow_down"}"#);

    // The script is used up: normal issuing again.
    let normal = request().await.unwrap();
    assert_eq!(normal.status(), 200);
    assert_eq!(hub.token_request_count(), 4);
    assert_eq!(hub.issued_tokens().len(), 2);
}

#[tokio::test]
async fn hanging_token_request_is_recorded_and_ends_at_shutdown() {
    let h2c = builder(rustls::RootCertStore::empty())
        .http2_prior_knowledge()
        .build()
        .unwrap();
    for client in [client(), h2c] {
        let hub = start(HubOptions::default()).await;
        hub.push_token_reply(TokenReply::Hang);
        let pending = tokio::spawn(
            client
                .post(hub.token_url())
                .form(&[("grant_type", "client_credentials")])
                .send(),
        );
        hub.wait_token_requests(1).await;
        assert_eq!(
            hub.token_requests()[0].params["grant_type"],
            "client_credentials"
        );
        assert!(!pending.is_finished());
        hub.shutdown();
        let result = tokio::time::timeout(Duration::from_secs(5), pending)
            .await
            .expect("shutdown closes a hanging request")
            .unwrap();
        assert!(result.is_err(), "no answer after shutdown: {result:?}");
    }
}

#[tokio::test]
async fn dropping_the_last_handle_stops_the_hub() {
    let hub = start(HubOptions::default()).await;
    let url = hub.token_url();
    hub.push_token_reply(TokenReply::Hang);
    let pending = tokio::spawn(
        client()
            .post(url)
            .form(&[("grant_type", "client_credentials")])
            .send(),
    );
    hub.wait_token_requests(1).await;
    let clone = hub.clone();
    drop(hub);
    assert!(!pending.is_finished());
    drop(clone);
    let result = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("dropping the hub closes its connections")
        .unwrap();
    assert!(result.is_err());
}

#[tokio::test]
async fn scripted_api_replies() {
    let hub = start(HubOptions::default()).await;
    let client = client();
    let token = form_token(&client, &hub, "oms", "s").await;
    let api = format!("{}/v2/orders", hub.base_url());

    hub.push_api_reply(ApiReply {
        status: 429,
        headers: vec![
            ("ratelimit-remaining".into(), "0".into()),
            ("retry-after".into(), "30".into()),
        ],
        body: Bytes::from_static(b"slow down"),
        skip_auth: false,
    });
    // Not for an unauthenticated request: the check comes first and the reply waits.
    let unauthenticated = client.get(&api).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let throttled = client.get(&api).bearer_auth(&token).send().await.unwrap();
    assert_eq!(throttled.status(), 429);
    assert_eq!(throttled.headers()["ratelimit-remaining"], "0");
    assert_eq!(throttled.headers()["ratelimit-limit"], "300");
    assert_eq!(throttled.headers()["retry-after"], "30");
    assert_eq!(throttled.text().await.unwrap(), "slow down");

    hub.push_api_reply(ApiReply {
        skip_auth: true,
        ..ApiReply::json(500, &json!({"error": "boom"}))
    });
    let skipped = client.post(&api).body("x").send().await.unwrap();
    assert_eq!(skipped.status(), 500);
    assert_eq!(
        skipped.headers()["content-type"],
        "application/json; charset=utf-8"
    );
    assert_eq!(skipped.text().await.unwrap(), r#"{"error":"boom"}"#);

    let normal = client.get(&api).bearer_auth(&token).send().await.unwrap();
    assert_eq!(normal.status(), 200);
    hub.wait_api_requests(4).await;
    assert_eq!(hub.api_requests()[2].body_len, 1);
}

#[tokio::test]
async fn echo_body_streams_8_mib_back_intact() {
    let hub = start(HubOptions::default()).await;
    let client = client();
    let token = form_token(&client, &hub, "oms", "s").await;
    let payload: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    let response = client
        .post(format!("{}/echo-body", hub.base_url()))
        .bearer_auth(&token)
        .header("content-type", "application/octet-stream")
        .body(payload.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-length"],
        payload.len().to_string().as_str()
    );
    let echoed = response.bytes().await.unwrap();
    assert!(echoed == payload, "echoed body differs");

    hub.wait_api_requests(1).await;
    let recorded = &hub.api_requests()[0];
    assert_eq!(recorded.body_len, payload.len() as u64);
    assert!(recorded.body.is_empty(), "bodies over 1 MiB are not kept");
    assert!(recorded.body_complete);

    // A small body is kept.
    let response = client
        .post(format!("{}/echo-body", hub.base_url()))
        .bearer_auth(&token)
        .body("small")
        .send()
        .await
        .unwrap();
    assert_eq!(response.text().await.unwrap(), "small");
    hub.wait_api_requests(2).await;
    assert_eq!(hub.api_requests()[1].body, Bytes::from_static(b"small"));

    // An empty body (hyper never polls it) is recorded too.
    let response = client
        .get(format!("{}/echo-body", hub.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.bytes().await.unwrap().is_empty());
    hub.wait_api_requests(3).await;
    let recorded = &hub.api_requests()[2];
    assert_eq!((recorded.body_len, recorded.body_complete), (0, true));
}

#[tokio::test]
async fn test_routes() {
    let hub = start(HubOptions::default()).await;
    let client = client();
    let token = form_token(&client, &hub, "oms", "s").await;
    let get = |path: &str| {
        client
            .get(format!("{}{path}", hub.base_url()))
            .bearer_auth(&token)
            .send()
    };

    let bytes = get("/bytes/200000").await.unwrap();
    assert_eq!(bytes.headers()["content-length"], "200000");
    let body = bytes.bytes().await.unwrap();
    assert_eq!(body.len(), 200_000);
    assert!(body.iter().all(|b| *b == b'x'));
    assert_eq!(
        get("/bytes/0").await.unwrap().bytes().await.unwrap().len(),
        0
    );

    let status = get("/status/503").await.unwrap();
    assert_eq!(status.status(), 503);
    assert!(status.headers().contains_key("ratelimit-reset"));
    assert_eq!(status.json::<Value>().await.unwrap()["status"], 503);
    assert_eq!(get("/status/204").await.unwrap().status(), 204);
    assert_eq!(get("/status/42").await.unwrap().status(), 400);

    let redirect = get("/redirect").await.unwrap();
    assert_eq!(redirect.status(), 302);
    assert_eq!(
        redirect.headers()["location"],
        "https://elsewhere.example/landing"
    );

    let started = Instant::now();
    let slow = get("/slow/100?x=1").await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(100));
    let echo: Value = slow.json().await.unwrap();
    assert_eq!(echo["path"], "/slow/100");
    assert_eq!(echo["query"], "x=1");
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let hub = start(HubOptions::default()).await;
    let client = builder(rustls::RootCertStore::empty())
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let token = form_token(&client, &hub, "oms", "s").await;
    let response = client
        .get(format!("{}/v2/orders", hub.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let echo: Value = response.json().await.unwrap();
    assert_eq!(echo["version"], "HTTP/2.0");
    hub.wait_api_requests(1).await;
    let recorded = &hub.api_requests()[0];
    assert_eq!(recorded.version, http::Version::HTTP_2);
    assert!(!recorded.headers.contains_key("host"));
    assert_eq!(
        recorded.authority.as_deref(),
        Some(hub.addr().to_string().as_str())
    );
}

#[tokio::test]
async fn tls_with_h2_by_alpn() {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    let tls = tokengate::standin::tls_server_config(
        vec![leaf.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
    )
    .unwrap();

    let hub = start(HubOptions {
        tls: Some(tls),
        ..HubOptions::default()
    })
    .await;
    assert!(hub.base_url().starts_with("https://localhost:"));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = builder(roots).build().unwrap();

    let token = form_token(&client, &hub, "oms", "s").await;
    let response = client
        .post(format!("{}/echo-body", hub.base_url()))
        .bearer_auth(&token)
        .body("over tls")
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.text().await.unwrap(), "over tls");
    hub.wait_api_requests(1).await;
    let recorded = &hub.api_requests()[0];
    assert_eq!(recorded.version, http::Version::HTTP_2);
    assert_eq!(recorded.body, Bytes::from_static(b"over tls"));

    // A client that offers only HTTP/1.1 gets HTTP/1.1 on the same port.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let mut h1_tls = client_tls(roots);
    h1_tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let h1 = reqwest::Client::builder()
        .use_preconfigured_tls(h1_tls)
        .no_proxy()
        .build()
        .unwrap();
    let response = h1
        .get(format!("{}/v2/orders", hub.base_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_11);
    assert_eq!(response.status(), 200);
}
