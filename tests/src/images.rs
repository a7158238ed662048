//! Helpers for the container suite (`tests/tests/container_e2e.rs`): images made by the
//! suite itself, hand-built image archives, and what a container run must not leave behind.
//!
//! Owns: the per-test-binary image store (a temp dir, built once with `stagehand image import`
//! from the host's static busybox, removed when the test binary exits, and swept by the next
//! one if it was killed), the busybox root filesystem (applet symlinks, `/etc/passwd` with a
//! user `app` uid 1000, `/var/www/index.html`, the `readiness-server` fixture), a minimal tar
//! writer that takes any member name (the `tar` crate refuses `..`, which the malicious
//! archives need), docker-archive and oci-archive tarballs written by hand, running
//! `stagehand image ...` and `stagehand run --root ...`, and the leak check of a run that
//! used containers. Does not own: starting stagehand, markers and process checks
//! ([`crate::e2e`]), the stage checks (cgroups, netns, journal: [`crate::sandbox`], reused
//! here), or what a test asserts about stagehand's output. Never touches
//! `/var/lib/stagehand`: every store is given with `--root`.
//!
//! Why the marker reaches containers: every container pipeline has a stage variable `marker`
//! set with `--var`, and stage variables are part of a container's environment, so a process
//! left in a container is found by [`crate::e2e::processes_with`] like a host step's.

use std::ffi::OsStr;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::e2e::{Finished, StagehandCmd, assert_no_leaks, fixtures_dir, unique_marker};
use crate::sandbox::{assert_stage_gone, run_dir, run_id};

/// The busybox image every container pipeline uses (`stagehand image import` of
/// [`build_busybox_rootfs`]); the pipelines under `tests/pipelines/container-*.yaml` name it
/// literally.
pub const BUSYBOX_IMAGE: &str = "stagehand-e2e/busybox:1";

/// The same root filesystem with `/usr/local/bin/readiness-server` as its ENTRYPOINT: the
/// stand-in for `saucelabs/sauce-connect` in the Sauce Connect pipeline.
pub const SAUCE_IMAGE: &str = "stagehand-e2e/sauce-connect:1";

/// Where Debian's `busybox-static` puts its binary.
pub const BUSYBOX_BIN: &str = "/bin/busybox";

/// Overrides the OCI runtime of every `stagehand run` of the suite (`--runtime`), e.g. to run
/// it under crun.
pub const RUNTIME_ENV: &str = "STAGEHAND_E2E_RUNTIME";

/// Prefix of the suite image stores in the temp dir: `<prefix><pid>-<random>`.
const STORE_PREFIX: &str = "stagehand-e2e-images-";

/// How long a `stagehand image` command may take.
const IMAGE_CMD_TIMEOUT: Duration = Duration::from_secs(20);

/// The host's static busybox. Panics with the package to install when it is missing or is
/// a dynamically linked one (which would not run in an image without a libc).
pub fn busybox_binary() -> PathBuf {
    let path = PathBuf::from(BUSYBOX_BIN);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!("{BUSYBOX_BIN}: {e}: the container suite builds its image from it (apt-get install -y busybox-static)")
    });
    match elf_interpreter(&bytes) {
        Ok(false) => path,
        Ok(true) => panic!(
            "{BUSYBOX_BIN} is dynamically linked: the suite's image has no libc (apt-get install -y busybox-static)"
        ),
        Err(why) => panic!("{BUSYBOX_BIN} is not a usable ELF binary: {why}"),
    }
}

