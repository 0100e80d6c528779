//! Request hygiene, pure and without I/O (the fuzz targets and property tests drive it
//! directly): hop-by-hop headers out (RFC 9110 §7.6.1), the absolute-form rule that keeps
//! tokengate from being an open proxy, the upstream URI built from a request target, and the
//! request id. It decides nothing about tokens and sends nothing.

use std::cell::RefCell;

use bytes::{BufMut, BytesMut};
use http::header::{self, Entry, HeaderName};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Uri};

use crate::config::Endpoint;
use crate::error::{ErrorCode, ProxyError};

/// Turns a request target into the URI sent upstream: an absolute-form target must pass
/// [`check_absolute_form`] (when `check_host`: HTTP/1 only), only a path (origin-form, or
/// the path of an absolute-form target) is forwarded, appended to the upstream's base path
/// and always sent to `scheme://authority`, the upstream's. No I/O, so the fuzz target can
/// drive it directly.
pub fn upstream_uri(
    target: &Uri,
    check_host: bool,
    upstream: &Endpoint,
    scheme: &Scheme,
    authority: &Authority,
) -> Result<Uri, ProxyError> {
    let path = upstream_path(target, check_host, upstream)?;
    Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query(path)
        .build()
        .map_err(cannot_build)
}

fn cannot_build(e: http::Error) -> ProxyError {
    ProxyError::new(
        ErrorCode::BadRequest,
        format!("cannot build the upstream URL: {e}"),
    )
}

/// The path [`upstream_uri`] sends to: the target's path and query after the upstream's base
/// path. The proxy sends it as the origin-form target of an HTTP/1 request (with the
/// upstream's `Host`) and adds the upstream's scheme and authority for HTTP/2.
pub fn upstream_path(
    target: &Uri,
    check_host: bool,
    upstream: &Endpoint,
) -> Result<PathAndQuery, ProxyError> {
    if check_host {
        check_absolute_form(target, upstream)?;
    }
    let Some(target) = target.path_and_query() else {
        return Err(ProxyError::new(
            ErrorCode::BadRequest,
            "the request target has no path",
        ));
    };
    if !target.as_str().starts_with('/') {
        return Err(ProxyError::new(
            ErrorCode::BadRequest,
            "only origin-form (/path) and absolute-form (http://host/path) targets are forwarded",
        ));
    }
    let base = &upstream.base_path;
    if base.is_empty() {
        return Ok(target.clone());
    }
    PathAndQuery::try_from(format!("{base}{}", target.as_str())).map_err(|e| cannot_build(e.into()))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy credentials, which belong to the hop
/// between the client and tokengate. `connection` first: [`strip_hop_by_hop`] reads its bit.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// The position of `name` in [`HOP_BY_HOP`]. `HeaderName`'s equality compares a standard
/// name by its tag, so this costs a few integer compares per name, no string compare.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    HOP_BY_HOP.iter().position(|h| h == name)
}

/// Removes hop-by-hop headers, including every header the `Connection` header names. Returns
/// whether `Connection` named any header besides the hop-by-hop ones (then an end-to-end
/// header the caller set may be gone too).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    strip(headers, None).0
}

/// [`strip_hop_by_hop`], also returning the first value of `find`, an end-to-end header the
/// caller reads, found in the same pass.
pub fn strip_hop_by_hop_finding(headers: &mut HeaderMap, find: &HeaderName) -> Option<HeaderValue> {
    strip(headers, Some(find)).1
}

