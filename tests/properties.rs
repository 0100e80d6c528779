//! Property tests (proptest) for the three pure functions that see hostile input first:
//! the token-response parser (`token::client::parse_response`), the config parser
//! (`Config::from_str`) and header hygiene (`proxy::hygiene::strip_hop_by_hop`); plus the
//! request-target rule (`proxy::hygiene::upstream_uri`) with generated absolute-form tricks.
//!
//! The invariants themselves live in `fuzz/checks.rs`, shared with the cargo-fuzz targets;
//! this file also replays `fuzz/seeds/`, so a CI without a nightly toolchain still runs every
//! seed through them. Case counts are kept modest so the file runs in a few seconds.
#![allow(clippy::unwrap_used)]

#[path = "../fuzz/checks.rs"]
mod checks;

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tokengate::config::Config;
use tokengate::proxy::hygiene::strip_hop_by_hop;
use tokengate::token::client::{parse_response, MAX_LIFETIME};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        // Failures are reported with the minimal input; no files are written next to the
        // sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Token responses
// ---------------------------------------------------------------------------------------

/// Keys a token response may have, and some it should not.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("access_token".to_owned()),
        Just("token_type".to_owned()),
        Just("expires_in".to_owned()),
        Just("created_at".to_owned()),
        Just("error".to_owned()),
        Just("error_description".to_owned()),
        "[a-z_]{1,12}",
    ]
}

