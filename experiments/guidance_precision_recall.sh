#!/usr/bin/env bash
# Precision and recall against the guidance scale w on digits: one class-conditional default run (seed 0), scored by
# `evaluate` at seven w with three draws of sample noise; prints the table of docs/comparisons.md#guidance-on-digits.
#   bash experiments/guidance_precision_recall.sh [OUT]     (~4 min training + ~6 min scoring on a 2-core CPU)
set -euo pipefail
out=${1:-outputs/guidance_precision_recall}
python -m diffusion_lab.train model.num_classes=auto logger=none seed=0 hydra.run.dir="$out/run"
for s in 0 1 2; do
  python -m diffusion_lab.evaluate checkpoint="$out/run" 'guidance_scales=[0,0.5,1,1.5,2,3,4]' 'samplers=[{name:edm}]' \
    seed=$s hydra.run.dir="$out/eval_seed$s"
done
python - "$out" <<'PY'
import json, statistics, sys
from pathlib import Path
runs = [json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("eval_seed*/fid_vs_cost.json"))]
print(f"{len(runs)} sample seeds; floors: FID {runs[0]['floor']:.2f}, precision {runs[0]['precision_floor']:.3f}, "
      f"recall {runs[0]['recall_floor']:.3f}")
print("| w | FID | precision | recall | accuracy |\n|---|---|---|---|---|")
for i, row in enumerate(runs[0]["rows"]):
    cell = lambda k: (lambda v: f"{statistics.mean(v):.3g} +- {statistics.stdev(v):.2g}")([r["rows"][i][k] for r in runs])
    print(f"| {row['guidance_scale']:g} | {cell('fid')} | {cell('precision')} | {cell('recall')} | {cell('accuracy')} |")
PY
