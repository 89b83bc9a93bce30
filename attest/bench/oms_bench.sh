#!/usr/bin/env bash
# Benchmark: ccnode-verify model (verdict only, as the reference tool) versus
# the reference model_signing tool on
# one generated model, same files, same machine, one run, page cache warm;
# plus the machine's limit (one core's SHA-256 speed from openssl speed,
# times the cores the serialization lets work at once; for BLAKE3, its
# multi-threaded speed over a buffer in cache), and memory bandwidth.
#
#   attest/bench/oms_bench.sh [SIZE_MIB_PER_FILE] [WORKDIR]
#
# Times are the best of RUNS (default 3) runs of each whole command.
# Default: four 1024 MiB safetensors files plus small JSON files (4 GiB),
# in /tmp/ccnode-oms-bench. Needs the virtual environment scripts/test.sh
# creates (CCNODE_VENV, default .venv) and ~2x the model size in RAM (page
# cache plus ccnode's sealed copies).
set -euo pipefail
cd "$(dirname "$0")/../.."
. scripts/lib.sh
need_rust
SIZE_MIB=${1:-1024}
WORK=${2:-/tmp/ccnode-oms-bench}
VENV=${CCNODE_VENV:-$PWD/.venv}
PY=$VENV/bin/python
HELPER=attest/tests/interop/helper.py
[ -x "$VENV/bin/model_signing" ] || die "no model_signing in $VENV: run scripts/test.sh first"

cargo build --release -q -p ccnode-attest --bin ccnode-verify
BIN=$PWD/target/release/ccnode-verify

mkdir -p "$WORK"
M=$WORK/model
if [ ! -f "$M/.size-$SIZE_MIB" ]; then
    say "generating the model: 4 x $SIZE_MIB MiB safetensors + JSON"
    rm -rf "$M"; mkdir -p "$M"
    "$PY" - "$M" "$SIZE_MIB" <<'PYEOF'
