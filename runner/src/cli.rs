//! The command line: `stagehand run | validate | plan`.
//!
//! Owns: arguments, reading the pipeline file and its inputs and secrets, the order of the
//! phases (parse → inputs → load → validate → plan → run → teardown → summary), signals to
//! stagehand itself, and exit codes (0 success, 1 stage failed, 2 invalid input, 130/143 when
//! interrupted by SIGINT/SIGTERM). Does not own: any phase's logic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::context::{Codebase, Ctx, RunInfo, Secrets, StageInfo, render};
use crate::diag::Diagnostics;
use crate::exec::container::Containers;
use crate::exec::host::{DefaultLimits, HostExecutor};
use crate::inputs::InputValues;
use crate::model::{Pipeline, StatusGate, VarType};
use crate::output::Console;
use crate::plan::{StagePlan, plan_stage};
use crate::schedule::{RunOptions, StageRun, StageStatus, summary};
use stagehand_supervisor::cgroup::Limits;

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_INVALID: i32 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "stagehand",
    version,
    about = "Run Harness CI pipeline stages locally, without a daemon"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a pipeline's stages (or one stage with --stage).
    Run(RunArgs),
    /// Check a pipeline file and report every problem with its line and column.
    Validate(FileArgs),
    /// Print the execution tree: what runs in order and what in parallel.
    Plan(FileArgs),
    /// Remove everything that runs killed with SIGKILL left behind (processes, cgroups,
    /// network namespaces). `stagehand run` does this first on its own.
    Gc,
    /// List running stages and their services.
    Ps,
    /// Report what this host supports (cgroups, user namespaces, subordinate ids, overlayfs,
    /// runtimes, slirp4netns) and what to do about each gap.
    Doctor,
    /// Internal: run one container as a containerd task in the foreground (the containerd
    /// backend's stand-in for `runc run`).
    #[cfg(feature = "containerd")]
    #[command(name = "__containerd-run", hide = true)]
    ContainerdRun {
        #[arg(long)]
        address: PathBuf,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        bundle: PathBuf,
    },
    /// Manage the image store: load, import, pull, ls, rm, inspect, prune.
    Image {
        /// The image store (default: /var/lib/stagehand as root, $XDG_DATA_HOME/stagehand otherwise).
        #[arg(
            long = "root",
            value_name = "DIR",
            global = true,
            env = "STAGEHAND_ROOT"
        )]
        root: Option<PathBuf>,
        #[command(subcommand)]
        cmd: ImageCmd,
    },
}

