//! OCI runtimes behind a trait: the argv of each runtime command, and a helper that runs the
//! short ones through a caller-supplied spawner.
//!
//! Owns: finding the runtime binary, the command lines (`run`, `kill`, `delete`, `state`,
//! `list`), parsing their output, and recognizing known failures to add a hint (crun on a
//! hybrid cgroup host, a leftover container id).
//! Does not own: spawning or waiting. stagehand has one global reaper (`waitpid(-1)` in the
//! supervisor) and this crate must not depend on the supervisor, so it never spawns anything
//! itself: [`OciRuntime::run_argv`] is handed to the supervisor's process layer, and the
//! short commands go through an [`Exec`] callback the caller provides (the supervisor's
//! spawner in stagehand, [`exec_std`] where there is no reaper, as in this crate's tests).
//!
//! Supervision model (runtime-lab §3, gotcha 5): `runc run` in the foreground, as the
//! caller's child. The caller gets the container's exit status as runc's own (128+N when
//! the container's init was killed by signal N, so an OOM kill is 137), runc deletes the
//! container when its init exits, the container's stdout/stderr are runc's (pipe them), and
//! runc forwards the signals it receives to the container's init, so SIGTERM to the runc
//! child stops the container. `kill` and `delete --force` are for teardown.
//! A backend seam like youki's: containerd (a task per container over gRPC) comes later
//! behind the same trait.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde::Deserialize;

/// Errors of locating and driving the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The runtime binary is not installed.
    #[error("{name} not found: install it (apt-get install {name}) or pass --runtime PATH")]
    NotFound {
        /// `runc` or `crun`.
        name: String,
    },
    /// An explicit runtime path that is not an executable file.
    #[error(
        "runtime {path} is not an executable file: pass --runtime with the path of runc or crun"
    )]
    NotExecutable {
        /// The path given.
        path: PathBuf,
    },
    /// A container id the runtime would refuse.
    #[error("invalid container id {id:?}: use letters, digits, '_', '+', '-' and '.' only")]
    InvalidId {
        /// The id.
        id: String,
    },
    /// The runtime could not be started.
    #[error("cannot run {argv}: {source}")]
    Spawn {
        /// The command line.
        argv: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The runtime ran and failed.
    #[error("{argv} failed ({status}): {stderr}{}", hint.as_ref().map(|h| format!("\nhint: {h}")).unwrap_or_default())]
    Failed {
        /// The command line.
        argv: String,
        /// How it ended (`exit status 1`).
        status: String,
        /// Its standard output.
        stdout: String,
        /// Its standard error, trimmed.
        stderr: String,
        /// What to do about it, when the failure is a known one.
        hint: Option<String>,
    },
    /// The runtime's JSON output did not parse.
    #[error("cannot parse the output of {argv}: {source}")]
    Parse {
        /// The command line.
        argv: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Which CLI a [`RuncCli`] drives. Both take the same arguments; they fail differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuntimeKind {
    /// runc (works on this hybrid cgroup v1 host).
    Runc,
    /// crun (refuses hybrid cgroup hosts whose cgroup2 mount has controllers).
    Crun,
}

/// The state of a container as the runtime reports it (`runc state` / `runc list`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ContainerState {
    /// The container id.
    pub id: String,
    /// PID of its init on the host (0 once stopped).
    #[serde(default)]
    pub pid: i32,
    /// `created`, `running`, `paused` or `stopped`.
    pub status: String,
    /// The bundle directory.
    #[serde(default)]
    pub bundle: PathBuf,
}

/// An OCI runtime, as argv builders. See the module docs for how `run` is meant to be used.
pub trait OciRuntime: Send + Sync + fmt::Debug {
    /// `runc` or `crun` (for messages).
    fn name(&self) -> &str;

    /// The binary.
    fn binary(&self) -> &Path;

    /// The runtime's state directory (`--root`), one per stagehand run so `gc` finds its
    /// containers and nothing else.
    fn state_root(&self) -> &Path;

    /// `<bin> --root <state> --log <bundle>/runtime.log --log-format json run --keep --bundle
    /// <bundle> <id>`: runs the container in the foreground (no `--detach`, no `--pid-file`:
    /// the caller is the parent and waits). [`start_error`] reads that log.
    fn run_argv(&self, bundle: &Path, id: &str) -> Vec<OsString>;

    /// `<bin> --root <state> kill [--all] <id> <signal>`.
    fn kill_argv(&self, id: &str, signal: i32, all: bool) -> Vec<OsString>;

    /// `<bin> --root <state> delete [--force] <id>`.
    fn delete_argv(&self, id: &str, force: bool) -> Vec<OsString>;

    /// `<bin> --root <state> state <id>` (prints JSON).
    fn state_argv(&self, id: &str) -> Vec<OsString>;

    /// `<bin> --root <state> list --format json`.
    fn list_argv(&self) -> Vec<OsString>;

    /// A hint for a known failure, from the runtime's stderr (also of `run`).
    fn hint(&self, stderr: &str) -> Option<String>;
}

/// The runtime's log in a bundle directory (see [`OciRuntime::run_argv`]).
pub const RUN_LOG: &str = "runtime.log";

/// Why the runtime failed to start the container in `bundle`, from the JSON log `run` wrote
/// there: its last error-level message (runc and crun both write `{"level":"error","msg":..}`
/// lines), without runc's `runc run failed: ` prefix. `None` when the container started (a
/// program that exits 1 leaves no error in the runtime's log) or there is no log.
pub fn start_error(bundle: &Path) -> Option<String> {
    #[derive(Deserialize)]
    struct Entry {
        level: String,
        msg: String,
    }
    let text = std::fs::read_to_string(bundle.join(RUN_LOG)).ok()?;
    let msg = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Entry>(l).ok())
        .rfind(|e| matches!(e.level.as_str(), "error" | "fatal" | "panic"))?
        .msg;
    let msg = msg.trim();
    let msg = msg
        .strip_prefix("runc run failed: ")
        .or_else(|| msg.strip_prefix("crun: "))
        .unwrap_or(msg);
    (!msg.is_empty()).then(|| msg.to_string())
}