/// Whether a 64-bit little-endian ELF file asks for a program interpreter (`PT_INTERP`),
/// i.e. is dynamically linked.
fn elf_interpreter(bytes: &[u8]) -> Result<bool, String> {
    const PT_INTERP: u32 = 3;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("no ELF header".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    for i in 0..phnum {
        let at = phoff + i * phentsize;
        let Some(p_type) = bytes.get(at..at + 4) else {
            return Err("program headers past the end of the file".into());
        };
        if u32::from_le_bytes(p_type.try_into().expect("4 bytes")) == PT_INTERP {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Fill `dir` with a busybox root filesystem: `/bin/busybox` and a symlink to it for every
/// applet, `/etc/passwd` and `/etc/group` with `root` and `app` (uid/gid 1000, home
/// `/home/app` owned by it), `/var/www/index.html`, a sticky `/tmp`, and the
/// `readiness-server` fixture at `/usr/local/bin/readiness-server`.
pub fn build_busybox_rootfs(dir: &Path) {
    let busybox = busybox_binary();
    for d in [
        "bin",
        "sbin",
        "usr/bin",
        "usr/sbin",
        "usr/local/bin",
        "etc",
        "root",
        "home/app",
        "tmp",
        "var/www",
        "proc",
        "sys",
        "dev",
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap_or_else(|e| panic!("mkdir {d}: {e}"));
    }
    std::fs::copy(&busybox, dir.join("bin/busybox")).expect("copy busybox into the rootfs");
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777))
        .expect("chmod /tmp");
    let list = std::process::Command::new(&busybox)
        .arg("--list-full")
        .output()
        .expect("run busybox --list-full");
    assert!(
        list.status.success(),
        "busybox --list-full: {}",
        list.status
    );
    let mut applets = 0;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim().trim_start_matches('/');
        if applet.is_empty() || applet == "bin/busybox" {
            continue;
        }
        let link = dir.join(applet);
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).expect("applet directory");
        }
        symlink("/bin/busybox", &link).unwrap_or_else(|e| panic!("symlink {applet}: {e}"));
        applets += 1;
    }
    assert!(
        applets > 100,
        "busybox lists only {applets} applets: not busybox-static?"
    );
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .expect("write /etc/passwd");
    std::fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n",
    )
    .expect("write /etc/group");
    nix::unistd::chown(
        &dir.join("home/app"),
        Some(nix::unistd::Uid::from_raw(1000)),
        Some(nix::unistd::Gid::from_raw(1000)),
    )
    .expect("chown /home/app to 1000:1000");
    std::fs::write(
        dir.join("var/www/index.html"),
        "<h1>hello from busybox httpd</h1>\n",
    )
    .expect("write index.html");
    let server = dir.join("usr/local/bin/readiness-server");
    std::fs::copy(fixtures_dir().join("readiness-server.sh"), &server)
        .expect("copy the readiness-server fixture");
    std::fs::set_permissions(&server, std::fs::Permissions::from_mode(0o755))
        .expect("chmod readiness-server");
}

/// `stagehand image --root STORE ARGS...`, carrying `marker`, run to completion.
pub fn image_cmd<S: AsRef<OsStr>>(marker: &str, store: &Path, args: &[S]) -> Finished {
    let mut cmd = StagehandCmd::new(marker)
        .arg("image")
        .arg("--root")
        .arg(store);
    for a in args {
        cmd = cmd.arg(a);
    }
    cmd.spawn().wait(IMAGE_CMD_TIMEOUT)
}

/// Append `--root STORE`, `--var marker=MARKER`, `--stop-timeout 1s` and, when
/// [`RUNTIME_ENV`] is set, `--runtime` to a `stagehand run` command.
pub fn with_store(cmd: StagehandCmd, store: &Path, marker: &str) -> StagehandCmd {
    let cmd = cmd
        .arg("--root")
        .arg(store)
        .arg("--var")
        .arg(format!("marker={marker}"))
        .arg("--stop-timeout")
        .arg("1s");
    match std::env::var_os(RUNTIME_ENV) {
        Some(rt) => cmd.arg("--runtime").arg(rt),
        None => cmd,
    }
}

/// The image store of this test binary, with [`BUSYBOX_IMAGE`] and [`SAUCE_IMAGE`].
#[derive(Debug)]
pub struct SuiteStore {
    dir: tempfile::TempDir,
    root: PathBuf,
}

