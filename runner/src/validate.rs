//! Validation across the whole file: expressions and the names they use, port clashes.
//!
//! Owns: checks that need more than one place in the file: does `<+steps.Run_1.output...>` name
//! a step and an output variable that exist, is `<+matrix.os>` used inside a matrix, do two
//! services bind one host port. Runs after `load` on the typed model; adds to the same
//! [`Diagnostics`]. Does not own: per-field shape checks (`load`), evaluation (`context`).

use std::collections::{BTreeMap, HashMap};

use crate::diag::{Diagnostics, did_you_mean};
use crate::expr::{self, Path as RefPath, Seg};
use crate::model::*;
use crate::plan::{PlannedStep, plan_stage};
use crate::yaml::Pos;

/// Every phase of `stagehand validate` on a file's text: parse, runtime inputs (`values`;
/// with `require_inputs`, an input left without one is an error), load, validate. The one
/// entry point for the CLI, the fuzz target and the suites, so they check what users get.
/// The diagnostics are not finished (the caller may add its own first); the pipeline is
/// `None` when the text does not load.
pub fn check_source(
    file: &std::path::Path,
    source: &str,
    values: &crate::inputs::InputValues,
    require_inputs: bool,
) -> (Diagnostics, Option<Pipeline>) {
    let mut diags = Diagnostics::new(file);
    let mut root = match crate::yaml::parse(source) {
        Ok(n) => n,
        Err(e) => {
            diags.error(e.pos, e.message);
            return (diags, None);
        }
    };
    let outcome = crate::inputs::resolve(&mut root, values, require_inputs);
    for m in &outcome.missing {
        diags.error_hint(
            m.pos,
            format!("runtime input `{}` has no value", m.path),
            format!("pass --input {}=VALUE or an --inputs-file", m.path),
        );
    }
    for b in &outcome.bad {
        diags.error(b.pos, format!("input `{}`: {}", b.path, b.message));
    }
    for u in &outcome.unused {
        diags.warning(
            Pos { line: 1, col: 1 },
            format!("--input {u} matches no <+input> in the file"),
        );
    }
    let pipeline = crate::load::load(&root, &mut diags);
    if let Some(p) = &pipeline {
        validate(p, source, &mut diags);
    }
    (diags, pipeline)
}

/// Names every expression may use at the top.
pub const ROOTS: &[&str] = &[
    "pipeline",
    "stage",
    "step",
    "steps",
    "execution",
    "secrets",
    "codebase",
    "trigger",
    "env",
    "matrix",
    "strategy",
    "repeat",
    "variable",
    "input",
    "stages",
    "serviceVariables",
    "artifact",
    "eventPayload",
];

struct Scope<'a> {
    stage: &'a Stage,
    /// identifier → output variable names, for every step in the stage (groups flattened), and
    /// group-qualified `G.ID` too.
    outputs: &'a Outputs,
    /// The step being checked, if any.
    step: Option<&'a PlannedStep>,
    /// Matrix axes / repeat items / any strategy, for the step being checked.
    axes: Vec<String>,
    looped: bool,
    repeat_items: bool,
}

/// A stage's steps and groups by identifier (and `G.steps.ID`), with their output variables.
type Outputs = HashMap<String, Vec<String>>;

