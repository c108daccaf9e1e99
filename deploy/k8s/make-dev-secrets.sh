#!/bin/sh
# Make the secret material the kustomize base turns into Secrets, for a first deployment or a test cluster:
#   deploy/k8s/make-dev-secrets.sh [NAMESPACE] [DIR]      (defaults: models, deploy/k8s/base/secrets)
# Writes, without overwriting what is already there:
#   admin-token       the admin API's bearer token (Secret sidewatch-admin-token, key token); Alertmanager sends it
#   webhook-secret    the HMAC key of the webhook rollback hook (Secret sidewatch-webhook, key secret)
#   ca.crt, ca.key    a private certificate authority (ca.key stays here: issue your clients' certificates with it)
#   tls.crt, tls.key  the sidecar's certificate, for the gRPC listener and the admin API, valid for the Service's
#                     names in NAMESPACE, localhost and 127.0.0.1, for server and client authentication (the exec
#                     probes present it to the listener, which requires client certificates)
#   prometheus-client.crt, prometheus-client.key
#                     Prometheus's client certificate for the metrics port (Secret sidewatch-metrics-client), for
#                     client authentication only: it cannot pose as a sidecar
# In production, put your own files here instead (cert-manager's Certificate writes the same keys).
set -eu
namespace=${1:-models}
dir=${2:-$(dirname "$0")/base/secrets}
mkdir -p "$dir"
umask 077
cd "$dir"

# Tokens without a trailing newline: the same bytes reach the sidecar and Alertmanager's Authorization header.
[ -s admin-token ] || openssl rand -hex 32 | tr -d '\n' > admin-token
[ -s webhook-secret ] || openssl rand -hex 32 | tr -d '\n' > webhook-secret

if [ ! -s ca.crt ] || [ ! -s ca.key ]; then
    openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -days 365 \
        -subj "/CN=sidewatch CA" -keyout ca.key -out ca.crt 2>/dev/null
fi
if [ ! -s tls.crt ] || [ ! -s tls.key ]; then
    service="sidewatch.$namespace.svc"
    cat > tls.ext <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:sidewatch, DNS:sidewatch.$namespace, DNS:$service, DNS:$service.cluster.local, DNS:localhost, IP:127.0.0.1
EXT
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 \
        -subj "/CN=$service" -keyout tls.key -out tls.csr 2>/dev/null
    openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 365 \
        -extfile tls.ext -out tls.crt 2>/dev/null
    rm -f tls.csr tls.ext ca.srl
fi
if [ ! -s prometheus-client.crt ] || [ ! -s prometheus-client.key ]; then
    cat > prometheus-client.ext <<EXT
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
EXT
    openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 \
        -subj "/CN=prometheus" -keyout prometheus-client.key -out prometheus-client.csr 2>/dev/null
    openssl x509 -req -in prometheus-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days 365 \
        -extfile prometheus-client.ext -out prometheus-client.crt 2>/dev/null
    rm -f prometheus-client.csr prometheus-client.ext ca.srl
fi
echo "secret material for namespace $namespace in $dir"
