//! Configuration loading: the shipped example, defaults and `[defaults]` inheritance, region
//! presets, endpoints, every secret form, and the error messages (each names the file, the
//! key path and a fix).
//!
//! Tests that set environment variables use names no other test uses, because tests run in
//! parallel threads of one process.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokengate::config::ProxyEnv;
use tokengate::config::*;

const FILE: &str = "/etc/tokengate/tokengate.toml";

fn load(text: &str) -> Config {
    Config::from_str_with_env(text, Path::new(FILE), &ProxyEnv::default())
        .unwrap_or_else(|e| panic!("{e}\n--- config:\n{text}"))
}

/// Loads `text`, expects an error that starts with the file name and contains every part.
fn expect_error(text: &str, parts: &[&str]) -> String {
    let message = match Config::from_str_with_env(text, Path::new(FILE), &ProxyEnv::default()) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.starts_with(FILE),
        "message does not start with the file name: {message}"
    );
    for part in parts {
        assert!(message.contains(part), "`{part}` not in: {message}");
    }
    message
}

/// One `[[integration]]` table: a valid minimal one, with `changes` applied (a key set to
/// `""` is removed). Values are raw TOML.
fn oms(changes: &[(&str, &str)]) -> String {
    let mut keys: Vec<(String, String)> = [
        ("name", "\"oms\""),
        ("listen", "\"127.0.0.1:8081\""),
        ("region", "\"us2\""),
        ("client_id", "\"id-1\""),
        ("client_secret", "\"literal-secret-1\""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (key, value) in changes {
        match keys.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value.to_string(),
            None => keys.push((key.to_string(), value.to_string())),
        }
    }
    let mut text = String::from("[[integration]]\n");
    for (key, value) in keys.iter().filter(|(_, v)| !v.is_empty()) {
        text.push_str(&format!("{key} = {value}\n"));
    }
    text
}

fn one(text: &str) -> Integration {
    let config = load(text);
    assert_eq!(config.integrations.len(), 1);
    config.integrations.into_iter().next().unwrap()
}

fn pem_file(dir: &Path) -> PathBuf {
    let path = dir.join("ca.pem");
    std::fs::write(
        &path,
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIU\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    path
}

fn example_text() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml"))
        .unwrap()
}

// --- the shipped example ----------------------------------------------------------------------

#[test]
fn example_config_loads_with_the_secrets_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokengate.toml");
    std::fs::write(&path, example_text()).unwrap();
    std::fs::create_dir(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/oms_client_id"), "oms-id\n").unwrap();
    std::fs::write(
        dir.path().join("secrets/oms_client_secret"),
        "oms-secret\r\n",
    )
    .unwrap();
    std::env::set_var("TOKENGATE_WMS_CLIENT_ID", "wms-id");
    std::env::set_var("TOKENGATE_WMS_CLIENT_SECRET", "wms-secret");

    let config = Config::load(&path).unwrap();

    assert!(!config.integrations.is_empty());
    assert_eq!(config.integrations.len(), 2);
    assert_eq!(config.path, path);
    assert_eq!(
        config.server.admin_listen,
        "127.0.0.1:9464".parse().unwrap()
    );
    assert_eq!(config.server.log_format, LogFormat::Text);
    assert_eq!(config.server.shutdown_grace, Duration::from_secs(20));
    assert!(!config.server.allow_remote_clients);
    assert_eq!(config.server.egress_proxy, None);

    let oms = &config.integrations[0];
    assert_eq!(oms.name, "oms");
    assert_eq!(oms.listen, "127.0.0.1:8081".parse().unwrap());
    assert_eq!(
        oms.token.token_url.url.as_str(),
        "https://eu2-admin-api.bringg.com/oauth/token"
    );
    assert_eq!(oms.token.client_id.value.expose(), "oms-id");
    assert_eq!(oms.token.client_secret.value.expose(), "oms-secret");
    assert_eq!(
        oms.token.client_secret.source,
        SecretSource::File(dir.path().join("secrets/oms_client_secret"))
    );
    assert_eq!(oms.token.ttl, Some(Duration::from_secs(1800)));
    assert_eq!(oms.token.encoding, TokenEncoding::Form);
    assert_eq!(oms.proxy.upstream.authority, "api.bringg.com");
    assert_eq!(oms.proxy.max_replay_body, 1024 * 1024);
    assert_eq!(oms.proxy.allow_methods.as_ref().map(Vec::len), Some(5));

    let wms = &config.integrations[1];
    assert_eq!(wms.name, "wms");
    assert_eq!(wms.token.token_url.host, "eu3-admin-api.bringg.com");
    assert_eq!(wms.token.client_id.value.expose(), "wms-id");
    assert_eq!(
        wms.token.client_secret.source.describe(),
        "env TOKENGATE_WMS_CLIENT_SECRET"
    );
    assert_eq!(wms.token.encoding, TokenEncoding::Multipart);
    assert_eq!(wms.token.refresh_at, 0.8);
    assert_eq!(wms.token.ttl, None);
    assert!(wms.token.extra_params.is_empty());
    assert_eq!(wms.proxy.max_replay_body, 256 * 1024);
    assert_eq!(wms.proxy.request_timeout, Duration::from_secs(120));
    assert_eq!(wms.proxy.allow_methods, None);

    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
}

#[test]
fn example_and_reference_name_every_key() {
    let example = example_text();
    let reference =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let keys: Vec<&str> = SERVER_KEYS
        .iter()
        .chain(INTEGRATION_KEYS)
        .chain(FLEET_KEYS)
        .copied()
        .collect();
    assert!(keys.len() > 20, "the key lists look empty: {keys:?}");
    for key in keys {
        assert!(
            example.contains(&format!("{key} = ")),
            "config.example.toml does not show `{key}`"
        );
        assert!(
            reference.contains(&format!("`{key}`")),
            "README.md does not document `{key}`"
        );
    }
}

// --- defaults and inheritance -----------------------------------------------------------------

#[test]
fn a_minimal_config_takes_the_documented_defaults() {
    let config = load(&oms(&[]));
    let server = &config.server;
    assert_eq!(server.admin_listen, DEFAULT_ADMIN_LISTEN.parse().unwrap());
    assert_eq!(server.log_format, LogFormat::Text);
    assert_eq!(server.shutdown_grace, Duration::from_secs(20));
    assert!(!server.allow_remote_clients);
    assert_eq!(server.header_read_timeout, Duration::from_secs(30));
    assert_eq!(server.egress_proxy, None);
    assert_eq!(server.egress_proxy_auth, None);

    let oms = &config.integrations[0];
    let token = &oms.token;
    assert_eq!(token.token_url.url.as_str(), REGIONS[0].1);
    assert_eq!(token.ttl, None);
    assert_eq!(token.scope, None);
    assert_eq!(token.auth, TokenAuth::Body);
    assert_eq!(token.encoding, TokenEncoding::Form);
    assert!(token.extra_params.is_empty());
    assert_eq!(token.refresh_at, 0.8);
    assert_eq!(token.assume_lifetime, Duration::from_secs(30 * 60));
    assert_eq!(token.timeout, Duration::from_secs(10));
    assert_eq!(token.ca_file, None);
    let proxy = &oms.proxy;
    assert_eq!(proxy.upstream, Endpoint::parse(DEFAULT_UPSTREAM).unwrap());
    assert_eq!(proxy.upstream.host, "api.bringg.com");
    assert_eq!(proxy.upstream.port, 443);
    assert_eq!(proxy.upstream.authority, "api.bringg.com");
    assert_eq!(proxy.upstream.base_path, "");
    assert!(proxy.upstream.tls);
    assert_eq!(proxy.allow_methods, None);
    assert_eq!(proxy.max_replay_body, 1024 * 1024);
    assert_eq!(proxy.connect_timeout, Duration::from_secs(5));
    assert_eq!(proxy.request_timeout, Duration::from_secs(60));
    assert_eq!(proxy.ca_file, None);
}

#[test]
fn defaults_are_inherited_unless_the_integration_sets_the_key() {
    let text = format!(
        r#"
[server]
log_format = "json"
shutdown_grace = "5s"

[defaults]
region = "eu3"
client_id = {{ env = "TG_TEST_INHERIT_ID" }}
ttl = "4h"
scope = "orders"
token_auth = "basic"
token_encoding = "json"
extra_params = {{ audience = "api", b = "2" }}
refresh_at = 0.5
assume_lifetime = "1h"
token_timeout = "3s"
allow_methods = ["GET"]
max_replay_body = 2048
connect_timeout = "1s"
request_timeout = "90s"

{}
{}"#,
        oms(&[("client_id", ""), ("region", "")]),
        oms(&[
            ("name", "\"wms\""),
            ("listen", "\"127.0.0.1:8082\""),
            ("region", "\"us3\""),
            ("client_id", "\"wms-id\""),
            ("ttl", "\"10m\""),
            ("token_encoding", "\"multipart\""),
            ("extra_params", "{}"),
            ("refresh_at", "0.9"),
            ("allow_methods", "[\"GET\", \"PURGE\"]"),
            ("max_replay_body", "\"0\""),
        ]),
    );
    std::env::set_var("TG_TEST_INHERIT_ID", "inherited-id");
    let config = load(&text);
    assert_eq!(config.server.log_format, LogFormat::Json);
    assert_eq!(config.server.shutdown_grace, Duration::from_secs(5));

    let inherited = &config.integrations[0];
    assert_eq!(inherited.token.token_url.url.as_str(), REGIONS[3].1);
    assert_eq!(inherited.token.client_id.value.expose(), "inherited-id");
    assert_eq!(inherited.token.ttl, Some(Duration::from_secs(4 * 3600)));
    assert_eq!(inherited.token.scope.as_deref(), Some("orders"));
    assert_eq!(inherited.token.auth, TokenAuth::Basic);
    assert_eq!(inherited.token.encoding, TokenEncoding::Json);
    assert_eq!(
        inherited.token.extra_params,
        vec![
            ("audience".to_owned(), "api".to_owned()),
            ("b".to_owned(), "2".to_owned())
        ]
    );
    assert_eq!(inherited.token.refresh_at, 0.5);
    assert_eq!(inherited.token.assume_lifetime, Duration::from_secs(3600));
    assert_eq!(inherited.token.timeout, Duration::from_secs(3));
    assert_eq!(inherited.proxy.allow_methods, Some(vec![http::Method::GET]));
    assert_eq!(inherited.proxy.max_replay_body, 2048);
    assert_eq!(inherited.proxy.connect_timeout, Duration::from_secs(1));
    assert_eq!(inherited.proxy.request_timeout, Duration::from_secs(90));

    let own = &config.integrations[1];
    assert_eq!(own.token.token_url.url.as_str(), REGIONS[1].1);
    assert_eq!(own.token.client_id.value.expose(), "wms-id");
    assert_eq!(own.token.ttl, Some(Duration::from_secs(600)));
    assert_eq!(own.token.encoding, TokenEncoding::Multipart);
    // A table is replaced as a whole, not merged with the one in [defaults].
    assert!(own.token.extra_params.is_empty());
    assert_eq!(own.token.refresh_at, 0.9);
    assert_eq!(
        own.proxy.allow_methods,
        Some(vec![
            http::Method::GET,
            http::Method::from_bytes(b"PURGE").unwrap()
        ])
    );
    assert_eq!(own.proxy.max_replay_body, 0);
    // Not set in either place: the built-in default.
    assert_eq!(own.token.scope.as_deref(), Some("orders"));
    assert_eq!(own.token.auth, TokenAuth::Basic);
}

#[test]
fn every_region_preset_fills_token_url() {
    assert_eq!(REGIONS.len(), 4);
    for (region, url) in REGIONS {
        let integration = one(&oms(&[("region", &format!("\"{region}\""))]));
        assert_eq!(integration.token.token_url.url.as_str(), *url);
        assert!(integration.token.token_url.tls);
        assert_eq!(integration.token.token_url.base_path, "/oauth/token");
    }
    let integration = one(&oms(&[("region", "\"eu2\"")]));
    assert_eq!(integration.token.token_url.host, "eu2-admin-api.bringg.com");
}

#[test]
fn token_url_overrides_region() {
    let integration = one(&oms(&[
        ("region", "\"us2\""),
        (
            "token_url",
            "\"https://Auth.Example.COM.:8443/oauth/token\"",
        ),
    ]));
    let url = &integration.token.token_url;
    assert_eq!(url.host, "auth.example.com");
    assert_eq!(url.port, 8443);
    assert_eq!(url.authority, "auth.example.com:8443");
    assert_eq!(url.base_path, "/oauth/token");
}

#[test]
fn upstream_is_normalised() {
    let integration = one(&oms(&[(
        "upstream",
        "\"https://US2-Admin-Api.bringg.com./services/\"",
    )]));
    let upstream = &integration.proxy.upstream;
    assert_eq!(upstream.host, "us2-admin-api.bringg.com");
    assert_eq!(upstream.port, 443);
    assert_eq!(upstream.authority, "us2-admin-api.bringg.com");
    assert_eq!(upstream.base_path, "/services");

    let integration = one(&oms(&[("upstream", "\"http://[::1]:9000\"")]));
    let upstream = &integration.proxy.upstream;
    assert!(!upstream.tls);
    assert_eq!(upstream.host, "::1");
    assert_eq!(upstream.port, 9000);
    assert_eq!(upstream.authority, "[::1]:9000");
}

#[test]
fn plain_http_on_loopback_is_allowed_with_a_warning() {
    let config = load(&oms(&[
        ("token_url", "\"http://127.0.0.1:9999/oauth/token\""),
        ("upstream", "\"http://localhost:9998\""),
    ]));
    let integration = &config.integrations[0];
    assert!(!integration.token.token_url.tls);
    assert_eq!(integration.proxy.upstream.port, 9998);
    let warnings = config.warnings.join("\n");
    assert!(
        warnings.contains("integration[0].token_url uses plain http"),
        "{warnings}"
    );
    assert!(
        warnings.contains("integration[0].upstream uses plain http"),
        "{warnings}"
    );
}

// --- secrets ----------------------------------------------------------------------------------

#[test]
fn every_secret_form_resolves() {
    let dir = tempfile::tempdir().unwrap();
    let lf = dir.path().join("lf");
    let crlf = dir.path().join("crlf");
    std::fs::write(&lf, "file-secret\n").unwrap();
    std::fs::write(&crlf, "crlf-id\r\n").unwrap();
    std::env::set_var("TG_TEST_FORMS_SECRET", "env-secret");

    let integration = one(&oms(&[("client_secret", "\"literal-secret-1\"")]));
    assert_eq!(
        integration.token.client_secret.value.expose(),
        "literal-secret-1"
    );
    assert_eq!(integration.token.client_secret.source.describe(), "literal");

    let integration = one(&oms(&[(
        "client_secret",
        "{ env = \"TG_TEST_FORMS_SECRET\" }",
    )]));
    assert_eq!(integration.token.client_secret.value.expose(), "env-secret");
    assert_eq!(
        integration.token.client_secret.source,
        SecretSource::Env("TG_TEST_FORMS_SECRET".to_owned())
    );
    assert_eq!(
        integration.token.client_secret.source.describe(),
        "env TG_TEST_FORMS_SECRET"
    );

    let integration = one(&oms(&[
        (
            "client_secret",
            &format!("{{ file = {:?} }}", lf.display().to_string()),
        ),
        (
            "client_id",
            &format!("{{ file = {:?} }}", crlf.display().to_string()),
        ),
    ]));
    assert_eq!(
        integration.token.client_secret.value.expose(),
        "file-secret"
    );
    assert_eq!(integration.token.client_id.value.expose(), "crlf-id");
    assert_eq!(
        integration.token.client_secret.source.describe(),
        format!("file {}", lf.display())
    );

    // `resolve` reads again each time: what a reload or a file watcher relies on.
    std::fs::write(&lf, "rotated\n").unwrap();
    let again = integration.token.client_secret.source.resolve("k").unwrap();
    assert_eq!(again.expose(), "rotated");
}

#[test]
fn relative_secret_files_are_relative_to_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("s")).unwrap();
    std::fs::write(dir.path().join("s/secret"), "relative-secret\n").unwrap();
    let path = dir.path().join("tokengate.toml");
    std::fs::write(&path, oms(&[("client_secret", "{ file = \"s/secret\" }")])).unwrap();
    let config = Config::load(&path).unwrap();
    let secret = &config.integrations[0].token.client_secret;
    assert_eq!(secret.value.expose(), "relative-secret");
    assert_eq!(
        secret.source,
        SecretSource::File(dir.path().join("s/secret"))
    );
}

