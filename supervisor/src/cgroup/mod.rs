//! Cgroups for stage runs and steps: one cgroup per run and one per step under it
//! (`stagehand/<run-id>/<step-id>`), placed relative to stagehand's own cgroup in every
//! hierarchy used, on cgroup v2 and on v1/hybrid hosts.
//!
//! Owns: detecting the layout ([`detect`], [`detect_with`]), creating the directories and
//! writing limits ([`Hierarchy::create`]), placing processes ([`Cgroup::add_pid`],
//! [`Cgroup::procs_files`]), reading OOM state and stats, killing everything inside a cgroup
//! however it was forked ([`Cgroup::kill_all`]) and removing the directories
//! ([`Cgroup::remove`], [`remove_tree`]).
//!
//! Does not own: spawning or reaping processes (the reaper does; this module only sends
//! SIGKILL), deciding limits from pipeline YAML, or container cgroups (the OCI runtime creates
//! those itself from `linux.cgroupsPath`).
//!
//! Every function that touches the system takes the cgroup root, and detection also takes the
//! text of `/proc/self/cgroup` and `/proc/self/mountinfo`, so the unit tests run on a fake tree
//! in a tempdir (like youki's `v2/pids.rs` fixtures and firecracker's `MockCgroupFs`).
//! Control files are opened without `O_CREAT`, as on the real cgroupfs, so a fake tree must
//! contain the files a kernel would provide.
//!
//! Processes belong in leaves only: on cgroup v2 a cgroup with controllers enabled for its
//! children cannot hold processes ("no internal processes", cgroup-v2.rst). See [`v2`] for what
//! happens when stagehand itself sits in a cgroup with other processes.

mod v1;
mod v2;

use std::collections::BTreeSet;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where cgroup hierarchies are mounted on a normal host.
pub const DEFAULT_ROOT: &str = "/sys/fs/cgroup";

/// How long [`Cgroup::kill_all`] keeps freezing and killing before giving up.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a freeze to complete. Tasks in uninterruptible sleep can keep a
/// cgroup in `FREEZING` for a long time; we then kill anyway, which is still correct because
/// a task that is not frozen yet cannot fork once SIGKILL is pending.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long `rmdir` is retried on EBUSY: a cgroup stays busy for a moment after its last
/// task exited while the kernel finishes tearing the task down.
const RMDIR_TIMEOUT: Duration = Duration::from_secs(2);
/// The CFS period used for CPU quotas (the kernel default), in microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// The smallest CFS quota the kernel accepts (1 ms), in microseconds.
const CPU_MIN_QUOTA_US: u64 = 1_000;

/// Resource limits for one cgroup. `None` leaves the kernel default (unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes. Swap is capped too: no swap beyond this limit.
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU (`200` = `200m` = a fifth of one CPU).
    pub cpu_millis: Option<u64>,
    /// Maximum number of tasks (processes and threads).
    pub pids: Option<u64>,
}

/// Which cgroup interface the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Legacy or hybrid: one hierarchy per controller (or group of comounted controllers).
    /// A cgroup2 mount that coexists with v1 controllers (hybrid) is ignored.
    V1,
    /// Unified: a single cgroup2 hierarchy mounted at the root.
    V2,
}

/// Usage counters of a cgroup and its descendants. `None` when the host does not expose the
/// counter (controller not mounted or enabled, or a kernel too old for the file).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// CPU time used, in nanoseconds (v1 `cpuacct.usage`, v2 `cpu.stat` `usage_usec`).
    pub cpu_usage_ns: Option<u64>,
    /// Memory in use now, in bytes (v1 `memory.usage_in_bytes`, v2 `memory.current`).
    pub memory_current_bytes: Option<u64>,
    /// Highest memory use seen, in bytes (v1 `memory.max_usage_in_bytes`, v2 `memory.peak`,
    /// kernel 5.19 or later).
    pub memory_peak_bytes: Option<u64>,
    /// Number of CFS periods in which the cgroup was throttled by its CPU quota.
    pub nr_throttled: Option<u64>,
}

/// Errors of the cgroup layer. Each variant names the file or directory acted on.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// Reading a control file or `/proc` file failed.
    #[error("cannot read {} in {}: {}", Name(.path), Dir(.path), OsMsg(.error))]
    Read {
        /// The file.
        path: PathBuf,
        /// What the kernel said.
        error: io::Error,
    },
    /// Writing a control file failed.
    #[error("cannot write {} in {}: {}", Name(.path), Dir(.path), OsMsg(.error))]
    Write {
        /// The file.
        path: PathBuf,
        /// What the kernel said.
        error: io::Error,
    },
    /// Opening `cgroup.procs` for writing failed.
    #[error("cannot open {} in {} for writing: {}", Name(.path), Dir(.path), OsMsg(.error))]
    Open {
        /// The file.
        path: PathBuf,
        /// What the kernel said.
        error: io::Error,
    },
    /// `mkdir` of a cgroup failed.
    #[error("cannot create cgroup {}: {}", .path.display(), OsMsg(.error))]
    Create {
        /// The cgroup directory.
        path: PathBuf,
        /// What the kernel said.
        error: io::Error,
    },
    /// `rmdir` of a cgroup failed (after retrying on EBUSY).
    #[error("cannot remove cgroup {}: {}", .path.display(), OsMsg(.error))]
    Remove {
        /// The cgroup directory.
        path: PathBuf,
        /// What the kernel said.
        error: io::Error,
    },
    /// Listing the child cgroups of a cgroup failed.
    #[error("cannot list child cgroups of {}: {}", .path.display(), OsMsg(.error))]
    List {
        /// The cgroup directory.
        path: PathBuf,
        /// What the kernel said.
        error: io::Error,
    },
    /// A control file held something this module does not understand.
    #[error("unexpected content {content:?} in {} in {}", Name(.path), Dir(.path))]
    Parse {
        /// The file.
        path: PathBuf,
        /// The offending text.
        content: String,
    },
    /// Neither cgroup2 at the root nor any v1 controller we use below it.
    #[error(
        "no usable cgroup hierarchy is mounted under {}: mount cgroup2 there, or the cgroup v1 \
         memory, cpu, pids and freezer controllers below it",
        .root.display()
    )]
    NotMounted {
        /// The cgroup root searched.
        root: PathBuf,
    },
    /// `/proc/self/cgroup` has no line for a mounted hierarchy.
    #[error("/proc/self/cgroup has no line for the {controllers} hierarchy mounted at {}", .mount_point.display())]
    OwnCgroupUnknown {
        /// The controllers of the hierarchy (`memory`, `cpu,cpuacct`, or empty for cgroup2).
        controllers: String,
        /// Where the hierarchy is mounted.
        mount_point: PathBuf,
    },
    /// A limit was asked for but its controller is not available.
    #[error(
        "the {controller} controller is not available in {}, so the {controller} limit cannot \
         be enforced: mount or enable it, or drop the limit",
        .path.display()
    )]
    ControllerMissing {
        /// `memory`, `cpu` or `pids`.
        controller: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// cgroup v2: controllers cannot be enabled below stagehand's own cgroup because other
    /// processes share it.
    #[error(
        "cannot enable controllers in {}: it holds processes besides stagehand, and cgroup v2 \
         forbids controllers for the children of a cgroup with processes: run stagehand in a \
         cgroup of its own (e.g. `systemd-run --scope -p Delegate=yes stagehand ...`)",
        .path.display()
    )]
    NotDelegated {
        /// stagehand's cgroup.
        path: PathBuf,
    },
    /// The relative cgroup path is empty, absolute, or climbs with `..`.
    #[error("invalid cgroup path {:?}: it must be relative, non-empty and without `..`", .rel)]
    InvalidPath {
        /// The path given.
        rel: PathBuf,
    },
    /// Refused to freeze or kill a cgroup that contains stagehand itself.
    #[error("refusing to kill the processes of {}: it contains stagehand itself (pid {pid})", .path.display())]
    ContainsSelf {
        /// The cgroup.
        path: PathBuf,
        /// Our pid.
        pid: i32,
    },
    /// `kill(2)` failed with something other than ESRCH.
    #[error("cannot kill pid {pid} in {}: {}", .path.display(), .errno.desc())]
    Kill {
        /// The process.
        pid: i32,
        /// The cgroup it was found in.
        path: PathBuf,
        /// What the kernel said.
        errno: Errno,
    },
    /// Processes were still alive when [`Cgroup::kill_all`] gave up.
    #[error("processes {pids:?} still in {} after {:.1}s of SIGKILL", .path.display(), .waited.as_secs_f64())]
    NotEmpty {
        /// The cgroup.
        path: PathBuf,
        /// What was left.
        pids: Vec<i32>,
        /// How long we tried.
        waited: Duration,
    },
    /// Several independent failures (teardown tries every directory before reporting).
    #[error("{}", Joined(.errors))]
    Several {
        /// Every failure, in the order met.
        errors: Vec<CgroupError>,
    },
}

