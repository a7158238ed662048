//! Container steps: a step with an `image` becomes an OCI container, with no daemon.
//!
//! Owns: the Harness rules for what a container runs (`entrypoint` replaces the image
//! ENTRYPOINT and ignores `command`; a `command` runs as a script with the step's shell; with
//! neither, the image's ENTRYPOINT + CMD), its environment (image env, then stage variables,
//! then `envVariables`), mounts (workspace at `/harness`, the stage hosts file, resolv.conf,
//! EmptyDir volumes), and handing the prepared bundle to the host executor, which runs the
//! runtime in the foreground as its child. Does not own: images and specs (`stagehand_oci`),
//! processes and the stage sandbox (`stagehand_supervisor`).

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use stagehand_oci::pull::{self, PullError, PullOptions};
use stagehand_oci::rootfs::Rootfs;
use stagehand_oci::runtime::{Control, OciRuntime, RuncCli};
use stagehand_oci::spec::{self, BindMount, ContainerSpec, Host, Network, Resources};
use stagehand_oci::store::Store;
use stagehand_oci::unpack;
use stagehand_supervisor::cgroup::Limits;
use stagehand_supervisor::process::{self, OutputTarget, SpawnSpec};
use stagehand_supervisor::stage::Stage;

use super::ResolvedStep;
use super::host::HostExecutor;
use crate::model::PullPolicy;

/// Where containers get their init (PID 1 that forwards signals and reaps): catatonit.
const INIT_CANDIDATES: &[&str] = &["/usr/bin/catatonit", "/usr/libexec/podman/catatonit"];

/// Everything a stage needs to run container steps.
pub struct Containers {
    store: Store,
    runtime: RuncCli,
    host: Host,
    init: Option<PathBuf>,
    /// `<run dir>/containers/<stage>`: one bundle directory per step.
    dir: PathBuf,
    id_prefix: String,
    /// EmptyDir volumes of the stage: (host directory, mount path).
    volumes: Vec<(PathBuf, String)>,
    backend: Backend,
}

/// What runs the containers: runc as stagehand's child, or containerd's API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Backend {
    /// `runc run` in the foreground (the daemonless default).
    #[default]
    Runc,
    /// containerd's tasks, through its socket, in `namespace`.
    Containerd { address: PathBuf, namespace: String },
}

/// The error for `--backend containerd` in a build without the `containerd` feature.
pub const NO_CONTAINERD: &str =
    "this stagehand was built without containerd support: cargo build --features containerd";

/// A prepared container: its bundle and root filesystem, until cleanup.
pub struct Container {
    pub id: String,
    pub dir: PathBuf,
    rootfs: std::sync::Mutex<Option<Rootfs>>,
}