impl Command {
    /// Commands that make namespaces, mounts or files owned by image users: as an ordinary
    /// user they run as root of a user namespace of their own.
    fn needs_user_namespace(&self) -> bool {
        match self {
            Command::Run(_) | Command::Gc | Command::Image { .. } => true,
            Command::Validate(_) | Command::Plan(_) | Command::Ps | Command::Doctor => false,
            #[cfg(feature = "containerd")]
            Command::ContainerdRun { .. } => false,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum ImageCmd {
    /// Load an oci-archive or docker-archive tarball (docker save, podman save, skopeo copy).
    Load { file: PathBuf },
    /// Pull an image from a registry. Registries on localhost / 127.0.0.1 and those listed in
    /// STAGEHAND_INSECURE_REGISTRIES (host:port,...) are plain HTTP, others HTTPS; credentials
    /// come from $REGISTRY_AUTH_FILE, $DOCKER_CONFIG/config.json or ~/.docker/config.json.
    Pull {
        /// The image, normalized as Docker does: `registry.lab:5000/team/app:1.2`,
        /// `127.0.0.1:5000/lab/busybox`, `...@sha256:<digest>`.
        reference: String,
        /// Speak plain HTTP to this image's registry.
        #[arg(long)]
        insecure: bool,
    },
    /// Make a one-layer image from a root filesystem (a directory or a tar).
    Import {
        source: PathBuf,
        #[arg(long)]
        tag: String,
        /// The image ENTRYPOINT (repeat for each argument).
        #[arg(long = "entrypoint", value_name = "ARG")]
        entrypoint: Vec<String>,
        /// The image CMD (repeat for each argument).
        #[arg(long = "cmd", value_name = "ARG")]
        cmd: Vec<String>,
        /// KEY=VALUE environment of the image.
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
    },
    /// Give an image another name (no copy).
    Tag { image: String, name: String },
    /// List images.
    Ls {
        /// `containerd` adds a CONTAINERD column: whether containerd (at
        /// `--containerd-address`, namespace `stagehand`) has the image under the same name
        /// (`yes`), that name for another image (`other`), or not (`no`).
        #[arg(long, value_enum, default_value = "runc")]
        backend: BackendArg,
        /// containerd's socket, for `--backend containerd`.
        #[arg(
            long,
            value_name = "SOCKET",
            default_value = "/run/containerd/containerd.sock",
            env = "STAGEHAND_CONTAINERD_ADDRESS"
        )]
        containerd_address: PathBuf,
    },
    /// Remove images by name or id.
    Rm { images: Vec<String> },
    /// Show an image's manifest, config and layers.
    Inspect { image: String },
    /// Delete blobs and unpacked layers no image uses.
    Prune,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputArg {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum NetworkArg {
    /// One network namespace per stage, with outbound access through slirp4netns.
    Stage,
    /// One network namespace per stage, loopback only.
    None,
    /// The host's network namespace.
    Host,
}

#[derive(Args, Debug)]
pub struct FileArgs {
    /// The pipeline YAML file.
    pub file: PathBuf,
    /// Only this stage (by identifier).
    #[arg(long)]
    pub stage: Option<String>,
    /// A runtime input: a variable name or a field path, e.g.
    /// `stages.build.spec.execution.steps.Run_1.spec.image=alpine`.
    #[arg(long = "input", value_name = "NAME=VALUE")]
    pub inputs: Vec<String>,
    /// A Harness input set file (the pipeline's shape with values in place of <+input>).
    #[arg(long = "inputs-file", value_name = "FILE")]
    pub inputs_file: Option<PathBuf>,
    /// Report unsupported steps as skipped instead of failing.
    #[arg(long)]
    pub skip_unsupported: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub file: FileArgs,
    /// Set a pipeline or stage variable's value (by name).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    pub vars: Vec<String>,
    /// A secret for <+secrets.getValue('id')>. Also: --secrets-file, STAGEHAND_SECRET_<ID>.
    #[arg(long = "secret", value_name = "ID=VALUE")]
    pub secrets: Vec<String>,
    /// A file of `id=value` lines.
    #[arg(long = "secrets-file", value_name = "FILE")]
    pub secrets_file: Option<PathBuf>,
    /// The stage workspace (working directory of every step). Default: the current directory.
    #[arg(long)]
    pub workspace: Option<PathBuf>,
    /// Grace period between SIGTERM and SIGKILL when stopping services.
    #[arg(long, default_value = "10s", value_parser = parse_duration_arg)]
    pub stop_timeout: Duration,
    /// Show only step status lines and the output of failing steps.
    #[arg(long, short)]
    pub quiet: bool,
    /// `text` for people; `json` streams one JSON event per line (stage_started, step_started,
    /// output, service_ready, service_died, step_finished, stage_finished, message).
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputArg,
    /// How steps see the network: `stage` (a namespace per stage, step ids as hostnames,
    /// outbound through slirp4netns), `none` (the namespace, no outbound), `host`.
    #[arg(long, value_enum, default_value = "stage")]
    pub network: NetworkArg,
    /// Default memory limit of Run steps that set none (Background steps: 500Mi).
    #[arg(long, value_name = "QUANTITY", value_parser = parse_memory_arg)]
    pub run_memory: Option<u64>,
    /// Default CPU limit of Run steps that set none (Background steps: 400m).
    #[arg(long, value_name = "QUANTITY", value_parser = parse_cpu_arg)]
    pub run_cpu: Option<u64>,
    /// Maximum number of processes in each step's cgroup.
    #[arg(long, default_value_t = 4096)]
    pub pids_limit: u64,
    /// Refuse to run when resource limits cannot be enforced (rootless on cgroup v1, or v2
    /// without a delegated subtree) instead of warning and running without them.
    #[arg(long)]
    pub require_limits: bool,
    /// The image store and run counters (default: /var/lib/stagehand as root,
    /// $XDG_DATA_HOME/stagehand otherwise).
    #[arg(long = "root", value_name = "DIR", env = "STAGEHAND_ROOT")]
    pub root: Option<PathBuf>,
    /// The OCI runtime for container steps: `runc` (default), `crun`, or a path.
    #[arg(long, value_name = "NAME|PATH")]
    pub runtime: Option<String>,
    /// What runs container steps: `runc` (stagehand runs the runtime itself, no daemon) or
    /// `containerd` (tasks through containerd's API; needs a build with `--features containerd`).
    #[arg(long, value_enum, default_value = "runc", env = "STAGEHAND_BACKEND")]
    pub backend: BackendArg,
    /// containerd's socket, for `--backend containerd`.
    #[arg(
        long,
        value_name = "SOCKET",
        default_value = "/run/containerd/containerd.sock",
        env = "STAGEHAND_CONTAINERD_ADDRESS"
    )]
    pub containerd_address: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendArg {
    Runc,
    Containerd,
}

/// containerd's namespace for everything stagehand creates there.
const CONTAINERD_NAMESPACE: &str = "stagehand";

impl RunArgs {
    fn backend(&self) -> crate::exec::container::Backend {
        match self.backend {
            BackendArg::Runc => crate::exec::container::Backend::Runc,
            BackendArg::Containerd => crate::exec::container::Backend::Containerd {
                address: self.containerd_address.clone(),
                namespace: CONTAINERD_NAMESPACE.into(),
            },
        }
    }
}

impl RunArgs {
    fn image_root(&self) -> PathBuf {
        self.root.clone().unwrap_or_else(default_image_root)
    }
}

fn default_image_root() -> PathBuf {
    stagehand_oci::store::Store::default_root().unwrap_or_else(state_dir)
}

fn parse_memory_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_memory(s).map_err(|e| e.to_string())
}

fn parse_cpu_arg(s: &str) -> Result<u64, String> {
    crate::units::parse_cpu(s).map_err(|e| e.to_string())
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::units::parse_duration(s).map_err(|e| e.to_string())
}

/// Parse arguments, run, and return the process exit code.
pub fn main() -> i32 {
    // First, while single-threaded: a rootless child re-run by `reexec` enters its namespace.
    if let Err(e) = stagehand_supervisor::userns::enter_child() {
        eprintln!("stagehand: {e}");
        return EXIT_INVALID;
    }
    let cli = Cli::parse();
    if cli.command.needs_user_namespace()
        && !stagehand_supervisor::userns::is_real_root()
        && !stagehand_supervisor::userns::in_user_namespace()
    {
        let plan = stagehand_supervisor::userns::MappingPlan::for_current_user();
        return match stagehand_supervisor::userns::reexec(&plan) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("stagehand: {e}");
                EXIT_INVALID
            }
        };
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("STAGEHAND_LOG")
        .unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Validate(a) => validate_cmd(&a),
        Command::Plan(a) => plan_cmd(&a),
        Command::Run(a) => run_cmd(a),
        Command::Gc => gc_cmd(),
        Command::Image { root, cmd } => image_cmd(root.unwrap_or_else(default_image_root), cmd),
        Command::Ps => ps_cmd(),
        Command::Doctor => Ok(crate::doctor::run()),
        #[cfg(feature = "containerd")]
        Command::ContainerdRun {
            address,
            namespace,
            id,
            bundle,
        } => Ok(crate::exec::containerd::run_task(
            &address, &namespace, &id, &bundle,
        )),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stagehand: {e:#}");
            EXIT_INVALID
        }
    }
}

