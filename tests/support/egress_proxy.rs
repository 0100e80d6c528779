//! An egress proxy for the tests: CONNECT only (RFC 9110 §9.3.6), like a corporate proxy in
//! front of TLS destinations, with knobs (demand Basic credentials, refuse with a status) and
//! recordings (every CONNECT with its target, credentials and answer; any other request). It
//! cannot see inside a tunnel: whether credentials reached a destination is checked on the
//! stand-in's own recordings.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One CONNECT request as the [`TestProxy`] received and answered it.
#[derive(Clone, Debug)]
pub struct ConnectSeen {
    /// The request target, `host:port`.
    pub target: String,
    /// The `Proxy-Authorization` value, if any.
    pub authorization: Option<String>,
    /// What the proxy answered: 200 for a tunnel.
    pub status: u16,
}

#[derive(Default)]
struct ProxyState {
    /// When set, CONNECT needs exactly this `Proxy-Authorization` value (else 407).
    require: Option<String>,
    /// When set, every CONNECT is answered with this status (after the credential check).
    refuse: Option<u16>,
    connects: Vec<ConnectSeen>,
    /// Request lines of anything but CONNECT (a client that sent a request in the clear).
    other: Vec<String>,
}

/// An egress proxy that only tunnels (CONNECT, RFC 9110 §9.3.6), like a corporate proxy in
/// front of TLS destinations: it can demand Basic credentials (407 otherwise) or refuse with
/// any status, and records every CONNECT (target, credentials, answer) and any other request.
/// What crosses a tunnel is TLS it cannot read: whether credentials reached the destination
/// is checked on the stand-in's own recordings.
#[derive(Clone)]
pub struct TestProxy {
    addr: SocketAddr,
    state: Arc<Mutex<ProxyState>>,
    count: tokio::sync::watch::Sender<usize>,
    _accept: Arc<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `Basic base64(user:password)`, as a client sends it (RFC 7617 §2).
pub fn basic(user_password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_password)
    )
}

impl TestProxy {
    pub async fn start() -> TestProxy {
        TestProxy::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    pub fn on(listener: TcpListener) -> TestProxy {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let count = tokio::sync::watch::Sender::new(0);
        let accept = tokio::spawn({
            let state = state.clone();
            let count = count.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(proxy_connection(stream, state.clone(), count.clone()));
                }
            }
        });
        TestProxy {
            addr,
            state,
            count,
            _accept: Arc::new(AbortOnDrop(accept)),
        }
    }

    /// `http://127.0.0.1:PORT`, for `egress_proxy` or `HTTPS_PROXY`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, CONNECT needs `Proxy-Authorization: Basic base64(user_password)`.
    pub fn require_basic(&self, user_password: &str) {
        self.state.lock().unwrap().require = Some(basic(user_password));
    }

    /// From now on, answer every (authorized) CONNECT with `status`; `None` tunnels again.
    pub fn refuse_with(&self, status: Option<u16>) {
        self.state.lock().unwrap().refuse = status;
    }

    pub fn connects(&self) -> Vec<ConnectSeen> {
        self.state.lock().unwrap().connects.clone()
    }

    /// Targets of the tunnels set up (answered 200), in order.
    pub fn tunnels(&self) -> Vec<String> {
        self.connects()
            .into_iter()
            .filter(|c| c.status == 200)
            .map(|c| c.target)
            .collect()
    }

    pub fn other_requests(&self) -> Vec<String> {
        self.state.lock().unwrap().other.clone()
    }

    /// Waits (bounded) until at least `n` CONNECT requests have been answered.
    pub async fn wait_connects(&self, n: usize) -> Vec<ConnectSeen> {
        let mut rx = self.count.subscribe();
        let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|c| *c >= n)).await;
        assert!(
            waited.is_ok(),
            "the proxy saw {:?}, not {n} CONNECTs, within 10 s",
            self.connects()
        );
        self.connects()
    }
}

async fn proxy_connection(
    mut client: TcpStream,
    state: Arc<Mutex<ProxyState>>,
    count: tokio::sync::watch::Sender<usize>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    // Byte by byte: nothing after the head may be consumed, it belongs to the tunnel.
    while !head.ends_with(b"\r\n\r\n") {
        match client.read(&mut byte).await {
            Ok(1) if head.len() < 16 * 1024 => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("proxy-authorization"))
        .map(|(_, value)| value.trim().to_owned());
    let mut parts = request_line.split(' ');
    let (method, target) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    if method != "CONNECT" {
        state.lock().unwrap().other.push(request_line.clone());
        let _ = client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
        return;
    }
    let (require, refuse) = {
        let s = state.lock().unwrap();
        (s.require.clone(), s.refuse)
    };
    let mut status = match (require, refuse) {
        (Some(want), _) if authorization.as_deref() != Some(want.as_str()) => 407,
        (_, Some(status)) => status,
        _ => 200,
    };
    let upstream = if status == 200 {
        match TcpStream::connect(target).await {
            Ok(s) => Some(s),
            Err(_) => {
                status = 502;
                None
            }
        }
    } else {
        None
    };
    let record = |status: u16| {
        state.lock().unwrap().connects.push(ConnectSeen {
            target: target.to_owned(),
            authorization: authorization.clone(),
            status,
        });
        count.send_modify(|c| *c += 1);
    };
    let Some(mut upstream) = upstream else {
        let reason = match status {
            403 => "Forbidden",
            407 => "Proxy Authentication Required",
            502 => "Bad Gateway",
            _ => "Refused",
        };
        // Recorded before answering: a test that saw the answer also sees the record.
        record(status);
        let challenge = if status == 407 {
            "Proxy-Authenticate: Basic realm=\"test\"\r\n"
        } else {
            ""
        };
        let _ = client
            .write_all(
                format!(
                    "HTTP/1.1 {status} {reason}\r\n{challenge}Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
        return;
    };
    record(200);
    if client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
