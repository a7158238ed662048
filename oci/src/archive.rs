//! Image archives in and out of the store: `load` of the tarballs `docker save`,
//! `podman save` and `skopeo copy` write, `import` of a root filesystem as a one-layer image,
//! and `save` of store images as an oci-archive.
//!
//! Owns: recognizing the archive format (an OCI layout has `index.json`, a docker-archive
//! has `manifest.json`; Docker 25+ writes both, and the OCI side wins), turning a
//! docker-archive entry into an OCI manifest, choosing the host's platform from an image
//! index, naming what was loaded, and the deterministic layer tar writer.
//! Does not own: where blobs live or how names are stored ([`crate::store`]); unpacking
//! ([`crate::unpack`]).
//!
//! The archive is read in one pass, whatever the order of its members: every blob is
//! streamed into the store as it comes (digest-checked against its `blobs/sha256/<hex>` name
//! when it has one), the small JSON documents are kept in memory, and the images are
//! assembled at the end. The whole load holds a [`WriteGuard`] so a concurrent `prune` cannot
//! take the blobs before they are named.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, Digest, ImageConfiguration, ImageConfigurationBuilder,
    ImageIndex, ImageManifest, ImageManifestBuilder, MediaType, Os, RootFsBuilder,
};
use serde::Deserialize;

use crate::compression::{self, Compression};
use crate::fsutil;
use crate::store::{self, ImageId, REF_NAME_ANNOTATION, Store, StoreError, WriteGuard};

/// The annotation containerd, Docker 25+ and `podman save` put the full image name in.
pub const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

/// Largest JSON document (index.json, manifest.json) read from an archive into memory.
const MAX_METADATA: u64 = 64 << 20;

/// Errors of loading, importing and saving archives.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Opening or reading the archive file (or walking a root filesystem) failed.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The archive or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing an archive failed.
    #[error("cannot write {what}: {source}")]
    Write {
        /// What was being written.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The archive is neither an oci-archive nor a docker-archive, or its JSON is invalid.
    #[error("{path} is not a usable image archive: {reason}")]
    Format {
        /// The archive.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The archive refers to a blob or file it does not contain.
    #[error("{path} refers to {member}, which the archive does not contain")]
    Missing {
        /// The archive.
        path: PathBuf,
        /// The missing member or digest.
        member: String,
    },
    /// An image index has no manifest for this host's platform.
    #[error("{path}: no image for {wanted} (the archive has: {available})")]
    NoPlatform {
        /// The archive.
        path: PathBuf,
        /// The platform looked for, `linux/amd64`.
        wanted: String,
        /// What the index offers.
        available: String,
    },
    /// An imported layer was refused or could not be unpacked (a hostile entry, a read
    /// error, a full disk).
    #[error("{path}: {source}")]
    Unpack {
        /// The imported tar (or root filesystem).
        path: PathBuf,
        /// The cause, naming the entry.
        #[source]
        source: Box<crate::unpack::UnpackError>,
    },
    /// A blob in the archive does not match its digest, or the store failed.
    #[error("{path}: {source}")]
    Store {
        /// The archive (or root filesystem).
        path: PathBuf,
        /// The cause.
        #[source]
        source: StoreError,
    },
}

/// One image loaded from an archive: one entry per name (an image with two tags is listed
/// twice), or one entry with `name: None` for an image the archive does not name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The full normalized name it is stored under.
    pub name: Option<String>,
    /// The image.
    pub id: ImageId,
}

/// What an imported root filesystem image runs by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportOptions {
    /// The name to store the image under (normalized like any reference).
    pub reference: String,
    /// `Entrypoint` of the image config.
    pub entrypoint: Option<Vec<String>>,
    /// `Cmd` of the image config.
    pub cmd: Option<Vec<String>>,
    /// `Env` of the image config (`KEY=value`).
    pub env: Vec<String>,
    /// `WorkingDir` of the image config.
    pub working_dir: Option<String>,
    /// `User` of the image config.
    pub user: Option<String>,
}

/// Members read from an archive in one pass.
#[derive(Default)]
struct Members {
    /// Small JSON documents by member name.
    documents: HashMap<String, Vec<u8>>,
    /// Member name → the blob it was stored as.
    blobs: HashMap<String, (Digest, u64)>,
    /// Member name → the member it links to (symlinks and hard links, as docker-archive
    /// uses them to share layers).
    links: HashMap<String, String>,
}

impl Members {
    fn blob(&self, archive: &Path, member: &str) -> Result<(Digest, u64), ArchiveError> {
        let mut key = normalize_member(member).unwrap_or_default();
        for _ in 0..16 {
            if let Some(found) = self.blobs.get(&key) {
                return Ok(found.clone());
            }
            match self.links.get(&key) {
                Some(next) => key = next.clone(),
                None => break,
            }
        }
        Err(ArchiveError::Missing {
            path: archive.to_path_buf(),
            member: member.to_string(),
        })
    }
}

/// A member name as a plain relative path with `/` separators, or `None` if it is the root
/// or contains `..`.
fn normalize_member(name: &str) -> Option<String> {
    let clean = fsutil::clean_relative(Path::new(name)).ok()??;
    Some(clean.to_string_lossy().into_owned())
}

