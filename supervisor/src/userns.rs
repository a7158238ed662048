//! Rootless operation: the user namespace an ordinary user's stagehand runs in.
//!
//! Owns: telling real root from root inside a user namespace and finding who we are on the
//! host; reading subordinate id ranges; re-running stagehand in a new user + mount namespace
//! mapped with `newuidmap`/`newgidmap` (or, without ranges, only the user's own ids); the
//! per-process "keep the user's id" mapping host steps run under; and the probes
//! `stagehand doctor` reports. Does not own: what runs inside, or cgroups.
//!
//! The shape is podman's: the parent stays an ordinary process on the host, forwards signals
//! and passes the exit code through; the child is root inside the namespace, so it can make
//! the stage's network namespace, mount overlays, bind the stage hosts file and run runc, all
//! owned by that namespace and gone with it. Files the child writes belong to the user on the
//! host; image files owned by other ids land in the user's subordinate range.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{FcntlArg, FdFlag, OFlag, fcntl};
use nix::sched::{CloneFlags, unshare};
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};

/// Set by the parent for the child: `"<write fd>,<read fd>,<parent pid>"` of the sync pipes.
pub const ENV_SYNC: &str = "STAGEHAND_USERNS_SYNC";

/// The signals the parent forwards to the child (and waits for, with SIGCHLD).
const FORWARDED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

/// Entering or setting up the user namespace failed.
#[derive(Debug, thiserror::Error)]
pub enum UsernsError {
    /// A sync pipe could not be made or used.
    #[error("user namespace: {what}: {source}")]
    Pipe {
        /// Which step.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Re-running stagehand failed.
    #[error("user namespace: start {program}: {source}")]
    Spawn {
        /// `/proc/self/exe`.
        program: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `unshare(CLONE_NEWUSER | CLONE_NEWNS)` failed in the child.
    #[error(
        "cannot create a user namespace: {0} (check `sysctl user.max_user_namespaces` and, on Ubuntu, kernel.apparmor_restrict_unprivileged_userns; `stagehand doctor` tells more)"
    )]
    Unshare(nix::Error),
    /// Writing the child's own id map failed.
    #[error("user namespace: write {path}: {source}")]
    OwnMap {
        /// `/proc/self/uid_map` and friends.
        path: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The parent went away before the namespace was mapped.
    #[error("user namespace: the parent stagehand exited during setup")]
    ParentGone,
    /// Arming the parent-death signal failed.
    #[error("user namespace: prctl(PR_SET_PDEATHSIG): {0}")]
    DeathSignal(nix::Error),
    /// Blocking or unblocking signals failed.
    #[error("user namespace: sigprocmask: {0}")]
    Sigmask(nix::Error),
}

/// One line of `/proc/<pid>/uid_map` or `gid_map`: ids `inside..inside+count` in the
/// namespace are `outside..outside+count` in its parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMap {
    /// First id inside the namespace.
    pub inside: u32,
    /// First id in the parent namespace.
    pub outside: u32,
    /// How many.
    pub count: u32,
}

/// Parses an id map file's text; malformed lines are skipped.
pub fn parse_id_map(text: &str) -> Vec<IdMap> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace().map(str::parse::<u32>);
            Some(IdMap {
                inside: f.next()?.ok()?,
                outside: f.next()?.ok()?,
                count: f.next()?.ok()?,
            })
        })
        .collect()
}

/// Whether `maps` is the initial namespace's identity map (`0 0 4294967295`).
fn is_identity(maps: &[IdMap]) -> bool {
    maps == [IdMap {
        inside: 0,
        outside: 0,
        count: u32::MAX,
    }]
}

/// Translates `id` through `maps` to the parent namespace's id.
pub fn to_outside(maps: &[IdMap], id: u32) -> Option<u32> {
    maps.iter()
        .find(|m| id >= m.inside && id - m.inside < m.count)
        .map(|m| m.outside + (id - m.inside))
}

fn own_map(file: &str) -> Vec<IdMap> {
    std::fs::read_to_string(format!("/proc/self/{file}"))
        .map(|t| parse_id_map(&t))
        .unwrap_or_default()
}

