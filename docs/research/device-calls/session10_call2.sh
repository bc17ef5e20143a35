#!/usr/bin/env bash
# Tenth session, device call 2 (not run: the session's device time went on failed starts): the
# 1k job with the common-zoom anchor (does it stop the first fit's zoom and so the re-fit?), then
# issue 14 at scale and the before/after of the kernel reduction; issue 16's other settings. Trainer throughput at 4,096 and the eighth session's trainer (.devold,
# commit 1f2877f) at 256 / 1,024 on the same card; the 1M end-to-end job with congeal apply of its
# model; aligner inference throughput; robustness: photographs at 64 px at 20 %, canvas at 10 / 20 %.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
for o in "--option zoom_anchor=1" "--option zoom_anchor=1 --option max_epochs=100"; do
  timeout 60 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "$o" --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
done
timeout 290 python bench/e2e_jobs.py --sizes 1000000 --device cuda --apply --work /tmp/e2e --out $OUT/speed.jsonl > $OUT/log.txt 2>&1
tail -n 40 /tmp/e2e/align1000000.log > $OUT/align1m_log_tail.txt 2>/dev/null
timeout 35 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 4096 --steps 48 --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
(cd .devold && PYTHONPATH=$PWD timeout 45 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 256,1024 \
    --steps 96 --out $OUT/old.jsonl >> $OUT/log.txt 2>&1)
timeout 30 python bench/gpu_speed.py --parts inference --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
R=$OUT/robustness.jsonl
timeout 90 python bench/robustness.py --sets photo --sigmas 0.2 --n 1000 --out $R > $OUT/rob_log.txt 2>&1
timeout 100 python bench/robustness.py --sets canvas --sigmas 0.1,0.2 --digits 3 --n 1000 --out $R >> $OUT/rob_log.txt 2>&1
grep '^#' $OUT/log.txt | tail -8
python - <<'PY'
import json, os
O = os.environ["OUT"]
rows = [json.loads(l) for f in ("speed.jsonl", "old.jsonl", "robustness.jsonl") if os.path.exists(f"{O}/{f}") for l in open(f"{O}/{f}")]
for r in rows:
    if r.get("part") == "e2e":
        e = r.get("eval", {})
        print("E2E", r["n_images"], r["seconds"], r.get("job_seconds"), "rc", r["rc"], "rss", r["peak_rss_mib"], "corner", e.get("residual_ratio"), "obj", e.get("object_residual_ratio"), "kept", e.get("content_kept"), r.get("schedule"), r.get("apply"), r.get("stage_seconds"), (r.get("notes") or [])[-1:], r.get("log_tail", "")[-500:])
    elif r.get("part") in ("throughput", "old"):
        print(r["part"], r.get("batch"), r.get("ms_per_step"), r.get("images_per_s"), r.get("achieved_tflops"), r.get("graph"), r.get("error", "")[-300:])
    elif r.get("part") == "inference":
        print("I", r.get("chunk"), r.get("dtype"), r.get("seconds"), r.get("images_per_s"))
    elif "set" in r:
        sub = {k: (r[k]["pairs"], r[k].get("object_residual_ratio"), r[k].get("residual_ratio")) for k in ("visible", "cut") if k in r}
        print(r["set"], r["subject"], r["sigma"], r["method"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), "frame", r.get("frame_size_median"), "apsnr", r.get("apsnr_after"), "undone", r.get("apsnr_undone"), "s", r.get("seconds"), sub, r.get("error"), (r.get("notes") or [])[-1:])
PY
