#!/usr/bin/env bash
# Makes a development CA and mutual-TLS certificates for a MicroMachines
# cluster (controller/README.md, "Brokers"): one for the controller and one
# per broker, each signed by the CA, into DIR.
#
#   scripts/dev-ca.sh DIR BROKER_NAME...
#
# DIR/ca.pem        the CA certificate (--tls-ca on both sides)
# DIR/ca.key        its key: keep it to sign more brokers later (rerun with
#                   new names; an existing CA in DIR is reused)
# DIR/controller.pem, controller.key
#                   the controller's (--tls-cert/--tls-key of mm-controller),
#                   valid for localhost, 127.0.0.1, ::1 and the names in
#                   $CONTROLLER_NAMES (space-separated DNS names)
# DIR/NAME.pem, NAME.key
#                   broker NAME's (--tls-cert/--tls-key of mm-broker); the
#                   certificate's common name is the host name it registers
#
# Keys are ECDSA P-256 (PKCS#8), certificates last $DAYS days (default 365).
# For development and tests only: production wants a real CA and a way to
# rotate and revoke.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 DIR BROKER_NAME..." >&2
    exit 2
fi
dir=$1
shift
days=${DAYS:-365}
mkdir -p "$dir"
umask 077

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [[ ! -f $dir/ca.pem || ! -f $dir/ca.key ]]; then
    key "$dir/ca.key"
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days "$days" -subj "/CN=MicroMachines dev CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$dir/ca.pem"
fi

# sign NAME EXTENDED_KEY_USAGE SUBJECT_ALT_NAMES
sign() {
    local name=$1 usage=$2 sans=$3 ext
    key "$dir/$name.key"
    ext=$(mktemp)
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=%s\nsubjectAltName=%s\n' \
        "$usage" "$sans" >"$ext"
    openssl req -new -key "$dir/$name.key" -subj "/CN=$name" -out "$dir/$name.csr"
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
        -days "$days" -sha256 -extfile "$ext" -out "$dir/$name.pem" 2>/dev/null
    rm -f "$ext" "$dir/$name.csr"
}

sans="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in ${CONTROLLER_NAMES:-}; do
    sans="$sans,DNS:$extra"
done
sign controller serverAuth "$sans"

for broker in "$@"; do
    if [[ ! $broker =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]]; then
        echo "$0: broker name $broker: use 1-63 lowercase letters, digits or '-'" >&2
        exit 2
    fi
    sign "$broker" clientAuth "DNS:$broker"
done
chmod 644 "$dir"/*.pem
echo "$dir"