/// This process's uid and gid maps, read once: a process enters its user namespace
/// ([`enter_child`]) before anything asks, and never leaves it. Asked on every host-step spawn.
fn maps() -> &'static (Vec<IdMap>, Vec<IdMap>) {
    static MAPS: std::sync::OnceLock<(Vec<IdMap>, Vec<IdMap>)> = std::sync::OnceLock::new();
    MAPS.get_or_init(|| (own_map("uid_map"), own_map("gid_map")))
}

/// Whether this process runs in a user namespace other than the initial one.
pub fn in_user_namespace() -> bool {
    let maps = &maps().0;
    !maps.is_empty() && !is_identity(maps)
}

/// Root on the host: uid 0 outside any user namespace. Only then are host cgroups, `/run`
/// and `/var/lib` ours.
pub fn is_real_root() -> bool {
    nix::unistd::geteuid().is_root() && !in_user_namespace()
}

/// Our user id on the host (through our namespace's map when in one).
pub fn host_uid() -> u32 {
    let uid = nix::unistd::getuid().as_raw();
    to_outside(&maps().0, uid).unwrap_or(uid)
}

/// Our primary group id on the host.
pub fn host_gid() -> u32 {
    let gid = nix::unistd::getgid().as_raw();
    to_outside(&maps().1, gid).unwrap_or(gid)
}

/// A subordinate id range from `/etc/subuid` or `/etc/subgid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubIds {
    /// First host id of the range.
    pub start: u32,
    /// How many.
    pub count: u32,
}

/// The ranges `file` grants to the user `name` (or to its numeric `id`), in file order.
pub fn subordinate_ids(file: &Path, name: &str, id: u32) -> Vec<SubIds> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    parse_subordinate(&text, name, id)
}

fn parse_subordinate(text: &str, name: &str, id: u32) -> Vec<SubIds> {
    let id = id.to_string();
    text.lines()
        .filter_map(|l| {
            let mut f = l.trim().split(':');
            let owner = f.next()?;
            if owner != name && owner != id {
                return None;
            }
            let start = f.next()?.parse().ok()?;
            let count: u32 = f.next()?.parse().ok()?;
            (count > 0).then_some(SubIds { start, count })
        })
        .collect()
}

/// The name of the host user `uid` (from the passwd database).
pub fn user_name(uid: u32) -> Option<String> {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// How the namespace stagehand re-runs in will be mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingPlan {
    /// `newuidmap` and `newgidmap`, when both are installed.
    pub tools: Option<(PathBuf, PathBuf)>,
    /// Subordinate uid ranges of the user.
    pub subuids: Vec<SubIds>,
    /// Subordinate gid ranges of the user.
    pub subgids: Vec<SubIds>,
}

impl MappingPlan {
    /// Looks up the tools and the current user's ranges.
    pub fn for_current_user() -> MappingPlan {
        let uid = nix::unistd::getuid().as_raw();
        let name = user_name(uid).unwrap_or_default();
        let tools = match (find_tool("newuidmap"), find_tool("newgidmap")) {
            (Some(u), Some(g)) => Some((u, g)),
            _ => None,
        };
        MappingPlan {
            tools,
            subuids: subordinate_ids(Path::new("/etc/subuid"), &name, uid),
            subgids: subordinate_ids(Path::new("/etc/subgid"), &name, uid),
        }
    }

    /// Whether the namespace gets the subordinate ranges (else only the user's own id).
    pub fn full(&self) -> bool {
        self.tools.is_some() && !self.subuids.is_empty() && !self.subgids.is_empty()
    }
}

/// `newuidmap`/`newgidmap` arguments: our own id as 0, then each range from 1 on.
pub fn map_args(pid: i32, own: u32, ranges: &[SubIds]) -> Vec<String> {
    let mut args = vec![pid.to_string(), "0".into(), own.to_string(), "1".into()];
    let mut next = 1u32;
    for r in ranges {
        args.extend([next.to_string(), r.start.to_string(), r.count.to_string()]);
        next = next.saturating_add(r.count);
    }
    args
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/bin".into(), "/usr/sbin".into(), "/bin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn pipe_pair(what: &'static str) -> Result<(OwnedFd, OwnedFd), UsernsError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| UsernsError::Pipe {
        what,
        source: e.into(),
    })
}

fn inheritable(fd: &OwnedFd) -> Result<(), UsernsError> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(|e| UsernsError::Pipe {
        what: "pass a pipe to the child",
        source: e.into(),
    })?;
    Ok(())
}

