#!/usr/bin/env bash
# Wall-clock figures of issue 15's "Done when", with hyperfine, on fresh clones of the committed HEAD
# (the environment install is excluded: each clone links this checkout's .venv). Run it on an idle
# machine; the load average before and after each measurement goes into the table.
#
#   bash benchmarks/wall_clock.sh            # RUNS=3 by default -> benchmarks/results/wall_clock.md
#
# 1. `make run` of the default params.yaml on a fresh clone (every stage computed);
# 2. a no-op `make run` (nothing stale);
# 3. a `gates.lam` change (gates -> repair -> evaluate rerun), a new value each run;
# 4. 5 user checkpoints of the narrow MLP (128-128-128-64, plain state dicts) merged by `make run`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
RUNS="${RUNS:-3}"
FULL_RUNS="${FULL_RUNS:-$RUNS}"
KEEP="${KEEP:-}"  # a folder: the last fresh-clone run's outputs are copied there (the committed default run)
OUT="${OUT:-$REPO/benchmarks/results/wall_clock.md}"
WORK="$(mktemp -d /tmp/cyclemerge-wall.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
command -v hyperfine >/dev/null || { echo "error: hyperfine is not installed (apt-get install hyperfine)" >&2; exit 2; }
[ -x "$REPO/.venv/bin/python" ] || { echo "error: no $REPO/.venv: run make venv first" >&2; exit 2; }
PY="$REPO/.venv/bin/python"

fresh() {  # fresh <dir>: a clone of HEAD using this checkout's environment
  rm -rf "$1" && git clone -q "$REPO" "$1" && ln -s "$REPO/.venv" "$1/.venv"
}
export -f fresh
export REPO

# Five narrow-MLP checkpoints as a user would bring them: plain state dicts, trained here once.
mkdir -p "$WORK/ckpt"
"$PY" - "$WORK/ckpt" <<'EOF'
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
from cyclemerge.config import load_config
from cyclemerge.data import load_data
from cyclemerge.train import train_model

out = Path(sys.argv[1])
cfg = load_config("params.yaml", overrides=["model.hidden=[128,128,128,64]", "train.epochs=2"])
data = load_data(cfg.data)
for seed in range(1, 6):
    torch.save(train_model(cfg.model, cfg.train, data, seed=seed).state_dict, out / f"user_{seed}.pt")
EOF
cat > "$WORK/user_params.py" <<'EOF'
import sys
import yaml
path, ckpt = sys.argv[1], sys.argv[2]
p = yaml.safe_load(open(path))
p["model"]["hidden"] = [128, 128, 128, 64]
p["train"]["checkpoints"] = [f"{ckpt}/user_{s}.pt" for s in range(1, 6)]
yaml.safe_dump(p, open(path, "w"), sort_keys=False)
EOF

load() { cut -d' ' -f1-3 /proc/loadavg; }
declare -A BEFORE AFTER
measure() {  # measure <name> <hyperfine args...>
  local name="$1"; shift
  BEFORE[$name]="$(load)"
  hyperfine --shell bash --style basic --export-json "$WORK/$name.json" "$@"
  AFTER[$name]="$(load)"
}

measure full --runs "$FULL_RUNS" --prepare "fresh $WORK/full" "cd $WORK/full && make run"
cp "$WORK/full/metrics/timings.json" "$WORK/full_timings.json"
if [ -n "$KEEP" ]; then
  mkdir -p "$KEEP" && (cd "$WORK/full" && cp -r dvc.lock metrics plots reports "$KEEP"/)
fi
measure noop --warmup 1 --runs 10 "cd $WORK/full && make run"
measure lam --runs "$RUNS" \
  --prepare "cd $WORK/full && sed -i \"s/^  lam: .*/  lam: 0.0\$(date +%N | cut -c1-4)1/\" params.yaml" \
  "cd $WORK/full && make run"
measure user --runs "$RUNS" \
  --prepare "fresh $WORK/user && $PY $WORK/user_params.py $WORK/user/params.yaml $WORK/ckpt" \
  "cd $WORK/user && make run"

"$PY" - "$WORK" "$OUT" "$(git -C "$REPO" rev-parse --short HEAD)" \
  "${BEFORE[full]}" "${AFTER[full]}" "${BEFORE[noop]}" "${AFTER[noop]}" \
  "${BEFORE[lam]}" "${AFTER[lam]}" "${BEFORE[user]}" "${AFTER[user]}" <<'EOF'
import datetime as dt
import json
import sys
from pathlib import Path

work, out, commit = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
loads = sys.argv[4:]
cases = [("full", "fresh clone, default params.yaml: `make run` (every stage)", 360),
         ("noop", "nothing stale: `make run`", 5),
         ("lam", "`gates.lam` changed: `make run` (gates, repair, evaluate)", 45),
         ("user", "5 user checkpoints, narrow MLP: `make run` on a fresh clone", 30)]
lines = [f"## Wall clock (`benchmarks/wall_clock.sh`, hyperfine, commit {commit}, "
         f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC)", "",
         "| what | runs | min s | median s | max s | target s | load average before -> after |",
         "|---|--:|--:|--:|--:|--:|---|"]
for i, (name, what, target) in enumerate(cases):
    times = sorted(json.loads((work / f"{name}.json").read_text())["results"][0]["times"])
    median = times[len(times) // 2] if len(times) % 2 else sum(times[len(times) // 2 - 1:len(times) // 2 + 1]) / 2
    lines.append(f"| {what} | {len(times)} | {times[0]:.2f} | {median:.2f} | {times[-1]:.2f} | {target} | "
                 f"{loads[2 * i]} -> {loads[2 * i + 1]} |")
timings = json.loads((work / "full_timings.json").read_text())
lines += ["", "Stage seconds of the last fresh-clone run (metrics/timings.json): "
          + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), ""]
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