impl CgroupError {
    /// Folds a list of teardown errors into one result.
    fn from_errors(mut errors: Vec<CgroupError>) -> Result<(), CgroupError> {
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            _ => Err(CgroupError::Several { errors }),
        }
    }
}

/// Shows an io error the way a user reads it: "Permission denied", without "(os error 13)".
struct OsMsg<'a>(&'a io::Error);

impl fmt::Display for OsMsg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.raw_os_error() {
            Some(code) => f.write_str(Errno::from_raw(code).desc()),
            None => write!(f, "{}", self.0),
        }
    }
}

/// The file name of a path, for "cannot write memory.max in /sys/fs/cgroup/...".
struct Name<'a>(&'a Path);

impl fmt::Display for Name<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.file_name() {
            Some(name) => write!(f, "{}", name.to_string_lossy()),
            None => write!(f, "{}", self.0.display()),
        }
    }
}

/// The directory of a path.
struct Dir<'a>(&'a Path);

impl fmt::Display for Dir<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.parent() {
            Some(dir) => write!(f, "{}", dir.display()),
            None => f.write_str("/"),
        }
    }
}

/// Several errors on one line each.
struct Joined<'a>(&'a [CgroupError]);

impl fmt::Display for Joined<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-ID:controller-list:cgroup-path`
/// (cgroups(7)). The cgroup2 line is `0::<path>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcCgroup {
    /// Hierarchy id; 0 for cgroup2.
    pub(crate) id: u32,
    /// Controllers (or `name=...` for named v1 hierarchies); empty for cgroup2.
    pub(crate) controllers: Vec<String>,
    /// Path relative to the hierarchy's root, starting with `/`.
    pub(crate) path: String,
}

/// Parses `/proc/self/cgroup`. Lines that do not have three fields are skipped: the file is
/// produced by the kernel, and a future format must not break detection of the rest.
pub(crate) fn parse_proc_cgroup(text: &str) -> Vec<ProcCgroup> {
    text.lines()
        .filter_map(|line| {
            // The path is last and may itself contain ':'.
            let mut fields = line.splitn(3, ':');
            let id = fields.next()?.trim().parse().ok()?;
            let controllers = fields.next()?;
            let path = fields.next()?;
            Some(ProcCgroup {
                id,
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_owned)
                    .collect(),
                path: path.to_owned(),
            })
        })
        .collect()
}

/// A cgroup filesystem mount, from `/proc/self/mountinfo` or `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    /// Where it is mounted.
    pub(crate) mount_point: PathBuf,
    /// Which cgroup of the hierarchy appears at the mount point (`/` unless bind-mounted or
    /// seen from another cgroup namespace). `/proc/mounts` does not say; it is then `/`.
    pub(crate) root: String,
    /// `true` for cgroup2.
    pub(crate) unified: bool,
    /// Super-block options; for v1 these name the controllers (`rw,cpu,cpuacct`).
    pub(crate) options: Vec<String>,
}

/// Parses the cgroup and cgroup2 mounts out of `/proc/self/mountinfo` (proc(5): fields, then
/// ` - `, then fstype, source and super options) or, failing the ` - ` separator, a
/// `/proc/mounts` line (source, mount point, fstype, options).
pub(crate) fn parse_mounts(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (mount_point, root, fstype, options) = match line.split_once(" - ") {
                Some((left, right)) => {
                    let left: Vec<&str> = left.split_whitespace().collect();
                    let right: Vec<&str> = right.split_whitespace().collect();
                    (
                        *left.get(4)?,
                        unescape(left.get(3)?),
                        *right.first()?,
                        *right.get(2)?,
                    )
                }
                None => {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    (
                        *fields.get(1)?,
                        "/".to_owned(),
                        *fields.get(2)?,
                        *fields.get(3)?,
                    )
                }
            };
            let unified = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return None,
            };
            Some(CgroupMount {
                mount_point: PathBuf::from(unescape(mount_point)),
                root,
                unified,
                options: options.split(',').map(str::to_owned).collect(),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) the kernel uses in mount tables.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Our own cgroup directory in a hierarchy: the mount point plus our path in that hierarchy,
/// made relative to the mount's root. If our path is not below the mount's root (we sit
/// outside a cgroup namespace's view), the mount point itself is the best base available.
pub(crate) fn own_dir(mount: &CgroupMount, own_path: &str) -> PathBuf {
    let root = mount.root.trim_end_matches('/');
    let rel = own_path
        .strip_prefix(root)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .unwrap_or("");
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() || rel.split('/').any(|c| c == "..") {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rel)
    }
}

/// Checks that a cgroup path given by the caller stays below the base cgroup.
fn validate_rel(rel: &Path) -> Result<(), CgroupError> {
    let ok = rel.components().next().is_some()
        && rel.components().all(|c| matches!(c, Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidPath {
            rel: rel.to_path_buf(),
        })
    }
}

