//! Per-container root filesystems: an overlayfs over the cached layers, or a copy.
//!
//! Owns, under a container directory the caller gives: `rootfs/` (the mount point, or the
//! copied tree), `upper/` and `work/` (the overlay's writable layer and its scratch dir), and
//! `lower-empty/` (the lower dir of an image without layers). Mounting, unmounting and
//! removing exactly these.
//! Does not own: the container directory itself (the caller puts `config.json` next to
//! `rootfs/` and removes the directory), the cached layers ([`crate::unpack`]), or
//! recording the mount for `gc` (the runner writes `state.json` first, using
//! [`rootfs_path`] to know the path before anything exists).
//!
//! Overlay first: `mount -t overlay -o lowerdir=<top>:...:<base>,upperdir=..,workdir=..`
//! (`Documentation/filesystems/overlayfs.rst`: the first lowerdir is the top-most). Nothing
//! is copied, starting a container costs one mount. When overlayfs is not available (EPERM
//! as a non-root user, EINVAL/ENODEV on a filesystem or kernel that cannot do it, an option
//! string longer than a page), or when a layer was unpacked without root and so keeps its
//! whiteouts as `.wh.` files, the layers are copied into `rootfs/` instead, applying the
//! whiteouts; that is said once per process, as a warning.

use std::collections::HashMap;
use std::fs::{self, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Once;

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid};

use crate::unpack::{
    self, CachedLayer, OPAQUE_MARKER, OPAQUE_XATTR, WHITEOUT_PREFIX, WhiteoutFormat,
};

/// The longest mount option string the kernel accepts (one page, including the NUL).
const MAX_MOUNT_OPTIONS: usize = 4095;

/// Errors of container root filesystems.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A directory of the container could not be created, read or removed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The overlay mount failed for a reason a copy would not fix.
    #[error("cannot mount the overlay root filesystem at {path} (options {options}): {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The option string.
        options: String,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Unmounting failed.
    #[error("cannot unmount {path}: {source}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// `remove` found the root filesystem still mounted after unmounting it.
    #[error("{path} is still mounted; not removing it")]
    StillMounted {
        /// The mount point.
        path: PathBuf,
    },
    /// Copying a layer (the fallback) failed.
    #[error("cannot copy layer {layer} to {path}: {source}")]
    Copy {
        /// The cached layer tree.
        layer: PathBuf,
        /// The path being written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RootfsError + use<> {
    let path = path.to_path_buf();
    move |source| RootfsError::Io {
        action,
        path,
        source,
    }
}

/// How a root filesystem was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootfsKind {
    /// An overlayfs mount over the cached layers.
    Overlay,
    /// A plain directory with the layers copied in.
    Copy,
}

/// A container's root filesystem at `<container dir>/rootfs`.
#[derive(Debug)]
pub struct Rootfs {
    container_dir: PathBuf,
    path: PathBuf,
    kind: RootfsKind,
}

/// Where [`Rootfs::create`] puts the root filesystem of `container_dir`: record it before
/// creating it, so `gc` can unmount it after a crash.
pub fn rootfs_path(container_dir: &Path) -> PathBuf {
    container_dir.join("rootfs")
}

impl Rootfs {
    /// Mounts an overlay of `layers` (base layer first, as [`crate::unpack::ensure_image_layers`]
    /// returns them) at `<container_dir>/rootfs`, or copies them there if overlayfs cannot be
    /// used. `container_dir` is created if missing; its `rootfs/` must not exist yet or be empty.
    pub fn create(container_dir: &Path, layers: &[CachedLayer]) -> Result<Rootfs, RootfsError> {
        Self::create_with(container_dir, layers, true)
    }

    /// Always copies (the fallback of [`Rootfs::create`]); for callers that cannot mount.
    pub fn create_copy(
        container_dir: &Path,
        layers: &[CachedLayer],
    ) -> Result<Rootfs, RootfsError> {
        Self::create_with(container_dir, layers, false)
    }

