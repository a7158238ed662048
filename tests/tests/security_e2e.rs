//! End-to-end: what a container step can reach, and where a secret can be seen, with the
//! built `stagehand` binary, real namespaces, cgroups and runc.
//!
//! Owns: the security proofs. Without `privileged`, a container step sees only its
//! own pid namespace (none of the host's processes), cannot mount, has no CAP_SYS_ADMIN,
//! CAP_SYS_MODULE or CAP_SYS_RAWIO, cannot write `/proc/sys`, `/sys` or the cgroup tree
//! (which shows only its own cgroup and tasks), and can make a device node but not open a host
//! device through it; with `privileged: true` it gets what the README documents (every
//! capability, mounts, writable `/sys`, every host device). A secret used in the environment,
//! in commands and in `exec` health checks of host and container steps never appears in any
//! process's argv (sampled every few ms during the whole run), in stagehand's output, or in
//! any file under the run directory, except a container's environment in its bundle's
//! `config.json`, which must be mode 0600.
//! Does not own: the helpers (`stagehand_e2e::{e2e, images, sandbox}`), masking in logs (the
//! host suite), or the capability sets themselves (`container_e2e.rs` compares them).
//!
//! Needs root, runc, catatonit, busybox-static, and `cargo build -p stagehand` beforehand.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use stagehand_e2e::e2e::{Workspace, pipeline};
use stagehand_e2e::images::cap_eff;
use stagehand_e2e::images::{assert_container_run_gone, sha256_hex, suite_store, with_store};
use stagehand_e2e::sandbox::{self, require_root, run_dir, run_id_of_pid};

/// Capability bits (`capability.h`).
const CAP_SYS_MODULE: u32 = 16;
const CAP_SYS_RAWIO: u32 = 17;
const CAP_SYS_ADMIN: u32 = 21;

/// The `check: result` lines of a step, as a map (the CapEff line under `CapEff`).
fn results(lines: &[String]) -> BTreeMap<String, String> {
    lines
        .iter()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

#[test]
fn containers_are_confined_unless_privileged() {
    require_root();
    let ws = Workspace::new();
    let store = suite_store().root();
    let out = sandbox::run(with_store(
        ws.stagehand_run(&pipeline("security-confinement.yaml")),
        store,
        ws.marker(),
    ));
    out.assert_code(0);
    let confined = results(&out.step_output("confined"));
    let privileged = results(&out.step_output("privileged"));
    let get = |m: &BTreeMap<String, String>, k: &str| -> String {
        m.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("no `{k}` line\n{}", out.dump()))
    };
    let processes: usize = get(&confined, "processes")
        .parse()
        .unwrap_or_else(|e| panic!("processes: {e}\n{}", out.dump()));
    let expect = [
        // Its own pid namespace: pid 1 is the container's init, a handful of processes, and
        // not the test's (which runs on the host with `security_e2e` in its argv).
        ("host processes seen", "0"),
        ("mount", "denied"),
        ("proc/sys", "read-only"),
        ("sys", "read-only"),
        ("cgroup mkdir", "denied"),
        ("cgroup write", "denied"),
        // /sys/fs/cgroup shows the container's own cgroup, not the host's tree.
        ("cgroup tree", "own"),
        ("cgroup tasks", "2, foreign: 0"),
        // CAP_MKNOD is in the default set (as in Docker); the device cgroup stops the open.
        ("mknod", "made"),
        ("host device", "denied"),
    ];
    for (k, v) in expect {
        assert_eq!(get(&confined, k), v, "confined `{k}`\n{}", out.dump());
    }
    assert!(
        (1..10).contains(&processes),
        "{processes} processes\n{}",
        out.dump()
    );
    assert!(
        get(&confined, "pid 1").starts_with("/dev/init"),
        "{}",
        out.dump()
    );
    let caps = cap_eff(&format!("CapEff: {}", get(&confined, "CapEff")));
    for (name, bit) in [
        ("CAP_SYS_ADMIN", CAP_SYS_ADMIN),
        ("CAP_SYS_MODULE", CAP_SYS_MODULE),
        ("CAP_SYS_RAWIO", CAP_SYS_RAWIO),
    ] {
        assert_eq!(caps & (1 << bit), 0, "{name} in CapEff {caps:016x}");
    }

    // `privileged: true`: all capabilities, mounts, writable /sys and cgroup files, host
    // devices; still its own pid namespace and cgroup.
    let expect = [
        ("host processes seen", "0"),
        ("mount", "allowed"),
        ("sys", "writable"),
        ("cgroup mkdir", "allowed"),
        ("cgroup tree", "own"),
        ("mknod", "made"),
        ("host device", "readable"),
    ];
    for (k, v) in expect {
        assert_eq!(get(&privileged, k), v, "privileged `{k}`\n{}", out.dump());
    }
    let caps = cap_eff(&format!("CapEff: {}", get(&privileged, "CapEff")));
    for bit in [CAP_SYS_ADMIN, CAP_SYS_MODULE, CAP_SYS_RAWIO] {
        assert_ne!(
            caps & (1 << bit),
            0,
            "privileged lacks cap {bit}: {caps:016x}"
        );
    }
    assert_container_run_gone(&out, ws.marker(), &[store]);
}

/// Something seen carrying the secret.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Sighting {
    what: String,
    mode: Option<u32>,
}

/// Every process whose argv contains `secret`, as `pid: argv` (the secret masked).
fn argv_with(secret: &str) -> Vec<Sighting> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv = String::from_utf8_lossy(&raw).replace('\0', " ");
        if argv.contains(secret) {
            found.push(Sighting {
                what: format!("argv: {}", argv.replace(secret, "<SECRET>")),
                mode: None,
            });
        }
    }
    found
}

