//! The containerd backend (cargo feature `containerd`): container steps run as containerd
//! tasks, created, started, waited, signalled and deleted through containerd's gRPC API, on
//! root filesystems containerd's own snapshotter unpacked from its own content store.
//!
//! Owns: talking to containerd (connecting, the version check, everything in the `stagehand`
//! namespace); importing an image from stagehand's store into containerd (blobs through the
//! content Write API with containerd's `gc.ref` labels, an Image record under stagehand's
//! name, layers unpacked with the diff service into snapshots committed under their chain
//! IDs), all under a lease the stage owns (`stagehand-<run>-<stage>`); the per-container
//! active snapshot whose mounts become the task's rootfs; the hidden `stagehand
//! __containerd-run` helper that the host executor spawns in place of `runc run` (it creates
//! the task, copies the task's output from a FIFO to its own stdout, forwards
//! SIGTERM/SIGINT/SIGHUP as `Tasks.Kill`, and exits with the task's status, 128+N for signal
//! N); adapting a stagehand bundle for containerd (absolute cgroup path); and deleting what a
//! stage or a killed run left in containerd (tasks, containers, snapshots, leases).
//! Does not own: the OCI spec (built by `container.rs` exactly as for runc), the step cgroup,
//! OOM reports (the task runs in the step's cgroup, where `host.rs` reads OOM kills as for
//! runc), readiness, timeouts or logs (all unchanged, in `host.rs`).
//!
//! Images stay in containerd after the stage (the Image record is a gc root, and its
//! manifest, config and snapshots are reachable from it through the labels), so a second run
//! only checks that they are there. The lease protects what is written before the Image
//! record names it, and the active snapshots; deleting it at stage end (or in `stagehand gc`)
//! lets containerd collect whatever the stage left unreferenced.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use containerd_client::services::v1::container::Runtime;
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::diff_client::DiffClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::leases_client::LeasesClient;
use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::services::v1::snapshots::{
    CommitSnapshotRequest, ListSnapshotsRequest, MountsRequest, PrepareSnapshotRequest,
    RemoveSnapshotRequest, StatSnapshotRequest,
};
use containerd_client::services::v1::tasks_client::TasksClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{
    ApplyRequest, Container, CreateContainerRequest, CreateImageRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteTaskRequest, GetImageRequest, Image, InfoRequest, KillRequest,
    ListContainersRequest, ListImagesRequest, StartRequest, UpdateImageRequest, UpdateRequest,
    WaitRequest, WriteAction, WriteContentRequest,
};
use containerd_client::services::v1::{
    CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
    ListRequest as ListLeasesRequest,
};
use containerd_client::tonic::transport::Channel;
use containerd_client::tonic::{Code, Request, Status};
use containerd_client::types::{Descriptor, Mount};
use sha2::Digest as _;
use stagehand_oci::store::{ImageId, Store};

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
    #[error("{SNAPSHOTTER_ENV}={name}: unknown snapshotter (overlayfs or native)")]
    Snapshotter { name: String },
    #[error("image `{image}` in stagehand's store: {reason}")]
    Store { image: String, reason: String },
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

