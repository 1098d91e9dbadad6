#!/bin/bash
# From diffusion to consistency on digits (docs/consistency.md): per seed, the default run as teacher, its
# distillation (experiment=consistency_digits) and consistency training from scratch at the teacher's plus the
# distillation's training time (experiment=ct_digits), one training at a time; then `evaluate` at 1/2/4 NFE for the
# consistency models and 10/20 NFE for the teacher, each with the run's own seed, and `compare` over all of them.
#   bash experiments/consistency_digits.sh [SEEDS...]      (default: 0 1 2; ~8 min per seed on a quiet 2-core CPU)
# Extra train overrides for both consistency runs: CD_ARGS="..." CT_ARGS="..." (e.g. CD_ARGS="objective.levels=33").
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/consistency}
CM='[{name:consistency,steps:1},{name:consistency,steps:2},{name:consistency,steps:4}]'
TEACHER='[{name:dpm_solver_3m,steps:10},{name:dpm_solver_3m,steps:20}]'
mkdir -p "$OUT"
SEEDS=("$@")
(( ${#SEEDS[@]} )) || SEEDS=(0 1 2)
train() {  # train NAME ARGS...: skipped when finished in an earlier call
  local name=$1; shift
  [[ -f "$OUT/$name/summary.json" ]] ||
    python -m diffusion_lab.train "$@" logger=none eval.every=0 hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
}
score() {  # score NAME SEED SAMPLERS [ARGS...]
  local name=$1 seed=$2 samplers=$3; shift 3
  [[ -f "$OUT/eval_$name/fid_vs_cost.csv" ]] ||
    python -m diffusion_lab.evaluate checkpoint="$OUT/$name" seed="$seed" "samplers=$samplers" "$@" \
      hydra.run.dir="$OUT/eval_$name" > "$OUT/eval_$name.log" 2>&1
}
for seed in "${SEEDS[@]}"; do
  train "teacher_s$seed" seed="$seed"
  # shellcheck disable=SC2086
  train "cd_s$seed" experiment=consistency_digits train.teacher="$OUT/teacher_s$seed" seed="$seed" ${CD_ARGS:-}
  # shellcheck disable=SC2086
  train "ct_s$seed" experiment=ct_digits seed="$seed" ${CT_ARGS:-}
  score "teacher_s$seed" "$seed" "$TEACHER"
  score "cd_s$seed" "$seed" "$CM" 'teacher_nfe=[10,20]'
  score "ct_s$seed" "$seed" "$CM"
done
python -m diffusion_lab.compare "$OUT"
python experiments/consistency_table.py "$OUT"
