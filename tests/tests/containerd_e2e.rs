//! End-to-end: the container scenarios of `container_e2e.rs` again with `--backend
//! containerd`, against a private containerd this suite starts (cargo feature `containerd`).
//!
//! Owns: [`Containerd`], a containerd with its config, root, state and socket under a temp dir
//! named `stagehand-containerd-<pid>-*`, started per test as a plain child and stopped by PID
//! when dropped (also when the test fails); and the proofs that echo, exit codes, output
//! timeouts, step-id hostnames, OOM kills (of a step and of a service) and an EmptyDir volume
//! behave as with the daemonless backend, with the same pipeline files; that the image is
//! imported into containerd's content store and unpacked by its snapshotter once, then
//! reused; and that nothing is left behind, in containerd either (no container, task, active
//! snapshot or lease after a stage, nor after a SIGKILL of stagehand and `stagehand gc`).
//! Does not own: the helpers (`stagehand_e2e::{e2e, sandbox, images}`) or the daemonless runs.
//!
//! Needs what `container_e2e.rs` needs, plus `containerd` and `ctr` (1.6+) and a stagehand
//! built with `cargo build -p stagehand --features containerd`. Run with
//! `cargo test -p stagehand-e2e --features containerd --test containerd_e2e`.
#![cfg(feature = "containerd")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use stagehand_e2e::e2e::{Finished, RUN_TIMEOUT, StagehandCmd, Workspace, pipeline};
use stagehand_e2e::images::{BUSYBOX_IMAGE, assert_container_run_gone, suite_store, with_store};
use stagehand_e2e::sandbox::{self, RunDirGuard, assert_stage_gone, require_root, run_id_of_pid};

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

    /// `ctr -n stagehand ARGS` against this containerd: its output lines (panics when `ctr`
    /// fails: a check that cannot look proves nothing).
    fn ctr(&self, args: &[&str]) -> Vec<String> {
        let out = Command::new("ctr")
            .arg("-a")
            .arg(self.socket())
            .args(["-n", "stagehand"])
            .args(args)
            .output()
            .expect("run ctr (apt-get install containerd)");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    }

    /// Containers containerd still has in stagehand's namespace.
    fn containers(&self) -> Vec<String> {
        self.ctr(&["containers", "ls", "-q"])
    }

    /// Tasks (running or stopped) containerd still has.
    fn tasks(&self) -> Vec<String> {
        self.ctr(&["tasks", "ls"]).into_iter().skip(1).collect()
    }

    /// Leases containerd has in stagehand's namespace.
    fn leases(&self) -> Vec<String> {
        self.ctr(&["leases", "ls", "-q"])
    }

    /// Snapshots of `kind` (`Active`, `Committed`) of the overlayfs snapshotter: their keys.
    fn snapshots(&self, kind: &str) -> Vec<String> {
        self.ctr(&["snapshots", "ls"])
            .into_iter()
            .skip(1)
            .filter(|l| l.split_whitespace().last() == Some(kind))
            .filter_map(|l| l.split_whitespace().next().map(String::from))
            .collect()
    }

    /// Image names containerd has in stagehand's namespace.
    fn images(&self) -> Vec<String> {
        self.ctr(&["images", "ls", "-q"])
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

/// `stagehand run FILE` with the suite's store and `--backend containerd` at `socket`.
fn containerd_cmd(ws: &Workspace, socket: &Path, file: &Path) -> StagehandCmd {
    with_store(ws.stagehand_run(file), suite_store().root(), ws.marker())
        .arg("--backend")
        .arg("containerd")
        .arg("--containerd-address")
        .arg(socket)
}

/// [`containerd_cmd`] for a suite pipeline, run to completion.
fn run(ws: &Workspace, ctd: &Containerd, file: &str) -> Finished {
    sandbox::run(containerd_cmd(ws, &ctd.socket(), &pipeline(file)))
}

/// The leak checks of the daemonless suite, and nothing of the run left in containerd: no
/// container, task, active snapshot or lease (committed layer snapshots and the image stay).
fn assert_gone(out: &Finished, ws: &Workspace, ctd: &Containerd) {
    assert_container_run_gone(out, ws.marker(), &[suite_store().root()]);
    assert_containerd_clean(ctd, &out.dump());
}

fn assert_containerd_clean(ctd: &Containerd, context: &str) {
    let left = [
        ("containers", ctd.containers()),
        ("tasks", ctd.tasks()),
        ("active snapshots", ctd.snapshots("Active")),
        ("leases", ctd.leases()),
    ];
    for (what, list) in left {
        assert!(
            list.is_empty(),
            "containerd still has {what}: {list:?}\n{context}"
        );
    }
}

/// `BUSYBOX_IMAGE` as containerd (and stagehand's store) names it.
fn busybox_name() -> String {
    format!("docker.io/{BUSYBOX_IMAGE}")
}

/// `stagehand image ls --backend containerd` against `ctd`: the row of `name`.
fn image_ls_row(ctd: &Containerd, marker: &str, name: &str) -> String {
    let out = StagehandCmd::new(marker)
        .arg("image")
        .arg("--root")
        .arg(suite_store().root())
        .arg("ls")
        .arg("--backend")
        .arg("containerd")
        .arg("--containerd-address")
        .arg(ctd.socket())
        .spawn()
        .wait(Duration::from_secs(15));
    out.assert_code(0);
    assert!(
        out.stdout
            .lines()
            .next()
            .is_some_and(|h| h.ends_with("CONTAINERD")),
        "{}",
        out.dump()
    );
    out.stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row for {name}\n{}", out.dump()))
        .to_string()
}

/// A pipeline written into `ws` (for scenarios no shared pipeline file has).
fn write_pipeline(ws: &Workspace, name: &str, yaml: &str) -> PathBuf {
    let path = ws.path().join(name);
    std::fs::write(&path, yaml).expect("write the pipeline");
    path
}

#[test]
fn echo_runs_as_a_containerd_task() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let out = sandbox::run(
        containerd_cmd(&ws, &ctd.socket(), &pipeline("container-echo.yaml"))
            .arg("--var")
            .arg("source=containerd"),
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
fn image_is_imported_into_containerd_once_and_reused() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let name = busybox_name();
    assert!(
        image_ls_row(&ctd, ws.marker(), &name).ends_with(" no"),
        "containerd has the image before any run"
    );

    let first = run(&ws, &ctd, "container-echo.yaml");
    first.assert_code(0);
    assert!(
        first.stderr.contains(&format!(
            "imported `{BUSYBOX_IMAGE}` into containerd (3 blob(s) written, 1 layer(s) unpacked with overlayfs)"
        )),
        "{}",
        first.dump()
    );
    // In containerd's own stores: the Image record under stagehand's name, the blobs with the
    // labels containerd's gc follows, one committed snapshot per layer (named by chain ID).
    assert_eq!(ctd.images(), std::slice::from_ref(&name));
    let content = ctd.ctr(&["content", "ls"]).join("\n");
    assert!(
        content.contains("containerd.io/gc.ref.content.config=sha256:")
            && content.contains("containerd.io/gc.ref.content.l.0=sha256:")
            && content.contains("containerd.io/gc.ref.snapshot.overlayfs=sha256:"),
        "{content}"
    );
    let committed = ctd.snapshots("Committed");
    assert_eq!(committed.len(), 1, "{committed:?}");
    assert!(
        content.contains(&format!("containerd.io/uncompressed={}", committed[0])),
        "the single layer's snapshot is named by its diff ID (its chain ID)\n{content}"
    );
    assert_gone(&first, &ws, &ctd);
    assert!(image_ls_row(&ctd, ws.marker(), &name).ends_with(" yes"));

    // The second run finds everything there: nothing written, nothing unpacked.
    let ws2 = Workspace::new();
    let second = run(&ws2, &ctd, "container-echo.yaml");
    second.assert_code(0);
    assert_eq!(
        second.step_output("hello"),
        ["hello from unset"],
        "{}",
        second.dump()
    );
    assert!(
        !second.stderr.contains("into containerd"),
        "the second run imported again\n{}",
        second.dump()
    );
    assert_eq!(ctd.snapshots("Committed"), committed);
    assert_eq!(ctd.images(), [name]);
    assert_gone(&second, &ws2, &ctd);
}

#[test]
fn native_snapshotter_is_selectable() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let out = sandbox::run(
        containerd_cmd(&ws, &ctd.socket(), &pipeline("container-echo.yaml"))
            .arg("--var")
            .arg("source=native")
            .env("STAGEHAND_CONTAINERD_SNAPSHOTTER", "native"),
    );
    out.assert_code(0);
    assert_eq!(
        out.step_output("hello"),
        ["hello from native"],
        "{}",
        out.dump()
    );
    assert!(
        out.stderr.contains("unpacked with native"),
        "{}",
        out.dump()
    );
    let native = ctd.ctr(&["snapshots", "--snapshotter", "native", "ls"]);
    assert!(
        native.iter().any(|l| l.trim_end().ends_with("Committed")),
        "{native:?}"
    );
    assert_gone(&out, &ws, &ctd);
}

