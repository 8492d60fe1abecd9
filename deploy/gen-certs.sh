#!/usr/bin/env bash
# Demo PKI for apisix-mtls-guard: a client CA, a server certificate for api.example.test, and four
# client certificates that exercise every interesting decision (valid, wrong identity, expired,
# untrusted issuer). Also renders deploy/standalone/apisix.yaml with these certificates filled in.
#
#   deploy/gen-certs.sh [--out DIR] [--force]
#
# Output (default deploy/certs/, git-ignored):
#   ca.crt ca.key                      demo client CA (also the issuer of the server certificate)
#   server.crt server.key              CN/SAN api.example.test, serverAuth
#   client.crt client.key              SAN URI spiffe://example.test/ns/prod/sa/billing + DNS
#   client-wrong-identity.crt/.key     same CA, SAN URI .../sa/frontend (a valid chain, the wrong workload)
#   client-expired.crt/.key            billing identity, valid 2020-01-01..2021-01-01 only
#   client-untrusted.crt/.key          billing identity, issued by untrusted-ca.crt (not the client CA)
#   untrusted-ca.crt untrusted-ca.key  the rogue CA
#   apisix.yaml                        deploy/standalone/apisix.yaml rendered with the PEMs above
#
# Idempotent: when every certificate already exists it only re-renders apisix.yaml (a derived file)
# and exits 0. It never overwrites or mixes certificates unless --force is given.
# Demo material only: the keys are unencrypted and the CA is a throwaway. Never reuse them.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="$HERE/certs"
TEMPLATE="$HERE/standalone/apisix.yaml"
FORCE=0

SERVER_NAME="api.example.test"
TRUST_DOMAIN="example.test"
CERT_DAYS=825

# Every file this script owns in $OUT (apisix.yaml is derived and always re-rendered).
CERT_FILES=(
  ca.crt ca.key server.crt server.key
  client.crt client.key
  client-wrong-identity.crt client-wrong-identity.key
  client-expired.crt client-expired.key
  client-untrusted.crt client-untrusted.key
  untrusted-ca.crt untrusted-ca.key
)

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

die() {
  echo "gen-certs: $*" >&2
  exit 1
}

while [ $# -gt 0 ]; do
  case "$1" in
    --force) FORCE=1 ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT="$2"; shift ;;
    --out=*) OUT="${1#--out=}" ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  shift
done

command -v openssl >/dev/null || die "openssl is required"

# Fill the <<file>> placeholders of the standalone template with the PEM files, keeping the
# placeholder's indentation so the PEM stays inside its YAML block scalar.
render_standalone() {
  local dir="$1" target="$1/apisix.yaml"
  [ -f "$TEMPLATE" ] || { echo "gen-certs: no template at $TEMPLATE, skipping apisix.yaml" >&2; return 0; }
  awk -v dir="$dir" '
    NR == 1 {
      print "# Rendered by deploy/gen-certs.sh from deploy/standalone/apisix.yaml: edit the template and"
      print "# re-run the script instead of editing this copy. Contains a private key: do not commit it."
      print "#"
    }
    /^[ ]*<<[A-Za-z0-9._-]+>>[ ]*$/ {
      indent = $0; sub(/<<.*$/, "", indent)
      name = $0; sub(/^[ ]*<</, "", name); sub(/>>[ ]*$/, "", name)
      file = dir "/" name; n = 0
      while ((status = (getline line < file)) > 0) { print indent line; n++ }
      close(file)
      if (status < 0 || n == 0) { print "gen-certs: cannot read " file > "/dev/stderr"; exit 1 }
      next
    }
    { print }
  ' "$TEMPLATE" >"$target.tmp"
  # Rewritten in place, not renamed: a single-file bind mount keeps pointing at the old inode, so a
  # rename would go unseen by a running standalone APISIX. A half-written file is harmless, because
  # APISIX ignores apisix.yaml until it ends with "#END".
  cat "$target.tmp" >"$target"
  rm -f "$target.tmp"
  # Readable by the container user (uid 636) when bind-mounted; it holds the demo server key.
  chmod 0644 "$target"
  echo "rendered $target"
}

existing=0
for f in "${CERT_FILES[@]}"; do
  [ -e "$OUT/$f" ] && existing=$((existing + 1))
done
if [ "$FORCE" = 0 ] && [ "$existing" -gt 0 ]; then
  if [ "$existing" -eq "${#CERT_FILES[@]}" ]; then
    echo "certificates already exist in $OUT (use --force to regenerate them)"
    render_standalone "$OUT"
    exit 0
  fi
  die "$OUT holds $existing of ${#CERT_FILES[@]} certificate files; refusing to mix them (use --force)"
fi

mkdir -p "$OUT"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mtls-guard-certs.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
umask 077
# The "ca" section below reads its directory from $CA_DIR; OpenSSL refuses a config that names an
# unset variable, so give it a value for the other commands too.
export CA_DIR="$WORK"

# quiet CMD...: run an openssl command, showing its output only when it fails.
quiet() {
  if ! "$@" >"$WORK/openssl.log" 2>&1; then
    cat "$WORK/openssl.log" >&2
    die "failed: $*"
  fi
}

