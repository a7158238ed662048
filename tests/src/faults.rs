//! Helpers for the reliability suites (`tests/tests/faults_e2e.rs`, `tests/tests/load_e2e.rs`):
//! the faults a test injects and the checks that nothing was left half done.
//!
//! Owns: a small tmpfs image store (a full disk on demand, unmounted when dropped), copying a
//! store's content without its layer cache, finding and corrupting an image's layer blob, the
//! "store is still consistent" check (`image ls` works, every blob hashes to its name, no temp
//! file, no half-unpacked layer), a registry that accepts connections and never answers, a
//! scratch root filesystem with one large file (an image whose first unpack takes seconds),
//! a fake OCI runtime that fails, stagehand's open file descriptors, and the generated load
//! pipelines (`tests/pipelines/load-*.yaml`, checked in and compared with their generator).
//! Does not own: starting stagehand, markers and process leak checks ([`crate::e2e`]), the
//! stage and container-run checks ([`crate::sandbox`], [`crate::images`]), the suite's
//! busybox store ([`crate::images::suite_store`]), or what a test asserts about the output.
//!
//! Everything a helper creates on the system is named `stagehand-e2e-*`, and the tmpfs mount
//! is detached by its guard, also when a test fails.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::mount::{MntFlags, MsFlags};

use crate::e2e::tests_dir;
use crate::images::image_cmd;
use crate::registry::assert_store_clean;

/// A tmpfs of a fixed size mounted at `<temp dir>/stagehand-e2e-tmpfs-*/disk`, holding an
/// image store (`disk/store`) whose disk fills up. The store is a directory on the tmpfs, not
/// the mount point itself, so a check for mounts left inside a store does not see the disk.
/// Dropping it detaches the mount (lazily, should a process still use it) and removes the
/// directory.
pub struct TmpfsStore {
    dir: Option<tempfile::TempDir>,
    disk: PathBuf,
    root: PathBuf,
    mounted: bool,
}

impl TmpfsStore {
    /// Mount a tmpfs of `size` (`6m`: tmpfs's own size syntax). Panics if the mount fails
    /// (the suite runs as root).
    pub fn mount(size: &str) -> TmpfsStore {
        let dir = tempfile::Builder::new()
            .prefix("stagehand-e2e-tmpfs-")
            .tempdir()
            .expect("create a dir for the tmpfs store");
        let disk = dir.path().join("disk");
        std::fs::create_dir(&disk).expect("create the tmpfs mount point");
        let mut guard = TmpfsStore {
            dir: Some(dir),
            root: disk.join("store"),
            disk,
            mounted: false,
        };
        nix::mount::mount(
            Some("stagehand-e2e-tmpfs"),
            &guard.disk,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("size={size},mode=0755").as_str()),
        )
        .unwrap_or_else(|e| panic!("mount a {size} tmpfs on {}: {e}", guard.disk.display()));
        guard.mounted = true;
        std::fs::create_dir(&guard.root).expect("create the store on the tmpfs");
        guard
    }

    /// The store directory (on the tmpfs).
    pub fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for TmpfsStore {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = nix::mount::umount2(&self.disk, MntFlags::MNT_DETACH) {
                eprintln!("faults: could not unmount {}: {e}", self.disk.display());
                // Removing the directory now would reach into the mount.
                if let Some(d) = self.dir.take() {
                    let _ = d.keep();
                }
                return;
            }
        }
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }
}

/// Copy the content of the image store `src` (blobs, `index.json`, `oci-layout`) into a new
/// store at `dst`, without the layer cache and the lock files: the copy unpacks its layers
/// again, from its own blobs.
pub fn copy_store(src: &Path, dst: &Path) {
    let blobs = dst.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap_or_else(|e| panic!("create {}: {e}", blobs.display()));
    for e in std::fs::read_dir(src.join("blobs/sha256")).expect("read the store's blobs") {
        let e = e.expect("a blob entry");
        std::fs::copy(e.path(), blobs.join(e.file_name()))
            .unwrap_or_else(|err| panic!("copy {}: {err}", e.path().display()));
    }
    for f in ["index.json", "oci-layout"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap_or_else(|e| panic!("copy {f}: {e}"));
    }
}

