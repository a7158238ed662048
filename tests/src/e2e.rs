//! Running the built `stagehand` binary as a user would, and checking what it leaves behind.
//!
//! Owns: per-test temp workspaces tagged with a unique marker, starting `stagehand` with a
//! timeout and capturing its stdout/stderr/exit status, a guard that never lets a stagehand
//! (or anything it started) outlive a failing test, leak checks (no process left whose command
//! line, environment or working directory carries the test's marker), listening-port checks
//! from `/proc/net/tcp*`, and removing the run directory stagehand reports (`logs: DIR`).
//! Does not own: locating or building the binary ([`crate::bin_path`]), or what a suite
//! asserts about stagehand's output.
//!
//! Why a marker finds everything: the marker is in the workspace path (every step's working
//! directory, and PostgreSQL's PGDATA, which it `chdir`s into) and in an environment variable
//! of stagehand, which host steps inherit. So a leftover `sleep` started by a step script is
//! found even though its own argv says nothing about the test.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::bin_path::{stagehand_bin, workspace_root};

/// The environment variable that carries the marker into stagehand and, by inheritance, into
/// every host step.
pub const MARKER_ENV: &str = "STAGEHAND_E2E_MARKER";

/// Set to a user name to start every stagehand of a suite as that ordinary user (the rootless
/// rerun of the suites: see [`crate::rootless`]); the test itself still runs as root.
pub const AS_USER_ENV: &str = "STAGEHAND_E2E_AS_USER";

/// Whether this run of the suites starts stagehand as an ordinary user.
pub fn rootless_rerun() -> bool {
    std::env::var_os(AS_USER_ENV).is_some_and(|v| !v.is_empty())
}

/// How long a single stagehand run may take before the test gives up on it.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(25);

/// How long a leak check waits for processes that are already dying (a SIGKILLed group
/// member is not gone the instant its leader has been reaped).
pub const LEAK_GRACE: Duration = Duration::from_secs(3);

/// After a failed test: how long stagehand gets to tear its stage down after SIGTERM before
/// it is SIGKILLed.
const GUARD_GRACE: Duration = Duration::from_secs(15);

/// The `tests/` directory of the workspace.
pub fn tests_dir() -> PathBuf {
    workspace_root().join("tests")
}

/// A pipeline file from `tests/pipelines`.
pub fn pipeline(name: &str) -> PathBuf {
    let p = tests_dir().join("pipelines").join(name);
    assert!(p.is_file(), "no pipeline {}", p.display());
    p
}

/// `tests/fixtures`: scripts that steps find on PATH.
pub fn fixtures_dir() -> PathBuf {
    tests_dir().join("fixtures")
}

/// A token unique to this test (pid, time, counter), safe in paths, argv and env values.
pub fn unique_marker() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "stagehand-e2e-{}-{:x}-{}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff,
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// A temp directory used as the stage workspace, named after the test's marker.
///
/// Dropping it first SIGKILLs (by pid) any process still carrying the marker, so a test that
/// fails before its own leak check still leaves nothing running, then removes the directory.
pub struct Workspace {
    marker: String,
    dir: Option<tempfile::TempDir>,
    /// stagehand's state for this test (`STAGEHAND_ROOT`: run counters, and the image store
    /// of a run not given `--root`), so no run writes to /var/lib/stagehand.
    state: Option<tempfile::TempDir>,
}

impl Workspace {
    /// A new workspace under the system temp dir, with a fresh marker.
    pub fn new() -> Workspace {
        let marker = unique_marker();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{marker}-ws-"))
            .tempdir()
            .expect("create a temp workspace");
        let state = tempfile::Builder::new()
            .prefix(&format!("{marker}-state-"))
            .tempdir()
            .expect("create a temp state dir");
        if rootless_rerun() {
            crate::rootless::user().own(dir.path());
            crate::rootless::user().own(state.path());
        }
        Workspace {
            marker,
            dir: Some(dir),
            state: Some(state),
        }
    }