/// [`req`] under `lease`: what the call creates is held by the lease until it is deleted.
fn req_leased<T>(msg: T, ns: &str, lease: &str) -> Request<T> {
    let mut r = req(msg, ns);
    if let Ok(v) = lease.parse() {
        r.metadata_mut().insert(LEASE_HEADER, v);
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

/// Rewrite a bundle's `config.json` for containerd, once the spec is built: the snapshot
/// [`prepare_rootfs`] mounted at `<bundle>/rootfs` is unmounted (the shim mounts the
/// snapshot's mounts in a bundle of its own, where `root.path` stays `rootfs`); a bundle
/// without a containerd snapshot (none was prepared) gets an absolute `root.path`. And runc
/// resolves a relative `cgroupsPath` against *its caller's* cgroup, which is the shim's
/// (containerd's) and not stagehand's, so the step's cgroup path is made absolute from
/// stagehand's own cgroup (the memory hierarchy on cgroup v1, where limits and OOM kills are
/// read; the unified one on v2).
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
    if read_record(bundle).is_some() {
        unmount(&stagehand_oci::rootfs::rootfs_path(bundle)).map_err(bad)?;
    } else if !Path::new(&root).is_absolute() {
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
            // Every error here comes before the task's program ran: say so where the step's
            // report looks (as runc's own log does for the runc backend).
            if let Err(w) = stagehand_oci::runtime::record_start_error(bundle, &e.to_string()) {
                eprintln!(
                    "stagehand: containerd: record the failure in {}: {w}",
                    bundle.display()
                );
            }
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
    // The snapshot prepared for this container: the task's rootfs.
    let record = read_record(bundle);
    let rootfs = match &record {
        Some(r) => {
            SnapshotsClient::new(channel.clone())
                .mounts(req(
                    MountsRequest {
                        snapshotter: r.snapshotter.clone(),
                        key: r.key.clone(),
                    },
                    ns,
                ))
                .await
                .map_err(|s| call_err("snapshot mounts", &r.key, s))?
                .into_inner()
                .mounts
        }
        None => Vec::new(),
    };
    let container = Container {
        id: id.to_string(),
        labels: HashMap::from([(
            "io.stagehand.bundle".to_string(),
            bundle.display().to_string(),
        )]),
        image: record.as_ref().map(|r| r.image.clone()).unwrap_or_default(),
        snapshotter: record
            .as_ref()
            .map(|r| r.snapshotter.clone())
            .unwrap_or_default(),
        snapshot_key: record.as_ref().map(|r| r.key.clone()).unwrap_or_default(),
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
                rootfs,
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

/// Remove container `id` (and its task) from a synchronous caller, its snapshot (and the
/// mount of it, if the spec was never finished), then the cgroup directories runc made for it
/// outside stagehand's own (see [`prune_cgroups`]).
pub fn remove(address: &Path, ns: &str, id: &str, bundle: &Path) -> Result<(), String> {
    let record = read_record(bundle);
    let mut errors = Vec::new();
    if record.is_some() {
        if let Err(e) = unmount(&stagehand_oci::rootfs::rootfs_path(bundle)) {
            errors.push(e);
        }
    }
    let r = block_on(async {
        let (ch, _) = connect(address).await.map_err(|e| e.to_string())?;
        remove_async(&ch, ns, id).await.map_err(|e| e.to_string())?;
        match &record {
            Some(r) => match remove_snapshot(&ch, ns, &r.snapshotter, &r.key).await {
                Some(e) => Err(e),
                None => Ok(()),
            },
            None => Ok(()),
        }
    })
    .and_then(|r| r);
    if let Err(e) = r {
        errors.push(e);
    }
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
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
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

/// Delete what runs whose stagehand is gone (killed with SIGKILL) left in containerd: every
/// container (and task) whose id is `stagehand-<run>-...` for a run not in `live`, every
/// snapshot whose key is (the containers' active snapshots, in every snapshotter stagehand
/// uses), and the runs' leases (`stagehand-<run>-<stage>`), so containerd collects what only
/// they held. Keyed on the live runs rather than on the dead ones a host gc just undid: an
/// earlier gc without containerd (a `runc` run's start-up gc) forgets the dead runs. A
/// missing socket means there is nothing to clean. Returns (what was removed, errors).
pub fn gc(address: &Path, ns: &str, live: &[String]) -> (Vec<String>, Vec<String>) {
    if !address.exists() {
        return (Vec::new(), Vec::new());
    }
    let ours = |id: &str| run_of(id).is_some_and(|r| !live.iter().any(|l| l == r));
    let r = block_on(async {
        let (ch, _) = connect(address).await.map_err(|e| e.to_string())?;
        let list = ContainersClient::new(ch.clone())
            .list(req(ListContainersRequest { filters: vec![] }, ns))
            .await
            .map_err(|s| s.message().to_string())?;
        let (mut removed, mut errors) = (Vec::new(), Vec::new());
        for c in list.into_inner().containers {
            if ours(&c.id) {
                match remove_async(&ch, ns, &c.id).await {
                    Ok(()) => removed.push(format!("container {}", c.id)),
                    Err(e) => errors.push(e.to_string()),
                }
            }
        }
        for sn in SNAPSHOTTERS {
            let Ok(list) = SnapshotsClient::new(ch.clone())
                .list(req(
                    ListSnapshotsRequest {
                        snapshotter: (*sn).into(),
                        filters: vec![],
                    },
                    ns,
                ))
                .await
            else {
                // A snapshotter this containerd does not have holds nothing of ours.
                continue;
            };
            let mut stream = list.into_inner();
            let mut keys = Vec::new();
            while let Ok(Some(page)) = stream.message().await {
                keys.extend(page.info.into_iter().map(|i| i.name).filter(|k| ours(k)));
            }
            for k in keys {
                match remove_snapshot(&ch, ns, sn, &k).await {
                    None => removed.push(format!("snapshot {sn}/{k}")),
                    Some(e) => errors.push(e),
                }
            }
        }
        let leases = LeasesClient::new(ch.clone())
            .list(req(ListLeasesRequest { filters: vec![] }, ns))
            .await
            .map_err(|s| s.message().to_string())?;
        for l in leases.into_inner().leases {
            if ours(&l.id) {
                match delete_lease(&ch, ns, &l.id).await {
                    Ok(()) => removed.push(format!("lease {}", l.id)),
                    Err(e) => errors.push(e),
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

/// The run id in a stagehand object id `stagehand-<run>-<step or stage>`.
fn run_of(id: &str) -> Option<&str> {
    let rest = id.strip_prefix("stagehand-")?;
    let (run, name) = rest.split_once('-')?;
    (!run.is_empty() && !name.is_empty()).then_some(run)
}

/// The snapshotter used when `STAGEHAND_CONTAINERD_SNAPSHOTTER` does not name another.
pub const DEFAULT_SNAPSHOTTER: &str = "overlayfs";
/// The setting that selects the snapshotter: `overlayfs` (default) or `native` (a full copy
/// per snapshot, for filesystems overlayfs cannot sit on).
pub const SNAPSHOTTER_ENV: &str = "STAGEHAND_CONTAINERD_SNAPSHOTTER";
const SNAPSHOTTERS: &[&str] = &["overlayfs", "native"];
/// Blobs go to containerd in pieces of this size (its gRPC limit is 16 MiB per message).
const WRITE_CHUNK: usize = 1 << 20;
/// The bundle file that tells the helper and the cleanup which snapshot the container uses.
const ROOTFS_RECORD: &str = "containerd-rootfs.json";
const LEASE_HEADER: &str = "containerd-lease";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// The snapshotter chosen by [`SNAPSHOTTER_ENV`] (unset: [`DEFAULT_SNAPSHOTTER`]).
pub fn snapshotter() -> Result<String, ContainerdError> {
    let chosen = std::env::var(SNAPSHOTTER_ENV).unwrap_or_default();
    let chosen = chosen.trim();
    if chosen.is_empty() {
        return Ok(DEFAULT_SNAPSHOTTER.into());
    }
    if SNAPSHOTTERS.contains(&chosen) {
        Ok(chosen.into())
    } else {
        Err(ContainerdError::Snapshotter {
            name: chosen.into(),
        })
    }
}

/// The lease a stage's containerd objects are held by: `stagehand-<run>-<stage>`, from the
/// stage's container id prefix (`stagehand-<run>`), so `stagehand gc` finds it by run.
pub fn lease_id(id_prefix: &str, stage: &str) -> String {
    format!("{id_prefix}-{stage}")
}

/// OCI chain IDs of a layer stack (base first): the first is its diff ID, each next one is
/// `sha256(previous + " " + diff ID)`. Committed snapshots are named by them, as containerd
/// names them, so images sharing base layers share snapshots.
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{:x}",
                sha2::Sha256::digest(format!("{prev} {d}").as_bytes())
            ),
        };
        out.push(next);
    }
    out
}

/// What [`prepare_rootfs`] records in the bundle: the snapshot the container's rootfs is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RootfsRecord {
    snapshotter: String,
    /// The active snapshot's key (the container id).
    key: String,
    /// The Image record's name in containerd.
    image: String,
}

fn read_record(bundle: &Path) -> Option<RootfsRecord> {
    let bytes = std::fs::read(bundle.join(ROOTFS_RECORD)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// What one import did, for the message and the tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    /// Blobs written to the content store (0 when containerd had them all).
    pub blobs_written: usize,
    /// Layers unpacked into new snapshots (0 when every chain ID was committed already).
    pub layers_unpacked: usize,
}

/// One blob of an image, as it goes into containerd's content store.
struct Blob {
    digest: String,
    size: i64,
    labels: HashMap<String, String>,
}

/// The image's name in containerd: stagehand's normalized name (`docker.io/library/busybox:latest`)
/// for a reference, its manifest digest for an image named by id or digest only.
pub fn image_name(image: &str, id: &ImageId) -> String {
    stagehand_oci::store::parse_reference(image)
        .ok()
        .filter(|r| r.digest().is_none())
        .and_then(|r| stagehand_oci::store::name_of(&r))
        .unwrap_or_else(|| id.to_string())
}

/// Prepare the root filesystem of container `id` (bundle `bundle`) in containerd: import
/// the image `image` (stagehand's `image_id`) if containerd lacks any of it, unpack what is
/// not unpacked yet, prepare the container's active snapshot, and record it in the bundle
/// for the helper. The snapshot is also mounted at `<bundle>/rootfs` until
/// [`adapt_bundle`], so the spec can be built from the image's files (`/etc/passwd` for
/// `runAsUser`) as for runc. Everything is created under `lease`. Errors undo the snapshot
/// and the mount.
#[allow(clippy::too_many_arguments)]
pub fn prepare_rootfs(
    address: &Path,
    ns: &str,
    lease: &str,
    store: &Store,
    image_id: &ImageId,
    image: &str,
    id: &str,
    bundle: &Path,
) -> Result<Imported, String> {
    let snapshotter = snapshotter().map_err(|e| e.to_string())?;
    let name = image_name(image, image_id);
    let target = stagehand_oci::rootfs::rootfs_path(bundle);
    let r = block_on(async {
        let (ch, _) = connect(address).await?;
        ensure_lease(&ch, ns, lease).await?;
        // Keep `image prune` away from the blobs while they are read.
        let _guard = store.write_guard().map_err(|e| ContainerdError::Store {
            image: image.to_string(),
            reason: e.to_string(),
        })?;
        let started = std::time::Instant::now();
        let imported = import_image(&ch, ns, lease, store, image_id, &name, &snapshotter).await?;
        if imported != Imported::default() {
            eprintln!(
                "stagehand: imported `{image}` into containerd ({} blob(s) written, {} layer(s) unpacked with {snapshotter}) in {}",
                imported.blobs_written,
                imported.layers_unpacked,
                crate::units::format_duration(started.elapsed())
            );
        }
        let top = top_chain(store, image_id, image)?;
        let mounts = prepare_active(&ch, ns, lease, &snapshotter, id, &top).await?;
        let record = RootfsRecord {
            snapshotter: snapshotter.clone(),
            key: id.to_string(),
            image: name.clone(),
        };
        let written = serde_json::to_vec(&record)
            .map_err(|e| e.to_string())
            .and_then(|b| std::fs::write(bundle.join(ROOTFS_RECORD), b).map_err(|e| e.to_string()))
            .and_then(|()| mount_all(&mounts, &target));
        if let Err(reason) = written {
            let _ = unmount(&target);
            remove_snapshot(&ch, ns, &snapshotter, id).await;
            return Err(ContainerdError::Bundle {
                path: target.clone(),
                reason,
            });
        }
        Ok(imported)
    });
    r?.map_err(|e| e.to_string())
}

/// The top chain ID of `image_id`: the snapshot a container of it is prepared from.
fn top_chain(store: &Store, image_id: &ImageId, image: &str) -> Result<String, ContainerdError> {
    let layers = store.layers(image_id).map_err(|e| ContainerdError::Store {
        image: image.to_string(),
        reason: e.to_string(),
    })?;
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    chain_ids(&diff_ids)
        .pop()
        .ok_or_else(|| ContainerdError::Store {
            image: image.to_string(),
            reason: "the image has no layers".into(),
        })
}

async fn ensure_lease(ch: &Channel, ns: &str, lease: &str) -> Result<(), ContainerdError> {
    let r = LeasesClient::new(ch.clone())
        .create(req(
            CreateLeaseRequest {
                id: lease.to_string(),
                labels: HashMap::from([("io.stagehand.owner".to_string(), "stage".to_string())]),
            },
            ns,
        ))
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::AlreadyExists => Ok(()),
        Err(s) => Err(call_err("create lease", lease, s)),
    }
}

/// Bring image `image_id` into containerd as `name`: blobs, Image record, unpacked layers.
/// Idempotent: what containerd has is only checked (one `Info` or `Stat` per object).
pub async fn import_image(
    ch: &Channel,
    ns: &str,
    lease: &str,
    store: &Store,
    image_id: &ImageId,
    name: &str,
    snapshotter: &str,
) -> Result<Imported, ContainerdError> {
    let store_err = |e: stagehand_oci::store::StoreError| ContainerdError::Store {
        image: name.to_string(),
        reason: e.to_string(),
    };
    let manifest_bytes = store.read_blob(image_id.digest()).map_err(store_err)?;
    let manifest = store.manifest(image_id).map_err(store_err)?;
    let layers = store.layers(image_id).map_err(store_err)?;
    let manifest_type = serde_json::from_slice::<serde_json::Value>(&manifest_bytes)
        .ok()
        .and_then(|v| v.get("mediaType")?.as_str().map(String::from))
        .unwrap_or_else(|| OCI_MANIFEST.into());
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    let chains = chain_ids(&diff_ids);
    let top = chains.last().cloned().unwrap_or_default();
    let config = manifest.config();

    // Children first, so every blob a label names is there once the label is.
    let mut blobs: Vec<Blob> = layers
        .iter()
        .map(|l| Blob {
            digest: l.digest.to_string(),
            size: l.size as i64,
            labels: HashMap::from([(
                "containerd.io/uncompressed".to_string(),
                l.diff_id.to_string(),
            )]),
        })
        .collect();
    blobs.push(Blob {
        digest: config.digest().to_string(),
        size: config.size() as i64,
        labels: HashMap::from([(
            format!("containerd.io/gc.ref.snapshot.{snapshotter}"),
            top.clone(),
        )]),
    });
    let mut manifest_labels = HashMap::from([(
        "containerd.io/gc.ref.content.config".to_string(),
        config.digest().to_string(),
    )]);
    for (i, l) in layers.iter().enumerate() {
        manifest_labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.digest.to_string(),
        );
    }
    blobs.push(Blob {
        digest: image_id.to_string(),
        size: manifest_bytes.len() as i64,
        labels: manifest_labels,
    });

    let mut imported = Imported::default();
    for b in &blobs {
        if ensure_blob(ch, ns, lease, store, b).await? {
            imported.blobs_written += 1;
        }
    }
    ensure_image(
        ch,
        ns,
        Image {
            name: name.to_string(),
            labels: HashMap::from([("io.stagehand.image".to_string(), "imported".to_string())]),
            target: Some(Descriptor {
                media_type: manifest_type,
                digest: image_id.to_string(),
                size: manifest_bytes.len() as i64,
                annotations: HashMap::new(),
            }),
            ..Default::default()
        },
    )
    .await?;
    let descs: Vec<Descriptor> = layers
        .iter()
        .map(|l| Descriptor {
            media_type: l.media_type.to_string(),
            digest: l.digest.to_string(),
            size: l.size as i64,
            annotations: HashMap::new(),
        })
        .collect();
    imported.layers_unpacked = unpack(ch, ns, lease, snapshotter, &descs, &diff_ids).await?;
    Ok(imported)
}

/// Make sure containerd has blob `b` with (at least) its labels. True when it was written.
async fn ensure_blob(
    ch: &Channel,
    ns: &str,
    lease: &str,
    store: &Store,
    b: &Blob,
) -> Result<bool, ContainerdError> {
    let mut content = ContentClient::new(ch.clone());
    match content
        .info(req(
            InfoRequest {
                digest: b.digest.clone(),
            },
            ns,
        ))
        .await
    {
        Ok(info) => {
            let have = info.into_inner().info.map(|i| i.labels).unwrap_or_default();
            let missing: Vec<&String> = b
                .labels
                .iter()
                .filter(|(k, v)| have.get(*k) != Some(*v))
                .map(|(k, _)| k)
                .collect();
            if !missing.is_empty() {
                let paths = missing.iter().map(|k| format!("labels.{k}")).collect();
                content
                    .update(req(
                        UpdateRequest {
                            info: Some(containerd_client::services::v1::Info {
                                digest: b.digest.clone(),
                                labels: b.labels.clone(),
                                ..Default::default()
                            }),
                            update_mask: Some(prost_types::FieldMask { paths }),
                        },
                        ns,
                    ))
                    .await
                    .map_err(|s| call_err("label content", &b.digest, s))?;
            }
            return Ok(false);
        }
        Err(s) if s.code() == Code::NotFound => {}
        Err(s) => return Err(call_err("content info", &b.digest, s)),
    }
    let digest: stagehand_oci::oci_spec::image::Digest =
        b.digest.parse().map_err(|e| ContainerdError::Store {
            image: b.digest.clone(),
            reason: format!("{e}"),
        })?;
    let path = store
        .blob_path(&digest)
        .map_err(|e| ContainerdError::Store {
            image: b.digest.clone(),
            reason: e.to_string(),
        })?;
    let file = std::fs::File::open(&path).map_err(|e| ContainerdError::Bundle {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    // A ref of our own: two steps importing the same blob at once both write, and the
    // second commit finds the blob there (AlreadyExists), which is success.
    let write_ref = format!(
        "stagehand-{}-{}-{}",
        std::process::id(),
        unique(),
        digest.digest()
    );
    let (total, expected, labels) = (b.size, b.digest.clone(), b.labels.clone());
    let messages = futures::stream::unfold((Some(file), 0i64), move |(file, offset)| {
        let (write_ref, expected, labels) = (write_ref.clone(), expected.clone(), labels.clone());
        async move {
            let mut f = file?;
            let mut buf = vec![0u8; WRITE_CHUNK];
            let n = read_full(&mut f, &mut buf).ok()?;
            buf.truncate(n);
            let last = n < WRITE_CHUNK;
            let msg = WriteContentRequest {
                action: if last {
                    WriteAction::Commit as i32
                } else {
                    WriteAction::Write as i32
                },
                r#ref: write_ref,
                total,
                expected,
                offset,
                data: buf,
                labels: if last { labels } else { HashMap::new() },
            };
            Some((msg, (if last { None } else { Some(f) }, offset + n as i64)))
        }
    });
    let resp = match content.write(req_leased(messages, ns, lease)).await {
        Ok(r) => r,
        Err(s) if s.code() == Code::AlreadyExists => return Ok(false),
        Err(s) => return Err(call_err("write content", &b.digest, s)),
    };
    let mut stream = resp.into_inner();
    let mut committed = false;
    loop {
        match stream.message().await {
            Ok(Some(m)) => {
                if m.action == WriteAction::Commit as i32 {
                    committed = true;
                }
            }
            Ok(None) => break,
            Err(s) if s.code() == Code::AlreadyExists => return Ok(false),
            Err(s) => return Err(call_err("write content", &b.digest, s)),
        }
    }
    if !committed {
        return Err(ContainerdError::Call {
            call: "write content",
            id: b.digest.clone(),
            status: format!("the write of {} ended before its commit", path.display()),
        });
    }
    Ok(true)
}

/// Read until `buf` is full or the file ends; the number of bytes read.
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Nanoseconds since the epoch mixed with a counter: unique keys within and across runs.
fn unique() -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{nanos:x}{n:x}")
}

/// Create the Image record `image`, or point the existing one at this manifest.
async fn ensure_image(ch: &Channel, ns: &str, image: Image) -> Result<(), ContainerdError> {
    let mut images = ImagesClient::new(ch.clone());
    let name = image.name.clone();
    let want = image.target.as_ref().map(|t| t.digest.clone());
    match images
        .get(req(GetImageRequest { name: name.clone() }, ns))
        .await
    {
        Ok(r) => {
            let have = r
                .into_inner()
                .image
                .and_then(|i| i.target)
                .map(|t| t.digest);
            if have == want {
                return Ok(());
            }
            images
                .update(req(
                    UpdateImageRequest {
                        image: Some(image),
                        update_mask: None,
                        source_date_epoch: None,
                    },
                    ns,
                ))
                .await
                .map(|_| ())
                .map_err(|s| call_err("update image", &name, s))
        }
        Err(s) if s.code() == Code::NotFound => match images
            .create(req(
                CreateImageRequest {
                    image: Some(image),
                    source_date_epoch: None,
                },
                ns,
            ))
            .await
        {
            Ok(_) => Ok(()),
            // Another step of the stage created it first.
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(call_err("create image", &name, s)),
        },
        Err(s) => Err(call_err("get image", &name, s)),
    }
}

/// Unpack `layers` (base first, with their `diff_ids`) as containerd does: each layer is
/// applied by the diff service onto a snapshot prepared from its parent's chain ID and
/// committed under its own chain ID. Layers whose chain ID is committed are skipped (only the
/// topmost present one is looked for: its parents exist, snapshots hold their parents).
/// Returns how many layers were unpacked.
async fn unpack(
    ch: &Channel,
    ns: &str,
    lease: &str,
    snapshotter: &str,
    layers: &[Descriptor],
    diff_ids: &[String],
) -> Result<usize, ContainerdError> {
    let chains = chain_ids(diff_ids);
    let mut snaps = SnapshotsClient::new(ch.clone());
    let mut first_missing = 0;
    for i in (0..chains.len()).rev() {
        let stat = snaps
            .stat(req(
                StatSnapshotRequest {
                    snapshotter: snapshotter.into(),
                    key: chains[i].clone(),
                },
                ns,
            ))
            .await;
        match stat {
            Ok(_) => {
                first_missing = i + 1;
                break;
            }
            Err(s) if s.code() == Code::NotFound => {}
            Err(s) => return Err(call_err("stat snapshot", &chains[i], s)),
        }
    }
    let mut diff = DiffClient::new(ch.clone());
    for i in first_missing..chains.len() {
        let key = format!("extract-{}-{}", unique(), chains[i]);
        let parent = if i == 0 {
            String::new()
        } else {
            chains[i - 1].clone()
        };
        let mounts = snaps
            .prepare(req_leased(
                PrepareSnapshotRequest {
                    snapshotter: snapshotter.into(),
                    key: key.clone(),
                    parent,
                    labels: HashMap::new(),
                },
                ns,
                lease,
            ))
            .await
            .map_err(|s| call_err("prepare snapshot", &key, s))?
            .into_inner()
            .mounts;
        let applied = diff
            .apply(req_leased(
                ApplyRequest {
                    diff: Some(layers[i].clone()),
                    mounts,
                    ..Default::default()
                },
                ns,
                lease,
            ))
            .await;
        let applied = match applied {
            Ok(r) => r.into_inner().applied.map(|d| d.digest).unwrap_or_default(),
            Err(s) => {
                remove_snapshot(ch, ns, snapshotter, &key).await;
                return Err(call_err("apply layer", &layers[i].digest, s));
            }
        };
        if applied != diff_ids[i] {
            remove_snapshot(ch, ns, snapshotter, &key).await;
            return Err(ContainerdError::Call {
                call: "apply layer",
                id: layers[i].digest.clone(),
                status: format!(
                    "the unpacked layer is {applied}, the image config says {}",
                    diff_ids[i]
                ),
            });
        }
        let committed = snaps
            .commit(req_leased(
                CommitSnapshotRequest {
                    snapshotter: snapshotter.into(),
                    name: chains[i].clone(),
                    key: key.clone(),
                    labels: HashMap::new(),
                },
                ns,
                lease,
            ))
            .await;
        match committed {
            Ok(_) => {}
            // Unpacked at the same time by another step: theirs is as good as ours.
            Err(s) if s.code() == Code::AlreadyExists => {
                remove_snapshot(ch, ns, snapshotter, &key).await;
            }
            Err(s) => {
                remove_snapshot(ch, ns, snapshotter, &key).await;
                return Err(call_err("commit snapshot", &chains[i], s));
            }
        }
    }
    Ok(chains.len() - first_missing)
}

/// The container's active snapshot `key` on top of `parent`; its mounts. One left by a
/// killed run under the same key is replaced.
async fn prepare_active(
    ch: &Channel,
    ns: &str,
    lease: &str,
    snapshotter: &str,
    key: &str,
    parent: &str,
) -> Result<Vec<Mount>, ContainerdError> {
    let mut snaps = SnapshotsClient::new(ch.clone());
    let prepare = PrepareSnapshotRequest {
        snapshotter: snapshotter.into(),
        key: key.into(),
        parent: parent.into(),
        labels: HashMap::from([("io.stagehand.container".to_string(), key.to_string())]),
    };
    let r = match snaps.prepare(req_leased(prepare.clone(), ns, lease)).await {
        Err(s) if s.code() == Code::AlreadyExists => {
            remove_snapshot(ch, ns, snapshotter, key).await;
            snaps.prepare(req_leased(prepare, ns, lease)).await
        }
        r => r,
    };
    r.map(|r| r.into_inner().mounts)
        .map_err(|s| call_err("prepare snapshot", key, s))
}

/// Remove snapshot `key`; already gone is fine, anything else is logged (teardown goes on).
async fn remove_snapshot(ch: &Channel, ns: &str, snapshotter: &str, key: &str) -> Option<String> {
    let r = SnapshotsClient::new(ch.clone())
        .remove(req(
            RemoveSnapshotRequest {
                snapshotter: snapshotter.into(),
                key: key.into(),
            },
            ns,
        ))
        .await;
    match r {
        Ok(_) => None,
        Err(s) if s.code() == Code::NotFound => None,
        Err(s) => Some(call_err("remove snapshot", key, s).to_string()),
    }
}

/// Mount containerd's `mounts` (a snapshot's: one overlay or bind mount) at `target`.
fn mount_all(mounts: &[Mount], target: &Path) -> Result<(), String> {
    use nix::mount::MsFlags;
    std::fs::create_dir_all(target).map_err(|e| format!("create {}: {e}", target.display()))?;
    for m in mounts {
        let mut flags = MsFlags::empty();
        let mut data = Vec::new();
        for o in &m.options {
            match o.as_str() {
                "ro" => flags |= MsFlags::MS_RDONLY,
                "rw" => {}
                "bind" => flags |= MsFlags::MS_BIND,
                "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
                "nosuid" => flags |= MsFlags::MS_NOSUID,
                "nodev" => flags |= MsFlags::MS_NODEV,
                "noexec" => flags |= MsFlags::MS_NOEXEC,
                other => data.push(other),
            }
        }
        let fstype = (m.r#type != "bind").then_some(m.r#type.as_str());
        let data = data.join(",");
        nix::mount::mount(
            Some(m.source.as_str()),
            target,
            fstype,
            flags,
            (!data.is_empty()).then_some(data.as_str()),
        )
        .map_err(|e| {
            format!(
                "mount {} ({}) at {}: {e}",
                m.source,
                m.r#type,
                target.display()
            )
        })?;
    }
    Ok(())
}

/// Unmount `target` (lazily, with everything under it); not mounted is fine.
fn unmount(target: &Path) -> Result<(), String> {
    match nix::mount::umount2(target, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => Ok(()),
        Err(e) => Err(format!("unmount {}: {e}", target.display())),
    }
}

/// The names and manifest digests of the images containerd has in namespace `ns`.
pub fn images(address: &Path, ns: &str) -> Result<HashMap<String, String>, String> {
    block_on(async {
        let (ch, _) = connect(address).await.map_err(|e| e.to_string())?;
        let list = ImagesClient::new(ch)
            .list(req(ListImagesRequest { filters: vec![] }, ns))
            .await
            .map_err(|s| format!("containerd list images: {}", s.message()))?;
        Ok(list
            .into_inner()
            .images
            .into_iter()
            .map(|i| (i.name, i.target.map(|t| t.digest).unwrap_or_default()))
            .collect())
    })?
}

/// End of a stage: delete its lease, so containerd collects whatever the stage created and
/// nothing else references (images and their snapshots stay: the Image records hold them).
pub fn end_stage(address: &Path, ns: &str, lease: &str) -> Result<(), String> {
    block_on(async {
        let (ch, _) = connect(address).await.map_err(|e| e.to_string())?;
        delete_lease(&ch, ns, lease).await
    })?
}

async fn delete_lease(ch: &Channel, ns: &str, lease: &str) -> Result<(), String> {
    let r = LeasesClient::new(ch.clone())
        .delete(req(
            DeleteLeaseRequest {
                id: lease.into(),
                sync: false,
            },
            ns,
        ))
        .await;
    match r {
        Ok(_) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(call_err("delete lease", lease, s).to_string()),
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
    fn chain_ids_follow_the_oci_rule() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let chains = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(chains[0], a, "the base layer's chain ID is its diff ID");
        let want = format!(
            "sha256:{:x}",
            sha2::Sha256::digest(format!("{a} {b}").as_bytes())
        );
        assert_eq!(chains[1], want);
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn gc_finds_the_run_in_object_ids() {
        assert_eq!(run_of("stagehand-0a1b2c3d4e5f-hello"), Some("0a1b2c3d4e5f"));
        assert_eq!(
            run_of("stagehand-0a1b2c3d4e5f-sg1_Run-1"),
            Some("0a1b2c3d4e5f")
        );
        assert_eq!(run_of(&lease_id("stagehand-r1", "build")), Some("r1"));
        assert_eq!(
            run_of("sha256:abcd"),
            None,
            "committed layer snapshots are never ours"
        );
        assert_eq!(run_of("extract-1-sha256:abcd"), None);
        assert_eq!(run_of("stagehand-r1"), None);
    }

    #[test]
    fn images_are_named_as_stagehand_names_them() {
        let id = ImageId::new(format!("sha256:{}", "c".repeat(64)).parse().unwrap());
        assert_eq!(
            image_name("busybox", &id),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            image_name("127.0.0.1:5000/lab/app:1", &id),
            "127.0.0.1:5000/lab/app:1"
        );
        assert_eq!(
            image_name(&format!("busybox@{id}"), &id),
            id.to_string(),
            "a digest-pinned image is named by its manifest digest"
        );
    }

    #[test]
    fn the_bundle_record_round_trips_and_drives_adapt_bundle() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_record(dir.path()).is_none());
        let r = RootfsRecord {
            snapshotter: "native".into(),
            key: "stagehand-r1-s1".into(),
            image: "docker.io/library/busybox:latest".into(),
        };
        std::fs::write(
            dir.path().join(ROOTFS_RECORD),
            serde_json::to_vec(&r).unwrap(),
        )
        .unwrap();
        assert_eq!(read_record(dir.path()), Some(r));
        // With a containerd snapshot the root stays `rootfs`, relative to the shim's bundle.
        let spec = serde_json::json!({"root": {"path": "rootfs"}, "linux": {"cgroupsPath": "stagehand/r1/s1"}});
        std::fs::write(dir.path().join("config.json"), spec.to_string()).unwrap();
        adapt_bundle(dir.path()).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(v["root"]["path"], "rootfs");
    }

    #[test]
    fn an_unknown_snapshotter_is_refused_by_name() {
        let e = ContainerdError::Snapshotter { name: "zfs".into() };
        assert_eq!(
            e.to_string(),
            "STAGEHAND_CONTAINERD_SNAPSHOTTER=zfs: unknown snapshotter (overlayfs or native)"
        );
        assert!(SNAPSHOTTERS.contains(&DEFAULT_SNAPSHOTTER));
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
