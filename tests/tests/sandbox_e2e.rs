//! End-to-end: the stage sandbox (one pod per stage) of the built `stagehand` binary, with
//! real cgroups and network namespaces.
//!
//! Owns: the proofs for the sandbox: memory limits and OOM reporting, CPU limits read
//! back from the cgroup, per-stage ports (two PostgreSQL servers on 5432 in two stages), the
//! reference health-check pipeline as written (`-h Background_1`, examples/health-checks.yaml),
//! published ports reached from the host, outbound traffic to the host's loopback (and none
//! with `--network none`), `stagehand ps`, and teardown in every way a stage can end (success,
//! a failed step, a step timeout, SIGINT, SIGKILL of stagehand followed by `stagehand gc`),
//! each with a service that escapes its process group with `setsid` and one that ignores
//! SIGTERM. Every test ends with [`assert_stage_gone`]: no cgroup of the run, no namespace
//! mount, no process carrying the test's marker, and a finished journal.
//! Does not own: the helpers (`stagehand_e2e::{e2e, sandbox}`), or the suites of plain host
//! steps (`host_e2e.rs`).
//!
//! Needs root, a cgroup v1 or v2 host with the memory and cpu controllers, slirp4netns, curl,
//! pgrep, python3, the PostgreSQL server binaries and client, and `cargo build -p stagehand`
//! beforehand.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use stagehand_e2e::bin_path::workspace_root;
use stagehand_e2e::e2e::{
    Finished, Workspace, assert_ports_closed, assert_ports_free, pipeline, processes_with,
};
use stagehand_e2e::sandbox::{
    self, HostServer, RunDirGuard, assert_stage_gone, cgroup_dirs, cgroup_of, curl, journal,
    netns_mounts, netns_of, netns_of_file, numeric_fields, require_root, run_id, run_id_of_pid,
    stagehand,
};

/// The host port `sandbox-ports.yaml` publishes.
const PUBLISHED_PORT: u16 = 18432;

/// The newest PostgreSQL server binary directory (Debian keeps them off PATH).
fn postgres_bin_dir() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("postgres").is_file())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str()?.parse::<u32>().ok())
            .unwrap_or(0)
    });
    dirs.pop().expect(
        "no PostgreSQL server binaries under /usr/lib/postgresql (apt-get install postgresql)",
    )
}

/// Run `file` in `ws` with `--var marker=<the test's marker>` and the extra arguments.
fn run_marked(ws: &Workspace, file: &Path, extra: &[&str]) -> Finished {
    let mut cmd = ws
        .stagehand_run(file)
        .arg("--var")
        .arg(format!("marker={}", ws.marker()));
    for a in extra {
        cmd = cmd.arg(a);
    }
    sandbox::run(cmd)
}

/// The one line step `id` printed that starts with `prefix`.
fn step_line(out: &Finished, id: &str, prefix: &str) -> String {
    out.step_output(id)
        .into_iter()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| {
            panic!(
                "{id} printed no line starting with {prefix:?}\n{}",
                out.dump()
            )
        })
}

#[test]
fn memory_limit_oom_kills_a_service_and_a_run_step_and_says_so() {
    require_root();
    let ws = Workspace::new();
    let out = run_marked(
        &ws,
        &pipeline("sandbox-oom.yaml"),
        &["--stop-timeout", "1s"],
    );
    if stagehand_e2e::rootless::limits_not_enforced(&out) {
        assert_stage_gone(&run_id(&out), ws.marker());
        return;
    }
    out.assert_code(1);
    let id = run_id(&out);

    // The service's shell (`sh -e`) died with its `dd`, and stagehand said why right away,
    // stopping the step that was running against it.
    out.assert_stdout_has("!!! service hog failed: was killed: out of memory (limit 32Mi)");
    out.assert_stdout_has("<-- settle aborted");
    // A Run step: the OOM kill is its failure message, on the status line and in the summary.
    out.assert_stdout_has("<-- runhog FAILED: runhog was killed: out of memory (limit 32Mi)");
    // The service's death is not lost at teardown: its row says why, and the stage failed.
    assert!(
        out.summary_row("hog")
            .ends_with("FAILED: was killed: out of memory (limit 32Mi)"),
        "{}",
        out.summary_row("hog")
    );
    assert!(
        out.summary_row("runhog")
            .ends_with("FAILED: runhog was killed: out of memory (limit 32Mi)"),
        "{}",
        out.summary_row("runhog")
    );
    for survived in ["hog survived", "runhog survived"] {
        assert!(
            !out.stdout.contains(survived),
            "{survived}: the limit was not enforced\n{}",
            out.dump()
        );
    }
    out.assert_stdout_has("stage build FAILED");
    assert_stage_gone(&id, ws.marker());
}

