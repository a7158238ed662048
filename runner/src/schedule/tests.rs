//! Scheduler tests with a fake executor: order, parallelism, failure strategies, retries,
//! timeouts, skips, output variables, JUnit reports. No processes are started here.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::context::{Codebase, RunInfo, Secrets, StageInfo};
use crate::diag::Diagnostics;
use crate::exec::{Executor, LineSink, Outcome, ResolvedStep, ServiceEnd, ServiceState};
use crate::output::Console;
use crate::plan::plan_stage;
use tokio::sync::watch;

/// What the fake does for a step: a list of outcomes, one per attempt (the last repeats),
/// each after a delay.
#[derive(Clone)]
struct Script {
    outcomes: Vec<Outcome>,
    delay: Duration,
}

#[derive(Default)]
struct Fake {
    scripts: HashMap<String, Script>,
    /// (event, step id, at) in order.
    log: Mutex<Vec<(String, String, tokio::time::Instant)>>,
    attempts: Mutex<HashMap<String, usize>>,
    seen: Mutex<Vec<ResolvedStep>>,
    /// Files a Run step writes (path relative to its workspace, content) as it ends, like a
    /// test runner writing its report.
    run_writes: HashMap<String, Vec<(String, String)>>,
    /// Files written (absolute path, content) while tearing down, like a service that writes
    /// its report when stopped.
    teardown_writes: Vec<(PathBuf, String)>,
}

fn write_file(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

impl Fake {
    fn events(&self) -> Vec<String> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(e, id, _)| format!("{e} {id}"))
            .collect()
    }
}

impl Executor for Fake {
    fn run<'a>(
        &'a self,
        step: &'a ResolvedStep,
        _out: Arc<dyn LineSink>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Outcome> {
        async move {
            self.seen.lock().unwrap().push(step.clone());
            let n = {
                let mut a = self.attempts.lock().unwrap();
                let e = a.entry(step.id.clone()).or_insert(0);
                *e += 1;
                *e
            };
            self.log.lock().unwrap().push((
                "start".into(),
                step.id.clone(),
                tokio::time::Instant::now(),
            ));
            let script = self.scripts.get(&step.id).cloned().unwrap_or(Script {
                outcomes: vec![Outcome::Exited {
                    code: 0,
                    outputs: BTreeMap::new(),
                }],
                delay: Duration::from_millis(10),
            });
            let outcome = script.outcomes[(n - 1).min(script.outcomes.len() - 1)].clone();
            // A timeout in the step wins over the scripted delay, as the real executor does.
            let limit = step.timeout.unwrap_or(Duration::from_secs(3600));
            let result = tokio::select! {
                _ = tokio::time::sleep(script.delay.min(limit)) => {
                    if script.delay > limit { Outcome::TimedOut } else { outcome }
                }
                _ = cancel.cancelled() => Outcome::Cancelled,
            };
            for (rel, content) in self.run_writes.get(&step.id).into_iter().flatten() {
                write_file(&step.workspace.join(rel), content);
            }
            self.log.lock().unwrap().push((
                "end".into(),
                step.id.clone(),
                tokio::time::Instant::now(),
            ));
            result
        }
        .boxed()
    }

    fn start_service<'a>(
        &'a self,
        step: &'a ResolvedStep,
        _out: Arc<dyn LineSink>,
    ) -> BoxFuture<'a, Result<watch::Receiver<ServiceState>, String>> {
        async move {
            self.log.lock().unwrap().push((
                "service".into(),
                step.id.clone(),
                tokio::time::Instant::now(),
            ));
            let script = self.scripts.get(&step.id).cloned();
            match script.as_ref().and_then(|s| s.outcomes.first().cloned()) {
                Some(Outcome::Error(e)) => Err(e),
                // A scripted service becomes ready (exit 0) or fails (other codes) after its delay.
                Some(Outcome::Exited { code, .. }) => {
                    let (tx, rx) = watch::channel(ServiceState::Starting);
                    let delay = script.unwrap().delay;
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = tx.send(if code == 0 {
                            ServiceState::Ready(delay)
                        } else {
                            ServiceState::Failed(format!(
                                "exited with code {code} before it was ready"
                            ))
                        });
                        // Keep the channel open like a live service would.
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    });
                    Ok(rx)
                }
                _ => Ok(watch::channel(ServiceState::Ready(Duration::ZERO)).1),
            }
        }
        .boxed()
    }

    fn teardown<'a>(&'a self) -> BoxFuture<'a, (Vec<ServiceEnd>, Vec<String>)> {
        async move {
            self.log.lock().unwrap().push((
                "teardown".into(),
                String::new(),
                tokio::time::Instant::now(),
            ));
            for (path, content) in &self.teardown_writes {
                write_file(path, content);
            }
            (vec![], vec![])
        }
        .boxed()
    }
}

