#!/usr/bin/env bash
# Builds ccnode's fuzz targets (fuzz/, one per parser of untrusted bytes) and,
# with --run, fuzzes each of them for a while. Run from anywhere.
#
#   scripts/fuzz.sh                    build every target (release, as run)
#   scripts/fuzz.sh --dev              build every target unoptimised (CI: it
#                                      only proves they compile and link)
#   scripts/fuzz.sh --run SECONDS [TARGET...] [-- LIBFUZZER_ARGS...]
#                                      build, then fuzz each target (default:
#                                      all) for SECONDS on fuzz/corpus/TARGET
#
# New inputs that find new coverage are added to fuzz/corpus/TARGET (git
# ignores all but the seed-* files); crashing inputs land in
# fuzz/artifacts/TARGET/. Replay one with
#   cargo fuzz run --sanitizer none TARGET fuzz/artifacts/TARGET/crash-...
# (from fuzz/ or the repository root).
#
# How it builds, and why: cargo-fuzz, on the stable toolchain, with
# `--sanitizer none`. cargo-fuzz's default sanitizer is AddressSanitizer,
# which needs -Zsanitizer=address, a nightly-only flag. Everything else it
# passes rustc is stable (-Cpasses=sancov-module, the
# -Cllvm-args=-sanitizer-coverage-* options, --cfg fuzzing,
# -Cdebug-assertions), so with no sanitizer neither nightly nor
# RUSTC_BOOTSTRAP is needed. Losing ASan costs little here: the parsers and
# everything they call are safe Rust, and what fuzzing them can find (panics,
# failed invariants, integer overflow under debug assertions, stack
# overflow, runaway memory or time) libFuzzer catches without it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

# The version installed when cargo-fuzz is missing; any installed one is used.
CARGO_FUZZ_VERSION=0.13.2

run_secs=
profile=(--release)
targets=()
libfuzzer_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --run)
            [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] \
                || die "--run needs a number of seconds"
            run_secs=$2
            shift 2
            ;;
        --dev) profile=(--dev); shift ;;
        --) shift; libfuzzer_args=("$@"); break ;;
        -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        -*) die "unknown option $1 (see --help)" ;;
        *) targets+=("$1"); shift ;;
    esac
done
[ -z "$run_secs" ] || [ "${profile[0]}" = --release ] || die "--run fuzzes release builds; drop --dev"

need_rust
if ! cargo fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz $CARGO_FUZZ_VERSION from crates.io"
    cargo install --locked cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

# The targets are fuzz/Cargo.toml's [[bin]]s.
mapfile -t all_targets < <(cargo fuzz list)
[ ${#all_targets[@]} -gt 0 ] || die "cargo fuzz list found no fuzz targets"
for t in ${targets[@]+"${targets[@]}"}; do
    [[ " ${all_targets[*]} " == *" $t "* ]] || die "no fuzz target $t (targets: ${all_targets[*]})"
done
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

# fuzz/ is a workspace of its own and its Cargo.lock is not committed: it
# starts as a copy of the root one, so the targets fuzz the dependency
# versions ccnoded ships with; cargo then adds libfuzzer-sys and its build
# dependencies. Reseeded whenever the root lock is newer.
if [ ! -f fuzz/Cargo.lock ] || [ Cargo.lock -nt fuzz/Cargo.lock ]; then
    cp Cargo.lock fuzz/Cargo.lock
fi

say "building fuzz targets (${profile[0]#--}): ${all_targets[*]}"
# Builds every target in fuzz/Cargo.toml, so none can rot unbuilt.
cargo fuzz build --sanitizer none "${profile[@]}"

[ -n "$run_secs" ] || exit 0

crashed=()
stamp=fuzz/target/.fuzz-run-started
for t in "${targets[@]}"; do
    say "fuzzing $t for ${run_secs}s"
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    touch "$stamp"
    # -timeout: an input taking 10 s is a hang worth reporting (the admin
    # socket is peer-controlled). cargo fuzz writes crashes to fuzz/artifacts/$t.
    if ! cargo fuzz run --sanitizer none "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$run_secs" -timeout=10 -print_final_stats=1 \
        ${libfuzzer_args[@]+"${libfuzzer_args[@]}"}; then
        crashed+=("$t: $(find "fuzz/artifacts/$t" -type f -newer "$stamp" | tr '\n' ' ')")
    fi
done

if [ ${#crashed[@]} -gt 0 ]; then
    printf 'fuzz target failed, with these inputs: %s\n' "${crashed[@]}" >&2
    exit 1
fi
say "no crashes in ${targets[*]}"
