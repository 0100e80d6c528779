//! Configuration: the TOML schema, defaults, `[defaults]` inheritance, validation, and the
//! secret sources (`"literal"`, `{ env = "NAME" }`, `{ file = "PATH" }`).
//!
//! One loading path: read → parse (`deny_unknown_fields` everywhere) → validate → a [`Config`]
//! whose invariants hold (loopback rules, plain-http rules, ranges). Every error names the
//! file, the key path (`integration[1].client_secret`) and what to write instead.
//!
//! This module does no network I/O and never prints a secret: [`Secret`] has a redacted
//! `Debug`/`Display` and no `Serialize`. It does not watch files; it builds a fresh
//! [`Config`] each time it is asked, and [`diff`] compares two of them for a reload.
//!
//! # Layout
//! This file holds the validated types the rest of the crate reads, the defaults, and
//! [`Config::load`], the one loading path. The steps live in private submodules, their public
//! items re-exported here so every `config::X` path stays one path:
//! - `raw`: the serde shape of the file; what may be written, nothing about what it means.
//! - `validate`: raw → [`Config`]: `[defaults]` inheritance, defaults, every rule, secrets
//!   resolved; its child `validate::value` checks one written value at a time.
//! - `secret`: [`Secret`], [`SecretSource`], reading a secret from the environment or a file.
//! - `egress`: the route each endpoint takes (direct, `egress_proxy`, or
//!   `HTTPS_PROXY`/`NO_PROXY`); a pure decision, made at load time.
//! - `diagnose`: from a byte span to `file:line:column`, the key path and a suggestion.
//! - [`diff`]: what runs vs a reloaded file: the live keys each running integration takes by
//!   name, and what needs a restart (pure; `Running::reload` applies it).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::de::DeTable;

mod diagnose;
pub mod diff;
mod egress;
mod raw;
mod secret;
mod validate;

pub(crate) use egress::{proxy_name, EgressRule};
pub use egress::{Egress, ProxyEnv};
pub use raw::{FLEET_KEYS, INTEGRATION_KEYS, SERVER_KEYS};
pub use secret::{ResolvedSecret, Secret, SecretSource};

use diagnose::process_user;
use raw::RawFile;
use validate::Loader;

/// Region presets for `region = "..."`: they fill `token_url`.
pub const REGIONS: &[(&str, &str)] = &[
    ("us2", "https://us2-admin-api.bringg.com/oauth/token"),
    ("us3", "https://us3-api.bringg.com/oauth/token"),
    ("eu2", "https://eu2-admin-api.bringg.com/oauth/token"),
    ("eu3", "https://eu3-admin-api.bringg.com/oauth/token"),
];

pub const DEFAULT_UPSTREAM: &str = "https://api.bringg.com";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Token-request parameters tokengate sets itself, so `extra_params` may not carry them: a
/// second `client_secret` or `grant_type` would make the request ambiguous to the server.
pub(crate) const RESERVED_PARAMS: &[&str] =
    &["grant_type", "client_id", "client_secret", "scope", "ttl"];

// The defaults for keys nobody set. Only `validate` applies them; they stay here, beside the
// public ones, so every default is in one place.
const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_REFRESH_AT: f64 = 0.8;
const DEFAULT_ASSUME_LIFETIME: Duration = Duration::from_secs(30 * 60);
const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_REPLAY_BODY: u64 = 1024 * 1024;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_KEY_PREFIX: &str = "tokengate";
const DEFAULT_WAIT_FOR_PEER: Duration = Duration::from_secs(3);

/// `[fleet]`: the Redis that replicas holding one app share their token through. Only
/// `wait_for_peer` and `on_unavailable` (copied into each member's [`FleetSettings`]) apply
/// live; the connection needs a restart.
#[derive(Clone, Debug, PartialEq)]
pub struct Fleet {
    /// `redis://` or `rediss://`; may carry a password, so it is a secret.
    pub redis_url: ResolvedSecret,
    pub ca_file: Option<PathBuf>,
    pub key_prefix: String,
}

/// What Redis being unreachable near expiry means for an integration in the fleet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnUnavailable {
    /// Fetch alone (counted) in the last 10 % of the token's life.
    FetchLocally,
    /// Stay with no token and go unready: for servers that revoke the previous token on each
    /// issue, where a local fetch would revoke the fleet's token.
    Hold,
}

