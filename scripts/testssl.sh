#!/usr/bin/env bash
# Scans the proxy's TLS with testssl.sh: protocols, cipher suites, server preferences and
# known vulnerabilities. Usage: scripts/testssl.sh HOST:PORT CA_PEM [JSON_OUT]
# HOST is the name to ask for (SNI); the connection goes to 127.0.0.1. The device CA is added
# as trusted, so the chain of trust is checked against it.
set -euo pipefail
target=$1 ca=$2 out=${3:-$(mktemp --suffix=.json)}
rm -f "$out"
testssl --quiet --color 0 --warnings off --ip=127.0.0.1 --add-ca "$ca" \
  -p -S -P -U --jsonfile "$out" "https://$target" >/dev/null 2>&1 || true
[ -s "$out" ] || { echo "testssl.sh wrote no findings to $out" >&2; exit 2; }
# Findings at LOW or above, except two that follow from what a device-local CA is:
# - cert_revocation: the device CA publishes no CRL or OCSP (nothing could reach them on a
#   LAN); leaf certificates live 180 days and the CA is name-constrained to LAN names.
# - DNS_CAArecord: LAN names (.local, .home.arpa) have no public DNS to hold CAA records.
python3 - "$out" <<'PY'
import json, sys
allowed = {"cert_revocation", "DNS_CAArecord"}
bad = [f for f in json.load(open(sys.argv[1]))
       if f.get("severity") in ("LOW", "MEDIUM", "HIGH", "CRITICAL") and f.get("id") not in allowed]
for f in bad:
    print(f"{f['severity']} {f['id']}: {f['finding']}")
sys.exit(1 if bad else 0)
PY
