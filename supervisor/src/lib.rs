//! Processes, cgroups, namespaces, ports and teardown. Knows nothing of pipelines or images.
//!
//! This root only lists the modules and rolls each module's error enum into the crate
//! [`Error`]. Adding a module is one `pub mod x;` line here plus, if it has its own failure
//! domain, one `#[from]` variant in [`Error`].
//!
//! Process layer: [`process`] (spawning, waiting, stopping, output lines), [`reaper`] (the one
//! thread that waits on every child and descendant), [`signals`] (SIGINT/SIGTERM for the
//! runner). All `unsafe` lives in the private `sys` module.
//!
//! Stage layer: [`cgroup`], [`netns`], [`forward`], [`hosts`] and [`slirp`], composed by
//! [`stage`] into one sandbox per stage run, with the `state.json` journal `gc` undoes.

pub mod cgroup;
pub mod forward;
pub mod hosts;
pub mod netns;
pub mod process;
pub mod reaper;
pub mod signals;
pub mod slirp;
pub mod stage;
mod sys;
pub mod userns;

/// Every failure the supervisor reports, one variant per failure domain.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Preparing, spawning or signalling a process failed.
    #[error(transparent)]
    Process(#[from] process::ProcessError),
    /// The global reaper could not be installed or is no longer running.
    #[error(transparent)]
    Reaper(#[from] reaper::ReaperError),
    /// Listening for termination signals failed.
    #[error(transparent)]
    Signal(#[from] signals::SignalError),
    /// Creating, filling, killing or removing a cgroup failed.
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    /// The stage network (namespace, port forwarders, hosts file, slirp4netns) failed.
    #[error(transparent)]
    Net(#[from] netns::NetError),
    /// Setting up or tearing down a stage sandbox failed.
    #[error(transparent)]
    Stage(#[from] stage::StageError),
    /// Entering the rootless user namespace failed.
    #[error(transparent)]
    Userns(#[from] userns::UsernsError),
}
