#!/usr/bin/env bash
# Instructions per task step (valgrind's callgrind), a figure that machine load does not
# move: the same storm at two lengths, the difference divided by the extra steps.
#   benchmarks/instructions.sh [PYTHON]      (default: benchmarks/.venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-benchmarks/.venv/bin/python}
command -v valgrind >/dev/null || { echo "valgrind is not installed" >&2; exit 1; }
script=$(mktemp --suffix .py)
trap 'rm -f "$script"' EXIT
cat > "$script" <<'PYEOF'
import asyncio, sys
kind, variant, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
if variant != "base":
    from prometheus_client import CollectorRegistry
    import loopscope
    loopscope.install(registry=CollectorRegistry())
if kind == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
else:
    loop = asyncio.new_event_loop()
async def worker():
    for _ in range(steps):
        await asyncio.sleep(0)
async def storm():
    await asyncio.gather(*(worker() for _ in range(100)))
loop.run_until_complete(storm())
loop.close()
PYEOF
count() {  # kind variant steps -> instructions
  local env=()
  [ "$2" = pure ] && env=(LOOPSCOPE_PURE_PYTHON=1)
  env "${env[@]}" valgrind --tool=callgrind --callgrind-out-file=/dev/null "$PY" "$script" "$1" "$2" "$3" 2>&1 |
    awk '/Collected/ {print $4}'
}
printf '%-8s %-6s %s\n' loop path instructions/step
for kind in uvloop asyncio; do
  for variant in base c pure; do
    a=$(count "$kind" "$variant" 10)
    b=$(count "$kind" "$variant" 210)
    printf '%-8s %-6s %d\n' "$kind" "$variant" $(( (b - a) / 20000 ))
  done
done
