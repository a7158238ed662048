//! Rootless stagehand, for real: the suite runs as root (to build fixtures and to check what is
//! left behind) and starts `stagehand` as the ordinary user `stagehand-user` (subordinate ids
//! from /etc/subuid) through `setpriv`. On this kind of host (cgroup v1, /dev/net/tun 0600)
//! limits and outbound access are not available rootless; the suite asserts that stagehand
//! says so and that everything else works: a user namespace owning the stage's network and
//! mount namespaces, step ids as hostnames, host services run as the user, containers with
//! image ownership shifted into the subordinate range, published ports, and teardown that
//! leaves no process, however a run ends.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use stagehand_e2e::e2e::{Workspace, assert_no_leaks};
use stagehand_e2e::images::build_busybox_rootfs;
use stagehand_e2e::rootless::{RootlessUser, user};

/// One test at a time: the leak checks look at every process of the user.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

const TIMEOUT: Duration = Duration::from_secs(40);

/// No process of the user (or of its subordinate ids) is left, within a grace period.
fn assert_user_has_no_processes(u: &RootlessUser) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let left = u.processes();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for (pid, _) in &left {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid), Signal::SIGKILL);
            }
            panic!("processes of {} left behind: {left:?}", u.name);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A busybox image, imported by the user from a tar made by root, with `/data/owned` owned by
/// 100:101 in the image.
fn import_busybox(u: &RootlessUser, ws: &Workspace) {
    let root = ws.path().join("rootfs");
    build_busybox_rootfs(&root);
    std::fs::create_dir_all(root.join("data")).unwrap();
    std::fs::write(root.join("data/owned"), "by uid 100\n").unwrap();
    std::os::unix::fs::chown(root.join("data/owned"), Some(100), Some(101)).unwrap();
    std::fs::create_dir_all(root.join("www")).unwrap();
    std::fs::write(root.join("www/index.html"), "rootless web\n").unwrap();
    let tar = ws.path().join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::remove_dir_all(&root).unwrap();
    u.own(&tar);
    let out = u
        .stagehand(ws)
        .arg("image")
        .arg("import")
        .arg(&tar)
        .arg("--tag")
        .arg("rootless/busybox:1")
        .arg("--root")
        .arg(u.store(ws))
        .output();
    out.assert_code(0);
}

const HOST_STAGE: &str = r#"
pipeline:
  identifier: rootless
  name: rootless
  stages:
    - stage:
        identifier: build
        name: build
        type: CI
        spec:
          execution:
            steps:
              - step:
                  identifier: web
                  name: web
                  type: Background
                  spec:
                    command: |
                      mkdir -p www && echo served-by-web > www/index.html
                      setsid sleep 300 &
                      exec busybox httpd -f -p 8080 -h www
                    healthCheck:
                      tcp: 8080
              - step:
                  identifier: check
                  name: check
                  type: Run
                  spec:
                    runAsUser: postgres
                    command: |
                      echo "uid=$(id -u)"
                      echo "netns=$(readlink /proc/self/ns/net)"
                      busybox wget -q -O- http://web:8080/index.html
                      touch made-by-check
"#;

#[test]
fn host_steps_run_as_the_user_in_the_stage_namespace_and_leave_nothing() {
    let _serial = serial();
    let u = user();
    let ws = u.workspace();
    let out = u.run(&ws, HOST_STAGE).spawn().wait(TIMEOUT);
    out.assert_code(0);
    // Limits cannot be had rootless on this host: said once, before the stage.
    assert_eq!(
        out.stdout
            .matches("warning: resource limits cannot be enforced")
            .count(),
        1,
        "{}",
        out.dump()
    );
    out.assert_stdout_has("<-- web ready");
    // The step is the user, not root of stagehand's namespace...
    out.assert_stdout_has(&format!("check | uid={}", u.uid));
    // ...and runAsUser of someone else is said not to apply.
    out.assert_stdout_has("runAsUser `postgres` is not applied");
    // In the stage's own network namespace, where `web` resolves.
    let host_netns = std::fs::read_link("/proc/self/ns/net").unwrap();
    let line = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("check | netns="))
        .unwrap_or_else(|| panic!("no netns line\n{}", out.dump()));
    assert_ne!(Path::new(line), host_netns, "{}", out.dump());
    out.assert_stdout_has("check | served-by-web");
    // Files the steps made belong to the user on the host.
    let made = std::fs::metadata(ws.path().join("made-by-check")).unwrap();
    assert_eq!((made.uid(), made.gid()), (u.uid, u.gid));
    // The service's `setsid sleep` escaped its process group: teardown still got it.
    assert_no_leaks(ws.marker());
    assert_user_has_no_processes(u);
    let state = std::fs::read_to_string(out.run_dir.as_ref().unwrap().join("state.json")).unwrap();
    assert!(
        state.contains("\"finished\": true") || state.contains("\"finished\":true"),
        "{state}"
    );
}

