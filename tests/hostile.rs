//! Hostile input and faults (issue 7): tokengate is a security boundary and sits on the
//! critical path, so these tests try to break it and check that nothing crashes, nothing
//! leaks and no call is lost silently.
//!
//! - open-proxy and `Host` tricks that `tests/proxy.rs` does not already cover
//!   (percent-encoded hosts, a second `Host`, IPv6 literals): the request reaches the
//!   configured upstream or gets 403/400, and a "trap" listener where a wrong forward would
//!   land sees nothing, token requests included;
//! - malformed HTTP from clients over raw TCP: hyper's own 400/431 or a closed connection for
//!   what cannot be parsed, and what reaches the upstream (the stand-in's recordings) is never
//!   ambiguous; after each, the process keeps serving;
//! - clients that go away mid-body, mid-response or after a whole request (half-closed or
//!   gone), and slow or silent clients (`header_read_timeout`);
//! - faults upstream (reset mid-body, slow drip, a 5xx storm, no answer) with tiny raw-TCP
//!   "upstreams" for what the stand-in cannot do;
//! - token endpoint faults through a running tokengate, scripted after a first good token:
//!   each shows in `/status` `last_error` and `tokengate_token_fetch_errors_total{kind}`, and
//!   the token in use stays in use while it is valid.
//!
//! Decisions recorded here: HTTP/1.0 without `Host` and HTTP/1.1 with a second `Host` are
//! forwarded (tokengate never routes by `Host`; the upstream always gets exactly one, its
//! own); header values with obs-text bytes pass through unchanged (RFC 9110 §5.5 allows them
//! and they are not ambiguous); bare LF ends a header line as RFC 9112 §2.2 permits.
//!
//! Not here: wrong CA / wrong name (`tests/tls.rs`), the other absolute-form cases, CONNECT,
//! refused connections and `request_timeout` (`tests/proxy.rs`), secrets (`tests/secrets.rs`).
#![allow(clippy::unwrap_used)]

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{json, Value};
use support::{
    client, raw_bytes, sample, start, start_toml, start_with, token_issue, token_raw, wait_sample,
    RawResponse,
};
use tokengate::standin::{ApiReply, Hub, HubOptions, TokenReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const UPSTREAM_KINDS: [&str; 6] = ["connect", "tls", "timeout", "reset", "proxy", "other"];

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// tokengate for `hub` with `server` lines in `[server]` and `extra` in the integration.
async fn start_server(hub: &Hub, server: &str, extra: &str) -> support::Tg {
    let toml =
        support::toml_for(hub, extra).replacen("[server]\n", &format!("[server]\n{server}\n"), 1);
    let tg = start_toml(&toml).await;
    tg.ready().await;
    tg
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// How a raw exchange ended.
#[derive(Debug, PartialEq)]
enum Ending {
    /// The server closed the connection (EOF or reset).
    Closed,
    /// Nothing more arrived for a while, the connection still open.
    Quiet,
}

/// Sends `request` and reads until the server closes or is quiet for `quiet`.
async fn exchange(addr: SocketAddr, request: &[u8], quiet: Duration) -> (Vec<u8>, Ending) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_until_end(&mut s, quiet).await
}

async fn read_until_end(s: &mut TcpStream, quiet: Duration) -> (Vec<u8>, Ending) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (out, Ending::Closed),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (out, Ending::Quiet),
        }
    }
}

/// The length of a chunked body at the start of `bytes` (no trailers), or all of it when
/// it is incomplete.
fn chunked_len(bytes: &[u8]) -> usize {
    let mut pos = 0;
    loop {
        let Some(line) = find(&bytes[pos..], b"\r\n") else {
            return bytes.len();
        };
        let size_text = String::from_utf8_lossy(&bytes[pos..pos + line]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        pos += line + 2;
        if size == 0 {
            return (pos + 2).min(bytes.len());
        }
        pos += size + 2;
        if pos > bytes.len() {
            return bytes.len();
        }
    }
}

/// Every complete HTTP/1.1 response in `bytes`, in order.
fn split_responses(mut bytes: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(head_end) = find(bytes, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..head_end]).to_ascii_lowercase();
        let start = head_end + 4;
        let len = if let Some(cl) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
        {
            cl
        } else if head.contains("transfer-encoding: chunked") {
            chunked_len(&bytes[start..])
        } else {
            bytes.len() - start
        };
        let end = (start + len).min(bytes.len());
        out.push(RawResponse::parse(&bytes[..end]));
        bytes = &bytes[end..];
    }
    out
}

/// The status of the first response, or `None` when the connection closed without one.
fn status_of(bytes: &[u8]) -> Option<u16> {
    find(bytes, b"\r\n\r\n").map(|_| RawResponse::parse(bytes).status)
}

/// What must hold for every request the upstream ever received: one framing, one length,
/// one authority, one Authorization carrying a token the hub issued, no control characters.
fn assert_unambiguous(hub: &Hub) {
    let issued = hub.issued_tokens();
    for r in hub.api_requests() {
        let cl = r.headers.get_all("content-length").iter().count();
        let te = r.headers.get_all("transfer-encoding").iter().count();
        assert!(cl <= 1, "several Content-Length upstream: {r:?}");
        assert!(
            cl == 0 || te == 0,
            "Content-Length and Transfer-Encoding upstream: {r:?}"
        );
        if let (Some(len), true) = (r.headers.get("content-length"), r.body_complete) {
            assert_eq!(len.to_str().unwrap(), r.body_len.to_string(), "{r:?}");
        }
        assert_eq!(r.headers.get_all("host").iter().count(), 1, "{r:?}");
        assert_eq!(r.authority, Some(hub.addr().to_string()), "{r:?}");
        assert_eq!(
            r.headers.get_all("authorization").iter().count(),
            1,
            "{r:?}"
        );
        assert!(
            r.token.as_ref().is_some_and(|t| issued.contains(t)),
            "{r:?}"
        );
        for (name, value) in &r.headers {
            assert!(
                !value
                    .as_bytes()
                    .iter()
                    .any(|b| matches!(b, b'\r' | b'\n' | 0)),
                "{name}: {value:?}"
            );
        }
    }
}

