//! One written value at a time: the checks on a single key's value that do not depend on
//! which table it is in (a word from a list, an address, a duration with a floor, an endpoint,
//! a secret, a method list, a CA file), as more `Loader` methods.
//!
//! A child of `validate` so it can use the loader's position and warning helpers; split off
//! because they are the leaves, while `validate` itself reads as the file's structure.
//! Deliberately no defaults chosen and no knowledge of `[defaults]`: the caller passes the
//! `Field` it picked, and the default to use when there is none.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::{Field, Loader};
use crate::config::diagnose::process_user;
use crate::config::raw::RawSecret;
use crate::config::{ConfigError, Endpoint, ResolvedSecret, Secret, SecretSource};

impl Loader<'_> {
    /// A string that must be one of a few words (`token_auth = "basic"`).
    pub(super) fn choice<T: Copy>(
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

    pub(super) fn socket_addr(&self, field: &Field<'_, String>) -> Result<SocketAddr, ConfigError> {
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

    pub(super) fn parse_duration(
        &self,
        field: &Field<'_, String>,
    ) -> Result<Duration, ConfigError> {
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

    pub(super) fn duration(
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

    pub(super) fn endpoint(&mut self, field: &Field<'_, String>) -> Result<Endpoint, ConfigError> {
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

    pub(super) fn secret(
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

    pub(super) fn methods(
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

    pub(super) fn ca_file(&self, field: &Field<'_, String>) -> Result<PathBuf, ConfigError> {
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

fn is_standard_method(upper: &str) -> bool {
    matches!(
        upper,
        "GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE" | "PATCH"
    )
}
