//! End-to-end: hostile image archives through the built `stagehand` binary (`image load`,
//! `image import`, then `run` in containers under runc).
//!
//! Owns: the "bad input: hostile archives" proofs beyond the two escapes of
//! `container_e2e.rs`: hard links whose target escapes (`..`, absolute, through a symlinked
//! parent), symlink-then-write tricks (through an absolute link, a chain of two links, a
//! directory replaced by a link), whiteouts of `..`, layers whose digest or diff_id does not
//! match, truncated gzip layers, a 10 GiB sparse entry (disk use measured), 1500- and
//! 5000-level trees and over-long names, device nodes and fifos, a tar bomb of many small
//! files, and duplicate entries. Each refused archive must fail with a message naming the
//! entry (or digest) and the archive, write nothing outside the store, and leave the store
//! consistent and usable: a good image is loaded and run from it after every bad one.
//! Does not own: the helpers (`stagehand_e2e::{e2e, images, faults, hostile, sandbox}`), the
//! unpacker's own unit tests (`oci/src/unpack.rs`).
//!
//! Needs root, runc, catatonit, busybox-static, and `cargo build -p stagehand` beforehand.
//! Every store is a temp dir of the test (never /var/lib/stagehand), removed when it ends.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use stagehand_e2e::e2e::{Finished, Workspace, pipeline};
use stagehand_e2e::faults::assert_store_consistent;
use stagehand_e2e::hostile::{self, Member, Scratch, du_bytes, gzip};
use stagehand_e2e::images::{
    BUSYBOX_IMAGE, assert_container_run_gone, docker_archive, image_cmd, image_config, oci_archive,
    sha256_hex, suite_store, with_store,
};
use stagehand_e2e::sandbox::{self, require_root};
use stagehand_oci::store::Store;

/// The good image every store gets back after a bad archive: the suite's busybox as an
/// oci-archive, and its one (uncompressed) layer, the base of the hostile images that need a
/// shell.
struct Good {
    archive: PathBuf,
    layer: Vec<u8>,
}

fn good() -> &'static Good {
    static GOOD: OnceLock<Good> = OnceLock::new();
    GOOD.get_or_init(|| {
        let suite = suite_store();
        let library = Store::open(suite.root()).expect("open the suite store");
        // Next to the suite store: removed with it when the test binary exits.
        let archive = suite
            .root()
            .parent()
            .expect("the suite store has a parent")
            .join("hostile-good.oci.tar");
        let mut file = std::fs::File::create(&archive).expect("create the good archive");
        stagehand_oci::archive::save(&library, &[BUSYBOX_IMAGE], &mut file)
            .expect("save the busybox image");
        let id = library
            .resolve(BUSYBOX_IMAGE)
            .expect("resolve busybox")
            .expect("busybox is in the suite store");
        let manifest = library.manifest(&id).expect("its manifest");
        let layer = library
            .read_blob(manifest.layers()[0].digest())
            .expect("its layer");
        Good { archive, layer }
    })
}

/// One test's workspace and scratch dir (its store, its archives, `outside/`).
struct Ctx {
    ws: Workspace,
    s: Scratch,
}

impl Ctx {
    fn new() -> Ctx {
        require_root();
        let ws = Workspace::new();
        let s = Scratch::new(ws.marker());
        Ctx { ws, s }
    }

    fn marker(&self) -> &str {
        self.ws.marker()
    }

    /// `stagehand image --root STORE load ARCHIVE`, the archive written from `bytes`.
    fn load(&self, name: &str, bytes: &[u8]) -> (PathBuf, Finished) {
        let archive = self.s.archive(name, bytes);
        let out = image_cmd(
            self.marker(),
            &self.s.store(),
            &[OsStr::new("load"), archive.as_os_str()],
        );
        (archive, out)
    }

    /// `stagehand image --root STORE import TAR --tag TAG`, the tar written from `bytes`.
    fn import(&self, name: &str, bytes: &[u8], tag: &str) -> (PathBuf, Finished) {
        let archive = self.s.archive(name, bytes);
        let out = image_cmd(
            self.marker(),
            &self.s.store(),
            &[
                OsStr::new("import"),
                archive.as_os_str(),
                OsStr::new("--tag"),
                OsStr::new(tag),
            ],
        );
        (archive, out)
    }

