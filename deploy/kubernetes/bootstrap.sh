#!/usr/bin/env bash
# Create the Secrets and ConfigMaps that deploy/kubernetes/*.yaml and deploy/helm/values-*.yaml refer
# to, from deploy/certs/ (deploy/gen-certs.sh) and conf/. Safe to re-run (kubectl apply).
#
#   deploy/gen-certs.sh
#   deploy/kubernetes/bootstrap.sh            # before `helm install`: the APISIX pod mounts the ConfigMap
#
# Environment: APISIX_NAMESPACE [ingress-apisix], DEMO_NAMESPACE [mtls-demo], CERTS_DIR [deploy/certs].
# After changing conf/mtls-guard.yaml or conf/policies.yaml, re-run and restart the APISIX pods: the
# runner reads its settings and policy library once, at start-up.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
APISIX_NAMESPACE="${APISIX_NAMESPACE:-ingress-apisix}"
DEMO_NAMESPACE="${DEMO_NAMESPACE:-mtls-demo}"
CERTS_DIR="${CERTS_DIR:-$ROOT/deploy/certs}"

command -v kubectl >/dev/null || { echo "bootstrap: kubectl is required" >&2; exit 1; }
for f in server.crt server.key ca.crt; do
  [ -r "$CERTS_DIR/$f" ] || { echo "bootstrap: missing $CERTS_DIR/$f (run deploy/gen-certs.sh)" >&2; exit 1; }
done

# render-then-apply keeps every step idempotent.
apply() { kubectl apply -f -; }

for ns in "$APISIX_NAMESPACE" "$DEMO_NAMESPACE"; do
  kubectl create namespace "$ns" --dry-run=client -o yaml | apply
done

# Server certificate for the ApisixTls (type kubernetes.io/tls: tls.crt + tls.key).
kubectl -n "$DEMO_NAMESPACE" create secret tls api-example-test-tls \
  --cert="$CERTS_DIR/server.crt" --key="$CERTS_DIR/server.key" --dry-run=client -o yaml | apply
# Client CA: the controller reads the key "ca.crt" (or "cert") from the caSecret.
kubectl -n "$DEMO_NAMESPACE" create secret generic mtls-client-ca \
  --from-file=ca.crt="$CERTS_DIR/ca.crt" --dry-run=client -o yaml | apply

# Runner settings and policy library, mounted into the APISIX pod by the Helm values.
kubectl -n "$APISIX_NAMESPACE" create configmap mtls-guard-config \
  --from-file=mtls-guard.yaml="$ROOT/conf/mtls-guard.yaml" \
  --from-file=policies.yaml="$ROOT/conf/policies.yaml" --dry-run=client -o yaml | apply

# nginx configuration of the demo upstream (deploy/kubernetes/upstream.yaml).
kubectl -n "$DEMO_NAMESPACE" create configmap demo-upstream-conf \
  --from-file=upstream.conf="$ROOT/conf/upstream.conf" --dry-run=client -o yaml | apply
