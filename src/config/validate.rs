//! Raw → [`Config`]: `[defaults]` inheritance, the default for every key nobody set, and the
//! rules a value or the file as a whole must satisfy (ranges, loopback listeners unless
//! allowed, plain http only to loopback, unique names and ports, no `name` or `listen` in
//! `[defaults]`). The checks on one written value (an address, a duration, an endpoint, a
//! secret, a method list, a CA file) are in the child module `value`. Secrets and `ca_file`
//! are read during validation, so a `Config` that loaded holds values that worked then.
//!
//! Each value remembers where it was written (its integration's table or `[defaults]`), so a
//! message points at the line to edit. Deliberately not here: the TOML shape (`raw`), turning
//! a serde error into a key path and a suggestion (`diagnose`), the egress decision itself
//! (`egress`), and any network I/O.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::de::DeTable;
use toml::Spanned;

use super::diagnose::{self, line_col};
use super::egress::parse_egress_proxy;
use super::raw::{parse_size, Opt, RawFile, RawServer, RawSettings, RawSize, SIZE_FORMS};
use super::{
    Config, ConfigError, EgressRule, Endpoint, FleetSettings, Integration, LogFormat, ProxyEnv,
    ProxySettings, SecretSource, Server, TokenAuth, TokenEncoding, TokenSettings,
    DEFAULT_ADMIN_LISTEN, DEFAULT_ASSUME_LIFETIME, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_LOG_FORMAT, DEFAULT_MAX_REPLAY_BODY, DEFAULT_REFRESH_AT,
    DEFAULT_REQUEST_TIMEOUT, DEFAULT_SHUTDOWN_GRACE, DEFAULT_TOKEN_TIMEOUT, DEFAULT_UPSTREAM,
    REGIONS, RESERVED_PARAMS,
};

mod value;

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

mod fleet;

/// The smallest duration a timeout may have: zero would fail every request at once.
const POSITIVE: Duration = Duration::from_nanos(1);

/// One load: the text, its file, and the warnings found so far. Its methods are the validation
/// steps: the file's structure here, single values in `value`.
pub(super) struct Loader<'a> {
    path: &'a Path,
    text: &'a str,
    /// Relative `file` and `ca_file` paths are relative to the config file, not to the
    /// working directory, so the same config works wherever tokengate is started.
    base_dir: PathBuf,
    warnings: Vec<String>,
    env: &'a ProxyEnv,
}

impl<'a> Loader<'a> {
    pub(super) fn new(text: &'a str, path: &'a Path, env: &'a ProxyEnv) -> Self {
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

    pub(super) fn syntax_error(&self, e: &toml::de::Error) -> ConfigError {
        let (span, what) = diagnose::syntax_error(self.text, e);
        self.error(span.as_ref(), "", what)
    }

    pub(super) fn serde_error(&self, e: &toml::de::Error, root: &DeTable<'_>) -> ConfigError {
        let (span, key, what) = diagnose::serde_error(e, root);
        self.error(span.as_ref(), &key, what)
    }

    pub(super) fn build(mut self, raw: RawFile) -> Result<Config, ConfigError> {
        let server = self.server(raw.server.unwrap_or_default())?;
        let egress = self.egress_rule(&server)?;
        let fleet = match &raw.fleet {
            Some(raw) => Some(self.fleet(raw)?),
            None => None,
        };
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
            let integration = self.integration(
                index,
                raw,
                &defaults,
                &server,
                &egress,
                fleet.as_ref().map(|(_, member)| member),
            )?;
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

        for i in &integrations {
            // The lifetime tokengate expects: what it asks for, else what it assumes.
            let lifetime = i.token.ttl.unwrap_or(i.token.assume_lifetime);
            let margin = lifetime.mul_f64(1.0 - i.token.refresh_at);
            if margin < Duration::from_secs(30) {
                self.warn(format!(
                    "integration {}: refresh_at = {} leaves {} before a {} token expires; a slow or failing token endpoint then means 503s — lower refresh_at or ask for a longer ttl",
                    i.name,
                    i.token.refresh_at,
                    humantime::format_duration(margin),
                    humantime::format_duration(lifetime)
                ));
            }
        }

        Ok(Config {
            path: self.path.to_path_buf(),
            server,
            fleet: fleet.map(|(fleet, _)| fleet),
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
        fleet: Option<&FleetSettings>,
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
        let mut token = self.token_settings(&scope, &name, ca_file.clone(), egress)?;
        token.fleet = self.membership(&scope, &token, fleet)?;
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
            fleet: None,
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
