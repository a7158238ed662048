//! End-to-end: container steps (a step with an `image`) of the built `stagehand` binary, run
//! as OCI containers under runc inside the stage pod, with images from stagehand's own store.
//!
//! Owns: the proofs for containers: a busybox image built by the suite with
//! `stagehand image import` runs, and so does the same image round-tripped through an
//! oci-archive (`stagehand_oci::archive::save`) and a hand-written docker-archive loaded into
//! fresh stores; container Run steps propagate exit codes, stream output, obey timeouts and
//! pass output variables to host steps; the Sauce Connect pattern (a Background container
//! with `portBindings`, polled by a host step with curl, and reached from outside); step ids
//! as hostnames from containers, inside a step group and after it; memory limits, `runAsUser`
//! and `privileged`; an EmptyDir volume shared by two containers; malicious layer archives
//! refused without writing outside the store; and the error for an image that is not there.
//! Every test ends with [`assert_container_run_gone`]: no cgroup of the run in any hierarchy,
//! no mount under the run dir or the image store, no process carrying the test's marker or
//! the run id, no container in the runtime's state, a finished journal.
//! Does not own: the helpers (`stagehand_e2e::{e2e, sandbox, images}`), pulling from a
//! registry (never attempted here: every image is in a store the suite made), or host steps
//! (`host_e2e.rs`, `sandbox_e2e.rs`).
//!
//! Needs root, runc, catatonit, busybox-static (`/bin/busybox`), slirp4netns, curl, and
//! `cargo build -p stagehand` beforehand. Images live in a store under the temp dir made once
//! per test binary, never in /var/lib/stagehand. `STAGEHAND_E2E_RUNTIME` picks another runtime.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stagehand_e2e::e2e::{
    Finished, Running, Workspace, assert_ports_closed, assert_ports_free, pipeline, processes_with,
};
use stagehand_e2e::hostile::files_named;
use stagehand_e2e::images::cap_eff;
use stagehand_e2e::images::{
    self, BUSYBOX_IMAGE, TarEntry, assert_container_run_gone, docker_archive, image_cmd,
    image_config, oci_archive, sha256_hex, suite_store, tar, with_store,
};
use stagehand_e2e::sandbox::{self, curl, require_root};
use stagehand_oci::store::Store;

/// The port the Sauce Connect pipeline publishes on the host (the reference's).
const SAUCE_PORT: u16 = 8032;

/// `stagehand run FILE` in `ws` with the image store `store`, the marker and extra arguments,
/// to completion.
fn run_in(ws: &Workspace, file: &str, store: &Path, extra: &[&str]) -> Finished {
    sandbox::run(command(ws, file, store, extra))
}

/// The same, started (returns once the stage banner is out).
fn spawn_in(ws: &Workspace, file: &str, store: &Path, extra: &[&str]) -> Running {
    sandbox::spawn(command(ws, file, store, extra))
}

fn command(
    ws: &Workspace,
    file: &str,
    store: &Path,
    extra: &[&str],
) -> stagehand_e2e::e2e::StagehandCmd {
    let mut cmd = with_store(ws.stagehand_run(&pipeline(file)), store, ws.marker());
    for a in extra {
        cmd = cmd.arg(a);
    }
    cmd
}

/// `run_in` with the suite's store.
fn run(ws: &Workspace, file: &str, extra: &[&str]) -> Finished {
    run_in(ws, file, suite_store().root(), extra)
}

/// The id `stagehand image ls` shows for `name` (a full name) in `store`.
fn listed_id(marker: &str, store: &Path, name: &str) -> String {
    let ls = image_cmd(marker, store, &["ls"]);
    ls.assert_code(0);
    ls.stdout
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(name)).then(|| f.next().unwrap_or_default().to_string())
        })
        .unwrap_or_else(|| panic!("`image ls` does not list {name}\n{}", ls.dump()))
}

/// A temp dir for archives and fresh stores, named after the test's marker.
fn scratch(ws: &Workspace, what: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("{}-{what}-", ws.marker()))
        .tempdir()
        .expect("create a scratch dir")
}

