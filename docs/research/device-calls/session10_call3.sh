#!/usr/bin/env bash
# Tenth session, device call 3 (not run): the dense method's fit time (issue 19; its GPU path failed
# in call 1 on a CPU generator, since fixed), the pairwise benchmark on the GPU beside kornia (issue 17; kornia
# travels as wheels in .whl), robustness of the paper's frames at 20 % and photographs at 10 %
# (issue 16), and the 1k job at 50 epochs (issue 14).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python bench/dense.py --device cuda --methods dense-randconv --out $OUT/dense > $OUT/dense_log.txt 2>&1; tail -n 6 $OUT/dense_log.txt
timeout 240 python bench/pairwise.py --pairs 128 --limit kornia=24 --device cuda --out $OUT/pairwise_gpu.jsonl > $OUT/pairwise_log.txt 2>&1
tail -n 30 $OUT/pairwise_log.txt
R=$OUT/robustness.jsonl
timeout 60 python bench/robustness.py --sets frame --sigmas 0.2 --digits 3 --n 1000 --out $R > $OUT/rob_log.txt 2>&1
timeout 60 python bench/robustness.py --sets photo --sigmas 0.1 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
timeout 45 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "--option max_epochs=50" --out $OUT/sched.jsonl > $OUT/log.txt 2>&1
python - <<'PY'
import json, os
O = os.environ["OUT"]
rows = [json.loads(l) for f in ("sched.jsonl", "robustness.jsonl") if os.path.exists(f"{O}/{f}") for l in open(f"{O}/{f}")]
for r in rows:
    if r.get("part") == "e2e":
        e = r.get("eval", {})
        print("E2E", r["n_images"], r["options"], r["seconds"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("schedule"), (r.get("notes") or [])[-1:])
    else:
        sub = {k: (r[k]["pairs"], r[k].get("object_residual_ratio"), r[k].get("residual_ratio")) for k in ("visible", "cut") if k in r}
        print(r["set"], r["subject"], r["sigma"], r["method"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), "frame", r.get("frame_size_median"), "s", r.get("seconds"), sub, r.get("error"), (r.get("notes") or [])[-1:])
PY
