#!/usr/bin/env bash
# Tenth session, device call 2: robustness with the defaults (issue 16), 1,000 images a collection,
# the hardest settings first: digit 3 on the padded canvas at sigma 30 %, the paper's 28 px frames at
# 30 % (visible and cut pairs apart), photographs at 64 px at 20 %; then canvas 10/20 %, frames 20 %,
# photographs 10 %. Then the semantic model's training time on the GPU (issue 18: 400 digits, defaults).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/robustness.jsonl
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 100 python bench/robustness.py --sets canvas --sigmas 0.3 --digits 3 --n 1000 --out $R > $OUT/rob_log.txt 2>&1
timeout 70 python bench/robustness.py --sets frame --sigmas 0.3 --digits 3 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
timeout 100 python bench/robustness.py --sets photo --sigmas 0.2 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
timeout 150 python bench/robustness.py --sets canvas --sigmas 0.1,0.2 --digits 3 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
timeout 60 python bench/robustness.py --sets frame --sigmas 0.2 --digits 3 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
timeout 50 python bench/robustness.py --sets photo --sigmas 0.1 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
timeout 80 python bench/semantic.py --digit 3 --train 400 --test 100 --device cuda --cross 0 --out $OUT/semantic_gpu.json > $OUT/semantic_log.txt 2>&1
tail -n 3 $OUT/semantic_log.txt; grep -o '"train_seconds": [0-9.]*' $OUT/semantic_gpu.json
python - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/robustness.jsonl"):
    r = json.loads(l)
    sub = {k: (r[k]["pairs"], r[k].get("object_residual_ratio"), r[k].get("residual_ratio")) for k in ("visible", "cut") if k in r}
    print(r["set"], r["subject"], r["sigma"], r["method"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), "frame", r.get("frame_size_median"), "apsnr", r.get("apsnr_after"), "undone", r.get("apsnr_undone"), "s", r.get("seconds"), sub, r.get("error"), (r.get("notes") or [])[-1:])
PY