fn strip(headers: &mut HeaderMap, find: Option<&HeaderName>) -> (bool, Option<HeaderValue>) {
    // One look at each header the message has (twice per request: request and response),
    // rather than a lookup of each name it might have. Nearly every message has none of them,
    // or only `Connection: keep-alive` (an HTTP/1.1 upstream sends it on every response),
    // which names only a hop-by-hop header, so its value needs no parsing.
    let mut present = 0u8;
    let mut names_others = false;
    let mut found = None;
    for (name, value) in headers.iter() {
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
            names_others |= i == 0
                && !value
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"keep-alive");
        } else if found.is_none() && find == Some(name) {
            found = Some(value.clone());
        }
    }
    if names_others {
        // The values are reference-counted, so copying them out is cheap and frees `headers`
        // for removal; removing by `&str` lowercases on the stack instead of allocating a
        // `HeaderName` per listed option. Split the bytes, not a `to_str`: one obs-text byte
        // anywhere in the value must not keep the headers it names (RFC 9110 §7.6.1) from
        // being removed (a name itself is ASCII, so a piece that is not UTF-8 names nothing).
        // The first line is copied on its own: with one `Connection` line the rest is empty,
        // which allocates nothing. An option that is itself a hop-by-hop name (`keep-alive`)
        // goes with the rest below.
        let mut lines = headers.get_all(header::CONNECTION).iter();
        let first = lines.next().cloned();
        let rest: Vec<HeaderValue> = lines.cloned().collect();
        for value in first.iter().chain(&rest) {
            for name in value.as_bytes().split(|b| *b == b',') {
                let Ok(name) = std::str::from_utf8(name.trim_ascii()) else {
                    continue;
                };
                let known = HOP_BY_HOP
                    .iter()
                    .any(|h| name.eq_ignore_ascii_case(h.as_str()));
                if !name.is_empty() && !known {
                    headers.remove(name);
                }
            }
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if names_others {
        // `find` may have been one of the headers `Connection` named.
        found = found.filter(|_| find.is_some_and(|f| headers.contains_key(f)));
    }
    (names_others, found)
}

/// Checks an absolute-form target (a client using `HTTP_PROXY`) against the upstream: same
/// host (case-insensitive, without a trailing dot) and port absent, 80 or the upstream's.
pub fn check_absolute_form(uri: &Uri, upstream: &Endpoint) -> Result<(), ProxyError> {
    let Some(authority) = uri.authority() else {
        return Ok(());
    };
    let deny = |why: String| {
        ProxyError::new(
            ErrorCode::HostNotAllowed,
            format!(
                "{why}; this integration only forwards to {} (tokengate is not an open proxy)",
                upstream.authority
            ),
        )
    };
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => {
            return Err(deny(
                "only http:// absolute-form targets are accepted".into(),
            ))
        }
    }
    if authority.as_str().contains('@') {
        return Err(deny(
            "a target with user information is not accepted".into(),
        ));
    }
    let host = authority.host();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let host = host.strip_suffix('.').unwrap_or(host);
    if !host.eq_ignore_ascii_case(&upstream.host) {
        return Err(deny(format!("host {host} is not the upstream's host")));
    }
    match authority.port_u16() {
        None | Some(80) => Ok(()),
        Some(p) if p == upstream.port => Ok(()),
        Some(p) => Err(deny(format!("port {p} is not the upstream's port"))),
    }
}

/// The request's id: the client's `X-Request-Id` when it sent one usable id, else a new one;
/// set in `headers` as the one `X-Request-Id` either way, in one lookup.
pub fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    let usable = |v: &HeaderValue| !v.is_empty() && v.len() <= 200;
    match headers.entry(X_REQUEST_ID) {
        Entry::Occupied(mut sent) => {
            let first = sent.get();
            if usable(first) && sent.iter().nth(1).is_none() {
                return first.clone();
            }
            let id = if usable(first) {
                first.clone()
            } else {
                new_request_id()
            };
            sent.insert(id.clone());
            id
        }
        Entry::Vacant(absent) => absent.insert(new_request_id()).clone(),
    }
}

/// The bytes of one id: 128 random bits as hex, written as four [`hex8`] words.
const ID_LEN: usize = 4 * 8;

/// The block the ids of this thread are cut from, one after the other: the id's three uses
/// (upstream request, response, access line) and the id itself cost reference counts, not an
/// allocation and a free per request (−200 of ~34,800 instructions per small GET,
/// bench/NOTES.md session 7). A block holds 128 ids and is freed when the last of them is
/// dropped.
const ID_BLOCK: usize = 128 * ID_LEN;

