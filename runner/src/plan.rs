//! Planning: a checked [`Stage`] into a [`StagePlan`], the tree the scheduler walks.
//!
//! Owns: expanding looping strategies (each iteration is its own step), inheriting `when` and
//! failure strategies from step groups and the stage, naming every step uniquely in the stage
//! (`sg1_Run_1`, Harness's hostname rule), and printing the tree for `stagehand plan`.
//! Does not own: running anything, or evaluating expressions (that happens just before a step
//! runs, so output variables of earlier steps are available).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use crate::model::*;
use crate::yaml::Pos;

/// The loop variables of one iteration: `<+matrix.KEY>`, `<+strategy.iteration>`, `<+repeat.item>`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoopCtx {
    pub matrix: BTreeMap<String, String>,
    pub iteration: usize,
    pub iterations: usize,
    pub item: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedStep {
    /// Unique in the stage; also the step's hostname and log name. `Run_1`, `sg1_Run_1`,
    /// `Run_1_0` for the first iteration of a looped step.
    pub id: String,
    /// As written in the file.
    pub identifier: String,
    /// The step group's identifier (with its iteration suffix), if any.
    pub group: Option<String>,
    pub name: String,
    pub kind: StepKind,
    pub spec: StepSpec,
    pub timeout: Option<Timeout>,
    pub when: Option<When>,
    pub failure_strategies: Vec<FailureStrategy>,
    pub loop_ctx: Option<LoopCtx>,
    pub pos: Pos,
}

#[derive(Clone, Debug)]
pub enum PlanNode {
    Step(Arc<PlannedStep>),
    Seq(Vec<PlanNode>),
    Parallel {
        members: Vec<PlanNode>,
        max_concurrency: Option<usize>,
    },
    Group {
        id: String,
        name: String,
        body: Box<PlanNode>,
    },
}

#[derive(Clone, Debug)]
pub struct StagePlan {
    pub identifier: String,
    pub name: String,
    pub variables: Vec<Variable>,
    pub when: Option<When>,
    pub volumes: Vec<Volume>,
    pub root: PlanNode,
}

impl StagePlan {
    /// Every step in plan order.
    pub fn steps(&self) -> Vec<Arc<PlannedStep>> {
        let mut out = Vec::new();
        collect(&self.root, &mut out);
        out
    }
}

fn collect(n: &PlanNode, out: &mut Vec<Arc<PlannedStep>>) {
    match n {
        PlanNode::Step(s) => out.push(s.clone()),
        PlanNode::Seq(v) | PlanNode::Parallel { members: v, .. } => {
            v.iter().for_each(|c| collect(c, out))
        }
        PlanNode::Group { body, .. } => collect(body, out),
    }
}

struct Inherit<'a> {
    when: Option<&'a When>,
    failure: &'a [FailureStrategy],
    group: Option<String>,
    loop_ctx: Option<LoopCtx>,
    suffix: String,
}

pub fn plan_stage(stage: &Stage) -> StagePlan {
    let inherit = Inherit {
        when: None,
        failure: &stage.failure_strategies,
        group: None,
        loop_ctx: None,
        suffix: String::new(),
    };
    let root = PlanNode::Seq(stage.steps.iter().map(|i| plan_item(i, &inherit)).collect());
    StagePlan {
        identifier: stage.identifier.clone(),
        name: stage.name.clone(),
        variables: stage.variables.clone(),
        when: stage.when.clone(),
        volumes: stage.volumes.clone(),
        root,
    }
}

fn plan_item(item: &Item, inh: &Inherit) -> PlanNode {
    match item {
        Item::Step(s) => match &s.strategy {
            None => PlanNode::Step(Arc::new(planned(s, inh, inh.loop_ctx.clone(), &inh.suffix))),
            Some(st) => {
                let (iters, max) = iterations(st);
                let members = iters
                    .into_iter()
                    .map(|ctx| {
                        let suffix = format!("{}_{}", inh.suffix, ctx.iteration);
                        PlanNode::Step(Arc::new(planned(s, inh, Some(ctx), &suffix)))
                    })
                    .collect();
                PlanNode::Parallel {
                    members,
                    max_concurrency: max,
                }
            }
        },
        Item::Parallel(members, _) => PlanNode::Parallel {
            members: members.iter().map(|m| plan_item(m, inh)).collect(),
            max_concurrency: None,
        },
        Item::Group(g) => {
            let make = |ctx: Option<LoopCtx>, suffix: String| {
                let gid = format!("{}{}", g.identifier, suffix);
                let inner = Inherit {
                    when: g.when.as_ref().or(inh.when),
                    failure: if g.failure_strategies.is_empty() {
                        inh.failure
                    } else {
                        &g.failure_strategies
                    },
                    group: Some(gid.clone()),
                    loop_ctx: ctx,
                    suffix: String::new(),
                };
                let body = PlanNode::Seq(g.steps.iter().map(|i| plan_item(i, &inner)).collect());
                PlanNode::Group {
                    id: gid,
                    name: g.name.clone(),
                    body: Box::new(body),
                }
            };
            match &g.strategy {
                None => make(inh.loop_ctx.clone(), String::new()),
                Some(st) => {
                    let (iters, max) = iterations(st);
                    let members = iters
                        .into_iter()
                        .map(|ctx| {
                            let suffix = format!("_{}", ctx.iteration);
                            make(Some(ctx), suffix)
                        })
                        .collect();
                    PlanNode::Parallel {
                        members,
                        max_concurrency: max,
                    }
                }
            }
        }
    }
}