    /// stagehand's state directory for this test (`STAGEHAND_ROOT` of its runs).
    pub fn state(&self) -> &Path {
        self.state
            .as_ref()
            .expect("state dir exists until dropped")
            .path()
    }

    /// The workspace directory.
    pub fn path(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("workspace exists until dropped")
            .path()
    }

    /// The marker of this test.
    pub fn marker(&self) -> &str {
        &self.marker
    }

    /// Let steps with `runAsUser` (e.g. PostgreSQL as `postgres`) create files in it: a temp
    /// dir is created 0700 and owned by root.
    pub fn open_to_all_users(&self) {
        std::fs::set_permissions(self.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod the workspace");
    }

    /// A stagehand command line `run PIPELINE --workspace WS`, carrying the marker.
    pub fn stagehand_run(&self, pipeline_file: &Path) -> StagehandCmd {
        StagehandCmd::new(&self.marker)
            .arg("run")
            .arg(pipeline_file)
            .arg("--workspace")
            .arg(self.path())
            .env("STAGEHAND_ROOT", self.state())
    }
}

impl Default for Workspace {
    fn default() -> Self {
        Workspace::new()
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        kill_marked(&self.marker);
        for d in [self.dir.take(), self.state.take()].into_iter().flatten() {
            let path = d.path().to_path_buf();
            if let Err(e) = d.close() {
                eprintln!("e2e: could not remove {}: {e}", path.display());
            }
        }
    }
}

/// A stagehand invocation being put together.
pub struct StagehandCmd {
    marker: String,
    args: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    /// Run as another user: the wrapper argv (e.g. `setpriv --reuid ...`), the binary to run
    /// and the working directory (see [`StagehandCmd::via`]).
    via: Option<(Vec<OsString>, PathBuf, PathBuf)>,
}

impl StagehandCmd {
    /// A bare stagehand command for `marker`; [`Workspace::stagehand_run`] is the usual start.
    pub fn new(marker: &str) -> StagehandCmd {
        StagehandCmd {
            marker: marker.to_string(),
            args: Vec::new(),
            envs: Vec::new(),
            via: None,
        }
    }

    /// Start `bin` through `wrapper` (which execs it, keeping the pid: `setpriv`), in `cwd`,
    /// instead of the workspace's binary in `tests/`: how the rootless suite runs stagehand
    /// as an ordinary user who cannot read the checkout.
    pub fn via(mut self, wrapper: Vec<OsString>, bin: PathBuf, cwd: PathBuf) -> Self {
        self.via = Some((wrapper, bin, cwd));
        self
    }

    /// Append one argument.
    pub fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.args.push(a.as_ref().to_os_string());
        self
    }

    /// Rewrite every argument with `f` (e.g. paths into readable copies).
    pub fn map_args(mut self, f: impl Fn(&OsStr) -> OsString) -> Self {
        self.args = self.args.iter().map(|a| f(a)).collect();
        self
    }