/// Reads a whole control file.
pub(crate) fn read_file(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|error| CgroupError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// Reads a control file, `None` if it does not exist (optional files such as
/// `memory.memsw.limit_in_bytes` without swap accounting, or a cgroup already removed).
pub(crate) fn read_optional(path: &Path) -> Result<Option<String>, CgroupError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(CgroupError::Read {
            path: path.to_path_buf(),
            error,
        }),
    }
}

/// Writes a value to a control file in one `write(2)`. No `O_CREAT`: cgroupfs provides the
/// files, and a missing one is an error to report, not a file to make.
pub(crate) fn write_file(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut file = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .map_err(|error| CgroupError::Write {
            path: path.to_path_buf(),
            error,
        })?;
    file.write_all(value.as_bytes())
        .map_err(|error| CgroupError::Write {
            path: path.to_path_buf(),
            error,
        })
}

/// Parses a single-number control file.
pub(crate) fn parse_u64(path: &Path, text: &str) -> Result<u64, CgroupError> {
    text.trim().parse().map_err(|_| CgroupError::Parse {
        path: path.to_path_buf(),
        content: text.to_owned(),
    })
}

/// Reads a single-number control file, `None` if it does not exist.
pub(crate) fn read_u64_optional(path: &Path) -> Result<Option<u64>, CgroupError> {
    read_optional(path)?
        .map(|text| parse_u64(path, &text))
        .transpose()
}

/// Looks up `key` in a flat-keyed file (`key value` per line: `cpu.stat`, `memory.events`,
/// `memory.oom_control`).
pub(crate) fn keyed(path: &Path, text: &str, key: &str) -> Result<Option<u64>, CgroupError> {
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        if fields.next() == Some(key) {
            return fields
                .next()
                .and_then(|v| v.parse().ok())
                .map(Some)
                .ok_or_else(|| CgroupError::Parse {
                    path: path.to_path_buf(),
                    content: line.to_owned(),
                });
        }
    }
    Ok(None)
}

/// The child cgroups of a cgroup (subdirectories), empty if the cgroup is gone.
pub(crate) fn child_dirs(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(error) => {
            return Err(CgroupError::List {
                path: dir.to_path_buf(),
                error,
            });
        }
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| CgroupError::List {
            path: dir.to_path_buf(),
            error,
        })?;
        // A child removed while we iterate is simply not a child any more.
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// A cgroup directory and all its descendants, parents before children.
pub(crate) fn walk(dir: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let mut out = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let children = child_dirs(&out[i])?;
        out.extend(children);
        i += 1;
    }
    Ok(out)
}

/// Adds the pids in `dir/cgroup.procs` and in every descendant's to `pids`. A cgroup that
/// vanished meanwhile holds no processes.
pub(crate) fn collect_pids(dir: &Path, pids: &mut BTreeSet<i32>) -> Result<(), CgroupError> {
    for cgroup in walk(dir)? {
        let path = cgroup.join("cgroup.procs");
        let Some(text) = read_optional(&path)? else {
            continue;
        };
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let pid = line.parse().map_err(|_| CgroupError::Parse {
                path: path.clone(),
                content: line.to_owned(),
            })?;
            pids.insert(pid);
        }
    }
    Ok(())
}

/// Creates `base/rel` component by component and returns the directories that did not exist
/// before, so a failed create can take back exactly what it made.
pub(crate) fn mkdir_tracked(base: &Path, rel: &Path) -> Result<Vec<PathBuf>, CgroupError> {
    let mut created = Vec::new();
    let mut dir = base.to_path_buf();
    for component in rel.components() {
        dir.push(component);
        match fs::create_dir(&dir) {
            Ok(()) => created.push(dir.clone()),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {}
            Err(error) => {
                undo_mkdir(&created);
                return Err(CgroupError::Create { path: dir, error });
            }
        }
    }
    Ok(created)
}

/// Best-effort removal of directories made by [`mkdir_tracked`], deepest first. Only used on
/// a path that already failed; the original error is the one worth reporting.
pub(crate) fn undo_mkdir(created: &[PathBuf]) {
    for dir in created.iter().rev() {
        if let Err(error) = rmdir_retry(dir) {
            tracing::warn!(%error, "leaving a cgroup behind after a failed create");
        }
    }
}

/// `rmdir` a cgroup, retrying on EBUSY for [`RMDIR_TIMEOUT`]; a cgroup already gone is fine.
pub(crate) fn rmdir_retry(dir: &Path) -> Result<(), CgroupError> {
    let deadline = Instant::now() + RMDIR_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(error)
                if error.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
            {
                sleep(Duration::from_millis(10));
            }
            Err(error) => {
                return Err(CgroupError::Remove {
                    path: dir.to_path_buf(),
                    error,
                });
            }
        }
    }
}

/// Removes a cgroup and all its descendants, leaves first. Keeps going after a failure and
/// returns every error.
pub(crate) fn rmdir_tree(dir: &Path) -> Vec<CgroupError> {
    let mut errors = Vec::new();
    match walk(dir) {
        Ok(dirs) => {
            for cgroup in dirs.iter().rev() {
                if let Err(error) = rmdir_retry(cgroup) {
                    errors.push(error);
                }
            }
        }
        Err(error) => {
            errors.push(error);
            // The listing failed but the leaf itself may still be removable.
            if let Err(error) = rmdir_retry(dir) {
                errors.push(error);
            }
        }
    }
    errors
}

/// The CFS quota for a CPU limit in millicpus, over [`CPU_PERIOD_US`], clamped to the
/// kernel's 1 ms minimum (anything lower is EINVAL; see sched/core.c `tg_set_cfs_bandwidth`).
pub(crate) fn cpu_quota_us(millis: u64) -> u64 {
    (millis.saturating_mul(CPU_PERIOD_US) / 1000).max(CPU_MIN_QUOTA_US)
}

/// What differs between v1 and v2 for a created cgroup. The kill loop, pid listing and
/// removal are shared default methods built on these.
pub(crate) trait CgroupBackend {
    /// Every directory of this cgroup, one per hierarchy used.
    fn paths(&self) -> Vec<PathBuf>;

    /// Freezes the cgroup and waits (bounded) for the freeze to complete. `Ok(false)` if
    /// this host cannot freeze it (no freezer hierarchy, or kernel without `cgroup.freeze`).
    fn freeze(&self) -> Result<bool, CgroupError>;

    /// Undoes [`CgroupBackend::freeze`].
    fn thaw(&self) -> Result<(), CgroupError>;

    /// Kills everything with a single kernel call if the kernel offers one (v2
    /// `cgroup.kill`, Linux 5.14). `Ok(false)` if not available.
    fn kill_native(&self) -> Result<bool, CgroupError> {
        Ok(false)
    }

    /// Whether the kernel OOM-killed a process in this cgroup or a descendant.
    fn oom_killed(&self) -> Result<bool, CgroupError>;

    /// Usage counters.
    fn stats(&self) -> Result<Stats, CgroupError>;

