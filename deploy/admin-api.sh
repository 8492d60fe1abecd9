#!/usr/bin/env bash
# Configure the running compose stack through APISIX's Admin API, then demonstrate each decision.
#
#   deploy/gen-certs.sh && docker compose up -d --build && deploy/admin-api.sh
#   deploy/admin-api.sh --setup-only        # create the objects, skip the curl demo
#   deploy/admin-api.sh --demo-only         # only the curl demo
#
# Creates:
#   ssls/api-example-test           server cert for api.example.test + client.ca + catch-all skip regex
#   upstreams/demo-upstream         the compose "upstream" service
#   global_rules/mtls-baseline      mtls-guard policy "gateway-baseline" on every request
#   routes/billing-api              /api/*, /healthz: inline policy (SPIFFE ID of billing required)
#   routes/billing-report           /report/*: named policy "billing-only" in report mode
#
# Environment (defaults in brackets):
#   APISIX_ADMIN_URL    [http://127.0.0.1:9180]
#   APISIX_ADMIN_KEY    [demo-admin-key-CHANGE-ME] (same variable as docker-compose.yml)
#   GATEWAY_HOST        [127.0.0.1]  where ports 9080/9443 are published
#   HTTP_PORT/HTTPS_PORT [9080/9443]
#   UPSTREAM_NODE       [upstream:80]
#   CERTS_DIR           [deploy/certs]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ADMIN_URL="${APISIX_ADMIN_URL:-http://127.0.0.1:9180}"
ADMIN_KEY="${APISIX_ADMIN_KEY:-demo-admin-key-CHANGE-ME}"
GATEWAY_HOST="${GATEWAY_HOST:-127.0.0.1}"
HTTP_PORT="${HTTP_PORT:-9080}"
HTTPS_PORT="${HTTPS_PORT:-9443}"
UPSTREAM_NODE="${UPSTREAM_NODE:-upstream:80}"
CERTS_DIR="${CERTS_DIR:-$HERE/certs}"
SNI="api.example.test"
BILLING_ID="spiffe://example.test/ns/prod/sa/billing"

# ---- JSON helpers ---------------------------------------------------------------------------------
# The mtls-guard policy travels as a JSON *string* inside the route's JSON ("value": "<policy>"), so
# it is encoded twice: once as a JSON document, then as a JSON string literal. PEM certificates need
# the same string encoding (their newlines become \n). json_str does that with sed and awk only, so
# the script needs neither jq nor python on the host:
#   printf '%s' '{"policy": "billing-only"}' | json_str    ->    "{\"policy\": \"billing-only\"}"

# json_str: stdin -> one JSON string literal (backslash, quote, tab and CR escaped; lines joined with
# \n, the final newline dropped). Character by character in awk, which behaves the same in every awk
# (gsub replacement strings with backslashes do not).
json_str() {
  awk '
    BEGIN { printf "\"" }
    {
      if (NR > 1) printf "\\n"
      n = length($0)
      for (i = 1; i <= n; i++) {
        c = substr($0, i, 1)
        if (c == "\\") printf "\\\\"
        else if (c == "\"") printf "\\\""
        else if (c == "\t") printf "\\t"
        else if (c == "\r") printf "\\r"
        else printf "%s", c
      }
    }
    END { printf "\"" }
  '
}

# pem FILE: the file as a JSON string literal.
pem() {
  [ -r "$1" ] || die "cannot read $1 (run deploy/gen-certs.sh first)"
  json_str <"$1"
}

# ext_plugin_pre_req POLICY_JSON: the plugin object that attaches mtls-guard, fail-closed.
ext_plugin_pre_req() {
  local value
  value="$(printf '%s' "$1" | json_str)"
  printf '{"conf": [{"name": "mtls-guard", "value": %s}], "allow_degradation": false}' "$value"
}

# ---- request bodies (printed on stdout; the unit tests parse them) -------------------------------

ssl_body() {
  # client.ca + catch-all skip_mtls_uri_regex: APISIX then *requests* a client certificate in the
  # handshake but tolerates a missing or invalid one (ssl_client_verify = NONE or FAILED:...), and
  # its own access-phase check (which would answer a bare 400) exempts every URI. The decision is
  # left to mtls-guard. Without the regex APISIX rejects certificate-less clients in the handshake
  # ("tlsv1 alert"), before any route or plugin runs, so no exemption could ever apply.
  # The price: every route on this SNI must carry mtls-guard -> the global rule below.
  cat <<EOF
{
  "snis": ["$SNI"],
  "cert": $(pem "$CERTS_DIR/server.crt"),
  "key": $(pem "$CERTS_DIR/server.key"),
  "client": {
    "ca": $(pem "$CERTS_DIR/ca.crt"),
    "depth": 1,
    "skip_mtls_uri_regex": ["^/.*"]
  }
}
EOF
}