    /// Run `check` (a shell script) in `image` from this test's store, unprivileged or not.
    fn check(&self, image: &str, check: &str, privileged: bool) -> Finished {
        std::fs::write(self.ws.path().join("check.sh"), check).expect("write check.sh");
        let file = if privileged {
            "hostile-check-privileged.yaml"
        } else {
            "hostile-check.yaml"
        };
        let out = sandbox::run(
            with_store(
                self.ws.stagehand_run(&pipeline(file)),
                &self.s.store(),
                self.marker(),
            )
            .arg("--var")
            .arg(format!("image={image}")),
        );
        assert_container_run_gone(&out, self.marker(), &[&self.s.store()]);
        out
    }

    /// The store is consistent, the good image loads into it, and runs.
    fn assert_usable(&self, case: &str) {
        self.s.assert_nothing_outside(case);
        assert_store_consistent(self.marker(), &self.s.store());
        let load = image_cmd(
            self.marker(),
            &self.s.store(),
            &[OsStr::new("load"), good().archive.as_os_str()],
        );
        load.assert_code(0);
        let out = self.check(
            BUSYBOX_IMAGE,
            &format!("echo 'still usable after {case}'\n"),
            false,
        );
        out.assert_code(0);
        assert_eq!(
            out.step_output("check"),
            [format!("still usable after {case}")],
            "{}",
            out.dump()
        );
    }
}

/// Panic unless `out` (a failed `image load` or `import` of `archive`) exited with `code` and
/// its stderr names the archive and every one of `needles`.
fn assert_refused(case: &str, out: &Finished, code: i32, archive: &Path, needles: &[&str]) {
    assert_eq!(
        out.code,
        Some(code),
        "{case}: not refused as expected\n{}",
        out.dump()
    );
    let archive = archive.display().to_string();
    for n in std::iter::once(archive.as_str()).chain(needles.iter().copied()) {
        assert!(
            out.stderr.contains(n),
            "{case}: the error does not name {n:?}\n{}",
            out.dump()
        );
    }
}

/// A docker-archive named `name` of busybox plus `layer` on top.
fn over_busybox(name: &str, layer: &[u8]) -> Vec<u8> {
    let layers = [good().layer.clone(), layer.to_vec()];
    docker_archive(&[name], &image_config(&layers, &["/bin/sh"]), &layers)
}

/// The image with only `layer`, as a docker-archive named `name`.
fn alone(name: &str, layer: &[u8]) -> Vec<u8> {
    docker_archive(
        &[name],
        &image_config(&[layer.to_vec()], &["/bin/sh"]),
        &[layer.to_vec()],
    )
}

