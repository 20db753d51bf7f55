#!/usr/bin/env bash
# Builds the built-in initramfs: the tree from populate.sh packed as an
# uncompressed newc cpio (decompressing in the guest kernel is slow under
# PVM), cached in the state directory under a hash of its contents. Prints
# the path of the archive.
#
# Environment: MM_STATE_DIR (default /var/lib/micromachines),
#              MM_INIT_BIN (use this mm-init instead of building one).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${MM_STATE_DIR:-/var/lib/micromachines}"
init="$(bash "$here/build-mm-init.sh")"

key="$(cat "$init" /bin/busybox "$here/populate.sh" "$0" | sha256sum | cut -c1-16)"
out="$state/initramfs/$key.cpio"
# One builder at a time: parallel tests and benchmarks may all ask at once.
mkdir -p "$state/initramfs"
exec 9>"$state/initramfs/.lock"
flock 9
if [ -f "$out" ]; then echo "$out"; exit 0; fi

root="$(mktemp -d "${TMPDIR:-/var/tmp}/mm-initramfs.XXXXXX")"
trap 'rm -rf "$root"' EXIT
bash "$here/populate.sh" "$root" "$init"
mkdir -p "$(dirname "$out")"
(cd "$root" && find . -print0 | sort -z | cpio --null --quiet -o -H newc --owner=0:0) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