/// Run `container-echo.yaml` from `store`, expecting "hello from SOURCE", and check the run
/// left nothing (also no mount of `store`).
fn echo_from(ws: &Workspace, store: &Path, source: &str) {
    let out = run_in(
        ws,
        "container-echo.yaml",
        store,
        &["--var", &format!("source={source}")],
    );
    out.assert_code(0);
    out.assert_stdout_has(&format!("--> hello running in {BUSYBOX_IMAGE}"));
    assert_eq!(
        out.step_output("hello"),
        [format!("hello from {source}")],
        "{}",
        out.dump()
    );
    assert_container_run_gone(&out, ws.marker(), &[store, suite_store().root()]);
}

#[test]
fn busybox_image_runs_from_import_oci_archive_and_docker_archive() {
    require_root();
    let suite = suite_store();
    let ws = Workspace::new();
    let marker = ws.marker();
    let full_name = format!("docker.io/{BUSYBOX_IMAGE}");

    // 1. As imported from the root filesystem directory.
    let imported_id = listed_id(marker, suite.root(), &full_name);
    echo_from(&ws, suite.root(), "import");

    let dir = scratch(&ws, "archives");
    let library = Store::open(suite.root()).expect("open the suite store");

    // 2. Saved as an oci-archive by the library, loaded into a fresh store: same image id
    //    (the manifest travels unchanged).
    let oci_tar = dir.path().join("busybox.oci.tar");
    let mut file = std::fs::File::create(&oci_tar).expect("create the oci-archive");
    stagehand_oci::archive::save(&library, &[BUSYBOX_IMAGE], &mut file)
        .expect("save the busybox image as an oci-archive");
    drop(file);
    let oci_store = dir.path().join("oci-store");
    let load = image_cmd(
        marker,
        &oci_store,
        &[OsStr::new("load"), oci_tar.as_os_str()],
    );
    load.assert_code(0);
    assert_eq!(
        load.stdout.trim_end(),
        format!("loaded {full_name} ({imported_id})"),
        "{}",
        load.dump()
    );
    assert_eq!(listed_id(marker, &oci_store, &full_name), imported_id);
    echo_from(&ws, &oci_store, "oci-archive");

    // 3. A docker-archive written by hand from the same config and layer blobs: a new
    //    manifest (so a new id), the same layer (same diff_id).
    let id = library
        .resolve(BUSYBOX_IMAGE)
        .expect("resolve the busybox image")
        .expect("the busybox image is in the suite store");
    let manifest = library.manifest(&id).expect("its manifest");
    let config = library
        .read_blob(manifest.config().digest())
        .expect("its config");
    let layers: Vec<Vec<u8>> = manifest
        .layers()
        .iter()
        .map(|l| library.read_blob(l.digest()).expect("a layer blob"))
        .collect();
    assert_eq!(layers.len(), 1, "an imported image has one layer");
    let docker_tar = dir.path().join("busybox.docker.tar");
    std::fs::write(
        &docker_tar,
        docker_archive(&[BUSYBOX_IMAGE], &config, &layers),
    )
    .expect("write the docker-archive");
    let docker_store = dir.path().join("docker-store");
    let load = image_cmd(
        marker,
        &docker_store,
        &[OsStr::new("load"), docker_tar.as_os_str()],
    );
    load.assert_code(0);
    load.assert_stdout_has(&format!("loaded {full_name} ("));
    let inspect = image_cmd(marker, &docker_store, &["inspect", BUSYBOX_IMAGE]);
    inspect.assert_code(0);
    let shown: serde_json::Value = serde_json::from_str(&inspect.stdout)
        .unwrap_or_else(|e| panic!("inspect output is not JSON: {e}\n{}", inspect.dump()));
    assert_eq!(
        shown["layers"][0]["diff_id"],
        format!("sha256:{}", sha256_hex(&layers[0])),
        "{}",
        inspect.dump()
    );
    echo_from(&ws, &docker_store, "docker-archive");
}

