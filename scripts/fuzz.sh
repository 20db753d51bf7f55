#!/usr/bin/env bash
# Runs the fuzz targets briefly (libFuzzer through cargo-fuzz; stable Rust
# with RUSTC_BOOTSTRAP for the sanitizer flags): the block back end's
# request parsing, and the exec protocol's frame decoder. FUZZ_SECONDS sets
# the duration of each (default 30).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz
cd "$repo/devices/fuzz"
RUSTC_BOOTSTRAP=1 cargo fuzz run block_request -- -max_total_time="${FUZZ_SECONDS:-30}" 2>&1 | tail -n 5
cd "$repo/guest/exec-protocol/fuzz"
RUSTC_BOOTSTRAP=1 cargo fuzz run exec_frame -- -max_total_time="${FUZZ_SECONDS:-30}" -max_len=65536 2>&1 | tail -n 5
