#!/usr/bin/env bash
# bench/lib/image-prep.sh stagehand|podman|runc empty|loaded
#
# hyperfine's --prepare of scenario 6, run before every timed round (its time is not counted):
# put a contender's image store in a known state. `empty`: the large image is not there (for
# timing the load). `loaded`: freshly loaded and nothing run from it yet (for timing the first
# start). The archive is $BENCH_BIG_ARCHIVE, the image $BENCH_BIG_IMAGE.
#   stagehand  the store $BENCH_WORK/s6/store, removed and loaded again
#   podman     `podman rmi -f` of the image, then `podman load`
#   runc       the floor's unpacked bundle $BENCH_WORK/s6/floor (lib/image-floor.sh)
set -euo pipefail
contender=$1 state=$2
case "$contender" in
stagehand)
    rm -rf "$BENCH_WORK/s6/store"
    if [ "$state" = loaded ]; then
        "$BENCH_STAGEHAND" image --root "$BENCH_WORK/s6/store" load "$BENCH_BIG_ARCHIVE" >/dev/null
    fi
    ;;
podman)
    podman rmi -f "$BENCH_BIG_IMAGE" >/dev/null 2>&1 || true
    if [ "$state" = loaded ]; then podman load -q -i "$BENCH_BIG_ARCHIVE" >/dev/null; fi
    ;;
runc)
    rm -rf "$BENCH_WORK/s6/floor"
    if [ "$state" = loaded ]; then "$BENCH_LIB/image-floor.sh" load; fi
    ;;
*)
    echo "usage: image-prep.sh stagehand|podman|runc empty|loaded" >&2
    exit 2
    ;;
esac
