//! The host executor: steps with no `image` run as processes on this machine.
//!
//! Owns: turning a resolved step into a script file and an argv for its shell, its environment,
//! `runAsUser`, capturing output variables, and supervising Background services until teardown.
//! Processes are started by `stagehand_supervisor::process` (own process group, reaped by the
//! supervisor's reaper). Does not own: cgroups and the stage network (the stage sandbox adds
//! them through [`HostExecutor::with_sandbox`] hooks), or what a failure means (`schedule`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, join_all};
use stagehand_supervisor::cgroup::Limits;
use stagehand_supervisor::process::{self, Child, OutputTarget, SpawnSpec, UserSpec};
use stagehand_supervisor::stage::{Stage, StepSandbox};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{
    Executor, LineSink, Outcome, ResolvedHealth, ResolvedProbe, ResolvedStep, ServiceEnd,
    ServiceState,
};
use crate::model::Shell;
use tokio::sync::watch;

/// Grace period for a Run step stopped by its timeout or an abort, before SIGKILL.
const RUN_STOP_GRACE: Duration = Duration::from_secs(5);

struct Service {
    id: String,
    sandbox: Option<StepSandbox>,
    container: Option<super::container::Container>,
    child: Arc<Child>,
    /// Set once teardown begins, so the exit watcher stays quiet about expected exits.
    stopping: Arc<std::sync::atomic::AtomicBool>,
    output_done: tokio::task::JoinHandle<()>,
}

/// Resource limits a step gets when its YAML sets none.
#[derive(Clone, Copy, Debug, Default)]
pub struct DefaultLimits {
    pub run: Limits,
    pub background: Limits,
}

pub struct HostExecutor {
    /// Where scripts and output-variable files go (`<run dir>/steps`).
    dir: PathBuf,
    /// The stage pod (cgroups, netns, hosts file); `None` runs steps bare on the host.
    stage: std::sync::Mutex<Option<Arc<Stage>>>,
    limits: DefaultLimits,
    /// Image store and OCI runtime, when this host can run containers.
    containers: Option<super::container::Containers>,
    /// Why `containers` is `None`, for the error a container step gets.
    containers_unavailable: String,
    stop_timeout: Duration,
    /// stagehand's own environment, minus its secrets: the base of every host step's env.
    base_env: Vec<(String, String)>,
    services: Mutex<Vec<Service>>,
}

