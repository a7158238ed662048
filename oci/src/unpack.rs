//! Unpacking layers: once per layer into the layer cache, safely.
//!
//! Owns: the layer cache `<store root>/layers/<diff_id hex>/` (`root/` is the unpacked tree,
//! used as an overlayfs lower directory; `done` is the marker written last, after a complete
//! and diff_id-verified unpack; `lock` serializes concurrent unpackers of the same layer,
//! also across processes), the tar extraction itself, and pruning unused cache entries.
//! Does not own: mounting ([`crate::rootfs`]) or blobs ([`crate::store`]).
//!
//! Whiteouts (image-spec `layer.md`): each layer is unpacked into its own empty directory, so
//! a whiteout cannot delete anything there; it must be *recorded* for the layers above to
//! hide what is below. As root ([`WhiteoutFormat::Overlay`]) it is recorded the way
//! overlayfs reads it: `.wh.name` becomes a 0:0 character device `name`, `.wh..wh..opq`
//! becomes the xattr `trusted.overlay.opaque=y` on its directory. Without root the tree
//! keeps the `.wh.` files ([`WhiteoutFormat::Oci`]); only the copy fallback of
//! [`crate::rootfs`] can use such a layer.
//!
//! Security: unpacking never writes outside the target directory.
//! - Member names: a leading `/` is stripped (GNU tar's default, and what every image tool
//!   does: layers are relative to the root filesystem), `.` components are dropped, and any
//!   `..` component refuses the entry. So does a whiteout naming `.` or `..`.
//! - Parents: every entry's parent is resolved component by component with `lstat`; a
//!   symlink on the way is followed only while it stays inside the target (a relative target
//!   that does not climb above it). An absolute symlink, or one that climbs out, refuses the
//!   entry with an error naming the entry, the link and the archive.
//! - The entry itself: whatever exists at its place (a file, a symlink, a directory when the
//!   entry is not one) is removed first and the new node created with `O_CREAT|O_EXCL|
//!   O_NOFOLLOW`, so a symlink planted by an earlier entry is replaced, never written through.
//! - Hard links must point at an existing non-directory inside the target.
//! - `trusted.overlay.*` xattrs from the archive are dropped: only this module writes them.
//! - Directory modes and times are applied at the end (so read-only directories can still
//!   be filled), and only if the path is still a chain of real directories.
//!
//! - Sizes: a regular file's runs of zeros (the holes of a GNU sparse entry, or zeros stored
//!   in full) are skipped with a seek instead of written, so a 10 GiB sparse entry takes the
//!   disk space of its data, not 10 GiB. The holes of sparse entries still cost reading time
//!   (the tar reader hands them out as zeros), so their apparent sizes in one layer are
//!   bounded by [`MAX_SPARSE_BYTES`].
//! - Paths: a member whose host path would reach `PATH_MAX` (4096 bytes, with the target
//!   directory in front), or with a component over `NAME_MAX` (255 bytes), is refused by name
//!   before anything is created; the kernel could not resolve it anyway. Resolved parent
//!   directories are cached for the rest of the layer (dropped whenever an entry removes
//!   something), so very deep trees and archives of many small files cost one lookup per
//!   entry rather than one `lstat` per path component.
//!
//! The checks are path-based, which is sound because nothing else writes into a target while
//! its layer lock is held.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid};
use oci_spec::image::Digest;
use serde::{Deserialize, Serialize};

use crate::compression;
use crate::fsutil::{self, HashingReader, ResolveError};
use crate::store::{self, CorruptBlob, ImageId, Layer, Store, StoreError, WriteGuard};

/// The overlayfs xattr that makes a directory opaque (hides everything below it).
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
/// The same in a user namespace, where `trusted.*` cannot be set: overlayfs reads it when
/// mounted with `userxattr` (Linux 5.11+).
pub const USER_OPAQUE_XATTR: &str = "user.overlay.opaque";
/// Prefix of an OCI whiteout file.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// The OCI opaque-directory marker file.
pub const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Largest total apparent size of the GNU sparse entries of one layer (64 GiB). Their holes
/// are read as zeros (a few GB/s), so this bounds the time a small archive can cost.
pub const MAX_SPARSE_BYTES: u64 = 64 << 30;
/// The kernel's limit on a path (`PATH_MAX`, terminating NUL included).
const PATH_MAX: usize = libc::PATH_MAX as usize;
/// The kernel's limit on one path component (`NAME_MAX`).
const NAME_MAX: usize = 255;
/// Granularity of hole detection while writing a file: a filesystem block.
const HOLE_BLOCK: usize = 4096;

/// Errors of unpacking.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    /// An entry that would write outside the target, or is otherwise refused.
    #[error("refusing entry {entry:?} of {archive}: {reason}")]
    Unsafe {
        /// The archive (a file name, or `layer sha256:...`).
        archive: String,
        /// The member name as it appears in the archive.
        entry: PathBuf,
        /// Why.
        reason: String,
    },
    /// Reading the archive failed (truncated, not a tar, bad compression).
    #[error("cannot read {archive}: {source}")]
    Read {
        /// The archive.
        archive: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Creating a node in the target failed.
    #[error("cannot unpack entry {entry:?} of {archive} to {path}: {source}")]
    Write {
        /// The archive.
        archive: String,
        /// The member name.
        entry: PathBuf,
        /// The path written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The uncompressed layer does not hash to the diff_id the image config promises.
    #[error("{archive} does not match its diff_id: expected {expected}, got sha256:{actual}")]
    DiffIdMismatch {
        /// The archive.
        archive: String,
        /// The diff_id from the config.
        expected: String,
        /// The hex digest of what was unpacked.
        actual: String,
    },
    /// Creating, locking or marking a layer cache entry failed.
    #[error("cannot {action} the layer cache entry {path}: {source}")]
    Cache {
        /// What was being done.
        action: &'static str,
        /// The cache path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The store failed (missing or corrupt blob, bad image).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How whiteouts are recorded in an unpacked layer (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhiteoutFormat {
    /// overlayfs form: 0:0 character devices and `trusted.overlay.opaque=y`. Needs root.
    Overlay,
    /// overlayfs form for a user namespace (rootless): 0:0 character devices and
    /// `user.overlay.opaque=y`, mounted with `userxattr`.
    #[serde(rename = "useroverlay")]
    UserOverlay,
    /// The archive's own `.wh.` files, kept as regular files.
    Oci,
}

impl WhiteoutFormat {
    /// The xattr marking an opaque directory, for the overlayfs forms.
    pub fn opaque_xattr(self) -> Option<&'static str> {
        match self {
            WhiteoutFormat::Overlay => Some(OPAQUE_XATTR),
            WhiteoutFormat::UserOverlay => Some(USER_OPAQUE_XATTR),
            WhiteoutFormat::Oci => None,
        }
    }
}

/// How to unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackOptions {
    /// How whiteouts are recorded.
    pub whiteouts: WhiteoutFormat,
    /// Whether to chown entries, create device nodes and set `trusted.*`/`security.*`
    /// xattrs (all need root). Without it, devices are skipped and files belong to the caller.
    pub privileged: bool,
}