fn ok() -> Outcome {
    Outcome::Exited {
        code: 0,
        outputs: BTreeMap::new(),
    }
}

fn fail(code: i32) -> Outcome {
    Outcome::Exited {
        code,
        outputs: BTreeMap::new(),
    }
}

fn script(outcomes: Vec<Outcome>, ms: u64) -> Script {
    Script {
        outcomes,
        delay: Duration::from_millis(ms),
    }
}

async fn run_stage(yaml: &str, fake: Fake) -> (StageReport, Arc<Fake>) {
    run_stage_with(yaml, fake, RunOptions::default(), BTreeMap::new()).await
}

/// `run_stage` with options (workspace, run directory) and secrets (id -> value).
async fn run_stage_with(
    yaml: &str,
    fake: Fake,
    options: RunOptions,
    secrets: BTreeMap<String, String>,
) -> (StageReport, Arc<Fake>) {
    let node = crate::yaml::parse(yaml).unwrap();
    let mut d = Diagnostics::new(Path::new("t.yaml"));
    let p = crate::load::load(&node, &mut d).unwrap();
    assert!(!d.has_errors(), "{:?}", d.items);
    let plan = plan_stage(&p.stages[0]);
    let secrets = Arc::new(Secrets::new(secrets));
    let run = Arc::new(RunInfo {
        pipeline_name: "p".into(),
        pipeline_id: "p".into(),
        sequence_id: 1,
        execution_id: "x".into(),
        codebase: Codebase::default(),
        secrets: secrets.clone(),
        pipeline_vars: BTreeMap::new(),
        outputs: RwLock::new(HashMap::new()),
    });
    let stage = Arc::new(StageInfo {
        identifier: plan.identifier.clone(),
        name: plan.name.clone(),
        vars: BTreeMap::new(),
    });
    let fake = Arc::new(fake);
    let console = Arc::new(Console::new(secrets, None, true));
    let sr = StageRun::new(
        plan,
        run,
        stage,
        fake.clone(),
        console,
        options,
        CancellationToken::new(),
    );
    (sr.run().await, fake)
}

fn verdicts(r: &StageReport) -> Vec<String> {
    r.results
        .iter()
        .map(|s| format!("{} {}", s.id, s.verdict.label()))
        .collect()
}

fn stage(steps: &str) -> String {
    format!("stage:\n  identifier: s\n  type: CI\n  spec:\n    execution:\n      steps:\n{steps}")
}

fn run_step(id: &str, extra: &str) -> String {
    format!(
        "        - step:\n            identifier: {id}\n            type: Run\n{extra}            spec:\n              command: 'true'\n"
    )
}

#[tokio::test(start_paused = true)]
async fn steps_run_in_order_and_services_are_torn_down_last() {
    let yaml = stage(&format!(
        "        - step: {{identifier: svc, type: Background, spec: {{command: sleep 9}}}}\n{}{}",
        run_step("a", ""),
        run_step("b", "")
    ));
    let (r, fake) = run_stage(&yaml, Fake::default()).await;
    assert_eq!(r.status, StageStatus::Success);
    assert_eq!(
        fake.events(),
        [
            "service svc",
            "start a",
            "end a",
            "start b",
            "end b",
            "teardown "
        ]
    );
    assert_eq!(verdicts(&r), ["svc started", "a passed", "b passed"]);
}

