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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cgroup::{self, Cgroup, Hierarchy, Limits};
use crate::forward::{Forwarders, PortBinding};
use crate::netns::{self, NetNs};
use crate::process::{self, BindMount, Child, OutputTarget, SpawnSpec};
use std::os::fd::AsRawFd;

/// Errors setting up or tearing down a stage, each naming what it acted on.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("cannot write run state {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    #[error("cgroups: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("stage network: {0}")]
    Net(#[from] netns::NetError),
    #[error("slirp4netns: {0}")]
    Slirp(String),
}

/// How the stage's steps see the network.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Network {
    /// One network namespace for the stage; `outbound` connects it through slirp4netns.
    Isolated { outbound: bool },
    /// The host's namespace (`--network host`).
    Host,
}

#[derive(Clone, Debug)]
pub struct StageConfig {
    /// `<run dir>`: holds `state.json`, the netns file, hosts, resolv.conf.
    pub run_dir: PathBuf,
    pub run_id: String,
    pub stage_id: String,
    /// `/sys/fs/cgroup`, or a fake root in tests; `None` runs without cgroups.
    pub cgroup_root: Option<PathBuf>,
    pub network: Network,
    /// Names that resolve to 127.0.0.1 inside the stage (step ids, `sg1_Background_1`, ...).
    pub hostnames: Vec<String>,
    pub port_bindings: Vec<PortBinding>,
    pub slirp4netns: PathBuf,
}

/// What `state.json` records. Paths are absolute; everything listed is removed by teardown or
/// by `gc`. Kept flat and append-only so a crash mid-write loses at most the last entry.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunState {
    pub run_id: String,
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: with `pid`, identifies stagehand across pid reuse.
    pub pid_start: u64,
    pub cgroup_root: Option<PathBuf>,
    /// Relative cgroup paths, e.g. `stagehand/<run>`.
    pub cgroups: Vec<PathBuf>,
    pub netns: Vec<PathBuf>,
    /// Host ports with a forwarder (informational: they close with the process).
    pub ports: Vec<u16>,
    /// Services: step id → pid, for `stagehand ps`.
    pub services: BTreeMap<String, i32>,
    /// Extra processes outside step cgroups (none normally; slirp4netns runs in the stage cgroup).
    pub pids: Vec<i32>,
    /// Set when teardown finished: nothing is left to undo.
    pub finished: bool,
}

