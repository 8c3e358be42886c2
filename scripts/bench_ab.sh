#!/usr/bin/env bash
# Before/after speed of a change, side by side: `ostinato bench` from a git revision (a
# worktree in /tmp) and from this checkout, alternating round by round so that the machine's
# hour-to-hour drift hits both alike. Usage: scripts/bench_ab.sh REV [MODEL ...]
# Output: bench-out/ab/<model>-<old|new>-<round>.json (latency: decode + TTFT 512; serving: 16
# streams); the medians are summarised at the end.
set -euo pipefail
rev=${1:?usage: scripts/bench_ab.sh REV [MODEL ...]}; shift
models=${*:-smollm2-135m-instruct gemma3-270m}
here=$(cd "$(dirname "$0")/.." && pwd)
old=/tmp/ostinato-ab-$(git -C "$here" rev-parse --short "$rev")
[ -d "$old" ] || git -C "$here" worktree add -f "$old" "$rev" >/dev/null
out="$here/bench-out/ab"; mkdir -p "$out"
py="$here/.venv/bin/python"
run() {   # run SIDE MODEL ROUND
  local tree=$here; [ "$1" = old ] && tree=$old
  (cd "$tree" && PYTHONPATH="$tree" "$py" -m ostinato bench -m "$2" --prompt-tokens 512 \
     --decode-tokens 128 --repeats 2 --batch 0 --serving --concurrency 16 \
     --json "$out/$2-$1-$3.json" >/dev/null 2>&1)
}
for model in $models; do
  for round in 1 2; do
    run old "$model" "$round"; run new "$model" "$round"
  done
done
"$py" - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
rows = {}
for f in sorted(Path(sys.argv[1]).glob("*.json")):
    model, side, _ = f.stem.rsplit("-", 2)
    rows.setdefault((model, side), []).append(json.loads(f.read_text()))
print(json.dumps({f"{m} {s}": [r.get("summary", r) for r in runs] for (m, s), runs in rows.items()}, indent=1)[:6000])
PY
