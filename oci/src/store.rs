//! The content-addressed image store: an OCI image layout under one root directory.
//!
//! Owns: `blobs/sha256/<hex>` (every manifest, config and layer, named by its digest),
//! `index.json` (the names: one descriptor per name, the name in the
//! `org.opencontainers.image.ref.name` annotation as a full normalized reference such as
//! `docker.io/library/postgres:latest`), `oci-layout`, the temp dir blobs are written through,
//! the two lock files, reference resolution and `prune`.
//! Does not own: reading archives ([`crate::archive`]), unpacked layers (the `layers/` cache
//! belongs to [`crate::unpack`]; `prune` only asks it to drop unused entries), pulling from a
//! registry ([`crate::pull`], which writes through [`Store::blob_writer`] and [`Store::tag`]
//! like `load` does).
//!
//! Layout and concurrency (two `stagehand` processes may share one store):
//! - Blobs are written to `tmp/`, fsync'd, their digest checked, then renamed into
//!   `blobs/sha256/`: a blob file under its final name is always complete. Renaming over an
//!   existing blob is harmless (same content) and heals a corrupt copy.
//! - `index.json` is only replaced whole (temp file + rename) while holding an exclusive
//!   `flock` on `index.lock`, so concurrent `tag`/`remove` never lose each other's update;
//!   readers need no lock.
//! - `gc.lock` keeps `prune` from deleting blobs that a `load` has written but not named yet:
//!   writers hold it shared ([`WriteGuard`]) from their first blob until the name is in the
//!   index, `prune` holds it exclusive.
//! - Every read of a blob re-hashes it; a mismatch is [`CorruptBlob`], naming the digest.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use oci_spec::distribution::Reference;
use oci_spec::image::{
    Descriptor, Digest, DigestAlgorithm, ImageConfiguration, ImageIndex, ImageManifest, MediaType,
};
use sha2::{Digest as _, Sha256};

use crate::fsutil::{self, FileLock};

/// The annotation that carries an image's name in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// Errors of the image store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A filesystem operation on the store failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done ("create", "read", "rename"...).
        action: &'static str,
        /// The path acted on.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A blob's content does not match its digest.
    #[error(transparent)]
    Corrupt(#[from] CorruptBlob),
    /// A blob the caller asked for (or that a manifest lists) is not in the store.
    #[error("blob {digest} is missing from the image store {root}")]
    MissingBlob {
        /// The digest.
        digest: String,
        /// The store root.
        root: PathBuf,
    },
    /// A digest whose algorithm the store does not handle.
    #[error("unsupported digest {digest}: only sha256 is supported")]
    UnsupportedDigest {
        /// The digest as given.
        digest: String,
    },
    /// A reference that does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// An image id prefix that matches more than one image.
    #[error("image id prefix {prefix:?} is ambiguous: it matches {count} images")]
    Ambiguous {
        /// The prefix as given.
        prefix: String,
        /// How many images it matches.
        count: usize,
    },
    /// A blob that should be a JSON document (manifest, config, index) is not.
    #[error("{what} {digest} is not valid: {source}")]
    BadJson {
        /// "manifest", "config", "index".
        what: &'static str,
        /// The blob's digest.
        digest: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// `index.json` of the store does not parse.
    #[error("the image store index {path} is not valid: {source}")]
    BadIndex {
        /// The index file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A manifest and its config disagree, or a manifest is not an image manifest.
    #[error("image {id}: {reason}")]
    BadImage {
        /// The image (manifest digest).
        id: String,
        /// What is wrong.
        reason: String,
    },
    /// A blob was written with an expected digest and the content hashes to something else.
    #[error("blob written as {expected} hashes to {actual}: the source is corrupt or truncated")]
    DigestMismatch {
        /// The digest the writer was told to expect.
        expected: String,
        /// The digest of what was written.
        actual: String,
    },
}

impl StoreError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
        let path = path.to_path_buf();
        move |source| StoreError::Io {
            action,
            path,
            source,
        }
    }
}

/// A blob whose content does not hash to its name. Travels inside an [`io::Error`] of kind
/// `InvalidData` when it is found while streaming (see [`BlobReader`]); [`CorruptBlob::find`]
/// gets it back out.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "blob {digest} in the image store is corrupt: its content hashes to sha256:{actual} ({path}); remove the image and load it again"
)]
pub struct CorruptBlob {
    /// The digest the blob is stored under.
    pub digest: String,
    /// The hex SHA-256 of its actual content.
    pub actual: String,
    /// The blob file.
    pub path: PathBuf,
}

