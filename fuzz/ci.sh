#!/usr/bin/env bash
# Run every cargo-fuzz target for a bounded time over its committed corpus; fail on a crash.
#
# Usage: fuzz/ci.sh [SECONDS_PER_TARGET]   (default 60; FUZZ_SECONDS works too)
#        FUZZ_SEED=N (default 1) fixes libFuzzer's own random choices, so a gate run on the same
#        code mostly makes the same inputs again (a slower machine makes fewer of them, and the
#        hash seeds of the code under test still vary); FUZZ_SEED=random explores anew each run.
# Needs only the stable toolchain: no sanitizer (`-s none`, which cargo-fuzz 0.13 builds on
# stable as is); should a cargo-fuzz version pass `-Z` flags, the build is retried with
# RUSTC_BOOTSTRAP=1, which lets stable rustc accept them. Installs cargo-fuzz if missing.
# What a run finds is merged into a scratch copy of the corpus, so the committed seeds stay
# as they are; a crash leaves its input under fuzz/artifacts/<target>/.
set -euo pipefail

cd "$(dirname "$0")"
seconds="${1:-${FUZZ_SECONDS:-60}}"
seed="${FUZZ_SEED:-1}"
seed_arg=()
[[ "$seed" == random ]] || seed_arg=(-seed="$seed")
targets=(yaml_model expression layer_unpack)

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz/ci.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if ! cargo fuzz build -s none; then
    echo "fuzz/ci.sh: retrying the build with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    cargo fuzz build -s none
fi

scratch="$(mktemp -d -t stagehand-fuzz-XXXXXX)"
trap 'rm -rf "$scratch"' EXIT

failed=()
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t"
    cp -r "corpus/$t/." "$scratch/$t/"
    log="$scratch/$t.log"
    touch "$scratch/$t.start"
    echo "== $t: ${seconds}s over $(ls "corpus/$t" | wc -l) seeds (seed ${seed})"
    # -rss_limit_mb: the unpacker must not need more; -timeout: one input may not take longer.
    if cargo fuzz run -s none "$t" "$scratch/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 "${seed_arg[@]}" \
        -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        failed+=("$t")
        # The panic and its message, libFuzzer's verdict, and the input itself (base64, when
        # small) so that a CI log alone is enough to reproduce.
        grep -E -A 2 "panicked at" "$log" | head -n 12 || true
        grep -E "ERROR: libFuzzer|SUMMARY|Test unit written" "$log" | head -n 6 || true
        for crash in $(find "artifacts/$t" -maxdepth 1 -type f -newer "$scratch/$t.start"); do
            if (($(stat -c %s "$crash") <= 8192)); then
                echo "input $(basename "$crash") (base64): $(base64 -w0 "$crash")"
            fi
        done
    fi
    execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1)"
    rate="$(grep -Eo 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1)"
    echo "== $t: $status, ${execs:-?} execs (${rate:-?}/s)"
done

if ((${#failed[@]})); then
    echo "fuzz/ci.sh: crashes in: ${failed[*]} (inputs under fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz/ci.sh: no crash in ${targets[*]}"