impl RunState {
    pub fn load(run_dir: &Path) -> Option<RunState> {
        let text = std::fs::read(run_dir.join("state.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }

    fn save(&self, run_dir: &Path) -> Result<(), StageError> {
        let path = run_dir.join("state.json");
        let tmp = run_dir.join("state.json.tmp");
        let data = serde_json::to_vec_pretty(self).map_err(|e| StageError::State { path: path.clone(), source: e.into() })?;
        std::fs::write(&tmp, data)
            .and_then(|_| std::fs::rename(&tmp, &path))
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

/// One step's place in the stage: its cgroup, and the hooks a host process needs.
#[derive(Debug, Clone)]
pub struct StepSandbox {
    pub cgroup: Option<Cgroup>,
}

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
    steps: Mutex<Vec<(String, Cgroup)>>,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage").field("run_id", &self.cfg.run_id).field("stage", &self.cfg.stage_id).finish()
    }
}

/// Harness limits when a Background step sets none: 500Mi and 400m.
pub const BACKGROUND_DEFAULTS: Limits = Limits { memory_bytes: Some(500 * 1024 * 1024), cpu_millis: Some(400), pids: Some(4096) };

impl Stage {
    /// Create the stage: record, then make, each resource. On error, whatever was made is
    /// removed before returning.
    pub fn create(cfg: StageConfig) -> Result<Stage, StageError> {
        std::fs::create_dir_all(&cfg.run_dir).map_err(|source| StageError::State { path: cfg.run_dir.clone(), source })?;
        let mut state = RunState::load(&cfg.run_dir).unwrap_or_default();
        state.run_id = cfg.run_id.clone();
        state.pid = std::process::id() as i32;
        state.pid_start = process_start(state.pid).unwrap_or(0);
        state.finished = false;
        state.cgroup_root = cfg.cgroup_root.clone();
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
                let errs = stage.release_sync();
                for err in errs {
                    tracing::warn!(error = %err, "cleanup after a failed stage setup");
                }
                Err(e)
            }
        }
    }

    fn save(&self) -> Result<(), StageError> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).save(&self.cfg.run_dir)
    }

    fn record(&self, f: impl FnOnce(&mut RunState)) -> Result<(), StageError> {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
        self.save()
    }

    fn build(&mut self) -> Result<(), StageError> {
        // Ports first: a taken port must be reported before anything starts.
        let fw = Forwarders::bind(&self.cfg.port_bindings)?;
        let ports = fw.ports();
        *self.forwarders.lock().unwrap_or_else(|e| e.into_inner()) = Some(fw);
        self.record(|s| s.ports.extend(ports))?;

        if let Some(root) = &self.cfg.cgroup_root {
            let h = cgroup::detect(root)?;
            let rel = PathBuf::from("stagehand").join(&self.cfg.run_id);
            self.record(|s| {
                if !s.cgroups.contains(&rel) {
                    s.cgroups.push(rel.clone())
                }
            })?;
            h.create(&rel, &Limits::default())?;
            self.hierarchy = Some(h);
            self.stage_cgroup = Some(rel);
        }

        crate::hosts::write(&self.hosts, &self.cfg.hostnames)?;

        if let Network::Isolated { outbound } = self.cfg.network {
            let path = self.cfg.run_dir.join(format!("netns-{}", self.cfg.stage_id));
            self.record(|s| s.netns.push(path.clone()))?;
            self.netns = Some(NetNs::create(&path)?);
            if outbound {
                self.start_slirp()?;
                // The host's resolver may be on its own loopback (127.0.0.53), which the
                // stage cannot reach; slirp's DNS forwarder at 10.0.2.3 can.
                let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
                if host_resolv.lines().any(|l| l.trim_start().starts_with("nameserver 127.")) || host_resolv.trim().is_empty() {
                    let p = self.cfg.run_dir.join(format!("resolv-{}.conf", self.cfg.stage_id));
                    std::fs::write(&p, crate::hosts::resolv_conf_for_slirp()).map_err(|source| StageError::State { path: p.clone(), source })?;
                    self.resolv = Some(p);
                }
            }
        }
        Ok(())
    }

    fn start_slirp(&mut self) -> Result<(), StageError> {
        let ns = self.netns.as_ref().ok_or_else(|| StageError::Slirp("no namespace".into()))?;
        let (read, write) = crate::slirp::ready_pipe()?;
        // slirp4netns writes "1" to its ready fd: the pipe's write end, kept at its number in
        // the child. Our copy is dropped with `spec`, so EOF means slirp4netns died early.
        let argv = crate::slirp::argv(&self.cfg.slirp4netns, ns.path(), write.as_raw_fd());
        let env = vec![("PATH".to_string(), std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into()))];
        let mut spec = SpawnSpec::new(argv, env, "/");
        spec.inherit_fds.push(write);
        spec.output = OutputTarget::Null;
        spec.parent_death_signal = Some(libc::SIGKILL);
        spec.process_group = true;
        if let Some(cg) = self.stage_cgroup_for("stagehand-slirp4netns")? {
            spec.cgroup_procs = cg.procs_files()?;
            self.steps.lock().unwrap_or_else(|e| e.into_inner()).push(("stagehand-slirp4netns".into(), cg));
        }
        let child = process::spawn(spec).map_err(|e| StageError::Slirp(format!("cannot start {}: {e}", self.cfg.slirp4netns.display())))?;
        let pid = child.pid();
        self.record(|s| s.pids.push(pid))?;
        *self.slirp.lock().unwrap_or_else(|e| e.into_inner()) = Some(child);
        crate::slirp::wait_ready(&read, Duration::from_secs(10))?;
        Ok(())
    }

    fn stage_cgroup_for(&self, name: &str) -> Result<Option<Cgroup>, StageError> {
        match (&self.hierarchy, &self.stage_cgroup) {
            (Some(h), Some(rel)) => Ok(Some(h.create(&rel.join(name), &Limits::default())?)),
            _ => Ok(None),
        }
    }

    /// Start forwarding published ports; call inside the tokio runtime, before services start.
    pub fn start_forwarders(&self) -> Result<(), StageError> {
        if let Some(fw) = self.forwarders.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            fw.start(self.netns.as_ref())?;
        }
        Ok(())
    }

    /// The network namespace file, if the stage has one (containers join it by path).
    pub fn netns_path(&self) -> Option<&Path> {
        self.netns.as_ref().map(|n| n.path())
    }

    pub fn hosts_path(&self) -> &Path {
        &self.hosts
    }

    pub fn resolv_path(&self) -> Option<&Path> {
        self.resolv.as_deref()
    }

    /// Create the step's cgroup with its limits.
    pub fn step(&self, step_id: &str, limits: &Limits) -> Result<StepSandbox, StageError> {
        let cgroup = match (&self.hierarchy, &self.stage_cgroup) {
            (Some(h), Some(rel)) => {
                let cg = h.create(&rel.join(step_id), limits)?;
                self.steps.lock().unwrap_or_else(|e| e.into_inner()).push((step_id.to_string(), cg.clone()));
                Some(cg)
            }
            _ => None,
        };
        Ok(StepSandbox { cgroup })
    }

    /// Put a host process spec into the step's cgroup, the stage netns, and a private mount
    /// namespace that shows the stage hosts file (and resolv.conf) at /etc.
    pub fn apply(&self, step: &StepSandbox, spec: &mut SpawnSpec) -> Result<(), StageError> {
        if let Some(cg) = &step.cgroup {
            spec.cgroup_procs = cg.procs_files()?;
        }
        if let Some(ns) = &self.netns {
            spec.netns = Some(ns.fd()?);
        }
        if nix::unistd::geteuid().is_root() {
            let m = BindMount::new(&self.hosts, "/etc/hosts").map_err(|e| StageError::State { path: self.hosts.clone(), source: std::io::Error::other(e.to_string()) })?;
            spec.private_mounts.push(m);
            if let Some(r) = &self.resolv {
                let m = BindMount::new(r, "/etc/resolv.conf").map_err(|e| StageError::State { path: r.clone(), source: std::io::Error::other(e.to_string()) })?;
                spec.private_mounts.push(m);
            }
        }
        Ok(())
    }

    pub fn record_service(&self, id: &str, pid: i32) {
        let _ = self.record(|s| {
            s.services.insert(id.to_string(), pid);
        });
    }

    /// Kill every process of one step by cgroup membership and remove its cgroup (used when a
    /// Run step ends, so nothing it started outlives it).
    pub fn finish_step(&self, step: &StepSandbox) -> Vec<String> {
        let mut errors = Vec::new();
        if let Some(cg) = &step.cgroup {
            if let Err(e) = cg.kill_all() {
                errors.push(e.to_string());
            }
            if let Err(e) = cg.remove() {
                errors.push(e.to_string());
            }
            self.steps.lock().unwrap_or_else(|e| e.into_inner()).retain(|(_, c)| c.paths() != cg.paths());
        }
        errors
    }

    /// Tear everything down: forwarders, every process by cgroup (steps in reverse creation
    /// order, then slirp4netns), cgroups, the namespace, and mark the run state finished.
    /// Tries every resource and returns every error.
    pub async fn teardown(self) -> Vec<String> {
        let fw = self.forwarders.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(fw) = fw {
            fw.close().await;
        }
        let mut errors: Vec<String> = Vec::new();
        let slirp = self.slirp.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(child) = slirp {
            let _ = process::stop(&child, libc::SIGTERM, Duration::from_secs(1)).await;
        }
        errors.extend(tokio::task::spawn_blocking(move || self.release_sync()).await.unwrap_or_else(|e| vec![e.to_string()]));
        errors
    }

    fn release_sync(&self) -> Vec<String> {
        let mut errors = Vec::new();
        let steps: Vec<(String, Cgroup)> = std::mem::take(&mut *self.steps.lock().unwrap_or_else(|e| e.into_inner()));
        for (_, cg) in steps.iter().rev() {
            if let Err(e) = cg.kill_all() {
                errors.push(e.to_string());
            }
            if let Err(e) = cg.remove() {
                errors.push(e.to_string());
            }
        }
        if let (Some(h), Some(rel)) = (&self.hierarchy, &self.stage_cgroup) {
            errors.extend(cgroup::remove_tree(h, rel).into_iter().map(|e| e.to_string()));
            // The shared `stagehand` parent goes too when no other run uses it.
            for base in h.bases() {
                let _ = std::fs::remove_dir(base.join("stagehand"));
            }
        }
        if let Some(ns) = &self.netns {
            if let Err(e) = netns::remove_path(ns.path()) {
                errors.push(e.to_string());
            }
        }
        let _ = std::fs::remove_file(&self.hosts);
        if let Some(r) = &self.resolv {
            let _ = std::fs::remove_file(r);
        }
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.cgroups.clear();
        st.netns.clear();
        st.ports.clear();
        st.services.clear();
        st.pids.clear();
        st.finished = true;
        if let Err(e) = st.save(&self.cfg.run_dir) {
            errors.push(e.to_string());
        }
        errors
    }
}

