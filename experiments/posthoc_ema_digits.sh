#!/bin/bash
# Post-hoc EMA against separately trained standard EMAs, on the default digits run.
#   bash experiments/posthoc_ema_digits.sh [SEEDS...]     (default: 0 1; ~4 trainings of 2-4 min per seed)
# Per seed: one train.ema=power run, whose EMA lengths are rebuilt and scored after training, and standard-EMA
# runs at ema_decay 0.95 and 0.98 beside the default 0.995 (the EMA does not feed back into training, so the
# runs of one seed share their training trajectory: only the average differs). Every network is scored by
# `evaluate` with the default sampler and the same sample seed (0): FID of 1000 samples vs the 359 test digits.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/posthoc_ema}
LENGTHS=${LENGTHS:-[0.015,0.02,0.025,0.03,0.05,0.07,0.09,0.12,0.16,0.2,0.25]}
SEEDS=("$@")
(( ${#SEEDS[@]} )) || SEEDS=(0 1)
mkdir -p "$OUT"
timed() {  # label command...: the command's output in $OUT/label.log, its wall seconds on stdout
  local label=$1 t0; shift; t0=$(date +%s.%N)
  "$@" > "$OUT/$label.log" 2>&1
  echo "$label wall $(python -c "import time; print(round(time.time() - $t0))") s"
}
for seed in "${SEEDS[@]}"; do
  timed power_s$seed python -m diffusion_lab.train logger=none seed=$seed train.ema=power eval.every=0 hydra.run.dir=$OUT/power_s$seed
  timed posthoc_s$seed python -m diffusion_lab.evaluate checkpoint=$OUT/power_s$seed "ema_lengths=$LENGTHS" \
    'samplers=[{name:edm}]' hydra.run.dir=$OUT/posthoc_s$seed
  for decay in 0.95 0.98 0.995; do
    timed ema${decay}_s$seed python -m diffusion_lab.train logger=none seed=$seed train.ema_decay=$decay eval.every=0 \
      hydra.run.dir=$OUT/ema${decay}_s$seed
    timed eval_ema${decay}_s$seed python -m diffusion_lab.evaluate checkpoint=$OUT/ema${decay}_s$seed \
      'samplers=[{name:edm}]' hydra.run.dir=$OUT/eval_ema${decay}_s$seed
  done
done
python - "$OUT" "${SEEDS[@]}" <<'PY'
import csv, sys
from pathlib import Path
out, seeds = Path(sys.argv[1]), sys.argv[2:]
for seed in seeds:
    curve = [(float(r["sigma_rel"]), float(r["fid"])) for r in csv.DictReader(open(out / f"posthoc_s{seed}/ema_fid.csv"))]
    std = {d: float(next(csv.DictReader(open(out / f"eval_ema{d}_s{seed}/fid_vs_cost.csv")))["fid"])
           for d in ("0.95", "0.98", "0.995")}
    best = min(curve, key=lambda p: p[1])
    print(f"seed {seed}: post-hoc " + ", ".join(f"{s:g}: {f:.2f}" for s, f in curve) + f"  (min {best[1]:.2f} at {best[0]:g})")
    print(f"seed {seed}: standard " + ", ".join(f"{d}: {f:.2f}" for d, f in std.items()) + f"  (best {min(std.values()):.2f})")
PY