impl CorruptBlob {
    /// The [`CorruptBlob`] carried by an I/O error, if it is one, looking through wrappers
    /// (the `tar` crate wraps read errors in its own error type).
    pub fn find(err: &io::Error) -> Option<&CorruptBlob> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = match err.get_ref() {
            Some(e) => Some(e),
            None => None,
        };
        while let Some(e) = cur {
            if let Some(c) = e.downcast_ref::<CorruptBlob>() {
                return Some(c);
            }
            cur = match e.downcast_ref::<io::Error>() {
                Some(io) => match io.get_ref() {
                    Some(inner) => Some(inner),
                    None => None,
                },
                None => e.source(),
            };
        }
        None
    }
}

/// An image in the store: the digest of its image manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageId(Digest);

impl ImageId {
    /// Wraps a manifest digest.
    pub fn new(digest: Digest) -> ImageId {
        ImageId(digest)
    }

    /// The manifest digest.
    pub fn digest(&self) -> &Digest {
        &self.0
    }

    /// The first 12 hex digits, as `docker images` shows them.
    pub fn short(&self) -> &str {
        let hex = self.0.digest();
        &hex[..hex.len().min(12)]
    }
}

impl std::fmt::Display for ImageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

/// One name (or one unnamed image) in the store, as [`Store::list`] returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageEntry {
    /// The full normalized name (`docker.io/library/busybox:latest`), `None` for an image
    /// loaded without a name.
    pub name: Option<String>,
    /// The image.
    pub id: ImageId,
    /// Size of the manifest blob in bytes.
    pub manifest_size: u64,
}

/// One layer of an image, as [`Store::layers`] returns it (base layer first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Digest of the blob as stored (possibly compressed).
    pub digest: Digest,
    /// Digest of the uncompressed tar (`rootfs.diff_ids` of the config): the layer cache key.
    pub diff_id: Digest,
    /// Size of the stored blob.
    pub size: u64,
    /// Media type from the manifest (informational: the unpacker sniffs the compression).
    pub media_type: MediaType,
}

/// What [`Store::prune`] removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// Blobs deleted because no name reaches them.
    pub blobs_removed: usize,
    /// Their total size in bytes.
    pub bytes_freed: u64,
    /// Unpacked layers deleted from the layer cache.
    pub layers_removed: usize,
}

/// Proof that the holder keeps `prune` away: a shared lock on `gc.lock`. Hold one from the
/// first blob written until the image is named in the index (see the module docs).
#[derive(Debug)]
pub struct WriteGuard {
    _lock: FileLock,
}

