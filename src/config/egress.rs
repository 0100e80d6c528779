//! The route decision: for each endpoint, direct or through which CONNECT proxy, taken from
//! `server.egress_proxy` or from `HTTPS_PROXY`/`NO_PROXY` in tokengate's environment, and the
//! parsing of those proxy URLs.
//!
//! Pure: the environment is read once into a [`ProxyEnv`] value, so the rule is a function of
//! it and tests never touch the process environment. Deliberately no connecting: the
//! connector that opens the tunnel is `crate::egress`. The decision is made here, at load
//! time, so the token endpoint and the upstream always take the same path.

use std::fmt;
use std::net::IpAddr;

use super::{Endpoint, ResolvedSecret, Secret, SecretSource};

/// How one endpoint is reached: directly, or through a CONNECT tunnel at an egress proxy.
///
/// Decided at load time, by one rule ([`EgressRule::route`]) for the token endpoint and the
/// upstream alike, so both clients always take the same path (contract, Egress). Held in
/// [`TokenSettings`] and [`ProxySettings`], so a reload that changes it (another proxy, a new
/// `egress_proxy_auth`) rebuilds the clients like any other changed setting.
///
/// [`TokenSettings`]: super::TokenSettings
/// [`ProxySettings`]: super::ProxySettings
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
pub(crate) fn proxy_name(url: &url::Url) -> String {
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
pub(crate) enum EgressRule {
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
pub(crate) fn no_proxy_match<'l>(list: &'l str, host: &str) -> Option<&'l str> {
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

/// `egress_proxy` is spoken to in plain HTTP: tokengate sends `CONNECT host:443` and runs
/// TLS to the real server inside the tunnel, so the token is never readable by the proxy.
pub(super) fn parse_egress_proxy(text: &str) -> Result<url::Url, String> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
