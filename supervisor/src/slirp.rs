//! Outbound connectivity for a stage namespace through `slirp4netns` (user-mode TCP/IP).
//!
//! Owns: the slirp4netns command line, its readiness pipe and waiting for it.
//! Does not own: spawning, supervising and killing slirp4netns (the process layer does that
//! like for any other stage process) or the namespace itself ([`crate::netns`]).
//!
//! Why slirp4netns: it needs no veth, bridge, iptables or sysctl, and works rootless (given
//! access to `/dev/net/tun`). With `--configure` it creates `tap0` in the namespace with
//! 10.0.2.100/24 and a default route via 10.0.2.2. Inside the stage:
//! - the host's 127.0.0.1 is reachable as **10.0.2.2** ([`HOST_LOOPBACK`]), because we do not
//!   pass `--disable-host-loopback` (services the runner started on the host are reachable);
//! - DNS is at **10.0.2.3** ([`DNS`]), forwarded to the host's resolver; the stage's
//!   resolv.conf must name it ([`crate::hosts::resolv_conf_for_slirp`]).
//!
//! See slirp4netns(1). slirp4netns writes `1` on `--ready-fd` once the interface is configured,
//! then closes it.

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::poll::{PollFd, PollFlags, PollTimeout};

use crate::netns::NetError;

/// Address of the host's loopback as seen from inside the stage namespace.
pub const HOST_LOOPBACK: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// Address of slirp4netns's DNS forwarder inside the stage namespace.
pub const DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// Name of the tap device slirp4netns creates inside the namespace.
pub const TAP_DEVICE: &str = "tap0";
/// MTU of the tap device. 65520 (not the default 1500) is what rootlesskit and podman use:
/// much higher throughput, since slirp copies packets in userspace.
pub const MTU: u32 = 65520;

/// The slirp4netns command line for the namespace mounted at `netns`:
/// `slirp4netns --configure --mtu=65520 --ready-fd=FD --netns-type=path NETNS tap0`.
/// `ready_fd` is the fd number *in the child* where the write end of [`ready_pipe`] is placed.
pub fn argv(binary: &Path, netns: &Path, ready_fd: i32) -> Vec<OsString> {
    vec![
        binary.into(),
        "--configure".into(),
        format!("--mtu={MTU}").into(),
        format!("--ready-fd={ready_fd}").into(),
        "--netns-type=path".into(),
        netns.into(),
        TAP_DEVICE.into(),
    ]
}

/// A pipe for `--ready-fd`: `(read end, write end)`, both `O_CLOEXEC`. The spawner places the
/// write end at the child's `ready_fd` (dup2 clears close-on-exec on the copy) and must then
/// drop its own write end, so that [`wait_ready`] sees end-of-file if slirp4netns dies early.
pub fn ready_pipe() -> Result<(OwnedFd, OwnedFd), NetError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|errno| NetError::ReadyPipe {
        source: errno.into(),
    })
}

/// Blocks until slirp4netns reports ready on `ready` (the read end of [`ready_pipe`]), it
/// exits (end-of-file: [`NetError::SlirpExited`]), or `timeout` passes. From async code use
/// [`wait_ready_async`].
pub fn wait_ready(ready: &OwnedFd, timeout: Duration) -> Result<(), NetError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up so that a sub-millisecond remainder still waits instead of spinning; cap
        // at u16 (65 s) per poll, the loop covers longer timeouts.
        let ms = left.as_micros().div_ceil(1000).min(u128::from(u16::MAX)) as u16;
        let mut fds = [PollFd::new(ready.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) if left.is_zero() => return Err(NetError::SlirpTimeout { timeout }),
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(errno) => {
                return Err(NetError::ReadyPipe {
                    source: errno.into(),
                });
            }
        }
        let mut byte = [0u8; 1];
        match nix::unistd::read(ready, &mut byte) {
            Ok(0) => return Err(NetError::SlirpExited),
            Ok(_) => return check_ready_byte(byte[0]),
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(errno) => {
                return Err(NetError::ReadyPipe {
                    source: errno.into(),
                });
            }
        }
    }
}

/// Async form of [`wait_ready`]; must be called inside a tokio runtime.
pub async fn wait_ready_async(ready: OwnedFd, timeout: Duration) -> Result<(), NetError> {
    use tokio::io::AsyncReadExt;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(ready)
        .map_err(|source| NetError::ReadyPipe { source })?;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(timeout, pipe.read(&mut byte)).await {
        Err(_) => Err(NetError::SlirpTimeout { timeout }),
        Ok(Ok(0)) => Err(NetError::SlirpExited),
        Ok(Ok(_)) => check_ready_byte(byte[0]),
        Ok(Err(source)) => Err(NetError::ReadyPipe { source }),
    }
}