/// The image store. Cheap to create; holds no open files between calls.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// The default store root: `/var/lib/stagehand` for root, otherwise
    /// `$XDG_DATA_HOME/stagehand` (or `~/.local/share/stagehand`). `None` if neither
    /// `XDG_DATA_HOME` nor `HOME` is set for a non-root user.
    pub fn default_root() -> Option<PathBuf> {
        if nix::unistd::geteuid().is_root() && !crate::fsutil::in_user_namespace() {
            return Some(PathBuf::from("/var/lib/stagehand"));
        }
        if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(xdg).join("stagehand"));
        }
        std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|home| PathBuf::from(home).join(".local/share/stagehand"))
    }

    /// Opens the store at `root`, creating the layout (directories, `oci-layout`, an empty
    /// `index.json`) if it does not exist yet.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, StoreError> {
        let store = Store { root: root.into() };
        for dir in [
            store.root.clone(),
            store.blobs_dir(),
            store.tmp_dir(),
            store.layers_dir(),
        ] {
            fs::create_dir_all(&dir).map_err(StoreError::io("create", &dir))?;
        }
        let layout = store.root.join("oci-layout");
        if !layout.exists() {
            fsutil::atomic_write(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(StoreError::io("write", &layout))?;
        }
        let index = store.index_path();
        if !index.exists() {
            let _lock = store.index_lock()?;
            if !index.exists() {
                store.write_index(&ImageIndex::default())?;
            }
        }
        Ok(store)
    }

    /// The store root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The layer cache directory, `<root>/layers` (its content belongs to [`crate::unpack`]).
    pub fn layers_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    fn blobs_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    fn index_lock(&self) -> Result<FileLock, StoreError> {
        let path = self.root.join("index.lock");
        fsutil::lock(&path, true).map_err(StoreError::io("lock", &path))
    }

    /// Takes the shared side of the gc lock: blobs written while the guard lives are safe
    /// from a concurrent [`Store::prune`]. Blocks while a prune runs.
    pub fn write_guard(&self) -> Result<WriteGuard, StoreError> {
        let path = self.root.join("gc.lock");
        let lock = fsutil::lock(&path, false).map_err(StoreError::io("lock", &path))?;
        Ok(WriteGuard { _lock: lock })
    }

    /// Path of the blob named `digest` (whether or not it exists).
    pub fn blob_path(&self, digest: &Digest) -> Result<PathBuf, StoreError> {
        Ok(self.blobs_dir().join(sha256_hex_of(digest)?))
    }

    /// Whether the blob `digest` is in the store (its content is not checked here).
    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).map(|p| p.is_file()).unwrap_or(false)
    }

    /// Opens the blob `digest` for streaming. The reader hashes what it returns and fails with
    /// [`CorruptBlob`] (inside an `InvalidData` I/O error) when it reaches the end of a blob
    /// whose content does not match the digest.
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobReader, StoreError> {
        let path = self.blob_path(digest)?;
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::MissingBlob {
                    digest: digest.to_string(),
                    root: self.root.clone(),
                });
            }
            Err(e) => return Err(StoreError::io("open", &path)(e)),
        };
        Ok(BlobReader {
            file,
            hasher: Sha256::new(),
            digest: digest.clone(),
            path,
            verified: false,
        })
    }

    /// Reads a whole blob and checks its digest.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let mut reader = self.open_blob(digest)?;
        let mut bytes = Vec::new();
        match reader.read_to_end(&mut bytes) {
            Ok(_) => Ok(bytes),
            Err(e) => match CorruptBlob::find(&e) {
                Some(c) => Err(c.clone().into()),
                None => Err(StoreError::io("read", &reader.path)(e)),
            },
        }
    }

    /// Starts writing a blob whose digest is known only at the end (a layer being tarred, a
    /// download being streamed). Finish with [`BlobWriter::commit`].
    pub fn blob_writer(&self, _guard: &WriteGuard) -> Result<BlobWriter, StoreError> {
        let tmp = self.tmp_dir().join(fsutil::unique_name("blob-"));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .map_err(StoreError::io("create", &tmp))?;
        Ok(BlobWriter {
            blobs: self.blobs_dir(),
            tmp,
            file: Some(file),
            hasher: Sha256::new(),
            len: 0,
        })
    }

    /// Copies `reader` into a blob; with `expected`, fails with
    /// [`StoreError::DigestMismatch`] (and stores nothing) if the content hashes differently.
    pub fn write_blob(
        &self,
        guard: &WriteGuard,
        reader: &mut dyn Read,
        expected: Option<&Digest>,
    ) -> Result<(Digest, u64), StoreError> {
        let mut writer = self.blob_writer(guard)?;
        let tmp = writer.tmp.clone();
        io::copy(reader, &mut writer).map_err(StoreError::io("write", &tmp))?;
        writer.commit(expected)
    }

    /// Stores `bytes` as a blob and returns its digest.
    pub fn write_blob_bytes(&self, guard: &WriteGuard, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = sha256_digest(&fsutil::sha256_hex(bytes));
        if self.has_blob(&digest) && self.read_blob(&digest).is_ok() {
            return Ok(digest);
        }
        let mut reader = bytes;
        Ok(self.write_blob(guard, &mut reader, Some(&digest))?.0)
    }

    fn read_index(&self) -> Result<ImageIndex, StoreError> {
        let path = self.index_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| StoreError::BadIndex {
                path: path.clone(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ImageIndex::default()),
            Err(e) => Err(StoreError::io("read", &path)(e)),
        }
    }

    fn write_index(&self, index: &ImageIndex) -> Result<(), StoreError> {
        let path = self.index_path();
        let bytes = serde_json::to_vec_pretty(index).map_err(|source| StoreError::BadIndex {
            path: path.clone(),
            source,
        })?;
        fsutil::atomic_write(&path, &bytes).map_err(StoreError::io("write", &path))
    }

    /// Read-modify-write of the index under the index lock.
    fn update_index<T>(
        &self,
        f: impl FnOnce(&mut Vec<Descriptor>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let _lock = self.index_lock()?;
        let mut index = self.read_index()?;
        let mut manifests = index.manifests().clone();
        let out = f(&mut manifests)?;
        index.set_manifests(manifests);
        self.write_index(&index)?;
        Ok(out)
    }

    /// Every name in the store (and every unnamed image), sorted by name.
    pub fn list(&self) -> Result<Vec<ImageEntry>, StoreError> {
        let index = self.read_index()?;
        let mut out: Vec<ImageEntry> = index
            .manifests()
            .iter()
            .map(|d| ImageEntry {
                name: ref_name(d).map(str::to_string),
                id: ImageId(d.digest().clone()),
                manifest_size: d.size(),
            })
            .collect();
        out.sort_by(|a, b| (&a.name, a.id.to_string()).cmp(&(&b.name, b.id.to_string())));
        Ok(out)
    }

    /// Finds an image by name or id, as `docker` does:
    /// a full id (`sha256:<hex>` or 64 hex digits); else a reference, normalized
    /// (`postgres` → `docker.io/library/postgres:latest`; a `@sha256:` digest pins the
    /// content and matches any stored image with that manifest digest, whatever its name);
    /// else a unique id prefix of at least 4 hex digits. `Ok(None)` when nothing matches.
    pub fn resolve(&self, image: &str) -> Result<Option<ImageId>, StoreError> {
        let index = self.read_index()?;
        let entries = index.manifests();
        if let Some(hex) = full_id(image) {
            return Ok(entries
                .iter()
                .find(|d| d.digest().digest() == hex)
                .map(|d| ImageId(d.digest().clone())));
        }
        match parse_reference(image) {
            Ok(reference) => {
                if let Some(id) = lookup(entries, &reference) {
                    return Ok(Some(id));
                }
            }
            Err(e) if !is_id_prefix(image) => return Err(e),
            Err(_) => {}
        }
        if !is_id_prefix(image) {
            return Ok(None);
        }
        let matches: HashSet<&str> = entries
            .iter()
            .map(|d| d.digest().digest())
            .filter(|hex| hex.starts_with(image))
            .collect();
        match matches.len() {
            0 => Ok(None),
            1 => Ok(entries
                .iter()
                .find(|d| d.digest().digest().starts_with(image))
                .map(|d| ImageId(d.digest().clone()))),
            count => Err(StoreError::Ambiguous {
                prefix: image.to_string(),
                count,
            }),
        }
    }

    /// Names `id` as `reference` (replacing what that name pointed to before). The manifest
    /// must already be in the store. A reference without a tag (only a digest) adds the image
    /// unnamed: digests resolve by content anyway.
    pub fn tag(&self, reference: &Reference, id: &ImageId) -> Result<(), StoreError> {
        let descriptor = self.index_descriptor(id, name_of(reference))?;
        let name = name_of(reference);
        self.update_index(|entries| {
            match &name {
                Some(name) => entries.retain(|d| ref_name(d) != Some(name.as_str())),
                None => {
                    if entries.iter().any(|d| d.digest() == id.digest()) {
                        return Ok(());
                    }
                }
            }
            entries.push(descriptor);
            Ok(())
        })
    }

    /// Keeps `id` in the store without a name (an archive entry without one), unless it is
    /// already listed.
    pub fn add_unnamed(&self, id: &ImageId) -> Result<(), StoreError> {
        let descriptor = self.index_descriptor(id, None)?;
        self.update_index(|entries| {
            if !entries.iter().any(|d| d.digest() == id.digest()) {
                entries.push(descriptor);
            }
            Ok(())
        })
    }

    fn index_descriptor(
        &self,
        id: &ImageId,
        name: Option<String>,
    ) -> Result<Descriptor, StoreError> {
        let bytes = self.read_blob(id.digest())?;
        let manifest: ImageManifest =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
                what: "manifest",
                digest: id.to_string(),
                source,
            })?;
        let media_type = manifest
            .media_type()
            .clone()
            .unwrap_or(MediaType::ImageManifest);
        let mut d = Descriptor::new(media_type, bytes.len() as u64, id.digest().clone());
        if let Some(name) = name {
            d.set_annotations(Some(
                [(REF_NAME_ANNOTATION.to_string(), name)]
                    .into_iter()
                    .collect(),
            ));
        }
        Ok(d)
    }

    /// Removes a name; given an id (full or prefix), removes every name of that image.
    /// Returns what was removed (names, or the id of an unnamed image); empty if nothing
    /// matched. Blobs stay until [`Store::prune`].
    pub fn remove(&self, image: &str) -> Result<Vec<String>, StoreError> {
        let by_name = match parse_reference(image) {
            Ok(r) if r.digest().is_none() => name_of(&r),
            _ => None,
        };
        if let Some(name) = by_name {
            let removed = self.update_index(|entries| {
                let before = entries.len();
                entries.retain(|d| ref_name(d) != Some(name.as_str()));
                Ok(before != entries.len())
            })?;
            if removed {
                return Ok(vec![name]);
            }
        }
        let Some(id) = self.resolve(image)? else {
            return Ok(Vec::new());
        };
        self.update_index(|entries| {
            let mut removed = Vec::new();
            entries.retain(|d| {
                if d.digest() == id.digest() {
                    removed.push(
                        ref_name(d)
                            .map(str::to_string)
                            .unwrap_or_else(|| id.to_string()),
                    );
                    false
                } else {
                    true
                }
            });
            Ok(removed)
        })
    }

    /// The image manifest of `id`.
    pub fn manifest(&self, id: &ImageId) -> Result<ImageManifest, StoreError> {
        let bytes = self.read_blob(id.digest())?;
        let value: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
                what: "manifest",
                digest: id.to_string(),
                source,
            })?;
        if value.get("manifests").is_some() {
            return Err(StoreError::BadImage {
                id: id.to_string(),
                reason: "is an image index, not an image manifest".into(),
            });
        }
        serde_json::from_value(value).map_err(|source| StoreError::BadJson {
            what: "manifest",
            digest: id.to_string(),
            source,
        })
    }

    /// The image configuration of `id` (entrypoint, cmd, env, user, diff_ids...).
    pub fn config(&self, id: &ImageId) -> Result<ImageConfiguration, StoreError> {
        let manifest = self.manifest(id)?;
        let digest = manifest.config().digest();
        let bytes = self.read_blob(digest)?;
        serde_json::from_slice(&bytes).map_err(|source| StoreError::BadJson {
            what: "config",
            digest: digest.to_string(),
            source,
        })
    }

    /// The layers of `id`, base layer first, each with its diff_id from the config.
    pub fn layers(&self, id: &ImageId) -> Result<Vec<Layer>, StoreError> {
        let manifest = self.manifest(id)?;
        let config = self.config(id)?;
        let diff_ids = config.rootfs().diff_ids();
        if diff_ids.len() != manifest.layers().len() {
            return Err(StoreError::BadImage {
                id: id.to_string(),
                reason: format!(
                    "the manifest lists {} layers but the config lists {} diff_ids",
                    manifest.layers().len(),
                    diff_ids.len()
                ),
            });
        }
        manifest
            .layers()
            .iter()
            .zip(diff_ids)
            .map(|(d, diff_id)| {
                let diff_id: Digest = diff_id.parse().map_err(|e| StoreError::BadImage {
                    id: id.to_string(),
                    reason: format!("invalid diff_id {diff_id:?}: {e}"),
                })?;
                sha256_hex_of(&diff_id)?;
                Ok(Layer {
                    digest: d.digest().clone(),
                    diff_id,
                    size: d.size(),
                    media_type: d.media_type().clone(),
                })
            })
            .collect()
    }

    /// Deletes every blob no name reaches, stale temp files, and unpacked layers no image
    /// uses any more (unless a mount still uses them). Waits for running writers: never call
    /// it while holding a [`WriteGuard`] yourself, that waits forever.
    pub fn prune(&self) -> Result<PruneReport, StoreError> {
        let gc = self.root.join("gc.lock");
        let _lock = fsutil::lock(&gc, true).map_err(StoreError::io("lock", &gc))?;
        let index = self.read_index()?;
        let mut keep: HashSet<String> = HashSet::new();
        let mut keep_diff_ids: HashSet<String> = HashSet::new();
        for d in index.manifests() {
            self.mark(d.digest(), &mut keep, &mut keep_diff_ids, 0);
        }

        let mut report = PruneReport::default();
        let blobs = self.blobs_dir();
        let entries = fs::read_dir(&blobs).map_err(StoreError::io("read", &blobs))?;
        for entry in entries {
            let entry = entry.map_err(StoreError::io("read", &blobs))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.contains(&name) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            let path = entry.path();
            fs::remove_file(&path).map_err(StoreError::io("remove", &path))?;
            report.blobs_removed += 1;
            report.bytes_freed += size;
        }
        // Nobody holds the write guard, so every temp file is a leftover of a crash.
        let tmp = self.tmp_dir();
        if let Ok(entries) = fs::read_dir(&tmp) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        report.layers_removed = crate::unpack::prune_layers(self, &keep_diff_ids)?;
        Ok(report)
    }

    /// Marks `digest` and everything it references as reachable. Unreadable or unknown
    /// blobs are kept but not descended into: prune must never delete on a guess.
    fn mark(
        &self,
        digest: &Digest,
        keep: &mut HashSet<String>,
        diff_ids: &mut HashSet<String>,
        depth: u32,
    ) {
        let Ok(hex) = sha256_hex_of(digest) else {
            return;
        };
        if !keep.insert(hex.to_string()) || depth > 8 {
            return;
        }
        let Ok(bytes) = self.read_blob(digest) else {
            tracing::warn!(%digest, "prune: cannot read a referenced blob; keeping it");
            return;
        };
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            return;
        };
        let digests_in = |v: Option<&serde_json::Value>| -> Vec<Digest> {
            match v {
                Some(serde_json::Value::Array(items)) => items
                    .iter()
                    .filter_map(|i| i.get("digest")?.as_str()?.parse().ok())
                    .collect(),
                Some(obj @ serde_json::Value::Object(_)) => obj
                    .get("digest")
                    .and_then(|d| d.as_str()?.parse().ok())
                    .into_iter()
                    .collect(),
                _ => Vec::new(),
            }
        };
        for child in digests_in(value.get("manifests")) {
            self.mark(&child, keep, diff_ids, depth + 1);
        }
        for layer in digests_in(value.get("layers")) {
            if let Ok(hex) = sha256_hex_of(&layer) {
                keep.insert(hex.to_string());
            }
        }
        if let Some(config) = digests_in(value.get("config")).into_iter().next() {
            if let Ok(hex) = sha256_hex_of(&config) {
                keep.insert(hex.to_string());
            }
            if let Ok(cfg) = self.read_blob(&config).and_then(|b| {
                serde_json::from_slice::<serde_json::Value>(&b).map_err(|source| {
                    StoreError::BadJson {
                        what: "config",
                        digest: config.to_string(),
                        source,
                    }
                })
            }) {
                if let Some(ids) = cfg.pointer("/rootfs/diff_ids").and_then(|v| v.as_array()) {
                    for id in ids.iter().filter_map(|v| v.as_str()) {
                        if let Some(hex) = id.strip_prefix("sha256:") {
                            diff_ids.insert(hex.to_string());
                        }
                    }
                }
            }
        }
    }
}

