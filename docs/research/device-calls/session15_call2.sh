#!/usr/bin/env bash
# Written in the fourteenth session for the next one (issue 16); not yet run. Carry .devdata.
# The robustness protocol with the current defaults on a GPU: the padded canvas and the paper's
# frames at sigma 10 / 20 / 30 % (digit 3, 1,000 images; the canvas's 56 px images take the LFW
# networks), and the three photographs at sigma 10 / 20 % (200 images, 64 px). Rows record the
# fit's warnings and the product's own self-consistency ratio beside the ground truth's.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
timeout 300 python bench/robustness.py --sets canvas,frame --sigmas 0.1,0.2,0.3 --digits 3 --n 1000 --device cuda \
  --out $OUT/robustness.jsonl > $OUT/robustness_log.txt 2>&1; el digits
LEFT=$(( 570 - ($(date +%s) - T0) ))
timeout $LEFT python bench/robustness.py --sets photo --sigmas 0.1,0.2 --n 200 --device cuda \
  --out $OUT/robustness.jsonl >> $OUT/robustness_log.txt 2>&1; el photos
python - <<PY
import json
for l in open("$OUT/robustness.jsonl"):
    r = json.loads(l)
    print(r["set"], r["subject"], r["sigma"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"),
          "kept", r.get("content_kept"), "frame", r.get("frame_size_median"), "consistency", r.get("consistency_ratio"),
          "visible", (r.get("visible") or {}).get("object_residual_ratio"), "s", r.get("wall_seconds"),
          (r.get("warnings") or [""])[0][:120], (r.get("notes") or [""])[-1][:160])
PY
