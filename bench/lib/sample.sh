#!/usr/bin/env bash
# bench/lib/sample.sh stagehand PID OUT_JSON MARKER
# bench/lib/sample.sh conmon STOP_FILE OUT_JSON MARKER
#
# The overhead sampler of scenario 5: every 200 ms it reads /proc and records, for the
# supervising processes of one contender, the sum of their RSS and PSS and their CPU time
# (user + system; see below for the precision). Which processes supervise:
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
tick_us=$((1000000 / $(getconf CLK_TCK)))
podman_root="$BENCH_WORK/podman"

declare -A last_us=() win_first=() win_last=()
samples=0 win_samples=0 peak_rss=0 peak_pss=0 procs_max=0
self_hwm=0 self_peak_pss=0 self_us=0
win_start_self=-1 win_end_self=0 win_t0=0 win_t1=0

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
    # Memory and precise CPU of the selected processes in one pass: VmRSS/VmHWM, Pss, and the
    # sum of se.sum_exec_runtime (ms, ns precision) over their live threads. CPU of a process is
    # the larger of that and its utime + stime (10 ms ticks, but it includes exited threads).
    files=()
    for pid in "${sel[@]}"; do
        files+=("/proc/$pid/status" "/proc/$pid/smaps_rollup" /proc/"$pid"/task/*/sched)
    done
    declare -A m_rss=() m_hwm=() m_pss=() m_sched=()
    while read -r pid k v; do
        case "$k" in
        rss) m_rss[$pid]=$v ;;
        hwm) m_hwm[$pid]=$v ;;
        pss) m_pss[$pid]=$v ;;
        sched) m_sched[$pid]=$v ;;
        esac
    done < <([ ${#files[@]} -gt 0 ] && grep -H -E '^(VmRSS|VmHWM|Pss):|^se.sum_exec_runtime' "${files[@]}" 2>/dev/null | awk -F: '
        { split($1, p, "/"); k = $2; gsub(/ /, "", k); v = $3 + 0 }
        k == "VmRSS" { print p[3], "rss", v } k == "VmHWM" { print p[3], "hwm", v }
        k == "Pss" { print p[3], "pss", v }
        k == "se.sum_exec_runtime" { s[p[3]] += v }
        END { for (q in s) printf "%s sched %d\n", q, s[q] * 1000 }')
    rss=0 pss=0
    for pid in "${sel[@]}"; do
        [ -n "${m_rss[$pid]:-}" ] || continue
        c=$((ticks[$pid] * tick_us))
        [ "${m_sched[$pid]:-0}" -gt "$c" ] && c=${m_sched[$pid]}
        rss=$((rss + m_rss[$pid]))
        pss=$((pss + ${m_pss[$pid]:-0}))
        last_us[$pid]=$c
        if [ "$have_marker" = 1 ]; then
            # CPU in the window, per process: from its value in the window's first sample
            # (0 for a process that started later) to its value in the window's last one in
            # which it still existed.
            if [ "$win_samples" = 0 ]; then win_first[$pid]=$c; fi
            win_last[$pid]=$c
        fi
    done
    if [ "$mode" = stagehand ] && [ -n "${m_rss[$target]:-}" ]; then
        [ "${m_hwm[$target]:-0}" -gt "$self_hwm" ] && self_hwm=${m_hwm[$target]}
        [ "${m_pss[$target]:-0}" -gt "$self_peak_pss" ] && self_peak_pss=${m_pss[$target]}
        self_us=${last_us[$target]}
    fi
    unset m_rss m_hwm m_pss m_sched
    [ "$rss" -gt "$peak_rss" ] && peak_rss=$rss
    [ "$pss" -gt "$peak_pss" ] && peak_pss=$pss
    [ "${#sel[@]}" -gt "$procs_max" ] && procs_max=${#sel[@]}
    if [ "$have_marker" = 1 ]; then
        if [ "$win_start_self" -lt 0 ]; then
            win_start_self=$self_us
            win_t0=$(date +%s%N)
        fi
        win_t1=$(date +%s%N)
        win_end_self=$self_us
        win_samples=$((win_samples + 1))
    fi
    samples=$((samples + 1))
    unset ppid comm ticks
    sleep 0.2
done

total=0
for pid in "${!last_us[@]}"; do total=$((total + last_us[$pid])); done
window=0
for pid in "${!win_last[@]}"; do window=$((window + win_last[$pid] - ${win_first[$pid]:-0})); done
if [ "$win_samples" -lt 2 ]; then
    echo "sample.sh: the window marker '$marker' was seen in $win_samples samples" >&2
    exit 1
fi
jq -n --argjson samples "$samples" --argjson win "$win_samples" --argjson rss "$peak_rss" \
    --argjson pss "$peak_pss" --argjson total $((total / 1000)) \
    --argjson window $((window / 1000)) --argjson procs "$procs_max" \
    --argjson window_ms $(((win_t1 - win_t0) / 1000000)) \
    --argjson hwm "$self_hwm" --argjson spss "$self_peak_pss" \
    --argjson stotal $((self_us / 1000)) \
    --argjson swindow $(((win_end_self - win_start_self) / 1000)) --arg mode "$mode" '
    {samples: $samples, window_samples: $win, peak_rss_kb: $rss, peak_pss_kb: $pss,
     cpu_ms_total: $total, cpu_ms_window: $window, window_ms: $window_ms, procs_max: $procs}
    + if $mode == "stagehand" then
        {self_hwm_kb: $hwm, self_peak_pss_kb: $spss, self_cpu_ms_total: $stotal,
         self_cpu_ms_window: $swindow}
      else {} end' >"$out"
