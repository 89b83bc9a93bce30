# Shared helpers for ccnode's scripts. Sourced, not run.

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Runs a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run: $* (run as root, or install sudo)"
    fi
}

# need_rust: cargo must be there; Debian's own is too old, so it comes from rustup.
need_rust() {
    if ! command -v cargo >/dev/null 2>&1 && [ -x "$HOME/.cargo/bin/cargo" ]; then
        export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 \
        || die "cargo not found: install Rust stable with rustup (https://rustup.rs), then run this again"
}

# ensure_debs PKG...: installs the Debian packages that are not installed yet.
ensure_debs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# ensure_nextest: cargo-nextest runs the suite.
ensure_nextest() {
    cargo nextest --version >/dev/null 2>&1 && return 0
    say "installing cargo-nextest from crates.io"
    cargo install --locked cargo-nextest
}
