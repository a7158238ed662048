//! End-to-end: pulling images from a real registry on 127.0.0.1 with the built `stagehand`.
//!
//! Owns: the issue's proofs for registry pulls: a busybox image built by the suite
//! (`stagehand image import` → `stagehand_oci::archive::save` as an oci-archive → `skopeo copy`
//! into Debian's `docker-registry`) is pulled by `stagehand image pull` and listed by
//! `image ls`; a second pull downloads no blob; a stage with that image runs under each
//! `imagePullPolicy` (Never with an empty store fails naming the image and `stagehand image
//! load` without contacting the registry; IfNotPresent pulls once and then never asks again,
//! even with the registry stopped; Always asks every time but downloads nothing unchanged, and
//! with the registry stopped fails with the "cannot reach registry" error; unset behaves as
//! Always for `:latest` but falls back to the stored image with a warning when the registry
//! is down); a digest-pinned reference pulls and then runs with the registry stopped; and a
//! registry that drops the connection in the middle of a layer (a proxy that cuts the
//! response): the pull resumes, or, when every try is cut, fails naming the layer and leaves
//! no name, no partial blob and no temp file in the store. Every `stagehand run` ends with
//! [`assert_container_run_gone`]; every store ends with [`assert_store_clean`] (each blob
//! hashes to its name, nothing in `tmp/`). The registry's access log counts what stagehand
//! asked for.
//! Does not own: the helpers (`stagehand_e2e::{registry, images, e2e, sandbox}`), or images
//! from archives (`container_e2e.rs`).
//!
//! Needs root, runc, catatonit, busybox-static, docker-registry, skopeo, and
//! `cargo build -p stagehand` beforehand. Network traffic stays on 127.0.0.1.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use stagehand_e2e::e2e::{Finished, Workspace};
use stagehand_e2e::images::{
    assert_container_run_gone, build_busybox_rootfs, image_cmd, with_store,
};
use stagehand_e2e::registry::{
    CuttingProxy, Registry, assert_store_clean, push, require_registry_tools, store_blobs,
};
use stagehand_e2e::sandbox::{self, require_root};
use stagehand_oci::store::Store;

/// What the step in the image prints.
const HELLO: &str = "hello from the pulled busybox";

/// A registry holding `lab/busybox:latest`, and the directory the image was built in.
struct Lab {
    registry: Registry,
    _src: tempfile::TempDir,
}

impl Lab {
    /// Start a registry and push the suite's busybox to it as `lab/busybox:latest`.
    fn start(ws: &Workspace) -> Lab {
        require_root();
        require_registry_tools();
        let registry = Registry::start();
        let src = tempfile::Builder::new()
            .prefix("stagehand-e2e-registry-src-")
            .tempdir()
            .expect("create the image source dir");
        let rootfs = src.path().join("rootfs");
        build_busybox_rootfs(&rootfs);
        let store = src.path().join("store");
        let name = format!("{}/lab/busybox:latest", registry.host());
        image_cmd(
            ws.marker(),
            &store,
            &[
                OsStr::new("import"),
                rootfs.as_os_str(),
                OsStr::new("--tag"),
                OsStr::new(&name),
            ],
        )
        .assert_code(0);
        let archive = src.path().join("busybox.oci.tar");
        let mut file = std::fs::File::create(&archive).expect("create the oci-archive");
        let s = Store::open(&store).expect("open the source store");
        stagehand_oci::archive::save(&s, &[name.as_str()], &mut file)
            .expect("save the oci-archive");
        drop(file);
        push(&archive, &name);
        Lab {
            registry,
            _src: src,
        }
    }

    /// `<registry>/lab/busybox` plus `suffix` (`:latest`, `@sha256:...`, or nothing).
    fn image(&self, suffix: &str) -> String {
        format!("{}/lab/busybox{suffix}", self.registry.host())
    }

    /// Every request to the registry's API so far.
    fn all_requests(&self) -> usize {
        self.registry.requests("GET", "/v2/") + self.registry.requests("HEAD", "/v2/")
    }

    fn manifest_gets(&self) -> usize {
        self.registry.requests("GET", "/v2/lab/busybox/manifests/")
    }

    fn blob_gets(&self) -> usize {
        self.registry.requests("GET", "/v2/lab/busybox/blobs/")
    }
}

/// A fresh, empty image store directory under the workspace's parent (not inside the
/// workspace: that is mounted into the containers).
fn fresh_store(tmp: &tempfile::TempDir, name: &str) -> PathBuf {
    tmp.path().join(name)
}

/// Write a one-stage pipeline whose step runs `image` under `policy` (`None`: unset).
fn pipeline(ws: &Workspace, n: usize, image: &str, policy: Option<&str>) -> PathBuf {
    let policy = policy
        .map(|p| format!("                    imagePullPolicy: {p}\n"))
        .unwrap_or_default();
    let text = format!(
        r#"pipeline:
  name: registry
  identifier: registry
  stages:
    - stage:
        identifier: pull
        name: pull
        type: CI
        variables:
          - name: marker
            type: String
            value: unset
        spec:
          execution:
            steps:
              - step:
                  identifier: hello
                  name: hello
                  type: Run
                  spec:
                    image: {image}
{policy}                    shell: Sh
                    command: echo "{HELLO}"
"#
    );
    let path = ws.path().join(format!("registry-{n}.yaml"));
    std::fs::write(&path, text).expect("write the pipeline");
    path
}

