#!/usr/bin/env bash
# Ninth session, device call 1 (the session's device time mostly spent on failed starts, so the
# essentials only): trainer throughput after the kernel-count reduction; end-to-end jobs as a user
# runs them (congeal align on .npy shards of infiMNIST-style digit-3 collections, sigma 10 %) at
# 1k, 6k and 1M, scored against ground truth; the trainer before (.devold: the eighth session's
# code) on the same card; the aligner's forward pass.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/speed.jsonl
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
timeout 50 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 --steps 128 --out $R 2>&1 | grep -v '^{' | tail -1
timeout 90 python bench/e2e_jobs.py --sizes 1000,6000 --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl 2>&1 | grep -v '^{' | tail -1
timeout 200 python bench/e2e_jobs.py --sizes 1000000 --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl 2>&1 | grep -v '^{' | tail -1
(cd .devold && PYTHONPATH=$PWD timeout 50 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 \
    --steps 128 --out $OUT/old.jsonl 2>&1 | grep -v '^{' | tail -1)
timeout 40 python bench/gpu_speed.py --parts inference --inference-n 500000 --out $R > $OUT/inference.txt 2>&1
python - <<'PY'
import json, os
O = os.environ["OUT"]
for f in ("old.jsonl", "speed.jsonl", "e2e.jsonl"):
    if not os.path.exists(os.path.join(O, f)): continue
    for l in open(os.path.join(O, f)):
        r = json.loads(l); p = r.get("part"); e = r.get("eval", {})
        if "error" in r: print("ERR", f, r)
        elif p == "throughput": print(f, "T", r["batch"], r["ms_per_step"], r["images_per_s"], r["achieved_tflops"], "graph", r["graph"], "first_block_s", r["first_block_s"])
        elif p == "inference": print("I", r["chunk"], r["dtype"], r["images_per_s"])
        elif p == "e2e": print("E2E", r["n_images"], r["seconds"], r.get("job_seconds"), "rc", r["rc"], "rss", r["peak_rss_mib"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), (r.get("schedule") or {}).get("steps"), r.get("stage_seconds"), (r.get("notes") or [])[-1:], (r.get("warnings") or [])[:1], r.get("log_tail", "")[-600:])
PY