/// What `gc` did for one dead run.
#[derive(Debug, Default)]
pub struct GcReport {
    pub run_id: String,
    pub removed: Vec<String>,
    pub errors: Vec<String>,
}

/// Undo every run under `base` whose stagehand is gone: kill and remove its cgroups, remove
/// its namespaces, kill recorded pids. Live runs are left alone. Logs stay.
pub fn gc(base: &Path) -> Vec<GcReport> {
    let mut reports = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else { return reports };
    for e in entries.flatten() {
        let dir = e.path();
        let Some(mut state) = RunState::load(&dir) else { continue };
        if state.finished || is_alive(&state) {
            continue;
        }
        let mut r = GcReport { run_id: state.run_id.clone(), ..Default::default() };
        for pid in &state.pids {
            // Only a process that still runs in our run's namespace or cgroup would matter;
            // a recorded pid that was reused by an unrelated process must not be killed, so
            // check its cmdline names slirp4netns before killing.
            let cmd = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if cmd.contains("slirp4netns") && cmd.contains(&state.run_id) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), nix::sys::signal::Signal::SIGKILL);
                r.removed.push(format!("process {pid}"));
            }
        }
        if let Some(root) = &state.cgroup_root {
            match cgroup::detect(root) {
                Ok(h) => {
                    for rel in &state.cgroups {
                        let errs = cgroup::remove_tree(&h, rel);
                        if errs.is_empty() {
                            r.removed.push(format!("cgroup {}", rel.display()));
                        }
                        r.errors.extend(errs.into_iter().map(|e| e.to_string()));
                    }
                    for base in h.bases() {
                        let _ = std::fs::remove_dir(base.join("stagehand"));
                    }
                }
                Err(err) => r.errors.push(err.to_string()),
            }
        }
        for ns in &state.netns {
            match netns::remove_path(ns) {
                Ok(()) => r.removed.push(format!("netns {}", ns.display())),
                Err(err) => r.errors.push(err.to_string()),
            }
        }
        if r.errors.is_empty() {
            state.cgroups.clear();
            state.netns.clear();
            state.pids.clear();
            state.services.clear();
            state.ports.clear();
            state.finished = true;
            if let Err(err) = state.save(&dir) {
                r.errors.push(err.to_string());
            }
        }
        reports.push(r);
    }
    reports
}