fn forwarded_set(with_child: bool) -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    if with_child {
        set.add(Signal::SIGCHLD);
    }
    set
}

/// Re-runs this program (same arguments) in a new user and mount namespace and waits for it:
/// the parent side. Returns the child's exit code (128 + signal when it was killed).
///
/// Call it before any thread is started: it changes the signal mask. The child runs in its
/// own process group; SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to this process (a terminal's
/// Ctrl-C included) are forwarded to it exactly once.
pub fn reexec(plan: &MappingPlan) -> Result<i32, UsernsError> {
    let (from_child, child_w) = pipe_pair("sync pipe")?;
    let (child_r, to_child) = pipe_pair("sync pipe")?;
    inheritable(&child_w)?;
    inheritable(&child_r)?;
    // Blocked before the child exists, so no signal is lost in between; the child unblocks
    // them for itself.
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&forwarded_set(true)), None)
        .map_err(UsernsError::Sigmask)?;
    let exe = PathBuf::from("/proc/self/exe");
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| OsString::from("stagehand"));
    let sync = format!(
        "{},{},{}",
        child_w.as_raw_fd(),
        child_r.as_raw_fd(),
        std::process::id()
    );
    let mut child = Command::new(&exe)
        .arg0(arg0)
        .args(args)
        .env(ENV_SYNC, sync)
        .process_group(0)
        .spawn()
        .map_err(|source| UsernsError::Spawn {
            program: exe.clone(),
            source,
        })?;
    drop(child_w);
    drop(child_r);
    let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);

    let mut from_child = std::fs::File::from(from_child);
    let mut to_child = std::fs::File::from(to_child);
    let mut byte = [0u8; 1];
    let unshared = matches!(from_child.read(&mut byte), Ok(1));
    if unshared {
        let answer: &[u8] = match map_child(plan, pid) {
            Ok(()) => b"F",
            Err(why) => {
                if plan.full() {
                    eprintln!(
                        "stagehand: warning: {why}; the user namespace maps only your own id, so image files owned by other users are unpacked as yours"
                    );
                }
                b"S"
            }
        };
        // A failed write means the child is gone; its exit code says why.
        let _ = to_child.write_all(answer);
    }
    drop(to_child);

    let set = forwarded_set(true);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
        }
        match set.wait() {
            Ok(Signal::SIGCHLD) | Err(_) => {}
            Ok(sig) => {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
            }
        }
    }
}