/// Streams a blob and checks its digest at the end (see [`Store::open_blob`]).
#[derive(Debug)]
pub struct BlobReader {
    file: File,
    hasher: Sha256,
    digest: Digest,
    path: PathBuf,
    verified: bool,
}

impl BlobReader {
    /// The digest this blob is stored under.
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Reads the rest of the blob and checks the digest: call it after a consumer (a
    /// decompressor, a tar reader) stopped before the end of the stream.
    pub fn finish(mut self) -> Result<(), StoreError> {
        match io::copy(&mut self, &mut io::sink()) {
            Ok(_) => Ok(()),
            Err(e) => match CorruptBlob::find(&e) {
                Some(c) => Err(c.clone().into()),
                None => Err(StoreError::io("read", &self.path)(e)),
            },
        }
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read(buf)?;
        if n > 0 {
            self.hasher.update(&buf[..n]);
        } else if !buf.is_empty() && !self.verified {
            let actual = format!("{:x}", self.hasher.clone().finalize());
            if actual != self.digest.digest() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    CorruptBlob {
                        digest: self.digest.to_string(),
                        actual,
                        path: self.path.clone(),
                    },
                ));
            }
            self.verified = true;
        }
        Ok(n)
    }
}

/// A blob being written; see [`Store::blob_writer`]. Dropping it without
/// [`commit`](BlobWriter::commit) deletes the temp file.
#[derive(Debug)]
pub struct BlobWriter {
    blobs: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    hasher: Sha256,
    len: u64,
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already committed"))?;
        let n = file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fsyncs the content, checks it against `expected` (if given) and moves it under its
    /// digest. Returns the digest and the size.
    pub fn commit(mut self, expected: Option<&Digest>) -> Result<(Digest, u64), StoreError> {
        let file = self.file.take().expect("commit consumes the writer");
        file.sync_all()
            .map_err(StoreError::io("fsync", &self.tmp))?;
        drop(file);
        let hex = format!("{:x}", self.hasher.clone().finalize());
        if let Some(expected) = expected {
            sha256_hex_of(expected)?;
            if expected.digest() != hex {
                let _ = fs::remove_file(&self.tmp);
                return Err(StoreError::DigestMismatch {
                    expected: expected.to_string(),
                    actual: format!("sha256:{hex}"),
                });
            }
        }
        let target = self.blobs.join(&hex);
        fs::rename(&self.tmp, &target).map_err(StoreError::io("rename", &self.tmp))?;
        fsutil::sync_dir(&self.blobs).map_err(StoreError::io("fsync", &self.blobs))?;
        Ok((sha256_digest(&hex), self.len))
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The hex part of a sha256 digest; any other algorithm is [`StoreError::UnsupportedDigest`].
pub(crate) fn sha256_hex_of(digest: &Digest) -> Result<&str, StoreError> {
    if *digest.algorithm() != DigestAlgorithm::Sha256 {
        return Err(StoreError::UnsupportedDigest {
            digest: digest.to_string(),
        });
    }
    Ok(digest.digest())
}

/// `sha256:<hex>` as a [`Digest`]; `hex` must be 64 lowercase hex digits.
pub(crate) fn sha256_digest(hex: &str) -> Digest {
    format!("sha256:{hex}")
        .parse()
        .expect("a sha256 hex string is a valid digest")
}

/// Parses and normalizes an image reference as Docker does.
pub fn parse_reference(image: &str) -> Result<Reference, StoreError> {
    Reference::try_from(image).map_err(|e| StoreError::InvalidReference {
        reference: image.to_string(),
        reason: e.to_string(),
    })
}

/// The name an image is stored under: `registry/repository:tag`, without any digest.
/// `None` for a digest-only reference.
pub fn name_of(reference: &Reference) -> Option<String> {
    reference
        .tag()
        .map(|tag| format!("{}/{}:{tag}", reference.registry(), reference.repository()))
}

fn ref_name(d: &Descriptor) -> Option<&str> {
    d.annotations()
        .as_ref()?
        .get(REF_NAME_ANNOTATION)
        .map(String::as_str)
}

fn lookup(entries: &[Descriptor], reference: &Reference) -> Option<ImageId> {
    if let Some(digest) = reference.digest() {
        return entries
            .iter()
            .find(|d| d.digest().as_ref() == digest)
            .map(|d| ImageId(d.digest().clone()));
    }
    let name = name_of(reference)?;
    entries
        .iter()
        .find(|d| ref_name(d) == Some(name.as_str()))
        .map(|d| ImageId(d.digest().clone()))
}

fn full_id(image: &str) -> Option<&str> {
    let hex = image.strip_prefix("sha256:").unwrap_or(image);
    (hex.len() == 64 && is_hex(hex)).then_some(hex)
}

fn is_id_prefix(image: &str) -> bool {
    image.len() >= 4 && image.len() <= 64 && is_hex(image)
}

fn is_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use oci_spec::image::{
        ConfigBuilder, ImageConfigurationBuilder, ImageManifestBuilder, RootFsBuilder,
    };

    /// Writes a one-layer image (layer bytes as given) and returns its id.
    pub(crate) fn put_image(store: &Store, layer: &[u8]) -> ImageId {
        let guard = store.write_guard().unwrap();
        let layer_digest = store.write_blob_bytes(&guard, layer).unwrap();
        let config = ImageConfigurationBuilder::default()
            .config(
                ConfigBuilder::default()
                    .cmd(vec!["/bin/sh".to_string()])
                    .build()
                    .unwrap(),
            )
            .rootfs(
                RootFsBuilder::default()
                    .typ("layers")
                    .diff_ids(vec![layer_digest.to_string()])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let config_digest = store.write_blob_bytes(&guard, &config_bytes).unwrap();
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_bytes.len() as u64,
                config_digest,
            ))
            .layers(vec![Descriptor::new(
                MediaType::ImageLayer,
                layer.len() as u64,
                layer_digest,
            )])
            .build()
            .unwrap();
        let bytes = serde_json::to_vec(&manifest).unwrap();
        ImageId(store.write_blob_bytes(&guard, &bytes).unwrap())
    }

