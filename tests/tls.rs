//! TLS towards the upstream and the token endpoint (`tokengate::tls`, the proxy's upstream
//! connections, the token client): a private CA through `ca_file`, HTTP/2 by ALPN (one
//! connection shared by every client, a GOAWAY survived), verification that cannot be skipped,
//! a refused certificate explained by its cause and fix (a CA certificate served as the
//! server's own, expired, wrong name, unknown issuer, no serverAuth) in `/readyz`, `/status`
//! and the 502, and the rule that plain `http://` is only for loopback upstreams. The stand-in
//! hub serves TLS with rcgen certificates made per test.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::{
    client, eventually, sample, self_signed_ca_server, start, start_toml, start_with, tls_hub,
    tls_hub_with, toml_for, TestCa, Tg,
};
use tokengate::config::Config;
use tokengate::config::ProxyEnv;
use tokengate::standin::Hub;

fn ca_line(path: &Path) -> String {
    // A TOML literal string: no escaping of the path's characters.
    format!("ca_file = '{}'", path.display())
}

async fn upstream_errors(tg: &support::Tg, kind: &str) -> Option<f64> {
    sample(
        &tg.metrics().await,
        "tokengate_upstream_errors_total",
        &[("integration", "oms"), ("kind", kind)],
    )
}

#[tokio::test]
async fn private_ca_via_ca_file_with_http2_by_alpn() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let hub = tls_hub(&ca, &["localhost"]).await;
    assert!(hub.base_url().starts_with("https://localhost:"));
    // The same TLS hub is the token endpoint: ca_file applies to both clients.
    let tg = start(&hub, &ca_line(&ca_file)).await;
    assert_eq!(hub.token_request_count(), 1);

    let res = client()
        .get(tg.url("/v2/orders?page=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let echo: Value = res.json().await.unwrap();
    assert_eq!(echo["version"], "HTTP/2.0");
    hub.wait_api_requests(1).await;
    let seen = &hub.api_requests()[0];
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(seen.uri, "/v2/orders?page=1");
    // HTTP/2 carries the authority as :authority, with no separate host header
    // (RFC 9113 §8.3.1).
    assert!(!seen.headers.contains_key("host"), "{:?}", seen.headers);
    assert_eq!(
        seen.authority,
        Some(format!("localhost:{}", hub.addr().port()))
    );
    assert!(seen
        .token
        .as_ref()
        .is_some_and(|t| hub.issued_tokens().contains(t)));

    // An 8 MiB body round-trips over h2 (flow control, many DATA frames).
    let body: Vec<u8> = (0..8 * 1024 * 1024 / 4)
        .flat_map(|i: u32| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    let res = client()
        .post(tg.url("/echo-body"))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let got = res.bytes().await.unwrap();
    assert_eq!(got.len(), body.len());
    assert!(got == body, "the body came back altered");
    hub.wait_api_requests(2).await;
    let seen = &hub.api_requests()[1];
    assert_eq!(seen.version, http::Version::HTTP_2);
    assert_eq!(seen.body_len, body.len() as u64);
    assert!(seen.body_complete);
    assert_eq!(upstream_errors(&tg, "tls").await, Some(0.0));
    tg.stop().await;
}

#[tokio::test]
async fn unknown_issuer_without_ca_file_is_502_tls() {
    let ca = TestCa::new();
    let upstream = tls_hub(&ca, &["localhost"]).await;
    // A plain-http token endpoint, so tokengate gets ready without the CA.
    let tokens = support::hub().await;
    let tg = start_with(&tokens.token_url(), &upstream.base_url(), "").await;

    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-tokengate-error"], "upstream_unreachable");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unreachable");
    assert_eq!(body["integration"], "oms");
    let message = body["message"].as_str().unwrap();
    let lower = message.to_lowercase();
    assert!(
        lower.contains("tls") || lower.contains("certificate"),
        "{message}"
    );
    assert!(message.contains("ca_file"), "{message}");
    assert!(message.contains(&upstream.base_url()), "{message}");
    assert_eq!(upstream.api_request_count(), 0);
    assert_eq!(upstream_errors(&tg, "tls").await, Some(1.0));
    assert_eq!(upstream_errors(&tg, "connect").await, Some(0.0));
    tg.stop().await;
}

#[tokio::test]
async fn certificate_for_another_name_is_502_tls() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    // Trusted issuer, but the leaf names otherhost while tokengate connects to localhost.
    let upstream = tls_hub(&ca, &["otherhost"]).await;
    let tokens = support::hub().await;
    let tg = start_with(
        &tokens.token_url(),
        &upstream.base_url(),
        &ca_line(&ca_file),
    )
    .await;

    let message = bad_gateway(&tg).await;
    assert!(message.contains("(tls)"), "{message}");
    assert!(
        message.contains("certificate is for otherhost, not for localhost, the host in upstream"),
        "{message}"
    );
    assert!(
        message.contains("or issue the certificate with localhost in its subjectAltName"),
        "{message}"
    );
    assert_eq!(upstream.api_request_count(), 0);
    assert_eq!(upstream_errors(&tg, "tls").await, Some(1.0));
    tg.stop().await;

    // The same certificate as the token endpoint's.
    let (tg, reason) = refused(&upstream, &ca_line(&ca_file)).await;
    assert!(
        reason.contains("certificate is for otherhost, not for localhost, the host in token_url"),
        "{reason}"
    );
    assert_eq!(upstream.token_request_count(), 0);
    tg.stop().await;
}

