//! The broken-pipeline corpus: every file under `tests/validation/` must be rejected with
//! exit code 2 and exactly the diagnostics its header pins.
//!
//! Owns: reading the header directives of each corpus file and checking the built binary's
//! output against them. Does not own: the messages themselves (`runner/src/load.rs`,
//! `validate.rs`, `yaml.rs`) or their rendering (`diag.rs`).
//!
//! Header directives (leading `#` lines of each file):
//! - `# expect: LINE`: a full stderr line (`FILE:LINE:COL: severity: message`) that must appear.
//!   Every diagnostic line the run prints must be one of these: each file pins its full set.
//! - `# hint: TEXT`: the diagnostic of the `# expect:` line just above carries `  hint: TEXT`.
//! - `# command: run`: run `stagehand run` (in an empty temporary workspace) instead of
//!   `validate`; the file's steps create `stagehand_marker_created` there, which must not exist
//!   afterwards: nothing may start when the file is rejected.
//! - `# control: ARGS`: with these extra arguments the same run is accepted and does create the
//!   marker, which proves the marker check above can fail.
//!
//! The binary runs with its working directory in `tests/validation/` and the bare file name,
//! so the pinned lines start with the file name.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use stagehand_e2e::bin_path::stagehand_bin;

const MARKER: &str = "stagehand_marker_created";

#[derive(Debug)]
struct Expect {
    line: String,
    hint: Option<String>,
}

#[derive(Debug, Default)]
struct Header {
    expects: Vec<Expect>,
    run: bool,
    control: Option<Vec<String>>,
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("validation")
}

fn corpus_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .expect("read tests/validation")
        .map(|e| e.expect("read a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn header(path: &Path, text: &str) -> Header {
    let mut h = Header::default();
    // `bom.yaml` opens with a byte order mark, before its header.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for line in text.lines().take_while(|l| l.starts_with('#')) {
        if let Some(e) = line.strip_prefix("# expect: ") {
            h.expects.push(Expect {
                line: e.to_string(),
                hint: None,
            });
        } else if let Some(hint) = line.strip_prefix("# hint: ") {
            let last = h
                .expects
                .last_mut()
                .unwrap_or_else(|| panic!("{}: `# hint:` before any `# expect:`", path.display()));
            assert!(
                last.hint.is_none(),
                "{}: two `# hint:` lines for one `# expect:`",
                path.display()
            );
            last.hint = Some(hint.to_string());
        } else if line == "# command: run" {
            h.run = true;
        } else if let Some(args) = line.strip_prefix("# control: ") {
            h.control = Some(args.split_whitespace().map(str::to_string).collect());
        }
    }
    h
}

/// `NAME:LINE:COL: severity: ` at the start of a line: (line, col), or None for other lines.
fn diag_pos(name: &str, line: &str) -> Option<(usize, usize)> {
    let rest = line.strip_prefix(name)?.strip_prefix(':')?;
    let mut parts = rest.splitn(3, ':');
    let l = parts.next()?.parse().ok()?;
    let c = parts.next()?.parse().ok()?;
    let tail = parts.next()?;
    [" error: ", " warning: ", " skipped: "]
        .iter()
        .any(|s| tail.starts_with(s))
        .then_some((l, c))
}

