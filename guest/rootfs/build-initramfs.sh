#!/usr/bin/env bash
# Builds the built-in initramfs: Debian's busybox-static plus a static mm-init
# as /init, packed as an uncompressed newc cpio (decompressing in the guest kernel is slow under PVM) and cached in the state directory
# under a hash of its contents. Prints the path of the archive.
#
# Environment: MM_STATE_DIR (default /var/lib/micromachines),
#              MM_INIT_BIN (use this mm-init instead of building one).
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
state="${MM_STATE_DIR:-/var/lib/micromachines}"
busybox=/bin/busybox
[ -x "$busybox" ] && file -L "$busybox" | grep -q 'statically linked' \
	|| { echo "build-initramfs.sh: need a static $busybox (apt-get install busybox-static)" >&2; exit 1; }

init="${MM_INIT_BIN:-}"
if [ -z "$init" ]; then
	# mm-init must be static: the initramfs has no libc. An explicit
	# --target keeps crt-static away from build scripts and proc macros.
	(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static -C strip=symbols" cargo build --quiet --release \
		-p mm-init --target x86_64-unknown-linux-gnu --target-dir "$repo/target/guest") >&2
	init="$repo/target/guest/x86_64-unknown-linux-gnu/release/mm-init"
fi

key="$(cat "$init" "$busybox" "$0" | sha256sum | cut -c1-16)"
out="$state/initramfs/$key.cpio"
if [ -f "$out" ]; then echo "$out"; exit 0; fi

root="$(mktemp -d "${TMPDIR:-/var/tmp}/mm-initramfs.XXXXXX")"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list-full); do
	[ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$init" "$root/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
mkdir -p "$(dirname "$out")"
(cd "$root" && find . -print0 | sort -z | cpio --null --quiet -o -H newc --owner=0:0) > "$out.tmp"
mv "$out.tmp" "$out"
echo "$out"
