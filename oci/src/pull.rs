//! Pulling images from an OCI / Docker registry (distribution API v2) into the image store.
//!
//! Owns: talking to the registry (through `oci-client`), choosing the image manifest for this
//! host from an image index, streaming the config and layer blobs into the store through its
//! digest-checked [`BlobWriter`](crate::store::BlobWriter) (resuming a download the registry
//! dropped with an HTTP `Range` request), naming the image, credentials from the Docker /
//! Podman auth file, which registries are spoken to in plain HTTP, the errors a user reads
//! (each names the image and the registry), and progress events with a text renderer.
//! Does not own: where blobs live or how names are stored ([`crate::store`]), unpacking
//! ([`crate::unpack`]), or pull policies (`imagePullPolicy` is the runner's: this module pulls
//! when asked).
//!
//! What a pull guarantees:
//! - A blob is downloaded to the store's temp dir and renamed under its digest only once its
//!   content hashes to that digest; a dropped connection, a digest mismatch or an error drops
//!   the temp file. The manifest is written last and named only when every blob it lists is
//!   in the store, so a failed pull never leaves a name pointing at a partial image.
//! - Blobs already in the store are not downloaded again: pulling an image whose manifest
//!   digest has not changed downloads only the manifest (or nothing at all for a reference
//!   pinned by digest whose image is already complete).
//! - The whole pull holds the store's [`WriteGuard`](crate::store::WriteGuard), so a
//!   concurrent `prune` cannot delete blobs before the name exists.
//!
//! Plain HTTP: like Docker, registries on the loopback (`localhost`, `127.0.0.0/8`, `::1`) are
//! spoken to in plain HTTP; any other registry only when [`PullOptions::insecure`] is set or
//! it is listed in `STAGEHAND_INSECURE_REGISTRIES` (`host:port,host:port`, see
//! [`INSECURE_REGISTRIES_ENV`]). Everything else is HTTPS, verified against the system's trust
//! store (`/etc/ssl/certs`), so a registry with a certificate from an internal CA works once
//! that CA is installed there (`update-ca-certificates`).
//!
//! Credentials come from the first of `$REGISTRY_AUTH_FILE`, `$DOCKER_CONFIG/config.json`,
//! `~/.docker/config.json` that exists (`docker login`, `podman login` and `skopeo login` write
//! them): the `auth` (base64 `user:password`), `username`/`password`, or `registrytoken` of the
//! entry for the registry. Credential helpers (`credsStore`, `credHelpers`) are not run.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use oci_client::Client;
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol, SizedStream};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_spec::distribution::Reference;
use oci_spec::image::{Arch, Descriptor, Digest, ImageIndex, ImageManifest, Os};

use crate::fsutil;
use crate::store::{self, ImageId, Store, StoreError, WriteGuard};

/// The environment variable listing extra registries (`host:port`, comma-separated) that are
/// spoken to in plain HTTP.
pub const INSECURE_REGISTRIES_ENV: &str = "STAGEHAND_INSECURE_REGISTRIES";

/// The environment variable naming the auth file (Podman's and skopeo's convention).
pub const AUTH_FILE_ENV: &str = "REGISTRY_AUTH_FILE";

/// How many times one blob download is tried before the pull fails.
const DEFAULT_ATTEMPTS: u32 = 3;

/// Give up on a registry that does not accept the connection within this time.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Give up on a registry that sends nothing for this long in the middle of a response.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest manifest or index accepted (registries themselves refuse more than 4 MiB).
const MAX_MANIFEST: usize = 8 << 20;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";

/// What the manifest request accepts: images and indexes, OCI and Docker schema 2.
const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];

/// The hint every "cannot get the image" error ends with: the offline way in.
const LOAD_HINT: &str = "load the image with `stagehand image load FILE` instead";

/// Errors of a pull. Each names the image (the full normalized reference) it was for.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        reason: String,
    },
    /// No connection to the registry (refused, unresolvable name, timeout, TLS failure).
    #[error("cannot reach registry {registry} for `{image}`: {reason}; {LOAD_HINT}")]
    Unreachable {
        /// The registry (`host[:port]`).
        registry: String,
        /// The image.
        image: String,
        /// The cause, e.g. "connection refused".
        reason: String,
    },
    /// The registry does not have the image (or the tag).
    #[error(
        "image `{image}` is not in registry {registry}: {detail}; check the name and tag, or {LOAD_HINT}"
    )]
    NotFound {
        /// The registry.
        registry: String,
        /// The image.
        image: String,
        /// What the registry said.
        detail: String,
    },
    /// The registry wants credentials, or refused the ones it got.
    #[error(
        "registry {registry} refused access to `{image}`: {detail}; log in (`docker login {registry}`, `skopeo login {registry}`) so the credentials are in ~/.docker/config.json or $REGISTRY_AUTH_FILE{helpers}"
    )]
    Unauthorized {
        /// The registry.
        registry: String,
        /// The image.
        image: String,
        /// What the registry said.
        detail: String,
        /// A note when the auth file delegates to a credential helper, which is not run.
        helpers: String,
    },
    /// Any other failure of the registry or of the conversation with it.
    #[error("registry {registry} failed for `{image}`: {detail}")]
    Registry {
        /// The registry.
        registry: String,
        /// The image.
        image: String,
        /// What went wrong.
        detail: String,
    },
    /// A blob download failed (after retries) or its content was wrong.
    #[error("downloading {what} {digest} of `{image}` from {registry} failed: {detail}")]
    Download {
        /// The registry.
        registry: String,
        /// The image.
        image: String,
        /// "layer" or "config".
        what: &'static str,
        /// The blob's digest.
        digest: String,
        /// What went wrong.
        detail: String,
    },
    /// The registry serves something this runner cannot run: a schema 1 manifest, an artifact
    /// that is not a container image, an index without an image for this platform.
    #[error("`{image}` from {registry} cannot be used: {reason}")]
    Unsupported {
        /// The registry.
        registry: String,
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
    /// The auth file exists but cannot be read or parsed.
    #[error("registry credentials {path}: {reason}")]
    AuthFile {
        /// The auth file.
        path: PathBuf,
        /// Why it is unusable.
        reason: String,
    },
    /// The image store failed.
    #[error("pull `{image}`: {source}")]
    Store {
        /// The image.
        image: String,
        /// The cause.
        #[source]
        source: StoreError,
    },
}

/// One credential from an auth file.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// HTTP basic: user name and password (or an access token used as a password).
    Basic {
        /// The user name.
        username: String,
        /// The password.
        password: String,
    },
    /// A bearer token sent as is (`registrytoken`).
    Bearer(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            Credential::Bearer(_) => write!(f, "Bearer(<redacted>)"),
        }
    }
}

/// Registry credentials, by registry (`host[:port]`; Docker Hub's aliases all read as
/// `docker.io`), from a Docker `config.json` or a Podman `auth.json` (same format).
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    entries: BTreeMap<String, Credential>,
    /// Where they came from, for error messages.
    source: Option<PathBuf>,
    /// The file names credential helpers (`credsStore`/`credHelpers`), which are not run.
    uses_helpers: bool,
}

impl Credentials {
    /// No credentials: every registry is accessed anonymously.
    pub fn none() -> Credentials {
        Credentials::default()
    }

