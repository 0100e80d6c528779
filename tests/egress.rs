//! Egress through a corporate proxy: the token client and the upstream pool both tunnel
//! through `egress_proxy` with CONNECT (TLS end to end inside), credentials go to the proxy
//! only, a refusing or unreachable proxy is named with its answer (502 `upstream_unreachable`,
//! `kind="proxy"`, a typed token-fetch error), plain-http loopback destinations never use it,
//! a reload with new proxy credentials applies to new tunnels, and `check` shows each route.
//!
//! The proxy is the harness's [`TestProxy`]; the destinations are stand-in hubs over TLS with
//! a test CA, since plain-http loopback destinations bypass the proxy by design. The real
//! environment (`HTTPS_PROXY`, `NO_PROXY`) is tested alone in `egress_env.rs`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use serde_json::{json, Value};
use support::egress_proxy::{basic, TestProxy};
use support::{client, closed_port, hub, sample, start_toml, tls_hub, wait_sample, TestCa};
use tokengate::config::{Config, Egress, ProxyEnv};
use tokengate::standin::{ApiReply, Hub};
use tokengate::token::client::{FetchError, TokenClient};

const PROXY_CREDENTIALS: &str = "svc-tokengate:canary-proxy-password";

/// One integration `oms`; `server` lines go into `[server]`.
fn toml(token_url: &str, upstream: &str, server: &str, ca_file: Option<&Path>) -> String {
    let ca = ca_file
        .map(|p| format!("ca_file = '{}'", p.display()))
        .unwrap_or_default();
    format!(
        r#"
[server]
admin_listen = "{{admin}}"
shutdown_grace = "5s"
{server}

[[integration]]
name = "oms"
listen = "{{listen0}}"
token_url = "{token_url}"
upstream = "{upstream}"
client_id = "test-client"
client_secret = "test-secret"
{ca}
"#
    )
}

/// `egress_proxy` and `egress_proxy_auth` from a file holding `credentials`.
fn proxy_lines(proxy: &str, auth_file: Option<&Path>) -> String {
    let mut lines = format!("egress_proxy = \"{proxy}\"\n");
    if let Some(file) = auth_file {
        lines.push_str(&format!(
            "egress_proxy_auth = {{ file = '{}' }}\n",
            file.display()
        ));
    }
    lines
}

fn auth_file(dir: &Path, credentials: &str) -> std::path::PathBuf {
    let path = dir.join("proxy-auth");
    std::fs::write(&path, format!("{credentials}\n")).unwrap();
    path
}

async fn proxy_errors(tg: &support::Tg) -> Option<f64> {
    sample(
        &tg.metrics().await,
        "tokengate_upstream_errors_total",
        &[("integration", "oms"), ("kind", "proxy")],
    )
}

fn target(hub: &Hub) -> String {
    format!("localhost:{}", hub.addr().port())
}

#[tokio::test]
async fn both_clients_tunnel_and_credentials_go_only_to_the_proxy() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let token_hub = tls_hub(&ca, &["localhost"]).await;
    let api_hub = tls_hub(&ca, &["localhost"]).await;
    // The API hub did not issue the token; the test checks the token itself below.
    api_hub.push_api_reply(ApiReply {
        skip_auth: true,
        ..ApiReply::json(200, &json!({"ok": true}))
    });
    let proxy = TestProxy::start().await;
    proxy.require_basic(PROXY_CREDENTIALS);
    let auth = auth_file(dir.path(), PROXY_CREDENTIALS);

    let tg = start_toml(&toml(
        &token_hub.token_url(),
        &api_hub.base_url(),
        &proxy_lines(&proxy.url(), Some(&auth)),
        Some(&ca_file),
    ))
    .await;
    tg.ready().await;

    // The first token came through a tunnel to the token endpoint, with the credentials.
    let seen = proxy.connects();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].target, target(&token_hub));
    assert_eq!(seen[0].status, 200);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(basic(PROXY_CREDENTIALS).as_str())
    );
    assert_eq!(token_hub.token_request_count(), 1);

    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = proxy.wait_connects(2).await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].target, target(&api_hub));
    assert_eq!(
        seen[1].authorization.as_deref(),
        Some(basic(PROXY_CREDENTIALS).as_str())
    );
    api_hub.wait_api_requests(1).await;
    let call = &api_hub.api_requests()[0];
    assert_eq!(call.token, token_hub.issued_tokens().first().cloned());
    // TLS ran end to end inside the tunnel: the hub negotiated h2 with tokengate itself.
    assert_eq!(call.version, http::Version::HTTP_2);

    // Credentials for the proxy stay with the proxy; nothing went through it in the clear.
    for headers in token_hub
        .token_requests()
        .iter()
        .map(|r| &r.headers)
        .chain(api_hub.api_requests().iter().map(|r| &r.headers))
    {
        assert!(!headers.contains_key("proxy-authorization"), "{headers:?}");
    }
    assert_eq!(proxy.other_requests(), Vec::<String>::new());
    assert_eq!(proxy_errors(&tg).await, Some(0.0));
    tg.stop().await;
}