thread_local! {
    static IDS: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

fn new_request_id() -> HeaderValue {
    let n = fastrand::u128(..);
    let id = IDS.with_borrow_mut(|block| {
        if block.capacity() < ID_LEN {
            *block = BytesMut::with_capacity(ID_BLOCK);
        }
        for word in 0..ID_LEN / 8 {
            block.put_u64_le(hex8((n >> (32 * word)) as u32));
        }
        block.split().freeze()
    });
    // Hex digits are always a valid header value.
    HeaderValue::from_maybe_shared(id).unwrap_or(HeaderValue::from_static("-"))
}

/// The eight nibbles of `x` as eight lowercase hex digits, one per byte, computed on all eight
/// at once rather than looked up one by one (a quarter of the instructions; the id is made
/// for nearly every request). The digits come least significant first; for a random id the
/// order does not matter.
fn hex8(x: u32) -> u64 {
    // Spread the nibbles out, one into the low half of each byte.
    let mut v = u64::from(x);
    v = (v | v << 16) & 0x0000_ffff_0000_ffff;
    v = (v | v << 8) & 0x00ff_00ff_00ff_00ff;
    v = (v | v << 4) & 0x0f0f_0f0f_0f0f_0f0f;
    // A byte of 10..=15 carries into bit 4 when 6 is added: those become 'a'..='f', 39 past
    // where '0' + value would put them. No byte ever carries into the next one.
    let letters = ((v + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    v + 0x3030_3030_3030_3030 + letters * 39
}

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> Endpoint {
        let u = url::Url::parse(url).unwrap();
        let host = u.host_str().unwrap().trim_end_matches('.').to_lowercase();
        let port = u.port_or_known_default().unwrap();
        Endpoint {
            tls: u.scheme() == "https",
            authority: host.clone(),
            host,
            port,
            base_path: String::new(),
            url: u,
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("close, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            "proxy-authorization",
            HeaderValue::from_static("Basic Zm9v"),
        );
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        // A second Connection line, mixed case and an option that is no valid name.
        h.append(
            "connection",
            HeaderValue::from_static("X-Other-Hop , bad name"),
        );
        h.insert("x-other-hop", HeaderValue::from_static("1"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        // An obs-text byte in one listed option does not shield the others.
        h.append(
            "connection",
            HeaderValue::from_bytes(b"x-hop-a, caf\xe9, x-hop-b").unwrap(),
        );
        h.insert("x-hop-a", HeaderValue::from_static("1"));
        h.insert("x-hop-b", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn a_lone_keep_alive_or_close_line_removes_what_it_names() {
        let strip = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            strip_hop_by_hop(&mut h);
            let mut names: Vec<String> = h.keys().map(|n| n.as_str().to_owned()).collect();
            names.sort();
            names
        };
        let kept = |names: &[&str]| names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            strip(&[
                ("connection", "keep-alive"),
                ("keep-alive", "timeout=5"),
                ("x-kept", "1")
            ]),
            kept(&["x-kept"])
        );
        assert_eq!(
            strip(&[
                ("connection", " Keep-Alive "),
                ("transfer-encoding", "chunked")
            ]),
            Vec::<String>::new()
        );
        // `close` is an option, and also names a header called close if there is one.
        assert_eq!(
            strip(&[("connection", "CLOSE"), ("close", "x"), ("x-kept", "1")]),
            kept(&["x-kept"])
        );
        // Two lines, or an option besides keep-alive: every named header goes too.
        assert_eq!(
            strip(&[
                ("connection", "keep-alive"),
                ("connection", "x-hop"),
                ("x-hop", "1"),
                ("x-kept", "1")
            ]),
            kept(&["x-kept"])
        );
        assert_eq!(
            strip(&[("connection", "keep-alive, x-hop"), ("x-hop", "1")]),
            Vec::<String>::new()
        );
    }

    #[test]
    fn the_header_looked_for_is_found_in_the_same_pass_unless_connection_named_it() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Keep-Alive"));
        h.append("ratelimit-remaining", HeaderValue::from_static("7"));
        h.append("ratelimit-remaining", HeaderValue::from_static("8"));
        let find = HeaderName::from_static("ratelimit-remaining");
        assert_eq!(strip_hop_by_hop_finding(&mut h, &find).unwrap(), "7");
        assert!(!h.contains_key("connection"));
        assert_eq!(h.get_all(&find).iter().count(), 2);

        h.insert(
            "connection",
            HeaderValue::from_static("ratelimit-remaining"),
        );
        assert_eq!(strip_hop_by_hop_finding(&mut h, &find), None);
        assert!(h.is_empty());

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        assert!(
            !strip_hop_by_hop(&mut h),
            "keep-alive names no other header"
        );
        h.insert("connection", HeaderValue::from_static("close"));
        assert!(
            strip_hop_by_hop(&mut h),
            "close also names a header called close"
        );
    }

    #[test]
    fn end_to_end_headers_stay() {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("application/json"));
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        h.append("x-request-id", HeaderValue::from_static("def"));
        let before = h.clone();
        strip_hop_by_hop(&mut h);
        assert_eq!(h, before);
    }

    #[test]
    fn absolute_form_rule() {
        let up = endpoint("https://api.bringg.com");
        let ok = |u: &str| check_absolute_form(&u.parse().unwrap(), &up).is_ok();
        assert!(ok("/v2/orders"));
        assert!(ok("http://api.bringg.com/v2/orders"));
        assert!(ok("http://API.Bringg.COM./v2/orders"));
        assert!(ok("http://api.bringg.com:80/v2/orders"));
        assert!(ok("http://api.bringg.com:443/v2/orders"));
        assert!(!ok("http://api.bringg.com:8080/v2/orders"));
        assert!(!ok("http://evil.example/v2/orders"));
        assert!(!ok("http://api.bringg.com.evil.example/v2/orders"));
        assert!(!ok("http://user@api.bringg.com/v2/orders"));
        assert!(!ok("http://api.bringg.com@evil.example/v2/orders"));
        assert!(!ok("http://10.0.0.1/v2/orders"));
        assert!(!ok("http://[::1]/v2/orders"));
        assert!(!ok("ftp://api.bringg.com/v2/orders"));
        let ip = endpoint("http://127.0.0.1:9000");
        assert!(check_absolute_form(&"http://127.0.0.1:9000/x".parse().unwrap(), &ip).is_ok());
        assert!(check_absolute_form(&"http://127.0.0.2:9000/x".parse().unwrap(), &ip).is_err());
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let id = |pairs: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in pairs {
                h.append("x-request-id", HeaderValue::from_static(v));
            }
            let id = request_id(&mut h);
            let set: Vec<_> = h.get_all("x-request-id").iter().cloned().collect();
            assert_eq!(
                set,
                std::slice::from_ref(&id),
                "the id is the request's one X-Request-Id"
            );
            id
        };
        let made = id(&[]);
        assert_eq!(made.len(), 32);
        assert!(
            made.as_bytes()
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)),
            "{made:?}"
        );
        assert_ne!(made, id(&[]));
        assert_eq!(id(&["abc-1"]), "abc-1");
        assert_eq!(id(&["abc-1", "abc-2"]), "abc-1");
        assert_eq!(id(&[""]).len(), 32);
        let long: &'static str = "x".repeat(201).leak();
        assert_eq!(id(&[long]).len(), 32);
    }

    #[test]
    fn ids_cut_from_blocks_stay_whole_and_distinct_across_block_ends() {
        let ids: Vec<HeaderValue> = (0..3 * 128 + 5).map(|_| new_request_id()).collect();
        let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(|v| v.as_bytes()).collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(ids.iter().all(|id| id.len() == ID_LEN
            && id
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())));
    }

    #[test]
    fn hex8_writes_every_nibble_as_its_digit() {
        let digits = |x: u32| String::from_utf8(hex8(x).to_le_bytes().to_vec()).unwrap();
        assert_eq!(digits(0), "00000000");
        assert_eq!(digits(u32::MAX), "ffffffff");
        assert_eq!(digits(0x0123_4567), "76543210");
        assert_eq!(digits(0x89ab_cdef), "fedcba98");
        for x in [0x9a9a_9a9a_u32, 0xa0f9_1b2c, 0x1000_000f] {
            let want: String = format!("{x:08x}").chars().rev().collect();
            assert_eq!(digits(x), want);
        }
    }
}
