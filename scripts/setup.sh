#!/usr/bin/env bash
# Installs what MicroMachines needs on a fresh Debian machine (as root):
# the kernel source we build the guest from, busybox for the built-in image,
# QEMU for side-by-side benchmarks, and the build tools. Idempotent.
set -euo pipefail

packages=(
	linux-source-6.1 bc bison flex libelf-dev libssl-dev cpio file patch # guest kernel
	busybox-static e2fsprogs                                             # built-in image
	qemu-system-x86                                                      # benchmark peer
	capnproto libclang-dev                                               # protocols, bindgen
	build-essential util-linux                                           # cc, unshare, setpriv
	iproute2 nftables openssh-client                                     # microVM networking, SSH tests
	postgresql libpq-dev                                                 # controller (diesel)
	python3-venv                                                         # schemathesis (controller tests)
	wrk                                                                  # mm-bench api
)
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "setup.sh: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi
for component in rustfmt clippy; do
	rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component" >&2 || true
done
# schemathesis from PyPI for controller/tests/schemathesis.rs, in a venv in
# the state directory (Debian's python3 refuses pip installs outside one);
# made again only when the pinned version changes.
schemathesis_version=4.32.5
st_venv="${MM_STATE_DIR:-/var/lib/micromachines}/schemathesis"
if [ "$(cat "$st_venv/.version" 2>/dev/null)" != "$schemathesis_version" ]; then
	echo "setup.sh: installing schemathesis $schemathesis_version into $st_venv" >&2
	rm -rf "$st_venv"
	/usr/bin/python3 -m venv "$st_venv"
	"$st_venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$schemathesis_version" >&2
	echo "$schemathesis_version" >"$st_venv/.version"
fi
