# shellcheck shell=bash
# bench/lib/containerd.sh: the private containerd of the pod-cycle scenario's containerd
# contenders. Sourced by bench/run (lib/cleanup.sh's cleanup calls ctd_stop).
#
# Owns: whether the containerd contenders can run (containerd and ctr installed, and a
# stagehand built with `--features containerd`), starting a containerd as runtime-lab §4 does
# (its own config, root, state and sockets under $BENCH_WORK/containerd, CRI disabled) with the
# bench's busybox oci-archive imported for `ctr run`, and stopping it by its PID. Does not own:
# the contenders (lib/ctr-pod.sh; `stagehand run --backend containerd` in bench/run).

BENCH_CTD_DIR="$BENCH_WORK/containerd"
export BENCH_CTD_SOCK="$BENCH_CTD_DIR/containerd.sock"
# ctr's namespace for the raw contender (stagehand uses its own, `stagehand`). ctr's
# containers get cgroups under a parent named after it, which ctd_stop removes.
export BENCH_CTD_NS="stagehand-bench-$BENCH_ID"

# ctd_why_not: nothing when the containerd contenders can run, else why not (one line).
ctd_why_not() {
    command -v containerd >/dev/null || { echo "containerd is not installed"; return 0; }
    command -v ctr >/dev/null || { echo "ctr is not installed"; return 0; }
    local out
    out=$("$BENCH_STAGEHAND" image --root "$BENCH_WORK/ctd-probe" ls --backend containerd \
        --containerd-address "$BENCH_CTD_DIR/none.sock" 2>&1 || true)
    rm -rf "$BENCH_WORK/ctd-probe"
    case "$out" in
    *"does not exist"*) ;;
    *) echo "stagehand was built without --features containerd" ;;
    esac
}

ctd_start() {
    local d=$BENCH_CTD_DIR i
    mkdir -p "$d"
    printf '%s\n' 'version = 2' "root = \"$d/root\"" "state = \"$d/state\"" \
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]' \
        '[grpc]' "  address = \"$d/containerd.sock\"" \
        '[ttrpc]' "  address = \"$d/containerd.sock.ttrpc\"" \
        '[debug]' "  address = \"$d/containerd.sock.debug\"" \
        '[plugins."io.containerd.internal.v1.opt"]' "  path = \"$d/opt\"" >"$d/config.toml"
    containerd --config "$d/config.toml" >"$d/containerd.log" 2>&1 </dev/null &
    echo $! >"$d/pid"
    for ((i = 0; i < 200; i++)); do
        if ctr -a "$BENCH_CTD_SOCK" version >/dev/null 2>&1; then break; fi
        sleep 0.05
    done
    if ! ctr -a "$BENCH_CTD_SOCK" version >/dev/null 2>&1; then
        cat "$d/containerd.log" >&2
        die "containerd did not start"
    fi
    ctr -a "$BENCH_CTD_SOCK" -n "$BENCH_CTD_NS" images import --base-name "${BENCH_IMAGE%:*}" \
        "$BENCH_WORK/busybox-oci.tar" >/dev/null
}

# ctd_stop: stop our containerd by its PID (SIGTERM, SIGKILL after 5 s) and remove its
# directory. Its shims exit with their tasks (every contender removes its tasks). Safe to call
# twice, and when containerd never started.
ctd_stop() {
    local pidf="$BENCH_CTD_DIR/pid" pid i
    if [ -f "$pidf" ]; then
        pid=$(cat "$pidf")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                kill -0 "$pid" 2>/dev/null || break
                sleep 0.05
            done
            kill -9 "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
        rm -f "$pidf"
    fi
    # Snapshot mounts go with the tasks; a lazy unmount for anything left half-way.
    { awk '{print $5}' /proc/self/mountinfo | grep -F "$BENCH_CTD_DIR/" | sort -r || true; } |
        while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$BENCH_CTD_DIR"
    # What containerd's shims leave outside its state dir for our namespace: runc's state
    # root and the (empty) parent cgroups of ctr's containers.
    rmdir "/run/containerd/runc/$BENCH_CTD_NS" 2>/dev/null || true
    { find /sys/fs/cgroup -mindepth 1 -maxdepth 3 -type d -name "$BENCH_CTD_NS" 2>/dev/null || true; } |
        while read -r c; do rmdir "$c" 2>/dev/null || true; done
    return 0
}
