#!/usr/bin/env bash
# Validates the deployment files: Kubernetes manifests (deploy/kubernetes), docker-compose.yml,
# the Dockerfile, the Prometheus config and rules (deploy/prometheus) and the Grafana
# provisioning and dashboard (deploy/grafana). The checks are in deploy/validate.py; this script
# installs their tools on first use, quietly, into a cache directory:
#   - a Python venv with kubernetes-validate (bundles the Kubernetes JSON schemas),
#     check-jsonschema (bundles the compose-spec schema) and dockerfile (BuildKit's parser), from PyPI;
#   - promtool, taken out of Debian's `prometheus` package (apt-get download; nothing is installed
#     or started). A promtool on PATH is used instead if there is one.
# Exits non-zero if any file is invalid. .ci/run calls it.
#   PGTETHER_DEPLOY_CACHE  where the tools go (default ~/.cache/pgtether-deploy)
#   PGTETHER_BIN           a pgtether binary: also run `pgtether check` on every config
set -euo pipefail
cd "$(dirname "$0")/.."

cache=${PGTETHER_DEPLOY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pgtether-deploy}
venv=$cache/venv
requirements="kubernetes-validate==1.37.0 check-jsonschema==0.39.0 dockerfile==3.4.0"
mkdir -p "$cache"

if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$requirements" ]; then
    echo "validate: installing $requirements"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pip install -q --disable-pip-version-check $requirements
    echo "$requirements" >"$venv/.requirements"
fi

promtool=$(command -v promtool || true)
if [ -z "$promtool" ]; then
    promtool=$cache/promtool
    if [ ! -x "$promtool" ]; then
        echo "validate: fetching promtool from Debian's prometheus package"
        tmp=$(mktemp -d)
        trap 'rm -rf "$tmp"' EXIT
        download() { (cd "$tmp" && apt-get download -q prometheus) >/dev/null 2>&1; }
        if download || { apt-get update -q >/dev/null 2>&1 && download; }; then
            dpkg-deb --fsys-tarfile "$tmp"/prometheus_*.deb | tar -x -C "$tmp" ./usr/bin/promtool
            mv "$tmp/usr/bin/promtool" "$promtool"
        else
            echo "validate: could not get promtool; rule files get a structural check only" >&2
            promtool=
        fi
    fi
fi

PROMTOOL=$promtool exec "$venv/bin/python" deploy/validate.py