impl UnpackOptions {
    /// Root gets overlay whiteouts and full ownership; root of a user namespace (rootless
    /// stagehand) the user-xattr overlay form and ownership within its id map; anyone else
    /// the unprivileged form.
    pub fn for_current_user() -> UnpackOptions {
        let root = nix::unistd::geteuid().is_root();
        if root && fsutil::in_user_namespace() {
            return UnpackOptions {
                whiteouts: WhiteoutFormat::UserOverlay,
                privileged: true,
            };
        }
        UnpackOptions {
            whiteouts: if root {
                WhiteoutFormat::Overlay
            } else {
                WhiteoutFormat::Oci
            },
            privileged: root,
        }
    }
}

/// Counts from one unpack.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnpackStats {
    /// Entries processed (not counting tar's own extension headers).
    pub entries: u64,
    /// Device nodes skipped because the unpack was not privileged.
    pub skipped_devices: u64,
    /// Extended attributes not set (not permitted, not supported, or `trusted.overlay.*`).
    pub skipped_xattrs: u64,
}

/// A layer unpacked in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedLayer {
    /// The layer's diff_id (the cache key).
    pub diff_id: Digest,
    /// The unpacked tree (an overlayfs lower directory).
    pub path: PathBuf,
    /// How its whiteouts are recorded.
    pub whiteouts: WhiteoutFormat,
}

/// The `done` marker of a cache entry.
#[derive(Debug, Serialize, Deserialize)]
struct DoneMarker {
    diff_id: String,
    blob: String,
    whiteouts: WhiteoutFormat,
    stats: UnpackStats,
}

/// Unpacks (or finds in the cache) every layer of `image`, base layer first. The guard keeps
/// a concurrent `prune` away; hold it until the layers are mounted.
pub fn ensure_image_layers(
    store: &Store,
    guard: &WriteGuard,
    image: &ImageId,
) -> Result<Vec<CachedLayer>, UnpackError> {
    store
        .layers(image)?
        .iter()
        .map(|layer| ensure_layer(store, guard, layer))
        .collect()
}

/// Unpacks one layer into the cache unless it is there already. Concurrent callers (threads
/// or processes) unpacking the same layer wait for the first one and reuse its result.
pub fn ensure_layer(
    store: &Store,
    _guard: &WriteGuard,
    layer: &Layer,
) -> Result<CachedLayer, UnpackError> {
    let hex = store::sha256_hex_of(&layer.diff_id)?.to_string();
    let dir = store.layers_dir().join(&hex);
    let done = dir.join("done");
    if let Some(cached) = read_done(&dir, &layer.diff_id)? {
        return Ok(cached);
    }
    fs::create_dir_all(&dir).map_err(cache_err("create", &dir))?;
    let lock_path = dir.join("lock");
    let _lock = fsutil::lock(&lock_path, true).map_err(cache_err("lock", &lock_path))?;
    if let Some(cached) = read_done(&dir, &layer.diff_id)? {
        return Ok(cached);
    }
    let tree = dir.join("root");
    // A tree without a marker is what a crashed unpacker left behind.
    if fs::symlink_metadata(&tree).is_ok() {
        fs::remove_dir_all(&tree).map_err(cache_err("clear", &tree))?;
    }
    fs::create_dir(&tree).map_err(cache_err("create", &tree))?;
    fs::set_permissions(&tree, Permissions::from_mode(0o755)).map_err(cache_err("chmod", &tree))?;

    let opts = UnpackOptions::for_current_user();
    let archive = format!("layer {}", layer.digest);
    let result = (|| {
        let blob = store.open_blob(&layer.digest)?;
        let mut buffered = BufReader::new(blob);
        let (stats, actual) = unpack_stream(&mut buffered, &tree, opts, &archive)?;
        buffered.into_inner().finish()?;
        if actual != layer.diff_id.digest() {
            return Err(UnpackError::DiffIdMismatch {
                archive: archive.clone(),
                expected: layer.diff_id.to_string(),
                actual,
            });
        }
        Ok(stats)
    })();
    let stats = match result {
        Ok(stats) => stats,
        Err(e) => {
            let _ = fs::remove_dir_all(&tree);
            return Err(e);
        }
    };
    if stats.skipped_devices > 0 || stats.skipped_xattrs > 0 {
        tracing::warn!(
            layer = %layer.digest,
            skipped_devices = stats.skipped_devices,
            skipped_xattrs = stats.skipped_xattrs,
            "unpacked layer without some device nodes or extended attributes (not permitted here)"
        );
    }
    let marker = DoneMarker {
        diff_id: layer.diff_id.to_string(),
        blob: layer.digest.to_string(),
        whiteouts: opts.whiteouts,
        stats,
    };
    let bytes = serde_json::to_vec_pretty(&marker).expect("the marker serializes");
    fsutil::atomic_write(&done, &bytes).map_err(cache_err("mark", &done))?;
    Ok(CachedLayer {
        diff_id: layer.diff_id.clone(),
        path: tree,
        whiteouts: opts.whiteouts,
    })
}

fn read_done(dir: &Path, diff_id: &Digest) -> Result<Option<CachedLayer>, UnpackError> {
    let done = dir.join("done");
    let bytes = match fs::read(&done) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(cache_err("read", &done)(e)),
    };
    // An unreadable marker is treated like a missing one: the layer is unpacked again.
    let Ok(marker) = serde_json::from_slice::<DoneMarker>(&bytes) else {
        return Ok(None);
    };
    Ok(Some(CachedLayer {
        diff_id: diff_id.clone(),
        path: dir.join("root"),
        whiteouts: marker.whiteouts,
    }))
}

fn cache_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UnpackError + use<> {
    let path = path.to_path_buf();
    move |source| UnpackError::Cache {
        action,
        path,
        source,
    }
}

/// Removes cache entries whose diff_id is not in `keep`, unless a mount in this mount
/// namespace still uses them or someone holds their lock. Called by [`Store::prune`] with
/// the gc lock held exclusively.
pub(crate) fn prune_layers(store: &Store, keep: &HashSet<String>) -> Result<usize, StoreError> {
    let dir = store.layers_dir();
    let Ok(entries) = fs::read_dir(&dir) else {
        return Ok(0);
    };
    let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if keep.contains(&name) || !entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            continue;
        }
        let path = entry.path();
        if mounts.contains(&*path.join("root").to_string_lossy()) {
            continue;
        }
        let lock_path = path.join("lock");
        let Ok(Some(_lock)) = fsutil::try_lock_exclusive(&lock_path) else {
            continue;
        };
        fs::remove_dir_all(&path).map_err(|source| StoreError::Io {
            action: "remove",
            path: path.clone(),
            source,
        })?;
        removed += 1;
    }
    Ok(removed)
}

