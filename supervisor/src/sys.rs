//! Raw syscalls that need `unsafe`: peeking at and reaping exited children, sending signals
//! by raw number, and the pre-exec setup of a spawned child (cgroups, network namespace,
//! private mounts, user switch, parent-death signal).
//!
//! This is the only module of the crate allowed to use `unsafe`. It knows nothing about what a
//! step or a stage is: callers hand it plain data (file descriptors, C strings, ids) prepared in
//! the parent. It does not spawn processes itself; `process` builds the `Command` and the
//! `reaper` spawner thread runs it.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

/// `waitid(P_ALL, .., WEXITED | WNOWAIT)`: blocks until any child has exited and returns its
/// pid *without* reaping it, so the caller can first take the registry lock (see `reaper`).
///
/// Returns `ECHILD` when the process has no children at all.
pub(crate) fn wait_any_exited() -> io::Result<libc::pid_t> {
    loop {
        // SAFETY: siginfo_t is a plain C struct of integers and unions of integers; all-zero is
        // a valid value and it is only used as an out-parameter below.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t that outlives the call; P_ALL ignores
        // the id argument. __WALL also reports children whose exit signal is not SIGCHLD.
        let rc = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOWAIT | libc::__WALL,
            )
        };
        if rc == -1 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // SAFETY: waitid succeeded with WEXITED and without WNOHANG, so the kernel filled in the
        // SIGCHLD member of the union (si_pid, si_status).
        let pid = unsafe { info.si_pid() };
        if pid > 0 {
            return Ok(pid);
        }
    }
}

/// `waitpid(pid, WNOHANG)`: reaps `pid` if it has exited. `Ok(None)` means it has not exited;
/// `ECHILD` means it is not (or no longer) our child.
pub(crate) fn reap(pid: libc::pid_t) -> io::Result<Option<libc::c_int>> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid, writable c_int for the duration of the call.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
        match rc {
            -1 => {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            0 => return Ok(None),
            _ => return Ok(Some(status)),
        }
    }
}

/// `kill(pid, sig)` for one process. Refuses `pid <= 0`, which would signal a process group,
/// our own group (0) or every process we may signal (-1).
pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill takes plain integers; pid > 0 addresses exactly one process.
    if unsafe { libc::kill(pid, sig) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `kill(-pgid, sig)` for a whole process group. Refuses `pgid <= 1`: `-1` would signal every
/// process we may signal, and pgid 1 is init's group.
pub(crate) fn kill_group(pgid: libc::pid_t, sig: libc::c_int) -> io::Result<()> {
    if pgid <= 1 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: kill takes plain integers; -pgid with pgid > 1 addresses exactly one group.
    if unsafe { libc::kill(-pgid, sig) } == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Which pre-exec setup step failed in the child; sent to the parent as one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum SetupStage {
    Cgroup = 1,
    Netns = 2,
    UnshareMounts = 3,
    MountPropagation = 4,
    BindMount = 5,
    Setgroups = 6,
    Setgid = 7,
    Setuid = 8,
    ParentDeathSignal = 9,
    ParentGone = 10,
    InheritFd = 11,
    UserNamespace = 12,
}

impl SetupStage {
    pub(crate) fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Cgroup,
            2 => Self::Netns,
            3 => Self::UnshareMounts,
            4 => Self::MountPropagation,
            5 => Self::BindMount,
            6 => Self::Setgroups,
            7 => Self::Setgid,
            8 => Self::Setuid,
            9 => Self::ParentDeathSignal,
            10 => Self::ParentGone,
            11 => Self::InheritFd,
            12 => Self::UserNamespace,
            _ => return None,
        })
    }
}