/// Records `msg` as a start failure in `bundle`'s runtime log, in the runtime's own format, so
/// [`start_error`] reads it: for a stand-in for `runc run` (stagehand's containerd helper)
/// that fails before the container's program runs. Appends one whole line.
pub fn record_start_error(bundle: &Path, msg: &str) -> io::Result<()> {
    use std::io::Write as _;
    let line = serde_json::json!({ "level": "error", "msg": msg });
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(bundle.join(RUN_LOG))?;
    writeln!(f, "{line}")
}

/// runc or crun through its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncCli {
    kind: RuntimeKind,
    binary: PathBuf,
    root: PathBuf,
}

/// Directories searched after `$PATH`: runc lives in `/usr/sbin` on Debian, which a
/// non-root `$PATH` often lacks.
const EXTRA_DIRS: [&str; 6] = [
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

impl RuncCli {
    /// A runtime at a known path.
    pub fn new(
        kind: RuntimeKind,
        binary: impl Into<PathBuf>,
        state_root: impl Into<PathBuf>,
    ) -> RuncCli {
        RuncCli {
            kind,
            binary: binary.into(),
            root: state_root.into(),
        }
    }

    /// Finds the runtime: `runtime` is `None` (runc), a name (`runc`, `crun`, searched in
    /// `$PATH` and the sbin directories) or a path. The kind follows the file name.
    pub fn locate(
        runtime: Option<&OsStr>,
        state_root: impl Into<PathBuf>,
    ) -> Result<RuncCli, RuntimeError> {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        dirs.extend(EXTRA_DIRS.iter().map(PathBuf::from));
        Self::locate_in(
            runtime.unwrap_or(OsStr::new("runc")),
            &dirs,
            state_root.into(),
        )
    }

    fn locate_in(
        runtime: &OsStr,
        dirs: &[PathBuf],
        root: PathBuf,
    ) -> Result<RuncCli, RuntimeError> {
        let path = Path::new(runtime);
        let binary = if path.components().count() > 1 || path.is_absolute() {
            if !is_executable(path) {
                return Err(RuntimeError::NotExecutable {
                    path: path.to_path_buf(),
                });
            }
            path.to_path_buf()
        } else {
            dirs.iter()
                .map(|d| d.join(path))
                .find(|p| is_executable(p))
                .ok_or_else(|| RuntimeError::NotFound {
                    name: runtime.to_string_lossy().into_owned(),
                })?
        };
        let name = binary.file_name().unwrap_or_default().to_string_lossy();
        let kind = if name.contains("crun") {
            RuntimeKind::Crun
        } else {
            RuntimeKind::Runc
        };
        Ok(RuncCli { kind, binary, root })
    }

    /// Which CLI this is.
    pub fn kind(&self) -> RuntimeKind {
        self.kind
    }

    fn base(&self) -> Vec<OsString> {
        vec![
            self.binary.clone().into_os_string(),
            "--root".into(),
            self.root.clone().into_os_string(),
        ]
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

impl OciRuntime for RuncCli {
    fn name(&self) -> &str {
        match self.kind {
            RuntimeKind::Runc => "runc",
            RuntimeKind::Crun => "crun",
        }
    }

    fn binary(&self) -> &Path {
        &self.binary
    }

    fn state_root(&self) -> &Path {
        &self.root
    }

    fn run_argv(&self, bundle: &Path, id: &str) -> Vec<OsString> {
        let mut argv = self.base();
        // The runtime's own errors also go to a JSON log in the bundle: on the container's
        // stderr they cannot be told from the program's, nor a failed start from an exit 1.
        argv.extend([
            "--log".into(),
            bundle.join(RUN_LOG).into_os_string(),
            "--log-format".into(),
            "json".into(),
        ]);
        // `--keep`: the container (and its cgroup) outlive its exit until `delete`, so the
        // caller can still read the cgroup (an OOM kill) before cleaning up.
        argv.extend([
            "run".into(),
            "--keep".into(),
            "--bundle".into(),
            bundle.as_os_str().to_owned(),
            id.into(),
        ]);
        argv
    }

    fn kill_argv(&self, id: &str, signal: i32, all: bool) -> Vec<OsString> {
        let mut argv = self.base();
        argv.push("kill".into());
        if all {
            argv.push("--all".into());
        }
        argv.extend([id.into(), signal.to_string().into()]);
        argv
    }

    fn delete_argv(&self, id: &str, force: bool) -> Vec<OsString> {
        let mut argv = self.base();
        argv.push("delete".into());
        if force {
            argv.push("--force".into());
        }
        argv.push(id.into());
        argv
    }

    fn state_argv(&self, id: &str) -> Vec<OsString> {
        let mut argv = self.base();
        argv.extend(["state".into(), id.into()]);
        argv
    }

    fn list_argv(&self) -> Vec<OsString> {
        let mut argv = self.base();
        argv.extend(["list".into(), "--format".into(), "json".into()]);
        argv
    }

    fn hint(&self, stderr: &str) -> Option<String> {
        if stderr.contains("cgroups in hybrid mode not supported") {
            return Some(
                "crun refuses this host's hybrid cgroup layout (the cgroup2 mount at \
                 /sys/fs/cgroup/unified has controllers): use runc (--runtime runc)"
                    .into(),
            );
        }
        if stderr.contains("already exists") && stderr.contains("container") {
            return Some(format!(
                "a container with this id is left over in {}: remove it with `{} --root {} delete --force ID` or run `stagehand gc`",
                self.root.display(),
                self.name(),
                self.root.display()
            ));
        }
        None
    }
}

/// Runs one short runtime command and returns its output. stagehand passes its supervisor's
/// spawner (so the global reaper stays the only waiter); see [`exec_std`].
pub type Exec<'a> = dyn Fn(Vec<OsString>) -> io::Result<Output> + 'a;

/// An [`Exec`] over `std::process::Command` (stdin from /dev/null). Only for processes
/// without a `waitpid(-1)` reaper, which would steal the child's exit status.
pub fn exec_std(argv: Vec<OsString>) -> io::Result<Output> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty argv"))?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
}

/// Checks a container id the way runc does (`^[\w+-\.]+$`).
pub fn check_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'+' | b'-' | b'.'));
    if ok && id != "." && id != ".." {
        Ok(())
    } else {
        Err(RuntimeError::InvalidId { id: id.to_string() })
    }
}

