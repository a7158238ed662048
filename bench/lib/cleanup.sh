# shellcheck shell=bash
# bench/lib/cleanup.sh: what the bench leaves behind, and removing it. Sourced by bench/run.
#
# Owns: the snapshot of shared state taken before anything runs (whether /run/containers,
# /run/runc, /run/stagehand, /var/lib/stagehand, /var/lib/containers and podman's
# `libpod_parent` cgroups existed, the iptables chains, net.ipv4.ip_forward, a copy of
# containers/image's blob-info cache), `leftovers` (everything of this bench run that
# still exists, one line each) and `cleanup` (remove all of it; safe to call twice, also after
# a failure half-way). Everything is found by the bench's own names: the work directory
# $BENCH_WORK, `stagehand-bench-$BENCH_ID` (netns, runc containers, podman pods), the
# pipeline identifier `stagehand_bench_$BENCH_ID` (stagehand's run directories), podman's
# private storage. Nothing of anyone else is touched, and processes are
# stopped by PID only.
# Does not own: measuring, or the contenders' own teardown (that is what is measured).

BEFORE="$BENCH_WORK/before"

snapshot_before() {
    mkdir -p "$BEFORE"
    local d
    for d in /run/containers /run/runc /run/libpod /run/stagehand /var/lib/stagehand \
        /var/lib/stagehand/sequence /var/lib/containers /var/lib/containers/cache; do
        if [ -e "$d" ]; then echo "$d"; fi
    done >"$BEFORE/dirs"
    libpod_cgroups >"$BEFORE/libpod-cgroups"
    iptables_chains >"$BEFORE/chains"
    sysctl -n net.ipv4.ip_forward >"$BEFORE/ip_forward"
    # containers/image, as root, records blob digests in this file whatever the storage
    # configuration says (`podman load` writes it): put it back as it was at the end.
    if [ -f "$BLOB_CACHE" ]; then cp -p "$BLOB_CACHE" "$BEFORE/blob-info-cache"; fi
}

BLOB_CACHE=/var/lib/containers/cache/blob-info-cache-v1.boltdb

existed_before() { grep -qxF "$1" "$BEFORE/dirs"; }

# Every cgroup directory under podman's cgroupfs parent, in every v1 hierarchy
# (/sys/fs/cgroup/<controller>/libpod_parent) or at the root of a v2 one.
libpod_cgroups() {
    local p
    for p in /sys/fs/cgroup/libpod_parent /sys/fs/cgroup/*/libpod_parent; do
        if [ -d "$p" ]; then find "$p" -type d; fi
    done | sort -u
}

# "TABLE CHAIN" for every iptables chain (netavark adds NETAVARK-* chains when a bridge network
# is used; the bench uses none, and checks that it stays so).
iptables_chains() {
    command -v iptables-save >/dev/null || return 0
    iptables-save 2>/dev/null | awk '/^\*/ {t = substr($1, 2)} /^:/ {print t, substr($1, 2)}' | sort
}