/// Unpacks a (possibly gzip or zstd compressed) tar stream into `target`, which must exist.
/// `archive` names the stream in errors. Does not check any digest.
pub fn unpack(
    reader: &mut dyn io::BufRead,
    target: &Path,
    opts: UnpackOptions,
    archive: &str,
) -> Result<UnpackStats, UnpackError> {
    unpack_stream(reader, target, opts, archive).map(|(stats, _)| stats)
}

/// Like [`unpack`], also returning the hex SHA-256 of the uncompressed stream (the diff_id).
fn unpack_stream(
    reader: &mut dyn io::BufRead,
    target: &Path,
    opts: UnpackOptions,
    archive: &str,
) -> Result<(UnpackStats, String), UnpackError> {
    let decoder = compression::decoder(reader).map_err(|e| read_err(archive, e))?;
    let mut hashing = HashingReader::new(decoder);
    let mut unpacker = Unpacker {
        target,
        opts,
        archive,
        dirs: Vec::new(),
        stats: UnpackStats::default(),
        parents: HashMap::new(),
        sparse_bytes: 0,
    };
    {
        let mut tar = tar::Archive::new(&mut hashing);
        let entries = tar.entries().map_err(|e| read_err(archive, e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| read_err(archive, e))?;
            unpacker.entry(&mut entry)?;
        }
    }
    unpacker.finish_dirs();
    // The rest of the stream (end-of-archive blocks, padding) is part of the diff_id.
    let (hex, _) = hashing.finish().map_err(|e| read_err(archive, e))?;
    Ok((unpacker.stats, hex))
}

fn read_err(archive: &str, e: io::Error) -> UnpackError {
    match CorruptBlob::find(&e) {
        Some(c) => UnpackError::Store(StoreError::Corrupt(c.clone())),
        None => UnpackError::Read {
            archive: archive.to_string(),
            source: e,
        },
    }
}

/// Ownership, mode, time and xattrs of one entry, from the header and its PAX records.
struct EntryMeta {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    xattrs: Vec<(OsString, Vec<u8>)>,
}

impl EntryMeta {
    fn read<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<EntryMeta> {
        let h = entry.header();
        let id = |v: u64| {
            u32::try_from(v).map_err(|_| io::Error::other(format!("owner id {v} out of range")))
        };
        let mut meta = EntryMeta {
            mode: h.mode()? & 0o7777,
            uid: id(h.uid()?)?,
            gid: id(h.gid()?)?,
            mtime: i64::try_from(h.mtime()?).unwrap_or(0),
            xattrs: Vec::new(),
        };
        if let Some(exts) = entry.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let key = ext.key_bytes();
                let value = ext.value_bytes();
                let number = || {
                    std::str::from_utf8(value)
                        .ok()
                        .and_then(|s| s.split('.').next()?.parse::<i64>().ok())
                };
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    meta.xattrs
                        .push((OsStr::from_bytes(name).to_os_string(), value.to_vec()));
                } else if key == b"uid" {
                    meta.uid = number()
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(meta.uid);
                } else if key == b"gid" {
                    meta.gid = number()
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(meta.gid);
                } else if key == b"mtime" {
                    meta.mtime = number().unwrap_or(meta.mtime);
                }
            }
        }
        Ok(meta)
    }
}

struct Unpacker<'a> {
    target: &'a Path,
    opts: UnpackOptions,
    archive: &'a str,
    /// Directories whose mode and mtime are applied at the end: (path relative to the target,
    /// mode, mtime).
    dirs: Vec<(PathBuf, u32, i64)>,
    stats: UnpackStats,
    /// Directories resolved so far: archive-relative path -> real path under the target.
    /// Valid until an entry removes something (a removed directory or symlink may have been
    /// on the way), when it is cleared.
    parents: HashMap<PathBuf, PathBuf>,
    /// Apparent bytes of the GNU sparse entries so far (see [`MAX_SPARSE_BYTES`]).
    sparse_bytes: u64,
}