fn planned(s: &Step, inh: &Inherit, loop_ctx: Option<LoopCtx>, suffix: &str) -> PlannedStep {
    let identifier = s.identifier.clone();
    let id = match &inh.group {
        Some(g) => format!("{g}_{identifier}{suffix}"),
        None => format!("{identifier}{suffix}"),
    };
    let mut name = s.name.clone();
    if let Some(ctx) = &loop_ctx {
        if !ctx.matrix.is_empty() && inh.group.is_none() {
            let combo: Vec<String> = ctx
                .matrix
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            name = format!("{name} ({})", combo.join(", "));
        } else if let Some(item) = &ctx.item {
            name = format!("{name} ({item})");
        } else if inh.group.is_none() {
            name = format!("{name} ({}/{})", ctx.iteration + 1, ctx.iterations);
        }
    }
    PlannedStep {
        id,
        identifier,
        group: inh.group.clone(),
        name,
        kind: s.kind.clone(),
        spec: s.spec.clone(),
        timeout: s.timeout.clone(),
        when: s.when.clone().or_else(|| inh.when.cloned()),
        failure_strategies: s
            .failure_strategies
            .clone()
            .unwrap_or_else(|| inh.failure.to_vec()),
        loop_ctx,
        pos: s.pos,
    }
}

/// The iterations of a strategy, and how many may run at once.
pub fn iterations(st: &Strategy) -> (Vec<LoopCtx>, Option<usize>) {
    match st {
        Strategy::Matrix {
            axes,
            exclude,
            max_concurrency,
            ..
        } => {
            let mut combos: Vec<BTreeMap<String, String>> = vec![BTreeMap::new()];
            for (axis, values) in axes {
                let mut next = Vec::new();
                for c in &combos {
                    for v in values {
                        let mut c2 = c.clone();
                        c2.insert(axis.clone(), v.clone());
                        next.push(c2);
                    }
                }
                combos = next;
            }
            combos.retain(|c| {
                !exclude
                    .iter()
                    .any(|ex| !ex.is_empty() && ex.iter().all(|(k, v)| c.get(k) == Some(v)))
            });
            let n = combos.len();
            let ctxs = combos
                .into_iter()
                .enumerate()
                .map(|(i, matrix)| LoopCtx {
                    matrix,
                    iteration: i,
                    iterations: n,
                    item: None,
                })
                .collect();
            (ctxs, *max_concurrency)
        }
        Strategy::Parallelism { count, .. } => {
            let ctxs = (0..*count)
                .map(|i| LoopCtx {
                    iteration: i,
                    iterations: *count,
                    ..Default::default()
                })
                .collect();
            (ctxs, None)
        }
        Strategy::Repeat {
            items,
            max_concurrency,
            ..
        } => {
            let ctxs: Vec<LoopCtx> = match items {
                RepeatItems::Times(n) => (0..*n)
                    .map(|i| LoopCtx {
                        iteration: i,
                        iterations: *n,
                        ..Default::default()
                    })
                    .collect(),
                RepeatItems::Items(v) => v
                    .iter()
                    .enumerate()
                    .map(|(i, item)| LoopCtx {
                        iteration: i,
                        iterations: v.len(),
                        item: Some(item.clone()),
                        ..Default::default()
                    })
                    .collect(),
            };
            (ctxs, *max_concurrency)
        }
    }
}

/// The execution tree as text, for `stagehand plan`.
pub fn render(plan: &StagePlan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "stage {} ({})", plan.identifier, plan.name);
    render_node(&plan.root, 1, &mut out);
    out
}