/// The message of the 502 a request gets from `tg`, whose upstream refuses the handshake.
async fn bad_gateway(tg: &Tg) -> String {
    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-tokengate-error"], "upstream_unreachable");
    let body: Value = res.json().await.unwrap();
    body["message"].as_str().unwrap().to_owned()
}

/// tokengate with `hub` as token endpoint and upstream, not waiting for a readiness that
/// never comes: the reason `/readyz` gives once the first fetch failed on TLS, checked to be
/// the one `/status` shows.
async fn refused(hub: &Hub, extra: &str) -> (Tg, String) {
    let tg = start_toml(&toml_for(hub, extra)).await;
    let reason = eventually(
        "/readyz names the TLS failure",
        Duration::from_secs(10),
        || async {
            let (code, body) = tg.readyz().await;
            let reason = body["not_ready"][0]["reason"].as_str()?.to_owned();
            (code == 503 && reason.contains("TLS failure")).then_some(reason)
        },
    )
    .await;
    let status = tg.status().await;
    assert_eq!(status["integrations"][0]["last_error"], reason.as_str());
    assert!(
        tg.metric("tokengate_token_fetch_errors_total", &[("kind", "tls")])
            .await
            >= 1.0
    );
    assert!(
        !reason.contains("; if it uses a private CA, add it with ca_file"),
        "the old blanket advice: {reason}"
    );
    (tg, reason)
}

/// The report from outside: `openssl req -x509` makes a CA certificate (`CA:TRUE`), the user
/// serves it as the server's own and puts it in ca_file, as told. rustls refuses it all the
/// same; the message must say so and name the fix, not send them back to ca_file.
#[tokio::test]
async fn ca_certificate_served_as_the_servers_own_names_the_cause_and_fix() {
    let (config, pem) = self_signed_ca_server(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("server.pem");
    std::fs::write(&ca_file, pem).unwrap();
    let hub = tls_hub_with(config).await;

    let (tg, reason) = refused(&hub, &ca_line(&ca_file)).await;
    assert!(
        reason.starts_with("TLS failure talking to the token endpoint: the server presents a CA certificate (basicConstraints CA:TRUE"),
        "{reason}"
    );
    assert!(reason.contains("even when it is in ca_file"), "{reason}");
    assert!(
        reason.contains(
            "issue the server a certificate signed by that CA and keep the CA in ca_file"
        ),
        "{reason}"
    );
    assert!(
        reason.contains("README's \"Private CA\" section"),
        "{reason}"
    );
    assert!(
        reason.contains("CaUsedAsEndEntity"),
        "rustls's words stay: {reason}"
    );
    assert_eq!(hub.token_request_count(), 0);
    tg.stop().await;

    // The same server as the upstream: the 502 says the same.
    let tokens = support::hub().await;
    let tg = start_with(&tokens.token_url(), &hub.base_url(), &ca_line(&ca_file)).await;
    let message = bad_gateway(&tg).await;
    assert!(
        message.contains("(tls): the server presents a CA certificate"),
        "{message}"
    );
    assert!(
        message.contains("issue the server a certificate signed by that CA"),
        "{message}"
    );
    assert_eq!(hub.api_request_count(), 0);
    assert_eq!(upstream_errors(&tg, "tls").await, Some(1.0));
    tg.stop().await;
}

#[tokio::test]
async fn expired_certificate_names_its_end_date() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let hub = tls_hub_with(ca.server_config_with(&["localhost"], |p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }))
    .await;

    let (tg, reason) = refused(&hub, &ca_line(&ca_file)).await;
    assert!(
        reason.contains("the server's certificate expired at 2021-01-01T00:00:00Z ("),
        "{reason}"
    );
    assert!(
        reason.contains("renew it on the server, or fix this host's clock"),
        "{reason}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn certificate_from_a_ca_not_in_ca_file_names_the_file() {
    let trusted = TestCa::new();
    let other = TestCa::named("another test CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_file = trusted.write_pem(dir.path());
    let hub = tls_hub(&other, &["localhost"]).await;

    let (tg, reason) = refused(&hub, &ca_line(&ca_file)).await;
    assert!(
        reason.contains(&format!(
            "the server's certificate was not issued by a CA tokengate trusts (the public web roots and ca_file {})",
            ca_file.display()
        )),
        "{reason}"
    );
    assert!(
        reason.contains("put the CA that issued it in ca_file"),
        "{reason}"
    );
    tg.stop().await;

    // A CA made again under the same name (a regenerated dev CA): found by name, refused by
    // signature.
    let again = TestCa::new();
    let hub = tls_hub(&again, &["localhost"]).await;
    let (tg, reason) = refused(&hub, &ca_line(&ca_file)).await;
    assert!(
        reason.contains("not validly signed by the CA it names as its issuer"),
        "{reason}"
    );
    assert!(reason.contains("another CA of the same name"), "{reason}");
    tg.stop().await;
}

#[tokio::test]
async fn certificate_without_server_auth_names_the_missing_purpose() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let hub = tls_hub_with(ca.server_config_with(&["localhost"], |p| {
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    }))
    .await;

    let (tg, reason) = refused(&hub, &ca_line(&ca_file)).await;
    assert!(
        reason.contains(
            "not allowed for TLS servers: its extendedKeyUsage is clientAuth and lacks serverAuth"
        ),
        "{reason}"
    );
    assert!(
        reason.contains("issue it with extendedKeyUsage = serverAuth"),
        "{reason}"
    );
    tg.stop().await;
}

