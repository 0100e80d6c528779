//! Configuration: the TOML schema, defaults, `[defaults]` inheritance, validation, and the
//! secret sources (`"literal"`, `{ env = "NAME" }`, `{ file = "PATH" }`).
//!
//! One loading path: read → parse (`deny_unknown_fields` everywhere) → validate → a [`Config`]
//! whose invariants hold (loopback rules, plain-http rules, ranges). Every error names the
//! file, the key path (`integration[1].client_secret`) and what to write instead.
//!
//! This module does no network I/O and never prints a secret: [`Secret`] has a redacted
//! `Debug`/`Display` and no `Serialize`. It does not watch files or decide what a reload
//! changes; it only builds a fresh [`Config`] each time it is asked.
//!
//! How errors find their place: the text is parsed once into toml's spanned tree
//! ([`toml::de::DeTable`]), and the raw structs are deserialized from it with
//! [`toml::Spanned`] leaves. A serde error carries a byte span; looking that span up in the
//! spanned tree gives the key path with array indices (`integration[1].ttl`), which serde's
//! own error does not have. Validation errors use the spans kept in the raw structs.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::Deserialize;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Region presets for `region = "..."`: they fill `token_url`.
pub const REGIONS: &[(&str, &str)] = &[
    ("us2", "https://us2-admin-api.bringg.com/oauth/token"),
    ("us3", "https://us3-api.bringg.com/oauth/token"),
    ("eu2", "https://eu2-admin-api.bringg.com/oauth/token"),
    ("eu3", "https://eu3-admin-api.bringg.com/oauth/token"),
];

pub const DEFAULT_UPSTREAM: &str = "https://api.bringg.com";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9464";

/// Every key `[server]` accepts; the README reference and the example are checked against it.
pub const SERVER_KEYS: &[&str] = &[
    "admin_listen",
    "log_format",
    "shutdown_grace",
    "allow_remote_clients",
    "header_read_timeout",
    "egress_proxy",
    "egress_proxy_auth",
];

/// Every key `[[integration]]` accepts; `[defaults]` accepts all of them but `name` and `listen`.
pub const INTEGRATION_KEYS: &[&str] = &[
    "name",
    "listen",
    "region",
    "token_url",
    "upstream",
    "client_id",
    "client_secret",
    "ttl",
    "scope",
    "token_auth",
    "token_encoding",
    "extra_params",
    "refresh_at",
    "assume_lifetime",
    "token_timeout",
    "allow_methods",
    "max_replay_body",
    "connect_timeout",
    "request_timeout",
    "ca_file",
];

/// Token-request parameters tokengate sets itself, so `extra_params` may not carry them: a
/// second `client_secret` or `grant_type` would make the request ambiguous to the server.
pub const RESERVED_PARAMS: &[&str] = &["grant_type", "client_id", "client_secret", "scope", "ttl"];

const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;
const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_REFRESH_AT: f64 = 0.8;
const DEFAULT_ASSUME_LIFETIME: Duration = Duration::from_secs(30 * 60);
const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_MAX_REPLAY_BODY: u64 = 1024 * 1024;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A secret value (client id, client secret, proxy credentials, a token). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The only way to read the value; grep for `expose` to audit every use.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Where a secret comes from. `Debug` of `Literal` is redacted (via [`Secret`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SecretSource {
    Literal(Secret),
    Env(String),
    /// Already joined with the config file's directory when written as a relative path.
    File(PathBuf),
}

/// Secrets are short; a cap keeps a path pointing at `/dev/zero` or a huge file (read again
/// every 2 s by the refresher) from exhausting memory.
const MAX_SECRET_FILE: u64 = 64 * 1024;

fn read_secret_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_SECRET_FILE + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_SECRET_FILE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "larger than {} KiB; this is not a secret",
                MAX_SECRET_FILE / 1024
            ),
        ));
    }
    Ok(text)
}

impl SecretSource {
    /// Reads the secret now (env var or file; trailing `\n`/`\r\n` is trimmed).
    /// `key` is the key path used in the error (`integration[0].client_secret`).
    ///
    /// The error message starts with `key`; the caller puts the file name in front
    /// ([`Config::load`] does), because a re-read on file change has no config position.
    pub fn resolve(&self, key: &str) -> Result<Secret, ConfigError> {
        let value = match self {
            SecretSource::Literal(secret) => {
                if secret.expose().is_empty() {
                    return Err(ConfigError::new(format!(
                        "{key}: the secret is an empty string; write the value, or better \
                         {{ file = \"PATH\" }} or {{ env = \"NAME\" }}"
                    )));
                }
                return Ok(secret.clone());
            }
            SecretSource::Env(name) => match std::env::var(name) {
                // A Kubernetes Secret made from a file often ends in a newline, and
                // `secretKeyRef` hands it over verbatim; nobody means that newline.
                Ok(value) => trim_line_end(value),
                Err(std::env::VarError::NotPresent) => {
                    return Err(ConfigError::new(format!(
                        "{key}: environment variable {name} is not set; set {name} in \
                         tokengate's environment, or point {key} at a file with \
                         {{ file = \"PATH\" }}"
                    )));
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(ConfigError::new(format!(
                        "{key}: environment variable {name} is not valid UTF-8; \
                         set it to the secret as text"
                    )));
                }
            },
            SecretSource::File(path) => match read_secret_file(path) {
                // Editors and `echo` add a final newline; the secret never contains one.
                Ok(value) => trim_line_end(value),
                Err(e) => {
                    return Err(ConfigError::new(format!(
                        "{key}: cannot read secret file {}: {e} (tokengate runs as {}); \
                         create the file, correct the path, or make it readable by that user",
                        path.display(),
                        process_user()
                    )));
                }
            },
        };
        if value.is_empty() {
            let what = match self {
                SecretSource::Env(name) => format!("environment variable {name} is empty"),
                SecretSource::File(path) => format!("secret file {} is empty", path.display()),
                SecretSource::Literal(_) => "the secret is empty".to_owned(),
            };
            return Err(ConfigError::new(format!(
                "{key}: {what}; put the secret in it"
            )));
        }
        Ok(Secret(value))
    }
    /// Human description for `check` and logs: `literal`, `env TOKENGATE_OMS_SECRET`,
    /// `file /var/run/...`. Never the value.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Literal(_) => "literal".to_owned(),
            SecretSource::Env(name) => format!("env {name}"),
            SecretSource::File(path) => format!("file {}", path.display()),
        }
    }
}

fn trim_line_end(mut value: String) -> String {
    let kept = value.trim_end_matches(['\r', '\n']).len();
    value.truncate(kept);
    value
}

/// `uid 1000 (alice)` for messages about unreadable files: "permission denied" is only
/// actionable when you know which user was denied. Read from `/proc` because the crate
/// forbids `unsafe` (so no `geteuid`) and adds no dependency for this.
fn process_user() -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                // Real, effective, saved, filesystem: the effective uid decides access.
                .and_then(|ids| ids.split_whitespace().nth(1))
                .map(str::to_owned)
        });
    let name_from_passwd = uid.as_deref().and_then(|uid| {
        let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
        passwd.lines().find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let entry_uid = fields.nth(1)?;
            (entry_uid == uid).then(|| name.to_owned())
        })
    });
    let name = name_from_passwd.or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()));
    match (uid, name) {
        (Some(uid), Some(name)) => format!("uid {uid} ({name})"),
        (Some(uid), None) => format!("uid {uid}"),
        (None, Some(name)) => format!("user {name}"),
        (None, None) => "an unknown user".to_owned(),
    }
}

/// A secret together with where it came from (so it can be re-read on reload / file change).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedSecret {
    pub source: SecretSource,
    pub value: Secret,
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

/// How one endpoint is reached: directly, or through a CONNECT tunnel at an egress proxy.
///
/// Decided at load time, by one rule ([`EgressRule::route`]) for the token endpoint and the
/// upstream alike, so both clients always take the same path (contract, Egress). Held in
/// [`TokenSettings`] and [`ProxySettings`], so a reload that changes it (another proxy, a new
/// `egress_proxy_auth`) rebuilds the clients like any other changed setting.
#[derive(Clone, Debug, PartialEq)]
pub enum Egress {
    /// `why`: `loopback http`, `no egress_proxy or HTTPS_PROXY set`, or the `NO_PROXY` entry
    /// that matched.
    Direct { why: String },
    Proxy {
        /// `http://host:port/`. Never has userinfo (credentials are in `auth`), so `Debug`
        /// and `Display` are safe to print.
        url: url::Url,
        /// `user:password`, sent as `Proxy-Authorization: Basic` on CONNECT only.
        auth: Option<ResolvedSecret>,
        /// Where the proxy was configured: `server.egress_proxy` or `environment HTTPS_PROXY`.
        source: String,
    },
}

impl Egress {
    /// One line for `check`, `token` and logs; never a credential:
    /// `CONNECT via http://proxy:3128 (server.egress_proxy; credentials from file /run/p)`.
    pub fn describe(&self) -> String {
        match self {
            Egress::Direct { why } => format!("direct ({why})"),
            Egress::Proxy { url, auth, source } => {
                let credentials = match auth {
                    Some(secret) => format!("credentials from {}", secret.source.describe()),
                    None => "no credentials".to_owned(),
                };
                format!("CONNECT via {} ({source}; {credentials})", proxy_name(url))
            }
        }
    }
}

