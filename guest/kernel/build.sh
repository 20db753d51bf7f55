#!/usr/bin/env bash
# Builds the MicroMachines guest kernel from Debian's linux-source-6.1, our
# config fragment and our PVM patches, and caches it in the state directory
# under a hash of all three and this script. Prints the vmlinux path; a
# bzImage of the same kernel sits beside it (mm-vmm boots either; the ELF
# vmlinux skips the decompressor, which is slow under PVM).
#
#   guest/kernel/build.sh [--print-path]
#
# Environment: MM_STATE_DIR (default /var/lib/micromachines), MM_KERNEL_JOBS.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
state="${MM_STATE_DIR:-/var/lib/micromachines}"
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { echo "build.sh: $tarball missing (apt-get install linux-source-6.1)" >&2; exit 1; }

src_version="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
key="$( { echo "$src_version"; cat "$0" "$here/config.fragment" "$here"/patches/*.patch; } | sha256sum | cut -c1-16)"
out="$state/kernel/$key"
if [ "${1:-}" = "--print-path" ]; then echo "$out/vmlinux"; exit 0; fi
# One builder at a time: parallel tests and benchmarks may all ask at once.
mkdir -p "$state/kernel"
exec 9>"$state/kernel/.lock"
flock 9
if [ -f "$out/vmlinux" ]; then echo "$out/vmlinux"; exit 0; fi

work="$(mktemp -d "${TMPDIR:-/var/tmp}/mm-kernel.XXXXXX")"
trap 'rm -rf "$work"' EXIT
echo "build.sh: building guest kernel $key in $work (several minutes)" >&2
tar -C "$work" -xf "$tarball"
cd "$work/linux-source-6.1"
for p in "$here"/patches/*.patch; do
	patch -p1 --quiet --forward < "$p"
done
KCONFIG_ALLCONFIG="$here/config.fragment" make -s allnoconfig >&2
# Every option the fragment asks for must have survived Kconfig's dependencies.
missing=0
while IFS= read -r line; do
	case "$line" in CONFIG_*=y) grep -qx "$line" .config || { echo "build.sh: $line did not stick" >&2; missing=1; } ;; esac
done < "$here/config.fragment"
[ "$missing" = 0 ] || exit 1
make -s -j"${MM_KERNEL_JOBS:-$(nproc)}" vmlinux bzImage >&2
mkdir -p "$out.tmp"
cp vmlinux .config System.map arch/x86/boot/bzImage "$out.tmp/"
rm -rf "$out" && mv "$out.tmp" "$out"
echo "$out/vmlinux"
