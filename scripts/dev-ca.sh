#!/usr/bin/env bash
# A development CA and certificates for shapeshifter's mTLS (docs/SECURITY.md). Not for production:
# keys are unencrypted and the CA key sits next to the certificates.
#
#   scripts/dev-ca.sh OUT_DIR [AGENT_NODE_ID ...]     (default agents: node-1 node-2)
#
# Identity scheme: the subject CN is the identity (node id, "coordinator", a user name); the role
# is a SAN URI spiffe://shapeshifter/role/<role> with <role> one of agent, coordinator, viewer,
# operator, admin. Every certificate also carries DNS:<CN>, DNS:localhost and IP:127.0.0.1, so
# servers can be dialled by name or on loopback. Files: ca.pem ca.key, <name>.pem <name>.key for
# coordinator, each agent, and the clients admin, operator, viewer, plus norole (no role URI).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUT_DIR [AGENT_NODE_ID ...]" >&2
    exit 2
fi
out=$1
shift
agents=("$@")
[[ ${#agents[@]} -gt 0 ]] || agents=(node-1 node-2)
days=${DEV_CA_DAYS:-365}

mkdir -p "$out"
chmod 700 "$out"
umask 077

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [[ ! -f "$out/ca.pem" ]]; then
    newkey "$out/ca.key"
    openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=shapeshifter dev CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$out/ca.pem"
fi

# issue NAME ROLE: NAME.key + NAME.pem signed by the CA (server and client use).
issue() {
    local name=$1 role=$2 ext
    ext=$(mktemp)
    {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=serverAuth,clientAuth"
        local san="DNS:${name},DNS:localhost,IP:127.0.0.1"
        [[ -n $role ]] && san="${san},URI:spiffe://shapeshifter/role/${role}"
        echo "subjectAltName=${san}"
    } >"$ext"
    newkey "$out/$name.key"
    openssl req -new -key "$out/$name.key" -subj "/CN=${name}" -out "$out/$name.csr"
    openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" \
        -CAcreateserial -sha256 -days "$days" -extfile "$ext" -out "$out/$name.pem" 2>/dev/null
    rm -f "$out/$name.csr" "$ext"
}

issue coordinator coordinator
for node in "${agents[@]}"; do
    issue "$node" agent
done
for role in admin operator viewer; do
    issue "$role" "$role"
done
issue norole ""
echo "dev CA and certificates in $out"
