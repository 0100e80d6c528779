//! The shared in-process harness: the stand-in Delivery Hub (token endpoint + API, with knobs
//! and recordings) on `127.0.0.1:0`, tokengate started with its own listeners, and small
//! clients (reqwest for ordinary calls, raw TCP for requests no client library would send).
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use tokengate::config::Config;
use tokengate::standin::{Hub, HubOptions};
use tokengate::{Listeners, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub async fn hub() -> Hub {
    hub_with(HubOptions::default()).await
}

pub async fn hub_with(opts: HubOptions) -> Hub {
    Hub::start(TcpListener::bind("127.0.0.1:0").await.unwrap(), opts)
        .await
        .unwrap()
}

/// A running tokengate and its addresses.
pub struct Tg {
    pub running: Option<Running>,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
}

impl Tg {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    /// Waits until every integration holds a valid token (bounded: a test that never gets
    /// ready fails here with a message instead of hanging).
    pub async fn ready(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !self.running().is_ready() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "tokengate not ready within 10 s: {:?}",
                reqwest::get(self.admin_url("/readyz")).await.ok()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(5)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.admin_url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The TOML of one integration `oms` pointed at `hub`; `extra` lines go into its table.
pub fn toml_for(hub: &Hub, extra: &str) -> String {
    format!(
        r#"
[server]
admin_listen = "{{admin}}"
shutdown_grace = "5s"

[[integration]]
name = "oms"
listen = "{{listen0}}"
token_url = "{}"
upstream = "{}"
client_id = "test-client"
client_secret = "test-secret"
{extra}
"#,
        hub.token_url(),
        hub.base_url()
    )
}

/// Starts tokengate with `toml`, in which `{admin}` and `{listenN}` are replaced by addresses
/// bound here on `127.0.0.1:0`.
pub async fn start_toml(toml: &str) -> Tg {
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut text = toml.replace("{admin}", &admin.local_addr().unwrap().to_string());
    let mut integrations = Vec::new();
    for i in 0.. {
        let key = format!("{{listen{i}}}");
        if !text.contains(&key) {
            break;
        }
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        text = text.replace(&key, &l.local_addr().unwrap().to_string());
        integrations.push(l);
    }
    let config = Config::from_str(&text, Path::new("test.toml")).unwrap();
    let admin_addr = admin.local_addr().unwrap();
    let proxy = integrations[0].local_addr().unwrap();
    let running = tokengate::start(
        config,
        Listeners {
            admin,
            integrations,
        },
    )
    .await
    .unwrap();
    Tg {
        running: Some(running),
        proxy,
        admin: admin_addr,
    }
}

/// tokengate with one integration on `hub`, ready.
pub async fn start(hub: &Hub, extra: &str) -> Tg {
    let tg = start_toml(&toml_for(hub, extra)).await;
    tg.ready().await;
    tg
}

/// A plain-HTTP client that neither follows redirects nor uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(tokengate::tls::client_config(None).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap()
}

/// Sends raw bytes and returns everything the server sends until it closes or goes quiet.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
        // One response with `Connection: close` is what these tests send; stop at its end.
        if let Some(head_end) = find(&out, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..head_end]).to_lowercase();
            if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                if out.len() >= head_end + 4 + len {
                    break;
                }
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The value of one sample in Prometheus text output, e.g.
/// `sample(&text, "tokengate_token_valid", &[("integration", "oms")])`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            let (l, v) = r.split_once('}')?;
            (l, v)
        } else {
            ("", rest)
        };
        if !value.starts_with(' ') {
            return None;
        }
        let all = labels
            .iter()
            .all(|(k, v)| label_part.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        all.then(|| value.trim().parse().ok()).flatten()
    })
}
