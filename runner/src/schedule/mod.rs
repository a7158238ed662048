//! The scheduler: walks a [`StagePlan`] and decides what runs when.
//!
//! Owns: stage status, `when` gates and conditions, failure strategies (Ignore, MarkAsSuccess,
//! MarkAsFailure, Abort, Retry), timeouts (handed to the executor as a deadline), rendering each
//! step's expressions just before it runs, output variables, and the per-step results behind the
//! summary; reading each step's JUnit reports once the step has finished (a Background step's
//! once teardown stopped it) and writing the stage's merged `junit.xml`. Does not own: processes
//! (the [`Executor`]), printing formats (`output`), or parsing JUnit XML (`reports`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, join_all};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::context::{Ctx, RunInfo, Secrets, StageInfo, render};
use crate::exec::{
    Executor, LineSink, Outcome, ResolvedHealth, ResolvedProbe, ResolvedStep, ServiceState,
};
use crate::expr;
use crate::model::*;
use crate::output::Console;
use crate::plan::{PlanNode, PlannedStep, StagePlan};
use crate::reports::{CaseOutcome, StepReports};
use tokio::sync::{mpsc, watch};

/// Slowest test cases named in the stage summary.
const SLOWEST_CASES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageStatus {
    Success,
    Failed,
    Aborted,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    Passed,
    /// Failed, and the failure was marked as success by a failure strategy.
    MarkedSuccess,
    /// Failed, and the failure was ignored by a failure strategy.
    Ignored,
    Failed,
    TimedOut,
    /// A Background service that was started.
    Started,
    Skipped(String),
    Aborted,
}