pub fn validate(p: &Pipeline, source: &str, diags: &mut Diagnostics) {
    let lines: Vec<&str> = source.lines().collect();
    // Once per stage, not once per step checked: a stage of n steps would cost n² otherwise.
    let outputs = p.stages.iter().map(stage_outputs).collect();
    let v = Validator { lines, p, outputs };
    for var in &p.variables {
        let scope = v.scope(None, None);
        v.template(&var.value, scope.as_ref(), diags);
    }
    for stage in &p.stages {
        if stage.unsupported {
            continue;
        }
        let base = v.scope(Some(stage), None);
        for var in &stage.variables {
            v.template(&var.value, base.as_ref(), diags);
        }
        if let Some(c) = stage.when.as_ref().and_then(|w| w.condition.as_ref()) {
            v.condition(c, base.as_ref(), diags);
        }
        let plan = plan_stage(stage);
        let mut host_ports: BTreeMap<u16, String> = BTreeMap::new();
        // Each step once (not once per loop iteration).
        let mut checked = std::collections::HashSet::new();
        let plan_steps = plan.steps();
        for step in plan_steps.iter().cloned() {
            if matches!(step.kind, StepKind::Background) {
                for pb in &step.spec.port_bindings {
                    if let Some(other) = host_ports.get(&pb.host) {
                        if *other != step.id {
                            diags.error(
                                pb.pos,
                                format!(
                                    "host port {} is bound by both `{other}` and `{}`",
                                    pb.host, step.id
                                ),
                            );
                        }
                    } else {
                        host_ports.insert(pb.host, step.id.clone());
                    }
                }
            }
            if !checked.insert(step.pos) {
                continue;
            }
            let scope = v.scope(Some(stage), Some(&step));
            let scope = scope.as_ref();
            let s = &step.spec;
            for t in s
                .image
                .iter()
                .chain(s.command.iter())
                .chain(s.entrypoint.iter())
                .chain(s.run_as_user.iter())
                .chain(s.reports.iter())
            {
                v.template(t, scope, diags);
            }
            for (_, t) in &s.env {
                v.template(t, scope, diags);
            }
            if let Some(HealthCheck {
                probe: Probe::Exec(t),
                ..
            }) = &s.health_check
            {
                v.template(t, scope, diags);
            }
            // Where this step is in the stage's order: a service planned after it has not
            // started when it runs, and the scheduler waits only for started services.
            let here = plan_steps
                .iter()
                .position(|p| p.pos == step.pos && p.id == step.id);
            for d in &s.depends_on {
                let services: Vec<&str> = plan_steps
                    .iter()
                    .filter(|p| p.kind == StepKind::Background)
                    .flat_map(|p| [p.id.as_str(), p.identifier.as_str()])
                    .collect();
                let first = plan_steps.iter().position(|p| {
                    p.kind == StepKind::Background && (p.id == d.value || p.identifier == d.value)
                });
                if let (Some(here), Some(at)) = (here, first) {
                    if at > here {
                        diags.error(d.pos, format!("`dependsOn` names `{}`, which starts after `{}`: a step can only wait for services started before it", d.value, step.id));
                        continue;
                    }
                }
                if !services.contains(&d.value.as_str()) {
                    let hint = did_you_mean(&d.value, &services)
                        .map(|x| format!(" (did you mean `{x}`?)"))
                        .unwrap_or_default();
                    diags.error(d.pos, format!("`dependsOn` names `{}`, which is not a Background step of stage `{}`{hint}", d.value, stage.identifier));
                }
            }
            if let Some(Timeout::Expr(t)) = &step.timeout {
                v.template(t, scope, diags);
            }
            if let Some(c) = step.when.as_ref().and_then(|w| w.condition.as_ref()) {
                v.condition(c, scope, diags);
            }
        }
    }
}

struct Validator<'a> {
    lines: Vec<&'a str>,
    p: &'a Pipeline,
    /// The [`Outputs`] of each stage, in the order of `p.stages`.
    outputs: Vec<Outputs>,
}

fn stage_outputs(stage: &Stage) -> Outputs {
    let mut outputs = Outputs::new();
    fn walk(items: &[Item], group: Option<&str>, out: &mut Outputs) {
        for i in items {
            match i {
                Item::Step(s) => {
                    let names: Vec<String> = s
                        .spec
                        .output_variables
                        .iter()
                        .map(|o| o.name.clone())
                        .collect();
                    if let Some(g) = group {
                        out.insert(format!("{g}.steps.{}", s.identifier), names.clone());
                    }
                    out.entry(s.identifier.clone()).or_default().extend(names);
                }
                Item::Parallel(m, _) => walk(m, group, out),
                Item::Group(g) => {
                    out.entry(g.identifier.clone()).or_default();
                    walk(&g.steps, Some(&g.identifier), out);
                }
            }
        }
    }
    walk(&stage.steps, None, &mut outputs);
    outputs
}