    /// The credentials of the first auth file that exists: `$REGISTRY_AUTH_FILE`,
    /// `$DOCKER_CONFIG/config.json`, `$HOME/.docker/config.json`. None of them existing is
    /// not an error; one that exists but does not parse is.
    pub fn from_env() -> Result<Credentials, PullError> {
        let candidates = [
            std::env::var_os(AUTH_FILE_ENV).map(PathBuf::from),
            std::env::var_os("DOCKER_CONFIG").map(|d| PathBuf::from(d).join("config.json")),
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json")),
        ];
        for path in candidates.into_iter().flatten() {
            if path.as_os_str().is_empty() {
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => return Credentials::parse(&path, &text),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(PullError::AuthFile {
                        path,
                        reason: e.to_string(),
                    });
                }
            }
        }
        Ok(Credentials::none())
    }

    /// Parses an auth file's text; `path` is only used in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Credentials, PullError> {
        let bad = |reason: String| PullError::AuthFile {
            path: path.to_path_buf(),
            reason,
        };
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let mut out = Credentials {
            source: Some(path.to_path_buf()),
            uses_helpers: value.get("credsStore").is_some()
                || value
                    .get("credHelpers")
                    .and_then(|h| h.as_object())
                    .is_some_and(|h| !h.is_empty()),
            ..Credentials::default()
        };
        let Some(auths) = value.get("auths").and_then(|a| a.as_object()) else {
            return Ok(out);
        };
        for (key, entry) in auths {
            let (registry, has_path) = registry_of_key(key);
            let credential = if let Some(auth) = entry.get("auth").and_then(|a| a.as_str()) {
                if auth.is_empty() {
                    None
                } else {
                    use base64::Engine as _;
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(auth.trim())
                        .map_err(|e| bad(format!("the `auth` of {key:?} is not base64: {e}")))?;
                    let decoded = String::from_utf8(decoded)
                        .map_err(|_| bad(format!("the `auth` of {key:?} is not UTF-8")))?;
                    let (username, password) = decoded.split_once(':').ok_or_else(|| {
                        bad(format!("the `auth` of {key:?} is not `user:password`"))
                    })?;
                    Some(Credential::Basic {
                        username: username.to_string(),
                        password: password.to_string(),
                    })
                }
            } else {
                None
            };
            let credential = credential.or_else(|| {
                let username = entry.get("username")?.as_str()?;
                let password = entry.get("password")?.as_str()?;
                Some(Credential::Basic {
                    username: username.to_string(),
                    password: password.to_string(),
                })
            });
            let credential = credential.or_else(|| {
                entry
                    .get("registrytoken")
                    .and_then(|t| t.as_str())
                    .filter(|t| !t.is_empty())
                    .map(|t| Credential::Bearer(t.to_string()))
            });
            let Some(credential) = credential else {
                continue;
            };
            // Podman allows per-repository keys (`host/ns/repo`); without per-repository
            // lookups, the plain host key wins over them.
            if has_path && out.entries.contains_key(&registry) {
                continue;
            }
            out.entries.insert(registry, credential);
        }
        Ok(out)
    }

    /// The credential for `registry` (`host[:port]`, as in a normalized reference).
    pub fn for_registry(&self, registry: &str) -> Option<&Credential> {
        self.entries.get(&registry_of_key(registry).0)
    }

    /// The auth file these came from, if any.
    pub fn source(&self) -> Option<&Path> {
        self.source.as_deref()
    }
}

/// The registry an auth-file key stands for (scheme and path dropped, Docker Hub's aliases
/// folded into `docker.io`), and whether the key had a path.
fn registry_of_key(key: &str) -> (String, bool) {
    let rest = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let (host, path) = match rest.split_once('/') {
        Some((h, p)) => (
            h,
            !p.is_empty() && p != "v1/" && p != "v1" && p != "v2/" && p != "v2",
        ),
        None => (rest, false),
    };
    let host = host.to_ascii_lowercase();
    let host = match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    };
    (host, path)
}

/// A progress event of a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PullEvent<'a> {
    /// The manifest is known: how many blobs the image has and how many must be fetched.
    Resolved {
        /// The image (full normalized reference).
        image: &'a str,
        /// The image id (manifest digest) being pulled.
        id: &'a ImageId,
        /// Blobs of the image (config and layers).
        blobs: usize,
        /// Blobs not in the store yet.
        missing: usize,
        /// Their total size.
        missing_bytes: u64,
    },
    /// Bytes of a blob arrived.
    Progress {
        /// The blob.
        digest: &'a Digest,
        /// "layer" or "config".
        what: &'static str,
        /// Bytes so far.
        done: u64,
        /// The blob's size.
        total: u64,
    },
    /// The connection dropped; the download continues from `offset`.
    Retry {
        /// The blob.
        digest: &'a Digest,
        /// "layer" or "config".
        what: &'static str,
        /// Bytes kept.
        offset: u64,
        /// Which try comes next (2 for the first retry).
        attempt: u32,
        /// Why the previous try failed.
        error: &'a str,
    },
    /// A blob is complete and in the store.
    Done {
        /// The blob.
        digest: &'a Digest,
        /// "layer" or "config".
        what: &'static str,
        /// Its size.
        bytes: u64,
    },
}

/// Receives [`PullEvent`]s. Called from the task doing the pull: keep it quick.
pub type ProgressFn = Arc<dyn Fn(&PullEvent<'_>) + Send + Sync>;

/// How to pull.
#[derive(Clone)]
pub struct PullOptions {
    /// Speak plain HTTP to the registry of this pull, whatever it is.
    pub insecure: bool,
    /// Registries (`host[:port]`) spoken to in plain HTTP besides the loopback ones.
    pub insecure_registries: Vec<String>,
    /// Credentials by registry.
    pub credentials: Credentials,
    /// Where progress goes.
    pub progress: Option<ProgressFn>,
    /// Tries per blob download (a dropped connection resumes where it stopped).
    pub attempts: u32,
}

impl fmt::Debug for PullOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PullOptions")
            .field("insecure", &self.insecure)
            .field("insecure_registries", &self.insecure_registries)
            .field("credentials", &self.credentials)
            .field("progress", &self.progress.is_some())
            .field("attempts", &self.attempts)
            .finish()
    }
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            insecure: false,
            insecure_registries: Vec::new(),
            credentials: Credentials::none(),
            progress: None,
            attempts: DEFAULT_ATTEMPTS,
        }
    }
}

impl PullOptions {
    /// Options from the environment: credentials from the auth file
    /// ([`Credentials::from_env`]) and [`INSECURE_REGISTRIES_ENV`].
    pub fn from_env() -> Result<PullOptions, PullError> {
        let insecure_registries = std::env::var(INSECURE_REGISTRIES_ENV)
            .map(|v| {
                v.split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .filter(|s| !s.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Ok(PullOptions {
            insecure_registries,
            credentials: Credentials::from_env()?,
            ..PullOptions::default()
        })
    }

    /// Whether `registry` is spoken to in plain HTTP (see the module docs).
    pub fn plain_http(&self, registry: &str) -> bool {
        let registry = registry.to_ascii_lowercase();
        self.insecure
            || is_loopback_registry(&registry)
            || self.insecure_registries.contains(&registry)
    }
}

/// Whether a registry (`host[:port]`) is on the loopback: `localhost`, `127.0.0.0/8`, `::1`.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = if registry.parse::<std::net::IpAddr>().is_ok() {
        registry
    } else if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        match registry.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => registry,
        }
    };
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// What a pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The image (its manifest digest).
    pub id: ImageId,
    /// The full normalized reference that was pulled.
    pub reference: String,
    /// The name it is stored under (`None` for a reference with only a digest).
    pub name: Option<String>,
    /// Blobs downloaded.
    pub fetched_blobs: usize,
    /// Bytes downloaded (blobs only).
    pub fetched_bytes: u64,
    /// Blobs that were already in the store.
    pub cached_blobs: usize,
}

/// Pulls `reference` (normalized as Docker does: `busybox` is
/// `docker.io/library/busybox:latest`) into `store` and names it. An image index resolves to
/// its `linux/<host arch>` image. Blobs already in the store are not downloaded again.
pub async fn pull(store: &Store, reference: &str, opts: &PullOptions) -> Result<Pulled, PullError> {
    let parsed = store::parse_reference(reference).map_err(|e| match e {
        StoreError::InvalidReference { reference, reason } => {
            PullError::InvalidReference { reference, reason }
        }
        other => PullError::InvalidReference {
            reference: reference.to_string(),
            reason: other.to_string(),
        },
    })?;
    let puller = Puller::new(store, parsed, opts)?;
    puller.run().await
}

