//! The PostgreSQL image of the Kubernetes health-check suite
//! (`tests/tests/postgres_image_e2e.rs`): building it once per machine, putting it in a test's
//! image store, and checking what a container run left behind.
//!
//! Owns: running `tests/fixtures/postgres-image/build.sh` (a Debian bookworm + PostgreSQL 15
//! root filesystem with a `docker-entrypoint.sh` like the official image's) into the machine
//! cache [`CACHE_DIR`], rebuilt only when the fingerprint (SHA-256 of the build script and of
//! the entrypoint, stored beside the tar) changes, under a file lock so parallel test binaries
//! build it once; a per-test image store (a temp dir) holding that tar imported as
//! `postgres` and `postgres:9-alpine`; and the check that a container run is gone (cgroups,
//! overlay mounts, processes, journal). Does not own: starting stagehand, markers and the
//! process leak check ([`crate::e2e`]), the stage journal and cgroup walk
//! ([`crate::sandbox`]), or what a test asserts about a run's output. Never touches
//! `/var/lib/stagehand`: the store is always given with `--root`.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::e2e::{Finished, StagehandCmd, fixtures_dir};
use crate::images::mounts_mentioning;
use crate::sandbox::run_id;

/// Where the built root filesystem is kept between test runs (one per machine).
pub const CACHE_DIR: &str = "/var/cache/stagehand-tests";

/// The cached root filesystem tar in [`CACHE_DIR`].
pub const ROOTFS_TAR: &str = "postgres-rootfs.tar";

/// The image names the pipeline uses; both are the same root filesystem.
pub const IMAGE_NAMES: [&str; 2] = ["postgres", "postgres:9-alpine"];

/// The image environment, as the official image sets it (the server binaries on PATH, the
/// default PGDATA); a step's `envVariables` override it.
pub const IMAGE_ENV: [&str; 3] = [
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/postgresql/15/bin",
    "PGDATA=/var/lib/postgresql/data",
    "LANG=C.UTF-8",
];

/// How long the build may take before it is stopped (it takes 1.5-2 minutes with a mirror
/// that answers; much longer means the mirror does not).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// How long one `stagehand image import` of the ~400 MB tar may take.
const IMPORT_TIMEOUT: Duration = Duration::from_secs(60);

/// Prefix of the per-test image stores in the temp dir.
const STORE_PREFIX: &str = "stagehand-e2e-pgstore-";

/// The directory of the build script and the in-image entrypoint.
pub fn fixture_dir() -> PathBuf {
    fixtures_dir().join("postgres-image")
}