impl<'a> Validator<'a> {
    fn scope<'s>(
        &'s self,
        stage: Option<&'s Stage>,
        step: Option<&'s PlannedStep>,
    ) -> Option<Scope<'s>> {
        let stage = stage?;
        let i = self.p.stages.iter().position(|s| std::ptr::eq(s, stage))?;
        let outputs = &self.outputs[i];
        let (axes, looped, repeat_items) = match step.and_then(|s| s.loop_ctx.as_ref()) {
            Some(ctx) => (
                ctx.matrix.keys().cloned().collect(),
                true,
                ctx.item.is_some(),
            ),
            None => (vec![], false, false),
        };
        Some(Scope {
            stage,
            outputs,
            step,
            axes,
            looped,
            repeat_items,
        })
    }

    fn template(&self, t: &Text, scope: Option<&Scope>, diags: &mut Diagnostics) {
        if !t.value.contains("<+") || crate::load::is_unresolved(&t.value) {
            return;
        }
        match expr::parse_template(&t.value) {
            Err(_) => {
                for e in expr::template_errors(&t.value) {
                    diags.error(self.locate(t, e.offset), e.to_string());
                }
            }
            Ok(tpl) => {
                let mut places = RefPlaces {
                    s: &t.value,
                    from: 0,
                };
                for path in tpl.references() {
                    let off = places.next(path);
                    if let Err(msg) = check_ref(path, scope, self) {
                        diags.error(self.locate(t, off), msg);
                    }
                }
            }
        }
    }

    fn condition(&self, t: &Text, scope: Option<&Scope>, diags: &mut Diagnostics) {
        if crate::load::is_unresolved(&t.value) {
            return;
        }
        match expr::parse_condition(&t.value) {
            Err(e) => diags.error(self.locate(t, e.offset), e.to_string()),
            Ok(e) => {
                let mut places = RefPlaces {
                    s: &t.value,
                    from: 0,
                };
                for path in expr::references(&e) {
                    let off = places.next(path);
                    if let Err(msg) = check_ref(path, scope, self) {
                        diags.error(self.locate(t, off), msg);
                    }
                }
            }
        }
    }

    /// The file position of byte `offset` inside a text value. Exact for plain and quoted
    /// one-line scalars; for block scalars (`command: |`) it finds the value's line in the file.
    fn locate(&self, t: &Text, offset: usize) -> Pos {
        let offset = offset.min(t.value.len());
        let before = &t.value[..offset];
        let line_in_value = before.matches('\n').count();
        let col_in_line = before
            .rsplit('\n')
            .next()
            .map(|s| s.chars().count())
            .unwrap_or(0);
        let src_line = self
            .lines
            .get(t.pos.line as usize - 1)
            .copied()
            .unwrap_or("");
        let rest = src_line.get(t.pos.col as usize - 1..).unwrap_or("");
        let block = rest.starts_with('|') || rest.starts_with('>');
        if !block && line_in_value == 0 {
            let quoted = rest.starts_with('"') || rest.starts_with('\'');
            return self.locate_folded(t, rest, col_in_line, quoted);
        }
        // Find the text of that value line in the source below the key.
        let value_line = t.value.lines().nth(line_in_value).unwrap_or("");
        // A block scalar's text starts on the line after the key; a multi-line plain or quoted
        // one starts on the key's line.
        let start = t.pos.line as usize - usize::from(!block);
        for (i, l) in self.lines.iter().enumerate().skip(start) {
            if !value_line.trim().is_empty() {
                if let Some(c) = l.find(value_line.trim_start()) {
                    let indent = value_line.len() - value_line.trim_start().len();
                    let col = l[..c].chars().count() + (col_in_line.saturating_sub(indent));
                    return Pos {
                        line: i as u32 + 1,
                        col: col as u32 + 1,
                    };
                }
            }
        }
        t.pos
    }

    /// The place of character `col_in_line` of a one-line value that may be folded over several
    /// source lines (a plain or quoted scalar: each line break and its indentation read as one
    /// space). `rest` is the key's line from the value on. Never a column past its line.
    fn locate_folded(&self, t: &Text, rest: &str, col_in_line: usize, quoted: bool) -> Pos {
        let first = &rest[usize::from(quoted)..];
        let mut line = t.pos.line as usize;
        let mut col0 = t.pos.col as usize + usize::from(quoted);
        let mut segment = first.trim_end();
        let mut left = col_in_line;
        loop {
            let len = segment.chars().count();
            if left <= len {
                return Pos {
                    line: line as u32,
                    col: (col0 + left) as u32,
                };
            }
            // The line's text, then the one space its line break folds into.
            left -= len + 1;
            match self.lines.get(line) {
                Some(next) if !next.trim().is_empty() => {
                    segment = next.trim();
                    col0 = next.len() - next.trim_start().len() + 1;
                    line += 1;
                }
                _ => {
                    // Ran out (an escape or a blank line counted differently): the end of
                    // the last line seen.
                    return Pos {
                        line: line as u32,
                        col: (col0 + len) as u32,
                    };
                }
            }
        }
    }
}

