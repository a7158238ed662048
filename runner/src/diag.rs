//! Diagnostics: every problem found in a pipeline file, with its place.
//!
//! Owns: collecting errors, warnings and notes during loading and validation, and rendering them
//! as `file:line:col: error: message` with a source snippet. Does not own: deciding what is wrong
//! (that is `load`/`validate`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::yaml::Pos;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The file is invalid: nothing runs.
    Error,
    /// A construct stagehand cannot run. An error unless `--skip-unsupported`.
    Unsupported,
    /// Worth knowing; the run goes on.
    Warning,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Diag {
    pub severity: Severity,
    pub pos: Pos,
    pub message: String,
    pub hint: Option<String>,
}

/// All diagnostics of one file, plus the list of ignored keys (reported once, not per place).
#[derive(Debug, Default)]
pub struct Diagnostics {
    pub file: PathBuf,
    pub items: Vec<Diag>,
    /// Keys Harness knows that mean nothing locally, with how often each appeared.
    pub ignored: Vec<(String, usize)>,
}

impl Diagnostics {
    pub fn new(file: &Path) -> Self {
        Diagnostics {
            file: file.to_path_buf(),
            ..Default::default()
        }
    }

    pub fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(Severity::Error, pos, message.into(), None);
    }

    pub fn error_hint(&mut self, pos: Pos, message: impl Into<String>, hint: impl Into<String>) {
        self.push(Severity::Error, pos, message.into(), Some(hint.into()));
    }

    pub fn warning(&mut self, pos: Pos, message: impl Into<String>) {
        self.push(Severity::Warning, pos, message.into(), None);
    }

    pub fn unsupported(&mut self, pos: Pos, what: impl Into<String>) {
        let what = what.into();
        self.push(
            Severity::Unsupported,
            pos,
            format!("{what} is not supported by stagehand"),
            None,
        );
    }

    fn push(&mut self, severity: Severity, pos: Pos, message: String, hint: Option<String>) {
        self.items.push(Diag {
            severity,
            pos,
            message,
            hint,
        });
    }

    pub fn ignore(&mut self, key: &str) {
        match self.ignored.iter_mut().find(|(k, _)| k == key) {
            Some((_, n)) => *n += 1,
            None => self.ignored.push((key.to_string(), 1)),
        }
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|d| d.severity == Severity::Error)
    }

    pub fn has_unsupported(&self) -> bool {
        self.items
            .iter()
            .any(|d| d.severity == Severity::Unsupported)
    }

    pub fn count(&self, s: Severity) -> usize {
        self.items.iter().filter(|d| d.severity == s).count()
    }

    /// Sort by position so output reads top to bottom, and drop exact repeats.
    pub fn finish(&mut self) {
        self.items
            .sort_by(|a, b| a.pos.cmp(&b.pos).then(a.severity.cmp(&b.severity)));
        self.items.dedup();
    }

    /// Render every diagnostic as `file:line:col: severity: message`, a snippet and a caret.
    /// `skip_unsupported` turns "not supported" items into warnings in the rendering.
    pub fn render(&self, source: &str, skip_unsupported: bool) -> String {
        let lines: Vec<&str> = source.lines().collect();
        let file = self.file.display();
        let mut out = String::new();
        for d in &self.items {
            let label = match d.severity {
                Severity::Error => "error",
                Severity::Unsupported if skip_unsupported => "skipped",
                Severity::Unsupported => "error",
                Severity::Warning => "warning",
            };
            let _ = writeln!(
                out,
                "{file}:{}:{}: {label}: {}",
                d.pos.line, d.pos.col, d.message
            );
            if d.pos.line >= 1 {
                if let Some(text) = lines.get(d.pos.line as usize - 1) {
                    let n = d.pos.line.to_string();
                    let pad = " ".repeat(n.len());
                    let _ = writeln!(out, " {n} | {}", text.trim_end());
                    let caret_at = (d.pos.col as usize)
                        .saturating_sub(1)
                        .min(text.chars().count());
                    let _ = writeln!(out, " {pad} | {}^", " ".repeat(caret_at));
                }
            }
            if let Some(h) = &d.hint {
                let _ = writeln!(out, "  hint: {h}");
            }
        }
        if !self.ignored.is_empty() {
            let list: Vec<String> = self
                .ignored
                .iter()
                .map(|(k, n)| {
                    if *n > 1 {
                        format!("{k} (×{n})")
                    } else {
                        k.clone()
                    }
                })
                .collect();
            let _ = writeln!(
                out,
                "{file}: note: ignored (Harness settings with no meaning on a local runner): {}",
                list.join(", ")
            );
        }
        out
    }
}

/// The closest candidate to `word` by edit distance, if close enough to be a likely typo.
pub fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let lw = word.to_lowercase();
    candidates
        .iter()
        .map(|c| (levenshtein(&lw, &c.to_lowercase()), *c))
        .filter(|(d, c)| *d <= (c.len().max(word.len()) / 3).max(1) || lw == c.to_lowercase())
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counting a swap of two neighbours as one edit (optimal string alignment):
/// `prot` is one typo away from `port`.
fn levenshtein(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggests_close_keys_only() {
        assert_eq!(
            did_you_mean("comand", &["command", "connectorRef", "image"]),
            Some("command")
        );
        assert_eq!(
            did_you_mean("envVariable", &["envVariables", "entrypoint"]),
            Some("envVariables")
        );
        assert_eq!(
            did_you_mean("stagestatus", &["stageStatus", "condition"]),
            Some("stageStatus")
        );
        assert_eq!(did_you_mean("zzzzzz", &["command", "image"]), None);
    }

    #[test]
    fn renders_snippet_and_caret() {
        let mut d = Diagnostics::new(Path::new("p.yaml"));
        d.error(Pos { line: 2, col: 3 }, "unknown key `comand`");
        d.ignore("connectorRef");
        d.ignore("connectorRef");
        let out = d.render("a:\n  comand: x\n", false);
        assert!(
            out.starts_with(
                "p.yaml:2:3: error: unknown key `comand`\n 2 |   comand: x\n   |   ^\n"
            ),
            "{out}"
        );
        assert!(out.contains("connectorRef (×2)"), "{out}");
    }
}