/// `http://host:port` of a proxy URL, for messages (the URL's own `Display` adds a `/`).
pub fn proxy_name(url: &url::Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// The proxy variables of tokengate's environment, read once per load. A plain value, so
/// the egress rule is a pure function of it and tests never touch the process environment.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    /// `(name, value)` of the first of `HTTPS_PROXY`, `https_proxy` that is set and not empty.
    pub https_proxy: Option<(String, String)>,
    /// `(name, value)` of the first of `NO_PROXY`, `no_proxy` that is set and not empty.
    pub no_proxy: Option<(String, String)>,
}

impl ProxyEnv {
    /// From tokengate's environment. Upper case first, as curl, Go and reqwest read them.
    pub fn from_process() -> ProxyEnv {
        ProxyEnv::from_lookup(|name| std::env::var(name).ok())
    }

    /// From any lookup (`|name| map.get(name).cloned()` in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> ProxyEnv {
        let first = |names: [&str; 2]| {
            names.iter().find_map(|name| {
                lookup(name)
                    .filter(|value| !value.trim().is_empty())
                    .map(|value| ((*name).to_owned(), value.trim().to_owned()))
            })
        };
        ProxyEnv {
            https_proxy: first(["HTTPS_PROXY", "https_proxy"]),
            no_proxy: first(["NO_PROXY", "no_proxy"]),
        }
    }
}

// Hand-written: an HTTPS_PROXY value may carry `user:password@`.
impl fmt::Debug for ProxyEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProxyEnv")
            .field(
                "https_proxy",
                &self.https_proxy.as_ref().map(|(name, _)| name),
            )
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// Where proxies come from for one configuration, resolved once per load; [`route`] then
/// decides each endpoint.
///
/// [`route`]: EgressRule::route
#[derive(Clone, Debug, PartialEq)]
pub enum EgressRule {
    /// Neither `egress_proxy` nor `HTTPS_PROXY`.
    Direct,
    /// `server.egress_proxy`: every destination but plain-http loopback goes through it;
    /// `NO_PROXY` does not apply (the configuration file says so explicitly).
    Configured {
        url: url::Url,
        auth: Option<ResolvedSecret>,
    },
    /// `HTTPS_PROXY` from the environment, with `NO_PROXY` exemptions.
    Environment {
        /// `HTTPS_PROXY` or `https_proxy`, whichever was used.
        name: String,
        url: url::Url,
        auth: Option<ResolvedSecret>,
        /// `(name, value)` of `NO_PROXY`/`no_proxy`.
        no_proxy: Option<(String, String)>,
    },
}

impl EgressRule {
    /// The rule for `server.egress_proxy` (and its auth) when set, else for the environment.
    /// The error is about the environment's `HTTPS_PROXY` and names it; it never shows the
    /// value's credentials.
    pub fn new(
        egress_proxy: Option<&url::Url>,
        egress_proxy_auth: Option<&ResolvedSecret>,
        env: &ProxyEnv,
    ) -> Result<EgressRule, String> {
        if let Some(url) = egress_proxy {
            return Ok(EgressRule::Configured {
                url: url.clone(),
                auth: egress_proxy_auth.cloned(),
            });
        }
        let Some((name, value)) = &env.https_proxy else {
            return Ok(EgressRule::Direct);
        };
        let (url, auth) = parse_env_proxy(name, value)?;
        Ok(EgressRule::Environment {
            name: name.clone(),
            url,
            auth,
            no_proxy: env.no_proxy.clone(),
        })
    }

    /// How `dest` is reached. A plain-http destination is always loopback (validation) and
    /// always direct: tests and the demo must not depend on the host's proxy settings.
    pub fn route(&self, dest: &Endpoint) -> Egress {
        if !dest.tls {
            return Egress::Direct {
                why: "loopback http".to_owned(),
            };
        }
        match self {
            EgressRule::Direct => Egress::Direct {
                why: "no egress_proxy or HTTPS_PROXY set".to_owned(),
            },
            EgressRule::Configured { url, auth } => Egress::Proxy {
                url: url.clone(),
                auth: auth.clone(),
                source: "server.egress_proxy".to_owned(),
            },
            EgressRule::Environment {
                name,
                url,
                auth,
                no_proxy,
            } => {
                if let Some((no_name, list)) = no_proxy {
                    if let Some(entry) = no_proxy_match(list, &dest.host) {
                        return Egress::Direct {
                            why: format!("{no_name} entry \"{entry}\" matches {}", dest.host),
                        };
                    }
                }
                Egress::Proxy {
                    url: url.clone(),
                    auth: auth.clone(),
                    source: format!("environment {name}"),
                }
            }
        }
    }
}

/// The `NO_PROXY` entry that exempts `host` (lower case, no trailing dot, IPv6 without
/// brackets, as in [`Endpoint::host`]), with the conventional meaning (curl, Go, reqwest):
/// comma-separated entries; `*` matches every host; an IP address matches itself and a CIDR
/// (`10.0.0.0/8`) the addresses in it; any other entry is a domain that matches itself and
/// its subdomains, with or without a leading dot (`bringg.com` and `.bringg.com` both match
/// `api.bringg.com`, neither matches `notbringg.com`). Names are not resolved to match IP
/// entries, and an entry's `:port` is not supported (such an entry matches nothing).
pub fn no_proxy_match<'l>(list: &'l str, host: &str) -> Option<&'l str> {
    let host = host.trim_end_matches('.');
    let host_ip = host.parse::<IpAddr>().ok().map(|ip| ip.to_canonical());
    list.split(',').map(str::trim).find(|entry| {
        if entry.is_empty() {
            return false;
        }
        if *entry == "*" {
            return true;
        }
        let bare = entry.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return host_ip == Some(ip.to_canonical());
        }
        if let Some((net, bits)) = entry.split_once('/') {
            return match (host_ip, net.parse::<IpAddr>(), bits.parse::<u8>()) {
                (Some(ip), Ok(net), Ok(bits)) => cidr_contains(net.to_canonical(), bits, ip),
                _ => false,
            };
        }
        if host_ip.is_some() {
            return false;
        }
        let domain = entry.trim_start_matches('.').trim_end_matches('.');
        if domain.is_empty() {
            return false;
        }
        host.eq_ignore_ascii_case(domain)
            || (host.len() > domain.len()
                && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
                && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain))
    })
}

/// `ip` is in `net/bits` (same family only; `bits` beyond the family's width matches nothing).
fn cidr_contains(net: IpAddr, bits: u8, ip: IpAddr) -> bool {
    fn prefix_equal(a: u128, b: u128, bits: u32, width: u32) -> bool {
        if bits > width {
            return false;
        }
        let shift = width - bits;
        // A /0 compares nothing; checked_shr keeps `>> 128` from overflowing.
        a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0)
    }
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            prefix_equal(u32::from(n).into(), u32::from(i).into(), bits.into(), 32)
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            prefix_equal(u128::from(n), u128::from(i), bits.into(), 128)
        }
        _ => false,
    }
}

/// `HTTPS_PROXY` as curl and friends read it: `http://[user:password@]host:port`, the scheme
/// optional. The credentials move into the returned secret (percent-decoded) and out of the
/// URL; messages show the value with them masked.
fn parse_env_proxy(name: &str, value: &str) -> Result<(url::Url, Option<ResolvedSecret>), String> {
    let shown = mask_userinfo(value);
    let fix = format!(
        "set {name} to http://host:port, or set server.egress_proxy in the configuration file"
    );
    let with_scheme = if value.contains("://") {
        value.to_owned()
    } else {
        format!("http://{value}")
    };
    let mut url = url::Url::parse(&with_scheme)
        .map_err(|e| format!("`{shown}` is not a proxy URL ({e}); {fix}"))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(format!(
                "`{shown}` is an https:// proxy, which tokengate does not support: it talks to \
                 the proxy in plain HTTP and tunnels TLS through it with CONNECT; {fix}"
            ))
        }
        other => return Err(format!("proxy scheme `{other}` is not supported; {fix}")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{shown}` has no host; {fix}"));
    }
    if url.port().is_none() && !has_explicit_port(&with_scheme) {
        return Err(format!(
            "`{shown}` has no port (tools disagree on the default: curl assumes 1080, others \
             80); {fix}"
        ));
    }
    let auth = if url.username().is_empty() && url.password().is_none() {
        None
    } else {
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
        };
        let user = decode(url.username())
            .map_err(|_| format!("the user name in {name} is not valid UTF-8 once decoded"))?;
        let password = decode(url.password().unwrap_or_default())
            .map_err(|_| format!("the password in {name} is not valid UTF-8 once decoded"))?;
        Some(ResolvedSecret {
            // Describes where the credentials came from in `check`; never re-resolved (that
            // would yield the whole URL, not `user:password`).
            source: SecretSource::Env(name.to_owned()),
            value: Secret::new(format!("{user}:{password}")),
        })
    };
    // Infallible for an http URL with a host; the credentials must not stay in the URL.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_path("/");
    url.set_query(None);
    url.set_fragment(None);
    Ok((url, auth))
}

/// `http://user:secret@proxy:3128` → `http://***@proxy:3128`, for messages.
fn mask_userinfo(value: &str) -> String {
    let (scheme, rest) = match value.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        None => (String::new(), value),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}***{}", &rest[at..]),
        None => value.to_owned(),
    }
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

// ---------------------------------------------------------------------------------------------
// Raw TOML shape. Every field is optional so that "missing" is reported by validation with the
// key path and a fix, rather than by serde's "missing field" without one. Leaves are `Spanned`
// so validation errors can point at a line and column.

type Opt<T> = Option<Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    server: Option<RawServer>,
    defaults: Option<RawSettings>,
    integration: Option<Vec<Spanned<RawSettings>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawServer {
    admin_listen: Opt<String>,
    log_format: Opt<String>,
    shutdown_grace: Opt<String>,
    allow_remote_clients: Opt<bool>,
    header_read_timeout: Opt<String>,
    egress_proxy: Opt<String>,
    egress_proxy_auth: Opt<RawSecret>,
}