/// Run the pipeline for `image` under `policy` against `store`, and check that the run left
/// nothing behind.
fn run(ws: &Workspace, n: usize, store: &Path, image: &str, policy: Option<&str>) -> Finished {
    let file = pipeline(ws, n, image, policy);
    let out = sandbox::run(with_store(ws.stagehand_run(&file), store, ws.marker()));
    assert_container_run_gone(&out, ws.marker(), &[store]);
    out
}

fn assert_ran(out: &Finished) {
    out.assert_code(0);
    assert_eq!(out.step_output("hello"), [HELLO], "{}", out.dump());
}

fn assert_failed_with(out: &Finished, needle: &str) {
    out.assert_code(1);
    let row = out.summary_row("hello");
    assert!(row.contains("FAILED"), "{row}\n{}", out.dump());
    assert!(
        out.stdout.contains(needle) || out.stderr.contains(needle),
        "the run does not say {needle:?}\n{}",
        out.dump()
    );
    assert!(!out.stdout.contains(HELLO), "{}", out.dump());
}

fn image_ls(ws: &Workspace, store: &Path) -> String {
    let ls = image_cmd(ws.marker(), store, &["ls"]);
    ls.assert_code(0);
    ls.stdout.clone()
}

#[test]
fn image_pull_lists_the_image_and_a_digest_pins_it() {
    let ws = Workspace::new();
    let mut lab = Lab::start(&ws);
    let tmp = tempfile::tempdir().unwrap();
    let store = fresh_store(&tmp, "pulled");

    let pull = image_cmd(ws.marker(), &store, &["pull", &lab.image("")]);
    pull.assert_code(0);
    let name = lab.image(":latest");
    assert!(
        pull.stdout.starts_with(&format!("pulled {name} (")),
        "{}",
        pull.dump()
    );
    assert!(
        pull.stderr.contains("2 of 2 blobs to fetch"),
        "{}",
        pull.dump()
    );
    assert!(image_ls(&ws, &store).contains(&name));
    assert_eq!(lab.blob_gets(), 2, "{}", lab.registry.log());
    assert_store_clean(&store);

    // Again: the manifest is asked for, no blob is downloaded.
    let manifests = lab.manifest_gets();
    let again = image_cmd(ws.marker(), &store, &["pull", &name]);
    again.assert_code(0);
    assert!(again.stderr.contains("up to date"), "{}", again.dump());
    assert_eq!(lab.blob_gets(), 2);
    assert_eq!(lab.manifest_gets(), manifests + 1);

    // The id is the registry's manifest digest: pin it, in a store of its own.
    let id = Store::open(&store)
        .unwrap()
        .resolve(&name)
        .unwrap()
        .expect("the pulled image");
    let pinned = lab.image(&format!("@{id}"));
    let pinned_store = fresh_store(&tmp, "pinned");
    let pull = image_cmd(ws.marker(), &pinned_store, &["pull", &pinned]);
    pull.assert_code(0);
    assert!(
        pull.stdout.starts_with(&format!("pulled {pinned} (")),
        "{}",
        pull.dump()
    );
    let ls = image_ls(&ws, &pinned_store);
    assert!(
        ls.contains(&id.short().to_string()) && !ls.contains(":latest"),
        "{ls}"
    );

    // A pinned image in the store needs no registry: an unset policy is IfNotPresent for it.
    lab.registry.stop();
    assert_ran(&run(&ws, 1, &pinned_store, &pinned, None));
    let pull = image_cmd(ws.marker(), &pinned_store, &["pull", &pinned]);
    pull.assert_code(0);
    // By tag it has to ask the registry, which is gone.
    let pull = image_cmd(ws.marker(), &store, &["pull", &name]);
    pull.assert_code(1);
    assert!(
        pull.stderr.contains(&format!(
            "cannot reach registry {0} for `{name}`: connection refused; load the image with `stagehand image load FILE` instead",
            lab.registry.host()
        )),
        "{}",
        pull.dump()
    );
    assert_store_clean(&store);
    assert_store_clean(&pinned_store);
}