#[test]
fn exit_code_of_a_container_step_fails_the_stage() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "container-exit.yaml", &[]);
    out.assert_code(1);
    // It ran in the image, as root, in the workspace mounted at /harness.
    assert_eq!(
        out.step_output("fail"),
        ["exiting with 7 as 0 in /harness"],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("<-- fail FAILED: exit code 7");
    assert!(
        out.summary_row("fail").ends_with("FAILED: exit code 7"),
        "{}",
        out.summary_row("fail")
    );
    out.assert_stdout_has("<-- after skipped");
    assert!(!out.stdout.contains("after ran"), "{}", out.dump());
    out.assert_stdout_has("stage build FAILED");
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn container_output_is_streamed_while_it_runs() {
    require_root();
    let ws = Workspace::new();
    let running = spawn_in(&ws, "container-stream.yaml", suite_store().root(), &[]);
    // The container waits for `go`, which only exists once its first line reached us.
    running.wait_for_stdout("| tick 1", Duration::from_secs(15));
    assert!(
        !running.stdout().contains("tick 2"),
        "tick 2 before go\n{}",
        running.stdout()
    );
    // The leak checks can see container processes: the step's shell carries the marker in
    // its environment (the stage variable `marker`).
    let seen = processes_with(ws.marker());
    assert!(
        seen.iter()
            .any(|p| p.cmdline.contains("/stagehand/talk") && p.found_in == "environ"),
        "the container's shell does not carry the marker: {seen:#?}"
    );
    std::fs::write(ws.path().join("go"), "").expect("create go");
    let out = running.wait(Duration::from_secs(20));
    out.assert_code(0);
    assert_eq!(
        out.step_output("talk"),
        ["tick 1", "tick 2"],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("<-- talk passed");
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn output_variables_of_a_container_step_reach_a_host_step() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "container-outputs.yaml", &[]);
    out.assert_code(0);
    out.assert_stdout_has("--> consume running on the host");
    assert_eq!(
        out.step_output("consume"),
        ["got: hello from produce as uid 0"],
        "{}",
        out.dump()
    );
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn container_step_obeys_its_timeout() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "container-timeout.yaml", &[]);
    out.assert_code(1);
    assert_eq!(out.step_output("slow"), ["sleeping"], "{}", out.dump());
    out.assert_stdout_has("<-- slow TIMED OUT: timed out after 4s");
    out.assert_stdout_has("<-- after skipped");
    assert!(
        out.elapsed < Duration::from_secs(15),
        "the timed-out container held the stage for {:?}\n{}",
        out.elapsed,
        out.dump()
    );
    // The container's `sleep 30` carries the marker in its environment: gone with the rest.
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn sauce_connect_background_container_is_polled_from_the_host() {
    require_root();
    assert_ports_free(&[SAUCE_PORT]);
    let ws = Workspace::new();
    let secret = format!("sauce-key-{}", ws.marker());
    let running = spawn_in(
        &ws,
        "container-sauce-connect.yaml",
        suite_store().root(),
        &["--secret", &format!("Sauce_Access_Key={secret}")],
    );
    running.wait_for_stdout("| waiting for go", Duration::from_secs(20));

    // From outside the stage: the published port reaches the container's server.
    let url = format!("http://127.0.0.1:{SAUCE_PORT}/readiness");
    let deadline = Instant::now() + Duration::from_secs(5);
    let body = loop {
        match curl(&url) {
            Ok(body) => break body,
            Err(e) if Instant::now() >= deadline => panic!("{e}\n{}", running.stdout()),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert_eq!(body, "ready for e2e-user\n");
    std::fs::write(ws.path().join("go"), "").expect("create go");

    let out = running.wait(Duration::from_secs(20));
    out.assert_code(0);
    out.assert_stdout_has("--> Sauce_Connect starting service in stagehand-e2e/sauce-connect:1");
    out.assert_stdout_has("--> Wait_for_SC running on the host");
    // The image's ENTRYPOINT ran with the step's envVariables, the secret masked.
    let service = out.step_output("Sauce_Connect");
    let masked = service
        .iter()
        .find_map(|l| {
            l.strip_prefix("starting for e2e-user on port 8032 (access key: ")?
                .strip_suffix(')')
        })
        .unwrap_or_else(|| panic!("the entry point did not start\n{}", out.dump()));
    assert!(
        !masked.is_empty() && masked.chars().all(|c| c == '*'),
        "the access key is not masked: {masked}\n{}",
        out.dump()
    );
    assert!(
        !out.stdout.contains(&secret),
        "the secret leaked\n{}",
        out.dump()
    );
    assert!(
        service.contains(&"tunnel ready".to_string()),
        "{}",
        out.dump()
    );
    // The host step had to poll: /readiness is 404 for the first second.
    let ready = out
        .step_output("Wait_for_SC")
        .into_iter()
        .find_map(|l| {
            l.strip_prefix("SC ready after ")?
                .strip_suffix(" polls")?
                .parse::<u32>()
                .ok()
        })
        .unwrap_or_else(|| panic!("Wait_for_SC did not report SC ready\n{}", out.dump()));
    assert!(
        ready >= 1,
        "/readiness answered 200 at once: nothing was polled\n{}",
        out.dump()
    );
    out.assert_stdout_has("<-- Wait_for_SC passed");
    out.assert_stdout_has("<-- hold passed");
    out.assert_stdout_has("service Sauce_Connect stopped");
    assert_ports_closed(&[SAUCE_PORT], Duration::from_secs(2));
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn step_ids_resolve_from_containers_in_and_after_a_group() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "container-hostnames.yaml", &[]);
    out.assert_code(0);
    out.assert_stdout_has("<-- sg1_Background_1 started");
    assert_eq!(
        out.step_output("sg1_Run_1"),
        [
            "wget Background_1: page of sg1_Background_1",
            "nc sg1_Background_1: page of sg1_Background_1",
        ],
        "{}",
        out.dump()
    );
    assert_eq!(
        out.step_output("Run_2"),
        ["wget sg1_Background_1: page of sg1_Background_1"],
        "{}",
        out.dump()
    );
    out.assert_stdout_has("service sg1_Background_1 stopped");
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

/// Rootless on this host there are no cgroups, so no limit to hit: stagehand says so up front,
/// the stage passes (`ran` is in its output), and it still leaves nothing.
fn assert_ran_without_limits(ws: &Workspace, out: &Finished, ran: &str) {
    out.assert_code(0);
    out.assert_stdout_has("warning: resource limits cannot be enforced");
    out.assert_stdout_has(ran);
    assert_container_run_gone(out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn memory_limit_oom_kills_in_a_container_and_says_so() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "container-oom.yaml", &[]);
    if stagehand_e2e::e2e::rootless_rerun() {
        // The hog survives.
        assert_ran_without_limits(&ws, &out, "hog survived");
        return;
    }
    out.assert_code(1);
    assert!(
        out.step_output("hog")
            .contains(&"allocating 64 MiB".to_string()),
        "{}",
        out.dump()
    );
    assert!(
        !out.stdout.contains("hog survived"),
        "the 32Mi limit was not enforced\n{}",
        out.dump()
    );
    out.assert_stdout_has("<-- hog FAILED: hog was killed: out of memory (limit 32Mi)");
    assert!(
        out.summary_row("hog")
            .ends_with("FAILED: hog was killed: out of memory (limit 32Mi)"),
        "{}",
        out.summary_row("hog")
    );
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn run_as_user_and_privileged_in_containers() {
    require_root();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let host_caps = cap_eff(
        status
            .lines()
            .find(|l| l.starts_with("CapEff:"))
            .expect("CapEff in /proc/self/status"),
    );
    let ws = Workspace::new();
    let out = run(&ws, "container-users.yaml", &[]);
    out.assert_code(0);
    assert_eq!(
        out.step_output("as_app"),
        ["uid 1000 gid 1000 home /home/app"],
        "{}",
        out.dump()
    );
    assert_eq!(out.step_output("as_1234"), ["uid 1234"], "{}", out.dump());

    let caps_of = |id: &str| -> u64 {
        let lines = out.step_output(id);
        assert_eq!(
            lines.first().map(String::as_str),
            Some("uid 0"),
            "{}",
            out.dump()
        );
        cap_eff(
            lines
                .get(1)
                .unwrap_or_else(|| panic!("{id}: no CapEff\n{}", out.dump())),
        )
    };
    let (default, privileged) = (caps_of("as_root"), caps_of("privileged"));
    // Privileged: every capability this (root) host has; by default a strict subset. Rootless,
    // root of stagehand's user namespace holds every capability the kernel knows (in that
    // namespace only), whatever the host's root was given.
    let host_caps = if stagehand_e2e::e2e::rootless_rerun() {
        let last: u32 = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .expect("cap_last_cap")
            .trim()
            .parse()
            .expect("a number");
        (1u64 << (last + 1)) - 1
    } else {
        host_caps
    };
    assert_eq!(
        privileged, host_caps,
        "privileged CapEff {privileged:016x} is not the host's {host_caps:016x}"
    );
    assert!(
        default & !privileged == 0 && default != privileged,
        "default CapEff {default:016x} is not reduced from {privileged:016x}"
    );
    // CAP_SYS_ADMIN (bit 21) only with privileged.
    assert_eq!(default & (1 << 21), 0, "CAP_SYS_ADMIN by default");
    assert_ne!(
        privileged & (1 << 21),
        0,
        "no CAP_SYS_ADMIN when privileged"
    );
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn empty_dir_volume_is_shared_by_a_background_and_a_run_container() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "container-volume.yaml", &[]);
    out.assert_code(0);
    assert_eq!(
        out.step_output("visitor"),
        [
            "visitor read: written by keeper",
            "acknowledged",
            "/data is not the workspace",
        ],
        "{}",
        out.dump()
    );
    assert!(
        out.step_output("keeper")
            .contains(&"keeper read: written by visitor".to_string()),
        "{}",
        out.dump()
    );
    out.assert_stdout_has("service keeper stopped");
    assert!(
        !ws.path().join("from-keeper").exists(),
        "the volume was the workspace"
    );
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn malicious_layer_archives_are_refused_and_write_nothing_outside() {
    require_root();
    let ws = Workspace::new();
    let marker = ws.marker();
    let parent = scratch(&ws, "evil");
    let store = parent.path().join("store");
    let outside = parent.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let escape = format!("escape-{marker}");

    // A layer is unpacked into <store>/layers/<diff_id>/root: four `..` climb to `parent`.
    let dotdot = format!("../../../../{escape}");
    let dotdot_layer = tar(&[
        TarEntry::dir("etc/"),
        TarEntry::file("etc/harmless", "fine\n"),
        TarEntry::file(&dotdot, "pwned\n"),
    ]);
    // An absolute symlink to a directory outside, then a file "inside" it.
    let through_link = format!("evil/{escape}");
    let link_layer = tar(&[
        TarEntry::symlink("evil", outside.to_str().unwrap()),
        TarEntry::file(&through_link, "pwned\n"),
    ]);
    let cases = [
        (
            "docker-archive",
            "stagehand-e2e/evil:docker",
            dotdot.clone(),
            docker_archive(
                &["stagehand-e2e/evil:docker"],
                &image_config(std::slice::from_ref(&dotdot_layer), &["/bin/sh"]),
                std::slice::from_ref(&dotdot_layer),
            ),
        ),
        (
            "oci-archive",
            "stagehand-e2e/evil:oci",
            through_link.clone(),
            oci_archive(
                "docker.io/stagehand-e2e/evil:oci",
                &image_config(std::slice::from_ref(&link_layer), &["/bin/sh"]),
                std::slice::from_ref(&link_layer),
            ),
        ),
    ];

    let mut accepted = Vec::new();
    for (kind, image, entry, bytes) in cases {
        let archive = parent.path().join(format!("{kind}.tar"));
        std::fs::write(&archive, bytes).unwrap();
        let load = image_cmd(marker, &store, &[OsStr::new("load"), archive.as_os_str()]);
        if load.code == Some(0) {
            // Accepted: then the layer is checked when a step unpacks it. The run must refuse
            // it naming the entry, and leave nothing.
            accepted.push(format!("{kind}: {}", load.stdout.trim_end()));
            let out = run_in(
                &ws,
                "container-echo.yaml",
                &store,
                &["--var", &format!("image={image}")],
            );
            out.assert_code(1);
            let row = out.summary_row("hello");
            assert!(
                row.contains("refusing entry") && row.contains(&entry),
                "the {kind} run did not refuse {entry:?}: {row}\n{}",
                out.dump()
            );
            assert!(!out.stdout.contains("hello from"), "{}", out.dump());
            assert_container_run_gone(&out, marker, &[&store]);
        } else {
            assert_ne!(load.code, None, "{}", load.dump());
            assert!(
                load.stderr.contains(&entry),
                "the {kind} load failed without naming {entry:?}\n{}",
                load.dump()
            );
        }
        // Nothing named after the escape anywhere in the scratch dir (store included), in the
        // target directory of the symlink, or next to it in the temp dir or the root.
        let written: Vec<PathBuf> = files_named(parent.path(), &escape)
            .into_iter()
            .chain(
                [
                    std::env::temp_dir().join(&escape),
                    Path::new("/").join(&escape),
                ]
                .into_iter()
                .filter(|p| p.symlink_metadata().is_ok()),
            )
            .collect();
        assert!(written.is_empty(), "the {kind} wrote outside: {written:#?}");
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "the {kind} wrote into {}",
            outside.display()
        );
        // The store is still usable.
        let ls = image_cmd(marker, &store, &["ls"]);
        ls.assert_code(0);
        assert!(ls.stdout.starts_with("NAME"), "{}", ls.dump());
    }
    assert!(
        accepted.is_empty(),
        "`stagehand image load` accepted archives whose layer writes outside its root (they were \
         refused only when a step unpacked them):\n  {}",
        accepted.join("\n  ")
    );
}

#[test]
fn missing_image_names_the_image_and_how_to_load_it() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "container-missing.yaml", &[]);
    out.assert_code(1);
    let row = out.summary_row("ghost");
    assert!(
        row.contains("FAILED: image `stagehand-e2e/no-such-image:1`")
            && row.contains("stagehand image load"),
        "{row}\n{}",
        out.dump()
    );
    assert!(!out.stdout.contains("ghost ran"), "{}", out.dump());
    out.assert_stdout_has("<-- after skipped");
    out.assert_stdout_has("stage build FAILED");
    // Nothing was fetched or half-made in the store.
    let ls = image_cmd(ws.marker(), suite_store().root(), &["ls"]);
    ls.assert_code(0);
    assert!(!ls.stdout.contains("no-such-image"), "{}", ls.dump());
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
    // The store's images are untouched by the failed step.
    assert!(
        ls.stdout
            .contains(&format!("docker.io/{}", images::SAUCE_IMAGE))
    );
}

#[test]
fn a_program_missing_from_the_image_fails_the_step_before_it_starts_and_names_it() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "container-no-program.yaml", &[]);
    out.assert_code(1);
    for (id, why) in [
        (
            "absolute",
            "`/opt/app/run` is not an executable file in image `stagehand-e2e/busybox:1`"
                .to_string(),
        ),
        (
            "bare",
            "`no-such-tool` is not in image `stagehand-e2e/busybox:1` (searched PATH=".to_string(),
        ),
        (
            "bash",
            "`bash` is not in image `stagehand-e2e/busybox:1` (searched PATH=".to_string(),
        ),
    ] {
        out.assert_stdout_has(&format!("<-- {id} FAILED: {why}"));
        // Nothing ran: no output from the step itself.
        assert!(out.step_output(id).is_empty(), "{id}\n{}", out.dump());
    }
    out.assert_stdout_has("the step's shell runs its command");
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}