/// One `[[integration]]` table, and also `[defaults]` (which must not set `name`/`listen`;
/// sharing the struct gives a precise "set per integration" error instead of "unknown key").
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    name: Opt<String>,
    listen: Opt<String>,
    region: Opt<String>,
    token_url: Opt<String>,
    upstream: Opt<String>,
    client_id: Opt<RawSecret>,
    client_secret: Opt<RawSecret>,
    ttl: Opt<String>,
    scope: Opt<String>,
    token_auth: Opt<String>,
    token_encoding: Opt<String>,
    extra_params: Opt<BTreeMap<String, String>>,
    refresh_at: Opt<f64>,
    assume_lifetime: Opt<String>,
    token_timeout: Opt<String>,
    allow_methods: Opt<Vec<Spanned<String>>>,
    max_replay_body: Opt<RawSize>,
    connect_timeout: Opt<String>,
    request_timeout: Opt<String>,
    ca_file: Opt<String>,
}

/// A secret as written. Deserialized by hand: an untagged enum would fail with serde's
/// "data did not match any variant", which tells the user nothing.
enum RawSecret {
    Literal(String),
    Env(String),
    File(String),
}

const SECRET_FORMS: &str = "a string, { env = \"NAME\" } or { file = \"PATH\" }";

impl<'de> Deserialize<'de> for RawSecret {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SecretVisitor;
        impl<'de> Visitor<'de> for SecretVisitor {
            type Value = RawSecret;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SECRET_FORMS)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSecret, E> {
                Ok(RawSecret::Literal(v.to_owned()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawSecret, A::Error> {
                let mut found: Option<RawSecret> = None;
                while let Some(key) = map.next_key::<String>()? {
                    let secret = match key.as_str() {
                        "env" => RawSecret::Env(map.next_value()?),
                        "file" => RawSecret::File(map.next_value()?),
                        other => {
                            return Err(de::Error::custom(format!(
                                "unknown key `{other}` in a secret table; write \
                                 {{ env = \"NAME\" }} or {{ file = \"PATH\" }}"
                            )))
                        }
                    };
                    if found.is_some() {
                        return Err(de::Error::custom(
                            "a secret table takes exactly one of `env` or `file`; keep one",
                        ));
                    }
                    found = Some(secret);
                }
                found.ok_or_else(|| {
                    de::Error::custom(
                        "a secret table needs `env` or `file`; write { env = \"NAME\" } or \
                         { file = \"PATH\" }",
                    )
                })
            }
        }
        deserializer.deserialize_any(SecretVisitor)
    }
}

/// `max_replay_body` as written: bytes as an integer, or a string with a unit.
enum RawSize {
    Bytes(i64),
    Text(String),
}

const SIZE_FORMS: &str = "a whole number of bytes (1048576) or a string with a B, KiB, MiB or \
                          GiB unit (\"512KiB\", \"1MiB\", \"1 GiB\")";

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(SIZE_FORMS)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Parses `"1MiB"`, `"512 KiB"`, `"100B"`, `"4096"`. Binary units only: `KB`/`MB` mean 1000
/// to some people and 1024 to others, and a replay limit should not be a guess.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let multiplier: u64 = match unit.trim_start() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" | "MB" | "GB" | "K" | "M" | "G" | "kb" | "mb" | "gb" => {
            return Err(format!(
                "`{text}`: decimal units are not accepted (KB could mean 1000 or 1024); write \
                 {SIZE_FORMS}"
            ))
        }
        _ => return Err(format!("`{text}` is not a size; write {SIZE_FORMS}")),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size; write {SIZE_FORMS}"))?;
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("`{text}` is too large; write {SIZE_FORMS}"))
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// A value picked for one integration, remembering where it was written: its own table or
/// `[defaults]`. Messages point at the place to edit.
struct Field<'r, T> {
    value: &'r T,
    span: Range<usize>,
    /// For errors: `integration[1].ttl` or `defaults.ttl (inherited by integration[1])`.
    key: String,
    /// For warnings, which should appear once per place written: `defaults.ttl`.
    written: String,
}

fn own<'r, T>(key: String, value: &'r Opt<T>) -> Option<Field<'r, T>> {
    value.as_ref().map(|v| Field {
        value: v.get_ref(),
        span: v.span(),
        written: key.clone(),
        key,
    })
}

/// The integration's own value, else the one from `[defaults]`.
fn pick<'r, T>(
    index: usize,
    name: &str,
    mine: &'r Opt<T>,
    defaults: &'r Opt<T>,
) -> Option<Field<'r, T>> {
    if let Some(field) = own(format!("integration[{index}].{name}"), mine) {
        return Some(field);
    }
    defaults.as_ref().map(|v| Field {
        value: v.get_ref(),
        span: v.span(),
        key: format!("defaults.{name} (inherited by integration[{index}])"),
        written: format!("defaults.{name}"),
    })
}

/// One integration's view of the raw tables: its own, then `[defaults]`.
struct Scope<'r> {
    index: usize,
    mine: &'r RawSettings,
    defaults: &'r RawSettings,
    /// The `[[integration]]` header, where "missing" errors point.
    header: Range<usize>,
    here: String,
}

impl<'r> Scope<'r> {
    fn pick<T>(
        &self,
        name: &str,
        get: impl Fn(&'r RawSettings) -> &'r Opt<T>,
    ) -> Option<Field<'r, T>> {
        pick(self.index, name, get(self.mine), get(self.defaults))
    }
}

/// `pick!(scope, ttl)`: the integration's `ttl`, else `[defaults]`' one, named for messages.
macro_rules! pick {
    ($scope:expr, $field:ident) => {
        $scope.pick(stringify!($field), |raw| &raw.$field)
    };
}

/// The smallest duration a timeout may have: zero would fail every request at once.
const POSITIVE: Duration = Duration::from_nanos(1);

struct Loader<'a> {
    path: &'a Path,
    text: &'a str,
    /// Relative `file` and `ca_file` paths are relative to the config file, not to the
    /// working directory, so the same config works wherever tokengate is started.
    base_dir: PathBuf,
    warnings: Vec<String>,
    env: &'a ProxyEnv,
}

