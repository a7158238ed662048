//! The typed pipeline model: what a Harness CI pipeline says, after loading and checking.
//!
//! Owns: the data types. Every user-written string keeps its position so later errors (a bad
//! expression at run time, a missing input) can still point at the file. Does not own: reading
//! YAML (`yaml`, `load`), deciding what runs when (`plan`, `schedule`).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::yaml::Pos;

/// A user-written string that may hold `<+...>` expressions, with where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Text {
    pub value: String,
    pub pos: Pos,
}

impl Text {
    pub fn new(value: impl Into<String>, pos: Pos) -> Self {
        Text {
            value: value.into(),
            pos,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Pipeline {
    pub name: String,
    pub identifier: String,
    pub variables: Vec<Variable>,
    pub stages: Vec<Stage>,
    /// True when the file held a bare `stage:` rather than a `pipeline:`.
    pub single_stage: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VarType {
    String,
    Number,
    Secret,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Variable {
    pub name: String,
    pub var_type: VarType,
    pub value: Text,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Stage {
    pub identifier: String,
    pub name: String,
    pub variables: Vec<Variable>,
    pub when: Option<When>,
    pub failure_strategies: Vec<FailureStrategy>,
    pub steps: Vec<Item>,
    pub volumes: Vec<Volume>,
    /// Set when the stage itself cannot run (a non-CI stage, a template); the reason is a diagnostic.
    pub unsupported: bool,
    pub pos: Pos,
}

/// An `infrastructure.spec.volumes` entry: an empty directory per stage at `mount_path`.
#[derive(Clone, Debug, PartialEq)]
pub struct Volume {
    pub mount_path: String,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    Step(Box<Step>),
    Parallel(Vec<Item>, Pos),
    Group(Group),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub identifier: String,
    pub name: String,
    pub steps: Vec<Item>,
    pub when: Option<When>,
    pub failure_strategies: Vec<FailureStrategy>,
    pub strategy: Option<Strategy>,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub enum StepKind {
    Run,
    Background,
    /// A Harness step type stagehand does not run (Plugin, GitClone, ...). Reported as unsupported;
    /// with `--skip-unsupported` it shows as skipped.
    Unsupported(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub identifier: String,
    pub name: String,
    pub kind: StepKind,
    pub timeout: Option<Timeout>,
    pub when: Option<When>,
    pub failure_strategies: Option<Vec<FailureStrategy>>,
    pub strategy: Option<Strategy>,
    pub spec: StepSpec,
    pub pos: Pos,
}

/// A timeout: a duration, or an expression resolved when the step runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Timeout {
    Fixed(Duration),
    Expr(Text),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shell {
    Sh,
    Bash,
    Python,
    Pwsh,
    PowerShell,
}

impl Shell {
    pub const NAMES: [&'static str; 6] =
        ["Sh", "Bash", "Python", "Pwsh", "PowerShell", "Powershell"];

    pub fn parse(s: &str) -> Option<Shell> {
        Some(match s.to_ascii_lowercase().as_str() {
            "sh" => Shell::Sh,
            "bash" => Shell::Bash,
            "python" => Shell::Python,
            "pwsh" => Shell::Pwsh,
            "powershell" => Shell::PowerShell,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Shell::Sh => "Sh",
            Shell::Bash => "Bash",
            Shell::Python => "Python",
            Shell::Pwsh => "Pwsh",
            Shell::PowerShell => "PowerShell",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct StepSpec {
    pub image: Option<Text>,
    pub shell: Option<Shell>,
    pub command: Option<Text>,
    pub entrypoint: Vec<Text>,
    /// In file order; values may hold expressions.
    pub env: Vec<(String, Text)>,
    pub port_bindings: Vec<PortBinding>,
    pub privileged: bool,
    pub run_as_user: Option<Text>,
    pub pull_policy: Option<PullPolicy>,
    /// Bytes.
    pub memory: Option<u64>,
    /// Millicpus.
    pub cpu: Option<u64>,
    pub reports: Vec<Text>,
    pub output_variables: Vec<OutputVariable>,
    /// stagehand extension on Background steps: when the service counts as ready.
    pub health_check: Option<HealthCheck>,
    /// stagehand extension on Run steps: wait only for these services (step ids).
    pub depends_on: Vec<Text>,
}

/// How readiness is probed.
#[derive(Clone, Debug, PartialEq)]
pub enum Probe {
    /// A TCP connect to 127.0.0.1:PORT in the stage network.
    Tcp(u16),
    /// An HTTP GET; `status` None means any 2xx.
    Http {
        port: u16,
        path: String,
        status: Option<u16>,
    },
    /// A command run in the service's environment; exit 0 means ready.
    Exec(Text),
    /// A line of the service's output matching this regular expression.
    Log(String),
}

/// `healthCheck` of a Background step (a stagehand extension; Docker HEALTHCHECK semantics).
#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheck {
    pub probe: Probe,
    pub interval: std::time::Duration,
    /// Per probe.
    pub timeout: std::time::Duration,
    /// Failures during this period do not count against `retries`.
    pub start_period: std::time::Duration,
    /// Consecutive failed probes (after `start_period`) that make the service failed.
    pub retries: Option<u32>,
    /// Not ready by then: failed.
    pub deadline: std::time::Duration,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PortBinding {
    pub host: u16,
    pub container: u16,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutputVariable {
    pub name: String,
    pub secret: bool,
    pub pos: Pos,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusGate {
    Success,
    Failure,
    All,
}

#[derive(Clone, Debug, PartialEq)]
pub struct When {
    pub status: StatusGate,
    pub condition: Option<Text>,
    pub pos: Pos,
}

/// Which failures a strategy covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    All,
    Timeout,
    /// Every other Harness error type (Unknown, Authentication, ...): a local run has one kind
    /// of non-timeout failure, so these all match it.
    Other,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Ignore,
    MarkAsSuccess,
    MarkAsFailure,
    Abort,
    Retry {
        count: u32,
        intervals: Vec<Duration>,
        on_retry_failure: Box<Action>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct FailureStrategy {
    pub errors: Vec<ErrorKind>,
    pub action: Action,
    pub pos: Pos,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Strategy {
    Matrix {
        /// Axis name → values, in file order.
        axes: Vec<(String, Vec<String>)>,
        exclude: Vec<BTreeMap<String, String>>,
        max_concurrency: Option<usize>,
        pos: Pos,
    },
    Parallelism {
        count: usize,
        pos: Pos,
    },
    Repeat {
        items: RepeatItems,
        max_concurrency: Option<usize>,
        pos: Pos,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum RepeatItems {
    Times(usize),
    Items(Vec<String>),
}