/// Numeric identity the child switches to before exec.
#[derive(Debug, Clone)]
pub(crate) struct ChildUser {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

/// Everything the child does between fork and exec, prepared (allocated) in the parent.
///
/// Owning the descriptors here keeps them open until the `Command` holding the pre-exec
/// closure is dropped, i.e. until after the fork.
#[derive(Debug)]
pub(crate) struct ChildSetup {
    /// Descriptors the program inherits at their current numbers (close-on-exec is cleared in
    /// the child only, so concurrent spawns never inherit them).
    pub inherit: Vec<OwnedFd>,
    /// Open `cgroup.procs` / `tasks` files; the child writes its pid into each.
    pub cgroup_procs: Vec<OwnedFd>,
    /// A network namespace file (`/run/netns/x`, `/proc/<pid>/ns/net`) to `setns` into.
    pub netns: Option<OwnedFd>,
    /// `(src, dst)` bind mounts applied in a fresh mount namespace.
    pub mounts: Vec<(CString, CString)>,
    pub user: Option<ChildUser>,
    /// A nested user namespace with these `uid_map` and `gid_map` lines (the user's own ids,
    /// see `userns::keep_id_maps`); exclusive with `user`.
    pub keep_id: Option<(CString, CString)>,
    pub parent_death_signal: Option<libc::c_int>,
    /// `getpid()` of stagehand, to detect that it died before the pdeathsig was armed.
    pub parent_pid: libc::pid_t,
    /// Write end of a pipe (O_CLOEXEC): on failure the child writes `[stage, index]` here.
    pub report: OwnedFd,
}

impl ChildSetup {
    /// Runs in the forked child. Only async-signal-safe syscalls, no allocation, no locks:
    /// the parent is multi-threaded and any lock may have been held at fork time.
    fn apply(&self) -> io::Result<()> {
        for (index, fd) in self.inherit.iter().enumerate() {
            // SAFETY: `fd` is an open descriptor owned by `self`; F_SETFD only changes its
            // close-on-exec flag in this (the child's) descriptor table.
            if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) } == -1 {
                return Err(self.fail(io::Error::last_os_error(), SetupStage::InheritFd, index));
            }
        }
        // (a) cgroups first, so everything after (and the exec'd program) is accounted and
        // killable by cgroup membership. v1 `tasks`/`cgroup.procs` and v2 `cgroup.procs` all
        // accept our own pid.
        if !self.cgroup_procs.is_empty() {
            // SAFETY: getpid has no preconditions and cannot fail.
            let pid = unsafe { libc::getpid() };
            let mut buf = [0u8; 12];
            let digits = format_pid(pid, &mut buf);
            for (index, fd) in self.cgroup_procs.iter().enumerate() {
                if let Err(err) = write_all(fd.as_raw_fd(), digits) {
                    return Err(self.fail(err, SetupStage::Cgroup, index));
                }
            }
        }
        // (b) the stage network namespace.
        if let Some(fd) = &self.netns {
            // SAFETY: `fd` is an open descriptor owned by `self`; setns only reads it.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } == -1 {
                return Err(self.fail(io::Error::last_os_error(), SetupStage::Netns, 0));
            }
        }
        // (c) a private mount namespace showing stage files (e.g. /etc/hosts).
        if !self.mounts.is_empty() {
            // SAFETY: unshare takes a flag word only; the child is single-threaded after fork,
            // which CLONE_NEWNS (implying CLONE_FS) requires.
            if unsafe { libc::unshare(libc::CLONE_NEWNS) } == -1 {
                return Err(self.fail(io::Error::last_os_error(), SetupStage::UnshareMounts, 0));
            }
            // MS_SLAVE|MS_REC: our binds never propagate back to the host (the point of the
            // private namespace), while host mounts made later still show up here. See
            // mount_namespaces(7), "MS_SLAVE".
            // SAFETY: "/" is a NUL-terminated literal; NULL source/fstype/data are allowed for
            // a propagation change (mount(2), "Changing the propagation type").
            let rc = unsafe {
                libc::mount(
                    std::ptr::null(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_SLAVE,
                    std::ptr::null(),
                )
            };
            if rc == -1 {
                return Err(self.fail(io::Error::last_os_error(), SetupStage::MountPropagation, 0));
            }
            for (index, (src, dst)) in self.mounts.iter().enumerate() {
                // SAFETY: src and dst are CStrings owned by `self`, alive for the call; NULL
                // fstype and data are ignored for MS_BIND.
                let rc = unsafe {
                    libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND | libc::MS_REC,
                        std::ptr::null(),
                    )
                };
                if rc == -1 {
                    return Err(self.fail(
                        io::Error::last_os_error(),
                        SetupStage::BindMount,
                        index,
                    ));
                }
            }
        }
        // (d) drop to the step user: groups, then gid, then uid (after setuid we could no longer
        // change the others).
        if let Some(user) = &self.user {
            // SAFETY: the pointer and length describe `user.groups`, alive for the call.
            if unsafe { libc::setgroups(user.groups.len(), user.groups.as_ptr()) } == -1 {
                return Err(self.fail(io::Error::last_os_error(), SetupStage::Setgroups, 0));
            }
            // SAFETY: plain integer argument.
            if unsafe { libc::setgid(user.gid) } == -1 {
                return Err(self.fail(io::Error::last_os_error(), SetupStage::Setgid, 0));
            }
            // SAFETY: plain integer argument.
            if unsafe { libc::setuid(user.uid) } == -1 {
                return Err(self.fail(io::Error::last_os_error(), SetupStage::Setuid, 0));
            }
        }
        // (d') or become the user again in a nested user namespace: `setgroups` must be
        // denied before an unprivileged process may write its own gid map.
        if let Some((uid_map, gid_map)) = &self.keep_id {
            // SAFETY: unshare takes a flag word only; the child is single-threaded after fork,
            // which CLONE_NEWUSER requires.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } == -1 {
                return Err(self.fail(io::Error::last_os_error(), SetupStage::UserNamespace, 0));
            }
            let files: [(&std::ffi::CStr, &[u8]); 3] = [
                (c"/proc/self/setgroups", b"deny"),
                (c"/proc/self/uid_map", uid_map.as_bytes()),
                (c"/proc/self/gid_map", gid_map.as_bytes()),
            ];
            for (index, (path, text)) in files.iter().enumerate() {
                if let Err(err) = write_file(path, text) {
                    return Err(self.fail(err, SetupStage::UserNamespace, index + 1));
                }
            }
        }
        // (e) last, because a credential change clears the parent-death signal (prctl(2),
        // PR_SET_PDEATHSIG).
        if let Some(sig) = self.parent_death_signal {
            // SAFETY: PR_SET_PDEATHSIG takes a signal number and no pointers.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) } == -1 {
                return Err(self.fail(
                    io::Error::last_os_error(),
                    SetupStage::ParentDeathSignal,
                    0,
                ));
            }
            // If stagehand died between fork and the prctl, the signal will never come: we have
            // been reparented already, so stop here instead of running unsupervised.
            // SAFETY: getppid has no preconditions and cannot fail.
            if unsafe { libc::getppid() } != self.parent_pid {
                return Err(self.fail(
                    io::Error::from_raw_os_error(libc::ESRCH),
                    SetupStage::ParentGone,
                    0,
                ));
            }
        }
        Ok(())
    }

    /// Tells the parent which stage failed (best effort) and passes the error through.
    fn fail(&self, err: io::Error, stage: SetupStage, index: usize) -> io::Error {
        let msg = [stage as u8, u8::try_from(index).unwrap_or(u8::MAX)];
        // Ignoring a failed report is fine: the parent then reports the bare errno.
        let _ = write_all(self.report.as_raw_fd(), &msg);
        err
    }
}