#[test]
fn sigkill_of_stagehand_then_gc_removes_what_it_left_in_containerd() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let file = write_pipeline(
        &ws,
        "containerd-killed.yaml",
        &format!(
            "pipeline:\n  name: containerd killed\n  identifier: containerd_killed\n  stages:\n    - stage:\n        identifier: build\n        name: build\n        type: CI\n        variables:\n          - name: marker\n            type: String\n            value: unset\n        spec:\n          execution:\n            steps:\n              - step:\n                  identifier: slow\n                  name: slow\n                  type: Run\n                  spec:\n                    image: {BUSYBOX_IMAGE}\n                    shell: Sh\n                    command: |\n                      echo started\n                      sleep 120\n"
        ),
    );
    let mut running = sandbox::spawn(containerd_cmd(&ws, &ctd.socket(), &file));
    running.wait_for_stdout("slow | started", Duration::from_secs(20));
    let id = run_id_of_pid(running.pid(), Duration::from_secs(5));
    let _dir = RunDirGuard::new(&id, ws.marker());
    assert_eq!(ctd.containers(), [format!("stagehand-{id}-slow")]);
    assert_eq!(ctd.leases(), [format!("stagehand-{id}-build")]);
    assert_eq!(ctd.snapshots("Active"), [format!("stagehand-{id}-slow")]);

    // No other run of this binary may start (and collect the killed run) until our gc.
    let gate = sandbox::hold_off_other_runs();
    running.signal(Signal::SIGKILL);
    let killed = running.wait(RUN_TIMEOUT);
    assert_eq!(killed.signal, Some(libc::SIGKILL), "{}", killed.dump());
    // containerd keeps the task running: nothing of stagehand is there to stop it.
    assert_eq!(ctd.containers(), [format!("stagehand-{id}-slow")]);
    assert!(!ctd.tasks().is_empty());

    let gc = StagehandCmd::new(ws.marker())
        .arg("gc")
        .env("STAGEHAND_CONTAINERD_ADDRESS", ctd.socket())
        .spawn()
        .wait(Duration::from_secs(30));
    drop(gate);
    gc.assert_code(0);
    for what in [
        format!("containerd: removed container stagehand-{id}-slow"),
        format!("containerd: removed snapshot overlayfs/stagehand-{id}-slow"),
        format!("containerd: removed lease stagehand-{id}-build"),
    ] {
        gc.assert_stdout_has(&what);
    }
    assert_containerd_clean(&ctd, &gc.dump());
    // The image stays for the next run.
    assert_eq!(ctd.images(), [busybox_name()]);
    assert_stage_gone(&id, ws.marker());
}

