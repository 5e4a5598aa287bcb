#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS (default 60) each, with libFuzzer's
# FUZZ_SEED (default 1: CI explores the same inputs on every run; set another to explore), from
# a scratch copy of the committed corpus (fuzz/corpus/<target>), so new inputs stay out of the
# tree. A crash stops it with libFuzzer's report and the input under fuzz/artifacts/<target>/;
# commit that input to fuzz/corpus/<target>/crash-<what> with the fix (tests/corpus.rs replays it).
# Needs cargo-fuzz (installed here from crates.io when missing) and a nightly toolchain; without
# one, the stable compiler is told to accept the nightly flags (RUSTC_BOOTSTRAP=1).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${FUZZ_SECONDS:-60}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
for target in gguf tokenizer chat_template requests; do
    work="target/fuzz-corpus/$target"
    rm -rf "$work" && mkdir -p "$work"
    cp fuzz/corpus/"$target"/* "$work"/
    echo "fuzz: $target for ${seconds}s"
    log="target/fuzz-corpus/$target.log"
    # -rss_limit_mb: a harness that allocates past this is a bug (the malloc limit follows it).
    if ! cargo "${toolchain[@]}" fuzz run --features libfuzzer --target-dir target/fuzz \
        --codegen-units 16 "$target" "$work" -- \
        -max_total_time="$seconds" -seed="${FUZZ_SEED:-1}" -timeout=20 -rss_limit_mb=3072 -max_len=65536 \
        -print_final_stats=1 >"$log" 2>&1; then
        tail -n 80 "$log"
        echo "fuzz: $target failed (the input is under fuzz/artifacts/$target/)"
        exit 1
    fi
    grep -E "^stat::(number_of_executed_units|peak_rss_mb)" "$log" | tr '\n' ' '
    echo
done
echo "fuzz: all targets ran ${seconds}s without a crash"
