//! The OCI runtime spec (`config.json`) of one container, built with oci-spec's builders.
//!
//! Owns: the security defaults (Docker's default capability set, runc's masked and read-only
//! paths, `noNewPrivileges`, a deny-all device cgroup), the standard mounts, the injected init,
//! the resource limits, the user lookup in the image's `/etc/passwd` and `/etc/group`, and
//! the image-config rules for entrypoint/cmd/env.
//! Does not own: which netns, cgroup path, hostname, mounts or limits a step gets (the
//! caller passes them in [`ContainerSpec`]), nor the runtime invocation ([`crate::runtime`]).
//!
//! oci-spec's builders fill every field left unset with the struct's `Default`, which is a
//! demo container (`sh`, three capabilities in all five sets including ambient, NOFILE 1024,
//! hostname `youki`). Everything that matters is therefore set here explicitly, and the unit
//! tests compare the whole JSON.
//!
//! Host facts the spec depends on come in a [`Host`] ([`Host::probe`] reads them), so the
//! builder is a pure function: capabilities are limited to our own bounding set (this host
//! lacks CAP_SYS_RESOURCE, and asking runc for a capability we do not have fails the
//! container), and RLIMIT_NOFILE is capped at our own hard limit (runtime-lab gotcha 2).

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::OciSpecError;
use oci_spec::image::ImageConfiguration;
use oci_spec::runtime::{
    Capabilities, Capability, LinuxBuilder, LinuxCapabilitiesBuilder, LinuxCpuBuilder, LinuxDevice,
    LinuxDeviceBuilder, LinuxDeviceCgroupBuilder, LinuxDeviceType, LinuxMemoryBuilder,
    LinuxNamespaceBuilder, LinuxNamespaceType, LinuxPidsBuilder, LinuxResourcesBuilder, Mount,
    MountBuilder, PosixRlimitBuilder, PosixRlimitType, ProcessBuilder, RootBuilder, Spec,
    SpecBuilder, UserBuilder,
};

use crate::fsutil;

/// The OCI runtime spec version written (what runc 1.1 implements).
pub const OCI_VERSION: &str = "1.0.2";
/// Where the injected init is mounted inside the container (as Docker's `--init` does).
pub const INIT_PATH: &str = "/dev/init";
/// `PATH` when neither the image nor the caller sets one (Docker's default).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The NOFILE limit asked for when the host allows it (containerd's default).
const NOFILE_WANTED: u64 = 1 << 20;

/// Errors of building and writing specs.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// An oci-spec builder refused a value.
    #[error("cannot build the runtime spec ({what}): {source}")]
    Build {
        /// The part being built.
        what: &'static str,
        /// The cause.
        #[source]
        source: OciSpecError,
    },
    /// A user or group name is not in the image.
    #[error("user {user:?}: {reason} in the image root filesystem {rootfs}")]
    User {
        /// The user spec as given (`name`, `uid`, `name:group`).
        user: String,
        /// The root filesystem searched.
        rootfs: PathBuf,
        /// What is missing.
        reason: String,
    },
    /// Reading a file of the image or the host failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing `config.json` failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn build_err(what: &'static str) -> impl FnOnce(OciSpecError) -> SpecError {
    move |source| SpecError::Build { what, source }
}

/// The network namespace of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// A new, empty one (only `lo`, down).
    New,
    /// Join an existing one by path (the stage netns, `/run/netns/...` or `/proc/PID/ns/net`).
    Join(PathBuf),
    /// The host's (no network namespace entry at all).
    Host,
}

/// A bind mount from the host into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Host path (file or directory).
    pub source: PathBuf,
    /// Absolute path inside the container.
    pub destination: String,
    /// Mounted read-only.
    pub readonly: bool,
}

impl BindMount {
    /// A read-write bind mount.
    pub fn rw(source: impl Into<PathBuf>, destination: impl Into<String>) -> BindMount {
        BindMount {
            source: source.into(),
            destination: destination.into(),
            readonly: false,
        }
    }

    /// A read-only bind mount.
    pub fn ro(source: impl Into<PathBuf>, destination: impl Into<String>) -> BindMount {
        BindMount {
            readonly: true,
            ..BindMount::rw(source, destination)
        }
    }
}

/// cgroup limits. `None` is unlimited.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory: Option<i64>,
    /// Memory plus swap in bytes (OCI `swap`). When only `memory` is set, this defaults to
    /// `memory`: a container gets no swap beyond its limit, so an OOM is an OOM.
    pub memory_swap: Option<i64>,
    /// CPU quota in microseconds per `cpu_period` (`400m` = 40000 of 100000).
    pub cpu_quota: Option<i64>,
    /// CPU period in microseconds (100000 when a quota is set without one).
    pub cpu_period: Option<u64>,
    /// Maximum number of processes.
    pub pids: Option<i64>,
}

/// The identity the container process runs as.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Supplementary groups (OCI `additionalGids`; runc does not read `/etc/group`).
    pub additional_gids: Vec<u32>,
    /// Home directory from `/etc/passwd`, for `HOME` when the environment has none.
    pub home: Option<String>,
}