    fn create_with(
        container_dir: &Path,
        layers: &[CachedLayer],
        overlay: bool,
    ) -> Result<Rootfs, RootfsError> {
        let path = rootfs_path(container_dir);
        fs::create_dir_all(&path).map_err(io_err("create", &path))?;
        if fs::read_dir(&path)
            .map_err(io_err("read", &path))?
            .next()
            .is_some()
        {
            return Err(RootfsError::Io {
                action: "use",
                path,
                source: io::Error::from(io::ErrorKind::AlreadyExists),
            });
        }
        let rootfs = |kind| Rootfs {
            container_dir: container_dir.to_path_buf(),
            path: path.clone(),
            kind,
        };
        if overlay {
            match try_overlay(container_dir, &path, layers)? {
                Ok(()) => return Ok(rootfs(RootfsKind::Overlay)),
                Err(reason) => warn_copy_once(&reason),
            }
        }
        let privileged = nix::unistd::geteuid().is_root();
        for layer in layers {
            let mut copier = Copier {
                layer: &layer.path,
                whiteouts: layer.whiteouts,
                privileged,
                links: HashMap::new(),
            };
            copier.copy_dir(&layer.path, &path)?;
        }
        Ok(rootfs(RootfsKind::Copy))
    }

    /// The root filesystem directory (what `root.path` of the spec points at).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The container directory it lives in.
    pub fn container_dir(&self) -> &Path {
        &self.container_dir
    }

    /// How it was made.
    pub fn kind(&self) -> RootfsKind {
        self.kind
    }

    /// Unmounts the overlay (a no-op for a copy, or when already unmounted).
    pub fn unmount(&self) -> Result<(), RootfsError> {
        unmount(&self.path)
    }

    /// Unmounts and deletes `rootfs/`, `upper/`, `work/` and `lower-empty/`.
    pub fn remove(self) -> Result<(), RootfsError> {
        remove(&self.container_dir)
    }
}

/// Unmounts `path` if it is a mount point. Not mounted, or missing, is success. A busy mount
/// is detached lazily (`MNT_DETACH`): the container's processes are gone by then, a busy
/// mount means an open file somewhere, and it must not keep the layer cache pinned forever.
pub fn unmount(path: &Path) -> Result<(), RootfsError> {
    match nix::mount::umount2(path, MntFlags::empty()) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => Ok(()),
        Err(Errno::EBUSY) => match nix::mount::umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(Errno::EINVAL) => Ok(()),
            Err(source) => Err(RootfsError::Unmount {
                path: path.to_path_buf(),
                source,
            }),
        },
        // A user who may not unmount gets EPERM even for a path that is no mount point.
        Err(_) if !is_mounted(path) => Ok(()),
        Err(source) => Err(RootfsError::Unmount {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Teardown for `gc` (no [`Rootfs`] at hand): unmounts `<container_dir>/rootfs` and deletes
/// what [`Rootfs::create`] made in `container_dir`. Missing pieces are fine.
pub fn remove(container_dir: &Path) -> Result<(), RootfsError> {
    let path = rootfs_path(container_dir);
    unmount(&path)?;
    if is_mounted(&path) {
        return Err(RootfsError::StillMounted { path });
    }
    for name in ["rootfs", "upper", "work", "lower-empty"] {
        let p = container_dir.join(name);
        match unpack::remove_any(&p) {
            Ok(()) => {}
            Err(e) => return Err(io_err("remove", &p)(e)),
        }
    }
    Ok(())
}

/// Whether `path` is a mount point in this mount namespace (`/proc/self/mountinfo`, field 5;
/// `proc(5)`: spaces and backslashes in paths are octal-escaped there).
fn is_mounted(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = escape_mountinfo(path);
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mount_point| mount_point == wanted)
}

fn escape_mountinfo(path: &Path) -> String {
    let mut out = String::new();
    for &b in path.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.push_str(&format!("\\{b:03o}")),
            _ => out.push(b as char),
        }
    }
    out
}