    /// Set an environment variable for stagehand (and so for every host step).
    pub fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.envs
            .push((k.as_ref().to_os_string(), v.as_ref().to_os_string()));
        self
    }

    /// Start stagehand with stdout/stderr captured, stdin closed, `tests/fixtures` first on
    /// PATH and the marker in its environment.
    pub fn spawn(mut self) -> Running {
        if self.via.is_none() && rootless_rerun() {
            self = crate::rootless::user().wrap(self);
        }
        let bin = stagehand_bin();
        let fixtures = if rootless_rerun() {
            crate::rootless::readable(&fixtures_dir())
        } else {
            fixtures_dir()
        };
        let path = match std::env::var_os("PATH") {
            Some(p) => {
                let mut v = fixtures.clone().into_os_string();
                v.push(":");
                v.push(p);
                v
            }
            None => fixtures.into_os_string(),
        };
        let (mut cmd, cwd) = match &self.via {
            Some((wrapper, bin, cwd)) => {
                let mut c = std::process::Command::new(&wrapper[0]);
                c.args(&wrapper[1..]).arg(bin);
                (c, cwd.clone())
            }
            None => (std::process::Command::new(&bin), tests_dir()),
        };
        cmd.args(&self.args)
            .env("PATH", path)
            .env(MARKER_ENV, &self.marker)
            .env("NO_COLOR", "1")
            .env_remove("STAGEHAND_LOG")
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let stdout = Captured::reader(child.stdout.take().expect("stdout is piped"));
        let stderr = Captured::reader(child.stderr.take().expect("stderr is piped"));
        Running {
            child: Some(child),
            stdout,
            stderr,
            started: Instant::now(),
            marker: self.marker,
            args: self.args,
        }
    }

    /// Run to completion within [`RUN_TIMEOUT`].
    pub fn output(self) -> Finished {
        self.spawn().wait(RUN_TIMEOUT)
    }
}

/// Output collected from a pipe by a reader thread.
struct Captured {
    state: Mutex<(Vec<u8>, bool)>,
    changed: Condvar,
}

impl Captured {
    fn reader(mut pipe: impl Read + Send + 'static) -> Arc<Captured> {
        let c = Arc::new(Captured {
            state: Mutex::new((Vec::new(), false)),
            changed: Condvar::new(),
        });
        let c2 = c.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                let n = pipe.read(&mut buf).unwrap_or(0);
                let mut st = c2.state.lock().unwrap_or_else(|e| e.into_inner());
                if n == 0 {
                    st.1 = true;
                    c2.changed.notify_all();
                    return;
                }
                st.0.extend_from_slice(&buf[..n]);
                c2.changed.notify_all();
            }
        });
        c
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.state.lock().unwrap_or_else(|e| e.into_inner()).0)
            .into_owned()
    }

    /// Wait until the text satisfies `pred`, EOF, or the deadline; true if `pred` held.
    fn wait_for(&self, deadline: Instant, pred: impl Fn(&str) -> bool) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if pred(&String::from_utf8_lossy(&st.0)) {
                return true;
            }
            let now = Instant::now();
            if st.1 || now >= deadline {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn wait_eof(&self, deadline: Instant) {
        self.wait_for(deadline, |_| false);
    }
}

/// A running stagehand. Dropping it without [`Running::wait`] (a failing test) stops it:
/// SIGTERM so it tears its stage down, SIGKILL after a grace period, then SIGKILL for
/// anything left carrying the marker.
pub struct Running {
    child: Option<Child>,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
    started: Instant,
    marker: String,
    args: Vec<OsString>,
}

