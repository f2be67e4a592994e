#!/usr/bin/env bash
# Installs everything tm4 and its tests need on a fresh Debian 12 machine (run as root).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS=(nftables iproute2 iptables ipset sip-tester sipvicious dnsmasq-base
      espeak-ng sox libsox-fmt-all fail2ban netcat-openbsd iperf3 python3-venv
      systemd passwd util-linux procps faketime
      asterisk-core-sounds-en-gsm)  # digits/letters for tests that drive a real Asterisk

missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tm4: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# fail2ban's package enables a service we do not want running on a test host.
systemctl disable --now fail2ban >/dev/null 2>&1 || true

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import tm4, pytest, hypothesis, panoramisk, dns.resolver, click, importlinter" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".[test]"
  touch .venv/.installed
fi
