#!/usr/bin/env bash
# bench/lib/image-floor.sh load|start
#
# The raw floor of scenario 6, with no image store: `load` unpacks $BENCH_BIG_ARCHIVE (tar)
# and its one gzip layer (tar -xzf) into $BENCH_WORK/s6/floor/rootfs and writes a runc bundle
# next to it; `start` runs `sh -c true` in it with `runc run` (its own new namespaces, the
# rootfs read-only as runc's template has it, no overlay). No digest is checked, nothing is
# recorded: the cost of getting bytes onto the disk and starting a process.
set -euo pipefail
dir="$BENCH_WORK/s6/floor"
case "$1" in
load)
    mkdir -p "$dir/archive" "$dir/rootfs"
    tar -xf "$BENCH_BIG_ARCHIVE" -C "$dir/archive"
    layer=$(jq -r '.manifests[0].digest' "$dir/archive/index.json" | cut -d: -f2)
    layer=$(jq -r '.layers[0].digest' "$dir/archive/blobs/sha256/$layer" | cut -d: -f2)
    tar -xzf "$dir/archive/blobs/sha256/$layer" -C "$dir/rootfs"
    rm -rf "$dir/archive"
    jq --arg rootfs "$dir/rootfs" '.process.terminal = false | .process.args = ["/bin/sh", "-c", "true"]
        | .root = {path: $rootfs, readonly: true}' "$BENCH_WORK/floor/template.json" >"$dir/config.json"
    ;;
start)
    runc --root "$BENCH_WORK/floor/runc-state" run --bundle "$dir" "stagehand-bench-$BENCH_ID-s6" </dev/null
    ;;
*)
    echo "usage: image-floor.sh load|start" >&2
    exit 2
    ;;
esac
