//! End-to-end: service readiness (`healthCheck`, `dependsOn`), services that fail before or
//! after they are ready, and JUnit reports, with the built `stagehand` binary in a stage pod.
//!
//! Owns: the proofs for readiness and reports: PostgreSQL (exec probe) and Redis (tcp
//! probe) with a step that uses both starting as soon as the later one is ready; a service that
//! exits during startup and a `log:` probe that never matches, each failing the stage at once
//! with the service's last lines; a service SIGKILLed mid-stage stopping the running step;
//! `dependsOn` letting a step start before an unrelated slow service is ready; JUnit failures
//! summarised under the stage table and merged into a well-formed `junit.xml`; an invalid report
//! as a warning; a secret in a failure message masked. Timings come from `summary.json`. Every
//! test ends with [`assert_stage_gone`] (no cgroup, namespace mount or process carrying the
//! test's marker; a finished journal). Does not own: the helpers (`stagehand_e2e::{e2e, sandbox,
//! readiness}`), the reference health-check pipeline (`host_e2e.rs`, `sandbox_e2e.rs`), or how
//! reports are parsed (unit tests of `stagehand::reports`).
//!
//! Needs root, Redis (`apt-get install -y redis-server`), the PostgreSQL server binaries with
//! `psql` and `pg_isready`, pgrep, and `cargo build -p stagehand` beforehand.

use std::path::Path;
use std::time::Duration;

use quick_xml::events::{BytesStart, Event};
use stagehand_e2e::e2e::{Finished, Workspace, pipeline};
use stagehand_e2e::readiness::{
    report_lines, require_postgres, require_redis, service_failure, summary_stage,
};
use stagehand_e2e::sandbox::{self, assert_stage_gone, require_root, run_id};

/// How late a step may start after the last service it waits for became ready. The issue's
/// target is 50 ms; this bound is loose because the machine is shared.
const START_SLACK_MS: u64 = 500;

/// Run `file` in `ws` (through [`sandbox::run`]) with `--var marker=<marker>` when `marked`,
/// the services' `stop_timeout`, and `extra` arguments.
fn run(ws: &Workspace, file: &str, marked: bool, stop_timeout: &str, extra: &[&str]) -> Finished {
    let mut cmd = ws
        .stagehand_run(&pipeline(file))
        .arg("--stop-timeout")
        .arg(stop_timeout);
    if marked {
        cmd = cmd.arg("--var").arg(format!("marker={}", ws.marker()));
    }
    for a in extra {
        cmd = cmd.arg(a);
    }
    sandbox::run(cmd)
}

/// A test case in a merged JUnit file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct XmlCase {
    classname: String,
    name: String,
    /// The `message` of its `<failure>` or `<error>`, when it has one.
    failure: Option<String>,
}

fn attr(e: &BytesStart<'_>, key: &str) -> String {
    e.try_get_attribute(key)
        .ok()
        .flatten()
        .and_then(|a| {
            a.normalized_value(quick_xml::XmlVersion::Implicit1_0)
                .ok()
                .map(|v| v.into_owned())
        })
        .unwrap_or_default()
}

