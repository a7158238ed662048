//! Images, root filesystems, OCI runtime specs and runtime backends. Knows nothing of pipelines.
//!
//! This root only lists the modules and rolls each module's error enum into the crate
//! [`Error`]. The crate asks `supervisor` for nothing: it is handed paths (a store root, a
//! container directory, the stage netns path, the step cgroup path) and returns data (a
//! mounted root filesystem, a `config.json`, the argv of a runtime command). It never spawns
//! a long-lived process itself: the runner spawns `runc run` through the supervisor, so the
//! global reaper stays the only one waiting on children.
//!
//! The path from an image to a running container:
//! [`store`] (content-addressed image store, names) → [`archive`] (`load` of oci-archive and
//! docker-archive tarballs, `import` of a root filesystem) or [`pull`] (from a registry) →
//! [`unpack`] (layers unpacked once into a layer cache) → [`rootfs`] (an overlayfs per
//! container) → [`spec`] (the OCI runtime spec) → [`runtime`] (the argv of `runc run`, `kill`,
//! `delete`, `state`).

pub mod archive;
mod compression;
mod fsutil;
pub mod pull;
pub mod rootfs;
pub mod runtime;
pub mod spec;
pub mod store;
pub mod unpack;

pub use oci_spec;
pub use oci_spec::distribution::Reference;

/// Every failure this crate reports, one variant per failure domain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The image store: blobs, names, manifests, configs.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Loading or importing an archive.
    #[error(transparent)]
    Archive(#[from] archive::ArchiveError),
    /// Pulling from a registry.
    #[error(transparent)]
    Pull(#[from] pull::PullError),
    /// Unpacking a layer.
    #[error(transparent)]
    Unpack(#[from] unpack::UnpackError),
    /// Mounting or removing a container root filesystem.
    #[error(transparent)]
    Rootfs(#[from] rootfs::RootfsError),
    /// Building or writing a runtime spec.
    #[error(transparent)]
    Spec(#[from] spec::SpecError),
    /// Locating or driving the OCI runtime.
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
}