#[test]
fn a_container_the_runtime_cannot_start_is_reported_with_the_runtimes_reason() {
    require_root();
    let ws = Workspace::new();
    let out = run(&ws, "container-start-failure.yaml", &[]);
    if stagehand_e2e::e2e::rootless_rerun() {
        // No limit for runc's init to die of: the containers start.
        assert_ran_without_limits(&ws, &out, "step ran");
        return;
    }
    out.assert_code(1);
    // Neither program ran.
    assert!(
        out.step_output("tiny").iter().all(|l| l != "step ran"),
        "{}",
        out.dump()
    );
    assert!(
        out.step_output("tiny_service")
            .iter()
            .all(|l| l != "service ran"),
        "{}",
        out.dump()
    );
    let why = if std::env::var("STAGEHAND_BACKEND").as_deref() == Ok("containerd") {
        // containerd's shim runs runc: its error carries runc's reason.
        "containerd could not start the container: "
    } else {
        "runc could not start the container: unable to start container process: \
         container init was OOM-killed (memory limit too low?)"
    };
    out.assert_stdout_has(&format!("<-- tiny FAILED: {why}"));
    assert!(
        out.summary_row("tiny").contains(&format!("FAILED: {why}")),
        "{}",
        out.summary_row("tiny")
    );
    out.assert_stdout_has(&format!("service tiny_service failed: {why}"));
    for id in ["tiny", "tiny_service"] {
        assert!(
            out.summary_row(id).contains("OOM-killed"),
            "{}",
            out.summary_row(id)
        );
    }
    assert!(!out.stdout.contains("exit code 1"), "{}", out.dump());
    assert!(!out.stdout.contains("exit code 125"), "{}", out.dump());
    // A later step waits for the stage's services; this one never became ready.
    out.assert_stdout_has("<-- after skipped (service tiny_service failed: ");
    assert!(out.step_output("after").is_empty(), "{}", out.dump());
    assert_container_run_gone(&out, ws.marker(), &[suite_store().root()]);
}