impl HostExecutor {
    /// On error the stage sandbox is handed back, so the caller can tear it down.
    #[allow(clippy::result_large_err)]
    pub fn new(
        dir: PathBuf,
        stop_timeout: Duration,
        stage: Option<Stage>,
        limits: DefaultLimits,
    ) -> Result<HostExecutor, (std::io::Error, Option<Stage>)> {
        // The directory must be traversable by a `runAsUser` step.
        if let Err(e) = std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)))
        {
            return Err((e, stage));
        }
        let base_env = std::env::vars()
            .filter(|(k, _)| !k.starts_with("STAGEHAND_SECRET_"))
            .collect();
        Ok(HostExecutor {
            dir,
            stage: std::sync::Mutex::new(stage.map(Arc::new)),
            limits,
            containers: None,
            containers_unavailable: "no image store was configured".into(),
            stop_timeout,
            base_env,
            services: Mutex::new(Vec::new()),
        })
    }

    /// Run steps with an `image` through these containers (or say why not).
    pub fn with_containers(mut self, c: Result<super::container::Containers, String>) -> Self {
        match c {
            Ok(c) => self.containers = Some(c),
            Err(why) => self.containers_unavailable = why,
        }
        self
    }

    pub(crate) fn steps_dir(&self) -> &Path {
        &self.dir
    }

    fn stage(&self) -> Option<Arc<Stage>> {
        self.stage.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The step's limits: its own `resources.limits`, else the defaults for its kind.
    fn limits_for(&self, step: &ResolvedStep) -> Limits {
        let d = if step.background {
            self.limits.background
        } else {
            self.limits.run
        };
        Limits {
            memory_bytes: step.memory.or(d.memory_bytes),
            cpu_millis: step.cpu.or(d.cpu_millis),
            pids: d.pids,
        }
    }

    /// The shell argv running the step's `command` as a script, written to the steps
    /// directory, with output-variable capture appended; `None` when `entrypoint` replaces the
    /// command (Harness: entrypoint wins). `inside` is the steps directory's path as the
    /// process sees it (a container mounts it elsewhere). Returns the outputs file's host path.
    pub(crate) fn script_argv(
        &self,
        step: &ResolvedStep,
        inside: Option<&Path>,
        owner: Option<(u32, u32)>,
    ) -> Result<(Option<Vec<String>>, Option<PathBuf>), String> {
        if !step.entrypoint.is_empty() {
            return Ok((None, None));
        }
        let Some(command) = &step.command else {
            return Err(format!(
                "step {} has neither `command` nor `entrypoint`",
                step.id
            ));
        };
        let seen = |host: &Path| -> PathBuf {
            match inside {
                Some(dir) => dir.join(host.file_name().unwrap_or_default()),
                None => host.to_path_buf(),
            }
        };
        let shell = step.shell.unwrap_or(Shell::Sh);
        let mut script = command.clone();
        if !script.ends_with('\n') {
            script.push('\n');
        }
        let mut outputs_file = None;
        if !step.output_variables.is_empty() {
            let path = self.dir.join(format!("{}.outputs", step.id));
            std::fs::write(&path, b"").map_err(|e| format!("create {}: {e}", path.display()))?;
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", path.display()))?;
            }
            script.push_str(&capture_code(shell, &step.output_variables, &seen(&path)));
            outputs_file = Some(path);
        }
        let path = self.dir.join(format!("{}.{}", step.id, extension(shell)));
        // The script holds rendered secrets: only the step's own user may read it. Created
        // 0600 before a byte is written (the shell reads it; nothing executes it), then given
        // to the step's user.
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let _ = std::fs::remove_file(&path);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| format!("write {}: {e}", path.display()))?;
            f.write_all(script.as_bytes())
                .map_err(|e| format!("write {}: {e}", path.display()))?;
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&path, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
        let p = seen(&path).display().to_string();
        let argv = match shell {
            Shell::Sh => vec!["sh".into(), "-e".into(), p],
            Shell::Bash => vec![
                "bash".into(),
                "-e".into(),
                "-o".into(),
                "pipefail".into(),
                p,
            ],
            Shell::Python => vec!["python3".into(), p],
            Shell::Pwsh | Shell::PowerShell => {
                vec![
                    "pwsh".into(),
                    "-NoLogo".into(),
                    "-NoProfile".into(),
                    "-NonInteractive".into(),
                    "-File".into(),
                    p,
                ]
            }
        };
        Ok((Some(argv), outputs_file))
    }

    /// Write the step's script and build its process spec.
    fn prepare(&self, step: &ResolvedStep) -> Result<(SpawnSpec, Option<PathBuf>), String> {
        let user = step_user(step)?;
        let (argv, outputs_file) =
            self.script_argv(step, None, user.as_ref().map(|u| (u.uid, u.gid)))?;
        let argv = argv.unwrap_or_else(|| step.entrypoint.clone());
        let mut spec = SpawnSpec::new(
            argv.into_iter().map(OsString::from),
            self.host_env(step, user.as_ref()),
            &step.workspace,
        );
        spec.process_group = true;
        spec.parent_death_signal = Some(libc::SIGKILL);
        spec.output = OutputTarget::Merged;
        spec.user = user.map(|u| UserSpec {
            uid: u.uid,
            gid: u.gid,
            groups: u.groups,
        });
        Ok((spec, outputs_file))
    }

    /// A host step's environment: stagehand's own (minus its secrets), the step's variables,
    /// the workspace, and the identity of `runAsUser`.
    fn host_env(&self, step: &ResolvedStep, user: Option<&HostUser>) -> Vec<(OsString, OsString)> {
        let mut env: Vec<(String, String)> = self.base_env.clone();
        let ws = step.workspace.display().to_string();
        let mut set = |k: &str, v: &str| {
            env.retain(|(ek, _)| ek != k);
            env.push((k.to_string(), v.to_string()));
        };
        for (k, v) in &step.env {
            set(k, v);
        }
        set("HARNESS_WORKSPACE", &ws);
        set("STAGEHAND_WORKSPACE", &ws);
        set("STAGEHAND_STEP_ID", &step.id);
        if let Some(u) = user {
            set("USER", &u.name);
            set("LOGNAME", &u.name);
            set("HOME", &u.home);
        }
        env.into_iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn spawn(
        &self,
        step: &ResolvedStep,
        out: Arc<dyn LineSink>,
        abort: &Abort,
    ) -> Result<Spawned, String> {
        if step.image.is_some() {
            return self.spawn_container(step, out, abort);
        }
        if let Some(note) = rootless_run_as_note(step) {
            out.line(&step.id, &note);
        }
        let (mut spec, outputs) = self.prepare(step)?;
        let sandbox = match self.stage() {
            Some(stage) => {
                let sb = stage
                    .step(&step.id, &self.limits_for(step))
                    .map_err(|e| format!("prepare {}: {e}", step.id))?;
                if let Err(e) = stage.apply(&sb, &mut spec) {
                    stage.finish_step(&sb);
                    return Err(format!("prepare {}: {e}", step.id));
                }
                Some(sb)
            }
            None => None,
        };
        let mut child = match process::spawn(spec) {
            Ok(c) => c,
            Err(e) => {
                if let (Some(stage), Some(sb)) = (self.stage(), &sandbox) {
                    stage.finish_step(sb);
                }
                return Err(e.to_string());
            }
        };
        let reader = forward_output(&mut child, &step.id, out);
        Ok(Spawned {
            child: Arc::new(child),
            reader,
            outputs,
            sandbox,
            container: None,
        })
    }

    /// A step with an `image`: an OCI container run by the runtime in the foreground, as our
    /// child, in the step's cgroup and the stage's network namespace.
    fn spawn_container(
        &self,
        step: &ResolvedStep,
        out: Arc<dyn LineSink>,
        abort: &Abort,
    ) -> Result<Spawned, String> {
        let Some(containers) = &self.containers else {
            return Err(format!(
                "step {} runs in an image, but containers are not available here: {}",
                step.id, self.containers_unavailable
            ));
        };
        let stage = self.stage();
        let limits = self.limits_for(step);
        let sandbox = match &stage {
            Some(st) => Some(
                st.step(&step.id, &limits)
                    .map_err(|e| format!("prepare {}: {e}", step.id))?,
            ),
            None => None,
        };
        let prepared = containers
            .prepare(self, step, stage.as_deref(), &limits, abort)
            .and_then(|p| {
                // Aborted while the image was prepared: no runtime is started for nothing.
                if abort.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                    containers.cleanup(&p.2, stage.as_deref());
                    return Err("aborted while preparing the container".into());
                }
                Ok(p)
            });
        let (spec, outputs, container) = match prepared {
            Ok(p) => p,
            Err(e) => {
                if let (Some(st), Some(sb)) = (&stage, &sandbox) {
                    st.finish_step(sb);
                }
                return Err(e);
            }
        };
        let mut child = match process::spawn(spec) {
            Ok(c) => c,
            Err(e) => {
                containers.cleanup(&container, stage.as_deref());
                if let (Some(st), Some(sb)) = (&stage, &sandbox) {
                    st.finish_step(sb);
                }
                return Err(e.to_string());
            }
        };
        let reader = forward_output(&mut child, &step.id, out);
        Ok(Spawned {
            child: Arc::new(child),
            reader,
            outputs,
            sandbox,
            container: Some(container),
        })
    }

    fn finish(&self, sandbox: Option<&StepSandbox>) -> Vec<String> {
        match (self.stage(), sandbox) {
            (Some(stage), Some(sb)) => stage.finish_step(sb),
            _ => Vec::new(),
        }
    }
}

