//! The stage network namespace: create one per stage run, hold it for the whole stage with a
//! bind mount on a file under the run directory, enter it from a thread, and remove it.
//!
//! Owns: the namespace lifetime (file + bind mount), bringing `lo` up, entering the namespace
//! from a dedicated std thread, and [`NetError`], the error type of the whole stage network
//! (`netns`, `forward`, `hosts`, `slirp`).
//! Does not own: putting processes into the namespace (the process layer does `setns` in
//! `pre_exec` with the fd from [`NetNs::fd`]), the hosts file mount, port forwarding
//! ([`crate::forward`]) or outbound connectivity ([`crate::slirp`]).
//!
//! Why a thread and no fork: a network namespace is a property of a *thread*
//! (`unshare(2)`: "CLONE_NEWNET ... unshare the network namespace"), so a short-lived std
//! thread can `unshare(CLONE_NEWNET)`, bring `lo` up and bind-mount `/proc/thread-self/ns/net`
//! onto the target file, then exit: the mount keeps the namespace alive, exactly like
//! `ip netns add` does, without an `ip` binary, a veth, iptables or a child process.
//! The same trick (`setns` on a fresh thread) creates sockets inside the namespace; a socket
//! keeps the namespace it was created in for its whole life, whichever thread uses it later.
//! Never call `setns` on a tokio worker or blocking-pool thread: those threads are reused.
//!
//! The bind mount is made in stagehand's own mount namespace (no private mount namespace is
//! involved), so it is visible in `/proc/mounts` of the host and `gc` can find and undo it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;

