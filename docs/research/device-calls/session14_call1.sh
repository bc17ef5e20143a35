#!/usr/bin/env bash
# Fourteenth session, device call 1 (issue 14). Prepared: `.devold` = HEAD's models (the before),
# `git apply docs/research/device-calls/session13_nets.patch` (the after: channels-last stage and
# auto-encoder inputs, reshape max-pool on a GPU); carry .devdata and .devold.
# (1) The DeSTNet's 7x7 convolutions alone by implementation (cuDNN NCHW / channels-last / im2col
# + cuBLAS; bf16 / fp32). (2) The 1k job's cProfile (where its fixed time goes). (3) The step at 256
# and 1,024 before and after the patch. (4) Four digits' 1,000-image fits at max_epochs 120 beside
# the defaults (same pairs; four processes share the card: quality, not speed). (5) torch.compile's
# steady-state step at 1,024, last (its compile time may be long).
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
T0=$(date +%s); el() { echo "## $1 at $(( $(date +%s) - T0 )) s"; }
timeout 80 python bench/conv_shapes.py --device cuda --batches 1024,4096 --out $OUT/conv.jsonl > $OUT/conv_log.txt 2>&1; el conv
timeout 80 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --profile --out $OUT/e2e.jsonl > $OUT/e2e_log.txt 2>&1; el e2e
for root in .devold .; do
  timeout 80 python $root/bench/gpu_speed.py --device cuda --parts throughput --batches 256,1024 --configs '[{}]' --out $OUT/speed_$(basename $root).jsonl >> $OUT/speed_log.txt 2>&1
done; el speed
for d in 0 4 7 9; do
  timeout 170 python bench/sweep.py --digits $d --sigmas 0.1 --n 500 --device cuda --configs '[{}, {"max_epochs": 120}]' --out $OUT/sweep.jsonl > $OUT/sweep_log_$d.txt 2>&1 &
done
wait; el sweep
LEFT=$(( 560 - ($(date +%s) - T0) ))
[ $LEFT -gt 40 ] && timeout $LEFT python bench/gpu_speed.py --device cuda --parts throughput --batches 1024 --steps 384 --configs '[{"compile": true}]' --out $OUT/speed_compile.jsonl >> $OUT/speed_log.txt 2>&1; el compile
python - <<PY
import json, os
def rows(f):
    return [json.loads(l) for l in open(f)] if os.path.exists(f) else []
by = {}
for r in rows("$OUT/conv.jsonl"):
    print("CONV", r.get("shape"), r.get("batch"), r.get("impl"), r.get("dtype"), r.get("ms"), r.get("tflops"), r.get("error", "")[:80])
for r in rows("$OUT/e2e.jsonl"):
    e = r.get("eval", {})
    print("E2E", r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "corner", e.get("residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"))
    print("  stages", r.get("stage_seconds")); print("  notes", (r.get("notes") or [])[-2:])
for tag, f in (("before", "speed_.devold"), ("after", "speed_."), ("compile", "speed_compile")):
    for r in rows(f"$OUT/{f}.jsonl"):
        print("SPEED", tag, r.get("config"), r.get("batch"), r.get("ms_per_step"), r.get("images_per_s"), r.get("step_gflop"), r.get("achieved_tflops"), "fit", r.get("fit_seconds"), "first", r.get("first_block_s"), "graph", r.get("graph"))
for r in rows("$OUT/sweep.jsonl"):
    print("SW", r.get("digit"), r.get("cfg"), "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), "s", r.get("seconds"), (r.get("notes") or [])[-1:])
PY
grep -B2 -A40 "function calls" $OUT/e2e_log.txt | head -60
tail -5 $OUT/speed_log.txt