/// Loads every image of an oci-archive or docker-archive tarball (plain, gzip or zstd) into
/// the store and names it as the archive does. Returns what was loaded.
pub fn load(store: &Store, archive: &Path) -> Result<Vec<Loaded>, ArchiveError> {
    let read_err = |source| ArchiveError::Read {
        path: archive.to_path_buf(),
        source,
    };
    let store_err = |source| ArchiveError::Store {
        path: archive.to_path_buf(),
        source,
    };
    let file = File::open(archive).map_err(read_err)?;
    let mut buffered = BufReader::with_capacity(1 << 20, file);
    let decoder = compression::decoder(&mut buffered).map_err(read_err)?;
    let guard = store.write_guard().map_err(store_err)?;
    let members = read_members(store, &guard, archive, decoder)?;

    if members.documents.contains_key("index.json") {
        load_oci(store, archive, &members)
    } else if members.documents.contains_key("manifest.json") {
        load_docker(store, &guard, archive, &members)
    } else {
        Err(ArchiveError::Format {
            path: archive.to_path_buf(),
            reason: "it has neither index.json (oci-archive) nor manifest.json (docker-archive)"
                .into(),
        })
    }
}

fn read_members(
    store: &Store,
    guard: &WriteGuard,
    archive: &Path,
    reader: Box<dyn Read + '_>,
) -> Result<Members, ArchiveError> {
    let read_err = |source| ArchiveError::Read {
        path: archive.to_path_buf(),
        source,
    };
    let mut members = Members::default();
    let mut tar = tar::Archive::new(reader);
    for entry in tar.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let raw = entry
            .path()
            .map_err(read_err)?
            .to_string_lossy()
            .into_owned();
        let Some(name) = normalize_member(&raw) else {
            continue;
        };
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Symlink | tar::EntryType::Link => {
                let is_symlink = entry.header().entry_type() == tar::EntryType::Symlink;
                let Some(target) = entry.link_name().map_err(read_err)? else {
                    continue;
                };
                let target = target.to_string_lossy().into_owned();
                // A symlink is relative to its own directory, a hard link to the archive root.
                let joined = match (is_symlink, Path::new(&name).parent()) {
                    (true, Some(dir)) if !target.starts_with('/') => {
                        lexical_join(dir, Path::new(&target))
                    }
                    _ => normalize_member(&target),
                };
                if let Some(joined) = joined {
                    members.links.insert(name, joined);
                }
                continue;
            }
            _ => continue,
        }
        if matches!(
            name.as_str(),
            "index.json" | "manifest.json" | "oci-layout" | "repositories"
        ) {
            let mut bytes = Vec::new();
            (&mut entry)
                .take(MAX_METADATA)
                .read_to_end(&mut bytes)
                .map_err(read_err)?;
            members.documents.insert(name, bytes);
            continue;
        }
        let expected = match name.strip_prefix("blobs/") {
            Some(rest) => match rest.split_once('/') {
                Some((alg, hex)) => match format!("{alg}:{hex}").parse::<Digest>() {
                    Ok(d) => Some(d),
                    Err(_) => continue,
                },
                None => continue,
            },
            // docker-archive (legacy layout): `<id>/layer.tar`, `<id>.json` configs.
            None if name.ends_with(".tar") || name.ends_with(".json") => None,
            None => continue,
        };
        let stored = store
            .write_blob(guard, &mut entry, expected.as_ref())
            .map_err(|source| ArchiveError::Store {
                path: archive.to_path_buf(),
                source,
            })?;
        members.blobs.insert(name, stored);
    }
    Ok(members)
}

/// Joins a relative symlink target to its directory without touching the filesystem;
/// `None` if it climbs out of the archive.
fn lexical_join(dir: &Path, target: &Path) -> Option<String> {
    let mut parts: Vec<&std::ffi::OsStr> = dir.iter().collect();
    for c in target.components() {
        match c {
            std::path::Component::ParentDir => {
                parts.pop()?;
            }
            std::path::Component::Normal(n) => parts.push(n),
            _ => {}
        }
    }
    let joined: PathBuf = parts.iter().collect();
    Some(joined.to_string_lossy().into_owned())
}

fn load_oci(store: &Store, archive: &Path, members: &Members) -> Result<Vec<Loaded>, ArchiveError> {
    let format_err = |reason: String| ArchiveError::Format {
        path: archive.to_path_buf(),
        reason,
    };
    let store_err = |source| ArchiveError::Store {
        path: archive.to_path_buf(),
        source,
    };
    let index: ImageIndex = serde_json::from_slice(&members.documents["index.json"])
        .map_err(|e| format_err(format!("index.json: {e}")))?;
    let mut loaded = Vec::new();
    for descriptor in index.manifests() {
        let digest = pick_platform(store, archive, descriptor, 0)?;
        let id = ImageId::new(digest);
        check_complete(store, archive, &id)?;
        match archive_name(descriptor) {
            Some(name) => {
                let reference = store::parse_reference(&name).map_err(store_err)?;
                store.tag(&reference, &id).map_err(store_err)?;
                loaded.push(Loaded {
                    name: store::name_of(&reference),
                    id,
                });
            }
            None => {
                store.add_unnamed(&id).map_err(store_err)?;
                loaded.push(Loaded { name: None, id });
            }
        }
    }
    Ok(loaded)
}