impl Containers {
    /// Open the image store and find the runtime. Err says why containers cannot run here.
    pub fn new(
        store_root: &Path,
        runtime: Option<&std::ffi::OsStr>,
        run_dir: &Path,
        run_id: &str,
        stage_id: &str,
        volumes: &[String],
    ) -> Result<Containers, String> {
        let store = Store::open(store_root)
            .map_err(|e| format!("image store {}: {e}", store_root.display()))?;
        let chosen = runtime
            .map(std::ffi::OsStr::to_os_string)
            .or_else(auto_runtime);
        let runtime = RuncCli::locate(chosen.as_deref(), run_dir.join("runtime"))
            .map_err(|e| e.to_string())?;
        let host = Host::probe().map_err(|e| e.to_string())?;
        let init = INIT_CANDIDATES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_file());
        if init.is_none() {
            tracing::warn!(
                "catatonit not found: containers run without an init, so PID 1 may ignore SIGTERM (apt-get install catatonit)"
            );
        }
        let dir = run_dir.join("containers").join(stage_id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let mut vols = Vec::new();
        for (i, mount) in volumes.iter().enumerate() {
            let host_dir = run_dir.join("volumes").join(stage_id).join(i.to_string());
            std::fs::create_dir_all(&host_dir)
                .map_err(|e| format!("create volume {}: {e}", host_dir.display()))?;
            // An EmptyDir is writable by whatever user the containers run as (Kubernetes: 0777).
            let _ = std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o777));
            vols.push((host_dir, mount.clone()));
        }
        Ok(Containers {
            store,
            runtime,
            host,
            init,
            dir,
            id_prefix: format!("stagehand-{run_id}"),
            volumes: vols,
            backend: Backend::Runc,
        })
    }

    /// Run containers through `backend`. For containerd, checks now that it answers and is
    /// recent enough, so a stage fails before its first step with the reason and the fix.
    pub fn with_backend(mut self, backend: Backend) -> Result<Containers, String> {
        if let Backend::Containerd { address, .. } = &backend {
            #[cfg(feature = "containerd")]
            super::containerd::check(address)?;
            #[cfg(not(feature = "containerd"))]
            {
                let _ = address;
                return Err(NO_CONTAINERD.into());
            }
        }
        self.backend = backend;
        Ok(self)
    }

    /// Bundle, root filesystem and the runtime's argv for one step.
    pub(crate) fn prepare(
        &self,
        exec: &HostExecutor,
        step: &ResolvedStep,
        stage: Option<&Stage>,
        limits: &Limits,
        abort: &super::host::Abort,
    ) -> Result<(SpawnSpec, Option<PathBuf>, Container), String> {
        let image = step.image.as_deref().unwrap_or_default();
        let id = format!("{}-{}", self.id_prefix, step.id);
        let image_id = self.image_for(step, image, abort)?;
        let dir = self.dir.join(&step.id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        // containerd unpacks the image with its own snapshotter (see `containerd_rootfs`).
        let layers = if matches!(self.backend, Backend::Containerd { .. }) {
            Vec::new()
        } else {
            let guard = self.store.write_guard().map_err(|e| e.to_string())?;
            // Unpacking a large image the first time takes seconds: say so, and how long.
            let todo = self.layers_to_unpack(&image_id);
            let started = std::time::Instant::now();
            if todo.0 > 0 {
                eprintln!(
                    "stagehand: {}: unpacking {} layer(s) of `{image}` ({})",
                    step.id,
                    todo.0,
                    crate::units::format_memory(todo.1)
                );
            }
            let layers = unpack::ensure_image_layers(&self.store, &guard, &image_id)
                .map_err(|e| format!("unpack `{image}`: {e}"))?;
            if todo.0 > 0 {
                eprintln!(
                    "stagehand: {}: unpacked `{image}` in {}",
                    step.id,
                    crate::units::format_duration(started.elapsed())
                );
            }
            layers
        };
        let rootfs_path = stagehand_oci::rootfs::rootfs_path(&dir);
        if let Some(st) = stage {
            st.record_mount(&rootfs_path).map_err(|e| e.to_string())?;
        }
        let rootfs = match &self.backend {
            Backend::Runc => Some(
                Rootfs::create(&dir, &layers)
                    .map_err(|e| format!("root filesystem for `{image}`: {e}"))?,
            ),
            Backend::Containerd { address, namespace } => {
                let lease = self.containerd_lease();
                containerd_rootfs(
                    address,
                    namespace,
                    &lease,
                    &self.store,
                    &image_id,
                    image,
                    &id,
                    &dir,
                )?;
                None
            }
        };
        let container = Container {
            id: id.clone(),
            dir: dir.clone(),
            rootfs: std::sync::Mutex::new(rootfs),
        };
        match self.bundle(exec, step, stage, limits, &image_id, &container) {
            Ok((argv, outputs)) => {
                let env = vec![(
                    "PATH".to_string(),
                    std::env::var("PATH").unwrap_or_else(|_| {
                        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
                    }),
                )];
                let mut spec = SpawnSpec::new(argv, env, &dir);
                spec.process_group = true;
                spec.parent_death_signal = Some(libc::SIGKILL);
                spec.output = OutputTarget::Merged;
                Ok((spec, outputs, container))
            }
            Err(e) => {
                self.cleanup(&container, stage);
                Err(e)
            }
        }
    }

    /// The image `step` runs, after its `imagePullPolicy`: `Never` uses only the store;
    /// `IfNotPresent` pulls when the store lacks the image; `Always` pulls every time (only
    /// blobs not in the store are downloaded, so an unchanged image costs one manifest
    /// request). Unset is Kubernetes' rule: `Always` for `:latest` (or no tag) without a
    /// digest, `IfNotPresent` otherwise; but when it is unset and the registry cannot be
    /// reached, an image already in the store is used with a warning, so pipelines written
    /// for a connected CI still run offline from images loaded with `stagehand image load`.
    fn image_for(
        &self,
        step: &ResolvedStep,
        image: &str,
        abort: &super::host::Abort,
    ) -> Result<stagehand_oci::store::ImageId, String> {
        let local = self
            .store
            .resolve(image)
            .map_err(|e| format!("image `{image}`: {e}"))?;
        let (policy, defaulted) = effective_policy(step.pull_policy, image);
        let wanted = match policy {
            PullPolicy::Never => false,
            PullPolicy::IfNotPresent => local.is_none(),
            PullPolicy::Always => true,
        };
        // An image id (or a prefix of one) names nothing a registry has.
        if !wanted || (local.is_some() && looks_like_image_id(image)) {
            return local.ok_or_else(|| missing_image(image, step.pull_policy, self.store.root()));
        }
        let registry = stagehand_oci::store::parse_reference(image)
            .map(|r| r.registry().to_string())
            .unwrap_or_default();
        if let Some(id) = &local {
            if defaulted && unreachable_registries().contains(&registry) {
                return Ok(id.clone());
            }
        }
        let mut opts = PullOptions::from_env().map_err(|e| e.to_string())?;
        opts.progress = Some(pull::text_progress(Box::new(std::io::stderr()), false));
        match pull_blocking(&self.store, image, &opts, abort) {
            Ok(p) => Ok(p.id),
            Err(Ok(PullError::Unreachable {
                registry, reason, ..
            })) if defaulted && local.is_some() => {
                eprintln!(
                    "stagehand: warning: {}: cannot reach registry {registry} ({reason}); running the copy of `{image}` in the image store (imagePullPolicy is unset: set it to IfNotPresent to not ask the registry, or Always to make this an error)",
                    step.id
                );
                unreachable_registries().insert(registry);
                Ok(local.expect("checked above"))
            }
            Err(Ok(e)) => Err(e.to_string()),
            Err(Err(e)) => Err(format!("pull `{image}`: {e}")),
        }
    }

    fn bundle(
        &self,
        exec: &HostExecutor,
        step: &ResolvedStep,
        stage: Option<&Stage>,
        limits: &Limits,
        image_id: &stagehand_oci::store::ImageId,
        c: &Container,
    ) -> Result<(Vec<OsString>, Option<PathBuf>), String> {
        let image = step.image.as_deref().unwrap_or_default();
        let config = self
            .store
            .config(image_id)
            .map_err(|e| format!("image `{image}`: {e}"))?;
        let rootfs = stagehand_oci::rootfs::rootfs_path(&c.dir);
        let user_spec = step.run_as_user.clone().filter(|u| !u.trim().is_empty());
        let defaults = spec::image_process(&config, None, None);
        let user_name = user_spec.clone().or(defaults.user.clone());
        let user = match &user_name {
            Some(u) => spec::resolve_user(&rootfs, u)
                .map_err(|e| format!("runAsUser `{u}` in `{image}`: {e}"))?,
            None => Default::default(),
        };
        let (script, outputs) = if step.command.is_none() {
            (None, None)
        } else {
            exec.script_argv(
                step,
                Some(Path::new("/stagehand")),
                Some((user.uid, user.gid)),
            )?
        };
        let args = if !step.entrypoint.is_empty() {
            step.entrypoint.clone()
        } else if let Some(script) = script {
            script
        } else {
            defaults.args.clone()
        };
        if args.is_empty() {
            return Err(format!(
                "image `{image}` has no ENTRYPOINT or CMD, and step {} gives neither `command` nor `entrypoint`",
                step.id
            ));
        }
        let mut overrides: Vec<String> = step.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        overrides.push("HARNESS_WORKSPACE=/harness".into());
        overrides.push("STAGEHAND_WORKSPACE=/harness".into());
        overrides.push(format!("STAGEHAND_STEP_ID={}", step.id));
        if let Some(home) = &user.home {
            overrides.push(format!("HOME={home}"));
        }
        let mut env = spec::merge_env(&defaults.env, &overrides);
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.insert(
                0,
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
            );
        }
        let mut cs = ContainerSpec::new(args);
        cs.env = env;
        cs.cwd = "/harness".into();
        cs.user = user;
        cs.hostname = step.id.clone();
        cs.network = match stage.and_then(|s| s.netns_path()) {
            Some(ns) => Network::Join(ns.to_path_buf()),
            None => Network::Host,
        };
        cs.mounts.push(BindMount::rw(&step.workspace, "/harness"));
        cs.mounts
            .push(BindMount::rw(exec.steps_dir(), "/stagehand"));
        if let Some(st) = stage {
            cs.mounts.push(BindMount::ro(st.hosts_path(), "/etc/hosts"));
        }
        let resolv = stage
            .and_then(|s| s.resolv_path().map(Path::to_path_buf))
            .unwrap_or_else(|| PathBuf::from("/etc/resolv.conf"));
        if resolv.exists() {
            cs.mounts.push(BindMount::ro(resolv, "/etc/resolv.conf"));
        }
        for (host_dir, mount) in &self.volumes {
            cs.mounts.push(BindMount::rw(host_dir, mount.clone()));
        }
        cs.cgroups_path = stage
            .and_then(|s| s.cgroup_rel(&step.id))
            .map(|p| p.display().to_string());
        // Limits need a cgroup: without one (rootless without delegation) the runtime would
        // refuse them, and the run has already said they are not enforced.
        if cs.cgroups_path.is_some() {
            let l = limits;
            cs.resources = Resources {
                memory: l.memory_bytes.map(|b| b as i64),
                memory_swap: l.memory_bytes.map(|b| b as i64),
                cpu_quota: l.cpu_millis.map(|m| (m * 100) as i64),
                cpu_period: l.cpu_millis.map(|_| 100_000),
                pids: l.pids.map(|p| p as i64),
            };
        }
        cs.privileged = step.privileged;
        cs.init = self.init.clone();
        // The program must be in the image (or in a mount): say so now, naming it, rather
        // than let the init fail to exec it with a bare exit code 1.
        if let Some(program) = cs.args.first() {
            let mounted = cs
                .mounts
                .iter()
                .any(|m| Path::new(program).starts_with(&m.destination));
            let relative = program.contains('/') && !program.starts_with('/');
            if !mounted && !relative {
                let path = cs
                    .env
                    .iter()
                    .find_map(|e| e.strip_prefix("PATH="))
                    .unwrap_or_default();
                if spec::find_executable(&rootfs, program, path, "/").is_none() {
                    return Err(if program.contains('/') {
                        format!("`{program}` is not an executable file in image `{image}`")
                    } else {
                        format!(
                            "`{program}` is not in image `{image}` (searched PATH={path}){}",
                            if step.entrypoint.is_empty() && step.command.is_some() {
                                "; the step's shell runs its command"
                            } else {
                                ""
                            }
                        )
                    });
                }
            }
        }
        let built = spec::build(&cs, &self.host)
            .map_err(|e| format!("container spec for {}: {e}", step.id))?;
        spec::write_bundle(&c.dir, &built).map_err(|e| format!("bundle for {}: {e}", step.id))?;
        match &self.backend {
            Backend::Runc => Ok((self.runtime.run_argv(&c.dir, &c.id), outputs)),
            Backend::Containerd { address, namespace } => {
                Ok((containerd_argv(address, namespace, &c.dir, &c.id)?, outputs))
            }
        }
    }

    /// Delete the runtime's record, unmount and remove the root filesystem and bundle.
    /// Every error is returned; none stops the rest.
    pub(crate) fn cleanup(&self, c: &Container, stage: Option<&Stage>) -> Vec<String> {
        let mut errors = Vec::new();
        let exec = |argv: Vec<OsString>| -> std::io::Result<std::process::Output> {
            let env: Vec<(String, String)> =
                std::env::vars().filter(|(k, _)| k == "PATH").collect();
            let out = process::run_output(argv, env, "/")
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            Ok(std::process::Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(
                    out.status.exit_code() << 8,
                ),
                stdout: out.stdout,
                stderr: out.stderr,
            })
        };
        match &self.backend {
            Backend::Runc => {
                if let Err(e) = Control::new(&self.runtime, &exec).delete(&c.id, true) {
                    errors.push(e.to_string());
                }
            }
            // The helper deletes its task and container when it ends; this is for when it
            // was killed (SIGKILL after the grace period) or never got that far.
            #[cfg(feature = "containerd")]
            Backend::Containerd { address, namespace } => {
                if let Err(e) = super::containerd::remove(address, namespace, &c.id, &c.dir) {
                    errors.push(e);
                }
            }
            #[cfg(not(feature = "containerd"))]
            Backend::Containerd { .. } => errors.push(NO_CONTAINERD.into()),
        }
        let rootfs = c.rootfs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(r) = rootfs {
            match r.remove() {
                Ok(()) => {
                    if let Some(st) = stage {
                        st.forget_mount(&stagehand_oci::rootfs::rootfs_path(&c.dir));
                    }
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let _ = std::fs::remove_dir_all(&c.dir);
        errors
    }
}

impl Containers {
    /// "runc could not start the container: …" (or "containerd …") when the runtime failed
    /// before the step's program ran (its log in the bundle says why); `None` when the program
    /// ran, whatever its exit. Read it before [`Containers::cleanup`], which removes the bundle.
    pub(crate) fn start_error(&self, c: &Container) -> Option<String> {
        self.start_error_reader(c)()
    }

    /// [`Containers::start_error`] as a function to call later (from a task that outlives
    /// this borrow).
    pub(crate) fn start_error_reader(
        &self,
        c: &Container,
    ) -> impl Fn() -> Option<String> + Send + Sync + 'static {
        // runc writes its log itself; the containerd helper writes one in the same format.
        let name = match self.backend {
            Backend::Runc => self.runtime.name().to_string(),
            Backend::Containerd { .. } => "containerd".to_string(),
        };
        let dir = c.dir.clone();
        move || {
            stagehand_oci::runtime::start_error(&dir)
                .map(|why| format!("{name} could not start the container: {why}"))
        }
    }

    /// `runtime exec ID` for running a probe inside a container.
    pub(crate) fn exec_argv(&self, id: &str) -> Vec<OsString> {
        let root: OsString = match &self.backend {
            Backend::Runc => self.runtime.state_root().into(),
            // containerd's runc shim keeps its runc state per namespace there.
            Backend::Containerd { namespace, .. } => {
                Path::new("/run/containerd/runc").join(namespace).into()
            }
        };
        vec![
            self.runtime.binary().into(),
            "--root".into(),
            root,
            "exec".into(),
            id.into(),
        ]
    }

    /// The image's Docker `HEALTHCHECK` (from its config), as a health check; `None` when it
    /// has none or disables it (`NONE`).
    pub(crate) fn image_health(&self, image: &str) -> Option<super::ResolvedHealth> {
        let id = self.store.resolve(image).ok()??;
        let manifest = self.store.manifest(&id).ok()?;
        let raw = self.store.read_blob(manifest.config().digest()).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
        docker_healthcheck(v.get("config")?.get("Healthcheck")?)
    }
}

