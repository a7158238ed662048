//! Loading: a YAML [`Node`] tree into the typed [`model`](crate::model), checking as it goes.
//!
//! Owns: which keys exist where (from Harness's own schema, `shared/reference/harness-schema-v0`,
//! and for Run/Background specs from Harness's RunStepInfo/BackgroundStepInfo), which of them
//! stagehand acts on, which it ignores, and every shape/type/value check that needs no other part
//! of the file. Every problem is recorded in [`Diagnostics`]; loading never stops at the first.
//! Does not own: checks across the file (identifiers used by expressions, port clashes): those
//! are in `validate`.

use std::collections::{BTreeMap, HashSet};

use crate::diag::{Diagnostics, did_you_mean};
use crate::model::*;
use crate::units;
use crate::yaml::{Key, Node, Pos, Scalar, Value};

/// Keys accepted anywhere: Harness writes them into pipelines (`contextType` appears beside
/// `step:` in exported pipelines) and they carry no behaviour.
const ANYWHERE: &[&str] = &["description", "contextType"];

/// Harness's identifier rule (schema `identifier.pattern`).
pub fn valid_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
        _ => return false,
    }
    s.len() <= 128 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Stage types Harness has. Only `CI` runs; the others are reported as not supported, and a
/// near miss (`ci`, `Deploymnet`) as a typo.
const HARNESS_STAGE_TYPES: &[&str] = &[
    "CI",
    "Deployment",
    "Approval",
    "Custom",
    "Pipeline",
    "FeatureFlag",
    "SecurityTests",
    "IACM",
    "IDP",
];

/// The most copies of one step a looping strategy may make (per strategy). Harness's own
/// limits are lower in practice; this bound keeps a typo (`parallelism: 100000000`) from
/// exhausting memory while the plan is built.
pub const MAX_ITERATIONS: usize = 1000;

/// Step types Harness knows (execution-wrapper-config.yaml and its CI/common step nodes) that
/// stagehand does not run. Anything else is a typo.
const KNOWN_STEP_TYPES: &[&str] = &[
    "Action",
    "AIEval",
    "AITestAutomation",
    "ArtifactoryUpload",
    "HarUpload",
    "Bitrise",
    "BuildAndPushACR",
    "BuildAndPushDockerRegistry",
    "BuildAndPushECR",
    "BuildAndPushGCR",
    "BuildAndPushGAR",
    "GCSUpload",
    "GitClone",
    "RestoreCacheGCS",
    "RestoreCacheS3",
    "RestoreCacheAzure",
    "RestoreCache",
    "SaveCacheAzure",
    "RunTests",
    "Test",
    "S3Upload",
    "SaveCacheGCS",
    "SaveCacheS3",
    "SaveCache",
    "SscaEnforcement",
    "SscaOrchestration",
    "SscaAibomOrchestration",
    "AnchoreScan",
    "Anchore",
    "AquaSecurity",
    "AquaTrivy",
    "AWSECR",
    "AWSSecurityHub",
    "Bandit",
    "BlackDuck",
    "Brakeman",
    "Burp",
    "Checkmarx",
    "CheckmarxOne",
    "Checkov",
    "Clair",
    "CodeQL",
    "Coverity",
    "CustomIngest",
    "DataTheorem",
    "DockerContentTrust",
    "FortifyOnDemand",
    "Fossa",
    "GithubAdvancedSecurity",
    "Gitleaks",
    "Grype",
    "JfrogXray",
    "Mend",
    "Metasploit",
    "Nessus",
    "NexusIQ",
    "Nikto",
    "Nmap",
    "Openvas",
    "OsvScanner",
    "Owasp",
    "Plugin",
    "PrismaCloud",
    "Prowler",
    "Qualys",
    "Reapsaw",
    "Security",
    "Semgrep",
    "ShiftLeft",
    "Snyk",
    "SonarQube",
    "Sysdig",
    "Tenable",
    "Veracode",
    "Wiz",
    "Zap",
    "Container",
    "Barrier",
    "Queue",
    "HarnessApproval",
    "CustomApproval",
    "JiraApproval",
    "JiraCreate",
    "JiraUpdate",
    "ServiceNowApproval",
    "ServiceNowCreate",
    "ServiceNowUpdate",
    "ShellScript",
    "Http",
    "Email",
    "Wait",
    "Policy",
    "IACMTerraformPlugin",
    "IACMApproval",
    "K8sCanaryDeploy",
    "K8sCanaryDelete",
    "K8sRollingDeploy",
    "K8sRollingRollback",
    "K8sApply",
    "K8sDelete",
    "K8sBlueGreenDeploy",
    "K8sBGSwapServices",
    "K8sScale",
    "HelmDeploy",
    "HelmRollback",
    "TerraformApply",
    "TerraformPlan",
    "TerraformDestroy",
    "TerraformRollback",
    "Verify",
    "FlagConfiguration",
    "Command",
    "DownloadArtifact",
];

const RUN_TYPES: &[&str] = &["Run", "Background"];

// `template` is acted on in each place it may appear (pipeline, stage, step group, step): it
// is reported as not supported rather than as an unknown key.
const STEP_ACTED: &[&str] = &[
    "identifier",
    "name",
    "type",
    "spec",
    "timeout",
    "when",
    "failureStrategies",
    "strategy",
    "template",
];
const STEP_IGNORED: &[&str] = &["enforce"];

const SPEC_COMMON: &[&str] = &[
    "image",
    "shell",
    "command",
    "entrypoint",
    "envVariables",
    "portBindings",
    "privileged",
    "runAsUser",
    "imagePullPolicy",
    "resources",
    "reports",
];
const SPEC_RUN_ONLY: &[&str] = &["outputVariables"];
/// stagehand's own extensions (documented in the README).
const SPEC_EXTENSIONS: &[&str] = &["healthCheck", "dependsOn"];
const HEALTH_KEYS: &[&str] = &[
    "tcp",
    "http",
    "exec",
    "log",
    "interval",
    "timeout",
    "startPeriod",
    "retries",
    "deadline",
];
const SPEC_IGNORED: &[&str] = &["connectorRef"];

const GROUP_ACTED: &[&str] = &[
    "identifier",
    "name",
    "steps",
    "when",
    "failureStrategies",
    "strategy",
    "template",
];
const GROUP_IGNORED: &[&str] = &[
    "delegateSelectors",
    "sharedPaths",
    "stepGroupInfra",
    "variables",
];

const STAGE_ACTED: &[&str] = &[
    "identifier",
    "name",
    "type",
    "spec",
    "variables",
    "when",
    "failureStrategies",
    "strategy",
    "template",
];
const STAGE_IGNORED: &[&str] = &[
    "delegateSelectors",
    "tags",
    "timeout",
    "runMode",
    "pipelineVariables",
];

// `serviceDependencies` (the legacy form of Background steps) is reported as not supported.
const CI_SPEC_ACTED: &[&str] = &["execution", "infrastructure", "serviceDependencies"];
const CI_SPEC_IGNORED: &[&str] = &[
    "buildIntelligence",
    "caching",
    "cloneCodebase",
    "platform",
    "runtime",
    "sharedPaths",
    "slsa_provenance",
    "delegateSelectors",
];

const PIPELINE_ACTED: &[&str] = &["identifier", "name", "stages", "variables", "template"];
const PIPELINE_IGNORED: &[&str] = &[
    "allowStageExecutions",
    "delegateSelectors",
    "fixedInputsOnRerun",
    "flowControl",
    "notificationRules",
    "orgIdentifier",
    "projectIdentifier",
    "properties",
    "tags",
    "timeout",
    "gitConfig",
];

const VARIABLE_KEYS: &[&str] = &["name", "type", "value", "default", "required", "metadata"];

/// Which part of the file a mapping is, for the unknown-key rule: in parts stagehand acts on, an
/// unknown key is an error (a typo there changes what runs); elsewhere it is a warning.
#[derive(Clone, Copy, PartialEq)]
enum Strictness {
    Error,
    Warn,
}

pub struct Loader<'a> {
    pub diags: &'a mut Diagnostics,
    /// Where each input-less expression-bearing text came from: checked in `validate`.
    pub texts_seen: usize,
}

/// Load a whole document. Returns `None` only when its shape is too broken to go on (no
/// `pipeline:` or `stage:` at the top); every other problem is a diagnostic.
pub fn load(root: &Node, diags: &mut Diagnostics) -> Option<Pipeline> {
    let mut l = Loader {
        diags,
        texts_seen: 0,
    };
    l.document(root)
}