/// The full name an OCI index entry gives its image. `org.opencontainers.image.ref.name` is
/// often only a tag (`latest`, as `skopeo copy oci:dir:latest` writes it): a bare tag names
/// no repository, so such an image is loaded unnamed.
fn archive_name(d: &Descriptor) -> Option<String> {
    let annotations = d.annotations().as_ref()?;
    if let Some(name) = annotations.get(CONTAINERD_NAME_ANNOTATION) {
        return Some(name.clone());
    }
    let name = annotations.get(REF_NAME_ANNOTATION)?;
    (name.contains('/') || name.contains(':')).then(|| name.clone())
}

fn is_index(media_type: &MediaType) -> bool {
    match media_type {
        MediaType::ImageIndex => true,
        MediaType::Other(s) => s == "application/vnd.docker.distribution.manifest.list.v2+json",
        _ => false,
    }
}

/// The image manifest `d` stands for on this host: `d` itself, or the `linux/<host arch>`
/// entry of the image index it points to.
fn pick_platform(
    store: &Store,
    archive: &Path,
    d: &Descriptor,
    depth: u32,
) -> Result<Digest, ArchiveError> {
    if !is_index(d.media_type()) {
        return Ok(d.digest().clone());
    }
    let store_err = |source| ArchiveError::Store {
        path: archive.to_path_buf(),
        source,
    };
    let bytes = store.read_blob(d.digest()).map_err(|e| match e {
        StoreError::MissingBlob { .. } => ArchiveError::Missing {
            path: archive.to_path_buf(),
            member: d.digest().to_string(),
        },
        other => store_err(other),
    })?;
    let index: ImageIndex = serde_json::from_slice(&bytes).map_err(|e| ArchiveError::Format {
        path: archive.to_path_buf(),
        reason: format!("image index {}: {e}", d.digest()),
    })?;
    let arch = Arch::default();
    let wanted = format!("linux/{arch}");
    let chosen = index.manifests().iter().find(|m| {
        m.platform()
            .as_ref()
            .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == arch)
    });
    let chosen = match chosen {
        Some(c) => c,
        None if index.manifests().len() == 1 && index.manifests()[0].platform().is_none() => {
            &index.manifests()[0]
        }
        None => {
            let available: Vec<String> = index
                .manifests()
                .iter()
                .map(|m| match m.platform() {
                    Some(p) => format!("{}/{}", p.os(), p.architecture()),
                    None => "unknown".to_string(),
                })
                .collect();
            return Err(ArchiveError::NoPlatform {
                path: archive.to_path_buf(),
                wanted,
                available: available.join(", "),
            });
        }
    };
    if depth > 4 {
        return Err(ArchiveError::Format {
            path: archive.to_path_buf(),
            reason: "image indexes nested too deep".into(),
        });
    }
    pick_platform(store, archive, chosen, depth + 1)
}

/// Every blob of the image is in the store and the manifest agrees with its config.
fn check_complete(store: &Store, archive: &Path, id: &ImageId) -> Result<(), ArchiveError> {
    let missing = |digest: &Digest| ArchiveError::Missing {
        path: archive.to_path_buf(),
        member: digest.to_string(),
    };
    let store_err = |source| ArchiveError::Store {
        path: archive.to_path_buf(),
        source,
    };
    if !store.has_blob(id.digest()) {
        return Err(missing(id.digest()));
    }
    let manifest = store.manifest(id).map_err(store_err)?;
    if !store.has_blob(manifest.config().digest()) {
        return Err(missing(manifest.config().digest()));
    }
    for layer in manifest.layers() {
        if !store.has_blob(layer.digest()) {
            return Err(missing(layer.digest()));
        }
    }
    store.layers(id).map_err(store_err)?;
    Ok(())
}

/// One entry of a docker-archive `manifest.json`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn load_docker(
    store: &Store,
    guard: &WriteGuard,
    archive: &Path,
    members: &Members,
) -> Result<Vec<Loaded>, ArchiveError> {
    let format_err = |reason: String| ArchiveError::Format {
        path: archive.to_path_buf(),
        reason,
    };
    let store_err = |source| ArchiveError::Store {
        path: archive.to_path_buf(),
        source,
    };
    let entries: Vec<DockerEntry> = serde_json::from_slice(&members.documents["manifest.json"])
        .map_err(|e| format_err(format!("manifest.json: {e}")))?;
    let mut loaded = Vec::new();
    for entry in entries {
        let (config_digest, config_size) = members.blob(archive, &entry.config)?;
        let config_bytes = store.read_blob(&config_digest).map_err(store_err)?;
        let config: ImageConfiguration = serde_json::from_slice(&config_bytes)
            .map_err(|e| format_err(format!("config {}: {e}", entry.config)))?;
        if config.rootfs().diff_ids().len() != entry.layers.len() {
            return Err(format_err(format!(
                "config {} lists {} diff_ids but manifest.json lists {} layers",
                entry.config,
                config.rootfs().diff_ids().len(),
                entry.layers.len()
            )));
        }
        let mut layers = Vec::new();
        for member in &entry.layers {
            let (digest, size) = members.blob(archive, member)?;
            let mut head = [0u8; 4];
            let mut blob = store.open_blob(&digest).map_err(store_err)?;
            let n = read_up_to(&mut blob, &mut head).map_err(|source| ArchiveError::Read {
                path: archive.to_path_buf(),
                source,
            })?;
            let media_type = Compression::from_magic(&head[..n]).layer_media_type();
            layers.push(Descriptor::new(media_type, size, digest));
        }
        let manifest = ImageManifestBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageManifest)
            .config(Descriptor::new(
                MediaType::ImageConfig,
                config_size,
                config_digest,
            ))
            .layers(layers)
            .build()
            .map_err(|e| {
                format_err(format!("cannot build a manifest for {}: {e}", entry.config))
            })?;
        let bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
        let id = ImageId::new(store.write_blob_bytes(guard, &bytes).map_err(store_err)?);
        let tags = entry.repo_tags.unwrap_or_default();
        if tags.is_empty() {
            store.add_unnamed(&id).map_err(store_err)?;
            loaded.push(Loaded { name: None, id });
            continue;
        }
        for tag in tags {
            let reference = store::parse_reference(&tag).map_err(store_err)?;
            store.tag(&reference, &id).map_err(store_err)?;
            loaded.push(Loaded {
                name: store::name_of(&reference),
                id: id.clone(),
            });
        }
    }
    Ok(loaded)
}

