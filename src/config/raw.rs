//! The configuration file's serde shape: what TOML may contain, nothing about what it means.
//!
//! Every table is `deny_unknown_fields`, so a misspelt key is an error, not a setting silently
//! ignored. Every field is optional so that "missing" is reported by validation with the key
//! path and a fix, rather than by serde's "missing field" without one. Leaves are `Spanned`
//! so validation errors can point at a line and column.
//!
//! Deliberately no defaults, ranges or cross-key rules (that is `validate`), and no secret is
//! read here: a `RawSecret` only records which of the three forms was written.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::Deserialize;
use toml::Spanned;

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
    "fleet",
    "fleet_id",
];

/// Every key `[fleet]` accepts.
pub const FLEET_KEYS: &[&str] = &[
    "redis_url",
    "ca_file",
    "key_prefix",
    "wait_for_peer",
    "on_unavailable",
];

/// Every leaf: optional (see above) and spanned, so validation can point at where it was
/// written.
pub(super) type Opt<T> = Option<Spanned<T>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFile {
    pub(super) server: Option<RawServer>,
    pub(super) fleet: Option<Spanned<RawFleet>>,
    pub(super) defaults: Option<RawSettings>,
    pub(super) integration: Option<Vec<Spanned<RawSettings>>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) admin_listen: Opt<String>,
    pub(super) log_format: Opt<String>,
    pub(super) shutdown_grace: Opt<String>,
    pub(super) allow_remote_clients: Opt<bool>,
    pub(super) header_read_timeout: Opt<String>,
    pub(super) egress_proxy: Opt<String>,
    pub(super) egress_proxy_auth: Opt<RawSecret>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFleet {
    pub(super) redis_url: Opt<RawSecret>,
    pub(super) ca_file: Opt<String>,
    pub(super) key_prefix: Opt<String>,
    pub(super) wait_for_peer: Opt<String>,
    pub(super) on_unavailable: Opt<String>,
}

/// One `[[integration]]` table, and also `[defaults]` (which must not set `name`/`listen`;
/// sharing the struct gives a precise "set per integration" error instead of "unknown key").
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSettings {
    pub(super) name: Opt<String>,
    pub(super) listen: Opt<String>,
    pub(super) region: Opt<String>,
    pub(super) token_url: Opt<String>,
    pub(super) upstream: Opt<String>,
    pub(super) client_id: Opt<RawSecret>,
    pub(super) client_secret: Opt<RawSecret>,
    pub(super) ttl: Opt<String>,
    pub(super) scope: Opt<String>,
    pub(super) token_auth: Opt<String>,
    pub(super) token_encoding: Opt<String>,
    pub(super) extra_params: Opt<BTreeMap<String, String>>,
    pub(super) refresh_at: Opt<f64>,
    pub(super) assume_lifetime: Opt<String>,
    pub(super) token_timeout: Opt<String>,
    pub(super) allow_methods: Opt<Vec<Spanned<String>>>,
    pub(super) max_replay_body: Opt<RawSize>,
    pub(super) connect_timeout: Opt<String>,
    pub(super) request_timeout: Opt<String>,
    pub(super) ca_file: Opt<String>,
    pub(super) fleet: Opt<bool>,
    pub(super) fleet_id: Opt<String>,
}

/// A secret as written. Deserialized by hand: an untagged enum would fail with serde's
/// "data did not match any variant", which tells the user nothing.
pub(super) enum RawSecret {
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
pub(super) enum RawSize {
    Bytes(i64),
    Text(String),
}

pub(super) const SIZE_FORMS: &str =
    "a whole number of bytes (1048576) or a string with a B, KiB, MiB or \
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
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

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
}
