//! Helpers for the readiness suite (`tests/tests/readiness_e2e.rs`): what a run says about its
//! services' readiness and its test reports, read back from the run directory and stdout.
//!
//! Owns: checking the host has the servers the suite runs (Redis, PostgreSQL), reading a run's
//! `summary.json` into typed rows (per-step timings in ms since the stage started), parsing the
//! block stagehand prints when a service fails (`!!! service X failed: ...` and its last lines),
//! and picking the report lines printed under the stage table (`tests:`, `failed:`,
//! `warning:`...). Does not own: starting stagehand, markers, leak checks or the stage-gone check
//! ([`crate::e2e`], [`crate::sandbox`]), or parsing JUnit XML (the suite checks `junit.xml` with
//! `quick-xml`, a dev-dependency).

use std::path::{Path, PathBuf};

use crate::e2e::Finished;

/// Where Debian's `redis-server` package installs the server.
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";

/// Panic with the way to fix it unless `redis-server` and `redis-cli` are installed.
pub fn require_redis() {
    for bin in [REDIS_SERVER, "/usr/bin/redis-cli"] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: the readiness suite runs Redis (apt-get install -y redis-server)"
        );
    }
}

/// Panic with the way to fix it unless PostgreSQL's server binaries, `pg_isready` and `psql`
/// are installed (the fixture entrypoint finds the server under /usr/lib/postgresql).
pub fn require_postgres() {
    let server = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| e.path().join("bin").join("postgres").is_file());
    assert!(
        server,
        "no PostgreSQL server under /usr/lib/postgresql (apt-get install -y postgresql)"
    );
    for bin in ["/usr/bin/pg_isready", "/usr/bin/psql"] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing (apt-get install -y postgresql-client)"
        );
    }
}

/// One step's row of `summary.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepRow {
    pub id: String,
    /// `run` or `service`.
    pub kind: String,
    /// The verdict as the stage table shows it (`passed`, `FAILED`, `aborted`, `skipped (...)`).
    pub result: String,
    pub message: Option<String>,
    /// Milliseconds since the stage started: the step's start (a Run step: after waiting for
    /// its services), a service's readiness, the step's end (a service: when it was stopped).
    pub started_ms: Option<u64>,
    pub ready_ms: Option<u64>,
    pub finished_ms: Option<u64>,
}

impl StepRow {
    /// `started_ms`, which a step that ran must have.
    pub fn started(&self) -> u64 {
        self.started_ms
            .unwrap_or_else(|| panic!("step {} has no started_ms: {self:?}", self.id))
    }

    /// `ready_ms`, which a service that became ready must have.
    pub fn ready(&self) -> u64 {
        self.ready_ms
            .unwrap_or_else(|| panic!("step {} has no ready_ms: {self:?}", self.id))
    }

    /// `finished_ms`, which a step that ended must have.
    pub fn finished(&self) -> u64 {
        self.finished_ms
            .unwrap_or_else(|| panic!("step {} has no finished_ms: {self:?}", self.id))
    }
}

/// One stage of `summary.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRow {
    pub stage: String,
    /// `Success`, `Failed` or `Aborted`.
    pub status: String,
    /// The stage's merged report, when one was written.
    pub junit: Option<PathBuf>,
    pub steps: Vec<StepRow>,
}

impl StageRow {
    /// The row of step `id`; panics listing the steps there are.
    pub fn step(&self, id: &str) -> &StepRow {
        self.steps.iter().find(|s| s.id == id).unwrap_or_else(|| {
            panic!(
                "summary.json has no step {id} in stage {}: {:?}",
                self.stage, self.steps
            )
        })
    }
}

/// Parse the text of a `summary.json`.
pub fn parse_summary(text: &str) -> Result<Vec<StageRow>, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let stages = v["stages"].as_array().ok_or("no `stages` array")?;
    let string = |v: &serde_json::Value, key: &str| -> Result<String, String> {
        v[key]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("`{key}` is not a string in {v}"))
    };
    let mut out = Vec::new();
    for s in stages {
        let mut steps = Vec::new();
        for st in s["steps"]
            .as_array()
            .ok_or("a stage has no `steps` array")?
        {
            steps.push(StepRow {
                id: string(st, "id")?,
                kind: string(st, "kind")?,
                result: string(st, "result")?,
                message: st["message"].as_str().map(str::to_string),
                started_ms: st["started_ms"].as_u64(),
                ready_ms: st["ready_ms"].as_u64(),
                finished_ms: st["finished_ms"].as_u64(),
            });
        }
        out.push(StageRow {
            stage: string(s, "stage")?,
            status: string(s, "status")?,
            junit: s["junit"].as_str().map(PathBuf::from),
            steps,
        });
    }
    Ok(out)
}

/// Stage `stage` of the run's `<run dir>/summary.json`; panics with the whole output if the
/// file or the stage is missing.
pub fn summary_stage(out: &Finished, stage: &str) -> StageRow {
    let dir = out
        .run_dir
        .as_ref()
        .unwrap_or_else(|| panic!("stagehand reported no run directory\n{}", out.dump()));
    let path = dir.join("summary.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}\n{}", path.display(), out.dump()));
    let stages = parse_summary(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()));
    stages
        .into_iter()
        .find(|s| s.stage == stage)
        .unwrap_or_else(|| panic!("{} has no stage {stage}:\n{text}", path.display()))
}

