//! The expression context of a run: what `<+...>` evaluates to while a stage runs.
//!
//! Owns: run-wide facts (pipeline name, sequence and execution ids, the codebase, secrets) and
//! stage-wide state (rendered variables, output variables of finished steps), and the
//! [`Resolver`] a step's templates are rendered with. Also owns masking: every secret value, and
//! every value derived from a Secret variable or output, is replaced by `**************`
//! wherever stagehand prints or writes it. Does not own: parsing expressions (`expr`).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, RwLock};

use crate::expr::{self, Path as RefPath, Resolver, Seg, Val};
use crate::plan::PlannedStep;

pub const MASK: &str = "**************";

/// Secret values by id, plus every other value that must never be shown.
#[derive(Debug, Default)]
pub struct Secrets {
    by_id: BTreeMap<String, String>,
    /// Longest first, so a secret containing another is masked whole.
    masked: RwLock<Vec<String>>,
}

impl Secrets {
    pub fn new(by_id: BTreeMap<String, String>) -> Self {
        let s = Secrets {
            by_id,
            masked: RwLock::new(Vec::new()),
        };
        for v in s.by_id.values() {
            s.add_mask(v);
        }
        s
    }

    pub fn get(&self, id: &str) -> Option<&str> {
        // Harness scopes secrets as `account.x`, `org.x` or `x`; locally they are one namespace.
        let bare = id.rsplit_once('.').map(|(_, b)| b);
        self.by_id
            .get(id)
            .or_else(|| bare.and_then(|b| self.by_id.get(b)))
            .map(String::as_str)
    }

    pub fn add_mask(&self, value: &str) {
        if value.is_empty() {
            return;
        }
        let mut m = self.masked.write().unwrap_or_else(|e| e.into_inner());
        if !m.iter().any(|v| v == value) {
            m.push(value.to_string());
            m.sort_by_key(|v| std::cmp::Reverse(v.len()));
        }
        // A multi-line secret must also be masked line by line, since output is read in lines.
        for line in value.lines().filter(|l| l.trim().len() >= 3) {
            if !m.iter().any(|v| v == line) {
                m.push(line.to_string());
            }
        }
        m.sort_by_key(|v| std::cmp::Reverse(v.len()));
    }

    pub fn mask(&self, text: &str) -> String {
        let m = self.masked.read().unwrap_or_else(|e| e.into_inner());
        let mut out = text.to_string();
        for v in m.iter() {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), MASK);
            }
        }
        out
    }

    /// Mask every string inside a JSON value (before it is serialized: masking JSON text would
    /// miss a secret that JSON escapes).
    pub fn mask_json(&self, v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(t) => *t = self.mask(t),
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| self.mask_json(x)),
            serde_json::Value::Object(o) => o.values_mut().for_each(|x| self.mask_json(x)),
            _ => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.masked.read().map(|m| m.is_empty()).unwrap_or(true)
    }
}

/// What `<+codebase.*>` reads: the workspace's git repository, when there is one.
#[derive(Clone, Debug, Default)]
pub struct Codebase {
    pub branch: Option<String>,
    pub commit_sha: Option<String>,
    pub repo_url: Option<String>,
    pub tag: Option<String>,
}

impl Codebase {
    /// Read from `git` in `dir` (through the supervisor, so the reaper sees every child).
    pub fn detect(dir: &Path) -> Codebase {
        let git = |args: &[&str]| -> Option<String> {
            let mut argv = vec!["git".to_string(), "-C".into(), dir.display().to_string()];
            argv.extend(args.iter().map(|s| s.to_string()));
            let env: Vec<(String, String)> = std::env::vars()
                .filter(|(k, _)| k == "PATH" || k == "HOME")
                .collect();
            let out = stagehand_supervisor::process::run_output(&argv, env, dir).ok()?;
            if !out.status.success() {
                return None;
            }
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (!s.is_empty()).then_some(s)
        };
        if git(&["rev-parse", "--git-dir"]).is_none() {
            return Codebase::default();
        }
        Codebase {
            branch: git(&["rev-parse", "--abbrev-ref", "HEAD"]).filter(|b| b != "HEAD"),
            commit_sha: git(&["rev-parse", "HEAD"]),
            repo_url: git(&["config", "--get", "remote.origin.url"]),
            tag: git(&["describe", "--tags", "--exact-match"]),
        }
    }
}

/// Output variables of finished steps: stage id → step key → variable → value.
pub type Outputs = HashMap<String, HashMap<String, BTreeMap<String, String>>>;

/// Facts fixed for the whole run.
#[derive(Debug)]
pub struct RunInfo {
    pub pipeline_name: String,
    pub pipeline_id: String,
    pub sequence_id: u64,
    pub execution_id: String,
    pub codebase: Codebase,
    pub secrets: Arc<Secrets>,
    pub pipeline_vars: BTreeMap<String, String>,
    /// Output variables of every finished step: stage id → step key → name → value.
    pub outputs: RwLock<Outputs>,
}

