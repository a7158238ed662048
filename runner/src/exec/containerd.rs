//! The containerd backend (cargo feature `containerd`): container steps run as containerd
//! tasks, created, started, waited, signalled and deleted through containerd's gRPC API.
//!
//! Owns: talking to containerd (connecting, the version check, containers and tasks in the
//! `stagehand` namespace), the hidden `stagehand __containerd-run` helper that the host
//! executor spawns in place of `runc run` (it creates the task, copies the task's output from
//! a FIFO to its own stdout, forwards SIGTERM/SIGINT/SIGHUP as `Tasks.Kill`, and exits with
//! the task's status, 128+N for signal N), adapting a stagehand bundle for containerd
//! (absolute root and cgroup paths), and deleting what a run left in containerd.
//! Does not own: the root filesystem or the OCI spec (built by `container.rs` exactly as for
//! runc: containerd gets the same spec with `root.path` pointing at stagehand's overlay), the
//! step cgroup, readiness, timeouts or logs (all unchanged, in `host.rs`).
//!
//! Not done: images are not imported into containerd's content store or unpacked with its
//! snapshotter; the container's root is the overlay stagehand mounts from its own store. So
//! no snapshots, content or leases are created, and teardown only deletes tasks and
//! containers.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    Container, CreateContainerRequest, CreateTaskRequest, DeleteContainerRequest,
    DeleteTaskRequest, KillRequest, ListContainersRequest, StartRequest, WaitRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};

/// The namespace every stagehand container lives in.
pub const NAMESPACE: &str = "stagehand";
/// containerd's default socket.
pub const DEFAULT_ADDRESS: &str = "/run/containerd/containerd.sock";
/// The oldest containerd this backend is tested against (the `io.containerd.runc.v2` shim
/// and the `file`/FIFO stdio of 1.6).
pub const MIN_VERSION: (u32, u32) = (1, 6);
const RUNTIME: &str = "io.containerd.runc.v2";
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";

/// What went wrong talking to containerd.
#[derive(Debug, thiserror::Error)]
pub enum ContainerdError {
    #[error(
        "containerd socket {address} does not exist: is containerd running? (apt-get install containerd; or pass --containerd-address)"
    )]
    NoSocket { address: PathBuf },
    #[error("cannot connect to containerd at {address}: {reason}")]
    Connect { address: PathBuf, reason: String },
    #[error("containerd at {address} is version {version}; stagehand needs {}.{} or newer (upgrade containerd)", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld { address: PathBuf, version: String },
    #[error("containerd {call} for {id}: {status}")]
    Call {
        call: &'static str,
        id: String,
        status: String,
    },
    #[error("bundle {path}: {reason}")]
    Bundle { path: PathBuf, reason: String },
}

fn call_err(call: &'static str, id: &str, s: Status) -> ContainerdError {
    ContainerdError::Call {
        call,
        id: id.to_string(),
        status: format!("{:?}: {}", s.code(), s.message()),
    }
}

fn req<T>(msg: T, ns: &str) -> Request<T> {
    let mut r = Request::new(msg);
    if let Ok(v) = ns.parse() {
        r.metadata_mut().insert("containerd-namespace", v);
    }
    r
}

/// Connect to containerd at `address` and check its version. Returns the version string.
pub async fn connect(address: &Path) -> Result<(Channel, String), ContainerdError> {
    if !address.exists() {
        return Err(ContainerdError::NoSocket {
            address: address.to_path_buf(),
        });
    }
    let channel =
        containerd_client::connect(address)
            .await
            .map_err(|e| ContainerdError::Connect {
                address: address.to_path_buf(),
                reason: format!("{e:?}"),
            })?;
    let v = VersionClient::new(channel.clone())
        .version(())
        .await
        .map_err(|s| ContainerdError::Connect {
            address: address.to_path_buf(),
            reason: s.message().to_string(),
        })?
        .into_inner();
    if !version_at_least(&v.version, MIN_VERSION) {
        return Err(ContainerdError::TooOld {
            address: address.to_path_buf(),
            version: v.version,
        });
    }
    Ok((channel, v.version))
}

/// `1.6.20~ds1`, `v1.7.0`: at least `min` (major, minor)? Unparsable versions (a dev build)
/// are let through: the API calls then say what is missing.
fn version_at_least(version: &str, min: (u32, u32)) -> bool {
    let v = version.trim_start_matches('v');
    let mut parts = v
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= min,
        _ => true,
    }
}