/// What stagehand printed when service `id` failed while the stage ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFailure {
    /// The text after `!!! service ID failed: `.
    pub why: String,
    /// The service's last lines, from the `    | line` rows under `    last N lines of ID:`
    /// (empty when no such block follows).
    pub tail: Vec<String>,
}

/// The first `!!! service ID failed: WHY` report in `stdout`, with the tail block below it.
/// Panics if the block's `last N lines` does not match the rows that follow.
pub fn service_failure(stdout: &str, id: &str) -> Option<ServiceFailure> {
    let prefix = format!("!!! service {id} failed: ");
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with(&prefix));
    let why = lines.next()?.strip_prefix(&prefix)?.to_string();
    let mut tail = Vec::new();
    let header_end = format!(" lines of {id}:");
    let announced = lines.next().and_then(|l| {
        if l == format!("    last line of {id}:") {
            return Some(1);
        }
        l.strip_prefix("    last ")?
            .strip_suffix(&header_end)?
            .parse::<usize>()
            .ok()
    });
    if let Some(n) = announced {
        tail.extend(
            lines
                .take(n)
                .map_while(|l| l.strip_prefix("    | ").or_else(|| l.strip_prefix("    |")))
                .map(str::to_string),
        );
        assert_eq!(
            tail.len(),
            n,
            "`last {n} lines of {id}` is followed by {} rows: {tail:?}",
            tail.len()
        );
    }
    Some(ServiceFailure { why, tail })
}

/// The report lines under the last stage table (`tests: ...`, `slowest: ...`, `failed: ...`,
/// `error: ...`, `flaky: ...`, `warning: ...`), without their two-space indent.
pub fn report_lines(stdout: &str) -> Vec<String> {
    const KINDS: [&str; 6] = [
        "tests: ",
        "slowest: ",
        "failed: ",
        "error: ",
        "flaky: ",
        "warning: ",
    ];
    let table = stdout
        .rsplit_once("\n  step ")
        .map(|(_, t)| t)
        .unwrap_or("");
    table
        .lines()
        .filter_map(|l| l.strip_prefix("  "))
        .filter(|l| KINDS.iter().any(|k| l.starts_with(k)))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUMMARY: &str = r#"{"stages":[{"stage":"build","status":"Failed","duration_ms":40,
        "junit":"/run/stagehand/abc/junit-build.xml","steps":[
        {"id":"db","name":"postgres","kind":"service","result":"started","message":null,
         "duration_ms":5,"attempts":1,"started_ms":0,"ready_ms":1799,"finished_ms":1974},
        {"id":"use","name":"use","kind":"run","result":"skipped (x)","message":null,
         "duration_ms":null,"attempts":0,"started_ms":null,"ready_ms":null,"finished_ms":null}
        ]}]}"#;

    #[test]
    fn parses_summary_json() {
        let stages = parse_summary(SUMMARY).unwrap();
        assert_eq!(stages.len(), 1);
        let s = &stages[0];
        assert_eq!((s.stage.as_str(), s.status.as_str()), ("build", "Failed"));
        assert_eq!(
            s.junit.as_deref(),
            Some(Path::new("/run/stagehand/abc/junit-build.xml"))
        );
        let db = s.step("db");
        assert_eq!(
            (db.kind.as_str(), db.started(), db.ready()),
            ("service", 0, 1799)
        );
        assert_eq!(db.finished(), 1974);
        let skipped = s.step("use");
        assert_eq!(skipped.result, "skipped (x)");
        assert_eq!(
            (skipped.started_ms, skipped.ready_ms, skipped.finished_ms),
            (None, None, None)
        );
        assert!(parse_summary("{}").is_err());
        assert!(parse_summary("not json").is_err());
    }

    #[test]
    fn parses_a_service_failure_and_its_tail() {
        let stdout = "<-- flaky started (3ms)\n\
            !!! service flaky failed: exited after 3ms: exit code 3, before it was ready\n    \
            last 2 lines of flaky:\n    | one\n    | two\n<-- use skipped (x)\n";
        assert_eq!(
            service_failure(stdout, "flaky"),
            Some(ServiceFailure {
                why: "exited after 3ms: exit code 3, before it was ready".into(),
                tail: vec!["one".into(), "two".into()],
            })
        );
        assert_eq!(service_failure(stdout, "other"), None);
        let silent = "!!! service q failed: no output line matched\n<-- use skipped\n";
        assert_eq!(
            service_failure(silent, "q").unwrap().tail,
            Vec::<String>::new()
        );
    }

    #[test]
    #[should_panic(expected = "followed by 1 rows")]
    fn a_short_tail_block_is_an_error() {
        service_failure(
            "!!! service s failed: x\n    last 2 lines of s:\n    | one\nstage FAILED\n",
            "s",
        );
    }

    #[test]
    fn report_lines_come_from_under_the_last_table() {
        let stdout = "tests | failed: not a report line\nstage build FAILED in 38ms\n  \
            step   kind  time  result\n  tests  run   14ms  FAILED: exit code 1\n  \
            tests: 1 passed, 1 failed, 0 errors, 0 skipped (1 file, 5ms)\n  \
            failed: a::b — boom\n  warning: report x.xml is not valid JUnit XML: y\n\nlogs: z\n";
        assert_eq!(
            report_lines(stdout),
            [
                "tests: 1 passed, 1 failed, 0 errors, 0 skipped (1 file, 5ms)",
                "failed: a::b — boom",
                "warning: report x.xml is not valid JUnit XML: y"
            ]
        );
        assert!(report_lines("no table here").is_empty());
    }
}
