//! End-to-end: faults, with the built `stagehand` binary, real cgroups, namespaces and runc.
//!
//! Owns: the reliability proofs of the issue that the other suites do not already make:
//! stagehand SIGKILLed mid-stage and the *next run* (not `stagehand gc`) cleaning up what it
//! left (cgroups, the namespace mount, a `setsid` grandchild; the published port is free for
//! the next run); SIGINT and SIGTERM while a service is still starting (its health check
//! failing, a step waiting) and SIGTERM while a container image is being prepared; a Run
//! step's timeout covering its wait for services; a service that starts a daemon and exits 0;
//! the OCI runtime missing or failing; an image store on a full disk (a small tmpfs); a
//! corrupt layer blob; and two runs sharing one image store at once. Every test ends with the
//! leak checks of the other suites ([`assert_stage_gone`] or [`assert_container_run_gone`]:
//! no cgroup, mount, namespace, process or journal entry left; published ports closed) and,
//! where a store was involved, [`assert_store_consistent`].
//! Does not own: the helpers (`stagehand_e2e::{e2e, sandbox, images, registry, faults}`), or
//! faults already proven elsewhere: SIGKILL then `stagehand gc`, SIGINT/SIGTERM mid-stage,
//! OOM kills and services ignoring SIGTERM (`sandbox_e2e.rs`, `host_e2e.rs`,
//! `container_e2e.rs`), a registry dropping the connection mid-pull (`registry_e2e.rs`).
//!
//! Needs root, runc, catatonit, busybox-static, slirp4netns, python3, pgrep, and
//! `cargo build -p stagehand` beforehand.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use stagehand_e2e::e2e::{
    Finished, RUN_TIMEOUT, Running, StagehandCmd, Workspace, assert_ports_closed,
    assert_ports_free, listening_tcp_ports, pipeline, processes_with,
};
use stagehand_e2e::faults::{
    SilentRegistry, TmpfsStore, assert_store_consistent, copy_store, failing_runtime,
    flip_middle_byte, half_unpacked_layers, layer_blobs, rootfs_with_big_file,
};
use stagehand_e2e::images::{
    BUSYBOX_IMAGE, assert_container_run_gone, image_cmd, suite_store, with_store,
};
use stagehand_e2e::readiness::summary_stage;
use stagehand_e2e::sandbox::{
    self, RunDirGuard, assert_stage_gone, cgroup_dirs, journal, netns_mounts, require_root, run_id,
    run_id_of_pid,
};

/// The host port `fault-killed.yaml` publishes.
const KILLED_PORT: u16 = 18631;

/// `stagehand run tests/pipelines/FILE` in `ws` with the test's marker and a 1 s stop timeout.
fn marked(ws: &Workspace, file: &str) -> StagehandCmd {
    ws.stagehand_run(&pipeline(file))
        .arg("--var")
        .arg(format!("marker={}", ws.marker()))
        .arg("--stop-timeout")
        .arg("1s")
}

/// The same for a container pipeline, with the image store `store`.
fn marked_in(ws: &Workspace, file: &str, store: &Path) -> StagehandCmd {
    with_store(ws.stagehand_run(&pipeline(file)), store, ws.marker())
}

/// A temp dir for stores, root filesystems and scripts, named after the test's marker.
fn scratch(ws: &Workspace, what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{}-{what}-", ws.marker()))
        .tempdir()
        .expect("create a scratch dir")
}