#[test]
fn cpu_limit_holds_a_busy_service_to_its_share() {
    require_root();
    let ws = Workspace::new();
    let out = run_marked(
        &ws,
        &pipeline("sandbox-cpu.yaml"),
        &["--stop-timeout", "1s"],
    );
    if stagehand_e2e::rootless::limits_not_enforced(&out) {
        assert_stage_gone(&run_id(&out), ws.marker());
        return;
    }
    out.assert_code(0);
    let id = run_id(&out);

    // The measuring step found the burner in the burner's own cgroup of this run.
    let cgroup = step_line(&out, "measure", "cgroup ");
    assert!(
        cgroup.ends_with(&format!("/stagehand/{id}/burner")),
        "burner is not in its step cgroup: {cgroup}\n{}",
        out.dump()
    );
    // The Background default, 400m: a 40 ms quota per 100 ms period.
    let quota = out
        .step_output("measure")
        .into_iter()
        .find(|l| l.starts_with("cpu.cfs_quota_us ") || l.starts_with("cpu.max "))
        .unwrap_or_else(|| panic!("no quota line\n{}", out.dump()));
    assert!(
        quota == "cpu.cfs_quota_us 40000 cpu.cfs_period_us 100000"
            || quota == "cpu.max 40000 100000",
        "not a 400m quota: {quota}"
    );

    // Over 3 s the endless loop used about 0.4 CPU: unlimited it would use a whole one.
    let f = numeric_fields(&step_line(&out, "measure", "usage_ns="));
    let (usage, wall, throttled) = (f["usage_ns"], f["wall_ns"], f["throttled"]);
    assert!(
        wall >= 2_900_000_000,
        "measured over {wall} ns only\n{}",
        out.dump()
    );
    let share = usage as f64 / wall as f64;
    assert!(
        share <= 0.5,
        "the burner used {share:.2} CPU ({usage} ns in {wall} ns) under a 400m limit\n{}",
        out.dump()
    );
    assert!(
        share > 0.2,
        "the burner used only {share:.2} CPU ({usage} ns in {wall} ns): did it run at all?\n{}",
        out.dump()
    );
    assert!(
        throttled > 0,
        "the burner was never throttled\n{}",
        out.dump()
    );
    assert_stage_gone(&id, ws.marker());
}

#[test]
fn two_stages_each_run_postgres_on_5432() {
    require_root();
    postgres_bin_dir();
    let ws = Workspace::new();
    // PostgreSQL runs as `postgres` and keeps PGDATA in the workspace.
    ws.open_to_all_users();
    let listening_before = stagehand_e2e::e2e::listening_tcp_ports().contains(&5432);
    let out = sandbox::run(
        ws.stagehand_run(&pipeline("sandbox-same-port.yaml"))
            .arg("--stop-timeout")
            .arg("5s"),
    );
    out.assert_code(0);
    let id = run_id(&out);

    let ws_path = ws.path().canonicalize().unwrap();
    // Both stages started their own server on 5432 and reached it as `db`, one after the
    // other: the first stage's server was stopped before the second began.
    assert_eq!(
        out.step_output("check"),
        [
            format!("stage first: first in {}/pgdata-first", ws_path.display()),
            format!(
                "stage second: second in {}/pgdata-second",
                ws_path.display()
            ),
        ],
        "{}",
        out.dump()
    );
    let first_stopped = out
        .stdout
        .find("service db stopped: exit code 0")
        .expect("first server stopped cleanly");
    let second_banner = out
        .stdout
        .find("==> stage second")
        .expect("second stage ran");
    assert!(
        first_stopped < second_banner,
        "stage second began before stage first's server stopped\n{}",
        out.dump()
    );
    assert_eq!(
        out.stdout
            .matches("service db stopped: exit code 0")
            .count(),
        2,
        "{}",
        out.dump()
    );
    out.assert_stdout_has("stage first succeeded");
    out.assert_stdout_has("stage second succeeded");
    // The stages' 5432 was never the host's.
    assert_eq!(
        stagehand_e2e::e2e::listening_tcp_ports().contains(&5432),
        listening_before,
        "the host's port 5432 changed state"
    );
    assert_stage_gone(&id, ws.marker());
}