/// `stagehand __containerd-run ...`: the helper that runs one container as a containerd task
/// in the foreground, standing in for `runc run` as the host executor's child.
#[cfg(feature = "containerd")]
fn containerd_argv(
    address: &Path,
    namespace: &str,
    bundle: &Path,
    id: &str,
) -> Result<Vec<OsString>, String> {
    super::containerd::adapt_bundle(bundle).map_err(|e| e.to_string())?;
    let me = std::env::current_exe()
        .map_err(|e| format!("find the stagehand binary for the containerd helper: {e}"))?;
    Ok(vec![
        me.into(),
        "__containerd-run".into(),
        "--address".into(),
        address.into(),
        "--namespace".into(),
        namespace.into(),
        "--id".into(),
        id.into(),
        "--bundle".into(),
        bundle.into(),
    ])
}

#[cfg(not(feature = "containerd"))]
fn containerd_argv(_: &Path, _: &str, _: &Path, _: &str) -> Result<Vec<OsString>, String> {
    Err(NO_CONTAINERD.into())
}

/// The container's root filesystem from containerd's snapshotter (the image imported into
/// containerd's content store first if need be), under the stage's lease.
#[cfg(feature = "containerd")]
#[allow(clippy::too_many_arguments)]
fn containerd_rootfs(
    address: &Path,
    namespace: &str,
    lease: &str,
    store: &Store,
    image_id: &stagehand_oci::store::ImageId,
    image: &str,
    id: &str,
    bundle: &Path,
) -> Result<(), String> {
    super::containerd::prepare_rootfs(
        address, namespace, lease, store, image_id, image, id, bundle,
    )
    .map(|_| ())
    .map_err(|e| format!("root filesystem for `{image}` in containerd: {e}"))
}