/// The layer blobs of `image` in `store`, base first, as `(digest, blob file)`, from
/// `stagehand image inspect`.
pub fn layer_blobs(marker: &str, store: &Path, image: &str) -> Vec<(String, PathBuf)> {
    let out = image_cmd(marker, store, &["inspect", image]);
    out.assert_code(0);
    let v: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("`image inspect` printed no JSON: {e}\n{}", out.dump()));
    v["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("`image inspect` lists no layers\n{}", out.dump()))
        .iter()
        .map(|l| {
            let digest = l["digest"].as_str().expect("a layer digest").to_string();
            let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
            let path = store.join("blobs/sha256").join(hex);
            (digest, path)
        })
        .collect()
}

/// Invert the byte in the middle of `path`: the file keeps its name and size, its content no
/// longer hashes to it.
pub fn flip_middle_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(!bytes.is_empty(), "{} is empty", path.display());
    let i = bytes.len() / 2;
    bytes[i] ^= 0xff;
    std::fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// The layer cache entries of `store` that hold an unpacked tree (`layers/<hex>/root`)
/// without the `done` marker written after a complete, verified unpack.
pub fn half_unpacked_layers(store: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(store.join("layers"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|d| d.join("root").exists() && !d.join("done").is_file())
        .collect()
}

/// Panic unless the image store at `store` is consistent: `stagehand image ls` works (and so
/// does `image inspect` of every name it lists, which re-hashes manifest and config), every
/// blob hashes to its name, `tmp/` is empty, and no layer is half unpacked. Returns the
/// names `image ls` listed.
pub fn assert_store_consistent(marker: &str, store: &Path) -> Vec<String> {
    let ls = image_cmd(marker, store, &["ls"]);
    ls.assert_code(0);
    let names: Vec<String> = ls
        .stdout
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    for name in &names {
        image_cmd(marker, store, &["inspect", name.as_str()]).assert_code(0);
    }
    assert_store_clean(store);
    let half = half_unpacked_layers(store);
    assert!(
        half.is_empty(),
        "the store {} has layers unpacked only in part: {half:#?}",
        store.display()
    );
    names
}

/// Copy the busybox root filesystem `src` (symlinks as symlinks) to `dst` and add `/big`, a
/// file of `size` bytes: an image whose first unpack takes a while.
pub fn rootfs_with_big_file(src: &Path, dst: &Path, size: usize) {
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .expect("run cp -a");
    assert!(
        status.success(),
        "cp -a {} {}: {status}",
        src.display(),
        dst.display()
    );
    // Not all zeros, so no filesystem keeps it sparse.
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut f = std::fs::File::create(dst.join("big")).expect("create /big");
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len());
        f.write_all(&chunk[..n]).expect("write /big");
        left -= n;
    }
}

/// Write an executable "OCI runtime" at `path` that prints `message` on stderr and exits 1,
/// whatever it is asked to do.
pub fn failing_runtime(path: &Path, message: &str) {
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\necho '{}' >&2\nexit 1\n",
            message.replace('\'', "")
        ),
    )
    .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A "registry" on 127.0.0.1 that accepts every connection and never says a word: a pull