    /// The configured memory limit as read back from the kernel.
    fn read_memory_limit(&self) -> Result<Option<u64>, CgroupError>;

    /// Opens `cgroup.procs` of every directory for writing.
    fn procs_files(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.paths()
            .iter()
            .map(|dir| {
                let path = dir.join("cgroup.procs");
                // std opens with O_CLOEXEC: the child writes to these between fork and exec,
                // and exec then closes them, so the step never holds a handle on its cgroup.
                // O_TRUNC is a no-op on cgroupfs and keeps a fake tree's file exact.
                OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&path)
                    .map(OwnedFd::from)
                    .map_err(|error| CgroupError::Open { path, error })
            })
            .collect()
    }

    /// Moves a process into every directory.
    fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        for dir in self.paths() {
            write_file(&dir.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Every process in any directory or descendant, sorted, without duplicates.
    fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        let mut pids = BTreeSet::new();
        for dir in self.paths() {
            collect_pids(&dir, &mut pids)?;
        }
        Ok(pids.into_iter().collect())
    }

    /// Kills every process in the cgroup and its descendants, including ones that left the
    /// process group with `setsid` or double-forked: membership in the cgroup is what counts.
    /// Each round freezes (so nothing can fork between listing and killing), SIGKILLs every
    /// pid, thaws (SIGKILL takes effect once a task runs again), and repeats until the cgroup
    /// is empty or [`KILL_TIMEOUT`] passes.
    fn kill_all(&self) -> Result<(), CgroupError> {
        let start = Instant::now();
        let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        let mut pause = Duration::from_millis(1);
        let main = self.paths().into_iter().next().unwrap_or_default();
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            // Freezing ourselves would hang this very thread.
            if pids.contains(&me) {
                return Err(CgroupError::ContainsSelf {
                    path: main,
                    pid: me,
                });
            }
            if start.elapsed() >= KILL_TIMEOUT {
                return Err(CgroupError::NotEmpty {
                    path: main,
                    pids,
                    waited: start.elapsed(),
                });
            }
            if !self.kill_native()? {
                let frozen = self.freeze();
                // List again once frozen: a fork between the first listing and the freeze
                // would otherwise survive this round.
                let killed = match &frozen {
                    Ok(_) => self.pids().and_then(|pids| kill_pids(&pids, &main)),
                    Err(_) => Ok(()),
                };
                let thawed = self.thaw();
                CgroupError::from_errors(
                    [frozen.map(|_| ()), killed, thawed]
                        .into_iter()
                        .filter_map(Result::err)
                        .collect(),
                )?;
            }
            sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Removes every directory, leaves first, trying all of them.
    fn remove_all(&self) -> Vec<CgroupError> {
        self.paths()
            .iter()
            .flat_map(|dir| rmdir_tree(dir))
            .collect()
    }
}

/// SIGKILLs each pid; one that is already gone is not an error.
fn kill_pids(pids: &[i32], cgroup: &Path) -> Result<(), CgroupError> {
    let mut errors = Vec::new();
    for &pid in pids {
        match kill(Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(errno) => errors.push(CgroupError::Kill {
                pid,
                path: cgroup.to_path_buf(),
                errno,
            }),
        }
    }
    CgroupError::from_errors(errors)
}

/// A cgroup of either version.
#[derive(Debug, Clone)]
enum AnyCgroup {
    V1(v1::V1Cgroup),
    V2(v2::V2Cgroup),
}

impl AnyCgroup {
    fn backend(&self) -> &dyn CgroupBackend {
        match self {
            AnyCgroup::V1(cgroup) => cgroup,
            AnyCgroup::V2(cgroup) => cgroup,
        }
    }
}

/// Where each hierarchy is and where stagehand sits in it; the factory for [`Cgroup`]s.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    root: PathBuf,
    inner: AnyHierarchy,
}

#[derive(Debug, Clone)]
enum AnyHierarchy {
    V1(v1::V1Hierarchy),
    V2(v2::V2Hierarchy),
}

/// Detects the cgroup layout under `root` (normally [`DEFAULT_ROOT`]) from this process's
/// `/proc/self/cgroup` and `/proc/self/mountinfo`.
pub fn detect(root: &Path) -> Result<Hierarchy, CgroupError> {
    let proc_cgroup = read_file(Path::new("/proc/self/cgroup"))?;
    let mountinfo = read_file(Path::new("/proc/self/mountinfo"))?;
    detect_with(root, &proc_cgroup, &mountinfo)
}

/// [`detect`] on given texts: `proc_self_cgroup` in the format of `/proc/self/cgroup`, and
/// `mounts` in the format of `/proc/self/mountinfo` or `/proc/mounts`. Only mounts at or
/// below `root` count. Reads nothing from disk.
///
/// cgroup2 mounted at `root` itself means [`Version::V2`]. Otherwise the v1 hierarchies below
/// `root` that carry memory, cpu, cpuacct, pids or freezer are used ([`Version::V1`]); a
/// cgroup2 mount beside them (hybrid, usually `root/unified`) is ignored.
pub fn detect_with(
    root: &Path,
    proc_self_cgroup: &str,
    mounts: &str,
) -> Result<Hierarchy, CgroupError> {
    let own = parse_proc_cgroup(proc_self_cgroup);
    let mounts: Vec<CgroupMount> = parse_mounts(mounts)
        .into_iter()
        .filter(|m| m.mount_point.starts_with(root))
        .collect();
    let inner = if let Some(unified) = mounts.iter().find(|m| m.unified && m.mount_point == root) {
        AnyHierarchy::V2(v2::V2Hierarchy::new(unified, &own)?)
    } else {
        match v1::V1Hierarchy::new(&mounts, &own)? {
            Some(v1) => AnyHierarchy::V1(v1),
            None => {
                return Err(CgroupError::NotMounted {
                    root: root.to_path_buf(),
                });
            }
        }
    };
    Ok(Hierarchy {
        root: root.to_path_buf(),
        inner,
    })
}

impl Hierarchy {
    /// v1 (including hybrid) or v2.
    pub fn version(&self) -> Version {
        match self.inner {
            AnyHierarchy::V1(_) => Version::V1,
            AnyHierarchy::V2(_) => Version::V2,
        }
    }

    /// The cgroup root this was detected under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// stagehand's own cgroup directory in every hierarchy used; created cgroups go below
    /// these.
    pub fn bases(&self) -> Vec<PathBuf> {
        match &self.inner {
            AnyHierarchy::V1(h) => h.bases(),
            AnyHierarchy::V2(h) => vec![h.base().to_path_buf()],
        }
    }