impl Loader<'_> {
    fn document(&mut self, root: &Node) -> Option<Pipeline> {
        let Some(entries) = root.as_map() else {
            if root.is_null() {
                // An empty document's node sits past its last line; the file's start is the
                // place to point at.
                self.diags.error_hint(
                    Pos { line: 1, col: 1 },
                    "the file holds no YAML document (it is empty or only comments)",
                    "a pipeline file starts with `pipeline:` (or a single `stage:`)",
                );
                return None;
            }
            self.diags.error(
                root.pos,
                format!(
                    "expected a mapping with `pipeline:` at the top, found {}",
                    root.kind()
                ),
            );
            return None;
        };
        if let Some(p) = root.get("pipeline") {
            for (k, _) in entries {
                if k.name != "pipeline" {
                    self.diags.warning(
                        k.pos,
                        format!(
                            "unknown top-level key `{}` (only `pipeline:` is read)",
                            k.name
                        ),
                    );
                }
            }
            return self.pipeline(p);
        }
        if let Some(s) = root.get("stage") {
            let stage = self.stage(s, root.pos);
            let mut stages = Vec::new();
            stages.extend(stage);
            return Some(Pipeline {
                name: "stage".into(),
                identifier: "stage".into(),
                variables: vec![],
                stages,
                single_stage: true,
            });
        }
        let first = &entries.first()?.0;
        // Harness's v1 ("simplified") syntax opens with `version: 1` and `kind: pipeline`.
        let v1 = root.get("version").is_some()
            && (root.get("kind").is_some() || root.get("spec").is_some());
        let hint = did_you_mean(&first.name, &["pipeline", "stage"])
            .map(|s| format!("did you mean `{s}`?"))
            .or_else(|| {
                v1.then(|| {
                    "this is Harness's v1 syntax (`version: 1`); stagehand reads v0 pipelines: `pipeline:` with `stages:`".into()
                })
            })
            .unwrap_or_else(|| {
                "a pipeline file starts with `pipeline:` (or a single `stage:`)".into()
            });
        self.diags.error_hint(
            first.pos,
            format!("expected `pipeline:` at the top, found `{}`", first.name),
            hint,
        );
        None
    }

    // ---- generic helpers -------------------------------------------------------------------

    /// Check the keys of a mapping. Returns false (after reporting) when `node` is not a mapping.
    fn keys(
        &mut self,
        node: &Node,
        what: &str,
        acted: &[&[&str]],
        ignored: &[&str],
        strict: Strictness,
    ) -> bool {
        let Some(entries) = node.as_map() else {
            self.diags.error(
                node.pos,
                format!("{what} must be a mapping, found {}", node.kind()),
            );
            return false;
        };
        for (k, _) in entries {
            let name = k.name.as_str();
            if acted.iter().any(|set| set.contains(&name)) || ANYWHERE.contains(&name) {
                continue;
            }
            if ignored.contains(&name) {
                self.diags.ignore(name);
                continue;
            }
            let mut all: Vec<&str> = acted.iter().flat_map(|s| s.iter().copied()).collect();
            all.extend_from_slice(ignored);
            let msg = format!("unknown key `{name}` in {what}");
            let hint = did_you_mean(name, &all).map(|s| format!("did you mean `{s}`?"));
            match (strict, hint) {
                (Strictness::Error, Some(h)) => self.diags.error_hint(k.pos, msg, h),
                (Strictness::Error, None) => self.diags.error_hint(
                    k.pos,
                    msg,
                    format!("known keys here: {}", all.join(", ")),
                ),
                (Strictness::Warn, Some(h)) => self.diags.warning(k.pos, format!("{msg} ({h})")),
                (Strictness::Warn, None) => self.diags.warning(k.pos, msg),
            }
        }
        true
    }

    fn text(&mut self, node: &Node, what: &str) -> Option<Text> {
        match node.as_text() {
            Some(s) => {
                self.texts_seen += 1;
                Some(Text::new(s, node.pos))
            }
            None if node.is_null() => None,
            None => {
                self.diags.error(
                    node.pos,
                    format!("{what} must be a string, found {}", node.kind()),
                );
                None
            }
        }
    }

    fn required_text(&mut self, parent: &Node, key: &str, what: &str) -> Option<Text> {
        match parent.get(key) {
            Some(n) => {
                let t = self.text(n, &format!("`{key}` of {what}"));
                if t.is_none() && n.is_null() {
                    self.diags
                        .error(n.pos, format!("`{key}` of {what} is empty"));
                }
                t
            }
            None => {
                self.diags
                    .error(parent.pos, format!("{what} has no `{key}`"));
                None
            }
        }
    }

    fn identifier(&mut self, parent: &Node, what: &str) -> Option<String> {
        let t = self.required_text(parent, "identifier", what)?;
        if !is_unresolved(&t.value) && !valid_identifier(&t.value) {
            self.diags.error_hint(
                t.pos,
                format!("invalid identifier `{}` for {what}", t.value),
                "identifiers start with a letter or `_` and hold only letters, digits and `_` (at most 128): ^[a-zA-Z_][0-9a-zA-Z_]{0,127}$",
            );
        }
        Some(t.value)
    }

    fn bool_value(&mut self, node: &Node, what: &str) -> Option<bool> {
        match &node.value {
            Value::Scalar(Scalar::Bool(b)) => Some(*b),
            Value::Scalar(Scalar::Str(s)) if s == "true" || s == "false" => Some(s == "true"),
            Value::Scalar(Scalar::Str(s)) if is_unresolved(s) => None,
            _ => {
                self.diags.error(
                    node.pos,
                    format!("{what} must be true or false, found {}", node.kind()),
                );
                None
            }
        }
    }

    fn seq<'n>(&mut self, node: &'n Node, what: &str) -> &'n [Node] {
        match &node.value {
            Value::Seq(items) => items,
            Value::Scalar(Scalar::Null) => &[],
            _ => {
                self.diags.error(
                    node.pos,
                    format!("{what} must be a list, found {}", node.kind()),
                );
                &[]
            }
        }
    }

    fn check_unique(&mut self, seen: &mut HashSet<String>, id: &str, pos: Pos, scope: &str) {
        if !seen.insert(id.to_string()) {
            self.diags
                .error(pos, format!("identifier `{id}` is used twice in {scope}"));
        }
    }

    // ---- pipeline and stages ---------------------------------------------------------------

    fn pipeline(&mut self, p: &Node) -> Option<Pipeline> {
        if !self.keys(
            p,
            "the pipeline",
            &[PIPELINE_ACTED],
            PIPELINE_IGNORED,
            Strictness::Warn,
        ) {
            return None;
        }
        if p.get("template").is_some() {
            self.diags
                .unsupported(p.get("template").unwrap().pos, "a pipeline `template`");
        }
        let identifier = match p.get("identifier") {
            Some(_) => self.identifier(p, "the pipeline").unwrap_or_default(),
            None => "pipeline".into(),
        };
        let name = p
            .get("name")
            .and_then(|n| n.as_text())
            .unwrap_or_else(|| identifier.clone());
        let variables = match p.get("variables") {
            Some(v) => self.variables(v, "pipeline"),
            None => vec![],
        };
        let mut stages = Vec::new();
        match p.get("stages") {
            // A pipeline made from a template has its stages there (reported above).
            None if p.get("template").is_some() => {}
            None => self.diags.error(p.pos, "the pipeline has no `stages`"),
            Some(list) => {
                let mut seen = HashSet::new();
                for item in self.seq(list, "`stages`") {
                    self.stage_item(item, &mut stages, &mut seen);
                }
                if stages.is_empty() && list.as_seq().is_some_and(|s| s.is_empty()) {
                    self.diags.error(list.pos, "`stages` is empty");
                }
            }
        }
        Some(Pipeline {
            name,
            identifier,
            variables,
            stages,
            single_stage: false,
        })
    }

    fn stage_item(&mut self, item: &Node, stages: &mut Vec<Stage>, seen: &mut HashSet<String>) {
        let Some(entries) = item.as_map() else {
            self.diags.error(
                item.pos,
                format!(
                    "an entry of `stages` must be `- stage:` or `- parallel:`, found {}",
                    item.kind()
                ),
            );
            return;
        };
        for (k, v) in entries {
            match k.name.as_str() {
                "stage" => {
                    if let Some(s) = self.stage(v, k.pos) {
                        self.check_unique(
                            seen,
                            &s.identifier.clone(),
                            s.pos,
                            "the pipeline's stages",
                        );
                        stages.push(s);
                    }
                }
                "parallel" => {
                    self.diags.warning(
                        k.pos,
                        "stages in a `parallel` block run one after another in stagehand",
                    );
                    for inner in self.seq(v, "`parallel`") {
                        self.stage_item(inner, stages, seen);
                    }
                }
                "insert" => self.diags.unsupported(k.pos, "`insert`"),
                other => {
                    let hint = did_you_mean(other, &["stage", "parallel"])
                        .map(|s| format!("did you mean `{s}`?"));
                    let msg = format!(
                        "unknown entry `{other}` in `stages` (expected `stage` or `parallel`)"
                    );
                    match hint {
                        Some(h) => self.diags.error_hint(k.pos, msg, h),
                        None => self.diags.error(k.pos, msg),
                    }
                }
            }
        }
    }

    fn stage(&mut self, s: &Node, key_pos: Pos) -> Option<Stage> {
        if !self.keys(
            s,
            "a stage",
            &[STAGE_ACTED],
            STAGE_IGNORED,
            Strictness::Warn,
        ) {
            return None;
        }
        let pos = key_pos;
        let identifier = self.identifier(s, "a stage").unwrap_or_default();
        let name = s
            .get("name")
            .and_then(|n| n.as_text())
            .unwrap_or_else(|| identifier.clone());
        let mut unsupported = false;
        if let Some(t) = s.get("template") {
            self.diags.unsupported(
                t.pos,
                format!("stage `{identifier}` uses a `template`, which"),
            );
            unsupported = true;
        }
        if let Some(t) = s.get("type") {
            let ty = t.as_text().unwrap_or_default();
            let typo = did_you_mean(&ty, HARNESS_STAGE_TYPES).filter(|known| *known != ty);
            if ty.trim().is_empty() {
                self.diags.error(
                    t.pos,
                    format!("`type` of stage `{identifier}` is empty (CI stages say `type: CI`)"),
                );
                unsupported = true;
            } else if let (Some(known), false) = (typo, is_unresolved(&ty)) {
                // `ci` or `Deploymnet`: Harness rejects these, so a typo, not a stage to skip.
                self.diags.error_hint(
                    t.pos,
                    format!("unknown stage type `{ty}` for stage `{identifier}`"),
                    format!("did you mean `{known}`?"),
                );
                unsupported = true;
            } else if ty != "CI" && !is_unresolved(&ty) {
                self.diags.unsupported(
                    t.pos,
                    format!("stage `{identifier}` of type `{ty}`: only CI stages run; this"),
                );
                unsupported = true;
            }
        } else if s.get("template").is_none() {
            self.diags.error(
                s.pos,
                format!("stage `{identifier}` has no `type` (CI stages say `type: CI`)"),
            );
        }
        if let Some(st) = s.get("strategy") {
            self.diags
                .unsupported(st.pos, "a looping `strategy` on a stage");
            unsupported = true;
        }
        let variables = match s.get("variables") {
            Some(v) => self.variables(v, "stage"),
            None => vec![],
        };
        let when = s.get("when").and_then(|w| self.when(w, true));
        let failure_strategies = match s.get("failureStrategies") {
            Some(f) => self.failure_strategies(f),
            None => vec![],
        };
        let (steps, volumes) = if unsupported {
            (Vec::new(), Vec::new())
        } else {
            self.ci_spec(s, &identifier)
        };
        Some(Stage {
            identifier,
            name,
            variables,
            when,
            failure_strategies,
            steps,
            volumes,
            unsupported,
            pos,
        })
    }

    /// A CI stage's `spec`: its steps (`spec.execution.steps`) and volumes (from
    /// `spec.infrastructure`). What is missing or malformed is reported and left empty.
    fn ci_spec(&mut self, stage: &Node, identifier: &str) -> (Vec<Item>, Vec<Volume>) {
        let mut volumes = Vec::new();
        let Some(spec) = stage.get("spec") else {
            self.diags
                .error(stage.pos, format!("stage `{identifier}` has no `spec`"));
            return (Vec::new(), volumes);
        };
        if !self.keys(
            spec,
            "a CI stage's `spec`",
            &[CI_SPEC_ACTED],
            CI_SPEC_IGNORED,
            Strictness::Warn,
        ) {
            return (Vec::new(), volumes);
        }
        if let Some(sd) = spec.get("serviceDependencies") {
            self.diags
                .unsupported(sd.pos, "`serviceDependencies` (use Background steps)");
        }
        if let Some(infra) = spec.get("infrastructure") {
            volumes = self.infrastructure(infra);
        }
        let Some(ex) = spec.get("execution") else {
            self.diags.error(
                spec.pos,
                format!("stage `{identifier}` has no `spec.execution`"),
            );
            return (Vec::new(), volumes);
        };
        if !self.keys(
            ex,
            "`execution`",
            &[&["steps"]],
            &["rollbackSteps"],
            Strictness::Warn,
        ) {
            return (Vec::new(), volumes);
        }
        let Some(list) = ex.get("steps") else {
            self.diags.error(ex.pos, "`execution` has no `steps`");
            return (Vec::new(), volumes);
        };
        let mut steps = self.items(list, false, &format!("stage `{identifier}`"));
        let copies = expanded_steps(&steps);
        if copies > MAX_STAGE_STEPS {
            self.diags.error(list.pos, format!("the strategies of stage `{identifier}` make {copies} steps; stagehand runs at most {MAX_STAGE_STEPS} in one stage"));
            // Planning would allocate every copy: keep one.
            clamp_strategies(&mut steps);
        }
        if list.as_seq().is_some_and(|s| s.is_empty()) {
            self.diags.error(list.pos, "`steps` is empty");
        }
        (steps, volumes)
    }

    fn infrastructure(&mut self, infra: &Node) -> Vec<Volume> {
        // Only `spec.volumes` means something locally; the rest (cluster, namespace, pool) is
        // Harness infrastructure and is ignored as a whole.
        let mut out = Vec::new();
        self.diags.ignore("infrastructure (all but spec.volumes)");
        let Some(vols) = infra.get("spec").and_then(|s| s.get("volumes")) else {
            return out;
        };
        for v in self.seq(vols, "`infrastructure.spec.volumes`") {
            let ty = v.get("type").and_then(|t| t.as_text()).unwrap_or_default();
            match v.get("mountPath").and_then(|m| m.as_text()) {
                Some(mp) if ty == "EmptyDir" || ty.is_empty() => out.push(Volume {
                    mount_path: mp,
                    pos: v.pos,
                }),
                Some(_) => self.diags.warning(
                    v.pos,
                    format!("volume of type `{ty}` is ignored (only EmptyDir volumes are created)"),
                ),
                None => self.diags.error(v.pos, "a volume needs a `mountPath`"),
            }
        }
        out
    }

    fn variables(&mut self, node: &Node, scope: &str) -> Vec<Variable> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let strict = if scope == "stage" {
            Strictness::Error
        } else {
            Strictness::Warn
        };
        for v in self.seq(node, &format!("{scope} `variables`")) {
            if !self.keys(
                v,
                &format!("a {scope} variable"),
                &[VARIABLE_KEYS],
                &[],
                strict,
            ) {
                continue;
            }
            let Some(name) = self.required_text(v, "name", &format!("a {scope} variable")) else {
                continue;
            };
            if !valid_variable_name(&name.value) {
                self.diags.error(name.pos, format!("invalid variable name `{}`: use letters, digits, `_`, `.`, `$` and `-`, starting with a letter or `_`", name.value));
            }
            self.check_unique(
                &mut seen,
                &name.value,
                name.pos,
                &format!("the {scope} variables"),
            );
            let var_type = match v.get("type").and_then(|t| t.as_text()).as_deref() {
                None | Some("String") => VarType::String,
                Some("Number") => VarType::Number,
                Some("Secret") => VarType::Secret,
                Some(other) => {
                    let pos = v.get("type").unwrap().pos;
                    // A suggestion only when one is close; otherwise the list.
                    let hint = did_you_mean(other, &["String", "Number", "Secret"])
                        .map(|h| format!("did you mean `{h}`?"))
                        .unwrap_or_else(|| "variable types: String, Number, Secret".into());
                    self.diags
                        .error_hint(pos, format!("unknown variable type `{other}`"), hint);
                    VarType::String
                }
            };
            let value = match v.get("value") {
                Some(n) if n.is_null() => Text::new("", n.pos),
                Some(n) => self
                    .text(n, &format!("the value of variable `{}`", name.value))
                    .unwrap_or(Text::new("", n.pos)),
                None => match v.get("default").and_then(|d| d.as_text()) {
                    Some(d) => Text::new(d, v.pos),
                    None => {
                        self.diags
                            .error(v.pos, format!("variable `{}` has no `value`", name.value));
                        Text::new("", v.pos)
                    }
                },
            };
            if var_type == VarType::Number
                && !is_unresolved(&value.value)
                && !value.value.contains("<+")
                && value.value.parse::<f64>().is_err()
            {
                self.diags.error(
                    value.pos,
                    format!(
                        "variable `{}` is a Number but its value `{}` is not a number",
                        name.value, value.value
                    ),
                );
            }
            out.push(Variable {
                name: name.value,
                var_type,
                value,
                pos: v.pos,
            });
        }
        out
    }

    // ---- steps ---------------------------------------------------------------------------

    /// A `steps:` list (of a stage, or of a step group when `in_group`).
    fn items(&mut self, list: &Node, in_group: bool, scope: &str) -> Vec<Item> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for item in self.seq(list, "`steps`") {
            if let Some(i) = self.item(item, in_group, scope, &mut seen) {
                out.push(i);
            }
        }
        out
    }

    fn item(
        &mut self,
        item: &Node,
        in_group: bool,
        scope: &str,
        seen: &mut HashSet<String>,
    ) -> Option<Item> {
        let Some(entries) = item.as_map() else {
            self.diags.error(item.pos, format!("an entry of `steps` must be `- step:`, `- parallel:` or `- stepGroup:`, found {}", item.kind()));
            return None;
        };
        let mut result = None;
        for (k, v) in entries {
            match k.name.as_str() {
                "step" => {
                    if let Some(s) = self.step(v, k.pos) {
                        self.check_unique(seen, &s.identifier, s.pos, scope);
                        result = Some(Item::Step(Box::new(s)));
                    }
                }
                "parallel" => {
                    let mut members = Vec::new();
                    for inner in self.seq(v, "`parallel`") {
                        if let Some(i) = self.item(inner, in_group, scope, seen) {
                            if matches!(i, Item::Parallel(..)) {
                                self.diags.error(
                                    inner.pos,
                                    "a `parallel` block cannot hold another `parallel` directly",
                                );
                            }
                            members.push(i);
                        }
                    }
                    if v.as_seq().is_some_and(|s| s.is_empty()) {
                        self.diags.error(v.pos, "`parallel` is empty");
                    }
                    result = Some(Item::Parallel(members, k.pos));
                }
                "stepGroup" => {
                    if in_group {
                        // Harness nests step groups (its schema allows `stepGroup` in a group's
                        // `steps`); stagehand's plan has one level of groups.
                        self.diags
                            .unsupported(k.pos, "a `stepGroup` inside another step group");
                        continue;
                    }
                    if let Some(g) = self.group(v, k.pos) {
                        self.check_unique(seen, &g.identifier, g.pos, scope);
                        result = Some(Item::Group(g));
                    }
                }
                "insert" => self.diags.unsupported(k.pos, "`insert`"),
                other if ANYWHERE.contains(&other) => {}
                other => {
                    let hint = did_you_mean(other, &["step", "parallel", "stepGroup"])
                        .map(|s| format!("did you mean `{s}`?"))
                        .unwrap_or_else(|| {
                            "an entry of `steps` is `step`, `parallel` or `stepGroup`".into()
                        });
                    self.diags.error_hint(
                        k.pos,
                        format!("unknown entry `{other}` in `steps`"),
                        hint,
                    );
                }
            }
        }
        result
    }

    fn group(&mut self, g: &Node, key_pos: Pos) -> Option<Group> {
        if !self.keys(
            g,
            "a step group",
            &[GROUP_ACTED],
            GROUP_IGNORED,
            Strictness::Error,
        ) {
            return None;
        }
        let identifier = self.identifier(g, "a step group").unwrap_or_default();
        let name = g
            .get("name")
            .and_then(|n| n.as_text())
            .unwrap_or_else(|| identifier.clone());
        if let Some(t) = g.get("template") {
            self.diags.unsupported(t.pos, "a step group `template`");
        }
        let when = g.get("when").and_then(|w| self.when(w, false));
        let failure_strategies = match g.get("failureStrategies") {
            Some(f) => self.failure_strategies(f),
            None => vec![],
        };
        let strategy = g.get("strategy").and_then(|s| self.strategy(s));
        let steps = match g.get("steps") {
            Some(list) => {
                if list.as_seq().is_some_and(|s| s.is_empty()) {
                    self.diags
                        .error(list.pos, format!("step group `{identifier}` has no steps"));
                }
                self.items(list, true, &format!("step group `{identifier}`"))
            }
            None => {
                if g.get("template").is_none() {
                    self.diags
                        .error(g.pos, format!("step group `{identifier}` has no `steps`"));
                }
                vec![]
            }
        };
        Some(Group {
            identifier,
            name,
            steps,
            when,
            failure_strategies,
            strategy,
            pos: key_pos,
        })
    }

    fn step(&mut self, s: &Node, key_pos: Pos) -> Option<Step> {
        if !self.keys(s, "a step", &[STEP_ACTED], STEP_IGNORED, Strictness::Error) {
            return None;
        }
        let identifier = self.identifier(s, "a step").unwrap_or_default();
        let name = s
            .get("name")
            .and_then(|n| n.as_text())
            .unwrap_or_else(|| identifier.clone());
        if let Some(t) = s.get("template") {
            self.diags.unsupported(
                t.pos,
                format!("step `{identifier}` uses a `template`, which"),
            );
            return Some(self.placeholder_step(identifier, name, "template", key_pos));
        }
        let kind = match s.get("type") {
            None => {
                self.diags
                    .error(s.pos, format!("step `{identifier}` has no `type`"));
                return None;
            }
            Some(t) if t.as_text().is_none_or(|ty| ty.trim().is_empty()) => {
                let found = if t.is_null() {
                    "empty".to_string()
                } else {
                    t.kind().to_string()
                };
                self.diags.error_hint(
                    t.pos,
                    format!("`type` of step `{identifier}` is {found}"),
                    "stagehand runs `Run` and `Background` steps",
                );
                return None;
            }
            Some(t) => {
                let ty = t.as_text().unwrap_or_default();
                match ty.as_str() {
                    "Run" => StepKind::Run,
                    "Background" => StepKind::Background,
                    other if KNOWN_STEP_TYPES.contains(&other) => {
                        self.diags.unsupported(
                            t.pos,
                            format!("step `{identifier}` of type `{other}`: this step type"),
                        );
                        StepKind::Unsupported(other.to_string())
                    }
                    other => {
                        let hint = did_you_mean(other, RUN_TYPES)
                            .or_else(|| did_you_mean(other, KNOWN_STEP_TYPES))
                            .map(|s| format!("did you mean `{s}`?"))
                            .unwrap_or_else(|| {
                                "stagehand runs `Run` and `Background` steps".into()
                            });
                        self.diags.error_hint(
                            t.pos,
                            format!("unknown step type `{other}` for step `{identifier}`"),
                            hint,
                        );
                        return None;
                    }
                }
            }
        };
        let timeout = s.get("timeout").and_then(|t| {
            let text = self.text(t, "`timeout`")?;
            // Harness's timeout pattern accepts an empty string: no timeout of the step's own.
            if is_unresolved(&text.value) || text.value.trim().is_empty() {
                return None;
            }
            if text.value.contains("<+") {
                return Some(Timeout::Expr(text));
            }
            match units::parse_duration(&text.value) {
                Ok(d) => Some(Timeout::Fixed(d)),
                Err(e) => {
                    self.diags.error(text.pos, e.to_string());
                    None
                }
            }
        });
        let when = s.get("when").and_then(|w| self.when(w, false));
        let failure_strategies = s
            .get("failureStrategies")
            .map(|f| self.failure_strategies(f));
        let strategy = s.get("strategy").and_then(|st| self.strategy(st));
        if kind == StepKind::Background {
            if let Some(f) = s.get("failureStrategies") {
                self.diags.warning(f.pos, format!("failure strategies on Background step `{identifier}` have no effect (Harness: Background steps do not support them)"));
            }
        }
        let spec = match (&kind, s.get("spec")) {
            (StepKind::Unsupported(_), _) => StepSpec::default(),
            (_, None) => {
                self.diags
                    .error(s.pos, format!("step `{identifier}` has no `spec`"));
                StepSpec::default()
            }
            (k, Some(spec)) => self.spec(spec, k, &identifier),
        };
        Some(Step {
            identifier,
            name,
            kind,
            timeout,
            when,
            failure_strategies,
            strategy,
            spec,
            pos: key_pos,
        })
    }

    fn placeholder_step(&mut self, identifier: String, name: String, what: &str, pos: Pos) -> Step {
        Step {
            identifier,
            name,
            kind: StepKind::Unsupported(what.into()),
            timeout: None,
            when: None,
            failure_strategies: None,
            strategy: None,
            spec: StepSpec::default(),
            pos,
        }
    }

    fn spec(&mut self, spec: &Node, kind: &StepKind, id: &str) -> StepSpec {
        let is_run = *kind == StepKind::Run;
        let what = if is_run {
            format!("the spec of Run step `{id}`")
        } else {
            format!("the spec of Background step `{id}`")
        };
        // `outputVariables` passes the key check on Background steps too: it gets its own error
        // below, not a second "unknown key" one.
        let acted: Vec<&[&str]> = vec![SPEC_COMMON, SPEC_RUN_ONLY, SPEC_EXTENSIONS];
        let mut out = StepSpec::default();
        if !self.keys(spec, &what, &acted, SPEC_IGNORED, Strictness::Error) {
            return out;
        }
        if !is_run {
            if let Some(o) = spec.get("outputVariables") {
                // Reported here rather than as an unknown key: it is a known Harness field, in
                // the wrong kind of step.
                self.diags.error(spec.as_map().unwrap().iter().find(|(k, _)| k.name == "outputVariables").map(|(k, _)| k.pos).unwrap_or(o.pos), format!("Background step `{id}` cannot have `outputVariables` (only Run steps export variables)"));
            }
        }
        out.image = spec
            .get("image")
            .and_then(|n| self.text(n, "`image`"))
            .filter(|t| !t.value.trim().is_empty());
        if let Some(sh) = spec.get("shell") {
            if let Some(t) = self.text(sh, "`shell`") {
                match Shell::parse(&t.value) {
                    Some(s) => out.shell = Some(s),
                    None if is_unresolved(&t.value) => {}
                    None => {
                        let hint = did_you_mean(&t.value, &Shell::NAMES)
                            .map(|s| format!("did you mean `{s}`?"))
                            .unwrap_or_else(|| "shells: Sh, Bash, Python, Pwsh, PowerShell".into());
                        self.diags
                            .error_hint(t.pos, format!("unknown shell `{}`", t.value), hint);
                    }
                }
            }
        }
        out.command = spec.get("command").and_then(|n| self.text(n, "`command`"));
        if let Some(ep) = spec.get("entrypoint") {
            match &ep.value {
                Value::Seq(items) => {
                    for i in items {
                        if let Some(t) = self.text(i, "an `entrypoint` argument") {
                            out.entrypoint.push(t);
                        }
                    }
                }
                Value::Scalar(Scalar::Null) => {}
                Value::Scalar(_) => {
                    if let Some(t) = self.text(ep, "`entrypoint`") {
                        out.entrypoint.push(t);
                    }
                }
                Value::Map(_) => self.diags.error(
                    ep.pos,
                    "`entrypoint` must be a list of arguments, found a mapping",
                ),
            }
        }
        // A `command` of the wrong type has had its error; "no command" is for a missing one.
        let command_missing = spec.get("command").is_none_or(Node::is_null);
        if is_run && command_missing && out.command.is_none() && out.entrypoint.is_empty() {
            self.diags
                .error(spec.pos, format!("Run step `{id}` has no `command`"));
        }
        if let Some(env) = spec.get("envVariables") {
            match &env.value {
                Value::Map(entries) => {
                    for (k, v) in entries {
                        if !valid_env_key(&k.name) {
                            self.diags.error(k.pos, format!("invalid environment variable name `{}`: a name cannot be empty or hold `=`", k.name));
                        }
                        let t = if v.is_null() {
                            Text::new("", v.pos)
                        } else {
                            self.text(v, &format!("environment variable `{}`", k.name))
                                .unwrap_or(Text::new("", v.pos))
                        };
                        out.env.push((k.name.clone(), t));
                    }
                }
                Value::Scalar(Scalar::Null) => {}
                _ => self.diags.error(
                    env.pos,
                    format!(
                        "`envVariables` must be a mapping of names to values, found {}",
                        env.kind()
                    ),
                ),
            }
        }
        if let Some(pb) = spec.get("portBindings") {
            match &pb.value {
                Value::Map(entries) => {
                    for (k, v) in entries {
                        let host = self.port(&k.name, k.pos, "host port");
                        let container = v
                            .as_text()
                            .and_then(|t| self.port(&t, v.pos, "container port"));
                        if v.as_text().is_none() {
                            self.diags.error(
                                v.pos,
                                format!("a container port must be a number, found {}", v.kind()),
                            );
                        }
                        if let (Some(host), Some(container)) = (host, container) {
                            out.port_bindings.push(PortBinding {
                                host,
                                container,
                                pos: k.pos,
                            });
                        }
                    }
                }
                Value::Scalar(Scalar::Null) => {}
                _ => self.diags.error(
                    pb.pos,
                    format!(
                        "`portBindings` must map host ports to container ports, found {}",
                        pb.kind()
                    ),
                ),
            }
        }
        if let Some(p) = spec.get("privileged") {
            out.privileged = self.bool_value(p, "`privileged`").unwrap_or(false);
        }
        out.run_as_user = spec
            .get("runAsUser")
            .and_then(|n| self.text(n, "`runAsUser`"));
        if let Some(pp) = spec.get("imagePullPolicy") {
            if let Some(t) = self.text(pp, "`imagePullPolicy`") {
                out.pull_policy = match t.value.as_str() {
                    "Always" => Some(PullPolicy::Always),
                    "IfNotPresent" => Some(PullPolicy::IfNotPresent),
                    "Never" => Some(PullPolicy::Never),
                    v if is_unresolved(v) => None,
                    other => {
                        let hint = did_you_mean(other, &["Always", "IfNotPresent", "Never"])
                            .map(|h| format!("did you mean `{h}`? (Always, IfNotPresent, Never)"))
                            .unwrap_or_else(|| "use Always, IfNotPresent or Never".into());
                        self.diags.error_hint(
                            t.pos,
                            format!("unknown imagePullPolicy `{other}`"),
                            hint,
                        );
                        None
                    }
                };
            }
        }
        if let Some(res) = spec.get("resources") {
            self.resources(res, &mut out);
        }
        if let Some(h) = spec.get("healthCheck") {
            if is_run {
                self.diags.error(h.pos, format!("`healthCheck` is for Background steps; Run step `{id}` can wait for services with `dependsOn`"));
            } else {
                out.health_check = self.health_check(h);
            }
        }
        if let Some(d) = spec.get("dependsOn") {
            if !is_run {
                self.diags.error(
                    d.pos,
                    format!("`dependsOn` is for Run steps; Background step `{id}` starts at once"),
                );
            } else {
                for item in self.seq(d, "`dependsOn`") {
                    if let Some(t) = self.text(item, "a `dependsOn` entry") {
                        out.depends_on.push(t);
                    }
                }
            }
        }
        if let Some(rep) = spec.get("reports") {
            self.reports(rep, &mut out);
        }
        if is_run {
            if let Some(ov) = spec.get("outputVariables") {
                let mut seen = HashSet::new();
                for v in self.seq(ov, "`outputVariables`") {
                    if !self.keys(
                        v,
                        "an output variable",
                        &[&["name", "type", "value"]],
                        &[],
                        Strictness::Error,
                    ) {
                        continue;
                    }
                    let Some(name) = self.required_text(v, "name", "an output variable") else {
                        continue;
                    };
                    if !valid_env_name(&name.value) {
                        self.diags.error(name.pos, format!("invalid output variable name `{}`: it must be a shell variable name", name.value));
                    }
                    self.check_unique(&mut seen, &name.value, name.pos, "`outputVariables`");
                    let secret = v
                        .get("type")
                        .and_then(|t| t.as_text())
                        .is_some_and(|t| t == "Secret");
                    out.output_variables.push(OutputVariable {
                        name: name.value,
                        secret,
                        pos: name.pos,
                    });
                }
            }
        }
        out
    }

    fn health_check(&mut self, h: &Node) -> Option<HealthCheck> {
        if !self.keys(h, "`healthCheck`", &[HEALTH_KEYS], &[], Strictness::Error) {
            return None;
        }
        let probes: Vec<&str> = ["tcp", "http", "exec", "log"]
            .into_iter()
            .filter(|k| h.get(k).is_some())
            .collect();
        if probes.len() != 1 {
            self.diags.error(
                h.pos,
                "`healthCheck` needs exactly one of `tcp`, `http`, `exec` or `log`",
            );
            return None;
        }
        let probe = match probes[0] {
            "tcp" => {
                let n = h.get("tcp").unwrap();
                Probe::Tcp(self.port(
                    &n.as_text().unwrap_or_default(),
                    n.pos,
                    "health check port",
                )?)
            }
            "http" => {
                let n = h.get("http").unwrap();
                if let Some(p) = n.as_text() {
                    // `http: 8080` is shorthand for `{port: 8080}`.
                    Probe::Http {
                        port: self.port(&p, n.pos, "health check port")?,
                        path: "/".into(),
                        status: None,
                    }
                } else {
                    if !self.keys(
                        n,
                        "`healthCheck.http`",
                        &[&["port", "path", "status"]],
                        &[],
                        Strictness::Error,
                    ) {
                        return None;
                    }
                    let Some(pn) = n.get("port") else {
                        self.diags.error(n.pos, "`healthCheck.http` needs a `port`");
                        return None;
                    };
                    let port = self.port(
                        &pn.as_text().unwrap_or_default(),
                        pn.pos,
                        "health check port",
                    )?;
                    let path = n
                        .get("path")
                        .and_then(|p| p.as_text())
                        .unwrap_or_else(|| "/".into());
                    if !path.starts_with('/') {
                        self.diags.error(
                            n.get("path").unwrap().pos,
                            format!("health check path `{path}` must start with `/`"),
                        );
                    }
                    let status = match n.get("status") {
                        None => None,
                        Some(sn) => {
                            match sn.as_text().and_then(|t| t.parse::<u16>().ok()) {
                                Some(c) if (100..=599).contains(&c) => Some(c),
                                _ => {
                                    self.diags.error(sn.pos, "health check `status` must be an HTTP status code such as 200");
                                    None
                                }
                            }
                        }
                    };
                    Probe::Http { port, path, status }
                }
            }
            "exec" => Probe::Exec(self.text(h.get("exec").unwrap(), "`healthCheck.exec`")?),
            _ => {
                let t = self.text(h.get("log").unwrap(), "`healthCheck.log`")?;
                if let Err(e) = regex::Regex::new(&t.value) {
                    self.diags.error(
                        t.pos,
                        format!(
                            "invalid regular expression in `healthCheck.log`: {}",
                            e.to_string().lines().last().unwrap_or("")
                        ),
                    );
                    return None;
                }
                Probe::Log(t.value)
            }
        };
        let mut dur = |key: &str, default: std::time::Duration| -> std::time::Duration {
            match h.get(key).and_then(|n| n.as_text().map(|t| (t, n.pos))) {
                None => default,
                Some((t, pos)) => match units::parse_duration(&t) {
                    Ok(d) => d,
                    Err(e) => {
                        self.diags.error(pos, format!("`healthCheck.{key}`: {e}"));
                        default
                    }
                },
            }
        };
        let interval = dur("interval", std::time::Duration::from_millis(100));
        let timeout = dur("timeout", std::time::Duration::from_secs(1));
        let start_period = dur("startPeriod", std::time::Duration::ZERO);
        let deadline = dur("deadline", std::time::Duration::from_secs(300));
        let retries = h
            .get("retries")
            .and_then(|n| self.count(n, "`healthCheck.retries`"))
            .map(|r| r as u32);
        Some(HealthCheck {
            probe,
            interval,
            timeout,
            start_period,
            retries,
            deadline,
            pos: h.pos,
        })
    }

    fn port(&mut self, s: &str, pos: Pos, what: &str) -> Option<u16> {
        match s.trim().parse::<u32>() {
            Ok(p) if (1..=65535).contains(&p) => Some(p as u16),
            _ if is_unresolved(s) => None,
            _ => {
                self.diags.error(
                    pos,
                    format!("invalid {what} `{s}`: ports are numbers from 1 to 65535"),
                );
                None
            }
        }
    }

    fn resources(&mut self, res: &Node, out: &mut StepSpec) {
        if !self.keys(
            res,
            "`resources`",
            &[&["limits"]],
            &["requests"],
            Strictness::Error,
        ) {
            return;
        }
        let Some(limits) = res.get("limits") else {
            return;
        };
        if !self.keys(
            limits,
            "`resources.limits`",
            &[&["memory", "cpu"]],
            &[],
            Strictness::Error,
        ) {
            return;
        }
        if let Some(m) = limits.get("memory").and_then(|n| self.text(n, "`memory`")) {
            if !is_unresolved(&m.value) {
                match units::parse_memory(&m.value) {
                    Ok(b) => out.memory = Some(b),
                    Err(e) => self.diags.error(m.pos, e.to_string()),
                }
            }
        }
        if let Some(c) = limits.get("cpu").and_then(|n| self.text(n, "`cpu`")) {
            if !is_unresolved(&c.value) {
                match units::parse_cpu(&c.value) {
                    Ok(v) => out.cpu = Some(v),
                    Err(e) => self.diags.error(c.pos, e.to_string()),
                }
            }
        }
    }

    fn reports(&mut self, rep: &Node, out: &mut StepSpec) {
        if !self.keys(
            rep,
            "`reports`",
            &[&["type", "spec"]],
            &[],
            Strictness::Error,
        ) {
            return;
        }
        match rep.get("type").and_then(|t| t.as_text()) {
            Some(t) if t == "JUnit" => {}
            Some(t) => {
                let pos = rep.get("type").unwrap().pos;
                self.diags.error_hint(
                    pos,
                    format!("unknown report type `{t}`"),
                    "the only report type is `JUnit`",
                );
            }
            None => self.diags.error(rep.pos, "`reports` needs `type: JUnit`"),
        }
        let Some(spec) = rep.get("spec") else {
            self.diags.error(rep.pos, "`reports` needs `spec.paths`");
            return;
        };
        if !self.keys(
            spec,
            "`reports.spec`",
            &[&["paths"]],
            &[],
            Strictness::Error,
        ) {
            return;
        }
        if let Some(paths) = spec.get("paths") {
            if paths.as_seq().is_some_and(|s| s.is_empty()) {
                self.diags.error(
                    paths.pos,
                    "`reports.spec.paths` is empty: no report would be read",
                );
            }
            for p in self.seq(paths, "`reports.spec.paths`") {
                if let Some(t) = self.text(p, "a report path") {
                    out.reports.push(t);
                }
            }
        }
    }

    // ---- when, failure strategies, looping strategies -----------------------------------

    fn when(&mut self, w: &Node, stage_level: bool) -> Option<When> {
        if let Some(t) = w.as_text() {
            if is_unresolved(&t) {
                return None;
            }
        }
        let status_key = if stage_level {
            "pipelineStatus"
        } else {
            "stageStatus"
        };
        if !self.keys(
            w,
            "`when`",
            &[&[status_key, "condition"]],
            &[],
            Strictness::Error,
        ) {
            return None;
        }
        let status = match w.get(status_key) {
            None => {
                self.diags.error(
                    w.pos,
                    format!("`when` needs `{status_key}` (Success, Failure or All)"),
                );
                StatusGate::Success
            }
            Some(n) if n.as_text().is_none() => {
                self.diags.error_hint(
                    n.pos,
                    format!("`{status_key}` must be one word, found {}", n.kind()),
                    "use Success, Failure or All",
                );
                StatusGate::Success
            }
            Some(n) => match n.as_text().as_deref() {
                Some("Success") => StatusGate::Success,
                Some("Failure") => StatusGate::Failure,
                Some("All") => StatusGate::All,
                other => {
                    let other = other.unwrap_or_default();
                    let hint = did_you_mean(other, &["Success", "Failure", "All"])
                        .map(|s| format!("did you mean `{s}`?"))
                        .unwrap_or_else(|| "use Success, Failure or All".into());
                    self.diags
                        .error_hint(n.pos, format!("unknown {status_key} `{other}`"), hint);
                    StatusGate::Success
                }
            },
        };
        let condition = w
            .get("condition")
            .and_then(|c| self.text(c, "`condition`"))
            .filter(|c| !c.value.trim().is_empty());
        Some(When {
            status,
            condition,
            pos: w.pos,
        })
    }

    fn failure_strategies(&mut self, f: &Node) -> Vec<FailureStrategy> {
        if f.as_text().is_some_and(|t| is_unresolved(&t)) {
            return vec![];
        }
        let mut out = Vec::new();
        for item in self.seq(f, "`failureStrategies`") {
            if !self.keys(
                item,
                "a failure strategy",
                &[&["onFailure"]],
                &[],
                Strictness::Error,
            ) {
                continue;
            }
            let Some(on) = item.get("onFailure") else {
                self.diags
                    .error(item.pos, "a failure strategy needs `onFailure`");
                continue;
            };
            if !self.keys(
                on,
                "`onFailure`",
                &[&["errors", "action"]],
                &[],
                Strictness::Error,
            ) {
                continue;
            }
            let mut errors = Vec::new();
            match on.get("errors") {
                None => self.diags.error(
                    on.pos,
                    "`onFailure` needs `errors` (for example `- AllErrors`)",
                ),
                Some(list) => {
                    for e in self.seq(list, "`errors`") {
                        let Some(t) = self.text(e, "an error type") else {
                            continue;
                        };
                        match t.value.as_str() {
                            "AllErrors" => errors.push(ErrorKind::All),
                            "Timeout" => errors.push(ErrorKind::Timeout),
                            "Unknown"
                            | "Authentication"
                            | "Authorization"
                            | "Connectivity"
                            | "Verification"
                            | "DelegateProvisioning"
                            | "PolicyEvaluationFailure"
                            | "InputTimeoutError"
                            | "ApprovalRejection"
                            | "DelegateRestart"
                            | "UserMarkedFailure" => errors.push(ErrorKind::Other),
                            other => {
                                let cands = [
                                    "AllErrors",
                                    "Timeout",
                                    "Unknown",
                                    "Authentication",
                                    "Authorization",
                                    "Connectivity",
                                    "Verification",
                                    "DelegateProvisioning",
                                ];
                                let hint = did_you_mean(other, &cands)
                                    .map(|s| format!("did you mean `{s}`?"))
                                    .unwrap_or_else(|| {
                                        "for example AllErrors, Timeout, Unknown".into()
                                    });
                                self.diags.error_hint(
                                    t.pos,
                                    format!("unknown error type `{other}`"),
                                    hint,
                                );
                            }
                        }
                    }
                }
            }
            let action = match on.get("action") {
                None => {
                    self.diags.error(on.pos, "`onFailure` needs an `action`");
                    continue;
                }
                Some(a) => match self.action(a, 0) {
                    Some(a) => a,
                    None => continue,
                },
            };
            out.push(FailureStrategy {
                errors,
                action,
                pos: item.pos,
            });
        }
        out
    }

    fn action(&mut self, a: &Node, depth: usize) -> Option<Action> {
        if !self.keys(
            a,
            "a failure action",
            &[&["type", "spec"]],
            &[],
            Strictness::Error,
        ) {
            return None;
        }
        let Some(tn) = a.get("type") else {
            self.diags.error(a.pos, "a failure action needs a `type`");
            return None;
        };
        let ty = tn.as_text().unwrap_or_default();
        Some(match ty.as_str() {
            "Ignore" => Action::Ignore,
            "MarkAsSuccess" => Action::MarkAsSuccess,
            "MarkAsFailure" => Action::MarkAsFailure,
            "Abort" => Action::Abort,
            // Rollbacks have nothing to roll back in a CI stage; they end the stage as failed.
            "StageRollback" | "PipelineRollback" | "StepGroupRollback" => {
                self.diags.warning(tn.pos, format!("`{ty}` has nothing to roll back in a CI stage: stagehand treats it as MarkAsFailure"));
                Action::MarkAsFailure
            }
            "ManualIntervention" | "ProceedWithDefaultValues" => {
                self.diags
                    .unsupported(tn.pos, format!("the failure action `{ty}`"));
                Action::MarkAsFailure
            }
            "Retry" | "RetryStepGroup" if depth == 0 => {
                let Some(spec) = a.get("spec") else {
                    self.diags
                        .error(a.pos, "a Retry action needs `spec.retryCount`");
                    return None;
                };
                if !self.keys(
                    spec,
                    "a Retry spec",
                    &[&["retryCount", "retryIntervals", "onRetryFailure"]],
                    &["condition"],
                    Strictness::Error,
                ) {
                    return None;
                }
                let count = match spec.get("retryCount").and_then(|n| n.as_text()) {
                    Some(c) => {
                        match c.parse::<u32>() {
                            Ok(n) if n >= 1 => n,
                            _ => {
                                self.diags.error(spec.get("retryCount").unwrap().pos, format!("`retryCount` must be a whole number of at least 1, found `{c}`"));
                                1
                            }
                        }
                    }
                    None => {
                        self.diags
                            .error(spec.pos, "a Retry action needs `retryCount`");
                        1
                    }
                };
                let mut intervals = Vec::new();
                if let Some(list) = spec.get("retryIntervals") {
                    for i in self.seq(list, "`retryIntervals`") {
                        if let Some(t) = self.text(i, "a retry interval") {
                            match units::parse_duration(&t.value) {
                                Ok(d) => intervals.push(d),
                                Err(e) => self.diags.error(t.pos, e.to_string()),
                            }
                        }
                    }
                }
                let on_retry_failure = match spec.get("onRetryFailure") {
                    None => Action::MarkAsFailure,
                    Some(orf) => {
                        if !self.keys(
                            orf,
                            "`onRetryFailure`",
                            &[&["action"]],
                            &[],
                            Strictness::Error,
                        ) {
                            return None;
                        }
                        match orf.get("action") {
                            Some(a2) => self.action(a2, depth + 1)?,
                            None => {
                                self.diags
                                    .error(orf.pos, "`onRetryFailure` needs an `action`");
                                Action::MarkAsFailure
                            }
                        }
                    }
                };
                Action::Retry {
                    count,
                    intervals,
                    on_retry_failure: Box::new(on_retry_failure),
                }
            }
            "Retry" | "RetryStepGroup" => {
                self.diags
                    .error(tn.pos, "`onRetryFailure` cannot retry again");
                return None;
            }
            other => {
                let cands = [
                    "Ignore",
                    "MarkAsSuccess",
                    "MarkAsFailure",
                    "Abort",
                    "Retry",
                    "StageRollback",
                    "PipelineRollback",
                    "ManualIntervention",
                ];
                let hint = did_you_mean(other, &cands)
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| format!("actions: {}", cands.join(", ")));
                self.diags
                    .error_hint(tn.pos, format!("unknown failure action `{other}`"), hint);
                return None;
            }
        })
    }

    fn strategy(&mut self, s: &Node) -> Option<Strategy> {
        if !self.keys(
            s,
            "a looping `strategy`",
            &[&["matrix", "parallelism", "repeat"]],
            &["onFailure", "when"],
            Strictness::Error,
        ) {
            return None;
        }
        let present: Vec<&str> = ["matrix", "parallelism", "repeat"]
            .into_iter()
            .filter(|k| s.get(k).is_some())
            .collect();
        if present.len() != 1 {
            self.diags.error(
                s.pos,
                "a `strategy` needs exactly one of `matrix`, `parallelism` or `repeat`",
            );
            return None;
        }
        if let Some(m) = s.get("matrix") {
            let Some(entries) = m.as_map() else {
                if m.as_text().is_some_and(|t| t.contains("<+")) {
                    self.diags
                        .unsupported(m.pos, "a `matrix` given as an expression");
                } else {
                    self.diags.error(
                        m.pos,
                        format!(
                            "`matrix` must be a mapping of axes to lists, found {}",
                            m.kind()
                        ),
                    );
                }
                return None;
            };
            let mut axes = Vec::new();
            let mut exclude = Vec::new();
            let mut exclude_keys: Vec<Key> = Vec::new();
            let mut max_concurrency = None;
            for (k, v) in entries {
                match k.name.as_str() {
                    "exclude" => {
                        for e in self.seq(v, "`exclude`") {
                            let mut combo = BTreeMap::new();
                            match e.as_map() {
                                Some(pairs) => {
                                    for (ek, ev) in pairs {
                                        combo.insert(
                                            ek.name.clone(),
                                            ev.as_text().unwrap_or_default(),
                                        );
                                        exclude_keys.push(ek.clone());
                                    }
                                }
                                None => self
                                    .diags
                                    .error(e.pos, "an `exclude` entry must map axes to values"),
                            }
                            exclude.push(combo);
                        }
                    }
                    "maxConcurrency" => max_concurrency = self.count(v, "`maxConcurrency`"),
                    "nodeName" => self.diags.ignore("nodeName"),
                    axis => match &v.value {
                        Value::Seq(items) => {
                            let mut values = Vec::new();
                            for i in items {
                                match i.as_text() {
                                    Some(t) => values.push(t),
                                    None => self.diags.unsupported(
                                        i.pos,
                                        format!("a matrix value that is {}", i.kind()),
                                    ),
                                }
                            }
                            if values.is_empty() {
                                self.diags
                                    .error(v.pos, format!("matrix axis `{axis}` is empty"));
                            }
                            axes.push((axis.to_string(), values));
                        }
                        _ if v.as_text().is_some_and(|t| t.contains("<+")) => {
                            self.diags.unsupported(
                                v.pos,
                                format!("matrix axis `{axis}` given as an expression"),
                            );
                        }
                        _ => self.diags.error(
                            v.pos,
                            format!("matrix axis `{axis}` must be a list, found {}", v.kind()),
                        ),
                    },
                }
            }
            if axes.is_empty() {
                self.diags.error(m.pos, "`matrix` has no axes");
            }
            for k in &exclude_keys {
                if !axes.iter().any(|(a, _)| *a == k.name) {
                    let names: Vec<&str> = axes.iter().map(|(a, _)| a.as_str()).collect();
                    let hint = did_you_mean(&k.name, &names)
                        .map(|s| format!(" (did you mean `{s}`?)"))
                        .unwrap_or_default();
                    self.diags.error(
                        k.pos,
                        format!(
                            "`exclude` names `{}`, which is not an axis of the matrix{hint}",
                            k.name
                        ),
                    );
                }
            }
            // A product beyond the cap would be expanded step by step later (planning,
            // validation): refuse it here, and keep one combination so later checks still
            // see a matrix.
            let combos = axes
                .iter()
                .fold(1usize, |n, (_, v)| n.saturating_mul(v.len().max(1)));
            if combos > MAX_ITERATIONS {
                self.diags.error(
                    m.pos,
                    format!(
                        "this `matrix` has {combos} combinations; stagehand runs at most {MAX_ITERATIONS} copies of a step"
                    ),
                );
                for (_, v) in &mut axes {
                    v.truncate(1);
                }
            }
            return Some(Strategy::Matrix {
                axes,
                exclude,
                max_concurrency,
                pos: m.pos,
            });
        }
        if let Some(p) = s.get("parallelism") {
            let count = self.count(p, "`parallelism`")?;
            let count = self.capped(count, p.pos, "`parallelism`");
            return Some(Strategy::Parallelism { count, pos: p.pos });
        }
        let r = s.get("repeat")?;
        if !self.keys(
            r,
            "`repeat`",
            &[&["times", "items", "maxConcurrency"]],
            &["start", "end", "unit", "partitionSize", "nodeName"],
            Strictness::Error,
        ) {
            return None;
        }
        let max_concurrency = r
            .get("maxConcurrency")
            .and_then(|m| self.count(m, "`maxConcurrency`"));
        let items = match (r.get("times"), r.get("items")) {
            (Some(t), None) => {
                let n = self.count(t, "`times`")?;
                RepeatItems::Times(self.capped(n, t.pos, "`repeat.times`"))
            }
            (None, Some(i)) => {
                if i.as_seq().is_some_and(|s| s.is_empty()) {
                    self.diags
                        .error(i.pos, "`repeat.items` is empty: the step would never run");
                }
                let mut values = Vec::new();
                for v in self.seq(i, "`items`") {
                    if let Some(t) = self.text(v, "a repeat item") {
                        values.push(t.value);
                    }
                }
                if values.len() > MAX_ITERATIONS {
                    self.diags.error(
                        i.pos,
                        format!(
                            "`repeat.items` has {} items; stagehand runs at most {MAX_ITERATIONS} copies of a step",
                            values.len()
                        ),
                    );
                    values.truncate(1);
                }
                RepeatItems::Items(values)
            }
            _ => {
                self.diags
                    .error(r.pos, "`repeat` needs exactly one of `times` or `items`");
                return None;
            }
        };
        Some(Strategy::Repeat {
            items,
            max_concurrency,
            pos: r.pos,
        })
    }

    /// `count` copies of a step, or (after an error) one: a file asking for millions must
    /// not make planning and validation allocate them.
    fn capped(&mut self, count: usize, pos: Pos, what: &str) -> usize {
        if count <= MAX_ITERATIONS {
            return count;
        }
        self.diags.error(
            pos,
            format!("{what} of {count} is more than stagehand runs: at most {MAX_ITERATIONS} copies of a step"),
        );
        1
    }

    fn count(&mut self, n: &Node, what: &str) -> Option<usize> {
        match n.as_text().map(|t| t.parse::<usize>()) {
            Some(Ok(c)) if c >= 1 => Some(c),
            _ if n.as_text().is_some_and(|t| is_unresolved(&t)) => None,
            _ => {
                self.diags.error(
                    n.pos,
                    format!("{what} must be a whole number of at least 1"),
                );
                None
            }
        }
    }
}