/// What an `exec` probe needs to start its command like the service: argv prefix and env.
struct ExecProbe {
    /// For a container service: the runtime's `exec` into it, in front of `sh -c CMD`.
    runtime_exec: Option<Vec<OsString>>,
    env: Vec<(OsString, OsString)>,
    cwd: PathBuf,
    command: String,
    user: Option<UserSpec>,
    netns: Option<PathBuf>,
    hosts: Option<PathBuf>,
}

struct ProbeCtx {
    netns: Option<PathBuf>,
    exec: Option<ExecProbe>,
}

impl HostExecutor {
    fn probe_spec_parts(
        &self,
        step: &ResolvedStep,
        cmd: &str,
        container: Option<&str>,
    ) -> Result<ExecProbe, String> {
        if let (Some(id), Some(cs)) = (container, &self.containers) {
            // Inside the service's container: its files, its user, its namespaces.
            let path =
                std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
            return Ok(ExecProbe {
                runtime_exec: Some(cs.exec_argv(id)),
                env: vec![("PATH".into(), path)],
                cwd: PathBuf::from("/"),
                command: cmd.to_string(),
                user: None,
                netns: None,
                hosts: None,
            });
        }
        // The service's environment and identity, without writing its script again.
        let user = step_user(step)?;
        let env = self.host_env(step, user.as_ref());
        let stage = self.stage();
        Ok(ExecProbe {
            runtime_exec: None,
            env,
            cwd: step.workspace.clone(),
            command: cmd.to_string(),
            user: user.map(|u| UserSpec {
                uid: u.uid,
                gid: u.gid,
                groups: u.groups,
            }),
            netns: stage
                .as_ref()
                .and_then(|s| s.netns_path().map(Path::to_path_buf)),
            hosts: stage
                .as_ref()
                .filter(|_| nix::unistd::geteuid().is_root())
                .map(|s| s.hosts_path().to_path_buf()),
        })
    }
}

/// Passes output on, and marks the service ready at the first line matching the regex.
struct LogProbe {
    inner: Arc<dyn LineSink>,
    re: regex::Regex,
    tx: Arc<watch::Sender<ServiceState>>,
    started: Instant,
}

impl LineSink for LogProbe {
    fn line(&self, step: &str, line: &str) {
        self.inner.line(step, line);
        if *self.tx.borrow() == ServiceState::Starting && self.re.is_match(line) {
            let took = self.started.elapsed();
            self.tx.send_if_modified(|st| {
                if *st == ServiceState::Starting {
                    *st = ServiceState::Ready(took);
                    return true;
                }
                false
            });
        }
    }
}