/// Any JSON value, a few levels deep, with numbers and strings that stress the parser
/// (huge, negative, fractional, NaN-like text, control characters).
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        prop_oneof![
            Just("Bearer".to_owned()),
            Just("NaN".to_owned()),
            Just("inf".to_owned()),
            Just("-0".to_owned()),
            Just("1e400".to_owned()),
            "[0-9]{1,25}",
            "\\PC{0,40}",
            ".{0,40}",
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(key(), inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A token response object: mostly the real keys, any values.
fn token_object() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(key(), json_value(), 0..8).prop_map(|m| m.into_iter().collect())
}

fn status() -> impl Strategy<Value = StatusCode> {
    prop_oneof![
        4 => Just(StatusCode::OK),
        1 => (100u16..600).prop_map(|s| StatusCode::from_u16(s).unwrap()),
    ]
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn token_parser_never_panics_on_bytes(
        status in status(),
        content_type in ".{0,200}",
        body in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        checks::token_response(status, &content_type, &body);
    }

    #[test]
    fn token_parser_never_panics_on_json(status in status(), object in token_object()) {
        let body = serde_json::to_vec(&object).unwrap();
        checks::token_response(status, "application/json", &body);
    }

    #[test]
    fn token_parser_never_quotes_the_token(object in token_object(), token in "tok-[a-z0-9]{16}") {
        // Whatever else the response holds, an error message (logged, in /status) never
        // carries the access token, even when the response is rejected for another reason.
        let mut object = object;
        object.insert("access_token".into(), Value::from(token.clone()));
        let body = serde_json::to_vec(&object).unwrap();
        if let Err(e) = parse_response(StatusCode::OK, "application/json", &body, None) {
            prop_assert!(!e.to_string().contains(&token), "{}", e);
        }
    }
}

/// How a valid `expires_in` may be written: a number or a numeric string (the contract).
#[derive(Debug, Clone)]
enum Written {
    Integer,
    Float,
    Text,
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn a_valid_response_parses_to_its_lifetime(
        seconds in 1u64..=86_400,
        fraction in 0u32..1000,
        written in prop_oneof![Just(Written::Integer), Just(Written::Float), Just(Written::Text)],
        token in "[A-Za-z0-9._~+/=-]{1,200}",
        token_type in prop_oneof![Just(None), Just(Some("Bearer")), Just(Some("bearer")), Just(Some("BEARER"))],
        created_at in prop::option::of(0i64..4_000_000_000),
    ) {
        let (value, want) = match written {
            Written::Integer => (json!(seconds), Duration::from_secs(seconds)),
            Written::Float => {
                let s = (seconds - 1) as f64 + f64::from(fraction + 1) / 1000.0;
                (json!(s), Duration::from_secs_f64(s))
            }
            Written::Text => (json!(format!(" {seconds} ")), Duration::from_secs(seconds)),
        };
        let mut object = json!({"access_token": token, "expires_in": value});
        if let Some(t) = token_type {
            object["token_type"] = json!(t);
        }
        if let Some(c) = created_at {
            object["created_at"] = json!(c);
        }
        let body = serde_json::to_vec(&object).unwrap();
        let issued = parse_response(StatusCode::OK, "application/json", &body, None).unwrap();
        prop_assert_eq!(issued.access_token.expose(), token.as_str());
        prop_assert_eq!(issued.expires_in, Some(want));
        prop_assert!(!issued.capped);
        prop_assert_eq!(issued.clock_skew.is_some(), created_at.is_some());
    }

    #[test]
    fn a_lifetime_over_a_day_is_capped(seconds in 86_401u64..=u64::MAX / 2) {
        let body = serde_json::to_vec(&json!({"access_token": "t", "expires_in": seconds})).unwrap();
        let issued = parse_response(StatusCode::OK, "application/json", &body, None).unwrap();
        prop_assert_eq!(issued.expires_in, Some(MAX_LIFETIME));
        prop_assert!(issued.capped);
    }
}

// ---------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------

const EXAMPLE: &str = include_str!("../config.example.toml");

/// A config path in a directory that does not exist: `{ file = ... }` secrets in the text
/// resolve relative to it and are simply not found.
fn config_path() -> PathBuf {
    Path::new("/nonexistent-tokengate-properties/config.toml").to_path_buf()
}

/// One edit of a config file, at line granularity so every result is UTF-8.
#[derive(Debug, Clone)]
enum Edit {
    DeleteLine(usize),
    DuplicateLine(usize),
    SwapLines(usize, usize),
    InsertLine(usize, String),
    /// Replaces what follows the first `=` of a line.
    ReplaceValue(usize, String),
    /// Cuts the file at a character.
    Truncate(usize),
}

/// TOML-ish values: what an operator might write, and what they should not.
fn value_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\"\"".to_owned()),
        Just("0".to_owned()),
        Just("-1".to_owned()),
        Just("1e999".to_owned()),
        Just("nan".to_owned()),
        Just("inf".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("\"99999999999999999999h\"".to_owned()),
        Just("\"0s\"".to_owned()),
        Just("\"1 ns\"".to_owned()),
        Just("\"999999GiB\"".to_owned()),
        Just("\"http://[::1\"".to_owned()),
        Just("\"https://user:pw@host\"".to_owned()),
        Just("\"127.0.0.1:99999\"".to_owned()),
        Just("{ env = \"\" }".to_owned()),
        Just("{ file = \"\" }".to_owned()),
        Just("{ env = \"A\", file = \"B\" }".to_owned()),
        Just("[]".to_owned()),
        Just("[\"GET\", \"get\", \"\"]".to_owned()),
        Just("{}".to_owned()),
        Just("true".to_owned()),
        "\"\\PC{0,30}\"",
        "[-0-9.e+]{1,12}",
        ".{0,30}",
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    let line = 0usize..200;
    prop_oneof![
        line.clone().prop_map(Edit::DeleteLine),
        line.clone().prop_map(Edit::DuplicateLine),
        (line.clone(), line.clone()).prop_map(|(a, b)| Edit::SwapLines(a, b)),
        (
            line.clone(),
            prop_oneof![
                Just("[[integration]]".to_owned()),
                Just("[server]".to_owned()),
                Just("[defaults]".to_owned()),
                Just("name = \"oms\"".to_owned()),
                Just("listen = \"127.0.0.1:8081\"".to_owned()),
                Just("unknown_key = 1".to_owned()),
                ".{0,60}",
            ]
        )
            .prop_map(|(at, text)| Edit::InsertLine(at, text)),
        (line, value_text()).prop_map(|(at, v)| Edit::ReplaceValue(at, v)),
        (0usize..6000).prop_map(Edit::Truncate),
    ]
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for edit in edits {
        let n = lines.len().max(1);
        match edit {
            Edit::DeleteLine(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Edit::DuplicateLine(i) if !lines.is_empty() => {
                let l = lines[i % n].clone();
                lines.insert(i % n, l);
            }
            Edit::SwapLines(a, b) if !lines.is_empty() => lines.swap(a % n, b % n),
            Edit::InsertLine(i, text) => lines.insert(i % (lines.len() + 1), text.clone()),
            Edit::ReplaceValue(i, value) if !lines.is_empty() => {
                let l = &mut lines[i % n];
                if let Some((key, _)) = l.split_once('=') {
                    *l = format!("{key}= {value}");
                }
            }
            Edit::Truncate(at) => {
                let joined = lines.join("\n");
                let cut: String = joined.chars().take(*at).collect();
                lines = cut.lines().map(str::to_owned).collect();
            }
            _ => {}
        }
    }
    lines.join("\n")
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn config_parser_never_panics_on_text(text in "\\PC{0,400}") {
        let _ = Config::from_str(&text, &config_path());
    }

    #[test]
    fn config_parser_never_panics_on_toml_shaped_text(
        lines in prop::collection::vec(
            prop_oneof![
                Just("[server]".to_owned()),
                Just("[defaults]".to_owned()),
                Just("[[integration]]".to_owned()),
                ("[a-z_]{1,20}", value_text()).prop_map(|(k, v)| format!("{k} = {v}")),
            ],
            0..20,
        ),
    ) {
        let _ = Config::from_str(&lines.join("\n"), &config_path());
    }

    #[test]
    fn config_parser_never_panics_on_a_mutated_example(edits in prop::collection::vec(edit(), 1..6)) {
        let text = apply(EXAMPLE, &edits);
        if let Err(e) = Config::from_str(&text, &config_path()) {
            // Every error names the file (the contract).
            prop_assert!(e.to_string().contains("config.toml"), "{}", e);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Header hygiene
// ---------------------------------------------------------------------------------------

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy credentials: always removed.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

/// End-to-end headers a client sends, some of which a `Connection` header will name.
const ORDINARY: [&str; 8] = [
    "x-a",
    "x-b",
    "x-request-id",
    "content-type",
    "authorization",
    "accept",
    "x-secret-hop",
    "cookie",
];

/// Mixed case, as clients write names.
fn spelled(name: &'static str) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<bool>(), name.len()).prop_map(move |upper| {
        name.chars()
            .zip(upper)
            .map(|(c, u)| if u { c.to_ascii_uppercase() } else { c })
            .collect()
    })
}

fn any_name() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        prop::sample::select(&HOP_BY_HOP[..]),
        prop::sample::select(&ORDINARY[..])
    ]
}