/// Removes `key` from our environment. Only for the first moments of `main`, before any
/// thread exists (the reason `remove_var` is unsafe).
pub(crate) fn remove_env_single_threaded(key: &str) {
    // SAFETY: called from `userns::enter_child`, which its contract confines to a
    // single-threaded process, so no other thread can be reading the environment.
    unsafe { std::env::remove_var(key) }
}

/// Takes ownership of a descriptor number our parent passed us, if it is open.
pub(crate) fn own_inherited_fd(fd: libc::c_int) -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD only queries the descriptor table.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
        return None;
    }
    // SAFETY: the descriptor is open (checked above) and nothing else in this process knows
    // its number: it was inherited for exactly this purpose, named in an environment variable
    // that `enter_child` reads once.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Registers `setup` to run in the child between fork and exec.
pub(crate) fn install_child_setup(cmd: &mut Command, setup: ChildSetup) {
    // SAFETY: the closure runs in the forked child of a multi-threaded parent. ChildSetup::apply
    // only calls async-signal-safe syscalls (fcntl, getpid, write, setns, unshare, mount, setgroups,
    // setgid, setuid, prctl, getppid) on data prepared before the fork; it does not allocate,
    // take locks or touch thread-local state, and io::Error::from_raw_os_error/last_os_error
    // do not allocate.
    unsafe {
        cmd.pre_exec(move || setup.apply());
    }
}