    #[test]
    fn references_normalize_like_docker() {
        let name = |s: &str| name_of(&parse_reference(s).unwrap());
        assert_eq!(
            name("postgres").unwrap(),
            "docker.io/library/postgres:latest"
        );
        assert_eq!(
            name("postgres:15").unwrap(),
            "docker.io/library/postgres:15"
        );
        assert_eq!(
            name("bitnami/redis").unwrap(),
            "docker.io/bitnami/redis:latest"
        );
        assert_eq!(
            name("index.docker.io/library/x:1").unwrap(),
            "docker.io/library/x:1"
        );
        assert_eq!(name("localhost:5000/x").unwrap(), "localhost:5000/x:latest");
        assert_eq!(name("localhost/x:y").unwrap(), "localhost/x:y");
        assert_eq!(name("ghcr.io/a/b/c:v1").unwrap(), "ghcr.io/a/b/c:v1");
        let hex = "a".repeat(64);
        let pinned = parse_reference(&format!("postgres@sha256:{hex}")).unwrap();
        assert_eq!(pinned.digest(), Some(format!("sha256:{hex}").as_str()));
        assert_eq!(name_of(&pinned), None);
        assert!(matches!(
            parse_reference("Upper:case"),
            Err(StoreError::InvalidReference { .. })
        ));
    }