/// Everything the caller decides about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// The command (argv) to run; see [`image_process`].
    pub args: Vec<String>,
    /// Environment (`KEY=value`). `PATH`, `HOME` and `HOSTNAME` are added when missing.
    pub env: Vec<String>,
    /// Working directory inside the container.
    pub cwd: String,
    /// The process identity; see [`resolve_user`].
    pub user: ProcessUser,
    /// Hostname inside the container (new UTS namespace).
    pub hostname: String,
    /// Network namespace.
    pub network: Network,
    /// Bind mounts, applied after the standard ones, in order.
    pub mounts: Vec<BindMount>,
    /// `linux.cgroupsPath`. Always set it: without one runc nests under its caller's cgroup
    /// and crun uses an absolute path that escapes it (runtime-lab gotcha 7).
    pub cgroups_path: Option<String>,
    /// Limits.
    pub resources: Resources,
    /// All (of our) capabilities, no masked or read-only paths, every host device, `/sys`
    /// writable, `noNewPrivileges` off.
    pub privileged: bool,
    /// `noNewPrivileges` (ignored when privileged). Default true.
    pub no_new_privileges: bool,
    /// Host path of a static init (catatonit) to bind-mount at [`INIT_PATH`] and run as PID 1
    /// in front of `args`, so the container's main process gets SIGTERM (a bare PID 1 ignores
    /// signals it has no handler for, runtime-lab gotcha 4) and zombies are reaped.
    pub init: Option<PathBuf>,
    /// Root filesystem path, relative to the bundle or absolute. Default `rootfs`.
    pub root: PathBuf,
    /// Mount the root filesystem read-only.
    pub readonly_rootfs: bool,
}

impl ContainerSpec {
    /// A spec running `args` as root in `/`, hostname `stagehand`, a new network namespace,
    /// no limits, root filesystem `rootfs` (next to `config.json`).
    pub fn new(args: Vec<String>) -> ContainerSpec {
        ContainerSpec {
            args,
            env: Vec::new(),
            cwd: "/".into(),
            user: ProcessUser::default(),
            hostname: "stagehand".into(),
            network: Network::New,
            mounts: Vec::new(),
            cgroups_path: None,
            resources: Resources::default(),
            privileged: false,
            no_new_privileges: true,
            init: None,
            root: PathBuf::from("rootfs"),
            readonly_rootfs: false,
        }
    }
}

/// Facts about the host the spec must respect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    /// Our hard RLIMIT_NOFILE: a container may not ask for more.
    pub nofile_hard: u64,
    /// Our capability bounding set: a container may not ask for more.
    pub bounding: Capabilities,
    /// Host devices, given to privileged containers.
    pub devices: Vec<LinuxDevice>,
}