/// 1-based line and column (in characters) of byte `at` of `bytes`, valid UTF-8 before it.
fn utf8_position(bytes: &[u8], at: usize) -> (usize, usize) {
    let before = String::from_utf8_lossy(&bytes[..at]);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// A loaded and checked pipeline, or the exit code to stop with.
struct Checked {
    pipeline: Pipeline,
}

fn check(a: &FileArgs, require_inputs: bool) -> Result<Result<Checked, i32>> {
    let source = std::fs::read(&a.file).with_context(|| format!("read {}", a.file.display()))?;
    let source = match String::from_utf8(source) {
        Ok(s) => s,
        Err(e) => {
            let bytes = e.as_bytes();
            let at = e.utf8_error().valid_up_to();
            let (line, col) = utf8_position(bytes, at);
            let shown = String::from_utf8_lossy(bytes).into_owned();
            let mut diags = Diagnostics::new(&a.file);
            diags.error(
                crate::yaml::Pos {
                    line: line as u32,
                    col: col as u32,
                },
                format!(
                    "the file is not UTF-8 text (byte 0x{:02x}); YAML pipelines must be UTF-8",
                    bytes[at]
                ),
            );
            eprint!("{}", diags.render(&shown, false));
            eprintln!("{}: invalid: 1 error", a.file.display());
            return Ok(Err(EXIT_INVALID));
        }
    };
    let mut values = InputValues::default();
    if let Some(f) = &a.inputs_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("read inputs file {}", f.display()))?;
        let doc = crate::yaml::parse(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}: {}", f.display(), e.pos, e.message))?;
        values
            .add_input_set(&doc)
            .map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
    }
    for kv in &a.inputs {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--input {kv}: expected NAME=VALUE"))?;
        values.insert(k, v);
    }
    let (mut diags, pipeline) =
        crate::validate::check_source(&a.file, &source, &values, require_inputs);
    if let Some(p) = &pipeline {
        if let Some(s) = &a.stage {
            if !p.stages.iter().any(|st| &st.identifier == s) {
                let ids: Vec<&str> = p.stages.iter().map(|s| s.identifier.as_str()).collect();
                bail!(
                    "no stage `{s}` in {} (stages: {})",
                    a.file.display(),
                    ids.join(", ")
                );
            }
        }
    }
    diags.finish();
    let text = diags.render(&source, a.skip_unsupported);
    if !text.is_empty() {
        eprint!("{text}");
    }
    let invalid = diags.has_errors() || (diags.has_unsupported() && !a.skip_unsupported);
    match pipeline {
        Some(p) if !invalid => Ok(Ok(Checked { pipeline: p })),
        _ => {
            let e = diags.count(crate::diag::Severity::Error);
            let u = diags.count(crate::diag::Severity::Unsupported);
            let mut parts = vec![];
            if e > 0 {
                parts.push(format!("{e} error{}", if e == 1 { "" } else { "s" }));
            }
            if u > 0 && !a.skip_unsupported {
                parts.push(format!(
                    "{u} unsupported (--skip-unsupported runs the rest)"
                ));
            }
            eprintln!("{}: invalid: {}", a.file.display(), parts.join(", "));
            Ok(Err(EXIT_INVALID))
        }
    }
}

fn validate_cmd(a: &FileArgs) -> Result<i32> {
    Ok(match check(a, false)? {
        Ok(c) => {
            let steps: usize = c
                .pipeline
                .stages
                .iter()
                .map(|s| plan_stage(s).steps().len())
                .sum();
            println!(
                "{}: valid ({} stage{}, {steps} steps)",
                a.file.display(),
                c.pipeline.stages.len(),
                if c.pipeline.stages.len() == 1 {
                    ""
                } else {
                    "s"
                }
            );
            EXIT_OK
        }
        Err(code) => code,
    })
}

fn plan_cmd(a: &FileArgs) -> Result<i32> {
    Ok(match check(a, false)? {
        Ok(c) => {
            for s in selected(&c.pipeline, a.stage.as_deref()) {
                print!("{}", crate::plan::render(&plan_stage(s)));
            }
            EXIT_OK
        }
        Err(code) => code,
    })
}

fn selected<'a>(p: &'a Pipeline, only: Option<&str>) -> Vec<&'a crate::model::Stage> {
    p.stages
        .iter()
        .filter(|s| only.is_none_or(|o| o == s.identifier))
        .collect()
}

fn parse_kv(kv: &str, what: &str) -> Result<(String, String)> {
    let (k, v) = kv
        .split_once('=')
        .with_context(|| format!("{what} {kv}: expected NAME=VALUE"))?;
    Ok((k.trim().to_string(), v.to_string()))
}

fn read_secrets(a: &RunArgs) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for (k, v) in std::env::vars() {
        if let Some(id) = k.strip_prefix("STAGEHAND_SECRET_") {
            out.insert(id.to_string(), v);
        }
    }
    if let Some(f) = &a.secrets_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("read secrets file {}", f.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .with_context(|| format!("{}:{}: expected id=value", f.display(), i + 1))?;
            out.insert(k.trim().to_string(), v.to_string());
        }
    }
    for s in &a.secrets {
        let (k, v) = parse_kv(s, "--secret")?;
        out.insert(k, v);
    }
    Ok(out)
}

