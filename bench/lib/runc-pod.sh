#!/usr/bin/env bash
# bench/lib/runc-pod.sh prepare NAME N CHECK_FILE kill|term
# bench/lib/runc-pod.sh run NAME [TIMES_FILE]
#
# The raw runtime floor of the pod scenarios: a named network namespace (loopback only) and
# one `runc run` per service in it, run by this script with no supervision: no readiness, no
# logs, no cgroup limits, no per-container overlay (every container shares the bench's busybox
# root filesystem read-only, with a tmpfs /tmp), no init unless asked.
#
# `prepare` writes the bundles once, outside any timing (NAME names the set): N services
# (lib/common.sh svc_cmd) and the Run step `check` (the script in CHECK_FILE), all joining the
# namespace /run/netns/stagehand-bench-$BENCH_ID. With `term` every container runs the static
# catatonit as PID 1 (bind-mounted at /dev/init, as runtime-lab §3 does), so SIGTERM reaches
# the service.
#
# `run` is what is timed: create the namespace, start the services (`runc run` in the
# background: each exits and deletes its container when its init dies), run `check` in the
# foreground, then stop the services (`kill`: SIGKILL; `term`: SIGTERM, SIGKILL after 10 s),
# wait for every `runc run` to return and delete the namespace. TIMES_FILE gets
# "END_NS GONE_NS": when check returned, and when all of that was done.
set -euo pipefail
# shellcheck source=lib/common.sh
. "$BENCH_LIB/common.sh"

root="$BENCH_WORK/floor/runc-state"
ns="stagehand-bench-$BENCH_ID"

prepare() {
    local name=$1 n=$2 check_file=$3 mode=$4 dir i
    dir="$BENCH_WORK/floor/$name"
    rm -rf "$dir"
    mkdir -p "$dir"
    echo "$mode" >"$dir/mode"
    if [ ! -f "$BENCH_WORK/floor/template.json" ]; then
        (cd "$BENCH_WORK/floor" && runc spec && mv config.json template.json)
    fi
    for ((i = 0; i < n; i++)); do
        bundle "$dir/svc$i" "$mode" "$(svc_cmd "$i")"
    done
    bundle "$dir/check" "$mode" "$(cat "$check_file")"
}

# bundle DIR MODE SCRIPT: a config.json running `sh -c SCRIPT`.
bundle() {
    mkdir -p "$1"
    jq --arg script "$3" --arg mode "$2" --arg rootfs "$BENCH_ROOTFS" \
        --arg netns "/run/netns/$ns" '
        .process.terminal = false
        | .process.args = ["/bin/sh", "-c", $script]
        | .root = {path: $rootfs, readonly: true}
        | .hostname = "bench"
        | .mounts += [{destination: "/tmp", type: "tmpfs", source: "tmpfs",
                       options: ["nosuid", "nodev", "mode=1777"]}]
        | .linux.namespaces |= map(if .type == "network" then {type: "network", path: $netns} else . end)
        | if $mode == "term" then
            .mounts += [{destination: "/dev/init", type: "bind", source: "/usr/bin/catatonit",
                         options: ["bind", "ro"]}]
            | .process.args = ["/dev/init", "--"] + .process.args
          else . end
    ' "$BENCH_WORK/floor/template.json" >"$1/config.json"
}

run() {
    local name=$1 times_file=${2:-} dir mode ids=() pids=() kp=() pending=() rc=0 i k id sig end deadline alive
    dir="$BENCH_WORK/floor/$name"
    mode=$(cat "$dir/mode")
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    for b in "$dir"/svc*; do
        id="$ns-$(basename "$b")"
        runc --root "$root" run --bundle "$b" "$id" </dev/null >/dev/null 2>&1 &
        ids+=("$id")
        pids+=($!)
    done
    runc --root "$root" run --bundle "$dir/check" "$ns-check" </dev/null >"$dir/check.log" 2>&1 || rc=$?
    end=$(now_ns)

    sig=KILL
    deadline=0
    if [ "$mode" = term ]; then
        sig=TERM
        deadline=$((end + 10000000000))
    fi
    # Signal every container; a `runc kill` fails for a container whose `runc run` has not
    # created it yet, so those are signalled again 10 ms later, until every `runc run` has
    # returned. SIGKILL for everyone still there after the deadline.
    pending=("${!pids[@]}")
    while :; do
        kp=()
        for i in "${pending[@]}"; do
            if kill -0 "${pids[$i]}" 2>/dev/null; then
                runc --root "$root" kill "${ids[$i]}" "$sig" 2>/dev/null &
                kp+=("$i:$!")
            fi
        done
        pending=()
        for k in "${kp[@]}"; do
            wait "${k#*:}" 2>/dev/null || pending+=("${k%%:*}")
        done
        if [ "$deadline" -gt 0 ] && [ "$sig" = TERM ] && [ "$(now_ns)" -gt "$deadline" ]; then
            sig=KILL
            pending=("${!pids[@]}")
        fi
        alive=0
        for i in "${!pids[@]}"; do
            if kill -0 "${pids[$i]}" 2>/dev/null; then alive=1; fi
        done
        [ "$alive" = 0 ] && break
        # Nothing to signal again: wait for the `runc run`s to return (each deletes its
        # container once its init has died).
        if [ ${#pending[@]} -eq 0 ]; then
            if [ "$deadline" -gt 0 ] && [ "$sig" = TERM ]; then
                sleep 0.005
                continue
            fi
            break
        fi
        sleep 0.01
    done
    wait "${pids[@]}" 2>/dev/null || true
    ip netns del "$ns"
    if [ -n "$times_file" ]; then echo "$end $(now_ns)" >"$times_file"; fi
    if [ "$rc" -ne 0 ]; then
        echo "runc-pod: check failed (exit $rc):" >&2
        cat "$dir/check.log" >&2
    fi
    return "$rc"
}

case "${1:-}" in
prepare) prepare "$2" "$3" "$4" "$5" ;;
run) run "$2" "${3:-}" ;;
*)
    echo "usage: runc-pod.sh prepare NAME N CHECK_FILE kill|term | run NAME [TIMES_FILE]" >&2
    exit 2
    ;;
esac
