//! What the user reads while a stage runs: step output prefixed by step id, start and finish
//! lines, the summary table; and the per-step log files.
//!
//! Owns: formatting, colour on a TTY, masking secrets in everything printed or written, and
//! `<run dir>/logs/<step>.log` (each line with a timestamp). Does not own: what happened (the
//! scheduler tells it). Diagnostics for developers go through `tracing`, not here.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::context::Secrets;
use crate::exec::LineSink;

pub struct Console {
    secrets: Arc<Secrets>,
    color: bool,
    quiet: bool,
    /// `--output json`: one JSON event per line instead of text.
    json: bool,
    /// The stage running now (stages run one after another).
    stage: Mutex<String>,
    width: Mutex<usize>,
    logs_dir: Option<PathBuf>,
    files: Mutex<HashMap<String, File>>,
    out: Mutex<Box<dyn Write + Send>>,
}

const PALETTE: [u8; 6] = [36, 33, 35, 32, 34, 96];

impl Console {
    pub fn new(secrets: Arc<Secrets>, logs_dir: Option<PathBuf>, quiet: bool) -> Console {
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Console {
            secrets,
            color,
            quiet,
            json: false,
            stage: Mutex::new(String::new()),
            width: Mutex::new(8),
            logs_dir,
            files: Mutex::new(HashMap::new()),
            out: Mutex::new(Box::new(std::io::stdout())),
        }
    }

    /// Align prefixes to the longest step id of the stage.
    pub fn set_width(&self, ids: &[String]) {
        let w = ids
            .iter()
            .map(|s| s.chars().count())
            .max()
            .unwrap_or(8)
            .clamp(4, 40);
        *self.width.lock().unwrap_or_else(|e| e.into_inner()) = w;
    }

    fn paint(&self, step: &str, text: &str) -> String {
        if !self.color {
            return text.to_string();
        }
        let h = step
            .bytes()
            .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
        let c = PALETTE[(h as usize) % PALETTE.len()];
        format!("\x1b[{c}m{text}\x1b[0m")
    }

    fn emit(&self, text: &str) {
        let masked = self.secrets.mask(text);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "{masked}");
        let _ = out.flush();
    }

    /// Print one JSON event per line (`--output json`) instead of text.
    pub fn with_json(mut self, json: bool) -> Console {
        self.json = json;
        if json {
            self.color = false;
        }
        self
    }

    /// One event of `--output json`: every string in it is masked before it is serialized
    /// (masking the JSON text would miss a secret that JSON escapes).
    fn event(&self, kind: &str, mut fields: serde_json::Map<String, serde_json::Value>) {
        fields.insert("event".into(), kind.into());
        fields.insert("time".into(), timestamp().into());
        let mut v = serde_json::Value::Object(fields);
        self.secrets.mask_json(&mut v);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }

    pub fn is_json(&self) -> bool {
        self.json
    }

    /// A status line (always shown, also with `--quiet`).
    pub fn status(&self, text: &str) {
        if self.json {
            return self.event("message", obj([("text", text.into())]));
        }
        self.emit(text);
    }

    pub fn stage_start(&self, id: &str, name: &str) {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = id.to_string();
        if let Some(dir) = self.stage_logs() {
            let _ = std::fs::create_dir_all(dir);
        }
        if self.json {
            return self.event(
                "stage_started",
                obj([("stage", id.into()), ("name", name.into())]),
            );
        }
        self.status(&format!("==> stage {id} ({name})"));
    }

    /// The end of a stage: the summary text, or a `stage_finished` event with the report.
    pub fn stage_end(&self, summary: &str, report: serde_json::Value) {
        // The stage's steps are done: their log files must not stay open for the whole run.
        self.files.lock().unwrap_or_else(|e| e.into_inner()).clear();
        if self.json {
            let mut m = match report {
                serde_json::Value::Object(m) => m,
                other => obj([("report", other)]),
            };
            m.insert("summary".into(), summary.into());
            return self.event("stage_finished", m);
        }
        self.emit(summary);
    }

    pub fn service_ready(&self, id: &str, after: Duration) {
        if self.json {
            return self.event(
                "service_ready",
                obj([
                    ("step", id.into()),
                    ("after_ms", (after.as_millis() as u64).into()),
                ]),
            );
        }
        let label = self.paint(id, id);
        self.emit(&format!(
            "<-- {label} ready ({})",
            crate::units::format_duration(after)
        ));
    }

    pub fn service_died(&self, id: &str, why: &str) {
        if self.json {
            return self.event(
                "service_died",
                obj([("step", id.into()), ("reason", why.into())]),
            );
        }
        self.emit(&format!("!!! service {id} failed: {why}"));
    }

    pub fn step_start(&self, id: &str, what: &str) {
        if self.json {
            self.log_line(id, &format!("--- {what}"));
            return self.event(
                "step_started",
                obj([("step", id.into()), ("detail", what.into())]),
            );
        }
        let label = self.paint(id, id);
        self.status(&format!("--> {label} {what}"));
        self.log_line(id, &format!("--- {what}"));
    }

    pub fn step_end(&self, id: &str, verdict: &str, took: Option<Duration>) {
        if self.json {
            self.log_line(id, &format!("--- {verdict}"));
            let ms = took
                .map(|d| serde_json::Value::from(d.as_millis() as u64))
                .unwrap_or(serde_json::Value::Null);
            return self.event(
                "step_finished",
                obj([
                    ("step", id.into()),
                    ("result", verdict.into()),
                    ("duration_ms", ms),
                ]),
            );
        }
        let label = self.paint(id, id);
        let took = took
            .map(|d| format!(" ({})", crate::units::format_duration(d)))
            .unwrap_or_default();
        self.status(&format!("<-- {label} {verdict}{took}"));
        self.log_line(id, &format!("--- {verdict}{took}"));
    }

    /// `<logs>/<stage>/`: one directory per stage, so a step id used in two stages keeps two logs.
    fn stage_logs(&self) -> Option<PathBuf> {
        let dir = self.logs_dir.as_ref()?;
        let stage = self.stage.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Some(if stage.is_empty() {
            dir.clone()
        } else {
            dir.join(stage)
        })
    }

    fn log_line(&self, step: &str, line: &str) {
        let Some(dir) = self.stage_logs() else { return };
        let masked = self.secrets.mask(line);
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let f = match files.get_mut(step) {
            Some(f) => f,
            None => match File::options()
                .create(true)
                .append(true)
                .open(dir.join(format!("{step}.log")))
            {
                Ok(f) => files.entry(step.to_string()).or_insert(f),
                Err(_) => return,
            },
        };
        let _ = writeln!(f, "{} {masked}", timestamp());
    }

    /// The last `n` lines of a step's log (without timestamps), for failure reports.
    pub fn tail(&self, step: &str, n: usize) -> Vec<String> {
        let Some(dir) = self.stage_logs() else {
            return vec![];
        };
        let text = std::fs::read_to_string(dir.join(format!("{step}.log"))).unwrap_or_default();
        let lines: Vec<String> = text
            .lines()
            .filter(|l| {
                !l.split_once(' ')
                    .is_some_and(|(_, r)| r.starts_with("--- "))
            })
            .map(|l| {
                l.split_once(' ')
                    .map(|(_, r)| r.to_string())
                    .unwrap_or_default()
            })
            .collect();
        lines[lines.len().saturating_sub(n)..].to_vec()
    }

    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    pub fn logs_dir(&self) -> Option<&Path> {
        self.logs_dir.as_deref()
    }
}

