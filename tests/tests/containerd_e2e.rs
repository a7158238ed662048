//! End-to-end: the container scenarios of `container_e2e.rs` again with `--backend
//! containerd`, against a private containerd this suite starts (cargo feature `containerd`).
//!
//! Owns: [`Containerd`], a containerd with its config, root, state and socket under a temp dir
//! named `stagehand-containerd-<pid>-*`, started per test as a plain child and stopped by PID
//! when dropped (also when the test fails); and the proofs that echo, exit codes, output
//! timeouts, step-id hostnames, OOM kills and an
//! EmptyDir volume behave as with the daemonless backend, with the same pipeline files, and
//! leave nothing behind (not in containerd either).
//! Does not own: the helpers (`stagehand_e2e::{e2e, sandbox, images}`) or the daemonless runs.
//!
//! Needs what `container_e2e.rs` needs, plus `containerd` (1.6+) and a stagehand built with
//! `cargo build -p stagehand --features containerd`. Run with
//! `cargo test -p stagehand-e2e --features containerd --test containerd_e2e`.
#![cfg(feature = "containerd")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stagehand_e2e::e2e::{Finished, Workspace, pipeline};
use stagehand_e2e::images::{assert_container_run_gone, suite_store, with_store};
use stagehand_e2e::sandbox::{self, require_root};

/// A private containerd: its own config, root, state and socket under a temp dir.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    /// Start containerd and wait until its socket answers (up to 10 s).
    fn start() -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix(&format!("stagehand-containerd-{}-", std::process::id()))
            .tempdir()
            .expect("create the containerd dir");
        let d = dir.path();
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"{sock}.debug\"\n  level = \"info\"\n\
             [plugins.\"io.containerd.internal.v1.opt\"]\n  path = \"{opt}\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            opt = d.join("opt").display(),
        );
        std::fs::write(d.join("config.toml"), config).expect("write containerd config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("containerd log");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("start containerd (apt-get install containerd)");
        let c = Containerd { child, dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !c.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not create its socket in 10 s:\n{}",
                std::fs::read_to_string(c.dir.path().join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// Containers containerd still has in stagehand's namespace (via `ctr`, when installed).
    fn containers(&self) -> Vec<String> {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(["-n", "stagehand", "containers", "ls", "-q"])
            .output();
        match out {
            Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(String::from)
                .collect(),
            _ => Vec::new(),
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Our child: stop it by its PID, then reap it.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `stagehand run FILE` with the suite's store and `--backend containerd` at `ctd`.
fn run(ws: &Workspace, ctd: &Containerd, file: &str) -> Finished {
    sandbox::run(
        with_store(
            ws.stagehand_run(&pipeline(file)),
            suite_store().root(),
            ws.marker(),
        )
        .arg("--backend")
        .arg("containerd")
        .arg("--containerd-address")
        .arg(ctd.socket()),
    )
}

/// The leak checks of the daemonless suite, and no container left in containerd.
fn assert_gone(out: &Finished, ws: &Workspace, ctd: &Containerd) {
    assert_container_run_gone(out, ws.marker(), &[suite_store().root()]);
    let left = ctd.containers();
    assert!(
        left.is_empty(),
        "containerd still has containers: {left:?}\n{}",
        out.dump()
    );
}

#[test]
fn echo_runs_as_a_containerd_task() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let out = sandbox::run(
        with_store(
            ws.stagehand_run(&pipeline("container-echo.yaml")),
            suite_store().root(),
            ws.marker(),
        )
        .arg("--var")
        .arg("source=containerd")
        .arg("--backend")
        .arg("containerd")
        .arg("--containerd-address")
        .arg(ctd.socket()),
    );
    out.assert_code(0);
    assert_eq!(
        out.step_output("hello"),
        ["hello from containerd"],
        "{}",
        out.dump()
    );
    assert_gone(&out, &ws, &ctd);
}

#[test]
fn exit_code_of_a_containerd_task_fails_the_stage() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let out = run(&ws, &ctd, "container-exit.yaml");
    out.assert_code(1);
    assert_eq!(
        out.step_output("fail"),
        ["exiting with 7 as 0 in /harness"],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("<-- fail FAILED: exit code 7");
    out.assert_stdout_has("<-- after skipped");
    assert_gone(&out, &ws, &ctd);
}

#[test]
fn containerd_task_obeys_its_timeout() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let out = run(&ws, &ctd, "container-timeout.yaml");
    out.assert_code(1);
    assert_eq!(out.step_output("slow"), ["sleeping"], "{}", out.dump());
    out.assert_stdout_has("<-- slow TIMED OUT: timed out after 4s");
    assert!(
        out.elapsed < Duration::from_secs(15),
        "held the stage for {:?}\n{}",
        out.elapsed,
        out.dump()
    );
    assert_gone(&out, &ws, &ctd);
}

#[test]
fn step_ids_resolve_from_containerd_tasks() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let out = run(&ws, &ctd, "container-hostnames.yaml");
    out.assert_code(0);
    assert_eq!(
        out.step_output("sg1_Run_1"),
        [
            "wget Background_1: page of sg1_Background_1",
            "nc sg1_Background_1: page of sg1_Background_1"
        ],
        "{}",
        out.dump()
    );
    assert_eq!(
        out.step_output("Run_2"),
        ["wget sg1_Background_1: page of sg1_Background_1"],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("service sg1_Background_1 stopped");
    assert_gone(&out, &ws, &ctd);
}

#[test]
fn memory_limit_oom_kills_a_containerd_task_and_says_so() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let out = run(&ws, &ctd, "container-oom.yaml");
    out.assert_code(1);
    assert!(
        !out.stdout.contains("hog survived"),
        "the 32Mi limit was not enforced\n{}",
        out.dump()
    );
    out.assert_stdout_has("<-- hog FAILED: hog was killed: out of memory (limit 32Mi)");
    assert_gone(&out, &ws, &ctd);
}

#[test]
fn empty_dir_volume_is_shared_by_containerd_tasks() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let out = run(&ws, &ctd, "container-volume.yaml");
    out.assert_code(0);
    assert_eq!(
        out.step_output("visitor"),
        [
            "visitor read: written by keeper",
            "acknowledged",
            "/data is not the workspace"
        ],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("service keeper stopped");
    assert_gone(&out, &ws, &ctd);
}

#[test]
fn a_missing_containerd_socket_fails_the_stage_with_a_hint() {
    require_root();
    let ws = Workspace::new();
    let sock = Path::new("/nonexistent/stagehand-containerd.sock");
    let out = sandbox::run(
        with_store(
            ws.stagehand_run(&pipeline("container-exit.yaml")),
            suite_store().root(),
            ws.marker(),
        )
        .arg("--backend")
        .arg("containerd")
        .arg("--containerd-address")
        .arg(sock),
    );
    out.assert_code(1);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("containerd socket /nonexistent/stagehand-containerd.sock does not exist")
            && all.contains("--containerd-address"),
        "{}",
        out.dump()
    );
}
