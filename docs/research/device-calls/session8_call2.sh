#!/usr/bin/env bash
# Eighth session, device call 2 (one H200): trainer throughput with the captured CUDA graph by
# batch, inference throughput, and end-to-end jobs as a user runs them (python -m congeal align
# on .npy shards of an infiMNIST-style collection, digit 3, sigma 10 %) at 1k, 6k and 1M images,
# scored against ground truth, plus congeal apply of the 1M model on its 1M images.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/speed.jsonl
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024,4096 --steps 192 --out $R 2>&1 | grep -v '^{' | tail -4
python bench/e2e_jobs.py --sizes 1000,6000 --device cuda --work /tmp/e2e --out $R 2>&1 | grep -v '^{' | tail -4
python bench/e2e_jobs.py --sizes 1000000 --device cuda --apply --work /tmp/e2e --out $R 2>&1 | grep -v '^{' | tail -4
python bench/gpu_speed.py --parts inference --out $R 2>&1 | grep -v '^{' | tail -2
tail -n 60 /tmp/e2e/align1000000.log > $OUT/align1m_log_tail.txt 2>/dev/null
python - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/speed.jsonl"):
    r = json.loads(l)
    if r["part"] == "e2e":
        e = r.get("eval", {})
        print("E2E", r["n_images"], r["seconds"], r.get("job_seconds"), "rc", r["rc"], "rss", r["peak_rss_mib"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("schedule"), r.get("apply"), (r.get("notes") or [])[-1:], r.get("log_tail", "")[-800:])
    elif r["part"] == "throughput":
        print("T", r["batch"], r["ms_per_step"], r["images_per_s"], r["achieved_tflops"], r["graph"], r["notes"][:1] if not r["graph"] else "")
    elif r["part"] == "inference":
        print("I", r)
PY
