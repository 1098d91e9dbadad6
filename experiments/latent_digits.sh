#!/bin/bash
# Latent vs pixel diffusion on digits at 32x32 at equal training time (docs/latent.md): one autoencoder
# (python -m diffusion_lab.autoencoder, the defaults), the side-by-side throughput benchmark, then per seed three
# diffusion runs of the same U-Net config and recipe: pixels (1x32x32), the autoencoder's latents and PCA's (4x8x8),
# one training at a time. Pixel runs PIXEL_STEPS steps; each latent run as many more as the benchmark's training
# images/s ratio allows in the same time (or LATENT_STEPS). Then `evaluate` (dpm_solver_3m, 20 steps, n=1000) with
# the run's seed, `compare` and the table.
#   bash experiments/latent_digits.sh [SEEDS...]     (default: 0 1 2; ~15 min per seed on a quiet 2-core CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/latent}
PIXEL_STEPS=${PIXEL_STEPS:-120}
SAMPLERS='[{name:dpm_solver_3m,steps:20}]'
mkdir -p "$OUT"
SEEDS=("$@")
(( ${#SEEDS[@]} )) || SEEDS=(0 1 2)
[[ -f "$OUT/ae/summary.json" ]] ||
  python -m diffusion_lab.autoencoder data.image_size=32 logger=none hydra.run.dir="$OUT/ae" > "$OUT/ae.log" 2>&1
[[ -f "$OUT/bench.json" ]] || PYTHONPATH=. python experiments/bench_latent.py --json "$OUT/bench.json" | tee "$OUT/bench.txt"
LATENT_STEPS=${LATENT_STEPS:-$(python -c "import json; print(round($PIXEL_STEPS * json.load(open('$OUT/bench.json'))['train_ratio']))")}
echo "pixel runs: $PIXEL_STEPS steps; latent runs: $LATENT_STEPS steps"
train() {  # train NAME ARGS...: skipped when finished in an earlier call
  local name=$1; shift
  [[ -f "$OUT/$name/summary.json" ]] ||
    python -m diffusion_lab.train data.image_size=32 "$@" logger=none eval.every=0 train.sample_every=0 \
      latent_space.cache_dir="$OUT/latent_cache" hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
}
score() {  # score NAME SEED
  [[ -f "$OUT/eval_$1/fid_vs_cost.csv" ]] ||
    python -m diffusion_lab.evaluate checkpoint="$OUT/$1" seed="$2" "samplers=$SAMPLERS" teacher_nfe='[]' \
      hydra.run.dir="$OUT/eval_$1" > "$OUT/eval_$1.log" 2>&1
}
for seed in "${SEEDS[@]}"; do
  train "pixel_s$seed" seed="$seed" train.steps="$PIXEL_STEPS"
  train "ae_s$seed" seed="$seed" train.steps="$LATENT_STEPS" latent="$OUT/ae"
  train "pca_s$seed" seed="$seed" train.steps="$LATENT_STEPS" latent=pca
  for arm in pixel ae pca; do score "${arm}_s$seed" "$seed"; done
done
python -m diffusion_lab.compare "$OUT" > "$OUT/compare.txt" 2>&1 || true
python experiments/latent_table.py "$OUT" | tee "$OUT/table.md"