#[cfg(not(feature = "containerd"))]
#[allow(clippy::too_many_arguments)]
fn containerd_rootfs(
    _: &Path,
    _: &str,
    _: &str,
    _: &Store,
    _: &stagehand_oci::store::ImageId,
    _: &str,
    _: &str,
    _: &Path,
) -> Result<(), String> {
    Err(NO_CONTAINERD.into())
}

impl Containers {
    /// The stage's containerd lease: `stagehand-<run>-<stage>`.
    fn containerd_lease(&self) -> String {
        let stage = self.dir.file_name().unwrap_or_default().to_string_lossy();
        format!("{}-{stage}", self.id_prefix)
    }
}

/// The stage is over once its containers are dropped: its containerd lease goes, so
/// containerd collects what the stage created and nothing else holds.
#[cfg(feature = "containerd")]
impl Drop for Containers {
    fn drop(&mut self) {
        if let Backend::Containerd { address, namespace } = &self.backend {
            if let Err(e) =
                super::containerd::end_stage(address, namespace, &self.containerd_lease())
            {
                tracing::warn!(error = %e, "containerd: delete the stage's lease");
            }
        }
    }
}

/// Docker's `Healthcheck` config: `Test` (`["CMD", ...]`, `["CMD-SHELL", "..."]`, `["NONE"]`),
/// durations in nanoseconds (0 = Docker's default), `Retries`.
fn docker_healthcheck(h: &serde_json::Value) -> Option<super::ResolvedHealth> {
    use std::time::Duration;
    let test: Vec<String> = h
        .get("Test")?
        .as_array()?
        .iter()
        .filter_map(|x| x.as_str().map(String::from))
        .collect();
    let cmd = match test.first().map(String::as_str) {
        Some("CMD-SHELL") => test.get(1)?.clone(),
        Some("CMD") if test.len() > 1 => test[1..]
            .iter()
            .map(|a| shell_quote(a))
            .collect::<Vec<_>>()
            .join(" "),
        _ => return None,
    };
    let ns = |k: &str, default: Duration| match h.get(k).and_then(|x| x.as_u64()) {
        Some(0) | None => default,
        Some(n) => Duration::from_nanos(n),
    };
    // Docker's defaults are 30s intervals: far too slow to wait on in CI. A Harness user
    // never set them, so readiness is probed at stagehand's own interval.
    let interval = ns("Interval", Duration::from_millis(100)).min(Duration::from_secs(1));
    Some(super::ResolvedHealth {
        probe: super::ResolvedProbe::Exec(cmd),
        interval,
        timeout: ns("Timeout", Duration::from_secs(30)),
        start_period: ns("StartPeriod", Duration::ZERO),
        retries: None,
        deadline: Duration::from_secs(300),
    })
}