/// Run `f` to completion on a runtime of its own, on a thread of its own: callers are
/// synchronous code that may itself run inside the stage's runtime.
pub fn block_on<T: Send>(f: impl std::future::Future<Output = T> + Send) -> Result<T, String> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| format!("start a runtime for containerd: {e}"))?;
            Ok(rt.block_on(f))
        })
        .join()
        .unwrap_or_else(|_| Err("the containerd thread panicked".to_string()))
    })
}

/// Rewrite a bundle's `config.json` for containerd: the shim runs runc in a bundle of its
/// own, so `root.path` must be absolute; and runc resolves a relative `cgroupsPath` against
/// *its caller's* cgroup, which is the shim's (containerd's) and not stagehand's, so the
/// step's cgroup path is made absolute from stagehand's own cgroup (the memory hierarchy on
/// cgroup v1, where limits and OOM kills are read; the unified one on v2).
pub fn adapt_bundle(bundle: &Path) -> Result<(), ContainerdError> {
    let path = bundle.join("config.json");
    let bad = |reason: String| ContainerdError::Bundle {
        path: path.clone(),
        reason,
    };
    let text = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let mut spec: serde_json::Value =
        serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let root = spec
        .pointer("/root/path")
        .and_then(|p| p.as_str())
        .unwrap_or("rootfs")
        .to_string();
    if !Path::new(&root).is_absolute() {
        spec["root"]["path"] = bundle.join(root).display().to_string().into();
    }
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| bad(format!("/proc/self/cgroup: {e}")))?;
    if let Some(rel) = spec
        .pointer("/linux/cgroupsPath")
        .and_then(|p| p.as_str())
        .map(String::from)
    {
        spec["linux"]["cgroupsPath"] = absolute_cgroup(&own, &rel).into();
    }
    let out = serde_json::to_vec_pretty(&spec).map_err(|e| bad(e.to_string()))?;
    std::fs::write(&path, out).map_err(|e| bad(e.to_string()))
}

/// `rel` under our own cgroup (from `/proc/self/cgroup` text): the v1 memory hierarchy's
/// path if there is one, else the unified hierarchy's. An absolute `rel` is kept.
fn absolute_cgroup(proc_self_cgroup: &str, rel: &str) -> String {
    if rel.starts_with('/') {
        return rel.to_string();
    }
    Path::new(&own_base(proc_self_cgroup))
        .join(rel)
        .display()
        .to_string()
}

/// Our own cgroup in the v1 memory hierarchy, else in the unified one.
fn own_base(proc_self_cgroup: &str) -> String {
    let line_for = |want: &dyn Fn(&str) -> bool| {
        proc_self_cgroup.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            want(ctrls).then(|| path.to_string())
        })
    };
    line_for(&|c| c.split(',').any(|x| x == "memory"))
        .or_else(|| line_for(&|c| c.is_empty()))
        .unwrap_or_else(|| "/".into())
}

/// The hidden `stagehand __containerd-run`: run the container of `bundle` as task `id` and
/// return the exit code to exit with (the task's; 125 when it could not be run).
pub fn run_task(address: &Path, ns: &str, id: &str, bundle: &Path) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stagehand: containerd: start a runtime: {e}");
            return 125;
        }
    };
    match rt.block_on(run_task_async(address, ns, id, bundle)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("stagehand: {e}");
            125
        }
    }
}