/// One pull in progress.
struct Puller<'a> {
    store: &'a Store,
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    opts: &'a PullOptions,
    /// `reference.whole()`, for messages.
    image: String,
    /// `reference.registry()`, for messages.
    registry: String,
}

/// The image manifest a reference resolved to.
struct Resolved {
    bytes: Vec<u8>,
    digest: Digest,
    manifest: ImageManifest,
}

impl<'a> Puller<'a> {
    fn new(
        store: &'a Store,
        reference: Reference,
        opts: &'a PullOptions,
    ) -> Result<Puller<'a>, PullError> {
        install_crypto_provider();
        let image = reference.whole();
        let registry = reference.registry().to_string();
        let protocol = if opts.plain_http(&registry) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            // Indexes are resolved here, with the variant and single-entry rules below.
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: concat!("stagehand/", env!("CARGO_PKG_VERSION")),
            ..ClientConfig::default()
        };
        let client = Client::try_from(config).map_err(|e| PullError::Registry {
            registry: registry.clone(),
            image: image.clone(),
            detail: format!("cannot set up the HTTP client: {}", chain(&e)),
        })?;
        let auth = match opts.credentials.for_registry(&registry) {
            Some(Credential::Basic { username, password }) => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Some(Credential::Bearer(token)) => RegistryAuth::Bearer(token.clone()),
            None => RegistryAuth::Anonymous,
        };
        Ok(Puller {
            store,
            client,
            reference,
            auth,
            opts,
            image,
            registry,
        })
    }

    fn emit(&self, event: PullEvent<'_>) {
        if let Some(p) = &self.opts.progress {
            p(&event);
        }
    }

    fn store_err(&self) -> impl Fn(StoreError) -> PullError + '_ {
        move |source| PullError::Store {
            image: self.image.clone(),
            source,
        }
    }

    fn unsupported(&self, reason: impl Into<String>) -> PullError {
        PullError::Unsupported {
            registry: self.registry.clone(),
            image: self.image.clone(),
            reason: reason.into(),
        }
    }

    async fn run(self) -> Result<Pulled, PullError> {
        let name = store::name_of(&self.reference);
        // A digest names content for good: if that image is complete here, the registry has
        // nothing to add, so not even the manifest is fetched.
        if let Some(pinned) = self.pinned_digest()? {
            if let Some(pulled) = self.complete_locally(&pinned, name.clone())? {
                return Ok(pulled);
            }
        }
        let resolved = self.resolve().await?;
        let id = ImageId::new(resolved.digest.clone());
        // Blocks only while a `prune` runs (a flock), which is short: not worth a thread.
        let guard = self.store.write_guard().map_err(self.store_err())?;

        let manifest = &resolved.manifest;
        let mut blobs: Vec<(&Descriptor, &'static str)> = vec![(manifest.config(), "config")];
        blobs.extend(manifest.layers().iter().map(|l| (l, "layer")));
        // An image may list the same layer twice (an empty layer, say): fetch it once.
        let mut seen = std::collections::HashSet::new();
        blobs.retain(|(d, _)| seen.insert(d.digest().clone()));
        let missing: Vec<(&Descriptor, &'static str)> = blobs
            .iter()
            .copied()
            .filter(|(d, _)| !self.store.has_blob(d.digest()))
            .collect();
        self.emit(PullEvent::Resolved {
            image: &self.image,
            id: &id,
            blobs: blobs.len(),
            missing: missing.len(),
            missing_bytes: missing.iter().map(|(d, _)| d.size()).sum(),
        });
        let mut fetched_bytes = 0;
        for (d, what) in &missing {
            fetched_bytes += self.fetch_blob(&guard, d, what).await?;
        }
        // The manifest last: once it is in the store under its digest, everything it lists is.
        self.store
            .write_blob_bytes(&guard, &resolved.bytes)
            .map_err(self.store_err())?;
        // The store's own consistency check (manifest and config agree) before naming it.
        self.store.layers(&id).map_err(self.store_err())?;
        self.store
            .tag(&self.reference, &id)
            .map_err(self.store_err())?;
        drop(guard);
        Ok(Pulled {
            id,
            reference: self.image.clone(),
            name,
            fetched_blobs: missing.len(),
            fetched_bytes,
            cached_blobs: blobs.len() - missing.len(),
        })
    }

    fn pinned_digest(&self) -> Result<Option<Digest>, PullError> {
        match self.reference.digest() {
            Some(d) => d
                .parse()
                .map(Some)
                .map_err(|e| PullError::InvalidReference {
                    reference: self.image.clone(),
                    reason: format!("invalid digest {d:?}: {e}"),
                }),
            None => Ok(None),
        }
    }

    /// The pull result if the image manifest `digest` and all its blobs are in the store
    /// (the manifest is then named as the reference says).
    fn complete_locally(
        &self,
        digest: &Digest,
        name: Option<String>,
    ) -> Result<Option<Pulled>, PullError> {
        if !self.store.has_blob(digest) {
            return Ok(None);
        }
        let id = ImageId::new(digest.clone());
        // An index, a corrupt or foreign blob: not an image we can use as is; ask the registry.
        let Ok(manifest) = self.store.manifest(&id) else {
            return Ok(None);
        };
        let digests: std::collections::HashSet<&Digest> = std::iter::once(manifest.config())
            .chain(manifest.layers())
            .map(|d| d.digest())
            .collect();
        let blobs = digests.len();
        let all_there = digests.iter().all(|d| self.store.has_blob(d));
        if !all_there || self.store.layers(&id).is_err() {
            return Ok(None);
        }
        let _guard = self.store.write_guard().map_err(self.store_err())?;
        self.store
            .tag(&self.reference, &id)
            .map_err(self.store_err())?;
        self.emit(PullEvent::Resolved {
            image: &self.image,
            id: &id,
            blobs,
            missing: 0,
            missing_bytes: 0,
        });
        Ok(Some(Pulled {
            id,
            reference: self.image.clone(),
            name,
            fetched_blobs: 0,
            fetched_bytes: 0,
            cached_blobs: blobs,
        }))
    }

    /// Fetches the manifest the reference names and, through image indexes, the image
    /// manifest for this host.
    async fn resolve(&self) -> Result<Resolved, PullError> {
        let mut reference = self.reference.clone();
        for _ in 0..4 {
            let expected = match reference.digest() {
                Some(d) => Some(
                    d.parse::<Digest>()
                        .map_err(|e| PullError::InvalidReference {
                            reference: self.image.clone(),
                            reason: format!("invalid digest {d:?}: {e}"),
                        })?,
                ),
                None => None,
            };
            // A manifest named by digest that is already here need not be fetched again.
            let local = match &expected {
                Some(d) if self.store.has_blob(d) => self.store.read_blob(d).ok(),
                _ => None,
            };
            let bytes = match local {
                Some(b) => b,
                None => {
                    let (body, _) = self
                        .client
                        .pull_manifest_raw(&reference, &self.auth, ACCEPTED_MANIFESTS)
                        .await
                        .map_err(|e| self.classify(e))?;
                    body.to_vec()
                }
            };
            if bytes.len() > MAX_MANIFEST {
                return Err(self.unsupported(format!(
                    "its manifest is {} bytes, larger than the {} allowed",
                    bytes.len(),
                    MAX_MANIFEST
                )));
            }
            let digest = store_digest(&bytes);
            if let Some(expected) = &expected {
                if *expected != digest {
                    return Err(PullError::Registry {
                        registry: self.registry.clone(),
                        image: self.image.clone(),
                        detail: format!("the manifest it sent for {expected} hashes to {digest}"),
                    });
                }
            }
            let value: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| self.unsupported(format!("its manifest {digest} is not JSON: {e}")))?;
            match value.get("schemaVersion").and_then(|v| v.as_i64()) {
                Some(2) => {}
                Some(1) => {
                    return Err(self.unsupported(
                        "it has a Docker schema 1 manifest, which is deprecated and not supported; push it again with a current docker or skopeo",
                    ));
                }
                other => {
                    return Err(self
                        .unsupported(format!("its manifest has schemaVersion {other:?}, not 2")));
                }
            }
            if value.get("manifests").is_some() {
                let index: ImageIndex = serde_json::from_value(value).map_err(|e| {
                    self.unsupported(format!("its image index {digest} is not valid: {e}"))
                })?;
                let chosen = self.pick_platform(&index)?;
                reference = reference.clone_with_digest(chosen.to_string());
                continue;
            }
            let manifest: ImageManifest = serde_json::from_value(value).map_err(|e| {
                self.unsupported(format!(
                    "its manifest {digest} is not an image manifest: {e}"
                ))
            })?;
            let config_type = manifest.config().media_type().to_string();
            if config_type != OCI_CONFIG && config_type != DOCKER_CONFIG {
                return Err(self.unsupported(format!(
                    "it is not a container image (its config is {config_type}, an OCI artifact)"
                )));
            }
            return Ok(Resolved {
                bytes,
                digest,
                manifest,
            });
        }
        Err(self.unsupported("its image indexes are nested too deep"))
    }

    /// The `linux/<host arch>` entry of an index (matching the host's variant when the
    /// index has several), or its only entry when that one names no platform.
    fn pick_platform(&self, index: &ImageIndex) -> Result<Digest, PullError> {
        let arch = Arch::default();
        let variant = host_variant(&arch);
        let candidates: Vec<&Descriptor> = index
            .manifests()
            .iter()
            .filter(|m| {
                m.platform()
                    .as_ref()
                    .is_some_and(|p| *p.os() == Os::Linux && *p.architecture() == arch)
            })
            .collect();
        let by_variant = candidates
            .iter()
            .find(|m| m.platform().as_ref().and_then(|p| p.variant().as_deref()) == variant);
        if let Some(m) = by_variant.or(candidates.first()) {
            return Ok(m.digest().clone());
        }
        if let [only] = index.manifests().as_slice() {
            if only.platform().is_none() {
                return Ok(only.digest().clone());
            }
        }
        let available: Vec<String> = index
            .manifests()
            .iter()
            .map(|m| match m.platform() {
                Some(p) => format!("{}/{}", p.os(), p.architecture()),
                None => "unknown".to_string(),
            })
            .collect();
        Err(self.unsupported(format!(
            "its image index has no linux/{arch} image (it has: {})",
            available.join(", ")
        )))
    }

    /// Downloads one blob into the store, resuming after a dropped connection. Returns the
    /// bytes downloaded.
    async fn fetch_blob(
        &self,
        guard: &WriteGuard,
        d: &Descriptor,
        what: &'static str,
    ) -> Result<u64, PullError> {
        let digest = d.digest();
        let digest_str = digest.to_string();
        let total = d.size();
        let fail = |detail: String| PullError::Download {
            registry: self.registry.clone(),
            image: self.image.clone(),
            what,
            digest: digest_str.clone(),
            detail,
        };
        let mut writer = self.store.blob_writer(guard).map_err(self.store_err())?;
        let mut downloaded = 0u64;
        let mut attempt = 1;
        loop {
            let started = if writer.is_empty() {
                self.client
                    .pull_blob_stream(&self.reference, digest_str.as_str())
                    .await
                    .map(BlobResponse::Full)
            } else {
                self.client
                    .pull_blob_stream_partial(
                        &self.reference,
                        digest_str.as_str(),
                        writer.len(),
                        None,
                    )
                    .await
            };
            let error = match started {
                Ok(response) => {
                    let stream: SizedStream = match response {
                        BlobResponse::Partial(s) => s,
                        BlobResponse::Full(s) => {
                            // The registry ignored the Range request: start over.
                            if !writer.is_empty() {
                                writer = self.store.blob_writer(guard).map_err(self.store_err())?;
                            }
                            s
                        }
                    };
                    match self
                        .copy_stream(stream, &mut writer, digest, what, total)
                        .await
                    {
                        Ok(n) => {
                            downloaded += n;
                            None
                        }
                        Err(CopyError::Network(e, n)) => {
                            downloaded += n;
                            Some((e, None))
                        }
                        Err(CopyError::Fatal(detail)) => return Err(fail(detail)),
                    }
                }
                // A registry that answers but refuses (404, 401...) will not change its mind.
                Err(e) if !is_network(&e) => return Err(self.classify(e)),
                Err(e) => Some((short_reason(&e), Some(e))),
            };
            let Some((error, request_error)) = error else {
                break;
            };
            if attempt >= self.opts.attempts.max(1) {
                return Err(match request_error {
                    // The registry went away between blobs: say so, as for the manifest.
                    Some(e) => self.classify(e),
                    None => fail(format!("{error} (gave up after {attempt} tries)")),
                });
            }
            attempt += 1;
            self.emit(PullEvent::Retry {
                digest,
                what,
                offset: writer.len(),
                attempt,
                error: &error,
            });
            tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
        }
        if writer.len() != total {
            return Err(fail(format!(
                "the registry sent {} bytes, the manifest says {total}",
                writer.len()
            )));
        }
        // Commit fsyncs the blob: off the async threads.
        let expected = digest.clone();
        let committed = tokio::task::spawn_blocking(move || writer.commit(Some(&expected)))
            .await
            .map_err(|e| fail(format!("the writer task failed: {e}")))?;
        match committed {
            Ok(_) => {}
            Err(StoreError::DigestMismatch { actual, .. }) => {
                return Err(fail(format!("the content it sent hashes to {actual}")));
            }
            Err(e) => return Err(self.store_err()(e)),
        }
        self.emit(PullEvent::Done {
            digest,
            what,
            bytes: total,
        });
        Ok(downloaded)
    }

    /// Appends a response body to `writer`, reporting progress. Returns the bytes copied.
    async fn copy_stream(
        &self,
        mut stream: SizedStream,
        writer: &mut store::BlobWriter,
        digest: &Digest,
        what: &'static str,
        total: u64,
    ) -> Result<u64, CopyError> {
        let mut copied = 0u64;
        self.emit(PullEvent::Progress {
            digest,
            what,
            done: writer.len(),
            total,
        });
        while let Some(chunk) = stream.stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => return Err(CopyError::Network(innermost(&e), copied)),
            };
            if writer.len() + chunk.len() as u64 > total {
                return Err(CopyError::Fatal(format!(
                    "the registry sent more than the {total} bytes the manifest says"
                )));
            }
            // Small writes to the page cache; the fsync happens in `commit`, off this thread.
            writer
                .write_all(&chunk)
                .map_err(|e| CopyError::Fatal(format!("cannot write to the image store: {e}")))?;
            copied += chunk.len() as u64;
            self.emit(PullEvent::Progress {
                digest,
                what,
                done: writer.len(),
                total,
            });
        }
        Ok(copied)
    }

    /// The user-facing error for a failed registry request.
    fn classify(&self, e: OciDistributionError) -> PullError {
        let registry = self.registry.clone();
        let image = self.image.clone();
        let unauthorized = |detail: String| PullError::Unauthorized {
            registry: registry.clone(),
            image: image.clone(),
            detail,
            helpers: if self.opts.credentials.uses_helpers {
                format!(
                    " (credential helpers named in {} are not run: put the credentials in the file itself)",
                    self.opts
                        .credentials
                        .source()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )
            } else {
                String::new()
            },
        };
        let not_found = |detail: String| PullError::NotFound {
            registry: registry.clone(),
            image: image.clone(),
            detail,
        };
        let other = |detail: String| PullError::Registry {
            registry: registry.clone(),
            image: image.clone(),
            detail,
        };
        match e {
            OciDistributionError::RequestError(re) if re.is_connect() || re.is_timeout() => {
                PullError::Unreachable {
                    registry: registry.clone(),
                    image: image.clone(),
                    reason: connect_reason(re.is_timeout(), &re),
                }
            }
            OciDistributionError::RequestError(re) => other(chain(&re)),
            OciDistributionError::RegistryError { envelope, .. } => {
                let detail = envelope
                    .errors
                    .iter()
                    .map(|e| format!("{:?}: {}", e.code, e.message))
                    .collect::<Vec<_>>()
                    .join("; ");
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                if codes.iter().any(|c| {
                    matches!(
                        c,
                        OciErrorCode::ManifestUnknown
                            | OciErrorCode::NameUnknown
                            | OciErrorCode::NotFound
                            | OciErrorCode::BlobUnknown
                    )
                }) {
                    not_found(detail)
                } else if codes
                    .iter()
                    .any(|c| matches!(c, OciErrorCode::Unauthorized | OciErrorCode::Denied))
                {
                    unauthorized(detail)
                } else {
                    other(detail)
                }
            }
            OciDistributionError::ServerError { code, message, .. } => {
                let detail = format!("HTTP {code} {}", message.trim());
                match code {
                    404 => not_found(detail),
                    401 | 403 => unauthorized(detail),
                    _ => other(detail),
                }
            }
            OciDistributionError::UnauthorizedError { .. } => unauthorized("HTTP 401".into()),
            OciDistributionError::AuthenticationFailure(msg) => unauthorized(msg),
            e => other(chain(&e)),
        }
    }
}