# Run directories of this bench's stagehand runs (their summary names our pipeline).
our_run_dirs() {
    local f
    for f in /run/stagehand/*/summary.json; do
        [ -f "$f" ] || continue
        if grep -q "stagehand_bench_$BENCH_ID" "$f"; then dirname "$f"; fi
    done
}

podman_ready() { [ -d "$BENCH_WORK/podman/root" ] && command -v podman >/dev/null; }

# leftovers [strict]: one line per thing of this bench run that still exists. Without
# `strict` (between rounds, before cleanup) podman's known side effects outside its storage
# (/run/containers, the empty pod cgroups cgroupfs leaves in the name=systemd and unified
# hierarchies) are not reported: `cleanup` removes them. With it, everything is.
leftovers() {
    local strict=${1:-} ids=() d id pid cmd
    # (Asking podman recreates /run/containers, so after cleanup its conmon processes, which
    # name the storage in $BENCH_WORK, and its cgroups are checked instead.)
    if [ -z "$strict" ] && podman_ready; then
        podman ps -a --format 'podman container {{.Names}}' 2>/dev/null || true
        podman pod ps --format 'podman pod {{.Name}}' 2>/dev/null || true
    fi
    if [ -d "$BENCH_WORK/floor/runc-state" ]; then
        runc --root "$BENCH_WORK/floor/runc-state" list -q 2>/dev/null | sed 's/^/runc container /'
    fi
    ip netns list 2>/dev/null | awk -v p="stagehand-bench-$BENCH_ID" 'index($1, p) == 1 {print "netns " $1}'
    for d in $(our_run_dirs); do
        id=$(basename "$d")
        ids+=("$id")
        if ! jq -e '.finished == true' "$d/state.json" >/dev/null 2>&1; then
            echo "stagehand run $id not finished ($d/state.json)"
        fi
    done
    # Processes: anything naming the work directory or our names (the containers' processes
    # have no such name, but live in cgroups, checked below).
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [ "$pid" = $$ ] || [ "$pid" = "$BASHPID" ] && continue
        cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || continue
        case "$cmd" in
        *"$BENCH_WORK"* | *"stagehand-bench-$BENCH_ID"* | *"stagehand_bench_$BENCH_ID"*)
            echo "process $pid: ${cmd:0:160}"
            ;;
        esac
        for id in "${ids[@]}"; do
            case "$cmd" in *"$id"*) echo "process $pid: ${cmd:0:160}" ;; esac
        done
    done
    # cgroups: the floor's containers, stagehand's runs, podman's pods and containers.
    local pat=(-name "*stagehand-bench-$BENCH_ID*")
    for id in "${ids[@]}"; do pat+=(-o -name "*$id*"); done
    find /sys/fs/cgroup -mindepth 2 -maxdepth 6 -type d \( "${pat[@]}" \) 2>/dev/null | sed 's/^/cgroup /'
    if [ -n "$strict" ]; then
        comm -13 "$BEFORE/libpod-cgroups" <(libpod_cgroups) | sed 's/^/podman cgroup /'
    else
        # Outside the two hierarchies podman forgets, a pod's or container's cgroups must be
        # gone (podman's parents, libpod_parent and libpod_parent/conmon, stay until cleanup).
        comm -13 "$BEFORE/libpod-cgroups" <(libpod_cgroups) | grep -vE '^/sys/fs/cgroup/((systemd|unified)/|([^/]+/)?libpod_parent(/conmon)?$)' |
            sed 's/^/podman cgroup /' || true
    fi
    # Mounts under the work directory or a run directory of ours.
    awk '{print $5}' /proc/self/mountinfo | while read -r d; do
        case "$d" in "$BENCH_WORK"/*) echo "mount $d" ;; esac
        for id in "${ids[@]}"; do
            case "$d" in */"$id"/* | */"$id") echo "mount $d" ;; esac
        done
    done
    comm -13 "$BEFORE/chains" <(iptables_chains) | sed 's/^/iptables chain /'
    if [ "$(sysctl -n net.ipv4.ip_forward)" != "$(cat "$BEFORE/ip_forward")" ]; then
        echo "sysctl net.ipv4.ip_forward changed"
    fi
    if [ -n "$strict" ]; then
        for d in /run/containers /run/libpod /var/lib/containers; do
            if [ -e "$d" ] && ! existed_before "$d"; then echo "directory $d (podman)"; fi
        done
        if [ -f "$BEFORE/blob-info-cache" ] && ! cmp -s "$BEFORE/blob-info-cache" "$BLOB_CACHE"; then
            echo "file $BLOB_CACHE changed"
        fi
    fi
    return 0
}