#[test]
fn a_literal_client_secret_is_warned_about_but_a_literal_client_id_is_not() {
    let config = load(&oms(&[]));
    assert_eq!(
        config.warnings,
        vec![
            "integration[0].client_secret is written in the config file; prefer { file = ... } \
             or { env = ... }"
                .to_owned()
        ]
    );
}

#[test]
fn debug_output_never_contains_a_secret() {
    std::env::set_var("TG_TEST_DEBUG_SECRET", "env-secret-value-xyz");
    std::env::set_var("TG_TEST_DEBUG_PROXY", "proxyuser:proxy-pass-xyz");
    let text = format!(
        "[server]\negress_proxy = \"http://proxy.example:3128\"\n\
         egress_proxy_auth = {{ env = \"TG_TEST_DEBUG_PROXY\" }}\n\n{}\n{}",
        oms(&[
            ("client_id", "\"literal-id-xyz\""),
            ("client_secret", "\"literal-secret-xyz\"")
        ]),
        oms(&[
            ("name", "\"wms\""),
            ("listen", "\"127.0.0.1:8082\""),
            ("client_secret", "{ env = \"TG_TEST_DEBUG_SECRET\" }"),
        ]),
    );
    let config = load(&text);
    assert_eq!(
        config
            .server
            .egress_proxy_auth
            .as_ref()
            .unwrap()
            .value
            .expose(),
        "proxyuser:proxy-pass-xyz"
    );
    let debug = format!("{config:?}");
    for secret in [
        "literal-id-xyz",
        "literal-secret-xyz",
        "env-secret-value-xyz",
        "proxy-pass-xyz",
    ] {
        assert!(!debug.contains(secret), "`{secret}` appears in {debug}");
    }
    assert!(debug.contains("<redacted>"));
    assert_eq!(format!("{}", Secret::new("x")), "<redacted>");
}

