#!/usr/bin/env bash
# Checks docker/, helm/ and deploy/ without a cluster or a container engine (see deploy/check.py):
#   - helm lint (strict) and render of every chart, default values and helm/*/examples/*.yaml, through
#     helm-python-sdk (Helm's Go SDK inside its wheel: no helm binary, nothing downloaded at run time);
#   - kubernetes-validate --strict of every rendered manifest (Kubernetes 1.37), consistency checks;
#   - `check-config` of the real binaries on every config the charts, compose.yaml and deploy/ produce;
#   - the metric names of deploy/monitoring against a running gateway and agent (loopback, free ports);
#   - promtool check rules, systemd-analyze verify, docker/check-image.sh (podman): each skipped with a
#     message when the tool is missing.
# Needs python3 (with venv) and the binaries: $RELAYGATE_BIN_DIR, else the newer of target/release and
# target/debug. The venv is target/deploy-venv, rebuilt when deploy/requirements.txt changes.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-venv
stamp="$venv/.requirements.sha256"
want=$(sha256sum deploy/requirements.txt | cut -d' ' -f1)
if [[ ! -x "$venv/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "deploy-check: installing deploy/requirements.txt into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r deploy/requirements.txt
  echo "$want" >"$stamp"
fi

exec "$venv/bin/python" deploy/check.py