impl SuiteStore {
    /// The store directory (what `--root` takes).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The root filesystem both images were imported from.
    pub fn rootfs(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

static SUITE: OnceLock<SuiteStore> = OnceLock::new();

/// The store shared by every test of this binary, built on first use: a fresh temp dir, the
/// busybox root filesystem, and two `stagehand image import`s of it. Removed when the test
/// binary exits; stores of test binaries that were killed are swept first.
pub fn suite_store() -> &'static SuiteStore {
    SUITE.get_or_init(|| {
        sweep_stale_stores();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{STORE_PREFIX}{}-", std::process::id()))
            .tempdir()
            .expect("create the suite's image store dir");
        // Registered before anything is written, so a failing build is removed too (the
        // OnceLock keeps no value then, but the dir is found by its prefix and pid).
        if !sys::at_exit(remove_suite_stores) {
            eprintln!("images: atexit failed; the suite store will be swept by the next run");
        }
        let rootfs = dir.path().join("rootfs");
        build_busybox_rootfs(&rootfs);
        // The rootless rerun imports (and later unpacks) as the test user.
        if crate::e2e::rootless_rerun() {
            crate::rootless::user().own(dir.path());
        }
        let root = dir.path().join("store");
        let marker = unique_marker();
        let rootfs_arg = rootfs.as_os_str();
        let busybox = image_cmd(
            &marker,
            &root,
            &[
                OsStr::new("import"),
                rootfs_arg,
                OsStr::new("--tag"),
                OsStr::new(BUSYBOX_IMAGE),
            ],
        );
        busybox.assert_code(0);
        let sauce = image_cmd(
            &marker,
            &root,
            &[
                OsStr::new("import"),
                rootfs_arg,
                OsStr::new("--tag"),
                OsStr::new(SAUCE_IMAGE),
                OsStr::new("--entrypoint"),
                OsStr::new("/usr/local/bin/readiness-server"),
                OsStr::new("--env"),
                OsStr::new("SC_PORT=8032"),
            ],
        );
        sauce.assert_code(0);
        SuiteStore { dir, root }
    })
}

/// atexit handler: remove this process's suite stores. Must not panic (it runs in C's
/// `exit`), so every error is ignored.
extern "C" fn remove_suite_stores() {
    let mine = format!("{STORE_PREFIX}{}-", std::process::id());
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&mine) && !is_mounted_under(&e.path()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Remove suite stores left by test binaries that no longer run (killed before their atexit
/// handler). A store something is still mounted from is left alone: removing it would
/// reach through the mount.
pub fn sweep_stale_stores() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(STORE_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() || is_mounted_under(&e.path()) {
            continue;
        }
        if let Err(err) = std::fs::remove_dir_all(e.path()) {
            eprintln!(
                "images: could not remove the stale store {}: {err}",
                e.path().display()
            );
        }
    }
}

fn is_mounted_under(dir: &Path) -> bool {
    !mounts_mentioning(&[dir]).is_empty()
}

/// The lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One member of a tar written by [`tar`].
#[derive(Debug, Clone)]
pub enum TarEntry {
    /// A regular file (mode 0644).
    File { name: String, data: Vec<u8> },
    /// A directory (mode 0755).
    Dir { name: String },
    /// A symbolic link.
    Symlink { name: String, target: String },
}

impl TarEntry {
    /// A regular file.
    pub fn file(name: &str, data: impl Into<Vec<u8>>) -> TarEntry {
        TarEntry::File {
            name: name.into(),
            data: data.into(),
        }
    }

    /// A directory.
    pub fn dir(name: &str) -> TarEntry {
        TarEntry::Dir { name: name.into() }
    }

    /// A symbolic link `name -> target`.
    pub fn symlink(name: &str, target: &str) -> TarEntry {
        TarEntry::Symlink {
            name: name.into(),
            target: target.into(),
        }
    }
}

/// A ustar archive of `entries`, member names written exactly as given (`..`, leading `/`
/// and all), owner 0:0, mtime 0. Panics on a name or link target over 100 bytes.
pub fn tar(entries: &[TarEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let (name, kind, link, data, mode): (&str, u8, &str, &[u8], u32) = match e {
            TarEntry::File { name, data } => (name, b'0', "", data, 0o644),
            TarEntry::Dir { name } => (name, b'5', "", &[], 0o755),
            TarEntry::Symlink { name, target } => (name, b'2', target, &[], 0o777),
        };
        out.extend_from_slice(&ustar_header(name, kind, link, data.len(), mode));
        out.extend_from_slice(data);
        out.resize(out.len().next_multiple_of(512), 0);
    }
    // The end of an archive: two zero blocks.
    out.resize(out.len() + 1024, 0);
    out
}

fn ustar_header(name: &str, kind: u8, link: &str, size: usize, mode: u32) -> [u8; 512] {
    assert!(name.len() <= 100, "tar member name too long: {name}");
    assert!(link.len() <= 100, "tar link target too long: {link}");
    let mut h = [0u8; 512];
    let mut put = |at: usize, s: &[u8]| h[at..at + s.len()].copy_from_slice(s);
    put(0, name.as_bytes());
    put(100, format!("{mode:07o}\0").as_bytes());
    put(108, b"0000000\0");
    put(116, b"0000000\0");
    put(124, format!("{size:011o}\0").as_bytes());
    put(136, b"00000000000\0");
    put(156, &[kind]);
    put(157, link.as_bytes());
    put(257, b"ustar\0");
    put(263, b"00");
    // The checksum is computed with its own field as spaces.
    put(148, b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// The image architecture name of this host (`amd64`, `arm64`, ...).
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An image config for `layers` (uncompressed layer tars, base first) with `Cmd` `cmd`.
pub fn image_config(layers: &[Vec<u8>], cmd: &[&str]) -> Vec<u8> {
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(l)))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "architecture": host_arch(),
        "os": "linux",
        "config": { "Cmd": cmd },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    }))
    .expect("a config serializes")
}

