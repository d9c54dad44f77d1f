#!/usr/bin/env bash
# Installs the Debian packages the stack and its tests use, only those that are missing.
#   sip-tester (SIPp), baresip-core (softphone), espeak-ng + sox (test speech), gcc + python3-dev
#   (the rtp_core C extension), python3-venv (the project's virtual environment).
set -euo pipefail
pkgs=(sip-tester baresip-core espeak-ng sox gcc python3-venv docker-compose)
# python3-dev only matters when the interpreter is Debian's own.
if [ "$(command -v python3)" = /usr/bin/python3 ]; then pkgs+=(python3-dev); fi
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${missing[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
