#!/bin/bash
# The default digits run before and after the 2026-12 change, alternated seed by seed in one sitting.
#   bash experiments/default_run_ab.sh [SEEDS...]      (default: 0 1 2 3; ~4-5 min per seed on a 2-core CPU)
# "before" is the old default spelled out in overrides, "after" is today's default (no overrides).
# Prints one line per run: wall seconds (the whole process) and the final FID against digits test;
# the run dirs stay in outputs/default_ab/. Only the per-seed ratios of wall time mean anything.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs/default_ab
BEFORE="sampler=dpm_solver_3m sampler.steps=20 eval.every=375"  # the 2026-11 default: DPM-Solver++(3M)-20, FID at 375 and 750
mkdir -p "$OUT"
run() {  # name seed overrides...
  local name=$1 seed=$2; shift 2
  local dir="$OUT/${name}_s$seed" t0 t1
  t0=$(date +%s.%N)
  python -m diffusion_lab.train logger=none seed="$seed" "$@" hydra.run.dir="$dir" > "$dir.log" 2>&1
  t1=$(date +%s.%N)
  python - "$name" "$seed" "$t0" "$t1" "$dir/summary.json" <<'PY'
import json, sys
name, seed, t0, t1, path = sys.argv[1:]
s = json.load(open(path))
print(f"{name:6s} seed {seed}  wall {float(t1) - float(t0):6.0f} s  FID {s['final_fid']:.2f} (floor {s['fid_floor']:.2f})")
PY
}
SEEDS=("$@")
(( ${#SEEDS[@]} )) || SEEDS=(0 1 2 3)
for seed in "${SEEDS[@]}"; do  # the order flips every seed, so drifting load hits both alike
  if (( seed % 2 )); then run after "$seed"; run before "$seed" $BEFORE
  else run before "$seed" $BEFORE; run after "$seed"; fi
done
