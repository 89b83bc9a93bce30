#!/usr/bin/env bash
# Builds ccnoded and runs it in the foreground on the dev config
# (systemd/ccnoded.dev.toml): state, admin socket and logs under ./dev-state,
# metrics on 127.0.0.1:9860. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_rust
say "building ccnoded and ccnodectl"
cargo build --locked --bins -q
mkdir -p dev-state
cat >&2 <<BANNER

  ccnoded (dev mode: no hardware is used; nothing here is attested)
    metrics endpoint  http://127.0.0.1:9860/metrics  (also /healthz, /readyz)
    admin socket      $(pwd)/dev-state/admin.sock
    state and audit   $(pwd)/dev-state/state/
  In another terminal:
    ./target/debug/ccnodectl --socket dev-state/admin.sock status
    ./target/debug/ccnodectl --socket dev-state/admin.sock drain --reason "trying it out"

BANNER
exec ./target/debug/ccnoded --config systemd/ccnoded.dev.toml
