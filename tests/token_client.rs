//! The token exchange (`tokengate::token::client::TokenClient`) against the stand-in Delivery
//! Hub: every `token_auth` × `token_encoding` on the wire, the response shapes it accepts,
//! and the typed error (`kind()` and message) for every way a token endpoint can answer
//! badly — without the client secret ever appearing in a message.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Value};
use support::{token_issue, token_raw};
use tokengate::config::ProxyEnv;
use tokengate::config::{Config, TokenSettings};
use tokengate::standin::{Hub, HubOptions, TokenReply};
use tokengate::token::client::{FetchError, Issued, TokenClient};

/// The secret every error test configures; no error message may contain it.
const CANARY: &str = "canary-s3cret-7f3a";

/// The token settings of one integration pointed at `token_url`, with `extra` lines.
fn settings(token_url: &str, client_id: &str, client_secret: &str, extra: &str) -> TokenSettings {
    let text = format!(
        r#"
[[integration]]
name = "oms"
listen = "127.0.0.1:0"
token_url = "{token_url}"
upstream = "http://127.0.0.1:1"
client_id = {client_id:?}
client_secret = {client_secret:?}
{extra}
"#
    );
    let mut config = Config::from_str_with_env(&text, Path::new("test.toml"), &ProxyEnv::default())
        .unwrap_or_else(|e| panic!("{e}\n--- config:\n{text}"));
    config.integrations.remove(0).token
}

async fn fetch(settings: &TokenSettings) -> Result<Issued, FetchError> {
    TokenClient::new(settings).unwrap().fetch(settings).await
}

/// Fetches with the canary secret and expects an error of `kind`; checks that the message
/// holds every part of `mentions` and never the secret. Returns the error.
async fn expect_error(settings: &TokenSettings, kind: &str, mentions: &[&str]) -> FetchError {
    let err = match fetch(settings).await {
        Ok(issued) => panic!("expected a {kind} error, got {issued:?}"),
        Err(e) => e,
    };
    let message = err.to_string();
    assert_eq!(err.kind(), kind, "{message}");
    for part in mentions {
        assert!(
            message.contains(part),
            "{kind} message does not mention {part:?}: {message}"
        );
    }
    assert!(
        !message.contains(CANARY) && !format!("{err:?}").contains(CANARY),
        "the client secret leaked into an error: {err:?}"
    );
    err
}