#[test]
fn errors_never_quote_a_secret() {
    let message = expect_error(
        &oms(&[("client_secret", "98765432123")]),
        &["integration[0].client_secret: invalid type: integer, expected a string"],
    );
    assert!(!message.contains("98765432123"), "{message}");
    let message = expect_error(
        &oms(&[("client_id", "{ env = 31337 }")]),
        &["integration[0].client_id.env: invalid type: integer, expected a string"],
    );
    assert!(!message.contains("31337"), "{message}");
    let message = expect_error(
        &oms(&[("client_secret", "s3cr3tvalue")]),
        &["invalid TOML", "client_secret = \"...\""],
    );
    assert!(!message.contains("s3cr3tvalue"), "{message}");
}

#[test]
fn a_missing_env_var_is_named() {
    let message = expect_error(
        &oms(&[("client_secret", "{ env = \"TG_TEST_NEVER_SET_1\" }")]),
        &[
            "integration[0].client_secret",
            "environment variable TG_TEST_NEVER_SET_1 is not set",
            "set TG_TEST_NEVER_SET_1",
        ],
    );
    assert!(message.starts_with(&format!("{FILE}:6:")), "{message}");
}

#[test]
fn an_empty_env_var_is_an_error() {
    std::env::set_var("TG_TEST_EMPTY_SECRET", "");
    expect_error(
        &oms(&[("client_secret", "{ env = \"TG_TEST_EMPTY_SECRET\" }")]),
        &[
            "integration[0].client_secret",
            "TG_TEST_EMPTY_SECRET is empty",
        ],
    );
}