upstream_body() {
  printf '{"type": "roundrobin", "nodes": {"%s": 1}}' "$UPSTREAM_NODE"
}

global_rule_body() {
  # Runs on every request (rewrite phase, before the route's own ext-plugin-pre-req, which still
  # runs): no route on this SNI is left unprotected, including routes created later without
  # mtls-guard. Its exemptions are the ceiling for every route (see conf/policies.yaml).
  printf '{"plugins": {"ext-plugin-pre-req": %s}}' "$(ext_plugin_pre_req '{"policy": "gateway-baseline"}')"
}

# Inline policy (no policy library needed): exemptions for health checks and CORS preflight, the
# billing workload's SPIFFE ID for everything else, identity headers for the upstream.
BILLING_POLICY="$(
  cat <<EOF
{"exempt": [{"id": "health", "path": "/healthz", "methods": ["GET", "HEAD"]}, {"id": "cors-preflight", "preflight": true}], "require": {"san": {"uri": ["$BILLING_ID"]}}, "forward": {"san": "x-client-san", "subject": "x-client-subject"}}
EOF
)"

billing_route_body() {
  cat <<EOF
{
  "name": "billing-api",
  "hosts": ["$SNI"],
  "uris": ["/api/*", "/healthz"],
  "plugins": {"ext-plugin-pre-req": $(ext_plugin_pre_req "$BILLING_POLICY")},
  "upstream_id": "demo-upstream"
}
EOF
}

report_route_body() {
  # Named policy from conf/policies.yaml with a route-level override: report mode logs would-be
  # denials ("verdict=deny allowed=yes") at warning and lets the request through.
  cat <<EOF
{
  "name": "billing-report",
  "hosts": ["$SNI"],
  "uris": ["/report/*"],
  "plugins": {"ext-plugin-pre-req": $(ext_plugin_pre_req '{"policy": "billing-only", "mode": "report"}')},
  "upstream_id": "demo-upstream"
}
EOF
}

# ---- Admin API -----------------------------------------------------------------------------------

die() {
  echo "admin-api: $*" >&2
  exit 1
}

# admin_put PATH BODY-FUNCTION
admin_put() {
  local path="$1" body status out
  body="$("$2")"
  out="$(mktemp)"
  status="$(printf '%s' "$body" | curl -sS -o "$out" -w '%{http_code}' -X PUT \
    -H "X-API-KEY: $ADMIN_KEY" -H 'Content-Type: application/json' \
    --data-binary @- "$ADMIN_URL/apisix/admin/$path")" || status="000"
  case "$status" in
    200 | 201) echo "PUT /apisix/admin/$path -> $status" ;;
    *)
      echo "PUT /apisix/admin/$path -> $status" >&2
      if command -v jq >/dev/null; then jq . "$out" >&2 || cat "$out" >&2; else cat "$out" >&2; fi
      rm -f "$out"
      die "Admin API call failed"
      ;;
  esac
  rm -f "$out"
}

wait_for_admin() {
  for _ in $(seq 1 60); do
    if curl -fsS -o /dev/null -H "X-API-KEY: $ADMIN_KEY" "$ADMIN_URL/apisix/admin/routes"; then
      return 0
    fi
    sleep 1
  done
  die "Admin API at $ADMIN_URL did not answer within 60 s (is the stack up? is the key right?)"
}

setup() {
  [ -r "$CERTS_DIR/server.crt" ] || die "no certificates in $CERTS_DIR: run deploy/gen-certs.sh first"
  wait_for_admin
  admin_put ssls/api-example-test ssl_body
  admin_put upstreams/demo-upstream upstream_body
  admin_put global_rules/mtls-baseline global_rule_body
  admin_put routes/billing-api billing_route_body
  admin_put routes/billing-report report_route_body
}

# ---- demo ----------------------------------------------------------------------------------------

FAILURES=0

