#!/usr/bin/env bash
# Runs every fuzz target briefly (libFuzzer through cargo-fuzz; stable Rust
# with RUSTC_BOOTSTRAP for the sanitizer flags), one after the other, each
# for FUZZ_SECONDS (default 30) starting from its corpus in the repo:
#
#   devices/fuzz              block_request, vsock_packets, net_tx
#   vmm/fuzz                  mmio_transport, vhost_user_frontend
#   guest/exec-protocol/fuzz  exec_frame
#
# A crash, a leak, or one input running longer than FUZZ_TIMEOUT seconds
# (default 10: a hang) fails the script. FUZZ_TARGETS="net_tx exec_frame"
# runs only those.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
command -v cargo-fuzz >/dev/null || cargo install --quiet --locked cargo-fuzz

# crate directory, target, extra libFuzzer flags
targets=(
  "devices/fuzz block_request"
  "devices/fuzz vsock_packets"
  "devices/fuzz net_tx -max_len=16384"
  "vmm/fuzz mmio_transport"
  "vmm/fuzz vhost_user_frontend -max_len=16384"
  "guest/exec-protocol/fuzz exec_frame -max_len=65536"
)

for entry in "${targets[@]}"; do
  read -r dir target flags <<<"$entry"
  if [[ -n "${FUZZ_TARGETS:-}" && " $FUZZ_TARGETS " != *" $target "* ]]; then
    continue
  fi
  echo "== $target ($dir)"
  mkdir -p "$repo/$dir/corpus/$target"
  log="$(mktemp)"
  # shellcheck disable=SC2086 # flags is a list of words
  if ! (cd "$repo/$dir" && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- \
    -max_total_time="${FUZZ_SECONDS:-30}" -timeout="${FUZZ_TIMEOUT:-10}" $flags >"$log" 2>&1); then
    # The report, not just the tail: what broke, where, and the input
    # (libFuzzer prints small ones as Base64) so it can be replayed.
    grep -v -E '^#[0-9]+|^ +Compiling ' "$log" | grep -A 40 -m 1 -E 'panicked|==[0-9]+==|ERROR:|error(\[|:)' || tail -n 60 "$log"
    grep -E 'Base64:|Test unit written|artifact_prefix' "$log" || true
    df -h "$repo" || true
    rm -f "$log"
    echo "fuzz target $target failed" >&2
    exit 1
  fi
  tail -n 5 "$log"
  rm -f "$log"
done