enum CopyError {
    /// The connection failed after `.1` bytes: worth resuming.
    Network(String, u64),
    /// Retrying cannot help.
    Fatal(String),
}

/// Whether a failed request may succeed when repeated: no connection, or one that broke.
fn is_network(e: &OciDistributionError) -> bool {
    match e {
        OciDistributionError::RequestError(re) => {
            re.is_connect() || re.is_timeout() || re.is_request() || re.is_body()
        }
        OciDistributionError::IoError(_) => true,
        OciDistributionError::ServerError { code, .. } => *code >= 500,
        _ => false,
    }
}

/// "connection refused", "timed out", or the innermost cause of a failed connection.
/// (`reqwest` is only reachable through `oci-client`, so its error comes in as a trait object.)
fn connect_reason(timeout: bool, e: &(dyn std::error::Error + 'static)) -> String {
    if timeout {
        return "timed out".into();
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut innermost = e.to_string();
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            match io.kind() {
                io::ErrorKind::ConnectionRefused => return "connection refused".into(),
                io::ErrorKind::TimedOut => return "timed out".into(),
                _ => {}
            }
        }
        innermost = err.to_string();
        cur = err.source();
    }
    innermost
}

/// Why a request failed, in a few words, for a retry line.
fn short_reason(e: &OciDistributionError) -> String {
    match e {
        OciDistributionError::RequestError(re) if re.is_connect() || re.is_timeout() => {
            connect_reason(re.is_timeout(), re)
        }
        other => innermost(other),
    }
}

