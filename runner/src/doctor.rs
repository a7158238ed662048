//! `stagehand doctor`: what this host supports for the user running it, and what to do about
//! each gap. Also the one sentence `run` prints when limits cannot be enforced.
//!
//! Owns: probing (cgroup version and delegation, user namespaces, subordinate ids, overlayfs
//! in a user namespace, runtimes, slirp4netns and /dev/net/tun, the init binary) and the
//! report. Does not own: acting on any of it (the runner and supervisor do).

use std::path::{Path, PathBuf};
use std::process::Command;

use stagehand_supervisor::userns;

/// One finding: its verdict, what was found, and (for a gap) the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// `ok`, `warn` (works with less) or `fail` (stagehand cannot run that way).
    pub level: Level,
    /// What was checked.
    pub topic: &'static str,
    /// What was found.
    pub found: String,
    /// What to do, for a gap.
    pub fix: Option<String>,
}

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Works.
    Ok,
    /// Works with less (no limits, no outbound network, copies instead of overlays).
    Warn,
    /// Stops stagehand from running containers or stages this way.
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        }
    }
}

/// Prints the report; exit code 0 unless something fails.
pub fn run() -> i32 {
    let findings = check();
    let who = if userns::is_real_root() {
        "root".to_string()
    } else {
        let uid = userns::host_uid();
        format!(
            "{} (uid {uid}, rootless)",
            userns::user_name(uid).unwrap_or_else(|| "?".into())
        )
    };
    println!("stagehand doctor: running as {who}");
    for f in &findings {
        println!("{} {:<18} {}", f.level.label(), f.topic, f.found);
        if let Some(fix) = &f.fix {
            println!("     {:<18} fix: {fix}", "");
        }
    }
    let worst = findings.iter().map(|f| f.level).max().unwrap_or(Level::Ok);
    println!(
        "{}",
        match worst {
            Level::Ok => "everything stagehand uses is here",
            Level::Warn => "stagehand runs here, with the limits above",
            Level::Fail => "stagehand cannot run stages here until the failures above are fixed",
        }
    );
    i32::from(worst == Level::Fail)
}

/// Whether a rootless run can put its steps in cgroups with limits: on cgroup v2, when its
/// own cgroup is a subtree delegated to the user (writable, with memory, cpu and pids
/// available to enable). `Err` says why not, for `run`'s one warning and for `doctor`.
pub fn rootless_limits() -> Result<PathBuf, String> {
    match cgroup_layout() {
        CgroupLayout::V1 => Err("rootless on cgroup v1, which cannot delegate cgroups to a user (boot with systemd.unified_cgroup_hierarchy=1 for cgroup v2)".into()),
        CgroupLayout::V2 { own, writable: true } => {
            let available =
                std::fs::read_to_string(own.join("cgroup.controllers")).unwrap_or_default();
            let missing: Vec<&str> = ["memory", "cpu", "pids"]
                .into_iter()
                .filter(|c| !available.split_whitespace().any(|a| a == *c))
                .collect();
            if missing.is_empty() {
                Ok(own)
            } else {
                Err(format!(
                    "rootless on cgroup v2: the delegated subtree {} lacks the {} controller(s) (run under `systemd-run --user --scope -p Delegate=yes`, or set Delegate=memory cpu pids for user@.service)",
                    own.display(),
                    missing.join(", ")
                ))
            }
        }
        CgroupLayout::V2 { own, writable: false } => Err(format!(
            "rootless on cgroup v2 without a delegated subtree ({} is not yours; run under `systemd-run --user --scope -p Delegate=yes`)",
            own.display()
        )),
        CgroupLayout::Unknown(why) => Err(format!("cgroups unavailable: {why}")),
    }
}

/// Why a rootless run cannot enforce limits here (what `run` says once).
pub fn limits_gap() -> String {
    match rootless_limits() {
        Ok(own) => format!("none: {} is delegated to you", own.display()),
        Err(why) => why,
    }
}

enum CgroupLayout {
    V1,
    V2 { own: PathBuf, writable: bool },
    Unknown(String),
}

fn cgroup_layout() -> CgroupLayout {
    let root = Path::new(stagehand_supervisor::cgroup::DEFAULT_ROOT);
    match stagehand_supervisor::cgroup::detect(root) {
        Ok(h) if h.version() == stagehand_supervisor::cgroup::Version::V1 => CgroupLayout::V1,
        Ok(_) => {
            let rel = std::fs::read_to_string("/proc/self/cgroup")
                .ok()
                .and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
                })
                .unwrap_or_default();
            let own = root.join(rel.trim_start_matches('/'));
            let writable = nix::unistd::access(&own, nix::unistd::AccessFlags::W_OK).is_ok()
                && nix::unistd::access(
                    &own.join("cgroup.subtree_control"),
                    nix::unistd::AccessFlags::W_OK,
                )
                .is_ok();
            CgroupLayout::V2 { own, writable }
        }
        Err(e) => CgroupLayout::Unknown(e.to_string()),
    }
}