/// Escapes a path for an overlay option: `,` separates options and `:` separates lower
/// dirs; the kernel accepts both escaped with a backslash (`ovl_next_opt`, `ovl_unescape`).
fn escape_overlay(path: &Path) -> String {
    let mut out = String::new();
    for c in path.to_string_lossy().chars() {
        if matches!(c, ',' | ':' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The overlay option string for `layers` (base first) over the given dirs.
fn overlay_options(lowers: &[PathBuf], upper: &Path, work: &Path) -> String {
    let lowerdir: Vec<String> = lowers.iter().rev().map(|p| escape_overlay(p)).collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lowerdir.join(":"),
        escape_overlay(upper),
        escape_overlay(work)
    )
}

/// Tries the overlay mount. `Ok(Err(reason))` means "use the copy instead".
fn try_overlay(
    container_dir: &Path,
    target: &Path,
    layers: &[CachedLayer],
) -> Result<Result<(), String>, RootfsError> {
    let format = layers
        .first()
        .map_or(WhiteoutFormat::Overlay, |l| l.whiteouts);
    if let Some(l) = layers
        .iter()
        .find(|l| l.whiteouts.opaque_xattr().is_none() || l.whiteouts != format)
    {
        return Ok(Err(format!(
            "layer {} was unpacked without root and keeps its whiteouts as files",
            l.diff_id
        )));
    }
    let upper = container_dir.join("upper");
    let work = container_dir.join("work");
    for dir in [&upper, &work] {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    }
    let mut lowers: Vec<PathBuf> = layers.iter().map(|l| l.path.clone()).collect();
    if lowers.is_empty() {
        let empty = container_dir.join("lower-empty");
        fs::create_dir_all(&empty).map_err(io_err("create", &empty))?;
        lowers.push(empty);
    }
    let mut options = overlay_options(&lowers, &upper, &work);
    if format == WhiteoutFormat::UserOverlay {
        // Opaque directories are marked with user.overlay.opaque (see unpack).
        options.push_str(",userxattr");
    }
    let fallback = |reason: String| -> Result<Result<(), String>, RootfsError> {
        for dir in [&upper, &work] {
            let _ = fs::remove_dir_all(dir);
        }
        Ok(Err(reason))
    };
    if options.len() > MAX_MOUNT_OPTIONS {
        return fallback(format!(
            "{} layers make an overlay option string longer than a page",
            layers.len()
        ));
    }
    match nix::mount::mount(
        Some("overlay"),
        target,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    ) {
        Ok(()) => Ok(Ok(())),
        Err(e @ (Errno::EPERM | Errno::EINVAL | Errno::ENODEV | Errno::EOPNOTSUPP)) => {
            fallback(format!("mount -t overlay failed: {e}"))
        }
        Err(source) => Err(RootfsError::Mount {
            path: target.to_path_buf(),
            options,
            source,
        }),
    }
}

fn warn_copy_once(reason: &str) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing::warn!(
            reason,
            "overlayfs cannot be used here; copying image layers into each container's root filesystem (slower)"
        );
    });
}

/// Applies one cached layer onto a plain directory, as overlayfs would show it.
struct Copier<'a> {
    layer: &'a Path,
    whiteouts: WhiteoutFormat,
    privileged: bool,
    /// (dev, ino) of a multiply-linked file in this layer → its first copy, to keep hard links.
    links: HashMap<(u64, u64), PathBuf>,
}