#[test]
fn a_missing_secret_file_names_the_path_and_the_user() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let message = expect_error(
        &oms(&[(
            "client_secret",
            &format!("{{ file = {:?} }}", missing.display().to_string()),
        )]),
        &[
            "integration[0].client_secret",
            &missing.display().to_string(),
            "tokengate runs as",
            "No such file",
        ],
    );
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .unwrap();
        assert!(message.contains(&format!("uid {uid}")), "{message}");
    }
}

#[test]
fn an_empty_secret_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    expect_error(
        &oms(&[(
            "client_secret",
            &format!("{{ file = {:?} }}", empty.display().to_string()),
        )]),
        &["integration[0].client_secret", "is empty"],
    );
}

#[test]
fn a_secret_table_takes_exactly_env_or_file() {
    expect_error(
        &oms(&[("client_secret", "{ env = \"A\", file = \"/b\" }")]),
        &[
            "integration[0].client_secret",
            "exactly one of `env` or `file`",
        ],
    );
    expect_error(
        &oms(&[("client_secret", "{ path = \"/b\" }")]),
        &[
            "integration[0].client_secret",
            "unknown key `path`",
            "{ file = \"PATH\" }",
        ],
    );
    expect_error(
        &oms(&[("client_secret", "{ }")]),
        &["integration[0].client_secret", "needs `env` or `file`"],
    );
    expect_error(
        &oms(&[("client_secret", "42")]),
        &[
            "integration[0].client_secret",
            "invalid type",
            "{ env = \"NAME\" } or { file = \"PATH\" }",
        ],
    );
    expect_error(
        &oms(&[("client_id", "\"\"")]),
        &["integration[0].client_id", "empty string"],
    );
}

#[test]
fn a_missing_client_secret_says_how_to_add_one() {
    expect_error(
        &oms(&[("client_secret", "")]),
        &[
            "integration[0].client_secret: missing",
            "{ file = \"PATH\" }",
            "[defaults]",
        ],
    );
    expect_error(
        &oms(&[("client_id", "")]),
        &["integration[0].client_id: missing"],
    );
}

// --- error messages ---------------------------------------------------------------------------

#[test]
fn an_unknown_key_suggests_the_closest_one() {
    let text = format!(
        "{}\n{}",
        oms(&[]),
        oms(&[
            ("name", "\"wms\""),
            ("listen", "\"127.0.0.1:8082\""),
            ("client_secrte", "\"x\"")
        ])
    );
    // The second table starts on line 8; its seventh key is on line 14.
    expect_error(
        &text,
        &[
            &format!("{FILE}:14:1: integration[1].client_secrte:"),
            "unknown key `client_secrte` in [[integration]]; did you mean `client_secret`?",
        ],
    );
    expect_error(
        "[server]\nadmin_lisen = \"127.0.0.1:9464\"\n",
        &[
            &format!("{FILE}:2:1: server.admin_lisen:"),
            "did you mean `admin_listen`?",
        ],
    );
    expect_error(
        &format!("[defaults]\nupstraem = \"https://x\"\n{}", oms(&[])),
        &["defaults.upstraem:", "did you mean `upstream`?"],
    );
    expect_error(
        &format!("[integrations]\n{}", oms(&[])),
        &["integrations:", "did you mean `integration`?"],
    );
}