/// The pid of the process carrying `marker` whose argv contains `needle`, waiting up to 5 s.
fn marked_process(marker: &str, needle: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(p) = processes_with(marker)
            .into_iter()
            .find(|p| p.cmdline.contains(needle))
        {
            return p.pid;
        }
        assert!(
            Instant::now() < deadline,
            "no process with {needle:?} in its argv carries {marker}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Signal `running` and wait for it to exit, panicking unless it took less than `within`.
fn interrupt(mut running: Running, sig: Signal, within: Duration) -> Finished {
    let sent = Instant::now();
    running.signal(sig);
    let out = running.wait(RUN_TIMEOUT + within);
    assert!(
        sent.elapsed() < within,
        "stagehand took {:?} to stop after {sig}\n{}",
        sent.elapsed(),
        out.dump()
    );
    out
}

#[test]
fn sigkill_of_stagehand_then_the_next_run_cleans_up() {
    require_root();
    assert_ports_free(&[KILLED_PORT]);
    let ws = Workspace::new();
    let mut running = sandbox::spawn(
        marked(&ws, "fault-killed.yaml")
            .arg("--var")
            .arg("mode=hang"),
    );
    running.wait_for_stdout("| work started", Duration::from_secs(20));
    let id = run_id_of_pid(running.pid(), Duration::from_secs(5));
    let _dir = RunDirGuard::new(&id, ws.marker());
    assert!(
        listening_tcp_ports().contains(&KILLED_PORT),
        "the stage does not publish {KILLED_PORT}"
    );

    // From the kill until the next run's start-up gc, no other run of this suite may start
    // (and collect the killed run first).
    let gate = sandbox::hold_off_other_runs();
    running.signal(Signal::SIGKILL);
    let killed = running.wait(RUN_TIMEOUT);
    assert_eq!(killed.signal, Some(libc::SIGKILL), "{}", killed.dump());

    // What stagehand could not undo: the `setsid` grandchild, cgroups, the namespace mount,
    // an unfinished journal. The forwarder was a thread of stagehand: the port is free.
    let grandchild = marked_process(ws.marker(), &format!("forked-{}", ws.marker()));
    assert!(!cgroup_dirs(&id).is_empty(), "no cgroup of run {id} left");
    assert_eq!(
        netns_mounts(&id).len(),
        1,
        "the stage namespace mount is gone already"
    );
    assert!(journal(&id).is_some_and(|j| !j.finished));
    assert_ports_closed(&[KILLED_PORT], Duration::from_secs(3));

    // The next run (another workspace, the same pipeline publishing the same port).
    let next_ws = Workspace::new();
    let next = marked(&next_ws, "fault-killed.yaml")
        .arg("--var")
        .arg("mode=pass")
        .spawn();
    next.wait_for_stdout("==> stage build", Duration::from_secs(15));
    // Its start-up gc is over by its first stage: the killed run is gone, grandchild included.
    assert_stage_gone(&id, ws.marker());
    assert!(
        !processes_with(ws.marker())
            .iter()
            .any(|p| p.pid == grandchild),
        "the grandchild {grandchild} survived the next run's start"
    );
    drop(gate);
    let out = next.wait(RUN_TIMEOUT);
    out.assert_code(0);
    out.assert_stdout_has("<-- work passed");
    out.assert_stdout_has("stage build succeeded");
    assert_stage_gone(&run_id(&out), next_ws.marker());
    assert_ports_closed(&[KILLED_PORT], Duration::from_secs(3));
}

/// Interrupt `fault-startup.yaml` with `sig` while `use` waits for `slow`, whose health check
/// keeps failing; stagehand must stop at once with `code`.
fn interrupted_while_a_service_starts(sig: Signal, code: i32) {
    require_root();
    let ws = Workspace::new();
    let running = sandbox::spawn(marked(&ws, "fault-startup.yaml"));
    running.wait_for_stdout("use waiting for slow (starting)", Duration::from_secs(15));
    marked_process(ws.marker(), &format!("slow-child-{}", ws.marker()));
    let out = interrupt(running, sig, Duration::from_secs(8));
    out.assert_code(code);
    out.assert_stdout_has(&format!("stagehand: received {sig}, stopping the stage"));
    out.assert_stdout_has("<-- use skipped (stage aborted)");
    out.assert_stdout_has("<-- after skipped (stage aborted)");
    out.assert_stdout_has("service slow stopped");
    out.assert_stdout_has("stage build ABORTED");
    for never in ["use ran", "after ran", "slow ready"] {
        assert!(!out.stdout.contains(never), "{never}\n{}", out.dump());
    }
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn sigint_while_a_service_is_still_starting() {
    interrupted_while_a_service_starts(Signal::SIGINT, 130);
}

#[test]
fn sigterm_while_a_service_is_still_starting() {
    interrupted_while_a_service_starts(Signal::SIGTERM, 143);
}

#[test]
fn step_timeout_covers_the_wait_for_services() {
    require_root();
    // `slow` is never ready: `use` times out after its 1 s, waiting.
    let ws = Workspace::new();
    let out = sandbox::run(
        marked(&ws, "fault-timeout-starting.yaml")
            .arg("--stage")
            .arg("never"),
    );
    out.assert_code(1);
    out.assert_stdout_has("<-- use TIMED OUT: timed out after 1s waiting for slow (starting)");
    assert!(
        out.summary_row("use")
            .ends_with("TIMED OUT: timed out after 1s waiting for slow (starting)"),
        "{}",
        out.dump()
    );
    assert!(!out.stdout.contains("use ran"), "{}", out.dump());
    out.assert_stdout_has("service slow stopped");
    let use_row = summary_stage(&out, "never").step("use").clone();
    assert!(
        (900..3000).contains(&use_row.finished()),
        "use ended {} ms into the stage, not after its 1 s timeout\n{}",
        use_row.finished(),
        out.dump()
    );
    assert_stage_gone(&run_id(&out), ws.marker());

    // `late` is ready after ~1 s; `use` (timeout 2 s) then needs 1.5 s more: it must be
    // stopped 2 s after it began waiting, with its command cut short.
    let ws = Workspace::new();
    let out = sandbox::run(
        marked(&ws, "fault-timeout-starting.yaml")
            .arg("--stage")
            .arg("late"),
    );
    out.assert_code(1);
    let stage = summary_stage(&out, "late");
    let late = stage.step("late");
    assert!(
        late.ready() >= 900,
        "late was ready after {} ms\n{}",
        late.ready(),
        out.dump()
    );
    let used = stage.step("use");
    assert_eq!(used.result, "TIMED OUT", "{used:?}\n{}", out.dump());
    assert!(
        used.started() >= late.ready(),
        "use started at {} ms, before late was ready at {} ms",
        used.started(),
        late.ready()
    );
    assert!(
        (1900..2900).contains(&used.finished()),
        "use ended {} ms into the stage: its 2 s timeout did not count the wait\n{}",
        used.finished(),
        out.dump()
    );
    assert_eq!(out.step_output("use"), ["use started"], "{}", out.dump());
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn service_that_starts_a_daemon_and_exits_0_is_clean_and_the_daemon_dies_at_teardown() {
    require_root();
    let ws = Workspace::new();
    let out = sandbox::run(marked(&ws, "fault-daemon.yaml"));
    out.assert_code(0);
    let id = run_id(&out);
    out.assert_stdout_has("service launcher exited after ");
    out.assert_stdout_has("service launcher had exited before the stage ended: exit code 0");
    out.assert_stdout_has("stage build succeeded");
    assert!(!out.stdout.contains("FAILED"), "{}", out.dump());
    assert!(
        out.summary_row("launcher").ends_with("started"),
        "{}",
        out.summary_row("launcher")
    );
    // While the stage ran, the daemon outlived its launcher, in the launcher's cgroup.
    let daemon: i32 = std::fs::read_to_string(ws.path().join("daemon.pid"))
        .expect("the daemon wrote its pid")
        .trim()
        .parse()
        .expect("a pid");
    let lines = out.step_output("check");
    assert!(
        lines.contains(&format!("daemon {daemon} alive after the launcher exited")),
        "{}",
        out.dump()
    );
    assert!(
        lines.iter().any(|l| l.starts_with("daemon cgroup /")
            && l.ends_with(&format!("/stagehand/{id}/launcher"))),
        "the daemon was not in the launcher's cgroup\n{}",
        out.dump()
    );
    // Teardown killed it by cgroup (it carries the marker: the leak check would find it).
    assert!(
        !processes_with(ws.marker()).iter().any(|p| p.pid == daemon),
        "the daemon {daemon} survived the stage"
    );
    assert_stage_gone(&id, ws.marker());
}

#[test]
fn missing_runtime_is_named_and_nothing_is_left() {
    require_root();
    let ws = Workspace::new();
    let missing = format!("/nonexistent/{}-runc", ws.marker());
    let store = suite_store().root();
    let out = sandbox::run(
        ws.stagehand_run(&pipeline("container-echo.yaml"))
            .arg("--root")
            .arg(store)
            .arg("--var")
            .arg(format!("marker={}", ws.marker()))
            .arg("--runtime")
            .arg(&missing),
    );
    out.assert_code(1);
    let row = out.summary_row("hello");
    assert!(
        row.contains(&format!("FAILED: step hello runs in an image, but containers are not available here: runtime {missing} is not an executable file")),
        "{row}\n{}",
        out.dump()
    );
    assert!(!out.stdout.contains("hello from"), "{}", out.dump());
    out.assert_stdout_has("stage build FAILED");
    assert_container_run_gone(&out, ws.marker(), &[store]);
}

#[test]
fn failing_runtime_shows_its_error_and_nothing_is_left() {
    require_root();
    let ws = Workspace::new();
    let dir = scratch(&ws, "runtime");
    let runtime = dir.path().join("broken-runc");
    let message = format!("broken-runc {}: cannot create the container", ws.marker());
    failing_runtime(&runtime, &message);
    let store = suite_store().root();
    let out = sandbox::run(
        ws.stagehand_run(&pipeline("container-echo.yaml"))
            .arg("--root")
            .arg(store)
            .arg("--var")
            .arg(format!("marker={}", ws.marker()))
            .arg("--runtime")
            .arg(&runtime),
    );
    out.assert_code(1);
    // The runtime's own words are the step's output, and the failed cleanup names it.
    let lines = out.step_output("hello");
    assert!(lines.contains(&message), "{}", out.dump());
    assert!(
        lines.iter().any(|l| l.starts_with(&format!(
            "[stagehand] cleanup: {} --root ",
            runtime.display()
        )) && l.contains(&message)),
        "no cleanup line names the runtime\n{}",
        out.dump()
    );
    assert!(
        out.summary_row("hello").contains("FAILED: exit code 1"),
        "{}",
        out.dump()
    );
    assert!(!out.stdout.contains("hello from"), "{}", out.dump());
    assert_container_run_gone(&out, ws.marker(), &[store]);
}

#[test]
fn full_image_store_disk_fails_the_import_clearly_and_stays_usable() {
    require_root();
    let ws = Workspace::new();
    let tmpfs = TmpfsStore::mount("6m");
    let store = tmpfs.root();
    let rootfs = suite_store().rootfs();
    image_cmd(
        ws.marker(),
        store,
        &[
            OsStr::new("import"),
            rootfs.as_os_str(),
            OsStr::new("--tag"),
            OsStr::new(BUSYBOX_IMAGE),
        ],
    )
    .assert_code(0);
    // The first run unpacks the layer into the store's cache, on the small disk too.
    let echo = |source: &str| {
        let out = sandbox::run(
            marked_in(&ws, "container-echo.yaml", store)
                .arg("--var")
                .arg(format!("source={source}")),
        );
        out.assert_code(0);
        assert_eq!(
            out.step_output("hello"),
            [format!("hello from {source}")],
            "{}",
            out.dump()
        );
        assert_container_run_gone(&out, ws.marker(), &[store]);
    };
    echo("the small disk");

    // An image bigger than what is left.
    let dir = scratch(&ws, "big-rootfs");
    let big = dir.path().join("rootfs");
    rootfs_with_big_file(&rootfs, &big, 8 << 20);
    let import = image_cmd(
        ws.marker(),
        store,
        &[
            OsStr::new("import"),
            big.as_os_str(),
            OsStr::new("--tag"),
            OsStr::new("stagehand-e2e/too-big:1"),
        ],
    );
    import.assert_code(1);
    assert!(
        import.stderr.contains("No space left on device"),
        "the import did not say the disk is full\n{}",
        import.dump()
    );
    assert_eq!(
        import.stderr.matches("No space left on device").count(),
        1,
        "the cause is repeated\n{}",
        import.dump()
    );
    // Nothing of it is visible; what was there is intact and still runs.
    let names = assert_store_consistent(ws.marker(), store);
    assert_eq!(
        names,
        [format!("docker.io/{BUSYBOX_IMAGE}")],
        "{}",
        import.dump()
    );
    echo("the full disk");
}

#[test]
fn corrupt_layer_blob_is_caught_by_its_digest() {
    require_root();
    let ws = Workspace::new();
    let dir = scratch(&ws, "corrupt");
    let store = dir.path().join("store");
    copy_store(suite_store().root(), &store);
    let layers = layer_blobs(ws.marker(), &store, BUSYBOX_IMAGE);
    let (digest, blob) = layers.first().expect("the image has a layer").clone();
    flip_middle_byte(&blob);

    let out = sandbox::run(marked_in(&ws, "container-echo.yaml", &store));
    out.assert_code(1);
    let row = out.summary_row("hello");
    assert!(
        row.contains(&format!(
            "FAILED: unpack `{BUSYBOX_IMAGE}`: blob {digest} in the image store is corrupt"
        )) && row.contains("remove the image and load it again"),
        "{row}\n{}",
        out.dump()
    );
    assert!(!out.stdout.contains("hello from"), "{}", out.dump());
    assert_container_run_gone(&out, ws.marker(), &[&store]);
    // Nothing of the bad layer was kept: no tree, no marker; the store still lists the image.
    let hex = digest.trim_start_matches("sha256:");
    let cached = store.join("layers").join(hex);
    assert!(
        !cached.join("root").exists() && !cached.join("done").exists(),
        "the corrupt layer left {} behind",
        cached.display()
    );
    assert!(half_unpacked_layers(&store).is_empty());
    let ls = image_cmd(ws.marker(), &store, &["ls"]);
    ls.assert_code(0);
    assert!(ls.stdout.contains(BUSYBOX_IMAGE), "{}", ls.dump());
}

#[test]
fn two_runs_share_one_image_store_at_once() {
    require_root();
    let ws_a = Workspace::new();
    let ws_b = Workspace::new();
    let dir = scratch(&ws_a, "shared");
    let store = dir.path().join("store");
    // A copy with no layer cache: both runs unpack the same layer at the same time.
    copy_store(suite_store().root(), &store);
    let a = sandbox::spawn(
        marked_in(&ws_a, "container-echo.yaml", &store)
            .arg("--var")
            .arg("source=run a"),
    );
    let b = sandbox::spawn(
        marked_in(&ws_b, "container-echo.yaml", &store)
            .arg("--var")
            .arg("source=run b"),
    );
    let (a, b) = (a.wait(RUN_TIMEOUT), b.wait(RUN_TIMEOUT));
    for (out, ws, source) in [(&a, &ws_a, "run a"), (&b, &ws_b, "run b")] {
        out.assert_code(0);
        assert_eq!(
            out.step_output("hello"),
            [format!("hello from {source}")],
            "{}",
            out.dump()
        );
        assert_container_run_gone(out, ws.marker(), &[&store]);
    }
    let names = assert_store_consistent(ws_a.marker(), &store);
    assert!(
        names.contains(&format!("docker.io/{BUSYBOX_IMAGE}")),
        "{names:?}"
    );
    // The layer was unpacked once, completely.
    let unpacked: Vec<PathBuf> = std::fs::read_dir(store.join("layers"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|d| d.join("done").is_file())
        .collect();
    let wanted = layer_blobs(ws_a.marker(), &store, BUSYBOX_IMAGE).len();
    assert_eq!(unpacked.len(), wanted, "{unpacked:?}");
}

/// The image `stagehand-e2e/big:1` (busybox plus a 64 MiB file) in a fresh store under `dir`:
/// its first unpack takes seconds.
fn big_image_store(ws: &Workspace, dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    rootfs_with_big_file(&suite_store().rootfs(), &rootfs, 64 << 20);
    let store = dir.join("store");
    image_cmd(
        ws.marker(),
        &store,
        &[
            OsStr::new("import"),
            rootfs.as_os_str(),
            OsStr::new("--tag"),
            OsStr::new("stagehand-e2e/big:1"),
        ],
    )
    .assert_code(0);
    // `image import` checks the layer by unpacking it; drop that unpacked copy (a cache the
    // store rebuilds on demand), so the run has to unpack it again.
    for e in std::fs::read_dir(store.join("layers")).expect("the layer cache") {
        let path = e.expect("a cache entry").path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).expect("remove an unpacked layer");
        }
    }
    store
}

#[test]
fn sigterm_while_a_container_image_is_being_prepared() {
    require_root();
    let ws = Workspace::new();
    let dir = scratch(&ws, "big-image");
    let store = big_image_store(&ws, dir.path());
    let (digest, _) = layer_blobs(ws.marker(), &store, "stagehand-e2e/big:1")
        .first()
        .expect("a layer")
        .clone();
    let cache = store
        .join("layers")
        .join(digest.trim_start_matches("sha256:"));

    let running = sandbox::spawn(
        marked_in(&ws, "fault-big-image.yaml", &store)
            .arg("--var")
            .arg("image=stagehand-e2e/big:1"),
    );
    running.wait_for_stdout(
        "--> big running in stagehand-e2e/big:1",
        Duration::from_secs(15),
    );
    // Signal once the unpack is under way (a tree, no marker yet).
    let deadline = Instant::now() + Duration::from_secs(10);
    let unpacking = || cache.join("root").exists() && !cache.join("done").exists();
    while !unpacking() {
        assert!(
            !cache.join("done").exists() && Instant::now() < deadline,
            "the unpack of the big layer was not seen in progress: {}",
            running.stdout()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = interrupt(running, Signal::SIGTERM, Duration::from_secs(30));
    out.assert_code(143);
    out.assert_stdout_has("stagehand: received SIGTERM, stopping the stage");
    out.assert_stdout_has("stage build ABORTED");
    out.assert_stdout_has("<-- after skipped (stage aborted)");
    let row = out.summary_row("big");
    assert!(row.ends_with("aborted"), "{row}\n{}", out.dump());
    assert_container_run_gone(&out, ws.marker(), &[&store]);
    // The layer is either unpacked completely or not at all.
    assert_store_consistent(ws.marker(), &store);
}

/// A stage whose container step pulls its image from a registry that accepts and never
/// answers, with the run's store under `dir` and `extra` arguments; the guard removes what a
/// SIGKILLed stagehand would leave, should it hang.
fn spawn_against_silent_registry(
    ws: &Workspace,
    dir: &Path,
    extra: &[&str],
) -> (SilentRegistry, Running, RunDirGuard) {
    let registry = SilentRegistry::start();
    let image = format!("{}/lab/busybox:1", registry.host());
    let mut cmd = marked_in(ws, "fault-big-image.yaml", &dir.join("store"))
        .arg("--var")
        .arg(format!("image={image}"));
    for a in extra {
        cmd = cmd.arg(a);
    }
    let running = sandbox::spawn(cmd);
    let guard = RunDirGuard::new(
        &run_id_of_pid(running.pid(), Duration::from_secs(5)),
        ws.marker(),
    );
    (registry, running, guard)
}

/// The step's `timeout` covers pulling its image: a registry that never answers does not hold
/// the stage for the pull's own timeouts (3 tries of a 60 s read timeout).
#[test]
fn container_step_timeout_covers_pulling_its_image() {
    require_root();
    let ws = Workspace::new();
    let dir = scratch(&ws, "silent");
    let store = dir.path().join("store");
    let (registry, running, _dir) =
        spawn_against_silent_registry(&ws, dir.path(), &["--var", "timeout=2s"]);
    let out = running.wait(Duration::from_secs(20));
    out.assert_code(1);
    assert!(
        registry.accepted() > 0,
        "stagehand never asked the registry"
    );
    assert!(
        out.summary_row("big").contains("TIMED OUT"),
        "{}",
        out.dump()
    );
    assert_container_run_gone(&out, ws.marker(), &[&store]);
    assert_store_consistent(ws.marker(), &store);
}

/// SIGTERM while a container step's image is being pulled from a registry that never answers
/// is acted on at once, not when the pull gives up (about 2 minutes).
#[test]
fn sigterm_while_an_image_pull_hangs() {
    require_root();
    let ws = Workspace::new();
    let dir = scratch(&ws, "silent");
    let store = dir.path().join("store");
    let (registry, running, _dir) = spawn_against_silent_registry(&ws, dir.path(), &[]);
    running.wait_for_stdout("--> big running in", Duration::from_secs(15));
    let deadline = Instant::now() + Duration::from_secs(10);
    while registry.accepted() == 0 {
        assert!(
            Instant::now() < deadline,
            "stagehand never asked the registry"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = interrupt(running, Signal::SIGTERM, Duration::from_secs(10));
    out.assert_code(143);
    out.assert_stdout_has("stage build ABORTED");
    assert_container_run_gone(&out, ws.marker(), &[&store]);
    assert_store_consistent(ws.marker(), &store);
}