fn shell_quote(a: &str) -> String {
    if a.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

impl Containers {
    /// How many of the image's layers are not in the layer cache yet, and their size.
    fn layers_to_unpack(&self, id: &stagehand_oci::store::ImageId) -> (usize, u64) {
        let Ok(layers) = self.store.layers(id) else {
            return (0, 0);
        };
        let cache = self.store.layers_dir();
        layers
            .iter()
            .filter(|l| !cache.join(l.diff_id.digest()).join("done").is_file())
            .fold((0, 0), |(n, b), l| (n + 1, b + l.size))
    }
}

/// With no `--runtime`: crun where it can run, else runc. crun refuses hybrid cgroup hosts
/// (a cgroup2 `unified` mount with controllers beside the v1 ones; runtime-lab §3), where
/// runc works; `None` lets `locate` pick runc.
fn auto_runtime() -> Option<std::ffi::OsString> {
    let unified = std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers");
    let hybrid = unified.is_ok_and(|c| !c.trim().is_empty());
    crun_usable(hybrid, |name| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
            .unwrap_or(false)
    })
    .then(|| "crun".into())
}

fn crun_usable(hybrid: bool, on_path: impl Fn(&str) -> bool) -> bool {
    !hybrid && on_path("crun")
}

fn missing_image(image: &str, policy: Option<PullPolicy>, root: &Path) -> String {
    let how = format!(
        "load it with `stagehand image load FILE` (a docker save / podman save / skopeo archive), `stagehand image import ROOTFS --tag {image}`, or `stagehand image pull REFERENCE` from a registry"
    );
    match policy {
        Some(PullPolicy::Never) => format!(
            "image `{image}` is not in the image store ({}) and imagePullPolicy is Never: {how}",
            root.display()
        ),
        // Only an image id gets here otherwise: there is nothing to pull it by.
        _ => format!(
            "image `{image}` is not in the image store ({}): {how}",
            root.display()
        ),
    }
}