/// against it hangs until its own timeouts give up. Stopped (every connection closed) when
/// dropped.
pub struct SilentRegistry {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl SilentRegistry {
    /// Start listening on a free port.
    pub fn start() -> SilentRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let thread = {
            let (stop, accepted, conns) = (stop.clone(), accepted.clone(), conns.clone());
            std::thread::spawn(move || {
                for c in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    if let Ok(c) = c {
                        accepted.fetch_add(1, Ordering::SeqCst);
                        conns.lock().unwrap_or_else(|e| e.into_inner()).push(c);
                    }
                }
            })
        };
        SilentRegistry {
            addr,
            stop,
            accepted,
            conns,
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:<port>`, as an image reference spells the registry.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for SilentRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = c.shutdown(Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How many file descriptors process `pid` has open (entries of `/proc/<pid>/fd`).
pub fn open_fds(pid: i32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

/// How many Background services `load-services.yaml` starts.
pub const LOAD_SERVICES: usize = 50;
/// How many of them are HTTP servers with a tcp health check (the rest are `sleep`s).
pub const LOAD_PROBED_SERVICES: usize = 5;
/// How many stages `load-stages.yaml` runs in a row.
pub const LOAD_STAGES: usize = 20;
/// How many steps the `parallel` block of `load-parallel.yaml` holds.
pub const LOAD_PARALLEL_STEPS: usize = 200;
/// The host port every stage of `load-stages.yaml` publishes in turn.
pub const LOAD_STAGES_PORT: u16 = 18620;

const GENERATED: &str = "# Generated by stagehand_e2e::faults (tests/src/faults.rs); the load suite checks that this\n\
    # file matches its generator. After changing the generator, regenerate with\n\
    # STAGEHAND_E2E_REGENERATE=1 cargo test -p stagehand-e2e --lib faults\n";

fn pipeline_head(id: &str, name: &str, what: &str) -> String {
    format!("{GENERATED}#\n{what}\npipeline:\n  name: {name}\n  identifier: {id}\n  stages:\n")
}

/// `load-services.yaml`: one stage with [`LOAD_SERVICES`] Background services ([`LOAD_PROBED_SERVICES`]
/// python HTTP servers on 8001.. with tcp health checks, the rest `sleep`s), then a Run step
/// that waits for all of them and checks every HTTP server answers.
pub fn load_services_yaml() -> String {
    let mut y = pipeline_head(
        "load_services",
        "load services",
        "# One stage with 50 Background services: 5 HTTP servers with tcp health checks, 45 sleeps.\n\
         # `check` waits for all of them (it depends on every service started before it), then\n\
         # fetches a page from each server. `marker` (set with --var) tags every argv.",
    );
    y.push_str(
        "    - stage:\n        identifier: services\n        name: services\n        type: CI\n        variables:\n          - name: marker\n            type: String\n            value: unset\n        spec:\n          execution:\n            steps:\n",
    );
    for i in 1..=LOAD_SERVICES {
        let id = format!("svc_{i:02}");
        y.push_str(&format!(
            "              - step:\n                  identifier: {id}\n                  name: {id}\n                  type: Background\n                  spec:\n"
        ));
        if i <= LOAD_PROBED_SERVICES {
            let port = 8000 + i;
            y.push_str(&format!(
                "                    entrypoint: [sh, -c, 'exec python3 -m http.server {port} --bind 127.0.0.1', <+stage.variables.marker>]\n                    healthCheck:\n                      tcp: {port}\n"
            ));
        } else {
            y.push_str(
                "                    entrypoint: [sh, -c, 'exec sleep 300', <+stage.variables.marker>]\n",
            );
        }
    }
    y.push_str("              - step:\n                  identifier: check\n                  name: check\n                  type: Run\n                  spec:\n                    shell: Sh\n                    command: |\n");
    y.push_str(&format!(
        "                      for p in $(seq 8001 {}); do\n                        python3 -c \"import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:%s/' % sys.argv[1], timeout=5)\" $p\n                      done\n                      echo \"all {} servers answered\"\n",
        8000 + LOAD_PROBED_SERVICES,
        LOAD_PROBED_SERVICES
    ));
    y
}

/// `load-stages.yaml`: [`LOAD_STAGES`] stages in a row, each with an HTTP server published on
/// the host's [`LOAD_STAGES_PORT`] and a Run step that fetches a page through the stage and
/// prints `stage N fds F`, F being stagehand's open file descriptors at that point.
pub fn load_stages_yaml() -> String {
    let mut y = pipeline_head(
        "load_stages",
        "load stages",
        "# 20 stages in a row. Each: `web_NN`, an HTTP server published on the host's 127.0.0.1:18620\n\
         # (so a forwarder left by one stage makes the next fail), and `probe_NN`, which fetches a\n\
         # page and prints how many file descriptors stagehand has open (the test writes\n\
         # stagehand's pid to `stagehand.pid` in the workspace). Step ids differ per stage, so a\n\
         # descriptor held per step (a log file) would add up. `marker` (--var) tags every argv.",
    );
    for i in 1..=LOAD_STAGES {
        let n = format!("{i:02}");
        y.push_str(&format!(
            "    - stage:\n        identifier: s{n}\n        name: s{n}\n        type: CI\n        variables:\n          - name: marker\n            type: String\n            value: unset\n        spec:\n          execution:\n            steps:\n\
             \x20             - step:\n                  identifier: web_{n}\n                  name: web\n                  type: Background\n                  spec:\n                    entrypoint: [sh, -c, 'exec python3 -m http.server 8080 --bind 127.0.0.1', <+stage.variables.marker>]\n                    portBindings:\n                      \"{LOAD_STAGES_PORT}\": \"8080\"\n                    healthCheck:\n                      tcp: 8080\n\
             \x20             - step:\n                  identifier: probe_{n}\n                  name: probe\n                  type: Run\n                  spec:\n                    shell: Sh\n                    command: |\n\
             \x20                     python3 -c \"import urllib.request; urllib.request.urlopen('http://web_{n}:8080/', timeout=5)\"\n\
             \x20                     i=0\n\
             \x20                     until [ -s stagehand.pid ]; do i=$((i+1)); [ $i -lt 200 ] || exit 7; sleep 0.05; done\n\
             \x20                     echo \"stage {i} fds $(ls /proc/$(cat stagehand.pid)/fd | wc -l)\"\n"
        ));
    }
    y
}

/// `load-parallel.yaml`: one `parallel` block of [`LOAD_PARALLEL_STEPS`] Run steps, each
/// printing its number, then a step after the block.
pub fn load_parallel_yaml() -> String {
    let mut y = pipeline_head(
        "load_parallel",
        "load parallel",
        "# One `parallel` block of 200 Run steps on the host, each echoing its number, then `after`.\n\
         # `marker` (set with --var) is part of every step's environment.",
    );
    y.push_str(
        "    - stage:\n        identifier: wide\n        name: wide\n        type: CI\n        variables:\n          - name: marker\n            type: String\n            value: unset\n        spec:\n          execution:\n            steps:\n              - parallel:\n",
    );
    for i in 1..=LOAD_PARALLEL_STEPS {
        y.push_str(&format!(
            "                  - step:\n                      identifier: p{i:03}\n                      name: p{i:03}\n                      type: Run\n                      spec:\n                        shell: Sh\n                        command: echo \"step {i} done\"\n"
        ));
    }
    y.push_str("              - step:\n                  identifier: after\n                  name: after\n                  type: Run\n                  spec:\n                    shell: Sh\n                    command: echo \"after the block\"\n");
    y
}

/// The checked-in `tests/pipelines/NAME`, after checking it is what `generated` says; with
/// `STAGEHAND_E2E_REGENERATE=1` it is (re)written from `generated` first.
pub fn generated_pipeline(name: &str, generated: &str) -> PathBuf {
    let path = tests_dir().join("pipelines").join(name);
    if std::env::var_os("STAGEHAND_E2E_REGENERATE").is_some() {
        std::fs::write(&path, generated)
            .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == generated,
        "{} is not what its generator in tests/src/faults.rs writes; regenerate it with \
         STAGEHAND_E2E_REGENERATE=1 cargo test -p stagehand-e2e --lib faults",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Duration;

    #[test]
    fn load_pipelines_match_their_generators() {
        for (name, text) in [
            ("load-services.yaml", load_services_yaml()),
            ("load-stages.yaml", load_stages_yaml()),
            ("load-parallel.yaml", load_parallel_yaml()),
        ] {
            generated_pipeline(name, &text);
        }
    }

    #[test]
    fn generated_pipelines_have_the_steps_they_promise() {
        let services = load_services_yaml();
        assert_eq!(services.matches("type: Background").count(), LOAD_SERVICES);
        assert_eq!(services.matches("tcp: ").count(), LOAD_PROBED_SERVICES);
        let stages = load_stages_yaml();
        assert_eq!(stages.matches("- stage:").count(), LOAD_STAGES);
        assert_eq!(
            stages
                .matches(&format!("\"{LOAD_STAGES_PORT}\": \"8080\""))
                .count(),
            LOAD_STAGES
        );
        let parallel = load_parallel_yaml();
        assert_eq!(parallel.matches("- parallel:").count(), 1);
        assert_eq!(
            parallel.matches("type: Run").count(),
            LOAD_PARALLEL_STEPS + 1
        );
    }

    #[test]
    fn tmpfs_store_fills_up_and_is_gone_after_drop() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "mounting a tmpfs needs root (the e2e suites run as root)"
        );
        let t = TmpfsStore::mount("1m");
        let root = t.root().to_path_buf();
        let disk = root.parent().unwrap().to_path_buf();
        let mounted = |p: &Path| {
            std::fs::read_to_string("/proc/mounts")
                .unwrap()
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(p.to_str().unwrap()))
        };
        assert!(mounted(&disk) && !mounted(&root));
        let err = std::fs::write(root.join("f"), vec![1u8; 2 << 20]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        drop(t);
        assert!(!mounted(&disk));
        assert!(!disk.exists());
    }

    #[test]
    fn flipping_a_byte_changes_the_content_not_the_size() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("blob");
        std::fs::write(&f, b"abcde").unwrap();
        flip_middle_byte(&f);
        let after = std::fs::read(&f).unwrap();
        assert_eq!(after.len(), 5);
        assert_eq!(after[2], b'c' ^ 0xff);
        assert_eq!(&after[..2], b"ab");
    }

    #[test]
    fn half_unpacked_layers_are_trees_without_a_marker() {
        let dir = tempfile::tempdir().unwrap();
        let layers = dir.path().join("layers");
        for (name, root, done) in [("a", true, true), ("b", true, false), ("c", false, false)] {
            std::fs::create_dir_all(layers.join(name)).unwrap();
            if root {
                std::fs::create_dir(layers.join(name).join("root")).unwrap();
            }
            if done {
                std::fs::write(layers.join(name).join("done"), b"{}").unwrap();
            }
        }
        assert_eq!(half_unpacked_layers(dir.path()), [layers.join("b")]);
    }

    #[test]
    fn the_silent_registry_accepts_and_says_nothing() {
        let r = SilentRegistry::start();
        let port: u16 = r.host().rsplit(':').next().unwrap().parse().unwrap();
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut buf = [0u8; 16];
        let err = s.read(&mut buf).unwrap_err();
        assert!(
            matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{err}"
        );
        assert_eq!(r.accepted(), 1);
        drop(r);
        // Closed by the drop: the read ends.
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }

    #[test]
    fn a_failing_runtime_says_so_and_exits_1() {
        let dir = tempfile::tempdir().unwrap();
        let rt = dir.path().join("rt");
        failing_runtime(&rt, "broken on purpose");
        let out = std::process::Command::new(&rt).arg("run").output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        assert_eq!(String::from_utf8_lossy(&out.stderr), "broken on purpose\n");
    }

    /// A `sleep` with `extra` more descriptors than it inherits, once it has exec'd.
    fn sleeper(extra: usize) -> std::process::Child {
        let redirs: Vec<String> = (0..extra).map(|i| format!("{}</dev/null", 7 + i)).collect();
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("exec sleep 30 {}", redirs.join(" ")))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Until then it may still hold the parent's close-on-exec descriptors.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        while !std::fs::read(&cmdline)
            .unwrap_or_default()
            .starts_with(b"sleep\0")
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        child
    }

    #[test]
    fn open_fds_counts_a_processs_descriptors() {
        // Children, not this process: the harness's other threads open and close files; and
        // both inherit whatever cargo passed down (its jobserver), so only the difference counts.
        let (mut a, mut b) = (sleeper(0), sleeper(2));
        let (na, nb) = (open_fds(a.id() as i32), open_fds(b.id() as i32));
        for c in [&mut a, &mut b] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let na = na.expect("the first sleeper's fds");
        assert!(na >= 3, "{na}");
        assert_eq!(nb, Some(na + 2));
        assert_eq!(open_fds(-1), None);
    }
}
