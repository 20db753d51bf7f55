#!/usr/bin/env bash
# Builds mm-init as a static binary and prints its path. It must be static:
# the guest root has no libc. An explicit --target keeps crt-static away
# from build scripts and proc macros.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
if [ -n "${MM_INIT_BIN:-}" ]; then echo "$MM_INIT_BIN"; exit 0; fi
(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" cargo build --quiet --release \
	-p mm-init --target x86_64-unknown-linux-gnu --target-dir "$repo/target/guest") >&2
echo "$repo/target/guest/x86_64-unknown-linux-gnu/release/mm-init"