    /// Creates `rel` (e.g. `stagehand/<run>/<step>`) below stagehand's own cgroup in every
    /// hierarchy used (`mkdir -p`; existing directories are reused) and writes the limits
    /// that are set to the last component. If a step fails, the directories this call made
    /// are removed again.
    pub fn create(&self, rel: &Path, limits: &Limits) -> Result<Cgroup, CgroupError> {
        validate_rel(rel)?;
        let inner = match &self.inner {
            AnyHierarchy::V1(h) => AnyCgroup::V1(h.create(rel, limits)?),
            AnyHierarchy::V2(h) => AnyCgroup::V2(h.create(rel, limits)?),
        };
        Ok(Cgroup {
            inner,
            memory_limit: limits.memory_bytes,
        })
    }

    /// The [`Cgroup`] at `rel` without creating or changing anything, e.g. to tear down a
    /// run recorded earlier. The memory limit is read back from the kernel (best effort).
    pub fn open(&self, rel: &Path) -> Result<Cgroup, CgroupError> {
        validate_rel(rel)?;
        let inner = match &self.inner {
            AnyHierarchy::V1(h) => AnyCgroup::V1(h.open(rel)),
            AnyHierarchy::V2(h) => AnyCgroup::V2(h.open(rel)),
        };
        let memory_limit = inner.backend().read_memory_limit().ok().flatten();
        Ok(Cgroup {
            inner,
            memory_limit,
        })
    }
}

/// One cgroup (a run or a step), with its directory in every hierarchy used.
#[derive(Debug, Clone)]
pub struct Cgroup {
    inner: AnyCgroup,
    memory_limit: Option<u64>,
}

impl Cgroup {
    /// Every directory of this cgroup (one on v2, one per hierarchy on v1), for the run's
    /// state file and for garbage collection.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.inner.backend().paths()
    }

    /// `cgroup.procs` of every directory, opened `O_WRONLY | O_CLOEXEC`, for a child to write
    /// itself into between fork and exec. Writing `0` means "the writing process"
    /// (cgroup-v2.rst, cgroups.txt), so the child needs no formatting; write it to every fd.
    pub fn procs_files(&self) -> Result<Vec<OwnedFd>, CgroupError> {
        self.inner.backend().procs_files()
    }

    /// Moves process `pid` (all its threads) into this cgroup in every hierarchy.
    pub fn add_pid(&self, pid: i32) -> Result<(), CgroupError> {
        self.inner.backend().add_pid(pid)
    }

    /// Every process in this cgroup or a descendant, in any hierarchy; sorted.
    pub fn pids(&self) -> Result<Vec<i32>, CgroupError> {
        self.inner.backend().pids()
    }

    /// Kills every process in this cgroup and its descendants and waits (up to 5 s) until
    /// none is left. v2: `cgroup.kill` where the kernel has it, else freeze, SIGKILL, thaw.
    /// v1: freeze (`freezer.state` FROZEN), SIGKILL every pid, thaw, repeat. Catches
    /// processes that escaped the process group. Does not reap: killed children of ours stay
    /// zombies until the reaper collects them (they are no longer in the cgroup then).
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        self.inner.backend().kill_all()
    }

    /// Removes this cgroup and its descendants in every hierarchy, leaves first, retrying
    /// briefly on EBUSY. Already gone is fine. Does not remove ancestors (`stagehand/<run>`
    /// for a step): other steps or runs may still use them. Tries every directory and
    /// reports all failures.
    pub fn remove(&self) -> Result<(), CgroupError> {
        CgroupError::from_errors(self.inner.backend().remove_all())
    }

    /// Whether the kernel OOM-killed a process here or in a descendant: v2 `memory.events`
    /// `oom_kill`, v1 `memory.oom_control` `oom_kill` (kernel 4.13+), or `under_oom` on older
    /// v1 kernels. `false` without a memory controller.
    pub fn oom_killed(&self) -> Result<bool, CgroupError> {
        self.inner.backend().oom_killed()
    }

    /// The memory limit given at creation (or read back by [`Hierarchy::open`]).
    pub fn memory_limit(&self) -> Option<u64> {
        self.memory_limit
    }

    /// CPU time, memory use and throttling of this cgroup and its descendants.
    pub fn stats(&self) -> Result<Stats, CgroupError> {
        self.inner.backend().stats()
    }
}