/// Stage-wide values, fixed when the stage starts.
#[derive(Debug, Default, Clone)]
pub struct StageInfo {
    pub identifier: String,
    pub name: String,
    pub vars: BTreeMap<String, String>,
}

/// Resolves references for one step (or for stage-level values when `step` is None).
pub struct Ctx<'a> {
    pub run: &'a RunInfo,
    pub stage: Option<&'a StageInfo>,
    pub step: Option<&'a PlannedStep>,
}

impl RunInfo {
    pub fn record_outputs(
        &self,
        stage: &str,
        step: &PlannedStep,
        values: BTreeMap<String, String>,
    ) {
        let mut all = self.outputs.write().unwrap_or_else(|e| e.into_inner());
        let st = all.entry(stage.to_string()).or_default();
        // Reachable as `steps.Run_1`, `steps.sg1.steps.Run_1` and by the unique id `sg1_Run_1`.
        if let Some(g) = &step.group {
            st.insert(format!("{g}.steps.{}", step.identifier), values.clone());
        }
        st.insert(step.id.clone(), values.clone());
        st.insert(step.identifier.clone(), values);
    }

    fn output(&self, stage: &str, key: &str, var: &str) -> Option<String> {
        let all = self.outputs.read().unwrap_or_else(|e| e.into_inner());
        all.get(stage)?.get(key)?.get(var).cloned()
    }
}

fn seg_names(p: &RefPath) -> Vec<&str> {
    p.segs
        .iter()
        .map(|s| match s {
            Seg::Name(n) | Seg::Call(n, _) => n.as_str(),
            Seg::Index(_) => "[]",
        })
        .collect()
}

fn text(v: Option<&String>) -> Val {
    v.map(|s| Val::Str(s.clone())).unwrap_or(Val::Null)
}

impl Resolver for Ctx<'_> {
    fn resolve(&self, path: &RefPath) -> Result<Val, String> {
        let n = seg_names(path);
        let shown = || format!("<+{}>", n.join("."));
        let stage_id = self.stage.map(|s| s.identifier.as_str()).unwrap_or("");
        match n.as_slice() {
            ["secrets", "getValue"] => {
                let id = match path.segs.get(1) {
                    Some(Seg::Call(_, args)) if args.len() == 1 => match &args[0] {
                        expr::Expr::Lit(Val::Str(s)) => s.clone(),
                        _ => return Err("secrets.getValue takes one quoted secret id".into()),
                    },
                    _ => return Err("use <+secrets.getValue(\"id\")>".into()),
                };
                match self.run.secrets.get(&id) {
                    Some(v) => Ok(Val::Str(v.to_string())),
                    None => Err(format!(
                        "secret `{id}` is not set: pass --secret {id}=VALUE, put `{id}=VALUE` in a --secrets-file, or set STAGEHAND_SECRET_{}",
                        id.rsplit('.').next().unwrap_or(&id).to_uppercase()
                    )),
                }
            }
            ["pipeline", "variables", x] => self.pipeline_var(x),
            ["variable", x] => match self.stage.and_then(|s| s.vars.get(*x)) {
                Some(v) => Ok(Val::Str(v.clone())),
                None => self.pipeline_var(x),
            },
            ["stage", "variables", x] => match self.stage {
                Some(s) => s
                    .vars
                    .get(*x)
                    .map(|v| Val::Str(v.clone()))
                    .ok_or_else(|| format!("unknown stage variable `{x}`")),
                None => Err(format!("{} is used outside a stage", shown())),
            },
            ["pipeline", "name"] => Ok(Val::Str(self.run.pipeline_name.clone())),
            ["pipeline", "identifier"] => Ok(Val::Str(self.run.pipeline_id.clone())),
            ["pipeline", "sequenceId"] => Ok(Val::Num(self.run.sequence_id as f64)),
            ["pipeline", "executionId"] => Ok(Val::Str(self.run.execution_id.clone())),
            [
                "pipeline",
                "stages",
                s,
                "spec",
                "execution",
                "steps",
                rest @ ..,
            ] => self.step_output(s, rest, &shown()),
            ["stage", "name"] => Ok(text(self.stage.map(|s| &s.name))),
            ["stage", "identifier"] => Ok(text(self.stage.map(|s| &s.identifier))),
            ["step", "name"] => Ok(text(self.step.map(|s| &s.name))),
            ["step", "identifier"] => Ok(text(self.step.map(|s| &s.identifier))),
            ["steps", rest @ ..] | ["execution", "steps", rest @ ..] => {
                self.step_output(stage_id, rest, &shown())
            }
            ["codebase", "branch"] | ["codebase", "sourceBranch"] => {
                Ok(opt(&self.run.codebase.branch))
            }
            ["codebase", "commitSha"] => Ok(opt(&self.run.codebase.commit_sha)),
            ["codebase", "shortCommitSha"] => Ok(opt(&self
                .run
                .codebase
                .commit_sha
                .as_ref()
                .map(|s| s.chars().take(7).collect()))),
            ["codebase", "repoUrl"] | ["codebase", "gitUrl"] => {
                Ok(opt(&self.run.codebase.repo_url))
            }
            ["codebase", "tag"] => Ok(opt(&self.run.codebase.tag)),
            ["codebase", "build", "type"] => Ok(Val::Str(
                if self.run.codebase.tag.is_some() && self.run.codebase.branch.is_none() {
                    "tag"
                } else {
                    "branch"
                }
                .into(),
            )),
            // A local run has no trigger, webhook payload or codebase PR: those read as null.
            ["codebase", ..] | ["trigger", ..] | ["eventPayload", ..] => Ok(Val::Null),
            ["env", name] => Ok(std::env::var(name).map(Val::Str).unwrap_or(Val::Null)),
            ["matrix", k] => self
                .step
                .and_then(|s| s.loop_ctx.as_ref())
                .and_then(|c| c.matrix.get(*k))
                .map(|v| Val::Str(v.clone()))
                .ok_or_else(|| format!("{} is not a matrix axis of this step", shown())),
            ["strategy", "iteration"] => self.loop_val(|c| Val::Num(c.iteration as f64)),
            ["strategy", "iterations"] => self.loop_val(|c| Val::Num(c.iterations as f64)),
            ["repeat", "item"] => {
                self.loop_val(|c| c.item.clone().map(Val::Str).unwrap_or(Val::Null))
            }
            _ => Err(format!("{} has no value in stagehand", shown())),
        }
    }
}

