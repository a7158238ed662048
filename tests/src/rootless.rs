//! Running stagehand as an ordinary user, for the rootless suite.
//!
//! Owns: the unprivileged test user (`stagehand-user`, or `$STAGEHAND_E2E_USER`; `.ci/run`
//! creates it with subordinate id ranges), a copy of the binary that user can execute (the
//! checkout may sit under a 0700 home), workspaces and image stores that user owns, and
//! starting `stagehand` as that user with `setpriv` (which execs, so the pid the test signals
//! is stagehand's own). Does not own: what the suite asserts.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::bin_path::stagehand_bin;
use crate::e2e::{StagehandCmd, Workspace};

/// The user the suites run stagehand as: `$STAGEHAND_E2E_AS_USER` (the rerun of every suite),
/// else `$STAGEHAND_E2E_USER`, else `stagehand-user`.
pub fn user_name() -> String {
    [crate::e2e::AS_USER_ENV, "STAGEHAND_E2E_USER"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
        .unwrap_or_else(|| "stagehand-user".into())
}

/// A copy the test user can read of `path` (a file or directory of the checkout, which may be
/// under a home the user cannot enter), made once per test binary under a 0755 temp dir.
/// Paths outside the checkout come back unchanged.
pub fn readable(path: &Path) -> PathBuf {
    static TREE: OnceLock<tempfile::TempDir> = OnceLock::new();
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let root = crate::bin_path::workspace_root();
    let Ok(rel) = path.strip_prefix(&root) else {
        return path.to_path_buf();
    };
    let tree = TREE.get_or_init(|| {
        let d = tempfile::Builder::new()
            .prefix(&own_prefix("tree"))
            .tempdir()
            .expect("temp dir for readable copies");
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the copies' dir");
        d
    });
    let dest = tree.path().join(rel);
    let _guard = lock(&LOCK);
    if !dest.exists() {
        // Parents first (cp does not make them), then the copy, readable by everyone.
        std::fs::create_dir_all(dest.parent().expect("has a parent"))
            .expect("create the copy's parent");
        let status = std::process::Command::new("cp")
            .arg("-rL")
            .arg(path)
            .arg(&dest)
            .status()
            .expect("run cp");
        assert!(status.success(), "copy {}", path.display());
        let _ = std::process::Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(tree.path())
            .status();
    }
    dest
}

/// Temp dirs of this module: `stagehand-rootless-<what>-<pid>-...`. They live in statics,
/// which are never dropped, so the first one registers an exit handler that removes this
/// process's, and sweeps those of test binaries that died without theirs.
const PREFIX: &str = "stagehand-rootless-";

fn own_prefix(what: &str) -> String {
    static REGISTERED: OnceLock<()> = OnceLock::new();
    REGISTERED.get_or_init(|| {
        sweep(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if !crate::images::sys::at_exit(remove_own_dirs) {
            eprintln!("rootless: atexit failed; the next run sweeps this run's temp dirs");
        }
    });
    format!("{PREFIX}{what}-{}-", std::process::id())
}

/// Removes the module's temp dirs whose pid `matches`.
fn sweep(matches: impl Fn(u32) -> bool) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(&matches) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// atexit handler: never panics (it runs inside C's `exit`).
extern "C" fn remove_own_dirs() {
    let me = std::process::id();
    sweep(|pid| pid == me);
}

fn lock(m: &std::sync::Mutex<()>) -> std::sync::MutexGuard<'_, ()> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The unprivileged user and a binary it can run.
pub struct RootlessUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// `<temp>/stagehand`, mode 0755, in a 0755 directory.
    pub bin: PathBuf,
    /// The user's ranges in /etc/subuid (read as stagehand reads them).
    pub subuids: Vec<stagehand_supervisor::userns::SubIds>,
    _bin_dir: tempfile::TempDir,
}

/// The test user, looked up once (panics with the fix when it is missing: the suite needs
/// root and that user).
pub fn user() -> &'static RootlessUser {
    static USER: OnceLock<RootlessUser> = OnceLock::new();
    USER.get_or_init(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the rootless suite runs as root and starts stagehand as an ordinary user"
        );
        let name = user_name();
        let u = nix::unistd::User::from_name(&name)
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                panic!(
                    "no user `{name}`: create it with `useradd --create-home {name}` and give it \
                     subordinate ids (`usermod --add-subuids 100000-165535 --add-subgids \
                     100000-165535 {name}`); ./dev test does both"
                )
            });
        let dir = tempfile::Builder::new()
            .prefix(&own_prefix("bin"))
            .tempdir()
            .expect("temp dir for the binary");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the binary's dir");
        let bin = dir.path().join("stagehand");
        std::fs::copy(stagehand_bin(), &bin).expect("copy the stagehand binary");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755))
            .expect("chmod the binary");
        let subuids = stagehand_supervisor::userns::subordinate_ids(
            Path::new("/etc/subuid"),
            &name,
            u.uid.as_raw(),
        );
        RootlessUser {
            subuids,
            name,
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
            home: u.dir,
            bin,
            _bin_dir: dir,
        }
    })
}

