//! Egress from tokengate's real environment: `HTTPS_PROXY` (with `user:password@`, the
//! conventional place for proxy credentials) steers the token client and the upstream pool
//! alike, and `NO_PROXY` exempts destinations from it.
//!
//! The one test in this binary that changes the process environment, so it is alone here:
//! tests in one binary run in parallel and share the environment. The variables are set and
//! read before the runtime starts any thread, then removed.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use support::egress_proxy::{basic, TestProxy};
use support::{client, start_toml_with_env, tls_hub, toml_for, TestCa};
use tokengate::config::{Config, Egress, ProxyEnv};

const VARS: [&str; 4] = ["HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"];

#[test]
fn https_proxy_and_no_proxy_from_the_environment_steer_both_clients() {
    let proxy_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    proxy_listener.set_nonblocking(true).unwrap();
    let proxy_addr = proxy_listener.local_addr().unwrap();

    for name in VARS {
        std::env::remove_var(name);
    }
    std::env::set_var(
        "HTTPS_PROXY",
        format!("http://svc:env-pass%40word@{proxy_addr}"),
    );
    let proxied = ProxyEnv::from_process();
    // `Config::from_str` reads the same variables.
    let text = "[[integration]]\nname = \"oms\"\nlisten = \"127.0.0.1:0\"\n\
                token_url = \"https://localhost:9/oauth/token\"\n\
                upstream = \"http://127.0.0.1:9\"\nclient_id = \"i\"\nclient_secret = \"s\"\n";
    let config = Config::from_str(text, Path::new("env.toml")).unwrap();
    let integration = &config.integrations[0];
    let Egress::Proxy { url, auth, source } = &integration.token.egress else {
        panic!("token endpoint not proxied: {:?}", integration.token.egress);
    };
    assert_eq!(url.as_str(), format!("http://{proxy_addr}/"));
    assert_eq!(source, "environment HTTPS_PROXY");
    assert_eq!(auth.as_ref().unwrap().value.expose(), "svc:env-pass@word");
    // The password left the URL for a redacted secret.
    assert!(!format!("{config:?}").contains("env-pass"));
    assert_eq!(
        integration.proxy.egress,
        Egress::Direct {
            why: "loopback http".into()
        }
    );
    std::env::set_var("NO_PROXY", "example.org, localhost");
    let exempt = ProxyEnv::from_process();
    for name in VARS {
        std::env::remove_var(name);
    }

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let proxy = TestProxy::on(tokio::net::TcpListener::from_std(proxy_listener).unwrap());
        proxy.require_basic("svc:env-pass@word");
        let ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let ca_file = ca.write_pem(dir.path());
        let hub = tls_hub(&ca, &["localhost"]).await;
        let toml = toml_for(&hub, &format!("ca_file = '{}'", ca_file.display()));
        let hub_target = format!("localhost:{}", hub.addr().port());

        // HTTPS_PROXY: the token request and the call both tunnel, with its credentials.
        let tg = start_toml_with_env(&toml, &proxied).await;
        tg.ready().await;
        let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let seen = proxy.wait_connects(2).await;
        assert_eq!(seen.len(), 2, "{seen:?}");
        for connect in &seen {
            assert_eq!(connect.target, hub_target);
            assert_eq!(connect.status, 200);
            assert_eq!(connect.authorization, Some(basic("svc:env-pass@word")));
        }
        tg.stop().await;

        // NO_PROXY names the destination: both go direct.
        let tg = start_toml_with_env(&toml, &exempt).await;
        tg.ready().await;
        let integration = &tg.running().config().integrations[0];
        let exempted = Egress::Direct {
            why: "NO_PROXY entry \"localhost\" matches localhost".into(),
        };
        assert_eq!(integration.token.egress, exempted);
        assert_eq!(integration.proxy.egress, exempted);
        let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(hub.token_request_count(), 2);
        assert_eq!(proxy.connects().len(), 2, "no new tunnel");
        tg.stop().await;
    });
}