impl Unpacker<'_> {
    fn refuse(&self, entry: &Path, reason: impl std::fmt::Display) -> UnpackError {
        UnpackError::Unsafe {
            archive: self.archive.to_string(),
            entry: entry.to_path_buf(),
            reason: reason.to_string(),
        }
    }

    fn write_err<'p>(
        &self,
        entry: &'p Path,
        path: &'p Path,
    ) -> impl FnOnce(io::Error) -> UnpackError + 'p {
        let archive = self.archive.to_string();
        move |source| UnpackError::Write {
            archive,
            entry: entry.to_path_buf(),
            path: path.to_path_buf(),
            source,
        }
    }

    /// The real directory an entry's parent resolves to, created if missing.
    fn parent(
        &mut self,
        entry: &Path,
        parent_rel: &Path,
        create: bool,
    ) -> Result<PathBuf, UnpackError> {
        if let Some(found) = self.parents.get(parent_rel) {
            return Ok(found.clone());
        }
        let found =
            fsutil::resolve_in_root(self.target, parent_rel, create).map_err(|e| match e {
                ResolveError::Io(path, source) => UnpackError::Write {
                    archive: self.archive.to_string(),
                    entry: entry.to_path_buf(),
                    path: self.target.join(path),
                    source,
                },
                other => self.refuse(entry, other),
            })?;
        self.parents.insert(parent_rel.to_path_buf(), found.clone());
        Ok(found)
    }

    /// [`remove_any`], forgetting every resolved directory if something was removed.
    fn remove(&mut self, path: &Path) -> io::Result<()> {
        if remove_existing(path)? {
            self.parents.clear();
        }
        Ok(())
    }

    /// Refuses a member the kernel could not resolve once unpacked: a component longer than
    /// `NAME_MAX`, or a host path (the target in front) reaching `PATH_MAX`.
    fn check_length(&self, raw: &Path, rel: &Path) -> Result<(), UnpackError> {
        if let Some(long) = rel.iter().find(|c| c.len() > NAME_MAX) {
            return Err(self.refuse(
                raw,
                format!(
                    "a path component of {} bytes (the limit is {NAME_MAX}): {}...",
                    long.len(),
                    String::from_utf8_lossy(&long.as_bytes()[..32])
                ),
            ));
        }
        let host_len = self.target.as_os_str().len() + 1 + rel.as_os_str().len();
        if host_len >= PATH_MAX {
            return Err(self.refuse(
                raw,
                format!(
                    "its path is {} bytes deep in {} components; unpacked it would be {host_len} \
                     bytes long, over the kernel's limit of {PATH_MAX} (PATH_MAX)",
                    rel.as_os_str().len(),
                    rel.iter().count()
                ),
            ));
        }
        Ok(())
    }

    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        use tar::EntryType as T;
        let raw: PathBuf = entry
            .path()
            .map_err(|e| read_err(self.archive, e))?
            .into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            T::XGlobalHeader | T::XHeader | T::GNULongName | T::GNULongLink
        ) {
            return Ok(());
        }
        let rel = match fsutil::clean_relative(&raw) {
            Ok(Some(rel)) => rel,
            // The root directory itself: its metadata belongs to whoever mounts the tree.
            Ok(None) => return Ok(()),
            Err(reason) => return Err(self.refuse(&raw, reason)),
        };
        self.check_length(&raw, &rel)?;
        self.stats.entries += 1;
        let meta = EntryMeta::read(entry).map_err(|e| read_err(self.archive, e))?;
        let name = rel
            .file_name()
            .expect("a cleaned path ends in a name")
            .to_os_string();
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();

        if let Some(opaque_xattr) = self.opts.whiteouts.opaque_xattr() {
            if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                let parent = self.parent(&raw, &parent_rel, true)?;
                if name == OPAQUE_MARKER {
                    return xattr::set(&parent, opaque_xattr, b"y")
                        .map_err(self.write_err(&raw, &parent));
                }
                if matches!(hidden, b"" | b"." | b"..") {
                    return Err(self.refuse(&raw, "a whiteout must name an entry"));
                }
                let path = parent.join(OsStr::from_bytes(hidden));
                self.remove(&path).map_err(self.write_err(&raw, &path))?;
                return nix::sys::stat::mknod(&path, SFlag::S_IFCHR, Mode::empty(), 0)
                    .map_err(|e| self.write_err(&raw, &path)(e.into()));
            }
        }

        let parent = self.parent(&raw, &parent_rel, true)?;
        let dest = parent.join(&name);
        let archive = self.archive;
        let wr = |e: io::Error| UnpackError::Write {
            archive: archive.to_string(),
            entry: raw.clone(),
            path: dest.clone(),
            source: e,
        };
        match kind {
            T::Directory => {
                match fs::symlink_metadata(&dest) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.remove(&dest).map_err(wr)?;
                        fs::create_dir(&dest).map_err(wr)?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::create_dir(&dest).map_err(wr)?
                    }
                    Err(e) => return Err(wr(e)),
                }
                self.chown(&dest, &meta).map_err(wr)?;
                self.set_xattrs(&dest, &meta);
                let rel_dest = dest
                    .strip_prefix(self.target)
                    .unwrap_or(&dest)
                    .to_path_buf();
                self.parents.insert(rel.clone(), dest.clone());
                self.dirs.push((rel_dest, meta.mode, meta.mtime));
            }
            T::Regular | T::Continuous | T::GNUSparse => {
                if kind == T::GNUSparse {
                    self.sparse_bytes = self.sparse_bytes.saturating_add(entry.size());
                    if self.sparse_bytes > MAX_SPARSE_BYTES {
                        return Err(self.refuse(
                            &raw,
                            format!(
                                "a sparse file of {} bytes brings the layer's sparse files to \
                                 {} bytes, over the limit of {MAX_SPARSE_BYTES}",
                                entry.size(),
                                self.sparse_bytes
                            ),
                        ));
                    }
                }
                self.remove(&dest).map_err(wr)?;
                let file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(wr)?;
                if let Err(e) = copy_sparse(entry, &file) {
                    return Err(match CorruptBlob::find(&e) {
                        Some(c) => UnpackError::Store(StoreError::Corrupt(c.clone())),
                        None => wr(e),
                    });
                }
                if self.opts.privileged {
                    nix::unistd::fchown(
                        &file,
                        Some(Uid::from_raw(meta.uid)),
                        Some(Gid::from_raw(meta.gid)),
                    )
                    .map_err(|e| wr(e.into()))?;
                }
                // After chown: chown clears set-id bits and file capabilities.
                file.set_permissions(Permissions::from_mode(meta.mode))
                    .map_err(wr)?;
                self.set_xattrs(&dest, &meta);
                file.set_times(file_times(meta.mtime)).map_err(wr)?;
            }
            T::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(|e| read_err(self.archive, e))?
                    .ok_or_else(|| self.refuse(&raw, "a symlink without a target"))?
                    .into_owned();
                self.remove(&dest).map_err(wr)?;
                std::os::unix::fs::symlink(&target, &dest).map_err(wr)?;
                self.chown(&dest, &meta).map_err(wr)?;
                set_times_nofollow(&dest, meta.mtime).map_err(wr)?;
            }
            T::Link => {
                let link = entry
                    .link_name()
                    .map_err(|e| read_err(self.archive, e))?
                    .ok_or_else(|| self.refuse(&raw, "a hard link without a target"))?
                    .into_owned();
                let link_rel = match fsutil::clean_relative(&link) {
                    Ok(Some(rel)) => rel,
                    Ok(None) => return Err(self.refuse(&raw, "a hard link to the root directory")),
                    Err(reason) => {
                        return Err(self.refuse(
                            &raw,
                            format!("its link target {}: {reason}", link.display()),
                        ));
                    }
                };
                let link_parent =
                    self.parent(&raw, link_rel.parent().unwrap_or(Path::new("")), false)?;
                let source =
                    link_parent.join(link_rel.file_name().expect("a cleaned path ends in a name"));
                match fs::symlink_metadata(&source) {
                    Ok(m) if m.is_dir() => {
                        return Err(self.refuse(
                            &raw,
                            format!("hard link to the directory {}", link.display()),
                        ));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        return Err(self.refuse(
                            &raw,
                            format!("hard link target {} is not in this archive", link.display()),
                        ));
                    }
                }
                if source != dest {
                    self.remove(&dest).map_err(wr)?;
                    fs::hard_link(&source, &dest).map_err(wr)?;
                }
            }
            T::Char | T::Block | T::Fifo => {
                if kind != T::Fifo && !self.opts.privileged {
                    self.stats.skipped_devices += 1;
                    return Ok(());
                }
                let flag = match kind {
                    T::Char => SFlag::S_IFCHR,
                    T::Block => SFlag::S_IFBLK,
                    _ => SFlag::S_IFIFO,
                };
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                self.remove(&dest).map_err(wr)?;
                match nix::sys::stat::mknod(
                    &dest,
                    flag,
                    Mode::from_bits_truncate(meta.mode),
                    libc::makedev(major, minor),
                ) {
                    Ok(()) => {}
                    // A user namespace may not make devices (the runtime binds the standard
                    // ones into the container instead): skip, as without root.
                    Err(nix::errno::Errno::EPERM)
                        if kind != T::Fifo
                            && self.opts.whiteouts == WhiteoutFormat::UserOverlay =>
                    {
                        self.stats.skipped_devices += 1;
                        return Ok(());
                    }
                    Err(e) => return Err(wr(e.into())),
                }
                self.chown(&dest, &meta).map_err(wr)?;
                fs::set_permissions(&dest, Permissions::from_mode(meta.mode)).map_err(wr)?;
                self.set_xattrs(&dest, &meta);
                set_times_nofollow(&dest, meta.mtime).map_err(wr)?;
            }
            other => {
                tracing::warn!(archive = self.archive, entry = %raw.display(), kind = ?other, "skipping an unsupported tar entry type");
            }
        }
        Ok(())
    }

    /// `lchown` when privileged; a no-op otherwise (files then belong to the caller). In a
    /// user namespace an id outside its map (EINVAL) leaves the entry the caller's.
    fn chown(&self, path: &Path, meta: &EntryMeta) -> io::Result<()> {
        if !self.opts.privileged {
            return Ok(());
        }
        match nix::unistd::fchownat(
            nix::fcntl::AT_FDCWD,
            path,
            Some(Uid::from_raw(meta.uid)),
            Some(Gid::from_raw(meta.gid)),
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Err(nix::errno::Errno::EINVAL)
                if self.opts.whiteouts == WhiteoutFormat::UserOverlay =>
            {
                Ok(())
            }
            other => other.map_err(io::Error::from),
        }
    }

    /// Best effort, like GNU tar's `--xattrs`: a filesystem or a user that cannot store an
    /// attribute does not fail the unpack; it is counted and reported once per layer.
    fn set_xattrs(&mut self, path: &Path, meta: &EntryMeta) {
        for (name, value) in &meta.xattrs {
            let bytes = name.as_bytes();
            let forged =
                bytes.starts_with(b"trusted.overlay.") || bytes.starts_with(b"user.overlay.");
            let needs_root = bytes.starts_with(b"trusted.") || bytes.starts_with(b"security.");
            if forged
                || (needs_root && !self.opts.privileged)
                || xattr::set(path, name, value).is_err()
            {
                self.stats.skipped_xattrs += 1;
            }
        }
    }

    fn finish_dirs(&mut self) {
        // The tree no longer changes: each directory is checked once, not once per descendant
        // (which is quadratic in the depth of a deep tree).
        let mut real: HashMap<PathBuf, bool> = HashMap::new();
        // Deepest last-seen first, so a parent's mtime is set after its children changed it.
        for (rel, mode, mtime) in self.dirs.iter().rev() {
            if !is_real_dir_chain_memo(self.target, rel, &mut real) {
                continue;
            }
            let path = self.target.join(rel);
            let _ = fs::set_permissions(&path, Permissions::from_mode(*mode));
            let _ = set_times_nofollow(&path, *mtime);
        }
    }
}

