//! The `check` and `token` reports: what the configuration says (each secret by where it
//! comes from, never its value), the route each endpoint takes, the warnings, and a token
//! fetched exactly as the proxy would. Printed for the person at the terminal; the binary maps
//! the outcome to an exit code. It starts nothing that keeps running.
#![allow(clippy::print_stdout)] // the CLI's output path: the reports, and `token --show-token`

use std::time::Duration;

use crate::config::{Config, OnUnavailable, TokenSettings};
use crate::token::client::{Issued, TokenClient};
use crate::token::fleet::protocol::Backend;
use crate::token::fleet::seal::{Sealed, Sealer};
use crate::token::fleet::store::RedisBackend;

/// Why a report ends in failure; the binary chooses the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportError {
    /// A token could not be fetched.
    Fetch,
    /// `token --integration` names no integration of the configuration.
    UnknownIntegration,
}

/// The `check` report, section by section; each section is one function, so adding one is
/// one line here. Fails only when `fetch` asked for tokens and one could not be had.
pub async fn check(config: &Config, fetch: bool) -> Result<(), ReportError> {
    summary(config);
    routes(config);
    fleet(config);
    warnings(config);
    if fetch {
        let tokens = fetch_tokens(config).await;
        let fleet = fleet_entries(config).await;
        tokens.and(fleet)
    } else {
        Ok(())
    }
}

/// Where `[fleet]`'s Redis is, without credentials: `redis://host:port/db`.
fn redis_location(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}:{}{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port().unwrap_or(6379),
            u.path()
        ),
        Err(_) => "an unparsable URL".into(),
    }
}

/// Fleet mode: the Redis, and each integration's fleet id (or that it fetches alone).
fn fleet(config: &Config) {
    let Some(fleet) = &config.fleet else {
        return;
    };
    println!();
    println!(
        "fleet: Redis at {} (redis_url from {}), reached directly (egress_proxy and HTTPS_PROXY are for the token endpoint and upstream only), keys under {}:{{<fleet id>}}:",
        redis_location(fleet.redis_url.value.expose()),
        fleet.redis_url.source.describe(),
        fleet.key_prefix
    );
    let rows: Vec<[String; 4]> = config
        .integrations
        .iter()
        .map(|i| match &i.token.fleet {
            Some(m) => [
                i.name.clone(),
                m.id.clone(),
                humantime::format_duration(m.wait_for_peer).to_string(),
                match m.on_unavailable {
                    OnUnavailable::FetchLocally => "fetch_locally".into(),
                    OnUnavailable::Hold => "hold".into(),
                },
            ],
            None => [
                i.name.clone(),
                "(not in the fleet: fetches its own tokens)".into(),
                String::new(),
                String::new(),
            ],
        })
        .collect();
    print_table(
        ["integration", "fleet id", "wait_for_peer", "on_unavailable"],
        &rows,
    );
}

/// `check --fetch` in fleet mode: each member's entry in Redis (generation, remaining
/// lifetime, who fetched it, whether it opens with this client secret) and the claim; never
/// the token.
async fn fleet_entries(config: &Config) -> Result<(), ReportError> {
    let Some(fleet) = &config.fleet else {
        return Ok(());
    };
    println!();
    let backend = match RedisBackend::new(fleet) {
        Ok(b) => b,
        Err(e) => {
            println!("fleet: {e}");
            return Err(ReportError::Fetch);
        }
    };
    let mut failed = false;
    for i in &config.integrations {
        let Some(member) = &i.token.fleet else {
            continue;
        };
        let entry = backend.read(&member.id).await;
        let claim = backend.claim_holder(&member.id).await;
        match (entry, claim) {
            (Ok(entry), Ok(claim)) => {
                let entry = match entry {
                    None => "no entry (the first tokengate to start fetches one)".to_owned(),
                    Some(e) => {
                        let sealer = Sealer::new(i.token.client_secret.value.expose(), &member.id);
                        let opens = sealer
                            .open(
                                &e.sealed,
                                Sealed {
                                    generation: e.generation,
                                    lifetime_ms: e.lifetime_ms,
                                },
                            )
                            .is_some();
                        format!(
                            "generation {}, {} left of {}, fetched by {}, {}",
                            e.generation,
                            humantime::format_duration(Duration::from_secs(
                                e.remaining
                                    .min(Duration::from_millis(e.lifetime_ms))
                                    .as_secs()
                            )),
                            humantime::format_duration(Duration::from_millis(e.lifetime_ms)),
                            if e.by.is_empty() { "?" } else { &e.by },
                            if opens {
                                "opens with this client_secret"
                            } else {
                                "does NOT open with this client_secret (another secret, or not written by tokengate): it will be replaced"
                            }
                        )
                    }
                };
                let claim = match claim {
                    None => "no claim".to_owned(),
                    Some((holder, left)) => format!(
                        "claimed by {holder} for {} more",
                        humantime::format_duration(Duration::from_millis(left.as_millis() as u64))
                    ),
                };
                println!("{} (fleet {}): {entry}; {claim}", i.name, member.id);
            }
            (Err(e), _) | (_, Err(e)) => {
                failed = true;
                println!(
                    "{} (fleet {}): cannot read the fleet entry: {e}",
                    i.name, member.id
                );
            }
        }
    }
    if failed {
        Err(ReportError::Fetch)
    } else {
        Ok(())
    }
}