/// Where each reference of one text is written. The parser gives references in source order,
/// so each search starts after the previous one's place: two references that begin alike
/// (`<+pipeline.variables.a> <+pipeline.variables.b>`) each get their own place.
struct RefPlaces<'s> {
    s: &'s str,
    from: usize,
}

impl RefPlaces<'_> {
    /// The byte offset to report for `path`: the `<+` that opens it when the reference is the
    /// first thing inside, else the reference's first name.
    fn next(&mut self, path: &RefPath) -> usize {
        let dotted = dotted_names(path);
        if !dotted.is_empty() {
            for start in [self.from, 0] {
                if let Some(at) = find_name(self.s, start, &dotted) {
                    self.from = at + dotted.len();
                    let before = self.s[..at].trim_end();
                    return if before.ends_with("<+") {
                        before.len() - 2
                    } else {
                        at
                    };
                }
            }
        }
        offset_of(self.s, path)
    }
}

/// The leading plain names of a path as written: `pipeline.variables.x`, `secrets.getValue`.
fn dotted_names(path: &RefPath) -> String {
    let mut out = String::new();
    for seg in &path.segs {
        let (n, last) = match seg {
            Seg::Name(n) => (n, false),
            Seg::Call(n, _) => (n, true),
            Seg::Index(_) => break,
        };
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(n);
        if last {
            break;
        }
    }
    out
}

/// The first place at or after `from` where `name` is written as a whole (not inside a longer
/// name: `steps.a` does not match in `steps.ab`).
fn find_name(s: &str, from: usize, name: &str) -> Option<usize> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '.';
    let mut start = from;
    while let Some(i) = s.get(start..)?.find(name) {
        let at = start + i;
        let end = at + name.len();
        let before_ok = !s[..at].chars().next_back().is_some_and(word);
        let after_ok = !s[end..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if before_ok && after_ok {
            return Some(at);
        }
        start = at + name.chars().next().map_or(1, char::len_utf8);
    }
    None
}

/// Where a reference is written in `s`: the first `<+` followed by its first name.
fn offset_of(s: &str, path: &RefPath) -> usize {
    let first = match path.segs.first() {
        Some(Seg::Name(n)) | Some(Seg::Call(n, _)) => n.as_str(),
        _ => return 0,
    };
    let mut from = 0;
    while let Some(i) = s[from..].find("<+") {
        let at = from + i;
        if s[at + 2..].trim_start().starts_with(first) {
            return at;
        }
        from = at + 2;
    }
    0
}

fn names(path: &RefPath) -> Vec<String> {
    path.segs
        .iter()
        .map(|s| match s {
            Seg::Name(n) | Seg::Call(n, _) => n.clone(),
            Seg::Index(_) => "[]".into(),
        })
        .collect()
}

