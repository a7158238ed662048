//! cgroup v2 (unified hierarchy): one directory per cgroup.
//!
//! Owns enabling controllers down the tree (`cgroup.subtree_control`), v2 limit files,
//! `cgroup.kill` and `cgroup.freeze`, and the v2 OOM and usage counters. Does not own
//! threaded cgroups or systemd delegation (no D-Bus: stagehand writes cgroupfs directly).
//!
//! The stage tree lives below stagehand's own cgroup. v2's "no internal processes" rule
//! (cgroup-v2.rst, "No Internal Process Constraint") means controllers can be enabled for the
//! children of that cgroup only if no process sits in it, except at the root cgroup, which is
//! exempt. stagehand itself sits there, so when enabling fails with EBUSY:
//! - if stagehand is the only process in its cgroup (a `systemd-run --scope -p Delegate=yes`
//!   scope, a service with `Delegate=yes`, a container where it runs alone), it moves itself
//!   into a leaf child named [`SUPERVISOR_LEAF`] and retries. This is what systemd asks of
//!   delegated units, and nobody else's placement changes. Later detection recognises the leaf
//!   and keeps using its parent as the base.
//! - otherwise (a login session's scope, shared with the shell) it fails with
//!   [`CgroupError::NotDelegated`], which says how to run stagehand in a cgroup of its own.
//!   Moving processes that are not ours is not this module's call.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::{
    CPU_PERIOD_US, CgroupBackend, CgroupError, CgroupMount, FREEZE_TIMEOUT, Limits, ProcCgroup,
    Stats, cpu_quota_us, keyed, own_dir, parse_u64, read_file, read_optional, read_u64_optional,
    undo_mkdir, walk, write_file,
};

/// The controllers enabled down the stage tree. Always all three, not only those with a
/// limit, so that usage counters exist for every step.
const WANTED: [&str; 3] = ["memory", "cpu", "pids"];

/// The leaf stagehand moves itself into when its own cgroup must give up its processes.
pub(super) const SUPERVISOR_LEAF: &str = "stagehand-supervisor";

/// The unified hierarchy and stagehand's place in it.
#[derive(Debug, Clone)]
pub(super) struct V2Hierarchy {
    /// stagehand's own cgroup directory (the parent of [`SUPERVISOR_LEAF`] if it moved there).
    base: PathBuf,
}

impl V2Hierarchy {
    pub(super) fn new(mount: &CgroupMount, own: &[ProcCgroup]) -> Result<Self, CgroupError> {
        let line = own
            .iter()
            .find(|l| l.id == 0 && l.controllers.is_empty())
            .ok_or_else(|| CgroupError::OwnCgroupUnknown {
                controllers: "cgroup2".to_owned(),
                mount_point: mount.mount_point.clone(),
            })?;
        let mut base = own_dir(mount, &line.path);
        if base != mount.mount_point && base.file_name().is_some_and(|n| n == SUPERVISOR_LEAF) {
            base.pop();
        }
        Ok(V2Hierarchy { base })
    }

    pub(super) fn base(&self) -> &Path {
        &self.base
    }

    /// Creates `rel` below the base, enabling [`WANTED`] controllers in every cgroup on the
    /// way (the base included), then writes the limits on the last component.
    pub(super) fn create(&self, rel: &Path, limits: &Limits) -> Result<V2Cgroup, CgroupError> {
        let mut created = Vec::new();
        let result = self.create_tracked(rel, limits, &mut created);
        if result.is_err() {
            undo_mkdir(&created);
        }
        result
    }