/// Errors of the stage network: namespace, forwarders, hosts file, slirp4netns.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The empty file the namespace is mounted on could not be created.
    #[error("cannot create netns mount point {path}: {source}")]
    CreateFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `unshare(CLONE_NEWNET)` failed (needs CAP_SYS_ADMIN in the owning user namespace).
    #[error("cannot create a network namespace for {path}: unshare(CLONE_NEWNET): {source}")]
    Unshare {
        /// The file the namespace was meant for.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Bringing the loopback interface up inside a new namespace failed.
    #[error("cannot bring lo up in the network namespace for {path}: {source}")]
    LoopbackUp {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Bind-mounting the namespace onto its file failed.
    #[error("cannot bind-mount the network namespace onto {path}: {source}")]
    Mount {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Opening a namespace file failed.
    #[error("cannot open network namespace {path}: {source}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The path exists but no namespace is mounted on it.
    #[error("{path} is not a mounted namespace (nsfs)")]
    NotNamespace {
        /// The path.
        path: PathBuf,
    },
    /// `setns(CLONE_NEWNET)` failed.
    #[error("cannot enter network namespace {path}: setns: {source}")]
    Setns {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Unmounting a namespace file failed.
    #[error("cannot unmount network namespace {path}: {source}")]
    Unmount {
        /// The namespace file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Deleting a file (namespace mount point) failed.
    #[error("cannot remove {path}: {source}")]
    Remove {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A helper thread could not be started.
    #[error("cannot start thread {name}: {source}")]
    Thread {
        /// The thread's name.
        name: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A helper thread ended without answering (it panicked).
    #[error("thread {name} died before it answered")]
    ThreadDied {
        /// The thread's name.
        name: &'static str,
    },
    /// A host port to publish is taken by another process.
    #[error("port {port} for {owner} is already in use on 127.0.0.1")]
    PortInUse {
        /// The host port.
        port: u16,
        /// The step that publishes it.
        owner: String,
    },
    /// Two bindings of the stage publish the same host port.
    #[error("port {port} is published by both {first} and {second}")]
    DuplicatePort {
        /// The host port.
        port: u16,
        /// The step whose binding came first.
        first: String,
        /// The step whose binding came second.
        second: String,
    },
    /// A binding names port 0 as its target.
    #[error("port binding {host_port}:0 for {owner}: the container port must not be 0")]
    ZeroTargetPort {
        /// The host port of the binding.
        host_port: u16,
        /// The step that publishes it.
        owner: String,
    },
    /// Binding or setting up a host listener failed for another reason than "in use".
    #[error("cannot listen on 127.0.0.1:{port} for {owner}: {source}")]
    Listen {
        /// The host port.
        port: u16,
        /// The step that publishes it.
        owner: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// [`crate::forward::Forwarders::start`] was called outside a tokio runtime.
    #[error("port forwarders must be started inside a tokio runtime")]
    NoRuntime,
    /// Writing a stage file (hosts, resolv.conf) failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating or reading the slirp4netns readiness pipe failed.
    #[error("slirp4netns readiness pipe: {source}")]
    ReadyPipe {
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// slirp4netns closed its readiness pipe without reporting ready (it exited).
    #[error("slirp4netns exited before the network was ready")]
    SlirpExited,
    /// slirp4netns wrote something else than `1` on its readiness pipe.
    #[error("slirp4netns wrote {byte:#04x} on its ready fd instead of '1'")]
    SlirpBadReady {
        /// The byte read.
        byte: u8,
    },
    /// slirp4netns did not report ready in time.
    #[error("slirp4netns was not ready after {timeout:?}")]
    SlirpTimeout {
        /// How long we waited.
        timeout: Duration,
    },
}

/// A network namespace held by a bind mount on a file (usually `<rundir>/netns`).
///
/// Dropping a `NetNs` does *not* remove the namespace: a value from [`NetNs::open`] (gc, ps)
/// must not tear anything down. The stage calls [`NetNs::remove`] at teardown.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
}

/// Name of the short-lived thread that creates a namespace (Linux keeps 15 bytes of a name).
const CREATE_THREAD: &str = "stagehand-nsnew";
/// Name of the threads [`run_in`] starts.
const RUN_IN_THREAD: &str = "stagehand-nsrun";

impl NetNs {
    /// Creates a new network namespace with `lo` up and bind-mounts it onto `path`, which must
    /// not exist yet (its directory must). Blocks the caller for the few milliseconds the
    /// creating thread runs; from async code call it in `spawn_blocking`.
    pub fn create(path: &Path) -> Result<NetNs, NetError> {
        // create_new: never mount over something that is already there (a stale netns of a
        // crashed run would be mounted on it; gc removes that one).
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(path)
            .map_err(|source| NetError::CreateFile {
                path: path.to_owned(),
                source,
            })?;
        let target = path.to_owned();
        let result = std::thread::Builder::new()
            .name(CREATE_THREAD.into())
            .spawn(move || create_on_this_thread(&target))
            .map_err(|source| NetError::Thread {
                name: CREATE_THREAD,
                source,
            })
            .and_then(|handle| {
                handle.join().map_err(|_| NetError::ThreadDied {
                    name: CREATE_THREAD,
                })?
            });
        match result {
            Ok(()) => {
                tracing::debug!(path = %path.display(), "created network namespace");
                Ok(NetNs {
                    path: path.to_owned(),
                })
            }
            Err(err) => {
                // Nothing was mounted (the mount is the last step), so only the file is left.
                let _ = std::fs::remove_file(path);
                Err(err)
            }
        }
    }

    /// Opens an existing namespace file, checking that a namespace is mounted on it.
    pub fn open(path: &Path) -> Result<NetNs, NetError> {
        let ns = NetNs {
            path: path.to_owned(),
        };
        ns.fd()?;
        Ok(ns)
    }

    /// The namespace file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fresh `O_RDONLY|O_CLOEXEC` fd of the namespace, for `setns` in a child's `pre_exec`.
    /// Fails with [`NetError::NotNamespace`] if the namespace was unmounted meanwhile.
    pub fn fd(&self) -> Result<OwnedFd, NetError> {
        open_ns(&self.path)
    }

    /// Unmounts (lazily, `MNT_DETACH`) and deletes the namespace file. The namespace itself
    /// disappears when its last user (a process, a socket, a slirp4netns) is gone.
    pub fn remove(self) -> Result<(), NetError> {
        remove_path(&self.path)
    }
}

/// Unmounts and deletes a namespace file; succeeds if it is already gone or not mounted.
/// Used by teardown and by gc, which only knows the path from `state.json`.
pub fn remove_path(path: &Path) -> Result<(), NetError> {
    // A file could carry stacked mounts (a crashed create retried by hand): detach until the
    // kernel says it is not a mount point any more. The bound avoids looping on a kernel that
    // keeps answering success for some other reason.
    for _ in 0..16 {
        match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(Errno::EINVAL | Errno::ENOENT) => break,
            Err(source) => {
                return Err(NetError::Unmount {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(NetError::Remove {
                path: path.to_owned(),
                source,
            });
        }
    }
    tracing::debug!(path = %path.display(), "removed network namespace");
    Ok(())
}

/// Runs `f` on a fresh std thread that entered `ns`, and returns its result. Sockets created
/// by `f` live in `ns` for good. A panic in `f` is resumed in the caller.
/// Blocks the caller until `f` returns: from async code wrap it in `spawn_blocking`.
pub fn run_in<T: Send>(ns: &NetNs, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
    let fd = ns.fd()?;
    let path = ns.path();
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(RUN_IN_THREAD.into())
            .spawn_scoped(scope, move || {
                enter_current_thread(fd, path)?;
                Ok(f())
            })
            .map_err(|source| NetError::Thread {
                name: RUN_IN_THREAD,
                source,
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Moves the calling thread into the namespace `fd` (of the file `path`, for messages).
/// Only for dedicated std threads: never a tokio worker or blocking-pool thread.
pub(crate) fn enter_current_thread(fd: OwnedFd, path: &Path) -> Result<(), NetError> {
    nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|source| NetError::Setns {
        path: path.to_owned(),
        source,
    })
}

/// Body of the creating thread: new netns, lo up, bind mount. Runs on a thread that dies
/// right after, so the process's other threads keep the host namespace.
fn create_on_this_thread(path: &Path) -> Result<(), NetError> {
    nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NetError::Unshare {
        path: path.to_owned(),
        source,
    })?;
    sys::loopback_up().map_err(|source| NetError::LoopbackUp {
        path: path.to_owned(),
        source,
    })?;
    // /proc/thread-self, not /proc/self: the namespace belongs to this thread only.
    nix::mount::mount(
        Some("/proc/thread-self/ns/net"),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(|source| NetError::Mount {
        path: path.to_owned(),
        source,
    })
}

/// Opens a namespace file and checks that nsfs is mounted on it (an empty regular file
/// left by a crash would otherwise make `setns` fail later with a vaguer EINVAL).
fn open_ns(path: &Path) -> Result<OwnedFd, NetError> {
    // std opens with O_CLOEXEC.
    let file = std::fs::File::open(path).map_err(|source| NetError::Open {
        path: path.to_owned(),
        source,
    })?;
    let fs = nix::sys::statfs::fstatfs(&file).map_err(|errno| NetError::Open {
        path: path.to_owned(),
        source: errno.into(),
    })?;
    if fs.filesystem_type() != nix::sys::statfs::NSFS_MAGIC {
        return Err(NetError::NotNamespace {
            path: path.to_owned(),
        });
    }
    Ok(file.into())
}

#[allow(unsafe_code)]
mod sys {
    //! The one ioctl the namespace setup needs, with no safe wrapper in nix or std.

    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// Sets IFF_UP on `lo` of the calling thread's network namespace, like `ip link set lo up`,
    /// through SIOCGIFFLAGS/SIOCSIFFLAGS on a throwaway socket (see netdevice(7)).
    pub(super) fn loopback_up() -> io::Result<()> {
        // SAFETY: socket(2) takes no pointers; a negative return is checked below.
        let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd owned by nobody else; OwnedFd closes it exactly once.
        let sock = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ifreq is a plain C struct (a name array and a union of integers, sockaddrs
        // and a raw pointer), for which all-zero bytes are a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS reads the NUL-terminated ifr_name and writes ifr_flags inside
        // `req`, which is a valid, exclusively borrowed ifreq for the whole call.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: SIOCGIFFLAGS succeeded, so the kernel initialised the ifru_flags member.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
        if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};

    /// Fails (never skips) when not root: these tests need real namespaces.
    pub(crate) fn require_root() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test creates network namespaces and must run as root"
        );
    }

    /// A tempdir named `stagehand-net-*` holding one namespace, removed on drop (also when
    /// the test panics). Field order matters: the namespace goes before the directory.
    pub(crate) struct NsGuard {
        pub(crate) ns: Option<NetNs>,
        pub(crate) dir: tempfile::TempDir,
    }

    impl NsGuard {
        pub(crate) fn new() -> NsGuard {
            require_root();
            let dir = tempfile::Builder::new()
                .prefix("stagehand-net-")
                .tempdir()
                .unwrap();
            let ns = NetNs::create(&dir.path().join("netns")).unwrap();
            NsGuard { ns: Some(ns), dir }
        }

        pub(crate) fn ns(&self) -> &NetNs {
            self.ns.as_ref().unwrap()
        }
    }

    impl Drop for NsGuard {
        fn drop(&mut self) {
            if let Some(ns) = self.ns.take() {
                let _ = ns.remove();
            }
        }
    }

    /// Mount points in this process's mount namespace under `dir`.
    pub(crate) fn mounts_under(dir: &Path) -> Vec<String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        let prefix = dir.to_str().unwrap();
        mounts
            .lines()
            .filter_map(|line| line.split(' ').nth(1))
            .filter(|target| target.starts_with(prefix))
            .map(str::to_owned)
            .collect()
    }

    fn localhost(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[test]
    fn create_mounts_nsfs_and_remove_unmounts_and_deletes() {
        let mut guard = NsGuard::new();
        let path = guard.ns().path().to_owned();
        assert_eq!(mounts_under(guard.dir.path()), [path.to_str().unwrap()]);

        // A second handle to the same namespace, as gc would get.
        let opened = NetNs::open(&path).unwrap();
        let ours = nix::sys::stat::fstat(guard.ns().fd().unwrap()).unwrap();
        let theirs = nix::sys::stat::fstat(opened.fd().unwrap()).unwrap();
        assert_eq!(ours.st_ino, theirs.st_ino, "open() sees the same namespace");
        let host = nix::sys::stat::stat("/proc/self/ns/net").unwrap();
        assert_ne!(
            ours.st_ino, host.st_ino,
            "the stage namespace is not the host's"
        );

        guard.ns.take().unwrap().remove().unwrap();
        assert!(mounts_under(guard.dir.path()).is_empty());
        assert!(!path.exists());
        // gc on something already removed is fine.
        remove_path(&path).unwrap();
        assert!(matches!(NetNs::open(&path), Err(NetError::Open { .. })));
    }

    #[test]
    fn create_refuses_an_existing_file_and_open_refuses_a_plain_file() {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("stagehand-net-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("netns");
        std::fs::write(&path, "").unwrap();
        assert!(matches!(
            NetNs::create(&path),
            Err(NetError::CreateFile { .. })
        ));
        assert!(matches!(
            NetNs::open(&path),
            Err(NetError::NotNamespace { .. })
        ));
        // remove_path on an unmounted file just deletes it.
        remove_path(&path).unwrap();
        assert!(!path.exists());
        assert!(mounts_under(dir.path()).is_empty());
    }

    #[test]
    fn loopback_is_up_inside() {
        let guard = NsGuard::new();
        let echoed = run_in(guard.ns(), || {
            let listener = TcpListener::bind(localhost(0)).unwrap();
            let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (mut server, _) = listener.accept().unwrap();
            client.write_all(b"ping").unwrap();
            let mut buf = [0u8; 4];
            server.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
        assert_eq!(&echoed, b"ping");
    }

    #[test]
    fn ports_are_isolated_both_ways() {
        let guard = NsGuard::new();
        // A listener inside the namespace on some port P.
        let inside = run_in(guard.ns(), || TcpListener::bind(localhost(0)).unwrap()).unwrap();
        inside.set_nonblocking(true).unwrap();
        let port = inside.local_addr().unwrap().port();

        // The host can bind the very same port: separate port spaces.
        let outside = TcpListener::bind(localhost(port)).expect("P is free on the host");
        outside.set_nonblocking(true).unwrap();

        // Host -> P reaches the host listener only.
        let _c1 = TcpStream::connect(localhost(port)).unwrap();
        wait_accept(&outside);
        assert_no_pending(&inside);

        // Namespace -> P reaches the namespace listener only.
        let _c2 = run_in(guard.ns(), || TcpStream::connect(localhost(port)).unwrap()).unwrap();
        wait_accept(&inside);
        assert_no_pending(&outside);

        // With the host listener gone, the namespace listener is not reachable from the host.
        drop(outside);
        let err = TcpStream::connect(localhost(port)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);

        // And a host-only port is not reachable from inside.
        let host_only = TcpListener::bind(localhost(0)).unwrap();
        let host_port = host_only.local_addr().unwrap().port();
        let from_inside = run_in(guard.ns(), || TcpStream::connect(localhost(host_port))).unwrap();
        if host_port != port {
            assert_eq!(
                from_inside.unwrap_err().kind(),
                io::ErrorKind::ConnectionRefused
            );
        }
    }

    fn wait_accept(listener: &TcpListener) {
        for _ in 0..200 {
            match listener.accept() {
                Ok(_) => return,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(err) => panic!("accept: {err}"),
            }
        }
        panic!("no connection arrived");
    }

    fn assert_no_pending(listener: &TcpListener) {
        let err = listener.accept().map(|_| ()).unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::WouldBlock,
            "unexpected connection"
        );
    }

    #[test]
    fn run_in_resumes_panics_and_reports_bad_namespaces() {
        let guard = NsGuard::new();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_in(guard.ns(), || -> u8 { panic!("boom inside") })
        }));
        assert!(caught.is_err(), "the panic reaches the caller");

        let gone = NetNs {
            path: guard.dir.path().join("missing"),
        };
        assert!(matches!(run_in(&gone, || ()), Err(NetError::Open { .. })));
    }
}
