#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, then runs them all.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for pkg in skopeo:skopeo docker-registry:docker-registry nginx:nginx-light dockerd:docker.io containerd:containerd podman:podman; do
    command -v "${pkg%%:*}" >/dev/null 2>&1 || need+=("${pkg#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

# Debian's own Python marks itself externally managed; this machine's tests own it.
export PIP_BREAK_SYSTEM_PACKAGES=1
python3 -m pip install -q -e '.[test]'
exec python3 -m pytest -q "$@"
