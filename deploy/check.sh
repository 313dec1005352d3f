#!/usr/bin/env bash
# Checks docker/, helm/, deploy/ without a cluster or a container engine:
#   - deploy/check.py: helm lint + render of every chart (defaults and examples/*.yaml) through
#     helm-python-sdk (Helm's Go SDK in a wheel: no helm binary), kubernetes-validate --strict,
#     check-config of every rendered config, compose's environment, and the metric names of
#     deploy/monitoring against a running gateway and agent;
#   - promtool check rules on alerts.yaml (if promtool is installed: Debian package prometheus);
#   - systemd-analyze verify on deploy/systemd/*.service (if systemd-analyze exists);
#   - docker/check-image.sh (podman build of the runtime stage FROM scratch; SKIPPED without podman).
# Needs: python3 with venv, the binaries (RELAYGATE_BIN_DIR, else target/release or target/debug,
# whichever is newer). The venv lives in target/deploy-venv and is rebuilt when requirements change.
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

status=0
"$venv/bin/python" deploy/check.py || status=1

if command -v promtool >/dev/null 2>&1; then
  if promtool check rules deploy/monitoring/alerts.yaml; then
    echo "ok    promtool check rules deploy/monitoring/alerts.yaml"
  else
    echo "FAIL  promtool check rules deploy/monitoring/alerts.yaml"; status=1
  fi
else
  echo "skip  promtool not installed (apt-get install prometheus): alerts.yaml PromQL not parsed"
fi

if command -v systemd-analyze >/dev/null 2>&1; then
  # verify resolves ExecStart: point it at the binaries being checked through a temporary copy of
  # the units (they name /usr/local/bin, where an install puts them).
  bin_dir="${RELAYGATE_BIN_DIR:-}"
  if [[ -z "$bin_dir" ]]; then
    for d in target/release target/debug; do
      [[ -x "$d/relaygate-gateway" ]] || continue
      if [[ -z "$bin_dir" || "$d/relaygate-gateway" -nt "$bin_dir/relaygate-gateway" ]]; then bin_dir=$d; fi
    done
  fi
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  for u in deploy/systemd/*.service; do
    sed "s|/usr/local/bin/|$(realpath "${bin_dir:-/usr/local/bin}")/|g" "$u" >"$tmp/$(basename "$u")"
  done
  if out=$(SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no "$tmp"/*.service 2>&1) && [[ -z "$out" ]]; then
    echo "ok    systemd-analyze verify deploy/systemd/*.service"
  else
    echo "$out"
    echo "FAIL  systemd-analyze verify deploy/systemd/*.service"; status=1
  fi
else
  echo "skip  systemd-analyze not installed: units not verified"
fi

if ! bash docker/check-image.sh; then status=1; fi

exit $status