    #[test]
    fn open_creates_an_oci_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let root = store.root();
        assert!(root.join("blobs/sha256").is_dir());
        assert_eq!(
            fs::read_to_string(root.join("oci-layout")).unwrap(),
            r#"{"imageLayoutVersion":"1.0.0"}"#
        );
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(root.join("index.json")).unwrap()).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        assert_eq!(index["manifests"], serde_json::json!([]));
        // Opening again keeps what is there.
        let id = put_image(&store, b"layer");
        store
            .tag(&parse_reference("busybox").unwrap(), &id)
            .unwrap();
        let again = Store::open(root).unwrap();
        assert_eq!(again.list().unwrap().len(), 1);
    }

    #[test]
    fn tag_resolve_list_remove() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = put_image(&store, b"layer a");
        let b = put_image(&store, b"layer b");
        store.tag(&parse_reference("busybox").unwrap(), &a).unwrap();
        store
            .tag(&parse_reference("localhost:5000/tools:1").unwrap(), &b)
            .unwrap();

        assert_eq!(store.resolve("busybox").unwrap(), Some(a.clone()));
        assert_eq!(
            store.resolve("docker.io/library/busybox:latest").unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            store.resolve("localhost:5000/tools:1").unwrap(),
            Some(b.clone())
        );
        assert_eq!(store.resolve("localhost:5000/tools").unwrap(), None);
        assert_eq!(store.resolve(&a.to_string()).unwrap(), Some(a.clone()));
        assert_eq!(store.resolve(a.digest().digest()).unwrap(), Some(a.clone()));
        assert_eq!(
            store.resolve(&a.digest().digest()[..8]).unwrap(),
            Some(a.clone())
        );
        assert_eq!(
            store.resolve(&format!("whatever@{a}")).unwrap(),
            Some(a.clone())
        );
        assert!(store.resolve("Bad Name").is_err());

        // The index carries full names in the standard annotation.
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        let names: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["annotations"][REF_NAME_ANNOTATION].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["docker.io/library/busybox:latest", "localhost:5000/tools:1"]
        );

        // Re-tagging moves the name.
        store.tag(&parse_reference("busybox").unwrap(), &b).unwrap();
        assert_eq!(store.resolve("busybox").unwrap(), Some(b.clone()));
        assert_eq!(store.list().unwrap().len(), 2);

        assert_eq!(
            store.remove("busybox").unwrap(),
            ["docker.io/library/busybox:latest"]
        );
        assert_eq!(store.resolve("busybox").unwrap(), None);
        assert!(store.remove("busybox").unwrap().is_empty());
        assert_eq!(store.remove(b.short()).unwrap(), ["localhost:5000/tools:1"]);
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn config_and_layers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = put_image(&store, b"the layer");
        let config = store.config(&id).unwrap();
        assert_eq!(
            config.config().as_ref().unwrap().cmd().as_deref(),
            Some(&["/bin/sh".to_string()][..])
        );
        let layers = store.layers(&id).unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0].digest, layers[0].diff_id);
        assert_eq!(layers[0].size, 9);
    }

    #[test]
    fn corrupt_blob_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = put_image(&store, b"layer");
        let layer = &store.layers(&id).unwrap()[0];
        let path = store.blob_path(&layer.digest).unwrap();
        fs::write(&path, b"tampered").unwrap();
        let err = store.read_blob(&layer.digest).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Corrupt(_)), "{msg}");
        assert!(msg.contains(&layer.digest.to_string()), "{msg}");
        assert!(msg.contains("corrupt"), "{msg}");
        // Streaming readers report it at the end, findable through the io::Error.
        let mut r = store.open_blob(&layer.digest).unwrap();
        let e = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert_eq!(
            CorruptBlob::find(&e).unwrap().digest,
            layer.digest.to_string()
        );
    }

    #[test]
    fn blob_writer_checks_expected_digest_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let guard = store.write_guard().unwrap();
        let wrong = sha256_digest(&"0".repeat(64));
        let err = store
            .write_blob(&guard, &mut &b"data"[..], Some(&wrong))
            .unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.has_blob(&wrong));
        {
            let mut w = store.blob_writer(&guard).unwrap();
            w.write_all(b"abandoned").unwrap();
        }
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let (d, n) = store.write_blob(&guard, &mut &b"data"[..], None).unwrap();
        assert_eq!(n, 4);
        assert_eq!(store.read_blob(&d).unwrap(), b"data");
        let unsupported: Digest = format!("sha512:{}", "a".repeat(128)).parse().unwrap();
        assert!(matches!(
            store.blob_path(&unsupported),
            Err(StoreError::UnsupportedDigest { .. })
        ));
    }

    #[test]
    fn prune_keeps_named_images_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let kept = put_image(&store, b"kept layer");
        let gone = put_image(&store, b"gone layer");
        store.tag(&parse_reference("kept").unwrap(), &kept).unwrap();
        store.tag(&parse_reference("gone").unwrap(), &gone).unwrap();
        store.remove("gone").unwrap();
        fs::write(dir.path().join("tmp/blob-stale"), b"x").unwrap();

        let report = store.prune().unwrap();
        // gone's manifest and layer; the config is identical to kept's except for diff_ids.
        assert_eq!(report.blobs_removed, 3);
        assert!(store.layers(&kept).is_ok());
        assert!(!store.has_blob(gone.digest()));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert_eq!(store.prune().unwrap().blobs_removed, 0);
    }

    #[test]
    fn concurrent_tags_from_many_threads_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let id = put_image(&store, b"layer");
        std::thread::scope(|s| {
            for i in 0..8 {
                let store = Store::open(dir.path()).unwrap();
                let id = id.clone();
                s.spawn(move || {
                    for j in 0..5 {
                        let r = parse_reference(&format!("img{i}:{j}")).unwrap();
                        store.tag(&r, &id).unwrap();
                    }
                });
            }
        });
        assert_eq!(store.list().unwrap().len(), 40);
    }
}