impl Running {
    /// stagehand's pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).expect("running")
    }

    /// Stdout so far.
    pub fn stdout(&self) -> String {
        self.stdout.text()
    }

    /// Wait until stdout contains `needle`. Panics (stopping stagehand) after `timeout`.
    pub fn wait_for_stdout(&self, needle: &str, timeout: Duration) {
        if !self
            .stdout
            .wait_for(Instant::now() + timeout, |s| s.contains(needle))
        {
            panic!(
                "stagehand did not print {needle:?} within {timeout:?}\n--- stdout:\n{}\n--- stderr:\n{}",
                self.stdout.text(),
                self.stderr.text()
            );
        }
    }

    /// Send `sig` to stagehand alone (not its process group), as a user's `kill` would.
    pub fn signal(&mut self, sig: Signal) {
        let child = self.child.as_mut().expect("running");
        // Only while it has not been reaped: until then its pid cannot be reused.
        if child.try_wait().expect("poll stagehand").is_none() {
            nix::sys::signal::kill(Pid::from_raw(child.id() as i32), sig)
                .expect("signal stagehand");
        }
    }

    /// Wait for stagehand to exit within `timeout` (panicking and stopping it if it does not),
    /// and collect everything it printed.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let deadline = self.started + timeout;
        let child = self.child.as_mut().expect("running");
        let status = loop {
            if let Some(st) = child.try_wait().expect("poll stagehand") {
                break st;
            }
            if Instant::now() >= deadline {
                let (out, err) = (self.stdout.text(), self.stderr.text());
                panic!(
                    "stagehand {:?} still running after {timeout:?}\n--- stdout:\n{out}\n--- stderr:\n{err}",
                    self.args
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let elapsed = self.started.elapsed();
        self.child = None;
        // A step's leftover could in theory hold stagehand's pipes; don't hang on it.
        let eof = Instant::now() + Duration::from_secs(2);
        self.stdout.wait_eof(eof);
        self.stderr.wait_eof(eof);
        use std::os::unix::process::ExitStatusExt;
        let stderr = self.stderr.text();
        let run_dir = run_dir_from(&stderr);
        Finished {
            code: status.code(),
            signal: status.signal(),
            stdout: self.stdout.text(),
            stderr,
            elapsed,
            run_dir,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        if matches!(child.try_wait(), Ok(None)) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + GUARD_GRACE;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        kill_marked(&self.marker);
        self.stderr
            .wait_eof(Instant::now() + Duration::from_secs(2));
        if let Some(d) = run_dir_from(&self.stderr.text()) {
            remove_run_dir(&d);
        }
    }
}

/// `<run dir>`: the parent of the `logs: DIR` line stagehand prints last on stderr.
fn run_dir_from(stderr: &str) -> Option<PathBuf> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("logs: "))
        .next_back()
        .and_then(|l| Path::new(l.trim()).parent().map(Path::to_path_buf))
}