/// The run directory: the single place that records what a run created. Rootless runs
/// (root of their own user namespace) use the user's, by the user's host uid.
pub(crate) fn run_dir_base() -> PathBuf {
    if stagehand_supervisor::userns::is_real_root() {
        return PathBuf::from("/run/stagehand");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("stagehand"),
        None => std::env::temp_dir().join(format!(
            "stagehand-{}",
            stagehand_supervisor::userns::host_uid()
        )),
    }
}

fn state_dir() -> PathBuf {
    if stagehand_supervisor::userns::is_real_root() {
        return PathBuf::from("/var/lib/stagehand");
    }
    match std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        Some(d) => PathBuf::from(d).join("stagehand"),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
            .join(".local/share/stagehand"),
    }
}

fn new_run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let mix = (nanos as u64) ^ ((std::process::id() as u64) << 32);
    format!("{:012x}", mix & 0xffff_ffff_ffff)
}

fn run_cmd(a: RunArgs) -> Result<i32> {
    let checked = match check(&a.file, true)? {
        Ok(c) => c,
        Err(code) => return Ok(code),
    };
    let mut pipeline = checked.pipeline;
    let overrides: Vec<(String, String)> = a
        .vars
        .iter()
        .map(|kv| parse_kv(kv, "--var"))
        .collect::<Result<_>>()?;
    apply_overrides(&mut pipeline, &overrides)?;
    let secrets = Arc::new(Secrets::new(read_secrets(&a)?));
    let workspace = match &a.workspace {
        Some(w) => {
            std::fs::create_dir_all(w)
                .with_context(|| format!("create workspace {}", w.display()))?;
            w.canonicalize()?
        }
        None => std::env::current_dir()?,
    };

    // The reaper must exist before the first child: stagehand becomes a child subreaper and
    // every descendant is reaped by it.
    stagehand_supervisor::reaper::install().context("install the process reaper")?;

    // Undo whatever earlier runs killed with SIGKILL left behind.
    let dead = stagehand_supervisor::stage::gc(&run_dir_base());
    for r in &dead {
        for e in &r.errors {
            eprintln!("stagehand: cleaning up run {}: {e}", r.run_id);
        }
    }
    if a.backend == BackendArg::Containerd {
        let (_, errors) = containerd_gc(&a.containerd_address, &dead);
        for e in errors {
            eprintln!("stagehand: cleaning up containerd: {e}");
        }
    }
    let run_id = new_run_id();
    let run_dir = run_dir_base().join(&run_id);
    let logs = run_dir.join("logs");
    std::fs::create_dir_all(&logs)
        .with_context(|| format!("create run directory {}", run_dir.display()))?;
    let console = Arc::new(
        Console::new(secrets.clone(), Some(logs.clone()), a.quiet)
            .with_json(a.output == OutputArg::Json),
    );

    let caps = match rootless_caps(&a, &console) {
        Ok(c) => c,
        Err(e) => {
            console.status(&format!("stagehand: {e}"));
            // Nothing ran: no run to keep logs of.
            let _ = std::fs::remove_dir_all(&run_dir);
            return Ok(EXIT_INVALID);
        }
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .worker_threads(2)
        .build()?;
    let code = rt.block_on(async {
        let cancel = CancellationToken::new();
        let signal = Arc::new(std::sync::atomic::AtomicI32::new(0));
        // Listen before the first step starts, so no signal can catch a stage half built.
        let mut signals = match stagehand_supervisor::signals::termination_signals() {
            Ok(s) => s,
            Err(e) => {
                console.status(&format!("stagehand: {e}"));
                return EXIT_FAILED;
            }
        };
        {
            let cancel = cancel.clone();
            let signal = signal.clone();
            let console = console.clone();
            tokio::spawn(async move {
                let sig = signals.recv().await;
                signal.store(sig, std::sync::atomic::Ordering::SeqCst);
                console.status(&format!(
                    "stagehand: received {}, stopping the stage",
                    stagehand_supervisor::process::signal_name(sig)
                ));
                cancel.cancel();
            });
        }
        let codebase = Codebase::detect(&workspace);
        // The image store, and where run counters are kept.
        let image_root = a.image_root();
        let mut run = RunInfo {
            pipeline_name: pipeline.name.clone(),
            pipeline_id: pipeline.identifier.clone(),
            sequence_id: crate::sequence::next(&image_root, &pipeline.identifier)
                .unwrap_or_else(|e| {
                    console.status(&format!(
                        "    warning: cannot record this run's number under {}: {e}; <+pipeline.sequenceId> is 1",
                        image_root.display()
                    ));
                    1
                }),
            execution_id: run_id.clone(),
            codebase,
            secrets: secrets.clone(),
            pipeline_vars: BTreeMap::new(),
            outputs: RwLock::new(Default::default()),
        };
        // Pipeline variables may use secrets and run facts; Secret-typed ones are masked.
        for v in &pipeline.variables {
            let value = {
                let ctx = Ctx {
                    run: &run,
                    stage: None,
                    step: None,
                };
                match render(&v.value.value, &ctx) {
                    Ok(s) => s,
                    Err(e) => {
                        console.status(&format!(
                            "{}:{}: error: pipeline variable `{}`: {e}",
                            a.file.file.display(),
                            v.value.pos,
                            v.name
                        ));
                        return EXIT_FAILED;
                    }
                }
            };
            if v.var_type == VarType::Secret {
                secrets.add_mask(&value);
            }
            run.pipeline_vars.insert(v.name.clone(), value);
        }
        let run = Arc::new(run);
        let mut any_failed = false;
        let mut reports = Vec::new();
        for stage in selected(&pipeline, a.file.stage.as_deref()) {
            if cancel.is_cancelled() {
                break;
            }
            if stage.unsupported {
                console.status(&format!(
                    "==> stage {} skipped (not supported by stagehand)",
                    stage.identifier
                ));
                continue;
            }
            let plan = plan_stage(stage);
            if let Some(skip) = stage_gate(&plan, &run, any_failed) {
                console.status(&format!("==> stage {} skipped ({skip})", stage.identifier));
                continue;
            }
            let info = match stage_info(&plan, &run, &a.file.file) {
                Ok(i) => Arc::new(i),
                Err(e) => {
                    console.status(&e);
                    any_failed = true;
                    continue;
                }
            };
            console.stage_start(&plan.identifier, &plan.name);
            let steps_dir = run_dir.join("steps").join(&plan.identifier);
            let sandbox = match stage_sandbox(&a, &plan, &run_dir, &run_id, caps) {
                Ok(s) => s,
                Err(e) => {
                    console.status(&format!("stagehand: {e}"));
                    any_failed = true;
                    break;
                }
            };
            if let Some(Err(e)) = sandbox.as_ref().map(|sb| sb.start_forwarders()) {
                console.status(&format!("stagehand: stage {}: {e}", plan.identifier));
                if let Some(sb) = sandbox {
                    for err in sb.teardown().await {
                        console.status(&format!("    teardown: {err}"));
                    }
                }
                any_failed = true;
                break;
            }
            let limits = DefaultLimits {
                run: Limits {
                    memory_bytes: a.run_memory,
                    cpu_millis: a.run_cpu,
                    pids: Some(a.pids_limit),
                },
                background: Limits {
                    pids: Some(a.pids_limit),
                    ..stagehand_supervisor::stage::BACKGROUND_DEFAULTS
                },
            };
            let uses_images = plan.steps().iter().any(|s| s.spec.image.is_some());
            let exec = match HostExecutor::new(steps_dir, a.stop_timeout, sandbox, limits) {
                Ok(e) if uses_images => {
                    let volumes: Vec<String> =
                        plan.volumes.iter().map(|v| v.mount_path.clone()).collect();
                    let c = Containers::new(
                        &image_root,
                        a.runtime.as_deref().map(std::ffi::OsStr::new),
                        &run_dir,
                        &run_id,
                        &plan.identifier,
                        &volumes,
                    )
                    .and_then(|c| c.with_backend(a.backend()));
                    Arc::new(e.with_containers(c))
                }
                Ok(e) => Arc::new(e),
                Err((e, sandbox)) => {
                    console.status(&format!(
                        "stagehand: cannot prepare stage {}: {e}",
                        plan.identifier
                    ));
                    if let Some(sb) = sandbox {
                        for err in sb.teardown().await {
                            console.status(&format!("    teardown: {err}"));
                        }
                    }
                    any_failed = true;
                    break;
                }
            };
            let options = RunOptions {
                workspace: workspace.clone(),
                skip_unsupported: a.file.skip_unsupported,
                run_dir: Some(run_dir.clone()),
            };
            let sr = StageRun::new(
                plan,
                run.clone(),
                info,
                exec,
                console.clone(),
                options,
                cancel.clone(),
            );
            let report = sr.run().await;
            // An EmptyDir lives as long as its stage (as with a Kubernetes pod); container
            // bundles and upper dirs are already unmounted by teardown.
            for d in ["volumes", "containers"] {
                let _ = std::fs::remove_dir_all(run_dir.join(d).join(&report.identifier));
            }
            console.stage_end(&summary(&report), stage_json(&report));
            if report.status != StageStatus::Success {
                any_failed = true;
            }
            reports.push(report);
        }
        let _ = write_summary(&run_dir, &reports, &secrets);
        match signal.load(std::sync::atomic::Ordering::SeqCst) {
            0 if any_failed => EXIT_FAILED,
            0 => EXIT_OK,
            sig => 128 + sig,
        }
    });
    // Steps' scripts hold rendered commands (possibly secrets); logs and the summary stay.
    let _ = std::fs::remove_dir_all(run_dir.join("steps"));
    rt.shutdown_timeout(Duration::from_secs(1));
    eprintln!("logs: {}", logs.display());
    Ok(code)
}

fn image_cmd(root: PathBuf, cmd: ImageCmd) -> Result<i32> {
    use stagehand_oci::{archive, store::Store};
    let store =
        Store::open(&root).with_context(|| format!("open image store {}", root.display()))?;
    match cmd {
        ImageCmd::Load { file } => {
            let started = std::time::Instant::now();
            // What each name meant before, so a refused archive cannot take a good image's
            // name away.
            let before = store.list()?;
            let loaded =
                archive::load(&store, &file).with_context(|| format!("load {}", file.display()))?;
            // Unpack every layer now: a hostile archive (`..`, escaping symlinks) is refused
            // here, naming the entry, rather than when a stage first uses the image; and the
            // first container start is then fast.
            let checked = (|| -> Result<()> {
                let guard = store.write_guard()?;
                for l in &loaded {
                    stagehand_oci::unpack::ensure_image_layers(&store, &guard, &l.id)
                        .with_context(|| {
                            format!(
                                "unpack {} from {}",
                                l.name.as_deref().unwrap_or("image"),
                                file.display()
                            )
                        })?;
                }
                Ok(())
            })();
            if let Err(e) = checked {
                for l in &loaded {
                    let _ = store.remove(l.name.as_deref().unwrap_or(&l.id.to_string()));
                }
                for old in &before {
                    let Some(name) = &old.name else { continue };
                    if loaded.iter().any(|l| l.name.as_deref() == Some(name)) {
                        if let Ok(r) = stagehand_oci::store::parse_reference(name) {
                            let _ = store.tag(&r, &old.id);
                        }
                    }
                }
                let _ = store.prune();
                return Err(e.context("the archive was not loaded"));
            }
            for l in &loaded {
                println!(
                    "loaded {} ({})",
                    l.name.as_deref().unwrap_or("<no name>"),
                    l.id.short()
                );
            }
            eprintln!(
                "{} image(s) in {}",
                loaded.len(),
                crate::units::format_duration(started.elapsed())
            );
        }
        ImageCmd::Pull {
            reference,
            insecure,
        } => {
            use stagehand_oci::pull;
            use std::io::IsTerminal;
            let mut opts = pull::PullOptions::from_env()?;
            opts.insecure = insecure;
            let live = std::io::stderr().is_terminal();
            opts.progress = Some(pull::text_progress(Box::new(std::io::stderr()), live));
            let started = std::time::Instant::now();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match rt.block_on(pull::pull(&store, &reference, &opts)) {
                Ok(p) => {
                    println!(
                        "pulled {} ({})",
                        p.name.as_deref().unwrap_or(&p.reference),
                        p.id.short()
                    );
                    eprintln!(
                        "{} blob(s) fetched ({}), {} already in the store, in {}",
                        p.fetched_blobs,
                        pull::human_bytes(p.fetched_bytes),
                        p.cached_blobs,
                        crate::units::format_duration(started.elapsed())
                    );
                }
                Err(e) => {
                    eprintln!("stagehand: {e}");
                    return Ok(EXIT_FAILED);
                }
            }
        }
        ImageCmd::Import {
            source,
            tag,
            entrypoint,
            cmd,
            env,
        } => {
            let opts = archive::ImportOptions {
                reference: tag.clone(),
                entrypoint: (!entrypoint.is_empty()).then_some(entrypoint),
                cmd: (!cmd.is_empty()).then_some(cmd),
                env,
                working_dir: None,
                user: None,
            };
            // Like `pull`: a failure here (a full disk) is not invalid input.
            let id = match archive::import(&store, &source, &opts) {
                Ok(id) => id,
                Err(e) => {
                    eprintln!("stagehand: import {}: {e}", source.display());
                    return Ok(EXIT_FAILED);
                }
            };
            println!("imported {tag} ({})", id.short());
        }
        ImageCmd::Tag { image, name } => {
            let Some(id) = store.resolve(&image)? else {
                eprintln!("no image `{image}` in {}", root.display());
                return Ok(EXIT_FAILED);
            };
            let reference = stagehand_oci::store::parse_reference(&name)?;
            store.tag(&reference, &id)?;
            println!(
                "tagged {} as {}",
                id.short(),
                stagehand_oci::store::name_of(&reference).unwrap_or(name)
            );
        }
        ImageCmd::Ls {
            backend,
            containerd_address,
        } => {
            let list = store.list()?;
            let Some(theirs) = containerd_images(backend, &containerd_address)? else {
                println!("{:<60} {:<14}", "NAME", "ID");
                for e in list {
                    println!(
                        "{:<60} {:<14}",
                        e.name.as_deref().unwrap_or("<no name>"),
                        e.id.short()
                    );
                }
                return Ok(EXIT_OK);
            };
            println!("{:<60} {:<14} CONTAINERD", "NAME", "ID");
            for e in list {
                let id = e.id.to_string();
                let has = match e.name.as_deref().map(|n| theirs.get(n)) {
                    Some(Some(d)) if *d == id => "yes",
                    Some(Some(_)) => "other",
                    Some(None) => "no",
                    None if theirs.values().any(|d| *d == id) => "yes",
                    None => "no",
                };
                println!(
                    "{:<60} {:<14} {has}",
                    e.name.as_deref().unwrap_or("<no name>"),
                    e.id.short()
                );
            }
        }
        ImageCmd::Rm { images } => {
            let mut missing = false;
            for i in images {
                let removed = store.remove(&i)?;
                if removed.is_empty() {
                    eprintln!("no image `{i}`");
                    missing = true;
                }
                for r in removed {
                    println!("removed {r}");
                }
            }
            if missing {
                return Ok(EXIT_FAILED);
            }
        }
        ImageCmd::Inspect { image } => {
            let Some(id) = store.resolve(&image)? else {
                eprintln!("no image `{image}` in {}", root.display());
                return Ok(EXIT_FAILED);
            };
            let config = store.config(&id)?;
            let layers: Vec<serde_json::Value> = store
                .layers(&id)?
                .iter()
                .map(|l| serde_json::json!({"digest": l.digest.to_string(), "diff_id": l.diff_id.to_string(), "size": l.size}))
                .collect();
            let out = serde_json::json!({
                "id": id.to_string(),
                "config": serde_json::to_value(&config)?,
                "layers": layers,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ImageCmd::Prune => {
            let r = store.prune()?;
            println!(
                "removed {} blobs ({}) and {} unpacked layers",
                r.blobs_removed,
                crate::units::format_memory(r.bytes_freed),
                r.layers_removed
            );
        }
    }
    Ok(EXIT_OK)
}

/// For `image ls --backend containerd`: containerd's images in stagehand's namespace (name →
/// manifest digest); `None` for `--backend runc`.
fn containerd_images(
    backend: BackendArg,
    address: &Path,
) -> Result<Option<std::collections::HashMap<String, String>>> {
    if backend != BackendArg::Containerd {
        return Ok(None);
    }
    #[cfg(feature = "containerd")]
    {
        crate::exec::containerd::images(address, CONTAINERD_NAMESPACE)
            .map(Some)
            .map_err(anyhow::Error::msg)
    }
    #[cfg(not(feature = "containerd"))]
    {
        let _ = address;
        bail!(crate::exec::container::NO_CONTAINERD)
    }
}

/// Delete the containerd containers, tasks, snapshots and leases of runs killed with SIGKILL
/// (every run not alive, `dead` included, also those an earlier gc without containerd undid):
/// (what was removed, errors). Nothing without the `containerd` feature or the socket.
fn containerd_gc(
    address: &Path,
    dead: &[stagehand_supervisor::stage::GcReport],
) -> (Vec<String>, Vec<String>) {
    #[cfg(feature = "containerd")]
    {
        let _ = dead;
        let live: Vec<String> = stagehand_supervisor::stage::running(&run_dir_base())
            .into_iter()
            .map(|(_, s)| s.run_id)
            .collect();
        crate::exec::containerd::gc(address, CONTAINERD_NAMESPACE, &live)
    }
    #[cfg(not(feature = "containerd"))]
    {
        let _ = (address, dead);
        (Vec::new(), Vec::new())
    }
}

fn gc_cmd() -> Result<i32> {
    let reports = stagehand_supervisor::stage::gc(&run_dir_base());
    let address = std::env::var_os("STAGEHAND_CONTAINERD_ADDRESS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock"));
    let (removed, errors) = containerd_gc(&address, &reports);
    for id in &removed {
        println!("containerd: removed {id}");
    }
    for e in &errors {
        eprintln!("{e}");
    }
    let mut failed = !errors.is_empty();
    for r in &reports {
        for what in &r.removed {
            println!("run {}: removed {what}", r.run_id);
        }
        for e in &r.errors {
            failed = true;
            eprintln!("run {}: {e}", r.run_id);
        }
    }
    if reports.is_empty() && removed.is_empty() {
        println!("nothing to clean up");
    }
    Ok(if failed { EXIT_FAILED } else { EXIT_OK })
}

fn ps_cmd() -> Result<i32> {
    let runs = stagehand_supervisor::stage::running(&run_dir_base());
    if runs.is_empty() {
        println!("no running stages");
    }
    for (dir, st) in runs {
        let up = std::fs::metadata(dir.join("state.json"))
            .and_then(|m| m.created().or_else(|_| m.modified()))
            .ok()
            .and_then(|t| t.elapsed().ok())
            .map(crate::units::format_duration)
            .unwrap_or_default();
        println!("run {} (stagehand pid {}, up {up})", st.run_id, st.pid);
        // The journal holds paths relative to each hierarchy; show the real directories.
        let hierarchy = st
            .cgroup_root
            .as_deref()
            .and_then(|r| stagehand_supervisor::cgroup::detect(r).ok());
        for c in &st.cgroups {
            match hierarchy.as_ref().and_then(|h| h.open(c).ok()) {
                Some(cg) => {
                    for p in cg.paths() {
                        println!("  cgroup {}", p.display());
                    }
                }
                None => println!("  cgroup {}", c.display()),
            }
        }
        for n in &st.netns {
            println!("  netns  {}", n.display());
        }
        if !st.ports.is_empty() {
            let ports: Vec<String> = st.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            println!("  ports  {}", ports.join(" "));
        }
        for (id, pid) in &st.services {
            println!("  service {id} pid {pid}");
        }
    }
    Ok(EXIT_OK)
}

/// What a rootless run can do on this host, decided once before the first stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RootlessCaps {
    /// Whether cgroups (and so limits) are ours to use.
    cgroups: bool,
    /// Whether slirp4netns can open /dev/net/tun.
    outbound: bool,
}

/// As root: everything. As root of our user namespace: say once what cannot be had here
/// (limits without a delegated cgroup, outbound without /dev/net/tun), or refuse with
/// `--require-limits`.
fn rootless_caps(a: &RunArgs, console: &Console) -> Result<RootlessCaps, String> {
    use stagehand_supervisor::userns;
    if userns::is_real_root() {
        return Ok(RootlessCaps {
            cgroups: true,
            outbound: true,
        });
    }
    // A cgroup v2 subtree delegated to the user: limits as for root.
    let cgroups = match crate::doctor::rootless_limits() {
        Ok(_) => true,
        Err(why) => {
            if a.require_limits {
                return Err(format!(
                    "--require-limits: resource limits cannot be enforced here: {why}"
                ));
            }
            console.status(&format!(
                "    warning: resource limits cannot be enforced: {why}; steps run without memory, CPU and pids limits (--require-limits refuses instead)"
            ));
            false
        }
    };
    let outbound = userns::tun_usable();
    if !outbound && a.network == NetworkArg::Stage {
        console.status("    warning: no outbound network for the stage: /dev/net/tun cannot be opened by this user (slirp4netns needs it; `chmod 0666 /dev/net/tun`, the usual mode, fixes it); loopback, step hostnames and published ports work");
    }
    Ok(RootlessCaps { cgroups, outbound })
}

/// Build the stage pod: as root with cgroups, as root of our user namespace (rootless) with
/// what `caps` allows.
fn stage_sandbox(
    a: &RunArgs,
    plan: &StagePlan,
    run_dir: &Path,
    run_id: &str,
    caps: RootlessCaps,
) -> Result<Option<stagehand_supervisor::stage::Stage>, String> {
    use stagehand_supervisor::forward::PortBinding;
    use stagehand_supervisor::stage::{Network, Stage, StageConfig};
    let steps = plan.steps();
    // Harness's name for a step in a group is `group_step`; the reference health-check
    // pipeline also reaches `Background_1` by its bare id, so both resolve.
    let mut hostnames: Vec<String> = steps
        .iter()
        .flat_map(|s| [s.id.clone(), s.identifier.clone()])
        .collect();
    hostnames.sort();
    hostnames.dedup();
    let port_bindings = steps
        .iter()
        .flat_map(|s| {
            s.spec.port_bindings.iter().map(|p| PortBinding {
                host_port: p.host,
                target_port: p.container,
                owner: s.id.clone(),
            })
        })
        .collect();
    let network = match a.network {
        NetworkArg::Stage => Network::Isolated {
            outbound: caps.outbound,
        },
        NetworkArg::None => Network::Isolated { outbound: false },
        NetworkArg::Host => Network::Host,
    };
    let slirp = find_in_path("slirp4netns");
    if a.network == NetworkArg::Stage && caps.outbound && slirp.is_none() {
        return Err("slirp4netns not found: install it (apt-get install slirp4netns) for outbound access from the stage, or pass --network none (loopback only) or --network host".into());
    }
    let cfg = StageConfig {
        run_dir: run_dir.to_path_buf(),
        run_id: run_id.to_string(),
        stage_id: plan.identifier.clone(),
        cgroup_root: caps
            .cgroups
            .then(|| PathBuf::from(stagehand_supervisor::cgroup::DEFAULT_ROOT)),
        network,
        hostnames,
        port_bindings,
        slirp4netns: slirp.unwrap_or_else(|| PathBuf::from("slirp4netns")),
    };
    Stage::create(cfg)
        .map(Some)
        .map_err(|e| format!("stage {}: {e}", plan.identifier))
}

pub(crate) fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn apply_overrides(p: &mut Pipeline, overrides: &[(String, String)]) -> Result<()> {
    for (k, v) in overrides {
        let mut hit = false;
        for var in p.variables.iter_mut().filter(|x| &x.name == k) {
            var.value.value = v.clone();
            hit = true;
        }
        for s in &mut p.stages {
            for var in s.variables.iter_mut().filter(|x| &x.name == k) {
                var.value.value = v.clone();
                hit = true;
            }
        }
        if !hit {
            bail!("--var {k}: no pipeline or stage variable named `{k}`");
        }
    }
    Ok(())
}

/// A stage's own `when` (`pipelineStatus`, `condition`).
fn stage_gate(plan: &StagePlan, run: &RunInfo, pipeline_failed: bool) -> Option<String> {
    let w = plan.when.as_ref()?;
    match (w.status, pipeline_failed) {
        (StatusGate::Success, true) => return Some("an earlier stage failed".into()),
        (StatusGate::Failure, false) => {
            return Some("runs only when the pipeline has failed".into());
        }
        _ => {}
    }
    let c = w.condition.as_ref()?;
    let ctx = Ctx {
        run,
        stage: None,
        step: None,
    };
    let result = crate::expr::parse_condition(&c.value)
        .map_err(|e| e.to_string())
        .and_then(|e| crate::expr::eval(&e, &ctx).map_err(|e| e.to_string()));
    match result {
        Ok(v) if crate::expr::truthy(&v) => None,
        Ok(_) => Some("condition is false".into()),
        Err(e) => Some(format!("condition could not be evaluated: {e}")),
    }
}

fn stage_info(
    plan: &StagePlan,
    run: &RunInfo,
    file: &Path,
) -> std::result::Result<StageInfo, String> {
    let mut info = StageInfo {
        identifier: plan.identifier.clone(),
        name: plan.name.clone(),
        vars: BTreeMap::new(),
    };
    for v in &plan.variables {
        let value = {
            let ctx = Ctx {
                run,
                stage: Some(&info),
                step: None,
            };
            render(&v.value.value, &ctx).map_err(|e| {
                format!(
                    "{}:{}: error: stage variable `{}`: {e}",
                    file.display(),
                    v.value.pos,
                    v.name
                )
            })?
        };
        if v.var_type == VarType::Secret {
            run.secrets.add_mask(&value);
        }
        info.vars.insert(v.name.clone(), value);
    }
    Ok(info)
}

fn write_summary(
    run_dir: &Path,
    reports: &[crate::schedule::StageReport],
    secrets: &Secrets,
) -> std::io::Result<()> {
    let stages: Vec<serde_json::Value> = reports.iter().map(stage_json).collect();
    let mut doc = serde_json::json!({ "stages": stages });
    secrets.mask_json(&mut doc);
    std::fs::write(
        run_dir.join("summary.json"),
        serde_json::to_vec_pretty(&doc)?,
    )
}

/// One stage of `summary.json` (and of the `stage_finished` event): see the README for the schema.
fn stage_json(r: &crate::schedule::StageReport) -> serde_json::Value {
    // Messages may quote step output: mask them like everything else written.
    serde_json::json!({
        "stage": r.identifier,
        "status": format!("{:?}", r.status),
        "duration_ms": r.duration.as_millis() as u64,
        "junit": r.junit,
        "steps": r.results.iter().map(|s| serde_json::json!({
            "id": s.id,
            "name": s.name,
            "kind": if s.background { "service" } else { "run" },
            "result": s.verdict.label(),
            "message": s.message,
            "duration_ms": s.duration.map(|d| d.as_millis() as u64),
            "attempts": s.attempts,
            "started_ms": s.started_ms,
            "ready_ms": s.ready_ms,
            "finished_ms": s.finished_ms,
        })).collect::<Vec<_>>(),
    })
}
