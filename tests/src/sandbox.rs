//! Helpers for the stage-sandbox suite (`tests/tests/sandbox_e2e.rs`): what a stage pod leaves
//! on the system, and the pieces a test needs around a running stage.
//!
//! Owns: finding a run's id (from `stagehand`'s `logs:` line, or from the journals under
//! `/run/stagehand` by stagehand's pid), reading a run's journal (`state.json`), finding its
//! cgroup directories and network-namespace mounts, the combined "the stage is gone" check,
//! running `stagehand gc` / `stagehand ps`, a gate that keeps another run's start-up garbage
//! collection away from a run a test killed on purpose, a guard that cleans up a killed run's
//! directory, and a tiny HTTP server on the host's loopback. Does not own: starting stagehand,
//! markers, process leak checks or port checks ([`crate::e2e`], reused here), or what a test
//! asserts about stagehand's output.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::e2e::{Finished, RUN_TIMEOUT, Running, StagehandCmd, assert_no_leaks};

/// Where stagehand keeps run directories when it runs as root.
pub const RUN_BASE: &str = "/run/stagehand";

/// Where runs of this suite live: [`RUN_BASE`], or the test user's `/tmp/stagehand-<uid>` in
/// the rootless rerun.
pub fn run_base() -> PathBuf {
    if crate::e2e::rootless_rerun() {
        crate::rootless::user().run_base()
    } else {
        PathBuf::from(RUN_BASE)
    }
}

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How deep below [`CGROUP_ROOT`] a run's cgroups are looked for. On this kind of host the
/// deepest is `memory/process_api/<id>/stagehand/<run>/<step>` (depth 6).
const CGROUP_SEARCH_DEPTH: usize = 6;

/// What stagehand prints once its start-up garbage collection is done and the stage begins.
const STAGE_BANNER: &str = "==> stage ";

/// Every `stagehand run` garbage-collects the runs of dead stagehands when it starts. A test
/// that SIGKILLs stagehand and then checks what `stagehand gc` removes would race with any
/// other test of this binary starting a run at that moment. Runs hold this gate (shared) from
/// spawn until their start-up gc is over; the killing test holds it exclusively from the kill
/// until its own gc is done.
static GC_GATE: RwLock<()> = RwLock::new(());

/// Panic unless this process runs as root: stages get cgroups and namespaces only then.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the sandbox suite needs root: stages get cgroups and a network namespace only as root"
    );
}

/// Start `cmd` (a `stagehand run`), returning once it has printed its first stage banner,
/// i.e. once its start-up garbage collection is over (see [`hold_off_other_runs`]).
pub fn spawn(cmd: StagehandCmd) -> Running {
    let _shared = GC_GATE.read().unwrap_or_else(PoisonError::into_inner);
    let running = cmd.spawn();
    running.wait_for_stdout(STAGE_BANNER, Duration::from_secs(15));
    running
}

/// Run `cmd` (a `stagehand run`) to completion within [`RUN_TIMEOUT`], like
/// [`StagehandCmd::output`] but through [`spawn`].
pub fn run(cmd: StagehandCmd) -> Finished {
    spawn(cmd).wait(RUN_TIMEOUT)
}

/// Keep every other run of this test binary from starting until the guard is dropped (runs
/// already started are past their start-up gc). Hold it from killing stagehand until
/// `stagehand gc` has run, so that gc is the one that cleans up.
pub fn hold_off_other_runs() -> RwLockWriteGuard<'static, ()> {
    GC_GATE.write().unwrap_or_else(PoisonError::into_inner)
}

/// The id of a finished run: the last component of the run directory it reported.
pub fn run_id(out: &Finished) -> String {
    out.run_dir
        .as_ref()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| panic!("stagehand reported no run directory\n{}", out.dump()))
}

/// The directory of run `run_id`.
pub fn run_dir(run_id: &str) -> PathBuf {
    run_base().join(run_id)
}

/// What a run's journal (`<run dir>/state.json`) says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Journal {
    pub run_id: String,
    /// stagehand's pid.
    pub pid: i32,
    /// Relative cgroup paths still to remove (`stagehand/<run>`).
    pub cgroups: Vec<String>,
    /// Network namespace files still to remove.
    pub netns: Vec<String>,
    /// Service step id → pid.
    pub services: BTreeMap<String, i32>,
    /// Set once everything was removed.
    pub finished: bool,
}

/// Read run `run_id`'s journal; `None` when there is none (yet) or it does not parse.
pub fn journal(run_id: &str) -> Option<Journal> {
    parse_journal(&std::fs::read_to_string(run_dir(run_id).join("state.json")).ok()?)
}