/// The innermost cause of a broken download ("end of file before message length reached"):
/// the layers above it only say "error decoding response body".
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The error and its causes on one line, without repeating a cause its parent already quotes.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        let s = err.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = err.source();
    }
    out
}

/// The sha256 digest of `bytes`.
fn store_digest(bytes: &[u8]) -> Digest {
    format!("sha256:{}", fsutil::sha256_hex(bytes))
        .parse()
        .expect("a sha256 hex string is a valid digest")
}

/// The variant an index entry must have for this host, when the architecture has variants.
fn host_variant(arch: &Arch) -> Option<&'static str> {
    match arch {
        Arch::ARM64 => Some("v8"),
        Arch::ARM => Some("v7"),
        _ => None,
    }
}

/// rustls is built without a default crypto provider (see the workspace manifest): install
/// ring once, before the first client. Another provider installed first is fine too.
fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// A [`ProgressFn`] that writes what a person reads to `out`.
///
/// With `live` (a terminal), the blob being downloaded has one line that is rewritten in
/// place (`\r`) with its bytes so far, at most ten times a second, and ends with its size once
/// complete. Without it (a log, a pipe), each blob gets one line when it is complete. Both
/// print a line when the manifest is resolved and for each resumed download.
pub fn text_progress(out: Box<dyn Write + Send>, live: bool) -> ProgressFn {
    struct State {
        out: Box<dyn Write + Send>,
        last_draw: Option<Instant>,
        /// A live line is on screen without its newline.
        open_line: bool,
    }
    let state = Mutex::new(State {
        out,
        last_draw: None,
        open_line: false,
    });
    Arc::new(move |event: &PullEvent<'_>| {
        let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
        let st = &mut *st;
        // Progress output is best effort: a closed stderr must not fail the pull.
        let _ = match event {
            PullEvent::Resolved {
                image,
                id,
                blobs,
                missing,
                missing_bytes,
            } => {
                if *missing == 0 {
                    writeln!(
                        st.out,
                        "{image}: up to date ({}, {blobs} blobs in the store)",
                        id.short()
                    )
                } else {
                    writeln!(
                        st.out,
                        "{image}: pulling {}: {missing} of {blobs} blobs to fetch ({})",
                        id.short(),
                        human_bytes(*missing_bytes)
                    )
                }
            }
            PullEvent::Progress {
                digest,
                what,
                done,
                total,
            } => {
                if !live {
                    Ok(())
                } else {
                    let now = Instant::now();
                    let due = st
                        .last_draw
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(100));
                    if due || done == total {
                        st.last_draw = Some(now);
                        st.open_line = true;
                        write!(
                            st.out,
                            "\r  {what} {}  {} / {}\x1b[K",
                            short_digest(digest),
                            human_bytes(*done),
                            human_bytes(*total)
                        )
                        .and_then(|_| st.out.flush())
                    } else {
                        Ok(())
                    }
                }
            }
            PullEvent::Retry {
                digest,
                what,
                offset,
                attempt,
                error,
            } => {
                let lead = if std::mem::take(&mut st.open_line) {
                    "\n"
                } else {
                    ""
                };
                writeln!(
                    st.out,
                    "{lead}  {what} {}  connection lost after {} ({error}); resuming (try {attempt})",
                    short_digest(digest),
                    human_bytes(*offset)
                )
            }
            PullEvent::Done {
                digest,
                what,
                bytes,
            } => {
                st.last_draw = None;
                if live {
                    st.open_line = false;
                    writeln!(
                        st.out,
                        "\r  {what} {}  {} done\x1b[K",
                        short_digest(digest),
                        human_bytes(*bytes)
                    )
                } else {
                    writeln!(
                        st.out,
                        "  {what} {}  {} done",
                        short_digest(digest),
                        human_bytes(*bytes)
                    )
                }
            }
        };
        let _ = st.out.flush();
    })
}

/// `sha256:` and the first 12 hex digits.
fn short_digest(d: &Digest) -> String {
    let hex = d.digest();
    format!("{}:{}", d.algorithm(), &hex[..hex.len().min(12)])
}