/// open(2) + write(2) + close(2) of a whole small file; no allocation.
fn write_file(path: &std::ffi::CStr, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated and alive for the call.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd == -1 {
        return Err(io::Error::last_os_error());
    }
    let result = write_all(fd, bytes);
    // SAFETY: `fd` was opened above and is closed exactly once.
    unsafe { libc::close(fd) };
    result
}

/// write(2) until `bytes` is written or an error occurs; no allocation.
fn write_all(fd: libc::c_int, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe `bytes`, valid for the call.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n == -1 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        // n > 0 and <= len here.
        bytes = &bytes[n.unsigned_abs()..];
    }
    Ok(())
}

/// Formats a non-negative pid as decimal digits into `buf`, without allocating.
fn format_pid(pid: libc::pid_t, buf: &mut [u8; 12]) -> &[u8] {
    let mut n = pid.unsigned_abs();
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_pid_writes_decimal_digits() {
        let mut buf = [0u8; 12];
        assert_eq!(format_pid(0, &mut buf), b"0");
        assert_eq!(format_pid(7, &mut buf), b"7");
        assert_eq!(format_pid(4_194_304, &mut buf), b"4194304");
        assert_eq!(format_pid(i32::MAX, &mut buf), b"2147483647");
    }

    #[test]
    fn kill_refuses_groups_and_broadcast() {
        for pid in [0, -1, -42] {
            let err = kill(pid, 0).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "pid {pid}");
        }
        for pgid in [1, 0, -1] {
            let err = kill_group(pgid, 0).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "pgid {pgid}");
        }
        // Signal 0 to ourselves only checks that we exist.
        kill(std::process::id() as libc::pid_t, 0).unwrap();
    }

    #[test]
    fn setup_stage_round_trips_through_its_byte() {
        for stage in [
            SetupStage::Cgroup,
            SetupStage::Netns,
            SetupStage::UnshareMounts,
            SetupStage::MountPropagation,
            SetupStage::BindMount,
            SetupStage::Setgroups,
            SetupStage::Setgid,
            SetupStage::Setuid,
            SetupStage::ParentDeathSignal,
            SetupStage::ParentGone,
            SetupStage::InheritFd,
            SetupStage::UserNamespace,
        ] {
            assert_eq!(SetupStage::from_byte(stage as u8), Some(stage));
        }
        assert_eq!(SetupStage::from_byte(0), None);
    }

    #[test]
    fn write_all_writes_into_a_pipe() {
        use std::io::Read;
        let (mut reader, writer) = std::io::pipe().unwrap();
        write_all(writer.as_raw_fd(), b"12345").unwrap();
        drop(writer);
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "12345");
    }
}