/// What the cached tar was built from: `sha256sum build.sh docker-entrypoint.sh` (relative
/// names, so the text does not depend on where the checkout is). The entrypoint counts too,
/// since it is copied into the image.
pub fn fingerprint() -> String {
    let out = std::process::Command::new("sha256sum")
        .args(["build.sh", "docker-entrypoint.sh"])
        .current_dir(fixture_dir())
        .output()
        .unwrap_or_else(|e| panic!("run sha256sum in {}: {e}", fixture_dir().display()));
    assert!(
        out.status.success(),
        "sha256sum of the postgres-image fixtures: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("sha256sum prints ASCII")
}

/// The fingerprint file beside `tar`.
fn stamp_path(tar: &Path) -> PathBuf {
    tar.with_extension("tar.sha256")
}

/// How the cached root filesystem was obtained.
#[derive(Debug, Clone)]
pub struct CachedRootfs {
    /// The tar (in [`CACHE_DIR`]).
    pub tar: PathBuf,
    /// How long building it took, if this call built it; `None` when it was already cached.
    pub built_in: Option<Duration>,
}

/// The cached PostgreSQL root filesystem tar, built first if it is missing or its fingerprint
/// differs from [`fingerprint`]. Holds an exclusive lock on `<CACHE_DIR>/postgres-rootfs.lock`
/// meanwhile, so a second test binary waits for the first one's build instead of building too.
///
/// # Panics
/// When the build fails or takes longer than [`BUILD_TIMEOUT`], with its output.
pub fn cached_rootfs() -> CachedRootfs {
    let dir = Path::new(CACHE_DIR);
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {CACHE_DIR}: {e}"));
    let lock_path = dir.join("postgres-rootfs.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("open {}: {e}", lock_path.display()));
    // Blocks while another test binary builds; released when `_lock` is dropped.
    let _lock = Flock::lock(file, FlockArg::LockExclusive)
        .unwrap_or_else(|(_, e)| panic!("lock {}: {e}", lock_path.display()));
    let tar = dir.join(ROOTFS_TAR);
    let want = fingerprint();
    let stamp = stamp_path(&tar);
    let have = std::fs::read_to_string(&stamp).unwrap_or_default();
    if tar.is_file() && have == want {
        return CachedRootfs {
            tar,
            built_in: None,
        };
    }
    // The stamp goes first, so a build that dies half-way is never taken for a good one.
    let _ = std::fs::remove_file(&stamp);
    let started = Instant::now();
    run_build(&tar);
    let built_in = started.elapsed();
    std::fs::write(&stamp, &want).unwrap_or_else(|e| panic!("write {}: {e}", stamp.display()));
    eprintln!(
        "pgimage: built {} in {:.1} s",
        tar.display(),
        built_in.as_secs_f64()
    );
    CachedRootfs {
        tar,
        built_in: Some(built_in),
    }
}

/// Run `build.sh OUT` in its own process group, stopping the whole group (SIGTERM, which the
/// script traps to unmount and clean up, then SIGKILL) if it overruns [`BUILD_TIMEOUT`].
fn run_build(out: &Path) {
    let script = fixture_dir().join("build.sh");
    let mut child = std::process::Command::new("/bin/sh")
        .arg(&script)
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", script.display()));
    let pid = child.id() as i32;
    // Two reader threads, so neither pipe fills up and stalls the build.
    let read = |mut p: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = p.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("stdout is piped")));
    let stderr = read(Box::new(child.stderr.take().expect("stderr is piped")));
    let deadline = Instant::now() + BUILD_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().expect("poll build.sh") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let group = Pid::from_raw(-pid);
            let _ = nix::sys::signal::kill(group, Signal::SIGTERM);
            let grace = Instant::now() + Duration::from_secs(20);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < grace {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = nix::sys::signal::kill(group, Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (out_text, err_text) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    match status {
        Some(st) if st.success() => {}
        Some(st) => panic!(
            "{} {} failed: {st}\n--- stdout:\n{out_text}\n--- stderr:\n{err_text}",
            script.display(),
            out.display()
        ),
        None => panic!(
            "{} did not finish within {BUILD_TIMEOUT:?} (stopped)\n--- stdout:\n{out_text}\n--- stderr:\n{err_text}",
            script.display()
        ),
    }
}

/// An image store in a temp dir holding the PostgreSQL images; removed when dropped (unless
/// something is still mounted from it: removing it then would reach through the mount).
pub struct PgStore {
    dir: Option<tempfile::TempDir>,
    /// How long the two imports took.
    pub imported_in: Duration,
}

impl PgStore {
    /// Import `tar` as every name in [`IMAGE_NAMES`] (no ENTRYPOINT or CMD, env
    /// [`IMAGE_ENV`]) into a fresh store, with `stagehand image import`, carrying `marker`.
    pub fn import(tar: &Path, marker: &str) -> PgStore {
        let dir = tempfile::Builder::new()
            .prefix(STORE_PREFIX)
            .tempdir()
            .expect("create a temp image store");
        let root = dir.path().join("store");
        let started = Instant::now();
        for name in IMAGE_NAMES {
            let mut args: Vec<&OsStr> = vec![
                OsStr::new("import"),
                tar.as_os_str(),
                OsStr::new("--tag"),
                OsStr::new(name),
            ];
            for e in IMAGE_ENV {
                args.extend([OsStr::new("--env"), OsStr::new(e)]);
            }
            let mut cmd = StagehandCmd::new(marker)
                .arg("image")
                .arg("--root")
                .arg(&root);
            for a in args {
                cmd = cmd.arg(a);
            }
            let out = cmd.spawn().wait(IMPORT_TIMEOUT);
            assert_eq!(
                out.code,
                Some(0),
                "stagehand image import {} --tag {name}\n{}",
                tar.display(),
                out.dump()
            );
        }
        PgStore {
            dir: Some(dir),
            imported_in: started.elapsed(),
        }
    }

    /// The store directory (what `--root` takes).
    pub fn root(&self) -> PathBuf {
        self.base().join("store")
    }

    fn base(&self) -> &Path {
        self.dir
            .as_ref()
            .expect("the store exists until dropped")
            .path()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else {
            return;
        };
        let mounted = mounts_mentioning(&[dir.path()]);
        if mounted.is_empty() {
            let path = dir.path().to_path_buf();
            if let Err(e) = dir.close() {
                eprintln!("pgimage: could not remove {}: {e}", path.display());
            }
        } else {
            let kept = dir.keep();
            eprintln!(
                "pgimage: leaving {} in place: still mounted from it:\n  {}",
                kept.display(),
                mounted.join("\n  ")
            );
        }
    }
}

/// Processes whose cgroup (in any hierarchy) lies under `stagehand/<run_id>`: what is left of
/// a container (its init, postgres) even though nothing in its argv, environment or working
/// directory names the test.
pub fn processes_in_run_cgroups(run_id: &str) -> Vec<(i32, String)> {
    let needle = format!("/stagehand/{run_id}");
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let cgroups = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if cgroups.lines().any(|l| l.contains(&needle)) {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            found.push((
                pid,
                String::from_utf8_lossy(&cmdline)
                    .replace('\0', " ")
                    .trim_end()
                    .to_string(),
            ));
        }
    }
    found
}

/// Panic unless the container run that printed `out` left nothing behind: the stage checks
/// of [`assert_stage_gone`] (the run's cgroups in every hierarchy, netns mounts, no process
/// carrying `marker`, a finished journal with nothing left in it), no cgroup named after the
/// run anywhere, no process in the run's cgroups, no mount (overlay or bind) mentioning the
/// run directory or `store`, no mount left in the journal, no container in the runtime's
/// state directory, and no process naming the run (runc's `--root`, container ids).
pub fn assert_container_run_gone(out: &Finished, marker: &str, store: &Path) {
    let id = run_id(out);
    let in_cgroups = processes_in_run_cgroups(&id);
    assert!(
        in_cgroups.is_empty(),
        "processes still in run {id}'s cgroups: {in_cgroups:#?}"
    );
    crate::images::assert_container_run_gone(out, marker, &[store]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_covers_the_script_and_the_entrypoint() {
        let f = fingerprint();
        let names: Vec<&str> = f
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .collect();
        assert_eq!(names, ["build.sh", "docker-entrypoint.sh"], "{f}");
        assert!(
            f.lines()
                .all(|l| l.split_whitespace().next().is_some_and(|h| h.len() == 64)),
            "{f}"
        );
        assert_eq!(f, fingerprint(), "the fingerprint is stable");
    }

    #[test]
    fn stamp_sits_beside_the_tar() {
        assert_eq!(
            stamp_path(Path::new("/var/cache/stagehand-tests/postgres-rootfs.tar")),
            Path::new("/var/cache/stagehand-tests/postgres-rootfs.tar.sha256")
        );
    }

    #[test]
    fn finds_this_process_cgroup_only_by_its_run() {
        assert!(processes_in_run_cgroups("no-such-run-id").is_empty());
    }
}
