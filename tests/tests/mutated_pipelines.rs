//! Mutated pipelines: thousands of deterministic corruptions of real pipelines, each loaded and
//! validated in process, as `stagehand validate` does.
//!
//! Owns: generating the mutations (a seeded xorshift PRNG, so every run tries the same files)
//! from the real-pipeline corpus (`shared/corpus/harness-pipelines/`), `examples/` and
//! `tests/pipelines/`, and asserting for each that stagehand does not panic, finishes, and
//! places every diagnostic at a `line:col` inside the file. Does not own: the checks
//! themselves (`runner/src/yaml.rs`, `load.rs`, `validate.rs`, `inputs.rs`).
//!
//! A failing case is written under `CARGO_TARGET_TMPDIR/mutated-failures/` so it can be
//! replayed with `stagehand validate FILE`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use stagehand::diag::Diagnostics;
use stagehand_e2e::bin_path::workspace_root;

/// xorshift64*: tiny, deterministic, good enough to pick lines and bytes.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point.
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15 | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// FNV-1a, to seed each file's mutations from its name (stable across runs and machines).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// What replaces a scalar: YAML and expression syntax at its most awkward.
const REPLACEMENTS: &[&str] = &[
    "[",
    "{",
    "<+",
    "*a",
    "&a",
    "&a [*a, *a]",
    "<<: *a",
    "99999999999999999999999999",
    "-9223372036854775809",
    "1e999",
    "\0",
    "~",
    "\"\"",
    "''",
    "!!binary AAAA",
    "!custom x",
    "<+input>.allowedValues(",
    "<+input>.regex([)",
    "<+input>.default(x).allowedValues(y)",
    "<+steps.x.output.outputVariables.y>",
    "<+pipeline.stages.s.spec.execution.steps.g.steps.x.output.outputVariables.v>",
    "<+secrets.getValue(>",
    "<+a.b(c, d, [e])> == <+f>",
    "<+<+<+>>>",
    "\"<+matrix.\"",
    "? x",
    "- -",
    "|",
    ">-",
    "@",
    "`",
    "%YAML 1.2",
    "\u{FEFF}",
    "\u{1F600}\u{301}",
    "0x7FFFFFFFFFFFFFFF",
    "0o777",
    ".nan",
    "-.inf",
    "1000001",
    "0",
    "-1",
];