impl LineSink for Console {
    fn line(&self, step: &str, line: &str) {
        self.log_line(step, line);
        if self.quiet {
            return;
        }
        if self.json {
            return self.event(
                "output",
                obj([("step", step.into()), ("line", line.into())]),
            );
        }
        let w = *self.width.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = format!("{step:<w$} |");
        self.emit(&format!("{} {line}", self.paint(step, &prefix)));
    }
}

fn obj<const N: usize>(
    pairs: [(&str, serde_json::Value); N],
) -> serde_json::Map<String, serde_json::Value> {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// RFC 3339 UTC with milliseconds, without a date crate.
pub fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{:03}Z",
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_shape() {
        let t = timestamp();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    #[test]
    fn json_events_are_masked_field_by_field() {
        let secrets = Arc::new(Secrets::new(
            [("pw".to_string(), "a\"b".to_string())].into(),
        ));
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        struct W(Arc<Mutex<Vec<u8>>>);
        impl Write for W {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let c = Console::new(secrets, None, false).with_json(true);
        *c.out.lock().unwrap() = Box::new(W(buf.clone()));
        c.line("Run_1", "pw is a\"b");
        c.step_end("Run_1", "passed", Some(Duration::from_millis(12)));
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events[0]["event"], "output");
        assert_eq!(events[0]["line"], "pw is **************");
        assert_eq!(events[1]["event"], "step_finished");
        assert_eq!(events[1]["duration_ms"], 12);
    }

    #[test]
    fn log_files_are_masked_and_tailed() {
        let dir = tempfile::tempdir().unwrap();
        let secrets = Arc::new(Secrets::new(
            [("pw".to_string(), "s3cret".to_string())].into(),
        ));
        let c = Console::new(secrets, Some(dir.path().to_path_buf()), true);
        c.step_start("Run_1", "started");
        c.line("Run_1", "password is s3cret");
        c.line("Run_1", "second");
        let log = std::fs::read_to_string(dir.path().join("Run_1.log")).unwrap();
        assert!(
            !log.contains("s3cret") && log.contains("password is **************"),
            "{log}"
        );
        assert_eq!(c.tail("Run_1", 1), ["second"]);
    }
}