#[tokio::test]
async fn a_proxy_asking_for_other_credentials_is_named_with_its_407() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    // Token endpoint on plain-http loopback (direct by design), upstream over TLS through the
    // proxy: the integration has a token, so the call reaches the proxy.
    let token_hub = hub().await;
    let api_hub = tls_hub(&ca, &["localhost"]).await;
    let proxy = TestProxy::start().await;
    proxy.require_basic("svc-tokengate:the-right-one");
    let auth = auth_file(dir.path(), PROXY_CREDENTIALS);

    let tg = start_toml(&toml(
        &token_hub.token_url(),
        &api_hub.base_url(),
        &proxy_lines(&proxy.url(), Some(&auth)),
        Some(&ca_file),
    ))
    .await;
    tg.ready().await;
    assert_eq!(proxy.connects().len(), 0, "the token came directly");

    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-tokengate-error"], "upstream_unreachable");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unreachable");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "egress proxy {} answered 407 Proxy Authentication Required to CONNECT {}",
            proxy.url(),
            target(&api_hub)
        )),
        "{message}"
    );
    assert!(message.contains("egress_proxy_auth"), "{message}");
    assert!(!message.contains("canary-proxy-password"), "{message}");
    wait_sample(
        &tg,
        "tokengate_upstream_errors_total",
        &[("integration", "oms"), ("kind", "proxy")],
        1.0,
    )
    .await;
    assert_eq!(api_hub.api_request_count(), 0);

    // The token client, through the same proxy to a TLS token endpoint: a typed error that
    // names the proxy and its answer, counted as `connect` (the contract's kinds).
    let mut settings = tg.running().config().integrations[0].token.clone();
    settings.token_url = tokengate::config::Endpoint::parse(&api_hub.token_url()).unwrap();
    settings.egress = tg.running().config().integrations[0].proxy.egress.clone();
    let err = TokenClient::new(&settings)
        .unwrap()
        .fetch(&settings)
        .await
        .unwrap_err();
    let FetchError::Proxy(text) = &err else {
        panic!("not a proxy error: {err:?}");
    };
    assert!(
        text.contains(&format!(
            "egress proxy {} answered 407 Proxy Authentication Required to CONNECT {}",
            proxy.url(),
            target(&api_hub)
        )),
        "{text}"
    );
    assert_eq!(err.kind(), "connect");
    assert!(!err.to_string().contains("canary-proxy-password"));
    assert_eq!(api_hub.token_request_count(), 0);
    tg.stop().await;
}