    fn create_tracked(
        &self,
        rel: &Path,
        limits: &Limits,
        created: &mut Vec<PathBuf>,
    ) -> Result<V2Cgroup, CgroupError> {
        let mut dir = self.base.clone();
        for component in rel.components() {
            self.enable_controllers(&dir)?;
            dir.push(component);
            match fs::create_dir(&dir) {
                Ok(()) => created.push(dir.clone()),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
                Err(error) => return Err(CgroupError::Create { path: dir, error }),
            }
        }
        // The controllers the new cgroup gets are those its parent enables.
        let parent = dir.parent().unwrap_or(&self.base).to_path_buf();
        let enabled = tokens(&read_file(&parent.join("cgroup.subtree_control"))?);
        for (controller, wanted) in [
            ("memory", limits.memory_bytes.is_some()),
            ("cpu", limits.cpu_millis.is_some()),
            ("pids", limits.pids.is_some()),
        ] {
            if wanted && !enabled.iter().any(|c| c == controller) {
                return Err(CgroupError::ControllerMissing {
                    controller,
                    path: parent,
                });
            }
        }
        let cgroup = V2Cgroup { path: dir };
        cgroup.write_limits(limits)?;
        Ok(cgroup)
    }

    /// Enables in `dir/cgroup.subtree_control` each wanted controller that `dir` has and has
    /// not enabled yet. A controller the parent does not pass down is left out; a limit that
    /// needs it fails later with [`CgroupError::ControllerMissing`].
    fn enable_controllers(&self, dir: &Path) -> Result<(), CgroupError> {
        let available = tokens(&read_file(&dir.join("cgroup.controllers"))?);
        let control = dir.join("cgroup.subtree_control");
        let enabled = tokens(&read_file(&control)?);
        let missing: Vec<String> = WANTED
            .iter()
            .filter(|c| available.iter().any(|a| a == *c) && !enabled.iter().any(|e| e == *c))
            .map(|c| format!("+{c}"))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let value = missing.join(" ");
        match write_file(&control, &value) {
            Err(CgroupError::Write { error, .. })
                if error.raw_os_error() == Some(libc::EBUSY) && dir == self.base =>
            {
                let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
                let mut ours = vec![me];
                // Rootless, the host side of stagehand (our parent, waiting for us) shares the
                // cgroup: it is ours to move too.
                if crate::userns::in_user_namespace() {
                    ours.push(nix::unistd::getppid().as_raw());
                }
                if evacuate(&self.base, &ours)? {
                    write_file(&control, &value)
                } else {
                    Err(CgroupError::NotDelegated {
                        path: self.base.clone(),
                    })
                }
            }
            other => other,
        }
    }

    /// The cgroup at `rel`, without touching the filesystem.
    pub(super) fn open(&self, rel: &Path) -> V2Cgroup {
        V2Cgroup {
            path: self.base.join(rel),
        }
    }
}

/// Moves the processes of `base` into `base/`[`SUPERVISOR_LEAF`] if every one of them is in
/// `ours` (stagehand itself, and rootless its host-side parent), so that `base` may enable
/// controllers. `Ok(false)` if anything else shares `base`.
fn evacuate(base: &Path, ours: &[i32]) -> Result<bool, CgroupError> {
    let path = base.join("cgroup.procs");
    let procs = read_file(&path)?;
    let procs: Vec<i32> = procs
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    if procs.is_empty() || procs.iter().any(|p| !ours.contains(p)) {
        return Ok(false);
    }
    let leaf = base.join(SUPERVISOR_LEAF);
    match fs::create_dir(&leaf) {
        Ok(()) => {}
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(CgroupError::Create { path: leaf, error }),
    }
    for pid in procs {
        write_file(&leaf.join("cgroup.procs"), &pid.to_string())?;
    }
    tracing::info!(cgroup = %leaf.display(), "moved stagehand into a leaf cgroup so its own cgroup can delegate controllers");
    Ok(true)
}

/// The controller names in `cgroup.controllers` or `cgroup.subtree_control` (a `+` prefix, as
/// written, is tolerated).
fn tokens(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|t| t.trim_start_matches('+').to_owned())
        .collect()
}

/// A v2 cgroup: a single directory.
#[derive(Debug, Clone)]
pub(super) struct V2Cgroup {
    path: PathBuf,
}

