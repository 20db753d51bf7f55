#!/usr/bin/env bash
# Lays out the built-in root filesystem tree in DIR: Debian's busybox-static
# with every applet linked, and mm-init as /init. Used by both the initramfs
# and the ext4 image builders, so the two roots are the same.
#
#   populate.sh DIR MM_INIT_BINARY
set -euo pipefail
root="$1"
init="$2"
busybox=/bin/busybox
[ -x "$busybox" ] && file -L "$busybox" | grep -q 'statically linked' \
	|| { echo "populate.sh: need a static $busybox (apt-get install busybox-static)" >&2; exit 1; }
file -L "$init" | grep -Eq 'static(-pie)? linked|statically linked' \
	|| { echo "populate.sh: $init is not statically linked; the guest has no libc" >&2; exit 1; }

mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,mnt}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list-full); do
	[ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
install -m 0755 "$init" "$root/init"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "root:x:0:" > "$root/etc/group"