/// Every regular file under `dir` whose content contains `secret`, with its mode.
fn files_with(dir: &Path, secret: &str) -> Vec<Sighting> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            // A container's root filesystem is the image's, mounted: not the run's files.
            if path.file_name().is_some_and(|n| n == "rootfs") {
                continue;
            }
            found.extend(files_with(&path, secret));
        } else if meta.is_file() && meta.len() < 16 << 20 {
            let content = std::fs::read(&path).unwrap_or_default();
            if content
                .windows(secret.len())
                .any(|w| w == secret.as_bytes())
            {
                found.push(Sighting {
                    what: format!("file: {}", path.display()),
                    mode: Some(meta.permissions().mode() & 0o7777),
                });
            }
        }
    }
    found
}

/// The mode of `path` and of each of its ancestors up to (not including) `/run`.
fn modes_up_to_run(path: &Path) -> Vec<(PathBuf, u32)> {
    path.ancestors()
        .skip(1)
        .take_while(|p| *p != Path::new("/run") && *p != Path::new("/"))
        .filter_map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((p.to_path_buf(), m.permissions().mode() & 0o7777))
        })
        .collect()
}

#[test]
fn secrets_never_reach_argv_output_or_run_files() {
    require_root();
    let ws = Workspace::new();
    let store = suite_store().root();
    // Not derived from anything on a command line: a hash of the marker.
    let secret = format!("tok{}", &sha256_hex(ws.marker().as_bytes())[..24]);
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{}-secrets-", ws.marker()))
        .tempdir()
        .expect("create a scratch dir");
    let secrets_file = scratch.path().join("secrets");
    std::fs::write(&secrets_file, format!("e2e_token={secret}\n")).expect("write secrets");
    std::fs::set_permissions(&secrets_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod secrets");

    // Sample every process's argv from before stagehand starts until it has exited.
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, secret) = (done.clone(), secret.clone());
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            let mut samples = 0u32;
            while !done.load(Ordering::SeqCst) {
                seen.extend(argv_with(&secret));
                samples += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            (seen, samples)
        })
    };
    let running = sandbox::spawn(
        with_store(
            ws.stagehand_run(&pipeline("security-secrets.yaml")),
            store,
            ws.marker(),
        )
        .arg("--secrets-file")
        .arg(&secrets_file),
    );
    let id = run_id_of_pid(running.pid(), Duration::from_secs(10));
    let dir = run_dir(&id);
    running.wait_for_stdout("host token matches", Duration::from_secs(20));
    running.wait_for_stdout("container token matches", Duration::from_secs(20));
    // While both services run and both steps hold: the run directory's files.
    let mut in_files = std::collections::BTreeSet::new();
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        in_files.extend(files_with(&dir, &secret));
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(ws.path().join("release"), "").expect("create release");
    let out = running.wait(Duration::from_secs(30));
    done.store(true, Ordering::SeqCst);
    let (in_argv, samples) = sampler.join().expect("the argv sampler");
    out.assert_code(0);
    for step in ["host_use", "box_use"] {
        assert!(
            out.step_output(step)
                .iter()
                .any(|l| l.starts_with("inline: *")),
            "{step} did not print the masked secret\n{}",
            out.dump()
        );
    }
    out.assert_stdout_has("<-- host_svc started");
    out.assert_stdout_has("<-- box_svc started");
    // After the run: everything left in the run directory (logs, summary.json, state.json).
    in_files.extend(files_with(&dir, &secret));

    assert!(samples > 100, "only {samples} argv samples");
    assert!(
        in_argv.is_empty(),
        "the secret is on an argv (/proc/*/cmdline, world-readable):\n{in_argv:#?}"
    );
    assert!(
        !out.stdout.contains(&secret) && !out.stderr.contains(&secret),
        "the secret is in stagehand's output\n{}",
        out.dump()
    );
    // The one place it must be: a container's environment, in its bundle's config.json,
    // which only root may read.
    let (configs, rest): (Vec<Sighting>, Vec<Sighting>) = in_files
        .into_iter()
        .partition(|s| s.what.ends_with("/config.json"));
    let (scripts, others): (Vec<Sighting>, Vec<Sighting>) = rest
        .into_iter()
        .partition(|s| s.what.contains(&format!("{}/steps/", dir.display())));
    let modes = modes_up_to_run(&dir.join("x"));
    assert!(
        others.is_empty(),
        "the secret is in files of the run directory {}:\n{others:#?}\n(modes of the run \
         directory and its parents: {modes:?})",
        dir.display(),
    );
    assert!(
        !configs.is_empty(),
        "no container config.json carried the secret in its env: was the sample too late?"
    );
    for c in &configs {
        assert_eq!(c.mode, Some(0o600), "{c:?}");
    }
    assert_container_run_gone(&out, ws.marker(), &[store]);
    // Generated step scripts hold the rendered command, secret included, while the step
    // runs; they are removed at the end of the run ...
    for s in &scripts {
        let path = s.what.trim_start_matches("file: ");
        assert!(!Path::new(path).exists(), "{path} outlived the run");
    }
    // ... but until then they must not be readable by anyone but root: a world-readable
    // script (or a traversable 0755 run directory above it) shows the secret to every user.
    let world_readable: Vec<&Sighting> = scripts
        .iter()
        .filter(|s| s.mode.is_some_and(|m| m & 0o044 != 0))
        .collect();
    assert!(
        world_readable.is_empty() || modes.iter().any(|(_, m)| m & 0o011 == 0),
        "KNOWN LEAK (runner/src/exec/host.rs, HostExecutor::script_argv): step scripts with \
         the secret rendered inline are readable by every user while the step runs:\n\
         {world_readable:#?}\n(modes of the run directory and its parents: {modes:?})"
    );
}