/// The short runtime commands, run through an [`Exec`].
pub struct Control<'a> {
    runtime: &'a dyn OciRuntime,
    exec: &'a Exec<'a>,
}

impl fmt::Debug for Control<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Control")
            .field("runtime", &self.runtime)
            .finish_non_exhaustive()
    }
}

/// Whether runtime stderr says the container is not there (or no longer running).
fn is_gone(stderr: &str) -> bool {
    stderr.contains("does not exist")
        || stderr.contains("not running")
        || stderr.contains("not found")
}

impl<'a> Control<'a> {
    /// Runs `runtime`'s commands through `exec`.
    pub fn new(runtime: &'a dyn OciRuntime, exec: &'a Exec<'a>) -> Control<'a> {
        Control { runtime, exec }
    }

    fn run(&self, argv: Vec<OsString>) -> Result<(Output, String), RuntimeError> {
        let line = argv
            .iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ");
        let output = (self.exec)(argv).map_err(|source| RuntimeError::Spawn {
            argv: line.clone(),
            source,
        })?;
        Ok((output, line))
    }

    fn failed(&self, line: String, output: &Output) -> RuntimeError {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        RuntimeError::Failed {
            argv: line,
            status: output.status.to_string(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            hint: self.runtime.hint(&stderr),
            stderr,
        }
    }

    /// Sends `signal` to the container's init (to every process in it with `all`). `Ok(false)`
    /// when the container does not exist or is not running any more.
    pub fn kill(&self, id: &str, signal: i32, all: bool) -> Result<bool, RuntimeError> {
        check_id(id)?;
        let (output, line) = self.run(self.runtime.kill_argv(id, signal, all))?;
        if output.status.success() {
            return Ok(true);
        }
        if is_gone(&String::from_utf8_lossy(&output.stderr)) {
            return Ok(false);
        }
        Err(self.failed(line, &output))
    }

    /// Deletes the container (`force` kills it first). `Ok(false)` when it did not exist
    /// (runc reports that only without `force`; with it, a missing container is success).
    pub fn delete(&self, id: &str, force: bool) -> Result<bool, RuntimeError> {
        check_id(id)?;
        let (output, line) = self.run(self.runtime.delete_argv(id, force))?;
        if output.status.success() {
            return Ok(true);
        }
        if String::from_utf8_lossy(&output.stderr).contains("does not exist") {
            return Ok(false);
        }
        Err(self.failed(line, &output))
    }

    /// The container's state, `None` if it does not exist.
    pub fn state(&self, id: &str) -> Result<Option<ContainerState>, RuntimeError> {
        check_id(id)?;
        let (output, line) = self.run(self.runtime.state_argv(id))?;
        if !output.status.success() {
            if String::from_utf8_lossy(&output.stderr).contains("does not exist") {
                return Ok(None);
            }
            return Err(self.failed(line, &output));
        }
        serde_json::from_slice(&output.stdout)
            .map(Some)
            .map_err(|source| RuntimeError::Parse { argv: line, source })
    }

    /// Every container in the runtime's state directory.
    pub fn list(&self) -> Result<Vec<ContainerState>, RuntimeError> {
        let (output, line) = self.run(self.runtime.list_argv())?;
        if !output.status.success() {
            return Err(self.failed(line, &output));
        }
        // runc prints `null` when there are none.
        serde_json::from_slice::<Option<Vec<ContainerState>>>(&output.stdout)
            .map(Option::unwrap_or_default)
            .map_err(|source| RuntimeError::Parse { argv: line, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn strings(argv: &[OsString]) -> Vec<String> {
        argv.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn a_start_error_is_the_last_error_in_the_runtime_log() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(start_error(dir.path()), None, "no log");
        std::fs::write(
            dir.path().join(RUN_LOG),
            concat!(
                r#"{"level":"warning","msg":"something minor","time":"2026-11-22T22:11:25Z"}"#,
                "\nnot json\n",
                r#"{"level":"error","msg":"runc run failed: unable to start container process: container init was OOM-killed (memory limit too low?)","time":"2026-11-22T22:11:25Z"}"#,
                "\n"
            ),
        )
        .unwrap();
        assert_eq!(
            start_error(dir.path()).as_deref(),
            Some(
                "unable to start container process: container init was OOM-killed (memory limit too low?)"
            )
        );
        std::fs::write(
            dir.path().join(RUN_LOG),
            concat!(
                r#"{"level":"warning","msg":"only a warning","time":"t"}"#,
                "\n"
            ),
        )
        .unwrap();
        assert_eq!(
            start_error(dir.path()),
            None,
            "a warning is no start failure"
        );
        record_start_error(dir.path(), "create task c1: no such file").unwrap();
        assert_eq!(
            start_error(dir.path()).as_deref(),
            Some("create task c1: no such file")
        );
    }

    #[test]
    fn argv_of_each_command() {
        let rt = RuncCli::new(
            RuntimeKind::Runc,
            "/usr/sbin/runc",
            "/run/stagehand/r1/runc",
        );
        let base = ["/usr/sbin/runc", "--root", "/run/stagehand/r1/runc"];
        let with = |rest: &[&str]| {
            base.iter()
                .chain(rest)
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strings(&rt.run_argv(Path::new("/run/stagehand/r1/c/s1"), "stagehand-r1-s1")),
            with(&[
                "--log",
                "/run/stagehand/r1/c/s1/runtime.log",
                "--log-format",
                "json",
                "run",
                "--keep",
                "--bundle",
                "/run/stagehand/r1/c/s1",
                "stagehand-r1-s1"
            ])
        );
        assert_eq!(
            strings(&rt.kill_argv("c", 15, false)),
            with(&["kill", "c", "15"])
        );
        assert_eq!(
            strings(&rt.kill_argv("c", 9, true)),
            with(&["kill", "--all", "c", "9"])
        );
        assert_eq!(
            strings(&rt.delete_argv("c", true)),
            with(&["delete", "--force", "c"])
        );
        assert_eq!(strings(&rt.delete_argv("c", false)), with(&["delete", "c"]));
        assert_eq!(strings(&rt.state_argv("c")), with(&["state", "c"]));
        assert_eq!(
            strings(&rt.list_argv()),
            with(&["list", "--format", "json"])
        );
    }

    #[test]
    fn locate_searches_dirs_and_names_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("crun");
        fs::write(&bin, "#!/bin/sh\n").unwrap();
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
        let dirs = vec![PathBuf::from("/nonexistent"), dir.path().to_path_buf()];
        let rt = RuncCli::locate_in(OsStr::new("crun"), &dirs, "/r".into()).unwrap();
        assert_eq!((rt.kind(), rt.binary()), (RuntimeKind::Crun, bin.as_path()));
        let err = RuncCli::locate_in(OsStr::new("runc"), &dirs, "/r".into()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "runc not found: install it (apt-get install runc) or pass --runtime PATH"
        );
        let err = RuncCli::locate_in(OsStr::new("/nope/runc"), &dirs, "/r".into()).unwrap_err();
        assert!(matches!(err, RuntimeError::NotExecutable { .. }), "{err}");
        let by_path = RuncCli::locate_in(bin.as_os_str(), &[], "/r".into()).unwrap();
        assert_eq!(by_path.name(), "crun");
    }

    #[test]
    fn crun_hybrid_cgroup_failure_gets_a_hint() {
        let rt = RuncCli::new(RuntimeKind::Crun, "/usr/bin/crun", "/r");
        let stderr =
            "crun: cgroups in hybrid mode not supported, drop all controllers from cgroupv2";
        assert!(rt.hint(stderr).unwrap().contains("use runc"));
        assert_eq!(rt.hint("something else"), None);
    }

    #[test]
    fn ids_are_checked() {
        check_id("stagehand-r1-step_1.2+x").unwrap();
        for bad in ["", "a/b", "..", "a b", "x;y"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    /// A fake runtime: a shell script answering like runc does.
    fn fake_runtime(dir: &Path) -> RuncCli {
        let script = dir.join("runc");
        fs::write(
            &script,
            r#"#!/bin/sh
shift 2
case "$1 $2" in
  "state c1") echo '{"ociVersion":"1.0.2","id":"c1","pid":42,"status":"running","bundle":"/b","rootfs":"/b/rootfs","created":"2024-01-01T00:00:00Z","owner":""}' ;;
  "state gone"|"delete gone") echo 'time="2024" level=error msg="container does not exist"' >&2; exit 1 ;;
  "kill stopped") echo 'time="2024" level=error msg="container not running"' >&2; exit 1 ;;
  "kill broken") echo 'time="2024" level=error msg="permission denied"' >&2; exit 1 ;;
  "kill c1"|"delete --force") exit 0 ;;
  "list --format") echo 'null' ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac
"#,
        )
        .unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        RuncCli::new(RuntimeKind::Runc, script, dir.join("state"))
    }

    #[test]
    fn control_parses_and_classifies_runtime_answers() {
        let dir = tempfile::tempdir().unwrap();
        let rt = fake_runtime(dir.path());
        let control = Control::new(&rt, &exec_std);
        assert_eq!(
            control.state("c1").unwrap(),
            Some(ContainerState {
                id: "c1".into(),
                pid: 42,
                status: "running".into(),
                bundle: "/b".into()
            })
        );
        assert_eq!(control.state("gone").unwrap(), None);
        assert!(control.kill("c1", 15, false).unwrap());
        assert!(!control.kill("stopped", 15, false).unwrap());
        let err = control.kill("broken", 15, false).unwrap_err();
        assert!(
            matches!(&err, RuntimeError::Failed { stderr, .. } if stderr.contains("permission denied")),
            "{err}"
        );
        assert!(control.delete("x", true).unwrap());
        assert!(!control.delete("gone", false).unwrap());
        assert!(control.list().unwrap().is_empty());
        assert!(matches!(
            control.kill("a/b", 9, false),
            Err(RuntimeError::InvalidId { .. })
        ));
    }
}
