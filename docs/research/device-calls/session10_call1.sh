#!/usr/bin/env bash
# Tenth session, device call 1 (the first card of the session): issue 14's figures on the current
# trainer. Trainer throughput (captured graph) by batch, the same for the eighth session's trainer
# (.devold, commit 1f2877f) on the same card for the before/after, end-to-end jobs as a user runs them
# (python -m congeal align on .npy shards of infiMNIST-style digit-3 collections, sigma 10 %) at
# 1k, 6k and 1M with congeal apply of the 1M model, and aligner inference throughput.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
R=$OUT/speed.jsonl
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
timeout 70 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024,4096 --steps 96 --out $R > $OUT/log.txt 2>&1
(cd .devold && PYTHONPATH=$PWD timeout 50 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 \
    --steps 96 --out $OUT/old.jsonl >> $OUT/log.txt 2>&1)
timeout 120 python bench/e2e_jobs.py --sizes 1000,6000 --device cuda --work /tmp/e2e --out $R >> $OUT/log.txt 2>&1
timeout 290 python bench/e2e_jobs.py --sizes 1000000 --device cuda --apply --work /tmp/e2e --out $R >> $OUT/log.txt 2>&1
timeout 40 python bench/gpu_speed.py --parts inference --out $R >> $OUT/log.txt 2>&1
tail -n 40 /tmp/e2e/align1000000.log > $OUT/align1m_log_tail.txt 2>/dev/null
grep '^#' $OUT/log.txt | tail -20
python - <<'PY'
import json, os
rows = [json.loads(l) for f in ("speed.jsonl", "old.jsonl") if os.path.exists(os.environ["OUT"] + "/" + f)
        for l in open(os.environ["OUT"] + "/" + f)]
for r in rows:
    if r["part"] == "e2e":
        e = r.get("eval", {})
        print("E2E", r["n_images"], r["seconds"], r.get("job_seconds"), "rc", r["rc"], "rss", r["peak_rss_mib"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("schedule"), r.get("apply"), r.get("stage_seconds"), (r.get("notes") or [])[-1:], (r.get("warnings") or [])[:2])
    elif r["part"] == "throughput":
        print("T", r.get("batch"), r.get("ms_per_step"), r.get("images_per_s"), r.get("achieved_tflops"), r.get("graph"), "" if r.get("graph") else r.get("notes", [])[:1], r.get("error", "")[-300:])
    else:
        print(r["part"], {k: v for k, v in r.items() if k not in ("part",)} if len(str(r)) < 600 else str(r)[:600])
PY