async fn run_task_async(
    address: &Path,
    ns: &str,
    id: &str,
    bundle: &Path,
) -> Result<i32, ContainerdError> {
    use tokio::signal::unix::{SignalKind, signal};
    // Signals first: a SIGTERM during create must still reach the task.
    let mut sigs = Vec::new();
    for (kind, n) in [
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::interrupt(), libc::SIGINT),
        (SignalKind::hangup(), libc::SIGHUP),
    ] {
        if let Ok(s) = signal(kind) {
            sigs.push((s, n));
        }
    }
    let (channel, _) = connect(address).await?;
    let spec_path = bundle.join("config.json");
    let spec = std::fs::read(&spec_path).map_err(|e| ContainerdError::Bundle {
        path: spec_path.clone(),
        reason: e.to_string(),
    })?;
    let mut containers = ContainersClient::new(channel.clone());
    let mut tasks = TasksClient::new(channel.clone());
    let container = Container {
        id: id.to_string(),
        labels: HashMap::from([(
            "io.stagehand.bundle".to_string(),
            bundle.display().to_string(),
        )]),
        runtime: Some(Runtime {
            name: RUNTIME.into(),
            options: None,
        }),
        spec: Some(prost_types::Any {
            type_url: SPEC_TYPE_URL.into(),
            value: spec,
        }),
        ..Default::default()
    };
    let create = |c: Container| {
        let mut containers = containers.clone();
        async move {
            containers
                .create(req(CreateContainerRequest { container: Some(c) }, ns))
                .await
        }
    };
    if let Err(s) = create(container.clone()).await {
        if s.code() != Code::AlreadyExists {
            return Err(call_err("create container", id, s));
        }
        // Left by a stagehand that was killed: this step id is ours again.
        remove_async(&channel, ns, id).await?;
        create(container)
            .await
            .map_err(|s| call_err("create container", id, s))?;
    }

    // One FIFO for stdout and stderr (the shim opens it twice), read until every writer is gone.
    let fifo = bundle.join("output.fifo");
    let _ = std::fs::remove_file(&fifo);
    if let Err(e) = nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)) {
        let _ = containers
            .delete(req(DeleteContainerRequest { id: id.into() }, ns))
            .await;
        return Err(ContainerdError::Bundle {
            path: fifo,
            reason: e.to_string(),
        });
    }
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            if let Ok(mut f) = std::fs::File::open(&fifo) {
                let mut out = std::io::stdout().lock();
                let _ = std::io::copy(&mut f, &mut out);
                let _ = out.flush();
            }
        })
    };
    let fifo_s = fifo.display().to_string();
    let created = tasks
        .create(req(
            CreateTaskRequest {
                container_id: id.into(),
                stdout: fifo_s.clone(),
                stderr: fifo_s,
                ..Default::default()
            },
            ns,
        ))
        .await;
    if let Err(s) = created {
        // The reader still waits for a writer: be one for a moment, so it sees EOF.
        let _ = std::fs::OpenOptions::new().write(true).open(&fifo);
        let _ = reader.join();
        let _ = containers
            .delete(req(DeleteContainerRequest { id: id.into() }, ns))
            .await;
        return Err(call_err("create task", id, s));
    }
    // Wait before start, so an instant exit is not missed.
    let wait = {
        let mut tasks = tasks.clone();
        let r = req(
            WaitRequest {
                container_id: id.into(),
                exec_id: String::new(),
            },
            ns,
        );
        tokio::spawn(async move { tasks.wait(r).await })
    };
    if let Err(s) = tasks
        .start(req(
            StartRequest {
                container_id: id.into(),
                exec_id: String::new(),
            },
            ns,
        ))
        .await
    {
        let _ = remove_async(&channel, ns, id).await;
        let _ = reader.join();
        return Err(call_err("start task", id, s));
    }
    let mut wait = std::pin::pin!(wait);
    let have_signals = !sigs.is_empty();
    let status = loop {
        let next_signal = async {
            let futs = sigs.iter_mut().map(|(s, n)| {
                let n = *n;
                Box::pin(async move {
                    s.recv().await;
                    n
                })
            });
            futures::future::select_all(futs).await.0
        };
        tokio::select! {
            r = &mut wait => break r,
            n = next_signal, if have_signals => {
                let k = KillRequest { container_id: id.into(), exec_id: String::new(), signal: n as u32, all: false };
                if let Err(s) = tasks.kill(req(k, ns)).await {
                    eprintln!("stagehand: containerd: forward signal {n} to {id}: {}", s.message());
                }
            }
        }
    };
    let code = match status {
        Ok(Ok(r)) => r.into_inner().exit_status as i32,
        Ok(Err(s)) => {
            eprintln!("stagehand: containerd: wait for {id}: {}", s.message());
            255
        }
        Err(e) => {
            eprintln!("stagehand: containerd: wait for {id}: {e}");
            255
        }
    };
    // The stopped task stays until the step's cleanup ([`remove`]), like `runc run --keep`:
    // deleting it makes runc remove the step's cgroup, and the executor reads an OOM kill
    // from that cgroup after this helper exits. The shim closes its ends of the FIFO once
    // the task's output is copied.
    let drained = tokio::task::spawn_blocking(move || reader.join());
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drained).await;
    let _ = std::fs::remove_file(&fifo);
    Ok(code)
}

