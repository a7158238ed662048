//! End to end as root: a busybox image made with `import`, written as an oci-archive with
//! `save`, `load`ed into a second store, unpacked, mounted as an overlay, given a spec and
//! run with runc in a network namespace made with `ip netns add`.
//!
//! Needs root, runc, catatonit, busybox-static (`/bin/busybox`) and iproute2. Without them
//! the tests fail with what is missing; they never skip. Everything they create is named
//! `stagehand-test-<pid>-...` and removed by guards, also when a test fails; each test then
//! checks that no mount, cgroup or netns of its own is left.
//!
//! runc is spawned with `std::process::Command` here: this test binary has no global reaper.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt, symlink};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use stagehand_oci::archive::{self, ImportOptions};
use stagehand_oci::oci_spec::image::{
    ConfigBuilder, Descriptor, ImageConfigurationBuilder, ImageManifestBuilder, MediaType,
    RootFsBuilder,
};
use stagehand_oci::rootfs::{Rootfs, RootfsKind};
use stagehand_oci::runtime::{Control, OciRuntime, RuncCli, exec_std};
use stagehand_oci::spec::{self, BindMount, ContainerSpec, Host, Network, Resources};
use stagehand_oci::store::{ImageId, Store, parse_reference};
use stagehand_oci::unpack::{self, WhiteoutFormat};

const CATATONIT: &str = "/usr/bin/catatonit";
const BUSYBOX: &str = "/bin/busybox";

fn require_environment() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests need root (overlay mounts, runc, ip netns): run them as root, as CI does"
    );
    for (path, package) in [(BUSYBOX, "busybox-static"), (CATATONIT, "catatonit")] {
        assert!(
            Path::new(path).is_file(),
            "{path} is missing: apt-get install {package}"
        );
    }
    RuncCli::locate(None, "/nonexistent").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        Command::new("ip").arg("-V").output().is_ok(),
        "ip is missing: apt-get install iproute2"
    );
}

fn name(test: &str) -> String {
    format!("stagehand-test-{}-{test}", std::process::id())
}

/// A scratch directory for one test.
fn scratch(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{}-", name(test)))
        .tempdir()
        .unwrap()
}

/// The static busybox with a symlink per applet, a user `app` (1000:1000, also in group
/// `extra` 2000), and a file owned by 1000 with mode 0640.
fn busybox_rootfs(dir: &Path) {
    for d in [
        "bin", "etc", "tmp", "proc", "sys", "dev", "root", "home/app",
    ] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    fs::copy(BUSYBOX, dir.join("bin/busybox")).unwrap();
    let list = Command::new(BUSYBOX).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" && !applet.is_empty() {
            symlink("busybox", dir.join("bin").join(applet)).unwrap();
        }
    }
    fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    fs::write(
        dir.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
    )
    .unwrap();
    fs::write(dir.join("home/app/secret"), "s3cret\n").unwrap();
    nix::unistd::chown(
        &dir.join("home/app/secret"),
        Some(1000.into()),
        Some(1000.into()),
    )
    .unwrap();
    fs::set_permissions(
        dir.join("home/app/secret"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
}
use std::os::unix::fs::PermissionsExt;

/// Deletes a netns made with `ip netns add`.
struct NetnsGuard(String);

impl NetnsGuard {
    fn add(name: &str) -> NetnsGuard {
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        NetnsGuard(name.to_string())
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.0)
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `delete --force`s a container, unmounts and removes its rootfs, removes the cgroup dirs
/// runc left (runc removes the leaf it made, not the parents of a nested `cgroupsPath`).
struct ContainerGuard {
    runtime: RuncCli,
    id: String,
    dir: PathBuf,
    cgroup_top: String,
}

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = Control::new(&self.runtime, &exec_std).delete(&self.id, true);
        let _ = stagehand_oci::rootfs::remove(&self.dir);
        for dir in cgroup_dirs(&self.cgroup_top) {
            remove_cgroup_tree(&dir);
        }
    }
}

fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Where a relative `cgroupsPath` starting with `top` lands in every hierarchy: under our
/// own cgroup of that hierarchy (`/proc/self/cgroup`), as runc places it.
fn cgroup_dirs(top: &str) -> Vec<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    let mut out = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or("/"),
        );
        let mount = match controllers {
            "" => "unified".to_string(),
            c => c.strip_prefix("name=").unwrap_or(c).to_string(),
        };
        let base = Path::new("/sys/fs/cgroup").join(mount);
        if base.is_dir() {
            out.push(base.join(path.trim_start_matches('/')).join(top));
        }
    }
    out
}

/// Everything set up for running one container of the busybox image.
/// Fields drop in order: the container (and its mount) goes before the scratch directory,
/// which must never be deleted through a still-mounted overlay.
struct Prepared {
    rootfs: Rootfs,
    guard: ContainerGuard,
    runtime: RuncCli,
    store: Store,
    image: ImageId,
    scratch: tempfile::TempDir,
}

/// import → save (oci-archive) → load into a second store → unpack → overlay.
fn prepare(test: &str) -> Prepared {
    require_environment();
    let scratch = scratch(test);
    let base = scratch.path().to_path_buf();
    let rootfs_dir = base.join("rootfs-src");
    busybox_rootfs(&rootfs_dir);

    let first = Store::open(base.join("store-a")).unwrap();
    let opts = ImportOptions {
        reference: "stagehand-test/busybox:1".into(),
        cmd: Some(vec!["sh".into()]),
        env: vec!["PATH=/bin".into()],
        ..Default::default()
    };
    let imported = archive::import(&first, &rootfs_dir, &opts).unwrap();
    let archive_path = base.join("busybox.oci.tar");
    let mut file = fs::File::create(&archive_path).unwrap();
    archive::save(&first, &["stagehand-test/busybox:1"], &mut file).unwrap();
    file.flush().unwrap();

    let store = Store::open(base.join("store-b")).unwrap();
    let loaded = archive::load(&store, &archive_path).unwrap();
    assert_eq!(loaded.len(), 1);
    assert_eq!(
        loaded[0].name.as_deref(),
        Some("docker.io/stagehand-test/busybox:1")
    );
    assert_eq!(loaded[0].id, imported);
    let image = store.resolve("stagehand-test/busybox:1").unwrap().unwrap();

    let guard = store.write_guard().unwrap();
    let layers = unpack::ensure_image_layers(&store, &guard, &image).unwrap();
    assert_eq!(layers[0].whiteouts, WhiteoutFormat::Overlay);
    let secret = fs::metadata(layers[0].path.join("home/app/secret")).unwrap();
    assert_eq!(
        (secret.uid(), secret.gid(), secret.mode() & 0o7777),
        (1000, 1000, 0o640)
    );

    let runtime = RuncCli::locate(None, base.join("runc")).unwrap();
    let container_dir = base.join("containers").join(test);
    let guard_c = ContainerGuard {
        runtime: runtime.clone(),
        id: name(test),
        dir: container_dir.clone(),
        cgroup_top: name(test),
    };
    let rootfs = Rootfs::create(&container_dir, &layers).unwrap();
    drop(guard);
    assert_eq!(rootfs.kind(), RootfsKind::Overlay);
    Prepared {
        scratch,
        store,
        image,
        runtime,
        guard: guard_c,
        rootfs,
    }
}

impl Prepared {
    /// A spec for `args` with catatonit as init, joining `netns`, in cgroup `<top>/c`.
    fn spec(&self, args: &[&str], netns: &NetnsGuard) -> ContainerSpec {
        let config = self.store.config(&self.image).unwrap();
        let defaults = spec::image_process(
            &config,
            None,
            Some(&args.iter().map(|a| a.to_string()).collect::<Vec<_>>()),
        );
        let mut c = ContainerSpec::new(defaults.args);
        c.env = defaults.env;
        c.network = Network::Join(netns.path());
        c.cgroups_path = Some(format!("{}/c", self.guard.cgroup_top));
        c.init = Some(CATATONIT.into());
        c
    }

    fn run_argv(&self, c: &ContainerSpec) -> Vec<OsString> {
        let spec = spec::build(c, &Host::probe().unwrap()).unwrap();
        spec::write_bundle(&self.guard.dir, &spec).unwrap();
        self.runtime.run_argv(&self.guard.dir, &self.guard.id)
    }

