//! The one reaper of the process: makes stagehand a child subreaper, spawns every child from a
//! single long-lived thread, and waits on *all* children (including reparented descendants)
//! from another, dispatching each exit status to whoever registered that pid.
//!
//! Owns: the subreaper bit, the spawner and reaper threads, the pid → exit-cell registry, the
//! orphan count. Does not own: building commands or child setup (`process`), signalling policy
//! (`process::stop`), cgroups.
//!
//! Because the reaper waits on any child, nothing else in the process may wait on a child:
//! `std::process::Child::wait`, `Command::output`/`status` and `tokio::process` would race with
//! it and see `ECHILD` or lose the status. Use [`crate::process::spawn`] and
//! [`crate::process::run_output`] instead.
//!
//! Why two threads:
//! - Spawning happens on one long-lived thread because `PR_SET_PDEATHSIG` fires when the
//!   *thread* that forked the child exits (prctl(2)); a tokio blocking-pool thread may exit at
//!   any time and would kill the children it forked.
//! - Reaping blocks in `waitid`, so it cannot also serve spawn requests.
//!
//! Why registration cannot miss a fast exit: the spawner holds the registry lock from before
//! the fork until the pid is registered, and the reaper only *peeks* at an exited child
//! (`WNOWAIT`), takes the registry lock, and reaps under it. So a child is never reaped before
//! its pid is registered, and a child whose spawn failed (std's `spawn` then waits for it
//! itself) is never stolen from std. A pid that is not registered once the lock is held is a
//! reparented orphan: it is reaped and counted.

use std::collections::HashMap;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::process::ExitStatus;
use crate::sys;

/// Failures of the global reaper itself.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// `prctl(PR_SET_CHILD_SUBREAPER)` failed.
    #[error("become a child subreaper (prctl PR_SET_CHILD_SUBREAPER): {source}")]
    Subreaper {
        /// The errno from prctl.
        #[source]
        source: io::Error,
    },
    /// The spawner or reaper thread could not be started.
    #[error("start the {thread} thread: {source}")]
    Thread {
        /// Name of the thread that failed to start.
        thread: &'static str,
        /// The error from `std::thread::Builder::spawn`.
        #[source]
        source: io::Error,
    },
    /// The spawner thread is gone (it panicked outside a spawn); no process can be started.
    #[error("the spawner thread is not running; cannot start {program}")]
    SpawnerGone {
        /// The program that could not be started.
        program: String,
    },
}

/// Where a child's exit status is delivered: a watch channel for async waiters and a
/// mutex+condvar for blocking waiters. Set exactly once, by the reaper.
#[derive(Debug)]
pub(crate) struct ExitCell {
    status: Mutex<Option<ExitStatus>>,
    cond: Condvar,
    tx: watch::Sender<Option<ExitStatus>>,
    /// The child leads its own process group.
    leads_group: bool,
    /// Its process group had no members left when the leader was reaped. An empty group can
    /// never be joined again, so its number must not be signalled any more (it may be reused).
    group_empty: AtomicBool,
}

impl ExitCell {
    fn new(leads_group: bool) -> Self {
        Self {
            status: Mutex::new(None),
            cond: Condvar::new(),
            tx: watch::Sender::new(None),
            leads_group,
            group_empty: AtomicBool::new(false),
        }
    }

    /// True once the child was reaped and its process group was empty at that moment.
    pub(crate) fn group_empty(&self) -> bool {
        self.group_empty.load(Ordering::Acquire)
    }

    fn set(&self, status: ExitStatus, group_empty: bool) {
        self.group_empty.store(group_empty, Ordering::Release);
        *lock(&self.status) = Some(status);
        self.cond.notify_all();
        // send_replace stores the value even when nobody is subscribed yet.
        self.tx.send_replace(Some(status));
    }

