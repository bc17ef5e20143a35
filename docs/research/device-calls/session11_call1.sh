#!/usr/bin/env bash
# Eleventh session, device call 1: issue 19's last target (a 20-image dense fit on one GPU), then
# issue 14/16's open question: does the common-zoom anchor stop the 1k job's GPU zoom and re-fit
# (with and without max_epochs=100)? Then trainer throughput at 4,096 and the eighth session's
# trainer (.devold, commit 1f2877f) on the same card, aligner inference, and the canvas at 30 %
# (does the collapse guard now catch it?).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python bench/dense.py --device cuda --methods dense-randconv --out $OUT/dense > $OUT/dense_log.txt 2>&1; tail -n 8 $OUT/dense_log.txt
for o in "--option zoom_anchor=1" "--option zoom_anchor=1 --option max_epochs=100"; do
  timeout 60 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "$o" --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
done
timeout 35 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 4096 --steps 48 --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
(cd .devold && PYTHONPATH=$PWD timeout 45 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 \
    --steps 96 --out $OUT/old.jsonl >> $OUT/log.txt 2>&1)
timeout 30 python bench/gpu_speed.py --parts inference --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
R=$OUT/robustness.jsonl
timeout 110 python bench/robustness.py --sets canvas --sigmas 0.3 --digits 3 --n 1000 --out $R > $OUT/rob_log.txt 2>&1
python - <<'PY'
import json, os
O = os.environ["OUT"]
rows = [json.loads(l) for f in ("speed.jsonl", "old.jsonl", "robustness.jsonl") if os.path.exists(f"{O}/{f}") for l in open(f"{O}/{f}")]
for r in rows:
    if r.get("part") == "e2e":
        e = r.get("eval", {})
        print("E2E", r["n_images"], r.get("options"), r["seconds"], r.get("job_seconds"), "rc", r["rc"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("schedule"), r.get("stage_seconds"), (r.get("notes") or [])[-2:], r.get("log_tail", "")[-300:])
    elif r.get("part") in ("throughput", "old"):
        print(r["part"], r.get("batch"), r.get("ms_per_step"), r.get("images_per_s"), r.get("achieved_tflops"), r.get("graph"), r.get("error", "")[-300:])
    elif r.get("part") == "inference":
        print("I", r.get("chunk"), r.get("dtype"), r.get("seconds"), r.get("images_per_s"))
    elif "set" in r:
        sub = {k: (r[k]["pairs"], r[k].get("object_residual_ratio"), r[k].get("residual_ratio")) for k in ("visible", "cut") if k in r}
        print(r["set"], r["subject"], r["sigma"], r["method"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), "frame", r.get("frame_size_median"), "s", r.get("seconds"), sub, r.get("error"), (r.get("notes") or [])[-2:])
PY
tail -n 5 $OUT/rob_log.txt