/// Remove a run directory, but only what looks like one: `.../stagehand*/<run id>/logs`.
fn remove_run_dir(d: &Path) {
    let under_stagehand = d
        .parent()
        .and_then(Path::file_name)
        .is_some_and(|n| n.to_string_lossy().starts_with("stagehand"));
    if under_stagehand && d.join("logs").is_dir() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// How a stagehand run ended and what it printed. Dropping it removes the run directory
/// stagehand reported (its logs), so tests leave nothing under /run.
pub struct Finished {
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// From start to exit.
    pub elapsed: Duration,
    /// `<run dir>`, the parent of the `logs: DIR` stagehand prints last on stderr.
    pub run_dir: Option<PathBuf>,
}

impl Finished {
    /// Everything printed, for assertion messages.
    pub fn dump(&self) -> String {
        format!(
            "exit code {:?} (signal {:?}) after {:?}\n--- stdout:\n{}\n--- stderr:\n{}",
            self.code, self.signal, self.elapsed, self.stdout, self.stderr
        )
    }

    /// Panic with the whole output unless stagehand exited with `code`.
    pub fn assert_code(&self, code: i32) {
        assert_eq!(self.code, Some(code), "wrong exit status\n{}", self.dump());
    }

    /// Panic with the whole output unless stdout has a line containing `needle`.
    pub fn assert_stdout_has(&self, needle: &str) {
        assert!(
            self.stdout.contains(needle),
            "stdout lacks {needle:?}\n{}",
            self.dump()
        );
    }

    /// The summary table row of step `id` (the line after the header that starts with it).
    pub fn summary_row(&self, id: &str) -> String {
        let table = self
            .stdout
            .rsplit_once("  step ")
            .map(|(_, t)| t)
            .unwrap_or_else(|| panic!("no summary table\n{}", self.dump()));
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .unwrap_or_else(|| panic!("no summary row for {id}\n{}", self.dump()))
            .to_string()
    }

    /// Lines step `id` printed (the text after `ID |`).
    pub fn step_output(&self, id: &str) -> Vec<String> {
        self.stdout
            .lines()
            .filter_map(|l| {
                let (prefix, rest) = l.split_once(" |")?;
                (prefix.trim_end() == id)
                    .then(|| rest.strip_prefix(' ').unwrap_or(rest).to_string())
            })
            .collect()
    }

    /// The run id: the name of the run directory.
    pub fn run_id(&self) -> String {
        let dir = self
            .run_dir
            .as_ref()
            .unwrap_or_else(|| panic!("stagehand printed no `logs:` line\n{}", self.dump()));
        dir.file_name()
            .expect("run dir has a name")
            .to_string_lossy()
            .into_owned()
    }

    /// Panic unless the stage sandbox of this run is gone: no cgroup `stagehand/<run id>` in
    /// any hierarchy, and no mount (the netns file, a hosts file) naming the run id.
    pub fn assert_sandbox_gone(&self) {
        let run_id = self.run_id();
        let mut left = Vec::new();
        if let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") {
            for h in hierarchies.flatten() {
                // `/sys/fs/cgroup/<controller>/stagehand/<run>` (v1) or `/sys/fs/cgroup/stagehand/<run>`.
                for p in [
                    h.path().join("stagehand").join(&run_id),
                    Path::new("/sys/fs/cgroup/stagehand").join(&run_id),
                ] {
                    if p.exists() && !left.contains(&p.display().to_string()) {
                        left.push(p.display().to_string());
                    }
                }
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        left.extend(
            mounts
                .lines()
                .filter(|l| l.contains(&run_id))
                .map(|l| format!("mount: {l}")),
        );
        assert!(
            left.is_empty(),
            "the stage sandbox of run {run_id} is still there:\n  {}",
            left.join("\n  ")
        );
    }

    /// The log file of step `id` (`<run dir>/logs/<stage>/<id>.log`; the first stage that has one).
    pub fn log(&self, id: &str) -> String {
        let dir = self
            .run_dir
            .as_ref()
            .unwrap_or_else(|| panic!("stagehand printed no `logs:` line\n{}", self.dump()));
        let logs = dir.join("logs");
        let mut stages: Vec<PathBuf> = std::fs::read_dir(&logs)
            .unwrap_or_else(|e| panic!("read {}: {e}", logs.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        stages.sort();
        let path = stages
            .iter()
            .map(|s| s.join(format!("{id}.log")))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("no log of step {id} under {}", logs.display()));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }
}

impl Drop for Finished {
    fn drop(&mut self) {
        if let Some(d) = &self.run_dir {
            remove_run_dir(d);
        }
    }
}

/// A process found carrying a marker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    pub pid: i32,
    /// Its argv joined with spaces.
    pub cmdline: String,
    /// Where the marker was seen: "cmdline", "environ" or "cwd".
    pub found_in: &'static str,
}

/// Every process other than this one whose command line, environment or working directory
/// contains `marker`.
pub fn processes_with(marker: &str) -> Vec<Marked> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let dir = e.path();
        let cmdline = std::fs::read(dir.join("cmdline")).unwrap_or_default();
        let shown = String::from_utf8_lossy(&cmdline)
            .replace('\0', " ")
            .trim_end()
            .to_string();
        let has = |bytes: &[u8]| bytes.windows(marker.len()).any(|w| w == marker.as_bytes());
        let found_in = if has(&cmdline) {
            Some("cmdline")
        } else if has(&std::fs::read(dir.join("environ")).unwrap_or_default()) {
            Some("environ")
        } else if std::fs::read_link(dir.join("cwd"))
            .is_ok_and(|c| c.to_string_lossy().contains(marker))
        {
            Some("cwd")
        } else {
            None
        };
        if let Some(found_in) = found_in {
            found.push(Marked {
                pid,
                cmdline: shown,
                found_in,
            });
        }
    }
    found
}