    pub(crate) fn get(&self) -> Option<ExitStatus> {
        *lock(&self.status)
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<ExitStatus>> {
        self.tx.subscribe()
    }

    pub(crate) fn wait_blocking(&self) -> ExitStatus {
        let mut guard = lock(&self.status);
        loop {
            if let Some(status) = *guard {
                return status;
            }
            guard = self
                .cond
                .wait(guard)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// What the spawner thread hands back: the pid and where its exit status will land.
pub(crate) type Spawned = io::Result<(i32, Arc<ExitCell>)>;

enum Reply {
    Blocking(mpsc::SyncSender<Spawned>),
    Async(oneshot::Sender<Spawned>),
}

struct SpawnRequest {
    command: Command,
    process_group: bool,
    reply: Reply,
}

#[derive(Default)]
struct Registry {
    /// Children spawned through us that have not been reaped yet.
    children: HashMap<i32, Arc<ExitCell>>,
    /// Bumped after every spawn, so a parked reaper knows a child may exist now.
    spawns: u64,
}

/// The process-wide reaper. Get it with [`install`].
pub struct Reaper {
    registry: Mutex<Registry>,
    /// Signalled after each spawn; the reaper parks on it while there are no children.
    spawned: Condvar,
    requests: mpsc::Sender<SpawnRequest>,
    orphans: AtomicU64,
}

impl std::fmt::Debug for Reaper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reaper")
            .field("running", &self.running())
            .field("orphans_reaped", &self.orphans_reaped())
            .finish()
    }
}

static REAPER: OnceLock<Reaper> = OnceLock::new();
static INSTALL: Mutex<()> = Mutex::new(());

/// Installs the global reaper (idempotent): sets `PR_SET_CHILD_SUBREAPER` on the process and
/// starts the spawner and reaper threads. [`crate::process::spawn`] calls this itself; call it
/// early (before anything could fork) so orphans are reaped from the start.
pub fn install() -> Result<&'static Reaper, crate::Error> {
    if let Some(reaper) = REAPER.get() {
        return Ok(reaper);
    }
    let _guard = lock(&INSTALL);
    if let Some(reaper) = REAPER.get() {
        return Ok(reaper);
    }
    nix::sys::prctl::set_child_subreaper(true).map_err(|errno| ReaperError::Subreaper {
        source: io::Error::from(errno),
    })?;

    // The threads need `&'static Reaper`, which exists only once REAPER is set; start them
    // first, waiting for it on a channel, so a failed thread start leaves nothing installed
    // (dropping the senders makes the started thread return).
    let (requests_tx, requests_rx) = mpsc::channel::<SpawnRequest>();
    let (spawner_ready_tx, spawner_ready_rx) = mpsc::sync_channel::<&'static Reaper>(1);
    let (reaper_ready_tx, reaper_ready_rx) = mpsc::sync_channel::<&'static Reaper>(1);
    std::thread::Builder::new()
        .name("stagehand-spawner".into())
        .spawn(move || {
            if let Ok(reaper) = spawner_ready_rx.recv() {
                reaper.spawn_loop(requests_rx);
            }
        })
        .map_err(|source| ReaperError::Thread {
            thread: "stagehand-spawner",
            source,
        })?;
    std::thread::Builder::new()
        .name("stagehand-reaper".into())
        .spawn(move || {
            if let Ok(reaper) = reaper_ready_rx.recv() {
                reaper.reap_loop();
            }
        })
        .map_err(|source| ReaperError::Thread {
            thread: "stagehand-reaper",
            source,
        })?;

    let reaper = REAPER.get_or_init(|| Reaper {
        registry: Mutex::new(Registry::default()),
        spawned: Condvar::new(),
        requests: requests_tx,
        orphans: AtomicU64::new(0),
    });
    // Both receivers are alive (their threads are blocked in recv), so these cannot fail.
    let _ = spawner_ready_tx.send(reaper);
    let _ = reaper_ready_tx.send(reaper);
    Ok(reaper)
}

impl Reaper {
    /// How many reparented descendants (not spawned through us) have been reaped so far.
    pub fn orphans_reaped(&self) -> u64 {
        self.orphans.load(Ordering::Relaxed)
    }

    /// How many children spawned through us have not been reaped yet.
    pub fn running(&self) -> usize {
        lock(&self.registry).children.len()
    }

    /// Runs `command` on the spawner thread and blocks until it is spawned and registered.
    /// `process_group` says whether the command starts its own process group.
    pub(crate) fn spawn_blocking(
        &self,
        command: Command,
        process_group: bool,
        program: &str,
    ) -> Result<Spawned, ReaperError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.send(command, process_group, Reply::Blocking(tx), program)?;
        rx.recv().map_err(|_| ReaperError::SpawnerGone {
            program: program.to_owned(),
        })
    }

    /// Like [`Reaper::spawn_blocking`], awaiting the reply instead of blocking the thread.
    pub(crate) async fn spawn_async(
        &self,
        command: Command,
        process_group: bool,
        program: &str,
    ) -> Result<Spawned, ReaperError> {
        let (tx, rx) = oneshot::channel();
        self.send(command, process_group, Reply::Async(tx), program)?;
        rx.await.map_err(|_| ReaperError::SpawnerGone {
            program: program.to_owned(),
        })
    }

    fn send(
        &self,
        command: Command,
        process_group: bool,
        reply: Reply,
        program: &str,
    ) -> Result<(), ReaperError> {
        self.requests
            .send(SpawnRequest {
                command,
                process_group,
                reply,
            })
            .map_err(|_| ReaperError::SpawnerGone {
                program: program.to_owned(),
            })
    }

    /// Runs `f` while holding the registry lock if `pid` has not been reaped yet, and returns
    /// `None` otherwise. While the lock is held the reaper cannot reap `pid`, so the pid cannot
    /// be recycled under `f`: this is what makes signalling by pid safe.
    pub(crate) fn with_unreaped<T>(&self, pid: i32, f: impl FnOnce() -> T) -> Option<T> {
        let registry = lock(&self.registry);
        let result = registry.children.contains_key(&pid).then(f);
        drop(registry);
        result
    }