#[tokio::test(start_paused = true)]
async fn parallel_members_overlap_and_max_concurrency_limits() {
    let mut f = Fake::default();
    for id in ["p1", "p2", "p3"] {
        f.scripts.insert(id.into(), script(vec![ok()], 100));
    }
    let yaml = stage(&format!(
        "        - parallel:\n{}{}{}",
        run_step("p1", "")
            .replace("        -", "            -")
            .replace("\n            ", "\n                "),
        run_step("p2", "")
            .replace("        -", "            -")
            .replace("\n            ", "\n                "),
        run_step("p3", "")
            .replace("        -", "            -")
            .replace("\n            ", "\n                ")
    ));
    let (r, fake) = run_stage(&yaml, f).await;
    assert_eq!(r.status, StageStatus::Success);
    let ev = fake.events();
    assert_eq!(
        &ev[..3],
        ["start p1", "start p2", "start p3"],
        "all start before any ends: {ev:?}"
    );

    // A matrix with maxConcurrency 1 runs its iterations one at a time.
    let mut f = Fake::default();
    for id in ["m_0", "m_1"] {
        f.scripts.insert(id.into(), script(vec![ok()], 100));
    }
    let yaml = stage(&run_step(
        "m",
        "            strategy:\n              matrix:\n                x: [a, b]\n                maxConcurrency: 1\n",
    ));
    let (_, fake) = run_stage(&yaml, f).await;
    assert_eq!(
        fake.events(),
        ["start m_0", "end m_0", "start m_1", "end m_1", "teardown "]
    );
}

#[tokio::test(start_paused = true)]
async fn a_failure_skips_later_steps_unless_when_says_otherwise() {
    let mut f = Fake::default();
    f.scripts.insert("a".into(), script(vec![fail(3)], 10));
    let yaml = stage(&format!(
        "{}{}{}{}",
        run_step("a", ""),
        run_step("b", ""),
        run_step("always", "            when: {stageStatus: All}\n"),
        run_step("onfail", "            when: {stageStatus: Failure}\n")
    ));
    let (r, _) = run_stage(&yaml, f).await;
    assert_eq!(r.status, StageStatus::Failed);
    assert_eq!(
        verdicts(&r),
        [
            "a FAILED",
            "b skipped (an earlier step failed)",
            "always passed",
            "onfail passed"
        ]
    );
    assert_eq!(r.results[0].message.as_deref(), Some("exit code 3"));
}

