#!/usr/bin/env bash
# Runs the end-to-end suites a second time with every stagehand started as the unprivileged
# user stagehand-user (created by ./dev test with subordinate id ranges), through setpriv:
# the tests still run as root, to build fixtures and to check what is left behind. Where a
# rootless run cannot do what root does on this host (limits without delegated cgroups,
# outbound without /dev/net/tun), the suites assert that stagehand says so instead.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p stagehand --all-features
STAGEHAND_E2E_AS_USER="${STAGEHAND_E2E_AS_USER:-stagehand-user}" \
    cargo test -p stagehand-e2e --all-features --no-fail-fast \
    --test host_e2e --test readiness_e2e --test sandbox_e2e --test container_e2e \
    -- --test-threads=4