fn parse_journal(text: &str) -> Option<Journal> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let strings = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    Some(Journal {
        run_id: v["run_id"].as_str()?.to_string(),
        pid: i32::try_from(v["pid"].as_i64()?).ok()?,
        cgroups: strings("cgroups"),
        netns: strings("netns"),
        services: v["services"]
            .as_object()
            .map(|m| {
                m.iter()
                    .filter_map(|(k, p)| Some((k.clone(), i32::try_from(p.as_i64()?).ok()?)))
                    .collect()
            })
            .unwrap_or_default(),
        finished: v["finished"].as_bool()?,
    })
}

/// The parent pid of `pid`, from `/proc/<pid>/stat`.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The id of the run whose stagehand has pid `pid`, from the journals under [`RUN_BASE`];
/// waits up to `timeout` for the journal to be written.
pub fn run_id_of_pid(pid: i32, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let found = std::fs::read_dir(run_base())
            .into_iter()
            .flatten()
            .flatten()
            .find_map(|e| {
                let id = e.file_name().to_string_lossy().into_owned();
                // Rootless, the journal names the namespace side, a child of the pid the
                // test started.
                journal(&id)
                    .filter(|j| (j.pid == pid || parent_of(j.pid) == Some(pid)) && !j.finished)
                    .map(|_| id)
            });
        if let Some(id) = found {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no unfinished journal of stagehand pid {pid} under {} after {timeout:?}",
            run_base().display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every cgroup directory of run `run_id`: `.../stagehand/<run_id>` and below, in every
/// hierarchy under [`CGROUP_ROOT`].
pub fn cgroup_dirs(run_id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk_cgroups(Path::new(CGROUP_ROOT), 0, run_id, false, &mut found);
    found
}

fn walk_cgroups(dir: &Path, depth: usize, run_id: &str, inside: bool, found: &mut Vec<PathBuf>) {
    if depth >= CGROUP_SEARCH_DEPTH {
        return;
    }
    // Other runs create and remove cgroups concurrently: a directory may vanish mid-walk.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let path = e.path();
        let ours = inside
            || (e.file_name() == run_id && dir.file_name().is_some_and(|n| n == "stagehand"));
        if ours {
            found.push(path.clone());
        }
        walk_cgroups(&path, depth + 1, run_id, ours, found);
    }
}

/// Lines of /proc/mounts that mount something under run `run_id`'s directory (its network
/// namespace files are bind mounts of nsfs).
pub fn netns_mounts(run_id: &str) -> Vec<String> {
    let needle = format!("{}/", run_dir(run_id).display());
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// Panic unless run `run_id` left nothing behind: no cgroup directory, no namespace mount, no
/// process carrying `marker` (after [`crate::e2e::LEAK_GRACE`]), and a journal that says it is
/// finished with nothing left to remove.
pub fn assert_stage_gone(run_id: &str, marker: &str) {
    let cgroups = cgroup_dirs(run_id);
    assert!(
        cgroups.is_empty(),
        "run {run_id} left cgroups: {cgroups:#?}"
    );
    let mounts = netns_mounts(run_id);
    assert!(mounts.is_empty(), "run {run_id} left mounts: {mounts:#?}");
    assert_no_leaks(marker);
    let j = journal(run_id).unwrap_or_else(|| {
        panic!(
            "run {run_id} has no readable {}",
            run_dir(run_id).join("state.json").display()
        )
    });
    assert!(
        j.finished && j.cgroups.is_empty() && j.netns.is_empty() && j.services.is_empty(),
        "run {run_id}'s journal is not finished: {j:?}"
    );
}

/// Run `stagehand <subcommand>` (`gc`, `ps`) to completion, carrying `marker`.
pub fn stagehand(marker: &str, subcommand: &str) -> Finished {
    StagehandCmd::new(marker)
        .arg(subcommand)
        .spawn()
        .wait(Duration::from_secs(15))
}

/// The cgroup path of `pid` in the hierarchy holding `controller` (v1), or the unified one.
pub fn cgroup_of(pid: i32, controller: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut unified = None;
    for l in text.lines() {
        let mut f = l.splitn(3, ':');
        let (_, ctrls, path) = (f.next()?, f.next()?, f.next()?);
        if ctrls.split(',').any(|c| c == controller) {
            return Some(path.to_string());
        }
        if ctrls.is_empty() {
            unified = Some(path.to_string());
        }
    }
    unified
}

/// The network namespace of `pid` (`net:[inode]` as in /proc/<pid>/ns/net).
pub fn netns_of(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// The namespace a netns file (a bind mount of nsfs) stands for, in the form of [`netns_of`].
pub fn netns_of_file(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .ok()
        .map(|m| format!("net:[{}]", m.ino()))
}

/// Removes run `run_id`'s directory (journal and logs) when dropped, for runs whose stagehand
/// was killed and so reported no directory for [`Finished`] to remove. If the journal is not
/// finished (the test failed before its gc), it runs `stagehand gc` first.
pub struct RunDirGuard {
    run_id: String,
    marker: String,
}

impl RunDirGuard {
    /// Guard run `run_id`; `marker` tags the `stagehand gc` it may run.
    pub fn new(run_id: &str, marker: &str) -> RunDirGuard {
        RunDirGuard {
            run_id: run_id.to_string(),
            marker: marker.to_string(),
        }
    }
}

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        if journal(&self.run_id).is_some_and(|j| !j.finished) {
            let _ = StagehandCmd::new(&self.marker)
                .arg("gc")
                .spawn()
                .wait(Duration::from_secs(15));
        }
        let dir = run_dir(&self.run_id);
        if dir.join("state.json").is_file() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("sandbox: could not remove {}: {e}", dir.display());
            }
        }
    }
}

