#!/usr/bin/env bash
# bench/smoke-test.sh [bench/run options]
#
# The CI check that the benchmark still runs: builds stagehand (debug, as the test suite
# does), runs `bench/run --smoke` with a 3-minute limit, checks that its results cover every
# scenario with at least one sample per contender, and checks from the outside that nothing was
# left behind: no process, network namespace, cgroup, mount or work directory of the bench, no
# new iptables chain, none of podman's state directories that were not there before, the
# blob-info cache under /var/lib/containers as it was. Results go to a temporary directory
# that is removed. Exit 0 only if all of that holds. Run as root.
#
# Extra arguments go to bench/run (e.g. `--bin PATH` to test a given binary; then nothing is
# built).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "smoke-test: run as root" >&2; exit 2; }

fail() {
    echo "smoke-test: FAILED: $*" >&2
    exit 1
}

state() {
    echo "## netns"
    ip netns list 2>/dev/null | awk '{print $1}' | grep '^stagehand-bench' || true
    echo "## work dirs"
    ls -d /tmp/stagehand-bench.* 2>/dev/null || true
    echo "## cgroups"
    find /sys/fs/cgroup -mindepth 1 -maxdepth 6 -type d \( -name 'stagehand-bench*' -o -path '*/libpod_parent*' \) 2>/dev/null | sort
    echo "## iptables"
    if command -v iptables-save >/dev/null; then iptables-save 2>/dev/null | grep '^:' | cut -d' ' -f1 | sort; fi
    echo "## dirs"
    for d in /run/containers /run/libpod /run/runc /var/lib/containers; do [ -e "$d" ] && echo "$d"; done
    if [ -f /var/lib/containers/cache/blob-info-cache-v1.boltdb ]; then
        sha256sum /var/lib/containers/cache/blob-info-cache-v1.boltdb
    fi
    echo "## mounts"
    awk '$5 ~ /stagehand-bench/ {print $5}' /proc/self/mountinfo
    return 0
}

processes() {
    local pid cmd
    for pid in /proc/[0-9]*; do
        pid=${pid#/proc/}
        [ "$pid" = $$ ] && continue
        cmd=$(tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline") || continue
        case "$cmd" in
        *smoke-test.sh*) ;;
        */tmp/stagehand-bench.* | *stagehand-bench-* | *stagehand_bench_*) echo "$pid $cmd" ;;
        esac
    done
}

build=(--no-build)
for a in "$@"; do [ "$a" = --bin ] && build=(); done
if [ ${#build[@]} -gt 0 ]; then
    command -v cargo >/dev/null || export PATH="$HOME/.cargo/bin:$PATH"
    # bench/run installs the packages; the binary is built here so that the time limit below
    # measures the bench, not the compiler.
    # With the containerd backend when protoc is there: the pod cycle's containerd contenders.
    features=()
    if command -v protoc >/dev/null; then features=(--features containerd); fi
    cargo build -q -p stagehand "${features[@]}"
fi

out=$(mktemp -d /tmp/stagehand-smoke-results.XXXXXX)
trap 'rm -rf "$out"' EXIT
before=$(state)
start=$(date +%s)
rc=0
timeout --signal=TERM --kill-after=30 180 bench/run --smoke --out "$out" "${build[@]}" "$@" || rc=$?
elapsed=$(($(date +%s) - start))
[ "$rc" = 0 ] || fail "bench/run --smoke exited with $rc after ${elapsed}s (124 or 143: the 3-minute limit)"
echo "smoke-test: bench/run --smoke took ${elapsed}s"

json=$(find "$out" -name 'smoke-*.json' | head -1)
[ -n "$json" ] || fail "no results JSON in $out"
jq -e '
    .schema == "stagehand-bench/1"
    and ([.scenarios[].number] | unique) == [1, 2, 3, 4, 5, 6, 7]
    and all(.scenarios[]; (.contenders | length) >= 2
        and (.contenders[0].ratio == 1 or .contenders[0].median == 0)
        and all(.contenders[]; .n >= 1 and (.samples | length) == .n and .median != null))
' "$json" >/dev/null || fail "results JSON $json is incomplete: $(jq -c '[.scenarios[] | {id, n: [.contenders[].n]}]' "$json")"
ls "$out"/smoke-*.md >/dev/null 2>&1 || fail "no markdown table in $out"

after=$(state)
[ "$before" = "$after" ] || fail "left behind:
$(diff <(echo "$before") <(echo "$after") | grep '^>' || true)"
left=$(processes)
[ -z "$left" ] || fail "processes left behind:
$left"
echo "smoke-test: ok (every scenario ran, nothing left behind)"