fn read_up_to(reader: &mut dyn Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match reader.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Makes a one-layer image from a root filesystem, given as a directory (tarred
/// deterministically, see [`write_layer_tar`]) or as a tar file (plain, gzip or zstd; stored
/// uncompressed), and names it `opts.reference`. The config carries no creation time, so
/// the same tree always gives the same image id. The layer is unpacked into the layer cache
/// before the image is named: a tar with a hostile entry (`..`, a link out of the tree, an
/// oversized sparse file) is refused here, naming the entry, and never gets a name.
pub fn import(store: &Store, source: &Path, opts: &ImportOptions) -> Result<ImageId, ArchiveError> {
    let store_err = |source_err| ArchiveError::Store {
        path: source.to_path_buf(),
        source: source_err,
    };
    let read_err = |e| ArchiveError::Read {
        path: source.to_path_buf(),
        source: e,
    };
    let reference = store::parse_reference(&opts.reference).map_err(store_err)?;
    let guard = store.write_guard().map_err(store_err)?;
    let mut writer = store.blob_writer(&guard).map_err(store_err)?;
    let meta = fs::metadata(source).map_err(read_err)?;
    if meta.is_dir() {
        write_layer_tar(source, &mut writer).map_err(read_err)?;
    } else {
        let mut buffered = BufReader::new(File::open(source).map_err(read_err)?);
        let mut decoder = compression::decoder(&mut buffered).map_err(read_err)?;
        io::copy(&mut decoder, &mut writer).map_err(read_err)?;
    }
    // The layer is stored uncompressed: its digest is its diff_id.
    let (layer_digest, layer_size) = writer.commit(None).map_err(store_err)?;

    let mut config = ConfigBuilder::default();
    if !opts.env.is_empty() {
        config = config.env(opts.env.clone());
    }
    if let Some(entrypoint) = &opts.entrypoint {
        config = config.entrypoint(entrypoint.clone());
    }
    if let Some(cmd) = &opts.cmd {
        config = config.cmd(cmd.clone());
    }
    if let Some(dir) = &opts.working_dir {
        config = config.working_dir(dir.clone());
    }
    if let Some(user) = &opts.user {
        config = config.user(user.clone());
    }
    let build_err = |e: oci_spec::OciSpecError| ArchiveError::Format {
        path: source.to_path_buf(),
        reason: format!("cannot build the image: {e}"),
    };
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::default())
        .os(Os::Linux)
        .config(config.build().map_err(build_err)?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![layer_digest.to_string()])
                .build()
                .map_err(build_err)?,
        )
        .build()
        .map_err(build_err)?;
    let config_bytes = serde_json::to_vec(&config).expect("a config serializes");
    let config_digest = store
        .write_blob_bytes(&guard, &config_bytes)
        .map_err(store_err)?;
    let manifest: ImageManifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(Descriptor::new(
            MediaType::ImageConfig,
            config_bytes.len() as u64,
            config_digest,
        ))
        .layers(vec![Descriptor::new(
            MediaType::ImageLayer,
            layer_size,
            layer_digest,
        )])
        .build()
        .map_err(build_err)?;
    let manifest_bytes = serde_json::to_vec(&manifest).expect("a manifest serializes");
    let id = ImageId::new(
        store
            .write_blob_bytes(&guard, &manifest_bytes)
            .map_err(store_err)?,
    );
    // Like `stagehand image load`: a hostile tar is refused now rather than when a stage first
    // uses the image, and that first start then finds the layer unpacked. The blobs of a
    // refused import are unnamed: the next prune takes them.
    crate::unpack::ensure_image_layers(store, &guard, &id).map_err(|e| ArchiveError::Unpack {
        path: source.to_path_buf(),
        source: Box::new(e),
    })?;
    store.tag(&reference, &id).map_err(store_err)?;
    Ok(id)
}

/// Writes `dir` as an uncompressed layer tar, reproducibly: entries in byte order of their
/// names, every mtime 0, numeric owners and modes kept (no user or group names), extended
/// attributes as PAX `SCHILY.xattr.*` records, hard links as links to the first path seen.
/// The directory itself is not an entry. Sockets are skipped (they cannot be archived).
pub fn write_layer_tar(dir: &Path, out: &mut dyn Write) -> io::Result<()> {
    let mut builder = tar::Builder::new(out);
    builder.follow_symlinks(false);
    let mut first_paths: HashMap<(u64, u64), PathBuf> = HashMap::new();
    walk_tar(dir, Path::new(""), &mut builder, &mut first_paths)?;
    builder.into_inner()?.flush()
}

