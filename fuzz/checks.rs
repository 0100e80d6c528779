//! The invariants the fuzz targets check, in one place: the cargo-fuzz targets include this
//! file (`#[path]`), and so does `tests/properties.rs`, which also replays `fuzz/seeds/` so a
//! CI without a nightly toolchain still runs every seed through the same checks.
//!
//! Each function takes raw bytes, as libFuzzer hands them over, and panics when an invariant
//! breaks. It does no I/O.
// Each fuzz target uses half of this file.
#![allow(dead_code)]

use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{StatusCode, Uri};
use tokengate::config::Endpoint;
use tokengate::error::ErrorCode;
use tokengate::proxy::hygiene::upstream_uri;
use tokengate::token::client::{parse_response, FETCH_ERROR_KINDS, MAX_LIFETIME};
use tokengate::token::Token;

const CONTENT_TYPES: [&str; 6] = [
    "application/json",
    "application/json; charset=utf-8",
    "text/html",
    "text/plain",
    "",
    "application/x-www-form-urlencoded",
];

/// Splits fuzz input into a status, a Content-Type and a body: two bytes of status
/// (100..=599), one byte choosing a content type (or, above the table, taking that many
/// following bytes as the content type itself), the rest the body.
pub fn split_token_input(data: &[u8]) -> (StatusCode, String, &[u8]) {
    let status = match data {
        [a, b, ..] => 100 + u16::from_le_bytes([*a, *b]) % 500,
        _ => 200,
    };
    let rest = data.get(2..).unwrap_or_default();
    let (content_type, body) = match rest.split_first() {
        Some((&pick, rest)) if usize::from(pick) < CONTENT_TYPES.len() => {
            (CONTENT_TYPES[usize::from(pick)].to_owned(), rest)
        }
        Some((&len, rest)) => {
            let len = usize::from(len).min(rest.len());
            let (ct, body) = rest.split_at(len);
            (String::from_utf8_lossy(ct).into_owned(), body)
        }
        None => (String::new(), rest),
    };
    (
        StatusCode::from_u16(status).expect("100..=599 is a status"),
        content_type,
        body,
    )
}

/// The token-response parser never panics, and what it returns is usable: a token that fits
/// in a header with a lifetime in (0, 24 h], or an error of a known kind whose message is
/// short and free of control characters (it goes into log lines and `/status`).
pub fn token_response(status: StatusCode, content_type: &str, body: &[u8]) {
    match parse_response(status, content_type, body, Some(Duration::from_secs(7))) {
        Ok(issued) => {
            assert!(status.is_success(), "a token from HTTP {status}");
            let token = issued.access_token.expose();
            assert!(!token.is_empty());
            assert!(
                token.bytes().all(|b| (0x21..=0x7e).contains(&b)),
                "{token:?}"
            );
            if let Some(lifetime) = issued.expires_in {
                assert!(
                    lifetime > Duration::ZERO && lifetime <= MAX_LIFETIME,
                    "{lifetime:?}"
                );
                if issued.capped {
                    assert_eq!(lifetime, MAX_LIFETIME);
                }
            }
            let lifetime = issued.expires_in.unwrap_or(MAX_LIFETIME);
            assert!(Token::new(token, 1, lifetime).is_some(), "{token:?}");
        }
        Err(e) => {
            assert!(FETCH_ERROR_KINDS.contains(&e.kind()), "{e:?}");
            if status.is_success() {
                assert_eq!(e.kind(), "bad_response", "{e}");
            }
            let message = e.to_string();
            assert!(
                message.len() <= 2048,
                "{} bytes: {message:?}",
                message.len()
            );
            assert!(!message.chars().any(char::is_control), "{message:?}");
        }
    }
}

/// An upstream as the proxy holds it: the configured endpoint, and the scheme and authority
/// every forwarded request goes to.
pub type Upstream = (Endpoint, Scheme, Authority);

/// Upstreams the request-target check runs against: a TLS host, loopback IPv4 with a port
/// and a base path, loopback IPv6.
pub fn upstreams() -> Vec<Upstream> {
    [
        "https://api.bringg.com",
        "http://127.0.0.1:9000/base",
        "http://[::1]:8080",
    ]
    .into_iter()
    .map(|url| {
        let endpoint = Endpoint::parse(url).expect("a valid upstream");
        let scheme = if endpoint.tls {
            Scheme::HTTPS
        } else {
            Scheme::HTTP
        };
        let authority = Authority::try_from(endpoint.authority.as_str()).expect("its authority");
        (endpoint, scheme, authority)
    })
    .collect()
}

/// A request target, as hyper parses it, never turns into a URI for anyone but the
/// upstream: an accepted target goes to exactly the upstream's scheme and authority with
/// the base path plus the target's own path and query, and any host the target named is the
/// upstream's (case and one trailing dot aside) with no user info and port 80, the
/// upstream's or none. Anything else is refused as 400 or 403.
pub fn request_target(data: &[u8], upstreams: &[Upstream]) {
    let Ok(target) = Uri::try_from(data) else {
        return;
    };
    for (endpoint, scheme, authority) in upstreams {
        match upstream_uri(&target, true, endpoint, scheme, authority) {
            Ok(out) => {
                assert_eq!(out.scheme(), Some(scheme), "{target} -> {out}");
                assert_eq!(out.authority(), Some(authority), "{target} -> {out}");
                let pq = target
                    .path_and_query()
                    .expect("accepted targets have a path");
                assert_eq!(
                    out.path_and_query().map(|p| p.as_str()),
                    Some(format!("{}{}", endpoint.base_path, pq.as_str()).as_str()),
                );
                if let Some(named) = target.authority() {
                    assert!(!named.as_str().contains('@'), "{target}");
                    let host = named.host();
                    let host = host
                        .strip_prefix('[')
                        .and_then(|h| h.strip_suffix(']'))
                        .unwrap_or(host);
                    let host = host.strip_suffix('.').unwrap_or(host);
                    assert!(host.eq_ignore_ascii_case(&endpoint.host), "{target}");
                    assert!(
                        matches!(named.port_u16(), None | Some(80))
                            || named.port_u16() == Some(endpoint.port),
                        "{target}"
                    );
                }
                // What goes on the wire parses back to itself.
                assert_eq!(out.to_string().parse::<Uri>().ok(), Some(out.clone()));
            }
            Err(e) => assert!(
                matches!(e.code, ErrorCode::HostNotAllowed | ErrorCode::BadRequest),
                "{target}: {e:?}"
            ),
        }
    }
}