impl Verdict {
    pub fn label(&self) -> String {
        match self {
            Verdict::Passed => "passed".into(),
            Verdict::MarkedSuccess => "failed, marked as success".into(),
            Verdict::Ignored => "failed, ignored".into(),
            Verdict::Failed => "FAILED".into(),
            Verdict::TimedOut => "TIMED OUT".into(),
            Verdict::Started => "started".into(),
            Verdict::Skipped(why) => format!("skipped ({why})"),
            Verdict::Aborted => "aborted".into(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct StepResult {
    pub id: String,
    pub name: String,
    pub background: bool,
    pub verdict: Verdict,
    pub message: Option<String>,
    pub duration: Option<Duration>,
    pub attempts: u32,
    /// Milliseconds since the stage started: when the step started, when a service became
    /// ready, when the step finished (a service: when it was stopped). For `summary.json`.
    pub started_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    pub finished_ms: Option<u64>,
}

#[derive(Debug)]
pub struct StageReport {
    pub identifier: String,
    pub status: StageStatus,
    pub results: Vec<StepResult>,
    pub duration: Duration,
    /// The JUnit reports of every step that declared `reports.spec.paths`, in plan order, with
    /// secrets already masked. A step that ran but whose files were missing or invalid is here
    /// too, with warnings. They do not change `status`: as in Harness, a step fails on its exit
    /// code, not on the failures its reports list.
    pub reports: Vec<StepReports>,
    /// The stage's merged report, `<run_dir>/junit-<stage>.xml`, when one was written.
    pub junit: Option<PathBuf>,
}

/// Options that shape every step of a run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    pub workspace: PathBuf,
    pub skip_unsupported: bool,
    /// Where the stage's merged JUnit report goes (`junit-<stage>.xml`, and `junit.xml` as a
    /// copy of the latest stage's). `None`: reports are summarised but not written.
    pub run_dir: Option<PathBuf>,
}

pub struct StageRun {
    pub plan: StagePlan,
    pub run: Arc<RunInfo>,
    pub stage: Arc<StageInfo>,
    pub exec: Arc<dyn Executor>,
    pub console: Arc<Console>,
    pub options: RunOptions,
    /// Fired by a signal to stagehand, or by an Abort failure strategy.
    pub cancel: CancellationToken,
    state: Mutex<State>,
    /// Services started so far: (step id, identifier, state), in start order.
    services: Mutex<Vec<ServiceEntry>>,
    /// Service state changes, forwarded to the stage's own loop in `run`.
    events: (
        mpsc::UnboundedSender<ServiceEvent>,
        tokio::sync::Mutex<mpsc::UnboundedReceiver<ServiceEvent>>,
    ),
    /// Cancels the Run steps in flight when a service fails (a child of `cancel`); replaced
    /// after each use so steps gated on failure can still run.
    in_flight: Mutex<CancellationToken>,
    /// When the stage started: the zero of every step's timestamps.
    t0: Instant,
    /// Services whose failure was already reported (events and waiters may both see it).
    failed_services: Mutex<std::collections::HashSet<String>>,
}

/// A service's step id and its new state.
type ServiceEvent = (String, ServiceState);

struct ServiceEntry {
    id: String,
    identifier: String,
    state: watch::Receiver<ServiceState>,
}

struct State {
    status: StageStatus,
    results: Vec<StepResult>,
    /// Reports read so far (Run steps, as each finishes).
    reports: Vec<StepReports>,
    /// Background steps with report paths, read after teardown has stopped them: a service
    /// often writes its report only when it exits.
    background_reports: Vec<PendingReports>,
}

/// A step's report patterns, waiting to be read.
struct PendingReports {
    step: String,
    workspace: PathBuf,
    patterns: Vec<String>,
}

enum FailKind {
    Timeout,
    Other,
}

impl StageRun {
    pub fn new(
        plan: StagePlan,
        run: Arc<RunInfo>,
        stage: Arc<StageInfo>,
        exec: Arc<dyn Executor>,
        console: Arc<Console>,
        options: RunOptions,
        cancel: CancellationToken,
    ) -> StageRun {
        let (tx, rx) = mpsc::unbounded_channel();
        let in_flight = Mutex::new(cancel.child_token());
        StageRun {
            plan,
            run,
            stage,
            exec,
            console,
            options,
            cancel,
            state: Mutex::new(State {
                status: StageStatus::Success,
                results: vec![],
                reports: vec![],
                background_reports: vec![],
            }),
            services: Mutex::new(Vec::new()),
            events: (tx, tokio::sync::Mutex::new(rx)),
            in_flight,
            failed_services: Mutex::new(Default::default()),
            t0: Instant::now(),
        }
    }

    fn status(&self) -> StageStatus {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).status
    }

    fn fail(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.status == StageStatus::Success {
            s.status = StageStatus::Failed;
        }
    }

    fn abort(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).status = StageStatus::Aborted;
        self.cancel.cancel();
    }

    fn record(&self, mut r: StepResult) {
        // Timestamps relative to the stage start: a step is recorded when it ends (a service:
        // when it has started), so its start is now minus its duration.
        let now = self.t0.elapsed();
        if let Some(d) = r.duration {
            r.started_ms = Some(now.saturating_sub(d).as_millis() as u64);
            if !r.background {
                r.finished_ms = Some(now.as_millis() as u64);
            }
        }
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .results
            .push(r);
    }

    /// Run the stage's steps, then tear down every service, whatever happened.
    pub async fn run(&self) -> StageReport {
        let started = Instant::now();
        let ids: Vec<String> = self.plan.steps().iter().map(|s| s.id.clone()).collect();
        self.console.set_width(&ids);
        let root = self.plan.root.clone();
        {
            // The steps, and beside them the service events: readiness is printed as it
            // happens, and a service that fails fails the stage at once.
            let mut events = self.events.1.lock().await;
            let steps = self.node(&root);
            tokio::pin!(steps);
            loop {
                tokio::select! {
                    _ = &mut steps => break,
                    Some((id, st)) = events.recv() => self.on_service(&id, st),
                }
            }
            while let Ok((id, st)) = events.try_recv() {
                self.on_service(&id, st);
            }
        }
        if self.cancel.is_cancelled() {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.status = StageStatus::Aborted;
        }
        let (ends, errors) = self.exec.teardown().await;
        {
            let stopped = self.t0.elapsed().as_millis() as u64;
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            for r in st
                .results
                .iter_mut()
                .filter(|r| r.background && r.finished_ms.is_none() && r.started_ms.is_some())
            {
                r.finished_ms = Some(stopped);
            }
        }
        for e in ends {
            if e.clean {
                self.console
                    .status(&format!("    service {} {}", e.id, e.description));
                continue;
            }
            // A service that died during the stage fails it, and its row says why (said once:
            // a failure already reported while the stage ran is not repeated).
            let reported = self
                .failed_services
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&e.id);
            if !reported {
                self.console
                    .status(&format!("    service {} FAILED: {}", e.id, e.description));
            }
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            // Keep the reason seen while the stage ran, if there was one.
            if let Some(r) = st
                .results
                .iter_mut()
                .find(|r| r.id == e.id && r.verdict != Verdict::Failed)
            {
                r.verdict = Verdict::Failed;
                r.message = Some(e.description.clone());
            }
            if st.status == StageStatus::Success {
                st.status = StageStatus::Failed;
            }
        }
        for e in &errors {
            self.console.status(&format!("    teardown: {e}"));
        }
        if !errors.is_empty() {
            self.fail();
        }
        let pending = std::mem::take(
            &mut self
                .state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .background_reports,
        );
        for p in pending {
            let r = read_reports(p.step, p.workspace, p.patterns).await;
            self.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .reports
                .push(r);
        }
        let mut reports =
            std::mem::take(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()).reports);
        // Parallel steps finish in any order; the plan's order keeps the summary stable.
        reports.sort_by_key(|r| {
            ids.iter()
                .position(|id| *id == r.step)
                .unwrap_or(usize::MAX)
        });
        // Masked at the end, with every mask known by now (secret output variables included).
        for r in &mut reports {
            mask_reports(r, &self.run.secrets);
        }
        // Reports never change the stage status: the steps' exit codes already did.
        let junit = self.write_junit(&reports);
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        StageReport {
            identifier: self.plan.identifier.clone(),
            status: s.status,
            results: s.results.clone(),
            duration: started.elapsed(),
            reports,
            junit,
        }
    }

    /// Writes `<run_dir>/junit-<stage>.xml` and `<run_dir>/junit.xml` when any report file was
    /// read. With several stages each has its own file, and `junit.xml` is the latest stage's
    /// (a stage without reports leaves it alone). Failing to write is a warning, not a failure.
    fn write_junit(&self, reports: &[StepReports]) -> Option<PathBuf> {
        let dir = self.options.run_dir.as_ref()?;
        if reports.iter().all(|r| r.files.is_empty()) {
            return None;
        }
        let stage_file = dir.join(format!("junit-{}.xml", self.plan.identifier));
        let latest = dir.join("junit.xml");
        let write = |path: &PathBuf| {
            crate::reports::write_merged(reports, path)
                .map_err(|e| {
                    self.console
                        .status(&format!("    junit: cannot write {}: {e}", path.display()))
                })
                .is_ok()
        };
        if !write(&stage_file) {
            return None;
        }
        if write(&latest) {
            self.console.status(&format!(
                "    junit: {} (also {})",
                stage_file.display(),
                latest.display()
            ));
        } else {
            self.console
                .status(&format!("    junit: {}", stage_file.display()));
        }
        Some(stage_file)
    }

    /// Reads a finished Run step's reports, if it declared any.
    async fn collect_reports(&self, step: &ResolvedStep) {
        if step.reports.is_empty() {
            return;
        }
        let r = read_reports(
            step.id.clone(),
            step.workspace.clone(),
            step.reports.clone(),
        )
        .await;
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .reports
            .push(r);
    }

    /// A service changed state while the stage runs.
    fn on_service(&self, id: &str, st: ServiceState) {
        let (failed, why) = match st {
            ServiceState::Starting => return,
            ServiceState::Ready(d) => {
                self.console.service_ready(id, d);
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(r) = st.results.iter_mut().rev().find(|r| r.id == id) {
                    r.ready_ms = r.started_ms.map(|t| t + d.as_millis() as u64);
                }
                return;
            }
            ServiceState::Exited {
                description,
                clean: true,
            } => {
                self.console
                    .status(&format!("    service {id} {description}"));
                return;
            }
            ServiceState::Exited {
                description,
                clean: false,
            } => (true, description),
            ServiceState::Failed(why) => (true, why),
        };
        if !failed
            || !self
                .failed_services
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.to_string())
        {
            return;
        }
        self.console.service_died(id, &why);
        self.print_tail(id, 30);
        {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = st.results.iter_mut().find(|r| r.id == id) {
                r.verdict = Verdict::Failed;
                r.message = Some(why);
            }
            if st.status == StageStatus::Success {
                st.status = StageStatus::Failed;
            }
        }
        // Steps running now depended on a stage that no longer holds: stop them.
        let mut token = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        token.cancel();
        *token = self.cancel.child_token();
    }

    fn print_tail(&self, id: &str, n: usize) {
        let tail = self.console.tail(id, n);
        if tail.is_empty() {
            return;
        }
        let what = if tail.len() == 1 {
            "last line".to_string()
        } else {
            format!("last {} lines", tail.len())
        };
        self.console.status(&format!("    {what} of {id}:"));
        for l in tail {
            self.console.status(&format!("    | {l}"));
        }
    }

    /// Before a Run step: wait until the services it depends on are ready (all services
    /// started so far, or its `dependsOn`). Err names a service that will never be ready.
    async fn wait_for_services(&self, s: &PlannedStep) -> Result<(), String> {
        let mut wanted: Vec<(String, watch::Receiver<ServiceState>)> = {
            let services = self.services.lock().unwrap_or_else(|e| e.into_inner());
            services
                .iter()
                .filter(|e| {
                    s.spec.depends_on.is_empty()
                        || s.spec
                            .depends_on
                            .iter()
                            .any(|d| d.value == e.id || d.value == e.identifier)
                })
                .map(|e| (e.id.clone(), e.state.clone()))
                .collect()
        };
        let mut announced = false;
        let waited = Instant::now();
        loop {
            let mut starting = Vec::new();
            // `borrow_and_update` marks each state seen, so the waits below wake only on a
            // new change, not over and over on the one just read.
            for (id, rx) in &mut wanted {
                let st = rx.borrow_and_update().clone();
                match st {
                    ServiceState::Starting => starting.push(id.clone()),
                    ServiceState::Failed(ref why) => {
                        let msg = format!("service {id} failed: {why}");
                        self.on_service(id, st);
                        return Err(msg);
                    }
                    ServiceState::Exited {
                        clean: false,
                        ref description,
                    } => {
                        let msg = format!("service {id} {description}");
                        self.on_service(id, st);
                        return Err(msg);
                    }
                    _ => {}
                }
            }
            if starting.is_empty() {
                if announced {
                    self.console.status(&format!(
                        "    {} waited {} for services",
                        s.id,
                        crate::units::format_duration(waited.elapsed())
                    ));
                }
                return Ok(());
            }
            if !announced {
                self.console.status(&format!(
                    "    {} waiting for {} (starting)",
                    s.id,
                    starting.join(", ")
                ));
                announced = true;
            }
            let mut changes: Vec<BoxFuture<'_, ()>> = wanted
                .iter()
                .map(|(_, rx)| {
                    let mut rx = rx.clone();
                    async move {
                        // A closed channel (executor gone) must not spin: wait for cancel.
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    .boxed()
                })
                .collect();
            changes.push(self.cancel.cancelled().boxed());
            let _ = futures::future::select_all(changes).await;
            if self.cancel.is_cancelled() {
                return Err("stage aborted".into());
            }
        }
    }

    fn node<'a>(&'a self, n: &'a PlanNode) -> BoxFuture<'a, ()> {
        async move {
            match n {
                PlanNode::Seq(items) => {
                    for i in items {
                        self.node(i).await;
                    }
                }
                PlanNode::Group { body, .. } => self.node(body).await,
                PlanNode::Parallel {
                    members,
                    max_concurrency,
                } => {
                    let sem = max_concurrency.map(|m| Arc::new(Semaphore::new(m.max(1))));
                    join_all(members.iter().map(|m| {
                        let sem = sem.clone();
                        async move {
                            let _permit = match &sem {
                                Some(s) => s.clone().acquire_owned().await.ok(),
                                None => None,
                            };
                            self.node(m).await
                        }
                    }))
                    .await;
                }
                PlanNode::Step(s) => self.step(s).await,
            }
        }
        .boxed()
    }

    fn skip(&self, s: &PlannedStep, why: &str) {
        self.console
            .step_end(&s.id, &Verdict::Skipped(why.into()).label(), None);
        self.record(StepResult {
            id: s.id.clone(),
            name: s.name.clone(),
            background: s.kind == StepKind::Background,
            verdict: Verdict::Skipped(why.into()),
            message: None,
            duration: None,
            attempts: 0,
            started_ms: None,
            ready_ms: None,
            finished_ms: None,
        });
    }

    fn ctx<'a>(&'a self, s: &'a PlannedStep) -> Ctx<'a> {
        Ctx {
            run: &self.run,
            stage: Some(&self.stage),
            step: Some(s),
        }
    }

    /// Should the step run, given the stage status and its `when`?
    fn gate(&self, s: &PlannedStep) -> Result<Option<String>, String> {
        let status = self.status();
        if status == StageStatus::Aborted {
            return Ok(Some("stage aborted".into()));
        }
        let gate = s
            .when
            .as_ref()
            .map(|w| w.status)
            .unwrap_or(StatusGate::Success);
        match (gate, status) {
            (StatusGate::Success, StageStatus::Failed) => {
                return Ok(Some("an earlier step failed".into()));
            }
            (StatusGate::Failure, StageStatus::Success) => {
                return Ok(Some("runs only when the stage has failed".into()));
            }
            _ => {}
        }
        if let Some(c) = s.when.as_ref().and_then(|w| w.condition.as_ref()) {
            let e = expr::parse_condition(&c.value).map_err(|e| format!("condition: {e}"))?;
            let v = expr::eval(&e, &self.ctx(s)).map_err(|e| format!("condition: {e}"))?;
            if !expr::truthy(&v) {
                return Ok(Some("condition is false".into()));
            }
        }
        Ok(None)
    }

    fn resolve(&self, s: &PlannedStep) -> Result<ResolvedStep, String> {
        let ctx = self.ctx(s);
        let r = |t: &Text| render(&t.value, &ctx).map_err(|e| format!("line {}: {e}", t.pos.line));
        let spec = &s.spec;
        let mut env: Vec<(String, String)> = self
            .stage
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in &spec.env {
            env.push((k.clone(), r(v)?));
        }
        let timeout = match &s.timeout {
            None => None,
            Some(Timeout::Fixed(d)) => Some(*d),
            Some(Timeout::Expr(t)) => {
                Some(crate::units::parse_duration(&r(t)?).map_err(|e| format!("timeout: {e}"))?)
            }
        };
        Ok(ResolvedStep {
            id: s.id.clone(),
            name: s.name.clone(),
            background: s.kind == StepKind::Background,
            image: spec
                .image
                .as_ref()
                .map(&r)
                .transpose()?
                .filter(|i| !i.trim().is_empty()),
            shell: spec.shell,
            command: spec.command.as_ref().map(&r).transpose()?,
            entrypoint: spec.entrypoint.iter().map(&r).collect::<Result<_, _>>()?,
            env,
            run_as_user: spec.run_as_user.as_ref().map(&r).transpose()?,
            output_variables: spec
                .output_variables
                .iter()
                .map(|o| o.name.clone())
                .collect(),
            port_bindings: spec
                .port_bindings
                .iter()
                .map(|p| (p.host, p.container))
                .collect(),
            memory: spec.memory,
            cpu: spec.cpu,
            privileged: spec.privileged,
            pull_policy: spec.pull_policy,
            timeout,
            reports: spec.reports.iter().map(&r).collect::<Result<_, _>>()?,
            workspace: self.options.workspace.clone(),
            health_check: match &spec.health_check {
                None => None,
                Some(h) => Some(ResolvedHealth {
                    probe: match &h.probe {
                        Probe::Tcp(p) => ResolvedProbe::Tcp(*p),
                        Probe::Http { port, path, status } => ResolvedProbe::Http {
                            port: *port,
                            path: path.clone(),
                            status: *status,
                        },
                        Probe::Exec(t) => ResolvedProbe::Exec(r(t)?),
                        Probe::Log(re) => {
                            ResolvedProbe::Log(regex::Regex::new(re).map_err(|e| e.to_string())?)
                        }
                    },
                    interval: h.interval,
                    timeout: h.timeout,
                    start_period: h.start_period,
                    retries: h.retries,
                    deadline: h.deadline,
                }),
            },
        })
    }

    async fn step(&self, s: &PlannedStep) {
        if let StepKind::Unsupported(t) = &s.kind {
            self.skip(s, &format!("{t} is not supported by stagehand"));
            return;
        }
        match self.gate(s) {
            Ok(Some(why)) => return self.skip(s, &why),
            Ok(None) => {}
            Err(e) => {
                self.console.step_start(&s.id, "");
                return self
                    .finish_failure(s, Instant::now(), 1, FailKind::Other, e)
                    .await;
            }
        }
        let started = Instant::now();
        let sink: Arc<dyn LineSink> = self.console.clone();
        let resolved = match self.resolve(s) {
            Ok(r) => r,
            Err(e) => {
                self.console.step_start(&s.id, "could not start");
                return self.finish_failure(s, started, 1, FailKind::Other, e).await;
            }
        };
        let place = match &resolved.image {
            Some(i) => format!("in {i}"),
            None => "on the host".into(),
        };
        if s.kind == StepKind::Background {
            self.console
                .step_start(&s.id, &format!("starting service {place}"));
            match self.exec.start_service(&resolved, sink).await {
                Ok(state) => {
                    let mut follow = state.clone();
                    // Seen now, not as an event: ready at once (no health check), or before
                    // `follow` was taken.
                    let ready_now = match &*state.borrow() {
                        ServiceState::Ready(d) => Some(*d),
                        _ => None,
                    };
                    self.services
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(ServiceEntry {
                            id: s.id.clone(),
                            identifier: s.identifier.clone(),
                            state,
                        });
                    let tx = self.events.0.clone();
                    let id = s.id.clone();
                    tokio::spawn(async move {
                        while follow.changed().await.is_ok() {
                            let st = follow.borrow_and_update().clone();
                            if tx.send((id.clone(), st)).is_err() {
                                return;
                            }
                        }
                    });
                    if !resolved.reports.is_empty() {
                        self.state
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .background_reports
                            .push(PendingReports {
                                step: s.id.clone(),
                                workspace: resolved.workspace.clone(),
                                patterns: resolved.reports.clone(),
                            });
                    }
                    self.console
                        .step_end(&s.id, "started", Some(started.elapsed()));
                    self.record(StepResult {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        background: true,
                        verdict: Verdict::Started,
                        message: None,
                        duration: Some(started.elapsed()),
                        attempts: 1,
                        started_ms: None,
                        ready_ms: None,
                        finished_ms: None,
                    });
                    if let Some(d) = ready_now {
                        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(r) = st.results.iter_mut().rev().find(|r| r.id == s.id) {
                            r.ready_ms = r.started_ms.map(|t| t + d.as_millis() as u64);
                        }
                    }
                }
                Err(e) => {
                    // Harness: Background steps have no failure strategies; a service that
                    // cannot start fails the stage.
                    self.console
                        .step_end(&s.id, &format!("FAILED: {e}"), Some(started.elapsed()));
                    self.record(StepResult {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        background: true,
                        verdict: Verdict::Failed,
                        message: Some(e),
                        duration: Some(started.elapsed()),
                        attempts: 1,
                        started_ms: None,
                        ready_ms: None,
                        finished_ms: None,
                    });
                    self.fail();
                }
            }
            return;
        }
        // The step's timeout covers its whole life, waiting for services included: a step
        // never waits past it for a service that is slow to come up.
        let waiting = Instant::now();
        let waited = match resolved.timeout {
            Some(limit) => tokio::time::timeout(limit, self.wait_for_services(s)).await,
            None => Ok(self.wait_for_services(s).await),
        };
        match waited {
            Ok(Ok(())) => {}
            Ok(Err(why)) => {
                if self.cancel.is_cancelled() {
                    return self.skip(s, "stage aborted");
                }
                return self.skip(s, &why);
            }
            Err(_) => {
                let starting: Vec<String> = self
                    .services
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|e| *e.state.borrow() == ServiceState::Starting)
                    .map(|e| e.id.clone())
                    .collect();
                self.console.step_start(&s.id, "did not start");
                let limit = resolved
                    .timeout
                    .map(crate::units::format_duration)
                    .unwrap_or_default();
                let msg = format!(
                    "timed out after {limit} waiting for {} (starting)",
                    starting.join(", ")
                );
                return self
                    .finish_failure(s, waiting, 1, FailKind::Timeout, msg)
                    .await;
            }
        }
        // What the wait used comes off the step's timeout (a wait too short to matter does not
        // change the limit the user sees in messages).
        let limit = resolved.timeout;
        let mut resolved = resolved;
        let waited = waiting.elapsed();
        if waited >= Duration::from_millis(10) {
            resolved.timeout = resolved
                .timeout
                .map(|t| t.saturating_sub(waited).max(Duration::from_millis(1)));
        }
        // The step's own time starts now, not while it waited for services.
        let started = Instant::now();
        self.console.step_start(&s.id, &format!("running {place}"));
        self.attempts(s, &resolved, started, sink, limit).await;
        // Whatever the outcome (passed, failed, timed out, aborted): a failing test run is when
        // the report matters most, and a partial one still says how far it got.
        self.collect_reports(&resolved).await;
    }

    /// Runs a Run step, with its retries, and records how it ended.
    async fn attempts(
        &self,
        s: &PlannedStep,
        resolved: &ResolvedStep,
        started: Instant,
        sink: Arc<dyn LineSink>,
        limit: Option<Duration>,
    ) {
        let mut attempt = 1u32;
        // The retry budget of the strategy that first matched; retries re-enter the same loop.
        let mut retries_left: Option<u32> = None;
        loop {
            let token = self
                .in_flight
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let outcome = self.exec.run(resolved, sink.clone(), token).await;
            let (kind, message) = match outcome {
                Outcome::Exited { code: 0, outputs } => {
                    self.accept_outputs(s, outputs);
                    self.console
                        .step_end(&s.id, "passed", Some(started.elapsed()));
                    self.record(StepResult {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        background: false,
                        verdict: Verdict::Passed,
                        message: None,
                        duration: Some(started.elapsed()),
                        attempts: attempt,
                        started_ms: None,
                        ready_ms: None,
                        finished_ms: None,
                    });
                    return;
                }
                Outcome::Cancelled => {
                    self.console
                        .step_end(&s.id, "aborted", Some(started.elapsed()));
                    self.record(StepResult {
                        id: s.id.clone(),
                        name: s.name.clone(),
                        background: false,
                        verdict: Verdict::Aborted,
                        message: None,
                        duration: Some(started.elapsed()),
                        attempts: attempt,
                        started_ms: None,
                        ready_ms: None,
                        finished_ms: None,
                    });
                    // A signal or an Abort aborts the stage; a failed service has already
                    // failed it, and steps gated on failure still run.
                    if self.cancel.is_cancelled() {
                        self.state.lock().unwrap_or_else(|e| e.into_inner()).status =
                            StageStatus::Aborted;
                    }
                    return;
                }
                Outcome::Exited { code, .. } => (FailKind::Other, format!("exit code {code}")),
                Outcome::TimedOut => (
                    FailKind::Timeout,
                    format!(
                        "timed out after {}",
                        // The step's own limit, not what was left of it after waiting.
                        limit.map(crate::units::format_duration).unwrap_or_default()
                    ),
                ),
                Outcome::Error(e) => (FailKind::Other, e),
            };
            let action = pick_action(&s.failure_strategies, &kind);
            if let Some(Action::Retry {
                count, intervals, ..
            }) = action
            {
                let left = retries_left.get_or_insert(*count);
                if *left > 0 && !self.cancel.is_cancelled() {
                    *left -= 1;
                    let idx = (attempt as usize - 1).min(intervals.len().saturating_sub(1));
                    let wait = intervals.get(idx).copied().unwrap_or(Duration::ZERO);
                    self.console.status(&format!(
                        "    {} failed ({message}); retry {} of {count} in {}",
                        s.id,
                        attempt,
                        crate::units::format_duration(wait)
                    ));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.cancel.cancelled() => {}
                    }
                    attempt += 1;
                    continue;
                }
            }
            return self
                .finish_failure(s, started, attempt, kind, message)
                .await;
        }
    }

    /// Apply the failure strategy (after any retries) and record the result.
    async fn finish_failure(
        &self,
        s: &PlannedStep,
        started: Instant,
        attempts: u32,
        kind: FailKind,
        message: String,
    ) {
        let mut action = pick_action(&s.failure_strategies, &kind)
            .cloned()
            .unwrap_or(Action::MarkAsFailure);
        if let Action::Retry {
            on_retry_failure, ..
        } = action
        {
            action = *on_retry_failure;
        }
        let base = match kind {
            FailKind::Timeout => Verdict::TimedOut,
            FailKind::Other => Verdict::Failed,
        };
        let verdict = match action {
            Action::Ignore => Verdict::Ignored,
            Action::MarkAsSuccess => Verdict::MarkedSuccess,
            Action::Abort => {
                self.abort();
                base
            }
            _ => {
                self.fail();
                base
            }
        };
        let shown = match &verdict {
            Verdict::Ignored | Verdict::MarkedSuccess => format!("{} ({message})", verdict.label()),
            v => format!("{}: {message}", v.label()),
        };
        self.console
            .step_end(&s.id, &shown, Some(started.elapsed()));
        if matches!(verdict, Verdict::Failed | Verdict::TimedOut) {
            // `--quiet` hid the step's output while it ran; a failing step's is shown now.
            if self.console.is_quiet() {
                self.print_tail(&s.id, 40);
            }
            // What the services said last is usually why a step against them failed.
            let running: Vec<String> = self
                .services
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|e| {
                    matches!(
                        *e.state.borrow(),
                        ServiceState::Starting | ServiceState::Ready(_)
                    )
                })
                .map(|e| e.id.clone())
                .collect();
            for id in running {
                self.print_tail(&id, 10);
            }
        }
        self.record(StepResult {
            id: s.id.clone(),
            name: s.name.clone(),
            background: s.kind == StepKind::Background,
            verdict,
            message: Some(message),
            duration: Some(started.elapsed()),
            attempts,
            started_ms: None,
            ready_ms: None,
            finished_ms: None,
        });
    }

    fn accept_outputs(&self, s: &PlannedStep, outputs: BTreeMap<String, String>) {
        for o in &s.spec.output_variables {
            if o.secret {
                if let Some(v) = outputs.get(&o.name) {
                    self.run.secrets.add_mask(v);
                }
            }
        }
        self.run.record_outputs(&self.stage.identifier, s, outputs);
    }
}

