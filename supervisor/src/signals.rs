//! SIGINT and SIGTERM as something the runner can `select!` on, so it can tear the stage down
//! instead of dying. Owns only the listening; what to do on a signal is the runner's call.
//!
//! Once registered, tokio keeps a handler installed for the life of the process, so these
//! signals no longer kill stagehand by default: the runner must act on them.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// Registering a signal listener failed.
#[derive(Debug, thiserror::Error)]
#[error("listen for {name}: {source}")]
pub struct SignalError {
    /// "SIGINT" or "SIGTERM".
    pub name: &'static str,
    /// The error from tokio.
    #[source]
    pub source: std::io::Error,
}

/// Listeners for SIGINT and SIGTERM. Create it early: a signal that arrives before any
/// listener exists still has its default action (terminate).
#[derive(Debug)]
pub struct TerminationSignals {
    interrupt: Signal,
    terminate: Signal,
}

/// Starts listening for SIGINT and SIGTERM. Needs a tokio runtime.
pub fn termination_signals() -> Result<TerminationSignals, SignalError> {
    let listen = |kind, name| signal(kind).map_err(|source| SignalError { name, source });
    Ok(TerminationSignals {
        interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
        terminate: listen(SignalKind::terminate(), "SIGTERM")?,
    })
}

impl TerminationSignals {
    /// Waits for the next SIGINT or SIGTERM and returns its number.
    pub async fn recv(&mut self) -> i32 {
        // recv only returns None if the signal driver shut down, i.e. the runtime is going
        // away; treat that as a termination request too.
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
        }
    }
}

/// One-shot form: listens, then waits for the first SIGINT or SIGTERM.
pub async fn next_termination() -> Result<i32, SignalError> {
    Ok(termination_signals()?.recv().await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_sigterm_and_sigint_by_number() {
        let mut signals = termination_signals().unwrap();
        let me = std::process::id() as i32;
        crate::sys::kill(me, libc::SIGTERM).unwrap();
        assert_eq!(signals.recv().await, libc::SIGTERM);
        crate::sys::kill(me, libc::SIGINT).unwrap();
        assert_eq!(signals.recv().await, libc::SIGINT);
    }
}