impl Host {
    /// Reads the hard NOFILE limit, the bounding set (`CapBnd` of `/proc/self/status`) and
    /// the devices under `/dev`.
    pub fn probe() -> Result<Host, SpecError> {
        let (_, nofile_hard) = nix::sys::resource::getrlimit(
            nix::sys::resource::Resource::RLIMIT_NOFILE,
        )
        .map_err(|e| SpecError::Read {
            path: PathBuf::from("getrlimit(RLIMIT_NOFILE)"),
            source: e.into(),
        })?;
        let status_path = Path::new("/proc/self/status");
        let status = fs::read_to_string(status_path).map_err(|source| SpecError::Read {
            path: status_path.to_path_buf(),
            source,
        })?;
        let bounding = status
            .lines()
            .find_map(|l| l.strip_prefix("CapBnd:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .map(caps_from_mask)
            .unwrap_or_else(|| CAPS.iter().map(|(_, c)| *c).collect());
        Ok(Host {
            nofile_hard,
            bounding,
            devices: host_devices(Path::new("/dev")),
        })
    }
}

/// Capability numbers (`linux/capability.h`) and their oci-spec names.
const CAPS: [(u8, Capability); 41] = {
    use Capability::*;
    [
        (0, Chown),
        (1, DacOverride),
        (2, DacReadSearch),
        (3, Fowner),
        (4, Fsetid),
        (5, Kill),
        (6, Setgid),
        (7, Setuid),
        (8, Setpcap),
        (9, LinuxImmutable),
        (10, NetBindService),
        (11, NetBroadcast),
        (12, NetAdmin),
        (13, NetRaw),
        (14, IpcLock),
        (15, IpcOwner),
        (16, SysModule),
        (17, SysRawio),
        (18, SysChroot),
        (19, SysPtrace),
        (20, SysPacct),
        (21, SysAdmin),
        (22, SysBoot),
        (23, SysNice),
        (24, SysResource),
        (25, SysTime),
        (26, SysTtyConfig),
        (27, Mknod),
        (28, Lease),
        (29, AuditWrite),
        (30, AuditControl),
        (31, Setfcap),
        (32, MacOverride),
        (33, MacAdmin),
        (34, Syslog),
        (35, WakeAlarm),
        (36, BlockSuspend),
        (37, AuditRead),
        (38, Perfmon),
        (39, Bpf),
        (40, CheckpointRestore),
    ]
};

/// Docker's default capability set (moby `oci/caps/defaults.go`).
pub const DEFAULT_CAPABILITIES: [Capability; 14] = [
    Capability::Chown,
    Capability::DacOverride,
    Capability::Fsetid,
    Capability::Fowner,
    Capability::Mknod,
    Capability::NetRaw,
    Capability::Setgid,
    Capability::Setuid,
    Capability::Setfcap,
    Capability::Setpcap,
    Capability::NetBindService,
    Capability::SysChroot,
    Capability::Kill,
    Capability::AuditWrite,
];

/// runc's default masked paths (`runc spec`), plus Docker's `/sys/devices/virtual/powercap`.
pub const MASKED_PATHS: [&str; 11] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// runc's default read-only paths (`runc spec`).
pub const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

fn caps_from_mask(mask: u64) -> Capabilities {
    CAPS.iter()
        .filter(|(bit, _)| mask & (1u64 << bit) != 0)
        .map(|(_, c)| *c)
        .collect()
}

/// Character and block devices under `dev` (one level of subdirectories, as `/dev/input`),
/// skipping the ones every container gets its own of (`pts`, `shm`, `mqueue`, `console`,
/// `ptmx`).
fn host_devices(dev: &Path) -> Vec<LinuxDevice> {
    let mut out = Vec::new();
    collect_devices(dev, 0, &mut out);
    out
}

fn collect_devices(dir: &Path, depth: u32, out: &mut Vec<LinuxDevice>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    for path in paths {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if depth == 0
            && matches!(
                name.as_str(),
                "pts" | "shm" | "mqueue" | "console" | "ptmx" | "fd"
            )
        {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let ft = meta.file_type();
        if ft.is_dir() {
            if depth == 0 {
                collect_devices(&path, depth + 1, out);
            }
            continue;
        }
        let typ = if ft.is_char_device() {
            LinuxDeviceType::C
        } else if ft.is_block_device() {
            LinuxDeviceType::B
        } else {
            continue;
        };
        let rdev = meta.rdev();
        if let Ok(device) = LinuxDeviceBuilder::default()
            .path(path.clone())
            .typ(typ)
            .major(i64::from(libc::major(rdev)))
            .minor(i64::from(libc::minor(rdev)))
            .file_mode(meta.mode() & 0o7777)
            .uid(meta.uid())
            .gid(meta.gid())
            .build()
        {
            out.push(device);
        }
    }
}

/// Builds the runtime spec.
pub fn build(c: &ContainerSpec, host: &Host) -> Result<Spec, SpecError> {
    let caps: Capabilities = if c.privileged {
        host.bounding.clone()
    } else {
        DEFAULT_CAPABILITIES
            .iter()
            .filter(|cap| host.bounding.contains(cap))
            .copied()
            .collect()
    };
    let capabilities = LinuxCapabilitiesBuilder::default()
        .bounding(caps.clone())
        .effective(caps.clone())
        .permitted(caps)
        .inheritable(HashSet::new())
        .ambient(HashSet::new())
        .build()
        .map_err(build_err("capabilities"))?;
    let nofile = NOFILE_WANTED.min(host.nofile_hard);
    let rlimits = vec![
        PosixRlimitBuilder::default()
            .typ(PosixRlimitType::RlimitNofile)
            .soft(nofile)
            .hard(nofile)
            .build()
            .map_err(build_err("rlimits"))?,
    ];
    let mut user = UserBuilder::default().uid(c.user.uid).gid(c.user.gid);
    if !c.user.additional_gids.is_empty() {
        user = user.additional_gids(c.user.additional_gids.clone());
    }
    let mut args = c.args.clone();
    if c.init.is_some() {
        args = [INIT_PATH.to_string(), "--".to_string()]
            .into_iter()
            .chain(args)
            .collect();
    }
    let process = ProcessBuilder::default()
        .terminal(false)
        .user(user.build().map_err(build_err("user"))?)
        .args(args)
        .env(full_env(c))
        .cwd(c.cwd.clone())
        .capabilities(capabilities)
        .rlimits(rlimits)
        .no_new_privileges(c.no_new_privileges && !c.privileged)
        .build()
        .map_err(build_err("process"))?;

    let ns = |typ| {
        LinuxNamespaceBuilder::default()
            .typ(typ)
            .build()
            .map_err(build_err("namespaces"))
    };
    let mut namespaces = vec![
        ns(LinuxNamespaceType::Pid)?,
        ns(LinuxNamespaceType::Mount)?,
        ns(LinuxNamespaceType::Ipc)?,
        ns(LinuxNamespaceType::Uts)?,
    ];
    match &c.network {
        Network::New => namespaces.push(ns(LinuxNamespaceType::Network)?),
        Network::Join(path) => namespaces.push(
            LinuxNamespaceBuilder::default()
                .typ(LinuxNamespaceType::Network)
                .path(path.clone())
                .build()
                .map_err(build_err("namespaces"))?,
        ),
        Network::Host => {}
    }

    let mut resources = LinuxResourcesBuilder::default().devices(vec![
        LinuxDeviceCgroupBuilder::default()
            .allow(c.privileged)
            .access("rwm")
            .build()
            .map_err(build_err("device cgroup"))?,
    ]);
    let r = &c.resources;
    if let Some(limit) = r.memory {
        resources = resources.memory(
            LinuxMemoryBuilder::default()
                .limit(limit)
                .swap(r.memory_swap.unwrap_or(limit))
                .build()
                .map_err(build_err("memory"))?,
        );
    }
    if let Some(quota) = r.cpu_quota {
        resources = resources.cpu(
            LinuxCpuBuilder::default()
                .quota(quota)
                .period(r.cpu_period.unwrap_or(100_000))
                .build()
                .map_err(build_err("cpu"))?,
        );
    }
    if let Some(limit) = r.pids {
        resources = resources.pids(
            LinuxPidsBuilder::default()
                .limit(limit)
                .build()
                .map_err(build_err("pids"))?,
        );
    }
    let (masked, readonly): (Vec<String>, Vec<String>) = if c.privileged {
        (Vec::new(), Vec::new())
    } else {
        (
            MASKED_PATHS.iter().map(|p| p.to_string()).collect(),
            READONLY_PATHS.iter().map(|p| p.to_string()).collect(),
        )
    };
    let mut linux = LinuxBuilder::default()
        .namespaces(namespaces)
        .resources(resources.build().map_err(build_err("resources"))?)
        .masked_paths(masked)
        .readonly_paths(readonly);
    if let Some(path) = &c.cgroups_path {
        linux = linux.cgroups_path(PathBuf::from(path));
    }
    if c.privileged && !host.devices.is_empty() {
        linux = linux.devices(host.devices.clone());
    }

    let mut spec = SpecBuilder::default()
        .version(OCI_VERSION)
        .hostname(c.hostname.clone())
        .root(
            RootBuilder::default()
                .path(c.root.clone())
                .readonly(c.readonly_rootfs)
                .build()
                .map_err(build_err("root"))?,
        )
        .process(process)
        .mounts(mounts(c)?)
        .linux(linux.build().map_err(build_err("linux"))?)
        .build()
        .map_err(build_err("spec"))?;
    spec.set_annotations(None);
    Ok(spec)
}

fn mount(destination: &str, typ: &str, source: &str, options: &[&str]) -> Result<Mount, SpecError> {
    MountBuilder::default()
        .destination(destination)
        .typ(typ)
        .source(source)
        .options(options.iter().map(|o| o.to_string()).collect::<Vec<_>>())
        .build()
        .map_err(build_err("mounts"))
}

/// The standard mounts (runc's `runc spec` set, a tmpfs `/tmp`), the init, then the caller's.
fn mounts(c: &ContainerSpec) -> Result<Vec<Mount>, SpecError> {
    let sys_mode = if c.privileged { "rw" } else { "ro" };
    let mut out = vec![
        mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"])?,
        mount(
            "/dev",
            "tmpfs",
            "tmpfs",
            &["nosuid", "strictatime", "mode=755", "size=65536k"],
        )?,
        mount(
            "/dev/pts",
            "devpts",
            "devpts",
            &[
                "nosuid",
                "noexec",
                "newinstance",
                "ptmxmode=0666",
                "mode=0620",
                "gid=5",
            ],
        )?,
        mount(
            "/dev/shm",
            "tmpfs",
            "shm",
            &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        )?,
        mount(
            "/dev/mqueue",
            "mqueue",
            "mqueue",
            &["nosuid", "noexec", "nodev"],
        )?,
        mount(
            "/sys",
            "sysfs",
            "sysfs",
            &["nosuid", "noexec", "nodev", sys_mode],
        )?,
        mount(
            "/sys/fs/cgroup",
            "cgroup",
            "cgroup",
            &["nosuid", "noexec", "nodev", "relatime", sys_mode],
        )?,
        mount("/tmp", "tmpfs", "tmpfs", &["nosuid", "nodev", "mode=1777"])?,
    ];
    if let Some(init) = &c.init {
        out.push(
            MountBuilder::default()
                .destination(INIT_PATH)
                .typ("bind")
                .source(init.clone())
                .options(vec!["bind".to_string(), "ro".to_string()])
                .build()
                .map_err(build_err("mounts"))?,
        );
    }
    for m in &c.mounts {
        out.push(
            MountBuilder::default()
                .destination(m.destination.clone())
                .typ("bind")
                .source(m.source.clone())
                .options(vec![
                    "rbind".to_string(),
                    if m.readonly { "ro" } else { "rw" }.to_string(),
                ])
                .build()
                .map_err(build_err("mounts"))?,
        );
    }
    Ok(out)
}

/// The caller's environment plus `PATH`, `HOSTNAME` and `HOME` where it has none.
fn full_env(c: &ContainerSpec) -> Vec<String> {
    let mut env = c.env.clone();
    let has = |env: &[String], key: &str| {
        env.iter()
            .any(|e| e.split_once('=').map(|(k, _)| k) == Some(key))
    };
    if !has(&env, "PATH") {
        env.push(DEFAULT_PATH.to_string());
    }
    if !has(&env, "HOSTNAME") {
        env.push(format!("HOSTNAME={}", c.hostname));
    }
    if !has(&env, "HOME") {
        let home = c.user.home.clone().unwrap_or_else(|| {
            if c.user.uid == 0 {
                "/root".into()
            } else {
                "/".into()
            }
        });
        env.push(format!("HOME={home}"));
    }
    env
}

/// Writes `spec` as `<bundle>/config.json` (atomically, mode 0600: the environment may hold
/// secrets) and returns its path.
pub fn write_bundle(bundle: &Path, spec: &Spec) -> Result<PathBuf, SpecError> {
    let path = bundle.join("config.json");
    let bytes = serde_json::to_vec_pretty(spec).map_err(|e| SpecError::Write {
        path: path.clone(),
        source: e.into(),
    })?;
    fsutil::atomic_write_mode(&path, &bytes, 0o600).map_err(|source| SpecError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// The process an image runs by default, with Docker's override rules: an `entrypoint`
/// override drops the image's `Cmd` too; a `command` override replaces only `Cmd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageProcess {
    /// Entrypoint followed by cmd. Empty when the image defines neither and nothing was given.
    pub args: Vec<String>,
    /// The image's `Env`.
    pub env: Vec<String>,
    /// The image's `WorkingDir`, or `/`.
    pub cwd: String,
    /// The image's `User`, if any (resolve it with [`resolve_user`]).
    pub user: Option<String>,
}

/// Applies the image config and the overrides (see [`ImageProcess`]).
pub fn image_process(
    config: &ImageConfiguration,
    entrypoint: Option<&[String]>,
    command: Option<&[String]>,
) -> ImageProcess {
    let c = config.config().clone().unwrap_or_default();
    let (entry, cmd): (Vec<String>, Vec<String>) = match entrypoint {
        Some(e) => (
            e.to_vec(),
            command.map(<[String]>::to_vec).unwrap_or_default(),
        ),
        None => (
            c.entrypoint().clone().unwrap_or_default(),
            command
                .map(<[String]>::to_vec)
                .unwrap_or_else(|| c.cmd().clone().unwrap_or_default()),
        ),
    };
    ImageProcess {
        args: entry.into_iter().chain(cmd).collect(),
        env: c.env().clone().unwrap_or_default(),
        cwd: c
            .working_dir()
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".into()),
        user: c.user().clone().filter(|u| !u.is_empty()),
    }
}

/// `base` with `overrides` applied by key (`KEY=value`; a later entry wins, order kept).
pub fn merge_env(base: &[String], overrides: &[String]) -> Vec<String> {
    let key = |e: &str| {
        e.split_once('=')
            .map(|(k, _)| k.to_string())
            .unwrap_or_else(|| e.to_string())
    };
    let mut out: Vec<String> = Vec::new();
    for e in base.iter().chain(overrides) {
        let k = key(e);
        match out.iter_mut().find(|existing| key(existing) == k) {
            Some(slot) => *slot = e.clone(),
            None => out.push(e.clone()),
        }
    }
    out
}

/// Where the container would find `program` (its `argv[0]`), looked up as `execvp` does inside
/// `rootfs`: a path with a `/` as it is (relative ones against `cwd`), a bare name in each
/// directory of `path` (the container's `PATH`). Symlinks resolve inside `rootfs`. `None`
/// when there is no executable regular file there, so a step can fail before its container
/// starts, naming the program, instead of with an init's "failed to exec" and exit code 1.
pub fn find_executable(rootfs: &Path, program: &str, path: &str, cwd: &str) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |in_root: &str| -> bool {
        let rel = in_root.trim_start_matches('/');
        matches!(
            fsutil::file_in_root(rootfs, Path::new(rel)),
            Ok(Some((host, _))) if std::fs::metadata(&host)
                .is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
        )
    };
    if program.contains('/') {
        let full = if program.starts_with('/') {
            program.to_string()
        } else {
            format!("{}/{program}", cwd.trim_end_matches('/'))
        };
        return executable(&full).then_some(full);
    }
    path.split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{program}", d.trim_end_matches('/')))
        .find(|c| executable(c))
}

/// Resolves `user` (`name`, `uid`, `name:group`, `uid:gid`, `name:gid`...) against the image's
/// `/etc/passwd` and `/etc/group` (read inside `rootfs`, symlinks resolved inside it), with
/// the supplementary groups that list the user. A numeric uid unknown to the image runs with
/// gid 0 and no extra groups, as Docker does; an unknown name is an error. Empty is root.
pub fn resolve_user(rootfs: &Path, user: &str) -> Result<ProcessUser, SpecError> {
    let (user_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let err = |reason: String| SpecError::User {
        user: user.to_string(),
        rootfs: rootfs.to_path_buf(),
        reason,
    };
    let read = |rel: &str| -> Result<String, SpecError> {
        match fsutil::read_in_root(rootfs, Path::new(rel)) {
            Ok(Some(bytes)) => Ok(String::from_utf8_lossy(&bytes).into_owned()),
            Ok(None) => Ok(String::new()),
            Err(e) => Err(SpecError::Read {
                path: rootfs.join(rel),
                source: io::Error::other(e.to_string()),
            }),
        }
    };
    let passwd = read("etc/passwd")?;
    // name:password:uid:gid:gecos:home:shell
    let entries: Vec<Vec<&str>> = passwd
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 4)
        .collect();
    let found = if user_part.is_empty() {
        entries.iter().find(|f| f[2] == "0")
    } else if let Ok(uid) = user_part.parse::<u32>() {
        entries.iter().find(|f| f[2].parse() == Ok(uid))
    } else {
        entries.iter().find(|f| f[0] == user_part)
    };
    let mut out = ProcessUser::default();
    let mut name: Option<&str> = None;
    match found {
        Some(f) => {
            out.uid = f[2]
                .parse()
                .map_err(|_| err(format!("uid {:?} of {} is not a number", f[2], f[0])))?;
            out.gid = f[3]
                .parse()
                .map_err(|_| err(format!("gid {:?} of {} is not a number", f[3], f[0])))?;
            out.home = f.get(5).filter(|h| !h.is_empty()).map(|h| h.to_string());
            name = Some(f[0]);
        }
        None if user_part.is_empty() => {}
        None => match user_part.parse::<u32>() {
            Ok(uid) => out.uid = uid,
            Err(_) => return Err(err("no such user in /etc/passwd".into())),
        },
    }
    let group = read("etc/group")?;
    // name:password:gid:member,member
    let groups: Vec<Vec<&str>> = group
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() >= 3)
        .collect();
    if let Some(g) = group_part.filter(|g| !g.is_empty()) {
        out.gid = match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => groups
                .iter()
                .find(|f| f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| err(format!("no group {g:?} in /etc/group")))?,
        };
    }
    if let Some(name) = name {
        for f in &groups {
            let members = f.get(3).copied().unwrap_or("");
            if members.split(',').any(|m| m.trim() == name) {
                if let Ok(gid) = f[2].parse::<u32>() {
                    if gid != out.gid && !out.additional_gids.contains(&gid) {
                        out.additional_gids.push(gid);
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::{ConfigBuilder, ImageConfigurationBuilder};
    use serde_json::{Value, json};

    fn host() -> Host {
        Host {
            nofile_hard: 20000,
            // Like this machine: everything but CAP_SYS_RESOURCE.
            bounding: caps_from_mask(0x1fffeffffff),
            devices: Vec::new(),
        }
    }

    /// The spec as JSON with capability sets sorted (oci-spec keeps them in a HashSet).
    fn to_json(spec: &Spec) -> Value {
        let mut v = serde_json::to_value(spec).unwrap();
        if let Some(caps) = v
            .pointer_mut("/process/capabilities")
            .and_then(Value::as_object_mut)
        {
            for set in caps.values_mut() {
                if let Value::Array(items) = set {
                    items.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
                }
            }
        }
        v
    }

    #[test]
    fn step_container_spec_json() {
        let mut c = ContainerSpec::new(vec!["/bin/sh".into(), "-c".into(), "echo hi".into()]);
        c.env = vec!["A=1".into()];
        c.cwd = "/harness".into();
        c.user = ProcessUser {
            uid: 100,
            gid: 102,
            additional_gids: vec![101],
            home: Some("/var/lib/postgresql".into()),
        };
        c.hostname = "db".into();
        c.network = Network::Join("/run/stagehand/r1/netns".into());
        c.mounts = vec![
            BindMount::rw("/run/stagehand/r1/workspace", "/harness"),
            BindMount::ro("/run/stagehand/r1/hosts", "/etc/hosts"),
        ];
        c.cgroups_path = Some("stagehand-r1/step1".into());
        c.resources = Resources {
            memory: Some(32 << 20),
            memory_swap: None,
            cpu_quota: Some(40_000),
            cpu_period: None,
            pids: Some(512),
        };
        c.init = Some("/usr/bin/catatonit".into());
        let docker_caps = json!([
            "CAP_AUDIT_WRITE",
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FOWNER",
            "CAP_FSETID",
            "CAP_KILL",
            "CAP_MKNOD",
            "CAP_NET_BIND_SERVICE",
            "CAP_NET_RAW",
            "CAP_SETFCAP",
            "CAP_SETGID",
            "CAP_SETPCAP",
            "CAP_SETUID",
            "CAP_SYS_CHROOT"
        ]);
        let expected = json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 100, "gid": 102, "additionalGids": [101]},
                "args": ["/dev/init", "--", "/bin/sh", "-c", "echo hi"],
                "env": ["A=1", DEFAULT_PATH, "HOSTNAME=db", "HOME=/var/lib/postgresql"],
                "cwd": "/harness",
                "capabilities": {
                    "bounding": docker_caps, "effective": docker_caps, "permitted": docker_caps,
                    "inheritable": [], "ambient": []
                },
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 20000, "soft": 20000}],
                "noNewPrivileges": true
            },
            "root": {"path": "rootfs", "readonly": false},
            "hostname": "db",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=1777"]},
                {"destination": "/dev/init", "type": "bind", "source": "/usr/bin/catatonit", "options": ["bind", "ro"]},
                {"destination": "/harness", "type": "bind", "source": "/run/stagehand/r1/workspace", "options": ["rbind", "rw"]},
                {"destination": "/etc/hosts", "type": "bind", "source": "/run/stagehand/r1/hosts", "options": ["rbind", "ro"]}
            ],
            "linux": {
                "resources": {
                    "devices": [{"allow": false, "access": "rwm"}],
                    "memory": {"limit": 33554432, "swap": 33554432},
                    "cpu": {"quota": 40000, "period": 100000},
                    "pids": {"limit": 512}
                },
                "cgroupsPath": "stagehand-r1/step1",
                "namespaces": [
                    {"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                    {"type": "network", "path": "/run/stagehand/r1/netns"}
                ],
                "maskedPaths": MASKED_PATHS,
                "readonlyPaths": READONLY_PATHS
            }
        });
        let spec = build(&c, &host()).unwrap();
        assert_eq!(to_json(&spec), expected);
    }