fn pick_action<'a>(strategies: &'a [FailureStrategy], kind: &FailKind) -> Option<&'a Action> {
    strategies
        .iter()
        .find(|fs| {
            fs.errors.iter().any(|e| {
                matches!(
                    (e, kind),
                    (ErrorKind::All, _)
                        | (ErrorKind::Timeout, FailKind::Timeout)
                        | (ErrorKind::Other, FailKind::Other)
                )
            })
        })
        .map(|fs| &fs.action)
}

/// The summary table printed after a stage.
pub fn summary(report: &StageReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let w = report
        .results
        .iter()
        .map(|r| r.id.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let status = match report.status {
        StageStatus::Success => "succeeded",
        StageStatus::Failed => "FAILED",
        StageStatus::Aborted => "ABORTED",
    };
    let _ = writeln!(
        out,
        "stage {} {status} in {}",
        report.identifier,
        crate::units::format_duration(report.duration)
    );
    let _ = writeln!(
        out,
        "  {:<w$}  {:<8}  {:>8}  result",
        "step", "kind", "time"
    );
    for r in &report.results {
        let kind = if r.background { "service" } else { "run" };
        let time = r
            .duration
            .map(crate::units::format_duration)
            .unwrap_or_else(|| "-".into());
        let mut verdict = r.verdict.label();
        if let (Some(st), Some(rd), Verdict::Started) = (
            r.started_ms,
            r.ready_ms.filter(|rd| Some(*rd) != r.started_ms),
            &r.verdict,
        ) {
            verdict = format!(
                "{verdict}, ready after {}",
                crate::units::format_duration(Duration::from_millis(rd.saturating_sub(st)))
            );
        }
        if r.attempts > 1 {
            verdict = format!("{verdict} after {} attempts", r.attempts);
        }
        if let (Some(m), Verdict::Failed | Verdict::TimedOut) = (&r.message, &r.verdict) {
            verdict = format!("{verdict}: {m}");
        }
        let _ = writeln!(out, "  {:<w$}  {:<8}  {:>8}  {verdict}", r.id, kind, time);
    }
    for line in crate::reports::render_summary(&report.reports, SLOWEST_CASES).lines() {
        let _ = writeln!(out, "  {line}");
    }
    out
}

/// Reads reports off the async threads: the glob walk and the parsing are blocking file work.
async fn read_reports(step: String, workspace: PathBuf, patterns: Vec<String>) -> StepReports {
    let id = step.clone();
    match tokio::task::spawn_blocking(move || crate::reports::collect(&step, &workspace, &patterns))
        .await
    {
        Ok(r) => r,
        // `collect` does not panic on input; should it anyway, the stage still ends normally.
        Err(e) => StepReports {
            step: id,
            warnings: vec![format!("reading the reports failed: {e}")],
            ..StepReports::default()
        },
    }
}

/// Masks secrets in every text a report carries: test output and failure messages often echo
/// the environment, and all of it is printed or written to the merged file.
fn mask_reports(r: &mut StepReports, secrets: &Secrets) {
    let m = |t: &mut String| *t = secrets.mask(t);
    let mo = |t: &mut Option<String>| {
        if let Some(t) = t {
            *t = secrets.mask(t);
        }
    };
    m(&mut r.step);
    for f in &mut r.files {
        // Only rewritten when a secret is in it, so a non-UTF-8 path stays exact otherwise.
        let shown = f.to_string_lossy();
        let masked = secrets.mask(&shown);
        if masked != shown {
            *f = PathBuf::from(masked);
        }
    }
    r.warnings.iter_mut().for_each(m);
    for c in &mut r.cases {
        m(&mut c.suite);
        mo(&mut c.classname);
        m(&mut c.name);
        m(&mut c.step);
        match &mut c.outcome {
            CaseOutcome::Passed => {}
            CaseOutcome::Failed { message, detail } | CaseOutcome::Error { message, detail } => {
                mo(message);
                mo(detail);
            }
            CaseOutcome::Skipped { message } => mo(message),
        }
    }
}

#[cfg(test)]
mod tests;