#[test]
fn an_unknown_key_without_a_near_match_lists_the_valid_ones_or_where_it_belongs() {
    expect_error(
        &oms(&[("colour", "\"blue\"")]),
        &[
            "integration[0].colour",
            "valid keys here:",
            "client_secret",
            "request_timeout",
        ],
    );
    expect_error(
        &oms(&[("admin_listen", "\"127.0.0.1:9000\"")]),
        &["integration[0].admin_listen", "it belongs in [server]"],
    );
    expect_error(
        "[server]\nregion = \"us2\"\n",
        &["server.region", "belongs in [[integration]] or [defaults]"],
    );
    expect_error(
        &format!("region = \"us2\"\n{}", oms(&[])),
        &[
            "region:",
            "the top level",
            "keys above the first [table] header",
        ],
    );
}

#[test]
fn wrong_types_name_the_key_and_the_form_to_write() {
    expect_error(
        &oms(&[("ttl", "5")]),
        &[
            &format!("{FILE}:7:7: integration[0].ttl: invalid type: integer `5`"),
            "duration string, e.g. ttl = \"30s\"",
        ],
    );
    expect_error(
        "[server]\nallow_remote_clients = \"yes\"\n",
        &[
            &format!("{FILE}:2:24: server.allow_remote_clients: invalid type"),
            "allow_remote_clients = true or allow_remote_clients = false",
        ],
    );
    expect_error(
        &oms(&[("listen", "8081")]),
        &["integration[0].listen: invalid type", "\"127.0.0.1:8081\""],
    );
    expect_error(
        &oms(&[("refresh_at", "\"0.8\"")]),
        &[
            "integration[0].refresh_at: invalid type",
            "refresh_at = 0.8",
        ],
    );
    expect_error(
        &oms(&[("extra_params", "{ audience = 1 }")]),
        &[
            "integration[0].extra_params.audience: invalid type",
            "quote the value",
        ],
    );
    expect_error(
        &oms(&[("allow_methods", "\"GET\"")]),
        &[
            "integration[0].allow_methods: invalid type",
            "[\"GET\", \"POST\"]",
        ],
    );
    expect_error(
        "[integration]\nname = \"oms\"\n",
        &[
            "integration: invalid type",
            "[[integration]] table (double brackets)",
        ],
    );
    expect_error("server = 1\n", &["server: invalid type", "[server]"]);
}

#[test]
fn bad_durations_show_the_value_and_an_example() {
    expect_error(
        &oms(&[("connect_timeout", "\"5 parsecs\"")]),
        &[
            "integration[0].connect_timeout",
            "`5 parsecs` is not a duration",
            "\"500ms\", \"30s\" or \"5m\"",
        ],
    );
    expect_error(
        &oms(&[("request_timeout", "\"0s\"")]),
        &["integration[0].request_timeout", "greater than zero"],
    );
    expect_error(
        "[server]\nheader_read_timeout = \"0ms\"\n",
        &["server.header_read_timeout", "greater than zero"],
    );
    expect_error(
        &oms(&[("assume_lifetime", "\"500ms\"")]),
        &["integration[0].assume_lifetime", "at least 1s"],
    );
    expect_error(
        &oms(&[("ttl", "\"1500ms\"")]),
        &["integration[0].ttl", "whole seconds"],
    );
    expect_error(
        &oms(&[("ttl", "\"0s\"")]),
        &["integration[0].ttl", "at least 1s"],
    );
    // A zero grace is a valid choice: exit at once without draining.
    assert_eq!(
        load(&format!("[server]\nshutdown_grace = \"0s\"\n{}", oms(&[])))
            .server
            .shutdown_grace,
        Duration::ZERO
    );
}

#[test]
fn bad_sizes_list_the_accepted_forms() {
    expect_error(
        &oms(&[("max_replay_body", "\"1MB\"")]),
        &[
            "integration[0].max_replay_body",
            "decimal units",
            "KiB, MiB or GiB",
        ],
    );
    expect_error(
        &oms(&[("max_replay_body", "\"lots\"")]),
        &[
            "integration[0].max_replay_body",
            "`lots` is not a size",
            "\"1MiB\"",
        ],
    );
    expect_error(
        &oms(&[("max_replay_body", "-1")]),
        &["integration[0].max_replay_body", "negative"],
    );
    expect_error(
        &oms(&[("max_replay_body", "1.5")]),
        &["integration[0].max_replay_body", "invalid type", "1048576"],
    );
    assert_eq!(
        one(&oms(&[("max_replay_body", "\"64 KiB\"")]))
            .proxy
            .max_replay_body,
        64 * 1024
    );
}

#[test]
fn region_or_token_url_is_required() {
    expect_error(
        &oms(&[("region", "")]),
        &[
            &format!("{FILE}:1:1: integration[0]:"),
            "neither region nor token_url",
            "region = \"us2\"",
        ],
    );
}

#[test]
fn an_unknown_region_lists_the_valid_ones() {
    expect_error(
        &oms(&[("region", "\"us1\"")]),
        &[
            &format!("{FILE}:4:10: integration[0].region"),
            "`us1` is not a known region",
            "\"us2\", \"us3\", \"eu2\", \"eu3\"",
        ],
    );
    expect_error(
        &format!("[defaults]\nregion = \"eu9\"\n{}", oms(&[("region", "")])),
        &[
            &format!("{FILE}:2:10: defaults.region (inherited by integration[0])"),
            "`eu9`",
        ],
    );
}

