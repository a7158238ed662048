//! Small filesystem helpers shared by the store, the unpacker and the spec builder: advisory
//! file locks, atomic file replacement, SHA-256 hashing while streaming, and path handling
//! that never leaves a given root directory.
//!
//! Owns no state and no policy about *what* is locked or written; the callers decide that.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest as _, Sha256};

/// An advisory `flock(2)` lock held until dropped.
pub(crate) type FileLock = Flock<File>;

/// Opens (creating it if needed) `path` and takes a blocking `flock` on it, shared or
/// exclusive. `flock` locks belong to the open file description, so two `Store`s in one
/// process exclude each other exactly like two processes do.
pub(crate) fn lock(path: &Path, exclusive: bool) -> io::Result<FileLock> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)?;
    let arg = if exclusive {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockShared
    };
    Flock::lock(file, arg).map_err(|(_, errno)| io::Error::from(errno))
}

/// Like [`lock`] with `exclusive`, but returns `Ok(None)` instead of waiting when someone else
/// holds the lock.
pub(crate) fn try_lock_exclusive(path: &Path) -> io::Result<Option<FileLock>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(errno.into()),
    }
}

/// A name unique within this machine for temporary files: pid, time and a counter, so two
/// processes (or two threads) writing into the same directory never collide.
pub(crate) fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{prefix}{}-{nanos}-{n}", std::process::id())
}

/// `fsync` on a directory, so a rename or a new entry in it survives a crash.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` atomically: readers see the old or the new content, never a
/// mix. Writes a temporary file in the same directory, fsyncs it, renames it over `path` and
/// fsyncs the directory.
pub(crate) fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_write_mode(path, bytes, 0o644)
}

/// [`atomic_write`] with the given file mode (before the umask).
pub(crate) fn atomic_write_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(unique_name(&format!(".{file_name}.tmp-")));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Lowercase hex SHA-256 of `bytes`.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// A reader that hashes (SHA-256) and counts everything read through it.
pub(crate) struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> HashingReader<R> {
    pub(crate) fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            len: 0,
        }
    }

    /// Reads the rest of the stream (so the hash covers all of it) and returns the lowercase
    /// hex digest and the total length.
    pub(crate) fn finish(mut self) -> io::Result<(String, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((format!("{:x}", self.hasher.finalize()), self.len))
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
}

/// Why a path inside an archive was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PathRefusal {
    /// A `..` component.
    ParentDir,
}

impl std::fmt::Display for PathRefusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathRefusal::ParentDir => f.write_str("the path contains a '..' component"),
        }
    }
}

/// Turns an archive member name into a relative path of plain components: leading `/` and
/// `.` components are dropped (GNU tar's default, "Removing leading `/' from member names"),
/// any `..` is refused. `Ok(None)` is the archive root itself (`/`, `.`, `./`).
pub(crate) fn clean_relative(path: &Path) -> Result<Option<PathBuf>, PathRefusal> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Prefix(_) | Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err(PathRefusal::ParentDir),
            Component::Normal(name) => out.push(name),
        }
    }
    if out.as_os_str().is_empty() {
        Ok(None)
    } else {
        Ok(Some(out))
    }
}

/// Why [`resolve_in_root`] could not resolve a path.
#[derive(Debug)]
pub(crate) enum ResolveError {
    /// A symlink on the way points outside the root: an absolute target, or enough `..` to
    /// climb above the root. Carries the symlink (relative to the root) and its target.
    Escapes {
        /// The symlink, relative to the root.
        link: PathBuf,
        /// What it points to.
        target: PathBuf,
    },
    /// A component on the way exists but is not a directory (or a symlink to one).
    NotADirectory(PathBuf),
    /// A component on the way does not exist and `create` was false.
    Missing(PathBuf),
    /// More than 40 symlinks on the way (the kernel's own limit, `path_resolution(7)`).
    TooManyLinks(PathBuf),
    /// A filesystem call failed.
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for ResolveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveError::Escapes { link, target } => write!(
                f,
                "it goes through the symlink {} -> {}, which points outside the target",
                link.display(),
                target.display()
            ),
            ResolveError::NotADirectory(p) => write!(f, "{} is not a directory", p.display()),
            ResolveError::Missing(p) => write!(f, "{} does not exist", p.display()),
            ResolveError::TooManyLinks(p) => {
                write!(f, "too many levels of symbolic links at {}", p.display())
            }
            ResolveError::Io(p, e) => write!(f, "{}: {e}", p.display()),
        }
    }
}

/// Maximum symlinks followed while resolving one path, as `path_resolution(7)` allows.
const MAX_LINKS: usize = 40;

/// Resolves the directory `rel` (relative, plain components) inside `root` and returns its
/// real path on the host, which is always `root` or below it.
///
/// Symlinks on the way are followed only while they stay inside `root`: a relative target is
/// resolved component by component; an absolute target, or a `..` that would climb above
/// `root`, is [`ResolveError::Escapes`]. Writing through such a link would write on the host,
/// so the caller refuses the entry instead of guessing what the link was meant to be.
/// With `create`, missing components are created as directories (mode 0755); otherwise they
/// are [`ResolveError::Missing`].
///
/// This is path-based (lstat per component), so it is only sound while nobody else changes
/// the tree concurrently: the unpacker holds the layer lock, the spec builder reads an image
/// root filesystem nobody runs in yet.
pub(crate) fn resolve_in_root(
    root: &Path,
    rel: &Path,
    create: bool,
) -> Result<PathBuf, ResolveError> {
    resolve_with(root, rel, create, Links::Refuse)
}

