#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine or one that already runs
# PostgreSQL and Redis: installs what is missing, starts throwaway services
# when none is listening, builds once, then runs every test in the workspace
# in parallel. Extra arguments go to the test runner (e.g. a test-name filter).
#
#   scripts/test.sh
#   DATABASE_URL=postgres://postgres@127.0.0.1:5433/postgres scripts/test.sh gpu_sim

source "$(dirname "$0")/lib.sh"
provision
ensure_sdks
ensure_triton
cd "$ROOT"

log "building the workspace and its tests"
cargo build --workspace --all-targets --locked

if cargo nextest --version >/dev/null 2>&1; then
    log "running tests (cargo nextest)"
    cargo nextest run --workspace --locked --no-fail-fast "$@"
else
    log "running tests (cargo test; install cargo-nextest for one parallel run across crates)"
    cargo test --workspace --locked --no-fail-fast "$@"
fi
