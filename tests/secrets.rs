//! Secrets and tokens never leak: a full scenario (start, scheduled refresh, 401 replay,
//! reload with a new secret, an upstream error, a token-endpoint error) runs with every
//! crate's logging at TRACE, and the captured logs, `/metrics`, `/status`, error bodies and
//! `Debug` output are searched for the client secrets and every token the server issued.
//!
//! Alone in its file: it installs the process-wide tracing subscriber.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokengate::config::Config;
use tokengate::config::ProxyEnv;
use tokengate::standin::{HubOptions, TokenReply};

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const SECRET_ONE: &str = "canary-secret-one-7f3a";
const SECRET_TWO: &str = "canary-secret-two-9c1d";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_token_anywhere_at_trace_level() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(move || writer.clone())
        .init();

    let hub = support::hub_with(HubOptions {
        token_lifetime: Duration::from_secs(2),
        client_id: Some("leak-client".into()),
        client_secret: Some(SECRET_ONE.into()),
        ..HubOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("client_secret");
    std::fs::write(&secret, format!("{SECRET_ONE}\n")).unwrap();
    let text = |secret_path: &Path| {
        format!(
            r#"
[server]
admin_listen = "{{admin}}"
shutdown_grace = "2s"

[[integration]]
name = "oms"
listen = "{{listen0}}"
token_url = "{}"
upstream = "{}"
client_id = "leak-client"
client_secret = {{ file = "{}" }}
request_timeout = "300ms"
"#,
            hub.token_url(),
            hub.base_url(),
            secret_path.display()
        )
    };
    let mut tg = support::start_toml(&text(&secret)).await;
    tg.ready().await;
    let client = support::client();
    let mut seen = String::new();

    // Traffic, then a scheduled refresh (2 s tokens).
    for _ in 0..3 {
        let res = client
            .post(tg.url("/v2/orders"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    hub.wait_token_requests(2).await;
    support::eventually(
        "the refreshed token in use",
        Duration::from_secs(10),
        || async {
            let s = tg.status().await;
            (s["integrations"][0]["token"]["generation"].as_u64() >= Some(2)).then_some(())
        },
    )
    .await;

    // A revocation: 401, forced refresh, replay.
    hub.revoke_all();
    let res = client.get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 200);

    // An upstream error tokengate answers itself.
    let res = client.get(tg.url("/slow/2000")).send().await.unwrap();
    assert_eq!(res.status(), 504);
    seen.push_str(&res.text().await.unwrap());

    // A token-endpoint error that quotes nothing it was sent, and a reload with a new secret.
    hub.push_token_reply(TokenReply::Raw {
        status: 401,
        content_type: Some("application/json".into()),
        headers: vec![],
        body: r#"{"error":"invalid_client"}"#.into(),
    });
    hub.set_credentials(Some("leak-client".into()), Some(SECRET_TWO.into()));
    std::fs::write(&secret, format!("{SECRET_TWO}\n")).unwrap();
    let reloaded = Config::from_str_with_env(
        &text(&secret)
            .replace("{admin}", &tg.admin.to_string())
            .replace("{listen0}", &tg.proxy.to_string()),
        Path::new("reload.toml"),
        &ProxyEnv::default(),
    )
    .unwrap();
    seen.push_str(&format!("{reloaded:?}"));
    tg.running.as_mut().unwrap().reload(reloaded);
    // Calls recover with a token for the new secret (after the scripted failure's backoff).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let res = client.get(tg.url("/v2/orders")).send().await.unwrap();
        let status = res.status();
        seen.push_str(&res.text().await.unwrap());
        if status == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never recovered: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for path in ["/metrics", "/status", "/readyz", "/healthz", "/nope"] {
        seen.push_str(
            &client
                .get(tg.admin_url(path))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap(),
        );
    }
    seen.push_str(&format!("{:?}", tg.running()));
    seen.push_str(&format!("{:?}", tg.running().config()));
    tg.stop().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("token obtained"), "logs were captured");
    assert!(
        logs.len() > 10_000,
        "trace level was on: {} bytes",
        logs.len()
    );
    let tokens = hub.issued_tokens();
    assert!(tokens.len() >= 3, "{tokens:?}");
    for (what, text) in [("logs", &logs), ("responses and Debug output", &seen)] {
        for canary in [SECRET_ONE, SECRET_TWO] {
            assert!(
                !text.contains(canary),
                "a client secret appears in the {what}"
            );
        }
        for token in &tokens {
            assert!(
                !text.contains(token.as_str()),
                "an issued token appears in the {what}"
            );
        }
    }
}