impl V2Cgroup {
    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        if let Some(bytes) = limits.memory_bytes {
            write_file(&self.path.join("memory.max"), &bytes.to_string())?;
            // v2 accounts swap separately; 0 means no swap on top of the memory limit. The file
            // is absent when the kernel has no swap accounting, and then there is nothing to cap.
            let swap = self.path.join("memory.swap.max");
            if swap.exists() {
                write_file(&swap, "0")?;
            }
        }
        if let Some(millis) = limits.cpu_millis {
            write_file(
                &self.path.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", cpu_quota_us(millis)),
            )?;
        }
        if let Some(max) = limits.pids {
            write_file(&self.path.join("pids.max"), &max.to_string())?;
        }
        Ok(())
    }

    /// `cgroup.events` says `frozen 1`.
    fn is_frozen(&self) -> Result<bool, CgroupError> {
        let path = self.path.join("cgroup.events");
        let text = read_file(&path)?;
        Ok(keyed(&path, &text, "frozen")? == Some(1))
    }
}

impl CgroupBackend for V2Cgroup {
    fn paths(&self) -> Vec<PathBuf> {
        vec![self.path.clone()]
    }

    fn freeze(&self) -> Result<bool, CgroupError> {
        // cgroup.freeze exists since Linux 5.2, only in non-root cgroups.
        let control = self.path.join("cgroup.freeze");
        if !control.exists() {
            return Ok(false);
        }
        write_file(&control, "1")?;
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        while !self.is_frozen()? && Instant::now() < deadline {
            sleep(Duration::from_millis(1));
        }
        Ok(true)
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        let control = self.path.join("cgroup.freeze");
        if control.exists() {
            write_file(&control, "0")?;
        }
        Ok(())
    }