# check EXPECTED DESCRIPTION CURL-ARGS...
check() {
  local expected="$1" what="$2" actual
  shift 2
  actual="$(curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@")" || true
  if [ "$actual" = "$expected" ]; then
    printf 'ok    %-58s expected %s, got %s\n' "$what" "$expected" "$actual"
  else
    printf 'FAIL  %-58s expected %s, got %s\n' "$what" "$expected" "$actual"
    FAILURES=$((FAILURES + 1))
  fi
}

demo() {
  local base="https://$SNI:$HTTPS_PORT"
  # --resolve keeps the name in the URL, so curl sends SNI and Host = api.example.test (APISIX picks
  # the SSL object by SNI and rejects Host != SNI); --cacert trusts the demo CA for the server cert.
  local tls=(--resolve "$SNI:$HTTPS_PORT:$GATEWAY_HOST" --cacert "$CERTS_DIR/ca.crt")
  local valid=(--cert "$CERTS_DIR/client.crt" --key "$CERTS_DIR/client.key")
  local wrong=(--cert "$CERTS_DIR/client-wrong-identity.crt" --key "$CERTS_DIR/client-wrong-identity.key")
  local expired=(--cert "$CERTS_DIR/client-expired.crt" --key "$CERTS_DIR/client-expired.key")
  local untrusted=(--cert "$CERTS_DIR/client-untrusted.crt" --key "$CERTS_DIR/client-untrusted.key")

  # Configuration reaches APISIX through etcd within a moment, and the runner may still be starting
  # (503 until it listens): wait for the first exempt request to pass.
  local status
  for _ in $(seq 1 30); do
    status="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "${tls[@]}" "$base/healthz")" || true
    [ "$status" = 200 ] && break
    sleep 1
  done

  echo
  echo "== exemptions (both the global rule and the route exempt them)"
  check 200 "GET /healthz without a certificate" "${tls[@]}" "$base/healthz"
  check 200 "OPTIONS /api/invoices (CORS preflight), no certificate" "${tls[@]}" -X OPTIONS \
    -H 'Origin: https://app.example.test' -H 'Access-Control-Request-Method: POST' "$base/api/invoices"
  echo "== protected route /api/* (policy: SPIFFE ID $BILLING_ID)"
  check 403 "GET /api/invoices without a certificate" "${tls[@]}" "$base/api/invoices"
  check 200 "GET /api/invoices, valid billing certificate" "${tls[@]}" "${valid[@]}" "$base/api/invoices"
  check 403 "GET /api/invoices, valid chain, wrong identity (frontend)" "${tls[@]}" "${wrong[@]}" "$base/api/invoices"
  check 403 "GET /api/invoices, expired certificate" "${tls[@]}" "${expired[@]}" "$base/api/invoices"
  check 403 "GET /api/invoices, certificate from an untrusted CA" "${tls[@]}" "${untrusted[@]}" "$base/api/invoices"
  echo "== report mode /report/* (same identity rule, not enforced; the global rule still is)"
  check 200 "GET /report/x, wrong identity (logged: verdict=deny allowed=yes)" "${tls[@]}" "${wrong[@]}" "$base/report/x"
  check 403 "GET /report/x without a certificate (global rule)" "${tls[@]}" "$base/report/x"
  echo "== plain HTTP on :$HTTP_PORT (no TLS, so no certificate: only exemptions pass)"
  check 200 "GET http /healthz" -H "Host: $SNI" "http://$GATEWAY_HOST:$HTTP_PORT/healthz"
  check 403 "GET http /api/invoices" -H "Host: $SNI" "http://$GATEWAY_HOST:$HTTP_PORT/api/invoices"

  echo
  echo "The runner's decisions are in APISIX's error.log: docker compose logs apisix | grep 'mtls-guard'"
  echo "(the sidecar variant: docker compose -f docker-compose.sidecar.yml logs mtls-guard)"
  if [ "$FAILURES" -gt 0 ]; then
    die "$FAILURES check(s) did not match (see docs/deployment.md, Troubleshooting)"
  fi
}

main() {
  local mode="all"
  case "${1:-}" in
    "") ;;
    --setup-only) mode="setup" ;;
    --demo-only) mode="demo" ;;
    -h | --help) sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; return 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
  command -v curl >/dev/null || die "curl is required"
  [ "$mode" = demo ] || setup
  [ "$mode" = setup ] || demo
}

# Sourcing the script (tests do) defines the functions without calling the Admin API.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
