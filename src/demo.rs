//! `tokengate demo`: the stand-in Delivery Hub and a proxy wired to it, on loopback, with no
//! configuration file, no credentials and no network. It sends one sample call through the
//! proxy, prints what happened and what to try next, and serves until Ctrl-C.
//!
//! It goes through the same path as production: the embedded TOML is loaded with
//! [`Config::from_str_with_env`] and served by [`crate::start`].
#![allow(clippy::print_stdout)] // the demo talks to the person who ran it

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;

use crate::config::{Config, ConfigError, ProxyEnv};
use crate::standin::{Hub, HubOptions};
use crate::{Listeners, StartError};

const DEMO_TOML: &str = include_str!("demo.toml");
const PROXY_PORT: u16 = 8081;
const ADMIN_PORT: u16 = 9464;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot bind a loopback port: {0}")]
    Bind(#[from] std::io::Error),
    #[error("the embedded demo configuration is invalid (a bug): {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
}

/// Binds the preferred port on loopback, or any free one when it is taken.
fn bind(preferred: u16) -> std::io::Result<TcpListener> {
    let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    crate::listen(loopback(preferred)).or_else(|_| crate::listen(loopback(0)))
}

/// The embedded configuration with the bound addresses filled in.
pub fn config(admin: SocketAddr, listen: SocketAddr, hub: &str) -> Result<Config, ConfigError> {
    let text = DEMO_TOML
        .replace("{admin}", &admin.to_string())
        .replace("{listen}", &listen.to_string())
        .replace("{hub}", hub);
    // Every endpoint is plain-http loopback, which never uses a proxy; an empty proxy
    // environment also keeps a malformed HTTPS_PROXY from failing the demo.
    Config::from_str_with_env(
        &text,
        Path::new("(embedded demo configuration)"),
        &ProxyEnv::default(),
    )
}

pub async fn run(shutdown: impl Future<Output = &'static str>) -> Result<(), DemoError> {
    let hub = Hub::start(
        TcpListener::bind(("127.0.0.1", 0)).await?,
        HubOptions {
            client_id: Some("demo-client".into()),
            client_secret: Some("demo-secret".into()),
            ..HubOptions::default()
        },
    )
    .await?;
    let proxy = bind(PROXY_PORT)?;
    let admin = bind(ADMIN_PORT)?;
    let (proxy_addr, admin_addr) = (proxy.local_addr()?, admin.local_addr()?);
    let config = config(admin_addr, proxy_addr, &hub.base_url())?;
    let grace = config.server.shutdown_grace;
    let running = crate::start(
        config,
        Listeners {
            admin,
            integrations: vec![proxy],
        },
    )
    .await?;

    // The first token takes a few milliseconds; the sample call should show the normal case.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !running.is_ready() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    println!();
    println!("tokengate demo");
    println!(
        "  stand-in Delivery Hub  {}  (token endpoint /oauth/token and API; tokens live 30 s)",
        hub.base_url()
    );
    println!("  integration \"demo\"     http://{proxy_addr}  → adds the Bearer token, forwards to the stand-in API");
    println!("  admin                  http://{admin_addr}  /healthz /readyz /metrics /status");
    println!();

    let url = format!("http://{proxy_addr}/v2/orders?limit=1");
    println!("sample call: GET {url}   (no Authorization header)");
    match sample_call(&url).await {
        Ok((status, body)) => {
            println!("  → HTTP {status}; the stand-in API answered:");
            for line in body.lines().take(20) {
                println!("    {line}");
            }
        }
        Err(e) => println!("  → failed: {e}"),
    }
    println!();
    println!("try:");
    println!("  curl -si {url}");
    println!(
        "  curl -si -x http://{proxy_addr} {}/v2/orders   # a client using HTTP_PROXY",
        hub.base_url()
    );
    println!("  # Java, .NET, Node, Python, PHP, Go, Ruby, wget: \"Client recipes\" in README.md (both modes, each one's trap)");
    println!("  curl -s  http://{admin_addr}/status");
    println!("  curl -s  http://{admin_addr}/metrics | grep tokengate_token");
    println!("the token is refreshed after ~24 s of its 30 s: watch for \"token obtained\" below. Ctrl-C stops.");
    println!();

    let signal = shutdown.await;
    println!("{signal}: stopping");
    running.shutdown(grace).await;
    hub.shutdown();
    Ok(())
}

async fn sample_call(url: &str) -> Result<(u16, String), String> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = url.parse().map_err(|e| format!("{e}"))?;
    let res = tokio::time::timeout(Duration::from_secs(15), client.get(uri))
        .await
        .map_err(|_| "no answer within 15 s".to_string())?
        .map_err(|e| crate::error::chain(&e))?;
    let status = res.status().as_u16();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
