//! End-to-end: the built `stagehand` binary running stages on this host with real services.
//!
//! Owns: the host suites: the health-check pipeline of the reference (two parallel
//! step groups, each a Background PostgreSQL plus a `psql` health check, then a step that uses
//! both databases; once in stagehand's default stage network, where step ids resolve, and once
//! with `--network host` on the host's ports 5433/5434), a stage that fails mid-way, a stage
//! interrupted by SIGINT or SIGTERM, step timeouts, a service that ignores SIGTERM, output
//! variables, secret masking, and a missing interpreter. Each test checks that nothing it
//! started is left running afterwards (by the test's marker) and that the run's cgroups and
//! network namespace are gone. Does not own: the helpers (`stagehand_e2e::e2e`), or container
//! steps.
//!
//! Needs root (CI runs as root: `runAsUser` and reading other processes' environments), the
//! PostgreSQL 15 server binaries and `psql`, and `cargo build -p stagehand` beforehand.

use std::time::Duration;

use nix::sys::signal::Signal;
use stagehand_e2e::e2e::{
    Workspace, assert_no_leaks, assert_ports_closed, assert_ports_free, pipeline, processes_with,
};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the host end-to-end suites need root (runAsUser, /proc of other users)"
    );
}

/// Index of the first line of `text` containing `needle`, for ordering checks.
fn line_index(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{text}"))
}

/// The network a health-check run uses.
#[derive(Clone, Copy, PartialEq)]
enum Net {
    /// stagehand's default: one network namespace for the stage, step ids resolve.
    Stage,
    /// `--network host`: the services listen on the host's 127.0.0.1:5433/5434.
    Host,
}

/// The reference health-check pipeline with two PostgreSQL services, then the leak checks.
fn health_checks(net: Net) {
    require_root();
    assert!(
        std::path::Path::new("/usr/lib/postgresql/15/bin/postgres").is_file(),
        "PostgreSQL 15 server binaries are missing (apt-get install postgresql-15)"
    );
    let ports = [5433, 5434];
    let ws = Workspace::new();
    // PostgreSQL runs as `postgres` and keeps PGDATA in the workspace.
    ws.open_to_all_users();
    let file = match net {
        Net::Stage => pipeline("health-checks.yaml"),
        Net::Host => {
            // On the host's network the services share it with everything else: the ports
            // must be free, and step ids do not resolve, so the checks use localhost.
            assert_ports_free(&ports);
            let text = std::fs::read_to_string(pipeline("health-checks.yaml")).unwrap();
            let text = text
                .replace("-h Background_1", "-h localhost")
                .replace("-h Background_2", "-h localhost");
            let copy = ws.path().join("health-checks-host-network.yaml");
            std::fs::write(&copy, text).unwrap();
            copy
        }
    };
    let mut cmd = ws.stagehand_run(&file).arg("--stop-timeout").arg("5s");
    if net == Net::Host {
        cmd = cmd.arg("--network").arg("host");
    }
    let out = cmd.output();
    out.assert_code(0);

    // Both health checks ran `psql ... -c 'select 1'` against their own service and passed.
    for (run, bg) in [
        ("sg1_Run_1", "sg1_Background_1"),
        ("sg2_Run_2", "sg2_Background_2"),
    ] {
        out.assert_stdout_has(&format!("<-- {run} passed"));
        out.assert_stdout_has(&format!("<-- {bg} started"));
        assert!(
            out.step_output(run).iter().any(|l| l.trim() == "(1 row)"),
            "{run} did not get a row\n{}",
            out.dump()
        );
        assert!(
            out.summary_row(run).ends_with("passed"),
            "{}",
            out.summary_row(run)
        );
        // The service was stopped by stagehand at the end, and shut down cleanly.
        out.assert_stdout_has(&format!("service {bg} stopped: exit code 0"));
    }
    // The two groups ran in parallel: both services started before either check finished.
    for bg in ["sg1_Background_1", "sg2_Background_2"] {
        for run in ["sg1_Run_1", "sg2_Run_2"] {
            assert!(
                line_index(&out.stdout, &format!("<-- {bg} started"))
                    < line_index(&out.stdout, &format!("<-- {run} passed")),
                "{bg} should start before {run} ends\n{}",
                out.dump()
            );
        }
    }
    // Each service initialised its own PGDATA in this run's workspace.
    for port in ports {
        let pgdata = ws.path().join(format!("pgdata-{port}"));
        assert!(
            pgdata.join("PG_VERSION").is_file(),
            "no cluster in {}\n{}",
            pgdata.display(),
            out.dump()
        );
    }
    // Run_3 ran after the parallel block, wrote to both databases and read the rows back.
    assert_eq!(
        out.step_output("Run_3"),
        ["row: test1=hello from test1", "row: test2=hello from test2"],
        "Run_3 output\n{}",
        out.dump()
    );
    assert!(line_index(&out.stdout, "--> Run_3") > line_index(&out.stdout, "<-- sg1_Run_1 passed"));
    assert!(line_index(&out.stdout, "--> Run_3") > line_index(&out.stdout, "<-- sg2_Run_2 passed"));
    out.assert_stdout_has("stage build succeeded");

    // Nothing of either PostgreSQL is left: no process in or about this run's workspace
    // (postgres `chdir`s into PGDATA), no stage sandbox (with it the stage's network), and on
    // the host's network no listener on the ports.
    assert_no_leaks(ws.marker());
    out.assert_sandbox_gone();
    if net == Net::Host {
        assert_ports_closed(&ports, Duration::from_secs(3));
    }
}