/// Removes whatever is at `path` (never following a symlink); nothing there is fine.
pub(crate) fn remove_any(path: &Path) -> io::Result<()> {
    remove_existing(path).map(|_| ())
}

/// [`remove_any`], returning whether something was removed.
fn remove_existing(path: &Path) -> io::Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path).map(|()| true),
        Ok(_) => fs::remove_file(path).map(|()| true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// [`fsutil::is_real_dir_chain`] remembering every prefix it has looked at in `memo`, so
/// only the ancestors not seen before are checked (one `lstat` each).
fn is_real_dir_chain_memo(root: &Path, rel: &Path, memo: &mut HashMap<PathBuf, bool>) -> bool {
    // Up to the nearest ancestor already known.
    let mut unknown: Vec<&Path> = Vec::new();
    for p in rel.ancestors().filter(|p| !p.as_os_str().is_empty()) {
        match memo.get(p) {
            Some(false) => return false,
            Some(true) => break,
            None => unknown.push(p),
        }
    }
    // Then down, nearest first: each one's parent is a real directory by then.
    for p in unknown.into_iter().rev() {
        let (parent, name) = (p.parent().unwrap_or(Path::new("")), p.file_name());
        let ok = name.is_some_and(|n| fsutil::is_real_dir_chain(&root.join(parent), Path::new(n)));
        memo.insert(p.to_path_buf(), ok);
        if !ok {
            return false;
        }
    }
    true
}

/// Copies `reader` into `file` from offset 0, skipping every all-zero block with a seek
/// instead of writing it, so zeros (a sparse entry's holes) take no disk space; the file is
/// extended to its full length at the end.
fn copy_sparse(reader: &mut dyn Read, file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Write maximal runs of non-zero blocks in one call.
        let mut at = 0;
        while at < n {
            let block_end = |i: usize| (i + HOLE_BLOCK).min(n);
            if is_zero(&buf[at..block_end(at)]) {
                at = block_end(at);
                continue;
            }
            let mut end = block_end(at);
            while end < n && !is_zero(&buf[end..block_end(end)]) {
                end = block_end(end);
            }
            file.write_all_at(&buf[at..end], offset + at as u64)?;
            at = end;
        }
        offset += n as u64;
    }
    file.set_len(offset)?;
    Ok(offset)
}

/// Whether every byte of `bytes` (at most [`HOLE_BLOCK`] long) is zero. A slice comparison
/// is a `memcmp`, fast also in unoptimized builds: a 10 GiB hole is 10 GiB to check.
fn is_zero(bytes: &[u8]) -> bool {
    static ZEROS: [u8; HOLE_BLOCK] = [0; HOLE_BLOCK];
    bytes == &ZEROS[..bytes.len()]
}

