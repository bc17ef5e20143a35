#!/usr/bin/env bash
# Fourteenth session, device call 2 (issue 14). Prepared: `.devold` = HEAD (commit before the
# reference pool, det3 and the float32 first layer); carry .devdata and .devold.
# (1) The step at 256 and 1,024, HEAD against the working tree (float32 first stage layer).
# (2) The 1k job twice (the first run also byte-compiles the modules a fresh machine has no .pyc for;
#     the second is what a deployed image pays), with the reference pool and det3.
# (3) The 1M job on the current trainer, collection drawn on the GPU (as in the eighth session's row).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
for root in .devold .; do
  timeout 70 python $root/bench/gpu_speed.py --device cuda --parts throughput --batches 256,1024 --configs '[{}]' --out $OUT/speed_$(basename $root).jsonl >> $OUT/speed_log.txt 2>&1
done; el speed
for k in 1 2; do
  timeout 70 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl >> $OUT/e2e_log.txt 2>&1
done; el e2e1k
timeout 400 python bench/e2e_jobs.py --sizes 1000000 --device cuda --gen-device cuda --work /tmp/e2e --out $OUT/e2e.jsonl >> $OUT/e2e_log.txt 2>&1; el e2e1m
tail -n 30 /tmp/e2e/align1000000.log > $OUT/align1m_log_tail.txt 2>/dev/null
python - <<PY
import json, os
def rows(f):
    return [json.loads(l) for l in open(f)] if os.path.exists(f) else []
for tag, f in (("before", "speed_.devold"), ("after", "speed_.")):
    for r in rows(f"$OUT/{f}.jsonl"):
        print("SPEED", tag, r.get("batch"), r.get("ms_per_step"), r.get("images_per_s"), r.get("achieved_tflops"), "fit", r.get("fit_seconds"), "graph", r.get("graph"))
for r in rows("$OUT/e2e.jsonl"):
    e = r.get("eval", {})
    print("E2E", r["n_images"], r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "corner", e.get("residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"))
    print("  stages", r.get("stage_seconds")); print("  notes", (r.get("notes") or [])[-2:])
PY
tail -3 $OUT/e2e_log.txt; tail -8 $OUT/align1m_log_tail.txt
