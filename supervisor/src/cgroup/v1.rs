//! cgroup v1 (legacy and hybrid hosts): one directory per hierarchy for each cgroup.
//!
//! Owns the v1 layout (which mounted hierarchies carry memory, cpu, cpuacct, pids and freezer,
//! and where stagehand sits in each), v1 limit files, the `freezer.state` freeze, and the v1
//! OOM and usage counters. Does not use cpuset (it would need `cpuset.cpus`/`cpuset.mems`
//! copied into every new cgroup, and stagehand pins no CPUs), nor blkio, devices or the named
//! `systemd` hierarchy: a process left at its current cgroup there loses nothing we enforce.
//! Comounted controllers (`cpu,cpuacct`) are one hierarchy and one directory; they are found
//! from the mount options, never from directory names.

use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use super::{
    CPU_PERIOD_US, CgroupBackend, CgroupError, CgroupMount, FREEZE_TIMEOUT, Limits, ProcCgroup,
    Stats, cpu_quota_us, keyed, mkdir_tracked, own_dir, read_file, read_optional,
    read_u64_optional, undo_mkdir, walk, write_file,
};

/// The v1 controllers stagehand uses.
const USED: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

/// Above this, `memory.limit_in_bytes` means "unlimited" (the kernel reports
/// `PAGE_COUNTER_MAX * PAGE_SIZE`, 9223372036854771712 on x86-64 with 4 KiB pages).
const UNLIMITED_FLOOR: u64 = 1 << 62;

/// One mounted v1 hierarchy that carries a controller we use.
#[derive(Debug, Clone)]
struct V1Mount {
    /// The controllers of [`USED`] in this hierarchy (`["cpu", "cpuacct"]` when comounted).
    controllers: Vec<String>,
    /// stagehand's own cgroup directory in this hierarchy.
    base: PathBuf,
}

/// The v1 hierarchies in use and stagehand's place in each.
#[derive(Debug, Clone)]
pub(super) struct V1Hierarchy {
    mounts: Vec<V1Mount>,
}

impl V1Hierarchy {
    /// Picks the v1 mounts that carry a controller we use. `Ok(None)` if there are none.
    /// The same hierarchy mounted twice counts once (the first mount wins).
    pub(super) fn new(
        mounts: &[CgroupMount],
        own: &[ProcCgroup],
    ) -> Result<Option<Self>, CgroupError> {
        let mut used: Vec<V1Mount> = Vec::new();
        for mount in mounts.iter().filter(|m| !m.unified) {
            let controllers: Vec<String> = mount
                .options
                .iter()
                .filter(|o| USED.contains(&o.as_str()))
                .cloned()
                .collect();
            if controllers.is_empty() || used.iter().any(|u| u.controllers == controllers) {
                continue;
            }
            let line = own
                .iter()
                .find(|l| l.id != 0 && l.controllers.iter().any(|c| controllers.contains(c)))
                .ok_or_else(|| CgroupError::OwnCgroupUnknown {
                    controllers: controllers.join(","),
                    mount_point: mount.mount_point.clone(),
                })?;
            used.push(V1Mount {
                base: own_dir(mount, &line.path),
                controllers,
            });
        }
        Ok((!used.is_empty()).then_some(V1Hierarchy { mounts: used }))
    }

    /// stagehand's own directory in each hierarchy.
    pub(super) fn bases(&self) -> Vec<PathBuf> {
        self.mounts.iter().map(|m| m.base.clone()).collect()
    }

    fn has(&self, controller: &str) -> bool {
        self.mounts
            .iter()
            .any(|m| m.controllers.iter().any(|c| c == controller))
    }

    /// `mkdir -p` in every hierarchy, then the limits on the last component.
    pub(super) fn create(&self, rel: &Path, limits: &Limits) -> Result<V1Cgroup, CgroupError> {
        // Refuse before touching anything: a limit we cannot enforce is a configuration
        // error, not something to discover after half the tree exists.
        for (controller, wanted) in [
            ("memory", limits.memory_bytes.is_some()),
            ("cpu", limits.cpu_millis.is_some()),
            ("pids", limits.pids.is_some()),
        ] {
            if wanted && !self.has(controller) {
                return Err(CgroupError::ControllerMissing {
                    controller,
                    path: self.bases().into_iter().next().unwrap_or_default(),
                });
            }
        }
        let mut created = Vec::new();
        for mount in &self.mounts {
            match mkdir_tracked(&mount.base, rel) {
                Ok(dirs) => created.extend(dirs),
                Err(error) => {
                    undo_mkdir(&created);
                    return Err(error);
                }
            }
        }
        let cgroup = self.open(rel);
        if let Err(error) = cgroup.write_limits(limits) {
            undo_mkdir(&created);
            return Err(error);
        }
        Ok(cgroup)
    }