#[test]
fn reference_health_check_pipeline_works_as_written() {
    require_root();
    let example = workspace_root().join("examples").join("health-checks.yaml");
    let yaml = std::fs::read_to_string(&example).unwrap();
    // The reference's health-check commands, unchanged: services are reached by step id.
    for line in [
        "psql -U postgres -d test1 -h Background_1 -p 5433",
        "psql -U postgres -d test2 -h Background_2 -p 5434",
    ] {
        assert!(
            yaml.lines().any(|l| l.trim() == line),
            "{} no longer runs `{line}` as the reference writes it",
            example.display()
        );
    }
    let ws = Workspace::new();
    ws.open_to_all_users();
    // The PATH `./dev example` gives it: examples/bin (the entry point), the server binaries.
    let path = format!(
        "{}:{}:{}",
        workspace_root().join("examples").join("bin").display(),
        postgres_bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = sandbox::run(
        ws.stagehand_run(&example)
            .arg("--stop-timeout")
            .arg("5s")
            .env("PATH", path),
    );
    out.assert_code(0);
    let id = run_id(&out);

    for (check, service) in [
        ("sg1_Run_1", "sg1_Background_1"),
        ("sg2_Run_2", "sg2_Background_2"),
    ] {
        out.assert_stdout_has(&format!("<-- {service} started"));
        out.assert_stdout_has(&format!("<-- {check} passed"));
        out.assert_stdout_has(&format!("service {service} stopped: exit code 0"));
    }
    assert_eq!(
        out.step_output("Run_3"),
        [
            "Background_1: test1=hello from test1",
            "Background_2: test2=hello from test2"
        ],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("stage build succeeded");
    assert_stage_gone(&id, ws.marker());
}

#[test]
fn published_port_answers_on_the_hosts_loopback() {
    require_root();
    assert_ports_free(&[PUBLISHED_PORT]);
    let ws = Workspace::new();
    std::fs::write(
        ws.path().join("page.txt"),
        format!("page of {}\n", ws.marker()),
    )
    .unwrap();
    let running = sandbox::spawn(
        ws.stagehand_run(&pipeline("sandbox-ports.yaml"))
            .arg("--stop-timeout")
            .arg("1s"),
    );
    running.wait_for_stdout("| waiting for go", Duration::from_secs(10));

    // From outside the stage, as a user's browser would. The server may still be starting.
    let url = format!("http://127.0.0.1:{PUBLISHED_PORT}/page.txt");
    let deadline = Instant::now() + Duration::from_secs(10);
    let page = loop {
        match curl(&url) {
            Ok(body) => break body,
            Err(e) if Instant::now() >= deadline => panic!("{e}\n{}", running.stdout()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(page, format!("page of {}\n", ws.marker()));
    std::fs::write(ws.path().join("go"), "").unwrap();

    let out = running.wait(Duration::from_secs(20));
    out.assert_code(0);
    out.assert_stdout_has("<-- hold passed");
    assert!(
        out.step_output("web")
            .iter()
            .any(|l| l.contains("\"GET /page.txt HTTP/1.1\" 200")),
        "the service did not log the request\n{}",
        out.dump()
    );
    assert_ports_closed(&[PUBLISHED_PORT], Duration::from_secs(2));
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn run_step_reaches_the_hosts_loopback_through_slirp() {
    require_root();
    let ws = Workspace::new();
    let token = format!("hello from the host to {}", ws.marker());
    let server = HostServer::start(&token);
    let out = sandbox::run(
        ws.stagehand_run(&pipeline("sandbox-outbound.yaml"))
            .arg("--var")
            .arg(format!("port={}", server.port())),
    );
    if stagehand_e2e::rootless::outbound_unavailable(&out) {
        // Said up front; the stage ran with loopback only, so the fetch could not connect.
        out.assert_code(1);
        assert_eq!(server.hits(), 0);
        return;
    }
    out.assert_code(0);
    assert_eq!(
        out.step_output("fetch"),
        [format!("body: {token}")],
        "{}",
        out.dump()
    );
    assert!(server.hits() >= 1, "the host server saw no connection");
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn network_none_has_no_way_out() {
    require_root();
    let ws = Workspace::new();
    let server = HostServer::start("unreachable");
    let out = sandbox::run(
        ws.stagehand_run(&pipeline("sandbox-outbound.yaml"))
            .arg("--network")
            .arg("none")
            .arg("--var")
            .arg(format!("port={}", server.port())),
    );
    out.assert_code(1);
    // curl exit 7: could not connect (there is no route out of the namespace).
    out.assert_stdout_has("<-- fetch FAILED: exit code 7");
    assert!(!out.stdout.contains("body:"), "{}", out.dump());
    assert_eq!(
        server.hits(),
        0,
        "the host server was reached with --network none"
    );
    assert_stage_gone(&run_id(&out), ws.marker());
}

/// Start the lifecycle pipeline in `mode` and wait until `work` runs (both services up, the
/// `setsid` grandchild of `forker` alive).
fn start_lifecycle(ws: &Workspace, mode: &str) -> stagehand_e2e::e2e::Running {
    let running = sandbox::spawn(
        ws.stagehand_run(&pipeline("sandbox-lifecycle.yaml"))
            .arg("--var")
            .arg(format!("marker={}", ws.marker()))
            .arg("--var")
            .arg(format!("mode={mode}"))
            .arg("--stop-timeout")
            .arg("1s"),
    );
    running.wait_for_stdout("| work started", Duration::from_secs(10));
    running
}

/// The process `forker` left in its own session, found by its argv.
fn forked_grandchild(marker: &str) -> Option<i32> {
    let needle = format!("forked-{marker}");
    processes_with(marker)
        .into_iter()
        .find(|p| p.cmdline.contains(&needle))
        .map(|p| p.pid)
}

/// What every lifecycle run says about its services: the one ignoring SIGTERM needed SIGKILL
/// after the 1 s stop timeout; the other stopped (its `setsid` grandchild went by cgroup).
fn assert_services_stopped(out: &Finished) {
    out.assert_stdout_has("stubborn | ignoring SIGTERM");
    out.assert_stdout_has("service stubborn stopped: did not exit within 1s of SIGTERM, killed");
    out.assert_stdout_has("service forker stopped");
    assert!(
        out.elapsed < Duration::from_secs(15),
        "took {:?}\n{}",
        out.elapsed,
        out.dump()
    );
}

#[test]
fn stage_that_succeeds_leaves_nothing() {
    require_root();
    let ws = Workspace::new();
    let out = sandbox::run(
        ws.stagehand_run(&pipeline("sandbox-lifecycle.yaml"))
            .arg("--var")
            .arg(format!("marker={}", ws.marker()))
            .arg("--var")
            .arg("mode=pass")
            .arg("--stop-timeout")
            .arg("1s"),
    );
    out.assert_code(0);
    assert!(
        out.step_output("work")
            .contains(&"work started".to_string()),
        "{}",
        out.dump()
    );
    out.assert_stdout_has("<-- work passed");
    out.assert_stdout_has("<-- after passed");
    assert_services_stopped(&out);
    // One stop timeout for the stubborn service, not the default 10 s.
    assert!(
        out.elapsed >= Duration::from_secs(1),
        "SIGKILL before the stop timeout: {:?}",
        out.elapsed
    );
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn stage_with_a_failed_step_leaves_nothing() {
    require_root();
    let ws = Workspace::new();
    let out = run_marked(
        &ws,
        &pipeline("sandbox-lifecycle.yaml"),
        &["--var", "mode=fail", "--stop-timeout", "1s"],
    );
    out.assert_code(1);
    out.assert_stdout_has("<-- work FAILED: exit code 3");
    out.assert_stdout_has("<-- after skipped");
    out.assert_stdout_has("stage build FAILED");
    assert_services_stopped(&out);
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn stage_with_a_timed_out_step_leaves_nothing() {
    require_root();
    let ws = Workspace::new();
    let out = run_marked(
        &ws,
        &pipeline("sandbox-lifecycle.yaml"),
        &["--var", "mode=hang", "--stop-timeout", "1s"],
    );
    out.assert_code(1);
    out.assert_stdout_has("<-- work TIMED OUT: timed out after 5s");
    out.assert_stdout_has("<-- after skipped");
    assert_services_stopped(&out);
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn sigint_leaves_nothing() {
    require_root();
    let ws = Workspace::new();
    let mut running = start_lifecycle(&ws, "hang");
    assert!(
        forked_grandchild(ws.marker()).is_some(),
        "no setsid grandchild while the stage runs"
    );
    running.signal(Signal::SIGINT);
    let out = running.wait(Duration::from_secs(15));
    out.assert_code(130);
    out.assert_stdout_has("received SIGINT");
    out.assert_stdout_has("<-- work aborted");
    out.assert_stdout_has("stage build ABORTED");
    assert!(!out.stdout.contains("after ran"), "{}", out.dump());
    assert_services_stopped(&out);
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn sigkill_of_stagehand_then_gc_leaves_nothing() {
    require_root();
    let ws = Workspace::new();
    let mut running = start_lifecycle(&ws, "hang");
    let pid = running.pid();
    let id = run_id_of_pid(pid, Duration::from_secs(5));
    let _dir = RunDirGuard::new(&id, ws.marker());
    let before = journal(&id).expect("journal of the running stage");
    if stagehand_e2e::e2e::rootless_rerun() {
        // Rootless, the pid the test holds is the parent on the host; its namespace side gets
        // SIGTERM when it dies and tears the stage down itself, setsid grandchild included
        // (stagehand is its subreaper). gc then has nothing left to do.
        running.signal(Signal::SIGKILL);
        let out = running.wait(Duration::from_secs(5));
        assert_eq!(out.signal, Some(libc::SIGKILL), "{}", out.dump());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !journal(&id).is_some_and(|j| j.finished) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            journal(&id).is_some_and(|j| j.finished),
            "{:?}",
            journal(&id)
        );
        assert_eq!(forked_grandchild(ws.marker()), None);
        stagehand(ws.marker(), "gc").assert_code(0);
        assert_stage_gone(&id, ws.marker());
        return;
    }
    assert_eq!(before.cgroups, [format!("stagehand/{id}")]);
    assert_eq!(
        before.services.keys().collect::<Vec<_>>(),
        ["forker", "stubborn"]
    );

    // From the kill until our gc, no other run of this suite may start (and collect it first).
    let gate = sandbox::hold_off_other_runs();
    running.signal(Signal::SIGKILL);
    let out = running.wait(Duration::from_secs(5));
    assert_eq!(out.signal, Some(libc::SIGKILL), "{}", out.dump());

    // stagehand could not clean up. Its direct children got the parent-death signal, but the
    // grandchild `forker` put in a session of its own is still running, in forker's cgroup,
    // and the cgroups and the namespace mount are still there: that is gc's work.
    let grandchild =
        forked_grandchild(ws.marker()).expect("the setsid grandchild survived stagehand");
    let cg = cgroup_of(grandchild, "memory").unwrap_or_default();
    assert!(
        cg.ends_with(&format!("/stagehand/{id}/forker")),
        "grandchild {grandchild} is in {cg}, not in forker's cgroup"
    );
    assert!(
        !cgroup_dirs(&id).is_empty(),
        "no cgroup of run {id} left to collect"
    );
    assert_eq!(
        netns_mounts(&id).len(),
        1,
        "the stage namespace mount is gone already"
    );
    assert!(journal(&id).is_some_and(|j| !j.finished));

    let gc = stagehand(ws.marker(), "gc");
    drop(gate);
    gc.assert_code(0);
    for removed in [
        format!("run {id}: removed cgroup stagehand/{id}"),
        format!("run {id}: removed netns /run/stagehand/{id}/netns-build"),
    ] {
        assert!(
            gc.stdout.lines().any(|l| l == removed),
            "gc did not report {removed:?} (did another stagehand collect the run first?)\n{}",
            gc.dump()
        );
    }
    assert_stage_gone(&id, ws.marker());
    // A second gc finds nothing of this run.
    let again = stagehand(ws.marker(), "gc");
    assert!(!again.stdout.contains(&id), "{}", again.dump());
}

#[test]
fn ps_lists_the_running_stage() {
    require_root();
    let ws = Workspace::new();
    let running = start_lifecycle(&ws, "gate");
    let id = run_id_of_pid(running.pid(), Duration::from_secs(5));

    let ps = stagehand(ws.marker(), "ps");
    ps.assert_code(0);
    // This run's block: from its `run` line to the next one.
    let block: Vec<&str> = ps
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with(&format!("run {id} ")))
        .enumerate()
        .take_while(|(i, l)| *i == 0 || !l.starts_with("run "))
        .map(|(_, l)| l)
        .collect();
    if stagehand_e2e::e2e::rootless_rerun() {
        // Rootless: the listed pid is the namespace side (a child of the one the test
        // started); no cgroups, and the namespace's mounts are private to it.
        let journal_pid = journal(&id).expect("journal").pid;
        assert!(
            block.first().is_some_and(
                |l| l.starts_with(&format!("run {id} (stagehand pid {journal_pid}, up "))
            ),
            "ps does not list run {id}\n{}",
            ps.dump()
        );
        for service in ["forker", "stubborn"] {
            assert!(
                block
                    .iter()
                    .any(|l| l.starts_with(&format!("  service {service} pid "))),
                "ps lists no pid for {service}: {block:#?}"
            );
        }
        return;
    }
    assert!(
        block.first().is_some_and(
            |l| l.starts_with(&format!("run {id} (stagehand pid {}, up ", running.pid()))
        ),
        "ps does not list run {id}\n{}",
        ps.dump()
    );
    let netns_file = sandbox::run_dir(&id).join("netns-build");
    assert!(
        block
            .iter()
            .any(|l| l.starts_with("  cgroup /sys/fs/cgroup/")
                && l.ends_with(&format!("/stagehand/{id}"))),
        "{block:#?}"
    );
    assert!(
        block.contains(&format!("  netns  {}", netns_file.display()).as_str()),
        "{block:#?}"
    );
    // Each listed service pid is that service, in its cgroup, in the stage's namespace.
    let stage_ns = netns_of_file(&netns_file).expect("the stage netns file");
    for service in ["forker", "stubborn"] {
        let line = block
            .iter()
            .find(|l| l.starts_with(&format!("  service {service} pid ")))
            .unwrap_or_else(|| panic!("ps lists no pid for {service}: {block:#?}"));
        let pid: i32 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let cg = cgroup_of(pid, "memory").unwrap_or_default();
        assert!(
            cg.ends_with(&format!("/stagehand/{id}/{service}")),
            "{service} pid {pid} is in {cg}"
        );
        assert_eq!(
            netns_of(pid),
            Some(stage_ns.clone()),
            "{service} pid {pid} is not in the stage netns"
        );
    }

    std::fs::write(ws.path().join("go"), "").unwrap();
    let out = running.wait(Duration::from_secs(20));
    out.assert_code(0);
    assert!(
        out.step_output("work").contains(&"got go".to_string()),
        "{}",
        out.dump()
    );
    assert_services_stopped(&out);
    assert_stage_gone(&id, ws.marker());
    let after = stagehand(ws.marker(), "ps");
    assert!(
        !after.stdout.contains(&id),
        "ps still lists the finished run\n{}",
        after.dump()
    );
}