fn run_stagehand(dir: &Path, args: &[&str]) -> Output {
    Command::new(stagehand_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("STAGEHAND_LOG")
        .output()
        .unwrap_or_else(|e| panic!("run stagehand {args:?}: {e}"))
}

/// Every problem found in one file's output, as messages (empty when it is as pinned).
fn check_output(name: &str, source: &str, h: &Header, out: &Output) -> Vec<String> {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let mut problems = Vec::new();
    match out.status.code() {
        Some(2) => {}
        other => problems.push(format!("exit code {other:?}, expected 2")),
    }
    if stderr.contains("panicked") {
        problems.push("stagehand panicked".into());
    }
    for e in &h.expects {
        let Some(at) = lines.iter().position(|l| *l == e.line) else {
            problems.push(format!("missing: {}", e.line));
            continue;
        };
        if let Some(hint) = &e.hint {
            let block = lines[at + 1..]
                .iter()
                .take_while(|l| diag_pos(name, l).is_none());
            let want = format!("  hint: {hint}");
            if !block.clone().any(|l| *l == want) {
                problems.push(format!("no `{want}` under: {}", e.line));
            }
        }
    }
    let source_lines: Vec<&str> = source.lines().collect();
    let mut errors = 0;
    for (i, l) in lines.iter().enumerate() {
        let Some((line, col)) = diag_pos(name, l) else {
            continue;
        };
        if l.contains(": error: ") {
            errors += 1;
        }
        if !h.expects.iter().any(|e| e.line == *l) {
            problems.push(format!("not pinned: {l}"));
        }
        // The snippet: ` N | source line`, then the caret under the column.
        let snippet = format!(
            " {line} | {}",
            source_lines.get(line - 1).copied().unwrap_or("").trim_end()
        );
        let caret = format!(
            " {} | {}^",
            " ".repeat(line.to_string().len()),
            " ".repeat(col - 1)
        );
        if lines.get(i + 1) != Some(&snippet.as_str()) || lines.get(i + 2) != Some(&caret.as_str())
        {
            problems.push(format!(
                "no snippet and caret under: {l}\n    want: {snippet:?}\n    want: {caret:?}"
            ));
        }
    }
    // The summary, when printed, counts what was shown (unsupported items print as `error:`).
    // A YAML syntax error stops before loading and prints no summary: exactly one error then.
    match lines
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{name}: invalid: ")))
    {
        Some(summary) => {
            // `2 errors, 1 unsupported (--skip-unsupported runs the rest)`.
            let shown: usize = summary
                .split(", ")
                .filter_map(|p| p.split_whitespace().next()?.parse::<usize>().ok())
                .sum();
            if shown != errors {
                problems.push(format!(
                    "summary `{summary}` does not count the {errors} `error:` lines"
                ));
            }
        }
        None if errors == 1 => {}
        None => problems.push("no `invalid:` summary line".into()),
    }
    problems
}

#[test]
fn the_corpus_covers_at_least_sixty_files() {
    let files = corpus_files();
    assert!(
        files.len() >= 60,
        "only {} files under {}",
        files.len(),
        corpus_dir().display()
    );
    let multi = files
        .iter()
        .filter(|f| {
            header(f, &String::from_utf8_lossy(&std::fs::read(f).unwrap()))
                .expects
                .iter()
                .filter(|e| e.line.contains(": error: "))
                .count()
                >= 3
        })
        .count();
    assert!(
        multi >= 5,
        "only {multi} files pin three or more errors; several must prove all errors come at once"
    );
}

#[test]
fn every_broken_file_is_rejected_with_exactly_its_pinned_diagnostics() {
    let dir = corpus_dir();
    let mut failures = Vec::new();
    for path in corpus_files() {
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        // Lossy: one file of the corpus is deliberately not UTF-8.
        let source = String::from_utf8_lossy(&std::fs::read(&path).unwrap()).into_owned();
        let h = header(&path, &source);
        if h.expects.is_empty() {
            failures.push(format!("{name}: no `# expect:` lines"));
            continue;
        }
        let problems = if h.run {
            check_run(&dir, &name, &source, &h)
        } else {
            let out = run_stagehand(&dir, &["validate", &name]);
            check_output(&name, &source, &h, &out)
        };
        for p in problems {
            failures.push(format!("{name}: {p}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// What a `stagehand run` leaves behind outside its workspace and state dir: its run
/// directory (named in the `logs:` line).
#[derive(Default)]
struct RunLeftovers {
    run_dirs: Vec<PathBuf>,
}

impl Drop for RunLeftovers {
    fn drop(&mut self) {
        for d in &self.run_dirs {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

impl RunLeftovers {
    fn note(&mut self, out: &Output) {
        for l in String::from_utf8_lossy(&out.stderr).lines() {
            if let Some(logs) = l.strip_prefix("logs: ") {
                if let Some(run_dir) = Path::new(logs).parent().filter(|d| d.file_name().is_some())
                {
                    self.run_dirs.push(run_dir.to_path_buf());
                }
            }
        }
    }
}

fn check_run(dir: &Path, name: &str, source: &str, h: &Header) -> Vec<String> {
    let mut leftovers = RunLeftovers::default();
    let ws = tempfile::Builder::new()
        .prefix("stagehand-e2e-ws")
        .tempdir()
        .unwrap();
    // The run's counters (and store) go here, not to /var/lib/stagehand.
    let state = tempfile::Builder::new()
        .prefix("stagehand-e2e-state")
        .tempdir()
        .unwrap();
    let ws_path = ws.path().to_str().unwrap();
    let root = state.path().to_str().unwrap();
    let out = run_stagehand(dir, &["run", name, "--workspace", ws_path, "--root", root]);
    leftovers.note(&out);
    let mut problems = check_output(name, source, h, &out);
    if ws.path().join(MARKER).exists() {
        problems.push(format!(
            "a step ran although the file was rejected: {MARKER} exists"
        ));
    }
    let Some(control) = &h.control else {
        return problems;
    };
    let mut args = vec!["run", name, "--workspace", ws_path, "--root", root];
    args.extend(control.iter().map(String::as_str));
    let out = run_stagehand(dir, &args);
    leftovers.note(&out);
    if out.status.code() != Some(0) || !ws.path().join(MARKER).exists() {
        problems.push(format!(
            "control run with {control:?} did not pass and create {MARKER} (exit {:?}):\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    problems
}

#[test]
fn diag_pos_reads_only_diagnostic_lines() {
    assert_eq!(
        diag_pos("a.yaml", "a.yaml:12:22: error: unknown shell `Zsh`"),
        Some((12, 22))
    );
    assert_eq!(diag_pos("a.yaml", "a.yaml:1:1: warning: x"), Some((1, 1)));
    assert_eq!(diag_pos("a.yaml", "a.yaml: invalid: 1 error"), None);
    assert_eq!(diag_pos("a.yaml", "  hint: a.yaml:1:1: error: x"), None);
    assert_eq!(diag_pos("a.yaml", "b.yaml:1:1: error: x"), None);
}
