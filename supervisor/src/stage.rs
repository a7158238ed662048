//! The stage sandbox: one pod per stage run, and the journal that lets `gc` undo it.
//!
//! Owns: composing the pieces of this crate into a stage: the cgroup tree
//! (`stagehand/<run-id>/<step-id>`), the network namespace with loopback up, the stage hosts
//! file (step ids → 127.0.0.1) and resolv.conf, port forwarders, slirp4netns for outbound
//! traffic, the per-step spawn hooks that put a host process into all of that before it execs,
//! and teardown that kills by cgroup membership and removes everything. Every resource is
//! written to `<run dir>/state.json` *before* it is created (DESIGN invariant 2), so after a
//! SIGKILL of stagehand, [`gc`] can find and remove it.
//! Does not own: what runs in the stage (the runner), or stopping processes gracefully (the
//! runner stops services with [`crate::process::stop`] first; teardown here is the backstop).
//!
//! The journal is the source of truth for undoing: teardown and [`gc`] both remove what
//! `state.json` lists (not only what this process still holds), keep listing what they could
//! not remove, and set `finished` only once nothing is left, so a failed teardown is retried
//! by the next `gc`.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cgroup::{self, Cgroup, CgroupError, Hierarchy, Limits};
use crate::forward::{Forwarders, PortBinding};
use crate::netns::{self, NetError, NetNs};
use crate::process::{self, BindMount, Child, OutputTarget, SpawnSpec};

/// The cgroup below stagehand's own (in every hierarchy) that holds the cgroup of every run.
const CGROUP_PARENT: &str = "stagehand";
/// The cgroup, below the stage's, that slirp4netns runs in, so it is killed by membership
/// like any step process.
const SLIRP_CGROUP: &str = "stagehand-slirp4netns";
/// How long slirp4netns may take to configure its tap device and report ready.
const SLIRP_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long slirp4netns gets to exit on SIGTERM at teardown before SIGKILL.
const SLIRP_STOP_GRACE: Duration = Duration::from_secs(1);
/// How often creating a cgroup is retried when a concurrent run removed the shared
/// `stagehand` parent between our `mkdir`s (see [`Stage::create_cgroup`]).
const CGROUP_CREATE_ATTEMPTS: usize = 5;

/// Errors setting up or tearing down a stage, each naming what it acted on.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The run directory could not be created or resolved to an absolute path.
    #[error("cannot create run directory {}: {source}", path.display())]
    RunDir {
        /// The run directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the journal (`state.json`) failed.
    #[error("cannot write run state {}: {source}", path.display())]
    State {
        /// The journal file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// stagehand's own start time is unreadable, so `gc` could not tell this run from a dead
    /// one with a reused pid.
    #[error(
        "cannot read the start time of stagehand (pid {pid}) from /proc/{pid}/stat: is /proc mounted?"
    )]
    StartTime {
        /// stagehand's pid.
        pid: i32,
    },
    /// A stage file (resolv.conf) could not be written.
    #[error("cannot write {}: {source}", path.display())]
    WriteFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating, filling or removing a stage or step cgroup failed.
    #[error("cgroups: {0}")]
    Cgroup(#[from] CgroupError),
    /// The namespace, a port forwarder, or the hosts file failed.
    #[error("stage network: {0}")]
    Net(#[from] NetError),
    /// slirp4netns could not be started.
    #[error("cannot start slirp4netns ({}): {source}", binary.display())]
    SlirpStart {
        /// The slirp4netns binary.
        binary: PathBuf,
        /// Why the spawn failed.
        #[source]
        source: Box<crate::Error>,
    },
    /// slirp4netns started but did not report ready (it exited, or timed out).
    #[error("slirp4netns ({}) did not come up: {source}; its output is in {}", binary.display(), log.display())]
    SlirpNotReady {
        /// The slirp4netns binary.
        binary: PathBuf,
        /// Where its stdout and stderr went.
        log: PathBuf,
        /// What [`crate::slirp::wait_ready`] saw.
        #[source]
        source: NetError,
    },
    /// A stage file cannot be bind-mounted into a step.
    #[error("cannot show {} at {target} in the step: {source}", path.display())]
    Mount {
        /// The stage file.
        path: PathBuf,
        /// Where the step should see it.
        target: &'static str,
        /// Why the mount cannot be described.
        #[source]
        source: process::ProcessError,
    },
}

/// How the stage's steps see the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network {
    /// One network namespace for the stage; `outbound` connects it through slirp4netns.
    Isolated {
        /// Give the namespace outbound connectivity (and the host's loopback as 10.0.2.2).
        outbound: bool,
    },
    /// The host's namespace (`--network host`).
    Host,
}

/// What a stage is made of.
#[derive(Clone, Debug)]
pub struct StageConfig {
    /// `<run dir>`: holds `state.json`, the netns file, hosts, resolv.conf. Created if
    /// missing; several stages of one run share it (one after the other).
    pub run_dir: PathBuf,
    /// The run id: names the run's cgroup (`stagehand/<run-id>`).
    pub run_id: String,
    /// The stage id: names the stage's files in the run dir.
    pub stage_id: String,
    /// `/sys/fs/cgroup`, or a fake root in tests; `None` runs without cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// Network isolation of the stage.
    pub network: Network,
    /// Names that resolve to 127.0.0.1 inside the stage (step ids, `sg1_Background_1`, ...).
    pub hostnames: Vec<String>,
    /// Ports published on the host's 127.0.0.1.
    pub port_bindings: Vec<PortBinding>,
    /// The slirp4netns binary (used with `Network::Isolated { outbound: true }`).
    pub slirp4netns: PathBuf,
}

