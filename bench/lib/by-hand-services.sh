#!/usr/bin/env bash
# bench/lib/by-hand-services.sh DIR READY_FILE
#
# Scenario 7's contender "by hand": PostgreSQL and Redis from the host's binaries the way a CI
# script starts them without stagehand: `redis-server --daemonize yes`, `pg_ctl -w start` (as
# the postgres user: PostgreSQL refuses root), then `redis-cli ping` every 100 ms until PONG.
# READY_FILE gets the time (ns) both were ready. Then both are stopped (`pg_ctl -m fast -w
# stop`, `redis-cli shutdown nosave`, waiting for redis-server's pid to go), which counts in the
# whole cycle but not in "ready". DIR holds the data directory `pgdata` (a fresh copy of the
# template cluster, made by bench/run before each round), `pg/` (socket and server log, owned by postgres) and `redis/`.
# Ports: $BENCH_PG_PORT and $BENCH_REDIS_PORT on the host's 127.0.0.1.
set -euo pipefail
# shellcheck source=lib/common.sh
. "$BENCH_LIB/common.sh"
dir=$1 ready_file=$2
stop() {
    runuser -u postgres -- "$BENCH_PGBIN/pg_ctl" -D "$dir/pgdata" -m fast -w stop >/dev/null 2>&1 || true
    if [ -f "$dir/redis/redis.pid" ]; then
        pid=$(cat "$dir/redis/redis.pid")
        redis-cli -p "$BENCH_REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        # Gone, or a zombie: daemonized, it is PID 1's child, and PID 1 may reap late.
        while [ -e "/proc/$pid" ] && [ "$(cut -d' ' -f3 2>/dev/null </proc/"$pid"/stat)" != Z ]; do
            sleep 0.005
        done
    fi
}
trap stop EXIT
redis-server --port "$BENCH_REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir/redis" --daemonize yes --pidfile "$dir/redis/redis.pid" --logfile "$dir/redis/redis.log"
runuser -u postgres -- "$BENCH_PGBIN/pg_ctl" -D "$dir/pgdata" -l "$dir/pg/server.log" -w -t 60 \
    -o "-p $BENCH_PG_PORT -k $dir/pg -c listen_addresses=127.0.0.1 -c fsync=off" start >/dev/null
until [ "$(redis-cli -p "$BENCH_REDIS_PORT" ping 2>/dev/null)" = PONG ]; do sleep 0.1; done
now_ns >"$ready_file"
