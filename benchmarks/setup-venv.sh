#!/usr/bin/env bash
# Create benchmarks/.venv: loopscope from this checkout (editable, so its C accelerator is
# built in place, with the otel extra for otel_export.py), the workloads' dependencies and
# the peers.  PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=benchmarks/.venv
PIP=("$VENV/bin/pip" install --quiet --disable-pip-version-check)
"$PYTHON" -m venv "$VENV"
"${PIP[@]}" -e '.[otel]' -r benchmarks/requirements.txt
missing=()
while read -r peer; do
  case "$peer" in ''|'#'*) continue ;; esac
  "${PIP[@]}" "$peer" || missing+=("$peer")
done < benchmarks/requirements-peers.txt
if [ ${#missing[@]} -gt 0 ]; then
  echo "peers that could not be installed (the table lists them as such): ${missing[*]}" >&2
fi
touch "$VENV/.installed"