const CONTAINER_STAGE: &str = r#"
pipeline:
  identifier: rootless
  name: rootless
  stages:
    - stage:
        identifier: pod
        name: pod
        type: CI
        spec:
          execution:
            steps:
              - step:
                  identifier: web
                  name: web
                  type: Background
                  spec:
                    image: rootless/busybox:1
                    imagePullPolicy: Never
                    command: httpd -f -p 8080 -h /www
                    portBindings:
                      "PORT": "8080"
                    healthCheck:
                      tcp: 8080
              - step:
                  identifier: inside
                  name: inside
                  type: Run
                  spec:
                    image: rootless/busybox:1
                    imagePullPolicy: Never
                    command: |
                      echo "owner=$(stat -c %u:%g /data/owned)"
                      echo "id=$(id -u)"
                      wget -q -O- http://web:8080/index.html
                      sleep 3
"#;

#[test]
fn containers_share_the_stage_publish_ports_and_keep_image_ownership() {
    let _serial = serial();
    let u = user();
    let ws = u.workspace();
    import_busybox(u, &ws);
    let port = free_port();
    let yaml = CONTAINER_STAGE.replace("PORT", &port.to_string());
    let running = u.run(&ws, &yaml).spawn();
    running.wait_for_stdout("--> inside", TIMEOUT);
    // Published on the host's loopback while the stage runs.
    let page = fetch(port);
    assert_eq!(page.trim(), "rootless web", "page from 127.0.0.1:{port}");
    let out = running.wait(TIMEOUT);
    out.assert_code(0);
    // Ownership from the image is kept inside the container...
    out.assert_stdout_has("inside | owner=100:101");
    out.assert_stdout_has("inside | id=0");
    out.assert_stdout_has("inside | rootless web");
    // ...and lands in the user's subordinate range on the host.
    let owned = find_file(&u.store(&ws), "owned").expect("the unpacked layer");
    let meta = std::fs::metadata(&owned).unwrap();
    assert!(
        u.subordinate(meta.uid()) && meta.uid() != 100,
        "{} is owned by {} on the host",
        owned.display(),
        meta.uid()
    );
    assert_user_has_no_processes(u);
    assert!(
        !mounted_under(ws.path()),
        "a mount under the workspace is left on the host"
    );
}

#[test]
fn require_limits_refuses_before_anything_starts() {
    let _serial = serial();
    let u = user();
    let ws = u.workspace();
    let out = u
        .run(&ws, HOST_STAGE)
        .arg("--require-limits")
        .spawn()
        .wait(TIMEOUT);
    out.assert_code(2);
    assert!(
        out.stdout
            .contains("--require-limits: resource limits cannot be enforced here"),
        "{}",
        out.dump()
    );
    assert!(
        !out.stdout.contains("-->"),
        "a step started\n{}",
        out.dump()
    );
    assert_user_has_no_processes(u);
}