/// One element of a `Connection` value: a header name (counted as named), or junk that is no
/// header name (obs-text, spaces, empty), which must not stop the others from counting.
#[derive(Debug, Clone)]
enum Element {
    Named(&'static str, String),
    Junk(Vec<u8>),
}

fn element() -> impl Strategy<Value = Element> {
    prop_oneof![
        3 => any_name().prop_flat_map(|n| spelled(n).prop_map(move |s| Element::Named(n, s))),
        1 => prop_oneof![
            Just(b"caf\xe9".to_vec()),
            Just(b"\xff".to_vec()),
            Just(b"bad name".to_vec()),
            Just(Vec::new()),
            Just(b"close".to_vec()),
            Just(b"keep-alive".to_vec()),
        ]
        .prop_map(Element::Junk),
    ]
}

fn connection_value() -> impl Strategy<Value = (Vec<&'static str>, HeaderValue)> {
    prop::collection::vec((element(), "[ \t]{0,2}", "[ \t]{0,2}"), 1..6).prop_map(|elements| {
        let mut named = Vec::new();
        let mut bytes = Vec::new();
        for (i, (e, before, after)) in elements.into_iter().enumerate() {
            if i > 0 {
                bytes.push(b',');
            }
            bytes.extend_from_slice(before.as_bytes());
            match e {
                Element::Named(n, spelled) => {
                    named.push(n);
                    bytes.extend_from_slice(spelled.as_bytes());
                }
                Element::Junk(j) => bytes.extend_from_slice(&j),
            }
            bytes.extend_from_slice(after.as_bytes());
        }
        // A field value has no leading or trailing whitespace (RFC 9110 §5.5).
        let value = bytes.trim_ascii().to_vec();
        (named, HeaderValue::from_bytes(&value).unwrap())
    })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn strip_hop_by_hop_removes_exactly_what_it_must(
        headers in prop::collection::vec((any_name(), "[ -~]{0,20}"), 0..16),
        connections in prop::collection::vec(connection_value(), 0..3),
    ) {
        let mut map = HeaderMap::new();
        for (name, value) in &headers {
            map.append(*name, HeaderValue::from_str(value).unwrap());
        }
        let mut named: Vec<&str> = Vec::new();
        for (names, value) in &connections {
            map.append(http::header::CONNECTION, value.clone());
            named.extend(names);
        }
        let before = map.clone();
        strip_hop_by_hop(&mut map);

        for name in before.keys() {
            let gone = HOP_BY_HOP.contains(&name.as_str()) || named.contains(&name.as_str());
            if gone {
                prop_assert!(!map.contains_key(name), "{} kept: {:?}", name, map);
            } else {
                // Kept with every value, in order.
                let was: Vec<&HeaderValue> = before.get_all(name).iter().collect();
                let is: Vec<&HeaderValue> = map.get_all(name).iter().collect();
                prop_assert_eq!(was, is, "{}", name);
            }
        }
        // Nothing added.
        prop_assert!(map.keys().all(|k| before.contains_key(k)));
    }
}

// ---------------------------------------------------------------------------------------
// Request targets
// ---------------------------------------------------------------------------------------

fn target_host() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("api.bringg.com".to_owned()),
        Just("API.Bringg.Com.".to_owned()),
        Just("api.bringg.com..".to_owned()),
        Just("api.bringg.com.evil.example".to_owned()),
        Just("evil.example".to_owned()),
        Just("127.0.0.1".to_owned()),
        Just("127.1".to_owned()),
        Just("2130706433".to_owned()),
        Just("[::1]".to_owned()),
        Just("[0:0:0:0:0:0:0:1]".to_owned()),
        Just("[::ffff:127.0.0.1]".to_owned()),
        Just("localhost".to_owned()),
        Just("api.bringg.com@evil.example".to_owned()),
        Just("evil.example@api.bringg.com".to_owned()),
        Just("api%2ebringg.com".to_owned()),
        "[a-z0-9.-]{1,20}",
    ]
}

