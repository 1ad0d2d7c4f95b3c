#!/bin/sh
# Writes compose/secrets/ (git-ignored): a CA and the NATS servers' certificate (TLS for
# clients and cluster routes), and a random password for every NATS user of the mesh.
#   compose/gen-secrets.sh [NODE_ID ...]     (default: gpu-node-1, compose's one node)
# The users and their permissions are compose/nats/auth.conf; for other node ids
# regenerate it too:  python -m gpufaas.shared.nats_auth NODE_ID ... > compose/nats/auth.conf
# Run it again to rotate every password and the certificates, then restart the stack.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
out="$here/secrets"
[ "$#" -gt 0 ] || set -- gpu-node-1
umask 077
mkdir -p "$out/nats" "$out/ca"
chmod 700 "$out" "$out/nats" "$out/ca"

users="admin gateway scheduler"
for node in "$@"; do
  users="$users node_$node worker_$node"
done
for user in $users; do
  grep -q "\"user\": \"$user\"" "$here/nats/auth.conf" || {
    echo "compose/nats/auth.conf has no user $user: regenerate it (see the top of $0)" >&2
    exit 1
  }
done

# Passwords: one file per user (mounted into that role's containers only) and the
# server's side, as config variables compose/nats/auth.conf refers to.
: > "$out/nats/nats-passwords.conf"
for user in $users; do
  pw=$(openssl rand -base64 48 | tr -dc 'A-Za-z0-9' | cut -c1-40)
  printf '%s\n' "$pw" > "$out/$user.password"
  var=$(printf 'PW_%s' "$user" | tr 'a-z-' 'A-Z_')
  printf '%s: "%s"\n' "$var" "$pw" >> "$out/nats/nats-passwords.conf"
done

# TLS: a CA, and one certificate for the three servers (server and client use: routes
# present it to each other and verify the peer's).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
  -subj "/CN=gpufaas NATS CA" -keyout "$out/ca/ca-key.pem" -out "$out/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=gpufaas-nats" \
  -keyout "$out/nats/nats-key.pem" -out "$out/ca/nats.csr" 2>/dev/null
printf '%s\n' \
  "subjectAltName=DNS:nats-1,DNS:nats-2,DNS:nats-3,DNS:localhost,IP:127.0.0.1" \
  "extendedKeyUsage=serverAuth,clientAuth" > "$out/ca/nats.ext"
openssl x509 -req -in "$out/ca/nats.csr" -CA "$out/ca.pem" -CAkey "$out/ca/ca-key.pem" \
  -CAcreateserial -CAserial "$out/ca/ca.srl" -days 825 -extfile "$out/ca/nats.ext" -out "$out/nats/nats-cert.pem" 2>/dev/null
cp "$out/ca.pem" "$out/nats/ca.pem"

# The platform image runs as uid 10001: as root, hand it the files its containers mount
# (0600; admin.password is the operator's); as another user, they stay readable (0644)
# inside this 0700 directory.
if [ "$(id -u)" = 0 ]; then
  for user in $users; do
    [ "$user" = admin ] || chown 10001:10001 "$out/$user.password"
  done
  chown 10001:10001 "$out/ca.pem"
  chown -R 10001:10001 "$out/nats"  # the NATS servers run the platform image as its user
else
  chmod 644 "$out"/*.password "$out/ca.pem" "$out/nats"/*
  echo "note: not root, so the secret files are 0644 inside the 0700 $out" >&2
fi
echo "wrote $out: users $users"