fn opt(v: &Option<String>) -> Val {
    v.clone().map(Val::Str).unwrap_or(Val::Null)
}

impl Ctx<'_> {
    fn pipeline_var(&self, x: &str) -> Result<Val, String> {
        self.run
            .pipeline_vars
            .get(x)
            .map(|v| Val::Str(v.clone()))
            .ok_or_else(|| format!("unknown pipeline variable `{x}`"))
    }

    fn loop_val(&self, f: impl Fn(&crate::plan::LoopCtx) -> Val) -> Result<Val, String> {
        self.step
            .and_then(|s| s.loop_ctx.as_ref())
            .map(f)
            .ok_or_else(|| "this step has no looping strategy".into())
    }

    fn step_output(&self, stage: &str, rest: &[&str], shown: &str) -> Result<Val, String> {
        // ID.output.outputVariables.V | G.steps.ID.output.outputVariables.V
        let (key, tail) = match rest {
            [g, "steps", id, tail @ ..] => (format!("{g}.steps.{id}"), tail),
            [id, tail @ ..] => (id.to_string(), tail),
            [] => return Err(format!("{shown} names no step")),
        };
        match tail {
            ["output", "outputVariables", var] => Ok(self
                .run
                .output(stage, &key, var)
                // Harness renders an output of a step that did not run (or not yet) as null.
                .map(Val::Str)
                .unwrap_or(Val::Null)),
            _ => Ok(Val::Null),
        }
    }
}

/// Render a template with `ctx`, masking nothing (callers mask what they print).
pub fn render(s: &str, ctx: &Ctx) -> Result<String, String> {
    if !s.contains("<+") {
        return Ok(s.to_string());
    }
    let t = expr::parse_template(s).map_err(|e| e.to_string())?;
    expr::render(&t, ctx).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunInfo {
        let mut secrets = BTreeMap::new();
        secrets.insert("db_pass".to_string(), "hunter22".to_string());
        let mut pv = BTreeMap::new();
        pv.insert("host".into(), "localhost".into());
        RunInfo {
            pipeline_name: "p".into(),
            pipeline_id: "p".into(),
            sequence_id: 7,
            execution_id: "abc".into(),
            codebase: Codebase {
                branch: Some("main".into()),
                ..Default::default()
            },
            secrets: Arc::new(Secrets::new(secrets)),
            pipeline_vars: pv,
            outputs: RwLock::new(HashMap::new()),
        }
    }

    #[test]
    fn renders_variables_secrets_and_ids() {
        let r = run();
        let st = StageInfo {
            identifier: "s".into(),
            name: "S".into(),
            vars: [("port".to_string(), "5433".to_string())].into(),
        };
        let ctx = Ctx {
            run: &r,
            stage: Some(&st),
            step: None,
        };
        assert_eq!(
            render("<+pipeline.variables.host>:<+stage.variables.port> #<+pipeline.sequenceId> <+codebase.branch>", &ctx).unwrap(),
            "localhost:5433 #7 main"
        );
        assert_eq!(
            render("pw=<+secrets.getValue(\"account.db_pass\")>", &ctx).unwrap(),
            "pw=hunter22"
        );
        let e = render("<+secrets.getValue('nope')>", &ctx).unwrap_err();
        assert!(e.contains("--secret nope=VALUE"), "{e}");
    }

    #[test]
    fn masks_every_secret_longest_first() {
        let s = Secrets::new(
            [
                ("a".to_string(), "abc".to_string()),
                ("b".to_string(), "abcdef".to_string()),
            ]
            .into(),
        );
        assert_eq!(s.mask("x abcdef y abc"), format!("x {MASK} y {MASK}"));
        s.add_mask("line1\nline2");
        assert_eq!(s.mask("line2"), MASK);
    }
}