cleanup() {
    local pid d id t c
    # Our own background processes (sampler, a contender interrupted half-way), by PID.
    for pid in $(jobs -p); do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    # The private containerd of the pod cycle (lib/containerd.sh), if a failure left it up:
    # its containers first, then the daemon, by PID.
    if [ -S "${BENCH_CTD_SOCK:-}" ]; then
        for id in $(ctr -a "$BENCH_CTD_SOCK" -n "$BENCH_CTD_NS" containers ls -q 2>/dev/null); do
            ctr -a "$BENCH_CTD_SOCK" -n "$BENCH_CTD_NS" task rm -f "$id" >/dev/null 2>&1 || true
            ctr -a "$BENCH_CTD_SOCK" -n "$BENCH_CTD_NS" containers rm "$id" >/dev/null 2>&1 || true
        done
    fi
    if declare -F ctd_stop >/dev/null; then ctd_stop; fi
    if podman_ready; then
        podman pod rm -af -t 0 >/dev/null 2>&1 || true
        podman rm -af -t 0 >/dev/null 2>&1 || true
    fi
    if [ -d "$BENCH_WORK/floor/runc-state" ]; then
        for id in $(runc --root "$BENCH_WORK/floor/runc-state" list -q 2>/dev/null); do
            runc --root "$BENCH_WORK/floor/runc-state" delete -f "$id" >/dev/null 2>&1 || true
        done
    fi
    for id in $(ip netns list 2>/dev/null | awk -v p="stagehand-bench-$BENCH_ID" 'index($1, p) == 1 {print $1}'); do
        ip netns del "$id" 2>/dev/null || true
    done
    # stagehand: a run that did not finish its teardown (the bench was interrupted) is what
    # `stagehand gc` is for; then the run directories go. (The sequence counter is in the
    # bench's store, `--root` under $BENCH_WORK.)
    for d in $(our_run_dirs); do
        if ! jq -e '.finished == true' "$d/state.json" >/dev/null 2>&1 && [ -x "${BENCH_STAGEHAND:-}" ]; then
            "$BENCH_STAGEHAND" gc >/dev/null 2>&1 || true
        fi
        rm -rf "$d"
    done
    for d in /var/lib/stagehand/sequence /var/lib/stagehand /run/stagehand; do
        if ! existed_before "$d"; then rmdir "$d" 2>/dev/null || true; fi
    done
    # podman's side effects outside its storage: netavark's state dir and runc's default
    # state root (created even with `--network none` and a private runroot), the pod cgroups
    # cgroupfs leaves in the `name=systemd` and unified hierarchies.
    # /run/containers only while it holds no file: with a bridge network, netavark keeps its
    # IPAM database there, and that would be someone else's.
    for d in /run/containers /run/libpod; do
        if [ -e "$d" ] && ! existed_before "$d" && [ -z "$(find "$d" -type f -print -quit)" ]; then
            rm -rf "$d"
        fi
    done
    if [ -f "$BEFORE/blob-info-cache" ]; then
        if ! cmp -s "$BEFORE/blob-info-cache" "$BLOB_CACHE"; then
            # A copy renamed over it: a reader holding the file open keeps a consistent one.
            cp -p "$BEFORE/blob-info-cache" "$BLOB_CACHE.stagehand-bench" &&
                mv -f "$BLOB_CACHE.stagehand-bench" "$BLOB_CACHE"
        fi
    else
        rm -f "$BLOB_CACHE"
        for d in /var/lib/containers/cache /var/lib/containers; do
            if ! existed_before "$d"; then rmdir "$d" 2>/dev/null || true; fi
        done
    fi
    if [ -d /run/runc ] && ! existed_before /run/runc; then rmdir /run/runc 2>/dev/null || true; fi
    comm -13 "$BEFORE/libpod-cgroups" <(libpod_cgroups) | awk '{print length, $0}' | sort -rn |
        cut -d' ' -f2- | while read -r d; do rmdir "$d" 2>/dev/null || true; done
    # iptables chains that appeared (only if a bridge network was used after all): drop the
    # rules jumping to them, then the chains.
    comm -13 "$BEFORE/chains" <(iptables_chains) | while read -r t c; do
        iptables-save -t "$t" | grep -E -- "^-A .* -j $c( |$)" | sed 's/^-A /-D /' |
            while read -r rule; do eval "iptables -t $t $rule" 2>/dev/null || true; done
        iptables -t "$t" -F "$c" 2>/dev/null || true
        iptables -t "$t" -X "$c" 2>/dev/null || true
    done
    if [ -f "$BEFORE/ip_forward" ] && [ "$(sysctl -n net.ipv4.ip_forward)" != "$(cat "$BEFORE/ip_forward")" ]; then
        sysctl -qw net.ipv4.ip_forward="$(cat "$BEFORE/ip_forward")" || true
    fi
    # Mounts under the work directory (podman's overlay of a container removed half-way).
    awk '{print $5}' /proc/self/mountinfo | grep -F "$BENCH_WORK/" | sort -r |
        while read -r d; do umount "$d" 2>/dev/null || umount -l "$d" 2>/dev/null || true; done
}