/// Maps the child's namespace with the subordinate ranges; `Err` says why it could not.
fn map_child(plan: &MappingPlan, pid: i32) -> Result<(), String> {
    let Some((uidmap, gidmap)) = &plan.tools else {
        return Err("newuidmap/newgidmap not found (apt-get install uidmap)".into());
    };
    if plan.subuids.is_empty() || plan.subgids.is_empty() {
        return Err("no subordinate id ranges for you in /etc/subuid and /etc/subgid".into());
    }
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    for (tool, own, ranges) in [(uidmap, uid, &plan.subuids), (gidmap, gid, &plan.subgids)] {
        let out = Command::new(tool)
            .args(map_args(pid, own, ranges))
            .output()
            .map_err(|e| format!("{}: {e}", tool.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed: {}",
                tool.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// The child side: when started by [`reexec`], enters the new user and mount namespace and
/// becomes root in it. Returns `Ok(false)` (doing nothing) when not started that way.
///
/// Call it first thing in `main`, before any thread exists (`unshare(CLONE_NEWUSER)` requires
/// a single-threaded process).
pub fn enter_child() -> Result<bool, UsernsError> {
    let Some(sync) = std::env::var_os(ENV_SYNC) else {
        return Ok(false);
    };
    // Our own children must not take this for an invitation.
    crate::sys::remove_env_single_threaded(ENV_SYNC);
    let fields: Vec<i32> = sync
        .to_string_lossy()
        .split(',')
        .filter_map(|f| f.parse().ok())
        .collect();
    let [write_fd, read_fd, parent] = fields[..] else {
        return Ok(false);
    };
    let (Some(w), Some(r)) = (
        crate::sys::own_inherited_fd(write_fd),
        crate::sys::own_inherited_fd(read_fd),
    ) else {
        return Ok(false);
    };
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    let mut w = std::fs::File::from(w);
    let mut r = std::fs::File::from(r);
    unshare(CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWNS).map_err(UsernsError::Unshare)?;
    w.write_all(b"1").map_err(|source| UsernsError::Pipe {
        what: "tell the parent",
        source,
    })?;
    drop(w);
    let mut answer = [0u8; 1];
    match r.read(&mut answer) {
        Ok(1) if answer[0] == b'F' => {}
        Ok(1) => map_self(uid, gid)?,
        _ => return Err(UsernsError::ParentGone),
    }
    // Mounts made here (netns files, overlays, the stage hosts file) never reach the host.
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(|e| UsernsError::OwnMap {
        path: "/ (make rslave)",
        source: e.into(),
    })?;
    // If the parent dies (SIGKILL), tear the stage down as for SIGTERM.
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(UsernsError::DeathSignal)?;
    if nix::unistd::getppid().as_raw() != parent {
        return Err(UsernsError::ParentGone);
    }
    sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&forwarded_set(true)), None)
        .map_err(UsernsError::Sigmask)?;
    Ok(true)
}

/// Without subordinate ranges: map only our own ids (allowed to an unprivileged process for
/// itself, once `setgroups` is denied).
fn map_self(uid: u32, gid: u32) -> Result<(), UsernsError> {
    for (path, text) in [
        ("/proc/self/setgroups", "deny".to_string()),
        ("/proc/self/uid_map", format!("0 {uid} 1\n")),
        ("/proc/self/gid_map", format!("0 {gid} 1\n")),
    ] {
        std::fs::write(path, text).map_err(|source| UsernsError::OwnMap { path, source })?;
    }
    Ok(())
}

/// For a host process started from inside our namespace: the map lines that give it back the
/// user's own ids in a nested namespace (`<host uid> 0 1`), so `id -u` says who the user is and
/// programs that refuse root (initdb) run. `None` when not in a user namespace.
pub fn keep_id_maps() -> Option<(String, String)> {
    if !in_user_namespace() {
        return None;
    }
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    Some((
        format!("{} {uid} 1\n", host_uid()),
        format!("{} {gid} 1\n", host_gid()),
    ))
}

/// Whether this process can open `/dev/net/tun` (slirp4netns needs it for outbound access;
/// many hosts make it 0666, some 0600).
pub fn tun_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_maps_parse_and_translate() {
        let maps =
            parse_id_map("         0       1001          1\n         1     100000      65536\n");
        assert_eq!(
            maps,
            [
                IdMap {
                    inside: 0,
                    outside: 1001,
                    count: 1
                },
                IdMap {
                    inside: 1,
                    outside: 100000,
                    count: 65536
                }
            ]
        );
        assert_eq!(to_outside(&maps, 0), Some(1001));
        assert_eq!(to_outside(&maps, 1), Some(100000));
        assert_eq!(to_outside(&maps, 65536), Some(165535));
        assert_eq!(to_outside(&maps, 65537), None);
        assert!(!is_identity(&maps));
        assert!(is_identity(&parse_id_map("0 0 4294967295\n")));
    }

    #[test]
    fn subordinate_ranges_match_name_or_id_in_file_order() {
        let text = "alice:100000:65536\n# comment\nbob:165536:65536\n1001:231072:1000\nalice:300000:0\nalice:bad:1\n";
        assert_eq!(
            parse_subordinate(text, "alice", 1001),
            [
                SubIds {
                    start: 100000,
                    count: 65536
                },
                SubIds {
                    start: 231072,
                    count: 1000
                }
            ]
        );
        assert!(parse_subordinate(text, "carol", 7).is_empty());
    }

    #[test]
    fn newuidmap_arguments_put_the_user_at_zero_and_ranges_after() {
        let ranges = [
            SubIds {
                start: 100000,
                count: 65536,
            },
            SubIds {
                start: 300000,
                count: 10,
            },
        ];
        assert_eq!(
            map_args(42, 1001, &ranges),
            [
                "42", "0", "1001", "1", "1", "100000", "65536", "65537", "300000", "10"
            ]
        );
    }

    #[test]
    fn this_test_process_is_not_in_a_user_namespace_as_root() {
        // The suite runs as root on the host (CI) or as a user without a namespace.
        assert!(!in_user_namespace());
        assert_eq!(host_uid(), nix::unistd::getuid().as_raw());
        assert_eq!(keep_id_maps(), None);
    }
}