/// Every check, in report order.
pub fn check() -> Vec<Finding> {
    let root = userns::is_real_root();
    let mut out = vec![cgroups(root)];
    if !root {
        out.extend([user_namespaces(), subordinate_ids(), overlay_in_userns()]);
    }
    out.extend([runtimes(), init(), outbound(root), run_dirs(root)]);
    out
}

fn finding(level: Level, topic: &'static str, found: String, fix: Option<String>) -> Finding {
    Finding {
        level,
        topic,
        found,
        fix,
    }
}

fn cgroups(root: bool) -> Finding {
    match (cgroup_layout(), root) {
        (CgroupLayout::Unknown(why), _) => finding(
            Level::Warn,
            "cgroups",
            format!("not usable: {why}"),
            Some("mount cgroup2 (or the v1 controllers) at /sys/fs/cgroup".into()),
        ),
        (CgroupLayout::V1, true) => finding(
            Level::Ok,
            "cgroups",
            "v1 (hybrid or legacy): memory, cpu and pids limits per step".into(),
            None,
        ),
        (CgroupLayout::V2 { .. }, true) => finding(
            Level::Ok,
            "cgroups",
            "v2 (unified): memory, cpu and pids limits per step".into(),
            None,
        ),
        (_, false) => match rootless_limits() {
            Ok(own) => finding(
                Level::Ok,
                "cgroups",
                format!(
                    "v2, {} delegated to you: memory, cpu and pids limits per step",
                    own.display()
                ),
                None,
            ),
            Err(why) => finding(
                Level::Warn,
                "cgroups",
                format!("limits are not enforced: {why}"),
                Some(
                    "run as root for limits, or pass --require-limits to refuse running without them"
                        .into(),
                ),
            ),
        },
    }
}

fn user_namespaces() -> Finding {
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    let probe = Command::new("unshare")
        .args(["--user", "--map-root-user", "true"])
        .output();
    match probe {
        Ok(o) if o.status.success() => finding(
            Level::Ok,
            "user namespaces",
            format!(
                "an unprivileged user namespace can be created (max {})",
                max.map_or("?".into(), |m| m.to_string())
            ),
            None,
        ),
        Ok(o) => finding(
            Level::Fail,
            "user namespaces",
            format!(
                "cannot create one: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Some("sysctl -w user.max_user_namespaces=15000 (and on Ubuntu 24.04: sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor profile allowing userns for stagehand)".into()),
        ),
        Err(e) => finding(
            Level::Warn,
            "user namespaces",
            format!("not probed: unshare(1): {e}"),
            Some("apt-get install util-linux".into()),
        ),
    }
}

fn subordinate_ids() -> Finding {
    let plan = userns::MappingPlan::for_current_user();
    let tools_ok = plan
        .tools
        .as_ref()
        .is_some_and(|(u, g)| setuid_or_caps(u) && setuid_or_caps(g));
    let ranges = |r: &[userns::SubIds]| {
        r.iter()
            .map(|s| format!("{}+{}", s.start, s.count))
            .collect::<Vec<_>>()
            .join(",")
    };
    if plan.full() && tools_ok {
        return finding(
            Level::Ok,
            "subordinate ids",
            format!(
                "uids {} gids {}, newuidmap/newgidmap present",
                ranges(&plan.subuids),
                ranges(&plan.subgids)
            ),
            None,
        );
    }
    let user = userns::user_name(userns::host_uid()).unwrap_or_else(|| "USER".into());
    let mut gaps = Vec::new();
    let mut fixes = Vec::new();
    if plan.tools.is_none() {
        gaps.push("newuidmap/newgidmap not found".to_string());
        fixes.push("apt-get install uidmap".to_string());
    } else if !tools_ok {
        gaps.push("newuidmap/newgidmap are neither setuid nor have file capabilities".into());
        fixes.push("reinstall uidmap".into());
    }
    if plan.subuids.is_empty() || plan.subgids.is_empty() {
        gaps.push("no ranges in /etc/subuid or /etc/subgid".into());
        fixes.push(format!(
            "usermod --add-subuids 100000-165535 --add-subgids 100000-165535 {user}"
        ));
    }
    finding(
        Level::Warn,
        "subordinate ids",
        format!(
            "{}: the namespace maps only your own id, so image files of other users are unpacked as yours",
            gaps.join("; ")
        ),
        Some(fixes.join("; ")),
    )
}

fn setuid_or_caps(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.permissions().mode() & 0o4000 != 0)
        || xattr_present(p, "security.capability")
}

fn xattr_present(p: &Path, name: &str) -> bool {
    Command::new("getfattr")
        .args(["--absolute-names", "-n", name])
        .arg(p)
        .output()
        .is_ok_and(|o| o.status.success())
}