/// Garbage collection: in every hierarchy, kills every process under `rel` and removes the
/// cgroups bottom-up. Tries everything and returns every error; an empty list means `rel` is
/// gone everywhere.
pub fn remove_tree(h: &Hierarchy, rel: &Path) -> Vec<CgroupError> {
    let cgroup = match h.open(rel) {
        Ok(cgroup) => cgroup,
        Err(error) => return vec![error],
    };
    let mut errors = Vec::new();
    if let Err(error) = cgroup.kill_all() {
        errors.push(error);
    }
    errors.extend(cgroup.inner.backend().remove_all());
    errors
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::process::{self, DEFAULT_PATH, OutputTarget, SpawnSpec, Stdin};
    use std::io::{BufRead, BufReader, PipeWriter};

    /// `/proc/self/cgroup` of this host (hybrid: memory nested, everything else at `/`).
    pub(crate) const HYBRID_PROC_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n\
        6:freezer:/\n5:devices:/\n4:memory:/process_api/986eee41be941afae8e43af92bdc28e0\n\
        3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";

    /// `/proc/self/mountinfo` of this host, trimmed to a few non-cgroup lines and every cgroup
    /// mount. Tests substitute `/sys/fs/cgroup` with a tempdir.
    pub(crate) const HYBRID_MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
23 27 0:22 / /sys rw,relatime - sysfs sysfs rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// A tempdir and the fake cgroup root inside it.
    pub(crate) fn fake_tree_root() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cgroup");
        fs::create_dir(&root).unwrap();
        (tmp, root)
    }

    /// Stands in for a control file the kernel would provide.
    pub(crate) fn fake_file(path: &Path, content: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, content).unwrap();
    }

    fn fake_hybrid(root: &Path) -> Hierarchy {
        let mountinfo = HYBRID_MOUNTINFO.replace("/sys/fs/cgroup", root.to_str().unwrap());
        detect_with(root, HYBRID_PROC_CGROUP, &mountinfo).unwrap()
    }

    #[test]
    fn parses_this_hosts_hybrid_proc_cgroup() {
        let lines = parse_proc_cgroup(HYBRID_PROC_CGROUP);
        assert_eq!(lines.len(), 10);
        assert_eq!(
            lines[5],
            ProcCgroup {
                id: 4,
                controllers: vec!["memory".into()],
                path: "/process_api/986eee41be941afae8e43af92bdc28e0".into(),
            }
        );
        assert_eq!(lines[0].controllers, vec!["name=systemd".to_owned()]);
        assert_eq!(
            lines[9],
            ProcCgroup {
                id: 0,
                controllers: vec![],
                path: "/".into(),
            }
        );
    }

    #[test]
    fn parses_pure_v2_and_comounted_lines_and_keeps_colons_in_paths() {
        let lines = parse_proc_cgroup(
            "0::/user.slice/user-1000.slice/session-2.scope\n\
             3:cpu,cpuacct:/a:b\n\
             garbage\n",
        );
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].path, "/user.slice/user-1000.slice/session-2.scope");
        assert!(lines[0].controllers.is_empty());
        assert_eq!(
            lines[1].controllers,
            vec!["cpu".to_owned(), "cpuacct".to_owned()]
        );
        assert_eq!(lines[1].path, "/a:b");
    }

    #[test]
    fn parses_cgroup_mounts_from_mountinfo_and_proc_mounts() {
        let mounts = parse_mounts(HYBRID_MOUNTINFO);
        assert_eq!(mounts.len(), 10, "{mounts:?}");
        assert_eq!(mounts[0].mount_point, PathBuf::from("/sys/fs/cgroup/cpu"));
        assert_eq!(mounts[0].options, vec!["rw".to_owned(), "cpu".to_owned()]);
        assert!(!mounts[0].unified);
        assert!(mounts[9].unified);

        let proc_mounts = "cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,nosuid,cpu,cpuacct 0 0\n\
                           cgroup2 /sys/fs/cgroup/my\\040dir cgroup2 rw 0 0\n\
                           proc /proc proc rw 0 0\n";
        let mounts = parse_mounts(proc_mounts);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].root, "/");
        assert!(mounts[0].options.contains(&"cpuacct".to_owned()));
        assert_eq!(
            mounts[1].mount_point,
            PathBuf::from("/sys/fs/cgroup/my dir")
        );
    }

    #[test]
    fn own_dir_strips_the_mount_root_of_a_bind_mounted_hierarchy() {
        let mount = CgroupMount {
            mount_point: PathBuf::from("/sys/fs/cgroup/memory"),
            root: "/docker/abc".into(),
            unified: false,
            options: vec!["memory".into()],
        };
        assert_eq!(
            own_dir(&mount, "/docker/abc/sub"),
            PathBuf::from("/sys/fs/cgroup/memory/sub")
        );
        assert_eq!(
            own_dir(&mount, "/docker/abc"),
            PathBuf::from("/sys/fs/cgroup/memory")
        );
        // Outside the mount's view (e.g. "/docker/abcdef", or another namespace's "/../x").
        assert_eq!(
            own_dir(&mount, "/docker/abcdef"),
            PathBuf::from("/sys/fs/cgroup/memory")
        );
        let plain = CgroupMount {
            root: "/".into(),
            ..mount
        };
        assert_eq!(
            own_dir(&plain, "/../x"),
            PathBuf::from("/sys/fs/cgroup/memory")
        );
        assert_eq!(
            own_dir(&plain, "/a/b"),
            PathBuf::from("/sys/fs/cgroup/memory/a/b")
        );
    }

    #[test]
    fn detection_needs_a_mount_under_the_root_and_our_own_line() {
        let (_tmp, root) = fake_tree_root();
        // The host's mounts are not under the fake root.
        let error = detect_with(&root, HYBRID_PROC_CGROUP, HYBRID_MOUNTINFO).unwrap_err();
        assert!(matches!(error, CgroupError::NotMounted { .. }), "{error:?}");
        let mountinfo = HYBRID_MOUNTINFO.replace("/sys/fs/cgroup", root.to_str().unwrap());
        let error = detect_with(&root, "0::/\n", &mountinfo).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("/proc/self/cgroup has no line for the cpu hierarchy"),
            "{error}"
        );
        // cgroup2 only at root/unified, no v1 controllers: hybrid without controllers is not
        // usable, and a cgroup2 below the root is not the unified hierarchy.
        let only_unified = format!(
            "41 31 0:38 / {}/unified rw - cgroup2 cgroup2 rw\n",
            root.display()
        );
        assert!(matches!(
            detect_with(&root, "0::/\n", &only_unified),
            Err(CgroupError::NotMounted { .. })
        ));
    }

    #[test]
    fn relative_paths_must_stay_below_the_base() {
        let (_tmp, root) = fake_tree_root();
        let h = fake_hybrid(&root);
        for bad in ["", "/stagehand/r", "../x", "stagehand/../../x", "./x"] {
            let error = h.create(Path::new(bad), &Limits::default()).unwrap_err();
            assert!(
                matches!(error, CgroupError::InvalidPath { .. }),
                "{bad}: {error:?}"
            );
            assert!(h.open(Path::new(bad)).is_err(), "{bad}");
            assert_eq!(remove_tree(&h, Path::new(bad)).len(), 1, "{bad}");
        }
    }

    #[test]
    fn errors_read_like_the_kernel_said_them() {
        let error = CgroupError::Write {
            path: PathBuf::from("/sys/fs/cgroup/memory/process_api/x/memory.limit_in_bytes"),
            error: io::Error::from_raw_os_error(libc::EACCES),
        };
        assert_eq!(
            error.to_string(),
            "cannot write memory.limit_in_bytes in /sys/fs/cgroup/memory/process_api/x: Permission denied"
        );
        let several = CgroupError::from_errors(vec![
            CgroupError::Remove {
                path: PathBuf::from("/a"),
                error: io::Error::from_raw_os_error(libc::EBUSY),
            },
            CgroupError::Remove {
                path: PathBuf::from("/b"),
                error: io::Error::from_raw_os_error(libc::ENOTEMPTY),
            },
        ])
        .unwrap_err();
        assert_eq!(
            several.to_string(),
            "cannot remove cgroup /a: Device or resource busy\ncannot remove cgroup /b: Directory not empty"
        );
    }

    #[test]
    fn cpu_quota_is_millis_times_100_and_never_below_1ms() {
        assert_eq!(cpu_quota_us(200), 20_000);
        assert_eq!(cpu_quota_us(2000), 200_000);
        assert_eq!(cpu_quota_us(1), 1_000);
        assert_eq!(cpu_quota_us(u64::MAX), u64::MAX / 1000);
    }

    #[test]
    fn pids_are_the_union_over_hierarchies_and_descendants() {
        let (_tmp, root) = fake_tree_root();
        let h = fake_hybrid(&root);
        let rel = Path::new("stagehand/r");
        let bases = h.bases();
        fake_file(&bases[0].join(rel).join("cgroup.procs"), "10\n11\n");
        fake_file(&bases[0].join(rel).join("s1/cgroup.procs"), "12\n");
        fake_file(&bases[2].join(rel).join("cgroup.procs"), "11\n10\n");
        fake_file(&bases[2].join(rel).join("s1/deeper/cgroup.procs"), "13\n");
        let cg = h.open(rel).unwrap();
        assert_eq!(cg.pids().unwrap(), vec![10, 11, 12, 13]);
        // A cgroup that is gone holds nothing.
        assert_eq!(
            h.open(Path::new("gone")).unwrap().pids().unwrap(),
            Vec::<i32>::new()
        );
    }

    #[test]
    fn add_pid_and_procs_files_reach_every_hierarchy() {
        let (_tmp, root) = fake_tree_root();
        let h = fake_hybrid(&root);
        let rel = Path::new("stagehand/r/s");
        for base in h.bases() {
            fake_file(&base.join(rel).join("cgroup.procs"), "");
        }
        let cg = h.create(rel, &Limits::default()).unwrap();
        cg.add_pid(4242).unwrap();
        for dir in cg.paths() {
            assert_eq!(
                fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
                "4242"
            );
        }
        let fds = cg.procs_files().unwrap();
        assert_eq!(fds.len(), cg.paths().len());
        for fd in fds {
            fs::File::from(fd).write_all(b"0").unwrap();
        }
        for dir in cg.paths() {
            assert_eq!(fs::read_to_string(dir.join("cgroup.procs")).unwrap(), "0");
        }
    }

    #[test]
    fn remove_goes_leaves_first_keeps_ancestors_and_tolerates_gone() {
        let (_tmp, root) = fake_tree_root();
        let h = fake_hybrid(&root);
        let run = Path::new("stagehand/run");
        for base in h.bases() {
            // Empty directories: rmdir on a fake tree fails on files the kernel would hide.
            fs::create_dir_all(base.join(run).join("step/nested/deeper")).unwrap();
            fs::create_dir_all(base.join(run).join("other")).unwrap();
        }
        let step = h.open(&run.join("step")).unwrap();
        step.remove().unwrap();
        for base in h.bases() {
            assert!(!base.join(run).join("step").exists());
            assert!(base.join(run).join("other").exists());
        }
        step.remove().unwrap();
        assert!(remove_tree(&h, run).is_empty());
        for base in h.bases() {
            assert!(!base.join(run).exists(), "{}", base.display());
            assert!(base.join("stagehand").exists());
        }
    }

    #[test]
    fn remove_tries_every_hierarchy_and_reports_every_failure() {
        let (_tmp, root) = fake_tree_root();
        let h = fake_hybrid(&root);
        let rel = Path::new("stagehand/run");
        let bases = h.bases();
        for base in &bases {
            fs::create_dir_all(base.join(rel)).unwrap();
        }
        // Two hierarchies whose directory cannot be removed (not empty).
        fake_file(&bases[1].join(rel).join("stray"), "");
        fake_file(&bases[3].join(rel).join("stray"), "");
        let errors = remove_tree(&h, rel);
        assert_eq!(errors.len(), 2, "{errors:?}");
        for (i, base) in bases.iter().enumerate() {
            assert_eq!(
                base.join(rel).exists(),
                i == 1 || i == 3,
                "{}",
                base.display()
            );
        }
        let error = h.open(rel).unwrap().remove().unwrap_err();
        assert!(matches!(error, CgroupError::Several { ref errors } if errors.len() == 2));
    }

    #[test]
    fn kill_all_refuses_a_cgroup_holding_stagehand_itself() {
        let (_tmp, root) = fake_tree_root();
        let h = fake_hybrid(&root);
        let rel = Path::new("stagehand/r");
        for base in h.bases() {
            fake_file(&base.join(rel).join("cgroup.procs"), "");
        }
        fake_file(&root.join("freezer/stagehand/r/freezer.state"), "THAWED\n");
        fake_file(
            &root.join("pids/stagehand/r/cgroup.procs"),
            &format!("{}\n", std::process::id()),
        );
        let error = h.open(rel).unwrap().kill_all().unwrap_err();
        assert!(
            matches!(error, CgroupError::ContainsSelf { .. }),
            "{error:?}"
        );
        // Never frozen: freezing ourselves would hang.
        assert_eq!(
            fs::read_to_string(root.join("freezer/stagehand/r/freezer.state")).unwrap(),
            "THAWED\n"
        );
    }

    // ---- Real cgroups on this host (root). They fail, not skip, without root. ----
    //
    // Children are started through `crate::process`: the global reaper waits on every child
    // of this test binary (waitpid(-1) as a subreaper), so std's `Child::wait` would race it.
    // A grandchild's exit status comes from a shell that waits for it and prints `$?`, and
    // deaths are checked through /proc (a killed child stays a zombie until it is reaped).

    /// Removes a test tree however the test ends.
    struct TreeGuard {
        h: Hierarchy,
        rel: PathBuf,
    }

    impl Drop for TreeGuard {
        fn drop(&mut self) {
            for error in remove_tree(&self.h, &self.rel) {
                eprintln!("cleanup of {}: {error}", self.rel.display());
            }
        }
    }

    /// A child started through the process layer, killed and waited for however the test
    /// ends. `process::Child` never signals a pid once the reaper collected it, so a reused
    /// pid is safe; std's `Child::wait` would race the reaper for the status.
    struct ChildGuard {
        child: process::Child,
        stdin: Option<PipeWriter>,
        stdout: Option<BufReader<fs::File>>,
    }

    impl Drop for ChildGuard {
        fn drop(&mut self) {
            let _ = self.child.signal(libc::SIGKILL);
            self.child.wait_blocking();
        }
    }

    fn host(tag: &str) -> (Hierarchy, TreeGuard, PathBuf) {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the host cgroup tests need root (they create cgroups under {DEFAULT_ROOT})"
        );
        let h = detect(Path::new(DEFAULT_ROOT)).unwrap();
        let rel = PathBuf::from(format!("stagehand-test-{}-{tag}", std::process::id()));
        let guard = TreeGuard {
            h: h.clone(),
            rel: rel.clone(),
        };
        (h, guard, rel)
    }

    /// Starts `sh -c script` with stdin and stdout piped: the script waits (`read x`) until
    /// it has been moved into its cgroup, and reports on stdout.
    fn spawn_gated(script: &str) -> ChildGuard {
        let (gate, stdin) = std::io::pipe().unwrap();
        let mut spec = SpawnSpec::new(["sh", "-c", script], [("PATH", DEFAULT_PATH)], "/");
        spec.stdin = Stdin::Fd(gate.into());
        let mut child = process::spawn(spec).unwrap();
        let stdout = child
            .take_stdout()
            .map(|fd| BufReader::new(fs::File::from(fd)));
        ChildGuard {
            child,
            stdin: Some(stdin),
            stdout,
        }
    }

    /// Lets a gated script run.
    fn open_gate(child: &mut ChildGuard) {
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    }

    /// The next line the script prints.
    fn read_line(child: &mut ChildGuard) -> String {
        let mut line = String::new();
        child.stdout.as_mut().unwrap().read_line(&mut line).unwrap();
        line.trim().to_owned()
    }

    fn sleeper() -> ChildGuard {
        let mut spec = SpawnSpec::new(["sleep", "30"], [("PATH", DEFAULT_PATH)], "/");
        spec.output = OutputTarget::Null;
        ChildGuard {
            child: process::spawn(spec).unwrap(),
            stdin: None,
            stdout: None,
        }
    }

    fn pid_of(child: &ChildGuard) -> i32 {
        child.child.pid()
    }

    /// Fields after the command name in `/proc/<pid>/stat`: state, ppid, pgrp, session, ...
    fn stat_fields(pid: i32) -> Option<Vec<String>> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        Some(rest.split_whitespace().map(str::to_owned).collect())
    }

    /// `true` once a process is gone or a zombie (killed but not yet reaped).
    fn dead(pid: i32) -> bool {
        stat_fields(pid).is_none_or(|f| f[0] == "Z")
    }

    /// Every cgroup directory named `prefix*` anywhere under the real cgroup root.
    fn leftovers(prefix: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![PathBuf::from(DEFAULT_ROOT)];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                if entry.file_name().to_string_lossy().starts_with(prefix) {
                    found.push(entry.path());
                }
                stack.push(entry.path());
            }
        }
        found
    }

    #[test]
    fn host_processes_land_in_every_hierarchy_and_remove_leaves_nothing() {
        let (h, _guard, parent) = host("place");
        let step_rel = parent.join("step");
        let run = h.create(&parent, &Limits::default()).unwrap();
        let limits = Limits {
            memory_bytes: Some(64 << 20),
            cpu_millis: Some(500),
            pids: Some(50),
        };
        let step = h.create(&step_rel, &limits).unwrap();
        assert_eq!(h.open(&step_rel).unwrap().memory_limit(), Some(64 << 20));

        let first = sleeper();
        step.add_pid(pid_of(&first)).unwrap();
        let proc_cgroup = fs::read_to_string(format!("/proc/{}/cgroup", pid_of(&first))).unwrap();
        let lines = parse_proc_cgroup(&proc_cgroup);
        let in_step = |l: &ProcCgroup| l.path.ends_with(&format!("/{}", step_rel.display()));
        match h.version() {
            Version::V1 => {
                for controller in ["memory", "cpu", "cpuacct", "pids", "freezer"] {
                    let line = lines
                        .iter()
                        .find(|l| l.controllers.iter().any(|c| c == controller))
                        .unwrap_or_else(|| panic!("no {controller} line in {proc_cgroup}"));
                    assert!(in_step(line), "{controller}: {proc_cgroup}");
                }
                // Nested below our own cgroup, e.g. memory:/process_api/<id>/... here.
                let own = parse_proc_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap());
                for (mine, its) in own.iter().zip(&lines) {
                    if its.controllers.iter().any(|c| c == "memory" || c == "cpu") {
                        let expected =
                            format!("{}/{}", mine.path.trim_end_matches('/'), step_rel.display());
                        assert_eq!(its.path, expected);
                    }
                }
            }
            Version::V2 => {
                let line = lines.iter().find(|l| l.id == 0).unwrap();
                assert!(in_step(line), "{proc_cgroup}");
            }
        }

        // A second child placed through the procs files, as a pre_exec hook would.
        let second = sleeper();
        for fd in step.procs_files().unwrap() {
            fs::File::from(fd)
                .write_all(pid_of(&second).to_string().as_bytes())
                .unwrap();
        }
        let mut both = vec![pid_of(&first), pid_of(&second)];
        both.sort();
        assert_eq!(step.pids().unwrap(), both);
        assert_eq!(
            run.pids().unwrap(),
            both,
            "pids() must look into child cgroups"
        );

        run.kill_all().unwrap();
        assert!(dead(pid_of(&first)) && dead(pid_of(&second)));
        assert_eq!(run.pids().unwrap(), Vec::<i32>::new());
        step.remove().unwrap();
        run.remove().unwrap();
        let prefix = parent.to_string_lossy().into_owned();
        assert_eq!(leftovers(&prefix), Vec::<PathBuf>::new());
    }

    #[test]
    fn host_allocating_past_the_memory_limit_is_oom_killed() {
        let (h, _guard, parent) = host("oom");
        h.create(&parent, &Limits::default()).unwrap();
        let limits = Limits {
            memory_bytes: Some(32 << 20),
            ..Limits::default()
        };
        let step = h.create(&parent.join("dd"), &limits).unwrap();
        let mut child =
            spawn_gated("read x; dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; echo $?");
        step.add_pid(pid_of(&child)).unwrap();
        assert!(!step.oom_killed().unwrap());
        open_gate(&mut child);
        // The shell survives (dd is the big one) and reports 128+SIGKILL.
        assert_eq!(read_line(&mut child), (128 + libc::SIGKILL).to_string());
        assert!(step.oom_killed().unwrap());
        let stats = step.stats().unwrap();
        assert!(
            stats.memory_peak_bytes.is_some_and(|p| p <= 32 << 20),
            "{stats:?}"
        );
    }

    #[test]
    fn host_cpu_quota_holds_a_busy_loop_to_its_share() {
        let (h, _guard, parent) = host("cpu");
        h.create(&parent, &Limits::default()).unwrap();
        let limits = Limits {
            cpu_millis: Some(200),
            ..Limits::default()
        };
        let step = h.create(&parent.join("burn"), &limits).unwrap();
        let mut child = spawn_gated("read x; while :; do :; done");
        step.add_pid(pid_of(&child)).unwrap();
        open_gate(&mut child);
        let before = step.stats().unwrap();
        let start = Instant::now();
        sleep(Duration::from_secs(2));
        let after = step.stats().unwrap();
        let wall = start.elapsed().as_secs_f64();
        let used = (after.cpu_usage_ns.unwrap() - before.cpu_usage_ns.unwrap()) as f64 / 1e9;
        assert!(used / wall <= 0.3, "used {used:.3}s of CPU in {wall:.3}s");
        assert!(used > 0.05, "the busy loop did not run: {used:.3}s");
        assert!(after.nr_throttled.unwrap() > 0, "{after:?}");
        step.kill_all().unwrap();
        assert!(dead(pid_of(&child)));
    }

    #[test]
    fn host_kill_all_catches_a_setsid_escapee() {
        let (h, _guard, parent) = host("kill");
        let run = h.create(&parent, &Limits::default()).unwrap();
        let step = h
            .create(&parent.join("escape"), &Limits::default())
            .unwrap();
        let mut child =
            spawn_gated("read x; setsid sleep 300 </dev/null >/dev/null 2>&1 & echo $!");
        step.add_pid(pid_of(&child)).unwrap();
        open_gate(&mut child);
        let escapee: i32 = read_line(&mut child).parse().unwrap();
        // setsid runs in the background child and then execs sleep: wait until the escapee
        // leads its own session, i.e. has left our process group and session.
        let deadline = Instant::now() + Duration::from_secs(2);
        while stat_fields(escapee).unwrap()[3] != escapee.to_string() {
            assert!(Instant::now() < deadline, "{escapee} never called setsid");
            sleep(Duration::from_millis(5));
        }
        assert!(run.pids().unwrap().contains(&escapee));

        run.kill_all().unwrap();
        assert!(dead(escapee), "{escapee} survived kill_all");
        assert_eq!(run.pids().unwrap(), Vec::<i32>::new());
        run.remove().unwrap();
        let prefix = parent.to_string_lossy().into_owned();
        assert_eq!(leftovers(&prefix), Vec::<PathBuf>::new());
    }
}