    fn kill_native(&self) -> Result<bool, CgroupError> {
        // cgroup.kill (Linux 5.14) SIGKILLs the whole subtree atomically with respect to
        // forks, so no freeze is needed.
        let control = self.path.join("cgroup.kill");
        if !control.exists() {
            return Ok(false);
        }
        write_file(&control, "1")?;
        Ok(true)
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        // memory.events is hierarchical unless cgroup2 is mounted with memory_localevents;
        // walking the subtree is right either way.
        for cgroup in walk(&self.path)? {
            let path = cgroup.join("memory.events");
            if let Some(text) = read_optional(&path)?
                && keyed(&path, &text, "oom_kill")?.unwrap_or(0) > 0
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn stats(&self) -> Result<Stats, CgroupError> {
        let mut stats = Stats::default();
        let path = self.path.join("cpu.stat");
        if let Some(text) = read_optional(&path)? {
            stats.cpu_usage_ns =
                keyed(&path, &text, "usage_usec")?.map(|us| us.saturating_mul(1000));
            stats.nr_throttled = keyed(&path, &text, "nr_throttled")?;
        }
        stats.memory_current_bytes = read_u64_optional(&self.path.join("memory.current"))?;
        stats.memory_peak_bytes = read_u64_optional(&self.path.join("memory.peak"))?;
        Ok(stats)
    }

    fn read_memory_limit(&self) -> Result<Option<u64>, CgroupError> {
        let path = self.path.join("memory.max");
        match read_optional(&path)? {
            Some(text) if text.trim() == "max" => Ok(None),
            Some(text) => parse_u64(&path, &text).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::tests::{fake_file, fake_tree_root};
    use crate::cgroup::{Version, detect_with};

    /// A v2 cgroup as the kernel shows it: controllers available, none enabled below.
    fn fake_v2_cgroup(dir: &Path, controllers: &str) {
        for (name, content) in [
            ("cgroup.controllers", controllers),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", ""),
            ("cgroup.events", "populated 0\nfrozen 0\n"),
            ("cgroup.freeze", "0\n"),
            ("cgroup.kill", ""),
            ("memory.max", "max\n"),
            ("memory.swap.max", "max\n"),
            ("memory.events", "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n"),
            ("memory.current", "8192\n"),
            ("memory.peak", "16384\n"),
            ("cpu.max", "max 100000\n"),
            (
                "cpu.stat",
                "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 3\nnr_throttled 2\nthrottled_usec 9\n",
            ),
            ("pids.max", "max\n"),
        ] {
            fake_file(&dir.join(name), content);
        }
    }

    fn mountinfo(root: &Path) -> String {
        format!(
            "24 1 0:21 / {} rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n",
            root.display()
        )
    }

    const OWN: &str = "user.slice/user-1000.slice/session-2.scope";

    #[test]
    fn pure_v2_host_uses_our_own_cgroup_as_base() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(&root, &format!("0::/{OWN}\n"), &mountinfo(&root)).unwrap();
        assert_eq!(h.version(), Version::V2);
        assert_eq!(h.bases(), vec![root.join(OWN)]);
    }

    #[test]
    fn after_moving_into_the_supervisor_leaf_the_base_stays_the_parent() {
        let (_tmp, root) = fake_tree_root();
        let own = format!("0::/{OWN}/{SUPERVISOR_LEAF}\n");
        let h = detect_with(&root, &own, &mountinfo(&root)).unwrap();
        assert_eq!(h.bases(), vec![root.join(OWN)]);
    }

    #[test]
    fn create_enables_controllers_down_the_tree_and_writes_limits() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(&root, &format!("0::/{OWN}\n"), &mountinfo(&root)).unwrap();
        let base = root.join(OWN);
        fake_v2_cgroup(&base, "cpuset cpu io memory hugetlb pids rdma misc\n");
        fake_v2_cgroup(&base.join("stagehand"), "cpu memory pids\n");
        fake_v2_cgroup(&base.join("stagehand/run"), "cpu memory pids\n");
        fake_v2_cgroup(&base.join("stagehand/run/step"), "");
        let limits = Limits {
            memory_bytes: Some(32 << 20),
            cpu_millis: Some(200),
            pids: Some(100),
        };
        let cg = h.create(Path::new("stagehand/run/step"), &limits).unwrap();
        let read = |p: &str| std::fs::read_to_string(base.join(p)).unwrap();
        assert_eq!(read("cgroup.subtree_control"), "+memory +cpu +pids");
        assert_eq!(
            read("stagehand/cgroup.subtree_control"),
            "+memory +cpu +pids"
        );
        assert_eq!(
            read("stagehand/run/cgroup.subtree_control"),
            "+memory +cpu +pids"
        );
        // The leaf is where processes go: no controllers enabled below it.
        assert_eq!(read("stagehand/run/step/cgroup.subtree_control"), "");
        assert_eq!(read("stagehand/run/step/memory.max"), "33554432");
        assert_eq!(read("stagehand/run/step/memory.swap.max"), "0");
        assert_eq!(read("stagehand/run/step/cpu.max"), "20000 100000");
        assert_eq!(read("stagehand/run/step/pids.max"), "100");
        assert_eq!(cg.paths(), vec![base.join("stagehand/run/step")]);
        assert_eq!(cg.memory_limit(), Some(32 << 20));
    }

    #[test]
    fn already_enabled_controllers_are_not_written_again() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(&root, "0::/\n", &mountinfo(&root)).unwrap();
        fake_v2_cgroup(&root, "cpu memory pids io\n");
        fake_file(&root.join("cgroup.subtree_control"), "cpu memory\n");
        fake_v2_cgroup(&root.join("stagehand"), "cpu memory pids\n");
        h.create(Path::new("stagehand"), &Limits::default())
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+pids"
        );
    }