impl Copier<'_> {
    fn err(&self, path: &Path) -> impl FnOnce(io::Error) -> RootfsError + use<> {
        let layer = self.layer.to_path_buf();
        let path = path.to_path_buf();
        move |source| RootfsError::Copy {
            layer,
            path,
            source,
        }
    }

    /// Copies the children of `src` into `dest`, a real directory (never a symlink: every
    /// directory on the way was created or checked by this walk, so nothing is written
    /// through a link the image planted).
    fn copy_dir(&mut self, src: &Path, dest: &Path) -> Result<(), RootfsError> {
        let opaque = match self.whiteouts {
            WhiteoutFormat::Overlay | WhiteoutFormat::UserOverlay => {
                let name = self.whiteouts.opaque_xattr().unwrap_or(OPAQUE_XATTR);
                xattr::get(src, name).ok().flatten().as_deref() == Some(b"y")
            }
            WhiteoutFormat::Oci => fs::symlink_metadata(src.join(OPAQUE_MARKER)).is_ok(),
        };
        if opaque && src != self.layer {
            for entry in fs::read_dir(dest).map_err(self.err(dest))? {
                let entry = entry.map_err(self.err(dest))?;
                unpack::remove_any(&entry.path()).map_err(self.err(&entry.path()))?;
            }
        }
        let mut names: Vec<_> = fs::read_dir(src)
            .map_err(self.err(src))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()
            .map_err(self.err(src))?;
        names.sort();
        for name in names {
            let s = src.join(&name);
            let d = dest.join(&name);
            let meta = fs::symlink_metadata(&s).map_err(self.err(&s))?;
            let ft = meta.file_type();
            match self.whiteouts {
                WhiteoutFormat::Overlay | WhiteoutFormat::UserOverlay
                    if ft.is_char_device() && meta.rdev() == 0 =>
                {
                    unpack::remove_any(&d).map_err(self.err(&d))?;
                    continue;
                }
                WhiteoutFormat::Oci => {
                    if name == OPAQUE_MARKER {
                        continue;
                    }
                    if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
                        if !matches!(hidden, b"" | b"." | b"..") {
                            let hidden = dest.join(std::ffi::OsStr::from_bytes(hidden));
                            unpack::remove_any(&hidden).map_err(self.err(&hidden))?;
                        }
                        continue;
                    }
                }
                _ => {}
            }
            if ft.is_dir() {
                match fs::symlink_metadata(&d) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        unpack::remove_any(&d).map_err(self.err(&d))?;
                        fs::create_dir(&d).map_err(self.err(&d))?;
                    }
                    Err(_) => fs::create_dir(&d).map_err(self.err(&d))?,
                }
                self.copy_dir(&s, &d)?;
                self.metadata(&s, &d, &meta)?;
                continue;
            }
            unpack::remove_any(&d).map_err(self.err(&d))?;
            if ft.is_file() {
                let key = (meta.dev(), meta.ino());
                if meta.nlink() > 1 {
                    if let Some(first) = self.links.get(&key) {
                        fs::hard_link(first, &d).map_err(self.err(&d))?;
                        continue;
                    }
                    self.links.insert(key, d.clone());
                }
                fs::copy(&s, &d).map_err(self.err(&d))?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&s).map_err(self.err(&s))?;
                std::os::unix::fs::symlink(target, &d).map_err(self.err(&d))?;
            } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
                if !ft.is_fifo() && !self.privileged {
                    continue;
                }
                let kind = if ft.is_char_device() {
                    SFlag::S_IFCHR
                } else if ft.is_block_device() {
                    SFlag::S_IFBLK
                } else {
                    SFlag::S_IFIFO
                };
                nix::sys::stat::mknod(
                    &d,
                    kind,
                    Mode::from_bits_truncate(meta.mode() & 0o7777),
                    meta.rdev(),
                )
                .map_err(|e| self.err(&d)(e.into()))?;
            } else {
                continue;
            }
            self.metadata(&s, &d, &meta)?;
        }
        Ok(())
    }

    /// Owner (when privileged), mode (not for symlinks), xattrs (except overlay's own) and
    /// times of `d`, copied from `s`.
    fn metadata(&self, s: &Path, d: &Path, meta: &fs::Metadata) -> Result<(), RootfsError> {
        let is_link = meta.file_type().is_symlink();
        if self.privileged {
            nix::unistd::fchownat(
                nix::fcntl::AT_FDCWD,
                d,
                Some(Uid::from_raw(meta.uid())),
                Some(Gid::from_raw(meta.gid())),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(|e| self.err(d)(e.into()))?;
        }
        if !is_link {
            fs::set_permissions(d, Permissions::from_mode(meta.mode() & 0o7777))
                .map_err(self.err(d))?;
            if let Ok(names) = xattr::list(s) {
                for name in names {
                    if name.as_bytes().starts_with(b"trusted.overlay.") {
                        continue;
                    }
                    if let Ok(Some(value)) = xattr::get(s, &name) {
                        let _ = xattr::set(d, &name, &value);
                    }
                }
            }
        }
        unpack::set_times_nofollow(d, meta.mtime()).map_err(self.err(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::image::Digest;

    fn layer(path: &Path, whiteouts: WhiteoutFormat) -> CachedLayer {
        CachedLayer {
            diff_id: format!("sha256:{}", "0".repeat(64))
                .parse::<Digest>()
                .unwrap(),
            path: path.to_path_buf(),
            whiteouts,
        }
    }

    #[test]
    fn overlay_options_put_the_top_layer_first_and_escape() {
        let lowers = [
            PathBuf::from("/l/base"),
            PathBuf::from("/l/mid"),
            PathBuf::from("/l/a:b,c"),
        ];
        assert_eq!(
            overlay_options(&lowers, Path::new("/c/upper"), Path::new("/c/work")),
            r"lowerdir=/l/a\:b\,c:/l/mid:/l/base,upperdir=/c/upper,workdir=/c/work"
        );
        assert_eq!(escape_mountinfo(Path::new("/a b\\c")), r"/a\040b\134c");
    }

    #[test]
    fn copy_applies_layers_and_oci_whiteouts() {
        let dir = tempfile::Builder::new()
            .prefix("stagehand-test-")
            .tempdir()
            .unwrap();
        let base = dir.path().join("base");
        let top = dir.path().join("top");
        fs::create_dir_all(base.join("etc/conf.d")).unwrap();
        fs::create_dir_all(base.join("var/cache")).unwrap();
        fs::write(base.join("etc/passwd"), b"root").unwrap();
        fs::write(base.join("etc/conf.d/a"), b"a").unwrap();
        fs::write(base.join("var/cache/old"), b"old").unwrap();
        fs::write(base.join("bin"), b"file that becomes a dir").unwrap();
        std::os::unix::fs::symlink("/etc", base.join("escape")).unwrap();
        fs::create_dir_all(top.join("etc")).unwrap();
        fs::create_dir_all(top.join("var/cache")).unwrap();
        fs::create_dir_all(top.join("bin")).unwrap();
        fs::create_dir_all(top.join("escape")).unwrap();
        fs::write(top.join("etc/.wh.passwd"), b"").unwrap();
        fs::write(top.join("etc/.wh.."), b"").unwrap();
        fs::write(top.join("var/cache/.wh..wh..opq"), b"").unwrap();
        fs::write(top.join("var/cache/new"), b"new").unwrap();
        fs::write(top.join("bin/sh"), b"sh").unwrap();
        fs::write(top.join("escape/x"), b"x").unwrap();

        let container = dir.path().join("c");
        let layers = [
            layer(&base, WhiteoutFormat::Oci),
            layer(&top, WhiteoutFormat::Oci),
        ];
        let rootfs = Rootfs::create(&container, &layers).unwrap();
        assert_eq!(rootfs.kind(), RootfsKind::Copy);
        let r = rootfs.path().to_path_buf();
        assert!(!r.join("etc/passwd").exists());
        assert!(!r.join("etc/.wh.passwd").exists());
        assert_eq!(fs::read(r.join("etc/conf.d/a")).unwrap(), b"a");
        assert!(!r.join("var/cache/old").exists());
        assert_eq!(fs::read(r.join("var/cache/new")).unwrap(), b"new");
        assert_eq!(fs::read(r.join("bin/sh")).unwrap(), b"sh");
        // The symlink of the lower layer was replaced by the upper directory, not followed.
        assert!(fs::symlink_metadata(r.join("escape")).unwrap().is_dir());
        assert!(!Path::new("/etc/x").exists());
        rootfs.remove().unwrap();
        assert!(!r.exists());
        assert!(container.exists());
    }

    #[test]
    fn create_refuses_a_used_rootfs_dir() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("rootfs/x")).unwrap();
        let err = Rootfs::create_copy(dir.path(), &[]).unwrap_err();
        assert!(
            matches!(err, RootfsError::Io { action: "use", .. }),
            "{err}"
        );
    }

    #[test]
    fn unmount_and_remove_of_nothing_succeed() {
        let dir = tempfile::tempdir().unwrap();
        unmount(&dir.path().join("rootfs")).unwrap();
        remove(dir.path()).unwrap();
    }
}