    fn run(&self, c: &ContainerSpec) -> Output {
        let argv = self.run_argv(c);
        let out = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        // `run --keep` leaves the stopped container for the caller: delete it, as stagehand does.
        let control = Control::new(&self.runtime, &exec_std);
        let kept = control.state(&self.guard.id).unwrap();
        assert_eq!(
            kept.map(|s| s.status),
            Some("stopped".to_string()),
            "run --keep keeps the container"
        );
        control.delete(&self.guard.id, true).unwrap();
        out
    }

    /// Tears down and checks nothing of this test is left on the system.
    fn finish(self, netns: NetnsGuard) {
        let control = Control::new(&self.runtime, &exec_std);
        // A container still kept from the last run (one not started through `run`) goes too.
        control.delete(&self.guard.id, true).unwrap();
        assert_eq!(
            control.state(&self.guard.id).unwrap(),
            None,
            "delete removes it"
        );
        self.rootfs.remove().unwrap();
        let netns_path = netns.path();
        drop(netns);
        let scratch = self.scratch.path().to_path_buf();
        let top = self.guard.cgroup_top.clone();
        drop(self.guard);
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(
            !mounts.contains(&*scratch.to_string_lossy()),
            "a mount under {} is left",
            scratch.display()
        );
        assert!(
            !netns_path.exists(),
            "netns {} is left",
            netns_path.display()
        );
        for dir in cgroup_dirs(&top) {
            assert!(!dir.exists(), "cgroup {} is left", dir.display());
        }
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn busybox_echo_hi_in_a_netns() {
    let p = prepare("echo");
    let netns = NetnsGuard::add(&name("echo"));
    let c = p.spec(&["/bin/busybox", "echo", "hi"], &netns);
    let out = p.run(&c);
    assert!(
        out.status.success(),
        "runc run: {:?}\nstderr: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "hi\n");
    p.finish(netns);
}

#[test]
fn user_hostname_mounts_and_netns_are_applied() {
    let p = prepare("user");
    let netns = NetnsGuard::add(&name("user"));
    let workspace = p.scratch.path().join("workspace");
    fs::create_dir_all(&workspace).unwrap();
    fs::write(workspace.join("input"), "from the host\n").unwrap();
    let mut c = p.spec(
        &[
            "sh",
            "-c",
            "id; hostname; echo $HOME; cat /harness/input; cat /home/app/secret; \
             ls /sys/class/net; readlink /proc/1/exe; cat /etc/hosts; echo out > /harness/output",
        ],
        &netns,
    );
    c.user = spec::resolve_user(p.rootfs.path(), "app").unwrap();
    c.hostname = "stagehand-box".into();
    c.cwd = "/harness".into();
    let hosts = p.scratch.path().join("hosts");
    fs::write(&hosts, "127.0.0.1 localhost db\n").unwrap();
    c.mounts = vec![
        BindMount::rw(&workspace, "/harness"),
        BindMount::ro(&hosts, "/etc/hosts"),
    ];
    // Runs as app, which cannot write to the workspace owned by root unless it is shared.
    fs::set_permissions(&workspace, fs::Permissions::from_mode(0o777)).unwrap();
    let out = p.run(&c);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}\nstdout: {stdout}\nstderr: {}",
        out.status,
        text(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    // Docker's rule: supplementary groups are the /etc/group entries that list the user.
    assert_eq!(lines[0], "uid=1000(app) gid=1000(app) groups=2000(extra)");
    assert_eq!(
        &lines[1..5],
        ["stagehand-box", "/home/app", "from the host", "s3cret"]
    );
    // Only loopback: the container joined the fresh netns, not the host's.
    assert_eq!(lines[5], "lo");
    assert_eq!(lines[6], "/dev/init");
    assert_eq!(lines[7], "127.0.0.1 localhost db");
    assert_eq!(
        fs::read_to_string(workspace.join("output")).unwrap(),
        "out\n"
    );
    p.finish(netns);
}

#[test]
fn exit_codes_and_sigterm_reach_the_caller() {
    let p = prepare("exit");
    let netns = NetnsGuard::add(&name("exit"));
    let out = p.run(&p.spec(&["sh", "-c", "echo bye >&2; exit 7"], &netns));
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "bye\n");

    // SIGTERM through `runc kill` reaches `sleep` because catatonit is PID 1.
    let argv = p.run_argv(&p.spec(&["sleep", "100"], &netns));
    let mut child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let control = Control::new(&p.runtime, &exec_std);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = control.state(&p.guard.id).unwrap();
        if state.as_ref().is_some_and(|s| s.status == "running") {
            assert!(state.unwrap().pid > 0);
            break;
        }
        assert!(Instant::now() < deadline, "container did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    assert!(control.kill(&p.guard.id, libc::SIGTERM, false).unwrap());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = control.kill(&p.guard.id, libc::SIGKILL, true);
            panic!("SIGTERM did not stop the container");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(143));
    assert!(started.elapsed() < Duration::from_secs(5));
    p.finish(netns);
}

#[test]
fn memory_limit_oom_exits_137() {
    let p = prepare("oom");
    let netns = NetnsGuard::add(&name("oom"));
    let mut c = p.spec(
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        &netns,
    );
    c.resources = Resources {
        memory: Some(32 << 20),
        ..Default::default()
    };
    let out = p.run(&c);
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        text(&out.stderr)
    );
    // The same command fits without the limit.
    c.resources = Resources::default();
    let out = p.run(&c);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    p.finish(netns);
}

/// A layer tar with the given entries, built with the tar crate.
fn layer_tar(entries: &[(&str, tar::EntryType, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, kind, data, uid) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*kind);
        h.set_mode(if *kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(u64::from(*uid));
        h.set_gid(u64::from(*uid));
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        if matches!(kind, tar::EntryType::Char) {
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
        }
        b.append_data(&mut h, path, *data).unwrap();
    }
    b.into_inner().unwrap()
}

/// Stores a two-layer image by hand and returns its id.
fn two_layer_image(store: &Store, base: &[u8], top: &[u8]) -> ImageId {
    let guard = store.write_guard().unwrap();
    let d_base = store.write_blob_bytes(&guard, base).unwrap();
    let d_top = store.write_blob_bytes(&guard, top).unwrap();
    let config = ImageConfigurationBuilder::default()
        .config(ConfigBuilder::default().build().unwrap())
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![d_base.to_string(), d_top.to_string()])
                .build()
                .unwrap(),
        )
        .build()
        .unwrap();
    let config = serde_json::to_vec(&config).unwrap();
    let d_config = store.write_blob_bytes(&guard, &config).unwrap();
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config.len() as u64,
            d_config,
        ))
        .layers(vec![
            Descriptor::new(MediaType::ImageLayer, base.len() as u64, d_base),
            Descriptor::new(MediaType::ImageLayer, top.len() as u64, d_top),
        ])
        .build()
        .unwrap();
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let id = ImageId::new(store.write_blob_bytes(&guard, &manifest).unwrap());
    store
        .tag(&parse_reference("stagehand-test/layers:1").unwrap(), &id)
        .unwrap();
    id
}