#[test]
fn sigterm_sigint_and_sigkill_of_stagehand_leave_nothing() {
    let _serial = serial();
    let u = user();
    for (sig, code) in [
        (Signal::SIGTERM, 143),
        (Signal::SIGINT, 130),
        (Signal::SIGKILL, -1),
    ] {
        let ws = u.workspace();
        let yaml = HOST_STAGE.replace(
            "touch made-by-check",
            "touch made-by-check\n                      sleep 60",
        );
        let mut running = u.run(&ws, &yaml).spawn();
        running.wait_for_stdout("check | served-by-web", TIMEOUT);
        running.signal(sig);
        let out = running.wait(TIMEOUT);
        if code >= 0 {
            out.assert_code(code);
        } else {
            assert_eq!(out.signal, Some(libc_sigkill()), "{}", out.dump());
        }
        // The namespace side tears down on its own when its parent is killed
        // (PR_SET_PDEATHSIG); give it the time a teardown takes.
        let deadline = Instant::now() + Duration::from_secs(15);
        while !u.processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_no_leaks(ws.marker());
        assert_user_has_no_processes(u);
    }
    // gc as the user finds nothing live and succeeds.
    let ws = u.workspace();
    let out = u.stagehand(&ws).arg("gc").output();
    out.assert_code(0);
}

#[test]
fn doctor_reports_this_hosts_gaps_with_fixes() {
    let _serial = serial();
    let u = user();
    let ws = u.workspace();
    let out = u.stagehand(&ws).arg("doctor").output();
    assert!(matches!(out.code, Some(0 | 1)), "{}", out.dump());
    out.assert_stdout_has(&format!("running as {} (uid {}, rootless)", u.name, u.uid));
    for topic in [
        "cgroups",
        "user namespaces",
        "subordinate ids",
        "overlayfs",
        "OCI runtime",
        "outbound network",
    ] {
        assert!(
            out.stdout
                .lines()
                .any(|l| l.get(5..).is_some_and(|r| r.starts_with(topic))),
            "no {topic} line\n{}",
            out.dump()
        );
    }
    out.assert_stdout_has("limits are not enforced");
    // Every gap comes with a fix line.
    let lines: Vec<&str> = out.stdout.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("warn") || l.starts_with("FAIL") {
            assert!(
                lines.get(i + 1).is_some_and(|n| n.contains("fix: ")),
                "{l} has no fix\n{}",
                out.dump()
            );
        }
    }
}

fn libc_sigkill() -> i32 {
    Signal::SIGKILL as i32
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn fetch(port: u16) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or(body)
}

fn find_file(dir: &Path, name: &str) -> Option<std::path::PathBuf> {
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let ft = e.file_type().ok()?;
        if ft.is_file() && e.file_name() == name {
            return Some(p);
        }
        if ft.is_dir() {
            if let Some(f) = find_file(&p, name) {
                return Some(f);
            }
        }
    }
    None
}

fn mounted_under(dir: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let d = dir.to_string_lossy();
    mounts.lines().any(|l| l.contains(d.as_ref()))
}

/// Harness's own health-check pipeline (two PostgreSQL servers from the host's binaries, each
/// checked with `psql -h Background_N`), as the user: initdb refuses root, so this only works
/// because host services run as the user's own uid.
#[test]
fn the_reference_postgres_pipeline_runs_rootless() {
    let _serial = serial();
    let u = user();
    let ws = u.workspace();
    let examples = stagehand_e2e::bin_path::workspace_root().join("examples");
    let bin = ws.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    // Copies (following the symlink): the user may not be able to read the checkout.
    std::fs::copy(
        examples.join("bin/docker-entrypoint.sh"),
        bin.join("docker-entrypoint.sh"),
    )
    .unwrap();
    let yaml = std::fs::read_to_string(examples.join("health-checks.yaml")).unwrap();
    u.own(ws.path());
    let pgbin = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (apt-get install postgresql)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").is_file())
        .max()
        .expect("a PostgreSQL bin directory");
    let path = format!(
        "{}:{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
        bin.display(),
        pgbin.display()
    );
    let out = u.run(&ws, &yaml).env("PATH", path).spawn().wait(TIMEOUT);
    out.assert_code(0);
    out.assert_stdout_has("| Background_1: test1=hello from test1");
    out.assert_stdout_has("| Background_2: test2=hello from test2");
    assert_no_leaks(ws.marker());
    assert_user_has_no_processes(u);
}
