#!/usr/bin/env bash
# Ninth session, device call 2: end-to-end jobs as a user runs them (congeal align on .npy shards of
# infiMNIST-style digit-3 collections, sigma 10 %), scored against ground truth: 1k and 6k with the
# defaults, 1k at 600 steps, 1M with apply; the reference rule's size at 1k/6k/1M.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/e2e.jsonl
python bench/e2e_jobs.py --sizes 1000,6000 --device cuda --work /tmp/e2e --out $R 2>&1 | grep -v '^{' | tail -2
python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --out $R --options "--option steps=600" 2>&1 | grep -v '^{' | tail -1
python bench/e2e_jobs.py --sizes 1000000 --device cuda --apply --work /tmp/e2e --out $R 2>&1 | grep -v '^{' | tail -2
python bench/reference_size.py --sizes 1000,6000,1000000 --work /tmp/e2e --device cuda --out $OUT/refsize.jsonl 2>&1 | tail -3
python - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/e2e.jsonl"):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], r["options"], r["seconds"], r.get("job_seconds"), "rc", r["rc"], "rss", r["peak_rss_mib"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), (r.get("schedule") or {}).get("steps"), r.get("apply"), r.get("stage_seconds"), (r.get("notes") or [])[-1:], r.get("log_tail", "")[-600:])
PY