/// A docker-archive (what `docker save` writes, legacy layout): `<config hex>.json`,
/// `<layer hex>/layer.tar` per layer, and `manifest.json` with `Config`, `RepoTags`, `Layers`.
pub fn docker_archive(repo_tags: &[&str], config: &[u8], layers: &[Vec<u8>]) -> Vec<u8> {
    let config_name = format!("{}.json", sha256_hex(config));
    let mut entries = vec![TarEntry::file(&config_name, config)];
    let mut layer_names = Vec::new();
    for l in layers {
        let hex = sha256_hex(l);
        entries.push(TarEntry::dir(&format!("{hex}/")));
        let name = format!("{hex}/layer.tar");
        entries.push(TarEntry::file(&name, l.clone()));
        layer_names.push(name);
    }
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": repo_tags,
        "Layers": layer_names,
    }]);
    entries.push(TarEntry::file(
        "manifest.json",
        serde_json::to_vec(&manifest).expect("manifest.json serializes"),
    ));
    tar(&entries)
}

/// An oci-archive (an OCI image layout in a tar) of one image named `name`: `oci-layout`,
/// `index.json`, and `blobs/sha256/<hex>` for the manifest, the config and each layer.
pub fn oci_archive(name: &str, config: &[u8], layers: &[Vec<u8>]) -> Vec<u8> {
    let descriptor = |media_type: &str, bytes: &[u8]| {
        serde_json::json!({
            "mediaType": media_type,
            "digest": format!("sha256:{}", sha256_hex(bytes)),
            "size": bytes.len(),
        })
    };
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": layers
            .iter()
            .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar", l))
            .collect::<Vec<_>>(),
    }))
    .expect("a manifest serializes");
    let mut index_entry = descriptor("application/vnd.oci.image.manifest.v1+json", &manifest);
    index_entry["annotations"] = serde_json::json!({
        "org.opencontainers.image.ref.name": name,
        "io.containerd.image.name": name,
    });
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [index_entry],
    });
    let mut entries = vec![
        TarEntry::file("oci-layout", &br#"{"imageLayoutVersion":"1.0.0"}"#[..]),
        TarEntry::dir("blobs/"),
        TarEntry::dir("blobs/sha256/"),
    ];
    for blob in std::iter::once(config)
        .chain(layers.iter().map(Vec::as_slice))
        .chain(std::iter::once(manifest.as_slice()))
    {
        entries.push(TarEntry::file(
            &format!("blobs/sha256/{}", sha256_hex(blob)),
            blob,
        ));
    }
    entries.push(TarEntry::file(
        "index.json",
        serde_json::to_vec(&index).expect("index.json serializes"),
    ));
    tar(&entries)
}

/// Lines of /proc/mounts that mention any of `paths` (as a mount point or in the options,
/// where an overlay names its layer directories).
pub fn mounts_mentioning(paths: &[&Path]) -> Vec<String> {
    let needles: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| needles.iter().any(|n| l.contains(n.as_str())))
        .map(str::to_string)
        .collect()
}

/// Lines of /proc/mounts whose mount point is `dir` or below it.
pub fn mounts_inside(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|m| Path::new(m).starts_with(dir))
        })
        .map(str::to_string)
        .collect()
}

/// Every directory up to depth 6 under `/sys/fs/cgroup`, in every hierarchy (v1
/// controllers, `unified`, `systemd`), whose name contains `run_id`: besides
/// `stagehand/<run>` this catches runtime-made names like `stagehand-<run>-<step>.scope`.
pub fn cgroups_naming(run_id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    walk_named(
        Path::new(crate::sandbox::CGROUP_ROOT),
        0,
        run_id,
        &mut found,
    );
    found
}

fn walk_named(dir: &Path, depth: usize, needle: &str, found: &mut Vec<PathBuf>) {
    if depth >= 6 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        if e.file_name().to_string_lossy().contains(needle) {
            found.push(e.path());
        }
        walk_named(&e.path(), depth + 1, needle, found);
    }
}