/// The policy an image is pulled under, and whether it was defaulted (see
/// [`Containers::image_for`]).
fn effective_policy(policy: Option<PullPolicy>, image: &str) -> (PullPolicy, bool) {
    if let Some(p) = policy {
        return (p, false);
    }
    let latest = stagehand_oci::store::parse_reference(image)
        .map(|r| r.digest().is_none() && r.tag().is_none_or(|t| t == "latest"))
        .unwrap_or(false);
    (
        if latest {
            PullPolicy::Always
        } else {
            PullPolicy::IfNotPresent
        },
        true,
    )
}

/// `sha256:<hex>` or bare hex digits: how `image` names an image by id (or id prefix).
fn looks_like_image_id(image: &str) -> bool {
    let hex = image.strip_prefix("sha256:").unwrap_or(image);
    hex.len() >= 4
        && hex.len() <= 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Registries found unreachable during this run, so a defaulted `Always` does not wait on a
/// dead registry again for every step (see [`Containers::image_for`]).
fn unreachable_registries() -> std::sync::MutexGuard<'static, std::collections::BTreeSet<String>> {
    static SET: std::sync::Mutex<std::collections::BTreeSet<String>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    SET.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a pull to completion from synchronous code. Steps are prepared inside the run's
/// multi-thread runtime: `block_in_place` hands this worker's other tasks (service log
/// readers, health checks) to another thread while the pull is driven on this one. Anywhere
/// else (a current-thread runtime, no runtime) the pull gets a thread and runtime of its own.
/// `Err(Err(_))` is a failure to set up that runtime.
fn pull_blocking(
    store: &Store,
    image: &str,
    opts: &PullOptions,
    abort: &super::host::Abort,
) -> Result<pull::Pulled, Result<PullError, String>> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(|| {
                // A pull from a registry that stalls must not outlive an abort or the step's
                // timeout: dropping the pull future cancels it, and the store never shows a
                // half-written blob.
                h.block_on(async {
                let cancelled = async {
                    match &abort.cancel {
                        Some(c) => c.cancelled().await,
                        None => std::future::pending().await,
                    }
                };
                let expired = async {
                    match abort.deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = pull::pull(store, image, opts) => r.map_err(Ok),
                    _ = cancelled => Err(Err(format!("pull of `{image}` aborted"))),
                    _ = expired => Err(Err(format!("pull of `{image}` stopped: the step timed out"))),
                }
            })
            })
        }
        _ => std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| Err(format!("start a runtime for the pull: {e}")))?;
                rt.block_on(pull::pull(store, image, opts)).map_err(Ok)
            })
            .join()
            .unwrap_or_else(|_| Err(Err("the pull thread panicked".to_string())))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_healthchecks_become_exec_probes() {
        let h = serde_json::json!({"Test": ["CMD-SHELL", "pg_isready -U postgres"], "Interval": 5_000_000_000u64, "Timeout": 0});
        let r = docker_healthcheck(&h).unwrap();
        assert!(
            matches!(r.probe, super::super::ResolvedProbe::Exec(ref c) if c == "pg_isready -U postgres")
        );
        assert_eq!(
            r.interval,
            std::time::Duration::from_secs(1),
            "capped so readiness is seen fast"
        );
        let h = serde_json::json!({"Test": ["CMD", "curl", "-f", "http://localhost/a b"]});
        let r = docker_healthcheck(&h).unwrap();
        assert!(
            matches!(r.probe, super::super::ResolvedProbe::Exec(ref c) if c == "curl -f 'http://localhost/a b'")
        );
        assert!(docker_healthcheck(&serde_json::json!({"Test": ["NONE"]})).is_none());
    }

    #[test]
    fn crun_is_preferred_except_on_hybrid_hosts() {
        assert!(crun_usable(false, |_| true));
        assert!(!crun_usable(true, |_| true), "crun fails on hybrid cgroups");
        assert!(!crun_usable(false, |_| false), "not installed");
    }

    #[test]
    fn missing_image_names_the_image_and_the_fix() {
        let m = missing_image(
            "postgres:15",
            Some(PullPolicy::Never),
            Path::new("/var/lib/stagehand"),
        );
        assert!(
            m.contains("image `postgres:15`")
                && m.contains("imagePullPolicy is Never")
                && m.contains("stagehand image load"),
            "{m}"
        );
        let m = missing_image("busybox", None, Path::new("/s"));
        assert!(
            m.contains("stagehand image import ROOTFS --tag busybox")
                && m.contains("stagehand image pull"),
            "{m}"
        );
    }

    #[test]
    fn unset_pull_policy_is_always_for_latest_only() {
        use PullPolicy::*;
        let hex = "a".repeat(64);
        let cases: &[(&str, (PullPolicy, bool))] = &[
            ("busybox", (Always, true)),
            ("busybox:latest", (Always, true)),
            ("127.0.0.1:5000/lab/busybox", (Always, true)),
            ("postgres:15", (IfNotPresent, true)),
            ("registry.lab:5000/app:1.2", (IfNotPresent, true)),
        ];
        for (image, want) in cases {
            assert_eq!(effective_policy(None, image), *want, "{image}");
        }
        assert_eq!(
            effective_policy(None, &format!("busybox@sha256:{hex}")),
            (IfNotPresent, true)
        );
        assert_eq!(
            effective_policy(None, &format!("busybox:latest@sha256:{hex}")),
            (IfNotPresent, true)
        );
        assert_eq!(effective_policy(Some(Never), "busybox"), (Never, false));
        assert_eq!(
            effective_policy(Some(Always), "postgres:15"),
            (Always, false)
        );
        assert!(
            looks_like_image_id(&format!("sha256:{hex}"))
                && looks_like_image_id("abcd12")
                && !looks_like_image_id("busybox")
        );
    }

    /// From a task of the multi-thread runtime (how steps are prepared) the pull runs in
    /// place; outside it (no runtime, a current-thread one) on a thread of its own. Either
    /// way a refused connection is the "cannot reach" error.
    #[test]
    fn pull_blocking_works_in_and_outside_the_multi_thread_runtime() {
        fn check(store: &Store, image: &str) {
            match pull_blocking(
                store,
                image,
                &PullOptions::default(),
                &crate::exec::host::Abort::default(),
            ) {
                Err(Ok(e @ PullError::Unreachable { .. })) => assert!(
                    e.to_string()
                        .contains(&format!("`{image}:latest`: connection refused")),
                    "{e}"
                ),
                Err(Ok(e)) => panic!("{e}"),
                Err(Err(e)) => panic!("{e}"),
                Ok(p) => panic!("{p:?}"),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let image = format!("127.0.0.1:{port}/lab/busybox");
        check(&store, &image);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { check(&store, &image) });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { check(&store, &image) });
        let (s, i) = (store.clone(), image.clone());
        rt.block_on(async move { tokio::spawn(async move { check(&s, &i) }).await.unwrap() });
    }
}