/// A hub whose next token request gets `reply`, and settings with the canary secret.
async fn scripted(reply: TokenReply, extra: &str) -> (Hub, TokenSettings) {
    let hub = support::hub().await;
    hub.push_token_reply(reply);
    let s = settings(&hub.token_url(), "oms", CANARY, extra);
    (hub, s)
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[tokio::test]
async fn every_auth_and_encoding_reaches_the_hub_in_its_shape() {
    // Characters that RFC 6749 §2.3.1 requires to be form-encoded inside HTTP Basic: a raw
    // ':' in the id would split it, a raw '+' would decode to a space.
    let id = "my client:1";
    let secret = "a:b/c+d%";
    let hub = support::hub_with(HubOptions {
        client_id: Some(id.into()),
        client_secret: Some(secret.into()),
        ..HubOptions::default()
    })
    .await;
    let user_agent = format!("tokengate/{}", env!("CARGO_PKG_VERSION"));
    let mut seen = 0;
    for auth in ["body", "basic"] {
        for encoding in ["form", "json", "multipart"] {
            let case = format!("{auth}/{encoding}");
            let s = settings(
                &hub.token_url(),
                id,
                secret,
                &format!(
                    r#"
token_auth = "{auth}"
token_encoding = "{encoding}"
ttl = "30m"
scope = "orders:read orders:write"
extra_params = {{ audience = "https://api.bringg.com", note = "a&b=c d" }}
"#
                ),
            );
            // The hub only issues for the right credentials: success proves they arrived.
            let issued = fetch(&s).await.unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(
                issued.expires_in,
                Some(Duration::from_secs(1800)),
                "{case}: the hub honours ttl"
            );

            let requests = hub.token_requests();
            assert_eq!(requests.len(), seen + 1, "{case}: one request per fetch");
            seen += 1;
            let r = requests.last().unwrap();
            assert_eq!(r.method, "POST", "{case}");
            assert_eq!(r.path, "/oauth/token", "{case}");
            assert_eq!(r.query, None, "{case}: parameters go in the body");
            assert_eq!(r.encoding, encoding, "{case}");
            assert_eq!(r.headers["user-agent"], user_agent.as_str(), "{case}");
            assert_eq!(r.headers["accept"], "application/json", "{case}");

            let p = &r.params;
            assert_eq!(p["grant_type"], "client_credentials", "{case}");
            assert_eq!(p["ttl"], "1800", "{case}: ttl in whole seconds");
            assert_eq!(p["scope"], "orders:read orders:write", "{case}");
            assert_eq!(p["audience"], "https://api.bringg.com", "{case}");
            assert_eq!(p["note"], "a&b=c d", "{case}");
            match auth {
                "body" => {
                    assert_eq!(p["client_id"], id, "{case}");
                    assert_eq!(p["client_secret"], secret, "{case}");
                    assert_eq!(r.basic, None, "{case}");
                    assert!(!r.headers.contains_key("authorization"), "{case}");
                    assert_eq!(p.len(), 7, "{case}: {:?}", p.keys());
                }
                _ => {
                    assert_eq!(r.basic, Some((id.to_owned(), secret.to_owned())), "{case}");
                    assert!(!p.contains_key("client_id"), "{case}");
                    assert!(!p.contains_key("client_secret"), "{case}");
                    assert_eq!(p.len(), 5, "{case}: {:?}", p.keys());
                }
            }
            if encoding == "json" {
                // Bringg's API reference sends ttl as a JSON number.
                let body: Value = serde_json::from_slice(&r.body).unwrap();
                assert_eq!(body["ttl"], json!(1800), "{case}");
            }
        }
    }
    assert_eq!(seen, 6);
}

#[tokio::test]
async fn without_optional_keys_only_the_grant_and_credentials_are_sent() {
    let hub = support::hub().await;
    let issued = fetch(&settings(&hub.token_url(), "oms", "s", ""))
        .await
        .unwrap();
    // The hub's default lifetime, as expires_in.
    assert_eq!(issued.expires_in, Some(Duration::from_secs(3600)));
    let r = &hub.token_requests()[0];
    assert_eq!(r.encoding, "form");
    let keys: Vec<&str> = r.params.keys().map(String::as_str).collect();
    assert_eq!(keys, ["client_id", "client_secret", "grant_type"]);
}

#[tokio::test]
async fn doorkeeper_and_rfc_shapes_parse() {
    // Delivery Hub's (Doorkeeper's) own answer, with created_at.
    let hub = support::hub().await;
    let s = settings(&hub.token_url(), "oms", "s", "");
    let issued = fetch(&s).await.unwrap();
    assert_eq!(issued.status, 200);
    assert_eq!(issued.access_token.expose(), hub.issued_tokens()[0]);
    assert_eq!(issued.expires_in, Some(Duration::from_secs(3600)));
    assert!(!issued.capped);
    assert!(issued.clock_skew.unwrap().abs() <= 5, "{issued:?}");

    // A server clock an hour behind is reported as skew, not used for expiry.
    hub.push_token_reply(TokenReply::Issue {
        expires_in: Some(json!(600)),
        token_type: Some(json!("Bearer")),
        created_at: Some(json!(unix_now() - 3600)),
    });
    let issued = fetch(&s).await.unwrap();
    assert_eq!(issued.expires_in, Some(Duration::from_secs(600)));
    let skew = issued.clock_skew.unwrap();
    assert!((-3605..=-3595).contains(&skew), "{skew}");

    // RFC 6749 servers: expires_in as a numeric string, token_type in any case.
    hub.push_token_reply(token_issue(Some(json!("120")), Some(json!("bearer"))));
    let issued = fetch(&s).await.unwrap();
    assert_eq!(issued.expires_in, Some(Duration::from_secs(120)));
    assert_eq!(issued.clock_skew, None);

    // The bare minimum: access_token only.
    hub.push_token_reply(token_issue(None, None));
    let issued = fetch(&s).await.unwrap();
    assert_eq!(issued.expires_in, None);
    assert_eq!(issued.access_token.expose(), hub.issued_tokens()[3]);

    // More than 24 h is capped.
    hub.push_token_reply(token_issue(
        Some(json!(10 * 24 * 3600)),
        Some(json!("BEARER")),
    ));
    let issued = fetch(&s).await.unwrap();
    assert_eq!(issued.expires_in, Some(Duration::from_secs(24 * 3600)));
    assert!(issued.capped);
}

#[tokio::test]
async fn invalid_client_says_to_check_the_client_secret() {
    let hub = support::hub_with(HubOptions {
        client_id: Some("oms".into()),
        client_secret: Some("the-right-one".into()),
        ..HubOptions::default()
    })
    .await;
    for auth in ["body", "basic"] {
        let s = settings(
            &hub.token_url(),
            "oms",
            CANARY,
            &format!("token_auth = \"{auth}\""),
        );
        let err = expect_error(
            &s,
            "invalid_client",
            &[
                "HTTP 401",
                "invalid_client",
                "client_secret",
                // Delivery Hub's own description is passed on.
                "Client authentication failed",
            ],
        )
        .await;
        assert_eq!(err.retry_after(), None);
    }
}

#[tokio::test]
async fn html_404_is_rejected_and_points_at_region_or_token_url() {
    let (_hub, s) = scripted(
        token_raw(
            404,
            Some("text/html"),
            "<html><head><title>404 Not Found</title></head></html>",
        ),
        "",
    )
    .await;
    expect_error(
        &s,
        "rejected",
        &["HTTP 404", "region", "token_url", "HTML page"],
    )
    .await;
}

#[tokio::test]
async fn unusable_success_responses_are_bad_response() {
    let cases: Vec<(&str, TokenReply, &str)> = vec![
        (
            "HTML 200",
            token_raw(200, Some("text/html"), "<html><title>Login</title></html>"),
            "HTML page",
        ),
        ("empty 200", token_raw(200, None, ""), "empty body"),
        (
            "non-JSON",
            token_raw(200, Some("text/plain"), "access_token=abc"),
            "non-JSON",
        ),
        (
            "no access_token",
            TokenReply::json(200, &json!({"token_type": "Bearer", "expires_in": 60})),
            "no access_token",
        ),
        (
            "expires_in 0",
            token_issue(Some(json!(0)), Some(json!("Bearer"))),
            "expires_in",
        ),
        (
            "expires_in negative",
            token_issue(Some(json!(-5)), Some(json!("Bearer"))),
            "expires_in",
        ),
        (
            "expires_in \"soon\"",
            token_issue(Some(json!("soon")), Some(json!("Bearer"))),
            "expires_in",
        ),
        (
            "token_type mac",
            token_issue(Some(json!(60)), Some(json!("mac"))),
            "token_type",
        ),
    ];
    assert_eq!(cases.len(), 8);
    for (case, reply, mention) in cases {
        let (_hub, s) = scripted(reply, "").await;
        let err = match fetch(&s).await {
            Ok(issued) => panic!("{case}: expected bad_response, got {issued:?}"),
            Err(e) => e,
        };
        let message = err.to_string();
        assert_eq!(err.kind(), "bad_response", "{case}: {message}");
        assert!(message.contains("HTTP 200"), "{case}: {message}");
        assert!(message.contains(mention), "{case}: {message}");
        assert!(!message.contains(CANARY), "{case}: {message}");
    }
}

#[tokio::test]
async fn body_is_read_up_to_64_kib() {
    // Exactly 64 KiB: a token response padded with whitespace is still one.
    let hub = support::hub().await;
    let s = settings(&hub.token_url(), "oms", CANARY, "");
    let mut body = br#"{"access_token":"padded-token","expires_in":60}"#.to_vec();
    body.resize(64 * 1024, b' ');
    hub.push_token_reply(token_raw(200, Some("application/json"), body.clone()));
    let issued = fetch(&s).await.unwrap();
    assert_eq!(issued.access_token.expose(), "padded-token");

    // One byte more is not a token endpoint.
    body.push(b' ');
    hub.push_token_reply(token_raw(200, Some("application/json"), body));
    expect_error(&s, "bad_response", &["64 KiB"]).await;

    // Also for an error status: the body is not read to its end.
    hub.push_token_reply(token_raw(500, Some("text/html"), vec![b'x'; 200 * 1024]));
    expect_error(&s, "bad_response", &["64 KiB"]).await;
}

#[tokio::test]
async fn a_hanging_endpoint_times_out_within_token_timeout() {
    let (_hub, s) = scripted(TokenReply::Hang, r#"token_timeout = "500ms""#).await;
    let err = expect_error(&s, "timeout", &["token_timeout", "500ms"]).await;
    assert!(matches!(err, FetchError::Timeout(d) if d == Duration::from_millis(500)));
}

#[tokio::test]
async fn rate_limiting_and_server_errors_carry_retry_after() {
    let hub = support::hub().await;
    let s = settings(&hub.token_url(), "oms", CANARY, "");

    hub.push_token_reply(TokenReply::Raw {
        status: 429,
        content_type: Some("application/json".into()),
        headers: vec![("retry-after".into(), "7".into())],
        body: Bytes::from_static(br#"{"error":"slow_down"}"#),
    });
    let err = expect_error(&s, "rate_limited", &["HTTP 429", "7s"]).await;
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)));

    // More than a day is capped at a day (and cannot overflow the refresher's clock).
    hub.push_token_reply(TokenReply::Raw {
        status: 429,
        content_type: None,
        headers: vec![("retry-after".into(), u64::MAX.to_string())],
        body: Bytes::new(),
    });
    let err = expect_error(&s, "rate_limited", &["HTTP 429", "1day"]).await;
    assert_eq!(err.retry_after(), Some(Duration::from_secs(24 * 3600)));

    hub.push_token_reply(TokenReply::Raw {
        status: 503,
        content_type: Some("text/html".into()),
        headers: vec![("retry-after".into(), "30".into())],
        body: Bytes::from_static(b"<html><title>Maintenance</title></html>"),
    });
    let err = expect_error(&s, "server_error", &["HTTP 503", "maintenance"]).await;
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));

    hub.push_token_reply(TokenReply::json(
        500,
        &json!({"error": "server_error", "error_description": "database down"}),
    ));
    let err = expect_error(&s, "server_error", &["HTTP 500", "database down"]).await;
    assert_eq!(err.retry_after(), None);
}