fn check_ready_byte(byte: u8) -> Result<(), NetError> {
    if byte == b'1' {
        Ok(())
    } else {
        Err(NetError::SlirpBadReady { byte })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netns::run_in;
    use crate::netns::tests::{NsGuard, mounts_under};
    use crate::process::{Child, DEFAULT_PATH, OutputTarget, SpawnSpec, spawn, stop};
    use std::io::{self, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn argv_is_the_documented_command_line() {
        let argv = argv(
            Path::new("/usr/bin/slirp4netns"),
            Path::new("/run/stagehand/r1/netns"),
            3,
        );
        let argv: Vec<&str> = argv.iter().map(|a| a.to_str().unwrap()).collect();
        assert_eq!(
            argv,
            [
                "/usr/bin/slirp4netns",
                "--configure",
                "--mtu=65520",
                "--ready-fd=3",
                "--netns-type=path",
                "/run/stagehand/r1/netns",
                "tap0",
            ]
        );
        assert!(!argv.contains(&"--disable-host-loopback"));
    }

    #[test]
    fn wait_ready_reads_one_and_reports_exit_and_timeout() {
        let (read, write) = ready_pipe().unwrap();
        nix::unistd::write(&write, b"1").unwrap();
        wait_ready(&read, Duration::from_secs(1)).unwrap();

        let (read, write) = ready_pipe().unwrap();
        let started = Instant::now();
        let err = wait_ready(&read, Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, NetError::SlirpTimeout { .. }), "{err}");
        assert!(started.elapsed() >= Duration::from_millis(50));
        drop(write);
        let err = wait_ready(&read, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, NetError::SlirpExited), "{err}");

        let (read, write) = ready_pipe().unwrap();
        nix::unistd::write(&write, b"x").unwrap();
        let err = wait_ready(&read, Duration::from_secs(1)).unwrap_err();
        assert!(
            matches!(err, NetError::SlirpBadReady { byte: b'x' }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn wait_ready_async_reads_one_and_reports_exit_and_timeout() {
        let (read, write) = ready_pipe().unwrap();
        nix::unistd::write(&write, b"1").unwrap();
        wait_ready_async(read, Duration::from_secs(1))
            .await
            .unwrap();

        let (read, write) = ready_pipe().unwrap();
        let err = wait_ready_async(read, Duration::from_millis(20))
            .await
            .unwrap_err();
        assert!(matches!(err, NetError::SlirpTimeout { .. }), "{err}");

        let (read, write2) = ready_pipe().unwrap();
        drop((write, write2));
        let err = wait_ready_async(read, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, NetError::SlirpExited), "{err}");
    }

    /// Kills the slirp4netns this test started, also when the test fails. Through the
    /// reaper's `Child`, so the pid is never signalled after it was reaped (and reused).
    struct SlirpGuard(Option<Child>);

    impl Drop for SlirpGuard {
        fn drop(&mut self) {
            if let Some(child) = self.0.take() {
                let _ = child.signal_group(libc::SIGKILL);
                child.wait_blocking();
            }
        }
    }

    fn slirp_binary() -> &'static Path {
        let path = Path::new("/usr/bin/slirp4netns");
        assert!(
            path.exists(),
            "slirp4netns not found: install it (apt-get install -y slirp4netns)"
        );
        path
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn host_loopback_is_reachable_as_10_0_2_2_through_slirp() {
        let binary = slirp_binary();
        let mut guard = NsGuard::new();

        // A host-only echo server on 127.0.0.1.
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = server.local_addr().unwrap().port();
        let echo = std::thread::spawn(move || {
            let (mut conn, _) = server.accept().unwrap();
            let mut buf = [0u8; 5];
            conn.read_exact(&mut buf).unwrap();
            conn.write_all(&buf).unwrap();
        });

        // The write end goes to this child only, at its own number; our copy is closed once
        // the child started, so wait_ready would see EOF if slirp4netns died.
        let (read, write) = ready_pipe().unwrap();
        let args = argv(binary, guard.ns().path(), write.as_raw_fd());
        let mut spec = SpawnSpec::new(args, [("PATH", DEFAULT_PATH)], "/");
        spec.inherit_fds.push(write);
        spec.output = OutputTarget::Null;
        spec.process_group = true;
        spec.parent_death_signal = Some(libc::SIGKILL);
        let mut slirp = SlirpGuard(Some(spawn(spec).unwrap()));
        wait_ready(&read, Duration::from_secs(10)).unwrap();

        let ns = guard.ns();
        let reply = tokio::task::block_in_place(|| {
            run_in(ns, || -> io::Result<[u8; 5]> {
                let mut conn = TcpStream::connect_timeout(
                    &SocketAddr::from((HOST_LOOPBACK, port)),
                    Duration::from_secs(10),
                )?;
                conn.set_read_timeout(Some(Duration::from_secs(10)))?;
                conn.write_all(b"hello")?;
                let mut buf = [0u8; 5];
                conn.read_exact(&mut buf)?;
                Ok(buf)
            })
        })
        .unwrap()
        .unwrap();
        assert_eq!(&reply, b"hello");
        echo.join().unwrap();

        // Teardown order of a stage: stop slirp4netns, then remove the namespace.
        let child = slirp.0.take().unwrap();
        let status = stop(&child, libc::SIGTERM, Duration::from_secs(2)).await;
        assert!(
            status.signal == Some(libc::SIGTERM) || status.success(),
            "slirp4netns ended with {status}"
        );
        assert_eq!(child.try_status(), Some(status));
        guard.ns.take().unwrap().remove().unwrap();
        assert!(mounts_under(guard.dir.path()).is_empty());
    }
}