fn overlay_in_userns() -> Finding {
    let Ok(dir) = tempfile::Builder::new()
        .prefix("stagehand-doctor")
        .tempdir()
    else {
        return finding(
            Level::Warn,
            "overlayfs",
            "not probed: no temp dir".into(),
            None,
        );
    };
    // The overlay leaves `w/work` mode 000, which only root of the namespace can remove: do
    // it in there, so the temp dir goes away afterwards.
    let script = "mkdir l u w m && mount -t overlay overlay -o userxattr,lowerdir=l,upperdir=u,workdir=w m && umount m && rm -rf w";
    let ok = Command::new("unshare")
        .args(["--user", "--map-root-user", "--mount", "sh", "-c", script])
        .current_dir(dir.path())
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        finding(
            Level::Ok,
            "overlayfs",
            "mountable in a user namespace (userxattr): containers start without copying".into(),
            None,
        )
    } else {
        finding(
            Level::Warn,
            "overlayfs",
            "not mountable in a user namespace: each container gets a copy of its image (slower)"
                .into(),
            Some("a kernel of 5.11 or later".into()),
        )
    }
}

fn runtimes() -> Finding {
    let found: Vec<String> = ["runc", "crun"]
        .iter()
        .filter_map(|name| {
            let path = crate::cli::find_in_path(name)?;
            let version = Command::new(&path)
                .arg("--version")
                .output()
                .ok()
                .and_then(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .next()
                        .map(str::to_string)
                })
                .unwrap_or_default();
            Some(format!("{} ({version})", path.display()))
        })
        .collect();
    if found.is_empty() {
        finding(
            Level::Fail,
            "OCI runtime",
            "neither runc nor crun found: container steps cannot run (host steps can)".into(),
            Some("apt-get install runc".into()),
        )
    } else {
        finding(Level::Ok, "OCI runtime", found.join(", "), None)
    }
}

fn init() -> Finding {
    match crate::cli::find_in_path("catatonit").or_else(|| crate::cli::find_in_path("tini")) {
        Some(p) => finding(
            Level::Ok,
            "container init",
            format!("{} (services get SIGTERM, zombies are reaped)", p.display()),
            None,
        ),
        None => finding(
            Level::Warn,
            "container init",
            "no catatonit or tini: a service that ignores SIGTERM as PID 1 is SIGKILLed after the stop timeout".into(),
            Some("apt-get install catatonit".into()),
        ),
    }
}

fn outbound(root: bool) -> Finding {
    let slirp = crate::cli::find_in_path("slirp4netns");
    let tun = root || userns::tun_usable();
    match (slirp, tun) {
        (Some(p), true) => finding(
            Level::Ok,
            "outbound network",
            format!("{} and /dev/net/tun: stages reach the outside and the host's loopback (10.0.2.2)", p.display()),
            None,
        ),
        (None, _) => finding(
            Level::Warn,
            "outbound network",
            "slirp4netns not found: stages need --network none or --network host".into(),
            Some("apt-get install slirp4netns".into()),
        ),
        (Some(_), false) => finding(
            Level::Warn,
            "outbound network",
            "/dev/net/tun cannot be opened by this user: stages get loopback, hostnames and published ports, no outbound".into(),
            Some("chmod 0666 /dev/net/tun (the usual mode; a udev rule keeps it)".into()),
        ),
    }
}

fn run_dirs(root: bool) -> Finding {
    let run = crate::cli::run_dir_base();
    let store = stagehand_oci::store::Store::default_root().unwrap_or_default();
    let xdg = std::env::var_os("XDG_RUNTIME_DIR").is_some();
    finding(
        Level::Ok,
        "directories",
        format!(
            "runs under {}, images in {}{}",
            run.display(),
            store.display(),
            if root || xdg {
                ""
            } else {
                " (XDG_RUNTIME_DIR is unset, so runs go to the temp dir)"
            }
        ),
        None,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_covers_every_topic_once_and_fixes_every_gap() {
        let findings = check();
        let mut topics: Vec<&str> = findings.iter().map(|f| f.topic).collect();
        let n = topics.len();
        topics.sort();
        topics.dedup();
        assert_eq!(topics.len(), n, "a topic reported twice: {findings:?}");
        for t in ["cgroups", "OCI runtime", "outbound network", "directories"] {
            assert!(topics.contains(&t), "{t} missing: {findings:?}");
        }
        for f in findings.iter().filter(|f| f.level != Level::Ok) {
            assert!(f.fix.is_some(), "a gap without a fix: {f:?}");
        }
    }

    #[test]
    fn the_limits_gap_names_the_cgroup_version() {
        let gap = limits_gap();
        assert!(
            gap.contains("cgroup v1")
                || gap.contains("cgroup v2")
                || gap.contains("unavailable")
                || gap.starts_with("none: "),
            "{gap}"
        );
    }
}