    /// The cgroup at `rel` in every hierarchy, without touching the filesystem.
    pub(super) fn open(&self, rel: &Path) -> V1Cgroup {
        V1Cgroup {
            dirs: self
                .mounts
                .iter()
                .map(|m| V1Dir {
                    controllers: m.controllers.clone(),
                    path: m.base.join(rel),
                })
                .collect(),
        }
    }
}

/// A cgroup's directory in one hierarchy.
#[derive(Debug, Clone)]
struct V1Dir {
    controllers: Vec<String>,
    path: PathBuf,
}

/// A v1 cgroup: one directory per hierarchy.
#[derive(Debug, Clone)]
pub(super) struct V1Cgroup {
    dirs: Vec<V1Dir>,
}

impl V1Cgroup {
    /// The directory in the hierarchy that carries `controller`.
    fn dir(&self, controller: &str) -> Option<&Path> {
        self.dirs
            .iter()
            .find(|d| d.controllers.iter().any(|c| c == controller))
            .map(|d| d.path.as_path())
    }

    fn write_limits(&self, limits: &Limits) -> Result<(), CgroupError> {
        if let (Some(bytes), Some(dir)) = (limits.memory_bytes, self.dir("memory")) {
            write_memory_limit(dir, bytes)?;
        }
        if let (Some(millis), Some(dir)) = (limits.cpu_millis, self.dir("cpu")) {
            // Period first: the quota is checked against the period in force.
            write_file(&dir.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write_file(
                &dir.join("cpu.cfs_quota_us"),
                &cpu_quota_us(millis).to_string(),
            )?;
        }
        if let (Some(max), Some(dir)) = (limits.pids, self.dir("pids")) {
            write_file(&dir.join("pids.max"), &max.to_string())?;
        }
        Ok(())
    }
}

/// Sets `memory.limit_in_bytes` and, when swap accounting exists, `memory.memsw.limit_in_bytes`
/// to the same value, so the cgroup gets no swap beyond its memory limit. The kernel requires
/// memsw >= limit at every moment (memcontrol-v1.c `mem_cgroup_resize_max` returns EINVAL
/// otherwise), so when raising above the current memsw limit, memsw goes first; when lowering,
/// the memory limit goes first.
fn write_memory_limit(dir: &Path, bytes: u64) -> Result<(), CgroupError> {
    let limit = dir.join("memory.limit_in_bytes");
    let memsw = dir.join("memory.memsw.limit_in_bytes");
    let value = bytes.to_string();
    match read_u64_optional(&memsw)? {
        Some(current) if bytes > current => {
            write_file(&memsw, &value)?;
            write_file(&limit, &value)
        }
        Some(_) => {
            write_file(&limit, &value)?;
            write_file(&memsw, &value)
        }
        None => write_file(&limit, &value),
    }
}

impl CgroupBackend for V1Cgroup {
    fn paths(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.path.clone()).collect()
    }

    fn freeze(&self) -> Result<bool, CgroupError> {
        let Some(dir) = self.dir("freezer") else {
            return Ok(false);
        };
        let state = dir.join("freezer.state");
        if !state.exists() {
            return Ok(false);
        }
        write_file(&state, "FROZEN")?;
        // Freezing is asynchronous: the state reads FREEZING until every task stopped
        // (cgroup-v1/freezer-subsystem.rst).
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        while read_file(&state)?.trim() != "FROZEN" && Instant::now() < deadline {
            sleep(Duration::from_millis(1));
        }
        Ok(true)
    }

    fn thaw(&self) -> Result<(), CgroupError> {
        if let Some(dir) = self.dir("freezer") {
            let state = dir.join("freezer.state");
            if state.exists() {
                write_file(&state, "THAWED")?;
            }
        }
        Ok(())
    }