/// Probe every `interval` until ready, failed, the service exits, or teardown begins.
async fn probe_loop(
    h: ResolvedHealth,
    ctx: ProbeCtx,
    tx: Arc<watch::Sender<ServiceState>>,
    started: Instant,
    stopping: Arc<std::sync::atomic::AtomicBool>,
) {
    let ctx = Arc::new(ctx);
    let mut failures = 0u32;
    loop {
        if stopping.load(std::sync::atomic::Ordering::SeqCst)
            || *tx.borrow() != ServiceState::Starting
        {
            return;
        }
        let attempt = tokio::time::timeout(h.timeout, probe_once(&h.probe, ctx.clone())).await;
        let result = match attempt {
            Ok(r) => r,
            Err(_) => Err(format!(
                "probe timed out after {}",
                crate::units::format_duration(h.timeout)
            )),
        };
        let elapsed = started.elapsed();
        let next = match result {
            Ok(()) => Some(ServiceState::Ready(elapsed)),
            Err(e) => {
                if elapsed >= h.start_period {
                    failures += 1;
                }
                if h.retries.is_some_and(|r| failures >= r) {
                    Some(ServiceState::Failed(format!(
                        "health check failed {failures} times in a row; last: {e}"
                    )))
                } else if elapsed >= h.deadline {
                    Some(ServiceState::Failed(format!(
                        "not ready after {}; last probe: {e}",
                        crate::units::format_duration(h.deadline)
                    )))
                } else {
                    None
                }
            }
        };
        if let Some(state) = next {
            tx.send_if_modified(|st| {
                if *st == ServiceState::Starting {
                    *st = state;
                    return true;
                }
                false
            });
            return;
        }
        tokio::time::sleep(h.interval).await;
    }
}

async fn probe_once(probe: &ResolvedProbe, ctx: Arc<ProbeCtx>) -> Result<(), String> {
    match probe {
        ResolvedProbe::Tcp(port) => {
            let port = *port;
            in_stage(&ctx, move || {
                std::net::TcpStream::connect(("127.0.0.1", port))
                    .map(|_| ())
                    .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))
            })
            .await
        }
        ResolvedProbe::Http { port, path, status } => {
            let (port, path, want) = (*port, path.clone(), *status);
            in_stage(&ctx, move || http_probe(port, &path, want)).await
        }
        ResolvedProbe::Exec(_) => exec_probe(&ctx).await,
        ResolvedProbe::Log(_) => Err("log probes are driven by output".into()),
    }
}

/// Run blocking socket work where the service's sockets are: on a thread inside the stage
/// network namespace, or on the host.
async fn in_stage(
    ctx: &Arc<ProbeCtx>,
    f: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<(), String> {
    let ns = ctx.netns.clone();
    tokio::task::spawn_blocking(move || match ns {
        Some(path) => {
            let ns = stagehand_supervisor::netns::NetNs::open(&path).map_err(|e| e.to_string())?;
            stagehand_supervisor::netns::run_in(&ns, f).map_err(|e| e.to_string())?
        }
        None => f(),
    })
    .await
    .map_err(|e| e.to_string())?
}

fn http_probe(port: u16, path: &str, want: Option<u16>) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: stagehand-health\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
    let head = String::from_utf8_lossy(&buf[..n]);
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not an HTTP response: {head:?}"))?;
    let ok = match want {
        Some(w) => code == w,
        None => (200..300).contains(&code),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("GET {path} answered {code}"))
    }
}