#[tokio::test]
async fn plain_http_upstream_is_refused_unless_loopback() {
    let base = support::toml_with(
        "http://127.0.0.1:9/oauth/token",
        "http://api.bringg.com",
        "",
    )
    .replace("{admin}", "127.0.0.1:0")
    .replace("{listen0}", "127.0.0.1:0");
    let err =
        Config::from_str_with_env(&base, Path::new("test.toml"), &ProxyEnv::default()).unwrap_err();
    let message = err.to_string();
    assert!(message.contains("integration[0].upstream"), "{message}");
    assert!(message.contains("https://"), "{message}");

    // The same file with an https upstream, or a loopback http one, is accepted.
    for upstream in ["https://api.bringg.com", "http://127.0.0.1:9000"] {
        let ok = support::toml_with("http://127.0.0.1:9/oauth/token", upstream, "")
            .replace("{admin}", "127.0.0.1:0")
            .replace("{listen0}", "127.0.0.1:0");
        Config::from_str_with_env(&ok, Path::new("test.toml"), &ProxyEnv::default()).unwrap();
    }
}

#[tokio::test]
async fn an_h2_upstream_is_one_connection_shared_by_all_clients() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let upstream = tls_hub(&ca, &["localhost"]).await;
    let tg = start(&upstream, &ca_line(&ca_file)).await;
    // The token client's connection; the rest are the proxy's.
    let before = upstream.connection_count();

    // The first request opens the connection; then eight client connections at once.
    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let url = tg.url("/v2/orders");
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let client = client();
                for _ in 0..5 {
                    let res = client.get(&url).send().await.unwrap();
                    assert_eq!(res.status(), 200);
                    let echo: Value = res.json().await.unwrap();
                    assert_eq!(echo["version"], "HTTP/2.0");
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(upstream.api_request_count(), 41);
    assert_eq!(upstream.connection_count() - before, 1);
    tg.stop().await;
}

#[tokio::test]
async fn a_goaway_from_an_h2_upstream_is_survived() {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};

    // An h2 upstream that sends GOAWAY (graceful, NO_ERROR) on every connection as soon as
    // its first request arrives, answers that request, and closes.
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let mut config = (*ca.server_config(&["localhost"])).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let tls = acceptor.accept(tcp).await.unwrap();
                let arrived = Arc::new(tokio::sync::Notify::new());
                let signal = arrived.clone();
                let svc = hyper::service::service_fn(move |_req| {
                    signal.notify_one();
                    async {
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    () = arrived.notified() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
    let tokens = support::hub().await;
    let tg = start_with(
        &tokens.token_url(),
        &format!("https://localhost:{port}"),
        &ca_line(&ca_file),
    )
    .await;
    let client = client();
    for i in 0..5 {
        let res = client.get(tg.url("/v2/orders")).send().await.unwrap();
        assert_eq!(res.status(), 200, "request {i}");
        assert_eq!(res.text().await.unwrap(), "ok");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        5,
        "one connection per GOAWAY"
    );
    for kind in ["reset", "other", "connect"] {
        assert_eq!(upstream_errors(&tg, kind).await, Some(0.0), "{kind}");
    }
    tg.stop().await;
}
