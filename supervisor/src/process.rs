//! Starting, watching and stopping processes: [`SpawnSpec`] → [`spawn`] → [`Child`]
//! (`wait`, `try_status`, `signal`, `signal_group`), [`stop`] (signal, grace, SIGKILL),
//! [`read_lines`] for streaming output, and [`run_output`] for short helper commands.
//!
//! Owns: the child's argv/env/cwd/stdio, the pre-exec setup order (cgroups → netns → private
//! mounts → user → parent-death signal), executable lookup, exit-status conventions.
//! Does not own: creating cgroups, namespaces or hosts files (callers pass open descriptors
//! and paths), reaping (`reaper`), raw syscalls (`sys`).
//!
//! Every child is forked by the reaper's spawner thread and reaped by its reaper thread, so
//! nothing in the process may call `std::process::Child::wait` or use `tokio::process`.

use std::borrow::Cow;
use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::{FcntlArg, FdFlag, OFlag};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;

use crate::reaper::{self, ExitCell, Reaper, Spawned};
use crate::sys::{self, ChildSetup, ChildUser, SetupStage};

/// Searched when the child's environment has no `PATH` (the usual Debian root default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Longest line [`read_lines`] hands out; longer lines arrive in pieces of at most this size.
pub const MAX_LINE: usize = 64 * 1024;

/// Failures while preparing, starting, signalling or reading a process.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// `argv` was empty.
    #[error("nothing to run: argv is empty")]
    EmptyArgv,
    /// `argv[0]` is not an executable file, looked up in the child's `PATH`.
    #[error("executable not found: {program}")]
    NotFound {
        /// `argv[0]` as given.
        program: String,
    },
    /// The working directory does not exist or is not a directory (checked before the fork,
    /// because a failed `chdir` in the child would read like a missing executable).
    #[error("working directory of {program} is not usable: {}: {reason}", cwd.display())]
    Cwd {
        /// `argv[0]` as given.
        program: String,
        /// The working directory from the spec.
        cwd: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// A path handed to the child contains a NUL byte.
    #[error("path contains a NUL byte: {}", path.display())]
    NulInPath {
        /// The offending path.
        path: PathBuf,
    },
    /// Creating a pipe or duplicating a descriptor for the child failed.
    #[error("prepare {what} for {program}: {source}")]
    Prepare {
        /// The program being started.
        program: String,
        /// What was being prepared ("stdout pipe", "cgroup descriptor", ...).
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The child failed in its pre-exec setup (it never ran the program).
    #[error("start {program}: {what}: {source}")]
    Setup {
        /// The program being started.
        program: String,
        /// The setup step that failed, with what it acted on.
        what: String,
        /// The errno from the child.
        #[source]
        source: io::Error,
    },
    /// fork or exec failed.
    #[error("start {program} ({}): {source}", path.display())]
    Spawn {
        /// `argv[0]` as given.
        program: String,
        /// The resolved executable.
        path: PathBuf,
        /// The error from the spawn.
        #[source]
        source: io::Error,
    },
    /// kill(2) failed with something other than "no such process".
    #[error("send {} to {target}: {source}", signal_name(*signal))]
    Signal {
        /// "pid N" or "process group N".
        target: String,
        /// The signal number.
        signal: i32,
        /// The errno from kill.
        #[source]
        source: io::Error,
    },
    /// Reading the output of a helper command failed.
    #[error("read output of {program}: {source}")]
    Read {
        /// The program whose output was read.
        program: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// How a process ended. Exactly one of `code` and `signal` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExitStatus {
    /// The exit code, if the process exited normally.
    pub code: Option<i32>,
    /// The signal that killed the process, if it was killed.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Decodes a `waitpid` status word.
    pub(crate) fn from_wait_status(raw: libc::c_int) -> Self {
        if libc::WIFSIGNALED(raw) {
            Self {
                code: None,
                signal: Some(libc::WTERMSIG(raw)),
            }
        } else {
            Self {
                code: Some(libc::WEXITSTATUS(raw)),
                signal: None,
            }
        }
    }

    /// The shell-style exit code: the code itself, or 128+N when killed by signal N
    /// (the conmon-rs / POSIX shell convention).
    pub fn exit_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            // Unreachable by construction; 255 is what a shell reports for "unknown".
            (None, None) => 255,
        }
    }

    /// True when the process exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => write!(f, "killed by {}", signal_name(signal)),
            (None, None) => f.write_str("unknown exit status"),
        }
    }
}

/// `SIGKILL` for 9, `signal 40` for numbers without a name (real-time signals).
pub fn signal_name(signal: i32) -> Cow<'static, str> {
    match nix::sys::signal::Signal::try_from(signal) {
        Ok(sig) => Cow::Borrowed(sig.as_str()),
        Err(_) => Cow::Owned(format!("signal {signal}")),
    }
}

/// The numeric identity a child runs as. Supplementary groups are not looked up: list them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary group ids (setgroups); empty drops all of them.
    pub groups: Vec<u32>,
}

/// A bind mount applied inside the child's private mount namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// What to mount (an existing file or directory on the host).
    pub src: CString,
    /// Where to mount it (must exist; a file over a file, a directory over a directory).
    pub dst: CString,
}

impl BindMount {
    /// Builds a bind mount from paths, rejecting NUL bytes.
    pub fn new(src: impl AsRef<Path>, dst: impl AsRef<Path>) -> Result<Self, ProcessError> {
        let c = |path: &Path| {
            CString::new(path.as_os_str().as_bytes()).map_err(|_| ProcessError::NulInPath {
                path: path.to_path_buf(),
            })
        };
        Ok(Self {
            src: c(src.as_ref())?,
            dst: c(dst.as_ref())?,
        })
    }
}

/// The child's standard input.
#[derive(Debug)]
pub enum Stdin {
    /// `/dev/null`.
    Null,
    /// An open descriptor (e.g. the read end of a pipe), moved into the child.
    Fd(OwnedFd),
}

/// Where the child's stdout and stderr go.
#[derive(Debug)]
pub enum OutputTarget {
    /// Two pipes: [`Child::take_stdout`] and [`Child::take_stderr`].
    Pipes,
    /// One pipe for both, in the order written: [`Child::take_stdout`]; no stderr.
    Merged,
    /// Both appended to this file (open it with `append(true)` to interleave safely).
    File(File),
    /// `/dev/null`.
    Null,
}