#[test]
fn health_checks_on_two_postgres_services() {
    health_checks(Net::Stage);
}

#[test]
fn health_checks_on_two_postgres_services_host_network() {
    health_checks(Net::Host);
}

#[test]
fn failing_stage_skips_the_rest_and_stops_services() {
    require_root();
    let ws = Workspace::new();
    let out = ws
        .stagehand_run(&pipeline("fail-midway.yaml"))
        .arg("--var")
        .arg(format!("marker={}", ws.marker()))
        .arg("--stop-timeout")
        .arg("2s")
        .output();
    out.assert_code(1);
    out.assert_stdout_has("<-- svc started");
    out.assert_stdout_has("<-- before passed");
    out.assert_stdout_has("<-- boom FAILED: exit code 3");
    out.assert_stdout_has("<-- after skipped (an earlier step failed)");
    assert!(
        out.step_output("after").is_empty(),
        "`after` ran\n{}",
        out.dump()
    );
    out.assert_stdout_has("service svc stopped");
    out.assert_stdout_has("stage build FAILED");
    assert!(
        out.summary_row("boom").ends_with("FAILED: exit code 3"),
        "{}",
        out.summary_row("boom")
    );
    assert!(
        out.summary_row("after").contains("skipped"),
        "{}",
        out.summary_row("after")
    );
    assert!(
        out.summary_row("svc").contains("service"),
        "{}",
        out.summary_row("svc")
    );
    assert!(
        out.elapsed < Duration::from_secs(10),
        "took {:?}",
        out.elapsed
    );
    assert_no_leaks(ws.marker());
    out.assert_sandbox_gone();
}