    #[test]
    fn privileged_spec_drops_masks_and_gets_our_caps_and_devices() {
        let mut c = ContainerSpec::new(vec!["true".into()]);
        c.privileged = true;
        c.network = Network::Host;
        let mut h = host();
        h.devices = vec![
            LinuxDeviceBuilder::default()
                .path("/dev/fuse")
                .typ(LinuxDeviceType::C)
                .major(10i64)
                .minor(229i64)
                .build()
                .unwrap(),
        ];
        let v = to_json(&build(&c, &h).unwrap());
        let bounding = v
            .pointer("/process/capabilities/bounding")
            .unwrap()
            .as_array()
            .unwrap();
        assert_eq!(bounding.len(), 40);
        assert!(bounding.contains(&json!("CAP_SYS_ADMIN")));
        assert!(
            !bounding.contains(&json!("CAP_SYS_RESOURCE")),
            "never more than we have"
        );
        assert_eq!(v["process"]["noNewPrivileges"], false);
        assert_eq!(v["linux"]["maskedPaths"], json!([]));
        assert_eq!(v["linux"]["readonlyPaths"], json!([]));
        assert_eq!(
            v["linux"]["resources"]["devices"],
            json!([{"allow": true, "access": "rwm"}])
        );
        assert_eq!(v["linux"]["devices"][0]["path"], "/dev/fuse");
        assert_eq!(
            v["mounts"][5]["options"],
            json!(["nosuid", "noexec", "nodev", "rw"])
        );
        let types: Vec<&str> = v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["pid", "mount", "ipc", "uts"]);
        assert_eq!(
            v["process"]["env"],
            json!([DEFAULT_PATH, "HOSTNAME=stagehand", "HOME=/root"])
        );
    }

    #[test]
    fn nofile_never_exceeds_the_host_and_new_netns_has_no_path() {
        let mut h = host();
        h.nofile_hard = 4096;
        let v = to_json(&build(&ContainerSpec::new(vec!["x".into()]), &h).unwrap());
        assert_eq!(
            v["process"]["rlimits"],
            json!([{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 4096}])
        );
        assert_eq!(v["linux"]["namespaces"][4], json!({"type": "network"}));
        assert!(v["linux"].get("cgroupsPath").is_none());
        assert!(v.get("annotations").is_none());
        h.nofile_hard = u64::MAX;
        let v = to_json(&build(&ContainerSpec::new(vec!["x".into()]), &h).unwrap());
        assert_eq!(v["process"]["rlimits"][0]["hard"], 1 << 20);
    }

    #[test]
    fn write_bundle_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let spec = build(&ContainerSpec::new(vec!["x".into()]), &host()).unwrap();
        let path = write_bundle(dir.path(), &spec).unwrap();
        assert_eq!(Spec::load(&path).unwrap(), spec);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
    }

    #[test]
    fn host_probe_reads_this_process() {
        let h = Host::probe().unwrap();
        assert!(h.nofile_hard > 0);
        assert!(!h.bounding.is_empty() || !nix::unistd::geteuid().is_root());
    }

    fn image_rootfs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        fs::create_dir_all(&etc).unwrap();
        fs::create_dir_all(dir.path().join("usr/share/base")).unwrap();
        fs::write(
            dir.path().join("usr/share/base/passwd"),
            "root:x:0:0:root:/root:/bin/bash\npostgres:x:100:102:PostgreSQL:/var/lib/postgresql:/bin/bash\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n",
        )
        .unwrap();
        // An absolute symlink, resolved inside the image (never the host's /etc/passwd).
        std::os::unix::fs::symlink("/usr/share/base/passwd", etc.join("passwd")).unwrap();
        fs::write(
            etc.join("group"),
            "root:x:0:\nssl-cert:x:101:postgres\npostgres:x:102:\nstaff:x:50:alice, postgres\nnogroup:x:65534:\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn find_executable_looks_in_the_image_as_execvp_would() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for d in ["bin", "usr/bin", "etc"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("bin/busybox"), "#!").unwrap();
        std::fs::set_permissions(
            root.join("bin/busybox"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        symlink("busybox", root.join("bin/sh")).unwrap();
        // Absolute, so it must resolve inside the image, never on the host.
        symlink("/bin/busybox", root.join("usr/bin/env")).unwrap();
        symlink("/usr/bin/true", root.join("bin/hosttrue")).unwrap();
        std::fs::write(root.join("etc/motd"), "not a program").unwrap();
        let path = "/usr/local/bin:/usr/bin:/bin";
        assert_eq!(
            find_executable(root, "sh", path, "/").as_deref(),
            Some("/bin/sh")
        );
        assert_eq!(
            find_executable(root, "env", path, "/").as_deref(),
            Some("/usr/bin/env")
        );
        assert_eq!(
            find_executable(root, "/bin/busybox", "", "/").as_deref(),
            Some("/bin/busybox")
        );
        assert_eq!(find_executable(root, "hosttrue", path, "/"), None);
        assert_eq!(find_executable(root, "/etc/motd", path, "/"), None);
        assert_eq!(find_executable(root, "nope", path, "/"), None);
        assert_eq!(find_executable(root, "sh", "/usr/local/bin", "/"), None);
        assert_eq!(
            find_executable(root, "sh", path, "/bin").as_deref(),
            Some("/bin/sh")
        );
    }

    #[test]
    fn resolve_user_reads_passwd_and_group_of_the_image() {
        let dir = image_rootfs();
        let r = dir.path();
        assert_eq!(
            resolve_user(r, "postgres").unwrap(),
            ProcessUser {
                uid: 100,
                gid: 102,
                additional_gids: vec![101, 50],
                home: Some("/var/lib/postgresql".into())
            }
        );
        assert_eq!(
            resolve_user(r, "100").unwrap().additional_gids,
            vec![101, 50]
        );
        assert_eq!(resolve_user(r, "postgres:ssl-cert").unwrap().gid, 101);
        assert_eq!(resolve_user(r, "postgres:7").unwrap().gid, 7);
        assert_eq!(resolve_user(r, "").unwrap().uid, 0);
        assert_eq!(
            resolve_user(r, "4242").unwrap(),
            ProcessUser {
                uid: 4242,
                ..Default::default()
            }
        );
        let err = resolve_user(r, "mallory").unwrap_err();
        assert!(
            err.to_string().contains("mallory") && err.to_string().contains("no such user"),
            "{err}"
        );
        let err = resolve_user(r, "postgres:nogrp").unwrap_err();
        assert!(err.to_string().contains("nogrp"), "{err}");
    }

    #[test]
    fn image_process_follows_docker_override_rules() {
        let config = ImageConfigurationBuilder::default()
            .config(
                ConfigBuilder::default()
                    .entrypoint(vec!["docker-entrypoint.sh".to_string()])
                    .cmd(vec!["postgres".to_string()])
                    .env(vec![
                        "PATH=/usr/bin".to_string(),
                        "PGDATA=/data".to_string(),
                    ])
                    .working_dir("/srv")
                    .user("postgres")
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let p = image_process(&config, None, None);
        assert_eq!(p.args, s(&["docker-entrypoint.sh", "postgres"]));
        assert_eq!(
            (p.cwd.as_str(), p.user.as_deref()),
            ("/srv", Some("postgres"))
        );
        assert_eq!(
            image_process(&config, None, Some(&s(&["-c", "x"]))).args,
            s(&["docker-entrypoint.sh", "-c", "x"])
        );
        assert_eq!(
            image_process(&config, Some(&s(&["/bin/sh"])), None).args,
            s(&["/bin/sh"])
        );
        assert_eq!(
            image_process(&config, Some(&s(&["/bin/sh"])), Some(&s(&["-c", "id"]))).args,
            s(&["/bin/sh", "-c", "id"])
        );
        assert_eq!(
            merge_env(&p.env, &s(&["PGDATA=/tmp/pg", "X=1"])),
            s(&["PATH=/usr/bin", "PGDATA=/tmp/pg", "X=1"])
        );
        let empty = ImageConfigurationBuilder::default().build().unwrap();
        assert_eq!(image_process(&empty, None, None).cwd, "/");
    }
}