/// An HTTP server on the host's 127.0.0.1 (a free port) that answers every request with
/// `body` and counts the connections it accepted. Stopped when dropped.
pub struct HostServer {
    port: u16,
    hits: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HostServer {
    /// Start serving `body`.
    pub fn start(body: &str) -> HostServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        // Non-blocking accept, so the thread notices `stop` without a wake-up connection.
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let hits = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let response = format!(
            "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let thread = {
            let (hits, stop) = (hits.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            hits.fetch_add(1, Ordering::SeqCst);
                            answer(conn, response.as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            })
        };
        HostServer {
            port,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    /// The port it listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connections accepted so far.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Read one request's head (up to the blank line, bounded in size and time), then answer.
fn answer(mut conn: TcpStream, response: &[u8]) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let _ = conn.write_all(response);
}

impl Drop for HostServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `curl` a URL on the host with a short timeout; the body, or curl's error.
pub fn curl(url: &str) -> Result<String, String> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--noproxy", "*", "--max-time", "2", url])
        .output()
        .map_err(|e| format!("cannot run curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "curl {url}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim_end()
        ))
    }
}

/// `key=value` fields of a line like `usage_ns=1 wall_ns=2`, as numbers.
pub fn numeric_fields(line: &str) -> BTreeMap<String, i64> {
    line.split_whitespace()
        .filter_map(|f| {
            let (k, v) = f.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_journal() {
        let j = parse_journal(
            r#"{"run_id":"abc","pid":42,"pid_start":1,"cgroup_root":"/sys/fs/cgroup",
                "cgroups":["stagehand/abc"],"netns":["/run/stagehand/abc/netns-build"],
                "ports":[],"services":{"svc":43},"pids":[],"finished":false}"#,
        )
        .unwrap();
        assert_eq!(j.run_id, "abc");
        assert_eq!(j.pid, 42);
        assert_eq!(j.cgroups, ["stagehand/abc"]);
        assert_eq!(j.netns, ["/run/stagehand/abc/netns-build"]);
        assert_eq!(j.services, BTreeMap::from([("svc".to_string(), 43)]));
        assert!(!j.finished);
        assert_eq!(parse_journal("{}"), None);
    }

    #[test]
    fn finds_the_cgroup_of_this_process() {
        let me = std::process::id() as i32;
        // Every process is in some cgroup of the cpu hierarchy (v1) or the unified one.
        assert!(cgroup_of(me, "cpu").is_some_and(|p| p.starts_with('/')));
        assert!(netns_of(me).is_some_and(|n| n.starts_with("net:[")));
        assert!(cgroup_dirs("no-such-run-id").is_empty());
        assert!(netns_mounts("no-such-run-id").is_empty());
    }

    #[test]
    fn host_server_answers_and_counts() {
        let s = HostServer::start("hello");
        let mut c = TcpStream::connect(("127.0.0.1", s.port())).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        c.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nhello"), "{reply}");
        assert_eq!(s.hits(), 1);
    }

    #[test]
    fn numeric_fields_skip_what_is_not_a_number() {
        let f = numeric_fields("usage_ns=12 wall_ns=-3 name=x junk");
        assert_eq!(
            f,
            BTreeMap::from([("usage_ns".to_string(), 12), ("wall_ns".to_string(), -3)])
        );
    }
}