/// Panic if a process carrying `marker` is still there after [`LEAK_GRACE`]; the leftovers
/// are SIGKILLed first, so a failing check does not leak either.
pub fn assert_no_leaks(marker: &str) {
    let deadline = Instant::now() + LEAK_GRACE;
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            kill_marked(marker);
            let list: Vec<String> = left
                .iter()
                .map(|m| format!("  pid {} ({}): {}", m.pid, m.found_in, m.cmdline))
                .collect();
            panic!(
                "processes left behind by the stage (marker {marker}):\n{}",
                list.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILL, by pid, every process carrying `marker` (all of them started by this test).
pub fn kill_marked(marker: &str) {
    for m in processes_with(marker) {
        let _ = nix::sys::signal::kill(Pid::from_raw(m.pid), Signal::SIGKILL);
    }
}

/// TCP ports in LISTEN state on this machine (IPv4 and IPv6), from /proc/net/tcp{,6}.
pub fn listening_tcp_ports() -> BTreeSet<u16> {
    let mut ports = BTreeSet::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        ports.extend(parse_listening(&text));
    }
    ports
}

/// The local ports of LISTEN (`0A`) sockets in a /proc/net/tcp table.
fn parse_listening(table: &str) -> Vec<u16> {
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (local, state) = (f.get(1)?, f.get(3)?);
            if *state != "0A" {
                return None;
            }
            u16::from_str_radix(local.rsplit_once(':')?.1, 16).ok()
        })
        .collect()
}

/// Panic with a clear message if something on this machine already listens on one of `ports`
/// (a suite that needs fixed ports must not silently test someone else's server).
pub fn assert_ports_free(ports: &[u16]) {
    let busy: Vec<u16> = listening_tcp_ports()
        .into_iter()
        .filter(|p| ports.contains(p))
        .collect();
    assert!(
        busy.is_empty(),
        "TCP port(s) {busy:?} already have a listener on this machine; this test needs {ports:?} free (see `ss -ltnp`)"
    );
}

/// Wait up to `within` until none of `ports` has a listener; panic naming those that still do.
pub fn assert_ports_closed(ports: &[u16], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let open: Vec<u16> = listening_tcp_ports()
            .into_iter()
            .filter(|p| ports.contains(p))
            .collect();
        if open.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still listening after the stage ended: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_listening_sockets_only() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1539 00000000:0000 0A 00000000:00000000 00:00000000 00000000   101        0 1 1 0 100 0 0 10 0\n   1: 0100007F:1539 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000   101        0 2 1 0 20 4 30 10 -1\n   2: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 3 1\n";
        assert_eq!(parse_listening(table), [5433, 8080]);
    }

    #[test]
    fn run_dir_is_the_parent_of_the_last_logs_line() {
        assert_eq!(
            run_dir_from("stagehand: note\nlogs: /run/stagehand/abc/logs\n"),
            Some(PathBuf::from("/run/stagehand/abc"))
        );
        assert_eq!(run_dir_from("stagehand: invalid\n"), None);
    }

    #[test]
    fn markers_are_unique_and_find_a_marked_process() {
        let a = unique_marker();
        assert_ne!(a, unique_marker());
        assert!(processes_with(&a).is_empty());
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(MARKER_ENV, &a)
            .spawn()
            .unwrap();
        let found = processes_with(&a);
        kill_marked(&a);
        let _ = child.wait();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].pid, found[0].found_in),
            (child.id() as i32, "environ")
        );
        assert!(processes_with(&a).is_empty());
    }

    #[test]
    fn workspace_drop_kills_marked_processes_and_removes_the_dir() {
        let ws = Workspace::new();
        let path = ws.path().to_path_buf();
        let marker = ws.marker().to_string();
        assert!(path.to_string_lossy().contains(&marker));
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .current_dir(&path)
            .spawn()
            .unwrap();
        assert_eq!(
            processes_with(&marker).first().map(|m| m.found_in),
            Some("cwd")
        );
        drop(ws);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!path.exists());
    }
}
