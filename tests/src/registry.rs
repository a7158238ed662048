//! Helpers for the registry suite (`tests/tests/registry_e2e.rs`): a real registry on the
//! loopback, pushing to it with skopeo, a proxy in front of it that cuts blob downloads, and
//! the checks that an image store holds nothing half-written.
//!
//! Owns: starting Debian's `docker-registry` (distribution 2.8) as a plain background process
//! with its own config (storage in a temp dir, `127.0.0.1:<free port>`, its access log in a
//! file) and stopping it by pid, also when a test fails; counting the requests its access log
//! shows; `skopeo copy` of an oci-archive into it; [`CuttingProxy`]; [`assert_store_clean`].
//! Does not own: building images or running `stagehand image` and `stagehand run`
//! ([`crate::images`], [`crate::e2e`]), or what a test asserts about stagehand's output.
//!
//! The registry's temp dir is named `stagehand-e2e-registry-*` and carries no test marker on
//! purpose: the registry is not stagehand's child, so the marker leak checks must not find it.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

/// Where Debian's `docker-registry` package puts the registry.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// How long the registry may take to answer `GET /v2/` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// How long a `skopeo copy` may take.
const PUSH_TIMEOUT: Duration = Duration::from_secs(60);

/// Panic, naming the packages, unless the registry and skopeo are installed.
pub fn require_registry_tools() {
    let skopeo = Command::new("skopeo")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        Path::new(REGISTRY_BIN).is_file() && skopeo,
        "the registry suite needs {REGISTRY_BIN} and skopeo: apt-get install -y docker-registry skopeo (./dev test installs them)"
    );
}

/// A port on 127.0.0.1 nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A `docker-registry serve` on 127.0.0.1, stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Registry {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Registry {
    /// Start a registry with empty storage on a free port; returns once `GET /v2/` answers.
    pub fn start() -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("stagehand-e2e-registry-")
            .tempdir()
            .expect("create the registry's temp dir");
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage).expect("create the registry storage");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .expect("write the registry config");
        let log = std::fs::File::create(dir.path().join("registry.log"))
            .expect("create the registry log");
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {REGISTRY_BIN}: {e}"));
        let mut reg = Registry {
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
        };
        reg.wait_ready();
        reg
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    panic!("the registry exited at start ({status}):\n{}", self.log());
                }
            }
            if http_get_status(self.addr, "/v2/") == Some(200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the registry on {} did not answer within {START_TIMEOUT:?}:\n{}",
                self.addr,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `127.0.0.1:<port>`, as an image reference spells the registry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// The registry's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything the registry logged (its access log included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// How many `METHOD PATH...` requests the access log shows whose path starts with
    /// `path_prefix` (e.g. `("GET", "/v2/lab/busybox/blobs/")`).
    pub fn requests(&self, method: &str, path_prefix: &str) -> usize {
        let needle = format!("\"{method} {path_prefix}");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// Stop the registry now (SIGTERM, SIGKILL after 5 s), by its pid.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The status code of `GET path` over HTTP/1.0, or `None` when there is no answer.
fn http_get_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// `skopeo copy` the oci-archive `archive` to `dest` (`host:port/repo:tag`, plain HTTP).
pub fn push(archive: &Path, dest: &str) {
    let mut child = Command::new("skopeo")
        .args([
            "--insecure-policy",
            "copy",
            "--quiet",
            "--dest-tls-verify=false",
        ])
        .arg(format!("oci-archive:{}", archive.display()))
        .arg(format!("docker://{dest}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start skopeo");
    let deadline = Instant::now() + PUSH_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for skopeo") {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("skopeo copy to {dest} took more than {PUSH_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "skopeo copy to {dest}: {status}\n{err}");
}

/// A TCP proxy on 127.0.0.1 in front of `upstream` that, for the first `times` responses to
/// a `GET .../blobs/...` request, forwards `cut_after` bytes (headers included) and then
/// closes both sides: a registry that drops the connection in the middle of a download.
/// Everything else passes untouched. Stopped when dropped.
pub struct CuttingProxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    cuts: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

/// What one proxied connection is doing: inside a blob response, and how far.
#[derive(Default)]
struct ConnState {
    in_blob: bool,
    sent: usize,
}

impl CuttingProxy {
    /// Start the proxy.
    pub fn start(upstream: SocketAddr, cut_after: usize, times: usize) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let budget = Arc::new(AtomicUsize::new(times));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let accept = {
            let (stop, cuts, conns) = (stop.clone(), cuts.clone(), conns.clone());
            std::thread::spawn(move || {
                for client in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                        conns
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .extend([c, s]);
                    }
                    proxy_connection(client, server, cut_after, budget.clone(), cuts.clone());
                }
            })
        };
        CuttingProxy {
            addr,
            stop,
            cuts,
            conns,
            accept: Some(accept),
        }
    }

    /// `127.0.0.1:<port>` of the proxy, to put in an image reference.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// How many responses were cut so far.
    pub fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// Two pumps: client → server notes which request is in flight (the client sends one at a
/// time on a connection, HTTP/1.1 without pipelining); server → client counts the bytes of a
/// blob response and cuts it.
fn proxy_connection(
    client: TcpStream,
    server: TcpStream,
    cut_after: usize,
    budget: Arc<AtomicUsize>,
    cuts: Arc<AtomicUsize>,
) {
    let state = Arc::new(Mutex::new(ConnState::default()));
    let (Ok(mut c_read), Ok(mut s_write)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let st = state.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match c_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let text = String::from_utf8_lossy(&buf[..n]);
            for line in text.lines() {
                if line.starts_with("GET ") || line.starts_with("HEAD ") {
                    let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                    s.in_blob = line.starts_with("GET ") && line.contains("/blobs/");
                    s.sent = 0;
                }
            }
            if s_write.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = s_write.shutdown(Shutdown::Write);
    });
    let (mut s_read, mut c_write) = (server, client);
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let n = match s_read.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut chunk = &buf[..n];
            let mut cut = false;
            {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                if s.in_blob && s.sent + n >= cut_after && budget.load(Ordering::SeqCst) > 0 {
                    if budget
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                        .is_ok()
                    {
                        chunk = &buf[..cut_after.saturating_sub(s.sent)];
                        cut = true;
                    }
                }
                s.sent += chunk.len();
            }
            if c_write.write_all(chunk).is_err() {
                break;
            }
            if cut {
                cuts.fetch_add(1, Ordering::SeqCst);
                let _ = c_write.flush();
                let _ = c_write.shutdown(Shutdown::Both);
                let _ = s_read.shutdown(Shutdown::Both);
                return;
            }
        }
        let _ = c_write.shutdown(Shutdown::Write);
    });
}

