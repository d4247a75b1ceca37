#!/usr/bin/env bash
# Print one interpreter per supported Python version (3.10 to 3.14) found on this machine:
# pythonX.Y on PATH if it runs, else pyenv's. With --require V..., fail if one is missing.
set -u
found=()
for v in 3.10 3.11 3.12 3.13 3.14; do
  exe=""
  if command -v "python$v" >/dev/null 2>&1 && "python$v" -c 'import sys' >/dev/null 2>&1; then
    exe=$(command -v "python$v")
  elif command -v pyenv >/dev/null 2>&1; then
    for cand in "$(pyenv root)"/versions/"$v".*/bin/"python$v"; do
      [ -x "$cand" ] && exe="$cand"
    done
  fi
  [ -n "$exe" ] && found+=("$exe")
done
if [ "${1:-}" = "--require" ]; then
  shift
  for want in "$@"; do
    printf '%s\n' "${found[@]}" | grep -q "python$want\$" || { echo "Python $want not found" >&2; exit 1; }
  done
fi
printf '%s\n' "${found[@]}"