    fn spawn_loop(&self, requests: mpsc::Receiver<SpawnRequest>) {
        for request in requests {
            let SpawnRequest {
                command,
                process_group,
                reply,
            } = request;
            let result = self.spawn_registered(command, process_group);
            // A dropped receiver means the caller went away (e.g. a cancelled future); the
            // child stays registered and is reaped normally.
            match reply {
                Reply::Blocking(tx) => {
                    let _ = tx.send(result);
                }
                Reply::Async(tx) => {
                    let _ = tx.send(result);
                }
            }
        }
    }

    fn spawn_registered(&self, mut command: Command, process_group: bool) -> Spawned {
        let mut registry = lock(&self.registry);
        // std's spawn does not panic in practice; if it ever did, this thread must survive
        // or every later spawn would fail.
        let spawned = catch_unwind(AssertUnwindSafe(|| command.spawn()))
            .unwrap_or_else(|_| Err(io::Error::other("std::process::Command::spawn panicked")));
        registry.spawns = registry.spawns.wrapping_add(1);
        let result = spawned.map(|child| {
            // Linux pids fit in i32 (pid_max <= 2^22).
            let pid = child.id() as i32;
            let cell = Arc::new(ExitCell::new(process_group));
            registry.children.insert(pid, Arc::clone(&cell));
            // Dropping std's Child neither waits nor kills; it holds no handles because all
            // stdio are our own descriptors.
            drop(child);
            (pid, cell)
        });
        drop(registry);
        self.spawned.notify_all();
        // Dropping the command here closes the parent's copies of the child's pipe write ends
        // and of the setup descriptors.
        drop(command);
        result
    }

    fn reap_loop(&self) {
        loop {
            let seen = lock(&self.registry).spawns;
            match sys::wait_any_exited() {
                Ok(pid) => self.reap_one(pid),
                Err(err) if err.raw_os_error() == Some(libc::ECHILD) => self.park(seen),
                Err(err) => {
                    // waitid only fails like this on invalid arguments; back off so a bug does
                    // not turn into a busy loop.
                    tracing::error!(error = %err, "waitid failed in the reaper thread");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    /// No children: sleep until the spawner reports a new one. Only our own spawns can give
    /// us children again (orphans are reparented from descendants, and we have none).
    fn park(&self, seen: u64) {
        let mut registry = lock(&self.registry);
        while registry.spawns == seen {
            registry = self
                .spawned
                .wait(registry)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn reap_one(&self, pid: i32) {
        let mut registry = lock(&self.registry);
        match sys::reap(pid) {
            Ok(Some(raw)) => {
                let status = ExitStatus::from_wait_status(raw);
                match registry.children.remove(&pid) {
                    Some(cell) => {
                        // Probed under the lock right after the reap, before any later spawn
                        // of ours could get this number (allocation would need a wrap-around).
                        let group_empty = cell.leads_group
                            && matches!(sys::kill_group(pid, 0),
                                Err(err) if err.raw_os_error() == Some(libc::ESRCH));
                        drop(registry);
                        tracing::trace!(pid, %status, group_empty, "child exited");
                        cell.set(status, group_empty);
                    }
                    None => {
                        drop(registry);
                        self.orphans.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(pid, %status, "reaped orphaned descendant");
                    }
                }
            }
            // WNOWAIT reported it exited, so this does not happen; look again.
            Ok(None) => {}
            // A child whose spawn failed was reaped by std's spawn while we waited for the
            // lock: not ours to report.
            Err(err) if err.raw_os_error() == Some(libc::ECHILD) => {}
            Err(err) => tracing::error!(pid, error = %err, "waitpid failed in the reaper thread"),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded data stays consistent even if a holder panicked (every update is a single
    // insert/remove/assignment), so poisoning is not a reason to stop reaping.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent() {
        let first = install().unwrap();
        let second = install().unwrap();
        assert!(std::ptr::eq(first, second));
    }

    #[test]
    fn exit_cell_delivers_to_blocking_and_async_waiters() {
        let cell = Arc::new(ExitCell::new(true));
        let rx = cell.subscribe();
        assert_eq!(cell.get(), None);
        let waiter = {
            let cell = Arc::clone(&cell);
            std::thread::spawn(move || cell.wait_blocking())
        };
        let status = ExitStatus {
            code: Some(4),
            signal: None,
        };
        assert!(!cell.group_empty());
        cell.set(status, true);
        assert_eq!(waiter.join().unwrap(), status);
        assert!(cell.group_empty());
        assert_eq!(*rx.borrow(), Some(status));
        // A receiver subscribed after the fact sees the value too.
        assert_eq!(*cell.subscribe().borrow(), Some(status));
        assert_eq!(cell.get(), Some(status));
    }
}