/// How [`resolve_with`] treats symlinks that point outside the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Links {
    /// Refuse them ([`ResolveError::Escapes`]): for writing.
    Refuse,
    /// Resolve them as a chroot would: an absolute target starts again at the root, `..` at
    /// the root stays there. For reading files of an image (`/etc/passwd`) the way the
    /// container will see them.
    Chroot,
}

fn resolve_with(
    root: &Path,
    rel: &Path,
    create: bool,
    policy: Links,
) -> Result<PathBuf, ResolveError> {
    // Components still to walk, in order; symlink targets are spliced in at the front.
    let mut pending: std::collections::VecDeque<OsString> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0usize;
    let as_path = |parts: &[OsString]| parts.iter().collect::<PathBuf>();
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            // Archive paths were cleaned, so ".." comes from symlink targets (or from a path
            // read_in_root built out of one).
            if resolved.pop().is_none() && policy == Links::Refuse {
                return Err(ResolveError::Escapes {
                    link: as_path(&resolved),
                    target: PathBuf::from(".."),
                });
            }
            continue;
        }
        if name == "." {
            continue;
        }
        let mut rel_here = as_path(&resolved);
        rel_here.push(&name);
        let host = root.join(&rel_here);
        match fs::symlink_metadata(&host) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if !create {
                    return Err(ResolveError::Missing(rel_here));
                }
                match fs::create_dir(&host) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(ResolveError::Io(rel_here, e)),
                }
                resolved.push(name);
            }
            Err(e) => return Err(ResolveError::Io(rel_here, e)),
            Ok(meta) if meta.is_dir() => resolved.push(name),
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(ResolveError::TooManyLinks(rel_here));
                }
                let target =
                    fs::read_link(&host).map_err(|e| ResolveError::Io(rel_here.clone(), e))?;
                if policy == Links::Chroot {
                    if target.is_absolute() {
                        resolved.clear();
                    }
                } else {
                    if target.is_absolute() {
                        return Err(ResolveError::Escapes {
                            link: rel_here,
                            target,
                        });
                    }
                    // Check the climb now, so the error names this link and not a later one.
                    let mut depth = resolved.len() as isize;
                    for c in target.components() {
                        match c {
                            Component::ParentDir => depth -= 1,
                            Component::Normal(_) => depth += 1,
                            _ => {}
                        }
                        if depth < 0 {
                            return Err(ResolveError::Escapes {
                                link: rel_here,
                                target,
                            });
                        }
                    }
                }
                let mut spliced: Vec<OsString> = target
                    .components()
                    .filter_map(|c| match c {
                        Component::Normal(n) => Some(n.to_os_string()),
                        Component::ParentDir => Some(OsString::from("..")),
                        _ => None,
                    })
                    .collect();
                spliced.extend(pending.drain(..));
                pending = spliced.into();
            }
            Ok(_) => return Err(ResolveError::NotADirectory(rel_here)),
        }
    }
    Ok(root.join(as_path(&resolved)))
}

/// Reads the file `rel` of the tree at `root` as a process chrooted there would: symlinks
/// (also absolute ones, also the last component) are resolved inside `root`, never on the
/// host. `Ok(None)` when the file does not exist.
pub(crate) fn read_in_root(root: &Path, rel: &Path) -> Result<Option<Vec<u8>>, ResolveError> {
    match file_in_root(root, rel)? {
        Some((path, rel)) => fs::read(&path)
            .map(Some)
            .map_err(|e| ResolveError::Io(rel, e)),
        None => Ok(None),
    }
}