fn walk_tar(
    root: &Path,
    rel: &Path,
    builder: &mut tar::Builder<&mut dyn Write>,
    first_paths: &mut HashMap<(u64, u64), PathBuf>,
) -> io::Result<()> {
    let mut names: Vec<std::ffi::OsString> = fs::read_dir(root.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    names.sort();
    for name in names {
        let rel_path = rel.join(&name);
        let full = root.join(&rel_path);
        let meta = fs::symlink_metadata(&full)?;
        let ft = meta.file_type();
        if ft.is_socket() {
            tracing::warn!(path = %full.display(), "skipping a socket while tarring a root filesystem");
            continue;
        }
        let xattrs: BTreeMap<Vec<u8>, Vec<u8>> = match xattr::list(&full) {
            Ok(names) => names
                .filter_map(|n| {
                    let value = xattr::get(&full, &n).ok()??;
                    Some((n.as_bytes().to_vec(), value))
                })
                .collect(),
            Err(_) => BTreeMap::new(),
        };
        if !xattrs.is_empty() {
            let records: Vec<(Vec<u8>, Vec<u8>)> = xattrs
                .into_iter()
                .map(|(k, v)| ([b"SCHILY.xattr.".as_slice(), &k].concat(), v))
                .collect();
            append_pax(builder, &records)?;
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(meta.mode() & 0o7777);
        h.set_uid(u64::from(meta.uid()));
        h.set_gid(u64::from(meta.gid()));
        h.set_mtime(0);
        h.set_size(0);
        if ft.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            builder.append_data(&mut h, &rel_path, io::empty())?;
            walk_tar(root, &rel_path, builder, first_paths)?;
        } else if ft.is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            builder.append_link(&mut h, &rel_path, fs::read_link(&full)?)?;
        } else if ft.is_file() {
            let key = (meta.dev(), meta.ino());
            if meta.nlink() > 1 {
                if let Some(first) = first_paths.get(&key) {
                    h.set_entry_type(tar::EntryType::Link);
                    builder.append_link(&mut h, &rel_path, first)?;
                    continue;
                }
                first_paths.insert(key, rel_path.clone());
            }
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.len());
            builder.append_data(&mut h, &rel_path, File::open(&full)?)?;
        } else if ft.is_char_device() || ft.is_block_device() || ft.is_fifo() {
            h.set_entry_type(if ft.is_char_device() {
                tar::EntryType::Char
            } else if ft.is_block_device() {
                tar::EntryType::Block
            } else {
                tar::EntryType::Fifo
            });
            let rdev = meta.rdev();
            h.set_device_major(libc::major(rdev))?;
            h.set_device_minor(libc::minor(rdev))?;
            builder.append_data(&mut h, &rel_path, io::empty())?;
        }
    }
    Ok(())
}