/// Kill (SIGKILL), delete the task and delete the container `id`. Already gone is success.
pub async fn remove_async(channel: &Channel, ns: &str, id: &str) -> Result<(), ContainerdError> {
    let mut tasks = TasksClient::new(channel.clone());
    let mut containers = ContainersClient::new(channel.clone());
    let gone = |s: &Status| matches!(s.code(), Code::NotFound);
    let kill = KillRequest {
        container_id: id.into(),
        exec_id: String::new(),
        signal: libc::SIGKILL as u32,
        all: true,
    };
    if let Err(s) = tasks.kill(req(kill, ns)).await {
        // A task that already stopped cannot be killed (FailedPrecondition); deleting it is next.
        if !gone(&s) && s.code() != Code::FailedPrecondition {
            tracing::debug!(id, status = %s.message(), "containerd kill");
        }
    } else {
        // Deleting a running task fails: wait for the kill to land.
        let w = tasks.wait(req(
            WaitRequest {
                container_id: id.into(),
                exec_id: String::new(),
            },
            ns,
        ));
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), w).await;
    }
    if let Err(s) = tasks
        .delete(req(
            DeleteTaskRequest {
                container_id: id.into(),
            },
            ns,
        ))
        .await
    {
        if !gone(&s) {
            return Err(call_err("delete task", id, s));
        }
    }
    if let Err(s) = containers
        .delete(req(DeleteContainerRequest { id: id.into() }, ns))
        .await
    {
        if !gone(&s) {
            return Err(call_err("delete container", id, s));
        }
    }
    Ok(())
}

/// Remove container `id` (and its task) from a synchronous caller, then the cgroup
/// directories runc made for it outside stagehand's own (see [`prune_cgroups`]).
pub fn remove(address: &Path, ns: &str, id: &str, bundle: &Path) -> Result<(), String> {
    let r = block_on(async {
        let (ch, _) = connect(address).await?;
        remove_async(&ch, ns, id).await
    })?
    .map_err(|e| e.to_string());
    let cg = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| {
            v.pointer("/linux/cgroupsPath")
                .and_then(|p| p.as_str())
                .map(String::from)
        });
    if let (Some(cg), Ok(own)) = (cg, std::fs::read_to_string("/proc/self/cgroup")) {
        prune_cgroups(Path::new("/sys/fs/cgroup"), &own, &cg);
    }
    r
}

/// On cgroup v1 the absolute `cgroupsPath` (see [`adapt_bundle`]) is stagehand's step cgroup
/// only in the memory hierarchy; in hierarchies where stagehand sits elsewhere runc made a
/// copy of the path, and deletes only its leaf. Remove those directories (bottom up, empty
/// ones only: `rmdir` refuses anything still in use).
fn prune_cgroups(mounts: &Path, proc_self_cgroup: &str, abs: &str) {
    let Ok(entries) = std::fs::read_dir(mounts) else {
        return;
    };
    let base = own_base(proc_self_cgroup);
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let own = proc_self_cgroup.lines().find_map(|l| {
            let mut it = l.splitn(3, ':');
            let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
            let hit = if name == "unified" {
                ctrls.is_empty()
            } else {
                ctrls
                    .split(',')
                    .any(|c| c == name || format!("name={c}") == name)
                    || ctrls == format!("name={name}")
            };
            hit.then(|| path.to_string())
        });
        // Where stagehand sits at the same place as in the hierarchy the path was made
        // from, the directories are the stage's own.
        if own.is_none_or(|o| o == base) {
            continue;
        }
        let mut p = PathBuf::from(abs);
        while p.parent().is_some() && p != Path::new("/") {
            let dir = e.path().join(p.strip_prefix("/").unwrap_or(&p));
            if !dir.is_dir() || std::fs::remove_dir(&dir).is_err() {
                break;
            }
            p.pop();
        }
    }
}

/// Check from a synchronous caller that containerd answers at `address`; its version.
pub fn check(address: &Path) -> Result<String, String> {
    block_on(async { connect(address).await.map(|(_, v)| v) })?.map_err(|e| e.to_string())
}