#[tokio::test(start_paused = true)]
async fn ignore_and_mark_as_success_keep_the_stage_green() {
    let mut f = Fake::default();
    f.scripts.insert("a".into(), script(vec![fail(1)], 10));
    f.scripts.insert("b".into(), script(vec![fail(1)], 10));
    let fs = |t: &str| {
        format!(
            "            failureStrategies:\n              - onFailure: {{errors: [AllErrors], action: {{type: {t}}}}}\n"
        )
    };
    let yaml = stage(&format!(
        "{}{}{}",
        run_step("a", &fs("Ignore")),
        run_step("b", &fs("MarkAsSuccess")),
        run_step("c", "")
    ));
    let (r, _) = run_stage(&yaml, f).await;
    assert_eq!(r.status, StageStatus::Success);
    assert_eq!(
        verdicts(&r),
        [
            "a failed, ignored",
            "b failed, marked as success",
            "c passed"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn retry_until_success_waits_the_intervals() {
    let mut f = Fake::default();
    f.scripts
        .insert("a".into(), script(vec![fail(1), fail(1), ok()], 10));
    let yaml = stage(&run_step(
        "a",
        "            failureStrategies:\n              - onFailure:\n                  errors: [AllErrors]\n                  action:\n                    type: Retry\n                    spec:\n                      retryCount: 3\n                      retryIntervals: [1s, 2s]\n                      onRetryFailure: {action: {type: MarkAsFailure}}\n",
    ));
    let t0 = tokio::time::Instant::now();
    let (r, fake) = run_stage(&yaml, f).await;
    assert_eq!(r.status, StageStatus::Success);
    assert_eq!(r.results[0].attempts, 3);
    let starts: Vec<_> = fake
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|e| e.0 == "start")
        .map(|e| e.2 - t0)
        .collect();
    assert_eq!(starts.len(), 3);
    assert!(
        starts[1] >= Duration::from_millis(1010) && starts[2] >= starts[1] + Duration::from_secs(2),
        "{starts:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn retries_exhausted_apply_on_retry_failure() {
    let mut f = Fake::default();
    f.scripts.insert("a".into(), script(vec![fail(1)], 10));
    let yaml = stage(&format!(
        "{}{}",
        run_step(
            "a",
            "            failureStrategies:\n              - onFailure:\n                  errors: [AllErrors]\n                  action:\n                    type: Retry\n                    spec:\n                      retryCount: 2\n                      retryIntervals: [1s]\n                      onRetryFailure: {action: {type: Ignore}}\n",
        ),
        run_step("b", "")
    ));
    let (r, fake) = run_stage(&yaml, f).await;
    assert_eq!(*fake.attempts.lock().unwrap().get("a").unwrap(), 3);
    assert_eq!(verdicts(&r), ["a failed, ignored", "b passed"]);
    assert_eq!(r.status, StageStatus::Success);
}

#[tokio::test(start_paused = true)]
async fn timeout_fails_as_timeout_and_matches_timeout_strategies() {
    let mut f = Fake::default();
    f.scripts.insert("slow".into(), script(vec![ok()], 60_000));
    f.scripts.insert("slow2".into(), script(vec![ok()], 60_000));
    let yaml = stage(&format!(
        "{}{}",
        run_step(
            "slow",
            "            timeout: 1s\n            failureStrategies:\n              - onFailure: {errors: [Unknown], action: {type: Ignore}}\n              - onFailure: {errors: [Timeout], action: {type: MarkAsSuccess}}\n"
        ),
        run_step("slow2", "            timeout: 2s\n")
    ));
    let (r, fake) = run_stage(&yaml, f).await;
    assert_eq!(
        verdicts(&r),
        ["slow failed, marked as success", "slow2 TIMED OUT"]
    );
    assert_eq!(r.status, StageStatus::Failed);
    assert_eq!(
        fake.seen.lock().unwrap()[0].timeout,
        Some(Duration::from_secs(1))
    );
}

#[tokio::test(start_paused = true)]
async fn abort_cancels_running_parallel_steps_and_skips_the_rest() {
    let mut f = Fake::default();
    f.scripts.insert("quick".into(), script(vec![fail(1)], 10));
    f.scripts.insert("long".into(), script(vec![ok()], 60_000));
    let indent = |s: String| {
        s.replace("        -", "            -")
            .replace("\n            ", "\n                ")
    };
    let yaml = stage(&format!(
        "        - parallel:\n{}{}{}",
        indent(run_step(
            "quick",
            "            failureStrategies:\n              - onFailure: {errors: [AllErrors], action: {type: Abort}}\n"
        )),
        indent(run_step("long", "")),
        run_step("after", "            when: {stageStatus: All}\n")
    ));
    let (r, _) = run_stage(&yaml, f).await;
    assert_eq!(r.status, StageStatus::Aborted);
    let mut v = verdicts(&r);
    v.sort();
    assert_eq!(
        v,
        [
            "after skipped (stage aborted)",
            "long aborted",
            "quick FAILED"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn output_variables_and_conditions_flow_between_steps() {
    let mut f = Fake::default();
    let mut outputs = BTreeMap::new();
    outputs.insert("COLOR".to_string(), "blue".to_string());
    f.scripts.insert(
        "a".into(),
        script(vec![Outcome::Exited { code: 0, outputs }], 10),
    );
    let yaml = stage(&format!(
        "{}{}{}",
        "        - step:\n            identifier: a\n            type: Run\n            spec:\n              command: COLOR=blue\n              outputVariables: [{name: COLOR}]\n",
        "        - step:\n            identifier: b\n            type: Run\n            when: {stageStatus: Success, condition: '<+steps.a.output.outputVariables.COLOR> == \"blue\"'}\n            spec:\n              command: echo <+steps.a.output.outputVariables.COLOR>\n              envVariables: {C: <+execution.steps.a.output.outputVariables.COLOR>}\n",
        "        - step:\n            identifier: c\n            type: Run\n            when: {stageStatus: Success, condition: '<+steps.a.output.outputVariables.COLOR> == \"red\"'}\n            spec:\n              command: 'true'\n",
    ));
    let (r, fake) = run_stage(&yaml, f).await;
    assert_eq!(
        verdicts(&r),
        ["a passed", "b passed", "c skipped (condition is false)"]
    );
    let seen = fake.seen.lock().unwrap();
    assert_eq!(seen[1].command.as_deref(), Some("echo blue"));
    assert!(seen[1].env.contains(&("C".to_string(), "blue".to_string())));
}

#[tokio::test(start_paused = true)]
async fn a_service_that_cannot_start_fails_the_stage() {
    let mut f = Fake::default();
    f.scripts.insert(
        "svc".into(),
        script(vec![Outcome::Error("executable not found: nope".into())], 0),
    );
    let yaml = stage(&format!(
        "        - step: {{identifier: svc, type: Background, spec: {{command: nope}}}}\n{}",
        run_step("a", "")
    ));
    let (r, fake) = run_stage(&yaml, f).await;
    assert_eq!(r.status, StageStatus::Failed);
    assert_eq!(
        verdicts(&r),
        ["svc FAILED", "a skipped (an earlier step failed)"]
    );
    assert!(fake.events().contains(&"teardown ".to_string()));
}

#[tokio::test(start_paused = true)]
async fn a_step_timeout_covers_waiting_for_services() {
    let mut f = Fake::default();
    f.scripts.insert("slow".into(), script(vec![ok()], 10_000));
    let yaml = stage(&format!(
        "        - step: {{identifier: slow, type: Background, spec: {{command: x}}}}\n{}",
        run_step("impatient", "            timeout: 1s\n")
    ));
    let t0 = tokio::time::Instant::now();
    let (r, fake) = run_stage(&yaml, f).await;
    assert_eq!(r.status, StageStatus::Failed);
    assert_eq!(verdicts(&r)[1], "impatient TIMED OUT");
    assert_eq!(
        r.results[1].message.as_deref(),
        Some("timed out after 1s waiting for slow (starting)")
    );
    assert!(
        fake.log.lock().unwrap().iter().all(|e| e.1 != "impatient"),
        "never started"
    );
    assert!(tokio::time::Instant::now() - t0 < Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn run_steps_wait_for_services_to_be_ready() {
    let mut f = Fake::default();
    f.scripts.insert("slow".into(), script(vec![ok()], 700));
    f.scripts.insert("fast".into(), script(vec![ok()], 100));
    let yaml = stage(&format!(
        "        - step: {{identifier: slow, type: Background, spec: {{command: x}}}}\n        - step: {{identifier: fast, type: Background, spec: {{command: x}}}}\n{}{}",
        run_step("only_fast", "").replace(
            "              command: 'true'\n",
            "              command: 'true'\n              dependsOn: [fast]\n"
        ),
        run_step("all", "")
    ));
    let t0 = tokio::time::Instant::now();
    let (r, fake) = run_stage(&yaml, f).await;
    assert_eq!(r.status, StageStatus::Success, "{:?}", verdicts(&r));
    let log = fake.log.lock().unwrap();
    let start = |id: &str| log.iter().find(|e| e.0 == "start" && e.1 == id).unwrap().2 - t0;
    assert!(
        start("only_fast") >= Duration::from_millis(100)
            && start("only_fast") < Duration::from_millis(700),
        "{:?}",
        start("only_fast")
    );
    assert!(
        start("all") >= Duration::from_millis(700),
        "{:?}",
        start("all")
    );
}

#[tokio::test(start_paused = true)]
async fn a_service_that_fails_before_ready_fails_the_stage_and_skips_dependents() {
    let mut f = Fake::default();
    f.scripts.insert("db".into(), script(vec![fail(1)], 200));
    let yaml = stage(&format!(
        "        - step: {{identifier: db, type: Background, spec: {{command: x}}}}\n{}{}",
        run_step("uses_db", ""),
        run_step("cleanup", "            when: {stageStatus: All}\n")
    ));
    let (r, _) = run_stage(&yaml, f).await;
    assert_eq!(r.status, StageStatus::Failed);
    assert_eq!(verdicts(&r)[0], "db FAILED");
    assert!(
        verdicts(&r)[1].starts_with(
            "uses_db skipped (service db failed: exited with code 1 before it was ready"
        ),
        "{:?}",
        verdicts(&r)
    );
    // A cleanup step gated on All still waits for nothing that failed... it depends on db too,
    // so it is skipped with the same reason rather than run against a dead service.
    assert!(
        verdicts(&r)[2].starts_with("cleanup skipped (service db failed"),
        "{:?}",
        verdicts(&r)
    );
}

/// A step with `reports.spec.paths`; `kind` is Run or Background.
fn report_step(id: &str, kind: &str, extra: &str, paths: &[&str]) -> String {
    let paths: Vec<String> = paths.iter().map(|p| format!("'{p}'")).collect();
    format!(
        "        - step:\n            identifier: {id}\n            type: {kind}\n{extra}            spec:\n              command: 'true'\n              reports:\n                type: JUnit\n                spec:\n                  paths: [{}]\n",
        paths.join(", ")
    )
}

const CALC_REPORT: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites>
  <testsuite name="calc" tests="3" failures="1" skipped="1">
    <testcase classname="calc" name="adds" time="0.250"/>
    <testcase classname="calc" name="divides" time="1.500"><failure message="expected 1, got 2">at calc.rs:10</failure></testcase>
    <testcase classname="calc" name="later" time="0"><skipped/></testcase>
  </testsuite>
</testsuites>
"#;

fn one_case(name: &str) -> String {
    format!(
        "<testsuite name=\"svc\"><testcase classname=\"svc\" name=\"{name}\" time=\"0.010\"/></testsuite>"
    )
}

fn options(ws: &Path, run_dir: Option<&Path>) -> RunOptions {
    RunOptions {
        workspace: ws.to_path_buf(),
        skip_unsupported: false,
        run_dir: run_dir.map(Path::to_path_buf),
    }
}

#[tokio::test(start_paused = true)]
async fn run_step_reports_are_read_after_it_ends_summarised_and_merged() {
    let ws = tempfile::tempdir().unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let mut f = Fake::default();
    f.run_writes.insert(
        "unit".into(),
        vec![("out/unit/a/results.xml".into(), CALC_REPORT.into())],
    );
    let yaml = stage(&report_step("unit", "Run", "", &["out/**/*.xml"]));
    let (r, _) = run_stage_with(
        &yaml,
        f,
        options(ws.path(), Some(run_dir.path())),
        BTreeMap::new(),
    )
    .await;

    // A failed case does not fail the stage: the step's exit code (0) decides, as in Harness.
    assert_eq!(r.status, StageStatus::Success);
    assert_eq!(r.reports.len(), 1);
    let rep = &r.reports[0];
    assert_eq!(rep.step, "unit");
    assert_eq!(rep.files, [ws.path().join("out/unit/a/results.xml")]);
    assert!(rep.warnings.is_empty(), "{:?}", rep.warnings);
    assert_eq!(rep.cases.len(), 3);

    let text = summary(&r);
    assert!(text.contains("\n  unit  run  "), "{text}");
    let tail: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("  tests:"))
        .collect();
    assert_eq!(
        tail,
        [
            "  tests: 1 passed, 1 failed, 0 errors, 1 skipped (1 file, 1.75s)",
            "  slowest: calc::divides 1.50s, calc::adds 250ms",
            "  failed: calc::divides — expected 1, got 2",
        ],
        "{text}"
    );

    // The merged file, per stage and as the run's junit.xml, reads back with the same cases.
    let stage_file = run_dir.path().join("junit-s.xml");
    assert_eq!(r.junit.as_deref(), Some(stage_file.as_path()));
    for name in ["junit-s.xml", "junit.xml"] {
        let back = crate::reports::collect("merged", run_dir.path(), &[name.to_string()]);
        assert!(back.warnings.is_empty(), "{name}: {:?}", back.warnings);
        let t = crate::reports::totals(std::slice::from_ref(&back));
        assert_eq!((t.tests, t.failures, t.skipped), (3, 1, 1), "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn background_reports_are_read_after_teardown_and_listed_in_plan_order() {
    let ws = tempfile::tempdir().unwrap();
    let mut f = Fake::default();
    // Written only while tearing down: reading any earlier would find nothing.
    f.teardown_writes.push((
        ws.path().join("svc-reports/x/svc.xml"),
        one_case("shutdown_is_clean"),
    ));
    f.run_writes
        .insert("unit".into(), vec![("unit.xml".into(), one_case("fast"))]);
    let yaml = stage(&format!(
        "{}{}",
        report_step("svc", "Background", "", &["svc-reports/**/*.xml"]),
        report_step("unit", "Run", "", &["unit.xml"])
    ));
    let (r, fake) = run_stage_with(&yaml, f, options(ws.path(), None), BTreeMap::new()).await;
    assert_eq!(r.status, StageStatus::Success, "{:?}", verdicts(&r));
    assert_eq!(fake.events().last().map(String::as_str), Some("teardown "));
    let steps: Vec<&str> = r.reports.iter().map(|x| x.step.as_str()).collect();
    assert_eq!(steps, ["svc", "unit"]);
    let svc = &r.reports[0];
    assert!(svc.warnings.is_empty(), "{:?}", svc.warnings);
    assert_eq!(svc.files, [ws.path().join("svc-reports/x/svc.xml")]);
    assert_eq!(svc.cases[0].name, "shutdown_is_clean");
    // No run directory: summarised, not written.
    assert_eq!(r.junit, None);
    let text = summary(&r);
    assert!(
        text.contains("  tests: 2 passed, 0 failed, 0 errors, 0 skipped (2 files, 20ms)"),
        "{text}"
    );
}

#[tokio::test(start_paused = true)]
async fn an_invalid_report_is_a_warning_naming_the_file() {
    let ws = tempfile::tempdir().unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let mut f = Fake::default();
    f.run_writes.insert(
        "unit".into(),
        vec![
            ("r/good.xml".into(), one_case("ok")),
            (
                "r/bad.xml".into(),
                "<testsuite name=\"s\"><testcase name=\"a\">".into(),
            ),
        ],
    );
    let yaml = stage(&report_step(
        "unit",
        "Run",
        "",
        &["r/*.xml", "missing/**/*.xml"],
    ));
    let (r, _) = run_stage_with(
        &yaml,
        f,
        options(ws.path(), Some(run_dir.path())),
        BTreeMap::new(),
    )
    .await;
    assert_eq!(r.status, StageStatus::Success);
    let rep = &r.reports[0];
    assert_eq!(rep.cases.len(), 1);
    assert_eq!(rep.warnings.len(), 2, "{:?}", rep.warnings);
    let text = summary(&r);
    let bad = format!(
        "  warning: report {} is not valid JUnit XML: ",
        ws.path().join("r/bad.xml").display()
    );
    assert!(text.lines().any(|l| l.starts_with(&bad)), "{text}");
    assert!(
        text.contains("  warning: no file matches reports path `missing/**/*.xml`\n"),
        "{text}"
    );
    // The valid part is still merged.
    assert!(run_dir.path().join("junit.xml").is_file());
}

#[tokio::test(start_paused = true)]
async fn secrets_in_reports_are_masked_and_failed_steps_still_report() {
    let secret = "hunter2-s3cret";
    let ws = tempfile::tempdir().unwrap();
    let run_dir = tempfile::tempdir().unwrap();
    let mut f = Fake::default();
    f.scripts.insert("login".into(), script(vec![fail(1)], 10));
    let report = format!(
        "<testsuite name=\"auth\"><testcase classname=\"auth\" name=\"login_{secret}\" time=\"0.1\">\
         <failure message=\"token {secret} rejected\">sent Authorization: Bearer {secret}</failure>\
         </testcase></testsuite>"
    );
    f.run_writes
        .insert("login".into(), vec![("reports/auth.xml".into(), report)]);
    let yaml = stage(&format!(
        "{}{}",
        report_step("login", "Run", "", &["reports/**/*.xml"]),
        report_step("later", "Run", "", &["never/*.xml"])
    ));
    let secrets = BTreeMap::from([("token".to_string(), secret.to_string())]);
    let (r, _) = run_stage_with(&yaml, f, options(ws.path(), Some(run_dir.path())), secrets).await;
    assert_eq!(r.status, StageStatus::Failed);
    assert_eq!(
        verdicts(&r),
        ["login FAILED", "later skipped (an earlier step failed)"]
    );
    // Read although the step failed; the skipped step is not read at all.
    assert_eq!(r.reports.len(), 1);
    let case = &r.reports[0].cases[0];
    let CaseOutcome::Failed { message, detail } = &case.outcome else {
        panic!("{case:?}")
    };
    assert_eq!(
        message.as_deref(),
        Some(format!("token {} rejected", crate::context::MASK).as_str())
    );
    assert!(!detail.as_deref().unwrap().contains(secret));
    assert!(!case.name.contains(secret));
    let text = summary(&r);
    assert!(
        text.contains(&format!(
            "  failed: auth::login_{0} — token {0} rejected",
            crate::context::MASK
        )),
        "{text}"
    );
    assert!(!text.contains(secret), "{text}");
    for name in ["junit-s.xml", "junit.xml"] {
        let xml = std::fs::read_to_string(run_dir.path().join(name)).unwrap();
        assert!(
            xml.contains("rejected") && !xml.contains(secret),
            "{name}: {xml}"
        );
    }
}