/// One row per integration: where it listens, its endpoints and where each secret comes from
/// (never its value).
fn summary(config: &Config) {
    println!("{}: valid", config.path.display());
    println!("admin endpoints: http://{}", config.server.admin_listen);
    println!();
    let rows: Vec<[String; 6]> = config
        .integrations
        .iter()
        .map(|i| {
            [
                i.name.clone(),
                i.listen.to_string(),
                i.token.token_url.url.to_string(),
                i.proxy.upstream.url.to_string(),
                i.token.client_id.source.describe(),
                i.token.client_secret.source.describe(),
            ]
        })
        .collect();
    let header = [
        "integration",
        "listen",
        "token_url",
        "upstream",
        "client_id from",
        "client_secret from",
    ];
    print_table(header, &rows);
}

/// The route each endpoint takes (contract, Egress): direct and why, or which proxy and where it
/// was configured. Credentials appear only as where they come from.
fn routes(config: &Config) {
    println!();
    let routes: Vec<[String; 3]> = config
        .integrations
        .iter()
        .flat_map(|i| {
            [
                [
                    i.name.clone(),
                    "token_url".to_owned(),
                    i.token.egress.describe(),
                ],
                [
                    i.name.clone(),
                    "upstream".to_owned(),
                    i.proxy.egress.describe(),
                ],
            ]
        })
        .collect();
    print_table(["integration", "endpoint", "route"], &routes);
}

/// The loader's warnings.
fn warnings(config: &Config) {
    if !config.warnings.is_empty() {
        println!();
        for w in &config.warnings {
            println!("warning: {w}");
        }
    }
}

/// One token per integration, fetched as the proxy would.
async fn fetch_tokens(config: &Config) -> Result<(), ReportError> {
    println!();
    let mut failed = false;
    for i in &config.integrations {
        match fetch_one(&i.token).await {
            Ok(issued) => println!(
                "{}: token obtained from {} (HTTP {}, lifetime {})",
                i.name,
                i.token.token_url.url,
                issued.status.as_u16(),
                issued
                    .expires_in
                    .map(|d| humantime::format_duration(d).to_string())
                    .unwrap_or_else(|| "not stated; assume_lifetime applies".into())
            ),
            Err(e) => {
                failed = true;
                println!(
                    "{}: token request to {} failed: {e}",
                    i.name, i.token.token_url.url
                );
            }
        }
    }
    if failed {
        Err(ReportError::Fetch)
    } else {
        Ok(())
    }
}

/// Left-aligned columns two spaces apart, as wide as their widest cell.
fn print_table<const N: usize>(header: [&str; N], rows: &[[String; N]]) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: [&str; N]| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header));
    for row in rows {
        println!("{}", line(row.each_ref().map(String::as_str)));
    }
}

async fn fetch_one(settings: &TokenSettings) -> Result<Issued, String> {
    // The same words as the refresher's, so a bad ca_file does not read as a failed request.
    let client =
        TokenClient::new(settings).map_err(|e| format!("cannot build the token client: {e}"))?;
    client.fetch(settings).await.map_err(|e| e.to_string())
}

/// Local and UTC renderings of a wall-clock time.
fn local_and_utc(t: std::time::SystemTime) -> String {
    let local: chrono::DateTime<chrono::Local> = t.into();
    format!(
        "{} local, {} UTC",
        local.format("%Y-%m-%d %H:%M:%S %:z"),
        humantime::format_rfc3339_seconds(t)
    )
}

pub async fn token(config: &Config, name: &str, show: bool) -> Result<(), ReportError> {
    let Some(i) = config.integrations.iter().find(|i| i.name == name) else {
        let names: Vec<&str> = config
            .integrations
            .iter()
            .map(|i| i.name.as_str())
            .collect();
        eprintln!(
            "tokengate: no integration named {name:?} in {}; it has: {}",
            config.path.display(),
            names.join(", ")
        );
        return Err(ReportError::UnknownIntegration);
    };
    eprintln!("endpoint      POST {}", i.token.token_url.url);
    eprintln!("route         {}", i.token.egress.describe());
    match fetch_one(&i.token).await {
        Ok(issued) => {
            let lifetime = issued.expires_in.unwrap_or(i.token.assume_lifetime);
            let expiry = std::time::SystemTime::now() + lifetime;
            eprintln!("status        HTTP {}", issued.status.as_u16());
            eprintln!("token_type    Bearer");
            eprintln!(
                "lifetime      {}{}",
                humantime::format_duration(lifetime),
                if issued.expires_in.is_none() {
                    " (the response has no expires_in; this is assume_lifetime)"
                } else if issued.capped {
                    " (expires_in was over 24 h; capped)"
                } else {
                    ""
                }
            );
            eprintln!("expires       {}", local_and_utc(expiry));
            match issued.clock_skew {
                Some(skew) if skew.abs() > 30 => eprintln!(
                    "clock skew    {skew} s (created_at minus this host's clock): check NTP on this host or the server; expiry is counted on this host's clock"
                ),
                Some(skew) => eprintln!("clock skew    {skew} s (created_at minus this host's clock)"),
                None => eprintln!("clock skew    unknown (no created_at in the response)"),
            }
            if show {
                println!("{}", issued.access_token.expose());
            }
            Ok(())
        }
        Err(e) => {
            eprintln!("token request failed: {e}");
            Err(ReportError::Fetch)
        }
    }
}