/// Finds the regular file `rel` of the tree at `root` as a process chrooted there would (see
/// [`read_in_root`]): its host path and its path in the tree after links. `Ok(None)` when
/// there is no such file.
pub(crate) fn file_in_root(
    root: &Path,
    rel: &Path,
) -> Result<Option<(PathBuf, PathBuf)>, ResolveError> {
    let mut rel = rel.to_path_buf();
    for _ in 0..MAX_LINKS {
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        let Some(name) = rel.file_name().map(|n| n.to_os_string()) else {
            return Ok(None);
        };
        let parent = match resolve_with(root, &parent_rel, false, Links::Chroot) {
            Ok(p) => p,
            Err(ResolveError::Missing(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let path = parent.join(&name);
        match fs::symlink_metadata(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ResolveError::Io(rel, e)),
            Ok(m) if m.file_type().is_symlink() => {
                let target = fs::read_link(&path).map_err(|e| ResolveError::Io(rel.clone(), e))?;
                let base = parent
                    .strip_prefix(root)
                    .unwrap_or(Path::new(""))
                    .to_path_buf();
                rel = if target.is_absolute() {
                    target
                        .components()
                        .filter(|c| matches!(c, Component::Normal(_) | Component::ParentDir))
                        .collect()
                } else {
                    base.join(target)
                };
                // `..` components are handled by resolve_with on the next round.
            }
            Ok(m) if m.is_file() => return Ok(Some((path, rel))),
            Ok(_) => return Err(ResolveError::NotADirectory(rel)),
        }
    }
    Err(ResolveError::TooManyLinks(rel))
}

/// Whether every component of `rel` below `root` is a real directory (no symlink anywhere).
/// Used before touching a path recorded earlier, in case a later archive entry replaced one
/// of its ancestors with a symlink.
pub(crate) fn is_real_dir_chain(root: &Path, rel: &Path) -> bool {
    let mut cur = root.to_path_buf();
    for c in rel.components() {
        let Component::Normal(name) = c else {
            return false;
        };
        cur.push(name);
        match fs::symlink_metadata(&cur) {
            Ok(meta) if meta.is_dir() => {}
            _ => return false,
        }
    }
    true
}

/// Whether this process runs in a user namespace other than the initial one (rootless
/// stagehand runs as root of its own): its uid map is then not the identity `0 0 4294967295`.
/// Read once (a process never leaves its user namespace). The supervisor has the same test;
/// this crate does not depend on it for one line of `/proc`.
pub fn in_user_namespace() -> bool {
    static IN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *IN.get_or_init(|| {
        std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
            let fields: Vec<&str> = m.split_whitespace().collect();
            !fields.is_empty() && fields != ["0", "0", "4294967295"]
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn clean_relative_strips_root_and_refuses_dotdot() {
        assert_eq!(
            clean_relative(Path::new("/etc/passwd")).unwrap(),
            Some(PathBuf::from("etc/passwd"))
        );
        assert_eq!(
            clean_relative(Path::new("./a/./b/")).unwrap(),
            Some(PathBuf::from("a/b"))
        );
        assert_eq!(clean_relative(Path::new("./")).unwrap(), None);
        assert_eq!(
            clean_relative(Path::new("a/../../x")).unwrap_err(),
            PathRefusal::ParentDir
        );
    }

    #[test]
    fn resolve_follows_inner_links_and_refuses_escapes() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("usr/lib")).unwrap();
        symlink("usr/lib", r.join("lib")).unwrap();
        symlink("/etc", r.join("abs")).unwrap();
        symlink("../..", r.join("usr/up")).unwrap();
        symlink("loop", r.join("loop")).unwrap();
        fs::write(r.join("file"), b"x").unwrap();

        assert_eq!(
            resolve_in_root(r, Path::new("lib/x"), true).unwrap(),
            r.join("usr/lib/x")
        );
        assert!(r.join("usr/lib/x").is_dir());
        assert!(matches!(
            resolve_in_root(r, Path::new("abs"), true),
            Err(ResolveError::Escapes { .. })
        ));
        assert!(matches!(
            resolve_in_root(r, Path::new("usr/up/x"), true),
            Err(ResolveError::Escapes { .. })
        ));
        assert!(matches!(
            resolve_in_root(r, Path::new("loop"), true),
            Err(ResolveError::TooManyLinks(_))
        ));
        assert!(matches!(
            resolve_in_root(r, Path::new("file/x"), true),
            Err(ResolveError::NotADirectory(_))
        ));
        assert!(matches!(
            resolve_in_root(r, Path::new("nope"), false),
            Err(ResolveError::Missing(_))
        ));
        assert!(is_real_dir_chain(r, Path::new("usr/lib")));
        assert!(!is_real_dir_chain(r, Path::new("lib")));
    }

    #[test]
    fn read_in_root_resolves_links_like_a_chroot() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("etc")).unwrap();
        fs::create_dir_all(r.join("usr/share")).unwrap();
        fs::write(r.join("usr/share/passwd"), b"image passwd").unwrap();
        symlink("/usr/share/passwd", r.join("etc/passwd")).unwrap();
        symlink("../../../../../usr/share/passwd", r.join("etc/group")).unwrap();
        symlink("/etc/hosts", r.join("etc/hostname")).unwrap();
        symlink("/etc/loop", r.join("etc/loop")).unwrap();
        assert_eq!(
            read_in_root(r, Path::new("etc/passwd")).unwrap().unwrap(),
            b"image passwd"
        );
        assert_eq!(
            read_in_root(r, Path::new("etc/group")).unwrap().unwrap(),
            b"image passwd"
        );
        // Points at /etc/hosts, which the host has and the image does not.
        assert_eq!(read_in_root(r, Path::new("etc/hostname")).unwrap(), None);
        assert!(matches!(
            read_in_root(r, Path::new("etc/loop")),
            Err(ResolveError::TooManyLinks(_))
        ));
        assert_eq!(read_in_root(r, Path::new("nope/x")).unwrap(), None);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("index.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn hashing_reader_hashes_everything() {
        let r = HashingReader::new(&b"hello"[..]);
        let (hex, len) = r.finish().unwrap();
        assert_eq!(len, 5);
        assert_eq!(hex, sha256_hex(b"hello"));
        assert_eq!(
            hex,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }
}