#[test]
fn a_non_loopback_listener_needs_allow_remote_clients() {
    expect_error(
        &oms(&[("listen", "\"0.0.0.0:8081\"")]),
        &[
            "integration[0].listen",
            "0.0.0.0:8081 is not a loopback address",
            "acts with integration `oms`'s OAuth credentials",
            "listen = \"127.0.0.1:8081\"",
            "allow_remote_clients = true",
        ],
    );
    let config = load(&format!(
        "[server]\nallow_remote_clients = true\n{}",
        oms(&[("listen", "\"0.0.0.0:8081\"")])
    ));
    assert_eq!(
        config.integrations[0].listen,
        "0.0.0.0:8081".parse().unwrap()
    );
    assert!(
        config
            .warnings
            .iter()
            .any(|w| w.contains("integration[0].listen = 0.0.0.0:8081 accepts calls")),
        "{:?}",
        config.warnings
    );
    // Loopback in all its forms is fine without the flag.
    for listen in ["127.0.0.2:8081", "[::1]:8081"] {
        one(&oms(&[("listen", &format!("\"{listen}\""))]));
    }
    // An admin listener on every address is normal (Prometheus in Kubernetes) and not warned.
    let config = load(&format!(
        "[server]\nadmin_listen = \"0.0.0.0:9464\"\n{}",
        oms(&[])
    ));
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
}

#[test]
fn plain_http_to_a_remote_host_is_refused() {
    expect_error(
        &oms(&[("token_url", "\"http://auth.example.com/oauth/token\"")]),
        &[
            "integration[0].token_url",
            "plain http:// to auth.example.com",
            "write https://auth.example.com/oauth/token",
        ],
    );
    expect_error(
        &oms(&[("upstream", "\"http://10.1.2.3:8080\"")]),
        &[
            "integration[0].upstream",
            "plain http:// to 10.1.2.3",
            "127.0.0.1, ::1 or localhost",
        ],
    );
}

#[test]
fn endpoints_without_userinfo_query_or_fragment() {
    expect_error(
        &oms(&[("upstream", "\"https://user:pw@api.bringg.com\"")]),
        &["integration[0].upstream", "credentials in the URL"],
    );
    expect_error(
        &oms(&[("token_url", "\"https://a.example/oauth/token?x=1\"")]),
        &["integration[0].token_url", "query string"],
    );
    expect_error(
        &oms(&[("upstream", "\"api.bringg.com\"")]),
        &[
            "integration[0].upstream",
            "is not a URL",
            "https://api.bringg.com",
        ],
    );
}

#[test]
fn names_and_listen_addresses_must_be_unique() {
    let second = |changes: &[(&str, &str)]| format!("{}\n{}", oms(&[]), oms(changes));
    expect_error(
        &second(&[("listen", "\"127.0.0.1:8082\"")]),
        &[
            &format!("{FILE}:9:8: integration[1].name"),
            "`oms` is already the name of integration[0]",
        ],
    );
    expect_error(
        &second(&[("name", "\"wms\"")]),
        &[
            "integration[1].listen",
            "conflicts with integration[0].listen = \"127.0.0.1:8081\"",
        ],
    );
    expect_error(
        &format!("[server]\nadmin_listen = \"0.0.0.0:8081\"\n{}", oms(&[])),
        &[
            "integration[0].listen",
            "conflicts with server.admin_listen",
        ],
    );
    // Port 0 asks the OS for a free port, so two such listeners do not clash (tests use it).
    let config = load(&format!(
        "{}\n{}",
        oms(&[("listen", "\"127.0.0.1:0\"")]),
        oms(&[("name", "\"wms\""), ("listen", "\"127.0.0.1:0\"")])
    ));
    assert_eq!(config.integrations.len(), 2);
}

#[test]
fn names_are_short_lowercase_labels() {
    for bad in [
        "\"OMS\"",
        "\"o m s\"",
        "\"\"",
        &format!("\"{}\"", "a".repeat(33)),
    ] {
        expect_error(
            &oms(&[("name", bad)]),
            &[
                "integration[0].name",
                "is not a valid name",
                "a-z, 0-9, _ and -",
            ],
        );
    }
    let message = expect_error(&oms(&[("name", "\"Billing API\"")]), &[]);
    assert!(message.contains("name = \"billing_api\""), "{message}");
    one(&oms(&[("name", &format!("\"{}\"", "a-_9".repeat(8)))]));
}

#[test]
fn missing_name_or_listen_and_misplaced_defaults() {
    expect_error(
        &oms(&[("name", "")]),
        &["integration[0]: has no name", "name = \"oms\""],
    );
    expect_error(
        &oms(&[("listen", "")]),
        &[
            "integration[0]:",
            "no listen address",
            "listen = \"127.0.0.1:8081\"",
        ],
    );
    expect_error(
        &format!("[defaults]\nlisten = \"127.0.0.1:1\"\n{}", oms(&[])),
        &[
            &format!("{FILE}:2:10: defaults.listen"),
            "set per integration, not in [defaults]",
        ],
    );
    expect_error(
        &oms(&[("listen", "\"localhost:8081\"")]),
        &["integration[0].listen", "not an IP address with a port"],
    );
}

#[test]
fn refresh_at_must_be_a_fraction() {
    for bad in ["0", "0.0", "1", "1.0", "1.5", "-0.2", "nan"] {
        expect_error(
            &oms(&[("refresh_at", bad)]),
            &["integration[0].refresh_at", "out of range", "0.5 to 0.9"],
        );
    }
    assert_eq!(one(&oms(&[("refresh_at", "0.75")])).token.refresh_at, 0.75);
}