/// Everything needed to start one process.
///
/// The pre-exec hooks run in the child in this order: `cgroup_procs`, `netns`,
/// `private_mounts`, `user` (or `keep_id`), `parent_death_signal`; then the program is exec'd.
#[derive(Debug)]
pub struct SpawnSpec {
    /// Program and arguments. `argv[0]` is looked up in the `PATH` of `env` (or
    /// [`DEFAULT_PATH`]) unless it contains a `/`, in which case it is relative to `cwd`.
    pub argv: Vec<OsString>,
    /// The child's whole environment: nothing is inherited unless copied in here.
    pub env: Vec<(OsString, OsString)>,
    /// Working directory of the child.
    pub cwd: PathBuf,
    /// Switch to this identity before exec (needs root).
    pub user: Option<UserSpec>,
    /// In a rootless stage: enter a nested user namespace with these `uid_map` and `gid_map`
    /// lines before exec (see [`crate::userns::keep_id_maps`]), so the program runs as the
    /// user's own ids instead of root of stagehand's namespace. Exclusive with `user`.
    pub keep_id: Option<(String, String)>,
    /// Start a new process group with pgid = pid, so [`stop`] reaches the whole job.
    pub process_group: bool,
    /// Signal sent to the child when stagehand dies (`PR_SET_PDEATHSIG`).
    pub parent_death_signal: Option<i32>,
    /// Standard input.
    pub stdin: Stdin,
    /// Standard output and error.
    pub output: OutputTarget,
    /// Open, writable `cgroup.procs` (v2, v1) or `tasks` (v1) files; the child writes its
    /// own pid to each before anything else, so it runs inside its cgroups from the start.
    pub cgroup_procs: Vec<OwnedFd>,
    /// A network namespace to join (`setns(CLONE_NEWNET)`).
    pub netns: Option<OwnedFd>,
    /// If non-empty: a private mount namespace (slave of the host, so nothing leaks back)
    /// with these bind mounts, e.g. a stage hosts file over `/etc/hosts`.
    pub private_mounts: Vec<BindMount>,
    /// Descriptors the program inherits at the *same numbers* they have here (e.g. pass
    /// `--ready-fd={fd.as_raw_fd()}` to slirp4netns). Only this child inherits them; the
    /// parent's copies are closed once the child is started.
    pub inherit_fds: Vec<OwnedFd>,
}

impl SpawnSpec {
    /// A spec with `argv`, the exact `env` and `cwd`; no hooks, no process group, stdin from
    /// `/dev/null`, stdout and stderr on two pipes.
    pub fn new<A, S, E, K, V>(argv: A, env: E, cwd: impl Into<PathBuf>) -> Self
    where
        A: IntoIterator<Item = S>,
        S: Into<OsString>,
        E: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: env.into_iter().map(|(k, v)| (k.into(), v.into())).collect(),
            cwd: cwd.into(),
            user: None,
            keep_id: None,
            process_group: false,
            parent_death_signal: None,
            stdin: Stdin::Null,
            output: OutputTarget::Pipes,
            cgroup_procs: Vec::new(),
            netns: None,
            private_mounts: Vec::new(),
            inherit_fds: Vec::new(),
        }
    }
}

/// A started process. Dropping it neither kills nor waits: the reaper still reaps it.
///
/// Output is handed out as the read ends of pipes ([`OwnedFd`], blocking mode); pass them to
/// [`read_lines`] (which makes them non-blocking and registers them with tokio) or read them
/// synchronously.
#[derive(Debug)]
pub struct Child {
    pid: i32,
    pgid: Option<i32>,
    program: String,
    exit: Arc<ExitCell>,
    reaper: &'static Reaper,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

impl Child {
    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The process group id (= pid) if the spec asked for a new group.
    pub fn pgid(&self) -> Option<i32> {
        self.pgid
    }

    /// `argv[0]` as given, for messages.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// Takes the read end of the stdout pipe (also carries stderr with [`OutputTarget::Merged`]).
    pub fn take_stdout(&mut self) -> Option<OwnedFd> {
        self.stdout.take()
    }

    /// Takes the read end of the stderr pipe ([`OutputTarget::Pipes`] only).
    pub fn take_stderr(&mut self) -> Option<OwnedFd> {
        self.stderr.take()
    }

    /// Waits for the exit status. Any number of callers may wait, before or after the exit.
    pub async fn wait(&self) -> ExitStatus {
        let mut rx = self.exit.subscribe();
        let status = *rx
            .wait_for(Option::is_some)
            .await
            .expect("the exit cell owns its sender and lives as long as this Child");
        status.expect("wait_for returned only once the status is set")
    }

    /// Blocks the calling thread until the process has exited. Not for async contexts.
    pub fn wait_blocking(&self) -> ExitStatus {
        self.exit.wait_blocking()
    }

    /// The exit status if the process has exited and been reaped.
    pub fn try_status(&self) -> Option<ExitStatus> {
        self.exit.get()
    }

    /// Sends `sig` to the process. A no-op once it has been reaped: the pid may belong to
    /// someone else by then, and the reaper cannot reap it while this call checks.
    pub fn signal(&self, sig: i32) -> Result<(), ProcessError> {
        let result = self
            .reaper
            .with_unreaped(self.pid, || sys::kill(self.pid, sig));
        match result {
            None => Ok(()),
            Some(result) => ignore_esrch(result).map_err(|source| ProcessError::Signal {
                target: format!("pid {}", self.pid),
                signal: sig,
                source,
            }),
        }
    }

    /// Sends `sig` to the whole process group (`kill(-pgid)`), or to the process alone when it
    /// has no group of its own.
    ///
    /// The group is still signalled after the leader exited if members were left at that
    /// moment: a pgid stays reserved while any member lives. A group that was empty when the
    /// leader was reaped is never signalled again (its number may be reused). The remaining
    /// gap, members that all exit later and whose number is recycled before this call, needs
    /// a pid wrap-around. A member that called `setsid` has left the group; killing by cgroup
    /// catches those.
    pub fn signal_group(&self, sig: i32) -> Result<(), ProcessError> {
        let Some(pgid) = self.pgid else {
            return self.signal(sig);
        };
        if self.exit.group_empty() {
            return Ok(());
        }
        // sys::kill_group refuses pgid <= 1, so this can never become kill(-1) or kill(0).
        ignore_esrch(sys::kill_group(pgid, sig)).map_err(|source| ProcessError::Signal {
            target: format!("process group {pgid}"),
            signal: sig,
            source,
        })
    }
}

fn ignore_esrch(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => Ok(()),
        other => other,
    }
}

/// Starts a process as described by `spec`; blocks the calling thread for the fork/exec
/// (about a millisecond). From async code prefer [`spawn_async`].
pub fn spawn(spec: SpawnSpec) -> Result<Child, crate::Error> {
    let reaper = reaper::install()?;
    let prepared = prepare(spec)?;
    let spawned = reaper.spawn_blocking(
        prepared.command,
        prepared.rest.process_group,
        &prepared.program,
    )?;
    Ok(finish(reaper, prepared.rest, spawned)?)
}

/// Like [`spawn`], awaiting the spawner thread instead of blocking. If the future is dropped
/// after the request was sent, the process still starts and is reaped, but its output pipes
/// are closed.
pub async fn spawn_async(spec: SpawnSpec) -> Result<Child, crate::Error> {
    let reaper = reaper::install()?;
    let prepared = prepare(spec)?;
    let spawned = reaper
        .spawn_async(
            prepared.command,
            prepared.rest.process_group,
            &prepared.program,
        )
        .await?;
    Ok(finish(reaper, prepared.rest, spawned)?)
}