/// The blob files of the image store at `root` (`blobs/sha256/<hex>`).
pub fn store_blobs(root: &Path) -> Vec<PathBuf> {
    let mut blobs: Vec<PathBuf> = std::fs::read_dir(root.join("blobs/sha256"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    blobs.sort();
    blobs
}

/// Panic unless every blob of the store at `root` hashes to its name and its temp dir is
/// empty: nothing half-written is visible.
pub fn assert_store_clean(root: &Path) {
    for blob in store_blobs(root) {
        let bytes = std::fs::read(&blob).unwrap_or_else(|e| panic!("read {}: {e}", blob.display()));
        let actual = format!("{:x}", Sha256::digest(&bytes));
        let name = blob
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        assert_eq!(
            actual,
            name,
            "blob {} does not hash to its name",
            blob.display()
        );
    }
    let tmp: Vec<PathBuf> = std::fs::read_dir(root.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        tmp.is_empty(),
        "the store {} has temp files left: {tmp:?}",
        root.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers every request with a fixed response, for the proxy test.
    fn fixed_server(response: Vec<u8>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let response = response.clone();
                std::thread::spawn(move || {
                    let mut c = c;
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = c.read(&mut buf) {
                        if n == 0 || c.write_all(&response).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    fn fetch(addr: SocketAddr, path: &str) -> Vec<u8> {
        let mut s = TcpStream::connect(addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    }

    #[test]
    fn the_proxy_cuts_only_blob_responses_and_only_as_often_as_told() {
        let body = vec![b'x'; 10_000];
        let mut response = b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n".to_vec();
        response.extend_from_slice(&body);
        let upstream = fixed_server(response.clone());
        let proxy = CuttingProxy::start(upstream, 1000, 1);
        assert_eq!(fetch(proxy.addr, "/v2/lab/x/manifests/latest"), response);
        assert_eq!(fetch(proxy.addr, "/v2/lab/x/blobs/sha256:ab").len(), 1000);
        assert_eq!(proxy.cuts(), 1);
        assert_eq!(fetch(proxy.addr, "/v2/lab/x/blobs/sha256:ab"), response);
        assert_eq!(proxy.cuts(), 1);
    }

    #[test]
    fn a_clean_store_passes_and_a_temp_file_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("blobs/sha256")).unwrap();
        std::fs::create_dir_all(root.join("tmp")).unwrap();
        let hex = format!("{:x}", Sha256::digest(b"blob"));
        std::fs::write(root.join("blobs/sha256").join(&hex), b"blob").unwrap();
        assert_store_clean(root);
        assert_eq!(store_blobs(root).len(), 1);
        std::fs::write(root.join("tmp/blob-1"), b"half").unwrap();
        let r = std::panic::catch_unwind(|| assert_store_clean(root));
        assert!(r.is_err());
    }
}
