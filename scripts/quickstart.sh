#!/usr/bin/env bash
# From a fresh Debian machine to a booted microVM: installs what is needed,
# builds everything (the guest kernel takes ~4 minutes the first time, then
# comes from the cache), and boots a microVM that runs `uname -a`.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# Without mm-integration and mm-bench: they turn on mm-device's test-only
# hooks (feature `test-hooks`), which what users run must not have.
cargo build --release --workspace --bins --exclude mm-integration --exclude mm-bench
kernel="$(bash guest/kernel/build.sh)"
initrd="$(bash guest/rootfs/build-initramfs.sh)"
echo "quickstart: booting $kernel with $initrd (on PVM hosts this takes about a minute)" >&2
exec target/release/mm-vmm --kernel "$kernel" --initrd "$initrd" --cpus 1 --memory-mib 128 -- uname -a