/// Stops `child`: sends `signal` to its process group (or to it alone without a group), waits
/// up to `grace`, then SIGKILLs the group and waits for the exit. Once the leader is gone, any
/// members left in its group (e.g. a backgrounded job of a script) are SIGKILLed too.
///
/// Processes that left the group with `setsid` are not reached; teardown kills by cgroup
/// membership for that. Signalling failures are logged, not returned: the exit status is what
/// the caller needs, and waiting always ends because SIGKILL cannot be ignored.
pub async fn stop(child: &Child, signal: i32, grace: Duration) -> ExitStatus {
    let status = match child.try_status() {
        Some(status) => status,
        None => {
            if let Err(err) = child.signal_group(signal) {
                tracing::warn!(pid = child.pid, error = %err, "could not signal child to stop");
            }
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    tracing::debug!(
                        pid = child.pid,
                        grace_ms = grace.as_millis() as u64,
                        "grace period over, sending SIGKILL"
                    );
                    if let Err(err) = child.signal_group(libc::SIGKILL) {
                        tracing::warn!(pid = child.pid, error = %err, "could not SIGKILL child");
                    }
                    child.wait().await
                }
            }
        }
    };
    if let Some(pgid) = child.pgid
        && !child.exit.group_empty()
    {
        match sys::kill_group(pgid, libc::SIGKILL) {
            Ok(()) => tracing::debug!(pgid, "killed group members left after the leader exited"),
            Err(err) if err.raw_os_error() == Some(libc::ESRCH) => {}
            Err(err) => tracing::warn!(pgid, error = %err, "could not SIGKILL leftover group"),
        }
    }
    status
}

/// SIGKILLs every descendant of this process (found by parent pid in `/proc`), repeatedly
/// until none is left or `rounds` passes are done, and returns the pids signalled.
///
/// For teardown without cgroups (rootless on cgroup v1): stagehand is a child subreaper, so a
/// process that left its step's process group with `setsid` and lost its parent is our child
/// now, and this reaches it. Never call it while anything of ours should keep running.
pub fn kill_descendants(rounds: usize) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut killed = Vec::new();
    for _ in 0..rounds {
        let parents = proc_parents();
        let mut tree = vec![me];
        let mut found = Vec::new();
        while let Some(p) = tree.pop() {
            for (&pid, _) in parents.iter().filter(|(_, ppid)| **ppid == p) {
                found.push(pid);
                tree.push(pid);
            }
        }
        if found.is_empty() {
            break;
        }
        for pid in found {
            if sys::kill(pid, libc::SIGKILL).is_ok() && !killed.contains(&pid) {
                killed.push(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    killed
}

/// pid → parent pid of every process (threads are not listed in `/proc`).
fn proc_parents() -> std::collections::HashMap<i32, i32> {
    let mut out = std::collections::HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so read after
        // the last `)`.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse().ok());
        if let Some(ppid) = ppid {
            out.insert(pid, ppid);
        }
    }
    out
}

/// Reads `fd` (the read end of a pipe, e.g. from [`Child::take_stdout`]) until EOF and calls
/// `on_line` for each line, without the trailing `\n` (or `\r\n`).
///
/// Invalid UTF-8 is replaced with U+FFFD. A line longer than [`MAX_LINE`] bytes is delivered
/// in pieces of at most that size (split on a character boundary), so memory stays bounded
/// whatever the child writes. A last line without newline is delivered at EOF. EOF comes when
/// every writer is gone, including grandchildren that inherited the pipe.
pub async fn read_lines(fd: OwnedFd, on_line: impl FnMut(&str)) -> io::Result<()> {
    read_lines_capped(fd, MAX_LINE, on_line).await
}

async fn read_lines_capped(
    fd: OwnedFd,
    max_line: usize,
    mut on_line: impl FnMut(&str),
) -> io::Result<()> {
    let mut rx = pipe::Receiver::from_owned_fd(fd)?;
    let mut lines = LineSplitter::new(max_line);
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = rx.read(&mut buf).await?;
        if n == 0 {
            lines.finish(&mut on_line);
            return Ok(());
        }
        lines.push(&buf[..n], &mut on_line);
    }
}

/// Splits a byte stream into lines of at most `max` bytes.
struct LineSplitter {
    pending: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    fn new(max: usize) -> Self {
        // A UTF-8 character is at most 4 bytes; a smaller cap could not make progress on one.
        let max = max.max(4);
        Self {
            pending: Vec::new(),
            max,
        }
    }

    fn push(&mut self, mut data: &[u8], on_line: &mut impl FnMut(&str)) {
        while let Some(newline) = data.iter().position(|&b| b == b'\n') {
            self.append(&data[..newline], on_line);
            self.emit_all(on_line);
            data = &data[newline + 1..];
        }
        self.append(data, on_line);
    }

    fn finish(&mut self, on_line: &mut impl FnMut(&str)) {
        if !self.pending.is_empty() {
            self.emit_all(on_line);
        }
    }

    /// Appends without ever holding more than `max` bytes: full pieces are emitted early.
    fn append(&mut self, mut bytes: &[u8], on_line: &mut impl FnMut(&str)) {
        while self.pending.len() + bytes.len() > self.max {
            let room = self.max - self.pending.len();
            self.pending.extend_from_slice(&bytes[..room]);
            bytes = &bytes[room..];
            self.emit_piece(on_line);
        }
        self.pending.extend_from_slice(bytes);
    }

    /// Emits a full buffer, keeping back an incomplete UTF-8 character at its end so it is not
    /// split into two replacement characters.
    fn emit_piece(&mut self, on_line: &mut impl FnMut(&str)) {
        let cut = match std::str::from_utf8(&self.pending) {
            Err(err) if err.error_len().is_none() && err.valid_up_to() > 0 => err.valid_up_to(),
            _ => self.pending.len(),
        };
        on_line(&String::from_utf8_lossy(&self.pending[..cut]));
        self.pending.drain(..cut);
    }

    fn emit_all(&mut self, on_line: &mut impl FnMut(&str)) {
        let line = self.pending.strip_suffix(b"\r").unwrap_or(&self.pending);
        on_line(&String::from_utf8_lossy(line));
        self.pending.clear();
    }
}

/// The result of a helper command run to completion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// Runs a short helper command (git, id, ...) to completion through the reaper and collects
/// its output. `env` is the whole environment (pass `std::env::vars_os()` to inherit). A
/// non-zero exit is not an error: check [`Output::status`].
///
/// This is the replacement for `Command::output`, which must not be used in stagehand (the
/// reaper would steal its exit status).
pub fn run_output<A, S, E, K, V>(
    argv: A,
    env: E,
    cwd: impl Into<PathBuf>,
) -> Result<Output, crate::Error>
where
    A: IntoIterator<Item = S>,
    S: Into<OsString>,
    E: IntoIterator<Item = (K, V)>,
    K: Into<OsString>,
    V: Into<OsString>,
{
    output(SpawnSpec::new(argv, env, cwd))
}

/// Async form of [`run_output`].
pub async fn run_output_async<A, S, E, K, V>(
    argv: A,
    env: E,
    cwd: impl Into<PathBuf>,
) -> Result<Output, crate::Error>
where
    A: IntoIterator<Item = S>,
    S: Into<OsString>,
    E: IntoIterator<Item = (K, V)>,
    K: Into<OsString>,
    V: Into<OsString>,
{
    output_async(SpawnSpec::new(argv, env, cwd)).await
}

/// Runs `spec` to completion with stdout and stderr on pipes (overriding `spec.output`),
/// blocking the calling thread.
pub fn output(mut spec: SpawnSpec) -> Result<Output, crate::Error> {
    spec.output = OutputTarget::Pipes;
    let mut child = spawn(spec)?;
    let read = |fd: Option<OwnedFd>| -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        if let Some(fd) = fd {
            File::from(fd).read_to_end(&mut bytes)?;
        }
        Ok(bytes)
    };
    let (stdout_fd, stderr_fd) = (child.take_stdout(), child.take_stderr());
    // Both pipes must be drained at once, or a child filling one of them would block forever.
    let (stdout, stderr) = std::thread::scope(|scope| {
        let stderr = scope.spawn(|| read(stderr_fd));
        let stdout = read(stdout_fd);
        let stderr = stderr
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (stdout, stderr)
    });
    let read_error = |source| ProcessError::Read {
        program: child.program.clone(),
        source,
    };
    let stdout = stdout.map_err(read_error)?;
    let stderr = stderr.map_err(read_error)?;
    Ok(Output {
        status: child.wait_blocking(),
        stdout,
        stderr,
    })
}