/// The most steps one stage may expand to (group strategies times step strategies).
pub const MAX_STAGE_STEPS: usize = 10_000;

/// How many steps `items` become once every looping strategy is expanded (saturating).
fn expanded_steps(items: &[Item]) -> usize {
    fn copies(s: Option<&Strategy>) -> usize {
        match s {
            None => 1,
            Some(Strategy::Parallelism { count, .. }) => *count,
            Some(Strategy::Repeat {
                items: RepeatItems::Times(n),
                ..
            }) => *n,
            Some(Strategy::Repeat {
                items: RepeatItems::Items(v),
                ..
            }) => v.len(),
            Some(Strategy::Matrix { axes, .. }) => axes
                .iter()
                .fold(1usize, |n, (_, v)| n.saturating_mul(v.len())),
        }
    }
    items
        .iter()
        .map(|i| match i {
            Item::Step(s) => copies(s.strategy.as_ref()),
            Item::Parallel(m, _) => expanded_steps(m),
            Item::Group(g) => copies(g.strategy.as_ref()).saturating_mul(expanded_steps(&g.steps)),
        })
        .fold(0usize, usize::saturating_add)
}

/// Make every looping strategy in `items` one copy (after the size was reported), keeping its
/// kind and axes so later checks of `<+matrix.x>` or `<+strategy.iteration>` stay quiet.
fn clamp_strategies(items: &mut [Item]) {
    fn clamp(s: &mut Option<Strategy>) {
        match s {
            None => {}
            Some(Strategy::Parallelism { count, .. }) => *count = 1,
            Some(Strategy::Repeat { items, .. }) => match items {
                RepeatItems::Times(n) => *n = 1,
                RepeatItems::Items(v) => v.truncate(1),
            },
            Some(Strategy::Matrix { axes, .. }) => axes.iter_mut().for_each(|(_, v)| v.truncate(1)),
        }
    }
    for i in items {
        match i {
            Item::Step(s) => clamp(&mut s.strategy),
            Item::Parallel(m, _) => clamp_strategies(m),
            Item::Group(g) => {
                clamp(&mut g.strategy);
                clamp_strategies(&mut g.steps);
            }
        }
    }
}