#[tokio::test]
async fn a_proxy_refusing_the_destination_is_named_with_its_status() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let token_hub = hub().await;
    let api_hub = tls_hub(&ca, &["localhost"]).await;
    let proxy = TestProxy::start().await;
    let tg = start_toml(&toml(
        &token_hub.token_url(),
        &api_hub.base_url(),
        &proxy_lines(&proxy.url(), None),
        Some(&ca_file),
    ))
    .await;
    tg.ready().await;

    for (status, reason) in [(403, "Forbidden"), (502, "Bad Gateway")] {
        proxy.refuse_with(Some(status));
        let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
        assert_eq!(res.status(), 502);
        let body: Value = res.json().await.unwrap();
        let message = body["message"].as_str().unwrap();
        assert!(
            message.contains(&format!(
                "egress proxy {} answered {status} {reason}",
                proxy.url()
            )),
            "{message}"
        );
    }
    // No credentials configured: none sent.
    assert!(proxy.connects().iter().all(|c| c.authorization.is_none()));

    // The token client learns the status too, although reqwest reports only "unsuccessful".
    proxy.refuse_with(Some(403));
    let mut settings = tg.running().config().integrations[0].token.clone();
    settings.token_url = tokengate::config::Endpoint::parse(&api_hub.token_url()).unwrap();
    settings.egress = tg.running().config().integrations[0].proxy.egress.clone();
    let err = TokenClient::new(&settings)
        .unwrap()
        .fetch(&settings)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FetchError::Proxy(text) if text.contains(&format!("egress proxy {} answered 403 Forbidden", proxy.url()))),
        "{err}"
    );

    // Tunnelling again: the pool recovers without a restart. (The API hub did not issue the
    // token, which came from the plain-http hub.)
    proxy.refuse_with(None);
    api_hub.push_api_reply(ApiReply {
        skip_auth: true,
        ..ApiReply::json(200, &json!({"ok": true}))
    });
    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    tg.stop().await;
}

#[tokio::test]
async fn an_unreachable_proxy_is_a_clear_error_for_both_clients() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let token_hub = hub().await;
    let api_hub = tls_hub(&ca, &["localhost"]).await;
    let nowhere = format!("http://{}", closed_port().await);
    let tg = start_toml(&toml(
        &token_hub.token_url(),
        &api_hub.base_url(),
        &proxy_lines(&nowhere, None),
        Some(&ca_file),
    ))
    .await;
    tg.ready().await;

    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-tokengate-error"], "upstream_unreachable");
    let body: Value = res.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("cannot connect to the egress proxy {nowhere}")),
        "{message}"
    );
    assert!(message.to_lowercase().contains("refused"), "{message}");
    assert_eq!(proxy_errors(&tg).await, Some(1.0));

    let mut settings = tg.running().config().integrations[0].token.clone();
    settings.token_url = tokengate::config::Endpoint::parse(&api_hub.token_url()).unwrap();
    settings.egress = tg.running().config().integrations[0].proxy.egress.clone();
    let err = TokenClient::new(&settings)
        .unwrap()
        .fetch(&settings)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, FetchError::Proxy(text) if text.contains(&format!("cannot connect to the egress proxy {nowhere}"))),
        "{err}"
    );
    assert_eq!(err.kind(), "connect");
    tg.stop().await;
}

#[tokio::test]
async fn loopback_http_destinations_bypass_the_proxy() {
    let hub = hub().await;
    let proxy = TestProxy::start().await;
    let tg = start_toml(&toml(
        &hub.token_url(),
        &hub.base_url(),
        &proxy_lines(&proxy.url(), None),
        None,
    ))
    .await;
    tg.ready().await;
    let integration = &tg.running().config().integrations[0];
    let loopback = Egress::Direct {
        why: "loopback http".into(),
    };
    assert_eq!(integration.token.egress, loopback);
    assert_eq!(integration.proxy.egress, loopback);

    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(hub.token_request_count(), 1);
    assert_eq!(proxy.connects().len(), 0);
    assert_eq!(proxy.other_requests(), Vec::<String>::new());
    tg.stop().await;
}

#[tokio::test]
async fn reloaded_proxy_credentials_apply_to_new_tunnels_of_both_clients() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let hub = tls_hub(&ca, &["localhost"]).await;
    let proxy = TestProxy::start().await;
    let (old, new) = ("svc-tokengate:old-password", "svc-tokengate:new-password");
    proxy.require_basic(old);
    let auth = auth_file(dir.path(), old);
    let text = toml(
        &hub.token_url(),
        &hub.base_url(),
        &proxy_lines(&proxy.url(), Some(&auth)),
        Some(&ca_file),
    );
    let mut tg = start_toml(&text).await;
    tg.ready().await;
    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let before = proxy.wait_connects(2).await;
    assert!(before.iter().all(|c| c.authorization == Some(basic(old))));

    // The proxy's password is rotated, and tokengate's secret file with it, then SIGHUP.
    proxy.require_basic(new);
    auth_file(dir.path(), new);
    let text = text
        .replace("{admin}", &tg.admin.to_string())
        .replace("{listen0}", &tg.proxy.to_string());
    let config =
        Config::from_str_with_env(&text, Path::new("test.toml"), &ProxyEnv::default()).unwrap();
    let Egress::Proxy {
        auth: Some(secret), ..
    } = &config.integrations[0].proxy.egress
    else {
        panic!("not proxied");
    };
    assert_eq!(secret.value.expose(), new);
    let running = tg.running.as_mut().unwrap();
    running.reload(config);

    // The upstream pool was rebuilt: the next call opens a new tunnel with the new password.
    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = proxy.wait_connects(before.len() + 1).await;
    let after = &seen[before.len()..];
    assert_eq!(after[0].target, target(&hub));
    assert_eq!(after[0].authorization, Some(basic(new)));
    assert_eq!(after[0].status, 200);

    // The token client was rebuilt too: a revoked token makes it fetch through a new tunnel,
    // with the new password (the old one would get 407 and the call its 401).
    hub.revoke_all();
    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let seen = proxy.wait_connects(before.len() + 2).await;
    let after = &seen[before.len()..];
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(
        after
            .iter()
            .all(|c| c.status == 200 && c.authorization == Some(basic(new))),
        "{after:?}"
    );
    assert_eq!(hub.token_request_count(), 2);
    tg.stop().await;
}

