#!/usr/bin/env bash
# Runs the container end-to-end suite a second time through containerd (`--backend containerd`,
# set with STAGEHAND_BACKEND), against a private containerd started here with its own config,
# root, state and sockets under a temp dir, and stopped by its PID when done. Then checks that
# the suite left nothing in containerd but the imported images: no container, task, active
# snapshot or lease in stagehand's namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=$(mktemp -d /tmp/stagehand-containerd-ci.XXXXXX)
cat > "$dir/config.toml" <<CFG
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  address = "$dir/containerd.sock.debug"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
CFG
containerd --config "$dir/config.toml" > "$dir/containerd.log" 2>&1 &
pid=$!
stop() {
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$dir"
}
trap stop EXIT
for _ in $(seq 100); do [ -S "$dir/containerd.sock" ] && break; sleep 0.05; done
[ -S "$dir/containerd.sock" ] || { cat "$dir/containerd.log"; echo "containerd did not start" >&2; exit 1; }
cargo build -p stagehand --features containerd
STAGEHAND_BACKEND=containerd STAGEHAND_CONTAINERD_ADDRESS="$dir/containerd.sock" \
    cargo test -p stagehand-e2e --test container_e2e -- --test-threads=4

ctr=(ctr -a "$dir/containerd.sock" -n stagehand)
left=$(
    "${ctr[@]}" containers ls -q | sed 's/^/container /'
    "${ctr[@]}" tasks ls -q | sed 's/^/task /'
    "${ctr[@]}" leases ls -q | sed 's/^/lease /'
    "${ctr[@]}" snapshots ls | awk 'NR > 1 && $NF == "Active" { print "active snapshot " $1 }'
)
if [ -n "$left" ]; then
    echo "the containerd rerun left in containerd:" >&2
    echo "$left" >&2
    exit 1
fi
echo "containerd rerun: nothing left in containerd ($("${ctr[@]}" images ls -q | wc -l) image(s) imported)"
