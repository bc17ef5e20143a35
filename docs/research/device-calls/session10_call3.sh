#!/usr/bin/env bash
# Tenth session, device call 3: does a 1,000-image job need 300 epochs on the GPU? (issue 14: a
# 1k job <= 15 s; the default caps a small collection at 300 epochs = 1,172 steps of 256) - the same
# e2e job at max_epochs 100 and 50, scored against ground truth. Then the dense method's fit time on
# the GPU (issue 19, bench/dense.py's three objects, 20 images of 64 px) and the pairwise benchmark
# on the GPU beside kornia (issue 17; kornia travels as wheels in .whl).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
R=$OUT/sched.jsonl
nvidia-smi --query-gpu=name --format=csv,noheader
for e in 100 50; do
  timeout 60 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "--option max_epochs=$e" --out $R >> $OUT/log.txt 2>&1
done
timeout 150 python bench/dense.py --device cuda --methods dense-randconv,dense-hog --out $OUT/dense > $OUT/dense_log.txt 2>&1
tail -n 8 $OUT/dense_log.txt
timeout 200 python bench/pairwise.py --pairs 128 --limit kornia=24 --device cuda --out $OUT/pairwise_gpu.jsonl > $OUT/pairwise_log.txt 2>&1
tail -n 30 $OUT/pairwise_log.txt
python - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/sched.jsonl"):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], r["options"], r["seconds"], r.get("job_seconds"), "rc", r["rc"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("schedule"), r.get("stage_seconds"), (r.get("notes") or [])[-1:])
PY