/// Is this reference to something that exists? Err is the user-facing message.
fn check_ref(path: &RefPath, scope: Option<&Scope>, v: &Validator) -> Result<(), String> {
    let p = v.p;
    let n = names(path);
    let shown = format!("<+{}>", n.join("."));
    let Some(root) = n.first() else { return Ok(()) };
    let pipeline_var = |x: &str| -> Result<(), String> {
        if p.variables.iter().any(|v| v.name == x) {
            return Ok(());
        }
        let names: Vec<&str> = p.variables.iter().map(|v| v.name.as_str()).collect();
        let hint = did_you_mean(x, &names)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        Err(format!("unknown pipeline variable `{x}` in {shown}{hint}"))
    };
    match root.as_str() {
        "pipeline" => match n.get(1).map(String::as_str) {
            Some("variables") => match n.get(2) {
                Some(x) => pipeline_var(x),
                None => Ok(()),
            },
            Some("stages") => check_fq_step(&n[2..], &shown, v),
            _ => Ok(()),
        },
        "stage" => match (n.get(1).map(String::as_str), n.get(2), scope) {
            (Some("variables"), Some(x), Some(sc)) => {
                if sc.stage.variables.iter().any(|v| &v.name == x) {
                    Ok(())
                } else {
                    let names: Vec<&str> =
                        sc.stage.variables.iter().map(|v| v.name.as_str()).collect();
                    let hint = did_you_mean(x, &names)
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default();
                    Err(format!("unknown stage variable `{x}` in {shown}{hint}"))
                }
            }
            (Some("variables"), Some(_), None) => Err(format!("{shown} is used outside a stage")),
            _ => Ok(()),
        },
        "variable" => match (n.get(1), scope) {
            (Some(x), Some(sc)) if sc.stage.variables.iter().any(|v| &v.name == x) => Ok(()),
            (Some(x), _) => pipeline_var(x),
            _ => Ok(()),
        },
        "step" => match scope.and_then(|s| s.step) {
            Some(_) => Ok(()),
            None => Err(format!("{shown} is used outside a step")),
        },
        "steps" | "execution" => {
            let rest: &[String] = if root == "execution" {
                if n.get(1).map(String::as_str) != Some("steps") {
                    return Ok(());
                }
                &n[2..]
            } else {
                &n[1..]
            };
            match scope {
                Some(sc) => check_step_ref(rest, sc.outputs, &shown, &sc.stage.identifier),
                None => Err(format!("{shown} is used outside a stage")),
            }
        }
        "matrix" => match scope {
            Some(sc) if !sc.axes.is_empty() => match n.get(1) {
                Some(k) if sc.axes.contains(k) => Ok(()),
                Some(k) => Err(format!(
                    "unknown matrix axis `{k}` in {shown}: the axes are {}",
                    sc.axes.join(", ")
                )),
                None => Ok(()),
            },
            _ => Err(format!(
                "{shown} is used outside a step or step group with a `matrix` strategy"
            )),
        },
        "strategy" => match scope {
            Some(sc) if sc.looped => Ok(()),
            _ => Err(format!(
                "{shown} is used outside a step or step group with a looping `strategy`"
            )),
        },
        "repeat" => match scope {
            Some(sc) if sc.repeat_items => Ok(()),
            _ => Err(format!(
                "{shown} is used outside a step or step group with a `repeat` strategy over `items`"
            )),
        },
        r if ROOTS.contains(&r) => Ok(()),
        other => {
            let hint = did_you_mean(other, ROOTS)
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            Err(format!(
                "unknown expression {shown}: `{other}` is not a known name{hint}"
            ))
        }
    }
}

