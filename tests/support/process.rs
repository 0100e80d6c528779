//! The built binary as a child process, for the CLI, signal and log tests: its output lines
//! arrive on a channel so a test waits for an event (a log line) instead of sleeping.
#![allow(dead_code, clippy::unwrap_used)]

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

pub const BIN: &str = env!("CARGO_BIN_EXE_tokengate");

/// A port free right now on 127.0.0.1, for configs of the binary (which binds it itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `tokengate ARGS` with no `TOKENGATE_CONFIG`, run to completion: (exit code, stdout, stderr).
pub async fn output(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("TOKENGATE_CONFIG")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running binary; stdout and stderr lines both arrive on one channel.
pub struct Proc {
    pub child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line read so far, for failure messages and after-the-fact searches.
    pub seen: Vec<String>,
}

fn forward(stream: impl AsyncRead + Unpin + Send + 'static, tx: mpsc::UnboundedSender<String>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(line);
        }
    });
}

impl Proc {
    /// `tokengate ARGS` at log level info.
    pub fn spawn(args: &[&str]) -> Proc {
        let mut command = Command::new(BIN);
        command.args(args).env("TOKENGATE_LOG", "info");
        Proc::start(command)
    }

    /// Starts a prepared command with its output captured.
    pub fn start(mut command: Command) -> Proc {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        forward(child.stdout.take().unwrap(), tx.clone());
        forward(child.stderr.take().unwrap(), tx);
        Proc {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for the next line `accept` takes; panics with everything seen if none
    /// comes.
    pub async fn next_matching(&mut self, what: &str, accept: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.recv())
                .await
                .unwrap_or_else(|_| panic!("no {what}; saw:\n{}", self.seen.join("\n")))
                .unwrap_or_else(|| {
                    panic!(
                        "process ended before {what}; saw:\n{}",
                        self.seen.join("\n")
                    )
                });
            self.seen.push(line.clone());
            if accept(&line) {
                return line;
            }
        }
    }

    /// Waits (bounded) for an output line containing `needle`.
    pub async fn wait_for(&mut self, needle: &str) -> String {
        self.next_matching(&format!("line with {needle:?}"), |l| l.contains(needle))
            .await
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id().unwrap() as i32), sig).unwrap();
    }

    /// Waits (bounded) for the exit, then reads what is left of the output.
    pub async fn exit_code(&mut self) -> i32 {
        let code = tokio::time::timeout(Duration::from_secs(20), self.child.wait())
            .await
            .unwrap()
            .unwrap()
            .code()
            .unwrap_or(-1);
        // The readers end when the pipes close.
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(10), self.lines.recv()).await
        {
            self.seen.push(line);
        }
        code
    }
}