# One OpenSSL configuration for both CAs (the "ca" command needs a database) and every profile.
cat >"$WORK/openssl.cnf" <<EOF
[ req ]
distinguished_name = req_dn
prompt             = no

[ req_dn ]
CN = placeholder

[ ca ]
default_ca = demo_ca

[ demo_ca ]
dir             = \$ENV::CA_DIR
database        = \$dir/index.txt
serial          = \$dir/serial
new_certs_dir   = \$dir/issued
certificate     = \$dir/ca.crt
private_key     = \$dir/ca.key
default_md      = sha256
policy          = any_name
unique_subject  = no
copy_extensions = none
email_in_dn     = no

[ any_name ]
organizationName       = optional
organizationalUnitName = optional
commonName             = supplied

[ ca_ext ]
basicConstraints       = critical, CA:TRUE, pathlen:0
keyUsage               = critical, keyCertSign, cRLSign
subjectKeyIdentifier   = hash

[ server_ext ]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = serverAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid
subjectAltName         = DNS:$SERVER_NAME

[ client_billing_ext ]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = clientAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid
subjectAltName         = URI:spiffe://$TRUST_DOMAIN/ns/prod/sa/billing, DNS:billing.prod.$TRUST_DOMAIN

[ client_frontend_ext ]
basicConstraints       = critical, CA:FALSE
keyUsage               = critical, digitalSignature
extendedKeyUsage       = clientAuth
subjectKeyIdentifier   = hash
authorityKeyIdentifier = keyid
subjectAltName         = URI:spiffe://$TRUST_DOMAIN/ns/prod/sa/frontend, DNS:frontend.prod.$TRUST_DOMAIN
EOF

# new_ca NAME SUBJECT: self-signed EC P-256 CA in $WORK/NAME/ (plus the "ca" command's database).
new_ca() {
  local dir="$WORK/$1"
  mkdir -p "$dir/issued"
  : >"$dir/index.txt"
  openssl rand -hex 16 >"$dir/serial"
  quiet openssl req -x509 -new -config "$WORK/openssl.cnf" -extensions ca_ext \
    -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "$2" -days 3650 -sha256
}

# issue CA NAME SUBJECT EXTENSIONS [STARTDATE ENDDATE]: EC P-256 key + certificate $WORK/NAME.{crt,key}.
# The "ca" command is used (not "x509 -req") because it takes an explicit start date, which is how
# the expired certificate gets a validity window in the past without faking the clock.
issue() {
  local ca="$1" name="$2" subject="$3" ext="$4" validity
  if [ $# -ge 6 ]; then
    validity=(-startdate "$5" -enddate "$6")
  else
    validity=(-days "$CERT_DAYS")
  fi
  quiet openssl req -new -config "$WORK/openssl.cnf" \
    -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$WORK/$name.key" -out "$WORK/$name.csr" -subj "$subject"
  openssl rand -hex 16 >"$WORK/$ca/serial"
  CA_DIR="$WORK/$ca" quiet openssl ca -batch -notext -preserveDN -config "$WORK/openssl.cnf" \
    -extensions "$ext" "${validity[@]}" \
    -in "$WORK/$name.csr" -out "$WORK/$name.crt"
}

new_ca demo "/O=mtls-guard demo/CN=mtls-guard demo client CA"
new_ca rogue "/O=Somebody Else/CN=untrusted demo CA"

issue demo server "/O=mtls-guard demo/CN=$SERVER_NAME" server_ext
issue demo client "/O=mtls-guard demo/OU=prod/CN=billing" client_billing_ext
issue demo client-wrong-identity "/O=mtls-guard demo/OU=prod/CN=frontend" client_frontend_ext
# UTCTime (YYMMDDHHMMSSZ) is accepted by every OpenSSL version.
issue demo client-expired "/O=mtls-guard demo/OU=prod/CN=billing" client_billing_ext 200101000000Z 210101000000Z
issue rogue client-untrusted "/O=mtls-guard demo/OU=prod/CN=billing" client_billing_ext

cp "$WORK/demo/ca.crt" "$WORK/ca.crt"
cp "$WORK/demo/ca.key" "$WORK/ca.key"
cp "$WORK/rogue/ca.crt" "$WORK/untrusted-ca.crt"
cp "$WORK/rogue/ca.key" "$WORK/untrusted-ca.key"

# Sanity check before anything is replaced: the valid ones verify, the bad ones do not.
openssl verify -CAfile "$WORK/ca.crt" -purpose sslserver "$WORK/server.crt" >/dev/null ||
  die "generated server certificate does not verify"
openssl verify -CAfile "$WORK/ca.crt" -purpose sslclient "$WORK/client.crt" "$WORK/client-wrong-identity.crt" >/dev/null ||
  die "generated client certificates do not verify"
if openssl verify -CAfile "$WORK/ca.crt" "$WORK/client-expired.crt" >/dev/null 2>&1; then
  die "the expired certificate verifies (clock problem?)"
fi

for f in "${CERT_FILES[@]}"; do
  mv -f "$WORK/$f" "$OUT/$f"
done
# Certificates are public; keys stay owner-only.
chmod 0644 "$OUT"/*.crt
chmod 0600 "$OUT"/*.key
echo "wrote demo certificates to $OUT"
render_standalone "$OUT"
