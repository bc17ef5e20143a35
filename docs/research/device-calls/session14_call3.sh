#!/usr/bin/env bash
# Fourteenth session, device call 3 (issue 14): why the 1M job's first fit zooms in (content kept
# 0.67 at 1M, 1.00 at 6k with the same schedule). Two candidates at 1M, first fit alone
# (reframe=0): training on 16,384 evenly spaced images (train_pool; every image still aligned: is it
# the number of distinct images?) and the common-zoom anchor. Then the 6k job and a 1k job at
# max_epochs=150 (the 15 s target) on the same card, and the 1M job as a user runs it with the pool.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
E="python bench/e2e_jobs.py --device cuda --work /tmp/e2e --out $OUT/e2e.jsonl"
timeout 150 $E --sizes 1000000 --gen-device cuda --options "--option reframe=0 --option train_pool=16384" >> $OUT/log.txt 2>&1; el pool
timeout 150 $E --sizes 1000000 --gen-device cuda --options "--option reframe=0 --option zoom_anchor=1" >> $OUT/log.txt 2>&1; el anchor
timeout 80 $E --sizes 6000 >> $OUT/log.txt 2>&1; el 6k
timeout 60 $E --sizes 1000 --options "--option max_epochs=150" >> $OUT/log.txt 2>&1; el 1k150
LEFT=$(( 570 - ($(date +%s) - T0) ))
[ $LEFT -gt 100 ] && timeout $LEFT $E --sizes 1000000 --gen-device cuda --options "--option train_pool=16384" >> $OUT/log.txt 2>&1; el 1mpool
python - <<PY
import json
for l in open("$OUT/e2e.jsonl"):
    r = json.loads(l); e = r.get("eval", {}); f = r.get("framing_summary", {})
    print("E2E", r["n_images"], repr(r.get("options")), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "corner", e.get("residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), "area", f.get("area_scale_median"))
    print("  stages", r.get("stage_seconds")); print("  notes", (r.get("notes") or [])[-2:])
PY
tail -3 $OUT/log.txt
