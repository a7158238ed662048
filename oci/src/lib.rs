//! Images, root filesystems, OCI runtime specs and runtime backends. Knows nothing of pipelines.
