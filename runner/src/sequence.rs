//! `<+pipeline.sequenceId>`: a run counter per pipeline identifier, kept beside the image store
//! (`<root>/sequence/<pipeline id>`).
//!
//! Two runs of one pipeline at once get different numbers: the read-increment-write holds an
//! exclusive `flock` on `sequence/.lock`, and the new value replaces the file whole (temp file
//! and rename), so a crash never leaves a half-written counter that would start again at 1.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::fcntl::{Flock, FlockArg};

/// The next sequence number of `pipeline` under `root` (1 for its first run), recorded.
pub fn next(root: &Path, pipeline: &str) -> io::Result<u64> {
    let dir = root.join("sequence");
    fs::create_dir_all(&dir)?;
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(dir.join(".lock"))?;
    let _held = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, e)| io::Error::from(e))?;
    let path = dir.join(pipeline);
    let n = match fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().unwrap_or(0),
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e),
    } + 1;
    let tmp = dir.join(format!(".{pipeline}.tmp"));
    let mut f = File::create(&tmp)?;
    f.write_all(n.to_string().as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_pipeline_from_one() {
        let root = tempfile::tempdir().unwrap();
        assert_eq!(next(root.path(), "a").unwrap(), 1);
        assert_eq!(next(root.path(), "a").unwrap(), 2);
        assert_eq!(next(root.path(), "b").unwrap(), 1);
        assert_eq!(
            fs::read_to_string(root.path().join("sequence/a")).unwrap(),
            "2"
        );
    }

    #[test]
    fn concurrent_runs_get_distinct_numbers() {
        // Each call opens its own lock file description, as another process would.
        let root = tempfile::tempdir().unwrap();
        let mut all: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..25)
                            .map(|_| next(root.path(), "p").unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        all.sort_unstable();
        assert_eq!(all, (1..=200).collect::<Vec<u64>>());
    }

    #[test]
    fn an_unreadable_counter_starts_again_and_a_missing_root_is_created() {
        let root = tempfile::tempdir().unwrap();
        let nested = root.path().join("x/y");
        assert_eq!(next(&nested, "p").unwrap(), 1);
        fs::write(nested.join("sequence/p"), "garbage").unwrap();
        assert_eq!(next(&nested, "p").unwrap(), 1);
    }
}