/// Parse `text` as XML, panicking unless it is well-formed (one root element, every element
/// closed by its own name); returns the `<testcase>`s it holds.
fn junit_cases(text: &str, what: &str) -> Vec<XmlCase> {
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let (mut depth, mut roots) = (0usize, 0usize);
    let mut cases: Vec<XmlCase> = Vec::new();
    let mut in_case = false;
    loop {
        let ev = reader.read_event().unwrap_or_else(|e| {
            panic!(
                "{what} is not well-formed XML at byte {}: {e}\n{text}",
                reader.buffer_position()
            )
        });
        let (start, empty) = match &ev {
            Event::Start(e) => (Some(e), false),
            Event::Empty(e) => (Some(e), true),
            _ => (None, false),
        };
        if let Some(e) = start {
            if depth == 0 {
                roots += 1;
            }
            match e.local_name().as_ref() {
                b"testcase" => {
                    cases.push(XmlCase {
                        classname: attr(e, "classname"),
                        name: attr(e, "name"),
                        failure: None,
                    });
                    in_case = !empty;
                }
                b"failure" | b"error" if in_case => {
                    if let Some(c) = cases.last_mut() {
                        c.failure = Some(attr(e, "message"));
                    }
                }
                _ => {}
            }
            if !empty {
                depth += 1;
            }
            continue;
        }
        match ev {
            Event::End(e) => {
                depth = depth
                    .checked_sub(1)
                    .unwrap_or_else(|| panic!("{what}: stray end tag\n{text}"));
                if e.local_name().as_ref() == b"testcase" {
                    in_case = false;
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    assert_eq!(depth, 0, "{what} ends with {depth} element(s) open\n{text}");
    assert_eq!(roots, 1, "{what} has {roots} root elements\n{text}");
    cases
}

/// The run's merged `junit.xml`, after checking `summary.json` names the stage's copy and that
/// both files are there.
fn merged_junit(out: &Finished) -> String {
    let dir = out.run_dir.as_ref().expect("a run directory");
    let stage = summary_stage(out, "build");
    assert_eq!(
        stage.junit.as_deref(),
        Some(dir.join("junit-build.xml").as_path()),
        "summary.json does not name the stage's report\n{}",
        out.dump()
    );
    let read = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("read {}: {e}\n{}", p.display(), out.dump()))
    };
    let latest = read(&dir.join("junit.xml"));
    assert_eq!(
        latest,
        read(&dir.join("junit-build.xml")),
        "junit.xml is not the (only) stage's report"
    );
    latest
}

#[test]
fn step_using_postgres_and_redis_starts_once_both_are_ready() {
    require_root();
    require_postgres();
    require_redis();
    let ws = Workspace::new();
    // PostgreSQL runs as `postgres` and keeps PGDATA in the workspace.
    ws.open_to_all_users();
    let out = run(&ws, "readiness-pg-redis.yaml", false, "5s", &[]);
    out.assert_code(0);

    // The step really used both servers.
    assert_eq!(
        out.step_output("use"),
        ["pg: 1", "redis: PONG"],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("<-- db ready (");
    out.assert_stdout_has("<-- cache ready (");
    // It had to wait: PostgreSQL runs initdb first.
    out.assert_stdout_has("    use waiting for db");
    out.assert_stdout_has("service db stopped: exit code 0");
    out.assert_stdout_has("service cache stopped: exit code 0");

    let stage = summary_stage(&out, "build");
    let (db, cache, step) = (stage.step("db"), stage.step("cache"), stage.step("use"));
    let later = db.ready().max(cache.ready());
    assert!(
        step.started() >= later,
        "use started at {} ms, before both services were ready (db {} ms, cache {} ms)\n{}",
        step.started(),
        db.ready(),
        cache.ready(),
        out.dump()
    );
    assert!(
        step.started() - later <= START_SLACK_MS,
        "use started {} ms after the later service was ready (db {} ms, cache {} ms)\n{}",
        step.started() - later,
        db.ready(),
        cache.ready(),
        out.dump()
    );
    assert_eq!(step.result, "passed");
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn service_exiting_during_startup_fails_the_stage_with_its_output() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "readiness-early-exit.yaml", true, "2s", &[]);
    out.assert_code(1);

    let failure = service_failure(&out.stdout, "flaky")
        .unwrap_or_else(|| panic!("no `!!! service flaky failed` report\n{}", out.dump()));
    assert!(
        failure.why.starts_with("exited after ")
            && failure.why.contains("exit code 3")
            && failure.why.ends_with("before it was ready"),
        "{failure:?}\n{}",
        out.dump()
    );
    assert_eq!(
        failure.tail,
        ["flaky: loading config", "flaky: fatal: no such table"],
        "{}",
        out.dump()
    );
    // The step that needed it never ran.
    out.assert_stdout_has("<-- use skipped (");
    assert!(out.step_output("use").is_empty(), "{}", out.dump());
    out.assert_stdout_has("stage build FAILED");

    let stage = summary_stage(&out, "build");
    assert_eq!(stage.status, "Failed");
    let flaky = stage.step("flaky");
    assert!(flaky.result.starts_with("FAILED"), "{flaky:?}");
    assert!(
        flaky
            .message
            .as_deref()
            .is_some_and(|m| m.contains("exit code 3")),
        "{flaky:?}"
    );
    assert_eq!(flaky.ready_ms, None, "{flaky:?}");
    assert!(stage.step("use").result.starts_with("skipped"), "{stage:?}");
    // At once: no health-check deadline (5 minutes by default) was waited out.
    assert!(
        out.elapsed < Duration::from_secs(10),
        "took {:?}",
        out.elapsed
    );
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn log_probe_that_never_matches_fails_at_its_deadline() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "readiness-log-deadline.yaml", true, "2s", &[]);
    out.assert_code(1);

    let failure = service_failure(&out.stdout, "quiet")
        .unwrap_or_else(|| panic!("no `!!! service quiet failed` report\n{}", out.dump()));
    assert!(
        failure.why.contains("no output line matched"),
        "{failure:?}\n{}",
        out.dump()
    );
    assert!(failure.why.ends_with("within 1s"), "{failure:?}");
    assert_eq!(failure.tail, ["quiet: warming up"], "{}", out.dump());
    out.assert_stdout_has("<-- use skipped (");
    assert!(out.step_output("use").is_empty(), "{}", out.dump());
    out.assert_stdout_has("stage build FAILED");

    let stage = summary_stage(&out, "build");
    assert_eq!(stage.status, "Failed");
    assert!(
        stage.step("quiet").result.starts_with("FAILED"),
        "{stage:?}"
    );
    assert!(stage.step("use").result.starts_with("skipped"), "{stage:?}");
    // The 1s deadline, not the 5m default.
    assert!(
        out.elapsed >= Duration::from_secs(1) && out.elapsed < Duration::from_secs(10),
        "took {:?}\n{}",
        out.elapsed,
        out.dump()
    );
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn service_killed_mid_stage_is_reported_and_the_running_step_stops() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "readiness-killed.yaml", true, "2s", &[]);
    out.assert_code(1);

    let failure = service_failure(&out.stdout, "svc")
        .unwrap_or_else(|| panic!("no `!!! service svc failed` report\n{}", out.dump()));
    assert!(
        failure.why.starts_with("exited after ") && failure.why.ends_with(": killed by SIGKILL"),
        "{failure:?}\n{}",
        out.dump()
    );
    assert_eq!(failure.tail, ["svc up"], "{}", out.dump());
    // `killer` found the service (not stagehand, whose argv holds the bare marker) ...
    assert!(
        out.step_output("killer")
            .first()
            .is_some_and(|l| l.starts_with("killing svc (pid ")),
        "{}",
        out.dump()
    );
    // ... and was stopped in its `sleep 10`.
    out.assert_stdout_has("<-- killer aborted");
    assert!(!out.stdout.contains("killer finished"), "{}", out.dump());
    out.assert_stdout_has("<-- after skipped");
    out.assert_stdout_has("stage build FAILED");

    let stage = summary_stage(&out, "build");
    assert_eq!(stage.status, "Failed");
    assert_eq!(stage.step("killer").result, "aborted", "{stage:?}");
    let svc = stage.step("svc");
    assert!(svc.result.starts_with("FAILED"), "{svc:?}");
    assert!(
        svc.message
            .as_deref()
            .is_some_and(|m| m.contains("killed by SIGKILL")),
        "{svc:?}"
    );
    assert!(
        out.elapsed < Duration::from_secs(5),
        "took {:?}: the step was not stopped when its service died\n{}",
        out.elapsed,
        out.dump()
    );
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn depends_on_lets_a_step_start_before_an_unrelated_slow_service() {
    require_root();
    require_redis();
    let ws = Workspace::new();
    let out = run(&ws, "readiness-depends-on.yaml", false, "2s", &[]);
    out.assert_code(0);

    assert_eq!(out.step_output("narrow"), ["fast: PONG"], "{}", out.dump());
    assert_eq!(
        out.step_output("wide"),
        ["fast: PONG", "slow: PONG"],
        "{}",
        out.dump()
    );
    // `narrow` waits for `fast` alone; by the time `wide` asks, only `slow` is still starting.
    out.assert_stdout_has("    narrow waiting for fast (starting)\n");
    out.assert_stdout_has("    wide waiting for slow (starting)\n");

    let stage = summary_stage(&out, "build");
    let (fast, slow) = (stage.step("fast"), stage.step("slow"));
    let (narrow, wide) = (stage.step("narrow"), stage.step("wide"));
    // `slow` sleeps 1.5 s before it listens: its probe cannot have passed early.
    assert!(slow.ready() >= 1_000, "{slow:?}");
    assert!(
        narrow.started() >= fast.ready(),
        "narrow started before fast was ready: {narrow:?} {fast:?}"
    );
    assert!(
        narrow.started() < slow.ready() && narrow.finished() < slow.ready(),
        "narrow waited for slow, which it does not depend on: {narrow:?} {slow:?}\n{}",
        out.dump()
    );
    let later = fast.ready().max(slow.ready());
    assert!(
        wide.started() >= later,
        "wide started before every service was ready: {wide:?} {fast:?} {slow:?}"
    );
    assert!(
        wide.started() - later <= START_SLACK_MS,
        "wide started {} ms after slow was ready",
        wide.started() - later
    );
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn junit_failures_are_summarised_and_merged() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "readiness-junit.yaml", false, "2s", &[]);
    // The "test runner" exited 1, as it does when tests fail; its reports were read anyway.
    out.assert_code(1);
    out.assert_stdout_has("<-- tests FAILED: exit code 1");

    let lines = report_lines(&out.stdout);
    let has = |prefix: &str| lines.iter().any(|l| l.starts_with(prefix));
    assert!(
        has("tests: 2 passed, 2 failed, 0 errors, 1 skipped (2 files, "),
        "{lines:#?}\n{}",
        out.dump()
    );
    assert!(
        has("slowest: com.example.CartTest::appliesDiscount 300ms, "),
        "{lines:#?}"
    );
    for failed in [
        "failed: com.example.CartTest::appliesDiscount — expected: <90> but was: <100>",
        "failed: tests.test_api::test_login — AssertionError: assert 401 == 200",
    ] {
        assert!(
            lines.iter().any(|l| l == failed),
            "no {failed:?} in {lines:#?}"
        );
    }
    assert!(!has("warning: "), "{lines:#?}");

    let xml = merged_junit(&out);
    let cases = junit_cases(&xml, "junit.xml");
    assert_eq!(cases.len(), 5, "{cases:#?}\n{xml}");
    let case = |name: &str| {
        cases
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("junit.xml lacks {name}:\n{xml}"))
    };
    assert_eq!(
        case("appliesDiscount"),
        &XmlCase {
            classname: "com.example.CartTest".into(),
            name: "appliesDiscount".into(),
            failure: Some("expected: <90> but was: <100>".into()),
        }
    );
    assert_eq!(
        case("test_login").failure.as_deref(),
        Some("AssertionError: assert 401 == 200")
    );
    for passed in ["addsItem", "test_health", "removesItem"] {
        assert_eq!(case(passed).failure, None, "{xml}");
    }
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn invalid_junit_report_is_a_warning_and_the_stage_passes() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "readiness-junit-invalid.yaml", false, "2s", &[]);
    out.assert_code(0);
    out.assert_stdout_has("stage build succeeded");

    let lines = report_lines(&out.stdout);
    let bad = ws.path().join("out/a/b/cut.xml");
    let warning = format!("warning: report {} is not valid JUnit XML: ", bad.display());
    assert!(
        lines.iter().any(|l| l.starts_with(&warning)),
        "no {warning:?} in {lines:#?}\n{}",
        out.dump()
    );
    // The valid report next to it still counts.
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("tests: 2 passed, 0 failed, 0 errors, 0 skipped (1 file, ")),
        "{lines:#?}"
    );
    let xml = merged_junit(&out);
    let mut names: Vec<String> = junit_cases(&xml, "junit.xml")
        .into_iter()
        .map(|c| format!("{}::{}", c.classname, c.name))
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["lib.Parser::parses", "lib.Printer::prints"],
        "{xml}"
    );
    assert_eq!(summary_stage(&out, "build").status, "Success");
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn secret_in_a_junit_failure_is_masked() {
    require_root();
    let ws = Workspace::new();
    // Unique per run, so a match can only be this run's secret.
    let secret = format!(
        "pw-{}",
        ws.marker().rsplit('-').take(2).collect::<Vec<_>>().join("")
    );
    let out = run(
        &ws,
        "readiness-junit-secret.yaml",
        false,
        "2s",
        &["--secret", &format!("pw={secret}")],
    );
    out.assert_code(1);
    // The step had the value: the report it wrote holds it.
    let written = std::fs::read_to_string(ws.path().join("out/a/b/TEST-db.xml")).unwrap();
    assert!(written.contains(&secret), "{written}");

    let lines = report_lines(&out.stdout);
    let failed = lines
        .iter()
        .find(|l| l.starts_with("failed: it.DbTest::logsIn — login failed for postgres:"))
        .unwrap_or_else(|| panic!("no failure line in {lines:#?}\n{}", out.dump()));
    assert!(
        failed.ends_with("***@db"),
        "not masked: {failed}\n{}",
        out.dump()
    );
    for (what, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        assert!(!text.contains(&secret), "secret on {what}\n{}", out.dump());
    }

    let xml = merged_junit(&out);
    assert!(!xml.contains(&secret), "secret in junit.xml:\n{xml}");
    let cases = junit_cases(&xml, "junit.xml");
    let failure = cases
        .iter()
        .find(|c| c.name == "logsIn")
        .and_then(|c| c.failure.clone())
        .unwrap_or_else(|| panic!("no failing logsIn in junit.xml:\n{xml}"));
    assert!(
        failure.starts_with("login failed for postgres:") && failure.ends_with("***@db"),
        "{failure}"
    );
    let summary =
        std::fs::read_to_string(out.run_dir.as_ref().unwrap().join("summary.json")).unwrap();
    assert!(
        !summary.contains(&secret),
        "secret in summary.json:\n{summary}"
    );
    assert_stage_gone(&run_id(&out), ws.marker());
}
