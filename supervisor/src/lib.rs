//! Processes, cgroups, namespaces, ports and teardown. Knows nothing of pipelines or images.