/// A normal request still succeeds and reaches the upstream with a token.
async fn assert_still_serving(tg: &support::Tg, hub: &Hub) {
    let before = hub.api_request_count();
    let res = client()
        .get(tg.url("/v2/still-serving"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{:?}", res.headers());
    res.bytes().await.unwrap();
    hub.wait_api_requests(before + 1).await;
    assert_eq!(hub.api_requests().last().unwrap().uri, "/v2/still-serving");
}

async fn upstream_errors(tg: &support::Tg) -> Vec<(&'static str, f64)> {
    let text = tg.metrics().await;
    UPSTREAM_KINDS
        .iter()
        .map(|k| {
            let v = sample(
                &text,
                "tokengate_upstream_errors_total",
                &[("integration", "oms"), ("kind", k)],
            );
            (*k, v.unwrap())
        })
        .filter(|(_, v)| *v != 0.0)
        .collect()
}

/// Reads up to the end of a request head; false when the connection ended first.
async fn read_head(s: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while find(&head, b"\r\n\r\n").is_none() {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// A tiny raw-TCP "upstream" for faults the stand-in cannot produce: each connection's
/// request head is read, then `answer` gets the socket.
async fn raw_upstream<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                if read_head(&mut s).await {
                    answer(s).await;
                }
            });
        }
    });
    addr
}

/// A TCP relay in front of `to` that counts the connections open through it, to see
/// whether tokengate closes upstream connections it can no longer use.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicUsize>,
}

async fn relay(to: SocketAddr) -> Relay {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let counter = counter.clone();
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Relay { addr, open }
}

/// A trap listener: where a wrong forward would land. It must see nothing at all.
fn assert_trap_untouched(trap: &Hub) {
    assert_eq!(trap.api_request_count(), 0, "{:?}", trap.api_requests());
    assert_eq!(trap.token_request_count(), 0);
}