#[test]
fn extra_params_cannot_override_reserved_parameters() {
    for reserved in [
        "grant_type",
        "client_id",
        "client_secret",
        "scope",
        "ttl",
        "Client_Secret",
    ] {
        expect_error(
            &oms(&[("extra_params", &format!("{{ {reserved} = \"x\" }}"))]),
            &[
                &format!("integration[0].extra_params.{reserved}"),
                "set by tokengate itself",
            ],
        );
    }
    let integration = one(&oms(&[("extra_params", "{ audience = \"bringg\" }")]));
    assert_eq!(
        integration.token.extra_params,
        vec![("audience".to_owned(), "bringg".to_owned())]
    );
}

#[test]
fn scope_auth_and_encoding_values_are_checked() {
    expect_error(
        &oms(&[("scope", "\"\"")]),
        &["integration[0].scope", "is empty"],
    );
    expect_error(
        &oms(&[("token_auth", "\"header\"")]),
        &["integration[0].token_auth", "\"body\"", "\"basic\""],
    );
    expect_error(
        &oms(&[("token_encoding", "\"xml\"")]),
        &[
            "integration[0].token_encoding",
            "\"form\", \"json\" or \"multipart\"",
        ],
    );
    expect_error(
        "[server]\nlog_format = \"yaml\"\n",
        &["server.log_format", "\"text\" or \"json\""],
    );
    expect_error(
        &format!("[server]\nadmin_listen = \"9464\"\n{}", oms(&[])),
        &["server.admin_listen", "not an IP address with a port"],
    );
}

#[test]
fn egress_proxy_is_plain_http_with_a_port() {
    expect_error(
        &format!(
            "[server]\negress_proxy = \"https://proxy:3128\"\n{}",
            oms(&[])
        ),
        &[
            "server.egress_proxy",
            "https:// proxy is not supported",
            "CONNECT",
        ],
    );
    expect_error(
        &format!("[server]\negress_proxy = \"http://proxy\"\n{}", oms(&[])),
        &["server.egress_proxy", "has no port"],
    );
    expect_error(
        &format!(
            "[server]\negress_proxy = \"http://u:p@proxy:3128\"\n{}",
            oms(&[])
        ),
        &["server.egress_proxy", "egress_proxy_auth"],
    );
    let config = load(&format!(
        "[server]\negress_proxy = \"http://proxy.corp:3128\"\n{}",
        oms(&[])
    ));
    let proxy = config.server.egress_proxy.unwrap();
    assert_eq!(proxy.host_str(), Some("proxy.corp"));
    assert_eq!(proxy.port(), Some(3128));
}

#[test]
fn egress_proxy_auth_needs_a_proxy_and_a_colon() {
    expect_error(
        &format!(
            "[server]\negress_proxy_auth = {{ env = \"X\" }}\n{}",
            oms(&[])
        ),
        &[
            &format!("{FILE}:2:21: server.egress_proxy_auth"),
            "server.egress_proxy is not",
        ],
    );
    std::env::set_var("TG_TEST_PROXY_NO_COLON", "justauser");
    let message = expect_error(
        &format!(
            "[server]\negress_proxy = \"http://p:3128\"\n\
             egress_proxy_auth = {{ env = \"TG_TEST_PROXY_NO_COLON\" }}\n{}",
            oms(&[])
        ),
        &["server.egress_proxy_auth", "user:password"],
    );
    assert!(!message.contains("justauser"), "{message}");
    let config = load(&format!(
        "[server]\negress_proxy = \"http://p:3128\"\negress_proxy_auth = \"u:p\"\n{}",
        oms(&[])
    ));
    assert!(config
        .warnings
        .iter()
        .any(|w| w.starts_with("server.egress_proxy_auth is written in the config file")));
}

#[test]
fn allow_methods_are_valid_tokens_without_connect() {
    expect_error(
        &oms(&[("allow_methods", "[\"GET\", \"GE T\"]")]),
        &[
            "integration[0].allow_methods[1]",
            "`GE T` is not an HTTP method name",
        ],
    );
    expect_error(
        &oms(&[("allow_methods", "[\"CONNECT\"]")]),
        &[
            "integration[0].allow_methods[0]",
            "CONNECT cannot be allowed",
            "405",
        ],
    );
    expect_error(
        &oms(&[("allow_methods", "[]")]),
        &[
            "integration[0].allow_methods",
            "refuse every request",
            "remove the key",
        ],
    );
    let config = load(&oms(&[("allow_methods", "[\"get\", \"POST\", \"POST\"]")]));
    let methods = config.integrations[0].proxy.allow_methods.clone().unwrap();
    // Exactly as written (methods are case-sensitive), duplicates dropped.
    assert_eq!(methods.len(), 2);
    assert_eq!(methods[0].as_str(), "get");
    assert!(
        config.warnings.iter().any(|w| w.contains("write \"GET\"")),
        "{:?}",
        config.warnings
    );
}

#[test]
fn ca_file_must_hold_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pem = pem_file(dir.path());
    let integration = one(&oms(&[(
        "ca_file",
        &format!("{:?}", pem.display().to_string()),
    )]));
    assert_eq!(integration.token.ca_file.as_deref(), Some(pem.as_path()));
    assert_eq!(integration.proxy.ca_file.as_deref(), Some(pem.as_path()));

    let missing = dir.path().join("missing.pem");
    expect_error(
        &oms(&[("ca_file", &format!("{:?}", missing.display().to_string()))]),
        &[
            "integration[0].ca_file",
            &missing.display().to_string(),
            "cannot read",
        ],
    );
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    expect_error(
        &oms(&[("ca_file", &format!("{:?}", junk.display().to_string()))]),
        &[
            "integration[0].ca_file",
            &junk.display().to_string(),
            "-----BEGIN CERTIFICATE-----",
        ],
    );
}