/// Start the interrupt pipeline, wait until its long step's `sleep 300` and the service are
/// running, send `sig` to stagehand, and check it stops everything and exits with `code`.
fn interrupted_by(sig: Signal, code: i32) {
    require_root();
    let ws = Workspace::new();
    let mut running = ws
        .stagehand_run(&pipeline("interrupt.yaml"))
        .arg("--var")
        .arg(format!("marker={}", ws.marker()))
        .arg("--stop-timeout")
        .arg("2s")
        .spawn();
    running.wait_for_stdout("long started", Duration::from_secs(10));
    // Wait for the processes themselves, which also shows the leak check can see them.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let procs = processes_with(ws.marker());
        let sleep = procs.iter().any(|p| p.cmdline == "sleep 300");
        let service = procs
            .iter()
            .any(|p| p.cmdline.starts_with("sh -c") && p.found_in == "cmdline");
        if sleep && service {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "service and `sleep 300` not both seen: {procs:?}\n{}",
            running.stdout()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let sent = std::time::Instant::now();
    running.signal(sig);
    let out = running.wait(Duration::from_secs(20));
    let took = sent.elapsed();
    out.assert_code(code);
    assert!(
        took < Duration::from_secs(5),
        "stagehand took {took:?} to stop after {sig}\n{}",
        out.dump()
    );
    out.assert_stdout_has(&format!("received {sig}"));
    out.assert_stdout_has("<-- long aborted");
    out.assert_stdout_has("service svc stopped");
    out.assert_stdout_has("stage build ABORTED");
    assert!(
        out.step_output("after").is_empty(),
        "`after` ran\n{}",
        out.dump()
    );
    assert!(!out.stdout.contains("<-- after passed"), "{}", out.dump());
    assert_no_leaks(ws.marker());
    out.assert_sandbox_gone();
}

#[test]
fn sigint_stops_the_stage_and_its_services() {
    interrupted_by(Signal::SIGINT, 130);
}

#[test]
fn sigterm_stops_the_stage_and_its_services() {
    interrupted_by(Signal::SIGTERM, 143);
}

#[test]
fn step_timeout_stops_the_step() {
    require_root();
    let ws = Workspace::new();
    let out = ws.stagehand_run(&pipeline("timeout.yaml")).output();
    out.assert_code(1);
    out.assert_stdout_has("slow  | slow started");
    out.assert_stdout_has("<-- slow TIMED OUT");
    assert!(!out.stdout.contains("slow finished"), "{}", out.dump());
    assert!(
        out.summary_row("slow")
            .contains("TIMED OUT: timed out after 1s"),
        "{}",
        out.summary_row("slow")
    );
    out.assert_stdout_has("<-- after skipped");
    out.assert_stdout_has("stage build FAILED");
    assert!(
        out.elapsed < Duration::from_secs(10),
        "took {:?}",
        out.elapsed
    );
    // The `sleep 30` went with its step.
    assert_no_leaks(ws.marker());
    out.assert_sandbox_gone();
}

#[test]
fn service_ignoring_sigterm_is_killed_after_the_stop_timeout() {
    require_root();
    let ws = Workspace::new();
    let out = ws
        .stagehand_run(&pipeline("stubborn-service.yaml"))
        .arg("--stop-timeout")
        .arg("1s")
        .output();
    out.assert_code(0);
    out.assert_stdout_has("stubborn | ignoring SIGTERM");
    out.assert_stdout_has("<-- work passed");
    out.assert_stdout_has("service stubborn stopped: did not exit within 1s of SIGTERM, killed");
    // One grace period of 1 s, not the default 10 s.
    assert!(
        out.elapsed >= Duration::from_secs(1),
        "SIGKILL came before the grace period: {:?}",
        out.elapsed
    );
    assert!(
        out.elapsed < Duration::from_secs(6),
        "took {:?}\n{}",
        out.elapsed,
        out.dump()
    );
    assert_no_leaks(ws.marker());
    out.assert_sandbox_gone();
}

#[test]
fn output_variables_reach_later_steps() {
    require_root();
    let ws = Workspace::new();
    let out = ws.stagehand_run(&pipeline("outputs.yaml")).output();
    out.assert_code(0);
    assert_eq!(
        out.step_output("consume"),
        [
            "greeting=hello from produce",
            "count=42",
            "execution=42",
            "group=grouped"
        ],
        "{}",
        out.dump()
    );
    assert_no_leaks(ws.marker());
    out.assert_sandbox_gone();
}

#[test]
fn sequence_ids_count_runs_of_a_pipeline_even_concurrent_ones() {
    require_root();
    let ws = Workspace::new();
    let run = || ws.stagehand_run(&pipeline("sequence.yaml"));
    for n in 1..=2 {
        let out = run().output();
        out.assert_code(0);
        assert_eq!(
            out.step_output("show"),
            [format!("run {n}")],
            "{}",
            out.dump()
        );
    }
    // Three at once get three different numbers.
    let running: Vec<_> = (0..3).map(|_| run().spawn()).collect();
    let mut seen: Vec<String> = running
        .into_iter()
        .map(|r| {
            let out = r.wait(Duration::from_secs(30));
            out.assert_code(0);
            out.step_output("show").concat()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, ["run 3", "run 4", "run 5"]);
    // Kept in the run's state dir (STAGEHAND_ROOT), not in /var/lib/stagehand.
    assert_eq!(
        std::fs::read_to_string(ws.state().join("sequence/sequence")).unwrap(),
        "5"
    );
    assert_no_leaks(ws.marker());
}

#[test]
fn secrets_are_masked_on_stdout_and_in_logs() {
    require_root();
    let ws = Workspace::new();
    // Unique per run, so a match can only be this run's secret.
    let secret = format!(
        "tok-{}",
        ws.marker().rsplit('-').take(2).collect::<Vec<_>>().join("")
    );
    let out = ws
        .stagehand_run(&pipeline("secrets.yaml"))
        .arg("--secret")
        .arg(format!("api_token={secret}"))
        .output();
    out.assert_code(0);
    // The step really had the value (its length), but it was never shown.
    assert_eq!(
        out.step_output("leak").last().map(String::as_str),
        Some(format!("length: {}", secret.len()).as_str()),
        "{}",
        out.dump()
    );
    for l in out.step_output("leak").iter().take(2) {
        assert!(l.ends_with("***"), "not masked: {l}\n{}", out.dump());
    }
    assert!(
        !out.stdout.contains(&secret),
        "secret on stdout\n{}",
        out.dump()
    );
    assert!(
        !out.stderr.contains(&secret),
        "secret on stderr\n{}",
        out.dump()
    );
    let log = out.log("leak");
    assert!(
        log.contains("inline: ***"),
        "log lacks the masked line:\n{log}"
    );
    assert!(!log.contains(&secret), "secret in the log file:\n{log}");
    assert_no_leaks(ws.marker());
    out.assert_sandbox_gone();
}

#[test]
fn missing_interpreter_is_named() {
    require_root();
    let path = std::env::var_os("PATH").unwrap_or_default();
    assert!(
        !std::env::split_paths(&path).any(|d| d.join("pwsh").exists()),
        "pwsh is installed on this machine; this test needs a host without PowerShell"
    );
    let ws = Workspace::new();
    let out = ws.stagehand_run(&pipeline("pwsh.yaml")).output();
    out.assert_code(1);
    let row = out.summary_row("ps");
    assert!(
        row.contains("FAILED") && row.contains("pwsh"),
        "{row}\n{}",
        out.dump()
    );
    out.assert_stdout_has("<-- ps FAILED: executable not found: pwsh");
    out.assert_stdout_has("<-- after skipped");
    assert_no_leaks(ws.marker());
    out.assert_sandbox_gone();
}
