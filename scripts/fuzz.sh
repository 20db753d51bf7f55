#!/usr/bin/env bash
# Runs the block back end's request-parsing fuzz target briefly (libFuzzer
# through cargo-fuzz; stable Rust with RUSTC_BOOTSTRAP for the sanitizer
# flags). FUZZ_SECONDS sets the duration (default 30).
set -euo pipefail
cd "$(dirname "$0")/../devices/fuzz"
command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz
RUSTC_BOOTSTRAP=1 cargo fuzz run block_request -- -max_total_time="${FUZZ_SECONDS:-30}" 2>&1 | tail -n 5