/// A size for people: 1536 → "1.5 KiB", 12 → "12 B".
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use oci_spec::image::{
        ConfigBuilder, ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder,
        MediaType, PlatformBuilder, RootFsBuilder,
    };

    /// A registry speaking just enough of the distribution API over HTTP/1.1 (keep-alive,
    /// `Range`, basic auth) to exercise the puller, with a switch that cuts blob responses.
    struct FakeRegistry {
        addr: SocketAddr,
        state: Arc<FakeState>,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    #[derive(Default)]
    struct FakeState {
        /// Path → (content type, body).
        routes: Mutex<HashMap<String, (String, Vec<u8>)>>,
        /// "GET /v2/... range=..." per request.
        log: Mutex<Vec<String>>,
        /// Cut this many blob responses after `cut_after` body bytes.
        cuts_left: AtomicUsize,
        cut_after: AtomicUsize,
        /// When set, requests without this `Authorization` value get 401.
        auth: Mutex<Option<String>>,
    }

    impl FakeRegistry {
        fn start() -> FakeRegistry {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let state = Arc::new(FakeState::default());
            let stop = Arc::new(AtomicBool::new(false));
            let (st, sp) = (state.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if sp.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(conn) = conn else { continue };
                    let st = st.clone();
                    std::thread::spawn(move || serve(conn, &st));
                }
            });
            FakeRegistry {
                addr,
                state,
                stop,
                thread: Some(thread),
            }
        }

        fn host(&self) -> String {
            self.addr.to_string()
        }

        fn route(&self, path: &str, content_type: &str, body: &[u8]) {
            self.state
                .routes
                .lock()
                .unwrap()
                .insert(path.to_string(), (content_type.to_string(), body.to_vec()));
        }

        /// Serves `img` as `lab/<repo>:<tag>`.
        fn serve_image(&self, repo: &str, tag: &str, img: &TestImage) {
            self.route(
                &format!("/v2/lab/{repo}/manifests/{tag}"),
                OCI_MANIFEST,
                &img.manifest,
            );
            self.serve_blobs(repo, img);
        }

        fn serve_blobs(&self, repo: &str, img: &TestImage) {
            self.route(
                &format!("/v2/lab/{repo}/manifests/{}", img.id()),
                OCI_MANIFEST,
                &img.manifest,
            );
            for blob in std::iter::once(&img.config).chain(&img.layers) {
                self.route(
                    &format!("/v2/lab/{repo}/blobs/{}", store_digest(blob)),
                    "application/octet-stream",
                    blob,
                );
            }
        }

        fn cut_blobs(&self, times: usize, after: usize) {
            self.state.cut_after.store(after, Ordering::SeqCst);
            self.state.cuts_left.store(times, Ordering::SeqCst);
        }

        fn log(&self) -> Vec<String> {
            self.state.log.lock().unwrap().clone()
        }

        fn clear_log(&self) {
            self.state.log.lock().unwrap().clear();
        }
    }

    impl Drop for FakeRegistry {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(conn: TcpStream, st: &FakeState) {
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut conn = conn;
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let mut headers = HashMap::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((k, v)) = line.split_once(':') {
                    headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                }
            }
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            let range = headers.get("range").cloned();
            st.log.lock().unwrap().push(format!(
                "{method} {path}{}",
                range
                    .as_ref()
                    .map(|r| format!(" range={r}"))
                    .unwrap_or_default()
            ));
            let json = "application/json";
            let expected_auth = st.auth.lock().unwrap().clone();
            let (status, ctype, body, extra): (u16, String, Vec<u8>, String) =
                if expected_auth.is_some_and(|a| headers.get("authorization") != Some(&a)) {
                    (
                    401,
                    json.into(),
                    br#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#
                        .to_vec(),
                    "WWW-Authenticate: Basic realm=\"fake\"\r\n".into(),
                )
                } else if path == "/v2/" {
                    (200, json.into(), b"{}".to_vec(), String::new())
                } else if let Some((ctype, body)) = st.routes.lock().unwrap().get(&path).cloned() {
                    let digest = format!("Docker-Content-Digest: {}\r\n", store_digest(&body));
                    match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                        Some(r) if path.contains("/blobs/") => {
                            let start: usize = r.trim_end_matches('-').parse().unwrap();
                            let extra = format!(
                                "Content-Range: bytes {start}-{}/{}\r\n",
                                body.len() - 1,
                                body.len()
                            );
                            (206, ctype, body[start..].to_vec(), extra)
                        }
                        _ => (200, ctype, body, digest),
                    }
                } else if path.contains("/blobs/") {
                    (
                    404,
                    json.into(),
                    br#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#
                        .to_vec(),
                    String::new(),
                )
                } else {
                    (
                        404,
                        json.into(),
                        br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown"}]}"#
                            .to_vec(),
                        String::new(),
                    )
                };
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}\r\n",
                body.len()
            );
            if conn.write_all(head.as_bytes()).is_err() {
                return;
            }
            if method == "HEAD" {
                continue;
            }
            let after = st.cut_after.load(Ordering::SeqCst);
            if path.contains("/blobs/")
                && body.len() > after
                && st
                    .cuts_left
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok()
            {
                let _ = conn.write_all(&body[..after]);
                let _ = conn.flush();
                let _ = conn.shutdown(Shutdown::Both);
                return;
            }
            if conn.write_all(&body).is_err() {
                return;
            }
        }
    }

    struct TestImage {
        manifest: Vec<u8>,
        config: Vec<u8>,
        layers: Vec<Vec<u8>>,
    }

    impl TestImage {
        fn new(layers: Vec<Vec<u8>>) -> TestImage {
            let digests: Vec<Digest> = layers.iter().map(|l| store_digest(l)).collect();
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
                        .diff_ids(digests.iter().map(|d| d.to_string()).collect::<Vec<_>>())
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap();
            let config = serde_json::to_vec(&config).unwrap();
            let manifest = ImageManifestBuilder::default()
                .schema_version(2u32)
                .media_type(MediaType::ImageManifest)
                .config(Descriptor::new(
                    MediaType::ImageConfig,
                    config.len() as u64,
                    store_digest(&config),
                ))
                .layers(
                    layers
                        .iter()
                        .zip(&digests)
                        .map(|(l, d)| {
                            Descriptor::new(MediaType::ImageLayer, l.len() as u64, d.clone())
                        })
                        .collect::<Vec<_>>(),
                )
                .build()
                .unwrap();
            TestImage {
                manifest: serde_json::to_vec(&manifest).unwrap(),
                config,
                layers,
            }
        }

        fn id(&self) -> Digest {
            store_digest(&self.manifest)
        }
    }

    /// `n` bytes that do not compress and differ per `seed`.
    fn noise(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn events() -> (ProgressFn, Arc<Mutex<Vec<String>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let f: ProgressFn = Arc::new(move |e: &PullEvent<'_>| {
            let line = match e {
                PullEvent::Resolved { missing, blobs, .. } => format!("resolved {missing}/{blobs}"),
                PullEvent::Progress { .. } => return,
                PullEvent::Retry {
                    offset, attempt, ..
                } => format!("retry {offset} {attempt}"),
                PullEvent::Done { what, bytes, .. } => format!("done {what} {bytes}"),
            };
            s.lock().unwrap().push(line);
        });
        (f, seen)
    }

    fn tmp_files(store: &Store) -> usize {
        std::fs::read_dir(store.root().join("tmp")).unwrap().count()
    }

    #[tokio::test]
    async fn pulls_an_image_and_again_downloads_only_the_manifest() {
        let reg = FakeRegistry::start();
        let img = TestImage::new(vec![noise(100_000, 1), noise(5_000, 2)]);
        reg.serve_image("busybox", "latest", &img);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (progress, seen) = events();
        let opts = PullOptions {
            progress: Some(progress),
            ..PullOptions::default()
        };
        let image = format!("{}/lab/busybox", reg.host());
        let pulled = pull(&store, &image, &opts).await.unwrap();
        assert_eq!(pulled.id.digest(), &img.id());
        assert_eq!(
            pulled.name.as_deref(),
            Some(format!("{image}:latest").as_str())
        );
        assert_eq!((pulled.fetched_blobs, pulled.cached_blobs), (3, 0));
        assert_eq!(pulled.fetched_bytes, 105_000 + img.config.len() as u64);
        assert_eq!(store.resolve(&image).unwrap(), Some(pulled.id.clone()));
        assert_eq!(store.layers(&pulled.id).unwrap().len(), 2);
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "resolved 3/3".to_string(),
                format!("done config {}", img.config.len()),
                "done layer 100000".into(),
                "done layer 5000".into()
            ]
        );

        reg.clear_log();
        let again = pull(&store, &image, &opts).await.unwrap();
        assert_eq!(again.id, pulled.id);
        assert_eq!(
            (again.fetched_blobs, again.fetched_bytes, again.cached_blobs),
            (0, 0, 3)
        );
        let log = reg.log();
        assert!(log.iter().all(|l| !l.contains("/blobs/")), "{log:?}");
        assert!(
            log.iter()
                .any(|l| l == "GET /v2/lab/busybox/manifests/latest"),
            "{log:?}"
        );
        assert_eq!(tmp_files(&store), 0);
    }

    #[tokio::test]
    async fn a_layer_listed_twice_is_fetched_once() {
        let reg = FakeRegistry::start();
        let layer = noise(3000, 12);
        let img = TestImage::new(vec![layer.clone(), noise(10, 13), layer]);
        reg.serve_image("twice", "latest", &img);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pulled = pull(
            &store,
            &format!("{}/lab/twice", reg.host()),
            &PullOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!((pulled.fetched_blobs, pulled.cached_blobs), (3, 0));
        assert_eq!(store.layers(&pulled.id).unwrap().len(), 3);
        let layer_gets = reg
            .log()
            .iter()
            .filter(|l| l.contains(&store_digest(&img.layers[0]).to_string()))
            .count();
        assert_eq!(layer_gets, 1);
    }

    #[tokio::test]
    async fn an_index_resolves_to_the_host_platform() {
        let reg = FakeRegistry::start();
        let host_img = TestImage::new(vec![noise(1000, 3)]);
        let other_img = TestImage::new(vec![noise(1000, 4)]);
        reg.serve_blobs("multi", &host_img);
        reg.serve_blobs("multi", &other_img);
        let other_arch = if Arch::default() == Arch::Amd64 {
            Arch::ARM64
        } else {
            Arch::Amd64
        };
        let entry = |img: &TestImage, arch: Arch| {
            let mut d = Descriptor::new(
                MediaType::ImageManifest,
                img.manifest.len() as u64,
                img.id(),
            );
            d.set_platform(Some(
                PlatformBuilder::default()
                    .os(Os::Linux)
                    .architecture(arch)
                    .build()
                    .unwrap(),
            ));
            d
        };
        let index = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![
                entry(&other_img, other_arch.clone()),
                entry(&host_img, Arch::default()),
            ])
            .build()
            .unwrap();
        let index = serde_json::to_vec(&index).unwrap();
        reg.route("/v2/lab/multi/manifests/1.0", OCI_INDEX, &index);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pulled = pull(
            &store,
            &format!("{}/lab/multi:1.0", reg.host()),
            &PullOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(pulled.id.digest(), &host_img.id());
        let other_layer = store_digest(&other_img.layers[0]);
        assert!(!store.has_blob(&other_layer));
        assert!(
            !store.has_blob(&store_digest(&index)),
            "the index is not kept: no name reaches it"
        );

        // An index with no image for this host names what it has.
        let index_only_other = ImageIndexBuilder::default()
            .schema_version(2u32)
            .media_type(MediaType::ImageIndex)
            .manifests(vec![entry(&other_img, other_arch.clone())])
            .build()
            .unwrap();
        reg.route(
            "/v2/lab/multi/manifests/2.0",
            OCI_INDEX,
            &serde_json::to_vec(&index_only_other).unwrap(),
        );
        let err = pull(
            &store,
            &format!("{}/lab/multi:2.0", reg.host()),
            &PullOptions::default(),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PullError::Unsupported { .. }), "{msg}");
        assert!(
            msg.contains(&format!(
                "no linux/{} image (it has: linux/{other_arch})",
                Arch::default()
            )),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn a_dropped_connection_resumes_with_a_range_request() {
        let reg = FakeRegistry::start();
        let img = TestImage::new(vec![noise(200_000, 5)]);
        reg.serve_image("big", "latest", &img);
        reg.cut_blobs(1, 50_000);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (progress, seen) = events();
        let opts = PullOptions {
            progress: Some(progress),
            ..PullOptions::default()
        };
        let pulled = pull(&store, &format!("{}/lab/big", reg.host()), &opts)
            .await
            .unwrap();
        assert_eq!(store.layers(&pulled.id).unwrap()[0].size, 200_000);
        let layer = store_digest(&img.layers[0]);
        assert_eq!(store.read_blob(&layer).unwrap(), img.layers[0]);
        assert!(
            seen.lock().unwrap().contains(&"retry 50000 2".to_string()),
            "{:?}",
            seen.lock().unwrap()
        );
        let log = reg.log();
        assert!(
            log.iter()
                .any(|l| l == &format!("GET /v2/lab/big/blobs/{layer} range=bytes=50000-")),
            "{log:?}"
        );
        assert_eq!(tmp_files(&store), 0);
    }

    #[tokio::test]
    async fn a_registry_that_keeps_dropping_fails_cleanly() {
        let reg = FakeRegistry::start();
        let img = TestImage::new(vec![noise(200_000, 6)]);
        reg.serve_image("flaky", "latest", &img);
        reg.cut_blobs(usize::MAX, 20_000);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let image = format!("{}/lab/flaky", reg.host());
        let err = pull(&store, &image, &PullOptions::default())
            .await
            .unwrap_err();
        let msg = err.to_string();
        let layer = store_digest(&img.layers[0]);
        assert!(matches!(err, PullError::Download { .. }), "{msg}");
        assert!(
            msg.starts_with(&format!(
                "downloading layer {layer} of `{image}:latest` from {} failed: ",
                reg.host()
            )),
            "{msg}"
        );
        assert!(msg.contains("gave up after 3 tries"), "{msg}");
        // Nothing half-written is visible: no layer blob, no temp file, no name.
        assert!(!store.has_blob(&layer));
        assert!(!store.has_blob(&img.id()));
        assert_eq!(tmp_files(&store), 0);
        assert!(store.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn content_that_does_not_match_its_digest_is_not_stored() {
        let reg = FakeRegistry::start();
        let img = TestImage::new(vec![noise(10_000, 7)]);
        reg.serve_image("bad", "latest", &img);
        let layer = store_digest(&img.layers[0]);
        // Same length, different bytes.
        reg.route(
            &format!("/v2/lab/bad/blobs/{layer}"),
            "application/octet-stream",
            &noise(10_000, 8),
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = pull(
            &store,
            &format!("{}/lab/bad", reg.host()),
            &PullOptions::default(),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PullError::Download { .. }), "{msg}");
        assert!(msg.contains(&layer.to_string()), "{msg}");
        assert!(!store.has_blob(&layer));
        assert_eq!(tmp_files(&store), 0);
        assert!(store.list().unwrap().is_empty());
    }

    #[tokio::test]
    async fn errors_name_the_image_the_registry_and_the_way_out() {
        let reg = FakeRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = pull(
            &store,
            &format!("{}/lab/nothing:1", reg.host()),
            &PullOptions::default(),
        )
        .await
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PullError::NotFound { .. }), "{msg}");
        assert!(
            msg.starts_with(&format!(
                "image `{0}/lab/nothing:1` is not in registry {0}: ",
                reg.host()
            )),
            "{msg}"
        );
        assert!(
            msg.contains("manifest unknown") && msg.contains("stagehand image load FILE"),
            "{msg}"
        );

        // Nothing listens on this port.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = pull(
            &store,
            &format!("127.0.0.1:{port}/lab/busybox"),
            &PullOptions::default(),
        )
        .await
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "cannot reach registry 127.0.0.1:{port} for `127.0.0.1:{port}/lab/busybox:latest`: connection refused; load the image with `stagehand image load FILE` instead"
            )
        );

        let err = pull(&store, "Not A Reference", &PullOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, PullError::InvalidReference { .. }), "{err}");
    }

    #[tokio::test]
    async fn credentials_from_the_auth_file_are_sent() {
        let reg = FakeRegistry::start();
        let img = TestImage::new(vec![noise(1000, 9)]);
        reg.serve_image("private", "latest", &img);
        *reg.state.auth.lock().unwrap() = Some("Basic dXNlcjpzZWNyZXQ=".into()); // user:secret
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let image = format!("{}/lab/private", reg.host());

        let err = pull(&store, &image, &PullOptions::default())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PullError::Unauthorized { .. }), "{msg}");
        assert!(
            msg.contains(&format!(
                "registry {} refused access to `{image}:latest`",
                reg.host()
            )),
            "{msg}"
        );
        assert!(msg.contains("REGISTRY_AUTH_FILE"), "{msg}");

        let file = format!(
            r#"{{"auths":{{"http://{}/v1/":{{"auth":"dXNlcjpzZWNyZXQ="}}}}}}"#,
            reg.host()
        );
        let opts = PullOptions {
            credentials: Credentials::parse(Path::new("auth.json"), &file).unwrap(),
            ..PullOptions::default()
        };
        let pulled = pull(&store, &image, &opts).await.unwrap();
        assert_eq!(pulled.id.digest(), &img.id());
    }

    #[tokio::test]
    async fn a_pinned_digest_already_here_needs_no_registry() {
        let reg = FakeRegistry::start();
        let img = TestImage::new(vec![noise(1000, 10)]);
        reg.serve_image("pinned", "latest", &img);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pinned = format!("{}/lab/pinned@{}", reg.host(), img.id());
        // Pulled by digest from the registry first...
        let first = pull(&store, &pinned, &PullOptions::default())
            .await
            .unwrap();
        assert_eq!(first.id.digest(), &img.id());
        assert_eq!(first.name, None);
        assert_eq!(store.resolve(&pinned).unwrap(), Some(first.id.clone()));
        // ...then again with the registry gone.
        drop(reg);
        let again = pull(&store, &pinned, &PullOptions::default())
            .await
            .unwrap();
        assert_eq!((again.id, again.fetched_blobs), (first.id, 0));

        // A manifest that does not hash to the pinned digest is refused.
        let reg = FakeRegistry::start();
        let wrong = TestImage::new(vec![noise(1000, 11)]);
        reg.route(
            &format!("/v2/lab/pinned/manifests/{}", img.id()),
            OCI_MANIFEST,
            &wrong.manifest,
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = pull(
            &store,
            &format!("{}/lab/pinned@{}", reg.host(), img.id()),
            &PullOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(store.list().unwrap().is_empty(), "{err}");
    }

    #[tokio::test]
    async fn artifacts_and_schema1_are_refused_with_the_reason() {
        let reg = FakeRegistry::start();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        reg.route(
            "/v2/lab/old/manifests/latest",
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            br#"{"schemaVersion":1,"name":"lab/old","tag":"latest","fsLayers":[]}"#,
        );
        let err = pull(
            &store,
            &format!("{}/lab/old", reg.host()),
            &PullOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("schema 1"), "{err}");

        let chart = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.cncf.helm.config.v1+json", "size": 2, "digest": store_digest(b"{}").to_string()},
            "layers": [],
        });
        reg.route(
            "/v2/lab/chart/manifests/1",
            OCI_MANIFEST,
            &serde_json::to_vec(&chart).unwrap(),
        );
        let err = pull(
            &store,
            &format!("{}/lab/chart:1", reg.host()),
            &PullOptions::default(),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains(
                "not a container image (its config is application/vnd.cncf.helm.config.v1+json"
            ),
            "{err}"
        );
    }

    #[test]
    fn auth_files_in_docker_and_podman_formats() {
        let text = r#"{
            "auths": {
                "https://index.docker.io/v1/": {"auth": "aHViOnB3"},
                "registry.lab:5000": {"username": "u", "password": "p"},
                "token.lab": {"registrytoken": "tok"},
                "per.repo/ns/app": {"auth": "cmVwbzpwdw=="},
                "per.repo": {"auth": "aG9zdDpwdw=="},
                "empty.lab": {"auth": ""}
            },
            "credsStore": "desktop"
        }"#;
        let c = Credentials::parse(Path::new("/x/config.json"), text).unwrap();
        let basic = |u: &str, p: &str| Credential::Basic {
            username: u.into(),
            password: p.into(),
        };
        assert_eq!(c.for_registry("docker.io"), Some(&basic("hub", "pw")));
        assert_eq!(c.for_registry("registry.lab:5000"), Some(&basic("u", "p")));
        assert_eq!(c.for_registry("registry.lab"), None);
        assert_eq!(
            c.for_registry("token.lab"),
            Some(&Credential::Bearer("tok".into()))
        );
        assert_eq!(c.for_registry("per.repo"), Some(&basic("host", "pw")));
        assert_eq!(c.for_registry("empty.lab"), None);
        assert!(c.uses_helpers);
        assert_eq!(c.source(), Some(Path::new("/x/config.json")));
        // Secrets never reach Debug output.
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("pw") && !dbg.contains("tok\""), "{dbg}");

        let err = Credentials::parse(
            Path::new("/x/auth.json"),
            r#"{"auths":{"a":{"auth":"!!"}}}"#,
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "registry credentials /x/auth.json: the `auth` of \"a\" is not base64"
            ),
            "{err}"
        );
        let err = Credentials::parse(Path::new("/x/auth.json"), "{").unwrap_err();
        assert!(matches!(err, PullError::AuthFile { .. }), "{err}");
    }

    #[test]
    fn loopback_registries_are_plain_http() {
        for r in [
            "localhost:5000",
            "localhost",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
            "::1",
        ] {
            assert!(is_loopback_registry(r), "{r}");
        }
        for r in [
            "docker.io",
            "registry.lab:5000",
            "10.0.0.5:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback_registry(r), "{r}");
        }
        let opts = PullOptions {
            insecure_registries: vec!["registry.lab:5000".into()],
            ..PullOptions::default()
        };
        assert!(opts.plain_http("registry.lab:5000"));
        assert!(opts.plain_http("Registry.Lab:5000"));
        assert!(!opts.plain_http("registry.lab"));
        assert!(!opts.plain_http("docker.io"));
        let insecure = PullOptions {
            insecure: true,
            ..PullOptions::default()
        };
        assert!(insecure.plain_http("docker.io"));
    }

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_progress_lines() {
        let id = ImageId::new(store_digest(b"m"));
        let d = store_digest(b"layer");
        let hex12 = &d.digest()[..12];
        let feed = |p: &ProgressFn| {
            p(&PullEvent::Resolved {
                image: "r/x:1",
                id: &id,
                blobs: 2,
                missing: 1,
                missing_bytes: 3 << 20,
            });
            p(&PullEvent::Progress {
                digest: &d,
                what: "layer",
                done: 0,
                total: 3 << 20,
            });
            p(&PullEvent::Progress {
                digest: &d,
                what: "layer",
                done: 1 << 20,
                total: 3 << 20,
            });
            p(&PullEvent::Retry {
                digest: &d,
                what: "layer",
                offset: 1 << 20,
                attempt: 2,
                error: "reset",
            });
            p(&PullEvent::Progress {
                digest: &d,
                what: "layer",
                done: 3 << 20,
                total: 3 << 20,
            });
            p(&PullEvent::Done {
                digest: &d,
                what: "layer",
                bytes: 3 << 20,
            });
        };
        let buf = Buf::default();
        feed(&text_progress(Box::new(buf.clone()), false));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            format!(
                "r/x:1: pulling {}: 1 of 2 blobs to fetch (3.0 MiB)\n  layer sha256:{hex12}  connection lost after 1.0 MiB (reset); resuming (try 2)\n  layer sha256:{hex12}  3.0 MiB done\n",
                id.short()
            )
        );
        let buf = Buf::default();
        feed(&text_progress(Box::new(buf.clone()), true));
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains(&format!(
                "\r  layer sha256:{hex12}  0 B / 3.0 MiB\x1b[K\n  layer sha256:{hex12}  connection lost"
            )),
            "{text:?}"
        );
        assert!(
            text.ends_with(&format!("\r  layer sha256:{hex12}  3.0 MiB done\x1b[K\n")),
            "{text:?}"
        );
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(12), "12 B");
    }
}