/// Delete every container (and task) whose id starts with `stagehand-<run_id>` for each of
/// `run_ids`: what runs killed with SIGKILL left in containerd. A missing socket means there
/// is nothing to clean. Returns (removed ids, errors).
pub fn gc(address: &Path, ns: &str, run_ids: &[String]) -> (Vec<String>, Vec<String>) {
    if run_ids.is_empty() || !address.exists() {
        return (Vec::new(), Vec::new());
    }
    let r = block_on(async {
        let (ch, _) = connect(address).await.map_err(|e| e.to_string())?;
        let list = ContainersClient::new(ch.clone())
            .list(req(ListContainersRequest { filters: vec![] }, ns))
            .await
            .map_err(|s| s.message().to_string())?;
        let (mut removed, mut errors) = (Vec::new(), Vec::new());
        for c in list.into_inner().containers {
            if run_ids
                .iter()
                .any(|r| c.id.starts_with(&format!("stagehand-{r}-")))
            {
                match remove_async(&ch, ns, &c.id).await {
                    Ok(()) => removed.push(c.id),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        Ok::<_, String>((removed, errors))
    });
    match r {
        Ok(Ok(x)) => x,
        Ok(Err(e)) | Err(e) => (Vec::new(), vec![format!("containerd gc: {e}")]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_compared_by_major_and_minor() {
        assert!(version_at_least("1.6.20~ds1", (1, 6)));
        assert!(version_at_least("v1.7.0", (1, 6)));
        assert!(version_at_least("2.0.0", (1, 6)));
        assert!(!version_at_least("1.5.9", (1, 6)));
        assert!(!version_at_least("v1.4.13", (1, 6)));
        assert!(
            version_at_least("dev", (1, 6)),
            "unparsable versions are let through"
        );
    }

    #[test]
    fn cgroup_paths_are_made_absolute_from_our_own_cgroup() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            absolute_cgroup(hybrid, "stagehand/r1/s1"),
            "/process_api/abc/stagehand/r1/s1"
        );
        assert_eq!(
            absolute_cgroup("0::/user.slice/x\n", "stagehand/r1/s1"),
            "/user.slice/x/stagehand/r1/s1"
        );
        assert_eq!(absolute_cgroup(hybrid, "/abs/p"), "/abs/p");
    }

    #[test]
    fn runc_copies_of_the_path_are_pruned_outside_stagehands_own_hierarchy() {
        let mounts = tempfile::tempdir().unwrap();
        let own = "4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/\n";
        let abs = "/process_api/abc/stagehand/r1/s1";
        for h in ["memory", "cpu", "unified"] {
            std::fs::create_dir_all(mounts.path().join(h).join(abs.trim_start_matches('/')))
                .unwrap();
        }
        std::fs::create_dir_all(mounts.path().join("cpu/process_api/other")).unwrap();
        prune_cgroups(mounts.path(), own, abs);
        assert!(
            mounts
                .path()
                .join("memory/process_api/abc/stagehand/r1/s1")
                .is_dir(),
            "the stage's own cgroup stays"
        );
        assert!(
            !mounts.path().join("cpu/process_api/abc").exists()
                && mounts.path().join("cpu/process_api/other").is_dir()
        );
        assert!(!mounts.path().join("unified/process_api").exists());
    }

    #[test]
    fn bundles_get_an_absolute_root() {
        let dir = tempfile::tempdir().unwrap();
        let spec = serde_json::json!({"root": {"path": "rootfs"}, "linux": {"cgroupsPath": "stagehand/r1/s1"}});
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        adapt_bundle(dir.path()).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            v["root"]["path"],
            dir.path().join("rootfs").display().to_string()
        );
        let cg = v["linux"]["cgroupsPath"].as_str().unwrap();
        assert!(
            cg.starts_with('/') && cg.ends_with("/stagehand/r1/s1"),
            "{cg}"
        );
    }

    #[test]
    fn a_missing_socket_says_how_to_fix_it() {
        let e = check(Path::new("/nonexistent/stagehand-containerd.sock")).unwrap_err();
        assert!(
            e.contains("does not exist") && e.contains("--containerd-address"),
            "{e}"
        );
    }
}