#[test]
fn each_pull_policy_against_a_real_registry() {
    let ws = Workspace::new();
    let mut lab = Lab::start(&ws);
    let tmp = tempfile::tempdir().unwrap();
    let image = lab.image(":latest");

    // Never, empty store: fails naming the image and how to load it; the registry is not asked.
    let empty = fresh_store(&tmp, "empty");
    let before = lab.all_requests();
    let out = run(&ws, 1, &empty, &image, Some("Never"));
    assert_failed_with(&out, &format!("image `{image}` is not in the image store"));
    assert_failed_with(&out, "imagePullPolicy is Never");
    assert_failed_with(&out, "stagehand image load");
    assert_eq!(
        lab.all_requests(),
        before,
        "Never asked the registry:\n{}",
        lab.registry.log()
    );

    // IfNotPresent: pulls once...
    let store = fresh_store(&tmp, "store");
    let out = run(&ws, 2, &store, &image, Some("IfNotPresent"));
    assert_ran(&out);
    assert_eq!(lab.blob_gets(), 2, "{}", lab.registry.log());
    assert!(image_ls(&ws, &store).contains(&image));
    // ...then never asks again.
    let before = lab.all_requests();
    assert_ran(&run(&ws, 3, &store, &image, Some("IfNotPresent")));
    assert_eq!(
        lab.all_requests(),
        before,
        "IfNotPresent asked again:\n{}",
        lab.registry.log()
    );

    // Always: asks for the manifest every run; the digest is unchanged, so no blob moves.
    let manifests = lab.manifest_gets();
    assert_ran(&run(&ws, 4, &store, &image, Some("Always")));
    assert_eq!(lab.manifest_gets(), manifests + 1);
    assert_eq!(lab.blob_gets(), 2);

    // Unset with `:latest` is Always.
    assert_ran(&run(&ws, 5, &store, &image, None));
    assert_eq!(lab.manifest_gets(), manifests + 2);
    assert_eq!(lab.blob_gets(), 2);
    assert_store_clean(&store);

    // The registry goes away.
    lab.registry.stop();
    assert_ran(&run(&ws, 6, &store, &image, Some("IfNotPresent")));
    let out = run(&ws, 7, &store, &image, Some("Always"));
    assert_failed_with(
        &out,
        &format!(
            "cannot reach registry {} for `{image}`: connection refused; load the image with `stagehand image load FILE` instead",
            lab.registry.host()
        ),
    );
    // Unset: the stored image runs, with a warning that says why the registry was skipped.
    let out = run(&ws, 8, &store, &image, None);
    assert_ran(&out);
    assert!(
        out.stderr.contains(&format!("warning: hello: cannot reach registry {} (connection refused); running the copy of `{image}` in the image store", lab.registry.host())),
        "{}",
        out.dump()
    );
    // Never and IfNotPresent with an empty store and no registry: both fail clearly.
    let out = run(&ws, 9, &empty, &image, Some("IfNotPresent"));
    assert_failed_with(
        &out,
        &format!(
            "cannot reach registry {} for `{image}`",
            lab.registry.host()
        ),
    );
    assert_store_clean(&store);
    assert_store_clean(&empty);
}

#[test]
fn a_registry_that_drops_the_connection_mid_pull() {
    let ws = Workspace::new();
    let lab = Lab::start(&ws);
    let tmp = tempfile::tempdir().unwrap();
    const CUT: usize = 64 * 1024;

    // Cut once: the download resumes where it stopped and the image is complete.
    let once = CuttingProxy::start(lab.registry.addr(), CUT, 1);
    let store = fresh_store(&tmp, "resumed");
    let image = format!("{}/lab/busybox:latest", once.host());
    let pull = image_cmd(ws.marker(), &store, &["pull", &image]);
    pull.assert_code(0);
    assert_eq!(once.cuts(), 1, "{}", pull.dump());
    assert!(
        pull.stderr.contains("connection lost after") && pull.stderr.contains("resuming (try 2)"),
        "{}",
        pull.dump()
    );
    assert!(image_ls(&ws, &store).contains(&image));
    assert_store_clean(&store);
    let layer_size = store_blobs(&store)
        .iter()
        .map(|b| std::fs::metadata(b).unwrap().len())
        .max()
        .unwrap();
    assert!(
        layer_size > 4 * CUT as u64,
        "the layer ({layer_size} bytes) is too small to be cut 3 times"
    );
    // The image runs.
    assert_ran(&run(&ws, 1, &store, &image, Some("Never")));

    // Cut every time: the pull gives up naming the layer; nothing half-written is visible.
    let always = CuttingProxy::start(lab.registry.addr(), CUT, usize::MAX);
    let image = format!("{}/lab/busybox:latest", always.host());
    let store = fresh_store(&tmp, "failed");
    let pull = image_cmd(ws.marker(), &store, &["pull", &image]);
    pull.assert_code(1);
    assert!(
        pull.stderr.contains("stagehand: downloading layer sha256:")
            && pull
                .stderr
                .contains(&format!(" of `{image}` from {} failed: ", always.host()))
            && pull.stderr.contains("gave up after 3 tries"),
        "{}",
        pull.dump()
    );
    assert_eq!(always.cuts(), 3);
    assert!(!image_ls(&ws, &store).contains("lab/busybox"));
    assert_store_clean(&store);
    // Only the config made it (complete and verified); no layer, no manifest.
    assert_eq!(store_blobs(&store).len(), 1, "{:?}", store_blobs(&store));

    // The same inside a stage: the step fails with that error and the run leaves nothing.
    let out = run(&ws, 2, &store, &image, Some("IfNotPresent"));
    assert_failed_with(&out, "gave up after 3 tries");
    assert_store_clean(&store);
}