impl<'a> Loader<'a> {
    fn new(text: &'a str, path: &'a Path, env: &'a ProxyEnv) -> Self {
        let parent = path.parent().unwrap_or(Path::new(""));
        let base_dir = if parent.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            parent.to_path_buf()
        };
        let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
        Loader {
            path,
            text,
            base_dir,
            warnings: Vec::new(),
            env,
        }
    }

    fn location(&self, span: Option<&Range<usize>>) -> String {
        match span {
            Some(span) => {
                let (line, column) = line_col(self.text, span.start);
                format!("{}:{line}:{column}", self.path.display())
            }
            None => self.path.display().to_string(),
        }
    }

    fn error(
        &self,
        span: Option<&Range<usize>>,
        key: &str,
        what: impl fmt::Display,
    ) -> ConfigError {
        let location = self.location(span);
        if key.is_empty() {
            ConfigError::new(format!("{location}: {what}"))
        } else {
            ConfigError::new(format!("{location}: {key}: {what}"))
        }
    }

    fn warn(&mut self, warning: String) {
        if !self.warnings.contains(&warning) {
            self.warnings.push(warning);
        }
    }

    fn syntax_error(&self, e: &toml::de::Error) -> ConfigError {
        let span = e.span();
        let spanned_text = span
            .as_ref()
            .and_then(|span| self.text.get(span.clone()))
            .filter(|t| !t.is_empty() && t.len() <= 100 && !t.contains('\n'));
        let line = span
            .as_ref()
            .and_then(|span| {
                let start = self
                    .text
                    .get(..span.start)?
                    .rfind('\n')
                    .map_or(0, |i| i + 1);
                self.text.get(start..)?.lines().next()
            })
            .unwrap_or_default();
        let what = match e.message() {
            "duplicate key" => match spanned_text {
                Some(table) if line.trim_start().starts_with('[') => {
                    format!("table `{table}` is already defined above; merge the two into one")
                }
                Some(key) => format!("`{key}` is already defined in this table; keep one"),
                None => "this key is already defined in this table; keep one".to_owned(),
            },
            message => {
                let mut what = format!("invalid TOML: {message}");
                if let Some(example) = quoted_example(line) {
                    what.push_str(&format!("; strings need quotes: {example}"));
                }
                what
            }
        };
        self.error(span.as_ref(), "", what)
    }

    fn serde_error(&self, e: &toml::de::Error, root: &DeTable<'_>) -> ConfigError {
        let span = e.span();
        let path = span
            .as_ref()
            .map(|span| locate(root, span.start))
            .unwrap_or_default();
        let key = render_path(&path);
        let mut message = plain_type_names(e.message());
        if let (_, Some(key)) = section_and_key(&path) {
            if SECRET_KEYS.contains(&key) {
                message = without_unexpected_value(&message);
            }
        }
        let what = match message.strip_prefix("unknown field ") {
            Some(rest) => unknown_key(rest, &path),
            None => match type_hint(&path) {
                Some(hint) => format!("{message}; {hint}"),
                None => message,
            },
        };
        self.error(span.as_ref(), &key, what)
    }

    fn build(mut self, raw: RawFile) -> Result<Config, ConfigError> {
        let server = self.server(raw.server.unwrap_or_default())?;
        let egress = self.egress_rule(&server)?;
        let defaults = raw.defaults.unwrap_or_default();
        for (name, value) in [("name", &defaults.name), ("listen", &defaults.listen)] {
            if let Some(value) = value {
                return Err(self.error(
                    Some(&value.span()),
                    &format!("defaults.{name}"),
                    format!(
                        "`{name}` is set per integration, not in [defaults]; move it into each \
                         [[integration]] table"
                    ),
                ));
            }
        }
        let raw_integrations = raw.integration.unwrap_or_default();
        if raw_integrations.is_empty() {
            return Err(self.error(
                None,
                "integration",
                "no integration is configured; add at least one [[integration]] table with \
                 name, listen, region (or token_url), client_id and client_secret (see \
                 config.example.toml)",
            ));
        }

        let mut integrations: Vec<Integration> = Vec::new();
        for (index, raw) in raw_integrations.iter().enumerate() {
            let integration = self.integration(index, raw, &defaults, &server, &egress)?;
            let name_span = raw.get_ref().name.as_ref().map(Spanned::span);
            let listen_span = raw.get_ref().listen.as_ref().map(Spanned::span);
            if let Some(other) = integrations.iter().position(|i| i.name == integration.name) {
                return Err(self.error(
                    name_span.as_ref(),
                    &format!("integration[{index}].name"),
                    format!(
                        "`{}` is already the name of integration[{other}]; names must be \
                         unique (they label metrics and logs); choose another",
                        integration.name
                    ),
                ));
            }
            if let Some(other) = integrations
                .iter()
                .position(|i| addresses_conflict(i.listen, integration.listen))
            {
                return Err(self.error(
                    listen_span.as_ref(),
                    &format!("integration[{index}].listen"),
                    format!(
                        "{} conflicts with integration[{other}].listen = \"{}\"; each \
                         integration needs its own port",
                        integration.listen, integrations[other].listen
                    ),
                ));
            }
            if addresses_conflict(server.admin_listen, integration.listen) {
                return Err(self.error(
                    listen_span.as_ref(),
                    &format!("integration[{index}].listen"),
                    format!(
                        "{} conflicts with server.admin_listen = \"{}\"; choose another port \
                         for one of them",
                        integration.listen, server.admin_listen
                    ),
                ));
            }
            integrations.push(integration);
        }

        Ok(Config {
            path: self.path.to_path_buf(),
            server,
            integrations,
            warnings: self.warnings,
        })
    }

    fn server(&mut self, raw: RawServer) -> Result<Server, ConfigError> {
        let key = |name: &str| format!("server.{name}");
        let admin_listen = match own(key("admin_listen"), &raw.admin_listen) {
            Some(field) => self.socket_addr(&field)?,
            None => DEFAULT_ADMIN_LISTEN
                .parse()
                .map_err(|e| self.error(None, "server.admin_listen", e))?,
        };
        let log_format = self.choice(
            own(key("log_format"), &raw.log_format),
            DEFAULT_LOG_FORMAT,
            &[("text", LogFormat::Text), ("json", LogFormat::Json)],
            "\"text\" or \"json\"",
        )?;
        let shutdown_grace = self.duration(
            own(key("shutdown_grace"), &raw.shutdown_grace),
            DEFAULT_SHUTDOWN_GRACE,
            Duration::ZERO,
        )?;
        let allow_remote_clients = raw
            .allow_remote_clients
            .as_ref()
            .is_some_and(|v| *v.get_ref());
        let header_read_timeout = self.duration(
            own(key("header_read_timeout"), &raw.header_read_timeout),
            DEFAULT_HEADER_READ_TIMEOUT,
            POSITIVE,
        )?;
        let egress_proxy = match own(key("egress_proxy"), &raw.egress_proxy) {
            Some(field) => Some(
                parse_egress_proxy(field.value)
                    .map_err(|what| self.error(Some(&field.span), &field.key, what))?,
            ),
            None => None,
        };
        let egress_proxy_auth = match own(key("egress_proxy_auth"), &raw.egress_proxy_auth) {
            None => None,
            Some(field) => {
                if egress_proxy.is_none() {
                    return Err(self.error(
                        Some(&field.span),
                        &field.key,
                        "is set but server.egress_proxy is not; add egress_proxy = \
                         \"http://proxy.example:3128\" or remove egress_proxy_auth",
                    ));
                }
                let secret = self.secret(&field, true)?;
                if !secret.value.expose().contains(':') {
                    return Err(self.error(
                        Some(&field.span),
                        &field.key,
                        format!(
                            "the {} value has no `:`; it must be user:password",
                            match &secret.source {
                                SecretSource::Literal(_) => "written".to_owned(),
                                source => source.describe(),
                            }
                        ),
                    ));
                }
                Some(secret)
            }
        };
        Ok(Server {
            admin_listen,
            log_format,
            shutdown_grace,
            allow_remote_clients,
            header_read_timeout,
            egress_proxy,
            egress_proxy_auth,
        })
    }

    fn integration(
        &mut self,
        index: usize,
        raw: &Spanned<RawSettings>,
        defaults: &RawSettings,
        server: &Server,
        egress: &EgressRule,
    ) -> Result<Integration, ConfigError> {
        let scope = Scope {
            index,
            mine: raw.get_ref(),
            defaults,
            header: raw.span(),
            here: format!("integration[{index}]"),
        };
        let name = self.name(&scope)?;
        let listen = self.listen(&scope, &name, server)?;
        let ca_file = match pick!(scope, ca_file) {
            None => None,
            Some(field) => Some(self.ca_file(&field)?),
        };
        let token = self.token_settings(&scope, &name, ca_file.clone(), egress)?;
        let proxy = self.proxy_settings(&scope, ca_file, egress)?;
        Ok(Integration {
            name,
            listen,
            token,
            proxy,
        })
    }

    fn name(&self, scope: &Scope<'_>) -> Result<String, ConfigError> {
        let Some(name) = own(format!("{}.name", scope.here), &scope.mine.name) else {
            return Err(self.error(
                Some(&scope.header),
                &scope.here,
                "has no name; add name = \"oms\" (a-z, 0-9, _ and -, up to 32 characters)",
            ));
        };
        let valid_name = !name.value.is_empty()
            && name.value.len() <= 32
            && name
                .value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !valid_name {
            let suggestion: String = name
                .value
                .to_ascii_lowercase()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .take(32)
                .collect();
            let example = if suggestion.is_empty() {
                "oms"
            } else {
                &suggestion
            };
            return Err(self.error(
                Some(&name.span),
                &name.key,
                format!(
                    "`{}` is not a valid name: use 1 to 32 of a-z, 0-9, _ and - (it becomes a \
                     metric label); write e.g. name = \"{example}\"",
                    name.value
                ),
            ));
        }
        Ok(name.value.clone())
    }

    fn listen(
        &mut self,
        scope: &Scope<'_>,
        name: &str,
        server: &Server,
    ) -> Result<SocketAddr, ConfigError> {
        let Some(listen_field) = own(format!("{}.listen", scope.here), &scope.mine.listen) else {
            return Err(self.error(
                Some(&scope.header),
                &scope.here,
                format!(
                    "integration `{name}` has no listen address; add listen = \"127.0.0.1:8081\" \
                     (the address the legacy system calls instead of the API)"
                ),
            ));
        };
        let listen = self.socket_addr(&listen_field)?;
        if !is_loopback(listen.ip()) {
            if !server.allow_remote_clients {
                return Err(self.error(
                    Some(&listen_field.span),
                    &listen_field.key,
                    format!(
                        "{listen} is not a loopback address, and anyone who can reach this port \
                         acts with integration `{name}`'s OAuth credentials; write listen = \
                         \"127.0.0.1:{}\", or, if other hosts must call it, set \
                         allow_remote_clients = true in [server] and restrict who can reach the \
                         port (firewall, NetworkPolicy)",
                        listen.port()
                    ),
                ));
            }
            self.warn(format!(
                "{} = {listen} accepts calls from other hosts (server.allow_remote_clients = \
                 true); anyone who can reach it acts with integration `{name}`'s credentials, so \
                 restrict access with a firewall or NetworkPolicy",
                listen_field.key
            ));
        }
        Ok(listen)
    }

    fn token_settings(
        &mut self,
        scope: &Scope<'_>,
        name: &str,
        ca_file: Option<PathBuf>,
        egress: &EgressRule,
    ) -> Result<TokenSettings, ConfigError> {
        let region = match pick!(scope, region) {
            None => None,
            Some(field) => match REGIONS.iter().find(|(region, _)| *region == field.value) {
                Some((_, url)) => Some((*url, field)),
                None => {
                    let valid: Vec<String> =
                        REGIONS.iter().map(|(r, _)| format!("\"{r}\"")).collect();
                    return Err(self.error(
                        Some(&field.span),
                        &field.key,
                        format!(
                            "`{}` is not a known region; write one of {}, or set token_url \
                             instead",
                            field.value,
                            valid.join(", ")
                        ),
                    ));
                }
            },
        };
        let token_url = match (pick!(scope, token_url), region) {
            (Some(field), _) => self.endpoint(&field)?,
            (None, Some((url, field))) => Endpoint::parse(url)
                .map_err(|what| self.error(Some(&field.span), &field.key, what))?,
            (None, None) => {
                return Err(self.error(
                    Some(&scope.header),
                    &scope.here,
                    format!(
                        "integration `{name}` has neither region nor token_url; add region = \
                         \"us2\" (one of us2, us3, eu2, eu3) or token_url = \
                         \"https://<host>/oauth/token\", here or in [defaults]"
                    ),
                ))
            }
        };
        let client_id = match pick!(scope, client_id) {
            // A Client ID identifies the app but grants nothing on its own, so a literal is
            // not worth a warning.
            Some(field) => self.secret(&field, false)?,
            None => return Err(self.missing_secret(scope, "client_id")),
        };
        let client_secret = match pick!(scope, client_secret) {
            Some(field) => self.secret(&field, true)?,
            None => return Err(self.missing_secret(scope, "client_secret")),
        };

        let ttl = match pick!(scope, ttl) {
            None => None,
            Some(field) => {
                let ttl = self.parse_duration(&field)?;
                if ttl < Duration::from_secs(1) || ttl.subsec_nanos() != 0 {
                    return Err(self.error(
                        Some(&field.span),
                        &field.key,
                        format!(
                            "`{}` cannot be sent: ttl goes on the wire in whole seconds and must \
                             be at least 1s; write e.g. ttl = \"30m\"",
                            field.value
                        ),
                    ));
                }
                Some(ttl)
            }
        };
        let token_scope = match pick!(scope, scope) {
            None => None,
            Some(field) if field.value.trim().is_empty() => {
                return Err(self.error(
                    Some(&field.span),
                    &field.key,
                    "is empty; write the scope to request, or remove the key to send none",
                ))
            }
            Some(field) => Some(field.value.clone()),
        };
        let auth = self.choice(
            pick!(scope, token_auth),
            TokenAuth::Body,
            &[("body", TokenAuth::Body), ("basic", TokenAuth::Basic)],
            "\"body\" (client_secret_post) or \"basic\" (client_secret_basic)",
        )?;
        let encoding = self.choice(
            pick!(scope, token_encoding),
            TokenEncoding::Form,
            &[
                ("form", TokenEncoding::Form),
                ("json", TokenEncoding::Json),
                ("multipart", TokenEncoding::Multipart),
            ],
            "\"form\", \"json\" or \"multipart\"",
        )?;
        let extra_params = match pick!(scope, extra_params) {
            None => Vec::new(),
            Some(field) => {
                for name in field.value.keys() {
                    if name.is_empty() {
                        return Err(self.error(
                            Some(&field.span),
                            &field.key,
                            "a parameter has an empty name; remove it",
                        ));
                    }
                    if RESERVED_PARAMS.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                        return Err(self.error(
                            Some(&field.span),
                            &format!("{}.{name}", field.key),
                            format!(
                                "`{name}` is set by tokengate itself and cannot be overridden; \
                                 use the {} key instead, or remove it",
                                reserved_replacement(name)
                            ),
                        ));
                    }
                }
                field
                    .value
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            }
        };
        let refresh_at = match pick!(scope, refresh_at) {
            None => DEFAULT_REFRESH_AT,
            Some(field) => {
                let value = *field.value;
                // Written so that NaN fails too.
                if !(value > 0.0 && value < 1.0) {
                    return Err(self.error(
                        Some(&field.span),
                        &field.key,
                        format!(
                            "{value} is out of range: it is the fraction of the token lifetime \
                             after which to refresh, so it must be above 0 and below 1; 0.5 to \
                             0.9 is sensible, e.g. refresh_at = 0.8"
                        ),
                    ));
                }
                value
            }
        };
        let one_second = Duration::from_secs(1);
        let assume_lifetime = self.duration(
            pick!(scope, assume_lifetime),
            DEFAULT_ASSUME_LIFETIME,
            one_second,
        )?;
        let token_timeout =
            self.duration(pick!(scope, token_timeout), DEFAULT_TOKEN_TIMEOUT, POSITIVE)?;
        Ok(TokenSettings {
            egress: egress.route(&token_url),
            token_url,
            client_id,
            client_secret,
            ttl,
            scope: token_scope,
            auth,
            encoding,
            extra_params,
            refresh_at,
            assume_lifetime,
            timeout: token_timeout,
            ca_file,
        })
    }

    fn proxy_settings(
        &mut self,
        scope: &Scope<'_>,
        ca_file: Option<PathBuf>,
        egress: &EgressRule,
    ) -> Result<ProxySettings, ConfigError> {
        let upstream = match pick!(scope, upstream) {
            Some(field) => self.endpoint(&field)?,
            None => Endpoint::parse(DEFAULT_UPSTREAM)
                .map_err(|what| self.error(None, &format!("{}.upstream", scope.here), what))?,
        };

        let allow_methods = match pick!(scope, allow_methods) {
            None => None,
            Some(field) => Some(self.methods(&field)?),
        };
        let max_replay_body = match pick!(scope, max_replay_body) {
            None => DEFAULT_MAX_REPLAY_BODY,
            Some(field) => match field.value {
                RawSize::Bytes(n) => u64::try_from(*n).map_err(|_| {
                    self.error(
                        Some(&field.span),
                        &field.key,
                        format!("{n} is negative; write {SIZE_FORMS}"),
                    )
                })?,
                RawSize::Text(text) => parse_size(text)
                    .map_err(|what| self.error(Some(&field.span), &field.key, what))?,
            },
        };
        let connect_timeout = self.duration(
            pick!(scope, connect_timeout),
            DEFAULT_CONNECT_TIMEOUT,
            POSITIVE,
        )?;
        let request_timeout = self.duration(
            pick!(scope, request_timeout),
            DEFAULT_REQUEST_TIMEOUT,
            POSITIVE,
        )?;
        Ok(ProxySettings {
            egress: egress.route(&upstream),
            upstream,
            allow_methods,
            max_replay_body,
            connect_timeout,
            request_timeout,
            ca_file,
        })
    }

    /// `server.egress_proxy` when set (the environment's proxy variables are then ignored,
    /// with a warning if any is set), else `HTTPS_PROXY`/`NO_PROXY`.
    fn egress_rule(&mut self, server: &Server) -> Result<EgressRule, ConfigError> {
        let env = self.env;
        if server.egress_proxy.is_some() {
            let ignored: Vec<&str> = [&env.https_proxy, &env.no_proxy]
                .into_iter()
                .flatten()
                .map(|(name, _)| name.as_str())
                .collect();
            if !ignored.is_empty() {
                self.warn(format!(
                    "server.egress_proxy is set, so {} from the environment {} ignored: every \
                     destination but plain-http loopback goes through egress_proxy",
                    ignored.join(" and "),
                    if ignored.len() == 1 { "is" } else { "are" }
                ));
            }
        }
        EgressRule::new(
            server.egress_proxy.as_ref(),
            server.egress_proxy_auth.as_ref(),
            env,
        )
        .map_err(|what| {
            let name = env
                .https_proxy
                .as_ref()
                .map_or("HTTPS_PROXY", |(name, _)| name.as_str());
            self.error(None, &format!("environment {name}"), what)
        })
    }

    fn missing_secret(&self, scope: &Scope<'_>, name: &str) -> ConfigError {
        self.error(
            Some(&scope.header),
            &format!("{}.{name}", scope.here),
            format!(
                "missing; add {name} = {{ file = \"PATH\" }} or {{ env = \"NAME\" }} (or a \
                 string), here or in [defaults]"
            ),
        )
    }

    /// A string that must be one of a few words (`token_auth = "basic"`).
    fn choice<T: Copy>(
        &self,
        field: Option<Field<'_, String>>,
        default: T,
        options: &[(&str, T)],
        accepted: &str,
    ) -> Result<T, ConfigError> {
        let Some(field) = field else {
            return Ok(default);
        };
        match options.iter().find(|(word, _)| word == field.value) {
            Some((_, value)) => Ok(*value),
            None => Err(self.error(
                Some(&field.span),
                &field.key,
                format!("`{}` is not accepted here; write {accepted}", field.value),
            )),
        }
    }

    fn socket_addr(&self, field: &Field<'_, String>) -> Result<SocketAddr, ConfigError> {
        field.value.trim().parse().map_err(|_| {
            self.error(
                Some(&field.span),
                &field.key,
                format!(
                    "`{}` is not an IP address with a port; write e.g. \"127.0.0.1:8081\" or \
                     \"[::1]:8081\" (host names are not accepted)",
                    field.value
                ),
            )
        })
    }

    fn parse_duration(&self, field: &Field<'_, String>) -> Result<Duration, ConfigError> {
        humantime::parse_duration(field.value.trim()).map_err(|e| {
            self.error(
                Some(&field.span),
                &field.key,
                format!(
                    "`{}` is not a duration ({e}); write e.g. \"500ms\", \"30s\" or \"5m\"",
                    field.value
                ),
            )
        })
    }

    fn duration(
        &self,
        field: Option<Field<'_, String>>,
        default: Duration,
        minimum: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(field) = field else {
            return Ok(default);
        };
        let value = self.parse_duration(&field)?;
        if value < minimum {
            let least = if minimum <= Duration::from_nanos(1) {
                "greater than zero".to_owned()
            } else {
                format!("at least {}", humantime::format_duration(minimum))
            };
            return Err(self.error(
                Some(&field.span),
                &field.key,
                format!(
                    "`{}` is too short: it must be {least}; write e.g. \"{}\"",
                    field.value,
                    humantime::format_duration(default)
                ),
            ));
        }
        Ok(value)
    }

    fn endpoint(&mut self, field: &Field<'_, String>) -> Result<Endpoint, ConfigError> {
        let endpoint = Endpoint::parse(field.value.trim())
            .map_err(|what| self.error(Some(&field.span), &field.key, what))?;
        if !endpoint.tls {
            self.warn(format!(
                "{} uses plain http ({}); acceptable for local testing only, since secrets and \
                 tokens travel unencrypted",
                field.written, endpoint.url
            ));
        }
        Ok(endpoint)
    }

    fn secret(
        &mut self,
        field: &Field<'_, RawSecret>,
        warn_literal: bool,
    ) -> Result<ResolvedSecret, ConfigError> {
        let source = match field.value {
            RawSecret::Literal(value) => {
                if warn_literal {
                    self.warn(format!(
                        "{} is written in the config file; prefer {{ file = ... }} or \
                         {{ env = ... }}",
                        field.written
                    ));
                }
                SecretSource::Literal(Secret::new(value.clone()))
            }
            RawSecret::Env(name) => {
                if name.is_empty() || name.contains('=') || name.contains('\0') {
                    return Err(self.error(
                        Some(&field.span),
                        &field.key,
                        format!(
                            "`{name}` is not an environment variable name; write e.g. \
                             {{ env = \"TOKENGATE_OMS_CLIENT_SECRET\" }}"
                        ),
                    ));
                }
                SecretSource::Env(name.clone())
            }
            RawSecret::File(path) => {
                if path.is_empty() {
                    return Err(self.error(
                        Some(&field.span),
                        &field.key,
                        "the file path is empty; write e.g. { file = \"/run/secrets/oms\" }",
                    ));
                }
                SecretSource::File(self.base_dir.join(path))
            }
        };
        let value = source.resolve(&field.key).map_err(|e| {
            ConfigError::new(format!(
                "{}: {}",
                self.location(Some(&field.span)),
                e.message
            ))
        })?;
        Ok(ResolvedSecret { source, value })
    }

    fn methods(
        &mut self,
        field: &Field<'_, Vec<Spanned<String>>>,
    ) -> Result<Vec<http::Method>, ConfigError> {
        if field.value.is_empty() {
            return Err(self.error(
                Some(&field.span),
                &field.key,
                "an empty list would refuse every request; list the methods to allow, e.g. \
                 [\"GET\", \"POST\"], or remove the key to allow every method",
            ));
        }
        let mut methods: Vec<http::Method> = Vec::new();
        for (i, item) in field.value.iter().enumerate() {
            let text = item.get_ref();
            let key = format!("{}[{i}]", field.key);
            if text == "CONNECT" {
                return Err(self.error(
                    Some(&item.span()),
                    &key,
                    "CONNECT cannot be allowed: tokengate needs plain HTTP from the client to add \
                     the token, and always answers CONNECT with 405; remove it",
                ));
            }
            let method = http::Method::from_bytes(text.as_bytes()).map_err(|_| {
                self.error(
                    Some(&item.span()),
                    &key,
                    format!(
                        "`{text}` is not an HTTP method name (RFC 9110 §9.1: a token of letters, \
                         digits and !#$%&'*+-.^_`|~); write e.g. \"GET\""
                    ),
                )
            })?;
            let upper = text.to_ascii_uppercase();
            if upper != *text && is_standard_method(&upper) {
                // Methods are case-sensitive (RFC 9110 §9.1), so `get` is allowed as
                // written, but almost certainly meant GET.
                self.warn(format!(
                    "{key} = \"{text}\" allows only the method spelled `{text}`; methods are \
                     case-sensitive, so clients sending {upper} get 405; write \"{upper}\""
                ));
            }
            if !methods.contains(&method) {
                methods.push(method);
            }
        }
        Ok(methods)
    }

    fn ca_file(&self, field: &Field<'_, String>) -> Result<PathBuf, ConfigError> {
        let path = self.base_dir.join(field.value);
        let pem = std::fs::read(&path).map_err(|e| {
            self.error(
                Some(&field.span),
                &field.key,
                format!(
                    "cannot read {}: {e} (tokengate runs as {}); correct the path or make the \
                     file readable",
                    path.display(),
                    process_user()
                ),
            )
        })?;
        let marker = b"-----BEGIN CERTIFICATE-----";
        if !pem.windows(marker.len()).any(|w| w == marker) {
            return Err(self.error(
                Some(&field.span),
                &field.key,
                format!(
                    "{} contains no PEM certificate; it must hold one or more \
                     -----BEGIN CERTIFICATE----- blocks (the CA roots to trust in addition to \
                     the built-in ones)",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }
}

/// For `log_format = text`, the most common TOML mistake: `log_format = "text"`.
fn quoted_example(line: &str) -> Option<String> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    let value = value.split('#').next().unwrap_or_default().trim();
    let bare_word = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b))
    };
    let is_literal = value.parse::<f64>().is_ok() || value == "true" || value == "false";
    if !bare_word(key) || !bare_word(value) || is_literal {
        return None;
    }
    let shown = if SECRET_KEYS.contains(&key) {
        "..."
    } else {
        value
    };
    Some(format!("{key} = \"{shown}\""))
}

