# shellcheck shell=bash
# bench/lib/common.sh: what bench/run and the contender scripts share: logging, clocks, the
# services and the check every pod scenario runs (the same for every contender), and the
# pipeline YAML generators. Sourced, never run. Reads the BENCH_* variables bench/run exports
# (BENCH_ID, BENCH_WORK, BENCH_LIB, BENCH_STAGEHAND, BENCH_IMAGE, ...), so a contender script
# that hyperfine starts needs nothing else. Does not own: measuring (bench/run), cleanup
# (lib/cleanup.sh), or any contender's own steps (lib/podman-pod.sh, lib/runc-pod.sh, ...).

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

# Wall clock in nanoseconds (GNU date). Every timestamp the bench compares comes from this
# clock or from stagehand's event times, which are the same CLOCK_REALTIME.
now_ns() { date +%s%N; }

# Milliseconds since the epoch of an RFC 3339 time as stagehand prints it
# (2026-11-22T17:24:12.375Z).
iso_ms() { date -d "$1" +%s%3N; }

# The busybox shell command of pod service $1 (0-based). Three kinds in turn, as in the
# issue: an httpd, an `nc` loop, a sleeper. Ports depend on the index so that 30 services do
# not collide: httpd on 8080+i, nc on 9000+i. The check reaches service 0 and service 1.
svc_cmd() {
    case $(($1 % 3)) in
    0) echo "exec httpd -f -p 127.0.0.1:$((8080 + $1)) -h /var/www" ;;
    1) echo "while true; do echo pong | nc -l -p $((9000 + $1)); done" ;;
    2) echo "exec sleep 3600" ;;
    esac
}

# The Run step of the pod scenarios: talk to the httpd (service 0) and the nc loop (service 1),
# retrying every 20 ms for at most 10 s while they start (no contender waits for readiness on
# its own here, so every one of them runs this same loop).
check_script() {
    cat <<'EOF'
i=0; until wget -qO- http://127.0.0.1:8080/ >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 500 ] || { echo "httpd unreachable"; exit 1; }; sleep 0.02; done
i=0; until echo ping | nc 127.0.0.1 9001 | grep -q pong; do i=$((i+1)); [ $i -lt 500 ] || { echo "nc unreachable"; exit 1; }; sleep 0.02; done
echo "reached httpd and nc"
EOF
}

# The Run step of the overhead scenario: just be there for $1 seconds. The odd fraction makes
# its process easy to find from the host (`sleep 10.007`), which marks the measuring window.
idle_script() { echo "exec sleep $1.007"; }

# The pipeline identifier and stage identifier of every pipeline the bench writes: unique per
# bench run, so the run directories stagehand keeps can be found and removed afterwards
# (stagehand names nothing after the workspace).
pipeline_id() { echo "stagehand_bench_${BENCH_ID}"; }

# Indent stdin by $1 spaces (for YAML block scalars).
indent() { sed "s/^/$(printf '%*s' "$1" '')/"; }

yaml_head() {
    cat <<EOF
# Written by bench/run (scenario: $1). Regenerated every run.
pipeline:
  name: stagehand bench $1
  identifier: $(pipeline_id)
  stages:
    - stage:
        identifier: $(pipeline_id)
        name: $1
        type: CI
        spec:
          execution:
            steps:
EOF
}

# A container step. $1 id, $2 type (Run|Background), $3 image; the command on stdin.
yaml_container_step() {
    cat <<EOF
              - step:
                  identifier: $1
                  name: $1
                  type: $2
                  spec:
                    image: $3
                    shell: Sh
                    command: |
EOF
    indent 24
}

# The pod pipeline: $1 services (svc_cmd) in image $2, then a Run step `check` whose script
# is on stdin.
yaml_pod() {
    local n=$1 image=$2 check i
    check=$(cat)
    yaml_head "pod-$n"
    for ((i = 0; i < n; i++)); do
        svc_cmd "$i" | yaml_container_step "svc$i" Background "$image"
    done
    printf '%s\n' "$check" | yaml_container_step check Run "$image"
}
