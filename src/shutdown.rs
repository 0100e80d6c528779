//! The stop signal every long-lived task selects on, and the OS signals that fire it.
//!
//! A `watch` channel rather than a broadcast: a task that subscribes late still sees that
//! shutdown already began.

use tokio::sync::watch;

/// Fires the shutdown; dropping it fires it too, so a lost owner cannot leave tasks running.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// A task's view of the shutdown signal.
#[derive(Clone, Debug)]
pub struct Shutdown(watch::Receiver<bool>);

pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Shutdown(rx))
}

impl Trigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }

    pub fn subscribe(&self) -> Shutdown {
        Shutdown(self.0.subscribe())
    }
}

impl Shutdown {
    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn wait(&mut self) {
        // Err means the trigger is gone, which also means stop.
        let _ = self.0.wait_for(|stopping| *stopping).await;
    }

    pub fn is_stopping(&self) -> bool {
        *self.0.borrow()
    }
}

/// Resolves on SIGTERM or SIGINT with the signal's name. The handlers are installed when
/// this is called, not when the future is first polled: a signal that arrives in between
/// must not fall through to the default action (killing the process without draining).
/// Must be called inside the runtime. If a handler cannot be installed, only Ctrl-C counts.
pub fn terminate_signal() -> impl std::future::Future<Output = &'static str> {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{signal, SignalKind};
        (
            signal(SignalKind::terminate()).ok(),
            signal(SignalKind::interrupt()).ok(),
        )
    };
    async move {
        #[cfg(unix)]
        if let (Some(mut term), Some(mut int)) = handlers {
            return tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// A stream of SIGHUPs, installed now for the same reason; `None` where there is no SIGHUP.
pub struct Hangup(#[cfg(unix)] Option<tokio::signal::unix::Signal>);

impl Hangup {
    pub fn install() -> Hangup {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Hangup(signal(SignalKind::hangup()).ok())
        }
        #[cfg(not(unix))]
        Hangup()
    }

    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(s) = self.0.as_mut() {
            s.recv().await;
            return;
        }
        std::future::pending::<()>().await
    }
}