async fn exec_probe(ctx: &Arc<ProbeCtx>) -> Result<(), String> {
    let Some(e) = &ctx.exec else {
        return Err("no exec probe".into());
    };
    let mut argv: Vec<OsString> = e.runtime_exec.clone().unwrap_or_default();
    // The command reaches the shell on its stdin, never on an argv: argv is world-readable
    // in /proc/<pid>/cmdline (also `runc exec`'s, on the host), and the command may hold a
    // rendered secret. `eval` then runs it with stdin from /dev/null, as `sh -c` did.
    argv.extend([
        "sh".into(),
        "-c".into(),
        "eval \"$(cat)\" </dev/null".into(),
    ]);
    let (command_in, mut command_out) = std::io::pipe().map_err(|e| e.to_string())?;
    let mut spec = SpawnSpec::new(argv, e.env.clone(), &e.cwd);
    spec.stdin = process::Stdin::Fd(command_in.into());
    spec.user = e.user.clone();
    if e.runtime_exec.is_none() && spec.user.is_none() {
        // Rootless: probe as the user, like the service.
        spec.keep_id = stagehand_supervisor::userns::keep_id_maps();
    }
    spec.output = OutputTarget::Null;
    spec.process_group = true;
    spec.parent_death_signal = Some(libc::SIGKILL);
    if let Some(ns) = &e.netns {
        spec.netns = Some(
            stagehand_supervisor::netns::NetNs::open(ns)
                .and_then(|n| n.fd())
                .map_err(|e| e.to_string())?,
        );
    }
    if let Some(h) = &e.hosts {
        spec.private_mounts.push(
            stagehand_supervisor::process::BindMount::new(h, "/etc/hosts")
                .map_err(|e| e.to_string())?,
        );
    }
    let child = process::spawn(spec).map_err(|e| e.to_string())?;
    // From a thread: a command longer than the pipe's buffer must not block the probe loop,
    // and a shell that died early just makes the write fail.
    let command = e.command.clone();
    std::thread::spawn(move || {
        use std::io::Write as _;
        let _ = command_out.write_all(command.as_bytes());
    });
    // Dropped by the caller's timeout: the group is killed so no probe outlives its turn.
    struct Kill<'a>(&'a Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            if self.0.try_status().is_none() {
                let _ = self.0.signal_group(libc::SIGKILL);
            }
        }
    }
    let guard = Kill(&child);
    let status = child.wait().await;
    drop(guard);
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{}` {status}", e.command))
    }
}

/// What may cut a step's preparation short (an image pull): the stage's abort and the step's
/// deadline.
#[derive(Default)]
pub(crate) struct Abort {
    pub cancel: Option<CancellationToken>,
    pub deadline: Option<tokio::time::Instant>,
}

struct Spawned {
    child: Arc<Child>,
    reader: tokio::task::JoinHandle<()>,
    outputs: Option<PathBuf>,
    sandbox: Option<StepSandbox>,
    container: Option<super::container::Container>,
}

impl Executor for HostExecutor {
    fn run<'a>(
        &'a self,
        step: &'a ResolvedStep,
        out: Arc<dyn LineSink>,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, Outcome> {
        async move {
            // The deadline starts before the step is prepared: pulling and unpacking an image
            // are part of the step and are bounded by its timeout and by an abort.
            let deadline = step.timeout.map(|t| tokio::time::Instant::now() + t);
            let abort = Abort {
                cancel: Some(cancel.clone()),
                deadline,
            };
            let Spawned {
                child,
                reader,
                outputs: outputs_file,
                sandbox,
                container,
            } = match self.spawn(step, out.clone(), &abort) {
                Ok(x) => x,
                Err(_) if cancel.is_cancelled() => return Outcome::Cancelled,
                Err(_) if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) => {
                    return Outcome::TimedOut;
                }
                Err(e) => return Outcome::Error(e),
            };
            let timed_out = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            enum End {
                Exited,
                Timeout,
                Cancel,
            }
            let end = tokio::select! {
                _ = child.wait() => End::Exited,
                _ = timed_out => End::Timeout,
                _ = cancel.cancelled() => End::Cancel,
            };
            // Whatever ended it, nothing of the step's process group may outlive the step.
            let status = process::stop(&child, libc::SIGTERM, RUN_STOP_GRACE).await;
            let oom = oom_cause(sandbox.as_ref().and_then(|s| s.cgroup.as_ref()))
                .map(|why| format!("{} {why}", step.id));
            let start_error = match (&container, &self.containers, &end) {
                (Some(c), Some(cs), End::Exited) if !status.success() => cs.start_error(c),
                _ => None,
            };
            // Kill by cgroup membership: a `setsid` child escaped the process group.
            for e in self.finish(sandbox.as_ref()) {
                out.line(&step.id, &format!("[stagehand] cleanup: {e}"));
            }
            if let (Some(c), Some(containers)) = (&container, &self.containers) {
                for e in containers.cleanup(c, self.stage().as_deref()) {
                    out.line(&step.id, &format!("[stagehand] cleanup: {e}"));
                }
            }
            finish_reader(reader).await;
            if let (Some(msg), End::Exited) = (&oom, &end) {
                return Outcome::Error(msg.clone());
            }
            if let Some(msg) = start_error {
                return Outcome::Error(msg);
            }
            match end {
                End::Timeout => Outcome::TimedOut,
                End::Cancel => Outcome::Cancelled,
                End::Exited => {
                    let outputs = match &outputs_file {
                        Some(p) if status.success() => read_outputs(p),
                        _ => BTreeMap::new(),
                    };
                    Outcome::Exited {
                        code: status.exit_code(),
                        outputs,
                    }
                }
            }
        }
        .boxed()
    }

    fn start_service<'a>(
        &'a self,
        step: &'a ResolvedStep,
        out: Arc<dyn LineSink>,
    ) -> BoxFuture<'a, Result<watch::Receiver<ServiceState>, String>> {
        async move {
            let initial = if step.health_check.is_some() {
                ServiceState::Starting
            } else {
                ServiceState::Ready(Duration::ZERO)
            };
            let (tx, rx) = watch::channel(initial);
            let tx = Arc::new(tx);
            let started = Instant::now();
            // A `log:` probe watches the output lines as they arrive.
            let sink: Arc<dyn LineSink> = match step.health_check.as_ref().map(|h| &h.probe) {
                Some(ResolvedProbe::Log(re)) => Arc::new(LogProbe {
                    inner: out.clone(),
                    re: re.clone(),
                    tx: tx.clone(),
                    started,
                }),
                _ => out.clone(),
            };
            let Spawned {
                child,
                reader,
                sandbox,
                container,
                ..
            } = self.spawn(step, sink, &Abort::default())?;
            // An image's own HEALTHCHECK counts when the step sets none (Docker's rule).
            let image_health = match (&step.health_check, &container, &self.containers) {
                (None, Some(_), Some(cs)) => step.image.as_deref().and_then(|i| cs.image_health(i)),
                _ => None,
            };
            if image_health.is_some() {
                let _ = tx.send(ServiceState::Starting);
            }
            let health = step.health_check.clone().or(image_health);
            if let Some(stage) = self.stage() {
                stage.record_service(&step.id, child.pid());
            }
            // The exit report comes after the service's last lines have been read, so they are
            // in its log (and on the terminal) before the failure report quotes them.
            let (reader, drained) = watch_drain(reader);
            let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
            // Follow the service's exit while the stage runs.
            {
                let child = child.clone();
                let stopping = stopping.clone();
                let tx = tx.clone();
                let oom_cg = sandbox.as_ref().and_then(|s| s.cgroup.clone());
                let start_error = match (&container, &self.containers) {
                    (Some(c), Some(cs)) => Some(cs.start_error_reader(c)),
                    _ => None,
                };
                let mut drained = drained;
                tokio::spawn(async move {
                    let status = child.wait().await;
                    // A failure report quotes the service's last lines: let them arrive first.
                    // Bounded, since a daemonized grandchild may hold the pipe open; and not
                    // for a clean exit, which quotes nothing (a launcher that leaves a daemon
                    // behind must be seen to have exited at once).
                    let failing =
                        !status.success() || matches!(*tx.borrow(), ServiceState::Starting);
                    if failing {
                        let _ = tokio::time::timeout(EXIT_DRAIN, drained.wait_for(|d| *d)).await;
                    }
                    if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                        return;
                    }
                    let oom = oom_cause(oom_cg.as_ref());
                    let not_started = match &start_error {
                        Some(read) if oom.is_none() && !status.success() => read(),
                        _ => None,
                    };
                    let why = oom.or_else(|| not_started.clone()).unwrap_or_else(|| {
                        format!(
                            "exited after {}: {status}",
                            crate::units::format_duration(started.elapsed())
                        )
                    });
                    tx.send_modify(|st| {
                        *st = match st {
                            ServiceState::Starting if not_started.is_some() => {
                                ServiceState::Failed(why)
                            }
                            ServiceState::Starting => {
                                ServiceState::Failed(format!("{why}, before it was ready"))
                            }
                            _ => ServiceState::Exited {
                                description: why,
                                clean: status.success(),
                            },
                        }
                    });
                });
            }
            if let Some(h) = health {
                if !matches!(h.probe, ResolvedProbe::Log(_)) {
                    let ctx = ProbeCtx {
                        netns: self
                            .stage()
                            .and_then(|s| s.netns_path().map(Path::to_path_buf)),
                        exec: match &h.probe {
                            ResolvedProbe::Exec(cmd) => Some(self.probe_spec_parts(
                                step,
                                cmd,
                                container.as_ref().map(|c| c.id.as_str()),
                            )?),
                            _ => None,
                        },
                    };
                    tokio::spawn(probe_loop(h, ctx, tx.clone(), started, stopping.clone()));
                } else {
                    // The deadline still applies to a log probe.
                    let tx = tx.clone();
                    let deadline = h.deadline;
                    tokio::spawn(async move {
                        tokio::time::sleep(deadline).await;
                        tx.send_if_modified(|st| {
                            if *st == ServiceState::Starting {
                                *st = ServiceState::Failed(format!(
                                    "no output line matched the health check within {}",
                                    crate::units::format_duration(deadline)
                                ));
                                return true;
                            }
                            false
                        });
                    });
                }
            }
            self.services.lock().await.push(Service {
                id: step.id.clone(),
                sandbox,
                child,
                stopping,
                output_done: reader,
                container,
            });
            Ok(rx)
        }
        .boxed()
    }

    fn teardown<'a>(&'a self) -> BoxFuture<'a, (Vec<ServiceEnd>, Vec<String>)> {
        async move {
            let services: Vec<Service> = std::mem::take(&mut *self.services.lock().await);
            for s in &services {
                s.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            // Reverse start order: the signal goes out in that order as each future is first
            // polled; the waits then overlap, so teardown takes one grace period, not N.
            let grace = self.stop_timeout;
            let mut readers = Vec::new();
            let ends = join_all(services.into_iter().rev().map(|s| async move {
                let already = s.child.try_status();
                let status = process::stop(&s.child, libc::SIGTERM, grace).await;
                // A service that ended on its own with a failure fails the stage (it was gone
                // while later steps relied on it); how it ends once we stop it is not held
                // against it, but a SIGKILL after the grace period is worth saying.
                let (clean, description) = match already {
                    Some(st) => {
                        let not_started = || match (&s.container, &self.containers) {
                            (Some(c), Some(cs)) if !st.success() => cs.start_error(c),
                            _ => None,
                        };
                        let why = oom_cause(s.sandbox.as_ref().and_then(|sb| sb.cgroup.as_ref()))
                            .or_else(not_started)
                            .unwrap_or_else(|| format!("had exited before the stage ended: {st}"));
                        (st.success(), why)
                    }
                    None if status.signal == Some(libc::SIGKILL) => (
                        true,
                        format!(
                            "stopped: did not exit within {} of SIGTERM, killed",
                            crate::units::format_duration(grace)
                        ),
                    ),
                    None => (true, format!("stopped: {status}")),
                };
                if let (Some(c), Some(containers)) = (&s.container, &self.containers) {
                    for e in containers.cleanup(c, self.stage().as_deref()) {
                        tracing::warn!(service = %s.id, error = %e, "container cleanup");
                    }
                }
                (
                    ServiceEnd {
                        id: s.id,
                        description,
                        clean,
                    },
                    s.output_done,
                )
            }))
            .await
            .into_iter()
            .map(|(end, reader)| {
                readers.push(reader);
                end
            })
            .collect();
            // Then the backstop: every process left in any step cgroup is killed, cgroups,
            // namespace, forwarders and slirp4netns go.
            let stage = self.stage.lock().unwrap_or_else(|e| e.into_inner()).take();
            let errors = match stage.map(Arc::try_unwrap) {
                Some(Ok(stage)) => stage.teardown().await,
                Some(Err(_)) => vec!["stage sandbox still in use at teardown".to_string()],
                None => Vec::new(),
            };
            // Output pipes close once the last process holding them is gone, which after the
            // cgroup kill above is now (or within the reader's bound).
            for r in readers {
                finish_reader(r).await;
            }
            (ends, errors)
        }
        .boxed()
    }
}

/// Send the child's (merged) output, line by line, to `out` under the step's id.
fn forward_output(
    child: &mut Child,
    id: &str,
    out: Arc<dyn LineSink>,
) -> tokio::task::JoinHandle<()> {
    let stdout = child.take_stdout();
    let id = id.to_string();
    tokio::spawn(async move {
        if let Some(fd) = stdout {
            let _ = process::read_lines(fd, |line| out.line(&id, line)).await;
        }
    })
}

/// How long a service's exit report waits for the rest of its output.
const EXIT_DRAIN: Duration = Duration::from_millis(300);

/// Wrap an output reader so its end can also be awaited elsewhere: the returned handle ends
/// when the reader does (aborting it aborts the reader), and the receiver turns `true` then.
fn watch_drain(
    reader: tokio::task::JoinHandle<()>,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::watch::Receiver<bool>,
) {
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let (tx, rx) = tokio::sync::watch::channel(false);
    let guard = AbortOnDrop(reader.abort_handle());
    let wrapper = tokio::spawn(async move {
        let _guard = guard;
        let _ = reader.await;
        let _ = tx.send(true);
    });
    (wrapper, rx)
}

/// Wait for the output reader to drain, but not forever: a `setsid` grandchild may still hold
/// the pipe open (cgroup teardown is what ends those).
async fn finish_reader(reader: tokio::task::JoinHandle<()>) {
    let abort = reader.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), reader)
        .await
        .is_err()
    {
        abort.abort();
    }
}

fn extension(shell: Shell) -> &'static str {
    match shell {
        Shell::Sh | Shell::Bash => "sh",
        Shell::Python => "py",
        Shell::Pwsh | Shell::PowerShell => "ps1",
    }
}

/// Code appended to a script that writes the final value of each output variable to `file`,
/// as `NAME\0VALUE\0` records (a shell value cannot hold NUL, so this is unambiguous).
fn capture_code(shell: Shell, names: &[String], file: &Path) -> String {
    let f = file.display().to_string();
    let mut s = String::from("\n");
    match shell {
        Shell::Sh | Shell::Bash => {
            let q = f.replace('\'', r"'\''");
            for n in names {
                let _ = writeln!(s, "printf '%s\\0%s\\0' '{n}' \"${{{n}-}}\" >> '{q}'");
            }
        }
        Shell::Python => {
            let _ = writeln!(s, "import os as __stagehand_os");
            let _ = writeln!(s, "with open({f:?}, 'a') as __stagehand_f:");
            for n in names {
                let _ = writeln!(
                    s,
                    "    __stagehand_f.write({n:?} + '\\0' + str(globals().get({n:?}, __stagehand_os.environ.get({n:?}, ''))) + '\\0')"
                );
            }
        }
        Shell::Pwsh | Shell::PowerShell => {
            for n in names {
                let _ = writeln!(
                    s,
                    "[IO.File]::AppendAllText('{f}', '{n}' + [char]0 + $(if (Test-Path variable:{n}) {{ \"${n}\" }} else {{ \"$Env:{n}\" }}) + [char]0)"
                );
            }
        }
    }
    s
}

fn read_outputs(path: &Path) -> BTreeMap<String, String> {
    let data = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&data);
    let mut parts = text.split('\0');
    let mut out = BTreeMap::new();
    while let (Some(k), Some(v)) = (parts.next(), parts.next()) {
        if !k.is_empty() {
            out.insert(k.to_string(), v.to_string());
        }
    }
    out
}

#[derive(Debug)]
pub struct HostUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: String,
}

/// The host identity a step's `runAsUser` names, if any. Rootless, host steps always run as
/// the user (see [`rootless_run_as_note`]).
fn step_user(step: &ResolvedStep) -> Result<Option<HostUser>, String> {
    if stagehand_supervisor::userns::in_user_namespace() {
        return Ok(None);
    }
    match &step.run_as_user {
        Some(u) if !u.trim().is_empty() => lookup_user(u.trim()).map(Some),
        _ => Ok(None),
    }
}

/// Rootless, a host step's `runAsUser` naming someone else cannot be honoured (only root can
/// become another user): the note said in the step's output.
fn rootless_run_as_note(step: &ResolvedStep) -> Option<String> {
    use stagehand_supervisor::userns;
    let wanted = step
        .run_as_user
        .as_deref()
        .map(str::trim)
        .filter(|u| !u.is_empty())?;
    if !userns::in_user_namespace() || step.image.is_some() {
        return None;
    }
    let me = userns::host_uid();
    let name = userns::user_name(me).unwrap_or_else(|| me.to_string());
    if wanted == name || wanted == me.to_string() {
        return None;
    }
    Some(format!(
        "[stagehand] runAsUser `{wanted}` is not applied: a rootless stagehand runs host steps as you ({name})"
    ))
}

/// `runAsUser`: a uid or a user name, looked up in /etc/passwd and /etc/group.
pub fn lookup_user(spec: &str) -> Result<HostUser, String> {
    lookup_user_in(spec, Path::new("/etc/passwd"), Path::new("/etc/group"))
}

fn lookup_user_in(spec: &str, passwd: &Path, group: &Path) -> Result<HostUser, String> {
    let pw =
        std::fs::read_to_string(passwd).map_err(|e| format!("read {}: {e}", passwd.display()))?;
    let entry = pw
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() >= 7 && (f[0] == spec || f[2] == spec));
    let (name, uid, gid, home) = match entry {
        Some(f) => (
            f[0].to_string(),
            f[2].parse().unwrap_or(0),
            f[3].parse().unwrap_or(0),
            f[5].to_string(),
        ),
        None => match spec.parse::<u32>() {
            // A bare uid with no passwd entry still runs, in its own group, as Kubernetes does.
            Ok(uid) => (uid.to_string(), uid, uid, "/".to_string()),
            Err(_) => {
                return Err(format!(
                    "runAsUser: no user `{spec}` on this host (not in {})",
                    passwd.display()
                ));
            }
        },
    };
    let mut groups = vec![gid];
    if let Ok(gr) = std::fs::read_to_string(group) {
        for f in gr
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .filter(|f| f.len() >= 4)
        {
            if f[3].split(',').any(|m| m == name) {
                if let Ok(g) = f[2].parse() {
                    if !groups.contains(&g) {
                        groups.push(g);
                    }
                }
            }
        }
    }
    // Switching identity needs root.
    let me = nix::unistd::geteuid().as_raw();
    if me != 0 && me != uid {
        return Err(format!(
            "runAsUser `{spec}` needs stagehand to run as root (it runs as uid {me})"
        ));
    }
    Ok(HostUser {
        name,
        uid,
        gid,
        groups,
        home,
    })
}

/// "was killed: out of memory (limit 500Mi)" when the step's cgroup saw an OOM kill: the
/// reason to report whatever its exit status says.
fn oom_cause(cg: Option<&stagehand_supervisor::cgroup::Cgroup>) -> Option<String> {
    let cg = cg.filter(|c| c.oom_killed().unwrap_or(false))?;
    let limit = cg
        .memory_limit()
        .map(|b| format!(" (limit {})", crate::units::format_memory(b)))
        .unwrap_or_default();
    Some(format!("was killed: out of memory{limit}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_roundtrip_through_sh() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("o");
        std::fs::write(&f, "").unwrap();
        let code = format!(
            "A='x y'\nB=$(printf 'multi\\nline')\n{}",
            capture_code(Shell::Sh, &["A".into(), "B".into(), "C".into()], &f)
        );
        let script = dir.path().join("s.sh");
        std::fs::write(&script, code).unwrap();
        let out = process::run_output(
            ["sh", "-e", script.to_str().unwrap()],
            [("PATH", "/usr/bin:/bin")],
            dir.path(),
        )
        .unwrap();
        assert!(out.status.success(), "{out:?}");
        let vals = read_outputs(&f);
        assert_eq!(vals["A"], "x y");
        assert_eq!(vals["B"], "multi\nline");
        assert_eq!(vals["C"], "");
    }

    #[test]
    fn users_by_name_and_uid() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("passwd");
        let gr = dir.path().join("group");
        std::fs::write(
            &pw,
            "root:x:0:0:root:/root:/bin/sh\npostgres:x:105:110::/var/lib/postgresql:/bin/bash\n",
        )
        .unwrap();
        std::fs::write(&gr, "postgres:x:110:\nssl-cert:x:109:postgres,other\n").unwrap();
        if nix::unistd::geteuid().is_root() {
            let u = lookup_user_in("postgres", &pw, &gr).unwrap();
            assert_eq!((u.uid, u.gid, u.groups.clone()), (105, 110, vec![110, 109]));
            assert_eq!(lookup_user_in("105", &pw, &gr).unwrap().name, "postgres");
            assert_eq!(lookup_user_in("4242", &pw, &gr).unwrap().gid, 4242);
        }
        assert!(
            lookup_user_in("nobody-here", &pw, &gr)
                .unwrap_err()
                .contains("no user `nobody-here`")
        );
    }
}