// ---------------------------------------------------------------------------------------
// Never an open proxy
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn percent_encoded_hosts_never_reach_another_host() {
    let hub = support::hub().await;
    let trap = support::hub().await;
    let port = hub.addr().port();
    let trap_port = trap.addr().port();
    let tg = start_with(&hub.token_url(), &format!("http://localhost:{port}"), "").await;

    // Decoded, each of these would name the trap or smuggle it in; none may be decoded.
    let targets = [
        format!("http://%6cocalhost:{port}/a"),
        format!("http://localhost%2e:{port}/b"),
        format!("http://127.0.0.1%3A{trap_port}/c"),
        format!("http://%31%32%37.0.0.1:{trap_port}/d"),
        format!("http://localhost%3A{port}%40127.0.0.1:{trap_port}/e"),
        format!("http://localhost:{port}%2F@127.0.0.1:{trap_port}/f"),
        format!("http://127.0.0.1:{trap_port}%23@localhost:{port}/g"),
        format!("http://localhost%00.evil:{port}/h"),
    ];
    for target in &targets {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n");
        let (bytes, _) = exchange(tg.proxy, request.as_bytes(), Duration::from_secs(5)).await;
        let status = status_of(&bytes);
        // hyper refuses what is not a URI (400); tokengate refuses a URI for another host (403).
        assert!(
            matches!(status, Some(400 | 403)),
            "{target}: {status:?} {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    assert_eq!(hub.api_request_count(), 0, "{:?}", hub.api_requests());
    assert_trap_untouched(&trap);
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn a_second_host_header_does_not_choose_the_upstream() {
    let hub = support::hub().await;
    let trap = support::hub().await;
    let tg = start(&hub, "").await;
    let authority = hub.addr().to_string();
    let trap_authority = trap.addr().to_string();

    let requests = [
        format!("GET /v2/one HTTP/1.1\r\nHost: {authority}\r\nHost: {trap_authority}\r\nConnection: close\r\n\r\n"),
        format!("GET /v2/two HTTP/1.1\r\nHost: {trap_authority}\r\nHost: {authority}\r\nConnection: close\r\n\r\n"),
        // Absolute-form decides (RFC 9112 §3.2.2), whatever the Host lines say.
        format!("GET http://{authority}/v2/three HTTP/1.1\r\nHost: {trap_authority}\r\nHost: evil.example\r\nConnection: close\r\n\r\n"),
    ];
    for (i, request) in requests.iter().enumerate() {
        let res = RawResponse::parse(&raw_bytes(tg.proxy, request.as_bytes()).await);
        assert_eq!(res.status, 200, "{request}: {res:?}");
        hub.wait_api_requests(i + 1).await;
    }
    let paths: Vec<String> = hub.api_requests().into_iter().map(|r| r.uri).collect();
    assert_eq!(paths, ["/v2/one", "/v2/two", "/v2/three"]);
    // Exactly one Host upstream, the upstream's own.
    assert_unambiguous(&hub);

    // And an absolute-form target for the trap is refused whatever the Host lines say.
    let request = format!(
        "GET http://{trap_authority}/v2/four HTTP/1.1\r\nHost: {authority}\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    );
    let res = RawResponse::parse(&raw_bytes(tg.proxy, request.as_bytes()).await);
    assert_eq!(res.status, 403, "{res:?}");
    assert_eq!(res.header("x-tokengate-error"), Some("host_not_allowed"));
    assert_eq!(hub.api_request_count(), 3);
    assert_trap_untouched(&trap);
    tg.stop().await;
}

#[tokio::test]
async fn ipv6_literals_reach_only_the_ipv6_upstream() {
    // The hub on [::1]:P and a trap on 127.0.0.1:P, the same port on the other loopback
    // address: a tokengate that resolved a target itself would land in the trap.
    let (hub, trap) = loop {
        let hub = Hub::start(
            TcpListener::bind("[::1]:0").await.unwrap(),
            HubOptions::default(),
        )
        .await
        .unwrap();
        if let Ok(l) = TcpListener::bind(("127.0.0.1", hub.addr().port())).await {
            break (hub, Hub::start(l, HubOptions::default()).await.unwrap());
        }
    };
    let port = hub.addr().port();
    assert_eq!(hub.base_url(), format!("http://[::1]:{port}"));
    let tg = start_with(&hub.token_url(), &hub.base_url(), "").await;

    let forwarded = [
        (format!("http://[::1]:{port}/v2/a"), "/v2/a"),
        ("http://[::1]/v2/b".to_owned(), "/v2/b"),
        // origin-form with the trap as Host: Host never chooses the upstream.
        ("/v2/c".to_owned(), "/v2/c"),
    ];
    for (i, (target, path)) in forwarded.iter().enumerate() {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        let res = RawResponse::parse(&raw_bytes(tg.proxy, request.as_bytes()).await);
        assert_eq!(res.status, 200, "{target}: {res:?}");
        hub.wait_api_requests(i + 1).await;
        let seen = &hub.api_requests()[i];
        assert_eq!(seen.uri, *path);
        assert_eq!(seen.authority, Some(format!("[::1]:{port}")));
    }
    // Other spellings of the same address are compared as text (the contract's rule), so
    // they are refused rather than resolved; so are other hosts.
    let refused = [
        format!("http://[0:0:0:0:0:0:0:1]:{port}/v2/x"),
        format!("http://[::ffff:127.0.0.1]:{port}/v2/x"),
        format!("http://127.0.0.1:{port}/v2/x"),
        format!("http://localhost:{port}/v2/x"),
        format!("http://[::2]:{port}/v2/x"),
        format!("http://[::1]:{}/v2/x", port.wrapping_add(1)),
    ];
    for target in &refused {
        let request =
            format!("GET {target} HTTP/1.1\r\nHost: [::1]:{port}\r\nConnection: close\r\n\r\n");
        let res = RawResponse::parse(&raw_bytes(tg.proxy, request.as_bytes()).await);
        assert_eq!(res.status, 403, "{target}: {res:?}");
        assert_eq!(res.header("x-tokengate-error"), Some("host_not_allowed"));
    }
    // A zone id is not a URI hyper accepts.
    let request = format!(
        "GET http://[::1%25lo]:{port}/v2/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let (bytes, _) = exchange(tg.proxy, request.as_bytes(), Duration::from_secs(5)).await;
    assert!(
        matches!(status_of(&bytes), Some(400 | 403)),
        "{}",
        String::from_utf8_lossy(&bytes)
    );

    assert_eq!(hub.api_request_count(), forwarded.len());
    assert_trap_untouched(&trap);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------
// Malformed HTTP from clients
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn content_length_with_transfer_encoding_is_forwarded_once_as_chunked() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    // Each carries a second request after the chunked body; a server that framed by
    // Content-Length instead would see a different second request. hyper frames by
    // Transfer-Encoding (RFC 9112 §6.3), drops Content-Length and closes the connection
    // after the response, so the trailing request is never served.
    let heads = [
        "Content-Length: 3\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n",
        "Content-Length: 30\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n",
    ];
    for (i, head) in heads.iter().enumerate() {
        let request = format!(
            "POST /v2/framing HTTP/1.1\r\nHost: x\r\n{head}\r\n5\r\nhello\r\n0\r\n\r\nGET /v2/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let (bytes, ending) = exchange(tg.proxy, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(
            ending,
            Ending::Closed,
            "the connection must close after a conflicting request"
        );
        let responses = split_responses(&bytes);
        assert_eq!(
            responses.len(),
            1,
            "{head:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(responses[0].status, 200);
        assert_eq!(responses[0].header("connection"), Some("close"));
        hub.wait_api_requests(i + 1).await;
        let seen = hub.api_requests().pop().unwrap();
        assert_eq!(seen.uri, "/v2/framing");
        assert_eq!(seen.body, Bytes::from_static(b"hello"));
        assert!(seen.body_complete);
        assert_eq!(seen.headers.get("transfer-encoding").unwrap(), "chunked");
    }
    assert!(hub.api_requests().iter().all(|r| r.uri != "/v2/smuggled"));
    assert_unambiguous(&hub);
    assert_eq!(upstream_errors(&tg).await, []);
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn transfer_encodings_that_do_not_end_in_chunked_are_refused() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let requests = [
        // RFC 9112 §6.3: chunked must be the final coding of a request, else 400.
        "POST /v2/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /v2/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nContent-Length: 5\r\n\r\nhello",
        "POST /v2/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        "POST /v2/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /v2/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        // Whitespace before the colon (RFC 9112 §5.1: MUST be rejected).
        "POST /v2/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\nhello",
        // HTTP/1.0 has no transfer codings (RFC 9112 §6.1).
        "POST /v2/x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ];
    for request in requests {
        let (bytes, ending) = exchange(tg.proxy, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(
            status_of(&bytes),
            Some(400),
            "{request:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(ending, Ending::Closed, "{request:?}");
    }
    assert_eq!(hub.api_request_count(), 0, "{:?}", hub.api_requests());
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn differing_or_invalid_content_lengths_are_refused() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let refused = [
        "Content-Length: 3\r\nContent-Length: 4\r\n",
        "Content-Length: 3, 4\r\n",
        // RFC 9110 §8.6 lets a recipient accept a list of equal values; hyper is stricter.
        "Content-Length: 4, 4\r\n",
        "Content-Length: -1\r\n",
        "Content-Length: +4\r\n",
        "Content-Length: 0x4\r\n",
        "Content-Length: 4 4\r\n",
        "Content-Length: 99999999999999999999999\r\n",
    ];
    for head in refused {
        let request = format!("POST /v2/x HTTP/1.1\r\nHost: x\r\n{head}\r\nabcd");
        let (bytes, ending) = exchange(tg.proxy, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(
            status_of(&bytes),
            Some(400),
            "{head:?}: {}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(ending, Ending::Closed);
    }
    assert_eq!(hub.api_request_count(), 0, "{:?}", hub.api_requests());

    // The same length on two lines is one length (RFC 9110 §8.6): forwarded with a single
    // header.
    let request = "POST /v2/same HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 4\r\n\
        Connection: close\r\n\r\nabcd";
    let res = RawResponse::parse(&raw_bytes(tg.proxy, request.as_bytes()).await);
    assert_eq!(res.status, 200, "{res:?}");
    hub.wait_api_requests(1).await;
    let seen = hub.api_requests().pop().unwrap();
    assert_eq!(seen.body, Bytes::from_static(b"abcd"));
    assert_eq!(seen.headers.get_all("content-length").iter().count(), 1);
    assert_unambiguous(&hub);
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn invalid_chunks_are_a_client_error_and_never_a_complete_upstream_body() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let bodies = [
        "zz\r\nhello\r\n0\r\n\r\n",
        "-5\r\nhello\r\n0\r\n\r\n",
        "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        // Five bytes declared, more sent before the CRLF.
        "5\r\nhello, world\r\n0\r\n\r\n",
        // A good chunk, then garbage.
        "5\r\nhello\r\n5 5\r\nworld\r\n0\r\n\r\n",
    ];
    for (i, body) in bodies.iter().enumerate() {
        let request = format!(
            "POST /v2/chunks/{i} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{body}"
        );
        let (bytes, ending) = exchange(tg.proxy, request.as_bytes(), Duration::from_secs(5)).await;
        // The head was fine, so tokengate started forwarding; the body then failed. That is
        // the client's error: 400 bad_request, or a closed connection, never 502.
        match status_of(&bytes) {
            Some(status) => {
                let res = RawResponse::parse(&bytes);
                assert_eq!(status, 400, "{body:?}: {res:?}");
                if let Some(code) = res.header("x-tokengate-error") {
                    assert_eq!(code, "bad_request");
                }
            }
            None => assert_eq!(ending, Ending::Closed),
        }
    }
    // The upstream saw an incomplete request or nothing, never a complete one.
    for r in hub.api_requests() {
        assert!(!r.body_complete, "{r:?}");
    }
    assert_unambiguous(&hub);
    assert_eq!(
        upstream_errors(&tg).await,
        [],
        "a client's bad body is not an upstream error"
    );
    wait_sample(
        &tg,
        "tokengate_in_flight_requests",
        &[("integration", "oms")],
        0.0,
    )
    .await;
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn control_characters_in_headers_are_refused_and_bare_lf_ends_a_line() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let refused: [&[u8]; 7] = [
        b"X-A: a\0b\r\n",
        b"X-A: a\rb\r\n",
        b"X-A: a\r\r\n",
        // obs-fold (RFC 9112 §5.2: a server may reject it; hyper does).
        b"X-A: a\r\n b\r\n",
        b"X-A: a\r\n\tb\r\n",
        b"X A: b\r\n",
        b"X-\x7fA: b\r\n",
    ];
    for header in refused {
        let request = [
            b"GET /v2/x HTTP/1.1\r\nHost: x\r\n".as_slice(),
            header,
            b"Connection: close\r\n\r\n",
        ]
        .concat();
        let (bytes, ending) = exchange(tg.proxy, &request, Duration::from_secs(5)).await;
        assert_eq!(
            status_of(&bytes),
            Some(400),
            "{:?}: {}",
            String::from_utf8_lossy(header),
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(ending, Ending::Closed);
    }
    assert_eq!(hub.api_request_count(), 0, "{:?}", hub.api_requests());

    // A bare LF ends the line (RFC 9112 §2.2 lets a recipient accept it): two headers, each
    // re-sent upstream with CRLF, neither carrying the other.
    let res = RawResponse::parse(
        &raw_bytes(
            tg.proxy,
            b"GET /v2/lf HTTP/1.1\r\nHost: x\r\nX-A: a\nX-B: b\r\nConnection: close\r\n\r\n",
        )
        .await,
    );
    assert_eq!(res.status, 200, "{res:?}");
    // obs-text passes through unchanged (RFC 9110 §5.5).
    let res = RawResponse::parse(
        &raw_bytes(
            tg.proxy,
            b"GET /v2/obs HTTP/1.1\r\nHost: x\r\nX-Obs: caf\xe9 \xff\r\nConnection: close\r\n\r\n",
        )
        .await,
    );
    assert_eq!(res.status, 200, "{res:?}");
    hub.wait_api_requests(2).await;
    let seen = hub.api_requests();
    assert_eq!(seen[0].headers["x-a"], "a");
    assert_eq!(seen[0].headers["x-b"], "b");
    assert_eq!(seen[1].headers["x-obs"].as_bytes(), b"caf\xe9 \xff");
    assert_unambiguous(&hub);
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

/// The head limit is tokengate's per-connection buffer bound (256 KiB), not hyper's ~400 KB
/// default: a head just under it is forwarded whole, one just over it is a 431.
#[tokio::test]
async fn request_heads_up_to_256_kib_pass_larger_get_431() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let head = |n: usize| {
        format!(
            "GET /v2/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: {}\r\n\r\n",
            "a".repeat(n)
        )
    };
    let (bytes, _) = exchange(
        tg.proxy,
        head(250 * 1024).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&bytes), Some(200));
    let forwarded = hub.api_requests();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded[0].headers["x-big"].len(), 250 * 1024);

    let (bytes, ending) = exchange(
        tg.proxy,
        head(300 * 1024).as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status_of(&bytes), Some(431));
    assert_eq!(ending, Ending::Closed);
    assert_eq!(hub.api_request_count(), 1);
    tg.stop().await;
}

/// The same bound on the upstream side: a response head under 256 KiB comes back whole, a
/// larger one is tokengate's 502, not a buffer grown without limit.
#[tokio::test]
async fn upstream_response_heads_over_256_kib_are_a_502() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let reply = |n: usize| ApiReply {
        status: 200,
        headers: vec![("x-big".to_owned(), "b".repeat(n))],
        body: Bytes::from_static(b"{}"),
        skip_auth: false,
    };
    hub.push_api_reply(reply(200 * 1024));
    let res = client().get(tg.url("/v2/x")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-big"].len(), 200 * 1024);

    hub.push_api_reply(reply(300 * 1024));
    let res = client().get(tg.url("/v2/x")).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-tokengate-error"], "upstream_unreachable");
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn oversized_header_blocks_get_431() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let big_value = format!(
        "GET /v2/x HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(512 * 1024)
    );
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /v2/x HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    let long_target = format!(
        "GET /v2/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "p".repeat(512 * 1024)
    );
    for request in [big_value, many, long_target] {
        let (bytes, ending) = exchange(tg.proxy, request.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(
            status_of(&bytes),
            Some(431),
            "{}",
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(ending, Ending::Closed);
    }
    assert_eq!(hub.api_request_count(), 0);
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn invalid_method_tokens_are_refused_and_extension_methods_forwarded() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let refused: [&[u8]; 5] = [
        b"GE(T /v2/x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G\0T /v2/x HTTP/1.1\r\nHost: x\r\n\r\n",
        b" /v2/x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET\t/v2/x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"G\xc3\x89T /v2/x HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for request in refused {
        let (bytes, ending) = exchange(tg.proxy, request, Duration::from_secs(5)).await;
        assert_eq!(
            status_of(&bytes),
            Some(400),
            "{:?}: {}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&bytes)
        );
        assert_eq!(ending, Ending::Closed);
    }
    assert_eq!(hub.api_request_count(), 0);

    // A valid token that is no standard method is a method like any other (RFC 9110 §9.1),
    // counted as `other`.
    let res = RawResponse::parse(
        &raw_bytes(
            tg.proxy,
            b"PURGE /v2/cache HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await,
    );
    assert_eq!(res.status, 200, "{res:?}");
    hub.wait_api_requests(1).await;
    assert_eq!(hub.api_requests()[0].method, "PURGE");
    let text = tg.metrics().await;
    assert_eq!(
        sample(
            &text,
            "tokengate_requests_total",
            &[("integration", "oms"), ("method", "other"), ("code", "200")]
        ),
        Some(1.0)
    );
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn http10_without_host_is_forwarded_with_the_upstreams_host() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    // Decision: served. RFC 9112 §3.2 requires Host only from HTTP/1.1 clients, and
    // tokengate never routes by Host; the upstream gets HTTP/1.1 with its own authority.
    let (bytes, ending) = exchange(
        tg.proxy,
        b"GET /v2/old?x=1 HTTP/1.0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(ending, Ending::Closed, "HTTP/1.0 without keep-alive closes");
    let res = RawResponse::parse(&bytes);
    assert_eq!(res.status, 200, "{res:?}");
    assert!(String::from_utf8_lossy(&bytes).starts_with("HTTP/1.0 200"));
    hub.wait_api_requests(1).await;
    let seen = &hub.api_requests()[0];
    assert_eq!(seen.version, http::Version::HTTP_11);
    assert_eq!(seen.uri, "/v2/old?x=1");
    assert_unambiguous(&hub);

    // An HTTP/1.0 body is framed by Content-Length only.
    let res = RawResponse::parse(
        &raw_bytes(
            tg.proxy,
            b"POST /echo-body HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello",
        )
        .await,
    );
    assert_eq!(res.status, 200, "{res:?}");
    assert_eq!(res.body, b"hello");
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_and_forwarded_intact() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let pipeline = "POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nfirst\
        GET /v2/second?x=1 HTTP/1.1\r\nHost: x\r\n\r\n\
        GET /echo-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nthird!\r\n0\r\n\r\n\
        POST /echo-body HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\nfourth";
    let (bytes, ending) = exchange(tg.proxy, pipeline.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(ending, Ending::Closed);
    let responses = split_responses(&bytes);
    assert_eq!(responses.len(), 4, "{}", String::from_utf8_lossy(&bytes));
    assert!(responses.iter().all(|r| r.status == 200), "{responses:?}");
    assert_eq!(responses[0].body, b"first");
    assert_eq!(responses[1].json()["path"], "/v2/second");
    // A GET with a chunked body keeps its body (hyper's client alone would drop it).
    assert_eq!(responses[2].body, b"third!");
    assert_eq!(responses[3].body, b"fourth");

    hub.wait_api_requests(4).await;
    let seen = hub.api_requests();
    let got: Vec<(&str, &str, &[u8])> = seen
        .iter()
        .map(|r| (r.method.as_str(), r.uri.as_str(), r.body.as_ref()))
        .collect();
    assert_eq!(
        got,
        [
            ("POST", "/echo-body", b"first".as_slice()),
            ("GET", "/v2/second?x=1", b""),
            ("GET", "/echo-body", b"third!"),
            ("POST", "/echo-body", b"fourth"),
        ]
    );
    // Response i answers request i: the request ids tokengate added match.
    for (res, req) in responses.iter().zip(&seen) {
        assert_eq!(
            res.header("x-request-id").unwrap(),
            req.headers["x-request-id"].to_str().unwrap()
        );
    }
    assert_unambiguous(&hub);
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn a_client_that_half_closes_after_its_request_still_gets_the_response() {
    // `printf '…' | nc -N`, and HTTP/1.0-era clients: the whole request, then FIN on the
    // write side, then read. The request is complete, so it is answered (and counted), not
    // taken for a client that left: whether the FIN arrives long before the upstream's answer
    // (a slow upstream) or about when it does (a fast one).
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    for (round, path) in [(1, "/slow/300"), (2, "/v2/orders")] {
        let mut s = TcpStream::connect(tg.proxy).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let (bytes, ending) = read_until_end(&mut s, Duration::from_secs(10)).await;
        let res = RawResponse::parse(&bytes);
        assert_eq!(res.status, 200, "round {round}: {res:?}");
        assert!(res.header("x-request-id").is_some(), "{res:?}");
        assert_eq!(
            ending,
            Ending::Closed,
            "the connection ends after the answer"
        );
        hub.wait_api_requests(round).await;
    }
    let text = tg.metrics().await;
    assert_eq!(
        sample(
            &text,
            "tokengate_requests_total",
            &[("integration", "oms"), ("method", "GET"), ("code", "200")]
        ),
        Some(2.0),
        "{text}"
    );
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn a_client_gone_before_the_response_head_leaves_its_request_to_complete() {
    // The request was whole: it is finished upstream, counted and logged with the upstream's
    // status, rather than cut off (which would cost the upstream connection).
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let mut s = TcpStream::connect(tg.proxy).await.unwrap();
    s.write_all(b"GET /slow/300 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    hub.wait_api_requests(1).await;
    drop(s);
    wait_sample(
        &tg,
        "tokengate_requests_total",
        &[("integration", "oms"), ("method", "GET"), ("code", "200")],
        1.0,
    )
    .await;
    wait_sample(
        &tg,
        "tokengate_in_flight_requests",
        &[("integration", "oms")],
        0.0,
    )
    .await;
    assert_eq!(upstream_errors(&tg).await, []);
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn a_client_leaving_mid_body_cancels_the_upstream_request() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let in_flight = [("integration", "oms")];

    // Content-Length framing: 5 of 100 000 bytes, then the client goes.
    let mut s = TcpStream::connect(tg.proxy).await.unwrap();
    s.write_all(b"POST /v2/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nhello")
        .await
        .unwrap();
    wait_sample(&tg, "tokengate_in_flight_requests", &in_flight, 1.0).await;
    drop(s);
    hub.wait_api_requests(1).await;
    let seen = &hub.api_requests()[0];
    assert!(!seen.body_complete, "{seen:?}");
    assert!(seen.body_len < 100_000);
    wait_sample(&tg, "tokengate_in_flight_requests", &in_flight, 0.0).await;

    // Chunked, to an upstream that answers while the body still streams (/echo-body): the
    // response is under way when the client goes.
    let mut s = TcpStream::connect(tg.proxy).await.unwrap();
    s.write_all(
        b"POST /echo-body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(s);
    hub.wait_api_requests(2).await;
    let seen = &hub.api_requests()[1];
    assert_eq!(seen.uri, "/echo-body");
    assert!(!seen.body_complete, "{seen:?}");
    wait_sample(&tg, "tokengate_in_flight_requests", &in_flight, 0.0).await;

    // The client's going is neither an upstream error nor a 502.
    assert_eq!(upstream_errors(&tg).await, []);
    let text = tg.metrics().await;
    assert_eq!(
        sample(
            &text,
            "tokengate_requests_total",
            &[("integration", "oms"), ("method", "POST"), ("code", "502")]
        ),
        None,
        "{text}"
    );
    assert_unambiguous(&hub);
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn a_failing_client_body_is_the_clients_error_over_an_http2_upstream_too() {
    // Delivery Hub negotiates HTTP/2, where the pooled client reports a failed request body
    // only as a reset stream: it must still be the client's 400, not an upstream error.
    let ca = support::TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write_pem(dir.path());
    let hub = support::tls_hub(&ca, &["localhost"]).await;
    let tg = start(&hub, &format!("ca_file = '{}'", ca_file.display())).await;

    let request = "POST /v2/chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
    let (bytes, _) = exchange(tg.proxy, request.as_bytes(), Duration::from_secs(5)).await;
    let res = RawResponse::parse(&bytes);
    assert_eq!(res.status, 400, "{res:?}");
    assert_eq!(res.header("x-tokengate-error"), Some("bad_request"));
    assert!(
        res.json()["message"]
            .as_str()
            .unwrap()
            .contains("request body"),
        "{res:?}"
    );

    let mut s = TcpStream::connect(tg.proxy).await.unwrap();
    s.write_all(b"POST /v2/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\nhello")
        .await
        .unwrap();
    let in_flight = [("integration", "oms")];
    wait_sample(&tg, "tokengate_in_flight_requests", &in_flight, 1.0).await;
    drop(s);
    hub.wait_api_requests(2).await;
    wait_sample(&tg, "tokengate_in_flight_requests", &in_flight, 0.0).await;

    for r in hub.api_requests() {
        assert_eq!(r.version, http::Version::HTTP_2);
        assert!(!r.body_complete, "{r:?}");
    }
    assert_eq!(upstream_errors(&tg).await, []);
    tg.stop().await;
}

#[tokio::test]
async fn a_client_abandoning_a_large_response_frees_the_upstream_connection() {
    let hub = support::hub().await;
    let relay = relay(hub.addr()).await;
    let tg = start_with(&hub.token_url(), &format!("http://{}", relay.addr), "").await;
    let in_flight = [("integration", "oms")];

    for round in 1..=3 {
        let mut s = TcpStream::connect(tg.proxy).await.unwrap();
        s.write_all(b"GET /bytes/67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 64 * 1024];
        while got < 1024 * 1024 {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {got} bytes");
            got += n;
        }
        drop(s);
        hub.wait_api_requests(round).await;
        wait_sample(&tg, "tokengate_in_flight_requests", &in_flight, 0.0).await;
        // A half-read response cannot be reused: tokengate must close that connection,
        // not keep it (and the upstream's 63 MiB) around.
        let open = relay.open.clone();
        support::eventually(
            "the abandoned upstream connection is closed",
            Duration::from_secs(10),
            || {
                let closed = open.load(Ordering::SeqCst) == 0;
                async move { closed.then_some(()) }
            },
        )
        .await;
    }
    assert_eq!(
        upstream_errors(&tg).await,
        [],
        "a client leaving is not an upstream error"
    );
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn slow_and_silent_clients_are_disconnected_while_others_are_served() {
    let hub = support::hub().await;
    let tg = start_server(&hub, r#"header_read_timeout = "500ms""#, "").await;
    let proxy = tg.proxy;

    // Slowloris: the head one byte every 100 ms, 8 s in all, far beyond the 500 ms allowed.
    let slowloris = tokio::spawn(async move {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        let head = b"GET /v2/slowloris HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for byte in head {
            if s.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        read_until_end(&mut s, Duration::from_secs(10)).await
    });
    // Silent: connects and sends nothing (the protocol is not even known yet).
    let silent = tokio::spawn(async move {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        read_until_end(&mut s, Duration::from_secs(10)).await
    });
    // HTTP/2 prior knowledge: the preface and then nothing.
    let h2_idle = tokio::spawn(async move {
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        read_until_end(&mut s, Duration::from_secs(10)).await
    });

    // Meanwhile everybody else is served.
    let mut served = 0;
    while !(slowloris.is_finished() && silent.is_finished() && h2_idle.is_finished()) {
        let res = client().get(tg.url("/v2/normal")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served > 0);

    let (bytes, ending) = slowloris.await.unwrap();
    assert_eq!(ending, Ending::Closed);
    // hyper closes without a response (or with 408); never a forwarded 200.
    assert!(
        matches!(status_of(&bytes), None | Some(408)),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    let (bytes, ending) = silent.await.unwrap();
    assert_eq!((bytes.len(), ending), (0, Ending::Closed));
    let (_, ending) = h2_idle.await.unwrap();
    assert_eq!(ending, Ending::Closed);

    assert!(hub.api_requests().iter().all(|r| r.uri == "/v2/normal"));
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

/// Writes a chunked body of `n` chunks `drip-NN;`, one every 50 ms, and its last chunk.
async fn drip(s: &mut TcpStream, n: usize) {
    for i in 0..n {
        let chunk = format!("drip-{i:02};");
        s.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
}

/// Reads one whole response (Content-Length or chunked) from a kept-alive connection.
async fn read_one_response(s: &mut TcpStream) -> RawResponse {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = find(&out, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|n| n.trim().parse::<usize>().unwrap());
            let body = &out[end + 4..];
            let complete = match length {
                Some(n) => body.len() >= n,
                None => find(body, b"0\r\n\r\n").is_some(),
            };
            if complete {
                return RawResponse::parse(&out);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("a response within 10 s")
            .unwrap();
        assert!(
            n > 0,
            "closed mid-response: {}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn a_kept_alive_connection_gets_header_read_timeout_again_after_each_response() {
    let hub = support::hub().await;
    let tg = start_server(&hub, r#"header_read_timeout = "500ms""#, "").await;

    // Idle after a response: closed, as a client that connects and sends nothing is.
    let mut idle = TcpStream::connect(tg.proxy).await.unwrap();
    idle.write_all(b"GET /v2/first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_one_response(&mut idle).await.status, 200);
    let (bytes, ending) = read_until_end(&mut idle, Duration::from_secs(10)).await;
    assert_eq!((bytes.len(), ending), (0, Ending::Closed));

    // Slowloris on the second request: its head trickles in past the deadline.
    let mut slow = TcpStream::connect(tg.proxy).await.unwrap();
    slow.write_all(b"GET /v2/first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_one_response(&mut slow).await.status, 200);
    let head = b"GET /v2/second-slow HTTP/1.1\r\nHost: x\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    for byte in head {
        if slow.write_all(&[*byte]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (bytes, ending) = read_until_end(&mut slow, Duration::from_secs(10)).await;
    assert_eq!(ending, Ending::Closed);
    assert!(
        matches!(status_of(&bytes), None | Some(408)),
        "{}",
        String::from_utf8_lossy(&bytes)
    );
    assert!(hub.api_requests().iter().all(|r| r.uri == "/v2/first"));

    // A connection that keeps sending requests, each within the deadline, is never closed,
    // however long it lives.
    let mut busy = TcpStream::connect(tg.proxy).await.unwrap();
    for i in 0..12 {
        busy.write_all(format!("GET /v2/busy-{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(read_one_response(&mut busy).await.status, 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

#[tokio::test]
async fn a_response_body_streaming_longer_than_header_read_timeout_is_not_cut() {
    let tokens = support::hub().await;
    let upstream = raw_upstream(|mut s| async move {
        loop {
            s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await
                .unwrap();
            drip(&mut s, 30).await;
            // The next request head on this kept-alive upstream connection.
            if !read_head(&mut s).await {
                return;
            }
        }
    })
    .await;
    let toml = support::toml_with(&tokens.token_url(), &format!("http://{upstream}"), "").replacen(
        "[server]\n",
        "[server]\nheader_read_timeout = \"500ms\"\n",
        1,
    );
    let tg = start_toml(&toml).await;
    tg.ready().await;
    // 1.5 s of body on a connection whose head deadline is 500 ms, twice on one connection.
    let mut s = TcpStream::connect(tg.proxy).await.unwrap();
    let want: String = (0..30).map(|i| format!("drip-{i:02};")).collect();
    for _ in 0..2 {
        s.write_all(b"GET /v2/drip HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let res = read_one_response(&mut s).await;
        assert_eq!(res.status, 200);
        assert_eq!(
            String::from_utf8_lossy(&res.body).matches("drip-").count(),
            30
        );
        assert!(String::from_utf8_lossy(&res.body).contains(&want[want.len() - 8..]));
    }
    assert_eq!(upstream_errors(&tg).await, []);
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------
// Faults upstream
// ---------------------------------------------------------------------------------------

const PARTIAL_HEAD: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n";

#[tokio::test]
async fn an_upstream_reset_mid_body_truncates_the_response_and_is_counted() {
    let tokens = support::hub().await;
    for (abort, zero_linger) in [("close", false), ("reset", true)] {
        let upstream = raw_upstream(move |mut s| async move {
            s.write_all(PARTIAL_HEAD).await.unwrap();
            s.write_all(&[b'x'; 1000]).await.unwrap();
            s.flush().await.unwrap();
            if zero_linger {
                // RST instead of FIN.
                s.set_zero_linger().unwrap();
            }
            drop(s);
        })
        .await;
        let tg = start_with(&tokens.token_url(), &format!("http://{upstream}"), "").await;

        let (bytes, ending) = exchange(
            tg.proxy,
            b"GET /v2/big HTTP/1.1\r\nHost: x\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        // The status and head went out before the body failed: what the client can see is a
        // body shorter than its Content-Length and the connection closed under it.
        assert_eq!(ending, Ending::Closed, "{abort}");
        let res = RawResponse::parse(&bytes);
        assert_eq!(res.status, 200);
        assert_eq!(res.header("content-length"), Some("100000"));
        assert!(res.body.len() < 100_000, "{abort}: {}", res.body.len());

        // What the operator sees: the upstream error counter (and a warning in the log).
        wait_sample(
            &tg,
            "tokengate_upstream_errors_total",
            &[("integration", "oms"), ("kind", "reset")],
            1.0,
        )
        .await;
        assert_eq!(upstream_errors(&tg).await, [("reset", 1.0)], "{abort}");
        wait_sample(
            &tg,
            "tokengate_in_flight_requests",
            &[("integration", "oms")],
            0.0,
        )
        .await;
        tg.stop().await;
    }
}

#[tokio::test]
async fn an_upstream_closing_without_an_answer_is_502_reset() {
    let tokens = support::hub().await;
    let upstream = raw_upstream(|s| async move { drop(s) }).await;
    let tg = start_with(&tokens.token_url(), &format!("http://{upstream}"), "").await;
    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["x-tokengate-error"], "upstream_unreachable");
    let body: Value = res.json().await.unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("(reset)"),
        "{body}"
    );
    assert_eq!(upstream_errors(&tg).await, [("reset", 1.0)]);
    tg.stop().await;
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_504() {
    let tokens = support::hub().await;
    let accepted = Arc::new(AtomicUsize::new(0));
    let seen = accepted.clone();
    let upstream = raw_upstream(move |s| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            // Holds the connection open and says nothing.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(s);
        }
    })
    .await;
    let tg = start_with(
        &tokens.token_url(),
        &format!("http://{upstream}"),
        r#"request_timeout = "300ms""#,
    )
    .await;
    let res = client().get(tg.url("/v2/orders")).send().await.unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(res.headers()["x-tokengate-error"], "upstream_timeout");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "the request did reach the upstream"
    );
    assert_eq!(upstream_errors(&tg).await, [("timeout", 1.0)]);
    wait_sample(
        &tg,
        "tokengate_in_flight_requests",
        &[("integration", "oms")],
        0.0,
    )
    .await;
    tg.stop().await;
}

#[tokio::test]
async fn a_slow_drip_response_passes_through_intact() {
    let tokens = support::hub().await;
    let upstream = raw_upstream(|mut s| async move {
        s.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await
        .unwrap();
        drip(&mut s, 20).await;
        let _ = s.read(&mut [0u8; 1]).await;
    })
    .await;
    // request_timeout ends at the response head: a body that takes longer is fine.
    let tg = start_with(
        &tokens.token_url(),
        &format!("http://{upstream}"),
        r#"request_timeout = "300ms""#,
    )
    .await;
    let res = client().get(tg.url("/v2/drip")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.text().await.unwrap();
    let want: String = (0..20).map(|i| format!("drip-{i:02};")).collect();
    assert_eq!(body, want);
    assert_eq!(upstream_errors(&tg).await, []);
    tg.stop().await;
}

#[tokio::test]
async fn a_5xx_storm_passes_through_and_keeps_the_token() {
    let hub = support::hub().await;
    let tg = start(&hub, "").await;
    let token_requests = hub.token_request_count();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u16 {
        let url = tg.url(&format!(
            "/status/{}",
            [500, 502, 503, 504][usize::from(i % 4)]
        ));
        tasks.spawn(async move {
            let res = client().get(url).send().await.unwrap();
            let status = res.status().as_u16();
            let tokengate_error = res.headers().contains_key("x-tokengate-error");
            let body: Value = res.json().await.unwrap();
            (status, tokengate_error, body)
        });
        if tasks.len() >= 20 {
            let (status, tokengate_error, body) = tasks.join_next().await.unwrap().unwrap();
            assert!(!tokengate_error);
            assert_eq!(body, json!({"status": status}));
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (status, tokengate_error, body) = done.unwrap();
        assert!(!tokengate_error);
        assert_eq!(body, json!({"status": status}));
    }
    hub.wait_api_requests(200).await;
    // Not one token request for all those 5xx, and every call carried the same token.
    assert_eq!(hub.token_request_count(), token_requests);
    let first = &hub.issued_tokens()[0];
    assert!(hub
        .api_requests()
        .iter()
        .all(|r| r.token.as_ref() == Some(first)));
    assert_eq!(
        upstream_errors(&tg).await,
        [],
        "a 5xx is an answer, not an upstream error"
    );
    let text = tg.metrics().await;
    for code in ["500", "502", "503", "504"] {
        assert_eq!(
            sample(
                &text,
                "tokengate_requests_total",
                &[("integration", "oms"), ("method", "GET"), ("code", code)]
            ),
            Some(50.0)
        );
    }
    assert_still_serving(&tg, &hub).await;
    tg.stop().await;
}

// ---------------------------------------------------------------------------------------
// Faults at the token endpoint, through a running tokengate
// ---------------------------------------------------------------------------------------

/// Tokens live 10 s and the first scheduled refresh comes after 1 to 1.5 s
/// (`refresh_at = 0.1`): the fault hits that refresh, while the first token has 8 s left.
async fn token_fault_gate(extra: &str) -> (Hub, support::Tg) {
    let hub = support::hub_with(HubOptions {
        token_lifetime: Duration::from_secs(10),
        ..HubOptions::default()
    })
    .await;
    let tg = start(&hub, &format!("refresh_at = 0.1\n{extra}")).await;
    (hub, tg)
}

async fn status(tg: &support::Tg) -> Value {
    tg.status().await["integrations"][0].clone()
}

/// Scripts `fault` for the first scheduled refresh (after a first good token), then checks
/// the contract: the error shows in `/status` and in the fetch-error counter under `kind`,
/// the first token stays in use meanwhile, and the next attempt recovers. Returns the
/// `last_error` text.
async fn token_fault(fault: Vec<TokenReply>, kind: &str, extra: &str) -> String {
    let (hub, tg) = token_fault_gate(extra).await;
    let first = hub.issued_tokens()[0].clone();
    for reply in fault {
        hub.push_token_reply(reply);
    }
    // The retry after the fault is held back for 2 s, so last_error can be read before a
    // success clears it.
    hub.push_token_reply(TokenReply::Delay(Duration::from_secs(2)));
    hub.push_token_reply(TokenReply::Normal);

    let errors = [("integration", "oms"), ("kind", kind)];
    wait_sample(&tg, "tokengate_token_fetch_errors_total", &errors, 1.0).await;
    let s = status(&tg).await;
    let last_error = s["last_error"].as_str().unwrap_or_default().to_owned();
    assert!(!last_error.is_empty(), "{s}");
    assert_eq!(s["token"]["valid"], true, "{s}");
    assert_eq!(s["token"]["generation"], 1, "{s}");
    // The token endpoint's failure is not the client's: calls go on with the first token.
    let before = hub.api_request_count();
    let res = client()
        .get(tg.url("/v2/during-fault"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    hub.wait_api_requests(before + 1).await;
    assert_eq!(
        hub.api_requests().last().unwrap().token.as_ref(),
        Some(&first)
    );
    let text = tg.metrics().await;
    assert_eq!(
        sample(&text, "tokengate_token_valid", &[("integration", "oms")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "tokengate_token_refreshes_total",
            &[
                ("integration", "oms"),
                ("trigger", "scheduled"),
                ("result", "failure")
            ]
        ),
        sample(&text, "tokengate_token_fetch_errors_total", &errors),
    );

    // Then the endpoint recovers and a new token takes over.
    wait_sample(
        &tg,
        "tokengate_token_refreshes_total",
        &[
            ("integration", "oms"),
            ("trigger", "scheduled"),
            ("result", "success"),
        ],
        1.0,
    )
    .await;
    let res = client()
        .get(tg.url("/v2/after-fault"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let used = hub.api_requests().last().unwrap().token.clone().unwrap();
    assert_ne!(used, first);
    assert!(hub.issued_tokens().contains(&used));
    assert_eq!(status(&tg).await["last_error"], Value::Null);
    tg.stop().await;
    last_error
}

#[tokio::test]
async fn token_endpoint_html_page_keeps_the_current_token() {
    let page =
        "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>";
    let err = token_fault(
        vec![token_raw(200, Some("text/html"), page)],
        "bad_response",
        "",
    )
    .await;
    assert!(
        err.contains("HTML page titled \"502 bad gateway\""),
        "{err}"
    );
}

#[tokio::test]
async fn token_endpoint_empty_200_keeps_the_current_token() {
    let err = token_fault(
        vec![token_raw(200, Some("application/json"), "")],
        "bad_response",
        "",
    )
    .await;
    assert!(err.contains("an empty body"), "{err}");
}

#[tokio::test]
async fn token_endpoint_expires_in_zero_keeps_the_current_token() {
    let err = token_fault(
        vec![token_issue(Some(json!(0)), Some(json!("Bearer")))],
        "bad_response",
        "",
    )
    .await;
    assert!(err.contains("expires_in is 0"), "{err}");
}

#[tokio::test]
async fn token_endpoint_negative_expires_in_keeps_the_current_token() {
    let err = token_fault(
        vec![token_issue(Some(json!(-3600)), Some(json!("Bearer")))],
        "bad_response",
        "",
    )
    .await;
    assert!(err.contains("expires_in is -3600"), "{err}");
}

#[tokio::test]
async fn token_endpoint_string_expires_in_keeps_the_current_token() {
    let err = token_fault(
        vec![token_issue(Some(json!("soon")), Some(json!("Bearer")))],
        "bad_response",
        "",
    )
    .await;
    assert!(err.contains("expires_in \"soon\" is not a number"), "{err}");
}

#[tokio::test]
async fn token_endpoint_mac_token_type_keeps_the_current_token() {
    let err = token_fault(
        vec![token_issue(Some(json!(3600)), Some(json!("mac")))],
        "bad_response",
        "",
    )
    .await;
    assert!(err.contains("token_type is \"mac\""), "{err}");
}

#[tokio::test]
async fn token_endpoint_10_mib_body_is_cut_at_64_kib() {
    let mut body = b"{\"access_token\":\"".to_vec();
    body.resize(10 * 1024 * 1024, b'a');
    body.extend_from_slice(b"\"}");
    let err = token_fault(
        vec![token_raw(200, Some("application/json"), body)],
        "bad_response",
        "",
    )
    .await;
    // Read no further than 64 KiB: the 10 MiB never sits in memory.
    assert!(err.contains("larger than 64 KiB"), "{err}");
}

#[tokio::test]
async fn token_endpoint_that_never_answers_times_out() {
    let err = token_fault(vec![TokenReply::Hang], "timeout", r#"token_timeout = "1s""#).await;
    assert!(
        err.contains("did not answer within token_timeout (1s)"),
        "{err}"
    );
}

#[tokio::test]
async fn token_endpoint_huge_expires_in_is_capped_at_a_day() {
    let (hub, tg) = token_fault_gate("").await;
    let first = hub.issued_tokens()[0].clone();
    hub.push_token_reply(token_issue(
        Some(json!(999_999_999_999u64)),
        Some(json!("bearer")),
    ));
    wait_sample(
        &tg,
        "tokengate_token_refreshes_total",
        &[
            ("integration", "oms"),
            ("trigger", "scheduled"),
            ("result", "success"),
        ],
        1.0,
    )
    .await;
    // Accepted (with a warning in the log), but as 24 h, not 31 000 years.
    let s = status(&tg).await;
    assert_eq!(s["token"]["lifetime_s"], 86_400, "{s}");
    assert_eq!(s["last_error"], Value::Null);
    let text = tg.metrics().await;
    for kind in ["bad_response", "timeout", "server_error"] {
        assert_eq!(
            sample(
                &text,
                "tokengate_token_fetch_errors_total",
                &[("integration", "oms"), ("kind", kind)]
            ),
            Some(0.0)
        );
    }
    let res = client().get(tg.url("/v2/after")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let used = hub.api_requests().last().unwrap().token.clone().unwrap();
    assert_ne!(used, first);
    tg.stop().await;
}