import json, os, struct, sys
d, mib = sys.argv[1], int(sys.argv[2])
for i in range(4):
    n = mib * 1024 * 1024
    header = json.dumps({"w": {"dtype": "U8", "shape": [n], "data_offsets": [0, n]}}).encode()
    with open(f"{d}/model-{i:05d}-of-00004.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        chunk = os.urandom(1 << 20)
        for j in range(mib):
            f.write(chunk[j % 7:] + chunk[: j % 7])
for name in ["config.json", "generation_config.json", "tokenizer_config.json", "model.safetensors.index.json"]:
    with open(f"{d}/{name}", "w") as f:
        json.dump({"name": name, "values": list(range(100))}, f)
PYEOF
    touch "$M/.size-$SIZE_MIB"
fi
# The marker is not part of the model.
rm -f "$M/.size-$SIZE_MIB"; trap 'touch "$M/.size-$SIZE_MIB"' EXIT

K=$WORK/key
[ -f "$K.pem" ] || { openssl ecparam -name prime256v1 -genkey -noout | openssl pkcs8 -topk8 -nocrypt -out "$K.pem"; openssl ec -in "$K.pem" -pubout -out "$K.pub" 2>/dev/null; }
say "signing (reference tool)"
"$PY" "$HELPER" sign-key "$M" "$WORK/files.sig" "$K.pem" files sha256
"$PY" "$HELPER" sign-key "$M" "$WORK/shards.sig" "$K.pem" shards sha256 1000000000
"$PY" "$HELPER" sign-key "$M" "$WORK/blake3.sig" "$K.pem" files blake3
cat "$M"/* > /dev/null  # page cache warm

# Best of $RUNS wall-clock runs (the machine may be shared), whole process.
RUNS=${RUNS:-3}
secs() {
    local s e t best=
    for _ in $(seq "$RUNS"); do
        s=$(date +%s.%N); "$@" > /dev/null 2>&1 || { echo "FAILED: $*" >&2; exit 1; }; e=$(date +%s.%N)
        t=$(echo "$e - $s" | bc -l)
        if [ -z "$best" ] || [ "$(echo "$t < $best" | bc -l)" = 1 ]; then best=$t; fi
    done
    echo "$best"
}
total=$(du -cb "$M"/* | tail -1 | cut -f1)
gbs() { echo "scale=2; $total / $1 / 1000000000" | bc -l; }

say "machine limit: one core's SHA-256 (openssl speed, 16 KiB blocks)"
one=$(openssl speed -seconds 3 -bytes 16384 -evp sha256 2>/dev/null | awk '/^sha256/ {print $NF}' | sed 's/k$//')
one_gbs=$(echo "scale=2; $one * 1000 / 1000000000" | bc -l)
cores=$(nproc)
# BLAKE3's counterpart: its own speed on every core over a buffer that stays
# in cache (16 MiB, hashed over and over for 3 s), through the Rust blake3
# crate inside the venv's blake3 package, multi-threaded like ccnode's.
b3_gbs=$("$PY" - <<'PYEOF'
import time, blake3
buf = bytes(range(256)) * (1 << 16)
best = 0.0
for _ in range(3):
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 1.0:
        h.update(buf); n += len(buf)
    best = max(best, n / (time.perf_counter() - t0) / 1e9)
print(f"{best:.2f}")
PYEOF
)

printf '\n%-16s %10s %12s %12s %10s\n' config reference ccnode limit ccnode/limit
for cfg in files shards blake3; do
    sig=$WORK/$cfg.sig
    if [ "$cfg" = files ]; then
        ref=$(secs "$VENV/bin/model_signing" verify key "$M" --signature "$sig" --public_key "$K.pub")
    else
        ref=$(secs "$PY" "$HELPER" verify-key "$M" "$sig" "$K.pub")
    fi
    ours=$(secs "$BIN" model "$M" --signature "$sig" --public-key "$K.pub")
    case $cfg in
        files) par=$(( cores < 4 ? cores : 4 )); limit=$(echo "$one_gbs * $par" | bc -l) ;;
        shards) par=$(( cores < 8 ? cores : 8 )); limit=$(echo "$one_gbs * $par" | bc -l) ;;
        blake3) limit="" ;;
    esac
    if [ -n "$limit" ]; then
        printf '%-16s %8s GB/s %8s GB/s %7.2f GB/s %9.0f%%\n' "sha256 $cfg" "$(gbs "$ref")" "$(gbs "$ours")" "$limit" "$(echo "100 * $(gbs "$ours") / $limit" | bc -l)"
    else
        printf '%-16s %8s GB/s %8s GB/s %7.2f GB/s %9.0f%%\n' "blake3 files" "$(gbs "$ref")" "$(gbs "$ours")" "$b3_gbs" "$(echo "100 * $(gbs "$ours") / $b3_gbs" | bc -l)"
    fi
done
plain=$(secs cat "$M"/*)
# The verified-load path (what ccnoded does before a worker gets the model):
# verification plus a sealed memfd copy of every file, versus plain reading.
sealed=$(secs "$BIN" model "$M" --signature "$WORK/files.sig" --public-key "$K.pub" --sealed-copy)
printf '\nverified load (sha256 files, sealed memfd copy): %s GB/s, %.2fx plain read\n' "$(gbs "$sealed")" "$(echo "$sealed / $plain" | bc -l)"
sealed_b3=$(secs "$BIN" model "$M" --signature "$WORK/blake3.sig" --public-key "$K.pub" --sealed-copy)
printf 'verified load (blake3 files, sealed memfd copy): %s GB/s, %.2fx plain read\n' "$(gbs "$sealed_b3")" "$(echo "$sealed_b3 / $plain" | bc -l)"
# The same, timed inside the process from the request to the sealed fds
# (what ccnoded's load waits for): no process start, and not the teardown
# of 4 GiB of memfds at exit, which ccnoded does only at unload.
inproc() {
    local t best=
    for _ in $(seq "$RUNS"); do
        t=$("$BIN" model "$M" --signature "$1" --public-key "$K.pub" --sealed-copy --json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["seconds"])')
        if [ -z "$best" ] || [ "$(echo "$t < $best" | bc -l)" = 1 ]; then best=$t; fi
    done
    echo "$best"
}
for cfg in files blake3; do
    t=$(inproc "$WORK/$cfg.sig")
    printf 'verified load in-process (%s, request to sealed fds): %s GB/s, %.2fx plain read\n' "$cfg" "$(gbs "$t")" "$(echo "$t / $plain" | bc -l)"
done
# Where the hand-over's cost lies: the same bytes copied into shared memory
# with no hashing at all (one cat per file, all at once, into tmpfs files:
# the memfd copy allocates the same shmem pages), removed between runs.
shm=$(mktemp -d /dev/shm/ccnode-oms-bench.XXXXXX)
shmcopy() {
    rm -f "$shm"/*
    for f in "$M"/*; do cat "$f" > "$shm/$(basename "$f")" & done
    wait
}
copy=$(secs shmcopy); rm -rf "$shm"
printf 'copy into shmem, no hashing (cat > /dev/shm, a process per file): %s GB/s, %.2fx plain read\n' "$(gbs "$copy")" "$(echo "$copy / $plain" | bc -l)"
# Memory bandwidth, for BLAKE3's goal: mbw's memcpy of 1 GiB arrays (one
# thread; a copy both reads and writes each byte), best of 5, and two at once.
command -v mbw > /dev/null || apt-get install -y -qq mbw > /dev/null
membw() { mbw -q -n 5 -t0 1024 | awk '/^AVG/ {print $(NF-1)}'; }
one_bw=$(membw)
two_bw=$( (membw & membw; wait) | awk '{s += $1} END {print s}')
printf 'memory bandwidth (mbw memcpy, 1 GiB): one thread %.2f GB/s, two threads %.2f GB/s in all\n' "$(echo "$one_bw * 1048576 / 1000000000" | bc -l)" "$(echo "$two_bw * 1048576 / 1000000000" | bc -l)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
printf '\nplain read (cat > /dev/null): %s GB/s; one core SHA-256: %s GB/s; BLAKE3 in cache, all cores: %s GB/s; cores: %s; model: %s bytes\n' "$(gbs "$plain")" "$one_gbs" "$b3_gbs" "$cores" "$total"