/// Async form of [`output`].
pub async fn output_async(mut spec: SpawnSpec) -> Result<Output, crate::Error> {
    spec.output = OutputTarget::Pipes;
    let mut child = spawn_async(spec).await?;
    async fn read(fd: Option<OwnedFd>) -> io::Result<Vec<u8>> {
        let mut bytes = Vec::new();
        if let Some(fd) = fd {
            pipe::Receiver::from_owned_fd(fd)?
                .read_to_end(&mut bytes)
                .await?;
        }
        Ok(bytes)
    }
    let (stdout, stderr) = tokio::try_join!(read(child.take_stdout()), read(child.take_stderr()))
        .map_err(|source| ProcessError::Read {
        program: child.program.clone(),
        source,
    })?;
    Ok(Output {
        status: child.wait().await,
        stdout,
        stderr,
    })
}

/// A command ready for the spawner thread, plus what `finish` needs afterwards.
struct Prepared {
    command: Command,
    program: String,
    rest: Rest,
}

struct Rest {
    program: String,
    path: PathBuf,
    process_group: bool,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// Read end of the setup report pipe, when there is a pre-exec setup.
    report: Option<OwnedFd>,
    describe: SetupDescriptions,
}

/// Human descriptions of what each setup step acts on, for error messages.
#[derive(Default)]
struct SetupDescriptions {
    inherit: Vec<i32>,
    cgroups: Vec<String>,
    mounts: Vec<String>,
    user: Option<UserSpec>,
}

fn prepare(spec: SpawnSpec) -> Result<Prepared, ProcessError> {
    let SpawnSpec {
        argv,
        env,
        cwd,
        user,
        keep_id,
        process_group,
        parent_death_signal,
        stdin,
        output,
        cgroup_procs,
        netns,
        private_mounts,
        inherit_fds,
    } = spec;
    let Some(arg0) = argv.first() else {
        return Err(ProcessError::EmptyArgv);
    };
    let program = arg0.to_string_lossy().into_owned();
    match std::fs::metadata(&cwd) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => {
            return Err(ProcessError::Cwd {
                program,
                cwd,
                reason: "not a directory".to_owned(),
            });
        }
        Err(err) => {
            return Err(ProcessError::Cwd {
                program,
                cwd,
                reason: err.to_string(),
            });
        }
    }
    let path = resolve_executable(arg0, &env, &cwd).ok_or_else(|| ProcessError::NotFound {
        program: program.clone(),
    })?;
    let prep_err = |what: &'static str| {
        let program = program.clone();
        move |source: io::Error| ProcessError::Prepare {
            program,
            what,
            source,
        }
    };

    let mut command = Command::new(&path);
    command
        .arg0(arg0)
        .args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(&cwd);
    if process_group {
        command.process_group(0);
    }
    command.stdin(match stdin {
        Stdin::Null => Stdio::null(),
        Stdin::Fd(fd) => Stdio::from(fd),
    });

    let (mut stdout, mut stderr) = (None, None);
    match output {
        OutputTarget::Pipes => {
            let (out_r, out_w) = std::io::pipe().map_err(prep_err("stdout pipe"))?;
            let (err_r, err_w) = std::io::pipe().map_err(prep_err("stderr pipe"))?;
            command.stdout(out_w).stderr(err_w);
            stdout = Some(out_r.into());
            stderr = Some(err_r.into());
        }
        OutputTarget::Merged => {
            let (out_r, out_w) = std::io::pipe().map_err(prep_err("output pipe"))?;
            let err_w = out_w.try_clone().map_err(prep_err("output pipe"))?;
            command.stdout(out_w).stderr(err_w);
            stdout = Some(out_r.into());
        }
        OutputTarget::File(file) => {
            let err_file = file.try_clone().map_err(prep_err("output file"))?;
            command.stdout(file).stderr(err_file);
        }
        OutputTarget::Null => {
            command.stdout(Stdio::null()).stderr(Stdio::null());
        }
    }

    let needs_setup = !inherit_fds.is_empty()
        || !cgroup_procs.is_empty()
        || netns.is_some()
        || !private_mounts.is_empty()
        || user.is_some()
        || keep_id.is_some()
        || parent_death_signal.is_some();
    let mut describe = SetupDescriptions::default();
    let mut report = None;
    if needs_setup {
        // Caller descriptors must not leak into the program: close them at exec.
        for fd in inherit_fds.iter().chain(&cgroup_procs).chain(&netns) {
            nix::fcntl::fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
                .map_err(|errno| prep_err("setup descriptor")(errno.into()))?;
        }
        describe.inherit = inherit_fds.iter().map(AsRawFd::as_raw_fd).collect();
        describe.cgroups = cgroup_procs.iter().map(describe_cgroup_fd).collect();
        describe.mounts = private_mounts
            .iter()
            .map(|m| {
                format!(
                    "bind-mount {} onto {}",
                    m.src.to_string_lossy(),
                    m.dst.to_string_lossy()
                )
            })
            .collect();
        describe.user = user.clone();
        // Non-blocking, so reading an empty report after a failed spawn cannot hang.
        let (report_r, report_w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|errno| prep_err("setup report pipe")(errno.into()))?;
        report = Some(report_r);
        let setup = ChildSetup {
            inherit: inherit_fds,
            cgroup_procs,
            netns,
            mounts: private_mounts.into_iter().map(|m| (m.src, m.dst)).collect(),
            user: user.map(|u| ChildUser {
                uid: u.uid,
                gid: u.gid,
                groups: u.groups,
            }),
            keep_id: match keep_id {
                Some((uid_map, gid_map)) => Some((
                    std::ffi::CString::new(uid_map)
                        .map_err(|e| prep_err("user namespace map")(io::Error::other(e)))?,
                    std::ffi::CString::new(gid_map)
                        .map_err(|e| prep_err("user namespace map")(io::Error::other(e)))?,
                )),
                None => None,
            },
            parent_death_signal,
            parent_pid: std::process::id() as libc::pid_t,
            report: report_w,
        };
        sys::install_child_setup(&mut command, setup);
    }

    Ok(Prepared {
        command,
        program: program.clone(),
        rest: Rest {
            program,
            path,
            process_group,
            stdout,
            stderr,
            report,
            describe,
        },
    })
}

