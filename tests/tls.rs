//! TLS towards the upstream (`tokengate::tls` and the proxy's upstream connections): a private
//! CA through `ca_file`, HTTP/2 by ALPN (one connection shared by every client, a GOAWAY
//! survived), verification that cannot be skipped (unknown issuer, wrong name), and the rule
//! that plain `http://` is only for loopback upstreams. The
//! stand-in hub serves TLS with rcgen certificates made per test.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;

use serde_json::Value;
use support::{client, sample, start, start_with, tls_hub, TestCa};
use tokengate::config::Config;
use tokengate::config::ProxyEnv;

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

    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-tokengate-error"], "upstream_unreachable");
    let body: Value = res.json().await.unwrap();
    let message = body["message"].as_str().unwrap().to_lowercase();
    assert!(message.contains("tls"), "{message}");
    assert_eq!(upstream.api_request_count(), 0);
    assert_eq!(upstream_errors(&tg, "tls").await, Some(1.0));
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