    #[test]
    fn limit_whose_controller_the_parent_lacks_fails_and_cleans_up() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(&root, &format!("0::/{OWN}\n"), &mountinfo(&root)).unwrap();
        let base = root.join(OWN);
        // Only cpu is passed down to us: no memory controller anywhere below.
        fake_v2_cgroup(&base, "cpu\n");
        let limits = Limits {
            memory_bytes: Some(1 << 20),
            ..Limits::default()
        };
        let error = h.create(Path::new("stagehand"), &limits).unwrap_err();
        assert!(
            matches!(&error, CgroupError::ControllerMissing { controller: "memory", path } if *path == base),
            "{error:?}"
        );
        assert!(!base.join("stagehand").exists());
    }

    #[test]
    fn rootless_evacuate_moves_the_host_side_parent_too() {
        let (_tmp, root) = fake_tree_root();
        fake_file(&root.join("cgroup.procs"), "4242\n99\n");
        fake_file(&root.join(SUPERVISOR_LEAF).join("cgroup.procs"), "");
        assert!(evacuate(&root, &[4242, 99]).unwrap());
        // The fake file keeps the last write: both were written, in the listed order.
        assert_eq!(
            std::fs::read_to_string(root.join(SUPERVISOR_LEAF).join("cgroup.procs")).unwrap(),
            "99"
        );
        // A third process (a login shell) is not ours to move.
        fake_file(&root.join("cgroup.procs"), "4242\n99\n555\n");
        assert!(!evacuate(&root, &[4242, 99]).unwrap());
    }

    #[test]
    fn evacuate_moves_us_only_when_alone() {
        let (_tmp, root) = fake_tree_root();
        fake_file(&root.join("cgroup.procs"), "4242\n");
        fake_file(&root.join(SUPERVISOR_LEAF).join("cgroup.procs"), "");
        assert!(evacuate(&root, &[4242]).unwrap());
        assert_eq!(
            std::fs::read_to_string(root.join(SUPERVISOR_LEAF).join("cgroup.procs")).unwrap(),
            "4242"
        );
        fake_file(&root.join("cgroup.procs"), "4242\n777\n");
        fake_file(&root.join(SUPERVISOR_LEAF).join("cgroup.procs"), "");
        assert!(!evacuate(&root, &[4242]).unwrap());
        assert_eq!(
            std::fs::read_to_string(root.join(SUPERVISOR_LEAF).join("cgroup.procs")).unwrap(),
            ""
        );
    }

    #[test]
    fn stats_oom_and_limit_read_back() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(&root, "0::/\n", &mountinfo(&root)).unwrap();
        let dir = root.join("stagehand/r");
        fake_v2_cgroup(&dir, "");
        let cg = h.open(Path::new("stagehand/r")).unwrap();
        assert_eq!(cg.memory_limit(), None);
        assert_eq!(
            cg.stats().unwrap(),
            Stats {
                cpu_usage_ns: Some(1_500_000),
                memory_current_bytes: Some(8192),
                memory_peak_bytes: Some(16384),
                nr_throttled: Some(2),
            }
        );
        assert!(!cg.oom_killed().unwrap());
        fake_file(
            &dir.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
        );
        assert!(cg.oom_killed().unwrap());
        fake_file(&dir.join("memory.max"), "1048576\n");
        assert_eq!(
            h.open(Path::new("stagehand/r")).unwrap().memory_limit(),
            Some(1 << 20)
        );
    }

    #[test]
    fn kill_native_and_freeze_use_the_v2_files() {
        let (_tmp, root) = fake_tree_root();
        let dir = root.join("c");
        fake_v2_cgroup(&dir, "");
        let cg = V2Cgroup { path: dir.clone() };
        assert!(cg.kill_native().unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.kill")).unwrap(),
            "1"
        );
        fake_file(&dir.join("cgroup.events"), "populated 1\nfrozen 1\n");
        assert!(cg.freeze().unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "1"
        );
        cg.thaw().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "0"
        );
        // Kernels before 5.14 / 5.2.
        std::fs::remove_file(dir.join("cgroup.kill")).unwrap();
        std::fs::remove_file(dir.join("cgroup.freeze")).unwrap();
        assert!(!cg.kill_native().unwrap());
        assert!(!cg.freeze().unwrap());
    }
}
