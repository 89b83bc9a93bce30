#!/usr/bin/env bash
# Builds ccnoded and runs it in the foreground on the dev config
# (systemd/ccnoded.dev.toml): state, admin socket and logs under ./dev-state,
# metrics on 127.0.0.1:9860. Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

need_rust
# libtss2-dev and pkg-config build ccnoded (tss-esapi links libtss2);
# swtpm is dev mode's TPM, a real TPM 2.0 emulator.
ensure_debs libtss2-dev pkg-config swtpm swtpm-tools
say "building ccnoded, ccnodectl, ccnode-verify, ccnode-worker and ccnode-scrub"
cargo build --locked --bins -q
mkdir -p dev-state/tpm
# The dev model: tiny, random weights, signed with a development key and
# trusted by dev-state/model/trust-policy.toml only. Written once.
if [ ! -f dev-state/model/model.sig ]; then
    say "writing the signed dev model into dev-state/model"
    ./target/debug/ccnodectl dev-model --out dev-state/model --seed 1 --name ccnode-dev-tiny --force >/dev/null
fi
# The dev TPM: swtpm on 127.0.0.1:2321 (control 2322), its state kept in
# dev-state/tpm so the attestation key survives restarts. Stopped with
# ccnoded.
if ! (exec 3<>/dev/tcp/127.0.0.1/2321) 2>/dev/null; then
    swtpm socket --tpm2 --tpmstate dir="$PWD/dev-state/tpm" \
        --server type=tcp,port=2321,bindaddr=127.0.0.1 \
        --ctrl type=tcp,port=2322,bindaddr=127.0.0.1 \
        --flags not-need-init,startup-clear --daemon --pid file="$PWD/dev-state/tpm/swtpm.pid" \
        --log file="$PWD/dev-state/tpm/swtpm.log"
    trap 'kill "$(cat dev-state/tpm/swtpm.pid)" 2>/dev/null || true' EXIT
fi
cat >&2 <<BANNER

  ccnoded (dev mode: simulated GPUs, swtpm for a TPM, a simulated TEE:
  its evidence is well-formed and verifiable, and proves nothing)
    metrics endpoint  http://127.0.0.1:9860/metrics  (also /healthz, /readyz)
    attestation       http://127.0.0.1:9861/v1/attestation  (POST a nonce)
    OpenAI API        http://127.0.0.1:9862/v1  (model ccnode-dev-tiny, sandboxed worker)
    admin socket      $(pwd)/dev-state/admin.sock
    state and audit   $(pwd)/dev-state/state/
  In another terminal:
    ./target/debug/ccnodectl --socket dev-state/admin.sock status
    ./target/debug/ccnodectl --socket dev-state/admin.sock drain --reason "trying it out"
    ./target/debug/ccnodectl --socket dev-state/admin.sock gpus     (8 SIMULATED GPUs)
    ./target/debug/ccnode-verify attest --url http://127.0.0.1:9861/v1/attestation \\
        --policy attest/examples/verifier.toml
      (fails policy_ak, policy_models, policy_pcrs and tee until a copy of the
       policy trusts the dev node's AK, printed as ak_spki_sha256 with --json)
    echo '{"gpu": 0, "xid": 31}' >> dev-state/gpu-events.jsonl     (inject an XID)
    ./target/debug/ccnodectl --socket dev-state/admin.sock model list
    curl -s http://127.0.0.1:9862/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "ccnode-dev-tiny", "prompt": "Hello", "max_tokens": 16}'

BANNER
./target/debug/ccnoded --config systemd/ccnoded.dev.toml