fn is_standard_method(upper: &str) -> bool {
    matches!(
        upper,
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH"
    )
}

fn reserved_replacement(name: &str) -> &'static str {
    match name.to_ascii_lowercase().as_str() {
        "client_id" => "client_id",
        "client_secret" => "client_secret",
        "scope" => "scope",
        "ttl" => "ttl",
        _ => "token_auth/token_encoding",
    }
}

/// 127.0.0.0/8 and ::1, including the IPv4-mapped form `::ffff:127.0.0.1`.
fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Two listeners that could not both bind. Port 0 asks the OS for a free port, so it
/// never conflicts; an unspecified address (`0.0.0.0`, `::`) takes the port on every address.
fn addresses_conflict(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// `egress_proxy` is spoken to in plain HTTP: tokengate sends `CONNECT host:443` and runs
/// TLS to the real server inside the tunnel, so the token is never readable by the proxy.
fn parse_egress_proxy(text: &str) -> Result<url::Url, String> {
    let example = "write e.g. egress_proxy = \"http://proxy.example:3128\"";
    let url = url::Url::parse(text.trim())
        .map_err(|e| format!("`{text}` is not a URL ({e}); {example}"))?;
    match url.scheme() {
        "http" => {}
        "https" => {
            return Err(format!(
                "an https:// proxy is not supported: tokengate talks to the proxy in plain HTTP \
                 and tunnels TLS through it with CONNECT, so the traffic is encrypted anyway; \
                 {example}"
            ))
        }
        other => return Err(format!("scheme `{other}` is not supported; {example}")),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "credentials in the proxy URL would be printed with it; remove `user:password@` and \
             set egress_proxy_auth = { file = \"PATH\" } (or { env = \"NAME\" }) instead"
                .to_owned(),
        );
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("`{text}` has no host; {example}"));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "a proxy URL has no path, query or fragment; {example}"
        ));
    }
    // `url` drops `:80` for http, so look at the text to tell "http://p:80" from "http://p".
    if url.port().is_none() && !has_explicit_port(text.trim()) {
        return Err(format!(
            "`{text}` has no port (proxies listen on many different ones); {example}"
        ));
    }
    Ok(url)
}

