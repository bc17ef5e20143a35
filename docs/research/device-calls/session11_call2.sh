#!/usr/bin/env bash
# Eleventh session, device call 2. Call 1 showed the common-zoom anchor does not stop the 1k GPU
# job's first fit from cropping (kept 0.77, re-fit). Which GPU-only ingredient makes it crop? The 1k
# job without the re-fit (reframe=0) as is, with the CPU's small auto-encoder, at width 1, with a
# normalised reference plus the anchor, with a 10x anchor. Then the pairwise benchmark on the GPU
# beside kornia (issue 17; kornia travels as wheels: .whl copied to devwhl/ for this call), one photograph set (issue 16), and the
# DeSTNet's two convolutions alone by implementation (issue 14's profile).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site devwhl/*.whl
export CONGEAL_MNIST_NPZ=$PWD/.devdata/mnist.npz PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:/tmp/site
nvidia-smi --query-gpu=name --format=csv,noheader
for o in "" "--option preset=small" "--option width=1" "--option reference_frame=normalised --option zoom_anchor=1" "--option zoom_anchor=10"; do
  timeout 50 python bench/e2e_jobs.py --sizes 1000 --device cuda --work /tmp/e2e --options "--option reframe=0 $o" --out $OUT/zoom.jsonl >> $OUT/log.txt 2>&1
done
timeout 120 python bench/pairwise.py --pairs 32 --methods learned,ecc,kornia --limit kornia=8 --device cuda --out $OUT/pairwise_gpu.jsonl > $OUT/pairwise_log.txt 2>&1
timeout 90 python bench/robustness.py --sets photo --photos astronaut --sigmas 0.1 --n 1000 --out $OUT/robustness.jsonl > $OUT/rob_log.txt 2>&1
python - <<'PY'
import json, os
O = os.environ["OUT"]
rows = [json.loads(l) for f in ("zoom.jsonl", "robustness.jsonl") if os.path.exists(f"{O}/{f}") for l in open(f"{O}/{f}")]
for r in rows:
    if r.get("part") == "e2e":
        e = r.get("eval", {})
        print("E2E", r.get("options"), r["seconds"], "rc", r["rc"], "obj", e.get("object_residual_ratio"), "corner", e.get("residual_ratio"), "kept", e.get("content_kept"), "frame", e.get("frame_size_median"), r.get("stage_seconds", {}).get("fit_training"), (r.get("notes") or [])[-2:], r.get("log_tail", "")[-300:])
    elif "set" in r:
        print(r["set"], r["subject"], r["sigma"], "obj", r.get("object_residual_ratio"), "corner", r.get("residual_ratio"), "kept", r.get("content_kept"), "frame", r.get("frame_size_median"), "apsnr", r.get("apsnr_after"), r.get("apsnr_undone"), "s", r.get("seconds"), r.get("error"), (r.get("notes") or [])[-2:])
PY
tail -n 14 $OUT/pairwise_log.txt
grep -i "error\|Traceback" $OUT/log.txt | tail -5
timeout 30 python bench/conv_shapes.py --device cuda --batches 1024,4096 --reps 10 --out $OUT/conv.jsonl