#[test]
fn whiteouts_devices_and_owners_as_overlay_and_as_copy() {
    require_environment();
    use tar::EntryType as T;
    let scratch = scratch("whiteout");
    let store = Store::open(scratch.path().join("store")).unwrap();
    let base = layer_tar(&[
        ("etc/", T::Directory, b"", 0),
        ("etc/passwd", T::Regular, b"root", 0),
        ("etc/owned", T::Regular, b"mine", 1234),
        ("var/cache/", T::Directory, b"", 0),
        ("var/cache/old", T::Regular, b"old", 0),
        ("dev/", T::Directory, b"", 0),
        ("dev/null", T::Char, b"", 0),
    ]);
    let top = layer_tar(&[
        ("etc/.wh.passwd", T::Regular, b"", 0),
        ("var/cache/.wh..wh..opq", T::Regular, b"", 0),
        ("var/cache/new", T::Regular, b"new", 0),
    ]);
    let id = two_layer_image(&store, &base, &top);
    let guard = store.write_guard().unwrap();
    let layers = unpack::ensure_image_layers(&store, &guard, &id).unwrap();
    // The whiteout is a 0:0 char device, the opaque dir has the overlay xattr.
    let wh = fs::symlink_metadata(layers[1].path.join("etc/passwd")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    assert_eq!(
        xattr::get(layers[1].path.join("var/cache"), "trusted.overlay.opaque")
            .unwrap()
            .as_deref(),
        Some(&b"y"[..])
    );
    let null = fs::symlink_metadata(layers[0].path.join("dev/null")).unwrap();
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(
        fs::metadata(layers[0].path.join("etc/owned"))
            .unwrap()
            .uid(),
        1234
    );

    for (sub, kind) in [("overlay", RootfsKind::Overlay), ("copy", RootfsKind::Copy)] {
        let dir = scratch.path().join(sub);
        struct Remove(PathBuf);
        impl Drop for Remove {
            fn drop(&mut self) {
                let _ = stagehand_oci::rootfs::remove(&self.0);
            }
        }
        let _cleanup = Remove(dir.clone());
        let rootfs = match kind {
            RootfsKind::Overlay => Rootfs::create(&dir, &layers).unwrap(),
            RootfsKind::Copy => Rootfs::create_copy(&dir, &layers).unwrap(),
        };
        assert_eq!(rootfs.kind(), kind);
        let r = rootfs.path();
        assert!(!r.join("etc/passwd").exists(), "{sub}: whiteout");
        assert_eq!(fs::read(r.join("etc/owned")).unwrap(), b"mine", "{sub}");
        assert_eq!(
            fs::metadata(r.join("etc/owned")).unwrap().uid(),
            1234,
            "{sub}"
        );
        assert!(!r.join("var/cache/old").exists(), "{sub}: opaque dir");
        assert_eq!(fs::read(r.join("var/cache/new")).unwrap(), b"new", "{sub}");
        assert!(
            fs::symlink_metadata(r.join("dev/null"))
                .unwrap()
                .file_type()
                .is_char_device()
        );
        // Writes go to the container, never to the cached layers.
        fs::write(r.join("etc/owned"), b"changed").unwrap();
        assert_eq!(fs::read(layers[0].path.join("etc/owned")).unwrap(), b"mine");
        rootfs.remove().unwrap();
    }
    drop(guard);

    // prune keeps cached layers an overlay still uses, even once no name refers to them.
    let in_use = scratch.path().join("in-use");
    let rootfs = Rootfs::create(&in_use, &layers).unwrap();
    assert_eq!(store.remove("stagehand-test/layers:1").unwrap().len(), 1);
    let report = store.prune().unwrap();
    assert_eq!(report.layers_removed, 0);
    assert!(layers.iter().all(|l| l.path.is_dir()));
    rootfs.remove().unwrap();
    assert_eq!(store.prune().unwrap().layers_removed, 2);
    assert!(layers.iter().all(|l| !l.path.exists()));

    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*scratch.path().to_string_lossy()));
}

#[test]
fn runtime_errors_are_reported_with_stderr() {
    require_environment();
    let scratch = scratch("error");
    let runtime = RuncCli::locate(None, scratch.path().join("runc")).unwrap();
    let control = Control::new(&runtime, &exec_std);
    assert_eq!(control.state("stagehand-test-nonexistent").unwrap(), None);
    assert!(!control.delete("stagehand-test-nonexistent", false).unwrap());
    // `--force` makes runc succeed on a missing container.
    assert!(control.delete("stagehand-test-nonexistent", true).unwrap());
    assert!(
        !control
            .kill("stagehand-test-nonexistent", libc::SIGTERM, false)
            .unwrap()
    );
    assert!(control.list().unwrap().is_empty());
    // A bundle without config.json: runc fails, and says so on stderr.
    let argv = runtime.run_argv(scratch.path(), &name("error"));
    let out = Command::new(&argv[0]).args(&argv[1..]).output().unwrap();
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("config.json"),
        "{}",
        text(&out.stderr)
    );
}