fn has_explicit_port(text: &str) -> bool {
    let rest = text.split_once("://").map_or(text, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, hp)| hp);
    let after_host = match host_port.rfind(']') {
        Some(end) => &host_port[end + 1..],
        None => host_port,
    };
    after_host
        .rsplit_once(':')
        .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
}

// ---------------------------------------------------------------------------------------------
// Error positions and suggestions.

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let bytes = text.as_bytes();
    let offset = offset.min(bytes.len());
    let before = &bytes[..offset];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    let column = String::from_utf8_lossy(&bytes[line_start..offset])
        .chars()
        .count()
        + 1;
    (line, column)
}

#[derive(Clone, Debug, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// The key path of the innermost key or value whose span holds `offset`. Container spans
/// are not trusted (an `[[integration]]` element's span covers only its header), so every
/// key and value is visited and the narrowest match wins.
fn locate(root: &DeTable<'_>, offset: usize) -> Vec<Segment> {
    let mut best: Option<(usize, Vec<Segment>)> = None;
    let mut path = Vec::new();
    locate_in_table(root, offset, &mut path, &mut best);
    best.map(|(_, path)| path).unwrap_or_default()
}

fn consider(
    span: Range<usize>,
    offset: usize,
    path: &[Segment],
    best: &mut Option<(usize, Vec<Segment>)>,
) {
    let hit = span.start == offset || (span.start <= offset && offset < span.end);
    if !hit {
        return;
    }
    let width = span.end.saturating_sub(span.start);
    let better = match best {
        None => true,
        Some((best_width, best_path)) => {
            width < *best_width || (width == *best_width && path.len() > best_path.len())
        }
    };
    if better {
        *best = Some((width, path.to_vec()));
    }
}

fn locate_in_table(
    table: &DeTable<'_>,
    offset: usize,
    path: &mut Vec<Segment>,
    best: &mut Option<(usize, Vec<Segment>)>,
) {
    for (key, value) in table.iter() {
        path.push(Segment::Key(key.get_ref().to_string()));
        consider(key.span(), offset, path, best);
        locate_in_value(value, offset, path, best);
        path.pop();
    }
}

fn locate_in_value(
    value: &Spanned<DeValue<'_>>,
    offset: usize,
    path: &mut Vec<Segment>,
    best: &mut Option<(usize, Vec<Segment>)>,
) {
    consider(value.span(), offset, path, best);
    match value.get_ref() {
        DeValue::Table(table) => locate_in_table(table, offset, path, best),
        DeValue::Array(array) => {
            for (i, item) in array.iter().enumerate() {
                path.push(Segment::Index(i));
                locate_in_value(item, offset, path, best);
                path.pop();
            }
        }
        _ => {}
    }
}