fn finish(reaper: &'static Reaper, rest: Rest, spawned: Spawned) -> Result<Child, ProcessError> {
    match spawned {
        Ok((pid, exit)) => Ok(Child {
            pid,
            pgid: rest.process_group.then_some(pid),
            program: rest.program,
            exit,
            reaper,
            stdout: rest.stdout,
            stderr: rest.stderr,
        }),
        Err(source) => {
            // The child writes [stage, index] just before failing its setup; nothing there
            // means fork or exec itself failed.
            let mut buf = [0u8; 2];
            let stage = match rest.report.map(File::from) {
                Some(mut report) => match report.read(&mut buf) {
                    Ok(2) => SetupStage::from_byte(buf[0]).map(|s| (s, usize::from(buf[1]))),
                    _ => None,
                },
                None => None,
            };
            Err(match stage {
                Some((stage, index)) => ProcessError::Setup {
                    what: describe_stage(&rest.describe, stage, index),
                    program: rest.program,
                    source,
                },
                None => ProcessError::Spawn {
                    program: rest.program,
                    path: rest.path,
                    source,
                },
            })
        }
    }
}

fn describe_stage(describe: &SetupDescriptions, stage: SetupStage, index: usize) -> String {
    let user = describe.user.as_ref();
    match stage {
        SetupStage::Cgroup => describe
            .cgroups
            .get(index)
            .cloned()
            .unwrap_or_else(|| "move into a cgroup".to_owned()),
        SetupStage::Netns => "join network namespace".to_owned(),
        SetupStage::UnshareMounts => "create a private mount namespace".to_owned(),
        SetupStage::MountPropagation => "make / a recursive slave mount".to_owned(),
        SetupStage::BindMount => describe
            .mounts
            .get(index)
            .cloned()
            .unwrap_or_else(|| "bind-mount".to_owned()),
        SetupStage::Setgroups => {
            format!("set supplementary groups {:?}", user.map(|u| &u.groups))
        }
        SetupStage::Setgid => format!("switch to gid {}", user.map_or(0, |u| u.gid)),
        SetupStage::Setuid => format!("switch to uid {}", user.map_or(0, |u| u.uid)),
        SetupStage::ParentDeathSignal => "set the parent-death signal".to_owned(),
        SetupStage::ParentGone => "stagehand exited while the child was starting".to_owned(),
        SetupStage::InheritFd => format!(
            "pass descriptor {}",
            describe.inherit.get(index).copied().unwrap_or(-1)
        ),
        SetupStage::UserNamespace => match index {
            0 => "create a user namespace".to_owned(),
            1 => "deny setgroups in the user namespace".to_owned(),
            2 => "write the user namespace's uid map".to_owned(),
            _ => "write the user namespace's gid map".to_owned(),
        },
    }
}

/// "move into cgroup /sys/fs/cgroup/pids/x" from an open `.../x/cgroup.procs` descriptor.
fn describe_cgroup_fd(fd: &OwnedFd) -> String {
    match std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        Ok(path) => {
            let dir = path.parent().unwrap_or(&path);
            format!("move into cgroup {}", dir.display())
        }
        Err(_) => format!("move into cgroup (fd {})", fd.as_raw_fd()),
    }
}