/// Appends a PAX extended header (`x` entry) carrying `records` for the next entry
/// (POSIX.1-2001 `pax` format: each record is `"<len> <key>=<value>\n"`, `<len>` counting
/// the whole record including its own digits).
fn append_pax(
    builder: &mut tar::Builder<&mut dyn Write>,
    records: &[(Vec<u8>, Vec<u8>)],
) -> io::Result<()> {
    let mut data = Vec::new();
    for (key, value) in records {
        let body = key.len() + value.len() + 3; // ' ', '=', '\n'
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        data.extend_from_slice(len.to_string().as_bytes());
        data.push(b' ');
        data.extend_from_slice(key);
        data.push(b'=');
        data.extend_from_slice(value);
        data.push(b'\n');
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(data.len() as u64);
    builder.append_data(&mut h, "PaxHeader", &data[..])
}

/// Writes store images as an oci-archive (what `skopeo copy ... oci-archive:` and
/// `podman save --format oci-archive` write): `oci-layout`, `index.json` with each image's
/// full name in `org.opencontainers.image.ref.name` and `io.containerd.image.name`, and
/// the blobs, all with mtime 0. `images` are names or ids as [`Store::resolve`] takes them.
pub fn save(store: &Store, images: &[&str], out: &mut dyn Write) -> Result<(), ArchiveError> {
    let store_err = |source| ArchiveError::Store {
        path: store.root().to_path_buf(),
        source,
    };
    let write_err = |source| ArchiveError::Write {
        what: "the oci-archive".into(),
        source,
    };
    let names: std::collections::HashSet<String> = store
        .list()
        .map_err(store_err)?
        .into_iter()
        .filter_map(|e| e.name)
        .collect();
    let mut descriptors = Vec::new();
    let mut blobs: Vec<Digest> = Vec::new();
    for image in images {
        let id = store
            .resolve(image)
            .map_err(store_err)?
            .ok_or_else(|| ArchiveError::Missing {
                path: store.root().to_path_buf(),
                member: image.to_string(),
            })?;
        let manifest = store.manifest(&id).map_err(store_err)?;
        let manifest_size = store.read_blob(id.digest()).map_err(store_err)?.len() as u64;
        let mut d = Descriptor::new(MediaType::ImageManifest, manifest_size, id.digest().clone());
        // Only a name that is in the store names the image (an id given as `abcd` parses
        // as a reference too).
        let name = store::parse_reference(image)
            .ok()
            .and_then(|r| store::name_of(&r))
            .filter(|n| names.contains(n));
        if let Some(name) = name {
            d.set_annotations(Some(
                [
                    (REF_NAME_ANNOTATION.to_string(), name.clone()),
                    (CONTAINERD_NAME_ANNOTATION.to_string(), name),
                ]
                .into_iter()
                .collect(),
            ));
        }
        descriptors.push(d);
        for digest in std::iter::once(id.digest())
            .chain(std::iter::once(manifest.config().digest()))
            .chain(manifest.layers().iter().map(|l| l.digest()))
        {
            if !blobs.contains(digest) {
                blobs.push(digest.clone());
            }
        }
    }
    let mut index = ImageIndex::default();
    index.set_media_type(Some(MediaType::ImageIndex));
    index.set_manifests(descriptors);
    let index_bytes = serde_json::to_vec(&index).expect("an index serializes");

    let mut builder = tar::Builder::new(out);
    let file_header = |size: u64, kind: tar::EntryType| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(if kind == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(size);
        h
    };
    let layout = br#"{"imageLayoutVersion":"1.0.0"}"#;
    builder
        .append_data(
            &mut file_header(layout.len() as u64, tar::EntryType::Regular),
            "oci-layout",
            &layout[..],
        )
        .map_err(write_err)?;
    builder
        .append_data(
            &mut file_header(index_bytes.len() as u64, tar::EntryType::Regular),
            "index.json",
            &index_bytes[..],
        )
        .map_err(write_err)?;
    for dir in ["blobs/", "blobs/sha256/"] {
        builder
            .append_data(
                &mut file_header(0, tar::EntryType::Directory),
                dir,
                io::empty(),
            )
            .map_err(write_err)?;
    }
    for digest in blobs {
        let path = store.blob_path(&digest).map_err(store_err)?;
        let size = fs::metadata(&path)
            .map_err(|source| ArchiveError::Read {
                path: path.clone(),
                source,
            })?
            .len();
        let reader = store.open_blob(&digest).map_err(store_err)?;
        let name = format!("blobs/sha256/{}", digest.digest());
        builder
            .append_data(
                &mut file_header(size, tar::EntryType::Regular),
                &name,
                reader,
            )
            .map_err(|e| match store::CorruptBlob::find(&e) {
                Some(c) => store_err(StoreError::Corrupt(c.clone())),
                None => write_err(e),
            })?;
    }
    builder
        .into_inner()
        .map_err(write_err)?
        .flush()
        .map_err(write_err)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::unpack::{self, UnpackOptions, WhiteoutFormat};
    use std::os::unix::fs::symlink;

    fn rootfs(dir: &Path) {
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("etc")).unwrap();
        fs::write(dir.join("bin/tool"), b"#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(dir.join("bin/tool"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("etc/passwd"), b"root:x:0:0:root:/root:/bin/sh\n").unwrap();
        symlink("tool", dir.join("bin/sh")).unwrap();
        fs::hard_link(dir.join("bin/tool"), dir.join("bin/tool2")).unwrap();
    }
    use std::os::unix::fs::PermissionsExt;

    fn import_opts(reference: &str) -> ImportOptions {
        ImportOptions {
            reference: reference.into(),
            cmd: Some(vec!["/bin/sh".into()]),
            env: vec!["PATH=/bin".into()],
            ..Default::default()
        }
    }

    #[test]
    fn layer_tar_is_deterministic_and_sorted() {
        let dir = tempfile::tempdir().unwrap();
        rootfs(dir.path());
        let mut a = Vec::new();
        write_layer_tar(dir.path(), &mut a).unwrap();
        // Touching times does not change the tar.
        unpack::set_times_nofollow(&dir.path().join("etc/passwd"), 12345).unwrap();
        let mut b = Vec::new();
        write_layer_tar(dir.path(), &mut b).unwrap();
        assert_eq!(a, b);

        let mut ar = tar::Archive::new(&a[..]);
        let entries: Vec<(String, tar::EntryType, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    e.header().entry_type(),
                    e.header().mtime().unwrap(),
                )
            })
            .collect();
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "bin/tool",
                "bin/tool2",
                "etc",
                "etc/passwd"
            ]
        );
        assert!(entries.iter().all(|e| e.2 == 0));
        assert_eq!(entries[1].1, tar::EntryType::Symlink);
        assert_eq!(entries[3].1, tar::EntryType::Link);
    }

    #[test]
    fn pax_records_carry_xattrs() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), b"x").unwrap();
        if xattr::set(dir.path().join("f"), "user.stagehand", b"v1").is_err() {
            // tmpfs without user xattrs: nothing to check on this filesystem.
            return;
        }
        let mut t = Vec::new();
        write_layer_tar(dir.path(), &mut t).unwrap();
        let mut ar = tar::Archive::new(&t[..]);
        let mut entries = ar.entries().unwrap();
        let mut e = entries.next().unwrap().unwrap();
        let exts: Vec<(String, Vec<u8>)> = e
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|x| {
                let x = x.unwrap();
                (x.key().unwrap().to_string(), x.value_bytes().to_vec())
            })
            .collect();
        assert_eq!(
            exts,
            [("SCHILY.xattr.user.stagehand".to_string(), b"v1".to_vec())]
        );
        let out = tempfile::tempdir().unwrap();
        let opts = UnpackOptions {
            whiteouts: WhiteoutFormat::Oci,
            privileged: false,
        };
        unpack::unpack(&mut &t[..], out.path(), opts, "t").unwrap();
        assert_eq!(
            xattr::get(out.path().join("f"), "user.stagehand")
                .unwrap()
                .unwrap(),
            b"v1"
        );
    }

    #[test]
    fn import_dir_and_tar_give_the_same_image() {
        let dir = tempfile::tempdir().unwrap();
        let fs_dir = dir.path().join("rootfs");
        rootfs(&fs_dir);
        let store = Store::open(dir.path().join("store")).unwrap();
        let id = import(&store, &fs_dir, &import_opts("lab/tool:1")).unwrap();
        assert_eq!(
            store.resolve("docker.io/lab/tool:1").unwrap(),
            Some(id.clone())
        );
        let config = store.config(&id).unwrap();
        let c = config.config().as_ref().unwrap();
        assert_eq!(c.cmd().as_deref(), Some(&["/bin/sh".to_string()][..]));
        assert_eq!(c.env().as_deref(), Some(&["PATH=/bin".to_string()][..]));
        assert_eq!(*config.os(), Os::Linux);

        let tar_path = dir.path().join("rootfs.tar.gz");
        let mut gz = flate2::write::GzEncoder::new(
            File::create(&tar_path).unwrap(),
            flate2::Compression::fast(),
        );
        write_layer_tar(&fs_dir, &mut gz).unwrap();
        gz.finish().unwrap();
        let from_tar = import(&store, &tar_path, &import_opts("lab/tool:2")).unwrap();
        assert_eq!(from_tar, id);
    }

    #[test]
    fn import_refuses_a_hostile_tar_naming_the_entry_and_names_nothing() {
        use crate::unpack::tests::{end, raw_entry};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let mut t = Vec::new();
        raw_entry(&mut t, "etc/", b'5', "", b"");
        raw_entry(&mut t, "etc/escape", b'2', "/etc", b"");
        raw_entry(&mut t, "etc/escape/passwd", b'0', "", b"pwned");
        end(&mut t);
        let path = dir.path().join("evil.tar");
        fs::write(&path, &t).unwrap();
        let err = import(&store, &path, &import_opts("lab/evil:1")).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ArchiveError::Unpack { .. }), "{msg}");
        assert!(
            msg.contains("etc/escape/passwd") && msg.contains("evil.tar"),
            "{msg}"
        );
        assert_eq!(store.resolve("lab/evil:1").unwrap(), None);
        assert!(store.list().unwrap().is_empty());
        // Nothing of the refused layer stays unpacked.
        let unpacked: Vec<_> = fs::read_dir(store.layers_dir())
            .unwrap()
            .flatten()
            .filter(|e| e.path().join("root").exists())
            .collect();
        assert!(unpacked.is_empty(), "{unpacked:?}");
    }

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let fs_dir = dir.path().join("rootfs");
        rootfs(&fs_dir);
        let a = Store::open(dir.path().join("a")).unwrap();
        let id = import(&a, &fs_dir, &import_opts("lab/tool:1")).unwrap();
        let archive = dir.path().join("tool.oci.tar");
        save(&a, &["lab/tool:1"], &mut File::create(&archive).unwrap()).unwrap();

        let b = Store::open(dir.path().join("b")).unwrap();
        let loaded = load(&b, &archive).unwrap();
        assert_eq!(
            loaded,
            [Loaded {
                name: Some("docker.io/lab/tool:1".into()),
                id: id.clone()
            }]
        );
        assert_eq!(b.layers(&id).unwrap(), a.layers(&id).unwrap());
        // Loading twice is harmless.
        assert_eq!(load(&b, &archive).unwrap().len(), 1);
        assert_eq!(b.list().unwrap().len(), 1);
    }

    /// Writes a tar with the given regular files.
    pub(crate) fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn loads_a_docker_archive_with_gzip_layers_and_repo_tags() {
        let layer = tar_of(&[("hello.txt", b"hello from docker")]);
        let diff_id = format!("sha256:{}", fsutil::sha256_hex(&layer));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&layer).unwrap();
        let layer_gz = gz.finish().unwrap();
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": ["/hello"], "Env": ["A=1"], "ExposedPorts": {"80/tcp": {}}},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
            "container_config": {"Hostname": "x"}, "docker_version": "24.0.0",
        });
        let config = serde_json::to_vec(&config).unwrap();
        let config_name = format!("{}.json", fsutil::sha256_hex(&config));
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": ["busybox:latest", "localhost:5000/lab/busybox:v1"],
            "Layers": ["aaaa/layer.tar"],
        }]);
        let manifest = serde_json::to_vec(&manifest).unwrap();
        // The layer is reached through a symlink, as docker-archive dedups shared layers.
        let mut b = tar::Builder::new(Vec::new());
        let mut add = |name: &str, data: &[u8]| {
            let mut h = tar::Header::new_ustar();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_size(data.len() as u64);
            b.append_data(&mut h, name, data).unwrap();
        };
        add("bbbb/layer.tar", &layer_gz);
        add(&config_name, &config);
        add("manifest.json", &manifest);
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_mode(0o777);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        b.append_link(&mut h, "aaaa/layer.tar", "../bbbb/layer.tar")
            .unwrap();
        let bytes = b.into_inner().unwrap();

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docker.tar");
        fs::write(&path, &bytes).unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let loaded = load(&store, &path).unwrap();
        let names: Vec<_> = loaded.iter().map(|l| l.name.clone().unwrap()).collect();
        assert_eq!(
            names,
            [
                "docker.io/library/busybox:latest",
                "localhost:5000/lab/busybox:v1"
            ]
        );
        let id = &loaded[0].id;
        let layers = store.layers(id).unwrap();
        assert_eq!(layers[0].media_type, MediaType::ImageLayerGzip);
        assert_eq!(layers[0].diff_id.to_string(), diff_id);
        let cfg = store.config(id).unwrap();
        assert_eq!(
            cfg.config().as_ref().unwrap().cmd().as_deref(),
            Some(&["/hello".to_string()][..])
        );

        let guard = store.write_guard().unwrap();
        let cached = unpack::ensure_image_layers(&store, &guard, id).unwrap();
        assert_eq!(
            fs::read(cached[0].path.join("hello.txt")).unwrap(),
            b"hello from docker"
        );
    }

    #[test]
    fn loads_an_oci_archive_with_a_platform_index() {
        // Build a store image, then hand-write an archive whose index.json points at a
        // multi-platform index with an arm64 decoy.
        let dir = tempfile::tempdir().unwrap();
        let src = Store::open(dir.path().join("src")).unwrap();
        let fs_dir = dir.path().join("rootfs");
        rootfs(&fs_dir);
        let id = import(&src, &fs_dir, &import_opts("x")).unwrap();
        let manifest_size = src.read_blob(id.digest()).unwrap().len() as u64;
        let platform = |arch: &str| serde_json::json!({"os": "linux", "architecture": arch});
        let host_arch = Arch::default().to_string();
        let decoy = if host_arch == "arm64" {
            "amd64"
        } else {
            "arm64"
        };
        let inner = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "e".repeat(64)), "size": 1, "platform": platform(decoy)},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": id.to_string(), "size": manifest_size, "platform": platform(&host_arch)},
            ]
        });
        let inner = serde_json::to_vec(&inner).unwrap();
        let inner_hex = fsutil::sha256_hex(&inner);
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": format!("sha256:{inner_hex}"), "size": inner.len(),
                 "annotations": {REF_NAME_ANNOTATION: "lab/multi:1"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": id.to_string(), "size": manifest_size,
                 "annotations": {REF_NAME_ANNOTATION: "latest"}},
            ]
        });
        let index = serde_json::to_vec(&index).unwrap();
        let mut files: Vec<(String, Vec<u8>)> = vec![
            ("index.json".into(), index),
            (
                "oci-layout".into(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            (format!("blobs/sha256/{inner_hex}"), inner),
        ];
        let manifest = src.manifest(&id).unwrap();
        for d in std::iter::once(id.digest())
            .chain(std::iter::once(manifest.config().digest()))
            .chain(manifest.layers().iter().map(|l| l.digest()))
        {
            files.push((
                format!("blobs/sha256/{}", d.digest()),
                src.read_blob(d).unwrap(),
            ));
        }
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        let path = dir.path().join("multi.tar");
        fs::write(&path, tar_of(&refs)).unwrap();

        let store = Store::open(dir.path().join("dst")).unwrap();
        let loaded = load(&store, &path).unwrap();
        assert_eq!(
            loaded,
            [
                Loaded {
                    name: Some("docker.io/lab/multi:1".into()),
                    id: id.clone()
                },
                // A bare tag names no repository.
                Loaded {
                    name: None,
                    id: id.clone()
                },
            ]
        );
        assert_eq!(store.resolve("lab/multi:1").unwrap(), Some(id));
    }

    #[test]
    fn archive_errors_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();

        let path = dir.path().join("junk.tar");
        fs::write(&path, tar_of(&[("hello", b"x")])).unwrap();
        let err = load(&store, &path).unwrap_err();
        assert!(matches!(err, ArchiveError::Format { .. }), "{err}");

        // A blob whose content does not match its name.
        let path = dir.path().join("corrupt.tar");
        let name = format!("blobs/sha256/{}", "a".repeat(64));
        fs::write(
            &path,
            tar_of(&[(&name, b"not that"), ("index.json", b"{}")]),
        )
        .unwrap();
        let err = load(&store, &path).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&"a".repeat(64)) && msg.contains("corrupt.tar"),
            "{msg}"
        );

        // An index pointing at a blob the archive lacks.
        let index = serde_json::json!({"schemaVersion": 2, "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{}", "b".repeat(64)), "size": 3}]});
        let path = dir.path().join("missing.tar");
        fs::write(
            &path,
            tar_of(&[("index.json", &serde_json::to_vec(&index).unwrap())]),
        )
        .unwrap();
        let err = load(&store, &path).unwrap_err();
        assert!(matches!(err, ArchiveError::Missing { .. }), "{err}");
        assert!(err.to_string().contains(&"b".repeat(64)));
    }
}
