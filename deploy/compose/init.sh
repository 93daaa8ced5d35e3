#!/bin/sh
# compose's one-shot `init` job (compose.yaml): the development PKI, each service's share of
# it, and Redis's password. It runs before every other service, then exits.
#
# The whole PKI, CA keys and the JWT signing key included, stays in $PKI_DIR (the `pki`
# volume, which no long-running service mounts). Each long-running service mounts a volume
# of its own, read-only, holding only the files below (copied again on every run, so
# `docker compose run --rm init` after `certs rotate` hands out the new files).
# Redis's password is generated on the first run only and never leaves the volumes.
#
# Environment (for tests): PKI_DIR (default /srv/xdsplane/pki), OUT (default
# /srv/xdsplane/out, one folder per volume: control-plane envoy guard billing redis),
# XDSPLANE (default xdsplane).
set -eu
PKI_DIR=${PKI_DIR:-/srv/xdsplane/pki}
OUT=${OUT:-/srv/xdsplane/out}
XDSPLANE=${XDSPLANE:-xdsplane}
umask 077

$XDSPLANE certs init --dir "$PKI_DIR"

# share ROLE FILE...: copy each FILE of the PKI into ROLE's volume (a rename: a reader never
# sees half a file; modes kept, keys stay 0600). A CA key is never shared.
share() {
  role=$1
  shift
  for f in "$@"; do
    case $f in
      *-ca.key | jwt-signing.key) echo "init.sh: $f is never shared" >&2; exit 1 ;;
    esac
    cp -p "$PKI_DIR/$f" "$OUT/$role/.$f.tmp"
    mv -f "$OUT/$role/.$f.tmp" "$OUT/$role/$f"
  done
}

# The control plane: its xDS server certificate, the CA of the Envoys' client certificates,
# and every file the policy (snapshots/) serves to Envoy over SDS and ECDS.
share control-plane xds-server.crt xds-server.key service-ca.crt \
  edge.crt edge.key edge.ocsp.der client-ca.crt client-ca.crl gateway.crt gateway.key \
  guard-client.crt guard-client.key jwks.json
# Envoy: the client certificate that proves it is node edge-1, and the CA of the server's.
share envoy edge-1.crt edge-1.key service-ca.crt
# The guard: its server certificate and the CA of its callers' (Envoy's guard-client).
share guard guard.crt guard.key service-ca.crt
# The demo billing service: its server certificate and the CA of its callers' (gateway).
share billing billing.crt billing.key service-ca.crt

# Redis's password, once: redis.conf (`requirepass`, for redis-server) in Redis's volume,
# the same password alone in the guard's (--redis-password-file).
if [ ! -s "$OUT/guard/redis-password" ]; then
  password=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s\n' "$password" > "$OUT/guard/.redis-password.tmp"
  mv -f "$OUT/guard/.redis-password.tmp" "$OUT/guard/redis-password"
  unset password
fi
# Redis runs as its own user in its own image: the file is world-readable, in a volume only
# Redis mounts.
printf 'requirepass %s\n' "$(cat "$OUT/guard/redis-password")" > "$OUT/redis/.redis.conf.tmp"
chmod 0444 "$OUT/redis/.redis.conf.tmp"
mv -f "$OUT/redis/.redis.conf.tmp" "$OUT/redis/redis.conf"
echo "init.sh: PKI in $PKI_DIR; shared with control-plane, envoy, guard, billing; redis.conf"
