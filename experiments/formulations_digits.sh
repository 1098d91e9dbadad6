#!/bin/bash
# Formulations on one network (docs/comparisons.md): the default run (cosine, eps), experiment=edm_digits and
# experiment=rectified_flow_digits at the default budget, one training at a time, then `evaluate` at 5/10/20 NFE.
#   bash experiments/formulations_digits.sh [SEEDS...]      (default: 0 1 2; ~5-9 min per training on a busy 2-core CPU)
# Run dirs go to outputs/formulations/<formulation>_s<seed>, evaluations to eval_<formulation>_s<seed>; then
# `compare` prints FID against NFE over seeds with Welch's t-tests and draws compare_fid_vs_nfe.png there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=outputs/formulations
D3='{name:dpm_solver_3m,steps:5},{name:dpm_solver_3m,steps:10},{name:dpm_solver_3m,steps:20}'
declare -A SAMPLERS=(
  [default]="[$D3]"
  [edm_digits]="[{name:edm,steps:3},{name:edm,steps:5},{name:edm,steps:10},$D3]"  # Heun: 2 steps - 1 NFE
  [rectified_flow_digits]="[{name:euler,steps:5,grid:linspace},{name:euler,steps:10,grid:linspace},{name:euler,steps:20,grid:linspace},$D3]"
)
mkdir -p "$OUT"
SEEDS=("$@")
(( ${#SEEDS[@]} )) || SEEDS=(0 1 2)
for seed in "${SEEDS[@]}"; do
  for f in default rectified_flow_digits edm_digits; do
    exp=(); [[ $f == default ]] || exp=("experiment=$f")
    [[ -f "$OUT/${f}_s$seed/summary.json" ]] ||  # trained in an earlier call: a rerun resumes
      python -m diffusion_lab.train "${exp[@]}" seed="$seed" logger=none eval.every=0 hydra.run.dir="$OUT/${f}_s$seed" > "$OUT/${f}_s$seed.log" 2>&1
    # the samples are drawn with the training seed too: one network's FID moves by about +-4 with the sample noise alone
    [[ -f "$OUT/eval_${f}_s$seed/fid_vs_cost.csv" ]] ||
      python -m diffusion_lab.evaluate checkpoint="$OUT/${f}_s$seed" seed="$seed" "samplers=${SAMPLERS[$f]}" hydra.run.dir="$OUT/eval_${f}_s$seed" > "$OUT/eval_${f}_s$seed.log" 2>&1
  done
done
python -m diffusion_lab.compare "$OUT"