/// `tokengate check` prints the route of each endpoint, from the configuration or from the
/// environment (a child process's own environment: this process's is never changed), and
/// never a proxy password.
#[tokio::test]
async fn check_shows_each_route_and_where_it_comes_from() {
    let dir = tempfile::tempdir().unwrap();
    let auth = auth_file(dir.path(), PROXY_CREDENTIALS);
    let write = |server: &str, name: &str| {
        let path = dir.path().join(name);
        let text = toml(
            "https://eu2-admin-api.bringg.com/oauth/token",
            "https://api.internal.example",
            server,
            None,
        )
        .replace("{admin}", "127.0.0.1:19464")
        .replace("{listen0}", "127.0.0.1:18081");
        std::fs::write(&path, text).unwrap();
        path
    };
    let run = |path: std::path::PathBuf, env: &'static [(&'static str, &'static str)]| async move {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_tokengate"));
        cmd.args(["check", "--config", path.to_str().unwrap()]);
        for name in [
            "HTTPS_PROXY",
            "https_proxy",
            "NO_PROXY",
            "no_proxy",
            "TOKENGATE_CONFIG",
        ] {
            cmd.env_remove(name);
        }
        cmd.envs(env.iter().copied());
        let out = cmd.output().await.unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap()
    };

    let configured = write(
        &proxy_lines("http://proxy.corp.example:3128", Some(&auth)),
        "configured.toml",
    );
    let out = run(configured.clone(), &[]).await;
    let via = format!(
        "CONNECT via http://proxy.corp.example:3128 (server.egress_proxy; credentials from file {})",
        auth.display()
    );
    assert!(
        out.contains(&format!("oms          token_url  {via}")),
        "{out}"
    );
    assert!(
        out.contains(&format!("oms          upstream   {via}")),
        "{out}"
    );
    assert!(!out.contains("canary-proxy-password"), "{out}");

    // With egress_proxy set, the environment's variables are ignored, and that is said.
    let out = run(
        configured,
        &[("HTTPS_PROXY", "http://other:1"), ("NO_PROXY", "*")],
    )
    .await;
    assert!(out.contains(&via), "{out}");
    assert!(
        out.contains("HTTPS_PROXY and NO_PROXY from the environment are ignored"),
        "{out}"
    );

    let plain = write("", "plain.toml");
    let out = run(
        plain.clone(),
        &[
            (
                "https_proxy",
                "http://svc:canary-proxy-password@proxy.corp.example:3128",
            ),
            ("NO_PROXY", ".internal.example"),
        ],
    )
    .await;
    assert!(
        out.contains("token_url  CONNECT via http://proxy.corp.example:3128 (environment https_proxy; credentials from env https_proxy)"),
        "{out}"
    );
    assert!(
        out.contains(
            "upstream   direct (NO_PROXY entry \".internal.example\" matches api.internal.example)"
        ),
        "{out}"
    );
    assert!(!out.contains("canary-proxy-password"), "{out}");

    let out = run(plain, &[]).await;
    assert!(
        out.contains("token_url  direct (no egress_proxy or HTTPS_PROXY set)"),
        "{out}"
    );
}