/// Panic unless the run that printed `out` left nothing behind: the stage checks of
/// [`assert_stage_gone`] (cgroups of the run in every hierarchy, netns mounts, no process
/// carrying `marker`, a finished journal), plus no cgroup named after the run anywhere, no
/// mount mentioning the run dir or any of `stores`, no mount left in the journal, no
/// container in the runtime's state dir, and no process whose argv, environment or cwd
/// names the run (`runc --root <run dir>/runtime`, container ids `stagehand-<run>-<step>`).
pub fn assert_container_run_gone(out: &Finished, marker: &str, stores: &[&Path]) {
    let id = run_id(out);
    assert_stage_gone(&id, marker);
    let named = cgroups_naming(&id);
    assert!(named.is_empty(), "run {id} left cgroups: {named:#?}");
    let dir = run_dir(&id);
    // Other tests' containers have overlays of the same store's layers mounted under their
    // own run dirs: only mounts naming this run's dir, or mounted inside a store, count.
    let mounts: Vec<String> = mounts_mentioning(&[dir.as_path()])
        .into_iter()
        .chain(stores.iter().flat_map(|s| mounts_inside(s)))
        .collect();
    assert!(
        mounts.is_empty(),
        "run {id} left mounts under its run dir or an image store: {mounts:#?}"
    );
    let journal: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).unwrap_or_default())
            .unwrap_or_default();
    let journal_mounts = journal["mounts"].as_array().cloned().unwrap_or_default();
    assert!(
        journal_mounts.is_empty(),
        "run {id}'s journal still lists mounts: {journal_mounts:?}"
    );
    let runtime_state: Vec<PathBuf> = std::fs::read_dir(dir.join("runtime"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        runtime_state.is_empty(),
        "run {id} left containers in the runtime's state: {runtime_state:#?}"
    );
    assert_no_leaks(&id);
}

/// `CapEff` of a `/proc/<pid>/status` line (or of a step's output line) as a bit mask.
pub fn cap_eff(line: &str) -> u64 {
    let hex = line
        .trim()
        .strip_prefix("CapEff:")
        .unwrap_or_else(|| panic!("not a CapEff line: {line:?}"))
        .trim();
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("CapEff {hex:?}: {e}"))
}

/// The one syscall wrapper that needs `unsafe`.
#[allow(unsafe_code)]
pub(crate) mod sys {
    /// Register `f` to run when the process exits normally (also after `process::exit`,
    /// which is how the test harness ends on failure).
    pub(crate) fn at_exit(f: extern "C" fn()) -> bool {
        // SAFETY: `atexit` only stores the function pointer; `f` is a plain `extern "C" fn`
        // (no captured state, valid for the whole life of the process) that never unwinds.
        unsafe { libc::atexit(f) == 0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tar_keeps_names_as_given_and_checksums_headers() {
        let t = tar(&[
            TarEntry::file("../evil", &b"pwned"[..]),
            TarEntry::symlink("l", "/abs"),
        ]);
        assert_eq!(t.len(), 512 + 512 + 512 + 1024);
        assert_eq!(&t[..8], b"../evil\0");
        assert_eq!(t[156], b'0');
        assert_eq!(&t[124..136], b"00000000005\0");
        assert_eq!(&t[512..517], b"pwned");
        assert_eq!(&t[1024..1026], b"l\0");
        assert_eq!(t[1024 + 156], b'2');
        assert_eq!(&t[1024 + 157..1024 + 162], b"/abs\0");
        // The checksum: the byte sum with the field as spaces, in octal.
        let mut h = t[..512].to_vec();
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        h[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, h.iter().map(|&b| u32::from(b)).sum::<u32>());
    }

    #[test]
    fn sha256_of_abc() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn archives_reference_their_members_by_digest() {
        let layer = tar(&[TarEntry::file("hello", &b"hi"[..])]);
        let config = image_config(std::slice::from_ref(&layer), &["/hello"]);
        let cfg: serde_json::Value = serde_json::from_slice(&config).unwrap();
        assert_eq!(
            cfg["rootfs"]["diff_ids"][0],
            format!("sha256:{}", sha256_hex(&layer))
        );
        let docker = docker_archive(&["x/y:1"], &config, std::slice::from_ref(&layer));
        let text = String::from_utf8_lossy(&docker);
        assert!(text.contains(&format!("{}/layer.tar", sha256_hex(&layer))));
        assert!(text.contains(r#""RepoTags":["x/y:1"]"#), "{text}");
        let oci = oci_archive("docker.io/x/y:1", &config, &[layer]);
        let text = String::from_utf8_lossy(&oci);
        assert!(text.contains(&format!("blobs/sha256/{}", sha256_hex(&config))));
        assert!(text.contains(r#""io.containerd.image.name":"docker.io/x/y:1""#));
    }

    #[test]
    fn elf_interpreter_is_read_from_the_program_headers() {
        // /bin/sh is dynamically linked on every supported host; a non-ELF file is refused.
        assert_eq!(
            elf_interpreter(&std::fs::read("/bin/sh").unwrap()),
            Ok(true)
        );
        assert!(elf_interpreter(b"#!/bin/sh\n").is_err());
    }
}