/// Runs under `base` whose stagehand is alive, for `stagehand ps`.
pub fn running(base: &Path) -> Vec<(PathBuf, RunState)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(base) else { return out };
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

    #[test]
    fn state_roundtrips_and_liveness_uses_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RunState { run_id: "r1".into(), pid: std::process::id() as i32, ..Default::default() };
        s.pid_start = process_start(s.pid).unwrap();
        s.cgroups.push("stagehand/r1".into());
        s.save(dir.path()).unwrap();
        let back = RunState::load(dir.path()).unwrap();
        assert_eq!(back.cgroups, s.cgroups);
        assert!(is_alive(&back));
        let stale = RunState { pid_start: back.pid_start + 1, ..back };
        assert!(!is_alive(&stale), "same pid, other start time: not us");
    }

    #[test]
    fn gc_skips_live_and_finished_runs() {
        let base = tempfile::tempdir().unwrap();
        let live = base.path().join("live");
        std::fs::create_dir(&live).unwrap();
        let me = std::process::id() as i32;
        RunState { run_id: "live".into(), pid: me, pid_start: process_start(me).unwrap(), ..Default::default() }.save(&live).unwrap();
        let done = base.path().join("done");
        std::fs::create_dir(&done).unwrap();
        RunState { run_id: "done".into(), finished: true, ..Default::default() }.save(&done).unwrap();
        assert!(gc(base.path()).is_empty());
        assert_eq!(running(base.path()).len(), 1);
    }

    #[test]
    fn gc_marks_a_dead_run_with_nothing_left_finished() {
        let base = tempfile::tempdir().unwrap();
        let dead = base.path().join("dead");
        std::fs::create_dir(&dead).unwrap();
        let gone_ns = dead.join("netns-x");
        RunState { run_id: "dead".into(), pid: i32::MAX, netns: vec![gone_ns], ..Default::default() }.save(&dead).unwrap();
        let reports = gc(base.path());
        assert_eq!(reports.len(), 1);
        assert!(reports[0].errors.is_empty(), "{:?}", reports[0].errors);
        assert!(RunState::load(&dead).unwrap().finished);
    }
}
