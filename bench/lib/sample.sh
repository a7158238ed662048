#!/usr/bin/env bash
# bench/lib/sample.sh stagehand PID OUT_JSON MARKER
# bench/lib/sample.sh conmon STOP_FILE OUT_JSON MARKER
#
# The overhead sampler of scenario 5: every 200 ms it reads /proc and records, for the
# supervising processes of one contender, the sum of their RSS and PSS and their CPU time
# (utime + stime, clock ticks). Which processes supervise:
#   stagehand  PID (the `stagehand run`) and its descendants named `runc` (stagehand keeps one
#              `runc run` per container in the foreground); "self" is PID alone. Sampling stops
#              when PID is gone.
#   conmon     every `conmon` whose command line names the bench's podman storage (one per
#              container, reparented to PID 1 by podman). Sampling stops when STOP_FILE exists.
# MARKER is the command line of the Run step's process ("sleep 10.007"): the samples where it
# exists make the measuring window. Not counted for either: the containers' own processes
# (services, init) and the podman CLI.
#
# OUT_JSON: {"samples", "window_samples", "peak_rss_kb", "peak_pss_kb", "cpu_ms_total",
# "cpu_ms_window", "window_ms" (first to last sample of the window), "procs_max",
# "self_hwm_kb", "self_peak_pss_kb", "self_cpu_ms_total", "self_cpu_ms_window"} (the self_*
# fields only for stagehand).
set -euo pipefail

mode=$1 target=$2 out=$3 marker=$4
marker_cmdline=${marker// /$'\x01'}
tick_ms=$((1000 / $(getconf CLK_TCK)))
podman_root="$BENCH_WORK/podman"

declare -A last_ticks=()
samples=0 win_samples=0 peak_rss=0 peak_pss=0 procs_max=0
self_hwm=0 self_peak_pss=0 self_ticks=0
win_start_all=-1 win_start_self=-1 win_end_all=0 win_end_self=0 win_t0=0 win_t1=0

# kB value of FIELD (e.g. "Pss:") in FILE, 0 when the process is gone.
kb() {
    local f=$1 key=$2 k v _
    while read -r k v _; do
        if [ "$k" = "$key" ]; then
            echo "$v"
            return
        fi
    done 2>/dev/null <"$f" || true
    echo 0
}

cmdline_of() { tr '\0' '\001' 2>/dev/null <"/proc/$1/cmdline" || true; }

while :; do
    if [ "$mode" = stagehand ]; then
        kill -0 "$target" 2>/dev/null || break
    else
        [ -e "$target" ] && break
    fi
    # One pass over /proc: parent, name and CPU ticks of every process.
    declare -A ppid=() comm=() ticks=()
    have_marker=0
    for f in /proc/[0-9]*/stat; do
        read -r line 2>/dev/null <"$f" || continue
        pid=${line%% *}
        name=${line#*(}
        name=${name%)*}
        rest=${line##*) }
        # shellcheck disable=SC2086
        set -- $rest
        ppid[$pid]=$2
        comm[$pid]=$name
        ticks[$pid]=$((${12} + ${13}))
        if [ "$name" = sleep ] && [ "$(cmdline_of "$pid")" = "$marker_cmdline"$'\x01' ]; then
            have_marker=1
        fi
    done
    sel=()
    if [ "$mode" = stagehand ]; then
        sel=("$target")
        # Descendants of the stagehand process named runc (runc's own children are the
        # containers: not counted).
        for pid in "${!ppid[@]}"; do
            [ "${comm[$pid]}" = runc ] || continue
            p=${ppid[$pid]}
            while [ -n "$p" ] && [ "$p" != 0 ] && [ "$p" != 1 ]; do
                if [ "$p" = "$target" ]; then
                    sel+=("$pid")
                    break
                fi
                p=${ppid[$p]:-}
            done
        done
    else
        for pid in "${!comm[@]}"; do
            [ "${comm[$pid]}" = conmon ] || continue
            case "$(cmdline_of "$pid")" in *"$podman_root"*) sel+=("$pid") ;; esac
        done
    fi
    rss=0 pss=0 sum_ticks=0
    for pid in "${sel[@]}"; do
        [ -n "${ticks[$pid]:-}" ] || continue
        rss=$((rss + $(kb "/proc/$pid/status" VmRSS:)))
        pss=$((pss + $(kb "/proc/$pid/smaps_rollup" Pss:)))
        last_ticks[$pid]=${ticks[$pid]}
        sum_ticks=$((sum_ticks + ticks[$pid]))
    done
    if [ "$mode" = stagehand ] && [ -n "${ticks[$target]:-}" ]; then
        h=$(kb "/proc/$target/status" VmHWM:)
        [ "$h" -gt "$self_hwm" ] && self_hwm=$h
        p=$(kb "/proc/$target/smaps_rollup" Pss:)
        [ "$p" -gt "$self_peak_pss" ] && self_peak_pss=$p
        self_ticks=${ticks[$target]}
    fi
    [ "$rss" -gt "$peak_rss" ] && peak_rss=$rss
    [ "$pss" -gt "$peak_pss" ] && peak_pss=$pss
    [ "${#sel[@]}" -gt "$procs_max" ] && procs_max=${#sel[@]}
    if [ "$have_marker" = 1 ]; then
        if [ "$win_start_all" -lt 0 ]; then
            win_start_all=$sum_ticks
            win_start_self=$self_ticks
            win_t0=$(date +%s%N)
        fi
        win_t1=$(date +%s%N)
        win_end_all=$sum_ticks
        win_end_self=$self_ticks
        win_samples=$((win_samples + 1))
    fi
    samples=$((samples + 1))
    unset ppid comm ticks
    sleep 0.2
done

total=0
for pid in "${!last_ticks[@]}"; do total=$((total + last_ticks[$pid])); done
if [ "$win_samples" -lt 2 ]; then
    echo "sample.sh: the window marker '$marker' was seen in $win_samples samples" >&2
    exit 1
fi
jq -n --argjson samples "$samples" --argjson win "$win_samples" --argjson rss "$peak_rss" \
    --argjson pss "$peak_pss" --argjson total $((total * tick_ms)) \
    --argjson window $(((win_end_all - win_start_all) * tick_ms)) --argjson procs "$procs_max" \
    --argjson window_ms $(((win_t1 - win_t0) / 1000000)) \
    --argjson hwm "$self_hwm" --argjson spss "$self_peak_pss" \
    --argjson stotal $((self_ticks * tick_ms)) \
    --argjson swindow $(((win_end_self - win_start_self) * tick_ms)) --arg mode "$mode" '
    {samples: $samples, window_samples: $win, peak_rss_kb: $rss, peak_pss_kb: $pss,
     cpu_ms_total: $total, cpu_ms_window: $window, window_ms: $window_ms, procs_max: $procs}
    + if $mode == "stagehand" then
        {self_hwm_kb: $hwm, self_peak_pss_kb: $spss, self_cpu_ms_total: $stotal,
         self_cpu_ms_window: $swindow}
      else {} end' >"$out"