#[test]
fn link_escapes_and_write_through_tricks_are_refused_on_load_and_import() {
    let cx = Ctx::new();
    let outside = cx.s.outside();
    let out_str = outside.to_str().expect("a UTF-8 temp path");
    let esc = cx.s.escape.clone();
    let passwd_before = std::fs::metadata("/etc/passwd").expect("stat /etc/passwd");
    // (case, layer, the entry the error must name)
    let cases: Vec<(&str, Vec<Member>, String)> = vec![
        (
            "hard link to ../../etc/passwd",
            vec![Member::hard_link("h", "../../../../../../etc/passwd")],
            "h".into(),
        ),
        (
            "hard link to /etc/passwd (no etc/passwd in the layer)",
            vec![Member::hard_link("h", "/etc/passwd")],
            "h".into(),
        ),
        (
            "hard link through a symlinked parent",
            vec![
                Member::symlink("l", "/etc"),
                Member::hard_link("h", "l/passwd"),
            ],
            "h".into(),
        ),
        (
            "hard link through a parent climbing out",
            vec![
                Member::symlink("up", "../../../../../../.."),
                Member::hard_link("h", "up/etc/passwd"),
            ],
            "h".into(),
        ),
        (
            "write through an absolute symlink",
            vec![
                Member::symlink("evil", out_str),
                Member::file(&format!("evil/{esc}"), "pwned\n"),
            ],
            format!("evil/{esc}"),
        ),
        (
            "write through a chain of two symlinks",
            vec![
                Member::symlink("a", "b/.."),
                Member::symlink("b", ".."),
                Member::file(&format!("a/{esc}"), "pwned\n"),
            ],
            format!("a/{esc}"),
        ),
        (
            "directory replaced by a symlink, then written through",
            vec![
                Member::dir("d/"),
                Member::file("d/ok", "ok\n"),
                Member::symlink("d", out_str),
                Member::file(&format!("d/{esc}"), "pwned\n"),
            ],
            format!("d/{esc}"),
        ),
        (
            "hard link through a directory replaced by a symlink",
            vec![
                Member::dir("etc/"),
                Member::symlink("etc", "/etc"),
                Member::hard_link(&esc, "etc/passwd"),
            ],
            esc.clone(),
        ),
        (
            "whiteout of ..",
            vec![Member::dir("etc/"), Member::file("etc/.wh...", "")],
            "etc/.wh...".into(),
        ),
        (
            "a name with ..",
            vec![Member::file(&format!("x/../../../../{esc}"), "pwned\n")],
            format!("x/../../../../{esc}"),
        ),
    ];
    for (i, (case, members, entry)) in cases.iter().enumerate() {
        let layer = hostile::tar(members);
        // `image load` of a docker-archive.
        let (archive, out) = cx.load(&format!("case{i}.tar"), &alone("evil/links:1", &layer));
        assert_refused(case, &out, 2, &archive, &["refusing entry", entry]);
        assert!(
            out.stderr.contains("the archive was not loaded"),
            "{}",
            out.dump()
        );
        // `image import` of the layer tar itself.
        let (tar, out) = cx.import(&format!("case{i}.layer.tar"), &layer, "evil/import:1");
        assert_refused(case, &out, 1, &tar, &["refusing entry", entry]);
        let ls = image_cmd(cx.marker(), &cx.s.store(), &["ls"]);
        assert!(
            !ls.stdout.contains("evil/"),
            "{case}: a refused image is listed\n{}",
            ls.dump()
        );
        cx.assert_usable(case);
    }
    let passwd = std::fs::metadata("/etc/passwd").expect("stat /etc/passwd");
    assert_eq!(
        (passwd.ino(), passwd.nlink(), passwd.len()),
        (
            passwd_before.ino(),
            passwd_before.nlink(),
            passwd_before.len()
        ),
        "/etc/passwd changed"
    );
}

#[test]
fn harmless_tricks_load_without_touching_what_they_aim_at() {
    let cx = Ctx::new();
    let outside = cx.s.outside();
    let out_str = outside.to_str().expect("a UTF-8 temp path");
    let victim = cx.s.path().join("victim");
    std::fs::write(&victim, "original\n").expect("write the victim");
    let mode_before = std::fs::metadata(&outside).unwrap().mode();
    let layer = hostile::tar(&[
        // A symlink at a file's place, then the file: replaced, not written through.
        Member::symlink("file", victim.to_str().unwrap()),
        Member::file("file", "replaced\n"),
        // A 0777 directory replaced by a symlink: its mode must not land on the target.
        Member::Dir {
            name: "d/".into(),
            mode: 0o777,
        },
        Member::symlink("d", out_str),
        // Duplicates: the last one wins, whatever the kinds.
        Member::file("dup", "first\n"),
        Member::file("dup", "second\n"),
        Member::dir("was-dir/"),
        Member::file("was-dir/inner", "gone\n"),
        Member::file("was-dir", "now a file\n"),
        Member::file("was-file", "gone\n"),
        Member::dir("was-file/"),
        Member::file("was-file/inner", "now a dir\n"),
        // A hard link keeps the content it linked, when its source is replaced later.
        Member::file("orig", "linked\n"),
        Member::hard_link("link", "orig"),
        Member::file("orig", "replaced later\n"),
        // Absolute names and absolute hard-link targets stay inside.
        Member::file("/abs", "absolute\n"),
        Member::hard_link("abs-link", "/abs"),
    ]);
    let (_, out) = cx.load("tricks.tar", &over_busybox("evil/tricks:1", &layer));
    out.assert_code(0);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "original\n");
    assert_eq!(std::fs::metadata(&outside).unwrap().mode(), mode_before);
    cx.s.assert_nothing_outside("tricks");
    let run = cx.check(
        "evil/tricks:1",
        "cat /file /dup /was-dir /was-file/inner /link /orig /abs /abs-link\n\
         echo \"d -> $(readlink /d)\"\n",
        false,
    );
    run.assert_code(0);
    assert_eq!(
        run.step_output("check"),
        [
            "replaced",
            "second",
            "now a file",
            "now a dir",
            "linked",
            "replaced later",
            "absolute",
            "absolute",
            &format!("d -> {out_str}"),
        ],
        "{}",
        run.dump()
    );
    cx.assert_usable("tricks");
}