/// A process recorded in the journal: the pid with its start time, so `gc` never signals an
/// unrelated process that got the same pid later.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// The process id.
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat` ([`process_start`]); 0 when unknown (never killed).
    pub start: u64,
}

/// What `state.json` records. Paths are absolute; everything listed is removed by teardown or
/// by `gc`, and stays listed until it is. Unknown or missing fields take their defaults, so a
/// journal from another stagehand version still loads.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct RunState {
    /// The run id.
    pub run_id: String,
    /// The pid of the stagehand that owns the run.
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: with `pid`, identifies stagehand across pid reuse.
    pub pid_start: u64,
    /// The cgroup root the run's cgroups live under.
    pub cgroup_root: Option<PathBuf>,
    /// `/proc/self/cgroup` of the stagehand that made the cgroups: they are relative to its
    /// own cgroup, and `gc` may run in another one.
    pub proc_self_cgroup: Option<String>,
    /// Relative cgroup paths, e.g. `stagehand/<run>` (each removed with its descendants).
    pub cgroups: Vec<PathBuf>,
    /// Network namespace files (bind mounts) in the run directory.
    pub netns: Vec<PathBuf>,
    /// Host ports with a forwarder (informational: they close with the process).
    pub ports: Vec<u16>,
    /// Services: step id → pid, for `stagehand ps`.
    pub services: BTreeMap<String, i32>,
    /// Processes that must die with the run (slirp4netns; it also runs in the stage cgroup
    /// when there is one, so this matters on hosts without cgroups).
    pub pids: Vec<ProcessRecord>,
    /// Set when teardown or gc finished: nothing is left to undo.
    pub finished: bool,
    /// Mounts made for the run (container root filesystems), inside the run directory.
    #[serde(default)]
    pub mounts: Vec<PathBuf>,
}

impl RunState {
    /// Reads `<run_dir>/state.json`; `None` if it is missing or unreadable.
    pub fn load(run_dir: &Path) -> Option<RunState> {
        let text = std::fs::read(run_dir.join("state.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    /// Writes `<run_dir>/state.json` atomically (temporary file, then rename), so a crash
    /// mid-write leaves the previous journal intact.
    fn save(&self, run_dir: &Path) -> Result<(), StageError> {
        let path = run_dir.join("state.json");
        let tmp = run_dir.join("state.json.tmp");
        let data = serde_json::to_vec_pretty(self).map_err(|e| StageError::State {
            path: path.clone(),
            source: e.into(),
        })?;
        std::fs::write(&tmp, data)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| StageError::State { path, source })
    }
}

/// The start time of a process, to tell it from a later process with the same pid.
pub fn process_start(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Is the stagehand that wrote `state` still running?
pub fn is_alive(state: &RunState) -> bool {
    state.pid > 0 && process_start(state.pid) == Some(state.pid_start)
}

/// One step's place in the stage: its cgroup (none when the stage runs without cgroups).
#[derive(Debug, Clone)]
pub struct StepSandbox {
    /// The step cgroup, `stagehand/<run-id>/<step-id>`.
    pub cgroup: Option<Cgroup>,
}

/// A stage sandbox, from [`Stage::create`] to [`Stage::teardown`]. Dropping it without
/// teardown undoes nothing (the journal keeps the record for `gc`).
pub struct Stage {
    cfg: StageConfig,
    state: Mutex<RunState>,
    hierarchy: Option<Hierarchy>,
    stage_cgroup: Option<PathBuf>,
    netns: Option<NetNs>,
    hosts: PathBuf,
    resolv: Option<PathBuf>,
    forwarders: Mutex<Option<Forwarders>>,
    slirp: Mutex<Option<Child>>,
    /// Step cgroups in creation order (slirp4netns's first, when there is one).
    steps: Mutex<Vec<(String, Cgroup)>>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("run_id", &self.cfg.run_id)
            .field("stage", &self.cfg.stage_id)
            .finish()
    }
}

/// Harness limits when a Background step sets none: 500Mi and 400m.
pub const BACKGROUND_DEFAULTS: Limits = Limits {
    memory_bytes: Some(500 * 1024 * 1024),
    cpu_millis: Some(400),
    pids: Some(4096),
};

/// Locks a mutex, also after a panic elsewhere: every value guarded here stays consistent
/// (teardown must run even then).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn push_unique<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

impl Stage {
    /// Creates the stage: journal first, then each resource, recorded before it is made.
    /// On error, whatever was made is removed again before returning.
    pub fn create(mut cfg: StageConfig) -> Result<Stage, StageError> {
        let run_dir_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StageError::RunDir { path, source }
        };
        std::fs::create_dir_all(&cfg.run_dir).map_err(run_dir_err(&cfg.run_dir))?;
        // Absolute, so what the journal lists can be undone from any working directory.
        cfg.run_dir = std::fs::canonicalize(&cfg.run_dir).map_err(run_dir_err(&cfg.run_dir))?;
        let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        // Without our start time gc would take this live run for a dead one.
        let pid_start = process_start(pid).ok_or(StageError::StartTime { pid })?;
        // An earlier stage of this run may have left entries its teardown could not remove:
        // they stay listed, so this stage's teardown (or gc) tries them again.
        let mut state = RunState::load(&cfg.run_dir).unwrap_or_default();
        state.run_id = cfg.run_id.clone();
        state.pid = pid;
        state.pid_start = pid_start;
        state.finished = false;
        state.cgroup_root = cfg.cgroup_root.clone();
        state.proc_self_cgroup = std::fs::read_to_string("/proc/self/cgroup").ok();
        // The journal exists, naming its owner, before the first resource.
        state.save(&cfg.run_dir)?;
        let mut stage = Stage {
            hosts: cfg.run_dir.join(format!("hosts-{}", cfg.stage_id)),
            cfg,
            state: Mutex::new(state),
            hierarchy: None,
            stage_cgroup: None,
            netns: None,
            resolv: None,
            forwarders: Mutex::new(None),
            slirp: Mutex::new(None),
            steps: Mutex::new(Vec::new()),
        };
        match stage.build() {
            Ok(()) => Ok(stage),
            Err(e) => {
                for err in stage.release_sync() {
                    tracing::warn!(error = %err, "cleanup after a failed stage setup");
                }
                Err(e)
            }
        }
    }

    /// Applies `f` to the journal and writes it.
    fn record(&self, f: impl FnOnce(&mut RunState)) -> Result<(), StageError> {
        let mut state = lock(&self.state);
        f(&mut state);
        state.save(&self.cfg.run_dir)
    }

    fn build(&mut self) -> Result<(), StageError> {
        // Ports first: a taken port must fail the stage before anything else exists. They
        // are recorded once bound (a port 0 is only known then) and need no undoing: the
        // listeners close with this process.
        let fw = Forwarders::bind(&self.cfg.port_bindings)?;
        let ports = fw.ports();
        *lock(&self.forwarders) = Some(fw);
        self.record(|s| s.ports.extend(ports))?;

        if let Some(root) = &self.cfg.cgroup_root {
            let h = cgroup::detect(root)?;
            let rel = Path::new(CGROUP_PARENT).join(&self.cfg.run_id);
            self.record(|s| push_unique(&mut s.cgroups, rel.clone()))?;
            self.hierarchy = Some(h);
            self.create_cgroup(&rel, &Limits::default())?;
            self.stage_cgroup = Some(rel);
        }

        crate::hosts::write(&self.hosts, &self.cfg.hostnames)?;

        if let Network::Isolated { outbound } = self.cfg.network {
            let path = self
                .cfg
                .run_dir
                .join(format!("netns-{}", self.cfg.stage_id));
            self.record(|s| push_unique(&mut s.netns, path.clone()))?;
            self.netns = Some(NetNs::create(&path)?);
            if outbound {
                self.start_slirp(&path)?;
                // The host's resolver may be on its own loopback (127.0.0.53), which the
                // stage cannot reach; slirp's DNS forwarder at 10.0.2.3 can.
                let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                let loopback_only = host_resolv
                    .lines()
                    .any(|l| l.trim_start().starts_with("nameserver 127."));
                if loopback_only || host_resolv.trim().is_empty() {
                    let p = self
                        .cfg
                        .run_dir
                        .join(format!("resolv-{}.conf", self.cfg.stage_id));
                    std::fs::write(&p, crate::hosts::resolv_conf_for_slirp()).map_err(
                        |source| StageError::WriteFile {
                            path: p.clone(),
                            source,
                        },
                    )?;
                    self.resolv = Some(p);
                }
            }
        }
        Ok(())
    }

    /// Starts slirp4netns for the namespace at `ns_path` and waits until it is ready.
    fn start_slirp(&self, ns_path: &Path) -> Result<(), StageError> {
        let binary = self.cfg.slirp4netns.clone();
        let (read, write) = crate::slirp::ready_pipe()?;
        // slirp4netns writes "1" to its ready fd: the pipe's write end, kept at its number in
        // the child. Our copy is dropped with `spec`, so EOF means slirp4netns died early.
        let argv = crate::slirp::argv(&binary, ns_path, write.as_raw_fd());
        let path = std::env::var_os("PATH").unwrap_or_else(|| process::DEFAULT_PATH.into());
        let mut spec = SpawnSpec::new(argv, [("PATH", path)], "/");
        spec.inherit_fds.push(write);
        let log = self
            .cfg
            .run_dir
            .join(format!("slirp4netns-{}.log", self.cfg.stage_id));
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|source| StageError::WriteFile {
                path: log.clone(),
                source,
            })?;
        spec.output = OutputTarget::File(log_file);
        spec.parent_death_signal = Some(libc::SIGKILL);
        spec.process_group = true;
        if let Some(cg) = self.child_cgroup(SLIRP_CGROUP, &Limits::default())? {
            spec.cgroup_procs = cg.procs_files()?;
            lock(&self.steps).push((SLIRP_CGROUP.into(), cg));
        }
        let child = process::spawn(spec).map_err(|source| StageError::SlirpStart {
            binary: binary.clone(),
            source: Box::new(source),
        })?;
        let pid = child.pid();
        let start = process_start(pid).unwrap_or(0);
        // Not reaped after reading: the start time is our child's, not a successor's.
        let start = if child.try_status().is_none() {
            start
        } else {
            0
        };
        *lock(&self.slirp) = Some(child);
        self.record(|s| s.pids.push(ProcessRecord { pid, start }))?;
        crate::slirp::wait_ready(&read, SLIRP_READY_TIMEOUT).map_err(|source| {
            StageError::SlirpNotReady {
                binary,
                log,
                source,
            }
        })
    }

    /// Creates a cgroup, retrying when a concurrent run's teardown removed the shared
    /// `stagehand` parent between our `mkdir`s (it removes it when it looks unused).
    fn create_cgroup(&self, rel: &Path, limits: &Limits) -> Result<Option<Cgroup>, StageError> {
        let Some(h) = &self.hierarchy else {
            return Ok(None);
        };
        let mut attempt = 1;
        loop {
            match h.create(rel, limits) {
                Ok(cg) => return Ok(Some(cg)),
                Err(CgroupError::Create { error, .. })
                    if error.kind() == io::ErrorKind::NotFound
                        && attempt < CGROUP_CREATE_ATTEMPTS =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Creates `<stage cgroup>/<name>` with `limits`; `None` without cgroups.
    fn child_cgroup(&self, name: &str, limits: &Limits) -> Result<Option<Cgroup>, StageError> {
        match &self.stage_cgroup {
            Some(rel) => self.create_cgroup(&rel.join(name), limits),
            None => Ok(None),
        }
    }

    /// Starts forwarding published ports; call inside the tokio runtime, before services start.
    pub fn start_forwarders(&self) -> Result<(), StageError> {
        if let Some(fw) = lock(&self.forwarders).as_mut() {
            fw.start(self.netns.as_ref())?;
        }
        Ok(())
    }

    /// The network namespace file, if the stage has one (containers join it by path).
    pub fn netns_path(&self) -> Option<&Path> {
        self.netns.as_ref().map(|n| n.path())
    }

    /// The stage hosts file (steps see it at `/etc/hosts`).
    pub fn hosts_path(&self) -> &Path {
        &self.hosts
    }

    /// The stage resolv.conf, when the host's is unusable from the stage namespace.
    pub fn resolv_path(&self) -> Option<&Path> {
        self.resolv.as_deref()
    }

    /// The absolute run directory (holds `state.json`).
    pub fn run_dir(&self) -> &Path {
        &self.cfg.run_dir
    }

    /// A copy of the journal as last written.
    pub fn state(&self) -> RunState {
        lock(&self.state).clone()
    }

    /// Creates the step's cgroup (`stagehand/<run-id>/<step-id>`) with its limits. It lies
    /// inside the recorded stage cgroup, so the journal already covers it.
    pub fn step(&self, step_id: &str, limits: &Limits) -> Result<StepSandbox, StageError> {
        let cgroup = self.child_cgroup(step_id, limits)?;
        if let Some(cg) = &cgroup {
            lock(&self.steps).push((step_id.to_string(), cg.clone()));
        }
        Ok(StepSandbox { cgroup })
    }

    /// Puts a host process spec into the step's cgroup, the stage netns, and (as root) a
    /// private mount namespace that shows the stage hosts file (and resolv.conf) at /etc.
    pub fn apply(&self, step: &StepSandbox, spec: &mut SpawnSpec) -> Result<(), StageError> {
        if let Some(cg) = &step.cgroup {
            spec.cgroup_procs = cg.procs_files()?;
        }
        if let Some(ns) = &self.netns {
            spec.netns = Some(ns.fd()?);
        }
        // Rootless: stagehand is root of its own user namespace; the step runs as the user.
        if spec.user.is_none() && spec.keep_id.is_none() {
            spec.keep_id = crate::userns::keep_id_maps();
        }
        if nix::unistd::geteuid().is_root() {
            let mut files = vec![(&self.hosts, "/etc/hosts")];
            if let Some(r) = &self.resolv {
                files.push((r, "/etc/resolv.conf"));
            }
            for (path, target) in files {
                let m = BindMount::new(path, target).map_err(|source| StageError::Mount {
                    path: path.clone(),
                    target,
                    source,
                })?;
                spec.private_mounts.push(m);
            }
        }
        Ok(())
    }

    /// Records a running service for `stagehand ps` (best effort: a journal write failure
    /// only loses the listing, teardown does not depend on it).
    /// The step's cgroup path relative to stagehand's own cgroup (`stagehand/<run>/<step>`),
    /// for an OCI runtime's `cgroupsPath`; `None` when the stage has no cgroups.
    pub fn cgroup_rel(&self, step_id: &str) -> Option<PathBuf> {
        self.stage_cgroup.as_ref().map(|rel| rel.join(step_id))
    }

    /// Record a mount (a container's root filesystem) before it is made, so `gc` can undo it.
    pub fn record_mount(&self, path: &Path) -> Result<(), StageError> {
        let p = path.to_path_buf();
        self.record(|s| {
            if !s.mounts.contains(&p) {
                s.mounts.push(p)
            }
        })
    }

    /// The mount is gone (unmounted by its owner).
    pub fn forget_mount(&self, path: &Path) {
        let _ = self.record(|s| s.mounts.retain(|m| m != path));
    }

    pub fn record_service(&self, id: &str, pid: i32) {
        if let Err(e) = self.record(|s| {
            s.services.insert(id.to_string(), pid);
        }) {
            tracing::warn!(error = %e, service = id, "could not record the service in the run state");
        }
    }

    /// Kills every process of one step by cgroup membership and removes its cgroup (used
    /// when a Run step ends, so nothing it started outlives it). Returns every error.
    pub fn finish_step(&self, step: &StepSandbox) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(cg) = &step.cgroup {
            if let Err(e) = cg.kill_all() {
                errors.push(e.to_string());
            }
            if let Err(e) = cg.remove() {
                errors.push(e.to_string());
            }
            lock(&self.steps).retain(|(_, c)| c.paths() != cg.paths());
        }
        errors
    }

    /// Tears everything down: forwarders, slirp4netns (SIGTERM, then SIGKILL), every process
    /// by cgroup (steps in reverse creation order), the cgroups, the namespace and the stage
    /// files, then marks the run state finished if nothing is left. Tries every resource and
    /// returns every error.
    pub async fn teardown(self) -> Vec<String> {
        let fw = lock(&self.forwarders).take();
        if let Some(fw) = fw {
            fw.close().await;
        }
        let slirp = lock(&self.slirp).take();
        if let Some(child) = slirp {
            process::stop(&child, libc::SIGTERM, SLIRP_STOP_GRACE).await;
        }
        tokio::task::spawn_blocking(move || self.release_sync())
            .await
            .unwrap_or_else(|e| vec![format!("stage teardown panicked: {e}")])
    }

    /// The synchronous part of teardown, also the cleanup of a failed [`Stage::create`].
    /// Works from the journal, so it also removes what was recorded but only half made.
    fn release_sync(&self) -> Vec<String> {
        let mut errors = Vec::new();
        // Still here only after a failed create: it holds the namespace open.
        let slirp = lock(&self.slirp).take();
        if let Some(child) = slirp {
            if let Err(e) = child.signal_group(libc::SIGKILL) {
                errors.push(e.to_string());
            }
            child.wait_blocking();
        }
        // Steps newest first, so a service outlives the steps that may still talk to it.
        // remove_tree below kills whatever is left in the whole tree, and reports it.
        let steps = std::mem::take(&mut *lock(&self.steps));
        for (_, cg) in steps.iter().rev() {
            if let Err(e) = cg.kill_all() {
                errors.push(e.to_string());
            }
        }
        // Rootless without cgroups: process groups were stopped step by step; what escaped
        // them (setsid) has been reparented to us, the subreaper. Nothing of the stage may
        // outlive it.
        if self.hierarchy.is_none() && crate::userns::in_user_namespace() {
            let killed = process::kill_descendants(50);
            if !killed.is_empty() {
                tracing::debug!(?killed, "killed processes that escaped their step");
            }
        }
        let recorded = self.state();
        let mut mounts_left = Vec::new();
        for m in recorded.mounts.iter().rev() {
            if let Err(e) = detach(m) {
                errors.push(e);
                mounts_left.push(m.clone());
            }
        }
        let mut cgroups_left = Vec::new();
        if !recorded.cgroups.is_empty() {
            let h = match &self.hierarchy {
                Some(h) => Ok(h.clone()),
                None => hierarchy_for(&recorded),
            };
            match h {
                Ok(h) => {
                    for rel in &recorded.cgroups {
                        let errs = cgroup::remove_tree(&h, rel);
                        if !errs.is_empty() {
                            cgroups_left.push(rel.clone());
                        }
                        errors.extend(errs.into_iter().map(|e| e.to_string()));
                        sweep_empty(h.root(), rel);
                    }
                    remove_unused_parent(&h);
                }
                Err(e) => {
                    errors.push(e.to_string());
                    cgroups_left = recorded.cgroups.clone();
                }
            }
        }
        let mut netns_left = Vec::new();
        for ns in &recorded.netns {
            if let Err(e) = netns::remove_path(ns) {
                errors.push(e.to_string());
                netns_left.push(ns.clone());
            }
        }
        for file in std::iter::once(&self.hosts).chain(&self.resolv) {
            match std::fs::remove_file(file) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("cannot remove {}: {e}", file.display())),
            }
        }
        let mut st = lock(&self.state);
        st.finished = cgroups_left.is_empty() && netns_left.is_empty() && mounts_left.is_empty();
        st.mounts = mounts_left;
        st.cgroups = cgroups_left;
        st.netns = netns_left;
        st.ports.clear();
        st.services.clear();
        // slirp4netns was stopped and waited for above (or by teardown).
        st.pids.clear();
        if let Err(e) = st.save(&self.cfg.run_dir) {
            errors.push(e.to_string());
        }
        // A kill failure is met twice: in its step and again in the tree; say it once.
        let mut seen = std::collections::HashSet::new();
        errors.retain(|e| seen.insert(e.clone()));
        errors
    }
}

/// An OCI runtime creates the container's cgroup in every hierarchy, including ones stagehand
/// does not use (blkio, devices, cpuset, the hybrid `unified` tree), and leaves the parent
/// directories it made. Remove `stagehand/<run>` (empty directories only, deepest first) in
/// every hierarchy under `root`, relative to the hierarchy root and to our own cgroup there.
fn sweep_empty(root: &Path, rel: &Path) {
    let own: Vec<PathBuf> = std::fs::read_to_string("/proc/self/cgroup")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.splitn(3, ':').nth(2))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
        .collect();
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for e in entries.flatten() {
        let hier = e.path();
        let mut bases = vec![hier.clone()];
        bases.extend(own.iter().map(|o| hier.join(o)));
        for base in bases {
            let dir = base.join(rel);
            if dir.is_dir() {
                remove_empty_tree(&dir);
                let _ = std::fs::remove_dir(base.join(CGROUP_PARENT));
            }
        }
    }
}

fn remove_empty_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_empty_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Lazily unmount `path` (and anything stacked on it); fine if it is not mounted any more.
fn detach(path: &Path) -> Result<(), String> {
    loop {
        match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(format!("cannot unmount {}: {}", path.display(), e.desc())),
        }
    }
}

/// The cgroup hierarchy as the stagehand that wrote `state` saw it: its cgroups are relative
/// to that stagehand's own cgroup, which need not be ours.
fn hierarchy_for(state: &RunState) -> Result<Hierarchy, CgroupError> {
    let root = state
        .cgroup_root
        .as_deref()
        .unwrap_or(Path::new(cgroup::DEFAULT_ROOT));
    match &state.proc_self_cgroup {
        Some(own) => {
            let mountinfo = cgroup::read_file(Path::new("/proc/self/mountinfo"))?;
            cgroup::detect_with(root, own, &mountinfo)
        }
        None => cgroup::detect(root),
    }
}

/// Removes the shared `stagehand` parent cgroup where no run uses it any more. rmdir fails
/// on a cgroup with children, so one in use by another run is left alone.
fn remove_unused_parent(h: &Hierarchy) {
    for base in h.bases() {
        let _ = std::fs::remove_dir(base.join(CGROUP_PARENT));
    }
}

/// A journal entry gc may act on: `stagehand/<run>` and below, nothing else.
fn is_run_cgroup(rel: &Path) -> bool {
    let mut parts = rel.components();
    parts.next() == Some(Component::Normal(CGROUP_PARENT.as_ref()))
        && matches!(parts.next(), Some(Component::Normal(_)))
        && parts.all(|c| matches!(c, Component::Normal(_)))
}

/// What `gc` did for one dead run.
#[derive(Debug, Default)]
pub struct GcReport {
    /// The run.
    pub run_id: String,
    /// What was removed ("cgroup stagehand/r1", "netns /run/...", "process 42").
    pub removed: Vec<String>,
    /// What could not be removed; it stays in the journal for the next gc.
    pub errors: Vec<String>,
}

/// Undoes every run under `base` whose stagehand is gone: kills recorded processes that are
/// provably ours (pid and start time), kills and removes the run's cgroups, removes its
/// namespaces. Live and finished runs are left alone. Logs stay.
pub fn gc(base: &Path) -> Vec<GcReport> {
    let mut reports = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else {
        return reports;
    };
    for e in entries.flatten() {
        let dir = e.path();
        let Some(mut state) = RunState::load(&dir) else {
            continue;
        };
        if state.finished || is_alive(&state) {
            continue;
        }
        reports.push(undo(&dir, &mut state));
    }
    reports
}

/// Undoes what `state` (the journal of `dir`) lists, keeps what failed, and saves it.
fn undo(dir: &Path, state: &mut RunState) -> GcReport {
    let mut r = GcReport {
        run_id: state.run_id.clone(),
        ..Default::default()
    };
    for rec in std::mem::take(&mut state.pids) {
        // Only the process we started has this start time: a reused pid is someone else's.
        if rec.pid <= 1 || rec.start == 0 || process_start(rec.pid) != Some(rec.start) {
            continue;
        }
        let pid = nix::unistd::Pid::from_raw(rec.pid);
        match nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL) {
            Ok(()) => r.removed.push(format!("process {}", rec.pid)),
            Err(nix::errno::Errno::ESRCH) => {}
            Err(errno) => {
                r.errors
                    .push(format!("cannot kill process {}: {}", rec.pid, errno.desc()));
                state.pids.push(rec);
            }
        }
    }
    if !state.cgroups.is_empty() {
        match hierarchy_for(state) {
            Ok(h) => {
                let mut left = Vec::new();
                for rel in std::mem::take(&mut state.cgroups) {
                    if !is_run_cgroup(&rel) {
                        r.errors.push(format!(
                            "ignoring cgroup {} in the run state: not below {CGROUP_PARENT}/",
                            rel.display()
                        ));
                        continue;
                    }
                    let errs = cgroup::remove_tree(&h, &rel);
                    sweep_empty(h.root(), &rel);
                    if errs.is_empty() {
                        r.removed.push(format!("cgroup {}", rel.display()));
                    } else {
                        r.errors.extend(errs.into_iter().map(|e| e.to_string()));
                        left.push(rel);
                    }
                }
                state.cgroups = left;
                remove_unused_parent(&h);
            }
            Err(err) => r.errors.push(err.to_string()),
        }
    }
    // Namespace files and container mounts live in the run directory; anything else in the
    // journal is not ours.
    let own_dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
    let mut mounts_left = Vec::new();
    for m in std::mem::take(&mut state.mounts) {
        if !m.starts_with(&own_dir) {
            r.errors.push(format!(
                "ignoring mount {} in the run state: not in {}",
                m.display(),
                own_dir.display()
            ));
            continue;
        }
        match detach(&m) {
            Ok(()) => r.removed.push(format!("mount {}", m.display())),
            Err(e) => {
                r.errors.push(e);
                mounts_left.push(m);
            }
        }
    }
    state.mounts = mounts_left;
    let mut left = Vec::new();
    for ns in std::mem::take(&mut state.netns) {
        if !ns.starts_with(&own_dir) {
            r.errors.push(format!(
                "ignoring netns {} in the run state: not in {}",
                ns.display(),
                own_dir.display()
            ));
            continue;
        }
        match netns::remove_path(&ns) {
            Ok(()) => r.removed.push(format!("netns {}", ns.display())),
            Err(err) => {
                r.errors.push(err.to_string());
                left.push(ns);
            }
        }
    }
    state.netns = left;
    state.ports.clear();
    state.services.clear();
    state.finished = state.cgroups.is_empty()
        && state.netns.is_empty()
        && state.pids.is_empty()
        && state.mounts.is_empty();
    if let Err(err) = state.save(dir) {
        r.errors.push(err.to_string());
    }
    r
}

/// Runs under `base` whose stagehand is alive, for `stagehand ps`.
pub fn running(base: &Path) -> Vec<(PathBuf, RunState)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else {
        return out;
    };
    for e in entries.flatten() {
        if let Some(s) = RunState::load(&e.path()) {
            if !s.finished && is_alive(&s) {
                out.push((e.path(), s));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::parse_proc_cgroup;
    use std::os::fd::OwnedFd;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::mpsc;

    const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    const SLIRP: &str = "/usr/bin/slirp4netns";
    /// The port the test services listen on inside a stage namespace (its own port space).
    const SERVICE_PORT: u16 = 8080;

    /// An echo-ish server: answers each connection with `pong <what it got>`, then closes.
    const SERVER_PY: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.listen(16)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"pong " + c.recv(64))
    c.close()
"#;

    /// Connects to every `host:port` in argv and prints each answer on a line.
    const CLIENT_PY: &str = r#"
import socket, sys
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    c = socket.create_connection((host, int(port)), timeout=10)
    c.sendall(host.encode())
    reply = b""
    while True:
        chunk = c.recv(64)
        if not chunk:
            break
        reply += chunk
    c.close()
    print(reply.decode(), flush=True)
"#;

    fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates cgroups and network namespaces and must run as root"
        );
    }

    /// A stage made by a test, in a `stagehand-test-*` tempdir that is also the gc base.
    /// Drop undoes whatever is left, also when the test panics: the stage if still held,
    /// then anything the journal still lists.
    struct TestRun {
        stage: Option<Stage>,
        run_id: String,
        run_dir: PathBuf,
        base: tempfile::TempDir,
    }

    impl TestRun {
        fn config(
            tag: &str,
            network: Network,
            port_bindings: Vec<PortBinding>,
        ) -> (StageConfig, tempfile::TempDir) {
            require_root();
            let base = tempfile::Builder::new()
                .prefix("stagehand-test-")
                .tempdir()
                .unwrap();
            let run_id = format!("stagehand-test-{}-{tag}", std::process::id());
            let cfg = StageConfig {
                run_dir: base.path().join(&run_id),
                run_id,
                stage_id: "s1".into(),
                cgroup_root: Some(PathBuf::from(cgroup::DEFAULT_ROOT)),
                network,
                hostnames: vec![
                    "Background_1".into(),
                    "sg1_Background_1".into(),
                    "Client".into(),
                ],
                port_bindings,
                slirp4netns: PathBuf::from(SLIRP),
            };
            (cfg, base)
        }

        fn create(tag: &str, network: Network, port_bindings: Vec<PortBinding>) -> TestRun {
            let (cfg, base) = Self::config(tag, network, port_bindings);
            let run_id = cfg.run_id.clone();
            let stage = Stage::create(cfg).unwrap();
            TestRun {
                run_dir: stage.run_dir().to_owned(),
                stage: Some(stage),
                run_id,
                base,
            }
        }

        fn stage(&self) -> &Stage {
            self.stage.as_ref().unwrap()
        }

        fn journal(&self) -> RunState {
            RunState::load(&self.run_dir).unwrap()
        }

        /// Everything a finished teardown (or gc) must have left behind: nothing.
        fn assert_nothing_left(&self, netns: &Path) {
            assert_eq!(cgroup_dirs_named(&self.run_id), Vec::<PathBuf>::new());
            assert!(!is_mounted(netns), "{} still mounted", netns.display());
            assert!(!netns.exists(), "{} still exists", netns.display());
            let state = self.journal();
            assert!(state.finished, "{state:?}");
            assert!(
                state.cgroups.is_empty() && state.netns.is_empty() && state.pids.is_empty(),
                "{state:?}"
            );
        }
    }

    impl Drop for TestRun {
        fn drop(&mut self) {
            if let Some(stage) = self.stage.take() {
                for e in stage.release_sync() {
                    eprintln!("cleanup of {}: {e}", self.run_id);
                }
            }
            if let Some(mut state) = RunState::load(&self.run_dir) {
                if !state.finished {
                    for e in undo(&self.run_dir, &mut state).errors {
                        eprintln!("cleanup of {}: {e}", self.run_id);
                    }
                }
            }
            let _ = &self.base;
        }
    }

    /// Every cgroup directory whose name contains `needle`, in every hierarchy.
    fn cgroup_dirs_named(needle: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![PathBuf::from(cgroup::DEFAULT_ROOT)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                // Not following symlinks (cpu -> cpu,cpuacct): each hierarchy is walked once.
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if entry.file_name().to_string_lossy().contains(needle) {
                    found.push(entry.path());
                }
                stack.push(entry.path());
            }
        }
        found
    }

    fn is_mounted(path: &Path) -> bool {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let path = path.to_str().unwrap();
        mounts.lines().any(|l| l.split(' ').nth(1) == Some(path))
    }

    /// `/proc/<pid>/stat` fields after the command name: state, ppid, pgrp, session, ...
    fn stat_fields(pid: i32) -> Option<Vec<String>> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        Some(rest.split_whitespace().map(str::to_owned).collect())
    }

    /// Gone, or a zombie waiting for the reaper.
    fn dead(pid: i32) -> bool {
        stat_fields(pid).is_none_or(|f| f[0] == "Z")
    }

    async fn assert_dies_soon(pid: i32) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !dead(pid) {
            assert!(Instant::now() < deadline, "process {pid} is still alive");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Asserts `pid` sits in the step cgroup `<stage cgroup>/<step>` in every hierarchy.
    fn assert_in_cgroup(pid: i32, run_id: &str, step: &str) {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        let suffix = format!("/{CGROUP_PARENT}/{run_id}/{step}");
        let lines = parse_proc_cgroup(&text);
        let v1: Vec<_> = lines.iter().filter(|l| l.id != 0).collect();
        if v1
            .iter()
            .any(|l| l.controllers.iter().any(|c| c == "memory"))
        {
            for controller in ["memory", "cpu", "pids", "freezer"] {
                let line = v1
                    .iter()
                    .find(|l| l.controllers.iter().any(|c| c == controller))
                    .unwrap_or_else(|| panic!("no {controller} line in {text}"));
                assert!(line.path.ends_with(&suffix), "{controller}: {text}");
            }
        } else {
            let line = lines.iter().find(|l| l.id == 0).unwrap();
            assert!(line.path.ends_with(&suffix), "{text}");
        }
    }

    fn sh(script: &str, args: &[&str]) -> SpawnSpec {
        let mut argv = vec!["sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        SpawnSpec::new(argv, [("PATH", PATH)], "/")
    }

    /// Streams a child's output lines into a channel.
    fn lines(fd: OwnedFd) -> mpsc::UnboundedReceiver<String> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _ = process::read_lines(fd, |line| {
                let _ = tx.send(line.to_owned());
            })
            .await;
        });
        rx
    }

    async fn next_line(rx: &mut mpsc::UnboundedReceiver<String>) -> String {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no output line within 10 s")
            .expect("output ended")
    }

    /// Lines up to (not including) a `---` line.
    async fn section(rx: &mut mpsc::UnboundedReceiver<String>) -> Vec<String> {
        let mut out = Vec::new();
        loop {
            let line = next_line(rx).await;
            if line == "---" {
                return out;
            }
            out.push(line);
        }
    }

    /// Kills a test's child however the test ends (by its handle, never a bare pid).
    struct Killer(Option<Child>);

    impl Drop for Killer {
        fn drop(&mut self) {
            if let Some(child) = self.0.take() {
                let _ = child.signal_group(libc::SIGKILL);
                child.wait_blocking();
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steps_share_the_stage_network_and_teardown_leaves_nothing() {
        let binding = PortBinding {
            host_port: 0,
            target_port: SERVICE_PORT,
            owner: "Background_1".into(),
        };
        let mut run = TestRun::create(
            "st-main",
            Network::Isolated { outbound: false },
            vec![binding],
        );
        let stage = run.stage();
        let netns = stage.netns_path().unwrap().to_owned();
        let journal = run.journal();
        assert_eq!(
            journal.cgroups,
            [Path::new(CGROUP_PARENT).join(&run.run_id)]
        );
        assert_eq!(journal.netns, std::slice::from_ref(&netns));
        assert_eq!(journal.ports.len(), 1);
        let port = journal.ports[0];
        assert_ne!(port, 0);
        assert!(is_mounted(&netns));

        // A service with limits, in its step cgroup, the stage netns and the stage hosts file.
        let limits = Limits {
            memory_bytes: Some(256 << 20),
            cpu_millis: Some(500),
            pids: Some(64),
        };
        let server_sb = stage.step("Background_1", &limits).unwrap();
        let mut spec = sh(
            "cat /etc/hosts; echo ---; exec python3 -c \"$1\" \"$2\"",
            &[SERVER_PY, &SERVICE_PORT.to_string()],
        );
        spec.process_group = true;
        stage.apply(&server_sb, &mut spec).unwrap();
        let mut server = process::spawn(spec).unwrap();
        let mut server_out = lines(server.take_stdout().unwrap());
        let server = Killer(Some(server));
        let server_pid = server.0.as_ref().unwrap().pid();

        let hosts = section(&mut server_out).await;
        assert_eq!(
            hosts.join("\n") + "\n",
            std::fs::read_to_string(stage.hosts_path()).unwrap()
        );
        assert!(
            hosts.contains(&"127.0.0.1\tBackground_1".to_string()),
            "{hosts:?}"
        );
        assert_eq!(next_line(&mut server_out).await, "listening");

        assert_in_cgroup(server_pid, &run.run_id, "Background_1");
        let cg = server_sb.cgroup.as_ref().unwrap();
        assert_eq!(cg.pids().unwrap(), [server_pid]);
        let memory_limit: Vec<String> = cg
            .paths()
            .iter()
            .filter_map(|dir| {
                std::fs::read_to_string(dir.join("memory.limit_in_bytes"))
                    .or_else(|_| std::fs::read_to_string(dir.join("memory.max")))
                    .ok()
            })
            .collect();
        assert_eq!(memory_limit, [format!("{}\n", 256 << 20)]);
        let in_ns = nix::sys::stat::stat(format!("/proc/{server_pid}/ns/net").as_str()).unwrap();
        let stage_ns = nix::sys::stat::stat(&netns).unwrap();
        let host_ns = nix::sys::stat::stat("/proc/self/ns/net").unwrap();
        assert_eq!(
            in_ns.st_ino, stage_ns.st_ino,
            "the service is not in the stage netns"
        );
        assert_ne!(in_ns.st_ino, host_ns.st_ino);

        // Another step reaches the service on 127.0.0.1 and by its step id.
        let client_sb = stage.step("Client", &Limits::default()).unwrap();
        let target_ip = format!("127.0.0.1:{SERVICE_PORT}");
        let target_name = format!("Background_1:{SERVICE_PORT}");
        let mut spec = sh(
            "exec python3 -c \"$1\" \"$2\" \"$3\"",
            &[CLIENT_PY, &target_ip, &target_name],
        );
        stage.apply(&client_sb, &mut spec).unwrap();
        let out = process::output_async(spec).await.unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "client: {} {stderr}", out.status);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "pong 127.0.0.1\npong Background_1\n"
        );
        assert!(stage.finish_step(&client_sb).is_empty());

        // The host reaches the service through the forwarder on the published port.
        stage.start_forwarders().unwrap();
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        conn.write_all(b"host").await.unwrap();
        let mut reply = String::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut reply))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reply, "pong host");

        // A double-forked, setsid'd process escapes its process group but not its cgroup.
        let escape_sb = stage.step("Escape", &Limits::default()).unwrap();
        let mut spec = sh(
            "(setsid sh -c 'echo $$; exec sleep 300 >/dev/null 2>&1' </dev/null &); exec sleep 300",
            &[],
        );
        spec.process_group = true;
        stage.apply(&escape_sb, &mut spec).unwrap();
        let mut leader = process::spawn(spec).unwrap();
        let mut leader_out = lines(leader.take_stdout().unwrap());
        let escapee: i32 = next_line(&mut leader_out).await.parse().unwrap();
        let fields = stat_fields(escapee).unwrap();
        assert_eq!(
            fields[3],
            escapee.to_string(),
            "the escapee leads its own session"
        );
        assert_ne!(
            fields[2],
            leader.pid().to_string(),
            "the escapee left the process group"
        );
        assert!(
            escape_sb
                .cgroup
                .as_ref()
                .unwrap()
                .pids()
                .unwrap()
                .contains(&escapee)
        );
        let status = process::stop(&leader, libc::SIGTERM, Duration::from_secs(2)).await;
        assert_eq!(status.signal, Some(libc::SIGTERM));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !dead(escapee),
            "the escapee should survive a process-group kill"
        );

        // Teardown kills by cgroup and removes everything.
        let stage = run.stage.take().unwrap();
        let errors = stage.teardown().await;
        assert!(errors.is_empty(), "{errors:?}");
        assert_dies_soon(escapee).await;
        let server_status =
            tokio::time::timeout(Duration::from_secs(5), server.0.as_ref().unwrap().wait())
                .await
                .expect("the service survived teardown");
        assert_eq!(server_status.signal, Some(libc::SIGKILL));
        run.assert_nothing_left(&netns);
        std::net::TcpListener::bind(("127.0.0.1", port)).expect("the forwarded port is free again");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn outbound_stage_reaches_the_host_through_slirp4netns() {
        assert!(
            Path::new(SLIRP).exists(),
            "slirp4netns not found at {SLIRP}: install it (apt-get install -y slirp4netns)"
        );
        let host = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host_port = host.local_addr().unwrap().port();
        let echo = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut conn, _) = host.accept().unwrap();
            let mut buf = [0u8; 64];
            let n = conn.read(&mut buf).unwrap();
            conn.write_all(b"pong ").unwrap();
            conn.write_all(&buf[..n]).unwrap();
        });

        let mut run = TestRun::create("st-out", Network::Isolated { outbound: true }, vec![]);
        let stage = run.stage();
        let netns = stage.netns_path().unwrap().to_owned();
        let journal = run.journal();
        let [slirp] = journal.pids[..] else {
            panic!("{journal:?}")
        };
        assert_eq!(process_start(slirp.pid), Some(slirp.start));
        assert_in_cgroup(slirp.pid, &run.run_id, SLIRP_CGROUP);

        let sb = stage.step("Client", &Limits::default()).unwrap();
        let target = format!("{}:{host_port}", crate::slirp::HOST_LOOPBACK);
        let mut spec = sh(
            "cat /etc/resolv.conf; echo ---; exec python3 -c \"$1\" \"$2\"",
            &[CLIENT_PY, &target],
        );
        stage.apply(&sb, &mut spec).unwrap();
        let out = process::output_async(spec).await.unwrap();
        assert!(
            out.status.success(),
            "client: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let (resolv, reply) = stdout.split_once("---\n").unwrap();
        assert_eq!(reply, "pong 10.0.2.2\n");
        let want_resolv = match stage.resolv_path() {
            Some(_) => crate::hosts::resolv_conf_for_slirp(),
            None => std::fs::read_to_string("/etc/resolv.conf").unwrap(),
        };
        assert_eq!(resolv, want_resolv);
        echo.join().unwrap();

        let errors = run.stage.take().unwrap().teardown().await;
        assert!(errors.is_empty(), "{errors:?}");
        assert!(dead(slirp.pid), "slirp4netns survived teardown");
        run.assert_nothing_left(&netns);
    }

    #[tokio::test]
    async fn gc_undoes_a_run_whose_stagehand_died() {
        let mut run = TestRun::create("st-gc", Network::Isolated { outbound: false }, vec![]);
        let stage = run.stage();
        let netns = stage.netns_path().unwrap().to_owned();
        let sb = stage.step("Sleeper", &Limits::default()).unwrap();
        let mut spec = SpawnSpec::new(["sleep", "300"], [("PATH", PATH)], "/");
        spec.process_group = true;
        stage.apply(&sb, &mut spec).unwrap();
        let sleeper = Killer(Some(process::spawn(spec).unwrap()));
        let sleeper_pid = sleeper.0.as_ref().unwrap().pid();
        assert_in_cgroup(sleeper_pid, &run.run_id, "Sleeper");

        // While the owner lives, gc leaves the run alone.
        assert!(gc(run.base.path()).is_empty());
        assert_eq!(running(run.base.path()).len(), 1);

        // stagehand "dies": same pid, other start time, and no teardown ever runs.
        let mut state = run.journal();
        state.pid_start += 1;
        state.save(&run.run_dir).unwrap();
        std::mem::forget(run.stage.take().unwrap());
        assert!(running(run.base.path()).is_empty());

        let reports = gc(run.base.path());
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(reports[0].run_id, run.run_id);
        assert!(reports[0].errors.is_empty(), "{:?}", reports[0].errors);
        let cgroup = format!("cgroup {CGROUP_PARENT}/{}", run.run_id);
        assert!(
            reports[0].removed.contains(&cgroup),
            "{:?}",
            reports[0].removed
        );
        assert!(
            reports[0]
                .removed
                .contains(&format!("netns {}", netns.display())),
            "{:?}",
            reports[0].removed
        );

        let status =
            tokio::time::timeout(Duration::from_secs(5), sleeper.0.as_ref().unwrap().wait())
                .await
                .expect("gc did not kill the sleeper");
        assert_eq!(status.signal, Some(libc::SIGKILL));
        run.assert_nothing_left(&netns);
        assert!(
            gc(run.base.path()).is_empty(),
            "a finished run is not collected twice"
        );
    }

    #[test]
    fn a_taken_port_fails_create_and_leaves_nothing() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let binding = PortBinding {
            host_port: port,
            target_port: SERVICE_PORT,
            owner: "Background_1".into(),
        };
        let (cfg, base) = TestRun::config(
            "st-port",
            Network::Isolated { outbound: false },
            vec![binding],
        );
        let run_dir = cfg.run_dir.clone();
        let run_id = cfg.run_id.clone();
        let err = Stage::create(cfg).unwrap_err().to_string();
        assert!(err.contains("already in use"), "{err}");
        assert!(err.contains(&port.to_string()), "{err}");
        assert_eq!(cgroup_dirs_named(&run_id), Vec::<PathBuf>::new());
        assert!(!run_dir.join("netns-s1").exists());
        let state = RunState::load(&run_dir).unwrap();
        assert!(
            state.finished && state.cgroups.is_empty() && state.netns.is_empty(),
            "{state:?}"
        );
        drop(base);
    }

    #[test]
    fn a_slirp4netns_that_never_gets_ready_fails_create_and_leaves_nothing() {
        let (mut cfg, base) =
            TestRun::config("st-slirpfail", Network::Isolated { outbound: true }, vec![]);
        // Exits at once without writing to its ready fd, after cgroups and netns exist.
        cfg.slirp4netns = PathBuf::from("/bin/true");
        let run_dir = cfg.run_dir.clone();
        let run_id = cfg.run_id.clone();
        let err = Stage::create(cfg).unwrap_err();
        assert!(
            matches!(
                err,
                StageError::SlirpNotReady {
                    source: NetError::SlirpExited,
                    ..
                }
            ),
            "{err}"
        );
        let netns = std::fs::canonicalize(&run_dir).unwrap().join("netns-s1");
        assert_eq!(cgroup_dirs_named(&run_id), Vec::<PathBuf>::new());
        assert!(!is_mounted(&netns) && !netns.exists());
        let state = RunState::load(&run_dir).unwrap();
        assert!(state.finished && state.pids.is_empty(), "{state:?}");
        drop(base);
    }

    #[test]
    fn state_roundtrips_and_liveness_uses_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RunState {
            run_id: "r1".into(),
            pid: std::process::id() as i32,
            ..Default::default()
        };
        s.pid_start = process_start(s.pid).unwrap();
        s.cgroups.push("stagehand/r1".into());
        s.pids.push(ProcessRecord { pid: 7, start: 42 });
        s.save(dir.path()).unwrap();
        let back = RunState::load(dir.path()).unwrap();
        assert_eq!(back.cgroups, s.cgroups);
        assert_eq!(back.pids, s.pids);
        assert!(is_alive(&back));
        let stale = RunState {
            pid_start: back.pid_start + 1,
            ..back
        };
        assert!(!is_alive(&stale), "same pid, other start time: not us");
    }

    #[test]
    fn state_with_missing_fields_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("state.json"),
            r#"{"run_id":"old","pid":5,"finished":false}"#,
        )
        .unwrap();
        let state = RunState::load(dir.path()).unwrap();
        assert_eq!(state.run_id, "old");
        assert!(state.cgroups.is_empty() && state.proc_self_cgroup.is_none());
    }

    #[test]
    fn gc_skips_live_and_finished_runs() {
        let base = tempfile::tempdir().unwrap();
        let live = base.path().join("live");
        std::fs::create_dir(&live).unwrap();
        let me = std::process::id() as i32;
        RunState {
            run_id: "live".into(),
            pid: me,
            pid_start: process_start(me).unwrap(),
            ..Default::default()
        }
        .save(&live)
        .unwrap();
        let done = base.path().join("done");
        std::fs::create_dir(&done).unwrap();
        RunState {
            run_id: "done".into(),
            finished: true,
            ..Default::default()
        }
        .save(&done)
        .unwrap();
        assert!(gc(base.path()).is_empty());
        assert_eq!(running(base.path()).len(), 1);
    }

    #[test]
    fn gc_marks_a_dead_run_with_nothing_left_finished() {
        let base = tempfile::tempdir().unwrap();
        let dead = base.path().join("dead");
        std::fs::create_dir(&dead).unwrap();
        let gone_ns = std::fs::canonicalize(&dead).unwrap().join("netns-x");
        RunState {
            run_id: "dead".into(),
            pid: i32::MAX,
            netns: vec![gone_ns],
            ..Default::default()
        }
        .save(&dead)
        .unwrap();
        let reports = gc(base.path());
        assert_eq!(reports.len(), 1);
        assert!(reports[0].errors.is_empty(), "{:?}", reports[0].errors);
        assert!(RunState::load(&dead).unwrap().finished);
    }

    /// gc takes a recorded pid for ours only with the recorded start time: a pid reused by
    /// another process is never signalled (it used to go by the command line).
    #[tokio::test]
    async fn gc_never_kills_a_recorded_pid_with_another_start_time() {
        let base = tempfile::tempdir().unwrap();
        let dead = base.path().join("dead");
        std::fs::create_dir(&dead).unwrap();
        let bystander = Killer(Some(
            process::spawn(SpawnSpec::new(["sleep", "30"], [("PATH", PATH)], "/")).unwrap(),
        ));
        let pid = bystander.0.as_ref().unwrap().pid();
        let start = process_start(pid).unwrap();
        let record = ProcessRecord {
            pid,
            start: start + 1,
        };
        RunState {
            run_id: "dead".into(),
            pid: i32::MAX,
            pids: vec![record],
            ..Default::default()
        }
        .save(&dead)
        .unwrap();
        let reports = gc(base.path());
        assert!(reports[0].removed.is_empty(), "{reports:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            bystander.0.as_ref().unwrap().try_status().is_none(),
            "a bystander was killed"
        );
        assert!(RunState::load(&dead).unwrap().finished);
    }

    /// gc acts only on what a run can own: cgroups below `stagehand/`, netns files in the
    /// run directory.
    #[test]
    fn gc_ignores_foreign_entries_in_a_journal() {
        assert!(is_run_cgroup(Path::new("stagehand/r1")));
        assert!(is_run_cgroup(Path::new("stagehand/r1/step")));
        assert!(!is_run_cgroup(Path::new("stagehand")));
        assert!(!is_run_cgroup(Path::new("system.slice/r1")));
        assert!(!is_run_cgroup(Path::new("stagehand/../x")));

        let base = tempfile::tempdir().unwrap();
        let dead = base.path().join("dead");
        std::fs::create_dir(&dead).unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        RunState {
            run_id: "dead".into(),
            pid: i32::MAX,
            netns: vec![outside.path().to_owned()],
            ..Default::default()
        }
        .save(&dead)
        .unwrap();
        let reports = gc(base.path());
        assert_eq!(reports[0].errors.len(), 1, "{reports:?}");
        assert!(
            reports[0].errors[0].starts_with("ignoring netns"),
            "{reports:?}"
        );
        assert!(
            outside.path().exists(),
            "gc removed a file outside the run directory"
        );
    }
}