/// `ID.output.outputVariables.V` or `G.steps.ID.output.outputVariables.V`.
fn check_step_ref(
    rest: &[String],
    outputs: &HashMap<String, Vec<String>>,
    shown: &str,
    stage: &str,
) -> Result<(), String> {
    let Some(first) = rest.first() else {
        return Ok(());
    };
    let (key, tail) = if rest.get(1).map(String::as_str) == Some("steps") && rest.len() >= 3 {
        (format!("{first}.steps.{}", rest[2]), &rest[3..])
    } else {
        (first.clone(), &rest[1..])
    };
    let Some(vars) = outputs.get(&key) else {
        let mut known: Vec<&str> = outputs.keys().map(String::as_str).collect();
        known.sort();
        let hint = did_you_mean(&key, &known)
            .map(|s| format!(" (did you mean `{s}`?)"))
            .unwrap_or_default();
        return Err(format!(
            "{shown} names step `{key}`, which is not in stage `{stage}`{hint}"
        ));
    };
    if tail.first().map(String::as_str) == Some("output")
        && tail.get(1).map(String::as_str) == Some("outputVariables")
    {
        if let Some(v) = tail.get(2) {
            if !vars.contains(v) {
                return Err(format!(
                    "{shown}: step `{key}` has no output variable `{v}`"
                ));
            }
        }
    }
    Ok(())
}

/// `<+pipeline.stages.S.spec.execution.steps.[G.steps.]ID.output.outputVariables.V>`.
fn check_fq_step(rest: &[String], shown: &str, v: &Validator) -> Result<(), String> {
    let Some(sid) = rest.first() else {
        return Ok(());
    };
    let Some(i) = v.p.stages.iter().position(|s| &s.identifier == sid) else {
        return Err(format!(
            "{shown} names stage `{sid}`, which is not in the pipeline"
        ));
    };
    let outputs = &v.outputs[i];
    if rest
        .get(1..4)
        .is_some_and(|s| s == ["spec", "execution", "steps"])
    {
        return check_step_ref(&rest[4..], outputs, shown, sid);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn check(src: &str) -> Vec<String> {
        let node = crate::yaml::parse(src).unwrap();
        let mut d = Diagnostics::new(Path::new("t.yaml"));
        let p = crate::load::load(&node, &mut d).unwrap();
        validate(&p, src, &mut d);
        d.finish();
        d.items
            .iter()
            .map(|i| format!("{}:{} {}", i.pos.line, i.pos.col, i.message))
            .collect()
    }

    const BASE: &str = "pipeline:
  identifier: p
  variables:
    - name: host
      type: String
      value: localhost
  stages:
    - stage:
        identifier: s
        type: CI
        variables:
          - name: port
            type: String
            value: '5432'
        spec:
          execution:
            steps:
              - step:
                  identifier: a
                  type: Run
                  spec:
                    command: echo hi; X=1
                    outputVariables:
                      - name: X
              - step:
                  identifier: b
                  type: Run
                  when:
                    stageStatus: All
                    condition: <+steps.a.output.outputVariables.X> == \"1\"
                  spec:
                    command: echo <+pipeline.variables.host>:<+stage.variables.port> <+steps.a.output.outputVariables.X>
";

    #[test]
    fn known_references_pass() {
        assert_eq!(check(BASE), Vec::<String>::new());
    }

    #[test]
    fn unknown_references_are_reported_at_their_place() {
        let src = BASE
            .replace("<+stage.variables.port>", "<+stage.variables.prot>")
            .replace("outputVariables.X> ==", "outputVariables.Y> ==");
        let errs = check(&src);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with(
                "30:32 <+steps.a.output.outputVariables.Y>: step `a` has no output variable `Y`"
            ),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("32:62 unknown stage variable `prot`"),
            "{errs:?}"
        );
        assert!(errs[1].contains("did you mean `port`?"), "{errs:?}");
    }

    #[test]
    fn matrix_outside_matrix_is_an_error() {
        let src = BASE.replace("echo hi; X=1", "echo <+matrix.os>");
        let errs = check(&src);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].contains("outside a step or step group with a `matrix` strategy"),
            "{errs:?}"
        );
    }

    #[test]
    fn references_that_begin_alike_each_get_their_own_column() {
        // Regression: both used to point at the first `<+pipeline`.
        let src = BASE.replace(
            "<+stage.variables.port>",
            "<+pipeline.variables.nope> <+pipeline.variables.hots>",
        );
        let errs = check(&src);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs[0].starts_with("32:62 unknown pipeline variable `nope`"),
            "{errs:?}"
        );
        assert!(
            errs[1].starts_with("32:89 unknown pipeline variable `hots`"),
            "{errs:?}"
        );
    }
}
