//! End-to-end: load, with the built `stagehand` binary, real cgroups and namespaces.
//!
//! Owns: the load proofs of the issue: one stage with 50 Background services (5 HTTP servers
//! with tcp health checks, 45 `sleep`s) all up while a step uses them and all stopped in
//! bounded time; 20 stages in a row, each publishing the same host port (a forwarder left by
//! one stage would fail the next) with stagehand's open file descriptors sampled from inside
//! every stage, which must not grow; and 200 Run steps in one `parallel` block. Every test ends
//! with [`assert_stage_gone`] (no cgroup, namespace mount, process or journal entry left).
//! The pipelines are generated (`stagehand_e2e::faults`) and checked in as
//! `tests/pipelines/load-*.yaml`. The tests run one at a time: each loads the machine.
//! Does not own: the helpers (`stagehand_e2e::{e2e, sandbox, readiness, faults}`), or faults
//! (`faults_e2e.rs`).
//!
//! Needs root, slirp4netns, python3, and `cargo build -p stagehand` beforehand.

use std::sync::Mutex;
use std::time::Duration;

use stagehand_e2e::e2e::{
    Finished, StagehandCmd, Workspace, assert_ports_closed, assert_ports_free,
};
use stagehand_e2e::faults::{
    LOAD_PARALLEL_STEPS, LOAD_PROBED_SERVICES, LOAD_SERVICES, LOAD_STAGES, LOAD_STAGES_PORT,
    generated_pipeline, load_parallel_yaml, load_services_yaml, load_stages_yaml,
};
use stagehand_e2e::readiness::summary_stage;
use stagehand_e2e::sandbox::{self, assert_stage_gone, require_root, run_id};

/// How long any load run may take, start to exit.
const LOAD_BOUND: Duration = Duration::from_secs(60);

/// One load test at a time: two at once would measure the machine, not stagehand.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `stagehand run FILE` in `ws` with the test's marker and a 1 s stop timeout.
fn marked(ws: &Workspace, file: &std::path::Path) -> StagehandCmd {
    ws.stagehand_run(file)
        .arg("--var")
        .arg(format!("marker={}", ws.marker()))
        .arg("--stop-timeout")
        .arg("1s")
}

/// Panic unless the run took less than [`LOAD_BOUND`].
fn assert_bounded(out: &Finished) {
    assert!(
        out.elapsed < LOAD_BOUND,
        "the run took {:?} (bound {LOAD_BOUND:?})\n{}",
        out.elapsed,
        out.dump()
    );
}

#[test]
fn fifty_background_services_in_one_stage() {
    require_root();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let file = generated_pipeline("load-services.yaml", &load_services_yaml());
    let ws = Workspace::new();
    let out = sandbox::spawn(marked(&ws, &file)).wait(LOAD_BOUND + Duration::from_secs(30));
    out.assert_code(0);
    assert_bounded(&out);
    assert_eq!(
        out.step_output("check"),
        [format!("all {LOAD_PROBED_SERVICES} servers answered")],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("stage services succeeded");
    let stage = summary_stage(&out, "services");
    let check = stage.step("check");
    for i in 1..=LOAD_SERVICES {
        let id = format!("svc_{i:02}");
        let row = stage.step(&id);
        assert_eq!(row.result, "started", "{row:?}");
        // Up until teardown, after `check` ended: all 50 lived at once.
        assert!(
            row.finished() >= check.finished(),
            "{id} was stopped before check ended: {row:?} {check:?}"
        );
        if i <= LOAD_PROBED_SERVICES {
            assert!(
                row.ready() <= check.started(),
                "{id} ready after check started: {row:?}"
            );
        }
        assert!(
            out.stdout.contains(&format!("service {id} stopped: ")),
            "{id} was not stopped\n{}",
            out.dump()
        );
    }
    // Teardown stops them together: one 1 s grace period at most, not fifty.
    let teardown = stage
        .steps
        .iter()
        .filter_map(|s| s.finished_ms)
        .max()
        .unwrap_or_default()
        .saturating_sub(check.finished());
    assert!(
        teardown < 10_000,
        "stopping 50 services took {teardown} ms\n{}",
        out.dump()
    );
    assert_stage_gone(&run_id(&out), ws.marker());
}

/// The `stage N fds F` lines of `load-stages.yaml`, as F by stage.
fn fds_by_stage(out: &Finished) -> Vec<usize> {
    (1..=LOAD_STAGES)
        .map(|i| {
            let id = format!("probe_{i:02}");
            let prefix = format!("stage {i} fds ");
            out.step_output(&id)
                .iter()
                .find_map(|l| l.strip_prefix(&prefix).and_then(|n| n.trim().parse().ok()))
                .unwrap_or_else(|| panic!("{id} printed no fd count\n{}", out.dump()))
        })
        .collect()
}

#[test]
fn twenty_stages_in_a_row_leak_nothing_and_hold_no_more_fds() {
    require_root();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    assert_ports_free(&[LOAD_STAGES_PORT]);
    let file = generated_pipeline("load-stages.yaml", &load_stages_yaml());
    let ws = Workspace::new();
    let running = sandbox::spawn(marked(&ws, &file));
    // The probes read stagehand's pid from the workspace (written whole, then renamed).
    let tmp = ws.path().join("stagehand.pid.tmp");
    std::fs::write(&tmp, running.pid().to_string()).unwrap();
    std::fs::rename(&tmp, ws.path().join("stagehand.pid")).unwrap();
    let out = running.wait(LOAD_BOUND + Duration::from_secs(30));
    out.assert_code(0);
    assert_bounded(&out);
    for i in 1..=LOAD_STAGES {
        out.assert_stdout_has(&format!("stage s{i:02} succeeded"));
        out.assert_stdout_has(&format!("service web_{i:02} stopped: "));
    }
    // Sampled at the same point of every stage (a service up, a step running). A leak of one
    // descriptor per stage or per step would show as 14+ more in the last stages than in the
    // first; momentary ones (a probe in flight) are smoothed out by taking minima.
    let fds = fds_by_stage(&out);
    let first = fds[1..6].iter().min().copied().unwrap_or_default();
    let last = fds[LOAD_STAGES - 5..]
        .iter()
        .min()
        .copied()
        .unwrap_or_default();
    assert!(
        last <= first + 2,
        "stagehand's open file descriptors grew from {first} to {last} over {LOAD_STAGES} stages: {fds:?}"
    );
    assert_ports_closed(&[LOAD_STAGES_PORT], Duration::from_secs(3));
    assert_stage_gone(&run_id(&out), ws.marker());
}

#[test]
fn two_hundred_parallel_steps_in_one_block() {
    require_root();
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let file = generated_pipeline("load-parallel.yaml", &load_parallel_yaml());
    let ws = Workspace::new();
    let out = sandbox::spawn(marked(&ws, &file)).wait(LOAD_BOUND + Duration::from_secs(30));
    out.assert_code(0);
    assert_bounded(&out);
    let stage = summary_stage(&out, "wide");
    let after = stage.step("after");
    for i in 1..=LOAD_PARALLEL_STEPS {
        let id = format!("p{i:03}");
        assert_eq!(
            out.step_output(&id),
            [format!("step {i} done")],
            "{}",
            out.dump()
        );
        let row = stage.step(&id);
        assert_eq!(row.result, "passed", "{row:?}");
        assert!(
            row.finished() <= after.started(),
            "{id} ended after `after` began: {row:?}"
        );
    }
    assert_eq!(
        out.step_output("after"),
        ["after the block"],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("stage wide succeeded");
    assert_stage_gone(&run_id(&out), ws.marker());
}