impl RootlessUser {
    /// Give `path` (recursively) to the user.
    pub fn own(&self, path: &Path) {
        let status = std::process::Command::new("chown")
            .arg("-R")
            .arg(format!("{}:{}", self.uid, self.gid))
            .arg(path)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown -R {}", path.display());
    }

    /// A workspace the user owns.
    pub fn workspace(&self) -> Workspace {
        let ws = Workspace::new();
        self.own(ws.path());
        ws
    }

    /// `cmd` (built for root, with paths into the checkout) as the user: its file arguments
    /// replaced by readable copies, run from the copies' directory.
    pub fn wrap(&self, cmd: StagehandCmd) -> StagehandCmd {
        let root = crate::bin_path::workspace_root();
        let cwd = readable(&root.join("tests/pipelines"));
        let cmd = cmd.map_args(|a| {
            let p = Path::new(a);
            if p.is_absolute() && p.starts_with(&root) {
                return readable(p).into_os_string();
            }
            self.own_test_dir(p);
            a.to_os_string()
        });
        self.as_user(cmd, cwd)
    }

    /// A test's own temp tree named in an argument (`/tmp/stagehand-e2e-.../store`, an
    /// archive there): given to the user, who must read and write it as root's tests do.
    fn own_test_dir(&self, p: &Path) {
        let tmp = std::env::temp_dir();
        let Some(first) = p
            .strip_prefix(&tmp)
            .ok()
            .and_then(|r| r.components().next())
        else {
            return;
        };
        let top = tmp.join(first);
        let ours = top
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("stagehand-e2e"));
        let owner = std::fs::metadata(&top).map(|m| std::os::unix::fs::MetadataExt::uid(&m));
        if ours && owner.is_ok_and(|o| o != self.uid) {
            self.own(&top);
        }
    }

    fn as_user(&self, cmd: StagehandCmd, cwd: PathBuf) -> StagehandCmd {
        let wrapper: Vec<OsString> = [
            "setpriv",
            "--reuid",
            &self.name,
            "--regid",
            &self.name,
            "--init-groups",
            "--",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        cmd.via(wrapper, self.bin.clone(), cwd)
            .env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name)
            .env("XDG_RUNTIME_DIR", "")
            .env("XDG_DATA_HOME", "")
    }

    /// `stagehand ARGS...` as the user, in the workspace, with the user's HOME and no
    /// XDG_RUNTIME_DIR (as on a host without logind: runs go to /tmp/stagehand-<uid>).
    pub fn stagehand(&self, ws: &Workspace) -> StagehandCmd {
        self.as_user(StagehandCmd::new(ws.marker()), ws.path().to_path_buf())
    }

    /// `stagehand run FILE --workspace WS --root <WS>/store` as the user, `FILE` being `yaml`
    /// written into the workspace.
    pub fn run(&self, ws: &Workspace, yaml: &str) -> StagehandCmd {
        let file = ws.path().join("pipeline.yaml");
        std::fs::write(&file, yaml).expect("write the pipeline");
        self.own(&file);
        self.stagehand(ws)
            .arg("run")
            .arg(&file)
            .arg("--workspace")
            .arg(ws.path())
            .arg("--root")
            .arg(self.store(ws))
    }

    /// The image store of a test: `<workspace>/store` (removed with the workspace, by root).
    pub fn store(&self, ws: &Workspace) -> PathBuf {
        ws.path().join("store")
    }

    /// The user's run directory base (no XDG_RUNTIME_DIR): `/tmp/stagehand-<uid>`.
    pub fn run_base(&self) -> PathBuf {
        std::env::temp_dir().join(format!("stagehand-{}", self.uid))
    }

    /// Whether `uid` is one of the user's subordinate ids (container processes run as those).
    pub fn subordinate(&self, uid: u32) -> bool {
        self.subuids
            .iter()
            .any(|r| uid >= r.start && uid - r.start < r.count)
    }

    /// Processes running as the user or one of its subordinate ids: (pid, command line).
    pub fn processes(&self) -> Vec<(i32, String)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
                continue;
            };
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().next())
                .and_then(|u| u.parse::<u32>().ok());
            if uid.is_some_and(|u| u == self.uid || self.subordinate(u)) {
                let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                out.push((pid, String::from_utf8_lossy(&cmd).replace('\0', " ")));
            }
        }
        out
    }
}

/// In the rootless rerun on a host without delegated cgroups: asserts stagehand said once that
/// limits are not enforced and returns true, so a limits test checks only what still holds.
/// False (nothing asserted) otherwise.
pub fn limits_not_enforced(out: &crate::e2e::Finished) -> bool {
    if !crate::e2e::rootless_rerun() {
        return false;
    }
    assert_eq!(
        out.stdout
            .matches("warning: resource limits cannot be enforced")
            .count(),
        1,
        "the limits warning, once\n{}",
        out.dump()
    );
    true
}

/// In the rootless rerun where the user cannot open /dev/net/tun: asserts stagehand said the
/// stage has no outbound network and returns true. False otherwise.
pub fn outbound_unavailable(out: &crate::e2e::Finished) -> bool {
    crate::e2e::rootless_rerun()
        && out
            .stdout
            .contains("warning: no outbound network for the stage: /dev/net/tun")
}