fn file_times(mtime: i64) -> fs::FileTimes {
    let t = if mtime >= 0 {
        UNIX_EPOCH + Duration::from_secs(mtime as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(mtime.unsigned_abs())
    };
    fs::FileTimes::new().set_accessed(t).set_modified(t)
}

/// Sets atime and mtime of `path` itself (a symlink is not followed).
pub(crate) fn set_times_nofollow(path: &Path, mtime: i64) -> io::Result<()> {
    let ts = TimeSpec::new(mtime, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &ts,
        &ts,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    /// A raw ustar header block with any name (the `tar` crate refuses `..` and absolute
    /// names when building, which is exactly what these tests need to write).
    pub(crate) fn raw_entry(out: &mut Vec<u8>, name: &str, kind: u8, link: &str, data: &[u8]) {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        let octal = |h: &mut [u8; 512], off: usize, len: usize, v: u64| {
            let s = format!("{:0width$o}\0", v, width = len - 1);
            h[off..off + len].copy_from_slice(s.as_bytes());
        };
        octal(&mut h, 100, 8, if kind == b'5' { 0o755 } else { 0o644 });
        octal(&mut h, 108, 8, 0);
        octal(&mut h, 116, 8, 0);
        octal(&mut h, 124, 12, data.len() as u64);
        octal(&mut h, 136, 12, 0);
        h[156] = kind;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }

    pub(crate) fn end(out: &mut Vec<u8>) {
        out.extend(std::iter::repeat_n(0u8, 1024));
    }

    fn oci() -> UnpackOptions {
        UnpackOptions {
            whiteouts: WhiteoutFormat::Oci,
            privileged: false,
        }
    }

    fn run(tar: &[u8], target: &Path, opts: UnpackOptions) -> Result<UnpackStats, UnpackError> {
        unpack(&mut io::BufReader::new(tar), target, opts, "test.tar")
    }

    /// A sandbox: `outside/` must stay untouched, `target/` is unpacked into.
    fn sandbox() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::Builder::new()
            .prefix("stagehand-test-")
            .tempdir()
            .unwrap();
        let target = dir.path().join("target");
        let outside = dir.path().join("outside");
        fs::create_dir(&target).unwrap();
        fs::create_dir(&outside).unwrap();
        (dir, target, outside)
    }

    fn assert_refused(result: Result<UnpackStats, UnpackError>, entry: &str) {
        match result {
            Err(UnpackError::Unsafe {
                archive,
                entry: e,
                reason,
            }) => {
                assert_eq!(archive, "test.tar");
                assert_eq!(e, Path::new(entry), "{reason}");
                let msg = UnpackError::Unsafe {
                    archive,
                    entry: e,
                    reason,
                }
                .to_string();
                assert!(msg.contains(entry) && msg.contains("test.tar"), "{msg}");
            }
            other => panic!("expected {entry} to be refused, got {other:?}"),
        }
    }

    #[test]
    fn unpacks_files_dirs_links_modes_and_times() {
        let (_d, target, _) = sandbox();
        let header = |kind: tar::EntryType, mode: u32, mtime: u64, size: u64| {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_mtime(mtime);
            h.set_size(size);
            h.set_uid(0);
            h.set_gid(0);
            h
        };
        use tar::EntryType as T;
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(
            &mut header(T::Directory, 0o750, 1000, 0),
            "etc/",
            io::empty(),
        )
        .unwrap();
        b.append_data(
            &mut header(T::Regular, 0o640, 2000, 5),
            "./etc/hostname",
            &b"box\n\n"[..],
        )
        .unwrap();
        b.append_link(&mut header(T::Symlink, 0o777, 0, 0), "etc/link", "hostname")
            .unwrap();
        b.append_link(
            &mut header(T::Link, 0o640, 0, 0),
            "etc/hard",
            "etc/hostname",
        )
        .unwrap();
        b.append_data(&mut header(T::Fifo, 0o600, 0, 0), "run/fifo", io::empty())
            .unwrap();
        b.append_data(
            &mut header(T::Regular, 0o755, 0, 1),
            "deep/a/b/c/file",
            &b"x"[..],
        )
        .unwrap();
        let bytes = b.into_inner().unwrap();

        let stats = run(&bytes, &target, oci()).unwrap();
        assert_eq!(stats.entries, 6);
        assert_eq!(fs::read(target.join("etc/hostname")).unwrap(), b"box\n\n");
        let m = fs::metadata(target.join("etc/hostname")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o640);
        assert_eq!(m.mtime(), 2000);
        let d = fs::metadata(target.join("etc")).unwrap();
        assert_eq!((d.mode() & 0o7777, d.mtime()), (0o750, 1000));
        assert_eq!(
            fs::read_link(target.join("etc/link")).unwrap(),
            Path::new("hostname")
        );
        assert_eq!(
            fs::metadata(target.join("etc/hard")).unwrap().ino(),
            m.ino()
        );
        assert!(
            fs::symlink_metadata(target.join("run/fifo"))
                .unwrap()
                .file_type()
                .is_fifo_like()
        );
        assert_eq!(fs::read(target.join("deep/a/b/c/file")).unwrap(), b"x");
    }

    trait FifoLike {
        fn is_fifo_like(&self) -> bool;
    }
    impl FifoLike for fs::FileType {
        fn is_fifo_like(&self) -> bool {
            use std::os::unix::fs::FileTypeExt;
            self.is_fifo()
        }
    }

    #[test]
    fn refuses_dotdot_paths() {
        let (_d, target, outside) = sandbox();
        let mut t = Vec::new();
        raw_entry(&mut t, "../outside/evil", b'0', "", b"pwned");
        end(&mut t);
        assert_refused(run(&t, &target, oci()), "../outside/evil");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);

        let mut t = Vec::new();
        raw_entry(&mut t, "a/../../outside/evil", b'0', "", b"pwned");
        end(&mut t);
        assert_refused(run(&t, &target, oci()), "a/../../outside/evil");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn strips_leading_slash() {
        let (_d, target, _) = sandbox();
        let mut t = Vec::new();
        raw_entry(&mut t, "/abs/file", b'0', "", b"inside");
        end(&mut t);
        run(&t, &target, oci()).unwrap();
        assert_eq!(fs::read(target.join("abs/file")).unwrap(), b"inside");
    }

    #[test]
    fn refuses_writing_through_an_absolute_symlink() {
        let (_d, target, outside) = sandbox();
        let mut t = Vec::new();
        raw_entry(&mut t, "evil", b'2', outside.to_str().unwrap(), b"");
        raw_entry(&mut t, "evil/passwd", b'0', "", b"pwned");
        end(&mut t);
        let err = run(&t, &target, oci());
        assert_refused(err, "evil/passwd");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn refuses_writing_through_a_climbing_symlink() {
        let (_d, target, outside) = sandbox();
        let mut t = Vec::new();
        raw_entry(&mut t, "sub/", b'5', "", b"");
        raw_entry(&mut t, "sub/up", b'2', "../../outside", b"");
        raw_entry(&mut t, "sub/up/evil", b'0', "", b"pwned");
        end(&mut t);
        assert_refused(run(&t, &target, oci()), "sub/up/evil");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // A chain of two links, each harmless alone.
        let (_d, target, outside) = sandbox();
        let mut t = Vec::new();
        raw_entry(&mut t, "a", b'2', "b/..", b"");
        raw_entry(&mut t, "b", b'2', "..", b"");
        raw_entry(&mut t, "a/outside/evil", b'0', "", b"pwned");
        end(&mut t);
        assert_refused(run(&t, &target, oci()), "a/outside/evil");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    }

    #[test]
    fn follows_symlinks_that_stay_inside() {
        let (_d, target, _) = sandbox();
        let mut t = Vec::new();
        raw_entry(&mut t, "usr/lib/", b'5', "", b"");
        raw_entry(&mut t, "lib", b'2', "usr/lib", b"");
        raw_entry(&mut t, "lib/libc.so", b'0', "", b"elf");
        end(&mut t);
        run(&t, &target, oci()).unwrap();
        assert_eq!(fs::read(target.join("usr/lib/libc.so")).unwrap(), b"elf");
    }

    #[test]
    fn replaces_a_planted_symlink_instead_of_writing_through_it() {
        let (_d, target, outside) = sandbox();
        fs::write(outside.join("victim"), b"original").unwrap();
        let mut t = Vec::new();
        raw_entry(
            &mut t,
            "file",
            b'2',
            outside.join("victim").to_str().unwrap(),
            b"",
        );
        raw_entry(&mut t, "file", b'0', "", b"replaced");
        end(&mut t);
        run(&t, &target, oci()).unwrap();
        assert_eq!(fs::read(outside.join("victim")).unwrap(), b"original");
        assert_eq!(fs::read(target.join("file")).unwrap(), b"replaced");
        assert!(
            !fs::symlink_metadata(target.join("file"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn refuses_hard_links_out_of_the_archive() {
        let (_d, target, outside) = sandbox();
        fs::write(outside.join("secret"), b"s").unwrap();
        let mut t = Vec::new();
        raw_entry(&mut t, "h", b'1', "../outside/secret", b"");
        end(&mut t);
        assert_refused(run(&t, &target, oci()), "h");

        let mut t = Vec::new();
        raw_entry(
            &mut t,
            "h",
            b'1',
            outside.join("secret").to_str().unwrap(),
            b"",
        );
        end(&mut t);
        // The leading "/" is stripped: the target is looked up inside, where it does not exist.
        assert_refused(run(&t, &target, oci()), "h");

        let mut t = Vec::new();
        raw_entry(&mut t, "l", b'2', outside.to_str().unwrap(), b"");
        raw_entry(&mut t, "h", b'1', "l/secret", b"");
        end(&mut t);
        assert_refused(run(&t, &target, oci()), "h");
        assert_eq!(fs::metadata(outside.join("secret")).unwrap().nlink(), 1);
    }

    #[test]
    fn oci_whiteouts_stay_files_without_root() {
        let (_d, target, _) = sandbox();
        let mut t = Vec::new();
        raw_entry(&mut t, "etc/.wh.passwd", b'0', "", b"");
        raw_entry(&mut t, "var/.wh..wh..opq", b'0', "", b"");
        end(&mut t);
        run(&t, &target, oci()).unwrap();
        assert!(target.join("etc/.wh.passwd").is_file());
        assert!(target.join("var/.wh..wh..opq").is_file());
    }

    #[test]
    fn overlay_whiteout_naming_dotdot_is_refused() {
        let (_d, target, _) = sandbox();
        let mut t = Vec::new();
        raw_entry(&mut t, "etc/.wh...", b'0', "", b"");
        end(&mut t);
        let opts = UnpackOptions {
            whiteouts: WhiteoutFormat::Overlay,
            privileged: false,
        };
        assert_refused(run(&t, &target, opts), "etc/.wh...");
        assert!(target.exists());
    }

    /// A GNU sparse entry (type `S`) of `real_size` bytes whose data are `chunks` at their
    /// offsets (each but the last a multiple of 512 bytes long), the rest holes.
    pub(crate) fn sparse_entry(
        out: &mut Vec<u8>,
        name: &str,
        real_size: u64,
        chunks: &[(u64, &[u8])],
    ) {
        assert!(
            chunks.len() <= 3,
            "one header holds four sparse blocks, one is the end"
        );
        // Numbers in GNU base-256 (0x80, then big-endian): 10 GiB does not fit 11 octal digits.
        let base256 = |h: &mut [u8; 512], off: usize, v: u64| {
            h[off..off + 12].fill(0);
            h[off] = 0x80;
            h[off + 4..off + 12].copy_from_slice(&v.to_be_bytes());
        };
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        let stored: u64 = chunks.iter().map(|(_, d)| d.len() as u64).sum();
        base256(&mut h, 124, stored);
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'S';
        h[257..265].copy_from_slice(b"ustar  \0");
        // The last block, empty at the end, fixes where the file ends.
        let blocks = chunks
            .iter()
            .map(|(o, d)| (*o, d.len() as u64))
            .chain(std::iter::once((real_size, 0)));
        for (i, (offset, len)) in blocks.enumerate() {
            base256(&mut h, 386 + i * 24, offset);
            base256(&mut h, 386 + i * 24 + 12, len);
        }
        base256(&mut h, 483, real_size);
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|&b| b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        out.extend_from_slice(&h);
        for (_, d) in chunks {
            out.extend_from_slice(d);
        }
        out.resize(out.len().next_multiple_of(512), 0);
    }

    #[test]
    fn sparse_entries_and_runs_of_zeros_unpack_as_holes() {
        let (_d, target, _) = sandbox();
        let gib = 1u64 << 30;
        let mut t = Vec::new();
        sparse_entry(
            &mut t,
            "sparse",
            gib,
            &[(0, &[b'h'; 512][..]), (gib / 2, &b"tail"[..])],
        );
        // A plain file of zeros stored in full, with one byte at the end.
        let mut zeros = vec![0u8; 4 << 20];
        *zeros.last_mut().unwrap() = b'z';
        raw_entry(&mut t, "zeros", b'0', "", &zeros);
        end(&mut t);
        let started = std::time::Instant::now();
        run(&t, &target, oci()).unwrap();
        let m = fs::metadata(target.join("sparse")).unwrap();
        assert_eq!(m.len(), gib);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "{} bytes on disk",
            m.blocks() * 512
        );
        let mut f = File::open(target.join("sparse")).unwrap();
        let mut head = [0u8; 513];
        f.read_exact(&mut head).unwrap();
        assert_eq!((&head[..512], head[512]), (&[b'h'; 512][..], 0));
        use std::os::unix::fs::FileExt;
        let mut tail = [0u8; 4];
        f.read_exact_at(&mut tail, gib / 2).unwrap();
        assert_eq!(&tail, b"tail");
        let z = fs::metadata(target.join("zeros")).unwrap();
        assert_eq!(z.len(), 4 << 20);
        assert!(
            z.blocks() * 512 <= 64 << 10,
            "{} bytes on disk",
            z.blocks() * 512
        );
        assert_eq!(fs::read(target.join("zeros")).unwrap(), zeros);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn sparse_entries_over_the_layer_budget_are_refused_before_reading() {
        let (_d, target, _) = sandbox();
        let mut t = Vec::new();
        sparse_entry(&mut t, "small", 1 << 20, &[(0, &[1u8; 512][..])]);
        sparse_entry(&mut t, "huge", MAX_SPARSE_BYTES, &[(0, &[1u8; 512][..])]);
        end(&mut t);
        let started = std::time::Instant::now();
        assert_refused(run(&t, &target, oci()), "huge");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!target.join("huge").exists());
    }

    /// A GNU header owned by 0:0 with mtime 0, `mode` and size 0.
    fn header(mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h
    }

    /// A tar (GNU long names) of directories `a/`, `a/a/`, ... `depth` deep and a file at the
    /// bottom.
    fn deep_tar(depth: usize) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut path = String::new();
        for _ in 0..depth {
            path.push_str("a/");
            let mut h = header(0o755);
            h.set_entry_type(tar::EntryType::Directory);
            b.append_data(&mut h, &path, io::empty()).unwrap();
        }
        let mut h = header(0o644);
        h.set_size(6);
        b.append_data(&mut h, format!("{path}bottom"), &b"found\n"[..])
            .unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn deep_trees_unpack_in_linear_time_and_too_deep_ones_are_refused_by_name() {
        let (_d, target, _) = sandbox();
        let started = std::time::Instant::now();
        let stats = run(&deep_tar(1500), &target, oci()).unwrap();
        assert_eq!(stats.entries, 1501);
        let bottom = format!("{}bottom", "a/".repeat(1500));
        // Read relative to a directory half-way down: the whole path is near PATH_MAX.
        let half = target.join("a/".repeat(750));
        let rest = format!("{}bottom", "a/".repeat(750));
        let fd = File::open(&half).unwrap();
        let read = nix::fcntl::openat(
            &fd,
            rest.as_str(),
            nix::fcntl::OFlag::O_RDONLY,
            Mode::empty(),
        )
        .map(File::from)
        .and_then(|mut f| {
            let mut s = String::new();
            f.read_to_string(&mut s)
                .map_err(|_| nix::errno::Errno::EIO)?;
            Ok(s)
        });
        assert_eq!(read.as_deref(), Ok("found\n"), "{bottom}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );

        let (_d, target, _) = sandbox();
        let started = std::time::Instant::now();
        let err = run(&deep_tar(5000), &target, oci()).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, UnpackError::Unsafe { .. })
                && msg.contains("PATH_MAX")
                && msg.contains("test.tar"),
            "{msg}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );

        let (_d, target, _) = sandbox();
        let long = "n".repeat(300);
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut header(0o644), format!("dir/{long}"), io::empty())
            .unwrap();
        let err = run(&b.into_inner().unwrap(), &target, oci()).unwrap_err();
        assert!(err.to_string().contains("300 bytes"), "{err}");
        assert_refused(Err(err), &format!("dir/{long}"));
    }

    #[test]
    fn gzip_and_zstd_streams_unpack() {
        let mut t = Vec::new();
        raw_entry(&mut t, "f", b'0', "", b"data");
        end(&mut t);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&t).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&t[..], 1).unwrap();
        for bytes in [gz, zst] {
            let (_d, target, _) = sandbox();
            run(&bytes, &target, oci()).unwrap();
            assert_eq!(fs::read(target.join("f")).unwrap(), b"data");
        }
    }

    #[test]
    fn truncated_archive_is_a_read_error() {
        let (_d, target, _) = sandbox();
        let mut t = Vec::new();
        raw_entry(&mut t, "f", b'0', "", &[7u8; 2000]);
        t.truncate(1000);
        let err = run(&t, &target, oci()).unwrap_err();
        assert!(
            matches!(err, UnpackError::Read { .. } | UnpackError::Write { .. }),
            "{err}"
        );
    }

    #[test]
    fn layer_cache_unpacks_once_and_checks_diff_id() {
        let dir = tempfile::Builder::new()
            .prefix("stagehand-test-")
            .tempdir()
            .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut t = Vec::new();
        raw_entry(&mut t, "hello", b'0', "", b"world");
        end(&mut t);
        let id = crate::store::tests::put_image(&store, &t);
        let guard = store.write_guard().unwrap();
        let layers = ensure_image_layers(&store, &guard, &id).unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(fs::read(layers[0].path.join("hello")).unwrap(), b"world");
        assert!(layers[0].path.parent().unwrap().join("done").is_file());
        // A second call finds the marker and does not unpack again.
        fs::write(layers[0].path.join("hello"), b"cached").unwrap();
        let again = ensure_image_layers(&store, &guard, &id).unwrap();
        assert_eq!(fs::read(again[0].path.join("hello")).unwrap(), b"cached");
        drop(guard);

        // A layer whose content does not match the config's diff_id is refused and not cached.
        let mut layer = store.layers(&id).unwrap().remove(0);
        layer.diff_id = crate::store::sha256_digest(&"1".repeat(64));
        let guard = store.write_guard().unwrap();
        let err = ensure_layer(&store, &guard, &layer).unwrap_err();
        assert!(matches!(err, UnpackError::DiffIdMismatch { .. }), "{err}");
        assert!(
            !store
                .layers_dir()
                .join("1".repeat(64))
                .join("done")
                .exists()
        );
        drop(guard);

        // Pruning keeps cached layers of named images, drops the rest.
        store
            .tag(&crate::store::parse_reference("hello").unwrap(), &id)
            .unwrap();
        assert_eq!(store.prune().unwrap().layers_removed, 1);
        assert!(again[0].path.exists());
        store.remove("hello").unwrap();
        let report = store.prune().unwrap();
        assert_eq!(report.layers_removed, 1);
        assert!(!again[0].path.exists());
    }

    #[test]
    fn corrupt_layer_blob_is_named() {
        let dir = tempfile::Builder::new()
            .prefix("stagehand-test-")
            .tempdir()
            .unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut t = Vec::new();
        raw_entry(&mut t, "hello", b'0', "", b"world");
        end(&mut t);
        let id = crate::store::tests::put_image(&store, &t);
        let layer = store.layers(&id).unwrap().remove(0);
        let path = store.blob_path(&layer.digest).unwrap();
        let mut bytes = fs::read(&path).unwrap();
        bytes[600] ^= 1;
        fs::write(&path, bytes).unwrap();
        let guard = store.write_guard().unwrap();
        let err = ensure_layer(&store, &guard, &layer).unwrap_err();
        let msg = err.to_string();
        assert!(
            matches!(err, UnpackError::Store(StoreError::Corrupt(_))),
            "{msg}"
        );
        assert!(msg.contains(&layer.digest.to_string()), "{msg}");
    }
}
