#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for SECONDS each (default 60): the CI smoke
# run. A crash stops the script with the target's status; libFuzzer leaves the input under
# fuzz/artifacts/TARGET/, which becomes a regression test (see fuzz/README.md).
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
if ! command -v cargo-fuzz >/dev/null || ! rustup toolchain list | grep -q '^nightly'; then
    echo "fuzz: needs the nightly toolchain and cargo-fuzz (scripts/setup.sh installs cargo-fuzz)" >&2
    exit 1
fi
seconds="${1:-60}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
cargo +nightly fuzz build
for t in "${targets[@]}"; do
    echo "fuzz: $t for ${seconds}s"
    # -rss_limit_mb: a decoder that allocates what a hostile length prefix says fails here.
    log="$(mktemp)"
    set +e
    cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    grep -E '^stat::number_of_executed_units|SUMMARY|ERROR|panicked' "$log" || true
    if [ "$status" -ne 0 ]; then
        tail -40 "$log" >&2
        echo "fuzz: $t failed (status $status); the input is under fuzz/artifacts/$t/" >&2
        rm -f "$log"
        exit "$status"
    fi
    rm -f "$log"
done
echo "fuzz: ${#targets[@]} targets, ${seconds}s each: no crash"