/// A value still holding a `<+input>` (only during `validate`, where inputs may stay open).
pub fn is_unresolved(s: &str) -> bool {
    s.trim_start().starts_with("<+input>")
}

fn valid_env_name(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
}

/// What an environment can hold as a name. Harness puts no pattern on `envVariables` keys, and
/// converted pipelines use names such as `PATH+ANT` (from Jenkins): the kernel takes any name
/// without `=` or NUL, so only those are refused.
fn valid_env_key(s: &str) -> bool {
    !s.is_empty() && !s.contains(['=', '\0'])
}

fn valid_variable_name(s: &str) -> bool {
    // Harness: ^[a-zA-Z_][0-9a-zA-Z_\.$-]{0,127}$
    let mut c = s.chars();
    matches!(c.next(), Some(ch) if ch.is_ascii_alphabetic() || ch == '_')
        && s.len() <= 128
        && c.all(|ch| ch.is_ascii_alphanumeric() || "_.$-".contains(ch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::Severity;
    use std::path::Path;

    fn load_str(s: &str) -> (Option<Pipeline>, Diagnostics) {
        let node = crate::yaml::parse(s).unwrap();
        let mut d = Diagnostics::new(Path::new("t.yaml"));
        let p = load(&node, &mut d);
        (p, d)
    }

    #[test]
    fn identifiers() {
        assert!(valid_identifier("Run_1"));
        assert!(valid_identifier("_x"));
        assert!(!valid_identifier("1run"));
        assert!(!valid_identifier("run-1"));
        assert!(!valid_identifier(""));
    }

    #[test]
    fn minimal_pipeline_loads() {
        let (p, d) = load_str(
            "pipeline:
  identifier: p
  name: p
  stages:
    - stage:
        identifier: s
        type: CI
        spec:
          execution:
            steps:
              - step:
                  identifier: r
                  type: Run
                  spec:
                    shell: Bash
                    command: echo hi
",
        );
        assert!(d.items.is_empty(), "{:?}", d.items);
        let p = p.unwrap();
        let Item::Step(s) = &p.stages[0].steps[0] else {
            panic!()
        };
        assert_eq!(s.spec.shell, Some(Shell::Bash));
        assert_eq!(s.spec.command.as_ref().unwrap().value, "echo hi");
    }

    #[test]
    fn typo_in_spec_is_an_error_with_suggestion() {
        let (_, d) = load_str(
            "stage:
  identifier: s
  type: CI
  spec:
    execution:
      steps:
        - step:
            identifier: r
            type: Run
            spec:
              comand: echo hi
",
        );
        let e = d
            .items
            .iter()
            .find(|e| e.message.contains("comand"))
            .unwrap();
        assert_eq!(e.hint.as_deref(), Some("did you mean `command`?"));
        assert_eq!((e.pos.line, e.pos.col), (11, 15));
    }

    #[test]
    fn shapes_harness_accepts_are_not_errors() {
        // Regression (shared/corpus/harness-pipelines): an empty step timeout (Harness's pattern
        // allows ""), env names such as `PATH+ANT`, `template` keys and nested step groups are
        // Harness's own; the last two are "not supported", never "unknown key".
        let (_, d) = load_str(
            "pipeline:
  identifier: p
  stages:
    - stage:
        identifier: s
        type: CI
        spec:
          execution:
            steps:
              - step:
                  identifier: r
                  type: Run
                  timeout: \"\"
                  spec:
                    command: echo hi
                    envVariables:
                      PATH+ANT: /opt/ant/bin
              - step:
                  identifier: t
                  template:
                    templateRef: upload
              - stepGroup:
                  identifier: g
                  steps:
                    - stepGroup:
                        identifier: inner
                        steps: []
",
        );
        let msgs: Vec<(Severity, &str)> = d
            .items
            .iter()
            .map(|i| (i.severity, i.message.as_str()))
            .collect();
        assert_eq!(
            msgs,
            [
                (
                    Severity::Unsupported,
                    "step `t` uses a `template`, which is not supported by stagehand"
                ),
                (
                    Severity::Unsupported,
                    "a `stepGroup` inside another step group is not supported by stagehand"
                ),
            ],
            "{msgs:?}"
        );
    }
}
