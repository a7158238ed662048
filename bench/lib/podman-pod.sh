#!/usr/bin/env bash
# bench/lib/podman-pod.sh N CHECK_FILE kill|term [TIMES_FILE]
#
# The podman contender of the pod scenarios, as the issue describes it: `pod create`
# (`--network none`, like stagehand's `--network none` stage), `run -d` of N services
# (lib/common.sh svc_cmd), `run --rm` of the Run step (the script in CHECK_FILE), then
# `pod rm -f`. podman is configured as runtime-lab §5 says (runc, cgroupfs, file events, its
# own storage): bench/run exports CONTAINERS_CONF and CONTAINERS_STORAGE_CONF.
#
#   kill  `pod rm -f -t 0`: no grace period (scenarios 1, 2, 5).
#   term  services run with `--init` (catatonit as PID 1 forwards SIGTERM, so they honour it)
#         and the pod goes with `pod rm -f -t 10`; TIMES_FILE gets "END_NS GONE_NS": when the
#         Run step returned, and when `pod rm` had returned and no conmon of the pod was left
#         (scenario 4).
#
# Exits non-zero when any podman command or the Run step fails; the pod is removed either way.
set -euo pipefail
# shellcheck source=lib/common.sh
. "$BENCH_LIB/common.sh"

n=$1 check_file=$2 mode=$3 times_file=${4:-}
pod="stagehand-bench-$BENCH_ID-$$"
init=()
timeout=0
if [ "$mode" = term ]; then
    init=(--init)
    timeout=10
fi

removed=""
remove_pod() {
    [ -n "$removed" ] && return 0
    removed=1
    podman pod rm -f -t "$timeout" "$pod" >/dev/null
}
trap 'remove_pod || true' EXIT

podman pod create --name "$pod" --network none >/dev/null
for ((i = 0; i < n; i++)); do
    podman run -d "${init[@]}" --pod "$pod" --name "$pod-svc$i" "$BENCH_IMAGE" sh -c "$(svc_cmd "$i")" >/dev/null
done
podman run --rm "${init[@]}" --pod "$pod" --name "$pod-check" "$BENCH_IMAGE" sh -c "$(cat "$check_file")" >/dev/null
end=$(now_ns)
remove_pod
if [ -n "$times_file" ]; then
    # `pod rm` returns once podman has removed the containers; their conmon processes exit
    # on their own just before or after. Count the stage as gone when none is left.
    while pgrep -f -- "-n $pod-" >/dev/null; do sleep 0.002; done
    echo "$end $(now_ns)" >"$times_file"
fi