/// One integration's membership of the fleet; part of [`TokenSettings`], so a reload changes
/// it live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FleetSettings {
    /// `fleet_id`, or a hash of what makes two integrations the same app and token.
    pub id: String,
    pub wait_for_peer: Duration,
    pub on_unavailable: OnUnavailable,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenAuth {
    /// `client_secret_post`: credentials as request parameters.
    Body,
    /// `client_secret_basic`: RFC 6749 §2.3.1 HTTP Basic.
    Basic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenEncoding {
    Form,
    Json,
    Multipart,
}

/// A validated `scheme://host[:port][/base-path]` endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as configured (normalised by `url::Url`).
    pub url: url::Url,
    /// `true` for `https`.
    pub tls: bool,
    /// Lower-case host without a trailing dot; IPv6 without brackets.
    pub host: String,
    /// Explicit or scheme-default port.
    pub port: u16,
    /// `host[:port]` as it goes into `Host` / `:authority` (port only when not the scheme default;
    /// IPv6 in brackets).
    pub authority: String,
    /// Path prefix without a trailing slash (`""` for none), prepended to every request path.
    pub base_path: String,
}

impl Endpoint {
    /// Parses and checks an endpoint URL. The error is the `<what is wrong>; <what to write>`
    /// part of a message, without file or key (the caller knows those).
    ///
    /// Plain `http` is accepted only for a loopback host: the token endpoint receives the
    /// client secret and the upstream receives the Bearer token, and neither may cross a
    /// network unencrypted (contract, Security).
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let url = url::Url::parse(text).map_err(|e| {
            format!("`{text}` is not a URL ({e}); write e.g. \"https://api.bringg.com\"")
        })?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => {
                return Err(format!(
                    "scheme `{other}` is not supported; write an https:// URL"
                ))
            }
        };
        if !url.username().is_empty() || url.password().is_some() {
            return Err(
                "credentials in the URL are not supported (they would be logged and sent \
                 as-is); remove the `user:password@` part"
                    .to_owned(),
            );
        }
        if url.query().is_some() {
            return Err("a query string is not supported here; remove the `?...` part".to_owned());
        }
        if url.fragment().is_some() {
            return Err("a fragment is not supported here; remove the `#...` part".to_owned());
        }
        let (host, bracketed, loopback) = match url.host() {
            Some(url::Host::Domain(domain)) => {
                let host = domain.trim_end_matches('.').to_ascii_lowercase();
                let loopback = host == "localhost";
                (host.clone(), host, loopback)
            }
            Some(url::Host::Ipv4(ip)) => (ip.to_string(), ip.to_string(), ip.is_loopback()),
            Some(url::Host::Ipv6(ip)) => (
                ip.to_string(),
                format!("[{ip}]"),
                IpAddr::V6(ip).to_canonical().is_loopback(),
            ),
            None => {
                return Err(format!(
                    "`{text}` has no host; write e.g. \"https://api.bringg.com\""
                ))
            }
        };
        if host.is_empty() {
            return Err(format!(
                "`{text}` has no host; write e.g. \"https://api.bringg.com\""
            ));
        }
        if !tls && !loopback {
            return Err(format!(
                "plain http:// to {host} would send the client secret or the Bearer token \
                 unencrypted; http:// is allowed only for 127.0.0.1, ::1 or localhost; write \
                 https://{}",
                text.trim_start_matches("http://")
            ));
        }
        let Some(port) = url.port_or_known_default() else {
            return Err(format!(
                "`{text}` has no port and its scheme has no default one"
            ));
        };
        // `url` already drops a port equal to the scheme default, so `port()` is the
        // explicit, non-default one that must appear in `Host`.
        let authority = match url.port() {
            Some(port) => format!("{bracketed}:{port}"),
            None => bracketed,
        };
        let base_path = url.path().trim_end_matches('/').to_owned();
        Ok(Endpoint {
            url,
            tls,
            host,
            port,
            authority,
            base_path,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Server {
    pub admin_listen: SocketAddr,
    pub log_format: LogFormat,
    pub shutdown_grace: Duration,
    pub allow_remote_clients: bool,
    pub header_read_timeout: Duration,
    /// `http://host:port/` only: the proxy leg is plain HTTP and TLS runs inside CONNECT.
    /// Never has userinfo (credentials live in `egress_proxy_auth`), so `Debug` is safe.
    pub egress_proxy: Option<url::Url>,
    /// `user:password`, checked to contain a `:`.
    pub egress_proxy_auth: Option<ResolvedSecret>,
}

/// What the token client and refresher need; all of it applies live on reload.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenSettings {
    pub token_url: Endpoint,
    /// How the token endpoint is reached.
    pub egress: Egress,
    pub client_id: ResolvedSecret,
    pub client_secret: ResolvedSecret,
    /// At least 1 s and a whole number of seconds, since it goes on the wire as `ttl=<seconds>`.
    pub ttl: Option<Duration>,
    pub scope: Option<String>,
    pub auth: TokenAuth,
    pub encoding: TokenEncoding,
    /// In the order written (a `toml` table is sorted, which is fine).
    pub extra_params: Vec<(String, String)>,
    /// Fraction of the lifetime after which to refresh, in (0, 1).
    pub refresh_at: f64,
    pub assume_lifetime: Duration,
    pub timeout: Duration,
    pub ca_file: Option<PathBuf>,
    /// `None`: this integration fetches its own tokens.
    pub fleet: Option<FleetSettings>,
}

/// What the proxy needs; all of it applies live on reload.
#[derive(Clone, Debug, PartialEq)]
pub struct ProxySettings {
    pub upstream: Endpoint,
    /// How the upstream is reached.
    pub egress: Egress,
    /// `None` = every method allowed.
    pub allow_methods: Option<Vec<http::Method>>,
    pub max_replay_body: u64,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Integration {
    pub name: String,
    pub listen: SocketAddr,
    pub token: TokenSettings,
    pub proxy: ProxySettings,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The file it was loaded from (for messages and reload).
    pub path: PathBuf,
    pub server: Server,
    /// `[fleet]`, when present.
    pub fleet: Option<Fleet>,
    pub integrations: Vec<Integration>,
    /// Non-fatal findings (literal secrets, non-loopback listeners allowed, plain http, ...),
    /// logged at start and printed by `check`.
    pub warnings: Vec<String>,
}

/// A configuration error. `Display` is the full message a user sees:
/// `<file>[:line:col]: <key path>: <what is wrong>; <what to write instead>`.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    pub message: String,
}

impl ConfigError {
    pub fn new(message: impl Into<String>) -> Self {
        ConfigError {
            message: message.into(),
        }
    }
}

impl Config {
    /// Reads, parses, validates and resolves every secret.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(format!(
                "{}: cannot read the configuration file: {e} (tokengate runs as {}); pass \
                 the right file with --config PATH or $TOKENGATE_CONFIG",
                path.display(),
                process_user()
            ))
        })?;
        Config::from_str(&text, path)
    }
    /// Same from text already read (tests, the embedded demo config); `path` is for messages.
    /// The proxy variables come from tokengate's environment.
    pub fn from_str(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Config::from_str_with_env(text, path, &ProxyEnv::from_process())
    }
    /// Same with the proxy variables given, so tests need not change the process environment
    /// (which every test in the binary shares).
    pub fn from_str_with_env(
        text: &str,
        path: &Path,
        env: &ProxyEnv,
    ) -> Result<Config, ConfigError> {
        let loader = Loader::new(text, path, env);
        let root = DeTable::parse(text).map_err(|e| loader.syntax_error(&e))?;
        let raw = RawFile::deserialize(toml::de::Deserializer::from(root.clone()))
            .map_err(|e| loader.serde_error(&e, root.get_ref()))?;
        loader.build(raw)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalised() {
        let e = Endpoint::parse("https://API.Example.com.:8443/base/").unwrap();
        assert_eq!(e.host, "api.example.com");
        assert_eq!(e.port, 8443);
        assert_eq!(e.authority, "api.example.com:8443");
        assert_eq!(e.base_path, "/base");
        assert!(e.tls);

        let e = Endpoint::parse("https://api.bringg.com:443").unwrap();
        assert_eq!(e.authority, "api.bringg.com");
        assert_eq!(e.port, 443);
        assert_eq!(e.base_path, "");

        let e = Endpoint::parse("http://[::1]:9000/x").unwrap();
        assert_eq!(e.host, "::1");
        assert_eq!(e.authority, "[::1]:9000");
        assert!(!e.tls);

        assert!(Endpoint::parse("http://localhost.:80").is_ok());
        assert!(Endpoint::parse("http://127.9.9.9").is_ok());
        assert!(Endpoint::parse("http://api.bringg.com").is_err());
        assert!(Endpoint::parse("http://10.0.0.1").is_err());
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("https://u:p@x").is_err());
        assert!(Endpoint::parse("https://x/?a=b").is_err());
        assert!(Endpoint::parse("https://x/#f").is_err());
        assert!(Endpoint::parse("api.bringg.com").is_err());
    }
}
