#!/usr/bin/env bash
# Runs the whole test suite, boot tests included (they need /dev/kvm; with
# CI set, a missing /dev/kvm fails them instead of skipping them).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings
# The guest artefacts are built once up front (cached in the state
# directory) so parallel tests do not race to build them.
bash guest/kernel/build.sh >/dev/null
bash guest/rootfs/build-initramfs.sh >/dev/null
cargo build --workspace --bins --quiet
bash scripts/fuzz.sh
# Real block processes SIGKILLed at random moments under a simulated driver,
# completing in order and out of order (no KVM; needs the binaries built
# above, whose mm-device has the test-hooks flags the tests use).
STRESS_KILLS=200 cargo test -p mm-devices --features test-hooks --lib block::tests::stress -- --ignored
cargo test --workspace --no-fail-fast
