#!/usr/bin/env bash
# Tenth session, device call 1 (the first that got a machine: starts failed for ~15 min): what each
# open issue most needs from a GPU, within one call.
# Issue 14: trainer throughput (captured graph) at 256 and 1,024; end-to-end jobs as a user runs them
#   (python -m congeal align on .npy shards of infiMNIST-style digit-3 collections, sigma 10 %) at 1k and
#   6k, scored against ground truth; and the 1k job with small collections capped at 100 epochs
#   instead of 300 (is the fixed 1,172-step schedule needed?), and with the common-zoom anchor
#   (zoom_anchor=1: does it stop the first fit's zoom-in that makes the 1k job re-fit?).
# Issue 16: robustness with the defaults on the hardest settings, 1,000 images each: digit 3 on the
#   padded canvas at sigma 30 %, and the paper's 28 px frames at 30 % (visible and cut pairs apart).
# Issue 18: the semantic model's training time (400 digits, defaults). Issue 19: the dense method's fit
#   time (bench/dense.py's three objects, 20 images of 64 px, the weight-free default features).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
timeout 45 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 --steps 96 --out $OUT/speed.jsonl > $OUT/log.txt 2>&1
timeout 110 python bench/e2e_jobs.py --sizes 1000,6000 --device cuda --work /tmp/e2e --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
timeout 45 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "--option max_epochs=100" --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
timeout 45 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "--option zoom_anchor=1" --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
R=$OUT/robustness.jsonl
timeout 100 python bench/robustness.py --sets canvas --sigmas 0.3 --digits 3 --n 1000 --out $R > $OUT/rob_log.txt 2>&1
timeout 70 python bench/robustness.py --sets frame --sigmas 0.3 --digits 3 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
timeout 70 python bench/semantic.py --digit 3 --train 400 --test 100 --device cuda --cross 0 --out $OUT/semantic_gpu.json > $OUT/semantic_log.txt 2>&1
timeout 80 python bench/dense.py --device cuda --methods dense-randconv --out $OUT/dense > $OUT/dense_log.txt 2>&1
grep '^#' $OUT/log.txt | tail -8; tail -n 4 $OUT/semantic_log.txt; grep -o '"train_seconds": [0-9.]*' $OUT/semantic_gpu.json; tail -n 5 $OUT/dense_log.txt
python - <<'PY'
import json, os
O = os.environ["OUT"]
for l in open(O + "/speed.jsonl"):
    r = json.loads(l)
    if r["part"] == "e2e":
        e = r.get("eval", {})
        print("E2E", r["n_images"], r.get("options"), r["seconds"], r.get("job_seconds"), "rc", r["rc"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("schedule"), r.get("stage_seconds"), (r.get("notes") or [])[-1:], (r.get("warnings") or [])[:2], r.get("log_tail", "")[-500:])
    elif r["part"] == "throughput":
        print("T", r.get("batch"), r.get("ms_per_step"), r.get("images_per_s"), r.get("achieved_tflops"), r.get("graph"), "" if r.get("graph") else r.get("notes", [])[:1], r.get("error", "")[-300:])
if os.path.exists(O + "/robustness.jsonl"):
    for l in open(O + "/robustness.jsonl"):
        r = json.loads(l)
        sub = {k: (r[k]["pairs"], r[k].get("object_residual_ratio"), r[k].get("residual_ratio")) for k in ("visible", "cut") if k in r}
        print(r["set"], r["subject"], r["sigma"], r["method"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), "frame", r.get("frame_size_median"), "apsnr", r.get("apsnr_after"), "undone", r.get("apsnr_undone"), "s", r.get("seconds"), sub, r.get("error"), (r.get("notes") or [])[-1:])
PY
