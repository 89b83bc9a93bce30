#!/usr/bin/env bash
# Runs ccnode's whole test suite: formatting, lints, unit and end-to-end
# tests (real Prometheus, promtool, systemd-analyze), fuzz-target builds.
# Installs what the tests need when it is missing. Run from anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_rust
# prometheus: the server and promtool; systemd: systemd-analyze, sysusers,
# tmpfiles; util-linux: setpriv (unprivileged peers); curl for the scripts.
ensure_debs prometheus systemd util-linux ca-certificates curl
ensure_nextest

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
say "tests"
cargo nextest run --workspace --locked --no-fail-fast --profile "${NEXTEST_PROFILE:-default}"

# Fuzz targets (fuzz/): build only, unoptimised, to prove they still compile
# and link; scripts/fuzz.sh --run SECONDS fuzzes. Installs cargo-fuzz if
# missing (under a minute); a cold build takes a minute or two on 2 cores.
say "fuzz targets (build)"
scripts/fuzz.sh --dev