fn target() -> impl Strategy<Value = String> {
    let port = prop_oneof![
        Just(String::new()),
        Just(":80".to_owned()),
        Just(":443".to_owned()),
        Just(":9000".to_owned()),
        Just(":8080".to_owned()),
        Just(":".to_owned()),
        (0u32..70000).prop_map(|p| format!(":{p}")),
    ];
    let scheme = prop_oneof![
        Just("http://"),
        Just("https://"),
        Just("HTTP://"),
        Just("ftp://"),
        Just("//"),
        Just("")
    ];
    let path = prop_oneof![
        Just(String::new()),
        Just("/".to_owned()),
        "/[a-zA-Z0-9%._~!$&'()*+,;=:@/?-]{0,30}",
        "[ -~]{0,20}"
    ];
    (scheme, target_host(), port, path).prop_map(|(s, h, p, path)| format!("{s}{h}{p}{path}"))
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn request_targets_only_ever_go_to_the_upstream(target in target()) {
        checks::request_target(target.as_bytes(), &checks::upstreams());
    }

    #[test]
    fn arbitrary_request_target_bytes_never_escape(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
        checks::request_target(&bytes, &checks::upstreams());
    }
}

// ---------------------------------------------------------------------------------------
// The fuzz seeds, on stable
// ---------------------------------------------------------------------------------------

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            (path, data)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

#[test]
fn token_response_seeds_hold() {
    for (path, data) in seeds("token_response") {
        let (status, content_type, body) = checks::split_token_input(&data);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            checks::token_response(status, &content_type, body)
        }));
        assert!(outcome.is_ok(), "seed {}", path.display());
    }
}

#[test]
fn request_target_seeds_hold() {
    let upstreams = checks::upstreams();
    for (path, data) in seeds("request_target") {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            checks::request_target(&data, &upstreams)
        }));
        assert!(outcome.is_ok(), "seed {}", path.display());
    }
}