#[test]
fn oom_kill_of_a_containerd_service_is_reported() {
    require_root();
    let ctd = Containerd::start();
    let ws = Workspace::new();
    let file = write_pipeline(
        &ws,
        "containerd-service-oom.yaml",
        &format!(
            "pipeline:\n  name: containerd service oom\n  identifier: containerd_service_oom\n  stages:\n    - stage:\n        identifier: build\n        name: build\n        type: CI\n        variables:\n          - name: marker\n            type: String\n            value: unset\n        spec:\n          execution:\n            steps:\n              - step:\n                  identifier: hog\n                  name: memory hog service\n                  type: Background\n                  spec:\n                    image: {BUSYBOX_IMAGE}\n                    entrypoint:\n                      - sh\n                      - -ec\n                      - 'echo allocating; dd if=/dev/zero of=/dev/null bs=64M count=1; echo hog survived; sleep 30'\n                    resources:\n                      limits:\n                        memory: 32Mi\n              - step:\n                  identifier: settle\n                  name: settle\n                  type: Run\n                  spec:\n                    shell: Sh\n                    command: sleep 20\n"
        ),
    );
    let out = sandbox::run(containerd_cmd(&ws, &ctd.socket(), &file));
    out.assert_code(1);
    assert!(!out.stdout.contains("hog survived"), "{}", out.dump());
    out.assert_stdout_has("!!! service hog failed: was killed: out of memory (limit 32Mi)");
    assert!(
        out.summary_row("hog")
            .ends_with("FAILED: was killed: out of memory (limit 32Mi)"),
        "{}",
        out.dump()
    );
    assert_gone(&out, &ws, &ctd);
}

#[test]
fn a_missing_containerd_socket_fails_the_stage_with_a_hint() {
    require_root();
    let ws = Workspace::new();
    let sock = Path::new("/nonexistent/stagehand-containerd.sock");
    let out = sandbox::run(containerd_cmd(&ws, sock, &pipeline("container-exit.yaml")));
    out.assert_code(1);
    let all = format!("{}{}", out.stdout, out.stderr);
    assert!(
        all.contains("containerd socket /nonexistent/stagehand-containerd.sock does not exist")
            && all.contains("--containerd-address"),
        "{}",
        out.dump()
    );
}