fn render_path(path: &[Segment]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                if bare {
                    out.push_str(key);
                } else {
                    out.push_str(&format!("{key:?}"));
                }
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// Which table a path is in, and the key within it: `("integration", "ttl")`.
fn section_and_key(path: &[Segment]) -> (Option<&str>, Option<&str>) {
    let key_at = |i: usize| match path.get(i) {
        Some(Segment::Key(k)) => Some(k.as_str()),
        _ => None,
    };
    match key_at(0) {
        Some("integration") => match path.get(1) {
            Some(Segment::Index(_)) => (Some("integration"), key_at(2)),
            _ => (None, Some("integration")),
        },
        Some(section @ ("server" | "defaults")) if path.len() > 1 => (Some(section), key_at(1)),
        top => (None, top),
    }
}

fn section_label(section: Option<&str>) -> &'static str {
    match section {
        Some("server") => "[server]",
        Some("defaults") => "[defaults]",
        Some("integration") => "[[integration]]",
        _ => "the top level",
    }
}

/// Keys whose values are secrets: an error must not quote what was written there, even
/// when it was written wrongly (`client_secret = 12345678` is still the secret).
const SECRET_KEYS: &[&str] = &["client_id", "client_secret", "egress_proxy_auth"];

/// `invalid type: integer `12345678`, expected ...` → `invalid type: integer, expected ...`.
fn without_unexpected_value(message: &str) -> String {
    let is_value_error =
        message.starts_with("invalid type: ") || message.starts_with("invalid value: ");
    let Some(open) = message.find(" `").filter(|_| is_value_error) else {
        return message.to_owned();
    };
    match message[open + 2..].find('`') {
        Some(close) => format!("{}{}", &message[..open], &message[open + 2 + close + 1..]),
        None => message.to_owned(),
    }
}

/// serde names the Rust type it wanted (`struct RawServer`, `a sequence`); say it in TOML.
fn plain_type_names(message: &str) -> String {
    let mut out = message.replace("a sequence", "an array");
    for raw in ["RawFile", "RawServer", "RawSettings"] {
        out = out.replace(&format!("struct {raw}"), "a table");
    }
    out
}

/// Turns serde's "unknown field `x`, expected one of `a`, `b`" (the part after "unknown
/// field ") into a message with a suggestion.
fn unknown_key(rest: &str, path: &[Segment]) -> String {
    let mut quoted = rest.split('`').skip(1).step_by(2);
    let unknown = quoted.next().unwrap_or_default();
    let expected: Vec<&str> = quoted.collect();
    let (section, _) = section_and_key(path);
    let place = section_label(section);
    if let Some(best) = closest(unknown, &expected) {
        return format!("unknown key `{unknown}` in {place}; did you mean `{best}`?");
    }
    let elsewhere = match section {
        Some("server") if INTEGRATION_KEYS.contains(&unknown) => {
            Some("it belongs in [[integration]] or [defaults]".to_owned())
        }
        Some("integration" | "defaults") if SERVER_KEYS.contains(&unknown) => {
            Some("it belongs in [server]".to_owned())
        }
        None if SERVER_KEYS.contains(&unknown) => Some(
            "it belongs in [server]; keys above the first [table] header are top-level".to_owned(),
        ),
        None if INTEGRATION_KEYS.contains(&unknown) => Some(
            "it belongs inside an [[integration]] table or [defaults]; keys above the first \
             [table] header are top-level"
                .to_owned(),
        ),
        _ => None,
    };
    match elsewhere {
        Some(hint) => format!("unknown key `{unknown}` in {place}; {hint}"),
        None if expected.is_empty() => format!("unknown key `{unknown}` in {place}; remove it"),
        None => format!(
            "unknown key `{unknown}` in {place}; valid keys here: {}",
            expected.join(", ")
        ),
    }
}

/// The candidate nearest to `word`, if it is near enough to be a typo: up to 1 edit for
/// short words, 2 for medium, 3 for long ones (`client_secrte` is 1 edit from `client_secret`
/// counting a transposition as one).
fn closest<'c>(word: &str, candidates: &[&'c str]) -> Option<&'c str> {
    let normalized = word.to_ascii_lowercase().replace('-', "_");
    candidates
        .iter()
        .map(|c| (edit_distance(&normalized, c), *c))
        .filter(|(d, c)| {
            let limit = match c.len().min(word.len()) {
                0..=3 => 1,
                4..=7 => 2,
                _ => 3,
            };
            *d <= limit
        })
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and adjacent
/// transpositions each cost 1.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let width = b.len() + 1;
    let mut d = vec![0usize; (a.len() + 1) * width];
    for i in 0..=a.len() {
        d[i * width] = i;
    }
    for (j, cell) in d.iter_mut().enumerate().take(width) {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[(i - 1) * width + j] + 1)
                .min(d[i * width + j - 1] + 1)
                .min(d[(i - 1) * width + j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[(i - 2) * width + j - 2] + 1);
            }
            d[i * width + j] = best;
        }
    }
    d[a.len() * width + b.len()]
}