/// One mutation of `text`, described for the failure report.
fn mutate(text: &[u8], rng: &mut Rng) -> (Vec<u8>, String) {
    let lines: Vec<&[u8]> = text.split_inclusive(|b| *b == b'\n').collect();
    let join = |ls: Vec<&[u8]>| -> Vec<u8> { ls.concat() };
    let n = lines.len().max(1);
    match rng.below(12) {
        0 if !lines.is_empty() => {
            let i = rng.below(n);
            let mut ls = lines.clone();
            ls.remove(i);
            (join(ls), format!("delete line {}", i + 1))
        }
        1 if !lines.is_empty() => {
            let i = rng.below(n);
            let mut ls = lines.clone();
            ls.insert(i, lines[i]);
            (join(ls), format!("duplicate line {}", i + 1))
        }
        2 if lines.len() >= 2 => {
            let (i, j) = (rng.below(n), rng.below(n));
            let mut ls = lines.clone();
            ls.swap(i, j);
            (join(ls), format!("swap lines {} and {}", i + 1, j + 1))
        }
        3 => {
            let at = rng.below(text.len() + 1);
            (text[..at].to_vec(), format!("truncate at byte {at}"))
        }
        4 if !lines.is_empty() => {
            let i = rng.below(n);
            let mut ls: Vec<Vec<u8>> = lines.iter().map(|l| l.to_vec()).collect();
            let l = &mut ls[i];
            let how = rng.below(4);
            match how {
                0 => {
                    l.splice(0..0, *b"  ");
                }
                1 => {
                    l.insert(0, b'\t');
                }
                _ => {
                    let k = l.iter().take_while(|b| **b == b' ').count().min(1 + how);
                    l.drain(0..k);
                }
            }
            (ls.concat(), format!("reindent line {} ({how})", i + 1))
        }
        5..=7 if !lines.is_empty() => {
            // Replace the value after `: ` (or a list item's `- `) with something awkward.
            let i = rng.below(n);
            let r = REPLACEMENTS[rng.below(REPLACEMENTS.len())];
            let l = lines[i];
            let cut = find(l, b": ")
                .map(|p| p + 2)
                .or_else(|| find(l, b"- ").map(|p| p + 2))
                .unwrap_or(l.iter().take_while(|b| **b == b' ').count());
            let end = if l.ends_with(b"\r\n") {
                l.len() - 2
            } else if l.ends_with(b"\n") {
                l.len() - 1
            } else {
                l.len()
            };
            let mut nl = l[..cut.min(end)].to_vec();
            nl.extend_from_slice(r.as_bytes());
            nl.extend_from_slice(&l[end..]);
            let mut ls = lines.clone();
            ls[i] = &nl;
            (join(ls), format!("line {}: value -> {r:?}", i + 1))
        }
        8 if !text.is_empty() => {
            let at = rng.below(text.len());
            let bit = rng.below(8);
            let mut t = text.to_vec();
            t[at] ^= 1 << bit;
            (t, format!("flip bit {bit} of byte {at}"))
        }
        9 if !text.is_empty() => {
            let at = rng.below(text.len());
            let b = [
                0u8, b'\t', b'\r', 0xff, b'"', b'\'', b'#', b':', b'&', b'*', b'<', b'>',
            ];
            let ins = b[rng.below(b.len())];
            let mut t = text.to_vec();
            t.insert(at, ins);
            (t, format!("insert byte {ins:#x} at {at}"))
        }
        10 => {
            let crlf: Vec<u8> = text
                .iter()
                .flat_map(|b| {
                    if *b == b'\n' {
                        vec![b'\r', b'\n']
                    } else {
                        vec![*b]
                    }
                })
                .collect();
            let mut t = b"\xEF\xBB\xBF".to_vec();
            t.extend(crlf);
            (t, "BOM and CRLF line endings".into())
        }
        _ => {
            // Two mutations at once: errors that interact.
            let (t, a) = mutate(text, rng);
            let (t, b) = mutate(&t, rng);
            (t, format!("{a}; then {b}"))
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Parse, resolve inputs, load, validate and render, as `stagehand validate` does; every
/// problem with the diagnostics' places, as messages.
fn check(path: &Path, text: &str) -> Vec<String> {
    let (mut diags, _) = stagehand::validate::check_source(
        path,
        text,
        &stagehand::inputs::InputValues::default(),
        false,
    );
    diags.finish();
    let _ = diags.render(text, false);
    misplaced(&diags, text)
}

/// Each diagnostic whose `line:col` is not inside `text`, as a message.
fn misplaced(diags: &Diagnostics, text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut problems = Vec::new();
    for d in &diags.items {
        let (l, c) = (d.pos.line as usize, d.pos.col as usize);
        // An empty file has no line 1, yet 1:1 is where its (only) problem is.
        let in_bounds = (l, c) == (1, 1)
            || (l >= 1
                && c >= 1
                && lines
                    .get(l - 1)
                    .is_some_and(|line| c <= line.chars().count() + 1));
        if !in_bounds {
            problems.push(format!(
                "{:?} at {l}:{c} is outside the file ({} lines): {}",
                d.severity,
                lines.len(),
                d.message
            ));
        }
    }
    problems
}

/// The pipelines to mutate: the real-pipeline corpus, `examples/` and `tests/pipelines/`.
fn sources() -> Vec<PathBuf> {
    let root = workspace_root();
    let corpus = root.join("../shared/corpus/harness-pipelines");
    assert!(
        corpus.is_dir(),
        "the real-pipeline corpus is missing: expected {}",
        corpus.display()
    );
    let mut files = Vec::new();
    for dir in [corpus, root.join("examples"), root.join("tests/pipelines")] {
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        for e in entries {
            let p = e.expect("read a directory entry").path();
            if p.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

struct Case {
    source: String,
    index: usize,
    what: String,
    text: String,
}

#[test]
fn mutated_pipelines_never_panic_and_place_every_diagnostic_inside_the_file() {
    let files = sources();
    assert!(
        files.len() >= 100,
        "only {} pipelines to mutate",
        files.len()
    );
    let mut cases = Vec::new();
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let mut rng = Rng::new(fnv(&name));
        // Fewer mutations of the largest files keep the whole run within seconds in debug.
        let count = (300_000 / bytes.len().max(1)).clamp(6, 45);
        for index in 0..count {
            let (m, what) = mutate(&bytes, &mut rng);
            // The CLI refuses non-UTF-8 files before parsing; the parser still sees the
            // replacement characters here.
            let text = String::from_utf8_lossy(&m).into_owned();
            cases.push(Case {
                source: name.clone(),
                index,
                what,
                text,
            });
        }
    }
    let total = cases.len();
    assert!(total >= 3000, "only {total} mutations");

    // A worker thread does the work; the test waits on its progress, so a case that never
    // finishes fails the test (naming the case) instead of hanging it.
    let (tx, rx) = mpsc::channel::<(usize, Result<Vec<String>, String>)>();
    let cases = std::sync::Arc::new(cases);
    let worker_cases = cases.clone();
    let prev_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    std::thread::Builder::new()
        .name("mutations".into())
        .stack_size(64 << 20)
        .spawn(move || {
            for (i, c) in worker_cases.iter().enumerate() {
                let path = PathBuf::from(format!("{}.{}.yaml", c.source, c.index));
                let r = catch_unwind(AssertUnwindSafe(|| check(&path, &c.text))).map_err(|p| {
                    p.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "a panic".into())
                });
                if tx.send((i, r)).is_err() {
                    return;
                }
            }
        })
        .unwrap();
    let mut failures = Vec::new();
    let fail_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mutated-failures");
    for done in 0..total {
        let (i, r) = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(x) => x,
            Err(_) => {
                let c = &cases[done];
                std::panic::set_hook(prev_hook);
                let file = save(&fail_dir, c);
                panic!(
                    "no answer within 20 s for {} #{} ({}): saved as {}",
                    c.source,
                    c.index,
                    c.what,
                    file.display()
                );
            }
        };
        let c = &cases[i];
        let problems = match r {
            Ok(p) => p,
            Err(panic) => vec![format!("panicked: {panic}")],
        };
        if !problems.is_empty() {
            let file = save(&fail_dir, c);
            failures.push(format!(
                "{} #{} ({}), saved as {}:\n  {}",
                c.source,
                c.index,
                c.what,
                file.display(),
                problems.join("\n  ")
            ));
        }
    }
    std::panic::set_hook(prev_hook);
    let took = started.elapsed();
    eprintln!(
        "{total} mutations of {} pipelines in {took:.2?} ({:.0}/s)",
        files.len(),
        total as f64 / took.as_secs_f64()
    );
    assert!(
        failures.is_empty(),
        "{} of {total} mutations failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn save(dir: &Path, c: &Case) -> PathBuf {
    let _ = std::fs::create_dir_all(dir);
    let file = dir.join(format!("{}.{}.yaml", c.source, c.index));
    let _ = std::fs::write(&file, &c.text);
    file
}

#[test]
fn the_rng_and_mutations_are_deterministic() {
    let text = b"pipeline:\n  identifier: p\n  stages: []\n";
    let run = || {
        let mut rng = Rng::new(fnv("x.yaml"));
        (0..50).map(|_| mutate(text, &mut rng)).collect::<Vec<_>>()
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    // Different mutations, not one repeated.
    let distinct: std::collections::HashSet<&Vec<u8>> = a.iter().map(|(t, _)| t).collect();
    assert!(
        distinct.len() > 25,
        "only {} distinct mutations",
        distinct.len()
    );
}

#[test]
fn misplaced_diagnostics_are_caught() {
    let text = "a: 1\nbb: 2\n";
    let mut d = Diagnostics::new(Path::new("x.yaml"));
    d.error(stagehand::yaml::Pos { line: 2, col: 6 }, "end of line 2");
    d.error(stagehand::yaml::Pos { line: 1, col: 1 }, "start");
    assert!(misplaced(&d, text).is_empty());
    d.error(
        stagehand::yaml::Pos { line: 3, col: 1 },
        "past the last line",
    );
    d.error(
        stagehand::yaml::Pos { line: 1, col: 6 },
        "past the line's end",
    );
    d.error(stagehand::yaml::Pos { line: 0, col: 0 }, "nowhere");
    assert_eq!(misplaced(&d, text).len(), 3, "{:?}", misplaced(&d, text));
    // An empty document is reported at its first line, not past its end.
    assert!(check(Path::new("e.yaml"), "# only a comment\n").is_empty());
}
