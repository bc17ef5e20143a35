#!/usr/bin/env bash
# Fifteenth session (issues 16 and 17). Carry .devdata and .whl (kornia 0.9.0 + kornia_rs 0.2.0 wheels:
# `pip download --no-deps --only-binary=:all: --python-version 3.12 ... kornia==0.9.0 kornia_rs==0.2.0`).
# (1) The pair methods on a GPU, the CPU table's 32 pairs a set (seed 0), kornia on the first 16:
#     issue 17's "faster per pair than kornia's ImageRegistrator on the same device".
# (2) The robustness protocol with the current defaults on a GPU: the padded canvas and the paper's
#     frames at sigma 10 / 20 / 30 % (digit 3, 1,000 images), then the photographs at 10 % if time is left.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
timeout 200 python bench/pairwise.py --pairs 32 --limit kornia=16 --methods search,learned,ecc,kornia --device cuda \
  --out $OUT/pairwise_gpu.jsonl > $OUT/pairwise_log.txt 2>&1; el pairwise
python bench/pairwise.py --report $OUT/pairwise_gpu.jsonl
timeout 270 python bench/robustness.py --sets canvas,frame --sigmas 0.1,0.2,0.3 --digits 3 --n 1000 --device cuda \
  --out $OUT/robustness.jsonl > $OUT/robustness_log.txt 2>&1; el digits
LEFT=$(( 560 - ($(date +%s) - T0) ))
[ $LEFT -gt 60 ] && timeout $LEFT python bench/robustness.py --sets photo --sigmas 0.1 --n 200 --device cuda \
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