    fn oom_killed(&self) -> Result<bool, CgroupError> {
        let Some(dir) = self.dir("memory") else {
            return Ok(false);
        };
        for cgroup in walk(dir)? {
            let path = cgroup.join("memory.oom_control");
            let Some(text) = read_optional(&path)? else {
                continue;
            };
            // `oom_kill` exists since Linux 4.13. Older kernels only say whether the cgroup
            // is under OOM right now; `memory.failcnt` is not used as a fallback because page
            // cache reclaim at the limit raises it without anything being killed.
            let hit = match keyed(&path, &text, "oom_kill")? {
                Some(kills) => kills > 0,
                None => keyed(&path, &text, "under_oom")?.unwrap_or(0) > 0,
            };
            if hit {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn stats(&self) -> Result<Stats, CgroupError> {
        let mut stats = Stats::default();
        if let Some(dir) = self.dir("cpuacct") {
            stats.cpu_usage_ns = read_u64_optional(&dir.join("cpuacct.usage"))?;
        }
        if let Some(dir) = self.dir("cpu") {
            let path = dir.join("cpu.stat");
            if let Some(text) = read_optional(&path)? {
                stats.nr_throttled = keyed(&path, &text, "nr_throttled")?;
            }
        }
        if let Some(dir) = self.dir("memory") {
            stats.memory_current_bytes = read_u64_optional(&dir.join("memory.usage_in_bytes"))?;
            stats.memory_peak_bytes = read_u64_optional(&dir.join("memory.max_usage_in_bytes"))?;
        }
        Ok(stats)
    }

    fn read_memory_limit(&self) -> Result<Option<u64>, CgroupError> {
        let Some(dir) = self.dir("memory") else {
            return Ok(None);
        };
        Ok(read_u64_optional(&dir.join("memory.limit_in_bytes"))?.filter(|&b| b < UNLIMITED_FLOOR))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::tests::{HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP, fake_file, fake_tree_root};
    use crate::cgroup::{Version, detect_with};

    /// Control file names and contents.
    type Controls<'a> = &'a [(&'a str, &'a str)];

    /// Files the v1 kernel provides in a new cgroup of each hierarchy we use.
    fn fake_v1_cgroup(root: &Path, own_memory: &str, rel: &str) {
        let files: [(&str, &str, Controls); 5] = [
            (
                "memory",
                own_memory,
                &[
                    ("memory.limit_in_bytes", "9223372036854771712\n"),
                    ("memory.memsw.limit_in_bytes", "9223372036854771712\n"),
                    (
                        "memory.oom_control",
                        "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
                    ),
                    ("memory.usage_in_bytes", "1048576\n"),
                    ("memory.max_usage_in_bytes", "2097152\n"),
                ],
            ),
            (
                "cpu",
                "",
                &[
                    ("cpu.cfs_period_us", "100000\n"),
                    ("cpu.cfs_quota_us", "-1\n"),
                    (
                        "cpu.stat",
                        "nr_periods 31\nnr_throttled 30\nthrottled_time 1\n",
                    ),
                ],
            ),
            ("cpuacct", "", &[("cpuacct.usage", "615116446\n")]),
            ("pids", "", &[("pids.max", "max\n")]),
            ("freezer", "", &[("freezer.state", "THAWED\n")]),
        ];
        for (hierarchy, own, controls) in files {
            let dir = root.join(hierarchy).join(own).join(rel);
            fake_file(&dir.join("cgroup.procs"), "");
            for (name, content) in controls {
                fake_file(&dir.join(name), content);
            }
        }
    }

    const OWN: &str = "process_api/986eee41be941afae8e43af92bdc28e0";

    #[test]
    fn hybrid_host_places_memory_under_own_cgroup_and_the_rest_at_the_root() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(
            &root,
            HYBRID_PROC_CGROUP,
            &HYBRID_MOUNTINFO.replace("/sys/fs/cgroup", root.to_str().unwrap()),
        )
        .unwrap();
        assert_eq!(h.version(), Version::V1);
        assert_eq!(
            h.bases(),
            vec![
                root.join("cpu"),
                root.join("cpuacct"),
                root.join("memory").join(OWN),
                root.join("freezer"),
                root.join("pids"),
            ]
        );
    }

    #[test]
    fn comounted_cpu_cpuacct_is_one_directory() {
        let (_tmp, root) = fake_tree_root();
        let r = root.to_str().unwrap();
        let mountinfo = format!(
            "32 31 0:29 / {r}/cpu,cpuacct rw,relatime shared:12 - cgroup cgroup rw,cpu,cpuacct\n\
             35 31 0:32 / {r}/memory rw,relatime shared:15 - cgroup cgroup rw,memory\n"
        );
        let proc_cgroup = "2:memory:/user.slice\n1:cpu,cpuacct:/user.slice\n0::/user.slice\n";
        let h = detect_with(&root, proc_cgroup, &mountinfo).unwrap();
        let dir = root.join("cpu,cpuacct/user.slice");
        assert_eq!(h.bases(), vec![dir.clone(), root.join("memory/user.slice")]);
        for base in h.bases() {
            std::fs::create_dir_all(base).unwrap();
        }
        fake_file(&dir.join("s/r/cpu.cfs_period_us"), "100000\n");
        fake_file(&dir.join("s/r/cpu.cfs_quota_us"), "-1\n");
        fake_file(&dir.join("s/r/cpuacct.usage"), "42\n");
        let limits = Limits {
            cpu_millis: Some(250),
            ..Limits::default()
        };
        let cg = h.create(Path::new("s/r"), &limits).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("s/r/cpu.cfs_quota_us")).unwrap(),
            "25000"
        );
        assert_eq!(cg.stats().unwrap().cpu_usage_ns, Some(42));
    }

    #[test]
    fn create_writes_every_limit_file_and_lists_every_directory() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(
            &root,
            HYBRID_PROC_CGROUP,
            &HYBRID_MOUNTINFO.replace("/sys/fs/cgroup", root.to_str().unwrap()),
        )
        .unwrap();
        let rel = "stagehand/run1/step1";
        fake_v1_cgroup(&root, OWN, rel);
        let limits = Limits {
            memory_bytes: Some(32 << 20),
            cpu_millis: Some(200),
            pids: Some(64),
        };
        let cg = h.create(Path::new(rel), &limits).unwrap();
        let mem = root.join("memory").join(OWN).join(rel);
        let read = |p: PathBuf| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(mem.join("memory.limit_in_bytes")), "33554432");
        assert_eq!(read(mem.join("memory.memsw.limit_in_bytes")), "33554432");
        assert_eq!(
            read(root.join("cpu").join(rel).join("cpu.cfs_period_us")),
            "100000"
        );
        assert_eq!(
            read(root.join("cpu").join(rel).join("cpu.cfs_quota_us")),
            "20000"
        );
        assert_eq!(read(root.join("pids").join(rel).join("pids.max")), "64");
        assert_eq!(cg.memory_limit(), Some(32 << 20));
        assert_eq!(
            cg.paths(),
            vec![
                root.join("cpu").join(rel),
                root.join("cpuacct").join(rel),
                mem,
                root.join("freezer").join(rel),
                root.join("pids").join(rel),
            ]
        );
    }

    #[test]
    fn memsw_goes_first_when_raising_above_it_and_second_when_lowering() {
        let (_tmp, root) = fake_tree_root();
        let dir = root.join("memory/c");
        fake_file(&dir.join("memory.limit_in_bytes"), "1000\n");
        fake_file(&dir.join("memory.memsw.limit_in_bytes"), "1000\n");
        write_memory_limit(&dir, 500).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.limit_in_bytes")).unwrap(),
            "500"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.memsw.limit_in_bytes")).unwrap(),
            "500"
        );
        // Raising: with the limit file gone, the write order shows as what happened before
        // the error.
        std::fs::remove_file(dir.join("memory.limit_in_bytes")).unwrap();
        let error = write_memory_limit(&dir, 2000).unwrap_err();
        // memsw was raised before the (missing) limit file was tried.
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.memsw.limit_in_bytes")).unwrap(),
            "2000"
        );
        assert!(
            error
                .to_string()
                .starts_with("cannot write memory.limit_in_bytes in "),
            "{error}"
        );
    }

    #[test]
    fn memory_limit_without_swap_accounting_writes_only_the_limit() {
        let (_tmp, root) = fake_tree_root();
        let dir = root.join("memory/c");
        fake_file(&dir.join("memory.limit_in_bytes"), "9223372036854771712\n");
        write_memory_limit(&dir, 4096).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.limit_in_bytes")).unwrap(),
            "4096"
        );
        assert!(!dir.join("memory.memsw.limit_in_bytes").exists());
    }

    #[test]
    fn a_missing_limit_file_fails_create_and_removes_what_it_made() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(
            &root,
            HYBRID_PROC_CGROUP,
            &HYBRID_MOUNTINFO.replace("/sys/fs/cgroup", root.to_str().unwrap()),
        )
        .unwrap();
        for base in h.bases() {
            std::fs::create_dir_all(base).unwrap();
        }
        let limits = Limits {
            pids: Some(10),
            ..Limits::default()
        };
        // The fresh directories hold no pids.max (a fake tree has no kernel to provide it).
        let error = h.create(Path::new("stagehand/r/s"), &limits).unwrap_err();
        assert!(
            error.to_string().starts_with(&format!(
                "cannot write pids.max in {}: No such file or directory",
                root.join("pids/stagehand/r/s").display()
            )),
            "{error}"
        );
        for base in h.bases() {
            assert!(
                !base.join("stagehand").exists(),
                "{} left behind",
                base.display()
            );
        }
    }

    #[test]
    fn limit_without_its_controller_is_refused_before_mkdir() {
        let (_tmp, root) = fake_tree_root();
        let r = root.to_str().unwrap();
        let mountinfo = format!("37 31 0:34 / {r}/freezer rw - cgroup cgroup rw,freezer\n");
        let h = detect_with(&root, "6:freezer:/\n", &mountinfo).unwrap();
        std::fs::create_dir_all(root.join("freezer")).unwrap();
        let limits = Limits {
            memory_bytes: Some(1 << 20),
            ..Limits::default()
        };
        let error = h.create(Path::new("stagehand/r"), &limits).unwrap_err();
        assert!(matches!(
            error,
            CgroupError::ControllerMissing {
                controller: "memory",
                ..
            }
        ));
        assert!(!root.join("freezer/stagehand").exists());
    }

    #[test]
    fn oom_kill_counter_and_under_oom_fallback_are_read_recursively() {
        let (_tmp, root) = fake_tree_root();
        let r = root.to_str().unwrap();
        let mountinfo = format!("35 31 0:32 / {r}/memory rw - cgroup cgroup rw,memory\n");
        let h = detect_with(&root, "4:memory:/\n", &mountinfo).unwrap();
        let run = root.join("memory/stagehand/run");
        fake_file(
            &run.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        );
        fake_file(
            &run.join("step/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
        );
        let cg = h.open(Path::new("stagehand/run")).unwrap();
        assert!(!cg.oom_killed().unwrap());
        fake_file(
            &run.join("step/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        );
        assert!(cg.oom_killed().unwrap());
        // A pre-4.13 kernel: no oom_kill line.
        fake_file(
            &run.join("step/memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 1\n",
        );
        assert!(cg.oom_killed().unwrap());
    }

    #[test]
    fn stats_and_read_back_limit_come_from_the_right_hierarchies() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(
            &root,
            HYBRID_PROC_CGROUP,
            &HYBRID_MOUNTINFO.replace("/sys/fs/cgroup", root.to_str().unwrap()),
        )
        .unwrap();
        fake_v1_cgroup(&root, OWN, "stagehand/r");
        let cg = h.open(Path::new("stagehand/r")).unwrap();
        // The kernel's "unlimited" reads back as no limit.
        assert_eq!(cg.memory_limit(), None);
        assert_eq!(
            cg.stats().unwrap(),
            Stats {
                cpu_usage_ns: Some(615116446),
                memory_current_bytes: Some(1048576),
                memory_peak_bytes: Some(2097152),
                nr_throttled: Some(30),
            }
        );
    }

    #[test]
    fn freeze_and_thaw_write_freezer_state() {
        let (_tmp, root) = fake_tree_root();
        let h = detect_with(
            &root,
            HYBRID_PROC_CGROUP,
            &HYBRID_MOUNTINFO.replace("/sys/fs/cgroup", root.to_str().unwrap()),
        )
        .unwrap();
        fake_v1_cgroup(&root, OWN, "stagehand/r");
        let cg = h.open(Path::new("stagehand/r")).unwrap();
        let state = root.join("freezer/stagehand/r/freezer.state");
        // The fake file reads back what we wrote, FROZEN, so the wait ends at once.
        assert!(cg.inner.backend().freeze().unwrap());
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "FROZEN");
        cg.inner.backend().thaw().unwrap();
        assert_eq!(std::fs::read_to_string(&state).unwrap(), "THAWED");
    }
}
