#!/usr/bin/env bash
# Eleventh session, device call 2. Call 1 showed the common-zoom anchor does not stop the 1k GPU
# job's first fit from cropping (kept 0.77, re-fit). Which GPU-only ingredient makes it crop? The 1k
# job without the re-fit (reframe=0) as is, with the CPU's small auto-encoder, at width 1, with a
# normalised reference plus the anchor, with a 10x anchor. Then trainer throughput at 4,096 and at
# widths 2 and 1, the DeSTNet's two convolutions alone by implementation, and one photograph set.
set -uo pipefail
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
for o in "" "--option preset=small" "--option width=1" "--option reference_frame=normalised --option zoom_anchor=1" "--option zoom_anchor=10"; do
  timeout 60 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "--option reframe=0 $o" --out $OUT/zoom.jsonl >> $OUT/log.txt 2>&1
done
timeout 40 python bench/conv_shapes.py --device cuda --batches 1024,4096 --out $OUT/conv.jsonl > $OUT/conv_log.txt 2>&1
timeout 45 python bench/gpu_speed.py --parts throughput --configs '[{}]' --batches 4096 --steps 192 --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
timeout 60 python bench/gpu_speed.py --parts throughput --configs '[{"width": 2}, {"width": 1}]' --batches 1024 --steps 192 --out $OUT/speed.jsonl >> $OUT/log.txt 2>&1
timeout 100 python bench/robustness.py --sets photo --photos astronaut --sigmas 0.1 --n 1000 --out $OUT/robustness.jsonl > $OUT/rob_log.txt 2>&1
python - <<'PY'
import json, os
O = os.environ["OUT"]
rows = [json.loads(l) for f in ("zoom.jsonl", "speed.jsonl", "conv.jsonl", "robustness.jsonl") if os.path.exists(f"{O}/{f}") for l in open(f"{O}/{f}")]
for r in rows:
    if r.get("part") == "e2e":
        e = r.get("eval", {})
        print("E2E", r.get("options"), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "corner", e.get("residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), r.get("stage_seconds", {}).get("fit_training"), (r.get("notes") or [])[-2:], r.get("log_tail", "")[-300:])
    elif r.get("part") == "throughput":
        print("T", r.get("config"), r.get("batch"), r.get("ms_per_step"), r.get("images_per_s"), r.get("achieved_tflops"), r.get("graph"), r.get("error", "")[-300:])
    elif "impl" in r:
        print("C", r["shape"], r["batch"], r["impl"], r["dtype"], r.get("ms"), r.get("tflops"), r.get("error", ""))
    elif "set" in r:
        print(r["set"], r["subject"], r["sigma"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), "frame", r.get("frame_size_median"), "apsnr", r.get("apsnr_after"), r.get("apsnr_undone"), "s", r.get("seconds"), r.get("error"), (r.get("notes") or [])[-2:])
PY
grep -i "error\|Traceback" $OUT/log.txt | tail -5