/// Finds `program` like execvp would in the child: relative to `cwd` if it contains a `/`,
/// else in the child's `PATH` (empty entries mean `cwd`, as in glibc).
fn resolve_executable(
    program: &OsStr,
    env: &[(OsString, OsString)],
    cwd: &Path,
) -> Option<PathBuf> {
    let bytes = program.as_bytes();
    if bytes.is_empty() {
        return None;
    }
    if bytes.contains(&b'/') {
        let path = cwd.join(program);
        return is_executable_file(&path).then_some(path);
    }
    // The last PATH wins, as with std's Command::envs.
    let search = env
        .iter()
        .rev()
        .find(|(key, _)| key == "PATH")
        .map_or(OsStr::new(DEFAULT_PATH), |(_, value)| value.as_os_str());
    search
        .as_bytes()
        .split(|&b| b == b':')
        .map(|dir| cwd.join(OsStr::from_bytes(dir)).join(program))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::io::Write;
    use std::time::Instant;
    use tokio::sync::mpsc;

    const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

    fn spec(argv: &[&str]) -> SpawnSpec {
        SpawnSpec::new(argv.iter().copied(), [("PATH", PATH)], "/")
    }

    fn sh(script: &str) -> SpawnSpec {
        spec(&["sh", "-c", script])
    }

    fn assert_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (CI runs as root)"
        );
    }

    /// Streams a child's lines into a channel, so a test can react to them while it runs.
    fn line_channel(fd: OwnedFd) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            read_lines(fd, |line| {
                let _ = tx.send(line.to_owned());
            })
            .await
            .unwrap();
        });
        rx
    }

    async fn collect_lines(fd: OwnedFd) -> Vec<String> {
        let mut lines = Vec::new();
        read_lines(fd, |line| lines.push(line.to_owned()))
            .await
            .unwrap();
        lines
    }

    /// State letter from /proc/<pid>/stat, or None once the pid is gone.
    fn proc_state(pid: i32) -> Option<char> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The state follows the parenthesised comm, which may itself contain spaces.
        stat.rsplit_once(") ")?.1.chars().next()
    }

    fn proc_ppid(pid: i32) -> Option<i32> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until `pid` no longer exists (killed and reaped, so no zombie either).
    async fn assert_gone_soon(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match proc_state(pid) {
                None => return,
                Some(state) if Instant::now() > deadline => {
                    panic!("pid {pid} still present in state {state}")
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    #[test]
    fn exit_status_codes_and_display() {
        let exited = ExitStatus {
            code: Some(3),
            signal: None,
        };
        assert_eq!(exited.exit_code(), 3);
        assert!(!exited.success());
        assert_eq!(exited.to_string(), "exit code 3");
        let killed = ExitStatus {
            code: None,
            signal: Some(libc::SIGKILL),
        };
        assert_eq!(killed.exit_code(), 137);
        assert_eq!(killed.to_string(), "killed by SIGKILL");
        assert_eq!(
            signal_name(libc::SIGRTMIN() + 2),
            format!("signal {}", libc::SIGRTMIN() + 2)
        );
        // Raw wait statuses: exit 0 is 0x0000, killed by SIGTERM is 0x000f.
        assert!(ExitStatus::from_wait_status(0).success());
        assert_eq!(
            ExitStatus::from_wait_status(libc::SIGTERM).signal,
            Some(libc::SIGTERM)
        );
        assert_eq!(ExitStatus::from_wait_status(2 << 8).code, Some(2));
    }

    #[test]
    fn resolve_executable_uses_the_child_path_and_cwd() {
        let env = vec![(OsString::from("PATH"), OsString::from("/nonexistent:/bin"))];
        assert_eq!(
            resolve_executable(OsStr::new("sh"), &env, Path::new("/")),
            Some(PathBuf::from("/bin/sh"))
        );
        assert_eq!(
            resolve_executable(OsStr::new("stagehand-no-such-exe"), &env, Path::new("/")),
            None
        );
        // With a slash: relative to cwd, never searched.
        assert_eq!(
            resolve_executable(OsStr::new("./sh"), &env, Path::new("/bin")),
            Some(PathBuf::from("/bin/./sh"))
        );
        // Directories and non-executable files are not executables.
        assert_eq!(
            resolve_executable(OsStr::new("/tmp"), &env, Path::new("/")),
            None
        );
        let plain = tempfile::Builder::new()
            .prefix("stagehand-plain")
            .tempfile()
            .unwrap();
        std::fs::set_permissions(plain.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            resolve_executable(plain.path().as_os_str(), &env, Path::new("/")),
            None
        );
        // No PATH in the child: the default applies.
        assert!(resolve_executable(OsStr::new("sh"), &[], Path::new("/")).is_some());
    }

    #[test]
    fn line_splitter_handles_crlf_invalid_utf8_and_long_lines() {
        let mut lines = Vec::new();
        let mut on_line = |l: &str| lines.push(l.to_owned());
        let mut splitter = LineSplitter::new(8);
        splitter.push(b"ab\r\ncaf\xe9\n", &mut on_line);
        splitter.push(b"0123456789abcdefghij", &mut on_line);
        splitter.push(b"\nx\xc3", &mut on_line);
        splitter.push(b"\xa9\ntail", &mut on_line);
        splitter.finish(&mut on_line);
        assert_eq!(
            lines,
            [
                "ab",
                "caf\u{fffd}",
                "01234567",
                "89abcdef",
                "ghij",
                "xé",
                "tail"
            ]
        );
    }

    #[test]
    fn line_splitter_keeps_a_character_whole_at_the_cap() {
        let mut lines = Vec::new();
        let mut on_line = |l: &str| lines.push(l.to_owned());
        let mut splitter = LineSplitter::new(8);
        // "é" is 2 bytes at offsets 7..9: it must not be cut in half.
        splitter.push("abcdefgé12\n".as_bytes(), &mut on_line);
        assert_eq!(lines, ["abcdefg", "é12"]);
        assert!(lines.iter().all(|l| !l.contains('\u{fffd}')));
    }

    #[tokio::test]
    async fn read_lines_bounds_very_long_lines() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let writer = std::thread::spawn(move || {
            writer.write_all(&vec![b'x'; 3 * MAX_LINE + 10]).unwrap();
            writer.write_all(b"\nlast").unwrap();
        });
        let mut sizes = Vec::new();
        read_lines(reader.into(), |l| sizes.push(l.len()))
            .await
            .unwrap();
        writer.join().unwrap();
        assert_eq!(sizes, [MAX_LINE, MAX_LINE, MAX_LINE, 10, 4]);
    }

    #[tokio::test]
    async fn spawn_reads_stdout_and_stderr_lines() {
        let mut child = spawn(sh("printf 'one\\ntwo\\n'; echo oops >&2; exit 3")).unwrap();
        let (out, err) = tokio::join!(
            collect_lines(child.take_stdout().unwrap()),
            collect_lines(child.take_stderr().unwrap())
        );
        assert_eq!(out, ["one", "two"]);
        assert_eq!(err, ["oops"]);
        let status = child.wait().await;
        assert_eq!(status.code, Some(3));
        assert_eq!(status.to_string(), "exit code 3");
    }

    #[tokio::test]
    async fn merged_output_keeps_order_and_file_output_gets_both() {
        let mut merged = sh("echo a; echo b >&2; echo c");
        merged.output = OutputTarget::Merged;
        let mut child = spawn_async(merged).await.unwrap();
        assert!(child.take_stderr().is_none());
        assert_eq!(
            collect_lines(child.take_stdout().unwrap()).await,
            ["a", "b", "c"]
        );
        assert!(child.wait().await.success());

        let log = tempfile::Builder::new()
            .prefix("stagehand-log")
            .tempfile()
            .unwrap();
        let mut to_file = sh("echo out; echo err >&2");
        to_file.output = OutputTarget::File(log.reopen().unwrap());
        let child = spawn_async(to_file).await.unwrap();
        assert!(child.wait().await.success());
        assert_eq!(std::fs::read_to_string(log.path()).unwrap(), "out\nerr\n");
    }

    #[tokio::test]
    async fn stdin_fd_feeds_the_child() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        writer.write_all(b"from stdin\n").unwrap();
        drop(writer);
        let mut cat = spec(&["cat"]);
        cat.stdin = Stdin::Fd(reader.into());
        let mut child = spawn_async(cat).await.unwrap();
        assert_eq!(
            collect_lines(child.take_stdout().unwrap()).await,
            ["from stdin"]
        );
        assert!(child.wait().await.success());
    }

    #[tokio::test]
    async fn wait_works_from_many_places_and_after_exit() {
        let child = spawn(sh("exit 7")).unwrap();
        let (a, b) = tokio::join!(child.wait(), child.wait());
        assert_eq!(a, b);
        assert_eq!(child.wait().await.code, Some(7));
        assert_eq!(child.try_status(), Some(a));
        assert_eq!(child.wait_blocking(), a);
        // Signalling a reaped child is a harmless no-op.
        child.signal(libc::SIGKILL).unwrap();
    }

    #[tokio::test]
    async fn killed_by_signal_reports_128_plus_n() {
        let child = spawn(sh("kill -KILL $$")).unwrap();
        let status = child.wait().await;
        assert_eq!(status.signal, Some(libc::SIGKILL));
        assert_eq!(status.code, None);
        assert_eq!(status.exit_code(), 137);
        assert_eq!(status.to_string(), "killed by SIGKILL");

        let mut sleeper = spawn(spec(&["sleep", "100"])).unwrap();
        drop(sleeper.take_stdout());
        assert_eq!(sleeper.try_status(), None);
        sleeper.signal(libc::SIGTERM).unwrap();
        assert_eq!(sleeper.wait().await.exit_code(), 143);
    }

    #[tokio::test]
    async fn missing_executable_is_named() {
        let err = spawn(spec(&["stagehand-no-such-exe", "--version"])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "executable not found: stagehand-no-such-exe"
        );
        let err = spawn_async(spec(&["./stagehand-nope"])).await.unwrap_err();
        assert_eq!(err.to_string(), "executable not found: ./stagehand-nope");
        let err = spawn(SpawnSpec::new(
            ["true"],
            [("PATH", PATH)],
            "/stagehand-no-such-dir",
        ))
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "working directory of true is not usable: /stagehand-no-such-dir: \
             No such file or directory (os error 2)"
        );
        assert!(matches!(
            spawn(SpawnSpec::new(
                Vec::<OsString>::new(),
                [("PATH", PATH)],
                "/"
            )),
            Err(crate::Error::Process(ProcessError::EmptyArgv))
        ));
    }

    #[tokio::test]
    async fn env_is_exactly_what_was_given() {
        let env = [("PATH", "/usr/bin:/bin"), ("STAGEHAND_TEST_VAR", "a b=c")];
        let out = run_output_async(["env"], env, "/").await.unwrap();
        assert!(out.status.success());
        let got: BTreeSet<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect();
        let want: BTreeSet<String> = ["PATH=/usr/bin:/bin", "STAGEHAND_TEST_VAR=a b=c"]
            .into_iter()
            .map(str::to_owned)
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn run_output_collects_both_streams_and_status() {
        let out = run_output(
            ["sh", "-c", "echo out; echo err >&2; exit 2"],
            [("PATH", PATH)],
            "/tmp",
        )
        .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
        assert_eq!(out.status.code, Some(2));
        let pwd = run_output(["pwd"], [("PATH", PATH)], "/tmp").unwrap();
        assert_eq!(pwd.stdout, b"/tmp\n");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_spawns_all_deliver_statuses() {
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                tokio::spawn(async move {
                    let mut s = if i % 2 == 0 {
                        spec(&["true"])
                    } else {
                        sh(&format!("exit {}", i % 50))
                    };
                    s.output = OutputTarget::Null;
                    let child = spawn_async(s).await.unwrap();
                    (i, child.wait().await)
                })
            })
            .collect();
        for task in tasks {
            let (i, status) = task.await.unwrap();
            let want = if i % 2 == 0 { 0 } else { i % 50 };
            assert_eq!(status.code, Some(want), "child {i}");
        }
    }

    #[tokio::test]
    async fn stop_kills_the_process_group_including_a_background_grandchild() {
        let mut s = sh("sleep 100 & echo $!; wait");
        s.process_group = true;
        let mut child = spawn_async(s).await.unwrap();
        assert_eq!(child.pgid(), Some(child.pid()));
        let mut lines = line_channel(child.take_stdout().unwrap());
        let grandchild: i32 = lines.recv().await.unwrap().parse().unwrap();
        assert!(proc_state(grandchild).is_some());
        let status = stop(&child, libc::SIGTERM, Duration::from_secs(5)).await;
        assert_eq!(status.signal, Some(libc::SIGTERM));
        assert_eq!(status.exit_code(), 143);
        assert_gone_soon(grandchild).await;
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_when_term_is_ignored() {
        let mut s = sh("trap '' TERM; sleep 100 & echo $!; wait");
        s.process_group = true;
        let mut child = spawn_async(s).await.unwrap();
        let mut lines = line_channel(child.take_stdout().unwrap());
        let grandchild: i32 = lines.recv().await.unwrap().parse().unwrap();
        let started = Instant::now();
        let status = stop(&child, libc::SIGTERM, Duration::from_millis(300)).await;
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(status.signal, Some(libc::SIGKILL));
        assert_gone_soon(grandchild).await;
    }

    #[tokio::test]
    async fn stop_kills_group_members_left_after_the_leader_exited() {
        let mut s = sh("sleep 100 & echo $!");
        s.process_group = true;
        let mut child = spawn_async(s).await.unwrap();
        let mut lines = line_channel(child.take_stdout().unwrap());
        let grandchild: i32 = lines.recv().await.unwrap().parse().unwrap();
        assert!(child.wait().await.success());
        assert!(
            proc_state(grandchild).is_some(),
            "background sleep should outlive sh"
        );
        let status = stop(&child, libc::SIGTERM, Duration::from_secs(1)).await;
        assert!(status.success());
        assert_gone_soon(grandchild).await;
    }

    #[tokio::test]
    async fn inherited_fd_keeps_its_number_in_the_child_only() {
        let (reader, writer) = std::io::pipe().unwrap();
        let writer: OwnedFd = writer.into();
        let n = writer.as_raw_fd();
        // dash only parses single-digit `>&N`; the /proc path reaches any descriptor number.
        let mut s = sh(&format!("echo ready > /proc/self/fd/{n}"));
        s.inherit_fds = vec![writer];
        let child = spawn_async(s).await.unwrap();
        // The parent's write end is gone with the spec, so EOF comes when the child exits.
        assert_eq!(collect_lines(reader.into()).await, ["ready"]);
        assert!(child.wait().await.success());

        // Without inherit_fds the same kind of descriptor is closed at exec.
        let (reader, writer) = std::io::pipe().unwrap();
        let n = writer.as_raw_fd();
        let out = run_output_async(
            ["sh", "-c", &format!("echo leak > /proc/self/fd/{n}")],
            [("PATH", PATH)],
            "/",
        )
        .await
        .unwrap();
        drop(writer);
        assert!(!out.status.success(), "fd {n} leaked into the child");
        assert!(collect_lines(reader.into()).await.is_empty());
    }

    #[tokio::test]
    async fn an_empty_group_is_not_signalled_after_the_leader_exits() {
        let mut s = sh("exit 0");
        s.process_group = true;
        let child = spawn_async(s).await.unwrap();
        assert!(child.wait().await.success());
        assert!(child.exit.group_empty());
        child.signal_group(libc::SIGKILL).unwrap();
        assert!(
            stop(&child, libc::SIGTERM, Duration::from_secs(1))
                .await
                .success()
        );
    }

    #[tokio::test]
    async fn double_forked_orphans_are_reparented_to_us_and_reaped() {
        let reaper = reaper::install().unwrap();
        let before = reaper.orphans_reaped();
        let mut s = sh("(sleep 1 & echo $!); exit 0");
        s.output = OutputTarget::Merged;
        let mut child = spawn_async(s).await.unwrap();
        let mut lines = line_channel(child.take_stdout().unwrap());
        let pid: i32 = lines.recv().await.unwrap().parse().unwrap();
        assert!(child.wait().await.success());
        // Its parent subshell is gone: as the child subreaper we are its parent now.
        let deadline = Instant::now() + Duration::from_secs(2);
        while proc_ppid(pid) != Some(std::process::id() as i32) {
            assert!(
                Instant::now() < deadline,
                "orphan {pid} not reparented to us"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Once it exits, the reaper reaps it: no zombie stays behind.
        assert_gone_soon(pid).await;
        assert!(reaper.orphans_reaped() > before);
    }

    #[tokio::test]
    async fn parent_death_signal_is_armed_on_the_long_lived_spawner_thread() {
        // Spawned from a thread that exits at once: had that thread forked, the pdeathsig would
        // fire when it exits and the child would die of SIGKILL.
        let mut s = spec(&["sleep", "0.3"]);
        s.parent_death_signal = Some(libc::SIGKILL);
        let child = std::thread::spawn(move || spawn(s).unwrap())
            .join()
            .unwrap();
        assert_eq!(child.wait().await.code, Some(0));
    }

    #[tokio::test]
    async fn user_switch_sets_uid_gid_and_groups() {
        assert_root();
        let mut s = sh("id -u; id -g; id -G");
        s.user = Some(UserSpec {
            uid: 65534,
            gid: 65534,
            groups: vec![65534, 100],
        });
        let mut child = spawn_async(s).await.unwrap();
        let lines = collect_lines(child.take_stdout().unwrap()).await;
        assert!(child.wait().await.success());
        assert_eq!(lines, ["65534", "65534", "65534 100"]);
    }

    #[tokio::test]
    async fn private_mounts_show_a_file_only_to_the_child() {
        assert_root();
        let mut hosts = tempfile::Builder::new()
            .prefix("stagehand-hosts")
            .tempfile()
            .unwrap();
        hosts
            .write_all(b"10.0.0.9 stagehand-private-host\n")
            .unwrap();
        let host_before = std::fs::read("/etc/hosts").unwrap();
        let mounts_before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();

        let mut s = spec(&["cat", "/etc/hosts"]);
        s.private_mounts = vec![BindMount::new(hosts.path(), "/etc/hosts").unwrap()];
        let mut child = spawn_async(s).await.unwrap();
        let lines = collect_lines(child.take_stdout().unwrap()).await;
        assert!(child.wait().await.success());
        assert_eq!(lines, ["10.0.0.9 stagehand-private-host"]);

        assert_eq!(std::fs::read("/etc/hosts").unwrap(), host_before);
        let mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(
            mounts_before, mounts_after,
            "the bind mount leaked to the host"
        );
    }

    #[tokio::test]
    async fn bind_mount_failure_names_the_mount() {
        assert_root();
        let mut s = spec(&["true"]);
        s.private_mounts = vec![BindMount::new("/stagehand-no-such-src", "/etc/hosts").unwrap()];
        let err = spawn_async(s).await.unwrap_err().to_string();
        assert!(
            err.starts_with("start true: bind-mount /stagehand-no-such-src onto /etc/hosts: "),
            "{err}"
        );
    }

    #[tokio::test]
    async fn netns_joins_the_given_namespace() {
        assert_root();
        let own = std::fs::read_link("/proc/self/ns/net").unwrap();
        // A process holding a fresh netns; it prints its netns once it is inside.
        let mut holder = spec(&[
            "unshare",
            "-n",
            "sh",
            "-c",
            "readlink /proc/self/ns/net; exec sleep 30",
        ]);
        holder.process_group = true;
        let mut holder = spawn_async(holder).await.unwrap();
        let mut lines = line_channel(holder.take_stdout().unwrap());
        let fresh = lines.recv().await.unwrap();
        assert_ne!(PathBuf::from(&fresh), own);
        let netns: OwnedFd = File::open(format!("/proc/{}/ns/net", holder.pid()))
            .unwrap()
            .into();

        let mut s = spec(&["readlink", "/proc/self/ns/net"]);
        s.netns = Some(netns);
        let mut child = spawn_async(s).await.unwrap();
        let got = collect_lines(child.take_stdout().unwrap()).await;
        assert!(child.wait().await.success());
        stop(&holder, libc::SIGKILL, Duration::from_secs(1)).await;
        assert_eq!(got, [fresh]);
    }

    #[tokio::test]
    async fn setup_failures_name_the_step_that_failed() {
        // Not a namespace file: setns fails with EINVAL.
        let mut s = spec(&["true"]);
        s.netns = Some(File::open("/proc/self/stat").unwrap().into());
        let err = spawn_async(s).await.unwrap_err().to_string();
        assert!(
            err.starts_with("start true: join network namespace: "),
            "{err}"
        );

        // A cgroup file opened read-only: the pid write fails with EBADF.
        let dir = tempfile::Builder::new()
            .prefix("stagehand-cg")
            .tempdir()
            .unwrap();
        let procs = dir.path().join("cgroup.procs");
        std::fs::write(&procs, "").unwrap();
        let mut s = spec(&["true"]);
        s.cgroup_procs = vec![File::open(&procs).unwrap().into()];
        let err = spawn_async(s).await.unwrap_err().to_string();
        let want = format!("start true: move into cgroup {}: ", dir.path().display());
        assert!(err.starts_with(&want), "{err}");
    }

    /// Regression guard for the reaper design: std's `spawn` reaps a child whose setup failed
    /// by itself, so the reaper must never steal it (std would panic in the spawner thread).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_spawns_racing_with_exits_keep_the_spawner_alive() {
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                tokio::spawn(async move {
                    let mut s = spec(&["true"]);
                    s.output = OutputTarget::Null;
                    if i % 2 == 0 {
                        s.netns = Some(File::open("/proc/self/stat").unwrap().into());
                        let err = spawn_async(s).await.unwrap_err().to_string();
                        assert!(err.contains("join network namespace"), "{err}");
                    } else {
                        assert!(spawn_async(s).await.unwrap().wait().await.success());
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let child = spawn_async(spec(&["true"])).await.unwrap();
        assert!(child.wait().await.success());
    }

    /// A cgroup directory that is removed again, also when the test fails.
    struct CgroupDir(PathBuf);

    impl Drop for CgroupDir {
        fn drop(&mut self) {
            // The child may take a moment to leave after being reaped.
            for _ in 0..50 {
                if std::fs::remove_dir(&self.0).is_ok() || !self.0.exists() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("could not remove {}", self.0.display());
        }
    }

    #[tokio::test]
    async fn child_starts_inside_its_cgroups() {
        assert_root();
        let name = format!("stagehand-test-{}", std::process::id());
        // v1 (hybrid hosts like CI) and/or v2, whichever this host has.
        let mut roots = vec![];
        for v1 in ["/sys/fs/cgroup/pids"] {
            if Path::new(v1).join("cgroup.procs").exists() {
                roots.push((PathBuf::from(v1), false));
            }
        }
        for v2 in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            if Path::new(v2).join("cgroup.subtree_control").exists() {
                roots.push((PathBuf::from(v2), true));
                break;
            }
        }
        assert!(
            !roots.is_empty(),
            "no cgroup hierarchy found under /sys/fs/cgroup"
        );
        let mut guards = vec![];
        let mut fds = vec![];
        for (root, _) in &roots {
            let dir = root.join(&name);
            std::fs::create_dir(&dir).unwrap();
            guards.push(CgroupDir(dir.clone()));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .unwrap();
            fds.push(OwnedFd::from(file));
        }
        let mut s = spec(&["cat", "/proc/self/cgroup"]);
        s.cgroup_procs = fds;
        let mut child = spawn_async(s).await.unwrap();
        let lines = collect_lines(child.take_stdout().unwrap()).await;
        assert!(child.wait().await.success());
        for (root, v2) in &roots {
            let want_suffix = format!(":/{name}");
            let found = lines.iter().any(|line| {
                let controller = root.file_name().unwrap().to_string_lossy();
                line.ends_with(&want_suffix)
                    && if *v2 {
                        line.starts_with("0::")
                    } else {
                        line.split(':')
                            .nth(1)
                            .unwrap_or("")
                            .split(',')
                            .any(|c| c == controller)
                    }
            });
            assert!(found, "not in {}/{name}: {lines:?}", root.display());
        }
        drop(guards);
    }
}
