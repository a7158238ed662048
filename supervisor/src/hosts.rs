//! The stage-private `/etc/hosts` and `/etc/resolv.conf` contents.
//!
//! Owns: rendering and writing the files (`<rundir>/hosts`, `<rundir>/resolv.conf`).
//! Does not own: computing the host names (the runner's plan does: step ids such as
//! `Background_1` and `sg1_Background_1`) or showing the files to steps (the process layer
//! bind-mounts them in a private mount namespace; container steps get them as OCI mounts).
//!
//! Every step of a stage shares one network namespace, so every service is reachable on
//! 127.0.0.1 and each step id simply names 127.0.0.1. Step ids are mapped to IPv4 only: a
//! client that tried `::1` first would fail against the common service bound to 127.0.0.1.

use std::fmt::Write as _;
use std::path::Path;

use crate::netns::NetError;

/// The hosts file for a stage: `localhost` and every name on 127.0.0.1, `localhost` on ::1.
/// Duplicates are written once; a name that would corrupt the file (empty, or containing
/// whitespace or `#`) is left out with a warning, since the plan should never produce one.
pub fn render(hostnames: &[String]) -> String {
    let mut out = String::from(
        "# stagehand: stage-private hosts file\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n",
    );
    let mut seen: Vec<&str> = vec!["localhost"];
    for name in hostnames {
        let name = name.as_str();
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == '#') {
            tracing::warn!(name, "not a usable host name; left out of the hosts file");
            continue;
        }
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        let _ = writeln!(out, "127.0.0.1\t{name}");
    }
    out
}

/// Writes [`render`]`(hostnames)` to `path` (mode 0644 under the usual umask, so non-root
/// steps can read it).
pub fn write(path: &Path, hostnames: &[String]) -> Result<(), NetError> {
    std::fs::write(path, render(hostnames)).map_err(|source| NetError::Write {
        path: path.to_owned(),
        source,
    })
}

/// The resolv.conf for a stage whose namespace has slirp4netns: its built-in DNS forwarder
/// at 10.0.2.3 ([`crate::slirp::DNS`]), which relays to the host's resolver.
pub fn resolv_conf_for_slirp() -> String {
    format!("nameserver {}\n", crate::slirp::DNS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn maps_localhost_and_step_ids_to_loopback() {
        let text = render(&names(&["Background_1", "sg1_Background_1"]));
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "127.0.0.1\tlocalhost",
                "::1\tlocalhost ip6-localhost ip6-loopback",
                "127.0.0.1\tBackground_1",
                "127.0.0.1\tsg1_Background_1",
            ]
        );
    }

    #[test]
    fn skips_duplicates_and_unusable_names() {
        let text = render(&names(&[
            "db",
            "localhost",
            "db",
            "",
            "a b",
            "x#y",
            "cache",
        ]));
        let mapped: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("127.0.0.1\t"))
            .map(|l| &l["127.0.0.1\t".len()..])
            .collect();
        assert_eq!(mapped, ["localhost", "db", "cache"]);
    }

    #[test]
    fn write_creates_the_file_and_reports_the_path() {
        let dir = tempfile::Builder::new()
            .prefix("stagehand-hosts-")
            .tempdir()
            .unwrap();
        let path = dir.path().join("hosts");
        write(&path, &names(&["Background_1"])).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            render(&names(&["Background_1"]))
        );

        let bad = dir.path().join("missing-dir").join("hosts");
        let err = write(&bad, &[]).unwrap_err();
        assert!(err.to_string().contains("missing-dir/hosts"), "{err}");
    }

    #[test]
    fn resolv_conf_points_at_slirp_dns() {
        assert_eq!(resolv_conf_for_slirp(), "nameserver 10.0.2.3\n");
    }
}