#[test]
fn toml_syntax_errors_report_line_and_column() {
    expect_error(
        "[server]\nlog_format = text\n",
        &[
            &format!("{FILE}:2:14: invalid TOML"),
            "strings need quotes: log_format = \"text\"",
        ],
    );
    expect_error(
        "[server]\nlog_format = \"text\"\nlog_format = \"json\"\n",
        &[
            &format!("{FILE}:3:1:"),
            "`log_format` is already defined in this table",
        ],
    );
    expect_error(
        "[server]\n[server]\n",
        &[
            &format!("{FILE}:2:2:"),
            "table `server` is already defined above",
        ],
    );
    expect_error("[server\n", &[&format!("{FILE}:1:8: invalid TOML")]);
}

#[test]
fn at_least_one_integration_is_required() {
    for text in ["", "[server]\n", "integration = []\n"] {
        expect_error(
            text,
            &[
                "integration: no integration is configured",
                "[[integration]]",
                "client_secret",
            ],
        );
    }
}

#[test]
fn load_names_an_unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("absent.toml");
    let message = Config::load(&path).unwrap_err().to_string();
    assert!(
        message.starts_with(&path.display().to_string()),
        "{message}"
    );
    assert!(
        message.contains("cannot read the configuration file"),
        "{message}"
    );
    assert!(message.contains("--config"), "{message}");
}

#[test]
fn a_secret_file_that_is_not_a_secret_is_refused_without_reading_it_all() {
    let text = "[[integration]]\nname = \"oms\"\nlisten = \"127.0.0.1:8081\"\nregion = \"us2\"\nclient_id = \"a\"\nclient_secret = { file = \"/dev/zero\" }\n";
    let message = match Config::from_str_with_env(text, Path::new(FILE), &ProxyEnv::default()) {
        Ok(_) => panic!("/dev/zero accepted as a secret"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.contains("integration[0].client_secret"),
        "{message}"
    );
    assert!(message.contains("larger than 64 KiB"), "{message}");
}

// --- fleet mode ----------------------------------------------------------------------------

#[test]
fn fleet_keys_take_their_defaults_and_each_integration_joins_unless_it_opts_out() {
    let text = format!(
        "[fleet]\nredis_url = \"redis://:pw@10.0.0.5:6379/2\"\n{}{}",
        oms(&[]),
        oms(&[
            ("name", "\"wms\""),
            ("listen", "\"127.0.0.1:8082\""),
            ("fleet", "false")
        ])
    );
    let config = load(&text);
    let fleet = config.fleet.as_ref().unwrap();
    assert_eq!(fleet.key_prefix, "tokengate");
    assert_eq!(fleet.ca_file, None);
    let member = config.integrations[0].token.fleet.as_ref().unwrap();
    assert_eq!(member.wait_for_peer, Duration::from_secs(3));
    assert_eq!(member.on_unavailable, OnUnavailable::FetchLocally);
    assert_eq!(member.id.len(), 16, "a hash: {}", member.id);
    assert_eq!(
        config.integrations[1].token.fleet, None,
        "fleet = false opts out"
    );
    // The default id follows what makes the token, never the secret.
    let rotated = load(&text.replace("literal-secret-1", "rotated"));
    assert_eq!(
        rotated.integrations[0].token.fleet.as_ref().unwrap().id,
        member.id
    );
    let other_app = load(&text.replace("\"id-1\"", "\"id-2\""));
    assert_ne!(
        other_app.integrations[0].token.fleet.as_ref().unwrap().id,
        member.id
    );
    // The URL's password stays out of Debug output.
    assert!(!format!("{config:?}").contains(":pw@"));
}

#[test]
fn fleet_errors_name_the_key_and_the_fix() {
    let with = |fleet: &str, changes: &[(&str, &str)]| format!("{fleet}\n{}", oms(changes));
    let cases: &[(String, &[&str])] = &[
        (
            with("[fleet]\nwait_for_peer = \"1s\"", &[]),
            &["fleet.redis_url", "is missing"],
        ),
        (
            with("[fleet]\nredis_url = \"http://redis:6379\"", &[]),
            &["fleet.redis_url", "redis://host:port or rediss://"],
        ),
        (
            with(
                "[fleet]\nredis_url = \"redis://:secret-pw@redis:6379/x\"",
                &[],
            ),
            &[
                "fleet.redis_url",
                "database after the host must be a number",
            ],
        ),
        (
            with(
                "[fleet]\nredis_url = \"redis://redis:6379\"\nca_file = \"ca.pem\"",
                &[],
            ),
            &["fleet.ca_file", "rediss://"],
        ),
        (
            with(
                "[fleet]\nredis_url = \"redis://redis:6379\"\non_unavailable = \"wait\"",
                &[],
            ),
            &["fleet.on_unavailable", "\"fetch_locally\" or \"hold\""],
        ),
        (
            with(
                "[fleet]\nredis_url = \"redis://redis:6379\"\nkey_prefix = \"a b\"",
                &[],
            ),
            &["fleet.key_prefix"],
        ),
        (
            with("", &[("fleet", "true")]),
            &["integration[0].fleet", "no [fleet] table"],
        ),
        (
            with("", &[("fleet_id", "\"x\"")]),
            &["integration[0].fleet_id", "no [fleet] table"],
        ),
        (
            with(
                "[fleet]\nredis_url = \"redis://redis:6379\"",
                &[("fleet_id", "\"has space\"")],
            ),
            &["integration[0].fleet_id", "letters, digits"],
        ),
    ];
    for (text, parts) in cases {
        let message = expect_error(text, parts);
        assert!(!message.contains("secret-pw"), "{message}");
    }
}