fn render_node(n: &PlanNode, depth: usize, out: &mut String) {
    let pad = "  ".repeat(depth);
    match n {
        PlanNode::Seq(items) => items.iter().for_each(|i| render_node(i, depth, out)),
        PlanNode::Parallel {
            members,
            max_concurrency,
        } => {
            let limit = max_concurrency
                .map(|m| format!(", at most {m} at once"))
                .unwrap_or_default();
            let _ = writeln!(out, "{pad}parallel ({} at once{limit}):", members.len());
            members.iter().for_each(|m| render_node(m, depth + 1, out));
        }
        PlanNode::Group { id, name, body } => {
            let _ = writeln!(out, "{pad}group {id} ({name}):");
            render_node(body, depth + 1, out);
        }
        PlanNode::Step(s) => {
            let kind = match &s.kind {
                StepKind::Run => "run".to_string(),
                StepKind::Background => "service".to_string(),
                StepKind::Unsupported(t) => format!("unsupported {t}"),
            };
            let place = match &s.spec.image {
                Some(i) => format!("image {}", i.value),
                None => "host".to_string(),
            };
            let mut extra = String::new();
            if let Some(Timeout::Fixed(d)) = &s.timeout {
                let _ = write!(extra, ", timeout {}", crate::units::format_duration(*d));
            }
            if let Some(w) = &s.when {
                let st = match w.status {
                    StatusGate::Success => "on success",
                    StatusGate::Failure => "on failure",
                    StatusGate::All => "always",
                };
                let _ = write!(extra, ", runs {st}");
                if let Some(c) = &w.condition {
                    let _ = write!(extra, " if {}", c.value.trim());
                }
            }
            let ports: Vec<String> = s
                .spec
                .port_bindings
                .iter()
                .map(|p| format!("{}->{}", p.host, p.container))
                .collect();
            if !ports.is_empty() {
                let _ = write!(extra, ", ports {}", ports.join(" "));
            }
            let _ = writeln!(out, "{pad}{kind} {} \"{}\" [{place}{extra}]", s.id, s.name);
        }
    }
}

/// Default grace period between the stop signal and SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::Diagnostics;
    use std::path::Path;

    fn plan_of(src: &str) -> StagePlan {
        let node = crate::yaml::parse(src).unwrap();
        let mut d = Diagnostics::new(Path::new("t.yaml"));
        let p = crate::load::load(&node, &mut d).unwrap();
        assert!(!d.has_errors(), "{:?}", d.items);
        plan_stage(&p.stages[0])
    }

    const GROUPED: &str = "stage:
  identifier: s
  type: CI
  failureStrategies:
    - onFailure: {errors: [AllErrors], action: {type: Ignore}}
  spec:
    execution:
      steps:
        - parallel:
            - stepGroup:
                identifier: sg1
                when: {stageStatus: All}
                steps:
                  - step: {identifier: Background_1, type: Background, spec: {command: sleep 1}}
                  - step:
                      identifier: Run_1
                      type: Run
                      when: {stageStatus: Success}
                      spec: {command: 'true'}
            - step:
                identifier: m
                type: Run
                strategy:
                  matrix:
                    os: [linux, mac]
                    v: ['1', '2']
                    exclude: [{os: mac, v: '2'}]
                    maxConcurrency: 2
                spec: {command: echo <+matrix.os>}
";

    #[test]
    fn groups_name_steps_and_inherit() {
        let plan = plan_of(GROUPED);
        let steps = plan.steps();
        let ids: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, ["sg1_Background_1", "sg1_Run_1", "m_0", "m_1", "m_2"]);
        assert_eq!(
            steps[0].when.as_ref().unwrap().status,
            StatusGate::All,
            "group when inherited"
        );
        assert_eq!(
            steps[1].when.as_ref().unwrap().status,
            StatusGate::Success,
            "step's own when wins"
        );
        assert_eq!(
            steps[0].failure_strategies[0].action,
            Action::Ignore,
            "stage strategy inherited"
        );
        assert_eq!(steps[4].loop_ctx.as_ref().unwrap().matrix["os"], "mac");
        assert_eq!(steps[4].loop_ctx.as_ref().unwrap().iterations, 3);
    }

    #[test]
    fn render_shows_parallel_and_groups() {
        let plan = plan_of(GROUPED);
        let text = render(&plan);
        assert!(text.contains("parallel (2 at once):"), "{text}");
        assert!(text.contains("group sg1 (sg1):"), "{text}");
        assert!(text.contains("service sg1_Background_1"), "{text}");
        assert!(
            text.contains("parallel (3 at once, at most 2 at once):"),
            "{text}"
        );
    }

    #[test]
    fn repeat_items_and_parallelism() {
        let st = Strategy::Repeat {
            items: RepeatItems::Items(vec!["a".into(), "b".into()]),
            max_concurrency: Some(1),
            pos: Pos::default(),
        };
        let (it, max) = iterations(&st);
        assert_eq!(it.len(), 2);
        assert_eq!(it[1].item.as_deref(), Some("b"));
        assert_eq!(max, Some(1));
        let (it, _) = iterations(&Strategy::Parallelism {
            count: 3,
            pos: Pos::default(),
        });
        assert_eq!(
            it.iter().map(|c| c.iteration).collect::<Vec<_>>(),
            [0, 1, 2]
        );
    }
}