#[test]
fn bad_digests_and_truncated_layers_are_refused_naming_them() {
    let cx = Ctx::new();
    let layer = hostile::tar(&[Member::file("hello", "hello\n")]);
    let config = image_config(std::slice::from_ref(&layer), &["/bin/sh"]);

    // 1. oci-archive: the layer blob's content does not hash to its name.
    let good_archive = oci_archive(
        "docker.io/evil/digest:1",
        &config,
        std::slice::from_ref(&layer),
    );
    let hex = sha256_hex(&layer);
    let tampered = hostile::tar(&[Member::file("hello", "HELLO\n")]);
    assert_eq!(tampered.len(), layer.len());
    let mut bytes = good_archive.clone();
    let at = bytes
        .windows(layer.len())
        .position(|w| w == layer.as_slice())
        .expect("the layer is in the archive");
    bytes[at..at + layer.len()].copy_from_slice(&tampered);
    let (archive, out) = cx.load("blob-digest.tar", &bytes);
    assert_refused("blob digest", &out, 2, &archive, &[&hex]);
    cx.assert_usable("a blob not matching its digest");

    // 2. oci-archive: the manifest names a layer the archive does not have (its member is
    //    renamed out of `blobs/`).
    let mut bytes = good_archive.clone();
    let name = format!("blobs/sha256/{hex}");
    let at = bytes
        .windows(name.len())
        .position(|w| w == name.as_bytes())
        .expect("the layer's member name");
    bytes[at + 4] = b'z';
    // The member's header checksum covers the name: fix it.
    let header = at - at % 512;
    let mut h = [0u8; 512];
    h.copy_from_slice(&bytes[header..header + 512]);
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    bytes[header + 148..header + 156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    let (archive, out) = cx.load("missing-layer.tar", &bytes);
    assert_refused(
        "missing layer",
        &out,
        2,
        &archive,
        &["does not contain", &hex],
    );
    cx.assert_usable("a manifest naming a missing layer");

    // 3. docker-archive: the config's diff_id is not the layer's.
    let other = hostile::tar(&[Member::file("other", "other\n")]);
    let config_lie = image_config(std::slice::from_ref(&other), &["/bin/sh"]);
    let bytes = docker_archive(
        &["evil/diffid:1"],
        &config_lie,
        std::slice::from_ref(&layer),
    );
    let (archive, out) = cx.load("diff-id.tar", &bytes);
    assert_refused(
        "diff_id",
        &out,
        2,
        &archive,
        &["does not match its diff_id", &sha256_hex(&other)],
    );
    cx.assert_usable("a layer not matching its diff_id");

    // 4. docker-archive with a truncated gzip layer: named by its digest.
    let big = hostile::tar(&[Member::file(
        "data",
        (0..200_000u32)
            .flat_map(|i| i.to_le_bytes())
            .collect::<Vec<u8>>(),
    )]);
    let gz = gzip(&big);
    let truncated = gz[..gz.len() / 2].to_vec();
    let config = image_config(std::slice::from_ref(&big), &["/bin/sh"]);
    let bytes = docker_archive(
        &["evil/truncated:1"],
        &config,
        std::slice::from_ref(&truncated),
    );
    let (archive, out) = cx.load("truncated.tar", &bytes);
    assert_refused(
        "truncated gzip",
        &out,
        2,
        &archive,
        &[&format!("layer sha256:{}", sha256_hex(&truncated))],
    );
    cx.assert_usable("a truncated gzip layer");

    // 5. `image import` of a truncated gzip tar.
    let (tar, out) = cx.import("truncated.tar.gz", &truncated, "evil/truncated-import:1");
    assert_refused("truncated import", &out, 1, &tar, &["cannot read"]);
    cx.assert_usable("a truncated gzip import");
}

#[test]
fn ten_gib_sparse_entry_unpacks_sparse() {
    let cx = Ctx::new();
    let size: u64 = 10 << 30;
    let layer = hostile::tar(&[Member::Sparse {
        name: "sparse".into(),
        size,
        data: vec![b'h'; 512],
        tail: b"tail".to_vec(),
    }]);
    assert!(layer.len() < 4096, "the layer is {} bytes", layer.len());
    let started = Instant::now();
    let (_, out) = cx.load("sparse.tar", &over_busybox("evil/sparse:1", &layer));
    let took = started.elapsed();
    out.assert_code(0);
    let store_du = du_bytes(&cx.s.store());
    eprintln!(
        "hostile: a 10 GiB sparse entry loaded in {took:?}; the store uses {} KiB of disk",
        store_du >> 10
    );
    assert!(
        store_du < 64 << 20,
        "the store uses {store_du} bytes of disk after a 10 GiB sparse entry"
    );
    assert!(took < Duration::from_secs(40), "loading took {took:?}");
    let run = cx.check(
        "evil/sparse:1",
        "stat -c %s /sparse\ntail -c 4 /sparse; echo\nhead -c 3 /sparse; echo\n",
        false,
    );
    run.assert_code(0);
    assert_eq!(
        run.step_output("check"),
        [size.to_string().as_str(), "tail", "hhh"],
        "{}",
        run.dump()
    );
    // `image import` of the same tar: also bounded.
    let (_, out) = cx.import("sparse.layer.tar", &layer, "evil/sparse-import:1");
    out.assert_code(0);
    let store_du = du_bytes(&cx.s.store());
    assert!(store_du < 64 << 20, "{store_du} bytes after the import");
    cx.assert_usable("a 10 GiB sparse entry");
}

#[test]
fn deep_trees_and_long_names_are_bounded() {
    let cx = Ctx::new();
    // 1500 levels (3000 bytes of path): loads, quickly, and the container reads the bottom.
    let (layer, bottom) = hostile::deep_layer(1500, "a");
    let started = Instant::now();
    let (_, out) = cx.load("deep.tar", &over_busybox("evil/deep:1", &layer));
    let took = started.elapsed();
    out.assert_code(0);
    eprintln!("hostile: a 1500-level tree loaded in {took:?}");
    assert!(took < Duration::from_secs(15), "{took:?}");
    let run = cx.check("evil/deep:1", &format!("cat /{bottom}\n"), false);
    run.assert_code(0);
    assert_eq!(run.step_output("check"), ["found"], "{}", run.dump());

    // 5000 levels: refused by name before the kernel's PATH_MAX, in bounded time.
    let (layer, _) = hostile::deep_layer(5000, "a");
    let started = Instant::now();
    let (archive, out) = cx.load("deeper.tar", &alone("evil/deeper:1", &layer));
    let took = started.elapsed();
    eprintln!("hostile: a 5000-level tree refused in {took:?}");
    assert_refused(
        "5000 levels",
        &out,
        2,
        &archive,
        &["refusing entry", "PATH_MAX"],
    );
    assert!(took < Duration::from_secs(15), "{took:?}");
    cx.assert_usable("5000 levels");

    // A component over NAME_MAX.
    let long = "n".repeat(300);
    let layer = hostile::tar(&[Member::file(&format!("dir/{long}"), "x")]);
    let (archive, out) = cx.load("long-name.tar", &alone("evil/long:1", &layer));
    assert_refused(
        "long name",
        &out,
        2,
        &archive,
        &["refusing entry", "300 bytes"],
    );
    cx.assert_usable("a 300-byte name");
}

/// A host character device this (root) host can read but an unprivileged container must
/// not: the hardware RNG, 10:183. (On the lab machine even root cannot open the disks, so a
/// disk node alone would prove nothing about the container's device cgroup.)
const HWRNG: (u32, u32) = (10, 183);

#[test]
fn device_nodes_load_but_reach_no_host_device_unprivileged() {
    let cx = Ctx::new();
    assert!(
        std::fs::File::open("/dev/hwrng").is_ok(),
        "the host cannot read /dev/hwrng: the test needs a device it can read"
    );
    // The host's root disk, as the block device backing `/`.
    let root_dev = std::fs::metadata("/").expect("stat /").dev();
    let (major, minor) = (libc::major(root_dev), libc::minor(root_dev));
    let layer = hostile::tar(&[
        Member::dir("evil/"),
        Member::Block {
            name: "evil/disk".into(),
            major,
            minor,
        },
        Member::Char {
            name: "evil/hwrng".into(),
            major: HWRNG.0,
            minor: HWRNG.1,
        },
        Member::Char {
            name: "evil/kmsg".into(),
            major: 1,
            minor: 11,
        },
        Member::Fifo {
            name: "evil/fifo".into(),
        },
    ]);
    let (_, out) = cx.load("devices.tar", &over_busybox("evil/devices:1", &layer));
    out.assert_code(0);
    // The policy as root: device nodes are unpacked as they are (images may carry them); the
    // device cgroup decides what a container may open.
    let unpacked: Vec<PathBuf> = hostile::files_named(&cx.s.store().join("layers"), "disk")
        .into_iter()
        .filter(|p| p.ends_with("evil/disk"))
        .collect();
    assert_eq!(unpacked.len(), 1, "{unpacked:?}");
    let m = std::fs::symlink_metadata(&unpacked[0]).unwrap();
    assert_eq!(m.mode() & libc::S_IFMT, libc::S_IFBLK);
    assert_eq!(m.rdev(), root_dev);

    let read = |path: &str| {
        format!(
            "if head -c 1 {path} >/dev/null 2>&1; then echo '{path}: readable'; else echo '{path}: denied'; fi\n"
        )
    };
    let mut probe: String = ["/evil/disk", "/evil/hwrng", "/evil/kmsg"]
        .iter()
        .map(|p| read(p))
        .collect();
    probe.push_str(&format!(
        "mknod /rng c {} {} && echo 'mknod: made'\n",
        HWRNG.0, HWRNG.1
    ));
    probe.push_str(&read("/rng"));
    probe.push_str("[ -p /evil/fifo ] && echo 'fifo: a fifo'\n");
    probe.push_str("cat /sys/fs/cgroup/devices/devices.list\n");
    let run = cx.check("evil/devices:1", &probe, false);
    run.assert_code(0);
    let lines = run.step_output("check");
    assert_eq!(
        lines[..6],
        [
            "/evil/disk: denied",
            "/evil/hwrng: denied",
            "/evil/kmsg: denied",
            // CAP_MKNOD is in the default set (as in Docker): making the node works, opening
            // it does not.
            "mknod: made",
            "/rng: denied",
            "fifo: a fifo",
        ],
        "{}",
        run.dump()
    );
    // The container's device cgroup is an allow-list, not "everything".
    let rules = &lines[6..];
    assert!(
        !rules.is_empty() && !rules.iter().any(|r| r.starts_with("a ")),
        "the unprivileged device cgroup allows everything: {rules:?}\n{}",
        run.dump()
    );

    // `privileged: true` is documented to get every host device: the device cgroup allows
    // all, the host's nodes are in /dev, and the image's node of the RNG reads.
    let devname = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/uevent"))
        .ok()
        .and_then(|u| {
            u.lines()
                .find_map(|l| l.strip_prefix("DEVNAME=").map(str::to_string))
        })
        .unwrap_or_else(|| panic!("no DEVNAME for the root disk {major}:{minor}"));
    let mut probe = read("/evil/hwrng");
    probe.push_str(&read("/dev/hwrng"));
    probe.push_str(&format!(
        "[ -b /dev/{devname} ] && echo '/dev/{devname}: a block device'\n"
    ));
    probe.push_str("cat /sys/fs/cgroup/devices/devices.list\n");
    let run = cx.check("evil/devices:1", &probe, true);
    run.assert_code(0);
    assert_eq!(
        run.step_output("check"),
        [
            "/evil/hwrng: readable".to_string(),
            "/dev/hwrng: readable".to_string(),
            format!("/dev/{devname}: a block device"),
            "a *:* rwm".to_string(),
        ],
        "{}",
        run.dump()
    );
    cx.assert_usable("device nodes");
}

#[test]
fn tar_bomb_of_many_small_files_loads_in_bounded_time() {
    let cx = Ctx::new();
    const DIRS: usize = 10;
    const PER_DIR: usize = 1000;
    let mut members = Vec::with_capacity(DIRS * (PER_DIR + 1));
    for d in 0..DIRS {
        members.push(Member::dir(&format!("bomb/{d}/")));
        for f in 0..PER_DIR {
            members.push(Member::file(&format!("bomb/{d}/{f}"), ""));
        }
    }
    let layer = hostile::tar(&members);
    let gz = gzip(&layer);
    let config = image_config(&[good().layer.clone(), layer.clone()], &["/bin/sh"]);
    let bytes = docker_archive(
        &["evil/bomb:1"],
        &config,
        &[good().layer.clone(), gz.clone()],
    );
    let started = Instant::now();
    let (_, out) = cx.load("bomb.tar", &bytes);
    let took = started.elapsed();
    out.assert_code(0);
    eprintln!(
        "hostile: {} files from a {} KiB gzip layer loaded in {took:?}",
        DIRS * PER_DIR,
        gz.len() >> 10
    );
    assert!(took < Duration::from_secs(30), "{took:?}");
    let run = cx.check("evil/bomb:1", "ls /bomb/*/ | grep -c '^[0-9]'\n", false);
    run.assert_code(0);
    assert_eq!(
        run.step_output("check"),
        [(DIRS * PER_DIR).to_string()],
        "{}",
        run.dump()
    );
    // Removing the image and pruning takes the unpacked files with it.
    image_cmd(cx.marker(), &cx.s.store(), &["rm", "evil/bomb:1"]).assert_code(0);
    let pruned = image_cmd(cx.marker(), &cx.s.store(), &["prune"]);
    pruned.assert_code(0);
    assert!(
        hostile::files_named(&cx.s.store().join("layers"), "bomb").is_empty(),
        "{}",
        pruned.dump()
    );
    cx.assert_usable("a tar bomb");
}

/// A refused archive that carries the name of an image already in the store does not take
/// that name away: the good image is still there, under its name, and runs.
#[test]
fn a_refused_archive_leaves_a_good_image_of_the_same_name_alone() {
    let cx = Ctx::new();
    let load = image_cmd(
        cx.marker(),
        &cx.s.store(),
        &[OsStr::new("load"), good().archive.as_os_str()],
    );
    load.assert_code(0);
    let layer = hostile::tar(&[Member::hard_link("h", "../../../../../../etc/passwd")]);
    let (archive, out) = cx.load("same-name.tar", &over_busybox(BUSYBOX_IMAGE, &layer));
    assert_refused("same name as a good image", &out, 2, &archive, &["h"]);
    let out = cx.check(BUSYBOX_IMAGE, "echo the good image is still here\n", false);
    out.assert_code(0);
    assert_eq!(
        out.step_output("check"),
        ["the good image is still here"],
        "{}",
        out.dump()
    );
}
