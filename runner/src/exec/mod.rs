//! Step executors: how a resolved step becomes running processes.
//!
//! Owns: the [`Executor`] seam between the scheduler and the ways a step can run (on the host
//! now; in an OCI container later), and [`ResolvedStep`], a step with every expression already
//! rendered. Does not own: when a step runs or what its failure means (`schedule`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::model::{PullPolicy, Shell};

pub mod container;
#[cfg(feature = "containerd")]
pub mod containerd;
pub mod host;

/// A step ready to run: nothing left to evaluate.
#[derive(Clone, Debug, Default)]
pub struct ResolvedStep {
    /// Unique in the stage (`sg1_Run_1`); the log name and hostname.
    pub id: String,
    pub name: String,
    pub background: bool,
    pub image: Option<String>,
    pub shell: Option<Shell>,
    pub command: Option<String>,
    pub entrypoint: Vec<String>,
    /// Stage variables then `envVariables`, in that order (later wins).
    pub env: Vec<(String, String)>,
    pub run_as_user: Option<String>,
    pub output_variables: Vec<String>,
    pub port_bindings: Vec<(u16, u16)>,
    pub memory: Option<u64>,
    pub cpu: Option<u64>,
    pub privileged: bool,
    pub pull_policy: Option<PullPolicy>,
    pub timeout: Option<Duration>,
    pub reports: Vec<String>,
    pub workspace: PathBuf,
    /// Background steps: how readiness is seen (`None`: ready once started).
    pub health_check: Option<ResolvedHealth>,
}

/// A `healthCheck` with its expressions rendered.
#[derive(Clone, Debug)]
pub struct ResolvedHealth {
    pub probe: ResolvedProbe,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    pub retries: Option<u32>,
    pub deadline: Duration,
}

#[derive(Clone, Debug)]
pub enum ResolvedProbe {
    Tcp(u16),
    Http {
        port: u16,
        path: String,
        status: Option<u16>,
    },
    Exec(String),
    Log(regex::Regex),
}

/// Where a service is in its life, as the executor sees it.
#[derive(Clone, Debug, PartialEq)]
pub enum ServiceState {
    /// Started; its health check has not passed yet.
    Starting,
    /// Ready, this long after it was started.
    Ready(Duration),
    /// It will never be ready: it exited first, or its health check gave up.
    Failed(String),
    /// It ended on its own after being ready (`clean`: exit code 0).
    Exited { description: String, clean: bool },
}

/// How a Run step ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The process ran and exited (code 128+N when killed by signal N).
    Exited {
        code: i32,
        outputs: BTreeMap<String, String>,
    },
    /// It ran past its timeout and was stopped.
    TimedOut,
    /// It could not be started, or its result could not be read.
    Error(String),
    /// The stage was aborted (a signal, or an Abort failure strategy) while it ran.
    Cancelled,
}

/// Where step output goes: the console and the step's log file. Lines arrive without their
/// newline; masking happens inside the sink.
pub trait LineSink: Send + Sync {
    fn line(&self, step: &str, line: &str);
}

/// A service that ended on its own while the stage ran, or at teardown.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceEnd {
    pub id: String,
    pub description: String,
    pub clean: bool,
}

pub trait Executor: Send + Sync {
    /// Run a Run step to completion, stopping it at `step.timeout` or when `cancel` fires.
    fn run<'a>(
        &'a self,
        step: &'a ResolvedStep,
        out: Arc<dyn LineSink>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Outcome>;

    /// Start a Background service and return once it is started; it lives until `teardown`.
    /// The receiver follows its state (readiness, an early exit) until teardown begins.
    fn start_service<'a>(
        &'a self,
        step: &'a ResolvedStep,
        out: Arc<dyn LineSink>,
    ) -> BoxFuture<'a, Result<tokio::sync::watch::Receiver<ServiceState>, String>>;

    /// Stop every service (reverse start order) and release everything the stage started.
    /// Returns how each service ended and every error met on the way; never stops early.
    fn teardown<'a>(&'a self) -> BoxFuture<'a, (Vec<ServiceEnd>, Vec<String>)>;
}
