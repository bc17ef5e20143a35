#!/usr/bin/env bash
# Ninth session, device call 2: robustness (issue 16) with the defaults: digit 3 on the padded
# canvas at sigma 10/20/30 %, the paper's 28 px frames at 20/30 % (visible and cut pairs apart),
# photographs at 64 px at 10/20 %, 1,000 images each; the rotation search (init='search') on the
# canvas and frames at 30 %; RASL beside DPRC on the canvas at 30 %.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/robustness.jsonl
timeout 200 python bench/robustness.py --sets canvas --sigmas 0.1,0.2,0.3 --digits 3 --n 1000 --out $R > $OUT/rob_log.txt 2>&1
timeout 120 python bench/robustness.py --sets frame --sigmas 0.2,0.3 --digits 3 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
timeout 200 python bench/robustness.py --sets photo --sigmas 0.1,0.2 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
timeout 90 python bench/robustness.py --sets canvas,frame --sigmas 0.3 --digits 3 --n 1000 --dprc-options '{"init": "search"}' --out $R >> $OUT/rob_log.txt 2>&1
timeout 60 python bench/robustness.py --sets canvas --sigmas 0.3 --digits 3 --n 1000 --methods rasl --out $R >> $OUT/rob_log.txt 2>&1
python - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/robustness.jsonl"):
    r = json.loads(l)
    sub = {k: (r[k]["pairs"], r[k].get("object_residual_ratio"), r[k].get("residual_ratio")) for k in ("visible", "cut") if k in r}
    print(r["set"], r["subject"], r["sigma"], r["method"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), "frame", r.get("frame_size_median"), "apsnr", r.get("apsnr_after"), "undone", r.get("apsnr_undone"), "s", r.get("seconds"), sub, r.get("error"), (r.get("notes") or [])[-1:])
PY
