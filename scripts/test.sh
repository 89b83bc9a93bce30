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
# TPM attestation tests (attest/tests/tpm_swtpm.rs): swtpm, a real TPM 2.0
# emulator the tests start themselves; tpm2-tools' tpm2_checkquote checks
# our quotes independently; libtss2-dev and pkg-config build tss-esapi.
ensure_debs swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config
ensure_nextest

# OMS interop tests (attest/tests/oms_interop.rs) drive the reference
# model_signing tool from a Python virtual environment, every package pinned
# in attest/tests/interop/requirements.txt; CCNODE_VENV tells the tests where
# it is. Rebuilt only when the pinned list changes.
ensure_debs python3 python3-venv openssl
export CCNODE_VENV="${CCNODE_VENV:-$PWD/.venv}"
if ! cmp -s attest/tests/interop/requirements.txt "$CCNODE_VENV/.ccnode-requirements"; then
    say "creating the model_signing virtual environment in $CCNODE_VENV"
    python3 -m venv "$CCNODE_VENV"
    "$CCNODE_VENV/bin/pip" install -q --disable-pip-version-check -r attest/tests/interop/requirements.txt
    cp attest/tests/interop/requirements.txt "$CCNODE_VENV/.ccnode-requirements"
fi

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start other packages' binaries (ccnode-worker,
# ccnode-test-worker, ccnode-verify) from target/debug; cargo builds only a
# test's own package's binaries for it, so build them all first.
say "binaries the end-to-end tests start"
cargo build --workspace --bins --locked
say "tests"
cargo nextest run --workspace --locked --no-fail-fast --profile "${NEXTEST_PROFILE:-default}"
# Each benchmark harness (benches/, harness = false) in its smoke mode:
# minimal counts, no figures, but every assertion it makes on its results
# (evidence that verifies, answers that parse) still runs.
say "benchmark harnesses (smoke runs)"
cargo test --workspace --locked --bench '*'

# Fuzz targets (fuzz/): build only, unoptimised, to prove they still compile
# and link; scripts/fuzz.sh --run SECONDS fuzzes. Installs cargo-fuzz if
# missing (under a minute); a cold build takes a minute or two on 2 cores.
say "fuzz targets (build)"
scripts/fuzz.sh --dev
