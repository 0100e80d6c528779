//! A real `redis-server` per test: `--port <free> --bind 127.0.0.1 --save ''`, stopped by
//! PID (and on drop), restartable on the same port, so a test can take Redis away and bring it
//! back empty. `.ci/run` installs Debian's `redis-server`.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::process::free_port;

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    /// TLS: the port clients use is `port`; `plain` is a loopback plain port for the test's
    /// own commands.
    tls: Option<(Vec<String>, u16)>,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut redis = Redis {
            port: free_port(),
            child: None,
            tls: None,
        };
        redis.restart().await;
        redis
    }

    /// A Redis that speaks TLS only on `port` (a certificate for `localhost` from the files
    /// given), with a plain port for the test's own commands.
    pub async fn start_tls(cert: &Path, key: &Path) -> Redis {
        let args = vec![
            "--tls-cert-file".to_owned(),
            cert.display().to_string(),
            "--tls-key-file".to_owned(),
            key.display().to_string(),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        let mut redis = Redis {
            port: free_port(),
            child: None,
            tls: Some((args, free_port())),
        };
        redis.restart().await;
        redis
    }

    fn command_port(&self) -> u16 {
        self.tls.as_ref().map_or(self.port, |(_, plain)| *plain)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again (empty: nothing is persisted) on the same port.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut args: Vec<String> = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            .map(String::from)
            .to_vec();
        match &self.tls {
            None => args.extend(["--port".to_owned(), self.port.to_string()]),
            Some((tls, plain)) => {
                args.extend(["--port".to_owned(), plain.to_string()]);
                args.extend(["--tls-port".to_owned(), self.port.to_string()]);
                args.extend(tls.iter().cloned());
            }
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed (.ci/run installs Debian's redis-server)");
        self.child = Some(child);
        for _ in 0..200 {
            if self.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// Kills it (SIGKILL: no goodbye to clients).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP / SIGCONT: a Redis that stops answering without closing anything.
    pub fn pause(&self, on: bool) {
        let pid = Pid::from_raw(self.child.as_ref().unwrap().id() as i32);
        kill(pid, if on { Signal::SIGSTOP } else { Signal::SIGCONT }).unwrap();
    }

    pub async fn ping(&self) -> bool {
        self.cmd(&["PING"])
            .await
            .is_some_and(|r| r.contains("PONG"))
    }

    /// One command over a plain connection; the raw RESP reply.
    pub async fn cmd(&self, args: &[&str]) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", self.command_port()))
            .await
            .ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = vec![0; 1 << 16];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Every key and the raw bytes of every value in the store (DUMP is binary-safe enough to
    /// search for a token in clear text).
    pub async fn everything(&self) -> String {
        let keys = self.cmd(&["KEYS", "*"]).await.unwrap_or_default();
        let mut out = keys.clone();
        for key in keys.lines().filter(|l| !l.starts_with(['*', '$'])) {
            for c in [["HGETALL", key].as_slice(), ["GET", key].as_slice()] {
                out.push_str(&self.cmd(c).await.unwrap_or_default());
            }
        }
        out
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGCONT);
        }
        self.kill();
    }
}