#[tokio::test]
async fn redirects_are_not_followed() {
    // Following a redirect could hand the client secret to another host.
    let elsewhere = support::hub().await;
    let (hub, s) = scripted(
        TokenReply::Raw {
            status: 307,
            content_type: None,
            headers: vec![("location".into(), elsewhere.token_url())],
            body: Bytes::new(),
        },
        "",
    )
    .await;
    expect_error(&s, "rejected", &["HTTP 307"]).await;
    assert_eq!(hub.token_request_count(), 1);
    assert_eq!(elsewhere.token_request_count(), 0);
}

#[tokio::test]
async fn connection_refused_is_connect() {
    let addr = support::closed_port().await;
    let s = settings(
        &format!("http://{addr}/oauth/token"),
        "oms",
        CANARY,
        r#"token_timeout = "5s""#,
    );
    expect_error(&s, "connect", &["token endpoint"]).await;
}

#[tokio::test]
async fn a_body_that_breaks_off_is_a_bad_response_with_its_status() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A server that promises 100 bytes, sends 10 and closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let _ = conn.read(&mut buf).await;
        conn.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"access_t",
        )
        .await
        .unwrap();
    });
    let s = settings(&format!("http://{addr}/oauth/token"), "oms", CANARY, "");
    let err = expect_error(
        &s,
        "bad_response",
        &["(HTTP 200)", "the response body broke off"],
    )
    .await;
    assert!(!err.to_string().contains("HTTP 0"), "{err}");
}

#[tokio::test]
async fn tls_needs_the_private_ca_in_ca_file() {
    let ca = support::TestCa::new();
    let hub = support::tls_hub(&ca, &["localhost"]).await;
    assert!(hub.token_url().starts_with("https://localhost:"));

    let without = settings(&hub.token_url(), "oms", CANARY, "");
    expect_error(&without, "tls", &["TLS", "ca_file"]).await;
    assert_eq!(
        hub.token_request_count(),
        0,
        "nothing may be sent over an unverified connection"
    );

    let dir = tempfile::tempdir().unwrap();
    let ca_path = ca.write_pem(dir.path());
    let with = settings(
        &hub.token_url(),
        "oms",
        CANARY,
        &format!("ca_file = {:?}", ca_path.display().to_string()),
    );
    let issued = fetch(&with).await.unwrap();
    assert_eq!(issued.access_token.expose(), hub.issued_tokens()[0]);
    assert_eq!(hub.token_request_count(), 1);
}
