#!/usr/bin/env bash
# Eighth session, device call 3 (one H200, the last ~5 minutes of the session's device time): the
# 1M job's first fit without the re-fit (reframe=0), at the 6k job's batch and learning rate
# (256, 1e-3) and at batch 1,024 with the unscaled learning rate 1e-3 (lr=5e-4 before the
# square-root rule): does the 1M quality gap come from the batch rule?
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/speed.jsonl
python bench/e2e_jobs.py --sizes 1000000 --device cuda --work /tmp/e2e --out $R \
    --options "--option reframe=0 --option batch_size=256 --aligned none" 2>&1 | grep -v '^{' | tail -2
python bench/e2e_jobs.py --sizes 1000000 --device cuda --work /tmp/e2e --out $R \
    --options "--option reframe=0 --option lr=0.0005 --aligned none" 2>&1 | grep -v '^{' | tail -2
python - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/speed.jsonl"):
    r = json.loads(l); e = r.get("eval", {})
    print("E2E", r["n_images"], r["options"], r["seconds"], r.get("job_seconds"), "rc", r["rc"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), r.get("schedule"), r.get("log_tail", "")[-500:])
PY
