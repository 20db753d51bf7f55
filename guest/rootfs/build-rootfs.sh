#!/usr/bin/env bash
# Builds the built-in root filesystem as an ext4 image (mke2fs -d: no loop
# mounts, no root needed), cached in the state directory under a hash of its
# contents. Prints the path. The image is a read-only base: give each
# microVM its own copy (cp --sparse=always) or an overlay.
#
# Environment: MM_STATE_DIR, MM_INIT_BIN, MM_ROOTFS_MIB (default 64).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
state="${MM_STATE_DIR:-/var/lib/micromachines}"
size_mib="${MM_ROOTFS_MIB:-64}"
init="$(bash "$here/build-mm-init.sh")"

key="$( (cat "$init" /bin/busybox "$here/populate.sh" "$0"; echo "$size_mib") | sha256sum | cut -c1-16)"
out="$state/rootfs/$key.ext4"
# One builder at a time: parallel tests and benchmarks may all ask at once.
mkdir -p "$state/rootfs"
exec 9>"$state/rootfs/.lock"
flock 9
if [ -f "$out" ]; then echo "$out"; exit 0; fi

root="$(mktemp -d "${TMPDIR:-/var/tmp}/mm-rootfs.XXXXXX")"
trap 'rm -rf "$root"' EXIT
bash "$here/populate.sh" "$root" "$init"
mkdir -p "$(dirname "$out")"
rm -f "$out.tmp"
mke2fs -q -t ext4 -L mm-root -E root_owner=0:0 -d "$root" "$out.tmp" "${size_mib}M" >&2
mv "$out.tmp" "$out"
echo "$out"
