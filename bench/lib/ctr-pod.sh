#!/usr/bin/env bash
# bench/lib/ctr-pod.sh N CHECK_FILE
#
# The raw containerd contender of the pod cycle (scenario 1): what `ctr` does for the same
# work, against the bench's private containerd (lib/containerd.sh; the image imported
# beforehand): a named network namespace (loopback only), `ctr run -d --null-io` of N services
# (lib/common.sh svc_cmd) joining it, `ctr run --rm` of the Run step (the script in
# CHECK_FILE), then `ctr task rm -f` of every service (SIGKILL, as `pod rm -f -t 0`),
# `ctr containers rm` (their snapshots go with them) and the namespace. Every container gets an
# overlayfs snapshot of containerd's own; no cgroup limits, no logs, no readiness.
#
# Exits non-zero when any ctr command or the Run step fails; what it started is removed
# either way.
set -euo pipefail
# shellcheck source=lib/common.sh
. "$BENCH_LIB/common.sh"

n=$1 check_file=$2
name="stagehand-bench-$BENCH_ID-ctr$$"
ctr=(ctr -a "$BENCH_CTD_SOCK" -n "$BENCH_CTD_NS")
with_ns=(--with-ns "network:/var/run/netns/$name")
ids=()

teardown() {
    local id rc=0
    for id in "${ids[@]}"; do
        "${ctr[@]}" task rm -f "$id" >/dev/null 2>&1 || true
    done
    if [ ${#ids[@]} -gt 0 ]; then "${ctr[@]}" containers rm "${ids[@]}" >/dev/null || rc=1; fi
    ids=()
    if ip netns list | grep -qw "$name"; then ip netns del "$name" || rc=1; fi
    return $rc
}
trap 'teardown || true' EXIT

ip netns add "$name"
ip -n "$name" link set lo up
for ((i = 0; i < n; i++)); do
    ids+=("$name-svc$i")
    "${ctr[@]}" run -d --null-io "${with_ns[@]}" "$BENCH_IMAGE" "$name-svc$i" sh -c "$(svc_cmd "$i")" >/dev/null
done
"${ctr[@]}" run --rm "${with_ns[@]}" "$BENCH_IMAGE" "$name-check" sh -c "$(cat "$check_file")" >/dev/null
teardown