/// What to write instead, for a value of the wrong type at `path`.
fn type_hint(path: &[Segment]) -> Option<String> {
    let (section, key) = section_and_key(path);
    let key = key?;
    let nested = match section {
        Some("integration") => path.len() > 3,
        Some(_) => path.len() > 2,
        None => path.len() > 1,
    };
    let hint = match (section, key) {
        (None, "server") => "write it as a table: [server]".to_owned(),
        (None, "defaults") => "write it as a table: [defaults]".to_owned(),
        (None, "integration") => {
            "write one [[integration]] table (double brackets) per integration".to_owned()
        }
        (_, "extra_params") if nested => {
            "extra_params values are strings; quote the value".to_owned()
        }
        (_, "extra_params") => {
            "write a table of strings, e.g. extra_params = { audience = \"api\" }".to_owned()
        }
        (_, "allow_methods") => {
            "write a list of method names, e.g. allow_methods = [\"GET\", \"POST\"]".to_owned()
        }
        (
            _,
            "shutdown_grace"
            | "header_read_timeout"
            | "ttl"
            | "assume_lifetime"
            | "token_timeout"
            | "connect_timeout"
            | "request_timeout",
        ) => format!("write a duration string, e.g. {key} = \"30s\""),
        (_, "admin_listen" | "listen") => {
            format!("write an address string, e.g. {key} = \"127.0.0.1:8081\"")
        }
        (_, "allow_remote_clients") => format!("write {key} = true or {key} = false"),
        (_, "refresh_at") => format!("write a number between 0 and 1, e.g. {key} = 0.8"),
        // serde's message already ends in "expected <the forms>" from our own visitors.
        (_, "max_replay_body" | "client_id" | "client_secret" | "egress_proxy_auth") => {
            return None
        }
        (Some(_), other) => format!("write a string, e.g. {other} = \"...\""),
        (None, _) => return None,
    };
    Some(hint)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_transpositions_once() {
        assert_eq!(edit_distance("client_secrte", "client_secret"), 1);
        assert_eq!(edit_distance("ttl", "ttl"), 0);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("upstrem", "upstream"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn closest_suggests_only_near_keys() {
        assert_eq!(
            closest("client_secrte", INTEGRATION_KEYS),
            Some("client_secret")
        );
        assert_eq!(
            closest("Client-Secret", INTEGRATION_KEYS),
            Some("client_secret")
        );
        assert_eq!(closest("refresh", INTEGRATION_KEYS), None);
        assert_eq!(closest("tll", INTEGRATION_KEYS), Some("ttl"));
        assert_eq!(closest("banana", INTEGRATION_KEYS), None);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert!(parse_size("1MB").unwrap_err().contains("decimal units"));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999GiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn line_and_column_are_one_based_in_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        // "bé = " is 6 bytes but 5 characters.
        assert_eq!(line_col(text, 12), (2, 6));
        assert_eq!(line_col(text, 999), (3, 1));
    }

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

    #[test]
    fn egress_proxy_needs_http_and_a_port() {
        assert!(parse_egress_proxy("http://proxy:3128").is_ok());
        assert!(parse_egress_proxy("http://proxy:80").is_ok());
        assert!(parse_egress_proxy("http://[fd00::1]:3128").is_ok());
        assert!(parse_egress_proxy("http://proxy").is_err());
        assert!(parse_egress_proxy("http://[fd00::1]").is_err());
        assert!(parse_egress_proxy("https://proxy:3128")
            .unwrap_err()
            .contains("CONNECT"));
        assert!(parse_egress_proxy("http://u:p@proxy:3128").is_err());
        assert!(parse_egress_proxy("http://proxy:3128/path").is_err());
    }

    fn env(https_proxy: Option<&str>, no_proxy: Option<&str>) -> ProxyEnv {
        ProxyEnv {
            https_proxy: https_proxy.map(|v| ("HTTPS_PROXY".to_owned(), v.to_owned())),
            no_proxy: no_proxy.map(|v| ("NO_PROXY".to_owned(), v.to_owned())),
        }
    }

    fn route(rule: &EgressRule, url: &str) -> Egress {
        rule.route(&Endpoint::parse(url).unwrap())
    }

    #[test]
    fn no_proxy_entries_have_their_conventional_meaning() {
        fn m<'l>(list: &'l str, host: &str) -> Option<&'l str> {
            no_proxy_match(list, host)
        }
        // Domains: the name itself and its subdomains, with or without a leading dot.
        assert_eq!(m("bringg.com", "api.bringg.com"), Some("bringg.com"));
        assert_eq!(m(".bringg.com", "api.bringg.com"), Some(".bringg.com"));
        assert_eq!(m("bringg.com", "bringg.com"), Some("bringg.com"));
        assert_eq!(m(".bringg.com", "bringg.com"), Some(".bringg.com"));
        assert_eq!(m("bringg.com", "notbringg.com"), None);
        assert_eq!(m("api.bringg.com", "bringg.com"), None);
        assert_eq!(m("Bringg.COM.", "api.bringg.com"), Some("Bringg.COM."));
        assert_eq!(m("localhost", "localhost"), Some("localhost"));
        // Lists, spaces and empty entries.
        assert_eq!(
            m(
                " example.org , ,.corp, bringg.com",
                "eu2-admin-api.bringg.com"
            ),
            Some("bringg.com")
        );
        assert_eq!(m("", "api.bringg.com"), None);
        assert_eq!(m(",", "api.bringg.com"), None);
        assert_eq!(m(".", "api.bringg.com"), None);
        // `*` matches everything, IP addresses included.
        assert_eq!(m("*", "api.bringg.com"), Some("*"));
        assert_eq!(m("*", "10.1.2.3"), Some("*"));
        // IP addresses and CIDR blocks, never by name.
        assert_eq!(m("10.1.2.3", "10.1.2.3"), Some("10.1.2.3"));
        assert_eq!(m("10.1.2.4", "10.1.2.3"), None);
        assert_eq!(m("10.0.0.0/8", "10.1.2.3"), Some("10.0.0.0/8"));
        assert_eq!(m("10.0.0.0/8", "11.1.2.3"), None);
        assert_eq!(m("0.0.0.0/0", "11.1.2.3"), Some("0.0.0.0/0"));
        assert_eq!(m("10.1.2.3/32", "10.1.2.3"), Some("10.1.2.3/32"));
        assert_eq!(m("10.0.0.0/33", "10.1.2.3"), None);
        assert_eq!(m("fd00::/8", "fd12::1"), Some("fd00::/8"));
        assert_eq!(m("[fd12::1]", "fd12::1"), Some("[fd12::1]"));
        assert_eq!(m("::/0", "fd12::1"), Some("::/0"));
        assert_eq!(m("10.0.0.0/8", "fd12::1"), None);
        assert_eq!(m("127.0.0.1", "::ffff:127.0.0.1"), Some("127.0.0.1"));
        assert_eq!(m("10.0.0.0/8", "ten.example"), None);
        assert_eq!(m("example", "10.1.2.3"), None);
        // A port is not supported: such an entry matches nothing.
        assert_eq!(m("api.bringg.com:443", "api.bringg.com"), None);
    }

    #[test]
    fn egress_rule_routes_each_endpoint() {
        // Nothing set: direct.
        let rule = EgressRule::new(None, None, &ProxyEnv::default()).unwrap();
        assert_eq!(
            route(&rule, "https://api.bringg.com"),
            Egress::Direct {
                why: "no egress_proxy or HTTPS_PROXY set".into()
            }
        );

        // The configured proxy takes every https destination, loopback and NO_PROXY'd ones
        // included; plain-http loopback is direct.
        let proxy = url::Url::parse("http://proxy.corp:3128").unwrap();
        let auth = ResolvedSecret {
            source: SecretSource::File("/run/p".into()),
            value: Secret::new("u:p"),
        };
        let rule = EgressRule::new(
            Some(&proxy),
            Some(&auth),
            &env(Some("http://other:1"), Some("*")),
        )
        .unwrap();
        let via_config = Egress::Proxy {
            url: proxy.clone(),
            auth: Some(auth.clone()),
            source: "server.egress_proxy".into(),
        };
        assert_eq!(route(&rule, "https://api.bringg.com"), via_config);
        assert_eq!(
            route(&rule, "https://localhost:8443/oauth/token"),
            via_config
        );
        assert_eq!(
            route(&rule, "http://127.0.0.1:9000"),
            Egress::Direct {
                why: "loopback http".into()
            }
        );
        assert_eq!(
            via_config.describe(),
            "CONNECT via http://proxy.corp:3128 (server.egress_proxy; credentials from file /run/p)"
        );

        // The environment's proxy, with NO_PROXY exemptions.
        let rule = EgressRule::new(
            None,
            None,
            &env(Some("http://proxy.corp:3128"), Some("localhost,.internal")),
        )
        .unwrap();
        let Egress::Proxy { url, auth, source } = route(&rule, "https://api.bringg.com") else {
            panic!("not proxied");
        };
        assert_eq!(url.as_str(), "http://proxy.corp:3128/");
        assert_eq!(auth, None);
        assert_eq!(source, "environment HTTPS_PROXY");
        assert_eq!(
            route(&rule, "https://hub.internal:8443"),
            Egress::Direct {
                why: "NO_PROXY entry \".internal\" matches hub.internal".into()
            }
        );
        assert!(matches!(
            route(&rule, "https://localhost:8443"),
            Egress::Direct { .. }
        ));
        assert_eq!(
            route(&rule, "http://localhost:8080"),
            Egress::Direct {
                why: "loopback http".into()
            }
        );
    }

    #[test]
    fn environment_proxy_urls_are_read_as_curl_reads_them() {
        let rule = |value: &str| EgressRule::new(None, None, &env(Some(value), None));
        // Credentials move out of the URL into the secret, percent-decoded.
        let Ok(EgressRule::Environment { url, auth, .. }) =
            rule("http://svc%40corp:p%3As%20w@proxy.corp:3128/")
        else {
            panic!("not parsed");
        };
        assert_eq!(url.as_str(), "http://proxy.corp:3128/");
        let auth = auth.unwrap();
        assert_eq!(auth.value.expose(), "svc@corp:p:s w");
        assert_eq!(auth.source.describe(), "env HTTPS_PROXY");
        // No scheme means http.
        let Ok(EgressRule::Environment { url, .. }) = rule("proxy.corp:8080") else {
            panic!("not parsed");
        };
        assert_eq!(url.as_str(), "http://proxy.corp:8080/");
        // Refused, without showing the credentials.
        for (value, want) in [
            ("https://u:hunter2@proxy:3128", "https:// proxy"),
            ("socks5://u:hunter2@proxy:1080", "`socks5` is not supported"),
            ("http://u:hunter2@proxy", "has no port"),
            ("http://u:hunter2@[::1", "not a proxy URL"),
        ] {
            let e = rule(value).unwrap_err();
            assert!(e.contains(want), "{value}: {e}");
            assert!(!e.contains("hunter2"), "{value}: {e}");
        }
        assert_eq!(
            mask_userinfo("http://u:hunter2@proxy:3128/x@y"),
            "http://***@proxy:3128/x@y"
        );
        assert_eq!(mask_userinfo("proxy:3128"), "proxy:3128");
    }

    #[test]
    fn proxy_env_takes_upper_case_first_and_skips_empty_values() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            ProxyEnv::from_lookup(|name| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| (*v).to_owned())
            })
        };
        let e = vars(&[("HTTPS_PROXY", "http://a:1"), ("https_proxy", "http://b:1")]);
        assert_eq!(
            e.https_proxy,
            Some(("HTTPS_PROXY".into(), "http://a:1".into()))
        );
        let e = vars(&[
            ("HTTPS_PROXY", " "),
            ("https_proxy", "http://b:1"),
            ("no_proxy", "x"),
        ]);
        assert_eq!(
            e.https_proxy,
            Some(("https_proxy".into(), "http://b:1".into()))
        );
        assert_eq!(e.no_proxy, Some(("no_proxy".into(), "x".into())));
        let e = vars(&[("HTTP_PROXY", "http://c:1"), ("ALL_PROXY", "http://d:1")]);
        assert_eq!(e, ProxyEnv::default());
        let e = vars(&[("HTTPS_PROXY", "http://u:hunter2@p:1")]);
        assert!(!format!("{e:?}").contains("hunter2"));
    }

    #[test]
    fn listener_conflicts() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(addresses_conflict(a("127.0.0.1:80"), a("127.0.0.1:80")));
        assert!(addresses_conflict(a("0.0.0.0:80"), a("127.0.0.1:80")));
        assert!(!addresses_conflict(a("127.0.0.1:80"), a("127.0.0.2:80")));
        assert!(!addresses_conflict(a("127.0.0.1:0"), a("127.0.0.1:0")));
        assert!(is_loopback("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!is_loopback("10.1.1.1".parse().unwrap()));
    }

    #[test]
    fn trims_only_line_ends() {
        assert_eq!(trim_line_end("s3cret\r\n".to_owned()), "s3cret");
        assert_eq!(trim_line_end("s3cret\n\n".to_owned()), "s3cret");
        assert_eq!(trim_line_end(" s3cret ".to_owned()), " s3cret ");
    }

    /// The key lists drive suggestions and the README check, so they must be exactly the
    /// fields serde accepts: compare them with serde's own "expected one of" list.
    #[test]
    fn key_lists_match_the_raw_structs() {
        fn expected(text: &str) -> Vec<String> {
            let e = Config::from_str(text, Path::new("t.toml")).unwrap_err();
            let after = e
                .message
                .split("valid keys here: ")
                .nth(1)
                .unwrap()
                .to_owned();
            after.split(", ").map(str::to_owned).collect()
        }
        let mut server = expected("[server]\nzzzzzzzzzzzzzzzzzz = 1\n");
        let mut integration = expected("[[integration]]\nzzzzzzzzzzzzzzzzzz = 1\n");
        server.sort();
        integration.sort();
        let mut want_server: Vec<String> = SERVER_KEYS.iter().map(|s| s.to_string()).collect();
        let mut want_integration: Vec<String> =
            INTEGRATION_KEYS.iter().map(|s| s.to_string()).collect();
        want_server.sort();
        want_integration.sort();
        assert_eq!(server, want_server);
        assert_eq!(integration, want_integration);
    }

    #[test]
    fn locate_finds_array_indices() {
        let text = "[[integration]]\nname = \"a\"\n[[integration]]\nname = \"b\"\nttl = 5\n";
        let root = DeTable::parse(text).unwrap();
        let offset = text.find("5").unwrap();
        let path = locate(root.get_ref(), offset);
        assert_eq!(render_path(&path), "integration[1].ttl");
    }
}
